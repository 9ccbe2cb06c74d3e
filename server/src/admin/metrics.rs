//! Prometheus metrics: the counters the hot path moves, the gauges a
//! background loop reads from the database, and the text exposition format.
//!
//! Three kinds of values, by cost:
//! - **Counters and the lease-latency histogram** live in [`Metrics`] and are
//!   moved by the code that does the work, once per batch and queue (one
//!   read-locked map look-up, then atomics): enqueue batches, lease
//!   statements, ack/nack batches, the reaper and stream releases. Each
//!   replica counts what *it* did, so `sum by (queue)` over replicas counts
//!   every job event once.
//! - **Database gauges** (jobs by queue and state, oldest waiting age, the
//!   vacuum-horizon watchdog) come from [`MetricsRefresher`], which runs the
//!   queue-stats and horizon queries every few seconds, never per scrape: the
//!   counts scan the job tables, and a scrape storm must not become a query
//!   storm. Every replica refreshes and reports the same cluster-wide values;
//!   aggregate them with `max by (queue)`.
//! - **Process gauges** (in-flight leases, leadership, owned shards, pool
//!   usage) are read from memory at scrape time.
//!
//! Labels are bounded: queue names and the fixed job states only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use tokio_util::sync::CancellationToken;

use crate::service::Shared;
use crate::store::observe::DatabaseHorizon;
use crate::store::{QueueStatsRecord, Store};

/// Default time between two database gauge refreshes.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Largest share of time the refreshes may spend refreshing.
const MAX_REFRESH_SHARE: f64 = 0.02;

/// Upper bounds (seconds) of the enqueue-to-lease latency buckets.
const LATENCY_BUCKETS: [f64; 17] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0];

/// A job event a counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// Inserted by Enqueue (deduplicated enqueues excluded).
    Enqueued,
    /// Handed to a worker.
    Leased,
    /// Acked with the current token.
    Acked,
    /// Nacked with the current token (retried or dead).
    Nacked,
    /// Lease expired and returned by the reaper (requeued or dead).
    Expired,
    /// Returned because the lease stream holding it ended (requeued or dead).
    Released,
    /// Went DEAD (nack, expiry or release on the last attempt, or permanent nack).
    Dead,
}

impl JobEvent {
    const ALL: [JobEvent; 7] = [
        JobEvent::Enqueued,
        JobEvent::Leased,
        JobEvent::Acked,
        JobEvent::Nacked,
        JobEvent::Expired,
        JobEvent::Released,
        JobEvent::Dead,
    ];

    /// The Prometheus metric name.
    pub fn metric_name(self) -> &'static str {
        match self {
            JobEvent::Enqueued => "workbroker_jobs_enqueued_total",
            JobEvent::Leased => "workbroker_jobs_leased_total",
            JobEvent::Acked => "workbroker_jobs_acked_total",
            JobEvent::Nacked => "workbroker_jobs_nacked_total",
            JobEvent::Expired => "workbroker_jobs_expired_total",
            JobEvent::Released => "workbroker_jobs_released_total",
            JobEvent::Dead => "workbroker_jobs_dead_total",
        }
    }

    fn help(self) -> &'static str {
        match self {
            JobEvent::Enqueued => "Jobs this replica inserted through Enqueue (deduplicated enqueues excluded).",
            JobEvent::Leased => "Jobs this replica leased to workers.",
            JobEvent::Acked => "Jobs acked with their current lease token through this replica.",
            JobEvent::Nacked => "Jobs nacked with their current lease token through this replica.",
            JobEvent::Expired => "Expired leases this replica's reaper returned (to the queue or to DEAD).",
            JobEvent::Released => "Leases returned because a lease stream on this replica ended.",
            JobEvent::Dead => "Jobs this replica moved to DEAD (nack, expiry or release on the last attempt).",
        }
    }

    fn index(self) -> usize {
        match self {
            JobEvent::Enqueued => 0,
            JobEvent::Leased => 1,
            JobEvent::Acked => 2,
            JobEvent::Nacked => 3,
            JobEvent::Expired => 4,
            JobEvent::Released => 5,
            JobEvent::Dead => 6,
        }
    }
}

