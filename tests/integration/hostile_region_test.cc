// The region as a trust boundary: any member of the region's group can write any byte of it, or
// truncate it. Whatever it writes, no application and no agent crashes or hangs; the calls of the
// region that was damaged answer E-TOKENFUSE-REGION-CORRUPT. Real processes throughout: the
// process that suffers the damage is a forked child or a real tokenfused, and the test fails if it
// died of a signal or had not finished within a generous bound.
#include "agent_process.h"
#include "engine.h"

#include <httplib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <random>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {

// The code a damaged region answers with (Code::kRegionCorrupt), by number so that these tests
// also build against a library that does not know it yet.
constexpr auto kCorrupt = static_cast<Code>(107);

// Runs `fn` in a forked child. Returns its exit code, -signal if a signal killed it, or -1000 if
// it had not finished after `bound` (it is then killed).
int inChild(const std::function<int()>& fn, std::chrono::seconds bound = std::chrono::seconds(10)) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int rc = 99;
    try {
      rc = fn();
    } catch (...) {
    }
    ::_exit(rc);
  }
  const auto until = std::chrono::steady_clock::now() + bound;
  for (;;) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    if (std::chrono::steady_clock::now() >= until) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return -1000;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string shmPath(const std::string& name) { return "/dev/shm/" + name; }

shm::BudgetSlot& tenantSlot(Region& r, std::string_view id) {
  const KeyedTable<shm::BudgetSlot> t(r.tenants(), r.header().tenant_capacity);
  const Found f = t.find(id);
  REQUIRE(f.index >= 0);
  return t.at(f.index);
}

// Whether the process is still running (not exited, not killed).
bool alive(Process& p) { return p.wait(std::chrono::milliseconds(1)) == -1000; }

}  // namespace

TEST_CASE("hostile region: an odd kill-switch sequence never hangs a reader") {
  TestRegion t;
  t.admin->setKill("budget incident", nowNs(), 0);
  t.region->header().kill.seq.store(7);   // a writer that never finishes
  const int rc = inChild([&] {
    std::unique_ptr<Client> c;
    if (!Client::attach({t.spec.shm_name}, &c).ok()) return 1;
    const KillSwitchState k = c->killSwitch();
    if (!k.active) return 2;
    if (k.reason.find("unreadable") == std::string::npos) return 3;
    return c->check("acme", "gpt-4o").code == Code::kEmergencyKill ? 0 : 4;
  });
  CHECK(rc == 0);
}

TEST_CASE("hostile region: truncating the region file kills no attached app, its calls then answer REGION-CORRUPT") {
  for (const off_t size : {off_t{4096}, off_t{0}}) {
    CAPTURE(size);
    TestRegion t;
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    const pid_t app = ::fork();
    REQUIRE(app >= 0);
    if (app == 0) {
      ::close(ready[0]);
      std::unique_ptr<Client> c;
      if (!Client::attach({t.spec.shm_name}, &c).ok()) ::_exit(1);
      Reservation r;
      if (!c->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r).allowed()) ::_exit(2);
      (void)::write(ready[1], "r", 1);
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(8);
      while (std::chrono::steady_clock::now() < until) {
        if (c->check("acme", "gpt-4o").code != kCorrupt) continue;
        // Every call on the damaged region says so, none says OK.
        Reservation r2;
        if (c->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r2).code != kCorrupt) ::_exit(3);
        if (c->commit(r, "openai", 10, 10).code != kCorrupt) ::_exit(4);
        if (c->charge(r, 10, 10).code != kCorrupt) ::_exit(5);
        if (c->release(r).code != kCorrupt) ::_exit(6);
        if (c->record({"acme", "gpt-4o", "openai", {}, {}, 10, 10}).code != kCorrupt) ::_exit(7);
        CallSite site;
        if (c->prepare({"acme", "gpt-4o", {}, {}, 0, 0, 0}, &site).code != kCorrupt) ::_exit(8);
        (void)c->killSwitch();
        (void)c->tenant("acme");
        (void)c->info();
        ::_exit(0);
      }
      ::_exit(9);   // never noticed
    }
    ::close(ready[1]);
    char byte = 0;
    REQUIRE(::read(ready[0], &byte, 1) == 1);
    ::close(ready[0]);
    REQUIRE(::truncate(shmPath(t.spec.shm_name).c_str(), size) == 0);
    const int rc = waitBounded(app);
    CHECK(rc == 0);
    // The test process maps the region too (twice: as its owner and as a client): it survives as well.
    CHECK(t.client->check("acme", "gpt-4o").code == kCorrupt);
  }
}

