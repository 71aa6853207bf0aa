#include "config.h"

#include "day_clock.h"
#include "ids.h"
#include "pricing.h"
#include "region.h"

#include <arpa/inet.h>
#include <nlohmann/json.hpp>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string_view>

namespace tokenfuse {

namespace {

[[noreturn]] void fail(const std::string& origin, const std::string& key, const std::string& rule) {
  throw ConfigError(origin, key, rule);
}

void rejectUnknown(const toml::table& t, const std::string& origin, const std::string& prefix,
                   std::initializer_list<std::string_view> known) {
  for (const auto& [k, v] : t) {
    bool ok = false;
    for (std::string_view name : known) ok = ok || k.str() == name;
    if (!ok) fail(origin, prefix + std::string(k.str()), "unknown key (check its spelling and section)");
  }
}

const toml::table* subtable(const toml::table& t, std::string_view name, const std::string& origin,
                            const std::string& prefix) {
  const toml::node* n = t.get(name);
  if (n == nullptr) return nullptr;
  if (!n->is_table()) fail(origin, prefix + std::string(name), "must be a table");
  return n->as_table();
}

std::string getString(const toml::table& t, std::string_view name, const std::string& origin,
                      const std::string& key, std::string fallback) {
  const toml::node* n = t.get(name);
  if (n == nullptr) return fallback;
  if (!n->is_string()) fail(origin, key, "must be a string");
  return n->as_string()->get();
}

std::int64_t getInt(const toml::table& t, std::string_view name, const std::string& origin, const std::string& key,
                    std::int64_t fallback, std::int64_t lo, std::int64_t hi) {
  const toml::node* n = t.get(name);
  if (n == nullptr) return fallback;
  if (!n->is_integer()) fail(origin, key, "must be a whole number");
  const std::int64_t v = n->as_integer()->get();
  if (v < lo || v > hi) fail(origin, key, "must be from " + std::to_string(lo) + " to " + std::to_string(hi));
  return v;
}

// Money is written as a decimal string ("5.00") or a whole number (5); a TOML float is refused
// because it cannot say 0.1 exactly. The string "unlimited" is the reference's NULL.
std::optional<NanoUsd> getMoney(const toml::node& n, const std::string& origin, const std::string& key,
                                bool allow_unlimited) {
  if (n.is_integer()) {
    const std::int64_t v = n.as_integer()->get();
    if (v < 0) fail(origin, key, "must not be negative");
    if (v > 9'000'000'000) fail(origin, key, "is too large");
    return NanoUsd::fromWholeUsd(v);
  }
  if (n.is_floating_point()) {
    fail(origin, key, "write money as a string, e.g. \"0.075\", so that it is exact (a float is not)");
  }
  if (!n.is_string()) fail(origin, key, "must be a USD amount as a string, e.g. \"5.00\"");
  const std::string& s = n.as_string()->get();
  if (allow_unlimited && s == "unlimited") return std::nullopt;
  std::string why;
  auto v = NanoUsd::parse(s, &why);
  if (!v) fail(origin, key, why + (allow_unlimited ? " (or write \"unlimited\")" : ""));
  return v;
}

std::optional<NanoUsd> getLimit(const toml::table& t, std::string_view name, const std::string& origin,
                                const std::string& key) {
  const toml::node* n = t.get(name);
  if (n == nullptr) return std::nullopt;
  return getMoney(*n, origin, key, true);
}

Price getPrice(const toml::node& n, const std::string& origin, const std::string& key) {
  if (!n.is_table()) fail(origin, key, "must be a table such as { prompt = \"3.00\", completion = \"15.00\" } (USD per million tokens)");
  const toml::table& t = *n.as_table();
  rejectUnknown(t, origin, key + ".", {"prompt", "completion"});
  Price p;
  for (auto [name, field] : {std::pair{"prompt", &p.prompt_nano_per_mtok}, {"completion", &p.completion_nano_per_mtok}}) {
    const toml::node* v = t.get(name);
    if (v == nullptr) fail(origin, key + "." + name, "is missing (USD per million tokens)");
    const NanoUsd usd_per_mtok = *getMoney(*v, origin, key + "." + name, false);
    if (usd_per_mtok.count() > kMaxPriceNanoPerMtok) fail(origin, key + "." + name, "may be at most 1000000 USD per million tokens");
    *field = usd_per_mtok.count();
  }
  return p;
}

std::uint32_t getCapacity(const toml::table& t, std::string_view name, const std::string& origin,
                          std::uint32_t fallback) {
  const std::string key = "region." + std::string(name);
  const auto v = static_cast<std::uint32_t>(getInt(t, name, origin, key, fallback, 16, 1 << 24));
  if (!std::has_single_bit(v)) fail(origin, key, "must be a power of two (16, 32, ..., 16777216)");
  return v;
}

// Calls read(id, value, key) for each entry of a table keyed by ids (tenants, runs, models), after
// checking the id's length; `key` names the entry in messages, e.g. budgets.tenants."acme".
template <typename Read>
void forEachId(const toml::table* t, const std::string& origin, const std::string& prefix, const char* what,
               Read read) {
  if (t == nullptr) return;
  for (const auto& [k, v] : *t) {
    const std::string id(k.str());
    const std::string key = prefix + "\"" + id + "\"";
    if (id.empty() || id.size() > 128) fail(origin, key, std::string(what) + " must be 1 to 128 bytes");
    if (!validIdText(id)) {   // TOML text is UTF-8, but "\u0000" escapes a NUL into a key
      fail(origin, prefix + "\"" + displayId(id) + "\"", std::string(what) + " must not hold NUL (\\u0000)");
    }
    read(id, v, key);
  }
}

void readLimits(const toml::table* t, const std::string& origin, const std::string& prefix, const char* what,
                std::map<std::string, std::optional<NanoUsd>, std::less<>>* out) {
  forEachId(t, origin, prefix, what, [&](const std::string& id, const toml::node& v, const std::string& key) {
    (*out)[id] = getMoney(v, origin, key, true);
  });
}

// A list of alert thresholds: whole percentages of a limit, returned ascending without repeats.
AlertsConfig::Thresholds thresholds(const toml::node& n, const std::string& origin, const std::string& key) {
  const toml::array* arr = n.as_array();
  if (arr == nullptr) fail(origin, key, "must be a list such as [80, 95, 100] ([] for none)");
  AlertsConfig::Thresholds out;
  for (const toml::node& v : *arr) {
    if (!v.is_integer() || v.as_integer()->get() < 1 || v.as_integer()->get() > 1000) {
      fail(origin, key, "must hold whole percentages from 1 to 1000");
    }
    out.push_back(v.as_integer()->get());
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// A rule's limit in its metric's unit: money written as in [budgets] (nano-USD) for usd, a whole
// number for the others; "unlimited" is nullopt for every metric, so that `keys` can exempt a key.
std::optional<std::int64_t> getRuleLimit(const toml::node& n, RuleMetric metric, const std::string& origin,
                                         const std::string& key) {
  if (metric == RuleMetric::kUsd) {
    const std::optional<NanoUsd> usd = getMoney(n, origin, key, true);
    return usd ? std::optional(usd->count()) : std::nullopt;
  }
  if (n.is_string() && n.as_string()->get() == "unlimited") return std::nullopt;
  const char* unit = metric == RuleMetric::kRequests      ? "requests"
                     : metric == RuleMetric::kConcurrency ? "calls in flight"
                                                          : "tokens";
  if (!n.is_integer()) {
    fail(origin, key, std::string("must be a whole number of ") + unit + ", such as 1000 (or \"unlimited\")");
  }
  const std::int64_t v = n.as_integer()->get();
  if (v < 0) fail(origin, key, "must not be negative");
  return v;
}

// What a rule's keys are, for messages about them.
const char* keyKind(RuleScope scope) {
  switch (scope) {
    case RuleScope::kTenant: return "a project_id";
    case RuleScope::kRun: return "a run_id";
    case RuleScope::kAgent: return "an agent_id";
    case RuleScope::kModel: return "a model name";
    case RuleScope::kTag: return "a tag";
    default: return "a key";
  }
}

// A rule's fields but its name, from a [[rules]] table or the admin API's body; `key` prefixes
// each field in messages.
void readRuleFields(const toml::table* t, const std::string& origin, const std::string& key, RuleSpec& r) {
  rejectUnknown(*t, origin, key,
                {"name", "scope", "match", "window", "week_start", "metric", "limit", "host_only", "keys", "sliding"});

  if (t->get("scope") == nullptr) {
    fail(origin, key + "scope", "is missing: one of platform, tenant, run, agent, model, tag, tenant+model, tenant+agent");
  }
  const auto scope = parseScope(getString(*t, "scope", origin, key + "scope", ""));
  if (!scope) {
    fail(origin, key + "scope", "must be one of platform, tenant, run, agent, model, tag, tenant+model, tenant+agent");
  }
  r.scope = *scope;

  const auto metric = parseMetric(getString(*t, "metric", origin, key + "metric", "usd"));
  if (!metric) {
    fail(origin, key + "metric", "must be one of usd, tokens, prompt_tokens, completion_tokens, requests, concurrency");
  }
  r.metric = *metric;

  if (r.metric == RuleMetric::kConcurrency) {
    // Calls in flight are a level, not a sum over time: no boundary ever resets them.
    if (t->get("window") != nullptr) {
      fail(origin, key + "window", "must not be given for metric concurrency (it has no window)");
    }
    r.window.kind = WindowKind::kAllTime;
  } else {
    if (t->get("window") == nullptr) {
      fail(origin, key + "window", "is missing: one of minute, hour, day, week, month, all-time");
    }
    const auto window = parseWindow(getString(*t, "window", origin, key + "window", ""));
    if (!window) fail(origin, key + "window", "must be one of minute, hour, day, week, month, all-time");
    r.window.kind = *window;
  }
  if (t->get("week_start") != nullptr) {
    if (r.window.kind != WindowKind::kWeek) fail(origin, key + "week_start", "is only for window = \"week\"");
    const auto day = parseWeekday(getString(*t, "week_start", origin, key + "week_start", ""));
    if (!day) fail(origin, key + "week_start", "must be a day from sunday to saturday (lower case)");
    r.window.week_start = *day;
  }

  if (t->get("match") != nullptr) {
    if (r.scope == RuleScope::kPlatform) {
      fail(origin, key + "match", "is not for scope platform, which counts every call in one counter");
    }
    r.match = getString(*t, "match", origin, key + "match", "");
    if (auto p = ruleMatchProblem(r.match); !p.empty()) fail(origin, key + "match", p);
  }

  if (const toml::node* l = t->get("limit")) r.limit = getRuleLimit(*l, r.metric, origin, key + "limit");

  if (const toml::table* k = subtable(*t, "keys", origin, key)) {
    if (r.scope == RuleScope::kPlatform) {
      fail(origin, key + "keys", "is not for scope platform, which has one counter: use limit");
    }
    if (r.scope == RuleScope::kTenantModel || r.scope == RuleScope::kTenantAgent) {
      fail(origin, key + "keys",
           "is not for scope " + std::string(scopeName(r.scope)) + ": use match to choose the " +
               (r.scope == RuleScope::kTenantModel ? "model" : "agent") + " and limit for every tenant");
    }
    if (r.match.ends_with('*')) {
      fail(origin, key + "keys", "is not for a prefix group (match \"" + r.match +
                                     "\"), which has one counter for all its keys: use limit");
    }
    forEachId(k, origin, key + "keys.", keyKind(r.scope),
              [&](const std::string& id, const toml::node& v, const std::string& entry_key) {
                r.keys[id] = getRuleLimit(v, r.metric, origin, entry_key);
              });
  }

  if (const toml::node* h = t->get("host_only")) {
    if (!h->is_boolean()) fail(origin, key + "host_only", "must be true or false");
    r.host_only = h->as_boolean()->get();
  }
  if (const toml::node* s = t->get("sliding")) {
    if (!s->is_boolean()) fail(origin, key + "sliding", "must be true or false");
    r.sliding = s->as_boolean()->get();
    if (r.sliding && !isRate(r.window.kind)) {
      fail(origin, key + "sliding", "is only for window = \"minute\" or \"hour\" (rates)");
    }
  }
}

// One [[rules]] table. Every message names the rule by its place in the file and its name,
// rules[2] ("tenant-monthly").window, since a file may hold many rules that differ in one key.
RuleSpec readRule(const toml::node& n, std::size_t index, const std::string& origin) {
  const std::string key = "rules[" + std::to_string(index) + "]";
  const toml::table* t = n.as_table();
  if (t == nullptr) fail(origin, key, "must be a table");
  RuleSpec r;
  if (t->get("name") == nullptr) {
    fail(origin, key + ".name", "is missing (every rule needs one, e.g. name = \"tenant-monthly\")");
  }
  r.name = getString(*t, "name", origin, key + ".name", "");
  if (auto p = ruleNameProblem(r.name); !p.empty()) fail(origin, key + ".name", p);
  readRuleFields(t, origin, key + " (\"" + r.name + "\").", r);
  return r;
}

// A JSON value as TOML, so that the admin API's rules pass the config file's checks: null is
// "unlimited" where a limit may stand (`limits`), and left out elsewhere.
void insertJson(toml::table& t, const std::string& key, const nlohmann::json& v, bool limits) {
  using Type = nlohmann::json::value_t;
  switch (v.type()) {
    case Type::null:
      if (limits) t.insert(key, "unlimited");
      return;
    case Type::object: {
      // Only `keys` is a table, of single values: anything deeper is refused by its checks (and
      // never recursed into, however deep a hostile body nests).
      if (limits || key != "keys") {
        t.insert(key, toml::array{});
        return;
      }
      toml::table sub;
      for (const auto& [k, x] : v.items()) insertJson(sub, k, x, true);
      t.insert(key, std::move(sub));
      return;
    }
    case Type::string: t.insert(key, v.get<std::string>()); return;
    case Type::boolean: t.insert(key, v.get<bool>()); return;
    case Type::number_integer: t.insert(key, v.get<std::int64_t>()); return;
    case Type::number_unsigned:
      if (v.get<std::uint64_t>() <= static_cast<std::uint64_t>(INT64_MAX)) {
        t.insert(key, static_cast<std::int64_t>(v.get<std::uint64_t>()));
        return;
      }
      [[fallthrough]];
    case Type::number_float: t.insert(key, v.get<double>()); return;
    default: t.insert(key, toml::array{}); return;   // an array: no rule key takes one
  }
}

}  // namespace

RuleSpec ruleFromJson(const std::string& name, const nlohmann::json& body) {
  const std::string origin = "rule \"" + name + "\"";
  if (auto p = ruleNameProblem(name); !p.empty()) fail(origin, "name", p);
  if (!body.is_object()) fail(origin, "body", "must be a JSON object with the keys of a [[rules]] table (docs/rules.md)");
  toml::table t;
  for (const auto& [k, v] : body.items()) {
    if (k == "name") {
      if (!v.is_string() || v.get<std::string>() != name) {
        fail(origin, "name", "must be left out or be the name in the path (\"" + name + "\")");
      }
      continue;
    }
    insertJson(t, k, v, k == "limit");
  }
  RuleSpec r;
  r.name = name;
  readRuleFields(&t, origin, "", r);
  return r;
}

nlohmann::json ruleToJson(const RuleSpec& r) {
  auto amount = [&r](const std::optional<std::int64_t>& v) {
    if (!v) return nlohmann::json(nullptr);
    return r.metric == RuleMetric::kUsd ? nlohmann::json(NanoUsd(*v).toString()) : nlohmann::json(*v);
  };
  nlohmann::json j = {{"name", r.name},
                      {"scope", scopeName(r.scope)},
                      {"metric", metricName(r.metric)},
                      {"limit", amount(r.limit)},
                      {"host_only", r.host_only}};
  if (r.sliding) j["sliding"] = true;
  if (!r.match.empty()) j["match"] = r.match;
  if (r.metric != RuleMetric::kConcurrency) j["window"] = windowName(r.window.kind);
  if (r.window.kind == WindowKind::kWeek) j["week_start"] = weekdayName(r.window.week_start);
  if (!r.keys.empty()) {
    nlohmann::json keys = nlohmann::json::object();
    for (const auto& [id, limit] : r.keys) keys[id] = amount(limit);
    j["keys"] = std::move(keys);
  }
  return j;
}

const AlertsConfig::Thresholds& AlertsConfig::thresholdsFor(std::string_view scope, std::string_view id) const {
  if (scope == "tenant") {
    if (const auto it = tenant_pct_by_id.find(id); it != tenant_pct_by_id.end()) return it->second;
    if (tenant_pct) return *tenant_pct;
  } else if (scope == "run") {
    if (run_pct) return *run_pct;
  } else if (scope == "platform" && platform_pct) {
    return *platform_pct;
  }
  return thresholds_pct;
}

// The first line of a secret's file; the file is named in errors, never its content.
std::string secretFile(const std::string& path, const std::string& origin, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line) || line.empty()) fail(origin, key, "cannot read " + path);
  return line;
}

// Calls fn(table, "<prefix><name>[i].") for each table of the array of tables `name` in `t`.
template <typename Fn>
void forEachTable(const toml::table& t, std::string_view name, const std::string& origin, const std::string& prefix, Fn fn) {
  const toml::node* n = t.get(name);
  if (n == nullptr) return;
  const std::string path = prefix + std::string(name);
  const toml::array* arr = n->as_array();
  if (arr == nullptr) fail(origin, path, "must be a list of [[" + path + "]] tables");
  for (std::size_t i = 0; i < arr->size(); ++i) {
    const std::string key = path + "[" + std::to_string(i) + "].";
    const toml::table* table = arr->get(i)->as_table();
    if (table == nullptr) fail(origin, key, "must be a table");
    fn(*table, key);
  }
}

// An HTTP header name: a token (RFC 9110 5.1).
bool headerName(std::string_view s) {
  if (s.empty() || s.size() > 64) return false;
  for (const char ch : s) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || std::string_view("!#$%&'*+-.^_`|~").find(ch) != std::string_view::npos)) {
      return false;
    }
  }
  return true;
}