/// A fixed-bucket histogram on atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(value.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counters and the latency histogram of one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    events: [AtomicU64; JobEvent::ALL.len()],
    /// Time from a job being due (its `run_at`) to its lease.
    pub lease_latency: Histogram,
}

impl QueueCounters {
    /// Adds `count` events.
    pub fn add(&self, event: JobEvent, count: u64) {
        if count > 0 {
            self.events[event.index()].fetch_add(count, Ordering::Relaxed);
        }
    }

    /// The current count of an event.
    pub fn get(&self, event: JobEvent) -> u64 {
        self.events[event.index()].load(Ordering::Relaxed)
    }
}

/// What the last database refresh read.
#[derive(Clone, Debug, Default)]
pub struct DatabaseGauges {
    pub queues: Vec<QueueStatsRecord>,
    pub horizon: Option<DatabaseHorizon>,
    pub refreshed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every metric of one broker, registered once and shared (through
/// [`Shared`] and the dispatcher) by whatever moves them.
#[derive(Debug, Default)]
pub struct Metrics {
    queues: RwLock<HashMap<String, Arc<QueueCounters>>>,
    database: RwLock<DatabaseGauges>,
    refresh_failures: AtomicU64,
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counters of `queue`, created on first use.
    pub fn queue(&self, queue: &str) -> Arc<QueueCounters> {
        if let Some(counters) = self.queues.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(queue) {
            return counters.clone();
        }
        self.queues
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(queue.to_owned())
            .or_default()
            .clone()
    }

    /// Adds events grouped by queue: one map look-up per distinct queue.
    pub fn add_by_queue<'a>(&self, event: JobEvent, queues: impl IntoIterator<Item = &'a str>) {
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for queue in queues {
            match counts.iter_mut().find(|(name, _)| *name == queue) {
                Some((_, count)) => *count += 1,
                None => counts.push((queue, 1)),
            }
        }
        for (queue, count) in counts {
            self.queue(queue).add(event, count);
        }
    }

    /// The counters of every queue seen so far, by name.
    pub fn queue_counters(&self) -> Vec<(String, Arc<QueueCounters>)> {
        let mut queues: Vec<(String, Arc<QueueCounters>)> = self
            .queues
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, counters)| (name.clone(), counters.clone()))
            .collect();
        queues.sort_by(|left, right| left.0.cmp(&right.0));
        queues
    }

    /// The last database gauges.
    pub fn database(&self) -> DatabaseGauges {
        self.database.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_database(&self, gauges: DatabaseGauges) {
        *self.database.write().unwrap_or_else(std::sync::PoisonError::into_inner) = gauges;
    }
}

/// Reads the database gauges into [`Metrics`] every `interval`.
pub struct MetricsRefresher {
    store: Store,
    metrics: Arc<Metrics>,
    interval: Duration,
}

impl MetricsRefresher {
    /// A refresher with the default interval.
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics, interval: DEFAULT_REFRESH_INTERVAL }
    }

    /// Refreshes until `shutdown`; the first refresh runs at once. A
    /// refresh counts the unfinished jobs, so its cost grows with the
    /// backlog: the next one waits at least [`MAX_REFRESH_SHARE`]⁻¹ times as
    /// long as the last took, keeping the database's share of work for it
    /// small however deep the queues get.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failing = false;
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            let started = tokio::time::Instant::now();
            let refreshed = self.run_once().await;
            wait = self.interval.max(started.elapsed().mul_f64(1.0 / MAX_REFRESH_SHARE));
            match refreshed {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("metrics refresh recovered");
                }
                Ok(()) => {}
                Err(error) => {
                    self.metrics.refresh_failures.fetch_add(1, Ordering::Relaxed);
                    // Logged once per outage, not every tick.
                    if !failing {
                        tracing::warn!(%error, "metrics refresh failed; database gauges are stale");
                    }
                    failing = true;
                }
            }
        }
    }

    /// One refresh: queue stats and the vacuum horizon.
    #[tracing::instrument(name = "metrics.refresh", skip_all, level = "debug")]
    pub async fn run_once(&self) -> crate::store::Result<()> {
        let queues = self.store.queue_stats(None).await?;
        let horizon = self.store.health_database_horizon().await?;
        self.metrics.set_database(DatabaseGauges {
            queues,
            horizon: Some(horizon),
            refreshed_at: Some(chrono::Utc::now()),
        });
        Ok(())
    }
}

