//! The PostgreSQL backend's plumbing: a connection pool, versioned migrations per schema, the
//! one place PostgreSQL errors become [`DbError`]s, and a group-commit writer.
//!
//! tokio-postgres with deadpool-postgres rather than sqlx: the queries are hand-written either
//! way (no ORM, no compile-time checking against a live database in CI), and tokio-postgres
//! pipelines the statements of concurrent callers on one connection, which keeps round trips
//! out of the hot path without any batching code of ours.
//!
//! **Group commit.** As with SQLite, the writes of a store queue to a writer, which takes every
//! write that is waiting, runs them one after another in one transaction, commits once, and
//! answers each. Correctness does not depend on there being one writer: every rule (unique
//! emails, unique request ids, the order of the change log) is a constraint or a row lock in
//! the database, so writers in other processes interleave safely. Refusals (a taken email, a
//! reused request id) are found with statements that never raise (`ON CONFLICT DO NOTHING`),
//! because a failed statement aborts a PostgreSQL transaction and with it every write of the
//! group; only a storage failure fails a group, and it fails it whole, as a transient error.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_postgres::NoTls;
use tracing::{debug, info, warn};

use crate::CancellationToken;
use crate::store::{DbError, FailureLog};

/// Most writes grouped into one transaction.
const MAX_BATCH: usize = 1024;

/// Writes queued before callers wait for room.
const WRITE_QUEUE: usize = 8192;

/// Longest wait for a pooled connection (or for a new one to be made) before a call fails as
/// UNAVAILABLE, rather than hanging while the server is unreachable.
const POOL_WAIT: Duration = Duration::from_secs(5);

/// Backoff between connection attempts at start-up: from the first to the largest.
const CONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// A PostgreSQL server to use, parsed from its URL.
#[derive(Clone)]
pub struct PgOptions {
    /// Connection settings (the URL, with a password from PGPASSWORD or a passfile if the URL
    /// has none).
    config: tokio_postgres::Config,
    /// Connections kept at most.
    pool_size: usize,
    /// How logs and errors name the server: never with the password.
    name: String,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("server", &self.name)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PgOptions {
    /// Parses a `postgres://` URL. The password, if not in the URL, comes from `PGPASSWORD`
    /// or the passfile (`PGPASSFILE`, else `~/.pgpass`), as with libpq.
    pub fn parse(url: &str, pool_size: usize) -> Result<Self, DbError> {
        // The parser's message never repeats the URL, so the password stays out of it.
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| DbError::InvalidUrl(format!("not a valid PostgreSQL URL ({e})")))?;
        let name = describe(&config);
        if config.get_password().is_none()
            && let Some(password) = password_from_env(&config)
        {
            config.password(password);
        }
        // A connection to a server that vanished without a word (a pulled cable, a killed VM)
        // is noticed within seconds rather than the kernel's two hours.
        config
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(Duration::from_secs(15));
        // The server's side of the same: a process that vanished in the middle of a group
        // transaction (holding the log's counter row) is cut off after 30 s rather than when
        // the server's TCP keepalive notices, hours later; and a write waiting that long for a
        // lock fails as UNAVAILABLE instead of queueing every writer behind it. Appended to
        // any `options` the URL gives.
        let session = "-c idle_in_transaction_session_timeout=30000 -c lock_timeout=30000";
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {session}"),
            _ => session.to_owned(),
        };
        config.options(options);
        Ok(Self {
            config,
            pool_size: pool_size.max(2),
            name,
        })
    }

    /// The server as logs name it: `PostgreSQL at user@host:port/database`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// `PostgreSQL at user@host:port/db`, from the parsed settings, so no password can show.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().or(config.get_user()).unwrap_or("");
    format!("PostgreSQL at {user}{host}:{port}/{db}")
}

/// The password libpq would use: `PGPASSWORD`, else the first matching line of the passfile.
/// tokio-postgres reads neither, and no maintained crate parses passfiles, so this follows the
/// format libpq documents: `host:port:database:user:password`, `*` matching anything, `\`
/// escaping `:` and `\`.
fn password_from_env(config: &tokio_postgres::Config) -> Option<String> {
    if let Ok(password) = std::env::var("PGPASSWORD") {
        return Some(password);
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".pgpass"))
        })?;
    let text = std::fs::read_to_string(file).ok()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(_)) | None => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default();
    let db = config.get_dbname().unwrap_or(user);
    passfile_lookup(&text, &[&host, &port, db, user])
}

/// The password of the first passfile line whose four fields match `wanted`.
fn passfile_lookup(text: &str, wanted: &[&str; 4]) -> Option<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let mut fields = Vec::with_capacity(5);
            let mut field = String::new();
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => field.extend(chars.next()),
                    ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                    c => field.push(c),
                }
            }
            fields.push(field);
            let [host, port, db, user, password] = <[String; 5]>::try_from(fields).ok()?;
            let matches = [host, port, db, user]
                .iter()
                .zip(wanted)
                .all(|(pattern, value)| pattern == "*" || pattern == value);
            matches.then_some(password)
        })
}

