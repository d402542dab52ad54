//! The standard gRPC health service (`grpc.health.v1.Health`) of every service, as load
//! balancers and orchestrators use it: SERVING for the server and the service by name while up,
//! NOT_FOUND for a service it does not host, and a Watch that sees NOT_SERVING as soon as
//! shutdown begins, before the stream ends, so traffic moves away before the listener closes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mip_crm::CrmOptions;
use mip_integration::IntegrationOptions;
use mip_integration::deliver::RandomJitter;
use mip_runtime::CancellationToken;
use mip_runtime::clock::{SharedClock, SystemClock};
use mip_runtime::server::ServerOptions;
use mip_runtime::sqlite::Durability;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest the test may take; generous, so a slow machine never fails it.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a service gets to report SERVING, and a Watch to deliver the next status.
const WAIT: Duration = Duration::from_secs(30);

/// Pause between two looks at a condition that is not true yet.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A service running in this process.
struct Running {
    /// Its gRPC name.
    name: &'static str,
    /// Where it listens.
    addr: SocketAddr,
    /// Cancelling it starts the shutdown.
    shutdown: CancellationToken,
    /// The `serve` call, with its error as text.
    task: JoinHandle<Result<(), String>>,
}

impl Drop for Running {
    /// A failing test still stops the service.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn clock() -> SharedClock {
    Arc::new(SystemClock)
}

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    (listener, addr)
}

async fn start_crm(data_dir: &Path) -> Running {
    let (listener, addr) = listener().await;
    let shutdown = CancellationToken::new();
    let (data_dir, token) = (data_dir.to_owned(), shutdown.clone());
    let task = tokio::spawn(async move {
        mip_crm::serve(
            listener,
            &mip_runtime::store::Database::Sqlite {
                dir: data_dir.to_path_buf(),
                durability: Durability::Normal,
            },
            CrmOptions::default(),
            &ServerOptions::default(),
            clock(),
            token,
        )
        .await
        .map_err(|e| e.to_string())
    });
    Running {
        name: mip_crm::SERVICE_NAME,
        addr,
        shutdown,
        task,
    }
}

async fn start_inventory(data_dir: &Path) -> Running {
    let (listener, addr) = listener().await;
    let shutdown = CancellationToken::new();
    let (data_dir, token) = (data_dir.to_owned(), shutdown.clone());
    let task = tokio::spawn(async move {
        mip_inventory::serve(
            listener,
            &mip_runtime::store::Database::Sqlite {
                dir: data_dir.to_path_buf(),
                durability: Durability::Normal,
            },
            &ServerOptions::default(),
            clock(),
            token,
        )
        .await
        .map_err(|e| e.to_string())
    });
    Running {
        name: mip_inventory::SERVICE_NAME,
        addr,
        shutdown,
        task,
    }
}

async fn start_integration(data_dir: &Path, crm: SocketAddr, inventory: SocketAddr) -> Running {
    let (listener, addr) = listener().await;
    let shutdown = CancellationToken::new();
    let (data_dir, token) = (data_dir.to_owned(), shutdown.clone());
    let options = IntegrationOptions {
        crm_addr: crm.to_string(),
        inventory_addr: inventory.to_string(),
        ..IntegrationOptions::default()
    };
    let task = tokio::spawn(async move {
        mip_integration::serve(
            listener,
            &mip_runtime::store::Database::Sqlite {
                dir: data_dir.to_path_buf(),
                durability: Durability::Normal,
            },
            options,
            &ServerOptions::default(),
            clock(),
            Arc::new(RandomJitter),
            token,
        )
        .await
        .map_err(|e| e.to_string())
    });
    Running {
        name: mip_integration::SERVICE_NAME,
        addr,
        shutdown,
        task,
    }
}

fn health_client(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    HealthClient::new(channel)
}

fn request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    client
        .check(request(service))
        .await
        .unwrap_or_else(|status| panic!("Check({service:?}): {status:?}"))
        .into_inner()
        .status()
}

/// Waits until the server as a whole reports SERVING.
async fn wait_until_serving(client: &mut HealthClient<Channel>, running: &Running) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(response) = client.check(request("")).await
            && response.get_ref().status() == ServingStatus::Serving
        {
            return;
        }
        assert!(
            !running.task.is_finished(),
            "{} stopped before serving",
            running.name
        );
        assert!(
            Instant::now() < deadline,
            "{} did not report SERVING within {WAIT:?}",
            running.name
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The whole life cycle as a health client sees it: SERVING, NOT_FOUND for a stranger, then
/// NOT_SERVING on a Watch once shutdown begins, and the server stops.
async fn serving_then_not_serving_on_shutdown(mut running: Running) {
    let name = running.name;
    let mut client = health_client(running.addr);
    wait_until_serving(&mut client, &running).await;

    assert_eq!(
        check(&mut client, "").await,
        ServingStatus::Serving,
        "{name}"
    );
    assert_eq!(
        check(&mut client, name).await,
        ServingStatus::Serving,
        "{name}"
    );
    let unknown = client
        .check(request("no.such.v1.Service"))
        .await
        .expect_err("an unknown service is not reported healthy");
    assert_eq!(unknown.code(), Code::NotFound, "{name}: {unknown:?}");

    let mut watch = client
        .watch(request(name))
        .await
        .unwrap_or_else(|status| panic!("Watch({name}): {status:?}"))
        .into_inner();
    let first = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("the Watch reports the current status at once")
        .expect("the Watch stream is healthy")
        .expect("the Watch stream is open");
    assert_eq!(first.status(), ServingStatus::Serving, "{name}");

    running.shutdown.cancel();
    loop {
        let next = tokio::time::timeout(WAIT, watch.message())
            .await
            .unwrap_or_else(|_| panic!("{name}: no NOT_SERVING within {WAIT:?} of shutdown"));
        match next {
            Ok(Some(response)) if response.status() == ServingStatus::NotServing => break,
            Ok(Some(response)) => assert_eq!(
                response.status(),
                ServingStatus::Serving,
                "{name}: only SERVING may come before NOT_SERVING"
            ),
            Ok(None) => panic!("{name}: the Watch ended without reporting NOT_SERVING"),
            Err(status) => {
                panic!("{name}: the Watch failed without reporting NOT_SERVING: {status:?}")
            }
        }
    }

    // The client has what it needs; closing the Watch lets the server finish draining.
    drop(watch);
    drop(client);
    let served = (&mut running.task)
        .await
        .unwrap_or_else(|e| panic!("{name}'s serve task: {e}"));
    assert_eq!(served, Ok(()), "{name} stops cleanly");
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_reports_serving_then_not_serving_on_shutdown() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let crm = start_crm(&dir.path().join("crm")).await;
        let inventory = start_inventory(&dir.path().join("inventory")).await;
        let integration =
            start_integration(&dir.path().join("integration"), crm.addr, inventory.addr).await;

        // The integration service first: it depends on the other two.
        serving_then_not_serving_on_shutdown(integration).await;
        serving_then_not_serving_on_shutdown(inventory).await;
        serving_then_not_serving_on_shutdown(crm).await;
    })
    .await;
}
