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
    AckItem, EnqueuedRecord, HeldLease, LEASES_CHANNEL, NackItem, NackResult, NewJobRecord, SettleOutcome, Store,
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
    /// Statements of one kind in flight at once.
    pub max_concurrent_flushes: usize,
}

impl Default for BatcherSettings {
    fn default() -> Self {
        Self { max_enqueue_batch: 5_000, max_settle_batch: 2_000, max_concurrent_flushes: 4 }
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
            max_concurrent_flushes: settings.max_concurrent_flushes,
            queue_capacity: 10_000,
        };
        let settle_limits = BatcherLimits {
            max_batch_weight: settings.max_settle_batch,
            max_concurrent_flushes: settings.max_concurrent_flushes,
            queue_capacity: 50_000,
        };

        let enqueue_store = store.clone();
        let enqueue_metrics = metrics.clone();
        let (enqueue, enqueue_loop) = batcher(
            "enqueue",
            enqueue_limits,
            |request: &Vec<NewJobRecord>| request.len(),
            move |requests: Vec<Vec<NewJobRecord>>| {
                let store = enqueue_store.clone();
                let metrics = enqueue_metrics.clone();
                async move {
                    let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
                    let jobs: Vec<NewJobRecord> = requests.into_iter().flatten().collect();
                    let enqueued = store.jobs_enqueue_many(&jobs).await?;
                    metrics.add_by_queue(
                        JobEvent::Enqueued,
                        jobs.iter()
                            .zip(&enqueued)
                            .filter(|(_, record)| !record.deduplicated)
                            .map(|(job, _)| job.queue.as_str()),
                    );
                    let mut enqueued = enqueued.into_iter();
                    Ok(sizes.into_iter().map(|size| enqueued.by_ref().take(size).collect()).collect())
                }
            },
        );

        let ack_store = store.clone();
        let ack_dispatcher = dispatcher.clone();
        let ack_metrics = metrics.clone();
        let (ack, ack_loop) = batcher(
            "ack",
            settle_limits,
            |_: &AckItem| 1,
            move |items: Vec<AckItem>| {
                let store = ack_store.clone();
                let dispatcher = ack_dispatcher.clone();
                let metrics = ack_metrics.clone();
                async move {
                    let outcomes = store.jobs_ack_many(&items).await?;
                    let leases: Vec<HeldLease> = items
                        .iter()
                        .map(|item| HeldLease { job_id: item.job_id, lease_token: item.lease_token })
                        .collect();
                    let settled: Vec<(bool, bool)> =
                        outcomes.iter().map(|outcome| (*outcome == SettleOutcome::Ok, false)).collect();
                    let infos = dispatcher.lease_infos(&leases);
                    settle(&store, &dispatcher, &leases).await;
                    record_settled(&store, &metrics, JobStep::Ack, &leases, &settled, infos);
                    Ok(outcomes)
                }
            },
        );

        let nack_store = store.clone();
        let nack_dispatcher = dispatcher.clone();
        let nack_metrics = metrics.clone();
        let (nack, nack_loop) = batcher(
            "nack",
            settle_limits,
            |_: &NackItem| 1,
            move |items: Vec<NackItem>| {
                let store = nack_store.clone();
                let dispatcher = nack_dispatcher.clone();
                let metrics = nack_metrics.clone();
                async move {
                    let results = store.jobs_nack_many(&items).await?;
                    let leases: Vec<HeldLease> = items
                        .iter()
                        .map(|item| HeldLease { job_id: item.job_id, lease_token: item.lease_token })
                        .collect();
                    let settled: Vec<(bool, bool)> = results
                        .iter()
                        .map(|result| {
                            (result.outcome == SettleOutcome::Ok, result.next_state == Some(crate::store::state::DEAD))
                        })
                        .collect();
                    let infos = dispatcher.lease_infos(&leases);
                    settle(&store, &dispatcher, &leases).await;
                    record_settled(&store, &metrics, JobStep::Nack, &leases, &settled, infos);
                    Ok(results)
                }
            },
        );

        tracker.spawn(enqueue_loop.run(shutdown.clone()));
        tracker.spawn(ack_loop.run(shutdown.clone()));
        tracker.spawn(nack_loop.run(shutdown.clone()));
        Self { enqueue, ack, nack }
    }
}

/// After acks or nacks: free the slots of local streams, tell other replicas
/// about leases held elsewhere, and wake watchers.
async fn settle(store: &Store, dispatcher: &Dispatcher, leases: &[HeldLease]) {
    let foreign = dispatcher.leases_settled(leases);
    for payload in settled_payloads(&foreign) {
        if let Err(error) = store.notify(LEASES_CHANNEL, &payload).await {
            tracing::warn!(%error, "could not announce settled leases to other replicas");
        }
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
