//! The integration service: every customer created in CRM gets exactly one welcome package
//! request in Inventory, and a customer deleted while its package is still PENDING gets it
//! cancelled.
//!
//! - [`engine`]: follows CRM's feed (stream, poll, and back), runs deliveries and cancels
//!   concurrently, and keeps the checkpoint at the low watermark of finished work; after a
//!   relist, cancels the packages of customers deleted in the events it lost.
//! - [`deliver`]: one delivery or cancel: derived idempotency key, deadline, status-aware
//!   retries.
//! - [`batch`]: the calls underneath, coalesced into `BatchCreatePackageRequests`.
//! - [`tracker`]: the checkpoint rule.
//! - [`lease`]: how workers sharing one database split the feed into partitions: leases with
//!   fencing epochs, and one checkpoint per partition.
//! - [`store`]: partitions, workers and dead letters, in the service's own SQLite database or in schema
//!   `integration` of a PostgreSQL database.
//! - [`service`]: the admin API (`integration.v1.IntegrationService`).
//! - [`error`]: how calls fail, and the one mapping to gRPC statuses.
//!
//! The guarantee: at-least-once delivery (the checkpoint never passes unfinished work) plus an
//! idempotent receiver (the same request id for the same customer) gives an exactly-once
//! effect: one package request per customer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod deliver;
pub mod engine;
pub mod error;
pub mod lease;
pub mod service;
pub mod store;
pub mod tracker;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::integration::v1::integration_service_server::IntegrationServiceServer;
use mip_runtime::CancellationToken;
use mip_runtime::clock::SharedClock;
use mip_runtime::security::{AuthenticatedChannel, Security, SecurityError};
use mip_runtime::server::{Health, ServeError, ServerOptions};
use mip_runtime::store::Database;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::deliver::{Deliverer, Jitter, RetryPolicy};
use crate::engine::{Engine, FeedSettings, Handler};
pub use crate::error::Error;
use crate::lease::{DEFAULT_PARTITIONS, LeasePause, Leases};
use crate::store::IntegrationStore;
use crate::tracker::Mark;

/// Attempts per dead letter in one `RetryDeadLetters` call.
const REDRIVE_ATTEMPTS: u32 = 3;

/// Default of `--max-in-flight`. Batches form from the deliveries waiting while earlier calls
/// are out (4 calls of up to 1000), so this bounds batch size: with 64, four calls shared at
/// most 64 requests (about 16 each) and end-to-end throughput stayed near 10,000 customers/s;
/// with 2048 the integration service keeps up with creation (TECHNICAL_DESIGN.md,
/// Performance). It stays
/// below Inventory's default `--max-concurrent-requests` (4096), so even one call per package
/// (an Inventory without the batch method) is not refused.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2048;

/// Fully-qualified gRPC name of the admin service.
pub const SERVICE_NAME: &str = "integration.v1.IntegrationService";

/// How the service reads CRM's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Stream; fall back to polling when streaming fails, and return when it works again.
    #[default]
    Auto,
    /// Stream only; reconnect with backoff on failure.
    Stream,
    /// Poll only.
    Poll,
}

/// Where to start on a first run, with no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StartPosition {
    /// From the oldest event CRM keeps: existing customers get their package too.
    #[default]
    Earliest,
    /// Only customers created from now on.
    Latest,
}

/// What the feed reader is doing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedState {
    /// Following `WatchCustomers`.
    Stream,
    /// Polling `ListCustomerEvents`.
    Poll,
}

