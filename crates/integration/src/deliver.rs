//! Creating one welcome package request, reliably.
//!
//! The request id is derived from the customer id alone ([`request_id`]), so every attempt,
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
            creator: Creator::new(client, policy.call_timeout),
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
        let request_id = request_id(customer_id).to_string();
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
                    debug!(customer_id, package_request_id = %package.id, "package request created");
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
