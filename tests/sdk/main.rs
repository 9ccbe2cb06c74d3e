//! End-to-end tests of the worker SDK and its diff, sync and index handlers against a real broker.
