// Budget days with an injected clock: calendar days in the configured zone, never a sliding TTL.
#include "agent_support.h"

#include "day_clock.h"

using namespace tokenfuse;
using namespace tokenfuse::test;
using std::chrono::hours;

TEST_CASE("day clock: in UTC a day is the UTC calendar date") {
  DayClock utc_days("UTC");
  CHECK(DayClock::format(utc_days.dayOf(utc("2026-11-29T00:00:00Z"))) == "2026-11-29");
  CHECK(DayClock::format(utc_days.dayOf(utc("2026-11-29T23:59:59Z"))) == "2026-11-29");
  CHECK(utc_days.dayOf(utc("2026-11-30T00:00:00Z")) == utc_days.dayOf(utc("2026-11-29T23:59:59Z")) + 1);
  CHECK(utc_days.startOf(utc_days.dayOf(utc("2026-11-29T13:00:00Z"))) == utc("2026-11-29T00:00:00Z"));
}

TEST_CASE("day clock: in another zone the day turns at local midnight") {
  DayClock ny("America/New_York");   // UTC-5 in November
  CHECK(DayClock::format(ny.dayOf(utc("2026-11-29T04:59:59Z"))) == "2026-11-28");
  CHECK(DayClock::format(ny.dayOf(utc("2026-11-29T05:00:00Z"))) == "2026-11-29");
  CHECK(ny.startOf(ny.dayOf(utc("2026-11-29T12:00:00Z"))) == utc("2026-11-29T05:00:00Z"));
}

TEST_CASE("day clock: daylight-saving days last 23 and 25 hours") {
  DayClock ny("America/New_York");
  const std::int32_t spring = ny.dayOf(utc("2026-03-08T12:00:00Z"));
  const std::int32_t autumn = ny.dayOf(utc("2026-11-01T12:00:00Z"));
  CHECK(ny.startOf(spring + 1) - ny.startOf(spring) == hours(23));
  CHECK(ny.startOf(autumn + 1) - ny.startOf(autumn) == hours(25));
}

TEST_CASE("day clock: a zone whose midnight is skipped still has a start of day") {
  // Chile moved its clocks forward at 00:00 local on 2026-09-06: that midnight never happened.
  DayClock santiago("America/Santiago");
  const std::int32_t day = santiago.dayOf(utc("2026-09-06T12:00:00Z"));
  const auto start = santiago.startOf(day);
  CHECK(santiago.dayOf(start) == day);
  CHECK(santiago.dayOf(start - std::chrono::seconds(1)) == day - 1);
}

TEST_CASE("day clock: an unknown zone is refused by name") {
  CHECK_THROWS_WITH_AS(DayClock("Mars/Olympus_Mons"), doctest::Contains("unknown time zone 'Mars/Olympus_Mons'"),
                       std::invalid_argument);
}

TEST_CASE("rollover: the daily budget resets at the zone's midnight without a restart, holds stay held") {
  TempDir dir;
  Config c = testConfig(dir, "rollover");
  c.timezone = "Asia/Tokyo";   // UTC+9: local midnight is 15:00 UTC
  c.tenant_limits["acme"] = NanoUsd::parse("0.03");
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T14:59:00Z")};
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);

  // An active tenant spends all day: the reference's sliding TTL would never reset it.
  Reservation in_flight;
  REQUIRE(client->reserve({"acme", "gpt-4o-mini", {}, {}, 1000, 0, 0}, &in_flight).allowed());   // $0.00015
  client->record({"acme", "gpt-4o", "openai", "run-1", {}, 3000, 1000});   // $0.03
  CHECK(client->check("acme", "gpt-4o", 1000).code == Code::kTenantBudgetExhausted);

  clock.now = utc("2026-11-29T14:59:59Z");
  agent.tick();
  CHECK(client->check("acme", "gpt-4o", 1000).code == Code::kTenantBudgetExhausted);

  clock.now = utc("2026-11-29T15:00:00Z");   // midnight in Tokyo
  agent.tick();
  CHECK(client->check("acme", "gpt-4o", 1000).allowed());
  const BudgetView v = client->tenant("acme");
  CHECK(v.committed == NanoUsd(0));
  CHECK(v.held == NanoUsd(150'000));                    // the in-flight call keeps its hold
  CHECK(DayClock::format(v.day) == "2026-11-30");
  CHECK(client->platform().committed == NanoUsd(0));
  CHECK(client->run("run-1").committed == *NanoUsd::parse("0.03"));   // a run's budget is for its life
  CHECK(client->commit(in_flight, "openai", 1000, 0).cost == NanoUsd(150'000));
  CHECK(client->tenant("acme").committed == NanoUsd(150'000));   // booked on the new day
}

TEST_CASE("rollover: a clock that steps back never rolls the day back") {
  TempDir dir;
  Config c = testConfig(dir, "clockback");
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);
  client->record({"acme", "gpt-4o", "openai", {}, {}, 1000, 0});
  clock.now = utc("2026-11-28T23:00:00Z");
  agent.tick();
  CHECK(DayClock::format(client->info().day) == "2026-11-29");
  CHECK(client->tenant("acme").committed == *NanoUsd::parse("0.005"));
}
