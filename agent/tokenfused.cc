// tokenfused: the per-host budget agent. See README.md and docs/operations.md.
#include "agent.h"
#include "capacity.h"
#include "config.h"
#include "http_api.h"
#include "log.h"

#include <CLI/CLI.hpp>
#include <systemd/sd-daemon.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <cstdio>
#include <iostream>
#include <pthread.h>
#include <sys/resource.h>
#include <thread>

namespace {

// Every HTTP connection is a file descriptor: raise the soft limit to the hard one (systemd's
// unit sets LimitNOFILE for the default max_connections), and say so if it is still too low.
void raiseFileLimit(std::int64_t max_connections) {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &lim);
    (void)::getrlimit(RLIMIT_NOFILE, &lim);
  }
  constexpr std::int64_t kOwnFiles = 64;   // the region, SQLite, logs, the central link
  if (lim.rlim_cur != RLIM_INFINITY && static_cast<std::int64_t>(lim.rlim_cur) < max_connections + kOwnFiles) {
    tokenfuse::log::warn("http_file_limit_low",
                         {{"open_files_limit", static_cast<std::int64_t>(lim.rlim_cur)},
                          {"max_connections", max_connections},
                          {"consequence", "connections past the limit wait in the kernel's queue until one closes"},
                          {"fix", "raise LimitNOFILE (systemd) or ulimit -n, or lower http.max_connections"}});
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tokenfuse;
  CLI::App app{"tokenfused: per-host budget hard-kill agent for LLM calls"};
  std::string config_path, shm_name, data_dir, log_level, listen;
  bool recreate = false, check_only = false;
  app.add_option("--config", config_path, "TOML config file (default: built-in defaults)")->check(CLI::ExistingFile);
  app.add_option("--shm-name", shm_name, "shared-memory region name (overrides agent.shm_name)");
  app.add_option("--data-dir", data_dir, "state directory (overrides agent.data_dir)");
  app.add_option("--listen", listen, "HTTP API address HOST:PORT, or off (overrides http.listen)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn or error (overrides agent.log_level)");
  app.add_flag("--recreate-region", recreate,
               "replace a region of another layout or size instead of refusing to start");
  app.add_flag("--check-config", check_only, "validate the config, print it as the agent sees it, and exit");
  app.set_version_flag("--version", "tokenfused 0.1.0");
  CLI11_PARSE(app, argc, argv);

  Config config;
  try {
    config = config_path.empty() ? defaultConfig() : loadConfig(config_path);
    if (!shm_name.empty()) {
      if (auto p = validateShmName(shm_name); !p.empty()) throw ConfigError("--shm-name: " + p);
      config.shm_name = shm_name;
    }
    if (!data_dir.empty()) {
      if (auto p = dataDirProblem(data_dir); !p.empty()) throw ConfigError("--data-dir: " + p);
      config.data_dir = data_dir;
    }
    if (!log_level.empty()) config.log_level = log_level;
    if (!listen.empty()) parseListen(listen, "--listen", &config);
    checkRegionFits(config);   // before anything is created: a region too large is a config error
    log::init(config.log_level);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenfused: %s\n", e.what());
    return 2;
  }
  if (check_only) {
    std::printf("config ok: shm_name=%s data_dir=%s timezone=%s models=%zu tenant_limits=%zu\n",
                config.shm_name.c_str(), config.data_dir.c_str(), config.timezone.c_str(), config.prices.size(),
                config.tenant_limits.size());
    return 0;
  }

  // Signals are taken synchronously by the main thread, so no handler runs inside the agent.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  try {
    Agent agent(config, {recreate, {}});
    std::unique_ptr<HttpApi> http;
    if (config.http_port >= 0) {
      const std::string token_file =
          config.admin_token_file.empty() ? config.data_dir + "/admin.token" : config.admin_token_file;
      HttpApi::Options o;
      o.host = config.http_host;
      o.port = config.http_port;
      o.admin_token = loadOrCreateToken(token_file);
      o.unix_socket = config.http_unix_socket;
      o.threads = config.http_threads;
      o.limits.max_connections = static_cast<std::size_t>(config.http_max_connections);
      o.limits.max_requests_per_connection = static_cast<std::size_t>(config.http_max_requests_per_connection);
      o.limits.max_header_bytes = static_cast<std::size_t>(config.http_max_header_bytes);
      o.limits.max_headers = static_cast<std::size_t>(config.http_max_headers);
      o.limits.max_body_bytes = static_cast<std::size_t>(config.http_max_body_bytes);
      o.limits.header_timeout = std::chrono::milliseconds(config.http_header_timeout_ms);
      o.limits.body_timeout = std::chrono::milliseconds(config.http_body_timeout_ms);
      o.limits.idle_timeout = std::chrono::milliseconds(config.http_idle_timeout_ms);
      o.proxy = config.proxy;
      raiseFileLimit(config.http_max_connections);
      http = std::make_unique<HttpApi>(agent, std::move(o));
      // Where it listens, for the CLI and for tests that asked for port 0; written whole or not at all.
      const std::string port_file = config.data_dir + "/http.port";
      std::ofstream(port_file + ".tmp") << http->port() << "\n";
      std::filesystem::rename(port_file + ".tmp", port_file);
      log::info("http_listening", {{"host", config.http_host}, {"port", http->port()}, {"token_file", token_file}});
    }
    log::info("agent_started", {{"shm_name", config.shm_name},
                                {"data_dir", config.data_dir},
                                {"pid", ::getpid()},
                                {"adopted_region", agent.adoptedRegion()},
                                {"timezone", config.timezone}});
    std::jthread loop([&agent](std::stop_token stop) { agent.run(stop); });
    // systemd (Type=notify): ready once the region is published and the HTTP API listens. A
    // no-op when not started by systemd.
    sd_notifyf(0, "READY=1\nSTATUS=region %s ready%s", config.shm_name.c_str(),
               http ? (", HTTP API on port " + std::to_string(http->port())).c_str() : "");
    bool damaged = false;
    for (;;) {
      // Woken every 100 ms to see whether the agent stopped on a damaged region.
      const timespec wake{0, 100'000'000};
      const int sig = sigtimedwait(&signals, nullptr, &wake);
      if (sig < 0) {
        if (!agent.regionDamaged()) continue;
        damaged = true;
        sd_notify(0, "STOPPING=1\nSTATUS=the region was damaged; stopping so that a restart replaces it");
        break;
      }
      if (sig == SIGHUP) {
        log::info("signal_ignored", {{"signal", "SIGHUP"}, {"why", "config reload is not supported yet: restart"}});
        continue;
      }
      log::info("agent_stopping", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
      sd_notify(0, "STOPPING=1\nSTATUS=writing the ledger and stopping");
      break;
    }
    http.reset();
    std::error_code ignored;
    if (config.http_port >= 0) std::filesystem::remove(config.data_dir + "/http.port", ignored);
    loop.request_stop();
    loop.join();
    // The region stays: clients keep checking against it, and the next agent adopts it.
    if (damaged) {
      log::error("agent_stopped", {{"shm_name", config.shm_name},
                                   {"reason", "region_damaged"},
                                   {"exit_code", Agent::kExitRegionDamaged}});
      return Agent::kExitRegionDamaged;
    }
    log::info("agent_stopped", {{"shm_name", config.shm_name}});
    return 0;
  } catch (const AgentConfigError& e) {   // a restart cannot fix these: exit 2 (see the unit)
    log::error("agent_start_failed", {{"error", e.what()}, {"exit_code", 2}});
    return 2;
  } catch (const ConfigError& e) {
    log::error("agent_start_failed", {{"error", e.what()}, {"exit_code", 2}});
    return 2;
  } catch (const std::exception& e) {
    log::error("agent_start_failed", {{"error", e.what()}});
    return 1;
  }
}
