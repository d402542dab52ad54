//! Following CRM's change feed and turning every CREATED event into a delivery, and every
//! DELETED event into a cancel of that customer's package.
//!
//! One reader task walks the feed in log order, by streaming (`WatchCustomers`) or by polling
//! (`ListCustomerEvents`) from the same cursor, and hands each CREATED or DELETED event to a
//! delivery task (a cancel is a delivery too: same slots, retries, dead letters and checkpoint
//! rule). At most `max_in_flight` deliveries run at once; when all slots are busy the reader
//! waits, so a slow Inventory slows the reader instead of filling memory. A checkpoint task
//! saves the tracker's low watermark, so after any crash the service resumes at or before the
//! oldest unfinished event. Redelivering the events after it is safe: their request ids make
//! Inventory create nothing twice.
//!
//! The reader follows the partitions this worker holds (see [`crate::lease`]): one stream (or
//! poll) with their `PartitionFilter`, from the lowest of their checkpoints, and it also skips
//! events of other partitions itself, so it is right whether or not CRM applies the filter. The
//! watermark is saved to every partition the stream covers, with each lease's epoch. When the
//! set changes (a partition taken, lost, fenced or given up) the stream stops, deliveries in
//! flight are cancelled (the watermark never passes them, so they are delivered again), the
//! watermark is saved, partitions above the fair share are given up, and a new stream starts.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mip_proto::crm::v1 as crm;
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_runtime::CancellationToken;
use mip_runtime::clock::SharedClock;
use mip_runtime::security::AuthenticatedChannel;
use mip_runtime::status::reason;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::{Code, Request, Status, Streaming};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::deliver::{Action, Deliverer, Outcome, PACKAGE_TYPE, request_id};
use crate::lease::{Leases, Owned};
use crate::store::{DeadLetter, IntegrationStore, Move};
use crate::tracker::{Mark, Tracker};
use crate::{Mode, StartPosition, Stats};

/// `ErrorInfo.reason`s from CRM that mean "relist, then watch from the snapshot".
const RELIST_REASONS: &[&str] = &["RESUME_TOKEN_EXPIRED", "RESUME_TOKEN_UNKNOWN_LOG"];

/// Events per `ListCustomerEvents` call.
const POLL_BATCH: i32 = 1000;

/// How often the checkpoint is written while it moves: often enough that a crash redelivers
/// little, rarely enough that checkpoint writes stay a small share of the database's work.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Feed-following settings.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// auto, stream or poll.
    pub mode: Mode,
    /// Where to start without a checkpoint.
    pub start_position: StartPosition,
    /// Pause between polls once caught up.
    pub poll_interval: Duration,
    /// While polling in auto mode, how often to try streaming again.
    pub stream_probe_interval: Duration,
    /// Consecutive stream failures before auto mode falls back to polling.
    pub stream_failures_before_poll: u32,
    /// A stream silent for this long (no event, no heartbeat) is considered dead.
    pub stream_idle_timeout: Duration,
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Deadline of each CRM call (the watch call itself is exempt).
    pub call_timeout: Duration,
    /// Backoff between reconnects is this, doubled per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Reconnect backoff cap.
    pub max_backoff: Duration,
}

/// How a stream ended.
enum StreamEnd {
    /// The service is shutting down.
    Shutdown,
    /// The stream failed; `progressed` says whether it delivered anything first.
    Failed { status: Status, progressed: bool },
}

/// The partitions one stream follows.
#[derive(Debug, Default)]
struct Scope {
    /// Partitions and the lease epochs they were followed at: where the watermark is saved.
    covered: Vec<(u32, i64)>,
    /// Indexed by partition: whether this stream delivers its events.
    owns: Vec<bool>,
    /// What CRM is asked for; `None` when every partition is covered.
    filter: Option<crm::PartitionFilter>,
}

impl Scope {
    fn new(owned: &[Owned], count: u32) -> Self {
        let mut owns = vec![false; count as usize];
        for o in owned {
            if let Some(slot) = owns.get_mut(o.partition as usize) {
                *slot = true;
            }
        }
        let filter = (owned.len() < count as usize).then(|| crm::PartitionFilter {
            partition_count: i32::try_from(count).unwrap_or(i32::MAX),
            partitions: owned
                .iter()
                .map(|o| i32::try_from(o.partition).unwrap_or(i32::MAX))
                .collect(),
        });
        Self {
            covered: owned.iter().map(|o| (o.partition, o.epoch)).collect(),
            owns,
            filter,
        }
    }

