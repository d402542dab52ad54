//! The PostgreSQL store: CRM's tables in schema `crm`, written through the runtime's
//! group-commit writer, safe with any number of CRM processes writing to one database.
//!
//! Every rule is held by the database, not by this process:
//! - **Unique emails**: the unique index on `email_key`. A create inserts with
//!   `ON CONFLICT DO NOTHING`; no row back means the email is taken (by a committed customer,
//!   by an earlier write of the same group, or by a transaction it waited for).
//! - **Idempotency**: the `create_requests` primary key. A create first claims its request id
//!   the same way; when the claim finds the id taken it reads the claim (which READ COMMITTED
//!   shows once the claiming transaction has committed) and answers with that customer. A claim
//!   whose email then turns out taken is undone with a DELETE in the same transaction.
//! - **The log's order**: the single `change_log` row. A group takes its sequence numbers with
//!   `UPDATE change_log SET head = head + n` as its last statement before COMMIT, so the row
//!   lock orders the groups of every process by commit, and a rollback gives the numbers back.
//!
//! Nothing in a group raises for a refusal, since a failed statement aborts the transaction
//! and with it every write of the group. A group that loses a deadlock (two groups claiming the
//! same keys in opposite orders) is rolled back whole by PostgreSQL and its writes are run again.
//!
//! The feed learns of this process's commits from the writer's answers, which two writers can
//! give out of order, and of other processes' commits (or a commit whose answer was lost) from
//! the tail, which reads the log back whenever the feed has a gap, when a reader waits for a
//! position past the feed's head, and every `--feed-poll-interval` regardless. The tail is
//! also how the store learns it lost its database (its reads fail: health NOT_SERVING until
//! they succeed again) or that the database lost commits this process had served.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Transaction};
use mip_runtime::CancellationToken;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::postgres::{Batch, Connecting, Pg, PgOptions, Writer};
use mip_runtime::store::DbError;
use tokio::sync::watch;
use tokio_postgres::IsolationLevel;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{CrmStore, FEED_CAPACITY, events_from_feed, published};
use crate::domain::{
    Customer, CustomerEvent, CustomerPage, CustomerPatch, EventType, LogBounds, NewCustomer,
    Position, Rendered,
};
use crate::error::Error;
use crate::feed::Feed;

/// CRM's schema: every table is named `crm.<table>`, so CRM can share a database with the
/// other services.
pub const SCHEMA: &str = "crm";

/// Group-commit writers: one runs its statements while the other waits for its commit.
const WRITERS: usize = 2;

/// How long a gap may last before the tail reads the log back. A gap left by this process's
/// other writer closes within a round trip (its group committed before ours could take the
/// counter row); one left by another replica's commit closes only by reading the log, and every
/// write waits for its own position to be published, so this is added to the write latency of
/// a cluster: 10 ms here raised CreateCustomer's p50 from 4.7 ms (one replica) to 12.4 ms
/// (three), TECHNICAL_DESIGN.md §11.
const GAP_GRACE: Duration = Duration::from_millis(1);

/// Events the tail reads per query.
const TAIL_BATCH: i64 = 1024;

/// The advisory lock key a prune holds, so that one process at a time deletes expired events
/// ("crm.prune" in ASCII). Other services' keys are theirs to choose; CRM uses only this one.
const PRUNE_LOCK: i64 = 0x63_72_6d_2e_70_72_75_6e;

/// How often a write that lost a deadlock is run again before the caller sees UNAVAILABLE.
const RACE_RETRIES: usize = 5;

/// The schema, one step per version.
const MIGRATIONS: &[&str] = &[
    // `created_seq` is NULL only inside the creating transaction: it is the CREATED event's
    // position, which is known only once the group takes its numbers, just before COMMIT.
    "CREATE TABLE crm.customers (
        id          UUID PRIMARY KEY,
        name        TEXT NOT NULL,
        email       TEXT NOT NULL,
        email_key   TEXT NOT NULL UNIQUE,
        create_time BIGINT NOT NULL,
        update_time BIGINT NOT NULL,
        version     BIGINT NOT NULL,
        created_seq BIGINT UNIQUE
    );
    CREATE TABLE crm.customer_events (
        seq         BIGINT PRIMARY KEY,
        event_id    UUID NOT NULL,
        event_type  BIGINT NOT NULL,
        customer_id UUID NOT NULL,
        name        TEXT NOT NULL,
        email       TEXT NOT NULL,
        create_time BIGINT NOT NULL,
        update_time BIGINT NOT NULL,
        version     BIGINT NOT NULL,
        commit_time BIGINT NOT NULL
    );
    CREATE INDEX customer_events_commit_time ON crm.customer_events (commit_time);
    CREATE TABLE crm.create_requests (
        request_id  UUID PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        customer_id UUID NOT NULL
    );
    CREATE TABLE crm.change_log (
        id             BIGINT PRIMARY KEY CHECK (id = 1),
        log_id         BIGINT NOT NULL,
        head           BIGINT NOT NULL,
        pruned_through BIGINT NOT NULL
    );
    -- Migrations run once, under a lock, so every process shares this log id.
    INSERT INTO crm.change_log (id, log_id, head, pruned_through)
        VALUES (1, 1 + floor(random() * 4e18)::BIGINT, 0, 0);",
];

