//! The data directory as an operator meets it. `mip all` and the per-service commands keep the
//! same files in it, so data written by one is there under the other. A data directory the
//! service cannot write must refuse to start with an error that names the directory, rather
//! than start and fail every write later (SQLite would quietly open a read-only file
//! read-only). A full disk is covered where it can be made deterministic, in
//! `mip_runtime::sqlite`'s tests (SQLite's page limit fails writes exactly as a full disk does).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{MIP, Process, mip, run_bounded, run_mip, without_mip_env};
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::crm::v1::{CreateCustomerRequest, GetCustomerRequest};
use mip_proto::integration::v1::integration_service_client::IntegrationServiceClient;
use mip_proto::integration::v1::{GetStatusRequest, GetStatusResponse};
use mip_proto::inventory::v1::ListPackageRequestsRequest;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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

/// Longest the layout test may take; generous, so a slow machine never fails it.
const LAYOUT_TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a process gets to report SERVING, and the platform to catch up.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between two looks at a condition that is not true yet.
const POLL_EVERY: Duration = Duration::from_millis(50);

fn endpoint(port: u16) -> Endpoint {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
}

async fn serving(port: u16) -> bool {
    let Ok(channel) = endpoint(port).connect().await else {
        return false;
    };
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    matches!(response, Ok(r) if r.get_ref().status() == ServingStatus::Serving)
}

