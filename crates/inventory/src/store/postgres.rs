//! The PostgreSQL store: schema `inventory`, writes group-committed through
//! [`mip_runtime::postgres::Writer`], reads on pooled connections.
//!
//! Several Inventory processes may write to one database, so every rule is held by the
//! database, not by this process:
//!
//! - **Idempotency**: `request_id` is unique. Creates insert with `ON CONFLICT (request_id)
//!   DO NOTHING`, which never raises (a raised error would abort the transaction and with it
//!   every write of the group), and a request id that is taken is answered from the stored row:
//!   the original when the fingerprints match, [`Error::RequestIdReused`] when not.
//! - **Order**: `seq` comes from the counter row, bumped right before the insert. Every
//!   inserting transaction holds that row lock until it commits, so positions are handed out
//!   in commit order, without gaps.
//! - **Life cycle**: a status move checks the row as locked (`SELECT ... FOR UPDATE`), so two
//!   processes cannot both make a move that is only legal from the state the other one left.
//!
//! A group runs its status moves first, then its creates: row locks (taken in id order) come
//! before the counter lock in every transaction, so two groups never wait for each other in a
//! circle. The writes of a group were all waiting at once, so any order among them is one their
//! callers could have seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use mip_runtime::CancellationToken;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::postgres::{Batch, Connecting, Pg, PgOptions, Writer};
use mip_runtime::store::DbError;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{InventoryStore, fetch_for, page_of, to_i64};
use crate::domain::{
    Created, NewPackageRequest, PackageRequest, PackageRequestPage, PackageStatus, StatusChange,
};
use crate::error::Error;

/// The schema Inventory's tables live in.
pub const SCHEMA: &str = "inventory";

/// Versioned schema steps; the first is version 1. Never edit a released step: add one.
const MIGRATIONS: &[&str] = &["CREATE TABLE inventory.package_requests (
        id           UUID PRIMARY KEY,
        customer_id  UUID NOT NULL,
        package_type TEXT NOT NULL,
        status       BIGINT NOT NULL,
        create_time  BIGINT NOT NULL,
        update_time  BIGINT NOT NULL,
        request_id   UUID UNIQUE,
        fingerprint  TEXT,
        seq          BIGINT NOT NULL UNIQUE
    );
    CREATE INDEX package_requests_customer_seq ON inventory.package_requests (customer_id, seq);
    CREATE TABLE inventory.counter (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        head BIGINT NOT NULL
    );
    INSERT INTO inventory.counter (id, head) VALUES (1, 0);"];

/// Group-commit writers per store: one runs its statements while the other waits for its
/// commit to be flushed.
const WRITERS: usize = 2;

/// Columns of a [`PackageRequest`], in the order [`package_request_from_row`] reads them.
const COLUMNS: &str = "id, customer_id, package_type, status, create_time, update_time, request_id";

/// What is usable once connected.
struct Connected {
    /// Pooled connections, for reads.
    pg: Pg,
    /// The group-commit writers.
    writer: Writer<Writes>,
}

/// The PostgreSQL store. Calls fail as UNAVAILABLE until it has connected and migrated.
#[derive(Clone)]
pub struct PostgresStore {
    /// The connection, made in the background.
    connecting: Arc<Connecting<Connected>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Starts connecting to the server `options` names (retrying until `shutdown` while it is
    /// unreachable) and bringing schema `inventory` up to date.
    pub fn connect(options: &PgOptions, shutdown: &CancellationToken) -> Self {
        let options = options.clone();
        let shutdown = shutdown.clone();
        let name = options.name().to_owned();
        let connecting = Connecting::spawn(&name, async move {
            let pg = Pg::connect(&options, SCHEMA, MIGRATIONS, &shutdown).await?;
            let writer = Writer::spawn(pg.clone(), Arc::new(Writes), WRITERS);
            Ok(Connected { pg, writer })
        });
        Self { connecting }
    }

    fn connected(&self) -> Result<&Connected, Error> {
        Ok(self.connecting.get()?)
    }

    async fn write(&self, op: Op) -> Result<Reply, Error> {
        Ok(self.connected()?.writer.write(op).await?)
    }
}

/// One queued write.
#[derive(Clone)]
enum Op {
    /// Creates, in order; a batch create is one op, so it is one commit.
    Create {
        /// The validated requests.
        new: Vec<NewPackageRequest>,
        /// Their create time.
        now: SystemTime,
    },
    /// A status move.
    UpdateStatus {
        /// The package request.
        id: Uuid,
        /// Where to move it.
        status: PackageStatus,
        /// Its update time, if it moves.
        now: SystemTime,
    },
}

/// The answer to an [`Op`].
enum Reply {
    /// One result per create, in order.
    Created(Vec<Result<Created, Error>>),
    /// The move's result.
    StatusChanged(Result<StatusChange, Error>),
}

/// Runs a group of [`Op`]s in one transaction.
struct Writes;

#[async_trait]
impl Batch for Writes {
    type Op = Op;
    type Reply = Reply;

