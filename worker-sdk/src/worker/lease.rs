//! The Lease stream of one endpoint, reopened with backoff when it fails.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use workbroker_api::v1;

use super::metrics::Counters;
use super::state::EndpointState;
use crate::backoff::Backoff;

/// Keeps one Lease stream open on an endpoint and feeds its jobs to the
/// runtime. See [`super::state`] for the window accounting.
pub(crate) struct LeaseLoop {
    state: Arc<EndpointState>,
}

impl LeaseLoop {
    pub(crate) fn new(state: Arc<EndpointState>) -> Self {
        Self { state }
    }

    /// Runs until `stop`; dropping the stream then makes the broker release
    /// whatever this endpoint still holds unacknowledged.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.state.config.reconnect_backoff);
        loop {
            if !self.wait_for_a_free_slot(&stop).await {
                return;
            }
            let (requests, receiver) = mpsc::unbounded_channel();
            let (generation, free) = self.state.begin_stream(requests.clone());
            let open = v1::OpenLease {
                worker_id: self.state.config.worker_id.clone(),
                queues: self.state.config.queues.clone(),
                kinds: self.state.handlers.keys().cloned().collect(),
                lease_duration: Some(workbroker_api::time::duration_to_proto(self.state.config.lease_duration)),
                max_in_flight: free.min(10_000),
            };
            let _ = requests.send(v1::LeaseRequest { request: Some(v1::lease_request::Request::Open(open)) });
            drop(requests);
            let mut broker = self.state.broker();
            let opened = tokio::select! {
                opened = broker.lease(UnboundedReceiverStream::new(receiver)) => opened,
                () = stop.cancelled() => {
                    self.state.end_stream(generation);
                    return;
                }
            };
            match opened {
                Err(status) => {
                    tracing::warn!(endpoint = self.state.index, code = ?status.code(), message = status.message(), "could not open the lease stream; retrying");
                }
                Ok(response) => {
                    Counters::add(&self.state.counters().lease_streams_opened);
                    tracing::info!(endpoint = self.state.index, generation, max_in_flight = free, "lease stream open");
                    backoff.reset();
                    let mut stream = response.into_inner();
                    loop {
                        let message = tokio::select! {
                            message = stream.message() => message,
                            () = stop.cancelled() => {
                                self.state.end_stream(generation);
                                return;
                            }
                        };
                        match message {
                            Ok(Some(v1::LeaseResponse {
                                response: Some(v1::lease_response::Response::Jobs(jobs)),
                            })) => {
                                for job in jobs.jobs {
                                    self.state.on_leased(job, generation);
                                }
                            }
                            Ok(Some(v1::LeaseResponse {
                                response: Some(v1::lease_response::Response::Cancelled(notice)),
                            })) => self.state.on_cancel_notice(&notice),
                            Ok(Some(v1::LeaseResponse { response: None })) => {}
                            Ok(None) => {
                                tracing::info!(
                                    endpoint = self.state.index,
                                    "lease stream ended by the broker; reconnecting"
                                );
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(endpoint = self.state.index, code = ?status.code(), message = status.message(), "lease stream failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
            self.state.end_stream(generation);
            // Leases the broker released when the stream ended show up as
            // stale at once, instead of at the next due extension.
            self.state.extend_now.notify_one();
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Waits until a slot is free and the worker is not draining; false on stop.
    async fn wait_for_a_free_slot(&self, stop: &CancellationToken) -> bool {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if stop.is_cancelled() {
                return false;
            }
            if !self.state.is_draining() && self.state.free_slots() > 0 {
                return true;
            }
            tokio::select! {
                () = changed => {}
                () = stop.cancelled() => return false,
            }
        }
    }
}
