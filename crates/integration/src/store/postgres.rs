//! The PostgreSQL store: partitions, workers and dead letters in schema `integration`, so
//! several integration workers can share one database and split the feed.
//!
//! Every write is one autocommit statement on a pooled connection: there are few of them (a
//! checkpoint every 100 ms at most, a lease round every `--lease-ttl`/3, a dead letter now and
//! then), so grouping them would buy nothing. What must hold with several writers holds in the
//! data: a lease changes hands only by bumping its epoch, and a checkpoint is written only
//! with the epoch it was taken at (`owner = me AND epoch = mine`), so a worker that lost a
//! lease cannot write over its successor's checkpoint; lease times are the server's `now()`,
//! so workers' clocks need not agree; one dead letter per event (a unique `event_id`, upserted
//! so that attempts from every service add up).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::postgres::{Connecting, Pg, PgOptions};

use super::{DeadLetter, IntegrationStore, Lease, Move, Worker};
use crate::deliver::Action;
use crate::error::Error;
use crate::tracker::Mark;

/// The schema the tables live in.
pub const SCHEMA: &str = "integration";

/// The schema's history, one step per version (applied by [`Pg::connect`] under an advisory
/// lock). Steps are never edited once released, only added.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE integration.checkpoint (
        id          BIGINT PRIMARY KEY CHECK (id = 1),
        token       TEXT NOT NULL,
        sequence    BIGINT NOT NULL,
        update_time TIMESTAMPTZ NOT NULL
    );
    -- The identity gives the listing order, the order letters were first added. Ids taken by
    -- transactions that committed later may show up behind a page already read; the next
    -- listing from the start shows them.
    CREATE TABLE integration.dead_letters (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id    TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL,
        reason      TEXT NOT NULL,
        attempts    BIGINT NOT NULL,
        create_time TIMESTAMPTZ NOT NULL,
        update_time TIMESTAMPTZ NOT NULL
    );",
    // One checkpoint per partition of the feed, each behind a lease with a fencing epoch (see
    // crate::lease); the single checkpoint goes.
    "DROP TABLE integration.checkpoint;
    CREATE TABLE integration.cluster (
        id              BIGINT PRIMARY KEY CHECK (id = 1),
        partition_count INT NOT NULL
    );
    CREATE TABLE integration.partitions (
        partition_id      INT PRIMARY KEY,
        owner             TEXT,
        epoch             BIGINT NOT NULL DEFAULT 0,
        lease_expire_time TIMESTAMPTZ,
        token             TEXT,
        sequence          BIGINT,
        update_time       TIMESTAMPTZ
    );
    CREATE TABLE integration.workers (
        worker_id      TEXT PRIMARY KEY,
        last_heartbeat TIMESTAMPTZ NOT NULL
    );",
    // One start position for the whole cluster (`--start-position latest`).
    "ALTER TABLE integration.cluster ADD COLUMN start_token TEXT,
        ADD COLUMN start_sequence BIGINT;",
    // Deleted customers' packages are cancelled through the same dead-letter list: a letter
    // says which it was, so a re-drive does the same. Every earlier letter was a create.
    "ALTER TABLE integration.dead_letters ADD COLUMN action TEXT NOT NULL DEFAULT 'create'
        CHECK (action IN ('create', 'cancel'));",
];

/// The PostgreSQL store; usable once connected (calls before fail as UNAVAILABLE).
#[derive(Debug, Clone)]
pub struct PgStore {
    /// The pool, once connected and migrated.
    pg: Arc<Connecting<Pg>>,
}

impl PgStore {
    /// Starts connecting in the background, retrying until the server answers or `shutdown`.
    pub fn connect(options: &PgOptions, shutdown: &CancellationToken) -> Self {
        let (owned, shutdown) = (options.clone(), shutdown.clone());
        Self {
            pg: Connecting::spawn(options.name(), async move {
                Pg::connect(&owned, SCHEMA, MIGRATIONS, &shutdown).await
            }),
        }
    }

    /// A pooled connection and the pool, for one statement.
    async fn client(&self) -> Result<(&Pg, deadpool_postgres::Object), Error> {
        let pg = self.pg.get()?;
        Ok((pg, pg.client().await?))
    }
}

