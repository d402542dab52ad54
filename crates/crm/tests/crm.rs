//! The CRM service as a client sees it: a real server on a real socket, called through the
//! generated client. The tests pin the contract in `proto/crm/v1/crm.proto`: validation,
//! idempotency, the change log's order, and how the watch stream resumes, keeps up, expires,
//! is limited, shuts down and survives a restart.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_crm::error::{RESUME_TOKEN_EXPIRED, RESUME_TOKEN_UNKNOWN_LOG};
use mip_crm::{CrmOptions, SERVICE_NAME, StartError};
use mip_proto::crm::v1::create_customer_result::Result as Created;
use mip_proto::crm::v1::crm_service_client::CrmServiceClient;
use mip_proto::crm::v1::watch_customers_response::Kind;
use mip_proto::crm::v1::{
    BatchCreateCustomersRequest, CreateCustomerRequest, Customer, CustomerEvent, CustomerEventType,
    DeleteCustomerRequest, DeleteCustomerResponse, GetCustomerRequest, Heartbeat,
    ListCustomerEventsRequest, ListCustomerEventsResponse, ListCustomersRequest,
    ListCustomersResponse, PartitionFilter, StartPosition, UpdateCustomerRequest,
    WatchCustomersRequest, WatchCustomersResponse,
};
use mip_runtime::CancellationToken;
use mip_runtime::clock::{Clock, ManualClock};
use mip_runtime::server::ServerOptions;
use mip_runtime::sqlite::Durability;
use mip_runtime::status::reason;
use mip_runtime::store::Database;
use mip_runtime::token;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use uuid::Uuid;

type Client = CrmServiceClient<Channel>;

/// Longest any test may take; generous, so a slow machine never fails a test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for something the server does on its own time (a heartbeat, a retention
/// pass, a watcher slot being freed). Only a broken server takes this long.
const EVENTUALLY: Duration = Duration::from_secs(10);

/// Pause between polls while waiting for such a thing.
const POLL: Duration = Duration::from_millis(50);

/// Heartbeat interval of servers whose tests wait for heartbeats.
///
/// The interval is real time, not `tokio::time::pause()`: the server and the client talk over a
/// real socket, and paused time auto-advances whenever the runtime waits on that socket, which
/// would fire the test timeout and hyper's keepalive timers as readily as the heartbeat. A
/// short real interval plus a generous [`EVENTUALLY`] keeps the tests fast without making them
/// depend on machine speed.
const FAST_HEARTBEAT: Duration = Duration::from_millis(50);

/// Kind of CRM resume tokens, as the service encodes them.
const RESUME_TOKEN_KIND: u8 = 1;

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
    /// The client's connection, for other clients (health, a second CRM client).
    channel: Channel,
    /// Where the server listens.
    addr: String,
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
    async fn start(database: &Database, options: CrmOptions, clock: &ManualClock) -> Self {
        let server = ServerOptions {
            shutdown_grace: Duration::from_secs(2),
            ..ServerOptions::default()
        };
        Self::start_with(database, options, clock, server).await
    }

    async fn start_with(
        database: &Database,
        options: CrmOptions,
        clock: &ManualClock,
        server: ServerOptions,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let database = database.clone();
        let clock = Arc::new(clock.clone());
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { mip_crm::serve(listener, &database, options, &server, clock, shutdown).await }
        });
        // The listener is already bound, so connecting right away works.
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        wait_until_serving(&channel).await;
        Self {
            client: CrmServiceClient::new(channel.clone()),
            channel,
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        drop(self.client);
        drop(self.channel);
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Waits, as a client would, until health reports CRM SERVING: a PostgreSQL store connects
/// and migrates after the server has started listening.
async fn wait_until_serving(channel: &Channel) {
    let mut health = HealthClient::new(channel.clone());
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: SERVICE_NAME.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(status) = statuses.message().await.unwrap() {
        if status.status() == ServingStatus::Serving {
            return;
        }
    }
    panic!("health watch ended before CRM was serving");
}

/// A fresh data directory and a server on it with `options`.
async fn fresh_with(options: CrmOptions) -> (tempfile::TempDir, ManualClock, Server) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(start_time());
    let database = Database::Sqlite {
        dir: dir.path().to_owned(),
        durability: Durability::Normal,
    };
    let server = Server::start(&database, options, &clock).await;
    (dir, clock, server)
}

/// A server with `options` on `database` (fresh, from [`mip_testkit::backend_tests!`]).
async fn fresh_on(database: &Database, options: CrmOptions) -> (ManualClock, Server) {
    let clock = ManualClock::new(start_time());
    let server = Server::start(database, options, &clock).await;
    (clock, server)
}

/// A fresh data directory and a server on it with default options.
async fn fresh() -> (tempfile::TempDir, ManualClock, Server) {
    fresh_with(CrmOptions::default()).await
}

/// Options whose watch streams send heartbeats every [`FAST_HEARTBEAT`].
fn fast_heartbeats() -> CrmOptions {
    CrmOptions {
        heartbeat_interval: FAST_HEARTBEAT,
        ..CrmOptions::default()
    }
}

fn new_customer(name: &str, email: &str) -> CreateCustomerRequest {
    CreateCustomerRequest {
        name: name.to_owned(),
        email: email.to_owned(),
        request_id: String::new(),
    }
}

async fn create(client: &mut Client, name: &str, email: &str) -> Customer {
    client
        .create_customer(new_customer(name, email))
        .await
        .unwrap()
        .into_inner()
}

/// `n` customers with distinct emails, created one after another.
async fn create_many(client: &mut Client, tag: &str, n: usize) -> Vec<Customer> {
    let mut created = Vec::with_capacity(n);
    for i in 0..n {
        created.push(
            create(
                client,
                &format!("{tag} {i}"),
                &format!("{tag}{i}@example.com"),
            )
            .await,
        );
    }
    created
}

