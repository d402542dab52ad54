//! `mip`'s logs as a log collector reads them: with `--log-format json` (or `MIP_LOG_FORMAT=json`)
//! every line on stderr is one JSON object with stable field names, the ready line carries the
//! address, and SIGTERM drains the server and exits 0. A start that fails (a port another `mip`
//! holds) says why in one line, once, with what to do.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
const MIP: &str = env!("CARGO_BIN_EXE_mip");

/// How long the server gets to log its ready line, and to stop after SIGTERM; generous, so a
/// slow machine never fails the test.
const WAIT: Duration = Duration::from_secs(60);

/// A running `mip` whose stderr is read line by line. Dropping it kills and reaps the process,
/// on every exit path, including a failing assertion; while panicking it also prints what the
/// process logged.
struct Process {
    /// The process, until it exits or is killed.
    child: Option<Child>,
    /// Stderr lines, read by a thread so that reads can be bounded in time.
    lines: Receiver<String>,
    /// Every line read so far.
    seen: Vec<String>,
}

impl Process {
    /// Starts `mip <args>` with `env` added and no inherited `MIP_*` variable.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(MIP);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MIP_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mip");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, lines) = std::sync::mpsc::channel();
        // Ends by itself when the process's stderr closes.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// The next stderr line, `None` once stderr is closed; fails the test at `deadline`.
    fn next_line(&mut self, deadline: Instant, waiting_for: &str) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no {waiting_for} within {WAIT:?}"),
        }
    }

    /// Sends SIGTERM, as `docker stop` and Kubernetes do.
    fn terminate(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
    }

    /// Waits for the process to exit, failing the test at `deadline`.
    fn wait(&mut self, deadline: Instant) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("process status") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "mip did not exit within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- mip's stderr:\n{}", self.seen.join("\n"));
        }
    }
}

/// Parses one log line, checking the fields every line has; returns it.
fn json_line(line: &str) -> Value {
    let value: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
    assert!(value.is_object(), "not a JSON object: {line}");
    for field in ["timestamp", "level", "target"] {
        assert!(
            value.get(field).is_some_and(Value::is_string),
            "no string `{field}`: {line}"
        );
    }
    assert!(
        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&value["level"].as_str().unwrap()),
        "`level` is a level name: {line}"
    );
    assert!(
        value
            .get("fields")
            .and_then(|f| f.get("message"))
            .is_some_and(Value::is_string),
        "no string `fields.message`: {line}"
    );
    value
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

/// Runs CRM (JSON logs asked for by flag or through `env`) until it logs that it serves, then
/// sends SIGTERM, and checks the whole log: one JSON object per line, the ready line's address,
/// and a clean stop.
fn serve_then_terminate(data_dir: &Path, log_format_flag: bool, env: &[(&str, &str)]) {
    let data_dir = data_dir.display().to_string();
    let mut args = vec!["crm", "--listen", "127.0.0.1:0", "--data-dir", &data_dir];
    if log_format_flag {
        args.extend(["--log-format", "json"]);
    }
    let mut mip = Process::spawn(&args, env);

    let deadline = Instant::now() + WAIT;
    let serving = loop {
        let line = mip
            .next_line(deadline, "\"CRM listening\" line")
            .expect("mip exited before listening");
        let line = json_line(&line);
        if message(&line).starts_with("CRM listening") {
            break line;
        }
    };
    let addr: SocketAddr = serving["fields"]["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("the serving line has an `addr` field: {serving}"))
        .parse()
        .unwrap_or_else(|e| panic!("`addr` is the address served on ({e}): {serving}"));
    assert!(
        addr.ip().is_loopback() && addr.port() != 0,
        "`addr` is the bound address, not the requested one: {addr}"
    );

    mip.terminate();
    let deadline = Instant::now() + WAIT;
    let mut stopped = false;
    while let Some(line) = mip.next_line(deadline, "end of the log after SIGTERM") {
        stopped |= message(&json_line(&line)) == "server stopped";
    }
    let status = mip.wait(deadline);
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop: {status}");
    assert!(stopped, "the log says \"server stopped\"");
}

#[test]
fn log_format_json_writes_one_json_object_per_line_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    serve_then_terminate(dir.path(), true, &[]);
}