    async fn run(&self, tx: &Transaction<'_>, ops: Vec<Op>) -> Result<Vec<Reply>, DbError> {
        let mut replies: Vec<Option<Reply>> = ops.iter().map(|_| None).collect();
        let mut moves = Vec::new();
        let mut creates = Vec::new();
        for (at, op) in ops.into_iter().enumerate() {
            match op {
                Op::UpdateStatus { id, status, now } => moves.push((at, id, status, now)),
                Op::Create { new, now } => creates.push((at, new, now)),
            }
        }
        for (at, reply) in update_statuses(tx, moves).await? {
            replies[at] = Some(Reply::StatusChanged(reply));
        }
        for (at, reply) in create_all(tx, creates).await? {
            replies[at] = Some(Reply::Created(reply));
        }
        replies
            .into_iter()
            .map(|reply| {
                reply.ok_or_else(|| DbError::Other {
                    database: SCHEMA.into(),
                    reason: "a write of the group was not answered".into(),
                })
            })
            .collect()
    }
}

/// Applies the status moves of a group, in order, against the rows as locked.
async fn update_statuses(
    tx: &Transaction<'_>,
    moves: Vec<(usize, Uuid, PackageStatus, SystemTime)>,
) -> Result<Vec<(usize, Result<StatusChange, Error>)>, DbError> {
    if moves.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<Uuid> = moves.iter().map(|(_, id, _, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    // Locked in id order, as every group locks them, so two groups moving the same packages
    // wait for each other instead of deadlocking.
    let lock = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM inventory.package_requests WHERE id = ANY($1)
             ORDER BY id FOR UPDATE"
        ))
        .await?;
    let mut current: HashMap<Uuid, PackageRequest> = HashMap::new();
    for row in tx.query(&lock, &[&ids]).await? {
        let request = package_request_from_row(&row)?;
        current.insert(request.id, request);
    }
    let mut changed: HashMap<Uuid, PackageRequest> = HashMap::new();
    let mut replies = Vec::with_capacity(moves.len());
    for (at, id, status, now) in moves {
        let reply = match current.get(&id) {
            None => Err(Error::NotFound(id)),
            Some(before) => match before.with_status(status, now) {
                Err(m) => Err(Error::IllegalMove {
                    id,
                    from: m.from,
                    to: m.to,
                }),
                Ok(after) => {
                    let previous = before.status;
                    if after != *before {
                        changed.insert(id, after.clone());
                        current.insert(id, after.clone());
                    }
                    Ok(StatusChange {
                        package_request: after,
                        previous,
                    })
                }
            },
        };
        replies.push((at, reply));
    }
    if !changed.is_empty() {
        let (mut ids, mut statuses, mut times) = (Vec::new(), Vec::new(), Vec::new());
        for (id, request) in changed {
            ids.push(id);
            statuses.push(request.status.code());
            times.push(to_micros(request.update_time));
        }
        let update = tx
            .prepare_cached(
                "UPDATE inventory.package_requests AS p
                 SET status = u.status, update_time = u.update_time
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS u (id, status, update_time)
                 WHERE p.id = u.id",
            )
            .await?;
        tx.execute(&update, &[&ids, &statuses, &times]).await?;
    }
    Ok(replies)
}

/// A stored row found by its request id: the package request and what it was created with.
struct Stored {
    /// The package request.
    request: PackageRequest,
    /// The parameters' fingerprint.
    fingerprint: Option<String>,
}

/// What one create of a group comes to.
enum Plan {
    /// Answered without a new row: a replay, or a request id reused.
    Done(Result<Created, Error>),
    /// A new row, the `n`th of those the group inserts.
    Insert(usize),
    /// A replay of the new row the `n`th insert of this group makes (the same request id
    /// earlier in the group, with the same parameters).
    ReplayOfInsert(usize),
}

/// Creates every package request of a group's create ops, set-based: one look-up of the
/// request ids, one bump of the counter, one insert.
async fn create_all(
    tx: &Transaction<'_>,
    creates: Vec<(usize, Vec<NewPackageRequest>, SystemTime)>,
) -> Result<Vec<(usize, Vec<Result<Created, Error>>)>, DbError> {
    if creates.is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<(usize, NewPackageRequest, SystemTime)> = creates
        .into_iter()
        .flat_map(|(at, new, now)| {
            // Stored to the microsecond: the create response then equals every later read.
            let now = from_micros(to_micros(now));
            new.into_iter().map(move |one| (at, one, now))
        })
        .collect();
    // The first attempt looks the request ids up before the counter is locked; should another
    // process commit one of them in between, its insert skips a row, and the attempt is undone
    // and made again under the lock, where no other insert can come between.
    let mut attempt = 0;
    let (plans, inserted) = loop {
        attempt += 1;
        let (plans, rows) = plan(tx, &items).await?;
        let inserted = insert(tx, &rows).await?;
        if inserted == rows.len() {
            break (plans, rows);
        }
        if attempt >= 2 {
            return Err(DbError::Other {
                database: SCHEMA.into(),
                reason: "a request id was taken while the counter row was locked".into(),
            });
        }
        undo(tx, &rows).await?;
    };
    let mut results: Vec<(usize, Vec<Result<Created, Error>>)> = Vec::new();
    for ((at, _, _), plan) in items.iter().zip(plans) {
        let result = match plan {
            Plan::Done(result) => result,
            Plan::Insert(n) => Ok(Created {
                package_request: inserted[n].0.clone(),
                replayed: false,
            }),
            Plan::ReplayOfInsert(n) => Ok(Created {
                package_request: inserted[n].0.clone(),
                replayed: true,
            }),
        };
        match results.last_mut() {
            Some((last, answers)) if last == at => answers.push(result),
            _ => results.push((*at, vec![result])),
        }
    }
    Ok(results)
}

/// A row to insert: the package request, its fingerprint (with a request id) and position.
type NewRow = (PackageRequest, Option<String>, i64);

/// Decides each create of the group against the stored request ids, and numbers the new rows
/// from the counter.
async fn plan(
    tx: &Transaction<'_>,
    items: &[(usize, NewPackageRequest, SystemTime)],
) -> Result<(Vec<Plan>, Vec<NewRow>), DbError> {
    let request_ids: Vec<Uuid> = items.iter().filter_map(|(_, n, _)| n.request_id).collect();
    let mut stored: HashMap<Uuid, Stored> = HashMap::new();
    if !request_ids.is_empty() {
        let find = tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, fingerprint FROM inventory.package_requests
                 WHERE request_id = ANY($1)"
            ))
            .await?;
        for row in tx.query(&find, &[&request_ids]).await? {
            let request = package_request_from_row(&row)?;
            let fingerprint: Option<String> = row.try_get(7)?;
            if let Some(request_id) = request.request_id {
                stored.insert(
                    request_id,
                    Stored {
                        request,
                        fingerprint,
                    },
                );
            }
        }
    }
    // Request ids this group inserts: which new row, and with what fingerprint.
    let mut new_here: HashMap<Uuid, (usize, String)> = HashMap::new();
    let mut plans = Vec::with_capacity(items.len());
    let mut rows: Vec<(PackageRequest, Option<String>)> = Vec::new();
    for (_, new, now) in items {
        let fingerprint = new.fingerprint();
        let plan = match new.request_id {
            Some(request_id) => {
                if let Some(found) = stored.get(&request_id) {
                    if found.fingerprint.as_deref() == Some(fingerprint.as_str()) {
                        Plan::Done(Ok(Created {
                            package_request: found.request.clone(),
                            replayed: true,
                        }))
                    } else {
                        Plan::Done(Err(Error::RequestIdReused(request_id)))
                    }
                } else if let Some((n, first)) = new_here.get(&request_id) {
                    if *first == fingerprint {
                        Plan::ReplayOfInsert(*n)
                    } else {
                        Plan::Done(Err(Error::RequestIdReused(request_id)))
                    }
                } else {
                    new_here.insert(request_id, (rows.len(), fingerprint.clone()));
                    rows.push((pending(new, *now), Some(fingerprint)));
                    Plan::Insert(rows.len() - 1)
                }
            }
            None => {
                rows.push((pending(new, *now), None));
                Plan::Insert(rows.len() - 1)
            }
        };
        plans.push(plan);
    }
    if rows.is_empty() {
        return Ok((plans, Vec::new()));
    }
    // Taken late, right before the insert, so the lock is held for as short a time as the
    // transaction allows; it is held until commit, which orders the positions by commit.
    let bump = tx
        .prepare_cached("UPDATE inventory.counter SET head = head + $1 WHERE id = 1 RETURNING head")
        .await?;
    let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    let head: i64 = tx.query_one(&bump, &[&count]).await?.try_get(0)?;
    let first = head - count + 1;
    let numbered = rows
        .into_iter()
        .zip(first..)
        .map(|((request, fingerprint), seq)| (request, fingerprint, seq))
        .collect();
    Ok((plans, numbered))
}

