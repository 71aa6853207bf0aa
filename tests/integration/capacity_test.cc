// The fixed, insert-only tenant and run tables when they are full, against a real tokenfused:
// start-up never fails for lack of table room, what did not fit is logged and exported, and a key
// with a limit that cannot be tracked is refused on every path instead of spending unchecked.
#include "agent_process.h"
#include "central_support.h"

#include <httplib.h>

#include <fstream>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

// Today's budget day in UTC (the fixture's agent runs in UTC).
std::int32_t todayUtc() { return static_cast<std::int32_t>(nowNs() / 1'000'000'000 / 86400); }

LedgerEntry entry(std::uint64_t seq, std::int32_t day, std::string project, std::string run, std::int64_t cost) {
  LedgerEntry e;
  e.seq = seq;
  e.unix_ns = nowNs();
  e.day = day;
  e.kind = "record";
  e.project_id = std::move(project);
  e.run_id = std::move(run);
  e.model = "gpt-4o";
  e.provider = "openai";
  e.prompt_tokens = 1;
  e.cost_nano_usd = cost;
  return e;
}

std::pair<int, json> post(int port, const std::string& path, const json& body) {
  httplib::Client c("127.0.0.1", port);
  c.set_connection_timeout(10);
  c.set_read_timeout(10);
  httplib::Result r = c.Post(path, body.dump(), "application/json");
  REQUIRE_MESSAGE(r, "no answer from the agent for POST " << path);
  return {r->status, r->body.empty() ? json(nullptr) : json::parse(r->body)};
}

std::string metrics(int port) {
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(10);
  httplib::Result r = c.Get("/metrics");
  REQUIRE(r);
  return r->body;
}

// The value of the first sample of `series` (name and labels, as printed) in a scrape, or -1.
double sampleOf(const std::string& scrape, const std::string& series) {
  const auto at = scrape.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(scrape.substr(at + series.size() + 2));
}

}  // namespace

TEST_CASE("capacity: an agent on a fresh region with more run ids in its ledger than the run table starts, "
          "keeps limited and recent runs, and logs and exports the ones it left out") {
  // run-0000 is the oldest run but has a limit: it must be kept. The 600 runs after it do not fit
  // in 256 slots; the most recent ones (and the limited tenant) must be kept first.
  AgentFixture f("cap-rebuild", "[budgets.tenants]\nlimited = \"1.00\"\n[budgets.runs]\n\"run-0000\" = \"0.50\"\n");
  const std::int32_t today = todayUtc();
  {
    std::filesystem::create_directories(f.dir.path + "/state");
    Ledger ledger(f.dir.path + "/state/ledger.db", "host-a");
    std::vector<LedgerEntry> entries;
    std::uint64_t seq = 0;
    entries.push_back(entry(++seq, today - 3, "bulk", "run-0000", 490'000'000));   // $0.49 of its $0.50
    for (int i = 1; i <= 600; ++i) {
      char run[32];
      std::snprintf(run, sizeof run, "run-%04d", i);
      entries.push_back(entry(++seq, today - 2, "bulk", run, 1000));
    }
    entries.push_back(entry(++seq, today, "limited", "run-recent", 990'000'000));   // $0.99 of its $1.00
    ledger.append(entries);
    // A limit saved through the admin API for an old run: it must be kept too.
    ledger.saveLimit({"run", "run-0001", 500'000, nowNs()});
  }

  auto agent = f.start({"--recreate-region"});
  auto client = f.waitForRegion(agent->pid());
  const std::string log = f.log();
  CHECK(log.find("run table is full") == std::string::npos);
  CHECK(log.find(R"("event":"capacity_exceeded")") != std::string::npos);
  CHECK(log.find(R"("table":"run")") != std::string::npos);

  // Limited keys were kept, with what they spent, and are enforced.
  CHECK(client->run("run-0000").tracked);
  CHECK(client->run("run-0000").committed == NanoUsd(490'000'000));
  CHECK(client->check("x", "gpt-4o", 4000, "run-0000").code == Code::kRunBudgetExhausted);
  CHECK(client->tenant("limited").committed == NanoUsd(990'000'000));
  CHECK(client->check("limited", "gpt-4o", 4000).code == Code::kTenantBudgetExhausted);
  CHECK(client->run("run-0001").tracked);
  CHECK(client->run("run-0001").limit == NanoUsd(500'000));
  CHECK(client->check("x", "gpt-4o", 4000, "run-0001").code == Code::kRunBudgetExhausted);
  // The most recent run was kept; the oldest unlimited one was left out.
  CHECK(client->run("run-recent").tracked);
  CHECK(client->run("run-0600").tracked);
  CHECK_FALSE(client->run("run-0002").tracked);

  const std::string m = metrics(f.httpPort());
  CHECK(sampleOf(m, R"(tokenfuse_capacity_left_out{table="run"})") > 0);
  CHECK(sampleOf(m, R"(tokenfuse_table_capacity{table="run"})") == 256);
  CHECK(sampleOf(m, R"(tokenfuse_table_entries{table="run"})") > 200);
  CHECK(sampleOf(m, R"(tokenfuse_table_entries{table="tenant"})") >= 1);
  CHECK(sampleOf(m, R"(tokenfuse_keys_reclaimed_total{table="run"})") == 0);   // two passes, a minute apart

  // And again on a later start: still no failure.
  agent->signal(SIGTERM);
  REQUIRE(agent->wait() == 0);
  Region::remove(f.shm);   // as after a reboot
  auto again = f.start();
  auto c2 = f.waitForRegion(again->pid());
  CHECK(c2->run("run-0000").committed == NanoUsd(490'000'000));
}

TEST_CASE("capacity: with the tenant table full, a new tenant with a $1.00 default limit is refused on check, "
          "reserve, record and HTTP, and never spends past its limit") {
  AgentFixture f("cap-full", "[budgets]\ntenant_default_daily_limit_usd = \"1.00\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  const int port = f.httpPort();
  for (int i = 0; i < 1000; ++i) {   // far more tenants than the table's 256 slots
    (void)client->record({"t" + std::to_string(i), "gpt-4o", "openai", {}, {}, 1, 0});
  }

  // check + record, the reference's pattern, for $2.00 worth of calls of $0.02 each.
  std::int64_t spent_allowed = 0;
  Decision first_check;
  Decision first_record;
  for (int i = 0; i < 100; ++i) {
    const Decision c = client->check("newcomer", "gpt-4o", 4000);
    if (i == 0) first_check = c;
    if (!c.allowed()) continue;
    const Decision r = client->record({"newcomer", "gpt-4o", "openai", {}, {}, 4000, 0});
    spent_allowed += r.cost.count();
  }
  CHECK(first_check.code == Code::kCapacityExhausted);
  CHECK(spent_allowed <= 1'000'000'000);

  // A prepared call site and a reservation: refused as well.
  CallSite site;
  CHECK(client->prepare({"newcomer", "gpt-4o", {}, {}, 4000, 0, 0}, &site).allowed());
  CHECK(client->check(site, 4000).code == Code::kCapacityExhausted);
  Reservation r;
  CHECK(client->reserve({"newcomer", "gpt-4o", {}, {}, 4000, 0, 0}, &r).code == Code::kCapacityExhausted);

  // record: the call has happened, so the entry is written, but the answer says it could not be
  // counted against the tenant's limit.
  first_record = client->record({"newcomer", "gpt-4o", "openai", {}, {}, 1000, 0});
  CHECK(first_record.code == Code::kCapacityExhausted);
  CHECK(first_record.ledger_seq > 0);
  CHECK(first_record.cost == NanoUsd(5'000'000));
  REQUIRE(client->waitDurable(first_record.ledger_seq, 10'000));
  {
    auto ledger = Ledger::openReadOnly(f.dir.path + "/state/ledger.db");
    LedgerFilter filter;
    filter.project_id = "newcomer";
    CHECK(ledger->list(filter).size() >= 1);
  }

  // HTTP: /v1/check refuses; /v1/usage books the entry (201) and says it was not counted.
  auto [cs, cb] = post(port, "/v1/check", {{"project_id", "newcomer"}, {"model", "gpt-4o"}});
  CHECK(cs == 503);
  CHECK(cb["allowed"] == false);
  CHECK(cb["error_code"] == "E-TOKENFUSE-CAPACITY");
  auto [us, ub] = post(port, "/v1/usage",
                       {{"project_id", "newcomer"}, {"model", "gpt-4o"}, {"provider", "openai"},
                        {"prompt_tokens", 1000}, {"completion_tokens", 0}});
  CHECK(us == 201);
  CHECK(ub["error_code"] == "E-TOKENFUSE-CAPACITY");
  CHECK(ub["ledger_seq"].get<std::uint64_t>() > first_record.ledger_seq);

  // Counted, and logged by the agent.
  CHECK(sampleOf(metrics(port), "tokenfuse_capacity_refused_total") > 0);
  CHECK(eventually([&] { return f.log().find(R"("event":"capacity_untracked_calls")") != std::string::npos; }));
}

TEST_CASE("capacity: a tenant without any limit in a full table is still allowed, counted in the platform only") {
  AgentFixture f("cap-unlimited");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  for (int i = 0; i < 1000; ++i) (void)client->record({"t" + std::to_string(i), "gpt-4o", "openai", {}, {}, 1, 0});
  const NanoUsd before = client->platform().committed;
  CHECK(client->check("newcomer", "gpt-4o", 4000).allowed());
  const Decision d = client->record({"newcomer", "gpt-4o", "openai", {}, {}, 1000, 0});
  CHECK(d.allowed());
  CHECK(client->platform().committed == before + NanoUsd(5'000'000));
  CHECK_FALSE(client->tenant("newcomer").tracked);
}

TEST_CASE("capacity: an agent adopting a full tenant table starts when the config adds a tenant limit, and "
          "refuses the tenants it cannot track") {
  AgentFixture f("cap-adopt");
  {
    auto agent = f.start();
    auto client = f.waitForRegion(agent->pid());
    for (int i = 0; i < 1000; ++i) (void)client->record({"t" + std::to_string(i), "gpt-4o", "openai", {}, {}, 1, 0});
    agent->signal(SIGTERM);
    REQUIRE(agent->wait() == 0);
  }
  std::ofstream(f.config_path, std::ios::app) << "[budgets.tenants]\nlate = \"1.00\"\n";
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  CHECK(f.log().find(R"("event":"capacity_exceeded")") != std::string::npos);
  // "late" has a limit the library cannot see (no entry): no tenant without an entry may spend.
  CHECK(client->check("late", "gpt-4o", 4000).code == Code::kCapacityExhausted);
  CHECK(client->check("another-newcomer", "gpt-4o", 4000).code == Code::kCapacityExhausted);
  CHECK(client->check("t0", "gpt-4o", 4000).allowed());   // a tracked tenant is not affected
}

TEST_CASE("capacity: a tenant limit from the central Postgres that finds no table room makes untracked tenants "
          "refused") {
  PostgresServer postgres;
  AgentFixture f("cap-central", "[central]\nlimits_interval_ms = 200\npostgres_url = \"" + postgres.url() + "\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  for (int i = 0; i < 1000; ++i) (void)client->record({"t" + std::to_string(i), "gpt-4o", "openai", {}, {}, 1, 0});
  REQUIRE(client->check("late", "gpt-4o", 4000).allowed());   // no limit anywhere yet
  // The agent creates awooop_projects once its link is up.
  REQUIRE(eventually([&] {
    try {
      postgres.query("INSERT INTO awooop_projects VALUES ('late', 1.00)");
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }));
  CHECK(eventually([&] { return client->check("late", "gpt-4o", 4000).code == Code::kCapacityExhausted; }));
  CHECK(client->check("t0", "gpt-4o", 4000).allowed());
  // Once the limit is gone, untracked tenants without a limit may spend again.
  postgres.query("DELETE FROM awooop_projects WHERE project_id = 'late'");
  CHECK(eventually([&] { return client->check("late", "gpt-4o", 4000).allowed(); }));
}

TEST_CASE("capacity: --check-config rejects region capacities larger than the machine can map (exit 2)") {
  TempDir dir;
  RegionCleanup cleanup{uniqueName("cap-huge")};   // should a start create it after all
  const std::string path = dir.path + "/tokenfuse.toml";
  std::ofstream(path) << "[agent]\ndata_dir = \"" << dir.path << "/state\"\nshm_name = \"" << cleanup.name
                      << "\"\n[region]\ntenant_capacity = 16777216\nrun_capacity = 16777216\n"
                         "reservation_capacity = 16777216\nledger_capacity = 16777216\nmodel_capacity = 16777216\n";
  // 16,777,216 x (320 + 320 + 256 + 1088 + 1024) bytes = 47 GiB: more than this machine has.
  const double region = 16777216.0 * (320 + 320 + 256 + 1088 + 1024);
  const double phys = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (phys >= region * 2) {
    MESSAGE("this machine has enough memory for the region; nothing to reject");
    return;
  }
  Process p({TOKENFUSED_PATH, "--config", path, "--check-config"}, dir.path + "/out.log");
  CHECK(p.wait() == 2);
  const std::string out = p.output();
  CHECK(out.find("region.tenant_capacity") != std::string::npos);
  CHECK(out.find("GiB") != std::string::npos);
  CHECK(out.find("/dev/shm") != std::string::npos);

  // Start-up says the same, before it creates anything.
  Process start({TOKENFUSED_PATH, "--config", path}, dir.path + "/start.log");
  CHECK(start.wait() == 2);
}