#[async_trait]
impl IntegrationStore for PgStore {
    async fn ready(&self) -> Result<(), Error> {
        self.pg.ready().await?;
        Ok(())
    }

    async fn init_partitions(&self, count: u32) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        let requested = i32::try_from(count).unwrap_or(i32::MAX);
        // The first start records its count; every later one compares with it. The no-op
        // update makes the statement return the row that won even when a racing first start
        // committed it after this statement's snapshot (a DO NOTHING would return nothing, and
        // a read of the table in the same statement would not see it).
        let recorded: i32 = client
            .query_one(
                "INSERT INTO integration.cluster (id, partition_count) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET partition_count = integration.cluster.partition_count
                 RETURNING partition_count",
                &[&requested],
            )
            .await
            .map_err(|e| pg.error(&e))?
            .get(0);
        if recorded != requested {
            return Err(Error::PartitionCountChanged {
                recorded: recorded.unsigned_abs(),
                requested: count,
            });
        }
        client
            .execute(
                "INSERT INTO integration.partitions (partition_id)
                 SELECT generate_series(0, $1 - 1) ON CONFLICT (partition_id) DO NOTHING",
                &[&requested],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn heartbeat(&self, worker: &str, _now: SystemTime) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO integration.workers (worker_id, last_heartbeat) VALUES ($1, now())
                 ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        client
            .execute(&statement, &[&worker])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn renew(
        &self,
        worker: &str,
        leases: &[(u32, i64)],
        ttl: Duration,
        _now: SystemTime,
    ) -> Result<Vec<(u32, SystemTime)>, Error> {
        let (pg, client) = self.client().await?;
        let (partitions, epochs) = split(leases);
        let statement = client
            .prepare_cached(
                "UPDATE integration.partitions p
                 SET lease_expire_time = now() + make_interval(secs => $4)
                 FROM unnest($2::int[], $3::bigint[]) AS mine(partition_id, epoch)
                 WHERE p.partition_id = mine.partition_id AND p.epoch = mine.epoch
                 AND p.owner = $1
                 RETURNING p.partition_id, p.lease_expire_time",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let rows = client
            .query(
                &statement,
                &[&worker, &partitions, &epochs, &ttl.as_secs_f64()],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<_, i32>(0).unsigned_abs(), r.get(1)))
            .collect())
    }