    /// Whether `customer_id`'s events are this stream's to deliver. An id that is not a UUID
    /// (CRM never issues one) counts as the nil UUID's partition.
    fn owns(&self, customer_id: &str) -> bool {
        let id = Uuid::parse_str(customer_id).unwrap_or_default();
        let count = u32::try_from(self.owns.len()).unwrap_or(u32::MAX);
        self.owns
            .get(mip_runtime::partition::of(&id, count) as usize)
            .copied()
            .unwrap_or(false)
    }
}

/// The feed reader and its delivery pipeline.
pub struct Engine<S: ?Sized> {
    /// Dead letters.
    store: Arc<S>,
    /// The partitions this worker holds, and where their checkpoints are written.
    leases: Arc<Leases>,
    /// The partitions the current stream follows.
    scope: Arc<Scope>,
    /// CRM client.
    crm: CrmServiceClient<AuthenticatedChannel>,
    /// Delivers package requests.
    deliverer: Deliverer,
    /// Settings.
    settings: FeedSettings,
    /// Shared counters and state for the admin API.
    stats: Arc<Stats>,
    /// Time source for checkpoint and dead-letter timestamps.
    clock: SharedClock,
    /// Ends the reader and cancels deliveries: at shutdown, or (in one generation's engine)
    /// when the partitions to follow change.
    shutdown: CancellationToken,
    /// Events in flight and the low watermark.
    tracker: Arc<Mutex<Tracker>>,
    /// Wakes the checkpoint task when the watermark may have moved.
    moved: Arc<Notify>,
    /// Delivery slots.
    slots: Arc<Semaphore>,
}