async fn get(client: &mut Client, id: &str) -> Result<Customer, Status> {
    client
        .get_customer(GetCustomerRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
}

/// Updates `customer` with a mask of `paths` (no mask at all when empty).
async fn update(
    client: &mut Client,
    customer: Customer,
    paths: &[&str],
) -> Result<Customer, Status> {
    let update_mask = (!paths.is_empty()).then(|| prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    });
    client
        .update_customer(UpdateCustomerRequest {
            customer: Some(customer),
            update_mask,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn delete(client: &mut Client, id: &str) -> Result<DeleteCustomerResponse, Status> {
    client
        .delete_customer(DeleteCustomerRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
}

async fn list_page(
    client: &mut Client,
    page_size: i32,
    page_token: &str,
) -> Result<ListCustomersResponse, Status> {
    client
        .list_customers(ListCustomersRequest {
            page_size,
            page_token: page_token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Every customer, page by page; also returns every page.
async fn list_all(
    client: &mut Client,
    page_size: i32,
) -> (Vec<Customer>, Vec<ListCustomersResponse>) {
    let mut customers = Vec::new();
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_page(client, page_size, &token).await.unwrap();
        customers.extend(page.customers.iter().cloned());
        token.clone_from(&page.next_page_token);
        pages.push(page);
        if token.is_empty() {
            return (customers, pages);
        }
    }
}

fn events_after(resume_token: &str, page_size: i32) -> ListCustomerEventsRequest {
    ListCustomerEventsRequest {
        resume_token: resume_token.to_owned(),
        start_position: StartPosition::Unspecified.into(),
        page_size,
        partition_filter: None,
    }
}

fn events_from(start: StartPosition, page_size: i32) -> ListCustomerEventsRequest {
    ListCustomerEventsRequest {
        resume_token: String::new(),
        start_position: start.into(),
        page_size,
        partition_filter: None,
    }
}

async fn list_events(
    client: &mut Client,
    request: ListCustomerEventsRequest,
) -> Result<ListCustomerEventsResponse, Status> {
    client
        .list_customer_events(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Every event still in the log, oldest first, polled in the largest pages.
async fn all_events(client: &mut Client) -> Vec<CustomerEvent> {
    let mut events = Vec::new();
    let mut page = list_events(client, events_from(StartPosition::Earliest, 1000))
        .await
        .unwrap();
    loop {
        events.append(&mut page.events);
        if page.remaining_events == 0 {
            return events;
        }
        page = list_events(client, events_after(&page.next_resume_token, 1000))
            .await
            .unwrap();
    }
}

/// Sequence number of the newest event in the log.
async fn head(client: &mut Client) -> i64 {
    let latest = list_events(client, events_from(StartPosition::Latest, 0))
        .await
        .unwrap();
    assert!(latest.events.is_empty(), "{latest:?}");
    latest.next_sequence
}

fn watch_after(resume_token: &str) -> WatchCustomersRequest {
    WatchCustomersRequest {
        resume_token: resume_token.to_owned(),
        start_position: StartPosition::Unspecified.into(),
        partition_filter: None,
    }
}

fn watch_from(start: StartPosition) -> WatchCustomersRequest {
    WatchCustomersRequest {
        resume_token: String::new(),
        start_position: start.into(),
        partition_filter: None,
    }
}

async fn watch(
    client: &mut Client,
    request: WatchCustomersRequest,
) -> Result<Streaming<WatchCustomersResponse>, Status> {
    client
        .watch_customers(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The next message of a watch stream, which must not have ended.
async fn next_message(stream: &mut Streaming<WatchCustomersResponse>) -> Kind {
    stream
        .message()
        .await
        .expect("watch stream failed")
        .expect("watch stream ended")
        .kind
        .expect("a message of the watch stream carries an event or a heartbeat")
}

/// The next event of a watch stream, skipping heartbeats.
async fn next_event(stream: &mut Streaming<WatchCustomersResponse>) -> CustomerEvent {
    loop {
        if let Kind::Event(event) = next_message(stream).await {
            return event;
        }
    }
}

/// The next heartbeat of a watch stream; fails if an event comes first or none comes in time.
async fn next_heartbeat(stream: &mut Streaming<WatchCustomersResponse>) -> Heartbeat {
    let message = tokio::time::timeout(EVENTUALLY, next_message(stream))
        .await
        .expect("no heartbeat in time");
    match message {
        Kind::Heartbeat(heartbeat) => heartbeat,
        Kind::Event(event) => panic!("expected a heartbeat, got {event:?}"),
    }
}

/// Every event a stream delivers up to sequence `head`, and proof that nothing else follows:
/// a heartbeat at `head`, which a stream sends only once it has delivered everything before
/// it. The stream's server must send heartbeats (see [`fast_heartbeats`]).
async fn read_to_head(
    stream: &mut Streaming<WatchCustomersResponse>,
    head: i64,
) -> Vec<CustomerEvent> {
    let mut events = Vec::new();
    loop {
        match next_message(stream).await {
            Kind::Event(event) => {
                assert!(
                    event.sequence <= head,
                    "event past the head {head}: {event:?}"
                );
                events.push(event);
            }
            Kind::Heartbeat(heartbeat) if heartbeat.sequence == head => return events,
            Kind::Heartbeat(_) => {}
        }
    }
}

fn sequences(events: &[CustomerEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

fn event_types(events: &[CustomerEvent]) -> Vec<CustomerEventType> {
    events.iter().map(CustomerEvent::r#type).collect()
}

fn ids(customers: &[Customer]) -> Vec<&str> {
    customers.iter().map(|c| c.id.as_str()).collect()
}

fn event_customer_ids(events: &[CustomerEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| {
            e.customer
                .as_ref()
                .expect("event carries a customer")
                .id
                .as_str()
        })
        .collect()
}

/// The fields an INVALID_ARGUMENT status names, in order.
fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("a BadRequest detail");
    bad.field_violations.into_iter().map(|v| v.field).collect()
}

/// Asserts the status is FAILED_PRECONDITION with ErrorInfo `expected_reason`.
fn assert_precondition(status: &Status, expected_reason: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason(status).as_deref(),
        Some(expected_reason),
        "{status:?}"
    );
}

/// Asserts the status carries an `ErrorInfo` of CRM's domain with `expected_reason`, a value
/// of `crm.v1.ErrorReason`.
fn assert_error_info(status: &Status, expected_reason: &str) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "crm.mip.example.com", "{status:?}");
    assert_eq!(info.reason, expected_reason, "{status:?}");
    assert!(
        mip_proto::crm::v1::ErrorReason::from_str_name(&info.reason).is_some(),
        "{} is not a crm.v1.ErrorReason",
        info.reason
    );
}

/// A well-formed resume token of the same log as `real`, at `position`.
fn token_at(real: &str, position: u64) -> String {
    let [log_id, _] = token::decode::<2>(RESUME_TOKEN_KIND, real).expect("a real resume token");
    token::encode(RESUME_TOKEN_KIND, &[log_id, position])
}

fn clock_now(clock: &ManualClock) -> SystemTime {
    clock.now()
}

#[tokio::test]
async fn update_changes_only_masked_fields_and_bumps_version() {
    bounded(async {
        let (_dir, clock, mut server) = fresh().await;
        let client = &mut server.client;
        let original = create(client, "Ada", "ada@example.com").await;
        clock.advance(Duration::from_secs(1));

        // Both fields differ in the request, but only the name is in the mask.
        let request = Customer {
            name: "Ada King".into(),
            email: "countess@example.com".into(),
            ..original.clone()
        };
        let renamed = update(client, request.clone(), &["name"]).await.unwrap();
        assert_eq!(renamed.name, "Ada King");
        assert_eq!(renamed.email, "ada@example.com");
        assert_eq!(renamed.version, 2);
        assert_eq!(renamed.update_time, Some(clock_now(&clock).into()));

        clock.advance(Duration::from_secs(1));
        let readdressed = update(
            client,
            Customer {
                name: String::new(),
                // Based on the renamed copy: the original's version is stale now.
                version: renamed.version,
                ..request
            },
            &["email"],
        )
        .await
        .unwrap();
        assert_eq!(
            readdressed.name, "Ada King",
            "an unmasked field is not even validated"
        );
        assert_eq!(readdressed.email, "countess@example.com");
        assert_eq!(readdressed.version, 3);
        assert_eq!(get(client, &original.id).await.unwrap(), readdressed);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn update_that_changes_nothing_keeps_the_version_and_logs_nothing() {
    bounded(async {
        let (_dir, clock, mut server) = fresh().await;
        let client = &mut server.client;
        let original = create(client, "Ada", "ada@example.com").await;
        clock.advance(Duration::from_secs(1));
        let same = update(client, original.clone(), &[]).await.unwrap();
        assert_eq!(same, original);
        assert_eq!(head(client).await, 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn deleted_customer_is_not_found() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        let customer = create(client, "Ada", "ada@example.com").await;
        delete(client, &customer.id).await.unwrap();

        let status = get(client, &customer.id).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = delete(client, &customer.id).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = update(client, customer.clone(), &[]).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");

        // The email is free again.
        let again = create(client, "Ada", "ada@example.com").await;
        assert_ne!(again.id, customer.id);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_id_is_not_found() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        let unknown = Uuid::now_v7().to_string();
        let status = get(client, &unknown).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().contains(&unknown), "{}", status.message());
        let stranger = Customer {
            id: unknown.clone(),
            name: "Nobody".into(),
            email: "nobody@example.com".into(),
            ..Customer::default()
        };
        let status = update(client, stranger, &[]).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = delete(client, &unknown).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(head(client).await, 0, "failed calls log nothing");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn each_invalid_create_field_is_reported() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        let long_name = "x".repeat(201);
        let cases: [(CreateCustomerRequest, &[&str]); 7] = [
            (new_customer("", "ada@example.com"), &["name"]),
            (new_customer("   ", "ada@example.com"), &["name"]),
            (new_customer(&long_name, "ada@example.com"), &["name"]),
            (new_customer("Ada", "not-an-email"), &["email"]),
            (new_customer("Ada", "ada@localhost"), &["email"]),
            (
                CreateCustomerRequest {
                    request_id: "42".into(),
                    ..new_customer("Ada", "ada@example.com")
                },
                &["request_id"],
            ),
            (CreateCustomerRequest::default(), &["name", "email"]),
        ];
        for (request, expected) in cases {
            let status = client.create_customer(request.clone()).await.unwrap_err();
            assert_eq!(violated_fields(&status), expected, "{request:?}");
        }
        assert_eq!(head(client).await, 0, "nothing was created");

        // The longest name is accepted, counted in characters rather than bytes.
        let longest = create(client, &"é".repeat(200), "ada@example.com").await;
        assert_eq!(longest.name.chars().count(), 200);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_ids_masks_and_page_sizes_are_reported() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        let customer = create(client, "Ada", "ada@example.com").await;

        for id in ["", "not-a-uuid", "12345"] {
            let status = get(client, id).await.unwrap_err();
            assert_eq!(violated_fields(&status), ["id"], "get {id:?}");
            let status = delete(client, id).await.unwrap_err();
            assert_eq!(violated_fields(&status), ["id"], "delete {id:?}");
        }

        let bad_id = Customer {
            id: "not-a-uuid".into(),
            ..customer.clone()
        };
        let status = update(client, bad_id, &["name"]).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["customer.id"]);
        let bad_values = Customer {
            name: String::new(),
            email: "nope".into(),
            ..customer.clone()
        };
        let status = update(client, bad_values, &[]).await.unwrap_err();
        assert_eq!(
            violated_fields(&status),
            ["customer.name", "customer.email"]
        );
        let status = update(client, customer.clone(), &["version"])
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["update_mask"]);
        let status = client
            .update_customer(UpdateCustomerRequest::default())
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["customer"]);

        let status = list_page(client, -1, "").await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_size"]);
        let status = list_page(client, 0, "garbage").await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_token"]);
        let status = list_events(client, events_from(StartPosition::Earliest, -1))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["page_size"]);
        let status = list_events(
            client,
            ListCustomerEventsRequest {
                start_position: 99,
                ..events_from(StartPosition::Earliest, 0)
            },
        )
        .await
        .unwrap_err();
        assert_eq!(violated_fields(&status), ["start_position"]);

        assert_eq!(get(client, &customer.id).await.unwrap(), customer);
        assert_eq!(head(client).await, 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn page_size_above_the_maximum_is_lowered_not_refused() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        let created = create_many(client, "customer", 5).await;

        let page = list_page(client, 5000, "").await.unwrap();
        assert!(page.customers.len() <= 1000);
        assert_eq!(ids(&page.customers), ids(&created));
        assert_eq!(page.next_page_token, "");

        let events = list_events(client, events_from(StartPosition::Earliest, 5000))
            .await
            .unwrap();
        assert_eq!(sequences(&events.events), [1, 2, 3, 4, 5]);
        assert_eq!(events.remaining_events, 0);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn batch_create_refuses_an_empty_or_oversized_batch_and_keeps_a_full_one_in_order() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        for n in [0, 1001] {
            let requests = (0..n)
                .map(|i| new_customer("Bulk", &format!("bulk{i}@example.com")))
                .collect();
            let status = client
                .batch_create_customers(BatchCreateCustomersRequest { requests })
                .await
                .unwrap_err();
            assert_eq!(violated_fields(&status), ["requests"], "{n} requests");
        }
        assert_eq!(head(client).await, 0, "nothing was created");
        let requests = (0..1000)
            .map(|i| new_customer("Bulk", &format!("bulk{i}@example.com")))
            .collect();
        let results = client
            .batch_create_customers(BatchCreateCustomersRequest { requests })
            .await
            .unwrap()
            .into_inner()
            .results;
        let emails: Vec<String> = results
            .into_iter()
            .map(|r| match r.result {
                Some(Created::Customer(customer)) => customer.email,
                other => panic!("{other:?}"),
            })
            .collect();
        let expected: Vec<String> = (0..1000).map(|i| format!("bulk{i}@example.com")).collect();
        assert_eq!(emails, expected, "results in request order");
        // The log has the thousand CREATED events in request order.
        let logged: Vec<String> = all_events(client)
            .await
            .into_iter()
            .map(|e| e.customer.expect("event carries a customer").email)
            .collect();
        assert_eq!(logged, expected, "events in request order");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn idle_watch_sends_heartbeats_at_the_head() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_with(fast_heartbeats()).await;
        let client = &mut server.client;
        create_many(client, "customer", 2).await;

        let mut stream = watch(client, watch_from(StartPosition::Earliest))
            .await
            .unwrap();
        assert_eq!(next_event(&mut stream).await.sequence, 1);
        assert_eq!(next_event(&mut stream).await.sequence, 2);
        let heartbeat = next_heartbeat(&mut stream).await;
        assert_eq!(heartbeat.sequence, head(client).await);
        assert_eq!(heartbeat.send_time, Some(start_time().into()));
        let after = list_events(client, events_after(&heartbeat.resume_token, 0))
            .await
            .unwrap();
        assert!(after.events.is_empty(), "{after:?}");
        assert_eq!(after.remaining_events, 0);
        assert_eq!(after.next_sequence, 2);

        // Heartbeats keep coming while the stream is idle.
        assert_eq!(next_heartbeat(&mut stream).await.sequence, 2);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn slow_watcher_catches_up_on_every_event_in_order() {
    const CUSTOMERS: usize = 600;
    bounded(async {
        let (_dir, _clock, mut server) = fresh_with(fast_heartbeats()).await;
        // A small receive window, so the server cannot park the whole backlog in the
        // transport and the watch task really waits on the unread stream.
        let channel = Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .initial_stream_window_size(Some(4096))
            .connect()
            .await
            .unwrap();
        let mut watcher = CrmServiceClient::new(channel);
        let mut stream = watch(&mut watcher, watch_from(StartPosition::Earliest))
            .await
            .unwrap();

        let mut creates = JoinSet::new();
        for i in 0..CUSTOMERS {
            let mut client = server.client.clone();
            creates.spawn(async move {
                create(
                    &mut client,
                    &format!("customer {i}"),
                    &format!("c{i}@example.com"),
                )
                .await
            });
        }
        let created: HashSet<String> = creates.join_all().await.into_iter().map(|c| c.id).collect();
        assert_eq!(created.len(), CUSTOMERS);

        let head = i64::try_from(CUSTOMERS).unwrap();
        let seen = read_to_head(&mut stream, head).await;
        assert_eq!(sequences(&seen), (1..=head).collect::<Vec<_>>());
        assert!(
            event_types(&seen)
                .iter()
                .all(|t| *t == CustomerEventType::Created)
        );
        let seen_ids: HashSet<String> = event_customer_ids(&seen)
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(seen_ids, created);
        assert_eq!(seen, all_events(&mut server.client).await);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn malformed_resume_token_is_invalid_argument() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        create(client, "Ada", "ada@example.com").await;
        let real = list_page(client, 0, "").await.unwrap().resume_token;
        let truncated = &real[..real.len() - 2];
        for bad in ["garbage", "not a token!", truncated] {
            let status = list_events(client, events_after(bad, 0)).await.unwrap_err();
            assert_eq!(violated_fields(&status), ["resume_token"], "{bad:?}");
            let status = watch(client, watch_after(bad)).await.unwrap_err();
            assert_eq!(violated_fields(&status), ["resume_token"], "{bad:?}");
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn page_token_used_as_resume_token_is_invalid_argument() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        create_many(client, "customer", 2).await;
        let page_token = list_page(client, 1, "").await.unwrap().next_page_token;
        assert!(!page_token.is_empty());

        let status = list_events(client, events_after(&page_token, 0))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["resume_token"]);
        let status = watch(client, watch_after(&page_token)).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["resume_token"]);

        // And the other way round.
        let resume_token = list_page(client, 1, "").await.unwrap().resume_token;
        let status = list_page(client, 1, &resume_token).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_token"]);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn token_ahead_of_the_log_is_out_of_range() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        create_many(client, "customer", 2).await;
        let real = list_page(client, 0, "").await.unwrap().resume_token;
        let head = u64::try_from(head(client).await).unwrap();
        let ahead = token_at(&real, head + 10);

        let status = list_events(client, events_after(&ahead, 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        let status = watch(client, watch_after(&ahead)).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

        // The head itself is a valid place to resume from.
        let at_head = list_events(client, events_after(&token_at(&real, head), 0))
            .await
            .unwrap();
        assert!(at_head.events.is_empty());

        // A page token is checksummed, not signed: one made up with a snapshot past the head
        // is refused at once rather than waited on.
        let [log_id, _] = mip_runtime::token::decode::<2>(1, &real).unwrap();
        let page_token = mip_runtime::token::encode(2, &[log_id, head + 10, 0]);
        let status = list_page(client, 1, &page_token).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn token_from_another_database_is_failed_precondition() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let (_other_dir, _other_clock, mut other) = fresh().await;
        create_many(&mut server.client, "customer", 2).await;
        create_many(&mut other.client, "customer", 2).await;
        let listing = list_page(&mut server.client, 1, "").await.unwrap();

        let status = list_events(&mut other.client, events_after(&listing.resume_token, 0))
            .await
            .unwrap_err();
        assert_precondition(&status, RESUME_TOKEN_UNKNOWN_LOG);
        let status = watch(&mut other.client, watch_after(&listing.resume_token))
            .await
            .unwrap_err();
        assert_precondition(&status, RESUME_TOKEN_UNKNOWN_LOG);

        let status = list_page(&mut other.client, 1, &listing.next_page_token)
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["page_token"]);
        other.stop().await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn disabled_watch_is_unimplemented_and_polling_still_works() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_with(CrmOptions {
            disable_watch: true,
            ..CrmOptions::default()
        })
        .await;
        let client = &mut server.client;
        let customer = create(client, "Ada", "ada@example.com").await;
        let status = watch(client, watch_from(StartPosition::Earliest))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(
            status.message().contains("ListCustomerEvents"),
            "{}",
            status.message()
        );

        let events = all_events(client).await;
        assert_eq!(event_customer_ids(&events), [customer.id.as_str()]);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_fields_and_unknown_ids_carry_reasons_a_program_can_act_on() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        let status = client
            .create_customer(new_customer("", "not an email"))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["name", "email"]);
        assert_error_info(&status, "INVALID_FIELD");

        let unknown = Uuid::now_v7().to_string();
        let status = get(client, &unknown).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_error_info(&status, "CUSTOMER_NOT_FOUND");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted_with_message_too_large() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Normal,
        };
        let server_options = ServerOptions {
            max_message_bytes: 1024,
            shutdown_grace: Duration::from_secs(2),
            ..ServerOptions::default()
        };
        let clock = ManualClock::new(start_time());
        let mut server =
            Server::start_with(&database, CrmOptions::default(), &clock, server_options).await;
        let status = server
            .client
            .create_customer(new_customer(&"x".repeat(2000), "big@example.com"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("the limit is: 1024 bytes"),
            "{}",
            status.message()
        );
        assert_error_info(&status, "MESSAGE_TOO_LARGE");
        // A message within the limit still goes through on the same connection.
        create(&mut server.client, "Small", "small@example.com").await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_resumed_watch_says_it_is_caught_up_long_before_a_heartbeat_is_due() {
    bounded(async {
        // Heartbeats every 30 s: the caught-up heartbeat cannot be one of them.
        let (_dir, _clock, mut server) = fresh().await;
        let client = &mut server.client;
        create_many(client, "backlog", 3).await;
        let snapshot = list_page(client, 0, "").await.unwrap();
        let mut stream = watch(client, watch_after(&snapshot.resume_token))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let live = next_heartbeat(&mut stream).await;
        assert!(live.caught_up, "{live:?}");
        assert_eq!(live.sequence, 3);
        assert!(
            started.elapsed() < CrmOptions::default().heartbeat_interval,
            "sent at once, not after an interval"
        );

        // From the start of the log: every backlog event first, then the caught-up heartbeat.
        let mut stream = watch(client, watch_from(StartPosition::Earliest))
            .await
            .unwrap();
        for sequence in 1..=3 {
            match next_message(&mut stream).await {
                Kind::Event(event) => assert_eq!(event.sequence, sequence),
                Kind::Heartbeat(beat) => panic!("heartbeat before the backlog was sent: {beat:?}"),
            }
        }
        let live = next_heartbeat(&mut stream).await;
        assert!(live.caught_up, "{live:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn watchers_beyond_the_limit_are_resource_exhausted() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_with(CrmOptions {
            max_watchers: 1,
            ..CrmOptions::default()
        })
        .await;
        let client = &mut server.client;
        let first = watch(client, watch_from(StartPosition::Latest))
            .await
            .unwrap();
        let status = watch(client, watch_from(StartPosition::Latest))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_error_info(&status, "TOO_MANY_WATCHERS");
        assert_eq!(
            status
                .get_details_retry_info()
                .and_then(|info| info.retry_delay),
            Some(mip_crm::error::WATCHER_RETRY_DELAY),
            "the client is told how long to wait"
        );
        // Polling is not limited.
        list_events(client, events_from(StartPosition::Earliest, 0))
            .await
            .unwrap();

        // Closing a stream frees its slot; the server notices asynchronously.
        drop(first);
        let deadline = tokio::time::Instant::now() + EVENTUALLY;
        loop {
            match watch(client, watch_from(StartPosition::Latest)).await {
                Ok(_) => break,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the closed stream's slot was not freed"
                    );
                    tokio::time::sleep(POLL).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_open_watch_streams_and_stops_the_server() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        create(&mut server.client, "Ada", "ada@example.com").await;
        let mut stream = watch(&mut server.client, watch_from(StartPosition::Earliest))
            .await
            .unwrap();
        assert_eq!(next_event(&mut stream).await.sequence, 1);

        server.shutdown.cancel();
        let end = tokio::time::timeout(EVENTUALLY, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the watch stream did not end");
        if let Some(status) = end {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        drop(stream);
        drop(server.client);
        drop(server.channel);
        tokio::time::timeout(EVENTUALLY, server.task)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    })
    .await;
}

/// With many streams open, watchers let commits collect for a moment before reading (to spare
/// the CPU); every one of them still gets every event, in order, and the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_watchers_each_receive_every_event_in_order() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh_with(fast_heartbeats()).await;
        const WATCHERS: usize = 80;
        let mut streams = Vec::with_capacity(WATCHERS);
        for _ in 0..WATCHERS {
            streams.push(
                watch(&mut server.client, watch_from(StartPosition::Latest))
                    .await
                    .unwrap(),
            );
        }
        let created = create_many(&mut server.client, "crowd", 40).await;
        let head = head(&mut server.client).await;
        let mut first: Option<Vec<CustomerEvent>> = None;
        for mut stream in streams {
            let events = read_to_head(&mut stream, head).await;
            assert_eq!(
                event_customer_ids(&events),
                ids(&created),
                "a watcher missed or reordered events"
            );
            match &first {
                None => first = Some(events),
                Some(first) => assert_eq!(&events, first, "watchers saw different events"),
            }
        }
        server.stop().await;
    })
    .await;
}

// The contract where the backend matters (writes, the log, tokens, retention, restarts), on
// SQLite and on PostgreSQL.
mip_testkit::backend_tests! {
    async fn health_reports_serving_for_the_server_and_the_service(db: Database) {
        bounded(async {
            let (_clock, server) = fresh_on(&db, CrmOptions::default()).await;
            let mut health = HealthClient::new(server.channel.clone());
            for service in ["", SERVICE_NAME] {
                let status = health
                    .check(HealthCheckRequest {
                        service: service.to_owned(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status();
                assert_eq!(status, ServingStatus::Serving, "{service:?}");
            }
            server.stop().await;
        })
        .await;
    }

    async fn customer_can_be_created_read_updated_and_deleted(db: Database) {
        bounded(async {
            let (clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let created = create(client, "  Ada Lovelace ", " Ada@Example.com ").await;
            assert!(Uuid::try_parse(&created.id).is_ok(), "{}", created.id);
            assert_eq!(
                created.name, "Ada Lovelace",
                "surrounding white space is trimmed"
            );
            assert_eq!(
                created.email, "Ada@Example.com",
                "the address keeps its case"
            );
            assert_eq!(created.version, 1);
            assert_eq!(created.create_time, Some(start_time().into()));
            assert_eq!(created.update_time, created.create_time);
            assert_eq!(get(client, &created.id).await.unwrap(), created);

            clock.advance(Duration::from_secs(60));
            let changed = Customer {
                name: "Ada King".into(),
                email: "ada.king@example.com".into(),
                ..created.clone()
            };
            let updated = update(client, changed, &[]).await.unwrap();
            assert_eq!(updated.name, "Ada King");
            assert_eq!(updated.email, "ada.king@example.com");
            assert_eq!(updated.version, 2);
            assert_eq!(updated.create_time, created.create_time);
            assert_eq!(updated.update_time, Some(clock_now(&clock).into()));
            assert_eq!(get(client, &created.id).await.unwrap(), updated);

            let deleted = delete(client, &created.id).await.unwrap();
            let [_, position] = token::decode::<2>(RESUME_TOKEN_KIND, &deleted.resume_token).unwrap();
            assert_eq!(position, 3, "the token is the DELETED event's position");
            let (listed, _) = list_all(client, 0).await;
            assert!(listed.is_empty(), "{listed:?}");
            server.stop().await;
        })
        .await;
    }

    async fn email_differing_only_in_case_is_already_exists(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let ada = create(client, "Ada", "ada@example.com").await;
            let status = client
                .create_customer(new_customer("Other Ada", "ADA@Example.COM"))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

            let grace = create(client, "Grace", "grace@example.com").await;
            let taking = Customer {
                email: "Ada@EXAMPLE.com".into(),
                ..grace.clone()
            };
            let status = update(client, taking, &["email"]).await.unwrap_err();
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
            assert_eq!(get(client, &grace.id).await.unwrap(), grace);

            // A customer may change the case of its own address.
            let recased = Customer {
                email: "ADA@example.com".into(),
                ..ada.clone()
            };
            let recased = update(client, recased, &["email"]).await.unwrap();
            assert_eq!(recased.email, "ADA@example.com");
            assert_eq!(head(client).await, 3, "two creates and one update");
            server.stop().await;
        })
        .await;
    }

    /// A taken email and a reused `request_id` are both ALREADY_EXISTS; their reasons tell a
    /// program which one it met, in a single call and in a batch alike.
    async fn taken_email_and_reused_request_id_have_different_reasons(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let request_id = Uuid::new_v4().to_string();
            client
                .create_customer(CreateCustomerRequest {
                    request_id: request_id.clone(),
                    ..new_customer("Ada", "ada@example.com")
                })
                .await
                .unwrap();
            let taken = client
                .create_customer(new_customer("Other Ada", "ada@example.com"))
                .await
                .unwrap_err();
            assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
            assert_error_info(&taken, "EMAIL_TAKEN");
            let reused = client
                .create_customer(CreateCustomerRequest {
                    request_id,
                    ..new_customer("Grace", "grace@example.com")
                })
                .await
                .unwrap_err();
            assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
            assert_error_info(&reused, "REQUEST_ID_REUSED");

            let batch = client
                .batch_create_customers(BatchCreateCustomersRequest {
                    requests: vec![new_customer("Ada again", "ADA@example.com")],
                })
                .await
                .unwrap()
                .into_inner();
            let Some(Created::Error(error)) = &batch.results[0].result else {
                panic!("the taken email is refused: {batch:?}");
            };
            assert_eq!(error.code, Code::AlreadyExists as i32);
            assert_eq!(error.reason, "EMAIL_TAKEN");
            server.stop().await;
        })
        .await;
    }

    /// AIP-154: an update that names the version it was based on applies only to that version.
    async fn update_with_a_stale_version_is_aborted_and_names_both_versions(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let read = create(client, "Ada", "ada@example.com").await;
            assert_eq!(read.version, 1);
            let first = update(
                client,
                Customer {
                    name: "Ada King".into(),
                    ..read.clone()
                },
                &["name"],
            )
            .await
            .unwrap();
            assert_eq!(first.version, 2, "the expected version matched");

            // A second writer still holding version 1.
            let status = update(
                client,
                Customer {
                    name: "Ada Lovelace".into(),
                    ..read.clone()
                },
                &["name"],
            )
            .await
            .unwrap_err();
            assert_eq!(status.code(), Code::Aborted, "{status:?}");
            assert_error_info(&status, "VERSION_MISMATCH");
            assert!(
                status.message().contains("version 2") && status.message().contains("version 1"),
                "{}",
                status.message()
            );
            assert!(status.message().contains("read it again"), "{}", status.message());
            assert_eq!(get(client, &read.id).await.unwrap(), first, "nothing changed");

            // Version 0 (unset) is unconditional, as before.
            let unconditional = update(
                client,
                Customer {
                    name: "Ada Lovelace".into(),
                    version: 0,
                    ..read.clone()
                },
                &["name"],
            )
            .await
            .unwrap();
            assert_eq!(unconditional.version, 3);
            assert_eq!(head(client).await, 3, "one create and two updates");
            server.stop().await;
        })
        .await;
    }

    async fn retried_create_returns_the_original_and_logs_one_event(db: Database) {
        bounded(async {
            let (clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let request = CreateCustomerRequest {
                request_id: Uuid::new_v4().to_string(),
                ..new_customer("Ada", "ada@example.com")
            };
            let first = client
                .create_customer(request.clone())
                .await
                .unwrap()
                .into_inner();
            clock.advance(Duration::from_secs(30));
            let retry = client
                .create_customer(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(retry, first, "the retry answers with the original");

            let events = all_events(client).await;
            assert_eq!(sequences(&events), [1]);
            assert_eq!(event_customer_ids(&events), [first.id.as_str()]);
            let (listed, _) = list_all(client, 0).await;
            assert_eq!(listed, [first]);
            server.stop().await;
        })
        .await;
    }

    async fn batch_create_answers_each_request_in_order_and_logs_them_in_order(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let earlier = create(client, "Grace", "grace@example.com").await;
            let replayed = CreateCustomerRequest {
                request_id: Uuid::now_v7().to_string(),
                ..new_customer("Alan", "alan@example.com")
            };
            let first = client
                .create_customer(replayed.clone())
                .await
                .unwrap()
                .into_inner();
            let requests = vec![
                new_customer("Ada", "ada@example.com"),
                new_customer("", "not-an-email"),
                new_customer("Ada again", "ADA@example.com"),
                replayed,
                new_customer("Grace twin", "Grace@Example.com"),
                new_customer("Edsger", "edsger@example.com"),
            ];
            let results = client
                .batch_create_customers(BatchCreateCustomersRequest { requests })
                .await
                .unwrap()
                .into_inner()
                .results;
            let results: Vec<Created> = results.into_iter().map(|r| r.result.unwrap()).collect();
            assert_eq!(results.len(), 6, "one result per request");
            let Created::Customer(ada) = &results[0] else {
                panic!("{:?}", results[0])
            };
            assert_eq!(ada.email, "ada@example.com");
            let Created::Error(invalid) = &results[1] else {
                panic!("{:?}", results[1])
            };
            assert_eq!(invalid.code, Code::InvalidArgument as i32);
            let fields: Vec<&str> = invalid
                .field_violations
                .iter()
                .map(|v| v.field.as_str())
                .collect();
            assert_eq!(fields, ["name", "email"]);
            let Created::Error(twin) = &results[2] else {
                panic!("{:?}", results[2])
            };
            assert_eq!(
                twin.code,
                Code::AlreadyExists as i32,
                "the first of a batch wins"
            );
            assert_eq!(
                results[3],
                Created::Customer(first.clone()),
                "a repeated request id answers with the original"
            );
            let Created::Error(taken) = &results[4] else {
                panic!("{:?}", results[4])
            };
            assert_eq!(taken.code, Code::AlreadyExists as i32);
            let Created::Customer(edsger) = &results[5] else {
                panic!("{:?}", results[5])
            };
            // The log holds the batch's new customers after the earlier ones, in request order.
            let events = all_events(client).await;
            assert_eq!(
                event_customer_ids(&events),
                [
                    earlier.id.as_str(),
                    first.id.as_str(),
                    ada.id.as_str(),
                    edsger.id.as_str()
                ]
            );
            server.stop().await;
        })
        .await;
    }

    async fn request_id_reused_with_different_parameters_is_already_exists(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let request_id = Uuid::new_v4().to_string();
            let original = CreateCustomerRequest {
                request_id: request_id.clone(),
                ..new_customer("Ada", "ada@example.com")
            };
            client.create_customer(original.clone()).await.unwrap();

            for changed in [
                CreateCustomerRequest {
                    name: "Grace".into(),
                    ..original.clone()
                },
                CreateCustomerRequest {
                    email: "grace@example.com".into(),
                    ..original.clone()
                },
            ] {
                let status = client.create_customer(changed).await.unwrap_err();
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                assert!(
                    status.message().contains(&request_id),
                    "{}",
                    status.message()
                );
            }
            assert_eq!(head(client).await, 1);
            server.stop().await;
        })
        .await;
    }

    async fn changes_are_logged_in_commit_order_without_gaps(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let created = create(client, "Ada", "ada@example.com").await;
            let updated = update(
                client,
                Customer {
                    name: "Ada King".into(),
                    ..created.clone()
                },
                &["name"],
            )
            .await
            .unwrap();
            delete(client, &created.id).await.unwrap();

            let events = all_events(client).await;
            assert_eq!(sequences(&events), [1, 2, 3]);
            assert_eq!(
                event_types(&events),
                [
                    CustomerEventType::Created,
                    CustomerEventType::Updated,
                    CustomerEventType::Deleted
                ]
            );
            assert_eq!(events[0].customer.as_ref(), Some(&created));
            assert_eq!(events[1].customer.as_ref(), Some(&updated));
            assert_eq!(
                events[2].customer.as_ref(),
                Some(&updated),
                "DELETED carries the last state"
            );
            let event_ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(event_ids.len(), 3);
            for event in &events {
                assert!(Uuid::try_parse(&event.event_id).is_ok(), "{event:?}");
                assert_eq!(event.commit_time, Some(start_time().into()));
            }
            server.stop().await;
        })
        .await;
    }

    async fn paging_events_one_at_a_time_walks_every_event_once(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let created = create_many(client, "customer", 3).await;
            update(
                client,
                Customer {
                    name: "Renamed".into(),
                    ..created[0].clone()
                },
                &["name"],
            )
            .await
            .unwrap();
            delete(client, &created[1].id).await.unwrap();
            let expected = all_events(client).await;
            assert_eq!(sequences(&expected), [1, 2, 3, 4, 5]);

            let mut walked = Vec::new();
            let mut remaining = Vec::new();
            let mut page = list_events(client, events_from(StartPosition::Earliest, 1))
                .await
                .unwrap();
            while !page.events.is_empty() {
                assert_eq!(page.events.len(), 1);
                assert_eq!(page.next_resume_token, page.events[0].resume_token);
                assert_eq!(page.next_sequence, page.events[0].sequence);
                remaining.push(page.remaining_events);
                walked.append(&mut page.events);
                page = list_events(client, events_after(&page.next_resume_token, 1))
                    .await
                    .unwrap();
            }
            assert_eq!(walked, expected);
            assert_eq!(remaining, [4, 3, 2, 1, 0]);
            // Caught up: the token stays put and says nothing remains.
            assert_eq!(page.remaining_events, 0);
            assert_eq!(page.next_sequence, 5);
            let again = list_events(client, events_after(&page.next_resume_token, 1))
                .await
                .unwrap();
            assert!(again.events.is_empty());
            assert_eq!(again.next_resume_token, page.next_resume_token);
            server.stop().await;
        })
        .await;
    }

    async fn customer_pages_list_every_customer_once_under_one_resume_token(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let client = &mut server.client;
            let created = create_many(client, "customer", 7).await;

            let (listed, pages) = list_all(client, 3).await;
            assert_eq!(ids(&listed), ids(&created));
            let sizes: Vec<usize> = pages.iter().map(|p| p.customers.len()).collect();
            assert_eq!(sizes, [3, 3, 1]);
            for page in &pages {
                assert_eq!(page.resume_token, pages[0].resume_token);
                assert_eq!(page.resume_sequence, 7);
            }
            server.stop().await;
        })
        .await;
    }

    async fn watch_from_a_listing_token_sees_later_changes_without_gap(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, fast_heartbeats()).await;
            let client = &mut server.client;
            create_many(client, "customer", 3).await;
            let (_, pages) = list_all(client, 2).await;
            let listing = &pages[0];

            let newcomer = create(client, "Newcomer", "newcomer@example.com").await;
            let mut stream = watch(client, watch_after(&listing.resume_token))
                .await
                .unwrap();
            let seen = read_to_head(&mut stream, listing.resume_sequence + 1).await;
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].r#type(), CustomerEventType::Created);
            assert_eq!(seen[0].customer.as_ref(), Some(&newcomer));
            assert_eq!(seen[0].sequence, listing.resume_sequence + 1);
            server.stop().await;
        })
        .await;
    }

    async fn watch_resumes_after_disconnect_without_gaps_or_repeats(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, fast_heartbeats()).await;
            let client = &mut server.client;
            create_many(client, "early", 5).await;

            let mut stream = watch(client, watch_from(StartPosition::Earliest))
                .await
                .unwrap();
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(next_event(&mut stream).await);
            }
            assert_eq!(sequences(&seen), [1, 2, 3]);
            drop(stream);

            create_many(client, "late", 4).await;
            let last_token = &seen.last().unwrap().resume_token;
            let mut stream = watch(client, watch_after(last_token)).await.unwrap();
            let resumed = read_to_head(&mut stream, 9).await;
            assert_eq!(sequences(&resumed), [4, 5, 6, 7, 8, 9]);
            // The same events, ids and tokens included, as polling returns.
            let all = all_events(client).await;
            assert_eq!(resumed, all[3..]);
            server.stop().await;
        })
        .await;
    }

    async fn retention_expires_old_tokens_but_listing_still_works(db: Database) {
        bounded(async {
            let (clock, mut server) = fresh_on(&db, CrmOptions {
                event_retention: Some(Duration::from_millis(200)),
                ..CrmOptions::default()
            })
            .await;
            let client = &mut server.client;
            let created = create_many(client, "customer", 3).await;
            let early = all_events(client).await[0].resume_token.clone();

            clock.advance(Duration::from_secs(3600));
            // Retention runs on its own schedule in real time; wait for it to pass.
            let deadline = tokio::time::Instant::now() + EVENTUALLY;
            let expired = loop {
                match list_events(client, events_after(&early, 0)).await {
                    Err(status) => break status,
                    Ok(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(POLL).await,
                    Ok(page) => panic!("events were not deleted in time: {page:?}"),
                }
            };
            assert_precondition(&expired, RESUME_TOKEN_EXPIRED);
            let status = watch(client, watch_after(&early)).await.unwrap_err();
            assert_precondition(&status, RESUME_TOKEN_EXPIRED);

            // Relisting recovers: every customer is still there, and its token works.
            let (listed, pages) = list_all(client, 0).await;
            assert_eq!(ids(&listed), ids(&created));
            let fresh_token = &pages[0].resume_token;
            let after = list_events(client, events_after(fresh_token, 0))
                .await
                .unwrap();
            assert!(after.events.is_empty(), "{after:?}");
            assert_eq!(after.remaining_events, 0);
            let earliest = list_events(client, events_from(StartPosition::Earliest, 0))
                .await
                .unwrap();
            assert!(earliest.events.is_empty(), "{earliest:?}");

            let mut stream = watch(client, watch_after(fresh_token)).await.unwrap();
            let newcomer = create(client, "Newcomer", "newcomer@example.com").await;
            let event = next_event(&mut stream).await;
            assert_eq!(event.customer.as_ref(), Some(&newcomer));
            assert_eq!(event.sequence, 4);
            server.stop().await;
        })
        .await;
    }

    async fn customers_events_and_tokens_survive_a_restart(db: Database) {
        bounded(async {
            let clock = ManualClock::new(start_time());
            let mut server = Server::start(&db, fast_heartbeats(), &clock).await;
            let client = &mut server.client;
            let retried = CreateCustomerRequest {
                request_id: Uuid::new_v4().to_string(),
                ..new_customer("Ada", "ada@example.com")
            };
            let ada = client
                .create_customer(retried.clone())
                .await
                .unwrap()
                .into_inner();
            let grace = create(client, "Grace", "grace@example.com").await;
            let token_before = all_events(client).await[0].resume_token.clone();
            update(
                client,
                Customer {
                    name: "Ada King".into(),
                    ..ada.clone()
                },
                &["name"],
            )
            .await
            .unwrap();
            delete(client, &grace.id).await.unwrap();
            let (customers_before, _) = list_all(client, 0).await;
            let events_before = all_events(client).await;
            assert_eq!(sequences(&events_before), [1, 2, 3, 4]);
            server.stop().await;

            let mut server = Server::start(&db, fast_heartbeats(), &clock).await;
            let client = &mut server.client;
            let (customers_after, _) = list_all(client, 0).await;
            assert_eq!(customers_after, customers_before);
            assert_eq!(all_events(client).await, events_before);

            // A token from before the restart resumes where it left off, by polling and watching.
            let polled = list_events(client, events_after(&token_before, 0))
                .await
                .unwrap();
            assert_eq!(polled.events, events_before[1..]);
            let mut stream = watch(client, watch_after(&token_before)).await.unwrap();
            assert_eq!(read_to_head(&mut stream, 4).await, events_before[1..]);

            // The idempotency key is remembered, and the log carries on from where it was.
            let retry = client.create_customer(retried).await.unwrap().into_inner();
            assert_eq!(retry, customers_before[0]);
            let newcomer = create(client, "Newcomer", "newcomer@example.com").await;
            let event = next_event(&mut stream).await;
            assert_eq!(event.sequence, 5);
            assert_eq!(event.customer.as_ref(), Some(&newcomer));
            server.stop().await;
        })
        .await;
    }

    /// ListCustomers reads its snapshot from the database, which can see a group commit before
    /// the writer thread has published all of its events to the feed that tokens are checked
    /// against. The token it hands out must still be usable at once, not OUT_OF_RANGE. Big
    /// concurrent batches make that window wide; the check repeats while they commit.
    async fn listing_resume_token_is_usable_at_once_while_writes_commit(db: Database) {
        const CUSTOMERS: usize = 3000;
        bounded(async {
            let (_clock, server) = fresh_on(&db, CrmOptions::default()).await;
            let writing = CancellationToken::new();
            let checker = tokio::spawn({
                let mut client = server.client.clone();
                let writing = writing.clone();
                async move {
                    let mut checks = 0;
                    while !writing.is_cancelled() || checks == 0 {
                        let listing = list_page(&mut client, 1, "").await.unwrap();
                        if let Err(status) =
                            list_events(&mut client, events_after(&listing.resume_token, 1)).await
                        {
                            panic!("token at {} refused: {status:?}", listing.resume_sequence);
                        }
                        checks += 1;
                    }
                }
            });
            let mut creates = JoinSet::new();
            for i in 0..CUSTOMERS {
                let mut client = server.client.clone();
                creates.spawn(async move {
                    create(
                        &mut client,
                        &format!("customer {i}"),
                        &format!("c{i}@example.com"),
                    )
                    .await
                });
            }
            creates.join_all().await;
            writing.cancel();
            checker.await.unwrap();
            server.stop().await;
        })
        .await;
    }
}

