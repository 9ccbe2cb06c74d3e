//! The store's error type, and the one place that maps sqlx errors onto it.

/// What can go wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database cannot be reached (connection refused, pool timeout, I/O).
    /// Retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A concurrent change got in the way (serialization failure, deadlock,
    /// unique race). Retryable.
    #[error("conflict with a concurrent change: {0}")]
    Conflict(String),
    /// The database refused a value (check constraint, out of range).
    #[error("rejected by the database: {0}")]
    Rejected(String),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Anything else the database said.
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        convert_sqlx_error(error)
    }
}

/// Maps a sqlx error to a domain error by kind and SQLSTATE.
fn convert_sqlx_error(error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Error::Unavailable(error.to_string()),
        sqlx::Error::Database(database_error) => {
            let code = database_error.code().unwrap_or_default();
            match code.as_ref() {
                // serialization_failure, deadlock_detected, unique_violation, lock_not_available
                "40001" | "40P01" | "23505" | "55P03" => Error::Conflict(database_error.message().to_owned()),
                // check_violation, numeric_value_out_of_range, invalid_datetime_format,
                // datetime_field_overflow, string_data_right_truncation, invalid_text_representation
                "23514" | "22003" | "22007" | "22008" | "22001" | "22P02" => {
                    Error::Rejected(database_error.message().to_owned())
                }
                // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
                // and the whole connection_exception class
                code if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300") => {
                    Error::Unavailable(database_error.message().to_owned())
                }
                _ => Error::Database(error),
            }
        }
        _ => Error::Database(error),
    }
}
