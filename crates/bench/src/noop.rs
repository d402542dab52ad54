//! The yardstick: a `CrmService` whose CreateCustomer and BatchCreateCustomers answer at once,
//! with no storage, served by bare tonic or behind the project's own server stack.
//!
//! This machine's speed changes by a factor of two from hour to hour, so a figure means little
//! next to one from another hour; next to what a no-op server reached in the same run, with the
//! same load generator, it does. [`Stack`] says how much of the real servers' set-up the no-op
//! gets, from none (bare tonic) to all of it (`mip_runtime::server::serve`), with single layers
//! in between for bisecting the stack's cost.
//!
//! With `--processes` the no-op runs as `mip-bench serve-noop`, a child of this binary, as the
//! real services run as `mip` children; otherwise on a runtime of its own in this process, as
//! the in-process services do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::ValueEnum;
use mip_proto::crm::v1 as pb;
use mip_proto::crm::v1::crm_service_server::{CrmService, CrmServiceServer};
use mip_runtime::CancellationToken;
use mip_runtime::admission::AdmissionLayer;
use mip_runtime::metrics::RpcMetricsLayer;
use mip_runtime::security::SecurityOptions;
use mip_runtime::server::{Health, ServerOptions};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// How long a no-op server process gets to report its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an in-process no-op server gets to stop after its token is cancelled.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The line a `serve-noop` process prints once its listener is bound, before the address.
const LISTENING: &str = "listening on ";

/// How much of the real servers' set-up the no-op service is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stack {
    /// tonic's `Server` with its defaults and TCP_NODELAY (which every server here sets, and
    /// without which a small reply can wait for the peer's delayed ACK): the ceiling.
    Tonic,
    /// `mip_runtime::server::serve`, as CRM is served: health, reflection, message limits,
    /// keepalive, request timeout, the metrics and admission layers; auth off.
    Runtime,
    /// Bare tonic plus the metrics layer alone, to price it.
    Metrics,
    /// Bare tonic plus the admission layer alone (token check off, in-flight permits on).
    Admission,
    /// Bare tonic plus the per-request timeout alone.
    Timeout,
}

impl Stack {
    /// Its name in reports, as on the command line.
    pub fn name(self) -> String {
        crate::value_name(&self)
    }
}

/// A CRM that stores nothing: creates answer at once with the customer they describe, every
/// other method is UNIMPLEMENTED.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopCrm;

/// The customer a create describes. The request id doubles as the customer id: the load needs
/// a UUID back, and it costs nothing to make; the reply is as large as a real one.
fn customer(request: pb::CreateCustomerRequest, now: prost_types::Timestamp) -> pb::Customer {
    pb::Customer {
        id: request.request_id,
        name: request.name,
        email: request.email,
        create_time: Some(now),
        update_time: Some(now),
        version: 1,
    }
}

#[tonic::async_trait]
impl CrmService for NoopCrm {
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let now = prost_types::Timestamp::from(SystemTime::now());
        Ok(Response::new(customer(request.into_inner(), now)))
    }

    async fn batch_create_customers(
        &self,
        request: Request<pb::BatchCreateCustomersRequest>,
    ) -> Result<Response<pb::BatchCreateCustomersResponse>, Status> {
        let now = prost_types::Timestamp::from(SystemTime::now());
        let results = request
            .into_inner()
            .requests
            .into_iter()
            .map(|r| pb::CreateCustomerResult {
                result: Some(pb::create_customer_result::Result::Customer(customer(
                    r, now,
                ))),
            })
            .collect();
        Ok(Response::new(pb::BatchCreateCustomersResponse { results }))
    }

    async fn get_customer(
        &self,
        _: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        Err(unimplemented())
    }

    async fn update_customer(
        &self,
        _: Request<pb::UpdateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        Err(unimplemented())
    }

    async fn delete_customer(
        &self,
        _: Request<pb::DeleteCustomerRequest>,
    ) -> Result<Response<pb::DeleteCustomerResponse>, Status> {
        Err(unimplemented())
    }

    async fn list_customers(
        &self,
        _: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        Err(unimplemented())
    }

    type WatchCustomersStream = tokio_stream::Empty<Result<pb::WatchCustomersResponse, Status>>;

    async fn watch_customers(
        &self,
        _: Request<pb::WatchCustomersRequest>,
    ) -> Result<Response<Self::WatchCustomersStream>, Status> {
        Err(unimplemented())
    }

    async fn list_customer_events(
        &self,
        _: Request<pb::ListCustomerEventsRequest>,
    ) -> Result<Response<pb::ListCustomerEventsResponse>, Status> {
        Err(unimplemented())
    }
}