/// With its PostgreSQL database missing, CRM stops with the error rather than retrying for
/// ever: waiting will not create the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_postgres_database_stops_serve_with_the_error() {
    bounded(async {
        let Some(pg) = mip_testkit::postgres::PgServer::shared() else {
            return;
        };
        let database = Database::from_url(&pg.url("no_such_database"), 4).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = mip_crm::serve(
            listener,
            &database,
            CrmOptions::default(),
            &ServerOptions::default(),
            Arc::new(ManualClock::new(start_time())),
            CancellationToken::new(),
        )
        .await;
        let Err(StartError::Store(error)) = result else {
            panic!("serve did not stop with the store's error: {result:?}");
        };
        assert!(error.to_string().contains("no_such_database"), "{error}");
    })
    .await;
}

/// While its PostgreSQL server cannot be reached, CRM listens, reports NOT_SERVING and answers
/// calls with UNAVAILABLE (worth a retry); shutdown still stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_server_is_not_serving_and_unavailable() {
    bounded(async {
        // A loopback port with nothing listening: every connection attempt is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("postgres://mip@{}/mip", closed.local_addr().unwrap());
        drop(closed);
        let database = Database::from_url(&url, 4).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                mip_crm::serve(
                    listener,
                    &database,
                    CrmOptions::default(),
                    &ServerOptions::default(),
                    Arc::new(ManualClock::new(start_time())),
                    shutdown,
                )
                .await
            }
        });
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: SERVICE_NAME.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::NotServing);
        let refused = CrmServiceClient::new(channel.clone())
            .create_customer(new_customer("Ada", "ada@example.com"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        drop(channel);
        shutdown.cancel();
        task.await.unwrap().unwrap();
    })
    .await;
}

