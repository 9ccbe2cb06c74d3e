//! The worker runtime: lease jobs, run one handler per kind, settle them.
//!
//! ```no_run
//! use std::time::Duration;
//! use tokio_util::sync::CancellationToken;
//! use workbroker_worker_sdk::{Client, Output, Worker, handler_fn};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect_lazy("http://127.0.0.1:50051")?;
//! let worker = Worker::builder(client)
//!     .queues(["emails"])
//!     .concurrency(16)
//!     .lease_duration(Duration::from_secs(30))
//!     .handler("send", handler_fn(|job| async move {
//!         tracing::info!(job_id = job.id(), "sending");
//!         Ok(Output::none())
//!     }))
//!     .build()?;
//! worker.run(CancellationToken::new()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What the runtime does
//!
//! - One long-lived `Lease` stream per endpoint, opened with the free slots
//!   as window, reopened with exponential backoff and jitter when it fails
//!   (see the `state` module for the accounting that keeps concurrency bounded and
//!   never runs a held job twice across a reconnection).
//! - Acks and nacks over long-lived `Ack` / `Nack` streams per endpoint,
//!   pipelined, resent after a reconnection until answered.
//! - Lease extension at a third of the lease duration before expiry, retried
//!   through reconnections; a stale extension fires the job's token.
//! - Cancel notices fire the job's token; its outcome is then dropped.
//! - A panicking handler is caught (the job is nacked for retry); the worker
//!   goes on.
//! - Graceful drain on shutdown: send `drain` on the Lease streams (the
//!   broker sends no more jobs), start no new job, let running handlers
//!   finish (up to the drain timeout), then fire their tokens and, after the
//!   abandon grace, abort them and nack them for immediate retry; wait for
//!   every ack and nack to be answered; then close the streams, which hands
//!   back what was leased but not started without using up an attempt.

mod context;
mod extend;
mod handler;
mod lease;
mod metrics;
mod run;
mod settle;
mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use context::{CancelReason, JobContext};
pub use handler::{Handler, HandlerFn, JobError, Output, handler_fn};
pub use metrics::{MetricsSnapshot, WorkerMetrics};

use crate::backoff::BackoffConfig;
use crate::client::Client;
use handler::DynHandler;
use state::EndpointState;

