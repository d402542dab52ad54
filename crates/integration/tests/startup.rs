//! How `serve` starts on a store that is not ready: it serves at once (health NOT_SERVING,
//! admin calls UNAVAILABLE) while PostgreSQL is unreachable, turns SERVING once the store is
//! ready, and stops with the error when the store fails for good.

use std::sync::Arc;
use std::time::Duration;

use mip_integration::deliver::RandomJitter;
use mip_integration::{Error, IntegrationOptions, SERVICE_NAME, StartError};
use mip_proto::integration::v1::GetStatusRequest;
use mip_proto::integration::v1::integration_service_client::IntegrationServiceClient;
use mip_runtime::CancellationToken;
use mip_runtime::clock::SystemClock;
use mip_runtime::server::ServerOptions;
use mip_runtime::store::{Database, DbError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;

/// Longest any wait in these tests may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running `serve` and what it needs to be asked and stopped.
struct Started {
    /// Where it listens.
    addr: String,
    /// Stops it.
    shutdown: CancellationToken,
    /// What `serve` returned.
    task: JoinHandle<Result<(), StartError>>,
}

/// Starts the integration service on `database`, with CRM and Inventory at a port nothing
/// listens on (they do not matter to starting).
async fn start(database: Database) -> Started {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let nobody = closed_port();
    let options = IntegrationOptions {
        crm_addr: nobody.clone(),
        inventory_addr: nobody,
        ..IntegrationOptions::default()
    };
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        mip_integration::serve(
            listener,
            &database,
            options,
            &ServerOptions {
                shutdown_grace: Duration::from_secs(1),
                ..ServerOptions::default()
            },
            Arc::new(SystemClock),
            Arc::new(RandomJitter),
            token,
        )
        .await
    });
    Started {
        addr,
        shutdown,
        task,
    }
}

/// A loopback port nothing listens on: bound, read, released.
fn closed_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .to_string()
}

/// The health status `addr` reports, once it answers.
async fn health(addr: &str) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let probed = mip_runtime::probe::check(
            addr,
            SERVICE_NAME,
            Duration::from_secs(1),
            &Default::default(),
        )
        .await;
        match probed {
            Ok(status) => return status.as_str_name().to_owned(),
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no health answer: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_leaves_the_service_not_serving_and_calls_unavailable() {
    let database =
        Database::from_url(&format!("postgres://postgres@{}/mip", closed_port()), 4).unwrap();
    let started = start(database).await;
    assert_eq!(health(&started.addr).await, "NOT_SERVING");
    let mut client = IntegrationServiceClient::connect(format!("http://{}", started.addr))
        .await
        .unwrap();
    let status = client.get_status(GetStatusRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Still connecting is no reason to refuse a shutdown.
    started.shutdown.cancel();
    tokio::time::timeout(TIMEOUT, started.task)
        .await
        .expect("serve stops in time")
        .unwrap()
        .expect("a stop while connecting is clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_turns_serving_once_its_postgres_store_is_ready() {
    let Some(database) = mip_testkit::postgres_database() else {
        return;
    };
    let started = start(database).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while health(&started.addr).await != "SERVING" {
        assert!(tokio::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = IntegrationServiceClient::connect(format!("http://{}", started.addr))
        .await
        .unwrap();
    let status = client.get_status(GetStatusRequest {}).await.unwrap();
    assert_eq!(status.into_inner().dead_letters_pending, 0);
    started.shutdown.cancel();
    tokio::time::timeout(TIMEOUT, started.task)
        .await
        .expect("serve stops in time")
        .unwrap()
        .expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_postgres_database_stops_serve_with_the_error() {
    let Some(server) = mip_testkit::postgres::PgServer::shared() else {
        return;
    };
    let database = Database::from_url(&server.url("no_such_database"), 4).unwrap();
    let started = start(database).await;
    let result = tokio::time::timeout(TIMEOUT, started.task)
        .await
        .expect("serve stops by itself")
        .unwrap();
    match result {
        Err(StartError::Store(Error::Storage(DbError::Open { reason, .. }))) => {
            assert!(reason.contains("no_such_database"), "{reason}");
        }
        other => panic!("expected the store's open error, got {other:?}"),
    }
}
