//! Every way a CRM call can fail, and the one place each becomes a gRPC status.
//!
//! Each status carries a `google.rpc.ErrorInfo` in [`DOMAIN`] whose reason is a value of the
//! contract's `crm.v1.ErrorReason`, taken from the generated enum so that code and contract
//! cannot name different reasons.

use mip_proto::crm::v1::ErrorReason;
use mip_runtime::status::{invalid_field, shutting_down, storage, with_reason, with_retry};
use mip_runtime::store::DbError;
use tonic::{Code, Status};
use uuid::Uuid;

/// `ErrorInfo.domain` of every error CRM returns.
pub const DOMAIN: &str = "crm.mip.example.com";

/// `ErrorInfo.reason` of a resume token that retention has overtaken: relist, then watch.
pub const RESUME_TOKEN_EXPIRED: &str = "RESUME_TOKEN_EXPIRED";

/// `ErrorInfo.reason` of a resume token issued by another change log (a different database).
pub const RESUME_TOKEN_UNKNOWN_LOG: &str = "RESUME_TOKEN_UNKNOWN_LOG";

/// CRM errors.
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
    /// No customer has this id.
    #[error("customer {0} not found")]
    NotFound(Uuid),
    /// The update expected another version of the customer than the current one.
    #[error(
        "customer {id} is at version {current}, not version {expected}: it changed since it was read; read it again and retry the update with its current version"
    )]
    VersionMismatch {
        /// The customer.
        id: Uuid,
        /// The version the update was based on.
        expected: i64,
        /// The customer's version now.
        current: i64,
    },
    /// Another customer already has this email.
    #[error("a customer with email {0:?} already exists")]
    EmailTaken(String),
    /// The `request_id` was used before with other parameters.
    #[error(
        "request_id {0} was already used with different parameters; use a new request_id for a new request"
    )]
    RequestIdReused(Uuid),
    /// The `request_id` created a customer that has since been deleted.
    #[error("request_id {request_id} created customer {customer_id}, which has since been deleted")]
    CreatedThenDeleted {
        /// The repeated key.
        request_id: Uuid,
        /// The customer it created.
        customer_id: Uuid,
    },
    /// The resume token points past the newest event.
    #[error(
        "resume token is at position {position}, ahead of the change log (newest event {head}); was the CRM database restored from an older copy?"
    )]
    TokenAhead {
        /// The token's position.
        position: u64,
        /// The newest position.
        head: u64,
    },
    /// Retention deleted events the token still needs.
    #[error(
        "resume token is at position {position}, but events up to {pruned_through} have been deleted by retention; relist with ListCustomers and watch from its resume_token"
    )]
    TokenExpired {
        /// The token's position.
        position: u64,
        /// The highest deleted position.
        pruned_through: u64,
    },
    /// The token came from another database.
    #[error(
        "resume token was issued by a different CRM change log (was the database replaced?); relist with ListCustomers and watch from its resume_token"
    )]
    TokenUnknownLog,
    /// The database holds fewer events than this server has already handed out: it was
    /// restored from an older copy, or failed over to a replica that lost commits.
    #[error(
        "the CRM database lost events this server had already served (its newest event is {database_head}, this server had served up to {served_head}; was it restored or failed over?); this server has stopped serving, and tokens from it may name events that no longer exist: relist with ListCustomers and watch from its resume_token"
    )]
    LogDiverged {
        /// The newest position this server had served.
        served_head: u64,
        /// The newest position the database holds.
        database_head: u64,
    },
    /// Watching is switched off on this server.
    #[error("WatchCustomers is disabled on this server; poll with ListCustomerEvents instead")]
    WatchDisabled,
    /// The server has as many watchers as it accepts.
    #[error("too many watchers ({0} open); retry later or poll with ListCustomerEvents")]
    TooManyWatchers(usize),
    /// The server is shutting down; a watch ends with this.
    #[error("server is shutting down; resume from your last token")]
    ShuttingDown,
    /// The store cannot reach its database for now.
    #[error("CRM lost its database; retry, and resume from your last token")]
    DatabaseLost,
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
            Error::NotFound(_) => ErrorReason::CustomerNotFound,
            Error::CreatedThenDeleted { .. } => ErrorReason::RequestIdCustomerDeleted,
            Error::VersionMismatch { .. } => ErrorReason::VersionMismatch,
            Error::EmailTaken(_) => ErrorReason::EmailTaken,
            Error::RequestIdReused(_) => ErrorReason::RequestIdReused,
            Error::TokenAhead { .. } => ErrorReason::ResumeTokenAhead,
            Error::TokenExpired { .. } => ErrorReason::ResumeTokenExpired,
            // A log that lost served events is, to a client holding a token from it, another
            // log: the same relist recovers from both.
            Error::TokenUnknownLog | Error::LogDiverged { .. } => {
                ErrorReason::ResumeTokenUnknownLog
            }
            Error::WatchDisabled => ErrorReason::WatchDisabled,
            Error::TooManyWatchers(_) => ErrorReason::TooManyWatchers,
            Error::ShuttingDown => ErrorReason::ShuttingDown,
            Error::DatabaseLost => ErrorReason::StorageUnavailable,
            Error::Storage(DbError::UniqueViolation { .. }) => ErrorReason::WriteConflict,
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
            Error::NotFound(_) | Error::CreatedThenDeleted { .. } => {
                with_reason(Code::NotFound, DOMAIN, reason, message)
            }
            Error::VersionMismatch { .. } => with_reason(Code::Aborted, DOMAIN, reason, message),
            Error::EmailTaken(_) | Error::RequestIdReused(_) => {
                with_reason(Code::AlreadyExists, DOMAIN, reason, message)
            }
            Error::TokenAhead { .. } => with_reason(Code::OutOfRange, DOMAIN, reason, message),
            Error::TokenExpired { .. } | Error::TokenUnknownLog | Error::LogDiverged { .. } => {
                with_reason(Code::FailedPrecondition, DOMAIN, reason, message)
            }
            Error::WatchDisabled => with_reason(Code::Unimplemented, DOMAIN, reason, message),
            // Watch streams are long-lived, so a slot frees only when some client leaves: a
            // second keeps refused clients from spinning; their own backoff grows from it.
            Error::TooManyWatchers(_) => with_retry(
                Code::ResourceExhausted,
                DOMAIN,
                reason,
                message,
                WATCHER_RETRY_DELAY,
            ),
            Error::ShuttingDown => shutting_down(DOMAIN, message),
            // No RetryInfo: how long the database stays away is not the server's to know.
            Error::DatabaseLost => with_reason(Code::Unavailable, DOMAIN, reason, message),
            // A unique index refused a write that no domain check caught first (another process
            // won the race): the thing exists, which is what ALREADY_EXISTS says.
            Error::Storage(DbError::UniqueViolation { constraint }) => with_reason(
                Code::AlreadyExists,
                DOMAIN,
                reason,
                format!("a conflicting write committed first (unique constraint {constraint})"),
            ),
            Error::Storage(e) => storage(DOMAIN, &e),
        }
    }
}

