//! The worker runtime against a real broker: lease extension, cancel
//! notices, panics, a broker crash and restart, drain on shutdown, trace
//! context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use workbroker_api::v1;
use workbroker_tests::{TestBroker, TestDatabase};
use workbroker_worker_sdk::{CancelReason, Client, JobBuilder, JobError, Output, Worker, handler_fn};

use crate::common::{CrashableBroker, RunningWorker, WAIT, fast_retries, wait_terminal};

#[tokio::test]
async fn lease_extension_keeps_a_long_job_alive() -> Result<()> {
    crate::common::init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let seen = runs.clone();
    let worker = Worker::builder(client.clone())
        .queues(["long"])
        .concurrency(2)
        .lease_duration(Duration::from_secs(2))
        .handler(
            "slow",
            handler_fn(move |job| {
                let seen = seen.clone();
                async move {
                    seen.lock().expect("lock").push(job.attempt());
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if job.is_cancelled() {
                        return Err(JobError::retry("cancelled while sleeping"));
                    }
                    Ok(Output::bytes(b"done".to_vec()))
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let enqueued = client.enqueue(JobBuilder::new("long", "slow")).await?;
    let job = wait_terminal(&client, &enqueued.job_id, Duration::from_secs(15)).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    assert_eq!(job.attempt, 1, "the lease never expired");
    assert_eq!(job.result, b"done");
    assert_eq!(*runs.lock().expect("lock"), vec![1], "ran exactly once");
    let metrics = running.stop().await?;
    assert!(metrics.extensions_ok >= 2, "{metrics:?}");
    assert_eq!(metrics.acks_ok, 1);
    broker.finish().await
}

#[tokio::test]
async fn a_cancel_notice_fires_the_handlers_token() -> Result<()> {
    crate::common::init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (reason_tx, mut reasons) = mpsc::unbounded_channel();
    let worker = Worker::builder(client.clone())
        .queues(["cancel"])
        .handler(
            "wait",
            handler_fn(move |job| {
                let started_tx = started_tx.clone();
                let reason_tx = reason_tx.clone();
                async move {
                    let _ = started_tx.send(job.id().to_owned());
                    tokio::select! {
                        () = job.cancellation().cancelled() => {
                            let _ = reason_tx.send(job.cancel_reason());
                            Err(JobError::retry("cancelled"))
                        }
                        () = tokio::time::sleep(Duration::from_secs(20)) => Ok(Output::none()),
                    }
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let enqueued = client.enqueue(JobBuilder::new("cancel", "wait")).await?;
    let started_id = tokio::time::timeout(WAIT, started.recv()).await?.context("handler started")?;
    assert_eq!(started_id, enqueued.job_id);
    let cancelled = client.cancel(&enqueued.job_id).await?;
    assert_eq!(cancelled.state, v1::JobState::Cancelled as i32);
    let reason = tokio::time::timeout(Duration::from_secs(3), reasons.recv())
        .await
        .context("the token did not fire within 3 s")?
        .context("reason")?;
    assert_eq!(reason, Some(CancelReason::Cancelled));
    // The cancelled job's outcome is dropped, not nacked; the job stays cancelled.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = client.get(&enqueued.job_id).await?;
    assert_eq!(job.state, v1::JobState::Cancelled as i32);
    let metrics = running.metrics.snapshot();
    assert_eq!(metrics.cancelled, 1);
    assert_eq!(metrics.nacks_ok + metrics.acks_ok + metrics.settles_refused, 0, "{metrics:?}");

    // The freed slot takes the next job.
    let next = client.enqueue(JobBuilder::new("cancel", "wait")).await?;
    let started_id = tokio::time::timeout(WAIT, started.recv()).await?.context("next handler started")?;
    assert_eq!(started_id, next.job_id);
    client.cancel(&next.job_id).await?;
    running.stop().await?;
    broker.finish().await
}

#[tokio::test]
async fn a_panicking_handler_is_nacked_and_the_worker_goes_on() -> Result<()> {
    crate::common::init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    fast_retries(&client, "panics").await?;
    let worker = Worker::builder(client.clone())
        .queues(["panics"])
        .concurrency(1)
        .handler(
            "flaky",
            handler_fn(|job| async move {
                if job.attempt() == 1 {
                    panic!("boom on attempt {}", job.attempt());
                }
                Ok(Output::bytes(format!("ok on {}", job.attempt())))
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let first = client.enqueue(JobBuilder::new("panics", "flaky")).await?;
    let job = wait_terminal(&client, &first.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    assert_eq!(job.attempt, 2);
    assert_eq!(job.result, b"ok on 2");
    assert!(job.last_error.contains("handler panicked: boom on attempt 1"), "{}", job.last_error);
    // Still alive with its single slot: a second job runs too.
    let second = client.enqueue(JobBuilder::new("panics", "flaky")).await?;
    let job = wait_terminal(&client, &second.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32);
    let metrics = running.stop().await?;
    assert_eq!(metrics.panicked, 2);
    assert_eq!(metrics.nacks_ok, 2);
    assert_eq!(metrics.acks_ok, 2);
    broker.finish().await
}

#[tokio::test]
async fn permanent_and_retry_errors_map_to_nack_options() -> Result<()> {
    crate::common::init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let worker = Worker::builder(client.clone())
        .queues(["errors"])
        .handler(
            "fail",
            handler_fn(|job| async move {
                match job.payload() {
                    b"permanent" => Err(JobError::permanent("bad input")),
                    _ if job.attempt() == 1 => Err(JobError::retry_after("later", Duration::from_millis(300))),
                    _ => Ok(Output::none()),
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let dead = client.enqueue(JobBuilder::new("errors", "fail").payload(b"permanent".to_vec())).await?;
    let retried = client.enqueue(JobBuilder::new("errors", "fail")).await?;
    let job = wait_terminal(&client, &dead.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Dead as i32);
    assert_eq!(job.attempt, 1, "a permanent error is not retried");
    assert_eq!(job.last_error, "bad input");
    let job = wait_terminal(&client, &retried.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32);
    assert_eq!(job.attempt, 2);
    running.stop().await?;
    broker.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_and_restart_loses_nothing_and_runs_no_held_job_twice() -> Result<()> {
    crate::common::init_logs();
    let database = TestDatabase::create().await?;
    let first = CrashableBroker::start(&database.url, None).await?;
    let address = first.address;
    let client = Client::connect_lazy(first.endpoint())?;
    let runs: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let seen = runs.clone();
    let worker = Worker::builder(client.clone())
        .queues(["crash"])
        .concurrency(3)
        .lease_duration(Duration::from_secs(30))
        .handler(
            "work",
            handler_fn(move |job| {
                let seen = seen.clone();
                let started_tx = started_tx.clone();
                async move {
                    seen.lock().expect("lock").entry(job.id().to_owned()).or_default().push(job.attempt());
                    let _ = started_tx.send(());
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(Output::none())
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let ids: Vec<String> = client
        .enqueue_batch((0..7).map(|_| JobBuilder::new("crash", "work")))
        .await?
        .into_iter()
        .map(|job| job.job_id)
        .collect();
    for _ in 0..3 {
        tokio::time::timeout(WAIT, started.recv()).await?.context("handler started")?;
    }
    // Three handlers are running, holding their leases: crash the broker.
    first.crash();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let second = CrashableBroker::start(&database.url, Some(address)).await?;
    for id in &ids {
        let job = wait_terminal(&client, id, Duration::from_secs(20)).await?;
        assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
        assert_eq!(job.attempt, 1, "job {id} was leased again: {job:?}");
    }
    let runs = runs.lock().expect("lock").clone();
    assert_eq!(runs.len(), ids.len(), "every job ran");
    for (id, attempts) in &runs {
        assert_eq!(attempts, &vec![1], "job {id} ran more than once");
    }
    let metrics = running.stop().await?;
    assert_eq!(metrics.acks_ok, 7, "{metrics:?}");
    assert!(metrics.lease_streams_opened >= 2, "the worker reconnected: {metrics:?}");
    drop(second);
    database.drop_database().await
}

/// Payload, attempt and cancel reason of a handler run that was cancelled.
type CancelRecord = (Vec<u8>, u32, Option<CancelReason>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_broker_restart_acks_what_finished_and_cancels_what_it_released() -> Result<()> {
    crate::common::init_logs();
    let database = TestDatabase::create().await?;
    let first = CrashableBroker::start(&database.url, None).await?;
    let address = first.address;
    let client = Client::connect_lazy(first.endpoint())?;
    fast_retries(&client, "graceful").await?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let reasons: Arc<Mutex<Vec<CancelRecord>>> = Arc::default();
    let seen = reasons.clone();
    let long_runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = Worker::builder(client.clone())
        .queues(["graceful"])
        .concurrency(2)
        .handler(
            "work",
            handler_fn(move |job| {
                let started_tx = started_tx.clone();
                let seen = seen.clone();
                let long_runs = long_runs.clone();
                async move {
                    let _ = started_tx.send(());
                    let first_long_run =
                        job.payload() == b"long" && long_runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                    if !first_long_run {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                        return Ok(Output::none());
                    }
                    // Outlives the broker's 2 s grace: released, so lost.
                    job.cancellation().cancelled().await;
                    seen.lock().expect("lock").push((job.payload().to_vec(), job.attempt(), job.cancel_reason()));
                    Err(JobError::retry("lease lost"))
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let short = client.enqueue(JobBuilder::new("graceful", "work").payload(b"short".to_vec())).await?;
    let long = client.enqueue(JobBuilder::new("graceful", "work").payload(b"long".to_vec())).await?;
    for _ in 0..2 {
        tokio::time::timeout(WAIT, started.recv()).await?.context("handler started")?;
    }
    first.stop().await?;
    // The short job's ack landed during the grace period.
    let second = CrashableBroker::start(&database.url, Some(address)).await?;
    let job = wait_terminal(&client, &short.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    assert_eq!(job.attempt, 1);
    // The long one was released at the end of the grace: its handler saw
    // the lease lost, and it ran again on the new broker (a release at
    // broker shutdown does not use up an attempt).
    let job = wait_terminal(&client, &long.job_id, Duration::from_secs(15)).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    assert!(job.last_error.contains("broker shutting down"), "{job:?}");
    assert_eq!(*reasons.lock().expect("lock"), vec![(b"long".to_vec(), 1, Some(CancelReason::LeaseLost))]);
    let metrics = running.metrics.snapshot();
    assert_eq!(metrics.leases_lost, 1, "{metrics:?}");
    running.stop().await?;
    drop(second);
    database.drop_database().await
}

#[tokio::test]
async fn shutdown_drains_in_flight_jobs_and_leaves_nothing_leased() -> Result<()> {
    crate::common::init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker = Worker::builder(client.clone())
        .queues(["drain"])
        .concurrency(3)
        .drain_timeout(Duration::from_secs(5))
        .handler(
            "work",
            handler_fn(move |job| {
                let started_tx = started_tx.clone();
                async move {
                    let _ = started_tx.send(job.id().to_owned());
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    Ok(Output::bytes(b"finished".to_vec()))
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let ids: Vec<String> = client
        .enqueue_batch((0..8).map(|_| JobBuilder::new("drain", "work")))
        .await?
        .into_iter()
        .map(|job| job.job_id)
        .collect();
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        in_flight.push(tokio::time::timeout(WAIT, started.recv()).await?.context("handler started")?);
    }
    let stopping = tokio::time::Instant::now();
    running.stop().await?;
    assert!(stopping.elapsed() < Duration::from_secs(4), "drained in {:?}", stopping.elapsed());
    for id in &in_flight {
        let job = client.get(id).await?;
        assert_eq!(job.state, v1::JobState::Completed as i32, "in-flight job {id}: {job:?}");
        assert_eq!(job.result, b"finished");
    }
    // Nothing stays leased: what was not started is back in the queue.
    crate::common::eventually("no job leased", Duration::from_secs(2), || {
        let client = client.clone();
        async move {
            let stats = client.queue_stats("drain").await?;
            Ok(stats.first().is_some_and(|stats| stats.leased == 0))
        }
    })
    .await?;
    let stats = client.queue_stats("drain").await?.into_iter().next().context("stats")?;
    assert_eq!(stats.completed + stats.available, 8, "{stats:?}");
    let completed: Vec<&String> = {
        let mut completed = Vec::new();
        for id in &ids {
            if client.get(id).await?.state == v1::JobState::Completed as i32 {
                completed.push(id);
            }
        }
        completed
    };
    assert_eq!(completed.len(), 3, "only the in-flight jobs ran");
    // After `drain` the broker sent nothing more: the other jobs were never
    // leased (no attempt used).
    for id in ids.iter().filter(|id| !in_flight.contains(id)) {
        let job = client.get(id).await?;
        assert_eq!((job.state, job.attempt), (v1::JobState::Available as i32, 0), "{job:?}");
    }
    broker.finish().await
}

#[tokio::test]
async fn the_drain_deadline_cancels_handlers_and_hands_their_jobs_back() -> Result<()> {
    crate::common::init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (reason_tx, mut reasons) = mpsc::unbounded_channel();
    let worker = Worker::builder(client.clone())
        .queues(["deadline"])
        .concurrency(1)
        .drain_timeout(Duration::from_millis(300))
        .abandon_grace(Duration::from_millis(500))
        .handler(
            "stuck",
            handler_fn(move |job| {
                let started_tx = started_tx.clone();
                let reason_tx = reason_tx.clone();
                async move {
                    let _ = started_tx.send(());
                    job.cancellation().cancelled().await;
                    let _ = reason_tx.send(job.cancel_reason());
                    Err(JobError::retry("stopped by shutdown"))
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);
    let enqueued = client.enqueue(JobBuilder::new("deadline", "stuck")).await?;
    tokio::time::timeout(WAIT, started.recv()).await?.context("started")?;
    running.stop().await?;
    assert_eq!(reasons.recv().await.flatten(), Some(CancelReason::Shutdown));
    // Nacked for an immediate retry, and not leased again while draining.
    let job = client.get(&enqueued.job_id).await?;
    assert_eq!(job.state, v1::JobState::Available as i32, "{job:?}");
    assert_eq!(job.last_error, "stopped by shutdown");
    assert_eq!(job.attempt, 1);
    broker.finish().await
}

#[tokio::test]
async fn the_job_span_is_a_child_of_the_producers_trace() -> Result<()> {
    crate::common::init_logs();
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    // Current-thread runtime: this subscriber sees the handler's span too.
    let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer());
    let _default = tracing::subscriber::set_default(subscriber);

    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let worker = Worker::builder(client.clone())
        .queues(["traced"])
        .handler(
            "work",
            handler_fn(move |job| {
                let seen_tx = seen_tx.clone();
                async move {
                    let context = tracing::Span::current().context();
                    let trace_id = context.span().span_context().trace_id();
                    let _ = seen_tx.send((trace_id, job.trace_parent().copied()));
                    Ok(Output::none())
                }
            }),
        )
        .build()?;
    let running = RunningWorker::start(worker);

    let trace_id = TraceId::from_bytes([7; 16]);
    let producer = SpanContext::new(trace_id, SpanId::from_bytes([9; 8]), TraceFlags::SAMPLED, false, TraceState::NONE);
    let enqueued = {
        let _attached = opentelemetry::Context::new().with_remote_span_context(producer).attach();
        client.enqueue(JobBuilder::new("traced", "work")).await?
    };
    let stored = client.get(&enqueued.job_id).await?;
    assert_eq!(
        stored.attributes.get("traceparent").map(String::as_str),
        Some("00-07070707070707070707070707070707-0909090909090909-01")
    );
    let (handler_trace, parent) = tokio::time::timeout(WAIT, seen.recv()).await?.context("handler ran")?;
    assert_eq!(handler_trace, trace_id, "the job span continues the producer's trace");
    assert_eq!(parent.map(|parent| parent.parent_id), Some([9; 8]));
    wait_terminal(&client, &enqueued.job_id, WAIT).await?;
    running.stop().await?;
    broker.finish().await
}

#[tokio::test]
async fn a_worker_over_two_replicas_runs_one_lease_stream_per_endpoint() -> Result<()> {
    crate::common::init_logs();
    let first = TestBroker::start().await?;
    let second = first.start_replica().await?;
    let client = Client::connect_many([first.endpoint(), second.endpoint()])?;
    let worker = Worker::builder(client.clone())
        .queues(["replicated"])
        .concurrency(4)
        .handler("work", handler_fn(|job| async move { Ok(Output::bytes(job.payload().to_vec())) }))
        .build()?;
    let running = RunningWorker::start(worker);
    let enqueued = client
        .enqueue_batch((0..40).map(|index| JobBuilder::new("replicated", "work").payload(format!("{index}"))))
        .await?;
    for (index, job) in enqueued.iter().enumerate() {
        let job = wait_terminal(&client, &job.job_id, WAIT).await?;
        assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
        assert_eq!(job.result, format!("{index}").into_bytes());
        assert_eq!(job.attempt, 1);
    }
    let metrics = running.stop().await?;
    assert_eq!(metrics.lease_streams_opened, 2, "{metrics:?}");
    assert_eq!(metrics.acks_ok, 40);
    second.finish_keep_database().await?;
    first.finish().await
}
