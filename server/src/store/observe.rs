//! Statements that feed metrics, traces, health checks and the status page:
//! the database's vacuum horizon (the watchdog), recent dead letters, which
//! queue (and trace) a job belongs to, and the lease-returning statements
//! (expiry, stream release) in a form that says which jobs they moved.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{HeldLease, Result, Store};

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

/// One job a lease-returning statement moved.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ReturnedJob {
    pub id: i64,
    pub queue: String,
    pub traceparent: Option<String>,
    /// True when the job had used its last attempt and went DEAD; false when
    /// it went back to the queue.
    pub dead: bool,
}

#[derive(sqlx::FromRow)]
struct HorizonRow {
    oldest_transaction_seconds: Option<f64>,
    xmin_horizon_age: Option<i64>,
    holder_pid: Option<i32>,
    holder_application_name: Option<String>,
    holder_state: Option<String>,
}

/// Hands leases back to the queue, or to DEAD when their attempts are used up,
/// like `jobs.rs`'s `return_leases!`, but answering one row per moved job.
/// `$targets` yields `(id, token)`; `$2` is the error recorded on each job.
macro_rules! return_leases_returning_jobs {
    ($targets:literal) => {
        concat!(
            "WITH targets AS (",
            $targets,
            "), \
             eligible AS ( \
                 SELECT j.id, t.token, j.attempt >= j.max_attempts AS to_dead \
                   FROM targets t JOIN workbroker.jobs j \
                     ON j.id = t.id AND j.lease_token = t.token AND j.state = 3), \
             requeued AS ( \
                 UPDATE workbroker.jobs j \
                    SET state = 2, run_at = now(), lease_token = NULL, lease_expires_at = NULL, \
                        leased_by = NULL, leased_at = NULL, last_error = $2 \
                   FROM eligible e \
                  WHERE j.id = e.id AND NOT e.to_dead AND j.lease_token = e.token AND j.state = 3 \
                 RETURNING j.id, j.queue, j.attributes ->> 'traceparent' AS traceparent), \
             killed AS ( \
                 DELETE FROM workbroker.jobs j USING eligible e \
                  WHERE j.id = e.id AND e.to_dead AND j.lease_token = e.token AND j.state = 3 \
                 RETURNING j.*), \
             dead AS ( \
                 INSERT INTO workbroker.finished_jobs (id, queue, kind, state, priority, sequence, run_at, \
                     created_at, attempt, max_attempts, ordering_key, dedup_key, shard, lease_duration, \
                     lease_token, lease_expires_at, leased_by, leased_at, last_error, payload, attributes, \
                     finished_at, result) \
                 SELECT id, queue, kind, 5, priority, sequence, run_at, created_at, attempt, max_attempts, \
                        ordering_key, dedup_key, shard, lease_duration, lease_token, lease_expires_at, \
                        leased_by, leased_at, $2, payload, attributes, now(), NULL \
                   FROM killed \
                 RETURNING id, queue, attributes ->> 'traceparent' AS traceparent), \
             notified AS ( \
                 SELECT pg_notify('workbroker_jobs', queue) FROM (SELECT DISTINCT queue FROM requeued) q) \
             SELECT r.id, r.queue, r.traceparent, r.dead \
               FROM (SELECT id, queue, traceparent, false AS dead FROM requeued \
                     UNION ALL SELECT id, queue, traceparent, true AS dead FROM dead) r \
              WHERE (SELECT count(*) FROM notified) >= 0 \
              ORDER BY r.id"
        )
    };
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
        .fetch_one(&self.pool)
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
        .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Like `jobs_expire_leases`, answering which jobs it returned: up to
    /// `limit` expired leases (by the database clock) go back to their queue,
    /// or to DEAD when their attempts are used up. Concurrent callers take
    /// disjoint rows (SKIP LOCKED) and every change re-checks the token.
    pub async fn jobs_expire_leases_returning(&self, limit: u32) -> Result<Vec<ReturnedJob>> {
        let rows = sqlx::query_as::<_, ReturnedJob>(return_leases_returning_jobs!(
            "SELECT j.id, j.lease_token AS token FROM workbroker.jobs j \
              WHERE j.state = 3 AND j.lease_expires_at < now() \
              ORDER BY j.lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(i64::from(limit))
        .bind("lease expired")
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Like `jobs_release_many`, answering which jobs it returned: each lease
    /// still current goes back to the queue at once, or DEAD if it used the
    /// job's last attempt.
    pub async fn jobs_release_many_returning(&self, leases: &[HeldLease], reason: &str) -> Result<Vec<ReturnedJob>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = leases.iter().map(|lease| lease.job_id).collect();
        let tokens: Vec<Uuid> = leases.iter().map(|lease| lease.lease_token).collect();
        let rows = sqlx::query_as::<_, ReturnedJob>(return_leases_returning_jobs!(
            "SELECT u.id, u.token FROM unnest($1::bigint[], $3::uuid[]) AS u(id, token)"
        ))
        .bind(&ids)
        .bind(reason)
        .bind(&tokens)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
