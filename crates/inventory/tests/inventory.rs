//! The Inventory service as a client sees it: a real server on a real socket, called through
//! the generated client.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_inventory::{SERVICE_NAME, StartError};
use mip_proto::inventory::v1::create_package_request_result::Result as BatchItem;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_proto::inventory::v1::{
    BatchCreatePackageRequestsRequest, CreatePackageRequestRequest, GetPackageRequestRequest,
    ListPackageRequestsRequest, PackageRequest, PackageStatus, UpdatePackageRequestStatusRequest,
};
use mip_runtime::CancellationToken;
use mip_runtime::clock::ManualClock;
use mip_runtime::server::ServerOptions;
use mip_runtime::sqlite::Durability;
use mip_runtime::store::Database;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

type Client = InventoryServiceClient<Channel>;

/// Longest any test may take; generous, so a slow machine never fails a test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a test body, failing it instead of hanging if it does not finish in time.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

/// A running server and a client connected to it.
struct Server {
    /// Connected to the server.
    client: Client,
    /// Stops the server.
    shutdown: CancellationToken,
    /// The server; ends once shut down.
    task: JoinHandle<Result<(), StartError>>,
}

/// The test clock's start: a fixed time, so timestamps can be compared exactly.
fn start_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

impl Server {
    /// Serves Inventory over a store on `db`, once that store is ready, so calls never meet
    /// a store still connecting.
    async fn start(db: &Database, clock: &ManualClock) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let store = mip_inventory::store::open(db, &shutdown).await.unwrap();
        store.ready().await.unwrap();
        let clock = Arc::new(clock.clone());
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { mip_inventory::serve_store(listener, store, &options(), clock, shutdown).await }
        });
        // The listener is already bound, so connecting right away works.
        let client = InventoryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            client,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        drop(self.client);
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Server settings of the tests: a short grace period, so shutdown is quick.
fn options() -> ServerOptions {
    ServerOptions {
        shutdown_grace: Duration::from_secs(2),
        ..ServerOptions::default()
    }
}

/// A server on `db`, and the clock it reads.
async fn fresh(db: &Database) -> (ManualClock, Server) {
    let clock = ManualClock::new(start_time());
    let server = Server::start(db, &clock).await;
    (clock, server)
}

/// A server on a fresh SQLite directory, for the tests of what the backend cannot change
/// (validation, health).
async fn fresh_sqlite() -> (tempfile::TempDir, ManualClock, Server) {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::Sqlite {
        dir: dir.path().to_owned(),
        durability: Durability::Normal,
    };
    let (clock, server) = fresh(&db).await;
    (dir, clock, server)
}

fn create_request(customer_id: Uuid, package_type: &str) -> CreatePackageRequestRequest {
    CreatePackageRequestRequest {
        customer_id: customer_id.to_string(),
        package_type: package_type.to_owned(),
        request_id: String::new(),
    }
}

async fn create(client: &mut Client, customer_id: Uuid, package_type: &str) -> PackageRequest {
    client
        .create_package_request(create_request(customer_id, package_type))
        .await
        .unwrap()
        .into_inner()
}

async fn get(client: &mut Client, id: &str) -> Result<PackageRequest, Status> {
    client
        .get_package_request(GetPackageRequestRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
}

async fn set_status(
    client: &mut Client,
    id: &str,
    status: PackageStatus,
) -> Result<PackageRequest, Status> {
    client
        .update_package_request_status(UpdatePackageRequestStatusRequest {
            id: id.to_owned(),
            status: status.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn list(customer_id: &str, page_size: i32, page_token: &str) -> ListPackageRequestsRequest {
    ListPackageRequestsRequest {
        customer_id: customer_id.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
    }
}

/// Every package request matching `customer_id`, page by page; also returns the page sizes.
async fn list_all(
    client: &mut Client,
    customer_id: &str,
    page_size: i32,
) -> (Vec<PackageRequest>, Vec<usize>) {
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_package_requests(list(customer_id, page_size, &token))
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.package_requests.len());
        all.extend(page.package_requests);
        if page.next_page_token.is_empty() {
            return (all, sizes);
        }
        token = page.next_page_token;
    }
}

async fn count(client: &mut Client) -> usize {
    client
        .list_package_requests(list("", 1000, ""))
        .await
        .unwrap()
        .into_inner()
        .package_requests
        .len()
}

/// The fields an INVALID_ARGUMENT status names, in order.
fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("a BadRequest detail");
    assert_error_info(status, "INVALID_FIELD");
    bad.field_violations.into_iter().map(|v| v.field).collect()
}

/// Asserts the status carries an `ErrorInfo` of Inventory's domain with `expected_reason`, a
/// value of `inventory.v1.ErrorReason`.
fn assert_error_info(status: &Status, expected_reason: &str) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "inventory.mip.example.com", "{status:?}");
    assert_eq!(info.reason, expected_reason, "{status:?}");
    assert!(
        mip_proto::inventory::v1::ErrorReason::from_str_name(&info.reason).is_some(),
        "{} is not an inventory.v1.ErrorReason",
        info.reason
    );
}

