// A clock stepped forward and later set back, with an injected clock: the budget day follows the
// clock back once it has stayed behind for a while, daily budgets keep resetting, and no spending
// is forgotten, also across a restart of the agent (adopting the region, or on a new one).
#include "agent_support.h"

#include "day_clock.h"

using namespace tokenfuse;
using namespace tokenfuse::test;
using std::chrono::seconds;

namespace {

std::string dayOf(const Client& c) { return DayClock::format(c.info().day); }

}  // namespace

TEST_CASE("rollover: a forward clock step later corrected never freezes the budget day, and forgets no spending") {
  TempDir dir;
  Config c = testConfig(dir, "clockstep");
  c.tenant_limits["acme"] = usd("0.03");
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 4000, 0}).allowed());   // $0.02 on the 29th

  clock.now = utc("2026-12-05T10:00:00Z");   // a bad step forward: the day rolls over early
  agent.tick();
  CHECK(dayOf(*client) == "2026-12-05");
  CHECK(client->tenant("acme").committed == NanoUsd(0));
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());   // $0.005, really on the 29th
  Reservation in_flight;
  REQUIRE(client->reserve({"acme", "gpt-4o-mini", {}, {}, 1000, 0, 0}, &in_flight).allowed());   // holds $0.00015

  const auto corrected = utc("2026-11-29T10:05:00Z");   // the clock is set right again
  clock.now = corrected;
  agent.tick();
  CHECK(dayOf(*client) == "2026-12-05");   // one reading behind is not yet a correction
  clock.now = corrected + seconds(30);
  agent.tick();
  CHECK(dayOf(*client) == "2026-12-05");
  clock.now = corrected + seconds(61);
  agent.tick();
  CHECK(dayOf(*client) == "2026-11-29");
  // Everything booked today counts again, whatever date the early rollover gave it.
  CHECK(client->tenant("acme").committed == usd("0.025"));
  CHECK(client->tenant("acme").held == NanoUsd(150'000));   // the hold is still held
  CHECK(client->platform().committed == usd("0.025"));
  CHECK(client->tenant("acme").calls == 2);
  CHECK(client->check("acme", "gpt-4o", 2000).code == Code::kTenantBudgetExhausted);   // $0.01 more: over $0.03
  CHECK(client->commit(in_flight, "openai", 1000, 0).allowed());
  CHECK(client->tenant("acme").committed == usd("0.02515"));

  // And the next midnight resets the budget as any other: the day is not frozen.
  clock.now = utc("2026-11-30T00:00:01Z");
  agent.tick();
  CHECK(dayOf(*client) == "2026-11-30");
  CHECK(client->tenant("acme").committed == NanoUsd(0));
  CHECK(client->check("acme", "gpt-4o", 4000).allowed());
}

TEST_CASE("rollover: after a restart the budget day does not stay in the future, whether the region is adopted or new") {
  TempDir dir;
  Config c = testConfig(dir, "clockrestart");
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  {
    Agent agent(c, {false, clock.fn()});
    auto client = attachClient(c.shm_name);
    REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 4000, 0}).allowed());   // $0.02
    clock.now = utc("2026-12-05T10:00:00Z");
    agent.tick();
    REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());   // $0.005 under 12-05
  }
  // Restarted with the clock set right: it adopts the region, whose day is the 5th.
  const auto corrected = utc("2026-11-29T10:10:00Z");
  clock.now = corrected;
  {
    Agent agent(c, {false, clock.fn()});
    auto client = attachClient(c.shm_name);
    agent.tick();
    clock.now = corrected + seconds(61);
    agent.tick();
    CHECK(dayOf(*client) == "2026-11-29");
    CHECK(client->tenant("acme").committed == usd("0.025"));
    CHECK(client->platform().committed == usd("0.025"));
  }
  // Started on a new region (a reboot): entries under the future date count for today too.
  Region::remove(c.shm_name);
  {
    Agent agent(c, {false, clock.fn()});
    auto client = attachClient(c.shm_name);
    CHECK(dayOf(*client) == "2026-11-29");
    CHECK(client->tenant("acme").committed == usd("0.025"));
    CHECK(client->platform().committed == usd("0.025"));
  }
}
