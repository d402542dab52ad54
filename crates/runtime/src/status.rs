//! Rich gRPC errors, built the same way by every service.
//!
//! Validation collects one field violation per bad field, so a client learns about every
//! problem in one round trip, and the details travel as standard `google.rpc.BadRequest` and
//! `google.rpc.ErrorInfo` messages that any gRPC client library can decode.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every error the platform returns.
pub const ERROR_DOMAIN: &str = "mip.example.com";

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
    fn reason_round_trips() {
        let status = with_reason(Code::FailedPrecondition, "RESUME_TOKEN_EXPIRED", "expired");
        assert_eq!(reason(&status).as_deref(), Some("RESUME_TOKEN_EXPIRED"));
    }
}
