//! Creating one welcome package request, reliably, and cancelling it when its customer is
//! deleted.
//!
//! The request id is derived from the customer id alone ([`request_id`]), so every attempt,
//! redelivery, reconnect or relist for the same customer carries the same idempotency key, and
//! Inventory creates at most one package request per customer however often it is asked. That
//! is what turns at-least-once delivery into an exactly-once effect.
//!
//! Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) are retried
//! with capped exponential backoff and jitter; anything else fails at once.
//!
//! A cancel first makes sure the package exists, with the very create a delivery sends (same
//! request id), and then cancels the package that create returned. That is what keeps a
//! customer's create and delete, which run concurrently, from racing each other into a
//! PENDING package for a deleted customer: whichever create reaches Inventory first makes the
//! one package, every other create (the create event's, late or retried) only finds it, and
//! the cancel runs after a create of its own has returned, so no create can land after it.
//! The order lives in Inventory's unique request id, not in this process, so it holds across
//! restarts and workers too.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_proto::inventory::v1 as pb;
use mip_proto::inventory::v1::PackageStatus;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_runtime::CancellationToken;
use mip_runtime::security::AuthenticatedChannel;
use tonic::{Code, Request, Status};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::Stats;
use crate::batch::Creator;

/// What every package this service creates is.
pub const PACKAGE_TYPE: &str = "welcome_package";

/// Namespace of the derived request ids. Fixed forever: changing it would give every customer
/// a new idempotency key and so a second package.
const REQUEST_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d69_7000_7765_6c63_6f6d_6500_0000_0001);

/// The idempotency key of `customer_id`'s welcome package request: a function of the
/// customer id alone, so every attempt, every restart (even one that lost the data directory),
/// and every integration service sharing the work derives the same key, and Inventory creates
/// one package request per customer however often it is asked.
///
/// The key is a UUIDv8: the customer id's first 6 bytes (a UUIDv7's millisecond timestamp),
/// then bits of the SHA-1 name hash (UUIDv5) of `welcome_package/<customer id>`. Customer ids
/// are UUIDv7, so consecutive customers get neighbouring keys and Inventory's request-id index
/// grows at its end: one page per commit instead of one per request (see TECHNICAL_DESIGN.md,
/// Performance). An id that is not a UUID (CRM never issues one) has no timestamp to lead
/// with; its key starts with zeros and is told apart by the hash alone.
///
/// Fixed forever: changing it would give every customer a new key, and so a second package.
pub fn request_id(customer_id: &str) -> Uuid {
    let named = Uuid::new_v5(
        &REQUEST_ID_NAMESPACE,
        format!("{PACKAGE_TYPE}/{customer_id}").as_bytes(),
    );
    let mut bytes = *named.as_bytes();
    let timestamp = Uuid::parse_str(customer_id).map_or([0; 6], |id| {
        let mut timestamp = [0; 6];
        timestamp.copy_from_slice(&id.as_bytes()[..6]);
        timestamp
    });
    bytes[..6].copy_from_slice(&timestamp);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// What a delivery does for a customer: what its CRM event asks for, and what a dead letter
/// records so that a re-drive does the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A new customer: create its welcome package request.
    Create,
    /// A deleted customer: cancel its welcome package request while it is still PENDING.
    Cancel,
}

impl Action {
    /// The name stored with a dead letter.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Cancel => "cancel",
        }
    }

    /// The action a stored name stands for; `None` for a name this build does not know.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "create" => Some(Action::Create),
            "cancel" => Some(Action::Cancel),
            _ => None,
        }
    }
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts before giving up and dead-lettering.
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    pub initial_backoff: Duration,
    /// Backoff never grows beyond this.
    pub max_backoff: Duration,
    /// Deadline of each call.
    pub call_timeout: Duration,
}

impl RetryPolicy {
    /// The backoff after `attempt` failed attempts, before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Spreads retries so that many deliveries failing together do not retry together.
pub trait Jitter: Send + Sync + std::fmt::Debug + 'static {
    /// A duration between half of `delay` and all of it.
    fn apply(&self, delay: Duration) -> Duration;
}

