//! Queue statements: settings, pause/resume, stats and the completed watermark.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::jobs::duration_from_micros;
use super::{Result, Store};

/// A queue's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueRecord {
    pub name: String,
    pub paused: bool,
    pub max_attempts: i32,
    pub lease_duration: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_multiplier: f64,
    pub backoff_jitter: f64,
    pub completed_retention: Duration,
    pub created_at: DateTime<Utc>,
}

/// Settings to change; `None` leaves a setting as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSettingsPatch {
    pub max_attempts: Option<i32>,
    pub lease_duration: Option<Duration>,
    pub backoff_initial: Option<Duration>,
    pub backoff_max: Option<Duration>,
    pub backoff_multiplier: Option<f64>,
    pub backoff_jitter: Option<f64>,
    pub completed_retention: Option<Duration>,
}

/// Counts and watermark of one queue, from one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueStatsRecord {
    pub queue: String,
    pub paused: bool,
    pub scheduled: u64,
    pub available: u64,
    pub leased: u64,
    pub completed: u64,
    pub dead: u64,
    pub cancelled: u64,
    pub oldest_available_age: Duration,
    pub completed_watermark: u64,
    pub last_sequence: u64,
}

#[derive(sqlx::FromRow)]
struct QueueRow {
    name: String,
    paused: bool,
    max_attempts: i32,
    lease_duration_us: i64,
    backoff_initial_us: i64,
    backoff_max_us: i64,
    backoff_multiplier: f64,
    backoff_jitter: f64,
    completed_retention_us: i64,
    created_at: DateTime<Utc>,
}

