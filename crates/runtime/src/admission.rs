//! The gate every call passes before it reaches a handler: the bearer token, then a bounded
//! number of calls in flight.
//!
//! A tower layer rather than a tonic interceptor, because the decision depends on the path
//! (the health check always open, reflection optionally) and an interceptor does not see it.
//! Refusals are ordinary gRPC statuses (UNAUTHENTICATED, RESOURCE_EXHAUSTED), sent as
//! trailers-only responses, so every client reads them the usual way, each with an `ErrorInfo`
//! reason in the server's domain (and a `RetryInfo` when the limit is what refused it).
//!
//! The gate also sees every answer on its way out, which is where a request over
//! `--max-message-bytes` gets its gRPC-conventional code: tonic refuses it by its length prefix
//! with OUT_OF_RANGE, from inside the generated server where no option changes it, and the gate
//! turns that one status into RESOURCE_EXHAUSTED with reason `MESSAGE_TOO_LARGE`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::security::Security;
use crate::status::{BUSY_RETRY_DELAY, reasons, with_reason, with_retry};

/// How tonic's decoder starts the message of the OUT_OF_RANGE it gives a request whose length
/// prefix is over the limit (tonic 0.14, `codec/decode.rs`). A change of that text in a tonic
/// upgrade is caught by `oversized_messages` in `crates/mip/tests/malformed.rs`.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// How tonic starts the RESOURCE_EXHAUSTED of a compressed request that expands past the limit.
const TONIC_DECOMPRESSED_TOO_LARGE: &str = "Error decompressing: size limit";

/// The standard health check: open to probes, never counted against the limit, so an
/// overloaded server still answers its load balancer. (Health `Watch`, a long-lived stream,
/// is an ordinary call: a client may only hold those open with the token.)
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Paths of the reflection services (v1 and v1alpha).
const REFLECTION_PREFIX: &str = "/grpc.reflection.";

/// Builds [`Admission`] services.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    /// Tokens and whether reflection is public.
    security: Security,
    /// Permits for calls in flight.
    in_flight: Arc<Semaphore>,
    /// The limit, for the error message.
    limit: usize,
    /// `ErrorInfo.domain` of the service this server hosts.
    domain: Arc<str>,
}

impl AdmissionLayer {
    /// A gate checking `security`'s tokens and allowing `max_in_flight` calls at once, whose
    /// refusals carry `ErrorInfo.domain` `domain`.
    pub fn new(security: Security, max_in_flight: usize, domain: &str) -> Self {
        let limit = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            security,
            in_flight: Arc::new(Semaphore::new(limit)),
            limit,
            domain: domain.into(),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

/// The gate around one connection's service.
#[derive(Clone, Debug)]
pub struct Admission<S> {
    /// The routes.
    inner: S,
    /// Shared settings and permits.
    layer: AdmissionLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody> Service<http::Request<ReqBody>> for Admission<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if path == HEALTH_CHECK {
            return Box::pin(self.inner.call(request));
        }
        let security = &self.layer.security;
        let open = path.starts_with(REFLECTION_PREFIX) && security.reflection_public();
        if security.requires_token() && !open {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes);
            if !security.accepts(header) {
                let (reason, message) = if header.is_none() {
                    (
                        reasons::AUTH_TOKEN_MISSING,
                        "this server requires a token: send the header `authorization: Bearer <token>`",
                    )
                } else {
                    (reasons::AUTH_TOKEN_INVALID, "the bearer token is not valid")
                };
                return refuse(with_reason(
                    tonic::Code::Unauthenticated,
                    &self.layer.domain,
                    reason,
                    message,
                ));
            }
        }
        let Some(permit) = self.permit() else {
            return refuse(with_retry(
                tonic::Code::ResourceExhausted,
                &self.layer.domain,
                reasons::TOO_MANY_REQUESTS,
                format!(
                    "server busy: {} calls already in flight (--max-concurrent-requests); retry with backoff",
                    self.layer.limit
                ),
                BUSY_RETRY_DELAY,
            ));
        };
        // The ready service answers this call; a fresh clone becomes the next one's.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let domain = Arc::clone(&self.layer.domain);
        Box::pin(async move {
            let _permit = permit;
            let response = inner.call(request).await?;
            Ok(message_too_large(response, &domain))
        })
    }
}

