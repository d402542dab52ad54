//! What every store has in common whatever its backend: where its tables live
//! ([`Database`], chosen by one flag), and how storage fails ([`DbError`]).
//!
//! Each backend turns its own errors into [`DbError`] in one place (`sqlite.rs`,
//! `postgres.rs`), so the services map storage failures to gRPC statuses without knowing which
//! database they run on.

use std::path::PathBuf;

use crate::sqlite::Durability;

/// Connections a PostgreSQL store keeps open by default: the group-commit writers and the
/// reads running beside them.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The storage flags every service takes. Every service gets the same directory and picks its
/// own file in it (its store's `DB_FILE`), never a directory of its own: `mip all` and the
/// per-service commands must find each other's data.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreOptions {
    /// Directory of the embedded SQLite databases: `crm.db`, `inventory.db` and
    /// `integration.db`, each directly in it, whether the services run together (`mip all`) or
    /// one per command, so switching between the two with the same directory keeps the data.
    /// Created if missing. Not used with --database-url.
    #[arg(long, env = "MIP_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// `full`: every commit is fsynced (survives power loss). `normal`: survives a process
    /// crash, may lose the last commits on power loss. SQLite only; PostgreSQL follows its own
    /// `synchronous_commit`.
    #[arg(long, env = "MIP_DURABILITY", value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,

    /// Keep every table in PostgreSQL instead of SQLite, for example
    /// `postgres://mip@127.0.0.1:5432/mip`. Each service uses its own schema (`crm`,
    /// `inventory`, `integration`), so they can share one database. Give the password with
    /// PGPASSWORD or a passfile rather than in the URL. Unset: SQLite under --data-dir.
    #[arg(long, env = "MIP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// PostgreSQL connections each service keeps at most.
    #[arg(long, env = "MIP_DATABASE_POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE, value_parser = parse_pool_size)]
    pub database_pool_size: usize,
}

/// A pool needs a connection for the writer and one for reads at least.
fn parse_pool_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (2..=1000).contains(&n) => Ok(n),
        _ => Err("must be a number from 2 to 1000".into()),
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            durability: Durability::Full,
            database_url: None,
            database_pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

impl StoreOptions {
    /// The database these flags choose.
    pub fn database(&self) -> Result<Database, DbError> {
        match &self.database_url {
            Some(url) => Database::from_url(url, self.database_pool_size),
            None => Ok(Database::Sqlite {
                dir: self.data_dir.clone(),
                durability: self.durability,
            }),
        }
    }
}

/// Where a service keeps its tables.
#[derive(Debug, Clone)]
pub enum Database {
    /// One embedded SQLite file per service in `dir`.
    Sqlite {
        /// The data directory.
        dir: PathBuf,
        /// How hard each commit is pushed to disk.
        durability: Durability,
    },
    /// A PostgreSQL server; each service in its own schema.
    Postgres(Box<crate::postgres::PgOptions>),
}

impl Database {
    /// The database a URL names: `postgres://` or `postgresql://` (libpq's URL form).
    pub fn from_url(url: &str, pool_size: usize) -> Result<Self, DbError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        match scheme {
            Some("postgres" | "postgresql") => Ok(Database::Postgres(Box::new(
                crate::postgres::PgOptions::parse(url, pool_size)?,
            ))),
            _ => Err(DbError::InvalidUrl(
                "expected a PostgreSQL URL such as postgres://mip@127.0.0.1:5432/mip; leave it \
                 unset for the embedded SQLite databases under --data-dir"
                    .into(),
            )),
        }
    }

    /// A SQLite database in `dir`, fsynced on every commit.
    pub fn sqlite(dir: impl Into<PathBuf>) -> Self {
        Database::Sqlite {
            dir: dir.into(),
            durability: Durability::Full,
        }
    }
}

