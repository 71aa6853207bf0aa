// The ledger's promise under fire: processes commit as fast as they can while the agent is
// SIGKILLed and restarted again and again. Afterwards every acknowledged entry is in SQLite
// exactly once, SQLite is intact, and the counters equal the ledger's sums.
#include "agent_process.h"

#include "day_clock.h"
#include "ledger.h"

#include <sys/wait.h>

#include <map>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {

struct Ack {
  std::uint64_t seq;
  std::int64_t cost;
  std::int32_t tenant;
};

constexpr int kTenants = 3;

// One application process: commits and records until `until`, retrying on back-pressure, and
// writes what was acknowledged to `fd`.
[[noreturn]] void application(const std::string& shm, int id, std::chrono::steady_clock::time_point until, int fd) {
  std::unique_ptr<Client> c;
  if (!Client::attach({shm}, &c).ok()) ::_exit(3);
  std::vector<Ack> acks;
  std::uint64_t full = 0;
  for (std::int64_t i = 0; std::chrono::steady_clock::now() < until; ++i) {
    const int tenant = static_cast<int>((i + id) % kTenants);
    const std::string project = "tenant-" + std::to_string(tenant);
    Decision d;
    if (i % 2 == 0) {
      Reservation r;
      if (!c->reserve({project, "gpt-4o-mini", "run-" + std::to_string(id), "app", 100 + i % 50, 10, 0}, &r).allowed()) {
        ::_exit(4);
      }
      do {
        d = c->commit(r, "openai", 100 + i % 50, i % 10);
      } while (d.code == Code::kLedgerFull && (++full, std::this_thread::sleep_for(std::chrono::milliseconds(1)), true));
    } else {
      do {
        d = c->record({project, "gpt-4o", "openai", {}, "app", 10 + i % 7, 1});
      } while (d.code == Code::kLedgerFull && (++full, std::this_thread::sleep_for(std::chrono::milliseconds(1)), true));
    }
    if (!d.allowed()) ::_exit(5);
    acks.push_back({d.ledger_seq, d.cost.count(), tenant});
  }
  const std::size_t n = acks.size();
  bool ok = ::write(fd, &n, sizeof n) == sizeof n;
  ok = ok && ::write(fd, acks.data(), n * sizeof(Ack)) == static_cast<ssize_t>(n * sizeof(Ack));
  ::_exit(ok ? 0 : 6);
}

std::vector<Ack> readAcks(int fd) {
  std::size_t n = 0;
  REQUIRE(::read(fd, &n, sizeof n) == sizeof n);
  std::vector<Ack> acks(n);
  std::size_t got = 0;
  auto* p = reinterpret_cast<char*>(acks.data());
  while (got < n * sizeof(Ack)) {
    const ssize_t r = ::read(fd, p + got, n * sizeof(Ack) - got);
    REQUIRE(r > 0);
    got += static_cast<std::size_t>(r);
  }
  return acks;
}

}  // namespace

TEST_CASE("ledger: SIGKILLing the agent again and again loses no acknowledged entry and writes none twice") {
  // A small ring, so that the applications also meet back-pressure while the agent is down.
  AgentFixture f("chaos", "ledger_capacity = 1024\n[ledger]\nflush_interval_ms = 5\n");
  auto agent = f.start();
  f.waitForRegion(agent->pid());

  constexpr int kApps = 3;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2500);
  std::vector<std::pair<pid_t, int>> apps;
  for (int i = 0; i < kApps; ++i) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      application(f.shm, i, until, fds[1]);
    }
    ::close(fds[1]);
    apps.emplace_back(pid, fds[0]);
  }

  int kills = 0;
  for (auto at : {400, 900, 1500, 2000}) {
    std::this_thread::sleep_until(until - std::chrono::milliseconds(2500) + std::chrono::milliseconds(at));
    agent->signal(SIGKILL);
    REQUIRE(agent->wait() == -SIGKILL);
    ++kills;
    agent = f.start();
    f.waitForRegion(agent->pid());
  }

  std::vector<Ack> acks;
  for (auto [pid, fd] : apps) {
    const std::vector<Ack> mine = readAcks(fd);
    acks.insert(acks.end(), mine.begin(), mine.end());
    ::close(fd);
    int status = 0;
    ::waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  agent->signal(SIGTERM);   // a clean stop writes what is left in the ring
  REQUIRE(agent->wait() == 0);
  MESSAGE(acks.size() << " entries acknowledged across " << kills << " agent SIGKILLs");
  REQUIRE(acks.size() > 1000);

  auto ledger = Ledger::openReadOnly(f.dir.path + "/state/ledger.db");
  CHECK(ledger->integrityCheck() == "ok");
  LedgerFilter all;
  all.limit = 10'000'000;
  const std::vector<LedgerEntry> rows = ledger->list(all);
  std::map<std::uint64_t, std::int64_t> cost_of;
  for (const LedgerEntry& e : rows) CHECK(cost_of.emplace(e.seq, e.cost_nano_usd).second);
  std::size_t missing = 0, wrong = 0;
  for (const Ack& a : acks) {
    const auto it = cost_of.find(a.seq);
    if (it == cost_of.end()) {
      ++missing;
    } else if (it->second != a.cost) {
      ++wrong;
    }
  }
  CHECK(missing == 0);
  CHECK(wrong == 0);
  CHECK(rows.size() == acks.size());   // nothing unacknowledged, nothing twice

  // The counters, kept by the applications in shared memory, equal the ledger's sums.
  auto client = attachClient(f.shm);
  const std::int32_t day = client->info().day;
  std::int64_t platform = 0;
  for (const LedgerTotal& t : ledger->tenantTotals(day)) {
    CHECK(client->tenant(t.id).committed.count() == t.cost_nano_usd);
    CHECK(client->tenant(t.id).calls == t.calls);
    platform += t.cost_nano_usd;
  }
  CHECK(client->platform().committed.count() == ledger->platformTotal(day).cost_nano_usd);
  CHECK(client->platform().committed.count() == platform);
  for (const LedgerTotal& r : ledger->runTotals()) CHECK(client->run(r.id).committed.count() == r.cost_nano_usd);

  // And when the region is lost (a reboot empties /dev/shm), the next agent rebuilds them.
  const BudgetView before = client->tenant("tenant-0");
  client.reset();
  Region::remove(f.shm);
  auto rebuilt = f.start();
  auto fresh = f.waitForRegion(rebuilt->pid());
  CHECK(fresh->tenant("tenant-0").committed == before.committed);
  CHECK(fresh->tenant("tenant-0").calls == before.calls);
  CHECK(fresh->platform().committed.count() == platform);
  for (const LedgerTotal& r : ledger->runTotals()) CHECK(fresh->run(r.id).committed.count() == r.cost_nano_usd);
  CHECK(f.log().find(R"("event":"counters_rebuilt")") != std::string::npos);
  // New entries continue the sequence.
  const Decision d = fresh->record({"tenant-0", "gpt-4o", "openai", {}, {}, 1, 0});
  CHECK(d.ledger_seq == rows.back().seq + 1);
}
