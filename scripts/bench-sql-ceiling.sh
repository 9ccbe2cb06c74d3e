#!/usr/bin/env bash
# Raw SQL ceilings with pgbench on DATABASE_URL's server (a scratch database,
# dropped afterwards), written as JSON {"name": jobs_per_second} for
# `workbroker-bench --ceilings`; each figure is the median of RUNS runs:
#   bulk_insert_1000           one 1,000-row INSERT per statement, 1 client
#   single_insert_16           one-row INSERT, 16 clients
#   drain_lease100_delete100   lease 100 + delete 100 per round, 4 clients, 50,000 jobs
#   lifecycle_100              insert 100 + lease 100 + delete 100 per round, 4 clients
# pgbench connects the way the broker does: without TLS (the broker's
# PostgreSQL driver is built without it), so neither side pays for
# encryption the other does not (CEILING_SSLMODE overrides, e.g. `prefer`).
# Usage: scripts/bench-sql-ceiling.sh OUTPUT.json [SECONDS] [RUNS] [NAMES]
# NAMES (comma-separated, default all four) measures only those: the form
# `workbroker-bench --ceiling-script` runs before each repetition of a
# scenario, so that each run has a ceiling measured just before it.
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:?usage: $0 OUTPUT.json [SECONDS] [RUNS] [NAMES]}"
seconds="${2:-10}"
runs="${3:-3}"
names=",${4:-bulk_insert_1000,single_insert_16,drain_lease100_delete100,lifecycle_100},"
wanted() { [[ "$names" == *",$1,"* ]]; }
: "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL server}"
name="wbceiling_$$_$(date +%s)"
server_url="$DATABASE_URL"
url="$(python3 - "$server_url" "$name" "${CEILING_SSLMODE:-disable}" <<'PY'
import sys, urllib.parse as u
parts = u.urlsplit(sys.argv[1])
query = [(k, v) for k, v in u.parse_qsl(parts.query) if k != "sslmode"] + [("sslmode", sys.argv[3])]
print(u.urlunsplit(parts._replace(path="/" + sys.argv[2], query=u.urlencode(query))))
PY
)"
psql "$server_url" -qc "create database $name"
trap 'psql "$server_url" -qc "drop database if exists $name with (force)" >/dev/null 2>&1 || true' EXIT
psql "$url" -q -f bench/pgbench/schema.sql

tps() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1; }
reset() { psql "$url" -q -c "truncate ceiling_jobs" -c "vacuum analyze ceiling_jobs" >/dev/null; }
# median CMD...: runs CMD $runs times (each after a reset) and prints the median tps.
median() {
    local results=()
    for _ in $(seq 1 "$runs"); do
        reset
        results+=("$("$@")")
    done
    printf '%s\n' "${results[@]}" | sort -g | sed -n "$(( (runs + 1) / 2 ))p"
}
bulk_run() { pgbench -n -T "$seconds" -c 1 -j 1 -f bench/pgbench/bulk_insert_1000.sql "$url" 2>/dev/null | tps; }
single_run() { pgbench -n -T "$seconds" -c 16 -j 2 -f bench/pgbench/single_insert.sql "$url" 2>/dev/null | tps; }
drain_run() {
    psql "$url" -q -c "insert into ceiling_jobs (queue, kind) select 'q', 'k' from generate_series(1, 50000)" \
        -c "vacuum analyze ceiling_jobs" >/dev/null
    pgbench -n -t 125 -c 4 -j 2 -f bench/pgbench/drain_lease100_delete100.sql "$url" 2>/dev/null | tps
}
lifecycle_run() { pgbench -n -T "$seconds" -c 4 -j 2 -f bench/pgbench/lifecycle_100.sql "$url" 2>/dev/null | tps; }

# Each figure in jobs/s; a ceiling not asked for is left out.
bulk=-1 single=-1 drain=-1 lifecycle=-1
if wanted bulk_insert_1000; then bulk=$(median bulk_run); fi
if wanted single_insert_16; then single=$(median single_run); fi
if wanted drain_lease100_delete100; then drain=$(median drain_run); fi
if wanted lifecycle_100; then lifecycle=$(median lifecycle_run); fi

python3 - "$output" "$bulk" "$single" "$drain" "$lifecycle" <<'PY'
import json, sys
out, bulk, single, drain, lifecycle = sys.argv[1], *map(float, sys.argv[2:])
measured = {
    "bulk_insert_1000": bulk * 1000,
    "single_insert_16": single,
    "drain_lease100_delete100": drain * 100,
    "lifecycle_100": lifecycle * 100,
}
ceilings = {name: value for name, value in measured.items() if value >= 0}
json.dump(ceilings, open(out, "w"), indent=2)
for name, value in ceilings.items():
    print(f"{name:<28} {value:>12.0f} jobs/s")
PY
