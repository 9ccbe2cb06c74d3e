//! Test support: a real broker on `127.0.0.1:0` over its own fresh
//! PostgreSQL database, and small helpers to drive it with the raw gRPC API.
//!
//! The database server comes from `DATABASE_URL` (any database on it; the
//! harness creates `wbtest_<random>` databases next to it and drops them when
//! a test finishes cleanly). Default: `postgres://postgres@127.0.0.1:5432/postgres`.

pub mod etcd;
pub mod process;
pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::admin_client::AdminClient;
use workbroker_api::v1::broker_client::BrokerClient;
use workbroker_server::reaper::ReaperConfig;
use workbroker_server::server::ServerConfig;
use workbroker_server::service::BatcherSettings;
use workbroker_server::service::validate::Limits;
use workbroker_server::store::StoreConfig;
use workbroker_server::vacuum::VacuumConfig;

/// The server URL from the environment, or the local default.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |index| index + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{host_part}/{database}?{query}"),
        None => format!("{host_part}/{database}"),
    }
}

/// A fresh, empty database; dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Result<Self> {
        let name = format!("wbtest_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server_url()).await.context("connect to DATABASE_URL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
        admin.close().await?;
        Ok(Self { url: with_database(&server_url(), &name), name })
    }

    pub async fn drop_database(&self) -> Result<()> {
        let mut admin = PgConnection::connect(&server_url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(())
    }

    /// A pool on this database, for checks that look at the tables directly.
    pub async fn pool(&self) -> Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&self.url).await?)
    }
}

/// Settings tests usually want: a fast reaper, short shutdown grace.
pub fn test_config(database_url: &str) -> ServerConfig {
    ServerConfig {
        store: StoreConfig {
            database_url: database_url.to_owned(),
            max_connections: 8,
            batch_connections: 3,
            acquire_timeout: Duration::from_secs(3),
        },
        migrate: true,
        limits: Limits { max_payload_bytes: 1024 * 1024 },
        max_message_bytes: 16 * 1024 * 1024,
        shutdown_grace: Duration::from_secs(2),
        reaper: ReaperConfig { interval: Duration::from_millis(100), batch_size: 1000 },
        vacuum: VacuumConfig::default(),
        member_id: format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        advertise_address: None,
        batchers: BatcherSettings::default(),
        watch_poll_interval: Duration::from_millis(200),
        etcd: None,
        shard_count: None,
        keep_alive_freeze: Default::default(),
        admin_listen: None,
    }
}

/// A running broker.
pub struct TestBroker {
    pub address: SocketAddr,
    /// The admin HTTP listener (health, metrics, status page), when started
    /// with [`TestBroker::start_with_admin`].
    pub admin_address: Option<SocketAddr>,
    pub database: TestDatabase,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), workbroker_server::server::Error>>>,
}

impl TestBroker {
    /// A broker over a fresh database.
    pub async fn start() -> Result<Self> {
        let database = TestDatabase::create().await?;
        let config = test_config(&database.url);
        Self::start_with(database, config).await
    }

    /// A broker over `database` with `config`.
    pub async fn start_with(database: TestDatabase, config: ServerConfig) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(workbroker_server::server::run(config, listener, shutdown.clone()));
        let broker = Self { address, admin_address: None, database, shutdown, task: Some(task) };
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// A broker over a fresh database with its admin HTTP listener on a free port.
    pub async fn start_with_admin() -> Result<Self> {
        let database = TestDatabase::create().await?;
        let config = test_config(&database.url);
        Self::start_with_admin_config(database, config).await
    }

    /// A broker over `database` with `config` and its admin HTTP listener on a free port.
    pub async fn start_with_admin_config(database: TestDatabase, config: ServerConfig) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin_address = admin_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(workbroker_server::server::run_with_admin_listener(
            config,
            listener,
            Some(admin_listener),
            shutdown.clone(),
        ));
        let broker = Self { address, admin_address: Some(admin_address), database, shutdown, task: Some(task) };
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// GETs `path` from the admin HTTP listener.
    pub async fn admin_get(&self, path: &str) -> Result<HttpResponse> {
        let address = self.admin_address.context("the broker has no admin listener; use start_with_admin")?;
        http_get(address, path).await
    }