/// The integration service's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct IntegrationOptions {
    /// CRM address (HOST:PORT or URL), or several replicas' addresses, comma-separated: calls
    /// are balanced over them and skip a dead one on retry. `mip all` ignores it and uses its
    /// own CRM.
    #[arg(long, env = "MIP_CRM_ADDR", default_value = "127.0.0.1:50051")]
    pub crm_addr: String,

    /// Inventory address (HOST:PORT or URL), or several replicas' addresses, comma-separated:
    /// calls are balanced over them and skip a dead one on retry. `mip all` ignores it and
    /// uses its own Inventory.
    #[arg(long, env = "MIP_INVENTORY_ADDR", default_value = "127.0.0.1:50052")]
    pub inventory_addr: String,

    /// How to read CRM's feed: `auto` streams and falls back to polling, `stream` or `poll`
    /// force one.
    #[arg(long, env = "MIP_INTEGRATION_MODE", value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Where to start when there is no checkpoint yet: `earliest` also delivers to customers
    /// that already exist; `latest` only to new ones.
    #[arg(long, env = "MIP_INTEGRATION_START_POSITION", value_enum, default_value_t = StartPosition::Earliest)]
    pub start_position: StartPosition,

    /// Pause between polls once caught up. A poll reads only new events, so short is cheap.
    #[arg(long, env = "MIP_INTEGRATION_POLL_INTERVAL", default_value = "500ms", value_parser = mip_runtime::parse_positive_duration)]
    pub poll_interval: Duration,

    /// While polling in auto mode, how often to try streaming again.
    #[arg(long, env = "MIP_INTEGRATION_STREAM_PROBE_INTERVAL", default_value = "10s", value_parser = mip_runtime::parse_positive_duration)]
    pub stream_probe_interval: Duration,

    /// Consecutive stream failures before auto mode falls back to polling (UNIMPLEMENTED
    /// switches at once).
    #[arg(long, env = "MIP_INTEGRATION_STREAM_FAILURES", default_value_t = 3)]
    pub stream_failures_before_poll: u32,

    /// A watch stream silent for this long (no event, no heartbeat) is reconnected. Keep it
    /// above CRM's heartbeat interval.
    #[arg(long, env = "MIP_INTEGRATION_STREAM_IDLE_TIMEOUT", default_value = "30s", value_parser = mip_runtime::parse_positive_duration)]
    pub stream_idle_timeout: Duration,

    /// Package requests in flight at once. Under load they share a few
    /// BatchCreatePackageRequests calls, so this also caps how large those batches can grow.
    #[arg(long, env = "MIP_INTEGRATION_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// Attempts per delivery before it is dead-lettered (transient errors only; permanent
    /// errors dead-letter at once).
    #[arg(long, env = "MIP_INTEGRATION_MAX_ATTEMPTS", default_value_t = 30)]
    pub max_attempts: u32,

    /// Deadline of each call to CRM or Inventory.
    #[arg(long, env = "MIP_INTEGRATION_CALL_TIMEOUT", default_value = "5s", value_parser = mip_runtime::parse_positive_duration)]
    pub call_timeout: Duration,

    /// First retry backoff; doubles per attempt, with jitter.
    #[arg(long, env = "MIP_INTEGRATION_RETRY_INITIAL", default_value = "50ms", value_parser = mip_runtime::parse_positive_duration)]
    pub retry_initial: Duration,

    /// Largest retry backoff.
    #[arg(long, env = "MIP_INTEGRATION_RETRY_MAX", default_value = "10s", value_parser = mip_runtime::parse_positive_duration)]
    pub retry_max: Duration,

    /// Partitions CRM's feed is split into, so several workers on one PostgreSQL database can
    /// share it. Recorded on first start; a later start with another count is refused.
    #[arg(long, env = "MIP_INTEGRATION_PARTITIONS", default_value_t = DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=i64::from(mip_runtime::partition::MAX_PARTITIONS)))]
    pub partitions: u32,

    /// How long a worker's lease on a partition lasts without renewal; renewed every third of
    /// it. A stalled worker's partitions move to others after this long.
    #[arg(long, env = "MIP_INTEGRATION_LEASE_TTL", default_value = "10s", value_parser = mip_runtime::parse_positive_duration)]
    pub lease_ttl: Duration,

    /// This worker's name in the cluster. A worker restarted under the name it had takes its
    /// partitions back at once (fencing anything its old process still writes) instead of
    /// waiting --lease-ttl for the old leases to run out. Give each worker a stable name of
    /// its own, such as its pod or host name; two running workers must never share one.
    /// Default: `local` on SQLite (one process owns the file), a random id per start on
    /// PostgreSQL.
    #[arg(long, env = "MIP_INTEGRATION_WORKER_ID", value_parser = parse_worker_id)]
    pub worker_id: Option<String>,

    /// Stops the lease renewals while set (tests use it to stage a stalled worker).
    #[arg(skip)]
    pub lease_pause: LeasePause,
}

