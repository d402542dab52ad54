//! The CRM service: customers, and the ordered, resumable feed of every change to them.
//!
//! - [`domain`]: customers, validation, events and log positions.
//! - [`store`]: the storage trait, [`store::open`] (the one place a database URL becomes a
//!   store), and its SQLite and PostgreSQL implementations (group commit, change log in the
//!   same transaction as each change).
//! - [`feed`]: the in-memory live end of the change log that watchers read from.
//! - [`service`]: the gRPC edge (`crm.v1.CrmService`), including the watch streams.
//! - [`validate`]: requests into validated domain values, every bad field reported at once.
//! - [`wire`]: the watch streams on the network, each event encoded once for all watchers.
//! - [`error`]: every failure, and its gRPC status.
//!
//! [`serve`] runs the service on a listener until a shutdown token is cancelled.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod domain;
pub mod error;
pub mod feed;
pub mod service;
pub mod store;
pub mod validate;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use mip_runtime::CancellationToken;
use mip_runtime::clock::SharedClock;
use mip_runtime::server::{Health, ServeError, ServerOptions};
use mip_runtime::store::{Database, DbError};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tracing::warn;

pub use error::Error;
pub use service::CrmApi;
pub use store::{CrmStore, PgStore, SqliteStore};

/// Fully-qualified gRPC name of the service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "crm.v1.CrmService";

/// CRM's own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CrmOptions {
    /// Interval between heartbeats on an idle WatchCustomers stream. Heartbeats carry the
    /// current resume token and keep proxies from closing quiet streams.
    #[arg(long, env = "MIP_CRM_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = mip_runtime::parse_positive_duration)]
    pub heartbeat_interval: Duration,

    /// Delete change events older than this (for example `7d`). Resume tokens older than what
    /// is kept then get FAILED_PRECONDITION (RESUME_TOKEN_EXPIRED). Unset: keep every event.
    #[arg(long, env = "MIP_CRM_EVENT_RETENTION", value_parser = humantime::parse_duration)]
    pub event_retention: Option<Duration>,

    /// Make WatchCustomers return UNIMPLEMENTED, so clients must poll ListCustomerEvents.
    /// Demonstrates the integration service's polling fallback.
    #[arg(long, env = "MIP_CRM_DISABLE_WATCH")]
    pub disable_watch: bool,

    /// Most WatchCustomers streams open at once; further ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "MIP_CRM_MAX_WATCHERS", default_value_t = 10_000)]
    pub max_watchers: usize,

    /// How often CRM reads the shared PostgreSQL change log back (10ms to 1s): how soon other
    /// CRM processes' commits reach this one's watchers. SQLite has no other writers and
    /// ignores it.
    #[arg(long, env = "MIP_CRM_FEED_POLL_INTERVAL", default_value = "100ms", value_parser = parse_feed_poll_interval)]
    pub feed_poll_interval: Duration,
}

/// Shortest and longest `--feed-poll-interval`: faster costs the database a query per
/// process that often; slower makes other processes' commits late.
const FEED_POLL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(1);

fn parse_feed_poll_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !FEED_POLL_RANGE.contains(&interval) {
        return Err("must be from 10ms to 1s".into());
    }
    Ok(interval)
}

impl Default for CrmOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            event_retention: None,
            disable_watch: false,
            max_watchers: 10_000,
            feed_poll_interval: store::DEFAULT_FEED_POLL_INTERVAL,
        }
    }
}

/// Opens the store `database` names and serves CRM on `listener` until `shutdown` is
/// cancelled.
///
/// The server answers at once, with health NOT_SERVING until the store is ready (a PostgreSQL
/// server may still be unreachable; calls meanwhile get UNAVAILABLE), then follows the store's
/// health: NOT_SERVING while it cannot reach its database (open watch streams then end with
/// UNAVAILABLE), SERVING again once it can. A store that can never be ready (wrong password,
/// missing database) stops `serve` with its error.
pub async fn serve(
    listener: TcpListener,
    database: &Database,
    options: CrmOptions,
    server: &ServerOptions,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let health = Health::new(&[SERVICE_NAME]).await;
    // Stops this server alone when its store fails; the caller's token may stop others too.
    let stop = shutdown.child_token();
    let store = store::open_polling(database, &stop, options.feed_poll_interval).await?;
    if let Some(retention) = options.event_retention {
        tokio::spawn(prune_loop(
            Arc::clone(&store),
            retention,
            Arc::clone(&clock),
            stop.clone(),
        ));
    }
    let api = CrmApi::new(Arc::clone(&store), options, clock, stop.clone());
    let routes = Routes::new(wire::CrmRoutes::new(api, server));
    let serving = mip_runtime::server::serve(
        listener,
        mip_proto::CRM_DESCRIPTOR_SET,
        routes,
        health.clone(),
        server,
        stop.clone(),
    );
    tokio::pin!(serving);
    tokio::select! {
        ready = store.ready() => match ready {
            Ok(()) => {
                tokio::spawn(follow_health(store.health(), health.clone(), stop.clone()));
            }
            // Shutting down before the store connected is not a failure.
            Err(Error::Storage(DbError::Closed)) if stop.is_cancelled() => {}
            Err(e) => {
                stop.cancel();
                // Let the server close its listener and connections before reporting.
                let _ = serving.await;
                return Err(StartError::Store(e));
            }
        },
        served = &mut serving => {
            served?;
            return Ok(());
        }
    }
    serving.await?;
    Ok(())
}

/// Why CRM could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("CRM store")]
    Store(#[from] Error),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Reports the store's health as the service's until `shutdown`: NOT_SERVING while the
/// store cannot reach its database, so balancers and clients go elsewhere meanwhile.
async fn follow_health(
    mut store: tokio::sync::watch::Receiver<bool>,
    health: Health,
    shutdown: CancellationToken,
) {
    loop {
        if *store.borrow_and_update() {
            health.set_serving().await;
        } else {
            health.set_not_serving().await;
        }
        tokio::select! {
            changed = store.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Deletes expired events every tenth of the retention period (at least every minute).
async fn prune_loop<S: CrmStore + ?Sized>(
    store: Arc<S>,
    retention: Duration,
    clock: SharedClock,
    shutdown: CancellationToken,
) {
    let period = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let cutoff = clock.now().checked_sub(retention);
        if let Some(cutoff) = cutoff
            && let Err(e) = store.prune_events(cutoff).await
        {
            warn!(error = %e, "event retention failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_poll_interval_is_from_10ms_to_1s() {
        assert_eq!(
            parse_feed_poll_interval("10ms"),
            Ok(Duration::from_millis(10))
        );
        assert_eq!(parse_feed_poll_interval("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_feed_poll_interval("9ms").is_err());
        assert!(parse_feed_poll_interval("1001ms").is_err());
        assert!(parse_feed_poll_interval("soon").is_err());
    }
}