    /// Another broker replica over the same database.
    pub async fn start_replica(&self) -> Result<TestBroker> {
        let database = TestDatabase { name: self.database.name.clone(), url: self.database.url.clone() };
        let mut config = test_config(&database.url);
        config.migrate = false;
        Self::start_with(database, config).await
    }

    async fn wait_ready(&self) -> Result<()> {
        for _ in 0..200 {
            if let Ok(mut admin) = self.try_admin().await
                && admin.get_queue_stats(v1::GetQueueStatsRequest::default()).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("broker at {} did not become ready", self.address)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(self.endpoint())?.connect().await?)
    }

    async fn try_admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel().await?))
    }

    pub async fn broker(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await.expect("connect to the test broker"))
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await.expect("connect to the test broker"))
    }

    /// Shuts the broker down gracefully and waits for it.
    pub async fn stop(&mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }

    /// Stops the broker and drops its database.
    pub async fn finish(mut self) -> Result<()> {
        self.stop().await?;
        self.database.drop_database().await
    }

    /// Stops the broker but keeps its database (for a replica that shares it).
    pub async fn finish_keep_database(mut self) -> Result<()> {
        self.stop().await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A job with just a queue and kind.
pub fn new_job(queue: &str, kind: &str) -> v1::NewJob {
    v1::NewJob { queue: queue.to_owned(), kind: kind.to_owned(), ..Default::default() }
}

/// Enqueues jobs and returns their ids.
pub async fn enqueue(broker: &mut BrokerClient<Channel>, jobs: Vec<v1::NewJob>) -> Result<Vec<String>> {
    let response = broker.enqueue(v1::EnqueueRequest { jobs }).await?.into_inner();
    Ok(response.jobs.into_iter().map(|job| job.job_id).collect())
}

pub fn seconds(value: f64) -> prost_types::Duration {
    workbroker_api::time::duration_to_proto(Duration::from_secs_f64(value))
}

/// An open Lease stream driven by the test.
pub struct Worker {
    requests: tokio::sync::mpsc::UnboundedSender<v1::LeaseRequest>,
    responses: tonic::Streaming<v1::LeaseResponse>,
}

impl Worker {
    /// Opens a Lease stream.
    pub async fn open(broker: &mut BrokerClient<Channel>, open: v1::OpenLease) -> Result<Self> {
        let (requests, receiver) = tokio::sync::mpsc::unbounded_channel();
        requests
            .send(v1::LeaseRequest { request: Some(v1::lease_request::Request::Open(open)) })
            .context("send open")?;
        let responses = broker.lease(UnboundedReceiverStream::new(receiver)).await?.into_inner();
        Ok(Self { requests, responses })
    }

    /// Opens a stream on `queues` with the given window.
    pub async fn on(broker: &mut BrokerClient<Channel>, queues: &[&str], max_in_flight: u32) -> Result<Self> {
        Self::open(
            broker,
            v1::OpenLease {
                worker_id: "test-worker".to_owned(),
                queues: queues.iter().map(|queue| (*queue).to_owned()).collect(),
                max_in_flight,
                ..Default::default()
            },
        )
        .await
    }

    pub fn credit(&self, count: u32) -> Result<()> {
        self.requests
            .send(v1::LeaseRequest { request: Some(v1::lease_request::Request::Credit(v1::Credit { count })) })
            .context("send credit")
    }

    /// The next message, or `None` if none arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<v1::lease_response::Response>> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Err(_) => Ok(None),
            Ok(message) => Ok(message?.and_then(|response| response.response)),
        }
    }

    /// Collects leased jobs until `count` arrived (error after `wait`).
    pub async fn take_jobs(&mut self, count: usize, wait: Duration) -> Result<Vec<v1::LeasedJob>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut jobs = Vec::new();
        while jobs.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await? {
                Some(v1::lease_response::Response::Jobs(leased)) => jobs.extend(leased.jobs),
                Some(other) => anyhow::bail!("expected jobs, got {other:?}"),
                None => anyhow::bail!("only {} of {count} jobs arrived within {wait:?}", jobs.len()),
            }
        }
        Ok(jobs)
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn expect_quiet(&mut self, wait: Duration) -> Result<()> {
        if let Some(message) = self.next_within(wait).await? {
            anyhow::bail!("expected nothing, got {message:?}");
        }
        Ok(())
    }

    /// Ends the stream from the client side.
    pub fn close(self) {
        drop(self);
    }
}

