#include "agent_support.h"

#include "pricing.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <set>
#include <sstream>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {
std::string parseError(const std::string& text) {
  try {
    parseConfig(text, "t.toml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

// The error for one [[rules]] table named "r" with `body` (its keys, one a line).
std::string ruleError(const std::string& body) { return parseError("[[rules]]\nname = \"r\"\n" + body); }

// Field by field, so that a failure names the rule and the field.
void checkRule(const RuleSpec& got, const RuleSpec& want) {
  INFO("rule ", want.name);
  CHECK(got.name == want.name);
  CHECK(scopeName(got.scope) == scopeName(want.scope));
  CHECK(got.match == want.match);
  CHECK(metricName(got.metric) == metricName(want.metric));
  CHECK(windowName(got.window.kind) == windowName(want.window.kind));
  CHECK(got.window.week_start == want.window.week_start);
  CHECK(got.limit == want.limit);
  CHECK(got.keys == want.keys);
  CHECK(got.host_only == want.host_only);
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

TEST_CASE("config: the defaults are the reference's prices and fallback, and no limits") {
  const Config c = defaultConfig();
  CHECK(c.prices.size() == referencePrices().size());
  CHECK(c.prices.at("gpt-4o") == Price{5'000'000'000, 15'000'000'000});
  CHECK(c.fallback_price == kReferenceFallbackPrice);
  CHECK_FALSE(c.platform_daily_limit.has_value());
  CHECK(c.timezone == "UTC");
  CHECK(c.shm_name == "tokenfuse");
}

TEST_CASE("config: [ledger] retention is read exactly, and a bad value is named") {
  const Config c = parseConfig("[ledger]\nretain_days = 400\nmax_size_mb = 2048\nprune_interval_s = 5\n"
                               "disk_warn_percent = 20\n",
                               "t.toml");
  CHECK(c.ledger_retain_days == 400);
  CHECK(c.ledger_max_size_mb == 2048);
  CHECK(c.ledger_prune_interval_s == 5);
  CHECK(c.ledger_disk_warn_percent == 20);
  CHECK(defaultConfig().ledger_retain_days == 90);
  CHECK(defaultConfig().ledger_max_size_mb == 0);
  CHECK(parseError("[ledger]\nretain_days = -1\n") == "t.toml: ledger.retain_days: must be from 0 to 36500");
  CHECK(parseError("[ledger]\nmax_size_mb = \"1G\"\n").find("ledger.max_size_mb") != std::string::npos);
  CHECK(parseError("[ledger]\ndisk_warn_percent = 100\n") ==
        "t.toml: ledger.disk_warn_percent: must be from 0 to 99");
  CHECK(parseError("[ledger]\nretain = 5\n").find("ledger.retain: unknown key") != std::string::npos);
}

TEST_CASE("config: the shipped packaging/tokenfuse.toml is valid and equals the defaults") {
  const Config c = loadConfig(TOKENFUSE_SOURCE_DIR "/packaging/tokenfuse.toml");
  const Config d = defaultConfig();
  CHECK(c.prices == d.prices);
  CHECK(c.tenant_capacity == d.tenant_capacity);
  CHECK(c.reservation_ttl_s == d.reservation_ttl_s);
  CHECK(c.ledger_retain_days == d.ledger_retain_days);
  CHECK(c.ledger_max_size_mb == d.ledger_max_size_mb);
  CHECK(c.ledger_prune_interval_s == d.ledger_prune_interval_s);
  CHECK(c.ledger_disk_warn_percent == d.ledger_disk_warn_percent);
  CHECK_FALSE(c.kill_active);
  CHECK(c.rules.empty());
}

TEST_CASE("config: the [[rules]] examples in packaging/tokenfuse.toml are valid once uncommented") {
  // The examples are the comment block that starts at "# [[rules]]"; prose in it is a comment
  // of its own ("#   ...") and stays one.
  std::istringstream in(readFile(TOKENFUSE_SOURCE_DIR "/packaging/tokenfuse.toml"));
  std::string line, toml;
  bool inside = false;
  while (std::getline(in, line)) {
    if (line.rfind("# [[rules]]", 0) == 0) inside = true;
    if (!inside) continue;
    if (line.rfind('#', 0) != 0) break;
    toml += (line.rfind("# ", 0) == 0 ? line.substr(2) : std::string()) + "\n";
  }
  const Config c = parseConfig(toml, "packaging/tokenfuse.toml, uncommented");
  REQUIRE(c.rules.size() == 3);
  CHECK(c.rules[0].keys.size() == 2);
  CHECK(c.rules[1].window.kind == WindowKind::kWeek);
  CHECK(c.rules[2].metric == RuleMetric::kConcurrency);
}

TEST_CASE("config: every TOML example in docs/rules.md is valid, and together they show every scope and window") {
  const std::string doc = readFile(TOKENFUSE_SOURCE_DIR "/docs/rules.md");
  std::set<std::string_view> scopes, windows;
  int blocks = 0;
  for (std::size_t at = doc.find("```toml\n"); at != std::string::npos; at = doc.find("```toml\n", at)) {
    const std::size_t begin = at + 8;
    const std::size_t end = doc.find("```", begin);
    REQUIRE(end != std::string::npos);
    const std::string origin = "docs/rules.md block " + std::to_string(++blocks);
    INFO(origin);
    Config c;
    CHECK_NOTHROW(c = parseConfig(doc.substr(begin, end - begin), origin));
    for (const RuleSpec& r : c.rules) {
      scopes.insert(scopeName(r.scope));
      if (r.metric != RuleMetric::kConcurrency) windows.insert(windowName(r.window.kind));
    }
    at = end + 3;
  }
  CHECK(scopes.size() == 8);
  CHECK(windows.size() == 6);
}

TEST_CASE("config: limits, prices and the kill switch are read exactly") {
  const Config c = parseConfig(R"(
[agent]
timezone = "Europe/Berlin"
[budgets]
platform_daily_limit_usd = "100.50"
tenant_default_daily_limit_usd = 5
run_default_limit_usd = "unlimited"
[budgets.tenants]
acme = "0.000000001"
"big corp" = "unlimited"
[kill_switch]
active = true
reason = "incident 42"
[prices]
fallback = { prompt = "1", completion = "2" }
[prices.models]
"gpt-4o" = { prompt = "2.5", completion = "10" }
"new-model" = { prompt = "0.075", completion = "0.3" }
)",
                                 "t.toml");
  CHECK(c.timezone == "Europe/Berlin");
  CHECK(c.platform_daily_limit == NanoUsd(100'500'000'000));
  CHECK(c.tenant_default_daily_limit == NanoUsd::fromWholeUsd(5));
  CHECK_FALSE(c.run_default_limit.has_value());
  CHECK(c.tenant_limits.at("acme") == NanoUsd(1));
  CHECK_FALSE(c.tenant_limits.at("big corp").has_value());
  CHECK(c.kill_active);
  CHECK(c.kill_reason == "incident 42");
  CHECK(c.fallback_price == Price{1'000'000'000, 2'000'000'000});
  CHECK(c.prices.at("gpt-4o") == Price{2'500'000'000, 10'000'000'000});
  CHECK(c.prices.at("new-model") == Price{75'000'000, 300'000'000});
  CHECK(c.prices.contains("claude-opus-4-7"));   // the reference table stays
  CHECK_FALSE(parseConfig("[prices]\nreplace_reference_table = true\n", "t").prices.contains("gpt-4o"));
}

TEST_CASE("config: a bad file gets an error that names the key and the rule") {
  CHECK(parseError("[agent]\nshm_nme = \"x\"\n") == "t.toml: agent.shm_nme: unknown key (check its spelling and section)");
  CHECK(parseError("[budgets]\nplatform_daily_limit_usd = 1.5\n").find(
            "budgets.platform_daily_limit_usd: write money as a string") != std::string::npos);
  CHECK(parseError("[budgets]\nplatform_daily_limit_usd = \"-3\"\n").find("budgets.platform_daily_limit_usd") !=
        std::string::npos);
  CHECK(parseError("[budgets]\nplatform_daily_limit_usd = -3\n").find("must not be negative") != std::string::npos);
  CHECK(parseError("[region]\ntenant_capacity = 1000\n") ==
        "t.toml: region.tenant_capacity: must be a power of two (16, 32, ..., 16777216)");
  CHECK(parseError("[agent]\ntick_ms = 0\n") == "t.toml: agent.tick_ms: must be from 10 to 1000");
  CHECK(parseError("[agent]\nshm_name = \"a/b\"\n").find("agent.shm_name") != std::string::npos);
  CHECK(parseError("[agent]\nlog_level = \"loud\"\n").find("agent.log_level: must be one of") != std::string::npos);
  CHECK(parseError("[prices.models]\n\"m\" = { prompt = \"1\" }\n") ==
        "t.toml: prices.models.\"m\".completion: is missing (USD per million tokens)");
  CHECK(parseError("[prices.models]\n\"m\" = { prompt = \"2000000\", completion = \"1\" }\n").find(
            "at most 1000000 USD") != std::string::npos);
  CHECK(parseError("[budgets.tenants]\nacme = \"lots\"\n").find("budgets.tenants.\"acme\"") != std::string::npos);
  CHECK(parseError("[kill_switch]\nactive = \"yes\"\n") == "t.toml: kill_switch.active: must be true or false");
  CHECK(parseError("[agent\n").rfind("t.toml:1:", 0) == 0);   // syntax errors carry line and column
}

TEST_CASE("config: [http] limits are read exactly, and a bad one is named") {
  const Config c = parseConfig("[http]\nmax_connections = 20000\nmax_body_bytes = 1048576\nheader_timeout_ms = 2500\n"
                               "idle_timeout_ms = 1000\nthreads = 3\nunix_socket = \"/run/tf.sock\"\n",
                               "t.toml");
  CHECK(c.http_max_connections == 20000);
  CHECK(c.http_max_body_bytes == 1048576);
  CHECK(c.http_header_timeout_ms == 2500);
  CHECK(c.http_idle_timeout_ms == 1000);
  CHECK(c.http_threads == 3);
  CHECK(c.http_unix_socket == "/run/tf.sock");
  CHECK(c.http_max_headers == 64);   // untouched: the default
  CHECK(parseError("[http]\nmax_connections = 0\n") == "t.toml: http.max_connections: must be from 1 to 1000000");
  CHECK(parseError("[http]\nheader_timeout_ms = 10\n").find("http.header_timeout_ms: must be from 100") !=
        std::string::npos);
  CHECK(parseError("[http]\nunix_socket = \"relative.sock\"\n").find("http.unix_socket: must be an absolute path") !=
        std::string::npos);
  CHECK(parseError("[http]\nmax_conections = 5\n").find("http.max_conections: unknown key") != std::string::npos);
}

TEST_CASE("config: [central] reads its URLs exactly and names what is wrong with them") {
  const Config c = parseConfig(R"(
[central]
redis_url = "redis://:s3cret@10.0.0.5:6380/2"
postgres_url = "postgresql://tokenfuse@db:5432/awooop"
sync_interval_ms = 250
lease_fraction = "0.25"
reference_keys = true
)",
                               "t.toml");
  CHECK(c.central.enabled());
  CHECK(c.central.redis.host == "10.0.0.5");
  CHECK(c.central.redis.port == 6380);
  CHECK(c.central.redis.password == "s3cret");
  CHECK(c.central.redis.db == 2);
  CHECK(c.central.sync_interval_ms == 250);
  CHECK(c.central.lease_fraction_ppb == 250'000'000);
  CHECK(c.central.reference_keys);
  CHECK_FALSE(defaultConfig().central.enabled());
  CHECK(parseError("[central]\nredis_url = \"http://x\"\n") ==
        "t.toml: central.redis_url: must be a URL such as redis://127.0.0.1:6379/0");
  CHECK(parseError("[central]\nredis_url = \"redis://h:99999\"\n").find("port must be a number") != std::string::npos);
  CHECK(parseError("[central]\nlease_fraction = 0.5\n").find("central.lease_fraction: must be a string") !=
        std::string::npos);
  CHECK(parseError("[central]\nlease_fraction = \"1.5\"\n").find("a fraction from 0 to 1") != std::string::npos);
  CHECK(parseError("[budgets.tenants]\nacme = \"1\"\n[central]\npostgres_url = \"postgresql://h/db\"\n")
            .find("tenant limits come from awooop_projects") != std::string::npos);
}

TEST_CASE("config: [alerts] thresholds per scope and tenant, notifiers, and what is wrong with them") {
  TempDir dir;
  std::ofstream(dir.path + "/hook.url") << "https://hooks.example/T0/B0/secret\n";
  const Config c = parseConfig("[alerts]\nthresholds_pct = [95, 80, 80]\nrun_thresholds_pct = []\n"
                               "platform_thresholds_pct = [50, 100]\n[alerts.tenants]\n\"vip\" = [10]\n"
                               "[[alerts.notifiers]]\nkind = \"slack\"\nurl_file = \"" + dir.path + "/hook.url\"\n",
                               "t.toml");
  CHECK(c.alerts.thresholds_pct == AlertsConfig::Thresholds{80, 95});   // sorted, once each
  CHECK(c.alerts.thresholdsFor("tenant", "acme") == AlertsConfig::Thresholds{80, 95});
  CHECK(c.alerts.thresholdsFor("tenant", "vip") == AlertsConfig::Thresholds{10});
  CHECK(c.alerts.thresholdsFor("run", "r").empty());
  CHECK(c.alerts.thresholdsFor("platform", "") == AlertsConfig::Thresholds{50, 100});
  REQUIRE(c.alerts.notifiers.size() == 1);
  CHECK(c.alerts.notifiers[0].url == "https://hooks.example/T0/B0/secret");
  CHECK(defaultConfig().alerts.thresholdsFor("run", "r") == AlertsConfig::Thresholds{80, 95, 100});

  CHECK(parseError("[alerts]\nthresholds_pct = [0]\n") ==
        "t.toml: alerts.thresholds_pct: must hold whole percentages from 1 to 1000");
  CHECK(parseError("[alerts]\ntenant_thresholds_pct = 80\n") ==
        "t.toml: alerts.tenant_thresholds_pct: must be a list such as [80, 95, 100] ([] for none)");
  CHECK(parseError("[alerts.tenants]\nacme = [\"80\"]\n") ==
        "t.toml: alerts.tenants.\"acme\": must hold whole percentages from 1 to 1000");
  CHECK(parseError("[alerts]\nthreshold_pct = [80]\n") ==
        "t.toml: alerts.threshold_pct: unknown key (check its spelling and section)");
  CHECK(parseError("[[alerts.notifiers]]\nkind = \"email\"\n") ==
        "t.toml: alerts.notifiers[0].kind: must be webhook, slack or telegram");
  // A secret's file is named when it cannot be read; its content never is.
  CHECK(parseError("[[alerts.notifiers]]\nkind = \"telegram\"\nbot_token_file = \"/nonexistent/bot\"\n"
                   "chat_id = \"1\"\n") == "t.toml: alerts.notifiers[0].bot_token_file: cannot read /nonexistent/bot");
}

TEST_CASE("config: rule scope, metric, window and weekday names read back as written") {
  for (int i = 0; i < 8; ++i) {
    const auto s = static_cast<RuleScope>(i);
    CHECK(parseScope(scopeName(s)) == s);
  }
  for (int i = 0; i < 6; ++i) {
    const auto m = static_cast<RuleMetric>(i);
    CHECK(parseMetric(metricName(m)) == m);
  }
  for (int i = 0; i < 6; ++i) {
    const auto k = static_cast<WindowKind>(i);
    CHECK(parseWindow(windowName(k)) == k);
  }
  for (unsigned d = 0; d < 7; ++d) CHECK(parseWeekday(weekdayName(d)) == d);
  CHECK(scopeName(RuleScope::kTenantModel) == "tenant+model");
  CHECK(metricName(RuleMetric::kCompletionTokens) == "completion_tokens");
  CHECK(windowName(WindowKind::kAllTime) == "all-time");
  CHECK(weekdayName(0) == "sunday");
  CHECK(scopeName(static_cast<RuleScope>(200)) == "unknown");   // a byte from the region, say
  CHECK_FALSE(parseScope("Tenant").has_value());
  CHECK_FALSE(parseMetric("").has_value());
  CHECK_FALSE(parseWindow("daily").has_value());
  CHECK_FALSE(parseWeekday("mon").has_value());
}

TEST_CASE("config: [[rules]] of every scope, window and metric are read exactly, in the file's order") {
  const Config c = parseConfig(R"(
[[rules]]
name = "platform-hourly"
scope = "platform"
window = "hour"
limit = "40.50"

[[rules]]
name = "tenant-monthly"
scope = "tenant"
window = "month"
limit = 500
host_only = true
[rules.keys]
"acme" = "1200.000000001"
"internal" = "unlimited"

[[rules]]
name = "run.tokens"
scope = "run"
window = "all-time"
metric = "tokens"
limit = 2000000

[[rules]]
name = "bots_weekly"
scope = "agent"
match = "bot-*"
window = "week"
week_start = "sunday"
metric = "completion_tokens"
limit = 100000

[[rules]]
name = "gpt-4-family"
scope = "model"
match = "gpt-4*"
window = "day"
metric = "prompt_tokens"
limit = 0

[[rules]]
name = "tag-rate"
scope = "tag"
window = "minute"
metric = "requests"
limit = 600
keys = { "batch" = "unlimited", "interactive" = 60 }

[[rules]]
name = "opus-per-tenant"
scope = "tenant+model"
match = "claude-opus-4-7"
window = "week"
limit = "unlimited"

[[rules]]
name = "in-flight"
scope = "tenant+agent"
metric = "concurrency"
limit = 8
)",
                               "t.toml");
  std::vector<RuleSpec> want(8);
  want[0].name = "platform-hourly";
  want[0].scope = RuleScope::kPlatform;
  want[0].window.kind = WindowKind::kHour;
  want[0].limit = 40'500'000'000;

  want[1].name = "tenant-monthly";
  want[1].scope = RuleScope::kTenant;
  want[1].window.kind = WindowKind::kMonth;
  want[1].limit = 500'000'000'000;
  want[1].keys = {{"acme", 1'200'000'000'001}, {"internal", std::nullopt}};
  want[1].host_only = true;

  want[2].name = "run.tokens";
  want[2].scope = RuleScope::kRun;
  want[2].metric = RuleMetric::kTokens;
  want[2].window.kind = WindowKind::kAllTime;
  want[2].limit = 2'000'000;

  want[3].name = "bots_weekly";
  want[3].scope = RuleScope::kAgent;
  want[3].match = "bot-*";
  want[3].metric = RuleMetric::kCompletionTokens;
  want[3].window = {WindowKind::kWeek, 0};
  want[3].limit = 100'000;

  want[4].name = "gpt-4-family";
  want[4].scope = RuleScope::kModel;
  want[4].match = "gpt-4*";
  want[4].metric = RuleMetric::kPromptTokens;
  want[4].window.kind = WindowKind::kDay;
  want[4].limit = 0;

  want[5].name = "tag-rate";
  want[5].scope = RuleScope::kTag;
  want[5].metric = RuleMetric::kRequests;
  want[5].window.kind = WindowKind::kMinute;
  want[5].limit = 600;
  want[5].keys = {{"batch", std::nullopt}, {"interactive", 60}};

  want[6].name = "opus-per-tenant";
  want[6].scope = RuleScope::kTenantModel;
  want[6].match = "claude-opus-4-7";
  want[6].window = {WindowKind::kWeek, 1};   // Monday unless told
  want[6].limit = std::nullopt;

  want[7].name = "in-flight";
  want[7].scope = RuleScope::kTenantAgent;
  want[7].metric = RuleMetric::kConcurrency;
  want[7].window.kind = WindowKind::kAllTime;   // concurrency has no window
  want[7].limit = 8;

  REQUIRE(c.rules.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) checkRule(c.rules[i], want[i]);
  CHECK(parseConfig("rules = []\n", "t.toml").rules.empty());
}

TEST_CASE("config: [[rules]] as a whole: a list of tables, at most 32, names unique") {
  CHECK(parseError("rules = 5\n") == "t.toml: rules: must be a list of [[rules]] tables");
  CHECK(parseError("[rules]\nname = \"r\"\n") == "t.toml: rules: must be a list of [[rules]] tables");
  CHECK(parseError("rules = [1]\n") == "t.toml: rules[0]: must be a table");
  auto many = [](int n) {
    std::string text;
    for (int i = 0; i < n; ++i) text += "[[rules]]\nname = \"r" + std::to_string(i) + "\"\nscope = \"tenant\"\nwindow = \"day\"\n";
    return text;
  };
  CHECK(parseConfig(many(32), "t.toml").rules.size() == 32);
  CHECK(parseError(many(33)) == "t.toml: rules: at most 32 rules are allowed; this file has 33");
  CHECK(parseError("[[rules]]\nname = \"r\"\nscope = \"tenant\"\nwindow = \"day\"\n"
                   "[[rules]]\nname = \"s\"\nscope = \"run\"\nwindow = \"day\"\n"
                   "[[rules]]\nname = \"r\"\nscope = \"model\"\nwindow = \"day\"\n") ==
        "t.toml: rules[2] (\"r\").name: is already the name of rules[0]; names must be unique");
}

TEST_CASE("config: a rule's name is required, 1 to 63 of A-Z a-z 0-9 . _ -, and names the rule in every message") {
  CHECK(parseError("[[rules]]\nscope = \"tenant\"\n") ==
        "t.toml: rules[0].name: is missing (every rule needs one, e.g. name = \"tenant-monthly\")");
  CHECK(parseError("[[rules]]\nname = 7\n") == "t.toml: rules[0].name: must be a string");
  CHECK(parseError("[[rules]]\nname = \"\"\n") == "t.toml: rules[0].name: must not be empty");
  CHECK(parseConfig("[[rules]]\nname = \"" + std::string(63, 'n') + "\"\nscope = \"run\"\nwindow = \"day\"\n", "t.toml")
            .rules.at(0)
            .name.size() == 63);
  CHECK(parseError("[[rules]]\nname = \"" + std::string(64, 'n') + "\"\n") ==
        "t.toml: rules[0].name: may be at most 63 characters");
  CHECK(parseError("[[rules]]\nname = \"tenant monthly\"\n") ==
        "t.toml: rules[0].name: may hold only A-Z, a-z, 0-9, '.', '_' and '-'");
  CHECK(parseError("[[rules]]\nname = \"t\u00e9\"\n") ==
        "t.toml: rules[0].name: may hold only A-Z, a-z, 0-9, '.', '_' and '-'");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nlimt = \"1\"\n") ==
        "t.toml: rules[0] (\"r\").limt: unknown key (check its spelling and section)");
}

TEST_CASE("config: a rule's scope is required and one of the eight") {
  CHECK(ruleError("window = \"day\"\n") ==
        "t.toml: rules[0] (\"r\").scope: is missing: one of platform, tenant, run, agent, model, tag, tenant+model, "
        "tenant+agent");
  CHECK(ruleError("scope = \"tenants\"\nwindow = \"day\"\n") ==
        "t.toml: rules[0] (\"r\").scope: must be one of platform, tenant, run, agent, model, tag, tenant+model, "
        "tenant+agent");
  CHECK(ruleError("scope = [\"tenant\"]\nwindow = \"day\"\n") == "t.toml: rules[0] (\"r\").scope: must be a string");
}

TEST_CASE("config: a rule's metric is one of the six, usd unless given") {
  CHECK(metricName(parseConfig("[[rules]]\nname = \"r\"\nscope = \"run\"\nwindow = \"day\"\n", "t").rules.at(0).metric) ==
        "usd");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nmetric = \"dollars\"\n") ==
        "t.toml: rules[0] (\"r\").metric: must be one of usd, tokens, prompt_tokens, completion_tokens, requests, "
        "concurrency");
}

