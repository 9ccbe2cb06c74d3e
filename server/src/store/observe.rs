//! Statements that feed metrics, traces, health checks and the status page:
//! the database's vacuum horizon (the watchdog), recent dead letters, which
//! queue (and trace) a job belongs to.

use super::{Result, Store};
use chrono::{DateTime, Utc};

/// How far the database's oldest open transaction and xmin horizon lag.
///
/// PostgreSQL's vacuum may only remove row versions that no snapshot can
/// still see. Every ack, nack and lease rewrites or deletes a job row, so the
/// job tables produce dead rows at the rate of the hot path; one transaction
/// left open (an idle-in-transaction session, a long report, a forgotten
/// replication slot or prepared transaction) holds the horizon back and the
/// tables and their indexes bloat until it ends, slowing every lease.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatabaseHorizon {
    /// Age of the oldest open transaction of another session on this database, in seconds.
    pub oldest_transaction_seconds: f64,
    /// Transactions between now and the oldest xmin or running transaction id
    /// that holds back vacuum (other sessions of this database, replication
    /// slots, prepared transactions).
    pub xmin_horizon_age: i64,
    /// The session with the oldest open transaction, if any.
    pub oldest_holder: Option<TransactionHolder>,
}

/// A session holding an open transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct TransactionHolder {
    pub pid: i32,
    pub application_name: String,
    /// `active`, `idle in transaction`, ...
    pub state: String,
    pub transaction_seconds: f64,
}

/// A DEAD job, for the status page.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct DeadLetterRecord {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub attempt: i32,
    pub finished_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Which queue a job belongs to and the producer's trace context it carries.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct JobTraceRecord {
    pub id: i64,
    pub queue: String,
    /// The `traceparent` attribute, if the producer set one.
    pub traceparent: Option<String>,
}

#[derive(sqlx::FromRow)]
struct HorizonRow {
    oldest_transaction_seconds: Option<f64>,
    xmin_horizon_age: Option<i64>,
    holder_pid: Option<i32>,
    holder_application_name: Option<String>,
    holder_state: Option<String>,
}

impl Store {
    /// The watchdog: the oldest open transaction and the oldest xmin holding
    /// back vacuum on this database (see [`DatabaseHorizon`]). Sessions of
    /// other roles are only visible to a role with `pg_monitor` (or
    /// `pg_read_all_stats`); without it they count as idle.
    pub async fn health_database_horizon(&self) -> Result<DatabaseHorizon> {
        let row = sqlx::query_as::<_, HorizonRow>(
            "WITH sessions AS ( \
                 SELECT a.pid, a.application_name, a.state, a.xact_start, a.backend_xmin, a.backend_xid \
                   FROM pg_stat_activity a \
                  WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()), \
             oldest AS ( \
                 SELECT s.pid, s.application_name, s.state, s.xact_start FROM sessions s \
                  WHERE s.xact_start IS NOT NULL ORDER BY s.xact_start LIMIT 1) \
             SELECT extract(epoch FROM now() - (SELECT xact_start FROM oldest))::float8 \
                        AS oldest_transaction_seconds, \
                    greatest((SELECT max(greatest(age(s.backend_xmin), age(s.backend_xid))) FROM sessions s), \
                             (SELECT max(age(r.xmin)) FROM pg_replication_slots r), \
                             (SELECT max(age(r.catalog_xmin)) FROM pg_replication_slots r), \
                             (SELECT max(age(p.transaction)) FROM pg_prepared_xacts p))::bigint \
                        AS xmin_horizon_age, \
                    (SELECT pid FROM oldest) AS holder_pid, \
                    (SELECT application_name FROM oldest) AS holder_application_name, \
                    (SELECT state FROM oldest) AS holder_state",
        )
        .fetch_one(self.pool())
        .await?;
        let oldest_transaction_seconds = row.oldest_transaction_seconds.unwrap_or(0.0).max(0.0);
        Ok(DatabaseHorizon {
            oldest_transaction_seconds,
            xmin_horizon_age: row.xmin_horizon_age.unwrap_or(0).max(0),
            oldest_holder: row.holder_pid.map(|pid| TransactionHolder {
                pid,
                application_name: row.holder_application_name.unwrap_or_default(),
                state: row.holder_state.unwrap_or_default(),
                transaction_seconds: oldest_transaction_seconds,
            }),
        })
    }

    /// The `limit` most recently finished DEAD jobs of every queue, newest first.
    pub async fn dead_letters_recent(&self, limit: u32) -> Result<Vec<DeadLetterRecord>> {
        let rows = sqlx::query_as::<_, DeadLetterRecord>(
            "SELECT f.id, f.queue, f.kind, f.attempt, f.finished_at, f.last_error \
               FROM workbroker.finished_jobs f WHERE f.state = 5 \
              ORDER BY f.finished_at DESC, f.id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.planned)
        .await?;
        Ok(rows)
    }

    /// Queue and trace context of jobs, wherever they live (jobs that no
    /// longer exist are left out).
    pub async fn jobs_trace_info(&self, job_ids: &[i64]) -> Result<Vec<JobTraceRecord>> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query_as::<_, JobTraceRecord>(
            "SELECT j.id, j.queue, j.attributes ->> 'traceparent' AS traceparent \
               FROM workbroker.all_jobs j WHERE j.id = ANY($1::bigint[])",
        )
        .bind(job_ids)
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }
}
