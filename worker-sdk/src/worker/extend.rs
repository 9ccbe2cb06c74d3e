//! Automatic lease extension while jobs are held.
//!
//! A lease is extended when its local deadline (receipt time, or the time
//! the last extension was sent, plus the lease duration — a monotonic clock,
//! so the broker's clock does not matter) is within a third of the lease
//! duration. Failed calls are retried on the next tick, through
//! reconnections; a per-item STALE_LEASE or NOT_FOUND means the lease is lost
//! and fires the job's cancellation token.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use workbroker_api::v1;

use super::state::{DueLease, EndpointState};

/// Most leases one ExtendLease request carries.
const MAX_PER_REQUEST: usize = 1000;

/// The extension loop of one endpoint.
pub(crate) struct LeaseExtender {
    state: Arc<EndpointState>,
    /// Failed calls in a row; only the first of a run is logged as a warning.
    failures_in_a_row: std::sync::atomic::AtomicU32,
}

impl LeaseExtender {
    pub(crate) fn new(state: Arc<EndpointState>) -> Self {
        Self { state, failures_in_a_row: std::sync::atomic::AtomicU32::new(0) }
    }

    pub(crate) async fn run(self, stop: CancellationToken) {
        let lease = self.state.config.lease_duration;
        let tick = (lease / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let ahead = lease / 3;
        let call_timeout = (lease / 3).max(Duration::from_secs(1));
        // Set when a lease stream ended: every held lease is checked (and
        // extended) until one round of checks went through, so leases the
        // broker released are found even if it was unreachable for a while.
        let mut check_all = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = self.state.extend_now.notified() => check_all = true,
                () = stop.cancelled() => return,
            }
            let due = if check_all { self.state.take_all_for_check() } else { self.state.take_due_extensions(ahead) };
            let mut all_answered = true;
            for chunk in due.chunks(MAX_PER_REQUEST) {
                tokio::select! {
                    answered = self.extend(chunk, call_timeout) => all_answered &= answered,
                    () = stop.cancelled() => return,
                }
            }
            if all_answered {
                check_all = false;
            }
        }
    }

    /// Extends a batch of leases; false when the call itself failed.
    async fn extend(&self, leases: &[DueLease], call_timeout: Duration) -> bool {
        let extend_by = workbroker_api::time::duration_to_proto(self.state.config.lease_duration);
        let request = v1::ExtendLeaseRequest {
            leases: leases
                .iter()
                .map(|lease| v1::LeaseExtension {
                    job_id: lease.job_id.clone(),
                    lease_token: lease.lease_token.clone(),
                    extend_by: Some(extend_by),
                })
                .collect(),
        };
        let sent_at = Instant::now();
        let mut broker = self.state.broker();
        let result = tokio::time::timeout(call_timeout, broker.extend_lease(request)).await;
        let tokens = || leases.iter().map(|lease| lease.lease_token.clone()).collect::<Vec<_>>();
        match result {
            Ok(Ok(response)) => {
                let failed_before = self.failures_in_a_row.swap(0, Ordering::Relaxed);
                if failed_before > 0 {
                    tracing::info!(
                        endpoint = self.state.index,
                        failed_calls = failed_before,
                        "lease extension works again"
                    );
                }
                let response = response.into_inner();
                if response.leases.len() != leases.len() {
                    tracing::warn!(
                        asked = leases.len(),
                        answered = response.leases.len(),
                        "extension answer of the wrong length"
                    );
                    self.state.extension_failed(&tokens());
                    return false;
                }
                for (lease, answer) in leases.iter().zip(response.leases) {
                    self.state.extension_answered(&lease.lease_token, answer.outcome, sent_at);
                }
                true
            }
            Ok(Err(status)) => {
                if self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(endpoint = self.state.index, leases = leases.len(), code = ?status.code(), message = status.message(), "lease extension failed; retrying until it works");
                } else {
                    tracing::debug!(endpoint = self.state.index, code = ?status.code(), "lease extension failed again");
                }
                self.state.extension_failed(&tokens());
                false
            }
            Err(_) => {
                if self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        endpoint = self.state.index,
                        leases = leases.len(),
                        "lease extension timed out; retrying until it works"
                    );
                }
                self.state.extension_failed(&tokens());
                false
            }
        }
    }
}
