//! The integration service's own durable state: the checkpoint, the dead-letter list, and
//! from when idempotency keys are time-ordered.
//!
//! Both live in one SQLite database under the data directory, written through the shared
//! group-commit writer. The SQL is portable to PostgreSQL.

use std::path::Path;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::sqlite::{Db, DbError, Durability};
use rusqlite::{OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use crate::deliver::{RequestIds, UPGRADE_MARGIN};
use crate::tracker::Mark;

/// A delivery that failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The CRM event (or `relist:<customer id>` for a delivery made while relisting).
    pub event_id: String,
    /// The customer whose package request failed.
    pub customer_id: String,
    /// Status code and message of the last failure.
    pub reason: String,
    /// Attempts made over every try.
    pub attempts: u32,
    /// When it first failed for good.
    pub create_time: SystemTime,
    /// When it was last tried.
    pub update_time: SystemTime,
}

/// What the integration service keeps.
#[async_trait]
pub trait IntegrationStore: Send + Sync + 'static {
    /// The saved checkpoint, if any.
    async fn checkpoint(&self) -> Result<Option<Mark>, DbError>;
    /// Replaces the checkpoint.
    async fn save_checkpoint(&self, mark: Mark, now: SystemTime) -> Result<(), DbError>;
    /// Adds a dead letter, or updates it (reason, attempts) if the event is already there.
    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), DbError>;
    /// Dead letters after `after` (an event id, in insertion order), up to `limit`.
    async fn dead_letters(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, DeadLetter)>, DbError>;
    /// Removes a dead letter after a successful re-drive.
    async fn remove_dead_letter(&self, event_id: &str) -> Result<(), DbError>;
    /// How many dead letters there are.
    async fn count_dead_letters(&self) -> Result<u64, DbError>;
    /// How idempotency keys are derived, fixed the first time this is asked: time-ordered for
    /// every customer in a data directory this process created, and only for customers
    /// created from [`UPGRADE_MARGIN`] after `now` in one that already existed (an earlier
    /// version's, which may have sent name-based keys past its checkpoint, or even before
    /// saving any).
    async fn request_ids(&self, now: SystemTime) -> Result<RequestIds, DbError>;
}

/// Database file name under the data directory.
pub const DB_FILE: &str = "integration.db";

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
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
        ),
        M::up(
            "CREATE TABLE request_ids (
                id               BIGINT PRIMARY KEY CHECK (id = 1),
                ordered_from_ms  BIGINT NOT NULL
            );",
        ),
    ])
}