impl Default for IntegrationOptions {
    fn default() -> Self {
        Self {
            crm_addr: "127.0.0.1:50051".into(),
            inventory_addr: "127.0.0.1:50052".into(),
            mode: Mode::Auto,
            start_position: StartPosition::Earliest,
            poll_interval: Duration::from_millis(500),
            stream_probe_interval: Duration::from_secs(10),
            stream_failures_before_poll: 3,
            stream_idle_timeout: Duration::from_secs(30),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_attempts: 30,
            call_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(10),
            partitions: DEFAULT_PARTITIONS,
            lease_ttl: Duration::from_secs(10),
            worker_id: None,
            lease_pause: LeasePause::default(),
        }
    }
}

/// Counters and feed state, shared by the engine and the admin API.
#[derive(Debug, Default)]
pub struct Stats {
    /// Package requests created or found created.
    pub delivered: AtomicU64,
    /// Retried attempts.
    pub retried: AtomicU64,
    /// Package requests this service moved to CANCELLED because their customer was deleted
    /// (not those it found cancelled already).
    pub cancelled: AtomicU64,
    /// Cancels that found the package past PENDING (SHIPPED or DELIVERED) and left it as is.
    pub left_as_is: AtomicU64,
    /// Deliveries that went to the dead-letter list.
    pub dead_lettered: AtomicU64,
    /// Switches between streaming and polling.
    pub mode_switches: AtomicU64,
    /// Whether a watch stream is open.
    pub stream_connected: AtomicBool,
    /// Checkpoint writes refused because the lease had moved on.
    pub checkpoint_fenced: AtomicU64,
    /// 0 unknown, 1 stream, 2 poll.
    mode: AtomicU8,
    /// Newest CRM sequence seen.
    head_seen: AtomicI64,
    /// The lowest saved checkpoint of the partitions held.
    checkpoint: Mutex<Option<Mark>>,
}

impl Stats {
    /// The feed state; `None` while starting.
    pub fn mode(&self) -> Option<FeedState> {
        match self.mode.load(Ordering::Relaxed) {
            1 => Some(FeedState::Stream),
            2 => Some(FeedState::Poll),
            _ => None,
        }
    }

    fn set_mode(&self, state: FeedState) {
        let code = match state {
            FeedState::Stream => 1,
            FeedState::Poll => 2,
        };
        self.mode.store(code, Ordering::Relaxed);
        // One series per mode, 1 for the current one: an alert can ask how long `poll` has
        // been 1, which a counter of switches cannot tell.
        for (label, mode) in [("stream", FeedState::Stream), ("poll", FeedState::Poll)] {
            let on = if mode == state { 1.0 } else { 0.0 };
            metrics::gauge!("mip_integration_feed_mode", "mode" => label).set(on);
        }
    }

    /// After a relist: the head is the snapshot's, even if a replaced log was further on.
    fn reset_head(&self, sequence: i64) {
        self.head_seen.store(sequence, Ordering::Relaxed);
    }

    fn saw_head(&self, sequence: i64) {
        self.head_seen.fetch_max(sequence, Ordering::Relaxed);
        metrics::gauge!("mip_integration_checkpoint_lag_events").set(self.lag() as f64);
    }

    fn set_checkpoint(&self, mark: Option<Mark>) {
        let sequence = mark.as_ref().map(|m| m.sequence);
        *self.checkpoint.lock().expect("stats lock") = mark;
        if let Some(sequence) = sequence {
            // The position itself, so an alert can see it stand still while CRM takes writes.
            metrics::gauge!("mip_integration_checkpoint_sequence").set(sequence as f64);
            self.saw_head(sequence);
        }
    }

    /// Counts checkpoint writes refused by the epoch check.
    fn count_fenced(&self, n: u64) {
        self.checkpoint_fenced.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("mip_integration_checkpoint_fenced_total").increment(n);
    }

