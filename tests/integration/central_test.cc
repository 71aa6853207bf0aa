// The central link against real redis-server and postgres processes, with several real agents
// on this machine, each with its own region, data dir and host id.
#include "agent_process.h"
#include "central_support.h"

#include "day_clock.h"

#include <httplib.h>

#include <atomic>
#include <csignal>
#include <map>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {

struct FleetAgent : AgentFixture {
  FleetAgent(int i, const std::string& central_toml)
      : AgentFixture("fleet", central_toml, "host_id = \"host-" + std::to_string(i) + "\"\n") {
    restart();
  }
  void restart() {
    client.reset();
    agent = start();
    client = waitForRegion(agent->pid());
  }
  void waitDurable() {
    REQUIRE(eventually([&] {
      const RegionInfo i = client->info();
      return i.ledger_durable == i.ledger_appended;
    }));
  }
  std::unique_ptr<Ledger> ledger() { return Ledger::openReadOnly(dir.path + "/state/ledger.db"); }

  std::unique_ptr<Process> agent;
  std::unique_ptr<Client> client;
};

struct Fleet {
  Fleet(int n, const std::string& central_extra, bool with_redis = true, bool with_postgres = true) {
    std::string toml = "[central]\nsync_interval_ms = 100\nlimits_interval_ms = 200\n" + central_extra;
    if (with_redis) toml += "redis_url = \"" + redis.url() + "\"\n";
    if (with_postgres) toml += "postgres_url = \"" + postgres.url() + "\"\n";
    for (int i = 0; i < n; ++i) agents.push_back(std::make_unique<FleetAgent>(i, toml));
  }
  std::string day() { return DayClock::format(agents[0]->client->info().day); }
  std::string redisTotal(const std::string& field) {
    return redis.command({"HGET", "{tokenfuse:" + day() + "}:total", field});
  }
  // The sum of every host's ledger for today: per tenant, and "" for the platform.
  std::map<std::string, std::int64_t> ledgerTotals() {
    std::map<std::string, std::int64_t> out;
    for (auto& a : agents) {
      a->waitDurable();
      const std::int32_t d = a->client->info().day;
      auto l = a->ledger();
      for (const LedgerTotal& t : l->tenantTotals(d)) out[t.id] += t.cost_nano_usd;
      out[""] += l->platformTotal(d).cost_nano_usd;
    }
    return out;
  }
  std::int64_t ledgerRows() {
    std::int64_t n = 0;
    for (auto& a : agents) n += static_cast<std::int64_t>(a->ledger()->maxSeq());
    return n;
  }
  // Redis's fleet totals and Postgres's rows equal the hosts' ledgers, exactly, with no row twice.
  void checkCentralEqualsLedgers() {
    const auto expected = ledgerTotals();
    const std::int64_t rows = ledgerRows();
    CHECK_MESSAGE(eventually(
                      [&] {
                        for (const auto& [id, nano] : expected) {
                          if (redisTotal(id.empty() ? "p" : "t:" + id) != std::to_string(nano)) return false;
                        }
                        const auto r = postgres.query("SELECT count(*) FROM budget_ledger");
                        return r[0][0].as<std::int64_t>() == rows;
                      },
                      std::chrono::seconds(30)),
                  "central totals did not converge to the ledgers");
    for (const auto& [id, nano] : expected) {
      CAPTURE(id);
      CHECK(redisTotal(id.empty() ? "p" : "t:" + id) == std::to_string(nano));
    }
    const auto r = postgres.query(
        "SELECT count(*), count(DISTINCT (host_id, host_seq)), COALESCE(sum(cost_nano_usd), 0) FROM budget_ledger");
    CHECK(r[0][0].as<std::int64_t>() == rows);
    CHECK(r[0][1].as<std::int64_t>() == rows);
    CHECK(r[0][2].as<std::int64_t>() == expected.at(""));
    MESSAGE(rows << " ledger entries; platform total $" << NanoUsd(expected.at("")).toString());
  }

  RedisServer redis;
  PostgresServer postgres;
  std::vector<std::unique_ptr<FleetAgent>> agents;
};

// Each of `threads` per agent records gpt-4o calls for tenants t0..t4 until `stop`; counts refusals.
struct Load {
  Load(Fleet& f, int threads_per_agent) {
    for (auto& a : f.agents) {
      for (int t = 0; t < threads_per_agent; ++t) {
        threads.emplace_back([this, c = a->client.get(), t] {
          for (int i = 0; !stop.load(); ++i) {
            const std::string tenant = "t" + std::to_string((i + t) % 5);
            const Decision d = c->record({tenant, "gpt-4o", "openai", {}, {}, 1000 + i % 7, 10});
            if (d.code == Code::kLedgerFull) continue;   // back-pressure: nothing booked, retry
            (d.allowed() ? booked : refused)++;
            std::this_thread::sleep_for(std::chrono::microseconds(200));
          }
        });
      }
    }
  }
  void finish() {
    stop = true;
    for (auto& t : threads) t.join();
    threads.clear();
  }
  ~Load() { finish(); }
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> booked{0}, refused{0};
  std::vector<std::thread> threads;
};

}  // namespace

TEST_CASE("central: Redis killed under load and restarted empty: no call refused, totals rebuilt exactly") {
  Fleet f(3, "");
  f.postgres.query("INSERT INTO awooop_projects VALUES ('t0', 1000), ('t1', 1000), ('t2', NULL)");
  REQUIRE(eventually([&] { return f.agents[2]->client->tenant("t0").limit == NanoUsd::fromWholeUsd(1000); }));
  // A tenant that spends only before Redis is lost: nothing after the restart reminds Redis of it.
  REQUIRE(f.agents[1]->client->record({"quiet", "gpt-4o", "openai", {}, {}, 5000, 0}).allowed());
  REQUIRE(eventually([&] { return f.redisTotal("t:quiet") == "25000000"; }));
  Load load(f, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  f.redis.kill();   // no persistence: everything it held is gone
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  f.redis.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  load.finish();
  CHECK(load.refused == 0);
  CHECK(load.booked > 1000);
  f.checkCentralEqualsLedgers();
}
