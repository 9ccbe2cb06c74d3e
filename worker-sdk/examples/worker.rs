//! A worker for the `greet` and `noop` kinds of the `examples` queue.
//!
//! ```text
//! workbroker serve --database-url postgres://postgres@127.0.0.1/workbroker &
//! cargo run -p workbroker-worker-sdk --example worker
//! ```
//!
//! Environment: `WORKBROKER_ENDPOINT` (default `http://127.0.0.1:50051`),
//! `WORKBROKER_QUEUE` (default `examples`), `WORKBROKER_CONCURRENCY`
//! (default 64), `WORKBROKER_EXIT_AFTER` (stop after that many jobs
//! succeeded, then print the process's CPU time per job; used to measure the
//! SDK's overhead).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use workbroker_worker_sdk::{Client, JobContext, JobError, Output, Worker, handler_fn};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// CPU time (user + system) of this process, from `/proc/self/stat`.
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at ")".
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks of 1/100 s (USER_HZ) here.
    Some(Duration::from_millis((user + system) * 10))
}

async fn greet(job: JobContext) -> Result<Output, JobError> {
    let name = std::str::from_utf8(job.payload())
        .map_err(|error| JobError::permanent(format!("payload is not UTF-8: {error}")))?;
    tracing::info!(job_id = job.id(), attempt = job.attempt(), "hello, {name}");
    Ok(Output::bytes(format!("hello, {name}")))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let endpoint = env_or("WORKBROKER_ENDPOINT", "http://127.0.0.1:50051");
    let queue = env_or("WORKBROKER_QUEUE", "examples");
    let concurrency: u32 = env_or("WORKBROKER_CONCURRENCY", "64").parse()?;
    let exit_after: Option<u64> = std::env::var("WORKBROKER_EXIT_AFTER").ok().map(|value| value.parse()).transpose()?;

    let worker = Worker::builder(Client::connect_lazy(endpoint)?)
        .queues([queue])
        .concurrency(concurrency)
        .handler("greet", handler_fn(greet))
        .handler("noop", handler_fn(|_job| async { Ok(Output::none()) }))
        .build()?;
    let metrics = worker.metrics();
    let shutdown = CancellationToken::new();
    let stopper = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("interrupted; draining");
        stopper.cancel();
    });
    if let Some(target) = exit_after {
        let stopper = shutdown.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut started: Option<(Instant, Duration)> = None;
            loop {
                let succeeded = metrics.snapshot().succeeded;
                if started.is_none() && succeeded > 0 {
                    started = Some((Instant::now(), process_cpu_time().unwrap_or_default()));
                }
                if succeeded >= target {
                    if let (Some((wall, cpu)), Some(now_cpu)) = (started, process_cpu_time()) {
                        let jobs = succeeded.saturating_sub(1).max(1);
                        let cpu_used = now_cpu.saturating_sub(cpu);
                        println!(
                            "{jobs} jobs in {:.2?} wall, {cpu_used:.2?} CPU: {:.1} µs CPU per job, {:.0} jobs/s",
                            wall.elapsed(),
                            cpu_used.as_secs_f64() * 1e6 / jobs as f64,
                            jobs as f64 / wall.elapsed().as_secs_f64(),
                        );
                    }
                    stopper.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    worker.run(shutdown).await?;
    println!("{:?}", metrics.snapshot());
    Ok(())
}
