//! The Postgres store: the only module that holds SQL.
//!
//! Methods are named noun-then-verb (`jobs_lease`, `queue_configure`) and take
//! plain domain values. Every job state change is one conditional statement:
//! a lease, ack, nack, extension or release only touches a row whose
//! `lease_token` still equals the caller's, and expiry is judged by the
//! database clock (`now()`), so any statement can run twice, late, or on two
//! replicas at once without changing what it should not.
//!
//! Notifications: statements that make work available end with
//! `pg_notify('workbroker_jobs', queue)` (delivered at commit, once per queue
//! per statement); lease events another replica must hear about go to
//! `workbroker_leases`.

/// SQL condition: the row's queue column `$column` is the queue `$queue`.
/// It names the queue's key too, which is what the indexes by queue are led
/// by (migration 0013), and the name, which drops another queue's rows whose
/// name has the same key. Both arguments are SQL expressions.
macro_rules! same_queue {
    ($column:literal, $queue:literal) => {
        concat!("workbroker.queue_key(", $column, ") = workbroker.queue_key(", $queue, ") AND ", $column, " = ", $queue)
    };
}

mod error;
mod jobs;
pub mod maintenance;
pub mod observe;
mod queues;
mod warm;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub use error::{Error, Result};
pub use jobs::{JOBS_LEASE_SQL, notify_on};
pub use queues::{QueueRecord, QueueSettingsPatch, QueueStatsRecord, QueueWatermark};
pub use warm::KeptConnectionSweeper;
use warm::WarmPool;

/// Channel carrying the name of a queue that may have new or changed work.
pub const JOBS_CHANNEL: &str = "workbroker_jobs";
/// Channel carrying lease events (`cancel:<id>:<token>`, `settled:<id>:<token>,...`).
pub const LEASES_CHANNEL: &str = "workbroker_leases";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handle to the database: a connection pool plus the statements.
#[derive(Clone, Debug)]
pub struct Store {
    /// The hot path's connections: every statement prepared once, its
    /// generic plan kept; its hot statements (lease, extend, release,
    /// notify) keep their connections between them (see [`warm`]).
    hot: Arc<WarmPool>,
    /// The group-commit statements' own few connections (enqueue, ack,
    /// nack; see [`StoreConfig::batch_connections`]), kept between
    /// statements too; `None`: they use `hot`.
    batch: Option<Arc<WarmPool>>,
    /// A few connections planning each statement with its actual
    /// parameters, for statements off the hot path whose best plan depends
    /// on a LIMIT parameter (the reaper's, listings): under a generic plan
    /// PostgreSQL guesses a LIMIT at a tenth of the table and hash-joins
    /// the whole finished table for a thousand-row prune.
    planned: PgPool,
    /// `@` and an id unique to this store (so to this broker process),
    /// appended to the `workbroker_jobs` notifications of its enqueues: the
    /// broker wakes its own streams right after the commit and its listener
    /// skips the echo.
    notify_suffix: Arc<str>,
    /// Jobs this store inserted since the vacuumer was last nudged.
    growth: Arc<TableGrowth>,
}

/// Jobs inserted since the last nudge, and the nudge itself: an empty job
/// table that fills up must get fresh statistics soon, since every cached
/// plan on it was made for an empty table (see [`crate::vacuum`]).
#[derive(Debug, Default)]
struct TableGrowth {
    inserted: std::sync::atomic::AtomicU64,
    nudge: tokio::sync::Notify,
}

/// Jobs inserted by one store that nudge the vacuumer to look at the
/// statistics before its next tick.
const GROWTH_NUDGE_JOBS: u64 = 5_000;

/// Connections of the hot path's pools (see [`Store::connection_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    pub open: u32,
    pub idle: u32,
    pub max: u32,
}

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// A `postgres://` URL.
    pub database_url: String,
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// Of those, connections kept for the group-commit statements (enqueue,
    /// ack, nack; 0: they share the pool). The pool hands out the idle
    /// connection that waited longest, so after a burst had opened many,
    /// one-job statements rotated over all of them and ran slower; on their
    /// own few connections they stay on warm backends.
    pub batch_connections: u32,
    /// How long a caller waits for a free connection before `Unavailable`.
    pub acquire_timeout: Duration,
}

