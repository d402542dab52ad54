//! The gRPC edge of CRM: requests become validated domain values (through [`crate::validate`])
//! and results become protobuf here, and nothing past this module sees either protobuf or SQL.
//! Generic over the store, trait objects included (`CrmApi<dyn CrmStore>`), so one service
//! serves every backend.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mip_proto::crm::v1 as pb;
use mip_proto::timestamp;
use mip_runtime::CancellationToken;
use mip_runtime::batch;
use mip_runtime::clock::{SharedClock, from_micros, to_micros};
use mip_runtime::status::{Violations, field_violations, reason, token_reason};
use mip_runtime::token::{self, TokenError};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::CrmOptions;
use crate::domain::{Customer, CustomerEvent, EventType, LogBounds, Partitions, Position, Start};
use crate::error::{DOMAIN, Error};
use crate::store::CrmStore;
use crate::validate;

/// Token kind of resume tokens: `[log_id, position]`.
const RESUME_TOKEN: u8 = token::CRM_RESUME;
/// Token kind of `ListCustomers` page tokens: `[log_id, snapshot, after_created_seq]`.
const CUSTOMER_PAGE_TOKEN: u8 = 2;

/// Most requests in one `BatchCreateCustomers` call.
pub const MAX_BATCH: usize = 1000;

/// A failed create, as one result of a batch.
fn batch_item_error(status: &Status) -> pb::BatchItemError {
    pb::BatchItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        field_violations: field_violations(status)
            .into_iter()
            .map(|(field, description)| pb::FieldViolation { field, description })
            .collect(),
        reason: reason(status).unwrap_or_default(),
    }
}

/// Events read per step by a watcher that is catching up.
const WATCH_BATCH: usize = 256;
/// How long a watcher waits at shutdown to hand its client the final UNAVAILABLE.
const END_NOTICE_WAIT: Duration = Duration::from_secs(1);
/// Most messages a watcher hands its stream at once. One hand-over per batch rather than per
/// event: with a thousand streams, the channel operations per event were a large part of CRM's
/// CPU under fan-out (see TECHNICAL_DESIGN.md, Performance).
const SEND_BATCH: usize = 32;
/// Batches queued per watch stream before the watcher waits for the client to read (so at
/// most `SEND_BATCH` × this many messages).
const WATCH_BUFFER: usize = 4;

/// The `crm.v1.CrmService` implementation.
pub struct CrmApi<S: ?Sized> {
    /// Customers and the change log.
    store: Arc<S>,
    /// Flags.
    options: CrmOptions,
    /// Where timestamps come from.
    clock: SharedClock,
    /// One permit per open watch stream.
    watchers: Arc<Semaphore>,
    /// Cancelled when the server shuts down; ends every watch stream.
    shutdown: CancellationToken,
}

