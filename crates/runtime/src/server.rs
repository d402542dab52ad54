//! Serving gRPC the same way in every service: health, reflection, transport limits and a
//! graceful, bounded shutdown.
//!
//! A service builds its routes and a [`Health`] handle, then calls [`serve`] with a listener
//! it bound itself (so tests bind `127.0.0.1:0` and read the real port) and a shutdown token
//! (so `main` passes ctrl-c/SIGTERM and tests cancel it directly).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{self, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_check_response};
use tonic_health::server::{HealthReporter, HealthService};
use tracing::{info, warn};

use crate::admission::AdmissionLayer;
use crate::security::{Security, SecurityError, SecurityOptions};

/// Transport settings shared by every server, set once here.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerOptions {
    /// Largest gRPC message accepted or sent, in bytes. A larger request is refused by its
    /// length prefix, before it is read, with RESOURCE_EXHAUSTED (reason MESSAGE_TOO_LARGE), as
    /// is a compressed message that expands past the limit.
    #[arg(long, env = "MIP_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Interval between HTTP/2 keepalive pings on idle connections, so dead peers are noticed
    /// and proxies keep long-lived watch streams open.
    #[arg(long, env = "MIP_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = crate::parse_positive_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "MIP_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = crate::parse_positive_duration)]
    pub keepalive_timeout: Duration,

    /// On shutdown, how long in-flight calls may take to finish before the server stops anyway.
    #[arg(long, env = "MIP_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Longest a call may take to be answered (for a watch stream: to open), counted from its
    /// first byte; longer calls are cancelled. It also cuts off a request body that never
    /// ends, which would otherwise hold a slot of --max-concurrent-requests. A client's own,
    /// shorter deadline (grpc-timeout) applies too.
    #[arg(long, env = "MIP_REQUEST_TIMEOUT", default_value = "30s", value_parser = crate::parse_positive_duration)]
    pub request_timeout: Duration,

    /// Most calls handled at once by this server, over all connections; further calls get
    /// RESOURCE_EXHAUSTED at once instead of queueing without bound. A watch stream counts
    /// only while it opens. Health checks are never refused.
    #[arg(long, env = "MIP_MAX_CONCURRENT_REQUESTS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Most HTTP/2 streams (calls, including open watch streams) one connection may have at
    /// once. Clients queue further calls on that connection until one ends.
    #[arg(long, env = "MIP_MAX_STREAMS_PER_CONNECTION", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// TLS and token authentication; off unless configured.
    #[command(flatten)]
    pub security: SecurityOptions,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4096,
            max_streams_per_connection: 1024,
            security: SecurityOptions::default(),
        }
    }
}

/// Applies the shared message-size limits to a generated tonic server, so every service gets
/// the same limits from one place. Also accepts gzip-compressed requests.
#[macro_export]
macro_rules! limited {
    ($server:expr, $options:expr) => {
        $server
            .max_decoding_message_size($options.max_message_bytes)
            .max_encoding_message_size($options.max_message_bytes)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
    };
}

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound (in use, not local, no permission). The message
    /// is one line that says what to do, naming the flag that sets the address; the operating
    /// system's words are in it only when they say more than the hint (so the error has no
    /// `source`: printing the chain would repeat them).
    #[error("{}", bind_message(*addr, flag, error))]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The flag that chose it (`--listen`, `--crm-listen`, …), for the hint.
        flag: &'static str,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The transport failed while serving.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS or token configuration could not be loaded.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The certificate and key could not be turned into a TLS configuration (for example,
    /// the key does not belong to the certificate).
    #[error("invalid TLS configuration: {0:?}")]
    Tls(#[source] tonic::transport::Error),
    /// Reflection could not load the descriptor sets (a build problem).
    #[error("reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The `ErrorInfo.domain` of the service whose contract is `descriptor_set`: the domain of the
/// package of its first service (each server hosts one of the platform's services).
fn domain_of(descriptor_set: &[u8]) -> String {
    use prost::Message;
    let package = prost_types::FileDescriptorSet::decode(descriptor_set)
        .ok()
        .and_then(|set| {
            set.file
                .into_iter()
                .find(|file| !file.service.is_empty())
                .map(|file| file.package().to_owned())
        })
        .unwrap_or_default();
    crate::status::domain_of_package(&package)
}

/// Binds a listener on `addr`, which the flag `flag` chose; the error names both.
pub async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| ServeError::Bind { addr, flag, error })
}