TEST_CASE("config: a rule's window is required, one of the six, and absent for concurrency") {
  CHECK(ruleError("scope = \"tenant\"\n") ==
        "t.toml: rules[0] (\"r\").window: is missing: one of minute, hour, day, week, month, all-time");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"daily\"\n") ==
        "t.toml: rules[0] (\"r\").window: must be one of minute, hour, day, week, month, all-time");
  CHECK(ruleError("scope = \"tenant\"\nmetric = \"concurrency\"\nwindow = \"all-time\"\n") ==
        "t.toml: rules[0] (\"r\").window: must not be given for metric concurrency (it has no window)");
}

TEST_CASE("config: a rule's week_start is a weekday, and only for weekly windows") {
  CHECK(parseConfig("[[rules]]\nname = \"r\"\nscope = \"run\"\nwindow = \"week\"\nweek_start = \"saturday\"\n", "t")
            .rules.at(0)
            .window.week_start == 6);
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"month\"\nweek_start = \"monday\"\n") ==
        "t.toml: rules[0] (\"r\").week_start: is only for window = \"week\"");
  CHECK(ruleError("scope = \"tenant\"\nmetric = \"concurrency\"\nweek_start = \"monday\"\n") ==
        "t.toml: rules[0] (\"r\").week_start: is only for window = \"week\"");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"week\"\nweek_start = \"Monday\"\n") ==
        "t.toml: rules[0] (\"r\").week_start: must be a day from sunday to saturday (lower case)");
}

