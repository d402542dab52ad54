//! The test harness: CRM, Inventory and the integration service, each run with its own `serve`
//! on a loopback port and its own store, so a test can stop, crash or restart any one of them,
//! plus the client-side helpers the tests share: creating customers, and checking the
//! one guarantee that matters (every customer has exactly one welcome package request).
//!
//! CRM and Inventory keep SQLite data directories; the integration service runs on whatever
//! [`Database`] the test hands it, so the same test runs on SQLite and on PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mip_crm::CrmOptions;
use mip_integration::deliver::{PACKAGE_TYPE, RandomJitter};
use mip_integration::{IntegrationOptions, Mode};
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::crm::v1::{CreateCustomerRequest, ListCustomersRequest};
use mip_proto::integration::v1::integration_service_client::IntegrationServiceClient;
use mip_proto::integration::v1::{GetStatusRequest, GetStatusResponse};
use mip_proto::inventory::v1::ListPackageRequestsRequest;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_runtime::CancellationToken;
use mip_runtime::clock::{SharedClock, SystemClock};
use mip_runtime::server::ServerOptions;
use mip_runtime::sqlite::Durability;
use mip_runtime::store::Database;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use uuid::Uuid;

pub type CrmClient = CrmServiceClient<Channel>;
pub type InventoryClient = InventoryServiceClient<Channel>;
pub type IntegrationClient = IntegrationServiceClient<Channel>;

/// Longest any test may take; generous, so a slow machine never fails a test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the platform gets to converge (every customer served) before a test fails.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between two looks at a condition that is not true yet.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Customers created at once by [`create_customers`].
const CREATE_CONCURRENCY: usize = 32;

/// Runs a test body, failing it instead of hanging if it does not finish in time.
pub async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

/// Polls `check` until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Transport settings for every test server: a short grace period so stops are quick.
fn server_options() -> ServerOptions {
    ServerOptions {
        shutdown_grace: Duration::from_secs(2),
        ..ServerOptions::default()
    }
}

/// The wall clock, for services whose timestamps do not matter to a test.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// A lazily connected client channel to `addr`.
fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// Binds `127.0.0.1:port` again after a stop. The old listener is already closed, but give the
/// port a moment in case the operating system has not released it yet.
async fn rebind(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding port {port}: {e}; retrying");
                tokio::time::sleep(POLL_EVERY).await;
            }
            Err(e) => panic!("cannot bind 127.0.0.1:{port} again: {e}"),
        }
    }
}

/// One running server: the token that stops it and the task that runs it.
struct Running<E> {
    /// Cancelling it starts a graceful shutdown.
    shutdown: CancellationToken,
    /// The server; ends once shut down.
    task: JoinHandle<Result<(), E>>,
}

impl<E: Debug> Running<E> {
    /// Graceful stop: cancel, then wait for `serve` to return cleanly.
    async fn stop(self, name: &str) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap_or_else(|_| panic!("{name} did not stop in time"))
            .unwrap_or_else(|e| panic!("{name} task failed: {e}"))
            .unwrap_or_else(|e| panic!("{name} stopped with an error: {e:?}"));
    }
}

/// Data directories, one per service, removed at the end of the test.
pub struct Dirs {
    /// Holds the directories.
    root: tempfile::TempDir,
}

impl Dirs {
    /// Fresh, empty directories.
    pub fn new() -> Self {
        Self {
            root: tempfile::tempdir().expect("temporary directory"),
        }
    }

    /// CRM's data directory.
    pub fn crm(&self) -> PathBuf {
        self.root.path().join("crm")
    }

    /// Inventory's data directory.
    pub fn inventory(&self) -> PathBuf {
        self.root.path().join("inventory")
    }

    /// The integration service's data directory.
    pub fn integration(&self) -> PathBuf {
        self.root.path().join("integration")
    }

    /// The integration service's store in its data directory.
    pub fn integration_db(&self) -> Database {
        Database::Sqlite {
            dir: self.integration(),
            durability: Durability::Normal,
        }
    }
}

/// CRM options for tests: frequent heartbeats, so an idle feed's checkpoint reaches the head
/// quickly.
pub fn crm_options() -> CrmOptions {
    CrmOptions {
        heartbeat_interval: Duration::from_millis(100),
        ..CrmOptions::default()
    }
}

