//! The embedded store: one SQLite database under the data directory, written through the
//! shared group-commit writer. Only one process opens it, so its one worker holds every
//! partition; the lease rules are the same as PostgreSQL's, on the injectable clock.

use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::sqlite::{Db, Durability};
use rusqlite::params;
use rusqlite_migration::{M, Migrations};

use super::{DeadLetter, IntegrationStore, Lease, Move, Worker};
use crate::deliver::Action;
use crate::error::Error;
use crate::tracker::Mark;

/// Database file name under the data directory.
pub const DB_FILE: &str = "integration.db";

/// The schema's history, one step per version. Steps are never edited once released, only
/// added.
const STEPS: [&str; 6] = [
    "CREATE TABLE checkpoint (
        id          BIGINT PRIMARY KEY CHECK (id = 1),
        token       TEXT NOT NULL,
        sequence    BIGINT NOT NULL,
        update_time BIGINT NOT NULL
    );
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY,
        event_id    TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL,
        reason      TEXT NOT NULL,
        attempts    BIGINT NOT NULL,
        create_time BIGINT NOT NULL,
        update_time BIGINT NOT NULL
    );",
    "CREATE TABLE request_ids (
        id               BIGINT PRIMARY KEY CHECK (id = 1),
        ordered_from_ms  BIGINT NOT NULL
    );",
    // Idempotency keys are a function of the customer id alone now: nothing local decides how
    // they are derived.
    "DROP TABLE request_ids;",
    // One checkpoint per partition of the feed, each behind a lease with a fencing epoch (see
    // crate::lease); the single checkpoint goes.
    "DROP TABLE checkpoint;
    CREATE TABLE cluster (
        id              BIGINT PRIMARY KEY CHECK (id = 1),
        partition_count BIGINT NOT NULL
    );
    CREATE TABLE partitions (
        partition_id      BIGINT PRIMARY KEY,
        owner             TEXT,
        epoch             BIGINT NOT NULL DEFAULT 0,
        lease_expire_time BIGINT,
        token             TEXT,
        sequence          BIGINT,
        update_time       BIGINT
    );
    CREATE TABLE workers (
        worker_id      TEXT PRIMARY KEY,
        last_heartbeat BIGINT NOT NULL
    );",
    // One start position for the whole cluster (`--start-position latest`).
    "ALTER TABLE cluster ADD COLUMN start_token TEXT;
    ALTER TABLE cluster ADD COLUMN start_sequence BIGINT;",
    // Deleted customers' packages are cancelled through the same dead-letter list: a letter
    // says which it was, so a re-drive does the same. Every earlier letter was a create.
    "ALTER TABLE dead_letters ADD COLUMN action TEXT NOT NULL DEFAULT 'create'
        CHECK (action IN ('create', 'cancel'));",
];

/// Records the start position unless one is; returns the recorded one (both backends).
const START_MARK: &str = "UPDATE cluster SET start_token = COALESCE(start_token, ?1),
     start_sequence = COALESCE(start_sequence, ?2) WHERE id = 1
     RETURNING start_token, start_sequence";

fn migrations() -> Migrations<'static> {
    Migrations::new(STEPS.iter().copied().map(M::up).collect())
}