impl Store {
    /// Opens a pool. Connections are made lazily, so a database that is down
    /// at start only makes calls fail with `Unavailable` until it is back.
    pub fn connect_lazy(config: &StoreConfig) -> Result<Self> {
        let options: PgConnectOptions = config.database_url.parse().map_err(Error::from)?;
        // JIT compilation pays off for long analytical queries only: on the
        // hot path's short statements it cost more than the statement (10 ms
        // on a 1,000-job insert whose estimates crossed `jit_above_cost`).
        let options = options.application_name("workbroker").options([("jit", "off")]);
        // Generic plans on the hot path: with custom plans PostgreSQL planned
        // the hot statements again at every execution (their LIMIT and array
        // sizes make a custom plan look cheaper), and planning took twice as
        // long as running them. A generic plan is made anew whenever ANALYZE
        // changes the statistics; the statements driven by an `unnest` of
        // ids (estimated at ten rows) keep probing the primary key, and the
        // lease names its rows as `id = ANY (array)` too, so that no
        // estimate of its LIMIT turns it into a scan of the whole table.
        //
        // Nor may statistics: the job tables churn, and an ANALYZE that saw
        // a few hundred live rows (say, just after a drain) made the lease's
        // generic plan update its picked rows through a sequential scan of
        // `jobs`. That plan ran until the next ANALYZE, seconds later, at 50
        // to 250 ms a lease while the table held its usual dead rows and
        // grew: at 5,000 jobs/s the handler latency's p99 rose to 0.4 to 2 s
        // (auto_explain caught it). Every statement on these connections
        // reads the job tables by an index, so sequential scans are priced
        // out here (`enable_seqscan = off` still allows one where no index
        // serves, such as the one-row settings table).
        //
        // Bitmap scans go too: after an ANALYZE of an empty `jobs` (the
        // moment a drain ends), the lease's generic plan read its candidates
        // through a bitmap scan of the (queue, sequence) index, that is,
        // every job of the queue, and sorted them: 116 to 130 ms a lease
        // once 50,000 jobs waited again, until the next ANALYZE. Without
        // bitmap scans the waiting index, which already holds the lease's
        // order, is the cheapest path whatever the statistics say.
        let generic = options.clone().options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("enable_bitmapscan", "off"),
        ]);
        let batch_connections = config.batch_connections.min(config.max_connections.saturating_sub(2));
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections - batch_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(generic.clone());
        let batch = (batch_connections > 0).then(|| {
            Arc::new(WarmPool::new(
                PgPoolOptions::new()
                    .max_connections(batch_connections)
                    .acquire_timeout(config.acquire_timeout)
                    .connect_lazy_with(generic),
            ))
        });
        let planned = PgPoolOptions::new()
            .max_connections(PLANNED_CONNECTIONS)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(options);
        let hot = Arc::new(WarmPool::new(pool));
        Ok(Self { hot, batch, planned, notify_suffix: new_notify_suffix(), growth: Arc::default() })
    }

    /// Wraps an existing pool (tests): all statements use it.
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            planned: pool.clone(),
            hot: Arc::new(WarmPool::new(pool)),
            batch: None,
            notify_suffix: new_notify_suffix(),
            growth: Arc::default(),
        }
    }

    /// Counts inserted jobs; every [`GROWTH_NUDGE_JOBS`] of them wake
    /// [`Store::job_tables_grew`].
    fn record_inserted(&self, jobs: usize) {
        use std::sync::atomic::Ordering;
        let jobs = u64::try_from(jobs).unwrap_or(u64::MAX);
        let before = self.growth.inserted.fetch_add(jobs, Ordering::Relaxed);
        if before / GROWTH_NUDGE_JOBS != before.saturating_add(jobs) / GROWTH_NUDGE_JOBS {
            self.growth.nudge.notify_one();
        }
    }

    /// Resolves once this store has inserted many jobs since the last time
    /// it resolved (the vacuumer then checks the statistics early).
    pub async fn job_tables_grew(&self) {
        self.growth.nudge.notified().await;
    }

    /// What this store appends to the queue name in the notifications of its
    /// enqueues.
    pub fn notify_suffix(&self) -> &str {
        &self.notify_suffix
    }

    /// A connection of its own, outside the pools, with their settings.
    pub async fn connect_dedicated(&self) -> Result<PgConnection> {
        Ok(PgConnection::connect_with(&self.pool().connect_options()).await?)
    }

    /// The hot path's pool, for statements off the hot path, LISTEN
    /// connections and health checks.
    pub fn pool(&self) -> &PgPool {
        self.hot.pool()
    }

    /// The connections of the group-commit statements (see [`warm`]).
    fn batch(&self) -> &WarmPool {
        self.batch.as_deref().unwrap_or(&self.hot)
    }

    /// Gives the connections the hot statements kept but have not used
    /// for a while back to their pools (see [`warm`]).
    pub fn return_idle_connections(&self) {
        self.hot.return_idle();
        if let Some(batch) = &self.batch {
            batch.return_idle();
        }
    }

    /// Open and idle connections of the hot path's pools, and the most they
    /// open together. Connections kept between statements count as idle.
    pub fn connection_counts(&self) -> ConnectionCounts {
        let pools = std::iter::once(&self.hot).chain(&self.batch);
        let mut counts = ConnectionCounts::default();
        for warm in pools {
            let pool = warm.pool();
            let open = pool.size();
            let idle = pool.num_idle().saturating_add(warm.kept_count());
            counts.open += open;
            counts.idle += u32::try_from(idle).unwrap_or(u32::MAX).min(open);
            counts.max += pool.options().get_max_connections();
        }
        counts
    }

    /// Closes the hot path's pools: waits for their connections to come
    /// back and closes them.
    pub async fn close(&self) {
        self.hot.close().await;
        if let Some(batch) = &self.batch {
            batch.close().await;
        }
    }

    /// Applies the embedded migrations that have not run yet, on a
    /// connection planned the ordinary way (a migration may rewrite a whole
    /// table, which the hot pool's settings would force through an index).
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.planned).await?;
        Ok(())
    }

    /// True when the database answers and every embedded migration is applied.
    pub async fn migrations_current(&self) -> Result<bool> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
                .fetch_all(self.pool())
                .await?;
        Ok(MIGRATOR
            .iter()
            .filter(|migration| !migration.migration_type.is_down_migration())
            .all(|migration| applied.contains(&migration.version)))
    }

    /// Runs `SELECT 1`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(self.pool()).await?;
        Ok(())
    }

    /// Sets the shard count. Allowed only while no job exists (shards of
    /// existing jobs would no longer match); returns the count in force.
    pub async fn settings_shard_count_set(&self, shard_count: u32) -> Result<u32> {
        let count = i32::try_from(shard_count).map_err(|_| Error::Rejected("shard count too large".to_owned()))?;
        let in_force: i32 = sqlx::query_scalar(
            "UPDATE workbroker.settings SET shard_count = $1 \
              WHERE NOT EXISTS (SELECT 1 FROM workbroker.jobs) \
                AND NOT EXISTS (SELECT 1 FROM workbroker.finished_jobs) \
             RETURNING shard_count",
        )
        .bind(count)
        .fetch_optional(self.pool())
        .await?
        .unwrap_or(i32::try_from(self.settings_shard_count().await?).unwrap_or(0));
        Ok(u32::try_from(in_force).unwrap_or(0))
    }

    /// The number of shards jobs are spread over.
    pub async fn settings_shard_count(&self) -> Result<u32> {
        let count: i32 =
            sqlx::query_scalar("SELECT shard_count FROM workbroker.settings").fetch_one(self.pool()).await?;
        Ok(u32::try_from(count).unwrap_or(1))
    }
}