const CUSTOMER_COLUMNS: &str = "id, name, email, create_time, update_time, version";

const EVENT_COLUMNS: &str = "seq, event_id, event_type, customer_id, name, email, create_time, \
                             update_time, version, commit_time";

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PgStore {
    /// The pool, writers and feed, once connected and migrated.
    state: Arc<Connecting<Connected>>,
    /// Whether the database is reachable, as the tail last found it.
    health: watch::Sender<bool>,
    /// Set, for good, once the database is found to hold fewer events than the feed: this
    /// process then refuses every call (see [`Error::LogDiverged`]).
    diverged: Arc<std::sync::OnceLock<Error>>,
    /// Stops the tail when the store is dropped.
    _tail: StopOnDrop,
}

/// Cancels its token when dropped: the tail task ends with the store that started it.
#[derive(Debug)]
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A connected store.
#[derive(Debug)]
struct Connected {
    /// The pool, for reads.
    pg: Pg,
    /// Where writes queue for their group commit.
    writer: Writer<Groups>,
    /// Recent events and bounds.
    feed: Arc<Feed>,
}

impl PgStore {
    /// Connects to `options` in the background (retrying until the server answers, or until
    /// `shutdown`), then migrates schema `crm`. Calls fail with UNAVAILABLE until then.
    pub fn open(options: &PgOptions, shutdown: &CancellationToken) -> Self {
        Self::open_polling(options, shutdown, super::DEFAULT_FEED_POLL_INTERVAL)
    }

