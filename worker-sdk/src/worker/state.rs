//! The jobs one endpoint holds, and the slot accounting against the
//! broker's lease windows.
//!
//! # Windows, generations and credits
//!
//! Every Lease stream this endpoint opens gets a generation number and is
//! opened with `max_in_flight` = the slots free at that moment
//! (`capacity - outstanding`). A held job is *outstanding* (counts against
//! a broker window) from the moment it is leased until its handler finished
//! and its ack or nack was queued, or a cancel notice arrived.
//!
//! - A job of the current stream stops being outstanding when its settle is
//!   queued; the broker frees its slot in that stream when the ack or nack
//!   lands, so nothing else is needed.
//! - A job leased by an earlier stream (held across a reconnection: the
//!   broker crashed, its lease is still valid) was not part of the current
//!   stream's window. When it stops being outstanding, the runtime sends the
//!   current stream a `Credit { count: 1 }`, widening its window by the slot
//!   that just freed.
//!
//! So the jobs held at once never exceed the endpoint's capacity, and a
//! reconnection never hands a held job to this worker twice: jobs whose
//! lease survived are finished and acked under their original token.
//!
//! # Phases of a held job
//!
//! `Waiting` (leased, not started: waiting for a run permit, or arrived while
//! draining) → `Running` → `Settling` (ack or nack queued) → removed when the
//! broker answered it. Leases are extended in all three phases, so a job
//! whose ack cannot land yet (broker down) keeps its lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::broker_client::BrokerClient;

use super::WorkerConfig;
use super::context::{CancelReason, Cancellation, JobContext};
use super::handler::DynHandler;
use super::metrics::{Counters, WorkerMetrics};
use super::settle::SettleItem;

/// Where a held job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Waiting,
    Running,
    Settling,
}

#[derive(Debug)]
pub(crate) struct HeldJob {
    pub(crate) job_id: String,
    generation: u64,
    counted: bool,
    pub(crate) phase: Phase,
    pub(crate) cancellation: Cancellation,
    cancelled_by_notice: bool,
    lost: bool,
    /// Local (monotonic) time by which the lease must be extended.
    deadline: Instant,
    extending: bool,
    abort: Option<AbortHandle>,
}

#[derive(Debug)]
struct OpenStream {
    generation: u64,
    requests: mpsc::UnboundedSender<v1::LeaseRequest>,
}

/// Held jobs by lease token, and the newest lease token of each job id.
///
/// A job the broker leases again supersedes its older lease here; finding
/// that older lease is one look-up, where a scan of every held job per
/// leased job cost workers holding 500 jobs each about 1.5 µs a job (2 % of
/// the machine's CPU in a profiled drain).
#[derive(Debug, Default)]
struct HeldJobs {
    by_token: HashMap<String, HeldJob>,
    newest_lease: HashMap<String, String>,
}

impl HeldJobs {
    /// Holds `job` under `lease_token`; answers the hold it supersedes (the
    /// newest earlier lease of the same job, when still held).
    fn insert(&mut self, lease_token: String, job: HeldJob) -> Option<&mut HeldJob> {
        let previous = self.newest_lease.insert(job.job_id.clone(), lease_token.clone());
        self.by_token.insert(lease_token.clone(), job);
        previous.filter(|previous| *previous != lease_token).and_then(|previous| self.by_token.get_mut(&previous))
    }

    fn remove(&mut self, lease_token: &str) -> Option<HeldJob> {
        let job = self.by_token.remove(lease_token)?;
        if self.newest_lease.get(&job.job_id).is_some_and(|newest| newest == lease_token) {
            self.newest_lease.remove(&job.job_id);
        }
        Some(job)
    }

    fn get(&self, lease_token: &str) -> Option<&HeldJob> {
        self.by_token.get(lease_token)
    }

    fn get_mut(&mut self, lease_token: &str) -> Option<&mut HeldJob> {
        self.by_token.get_mut(lease_token)
    }