/// Acks jobs over one Ack stream and returns the outcomes in order.
pub async fn ack_all(broker: &mut BrokerClient<Channel>, acks: Vec<v1::AckRequest>) -> Result<Vec<v1::AckResponse>> {
    let count = acks.len();
    let responses = broker.ack(tokio_stream::iter(acks)).await?.into_inner();
    let collected: Vec<v1::AckResponse> =
        futures::StreamExt::collect::<Vec<_>>(responses).await.into_iter().collect::<Result<_, _>>()?;
    anyhow::ensure!(collected.len() == count, "expected {count} ack responses, got {}", collected.len());
    Ok(collected)
}

/// Nacks jobs over one Nack stream and returns the outcomes in order.
pub async fn nack_all(
    broker: &mut BrokerClient<Channel>,
    nacks: Vec<v1::NackRequest>,
) -> Result<Vec<v1::NackResponse>> {
    let count = nacks.len();
    let responses = broker.nack(tokio_stream::iter(nacks)).await?.into_inner();
    let collected: Vec<v1::NackResponse> =
        futures::StreamExt::collect::<Vec<_>>(responses).await.into_iter().collect::<Result<_, _>>()?;
    anyhow::ensure!(collected.len() == count, "expected {count} nack responses, got {}", collected.len());
    Ok(collected)
}

pub fn ack_of(job: &v1::LeasedJob) -> v1::AckRequest {
    v1::AckRequest {
        job_id: job.job.as_ref().map(|job| job.job_id.clone()).unwrap_or_default(),
        lease_token: job.lease_token.clone(),
        result: Vec::new(),
    }
}

pub fn nack_of(job: &v1::LeasedJob, error: &str) -> v1::NackRequest {
    v1::NackRequest {
        job_id: job.job.as_ref().map(|job| job.job_id.clone()).unwrap_or_default(),
        lease_token: job.lease_token.clone(),
        error: error.to_owned(),
        ..Default::default()
    }
}

pub fn id_of(job: &v1::LeasedJob) -> String {
    job.job.as_ref().map(|job| job.job_id.clone()).unwrap_or_default()
}

/// Reads a job's state.
pub async fn state_of(broker: &mut BrokerClient<Channel>, job_id: &str) -> Result<v1::JobState> {
    let job = broker.get_job(v1::GetJobRequest { job_id: job_id.to_owned() }).await?.into_inner();
    Ok(v1::JobState::try_from(job.state)?)
}