/// The embedded store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The database.
    db: Db,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/integration.db`.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, Error> {
        Ok(Self {
            db: Db::open(dir, DB_FILE, &migrations(), durability)?,
        })
    }
}

#[async_trait]
impl IntegrationStore for SqliteStore {
    async fn ready(&self) -> Result<(), Error> {
        // Opening already migrated it.
        Ok(())
    }

    async fn init_partitions(&self, count: u32) -> Result<(), Error> {
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO cluster (id, partition_count) VALUES (1, ?1)
                     ON CONFLICT (id) DO NOTHING",
                )?
                .execute([i64::from(count)])?;
                let recorded: i64 = c
                    .prepare_cached("SELECT partition_count FROM cluster WHERE id = 1")?
                    .query_row([], |r| r.get(0))?;
                let recorded = u32::try_from(recorded).unwrap_or(u32::MAX);
                if recorded != count {
                    return Err(Error::PartitionCountChanged {
                        recorded,
                        requested: count,
                    });
                }
                let mut insert = c.prepare_cached(
                    "INSERT INTO partitions (partition_id) VALUES (?1)
                     ON CONFLICT (partition_id) DO NOTHING",
                )?;
                for partition in 0..count {
                    insert.execute([i64::from(partition)])?;
                }
                Ok(())
            })
            .await
    }

    async fn heartbeat(&self, worker: &str, now: SystemTime) -> Result<(), Error> {
        let worker = worker.to_owned();
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO workers (worker_id, last_heartbeat) VALUES (?1, ?2)
                     ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat",
                )?
                .execute(params![worker, to_micros(now)])?;
                Ok(())
            })
            .await
    }

    async fn renew(
        &self,
        worker: &str,
        leases: &[(u32, i64)],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<(u32, SystemTime)>, Error> {
        let (worker, leases) = (worker.to_owned(), leases.to_vec());
        let expire = now + ttl;
        self.db
            .write(move |c| {
                let mut update = c.prepare_cached(
                    "UPDATE partitions SET lease_expire_time = ?1
                     WHERE partition_id = ?2 AND owner = ?3 AND epoch = ?4",
                )?;
                let mut renewed = Vec::new();
                for (partition, epoch) in leases {
                    let rows = update.execute(params![
                        to_micros(expire),
                        i64::from(partition),
                        worker,
                        epoch
                    ])?;
                    if rows == 1 {
                        renewed.push((partition, expire));
                    }
                }
                Ok(renewed)
            })
            .await
    }

    async fn live_workers(&self, ttl: Duration, now: SystemTime) -> Result<Vec<Worker>, Error> {
        let since = to_micros(now.checked_sub(ttl).unwrap_or(SystemTime::UNIX_EPOCH));
        let now = to_micros(now);
        self.db
            .read(move |c| {
                let mut statement = c.prepare_cached(
                    "SELECT w.worker_id, w.last_heartbeat, COUNT(p.partition_id) FROM workers w
                     LEFT JOIN partitions p ON p.owner = w.worker_id AND p.lease_expire_time > ?2
                     WHERE w.last_heartbeat > ?1 GROUP BY w.worker_id, w.last_heartbeat
                     ORDER BY w.worker_id",
                )?;
                let rows = statement
                    .query_map(params![since, now], |r| {
                        Ok(Worker {
                            worker_id: r.get(0)?,
                            last_heartbeat: from_micros(r.get(1)?),
                            partitions: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn reclaim(
        &self,
        worker: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<Lease>, Error> {
        let worker = worker.to_owned();
        let expire = now + ttl;
        self.db
            .write(move |c| {
                let mut take = c.prepare_cached(
                    "UPDATE partitions SET epoch = epoch + 1, lease_expire_time = ?2
                     WHERE owner = ?1 RETURNING partition_id, epoch, token, sequence",
                )?;
                let mut taken = take
                    .query_map(params![worker, to_micros(expire)], |r| {
                        let token: Option<String> = r.get(2)?;
                        let sequence: Option<i64> = r.get(3)?;
                        Ok(Lease {
                            partition: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(u32::MAX),
                            epoch: r.get(1)?,
                            expire_time: expire,
                            checkpoint: token
                                .zip(sequence)
                                .map(|(token, sequence)| Mark { sequence, token }),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                taken.sort_by_key(|l| l.partition);
                Ok(taken)
            })
            .await
    }

    async fn acquire(
        &self,
        worker: &str,
        max: u32,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<Lease>, Error> {
        let worker = worker.to_owned();
        let expire = now + ttl;
        self.db
            .write(move |c| {
                // One writer: the read and the updates below are one transaction.
                let mut select = c.prepare_cached(
                    "SELECT partition_id FROM partitions
                     WHERE owner IS NULL OR lease_expire_time <= ?1
                     ORDER BY partition_id LIMIT ?2",
                )?;
                let free = select
                    .query_map(params![to_micros(now), i64::from(max)], |r| {
                        r.get::<_, i64>(0)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut take = c.prepare_cached(
                    "UPDATE partitions SET owner = ?1, epoch = epoch + 1, lease_expire_time = ?2
                     WHERE partition_id = ?3 RETURNING epoch, token, sequence",
                )?;
                let mut taken = Vec::new();
                for partition in free {
                    let (epoch, token, sequence) =
                        take.query_row(params![worker, to_micros(expire), partition], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, Option<String>>(1)?,
                                r.get::<_, Option<i64>>(2)?,
                            ))
                        })?;
                    taken.push(Lease {
                        partition: u32::try_from(partition).unwrap_or(u32::MAX),
                        epoch,
                        expire_time: expire,
                        checkpoint: token
                            .zip(sequence)
                            .map(|(token, sequence)| Mark { sequence, token }),
                    });
                }
                Ok(taken)
            })
            .await
    }

    async fn release(&self, worker: &str, leases: &[(u32, i64)]) -> Result<(), Error> {
        let (worker, leases) = (worker.to_owned(), leases.to_vec());
        self.db
            .write(move |c| {
                let mut update = c.prepare_cached(
                    "UPDATE partitions SET owner = NULL, lease_expire_time = NULL
                     WHERE partition_id = ?1 AND owner = ?2 AND epoch = ?3",
                )?;
                for (partition, epoch) in leases {
                    update.execute(params![i64::from(partition), worker, epoch])?;
                }
                Ok(())
            })
            .await
    }

    async fn retire(&self, worker: &str, leases: &[(u32, i64)]) -> Result<(), Error> {
        self.release(worker, leases).await?;
        let worker = worker.to_owned();
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "DELETE FROM workers WHERE worker_id = ?1
                     AND NOT EXISTS (SELECT 1 FROM partitions WHERE owner = ?1)",
                )?
                .execute([&worker])?;
                Ok(())
            })
            .await
    }

    async fn save_checkpoints(
        &self,
        worker: &str,
        leases: &[(u32, i64)],
        mark: &Mark,
        how: Move,
        now: SystemTime,
    ) -> Result<Vec<u32>, Error> {
        let (worker, leases, mark) = (worker.to_owned(), leases.to_vec(), mark.clone());
        let replace = how == Move::Replace;
        self.db
            .write(move |c| {
                let mut update = c.prepare_cached(
                    "UPDATE partitions SET token = ?1, sequence = ?2, update_time = ?3
                     WHERE partition_id = ?4 AND owner = ?5 AND epoch = ?6
                     AND (sequence IS NULL OR sequence < ?2 OR ?7)",
                )?;
                let mut held = c.prepare_cached(
                    "SELECT COUNT(*) FROM partitions
                     WHERE partition_id = ?1 AND owner = ?2 AND epoch = ?3",
                )?;
                let mut fenced = Vec::new();
                for (partition, epoch) in leases {
                    let p = i64::from(partition);
                    let rows = update.execute(params![
                        mark.token,
                        mark.sequence,
                        to_micros(now),
                        p,
                        worker,
                        epoch,
                        replace
                    ])?;
                    if rows == 0 {
                        let still: i64 = held.query_row(params![p, worker, epoch], |r| r.get(0))?;
                        if still == 0 {
                            fenced.push(partition);
                        }
                    }
                }
                Ok(fenced)
            })
            .await
    }

    async fn start_mark(&self, head: &Mark) -> Result<Mark, Error> {
        let head = head.clone();
        self.db
            .write(move |c| {
                let mark = c.prepare_cached(START_MARK)?.query_row(
                    params![head.token, head.sequence],
                    |r| {
                        Ok(Mark {
                            token: r.get(0)?,
                            sequence: r.get(1)?,
                        })
                    },
                )?;
                Ok(mark)
            })
            .await
    }

    async fn checkpoints(&self) -> Result<Vec<(u32, Option<Mark>)>, Error> {
        self.db
            .read(|c| {
                let mut statement = c.prepare_cached(
                    "SELECT partition_id, token, sequence FROM partitions ORDER BY partition_id",
                )?;
                let rows = statement
                    .query_map([], |r| {
                        let token: Option<String> = r.get(1)?;
                        let sequence: Option<i64> = r.get(2)?;
                        Ok((
                            u32::try_from(r.get::<_, i64>(0)?).unwrap_or(u32::MAX),
                            token
                                .zip(sequence)
                                .map(|(token, sequence)| Mark { sequence, token }),
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), Error> {
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO dead_letters (event_id, customer_id, reason, attempts,
                     create_time, update_time, action) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason, attempts =
                     dead_letters.attempts + excluded.attempts, update_time =
                     excluded.update_time",
                )?
                .execute(params![
                    letter.event_id,
                    letter.customer_id,
                    letter.reason,
                    i64::from(letter.attempts),
                    to_micros(letter.create_time),
                    to_micros(letter.update_time),
                    letter.action.as_str(),
                ])?;
                Ok(())
            })
            .await
    }

    async fn dead_letters(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, DeadLetter)>, Error> {
        self.db
            .read(move |c| {
                let mut statement = c.prepare_cached(
                    "SELECT id, event_id, customer_id, reason, attempts, create_time, update_time,
                     action FROM dead_letters WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = statement
                    .query_map(
                        params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                        |r| {
                            Ok((
                                r.get(0)?,
                                DeadLetter {
                                    event_id: r.get(1)?,
                                    customer_id: r.get(2)?,
                                    reason: r.get(3)?,
                                    attempts: u32::try_from(r.get::<_, i64>(4)?)
                                        .unwrap_or(u32::MAX),
                                    create_time: from_micros(r.get(5)?),
                                    update_time: from_micros(r.get(6)?),
                                    action: action(r, 7)?,
                                },
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn remove_dead_letter(&self, event_id: &str) -> Result<(), Error> {
        let event_id = event_id.to_owned();
        self.db
            .write(move |c| {
                c.prepare_cached("DELETE FROM dead_letters WHERE event_id = ?1")?
                    .execute([event_id])?;
                Ok(())
            })
            .await
    }

    async fn count_dead_letters(&self) -> Result<u64, Error> {
        self.db
            .read(|c| {
                let n: i64 = c
                    .prepare_cached("SELECT COUNT(*) FROM dead_letters")?
                    .query_row([], |r| r.get(0))?;
                Ok(n.unsigned_abs())
            })
            .await
    }
}

/// The action stored in column `index`; a name this build does not know fails the read
/// rather than re-drive a letter as something it is not.
fn action(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Action> {
    let name: String = row.get(index)?;
    Action::parse(&name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("unknown dead-letter action {name:?}").into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_request_ids_table_an_earlier_schema_had_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            // A database an earlier build left at version 2, with its row.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            Migrations::new(STEPS[..2].iter().copied().map(M::up).collect())
                .to_latest(&mut conn)
                .unwrap();
            conn.execute(
                "INSERT INTO request_ids (id, ordered_from_ms) VALUES (1, 1795392000000)",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path(), Durability::Normal).unwrap();
        assert!(store.checkpoints().await.unwrap().is_empty());
        drop(store);
        let conn = rusqlite::Connection::open(&path).unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'request_ids'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
    }

    #[tokio::test]
    async fn dead_letters_from_before_cancels_read_as_creates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            // A database an earlier build left at version 5, with a dead letter.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            Migrations::new(STEPS[..5].iter().copied().map(M::up).collect())
                .to_latest(&mut conn)
                .unwrap();
            conn.execute(
                "INSERT INTO dead_letters (event_id, customer_id, reason, attempts, create_time,
                 update_time) VALUES ('e1', 'c1', 'InvalidArgument: old', 1, 0, 0)",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path(), Durability::Normal).unwrap();
        let rows = store.dead_letters(0, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.event_id, "e1");
        assert_eq!(rows[0].1.action, Action::Create);
    }
}