/// A pool of connections to one PostgreSQL server.
#[derive(Clone)]
pub struct Pg {
    /// The connections.
    pool: Pool,
    /// How errors name the server.
    name: Arc<str>,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg").field("server", &self.name).finish()
    }
}

impl Pg {
    /// A pool for `options` (no connection is made yet), naming itself `application` to the
    /// server (`pg_stat_activity.application_name`).
    pub fn new(options: &PgOptions, application: &str) -> Result<Self, DbError> {
        let mut config = options.config.clone();
        config.application_name(application);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // Fast: a connection the server closed shows as closed and is dropped; one that
                // died silently fails its next statement, which the caller sees as UNAVAILABLE.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Open {
                database: options.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            pool,
            name: options.name.as_str().into(),
        })
    }

    /// Connects, retrying with backoff until the server answers (or `shutdown`), and brings
    /// `schema` up to date with `migrations`. Logs one line per kind of failure, not one per
    /// attempt. Wrong credentials or a missing database fail at once: waiting will not fix them.
    pub async fn connect(
        options: &PgOptions,
        schema: &str,
        migrations: &[&str],
        shutdown: &CancellationToken,
    ) -> Result<Self, DbError> {
        let pg = Self::new(options, &format!("mip-{schema}"))?;
        let mut backoff = CONNECT_BACKOFF.0;
        let mut last_logged: Option<String> = None;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = async {
                let mut client = pg.client().await?;
                migrate(&mut client, schema, migrations, &pg.name).await
            };
            match attempt.await {
                Ok(()) => {
                    info!(database = %pg.name, schema, attempts, "connected to PostgreSQL");
                    return Ok(pg);
                }
                Err(e) if e.is_transient() => {
                    let class = failure_class(&e);
                    if last_logged.as_deref() != Some(class.as_str()) {
                        warn!(
                            database = %pg.name,
                            error = %e,
                            "cannot reach PostgreSQL yet; retrying with backoff (health stays NOT_SERVING until connected)"
                        );
                        last_logged = Some(class);
                    } else {
                        debug!(database = %pg.name, error = %e, attempts, "still cannot reach PostgreSQL");
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return Err(DbError::Closed),
            }
            backoff = (backoff * 2).min(CONNECT_BACKOFF.1);
        }
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<Object, DbError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    /// The server as errors name it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Classifies an error of a statement on this server.
    pub fn error(&self, e: &tokio_postgres::Error) -> DbError {
        classify(e, &self.name)
    }

    fn pool_error(&self, e: PoolError) -> DbError {
        match e {
            PoolError::Backend(e) => classify(&e, &self.name),
            PoolError::Timeout(_) => DbError::Unavailable {
                database: self.name.to_string(),
                reason: format!(
                    "no connection within {}s (server unreachable, or every pooled connection busy)",
                    POOL_WAIT.as_secs()
                ),
            },
            PoolError::Closed => DbError::Closed,
            other => DbError::Other {
                database: self.name.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

/// What kind of failure this is, for logging each kind once: the message without the
/// details that change from one attempt to the next.
fn failure_class(e: &DbError) -> String {
    let text = e.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(&e, "PostgreSQL")
    }
}

/// The one place PostgreSQL errors are sorted: what is worth a retry, what is a constraint,
/// what is a full disk, and what is a bug.
pub fn classify(e: &tokio_postgres::Error, database: &str) -> DbError {
    let database = database.to_owned();
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection failed, closed or timed out (or a value did not convert,
        // which the stores' own types rule out).
        let reason = match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
        // Settings the server refused or that are missing (no password where one is asked
        // for, a TLS requirement): waiting will not fix them.
        let settings = reason.starts_with("invalid configuration")
            || reason.starts_with("authentication error")
            || reason.starts_with("error performing TLS handshake");
        if settings {
            return DbError::Open { database, reason };
        }
        let conversion = reason.starts_with("error serializing")
            || reason.starts_with("error deserializing")
            || reason.starts_with("invalid column")
            || reason.starts_with("query returned an unexpected number of rows");
        return if conversion {
            DbError::Other { database, reason }
        } else {
            DbError::Unavailable { database, reason }
        };
    };
    let code = db.code().code();
    let reason = format!("{} ({code})", db.message());
    match code {
        // serialization_failure, deadlock_detected: the transaction lost a race; run it again.
        "40001" | "40P01"
        // admin_shutdown, crash_shutdown, cannot_connect_now (starting up or shutting down)
        | "57P01" | "57P02" | "57P03"
        // too_many_connections, lock_not_available, query_canceled (statement timeout)
        | "53300" | "55P03" | "57014"
        // read_only_sql_transaction: a failed-over primary that is now a standby.
        | "25006" => DbError::Unavailable { database, reason },
        // connection_exception and its subclasses.
        c if c.starts_with("08") => DbError::Unavailable { database, reason },
        "23505" => DbError::UniqueViolation {
            constraint: db.constraint().unwrap_or("unknown").to_owned(),
        },
        "53100" => DbError::DiskFull { database, reason },
        // invalid_authorization_specification, invalid_password, invalid_catalog_name (no such
        // database), insufficient_privilege.
        "28000" | "28P01" | "3D000" | "42501" => DbError::Open { database, reason },
        _ => DbError::Other { database, reason },
    }
}

/// Brings `schema` to the newest of `migrations` (the first is version 1), under an advisory
/// lock so that several processes starting at once apply each step once.
async fn migrate(
    client: &mut Object,
    schema: &str,
    migrations: &[&str],
    database: &str,
) -> Result<(), DbError> {
    let failed = |e: tokio_postgres::Error| match classify(&e, database) {
        transient if transient.is_transient() => transient,
        other => DbError::Migration {
            database: database.to_owned(),
            reason: format!("schema {schema}: {other}"),
        },
    };
    // Session-level: held until unlocked, or until this connection dies.
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext('mip.migrate.' || $1::text))",
            &[&schema],
        )
        .await
        .map_err(failed)?;
    let result = async {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                     version    BIGINT PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 );"
            ))
            .await
            .map_err(failed)?;
        let applied: i64 = client
            .query_one(
                &format!("SELECT COALESCE(MAX(version), 0) FROM {schema}.schema_migrations"),
                &[],
            )
            .await
            .map_err(failed)?
            .get(0);
        let known = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
        if applied > known {
            return Err(DbError::Migration {
                database: database.to_owned(),
                reason: format!(
                    "schema {schema} is at version {applied}, newer than this build knows \
                     ({known}); run the newer mip that migrated it"
                ),
            });
        }
        for (version, step) in (1i64..)
            .zip(migrations)
            .skip(usize::try_from(applied).unwrap_or(0))
        {
            let tx = client.transaction().await.map_err(failed)?;
            tx.batch_execute(step).await.map_err(failed)?;
            tx.execute(
                &format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"),
                &[&version],
            )
            .await
            .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            info!(database, schema, version, "applied schema migration");
        }
        Ok(())
    }
    .await;
    let unlocked = client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('mip.migrate.' || $1::text))",
            &[&schema],
        )
        .await;
    result?;
    unlocked.map_err(failed)?;
    Ok(())
}

