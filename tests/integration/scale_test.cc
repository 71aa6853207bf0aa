// A busy host over several simulated days (issue 14, "keys never run out"): a million distinct
// run ids and a hundred thousand tenants booked through the library into a region whose tables
// hold a small fraction of them, with an agent restart on a new region half-way. The agent
// reclaims what nothing needs; every limit still holds at the end.
#include "agent_support.h"

#include <bit>

using namespace tokenfuse;
using namespace tokenfuse::test;
using tokenfuse::test::usd;

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int kScale = 25;   // the sanitizer builds (unoptimised, instrumented) book a 25th
#else
constexpr int kScale = 1;
#endif

constexpr int kDays = 8;
constexpr int kBlocksPerDay = 8;                       // every 3 hours
constexpr int kRuns = 1'000'000 / kScale;              // one call each ($0.005)
constexpr int kTenants = 100'000 / kScale;             // kTenants / kDays a day, 10 calls each
constexpr int kRunsPerBlock = kRuns / (kDays * kBlocksPerDay);
constexpr int kTenantsPerDay = kTenants / kDays;
static_assert(kRunsPerBlock * kBlocksPerDay == kTenantsPerDay * 10 && kRunsPerBlock * kDays * kBlocksPerDay == kRuns);
// Tables sized for the keys live at once, twice over (a key lives within 64 slots of its home):
// a day's tenants, and two blocks' runs (a block's runs are idle past their lifetime by the next).
constexpr std::uint32_t kTenantCapacity = std::bit_ceil(2u * kTenantsPerDay);
constexpr std::uint32_t kRunCapacity = std::bit_ceil(8u * kRunsPerBlock);

std::string runId(int i) { return "run-" + std::to_string(i); }
std::string tenantId(int day, int j) { return "tenant-" + std::to_string(day * kTenantsPerDay + j); }

struct Host {
  explicit Host(const char* start) : clock{utc(start)} {
    config = testConfig(dir, "scale");
    config.tenant_capacity = kTenantCapacity;   // a third of the tenants
    config.run_capacity = kRunCapacity;         // an eighth of the runs
    config.rule_capacity = 1024;
    config.ledger_capacity = 65536;
    config.reclaim_interval_s = 60;
    config.run_idle_lifetime_s = 3600;
    config.tenant_default_daily_limit = usd("0.05");   // what each tenant books a day: ends at its limit
    config.run_default_limit = usd("0.008");           // above one call, below two
    cleanup.name = config.shm_name;
    start_agent();
  }
  void start_agent() {
    agent = std::make_unique<Agent>(config, Agent::Options{false, clock.fn()});
    client = attachClient(config.shm_name);
  }
  // Time passes until `next`: the agent ticks (rollover, reclaim) at the 3-hour boundary before
  // it and a reclaim interval later, so that what became idle by then goes.
  void advanceTo(std::chrono::system_clock::time_point next) {
    agent->drainLedger();
    clock.now = next - std::chrono::minutes(3);
    agent->tick();
    clock.now += std::chrono::seconds(61);
    agent->tick();
    clock.now = next;
    agent->tick();
  }

  TempDir dir;
  FakeClock clock;
  Config config;
  RegionCleanup cleanup;
  std::unique_ptr<Agent> agent;
  std::unique_ptr<Client> client;
};

}  // namespace

