//! Creating one welcome package request, reliably.
//!
//! The request id is derived from the customer id ([`RequestIds`]), so every attempt,
//! redelivery, reconnect or relist for the same customer carries the same idempotency key, and
//! Inventory creates at most one package request per customer however often it is asked. That
//! is what turns at-least-once delivery into an exactly-once effect.
//!
//! Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) are retried
//! with capped exponential backoff and jitter; anything else fails at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mip_proto::inventory::v1 as pb;
use mip_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use mip_runtime::CancellationToken;
use mip_runtime::security::AuthenticatedChannel;
use tonic::Code;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::Stats;
use crate::batch::Creator;

/// What every package this service creates is.
pub const PACKAGE_TYPE: &str = "welcome_package";

/// Namespace of the derived request ids. Fixed forever: changing it would give every customer
/// a new idempotency key and so a second package.
const REQUEST_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d69_7000_7765_6c63_6f6d_6500_0000_0001);

/// Customers created before this instant (2026-11-23T00:00:00Z, when time-ordered ids came
/// in) keep name-based ids whatever the integration's own state says, so that a replay after
/// losing the data directory derives the ids earlier versions sent for them. Customers created
/// after it that an earlier version served are protected only by the data directory's own
/// record ([`RequestIds::ordered_from_ms`]): lose that directory and replay, and they can get a
/// second package. Fixed forever.
const ORDERED_SINCE_MS: u64 = 1_795_392_000_000;

/// How long after an upgrade customers keep name-based ids: an older version may have sent
/// requests past the checkpoint it saved, and a customer's id carries CRM's clock, not ours.
pub const UPGRADE_MARGIN: Duration = Duration::from_secs(3600);

/// How the idempotency key of a customer's welcome package request is derived.
///
/// The key is a function of the customer id alone, so it is the same on every attempt. Two
/// forms exist:
/// - **time-ordered** (UUIDv8): the customer id's 48-bit millisecond timestamp, then bits of a
///   SHA-1 name hash. Customer ids are UUIDv7, so consecutive customers get neighbouring keys
///   and Inventory's request-id index grows at its end: one page per commit instead of one per
///   request, which was the largest cost left in end-to-end throughput (see TECHNICAL_DESIGN.md,
///   Performance).
/// - **name-based** (UUIDv5 of `welcome_package/<customer id>`): what versions before the
///   time-ordered form sent. Customers created before [`RequestIds::ordered_from_ms`] keep it,
///   so a request an older version sent is recognised when it is repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestIds {
    /// Customers whose id's timestamp is at or after this (ms since the epoch) get
    /// time-ordered keys.
    ordered_from_ms: u64,
}

impl RequestIds {
    /// Time-ordered keys for every customer created at or after `ms` (and after
    /// 2026-11-23T00:00:00Z in any case).
    pub fn ordered_from_ms(ms: u64) -> Self {
        Self {
            ordered_from_ms: ms.max(ORDERED_SINCE_MS),
        }
    }

    /// Time-ordered keys for every customer they can be given to.
    pub fn ordered() -> Self {
        Self::ordered_from_ms(0)
    }

    /// From when keys are time-ordered (ms since the epoch, by customer id).
    pub fn since_ms(&self) -> u64 {
        self.ordered_from_ms
    }

    /// The idempotency key of `customer_id`'s welcome package request.
    pub fn for_customer(&self, customer_id: &str) -> Uuid {
        let named = Uuid::new_v5(
            &REQUEST_ID_NAMESPACE,
            format!("{PACKAGE_TYPE}/{customer_id}").as_bytes(),
        );
        match Uuid::parse_str(customer_id) {
            Ok(id) if id.get_version_num() == 7 && millis(id) >= self.ordered_from_ms => {
                let mut bytes = *named.as_bytes();
                bytes[..6].copy_from_slice(&id.as_bytes()[..6]);
                uuid::Builder::from_custom_bytes(bytes).into_uuid()
            }
            _ => named,
        }
    }
}

