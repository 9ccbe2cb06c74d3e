//! Rust SDK for workbroker.
#![warn(missing_docs)]

pub mod backoff;
pub mod client;
pub mod handlers;
#[cfg(feature = "http-client")]
pub mod http;
pub mod trace;
pub mod worker;

pub use client::{Client, JobBuilder};
pub use workbroker_api::jobs::v1 as jobs;
pub use workbroker_api::v1 as api;
pub use worker::{CancelReason, Handler, JobContext, JobError, Output, Worker, WorkerBuilder, handler_fn};