    /// The newest CRM sequence seen.
    pub fn head_seen(&self) -> i64 {
        self.head_seen.load(Ordering::Relaxed)
    }

    /// Counts a delivered package request; `delay` is the time from the customer's creation
    /// to the package request's, when both are known.
    fn count_delivered(&self, delay: Option<Duration>) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mip_integration_delivered_total").increment(1);
        if let Some(delay) = delay {
            metrics::histogram!("mip_integration_end_to_end_delay_seconds")
                .record(delay.as_secs_f64());
        }
    }

    /// Counts a package request moved to CANCELLED.
    fn count_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mip_integration_cancelled_total").increment(1);
    }

    /// Counts a cancel that found its package already shipped.
    fn count_left_as_is(&self) {
        self.left_as_is.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mip_integration_cancel_left_as_is_total").increment(1);
    }

    /// Counts a retried attempt.
    fn count_retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mip_integration_retried_total").increment(1);
    }

    /// Counts a delivery that went to the dead-letter list.
    fn count_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mip_integration_dead_lettered_total").increment(1);
        // Shown at once; the next recount from the store (`publish_dead_letters`) corrects
        // it if the letter was stored already.
        metrics::gauge!("mip_integration_dead_letters").increment(1.0);
    }

    /// Counts a switch between streaming and polling.
    fn count_mode_switch(&self, to: FeedState) {
        self.mode_switches.fetch_add(1, Ordering::Relaxed);
        let to = match to {
            FeedState::Stream => "stream",
            FeedState::Poll => "poll",
        };
        metrics::counter!("mip_integration_mode_switches_total", "to" => to).increment(1);
    }

    /// The saved checkpoint's token and sequence (empty and 0 before the first).
    pub fn checkpoint(&self) -> (String, i64) {
        self.checkpoint
            .lock()
            .expect("stats lock")
            .as_ref()
            .map(|m| (m.token.clone(), m.sequence))
            .unwrap_or_default()
    }

    /// Events in CRM's log after the checkpoint, as last seen.
    pub fn lag(&self) -> i64 {
        let (_, checkpoint) = self.checkpoint();
        (self.head_seen.load(Ordering::Relaxed) - checkpoint).max(0)
    }
}

/// How often `mip_integration_dead_letters` is recounted from the store: about one scrape
/// interval, so the gauge is never much older than the scrape that reads it.
const DEAD_LETTER_COUNT_EVERY: Duration = Duration::from_secs(15);

/// Records every series the integration service exports at zero, before anything happens:
/// the exporter prints a series only once it has been recorded, and an alert on dead letters
/// or fenced checkpoints must read a zero before the first one, not nothing.
fn export_metrics_at_zero() {
    for counter in [
        "mip_integration_delivered_total",
        "mip_integration_retried_total",
        "mip_integration_dead_lettered_total",
        "mip_integration_checkpoint_fenced_total",
        "mip_integration_cancelled_total",
        "mip_integration_cancel_left_as_is_total",
    ] {
        metrics::counter!(counter).increment(0);
    }
    for mode in ["stream", "poll"] {
        metrics::counter!("mip_integration_mode_switches_total", "to" => mode).increment(0);
        metrics::gauge!("mip_integration_feed_mode", "mode" => mode).increment(0.0);
    }
    metrics::gauge!("mip_integration_checkpoint_lag_events").increment(0.0);
    metrics::gauge!("mip_integration_dead_letters").increment(0.0);
}

/// Keeps `mip_integration_dead_letters` at the number of dead letters stored until `stop`.
/// Counted in the store rather than from this process's own events: workers on one database
/// share one list, and a re-drive through any of them shortens it for all.
async fn publish_dead_letters(store: Arc<dyn IntegrationStore>, stop: CancellationToken) {
    let mut every = tokio::time::interval(DEAD_LETTER_COUNT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        // A store that hangs (an unreachable database) must not hold up shutdown.
        let counted = tokio::select! {
            counted = store.count_dead_letters() => counted,
            () = stop.cancelled() => return,
        };
        match counted {
            Ok(n) => metrics::gauge!("mip_integration_dead_letters").set(n as f64),
            // The gauge keeps its last value; the store's own failures are reported elsewhere.
            Err(e) => tracing::debug!(error = %e, "cannot count dead letters"),
        }
    }
}