TEST_CASE("hostile region: a wild tenant or run index in a reservation slot is followed by neither the engine nor the reaper") {
  TestRegion t;
  auto corrupt = [&](Reservation r, std::int32_t tenant, std::int32_t run) {
    shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(r.id)];
    s.tenant.store(tenant);
    s.run.store(run);
  };
  for (const auto& [tenant, run] : {std::pair{0x7fffffff, 3}, std::pair{-5, 0x40000000}, std::pair{256 * 1024, -7}}) {
    CAPTURE(tenant);
    CAPTURE(run);
    Reservation r1, r2, r3;
    REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r1).allowed());
    REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r2).allowed());
    REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r3).allowed());
    corrupt(r1, tenant, run);
    corrupt(r2, tenant, run);
    corrupt(r3, tenant, run);
    CHECK(inChild([&] {
            (void)t.client->charge(r1, 100, 1000);
            (void)t.client->commit(r1, "openai", 100, 100);
            (void)t.client->release(r2);
            return 0;
          }) == 0);
    // The reaper returns an overdue hold through the slot's indices, and counts the bad slot.
    CHECK(inChild([&] {
            const ReapStats st = t.admin->reap(nowNs() + std::int64_t{86'400} * 1'000'000'000);
            return st.corrupt >= 1 ? 0 : 2;
          }) == 0);
  }
  // A CallSite lives in the caller's memory: its indices are checked too.
  CallSite site;
  REQUIRE(t.client->prepare({"acme", "gpt-4o", "run-1", {}, 0, 0, 0}, &site).allowed());
  CallSiteAccess::set(&site, {0x7fffffff, -9, siteIndices(site).model});
  CHECK(inChild([&] {
          Reservation r;
          if (t.client->check(site, 100).allowed()) return 1;
          if (t.client->reserve(site, 100, 0, &r).allowed()) return 2;
          return 0;
        }) == 0);
}

TEST_CASE("hostile region: capacities and offsets rewritten in the header are never used") {
  TestRegion t(256);
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r).allowed());
  shm::Header& h = t.region->header();
  h.tenant_offset = std::uint64_t{1} << 40;
  h.run_offset = std::uint64_t{1} << 41;
  h.model_offset = std::uint64_t{1} << 42;
  h.reservation_offset = std::uint64_t{1} << 43;
  h.ledger_offset = std::uint64_t{1} << 44;
  h.tenant_capacity = h.run_capacity = h.model_capacity = h.reservation_capacity = 1u << 30;
  h.ledger_capacity = 1u << 30;
  CHECK(inChild([&] {
          if (!t.client->check("acme", "gpt-4o").allowed()) return 1;
          if (!t.client->commit(r, "openai", 10, 10).allowed()) return 2;
          if (!t.client->record({"acme", "gpt-4o", "openai", "run-1", {}, 10, 10}).allowed()) return 3;
          if (t.client->info().tenant_capacity != 256) return 4;
          (void)t.admin->reap(nowNs() + std::int64_t{86'400} * 1'000'000'000);
          int tenants = 0;
          t.admin->forEachTenant([&](std::string_view) { ++tenants; });
          if (tenants != 1) return 5;
          if (!t.admin->setLimit(LimitTable::kTenant, "beta", usd("1")).ok()) return 6;
          if (t.admin->models().empty()) return 7;
          t.admin->rollover(20'001);
          return 0;
        }) == 0);
}

TEST_CASE("hostile region: any key_len is safe for lookups and views") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("5")).ok());
  Reservation rb;
  REQUIRE(t.client->reserve({"beta", "gpt-4o", "run-1", {}, 100, 0, 0}, &rb).allowed());
  shm::BudgetSlot& acme = tenantSlot(*t.region, "acme");
  shm::BudgetSlot& beta = tenantSlot(*t.region, "beta");
  for (const std::uint32_t len : {100'000u, 0xffff'ffffu, 129u}) {
    CAPTURE(len);
    acme.k.key_len = len;
    beta.k.key_len = len;
    for (std::uint32_t i = 0; i < 64; ++i) t.region->models()[i].k.key_len = len;
    CHECK(inChild([&] {
            std::size_t bytes = 0;
            t.admin->forEachTenant([&](std::string_view id) { bytes += std::string(id).size(); });
            t.admin->forEachExplicit(LimitTable::kTenant,
                                     [&](std::string_view id, std::optional<NanoUsd>) { bytes += std::string(id).size(); });
            for (const std::string& m : t.admin->models()) bytes += m.size();
            (void)t.client->tenant("acme");
            (void)t.client->tenant(std::string(300, 'x'));
            (void)t.client->check("acme", "gpt-4o");
            return bytes <= 64 * 3 * shm::kKeyMax ? 0 : 1;
          }) == 0);
  }
}

