#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, end-to-end tests
# against a real PostgreSQL and real etcd servers, and the offline Helm chart
# check. Installs what is missing (Debian: postgresql, etcd-server,
# protobuf-compiler) and starts PostgreSQL when it is not running.
#
#   DATABASE_URL     use this PostgreSQL server (tests create one database each)
#   ETCD_ENDPOINTS   use this etcd (tests use their own key prefixes); tests that
#                    stop and restart etcd still start a local one
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/local-services.sh

ensure_rust
# protoc: etcd-client compiles etcd's protos at build time. etcd: cluster tests.
ensure_packages pkg-config python3 python3-venv protobuf-compiler etcd-server
ensure_postgres

log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo build (the broker binary, for tests that run replicas as processes)"
cargo build --workspace --bins --locked
log "cargo test"
cargo test --workspace --locked
log "helm chart"
scripts/check-helm-chart.sh