TEST_CASE("config: a rule's match is \"\", a key or a prefix with '*', at most 128 bytes of text, and not for the platform") {
  const std::string base = "scope = \"model\"\nwindow = \"day\"\n";
  CHECK(parseConfig("[[rules]]\nname = \"r\"\n" + base + "match = \"" + std::string(127, 'm') + "*\"\n", "t")
            .rules.at(0)
            .match.size() == 128);
  CHECK(ruleError(base + "match = \"" + std::string(129, 'm') + "\"\n") ==
        "t.toml: rules[0] (\"r\").match: may be at most 128 bytes");
  CHECK(ruleError(base + "match = \"gpt\\u0000\"\n") ==
        "t.toml: rules[0] (\"r\").match: must be UTF-8 text without NUL (\\u0000)");
  CHECK(ruleError(base + "match = \"gpt-*-mini\"\n") ==
        "t.toml: rules[0] (\"r\").match: may hold '*' only at its end (\"gpt-4*\": every key that starts with gpt-4)");
  CHECK(ruleError(base + "match = \"*\"\n") ==
        "t.toml: rules[0] (\"r\").match: \"*\" alone is not a pattern: write \"\" for every key, or a prefix before "
        "the '*'");
  CHECK(ruleError(base + "match = 4\n") == "t.toml: rules[0] (\"r\").match: must be a string");
  CHECK(ruleError("scope = \"platform\"\nwindow = \"day\"\nmatch = \"\"\n") ==
        "t.toml: rules[0] (\"r\").match: is not for scope platform, which counts every call in one counter");
}