/// `response`, unless it is tonic's refusal of an oversized request: then the same refusal as
/// RESOURCE_EXHAUSTED, which is what gRPC prescribes for a message over the limit, with reason
/// `MESSAGE_TOO_LARGE` in `domain`. Such refusals are trailers-only (the status is in the
/// headers), as every refusal before a handler runs is; any other response is left alone.
fn message_too_large(
    response: http::Response<tonic::body::Body>,
    domain: &str,
) -> http::Response<tonic::body::Body> {
    let code = response.headers().get("grpc-status").map(|v| v.as_bytes());
    // OUT_OF_RANGE (11) or RESOURCE_EXHAUSTED (8); everything else passes without a look at
    // the message.
    if !matches!(code, Some(b"11" | b"8")) {
        return response;
    }
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let oversized = (status.code() == tonic::Code::OutOfRange
        && status.message().starts_with(TONIC_TOO_LARGE))
        || (status.code() == tonic::Code::ResourceExhausted
            && status.message().starts_with(TONIC_DECOMPRESSED_TOO_LARGE)
            && status.details().is_empty());
    if !oversized {
        return response;
    }
    with_reason(
        tonic::Code::ResourceExhausted,
        domain,
        reasons::MESSAGE_TOO_LARGE,
        format!(
            "{} (--max-message-bytes); send less per call",
            status.message()
        ),
    )
    .into_http()
}

impl<S> Admission<S> {
    fn permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.layer.in_flight).try_acquire_owned().ok()
    }
}

