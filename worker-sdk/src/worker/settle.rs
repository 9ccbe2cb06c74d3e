//! Long-lived Ack and Nack streams with pipelining and resend.
//!
//! Requests are written to the open stream as soon as they are queued
//! (pipelined; HTTP/2 coalesces them into few frames) and kept until the
//! broker answers them, in order. When the stream fails, a new one is opened
//! after a backoff and every unanswered request is sent again: acks are
//! idempotent per token (a repeated ack answers OK); a repeated nack answers
//! STALE_LEASE, which is harmless.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::broker_client::BrokerClient;

use super::metrics::Counters;
use super::state::EndpointState;
use crate::backoff::Backoff;

/// Most requests taken from the queue in one go.
const BATCH: usize = 256;
/// An open stream with nothing to answer is closed after this long, so it
/// never keeps a connection to a draining broker alive; the next ack opens
/// a new one.
const IDLE_CLOSE: Duration = Duration::from_secs(1);

/// One queued ack or nack.
#[derive(Debug)]
pub(crate) struct SettleItem<R> {
    pub(crate) lease_token: String,
    pub(crate) request: R,
}

/// The Ack or the Nack RPC.
pub(crate) trait SettleRpc: Send + 'static {
    type Request: Clone + Send + Sync + std::fmt::Debug + 'static;
    type Response: Send + 'static;
    const NAME: &'static str;

    fn open(
        client: BrokerClient<Channel>,
        requests: UnboundedReceiverStream<Self::Request>,
    ) -> impl Future<Output = Result<Streaming<Self::Response>, tonic::Status>> + Send;

    /// (job id, outcome, message) of a response.
    fn outcome(response: &Self::Response) -> (&str, i32, &str);

    fn is_ack() -> bool;
}

/// Acks.
pub(crate) struct AckRpc;

impl SettleRpc for AckRpc {
    type Request = v1::AckRequest;
    type Response = v1::AckResponse;
    const NAME: &'static str = "ack";

    async fn open(
        mut client: BrokerClient<Channel>,
        requests: UnboundedReceiverStream<Self::Request>,
    ) -> Result<Streaming<Self::Response>, tonic::Status> {
        Ok(client.ack(requests).await?.into_inner())
    }

    fn outcome(response: &Self::Response) -> (&str, i32, &str) {
        (&response.job_id, response.outcome, &response.message)
    }

    fn is_ack() -> bool {
        true
    }
}

/// Nacks.
pub(crate) struct NackRpc;

impl SettleRpc for NackRpc {
    type Request = v1::NackRequest;
    type Response = v1::NackResponse;
    const NAME: &'static str = "nack";

    async fn open(
        mut client: BrokerClient<Channel>,
        requests: UnboundedReceiverStream<Self::Request>,
    ) -> Result<Streaming<Self::Response>, tonic::Status> {
        Ok(client.nack(requests).await?.into_inner())
    }

    fn outcome(response: &Self::Response) -> (&str, i32, &str) {
        (&response.job_id, response.outcome, &response.message)
    }

    fn is_ack() -> bool {
        false
    }
}

/// The settle loop of one RPC on one endpoint. Ends when its queue is
/// closed and everything was answered, or at once on `stop`.
pub(crate) struct Settler<K: SettleRpc> {
    state: Arc<EndpointState>,
    queue: mpsc::UnboundedReceiver<SettleItem<K::Request>>,
}

/// How one stream incarnation ended.
enum StreamEnd {
    Done,
    Idle,
    Stopped,
    Failed,
}