/// A filter naming `wanted` of `count` partitions.
fn partitions(count: i32, wanted: &[i32]) -> Option<PartitionFilter> {
    Some(PartitionFilter {
        partition_count: count,
        partitions: wanted.to_vec(),
    })
}

/// Whether `event`'s customer is in `filter`, by the contract's partition function.
fn in_partitions(event: &CustomerEvent, filter: &PartitionFilter) -> bool {
    let id = Uuid::parse_str(&event.customer.as_ref().unwrap().id).unwrap();
    let count = u32::try_from(filter.partition_count).unwrap();
    let partition = i32::try_from(mip_runtime::partition::of(&id, count)).unwrap();
    filter.partitions.contains(&partition)
}

/// Every event a stream delivers before its token reaches `head`, and the heartbeat token at
/// `head`: a filtered stream moves its token past the events it leaves out with heartbeats.
async fn read_to_heartbeat_at(
    stream: &mut Streaming<WatchCustomersResponse>,
    head: i64,
) -> (Vec<CustomerEvent>, String) {
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(EVENTUALLY, next_message(stream))
            .await
            .expect("the stream's token did not reach the head in time")
        {
            Kind::Event(event) => {
                assert!(event.sequence <= head, "event past the head: {event:?}");
                events.push(event);
            }
            Kind::Heartbeat(heartbeat) if heartbeat.sequence == head => {
                return (events, heartbeat.resume_token);
            }
            Kind::Heartbeat(heartbeat) => assert!(heartbeat.sequence < head, "{heartbeat:?}"),
        }
    }
}

