//! The producer-side client: connect, enqueue typed jobs, read, watch and
//! cancel them, read queue statistics.
//!
//! # Endpoints and TLS
//!
//! [`Client::connect`] takes one URL, [`Client::connect_many`] several (load
//! balanced by tonic's `balance_list`). For TLS, enable one of tonic's TLS
//! features in your own `Cargo.toml` (for example
//! `tonic = { version = "0.14", features = ["tls-ring", "tls-native-roots"] }`),
//! configure `Endpoint::tls_config` on each endpoint and
//! pass them to [`Client::from_endpoints`] — or build any [`Channel`] you like
//! and use [`Client::with_channel`]. The SDK itself does not pull a TLS stack.

use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use workbroker_api::v1;
use workbroker_api::v1::admin_client::AdminClient;
use workbroker_api::v1::broker_client::BrokerClient;

use crate::trace::{TRACEPARENT, current_traceparent};

/// Most jobs one `Enqueue` request may carry.
pub const MAX_JOBS_PER_ENQUEUE: usize = 1000;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An endpoint URL could not be parsed.
    #[error("invalid endpoint {endpoint:?}: {source}")]
    InvalidEndpoint {
        /// The URL as given.
        endpoint: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// No endpoint was given.
    #[error("at least one endpoint is required")]
    NoEndpoint,
    /// Connecting failed.
    #[error("could not connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The broker answered with an error status.
    #[error("broker error: {0}")]
    Status(#[from] tonic::Status),
    /// A job was refused before it was sent.
    #[error("invalid job: {field} {reason}")]
    InvalidJob {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// More than [`MAX_JOBS_PER_ENQUEUE`] jobs, or none, in one batch.
    #[error("a batch must have 1 to {MAX_JOBS_PER_ENQUEUE} jobs, got {0}")]
    BatchSize(usize),
    /// The broker's answer did not have the expected shape.
    #[error("unexpected response: {0}")]
    UnexpectedResponse(&'static str),
}

/// Settings applied to every endpoint the SDK creates from a URL.
pub(crate) fn configure_endpoint(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// Parses a URL into a configured endpoint.
pub fn endpoint(url: impl Into<String>) -> Result<Endpoint, Error> {
    let url = url.into();
    Endpoint::from_shared(url.clone())
        .map(configure_endpoint)
        .map_err(|source| Error::InvalidEndpoint { endpoint: url, source })
}

/// A handle on one broker (or a balanced set of replicas). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    /// One channel per endpoint, for workers (one Lease stream each).
    endpoint_channels: Vec<Channel>,
}

impl Client {
    /// Connects to one broker URL (for example `http://127.0.0.1:50051`),
    /// failing if it is unreachable now.
    pub async fn connect(url: impl Into<String>) -> Result<Self, Error> {
        let channel = endpoint(url)?.connect().await?;
        Ok(Self::with_channel(channel))
    }

    /// A client on one URL that connects on first use (and reconnects).
    pub fn connect_lazy(url: impl Into<String>) -> Result<Self, Error> {
        Ok(Self::with_channel(endpoint(url)?.connect_lazy()))
    }

    /// A client over several broker URLs: requests are balanced over them;
    /// a worker built from this client runs one Lease stream per URL.
    /// Connections are made lazily.
    pub fn connect_many<I, S>(urls: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints = urls.into_iter().map(endpoint).collect::<Result<Vec<_>, _>>()?;
        Self::from_endpoints(endpoints)
    }

    /// A client over pre-configured endpoints (TLS, timeouts, ...).
    pub fn from_endpoints(endpoints: Vec<Endpoint>) -> Result<Self, Error> {
        if endpoints.is_empty() {
            return Err(Error::NoEndpoint);
        }
        let endpoint_channels: Vec<Channel> = endpoints.iter().map(Endpoint::connect_lazy).collect();
        let channel = if endpoints.len() == 1 {
            endpoint_channels[0].clone()
        } else {
            Channel::balance_list(endpoints.into_iter())
        };
        Ok(Self { channel, endpoint_channels })
    }

    /// A client over a channel you built (TLS, custom connectors, interceptors).
    pub fn with_channel(channel: Channel) -> Self {
        Self { endpoint_channels: vec![channel.clone()], channel }
    }

    /// The channel requests go through.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// One channel per configured endpoint (one for [`Client::with_channel`]).
    pub fn endpoint_channels(&self) -> &[Channel] {
        &self.endpoint_channels
    }

    /// The raw generated Broker client, for anything this type does not wrap.
    pub fn broker(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel.clone())
    }

    /// The raw generated Admin client.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// Enqueues one job. The current trace context is added as `traceparent`
    /// unless the builder set one.
    pub async fn enqueue(&self, job: JobBuilder) -> Result<v1::EnqueuedJob, Error> {
        self.enqueue_batch([job])
            .await?
            .into_iter()
            .next()
            .ok_or(Error::UnexpectedResponse("no job in the enqueue response"))
    }

    /// Enqueues 1 to 1000 jobs atomically (all or none); answers in order.
    pub async fn enqueue_batch(
        &self,
        jobs: impl IntoIterator<Item = JobBuilder>,
    ) -> Result<Vec<v1::EnqueuedJob>, Error> {
        let traceparent = current_traceparent().map(|parent| parent.to_string());
        let jobs = jobs
            .into_iter()
            .map(|job| {
                let mut job = job.build()?;
                if let Some(traceparent) = &traceparent {
                    job.attributes.entry(TRACEPARENT.to_owned()).or_insert_with(|| traceparent.clone());
                }
                Ok(job)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if jobs.is_empty() || jobs.len() > MAX_JOBS_PER_ENQUEUE {
            return Err(Error::BatchSize(jobs.len()));
        }
        let count = jobs.len();
        let response = self.broker().enqueue(v1::EnqueueRequest { jobs }).await?.into_inner();
        if response.jobs.len() != count {
            return Err(Error::UnexpectedResponse("enqueue answered a different number of jobs"));
        }
        Ok(response.jobs)
    }

    /// Reads one job.
    pub async fn get(&self, job_id: &str) -> Result<v1::Job, Error> {
        Ok(self.broker().get_job(v1::GetJobRequest { job_id: job_id.to_owned() }).await?.into_inner())
    }

    /// The job's current state, then each change; the stream ends after a
    /// terminal state.
    pub async fn watch(
        &self,
        job_id: &str,
    ) -> Result<impl Stream<Item = Result<v1::Job, Error>> + Send + 'static, Error> {
        let stream = self.broker().watch_job(v1::WatchJobRequest { job_id: job_id.to_owned() }).await?.into_inner();
        Ok(stream.map(|item| item.map_err(Error::from)))
    }

    /// Waits until the job is terminal and returns it.
    pub async fn wait(&self, job_id: &str) -> Result<v1::Job, Error> {
        let mut stream = std::pin::pin!(self.watch(job_id).await?);
        let mut last = None;
        while let Some(job) = stream.next().await {
            last = Some(job?);
        }
        match last {
            Some(job) if is_terminal(job.state) => Ok(job),
            _ => Err(Error::UnexpectedResponse("the watch ended before a terminal state")),
        }
    }

    /// Cancels a job that is not terminal yet and returns it.
    pub async fn cancel(&self, job_id: &str) -> Result<v1::Job, Error> {
        self.broker()
            .cancel_job(v1::CancelJobRequest { job_id: job_id.to_owned() })
            .await?
            .into_inner()
            .job
            .ok_or(Error::UnexpectedResponse("cancel answered no job"))
    }

    /// Statistics of one queue, or of every queue when `queue` is empty.
    pub async fn queue_stats(&self, queue: &str) -> Result<Vec<v1::QueueStats>, Error> {
        Ok(self
            .admin()
            .get_queue_stats(v1::GetQueueStatsRequest { queue: queue.to_owned() })
            .await?
            .into_inner()
            .queues)
    }
}

/// True for COMPLETED, DEAD and CANCELLED.
pub fn is_terminal(state: i32) -> bool {
    state == v1::JobState::Completed as i32
        || state == v1::JobState::Dead as i32
        || state == v1::JobState::Cancelled as i32
}

/// Builds a job to enqueue.
///
/// ```
/// use std::time::Duration;
/// use workbroker_worker_sdk::JobBuilder;
///
/// let job = JobBuilder::new("emails", "send")
///     .payload(b"hello".to_vec())
///     .ordering_key("user-42")
///     .max_attempts(5)
///     .delay(Duration::from_secs(10))
///     .build()
///     .expect("valid job");
/// assert_eq!(job.queue, "emails");
/// ```
#[derive(Clone, Debug, Default)]
pub struct JobBuilder {
    job: v1::NewJob,
}

impl JobBuilder {
    /// A job of `kind` for `queue`, with an empty payload.
    pub fn new(queue: impl Into<String>, kind: impl Into<String>) -> Self {
        Self { job: v1::NewJob { queue: queue.into(), kind: kind.into(), ..Default::default() } }
    }

    /// The raw payload.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.job.payload = payload.into();
        self
    }

    /// A protobuf message as payload (for example a
    /// [`workbroker_api::jobs::v1::DiffJob`]).
    pub fn message<M: prost::Message>(mut self, message: &M) -> Self {
        self.job.payload = message.encode_to_vec();
        self
    }

    /// Adds one attribute.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.job.attributes.insert(key.into(), value.into());
        self
    }

    /// Higher priorities are leased first.
    pub fn priority(mut self, priority: i32) -> Self {
        self.job.priority = priority;
        self
    }

    /// Earliest time the job may run.
    pub fn run_at(mut self, run_at: SystemTime) -> Self {
        self.job.run_at = Some(prost_types::Timestamp::from(run_at));
        self.job.delay = None;
        self
    }

    /// Run after this delay.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.job.delay = Some(workbroker_api::time::duration_to_proto(delay));
        self.job.run_at = None;
        self
    }

    /// Attempts before the job goes DEAD (0: the queue's default).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.job.max_attempts = max_attempts;
        self
    }

    /// Jobs of one queue sharing this key run one at a time, in enqueue order.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.job.ordering_key = key.into();
        self
    }

    /// While an unfinished job of the queue has this key, enqueueing another
    /// returns that job instead.
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.job.dedup_key = key.into();
        self
    }

    /// Lease duration used when the worker does not ask for one.
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.job.lease_duration = Some(workbroker_api::time::duration_to_proto(duration));
        self
    }

    /// The job's queue.
    pub fn queue(&self) -> &str {
        &self.job.queue
    }

    /// Checks names and returns the wire message.
    pub fn build(self) -> Result<v1::NewJob, Error> {
        workbroker_api::names::validate_name(&self.job.queue)
            .map_err(|error| Error::InvalidJob { field: "queue", reason: error.to_string() })?;
        workbroker_api::names::validate_name(&self.job.kind)
            .map_err(|error| Error::InvalidJob { field: "kind", reason: error.to_string() })?;
        for (field, value) in [("ordering_key", &self.job.ordering_key), ("dedup_key", &self.job.dedup_key)] {
            if value.len() > 256 {
                return Err(Error::InvalidJob { field, reason: "must be at most 256 bytes".to_owned() });
            }
        }
        Ok(self.job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_validates_names_and_keys() {
        assert!(JobBuilder::new("q", "k").build().is_ok());
        assert!(matches!(JobBuilder::new("bad queue", "k").build(), Err(Error::InvalidJob { field: "queue", .. })));
        assert!(matches!(JobBuilder::new("q", "").build(), Err(Error::InvalidJob { field: "kind", .. })));
        assert!(matches!(
            JobBuilder::new("q", "k").ordering_key("x".repeat(257)).build(),
            Err(Error::InvalidJob { field: "ordering_key", .. })
        ));
    }

    #[test]
    fn delay_and_run_at_are_exclusive() {
        let job = JobBuilder::new("q", "k")
            .run_at(SystemTime::UNIX_EPOCH)
            .delay(Duration::from_secs(1))
            .build()
            .expect("valid");
        assert!(job.run_at.is_none());
        assert!(job.delay.is_some());
    }
}
