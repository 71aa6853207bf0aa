#!/usr/bin/env bash
# tokenfused's POST /v1/check against nginx answering a fixed 200, measured in one run on the same
# machine with wrk (1 thread, 64 connections), alternating, ROUNDS rounds; prints each round and
# the medians of requests/s and p99 latency, and the ratio.
#
#   bench/http_check.sh [build-dir]          (ROUNDS=5 DURATION=5s by default)
#
# Needs wrk and nginx (Debian's packages; installed with apt-get if missing). nginx runs from a
# temp dir with its own config: 2 workers, access log off, `return 200`.
set -euo pipefail

build=${1:-build}
rounds=${ROUNDS:-5}
duration=${DURATION:-5s}
tokenfused="$build/agent/tokenfused"
[ -x "$tokenfused" ] || { echo "http_check: $tokenfused not found: build first (cmake --build --preset default)" >&2; exit 2; }

need=()
command -v wrk >/dev/null || need+=(wrk)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=(); [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d /tmp/tokenfuse-http-bench.XXXXXX)
shm="tfbench-http-$$"
agent_pid=""; nginx_pid=""
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  if [ -n "$nginx_pid" ]; then kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; fi
  rm -rf "$tmp" "/dev/shm/$shm"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# tokenfused on its embedded default, on a port of its own; the tenant has a limit, so every
# check goes through the limited path.
cat >"$tmp/tokenfuse.toml" <<TOML
[agent]
shm_name = "$shm"
data_dir = "$tmp/state"
log_level = "warn"
[http]
listen = "127.0.0.1:0"
[budgets.tenants]
acme = "1000000"
TOML
"$tokenfused" --config "$tmp/tokenfuse.toml" >"$tmp/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 100); do [ -s "$tmp/state/http.port" ] && break; sleep 0.1; done
[ -s "$tmp/state/http.port" ] || { echo "http_check: tokenfused did not start:" >&2; cat "$tmp/agent.log" >&2; exit 1; }
agent_port=$(cat "$tmp/state/http.port")

nginx_port=$(free_port)
mkdir -p "$tmp/nginx/logs"
cat >"$tmp/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
daemon off;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$nginx_port;
    location / { return 200 '{"allowed":true}'; }
  }
}
CONF
/usr/sbin/nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" &
nginx_pid=$!
sleep 0.5

cat >"$tmp/check.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":4000,"run_id":"bench-run"}'
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("summary %.0f %.3f %d %d\n", summary.requests / (summary.duration / 1e6),
                         latency:percentile(99) / 1000, summary.errors.status, errors))
end
LUA

# Requests/s and the p99 in ms of one wrk run; stops on any error or non-2xx answer.
run() {
  local out rps p99 non2xx errors
  out=$(wrk -t1 -c64 -d"$duration" -s "$tmp/check.lua" "http://127.0.0.1:$1/v1/check")
  read -r _ rps p99 non2xx errors < <(grep '^summary ' <<<"$out")
  if [ "$non2xx" != 0 ] || [ "$errors" != 0 ]; then
    echo "http_check: $non2xx non-2xx answers and $errors socket errors from port $1:" >&2; echo "$out" >&2; exit 1
  fi
  echo "$rps $p99"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

: >"$tmp/agent.txt"; : >"$tmp/nginx.txt"
echo "round  tokenfused req/s  p99 ms   nginx req/s  p99 ms"
for i in $(seq "$rounds"); do
  a=$(run "$agent_port"); n=$(run "$nginx_port")
  echo "$a" >>"$tmp/agent.txt"; echo "$n" >>"$tmp/nginx.txt"
  printf "%5d  %16.0f  %6.3f   %11.0f  %6.3f\n" "$i" $a $n
done
a_rps=$(awk '{print $1}' "$tmp/agent.txt" | median); a_p99=$(awk '{print $2}' "$tmp/agent.txt" | median)
n_rps=$(awk '{print $1}' "$tmp/nginx.txt" | median); n_p99=$(awk '{print $2}' "$tmp/nginx.txt" | median)
printf "median tokenfused %.0f req/s, p99 %.3f ms; nginx %.0f req/s, p99 %.3f ms; ratio %.2f\n" \
  "$a_rps" "$a_p99" "$n_rps" "$n_p99" "$(awk -v a="$a_rps" -v n="$n_rps" 'BEGIN {print a / n}')"