    /// [`PgStore::open`], reading the log back every `poll_interval` for what other processes
    /// committed: how soon their commits reach this process's watchers.
    pub fn open_polling(
        options: &PgOptions,
        shutdown: &CancellationToken,
        poll_interval: Duration,
    ) -> Self {
        let tail_stop = shutdown.child_token();
        let health = watch::Sender::new(true);
        let diverged = Arc::new(std::sync::OnceLock::new());
        let state = Connecting::spawn(options.name(), {
            let options = options.clone();
            let shutdown = shutdown.clone();
            let tail_stop = tail_stop.clone();
            let tail = Tail {
                period: poll_interval,
                health: health.clone(),
                diverged: Arc::clone(&diverged),
            };
            async move {
                let pg = Pg::connect(&options, SCHEMA, MIGRATIONS, &shutdown).await?;
                // The server may go away again between the migration and this read; that is
                // still "waiting for the database", not a reason to give up.
                let mut backoff = Duration::from_millis(100);
                let bounds = loop {
                    let read = async {
                        let client = pg.client().await?;
                        read_bounds(&client).await
                    };
                    match read.await {
                        Ok(bounds) => break bounds,
                        Err(e) if e.is_transient() => {
                            tracing::warn!(error = %e, "cannot read the change log's bounds yet; retrying");
                            tokio::select! {
                                () = tokio::time::sleep(backoff) => {}
                                () = shutdown.cancelled() => return Err(DbError::Closed),
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => return Err(e),
                    }
                };
                let feed = Arc::new(Feed::new(bounds, FEED_CAPACITY));
                let writer = Writer::spawn(pg.clone(), Arc::new(Groups), WRITERS);
                tokio::spawn(tail.run(pg.clone(), Arc::clone(&feed), tail_stop));
                Ok(Connected { pg, writer, feed })
            }
        });
        Self {
            state,
            health,
            diverged,
            _tail: StopOnDrop(tail_stop),
        }
    }

    fn connected(&self) -> Result<&Connected, Error> {
        if let Some(Error::LogDiverged {
            served_head,
            database_head,
        }) = self.diverged.get()
        {
            return Err(Error::LogDiverged {
                served_head: *served_head,
                database_head: *database_head,
            });
        }
        Ok(self.state.get()?)
    }

    /// Runs `op` in a group commit, publishes its events, and returns once the feed has them
    /// all, so that a position it hands out is never ahead of the feed.
    async fn write(&self, op: Op) -> Result<Outcome, Error> {
        let connected = self.connected()?;
        let mut retries = 0;
        let reply = loop {
            match connected.writer.write(op.clone()).await {
                Err(e) if lost_race(&e) && retries < RACE_RETRIES => retries += 1,
                other => break other?,
            }
        };
        connected.feed.publish(&reply.events);
        if let Some(last) = reply.events.iter().map(|e| e.seq).max()
            && published(&connected.feed, Position(last)).await.is_err()
        {
            // The write has committed: reporting it failed would make a client without a
            // request id create it twice. A token it carries may be refused as ahead of this
            // process's feed until the feed catches up, which a retry then gets past.
            tracing::warn!(
                position = last,
                "committed, but the feed did not catch up within the wait; answering anyway"
            );
        }
        Ok(reply.outcome)
    }
}

/// Whether the group was rolled back for losing a race that running it again resolves.
fn lost_race(e: &DbError) -> bool {
    // deadlock_detected, serialization_failure: `classify` ends the reason with the SQLSTATE.
    matches!(e, DbError::Unavailable { reason, .. }
        if reason.ends_with("(40P01)") || reason.ends_with("(40001)"))
}

/// The store's writes, run as one PostgreSQL transaction per group.
struct Groups;

/// One queued write.
#[derive(Debug, Clone)]
enum Op {
    /// Customers to create, in order: one for CreateCustomer, many for a batch.
    Create(Vec<NewCustomer>, SystemTime),
    /// A patch to apply.
    Update(Uuid, CustomerPatch, SystemTime),
    /// A customer to delete.
    Delete(Uuid, SystemTime),
    /// Delete events committed before this.
    Prune(SystemTime),
}

/// What a write did.
#[derive(Debug)]
enum Outcome {
    /// One result per customer to create.
    Created(Vec<Result<Customer, Error>>),
    /// The updated customer.
    Updated(Result<Customer, Error>),
    /// The DELETED event's position.
    Deleted(Result<Position, Error>),
    /// Events deleted, and the highest deleted position.
    Pruned {
        /// How many.
        deleted: u64,
        /// The highest one (0 if none).
        through: u64,
    },
}

/// A write's answer: what it did, and the events it committed, numbered.
#[derive(Debug)]
struct Reply {
    /// What it did.
    outcome: Outcome,
    /// Its events, in log order.
    events: Vec<Arc<CustomerEvent>>,
}

/// An event whose position is not known yet.
struct Draft {
    /// Which write of the group made it.
    op: usize,
    /// The event, `seq` 0.
    event: CustomerEvent,
}

#[async_trait]
impl Batch for Groups {
    type Op = Op;
    type Reply = Reply;

    async fn run(&self, tx: &Transaction<'_>, ops: Vec<Op>) -> Result<Vec<Reply>, DbError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut drafts: Vec<Draft> = Vec::new();
        let mut pruned_through = 0u64;
        // Phase 1, each write in turn: claim keys and change customer rows. Row locks are
        // taken here, the counter row's is not.
        for (index, op) in ops.into_iter().enumerate() {
            let mut emit = |event| drafts.push(Draft { op: index, event });
            let outcome = match op {
                Op::Create(new, now) => {
                    let mut results = Vec::with_capacity(new.len());
                    for one in new {
                        results.push(match create(tx, one, now).await? {
                            Ok((customer, event)) => {
                                if let Some(event) = event {
                                    emit(event);
                                }
                                Ok(customer)
                            }
                            Err(refused) => Err(refused),
                        });
                    }
                    Outcome::Created(results)
                }
                Op::Update(id, patch, now) => {
                    Outcome::Updated(update(tx, id, patch, now).await?.map(|(customer, event)| {
                        if let Some(event) = event {
                            emit(event);
                        }
                        customer
                    }))
                }
                Op::Delete(id, now) => Outcome::Deleted(delete(tx, id, now).await?.map(|event| {
                    emit(event);
                    // Filled in once the group has its positions.
                    Position(0)
                })),
                Op::Prune(cutoff) => {
                    let (deleted, through) = prune(tx, cutoff).await?;
                    pruned_through = pruned_through.max(through);
                    Outcome::Pruned { deleted, through }
                }
            };
            outcomes.push(outcome);
        }
        // Phase 2, just before COMMIT: number the events from the counter row and append
        // them. Taking the row lock last keeps it held only while the group commits.
        if !drafts.is_empty() || pruned_through > 0 {
            let base = append(tx, &drafts, pruned_through).await?;
            for (offset, draft) in (1..).zip(drafts.iter_mut()) {
                draft.event.seq = base + offset;
            }
        }
        let mut replies: Vec<Reply> = outcomes
            .into_iter()
            .map(|outcome| Reply {
                outcome,
                events: Vec::new(),
            })
            .collect();
        for Draft { op, event } in drafts {
            let reply = &mut replies[op];
            if let Outcome::Deleted(Ok(position)) = &mut reply.outcome {
                *position = Position(event.seq);
            }
            reply.events.push(Arc::new(event));
        }
        Ok(replies)
    }
}

/// A position as PostgreSQL's BIGINT.
fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn new_event(kind: EventType, customer: &Customer, now: SystemTime) -> CustomerEvent {
    CustomerEvent {
        seq: 0,
        event_id: Uuid::now_v7(),
        kind,
        customer: customer.clone(),
        commit_time: now,
        rendered: Rendered::default(),
    }
}

/// Creates one customer (phase 1); a repeated request id answers with the original and no
/// event.
async fn create(
    tx: &Transaction<'_>,
    new: NewCustomer,
    now: SystemTime,
) -> Result<Result<(Customer, Option<CustomerEvent>), Error>, DbError> {
    let id = Uuid::now_v7();
    if let Some(request_id) = new.request_id {
        let fingerprint = new.fingerprint();
        // Waits for a transaction holding the same request id; no row back means it is taken.
        let claim = tx
            .prepare_cached(
                "INSERT INTO crm.create_requests (request_id, fingerprint, customer_id)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING request_id",
            )
            .await?;
        if tx
            .query_opt(&claim, &[&request_id, &fingerprint, &id])
            .await?
            .is_none()
        {
            return replay(tx, request_id, &fingerprint).await;
        }
    }
    let customer = Customer {
        id,
        name: new.name.as_str().to_owned(),
        email: new.email.as_str().to_owned(),
        create_time: now,
        update_time: now,
        version: 1,
    };
    let insert = tx
        .prepare_cached(
            "INSERT INTO crm.customers (id, name, email, email_key, create_time, update_time,
             version) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .await?;
    let inserted = tx
        .query_opt(
            &insert,
            &[
                &customer.id,
                &customer.name,
                &customer.email,
                &new.email.key(),
                &to_micros(now),
                &to_micros(now),
                &customer.version,
            ],
        )
        .await?;
    if inserted.is_none() {
        if let Some(request_id) = new.request_id {
            // The claim must not outlive the refusal: a retry after the email is freed must
            // be able to create.
            let unclaim = tx
                .prepare_cached("DELETE FROM crm.create_requests WHERE request_id = $1")
                .await?;
            tx.execute(&unclaim, &[&request_id]).await?;
        }
        return Ok(Err(Error::EmailTaken(new.email.as_str().to_owned())));
    }
    let event = new_event(EventType::Created, &customer, now);
    Ok(Ok((customer, Some(event))))
}

/// The answer to a create whose request id is already claimed: the original customer, if the
/// parameters match and it still exists.
async fn replay(
    tx: &Transaction<'_>,
    request_id: Uuid,
    fingerprint: &str,
) -> Result<Result<(Customer, Option<CustomerEvent>), Error>, DbError> {
    let read = tx
        .prepare_cached(
            "SELECT fingerprint, customer_id FROM crm.create_requests WHERE request_id = $1",
        )
        .await?;
    // A fresh snapshot: it sees the claim the insert above waited for.
    let Some(row) = tx.query_opt(&read, &[&request_id]).await? else {
        // The claim was undone after the conflict was seen; running the write again decides.
        return Err(DbError::Unavailable {
            database: "PostgreSQL".into(),
            reason: format!("request_id {request_id} was claimed and released at once; retry"),
        });
    };
    let previous: String = row.try_get(0)?;
    let customer_id: Uuid = row.try_get(1)?;
    if previous != fingerprint {
        return Ok(Err(Error::RequestIdReused(request_id)));
    }
    Ok(match find_customer(tx, customer_id, false).await? {
        Some(customer) => Ok((customer, None)),
        None => Err(Error::CreatedThenDeleted {
            request_id,
            customer_id,
        }),
    })
}

/// Applies a patch (phase 1); no event if nothing changed.
async fn update(
    tx: &Transaction<'_>,
    id: Uuid,
    patch: CustomerPatch,
    now: SystemTime,
) -> Result<Result<(Customer, Option<CustomerEvent>), Error>, DbError> {
    // Locked, so a concurrent update (in any process) waits and then sees this version.
    let Some(mut customer) = find_customer(tx, id, true).await? else {
        return Ok(Err(Error::NotFound(id)));
    };
    // The row lock holds from this read to the UPDATE below, which repeats the condition: a
    // concurrent update of the same customer commits before this read or after this write.
    if let Some(expected) = patch.expected_version.filter(|v| *v != customer.version) {
        return Ok(Err(Error::VersionMismatch {
            id,
            expected,
            current: customer.version,
        }));
    }
    let read_version = customer.version;
    let mut changed = false;
    if let Some(name) = patch.name.filter(|n| n.as_str() != customer.name) {
        customer.name = name.as_str().to_owned();
        changed = true;
    }
    let mut email_key = None;
    if let Some(email) = patch.email.filter(|e| e.as_str() != customer.email) {
        let key = email.key();
        if key != customer.email.to_lowercase() && !claim_email(tx, &key).await? {
            return Ok(Err(Error::EmailTaken(email.as_str().to_owned())));
        }
        customer.email = email.as_str().to_owned();
        email_key = Some(key);
        changed = true;
    }
    if !changed {
        return Ok(Ok((customer, None)));
    }
    customer.update_time = now;
    customer.version += 1;
    let write = tx
        .prepare_cached(
            "UPDATE crm.customers SET name = $2, email = $3,
                 email_key = COALESCE($4, email_key), update_time = $5, version = $6
             WHERE id = $1 AND version = $7",
        )
        .await?;
    // Compare-and-set: written only over the version read above.
    let written = tx
        .execute(
            &write,
            &[
                &id,
                &customer.name,
                &customer.email,
                &email_key,
                &to_micros(now),
                &customer.version,
                &read_version,
            ],
        )
        .await?;
    if written != 1 {
        return Err(DbError::Other {
            database: "crm".into(),
            reason: format!("customer {id} changed while its row was locked"),
        });
    }
    let event = new_event(EventType::Updated, &customer, now);
    Ok(Ok((customer, Some(event))))
}

/// Reserves an email key for an update without a statement that can raise: UPDATE has no
/// `ON CONFLICT`, so the key is claimed with a placeholder row (which waits for a transaction
/// holding the key, like a create's insert) and the placeholder is deleted at once. Until
/// this transaction ends, another writer's insert of the key waits on it, so the update that
/// follows cannot conflict.
async fn claim_email(tx: &Transaction<'_>, key: &str) -> Result<bool, DbError> {
    let placeholder = Uuid::new_v4();
    let claim = tx
        .prepare_cached(
            "INSERT INTO crm.customers (id, name, email, email_key, create_time, update_time,
             version) VALUES ($1, '', '', $2, 0, 0, 0) ON CONFLICT DO NOTHING RETURNING id",
        )
        .await?;
    if tx.query_opt(&claim, &[&placeholder, &key]).await?.is_none() {
        return Ok(false);
    }
    let release = tx
        .prepare_cached("DELETE FROM crm.customers WHERE id = $1")
        .await?;
    tx.execute(&release, &[&placeholder]).await?;
    Ok(true)
}

/// Deletes a customer (phase 1); the DELETED event carries its last state.
async fn delete(
    tx: &Transaction<'_>,
    id: Uuid,
    now: SystemTime,
) -> Result<Result<CustomerEvent, Error>, DbError> {
    let statement = tx
        .prepare_cached(&format!(
            "DELETE FROM crm.customers WHERE id = $1 RETURNING {CUSTOMER_COLUMNS}"
        ))
        .await?;
    Ok(match tx.query_opt(&statement, &[&id]).await? {
        Some(row) => Ok(new_event(
            EventType::Deleted,
            &customer_from_row(&row)?,
            now,
        )),
        None => Err(Error::NotFound(id)),
    })
}

/// Deletes events committed before `cutoff` (phase 1); returns how many, and the highest.
///
/// Only while holding [`PRUNE_LOCK`]: replicas sharing the database all run retention, and
/// one deleting at a time is enough (the others would only wait on its row locks to delete
/// nothing). A process that finds the lock taken deletes nothing this round and learns the new
/// bounds from its tail. The lock is the transaction-scoped kind, released by the group's
/// COMMIT or ROLLBACK, so a group that fails, or a connection that dies, never leaves it held.
async fn prune(tx: &Transaction<'_>, cutoff: SystemTime) -> Result<(u64, u64), DbError> {
    let lock = tx
        .prepare_cached("SELECT pg_try_advisory_xact_lock($1)")
        .await?;
    let locked: bool = tx.query_one(&lock, &[&PRUNE_LOCK]).await?.try_get(0)?;
    if !locked {
        return Ok((0, 0));
    }
    let statement = tx
        .prepare_cached(
            "WITH gone AS (
                 DELETE FROM crm.customer_events WHERE seq <= (
                     SELECT MAX(seq) FROM crm.customer_events WHERE commit_time < $1
                 ) RETURNING seq
             )
             SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM gone",
        )
        .await?;
    let row = tx.query_one(&statement, &[&to_micros(cutoff)]).await?;
    let deleted: i64 = row.try_get(0)?;
    let through: i64 = row.try_get(1)?;
    Ok((deleted.unsigned_abs(), through.unsigned_abs()))
}

