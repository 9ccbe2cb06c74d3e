//! Enqueues jobs for the example worker and waits for the last one.
//!
//! ```text
//! cargo run -p workbroker-worker-sdk --example producer -- 10 greet
//! cargo run -p workbroker-worker-sdk --example producer -- 20000 noop
//! ```
//!
//! Arguments: how many jobs (default 10) and their kind (`greet`, the
//! default, or `noop`). Environment: `WORKBROKER_ENDPOINT` (default
//! `http://127.0.0.1:50051`), `WORKBROKER_QUEUE` (default `examples`).

use std::time::Instant;

use workbroker_worker_sdk::{Client, JobBuilder};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("WORKBROKER_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());
    let queue = std::env::var("WORKBROKER_QUEUE").unwrap_or_else(|_| "examples".to_owned());
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map(|value| value.parse()).transpose()?.unwrap_or(10);
    let kind = args.next().unwrap_or_else(|| "greet".to_owned());

    let client = Client::connect(endpoint).await?;
    let started = Instant::now();
    let mut last = None;
    for start in (0..count).step_by(1000) {
        let batch = (start..(start + 1000).min(count))
            .map(|index| JobBuilder::new(queue.as_str(), kind.as_str()).payload(format!("world #{index}")));
        last = client.enqueue_batch(batch).await?.pop();
    }
    println!("enqueued {count} {kind} jobs in {:.2?}", started.elapsed());
    if let Some(last) = last {
        let job = client.wait(&last.job_id).await?;
        println!(
            "last job {} finished as {:?}: {}",
            job.job_id,
            workbroker_worker_sdk::api::JobState::try_from(job.state)?,
            String::from_utf8_lossy(&job.result)
        );
    }
    Ok(())
}
