//! The reaper: returns expired leases to their queue (or to DEAD when their
//! attempts are used up) and prunes finished jobs past their retention.
//!
//! Every statement it runs is conditional and judged by the database clock
//! (`lease_expires_at < now()`, the lease token compared, rows taken with
//! SKIP LOCKED), so running it twice, late, or on two replicas at once
//! returns each expired lease exactly once and never touches an acked job.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::metrics::{JobEvent, Metrics};
use crate::coordination::LeaderTerm;
use crate::store::{self, Store};
use crate::telemetry::{self, JobRef, JobStep};

/// Default time between two ticks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default rows per statement.
pub const DEFAULT_BATCH_SIZE: u32 = 1_000;
/// Most statements of each kind one tick runs: a huge backlog of work (say,
/// after retention was shortened) is spread over ticks, so shutdown and
/// losing the lead are never held up for long.
const MAX_BATCHES_PER_TICK: u32 = 100;

/// Settings of the reaper.
#[derive(Clone, Copy, Debug)]
pub struct ReaperConfig {
    pub interval: Duration,
    pub batch_size: u32,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self { interval: DEFAULT_INTERVAL, batch_size: DEFAULT_BATCH_SIZE }
    }
}

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaperCounts {
    pub requeued: u64,
    pub dead: u64,
    pub pruned: u64,
}

pub struct Reaper {
    store: Store,
    config: ReaperConfig,
    /// When set, ticks only run while this leader term is trusted.
    term: Option<LeaderTerm>,
    /// Where expiries are counted.
    metrics: Option<Arc<Metrics>>,
}

impl Reaper {
    pub fn new(store: Store, config: ReaperConfig) -> Self {
        Self { store, config, term: None, metrics: None }
    }

    /// Counts the leases it returns into `metrics`.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs ticks only while `term` is trusted (leader-only operation).
    pub fn with_leader_term(mut self, term: LeaderTerm) -> Self {
        self.term = Some(term);
        self
    }

    /// Ticks until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if self.term.as_ref().is_some_and(|term| !term.is_trusted()) {
                tracing::debug!("reaper tick skipped: leadership not trusted");
                continue;
            }
            match self.run_once().await {
                Ok(counts) if counts != ReaperCounts::default() => {
                    tracing::info!(
                        requeued = counts.requeued,
                        dead = counts.dead,
                        pruned = counts.pruned,
                        "reaper tick"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "reaper tick failed"),
            }
        }
    }

    /// One pass: every expired lease and every prunable job, a batch at a
    /// time (at most [`MAX_BATCHES_PER_TICK`] batches of each).
    #[tracing::instrument(name = "reaper.tick", skip_all)]
    pub async fn run_once(&self) -> store::Result<ReaperCounts> {
        let mut counts = ReaperCounts::default();
        for _ in 0..MAX_BATCHES_PER_TICK {
            let returned = self.store.jobs_expire_leases(self.config.batch_size).await?;
            let dead = returned.iter().filter(|job| job.dead).count() as u64;
            counts.requeued += returned.len() as u64 - dead;
            counts.dead += dead;
            if let Some(metrics) = &self.metrics {
                metrics.add_by_queue(JobEvent::Expired, returned.iter().map(|job| job.queue.as_str()));
                metrics
                    .add_by_queue(JobEvent::Dead, returned.iter().filter(|job| job.dead).map(|job| job.queue.as_str()));
            }
            telemetry::record_job_steps(
                JobStep::Expire,
                returned.iter().map(|job| JobRef {
                    job_id: job.id,
                    queue: &job.queue,
                    traceparent: job.traceparent.as_deref(),
                }),
            );
            if (returned.len() as u64) < u64::from(self.config.batch_size) {
                break;
            }
        }
        for _ in 0..MAX_BATCHES_PER_TICK {
            let pruned = self.store.jobs_prune_finished(self.config.batch_size).await?;
            counts.pruned += pruned;
            if pruned < u64::from(self.config.batch_size) {
                break;
            }
        }
        Ok(counts)
    }
}
