//! The gate every call passes before it reaches a handler: the bearer token, then a bounded
//! number of calls in flight.
//!
//! A tower layer rather than a tonic interceptor, because the decision depends on the path
//! (the health check always open, reflection optionally) and an interceptor does not see it.
//! Refusals are ordinary gRPC statuses (UNAUTHENTICATED, RESOURCE_EXHAUSTED), sent as
//! trailers-only responses, so every client reads them the usual way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::security::Security;

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
}

impl AdmissionLayer {
    /// A gate checking `security`'s tokens and allowing `max_in_flight` calls at once.
    pub fn new(security: Security, max_in_flight: usize) -> Self {
        let limit = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            security,
            in_flight: Arc::new(Semaphore::new(limit)),
            limit,
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
                let message = if header.is_none() {
                    "this server requires a token: send the header `authorization: Bearer <token>`"
                } else {
                    "the bearer token is not valid"
                };
                return refuse(tonic::Status::unauthenticated(message));
            }
        }
        let Some(permit) = self.permit() else {
            return refuse(crate::status::with_reason(
                tonic::Code::ResourceExhausted,
                "TOO_MANY_REQUESTS",
                format!(
                    "server busy: {} calls already in flight (--max-concurrent-requests); retry with backoff",
                    self.layer.limit
                ),
            ));
        };
        // The ready service answers this call; a fresh clone becomes the next one's.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _permit = permit;
            inner.call(request).await
        })
    }
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
        let layer = AdmissionLayer::new(security.load().unwrap(), limit);
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
        }
    }
}