TEST_CASE("config: a rule's limit is money for usd and a whole number for the other metrics") {
  const std::string usd = "scope = \"tenant\"\nwindow = \"day\"\n";
  CHECK(ruleError(usd + "limit = 1.5\n").find("rules[0] (\"r\").limit: write money as a string") != std::string::npos);
  CHECK(ruleError(usd + "limit = -1\n") == "t.toml: rules[0] (\"r\").limit: must not be negative");
  CHECK(ruleError(usd + "limit = \"lots\"\n").rfind("t.toml: rules[0] (\"r\").limit: ", 0) == 0);
  CHECK(ruleError(usd + "limit = \"lots\"\n").find("(or write \"unlimited\")") != std::string::npos);
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nmetric = \"tokens\"\nlimit = \"5.00\"\n") ==
        "t.toml: rules[0] (\"r\").limit: must be a whole number of tokens, such as 1000 (or \"unlimited\")");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nmetric = \"requests\"\nlimit = 2.0\n") ==
        "t.toml: rules[0] (\"r\").limit: must be a whole number of requests, such as 1000 (or \"unlimited\")");
  CHECK(ruleError("scope = \"tenant\"\nmetric = \"concurrency\"\nlimit = -3\n") ==
        "t.toml: rules[0] (\"r\").limit: must not be negative");
}

