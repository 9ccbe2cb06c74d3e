//! The one mapping from the broker's errors to `tonic::Status`.

use tonic::Status;

use crate::dispatch::batcher::SubmitError;
use crate::store;

/// Errors of the gRPC handlers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; `field` names the field at fault (`jobs[2].queue`).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Invalid { field: field.into(), reason: reason.to_string() }
    }
}

fn store_status(error: &store::Error) -> Status {
    match error {
        store::Error::Unavailable(_) => Status::unavailable(error.to_string()),
        store::Error::Conflict(_) => Status::aborted(error.to_string()),
        store::Error::Rejected(_) => Status::invalid_argument(error.to_string()),
        store::Error::Migration(_) | store::Error::Database(_) => {
            tracing::error!(%error, "database error");
            Status::internal("internal database error")
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid { .. } => Status::invalid_argument(error.to_string()),
            Error::NotFound(message) => Status::not_found(message),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::ResourceExhausted(message) => Status::resource_exhausted(message),
            Error::Store(error) => store_status(&error),
            Error::Submit(SubmitError::Store(error)) => store_status(&error),
            Error::Submit(SubmitError::ShuttingDown) => Status::unavailable("the broker is shutting down"),
        }
    }
}
