//! Starts the leader-only chores (reaper, vacuumer, rebalancer) when this replica
//! becomes a trusted leader and stops them the moment it is not.

use std::sync::Arc;

use etcd_client::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::etcd::EtcdConfig;
use super::rebalancer::Rebalancer;
use super::{ClusterView, Leadership};
use crate::admin::metrics::Metrics;
use crate::reaper::{Reaper, ReaperConfig};
use crate::store::Store;
use crate::vacuum::{VacuumConfig, Vacuumer};

pub struct LeaderChores {
    view: Arc<ClusterView>,
    store: Store,
    reaper: ReaperConfig,
    /// etcd access for the rebalancer; `None` on a single node (no map to keep).
    etcd: Option<(Client, EtcdConfig)>,
    /// Where the reaper counts expiries.
    metrics: Option<Arc<Metrics>>,
    vacuum: VacuumConfig,
}

impl LeaderChores {
    pub fn new(view: Arc<ClusterView>, store: Store, reaper: ReaperConfig, etcd: Option<(Client, EtcdConfig)>) -> Self {
        Self { view, store, reaper, etcd, metrics: None, vacuum: VacuumConfig::default() }
    }

    /// Vacuums the job tables as `config` says.
    pub fn with_vacuum(mut self, config: VacuumConfig) -> Self {
        self.vacuum = config;
        self
    }

    /// Lets the reaper count expiries into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut leadership = self.view.subscribe_leadership();
        loop {
            let current = leadership.borrow_and_update().clone();
            let running = if let Leadership::Leader(term) = current {
                let stop = shutdown.child_token();
                let tasks = TaskTracker::new();
                tasks.spawn(
                    Reaper::new(self.store.clone(), self.reaper)
                        .with_leader_term(term.clone())
                        .with_metrics(self.metrics.clone())
                        .run(stop.clone()),
                );
                tasks.spawn(
                    Vacuumer::new(self.store.clone(), self.vacuum).with_leader_term(term.clone()).run(stop.clone()),
                );
                if let Some((client, config)) = &self.etcd {
                    tasks.spawn(
                        Rebalancer::new(client.clone(), config.clone(), self.view.clone(), term).run(stop.clone()),
                    );
                }
                tasks.close();
                tracing::info!("leader chores started");
                Some((stop, tasks))
            } else {
                None
            };
            let changed = tokio::select! {
                changed = leadership.changed() => changed.is_ok(),
                () = shutdown.cancelled() => false,
            };
            if let Some((stop, tasks)) = running {
                stop.cancel();
                tasks.wait().await;
                tracing::info!("leader chores stopped");
            }
            if !changed {
                return;
            }
        }
    }
}