/// A CRM server that keeps its port and data directory across restarts.
pub struct Crm {
    /// Where it listens, the same after every restart.
    pub addr: SocketAddr,
    /// Its data directory.
    dir: PathBuf,
    /// Its options.
    options: CrmOptions,
    /// Its clock.
    clock: SharedClock,
    /// Set while it runs.
    running: Option<Running<mip_crm::StartError>>,
}

impl Crm {
    /// Starts CRM on an ephemeral loopback port.
    pub async fn start(dir: &Path, options: CrmOptions, clock: SharedClock) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind CRM");
        let mut crm = Self {
            addr: listener.local_addr().expect("CRM address"),
            dir: dir.to_owned(),
            options,
            clock,
            running: None,
        };
        crm.run(listener);
        crm
    }

    fn run(&mut self, listener: TcpListener) {
        let shutdown = CancellationToken::new();
        let (dir, options, clock) = (
            self.dir.clone(),
            self.options.clone(),
            Arc::clone(&self.clock),
        );
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            mip_crm::serve(
                listener,
                &mip_runtime::store::Database::Sqlite {
                    dir: dir.to_path_buf(),
                    durability: Durability::Normal,
                },
                options,
                &server_options(),
                clock,
                token,
            )
            .await
        });
        self.running = Some(Running { shutdown, task });
    }

    /// Stops it gracefully.
    pub async fn stop(&mut self) {
        self.running
            .take()
            .expect("CRM is running")
            .stop("CRM")
            .await;
    }

    /// Starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "CRM is still running");
        let listener = rebind(self.addr.port()).await;
        self.run(listener);
    }

    /// A client; it reconnects by itself across restarts.
    pub fn client(&self) -> CrmClient {
        CrmServiceClient::new(channel(self.addr))
    }
}

/// An Inventory server that keeps its port and data directory across restarts.
pub struct Inventory {
    /// Where it listens, the same after every restart.
    pub addr: SocketAddr,
    /// Its data directory.
    dir: PathBuf,
    /// Set while it runs.
    running: Option<Running<mip_inventory::StartError>>,
}

impl Inventory {
    /// Starts Inventory on an ephemeral loopback port.
    pub async fn start(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind Inventory");
        let mut inventory = Self {
            addr: listener.local_addr().expect("Inventory address"),
            dir: dir.to_owned(),
            running: None,
        };
        inventory.run(listener);
        inventory
    }

    fn run(&mut self, listener: TcpListener) {
        let shutdown = CancellationToken::new();
        let dir = self.dir.clone();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            mip_inventory::serve(
                listener,
                &mip_runtime::store::Database::Sqlite {
                    dir: dir.to_path_buf(),
                    durability: Durability::Normal,
                },
                &server_options(),
                system_clock(),
                token,
            )
            .await
        });
        self.running = Some(Running { shutdown, task });
    }

    /// Stops it gracefully.
    pub async fn stop(&mut self) {
        self.running
            .take()
            .expect("Inventory is running")
            .stop("Inventory")
            .await;
    }

    /// Starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "Inventory is still running");
        let listener = rebind(self.addr.port()).await;
        self.run(listener);
    }

    /// A client; it reconnects by itself across restarts.
    pub fn client(&self) -> InventoryClient {
        InventoryServiceClient::new(channel(self.addr))
    }
}

/// Integration options for tests: short intervals and backoffs, so tests are quick, and
/// attempts enough that no outage a test stages dead-letters anything, however slow the
/// machine (permanent errors still dead-letter at once).
pub fn integration_options(
    crm_addr: SocketAddr,
    inventory_addr: SocketAddr,
    mode: Mode,
) -> IntegrationOptions {
    IntegrationOptions {
        crm_addr: crm_addr.to_string(),
        inventory_addr: inventory_addr.to_string(),
        mode,
        poll_interval: Duration::from_millis(50),
        stream_probe_interval: Duration::from_millis(200),
        stream_idle_timeout: Duration::from_secs(5),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(200),
        call_timeout: Duration::from_secs(2),
        max_attempts: 1000,
        // A crashed worker's partitions move on within a second.
        lease_ttl: Duration::from_secs(1),
        ..IntegrationOptions::default()
    }
}

