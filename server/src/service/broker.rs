//! The `Broker` service.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use workbroker_api::v1;
use workbroker_api::v1::broker_server::Broker;

use super::error::Error;
use super::{SettleItem as _, Shared, convert, validate};
use crate::dispatch::listener::cancel_payload;
use crate::dispatch::{LeaseFilter, LeaseStream, StreamEvent};
use crate::store::{self, AckItem, CancelResult, ExtendItem, LEASES_CHANNEL, NackItem, ReleaseAttempt, SettleOutcome};
use crate::telemetry::{self, JobRef, JobStep};

/// Requests one Ack or Nack stream may have in the batchers at once.
const MAX_PIPELINED_SETTLES: usize = 1024;
/// Payload bytes after which a LeasedJobs message is cut.
const MAX_LEASED_JOBS_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct BrokerService {
    shared: Arc<Shared>,
}

impl BrokerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn outcome(outcome: SettleOutcome) -> i32 {
    match outcome {
        SettleOutcome::Ok => v1::Outcome::Ok as i32,
        SettleOutcome::StaleLease => v1::Outcome::StaleLease as i32,
        SettleOutcome::NotFound => v1::Outcome::NotFound as i32,
    }
}

fn outcome_message(outcome: SettleOutcome) -> String {
    match outcome {
        SettleOutcome::Ok => String::new(),
        SettleOutcome::StaleLease => "the lease token is not current or the job is no longer leased".to_owned(),
        SettleOutcome::NotFound => "no such job".to_owned(),
    }
}

/// Splits leased jobs into messages that stay well under the encoding limit.
fn leased_messages(jobs: Vec<store::JobRecord>) -> Vec<v1::LeaseResponse> {
    let mut messages = Vec::new();
    let mut current: Vec<v1::LeasedJob> = Vec::new();
    let mut current_bytes = 0;
    for job in jobs {
        let bytes = job.payload.len() + 512;
        if !current.is_empty() && current_bytes + bytes > MAX_LEASED_JOBS_MESSAGE_BYTES {
            messages.push(leased_message(std::mem::take(&mut current)));
            current_bytes = 0;
        }
        current_bytes += bytes;
        current.push(convert::leased_job(job));
    }
    if !current.is_empty() {
        messages.push(leased_message(current));
    }
    messages
}

fn leased_message(jobs: Vec<v1::LeasedJob>) -> v1::LeaseResponse {
    v1::LeaseResponse { response: Some(v1::lease_response::Response::Jobs(v1::LeasedJobs { jobs })) }
}

struct LeaseResponses {
    events: mpsc::UnboundedReceiver<StreamEvent>,
    end: Option<oneshot::Receiver<Option<Status>>>,
    pending: VecDeque<Result<v1::LeaseResponse, Status>>,
    finished: bool,
}

/// The outbound side of a Lease stream: dispatcher events, then (when the
/// inbound side ends badly) a final status.
fn lease_responses(
    events: mpsc::UnboundedReceiver<StreamEvent>,
    end: oneshot::Receiver<Option<Status>>,
) -> impl Stream<Item = Result<v1::LeaseResponse, Status>> {
    let state = LeaseResponses { events, end: Some(end), pending: VecDeque::new(), finished: false };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.pending.pop_front() {
                return Some((item, state));
            }
            if state.finished {
                return None;
            }
            let end = state.end.as_mut();
            tokio::select! {
                biased;
                event = state.events.recv() => match event {
                    Some(StreamEvent::Leased(jobs)) => state.pending.extend(leased_messages(jobs).into_iter().map(Ok)),
                    Some(StreamEvent::Cancelled { job_id, lease_token }) => {
                        state.pending.push_back(Ok(v1::LeaseResponse {
                            response: Some(v1::lease_response::Response::Cancelled(v1::CancelNotice {
                                job_id: job_id.to_string(),
                                lease_token: lease_token.to_string(),
                            })),
                        }));
                    }
                    Some(StreamEvent::Closing) => {
                        state.pending.push_back(Err(Status::unavailable("the broker is shutting down")));
                        state.finished = true;
                    }
                    None => {
                        // The stream's task ended: deliver the status it left, if any.
                        state.finished = true;
                        if let Some(end) = state.end.take()
                            && let Ok(Some(status)) = end.await
                        {
                            state.pending.push_back(Err(status));
                        }
                    }
                },
                ended = async { match end { Some(end) => end.await, None => std::future::pending().await } } => {
                    state.end = None;
                    state.finished = true;
                    if let Ok(Some(status)) = ended {
                        state.pending.push_back(Err(status));
                    }
                }
            }
        }
    })
}