/// Escapes a label value of the text format.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (index, (key, label)) in labels.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label(label));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    sample(out, name, &[], value);
}

/// Seconds as the text format writes them.
fn seconds(value: Duration) -> f64 {
    value.as_secs_f64()
}

/// Renders every metric of `shared` in the Prometheus text format (0.0.4).
pub fn render(shared: &Shared) -> String {
    let metrics = &shared.metrics;
    let mut out = String::with_capacity(8 * 1024);

    header(&mut out, "workbroker_build_info", "gauge", "Version of this broker; always 1.");
    sample(&mut out, "workbroker_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    let queues = metrics.queue_counters();
    for event in JobEvent::ALL {
        let name = event.metric_name();
        header(&mut out, name, "counter", event.help());
        for (queue, counters) in &queues {
            sample(&mut out, name, &[("queue", queue)], counters.get(event));
        }
    }

    let latency = "workbroker_job_lease_latency_seconds";
    header(
        &mut out,
        latency,
        "histogram",
        "Time from a job being due (enqueue, or the end of its delay or backoff) to its lease.",
    );
    for (queue, counters) in &queues {
        let histogram = &counters.lease_latency;
        let mut cumulative = 0;
        for (index, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += histogram.buckets[index].load(Ordering::Relaxed);
            sample(&mut out, &format!("{latency}_bucket"), &[("queue", queue), ("le", &bound.to_string())], cumulative);
        }
        cumulative += histogram.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        sample(&mut out, &format!("{latency}_bucket"), &[("queue", queue), ("le", "+Inf")], cumulative);
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        sample(&mut out, &format!("{latency}_sum"), &[("queue", queue)], sum);
        sample(&mut out, &format!("{latency}_count"), &[("queue", queue)], cumulative);
    }

    let database = metrics.database();
    header(
        &mut out,
        "workbroker_jobs",
        "gauge",
        "Jobs by queue and state (database-wide, refreshed every few seconds).",
    );
    for stats in &database.queues {
        for (state, count) in jobs_by_state(stats) {
            sample(&mut out, "workbroker_jobs", &[("queue", &stats.queue), ("state", state)], count);
        }
    }
    let oldest = "workbroker_queue_oldest_available_age_seconds";
    header(&mut out, oldest, "gauge", "Age of the oldest job waiting to be leased, per queue (0 when none waits).");
    for stats in &database.queues {
        sample(&mut out, oldest, &[("queue", &stats.queue)], seconds(stats.oldest_available_age));
    }
    header(&mut out, "workbroker_queue_paused", "gauge", "1 while a queue is paused.");
    for stats in &database.queues {
        sample(&mut out, "workbroker_queue_paused", &[("queue", &stats.queue)], u8::from(stats.paused));
    }
    let watermark = "workbroker_queue_completed_watermark";
    header(&mut out, watermark, "gauge", "Largest sequence up to which every job of the queue is terminal.");
    for stats in &database.queues {
        sample(&mut out, watermark, &[("queue", &stats.queue)], stats.completed_watermark);
    }
    // Families are always announced; samples appear once the first refresh read them.
    let transaction_age = "workbroker_db_oldest_transaction_age_seconds";
    header(
        &mut out,
        transaction_age,
        "gauge",
        "Age of the oldest open transaction of another session on the database; long ones stop vacuum.",
    );
    if let Some(horizon) = &database.horizon {
        sample(&mut out, transaction_age, &[], horizon.oldest_transaction_seconds);
    }
    let xmin_age = "workbroker_db_xmin_horizon_age";
    header(
        &mut out,
        xmin_age,
        "gauge",
        "Transactions between now and the oldest xmin or transaction id holding back vacuum (sessions, slots, prepared).",
    );
    if let Some(horizon) = &database.horizon {
        sample(&mut out, xmin_age, &[], horizon.xmin_horizon_age);
    }
    if let Some(refreshed_at) = database.refreshed_at {
        gauge(
            &mut out,
            "workbroker_db_gauges_refreshed_timestamp_seconds",
            "When the database gauges were last read (Unix time).",
            refreshed_at.timestamp_micros() as f64 / 1e6,
        );
    }
    header(&mut out, "workbroker_db_gauges_refresh_failures_total", "counter", "Database gauge refreshes that failed.");
    sample(
        &mut out,
        "workbroker_db_gauges_refresh_failures_total",
        &[],
        metrics.refresh_failures.load(Ordering::Relaxed),
    );

    let streams = shared.dispatcher.streams();
    gauge(&mut out, "workbroker_lease_streams", "Open Lease streams on this replica.", streams.len());
    gauge(
        &mut out,
        "workbroker_leases_in_flight",
        "Leases held by workers connected to this replica.",
        shared.dispatcher.held_leases(),
    );
    gauge(
        &mut out,
        "workbroker_leader",
        "1 while this replica is the trusted leader (runs the reaper and the rebalancer).",
        u8::from(shared.cluster.is_trusted_leader()),
    );
    let snapshot = shared.cluster.snapshot();
    gauge(
        &mut out,
        "workbroker_owned_shards",
        "Shards this replica owns in the current shard map.",
        snapshot.shard_map.shards_of(&snapshot.self_id).len(),
    );
    gauge(&mut out, "workbroker_shards", "Shards jobs are spread over.", shared.cluster.shard_count());
    gauge(&mut out, "workbroker_cluster_members", "Live members this replica sees.", snapshot.members.len());
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        gauge(
            &mut out,
            "workbroker_runtime_threads",
            "Worker threads of the broker's async runtime (--runtime-threads).",
            runtime.metrics().num_workers(),
        );
    }

    let counts = shared.store.connection_counts();
    header(&mut out, "workbroker_db_pool_connections", "gauge", "Open database connections by state.");
    sample(&mut out, "workbroker_db_pool_connections", &[("state", "idle")], counts.idle);
    sample(&mut out, "workbroker_db_pool_connections", &[("state", "in_use")], counts.open - counts.idle);
    gauge(&mut out, "workbroker_db_pool_max_connections", "Most database connections this replica opens.", counts.max);
    out
}

