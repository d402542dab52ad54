//! Rich gRPC errors, built the same way by every service (AIP-193).
//!
//! Every error status carries a `google.rpc.ErrorInfo` whose `domain` is the service that
//! returned it (`crm.mip.example.com`, ...) and whose `reason` is a value name of that
//! service's `ErrorReason` enum, so a program can act on it without parsing the message.
//! Errors every server gives the same way (bad fields, storage, the admission gate, an
//! oversized message) carry the domain of the service that returned them too: a client talks
//! to one service and matches on one domain, whichever layer refused the call.
//!
//! Validation collects one field violation per bad field, so a client learns about every
//! problem in one round trip, in a standard `google.rpc.BadRequest` next to the `ErrorInfo`.
//! Where the server knows how long a retry should wait (shutdown, a full watcher or call
//! limit), a `google.rpc.RetryInfo` says so.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::sqlite::DbError;
use crate::token::TokenError;

/// The `ErrorInfo.domain` of the service whose API lives in protobuf package `package`
/// (`crm.v1` gives `crm.mip.example.com`): one domain per service, whatever its version.
pub fn domain_of_package(package: &str) -> String {
    let service = package.split('.').next().unwrap_or(package);
    format!("{service}.mip.example.com")
}

/// `ErrorInfo.reason`s that the shared runtime gives in every service. Each service's
/// `ErrorReason` enum lists them (a test in each service checks it), next to its own.
pub mod reasons {
    /// INVALID_ARGUMENT: request fields are invalid; the `BadRequest` detail names them.
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    /// UNAVAILABLE: the database is unreachable or busy for now.
    pub const STORAGE_UNAVAILABLE: &str = "STORAGE_UNAVAILABLE";
    /// RESOURCE_EXHAUSTED: the disk under the database is full.
    pub const STORAGE_FULL: &str = "STORAGE_FULL";
    /// INTERNAL: the store failed unexpectedly (logged, not shown).
    pub const STORAGE_ERROR: &str = "STORAGE_ERROR";
    /// RESOURCE_EXHAUSTED: as many calls in flight as `--max-concurrent-requests` allows.
    pub const TOO_MANY_REQUESTS: &str = "TOO_MANY_REQUESTS";
    /// RESOURCE_EXHAUSTED: the request message is over `--max-message-bytes`.
    pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";
    /// UNAUTHENTICATED: no bearer token on a server that requires one.
    pub const AUTH_TOKEN_MISSING: &str = "AUTH_TOKEN_MISSING";
    /// UNAUTHENTICATED: a bearer token the server does not accept.
    pub const AUTH_TOKEN_INVALID: &str = "AUTH_TOKEN_INVALID";
    /// UNAVAILABLE: the server is shutting down. Given by the services that can be caught
    /// mid-call by shutdown, through [`super::shutting_down`].
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";

    /// Every reason above that any service can return whatever its own errors are.
    pub const SHARED: &[&str] = &[
        INVALID_FIELD,
        STORAGE_UNAVAILABLE,
        STORAGE_FULL,
        STORAGE_ERROR,
        TOO_MANY_REQUESTS,
        MESSAGE_TOO_LARGE,
        AUTH_TOKEN_MISSING,
        AUTH_TOKEN_INVALID,
    ];
}

/// How long a client refused by the in-flight limit should wait before retrying: calls are
/// short, so a slot frees up within milliseconds; less would only bring the next refusal.
pub const BUSY_RETRY_DELAY: Duration = Duration::from_millis(200);

/// How long a client should wait before retrying after a shutdown refusal: about what a
/// restart, or a load balancer moving the client to another replica, takes.
pub const SHUTDOWN_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Page size of a list call that leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// Largest page of any list call; larger requests are lowered to it, not refused.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Collects field violations while a request is validated.
#[derive(Debug)]
pub struct Violations {
    /// The `ErrorInfo.domain` of the service validating.
    domain: &'static str,
    /// `(field, description)` pairs, in the order they were found.
    fields: Vec<(String, String)>,
}

impl Violations {
    /// No violations yet, for the service whose errors carry `domain`.
    pub fn new(domain: &'static str) -> Self {
        Self {
            domain,
            fields: Vec::new(),
        }
    }

