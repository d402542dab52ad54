//! Rich gRPC errors, built the same way by every service.
//!
//! Validation collects one field violation per bad field, so a client learns about every
//! problem in one round trip, and the details travel as standard `google.rpc.BadRequest` and
//! `google.rpc.ErrorInfo` messages that any gRPC client library can decode.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::sqlite::DbError;
use crate::token::TokenError;

/// The `ErrorInfo.domain` of every error the platform returns.
pub const ERROR_DOMAIN: &str = "mip.example.com";

/// Page size of a list call that leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// Largest page of any list call; larger requests are lowered to it, not refused.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Collects field violations while a request is validated.
#[derive(Debug, Default)]
pub struct Violations {
    /// `(field, description)` pairs, in the order they were found.
    fields: Vec<(String, String)>,
}

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
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

    /// INVALID_ARGUMENT with a `BadRequest` detail listing every violation. The message names
    /// them too, for clients that do not decode details (such as grpcurl's plain output).
    pub fn into_status(self) -> Status {
        let message = self
            .fields
            .iter()
            .map(|(field, description)| format!("{field}: {description}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
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
pub fn storage(error: &DbError) -> Status {
    if error.is_disk_full() {
        Status::resource_exhausted(format!(
            "the server's storage is full ({error}); retry once space has been freed"
        ))
    } else if error.is_transient() {
        Status::unavailable(error.to_string())
    } else {
        tracing::error!(error = %error, "storage failure");
        Status::internal("internal storage error; see the server log")
    }
}

/// INVALID_ARGUMENT for one bad field.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    let mut violations = Violations::new();
    violations.add(field, description);
    violations.into_status()
}

/// A status with a machine-readable `ErrorInfo` reason, such as `RESUME_TOKEN_EXPIRED`.
pub fn with_reason(code: Code, reason: &str, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []);
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

/// The `ErrorInfo.reason` of a status, if it carries one.
pub fn reason(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .filter(|reason| !reason.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_violation_is_reported() {
        let mut v = Violations::new();
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
    }

    #[test]
    fn page_size_defaults_clamps_and_refuses_negatives() {
        let mut v = Violations::new();
        assert_eq!(v.page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(v.page_size(7), 7);
        assert_eq!(v.page_size(i32::MAX), MAX_PAGE_SIZE);
        assert!(v.is_empty());
        v.page_size(-1);
        assert!(!v.is_empty());
    }

    #[test]
    fn ids_must_be_uuids() {
        let mut v = Violations::new();
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
    fn reason_round_trips() {
        let status = with_reason(Code::FailedPrecondition, "RESUME_TOKEN_EXPIRED", "expired");
        assert_eq!(reason(&status).as_deref(), Some("RESUME_TOKEN_EXPIRED"));
    }
}
