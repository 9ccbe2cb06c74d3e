//! The named scenarios. Producers are raw gRPC clients (one connection each;
//! the one-job producers on two threads of their own, as pgbench's clients);
//! workers are SDK workers with a no-op handler (one connection each).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;
use workbroker_api::v1;
use workbroker_api::v1::admin_client::AdminClient;
use workbroker_api::v1::broker_client::BrokerClient;
use workbroker_worker_sdk::worker::WorkerMetrics;
use workbroker_worker_sdk::{Client, JobContext, Output, Worker, handler_fn};

use crate::broker::BrokerUnderTest;
use crate::report::{LateJobs, Latency, ScenarioResult};

/// Sizes of a run.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub jobs: u64,
    pub producers: usize,
    /// Connections the 16 one-job producers share (16: one each).
    pub single_connections: usize,
    pub workers: usize,
    pub concurrency: u32,
    pub seconds: u64,
    pub rate: u64,
    pub backlog: u64,
    pub small_backlog: u64,
    pub keys: u64,
    pub leases_in_flight: u32,
    /// Jobs drained (and timed) out of each backlog per round.
    pub backlog_drain: u64,
    /// Timed rounds of the backlog scenario (after one untimed round).
    pub backlog_rounds: usize,
    /// Completed-job retention of the steady scenario's queue.
    pub steady_retention: Duration,
    /// How often the steady scenario samples table and index sizes.
    pub size_sample_interval: Duration,
    /// Which repetition of the scenario this is (0-based): keeps queue names
    /// of repeated runs apart.
    pub run: usize,
    /// Workers of the drain scenarios connect here (comma-separated
    /// endpoints); default: the broker under test.
    pub worker_endpoints: Option<String>,
}

impl Sizes {
    /// A queue name of this run.
    fn queue(&self, base: &str) -> String {
        format!("{base}-{}", self.run)
    }
}

async fn admin(endpoint: &str) -> Result<AdminClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())?.connect().await?;
    Ok(AdminClient::new(channel))
}

async fn set_paused(endpoint: &str, queue: &str, paused: bool) -> Result<()> {
    let mut admin = admin(endpoint).await?;
    if paused {
        admin.pause_queue(v1::PauseQueueRequest { queue: queue.to_owned() }).await?;
    } else {
        admin.resume_queue(v1::ResumeQueueRequest { queue: queue.to_owned() }).await?;
    }
    Ok(())
}

/// How long started workers get to open their lease streams before a
/// drain's clock starts.
const WORKERS_SETTLE: Duration = Duration::from_millis(500);

async fn producer(endpoint: &str) -> Result<BrokerClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())?.tcp_nodelay(true).connect().await?;
    Ok(BrokerClient::new(channel).max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20))
}

fn job(queue: &str, key: Option<String>, payload: Vec<u8>) -> v1::NewJob {
    v1::NewJob {
        queue: queue.to_owned(),
        kind: "noop".to_owned(),
        payload,
        ordering_key: key.unwrap_or_default(),
        ..Default::default()
    }
}

/// Opens `count` producer connections (at least one).
async fn producers(endpoint: &str, count: usize) -> Result<Vec<BrokerClient<tonic::transport::Channel>>> {
    let mut clients = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        clients.push(producer(endpoint).await?);
    }
    Ok(clients)
}

/// Enqueues `count` jobs in batches of `batch` over the given producer
/// connections. `keys`: give job i the ordering key `key-(i mod keys)`.
async fn fill(
    clients: Vec<BrokerClient<tonic::transport::Channel>>,
    queue: &str,
    count: u64,
    batch: u64,
    keys: Option<u64>,
) -> Result<()> {
    fill_from(clients, queue, count, batch, keys, Arc::new(std::sync::atomic::AtomicU64::new(0))).await
}