impl<S: CrmStore + ?Sized> CrmApi<S> {
    /// A service over `store`.
    pub fn new(
        store: Arc<S>,
        options: CrmOptions,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> Self {
        // Exported from start-up, at zero: the exporter prints a series only once it has been
        // recorded, and a dashboard should show "no watchers", not "no data".
        metrics::gauge!("mip_crm_watchers").increment(0.0);
        Self {
            watchers: Arc::new(Semaphore::new(options.max_watchers)),
            store,
            options,
            clock,
            shutdown,
        }
    }

    /// The current time at the store's precision (microseconds), so that what a create
    /// returns equals what every later read returns.
    fn now(&self) -> std::time::SystemTime {
        from_micros(to_micros(self.clock.now()))
    }

    /// Turns a request's token or start position into a checked position in this log.
    async fn resolve_start(&self, start: Start) -> Result<Position, Error> {
        let bounds = self.store.bounds()?;
        match start {
            Start::Earliest => Ok(Position(bounds.pruned_through)),
            Start::Latest => Ok(Position(bounds.head)),
            Start::After(position) => {
                // Another replica may have handed the token out before this one read its
                // commits back: wait for them rather than refuse a token that is valid.
                if position.0 > bounds.head {
                    self.store.catch_up_to(position).await?;
                }
                check_position(position, &self.store.bounds()?)?;
                Ok(position)
            }
        }
    }

    async fn parse_start(
        &self,
        resume_token: &str,
        start_position: i32,
    ) -> Result<Position, Error> {
        let start = if resume_token.is_empty() {
            match pb::StartPosition::try_from(start_position) {
                Ok(pb::StartPosition::Earliest) => Start::Earliest,
                Ok(pb::StartPosition::Latest | pb::StartPosition::Unspecified) => Start::Latest,
                Err(_) => {
                    return Err(Error::InvalidField {
                        field: "start_position",
                        reason: format!("unknown value {start_position}"),
                    });
                }
            }
        } else {
            let [log_id, position] = token::decode::<2>(RESUME_TOKEN, resume_token)
                .map_err(|e| token_error("resume_token", e))?;
            if log_id != self.store.bounds()?.log_id {
                return Err(Error::TokenUnknownLog);
            }
            Start::After(Position(position))
        };
        self.resolve_start(start).await
    }

    fn resume_token(&self, position: Position) -> Result<String, Error> {
        Ok(resume_token(self.store.bounds()?.log_id, position))
    }

    /// Validates and creates one customer: `CreateCustomer`.
    async fn create(&self, request: pb::CreateCustomerRequest) -> Result<pb::Customer, Status> {
        let new = validate::create(&request)?;
        let customer = self.store.create_customer(new, self.now()).await?;
        debug!(customer_id = %customer.id, "customer created");
        Ok(customer_to_proto(&customer))
    }

    /// Opens a watch stream whose messages are `O`: protobuf messages for the generated
    /// service, or bytes encoded once per event for the network (see [`crate::wire`]).
    pub(crate) async fn open_watch<O: WatchOutput>(
        &self,
        request: pb::WatchCustomersRequest,
    ) -> Result<Unbatch<O>, Status> {
        if self.options.disable_watch {
            return Err(Error::WatchDisabled.into());
        }
        let mut violations = Violations::new(DOMAIN);
        let filter = validate::partition_filter(&mut violations, request.partition_filter.as_ref());
        violations.finish()?;
        let health = self.store.health();
        if !*health.borrow() {
            return Err(Error::DatabaseLost.into());
        }
        let start = self
            .parse_start(&request.resume_token, request.start_position)
            .await?;
        let permit = Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| Error::TooManyWatchers(self.options.max_watchers))?;
        let bounds = self.store.subscribe()?;
        let log_id = self.store.bounds()?.log_id;
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            heartbeat: self.options.heartbeat_interval,
            sender,
            shutdown: self.shutdown.clone(),
            watchers: Arc::clone(&self.watchers),
            max_watchers: self.options.max_watchers,
            filter,
        };
        tokio::spawn(async move {
            let _permit = permit;
            let watchers = metrics::gauge!("mip_crm_watchers");
            watchers.increment(1.0);
            watcher.run(start, log_id, bounds, health).await;
            watchers.decrement(1.0);
        });
        Ok(Unbatch {
            batches: receiver,
            pending: Vec::new().into_iter(),
        })
    }
}

/// A watch stream's messages one by one, from the batches its watcher sends.
pub(crate) struct Unbatch<O> {
    /// Batches from the watcher; an error ends the stream.
    batches: mpsc::Receiver<Result<Vec<O>, Status>>,
    /// What is left of the current batch.
    pending: std::vec::IntoIter<O>,
}

