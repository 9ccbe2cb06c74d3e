#!/usr/bin/env bash
# Cluster figures for the coordination layer, with release binaries:
#   1. three replicas on one fresh database and a local etcd (loopback, temp dir);
#   2. drain throughput of one queue with every worker on one replica, then
#      spread over the three (workbroker-bench drain --worker-endpoints);
#   3. shards moved when a replica leaves (SIGKILL) and when one joins,
#      read from the leader's "published a new shard map" log lines.
# Needs DATABASE_URL (a server where databases may be created) and the etcd
# binary (Debian etcd-server). Usage: scripts/bench-cluster.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL}"
jobs="${1:-50000}"
cargo build --release --locked -q -p workbroker-server -p workbroker-bench
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port)
etcd --name bench --data-dir "$work/etcd" --log-level error \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "bench=http://127.0.0.1:$peer_port" >/dev/null 2>&1 &
pids+=($!)
database="wbcluster_$$"
psql "$DATABASE_URL" -qc "create database $database"
url="$(python3 - "$DATABASE_URL" "$database" <<'PY'
import sys, urllib.parse as u
parts = u.urlsplit(sys.argv[1]); print(u.urlunsplit(parts._replace(path="/" + sys.argv[2])))
PY
)"
trap 'cleanup; psql "$DATABASE_URL" -qc "drop database if exists $database with (force)" >/dev/null 2>&1 || true' EXIT
target/release/workbroker migrate --database-url "$url" >/dev/null

endpoints=()
start_replica() {
    local port; port=$(free_port)
    WORKBROKER_LOG=warn,workbroker_server::coordination=info DATABASE_URL="$url" \
        ETCD_ENDPOINTS="http://127.0.0.1:$etcd_port" WORKBROKER_ETCD_PREFIX=/bench \
        target/release/workbroker serve --listen "127.0.0.1:$port" --member-id "replica-$port" \
        >>"$work/replica-$port.log" 2>&1 &
    pids+=($!)
    endpoints+=("http://127.0.0.1:$port")
    echo "$!"
}
first=$(start_replica); start_replica >/dev/null; start_replica >/dev/null
sleep 8
all=$(IFS=,; echo "${endpoints[*]}")
echo "== drain of one queue, workers on one replica"
target/release/workbroker-bench --endpoint "${endpoints[0]}" --database-url "$url" --jobs "$jobs" drain | tail -1
echo "== drain of one queue, workers spread over three replicas"
target/release/workbroker-bench --endpoint "${endpoints[0]}" --database-url "$url" --jobs "$jobs" \
    --worker-endpoints "$all" drain | tail -1

echo "== shards moved when a replica leaves (SIGKILL) and when one joins"
kill -9 "$first"
sleep 15
start_replica >/dev/null
sleep 8
sed 's/\x1b\[[0-9;]*m//g' "$work"/replica-*.log | grep -h "published a new shard map" | sed 's/^.*published/published/' || true