TEST_CASE("scale: a million run ids and a hundred thousand tenants over eight days in a region that holds a "
          "fraction of them: no call refused for capacity, every limit kept, through a restart on a new region") {
  Host h("2026-03-02T00:03:00Z");   // each block of calls starts 3 minutes after a 3-hour boundary
  const auto first_block = h.clock.now;
  int run = 0;
  std::uint64_t refused = 0, not_at_limit = 0;
  for (int day = 0; day < kDays; ++day) {
    for (int block = 0; block < kBlocksPerDay; ++block) {
      const int first_run = run;
      for (int j = 0; j < kRunsPerBlock; ++j, ++run) {
        const std::string r = runId(run), t = tenantId(day, (block * kRunsPerBlock + j) % kTenantsPerDay);
        Decision d;
        if (run % 10 == 0) {   // some through a reservation, most as a record
          Reservation res;
          d = h.client->reserve({t, "gpt-4o", r, {}, 1000, 0, 0}, &res);
          if (d.allowed()) d = h.client->commit(res, "openai", 1000, 0);
        } else {
          d = h.client->record({t, "gpt-4o", "openai", r, {}, 1000, 0});
        }
        if (!d.allowed() && refused++ < 5) MESSAGE(r << " for " << t << ": " << std::string(errorCode(d.code)));
      }
      if (day == kDays / 2 && block == kBlocksPerDay / 2) {
        // Mid-day, a restart on a new region (a reboot wiped /dev/shm): today's tenants and the
        // runs active within their lifetime come back from the ledger, with their limits.
        h.agent->drainLedger();
        std::vector<std::pair<std::string, NanoUsd>> before;
        for (int j = 0; j < kTenantsPerDay; j += 97) before.emplace_back(tenantId(day, j), h.client->tenant(tenantId(day, j)).committed);
        h.client.reset();
        h.agent.reset();
        Region::remove(h.config.shm_name);
        h.start_agent();
        CHECK_FALSE(h.agent->adoptedRegion());
        for (const auto& [id, committed] : before) {
          CAPTURE(id);
          CHECK(h.client->tenant(id).committed == committed);
          CHECK(h.client->tenant(id).limit == usd("0.05"));
        }
        for (int i = first_run; i < run; i += 101) {
          CAPTURE(i);
          CHECK(h.client->run(runId(i)).committed == usd("0.005"));
          CHECK(h.client->run(runId(i)).limit == usd("0.008"));
        }
      }
      if (block == kBlocksPerDay - 1) {
        // The day's last hours: every tenant of the day is at its limit, and refused.
        for (int j = 0; j < kTenantsPerDay; ++j) {
          if (h.client->check(tenantId(day, j), "gpt-4o", 1).code != Code::kTenantBudgetExhausted) ++not_at_limit;
        }
      }
      h.advanceTo(first_block + std::chrono::hours(3) * (day * kBlocksPerDay + block + 1));
    }
  }
  CHECK(refused == 0);
  CHECK(not_at_limit == 0);

  // Runs of every day return. Their entries were reclaimed long ago; once the agent has their
  // new call, their earlier spending is back, and their limit refuses a third call.
  constexpr int kReturning = 1000;
  for (int i = 0; i < kReturning; ++i) {
    REQUIRE(h.client->record({"returning", "gpt-4o", "openai", runId(i * (kRuns / kReturning)), {}, 1000, 0}).allowed());
  }
  h.agent->drainLedger();
  int short_totals = 0, allowed = 0;
  for (int i = 0; i < kReturning; ++i) {
    const std::string r = runId(i * (kRuns / kReturning));
    if (h.client->run(r).committed != usd("0.01")) ++short_totals;
    if (const Decision d = h.client->check("returning-check", "gpt-4o", 1, r); d.code != Code::kRunBudgetExhausted) {
      if (allowed++ < 3) MESSAGE(r << ": " << std::string(errorCode(d.code)) << " committed " << h.client->run(r).committed.toString());
    }
  }
  CHECK(short_totals == 0);
  CHECK(allowed == 0);

  const RegionAdmin& a = h.agent->admin();
  MESSAGE(kRuns << " runs and " << kTenants << " tenants booked; since the restart the agent reclaimed "
                << a.reclaimed(LimitTable::kRun) << " run and " << a.reclaimed(LimitTable::kTenant) << " tenant entries");
  CHECK(static_cast<std::int64_t>(a.reclaimed(LimitTable::kRun)) >= std::int64_t{kRuns} / 2 - kRunCapacity);
  CHECK(a.reclaimed(LimitTable::kTenant) >= static_cast<std::uint64_t>(kTenantsPerDay * (kDays / 2 - 1)));
}

