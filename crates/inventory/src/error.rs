//! Every way an Inventory call can fail, and the one place each becomes a gRPC status.
//!
//! Each status carries a `google.rpc.ErrorInfo` in [`DOMAIN`] whose reason is a value of the
//! contract's `inventory.v1.ErrorReason`, taken from the generated enum so that code and
//! contract cannot name different reasons.

use mip_proto::inventory::v1::ErrorReason;
use mip_runtime::sqlite::DbError;
use mip_runtime::status::{invalid_field, storage, with_reason};
use tonic::{Code, Status};
use uuid::Uuid;

/// `ErrorInfo.domain` of every error Inventory returns.
pub const DOMAIN: &str = "inventory.mip.example.com";

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

impl Error {
    /// The contract's name for this error: the `ErrorInfo.reason` its status carries.
    pub fn reason(&self) -> ErrorReason {
        match self {
            Error::InvalidField { .. } => ErrorReason::InvalidField,
            Error::NotFound(_) => ErrorReason::PackageRequestNotFound,
            Error::RequestIdReused(_) => ErrorReason::RequestIdReused,
            Error::IllegalMove { .. } => ErrorReason::StatusChangeNotAllowed,
            Error::Storage(e) if e.unique_constraint().is_some() => ErrorReason::WriteConflict,
            Error::Storage(e) if e.is_disk_full() => ErrorReason::StorageFull,
            Error::Storage(e) if e.is_transient() => ErrorReason::StorageUnavailable,
            Error::Storage(_) => ErrorReason::StorageError,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        let reason = error.reason().as_str_name();
        match error {
            Error::InvalidField { field, reason } => invalid_field(DOMAIN, field, reason),
            Error::NotFound(_) => with_reason(Code::NotFound, DOMAIN, reason, message),
            Error::RequestIdReused(_) => with_reason(Code::AlreadyExists, DOMAIN, reason, message),
            Error::IllegalMove { .. } => {
                with_reason(Code::FailedPrecondition, DOMAIN, reason, message)
            }
            // A constraint the store had no domain error for still refused a duplicate: that
            // is what ALREADY_EXISTS means, and no server fault.
            Error::Storage(e) if e.unique_constraint().is_some() => {
                with_reason(Code::AlreadyExists, DOMAIN, reason, message)
            }
            Error::Storage(e) => storage(DOMAIN, &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use mip_runtime::status::{domain, reason, reasons};

    use super::*;

    /// One error of every kind. The match makes a new variant a compile error here until it is
    /// added to the list, so the test below covers every error Inventory can return.
    fn one_of_each() -> Vec<Error> {
        let all = vec![
            Error::InvalidField {
                field: "customer_id",
                reason: "is required".into(),
            },
            Error::NotFound(Uuid::nil()),
            Error::RequestIdReused(Uuid::nil()),
            Error::IllegalMove {
                id: Uuid::nil(),
                from: PackageStatus::Delivered,
                to: PackageStatus::Pending,
            },
            Error::Storage(DbError::UniqueViolation {
                constraint: "package_requests_request_id_key".into(),
            }),
            Error::Storage(DbError::DiskFull {
                database: "inventory.db".into(),
                reason: "full".into(),
            }),
            Error::Storage(DbError::Closed),
            Error::Storage(DbError::Other {
                database: "inventory.db".into(),
                reason: "no such table".into(),
            }),
        ];
        for error in &all {
            match error {
                Error::InvalidField { .. }
                | Error::NotFound(_)
                | Error::RequestIdReused(_)
                | Error::IllegalMove { .. }
                | Error::Storage(_) => {}
            }
        }
        all
    }

    #[test]
    fn every_reason_inventory_emits_is_a_value_of_its_error_reason_enum() {
        for error in one_of_each() {
            let shown = format!("{error:?}");
            let status = Status::from(error);
            let reason = reason(&status).unwrap_or_else(|| panic!("{shown}: no ErrorInfo"));
            assert_eq!(domain(&status).as_deref(), Some(DOMAIN), "{shown}");
            let value = ErrorReason::from_str_name(&reason)
                .unwrap_or_else(|| panic!("{shown}: {reason} is not an inventory.v1.ErrorReason"));
            assert_ne!(value, ErrorReason::Unspecified, "{shown}");
        }
        for shared in reasons::SHARED {
            assert!(
                ErrorReason::from_str_name(shared).is_some(),
                "the runtime's {shared} is missing from inventory.v1.ErrorReason"
            );
        }
    }

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