TEST_CASE("config: a rule's keys are ids with limits of the rule's kind, and not for platform, tenant+model, tenant+agent") {
  CHECK(ruleError("scope = \"platform\"\nwindow = \"day\"\nkeys = { \"x\" = \"1\" }\n") ==
        "t.toml: rules[0] (\"r\").keys: is not for scope platform, which has one counter: use limit");
  CHECK(ruleError("scope = \"model\"\nwindow = \"day\"\nmatch = \"gpt-4*\"\nkeys = { \"gpt-4o\" = \"1\" }\n") ==
        "t.toml: rules[0] (\"r\").keys: is not for a prefix group (match \"gpt-4*\"), which has one counter for all "
        "its keys: use limit");
  CHECK(ruleError("scope = \"tenant+model\"\nwindow = \"day\"\nkeys = { \"x\" = \"1\" }\n") ==
        "t.toml: rules[0] (\"r\").keys: is not for scope tenant+model: use match to choose the model and limit for "
        "every tenant");
  CHECK(ruleError("scope = \"tenant+agent\"\nwindow = \"day\"\nkeys = { \"x\" = \"1\" }\n") ==
        "t.toml: rules[0] (\"r\").keys: is not for scope tenant+agent: use match to choose the agent and limit for "
        "every tenant");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nkeys = 5\n") == "t.toml: rules[0] (\"r\").keys: must be a table");
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nkeys = { \"\" = \"1\" }\n") ==
        "t.toml: rules[0] (\"r\").keys.\"\": a project_id must be 1 to 128 bytes");
  CHECK(ruleError("scope = \"run\"\nwindow = \"day\"\nkeys = { \"" + std::string(129, 'k') + "\" = \"1\" }\n")
            .find("a run_id must be 1 to 128 bytes") != std::string::npos);
  CHECK(ruleError("scope = \"agent\"\nwindow = \"day\"\nkeys = { \"a\\u0000\" = \"1\" }\n")
            .find("an agent_id must not hold NUL") != std::string::npos);
  CHECK(ruleError("scope = \"model\"\nwindow = \"day\"\nkeys = { \"gpt-4o\" = 0.5 }\n")
            .find("rules[0] (\"r\").keys.\"gpt-4o\": write money as a string") != std::string::npos);
  CHECK(ruleError("scope = \"tag\"\nwindow = \"day\"\nmetric = \"requests\"\nkeys = { \"batch\" = \"10\" }\n") ==
        "t.toml: rules[0] (\"r\").keys.\"batch\": must be a whole number of requests, such as 1000 (or \"unlimited\")");
}

