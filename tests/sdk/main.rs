//! End-to-end tests of the worker SDK and its diff, sync and index handlers
//! against a real broker over its own PostgreSQL database.

mod common;
mod diff;
mod index;
mod runtime;
mod sync;
mod transactional;