impl<O: Unpin> Stream for Unbatch<O> {
    type Item = Result<O, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(message) = self.pending.next() {
                return std::task::Poll::Ready(Some(Ok(message)));
            }
            match std::task::ready!(self.batches.poll_recv(cx)) {
                Some(Ok(batch)) => self.pending = batch.into_iter(),
                Some(Err(status)) => return std::task::Poll::Ready(Some(Err(status))),
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// What a watch stream carries: each event and heartbeat, in some form.
pub(crate) trait WatchOutput: Send + 'static {
    /// The message for `event` in log `log_id`.
    fn event(log_id: u64, event: &CustomerEvent) -> Self;
    /// The message for a heartbeat.
    fn heartbeat(heartbeat: pb::Heartbeat) -> Self;
}

impl WatchOutput for pb::WatchCustomersResponse {
    fn event(log_id: u64, event: &CustomerEvent) -> Self {
        pb::WatchCustomersResponse {
            kind: Some(pb::watch_customers_response::Kind::Event(event_to_proto(
                log_id, event,
            ))),
        }
    }

    fn heartbeat(heartbeat: pb::Heartbeat) -> Self {
        pb::WatchCustomersResponse {
            kind: Some(pb::watch_customers_response::Kind::Heartbeat(heartbeat)),
        }
    }
}

fn resume_token(log_id: u64, position: Position) -> String {
    token::encode(RESUME_TOKEN, &[log_id, position.0])
}

fn check_position(position: Position, bounds: &LogBounds) -> Result<(), Error> {
    if position.0 > bounds.head {
        return Err(Error::TokenAhead {
            position: position.0,
            head: bounds.head,
        });
    }
    if position.0 < bounds.pruned_through {
        return Err(Error::TokenExpired {
            position: position.0,
            pruned_through: bounds.pruned_through,
        });
    }
    Ok(())
}

fn token_error(field: &'static str, error: TokenError) -> Error {
    Error::InvalidField {
        field,
        reason: token_reason(error).to_owned(),
    }
}

fn customer_to_proto(customer: &Customer) -> pb::Customer {
    pb::Customer {
        id: customer.id.to_string(),
        name: customer.name.clone(),
        email: customer.email.clone(),
        create_time: Some(timestamp(customer.create_time)),
        update_time: Some(timestamp(customer.update_time)),
        version: customer.version,
    }
}

fn event_to_proto(log_id: u64, event: &CustomerEvent) -> pb::CustomerEvent {
    let kind = match event.kind {
        EventType::Created => pb::CustomerEventType::Created,
        EventType::Updated => pb::CustomerEventType::Updated,
        EventType::Deleted => pb::CustomerEventType::Deleted,
    };
    pb::CustomerEvent {
        event_id: event.event_id.to_string(),
        r#type: kind.into(),
        customer: Some(customer_to_proto(&event.customer)),
        resume_token: resume_token(log_id, Position(event.seq)),
        commit_time: Some(timestamp(event.commit_time)),
        sequence: seq_i64(Position(event.seq)),
    }
}

/// A position as the protobuf `int64` sequence field.
fn seq_i64(position: Position) -> i64 {
    i64::try_from(position.0).unwrap_or(i64::MAX)
}

/// The stream type of `WatchCustomers`.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchCustomersResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<S: CrmStore + ?Sized> pb::crm_service_server::CrmService for CrmApi<S> {
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn batch_create_customers(
        &self,
        request: Request<pb::BatchCreateCustomersRequest>,
    ) -> Result<Response<pb::BatchCreateCustomersResponse>, Status> {
        let requests = request.into_inner().requests;
        batch::check_size(DOMAIN, requests.len(), MAX_BATCH)?;
        // Every valid request goes to the store in one write, in request order: one commit,
        // and their events in the log in that order. Each checks before it writes, so one
        // refused leaves the others.
        let checked = requests.iter().map(validate::create).collect();
        let now = self.now();
        let results = batch::create_valid(checked, |valid| self.store.create_customers(valid, now))
            .await?
            .into_iter()
            .map(|result| pb::CreateCustomerResult {
                result: Some(match result {
                    Ok(customer) => {
                        pb::create_customer_result::Result::Customer(customer_to_proto(&customer))
                    }
                    Err(status) => {
                        pb::create_customer_result::Result::Error(batch_item_error(&status))
                    }
                }),
            })
            .collect();
        Ok(Response::new(pb::BatchCreateCustomersResponse { results }))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let id = validate::customer_id(&request.get_ref().id)?;
        let customer = self.store.get_customer(id).await?;
        Ok(Response::new(customer_to_proto(&customer)))
    }

