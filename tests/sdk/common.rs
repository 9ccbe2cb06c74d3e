//! Helpers shared by the SDK tests.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use workbroker_api::v1;
use workbroker_tests::test_config;
use workbroker_worker_sdk::{Client, Worker, worker};

pub const WAIT: Duration = Duration::from_secs(10);

/// A worker running in the background.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub metrics: worker::WorkerMetrics,
    task: Option<JoinHandle<Result<(), worker::Error>>>,
}

impl RunningWorker {
    pub fn start(worker: Worker) -> Self {
        let shutdown = CancellationToken::new();
        let metrics = worker.metrics();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        Self { shutdown, metrics, task: Some(task) }
    }

    /// Fires the shutdown and waits for the drain to finish.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .context("worker did not stop within 20 s")???;
        }
        Ok(())
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the job is terminal (error after `wait`).
pub async fn wait_terminal(client: &Client, job_id: &str, wait: Duration) -> Result<v1::Job> {
    tokio::time::timeout(wait, client.wait(job_id))
        .await
        .with_context(|| format!("job {job_id} not terminal within {wait:?}"))?
        .context("watch the job")
}

/// Polls `check` every 20 ms until it holds (error after `wait`).
pub async fn eventually<F, Fut>(what: &str, wait: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}: not true within {wait:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes a queue retry fast (backoff 50 ms to 200 ms).
pub async fn fast_retries(client: &Client, queue: &str) -> Result<()> {
    client
        .admin()
        .configure_queue(v1::ConfigureQueueRequest {
            queue: queue.to_owned(),
            backoff_initial: Some(workbroker_api::time::duration_to_proto(Duration::from_millis(50))),
            backoff_max: Some(workbroker_api::time::duration_to_proto(Duration::from_millis(200))),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// A broker in its own tokio runtime, so that a test can kill it the way a
/// crash would: every task dropped at once, nothing released, no goodbye on
/// its streams.
pub struct CrashableBroker {
    pub address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CrashableBroker {
    /// Starts a broker over `database_url`, listening on `address` (or a
    /// fresh port).
    pub async fn start(database_url: &str, address: Option<SocketAddr>) -> Result<Self> {
        let wanted = address.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        // The old listener closes asynchronously after a crash: retry a bit.
        let mut attempts = 0;
        let listener = loop {
            match std::net::TcpListener::bind(wanted) {
                Ok(listener) => break listener,
                Err(error) if attempts < 100 => {
                    attempts += 1;
                    tracing::debug!(%error, "rebinding the broker address");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return Err(error).context("bind the broker address"),
            }
        };
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let config = test_config(database_url);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            workbroker_server::server::run(config, listener, CancellationToken::new())
                .await
                .map_err(anyhow::Error::from)
        });
        let broker = Self { address, runtime: Some(runtime) };
        let endpoint = broker.endpoint();
        eventually("the broker answers", WAIT, || {
            let endpoint = endpoint.clone();
            async move {
                let Ok(client) = Client::connect(endpoint).await else {
                    return Ok(false);
                };
                Ok(client.queue_stats("").await.is_ok())
            }
        })
        .await?;
        Ok(broker)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Drops every task of the broker at once.
    pub fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for CrashableBroker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
