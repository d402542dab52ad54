//! The integration service's own durable state: the partitions of the feed (their leases and
//! checkpoints), the workers sharing them, and the dead-letter list.
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
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mip_runtime::CancellationToken;
use mip_runtime::store::Database;

pub use self::postgres::PgStore;
pub use self::sqlite::{DB_FILE, SqliteStore};
use crate::deliver::Action;
use crate::error::Error;
use crate::tracker::Mark;

/// A delivery that failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The CRM event (or `relist:<customer id>` for a create made while relisting,
    /// `relist-cancel:<customer id>` for a cancel the relist found missing).
    pub event_id: String,
    /// The customer whose package request failed.
    pub customer_id: String,
    /// What failed: the create of a new customer's package, or the cancel of a deleted one's.
    /// A re-drive does the same; letters from before cancels existed are creates.
    pub action: Action,
    /// Status code and message of the last failure.
    pub reason: String,
    /// Attempts made over every try.
    pub attempts: u32,
    /// When it first failed for good.
    pub create_time: SystemTime,
    /// When it was last tried.
    pub update_time: SystemTime,
}

/// One partition's lease, as the worker holding it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The partition, `0..partition_count`.
    pub partition: u32,
    /// The hand-over count this lease was taken at; checkpoint writes carry it, so a writer
    /// that lost the lease is refused.
    pub epoch: i64,
    /// When the lease runs out unless renewed.
    pub expire_time: SystemTime,
    /// The partition's saved checkpoint, if any.
    pub checkpoint: Option<Mark>,
}

/// A worker of the cluster, as the shared tables see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// Random per process start.
    pub worker_id: String,
    /// Its last heartbeat.
    pub last_heartbeat: SystemTime,
    /// Partitions it holds an unexpired lease on.
    pub partitions: u32,
}

/// What the integration service keeps.
///
/// Lease times are the database's clock on PostgreSQL (so workers on different hosts agree)
/// and the `now` passed in on SQLite (the injectable clock).
#[async_trait]
pub trait IntegrationStore: Send + Sync + 'static {
    /// Resolves once the store can serve calls (at once for SQLite; once connected and
    /// migrated for PostgreSQL), or with the error that means it never will.
    async fn ready(&self) -> Result<(), Error>;
    /// Records the partition count on first start and creates the partitions; refuses
    /// ([`Error::PartitionCountChanged`]) a count other than the one recorded.
    async fn init_partitions(&self, count: u32) -> Result<(), Error>;
    /// Records that `worker` is alive.
    async fn heartbeat(&self, worker: &str, now: SystemTime) -> Result<(), Error>;
    /// Extends the leases `worker` still holds at the given epochs by `ttl`; returns those
    /// renewed, with their new expiry. A lease missing from the answer was taken over.
    async fn renew(
        &self,
        worker: &str,
        leases: &[(u32, i64)],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<(u32, SystemTime)>, Error>;
    /// Workers with a heartbeat within `ttl`, each with the partitions it holds.
    async fn live_workers(&self, ttl: Duration, now: SystemTime) -> Result<Vec<Worker>, Error>;
    /// Takes back every partition still leased to `worker`, bumping each one's epoch: called
    /// once when a worker starts under a name its previous process had (`--worker-id`), so a
    /// restart after a crash resumes at once instead of waiting for the old leases to run out,
    /// and anything that old process still writes is refused.
    async fn reclaim(
        &self,
        worker: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<Lease>, Error>;
    /// Takes up to `max` partitions that nobody holds or whose lease expired, bumping each
    /// one's epoch.
    async fn acquire(
        &self,
        worker: &str,
        max: u32,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<Lease>, Error>;
    /// Gives up leases (where `worker` still holds them at those epochs).
    async fn release(&self, worker: &str, leases: &[(u32, i64)]) -> Result<(), Error>;
    /// Gives up `leases` (where `worker` still holds them at those epochs) and removes
    /// `worker` from the workers, unless a lease still carries its name: a newer process
    /// under the same `--worker-id` may have taken its partitions back at a higher epoch, and
    /// the old one's clean shutdown must not free them or hide it.
    async fn retire(&self, worker: &str, leases: &[(u32, i64)]) -> Result<(), Error>;
    /// Moves each partition's checkpoint to `mark` (only forward, or replacing it: `how`),
    /// where `worker` still holds it at the given epoch; returns the partitions whose write
    /// was refused because the lease was lost (a checkpoint already at or past `mark` is not
    /// a refusal).
    async fn save_checkpoints(
        &self,
        worker: &str,
        leases: &[(u32, i64)],
        mark: &Mark,
        how: Move,
        now: SystemTime,
    ) -> Result<Vec<u32>, Error>;
    /// Records `head` as the cluster's start position unless one is recorded already, and
    /// returns the recorded one. With `--start-position latest`, every partition without a
    /// checkpoint starts there, whichever worker first leases it and however much later: a
    /// partition first leased after a pause would otherwise start at the head of that moment
    /// and skip the customers created in between.
    async fn start_mark(&self, head: &Mark) -> Result<Mark, Error>;
    /// The saved checkpoint of every partition, in partition order (`None`: none yet).
    async fn checkpoints(&self) -> Result<Vec<(u32, Option<Mark>)>, Error>;
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

/// How a checkpoint write treats the checkpoint already saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Only forward: a saved checkpoint at or past the mark stays, so a late write of an
    /// older mark can never move a partition back.
    Forward,
    /// Replace whatever is saved: the mark is a relist's snapshot, which may belong to a new
    /// change log (CRM's database was replaced) numbered lower than the saved checkpoint of
    /// the old one.
    Replace,
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