fn ids(requests: &[PackageRequest]) -> Vec<&str> {
    requests.iter().map(|r| r.id.as_str()).collect()
}

/// Starts `serve` on `database` as the binary does, store opening included.
fn serve_database(
    database: Database,
) -> (
    String,
    CancellationToken,
    JoinHandle<Result<(), StartError>>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let listener = TcpListener::from_std(listener).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        let clock = Arc::new(ManualClock::new(start_time()));
        async move { mip_inventory::serve(listener, &database, &options(), clock, shutdown).await }
    });
    (addr, shutdown, task)
}

async fn health(addr: &str) -> String {
    mip_runtime::probe::check(
        addr,
        SERVICE_NAME,
        Duration::from_secs(5),
        &Default::default(),
    )
    .await
    .unwrap()
    .as_str_name()
    .to_owned()
}

#[tokio::test]
async fn health_reports_the_service_serving() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (addr, shutdown, task) = serve_database(Database::Sqlite {
            dir: dir.path().to_owned(),
            durability: Durability::Normal,
        });
        // SQLite is ready once opened, so SERVING from the first call on.
        assert_eq!(health(&addr).await, "SERVING");
        shutdown.cancel();
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_keeps_health_not_serving_and_calls_unavailable() {
    bounded(async {
        // A loopback port nothing listens on: connecting is refused, and retried.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let database =
            Database::from_url(&format!("postgres://mip@127.0.0.1:{port}/mip"), 4).unwrap();
        let (addr, shutdown, task) = serve_database(database);
        assert_eq!(health(&addr).await, "NOT_SERVING");
        let mut client = InventoryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let status = get(&mut client, &Uuid::now_v7().to_string())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        // Still waiting for the database is no failure: shutdown ends serving cleanly.
        drop(client);
        shutdown.cancel();
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_database_that_does_not_exist_stops_serve_with_the_error() {
    bounded(async {
        let Some(server) = mip_testkit::postgres::PgServer::shared() else {
            return;
        };
        let database = Database::from_url(&server.url("no_such_database"), 4).unwrap();
        let (_addr, _shutdown, task) = serve_database(database);
        let error = task.await.unwrap().unwrap_err();
        let StartError::Store(mip_inventory::Error::Storage(e)) = &error else {
            panic!("{error:?}");
        };
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains("no_such_database"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn each_invalid_create_field_is_reported() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_sqlite().await;
        let customer_id = Uuid::now_v7().to_string();
        let cases: [(CreatePackageRequestRequest, &[&str]); 6] = [
            (
                CreatePackageRequestRequest {
                    customer_id: "not-a-uuid".into(),
                    package_type: "Welcome Package".into(),
                    request_id: "42".into(),
                },
                &["customer_id", "package_type", "request_id"],
            ),
            (
                CreatePackageRequestRequest::default(),
                &["customer_id", "package_type"],
            ),
            (
                CreatePackageRequestRequest {
                    customer_id: customer_id.clone(),
                    package_type: "x".repeat(65),
                    request_id: String::new(),
                },
                &["package_type"],
            ),
            (
                CreatePackageRequestRequest {
                    customer_id: customer_id.clone(),
                    package_type: "welcome-package".into(),
                    request_id: String::new(),
                },
                &["package_type"],
            ),
            (
                CreatePackageRequestRequest {
                    customer_id: "12345".into(),
                    package_type: "welcome_package".into(),
                    request_id: String::new(),
                },
                &["customer_id"],
            ),
            (
                CreatePackageRequestRequest {
                    customer_id: customer_id.clone(),
                    package_type: "welcome_package".into(),
                    request_id: "not-a-uuid".into(),
                },
                &["request_id"],
            ),
        ];
        for (request, expected) in cases {
            let status = server
                .client
                .create_package_request(request.clone())
                .await
                .unwrap_err();
            assert_eq!(violated_fields(&status), expected, "{request:?}");
        }
        assert_eq!(count(&mut server.client).await, 0);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_get_list_and_update_arguments_are_reported() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_sqlite().await;
        let client = &mut server.client;
        let created = create(client, Uuid::now_v7(), "welcome_package").await;

        for id in ["", "not-a-uuid"] {
            let status = get(client, id).await.unwrap_err();
            assert_eq!(violated_fields(&status), ["id"], "{id:?}");
        }

        for (request, expected) in [
            (list("not-a-uuid", 0, ""), "customer_id"),
            (list("", -1, ""), "page_size"),
            (list("", 0, "garbage"), "page_token"),
        ] {
            let status = client
                .list_package_requests(request.clone())
                .await
                .unwrap_err();
            assert_eq!(violated_fields(&status), [expected], "{request:?}");
        }

        let status = client
            .update_package_request_status(UpdatePackageRequestStatusRequest {
                id: "not-a-uuid".into(),
                status: PackageStatus::Unspecified.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["id", "status"]);

        let status = client
            .update_package_request_status(UpdatePackageRequestStatusRequest {
                id: created.id.clone(),
                status: 99,
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["status"]);
        assert!(
            status.message().contains("unknown value 99"),
            "{}",
            status.message()
        );

        assert_eq!(get(client, &created.id).await.unwrap(), created);
        server.stop().await;
    })
    .await;
}

fn clock_now(clock: &ManualClock) -> SystemTime {
    use mip_runtime::clock::Clock;
    clock.now()
}

fn batch(requests: Vec<CreatePackageRequestRequest>) -> BatchCreatePackageRequestsRequest {
    BatchCreatePackageRequestsRequest { requests }
}

#[tokio::test]
async fn an_empty_or_oversized_batch_is_invalid_as_a_whole() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_sqlite().await;
        for size in [0, mip_inventory::service::MAX_BATCH + 1] {
            let requests = (0..size)
                .map(|_| create_request(Uuid::new_v4(), "welcome_package"))
                .collect();
            let status = server
                .client
                .batch_create_package_requests(batch(requests))
                .await
                .unwrap_err();
            assert_eq!(violated_fields(&status), ["requests"], "size {size}");
        }
        assert_eq!(count(&mut server.client).await, 0);
        server.stop().await;
    })
    .await;
}

/// A create's answer without its `replayed` flag, to compare with the original's.
fn pb_without_replayed(package: PackageRequest) -> PackageRequest {
    PackageRequest {
        replayed: false,
        ..package
    }
}

mip_testkit::backend_tests! {
    async fn created_package_request_can_be_read_back_and_listed(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let customer_id = Uuid::now_v7();
            let created = create(&mut server.client, customer_id, "welcome_package").await;

            assert!(Uuid::try_parse(&created.id).is_ok(), "{}", created.id);
            assert_eq!(created.customer_id, customer_id.to_string());
            assert_eq!(created.package_type, "welcome_package");
            assert_eq!(created.status(), PackageStatus::Pending);
            assert_eq!(created.create_time, Some(start_time().into()));
            assert_eq!(created.update_time, created.create_time);
            assert_eq!(created.request_id, "");

            assert_eq!(get(&mut server.client, &created.id).await.unwrap(), created);
            let (listed, _) = list_all(&mut server.client, "", 0).await;
            assert_eq!(listed, vec![created]);
            server.stop().await;
        })
        .await;
    }

    async fn retried_create_returns_the_original_and_creates_nothing(db: Database) {
        bounded(async {
            let (clock, mut server) = fresh(&db).await;
            let request_id = Uuid::now_v7().to_string();
            let request = CreatePackageRequestRequest {
                request_id: request_id.clone(),
                ..create_request(Uuid::now_v7(), "welcome_package")
            };
            let first = server
                .client
                .create_package_request(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(first.request_id, request_id);
            assert!(!first.replayed, "the first create made it");

            clock.advance(Duration::from_secs(30));
            let retry = server
                .client
                .create_package_request(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert!(retry.replayed, "the retry says it created nothing");
            assert_eq!(
                pb_without_replayed(retry),
                first,
                "the retry answers with the original, timestamps included"
            );
            let batch = server
                .client
                .batch_create_package_requests(BatchCreatePackageRequestsRequest {
                    requests: vec![request],
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                matches!(
                    &batch.results[0].result,
                    Some(BatchItem::PackageRequest(p)) if p.replayed
                ),
                "{batch:?}"
            );
            let read = server
                .client
                .get_package_request(GetPackageRequestRequest { id: first.id.clone() })
                .await
                .unwrap()
                .into_inner();
            assert!(!read.replayed, "only create answers say so");
            assert_eq!(count(&mut server.client).await, 1);
            server.stop().await;
        })
        .await;
    }

    async fn request_id_reused_with_different_parameters_is_already_exists(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let request_id = Uuid::now_v7().to_string();
            let customer_id = Uuid::now_v7();
            let original = CreatePackageRequestRequest {
                request_id: request_id.clone(),
                ..create_request(customer_id, "welcome_package")
            };
            server
                .client
                .create_package_request(original.clone())
                .await
                .unwrap();

            for changed in [
                CreatePackageRequestRequest {
                    package_type: "birthday_package".into(),
                    ..original.clone()
                },
                CreatePackageRequestRequest {
                    customer_id: Uuid::now_v7().to_string(),
                    ..original.clone()
                },
            ] {
                let status = server
                    .client
                    .create_package_request(changed)
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                assert_error_info(&status, "REQUEST_ID_REUSED");
                assert!(
                    status.message().contains(&request_id),
                    "{}",
                    status.message()
                );
                assert!(
                    status
                        .message()
                        .contains("different customer_id or package_type"),
                    "{}",
                    status.message()
                );
            }
            assert_eq!(count(&mut server.client).await, 1);
            server.stop().await;
        })
        .await;
    }

    async fn page_size_defaults_to_100_and_is_capped_at_1000(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let customer_id = Uuid::now_v7();
            let mut creates = tokio::task::JoinSet::new();
            for _ in 0..1001 {
                let mut client = server.client.clone();
                creates.spawn(async move { create(&mut client, customer_id, "welcome_package").await });
            }
            creates.join_all().await;

            let default = server
                .client
                .list_package_requests(list("", 0, ""))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(default.package_requests.len(), 100);
            assert!(!default.next_page_token.is_empty());

            let capped = server
                .client
                .list_package_requests(list("", 5000, ""))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(capped.package_requests.len(), 1000);
            let rest = server
                .client
                .list_package_requests(list("", 5000, &capped.next_page_token))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(rest.package_requests.len(), 1);
            assert_eq!(rest.next_page_token, "");
            server.stop().await;
        })
        .await;
    }

    async fn paging_returns_every_package_request_once_in_creation_order(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
            let mut created = Vec::new();
            for i in 0..7 {
                let customer = if i % 2 == 0 { alice } else { bob };
                created.push(create(&mut server.client, customer, &format!("box_{i}")).await);
            }

            let (all, sizes) = list_all(&mut server.client, "", 2).await;
            assert_eq!(ids(&all), ids(&created));
            assert_eq!(sizes, [2, 2, 2, 1]);

            let (alices, sizes) = list_all(&mut server.client, &alice.to_string(), 2).await;
            let expected: Vec<_> = created
                .iter()
                .filter(|r| r.customer_id == alice.to_string())
                .cloned()
                .collect();
            assert_eq!(alices, expected);
            assert_eq!(sizes, [2, 2]);

            let (nobody, _) = list_all(&mut server.client, &Uuid::now_v7().to_string(), 2).await;
            assert!(nobody.is_empty());
            server.stop().await;
        })
        .await;
    }

    async fn page_token_is_only_accepted_with_its_customer_filter(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
            for _ in 0..2 {
                create(&mut server.client, alice, "welcome_package").await;
                create(&mut server.client, bob, "welcome_package").await;
            }
            let unfiltered = server
                .client
                .list_package_requests(list("", 1, ""))
                .await
                .unwrap()
                .into_inner()
                .next_page_token;
            let alices = server
                .client
                .list_package_requests(list(&alice.to_string(), 1, ""))
                .await
                .unwrap()
                .into_inner()
                .next_page_token;

            for (customer_id, token) in [
                (alice.to_string(), &unfiltered),
                (String::new(), &alices),
                (bob.to_string(), &alices),
            ] {
                let status = server
                    .client
                    .list_package_requests(list(&customer_id, 1, token))
                    .await
                    .unwrap_err();
                assert_eq!(violated_fields(&status), ["page_token"]);
                assert!(
                    status
                        .message()
                        .contains("was issued for a different customer_id filter"),
                    "{}",
                    status.message()
                );
            }

            // The same filter, spelled in upper case, is the same filter.
            let next = server
                .client
                .list_package_requests(list(&alice.to_string().to_uppercase(), 1, &alices))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(next.package_requests.len(), 1);
            assert_eq!(next.package_requests[0].customer_id, alice.to_string());
            server.stop().await;
        })
        .await;
    }

    async fn status_follows_the_package_life_cycle(db: Database) {
        bounded(async {
            let (clock, mut server) = fresh(&db).await;
            let client = &mut server.client;
            let package = create(client, Uuid::now_v7(), "welcome_package").await;

            clock.advance(Duration::from_secs(60));
            let shipped = set_status(client, &package.id, PackageStatus::Shipped)
                .await
                .unwrap();
            assert_eq!(shipped.status(), PackageStatus::Shipped);
            assert_eq!(shipped.create_time, package.create_time);
            assert_eq!(shipped.update_time, Some(clock_now(&clock).into()));

            // Setting the current status again changes nothing, not even the update time.
            clock.advance(Duration::from_secs(60));
            let again = set_status(client, &package.id, PackageStatus::Shipped)
                .await
                .unwrap();
            assert_eq!(again, shipped);

            clock.advance(Duration::from_secs(60));
            let delivered = set_status(client, &package.id, PackageStatus::Delivered)
                .await
                .unwrap();
            assert_eq!(delivered.status(), PackageStatus::Delivered);
            assert_eq!(delivered.update_time, Some(clock_now(&clock).into()));
            assert_eq!(get(client, &package.id).await.unwrap(), delivered);

            let other = create(client, Uuid::now_v7(), "welcome_package").await;
            let cancelled = set_status(client, &other.id, PackageStatus::Cancelled)
                .await
                .unwrap();
            assert_eq!(cancelled.status(), PackageStatus::Cancelled);
            assert_eq!(get(client, &other.id).await.unwrap(), cancelled);
            server.stop().await;
        })
        .await;
    }

    async fn illegal_status_moves_are_failed_precondition_and_change_nothing(db: Database) {
        use PackageStatus::{Cancelled, Delivered, Pending, Shipped};
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let client = &mut server.client;
            // (how to get there from PENDING, the move that must be refused)
            let cases: [(&[PackageStatus], PackageStatus); 9] = [
                (&[], Delivered),
                (&[Shipped], Pending),
                (&[Shipped], Cancelled),
                (&[Shipped, Delivered], Pending),
                (&[Shipped, Delivered], Shipped),
                (&[Shipped, Delivered], Cancelled),
                (&[Cancelled], Pending),
                (&[Cancelled], Shipped),
                (&[Cancelled], Delivered),
            ];
            for (path, to) in cases {
                let package = create(client, Uuid::now_v7(), "welcome_package").await;
                for step in path {
                    set_status(client, &package.id, *step).await.unwrap();
                }
                let before = get(client, &package.id).await.unwrap();
                let status = set_status(client, &package.id, to).await.unwrap_err();
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_error_info(&status, "STATUS_CHANGE_NOT_ALLOWED");
                let from = before
                    .status()
                    .as_str_name()
                    .trim_start_matches("PACKAGE_STATUS_");
                let to_name = to.as_str_name().trim_start_matches("PACKAGE_STATUS_");
                assert!(
                    status
                        .message()
                        .contains(&format!("is {from} and cannot move to {to_name}")),
                    "{}",
                    status.message()
                );
                assert!(
                    status.message().contains(
                        "allowed moves: PENDING to SHIPPED, SHIPPED to DELIVERED, PENDING to CANCELLED"
                    ),
                    "{}",
                    status.message()
                );
                assert_eq!(get(client, &package.id).await.unwrap(), before);
            }
            server.stop().await;
        })
        .await;
    }

    async fn package_requests_survive_a_restart(db: Database) {
        bounded(async {
            let clock = ManualClock::new(start_time());
            let mut server = Server::start(&db, &clock).await;
            let request_id = Uuid::now_v7().to_string();
            let request = CreatePackageRequestRequest {
                request_id: request_id.clone(),
                ..create_request(Uuid::now_v7(), "welcome_package")
            };
            let first = server
                .client
                .create_package_request(request.clone())
                .await
                .unwrap()
                .into_inner();
            create(&mut server.client, Uuid::now_v7(), "birthday_package").await;
            clock.advance(Duration::from_secs(5));
            let shipped = set_status(&mut server.client, &first.id, PackageStatus::Shipped)
                .await
                .unwrap();
            let (before, _) = list_all(&mut server.client, "", 0).await;
            server.stop().await;

            let mut server = Server::start(&db, &clock).await;
            assert_eq!(get(&mut server.client, &first.id).await.unwrap(), shipped);
            let (after, _) = list_all(&mut server.client, "", 0).await;
            assert_eq!(after, before);
            // The idempotency key outlives the process too.
            let retry = server
                .client
                .create_package_request(request)
                .await
                .unwrap()
                .into_inner();
            assert!(retry.replayed);
            assert_eq!(pb_without_replayed(retry), shipped);
            assert_eq!(count(&mut server.client).await, 2);
            // New requests list after the old ones.
            let newest = create(&mut server.client, Uuid::now_v7(), "welcome_package").await;
            let (all, _) = list_all(&mut server.client, "", 0).await;
            assert_eq!(all.last(), Some(&newest));
            server.stop().await;
        })
        .await;
    }

    async fn unknown_id_is_not_found(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let unknown = Uuid::now_v7().to_string();
            let status = get(&mut server.client, &unknown).await.unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert_error_info(&status, "PACKAGE_REQUEST_NOT_FOUND");
            assert!(status.message().contains(&unknown), "{}", status.message());
            let status = set_status(&mut server.client, &unknown, PackageStatus::Shipped)
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert_error_info(&status, "PACKAGE_REQUEST_NOT_FOUND");
            server.stop().await;
        })
        .await;
    }

    async fn a_batch_answers_each_request_in_order_and_one_bad_request_spoils_nothing(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh(&db).await;
            let customers: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
            let retried = CreatePackageRequestRequest {
                request_id: Uuid::new_v4().to_string(),
                ..create_request(customers[2], "welcome_package")
            };
            let reused = CreatePackageRequestRequest {
                package_type: "other_package".into(),
                ..retried.clone()
            };
            let requests = vec![
                create_request(customers[0], "welcome_package"),
                CreatePackageRequestRequest {
                    customer_id: "not-a-uuid".into(),
                    package_type: "Bad Type".into(),
                    request_id: String::new(),
                },
                create_request(customers[1], "welcome_package"),
                retried.clone(),
                // The same request id again in the same batch: one package, the same answer.
                retried.clone(),
                // The same request id with different parameters.
                reused,
            ];
            let results = server
                .client
                .batch_create_package_requests(batch(requests))
                .await
                .unwrap()
                .into_inner()
                .results;
            assert_eq!(results.len(), 6);
            let package = |n: usize| match &results[n].result {
                Some(BatchItem::PackageRequest(p)) => p.clone(),
                other => panic!("result {n} is not a package request: {other:?}"),
            };
            let error = |n: usize| match &results[n].result {
                Some(BatchItem::Error(e)) => e.clone(),
                other => panic!("result {n} is not an error: {other:?}"),
            };
            assert_eq!(package(0).customer_id, customers[0].to_string());
            assert_eq!(package(2).customer_id, customers[1].to_string());
            assert_eq!(package(3).id, package(4).id, "one package per request id");
            assert_eq!(package(3).request_id, retried.request_id);

            let invalid = error(1);
            assert_eq!(invalid.code, Code::InvalidArgument as i32, "{invalid:?}");
            let fields: Vec<&str> = invalid
                .field_violations
                .iter()
                .map(|v| v.field.as_str())
                .collect();
            assert_eq!(fields, ["customer_id", "package_type"]);
            assert_eq!(invalid.reason, "INVALID_FIELD");
            assert_eq!(error(5).code, Code::AlreadyExists as i32, "{:?}", error(5));
            assert_eq!(error(5).reason, "REQUEST_ID_REUSED");

            // Exactly what the single calls would have created, and readable as usual.
            assert_eq!(count(&mut server.client).await, 3);
            assert_eq!(
                get(&mut server.client, &package(0).id).await.unwrap(),
                package(0)
            );

            // A repeated batch replays every created package request.
            let again = server
                .client
                .batch_create_package_requests(batch(vec![retried.clone()]))
                .await
                .unwrap()
                .into_inner()
                .results;
            assert!(
                matches!(&again[0].result, Some(BatchItem::PackageRequest(p)) if p.id == package(3).id)
            );
            assert_eq!(count(&mut server.client).await, 3);
            server.stop().await;
        })
        .await;
    }
}
