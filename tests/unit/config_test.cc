#include "agent_support.h"

#include "pricing.h"

#include <fstream>

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

TEST_CASE("config: the shipped packaging/tokenfuse.toml is valid and equals the defaults") {
  const Config c = loadConfig(TOKENFUSE_SOURCE_DIR "/packaging/tokenfuse.toml");
  const Config d = defaultConfig();
  CHECK(c.prices == d.prices);
  CHECK(c.tenant_capacity == d.tenant_capacity);
  CHECK(c.reservation_ttl_s == d.reservation_ttl_s);
  CHECK_FALSE(c.kill_active);
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