impl<K: SettleRpc> Settler<K> {
    pub(crate) fn new(state: Arc<EndpointState>, queue: mpsc::UnboundedReceiver<SettleItem<K::Request>>) -> Self {
        Self { state, queue }
    }

    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut pending: VecDeque<SettleItem<K::Request>> = VecDeque::new();
        let mut queue_closed = false;
        let mut backoff = Backoff::new(self.state.config.reconnect_backoff);
        loop {
            if queue_closed && pending.is_empty() {
                return;
            }
            if pending.is_empty() {
                // Open streams only when there is something to send.
                tokio::select! {
                    item = self.queue.recv() => match item {
                        Some(item) => pending.push_back(item),
                        None => {
                            tracing::debug!(endpoint = self.state.index, rpc = K::NAME, "settle queue closed");
                            return;
                        }
                    },
                    () = stop.cancelled() => return,
                }
            }
            match self.stream_once(&mut pending, &mut queue_closed, &mut backoff, &stop).await {
                StreamEnd::Done | StreamEnd::Stopped => {
                    tracing::debug!(endpoint = self.state.index, rpc = K::NAME, "settle stream finished");
                    return;
                }
                StreamEnd::Idle => continue,
                StreamEnd::Failed => {}
            }
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn stream_once(
        &mut self,
        pending: &mut VecDeque<SettleItem<K::Request>>,
        queue_closed: &mut bool,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> StreamEnd {
        let (sender, receiver) = mpsc::unbounded_channel();
        for item in pending.iter() {
            let _ = sender.send(item.request.clone());
        }
        let mut sender = Some(sender);
        if *queue_closed {
            sender = None;
        }
        let opened = tokio::select! {
            opened = K::open(self.state.broker(), UnboundedReceiverStream::new(receiver)) => opened,
            () = stop.cancelled() => return StreamEnd::Stopped,
        };
        let mut responses = match opened {
            Ok(responses) => responses,
            Err(status) => {
                tracing::warn!(endpoint = self.state.index, rpc = K::NAME, code = ?status.code(), message = status.message(), unanswered = pending.len(), "could not open the settle stream; retrying");
                return StreamEnd::Failed;
            }
        };
        let mut batch = Vec::with_capacity(BATCH);
        let mut last_activity = tokio::time::Instant::now();
        let idle = tokio::time::sleep(IDLE_CLOSE);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return StreamEnd::Stopped,
                () = &mut idle => {
                    let idle_until = last_activity + IDLE_CLOSE;
                    if pending.is_empty() && tokio::time::Instant::now() >= idle_until {
                        tracing::debug!(endpoint = self.state.index, rpc = K::NAME, "closing an idle settle stream");
                        return StreamEnd::Idle;
                    }
                    idle.as_mut().reset(idle_until.max(tokio::time::Instant::now() + IDLE_CLOSE / 4));
                }
                message = responses.message() => match message {
                    Ok(Some(response)) => {
                        backoff.reset();
                        last_activity = tokio::time::Instant::now();
                        let Some(item) = pending.pop_front() else {
                            tracing::warn!(rpc = K::NAME, "answer to a request never sent; reopening");
                            return StreamEnd::Failed;
                        };
                        self.answered(&item, &response);
                    }
                    Ok(None) => {
                        if pending.is_empty() && *queue_closed {
                            return StreamEnd::Done;
                        }
                        tracing::debug!(rpc = K::NAME, unanswered = pending.len(), "settle stream ended by the broker; reopening");
                        return StreamEnd::Failed;
                    }
                    Err(status) => {
                        tracing::warn!(endpoint = self.state.index, rpc = K::NAME, code = ?status.code(), message = status.message(), unanswered = pending.len(), "settle stream failed; resending what was not answered");
                        return StreamEnd::Failed;
                    }
                },
                count = self.queue.recv_many(&mut batch, BATCH), if !*queue_closed => {
                    if count == 0 {
                        *queue_closed = true;
                        // Ends the request stream: the broker answers what it
                        // has, then ends the response stream.
                        sender = None;
                        if pending.is_empty() {
                            return StreamEnd::Done;
                        }
                    }
                    last_activity = tokio::time::Instant::now();
                    for item in batch.drain(..) {
                        if let Some(sender) = &sender {
                            let _ = sender.send(item.request.clone());
                        }
                        pending.push_back(item);
                    }
                },
            }
        }
    }

    fn answered(&self, item: &SettleItem<K::Request>, response: &K::Response) {
        let (job_id, outcome, message) = K::outcome(response);
        let counters = self.state.counters();
        if outcome == v1::Outcome::Ok as i32 {
            Counters::add(if K::is_ack() { &counters.acks_ok } else { &counters.nacks_ok });
        } else {
            Counters::add(&counters.settles_refused);
            tracing::warn!(
                job_id,
                rpc = K::NAME,
                outcome = v1::Outcome::try_from(outcome).map_or("unknown", |outcome| outcome.as_str_name()),
                message,
                "broker refused the settle"
            );
        }
        self.state.on_settled(&item.lease_token);
    }
}
