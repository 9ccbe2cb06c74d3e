//! gRPC handlers of the `Broker` and `Admin` services.
//!
//! Handlers validate (`validate`), call the store or a group-commit batcher,
//! convert (`convert`), and map errors to `Status` in exactly one place
//! (`error`).

mod admin;
mod broker;
pub mod convert;
pub mod error;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admin::AdminService;
pub use broker::BrokerService;

use crate::admin::metrics::{JobEvent, Metrics};
use crate::coordination::ClusterView;
use crate::dispatch::batcher::{Batcher, BatcherLimits, batcher};
use crate::dispatch::listener::settled_payloads;
use crate::dispatch::{Dispatcher, LeaseInfo};
use crate::store::{
    AckItem, EnqueuedRecord, HeldLease, LEASES_CHANNEL, NackItem, NackResult, NewJobRecord, SettleOutcome, Settled,
    Store,
};
use crate::telemetry::{self, JobRef, JobStep};

/// The group-commit batchers of the hot path.
#[derive(Clone)]
pub struct Batchers {
    pub enqueue: Batcher<Vec<NewJobRecord>, Vec<EnqueuedRecord>>,
    pub ack: Batcher<AckItem, SettleOutcome>,
    pub nack: Batcher<NackItem, NackResult>,
}

/// Tuning of the batchers.
#[derive(Clone, Copy, Debug)]
pub struct BatcherSettings {
    /// Most jobs one enqueue statement inserts.
    pub max_enqueue_batch: usize,
    /// Most acks or nacks one statement settles.
    pub max_settle_batch: usize,
    /// Ack statements in flight at once, and nack statements apart. Two
    /// beat four: on two cores, acks waiting behind a statement go together
    /// into the next, which costs the database less than more statements
    /// side by side (`drain` 2 to 4 % and `steady` 4 to 7 % faster,
    /// alternating release builds). One did as well on `drain` and a few per
    /// cent better on `steady`, but leaves every ack of the replica behind a
    /// single slow statement.
    pub max_concurrent_flushes: usize,
    /// Enqueue statements in flight at once. A statement starts beside a
    /// running one only once 1,000 jobs or more wait, so this matters to
    /// bulk enqueues alone: four gave 5 to 8 % more than two on 1,000,000-job
    /// bulk runs (alternating runs on two cores), and no change in steady,
    /// drain and latency runs.
    pub max_concurrent_enqueues: usize,
    /// How long a light batch of acks no other job waits on waits for more
    /// (see [`Dispatcher::ack_can_wait`]). At 5,000 one-job enqueues a
    /// second, ack statements otherwise commit about a thousand times a
    /// second beside the enqueue statements, which then wait more for WAL
    /// flushes and cores.
    pub ack_linger: Duration,
}

/// Acks at which a lingering batch starts at once.
const ACK_LINGER_WEIGHT: usize = 64;

impl Default for BatcherSettings {
    fn default() -> Self {
        Self {
            max_enqueue_batch: 5_000,
            max_settle_batch: 2_000,
            max_concurrent_flushes: 2,
            max_concurrent_enqueues: 4,
            ack_linger: Duration::from_millis(1),
        }
    }
}

