//! What a handler implements and returns.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::context::JobContext;

/// Does the work of one job kind.
///
/// ```
/// use workbroker_worker_sdk::{Handler, JobContext, JobError, Output};
///
/// struct Greeter;
///
/// impl Handler for Greeter {
///     async fn handle(&self, job: JobContext) -> Result<Output, JobError> {
///         let name = std::str::from_utf8(job.payload())
///             .map_err(|error| JobError::permanent(format!("payload is not UTF-8: {error}")))?;
///         Ok(Output::bytes(format!("hello, {name}")))
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Runs one job. `Ok` acks it (with the output as the job's result);
    /// `Err` nacks it as the [`JobError`] says. Watch
    /// [`JobContext::cancellation`]: it fires when the job was cancelled, its
    /// lease was lost, its timeout passed, or the worker's drain deadline
    /// passed.
    fn handle(&self, job: JobContext) -> impl Future<Output = Result<Output, JobError>> + Send;

    /// Longest a job of this kind may run before its cancellation token
    /// fires (and, after the worker's abandon grace, the job is nacked for
    /// retry). `None` uses the worker's default.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// What a successful job returns: bytes stored as the job's result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    result: Vec<u8>,
}

impl Output {
    /// No result.
    pub fn none() -> Self {
        Self::default()
    }

    /// Raw bytes as the result.
    pub fn bytes(result: impl Into<Vec<u8>>) -> Self {
        Self { result: result.into() }
    }

    /// A protobuf message as the result.
    pub fn message<M: prost::Message>(message: &M) -> Self {
        Self { result: message.encode_to_vec() }
    }

    /// The result bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.result
    }
}

impl From<()> for Output {
    fn from((): ()) -> Self {
        Self::none()
    }
}

/// Why a job failed, and what the broker should do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Try again: after `after`, or after the queue's exponential backoff
    /// when `None`. The job goes DEAD once its attempts are used up.
    #[error("{message}")]
    Retry {
        /// What went wrong (stored as the job's last error).
        message: String,
        /// Delay before the next attempt; `None` for the queue's backoff.
        after: Option<Duration>,
    },
    /// Do not try again: the job goes DEAD at once (a dead letter).
    #[error("{message}")]
    Permanent {
        /// What went wrong.
        message: String,
    },
}

impl JobError {
    /// Retry with the queue's backoff.
    pub fn retry(message: impl Into<String>) -> Self {
        Self::Retry { message: message.into(), after: None }
    }

    /// Retry after `after`.
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self::Retry { message: message.into(), after: Some(after) }
    }

    /// Never retry.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent { message: message.into() }
    }

    /// The error text.
    pub fn message(&self) -> &str {
        match self {
            Self::Retry { message, .. } | Self::Permanent { message } => message,
        }
    }

    /// True for [`JobError::Permanent`].
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent { .. })
    }
}

/// A handler made from an async closure; see [`handler_fn`].
pub struct HandlerFn<F> {
    function: F,
}

/// Wraps `Fn(JobContext) -> impl Future<Output = Result<Output, JobError>>`
/// as a [`Handler`].
///
/// ```
/// use workbroker_worker_sdk::{handler_fn, JobContext, Output};
///
/// let handler = handler_fn(|job: JobContext| async move {
///     tracing::info!(job_id = job.id(), "working");
///     Ok(Output::none())
/// });
/// # drop(handler);
/// ```
pub fn handler_fn<F, Fut>(function: F) -> HandlerFn<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output, JobError>> + Send + 'static,
{
    HandlerFn { function }
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output, JobError>> + Send + 'static,
{
    fn handle(&self, job: JobContext) -> impl Future<Output = Result<Output, JobError>> + Send {
        (self.function)(job)
    }
}

pub(crate) type BoxedJobFuture = Pin<Box<dyn Future<Output = Result<Output, JobError>> + Send>>;

/// Object-safe form of [`Handler`], so handlers of different types live in one map.
pub(crate) trait DynHandler: Send + Sync + 'static {
    fn handle_boxed(self: std::sync::Arc<Self>, job: JobContext) -> BoxedJobFuture;
    fn timeout(&self) -> Option<Duration>;
}

impl<H: Handler> DynHandler for H {
    fn handle_boxed(self: std::sync::Arc<Self>, job: JobContext) -> BoxedJobFuture {
        Box::pin(async move { self.handle(job).await })
    }

    fn timeout(&self) -> Option<Duration> {
        Handler::timeout(self)
    }
}