/// Phase 2, in one statement: takes `drafts.len()` positions from the counter row (and raises
/// `pruned_through`), appends the events at them, and gives each created customer its
/// creation position. Returns the position before the first.
async fn append(
    tx: &Transaction<'_>,
    drafts: &[Draft],
    pruned_through: u64,
) -> Result<u64, DbError> {
    let count = i64::try_from(drafts.len()).unwrap_or(i64::MAX);
    let mut offsets = Vec::with_capacity(drafts.len());
    let mut event_ids = Vec::with_capacity(drafts.len());
    let mut kinds = Vec::with_capacity(drafts.len());
    let mut customer_ids = Vec::with_capacity(drafts.len());
    let mut names = Vec::with_capacity(drafts.len());
    let mut emails = Vec::with_capacity(drafts.len());
    let mut create_times = Vec::with_capacity(drafts.len());
    let mut update_times = Vec::with_capacity(drafts.len());
    let mut versions = Vec::with_capacity(drafts.len());
    let mut commit_times = Vec::with_capacity(drafts.len());
    let mut created_ids = Vec::new();
    let mut created_offsets = Vec::new();
    for (offset, Draft { event, .. }) in (1i64..).zip(drafts) {
        offsets.push(offset);
        event_ids.push(event.event_id);
        kinds.push(event.kind.code());
        customer_ids.push(event.customer.id);
        names.push(event.customer.name.as_str());
        emails.push(event.customer.email.as_str());
        create_times.push(to_micros(event.customer.create_time));
        update_times.push(to_micros(event.customer.update_time));
        versions.push(event.customer.version);
        commit_times.push(to_micros(event.commit_time));
        if event.kind == EventType::Created {
            created_ids.push(event.customer.id);
            created_offsets.push(offset);
        }
    }
    let statement = tx
        .prepare_cached(
            "WITH log AS (
                 UPDATE crm.change_log
                 SET head = head + $1::BIGINT,
                     pruned_through = GREATEST(pruned_through, $2::BIGINT)
                 WHERE id = 1
                 RETURNING head - $1::BIGINT AS base
             ), appended AS (
                 INSERT INTO crm.customer_events (seq, event_id, event_type, customer_id, name,
                     email, create_time, update_time, version, commit_time)
                 SELECT log.base + e.n, e.event_id, e.event_type, e.customer_id, e.name,
                     e.email, e.create_time, e.update_time, e.version, e.commit_time
                 FROM log, UNNEST($3::BIGINT[], $4::UUID[], $5::BIGINT[], $6::UUID[],
                     $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[],
                     $12::BIGINT[])
                     AS e(n, event_id, event_type, customer_id, name, email, create_time,
                          update_time, version, commit_time)
             ), created AS (
                 UPDATE crm.customers AS c SET created_seq = log.base + u.n
                 FROM log, UNNEST($13::UUID[], $14::BIGINT[]) AS u(id, n)
                 WHERE c.id = u.id
             )
             SELECT base FROM log",
        )
        .await?;
    let row = tx
        .query_opt(
            &statement,
            &[
                &count,
                &sql_seq(pruned_through),
                &offsets,
                &event_ids,
                &kinds,
                &customer_ids,
                &names,
                &emails,
                &create_times,
                &update_times,
                &versions,
                &commit_times,
                &created_ids,
                &created_offsets,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Err(DbError::Other {
            database: "PostgreSQL".into(),
            reason: "crm.change_log has no row; the schema is damaged".into(),
        });
    };
    let base: i64 = row.try_get(0)?;
    Ok(base.unsigned_abs())
}

