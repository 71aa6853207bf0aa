// tokenfused's configuration: a TOML file (see packaging/tokenfuse.toml for every key, commented)
// with command-line overrides. Loading checks every key and value and throws ConfigError with a
// message that names the key and the rule it broke; an unknown key is an error, so a typo is
// never silently ignored.
#pragma once

#include "rules.h"

#include <nlohmann/json_fwd.hpp>

#include <tokenfuse/money.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace tokenfuse {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  // "origin: key: problem", with the key and the problem kept apart for callers that answer a
  // client (the admin API names the field).
  ConfigError(const std::string& origin, std::string key, std::string problem)
      : std::runtime_error(origin + ": " + key + ": " + problem), key_(std::move(key)), problem_(std::move(problem)) {}
  const std::string& key() const noexcept { return key_; }
  const std::string& problem() const noexcept { return problem_; }

 private:
  std::string key_, problem_;
};

struct RedisEndpoint {
  std::string host;
  int port = 6379;
  std::string user, password;   // empty: no AUTH
  int db = 0;
};

// [central]: the fleet link. Without a URL the agent runs alone on its SQLite ledger.
struct CentralConfig {
  std::string redis_url;      // redis://[[user]:password@]host[:port][/db]
  RedisEndpoint redis;
  std::string postgres_url;   // postgresql://user[:password]@host[:port]/db (libpq)
  std::int64_t sync_interval_ms = 1000;      // push and pull this often
  std::int64_t limits_interval_ms = 10'000;  // read awooop_projects this often
  std::int64_t connect_timeout_ms = 2000;
  std::int64_t push_batch = 50'000;          // ledger entries per Postgres transaction
  bool reference_keys = false;               // also keep the reference service's Redis keys current
  std::int64_t lease_fraction_ppb = 0;       // 0: off; else the share of a tenant's remaining budget
                                             // (parts per billion) this host may spend while the link is down
  bool enabled() const { return !redis_url.empty() || !postgres_url.empty(); }
};

// [[alerts.notifiers]]: where an alert goes. Secrets (a webhook URL, a bot token) may come from
// files, which are read at start and never logged.
struct NotifierConfig {
  std::string kind;        // "webhook", "slack" or "telegram"
  std::string url;         // webhook, slack: where to POST
  std::string bot_token;   // telegram
  std::string chat_id;     // telegram
  std::string api_base = "https://api.telegram.org";   // telegram (tests point it at a local receiver)
};

// [[proxy.upstreams]]: an LLM API the agent forwards to (docs/proxy.md).
// An upstream's base URL, taken apart.
struct BaseUrl {
  bool tls = false;
  std::string host;        // a name or an address ([::1] without the brackets)
  std::string port;        // "80" or "443" unless given
  std::string path;        // "" or "/prefix" (no trailing slash)
};

struct UpstreamConfig {
  std::string name;              // the path segment: /proxy/<name>/...
  std::string kind;              // "openai", "anthropic" or "ollama": the wire API it speaks
  std::string base_url;          // http:// or https://, optionally with a path prefix
  BaseUrl url;                   // base_url, parsed
  std::string api_key;           // from api_key_file; injected, never logged; empty: none
  std::string provider;          // for the ledger; default: the name
  std::string model_prefix;      // prepended to the model for prices and the ledger; ollama: "ollama/"
  std::string ca_file;           // https: a CA bundle instead of the system's store
  std::int64_t timeout_ms = 600'000;        // the longest the upstream may be silent
  std::int64_t connect_timeout_ms = 5'000;
};

// [[proxy.keys]]: a virtual key, which the proxy's clients send instead of a provider's key.
// Only its SHA-256 is configured.
struct VirtualKeyConfig {
  std::string sha256;   // lowercase hex of the key
  std::string tenant;   // pays for the calls made with it
  std::string agent;    // kept with each call; empty: from the agent header
  std::string tags;     // added to the call's tags
};

// [proxy]
struct ProxyConfig {
  std::vector<UpstreamConfig> upstreams;
  std::vector<VirtualKeyConfig> keys;
  std::string tenant_header = "X-Tokenfuse-Project";
  std::string run_header = "X-Tokenfuse-Run";
  std::string agent_header = "X-Tokenfuse-Agent";
  std::string tags_header = "X-Tokenfuse-Tags";
  std::string default_tenant;        // pays for calls that name none; empty: they are refused
  bool require_key = false;          // true: every call must carry a configured virtual key
  std::int64_t default_max_tokens = 4096;   // completion tokens held when the request sets no limit
  double chars_per_token = 4.0;             // the prompt estimate: bytes of text per token
  std::map<std::string, double, std::less<>> model_chars_per_token;   // per model ("name" or "prefix*")
  std::int64_t image_tokens = 1000;         // held for each image in a prompt
  std::int64_t max_request_bytes = 8 << 20;
  std::int64_t max_response_bytes = 64 << 20;   // a whole (non-streamed) answer
  bool enabled() const { return !upstreams.empty(); }
};

// [alerts]
struct AlertsConfig {
  using Thresholds = std::vector<std::int64_t>;   // whole percentages of a limit, ascending; [] = none
  Thresholds thresholds_pct{80, 95, 100};   // the reference's warn, critical, hard_kill
  // Per scope, over thresholds_pct: platform_, tenant_, run_thresholds_pct, and [alerts.tenants].
  std::optional<Thresholds> platform_pct, tenant_pct, run_pct;
  std::map<std::string, Thresholds, std::less<>> tenant_pct_by_id;
  std::vector<NotifierConfig> notifiers;
  std::int64_t queue_limit = 10'000;   // undelivered messages kept; the oldest go first beyond it

