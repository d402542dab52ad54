//! Every way an integration-service call can fail, and the one place each becomes a gRPC
//! status.

use mip_runtime::status::{invalid_field, storage};
use mip_runtime::store::DbError;
use tonic::Status;

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
        match error {
            Error::InvalidField { field, reason } => invalid_field(field, reason),
            Error::ShuttingDown => Status::unavailable(message),
            Error::PartitionCountChanged { .. } => Status::failed_precondition(message),
            Error::Storage(e) => storage(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

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
