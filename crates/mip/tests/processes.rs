//! The `mip` binary as an operator runs it: CRM, Inventory and the integration service as three
//! separate processes on loopback ports, checked only through their public gRPC APIs. The
//! integration process is killed with SIGKILL mid-load, so nothing it had not written down
//! survives, and every customer must still end up with exactly one welcome package. On
//! PostgreSQL, the services start before the database, wait for it with health NOT_SERVING,
//! and ride out its crash and restart without being restarted themselves; and an integration
//! worker stopped with SIGSTOP past its lease is fenced when it wakes up.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Process, free_port, run_mip};
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::crm::v1::{CreateCustomerRequest, ListCustomersRequest};
use mip_proto::inventory::v1::ListPackageRequestsRequest;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_testkit::postgres::PgServer;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest the load test may take; generous, so a slow machine never fails it.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// How long a process gets to report SERVING, and the platform to serve every customer.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between two looks at a condition that is not true yet.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Customers created by the load test.
const CUSTOMERS: usize = 2000;

/// After how many of them the integration process is killed.
const KILL_AFTER: usize = 700;

/// Customers created at once.
const CREATE_CONCURRENCY: usize = 32;

/// What every welcome package request is (`mip_integration::deliver::PACKAGE_TYPE`).
const PACKAGE_TYPE: &str = "welcome_package";

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

fn endpoint(port: u16) -> Endpoint {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
}

/// Arguments every service gets: its address and data directory, and `normal` durability
/// (which survives a killed process, the only failure here) to keep the test quick.
fn service_args(command: &str, port: u16, data_dir: &Path) -> Vec<String> {
    vec![
        command.to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        "--durability".to_owned(),
        "normal".to_owned(),
    ]
}

/// The integration service's flags for calling CRM and Inventory on these loopback ports,
/// with retries capped at a second so that recovery after a fault stays quick.
fn neighbours(crm_port: u16, inventory_port: u16) -> [String; 6] {
    [
        "--crm-addr".to_owned(),
        format!("127.0.0.1:{crm_port}"),
        "--inventory-addr".to_owned(),
        format!("127.0.0.1:{inventory_port}"),
        "--retry-max".to_owned(),
        "1s".to_owned(),
    ]
}