/// A new PENDING package request for `new`, created at `now`.
fn pending(new: &NewPackageRequest, now: SystemTime) -> PackageRequest {
    PackageRequest {
        id: Uuid::now_v7(),
        customer_id: new.customer_id,
        package_type: new.package_type.as_str().to_owned(),
        status: PackageStatus::Pending,
        create_time: now,
        update_time: now,
        request_id: new.request_id,
    }
}

/// Inserts `rows` in one statement; returns how many were inserted (fewer when a request id
/// turned out to be taken).
async fn insert(tx: &Transaction<'_>, rows: &[NewRow]) -> Result<usize, DbError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut columns = InsertColumns::default();
    for (request, fingerprint, seq) in rows {
        columns.id.push(request.id);
        columns.customer_id.push(request.customer_id);
        columns.package_type.push(request.package_type.clone());
        columns.status.push(request.status.code());
        columns.create_time.push(to_micros(request.create_time));
        columns.update_time.push(to_micros(request.update_time));
        columns.request_id.push(request.request_id);
        columns.fingerprint.push(fingerprint.clone());
        columns.seq.push(*seq);
    }
    let statement = tx
        .prepare_cached(
            "INSERT INTO inventory.package_requests
                (id, customer_id, package_type, status, create_time, update_time,
                 request_id, fingerprint, seq)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::bigint[],
                                  $5::bigint[], $6::bigint[], $7::uuid[], $8::text[],
                                  $9::bigint[])
             ON CONFLICT (request_id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &statement,
            &[
                &columns.id,
                &columns.customer_id,
                &columns.package_type,
                &columns.status,
                &columns.create_time,
                &columns.update_time,
                &columns.request_id,
                &columns.fingerprint,
                &columns.seq,
            ],
        )
        .await?;
    Ok(usize::try_from(inserted).unwrap_or(usize::MAX))
}