/// A store's writes, run as one group in one transaction.
#[async_trait]
pub trait Batch: Send + Sync + 'static {
    /// One queued write. Cloned so that a group that fails for a reason other than the
    /// database being unavailable can be run again write by write, to find the one at fault.
    type Op: Clone + Send + 'static;
    /// Its answer (typically a `Result` carrying the domain's refusals).
    type Reply: Send + 'static;
    /// Runs every write of the group in `tx`, in order, and answers each, in order. An error
    /// fails the whole group: nothing of it is committed.
    async fn run(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        ops: Vec<Self::Op>,
    ) -> Result<Vec<Self::Reply>, DbError>;
}

/// A write waiting for a writer.
struct Job<B: Batch> {
    /// The write.
    op: B::Op,
    /// Where its caller waits.
    reply: oneshot::Sender<Result<B::Reply, DbError>>,
}

/// The group-commit writers of one store.
pub struct Writer<B: Batch> {
    /// Queue of the writer tasks.
    queue: mpsc::Sender<Job<B>>,
}

impl<B: Batch> Clone for Writer<B> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<B: Batch> std::fmt::Debug for Writer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl<B: Batch> Writer<B> {
    /// Starts `writers` tasks that group-commit the writes queued to them. Two let one group
    /// run its statements while the one before it waits for its commit to be flushed.
    pub fn spawn(pg: Pg, batch: Arc<B>, writers: usize) -> Self {
        let (queue, receiver) = mpsc::channel(WRITE_QUEUE);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer_loop(
                pg.clone(),
                Arc::clone(&batch),
                Arc::clone(&receiver),
            ));
        }
        Self { queue }
    }

    /// Runs `op` in the next group commit; answers once that commit is durable.
    pub async fn write(&self, op: B::Op) -> Result<B::Reply, DbError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { op, reply })
            .await
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }
}

