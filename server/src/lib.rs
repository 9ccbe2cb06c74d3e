//! The workbroker broker: gRPC services over a PostgreSQL store.
//!
//! `main.rs` only parses configuration and sets up logging; [`server::run`]
//! wires every part together, so tests start a real broker on `127.0.0.1:0`.

pub mod admin;
pub mod cli;
pub mod config;
pub mod coordination;
pub mod dispatch;
pub mod reaper;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod vacuum;