async fn find_customer(
    client: &impl GenericClient,
    id: Uuid,
    for_update: bool,
) -> Result<Option<Customer>, DbError> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let statement = client
        .prepare_cached(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM crm.customers WHERE id = $1{lock}"
        ))
        .await?;
    match client.query_opt(&statement, &[&id]).await? {
        Some(row) => Ok(Some(customer_from_row(&row)?)),
        None => Ok(None),
    }
}

fn customer_from_row(row: &Row) -> Result<Customer, tokio_postgres::Error> {
    Ok(Customer {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        email: row.try_get(2)?,
        create_time: from_micros(row.try_get(3)?),
        update_time: from_micros(row.try_get(4)?),
        version: row.try_get(5)?,
    })
}

fn event_from_row(row: &Row) -> Result<Arc<CustomerEvent>, DbError> {
    let code: i64 = row.try_get(2)?;
    let kind = EventType::from_code(code).ok_or_else(|| DbError::Other {
        database: "PostgreSQL".into(),
        reason: format!("crm.customer_events has unknown event type {code}"),
    })?;
    let seq: i64 = row.try_get(0)?;
    Ok(Arc::new(CustomerEvent {
        seq: seq.unsigned_abs(),
        event_id: row.try_get(1)?,
        kind,
        customer: Customer {
            id: row.try_get(3)?,
            name: row.try_get(4)?,
            email: row.try_get(5)?,
            create_time: from_micros(row.try_get(6)?),
            update_time: from_micros(row.try_get(7)?),
            version: row.try_get(8)?,
        },
        commit_time: from_micros(row.try_get(9)?),
        rendered: Rendered::default(),
    }))
}