// --- a real tokenfused -------------------------------------------------------------------------

namespace {

// The test's own writable mapping of the agent's region, as any group member can make one.
std::unique_ptr<Region> mapAsGroupMember(const std::string& shm) {
  std::unique_ptr<Region> r;
  const Status s = Region::attach(shm, &r);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return r;
}

// Stops the agent with SIGTERM, expects a clean exit, starts it again on the same region and data
// dir, and checks the new one publishes the region and stays up.
void restartWorks(AgentFixture& f, std::unique_ptr<Process>& agent) {
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
  agent = f.start();
  auto c = f.waitForRegion(agent->pid());
  CHECK(c->check("acme", "gpt-4o").allowed());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  CHECK_MESSAGE(alive(*agent), "the restarted agent died; its log:\n" << f.log());
}

}  // namespace

TEST_CASE("hostile region: tokenfused survives a wild tenant index in an overdue reservation, and restarts") {
  AgentFixture f("wildidx");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  auto mine = mapAsGroupMember(f.shm);
  for (const auto& [tenant, run] : {std::pair{0x7fffffff, 0x7fffffff}, std::pair{-77, 1 << 20}}) {
    Reservation r;
    REQUIRE(client->reserve({"acme", "gpt-4o", "run-1", {}, 100, 0, 0}, &r).allowed());
    shm::ReservationSlot& s = mine->reservations()[shm::reservationIndex(r.id)];
    s.tenant.store(tenant);
    s.run.store(run);
    s.deadline_unix_ns.store(1);   // overdue: the reaper takes it on its next tick
    // The platform layer is always there: its hold comes back. The layers the slot names out of
    // range are left alone (their holds stay counted until the counters are rebuilt).
    CHECK(eventually([&] { return client->platform().held == NanoUsd(0) || !alive(*agent); }));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    REQUIRE_MESSAGE(alive(*agent), "tokenfused died; its log:\n" << f.log());
  }
  CHECK(f.log().find(R"("event":"region_corrupt_reservation")") != std::string::npos);
  restartWorks(f, agent);
}

