#!/usr/bin/env bash
# Checks per second and latency of POST /v1/check over HTTP keep-alive, measured with wrk.
#
#   bench/http_check.sh [build dir] [seconds] [connections] [wrk threads]
#
# Starts its own tokenfused (a temp data dir, its own region, an ephemeral port), runs wrk
# against it, and prints wrk's report with latency percentiles and a one-line summary.
# Defaults: build, 10 s, 16 connections, 1 wrk thread.
set -euo pipefail
build=${1:-build}
seconds=${2:-10}
connections=${3:-16}
threads=${4:-1}
command -v wrk >/dev/null || { echo "http_check: wrk is missing: apt-get install wrk" >&2; exit 1; }

dir=$(mktemp -d)
shm="tfbench-$$"
agent=
cleanup() {
  if [ -n "$agent" ]; then kill "$agent" 2>/dev/null || true; wait "$agent" 2>/dev/null || true; fi
  rm -rf "$dir" "/dev/shm/$shm"
}
trap cleanup EXIT

cat >"$dir/tokenfuse.toml" <<TOML
[agent]
shm_name = "$shm"
data_dir = "$dir/state"
log_level = "warn"
[http]
listen = "127.0.0.1:0"
[budgets.tenants]
acme = "1000000"
TOML
"$build/agent/tokenfused" --config "$dir/tokenfuse.toml" >"$dir/agent.log" 2>&1 &
agent=$!
for _ in $(seq 100); do [ -s "$dir/state/http.port" ] && break; sleep 0.05; done
[ -s "$dir/state/http.port" ] || { echo "http_check: tokenfused did not start:" >&2; cat "$dir/agent.log" >&2; exit 1; }
port=$(cat "$dir/state/http.port")

cat >"$dir/check.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":4000,"run_id":"bench-run"}'
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("summary: %.0f checks/s  p50 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  max %.3f ms  " ..
                         "non-2xx %d  socket errors %d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000, summary.errors.status, errors))
end
LUA
wrk --latency -t "$threads" -c "$connections" -d "${seconds}s" -s "$dir/check.lua" "http://127.0.0.1:$port/v1/check"
