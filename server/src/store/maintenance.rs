//! Table maintenance: the job tables' activity counters, VACUUM and ANALYZE.

use super::{Result, Store};

/// One of the job tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobTable {
    /// `workbroker.jobs`: unfinished jobs.
    Jobs,
    /// `workbroker.finished_jobs`.
    FinishedJobs,
}

impl JobTable {
    /// The qualified table name.
    pub fn name(self) -> &'static str {
        match self {
            JobTable::Jobs => "workbroker.jobs",
            JobTable::FinishedJobs => "workbroker.finished_jobs",
        }
    }
}

/// Live and dead row counts of a table, as PostgreSQL's statistics have
/// them, and the row count the planner plans with (`pg_class.reltuples`,
/// as of the last VACUUM or ANALYZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableActivity {
    pub table: JobTable,
    pub live_rows: i64,
    pub dead_rows: i64,
    pub planned_rows: i64,
}

impl Store {
    /// Live, dead and planned rows of both job tables.
    pub async fn job_tables_activity(&self) -> Result<Vec<TableActivity>> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT s.relname::text, s.n_live_tup, s.n_dead_tup, greatest(c.reltuples, 0)::bigint \
               FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
              WHERE s.schemaname = 'workbroker' AND s.relname IN ('jobs', 'finished_jobs')",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, live_rows, dead_rows, planned_rows)| TableActivity {
                table: if name == "jobs" { JobTable::Jobs } else { JobTable::FinishedJobs },
                live_rows,
                dead_rows,
                planned_rows,
            })
            .collect())
    }

    /// `VACUUM (SKIP_LOCKED)` of one job table, with `ANALYZE` when
    /// `analyze`: reclaims dead rows for reuse (and refreshes the planner's
    /// statistics); skipped when another vacuum holds the table. Needs the
    /// table's owner (the migrating role).
    pub async fn job_table_vacuum(&self, table: JobTable, analyze: bool) -> Result<()> {
        let command = if analyze { "VACUUM (SKIP_LOCKED, ANALYZE)" } else { "VACUUM (SKIP_LOCKED)" };
        self.job_table_maintain(command, table).await
    }

    /// `ANALYZE (SKIP_LOCKED)` of one job table: fresh statistics, and every
    /// session's cached plans of statements on the table are made again.
    pub async fn job_table_analyze(&self, table: JobTable) -> Result<()> {
        self.job_table_maintain("ANALYZE (SKIP_LOCKED)", table).await
    }

    /// Runs `command` on `table` (both fixed strings of this module).
    async fn job_table_maintain(&self, command: &'static str, table: JobTable) -> Result<()> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{command} {}", table.name()))).execute(self.pool()).await?;
        Ok(())
    }
}
