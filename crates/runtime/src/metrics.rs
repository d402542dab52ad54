//! Prometheus metrics: the exporter, and a tower layer that records every RPC.
//!
//! Metrics go through the `metrics` facade, so services record with `metrics::counter!` and
//! friends without knowing about the exporter; without an installed exporter (tests) those
//! calls cost next to nothing. The RPC layer is written here because no maintained layer
//! records gRPC status codes into the `metrics` facade for tonic 0.14: the code of a gRPC call
//! is only known from the `grpc-status` header (errors) or trailer (after the last message),
//! so the layer watches the response body for its trailers.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use prost::Message;

/// Latency buckets, in seconds: from 100 µs (a cached read) to 10 s (a call near its deadline).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Starts the Prometheus exporter: `GET http://ADDR/metrics`. Call once per process, inside the
/// tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install()?;
    describe();
    Ok(())
}

/// Help texts, shown by the exporter: the platform's whole catalogue in one place, so the
/// README table, the alerts and the dashboard have one list to agree with. Describing a
/// series does not export it; each service records its own at start-up (at zero), so a
/// process exports only the series of the services it runs.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "mip_rpc_requests_total",
        "gRPC calls served, by service, method and status code"
    );
    describe_histogram!(
        "mip_rpc_duration_seconds",
        Unit::Seconds,
        "gRPC call latency (for streams: how long the stream was open), by service, method and status code"
    );
    describe_gauge!("mip_crm_watchers", "Open WatchCustomers streams");
    describe_counter!(
        "mip_integration_delivered_total",
        "Package requests created (or found already created) by the integration service"
    );
    describe_counter!(
        "mip_integration_retried_total",
        "Package request attempts retried after a transient failure"
    );
    describe_counter!(
        "mip_integration_dead_lettered_total",
        "Package requests that went to the dead-letter list since start"
    );
    describe_counter!(
        "mip_integration_cancelled_total",
        "Welcome package requests cancelled because their customer was deleted while they were pending"
    );
    describe_counter!(
        "mip_integration_cancel_left_as_is_total",
        "Cancels that found the deleted customer's package already shipped or delivered, and left it"
    );
    describe_gauge!(
        "mip_integration_dead_letters",
        "Dead letters stored now, waiting for RetryDeadLetters (shared by all workers on one database)"
    );
    describe_counter!(
        "mip_integration_mode_switches_total",
        "Switches between streaming and polling CRM's feed, by the mode switched to"
    );
    describe_gauge!(
        "mip_integration_feed_mode",
        "1 for the mode the integration service follows CRM's feed in now (stream or poll), 0 for the other"
    );
    describe_gauge!(
        "mip_integration_checkpoint_sequence",
        "CRM sequence of the saved checkpoint (the lowest of the partitions this worker holds)"
    );
    describe_gauge!(
        "mip_integration_checkpoint_lag_events",
        "CRM events after the saved checkpoint, as last seen"
    );
    describe_counter!(
        "mip_integration_checkpoint_fenced_total",
        "Checkpoint writes refused because another worker had taken the partition over"
    );
    describe_histogram!(
        "mip_integration_end_to_end_delay_seconds",
        Unit::Seconds,
        "From a customer's create_time in CRM to its package request's in Inventory"
    );
    describe_histogram!(
        "mip_integration_package_batch_size",
        "Package requests per BatchCreatePackageRequests call"
    );
}

/// Records `mip_rpc_requests_total` and `mip_rpc_duration_seconds` for every call.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    /// `/package.Service/Method` paths the server implements. Calls to any other path are
    /// labelled `unknown`, so made-up paths cannot create new series without bound.
    known: Arc<HashSet<String>>,
}

impl RpcMetricsLayer {
    /// A layer that labels the methods described in `descriptor_sets` (encoded
    /// `FileDescriptorSet`s) by name.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut known = HashSet::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        Self {
            known: Arc::new(known),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            known: Arc::clone(&self.known),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    /// The routes.
    inner: S,
    /// Paths labelled by name.
    known: Arc<HashSet<String>>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let (service, method) = if self.known.contains(path) {
            split_path(path)
        } else {
            ("unknown".to_owned(), "unknown".to_owned())
        };
        MeteredFuture {
            inner: self.inner.call(request),
            call: Some(Call {
                service,
                method,
                start: Instant::now(),
            }),
        }
    }
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
fn split_path(path: &str) -> (String, String) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((service, method)) => (service.to_owned(), method.to_owned()),
        None => (trimmed.to_owned(), String::new()),
    }
}

/// One call being measured.
#[derive(Debug)]
struct Call {
    /// Fully-qualified service name.
    service: String,
    /// Method name.
    method: String,
    /// When the request arrived.
    start: Instant,
}

impl Call {
    fn record(self, code: &str) {
        let labels = [
            ("service", self.service),
            ("method", self.method),
            ("code", code.to_owned()),
        ];
        metrics::counter!("mip_rpc_requests_total", &labels).increment(1);
        metrics::histogram!("mip_rpc_duration_seconds", &labels)
            .record(self.start.elapsed().as_secs_f64());
    }
}

/// The gRPC status name for a `grpc-status` value.
fn code_name(value: Option<&http::HeaderValue>) -> &'static str {
    let code = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from_i32);
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pin_project_lite::pin_project! {
    /// Waits for the response head; errors sent as headers only are recorded here.
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(status) = response.headers().get("grpc-status")
                    && let Some(call) = call.take()
                {
                    call.record(code_name(Some(status)));
                }
                Ok(response.map(|body| MeteredBody { inner: body, call }))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.record("INTERNAL");
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// Watches the response body for the trailers that carry the status.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its trailers: the client went away mid-call.
            if let Some(call) = this.project().call.take() {
                call.record("CANCELLED");
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.record(code_name(trailers.get("grpc-status")));
                }
            }
            Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    call.record("INTERNAL");
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.record("OK");
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/crm.v1.CrmService/CreateCustomer"),
            ("crm.v1.CrmService".into(), "CreateCustomer".into())
        );
        assert_eq!(split_path("/odd"), ("odd".into(), String::new()));
    }

    #[test]
    fn known_methods_come_from_the_descriptor_sets() {
        let layer = RpcMetricsLayer::new(&[mip_proto::CRM_DESCRIPTOR_SET]);
        assert!(layer.known.contains("/crm.v1.CrmService/CreateCustomer"));
        assert!(!layer.known.contains("/crm.v1.CrmService/Nope"));
    }

    #[test]
    fn status_values_map_to_code_names() {
        let v = http::HeaderValue::from_static("5");
        assert_eq!(code_name(Some(&v)), "NOT_FOUND");
        assert_eq!(code_name(None), "UNKNOWN");
    }
}