  // The thresholds for one scope ("platform", "tenant", "run") and id.
  const Thresholds& thresholdsFor(std::string_view scope, std::string_view id) const;
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
  std::uint32_t rule_capacity = 16384;     // counters of [[rules]], one per rule and key
  // How often the agent reclaims the entries of keys nothing needs any more (RegionAdmin::reclaimKeys);
  // a key goes after two passes that found it idle.
  std::int64_t reclaim_interval_s = 60;

  // [http]
  std::string http_host = "127.0.0.1";   // loopback unless configured otherwise
  int http_port = 8787;                  // 0: any free port; -1: no HTTP API
  std::string admin_token_file;          // default: <data_dir>/admin.token
  std::string http_unix_socket;          // also listen on this Unix socket (mode 0660) if set
  int http_threads = 0;                  // event-loop threads; 0: one per core
  // Limits every client is held to (http_server.h, docs/http-api.md "Limits").
  std::int64_t http_max_connections = 10000;
  std::int64_t http_max_requests_per_connection = 10000;
  std::int64_t http_max_header_bytes = 8192;
  std::int64_t http_max_headers = 64;
  std::int64_t http_max_body_bytes = 65536;   // after decoding gzip or deflate
  std::int64_t http_header_timeout_ms = 5000;
  std::int64_t http_body_timeout_ms = 10000;
  std::int64_t http_idle_timeout_ms = 60000;

  // [ledger]
  std::int64_t ledger_flush_interval_ms = 10;   // the longest an idle entry waits for SQLite
  // Retention (retention.h): entries older than this many days are removed (0: kept forever),
  // and the oldest beyond max_size_mb of pages in use (0: no ceiling); never what the central
  // link has not pushed or a rule window may still need.
  std::int64_t ledger_retain_days = 90;
  std::int64_t ledger_max_size_mb = 0;
  std::int64_t ledger_prune_interval_s = 60;
  // The agent warns while the data dir's file system has less than this share free (0: never).
  std::int64_t ledger_disk_warn_percent = 10;

  // [budgets]  nullopt: unlimited
  std::optional<NanoUsd> platform_daily_limit;
  std::optional<NanoUsd> tenant_default_daily_limit;
  std::optional<NanoUsd> run_default_limit;
  std::int64_t reservation_ttl_s = 600;
  // A run's entry may be reclaimed once it has booked nothing for this long; its totals come back
  // from the ledger if it returns, and a restart restores only the runs active within it.
  std::int64_t run_idle_lifetime_s = 7 * 86400;
  std::map<std::string, std::optional<NanoUsd>, std::less<>> tenant_limits;   // [budgets.tenants]
  std::map<std::string, std::optional<NanoUsd>, std::less<>> run_limits;      // [budgets.runs]

  // [kill_switch]
  bool kill_active = false;
  std::string kill_reason;

  // [prices]
  Price fallback_price;                              // set from the reference unless configured
  bool replace_reference_prices = false;             // true: only [prices.models] is loaded
  std::map<std::string, Price, std::less<>> prices;  // the effective table

  // [central]
  CentralConfig central;

  // [alerts]
  AlertsConfig alerts;

  // [proxy]: the LLM proxy (docs/proxy.md); off without upstreams.
  ProxyConfig proxy;

  // Budget rules beside the three built-in layers, in the file's order (docs/rules.md).
  std::vector<RuleSpec> rules;  // [[rules]]
};

// The defaults, including the reference's price table.
Config defaultConfig();
// Reads `path` over the defaults. Throws ConfigError.
Config loadConfig(const std::string& path);
// Parses "127.0.0.1:8787", "[::1]:0" or "off" into config.http_host/http_port. Throws ConfigError
// naming `key`.
void parseListen(const std::string& text, const std::string& key, Config* config);
// What is wrong with a data dir or a time zone, or "" (also for the command line's overrides).
std::string dataDirProblem(const std::string& path);
std::string timezoneProblem(const std::string& zone);
// Parses an http:// or https:// base URL. Returns what is wrong with it, or "" (and sets *out).
std::string parseBaseUrl(const std::string& url, BaseUrl* out);
// Parses a redis:// URL. Returns what is wrong with it, or "" (and sets *out).
std::string parseRedisUrl(const std::string& url, RedisEndpoint* out);
// A rule as the admin API takes it (PUT /v1/rules/{name}): the keys of a [[rules]] table as a
// JSON object, checked as the config file's are, with null meaning "unlimited" for `limit` and
// `keys`. A "name" in it must be `name`. Throws ConfigError whose key() names the field
// ("window", "keys.\"acme\"").
RuleSpec ruleFromJson(const std::string& name, const nlohmann::json& body);
// The JSON that ruleFromJson reads back: how the agent saves an admin API rule.
nlohmann::json ruleToJson(const RuleSpec& rule);

// Parses TOML text over the defaults; `origin` names it in messages. Throws ConfigError.
Config parseConfig(const std::string& toml_text, const std::string& origin);

}  // namespace tokenfuse
