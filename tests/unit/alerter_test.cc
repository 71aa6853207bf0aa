// Alert thresholds with an injected clock: which scope uses which thresholds, and what "once"
// means for a daily budget and for a run's lifelong one.
#include "agent_support.h"

#include "alerts.h"
#include "day_clock.h"

#include <SQLiteCpp/SQLiteCpp.h>

using namespace tokenfuse;
using namespace tokenfuse::test;

TEST_CASE("alerts: thresholds per scope and tenant, a tenant's fire again the next day, a run's once in its life") {
  TempDir dir;
  Config c = testConfig(dir, "alertscope");
  c.platform_daily_limit = usd("10");
  c.tenant_limits["acme"] = usd("1");
  c.tenant_limits["vip"] = usd("1");
  c.run_limits["run-1"] = usd("0.05");
  c.alerts.platform_pct = AlertsConfig::Thresholds{50};
  c.alerts.tenant_pct = AlertsConfig::Thresholds{90};
  c.alerts.tenant_pct_by_id["vip"] = {10, 100};
  c.alerts.run_pct = AlertsConfig::Thresholds{100};
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  auto fired = [&] {   // (day, scope, id, level) as alert_fired holds them
    SQLite::Database db(dir.path + "/ledger.db");
    SQLite::Statement q(db, "SELECT day, scope, scope_id, level_pct FROM alert_fired ORDER BY 1, 2, 3, 4");
    std::vector<std::string> out;
    while (q.executeStep()) {
      const int day = q.getColumn(0).getInt();
      out.push_back((day < 0 ? std::string("life") : DayClock::format(day)) + " " + q.getColumn(1).getString() + " " +
                    q.getColumn(2).getString() + " " + std::to_string(q.getColumn(3).getInt()));
    }
    return out;
  };
  {
    Agent agent(c, {false, clock.fn()});
    auto client = attachClient(c.shm_name);
    auto spend = [&](const char* tenant, const char* run, std::int64_t gpt4o_prompt_tokens) {   // $5 a million
      REQUIRE(client->record({tenant, "gpt-4o", "openai", run, {}, gpt4o_prompt_tokens, 0}).allowed());
      agent.tick();
    };
    spend("acme", "", 170'000);   // $0.85: below acme's only threshold, 90 %
    CHECK(fired().empty());
    spend("acme", "", 20'000);    // $0.95
    spend("vip", "", 30'000);     // $0.15: vip's 10 %, not yet its 100 %
    spend("other", "run-1", 12'000);   // $0.06 on a $0.05 run
    CHECK(fired() == std::vector<std::string>{"life run run-1 100", "2026-11-29 tenant acme 90",
                                              "2026-11-29 tenant vip 10"});
    spend("other", "", 800'000);  // $4: the platform at $5.16 of $10
    CHECK(agent.alerter().stats().fired == 4);

    clock.now = utc("2026-11-30T10:00:00Z");   // a new budget day
    agent.tick();
    spend("acme", "", 190'000);   // $0.95 again: a new day, a new alert
    spend("other", "run-1", 2'000);   // the run, still over its lifelong limit: nothing new
    CHECK(agent.alerter().stats().fired == 5);
  }
  Agent agent(c, {false, clock.fn()});   // a restart on the same day adds nothing
  agent.tick();
  CHECK(agent.alerter().stats().fired == 0);
  CHECK(fired() == std::vector<std::string>{"life run run-1 100", "2026-11-29 platform  50", "2026-11-29 tenant acme 90",
                                            "2026-11-29 tenant vip 10", "2026-11-30 tenant acme 90"});
}

TEST_CASE("alerts: a rule's thresholds fire once per key and window, again in the next window, never twice "
          "after a restart") {
  TempDir dir;
  Config c = testConfig(dir, "alertrules");
  RuleSpec rpm;
  rpm.name = "rpm-hour";
  rpm.scope = RuleScope::kTenant;
  rpm.metric = RuleMetric::kRequests;
  rpm.window.kind = WindowKind::kHour;
  rpm.limit = 10;
  RuleSpec in_flight;   // calls in flight are never spending: no alerts
  in_flight.name = "cap";
  in_flight.scope = RuleScope::kPlatform;
  in_flight.metric = RuleMetric::kConcurrency;
  in_flight.window.kind = WindowKind::kAllTime;
  in_flight.limit = 1;
  c.rules = {rpm, in_flight};
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  auto fired = [&] {
    SQLite::Database db(dir.path + "/ledger.db");
    SQLite::Statement q(db, "SELECT scope, scope_id, level_pct FROM alert_fired ORDER BY day, 1, 2, 3");
    std::vector<std::string> out;
    while (q.executeStep()) {
      out.push_back(q.getColumn(0).getString() + " " + q.getColumn(1).getString() + " " +
                    std::to_string(q.getColumn(2).getInt()));
    }
    return out;
  };
  {
    Agent agent(c, {false, clock.fn()});
    auto client = attachClient(c.shm_name);
    Reservation held;
    REQUIRE(client->reserve({"acme", "gpt-4o", {}, {}, 10, 0, 0}, &held).allowed());   // the cap, full
    auto calls = [&](const char* tenant, int n) {
      for (int i = 0; i < n; ++i) REQUIRE(client->record({tenant, "gpt-4o", "openai", {}, {}, 10, 0}).allowed());
      agent.tick();
    };
    calls("acme", 7);
    CHECK(fired().empty());
    calls("acme", 1);   // 8 of 10: 80 %
    calls("beta", 9);   // 90 %: its own counter, its own alert
    CHECK(fired() == std::vector<std::string>{"rule rpm-hour:acme 80", "rule rpm-hour:beta 80"});
    calls("acme", 2);   // 10 of 10: 95 and 100 at once
    CHECK(agent.alerter().stats().fired == 4);
    calls("acme", 3);   // past it: nothing new in this window
    CHECK(agent.alerter().stats().fired == 4);

    clock.now = utc("2026-11-29T11:00:01Z");   // the next hour: the count starts again
    agent.tick();
    calls("acme", 8);
    CHECK(agent.alerter().stats().fired == 5);
    REQUIRE(client->release(held).allowed());
  }
  Agent agent(c, {false, clock.fn()});   // a restart in the same hour adds nothing
  agent.tick();
  CHECK(agent.alerter().stats().fired == 0);
  CHECK(fired() == std::vector<std::string>{"rule rpm-hour:acme 80", "rule rpm-hour:acme 95", "rule rpm-hour:acme 100",
                                            "rule rpm-hour:beta 80", "rule rpm-hour:acme 80"});
}