/// The embedded store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The database.
    db: Db,
    /// Whether the database file was there before this process opened it.
    existed: bool,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/integration.db`.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, DbError> {
        let existed = dir.join(DB_FILE).exists();
        Ok(Self {
            db: Db::open(dir, DB_FILE, &migrations(), durability)?,
            existed,
        })
    }
}

#[async_trait]
impl IntegrationStore for SqliteStore {
    async fn checkpoint(&self) -> Result<Option<Mark>, DbError> {
        self.db
            .read(|c| {
                Ok(
                    c.prepare_cached("SELECT token, sequence FROM checkpoint WHERE id = 1")?
                        .query_row([], |r| {
                            Ok(Mark {
                                token: r.get(0)?,
                                sequence: r.get(1)?,
                            })
                        })
                        .optional()?,
                )
            })
            .await
    }

    async fn save_checkpoint(&self, mark: Mark, now: SystemTime) -> Result<(), DbError> {
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO checkpoint (id, token, sequence, update_time) VALUES (1, ?1,
                     ?2, ?3) ON CONFLICT (id) DO UPDATE SET token = excluded.token, sequence =
                     excluded.sequence, update_time = excluded.update_time",
                )?
                .execute(params![mark.token, mark.sequence, to_micros(now)])?;
                Ok(())
            })
            .await
    }

    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), DbError> {
        self.db
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO dead_letters (event_id, customer_id, reason, attempts,
                     create_time, update_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT
                     (event_id) DO UPDATE SET reason = excluded.reason, attempts =
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
                ])?;
                Ok(())
            })
            .await
    }

    async fn dead_letters(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, DeadLetter)>, DbError> {
        self.db
            .read(move |c| {
                let mut statement = c.prepare_cached(
                    "SELECT id, event_id, customer_id, reason, attempts, create_time, update_time
                     FROM dead_letters WHERE id > ?1 ORDER BY id LIMIT ?2",
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
                                },
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn remove_dead_letter(&self, event_id: &str) -> Result<(), DbError> {
        let event_id = event_id.to_owned();
        self.db
            .write(move |c| {
                c.prepare_cached("DELETE FROM dead_letters WHERE event_id = ?1")?
                    .execute([event_id])?;
                Ok(())
            })
            .await
    }

    async fn count_dead_letters(&self) -> Result<u64, DbError> {
        self.db
            .read(|c| {
                let n: i64 = c
                    .prepare_cached("SELECT COUNT(*) FROM dead_letters")?
                    .query_row([], |r| r.get(0))?;
                Ok(n.unsigned_abs())
            })
            .await
    }

    async fn request_ids(&self, now: SystemTime) -> Result<RequestIds, DbError> {
        let existed = self.existed;
        self.db
            .write(move |c| {
                let fixed: Option<i64> = c
                    .prepare_cached("SELECT ordered_from_ms FROM request_ids WHERE id = 1")?
                    .query_row([], |r| r.get(0))
                    .optional()?;
                if let Some(ms) = fixed {
                    return Ok(RequestIds::ordered_from_ms(ms.unsigned_abs()));
                }
                // A file that was already there may be an earlier version's, even one with no
                // checkpoint yet; so may anything holding a checkpoint or a dead letter. Either
                // way, keep name-based keys for the customers it may have served.
                let used: bool = c
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM checkpoint)
                             OR EXISTS (SELECT 1 FROM dead_letters)",
                    )?
                    .query_row([], |r| r.get(0))?;
                let earlier_version = existed || used;
                let ms = if earlier_version {
                    let from = (now + UPGRADE_MARGIN)
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    u64::try_from(from.as_millis()).unwrap_or(u64::MAX)
                } else {
                    0
                };
                let ids = RequestIds::ordered_from_ms(ms);
                c.prepare_cached("INSERT INTO request_ids (id, ordered_from_ms) VALUES (1, ?1)")?
                    .execute([i64::try_from(ids.since_ms()).unwrap_or(i64::MAX)])?;
                Ok(ids)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_new_data_dir_orders_every_key_and_the_choice_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Durability::Normal).unwrap();
        let now = SystemTime::now();
        let ids = store.request_ids(now).await.unwrap();
        assert_eq!(ids, RequestIds::ordered());
        // Kept across later starts, whatever happens in between.
        store
            .save_checkpoint(
                Mark {
                    token: "t".to_owned(),
                    sequence: 1,
                },
                now,
            )
            .await
            .unwrap();
        let later = now + Duration::from_secs(86_400);
        assert_eq!(store.request_ids(later).await.unwrap(), ids);
    }

    #[tokio::test]
    async fn a_data_dir_that_already_existed_orders_keys_only_after_the_margin() {
        let dir = tempfile::tempdir().unwrap();
        // An earlier version created the database and stopped before saving a checkpoint.
        drop(SqliteStore::open(dir.path(), Durability::Normal).unwrap());
        let store = SqliteStore::open(dir.path(), Durability::Normal).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let ids = store.request_ids(now).await.unwrap();
        assert_eq!(
            u128::from(ids.since_ms()),
            (1_900_000_000 + UPGRADE_MARGIN.as_secs() as u128) * 1000
        );
    }

    #[tokio::test]
    async fn a_data_dir_with_a_checkpoint_orders_keys_only_after_the_margin() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Durability::Normal).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        store
            .save_checkpoint(
                Mark {
                    token: "t".to_owned(),
                    sequence: 7,
                },
                now,
            )
            .await
            .unwrap();
        let ids = store.request_ids(now).await.unwrap();
        assert_eq!(
            u128::from(ids.since_ms()),
            (1_900_000_000 + UPGRADE_MARGIN.as_secs() as u128) * 1000
        );
        assert_eq!(store.request_ids(now).await.unwrap(), ids);
    }
}