/// How long a client refused for want of a watcher slot should wait before trying again.
pub const WATCHER_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    use mip_runtime::status::{domain, reason, reasons};

    /// One error of every kind. The match makes a new variant a compile error here until it is
    /// added to the list, so the test below covers every error CRM can return.
    fn one_of_each() -> Vec<Error> {
        let all = vec![
            Error::InvalidField {
                field: "name",
                reason: "must not be empty".into(),
            },
            Error::NotFound(Uuid::nil()),
            Error::CreatedThenDeleted {
                request_id: Uuid::nil(),
                customer_id: Uuid::nil(),
            },
            Error::VersionMismatch {
                id: Uuid::nil(),
                expected: 1,
                current: 2,
            },
            Error::EmailTaken("a@example.com".into()),
            Error::RequestIdReused(Uuid::nil()),
            Error::TokenAhead {
                position: 9,
                head: 1,
            },
            Error::TokenExpired {
                position: 1,
                pruned_through: 9,
            },
            Error::TokenUnknownLog,
            Error::LogDiverged {
                served_head: 9,
                database_head: 1,
            },
            Error::WatchDisabled,
            Error::TooManyWatchers(1),
            Error::ShuttingDown,
            Error::DatabaseLost,
            Error::Storage(DbError::UniqueViolation {
                constraint: "customers_email_key_key".into(),
            }),
            Error::Storage(DbError::DiskFull {
                database: "crm.db".into(),
                reason: "full".into(),
            }),
            Error::Storage(DbError::Closed),
            Error::Storage(DbError::Other {
                database: "crm.db".into(),
                reason: "no such table".into(),
            }),
        ];
        for error in &all {
            match error {
                Error::InvalidField { .. }
                | Error::NotFound(_)
                | Error::CreatedThenDeleted { .. }
                | Error::VersionMismatch { .. }
                | Error::EmailTaken(_)
                | Error::RequestIdReused(_)
                | Error::TokenAhead { .. }
                | Error::TokenExpired { .. }
                | Error::TokenUnknownLog
                | Error::LogDiverged { .. }
                | Error::WatchDisabled
                | Error::TooManyWatchers(_)
                | Error::ShuttingDown
                | Error::DatabaseLost
                | Error::Storage(_) => {}
            }
        }
        all
    }

    #[test]
    fn every_reason_crm_emits_is_a_value_of_its_error_reason_enum() {
        for error in one_of_each() {
            let shown = format!("{error:?}");
            let status = Status::from(error);
            let reason = reason(&status).unwrap_or_else(|| panic!("{shown}: no ErrorInfo"));
            assert_eq!(domain(&status).as_deref(), Some(DOMAIN), "{shown}");
            let value = ErrorReason::from_str_name(&reason)
                .unwrap_or_else(|| panic!("{shown}: {reason} is not a crm.v1.ErrorReason"));
            assert_ne!(value, ErrorReason::Unspecified, "{shown}");
        }
        for shared in reasons::SHARED {
            assert!(
                ErrorReason::from_str_name(shared).is_some(),
                "the runtime's {shared} is missing from crm.v1.ErrorReason"
            );
        }
        // Clients (the integration service among them) match on these two strings.
        assert_eq!(
            ErrorReason::ResumeTokenExpired.as_str_name(),
            RESUME_TOKEN_EXPIRED
        );
        assert_eq!(
            ErrorReason::ResumeTokenUnknownLog.as_str_name(),
            RESUME_TOKEN_UNKNOWN_LOG
        );
    }

    #[test]
    fn refusals_that_pass_say_how_long_to_wait() {
        for (error, delay) in [
            (Error::TooManyWatchers(1), WATCHER_RETRY_DELAY),
            (
                Error::ShuttingDown,
                mip_runtime::status::SHUTDOWN_RETRY_DELAY,
            ),
        ] {
            let status = Status::from(error);
            assert_eq!(
                mip_runtime::status::retry_delay(&status),
                Some(delay),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_unique_index_refusal_is_already_exists_not_internal() {
        let status = Status::from(Error::Storage(DbError::UniqueViolation {
            constraint: "customers_email_key_key".into(),
        }));
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    }
}