/// `fill` with the index of the next job to send shared with other callers.
async fn fill_from(
    clients: Vec<BrokerClient<tonic::transport::Channel>>,
    queue: &str,
    count: u64,
    batch: u64,
    keys: Option<u64>,
    next: Arc<std::sync::atomic::AtomicU64>,
) -> Result<()> {
    let mut tasks = Vec::new();
    for mut client in clients {
        let next = next.clone();
        let queue = queue.to_owned();
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch, std::sync::atomic::Ordering::SeqCst);
                if start >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let end = (start + batch).min(count);
                let jobs = (start..end)
                    .map(|index| job(&queue, keys.map(|keys| format!("key-{}", index % keys)), Vec::new()))
                    .collect();
                client.enqueue(v1::EnqueueRequest { jobs }).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Starts `workers` SDK workers on `queue`; returns their metrics and a stop token.
async fn start_workers(
    endpoint: &str,
    queue: &str,
    workers: usize,
    concurrency: u32,
    handler_delay: Option<Duration>,
    latencies: Option<Arc<Mutex<LatencyRecorder>>>,
) -> Result<(Vec<WorkerMetrics>, CancellationToken, Vec<tokio::task::JoinHandle<()>>)> {
    let stop = CancellationToken::new();
    let mut metrics = Vec::new();
    let mut handles = Vec::new();
    let endpoints: Vec<String> = endpoint.split(',').map(str::to_owned).collect();
    for index in 0..workers.max(1) {
        // Several endpoints (comma-separated): one worker spans them all.
        let client = if endpoints.len() > 1 {
            Client::connect_many(endpoints.clone())?
        } else {
            Client::connect(endpoint.to_owned()).await?
        };
        let latencies = latencies.clone();
        let worker = Worker::builder(client)
            .worker_id(format!("bench-{index}"))
            .queues([queue.to_owned()])
            .concurrency(concurrency)
            .handler(
                "noop",
                handler_fn(move |job: JobContext| {
                    let latencies = latencies.clone();
                    async move {
                        if let Some(latencies) = latencies {
                            record_latency(&latencies, job.payload());
                        }
                        if let Some(delay) = handler_delay {
                            tokio::time::sleep(delay).await;
                        }
                        Ok(Output::none())
                    }
                }),
            )
            .build()?;
        metrics.push(worker.metrics());
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            if let Err(error) = worker.run(stop).await {
                eprintln!("bench worker stopped: {error}");
            }
        }));
    }
    Ok((metrics, stop, handles))
}

async fn stop_workers(stop: CancellationToken, handles: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for handle in handles {
        let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
    }
}

fn acked(metrics: &[WorkerMetrics]) -> u64 {
    metrics.iter().map(|metrics| metrics.snapshot().acks_ok).sum()
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// A job slower than this (the p99 target) is counted against the second
/// of the run in which it was sent, so that a stall can be put beside the
/// broker's and PostgreSQL's logs.
const LATE_MICROS: u64 = 10_000;

/// Enqueue-to-handler latencies of the latency scenario.
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
    /// When sending started (Unix nanoseconds, as in the payloads); set
    /// by [`LatencyRecorder::start_sending`].
    origin_nanos: u128,
    /// Jobs later than [`LATE_MICROS`], by the second of the run they were sent in.
    late_by_second: BTreeMap<u64, u64>,
}

impl LatencyRecorder {
    fn new() -> Result<Self> {
        Ok(Self {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            origin_nanos: 0,
            late_by_second: BTreeMap::new(),
        })
    }

    /// Marks the start of sending: second 0 of the late-job counts.
    fn start_sending(&mut self) {
        self.origin_nanos = now_nanos();
    }

    /// Records a job sent at `sent_nanos` that started at `started_nanos`.
    fn record(&mut self, sent_nanos: u128, started_nanos: u128) {
        let micros = u64::try_from(started_nanos.saturating_sub(sent_nanos) / 1_000).unwrap_or(u64::MAX);
        let _ = self.histogram.record(micros.max(1));
        if micros > LATE_MICROS {
            let second =
                u64::try_from(sent_nanos.saturating_sub(self.origin_nanos) / 1_000_000_000).unwrap_or(u64::MAX);
            *self.late_by_second.entry(second).or_default() += 1;
        }
    }
}

fn record_latency(latencies: &Mutex<LatencyRecorder>, payload: &[u8]) {
    let Ok(bytes) = <[u8; 16]>::try_from(payload) else { return };
    let sent = u128::from_le_bytes(bytes);
    let started = now_nanos();
    if let Ok(mut latencies) = latencies.lock() {
        latencies.record(sent, started);
    }
}