    /// Records that `field` is invalid, and why.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.fields.push((field.into(), description.into()));
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Runs a field check, recording its error, and returns the value when it passed.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: &str,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.add(field, e.to_string());
                None
            }
        }
    }

    /// Reads a `page_size`: 0 is the default, negatives are refused, large values are lowered.
    pub fn page_size(&mut self, raw: i32) -> usize {
        match raw {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                self.add("page_size", "must not be negative");
                DEFAULT_PAGE_SIZE
            }
            n => usize::try_from(n)
                .unwrap_or(MAX_PAGE_SIZE)
                .min(MAX_PAGE_SIZE),
        }
    }

    /// Reads a required UUID field.
    pub fn id(&mut self, field: &str, raw: &str) -> Option<Uuid> {
        if raw.is_empty() {
            self.add(field, "is required");
            return None;
        }
        self.optional_id(field, raw)
    }

    /// Reads an optional UUID field: empty means not set.
    pub fn optional_id(&mut self, field: &str, raw: &str) -> Option<Uuid> {
        if raw.is_empty() {
            return None;
        }
        self.check(
            field,
            Uuid::try_parse(raw.trim())
                .map_err(|_| "is not a UUID (expected 8-4-4-4-12 hex digits)"),
        )
    }

    /// Records why a page or resume token was refused.
    pub fn token(&mut self, field: &str, error: TokenError) {
        self.add(field, token_reason(error));
    }

    /// `Ok(())` when nothing was recorded, otherwise the INVALID_ARGUMENT status.
    pub fn finish(self) -> Result<(), Status> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    /// INVALID_ARGUMENT with a `BadRequest` detail listing every violation and an `ErrorInfo`
    /// with reason `INVALID_FIELD`. The message names them too, for clients that do not decode
    /// details (such as grpcurl's plain output).
    pub fn into_status(self) -> Status {
        let message = self
            .fields
            .iter()
            .map(|(field, description)| format!("{field}: {description}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::with_error_info(reasons::INVALID_FIELD, self.domain, []);
        for (field, description) in self.fields {
            details.add_bad_request_violation(field, description);
        }
        Status::with_error_details(Code::InvalidArgument, message, details)
    }
}

/// What to tell a client about a token it should not have sent.
pub fn token_reason(error: TokenError) -> &'static str {
    match error {
        TokenError::Malformed => "is malformed; pass a token exactly as the server returned it",
        TokenError::WrongKind => "was issued for a different request",
    }
}

/// The status of a storage failure, the same in every service: a full disk is
/// RESOURCE_EXHAUSTED, a busy or closing store UNAVAILABLE (worth a retry), anything else
/// INTERNAL, logged here with its detail and not shown to the client.
pub fn storage(domain: &str, error: &DbError) -> Status {
    if error.is_disk_full() {
        with_reason(
            Code::ResourceExhausted,
            domain,
            reasons::STORAGE_FULL,
            format!("the server's storage is full ({error}); retry once space has been freed"),
        )
    } else if error.is_transient() {
        with_reason(
            Code::Unavailable,
            domain,
            reasons::STORAGE_UNAVAILABLE,
            error.to_string(),
        )
    } else {
        tracing::error!(error = %error, "storage failure");
        with_reason(
            Code::Internal,
            domain,
            reasons::STORAGE_ERROR,
            "internal storage error; see the server log",
        )
    }
}

/// INVALID_ARGUMENT for one bad field.
pub fn invalid_field(domain: &'static str, field: &str, description: impl Into<String>) -> Status {
    let mut violations = Violations::new(domain);
    violations.add(field, description);
    violations.into_status()
}

/// A status with a machine-readable `ErrorInfo` reason (a value name of the service's
/// `ErrorReason`, such as `RESUME_TOKEN_EXPIRED`) in `domain`.
pub fn with_reason(code: Code, domain: &str, reason: &str, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason, domain, []);
    Status::with_error_details(code, message, details)
}

/// [`with_reason`], plus a `RetryInfo` telling the client to wait `delay` before retrying.
pub fn with_retry(
    code: Code,
    domain: &str,
    reason: &str,
    message: impl Into<String>,
    delay: Duration,
) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, domain, []);
    details.set_retry_info(Some(delay));
    Status::with_error_details(code, message, details)
}