fn unimplemented() -> Status {
    Status::unimplemented("the no-op CRM of the benchmark only creates customers")
}

/// Serves [`NoopCrm`] on `listener` with `stack` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    stack: Stack,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The real servers' defaults, so the layers are priced as CRM runs them.
    let options = ServerOptions::default();
    if stack == Stack::Runtime {
        let health = Health::new(&[mip_crm::SERVICE_NAME]).await;
        health.set_serving().await;
        let routes = Routes::new(mip_runtime::limited!(
            CrmServiceServer::new(NoopCrm),
            options
        ));
        mip_runtime::server::serve(
            listener,
            mip_proto::CRM_DESCRIPTOR_SET,
            routes,
            health,
            &options,
            shutdown,
        )
        .await?;
        return Ok(());
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = CrmServiceServer::new(NoopCrm);
    let stop = shutdown.cancelled_owned();
    let mut builder = Server::builder().tcp_nodelay(true);
    match stack {
        Stack::Tonic => {
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop)
                .await?
        }
        Stack::Metrics => {
            builder
                .layer(RpcMetricsLayer::new(&[mip_proto::CRM_DESCRIPTOR_SET]))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop)
                .await?
        }
        Stack::Admission => {
            builder
                .layer(AdmissionLayer::new(
                    SecurityOptions::default().load()?,
                    options.max_concurrent_requests as usize,
                    &mip_runtime::status::domain_of_package("crm.v1"),
                ))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop)
                .await?
        }
        Stack::Timeout => {
            builder
                .timeout(options.request_timeout)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop)
                .await?
        }
        Stack::Runtime => unreachable!("served above"),
    }
    Ok(())
}

/// `mip-bench serve-noop`: binds `listen`, prints `listening on ADDR` on stdout, and serves
/// until stdin closes (the bench that started it has gone, however it went) or a signal.
pub async fn serve_process(stack: Stack, listen: SocketAddr) -> anyhow::Result<()> {
    mip_runtime::telemetry::init(mip_runtime::telemetry::LogFormat::Text);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{LISTENING}{addr}")?;
    stdout.flush()?;
    let shutdown = CancellationToken::new();
    let on_eof = shutdown.clone();
    // A blocking read on its own thread: the runtime has no async stdin here, and this thread
    // does nothing else.
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        on_eof.cancel();
    });
    serve(listener, stack, shutdown).await
}

/// A running no-op server. Dropping it stops it (kills the process), on every way out.
pub struct NoopServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// In this process or a child.
    kind: Kind,
}

/// The two ways a no-op server runs.
enum Kind {
    /// On a runtime of its own in this process; `None` once stopped.
    InProcess {
        /// The server's runtime.
        runtime: Option<Runtime>,
        /// Cancelling it stops the server.
        shutdown: CancellationToken,
        /// The serve task.
        task: Option<JoinHandle<Result<(), String>>>,
    },
    /// `mip-bench serve-noop`.
    Process(Child),
}

