//! The PostgreSQL store: the checkpoint and the dead letters in schema `integration`, so
//! several integration services can share one database.
//!
//! Every write is one autocommit statement on a pooled connection: there are few of them (a
//! checkpoint every 100 ms at most, a dead letter now and then), so grouping them would buy
//! nothing. What must hold with several writers holds in the data: one checkpoint row (its
//! primary key and `CHECK`), one dead letter per event (a unique `event_id`, upserted so that
//! attempts from every service add up).

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::postgres::{Connecting, Pg, PgOptions};

use super::{DeadLetter, IntegrationStore};
use crate::error::Error;
use crate::tracker::Mark;

/// The schema the tables live in.
pub const SCHEMA: &str = "integration";

/// The schema's history, one step per version (applied by [`Pg::connect`] under an advisory
/// lock). Steps are never edited once released, only added.
const MIGRATIONS: &[&str] = &["CREATE TABLE integration.checkpoint (
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
    );"];

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

    async fn checkpoint(&self) -> Result<Option<Mark>, Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached("SELECT token, sequence FROM integration.checkpoint WHERE id = 1")
            .await
            .map_err(|e| pg.error(&e))?;
        let row = client
            .query_opt(&statement, &[])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(row.map(|r| Mark {
            token: r.get(0),
            sequence: r.get(1),
        }))
    }

    async fn save_checkpoint(&self, mark: Mark, now: SystemTime) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO integration.checkpoint (id, token, sequence, update_time)
                 VALUES (1, $1, $2, $3) ON CONFLICT (id) DO UPDATE SET token = excluded.token,
                 sequence = excluded.sequence, update_time = excluded.update_time",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        client
            .execute(&statement, &[&mark.token, &mark.sequence, &now])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(())
    }

    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), Error> {
        let (pg, client) = self.client().await?;
        // One statement, so two services dead-lettering the same event at once both count:
        // the second waits for the first's row lock, then adds to what it committed.
        let statement = client
            .prepare_cached(
                "INSERT INTO integration.dead_letters AS d (event_id, customer_id, reason,
                 attempts, create_time, update_time) VALUES ($1, $2, $3, $4, $5, $6)
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
                "SELECT id, event_id, customer_id, reason, attempts, create_time, update_time
                 FROM integration.dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .await
            .map_err(|e| pg.error(&e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&after, &limit])
            .await
            .map_err(|e| pg.error(&e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    DeadLetter {
                        event_id: r.get(1),
                        customer_id: r.get(2),
                        reason: r.get(3),
                        attempts: u32::try_from(r.get::<_, i64>(4)).unwrap_or(u32::MAX),
                        create_time: r.get(5),
                        update_time: r.get(6),
                    },
                )
            })
            .collect())
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
