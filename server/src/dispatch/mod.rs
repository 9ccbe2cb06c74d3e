//! Dispatch: pushing jobs to lease streams, and group commit for everything
//! else on the hot path.
//!
//! # Lease streams, windows and slots
//!
//! Each `Lease` RPC registers a [`LeaseStream`] with a window of
//! `max_in_flight` plus credits. The stream's own task leases at most
//! `window - held` jobs in one statement and pushes them; it then sleeps until
//! something can change that: a slot frees (ack, nack, cancel), a credit
//! arrives, a queue it reads gets a notification (`LISTEN workbroker_jobs`,
//! sent by whichever replica enqueued), or the next scheduled job of its
//! queues falls due. No client ever polls.
//!
//! A slot frees when an ack or nack names a `(job, token)` the stream holds,
//! whatever the outcome, or when a held job is cancelled. Acks may arrive at
//! another replica than the one holding the stream: that replica announces
//! the tokens on `workbroker_leases` and the holder frees the slots.
//!
//! # Invariants
//!
//! - A stream never holds more than its window: slots are taken under the
//!   stream's lock before jobs are sent, and the lease statement never asks
//!   for more than the free slots.
//! - Dispatch state is only an optimisation: the database decides. When a
//!   stream ends, its held leases are released with a fenced statement; if
//!   that fails (database down) they simply expire.

pub mod announcer;
pub mod batcher;
mod handoff;
pub mod heartbeat;
pub mod listener;
mod presence;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admin::metrics::{JobEvent, Metrics};
use crate::store::ReturnedJob;
use crate::store::{self, HeldLease, JobRecord, LeaseParams, ReleaseAttempt, Store};
use crate::telemetry::{self, JobRef, JobStep};

/// Shards a replica dispatches first, as published by the cluster view
/// (`None`: no preference).
pub type OwnedShards = tokio::sync::watch::Receiver<Option<Arc<Vec<i32>>>>;

/// Largest number of jobs one lease statement asks for.
pub const MAX_LEASE_BATCH: u32 = 1000;
/// Largest window one stream may have.
pub const MAX_WINDOW: u32 = 100_000;
/// How often an idle stream looks for work even without a notification
/// (guards against notifications lost while the LISTEN connection was down).
const IDLE_RECHECK: Duration = Duration::from_secs(5);
/// Margin added to a scheduled job's due time before looking again.
const DUE_MARGIN: Duration = Duration::from_millis(2);

/// What a lease stream leases.
#[derive(Clone, Debug)]
pub struct LeaseFilter {
    pub worker_id: String,
    pub queues: Vec<String>,
    pub kinds: Vec<String>,
    pub lease_duration: Option<Duration>,
}

/// What the dispatcher sends down a lease stream.
#[derive(Debug)]
pub enum StreamEvent {
    /// Newly leased jobs.
    Leased(Vec<JobRecord>),
    /// A held job was cancelled; its slot is free.
    Cancelled { job_id: i64, lease_token: Uuid },
    /// The stream is being closed by the broker (shutdown).
    Closing,
}

type StreamId = u64;

#[derive(Debug, Default)]
struct StreamState {
    window: u32,
    held: HashMap<Uuid, i64>,
    /// Bumped by every notification for one of the stream's queues.
    work_epoch: u64,
    /// Set when a lease came back short: the epoch it saw. No more leasing
    /// until the epoch moves or the due timer fires.
    dry_at_epoch: Option<u64>,
    /// Slots promised to jobs being handed off by an enqueue in flight.
    reserved: u32,
    /// The worker asked for no more jobs.
    draining: bool,
    closed: bool,
}

impl StreamState {
    /// Slots neither held nor reserved.
    fn free(&self) -> u32 {
        self.window.saturating_sub(u32::try_from(self.held.len()).unwrap_or(u32::MAX)).saturating_sub(self.reserved)
    }
}

/// One registered `Lease` stream.
#[derive(Debug)]
pub struct LeaseStream {
    id: StreamId,
    filter: LeaseFilter,
    state: Mutex<StreamState>,
    wake: Notify,
    events: mpsc::UnboundedSender<StreamEvent>,
    stop: CancellationToken,
}