/// What a failed bind means to whoever started the server, and what to do about it.
fn bind_message(addr: SocketAddr, flag: &str, error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::AddrInUse => format!(
            "{addr} is already in use; is another mip running? pass {flag} to use another port"
        ),
        ErrorKind::AddrNotAvailable => format!(
            "{addr} is not an address of this machine; pass {flag} with one of its addresses \
             (127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
        ),
        ErrorKind::PermissionDenied => format!(
            "not allowed to listen on {addr} (ports below 1024 need privileges); pass {flag} \
             with a port from 1024 up"
        ),
        _ => format!("cannot listen on {addr} (set by {flag}): {error}"),
    }
}

/// The standard health service of one server: every service it hosts, and the overall `""`.
///
/// Everything starts NOT_SERVING. The service marks itself serving when it is ready, and
/// [`serve`] marks everything NOT_SERVING again as soon as shutdown begins, so load balancers
/// stop sending traffic before the listener closes.
#[derive(Clone, Debug)]
pub struct Health {
    /// The reporter shared with the health server.
    reporter: HealthReporter,
    /// Fully-qualified names of the services this server hosts.
    services: Vec<String>,
}

impl Health {
    /// Health for a server hosting `services`, all NOT_SERVING.
    pub async fn new(services: &[&str]) -> Self {
        let health = Self {
            reporter: HealthReporter::new(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
        };
        health.set_all(ServingStatus::NotServing).await;
        health
    }

    /// Marks every hosted service, and the server as a whole, SERVING.
    pub async fn set_serving(&self) {
        self.set_all(ServingStatus::Serving).await;
    }

    /// Marks every hosted service, and the server as a whole, NOT_SERVING.
    pub async fn set_not_serving(&self) {
        self.set_all(ServingStatus::NotServing).await;
    }

    async fn set_all(&self, status: ServingStatus) {
        for name in &self.services {
            self.reporter.set_service_status(name, status).await;
        }
        self.reporter.set_service_status("", status).await;
    }

    /// The gRPC health service answering for this handle. Its Watch streams end once shutdown
    /// has reported NOT_SERVING (`ended`), so an open health watch cannot hold up shutdown.
    fn server(&self, ended: CancellationToken) -> HealthServer<ShutdownAwareHealth> {
        HealthServer::new(ShutdownAwareHealth {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            ended,
        })
    }
}

/// tonic-health's service, with Watch streams that end at shutdown and report unknown
/// services the way the health protocol asks (a SERVICE_UNKNOWN message, not an error).
struct ShutdownAwareHealth {
    /// Answers Check and opens Watch streams.
    inner: HealthService,
    /// Cancelled after shutdown has set every status to NOT_SERVING.
    ended: CancellationToken,
}

#[tonic::async_trait]
impl health_server::Health for ShutdownAwareHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthWatch;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let inner: Pin<Box<dyn Stream<Item = HealthItem> + Send>> =
            match self.inner.watch(request).await {
                Ok(response) => Box::pin(response.into_inner()),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    Box::pin(tokio_stream::once(Ok(HealthCheckResponse {
                        status: health_check_response::ServingStatus::ServiceUnknown.into(),
                    })))
                }
                Err(status) => return Err(status),
            };
        Ok(tonic::Response::new(HealthWatch {
            inner: inner.chain(tokio_stream::pending()),
            ended: Box::pin(self.ended.clone().cancelled_owned()),
            last_was_final: false,
        }))
    }
}

