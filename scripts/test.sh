#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and end-to-end tests
# against a real PostgreSQL (installed and started when missing; DATABASE_URL
# names another server to use instead). Every test creates its own database.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/local-services.sh

ensure_rust
ensure_packages pkg-config python3
ensure_postgres

log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
cargo test --workspace --locked