/// Polls until the job reaches `state` (error after `wait`).
pub async fn wait_for_state(
    broker: &mut BrokerClient<Channel>,
    job_id: &str,
    state: v1::JobState,
    wait: Duration,
) -> Result<Duration> {
    let started = tokio::time::Instant::now();
    loop {
        let current = state_of(broker, job_id).await?;
        if current == state {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < wait, "job {job_id} still {current:?} after {wait:?}, expected {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stats of one queue.
pub async fn stats_of(admin: &mut AdminClient<Channel>, queue: &str) -> Result<v1::QueueStats> {
    let response = admin.get_queue_stats(v1::GetQueueStatsRequest { queue: queue.to_owned() }).await?.into_inner();
    response.queues.into_iter().next().context("no stats for the queue")
}

impl Worker {
    /// Sends any request on the stream (for protocol-violation tests).
    pub fn send(&self, request: v1::lease_request::Request) -> Result<()> {
        self.requests.send(v1::LeaseRequest { request: Some(request) }).context("send on the lease stream")
    }

    /// Waits for the next cancel notice, failing on anything else (or after `wait`).
    pub async fn take_cancel_notice(&mut self, wait: Duration) -> Result<v1::CancelNotice> {
        match self.next_within(wait).await? {
            Some(v1::lease_response::Response::Cancelled(notice)) => Ok(notice),
            Some(other) => anyhow::bail!("expected a cancel notice, got {other:?}"),
            None => anyhow::bail!("no cancel notice within {wait:?}"),
        }
    }

    /// Waits until the server ends the stream with an error status, skipping
    /// any jobs or notices before it (error after `wait`, or if the stream
    /// ends cleanly).
    pub async fn expect_error_status(&mut self, wait: Duration) -> Result<tonic::Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.responses.message()).await {
                Err(_) => anyhow::bail!("the stream did not end with an error within {wait:?}"),
                Ok(Err(status)) => return Ok(status),
                Ok(Ok(None)) => anyhow::bail!("the stream ended without an error status"),
                Ok(Ok(Some(_))) => continue,
            }
        }
    }
}

/// A job with an ordering key.
pub fn keyed_job(queue: &str, kind: &str, ordering_key: &str) -> v1::NewJob {
    v1::NewJob { ordering_key: ordering_key.to_owned(), ..new_job(queue, kind) }
}

/// Reads a job.
pub async fn get_job(broker: &mut BrokerClient<Channel>, job_id: &str) -> Result<v1::Job> {
    Ok(broker.get_job(v1::GetJobRequest { job_id: job_id.to_owned() }).await?.into_inner())
}

/// Makes a queue's retries quick and predictable: a fixed `initial` delay,
/// no jitter.
pub async fn configure_fast_backoff(
    admin: &mut AdminClient<Channel>,
    queue: &str,
    initial: Duration,
) -> Result<v1::QueueInfo> {
    Ok(admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: queue.to_owned(),
            backoff_initial: Some(workbroker_api::time::duration_to_proto(initial)),
            backoff_multiplier: Some(1.0),
            backoff_jitter: Some(0.0),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Every job of a queue (optionally of one state), following page tokens.
pub async fn list_all_jobs(admin: &mut AdminClient<Channel>, queue: &str, state: v1::JobState) -> Result<Vec<v1::Job>> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_jobs(v1::ListJobsRequest {
                queue: queue.to_owned(),
                state: state as i32,
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        page_token = page.next_page_token;
    }
}

/// A config like [`test_config`] whose reaper practically never runs (only
/// its first tick at start), for tests that drive a reaper themselves.
pub fn config_without_reaper(database_url: &str) -> ServerConfig {
    let mut config = test_config(database_url);
    config.reaper.interval = Duration::from_secs(3600);
    config
}

/// The status of a failed call, or an error if the call succeeded.
pub fn expect_status<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<tonic::Status> {
    match result {
        Ok(response) => anyhow::bail!("expected an error status, got {:?}", response.get_ref()),
        Err(status) => Ok(status),
    }
}

/// A plain HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// A minimal HTTP/1.1 GET (`Connection: close`, body read to the end).
pub async fn http_get(address: SocketAddr, path: &str) -> Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(address))
        .await
        .context("connect timed out")??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .context("response timed out")??;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("response has no header end")?;
    let mut lines = head.lines();
    let status_line = lines.next().context("empty response")?;
    let status = status_line.split_whitespace().nth(1).context("no status code")?.parse()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(HttpResponse { status, headers, body: body.to_owned() })
}