/// The insert's columns, one array each, for `UNNEST`.
#[derive(Default)]
struct InsertColumns {
    /// `id`.
    id: Vec<Uuid>,
    /// `customer_id`.
    customer_id: Vec<Uuid>,
    /// `package_type`.
    package_type: Vec<String>,
    /// `status` codes.
    status: Vec<i64>,
    /// `create_time`, in microseconds.
    create_time: Vec<i64>,
    /// `update_time`, in microseconds.
    update_time: Vec<i64>,
    /// `request_id`, NULL without one.
    request_id: Vec<Option<Uuid>>,
    /// `fingerprint`, NULL without a request id.
    fingerprint: Vec<Option<String>>,
    /// `seq`.
    seq: Vec<i64>,
}

/// Takes back an attempt that lost a request id race: its rows, and its positions (the counter
/// is still locked by this transaction, so they are the last ones handed out).
async fn undo(tx: &Transaction<'_>, rows: &[NewRow]) -> Result<(), DbError> {
    let ids: Vec<Uuid> = rows.iter().map(|(request, _, _)| request.id).collect();
    let delete = tx
        .prepare_cached("DELETE FROM inventory.package_requests WHERE id = ANY($1)")
        .await?;
    tx.execute(&delete, &[&ids]).await?;
    let give_back = tx
        .prepare_cached("UPDATE inventory.counter SET head = head - $1 WHERE id = 1")
        .await?;
    let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    tx.execute(&give_back, &[&count]).await?;
    Ok(())
}

