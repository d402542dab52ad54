//! Every way an Inventory call can fail, and the one place each becomes a gRPC status.

use mip_runtime::sqlite::DbError;
use mip_runtime::status::invalid_field;
use tonic::Status;
use uuid::Uuid;

use crate::domain::{PackageStatus, allowed_moves_text};

/// Inventory errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid.
    #[error("{field}: {reason}")]
    InvalidField {
        /// The field's name in the request.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No package request has this id.
    #[error("package request {0} not found")]
    NotFound(Uuid),
    /// The `request_id` was used before with other parameters.
    #[error(
        "request_id {0} was already used with a different customer_id or package_type; use a new request_id for a new request"
    )]
    RequestIdReused(Uuid),
    /// The life cycle does not allow this status change.
    #[error(
        "package request {id} is {from} and cannot move to {to}; allowed moves: {}",
        allowed_moves_text()
    )]
    IllegalMove {
        /// The package request.
        id: Uuid,
        /// Its current status.
        from: PackageStatus,
        /// The status asked for.
        to: PackageStatus,
    },
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(DbError::from(e))
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidField { field, reason } => invalid_field(field, reason),
            Error::NotFound(_) => Status::not_found(message),
            Error::RequestIdReused(_) => Status::already_exists(message),
            Error::IllegalMove { .. } => Status::failed_precondition(message),
            // A constraint the store had no domain error for still refused a duplicate: that
            // is what ALREADY_EXISTS means, and no server fault.
            Error::Storage(e) if e.unique_constraint().is_some() => Status::already_exists(message),
            Error::Storage(e) => mip_runtime::status::storage(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn illegal_move_names_both_statuses_and_the_allowed_moves() {
        let status = Status::from(Error::IllegalMove {
            id: Uuid::nil(),
            from: PackageStatus::Delivered,
            to: PackageStatus::Pending,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "package request 00000000-0000-0000-0000-000000000000 is DELIVERED and cannot move to PENDING; \
             allowed moves: PENDING to SHIPPED, SHIPPED to DELIVERED, PENDING to CANCELLED"
        );
    }

    #[test]
    fn a_unique_violation_without_a_domain_error_is_already_exists() {
        let status = Status::from(Error::Storage(DbError::UniqueViolation {
            constraint: "package_requests_request_id_key".into(),
        }));
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(
            status.message().contains("package_requests_request_id_key"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn closed_store_is_unavailable() {
        let status = Status::from(Error::Storage(DbError::Closed));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