impl<S: IntegrationStore + ?Sized> Engine<S> {
    /// An engine; nothing runs until [`Engine::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<S>,
        leases: Arc<Leases>,
        crm: CrmServiceClient<AuthenticatedChannel>,
        deliverer: Deliverer,
        settings: FeedSettings,
        stats: Arc<Stats>,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            store,
            leases,
            scope: Arc::new(Scope::default()),
            crm,
            deliverer,
            settings,
            stats,
            clock,
            shutdown,
            tracker: Arc::new(Mutex::new(Tracker::new())),
            moved: Arc::new(Notify::new()),
        }
    }

    /// Follows the partitions this worker holds until shutdown, restarting the stream
    /// whenever they change; every stream's final watermark is saved before the next starts.
    pub async fn run(self) {
        let mut changes = self.leases.subscribe();
        while !self.shutdown.is_cancelled() {
            changes.borrow_and_update();
            // No stream covers a partition marked releasing now (the last one has made its
            // final save), whenever it was marked: give them up before following the rest.
            self.release_pending().await;
            let owned = self.leases.active();
            if owned.is_empty() {
                tokio::select! {
                    _ = changes.changed() => {}
                    () = self.shutdown.cancelled() => break,
                }
                continue;
            }
            let reading = self.shutdown.child_token();
            let watcher = {
                let (mut changes, reading) = (changes.clone(), reading.clone());
                tokio::spawn(async move {
                    let _ = changes.changed().await;
                    reading.cancel();
                })
            };
            self.generation(&owned, reading)
                .follow_partitions(owned)
                .await;
            watcher.abort();
        }
        info!("feed reader stopped; checkpoints saved");
    }

    /// This engine for one stream over `owned`, stopped by `reading`.
    fn generation(&self, owned: &[Owned], reading: CancellationToken) -> Self {
        Self {
            store: Arc::clone(&self.store),
            leases: Arc::clone(&self.leases),
            scope: Arc::new(Scope::new(owned, self.leases.partition_count())),
            crm: self.crm.clone(),
            deliverer: self.deliverer.clone(),
            settings: self.settings.clone(),
            stats: Arc::clone(&self.stats),
            clock: Arc::clone(&self.clock),
            shutdown: reading,
            tracker: Arc::new(Mutex::new(Tracker::new())),
            moved: Arc::new(Notify::new()),
            slots: Arc::clone(&self.slots),
        }
    }

    async fn release_pending(&self) {
        if let Err(e) = self.leases.release_pending().await {
            warn!(error = %e, "cannot give up partitions yet; will retry");
        }
    }

    /// One stream over `owned` from the lowest of their checkpoints, until this generation
    /// stops; then waits for in-flight deliveries to stop and saves the final watermark.
    async fn follow_partitions(self, owned: Vec<Owned>) {
        let missing: Vec<(u32, i64)> = owned
            .iter()
            .filter(|o| o.checkpoint.is_none())
            .map(|o| (o.partition, o.epoch))
            .collect();
        let lowest = |head: Option<Mark>| {
            owned
                .iter()
                .map(|o| o.checkpoint.clone().or_else(|| head.clone()))
                .min_by_key(|m| m.as_ref().map(|m| m.sequence))
                .flatten()
        };
        let checkpoint = if missing.is_empty() {
            lowest(None)
        } else if self.settings.start_position == StartPosition::Latest {
            // "Latest" must mean the head at the first start, not at every reconnect before
            // the first checkpoint: pin it down durably before reading anything.
            let Some(head) = self.anchor_at_head(&missing).await else {
                return;
            };
            lowest(Some(head))
        } else {
            None
        };
        match &checkpoint {
            Some(mark) => {
                info!(
                    sequence = mark.sequence,
                    partitions = owned.len(),
                    "resuming from checkpoint"
                )
            }
            None => info!(
                partitions = owned.len(),
                "no checkpoint yet; starting from the oldest event CRM keeps"
            ),
        }
        let checkpointer = tokio::spawn(checkpoint_loop(
            Arc::clone(&self.leases),
            Arc::clone(&self.scope),
            Arc::clone(&self.tracker),
            Arc::clone(&self.moved),
            self.shutdown.clone(),
        ));
        let mut checkpoint = checkpoint;
        if from_several_logs(&owned) {
            // CRM's database was replaced, and some of these partitions come from a worker
            // that never relisted onto the new log. Positions of two logs cannot be compared:
            // following from the lowest could start the old log's partitions past customers
            // of the new one. A relist covers every partition followed, whichever log it was on.
            warn!(
                partitions = owned.len(),
                "the partitions' checkpoints come from different CRM change logs (was CRM's database replaced?); relisting every customer"
            );
            while !self.shutdown.is_cancelled() && !self.relist(&mut checkpoint, false).await {}
        }
        self.follow(checkpoint).await;
        // Deliveries see the same token and return promptly; wait until every slot is back,
        // then save the final watermark.
        let slots = u32::try_from(self.settings.max_in_flight.max(1)).unwrap_or(u32::MAX);
        let _all = self.slots.acquire_many(slots).await;
        let _ = checkpointer.await;
        save_watermark(&self.leases, &self.scope, &self.tracker).await;
    }

    /// Reads CRM's head position, records it as the cluster's start mark unless another worker
    /// did first, and saves the recorded mark as the first checkpoint of `missing`; retries
    /// until it works or shutdown begins (`None`).
    async fn anchor_at_head(&self, missing: &[(u32, i64)]) -> Option<Mark> {
        let mut failures = 0;
        loop {
            let mut client = self.crm.clone();
            let mut request = Request::new(crm::ListCustomerEventsRequest {
                resume_token: String::new(),
                start_position: crm::StartPosition::Latest.into(),
                page_size: 1,
                partition_filter: None,
            });
            request.set_timeout(self.settings.call_timeout);
            let head = match client.list_customer_events(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    Mark {
                        sequence: response.next_sequence,
                        token: response.next_resume_token,
                    }
                }
                Err(status) => {
                    failures += 1;
                    let delay = backoff(
                        self.settings.initial_backoff,
                        self.settings.max_backoff,
                        failures,
                    );
                    warn!(code = ?status.code(), message = %status.message(), retry_in = ?delay, "cannot read CRM's head for --start-position latest");
                    self.pause(delay).await;
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    continue;
                }
            };
            // The cluster's start mark, recorded by whichever worker got here first: every
            // partition starts there, however much later it is first leased.
            let saved = match self.store.start_mark(&head).await {
                Ok(start) => self
                    .leases
                    .save(missing, &start, Move::Forward)
                    .await
                    .map(|()| start),
                Err(e) => Err(e),
            };
            match saved {
                Ok(start) => {
                    info!(
                        sequence = start.sequence,
                        "no checkpoint yet; starting at the cluster's start mark (CRM's newest event when the first worker started)"
                    );
                    return Some(start);
                }
                Err(e) => {
                    error!(error = %e, "cannot save the first checkpoint");
                    self.pause(self.settings.max_backoff).await;
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                }
            }
        }
    }

    async fn follow(&self, mut cursor: Option<Mark>) {
        let mut mode = match self.settings.mode {
            Mode::Poll => crate::FeedState::Poll,
            Mode::Auto | Mode::Stream => crate::FeedState::Stream,
        };
        self.stats.set_mode(mode);
        let mut failures = 0u32;
        let mut last_probe = Instant::now();
        // A stream opened by a successful probe while polling, consumed on the next turn.
        let mut probed = None;
        while !self.shutdown.is_cancelled() {
            match mode {
                crate::FeedState::Stream => {
                    let opened = match probed.take() {
                        Some(stream) => Ok(stream),
                        None => self.open_stream(&cursor).await,
                    };
                    let status = match opened {
                        Ok(stream) => match self.consume(stream, &mut cursor).await {
                            StreamEnd::Shutdown => return,
                            StreamEnd::Failed { status, progressed } => {
                                if progressed {
                                    failures = 0;
                                }
                                status
                            }
                        },
                        Err(status) => status,
                    };
                    if let Some(next) = self
                        .on_feed_error(&status, &mut cursor, &mut failures)
                        .await
                    {
                        mode = self.switch(mode, next, &status);
                    }
                }
                crate::FeedState::Poll => {
                    if self.settings.mode == Mode::Auto
                        && last_probe.elapsed() >= self.settings.stream_probe_interval
                    {
                        last_probe = Instant::now();
                        if let Ok(stream) = self.open_stream(&cursor).await {
                            mode = self.switch(mode, crate::FeedState::Stream, &Status::ok(""));
                            failures = 0;
                            probed = Some(stream);
                            continue;
                        }
                    }
                    match self.poll_once(&mut cursor).await {
                        Ok(caught_up) => {
                            failures = 0;
                            if caught_up {
                                self.pause(self.settings.poll_interval).await;
                            }
                        }
                        Err(status) => {
                            self.on_feed_error(&status, &mut cursor, &mut failures)
                                .await;
                        }
                    }
                }
            }
        }
    }

    /// Handles a failed feed call: relists on an expired token, otherwise backs off. Returns the
    /// mode to switch to, if the failure calls for a switch.
    async fn on_feed_error(
        &self,
        status: &Status,
        cursor: &mut Option<Mark>,
        failures: &mut u32,
    ) -> Option<crate::FeedState> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        if status.code() == Code::FailedPrecondition
            && reason(status).is_some_and(|r| RELIST_REASONS.contains(&r.as_str()))
        {
            warn!(reason = %status.message(), "resume token no longer valid; relisting every customer");
            // Reconciled only on the same log: a log CRM never had may be an empty or wrong
            // database (a fresh volume, a mistaken --crm-addr), and taking its missing
            // customers for deleted would cancel every pending package.
            let same_log = reason(status).as_deref() == Some("RESUME_TOKEN_EXPIRED");
            self.relist(cursor, same_log).await;
            return None;
        }
        let streaming = self.stats.mode() == Some(crate::FeedState::Stream);
        if streaming && self.settings.mode == Mode::Auto {
            if status.code() == Code::Unimplemented {
                return Some(crate::FeedState::Poll);
            }
            *failures += 1;
            if *failures >= self.settings.stream_failures_before_poll {
                *failures = 0;
                return Some(crate::FeedState::Poll);
            }
        } else {
            *failures += 1;
        }
        let delay = backoff(
            self.settings.initial_backoff,
            self.settings.max_backoff,
            *failures,
        );
        warn!(code = ?status.code(), message = %status.message(), retry_in = ?delay, "CRM feed call failed");
        self.pause(delay).await;
        None
    }

    fn switch(
        &self,
        from: crate::FeedState,
        to: crate::FeedState,
        why: &Status,
    ) -> crate::FeedState {
        if from != to {
            self.stats.count_mode_switch(to);
            self.stats.set_mode(to);
            match to {
                crate::FeedState::Poll => {
                    warn!(code = ?why.code(), reason = %why.message(), "switched to polling")
                }
                crate::FeedState::Stream => info!("resumed streaming"),
            }
        }
        to
    }

    /// Sleeps, unless shutdown comes first.
    async fn pause(&self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    async fn open_stream(
        &self,
        cursor: &Option<Mark>,
    ) -> Result<Streaming<crm::WatchCustomersResponse>, Status> {
        let request = crm::WatchCustomersRequest {
            resume_token: cursor.as_ref().map(|m| m.token.clone()).unwrap_or_default(),
            start_position: self.start_position(),
            partition_filter: self.scope.filter.clone(),
        };
        let mut client = self.crm.clone();
        let call =
            tokio::time::timeout(self.settings.call_timeout, client.watch_customers(request));
        match call.await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(
                "opening the watch stream timed out",
            )),
        }
    }

    fn start_position(&self) -> i32 {
        match self.settings.start_position {
            StartPosition::Earliest => crm::StartPosition::Earliest.into(),
            StartPosition::Latest => crm::StartPosition::Latest.into(),
        }
    }

    async fn consume(
        &self,
        mut stream: Streaming<crm::WatchCustomersResponse>,
        cursor: &mut Option<Mark>,
    ) -> StreamEnd {
        self.stats.stream_connected.store(true, Ordering::Relaxed);
        info!("watching CRM customers");
        let mut progressed = false;
        let end = loop {
            let next = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break StreamEnd::Shutdown,
                next = tokio::time::timeout(self.settings.stream_idle_timeout, stream.message()) => next,
            };
            let message = match next {
                Ok(Ok(Some(message))) => message,
                Ok(Ok(None)) => {
                    break StreamEnd::Failed {
                        status: Status::unavailable("CRM ended the watch stream"),
                        progressed,
                    };
                }
                Ok(Err(status)) => break StreamEnd::Failed { status, progressed },
                Err(_) => {
                    break StreamEnd::Failed {
                        status: Status::deadline_exceeded(format!(
                            "no event or heartbeat for {:?}",
                            self.settings.stream_idle_timeout
                        )),
                        progressed,
                    };
                }
            };
            progressed = true;
            match message.kind {
                Some(crm::watch_customers_response::Kind::Event(event)) => {
                    self.dispatch(event, cursor).await;
                }
                Some(crm::watch_customers_response::Kind::Heartbeat(beat)) => {
                    let mark = Mark {
                        sequence: beat.sequence,
                        token: beat.resume_token,
                    };
                    self.stats.saw_head(mark.sequence);
                    self.idle_at(mark.clone());
                    *cursor = Some(mark);
                }
                None => {}
            }
        };
        self.stats.stream_connected.store(false, Ordering::Relaxed);
        end
    }

    /// One `ListCustomerEvents` call. `Ok(true)` when caught up.
    async fn poll_once(&self, cursor: &mut Option<Mark>) -> Result<bool, Status> {
        let mut request = Request::new(crm::ListCustomerEventsRequest {
            resume_token: cursor.as_ref().map(|m| m.token.clone()).unwrap_or_default(),
            start_position: self.start_position(),
            page_size: POLL_BATCH,
            partition_filter: self.scope.filter.clone(),
        });
        request.set_timeout(self.settings.call_timeout);
        let mut client = self.crm.clone();
        let response = tokio::time::timeout(
            self.settings.call_timeout,
            client.list_customer_events(request),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("ListCustomerEvents timed out"))??
        .into_inner();
        self.stats.saw_head(
            response
                .next_sequence
                .saturating_add(response.remaining_events),
        );
        let caught_up = response.events.is_empty();
        for event in response.events {
            if self.shutdown.is_cancelled() {
                return Ok(false);
            }
            self.dispatch(event, cursor).await;
        }
        let mark = Mark {
            sequence: response.next_sequence,
            token: response.next_resume_token,
        };
        if caught_up {
            self.idle_at(mark.clone());
        }
        *cursor = Some(mark);
        Ok(caught_up && response.remaining_events == 0)
    }

    fn idle_at(&self, mark: Mark) {
        self.tracker.lock().expect("tracker lock").idle_at(mark);
        self.moved.notify_one();
    }

    /// Hands one event to the pipeline, waiting for a delivery slot if all are busy.
    async fn dispatch(&self, event: crm::CustomerEvent, cursor: &mut Option<Mark>) {
        let mark = Mark {
            sequence: event.sequence,
            token: event.resume_token.clone(),
        };
        self.stats.saw_head(mark.sequence);
        *cursor = Some(mark.clone());
        let action = match event.r#type() {
            crm::CustomerEventType::Created => Some(Action::Create),
            crm::CustomerEventType::Deleted => Some(Action::Cancel),
            _ => None,
        };
        let created_at = event
            .customer
            .as_ref()
            .and_then(|c| c.create_time)
            .and_then(|t| SystemTime::try_from(t).ok());
        let customer_id = event.customer.map(|c| c.id).unwrap_or_default();
        // Nothing to do for an UPDATED event, nor for another worker's partition (CRM may not
        // apply the filter, so it is skipped here too).
        let action = match action {
            Some(action) if !customer_id.is_empty() && self.scope.owns(&customer_id) => action,
            _ => {
                let mut tracker = self.tracker.lock().expect("tracker lock");
                tracker.start(mark.clone());
                tracker.finish(mark.sequence);
                drop(tracker);
                self.moved.notify_one();
                return;
            }
        };
        match action {
            // At debug: with two info lines per delivery, logging was up to a quarter of the
            // service's CPU per customer (TECHNICAL_DESIGN.md §11).
            Action::Create => debug!(customer_id, sequence = mark.sequence, "found new customer"),
            Action::Cancel => info!(customer_id, sequence = mark.sequence, "customer deleted"),
        }
        // Tracked before waiting for a slot: if shutdown wins the wait, the event stays
        // pending, so the checkpoint can never pass it and it is delivered after restart.
        self.tracker
            .lock()
            .expect("tracker lock")
            .start(mark.clone());
        let slot = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return,
            slot = Arc::clone(&self.slots).acquire_owned() => slot.expect("slots never close"),
        };
        let handler = self.handler();
        let tracker = Arc::clone(&self.tracker);
        let moved = Arc::clone(&self.moved);
        tokio::spawn(async move {
            let _slot = slot;
            if handler
                .handle(&event.event_id, &customer_id, action, created_at)
                .await
                .is_done()
            {
                tracker.lock().expect("tracker lock").finish(mark.sequence);
                moved.notify_one();
            }
        });
    }

    fn handler(&self) -> Handler<S> {
        Handler {
            store: Arc::clone(&self.store),
            deliverer: self.deliverer.clone(),
            stats: Arc::clone(&self.stats),
            clock: Arc::clone(&self.clock),
            shutdown: self.shutdown.clone(),
            redrive: false,
        }
    }

    /// The resume token is no longer usable: deliver for every existing customer (the request
    /// ids make repeats harmless), with `reconcile` cancel the pending packages of customers
    /// deleted in the events lost with the token ([`Engine::reconcile`]), then continue from
    /// the listing's snapshot position. Returns whether it got that far (otherwise it paused
    /// after a failure, or shutdown began, and the cursor is unchanged).
    async fn relist(&self, cursor: &mut Option<Mark>, reconcile: bool) -> bool {
        // Let in-flight deliveries finish so the checkpoint can jump to the snapshot safely.
        while !self.tracker.lock().expect("tracker lock").is_idle() {
            if self.shutdown.is_cancelled() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut page_token = String::new();
        let mut snapshot = None;
        let mut deliveries = JoinSet::new();
        // The customers of this worker's partitions that exist, as of the snapshot (under 100
        // bytes each: a million customers fit in tens of megabytes, and relists are rare).
        let mut existing = HashSet::new();
        loop {
            let mut client = self.crm.clone();
            let mut request = Request::new(crm::ListCustomersRequest {
                page_size: 1000,
                page_token: page_token.clone(),
            });
            request.set_timeout(self.settings.call_timeout);
            let page = match client.list_customers(request).await {
                Ok(page) => page.into_inner(),
                Err(status) => {
                    warn!(code = ?status.code(), message = %status.message(), "relist failed; will retry");
                    deliveries.join_all().await;
                    self.pause(self.settings.max_backoff).await;
                    return false;
                }
            };
            if snapshot.is_none() {
                snapshot = Some(Mark {
                    sequence: page.resume_sequence,
                    token: page.resume_token.clone(),
                });
            }
            for customer in page.customers {
                if !self.scope.owns(&customer.id) {
                    continue;
                }
                let slot = tokio::select! {
                    slot = Arc::clone(&self.slots).acquire_owned() => slot.expect("slots never close"),
                    () = self.shutdown.cancelled() => return false,
                };
                existing.insert(customer.id.clone());
                let handler = self.handler();
                deliveries.spawn(async move {
                    let _slot = slot;
                    handler
                        .handle(
                            &format!("relist:{}", customer.id),
                            &customer.id,
                            Action::Create,
                            None,
                        )
                        .await
                        .is_done()
                });
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let done = deliveries.join_all().await;
        // Deliveries only stay unfinished at shutdown.
        if self.shutdown.is_cancelled() || done.iter().any(|ok| !ok) {
            return false;
        }
        // CRM's first page always carries the snapshot.
        let Some(snapshot) = snapshot else {
            self.pause(self.settings.max_backoff).await;
            return false;
        };
        // Before the checkpoint moves to the snapshot: a crash after it would resume with a
        // valid token, and the deletes lost with the old one would be forgotten for good.
        let cancelled = if reconcile {
            match self.reconcile(&existing).await {
                Ok(Some(cancelled)) => cancelled,
                // Shutdown, or a cancel left unfinished by it.
                Ok(None) => return false,
                Err(status) => {
                    warn!(code = ?status.code(), message = %status.message(), "cannot cancel the packages of deleted customers yet; will relist again");
                    self.pause(self.settings.max_backoff).await;
                    return false;
                }
            }
        } else {
            warn!(
                "CRM's change log is not the one the checkpoint came from (was its database replaced, or is --crm-addr another CRM?): pending packages of customers missing from it are left as they are"
            );
            0
        };
        info!(
            customers = existing.len(),
            deleted = cancelled,
            sequence = snapshot.sequence,
            "relist finished; watching from the snapshot"
        );
        // Through the tracker, not straight to the store: the checkpoint task saves marks one
        // at a time, so an older mark it is still saving can never land after this one. It
        // replaces any unsaved mark, even a higher one from a replaced CRM database.
        self.tracker
            .lock()
            .expect("tracker lock")
            .reset_to(snapshot.clone());
        self.moved.notify_one();
        self.stats.reset_head(snapshot.sequence);
        *cursor = Some(snapshot);
        true
    }

    /// After a relist: a customer deleted while its events were lost (retention, or another
    /// CRM database) is not in the listing, and no DELETED event will come for it. So every
    /// welcome package this service made (its request id is the customer's derived key) that
    /// is still PENDING, for a customer of this worker's partitions missing from `existing`,
    /// is a candidate; CRM's `GetCustomer` answering NOT_FOUND confirms it, and it is cancelled
    /// like a DELETED event would have it (same retries, dead letter `relist-cancel:<id>`).
    /// The confirmation matters: a customer created after the snapshot is missing from the
    /// listing too, and may already have its package.
    ///
    /// Inventory's listing has no status or type filter, so this reads every package request
    /// once per relist. Returns how many were confirmed deleted and handled, `None` at
    /// shutdown (or when a cancel was left unfinished by it), and the error of a listing or
    /// look-up that failed transiently, after which the relist is tried again.
    async fn reconcile(&self, existing: &HashSet<String>) -> Result<Option<usize>, Status> {
        let mut page_token = String::new();
        let mut cancels = JoinSet::new();
        loop {
            let page = match self
                .deliverer
                .list_page(mip_proto::inventory::v1::ListPackageRequestsRequest {
                    customer_id: String::new(),
                    page_size: 1000,
                    page_token,
                })
                .await
            {
                Ok(page) => page,
                Err(status) => {
                    cancels.join_all().await;
                    return Err(status);
                }
            };
            for package in page.package_requests {
                let orphan = package.package_type == PACKAGE_TYPE
                    && package.status() == mip_proto::inventory::v1::PackageStatus::Pending
                    && package.request_id == request_id(&package.customer_id).to_string()
                    && self.scope.owns(&package.customer_id)
                    && !existing.contains(&package.customer_id);
                if !orphan {
                    continue;
                }
                match self.customer_exists(&package.customer_id).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(status) if crate::deliver::is_transient(&status) => {
                        cancels.join_all().await;
                        return Err(status);
                    }
                    // Nothing a retry would change: this package stays as it is.
                    Err(status) => {
                        warn!(customer_id = %package.customer_id, code = ?status.code(), message = %status.message(), "cannot tell whether the customer still exists; its package is left as is");
                        continue;
                    }
                }
                info!(customer_id = %package.customer_id, package_request_id = %package.id, "customer deleted while its events were lost; cancelling its package");
                let slot = tokio::select! {
                    slot = Arc::clone(&self.slots).acquire_owned() => slot.expect("slots never close"),
                    () = self.shutdown.cancelled() => return Ok(None),
                };
                let handler = self.handler();
                let customer_id = package.customer_id;
                cancels.spawn(async move {
                    let _slot = slot;
                    handler
                        .handle(
                            &format!("relist-cancel:{customer_id}"),
                            &customer_id,
                            Action::Cancel,
                            None,
                        )
                        .await
                        .is_done()
                });
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let done = cancels.join_all().await;
        if self.shutdown.is_cancelled() || done.iter().any(|ok| !ok) {
            return Ok(None);
        }
        Ok(Some(done.len()))
    }

    /// Whether CRM has the customer: `GetCustomer`, NOT_FOUND meaning no.
    async fn customer_exists(&self, customer_id: &str) -> Result<bool, Status> {
        let mut request = Request::new(crm::GetCustomerRequest {
            id: customer_id.to_owned(),
        });
        request.set_timeout(self.settings.call_timeout);
        let mut client = self.crm.clone();
        let call = client.get_customer(request);
        match tokio::time::timeout(self.settings.call_timeout, call).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(status)) if status.code() == Code::NotFound => Ok(false),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded("GetCustomer timed out")),
        }
    }
}