async fn read_bounds(client: &impl GenericClient) -> Result<LogBounds, DbError> {
    let statement = client
        .prepare_cached("SELECT log_id, head, pruned_through FROM crm.change_log WHERE id = 1")
        .await?;
    let row = client.query_one(&statement, &[]).await?;
    Ok(LogBounds {
        log_id: row.try_get::<_, i64>(0)?.unsigned_abs(),
        head: row.try_get::<_, i64>(1)?.unsigned_abs(),
        pruned_through: row.try_get::<_, i64>(2)?.unsigned_abs(),
    })
}

/// Events after `after` up to `through`, at most `limit`, in order.
async fn read_events(
    client: &impl GenericClient,
    after: u64,
    through: u64,
    limit: i64,
) -> Result<Vec<Arc<CustomerEvent>>, DbError> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM crm.customer_events
             WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
        ))
        .await?;
    client
        .query(&statement, &[&sql_seq(after), &sql_seq(through), &limit])
        .await?
        .iter()
        .map(event_from_row)
        .collect()
}

/// What the tail needs besides the pool and the feed.
struct Tail {
    /// How often to read the log back with no reason to: `--feed-poll-interval`.
    period: Duration,
    /// Where to report whether the database answers.
    health: watch::Sender<bool>,
    /// Where to record that the database lost commits.
    diverged: Arc<std::sync::OnceLock<Error>>,
}