/// A stand-in server the test controls (a proxy in front of a real service, say), on an
/// ephemeral loopback port until [`Served::stop`].
pub struct Served {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Stops it.
    shutdown: CancellationToken,
    /// The server.
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Served {
    /// Serves `router` (a `Server::builder().add_service(..)`).
    pub async fn start(router: tonic::transport::server::Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.clone().cancelled_owned(),
        ));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    /// Stops it and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("server task").expect("server");
    }
}

/// The integration store `database` names, ready, with its `partitions` recorded: for tests
/// that stage what earlier workers left in it before a service starts.
pub async fn staged_store(
    database: &Database,
    partitions: u32,
) -> Arc<dyn mip_integration::store::IntegrationStore> {
    let store = mip_integration::store::open(database, &CancellationToken::new())
        .await
        .expect("store opens");
    store.ready().await.expect("store ready");
    store
        .init_partitions(partitions)
        .await
        .expect("partitions recorded");
    store
}

/// The integration service, restartable on the same store. Its admin API gets a new ephemeral
/// port on every start; nothing depends on it staying the same.
pub struct Integration {
    /// Where the admin API listens now.
    pub addr: SocketAddr,
    /// Its store (checkpoint and dead letters): a SQLite data directory or a PostgreSQL
    /// database.
    database: Database,
    /// Its options.
    options: IntegrationOptions,
    /// Set while it runs.
    running: Option<Running<mip_integration::StartError>>,
}

impl Integration {
    /// Starts the integration service on an ephemeral loopback port, keeping its state in
    /// `database`.
    pub async fn start(database: &Database, options: IntegrationOptions) -> Self {
        let mut integration = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database: database.clone(),
            options,
            running: None,
        };
        integration.restart().await;
        integration
    }

    /// Starts it (again) on the same store.
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "the integration service is running");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind integration service");
        self.addr = listener.local_addr().expect("integration address");
        let shutdown = CancellationToken::new();
        let (database, options) = (self.database.clone(), self.options.clone());
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            mip_integration::serve(
                listener,
                &database,
                options,
                &server_options(),
                system_clock(),
                Arc::new(RandomJitter),
                token,
            )
            .await
        });
        self.running = Some(Running { shutdown, task });
        // It serves at once but reports SERVING only once its store is ready (a PostgreSQL
        // store connects in the background): until then admin calls are UNAVAILABLE.
        let addr = self.addr.to_string();
        eventually(
            "the integration service to report SERVING",
            CONVERGE_TIMEOUT,
            || {
                let addr = addr.clone();
                async move {
                    let status = mip_runtime::probe::check(
                        &addr,
                        mip_integration::SERVICE_NAME,
                        Duration::from_secs(1),
                        &Default::default(),
                    )
                    .await
                    .ok()?;
                    (status.as_str_name() == "SERVING").then_some(())
                }
            },
        )
        .await;
    }

    /// Stops it gracefully.
    pub async fn stop(&mut self) {
        self.running
            .take()
            .expect("the integration service is running")
            .stop("the integration service")
            .await;
    }

    /// Stops it abruptly, mid-work: the token is cancelled and the serving task aborted at
    /// once, without waiting for anything to finish.
    pub async fn crash(&mut self) {
        let running = self
            .running
            .take()
            .expect("the integration service is running");
        running.shutdown.cancel();
        running.task.abort();
        // An aborted task ends at its next await; its result (cancelled, or whatever it had
        // returned already) does not matter.
        let _ = tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .expect("aborted task ends");
    }

    /// An admin API client for the current run.
    pub fn client(&self) -> IntegrationClient {
        IntegrationServiceClient::new(channel(self.addr))
    }

    /// The service's status, asked through its admin API.
    pub async fn status(&self) -> GetStatusResponse {
        let client = self.client();
        eventually("GetStatus to answer", CONVERGE_TIMEOUT, || {
            let mut client = client.clone();
            async move { client.get_status(GetStatusRequest {}).await.ok() }
        })
        .await
        .into_inner()
    }

    /// Waits until the saved checkpoint reaches `sequence`.
    pub async fn wait_for_checkpoint(&self, sequence: i64) -> GetStatusResponse {
        let client = self.client();
        eventually(
            &format!("the checkpoint to reach sequence {sequence}"),
            CONVERGE_TIMEOUT,
            || {
                let mut client = client.clone();
                async move {
                    let status = client.get_status(GetStatusRequest {}).await.ok()?;
                    let status = status.into_inner();
                    (status.checkpoint_sequence >= sequence).then_some(status)
                }
            },
        )
        .await
    }
}

