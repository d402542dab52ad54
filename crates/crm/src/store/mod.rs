//! Where customers and the change log live.
//!
//! [`CrmStore`] is what the service needs from storage, whatever the backend. [`open`] is the
//! one place a [`Database`] becomes a store: [`SqliteStore`] (embedded, the default) or
//! [`PgStore`] (schema `crm` on a PostgreSQL server). Every change and its event commit in one
//! transaction, and the log's order is held by the database (a counter row), so it is the
//! commit order with no gaps, however many processes write.

mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::store::{Database, DbError};
use tokio::sync::watch;
use uuid::Uuid;

pub use self::postgres::{PgStore, SCHEMA};
pub use self::sqlite::{DB_FILE, SqliteStore};
use crate::domain::{
    Customer, CustomerEvent, CustomerPage, CustomerPatch, LogBounds, NewCustomer, Position,
};
use crate::error::Error;
use crate::feed::Feed;

/// What the CRM service needs from storage.
#[async_trait]
pub trait CrmStore: Send + Sync + 'static {
    /// Resolves once the store can serve calls (at once for SQLite; once connected and
    /// migrated for PostgreSQL), or with the error that keeps it from ever doing so.
    async fn ready(&self) -> Result<(), Error>;
    /// Creates a customer and its CREATED event; a repeated `request_id` returns the original.
    async fn create_customer(&self, new: NewCustomer, now: SystemTime) -> Result<Customer, Error>;
    /// Creates each customer as [`CrmStore::create_customer`] would, in order, in one write:
    /// one commit for all, and their events in the log in the order given. Each succeeds or
    /// fails on its own; the outer error is for the write as a whole (storage).
    async fn create_customers(
        &self,
        new: Vec<NewCustomer>,
        now: SystemTime,
    ) -> Result<Vec<Result<Customer, Error>>, Error>;
    /// One customer.
    async fn get_customer(&self, id: Uuid) -> Result<Customer, Error>;
    /// Applies a patch and appends an UPDATED event (none if nothing changed).
    async fn update_customer(
        &self,
        id: Uuid,
        patch: CustomerPatch,
        now: SystemTime,
    ) -> Result<Customer, Error>;
    /// Deletes a customer and appends a DELETED event; returns the event's position.
    async fn delete_customer(&self, id: Uuid, now: SystemTime) -> Result<Position, Error>;
    /// Customers created after creation position `after`, and the log position of the snapshot
    /// (`snapshot` if given, for later pages of one listing).
    async fn list_customers(
        &self,
        after: u64,
        limit: usize,
        snapshot: Option<Position>,
    ) -> Result<CustomerPage, Error>;
    /// Up to `limit` events after `after`, in order. Fails with `TokenExpired` if retention has
    /// deleted any of them.
    async fn events_after(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<Arc<CustomerEvent>>, Error>;
    /// Deletes events committed before `cutoff`; returns how many.
    async fn prune_events(&self, cutoff: SystemTime) -> Result<u64, Error>;
    /// The log's bounds as of the last published commit; UNAVAILABLE until ready.
    fn bounds(&self) -> Result<LogBounds, Error>;
    /// Wakes whenever an event commits or retention runs; UNAVAILABLE until ready.
    fn subscribe(&self) -> Result<watch::Receiver<LogBounds>, Error>;
    /// Waits until this store's feed has `position`, which is past its head: another process
    /// sharing the database may have committed it, and this one has not read it back yet.
    /// `TokenAhead` if the database has no such position either. A store that is the only
    /// writer of its database has nothing to wait for.
    async fn catch_up_to(&self, position: Position) -> Result<(), Error> {
        Err(Error::TokenAhead {
            position: position.0,
            head: self.bounds()?.head,
        })
    }
    /// Whether the store can reach its database now: false while a PostgreSQL server is
    /// unreachable (calls meanwhile fail) or after the database was found to have lost commits.
    /// A store whose database is in-process is always healthy.
    fn health(&self) -> watch::Receiver<bool> {
        watch::channel(true).1
    }
}

/// How often, by default, a PostgreSQL store reads back what other processes committed.
pub const DEFAULT_FEED_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Opens the store `database` names. SQLite opens before this returns; PostgreSQL connects
/// in the background (see [`CrmStore::ready`]) until connected or `shutdown`.
pub async fn open(
    database: &Database,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn CrmStore>, Error> {
    open_polling(database, shutdown, DEFAULT_FEED_POLL_INTERVAL).await
}

/// [`open`], with a PostgreSQL store reading the log back every `feed_poll_interval` for
/// what other processes committed (SQLite has no other writers, and ignores it).
pub async fn open_polling(
    database: &Database,
    shutdown: &CancellationToken,
    feed_poll_interval: Duration,
) -> Result<Arc<dyn CrmStore>, Error> {
    Ok(match database {
        Database::Sqlite { dir, durability } => {
            Arc::new(SqliteStore::open(dir, *durability).await?)
        }
        Database::Postgres(options) => {
            Arc::new(PgStore::open_polling(options, shutdown, feed_poll_interval))
        }
    })
}

/// Events kept in memory for watchers that are nearly caught up.
const FEED_CAPACITY: usize = 8192;

/// Longest a read or write waits for the feed to publish a commit it has already seen.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// Waits until the feed has published every event up to `position`, so that a token or
/// position handed out is never ahead of the head tokens are checked against (a client using
/// it at once would otherwise get OUT_OF_RANGE).
async fn published(feed: &Feed, position: Position) -> Result<(), Error> {
    // The commit is already visible, so publishing follows within moments; the bound only
    // matters if publishing stopped (a writer died, or the tail cannot reach the database).
    if feed.wait_for(position.0, PUBLISH_WAIT).await {
        Ok(())
    } else {
        Err(Error::Storage(DbError::Closed))
    }
}

/// What `events_after` can answer from the feed alone: an expired position, a caught-up
/// one, or events from the ring. `Err(published head)` means the database must be read, up to
/// that head.
fn events_from_feed(
    feed: &Feed,
    after: Position,
    limit: usize,
) -> Result<Result<Vec<Arc<CustomerEvent>>, u64>, Error> {
    let bounds = feed.bounds();
    if after.0 < bounds.pruned_through {
        return Err(Error::TokenExpired {
            position: after.0,
            pruned_through: bounds.pruned_through,
        });
    }
    // Caught up (the common poll): nothing to read, even when the ring is empty, as it is
    // after a restart until the next write.
    if after.0 >= bounds.head {
        return Ok(Ok(Vec::new()));
    }
    Ok(feed.read_after(after.0, limit).ok_or(bounds.head))
}
