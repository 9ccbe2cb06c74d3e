#!/usr/bin/env bash
# Starts a broker on this machine: installs and starts PostgreSQL when
# DATABASE_URL is not given, creates the `workbroker` database, builds the
# broker and runs `workbroker serve` (migrations run at start).
#
#   WORKBROKER_LISTEN   gRPC address (default 127.0.0.1:50051)
#   DATABASE_URL        use this database as it is
# Extra arguments go to `workbroker serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/local-services.sh

ensure_rust
ensure_packages pkg-config python3
if [ -z "${DATABASE_URL:-}" ]; then
    ensure_postgres
    ensure_database workbroker
    DATABASE_URL="$(database_url_for workbroker)"
    export DATABASE_URL
else
    ensure_postgres
fi
export WORKBROKER_LISTEN="${WORKBROKER_LISTEN:-127.0.0.1:50051}"

log "building the broker (release)"
cargo build --release --locked -p workbroker-server --bin workbroker
log "workbroker listening on ${WORKBROKER_LISTEN} (gRPC, with reflection and health); database ${DATABASE_URL}"
log "stop it with Ctrl-C (graceful) or a second Ctrl-C (at once)"
exec target/release/workbroker serve "$@"