/// Delivers (or cancels) one customer's package and records the outcome. Shared by the feed,
/// relisting and dead-letter re-drives.
pub struct Handler<S: ?Sized> {
    /// Where dead letters go.
    pub store: Arc<S>,
    /// Calls Inventory.
    pub deliverer: Deliverer,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Timestamps.
    pub clock: SharedClock,
    /// Cancels the delivery.
    pub shutdown: CancellationToken,
    /// Whether this handler re-drives existing dead letters, whose failure was counted when
    /// they first failed.
    pub redrive: bool,
}

// By hand: a derive would ask for `S: Clone`, which a `dyn IntegrationStore` is not; only the
// `Arc` is cloned.
impl<S: ?Sized> Clone for Handler<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            deliverer: self.deliverer.clone(),
            stats: Arc::clone(&self.stats),
            clock: Arc::clone(&self.clock),
            shutdown: self.shutdown.clone(),
            redrive: self.redrive,
        }
    }
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// It succeeded: for a create, the package request exists; for a cancel, it is CANCELLED,
    /// or was found past PENDING and left as it is.
    Delivered,
    /// It failed for good and is on the dead-letter list.
    DeadLettered,
    /// Neither: shutdown interrupted it. It must be tried again after restart, so the
    /// checkpoint must not pass it.
    Unfinished,
}

