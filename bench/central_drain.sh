#!/usr/bin/env bash
# How fast a backlog of ledger entries drains to Postgres (and its totals to Redis).
#
#   bench/central_drain.sh [build dir] [entries] [tenants]
#
# Starts its own redis-server and postgres (temp dirs, free ports; as root, postgres runs as
# the postgres user), writes a ledger of N entries (default 1,000,000, over 50 tenants) into
# a fresh data dir, and starts tokenfused with [central] pointing at both while Postgres is still
# down, as after a partition. Once the agent is up, it starts Postgres and times the drain: from
# Postgres accepting connections until it holds every entry (and Redis the fleet total).
set -euo pipefail
build=${1:-build}
entries=${2:-1000000}
tenants=${3:-50}
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
dir=$(mktemp -d)
shm="tfdrain-$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir" "/dev/shm/$shm"
}
trap cleanup EXIT
as_pg=()
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --); fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port); pport=$(free_port)

redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)
"${as_pg[@]}" "$bindir/initdb" -D "$dir/pg" -A trust -U tokenfuse --no-sync -E UTF8 --no-locale >"$dir/initdb.log"

# The ledger: the agent creates its schema, then SQLite fills it in one statement.
mkdir -p "$dir/state"
"$build/agent/tokenfused" --shm-name "$shm" --data-dir "$dir/state" --listen off --check-config >/dev/null
"$build/agent/tokenfused" --shm-name "$shm" --data-dir "$dir/state" --listen off --log-level warn &
agent=$!
for _ in $(seq 100); do [ -e "$dir/state/ledger.db" ] && break; sleep 0.05; done
sleep 0.5; kill "$agent"; wait "$agent" || true
rm -f "/dev/shm/$shm"
day=$(( $(date +%s) / 86400 ))
now=$(date +%s%N)
echo "writing $entries ledger entries ..."
sqlite3 "$dir/state/ledger.db" <<SQL
PRAGMA journal_mode=WAL;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $entries)
INSERT INTO budget_ledger (seq, host_id, created_at_unix_ns, day, kind, project_id, agent_id, run_id, model, provider,
                           prompt_tokens, completion_tokens, cost_nano_usd)
SELECT i, 'bench-host', $now + i * 1000, $day, 'record', 'tenant-' || (i % $tenants), 'agent-' || (i % 7), NULL,
       'gpt-4o', 'openai', 1000 + i % 100, 200, 5000000 + (i % 100) * 5000 + 3000000 FROM n;
DELETE FROM meta WHERE key = 'spend_by_day_filled';
SQL
expected=$(sqlite3 "$dir/state/ledger.db" "SELECT SUM(cost_nano_usd) FROM budget_ledger")

cat >"$dir/tokenfuse.toml" <<TOML
[agent]
shm_name = "$shm"
data_dir = "$dir/state"
host_id = "bench-host"
log_level = "warn"
[http]
listen = "off"
[central]
redis_url = "redis://127.0.0.1:$rport/0"
postgres_url = "postgresql://tokenfuse@127.0.0.1:$pport/postgres"
TOML
launch=$(date +%s.%N)
"$build/agent/tokenfused" --config "$dir/tokenfuse.toml" >"$dir/agent.log" 2>&1 &
agent=$!; pids+=($agent)
until "$build/agent/tokenfuse" --shm-name "$shm" status >/dev/null 2>&1; do
  kill -0 "$agent" || { cat "$dir/agent.log"; exit 1; }
  sleep 0.02
done
ready=$(date +%s.%N)
key="{tokenfuse:$(date -u +%F)}:total"
until [ "$(redis-cli -p "$rport" HGET "$key" p)" = "$expected" ]; do sleep 0.01; done
pushed=$(date +%s.%N)
"${as_pg[@]}" "$bindir/postgres" -D "$dir/pg" -p "$pport" -k "$dir" -c listen_addresses=127.0.0.1 >"$dir/pg.log" 2>&1 &
pids+=($!)
until "$bindir/pg_isready" -q -h 127.0.0.1 -p "$pport"; do sleep 0.02; done
start=$(date +%s.%N)
psql() { "$bindir/psql" -h 127.0.0.1 -p "$pport" -U tokenfuse -d postgres -Atc "$1" 2>/dev/null || echo 0; }
# Poll the pushed position (one row), not count(*): a scan of the table every 50 ms would take
# the CPU the drain needs. The count is checked once at the end.
while :; do
  pos=$(psql "SELECT host_seq FROM tokenfuse_push WHERE host_id = 'bench-host'")
  [ "$pos" = "$entries" ] && break
  kill -0 "$agent" || { cat "$dir/agent.log"; exit 1; }
  sleep 0.2   # the figure is good to 0.2 s; polling faster takes CPU from the drain
done
end=$(date +%s.%N)
rows=$(psql "SELECT count(*), count(DISTINCT host_seq) FROM budget_ledger")
[ "$rows" = "$entries|$entries" ] || { echo "central_drain: Postgres holds $rows rows, expected $entries" >&2; exit 1; }
python3 - "$launch" "$ready" "$pushed" "$start" "$end" "$entries" "$tenants" <<'PY'
import sys
launch, ready, pushed, start, end = map(float, sys.argv[1:6])
n, tenants = int(sys.argv[6]), int(sys.argv[7])
print(f"agent up in {ready - launch:.2f} s (a new region, today's counters rebuilt from {n} entries)")
print(f"day totals of {tenants} tenants in Redis {pushed - ready:.2f} s after that "
      f"(<= {tenants / max(pushed - ready, 1e-3):,.0f} totals/s, including the agent's first sync interval)")
print(f"drained {n} entries to Postgres in {end - start:.2f} s: {n / (end - start):,.0f} entries/s")
PY