/// Uniform jitter from the thread-local random generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn apply(&self, delay: Duration) -> Duration {
        delay.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// Whether a failed call may succeed if tried again: a transient status from Inventory, or
/// any failure of the connection itself. A call in flight when Inventory dies fails with
/// whatever code the client's transport picks (UNKNOWN "transport error", INTERNAL "h2
/// protocol error", CANCELLED), and may even have been carried out: retrying with the same
/// request id is always safe, and giving up would leave the customer without a package.
pub fn is_transient(status: &tonic::Status) -> bool {
    let from_transport = std::error::Error::source(status)
        .is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some());
    // RESOURCE_EXHAUSTED passes once load drops, except a message over the size limit, which
    // fails the same way however often it is sent.
    let too_large = mip_runtime::status::reason(status).as_deref()
        == Some(mip_runtime::status::reasons::MESSAGE_TOO_LARGE);
    from_transport
        || (!too_large
            && matches!(
                status.code(),
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                // What the server answers when its --request-timeout cut the call off.
                | Code::Cancelled
                // A token rotated in the wrong order: fixing it must not need a re-drive of
                // every customer delivered meanwhile.
                | Code::Unauthenticated
            ))
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The package request exists (created now, or found created by an earlier attempt).
    Delivered {
        /// When Inventory created it, if it said.
        package_create_time: Option<SystemTime>,
    },
    /// A cancel: the package request is CANCELLED now; `now` says whether this cancel moved it
    /// there (it was PENDING) or found it so.
    Withdrawn {
        /// Whether this call cancelled it.
        now: bool,
    },
    /// A cancel: the package request had gone past PENDING (SHIPPED or DELIVERED), so it
    /// cannot be cancelled and is left as it is. Not a failure.
    LeftAsIs {
        /// The status it was found in.
        status: PackageStatus,
    },
    /// It failed for good: a permanent error, or every attempt failed.
    Failed {
        /// Status code and message of the last attempt.
        reason: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Shutdown began; the event stays unhandled and is delivered after restart.
    Interrupted,
}

/// Delivers welcome package requests to Inventory.
#[derive(Debug, Clone)]
pub struct Deliverer {
    /// Sends the creates to Inventory, batching concurrent ones.
    creator: Creator,
    /// For the calls that are not creates: status changes, look-ups and listings.
    client: InventoryServiceClient<AuthenticatedChannel>,
    /// Retry policy.
    policy: RetryPolicy,
    /// Jitter source.
    jitter: Arc<dyn Jitter>,
    /// Counters for status and metrics.
    stats: Arc<Stats>,
}

impl Deliverer {
    /// A deliverer over `channel`.
    pub fn new(
        channel: AuthenticatedChannel,
        policy: RetryPolicy,
        jitter: Arc<dyn Jitter>,
        stats: Arc<Stats>,
        max_message_bytes: usize,
    ) -> Self {
        let client =
            InventoryServiceClient::new(channel).max_decoding_message_size(max_message_bytes);
        Self {
            creator: Creator::new(client.clone(), policy.call_timeout),
            client,
            policy,
            jitter,
            stats,
        }
    }

    /// The same deliverer, giving up after `attempts` attempts.
    pub fn with_max_attempts(&self, attempts: u32) -> Self {
        let mut deliverer = self.clone();
        deliverer.policy.max_attempts = attempts.max(1);
        deliverer
    }

    /// Creates the customer's welcome package request, retrying transient failures.
    pub async fn deliver(&self, customer_id: &str, shutdown: &CancellationToken) -> Outcome {
        self.retrying(customer_id, "package request", shutdown, || async {
            let package = self.ensure(customer_id).await?;
            let package_create_time = package
                .as_ref()
                .and_then(|p| p.create_time)
                .and_then(|t| SystemTime::try_from(t).ok());
            match &package {
                Some(p) if existed_before(p) => {
                    info!(customer_id, package_request_id = %p.id, status = ?p.status(), "package request already existed");
                }
                Some(p) => debug!(customer_id, package_request_id = %p.id, "package request created"),
                None => info!(customer_id, "package request already existed"),
            }
            Ok(Outcome::Delivered {
                package_create_time,
            })
        })
        .await
    }