/// Updates every third customer, so each has events at more than one position.
async fn update_some(client: &mut Client, customers: &[Customer]) {
    for customer in customers.iter().step_by(3) {
        let renamed = Customer {
            name: format!("{} renamed", customer.name),
            ..customer.clone()
        };
        update(client, renamed, &["name"]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_partition_filters_are_invalid_argument_with_each_violation() {
    bounded(async {
        let (_dir, _clock, mut server) = fresh().await;
        let cases: [(Option<PartitionFilter>, &[&str]); 5] = [
            (partitions(0, &[0]), &["partition_filter.partition_count"]),
            (
                partitions(4097, &[0]),
                &["partition_filter.partition_count"],
            ),
            (partitions(8, &[]), &["partition_filter.partitions"]),
            (partitions(8, &[8]), &["partition_filter.partitions"]),
            (
                partitions(8, &[-1, 3, 9]),
                &["partition_filter.partitions", "partition_filter.partitions"],
            ),
        ];
        for (filter, expected) in cases {
            let request = WatchCustomersRequest {
                partition_filter: filter.clone(),
                ..watch_from(StartPosition::Earliest)
            };
            let status = watch(&mut server.client, request).await.unwrap_err();
            assert_eq!(violated_fields(&status), expected, "{filter:?}");
            let request = ListCustomerEventsRequest {
                partition_filter: filter.clone(),
                ..events_from(StartPosition::Earliest, -1)
            };
            let status = list_events(&mut server.client, request).await.unwrap_err();
            let mut with_page_size = vec!["page_size"];
            with_page_size.extend_from_slice(expected);
            assert_eq!(violated_fields(&status), with_page_size, "{filter:?}");
        }
        server.stop().await;
    })
    .await;
}

// Partition filters, on SQLite and on PostgreSQL.
mip_testkit::backend_tests! {
    async fn a_filtered_watch_delivers_exactly_its_partitions_events_in_order(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, fast_heartbeats()).await;
            let filter = partitions(4, &[1, 3]).unwrap();
            let before = create_many(&mut server.client, "before", 30).await;
            update_some(&mut server.client, &before).await;
            let mut stream = watch(&mut server.client, WatchCustomersRequest {
                partition_filter: Some(filter.clone()),
                ..watch_from(StartPosition::Earliest)
            })
            .await
            .unwrap();
            // Caught up on what was there, then live.
            let (mut seen, _) = read_to_heartbeat_at(&mut stream, head(&mut server.client).await).await;
            let during = create_many(&mut server.client, "during", 30).await;
            update_some(&mut server.client, &during).await;
            let head_now = head(&mut server.client).await;
            let (mut live, token) = read_to_heartbeat_at(&mut stream, head_now).await;
            seen.append(&mut live);

            let expected: Vec<CustomerEvent> = all_events(&mut server.client)
                .await
                .into_iter()
                .filter(|e| in_partitions(e, &filter))
                .collect();
            assert!(!expected.is_empty() && expected.len() < 80, "both kinds of event");
            assert_eq!(sequences(&seen), sequences(&expected), "exactly its partitions' events");

            // The token moved past the events left out: unfiltered, it resumes the whole feed
            // right after the head, with nothing skipped or repeated.
            let after = create_many(&mut server.client, "after", 5).await;
            let resumed = list_events(&mut server.client, events_after(&token, 1000)).await.unwrap();
            assert_eq!(sequences(&resumed.events), (head_now + 1..=head_now + 5).collect::<Vec<_>>());
            assert_eq!(event_customer_ids(&resumed.events), ids(&after));
            server.stop().await;
        })
        .await;
    }

    async fn filtered_polling_pages_through_exactly_the_partitions_events(db: Database) {
        bounded(async {
            let (_clock, mut server) = fresh_on(&db, CrmOptions::default()).await;
            let customers = create_many(&mut server.client, "c", 60).await;
            update_some(&mut server.client, &customers).await;
            let filter = partitions(3, &[0]).unwrap();
            let expected: Vec<i64> = all_events(&mut server.client)
                .await
                .iter()
                .filter(|e| in_partitions(e, &filter))
                .map(|e| e.sequence)
                .collect();
            let head = head(&mut server.client).await;
            let mut request = ListCustomerEventsRequest {
                partition_filter: Some(filter.clone()),
                ..events_from(StartPosition::Earliest, 4)
            };
            let mut seen = Vec::new();
            let mut last = 0;
            loop {
                let page = list_events(&mut server.client, request.clone()).await.unwrap();
                assert!(page.events.len() <= 4, "{page:?}");
                assert!(page.events.iter().all(|e| in_partitions(e, &filter)));
                assert!(page.next_sequence > last || page.remaining_events == 0, "{page:?}");
                assert!(page.next_sequence - last <= 40, "looks at most 10 pages' worth");
                assert_eq!(page.remaining_events, head - page.next_sequence);
                last = page.next_sequence;
                seen.extend(sequences(&page.events));
                if page.remaining_events == 0 {
                    break;
                }
                request.resume_token = page.next_resume_token;
            }
            assert_eq!(seen, expected);
            server.stop().await;
        })
        .await;
    }
}

