//! Every way a CRM call can fail, and the one place each becomes a gRPC status.

use mip_runtime::status::{invalid_field, storage, with_reason};
use mip_runtime::store::DbError;
use tonic::{Code, Status};
use uuid::Uuid;

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
            Error::NotFound(_) | Error::CreatedThenDeleted { .. } => Status::not_found(message),
            Error::EmailTaken(_) | Error::RequestIdReused(_) => Status::already_exists(message),
            Error::TokenAhead { .. } => Status::out_of_range(message),
            Error::TokenExpired { .. } => {
                with_reason(Code::FailedPrecondition, RESUME_TOKEN_EXPIRED, message)
            }
            Error::TokenUnknownLog | Error::LogDiverged { .. } => {
                with_reason(Code::FailedPrecondition, RESUME_TOKEN_UNKNOWN_LOG, message)
            }
            Error::WatchDisabled => Status::unimplemented(message),
            Error::TooManyWatchers(_) => Status::resource_exhausted(message),
            // A unique index refused a write that no domain check caught first (another process
            // won the race): the thing exists, which is what ALREADY_EXISTS says.
            Error::Storage(DbError::UniqueViolation { constraint }) => Status::already_exists(
                format!("a conflicting write committed first (unique constraint {constraint})"),
            ),
            Error::Storage(e) => storage(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unique_index_refusal_is_already_exists_not_internal() {
        let status = Status::from(Error::Storage(DbError::UniqueViolation {
            constraint: "customers_email_key_key".into(),
        }));
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    }
}