impl Batchers {
    /// Creates the batchers and starts their loops on `tracker`; the loops
    /// drain and stop when `shutdown` fires.
    pub fn start(
        store: &Store,
        dispatcher: &Arc<Dispatcher>,
        settings: BatcherSettings,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let enqueue_limits = BatcherLimits {
            max_batch_weight: settings.max_enqueue_batch,
            max_concurrent_flushes: settings.max_concurrent_enqueues,
            // Small enqueues wait for the running statement and go together
            // into the next; a full bulk request runs beside it.
            overlap_weight: 1_000,
            queue_capacity: 10_000,
            linger: Duration::ZERO,
            linger_weight: 0,
        };
        let settle_limits = BatcherLimits {
            max_batch_weight: settings.max_settle_batch,
            max_concurrent_flushes: settings.max_concurrent_flushes,
            overlap_weight: 1,
            queue_capacity: 50_000,
            linger: settings.ack_linger,
            linger_weight: ACK_LINGER_WEIGHT,
        };

        let enqueue_dispatcher = dispatcher.clone();
        let (enqueue, enqueue_loop) = batcher(
            "enqueue",
            enqueue_limits,
            |request: &Vec<NewJobRecord>| request.len(),
            move |requests: Vec<Vec<NewJobRecord>>| {
                let dispatcher = enqueue_dispatcher.clone();
                async move {
                    let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
                    let jobs: Vec<NewJobRecord> = requests.into_iter().flatten().collect();
                    let mut enqueued = dispatcher.enqueue(jobs).await?.into_iter();
                    Ok(sizes.into_iter().map(|size| enqueued.by_ref().take(size).collect()).collect())
                }
            },
        );

        let ack = settle_batcher::<AckItem>(store, dispatcher, metrics, settle_limits, tracker, shutdown);
        let nack_limits = BatcherLimits { linger: Duration::ZERO, ..settle_limits };
        let nack = settle_batcher::<NackItem>(store, dispatcher, metrics, nack_limits, tracker, shutdown);

        tracker.spawn(enqueue_loop.run(shutdown.clone()));
        Self { enqueue, ack, nack }
    }
}

/// An item that settles a lease (an ack or a nack), run in batches by one
/// statement of the store.
trait SettleItem: Sized + Send + 'static {
    type Output: Send + 'static;
    const NAME: &'static str;
    const STEP: JobStep;

    fn lease(&self) -> HeldLease;

    fn run(store: &Store, items: &[Self]) -> impl Future<Output = crate::store::Result<Settled<Self::Output>>> + Send;

    /// (took effect, the job went DEAD)
    fn effect(output: &Self::Output) -> (bool, bool);
}

impl SettleItem for AckItem {
    type Output = SettleOutcome;
    const NAME: &'static str = "ack";
    const STEP: JobStep = JobStep::Ack;

    fn lease(&self) -> HeldLease {
        HeldLease { job_id: self.job_id, lease_token: self.lease_token }
    }

    fn run(store: &Store, items: &[Self]) -> impl Future<Output = crate::store::Result<Settled<SettleOutcome>>> + Send {
        store.jobs_ack_many(items)
    }

    fn effect(output: &SettleOutcome) -> (bool, bool) {
        (*output == SettleOutcome::Ok, false)
    }
}

impl SettleItem for NackItem {
    type Output = NackResult;
    const NAME: &'static str = "nack";
    const STEP: JobStep = JobStep::Nack;

    fn lease(&self) -> HeldLease {
        HeldLease { job_id: self.job_id, lease_token: self.lease_token }
    }

    fn run(store: &Store, items: &[Self]) -> impl Future<Output = crate::store::Result<Settled<NackResult>>> + Send {
        store.jobs_nack_many(items)
    }

    fn effect(output: &NackResult) -> (bool, bool) {
        (output.outcome == SettleOutcome::Ok, output.next_state == Some(crate::store::state::DEAD))
    }
}