/// Storage failures, the same for every backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The database cannot serve the call now (unreachable, restarting, too many connections,
    /// busy, or the transaction lost a serialization race); a retry may succeed.
    #[error("{database} is unavailable: {reason}; retry")]
    Unavailable {
        /// Which database, never with its password.
        database: String,
        /// What the database or the connection said.
        reason: String,
    },
    /// A unique constraint refused a write that the store had no domain error for.
    #[error("unique constraint {constraint} refused the write")]
    UniqueViolation {
        /// The constraint's (or index's) name.
        constraint: String,
    },
    /// The disk under the database is full.
    #[error("{database} is out of disk space: {reason}")]
    DiskFull {
        /// Which database.
        database: String,
        /// What the database said.
        reason: String,
    },
    /// The database could not be opened or reached with the given settings (wrong password,
    /// missing database, unwritable directory): retrying as is will not help.
    #[error("cannot open database {database}: {reason}")]
    Open {
        /// Which database: a file, or a PostgreSQL server without the password.
        database: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// `--database-url` is not a URL this build can use. The message never repeats the URL,
    /// which may hold a password.
    #[error("invalid --database-url: {0}")]
    InvalidUrl(String),
    /// The schema could not be brought up to date.
    #[error("database schema migration failed for {database}: {reason}")]
    Migration {
        /// Which database.
        database: String,
        /// What went wrong.
        reason: String,
    },
    /// The store is not ready yet (still connecting) or is shutting down.
    #[error("the store is shutting down")]
    Closed,
    /// Another write in the same group commit failed after changing rows, so the whole group
    /// was rolled back; this write was not committed and may be retried.
    #[error("the write was rolled back with its group commit; retry it")]
    BatchAborted,
    /// Anything else: a bug, corruption or a schema mismatch. Logged; INTERNAL to clients.
    #[error("{database} failed: {reason}")]
    Other {
        /// Which database.
        database: String,
        /// What it said.
        reason: String,
    },
}

impl DbError {
    /// Whether retrying later may succeed: the database was busy or unreachable, or the store
    /// is restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Unavailable { .. } | DbError::Closed | DbError::BatchAborted => true,
            DbError::UniqueViolation { .. }
            | DbError::DiskFull { .. }
            | DbError::Open { .. }
            | DbError::InvalidUrl(_)
            | DbError::Migration { .. }
            | DbError::Other { .. } => false,
        }
    }

    /// Whether the disk is full, which callers report as RESOURCE_EXHAUSTED.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, DbError::DiskFull { .. })
    }

    /// The constraint a unique violation names, if this is one.
    pub fn unique_constraint(&self) -> Option<&str> {
        match self {
            DbError::UniqueViolation { constraint } => Some(constraint),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_postgres_urls_are_taken() {
        assert!(matches!(
            Database::from_url("postgres://mip@127.0.0.1:5432/mip", 4),
            Ok(Database::Postgres(_))
        ));
        assert!(matches!(
            Database::from_url("postgresql://mip@localhost/mip", 4),
            Ok(Database::Postgres(_))
        ));
        let err = Database::from_url("mysql://x@y/z", 4).unwrap_err();
        assert!(
            err.to_string().contains("expected a PostgreSQL URL"),
            "{err}"
        );
    }

    #[test]
    fn without_a_url_the_store_is_sqlite_under_the_data_dir() {
        let options = StoreOptions::default();
        match options.database().unwrap() {
            Database::Sqlite { dir, .. } => assert_eq!(dir, PathBuf::from("./data")),
            other => panic!("{other:?}"),
        }
    }
}

/// Least time between two logged write failures. A full disk or a lost database fails every
/// group commit; logging each would flood the log (and maybe fill the disk the log is on) while
/// clients already get an error for every write.
const FAILURE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs write failures, at most one line per [`FAILURE_LOG_INTERVAL`], with a count of those
/// in between.
#[derive(Default)]
pub(crate) struct FailureLog {
    /// When the last line was written.
    last: Option<std::time::Instant>,
    /// Failures since then, not logged.
    suppressed: u64,
}

impl FailureLog {
    pub(crate) fn failed(&mut self, database: &str, error: &DbError, what: &str) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < FAILURE_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        let hint = if error.is_disk_full() {
            "; writes fail until disk space is freed, then resume by themselves"
        } else if error.is_transient() {
            "; writes resume by themselves once the database is back"
        } else {
            ""
        };
        tracing::error!(
            database,
            error = %error,
            similar_failures_not_logged = self.suppressed,
            "{what}{hint}"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}