    async fn update_customer(
        &self,
        request: Request<pb::UpdateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let (id, patch) = validate::update(request.into_inner())?;
        let customer = self.store.update_customer(id, patch, self.now()).await?;
        Ok(Response::new(customer_to_proto(&customer)))
    }

    async fn delete_customer(
        &self,
        request: Request<pb::DeleteCustomerRequest>,
    ) -> Result<Response<pb::DeleteCustomerResponse>, Status> {
        let id = validate::customer_id(&request.get_ref().id)?;
        let position = self.store.delete_customer(id, self.now()).await?;
        Ok(Response::new(pb::DeleteCustomerResponse {
            resume_token: self.resume_token(position)?,
        }))
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new(DOMAIN);
        let limit = violations.page_size(request.page_size);
        let log_id = self.store.bounds()?.log_id;
        let mut cursor = (0, None);
        if !request.page_token.is_empty() {
            match token::decode::<3>(CUSTOMER_PAGE_TOKEN, &request.page_token) {
                Ok([token_log, snapshot, after]) if token_log == log_id => {
                    // Tokens are checksummed, not signed: a made-up snapshot past the head
                    // would otherwise wait for events that never come.
                    if snapshot > self.store.bounds()?.head {
                        self.store.catch_up_to(Position(snapshot)).await?;
                    }
                    cursor = (after, Some(Position(snapshot)));
                }
                Ok(_) => violations.add("page_token", "was issued by a different CRM database"),
                Err(e) => violations.token("page_token", e),
            }
        }
        violations.finish()?;
        let page = self.store.list_customers(cursor.0, limit, cursor.1).await?;
        Ok(Response::new(pb::ListCustomersResponse {
            customers: page.customers.iter().map(customer_to_proto).collect(),
            next_page_token: page
                .next_after
                .map(|after| token::encode(CUSTOMER_PAGE_TOKEN, &[log_id, page.snapshot.0, after]))
                .unwrap_or_default(),
            resume_token: self.resume_token(page.snapshot)?,
            resume_sequence: seq_i64(page.snapshot),
        }))
    }

    type WatchCustomersStream = WatchStream;

    async fn watch_customers(
        &self,
        request: Request<pb::WatchCustomersRequest>,
    ) -> Result<Response<Self::WatchCustomersStream>, Status> {
        let stream = self
            .open_watch::<pb::WatchCustomersResponse>(request.into_inner())
            .await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_customer_events(
        &self,
        request: Request<pb::ListCustomerEventsRequest>,
    ) -> Result<Response<pb::ListCustomerEventsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new(DOMAIN);
        let limit = violations.page_size(request.page_size);
        let filter = validate::partition_filter(&mut violations, request.partition_filter.as_ref());
        violations.finish()?;
        let start = self
            .parse_start(&request.resume_token, request.start_position)
            .await?;
        let (events, next) = match &filter {
            None => {
                let events = self.store.events_after(start, limit).await?;
                let next = events.last().map_or(start, |e| Position(e.seq));
                (events, next)
            }
            Some(filter) => {
                // A bounded look past the token, so a page of a rare partition costs at most
                // this many reads; the token then moves past what was looked at.
                let examined = self
                    .store
                    .events_after(start, limit.saturating_mul(FILTER_SCAN))
                    .await?;
                filtered_page(&examined, filter, limit, start)
            }
        };
        let bounds = self.store.bounds()?;
        let remaining = bounds.head.saturating_sub(next.0);
        Ok(Response::new(pb::ListCustomerEventsResponse {
            events: events
                .iter()
                .map(|e| event_to_proto(bounds.log_id, e))
                .collect(),
            next_resume_token: resume_token(bounds.log_id, next),
            remaining_events: i64::try_from(remaining).unwrap_or(i64::MAX),
            next_sequence: seq_i64(next),
        }))
    }
}

