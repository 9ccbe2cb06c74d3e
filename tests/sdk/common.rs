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

    /// Fires the shutdown, waits for the drain to finish and returns the
    /// final counters: an ack is counted when its reply reaches the worker,
    /// which can be after the job already reads as completed, so tests that
    /// count settles read them here rather than while the worker runs.
    pub async fn stop(mut self) -> Result<worker::MetricsSnapshot> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .context("worker did not stop within 20 s")???;
        }
        Ok(self.metrics.snapshot())
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the job is terminal (error after `wait`, showing the job).
pub async fn wait_terminal(client: &Client, job_id: &str, wait: Duration) -> Result<v1::Job> {
    match tokio::time::timeout(wait, client.wait(job_id)).await {
        Ok(job) => job.context("watch the job"),
        Err(_) => {
            let job = client.get(job_id).await;
            anyhow::bail!("job {job_id} not terminal within {wait:?}: {job:?}")
        }
    }
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
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
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
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            workbroker_server::server::run(config, listener, stop).await.map_err(anyhow::Error::from)
        });
        let broker = Self { address, runtime: Some(runtime), shutdown, task: Some(task) };
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

    /// Shuts the broker down gracefully (it waits its grace period for acks,
    /// releases what is left, and ends the lease streams) and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task).await.context("broker did not stop")???;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        Ok(())
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

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback HTTP server of the files in a directory: `GET /<name>`.
/// Names starting with `slow` answer only after 30 s.
pub struct StaticServer {
    pub address: SocketAddr,
    shutdown: CancellationToken,
}

impl StaticServer {
    pub async fn start(root: std::path::PathBuf) -> Result<Self> {
        use http_body_util::Full;
        use hyper::body::Bytes;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                let root = root.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let root = root.clone();
                        async move {
                            let name = request.uri().path().trim_start_matches('/').to_owned();
                            if name.starts_with("slow") {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                            let response = match tokio::fs::read(root.join(&name)).await {
                                Ok(bytes) if !name.contains("..") => {
                                    hyper::Response::new(Full::new(Bytes::from(bytes)))
                                }
                                _ => {
                                    let mut response = hyper::Response::new(Full::new(Bytes::new()));
                                    *response.status_mut() = hyper::StatusCode::NOT_FOUND;
                                    response
                                }
                            };
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { address, shutdown })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A TCP proxy that forwards everything to `upstream`, except that the
/// first `cuts` HTTP PUT requests it sees are cut off after about 16 KiB of
/// the request: both connections are dropped mid-upload.
pub struct CuttingProxy {
    pub address: SocketAddr,
    pub cuts_done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
}

impl CuttingProxy {
    pub async fn start(upstream: SocketAddr, cuts: usize) -> Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let cuts_left = Arc::new(AtomicUsize::new(cuts));
        let cuts_done = Arc::new(AtomicUsize::new(0));
        let done = cuts_done.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                let cuts_left = cuts_left.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    });
                    let mut buffer = vec![0u8; 8192];
                    let mut cutting = false;
                    loop {
                        let read = match client_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(read) => read,
                        };
                        let chunk = &buffer[..read];
                        if !cutting
                            && chunk.starts_with(b"PUT ")
                            && cuts_left
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1))
                                .is_ok()
                        {
                            cutting = true;
                            if server_write.write_all(chunk).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        if server_write.write_all(chunk).await.is_err() {
                            break;
                        }
                        if cutting {
                            // One more chunk of the body went through: cut here.
                            done.fetch_add(1, Ordering::SeqCst);
                            back.abort();
                            return;
                        }
                    }
                    let _ = server_write.shutdown().await;
                    let _ = back.await;
                });
            }
        });
        Ok(Self { address, cuts_done, shutdown })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