/// A UUIDv7's timestamp: its first 48 bits, milliseconds since the epoch.
fn millis(id: Uuid) -> u64 {
    let b = id.as_bytes();
    u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
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
    from_transport
        || matches!(
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
        )
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The package request exists (created now, or found created by an earlier attempt).
    Delivered {
        /// When Inventory created it, if it said.
        package_create_time: Option<SystemTime>,
    },
    /// It failed for good: a permanent error, or every attempt failed.
    Failed {
        /// Status code and message of the last attempt.
        reason: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Shutdown began; the event stays unhandled and is delivered after restart.
    Cancelled,
}

/// Delivers welcome package requests to Inventory.
#[derive(Debug, Clone)]
pub struct Deliverer {
    /// Sends the creates to Inventory, batching concurrent ones.
    creator: Creator,
    /// Retry policy.
    policy: RetryPolicy,
    /// Jitter source.
    jitter: Arc<dyn Jitter>,
    /// Counters for status and metrics.
    stats: Arc<Stats>,
    /// How idempotency keys are derived.
    request_ids: RequestIds,
}

impl Deliverer {
    /// A deliverer over `channel`, deriving idempotency keys with `request_ids`.
    pub fn new(
        channel: AuthenticatedChannel,
        request_ids: RequestIds,
        policy: RetryPolicy,
        jitter: Arc<dyn Jitter>,
        stats: Arc<Stats>,
        max_message_bytes: usize,
    ) -> Self {
        let client =
            InventoryServiceClient::new(channel).max_decoding_message_size(max_message_bytes);
        Self {
            creator: Creator::new(client, policy.call_timeout),
            policy,
            jitter,
            stats,
            request_ids,
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
        let request_id = self.request_ids.for_customer(customer_id).to_string();
        let mut attempts = 0;
        loop {
            attempts += 1;
            debug!(customer_id, attempt = attempts, "creating package request");
            let request = pb::CreatePackageRequestRequest {
                customer_id: customer_id.to_owned(),
                package_type: PACKAGE_TYPE.to_owned(),
                request_id: request_id.clone(),
            };
            let call = tokio::time::timeout(self.policy.call_timeout, self.creator.create(request));
            let result = tokio::select! {
                result = call => result,
                () = shutdown.cancelled() => return Outcome::Cancelled,
            };
            let status = match result {
                Ok(Ok(package)) => {
                    info!(customer_id, package_request_id = %package.id, "package request created");
                    return Outcome::Delivered {
                        package_create_time: package
                            .create_time
                            .and_then(|t| SystemTime::try_from(t).ok()),
                    };
                }
                Ok(Err(status)) if status.code() == Code::AlreadyExists => {
                    info!(customer_id, "package request already existed");
                    return Outcome::Delivered {
                        package_create_time: None,
                    };
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded("call timed out"),
            };
            let reason = format!("{:?}: {}", status.code(), status.message());
            if !is_transient(&status) || attempts >= self.policy.max_attempts {
                return Outcome::Failed { reason, attempts };
            }
            let delay = self.jitter.apply(self.policy.backoff(attempts));
            self.stats.count_retried();
            warn!(customer_id, attempt = attempts, %reason, retry_in = ?delay, "retrying package request");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Outcome::Cancelled,
            }
        }
    }
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

    #[test]
    fn name_based_keys_are_what_earlier_versions_sent() {
        // Pinned: changing the derivation gives customers a second package.
        let ids = RequestIds::ordered();
        let old = "0190f2b4-0000-7000-8000-000000000001";
        assert_eq!(
            ids.for_customer(old).to_string(),
            Uuid::new_v5(
                &REQUEST_ID_NAMESPACE,
                format!("welcome_package/{old}").as_bytes()
            )
            .to_string()
        );
        assert_eq!(ids.for_customer(old).get_version_num(), 5);
        assert_eq!(ids.for_customer("not-a-uuid").get_version_num(), 5);
        let v4 = Uuid::new_v4().to_string();
        assert_eq!(ids.for_customer(&v4).get_version_num(), 5);
    }

    #[test]
    fn keys_are_stable_distinct_and_ordered_like_the_customers() {
        let ids = RequestIds::ordered();
        let t = ORDERED_SINCE_MS + 1_000;
        let (a, b, c) = (customer(t, 1), customer(t, 2), customer(t + 1, 0));
        assert_eq!(ids.for_customer(&a), ids.for_customer(&a));
        assert_ne!(ids.for_customer(&a), ids.for_customer(&b));
        assert_eq!(ids.for_customer(&a).get_version_num(), 8);
        assert!(ids.for_customer(&a).max(ids.for_customer(&b)) < ids.for_customer(&c));
        assert_eq!(millis(ids.for_customer(&c)), t + 1);
    }

    #[test]
    fn customers_before_the_switch_keep_name_based_keys() {
        let upgraded = RequestIds::ordered_from_ms(ORDERED_SINCE_MS + 10_000);
        assert_eq!(
            upgraded
                .for_customer(&customer(ORDERED_SINCE_MS + 9_999, 1))
                .get_version_num(),
            5
        );
        assert_eq!(
            upgraded
                .for_customer(&customer(ORDERED_SINCE_MS + 10_000, 1))
                .get_version_num(),
            8
        );
        // Never earlier than the fixed date, whatever the state says.
        assert_eq!(RequestIds::ordered_from_ms(0).since_ms(), ORDERED_SINCE_MS);
        assert_eq!(
            RequestIds::ordered()
                .for_customer(&customer(ORDERED_SINCE_MS - 1, 1))
                .get_version_num(),
            5
        );
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