/// Answers a stream of settle requests one by one, in order, with up to
/// [`MAX_PIPELINED_SETTLES`] of them in the batchers at once; a stream-level
/// error (the client's or the database's) ends the stream.
fn pipelined<Item, Answer, Handle, HandleFuture>(
    inbound: Streaming<Item>,
    shared: Arc<Shared>,
    handle: Handle,
) -> ResponseStream<Answer>
where
    Item: Send + 'static,
    Answer: Send + 'static,
    Handle: Fn(Arc<Shared>, Item) -> HandleFuture + Send + 'static,
    HandleFuture: Future<Output = Result<Answer, Status>> + Send + 'static,
{
    let responses = inbound
        .map(move |message| {
            let answer = message.map(|item| handle(shared.clone(), item));
            async move { answer?.await }
        })
        .buffered(MAX_PIPELINED_SETTLES);
    Box::pin(responses)
}

/// How a Lease stream ended, as far as its leftover leases are concerned.
struct StreamEnd {
    /// The status to end the stream with, if the client broke the protocol.
    status: Option<Status>,
    /// Whether leftover leases use up their attempts.
    attempt: ReleaseAttempt,
}

/// Reads credits and drain requests until the stream ends. Leftover leases
/// of a stream that drained before ending go back without using an attempt;
/// those of a stream that just stopped (or broke the protocol) count as
/// failed attempts, so a job that crashes its workers cannot loop forever.
async fn read_credits(mut inbound: Streaming<v1::LeaseRequest>, stream: &LeaseStream) -> StreamEnd {
    use v1::lease_request::Request as Item;
    let ended = |status: Option<Status>| {
        let attempt =
            if status.is_none() && stream.is_draining() { ReleaseAttempt::Refunded } else { ReleaseAttempt::Counted };
        StreamEnd { status, attempt }
    };
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            () = stream.outbound_closed() => return ended(None),
        };
        let request = match message {
            Ok(Some(request)) => request,
            Ok(None) | Err(_) => return ended(None),
        };
        match request.request {
            Some(Item::Credit(credit)) => {
                let result = validate::credit(&credit).and_then(|count| {
                    stream.add_credit(count).map_err(|error| Error::ResourceExhausted(format!("credit.count: {error}")))
                });
                if let Err(error) = result {
                    return ended(Some(error.into()));
                }
            }
            Some(Item::Drain(_)) => {
                tracing::info!(worker_id = %stream.filter().worker_id, held = stream.held(), "lease stream draining");
                stream.drain();
            }
            Some(Item::Open(_)) => {
                return ended(Some(Error::invalid("open", "may only be the first message").into()));
            }
            None => return ended(Some(Error::invalid("request", "must be open, credit or drain").into())),
        }
    }
}

