//! What a handler sees of its job.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;
use workbroker_api::v1;

use super::handler::JobError;
use crate::trace::{TRACEPARENT, TraceParent};

/// Why a job's cancellation token fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// The job was cancelled (`CancelJob`); its result will not be recorded.
    Cancelled,
    /// The lease was lost (an extension answered stale, for example after
    /// the lease expired or the broker released it): another worker may run
    /// the job; this run's ack would be refused.
    LeaseLost,
    /// The job ran longer than its timeout.
    TimedOut,
    /// The worker is shutting down and the drain deadline passed.
    Shutdown,
}

/// The cancellation token of one job and the reason it fired.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cancellation {
    pub(crate) token: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
}

impl Cancellation {
    /// Fires the token; the first reason given wins.
    pub(crate) fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub(crate) fn reason(&self) -> Option<CancelReason> {
        self.reason.get().copied()
    }
}

/// One leased job, as handed to a [`Handler`](super::Handler).
#[derive(Debug)]
pub struct JobContext {
    pub(crate) job: v1::Job,
    pub(crate) lease_token: String,
    pub(crate) attempt: u32,
    pub(crate) cancellation: Cancellation,
    pub(crate) trace_parent: Option<TraceParent>,
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.job.job_id
    }

    /// The job's kind.
    pub fn kind(&self) -> &str {
        &self.job.kind
    }

    /// The job's queue.
    pub fn queue(&self) -> &str {
        &self.job.queue
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.job.payload
    }

    /// Decodes the payload as a protobuf message; a payload that does not
    /// decode is a [`JobError::Permanent`] (retrying cannot fix it).
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, JobError> {
        M::decode(self.job.payload.as_slice())
            .map_err(|error| JobError::permanent(format!("payload does not decode: {error}")))
    }

    /// The job's attributes.
    pub fn attributes(&self) -> &HashMap<String, String> {
        &self.job.attributes
    }

    /// This attempt's number (1 for the first lease).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts allowed before the job goes DEAD.
    pub fn max_attempts(&self) -> u32 {
        self.job.max_attempts
    }

    /// The ordering key, empty if none.
    pub fn ordering_key(&self) -> &str {
        &self.job.ordering_key
    }

    /// The lease token this run holds (for logs; the runtime settles the job).
    pub fn lease_token(&self) -> &str {
        &self.lease_token
    }

    /// The job as the broker sent it.
    pub fn job(&self) -> &v1::Job {
        &self.job
    }

    /// Fires when the job is cancelled, its lease is lost, it times out, or
    /// the worker's drain deadline passes. Stop work and return soon after.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation.token
    }

    /// True once the cancellation token fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.token.is_cancelled()
    }

    /// Why the token fired, if it did.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.cancellation.reason()
    }

    /// The producer's trace context from the `traceparent` attribute.
    pub fn trace_parent(&self) -> Option<&TraceParent> {
        self.trace_parent.as_ref()
    }

    pub(crate) fn new(leased: v1::Job, lease_token: String, attempt: u32) -> Self {
        let trace_parent = leased.attributes.get(TRACEPARENT).and_then(|value| TraceParent::parse(value));
        Self { job: leased, lease_token, attempt, cancellation: Cancellation::default(), trace_parent }
    }
}