impl From<QueueRow> for QueueRecord {
    fn from(row: QueueRow) -> Self {
        QueueRecord {
            name: row.name,
            paused: row.paused,
            max_attempts: row.max_attempts,
            lease_duration: duration_from_micros(row.lease_duration_us),
            backoff_initial: duration_from_micros(row.backoff_initial_us),
            backoff_max: duration_from_micros(row.backoff_max_us),
            backoff_multiplier: row.backoff_multiplier,
            backoff_jitter: row.backoff_jitter,
            completed_retention: duration_from_micros(row.completed_retention_us),
            created_at: row.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct QueueStatsRow {
    queue: String,
    paused: bool,
    scheduled: i64,
    available: i64,
    leased: i64,
    completed: i64,
    dead: i64,
    cancelled: i64,
    oldest_available_us: Option<i64>,
}

/// A queue's completed watermark and the last sequence it handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueWatermark {
    pub completed_watermark: u64,
    pub last_sequence: u64,
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

macro_rules! queue_fields {
    () => {
        "q.name, q.paused, q.max_attempts, \
         (extract(epoch FROM q.lease_duration) * 1e6)::bigint AS lease_duration_us, \
         (extract(epoch FROM q.backoff_initial) * 1e6)::bigint AS backoff_initial_us, \
         (extract(epoch FROM q.backoff_max) * 1e6)::bigint AS backoff_max_us, \
         q.backoff_multiplier, q.backoff_jitter, \
         (extract(epoch FROM q.completed_retention) * 1e6)::bigint AS completed_retention_us, \
         q.created_at"
    };
}

fn micros(duration: Option<Duration>) -> Option<i64> {
    duration.map(|value| i64::try_from(value.as_micros()).unwrap_or(i64::MAX))
}

impl Store {
    /// Pauses or resumes leasing from a queue, creating it if unknown.
    /// Resuming notifies waiting dispatchers.
    pub async fn queue_set_paused(&self, name: &str, paused: bool) -> Result<QueueRecord> {
        let row = sqlx::query_as::<_, QueueRow>(concat!(
            "WITH changed AS ( \
                 INSERT INTO workbroker.queues AS q (name, paused) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused RETURNING q.*), \
             notified AS (SELECT pg_notify('workbroker_jobs', $1) WHERE NOT $2) \
             SELECT ",
            queue_fields!(),
            " FROM changed q WHERE (SELECT count(*) FROM notified) >= 0"
        ))
        .bind(name)
        .bind(paused)
        .fetch_one(self.pool())
        .await?;
        Ok(row.into())
    }

    /// Changes a queue's settings, creating it if unknown.
    pub async fn queue_configure(&self, name: &str, patch: &QueueSettingsPatch) -> Result<QueueRecord> {
        let mut transaction = self.pool().begin().await?;
        sqlx::query("INSERT INTO workbroker.queues (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        let row = sqlx::query_as::<_, QueueRow>(concat!(
            "UPDATE workbroker.queues q SET \
                 max_attempts = coalesce($2, q.max_attempts), \
                 lease_duration = coalesce($3 * interval '1 microsecond', q.lease_duration), \
                 backoff_initial = coalesce($4 * interval '1 microsecond', q.backoff_initial), \
                 backoff_max = coalesce($5 * interval '1 microsecond', q.backoff_max), \
                 backoff_multiplier = coalesce($6, q.backoff_multiplier), \
                 backoff_jitter = coalesce($7, q.backoff_jitter), \
                 completed_retention = coalesce($8 * interval '1 microsecond', q.completed_retention) \
              WHERE q.name = $1 \
             RETURNING ",
            queue_fields!()
        ))
        .bind(name)
        .bind(patch.max_attempts)
        .bind(micros(patch.lease_duration))
        .bind(micros(patch.backoff_initial))
        .bind(micros(patch.backoff_max))
        .bind(patch.backoff_multiplier)
        .bind(patch.backoff_jitter)
        .bind(micros(patch.completed_retention))
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(row.into())
    }

    /// A queue's settings, if it exists.
    pub async fn queue_get(&self, name: &str) -> Result<Option<QueueRecord>> {
        let row = sqlx::query_as::<_, QueueRow>(concat!(
            "SELECT ",
            queue_fields!(),
            " FROM workbroker.queues q WHERE q.name = $1"
        ))
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(Into::into))
    }

    /// Counts per state, the oldest available job's age and the completed
    /// watermark, for one queue or (with `None`) every queue, by name.
    ///
    /// The counts come from one statement (unfinished jobs counted in the hot
    /// table, finished ones from the counters of migration 0006, which the
    /// finishing statements and a delete trigger keep since 0011); the
    /// watermarks from [`Store::queue_watermarks`], taken right after.
    pub async fn queue_stats(&self, queue: Option<&str>) -> Result<Vec<QueueStatsRecord>> {
        let rows = sqlx::query_as::<_, QueueStatsRow>(concat!(
            "SELECT q.name AS queue, q.paused, \
                    coalesce(h.scheduled, 0) AS scheduled, coalesce(h.available, 0) AS available, \
                    coalesce(h.leased, 0) AS leased, coalesce(f.completed, 0) AS completed, \
                    coalesce(f.dead, 0) AS dead, coalesce(f.cancelled, 0) AS cancelled, \
                    h.oldest_available_us \
               FROM workbroker.queues q \
               LEFT JOIN LATERAL ( \
                   SELECT count(*) FILTER (WHERE j.state = 2 AND j.run_at > now()) AS scheduled, \
                          count(*) FILTER (WHERE j.state = 2 AND j.run_at <= now()) AS available, \
                          count(*) FILTER (WHERE j.state = 3) AS leased, \
                          (extract(epoch FROM now() - min(j.run_at) FILTER (WHERE j.state = 2 AND j.run_at <= now())) \
                              * 1e6)::bigint AS oldest_available_us \
                     FROM workbroker.jobs j \
                    WHERE ",
            same_queue!("j.queue", "q.name"),
            ") h ON true \
               LEFT JOIN LATERAL ( \
                   SELECT sum(c.count) FILTER (WHERE c.state = 4)::bigint AS completed, \
                          sum(c.count) FILTER (WHERE c.state = 5)::bigint AS dead, \
                          sum(c.count) FILTER (WHERE c.state = 6)::bigint AS cancelled \
                     FROM workbroker.finished_counts c WHERE c.queue = q.name) f ON true \
              WHERE $1::text IS NULL OR q.name = $1 \
              ORDER BY q.name"
        ))
        .bind(queue)
        .fetch_all(self.pool())
        .await?;
        let names: Vec<String> = rows.iter().map(|row| row.queue.clone()).collect();
        let watermarks = self.queue_watermarks(&names).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let watermark = watermarks.get(&row.queue).copied().unwrap_or_default();
                QueueStatsRecord {
                    scheduled: count(row.scheduled),
                    available: count(row.available),
                    leased: count(row.leased),
                    completed: count(row.completed),
                    dead: count(row.dead),
                    cancelled: count(row.cancelled),
                    oldest_available_age: duration_from_micros(row.oldest_available_us.unwrap_or(0)),
                    completed_watermark: watermark.completed_watermark,
                    last_sequence: watermark.last_sequence,
                    queue: row.queue,
                    paused: row.paused,
                }
            })
            .collect())
    }

    /// The completed watermark and last sequence of each named queue.
    ///
    /// The watermark is `min(sequence of unfinished jobs) - 1`, or the
    /// queue's last sequence when nothing is unfinished. It is read under the
    /// queues' enqueue barrier, taken exclusive (migration 0004): no sequence
    /// is in flight then, so every sequence up to the last one is committed
    /// or abandoned, and none can later appear below the watermark read here.
    /// The barrier is held for this transaction's two statements only.
    pub async fn queue_watermarks(&self, queues: &[String]) -> Result<HashMap<String, QueueWatermark>> {
        if queues.is_empty() {
            return Ok(HashMap::new());
        }
        let mut transaction = self.pool().begin().await?;
        sqlx::query("SELECT workbroker.enqueue_barrier($1, true)").bind(queues).execute(&mut *transaction).await?;
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(concat!(
            "SELECT q.name, workbroker.queue_last_sequence(q.sequence), \
                    (SELECT min(j.sequence) FROM workbroker.jobs j \
                      WHERE ",
            same_queue!("j.queue", "q.name"),
            ") \
               FROM workbroker.queues q WHERE q.name = ANY($1)"
        ))
        .bind(queues)
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(name, last_sequence, lowest_unfinished)| {
                let watermark = lowest_unfinished.map_or(last_sequence, |lowest| (lowest - 1).min(last_sequence));
                (name, QueueWatermark { completed_watermark: count(watermark), last_sequence: count(last_sequence) })
            })
            .collect())
    }
}
