//! The embedded store's plumbing: one SQLite database per service, in WAL mode.
//!
//! Writes go through a single writer thread that **group-commits**: it takes every write that
//! is waiting, runs them one after another in one shared transaction, commits once (one fsync
//! for the whole batch), and only then answers the callers.
//!
//! **A write must fail before it changes anything**: check, then write. A write that fails
//! without having changed a row leaves its batch undisturbed. One that fails after changing
//! rows cannot be undone alone (there is no savepoint per write), so its whole batch is rolled
//! back and every other write in it fails with [`DbError::BatchAborted`], which is transient
//! (the failing write gets its own error). Every store checks before it writes, so only a
//! storage error can do this. Savepoints per write were what this replaced: opening and
//! releasing them, and copying every page a write touched into the savepoint journal, cost
//! 7–16% of end-to-end throughput (TECHNICAL_DESIGN.md, Performance). Callers can attach an
//! `on_commit` action that runs on the writer thread in commit order: the CRM store uses it to
//! publish change events to live watchers in exactly the order they were committed.
//!
//! Reads use a small pool of read-only connections on blocking threads; WAL lets them run
//! alongside the writer and always see a committed state.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use rusqlite_migration::Migrations;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::store::FailureLog;

/// Most writes grouped into one transaction. Bounds the latency a batch adds to its first
/// write while still amortising the fsync over hundreds of writes under load.
const MAX_BATCH: usize = 1024;

/// Writes queued for the writer thread before callers wait for room: backpressure instead of
/// unbounded memory when the disk is slower than the callers.
const WRITE_QUEUE: usize = 8192;

/// Prepared statements kept per connection: more than any store uses.
const STATEMENT_CACHE: usize = 64;

/// How hard SQLite pushes each commit to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// fsync on every commit: a committed write survives power loss. With group commit this
    /// costs one fsync per batch, not per request.
    #[default]
    Full,
    /// fsync only at WAL checkpoints: a committed write survives a process crash (`kill -9`)
    /// but the last commits can be lost on power loss.
    Normal,
}

pub use crate::store::DbError;

/// How a SQLite database is named in errors that do not come with its path.
const SQLITE: &str = "the SQLite database";

/// The one place SQLite's errors are sorted into [`DbError`]s.
impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        let database = SQLITE.to_owned();
        let reason = e.to_string();
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                DbError::Unavailable { database, reason }
            }
            Some(rusqlite::ErrorCode::DiskFull) => DbError::DiskFull { database, reason },
            // "UNIQUE constraint failed: customers.email_key": the constraint is the column.
            Some(rusqlite::ErrorCode::ConstraintViolation)
                if reason.starts_with("UNIQUE constraint failed: ") =>
            {
                DbError::UniqueViolation {
                    constraint: reason["UNIQUE constraint failed: ".len()..].to_owned(),
                }
            }
            _ => DbError::Other { database, reason },
        }
    }
}

fn pool_error(e: r2d2::Error) -> DbError {
    DbError::Unavailable {
        database: SQLITE.to_owned(),
        reason: format!("no read connection: {e}"),
    }
}

/// Called once the batch a write belonged to has committed (or failed to).
type Completion = Box<dyn FnOnce(Result<(), DbError>) + Send>;

/// A write waiting for the writer thread.
trait WriteJob: Send {
    /// Runs the write; says whether it succeeded, and how to answer.
    fn run(self: Box<Self>, conn: &Connection) -> (bool, Completion);
    /// Answers the caller without running: the batch could not even begin.
    fn abort(self: Box<Self>, error: DbError);
}

/// A typed write: the closure, what to do on commit, and where to send the answer.
struct Job<F, C, T, E> {
    /// The SQL work.
    work: F,
    /// Runs on the writer thread after commit, in commit order.
    on_commit: C,
    /// Where the caller waits.
    reply: oneshot::Sender<Result<T, E>>,
}

