// tokenfused's configuration: a TOML file (see packaging/tokenfuse.toml for every key, commented)
// with command-line overrides. Loading checks every key and value and throws ConfigError with a
// message that names the key and the rule it broke; an unknown key is an error, so a typo is
// never silently ignored.
#pragma once

#include <tokenfuse/money.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>

namespace tokenfuse {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Config {
  // [agent]
  std::string shm_name = "tokenfuse";
  std::string data_dir = "/var/lib/tokenfuse";
  std::string timezone = "UTC";
  std::string log_level = "info";
  std::int64_t tick_ms = 100;   // heartbeat, reaper and day-boundary period
  std::string host_id;          // names this host in the ledger; default: the host name

  // [region]
  std::uint32_t tenant_capacity = 16384;
  std::uint32_t run_capacity = 16384;
  std::uint32_t model_capacity = 1024;
  std::uint32_t reservation_capacity = 16384;
  std::uint32_t ledger_capacity = 16384;   // ring slots between applications and SQLite

  // [http]
  std::string http_host = "127.0.0.1";   // loopback unless configured otherwise
  int http_port = 8787;                  // 0: any free port; -1: no HTTP API
  std::string admin_token_file;          // default: <data_dir>/admin.token

  // [ledger]
  std::int64_t ledger_flush_interval_ms = 10;   // the longest an idle entry waits for SQLite

  // [budgets]  nullopt: unlimited
  std::optional<NanoUsd> platform_daily_limit;
  std::optional<NanoUsd> tenant_default_daily_limit;
  std::optional<NanoUsd> run_default_limit;
  std::int64_t reservation_ttl_s = 600;
  std::map<std::string, std::optional<NanoUsd>, std::less<>> tenant_limits;   // [budgets.tenants]
  std::map<std::string, std::optional<NanoUsd>, std::less<>> run_limits;      // [budgets.runs]

  // [kill_switch]
  bool kill_active = false;
  std::string kill_reason;

  // [prices]
  Price fallback_price;                              // set from the reference unless configured
  bool replace_reference_prices = false;             // true: only [prices.models] is loaded
  std::map<std::string, Price, std::less<>> prices;  // the effective table
};

// The defaults, including the reference's price table.
Config defaultConfig();
// Reads `path` over the defaults. Throws ConfigError.
Config loadConfig(const std::string& path);
// Parses "127.0.0.1:8787", "[::1]:0" or "off" into config.http_host/http_port. Throws ConfigError
// naming `key`.
void parseListen(const std::string& text, const std::string& key, Config* config);
// Parses TOML text over the defaults; `origin` names it in messages. Throws ConfigError.
Config parseConfig(const std::string& toml_text, const std::string& origin);

}  // namespace tokenfuse