/// Why the integration service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened, or failed for good.
    #[error("integration store")]
    Store(#[from] Error),
    /// An address, a certificate or a token for calling CRM or Inventory is not usable.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// A lazily connected channel that carries this service's token (and TLS, when configured):
/// the service starts even while CRM or Inventory is down, and reconnects by itself when they
/// come back.
///
/// `addrs` is one address or several, comma-separated, each `HOST:PORT` or a URL. Several are
/// replicas of one service: the channel balances calls over them (power of two choices), each
/// with its own lazy, reconnecting connection and the same connect timeout and keepalive. A
/// call that lands on a dead replica fails as UNAVAILABLE, which every caller retries, and
/// the retry is balanced again, so it reaches a live replica; the dead one is tried again
/// later and rejoins once it answers. A broken watch stream reconnects the same way.
fn channel(
    addrs: &str,
    options: &IntegrationOptions,
    security: &Security,
) -> Result<AuthenticatedChannel, StartError> {
    let endpoints = addrs
        .split(',')
        .map(|addr| {
            let endpoint = match addr.trim() {
                // Refused like any malformed address, naming the whole list so it can be found.
                "" => Err(SecurityError::Address {
                    addr: format!("{addrs} (an empty element)"),
                    source: Endpoint::from_shared("").expect_err("an empty URI is never valid"),
                }),
                addr => security.endpoint(addr),
            }?;
            Ok::<_, SecurityError>(
                endpoint
                    .connect_timeout(options.call_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let channel = match <[Endpoint; 1]>::try_from(endpoints) {
        // One address keeps its plain channel: no balancer, no extra buffer.
        Ok([endpoint]) => endpoint.connect_lazy(),
        // Balanced connections are lazy too: nothing connects until the first call.
        Err(endpoints) => Channel::balance_list(endpoints.into_iter()),
    };
    Ok(InterceptedService::new(channel, security.authenticator()))
}

/// The worker name on SQLite, whose file one process owns: a restart after a crash takes its
/// partitions back at once.
const LOCAL_WORKER: &str = "local";

/// A `--worker-id`: printable, no spaces, at most 128 characters.
fn parse_worker_id(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty() && raw.len() <= 128 && raw.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(raw.to_owned())
    } else {
        Err("must be 1 to 128 printable ASCII characters without spaces".to_owned())
    }
}

/// Opens the store `database` names, serves the admin API on `listener`, and follows CRM
/// until `shutdown` is cancelled.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    database: &Database,
    options: IntegrationOptions,
    server: &ServerOptions,
    clock: SharedClock,
    jitter: Arc<dyn Jitter>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    export_metrics_at_zero();
    let health = Health::new(&[SERVICE_NAME]).await;
    let security = server.security.load()?;
    // A store that fails for good stops serving too, not only the engine.
    let stop = shutdown.child_token();
    let store = store::open(database, &stop).await?;
    let stats = Arc::new(Stats::default());
    let worker_id = options.worker_id.clone().unwrap_or_else(|| match database {
        Database::Sqlite { .. } => LOCAL_WORKER.to_owned(),
        Database::Postgres(_) => uuid::Uuid::new_v4().to_string(),
    });
    let leases = Arc::new(Leases::new(
        worker_id,
        Arc::clone(&store),
        options.partitions,
        options.lease_ttl,
        Arc::clone(&clock),
        Arc::clone(&stats),
        options.lease_pause.clone(),
    ));
    let crm = CrmServiceClient::new(channel(&options.crm_addr, &options, &security)?)
        .max_decoding_message_size(server.max_message_bytes);
    let deliverer = Deliverer::new(
        channel(&options.inventory_addr, &options, &security)?,
        RetryPolicy {
            max_attempts: options.max_attempts.max(1),
            initial_backoff: options.retry_initial,
            max_backoff: options.retry_max,
            call_timeout: options.call_timeout,
        },
        jitter,
        Arc::clone(&stats),
        server.max_message_bytes,
    );
    // Re-drives answer an admin call, so they try a few times rather than for minutes.
    let handler = Handler {
        store: Arc::clone(&store),
        deliverer: deliverer.with_max_attempts(REDRIVE_ATTEMPTS),
        stats: Arc::clone(&stats),
        clock: Arc::clone(&clock),
        shutdown: stop.clone(),
        redrive: true,
    };
    let settings = FeedSettings {
        mode: options.mode,
        start_position: options.start_position,
        poll_interval: options.poll_interval,
        stream_probe_interval: options.stream_probe_interval,
        stream_failures_before_poll: options.stream_failures_before_poll.max(1),
        stream_idle_timeout: options.stream_idle_timeout,
        max_in_flight: options.max_in_flight.max(1),
        call_timeout: options.call_timeout,
        initial_backoff: options.retry_initial,
        max_backoff: options.retry_max,
    };
    let engine = Engine::new(
        Arc::clone(&store),
        Arc::clone(&leases),
        crm,
        deliverer,
        settings,
        Arc::clone(&stats),
        clock,
        stop.clone(),
    );
    let configured_mode = format!("{:?}", options.mode).to_lowercase();
    let api = service::IntegrationApi::new(handler, stats, Arc::clone(&leases), configured_mode);
    let routes = Routes::new(mip_runtime::limited!(
        IntegrationServiceServer::new(api),
        server
    ));
    // Serving starts at once (NOT_SERVING, admin calls UNAVAILABLE) while the store connects.
    let engine_task = tokio::spawn(start_engine(
        store,
        leases,
        engine,
        health.clone(),
        stop.clone(),
    ));
    let served = mip_runtime::server::serve_secured(
        listener,
        mip_proto::INTEGRATION_DESCRIPTOR_SET,
        routes,
        health,
        server,
        security,
        stop.clone(),
    )
    .await;
    // The engine stops on the same token; a server that failed on its own must stop it too.
    stop.cancel();
    let started = engine_task.await;
    served?;
    match started {
        Ok(result) => result.map_err(StartError::Store),
        // A panic was reported where it happened; serving stopped cleanly.
        Err(_) => Ok(()),
    }
}

/// Waits for the store, records (or checks) the partition count, takes a first share of the
/// partitions, marks the service SERVING and follows the feed until `stop`, renewing leases
/// meanwhile; at a clean stop it gives its leases up. A store that fails for good, or a
/// partition count other than the recorded one, cancels `stop` (ending `serve`) and is
/// returned.
async fn start_engine(
    store: Arc<dyn IntegrationStore>,
    leases: Arc<Leases>,
    engine: Engine<dyn IntegrationStore>,
    health: Health,
    stop: CancellationToken,
) -> Result<(), Error> {
    let prepared = tokio::select! {
        prepared = prepare(&*store, &leases, &stop) => prepared,
        () = stop.cancelled() => return Ok(()),
    };
    match prepared {
        Ok(()) => {}
        Err(_) if stop.is_cancelled() => return Ok(()),
        Err(e) => {
            tracing::error!(error = %e, "the integration store cannot be used; stopping");
            stop.cancel();
            return Err(e);
        }
    }
    health.set_serving().await;
    let renewing = stop.child_token();
    let lease_loop = {
        let (leases, renewing) = (Arc::clone(&leases), renewing.clone());
        tokio::spawn(async move { leases.run(renewing).await })
    };
    let counting = tokio::spawn(publish_dead_letters(Arc::clone(&store), renewing.clone()));
    engine.run().await;
    renewing.cancel();
    let _ = lease_loop.await;
    let _ = counting.await;
    leases.retire().await;
    Ok(())
}

/// Once the store is ready: the partitions, and a first lease round. Transient failures (a
/// database that went away just after connecting) are retried with backoff.
async fn prepare(
    store: &dyn IntegrationStore,
    leases: &Leases,
    stop: &CancellationToken,
) -> Result<(), Error> {
    store.ready().await?;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            store.init_partitions(leases.partition_count()).await?;
            leases.round().await
        };
        match attempt.await {
            Err(e) if e.is_transient() && !stop.is_cancelled() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot set up the partitions yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
}