TEST_CASE("config: a rule's host_only is true or false") {
  CHECK(ruleError("scope = \"tenant\"\nwindow = \"day\"\nhost_only = \"yes\"\n") ==
        "t.toml: rules[0] (\"r\").host_only: must be true or false");
  CHECK_FALSE(parseConfig("[[rules]]\nname = \"r\"\nscope = \"run\"\nwindow = \"day\"\n", "t").rules.at(0).host_only);
}

TEST_CASE("config: a rule as the admin API takes it (JSON) reads as the config file's, and round-trips") {
  const Config c = parseConfig(R"(
[[rules]]
name = "a"
scope = "tenant"
window = "month"
limit = "50.00"
keys = { acme = "100", beta = "unlimited" }
[[rules]]
name = "b"
scope = "model"
match = "gpt-4*"
window = "week"
week_start = "sunday"
metric = "tokens"
limit = 1000
host_only = true
[[rules]]
name = "c"
scope = "tenant+agent"
metric = "concurrency"
limit = 4
[[rules]]
name = "d"
scope = "run"
window = "all-time"
metric = "completion_tokens"
keys = { r1 = 7 }
[[rules]]
name = "e"
scope = "tenant"
window = "minute"
metric = "requests"
limit = 60
sliding = true
)", "t.toml");
  REQUIRE(c.rules.size() == 5);
  CHECK(c.rules[4].sliding);
  for (const RuleSpec& r : c.rules) {
    CAPTURE(r.name);
    const nlohmann::json j = ruleToJson(r);
    const RuleSpec back = ruleFromJson(r.name, j);
    CHECK(ruleToJson(back) == j);
    CHECK(back.scope == r.scope);
    CHECK(back.metric == r.metric);
    CHECK(back.window.kind == r.window.kind);
    CHECK(back.window.week_start == r.window.week_start);
    CHECK(back.match == r.match);
    CHECK(back.limit == r.limit);
    CHECK(back.keys == r.keys);
    CHECK(back.host_only == r.host_only);
    CHECK(back.sliding == r.sliding);
  }
  CHECK(ruleToJson(c.rules[0])["keys"] == nlohmann::json{{"acme", "100.000000"}, {"beta", nullptr}});
  // The same checks and messages as the file's, naming the field alone.
  auto problem = [](const char* name, const char* body) {
    try {
      (void)ruleFromJson(name, nlohmann::json::parse(body));
    } catch (const ConfigError& e) {
      return e.key() + ": " + e.problem();
    }
    return std::string("no error");
  };
  CHECK(problem("x", R"({"scope":"tenant"})") == "window: is missing: one of minute, hour, day, week, month, all-time");
  CHECK(problem("x", R"({"scope":"platform","match":"a","window":"day"})").starts_with("match: is not for scope platform"));
  CHECK(problem("x", R"({"scope":"tenant","window":"day","limit":1.5})").starts_with("limit: write money as a string"));
  CHECK(problem("x", R"({"scope":"tenant","window":"day","metric":"tokens","limit":"10"})").starts_with("limit: must be a whole number"));
  CHECK(problem("x", R"({"scope":"tenant","window":"day","limit":18446744073709551615})").starts_with("limit: "));
  CHECK(problem("x", R"({"scope":"tenant","window":"day","match":null})") == "no error");   // null: left out
  CHECK(problem("x", R"({"scope":"tenant","window":"day","limit":null})") == "no error");   // null: unlimited
  CHECK(problem("x", R"({"scope":["tenant"],"window":"day"})") == "scope: must be a string");
  CHECK(problem("x y", R"({"scope":"tenant","window":"day"})").starts_with("name: "));
  CHECK(problem("x", R"("tenant")").starts_with("body: must be a JSON object"));
  // A body nested as deep as it likes is refused by the checks, never recursed into.
  std::string deep = R"({"scope":"tenant","window":"day","keys":{"a":)";
  for (int i = 0; i < 100000; ++i) deep += R"({"a":)";
  deep += "1" + std::string(100000, '}') + "}}";
  CHECK(problem("x", deep.c_str()).starts_with("keys.\"a\": "));
  CHECK(problem("x", R"({"scope":{"a":{"b":1}},"window":"day"})") == "scope: must be a string");
  CHECK(problem("x", R"({"scope":"tenant","window":"day","sliding":true})") ==
        "sliding: is only for window = \"minute\" or \"hour\" (rates)");
}

