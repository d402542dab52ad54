//! Where package requests live.
//!
//! [`InventoryStore`] is what the service needs from storage, whatever the backend. [`open`]
//! is the one place a [`Database`] becomes a store: [`SqliteStore`] (embedded, the default)
//! or [`PostgresStore`] (schema `inventory`). Callers hold an `Arc<dyn InventoryStore>` and
//! never name a backend.
//!
//! Both backends keep the same invariants in the data: a unique request id makes creates
//! idempotent, and a single-row counter, bumped inside the write transaction right before the
//! insert, hands out the listing position (`seq`). The counter's row lock is held until
//! commit, so positions are handed out in commit order and a rolled-back write gives its
//! numbers back: a reader paging by position never skips a row that commits later.

mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::store::Database;
use uuid::Uuid;

use crate::domain::{
    Created, NewPackageRequest, PackageRequest, PackageRequestPage, PackageStatus, StatusChange,
};
use crate::error::Error;

pub use postgres::PostgresStore;
pub use sqlite::{DB_FILE, SqliteStore};

/// What the Inventory service needs from storage.
#[async_trait]
pub trait InventoryStore: Send + Sync + 'static {
    /// Resolves once the store can serve calls (at once for SQLite; once connected and
    /// migrated for PostgreSQL), or with the error that keeps it from ever serving.
    async fn ready(&self) -> Result<(), Error>;
    /// Creates a PENDING package request. A repeated `request_id` with the same parameters
    /// returns the original and creates nothing; with other parameters it fails with
    /// [`Error::RequestIdReused`].
    async fn create_package_request(
        &self,
        new: NewPackageRequest,
        now: SystemTime,
    ) -> Result<Created, Error>;
    /// Creates each package request as [`InventoryStore::create_package_request`] would, in
    /// order, in one write: one commit for all. Each succeeds or fails on its own; the outer
    /// error is for the write as a whole (storage).
    async fn create_package_requests(
        &self,
        new: Vec<NewPackageRequest>,
        now: SystemTime,
    ) -> Result<Vec<Result<Created, Error>>, Error>;
    /// One package request.
    async fn get_package_request(&self, id: Uuid) -> Result<PackageRequest, Error>;
    /// Up to `limit` package requests created after creation position `after`, oldest first,
    /// only those of `customer_id` if given.
    async fn list_package_requests(
        &self,
        customer_id: Option<Uuid>,
        after: u64,
        limit: usize,
    ) -> Result<PackageRequestPage, Error>;
    /// Moves a package request to `status`, if its life cycle allows it.
    async fn update_status(
        &self,
        id: Uuid,
        status: PackageStatus,
        now: SystemTime,
    ) -> Result<StatusChange, Error>;
}

/// The store `database` names. SQLite opens here (its errors are returned at once); PostgreSQL
/// connects in the background until `shutdown`, so a service can serve health meanwhile:
/// [`InventoryStore::ready`] says when it is usable.
pub async fn open(
    database: &Database,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn InventoryStore>, Error> {
    Ok(match database {
        Database::Sqlite { dir, durability } => {
            Arc::new(SqliteStore::open(dir, *durability).await?)
        }
        Database::Postgres(options) => Arc::new(PostgresStore::connect(options, shutdown)),
    })
}

/// A position or count as PostgreSQL and SQLite store it (signed 64-bit).
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Rows to fetch for a page of `limit`: one more than asked tells whether another page
/// follows, so the last page carries no cursor instead of sending the client for an empty one.
fn fetch_for(limit: usize) -> i64 {
    to_i64(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
}

/// A page from up to `limit + 1` rows in position order: the cursor is the last position
/// returned, and only when more rows follow.
fn page_of(mut rows: Vec<(PackageRequest, u64)>, limit: usize) -> PackageRequestPage {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_after = if more {
        rows.last().map(|(_, seq)| *seq)
    } else {
        None
    };
    PackageRequestPage {
        package_requests: rows.into_iter().map(|(r, _)| r).collect(),
        next_after,
    }
}