/// How many events a filtered `ListCustomerEvents` looks at, per event it may return.
const FILTER_SCAN: usize = 10;

/// Up to `limit` of the `examined` events (those after `start`) that are in `filter`, and the
/// position after the last event looked at: the last one returned if the page filled up, else
/// the last one examined.
fn filtered_page(
    examined: &[Arc<CustomerEvent>],
    filter: &Partitions,
    limit: usize,
    start: Position,
) -> (Vec<Arc<CustomerEvent>>, Position) {
    let mut page = Vec::new();
    for event in examined {
        if filter.contains(&event.customer.id) {
            page.push(Arc::clone(event));
            if page.len() == limit {
                return (page, Position(event.seq));
            }
        }
    }
    (page, examined.last().map_or(start, |e| Position(e.seq)))
}

/// Least time between heartbeats that only move a filtered stream's token past events it left
/// out, so a busy log of other partitions does not become a stream of heartbeats.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// One open `WatchCustomers` stream: a cursor, and a task that moves it.
struct Watcher<S: ?Sized, O> {
    /// Where events come from.
    store: Arc<S>,
    /// Heartbeat timestamps.
    clock: SharedClock,
    /// Heartbeat interval.
    heartbeat: Duration,
    /// The stream to the client, in batches; bounded, so a slow client holds back only this
    /// task.
    sender: mpsc::Sender<Result<Vec<O>, Status>>,
    /// Ends the stream when the server shuts down.
    shutdown: CancellationToken,
    /// Open-stream permits, to tell how many watchers there are.
    watchers: Arc<Semaphore>,
    /// `--max-watchers`: permits in all.
    max_watchers: usize,
    /// The partitions this stream wants; `None`, the common case, for every event.
    filter: Option<Partitions>,
}

/// Above this many open watch streams, a watcher woken by a commit waits [`COALESCE`] before
/// reading, so that each wake-up, channel send and HTTP/2 frame carries the events of several
/// commits. With a few streams the CPU is idle and the wait would only add latency (the
/// integration service's single stream must stay in the millisecond range); with a thousand,
/// waking every stream for every commit is what saturates the CPU (see TECHNICAL_DESIGN.md,
/// Performance).
const COALESCE_ABOVE: usize = 64;

/// How long a watcher lets commits collect when many streams are open.
const COALESCE: Duration = Duration::from_millis(5);

impl<S: CrmStore + ?Sized, O: WatchOutput> Watcher<S, O> {
    /// Whether enough streams are open that waking less often is worth a little latency.
    fn crowded(&self) -> bool {
        self.max_watchers
            .saturating_sub(self.watchers.available_permits())
            > COALESCE_ABOVE
    }