impl NoopServer {
    /// Starts a no-op server with `stack`, in a child process if `processes`, and returns once
    /// it listens. `service_log` is the child's RUST_LOG.
    pub async fn start(stack: Stack, processes: bool, service_log: &str) -> anyhow::Result<Self> {
        if processes {
            return Self::spawn(stack, service_log).await;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("noop-server")
            .build()
            .context("the no-op server's runtime")?;
        let listener = StdListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        // The socket is registered with the server runtime's reactor, so it is made there.
        let task = runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            serve(listener, stack, token)
                .await
                .map_err(|e| format!("{e:#}"))
        });
        Ok(Self {
            addr,
            kind: Kind::InProcess {
                runtime: Some(runtime),
                shutdown,
                task: Some(task),
            },
        })
    }

    /// Starts `mip-bench serve-noop` and reads the address it bound from its first line.
    async fn spawn(stack: Stack, service_log: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("this binary's path")?;
        let mut command = Command::new(&exe);
        command
            .args([
                "serve-noop",
                "--stack",
                &stack.name(),
                "--listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", service_log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Flags only, as for the `mip` children: a MIP_BENCH_* variable meant for this run
        // (a scenario, a JSON path) must not reach the server.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MIP_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {} serve-noop", exe.display()))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut server = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            kind: Kind::Process(child),
        };
        // If the child never prints, `server` is dropped on the timeout, which kills it and so
        // ends the blocked read.
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = match tokio::time::timeout(START_TIMEOUT, read).await {
            Ok(joined) => joined??,
            Err(_) => bail!("the no-op server did not start in {START_TIMEOUT:?}"),
        };
        let addr = line
            .trim()
            .strip_prefix(LISTENING)
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the no-op server said {line:?}, not its address"))?;
        server.addr = addr;
        Ok(server)
    }

    /// The server's process id, when it runs as a process.
    pub fn pid(&self) -> Option<u32> {
        match &self.kind {
            Kind::Process(child) => Some(child.id()),
            Kind::InProcess { .. } => None,
        }
    }

    /// Stops the server; fails if it had already stopped by itself.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match &mut self.kind {
            Kind::Process(child) => {
                if let Some(status) = child.try_wait()? {
                    bail!("the no-op server exited during the run ({status})");
                }
                Ok(())
            }
            Kind::InProcess {
                runtime,
                shutdown,
                task,
            } => {
                shutdown.cancel();
                let outcome = match task.take() {
                    Some(task) => tokio::time::timeout(STOP_TIMEOUT, task).await,
                    None => Ok(Ok(Ok(()))),
                };
                if let Some(runtime) = runtime.take() {
                    // Not a plain drop, which blocks: this runs on a runtime thread.
                    runtime.shutdown_background();
                }
                match outcome {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(e))) => bail!("the no-op server failed: {e}"),
                    Ok(Err(e)) => bail!("the no-op server panicked: {e}"),
                    Err(_) => bail!("the no-op server did not stop in {STOP_TIMEOUT:?}"),
                }
            }
        }
    }
}

impl Drop for NoopServer {
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Kind::InProcess {
                runtime, shutdown, ..
            } => {
                shutdown.cancel();
                if let Some(runtime) = runtime.take() {
                    runtime.shutdown_background();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn noop_creates_echo_the_request_and_other_methods_are_unimplemented() {
        let request = pb::CreateCustomerRequest {
            name: "Ada".into(),
            email: "ada@example.com".into(),
            request_id: "0190b8c4-0000-7000-8000-000000000001".into(),
        };
        let customer = NoopCrm
            .create_customer(Request::new(request.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(customer.id, request.request_id);
        assert_eq!(customer.email, "ada@example.com");
        assert!(customer.create_time.is_some());

        let batch = NoopCrm
            .batch_create_customers(Request::new(pb::BatchCreateCustomersRequest {
                requests: vec![request.clone(), request],
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(batch.results.len(), 2);

        let status = NoopCrm
            .get_customer(Request::new(pb::GetCustomerRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_stack_answers_the_loads_creates_over_grpc() {
        let settings = crate::tests::parse(&["mip-bench", "ceiling", "--smoke", "--batch", "3"]);
        for stack in Stack::value_variants() {
            let run = tokio::time::timeout(Duration::from_secs(30), async {
                let server = NoopServer::start(*stack, false, "warn").await.unwrap();
                let crm = crate::load::CrmClients::connect(&[server.addr], &settings)
                    .await
                    .unwrap();
                let run = crate::load::closed_loop(&crm, 20, 4).await.unwrap();
                server.stop().await.unwrap();
                run
            })
            .await
            .expect("bounded");
            assert_eq!(run.created.len(), 20, "{stack:?}");
        }
    }
}