impl LeaseStream {
    fn state(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Widens the window. Errors when the window would exceed [`MAX_WINDOW`].
    pub fn add_credit(&self, count: u32) -> Result<(), WindowError> {
        {
            let mut state = self.state();
            let widened = state.window.checked_add(count).filter(|window| *window <= MAX_WINDOW);
            let Some(widened) = widened else {
                return Err(WindowError { limit: MAX_WINDOW });
            };
            state.window = widened;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// The worker asked for no more jobs: stop leasing for this stream; its
    /// leftover leases will be handed back without using an attempt.
    pub fn drain(&self) {
        self.state().draining = true;
        self.wake.notify_one();
    }

    /// Whether the worker asked for no more jobs.
    pub fn is_draining(&self) -> bool {
        self.state().draining
    }

    /// Number of jobs the stream holds now.
    pub fn held(&self) -> usize {
        self.state().held.len()
    }

    /// The stream's filter.
    pub fn filter(&self) -> &LeaseFilter {
        &self.filter
    }

    /// Resolves when the receiving side of the stream's events is gone
    /// (the client went away).
    pub async fn outbound_closed(&self) {
        self.events.closed().await;
    }
}

/// A credit would make the window larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("window would exceed {limit} jobs")]
pub struct WindowError {
    pub limit: u32,
}

#[derive(Debug, Default)]
struct Registry {
    streams: HashMap<StreamId, Arc<LeaseStream>>,
    by_queue: HashMap<String, HashSet<StreamId>>,
    /// Every lease held by a local stream, by token.
    leases: HashMap<Uuid, HeldLeaseEntry>,
    next_id: StreamId,
}

/// A lease held by a local stream.
#[derive(Debug)]
struct HeldLeaseEntry {
    stream: StreamId,
    /// The job has an ordering key: its settle may release the key's next job.
    keyed: bool,
    /// The job's queue and trace context, for the metrics and spans of its settle.
    info: LeaseInfo,
}

impl Registry {
    /// Records `jobs`, just leased to `stream` (whose state is `state`), as
    /// held by it.
    fn hold(&mut self, stream: StreamId, state: &mut StreamState, jobs: &[JobRecord]) {
        for job in jobs {
            if let Some(token) = job.lease_token {
                state.held.insert(token, job.id);
                let info = LeaseInfo {
                    job_id: job.id,
                    queue: Arc::from(job.queue.as_str()),
                    traceparent: traceparent_of(job).map(Arc::from),
                };
                self.leases.insert(token, HeldLeaseEntry { stream, keyed: job.ordering_key.is_some(), info });
            }
        }
    }

    /// Drops a lease from the registry.
    fn forget(&mut self, lease_token: &Uuid) {
        self.leases.remove(lease_token);
    }
}

/// What the dispatcher remembers of a lease it handed out, for the metrics
/// and spans of whatever settles it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub job_id: i64,
    pub queue: Arc<str>,
    /// The job's `traceparent` attribute.
    pub traceparent: Option<Arc<str>>,
}

/// The per-replica dispatcher. Shared by the services and the listener.
#[derive(Debug)]
pub struct Dispatcher {
    store: Store,
    /// Shards this replica dispatches first (`None`: no preference).
    owned_shards: Mutex<Option<OwnedShards>>,
    registry: Mutex<Registry>,
    changes: broadcast::Sender<i64>,
    leasing: CancellationToken,
    metrics: Arc<Metrics>,
    /// Queues with new waiting jobs, for the [`announcer::Announcer`] to
    /// tell the other replicas.
    announcements: Arc<announcer::Announcements>,
}

/// Per-stream summary for status and logs.
#[derive(Clone, Debug)]
pub struct StreamSummary {
    pub worker_id: String,
    pub queues: Vec<String>,
    pub window: u32,
    pub held: usize,
}

impl Dispatcher {
    pub fn new(store: Store) -> Arc<Self> {
        Self::with_metrics(store, Metrics::new())
    }

    /// A dispatcher that counts leases and releases into `metrics`.
    pub fn with_metrics(store: Store, metrics: Arc<Metrics>) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        Arc::new(Self {
            store,
            owned_shards: Mutex::new(None),
            registry: Mutex::new(Registry::default()),
            changes,
            leasing: CancellationToken::new(),
            metrics,
            announcements: Arc::default(),
        })
    }

    /// The loop that tells other replicas about jobs enqueued here; the
    /// broker runs exactly one per dispatcher.
    pub fn announcer(&self) -> announcer::Announcer {
        announcer::Announcer::new(self.store.clone(), self.announcements.clone())
    }

    /// The loop that sends this replica's heartbeat (see [`heartbeat`]).
    pub fn heartbeat(&self) -> heartbeat::Heartbeat {
        heartbeat::Heartbeat::new(self.store.clone(), self.announcements.clone())
    }

    /// Queue and trace context of held leases (`None` for leases no local
    /// stream holds). Call before the settle frees them.
    pub fn lease_infos(&self, leases: &[HeldLease]) -> Vec<Option<LeaseInfo>> {
        let registry = self.registry();
        leases
            .iter()
            .map(|lease| {
                registry
                    .leases
                    .get(&lease.lease_token)
                    .map(|entry| &entry.info)
                    .filter(|info| info.job_id == lease.job_id)
                    .cloned()
            })
            .collect()
    }

    /// Whether an ack of `lease` may wait a little for other acks to share
    /// its statement because no other job waits on it: its job has no
    /// ordering key (whose next job the ack would release), and the local
    /// stream holding it is waiting for work (its last lease came back short
    /// and nothing was announced since) with free slots besides, so no job
    /// waits for its slot. Not while the replica stops leasing, nor for a
    /// draining stream. The caller of `Ack` and watchers of the job still
    /// wait the linger.
    pub fn ack_can_wait(&self, lease: &HeldLease) -> bool {
        if self.leasing.is_cancelled() {
            return false;
        }
        let registry = self.registry();
        let Some(entry) = registry.leases.get(&lease.lease_token) else {
            return false;
        };
        if entry.keyed || entry.info.job_id != lease.job_id {
            return false;
        }
        registry.streams.get(&entry.stream).is_some_and(|stream| {
            let state = stream.state();
            !state.closed && !state.draining && state.dry_at_epoch == Some(state.work_epoch) && state.free() > 0
        })
    }

    /// Counts and traces jobs handed back by a release.
    fn record_released(&self, returned: &[ReturnedJob]) {
        self.metrics.add_by_queue(JobEvent::Released, returned.iter().map(|job| job.queue.as_str()));
        self.metrics.add_by_queue(JobEvent::Dead, returned.iter().filter(|job| job.dead).map(|job| job.queue.as_str()));
        telemetry::record_job_steps(
            JobStep::Release,
            returned.iter().map(|job| JobRef {
                job_id: job.id,
                queue: &job.queue,
                traceparent: job.traceparent.as_deref(),
            }),
        );
    }

    /// Counts and traces freshly leased jobs, with their enqueue-to-lease latency.
    fn record_leased(&self, jobs: &[JobRecord]) {
        let now = chrono::Utc::now();
        let mut by_queue: Vec<(&str, Vec<&JobRecord>)> = Vec::new();
        for job in jobs {
            match by_queue.iter_mut().find(|(queue, _)| *queue == job.queue) {
                Some((_, queue_jobs)) => queue_jobs.push(job),
                None => by_queue.push((job.queue.as_str(), vec![job])),
            }
        }
        for (queue, queue_jobs) in by_queue {
            let counters = self.metrics.queue(queue);
            counters.add(JobEvent::Leased, queue_jobs.len() as u64);
            for job in queue_jobs {
                counters.lease_latency.observe((now - job.run_at).to_std().unwrap_or_default());
            }
        }
        telemetry::record_job_steps(
            JobStep::Lease,
            jobs.iter().map(|job| JobRef { job_id: job.id, queue: &job.queue, traceparent: traceparent_of(job) }),
        );
    }

    /// Dispatches first from the shards this receiver names (the cluster
    /// view's ownership), and from other shards only when those are empty.
    pub fn follow_owned_shards(&self, owned: OwnedShards) {
        *self.owned_shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(owned);
    }

    fn owned_shards(&self) -> Option<Arc<Vec<i32>>> {
        let guard = self.owned_shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.as_ref().and_then(|receiver| receiver.borrow().clone()).filter(|owned| !owned.is_empty())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a stream and starts its lease task. Events arrive on the
    /// returned receiver; the stream ends when `close_stream` is called.
    pub fn open_stream(
        self: &Arc<Self>,
        filter: LeaseFilter,
        window: u32,
    ) -> (Arc<LeaseStream>, mpsc::UnboundedReceiver<StreamEvent>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let stream = {
            let mut registry = self.registry();
            registry.next_id += 1;
            let id = registry.next_id;
            let stream = Arc::new(LeaseStream {
                id,
                filter,
                state: Mutex::new(StreamState { window, ..StreamState::default() }),
                wake: Notify::new(),
                events,
                stop: CancellationToken::new(),
            });
            for queue in &stream.filter.queues {
                registry.by_queue.entry(queue.clone()).or_default().insert(id);
            }
            registry.streams.insert(id, stream.clone());
            stream
        };
        tracing::debug!(stream = stream.id, worker_id = %stream.filter.worker_id, queues = ?stream.filter.queues, window, "lease stream opened");
        tokio::spawn(self.clone().lease_loop(stream.clone()));
        (stream, receiver)
    }

    /// Unregisters a stream and releases every lease it still holds; whether
    /// that uses up the leases' attempts is `attempt`.
    pub async fn close_stream(&self, stream: &LeaseStream, reason: &str, attempt: ReleaseAttempt) {
        stream.stop.cancel();
        let held: Vec<HeldLease> = {
            let mut registry = self.registry();
            registry.streams.remove(&stream.id);
            for queue in &stream.filter.queues {
                if let Some(ids) = registry.by_queue.get_mut(queue) {
                    ids.remove(&stream.id);
                    if ids.is_empty() {
                        registry.by_queue.remove(queue);
                    }
                }
            }
            let mut state = stream.state();
            state.closed = true;
            let held: Vec<HeldLease> =
                state.held.drain().map(|(lease_token, job_id)| HeldLease { job_id, lease_token }).collect();
            for lease in &held {
                registry.forget(&lease.lease_token);
            }
            held
        };
        if held.is_empty() {
            return;
        }
        match self.store.jobs_release_many(&held, reason, attempt).await {
            Ok(returned) => {
                let dead = returned.iter().filter(|job| job.dead).count();
                tracing::info!(worker_id = %stream.filter.worker_id, requeued = returned.len() - dead, dead, "released leases of a closed stream");
                self.record_released(&returned);
                self.publish_changes(held.iter().map(|lease| lease.job_id));
            }
            Err(error) => {
                tracing::warn!(worker_id = %stream.filter.worker_id, leases = held.len(), %error, "could not release leases; they will expire");
            }
        }
    }

    /// A notification said `queue` may have work: wake its streams.
    pub fn queue_has_work(&self, queue: &str) {
        let streams: Vec<Arc<LeaseStream>> = {
            let registry = self.registry();
            registry
                .by_queue
                .get(queue)
                .map(|ids| ids.iter().filter_map(|id| registry.streams.get(id).cloned()).collect())
                .unwrap_or_default()
        };
        for stream in streams {
            stream.state().work_epoch += 1;
            stream.wake.notify_one();
        }
    }

    /// A committed statement of this replica made jobs of these queues
    /// available: wake this replica's streams now, and have the other
    /// replicas told (the listener skips the echo of that announcement).
    pub fn queues_have_work<Queue: AsRef<str>>(&self, queues: &[Queue]) {
        if queues.is_empty() {
            return;
        }
        for queue in queues {
            self.queue_has_work(queue.as_ref());
        }
        self.announcements.announce(queues.iter().map(AsRef::as_ref));
    }

    /// The LISTEN connection (re)connected: notifications may have been
    /// lost, so every stream looks for work, and this replica announces
    /// every new job until it has listened long enough to know who else
    /// listens.
    pub fn listening_started(&self) {
        self.wake_all();
        self.announcements.listening_started();
    }

    /// The LISTEN connection is gone.
    pub fn listening_stopped(&self) {
        self.announcements.listening_stopped();
    }

    /// The listener heard the replica with notification origin `origin`
    /// (`own`: this replica), by its heartbeat or a job announcement.
    pub fn heard_replica(&self, origin: &str, own: bool) {
        self.announcements.heard(origin, own);
    }

    /// Wakes every stream to look for work (after notifications may have been lost).
    pub fn wake_all(&self) {
        let streams: Vec<Arc<LeaseStream>> = self.registry().streams.values().cloned().collect();
        for stream in streams {
            stream.state().work_epoch += 1;
            stream.wake.notify_one();
        }
    }

    /// Acks or nacks named these leases: free the slots of local streams that
    /// hold them. Returns the leases no local stream holds.
    pub fn leases_settled(&self, leases: &[HeldLease]) -> Vec<HeldLease> {
        let mut foreign = Vec::new();
        let mut woken: Vec<Arc<LeaseStream>> = Vec::new();
        {
            let mut registry = self.registry();
            for lease in leases {
                let Some(stream_id) = registry.leases.get(&lease.lease_token).map(|entry| entry.stream) else {
                    foreign.push(*lease);
                    continue;
                };
                let Some(stream) = registry.streams.get(&stream_id).cloned() else {
                    registry.forget(&lease.lease_token);
                    continue;
                };
                let mut state = stream.state();
                if state.held.get(&lease.lease_token) == Some(&lease.job_id) {
                    state.held.remove(&lease.lease_token);
                    drop(state);
                    registry.forget(&lease.lease_token);
                    woken.push(stream);
                } else {
                    drop(state);
                    foreign.push(*lease);
                }
            }
        }
        for stream in woken {
            stream.wake.notify_one();
        }
        foreign
    }

    /// A job was cancelled while leased: if a local stream holds that lease,
    /// tell it and free the slot. Returns whether a local stream held it.
    pub fn lease_cancelled(&self, job_id: i64, lease_token: Uuid) -> bool {
        let stream = {
            let mut registry = self.registry();
            let Some(stream_id) = registry.leases.get(&lease_token).map(|entry| entry.stream) else {
                return false;
            };
            let Some(stream) = registry.streams.get(&stream_id).cloned() else {
                return false;
            };
            let mut state = stream.state();
            if state.held.remove(&lease_token).is_none() {
                return false;
            }
            drop(state);
            registry.forget(&lease_token);
            stream
        };
        let _ = stream.events.send(StreamEvent::Cancelled { job_id, lease_token });
        stream.wake.notify_one();
        true
    }

    /// Subscribes to ids of jobs this replica changed (for WatchJob).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<i64> {
        self.changes.subscribe()
    }

    /// Announces jobs this replica changed, if anyone is watching.
    pub fn publish_changes(&self, job_ids: impl IntoIterator<Item = i64>) {
        if self.changes.receiver_count() == 0 {
            return;
        }
        for job_id in job_ids {
            let _ = self.changes.send(job_id);
        }
    }

    /// Streams, for status pages and logs.
    pub fn streams(&self) -> Vec<StreamSummary> {
        self.registry()
            .streams
            .values()
            .map(|stream| {
                let state = stream.state();
                StreamSummary {
                    worker_id: stream.filter.worker_id.clone(),
                    queues: stream.filter.queues.clone(),
                    window: state.window,
                    held: state.held.len(),
                }
            })
            .collect()
    }

    /// Leases held by local streams.
    pub fn held_leases(&self) -> usize {
        self.registry().leases.len()
    }

    /// Stops handing out new jobs (shutdown, first step).
    pub fn stop_leasing(&self) {
        self.leasing.cancel();
    }

    /// Waits until no local stream holds a lease, or `deadline`.
    pub async fn wait_drained(&self, deadline: Instant) {
        while self.held_leases() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every stream (releasing what it holds) and tells clients why.
    pub async fn close_all(&self, reason: &str) {
        let streams: Vec<Arc<LeaseStream>> = self.registry().streams.values().cloned().collect();
        for stream in streams {
            let _ = stream.events.send(StreamEvent::Closing);
            self.close_stream(&stream, reason, ReleaseAttempt::Refunded).await;
        }
    }

    /// The task behind one stream: lease while there are free slots and
    /// maybe work, then sleep until something changes.
    async fn lease_loop(self: Arc<Self>, stream: Arc<LeaseStream>) {
        let mut due_at: Option<Instant> = None;
        // When a dry stream looks again without a notification: set when it
        // starts waiting, kept across wake-ups that bring no news of work
        // (acks, credits), so that those cannot put the re-check off.
        let mut recheck_at: Option<Instant> = None;
        let mut error_backoff = Duration::from_millis(100);
        loop {
            if stream.stop.is_cancelled() || self.leasing.is_cancelled() {
                return;
            }
            let (free, epoch) = {
                let mut state = stream.state();
                if due_at.is_some_and(|due| Instant::now() >= due) {
                    state.dry_at_epoch = None;
                    due_at = None;
                }
                let dry = state.dry_at_epoch == Some(state.work_epoch) || state.draining;
                (if dry { 0 } else { state.free() }, state.work_epoch)
            };
            if free > 0 {
                recheck_at = None;
                let limit = free.min(MAX_LEASE_BATCH);
                match self.lease_into(&stream, limit).await {
                    Ok(leased) => {
                        error_backoff = Duration::from_millis(100);
                        if leased < limit {
                            stream.state().dry_at_epoch = Some(epoch);
                            due_at = self.next_due(&stream).await;
                        }
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(worker_id = %stream.filter.worker_id, %error, "lease failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(error_backoff) => {}
                            () = stream.stop.cancelled() => return,
                            () = self.leasing.cancelled() => return,
                        }
                        error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            // The idle re-check also bounds the wait for a far-off due time.
            let recheck = *recheck_at.get_or_insert_with(|| Instant::now() + IDLE_RECHECK);
            let wake_at = due_at.map_or(recheck, |due| due.min(recheck));
            tokio::select! {
                () = stream.wake.notified() => {}
                () = tokio::time::sleep_until(wake_at) => {
                    let mut state = stream.state();
                    state.dry_at_epoch = None;
                    due_at = None;
                    recheck_at = None;
                }
                () = stream.stop.cancelled() => return,
                () = self.leasing.cancelled() => return,
            }
        }
    }

    /// Leases up to `limit` jobs for `stream` and sends them. Returns how many.
    async fn lease_into(&self, stream: &LeaseStream, limit: u32) -> store::Result<u32> {
        let params = |limit, shards| LeaseParams {
            queues: &stream.filter.queues,
            kinds: &stream.filter.kinds,
            limit,
            lease_duration: stream.filter.lease_duration,
            worker_id: &stream.filter.worker_id,
            shards,
        };
        // Own shards first; other shards only for what they leave unfilled.
        let owned = self.owned_shards();
        let mut jobs = match &owned {
            Some(owned) => self.store.jobs_lease(&params(limit, Some(owned.as_slice()))).await?,
            None => Vec::new(),
        };
        let short = limit.saturating_sub(u32::try_from(jobs.len()).unwrap_or(limit));
        if short > 0 {
            jobs.extend(self.store.jobs_lease(&params(short, None)).await?);
        }
        let count = u32::try_from(jobs.len()).unwrap_or(u32::MAX);
        if jobs.is_empty() {
            return Ok(0);
        }
        let accepted = {
            let mut registry = self.registry();
            let mut state = stream.state();
            if state.closed || state.draining {
                false
            } else {
                registry.hold(stream.id, &mut state, &jobs);
                true
            }
        };
        self.record_leased(&jobs);
        self.publish_changes(jobs.iter().map(|job| job.id));
        // The jobs move into the stream's event (no copy of their payloads);
        // their leases are kept aside in case the stream is gone.
        let leases: Vec<HeldLease> = jobs
            .iter()
            .filter_map(|job| job.lease_token.map(|lease_token| HeldLease { job_id: job.id, lease_token }))
            .collect();
        if accepted {
            for job in &jobs {
                tracing::debug!(job_id = job.id, queue = %job.queue, kind = %job.kind, attempt = job.attempt, worker_id = %stream.filter.worker_id, "job leased");
            }
        }
        if !accepted || stream.events.send(StreamEvent::Leased(jobs)).is_err() {
            // The stream closed while we leased: hand the jobs straight back.
            self.forget_leases(stream, &leases);
            let returned = self
                .store
                .jobs_release_many(&leases, "lease handed back: never delivered", ReleaseAttempt::Refunded)
                .await?;
            self.record_released(&returned);
        }
        Ok(count)
    }

    /// Drops leases from a stream and the registry (they are being handed back).
    fn forget_leases(&self, stream: &LeaseStream, leases: &[HeldLease]) {
        let mut registry = self.registry();
        let mut state = stream.state();
        for lease in leases {
            state.held.remove(&lease.lease_token);
            registry.forget(&lease.lease_token);
        }
    }

    async fn next_due(&self, stream: &LeaseStream) -> Option<Instant> {
        match self.store.jobs_next_due(&stream.filter.queues, &stream.filter.kinds).await {
            Ok(Some(until)) => Some(Instant::now() + until + DUE_MARGIN),
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, "could not read the next due time");
                Some(Instant::now() + Duration::from_secs(1))
            }
        }
    }
}

/// A job's `traceparent` attribute.
fn traceparent_of(job: &JobRecord) -> Option<&str> {
    job.attributes.get(telemetry::TRACEPARENT).and_then(serde_json::Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leased job of queue `q`, with an ordering key when `keyed`.
    fn leased(id: i64, keyed: bool) -> JobRecord {
        let now = chrono::Utc::now();
        JobRecord {
            id,
            queue: "q".to_owned(),
            kind: "k".to_owned(),
            state: crate::store::state::LEASED,
            priority: 0,
            sequence: id,
            run_at: now,
            created_at: now,
            attempt: 1,
            max_attempts: 3,
            ordering_key: keyed.then(|| "key".to_owned()),
            dedup_key: None,
            lease_token: Some(Uuid::new_v4()),
            lease_expires_at: Some(now),
            leased_by: Some("w".to_owned()),
            last_error: None,
            payload: Vec::new(),
            attributes: serde_json::Value::Object(serde_json::Map::new()),
            finished_at: None,
            result: None,
        }
    }

    fn lease_of(job: &JobRecord) -> HeldLease {
        HeldLease { job_id: job.id, lease_token: job.lease_token.expect("leased") }
    }

    #[tokio::test]
    async fn only_acks_no_other_job_waits_on_may_linger() {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://127.0.0.1:1/unused").expect("url");
        let dispatcher = Dispatcher::new(Store::from_pool(pool));
        let (events, _receiver) = mpsc::unbounded_channel();
        let filter = LeaseFilter {
            worker_id: "w".to_owned(),
            queues: vec!["q".to_owned()],
            kinds: Vec::new(),
            lease_duration: None,
        };
        let stream = Arc::new(LeaseStream {
            id: 1,
            filter,
            state: Mutex::new(StreamState { window: 3, ..StreamState::default() }),
            wake: Notify::new(),
            events,
            stop: CancellationToken::new(),
        });
        let (plain, keyed) = (leased(1, false), leased(2, true));
        {
            let mut registry = dispatcher.registry();
            registry.streams.insert(1, stream.clone());
            let mut state = stream.state();
            registry.hold(1, &mut state, &[plain.clone(), keyed.clone()]);
        }
        // Holding 2 of 3 slots, but not known to be waiting for work.
        assert!(!dispatcher.ack_can_wait(&lease_of(&plain)), "a stream that may find work needs the slot");
        stream.state().dry_at_epoch = Some(0);
        assert!(dispatcher.ack_can_wait(&lease_of(&plain)), "idle stream with a free slot");
        assert!(!dispatcher.ack_can_wait(&lease_of(&keyed)), "the key's next job waits on it");
        assert!(
            !dispatcher.ack_can_wait(&HeldLease { job_id: 7, lease_token: lease_of(&plain).lease_token }),
            "another job's token"
        );
        assert!(!dispatcher.ack_can_wait(&lease_of(&leased(3, false))), "a lease no local stream holds");
        stream.state().work_epoch = 1;
        assert!(!dispatcher.ack_can_wait(&lease_of(&plain)), "work was announced since the stream went dry");
        stream.state().dry_at_epoch = Some(1);
        stream.state().window = 2;
        assert!(!dispatcher.ack_can_wait(&lease_of(&plain)), "no free slot besides");
        stream.state().window = 3;
        stream.drain();
        assert!(!dispatcher.ack_can_wait(&lease_of(&plain)), "a draining worker waits for its acks");
        stream.state().draining = false;
        assert!(dispatcher.ack_can_wait(&lease_of(&plain)));
        dispatcher.stop_leasing();
        assert!(!dispatcher.ack_can_wait(&lease_of(&plain)), "the replica is stopping");
    }
}