/// Exports the same values over OpenTelemetry (OTLP) when a meter provider
/// is installed globally (see [`crate::telemetry`]); with none, the global
/// meter is a no-op and this costs nothing. The callbacks hold only a weak
/// reference, so a stopped broker's metrics simply stop being reported.
pub fn register_opentelemetry(shared: &Arc<Shared>) {
    let meter = opentelemetry::global::meter("workbroker");
    for event in JobEvent::ALL {
        let weak = Arc::downgrade(shared);
        meter
            .u64_observable_counter(event.metric_name().trim_end_matches("_total").replace('_', "."))
            .with_description(event.help())
            .with_callback(move |observer| {
                let Some(shared) = weak.upgrade() else { return };
                for (queue, counters) in shared.metrics.queue_counters() {
                    observer.observe(counters.get(event), &[KeyValue::new("messaging.destination.name", queue)]);
                }
            })
            .build();
    }
    let weak = Arc::downgrade(shared);
    meter
        .u64_observable_gauge("workbroker.jobs")
        .with_description("Jobs by queue and state.")
        .with_callback(move |observer| {
            let Some(shared) = weak.upgrade() else { return };
            for stats in shared.metrics.database().queues {
                for (state, count) in jobs_by_state(&stats) {
                    observer.observe(
                        count,
                        &[
                            KeyValue::new("messaging.destination.name", stats.queue.clone()),
                            KeyValue::new("state", state),
                        ],
                    );
                }
            }
        })
        .build();
    let weak = Arc::downgrade(shared);
    meter
        .f64_observable_gauge("workbroker.queue.oldest_available_age")
        .with_unit("s")
        .with_description("Age of the oldest job waiting to be leased.")
        .with_callback(move |observer| {
            let Some(shared) = weak.upgrade() else { return };
            for stats in shared.metrics.database().queues {
                observer.observe(
                    seconds(stats.oldest_available_age),
                    &[KeyValue::new("messaging.destination.name", stats.queue.clone())],
                );
            }
        })
        .build();
    register_process_gauges(&meter, Arc::downgrade(shared));
}

