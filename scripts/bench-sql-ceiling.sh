#!/usr/bin/env bash
# Raw SQL ceilings with pgbench on DATABASE_URL's server (a scratch database,
# dropped afterwards), written as JSON {"name": jobs_per_second} for
# `workbroker-bench --ceilings`:
#   bulk_insert_1000           one 1,000-row INSERT per statement, 1 client
#   single_insert_16           one-row INSERT, 16 clients
#   drain_lease100_delete100   lease 100 + delete 100 per round, 4 clients, 50,000 jobs
#   lifecycle_100              insert 100 + lease 100 + delete 100 per round, 4 clients
# Usage: scripts/bench-sql-ceiling.sh OUTPUT.json [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:?usage: $0 OUTPUT.json [SECONDS]}"
seconds="${2:-10}"
: "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL server}"
name="wbceiling_$$_$(date +%s)"
server_url="$DATABASE_URL"
url="$(python3 - "$server_url" "$name" <<'PY'
import sys, urllib.parse as u
parts = u.urlsplit(sys.argv[1])
print(u.urlunsplit(parts._replace(path="/" + sys.argv[2])))
PY
)"
psql "$server_url" -qc "create database $name"
trap 'psql "$server_url" -qc "drop database if exists $name with (force)" >/dev/null 2>&1 || true' EXIT
psql "$url" -q -f bench/pgbench/schema.sql

tps() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1; }
reset() { psql "$url" -q -c "truncate ceiling_jobs" -c "vacuum analyze ceiling_jobs" >/dev/null; }

reset
bulk=$(pgbench -n -T "$seconds" -c 1 -j 1 -f bench/pgbench/bulk_insert_1000.sql "$url" 2>/dev/null | tps)
reset
single=$(pgbench -n -T "$seconds" -c 16 -j 2 -f bench/pgbench/single_insert.sql "$url" 2>/dev/null | tps)
reset
psql "$url" -q -c "insert into ceiling_jobs (queue, kind) select 'q', 'k' from generate_series(1, 50000)" -c "vacuum analyze ceiling_jobs" >/dev/null
drain=$(pgbench -n -t 125 -c 4 -j 2 -f bench/pgbench/drain_lease100_delete100.sql "$url" 2>/dev/null | tps)
reset
lifecycle=$(pgbench -n -T "$seconds" -c 4 -j 2 -f bench/pgbench/lifecycle_100.sql "$url" 2>/dev/null | tps)

python3 - "$output" "$bulk" "$single" "$drain" "$lifecycle" <<'PY'
import json, sys
out, bulk, single, drain, lifecycle = sys.argv[1], *map(float, sys.argv[2:])
ceilings = {
    "bulk_insert_1000": bulk * 1000,
    "single_insert_16": single,
    "drain_lease100_delete100": drain * 100,
    "lifecycle_100": lifecycle * 100,
}
json.dump(ceilings, open(out, "w"), indent=2)
for name, value in ceilings.items():
    print(f"{name:<28} {value:>12.0f} jobs/s")
PY
