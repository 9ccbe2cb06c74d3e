//! End-to-end tests: the real broker on 127.0.0.1:0, its own PostgreSQL
//! database per test, driven over gRPC.

mod announcements;
mod bad_input;
mod cancel_and_watch;
mod cli;
mod cluster;
mod discovery;
mod handoff;
mod lease_flow;
mod ordering;
mod python_worker;
mod queue_key;
mod reaper;
mod resilience;
mod retries;
mod sql_enqueue;
mod status_page;
mod telemetry;
mod watermark;