impl Handled {
    /// Whether the checkpoint may move past the event.
    pub fn is_done(self) -> bool {
        self != Handled::Unfinished
    }
}

impl<S: IntegrationStore + ?Sized> Handler<S> {
    /// Creates (or, for a deleted customer, cancels) the customer's package and records the
    /// outcome. `customer_create_time` feeds the end-to-end delay metric when known.
    pub async fn handle(
        &self,
        event_id: &str,
        customer_id: &str,
        action: Action,
        customer_create_time: Option<SystemTime>,
    ) -> Handled {
        let outcome = match action {
            Action::Create => self.deliverer.deliver(customer_id, &self.shutdown).await,
            Action::Cancel => self.deliverer.cancel(customer_id, &self.shutdown).await,
        };
        match outcome {
            Outcome::Delivered {
                package_create_time,
            } => {
                let delay = customer_create_time
                    .zip(package_create_time)
                    .and_then(|(customer, package)| package.duration_since(customer).ok());
                self.stats.count_delivered(delay);
                Handled::Delivered
            }
            Outcome::Withdrawn { now } => {
                if now {
                    self.stats.count_cancelled();
                }
                Handled::Delivered
            }
            Outcome::LeftAsIs { .. } => {
                self.stats.count_left_as_is();
                Handled::Delivered
            }
            Outcome::Interrupted => Handled::Unfinished,
            Outcome::Failed { reason, attempts } => {
                let now = self.clock.now();
                let letter = DeadLetter {
                    event_id: event_id.to_owned(),
                    customer_id: customer_id.to_owned(),
                    action,
                    reason: reason.clone(),
                    attempts,
                    create_time: now,
                    update_time: now,
                };
                // The checkpoint may only pass this event once the dead letter is durable, and
                // everything behind it waits until then: keep trying (a full or busy disk is
                // usually temporary) rather than stall the pipeline for good.
                let mut failures = 0;
                loop {
                    match self.store.put_dead_letter(letter.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            failures += 1;
                            let delay = backoff(
                                Duration::from_millis(100),
                                Duration::from_secs(5),
                                failures,
                            );
                            error!(customer_id, event_id, error = %e, retry_in = ?delay, "cannot record dead letter; retrying");
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                () = self.shutdown.cancelled() => return Handled::Unfinished,
                            }
                        }
                    }
                }
                if !self.redrive {
                    self.stats.count_dead_lettered();
                }
                match action {
                    Action::Create => {
                        error!(customer_id, event_id, attempts, %reason, "dead-lettered package request")
                    }
                    Action::Cancel => {
                        error!(customer_id, event_id, attempts, %reason, "dead-lettered package cancel")
                    }
                }
                Handled::DeadLettered
            }
        }
    }
}