/// Two CRM processes on one PostgreSQL database: a token the first hands out works on the
/// second at once, before its tail has read the commit back, and resumes with no gap and no
/// repeat; a token past the database's head is still OUT_OF_RANGE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_one_replica_resumes_on_another_at_once() {
    bounded(async {
        let Some(db) = mip_testkit::postgres_database() else {
            return;
        };
        let (_clock, mut a) = fresh_on(&db, fast_heartbeats()).await;
        // Slow to read the log back, so only waiting for the commit can make the token work.
        let (_clock, mut b) = fresh_on(
            &db,
            CrmOptions {
                feed_poll_interval: Duration::from_secs(1),
                ..fast_heartbeats()
            },
        )
        .await;
        create_many(&mut a.client, "first", 3).await;
        let mid = list_events(&mut a.client, events_from(StartPosition::Latest, 0))
            .await
            .unwrap();
        let second = create_many(&mut a.client, "second", 3).await;
        let latest = list_events(&mut a.client, events_from(StartPosition::Latest, 0))
            .await
            .unwrap();

        let polled = list_events(&mut b.client, events_after(&mid.next_resume_token, 100))
            .await
            .expect("b waits for a's commits rather than refusing the token");
        assert_eq!(event_customer_ids(&polled.events), ids(&second));
        assert_eq!(sequences(&polled.events), (4..=6).collect::<Vec<_>>());

        create_many(&mut a.client, "third", 1).await;
        let fresh_token = list_events(&mut a.client, events_from(StartPosition::Latest, 0))
            .await
            .unwrap();
        let mut stream = watch(&mut b.client, watch_after(&fresh_token.next_resume_token))
            .await
            .expect("b waits for a's commit rather than refusing the watch");
        let later = create_many(&mut a.client, "later", 2).await;
        let events = read_to_head(&mut stream, fresh_token.next_sequence + 2).await;
        assert_eq!(event_customer_ids(&events), ids(&later));

        let past = token_at(&latest.next_resume_token, 1000);
        let status = list_events(&mut b.client, events_after(&past, 10))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        let status = watch(&mut b.client, watch_after(&past)).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        drop(stream);
        a.stop().await;
        b.stop().await;
    })
    .await;
}