double getRatio(const toml::table& t, std::string_view name, const std::string& origin, const std::string& key,
                double fallback) {
  const toml::node* n = t.get(name);
  if (n == nullptr) return fallback;
  const std::optional<double> v = n->is_integer() ? std::optional<double>(static_cast<double>(n->as_integer()->get()))
                                  : n->is_floating_point() ? std::optional<double>(n->as_floating_point()->get())
                                                           : std::nullopt;
  if (!v || !(*v >= 0.5 && *v <= 100)) fail(origin, key, "must be a number from 0.5 to 100");
  return *v;
}

void readProxy(const toml::table& px, const std::string& origin, ProxyConfig& p) {
  rejectUnknown(px, origin, "proxy.",
                {"upstreams", "keys", "tenant_header", "run_header", "agent_header", "tags_header", "default_tenant",
                 "require_key", "default_max_tokens", "chars_per_token", "model_chars_per_token", "image_tokens",
                 "max_request_bytes", "max_response_bytes"});
  for (auto [name, field] : {std::pair{"tenant_header", &p.tenant_header}, std::pair{"run_header", &p.run_header},
                             std::pair{"agent_header", &p.agent_header}, std::pair{"tags_header", &p.tags_header}}) {
    *field = getString(px, name, origin, std::string("proxy.") + name, *field);
    if (!headerName(*field)) fail(origin, std::string("proxy.") + name, "must be an HTTP header name");
  }
  p.default_tenant = getString(px, "default_tenant", origin, "proxy.default_tenant", "");
  if (p.default_tenant.size() > shm::kKeyMax || !validIdText(p.default_tenant)) {
    fail(origin, "proxy.default_tenant", "must be a project_id of at most " + std::to_string(shm::kKeyMax) + " bytes");
  }
  if (const toml::node* n = px.get("require_key")) {
    if (!n->is_boolean()) fail(origin, "proxy.require_key", "must be true or false");
    p.require_key = n->as_boolean()->get();
  }
  p.default_max_tokens = getInt(px, "default_max_tokens", origin, "proxy.default_max_tokens", p.default_max_tokens, 0,
                                kMaxTokensPerCall);
  p.chars_per_token = getRatio(px, "chars_per_token", origin, "proxy.chars_per_token", p.chars_per_token);
  if (const toml::table* m = subtable(px, "model_chars_per_token", origin, "proxy.")) {
    for (const auto& [k, v] : *m) {
      const std::string key = "proxy.model_chars_per_token.\"" + std::string(k.str()) + "\"";
      toml::table one;
      one.insert("v", v);
      p.model_chars_per_token[std::string(k.str())] = getRatio(one, "v", origin, key, 4.0);
    }
  }
  p.image_tokens = getInt(px, "image_tokens", origin, "proxy.image_tokens", p.image_tokens, 0, 1'000'000);
  p.max_request_bytes =
      getInt(px, "max_request_bytes", origin, "proxy.max_request_bytes", p.max_request_bytes, 1024, 1LL << 30);
  p.max_response_bytes =
      getInt(px, "max_response_bytes", origin, "proxy.max_response_bytes", p.max_response_bytes, 1024, 1LL << 32);

  forEachTable(px, "upstreams", origin, "proxy.", [&](const toml::table& table, const std::string& key) {
    const toml::table* t = &table;
    rejectUnknown(*t, origin, key,
                  {"name", "kind", "base_url", "api_key_file", "provider", "model_prefix", "ca_file", "timeout_ms",
                   "connect_timeout_ms"});
    UpstreamConfig u;
    u.name = getString(*t, "name", origin, key + "name", "");
    const bool name_ok = !u.name.empty() && u.name.size() <= 64 &&
                         u.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") ==
                             std::string::npos;
    if (!name_ok) fail(origin, key + "name", "must be 1 to 64 letters, digits, '.', '_' or '-' (it is a path segment)");
    for (const UpstreamConfig& other : p.upstreams) {
      if (other.name == u.name) fail(origin, key + "name", "\"" + u.name + "\" names another upstream already");
    }
    u.kind = getString(*t, "kind", origin, key + "kind", "");
    if (u.kind != "openai" && u.kind != "anthropic" && u.kind != "ollama") {
      fail(origin, key + "kind", "must be openai, anthropic or ollama (the API the upstream speaks)");
    }
    u.base_url = getString(*t, "base_url", origin, key + "base_url", "");
    if (const std::string why = parseBaseUrl(u.base_url, &u.url); !why.empty()) fail(origin, key + "base_url", why);
    if (const std::string f = getString(*t, "api_key_file", origin, key + "api_key_file", ""); !f.empty()) {
      u.api_key = secretFile(f, origin, key + "api_key_file");
    }
    u.provider = getString(*t, "provider", origin, key + "provider", u.name);
    u.model_prefix = getString(*t, "model_prefix", origin, key + "model_prefix", u.kind == "ollama" ? "ollama/" : "");
    if (u.provider.size() > 64 || u.model_prefix.size() > 64) fail(origin, key + "provider", "may be at most 64 bytes");
    u.ca_file = getString(*t, "ca_file", origin, key + "ca_file", "");
    if (!u.ca_file.empty() && !std::ifstream(u.ca_file)) fail(origin, key + "ca_file", "cannot read " + u.ca_file);
    u.timeout_ms = getInt(*t, "timeout_ms", origin, key + "timeout_ms", u.timeout_ms, 100, 86'400'000);
    u.connect_timeout_ms =
        getInt(*t, "connect_timeout_ms", origin, key + "connect_timeout_ms", u.connect_timeout_ms, 10, 600'000);
    p.upstreams.push_back(std::move(u));
  });

  forEachTable(px, "keys", origin, "proxy.", [&](const toml::table& table, const std::string& key) {
    const toml::table* t = &table;
    rejectUnknown(*t, origin, key, {"sha256", "tenant", "agent", "tags"});
    VirtualKeyConfig k;
    k.sha256 = getString(*t, "sha256", origin, key + "sha256", "");
    if (k.sha256.size() != 64 || k.sha256.find_first_not_of("0123456789abcdef") != std::string::npos) {
      fail(origin, key + "sha256", "must be 64 lowercase hex digits: printf %s \"$KEY\" | sha256sum");
    }
    for (const VirtualKeyConfig& other : p.keys) {
      if (other.sha256 == k.sha256) fail(origin, key + "sha256", "is the hash of another key already");
    }
    k.tenant = getString(*t, "tenant", origin, key + "tenant", "");
    k.agent = getString(*t, "agent", origin, key + "agent", "");
    k.tags = getString(*t, "tags", origin, key + "tags", "");
    if (k.tenant.empty() || k.tenant.size() > shm::kKeyMax || !validIdText(k.tenant)) {
      fail(origin, key + "tenant", "must be a project_id of 1 to " + std::to_string(shm::kKeyMax) + " bytes");
    }
    if (k.agent.size() > shm::kKeyMax || !validIdText(k.agent)) {
      fail(origin, key + "agent", "may be at most " + std::to_string(shm::kKeyMax) + " bytes");
    }
    if (k.tags.size() > kMaxTagBytes) fail(origin, key + "tags", "may be at most " + std::to_string(kMaxTagBytes) + " bytes");
    p.keys.push_back(std::move(k));
  });
  if (p.require_key && p.keys.empty()) fail(origin, "proxy.require_key", "is true but no [[proxy.keys]] are configured");
}

Config defaultConfig() {
  Config c;
  char host[256] = {};
  c.host_id = ::gethostname(host, sizeof host - 1) == 0 && host[0] != '\0' ? host : "localhost";
  c.fallback_price = kReferenceFallbackPrice;
  for (const auto& [model, price] : referencePrices()) c.prices.emplace(model, price);
  return c;
}

Config parseConfig(const std::string& text, const std::string& origin) {
  toml::table root;
  try {
    root = toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << origin << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    throw ConfigError(msg.str());
  }
  Config c = defaultConfig();
  rejectUnknown(root, origin, "",
                {"agent", "region", "ledger", "http", "budgets", "kill_switch", "prices", "central", "alerts", "rules", "proxy"});
  if (const toml::table* h = subtable(root, "http", origin, "")) {
    rejectUnknown(*h, origin, "http.",
                  {"listen", "admin_token_file", "unix_socket", "threads", "max_connections",
                   "max_requests_per_connection", "max_header_bytes", "max_headers", "max_body_bytes",
                   "header_timeout_ms", "body_timeout_ms", "idle_timeout_ms"});
    if (h->get("listen") != nullptr) {
      parseListen(getString(*h, "listen", origin, "http.listen", ""), origin + ": http.listen", &c);
    }
    c.admin_token_file = getString(*h, "admin_token_file", origin, "http.admin_token_file", "");
    c.http_unix_socket = getString(*h, "unix_socket", origin, "http.unix_socket", "");
    if (!c.http_unix_socket.empty() && (c.http_unix_socket.front() != '/' || c.http_unix_socket.size() > 107)) {
      fail(origin, "http.unix_socket", "must be an absolute path of at most 107 bytes");
    }
    auto limit = [&](const char* name, std::int64_t fallback, std::int64_t lo, std::int64_t hi) {
      return getInt(*h, name, origin, std::string("http.") + name, fallback, lo, hi);
    };
    c.http_threads = static_cast<int>(limit("threads", c.http_threads, 0, 256));
    c.http_max_connections = limit("max_connections", c.http_max_connections, 1, 1'000'000);
    c.http_max_requests_per_connection =
        limit("max_requests_per_connection", c.http_max_requests_per_connection, 1, INT64_MAX);
    c.http_max_header_bytes = limit("max_header_bytes", c.http_max_header_bytes, 1024, 1 << 20);
    c.http_max_headers = limit("max_headers", c.http_max_headers, 8, 10'000);
    c.http_max_body_bytes = limit("max_body_bytes", c.http_max_body_bytes, 1024, 64 << 20);
    c.http_header_timeout_ms = limit("header_timeout_ms", c.http_header_timeout_ms, 100, 3'600'000);
    c.http_body_timeout_ms = limit("body_timeout_ms", c.http_body_timeout_ms, 100, 3'600'000);
    c.http_idle_timeout_ms = limit("idle_timeout_ms", c.http_idle_timeout_ms, 100, 86'400'000);
  }

  if (const toml::table* a = subtable(root, "agent", origin, "")) {
    rejectUnknown(*a, origin, "agent.", {"shm_name", "data_dir", "timezone", "log_level", "tick_ms", "host_id"});
    c.host_id = getString(*a, "host_id", origin, "agent.host_id", c.host_id);
    if (c.host_id.size() > 128) fail(origin, "agent.host_id", "may be at most 128 bytes");
    c.shm_name = getString(*a, "shm_name", origin, "agent.shm_name", c.shm_name);
    if (auto p = validateShmName(c.shm_name); !p.empty()) fail(origin, "agent.shm_name", p);
    c.data_dir = getString(*a, "data_dir", origin, "agent.data_dir", c.data_dir);
    if (auto p = dataDirProblem(c.data_dir); !p.empty()) fail(origin, "agent.data_dir", p);
    c.timezone = getString(*a, "timezone", origin, "agent.timezone", c.timezone);
    if (auto p = timezoneProblem(c.timezone); !p.empty()) fail(origin, "agent.timezone", p);
    c.log_level = getString(*a, "log_level", origin, "agent.log_level", c.log_level);
    if (c.log_level != "trace" && c.log_level != "debug" && c.log_level != "info" && c.log_level != "warn" &&
        c.log_level != "error") {
      fail(origin, "agent.log_level", "must be one of trace, debug, info, warn, error");
    }
    c.tick_ms = getInt(*a, "tick_ms", origin, "agent.tick_ms", c.tick_ms, 10, 1000);
  }

  if (const toml::table* r = subtable(root, "region", origin, "")) {
    rejectUnknown(*r, origin, "region.",
                  {"tenant_capacity", "run_capacity", "model_capacity", "reservation_capacity", "ledger_capacity",
                   "rule_capacity", "reclaim_interval_s"});
    c.reclaim_interval_s = getInt(*r, "reclaim_interval_s", origin, "region.reclaim_interval_s", c.reclaim_interval_s, 1, 86400);
    c.ledger_capacity = getCapacity(*r, "ledger_capacity", origin, c.ledger_capacity);
    c.rule_capacity = getCapacity(*r, "rule_capacity", origin, c.rule_capacity);
    c.tenant_capacity = getCapacity(*r, "tenant_capacity", origin, c.tenant_capacity);
    c.run_capacity = getCapacity(*r, "run_capacity", origin, c.run_capacity);
    c.model_capacity = getCapacity(*r, "model_capacity", origin, c.model_capacity);
    c.reservation_capacity = getCapacity(*r, "reservation_capacity", origin, c.reservation_capacity);
  }

  if (const toml::table* l = subtable(root, "ledger", origin, "")) {
    rejectUnknown(*l, origin, "ledger.",
                  {"flush_interval_ms", "retain_days", "max_size_mb", "prune_interval_s", "disk_warn_percent"});
    c.ledger_flush_interval_ms =
        getInt(*l, "flush_interval_ms", origin, "ledger.flush_interval_ms", c.ledger_flush_interval_ms, 1, 50);
    c.ledger_retain_days = getInt(*l, "retain_days", origin, "ledger.retain_days", c.ledger_retain_days, 0, 36500);
    c.ledger_max_size_mb = getInt(*l, "max_size_mb", origin, "ledger.max_size_mb", c.ledger_max_size_mb, 0, 1 << 30);
    c.ledger_prune_interval_s =
        getInt(*l, "prune_interval_s", origin, "ledger.prune_interval_s", c.ledger_prune_interval_s, 1, 86400);
    c.ledger_disk_warn_percent =
        getInt(*l, "disk_warn_percent", origin, "ledger.disk_warn_percent", c.ledger_disk_warn_percent, 0, 99);
  }

  if (const toml::table* b = subtable(root, "budgets", origin, "")) {
    rejectUnknown(*b, origin, "budgets.",
                  {"platform_daily_limit_usd", "tenant_default_daily_limit_usd", "run_default_limit_usd",
                   "reservation_ttl_s", "run_idle_lifetime_s", "tenants", "runs"});
    c.platform_daily_limit = getLimit(*b, "platform_daily_limit_usd", origin, "budgets.platform_daily_limit_usd");
    c.tenant_default_daily_limit =
        getLimit(*b, "tenant_default_daily_limit_usd", origin, "budgets.tenant_default_daily_limit_usd");
    c.run_default_limit = getLimit(*b, "run_default_limit_usd", origin, "budgets.run_default_limit_usd");
    c.reservation_ttl_s = getInt(*b, "reservation_ttl_s", origin, "budgets.reservation_ttl_s", c.reservation_ttl_s, 1,
                                 7 * 86400);
    c.run_idle_lifetime_s = getInt(*b, "run_idle_lifetime_s", origin, "budgets.run_idle_lifetime_s",
                                   c.run_idle_lifetime_s, 1, 10LL * 365 * 86400);
    readLimits(subtable(*b, "tenants", origin, "budgets."), origin, "budgets.tenants.", "a project_id", &c.tenant_limits);
    readLimits(subtable(*b, "runs", origin, "budgets."), origin, "budgets.runs.", "a run_id", &c.run_limits);
  }

  if (const toml::table* k = subtable(root, "kill_switch", origin, "")) {
    rejectUnknown(*k, origin, "kill_switch.", {"active", "reason"});
    if (const toml::node* n = k->get("active")) {
      if (!n->is_boolean()) fail(origin, "kill_switch.active", "must be true or false");
      c.kill_active = n->as_boolean()->get();
    }
    c.kill_reason = getString(*k, "reason", origin, "kill_switch.reason", "");
    if (c.kill_reason.size() > 256) fail(origin, "kill_switch.reason", "may be at most 256 bytes");
  }

  if (const toml::table* p = subtable(root, "prices", origin, "")) {
    rejectUnknown(*p, origin, "prices.", {"fallback", "replace_reference_table", "models"});
    if (const toml::node* f = p->get("fallback")) c.fallback_price = getPrice(*f, origin, "prices.fallback");
    if (const toml::node* n = p->get("replace_reference_table")) {
      if (!n->is_boolean()) fail(origin, "prices.replace_reference_table", "must be true or false");
      c.replace_reference_prices = n->as_boolean()->get();
      if (c.replace_reference_prices) c.prices.clear();
    }
    forEachId(subtable(*p, "models", origin, "prices."), origin, "prices.models.", "a model name",
              [&](const std::string& model, const toml::node& v, const std::string& key) {
                c.prices[model] = getPrice(v, origin, key);
              });
    if (c.prices.size() > c.model_capacity / 2) {
      fail(origin, "prices.models", "has " + std::to_string(c.prices.size()) +
                                        " models; raise region.model_capacity to at least twice that");
    }
  }

  if (const toml::table* ct = subtable(root, "central", origin, "")) {
    rejectUnknown(*ct, origin, "central.",
                  {"redis_url", "postgres_url", "sync_interval_ms", "limits_interval_ms", "push_batch",
                   "reference_keys", "lease_fraction", "connect_timeout_ms"});
    CentralConfig& cc = c.central;
    cc.redis_url = getString(*ct, "redis_url", origin, "central.redis_url", "");
    if (!cc.redis_url.empty()) {
      if (auto why = parseRedisUrl(cc.redis_url, &cc.redis); !why.empty()) fail(origin, "central.redis_url", why);
    }
    cc.postgres_url = getString(*ct, "postgres_url", origin, "central.postgres_url", "");
    if (!cc.postgres_url.empty() && cc.postgres_url.rfind("postgresql://", 0) != 0 &&
        cc.postgres_url.rfind("postgres://", 0) != 0) {
      fail(origin, "central.postgres_url", "must be a URL such as postgresql://user@host:5432/db");
    }
    cc.sync_interval_ms = getInt(*ct, "sync_interval_ms", origin, "central.sync_interval_ms", 1000, 10, 600'000);
    cc.limits_interval_ms = getInt(*ct, "limits_interval_ms", origin, "central.limits_interval_ms", 10'000, 100, 3'600'000);
    cc.connect_timeout_ms = getInt(*ct, "connect_timeout_ms", origin, "central.connect_timeout_ms", 2000, 10, 60'000);
    cc.push_batch = getInt(*ct, "push_batch", origin, "central.push_batch", 50'000, 1, 1'000'000);
    if (const toml::node* n = ct->get("reference_keys")) {
      if (!n->is_boolean()) fail(origin, "central.reference_keys", "must be true or false");
      cc.reference_keys = n->as_boolean()->get();
    }
    if (const toml::node* n = ct->get("lease_fraction")) {
      if (!n->is_string()) fail(origin, "central.lease_fraction", "must be a string such as \"0.25\" (or \"0\": off)");
      std::string why;
      const auto v = NanoUsd::parse(n->as_string()->get(), &why);   // a decimal with up to 9 digits
      if (!v || v->count() > 1'000'000'000) fail(origin, "central.lease_fraction", "must be a fraction from 0 to 1");
      cc.lease_fraction_ppb = v->count();
    }
    if (cc.enabled() && !c.tenant_limits.empty() && !cc.postgres_url.empty()) {
      fail(origin, "budgets.tenants",
           "with central.postgres_url, tenant limits come from awooop_projects.budget_limit_usd: remove "
           "[budgets.tenants] (and set them there, or with tokenfuse limit set)");
    }
  }
  if (const toml::table* al = subtable(root, "alerts", origin, "")) {
    rejectUnknown(*al, origin, "alerts.",
                  {"thresholds_pct", "platform_thresholds_pct", "tenant_thresholds_pct", "run_thresholds_pct", "tenants",
                   "notifiers", "queue_limit"});
    AlertsConfig& a = c.alerts;
    if (const toml::node* n = al->get("thresholds_pct")) a.thresholds_pct = thresholds(*n, origin, "alerts.thresholds_pct");
    for (const auto& [name, field] : {std::pair{"platform_thresholds_pct", &a.platform_pct},
                                      std::pair{"tenant_thresholds_pct", &a.tenant_pct},
                                      std::pair{"run_thresholds_pct", &a.run_pct}}) {
      if (const toml::node* n = al->get(name)) *field = thresholds(*n, origin, std::string("alerts.") + name);
    }
    forEachId(subtable(*al, "tenants", origin, "alerts."), origin, "alerts.tenants.", "a project_id",
              [&](const std::string& id, const toml::node& v, const std::string& key) {
                a.tenant_pct_by_id[id] = thresholds(v, origin, key);
              });
    a.queue_limit = getInt(*al, "queue_limit", origin, "alerts.queue_limit", a.queue_limit, 1, 10'000'000);
    forEachTable(*al, "notifiers", origin, "alerts.", [&](const toml::table& table, const std::string& key) {
      const toml::table* t = &table;
      rejectUnknown(*t, origin, key, {"kind", "url", "url_file", "bot_token_file", "chat_id", "api_base"});
      NotifierConfig nc;
      nc.kind = getString(*t, "kind", origin, key + "kind", "");
      if (nc.kind != "webhook" && nc.kind != "slack" && nc.kind != "telegram") {
        fail(origin, key + "kind", "must be webhook, slack or telegram");
      }
      auto secret = [&](const char* name) {
        const std::string path = getString(*t, name, origin, key + name, "");
        return path.empty() ? std::string() : secretFile(path, origin, key + name);
      };
      nc.url = getString(*t, "url", origin, key + "url", "");
      if (nc.url.empty()) nc.url = secret("url_file");
      nc.bot_token = secret("bot_token_file");
      nc.chat_id = getString(*t, "chat_id", origin, key + "chat_id", "");
      nc.api_base = getString(*t, "api_base", origin, key + "api_base", nc.api_base);
      if (nc.kind != "telegram" && nc.url.rfind("http://", 0) != 0 && nc.url.rfind("https://", 0) != 0) {
        fail(origin, key + "url", "must be an http:// or https:// URL (or give url_file)");
      }
      if (nc.kind == "telegram" && (nc.bot_token.empty() || nc.chat_id.empty())) {
        fail(origin, key + "kind", "telegram needs bot_token_file and chat_id");
      }
      a.notifiers.push_back(std::move(nc));
    });
  }
  if (const toml::node* rn = root.get("rules")) {
    const toml::array* arr = rn->as_array();
    if (arr == nullptr) fail(origin, "rules", "must be a list of [[rules]] tables");
    if (arr->size() > kMaxRules) {
      fail(origin, "rules", "at most " + std::to_string(kMaxRules) + " rules are allowed; this file has " +
                                std::to_string(arr->size()));
    }
    for (std::size_t i = 0; i < arr->size(); ++i) {
      RuleSpec r = readRule(*arr->get(i), i, origin);
      for (std::size_t j = 0; j < c.rules.size(); ++j) {
        if (c.rules[j].name == r.name) {
          fail(origin, "rules[" + std::to_string(i) + "] (\"" + r.name + "\").name",
               "is already the name of rules[" + std::to_string(j) + "]; names must be unique");
        }
      }
      c.rules.push_back(std::move(r));
    }
  }
  if (const toml::table* px = subtable(root, "proxy", origin, "")) readProxy(*px, origin, c.proxy);
  return c;
}

std::string parseBaseUrl(const std::string& url, BaseUrl* out) {
  BaseUrl u;
  std::string_view rest = url;
  if (rest.starts_with("https://")) {
    u.tls = true;
    rest.remove_prefix(8);
  } else if (rest.starts_with("http://")) {
    rest.remove_prefix(7);
  } else {
    return "must start with http:// or https://";
  }
  const std::size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view() : rest.substr(slash);
  if (authority.find('@') != std::string_view::npos) return "must not hold credentials (use api_key_file)";
  if (path.find_first_of("?#") != std::string_view::npos) return "must not have a query or a fragment";
  while (path.ends_with('/')) path.remove_suffix(1);
  std::string_view port;
  if (authority.starts_with('[')) {
    const std::size_t close = authority.find(']');
    if (close == std::string_view::npos) return "has an unclosed '[' in its host";
    u.host = std::string(authority.substr(1, close - 1));
    const std::string_view after = authority.substr(close + 1);
    if (!after.empty() && after.front() != ':') return "has something other than :port after its host";
    if (!after.empty()) port = after.substr(1);
  } else {
    const std::size_t colon = authority.rfind(':');
    u.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
  }
  if (u.host.empty()) return "has no host";
  if (!port.empty()) {
    unsigned value = 0;
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc{} || end != port.data() + port.size() || value == 0 || value > 65535) {
      return "has a port that is not a number from 1 to 65535";
    }
  }
  u.port = port.empty() ? (u.tls ? "443" : "80") : std::string(port);
  u.path = std::string(path);
  *out = std::move(u);
  return "";
}

std::string parseRedisUrl(const std::string& url, RedisEndpoint* out) {
  // redis://[[user]:password@]host[:port][/db]
  constexpr std::string_view kScheme = "redis://";
  if (url.rfind(kScheme, 0) != 0) return "must be a URL such as redis://127.0.0.1:6379/0";
  std::string rest = url.substr(kScheme.size());
  RedisEndpoint e;
  if (const auto at = rest.rfind('@'); at != std::string::npos) {
    const std::string auth = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const auto colon = auth.find(':');
    e.user = colon == std::string::npos ? std::string() : auth.substr(0, colon);
    e.password = colon == std::string::npos ? auth : auth.substr(colon + 1);
  }
  if (const auto slash = rest.find('/'); slash != std::string::npos) {
    const std::string db = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
    if (!db.empty()) {
      const auto [end, ec] = std::from_chars(db.data(), db.data() + db.size(), e.db);
      if (ec != std::errc{} || end != db.data() + db.size() || e.db < 0) return "the database after '/' must be a number";
    }
  }
  if (const auto colon = rest.rfind(':'); colon != std::string::npos && rest.find(']') == std::string::npos) {
    const std::string port = rest.substr(colon + 1);
    rest = rest.substr(0, colon);
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), e.port);
    if (ec != std::errc{} || end != port.data() + port.size() || e.port <= 0 || e.port > 65535) {
      return "the port must be a number from 1 to 65535";
    }
  }
  if (rest.empty()) return "names no host";
  e.host = rest;
  *out = e;
  return {};
}

void parseListen(const std::string& text, const std::string& key, Config* config) {
  if (text == "off") {
    config->http_port = -1;
    return;
  }
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    throw ConfigError(key + ": '" + text + "' is not HOST:PORT (e.g. 127.0.0.1:8787) or off");
  }
  std::string host = text.substr(0, colon);
  if (host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  // An address, not a name: a name is looked up only when the agent starts (and may fail then,
  // which --check-config would not have seen).
  unsigned char addr[16];
  if (host != "localhost" && ::inet_pton(AF_INET, host.c_str(), addr) != 1 && ::inet_pton(AF_INET6, host.c_str(), addr) != 1) {
    throw ConfigError(key + ": '" + host + "' is not an IP address (e.g. 127.0.0.1 or [::1]) or localhost");
  }
  int port = -1;
  const std::string p = text.substr(colon + 1);
  const auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), port);
  if (ec != std::errc{} || end != p.data() + p.size() || port < 0 || port > 65535) {
    throw ConfigError(key + ": port '" + p + "' must be a number from 0 to 65535");
  }
  config->http_host = host;
  config->http_port = port;
}

std::string dataDirProblem(const std::string& path) {
  if (path.empty()) return "must not be empty";
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (std::filesystem::exists(st) && !std::filesystem::is_directory(st)) return "'" + path + "' exists and is not a directory";
  return {};
}

std::string timezoneProblem(const std::string& zone) {
  try {
    DayClock days(zone);
    return {};
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
}

Config loadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot read the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parseConfig(ss.str(), path);
}

}  // namespace tokenfuse