    /// Cancels the deleted customer's welcome package request if it is still PENDING, retrying
    /// transient failures. A package already CANCELLED is success; one SHIPPED or DELIVERED is
    /// left as it is.
    ///
    /// Each attempt first sends the customer's create (the same request id as its delivery):
    /// if the create event's delivery is still in flight or retrying, this one either makes
    /// the package or finds it, and the delivery's create, whenever it lands, finds the
    /// package this cancel cancelled instead of making a second one. So the cancel cannot
    /// lose a race with the create, without the two having to wait for each other. The cost:
    /// a customer deleted before it ever had a package (with `--start-position latest`, one
    /// created before the first start) gets one, already CANCELLED.
    pub async fn cancel(&self, customer_id: &str, shutdown: &CancellationToken) -> Outcome {
        self.retrying(customer_id, "package cancel", shutdown, || {
            self.try_cancel(customer_id)
        })
        .await
    }

    /// The customer's package request, made if it does not exist yet: `None` when Inventory
    /// refused the create as ALREADY_EXISTS (the request id used with other parameters: the
    /// package is there, but not returned).
    async fn ensure(&self, customer_id: &str) -> Result<Option<pb::PackageRequest>, Status> {
        let request = pb::CreatePackageRequestRequest {
            customer_id: customer_id.to_owned(),
            package_type: PACKAGE_TYPE.to_owned(),
            request_id: request_id(customer_id).to_string(),
        };
        let call = tokio::time::timeout(self.policy.call_timeout, self.creator.create(request));
        match call.await {
            Ok(Ok(package)) => Ok(Some(package)),
            Ok(Err(status)) if status.code() == Code::AlreadyExists => Ok(None),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded("call timed out")),
        }
    }

    /// One cancel attempt: make sure the package exists, then move it to CANCELLED.
    async fn try_cancel(&self, customer_id: &str) -> Result<Outcome, Status> {
        let package = match self.ensure(customer_id).await? {
            Some(package) => package,
            None => self.find(customer_id).await?,
        };
        let (package, moved) = if package.status() == PackageStatus::Pending {
            match self.set_cancelled(&package.id).await {
                Ok(cancelled) => (cancelled, true),
                // It left PENDING between the two calls (shipped meanwhile): read where it is.
                Err(status) if status.code() == Code::FailedPrecondition => {
                    (self.get(&package.id).await?, false)
                }
                Err(status) => return Err(status),
            }
        } else {
            (package, false)
        };
        let package_request_id = package.id.as_str();
        match package.status() {
            PackageStatus::Cancelled if moved => {
                info!(
                    customer_id,
                    %package_request_id, "customer deleted; package request cancelled"
                );
                Ok(Outcome::Withdrawn { now: true })
            }
            PackageStatus::Cancelled => {
                info!(
                    customer_id,
                    %package_request_id, "customer deleted; package request already cancelled"
                );
                Ok(Outcome::Withdrawn { now: false })
            }
            status @ (PackageStatus::Shipped | PackageStatus::Delivered) => {
                info!(
                    customer_id,
                    %package_request_id,
                    ?status,
                    "customer deleted; package request already shipped; left as is"
                );
                Ok(Outcome::LeftAsIs { status })
            }
            // Still PENDING after a refused move, or a status this build does not know: the
            // next attempt looks again.
            status => Err(Status::aborted(format!(
                "package request {package_request_id} is {status:?} after the cancel"
            ))),
        }
    }

    /// The customer's welcome package request, by its request id, for when the create did not
    /// return it. NOT_FOUND (permanent) if there is none.
    async fn find(&self, customer_id: &str) -> Result<pb::PackageRequest, Status> {
        let key = request_id(customer_id).to_string();
        let mut page_token = String::new();
        loop {
            let page = self
                .list_page(pb::ListPackageRequestsRequest {
                    customer_id: customer_id.to_owned(),
                    page_size: 1000,
                    page_token,
                })
                .await?;
            if let Some(package) = page
                .package_requests
                .into_iter()
                .find(|p| p.request_id == key)
            {
                return Ok(package);
            }
            if page.next_page_token.is_empty() {
                return Err(Status::not_found(format!(
                    "Inventory refused the create of request id {key} as ALREADY_EXISTS but lists no package request with it"
                )));
            }
            page_token = page.next_page_token;
        }
    }

    /// `UpdatePackageRequestStatus` to CANCELLED.
    async fn set_cancelled(&self, id: &str) -> Result<pb::PackageRequest, Status> {
        let mut request = Request::new(pb::UpdatePackageRequestStatusRequest {
            id: id.to_owned(),
            status: PackageStatus::Cancelled.into(),
        });
        request.set_timeout(self.policy.call_timeout);
        let mut client = self.client.clone();
        let call = client.update_package_request_status(request);
        match tokio::time::timeout(self.policy.call_timeout, call).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("call timed out")),
        }
    }

    /// `GetPackageRequest`.
    async fn get(&self, id: &str) -> Result<pb::PackageRequest, Status> {
        let mut request = Request::new(pb::GetPackageRequestRequest { id: id.to_owned() });
        request.set_timeout(self.policy.call_timeout);
        let mut client = self.client.clone();
        let call = client.get_package_request(request);
        match tokio::time::timeout(self.policy.call_timeout, call).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("call timed out")),
        }
    }

    /// One page of `ListPackageRequests`, once (the caller decides about retries).
    pub async fn list_page(
        &self,
        list: pb::ListPackageRequestsRequest,
    ) -> Result<pb::ListPackageRequestsResponse, Status> {
        let mut request = Request::new(list);
        request.set_timeout(self.policy.call_timeout);
        let mut client = self.client.clone();
        let call = client.list_package_requests(request);
        match tokio::time::timeout(self.policy.call_timeout, call).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("call timed out")),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, runs out of attempts or shutdown
    /// begins, backing off between transient failures; `what` names it in the log.
    async fn retrying<F, Fut>(
        &self,
        customer_id: &str,
        what: &str,
        shutdown: &CancellationToken,
        mut attempt: F,
    ) -> Outcome
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Outcome, Status>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            debug!(customer_id, attempt = attempts, "{what}: calling Inventory");
            let result = tokio::select! {
                result = attempt() => result,
                () = shutdown.cancelled() => return Outcome::Interrupted,
            };
            let status = match result {
                Ok(outcome) => return outcome,
                Err(status) => status,
            };
            let reason = format!("{:?}: {}", status.code(), status.message());
            if !is_transient(&status) || attempts >= self.policy.max_attempts {
                return Outcome::Failed { reason, attempts };
            }
            let delay = self.jitter.apply(self.policy.backoff(attempts));
            self.stats.count_retried();
            warn!(customer_id, attempt = attempts, %reason, retry_in = ?delay, "retrying {what}");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Outcome::Interrupted,
            }
        }
    }
}