fn refuse<E: Send + 'static>(
    status: tonic::Status,
) -> BoxFuture<http::Response<tonic::body::Body>, E> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::oneshot;
    use tower::ServiceExt;

    use super::*;
    use crate::security::SecurityOptions;

    type Response = http::Response<tonic::body::Body>;

    const DOMAIN: &str = "test.mip.example.com";

    /// Releases for the calls the routes are holding, in arrival order.
    type Waiting = Arc<std::sync::Mutex<Vec<oneshot::Sender<()>>>>;

    /// Routes whose calls finish when the test says so.
    fn gated(
        security: SecurityOptions,
        limit: usize,
    ) -> (
        impl Service<http::Request<()>, Response = Response, Error = Infallible, Future: Send> + Clone,
        Waiting,
    ) {
        let waiting = Arc::new(std::sync::Mutex::new(Vec::<oneshot::Sender<()>>::new()));
        let queue = Arc::clone(&waiting);
        let routes = tower::service_fn(move |_request: http::Request<()>| {
            let (release, released) = oneshot::channel();
            queue.lock().unwrap().push(release);
            async move {
                let _ = released.await;
                Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
            }
        });
        let layer = AdmissionLayer::new(security.load().unwrap(), limit, DOMAIN);
        (layer.layer(routes), waiting)
    }

    fn request(path: &str, token: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(format!("http://localhost{path}"));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(()).unwrap()
    }

    fn grpc_status(response: &Response) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn calls_past_the_limit_are_refused_at_once_and_health_always_answers() {
        let (service, waiting) = gated(SecurityOptions::default(), 1);
        let first = tokio::spawn(
            service
                .clone()
                .oneshot(request("/crm.v1.CrmService/A", None)),
        );
        while waiting.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }

        let refused = service
            .clone()
            .oneshot(request("/crm.v1.CrmService/B", None))
            .await
            .unwrap();
        assert_eq!(grpc_status(&refused), Some("8"), "RESOURCE_EXHAUSTED");
        let status = tonic::Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(
            crate::status::reason(&status).as_deref(),
            Some(reasons::TOO_MANY_REQUESTS)
        );
        assert_eq!(crate::status::domain(&status).as_deref(), Some(DOMAIN));
        assert_eq!(
            crate::status::retry_delay(&status),
            Some(BUSY_RETRY_DELAY),
            "the client is told how long to wait"
        );

        let health = tokio::spawn(
            service
                .clone()
                .oneshot(request("/grpc.health.v1.Health/Check", None)),
        );
        while waiting.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
        for release in waiting.lock().unwrap().drain(..) {
            release.send(()).unwrap();
        }
        assert_eq!(grpc_status(&first.await.unwrap().unwrap()), None);
        assert_eq!(grpc_status(&health.await.unwrap().unwrap()), None);

        // The finished call gave its permit back.
        let next = tokio::spawn(
            service
                .clone()
                .oneshot(request("/crm.v1.CrmService/C", None)),
        );
        while waiting.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        waiting.lock().unwrap().pop().unwrap().send(()).unwrap();
        assert_eq!(grpc_status(&next.await.unwrap().unwrap()), None);
    }

    /// What the gate makes of a response the routes gave with `status`.
    async fn through_the_gate(status: tonic::Status) -> tonic::Status {
        let routes = tower::service_fn(move |_request: http::Request<()>| {
            let response = status.clone().into_http();
            async move { Ok::<_, Infallible>(response) }
        });
        let layer = AdmissionLayer::new(SecurityOptions::default().load().unwrap(), 8, DOMAIN);
        let response = layer
            .layer(routes)
            .oneshot(request("/crm.v1.CrmService/CreateCustomer", None))
            .await
            .unwrap();
        tonic::Status::from_header_map(response.headers()).expect("a trailers-only status")
    }

    #[tokio::test]
    async fn only_tonics_oversized_message_refusal_becomes_resource_exhausted() {
        let oversized = through_the_gate(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 2000 bytes, the limit is: 1024 bytes",
        ))
        .await;
        assert_eq!(oversized.code(), tonic::Code::ResourceExhausted);
        assert!(
            oversized.message().starts_with(
                "Error, decoded message length too large: found 2000 bytes, the limit is: 1024 bytes"
            ),
            "tonic's message is kept: {}",
            oversized.message()
        );
        assert_eq!(
            crate::status::reason(&oversized).as_deref(),
            Some(reasons::MESSAGE_TOO_LARGE)
        );
        assert_eq!(crate::status::domain(&oversized).as_deref(), Some(DOMAIN));

        let inflated = through_the_gate(tonic::Status::resource_exhausted(
            "Error decompressing: size limit, of 1024 bytes, exceeded while decompressing message",
        ))
        .await;
        assert_eq!(inflated.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            crate::status::reason(&inflated).as_deref(),
            Some(reasons::MESSAGE_TOO_LARGE)
        );

        // A service's own OUT_OF_RANGE (a resume token ahead of the log) passes untouched.
        let own = crate::status::with_reason(
            tonic::Code::OutOfRange,
            "crm.mip.example.com",
            "RESUME_TOKEN_AHEAD",
            "resume token is at position 9, ahead of the change log",
        );
        let passed = through_the_gate(own).await;
        assert_eq!(passed.code(), tonic::Code::OutOfRange);
        assert_eq!(
            crate::status::reason(&passed).as_deref(),
            Some("RESUME_TOKEN_AHEAD")
        );
    }

    #[tokio::test]
    async fn tokens_are_required_except_for_health_and_optionally_reflection() {
        let options = |reflection_public| SecurityOptions {
            auth_token: Some("right".parse().unwrap()),
            reflection_public,
            ..SecurityOptions::default()
        };
        let reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        for (reflection_public, path, token, refused) in [
            (false, "/crm.v1.CrmService/CreateCustomer", None, true),
            (
                false,
                "/crm.v1.CrmService/CreateCustomer",
                Some("wrong"),
                true,
            ),
            (
                false,
                "/crm.v1.CrmService/CreateCustomer",
                Some("right"),
                false,
            ),
            (false, "/grpc.health.v1.Health/Check", None, false),
            (false, "/grpc.health.v1.Health/Watch", None, true),
            (false, reflection, None, true),
            (false, reflection, Some("right"), false),
            (true, reflection, None, false),
            (true, "/crm.v1.CrmService/CreateCustomer", None, true),
        ] {
            let (service, waiting) = gated(options(reflection_public), 8);
            let call = tokio::spawn(service.oneshot(request(path, token)));
            if !refused {
                while waiting.lock().unwrap().is_empty() {
                    tokio::task::yield_now().await;
                }
                waiting.lock().unwrap().pop().unwrap().send(()).unwrap();
            }
            let response = call.await.unwrap().unwrap();
            let expected = refused.then_some("16");
            assert_eq!(grpc_status(&response), expected, "{path} with {token:?}");
            if refused {
                let status = tonic::Status::from_header_map(response.headers()).unwrap();
                let reason = if token.is_none() {
                    reasons::AUTH_TOKEN_MISSING
                } else {
                    reasons::AUTH_TOKEN_INVALID
                };
                assert_eq!(
                    crate::status::reason(&status).as_deref(),
                    Some(reason),
                    "{path} with {token:?}"
                );
            }
        }
    }
}