impl<F, C, T, E> WriteJob for Job<F, C, T, E>
where
    F: FnOnce(&Connection) -> Result<T, E> + Send,
    C: FnOnce(&T) + Send + 'static,
    T: Send + 'static,
    E: From<DbError> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> (bool, Completion) {
        let Job {
            work,
            on_commit,
            reply,
        } = *self;
        let result = work(conn);
        let ok = result.is_ok();
        let completion: Completion = Box::new(move |committed| {
            let answer = match (result, committed) {
                (Ok(value), Ok(())) => {
                    on_commit(&value);
                    Ok(value)
                }
                (Ok(_), Err(e)) => Err(E::from(e)),
                (Err(e), _) => Err(e),
            };
            let _ = reply.send(answer);
        });
        (ok, completion)
    }

    fn abort(self: Box<Self>, error: DbError) {
        let _ = self.reply.send(Err(E::from(error)));
    }
}

/// An open database: the writer thread's queue and the read pool.
#[derive(Clone)]
pub struct Db {
    /// Queue of the writer thread.
    writes: mpsc::Sender<Box<dyn WriteJob>>,
    /// Read-only connections.
    readers: r2d2::Pool<SqliteConnectionManager>,
    /// The database file, for messages.
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl Db {
    /// Opens (creating if needed) `dir/file`, applies `migrations`, and starts the writer.
    pub fn open(
        dir: &Path,
        file: &str,
        migrations: &Migrations<'_>,
        durability: Durability,
    ) -> Result<Self, DbError> {
        let path = dir.join(file);
        let database = path.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| DbError::Open {
            database: database.clone(),
            reason: format!("cannot create data directory {}: {e}", dir.display()),
        })?;
        let open_error = |e: rusqlite::Error| DbError::Open {
            database: database.clone(),
            reason: e.to_string(),
        };
        // SQLite only says "unable to open database file"; say why when the folder is the cause.
        writable(dir).map_err(|e| DbError::Open {
            database: database.clone(),
            reason: format!("cannot write in the data directory {}: {e}", dir.display()),
        })?;
        let mut conn = Connection::open(&path).map_err(open_error)?;
        // SQLite quietly falls back to read-only when it may not write the file; every write
        // would then fail later, so refuse to start instead.
        if conn.is_readonly(rusqlite::MAIN_DB).map_err(open_error)? {
            return Err(DbError::Open {
                database: database.clone(),
                reason: format!(
                    "the file is read-only; the service needs to write {} and the files in it",
                    dir.display()
                ),
            });
        }
        let synchronous = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        // temp_store = MEMORY: statement journals (and, when writes still had savepoints, their
        // sub-journals) stay in memory rather than in temporary files (measured: about 15% of
        // throughput then).
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {synchronous};
             PRAGMA busy_timeout = 5000;
             PRAGMA foreign_keys = ON;
             PRAGMA temp_store = MEMORY;"
        ))
        .map_err(open_error)?;
        // Every write reuses a handful of statements; parsing SQL again for each one showed up in
        // profiles (see TECHNICAL_DESIGN.md, Performance).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Creating the WAL needs a write; doing it now turns a read-only directory or a full
        // disk into a clear start-up error instead of a failure on the first request.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(open_error)?;
        migrations
            .to_latest(&mut conn)
            .map_err(|e| DbError::Migration {
                database: database.clone(),
                reason: e.to_string(),
            })?;

        let manager = SqliteConnectionManager::file(&path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(|c| {
                c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                c.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")
            });
        let readers = r2d2::Pool::builder()
            .max_size(8)
            .min_idle(Some(1))
            .build(manager)
            .map_err(pool_error)?;

        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name(format!("sqlite-writer-{file}"))
            .spawn(move || writer_loop(conn, queue, &thread_path))
            .map_err(|e| DbError::Open {
                database: database.clone(),
                reason: format!("cannot start writer thread: {e}"),
            })?;
        Ok(Self {
            writes,
            readers,
            path: Arc::new(path),
        })
    }

    /// Runs `work` in the next group commit and returns its result once that commit is durable.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        self.write_then(work, |_| ()).await
    }

    /// Like [`Db::write`], and runs `on_commit` on the writer thread once the commit is
    /// durable, in commit order relative to every other write's `on_commit`.
    pub async fn write_then<T, E, F, C>(&self, work: F, on_commit: C) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        C: FnOnce(&T) + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Job {
            work,
            on_commit,
            reply,
        });
        self.writes
            .send(job)
            .await
            .map_err(|_| E::from(DbError::Closed))?;
        answer.await.map_err(|_| E::from(DbError::Closed))?
    }

    /// Runs `work` on a read-only connection, on a blocking thread.
    pub async fn read<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.get().map_err(|e| E::from(pool_error(e)))?;
            work(&conn)
        })
        .await
        .map_err(|_| E::from(DbError::Closed))?
    }
}