/// A group-commit batcher for acks or nacks: one statement per batch, then
/// the slots of the streams that held the leases are freed, other replicas
/// told, watchers woken, metrics and traces recorded.
fn settle_batcher<Item: SettleItem>(
    store: &Store,
    dispatcher: &Arc<Dispatcher>,
    metrics: &Arc<Metrics>,
    limits: BatcherLimits,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Batcher<Item, Item::Output> {
    let store = store.clone();
    let dispatcher = dispatcher.clone();
    let metrics = metrics.clone();
    let (handle, batch_loop) = batcher(
        Item::NAME,
        limits,
        |_: &Item| 1,
        move |items: Vec<Item>| {
            let store = store.clone();
            let dispatcher = dispatcher.clone();
            let metrics = metrics.clone();
            async move {
                let Settled { outputs, wake_queues } = Item::run(&store, &items).await?;
                dispatcher.queues_have_work(&wake_queues);
                let leases: Vec<HeldLease> = items.iter().map(SettleItem::lease).collect();
                let effects: Vec<(bool, bool)> = outputs.iter().map(Item::effect).collect();
                let infos = dispatcher.lease_infos(&leases);
                settle(&store, &dispatcher, &leases).await;
                record_settled(&store, &metrics, Item::STEP, &leases, &effects, infos);
                Ok(outputs)
            }
        },
    );
    tracker.spawn(batch_loop.run(shutdown.clone()));
    handle
}

/// After acks or nacks: free the slots of local streams, tell other replicas
/// about leases held elsewhere, and wake watchers.
async fn settle(store: &Store, dispatcher: &Dispatcher, leases: &[HeldLease]) {
    let foreign = dispatcher.leases_settled(leases);
    let payloads = settled_payloads(&foreign);
    if !payloads.is_empty()
        && let Err(error) = store.notify_many(LEASES_CHANNEL, &payloads).await
    {
        tracing::warn!(%error, "could not announce settled leases to other replicas");
    }
    dispatcher.publish_changes(leases.iter().map(|lease| lease.job_id));
}

/// Counts and traces the settles of one ack or nack batch. `settled` is, per
/// lease, whether it settled (current token) and whether the job went DEAD.
/// Queue and trace context come from the local dispatcher; leases held on
/// another replica are looked up in the database off the response path.
fn record_settled(
    store: &Store,
    metrics: &Arc<Metrics>,
    step: JobStep,
    leases: &[HeldLease],
    settled: &[(bool, bool)],
    infos: Vec<Option<LeaseInfo>>,
) {
    let event = if step == JobStep::Ack { JobEvent::Acked } else { JobEvent::Nacked };
    let mut known: Vec<(LeaseInfo, bool)> = Vec::new();
    let mut unknown: Vec<(i64, bool)> = Vec::new();
    for ((lease, (ok, dead)), info) in leases.iter().zip(settled).zip(infos) {
        if !ok {
            continue;
        }
        match info {
            Some(info) => known.push((info, *dead)),
            None => unknown.push((lease.job_id, *dead)),
        }
    }
    let record = move |metrics: &Metrics, jobs: &[(LeaseInfo, bool)]| {
        metrics.add_by_queue(event, jobs.iter().map(|(info, _)| &*info.queue));
        metrics.add_by_queue(JobEvent::Dead, jobs.iter().filter(|(_, dead)| *dead).map(|(info, _)| &*info.queue));
        telemetry::record_job_steps(
            step,
            jobs.iter().map(|(info, _)| JobRef {
                job_id: info.job_id,
                queue: &info.queue,
                traceparent: info.traceparent.as_deref(),
            }),
        );
    };
    record(metrics, &known);
    if unknown.is_empty() {
        return;
    }
    let store = store.clone();
    let metrics = metrics.clone();
    let span = tracing::Span::current();
    tokio::spawn(async move {
        let ids: Vec<i64> = unknown.iter().map(|(job_id, _)| *job_id).collect();
        let dead_by_id: std::collections::HashMap<i64, bool> = unknown.into_iter().collect();
        match store.jobs_trace_info(&ids).await {
            Ok(found) => {
                let jobs: Vec<(LeaseInfo, bool)> = found
                    .into_iter()
                    .map(|job| {
                        let dead = dead_by_id.get(&job.id).copied().unwrap_or(false);
                        let info = LeaseInfo {
                            job_id: job.id,
                            queue: Arc::from(job.queue),
                            traceparent: job.traceparent.map(Arc::from),
                        };
                        (info, dead)
                    })
                    .collect();
                let _entered = span.enter();
                record(&metrics, &jobs);
            }
            Err(error) => tracing::debug!(%error, jobs = ids.len(), "cannot look up settled jobs for metrics"),
        }
    });
}

/// What both services share.
pub struct Shared {
    pub store: Store,
    pub dispatcher: Arc<Dispatcher>,
    pub batchers: Batchers,
    pub limits: validate::Limits,
    pub cluster: Arc<ClusterView>,
    /// How often WatchJob re-reads a job changed by another replica.
    pub watch_poll_interval: Duration,
    /// Prometheus and OpenTelemetry metrics of this broker.
    pub metrics: Arc<Metrics>,
}
