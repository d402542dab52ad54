//! A private PostgreSQL server for tests: `initdb` into a temporary directory, a unix socket
//! in that directory and an ephemeral TCP port on loopback, `fsync=off`. No system service, no
//! fixed port, and nothing left behind: the server is started under `setpriv --pdeathsig`, so
//! it stops when the test process ends, however it ends, and a janitor started the same way
//! then deletes its directory (the shared server lives in a static, which is never dropped).
//!
//! `initdb` refuses to run as root, so as root the server runs as the `postgres` user. Where
//! PostgreSQL's binaries are missing, [`shared`] prints one line and returns `None` (the
//! PostgreSQL tests then skip), unless `MIP_REQUIRE_POSTGRES=1`, which turns that into a
//! failure: CI sets it, so CI always runs them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Set to `1` to make missing PostgreSQL binaries a failure instead of a skip.
pub const REQUIRE_ENV: &str = "MIP_REQUIRE_POSTGRES";

/// How long a server gets to accept connections after starting.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A PostgreSQL server of the test process's own.
#[derive(Debug)]
pub struct PgServer {
    /// Holds the data directory and the socket; removed on drop.
    root: tempfile::TempDir,
    /// Where the binaries are.
    bin: PathBuf,
    /// The loopback port it listens on.
    port: u16,
    /// The running postmaster, if started.
    child: Mutex<Option<Child>>,
    /// Whether commands run as the `postgres` user (the tests run as root).
    as_postgres: bool,
}

impl PgServer {
    /// A new server, running. `Err` says why not (no binaries, initdb failed, ...).
    pub fn start() -> Result<Self, String> {
        let bin = binaries().ok_or("PostgreSQL binaries (initdb, postgres) not found")?;
        let root = tempfile::Builder::new()
            .prefix("mip-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(root.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err("cannot hand the temp dir to the postgres user".into());
            }
        }
        spawn_janitor(root.path())?;
        let server = Self {
            root,
            bin,
            port: 0,
            child: Mutex::new(None),
            as_postgres,
        };
        let output = server
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg("-D")
            .arg(server.data_dir())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let mut server = server;
        let mut last = String::new();
        // A port picked free can be taken before the server binds it; try a few.
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A server of the test's own (for tests that stop and restart it), or `None`, after one
    /// line saying why, where PostgreSQL cannot start; with `MIP_REQUIRE_POSTGRES=1` that is a
    /// failure instead.
    pub fn start_or_skip() -> Option<PgServer> {
        match PgServer::start() {
            Ok(server) => Some(server),
            Err(e) if required() => panic!("{REQUIRE_ENV}=1, but PostgreSQL cannot start: {e}"),
            Err(e) => {
                eprintln!("skipping a PostgreSQL test: {e}");
                None
            }
        }
    }

    /// The server every PostgreSQL test of this process shares (each in its own database),
    /// or `None`, after one line saying so, where PostgreSQL is not installed.
    pub fn shared() -> Option<&'static PgServer> {
        static SHARED: OnceLock<Option<PgServer>> = OnceLock::new();
        SHARED
            .get_or_init(|| match PgServer::start() {
                Ok(server) => Some(server),
                Err(e) if required() => panic!("{REQUIRE_ENV}=1, but PostgreSQL cannot start: {e}"),
                Err(e) => {
                    eprintln!(
                        "skipping the PostgreSQL tests: {e} (install PostgreSQL, or set {REQUIRE_ENV}=1 to fail instead)"
                    );
                    None
                }
            })
            .as_ref()
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mip_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs one SQL command as the superuser on the `postgres` database; panics on failure.
    pub fn psql(&self, sql: &str) {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server the way a crash would (`immediate`: no checkpoint, clients cut off).
    pub fn kill(&self) {
        let child = self.child.lock().expect("child lock").take();
        if let Some(mut child) = child {
            // SIGQUIT is PostgreSQL's immediate shutdown.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port after [`PgServer::kill`].
    pub fn restart(&self) {
        self.spawn().expect("restart PostgreSQL");
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn spawn(&self) -> Result<(), String> {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.root.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.root.path().join("server.log"))
                    .map_err(|e| format!("server log: {e}"))?,
            ));
        let mut child = spawn_from_keeper(command)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.root.path().join("server.log"))
                    .unwrap_or_default();
                return Err(format!("postgres exited ({status}): {log}"));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                *self.child.lock().expect("child lock") = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("postgres did not accept connections within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command for one of the server's binaries, as the `postgres` user where needed, that
    /// the kernel stops (SIGQUIT: immediate shutdown) when the thread that started it ends.
    fn command(&self, binary: &str) -> Command {
        let mut command = Command::new("setpriv");
        if self.as_postgres {
            command.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
        }
        command
            .args(["--pdeathsig=QUIT", "--"])
            .arg(self.bin.join(binary))
            .current_dir(self.root.path());
        command
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `command` from a thread that lives as long as the test process, because the kernel
/// sends the parent-death signal when the *thread* that forked a child ends, and test threads
/// end with their test.
fn spawn_from_keeper(command: Command) -> Result<Child, String> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || {
                for (mut command, answer) in incoming {
                    let _ = answer.send(command.spawn());
                }
                // The sender is static, so this thread only ends with the process.
            })
            .expect("start the postgres keeper thread");
        Mutex::new(requests)
    });
    let (answer, child) = mpsc::channel();
    keeper
        .lock()
        .expect("keeper lock")
        .send((command, answer))
        .map_err(|_| "postgres keeper thread is gone".to_string())?;
    child
        .recv()
        .map_err(|_| "postgres keeper thread is gone".to_string())?
        .map_err(|e| format!("start postgres: {e}"))
}

/// Deletes `dir` once the test process has ended (and, with it, the server: both get their
/// parent-death signal at once, so the janitor gives the server a moment to stop first).
fn spawn_janitor(dir: &Path) -> Result<(), String> {
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig=TERM", "--", "sh", "-c"])
        .arg(r#"trap 'sleep 2; rm -rf "$0"; exit 0' TERM; while :; do sleep 1 & wait $!; done"#)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    spawn_from_keeper(command).map(drop)
}

/// Whether missing PostgreSQL is a failure.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// The directory holding `initdb` and `postgres`: Debian's newest version, else `PATH`.
fn binaries() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("postgres").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    if let Some(newest) = versions.pop() {
        return Some(newest);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
    })
}
