//! The embedded store: one SQLite database under the data directory, written through the
//! shared group-commit writer.

use std::path::Path;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::clock::{from_micros, to_micros};
use mip_runtime::sqlite::{Db, Durability};
use rusqlite::{OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use super::{DeadLetter, IntegrationStore};
use crate::error::Error;
use crate::tracker::Mark;

/// Database file name under the data directory.
pub const DB_FILE: &str = "integration.db";

/// The schema's history, one step per version. Steps are never edited once released, only
/// added.
const STEPS: [&str; 3] = [
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
];

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

    async fn checkpoint(&self) -> Result<Option<Mark>, Error> {
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

    async fn save_checkpoint(&self, mark: Mark, now: SystemTime) -> Result<(), Error> {
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

    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), Error> {
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
    ) -> Result<Vec<(i64, DeadLetter)>, Error> {
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
        assert_eq!(store.checkpoint().await.unwrap(), None);
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
}