/// Default lease duration asked for.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(30);
/// Default concurrency.
pub const DEFAULT_CONCURRENCY: u32 = 10;
/// Default time running handlers get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a handler gets to return after its token fired.
pub const DEFAULT_ABANDON_GRACE: Duration = Duration::from_secs(5);
/// Default time acks and nacks get to land at shutdown.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a worker could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No queue was given.
    #[error("a worker needs at least one queue")]
    NoQueues,
    /// No handler was registered.
    #[error("a worker needs at least one handler")]
    NoHandlers,
    /// A queue or kind name is not valid.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// "queue" or "kind".
        what: &'static str,
        /// The name.
        name: String,
        /// Why.
        reason: workbroker_api::names::NameError,
    },
    /// A setting is out of range.
    #[error("invalid setting {setting}: {reason}")]
    InvalidSetting {
        /// The setting.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

/// The settings of a worker (see [`WorkerBuilder`] for each).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Names this worker in job records and broker logs.
    pub worker_id: String,
    /// Queues to lease from.
    pub queues: Vec<String>,
    /// Jobs held at once over all endpoints.
    pub concurrency: u32,
    /// Lease duration asked for, and extension step.
    pub lease_duration: Duration,
    /// Time running handlers get at shutdown before their tokens fire.
    pub drain_timeout: Duration,
    /// Time a handler gets to return after its token fired.
    pub abandon_grace: Duration,
    /// Time acks and nacks get to land at shutdown.
    pub flush_timeout: Duration,
    /// Default per-job timeout (a handler's own `timeout` wins).
    pub job_timeout: Option<Duration>,
    /// Reconnection backoff of every stream.
    pub reconnect_backoff: BackoffConfig,
    /// Largest gRPC message sent or received.
    pub max_message_bytes: usize,
}

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    client: Client,
    config: WorkerConfig,
    handlers: HashMap<String, Arc<dyn DynHandler>>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WorkerBuilder")
            .field("config", &self.config)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Queues to lease from (replaces earlier calls).
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Jobs held (and handlers running) at once, over all endpoints; split
    /// evenly between them. Default 10.
    pub fn concurrency(mut self, concurrency: u32) -> Self {
        self.config.concurrency = concurrency;
        self
    }

    /// Registers the handler of one job kind (replacing an earlier one).
    pub fn handler(mut self, kind: impl Into<String>, handler: impl super::Handler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Registers a shared handler of one job kind.
    pub fn shared_handler<H: super::Handler>(mut self, kind: impl Into<String>, handler: Arc<H>) -> Self {
        self.handlers.insert(kind.into(), handler);
        self
    }

    /// Names the worker (default `worker-<pid>-<random>`).
    pub fn worker_id(mut self, worker_id: impl Into<String>) -> Self {
        self.config.worker_id = worker_id.into();
        self
    }

    /// Lease duration (1 s to 24 h, default 30 s). Leases are extended by
    /// this much when a third of it is left.
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.config.lease_duration = duration;
        self
    }

    /// Time running handlers get to finish at shutdown (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Time a handler gets to return after its token fired, at shutdown or
    /// on timeout, before it is abandoned (default 5 s).
    pub fn abandon_grace(mut self, grace: Duration) -> Self {
        self.config.abandon_grace = grace;
        self
    }

    /// Time acks and nacks get to land at shutdown (default 10 s).
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.config.flush_timeout = timeout;
        self
    }

    /// Default per-job timeout (none by default; a handler's own
    /// [`Handler::timeout`] wins).
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.config.job_timeout = Some(timeout);
        self
    }

    /// Reconnection backoff (default 100 ms doubling to 5 s, half jitter).
    pub fn reconnect_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.config.reconnect_backoff = backoff;
        self
    }

    /// Checks the settings and builds the worker.
    pub fn build(self) -> Result<Worker, Error> {
        let config = self.config;
        if config.queues.is_empty() {
            return Err(Error::NoQueues);
        }
        if self.handlers.is_empty() {
            return Err(Error::NoHandlers);
        }
        for (what, names) in
            [("queue", config.queues.iter().collect::<Vec<_>>()), ("kind", self.handlers.keys().collect::<Vec<_>>())]
        {
            for name in names {
                workbroker_api::names::validate_name(name).map_err(|reason| Error::InvalidName {
                    what,
                    name: name.clone(),
                    reason,
                })?;
            }
        }
        let endpoints = self.client.endpoint_channels().len();
        let endpoints_u32 = u32::try_from(endpoints).unwrap_or(u32::MAX);
        if config.concurrency < endpoints_u32 || config.concurrency > 10_000 * endpoints_u32 {
            return Err(Error::InvalidSetting {
                setting: "concurrency",
                reason: format!("must be 1 to 10000 per endpoint ({endpoints} endpoints)"),
            });
        }
        if config.lease_duration < Duration::from_secs(1) || config.lease_duration > Duration::from_secs(24 * 3600) {
            return Err(Error::InvalidSetting { setting: "lease_duration", reason: "must be 1 s to 24 h".to_owned() });
        }
        if config.worker_id.is_empty() || config.worker_id.len() > 256 {
            return Err(Error::InvalidSetting {
                setting: "worker_id",
                reason: "must be 1 to 256 characters".to_owned(),
            });
        }
        Ok(Worker {
            channels: self.client.endpoint_channels().to_vec(),
            config: Arc::new(config),
            handlers: Arc::new(self.handlers),
            metrics: WorkerMetrics::default(),
        })
    }
}

/// A worker: see the [module docs](self).
pub struct Worker {
    channels: Vec<tonic::transport::Channel>,
    config: Arc<WorkerConfig>,
    handlers: Arc<HashMap<String, Arc<dyn DynHandler>>>,
    metrics: WorkerMetrics,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Worker")
            .field("config", &self.config)
            .field("endpoints", &self.channels.len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts building a worker over `client`'s endpoints.
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            client,
            config: WorkerConfig {
                worker_id: format!("worker-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]),
                queues: Vec::new(),
                concurrency: DEFAULT_CONCURRENCY,
                lease_duration: DEFAULT_LEASE_DURATION,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                abandon_grace: DEFAULT_ABANDON_GRACE,
                flush_timeout: DEFAULT_FLUSH_TIMEOUT,
                job_timeout: None,
                reconnect_backoff: BackoffConfig::default(),
                max_message_bytes: 16 * 1024 * 1024,
            },
            handlers: HashMap::new(),
        }
    }

    /// The worker's counters (readable while it runs).
    pub fn metrics(&self) -> WorkerMetrics {
        self.metrics.clone()
    }