/// Starts `mip` with the arguments `args` builds for free ports, and waits until every one of
/// them serves; if it exits first (most likely because another process took a port in the
/// meantime), tries again on other ports.
async fn launch<const N: usize>(
    name: &str,
    log_dir: &Path,
    args: impl Fn([u16; N]) -> Vec<String>,
) -> (Process, [u16; N]) {
    for _ in 0..3 {
        let ports = [(); N].map(|()| common::free_port());
        let mut process = Process::spawn(name, &args(ports), &BTreeMap::new(), log_dir);
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let mut all = true;
            for port in ports {
                all &= serving(port).await;
            }
            if all {
                return (process, ports);
            }
            if let Some(status) = process.exited() {
                eprintln!(
                    "{name} exited before serving on {ports:?} ({status}); trying other ports:\n{}",
                    process.log_tail(5)
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not report SERVING within {CONVERGE_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    panic!("{name} could not be started");
}

/// Stops `process` with SIGTERM, as Ctrl-C would, and waits until it has exited cleanly (so
/// the integration service has given up its partitions, and the next one need not wait out
/// their leases).
async fn terminate(mut process: Process) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &process.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {}", process.name);
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            assert!(
                status.success(),
                "{} stopped cleanly: {status}",
                process.name
            );
            return;
        }
        assert!(Instant::now() < deadline, "{} did not stop", process.name);
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn create_customer(crm: &mut CrmServiceClient<Channel>, name: &str, email: &str) -> String {
    crm.create_customer(CreateCustomerRequest {
        name: name.to_owned(),
        email: email.to_owned(),
        request_id: String::new(),
    })
    .await
    .expect("CreateCustomer")
    .into_inner()
    .id
}

/// The welcome packages Inventory holds for `customer_id`.
async fn packages_of(inventory: &mut InventoryServiceClient<Channel>, customer_id: &str) -> usize {
    inventory
        .list_package_requests(ListPackageRequestsRequest {
            customer_id: customer_id.to_owned(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("ListPackageRequests")
        .into_inner()
        .package_requests
        .len()
}

/// GetStatus once the integration service has handled every CRM event up to
/// `sequence`, streaming, with every partition it holds saved at least that far.
async fn caught_up(port: u16, sequence: i64) -> GetStatusResponse {
    let mut integration = IntegrationServiceClient::new(endpoint(port).connect_lazy());
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if let Ok(status) = integration.get_status(GetStatusRequest {}).await {
            let status = status.into_inner();
            if status.stream_connected
                && status.lag_events == 0
                && status.checkpoint_sequence >= sequence
                && !status.partitions.is_empty()
                && status
                    .partitions
                    .iter()
                    .all(|p| p.checkpoint_sequence >= sequence)
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the integration service did not catch up to {sequence}: {status:?}"
            );
        }
        assert!(Instant::now() < deadline, "GetStatus kept failing");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The database files in `dir` (SQLite's `-wal` and `-shm` companions left out), and whether
/// it has any subdirectory.
fn databases_in(dir: &Path) -> (BTreeSet<String>, bool) {
    let mut files = BTreeSet::new();
    let mut subdirectories = false;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            subdirectories = true;
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with("-wal") && !name.ends_with("-shm") {
            files.insert(name);
        }
    }
    (files, subdirectories)
}

/// `mip all` and the per-service commands keep the same files in the same directory: a
/// customer, its package and the integration checkpoint written by one are what the other
/// finds, and the services started separately carry on from there without delivering again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_mip_all_stored_is_there_when_the_services_run_separately_on_the_same_data_dir() {
    tokio::time::timeout(LAYOUT_TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        let data = dir.path().join("data");
        let data_dir = data.display().to_string();
        let listen = |port: u16| format!("127.0.0.1:{port}");

        let (all, [crm_port, inventory_port, integration_port]) =
            launch("all", logs, |[crm, inventory, integration]| {
                vec![
                    "all".to_owned(),
                    "--data-dir".to_owned(),
                    data_dir.clone(),
                    "--crm-listen".to_owned(),
                    listen(crm),
                    "--inventory-listen".to_owned(),
                    listen(inventory),
                    "--integration-listen".to_owned(),
                    listen(integration),
                ]
            })
            .await;
        let mut crm = CrmServiceClient::new(endpoint(crm_port).connect_lazy());
        let mut inventory = InventoryServiceClient::new(endpoint(inventory_port).connect_lazy());
        let ada = create_customer(&mut crm, "Ada Lovelace", "ada@example.com").await;
        let before = caught_up(integration_port, 1).await;
        assert_eq!(packages_of(&mut inventory, &ada).await, 1);
        terminate(all).await;
        let (files, _) = databases_in(&data);
        assert_eq!(
            files,
            BTreeSet::from(["crm.db", "integration.db", "inventory.db"].map(String::from)),
            "mip all keeps one file per service directly in --data-dir"
        );

        let service = |command: &str, port: u16| {
            vec![
                command.to_owned(),
                "--listen".to_owned(),
                listen(port),
                "--data-dir".to_owned(),
                data_dir.clone(),
            ]
        };
        let (_crm, [crm_port]) = launch("crm", logs, |[port]| service("crm", port)).await;
        let (_inventory, [inventory_port]) =
            launch("inventory", logs, |[port]| service("inventory", port)).await;
        let (_integration, [integration_port]) = launch("integration", logs, |[port]| {
            let mut args = service("integration", port);
            args.extend([
                "--crm-addr".to_owned(),
                listen(crm_port),
                "--inventory-addr".to_owned(),
                listen(inventory_port),
            ]);
            args
        })
        .await;
        let mut crm = CrmServiceClient::new(endpoint(crm_port).connect_lazy());
        let mut inventory = InventoryServiceClient::new(endpoint(inventory_port).connect_lazy());

        let customer = crm
            .get_customer(GetCustomerRequest { id: ada.clone() })
            .await
            .expect("mip crm finds the customer mip all created")
            .into_inner();
        assert_eq!(customer.email, "ada@example.com");
        assert_eq!(
            packages_of(&mut inventory, &ada).await,
            1,
            "mip inventory finds the package mip all created"
        );
        let after = caught_up(integration_port, before.checkpoint_sequence).await;
        assert_eq!(
            after.checkpoint, before.checkpoint,
            "mip integration resumes from mip all's checkpoint"
        );
        assert_eq!(
            after.delivered, 0,
            "nothing before the checkpoint is delivered again"
        );

        // And the separate services carry on where `mip all` stopped.
        let grace = create_customer(&mut crm, "Grace Hopper", "grace@example.com").await;
        let after = caught_up(integration_port, before.checkpoint_sequence + 1).await;
        assert_eq!(after.delivered, 1, "{after:?}");
        assert_eq!(packages_of(&mut inventory, &grace).await, 1);
        assert_eq!(packages_of(&mut inventory, &ada).await, 1);
        assert_eq!(
            databases_in(&data),
            (files, false),
            "the services run separately use the same files, and make no directory of their own"
        );
    })
    .await
    .expect("test did not finish in time");
}