impl Tail {
    /// Fills the feed from the database: when it has a gap (a commit whose answer was lost, or
    /// a group answered ahead of the one before it), when a reader waits past its head, and
    /// every `period` for what other processes committed.
    async fn run(self, pg: Pg, feed: Arc<Feed>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = feed.fell_behind() => {
                    tokio::select! {
                        () = tokio::time::sleep(GAP_GRACE) => {}
                        () = stop.cancelled() => return,
                    }
                }
                () = stop.cancelled() => return,
            }
            match catch_up(&pg, &feed).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("reading the CRM change log back again");
                    }
                    failing = false;
                    self.health
                        .send_if_modified(|up| !std::mem::replace(up, true));
                }
                Err(CatchUp::Diverged(error)) => {
                    // Stopping is the safe choice: new commits would take positions this
                    // process already handed out for other events, so a client resuming from
                    // one of its tokens would silently skip or repeat changes. Refusing every
                    // call (and NOT_SERVING) sends clients elsewhere or to an operator; a
                    // restart reads the log afresh, and the log's own id is what must change
                    // for every client to relist.
                    tracing::error!(error = %error, "CRM change log went backwards; stopping serving");
                    let _ = self.diverged.set(error);
                    self.health.send_replace(false);
                    return;
                }
                Err(CatchUp::Db(e)) => {
                    // Once per outage: writes report the same failure to their callers.
                    if !failing {
                        tracing::warn!(error = %e, "cannot read the CRM change log back; not serving until it answers");
                        failing = true;
                    }
                    self.health
                        .send_if_modified(|up| std::mem::replace(up, false));
                }
            }
        }
    }
}

/// Why the tail could not catch up.
enum CatchUp {
    /// The database did not answer.
    Db(DbError),
    /// The database's head is below the feed's.
    Diverged(Error),
}

impl From<DbError> for CatchUp {
    fn from(e: DbError) -> Self {
        CatchUp::Db(e)
    }
}

impl From<tokio_postgres::Error> for CatchUp {
    fn from(e: tokio_postgres::Error) -> Self {
        CatchUp::Db(e.into())
    }
}

/// Publishes every committed event after the feed's head.
async fn catch_up(pg: &Pg, feed: &Feed) -> Result<(), CatchUp> {
    let mut client = pg.client().await?;
    loop {
        // Read before the snapshot starts: everything published by then had committed by
        // then, so a snapshot below it means the database lost commits, not that this read
        // raced a write's answer.
        let served = feed.bounds().head;
        // One snapshot: the counter row and the events it counts agree.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let bounds = read_bounds(&tx).await?;
        if bounds.pruned_through > feed.bounds().pruned_through {
            feed.pruned(bounds.pruned_through);
        }
        let after = feed.bounds().head;
        if bounds.head < served {
            return Err(CatchUp::Diverged(Error::LogDiverged {
                served_head: served,
                database_head: bounds.head,
            }));
        }
        if bounds.head <= after {
            tx.commit().await?;
            return Ok(());
        }
        let events = read_events(&tx, after, bounds.head, TAIL_BATCH).await?;
        tx.commit().await?;
        let full = events.len() == usize::try_from(TAIL_BATCH).unwrap_or(usize::MAX);
        feed.publish(&events);
        if !full {
            return Ok(());
        }
    }
}

#[async_trait]
impl CrmStore for PgStore {
    async fn ready(&self) -> Result<(), Error> {
        self.state.ready().await?;
        Ok(())
    }

    async fn create_customer(&self, new: NewCustomer, now: SystemTime) -> Result<Customer, Error> {
        match self.write(Op::Create(vec![new], now)).await? {
            Outcome::Created(results) => results.into_iter().next().unwrap_or_else(|| {
                Err(Error::Storage(DbError::Other {
                    database: "PostgreSQL".into(),
                    reason: "a create gave no result".into(),
                }))
            }),
            other => Err(mismatch(&other)),
        }
    }

    async fn create_customers(
        &self,
        new: Vec<NewCustomer>,
        now: SystemTime,
    ) -> Result<Vec<Result<Customer, Error>>, Error> {
        match self.write(Op::Create(new, now)).await? {
            Outcome::Created(results) => Ok(results),
            other => Err(mismatch(&other)),
        }
    }