/// Connections of the pool for statements planned with their parameters.
const PLANNED_CONNECTIONS: u32 = 3;

fn new_notify_suffix() -> Arc<str> {
    Arc::from(format!("@{}", Uuid::new_v4().simple()))
}

/// When a new job may first run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAt {
    /// Right away.
    Now,
    /// At this instant (microseconds since the Unix epoch).
    At { unix_micros: i64 },
    /// After this delay from enqueue (database clock).
    After(Duration),
}

/// A validated job to insert.
#[derive(Clone, Debug)]
pub struct NewJobRecord {
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    /// The attributes as a JSON object.
    pub attributes_json: String,
    pub priority: i32,
    pub run_at: RunAt,
    /// `None`: the queue's default.
    pub max_attempts: Option<i32>,
    pub ordering_key: Option<String>,
    pub dedup_key: Option<String>,
    /// `None`: the queue's default.
    pub lease_duration: Option<Duration>,
}

/// What an enqueue produced for one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnqueuedRecord {
    pub job_id: i64,
    pub sequence: i64,
    pub deduplicated: bool,
    /// The lease the job was inserted under, when it was handed off.
    pub handed_off: Option<HandedOff>,
}

/// A local lease stream that takes a new job straight from its enqueue.
#[derive(Clone, Copy, Debug)]
pub struct Handoff<'a> {
    pub worker_id: &'a str,
    /// The stream's lease duration; `None`: the job's own, else its queue's.
    pub lease_duration: Option<Duration>,
}

/// The lease of a job that was handed off at enqueue (attempt 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandedOff {
    pub lease_token: Uuid,
    pub lease_expires_at: DateTime<Utc>,
    pub max_attempts: i32,
    /// When the job was created and leased (one instant).
    pub leased_at: DateTime<Utc>,
}

/// A job as read from the database, with its public state.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct JobRecord {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    /// Public JobState number (1 scheduled .. 6 cancelled).
    pub state: i16,
    pub priority: i32,
    pub sequence: i64,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub ordering_key: Option<String>,
    pub dedup_key: Option<String>,
    pub lease_token: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub leased_by: Option<String>,
    pub last_error: Option<String>,
    pub payload: Vec<u8>,
    pub attributes: serde_json::Value,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<Vec<u8>>,
}