    fn values(&self) -> impl Iterator<Item = &HeldJob> {
        self.by_token.values()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut HeldJob)> {
        self.by_token.iter_mut()
    }
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HeldJobs,
    stream: Option<OpenStream>,
    next_generation: u64,
    acks: Option<mpsc::UnboundedSender<SettleItem<v1::AckRequest>>>,
    nacks: Option<mpsc::UnboundedSender<SettleItem<v1::NackRequest>>>,
}

/// How a finished job is settled.
#[derive(Debug)]
pub(crate) enum Settle {
    Ack(Vec<u8>),
    Nack { error: String, retry_after: Option<Duration>, permanent: bool },
}

/// A lease due for extension.
#[derive(Debug)]
pub(crate) struct DueLease {
    pub(crate) job_id: String,
    pub(crate) lease_token: String,
}

/// What [`EndpointState::new`] is made of.
pub(crate) struct EndpointParts {
    pub(crate) index: usize,
    pub(crate) capacity: u32,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) handlers: Arc<HashMap<String, Arc<dyn DynHandler>>>,
    pub(crate) channel: Channel,
    pub(crate) metrics: WorkerMetrics,
    pub(crate) job_tasks: TaskTracker,
    pub(crate) acks: mpsc::UnboundedSender<SettleItem<v1::AckRequest>>,
    pub(crate) nacks: mpsc::UnboundedSender<SettleItem<v1::NackRequest>>,
}

