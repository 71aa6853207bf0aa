#!/usr/bin/env bash
# Installs every build and test dependency of tokenfuse from Debian 12's packages.
# Idempotent and non-interactive: run it as root, or as a user with sudo, as often as you like.
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake pkg-config git ca-certificates
  # libraries the agent and the library build against
  libboost-dev                 # Boost.Interprocess, Beast and Asio (header-only)
  libssl-dev                   # the LLM proxy: https upstreams (OpenSSL), key hashes
  zlib1g-dev                   # gzip request bodies
  libtomlplusplus-dev          # config file
  libspdlog-dev libfmt-dev     # structured logs
  libhowardhinnant-date-dev    # IANA time zones (GCC 12 has no std::chrono tzdb)
  tzdata
  libcli11-dev                 # admin CLI
  nlohmann-json3-dev           # JSON
  libsqlitecpp-dev libsqlite3-dev sqlite3   # the ledger
  libcpp-httplib-dev           # HTTP client (alerts, CLI, tests)
  libhiredis-dev libpqxx-dev   # central link
  libsystemd-dev               # sd_notify: readiness for systemd (Type=notify)
  prometheus-cpp-dev           # metrics
  # tests and benchmarks
  doctest-dev libbenchmark-dev python3 wrk
  redis-server postgresql      # the central link's tests start their own, on free ports
  openssl                      # the LLM proxy's https test makes a certificate
  nodejs                       # the LLM proxy's tests run the official SDKs (tests/sdk, from npm)
  chromium                     # the dashboard's browser test (headless, driven by playwright-core from npm)
  # packaging: .deb files (CPack, dpkg-shlibdeps), their checks
  dpkg-dev fakeroot lintian systemd
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# The test clients from npm (tests/sdk/package-lock.json): the official LLM SDKs the proxy's tests
# drive, and playwright-core for the dashboard's browser test; from the npm
# registry; again only when the lock file changed.
sdks() {
  local dir
  dir="$(cd "$(dirname "$0")/.." && pwd)/tests/sdk"
  command -v npm >/dev/null || "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends npm
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "install-deps: npm ci in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd=(sudo)
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  sdks
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
sdks