/// Closes a connection of its own ([`Store::connect_dedicated`]) politely;
/// one that fails to close is dropped all the same.
pub async fn close_connection(connection: PgConnection) {
    if let Err(error) = connection.close().await {
        tracing::debug!(%error, "closing a dedicated connection failed");
    }
}

/// Public job states as stored numbers (equal to the proto enum).
pub mod state {
    pub const SCHEDULED: i16 = 1;
    pub const AVAILABLE: i16 = 2;
    pub const LEASED: i16 = 3;
    pub const COMPLETED: i16 = 4;
    pub const DEAD: i16 = 5;
    pub const CANCELLED: i16 = 6;

    /// True for COMPLETED, DEAD and CANCELLED.
    pub fn is_terminal(state: i16) -> bool {
        matches!(state, COMPLETED | DEAD | CANCELLED)
    }
}

/// What to lease, for whom.
#[derive(Clone, Debug)]
pub struct LeaseParams<'a> {
    pub queues: &'a [String],
    /// Empty: every kind.
    pub kinds: &'a [String],
    pub limit: u32,
    /// `None`: the job's own lease duration, else its queue's.
    pub lease_duration: Option<Duration>,
    pub worker_id: &'a str,
    /// Only jobs of these shards; `None`: any shard.
    pub shards: Option<&'a [i32]>,
}

/// The per-item result of a fenced settle statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    Ok,
    StaleLease,
    NotFound,
}

/// What a batch of acks or nacks did: one output per item, and the queues
/// where it may have made jobs available (a job of an ordering key finished,
/// so the next one of that key may run; a nacked job went back to wait).
/// The statements send no notification: the caller wakes those queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled<T> {
    pub outputs: Vec<T>,
    /// Distinct, sorted.
    pub wake_queues: Vec<String>,
}

impl<T> Settled<T> {
    fn collect(rows: impl Iterator<Item = (T, Option<String>)>) -> Self {
        let mut outputs = Vec::new();
        let mut wake_queues = Vec::new();
        for (output, wake) in rows {
            outputs.push(output);
            wake_queues.extend(wake);
        }
        wake_queues.sort_unstable();
        wake_queues.dedup();
        Self { outputs, wake_queues }
    }
}

/// One ack of a batch.
#[derive(Clone, Debug)]
pub struct AckItem {
    pub job_id: i64,
    pub lease_token: Uuid,
    pub result: Vec<u8>,
}

/// One nack of a batch.
#[derive(Clone, Debug)]
pub struct NackItem {
    pub job_id: i64,
    pub lease_token: Uuid,
    pub error: String,
    /// `None`: the queue's backoff.
    pub retry_after: Option<Duration>,
    pub permanent: bool,
}

/// What a nack did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NackResult {
    pub outcome: SettleOutcome,
    /// Public state after the nack when `outcome` is Ok.
    pub next_state: Option<i16>,
}

/// One lease extension of a batch.
#[derive(Clone, Debug)]
pub struct ExtendItem {
    pub job_id: i64,
    pub lease_token: Uuid,
    pub extend_by: Duration,
}

/// What an extension did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendResult {
    pub outcome: SettleOutcome,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// A lease to hand back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLease {
    pub job_id: i64,
    pub lease_token: Uuid,
}

/// Whether handing a lease back uses up the attempt it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseAttempt {
    /// The lease counts as a failed attempt: the stream broke, so the job may
    /// have crashed its worker (a poison job must not loop forever).
    Counted,
    /// The attempt is given back: the worker ended its stream cleanly, or the
    /// broker is shutting down, or the job was never delivered.
    Refunded,
}

/// One job a lease-returning statement moved.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ReturnedJob {
    pub id: i64,
    pub queue: String,
    /// The producer's `traceparent` attribute, if any.
    pub traceparent: Option<String>,
    /// True when the job had used its last attempt and went DEAD; false when
    /// it went back to the queue.
    pub dead: bool,
}

/// What a cancel did.
#[derive(Clone, Debug)]
pub enum CancelResult {
    /// The job is now CANCELLED; `held_lease` is the lease it was under, if any.
    Cancelled {
        job: JobRecord,
        held_lease: Option<Uuid>,
    },
    /// The job had already reached a terminal state.
    AlreadyTerminal(JobRecord),
    NotFound,
}

/// Filter and cursor of a job listing.
#[derive(Clone, Debug)]
pub struct ListParams<'a> {
    pub queue: &'a str,
    /// Public state number, or `None` for every state.
    pub state: Option<i16>,
    /// Only jobs with a larger sequence.
    pub after_sequence: i64,
    pub limit: u32,
}
