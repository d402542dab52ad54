//! Every way an integration-service call can fail, and the one place each becomes a gRPC
//! status.
//!
//! Each status carries a `google.rpc.ErrorInfo` in [`DOMAIN`] whose reason is a value of the
//! contract's `integration.v1.ErrorReason`, taken from the generated enum so that code and
//! contract cannot name different reasons.

use mip_proto::integration::v1::ErrorReason;
use mip_runtime::status::{invalid_field, shutting_down, storage, with_reason};
use mip_runtime::store::DbError;
use tonic::{Code, Status};

/// `ErrorInfo.domain` of every error the integration service returns.
pub const DOMAIN: &str = "integration.mip.example.com";

/// Integration service errors.
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
    /// Shutdown began while the call was working; nothing was lost, and a retry against the
    /// restarted service finishes it.
    #[error("shutting down; retry later")]
    ShuttingDown,
    /// The store was set up for another partition count; changing it would move customers
    /// between partitions whose checkpoints say otherwise.
    #[error(
        "the integration store was set up with {recorded} partitions; refusing to start with \
         --partitions {requested} (the partition count cannot change once recorded)"
    )]
    PartitionCountChanged {
        /// The count recorded on first start.
        recorded: u32,
        /// The count this start asked for.
        requested: u32,
    },
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl Error {
    /// The contract's name for this error: the `ErrorInfo.reason` its status carries.
    pub fn reason(&self) -> ErrorReason {
        match self {
            Error::InvalidField { .. } => ErrorReason::InvalidField,
            Error::ShuttingDown => ErrorReason::ShuttingDown,
            Error::PartitionCountChanged { .. } => ErrorReason::PartitionCountChanged,
            Error::Storage(e) if e.is_disk_full() => ErrorReason::StorageFull,
            Error::Storage(e) if e.is_transient() => ErrorReason::StorageUnavailable,
            Error::Storage(_) => ErrorReason::StorageError,
        }
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::ShuttingDown => true,
            Error::Storage(e) => e.is_transient(),
            Error::InvalidField { .. } | Error::PartitionCountChanged { .. } => false,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(DbError::from(e))
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        let reason = error.reason().as_str_name();
        match error {
            Error::InvalidField { field, reason } => invalid_field(DOMAIN, field, reason),
            Error::ShuttingDown => shutting_down(DOMAIN, message),
            Error::PartitionCountChanged { .. } => {
                with_reason(Code::FailedPrecondition, DOMAIN, reason, message)
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
    /// added to the list, so the test below covers every error the service can return.
    fn one_of_each() -> Vec<Error> {
        let all = vec![
            Error::InvalidField {
                field: "event_ids",
                reason: "must not contain empty ids".into(),
            },
            Error::ShuttingDown,
            Error::PartitionCountChanged {
                recorded: 4,
                requested: 8,
            },
            Error::Storage(DbError::DiskFull {
                database: "integration.db".into(),
                reason: "full".into(),
            }),
            Error::Storage(DbError::Closed),
            Error::Storage(DbError::Other {
                database: "integration.db".into(),
                reason: "no such table".into(),
            }),
        ];
        for error in &all {
            match error {
                Error::InvalidField { .. }
                | Error::ShuttingDown
                | Error::PartitionCountChanged { .. }
                | Error::Storage(_) => {}
            }
        }
        all
    }

    #[test]
    fn every_reason_the_service_emits_is_a_value_of_its_error_reason_enum() {
        for error in one_of_each() {
            let shown = format!("{error:?}");
            let status = Status::from(error);
            let reason = reason(&status).unwrap_or_else(|| panic!("{shown}: no ErrorInfo"));
            assert_eq!(domain(&status).as_deref(), Some(DOMAIN), "{shown}");
            let value = ErrorReason::from_str_name(&reason).unwrap_or_else(|| {
                panic!("{shown}: {reason} is not an integration.v1.ErrorReason")
            });
            assert_ne!(value, ErrorReason::Unspecified, "{shown}");
        }
        for shared in reasons::SHARED {
            assert!(
                ErrorReason::from_str_name(shared).is_some(),
                "the runtime's {shared} is missing from integration.v1.ErrorReason"
            );
        }
        assert_eq!(
            mip_runtime::status::retry_delay(&Status::from(Error::ShuttingDown)),
            Some(mip_runtime::status::SHUTDOWN_RETRY_DELAY)
        );
    }

    #[test]
    fn each_error_maps_to_the_status_its_meaning_calls_for() {
        let invalid = Status::from(Error::InvalidField {
            field: "event_ids",
            reason: "must not contain empty ids".into(),
        });
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(
            mip_runtime::status::field_violations(&invalid),
            [(
                "event_ids".to_owned(),
                "must not contain empty ids".to_owned()
            )]
        );
        assert_eq!(Status::from(Error::ShuttingDown).code(), Code::Unavailable);
        let unavailable = DbError::Unavailable {
            database: "PostgreSQL at mip@127.0.0.1:5432/mip".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            Status::from(Error::Storage(unavailable)).code(),
            Code::Unavailable
        );
        let full = DbError::DiskFull {
            database: "integration.db".into(),
            reason: "database or disk is full".into(),
        };
        assert_eq!(
            Status::from(Error::Storage(full)).code(),
            Code::ResourceExhausted
        );
        let broken = DbError::Other {
            database: "integration.db".into(),
            reason: "no such table".into(),
        };
        assert_eq!(Status::from(Error::Storage(broken)).code(), Code::Internal);
    }
}
