//! Rust SDK for [workbroker]: a client to enqueue and inspect jobs, a worker
//! runtime that runs one handler per job kind, and ready handlers for the
//! `diff`, `sync` and `index` kinds.
//!
//! # A worker
//!
//! ```no_run
//! use tokio_util::sync::CancellationToken;
//! use workbroker_worker_sdk::{Client, Handler, JobContext, JobError, Output, Worker};
//!
//! struct Greet;
//!
//! impl Handler for Greet {
//!     async fn handle(&self, job: JobContext) -> Result<Output, JobError> {
//!         let name = std::str::from_utf8(job.payload())
//!             .map_err(|error| JobError::permanent(format!("not UTF-8: {error}")))?;
//!         Ok(Output::bytes(format!("hello, {name}")))
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let client = Client::connect_lazy("http://127.0.0.1:50051")?;
//!     let worker = Worker::builder(client).queues(["greetings"]).concurrency(8).handler("greet", Greet).build()?;
//!     let shutdown = CancellationToken::new();
//!     let on_signal = shutdown.clone();
//!     tokio::spawn(async move {
//!         let _ = tokio::signal::ctrl_c().await;
//!         on_signal.cancel();
//!     });
//!     worker.run(shutdown).await?; // drains in-flight jobs before returning
//!     Ok(())
//! }
//! ```
//!
//! # A producer
//!
//! ```no_run
//! use workbroker_worker_sdk::{Client, JobBuilder};
//!
//! # async fn produce() -> Result<(), workbroker_worker_sdk::client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let job = client
//!     .enqueue(JobBuilder::new("greetings", "greet").payload("world").max_attempts(5))
//!     .await?;
//! let finished = client.wait(&job.job_id).await?;
//! println!("{}", String::from_utf8_lossy(&finished.result));
//! # Ok(())
//! # }
//! ```
//!
//! # What you get
//!
//! - [`Client`]: one or several endpoints (TLS through your own
//!   [`tonic::transport::Endpoint`] or [`tonic::transport::Channel`]),
//!   [`Client::enqueue`] / [`Client::enqueue_batch`] with [`JobBuilder`]
//!   (the current trace context is added as the W3C `traceparent`
//!   attribute), [`Client::get`], [`Client::watch`], [`Client::wait`],
//!   [`Client::cancel`], [`Client::queue_stats`].
//! - [`Worker`]: bounded concurrency, one long-lived `Lease` stream per
//!   endpoint, pipelined `Ack`/`Nack` streams, automatic lease extension,
//!   cancellation ([`JobContext::cancellation`]) on cancel notices, lost
//!   leases, timeouts and the drain deadline, panics caught as nacks,
//!   reconnection with backoff and jitter that keeps held jobs, graceful
//!   drain, and a tracing span per job that continues the producer's trace.
//!   See the [`worker`] module for the details and guarantees.
//! - [`handlers`]: `diff` (image metrics), `sync` (blob replication) and
//!   `index` (a crates.io-style registry index in git), each behind a cargo
//!   feature of the same name, all on by default.
//!
//! Delivery is at least once: a job can run again after a worker crash or a
//! lost lease, so handlers should be idempotent (the shipped ones are).
//!
//! [workbroker]: https://example.invalid/workbroker
#![warn(missing_docs)]

pub mod backoff;
pub mod client;
pub mod handlers;
#[cfg(feature = "http-client")]
pub mod http;
pub mod trace;
#[cfg(feature = "transactional")]
pub mod transactional;
pub mod worker;

pub use client::{Client, JobBuilder};
/// Typed payloads of the shipped handlers (`workbroker.jobs.v1`).
pub use workbroker_api::jobs::v1 as jobs;
/// The wire API (`workbroker.v1`).
pub use workbroker_api::v1 as api;
pub use worker::{CancelReason, Handler, JobContext, JobError, Output, Worker, WorkerBuilder, handler_fn};