/// Waits until `workers` (sharing one database) hold every partition between them, none more
/// than its fair share ceil(P / workers) (so none fewer than what the others leave), and each
/// sees all of them as the cluster; returns their statuses.
pub async fn wait_for_split(workers: &[&Integration]) -> Vec<GetStatusResponse> {
    eventually(
        &format!("{} workers to split the partitions evenly", workers.len()),
        CONVERGE_TIMEOUT,
        || async {
            let mut statuses = Vec::new();
            for worker in workers {
                let mut client = worker.client();
                statuses.push(
                    client
                        .get_status(GetStatusRequest {})
                        .await
                        .ok()?
                        .into_inner(),
                );
            }
            let count = statuses[0].partition_count;
            let share = (count as usize).div_ceil(workers.len());
            let mut held: Vec<i32> = statuses
                .iter()
                .flat_map(|s| s.partitions.iter().map(|p| p.partition))
                .collect();
            held.sort_unstable();
            let least = (count as usize).saturating_sub(share * (workers.len() - 1));
            let even = statuses
                .iter()
                .all(|s| (least..=share).contains(&s.partitions.len()));
            let cluster = statuses.iter().all(|s| s.workers.len() == workers.len());
            (even && cluster && held == (0..count).collect::<Vec<_>>()).then_some(statuses)
        },
    )
    .await
}

/// All three services, CRM and Inventory on fresh data directories, the integration service
/// following CRM in `mode`.
pub struct Platform {
    /// CRM.
    pub crm: Crm,
    /// Inventory.
    pub inventory: Inventory,
    /// The integration service.
    pub integration: Integration,
    /// The data directories; declared last so they outlive the servers.
    _dirs: Dirs,
}

impl Platform {
    /// Starts CRM, Inventory, then the integration service with a SQLite store in its own
    /// data directory.
    pub async fn start(mode: Mode) -> Self {
        let dirs = Dirs::new();
        let database = dirs.integration_db();
        Self::start_with(dirs, mode, &database).await
    }

    /// Starts CRM, Inventory, then the integration service with its store in `database`.
    pub async fn start_on(mode: Mode, database: &Database) -> Self {
        Self::start_with(Dirs::new(), mode, database).await
    }

    async fn start_with(dirs: Dirs, mode: Mode, database: &Database) -> Self {
        let crm = Crm::start(&dirs.crm(), crm_options(), system_clock()).await;
        let inventory = Inventory::start(&dirs.inventory()).await;
        let integration = Integration::start(
            database,
            integration_options(crm.addr, inventory.addr, mode),
        )
        .await;
        Self {
            crm,
            inventory,
            integration,
            _dirs: dirs,
        }
    }

    /// Stops every service that still runs.
    pub async fn stop(mut self) {
        if self.integration.running.is_some() {
            self.integration.stop().await;
        }
        if self.inventory.running.is_some() {
            self.inventory.stop().await;
        }
        if self.crm.running.is_some() {
            self.crm.stop().await;
        }
    }
}

/// Whether a failed create may be retried. Creates carry a request id, so a retry of a create
/// that did commit returns the same customer instead of a second one.
fn create_is_retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument | Code::AlreadyExists | Code::NotFound | Code::FailedPrecondition
    )
}

/// Creates one customer, retrying through CRM outages; returns its id.
pub async fn create_customer(mut crm: CrmClient) -> String {
    let request_id = Uuid::new_v4().to_string();
    let email = format!("customer-{request_id}@example.com");
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let mut request = Request::new(CreateCustomerRequest {
            name: "Test Customer".to_owned(),
            email: email.clone(),
            request_id: request_id.clone(),
        });
        request.set_timeout(Duration::from_secs(5));
        match crm.create_customer(request).await {
            Ok(customer) => return customer.into_inner().id,
            Err(status) if create_is_retryable(status.code()) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("cannot create a customer: {status:?}"),
        }
    }
}

/// Creates `n` customers, many at once; returns their ids.
pub async fn create_customers(crm: &CrmClient, n: usize) -> Vec<String> {
    let slots = Arc::new(Semaphore::new(CREATE_CONCURRENCY));
    let mut creates = JoinSet::new();
    for _ in 0..n {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("never closed");
        let crm = crm.clone();
        creates.spawn(async move {
            let _slot = slot;
            create_customer(crm).await
        });
    }
    creates.join_all().await
}