/// Waits until the workers acked `expected` jobs (read from their metrics, so
/// the wait puts no load on the database), then confirms with one query that
/// nothing of `queue` is left unfinished; returns the elapsed time since
/// `started`.
async fn wait_finished(
    broker: &BrokerUnderTest,
    metrics: &[WorkerMetrics],
    expected: u64,
    queue: &str,
    started: Instant,
    limit: Duration,
) -> Result<Duration> {
    while acked(metrics) < expected {
        anyhow::ensure!(started.elapsed() < limit, "queue {queue} not drained within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    while broker.unfinished(queue).await? > 0 {
        anyhow::ensure!(started.elapsed() < limit, "queue {queue} not drained within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(elapsed)
}

async fn result(
    broker: &BrokerUnderTest,
    name: &str,
    jobs: u64,
    elapsed: Duration,
    before: crate::broker::CpuSnapshot,
    ceiling: Option<&'static str>,
) -> Result<ScenarioResult> {
    let after = broker.snapshot();
    let (broker_cpu_seconds, harness_cpu_seconds) = after.cpu_since(&before);
    let sizes = broker.table_sizes().await?;
    Ok(ScenarioResult {
        name: name.to_owned(),
        jobs,
        seconds: elapsed.as_secs_f64(),
        jobs_per_second: jobs as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: None,
        broker_cpu_seconds,
        harness_cpu_seconds,
        broker_rss_mib: after.broker.map(|sample| sample.rss_mib),
        broker_peak_rss_mib: after.broker.map(|sample| sample.peak_rss_mib),
        sizes,
        size_samples: Vec::new(),
        ceiling,
        ratio: None,
        paired_ceiling: None,
        paired_ratio: None,
        runs: Vec::new(),
        notes: Vec::new(),
    })
}

/// Creates a queue with its defaults (as `ConfigureQueue` with no settings does).
async fn create_queue(endpoint: &str, queue: &str) -> Result<()> {
    admin(endpoint)
        .await?
        .configure_queue(v1::ConfigureQueueRequest { queue: queue.to_owned(), ..Default::default() })
        .await?;
    Ok(())
}

pub async fn enqueue_bulk(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<ScenarioResult> {
    // The queue exists and the connections are open before the clock
    // starts, as pgbench's table exists and its figures leave out its
    // connection time: the figure is enqueue throughput, not a queue's
    // one-time creation.
    let queue = sizes.queue("bench-bulk");
    create_queue(&broker.endpoint, &queue).await?;
    let clients = producers(&broker.endpoint, sizes.producers).await?;
    let before = broker.snapshot();
    let started = Instant::now();
    fill(clients, &queue, sizes.jobs, 1000, None).await?;
    result(broker, "enqueue-bulk", sizes.jobs, started.elapsed(), before, Some("bulk_insert_1000")).await
}

pub async fn enqueue_single(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<ScenarioResult> {
    let queue = sizes.queue("bench-single");
    create_queue(&broker.endpoint, &queue).await?;
    let clients = Clients { callers: SINGLE_PRODUCERS, connections: sizes.single_connections };
    let threads =
        ProducerThreads::connect(&broker.endpoint, &queue, sizes.jobs, clients, SINGLE_PRODUCER_THREADS).await?;
    let before = broker.snapshot();
    let started = Instant::now();
    threads.fill().await?;
    let name = match sizes.single_connections {
        connections if connections >= SINGLE_PRODUCERS => format!("enqueue-single ({SINGLE_PRODUCERS} clients)"),
        connections => format!("enqueue-single ({SINGLE_PRODUCERS} clients, {connections} conn.)"),
    };
    result(broker, &name, sizes.jobs, started.elapsed(), before, Some("single_insert_16")).await
}

/// One-job producers: as many as the ceiling's pgbench clients (`-c 16`).
const SINGLE_PRODUCERS: usize = 16;

/// Threads the one-job producers run on: as many as the ceiling's pgbench
/// (`-j 2`).
const SINGLE_PRODUCER_THREADS: usize = 2;

/// Concurrent callers, and the connections they share.
#[derive(Clone, Copy, Debug)]
struct Clients {
    callers: usize,
    connections: usize,
}

impl Clients {
    /// This thread's share when `threads` threads split them: callers and
    /// connections alike as evenly as they go, at least one connection and
    /// no more connections than callers.
    fn share(self, thread: usize, threads: usize) -> Self {
        let split = |total: usize| total / threads + usize::from(thread < total % threads);
        let callers = split(self.callers);
        Self { callers, connections: split(self.connections).clamp(1, callers.max(1)) }
    }
}

/// Producers on OS threads of their own, each thread a single-threaded
/// runtime that drives its share of the connections, as pgbench's threads
/// each drive theirs: a call, its connection's I/O and the wake-up of its
/// caller stay on one thread instead of crossing between the harness's
/// runtime threads.
struct ProducerThreads {
    go: tokio::sync::watch::Sender<bool>,
    done: Vec<tokio::sync::oneshot::Receiver<Result<()>>>,
}

impl ProducerThreads {
    /// Starts `threads` threads with the clients and their connections split
    /// between them, and returns once every connection is open; the jobs wait
    /// for `fill`. Clients of a thread take its connections in turn.
    async fn connect(endpoint: &str, queue: &str, count: u64, clients: Clients, threads: usize) -> Result<Self> {
        let threads = threads.clamp(1, clients.callers.max(1));
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (go, _) = tokio::sync::watch::channel(false);
        let (ready_sender, mut ready) = tokio::sync::mpsc::channel::<()>(threads);
        let mut done = Vec::with_capacity(threads);
        for thread in 0..threads {
            let share = clients.share(thread, threads);
            let (endpoint, queue, next) = (endpoint.to_owned(), queue.to_owned(), next.clone());
            let (ready_sender, mut go) = (ready_sender.clone(), go.subscribe());
            let (done_sender, done_receiver) = tokio::sync::oneshot::channel();
            done.push(done_receiver);
            std::thread::Builder::new().name(format!("producers-{thread}")).spawn(move || {
                let outcome = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            let connections = producers(&endpoint, share.connections).await?;
                            let clients = connections.iter().cycle().take(share.callers.max(1)).cloned().collect();
                            // Sent, the sender goes: a thread that fails
                            // drops its own, so the wait for the rest ends.
                            let sent = ready_sender.send(()).await;
                            drop(ready_sender);
                            sent.context("the harness stopped waiting")?;
                            go.wait_for(|go| *go).await.context("the harness stopped waiting")?;
                            fill_from(clients, &queue, count, 1, None, next).await
                        })
                    });
                let _ = done_sender.send(outcome);
            })?;
        }
        drop(ready_sender);
        while ready.recv().await.is_some() {}
        Ok(Self { go, done })
    }

    /// Lets the threads send their jobs and waits until they have.
    async fn fill(self) -> Result<()> {
        self.go.send_replace(true);
        for done in self.done {
            done.await.context("a producer thread ended without an outcome")??;
        }
        Ok(())
    }
}

/// Fills `queue` while it is paused, starts the workers and lets them open
/// their streams, then resumes the queue and times the drain: the figure is
/// the drain alone, not the producers or the workers' start.
async fn drain_queue(
    broker: &BrokerUnderTest,
    sizes: &Sizes,
    queue: &str,
    name: &str,
    keys: Option<u64>,
) -> Result<ScenarioResult> {
    set_paused(&broker.endpoint, queue, true).await?;
    fill(producers(&broker.endpoint, sizes.producers).await?, queue, sizes.jobs, 1000, keys).await?;
    let worker_endpoints = sizes.worker_endpoints.clone().unwrap_or_else(|| broker.endpoint.clone());
    let (metrics, stop, handles) =
        start_workers(&worker_endpoints, queue, sizes.workers, sizes.concurrency, None, None).await?;
    tokio::time::sleep(WORKERS_SETTLE).await;
    let before = broker.snapshot();
    let started = Instant::now();
    set_paused(&broker.endpoint, queue, false).await?;
    let elapsed = wait_finished(broker, &metrics, sizes.jobs, queue, started, Duration::from_secs(600)).await?;
    stop_workers(stop, handles).await;
    result(broker, name, sizes.jobs, elapsed, before, Some("drain_lease100_delete100")).await
}

pub async fn drain(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<ScenarioResult> {
    drain_queue(broker, sizes, &sizes.queue("bench-drain"), "drain", None).await
}

pub async fn ordered(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<ScenarioResult> {
    let name = format!("ordered ({} keys)", sizes.keys);
    drain_queue(broker, sizes, &sizes.queue("bench-ordered"), &name, Some(sizes.keys.max(1))).await
}

/// Producers (100 jobs per call) and workers at once for `sizes.seconds`:
/// completed jobs per second, and the job tables' sizes sampled every
/// `sizes.size_sample_interval` (the queue keeps completed jobs for
/// `sizes.steady_retention`, so a long run reaches the size retention
/// implies; growth beyond it is bloat).
pub async fn steady(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<ScenarioResult> {
    let queue = sizes.queue("bench-steady");
    admin(&broker.endpoint)
        .await?
        .configure_queue(v1::ConfigureQueueRequest {
            queue: queue.clone(),
            completed_retention: Some(workbroker_api::time::duration_to_proto(sizes.steady_retention)),
            ..Default::default()
        })
        .await?;
    let (metrics, stop, handles) =
        start_workers(&broker.endpoint, &queue, sizes.workers, sizes.concurrency, None, None).await?;
    tokio::time::sleep(WORKERS_SETTLE).await;
    let sizes_before = broker.table_sizes().await?;
    let before = broker.snapshot();
    let deadline = Instant::now() + Duration::from_secs(sizes.seconds);
    let mut producer_tasks = Vec::new();
    for _ in 0..sizes.producers.max(1) {
        let mut client = producer(&broker.endpoint).await?;
        let queue = queue.clone();
        producer_tasks.push(tokio::spawn(async move {
            let mut sent = 0_u64;
            while Instant::now() < deadline {
                let jobs = (0..100).map(|_| job(&queue, None, Vec::new())).collect();
                client.enqueue(v1::EnqueueRequest { jobs }).await?;
                sent += 100;
            }
            Ok::<_, anyhow::Error>(sent)
        }));
    }
    let acked_at_start = acked(&metrics);
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = started + sizes.size_sample_interval;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= next_sample {
            samples.push((started.elapsed().as_secs_f64(), broker.table_sizes().await?));
            next_sample += sizes.size_sample_interval;
        }
    }
    let mut enqueued = 0;
    for producer in producer_tasks {
        enqueued += producer.await??;
    }
    let elapsed = started.elapsed();
    let completed = acked(&metrics) - acked_at_start;
    stop_workers(stop, handles).await;
    let mut outcome =
        result(broker, "steady (enqueue+lease+ack)", completed, elapsed, before, Some("lifecycle_100")).await?;
    outcome.notes.push(format!("enqueued {enqueued}, completed {completed} in the window"));
    outcome.notes.push(format!("sizes at start: {}", sizes_before.describe()));
    for (seconds, sample) in &samples {
        outcome.notes.push(format!("sizes at {seconds:.0} s: {}", sample.describe()));
    }
    outcome.notes.push(format!("sizes at end: {}", outcome.sizes.describe()));
    outcome.size_samples = std::iter::once((0.0, sizes_before)).chain(samples).collect();
    Ok(outcome)
}

pub async fn latency(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<ScenarioResult> {
    let queue = sizes.queue(&format!("bench-latency-{}", sizes.rate));
    let recorder = Arc::new(Mutex::new(LatencyRecorder::new()?));
    let (metrics, stop, handles) =
        start_workers(&broker.endpoint, &queue, 1, sizes.concurrency, None, Some(recorder.clone())).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = broker.snapshot();
    let total = sizes.rate * sizes.seconds;
    let interval = Duration::from_secs_f64(1.0 / sizes.rate.max(1) as f64);
    // Open loop: each job is sent at its due time whatever the answers of
    // earlier ones, from a pool of connections, with a bound on requests in
    // flight (a broker that cannot keep up shows as latency, not as a slower
    // sender).
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(producer(&broker.endpoint).await?);
    }
    let in_flight = Arc::new(tokio::sync::Semaphore::new(1024));
    recorder.lock().map_err(|_| anyhow::anyhow!("latency lock poisoned"))?.start_sending();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        let due = started + interval.mul_f64(index as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = clients[(index % 16) as usize].clone();
        let queue = queue.clone();
        tasks.spawn(async move {
            let payload = now_nanos().to_le_bytes().to_vec();
            let sent = client.enqueue(v1::EnqueueRequest { jobs: vec![job(&queue, None, payload)] }).await;
            drop(permit);
            sent.map(|_| ()).map_err(anyhow::Error::from)
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    wait_finished(broker, &metrics, total, &queue, started, Duration::from_secs(sizes.seconds + 60)).await?;
    let elapsed = started.elapsed();
    stop_workers(stop, handles).await;
    let (histogram, late_by_second, origin_nanos) = {
        let recorder = recorder.lock().map_err(|_| anyhow::anyhow!("latency lock poisoned"))?;
        (recorder.histogram.clone(), recorder.late_by_second.clone(), recorder.origin_nanos)
    };
    let mut outcome = result(broker, &format!("latency @ {}/s", sizes.rate), total, elapsed, before, None).await?;
    let millis = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    outcome.latency = Some(Latency {
        samples: histogram.len(),
        p50_ms: millis(0.5),
        p90_ms: millis(0.9),
        p99_ms: millis(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        late: Some(LateJobs {
            over_ms: LATE_MICROS as f64 / 1000.0,
            by_second: late_by_second.into_iter().collect(),
            sending_started_unix: origin_nanos as f64 / 1e9,
        }),
    });
    Ok(outcome)
}

/// Fills `queue` (paused) to `backlog` jobs and connects the workers.
async fn prepare_backlog(
    broker: &BrokerUnderTest,
    sizes: &Sizes,
    queue: &str,
    backlog: u64,
) -> Result<(Vec<WorkerMetrics>, CancellationToken, Vec<tokio::task::JoinHandle<()>>)> {
    set_paused(&broker.endpoint, queue, true).await?;
    fill(producers(&broker.endpoint, sizes.producers).await?, queue, backlog, 1000, None).await?;
    let workers = start_workers(&broker.endpoint, queue, sizes.workers, sizes.concurrency, None, None).await?;
    tokio::time::sleep(WORKERS_SETTLE).await;
    Ok(workers)
}

/// Resumes `queue` and times how long its waiting workers take to ack
/// `count` more jobs; pauses it again.
async fn timed_drain(
    broker: &BrokerUnderTest,
    queue: &str,
    metrics: &[WorkerMetrics],
    count: u64,
    name: &str,
) -> Result<ScenarioResult> {
    let target = acked(metrics) + count;
    let before = broker.snapshot();
    let started = Instant::now();
    set_paused(&broker.endpoint, queue, false).await?;
    while acked(metrics) < target {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "backlog drain too slow");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    set_paused(&broker.endpoint, queue, true).await?;
    result(broker, name, count, elapsed, before, None).await
}

/// Drain rate out of a small and out of a large backlog: `backlog_drain`
/// jobs timed from each, with the workers of both queues connected (the
/// small queue holds exactly `small_backlog` at each timed drain, refilled
/// between rounds; the large one about `backlog`). One untimed round, then
/// `backlog_rounds` rounds, each timing both queues back to back (in turn
/// small first and large first), so that the machine's drift over the run
/// weighs on both alike: each large drain's paired ratio is to the small
/// drain of its round. Then the broker's memory with `leases_in_flight`
/// leases held while the large backlog is queued.
pub async fn backlog(broker: &BrokerUnderTest, sizes: &Sizes) -> Result<Vec<ScenarioResult>> {
    let small_queue = sizes.queue("bench-backlog-small");
    let large_queue = sizes.queue("bench-backlog-large");
    let count = sizes.backlog_drain.min(sizes.small_backlog);
    let small_name = format!("backlog drain ({} queued)", sizes.small_backlog);
    let large_name = format!("backlog drain ({} queued)", sizes.backlog);
    let (small_metrics, small_stop, small_handles) =
        prepare_backlog(broker, sizes, &small_queue, sizes.small_backlog).await?;
    let (large_metrics, large_stop, large_handles) =
        prepare_backlog(broker, sizes, &large_queue, sizes.backlog).await?;
    let refill = producers(&broker.endpoint, sizes.producers).await?;
    let mut small_rounds = Vec::new();
    let mut large_rounds = Vec::new();
    let mut warm_up = None;
    for round in 0..=sizes.backlog_rounds {
        if round > 0 {
            fill(refill.clone(), &small_queue, count, 1000, None).await?;
        }
        let small_first = round % 2 == 0;
        let (small, mut large) = if small_first {
            let small = timed_drain(broker, &small_queue, &small_metrics, count, &small_name).await?;
            (small, timed_drain(broker, &large_queue, &large_metrics, count, &large_name).await?)
        } else {
            let large = timed_drain(broker, &large_queue, &large_metrics, count, &large_name).await?;
            (timed_drain(broker, &small_queue, &small_metrics, count, &small_name).await?, large)
        };
        crate::report::pair_ceiling(&mut large, small.jobs_per_second);
        if round == 0 {
            warm_up = Some((small.jobs_per_second, large.jobs_per_second));
        } else {
            small_rounds.push(small);
            large_rounds.push(large);
        }
    }
    stop_workers(small_stop, small_handles).await;
    stop_workers(large_stop, large_handles).await;
    let mut small = crate::report::median_of(small_rounds, "rounds").context("no backlog rounds")?;
    let mut large = crate::report::median_of(large_rounds, "rounds").context("no backlog rounds")?;
    if let Some((small_rate, large_rate)) = warm_up {
        small.notes.push(format!("untimed first round (not in the median): {small_rate:.0}/s"));
        large.notes.push(format!("untimed first round (not in the median): {large_rate:.0}/s"));
    }
    large.notes.push(format!(
        "{count} jobs drained from each queue per round; the median of the rounds' own ratios (rate with about {} \
         queued against rate with {} queued in the same round) is {:.1} %",
        sizes.backlog,
        sizes.small_backlog,
        100.0 * large.paired_ratio.unwrap_or_default()
    ));

    // Memory with many leases in flight while the large backlog is queued.
    let (metrics, stop, handles) =
        start_workers(&broker.endpoint, &large_queue, 1, sizes.leases_in_flight, Some(Duration::from_secs(3600)), None)
            .await?;
    set_paused(&broker.endpoint, &large_queue, false).await?;
    let started = Instant::now();
    while metrics.iter().map(|metrics| metrics.snapshot().leased).sum::<u64>() < u64::from(sizes.leases_in_flight) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "could not reach the leases in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sample = broker.sample().context("RSS needs a local broker process")?;
    large.notes.push(format!(
        "broker RSS {:.1} MiB (peak {:.1} MiB) with {} leases in flight and about {} jobs queued",
        sample.rss_mib, sample.peak_rss_mib, sizes.leases_in_flight, sizes.backlog
    ));
    large.broker_rss_mib = Some(sample.rss_mib);
    large.broker_peak_rss_mib = Some(sample.peak_rss_mib);
    stop.cancel();
    for handle in handles {
        handle.abort();
    }
    Ok(vec![small, large])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_split_the_clients_and_their_connections_without_losing_any() {
        let shares = |callers: usize, connections: usize, threads: usize| -> Vec<(usize, usize)> {
            (0..threads)
                .map(|thread| Clients { callers, connections }.share(thread, threads))
                .map(|share| (share.callers, share.connections))
                .collect()
        };
        assert_eq!(shares(16, 16, 2), vec![(8, 8), (8, 8)], "a connection each");
        assert_eq!(shares(16, 2, 2), vec![(8, 1), (8, 1)], "one connection a thread");
        assert_eq!(shares(16, 3, 2), vec![(8, 2), (8, 1)]);
        assert_eq!(shares(16, 1, 2), vec![(8, 1), (8, 1)], "a thread never goes without one");
        assert_eq!(shares(3, 16, 2), vec![(2, 2), (1, 1)], "never more connections than callers");
    }

    #[test]
    fn a_late_job_counts_against_the_second_it_was_sent_in() -> Result<()> {
        let mut recorder = LatencyRecorder::new()?;
        recorder.origin_nanos = 100_000_000_000;
        let at = |seconds: f64| recorder.origin_nanos + (seconds * 1e9) as u128;
        let (first, second, third) = (at(2.5), at(2.6), at(0.1));
        recorder.record(first, first + 20_000_000);
        recorder.record(second, second + 5_000_000);
        recorder.record(third, third + 10_001_000);
        assert_eq!(recorder.histogram.len(), 3);
        assert_eq!(recorder.late_by_second, BTreeMap::from([(0, 1), (2, 1)]));
        Ok(())
    }

    #[tokio::test]
    async fn producer_threads_that_cannot_connect_report_it_instead_of_waiting() -> Result<()> {
        // Nothing listens on port 1 of the loopback address.
        let threads = tokio::time::timeout(
            Duration::from_secs(30),
            ProducerThreads::connect("http://127.0.0.1:1", "nowhere", 10, Clients { callers: 4, connections: 4 }, 2),
        )
        .await
        .context("the wait for the connections did not end")??;
        let outcome =
            tokio::time::timeout(Duration::from_secs(30), threads.fill()).await.context("the fill did not end")?;
        assert!(outcome.is_err(), "a fill without connections succeeded");
        Ok(())
    }
}