fn package_request_from_row(row: &Row) -> Result<PackageRequest, DbError> {
    let code: i64 = row.try_get(3)?;
    Ok(PackageRequest {
        id: row.try_get(0)?,
        customer_id: row.try_get(1)?,
        package_type: row.try_get(2)?,
        status: PackageStatus::from_code(code).ok_or_else(|| DbError::Other {
            database: SCHEMA.into(),
            reason: format!("unknown package status code {code}"),
        })?,
        create_time: from_micros(row.try_get(4)?),
        update_time: from_micros(row.try_get(5)?),
        request_id: row.try_get(6)?,
    })
}

fn row_with_seq(row: &Row) -> Result<(PackageRequest, u64), DbError> {
    let seq: i64 = row.try_get(7)?;
    Ok((package_request_from_row(row)?, seq.unsigned_abs()))
}

/// An answer of the wrong kind: a bug in this module, never a client's doing.
fn mismatched() -> Error {
    Error::Storage(DbError::Other {
        database: SCHEMA.into(),
        reason: "the writer answered a write with another kind of reply".into(),
    })
}

#[async_trait]
impl InventoryStore for PostgresStore {
    async fn ready(&self) -> Result<(), Error> {
        self.connecting.ready().await?;
        Ok(())
    }

    async fn create_package_request(
        &self,
        new: NewPackageRequest,
        now: SystemTime,
    ) -> Result<Created, Error> {
        match self
            .write(Op::Create {
                new: vec![new],
                now,
            })
            .await?
        {
            Reply::Created(results) => results.into_iter().next().ok_or_else(mismatched)?,
            Reply::StatusChanged(_) => Err(mismatched()),
        }
    }

    async fn create_package_requests(
        &self,
        new: Vec<NewPackageRequest>,
        now: SystemTime,
    ) -> Result<Vec<Result<Created, Error>>, Error> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        match self.write(Op::Create { new, now }).await? {
            Reply::Created(results) => Ok(results),
            Reply::StatusChanged(_) => Err(mismatched()),
        }
    }

    async fn get_package_request(&self, id: Uuid) -> Result<PackageRequest, Error> {
        let client = self.connected()?.pg.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM inventory.package_requests WHERE id = $1"
            ))
            .await
            .map_err(DbError::from)?;
        let row = client
            .query_opt(&statement, &[&id])
            .await
            .map_err(DbError::from)?;
        match row {
            Some(row) => Ok(package_request_from_row(&row)?),
            None => Err(Error::NotFound(id)),
        }
    }

    async fn list_package_requests(
        &self,
        customer_id: Option<Uuid>,
        after: u64,
        limit: usize,
    ) -> Result<PackageRequestPage, Error> {
        let client = self.connected()?.pg.client().await?;
        let fetch = fetch_for(limit);
        let after = to_i64(after);
        // Two statements rather than `($1 IS NULL OR customer_id = $1)`, which PostgreSQL
        // cannot type and cannot serve from the (customer_id, seq) index.
        let rows = match customer_id {
            Some(customer_id) => {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS}, seq FROM inventory.package_requests
                         WHERE customer_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                    ))
                    .await
                    .map_err(DbError::from)?;
                client
                    .query(&statement, &[&customer_id, &after, &fetch])
                    .await
            }
            None => {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS}, seq FROM inventory.package_requests
                         WHERE seq > $1 ORDER BY seq LIMIT $2"
                    ))
                    .await
                    .map_err(DbError::from)?;
                client.query(&statement, &[&after, &fetch]).await
            }
        }
        .map_err(DbError::from)?;
        let rows = rows
            .iter()
            .map(row_with_seq)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page_of(rows, limit))
    }

    async fn update_status(
        &self,
        id: Uuid,
        status: PackageStatus,
        now: SystemTime,
    ) -> Result<StatusChange, Error> {
        let now = from_micros(to_micros(now));
        match self.write(Op::UpdateStatus { id, status, now }).await? {
            Reply::StatusChanged(result) => result,
            Reply::Created(_) => Err(mismatched()),
        }
    }
}