    async fn get_customer(&self, id: Uuid) -> Result<Customer, Error> {
        let client = self.connected()?.pg.client().await?;
        find_customer(&client, id, false)
            .await?
            .ok_or(Error::NotFound(id))
    }

    async fn update_customer(
        &self,
        id: Uuid,
        patch: CustomerPatch,
        now: SystemTime,
    ) -> Result<Customer, Error> {
        match self.write(Op::Update(id, patch, now)).await? {
            Outcome::Updated(result) => result,
            other => Err(mismatch(&other)),
        }
    }

    async fn delete_customer(&self, id: Uuid, now: SystemTime) -> Result<Position, Error> {
        match self.write(Op::Delete(id, now)).await? {
            Outcome::Deleted(result) => result,
            other => Err(mismatch(&other)),
        }
    }

    async fn list_customers(
        &self,
        after: u64,
        limit: usize,
        snapshot: Option<Position>,
    ) -> Result<CustomerPage, Error> {
        let connected = self.connected()?;
        let mut client = connected.pg.client().await?;
        // One snapshot: the head and the rows agree, so a watch from `snapshot` sees exactly
        // the changes the listing may have missed.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(DbError::from)?;
        let snapshot = match snapshot {
            Some(p) => p,
            None => Position(read_bounds(&tx).await?.head),
        };
        let statement = tx
            .prepare_cached(&format!(
                "SELECT {CUSTOMER_COLUMNS}, created_seq FROM crm.customers
                 WHERE created_seq > $1 AND created_seq <= $3 ORDER BY created_seq LIMIT $2"
            ))
            .await
            .map_err(DbError::from)?;
        let rows = tx
            .query(
                &statement,
                &[
                    &sql_seq(after),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                    // Customers created after the snapshot come through the watch from
                    // `snapshot` instead, so no customer is seen twice.
                    &sql_seq(snapshot.0),
                ],
            )
            .await
            .map_err(DbError::from)?;
        tx.commit().await.map_err(DbError::from)?;
        let mut last = None;
        let customers = rows
            .iter()
            .map(|row| {
                let created: i64 = row.try_get(6)?;
                last = Some(created.unsigned_abs());
                customer_from_row(row)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(DbError::from)?;
        let next_after = if customers.len() == limit { last } else { None };
        published(&connected.feed, snapshot).await?;
        Ok(CustomerPage {
            customers,
            next_after,
            snapshot,
        })
    }

    async fn events_after(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<Arc<CustomerEvent>>, Error> {
        let connected = self.connected()?;
        let published = match events_from_feed(&connected.feed, after, limit)? {
            Ok(events) => return Ok(events),
            Err(published) => published,
        };
        let mut client = connected.pg.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(DbError::from)?;
        let bounds = read_bounds(&tx).await?;
        if after.0 < bounds.pruned_through {
            return Err(Error::TokenExpired {
                position: after.0,
                pruned_through: bounds.pruned_through,
            });
        }
        // Only events already published to the feed: positions past its head are refused as
        // ahead of the log until they are published.
        let events = read_events(
            &tx,
            after.0,
            published,
            i64::try_from(limit).unwrap_or(i64::MAX),
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(events)
    }

    async fn prune_events(&self, cutoff: SystemTime) -> Result<u64, Error> {
        let Outcome::Pruned { deleted, through } = self.write(Op::Prune(cutoff)).await? else {
            return Err(Error::Storage(DbError::Other {
                database: "PostgreSQL".into(),
                reason: "a prune gave another write's answer".into(),
            }));
        };
        if through > 0 {
            self.connected()?.feed.pruned(through);
        }
        if deleted > 0 {
            tracing::info!(deleted, through, "retention deleted old change events");
        }
        Ok(deleted)
    }

    fn bounds(&self) -> Result<LogBounds, Error> {
        Ok(self.connected()?.feed.bounds())
    }

    fn subscribe(&self) -> Result<watch::Receiver<LogBounds>, Error> {
        Ok(self.connected()?.feed.subscribe())
    }

    async fn catch_up_to(&self, position: Position) -> Result<(), Error> {
        let connected = self.connected()?;
        let head = {
            let client = connected.pg.client().await?;
            read_bounds(&client).await?.head
        };
        if position.0 > head {
            return Err(Error::TokenAhead {
                position: position.0,
                head,
            });
        }
        // Committed, so the tail (woken by the wait) publishes it within moments.
        published(&connected.feed, position).await
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }
}

/// A write answered with another kind of write's outcome: a bug in the batch.
fn mismatch(outcome: &Outcome) -> Error {
    Error::Storage(DbError::Other {
        database: "PostgreSQL".into(),
        reason: format!("a write got another write's answer: {outcome:?}"),
    })
}