/// Whether `package` was there before this delivery: Inventory says the create was a replay,
/// or the package has moved on from PENDING.
fn existed_before(package: &pb::PackageRequest) -> bool {
    package.replayed || package.status() != PackageStatus::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UUIDv7 customer id created at `ms`.
    fn customer(ms: u64, n: u64) -> String {
        let id = Uuid::from_u128(
            (u128::from(ms) << 80) | (0x7000 << 64) | (0x8000_0000_0000_0000 | u128::from(n)),
        );
        assert_eq!(id.get_version_num(), 7);
        id.to_string()
    }

    /// A UUID's first 48 bits: a UUIDv7's milliseconds since the epoch.
    fn millis(id: Uuid) -> u64 {
        let b = id.as_bytes();
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    #[test]
    fn the_key_of_a_fixed_customer_never_changes() {
        // Pinned: a different key for a customer already served means a second package.
        // The key is the one the time-ordered form has always given this customer.
        assert_eq!(
            request_id("01a3185e-3240-7c41-9d3e-2f6a8b1c4d5e").to_string(),
            "01a3185e-3240-8ade-bbb4-e6905649a7e5"
        );
    }

    #[test]
    fn keys_are_stable_distinct_and_ordered_like_the_customers() {
        let t = 1_800_000_000_000;
        let (a, b, c) = (customer(t, 1), customer(t, 2), customer(t + 1, 0));
        assert_eq!(request_id(&a), request_id(&a));
        assert_ne!(request_id(&a), request_id(&b));
        assert_eq!(request_id(&a).get_version_num(), 8);
        assert!(request_id(&a).max(request_id(&b)) < request_id(&c));
        assert_eq!(millis(request_id(&c)), t + 1);
    }

    #[test]
    fn every_customer_id_gets_the_same_form_of_key_whatever_its_age() {
        // No cut-over date: an old customer's key is derived exactly like a new one's.
        for id in [customer(1_000, 1), customer(1_900_000_000_000, 1)] {
            let key = request_id(&id);
            assert_eq!(key.get_version_num(), 8);
            assert_eq!(
                key.as_bytes()[..6],
                Uuid::parse_str(&id).unwrap().as_bytes()[..6]
            );
        }
        let odd = request_id("not-a-uuid");
        assert_eq!(odd.get_version_num(), 8);
        assert_eq!(millis(odd), 0);
        assert_ne!(odd, request_id("not-a-uuid-either"));
    }

    #[test]
    fn a_package_reads_as_already_there_when_replayed_or_moved_on() {
        let package = |status: PackageStatus, replayed: bool| pb::PackageRequest {
            status: status.into(),
            replayed,
            ..pb::PackageRequest::default()
        };
        assert!(!existed_before(&package(PackageStatus::Pending, false)));
        assert!(existed_before(&package(PackageStatus::Pending, true)));
        for status in [PackageStatus::Shipped, PackageStatus::Cancelled] {
            assert!(existed_before(&package(status, false)));
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            call_timeout: Duration::from_secs(1),
        };
        let steps: Vec<_> = (1..=6).map(|a| policy.backoff(a).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn only_transient_codes_are_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Cancelled,
            Code::Unauthenticated,
        ] {
            assert!(is_transient(&tonic::Status::new(code, "")));
        }
        let too_large = mip_runtime::status::with_reason(
            Code::ResourceExhausted,
            "inventory.mip.example.com",
            mip_runtime::status::reasons::MESSAGE_TOO_LARGE,
            "over the limit",
        );
        assert!(
            !is_transient(&too_large),
            "the same message fails the same way"
        );
        for code in [
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(!is_transient(&tonic::Status::new(code, "")));
        }
    }

    /// A connection that fails under a call: Inventory killed mid-call, or a protocol error.
    /// The client reports these with various codes (CANCELLED, INTERNAL, UNKNOWN); all retry.
    #[tokio::test]
    async fn failures_of_the_connection_are_retried_whatever_their_code() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut codes = Vec::new();
        for garbage in [None, Some(&b"HTTP/1.1 200 OK\r\n\r\nnot a gRPC server"[..])] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    if let Some(garbage) = garbage {
                        let mut preface = [0u8; 24];
                        let _ = socket.read_exact(&mut preface).await;
                        let _ = socket.write_all(garbage).await;
                    }
                    drop(socket);
                }
            });
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy();
            let status = InventoryServiceClient::new(channel)
                .create_package_request(pb::CreatePackageRequestRequest::default())
                .await
                .unwrap_err();
            assert!(is_transient(&status), "{status:?}");
            codes.push(status.code());
        }
        // The second is refused with a code that is not transient by itself.
        assert!(
            codes
                .iter()
                .any(|c| matches!(c, Code::Internal | Code::Unknown)),
            "{codes:?}"
        );
    }
}