    /// Streams from `start` in log `log_id`, woken by `bounds`, until the client leaves, the
    /// server shuts down or `health` says the store lost its database.
    async fn run(
        self,
        start: Position,
        log_id: u64,
        mut bounds: watch::Receiver<LogBounds>,
        mut health: watch::Receiver<bool>,
    ) {
        // The last event looked at, and the last position the client was given (an event or a
        // heartbeat): a filtered stream looks at events it does not send.
        let mut cursor = start;
        let mut told = start;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once, not in every `select!`: each new one registers with the token shared by
        // every stream, and with a thousand streams that registering showed up in profiles.
        let shutdown = self.shutdown.cancelled();
        tokio::pin!(shutdown);
        let closed = self.sender.closed();
        tokio::pin!(closed);
        // When the next heartbeat that only moves the token may go, once one is owed.
        let progress = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(progress);
        let mut last_progress: Option<tokio::time::Instant> = None;
        // Whether the `caught_up` heartbeat has been sent.
        let mut live = false;
        // A store whose health never changes drops its sender; then there is nothing to follow.
        let mut health_follows = true;
        loop {
            // Catch up: from the in-memory ring when close, from the database when far behind.
            while cursor.0 < bounds.borrow_and_update().head {
                let events = match self.store.events_after(cursor, WATCH_BATCH).await {
                    Ok(events) => events,
                    Err(error) => {
                        let _ = self.sender.send(Err(error.into())).await;
                        return;
                    }
                };
                if events.is_empty() {
                    break;
                }
                for chunk in events.chunks(SEND_BATCH) {
                    // A client that keeps up never makes `send` wait, so shutdown is checked
                    // here too: a long catch-up still ends with the notice, in time.
                    if self.shutdown.is_cancelled() {
                        return self.end().await;
                    }
                    let (batch, last_sent) = self.messages(log_id, chunk);
                    if let Some(last_sent) = last_sent {
                        if !self.send(batch, &mut shutdown).await {
                            return;
                        }
                        told = last_sent;
                        heartbeat.reset();
                    }
                    cursor = Position(chunk.last().map_or(cursor.0, |e| e.seq));
                }
            }
            // The backlog the stream started behind has been sent: say so at once, so the
            // client knows that what follows is live without waiting a heartbeat interval.
            if !live {
                if !self
                    .send(vec![self.heartbeat(log_id, cursor, true)], &mut shutdown)
                    .await
                {
                    return;
                }
                live = true;
                told = cursor;
                heartbeat.reset();
            }
            // Caught up, but the client's token is behind because of events left out: move it,
            // at most once a wake-up and once a `PROGRESS_INTERVAL`.
            let mut progress_owed = false;
            if told < cursor {
                let now = tokio::time::Instant::now();
                match last_progress.map(|t| t + PROGRESS_INTERVAL) {
                    Some(due) if due > now => {
                        progress.as_mut().reset(due);
                        progress_owed = true;
                    }
                    _ => {
                        if !self
                            .send(vec![self.heartbeat(log_id, cursor, false)], &mut shutdown)
                            .await
                        {
                            return;
                        }
                        told = cursor;
                        last_progress = Some(now);
                        heartbeat.reset();
                    }
                }
            }
            tokio::select! {
                changed = bounds.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if self.crowded() {
                        tokio::select! {
                            () = tokio::time::sleep(COALESCE) => {}
                            () = &mut shutdown => return self.end().await,
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if !self.send(vec![self.heartbeat(log_id, cursor, false)], &mut shutdown).await {
                        return;
                    }
                    told = cursor;
                }
                // The loop sends the owed heartbeat.
                () = &mut progress, if progress_owed => {}
                changed = health.changed(), if health_follows => match changed {
                    Err(_) => health_follows = false,
                    Ok(()) if !*health.borrow_and_update() => return self.lost_database().await,
                    Ok(()) => {}
                },
                () = &mut closed => return,
                () = &mut shutdown => return self.end().await,
            }
        }
    }

    /// The messages for `chunk` this stream wants, and the position of the last of them
    /// (`None` when it wants none). Unfiltered streams take every event without a check.
    fn messages(&self, log_id: u64, chunk: &[Arc<CustomerEvent>]) -> (Vec<O>, Option<Position>) {
        match &self.filter {
            None => (
                chunk.iter().map(|e| O::event(log_id, e)).collect(),
                chunk.last().map(|e| Position(e.seq)),
            ),
            Some(filter) => {
                let mut last = None;
                let batch = chunk
                    .iter()
                    .filter(|e| filter.contains(&e.customer.id))
                    .map(|e| {
                        last = Some(Position(e.seq));
                        O::event(log_id, e)
                    })
                    .collect();
                (batch, last)
            }
        }
    }

    /// A heartbeat at `position`; `caught_up` on the one that ends the initial backlog.
    fn heartbeat(&self, log_id: u64, position: Position, caught_up: bool) -> O {
        O::heartbeat(pb::Heartbeat {
            resume_token: resume_token(log_id, position),
            send_time: Some(timestamp(self.clock.now())),
            sequence: seq_i64(position),
            caught_up,
        })
    }

    /// Ends the stream because the store cannot serve it: UNAVAILABLE while the database is
    /// unreachable, so the client resumes from its token (here once healthy, or elsewhere), or
    /// the store's own error when it has stopped serving for good.
    async fn lost_database(&self) {
        let status: Status = match self.store.bounds() {
            Err(Error::Storage(_)) | Ok(_) => Error::DatabaseLost.into(),
            Err(e) => e.into(),
        };
        info!(code = ?status.code(), "ending watch stream: the store cannot serve it");
        let _ = tokio::time::timeout(END_NOTICE_WAIT, self.sender.send(Err(status))).await;
    }

    /// Queues `batch` for the client, waiting for room if its buffer is full. Returns false
    /// when the stream is over: the client left, or the server is shutting down (the client
    /// has then been told).
    async fn send<F>(&self, batch: Vec<O>, shutdown: &mut F) -> bool
    where
        F: Future<Output = ()> + Unpin,
    {
        // Most sends find room: no waiting, no registering with the shutdown token.
        let batch = match self.sender.try_send(Ok(batch)) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(batch)) => batch,
        };
        tokio::select! {
            sent = self.sender.send(batch) => sent.is_ok(),
            () = shutdown => {
                self.end().await;
                false
            }
        }
    }

    /// Tells the client the server is going away, so it reconnects (to this server once it is
    /// back, or to another) from its last token.
    async fn end(&self) {
        info!("ending watch stream: server shutting down");
        // Waits briefly for room, so a client that is catching up (full buffer) still learns
        // the stream ended because of shutdown and not because the feed is over.
        let status = Error::ShuttingDown.into();
        let _ = tokio::time::timeout(END_NOTICE_WAIT, self.sender.send(Err(status))).await;
    }
}