/// An OpenTelemetry gauge read from the broker: name, description, reader.
type ProcessGauge = (&'static str, &'static str, fn(&Shared) -> f64);

fn register_process_gauges(meter: &opentelemetry::metrics::Meter, weak: Weak<Shared>) {
    let gauges: [ProcessGauge; 6] = [
        ("workbroker.leases.in_flight", "Leases held by workers connected to this replica.", |shared| {
            shared.dispatcher.held_leases() as f64
        }),
        ("workbroker.leader", "1 while this replica is the trusted leader.", |shared| {
            f64::from(u8::from(shared.cluster.is_trusted_leader()))
        }),
        ("workbroker.owned_shards", "Shards this replica owns.", |shared| {
            let snapshot = shared.cluster.snapshot();
            snapshot.shard_map.shards_of(&snapshot.self_id).len() as f64
        }),
        ("workbroker.db.pool.connections", "Open database connections.", |shared| {
            f64::from(shared.store.connection_counts().open)
        }),
        (
            "workbroker.db.oldest_transaction_age",
            "Age of the oldest open transaction of another session, in seconds.",
            |shared| shared.metrics.database().horizon.map_or(0.0, |horizon| horizon.oldest_transaction_seconds),
        ),
        (
            "workbroker.db.xmin_horizon_age",
            "Transactions between now and the oldest xmin holding back vacuum.",
            |shared| shared.metrics.database().horizon.map_or(0.0, |horizon| horizon.xmin_horizon_age as f64),
        ),
    ];
    for (name, description, read) in gauges {
        let weak = weak.clone();
        meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| {
                if let Some(shared) = weak.upgrade() {
                    observer.observe(read(&shared), &[]);
                }
            })
            .build();
    }
}

/// A queue's job counts by state label, in the order metrics list them.
fn jobs_by_state(stats: &QueueStatsRecord) -> [(&'static str, u64); 6] {
    [
        ("scheduled", stats.scheduled),
        ("available", stats.available),
        ("leased", stats.leased),
        ("completed", stats.completed),
        ("dead", stats.dead),
        ("cancelled", stats.cancelled),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_when_rendered_and_count_everything() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_millis(1));
        histogram.observe(Duration::from_millis(30));
        histogram.observe(Duration::from_secs(100_000));
        assert_eq!(histogram.count(), 3);
        assert_eq!(histogram.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(histogram.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn events_are_grouped_by_queue() {
        let metrics = Metrics::new();
        metrics.add_by_queue(JobEvent::Acked, ["a", "b", "a"]);
        assert_eq!(metrics.queue("a").get(JobEvent::Acked), 2);
        assert_eq!(metrics.queue("b").get(JobEvent::Acked), 1);
        assert_eq!(metrics.queue("a").get(JobEvent::Nacked), 0);
    }
}