    /// The worker's settings.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Runs until `shutdown` fires, then drains (see the module docs).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let stop_leasing = CancellationToken::new();
        let stop = CancellationToken::new();
        let loops = TaskTracker::new();
        let settlers = TaskTracker::new();
        let job_tasks = TaskTracker::new();
        let endpoints = self.channels.len();
        let concurrency = self.config.concurrency as usize;
        let mut states = Vec::with_capacity(endpoints);
        for (index, channel) in self.channels.iter().enumerate() {
            let share = concurrency / endpoints + usize::from(index < concurrency % endpoints);
            let capacity = u32::try_from(share).unwrap_or(u32::MAX);
            let (acks, ack_queue) = mpsc::unbounded_channel();
            let (nacks, nack_queue) = mpsc::unbounded_channel();
            let state = Arc::new(EndpointState::new(state::EndpointParts {
                index,
                capacity,
                config: self.config.clone(),
                handlers: self.handlers.clone(),
                channel: channel.clone(),
                metrics: self.metrics.clone(),
                job_tasks: job_tasks.clone(),
                acks,
                nacks,
            }));
            loops.spawn(lease::LeaseLoop::new(state.clone()).run(stop_leasing.clone()));
            loops.spawn(extend::LeaseExtender::new(state.clone()).run(stop.clone()));
            settlers.spawn(settle::Settler::<settle::AckRpc>::new(state.clone(), ack_queue).run(stop.clone()));
            settlers.spawn(settle::Settler::<settle::NackRpc>::new(state.clone(), nack_queue).run(stop.clone()));
            states.push(state);
        }
        loops.close();
        settlers.close();
        tracing::info!(worker_id = %self.config.worker_id, queues = ?self.config.queues, kinds = ?self.handlers.keys().collect::<Vec<_>>(), concurrency, endpoints, "worker running");

        shutdown.cancelled().await;
        self.drain(&states, &job_tasks, &settlers).await;
        stop_leasing.cancel();
        stop.cancel();
        loops.wait().await;
        settlers.wait().await;
        tracing::info!(worker_id = %self.config.worker_id, "worker stopped");
        Ok(())
    }

    async fn drain(&self, states: &[Arc<EndpointState>], job_tasks: &TaskTracker, settlers: &TaskTracker) {
        let started = tokio::time::Instant::now();
        for state in states {
            state.start_draining();
        }
        let running =
            |states: &[Arc<EndpointState>]| -> usize { states.iter().map(|state| state.phase_counts().1).sum() };
        tracing::info!(running = running(states), deadline = ?self.config.drain_timeout, "draining: waiting for running jobs");
        let drained = wait_until(started + self.config.drain_timeout, || running(states) == 0).await;
        if !drained {
            tracing::warn!(running = running(states), "drain deadline passed; cancelling running jobs");
            for state in states {
                state.cancel_running(CancelReason::Shutdown);
            }
            let grace_end = tokio::time::Instant::now() + self.config.abandon_grace;
            if !wait_until(grace_end, || running(states) == 0).await {
                let aborted: usize = states.iter().map(|state| state.abort_running()).sum();
                tracing::warn!(aborted, "handlers ignored their cancellation; abandoned");
            }
        }
        job_tasks.close();
        // Tasks that were waiting for a permit end at once while draining;
        // aborted handlers end at their next await.
        if tokio::time::timeout(self.config.abandon_grace, job_tasks.wait()).await.is_err() {
            tracing::warn!("some job tasks did not end");
        }
        for state in states {
            state.close_settle_queues();
        }
        if tokio::time::timeout(self.config.flush_timeout, settlers.wait()).await.is_err() {
            let unanswered: usize = states.iter().map(|state| state.phase_counts().2).sum();
            tracing::warn!(unanswered, "acks and nacks not answered before the flush timeout");
        }
        // Jobs held but never started (waiting for a run permit, or leased
        // just before the drain request arrived) are released by the broker
        // when the lease streams close, right after this: after `drain`, that
        // returns them without using up an attempt.
        let unstarted: usize = states.iter().map(|state| state.phase_counts().0).sum();
        if unstarted > 0 {
            tracing::info!(unstarted, "handing back jobs that were not started");
        }
        for state in states {
            state.count_released_at_shutdown();
        }
    }
}

/// Polls `done` until it holds or `deadline` passes; true if it held.
async fn wait_until(deadline: tokio::time::Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