/// Reconnect backoff after `failures` consecutive failures.
fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    initial
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)))
        .min(max)
}

/// Whether the checkpoints of `owned` were issued by more than one CRM change log.
fn from_several_logs(owned: &[Owned]) -> bool {
    let mut logs = owned
        .iter()
        .filter_map(|o| o.checkpoint.as_ref())
        .filter_map(|m| mip_runtime::token::crm_resume_log(&m.token));
    let first = logs.next();
    logs.any(|log| Some(log) != first)
}

/// Saves the watermark whenever it moves, at most every [`CHECKPOINT_EVERY`], until shutdown.
async fn checkpoint_loop(
    leases: Arc<Leases>,
    scope: Arc<Scope>,
    tracker: Arc<Mutex<Tracker>>,
    moved: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = moved.notified() => {}
            () = shutdown.cancelled() => return,
        }
        save_watermark(&leases, &scope, &tracker).await;
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Saves the watermark to every partition the stream covers, if it moved since the last save.
async fn save_watermark(leases: &Leases, scope: &Scope, tracker: &Mutex<Tracker>) {
    let (mark, how) = {
        let mut tracker = tracker.lock().expect("tracker lock");
        let how = tracker.how();
        (tracker.take(), how)
    };
    let Some(mark) = mark else { return };
    if let Err(e) = leases.save(&scope.covered, &mark, how).await {
        // Put the mark back so the next round saves it (or a later one).
        tracker.lock().expect("tracker lock").restore(mark, how);
        warn!(error = %e, "cannot save checkpoint; will retry");
    }
}