impl BrokerService {
    async fn ack_one(shared: &Shared, request: v1::AckRequest) -> Result<v1::AckResponse, Status> {
        let checked =
            validate::lease_ref(None, &request.job_id, &request.lease_token).and_then(|(job_id, lease_token)| {
                if request.result.len() > shared.limits.max_payload_bytes {
                    return Err(Error::invalid(
                        "result",
                        format!("must be at most {} bytes", shared.limits.max_payload_bytes),
                    ));
                }
                Ok(AckItem { job_id, lease_token, result: request.result })
            });
        let item = match checked {
            Ok(item) => item,
            Err(error) => {
                return Ok(v1::AckResponse {
                    job_id: request.job_id,
                    outcome: v1::Outcome::Invalid as i32,
                    message: error.to_string(),
                });
            }
        };
        let job_id = item.job_id;
        let settled = if shared.dispatcher.ack_can_wait(&item.lease()) {
            shared.batchers.ack.submit_patient(item).await
        } else {
            shared.batchers.ack.submit(item).await
        }
        .map_err(Error::from)?;
        tracing::debug!(job_id, outcome = ?settled, "ack");
        Ok(v1::AckResponse { job_id: request.job_id, outcome: outcome(settled), message: outcome_message(settled) })
    }

    async fn nack_one(shared: &Shared, request: v1::NackRequest) -> Result<v1::NackResponse, Status> {
        let checked =
            validate::lease_ref(None, &request.job_id, &request.lease_token).and_then(|(job_id, lease_token)| {
                let retry_after = request
                    .retry_after
                    .as_ref()
                    .map(|delay| validate::duration_in("retry_after", delay, Duration::ZERO, validate::MAX_DELAY))
                    .transpose()?;
                Ok(NackItem {
                    job_id,
                    lease_token,
                    error: validate::truncate_error(&request.error),
                    retry_after,
                    permanent: request.permanent,
                })
            });
        let item = match checked {
            Ok(item) => item,
            Err(error) => {
                return Ok(v1::NackResponse {
                    job_id: request.job_id,
                    outcome: v1::Outcome::Invalid as i32,
                    message: error.to_string(),
                    next_state: v1::JobState::Unspecified as i32,
                });
            }
        };
        let job_id = item.job_id;
        let result = shared.batchers.nack.submit(item).await.map_err(Error::from)?;
        tracing::debug!(job_id, outcome = ?result.outcome, next_state = ?result.next_state, "nack");
        Ok(v1::NackResponse {
            job_id: request.job_id,
            outcome: outcome(result.outcome),
            message: outcome_message(result.outcome),
            next_state: result.next_state.map_or(0, i32::from),
        })
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn enqueue(&self, request: Request<v1::EnqueueRequest>) -> Result<Response<v1::EnqueueResponse>, Status> {
        let request = request.into_inner();
        // The jobs' spans, made after the enqueue, need each job's queue and
        // traceparent; the records take over the request's strings.
        let traced: Vec<(String, Option<String>)> = if telemetry::traces_enabled() {
            request
                .jobs
                .iter()
                .map(|job| (job.queue.clone(), job.attributes.get(telemetry::TRACEPARENT).cloned()))
                .collect()
        } else {
            Vec::new()
        };
        let jobs = validate::enqueue(request, self.shared.limits)?;
        let count = jobs.len();
        let mut queues: Vec<&str> = jobs.iter().map(|job| job.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        telemetry::record_publish(&tracing::Span::current(), &queues, count);
        let enqueued = self.shared.batchers.enqueue.submit(jobs).await.map_err(Error::from)?;
        tracing::debug!(jobs = count, "enqueued");
        telemetry::record_job_steps(
            JobStep::Create,
            traced.iter().zip(&enqueued).filter(|(_, record)| !record.deduplicated).map(
                |((queue, traceparent), record)| JobRef {
                    job_id: record.job_id,
                    queue,
                    traceparent: traceparent.as_deref(),
                },
            ),
        );
        Ok(Response::new(v1::EnqueueResponse {
            jobs: enqueued
                .into_iter()
                .map(|record| v1::EnqueuedJob {
                    job_id: record.job_id.to_string(),
                    deduplicated: record.deduplicated,
                    sequence: u64::try_from(record.sequence).unwrap_or(0),
                })
                .collect(),
        }))
    }

    type LeaseStream = ResponseStream<v1::LeaseResponse>;

    async fn lease(
        &self,
        request: Request<Streaming<v1::LeaseRequest>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::from(Error::invalid("open", "the stream ended before its first message")))?;
        let open = match first.request {
            Some(v1::lease_request::Request::Open(open)) => validate::open_lease(&open)?,
            _ => return Err(Error::invalid("open", "the first message must be open").into()),
        };
        tracing::info!(worker_id = %open.worker_id, queues = ?open.queues, max_in_flight = open.max_in_flight, "lease stream opened");
        let queues: Vec<&str> = open.queues.iter().map(String::as_str).collect();
        telemetry::record_receive(&tracing::Span::current(), &queues);
        let filter = LeaseFilter {
            worker_id: open.worker_id,
            queues: open.queues,
            kinds: open.kinds,
            lease_duration: open.lease_duration,
        };
        let dispatcher = self.shared.dispatcher.clone();
        let (stream, events) = dispatcher.open_stream(filter, open.max_in_flight);
        let (end_sender, end) = oneshot::channel();
        tokio::spawn(async move {
            let end = read_credits(inbound, &stream).await;
            let reason = match end.attempt {
                ReleaseAttempt::Counted => "lease released: worker stream closed",
                ReleaseAttempt::Refunded => "lease handed back: worker stream drained",
            };
            dispatcher.close_stream(&stream, reason, end.attempt).await;
            tracing::info!(worker_id = %stream.filter().worker_id, "lease stream closed");
            let _ = end_sender.send(end.status);
        });
        Ok(Response::new(Box::pin(lease_responses(events, end))))
    }

    type AckStream = ResponseStream<v1::AckResponse>;

    async fn ack(&self, request: Request<Streaming<v1::AckRequest>>) -> Result<Response<Self::AckStream>, Status> {
        Ok(Response::new(pipelined(request.into_inner(), self.shared.clone(), |shared, request| async move {
            BrokerService::ack_one(&shared, request).await
        })))
    }

    type NackStream = ResponseStream<v1::NackResponse>;

    async fn nack(&self, request: Request<Streaming<v1::NackRequest>>) -> Result<Response<Self::NackStream>, Status> {
        Ok(Response::new(pipelined(request.into_inner(), self.shared.clone(), |shared, request| async move {
            BrokerService::nack_one(&shared, request).await
        })))
    }

    async fn extend_lease(
        &self,
        request: Request<v1::ExtendLeaseRequest>,
    ) -> Result<Response<v1::ExtendLeaseResponse>, Status> {
        let request = request.into_inner();
        if request.leases.is_empty() || request.leases.len() > validate::MAX_JOBS_PER_ENQUEUE {
            return Err(Error::invalid("leases", "must have 1 to 1000 leases").into());
        }
        let mut items = Vec::with_capacity(request.leases.len());
        for (index, lease) in request.leases.iter().enumerate() {
            let extend_by = lease
                .extend_by
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("leases[{index}].extend_by"), "is required"))?;
            let (job_id, lease_token) =
                validate::lease_ref(Some(("leases", index)), &lease.job_id, &lease.lease_token)?;
            items.push(ExtendItem {
                job_id,
                lease_token,
                extend_by: validate::duration_in(
                    validate::Field::of_item("leases", index, "extend_by"),
                    extend_by,
                    validate::MIN_LEASE,
                    validate::MAX_LEASE,
                )?,
            });
        }
        let results = self.shared.store.jobs_extend_many(&items).await.map_err(Error::from)?;
        Ok(Response::new(v1::ExtendLeaseResponse {
            leases: request
                .leases
                .into_iter()
                .zip(results)
                .map(|(lease, result)| v1::ExtendedLease {
                    job_id: lease.job_id,
                    outcome: outcome(result.outcome),
                    lease_expires_at: result.lease_expires_at.map(convert::timestamp),
                })
                .collect(),
        }))
    }

    async fn get_job(&self, request: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let job_id = validate::job_id("job_id", &request.get_ref().job_id)?;
        let job = self
            .shared
            .store
            .job_get(job_id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("job {job_id} not found")))?;
        Ok(Response::new(convert::job(job)))
    }

    type WatchJobStream = ResponseStream<v1::Job>;

    async fn watch_job(&self, request: Request<v1::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = validate::job_id("job_id", &request.get_ref().job_id)?;
        let first = self
            .shared
            .store
            .job_get(job_id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("job {job_id} not found")))?;
        Ok(Response::new(Box::pin(watch(self.shared.clone(), job_id, first))))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        let job_id = validate::job_id("job_id", &request.get_ref().job_id)?;
        match self.shared.store.job_cancel(job_id).await.map_err(Error::from)? {
            CancelResult::Cancelled { job, held_lease } => {
                if let Some(lease_token) = held_lease
                    && !self.shared.dispatcher.lease_cancelled(job_id, lease_token)
                {
                    let payload = cancel_payload(job_id, lease_token);
                    if let Err(error) = self.shared.store.notify(LEASES_CHANNEL, &payload).await {
                        tracing::warn!(job_id, %error, "could not announce a cancel to other replicas");
                    }
                }
                self.shared.dispatcher.publish_changes([job_id]);
                tracing::info!(job_id, "job cancelled");
                Ok(Response::new(v1::CancelJobResponse { job: Some(convert::job(job)) }))
            }
            CancelResult::AlreadyTerminal(job) => {
                let state = v1::JobState::try_from(i32::from(job.state)).unwrap_or(v1::JobState::Unspecified);
                Err(Error::FailedPrecondition(format!("job {job_id} is already {}", state.as_str_name())).into())
            }
            CancelResult::NotFound => Err(Error::NotFound(format!("job {job_id} not found")).into()),
        }
    }
}