/// Whether files can be created in `dir` (a read-only mount or missing permission says no).
fn writable(dir: &Path) -> std::io::Result<()> {
    // Named after the process, so two services starting on one directory do not remove each
    // other's probe.
    let probe = dir.join(format!(".mip-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// The writer thread: batch, run the writes one after another in one transaction, commit once,
/// answer in order.
fn writer_loop(mut conn: Connection, mut queue: mpsc::Receiver<Box<dyn WriteJob>>, path: &Path) {
    let mut failures = FailureLog::default();
    let mut batch: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let e = DbError::from(e);
                failures.failed(
                    &path.display().to_string(),
                    &e,
                    "cannot begin a write transaction",
                );
                for job in batch.drain(..) {
                    job.abort(e.clone());
                }
                continue;
            }
        };
        let mut completions = Vec::with_capacity(size);
        // Set when the transaction can no longer be committed as a whole: a write failed after
        // changing rows, or SQLite rolled the transaction back itself (it may, on I/O errors).
        let mut broken = None;
        let mut jobs = batch.drain(..);
        for job in jobs.by_ref() {
            let changes = tx.total_changes();
            let (ok, completion) = job.run(&tx);
            completions.push(completion);
            if tx.is_autocommit() {
                broken =
                    Some("SQLite rolled the transaction back (after an I/O error or a full disk)");
                break;
            }
            if !ok && tx.total_changes() != changes {
                broken = Some("a write failed after changing rows");
                break;
            }
        }
        if let Some(why) = broken {
            // The failing write answers with its own error; the rest of its group with this.
            let e = DbError::BatchAborted;
            failures.failed(
                &path.display().to_string(),
                &e,
                &format!("{why}; its whole group commit was rolled back"),
            );
            for job in jobs {
                job.abort(e.clone());
            }
            drop(tx);
            for completion in completions {
                completion(Err(e.clone()));
            }
            continue;
        }
        let committed = tx.commit().map_err(DbError::from);
        if let Err(e) = &committed {
            failures.failed(
                &path.display().to_string(),
                e,
                "commit failed; the batch was rolled back",
            );
        } else {
            debug!(size, "group commit");
        }
        for completion in completions {
            completion(committed.clone());
        }
    }
    // Every handle is gone: fold the WAL back into the main file so the data dir is compact.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        debug!(error = %e, "final checkpoint skipped");
    }
}

#[cfg(test)]
mod tests {
    use rusqlite_migration::M;

    use super::*;