/// The field violations (field, description) of an INVALID_ARGUMENT status, if it has any.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// UNAVAILABLE with reason `SHUTTING_DOWN` and a `RetryInfo` of [`SHUTDOWN_RETRY_DELAY`]:
/// the call was cut short by shutdown, and a retry after a restart (or elsewhere) finishes it.
pub fn shutting_down(domain: &str, message: impl Into<String>) -> Status {
    with_retry(
        Code::Unavailable,
        domain,
        reasons::SHUTTING_DOWN,
        message,
        SHUTDOWN_RETRY_DELAY,
    )
}

/// The `ErrorInfo.reason` of a status, if it carries one.
pub fn reason(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .filter(|reason| !reason.is_empty())
}

/// The `ErrorInfo.domain` of a status, if it carries one.
pub fn domain(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .map(|info| info.domain)
        .filter(|domain| !domain.is_empty())
}

/// The `RetryInfo.retry_delay` of a status, if it carries one.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "test.mip.example.com";

    #[test]
    fn every_violation_is_reported() {
        let mut v = Violations::new(DOMAIN);
        v.add("name", "must not be empty");
        v.add("email", "is not an email address");
        let status = v.into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("bad request detail");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(fields, ["name", "email"]);
        assert!(status.message().contains("email: is not an email address"));
        assert_eq!(reason(&status).as_deref(), Some(reasons::INVALID_FIELD));
        assert_eq!(domain(&status).as_deref(), Some(DOMAIN));
    }

    #[test]
    fn page_size_defaults_clamps_and_refuses_negatives() {
        let mut v = Violations::new(DOMAIN);
        assert_eq!(v.page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(v.page_size(7), 7);
        assert_eq!(v.page_size(i32::MAX), MAX_PAGE_SIZE);
        assert!(v.is_empty());
        v.page_size(-1);
        assert!(!v.is_empty());
    }

    #[test]
    fn ids_must_be_uuids() {
        let mut v = Violations::new(DOMAIN);
        assert!(v.optional_id("request_id", "").is_none());
        assert!(v.is_empty(), "an empty optional id is not an error");
        assert!(v.id("id", "").is_none());
        assert!(v.id("id", "42").is_none());
        assert!(v.id("id", "0190f2b4-0000-7000-8000-000000000001").is_some());
        let status = v.into_status();
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), 2);
    }

    #[test]
    fn reason_and_domain_round_trip() {
        let status = with_reason(
            Code::FailedPrecondition,
            DOMAIN,
            "RESUME_TOKEN_EXPIRED",
            "expired",
        );
        assert_eq!(reason(&status).as_deref(), Some("RESUME_TOKEN_EXPIRED"));
        assert_eq!(domain(&status).as_deref(), Some(DOMAIN));
        assert_eq!(retry_delay(&status), None);
    }

    #[test]
    fn shutdown_says_when_to_retry() {
        let status = shutting_down(DOMAIN, "bye");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status).as_deref(), Some(reasons::SHUTTING_DOWN));
        assert_eq!(retry_delay(&status), Some(SHUTDOWN_RETRY_DELAY));
    }

    #[test]
    fn every_storage_failure_names_its_reason() {
        for (error, code, expected) in [
            (
                DbError::DiskFull {
                    database: "x.db".into(),
                    reason: "full".into(),
                },
                Code::ResourceExhausted,
                reasons::STORAGE_FULL,
            ),
            (
                DbError::Closed,
                Code::Unavailable,
                reasons::STORAGE_UNAVAILABLE,
            ),
            (
                DbError::Other {
                    database: "x.db".into(),
                    reason: "no such table".into(),
                },
                Code::Internal,
                reasons::STORAGE_ERROR,
            ),
        ] {
            let status = storage(DOMAIN, &error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(reason(&status).as_deref(), Some(expected), "{error}");
            assert_eq!(domain(&status).as_deref(), Some(DOMAIN));
        }
    }

    #[test]
    fn domains_are_per_service_not_per_version() {
        assert_eq!(domain_of_package("crm.v1"), "crm.mip.example.com");
        assert_eq!(
            domain_of_package("inventory.v2"),
            "inventory.mip.example.com"
        );
    }
}