TEST_CASE("agent: an unknown time zone in the config stops start-up with a message naming it") {
  TempDir dir;
  Config c = testConfig(dir, "badtz");
  c.timezone = "Nowhere/Special";
  RegionCleanup cleanup{c.shm_name};
  CHECK_THROWS_WITH_AS(Agent(c, {}), doctest::Contains("agent.timezone: unknown time zone 'Nowhere/Special'"),
                       AgentError);
}

TEST_CASE("agent: config limits, prices and kill switch reach the region, and removed ones are undone on restart") {
  TempDir dir;
  Config c = testConfig(dir, "apply");
  c.platform_daily_limit = NanoUsd::parse("50");
  c.tenant_limits["acme"] = NanoUsd::parse("1.25");
  c.prices["gpt-4o"] = Price{1, 1};
  c.prices["custom"] = Price{7, 7};
  c.kill_active = true;
  c.kill_reason = "config says stop";
  RegionCleanup cleanup{c.shm_name};
  {
    Agent agent(c, {});
    auto client = attachClient(c.shm_name);
    CHECK(client->platform().limit == NanoUsd::fromWholeUsd(50));
    CHECK(client->tenant("acme").limit == NanoUsd(1'250'000'000));
    CHECK(client->price("custom") == Price{7, 7});
    CHECK(client->killSwitch().reason == "config says stop");
    CHECK(client->check("acme", "gpt-4o").code == Code::kEmergencyKill);
  }
  c.tenant_limits.clear();
  c.prices.erase("custom");
  c.kill_active = false;
  Agent agent(c, {});
  CHECK(agent.adoptedRegion());
  auto client = attachClient(c.shm_name);
  CHECK_FALSE(client->tenant("acme").limit.has_value());
  CHECK(client->price("custom") == c.fallback_price);
  CHECK(client->check("acme", "gpt-4o").allowed());
}

TEST_CASE("config: [proxy] and its upstreams and keys are checked, each error naming its key") {
  const std::string up = "[[proxy.upstreams]]\nname = \"openai\"\nkind = \"openai\"\nbase_url = \"https://api.openai.com/v1/\"\n";
  const Config c = parseConfig("[proxy]\ndefault_tenant = \"shared\"\n" + up, "t.toml");
  REQUIRE(c.proxy.upstreams.size() == 1);
  const UpstreamConfig& u = c.proxy.upstreams[0];
  CHECK(u.url.tls);
  CHECK(u.url.host == "api.openai.com");
  CHECK(u.url.port == "443");
  CHECK(u.url.path == "/v1");   // the trailing slash dropped
  CHECK(u.provider == "openai");
  CHECK(u.model_prefix.empty());
  CHECK(parseConfig("[[proxy.upstreams]]\nname = \"l\"\nkind = \"ollama\"\nbase_url = \"http://[::1]:11434\"\n", "t")
            .proxy.upstreams[0].model_prefix == "ollama/");
  CHECK_FALSE(defaultConfig().proxy.enabled());

  CHECK(parseError(up + up) == "t.toml: proxy.upstreams[1].name: \"openai\" names another upstream already");
  CHECK(parseError("[[proxy.upstreams]]\nname = \"a/b\"\nkind = \"openai\"\nbase_url = \"http://x\"\n") ==
        "t.toml: proxy.upstreams[0].name: must be 1 to 64 letters, digits, '.', '_' or '-' (it is a path segment)");
  CHECK(parseError("[[proxy.upstreams]]\nname = \"a\"\nkind = \"gemini\"\nbase_url = \"http://x\"\n") ==
        "t.toml: proxy.upstreams[0].kind: must be openai, anthropic or ollama (the API the upstream speaks)");
  CHECK(parseError("[[proxy.upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"ftp://x\"\n") ==
        "t.toml: proxy.upstreams[0].base_url: must start with http:// or https://");
  CHECK(parseError("[[proxy.upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://user:pw@x\"\n") ==
        "t.toml: proxy.upstreams[0].base_url: must not hold credentials (use api_key_file)");
  CHECK(parseError("[[proxy.upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x:99999\"\n") ==
        "t.toml: proxy.upstreams[0].base_url: has a port that is not a number from 1 to 65535");
  CHECK(parseError(up + "api_key_file = \"/nonexistent/key\"\n") ==
        "t.toml: proxy.upstreams[0].api_key_file: cannot read /nonexistent/key");
  CHECK(parseError(up + "timeout = 5\n") ==
        "t.toml: proxy.upstreams[0].timeout: unknown key (check its spelling and section)");
  CHECK(parseError("[proxy]\nrequire_key = true\n") ==
        "t.toml: proxy.require_key: is true but no [[proxy.keys]] are configured");
  CHECK(parseError("[[proxy.keys]]\nsha256 = \"ABC\"\ntenant = \"acme\"\n") ==
        "t.toml: proxy.keys[0].sha256: must be 64 lowercase hex digits: printf %s \"$KEY\" | sha256sum");
  CHECK(parseError("[[proxy.keys]]\nsha256 = \"" + std::string(64, 'a') + "\"\n") ==
        "t.toml: proxy.keys[0].tenant: must be a project_id of 1 to 128 bytes");
  CHECK(parseError("[proxy]\ntenant_header = \"X Project\"\n") == "t.toml: proxy.tenant_header: must be an HTTP header name");
  CHECK(parseError("[proxy]\nchars_per_token = 0\n") == "t.toml: proxy.chars_per_token: must be a number from 0.5 to 100");
  CHECK(parseError("[proxy.model_chars_per_token]\n\"qwen*\" = \"3\"\n") ==
        "t.toml: proxy.model_chars_per_token.\"qwen*\": must be a number from 0.5 to 100");
}
