#!/usr/bin/env bash
# Builds the .deb packages from a configured build tree, checks them (lintian, systemd-analyze),
# installs them on this machine, starts the installed tokenfused as user tokenfuse with the
# packaged config on a temporary state dir, builds tests/consumer and the shipped examples
# against the installed library (find_package and pkg-config), runs them as a member of the
# tokenfuse group (and fails one that is not), runs the installed unit under a systemd booted in
# its own namespaces, and purges the packages again.
#
#   packaging/test-packages.sh [build-dir]       as root (it installs packages and adds a user)
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
build=$(realpath "${1:-build}")
[ "$(id -u)" -eq 0 ] || { echo "test-packages: run as root (it installs packages)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/tokenfuse-pkg-XXXXXX)
chmod 755 "$tmp"
shm="tf-pkg-$$"
agent_pid=""
systemd_pid=""
app_user=tfapp
names=(tokenfuse libtokenfuse0.2 libtokenfuse-dev python3-tokenfuse)
step() { printf '\n== %s\n' "$*"; }
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  [ -n "$systemd_pid" ] && kill -KILL "$systemd_pid" 2>/dev/null || true
  for n in "${names[@]}"; do   # a failed run leaves nothing installed either
    if dpkg-query -W -f='${Status}' "$n" 2>/dev/null | grep -q 'ok installed'; then apt-get purge -y -q "$n" >/dev/null 2>&1 || true; fi
  done
  rm -f "/dev/shm/$shm"
  userdel "$app_user" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
as_app() { setpriv --reuid="$app_user" --regid="$app_user" --init-groups -- "$@"; }

step "packages"
rm -rf "$build/packages"
cpack --config "$build/CPackConfig.cmake" -B "$build/packages" | grep 'generated'
debs=("$build"/packages/*.deb)
for d in "${debs[@]}"; do dpkg-deb -f "$d" Package Version Depends; done

step "lintian (what is left is explained in docs/operations.md, 'Installing from the packages')"
rc=0
lintian --fail-on error --tag-display-limit 0 "${debs[@]}" >"$tmp/lintian.log" 2>&1 || rc=$?
grep -v 'running with root privileges' "$tmp/lintian.log" || true
[ "$rc" -eq 0 ] || { echo "test-packages: lintian found errors (exit $rc)" >&2; exit 1; }

step "install"
apt-get install -y -q "${debs[@]}" >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log"; exit 1; }
getent passwd tokenfuse | grep ':/var/lib/tokenfuse:/usr/sbin/nologin$' >/dev/null
getent group tokenfuse >/dev/null
[ "$(stat -c '%U:%G %a' /var/lib/tokenfuse)" = "tokenfuse:tokenfuse 750" ]
test -f /etc/tokenfuse/tokenfuse.toml
/usr/sbin/tokenfused --config /etc/tokenfuse/tokenfuse.toml --check-config

step "systemd unit"
systemd-analyze verify /lib/systemd/system/tokenfused.service
# Fails if a change raises the exposure above 2.0 (of 10; lower is better).
systemd-analyze security --offline=yes --threshold=20 /lib/systemd/system/tokenfused.service | tail -1

step "the installed agent, as user tokenfuse, on the packaged config"
install -d -o tokenfuse -g tokenfuse -m 0750 "$tmp/state"
(umask 0077; exec setpriv --reuid=tokenfuse --regid=tokenfuse --init-groups -- /usr/sbin/tokenfused \
   --config /etc/tokenfuse/tokenfuse.toml --data-dir "$tmp/state" --shm-name "$shm" --listen 127.0.0.1:0) \
   >"$tmp/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 100); do [ -s "$tmp/state/http.port" ] && break; sleep 0.1; done
[ -s "$tmp/state/http.port" ] || { cat "$tmp/agent.log"; exit 1; }
# The region belongs to the tokenfuse group: its members check and spend, nobody else.
[ "$(stat -c '%U:%G %a' "/dev/shm/$shm")" = "tokenfuse:tokenfuse 660" ]
# The ledger and the admin token are not: only user tokenfuse (and root) read them.
[ "$(stat -c '%U %a' "$tmp/state/ledger.db")" = "tokenfuse 600" ]
[ "$(stat -c '%U %a' "$tmp/state/admin.token")" = "tokenfuse 600" ]
useradd --system --no-create-home --shell /usr/sbin/nologin --groups tokenfuse "$app_user"

step "tests/consumer: find_package and pkg-config, C and C++"
cmake -S "$src/tests/consumer" -B "$tmp/consumer" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$tmp/consumer" >/dev/null
c++ -std=c++20 -O2 "$src/tests/consumer/consumer.cc" -o "$tmp/consumer/pc_cpp" $(pkg-config --cflags --libs tokenfuse)
cc -std=c99 -O2 -Wall -Wextra -Werror "$src/tests/consumer/consumer.c" -o "$tmp/consumer/pc_c" $(pkg-config --cflags --libs tokenfuse)
for exe in consumer_cpp consumer_c pc_cpp pc_c; do
  ldd "$tmp/consumer/$exe" | grep -E '=> (/usr)?/lib/x86_64-linux-gnu/libtokenfuse.so.0.2 ' >/dev/null   # the installed one
  as_app "$tmp/consumer/$exe" "$shm"
done
# Not in the group: refused, with a message that says what to do.
if setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$tmp/consumer/consumer_cpp" "$shm" 2>"$tmp/denied.log"; then
  echo "test-packages: a user outside the tokenfuse group attached to the region" >&2; exit 1
fi
grep -q "member of the region's group" "$tmp/denied.log"

step "examples, from the installed package"
cp -r /usr/share/doc/libtokenfuse-dev/examples "$tmp/examples"
cmake -S "$tmp/examples/cpp" -B "$tmp/examples/cpp/build" >/dev/null && cmake --build "$tmp/examples/cpp/build" >/dev/null
make -s -C "$tmp/examples/c"
chmod -R a+rX "$tmp/examples"
as_app "$tmp/examples/cpp/build/tokenfuse_example_cpp" "$shm"
as_app "$tmp/examples/c/tokenfuse_example_c" "$shm"
as_app env -u PYTHONPATH python3 "$tmp/examples/python/app.py" "$shm"

step "the CLI against the installed agent"
as_app tokenfuse --shm-name "$shm" usage consumer
tokenfuse --shm-name "$shm" limit set example-app 0.0001 --data-dir "$tmp/state"   # root reads the admin token
code=0; as_app "$tmp/examples/c/tokenfuse_example_c" "$shm" || code=$?
[ "$code" -eq 1 ]   # refused by the limit just set
entries=$(tokenfuse ledger list --data-dir "$tmp/state" --format csv | tail -n +2 | wc -l)
echo "ledger entries written by the installed agent: $entries"
[ "$entries" -eq 8 ]   # 4 consumers, the C++ and C examples, two Python calls
# The archive, as user tokenfuse: every entry before tomorrow is kept (this month's), none removed.
archive=$(setpriv --reuid=tokenfuse --regid=tokenfuse --init-groups -- tokenfuse ledger archive --data-dir "$tmp/state" \
            --before "$(date -u -d tomorrow +%F)" --out "$tmp/state/archive.jsonl.gz" --json)
echo "$archive" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["removed"] == 0 and r["kept_because"], r'

step "the dashboard and the Grafana board, from the packages"
port=$(cat "$tmp/state/http.port")
python3 - "$port" <<'PY'
import sys, urllib.request
base = "http://127.0.0.1:" + sys.argv[1]
page = urllib.request.urlopen(base + "/ui")
assert "default-src 'none'" in page.headers["Content-Security-Policy"], page.headers
assert b"/ui/app.js" in page.read()
for asset in ("/ui/app.js", "/ui/app.css"):
    assert urllib.request.urlopen(base + asset).status == 200
PY
python3 -m json.tool /usr/share/doc/libtokenfuse-dev/grafana/tokenfuse.json >/dev/null

kill -TERM "$agent_pid"; wait "$agent_pid"; agent_pid=""
grep -q '"event":"agent_stopped"' "$tmp/agent.log"

step "the unit under a real systemd, booted in its own PID and mount namespace"
# /tmp, /var/tmp and /run get fresh tmpfs mounts in the namespace: booting clears /tmp
# (tmpfiles.d), and this machine's /tmp must survive. /dev/shm stays the host's, as on a real
# host, so what the service creates there is what other services and applications see.
unshare --pid --fork --mount --propagation private -- sh -c \
  'mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /var/tmp && mount -t tmpfs tmpfs /run &&
   exec /lib/systemd/systemd --system --unit=tokenfused.service --log-target=console' >"$tmp/systemd.log" 2>&1 &
unshare_pid=$!
systemd_pid=""
for _ in $(seq 100); do systemd_pid=$(pgrep -P "$unshare_pid" || true); [ -n "$systemd_pid" ] && break; sleep 0.1; done
in_ns() { timeout 30 nsenter -t "$systemd_pid" -m -p -- "$@"; }
state=""
for _ in $(seq 300); do
  state=$(in_ns systemctl is-active tokenfused 2>/dev/null || true)
  [ "$state" = active ] || [ "$state" = failed ] && break
  sleep 0.1
done
if [ "$state" = active ]; then
  in_ns systemctl show -p Type -p StatusText -p User tokenfused
  in_ns systemctl show -p StatusText tokenfused | grep 'ready' >/dev/null   # sent with READY=1
  [ "$(stat -c '%U:%G %a' /dev/shm/tokenfuse)" = "tokenfuse:tokenfuse 660" ]
  as_app "$tmp/consumer/consumer_cpp" tokenfuse   # another "service" on the host uses the region
  in_ns systemctl stop tokenfused
  test -e /dev/shm/tokenfuse   # the region outlives the service (no RemoveIPC)
  in_ns systemctl start tokenfused
  [ "$(in_ns systemctl is-active tokenfused)" = active ]
  in_ns journalctl -u tokenfused --no-pager -o cat | grep '"event":"region_adopted"' >/dev/null
  in_ns systemctl stop tokenfused
  echo "the unit ran under systemd: Type=notify ready, region shared with the host, kept across a restart"
elif [ "$state" = failed ]; then
  in_ns journalctl -u tokenfused --no-pager -o cat | tail -20
  echo "test-packages: tokenfused.service failed under systemd" >&2; exit 1
else
  echo "NOT VERIFIED: systemd could not be booted in a namespace on this machine (see below)"
  tail -5 "$tmp/systemd.log"
fi
[ -n "$systemd_pid" ] && kill -KILL "$systemd_pid" 2>/dev/null || true
wait "$unshare_pid" 2>/dev/null || true
systemd_pid=""

step "purge"
apt-get purge -y -q "${names[@]}" >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log"; exit 1; }
for n in "${names[@]}"; do
  if dpkg-query -W -f='${Status}' "$n" 2>/dev/null | grep -q installed; then echo "$n still installed" >&2; exit 1; fi
done
for f in /usr/sbin/tokenfused /usr/bin/tokenfuse /etc/tokenfuse /lib/systemd/system/tokenfused.service \
         /usr/lib/x86_64-linux-gnu/libtokenfuse.so.0.2 /usr/lib/python3/dist-packages/tokenfuse /usr/include/tokenfuse; do
  [ ! -e "$f" ] || { echo "test-packages: $f left behind" >&2; exit 1; }
done
test -e /var/lib/tokenfuse/ledger.db && rm -rf /var/lib/tokenfuse   # purge keeps the ledger on purpose
echo "test-packages: ok"
