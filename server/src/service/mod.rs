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

use crate::coordination::ClusterView;
use crate::dispatch::Dispatcher;
use crate::dispatch::batcher::{Batcher, BatcherLimits, batcher};
use crate::dispatch::listener::settled_payloads;
use crate::store::{
    AckItem, EnqueuedRecord, HeldLease, LEASES_CHANNEL, NackItem, NackResult, NewJobRecord, SettleOutcome, Store,
};

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
        let (enqueue, enqueue_loop) = batcher(
            "enqueue",
            enqueue_limits,
            |request: &Vec<NewJobRecord>| request.len(),
            move |requests: Vec<Vec<NewJobRecord>>| {
                let store = enqueue_store.clone();
                async move {
                    let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
                    let jobs: Vec<NewJobRecord> = requests.into_iter().flatten().collect();
                    let mut enqueued = store.jobs_enqueue_many(&jobs).await?.into_iter();
                    Ok(sizes.into_iter().map(|size| enqueued.by_ref().take(size).collect()).collect())
                }
            },
        );

        let ack_store = store.clone();
        let ack_dispatcher = dispatcher.clone();
        let (ack, ack_loop) = batcher(
            "ack",
            settle_limits,
            |_: &AckItem| 1,
            move |items: Vec<AckItem>| {
                let store = ack_store.clone();
                let dispatcher = ack_dispatcher.clone();
                async move {
                    let outcomes = store.jobs_ack_many(&items).await?;
                    let leases: Vec<HeldLease> = items
                        .iter()
                        .map(|item| HeldLease { job_id: item.job_id, lease_token: item.lease_token })
                        .collect();
                    settle(&store, &dispatcher, &leases).await;
                    Ok(outcomes)
                }
            },
        );

        let nack_store = store.clone();
        let nack_dispatcher = dispatcher.clone();
        let (nack, nack_loop) = batcher(
            "nack",
            settle_limits,
            |_: &NackItem| 1,
            move |items: Vec<NackItem>| {
                let store = nack_store.clone();
                let dispatcher = nack_dispatcher.clone();
                async move {
                    let results = store.jobs_nack_many(&items).await?;
                    let leases: Vec<HeldLease> = items
                        .iter()
                        .map(|item| HeldLease { job_id: item.job_id, lease_token: item.lease_token })
                        .collect();
                    settle(&store, &dispatcher, &leases).await;
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

/// What both services share.
pub struct Shared {
    pub store: Store,
    pub dispatcher: Arc<Dispatcher>,
    pub batchers: Batchers,
    pub limits: validate::Limits,
    pub cluster: Arc<ClusterView>,
    /// How often WatchJob re-reads a job changed by another replica.
    pub watch_poll_interval: Duration,
}