    fn migrations() -> Migrations<'static> {
        Migrations::new(vec![M::up(
            "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);",
        )])
    }

    #[tokio::test]
    async fn a_write_that_fails_before_changing_anything_leaves_its_batch_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), "t.db", &migrations(), Durability::Normal).unwrap();
        let insert = |name: &'static str| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    c.execute("INSERT INTO item (name) VALUES (?1)", [name])
                        .map_err(DbError::from)
                })
                .await
            }
        };
        let (a, b, c) = tokio::join!(insert("a"), insert("a"), insert("b"));
        assert_eq!([a.is_ok(), b.is_ok(), c.is_ok()], [true, false, true]);
        let count: i64 = db
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM item", [], |r| r.get(0))
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(count, 2);
    }

    #[tokio::test]
    async fn a_write_that_fails_after_changing_rows_rolls_back_its_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), "t.db", &migrations(), Durability::Normal).unwrap();
        let insert = |names: &'static [&'static str]| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    for name in names {
                        c.execute("INSERT INTO item (name) VALUES (?1)", [name])?;
                    }
                    Ok::<_, DbError>(())
                })
                .await
            }
        };
        // Holds the writer, so that the writes after it queue up and commit as one group.
        let hold = db.write(|_| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            Ok::<_, DbError>(())
        });
        let (_, x, half, y) = tokio::join!(
            hold,
            insert(&["x"]),
            insert(&["half", "half"]),
            insert(&["y"])
        );
        assert!(matches!(x, Err(DbError::BatchAborted)), "{x:?}");
        assert!(matches!(y, Err(DbError::BatchAborted)), "{y:?}");
        assert!(
            matches!(&half, Err(DbError::UniqueViolation { constraint }) if constraint == "item.name"),
            "{half:?}"
        );
        let count = |db: Db| async move {
            db.read(|c| {
                c.query_row("SELECT COUNT(*) FROM item", [], |r| r.get::<_, i64>(0))
                    .map_err(DbError::from)
            })
            .await
            .unwrap()
        };
        assert_eq!(
            count(db.clone()).await,
            0,
            "nothing of the group is committed"
        );
        // The writer carries on: a retry commits.
        insert(&["x"]).await.unwrap();
        assert_eq!(count(db.clone()).await, 1);
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), "t.db", &migrations(), Durability::Full).unwrap();
            db.write(|c| {
                c.execute("INSERT INTO item (name) VALUES ('kept')", [])
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        }
        let db = Db::open(dir.path(), "t.db", &migrations(), Durability::Full).unwrap();
        let name: String = db
            .read(|c| {
                c.query_row("SELECT name FROM item", [], |r| r.get(0))
                    .map_err(DbError::from)
            })
            .await
            .unwrap();
        assert_eq!(name, "kept");
    }

    #[tokio::test]
    async fn a_full_disk_fails_writes_cleanly_and_they_resume_once_space_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), "t.db", &migrations(), Durability::Normal).unwrap();
        // SQLite reports a page limit reached exactly as a full disk (SQLITE_FULL).
        let limit = |pages: u32| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    c.execute_batch(&format!("PRAGMA max_page_count = {pages};"))
                        .map_err(DbError::from)
                })
                .await
                .unwrap()
            }
        };
        let insert = |n: usize| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    c.execute(
                        "INSERT INTO item (name) VALUES (?1)",
                        [format!("{n:04}-{}", "x".repeat(500))],
                    )
                    .map_err(DbError::from)
                })
                .await
            }
        };
        let count = || async {
            db.read(|c| {
                c.query_row("SELECT COUNT(*) FROM item", [], |r| r.get::<_, i64>(0))
                    .map_err(DbError::from)
            })
            .await
            .unwrap()
        };
        limit(8).await;
        let mut written = 0;
        let full = loop {
            match insert(written).await {
                Ok(_) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 10_000, "the page limit never applied");
        };
        assert!(full.is_disk_full(), "{full}");
        let status = crate::status::storage("test.mip.example.com", &full);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("full"), "{}", status.message());
        // The failed write left nothing behind, and everything before it is intact.
        assert_eq!(count().await, written as i64);
        assert!(insert(written).await.unwrap_err().is_disk_full());

        limit(1_000_000).await;
        insert(written).await.unwrap();
        assert_eq!(count().await, written as i64 + 1);
    }

    #[test]
    fn read_only_data_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"file").unwrap();
        let err = Db::open(&blocker, "t.db", &migrations(), Durability::Full).unwrap_err();
        assert!(
            err.to_string().contains("cannot create data directory"),
            "{err}"
        );
    }
}
