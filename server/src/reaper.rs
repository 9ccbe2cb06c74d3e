//! The reaper: returns expired leases to their queue (or to DEAD when their
//! attempts are used up) and prunes finished jobs past their retention.
//!
//! Every statement it runs is conditional and judged by the database clock
//! (`lease_expires_at < now()`, the lease token compared, rows taken with
//! SKIP LOCKED), so running it twice, late, or on two replicas at once
//! returns each expired lease exactly once and never touches an acked job.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::coordination::LeaderTerm;
use crate::store::{self, Store};

/// Default time between two ticks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default rows per statement.
pub const DEFAULT_BATCH_SIZE: u32 = 1_000;

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
}

impl Reaper {
    pub fn new(store: Store, config: ReaperConfig) -> Self {
        Self { store, config, term: None }
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

    /// One pass: every expired lease and every prunable job, a batch at a time.
    #[tracing::instrument(name = "reaper.tick", skip_all)]
    pub async fn run_once(&self) -> store::Result<ReaperCounts> {
        let mut counts = ReaperCounts::default();
        loop {
            let returned = self.store.jobs_expire_leases(self.config.batch_size).await?;
            counts.requeued += returned.requeued;
            counts.dead += returned.dead;
            if returned.requeued + returned.dead < u64::from(self.config.batch_size) {
                break;
            }
        }
        loop {
            let pruned = self.store.jobs_prune_finished(self.config.batch_size).await?;
            counts.pruned += pruned;
            if pruned < u64::from(self.config.batch_size) {
                break;
            }
        }
        Ok(counts)
    }
}
