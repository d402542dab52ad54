//! A data directory the service cannot write: it must refuse to start with an error that names
//! the directory, rather than start and fail every write later (SQLite would quietly open a
//! read-only file read-only). A full disk is covered where it can be made deterministic, in
//! `mip_runtime::sqlite`'s tests (SQLite's page limit fails writes exactly as a full disk does).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{MIP, mip, run_bounded, run_mip, without_mip_env};

/// An unprivileged user, for when the tests run as root (which file permissions do not stop).
const NOBODY: &str = "65534";

fn running_as_root() -> bool {
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

/// `mip <args>` as a user that file permissions apply to.
fn mip_as_unprivileged(args: &[&str]) -> Command {
    if !running_as_root() {
        let mut command = mip();
        command.args(args);
        return command;
    }
    // setpriv is part of util-linux, on every Debian system.
    let mut command = Command::new("setpriv");
    command
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            MIP,
        ])
        .args(args);
    without_mip_env(&mut command);
    command
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A temporary directory others may enter (tempdir makes it private to its owner).
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    dir
}

fn start_crm(data: &Path) -> (std::process::ExitStatus, String) {
    let data = data.display().to_string();
    let command = mip_as_unprivileged(&[
        "crm",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.as_str(),
    ]);
    let (status, _, stderr) = run_bounded(command);
    (status, stderr)
}

#[test]
fn a_read_only_data_directory_stops_the_service_with_an_error_naming_it() {
    let dir = shared_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o555);

    let (status, stderr) = start_crm(&data);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write in the data directory") && stderr.contains("data"),
        "{stderr}"
    );
    set_mode(&data, 0o755);
}

#[test]
fn read_only_database_files_stop_the_service_instead_of_failing_every_write() {
    let dir = shared_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let created = create_crm_database(&data);
    // The folder stays writable (by the user the service runs as): only the database files
    // are read-only.
    for file in std::fs::read_dir(&data).unwrap() {
        set_mode(&file.unwrap().path(), 0o444);
    }
    if running_as_root() {
        let nobody = NOBODY.parse().unwrap();
        std::os::unix::fs::chown(&data, Some(nobody), Some(nobody)).unwrap();
    }
    assert!(created.exists());

    let (status, stderr) = start_crm(&data);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("crm.db") && stderr.contains("the file is read-only"),
        "{stderr}"
    );
}

/// Creates CRM's database by starting CRM once and killing it when it serves (a killed CRM
/// leaves a valid database: that is what the write-ahead log is for).
fn create_crm_database(data: &Path) -> std::path::PathBuf {
    let port = common::free_port();
    let mut process = common::Process::spawn(
        "crm",
        &[
            "crm".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--data-dir".to_owned(),
            data.display().to_string(),
        ],
        &BTreeMap::new(),
        data.parent().unwrap(),
    );
    let db = data.join("crm.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, _) = run_mip(
            &[
                "health",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--timeout",
                "1s",
            ],
            &BTreeMap::new(),
        );
        if status.success() {
            break;
        }
        assert!(
            process.exited().is_none(),
            "crm exited: {}",
            process.log_tail(10)
        );
        assert!(std::time::Instant::now() < deadline, "crm did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    process.kill();
    db
}