/// The next health status of the CRM service, as a watching client sees it.
async fn health_becomes(channel: &Channel, wanted: ServingStatus) {
    let mut health = HealthClient::new(channel.clone());
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: SERVICE_NAME.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(EVENTUALLY, async {
        while let Some(status) = statuses.message().await.unwrap() {
            if status.status() == wanted {
                return;
            }
        }
        panic!("health stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("health did not become {wanted:?}"));
}

/// When its PostgreSQL server goes away, CRM reports NOT_SERVING and ends open watch streams
/// with UNAVAILABLE; once the server is back it is SERVING again and the stream resumes from
/// its last token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_is_not_serving_until_it_is_back() {
    bounded(async {
        let Some(pg) = mip_testkit::postgres::PgServer::start_or_skip() else {
            return;
        };
        let db = Database::from_url(&pg.create_database(), 4).unwrap();
        let (_clock, mut server) = fresh_on(&db, fast_heartbeats()).await;
        create_many(&mut server.client, "before", 2).await;
        let mut stream = watch(&mut server.client, watch_from(StartPosition::Earliest))
            .await
            .unwrap();
        let seen = read_to_head(&mut stream, 2).await;

        pg.kill();
        health_becomes(&server.channel, ServingStatus::NotServing).await;
        let ended = tokio::time::timeout(EVENTUALLY, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the stream ended without a status"),
                    Err(status) => return status,
                }
            }
        })
        .await
        .expect("the watch stream ended");
        assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");

        pg.restart();
        health_becomes(&server.channel, ServingStatus::Serving).await;
        let last = seen.last().unwrap().resume_token.clone();
        let mut resumed = watch(&mut server.client, watch_after(&last)).await.unwrap();
        let after = create_many(&mut server.client, "after", 2).await;
        let events = read_to_head(&mut resumed, 4).await;
        assert_eq!(event_customer_ids(&events), ids(&after));
        drop(resumed);
        server.stop().await;
    })
    .await;
}