/// One writer: take what is waiting, run it in one transaction, commit, answer.
async fn writer_loop<B: Batch>(pg: Pg, batch: Arc<B>, queue: Arc<Mutex<mpsc::Receiver<Job<B>>>>) {
    let mut failures = FailureLog::default();
    loop {
        let mut jobs = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            jobs.push(first);
            while jobs.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        let size = jobs.len();
        let (ops, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.op, j.reply)).unzip();
        // Kept only for a group of several, in case it must be run again write by write.
        let retry = (size > 1).then(|| ops.clone());
        match run_group(&pg, &*batch, ops).await {
            Ok(answers) => {
                debug!(size, "group commit");
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            // Not the database going away, but one write raising (a constraint no store
            // expected, say): the rest of the group must not get that write's error, or lose
            // their writes to it. Each runs again alone, so only the culprit fails.
            Err(e) if !e.is_transient() && retry.is_some() => {
                failures.failed(
                    pg.name(),
                    &e,
                    "a write failed its group commit; running the group's writes one by one",
                );
                for (reply, op) in replies.into_iter().zip(retry.into_iter().flatten()) {
                    let answer = run_group(&pg, &*batch, vec![op])
                        .await
                        .map(|mut answers| answers.remove(0));
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                failures.failed(
                    pg.name(),
                    &e,
                    "group commit failed; every write of it was rolled back",
                );
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn run_group<B: Batch>(
    pg: &Pg,
    batch: &B,
    ops: Vec<B::Op>,
) -> Result<Vec<B::Reply>, DbError> {
    let expected = ops.len();
    let mut client = pg.client().await?;
    // READ COMMITTED whatever the server's default: `ON CONFLICT DO NOTHING` then a read of
    // the winner's row relies on each statement seeing what committed before it.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(|e| pg.error(&e))?;
    let answers = batch.run(&tx, ops).await?;
    if answers.len() != expected {
        return Err(DbError::Other {
            database: pg.name().to_owned(),
            reason: format!(
                "a group of {expected} writes gave {} answers",
                answers.len()
            ),
        });
    }
    // A commit whose answer is lost (the connection died) may have committed: callers get
    // UNAVAILABLE and retry, which every write makes safe with its request id.
    tx.commit().await.map_err(|e| pg.error(&e))?;
    Ok(answers)
}

/// A store that connects in the background: calls fail with UNAVAILABLE until it is ready,
/// so a service can serve health (NOT_SERVING) while its database is still unreachable.
pub struct Connecting<T> {
    /// Set once connected.
    value: OnceLock<T>,
    /// `None` while connecting; then whether it worked.
    outcome: watch::Sender<Option<Result<(), DbError>>>,
    /// How errors name the server.
    name: String,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Connecting<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connecting")
            .field("server", &self.name)
            .field("ready", &self.value.get().is_some())
            .finish()
    }
}

impl<T: Send + Sync + 'static> Connecting<T> {
    /// Runs `start` in the background and keeps what it makes.
    pub fn spawn<F>(name: &str, start: F) -> Arc<Self>
    where
        F: Future<Output = Result<T, DbError>> + Send + 'static,
    {
        let this = Arc::new(Self {
            value: OnceLock::new(),
            outcome: watch::channel(None).0,
            name: name.to_owned(),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            let result = start.await;
            let Some(this) = weak.upgrade() else { return };
            let outcome = result.map(|value| {
                let _ = this.value.set(value);
            });
            this.outcome.send_replace(Some(outcome));
        });
        this
    }

    /// The store, or UNAVAILABLE while still connecting.
    pub fn get(&self) -> Result<&T, DbError> {
        self.value.get().ok_or_else(|| DbError::Unavailable {
            database: self.name.clone(),
            reason: "not connected yet (the service is starting)".into(),
        })
    }

    /// Resolves once connected, or with the error that stopped connecting.
    pub async fn ready(&self) -> Result<&T, DbError> {
        let mut outcome = self.outcome.subscribe();
        let result = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| DbError::Closed)?
            .clone()
            .expect("waited for Some");
        result?;
        self.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_name_the_server_without_its_password() {
        let options =
            PgOptions::parse("postgres://mip:s3cret@db.example:6543/platform", 4).unwrap();
        assert_eq!(options.name(), "PostgreSQL at mip@db.example:6543/platform");
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[test]
    fn a_bad_url_is_refused_without_repeating_it() {
        let err = PgOptions::parse("postgres://mip:s3cret@host:notaport/db", 4).unwrap_err();
        assert!(
            err.to_string().contains("not a valid PostgreSQL URL"),
            "{err}"
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn passfile_lines_match_field_by_field_with_wildcards_and_escapes() {
        let file = "# comment\n\
                    other:5432:*:*:wrong\n\
                    db.example:*:platform:mip:pa\\:ss\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            passfile_lookup(file, &["db.example", "6543", "platform", "mip"]),
            Some("pa:ss".into())
        );
        assert_eq!(
            passfile_lookup(file, &["elsewhere", "5432", "x", "y"]),
            Some("fallback".into())
        );
        assert_eq!(passfile_lookup("a:b:c\n", &["a", "b", "c", "d"]), None);
    }
}