#[cfg(test)]
mod tests {
    use mip_proto::crm::v1::crm_service_server::CrmService;
    use mip_runtime::clock::SystemClock;
    use mip_runtime::sqlite::Durability;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::store::SqliteStore;

    /// Calls the service directly (no network), so the heartbeat timer runs on paused time and
    /// the test checks the exact interval without waiting for it.
    #[tokio::test(start_paused = true)]
    async fn idle_watch_sends_heartbeats_at_the_configured_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(dir.path(), Durability::Normal)
                .await
                .unwrap(),
        );
        let options = CrmOptions {
            heartbeat_interval: Duration::from_secs(30),
            ..CrmOptions::default()
        };
        let api = CrmApi::new(
            store,
            options,
            Arc::new(SystemClock),
            CancellationToken::new(),
        );
        let started = tokio::time::Instant::now();
        let mut stream = api
            .watch_customers(Request::new(pb::WatchCustomersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let live = next_heartbeat(&mut stream).await;
        assert!(
            live.caught_up,
            "the first heartbeat says the stream is live"
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "and it comes at once");
        for beat in 1..=2u32 {
            let heartbeat = next_heartbeat(&mut stream).await;
            assert!(
                !heartbeat.caught_up,
                "only the first heartbeat is caught_up"
            );
            assert_eq!(heartbeat.sequence, 0, "an empty log is at position 0");
            assert!(!heartbeat.resume_token.is_empty());
            let elapsed = started.elapsed();
            assert!(
                elapsed >= Duration::from_secs(30) * beat
                    && elapsed < Duration::from_secs(30) * beat + Duration::from_secs(1),
                "heartbeat {beat} after {elapsed:?}"
            );
        }
    }

    /// The next message of `stream`, which must be a heartbeat.
    async fn next_heartbeat(stream: &mut WatchStream) -> pb::Heartbeat {
        let message = stream.next().await.expect("stream open").expect("no error");
        match message.kind {
            Some(pb::watch_customers_response::Kind::Heartbeat(heartbeat)) => heartbeat,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }

    /// A service over a fresh store with `customers` customers in it, on paused time.
    async fn api_with_customers(dir: &tempfile::TempDir, customers: usize) -> CrmApi<SqliteStore> {
        let store = Arc::new(
            SqliteStore::open(dir.path(), Durability::Normal)
                .await
                .unwrap(),
        );
        let options = CrmOptions {
            heartbeat_interval: Duration::from_secs(30),
            ..CrmOptions::default()
        };
        let api = CrmApi::new(
            store,
            options,
            Arc::new(SystemClock),
            CancellationToken::new(),
        );
        for n in 0..customers {
            api.create_customer(Request::new(pb::CreateCustomerRequest {
                name: format!("Customer {n}"),
                email: format!("customer{n}@example.com"),
                request_id: String::new(),
            }))
            .await
            .unwrap();
        }
        api
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_from_earliest_sends_the_whole_backlog_then_says_it_is_caught_up() {
        let dir = tempfile::tempdir().unwrap();
        let api = api_with_customers(&dir, 5).await;
        let started = tokio::time::Instant::now();
        let mut stream = api
            .watch_customers(Request::new(pb::WatchCustomersRequest {
                start_position: pb::StartPosition::Earliest.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        for sequence in 1..=5 {
            let message = stream.next().await.expect("stream open").expect("no error");
            let Some(pb::watch_customers_response::Kind::Event(event)) = message.kind else {
                panic!("event {sequence} of the backlog expected, got {message:?}");
            };
            assert_eq!(event.sequence, sequence);
        }
        let live = next_heartbeat(&mut stream).await;
        assert!(live.caught_up, "{live:?}");
        assert_eq!(
            live.sequence, 5,
            "at the head, after the last backlog event"
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "sent without waiting");

        // Later events are live; the next heartbeat is an ordinary one.
        api.create_customer(Request::new(pb::CreateCustomerRequest {
            name: "Later".into(),
            email: "later@example.com".into(),
            request_id: String::new(),
        }))
        .await
        .unwrap();
        // Paused time runs ahead while the store writes on its own thread, so ordinary
        // heartbeats may come first; none of them is caught_up again.
        let event = loop {
            let message = stream.next().await.expect("stream open").expect("no error");
            match message.kind {
                Some(pb::watch_customers_response::Kind::Event(event)) => break event,
                Some(pb::watch_customers_response::Kind::Heartbeat(beat)) => {
                    assert!(!beat.caught_up, "{beat:?}");
                }
                None => panic!("an empty message"),
            }
        };
        assert_eq!(event.sequence, 6);
        let beat = next_heartbeat(&mut stream).await;
        assert!(!beat.caught_up, "{beat:?}");
        assert_eq!(beat.sequence, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_watch_at_the_head_says_it_is_caught_up_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let api = api_with_customers(&dir, 3).await;
        let head = api
            .list_customers(Request::new(pb::ListCustomersRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .resume_token;
        let started = tokio::time::Instant::now();
        let mut stream = api
            .watch_customers(Request::new(pb::WatchCustomersRequest {
                resume_token: head.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let live = next_heartbeat(&mut stream).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "not a heartbeat interval later"
        );
        assert!(live.caught_up, "{live:?}");
        assert_eq!(live.sequence, 3);
        assert_eq!(live.resume_token, head, "nothing was skipped");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_an_open_watch_with_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(dir.path(), Durability::Normal)
                .await
                .unwrap(),
        );
        let shutdown = CancellationToken::new();
        let api = CrmApi::new(
            store,
            CrmOptions::default(),
            Arc::new(SystemClock),
            shutdown.clone(),
        );
        let mut stream = api
            .watch_customers(Request::new(pb::WatchCustomersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let live = next_heartbeat(&mut stream).await;
        assert!(live.caught_up);
        shutdown.cancel();
        let end = stream
            .next()
            .await
            .expect("a final status")
            .expect_err("an error");
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert_eq!(
            mip_runtime::status::reason(&end).as_deref(),
            Some("SHUTTING_DOWN")
        );
        assert_eq!(
            mip_runtime::status::retry_delay(&end),
            Some(mip_runtime::status::SHUTDOWN_RETRY_DELAY),
            "the client is told when to come back"
        );
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the status"
        );
    }
}