TEST_CASE("hostile region: tokenfused survives garbage in the tenant, run and reservation tables and a huge key_len, and restarts") {
  AgentFixture f("garbage", "[budgets.tenants]\nacme = \"5\"\nbeta = \"7\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record({"acme", "gpt-4o", "openai", "run-1", {}, 1000, 1000}).allowed());
  REQUIRE(client->record({"beta", "gpt-4o", "openai", "run-2", {}, 1000, 1000}).allowed());
  auto mine = mapAsGroupMember(f.shm);
  tenantSlot(*mine, "acme").k.key_len = 100'000;
  tenantSlot(*mine, "beta").k.key_len = 0x7fff'ffff;
  const int port = f.httpPort();
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(5);
  (void)http.Get("/metrics");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  REQUIRE_MESSAGE(alive(*agent), "tokenfused died after a bad key_len; its log:\n" << f.log());

  std::mt19937_64 rng(12);
  auto scribble = [&](void* p, std::size_t bytes) {
    auto* w = static_cast<std::uint64_t*>(p);
    for (std::size_t i = 0; i < bytes / 8; ++i) w[i] = rng();
  };
  const shm::Header& h = mine->header();
  scribble(mine->tenants(), std::size_t{h.tenant_capacity} * sizeof(shm::BudgetSlot));
  scribble(mine->runs(), std::size_t{h.run_capacity} * sizeof(shm::BudgetSlot));
  // Reservation words stay free-looking in half of the slots, so that the rest is read.
  for (std::uint32_t i = 0; i < h.reservation_capacity; ++i) {
    shm::ReservationSlot& s = mine->reservations()[i];
    scribble(&s, sizeof s);
    if (i % 2 == 0) s.deadline_unix_ns.store(1);
  }
  (void)http.Get("/metrics");
  (void)http.Get("/v1/tenants/acme");
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  REQUIRE_MESSAGE(alive(*agent), "tokenfused died after garbage in its tables; its log:\n" << f.log());
  client.reset();
  restartWorks(f, agent);
}

TEST_CASE("hostile region: truncating the region file kills neither tokenfused nor an app, the agent stops with region_damaged and a restart rebuilds from SQLite") {
#if defined(__SANITIZE_THREAD__)
  // The agent's SIGBUS handler maps zero pages over the truncated region while its other threads
  // go on reading it (by design: they read zeros, and the agent stops). ThreadSanitizer reports
  // that mmap as a write racing every such read, and often cannot restore its stack to suppress
  // it; the default and ASan builds run this test.
  MESSAGE("not under ThreadSanitizer: it cannot model an mmap made from a signal handler");
  return;
#endif
  for (const off_t size : {off_t{4096}, off_t{0}}) {
    CAPTURE(size);
    AgentFixture f("truncate");
    auto agent = f.start();
    {
      auto client = f.waitForRegion(agent->pid());
      const Decision d = client->record({"acme", "gpt-4o", "openai", "run-1", {}, 1000, 1000});
      REQUIRE(d.allowed());
      REQUIRE(client->waitDurable(d.ledger_seq, 10'000));
    }
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    const pid_t app = ::fork();
    REQUIRE(app >= 0);
    if (app == 0) {
      ::close(ready[0]);
      std::unique_ptr<Client> c;
      if (!Client::attach({f.shm}, &c).ok()) ::_exit(1);
      (void)::write(ready[1], "r", 1);
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(8);
      while (std::chrono::steady_clock::now() < until) {
        Reservation r;
        if (c->reserve({"acme", "gpt-4o", "run-1", {}, 10, 0, 0}, &r).code == kCorrupt) ::_exit(0);
        (void)c->release(r);
      }
      ::_exit(9);
    }
    ::close(ready[1]);
    char byte = 0;
    REQUIRE(::read(ready[0], &byte, 1) == 1);
    ::close(ready[0]);
    REQUIRE(::truncate(shmPath(f.shm).c_str(), size) == 0);

    const int app_rc = waitBounded(app);
    CHECK(app_rc == 0);
    // The agent notices on its next tick and stops with exit code 3 (systemd restarts it).
    CHECK_MESSAGE(agent->wait() == 3, "its log:\n" << f.log());
    CHECK(f.log().find(R"("event":"region_damaged")") != std::string::npos);
    agent = f.start();
    auto c = f.waitForRegion(agent->pid());
    CHECK(c->tenant("acme").committed == NanoUsd(20'000'000));   // 1000 x $5 + 1000 x $15 a million
    CHECK(c->check("acme", "gpt-4o").allowed());
    agent->signal(SIGTERM);
    CHECK(agent->wait() == 0);
  }
}

TEST_CASE("hostile region: removing the region file makes tokenfused write what apps had booked, stop with region_damaged, and restart on a new region") {
  AgentFixture f("removed");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  // Booked just before the name goes: still in the ring, which the stopping agent writes.
  for (int i = 0; i < 20; ++i) REQUIRE(client->record({"acme", "gpt-4o", "openai", "run-1", {}, 1000, 1000}).allowed());
  REQUIRE(::unlink(shmPath(f.shm).c_str()) == 0);
  CHECK_MESSAGE(agent->wait() == 3, "its log:\n" << f.log());
  CHECK(f.log().find(R"("event":"region_damaged")") != std::string::npos);
  CHECK(f.log().find("was removed") != std::string::npos);
  client.reset();
  agent = f.start();
  auto c = f.waitForRegion(agent->pid());
  CHECK(c->tenant("acme").committed == NanoUsd(20 * 20'000'000));
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
}