/// One Watch response.
type HealthItem = Result<HealthCheckResponse, tonic::Status>;

/// A health Watch stream that ends after shutdown, once it has delivered a final status.
pub struct HealthWatch {
    /// Status changes; never ends by itself.
    inner: tokio_stream::adapters::Chain<
        Pin<Box<dyn Stream<Item = HealthItem> + Send>>,
        tokio_stream::Pending<HealthItem>,
    >,
    /// Resolves when shutdown has reported NOT_SERVING.
    ended: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Whether the last message sent was NOT_SERVING or SERVICE_UNKNOWN, after which ending
    /// the stream loses nothing.
    last_was_final: bool,
}

impl Stream for HealthWatch {
    type Item = HealthItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<HealthItem>> {
        let this = &mut *self;
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            this.last_was_final = matches!(
                &item,
                Some(Ok(r)) if r.status() != health_check_response::ServingStatus::Serving
            );
            return Poll::Ready(item);
        }
        if this.last_was_final && this.ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}
/// Serves `routes` on `listener`, with health and reflection (v1 and v1alpha, so grpcurl 1.8
/// works too) over `descriptor_set`, until `shutdown` is cancelled.
///
/// On shutdown: health turns NOT_SERVING, the listener stops accepting, open streams are ended
/// by their handlers (which watch the same token), in-flight calls get
/// [`ServerOptions::shutdown_grace`] to finish, and then the server returns regardless.
pub async fn serve(
    listener: TcpListener,
    descriptor_set: &'static [u8],
    routes: Routes,
    health: Health,
    options: &ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let security = options.security.load()?;
    serve_secured(
        listener,
        descriptor_set,
        routes,
        health,
        options,
        security,
        shutdown,
    )
    .await
}

/// [`serve`] with [`ServerOptions::security`] already loaded, for a service that also uses it
/// for its own clients (so the files are read once).
pub async fn serve_secured(
    listener: TcpListener,
    descriptor_set: &'static [u8],
    routes: Routes,
    health: Health,
    options: &ServerOptions,
    security: Security,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    // The service's own contract, health, and the standard error details, so that grpcurl can
    // also decode the field violations in an INVALID_ARGUMENT.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptor_set)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let health_ended = CancellationToken::new();
    let routes = routes
        .add_service(health.server(health_ended.clone()))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal_health = health.clone();
    let signal_token = shutdown.clone();
    let signal = async move {
        signal_token.cancelled().await;
        signal_health.set_not_serving().await;
        health_ended.cancel();
    };
    let mut builder = Server::builder();
    if let Some(tls) = security.server_tls() {
        builder = builder.tls_config(tls).map_err(ServeError::Tls)?;
    }
    let server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .max_concurrent_streams(options.max_streams_per_connection)
        .timeout(options.request_timeout)
        // Outermost first: every call is counted, including those the gate refuses.
        .layer(crate::metrics::RpcMetricsLayer::new(&[
            descriptor_set,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]))
        .layer(AdmissionLayer::new(
            security,
            options.max_concurrent_requests as usize,
            &domain_of(descriptor_set),
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);

    let grace = options.shutdown_grace;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result?,
        () = deadline => {
            warn!(?addr, ?grace, "in-flight calls did not finish within the shutdown grace period; stopping anyway");
        }
    }
    info!(?addr, "server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_refuses_in_the_domain_of_the_service_it_hosts() {
        for (set, domain) in [
            (mip_proto::CRM_DESCRIPTOR_SET, "crm.mip.example.com"),
            (
                mip_proto::INVENTORY_DESCRIPTOR_SET,
                "inventory.mip.example.com",
            ),
            (
                mip_proto::INTEGRATION_DESCRIPTOR_SET,
                "integration.mip.example.com",
            ),
        ] {
            assert_eq!(domain_of(set), domain);
        }
    }
}