/// Customers created continuously in the background, by several workers, until
/// [`Load::finish`].
pub struct Load {
    /// Stops the workers after their current create.
    stop: CancellationToken,
    /// Customers created so far.
    created: Arc<AtomicUsize>,
    /// Their ids.
    ids: Arc<Mutex<Vec<String>>>,
    /// The workers.
    workers: JoinSet<()>,
}

impl Load {
    /// Starts `workers` workers creating customers one after another.
    pub fn start(crm: &CrmClient, workers: usize) -> Self {
        let stop = CancellationToken::new();
        let created = Arc::new(AtomicUsize::new(0));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let mut set = JoinSet::new();
        for _ in 0..workers {
            let (crm, stop, created, ids) = (
                crm.clone(),
                stop.clone(),
                Arc::clone(&created),
                Arc::clone(&ids),
            );
            set.spawn(async move {
                // A create, once begun, is always finished, so every customer CRM has is known.
                while !stop.is_cancelled() {
                    let id = create_customer(crm.clone()).await;
                    ids.lock().expect("ids lock").push(id);
                    created.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Self {
            stop,
            created,
            ids,
            workers: set,
        }
    }

    /// Waits until at least `n` customers have been created in total.
    pub async fn wait_for(&self, n: usize) {
        eventually(
            &format!("{n} customers to be created"),
            CONVERGE_TIMEOUT,
            || async { (self.created.load(Ordering::SeqCst) >= n).then_some(()) },
        )
        .await;
    }

    /// Stops creating; returns the id of every customer created.
    pub async fn finish(mut self) -> Vec<String> {
        self.stop.cancel();
        while let Some(result) = self.workers.join_next().await {
            result.expect("load worker panicked");
        }
        std::mem::take(&mut *self.ids.lock().expect("ids lock"))
    }
}

/// Every customer in CRM, through ListCustomers paging.
pub async fn all_customer_ids(crm: &CrmClient) -> Vec<String> {
    let mut crm = crm.clone();
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = crm
            .list_customers(ListCustomersRequest {
                page_size: 1000,
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

/// CRM's newest change-log sequence number.
pub async fn crm_head(crm: &CrmClient) -> i64 {
    crm.clone()
        .list_customers(ListCustomersRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("ListCustomers")
        .into_inner()
        .resume_sequence
}

/// Welcome package requests per customer, through ListPackageRequests paging.
pub async fn welcome_packages_per_customer(
    inventory: &InventoryClient,
) -> Result<HashMap<String, usize>, tonic::Status> {
    let mut inventory = inventory.clone();
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

/// The guarantee: waits until every customer in `customer_ids` has exactly one welcome package
/// request. Fails at once if any customer has two or more, or if a package request exists for
/// a customer not in the list; fails after `timeout` with the customers still missing one.
pub async fn wait_for_exactly_one_package_each(
    inventory: &InventoryClient,
    customer_ids: &[String],
    timeout: Duration,
) {
    let expected: HashSet<&str> = customer_ids.iter().map(String::as_str).collect();
    assert_eq!(
        expected.len(),
        customer_ids.len(),
        "customer ids repeat; the test's bookkeeping is wrong"
    );
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match welcome_packages_per_customer(inventory).await {
            Ok(counts) => {
                let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
                assert!(
                    duplicated.is_empty(),
                    "{} customers have more than one welcome package: {:?}",
                    duplicated.len(),
                    &duplicated[..duplicated.len().min(5)]
                );
                let unexpected: Vec<_> = counts
                    .keys()
                    .filter(|c| !expected.contains(c.as_str()))
                    .collect();
                assert!(
                    unexpected.is_empty(),
                    "{} welcome packages for customers not in the list: {:?}",
                    unexpected.len(),
                    &unexpected[..unexpected.len().min(5)]
                );
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|c| !counts.contains_key(**c))
                    .collect();
                if missing.is_empty() {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "after {timeout:?}, {} of {} customers have no welcome package \
                     ({} have exactly one, none has two); first missing: {:?}",
                    missing.len(),
                    expected.len(),
                    counts.len(),
                    &missing[..missing.len().min(5)]
                );
            }
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "after {timeout:?}, ListPackageRequests still fails: {status:?} \
                     (before: {last_error:?})"
                );
                last_error = Some(status);
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
