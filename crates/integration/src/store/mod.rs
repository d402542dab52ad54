//! The integration service's own durable state: the checkpoint and the dead-letter list.
//!
//! [`IntegrationStore`] is what the engine and the admin API use; [`open`] is the one place a
//! [`Database`] (from `--data-dir` or `--database-url`) becomes a store, so nothing else names
//! a backend:
//! - [`sqlite`]: one embedded file under the data directory (the default).
//! - [`postgres`]: tables in schema `integration` of a PostgreSQL database, which several
//!   integration services may share.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::store::Database;

pub use self::postgres::PgStore;
pub use self::sqlite::{DB_FILE, SqliteStore};
use crate::error::Error;
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
    /// Resolves once the store can serve calls (at once for SQLite; once connected and
    /// migrated for PostgreSQL), or with the error that means it never will.
    async fn ready(&self) -> Result<(), Error>;
    /// The saved checkpoint, if any.
    async fn checkpoint(&self) -> Result<Option<Mark>, Error>;
    /// Replaces the checkpoint.
    async fn save_checkpoint(&self, mark: Mark, now: SystemTime) -> Result<(), Error>;
    /// Adds a dead letter, or, if the event is already there, replaces its reason and update
    /// time and adds its attempts to those already counted.
    async fn put_dead_letter(&self, letter: DeadLetter) -> Result<(), Error>;
    /// Dead letters listed after position `after` (0 for the first page), in the order they
    /// were first added, up to `limit`, each with its position.
    async fn dead_letters(&self, after: i64, limit: usize)
    -> Result<Vec<(i64, DeadLetter)>, Error>;
    /// Removes a dead letter after a successful re-drive; a missing one is not an error.
    async fn remove_dead_letter(&self, event_id: &str) -> Result<(), Error>;
    /// How many dead letters there are.
    async fn count_dead_letters(&self) -> Result<u64, Error>;
}

/// The store `database` names. SQLite opens (and migrates) here; PostgreSQL connects in the
/// background until `shutdown`, so the service can serve health while the server is still
/// unreachable: [`IntegrationStore::ready`] says when it is usable.
pub async fn open(
    database: &Database,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn IntegrationStore>, Error> {
    Ok(match database {
        Database::Sqlite { dir, durability } => Arc::new(SqliteStore::open(dir, *durability)?),
        Database::Postgres(options) => Arc::new(PgStore::connect(options, shutdown)),
    })
}