/// Starts a service and waits until it serves. If it exits first (most likely because another
/// process took the free port in the meantime), tries again on another port.
async fn launch(name: &str, log_dir: &Path, args: impl Fn(u16) -> Vec<String>) -> (Process, u16) {
    for _ in 0..3 {
        let port = free_port();
        let mut process = Process::spawn(name, &args(port), &BTreeMap::new(), log_dir);
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            if serving(port).await {
                return (process, port);
            }
            if let Some(status) = process.exited() {
                eprintln!(
                    "{name} exited before serving on port {port} ({status}); trying another port:\n{}",
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

/// Creates customer number `n`, retrying transient failures with the same request id (so a
/// retried create that did commit returns the same customer); returns its id.
async fn create_customer(mut crm: CrmServiceClient<Channel>, n: usize) -> String {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let mut request = Request::new(CreateCustomerRequest {
            name: format!("Customer {n}"),
            email: format!("customer-{n}@example.com"),
            request_id: format!("00000000-0000-4000-8000-{n:012x}"),
        });
        request.set_timeout(Duration::from_secs(5));
        match crm.create_customer(request).await {
            Ok(customer) => return customer.into_inner().id,
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(POLL_EVERY).await;
            }
            Err(status) => panic!("cannot create customer {n}: {status:?}"),
        }
    }
}

/// Every customer in CRM, through ListCustomers paging.
async fn all_customer_ids(mut crm: CrmServiceClient<Channel>) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = crm
            .list_customers(ListCustomersRequest {
                page_size: 500,
                page_token,
            })
            .await
            .expect("ListCustomers")
            .into_inner();
        ids.extend(page.customers.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

/// Welcome package requests per customer, through ListPackageRequests paging.
async fn welcome_packages(
    mut inventory: InventoryServiceClient<Channel>,
) -> Result<HashMap<String, usize>, tonic::Status> {
    let mut counts = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = inventory
            .list_package_requests(ListPackageRequestsRequest {
                customer_id: String::new(),
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        for package in page.package_requests {
            if package.package_type == PACKAGE_TYPE {
                *counts.entry(package.customer_id).or_insert(0) += 1;
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(counts);
        }
        page_token = page.next_page_token;
    }
}

/// Waits until every customer has exactly one welcome package request; fails at once on a
/// second one, or on one for a customer CRM does not have.
async fn wait_for_exactly_one_package_each(
    inventory: &InventoryServiceClient<Channel>,
    customers: &HashSet<String>,
) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if let Ok(counts) = welcome_packages(inventory.clone()).await {
            let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                duplicated.is_empty(),
                "{} customers have more than one welcome package: {:?}",
                duplicated.len(),
                &duplicated[..duplicated.len().min(5)]
            );
            let unknown: Vec<_> = counts.keys().filter(|c| !customers.contains(*c)).collect();
            assert!(
                unknown.is_empty(),
                "welcome packages for customers CRM does not have: {unknown:?}"
            );
            let missing = customers.len() - counts.len();
            if missing == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {CONVERGE_TIMEOUT:?}, {missing} of {} customers have no welcome package",
                customers.len()
            );
        }
        assert!(
            Instant::now() < deadline,
            "ListPackageRequests kept failing"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_integration_process_restarts_and_every_customer_gets_exactly_one_package() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        let (crm_dir, inventory_dir, integration_dir) = (
            dir.path().join("crm"),
            dir.path().join("inventory"),
            dir.path().join("integration"),
        );
        let (_crm, crm_port) =
            launch("crm", logs, |port| service_args("crm", port, &crm_dir)).await;
        let (_inventory, inventory_port) = launch("inventory", logs, |port| {
            service_args("inventory", port, &inventory_dir)
        })
        .await;
        let integration_args = |port| {
            let mut args = service_args("integration", port, &integration_dir);
            args.extend(neighbours(crm_port, inventory_port));
            args
        };
        let (mut integration, _) = launch("integration", logs, &integration_args).await;

        let crm = CrmServiceClient::new(endpoint(crm_port).connect_lazy());
        let inventory = InventoryServiceClient::new(endpoint(inventory_port).connect_lazy());

        let created = Arc::new(AtomicUsize::new(0));
        let load = tokio::spawn({
            let (crm, created) = (crm.clone(), Arc::clone(&created));
            async move {
                let slots = Arc::new(Semaphore::new(CREATE_CONCURRENCY));
                let mut creates = JoinSet::new();
                for n in 0..CUSTOMERS {
                    let slot = Arc::clone(&slots).acquire_owned().await.unwrap();
                    let (crm, created) = (crm.clone(), Arc::clone(&created));
                    creates.spawn(async move {
                        let _slot = slot;
                        let id = create_customer(crm, n).await;
                        created.fetch_add(1, Ordering::SeqCst);
                        id
                    });
                }
                creates.join_all().await
            }
        });

        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        while created.load(Ordering::SeqCst) < KILL_AFTER {
            assert!(Instant::now() < deadline, "customers are not being created");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        integration.kill();
        drop(integration);
        let (_integration, _) = launch("integration", logs, &integration_args).await;

        let ids: HashSet<String> = load.await.expect("load task").into_iter().collect();
        assert_eq!(ids.len(), CUSTOMERS);
        assert_eq!(
            all_customer_ids(crm.clone()).await,
            ids,
            "CRM holds exactly the customers the test created"
        );
        wait_for_exactly_one_package_each(&inventory, &ids).await;
    })
    .await;
}

#[test]
fn mip_health_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut crm = Process::spawn(
        "crm",
        &service_args("crm", port, &dir.path().join("crm")),
        &BTreeMap::new(),
        dir.path(),
    );
    let addr = format!("127.0.0.1:{port}");
    let health = ["health", "--addr", &addr, "--timeout", "1s"];

    // Serving: exit 0 and SERVING (asked until CRM is up, within a bound).
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let (status, stdout) = loop {
        let (status, stdout) = run_mip(&health, &BTreeMap::new());
        if status.success() || Instant::now() >= deadline {
            break (status, stdout);
        }
        assert!(crm.exited().is_none(), "CRM exited:\n{}", crm.log_tail(20));
        std::thread::sleep(POLL_EVERY);
    };
    assert_eq!(status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.trim(), "SERVING");
    let (status, stdout) = run_mip(
        &[
            "health",
            "--addr",
            &addr,
            "--service",
            "crm.v1.CrmService",
            "--timeout",
            "1s",
        ],
        &BTreeMap::new(),
    );
    assert_eq!(status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.trim(), "SERVING");

    // Nothing listening: exit 2, nothing on stdout.
    let closed = format!("127.0.0.1:{}", free_port());
    let (status, stdout) = run_mip(
        &["health", "--addr", &closed, "--timeout", "1s"],
        &BTreeMap::new(),
    );
    assert_eq!(status.code(), Some(2), "{stdout}");
    assert_eq!(stdout.trim(), "");

    crm.kill();
}

/// Health of the server on `port`, if it answers.
async fn health(port: u16) -> Option<ServingStatus> {
    let channel = endpoint(port).connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(response.get_ref().status())
}

/// Arguments of a service on PostgreSQL.
fn postgres_args(command: &str, port: u16, url: &str) -> Vec<String> {
    vec![
        command.to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--database-url".to_owned(),
        url.to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_services_wait_for_the_database_and_ride_out_its_restart() {
    let Some(server) = PgServer::start_or_skip() else {
        return;
    };
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        // The server trusts loopback, so any password works; this one must never be logged.
        let url = format!(
            "postgres://postgres:hunter2@127.0.0.1:{}/postgres",
            server.port()
        );
        server.kill();

        // CRM starts while the database is down: it answers health, NOT_SERVING, and waits.
        let crm_port = free_port();
        let mut crm = Process::spawn(
            "crm",
            &postgres_args("crm", crm_port, &url),
            &BTreeMap::new(),
            logs,
        );
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        while health(crm_port).await != Some(ServingStatus::NotServing) {
            assert!(
                crm.exited().is_none(),
                "CRM gave up on an unreachable database"
            );
            assert!(Instant::now() < deadline, "CRM never answered health");
            tokio::time::sleep(POLL_EVERY).await;
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(health(crm_port).await, Some(ServingStatus::NotServing));
        server.restart();
        while health(crm_port).await != Some(ServingStatus::Serving) {
            assert!(crm.exited().is_none(), "CRM exited instead of connecting");
            assert!(
                Instant::now() < deadline,
                "CRM did not connect once the database was back"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }

        let (mut inventory, inventory_port) = launch("inventory", logs, |port| {
            postgres_args("inventory", port, &url)
        })
        .await;
        let (mut integration, _) = launch("integration", logs, |port| {
            let mut args = postgres_args("integration", port, &url);
            args.extend(neighbours(crm_port, inventory_port));
            args
        })
        .await;
        let crm_client = CrmServiceClient::new(endpoint(crm_port).connect_lazy());
        let inventory_client = InventoryServiceClient::new(endpoint(inventory_port).connect_lazy());

        let mut ids = HashSet::new();
        for n in 0..200 {
            ids.insert(create_customer(crm_client.clone(), n).await);
        }
        // A crash of the database under the services: calls fail UNAVAILABLE, naming it.
        server.kill();
        let mut request = Request::new(CreateCustomerRequest {
            name: "During the outage".into(),
            email: "outage@example.com".into(),
            request_id: "00000000-0000-4000-8000-ffffffffffff".into(),
        });
        request.set_timeout(Duration::from_secs(20));
        let refused = crm_client
            .clone()
            .create_customer(request)
            .await
            .expect_err("no database, no create");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("PostgreSQL"),
            "the message names the database: {}",
            refused.message()
        );
        server.restart();
        for n in 200..400 {
            ids.insert(create_customer(crm_client.clone(), n).await);
        }
        wait_for_exactly_one_package_each(&inventory_client, &ids).await;
        assert_eq!(all_customer_ids(crm_client).await, ids);
        for process in [&mut crm, &mut inventory, &mut integration] {
            assert!(
                process.exited().is_none(),
                "{} did not ride out the restart",
                process.name
            );
        }
        for name in ["crm", "inventory", "integration"] {
            let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap();
            assert!(!log.contains("hunter2"), "{name} logged the password");
        }
        let crm_log = std::fs::read_to_string(logs.join("crm.log")).unwrap();
        let waits = crm_log.matches("cannot reach PostgreSQL yet").count();
        assert!(
            (1..=3).contains(&waits),
            "one line per kind of failure while waiting, not one per attempt: {waits}"
        );
    })
    .await;
}

/// GetStatus of the integration worker on `port`.
async fn worker_status(port: u16) -> Option<mip_proto::integration::v1::GetStatusResponse> {
    let channel = endpoint(port).connect().await.ok()?;
    let mut client =
        mip_proto::integration::v1::integration_service_client::IntegrationServiceClient::new(
            channel,
        );
    let request = mip_proto::integration::v1::GetStatusRequest {};
    Some(client.get_status(request).await.ok()?.into_inner())
}

/// Sends `signal` (`-STOP`, `-CONT`) to the process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_is_fenced_and_nothing_is_doubled() {
    let Some(server) = PgServer::start_or_skip() else {
        return;
    };
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        let url = server.url("postgres");
        let (_crm, crm_port) = launch("crm", logs, |port| postgres_args("crm", port, &url)).await;
        let (_inventory, inventory_port) = launch("inventory", logs, |port| {
            postgres_args("inventory", port, &url)
        })
        .await;
        let worker_args = |port| {
            let mut args = postgres_args("integration", port, &url);
            args.extend(neighbours(crm_port, inventory_port));
            args.extend([
                "--partitions".to_owned(),
                "8".to_owned(),
                "--lease-ttl".to_owned(),
                "1s".to_owned(),
            ]);
            args
        };
        let (paused, paused_port) = launch("worker-a", logs, worker_args).await;
        let (_other, other_port) = launch("worker-b", logs, worker_args).await;
        // Both hold a share before one of them stops.
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let a = worker_status(paused_port)
                .await
                .map_or(0, |s| s.partitions.len());
            let b = worker_status(other_port)
                .await
                .map_or(0, |s| s.partitions.len());
            if a > 0 && b > 0 && a + b == 8 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the workers never split the partitions"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
        let crm = CrmServiceClient::new(endpoint(crm_port).connect_lazy());
        let inventory = InventoryServiceClient::new(endpoint(inventory_port).connect_lazy());
        let mut ids = HashSet::new();
        for n in 0..100 {
            ids.insert(create_customer(crm.clone(), n).await);
        }
        let pid = paused.pid();
        signal(pid, "-STOP");
        // Past the lease: the other worker takes every partition and delivers them.
        for n in 100..300 {
            ids.insert(create_customer(crm.clone(), n).await);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let taken = worker_status(other_port)
            .await
            .expect("status")
            .partitions
            .len();
        assert_eq!(
            taken, 8,
            "the running worker took the paused one's partitions"
        );
        signal(pid, "-CONT");
        for n in 300..400 {
            ids.insert(create_customer(crm.clone(), n).await);
        }
        wait_for_exactly_one_package_each(&inventory, &ids).await;
        // Woken up, the paused worker tried to save checkpoints with the epochs it had, and
        // was refused.
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let status = worker_status(paused_port).await;
            if status.is_some_and(|s| s.checkpoint_writes_fenced > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no refused checkpoint write was counted"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
        assert_eq!(all_customer_ids(crm).await, ids);
    })
    .await;
}
