#!/usr/bin/env bash
# The benchmark run behind the README's Performance section: raw SQL ceilings
# with pgbench, then every scenario against a release broker started on a
# fresh database of the same server, in the same run. Installs and starts
# PostgreSQL when DATABASE_URL is not set.
#
# Usage: scripts/bench.sh [workbroker-bench arguments...]   (default: all; each
# scenario 3 times, the median shown: --repeat N changes it). Each run of a
# scenario with a ceiling is also paired with that ceiling measured just
# before it (one pgbench run), so that each run has its own ratio.
# Results: bench/results/latest.json and the table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/local-services.sh
ensure_rust
ensure_packages pkg-config python3 protobuf-compiler
ensure_postgres
mkdir -p bench/results
log "building release binaries"
cargo build --release --locked -p workbroker-server -p workbroker-bench
log "raw SQL ceilings (pgbench)"
scripts/bench-sql-ceiling.sh bench/results/ceilings.json "${WORKBROKER_CEILING_SECONDS:-10}" "${WORKBROKER_CEILING_RUNS:-3}"
log "scenarios"
if [ "$#" -eq 0 ]; then set -- all; fi
target/release/workbroker-bench --start --ceilings bench/results/ceilings.json \
    --ceiling-script scripts/bench-sql-ceiling.sh --ceiling-seconds "${WORKBROKER_CEILING_SECONDS:-10}" \
    --json bench/results/latest.json "$@"