struct WatchState {
    shared: Arc<Shared>,
    job_id: i64,
    changes: tokio::sync::broadcast::Receiver<i64>,
    next: Option<store::JobRecord>,
    last: Option<v1::Job>,
    done: bool,
}

impl WatchState {
    /// How long to wait before re-reading: until a local change, the job's
    /// scheduled time, or the poll interval (for changes on other replicas).
    fn wait(&self) -> Duration {
        let mut wait = self.shared.watch_poll_interval;
        let scheduled_run_at =
            self.last.as_ref().filter(|job| job.state == v1::JobState::Scheduled as i32).and_then(|job| job.run_at);
        if let Some(run_at) = scheduled_run_at {
            let now = workbroker_api::time::timestamp_now();
            let until_micros = workbroker_api::time::timestamp_to_unix_micros(&run_at).unwrap_or(0)
                - workbroker_api::time::timestamp_to_unix_micros(&now).unwrap_or(0);
            let until = Duration::from_micros(u64::try_from(until_micros).unwrap_or(0));
            wait = wait.min(until + Duration::from_millis(2));
        }
        wait
    }

    async fn next_item(&mut self) -> Option<Result<v1::Job, Status>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(record) = self.next.take() {
                let terminal = store::state::is_terminal(record.state);
                let job = convert::job(record);
                if self.last.as_ref() != Some(&job) {
                    self.done = terminal;
                    self.last = Some(job.clone());
                    return Some(Ok(job));
                }
            }
            let deadline = tokio::time::Instant::now() + self.wait();
            loop {
                tokio::select! {
                    changed = self.changes.recv() => match changed {
                        Ok(changed_id) if changed_id != self.job_id => continue,
                        _ => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            match self.shared.store.job_get(self.job_id).await {
                Ok(Some(record)) => self.next = Some(record),
                Ok(None) => {
                    self.done = true;
                    return Some(Err(Error::NotFound(format!("job {} was pruned", self.job_id)).into()));
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(Error::from(error).into()));
                }
            }
        }
    }
}

/// The job's current state, then every change, until a terminal state.
fn watch(shared: Arc<Shared>, job_id: i64, first: store::JobRecord) -> impl Stream<Item = Result<v1::Job, Status>> {
    let changes = shared.dispatcher.subscribe_changes();
    let state = WatchState { shared, job_id, changes, next: Some(first), last: None, done: false };
    futures::stream::unfold(state, |mut state| async move {
        let item = state.next_item().await?;
        Some((item, state))
    })
}
