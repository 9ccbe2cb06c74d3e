//! The vacuumer: keeps the job tables from bloating when autovacuum does not.
//!
//! Every lease rewrites a job row and every ack deletes one, so the hot
//! table produces dead rows at the rate of the hot path. Autovacuum's
//! defaults wait for dead rows to reach a fifth of the table and check once a
//! minute; with autovacuum turned off (some managed and CI databases) they are
//! never reclaimed, and every lease scans further through dead index entries.
//! This leader-only loop reads PostgreSQL's own counters every `interval` and
//! runs `VACUUM (SKIP_LOCKED)` on a job table whose dead rows pass
//! `min_dead_rows + dead_fraction × live rows`, without `ANALYZE` unless the
//! table also outgrew its statistics (below): under a steady flow that
//! vacuum comes every few seconds, and an ANALYZE with each one made every
//! session plan its statements again (the vacuum itself keeps the row count
//! the planner scales by up to date). With autovacuum on and
//! keeping up, it finds nothing to do; `SKIP_LOCKED` steps aside when
//! autovacuum is already at the table.
//!
//! It also runs `ANALYZE` on a job table that grew past
//! `min_grown_rows + growth_factor ×` the rows the planner plans with. Job
//! tables swing between empty and millions of rows, and the hot path runs
//! cached generic plans: a plan made while the table was empty (a lease
//! reading and sorting its whole queue instead of walking the waiting index
//! in order) ran a drain at a fifth of its speed until the next statistics
//! update, which invalidates every cached plan on the table. So besides its
//! ticks, the vacuumer checks soon after this replica inserted many jobs
//! (enqueues on other replicas are seen at the next tick). Churn alone (a
//! steady flow through a table of constant size) never triggers it: each
//! ANALYZE makes every session plan its statements on the table again,
//! which at 5,000 jobs/s, once a second, took the latency p50 from 7 ms to
//! over 100 ms.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::coordination::LeaderTerm;
use crate::store::Store;
use crate::store::maintenance::JobTable;

/// How long PostgreSQL may take to publish a backend's table counters.
const STATISTICS_LAG: Duration = Duration::from_millis(1_100);

/// Settings of the vacuumer.
#[derive(Clone, Copy, Debug)]
pub struct VacuumConfig {
    /// Time between two checks; zero turns the vacuumer off.
    pub interval: Duration,
    /// Dead rows a table may always have.
    pub min_dead_rows: i64,
    /// Dead rows allowed per live row, on top of `min_dead_rows`.
    pub dead_fraction: f64,
    /// Rows a table may always have beyond what the planner assumes.
    pub min_grown_rows: i64,
    /// Live rows allowed per row the planner assumes, on top of `min_grown_rows`.
    pub growth_factor: f64,
}

impl Default for VacuumConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            min_dead_rows: 20_000,
            dead_fraction: 0.2,
            min_grown_rows: 5_000,
            growth_factor: 2.0,
        }
    }
}

impl VacuumConfig {
    /// Whether a table with these counts needs a vacuum.
    pub fn needs_vacuum(&self, live_rows: i64, dead_rows: i64) -> bool {
        dead_rows as f64 > self.min_dead_rows as f64 + self.dead_fraction * live_rows.max(0) as f64
    }

    /// Whether a table with `live_rows` needs fresh statistics, when its
    /// plans assume `planned_rows`.
    pub fn needs_analyze(&self, live_rows: i64, planned_rows: i64) -> bool {
        live_rows as f64 > self.min_grown_rows as f64 + self.growth_factor * planned_rows.max(0) as f64
    }
}

pub struct Vacuumer {
    store: Store,
    config: VacuumConfig,
    /// When set, checks only run while this leader term is trusted.
    term: Option<LeaderTerm>,
}

impl Vacuumer {
    pub fn new(store: Store, config: VacuumConfig) -> Self {
        Self { store, config, term: None }
    }

    /// Runs checks only while `term` is trusted (leader-only operation).
    pub fn with_leader_term(mut self, term: LeaderTerm) -> Self {
        self.term = Some(term);
        self
    }

    /// Checks every `interval` until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.config.interval.is_zero() {
            return;
        }
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.store.job_tables_grew() => {
                    // PostgreSQL publishes a backend's table counters up to
                    // a second after its commits.
                    tokio::select! {
                        () = tokio::time::sleep(STATISTICS_LAG) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                () = shutdown.cancelled() => return,
            }
            if self.term.as_ref().is_some_and(|term| !term.is_trusted()) {
                continue;
            }
            if let Err(error) = self.run_once().await {
                tracing::warn!(%error, "vacuum check failed");
            }
        }
    }

    /// One check: vacuums each job table that needs it, analyzes each one
    /// that outgrew its statistics (in the same command when it is also
    /// vacuumed); returns those it vacuumed.
    pub async fn run_once(&self) -> crate::store::Result<Vec<JobTable>> {
        let mut vacuumed = Vec::new();
        for table in self.store.job_tables_activity().await? {
            let analyze = self.config.needs_analyze(table.live_rows, table.planned_rows);
            if !self.config.needs_vacuum(table.live_rows, table.dead_rows) {
                if analyze {
                    self.store.job_table_analyze(table.table).await?;
                    tracing::debug!(
                        table = table.table.name(),
                        live_rows = table.live_rows,
                        planned_rows = table.planned_rows,
                        "analyzed"
                    );
                }
                continue;
            }
            let started = std::time::Instant::now();
            self.store.job_table_vacuum(table.table, analyze).await?;
            tracing::info!(
                table = table.table.name(),
                live_rows = table.live_rows,
                dead_rows = table.dead_rows,
                analyze,
                took = ?started.elapsed(),
                "vacuumed"
            );
            vacuumed.push(table.table);
        }
        Ok(vacuumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vacuums_past_a_floor_plus_a_fraction_of_the_live_rows() {
        let config = VacuumConfig { min_dead_rows: 100, dead_fraction: 0.5, ..VacuumConfig::default() };
        assert!(!config.needs_vacuum(0, 100));
        assert!(config.needs_vacuum(0, 101));
        assert!(!config.needs_vacuum(1_000, 600));
        assert!(config.needs_vacuum(1_000, 601));
        assert!(!config.needs_vacuum(-5, 100), "a negative estimate counts as empty");
    }

    #[test]
    fn analyzes_a_table_grown_well_past_what_its_plans_assume() {
        let config = VacuumConfig { min_grown_rows: 1_000, growth_factor: 2.0, ..VacuumConfig::default() };
        assert!(!config.needs_analyze(1_000, 0));
        assert!(config.needs_analyze(1_001, 0), "an empty table filled with jobs");
        assert!(!config.needs_analyze(1_000_000, 500_000), "steady churn at about the planned size");
        assert!(config.needs_analyze(1_000_000, 400_000));
        assert!(!config.needs_analyze(10, 1_000_000), "a table that emptied keeps its plans");
    }
}
