//! What the tests that run the real `mip` binary share: starting it, running it to completion,
//! and making sure no process outlives its test.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const MIP: &str = env!("CARGO_BIN_EXE_mip");

/// Longest a one-shot `mip` command (`--help`, `health`) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// `mip` with no `MIP_*` variable inherited from whoever runs the tests.
pub fn mip() -> Command {
    let mut command = Command::new(MIP);
    without_mip_env(&mut command);
    command.env("RUST_LOG", "info").stdin(Stdio::null());
    command
}

/// Keeps `command` from inheriting any `MIP_*` variable of whoever runs the tests.
pub fn without_mip_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MIP_") {
            command.env_remove(name);
        }
    }
}

/// Runs `mip <args>` to completion, with a bound on how long it may take; returns its status
/// and stdout.
pub fn run_mip<S: AsRef<OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &BTreeMap<String, String>,
) -> (ExitStatus, String) {
    let (status, stdout, _) = run_mip_with_stderr(args, env);
    (status, stdout)
}

/// [`run_mip`], also returning what it wrote to stderr.
pub fn run_mip_with_stderr<S: AsRef<OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &BTreeMap<String, String>,
) -> (ExitStatus, String, String) {
    let mut command = mip();
    command.args(args).envs(env);
    run_bounded(command)
}

/// Runs `command` to completion, with a bound on how long it may take; returns its status,
/// stdout and stderr.
pub fn run_bounded(mut command: Command) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let out = File::create(&out_path).unwrap();
    let err = File::create(&err_path).unwrap();
    let mut child = command
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start the command");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("process status") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        std::fs::read_to_string(out_path).unwrap(),
        std::fs::read_to_string(err_path).unwrap(),
    )
}

/// A port nothing listens on right now: bind an ephemeral one, read it, let it go.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// A running `mip` process. Dropping it kills and reaps the process, on every exit path,
/// including a failing assertion; while panicking it also prints the end of its log.
pub struct Process {
    /// What it runs (`crm`, `inventory`, `integration`), for messages.
    pub name: String,
    /// The process, until killed.
    child: Option<Child>,
    /// Its stdout and stderr, appended across restarts.
    log: PathBuf,
}

impl Process {
    /// Starts `mip <args>` with `env` added, appending its output to `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
        log_dir: &Path,
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = mip()
            .args(args)
            .envs(env)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start mip");
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// Whether it has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("process status"))
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process runs").id()
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(file) = File::open(&self.log) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }
}
