//! Running one job: permit, span, panic catching, timeout, settle.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::context::{CancelReason, JobContext};
use super::handler::{DynHandler, JobError, Output};
use super::metrics::Counters;
use super::state::{EndpointState, Settle};
use crate::trace::set_span_parent;

/// How a handler run ended.
enum Finished {
    Returned(Result<Output, JobError>),
    Panicked(String),
    /// Aborted by the runtime (drain deadline and grace passed).
    Aborted,
    /// Ignored its token after its timeout for the whole abandon grace.
    TimedOut(Duration),
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs one leased job to its settle. Spawned per job on the job tracker.
pub(crate) async fn run_job(state: Arc<EndpointState>, context: JobContext, handler: Option<Arc<dyn DynHandler>>) {
    let lease_token = context.lease_token.clone();
    let cancellation = context.cancellation.clone();

    let Some(handler) = handler else {
        tracing::warn!(job_id = context.id(), kind = context.kind(), "no handler for this kind");
        state.on_finished(
            &lease_token,
            Settle::Nack {
                error: format!("worker has no handler for kind {:?}", context.kind()),
                retry_after: None,
                permanent: false,
            },
        );
        return;
    };

    // Wait for a run permit, unless the job is cancelled or lost meanwhile.
    let permit = tokio::select! {
        permit = state.permits_clone().acquire_owned() => permit.ok(),
        () = cancellation.token.cancelled() => None,
    };
    let Some(permit) = permit else {
        state.on_finished(
            &lease_token,
            Settle::Nack {
                error: "lease lost before the job started".to_owned(),
                retry_after: Some(Duration::ZERO),
                permanent: false,
            },
        );
        return;
    };
    if !state.try_start(&lease_token) {
        // Draining: the job stays held unstarted and is handed back later.
        return;
    }

    let span = tracing::info_span!(
        "job",
        otel.name = %format!("job {}", context.kind()),
        job.id = %context.id(),
        job.kind = %context.kind(),
        job.queue = %context.queue(),
        job.attempt = context.attempt(),
        trace_id = tracing::field::Empty,
    );
    if let Some(parent) = context.trace_parent() {
        span.record("trace_id", parent.trace_id_hex());
        set_span_parent(&span, parent);
    }
    let timeout = handler.timeout().or(state.config.job_timeout);
    let mut task = tokio::spawn(handler.handle_boxed(context).instrument(span.clone()));
    state.set_abort(&lease_token, task.abort_handle());

    let joined = match timeout {
        None => Some((&mut task).await),
        Some(limit) => match tokio::time::timeout(limit, &mut task).await {
            Ok(joined) => Some(joined),
            Err(_) => {
                span.in_scope(|| tracing::warn!(timeout = ?limit, "job timed out; cancelling it"));
                cancellation.cancel(CancelReason::TimedOut);
                match tokio::time::timeout(state.config.abandon_grace, &mut task).await {
                    Ok(joined) => Some(joined),
                    Err(_) => {
                        task.abort();
                        None
                    }
                }
            }
        },
    };
    let finished = match joined {
        None => Finished::TimedOut(timeout.unwrap_or_default()),
        Some(Ok(result)) => Finished::Returned(result),
        Some(Err(error)) if error.is_panic() => Finished::Panicked(panic_message(&*error.into_panic())),
        Some(Err(_)) => Finished::Aborted,
    };
    drop(permit);

    let shutting_down = cancellation.reason() == Some(CancelReason::Shutdown);
    let counters = state.counters();
    let settle = match finished {
        Finished::Returned(Ok(output)) => {
            Counters::add(&counters.succeeded);
            Settle::Ack(output.into_bytes())
        }
        Finished::Returned(Err(JobError::Retry { message, after })) => {
            Counters::add(&counters.failed);
            span.in_scope(|| tracing::info!(error = %message, ?after, "job failed; will retry"));
            Settle::Nack {
                error: message,
                // Cut short at shutdown: another worker can take it at once.
                retry_after: if shutting_down && after.is_none() { Some(Duration::ZERO) } else { after },
                permanent: false,
            }
        }
        Finished::Returned(Err(JobError::Permanent { message })) => {
            Counters::add(&counters.failed);
            span.in_scope(|| tracing::warn!(error = %message, "job failed permanently"));
            Settle::Nack { error: message, retry_after: None, permanent: true }
        }
        Finished::Panicked(message) => {
            Counters::add(&counters.panicked);
            span.in_scope(|| tracing::error!(panic = %message, "handler panicked"));
            Settle::Nack { error: format!("handler panicked: {message}"), retry_after: None, permanent: false }
        }
        Finished::Aborted => {
            Counters::add(&counters.failed);
            span.in_scope(|| tracing::warn!("handler abandoned at shutdown"));
            Settle::Nack {
                error: "abandoned: the worker shut down before the handler finished".to_owned(),
                retry_after: Some(Duration::ZERO),
                permanent: false,
            }
        }
        Finished::TimedOut(limit) => {
            Counters::add(&counters.failed);
            Settle::Nack { error: format!("timed out after {limit:?}"), retry_after: None, permanent: false }
        }
    };
    if state.cancelled_by_notice(&lease_token) {
        span.in_scope(|| tracing::debug!("job was cancelled; its outcome is dropped"));
    }
    state.on_finished(&lease_token, settle);
}