/// Everything one endpoint's loops and job tasks share.
pub(crate) struct EndpointState {
    pub(crate) index: usize,
    pub(crate) capacity: u32,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) handlers: Arc<HashMap<String, Arc<dyn DynHandler>>>,
    pub(crate) channel: Channel,
    pub(crate) metrics: WorkerMetrics,
    /// Running handlers never exceed `capacity`.
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    /// Signalled whenever a held job changes phase or goes away.
    pub(crate) changed: Notify,
    /// Asks the extender to look at once (after a lease stream ended).
    pub(crate) extend_now: Notify,
    pub(crate) job_tasks: TaskTracker,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for EndpointState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EndpointState")
            .field("index", &self.index)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl EndpointState {
    pub(crate) fn new(parts: EndpointParts) -> Self {
        let EndpointParts { index, capacity, config, handlers, channel, metrics, job_tasks, acks, nacks } = parts;
        Self {
            index,
            capacity,
            config,
            handlers,
            channel,
            metrics,
            permits: Arc::new(Semaphore::new(capacity as usize)),
            draining: AtomicBool::new(false),
            changed: Notify::new(),
            extend_now: Notify::new(),
            job_tasks,
            inner: Mutex::new(Inner { acks: Some(acks), nacks: Some(nacks), ..Inner::default() }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this module; the
        // data stays consistent enough to keep settling, so recover it.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.metrics.counters
    }

    pub(crate) fn broker(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel.clone())
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes)
    }

    pub(crate) fn permits_clone(&self) -> Arc<tokio::sync::Semaphore> {
        self.permits.clone()
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops starting jobs and asks the broker (`drain`) to send no more;
    /// what is held but not started goes back, without using an attempt,
    /// when the stream closes at the end of the drain.
    pub(crate) fn start_draining(&self) {
        {
            let inner = self.lock();
            self.draining.store(true, Ordering::Release);
            if let Some(stream) = &inner.stream {
                let _ = stream
                    .requests
                    .send(v1::LeaseRequest { request: Some(v1::lease_request::Request::Drain(v1::Drain {})) });
            }
        }
        self.changed.notify_waiters();
    }

    fn outstanding(inner: &Inner) -> u32 {
        let count = inner.jobs.values().filter(|job| job.counted).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Slots free for a new Lease stream.
    pub(crate) fn free_slots(&self) -> u32 {
        self.capacity.saturating_sub(Self::outstanding(&self.lock()))
    }

    /// Held jobs in each phase: (waiting, running, settling).
    pub(crate) fn phase_counts(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        let mut counts = (0, 0, 0);
        for job in inner.jobs.values() {
            match job.phase {
                Phase::Waiting => counts.0 += 1,
                Phase::Running => counts.1 += 1,
                Phase::Settling => counts.2 += 1,
            }
        }
        counts
    }

    /// Registers a new Lease stream; returns its generation and window.
    pub(crate) fn begin_stream(&self, requests: mpsc::UnboundedSender<v1::LeaseRequest>) -> (u64, u32) {
        let mut inner = self.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let free = self.capacity.saturating_sub(Self::outstanding(&inner));
        inner.stream = Some(OpenStream { generation, requests });
        (generation, free)
    }

    /// The stream of `generation` ended.
    pub(crate) fn end_stream(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.stream.as_ref().is_some_and(|stream| stream.generation == generation) {
            inner.stream = None;
        }
    }

    /// Stops counting a job against the windows, crediting the current
    /// stream when the job belonged to an earlier one.
    fn uncount(inner: &mut Inner, lease_token: &str, credit: bool) {
        let Some(job) = inner.jobs.get_mut(lease_token) else {
            return;
        };
        if !job.counted {
            return;
        }
        job.counted = false;
        let generation = job.generation;
        if credit
            && let Some(stream) = &inner.stream
            && stream.generation != generation
        {
            let _ = stream
                .requests
                .send(v1::LeaseRequest { request: Some(v1::lease_request::Request::Credit(v1::Credit { count: 1 })) });
        }
    }

    /// A job arrived on the stream of `generation`.
    pub(crate) fn on_leased(self: &Arc<Self>, leased: v1::LeasedJob, generation: u64) {
        Counters::add(&self.counters().leased);
        let Some(job) = leased.job else {
            tracing::warn!("leased job without a job body; ignored");
            return;
        };
        let attempt = if leased.attempt > 0 { leased.attempt } else { job.attempt };
        let context = JobContext::new(job, leased.lease_token, attempt);
        let held = HeldJob {
            job_id: context.job.job_id.clone(),
            generation,
            counted: true,
            phase: Phase::Waiting,
            cancellation: context.cancellation.clone(),
            cancelled_by_notice: false,
            lost: false,
            deadline: Instant::now() + self.config.lease_duration,
            extending: false,
            abort: None,
        };
        let draining = {
            let mut inner = self.lock();
            // The broker handed out this job again: an older lease of it
            // this worker still holds is gone (released or expired).
            if let Some(older) = inner.jobs.insert(context.lease_token.clone(), held)
                && !older.lost
            {
                older.lost = true;
                Counters::add(&self.counters().leases_lost);
                tracing::warn!(job_id = %older.job_id, "job leased again; cancelling the run under the old lease");
                older.cancellation.cancel(CancelReason::LeaseLost);
            }
            self.is_draining()
        };
        if draining {
            // Held unstarted; handed back when the drain ends.
            tracing::debug!(job_id = context.id(), "job arrived while draining; not started");
            return;
        }
        let handler = self.handlers.get(context.kind()).cloned();
        let state = self.clone();
        self.job_tasks.spawn(super::run::run_job(state, context, handler));
    }

    /// A cancel notice arrived: the broker freed the slot already.
    pub(crate) fn on_cancel_notice(&self, notice: &v1::CancelNotice) {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(&notice.lease_token) else {
            tracing::debug!(job_id = %notice.job_id, "cancel notice for a job no longer held");
            return;
        };
        tracing::info!(job_id = %notice.job_id, "job cancelled; stopping its handler");
        Counters::add(&self.counters().cancelled);
        job.cancelled_by_notice = true;
        job.counted = false;
        job.cancellation.cancel(CancelReason::Cancelled);
        if job.phase == Phase::Waiting && job.abort.is_none() && self.is_draining() {
            inner.jobs.remove(&notice.lease_token);
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Marks the job running unless the worker is draining (then it stays
    /// waiting and is handed back at the end of the drain).
    pub(crate) fn try_start(&self, lease_token: &str) -> bool {
        let mut inner = self.lock();
        if self.is_draining() {
            return false;
        }
        match inner.jobs.get_mut(lease_token) {
            Some(job) => {
                job.phase = Phase::Running;
                true
            }
            None => false,
        }
    }

    pub(crate) fn set_abort(&self, lease_token: &str, abort: AbortHandle) {
        if let Some(job) = self.lock().jobs.get_mut(lease_token) {
            job.abort = Some(abort);
        }
    }

    /// True when a cancel notice stopped this job (its result is dropped).
    pub(crate) fn cancelled_by_notice(&self, lease_token: &str) -> bool {
        self.lock().jobs.get(lease_token).is_some_and(|job| job.cancelled_by_notice)
    }

    /// The job's handler is done (or never ran): queue its settle, or drop
    /// it when it was cancelled by the broker.
    pub(crate) fn on_finished(&self, lease_token: &str, settle: Settle) {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(lease_token) else {
            return;
        };
        if job.cancelled_by_notice {
            inner.jobs.remove(lease_token);
            drop(inner);
            self.changed.notify_waiters();
            return;
        }
        job.phase = Phase::Settling;
        job.abort = None;
        let job_id = job.job_id.clone();
        Self::uncount(&mut inner, lease_token, true);
        let queued = match settle {
            Settle::Ack(result) => inner.acks.as_ref().is_some_and(|acks| {
                acks.send(SettleItem {
                    lease_token: lease_token.to_owned(),
                    request: v1::AckRequest { job_id, lease_token: lease_token.to_owned(), result },
                })
                .is_ok()
            }),
            Settle::Nack { error, retry_after, permanent } => inner.nacks.as_ref().is_some_and(|nacks| {
                nacks
                    .send(SettleItem {
                        lease_token: lease_token.to_owned(),
                        request: v1::NackRequest {
                            job_id,
                            lease_token: lease_token.to_owned(),
                            error,
                            retry_after: retry_after.map(workbroker_api::time::duration_to_proto),
                            permanent,
                        },
                    })
                    .is_ok()
            }),
        };
        if !queued {
            // The settlers are gone (hard stop): the lease is released when
            // the stream closes, or expires.
            inner.jobs.remove(lease_token);
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// The broker answered the job's ack or nack.
    pub(crate) fn on_settled(&self, lease_token: &str) {
        self.lock().jobs.remove(lease_token);
        self.changed.notify_waiters();
    }

    /// Fires the tokens of running jobs (the drain deadline passed).
    pub(crate) fn cancel_running(&self, reason: CancelReason) {
        for job in self.lock().jobs.values() {
            if job.phase == Phase::Running {
                job.cancellation.cancel(reason);
            }
        }
    }

    /// Aborts handlers still running; their tasks nack them.
    pub(crate) fn abort_running(&self) -> usize {
        let inner = self.lock();
        let mut aborted = 0;
        for job in inner.jobs.values() {
            if job.phase == Phase::Running
                && let Some(abort) = &job.abort
            {
                abort.abort();
                aborted += 1;
            }
        }
        aborted
    }

    /// Counts the jobs held but not started (handed back by closing the stream).
    pub(crate) fn count_released_at_shutdown(&self) {
        let waiting = self.lock().jobs.values().filter(|job| job.phase == Phase::Waiting).count();
        self.counters().released_at_shutdown.fetch_add(waiting as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes the settle queues: the settlers end once all is answered.
    pub(crate) fn close_settle_queues(&self) {
        let mut inner = self.lock();
        inner.acks = None;
        inner.nacks = None;
    }

    /// Leases due for extension (their local deadline is within `ahead`),
    /// marked as being extended.
    pub(crate) fn take_due_extensions(&self, ahead: Duration) -> Vec<DueLease> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut due = Vec::new();
        for (token, job) in inner.jobs.iter_mut() {
            if job.lost || job.cancelled_by_notice || job.extending {
                continue;
            }
            if job.deadline.saturating_duration_since(now) <= ahead {
                job.extending = true;
                due.push(DueLease { job_id: job.job_id.clone(), lease_token: token.clone() });
            }
        }
        due
    }

    /// Every lease held and not known lost (checked at once after a lease
    /// stream ended, to find leases the broker released).
    pub(crate) fn take_all_for_check(&self) -> Vec<DueLease> {
        self.take_due_extensions(Duration::MAX)
    }

    /// The broker answered an extension sent at `sent_at`.
    pub(crate) fn extension_answered(&self, lease_token: &str, outcome: i32, sent_at: Instant) {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(lease_token) else {
            return;
        };
        job.extending = false;
        if outcome == v1::Outcome::Ok as i32 {
            Counters::add(&self.counters().extensions_ok);
            job.deadline = sent_at + self.config.lease_duration;
            return;
        }
        if outcome == v1::Outcome::StaleLease as i32 || outcome == v1::Outcome::NotFound as i32 {
            if !job.lost {
                job.lost = true;
                Counters::add(&self.counters().leases_lost);
                tracing::warn!(job_id = %job.job_id, phase = ?job.phase, "lease lost; cancelling the job's handler");
                job.cancellation.cancel(CancelReason::LeaseLost);
            }
            if job.phase == Phase::Settling {
                // Its ack can no longer land; stop waiting for it.
                inner.jobs.remove(lease_token);
                drop(inner);
                self.changed.notify_waiters();
            }
            return;
        }
        tracing::warn!(job_id = %job.job_id, outcome, "lease extension refused as invalid");
    }

    /// An extension request failed as a whole; try again on the next tick.
    pub(crate) fn extension_failed(&self, lease_tokens: &[String]) {
        let mut inner = self.lock();
        for token in lease_tokens {
            if let Some(job) = inner.jobs.get_mut(token) {
                job.extending = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::BackoffConfig;

    fn state(capacity: u32) -> (Arc<EndpointState>, mpsc::UnboundedReceiver<SettleItem<v1::AckRequest>>) {
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let (nacks, _nack_queue) = mpsc::unbounded_channel();
        let config = WorkerConfig {
            worker_id: "test".to_owned(),
            queues: vec!["q".to_owned()],
            concurrency: capacity,
            lease_duration: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(1),
            abandon_grace: Duration::from_secs(1),
            flush_timeout: Duration::from_secs(1),
            job_timeout: None,
            reconnect_backoff: BackoffConfig::default(),
            max_message_bytes: 1024 * 1024,
        };
        let state = EndpointState::new(EndpointParts {
            index: 0,
            capacity,
            config: Arc::new(config),
            handlers: Arc::default(),
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
            metrics: WorkerMetrics::default(),
            job_tasks: TaskTracker::new(),
            acks,
            nacks,
        });
        // Draining: jobs are held without starting a task, which is all the
        // accounting needs.
        state.start_draining();
        (Arc::new(state), ack_queue)
    }

    fn leased(job_id: &str, token: &str) -> v1::LeasedJob {
        v1::LeasedJob {
            job: Some(v1::Job { job_id: job_id.to_owned(), ..Default::default() }),
            lease_token: token.to_owned(),
            lease_expires_at: None,
            attempt: 1,
        }
    }

    fn credits(receiver: &mut mpsc::UnboundedReceiver<v1::LeaseRequest>) -> u32 {
        let mut total = 0;
        while let Ok(request) = receiver.try_recv() {
            if let Some(v1::lease_request::Request::Credit(credit)) = request.request {
                total += credit.count;
            }
        }
        total
    }

    #[tokio::test]
    async fn a_reopened_stream_gets_the_free_slots_and_credits_as_old_jobs_finish() {
        let (state, mut acks) = state(3);
        let (first_requests, _first) = mpsc::unbounded_channel();
        assert_eq!(state.begin_stream(first_requests), (1, 3));
        state.on_leased(leased("1", "a"), 1);
        state.on_leased(leased("2", "b"), 1);
        assert_eq!(state.free_slots(), 1);

        // The broker went away; the jobs stay held. The new stream only
        // gets the one free slot.
        state.end_stream(1);
        let (second_requests, mut second) = mpsc::unbounded_channel();
        assert_eq!(state.begin_stream(second_requests), (2, 1));

        // An old job finishing widens the new stream by one credit.
        state.on_finished("a", Settle::Ack(b"done".to_vec()));
        assert_eq!(credits(&mut second), 1);
        assert_eq!(state.free_slots(), 2);
        let ack = acks.try_recv().expect("ack queued");
        assert_eq!((ack.request.job_id.as_str(), ack.request.lease_token.as_str()), ("1", "a"));
        // It stays held (and extended) until the broker answers the ack.
        assert_eq!(state.phase_counts(), (1, 0, 1));
        state.on_settled("a");
        assert_eq!(state.phase_counts(), (1, 0, 0));

        // A job of the current stream frees its slot through the ack itself.
        state.on_leased(leased("3", "c"), 2);
        state.on_finished("c", Settle::Ack(Vec::new()));
        assert_eq!(credits(&mut second), 0);

        // A cancel notice frees the slot on the broker side: no credit, no ack.
        state.on_cancel_notice(&v1::CancelNotice { job_id: "2".to_owned(), lease_token: "b".to_owned() });
        assert_eq!(credits(&mut second), 0);
        assert_eq!(state.free_slots(), 3);
        assert!(acks.try_recv().is_ok(), "the ack of c");
        assert!(acks.try_recv().is_err(), "nothing for the cancelled job");
    }

    #[tokio::test]
    async fn a_second_lease_of_a_held_job_marks_the_old_lease_lost() {
        let (state, _acks) = state(2);
        let (requests, _receiver) = mpsc::unbounded_channel();
        state.begin_stream(requests);
        state.on_leased(leased("7", "old"), 1);
        let old = state.lock().jobs.get("old").map(|job| job.cancellation.clone()).expect("held");
        state.on_leased(leased("7", "new"), 1);
        assert_eq!(old.reason(), Some(CancelReason::LeaseLost));
        assert!(old.token.is_cancelled());
        // Lost leases are no longer extended; the new one is.
        let due: Vec<String> = state.take_all_for_check().into_iter().map(|lease| lease.lease_token).collect();
        assert_eq!(due, vec!["new".to_owned()]);
    }

    #[tokio::test]
    async fn each_new_lease_of_a_job_supersedes_only_the_one_before_it() {
        let (state, _acks) = state(4);
        let (requests, _receiver) = mpsc::unbounded_channel();
        state.begin_stream(requests);
        let cancellation = |token: &str| state.lock().jobs.get(token).map(|job| job.cancellation.clone());
        state.on_leased(leased("7", "first"), 1);
        state.on_leased(leased("8", "other"), 1);
        state.on_leased(leased("7", "second"), 1);
        state.on_leased(leased("7", "third"), 1);
        for token in ["first", "second"] {
            assert_eq!(cancellation(token).and_then(|c| c.reason()), Some(CancelReason::LeaseLost), "{token}");
        }
        for token in ["third", "other"] {
            assert_eq!(cancellation(token).and_then(|c| c.reason()), None, "{token}");
        }
        assert_eq!(state.counters().leases_lost.load(Ordering::Relaxed), 2);

        // Once the newest lease is gone, the next one supersedes nothing
        // still running (the older ones are lost already).
        state.on_settled("third");
        state.on_leased(leased("7", "fourth"), 1);
        assert_eq!(state.counters().leases_lost.load(Ordering::Relaxed), 2);
        assert_eq!(cancellation("fourth").and_then(|c| c.reason()), None);
        state.on_settled("first");
        state.on_settled("second");
        let held: Vec<String> = state.take_all_for_check().into_iter().map(|lease| lease.lease_token).collect();
        assert_eq!(held.len(), 2, "{held:?}");
    }
}