#[test]
fn mip_log_format_env_writes_the_same_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    serve_then_terminate(dir.path(), false, &[("MIP_LOG_FORMAT", "json")]);
}

/// Starts CRM on a free loopback port and returns it, once it has logged the address it
/// serves on, with that address.
fn crm_holding_a_port(data_dir: &Path) -> (Process, SocketAddr) {
    let data_dir = data_dir.display().to_string();
    let mut crm = Process::spawn(
        &[
            "crm",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--log-format",
            "json",
        ],
        &[],
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let line = crm
            .next_line(deadline, "\"CRM listening\" line")
            .expect("mip exited before listening");
        let line = json_line(&line);
        if message(&line).starts_with("CRM listening") {
            let addr = line["fields"]["addr"].as_str().expect("an `addr` field");
            return (crm, addr.parse().expect("`addr` is an address"));
        }
    }
}

/// The non-empty lines `mip <args>` writes to stderr before it exits, with its exit code.
fn stderr_of_failed_start(args: &[&str]) -> (Option<i32>, Vec<String>) {
    let mut command = common::mip();
    command.args(args);
    let (status, _, stderr) = common::run_bounded(command);
    let lines = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    (status.code(), lines)
}

#[test]
fn a_port_another_mip_holds_is_one_line_naming_the_address_and_the_flag_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let (_crm, addr) = crm_holding_a_port(&dir.path().join("first"));
    let second = dir.path().join("second").display().to_string();

    let (code, lines) =
        stderr_of_failed_start(&["crm", "--listen", &addr.to_string(), "--data-dir", &second]);
    assert_eq!(code, Some(1), "a port in use is a failed start: {lines:?}");
    assert_eq!(lines.len(), 1, "one line, said once: {lines:?}");
    let expected = format!(
        "{addr} is already in use; is another mip running? pass --listen to use another port"
    );
    assert!(lines[0].ends_with(&expected), "{lines:?}");
    assert!(!lines[0].contains("os error"), "no raw OS error: {lines:?}");

    // `mip all` names its own flag for the service whose port is taken.
    let (code, lines) = stderr_of_failed_start(&[
        "all",
        "--crm-listen",
        &addr.to_string(),
        "--inventory-listen",
        "127.0.0.1:0",
        "--integration-listen",
        "127.0.0.1:0",
        "--data-dir",
        &second,
    ]);
    assert_eq!(code, Some(1), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with(&format!(
            "{addr} is already in use; is another mip running? pass --crm-listen to use another port"
        )),
        "{lines:?}"
    );
}

#[test]
fn a_port_in_use_with_json_logs_is_one_json_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let (_crm, addr) = crm_holding_a_port(&dir.path().join("first"));
    let second = dir.path().join("second").display().to_string();

    let (code, lines) = stderr_of_failed_start(&[
        "inventory",
        "--listen",
        &addr.to_string(),
        "--data-dir",
        &second,
        "--log-format",
        "json",
    ]);
    assert_eq!(code, Some(1), "{lines:?}");
    assert_eq!(
        lines.len(),
        1,
        "only the log line, no plain copy: {lines:?}"
    );
    let line = json_line(&lines[0]);
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(
        message(&line),
        format!(
            "{addr} is already in use; is another mip running? pass --listen to use another port"
        )
    );
}

#[test]
fn a_failed_start_is_reported_even_when_rust_log_hides_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_crm, addr) = crm_holding_a_port(&dir.path().join("first"));
    let second = dir.path().join("second").display().to_string();

    let mut command = common::mip();
    command
        .args(["crm", "--listen", &addr.to_string(), "--data-dir", &second])
        .env("RUST_LOG", "off");
    let (status, _, stderr) = common::run_bounded(command);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "mip: {addr} is already in use; is another mip running? pass --listen to use another port"
        )
    );
}