    async fn live_workers(&self, ttl: Duration, _now: SystemTime) -> Result<Vec<Worker>, Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT w.worker_id, w.last_heartbeat, COUNT(p.partition_id)
                 FROM integration.workers w
                 LEFT JOIN integration.partitions p
                   ON p.owner = w.worker_id AND p.lease_expire_time > now()
                 WHERE w.last_heartbeat > now() - make_interval(secs => $1)
                 GROUP BY w.worker_id, w.last_heartbeat ORDER BY w.worker_id",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let rows = client
            .query(&statement, &[&ttl.as_secs_f64()])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(rows
            .into_iter()
            .map(|r| Worker {
                worker_id: r.get(0),
                last_heartbeat: r.get(1),
                partitions: u32::try_from(r.get::<_, i64>(2)).unwrap_or(u32::MAX),
            })
            .collect())
    }

    async fn reclaim(
        &self,
        worker: &str,
        ttl: Duration,
        _now: SystemTime,
    ) -> Result<Vec<Lease>, Error> {
        let (pg, client) = self.client().await?;
        let rows = client
            .query(
                "UPDATE integration.partitions
                 SET epoch = epoch + 1, lease_expire_time = now() + make_interval(secs => $2)
                 WHERE owner = $1
                 RETURNING partition_id, epoch, lease_expire_time, token, sequence",
                &[&worker, &ttl.as_secs_f64()],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let mut taken: Vec<Lease> = rows.into_iter().map(|r| lease(&r)).collect();
        taken.sort_by_key(|l| l.partition);
        Ok(taken)
    }

    async fn acquire(
        &self,
        worker: &str,
        max: u32,
        ttl: Duration,
        _now: SystemTime,
    ) -> Result<Vec<Lease>, Error> {
        let (pg, client) = self.client().await?;
        // SKIP LOCKED: two workers taking at once each get different partitions instead of
        // queueing on the same rows.
        let statement = client
            .prepare_cached(
                "WITH free AS (
                     SELECT partition_id FROM integration.partitions
                     WHERE owner IS NULL OR lease_expire_time <= now()
                     ORDER BY partition_id LIMIT $2 FOR UPDATE SKIP LOCKED)
                 UPDATE integration.partitions p
                 SET owner = $1, epoch = p.epoch + 1,
                     lease_expire_time = now() + make_interval(secs => $3)
                 FROM free WHERE p.partition_id = free.partition_id
                 RETURNING p.partition_id, p.epoch, p.lease_expire_time, p.token, p.sequence",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let rows = client
            .query(&statement, &[&worker, &i64::from(max), &ttl.as_secs_f64()])
            .await
            .map_err(|e| pg.error(&e))?;
        let mut taken: Vec<Lease> = rows.into_iter().map(|r| lease(&r)).collect();
        taken.sort_by_key(|l| l.partition);
        Ok(taken)
    }

    async fn release(&self, worker: &str, leases: &[(u32, i64)]) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        let (partitions, epochs) = split(leases);
        let statement = client
            .prepare_cached(
                "UPDATE integration.partitions p SET owner = NULL, lease_expire_time = NULL
                 FROM unnest($2::int[], $3::bigint[]) AS mine(partition_id, epoch)
                 WHERE p.partition_id = mine.partition_id AND p.epoch = mine.epoch
                 AND p.owner = $1",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        client
            .execute(&statement, &[&worker, &partitions, &epochs])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn retire(&self, worker: &str, leases: &[(u32, i64)]) -> Result<(), Error> {
        self.release(worker, leases).await?;
        let (pg, client) = self.client().await?;
        client
            .execute(
                "DELETE FROM integration.workers WHERE worker_id = $1
                 AND NOT EXISTS (SELECT 1 FROM integration.partitions WHERE owner = $1)",
                &[&worker],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn save_checkpoints(
        &self,
        worker: &str,
        leases: &[(u32, i64)],
        mark: &Mark,
        how: Move,
        now: SystemTime,
    ) -> Result<Vec<u32>, Error> {
        let (pg, client) = self.client().await?;
        let (partitions, epochs) = split(leases);
        let replace = how == Move::Replace;
        // One statement for every partition: the write lands only where the lease is still
        // this worker's at this epoch; the partitions it refused because the lease moved on
        // are told apart from those already at or past the mark. The rows are locked first
        // (`FOR UPDATE` waits for a takeover in flight and then reads the committed lease),
        // so the write and the refusals are decided on the same, current lease: read from
        // the statement's snapshot instead, a takeover that commits while the write waits
        // would be refused by the UPDATE but not reported, and the stale worker would go on
        // believing it holds the partition.
        let statement = client
            .prepare_cached(
                "WITH mine AS (
                     SELECT * FROM unnest($2::int[], $3::bigint[]) AS m(partition_id, epoch)),
                 lease AS (
                     SELECT p.partition_id, p.owner, p.epoch, p.sequence
                     FROM integration.partitions p JOIN mine USING (partition_id)
                     FOR UPDATE OF p),
                 written AS (
                     UPDATE integration.partitions p
                     SET token = $4, sequence = $5, update_time = $6
                     FROM mine JOIN lease USING (partition_id)
                     WHERE p.partition_id = mine.partition_id
                     AND lease.owner = $1 AND lease.epoch = mine.epoch
                     AND (lease.sequence IS NULL OR lease.sequence < $5 OR $7)
                     RETURNING p.partition_id)
                 SELECT mine.partition_id FROM mine JOIN lease USING (partition_id)
                 WHERE (lease.owner IS DISTINCT FROM $1 OR lease.epoch <> mine.epoch)",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let rows = client
            .query(
                &statement,
                &[
                    &worker,
                    &partitions,
                    &epochs,
                    &mark.token,
                    &mark.sequence,
                    &now,
                    &replace,
                ],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(rows
            .into_iter()
            .map(|r| r.get::<_, i32>(0).unsigned_abs())
            .collect())
    }

    async fn start_mark(&self, head: &Mark) -> Result<Mark, Error> {
        let (pg, client) = self.client().await?;
        // A racing worker's UPDATE waits for this row and then re-reads it, so every worker
        // gets back the mark that was recorded first.
        let row = client
            .query_one(
                "UPDATE integration.cluster
                 SET start_token = COALESCE(start_token, $1),
                     start_sequence = COALESCE(start_sequence, $2)
                 WHERE id = 1 RETURNING start_token, start_sequence",
                &[&head.token, &head.sequence],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(Mark {
            token: row.get(0),
            sequence: row.get(1),
        })
    }

    async fn checkpoints(&self) -> Result<Vec<(u32, Option<Mark>)>, Error> {
        let (pg, client) = self.client().await?;
        let rows = client
            .query(
                "SELECT partition_id, token, sequence FROM integration.partitions
                 ORDER BY partition_id",
                &[],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0).unsigned_abs(),
                    r.get::<_, Option<String>>(1)
                        .zip(r.get::<_, Option<i64>>(2))
                        .map(|(token, sequence)| Mark { sequence, token }),
                )
            })
            .collect())
    }

    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        // One statement, so two services dead-lettering the same event at once both count:
        // the second waits for the first's row lock, then adds to what it committed.
        let statement = client
            .prepare_cached(
                "INSERT INTO integration.dead_letters AS d (event_id, customer_id, reason,
                 attempts, create_time, update_time, action) VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason,
                 attempts = d.attempts + excluded.attempts, update_time = excluded.update_time",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        client
            .execute(
                &statement,
                &[
                    &letter.event_id,
                    &letter.customer_id,
                    &letter.reason,
                    &i64::from(letter.attempts),
                    &letter.create_time,
                    &letter.update_time,
                    &letter.action.as_str(),
                ],
            )
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn dead_letters(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, DeadLetter)>, Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, event_id, customer_id, reason, attempts, create_time, update_time,
                 action FROM integration.dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&after, &limit])
            .await
            .map_err(|e| pg.error(&e))?;
        rows.into_iter()
            .map(|r| {
                let name: String = r.get(7);
                // A name this build does not know fails the read rather than re-drive a letter
                // as something it is not.
                let action = Action::parse(&name).ok_or_else(|| {
                    Error::Storage(mip_runtime::store::DbError::Other {
                        database: pg.name().to_owned(),
                        reason: format!("unknown dead-letter action {name:?}"),
                    })
                })?;
                Ok((
                    r.get(0),
                    DeadLetter {
                        event_id: r.get(1),
                        customer_id: r.get(2),
                        action,
                        reason: r.get(3),
                        attempts: u32::try_from(r.get::<_, i64>(4)).unwrap_or(u32::MAX),
                        create_time: r.get(5),
                        update_time: r.get(6),
                    },
                ))
            })
            .collect()
    }

    async fn remove_dead_letter(&self, event_id: &str) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached("DELETE FROM integration.dead_letters WHERE event_id = $1")
            .await
            .map_err(|e| pg.error(&e))?;
        client
            .execute(&statement, &[&event_id])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn count_dead_letters(&self) -> Result<u64, Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached("SELECT COUNT(*) FROM integration.dead_letters")
            .await
            .map_err(|e| pg.error(&e))?;
        let n: i64 = client
            .query_one(&statement, &[])
            .await
            .map_err(|e| pg.error(&e))?
            .get(0);
        Ok(n.unsigned_abs())
    }
}

/// A lease from a row of (partition_id, epoch, lease_expire_time, token, sequence).
fn lease(row: &tokio_postgres::Row) -> Lease {
    Lease {
        partition: row.get::<_, i32>(0).unsigned_abs(),
        epoch: row.get(1),
        expire_time: row.get(2),
        checkpoint: row
            .get::<_, Option<String>>(3)
            .zip(row.get::<_, Option<i64>>(4))
            .map(|(token, sequence)| Mark { sequence, token }),
    }
}

/// Leases as the two arrays `unnest` pairs up again.
fn split(leases: &[(u32, i64)]) -> (Vec<i32>, Vec<i64>) {
    leases
        .iter()
        .map(|&(partition, epoch)| (i32::try_from(partition).unwrap_or(i32::MAX), epoch))
        .unzip()
}
