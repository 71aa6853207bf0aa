// The reaper returns the holds of dead and overdue reservations, exactly as much as each layer
// holds, and never more.
#include "support.h"

#include <csignal>
#include <sys/wait.h>
#include <unistd.h>

using namespace tokenfuse;
using tokenfuse::test::TestRegion;
using tokenfuse::test::usd;

namespace {

// A client number whose process has exited: a child that attached to the region, said which
// number it had claimed, and exited (the kernel dropped its lock).
std::uint32_t deadClient(const std::string& shm_name) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::unique_ptr<Region> r;
    std::uint32_t client = 0;
    if (Region::attach(shm_name, &r).ok()) client = r->client();
    (void)::write(fds[1], &client, sizeof client);
    ::_exit(0);
  }
  std::uint32_t client = 0;
  REQUIRE(::read(fds[0], &client, sizeof client) == sizeof client);
  ::waitpid(pid, nullptr, 0);
  ::close(fds[0]);
  ::close(fds[1]);
  REQUIRE(client != 0);
  return client;
}

struct Held {
  NanoUsd run, tenant, platform;
};
Held held(Client& c) { return {c.run("run-1").held, c.tenant("acme").held, c.platform().held}; }

// Rewrites a live reservation's slot as if a process that has died had left it in `state` after
// `progress` layers.
void fake(TestRegion& t, Reservation r, shm::ResState state, std::uint32_t progress) {
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(r.id)];
  s.word.store(shm::resWord(deadClient(t.spec.shm_name), shm::reservationGen(r.id), state, progress));
}

}  // namespace

TEST_CASE("reaper: a reservation past its deadline gives its hold back, and a late commit still books the cost") {
  TestRegion t;
  const std::int64_t now = test::nowNs();
  t.admin->setClock(now);
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 1000, 0, 1000}, &r).allowed());
  CHECK(t.admin->reap(now + 999'000'000).expired == 0);
  CHECK(t.admin->reap(now + 1'001'000'000).expired == 1);
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
  CHECK(t.client->platform().held == NanoUsd(0));
  CHECK(t.client->charge(r, 1, 1).code == Code::kReservationExpired);
  const Decision d = t.client->commit(r, "openai", 1000, 100);
  CHECK(d.allowed());
  CHECK(d.reservation_expired);
  CHECK(d.cost == usd("0.0065"));
  CHECK(t.client->tenant("acme").committed == usd("0.0065"));
  CHECK(t.client->run("run-1").committed == usd("0.0065"));
  CHECK(t.client->platform().committed == usd("0.0065"));
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
}

TEST_CASE("reaper: an expired reservation that is never settled is recycled after one more TTL") {
  TestRegion t;
  const std::int64_t now = test::nowNs();
  t.admin->setClock(now);
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 1000}, &r).allowed());
  const std::int64_t later = now + 2'000'000'000;
  CHECK(t.admin->reap(later).expired == 1);
  CHECK(t.admin->reap(later + 999'000'000).freed_expired == 0);
  CHECK(t.admin->reap(later + 1'001'000'000).freed_expired == 1);
  CHECK(t.client->commit(r, "openai", 1, 1).code == Code::kUnknownReservation);
  CHECK(t.client->info().live_reservations == 0);
}

TEST_CASE("reaper: a live owner's reservation within its deadline is left alone") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());
  CHECK_FALSE(t.admin->reap(test::nowNs()).any());
  CHECK(t.client->tenant("acme").held == usd("0.005"));
  CHECK(t.client->commit(r, "openai", 1000, 0).allowed());
}

TEST_CASE("crash: a process killed with SIGKILL while holding reservations gets its holds back") {
  TestRegion t;
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t child = ::fork();
  if (child == 0) {
    std::unique_ptr<Client> c;
    if (!Client::attach({t.spec.shm_name}, &c).ok()) ::_exit(1);
    Reservation r;
    for (int i = 0; i < 5; ++i) {
      if (!c->reserve({"acme", "gpt-4o", "run-1", {}, 1000, 0, 0}, &r).allowed()) ::_exit(2);
    }
    char ok = 'k';
    (void)::write(ready[1], &ok, 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);   // so that a child that dies early gives end-of-file, not a hang
  char ok = 0;
  REQUIRE_MESSAGE(::read(ready[0], &ok, 1) == 1, "the child process failed before it was ready");
  Held before = held(*t.client);
  CHECK(before.tenant == usd("0.025"));
  CHECK(before.run == usd("0.025"));
  CHECK(before.platform == usd("0.025"));

  ::kill(child, SIGKILL);
  // Wait for the death but leave the zombie: an exited process nobody has waited for is dead too.
  siginfo_t info{};
  REQUIRE(::waitid(P_PID, static_cast<id_t>(child), &info, WEXITED | WNOWAIT) == 0);
  const ReapStats stats = t.admin->reap(test::nowNs());
  ::waitpid(child, nullptr, 0);
  CHECK(stats.dead_owner == 5);
  const Held after = held(*t.client);
  CHECK(after.tenant == NanoUsd(0));
  CHECK(after.run == NanoUsd(0));
  CHECK(after.platform == NanoUsd(0));
  CHECK(t.client->info().live_reservations == 0);
  ::close(ready[0]);
}

TEST_CASE("crash: a reservation left half-way: the reaper returns what is certainly held, reconciliation the rest, "
          "and no layer gets back more than it held") {
  TestRegion t;
  const NanoUsd est = usd("0.005");
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 1000, 0, 0}, &r).allowed());
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(r.id)];
  shm::Counters& run = t.region->runs()[s.run.load()].c;
  shm::Counters& platform = t.region->header().platform;
  auto reconcileTwice = [&] {
    CHECK(t.admin->reconcileHolds().empty());   // a difference is corrected once two sweeps agree
    return t.admin->reconcileHolds().size();
  };

  SUBCASE("reserving, after two of three layers: run and tenant held, platform not yet") {
    platform.spend.add(-est.count(), 0);
    fake(t, r, shm::kResReserving, 0);
    CHECK(t.admin->reap(test::nowNs()).dead_owner == 1);
    const Held h = held(*t.client);
    CHECK(h.run == est);   // the slot cannot say how far it got: the reaper returns nothing
    CHECK(h.tenant == est);
    CHECK(h.platform == NanoUsd(0));
    CHECK(reconcileTwice() == 2);
  }
  SUBCASE("settling, after one layer: the run was settled, tenant and platform still held") {
    run.spend.add(-est.count(), 0);
    fake(t, r, shm::kResSettling, 0);
    CHECK(t.admin->reap(test::nowNs()).dead_owner == 1);
    const Held h = held(*t.client);
    CHECK(h.run == NanoUsd(0));   // not given back twice
    CHECK(h.tenant == est);
    CHECK(h.platform == est);
    CHECK(reconcileTwice() == 2);
  }
  SUBCASE("charging, after one layer: the run holds the grown amount, the others the old one") {
    s.charge_target.store(usd("0.008").count());
    run.spend.add(usd("0.003").count(), 0);   // the run layer grew
    fake(t, r, shm::kResCharging, 0);
    CHECK(t.admin->reap(test::nowNs()).dead_owner == 1);
    const Held h = held(*t.client);
    CHECK(h.run == usd("0.003"));   // the old hold came back; the growth is reconciliation's
    CHECK(h.tenant == NanoUsd(0));
    CHECK(h.platform == NanoUsd(0));
    CHECK(reconcileTwice() == 1);
  }
  SUBCASE("charging, every layer grown: the reaper returns the grown hold") {
    s.charge_target.store(usd("0.008").count());
    for (shm::Counters* c : {&run, &t.region->tenants()[s.tenant.load()].c, &platform}) {
      c->spend.add(usd("0.003").count(), 0);
    }
    fake(t, r, shm::kResCharging, shm::kChargeGrown);
    CHECK(t.admin->reap(test::nowNs()).dead_owner == 1);
    CHECK(reconcileTwice() == 0);
  }
  const Held h = held(*t.client);
  CHECK(h.run == NanoUsd(0));
  CHECK(h.tenant == NanoUsd(0));
  CHECK(h.platform == NanoUsd(0));
  CHECK(t.client->info().live_reservations == 0);
}

TEST_CASE("crash: a table key half-written by a dead process is cleared, and its slot is used again") {
  TestRegion t;
  const std::string key = "stuck-tenant";
  const std::uint64_t h = hashKey(key);
  shm::BudgetSlot& slot = t.region->tenants()[h & (t.spec.tenant_capacity - 1)];
  slot.k.word.store(shm::keyWord(static_cast<std::uint32_t>(h >> 32), shm::kKeyInit, deadClient(t.spec.shm_name)));

  CHECK(t.client->check(key, "gpt-4o").code == Code::kRegionBusy);
  CHECK(t.admin->reap(test::nowNs()).stuck_keys == 1);
  CHECK(t.client->record({key, "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  CHECK(t.client->tenant(key).committed == usd("0.005"));
  // The cleared slot was free again: the key went in it.
  CHECK(shm::keyState(slot.k.word.load()) == shm::kKeyReady);
  CHECK(keyOf(slot.k) == key);
}

namespace {
// A live child process attached to the region that waits until told to exit; its client number
// is certainly held meanwhile.
struct LiveChild {
  explicit LiveChild(const std::string& shm_name) {
    REQUIRE(::pipe(fds) == 0);
    int back[2];
    REQUIRE(::pipe(back) == 0);
    pid = ::fork();
    if (pid == 0) {
      std::unique_ptr<Region> r;
      std::uint32_t c = 0;
      if (Region::attach(shm_name, &r).ok()) c = r->client();
      (void)::write(back[1], &c, sizeof c);
      char x;
      (void)::read(fds[0], &x, 1);
      ::_exit(0);
    }
    REQUIRE(::read(back[0], &client, sizeof client) == sizeof client);
    ::close(back[0]);
    ::close(back[1]);
    REQUIRE(client != 0);
  }
  ~LiveChild() {
    (void)::write(fds[1], "x", 1);
    ::waitpid(pid, nullptr, 0);
    ::close(fds[0]);
    ::close(fds[1]);
  }
  int fds[2];
  pid_t pid;
  std::uint32_t client = 0;
};
}  // namespace

TEST_CASE("reaper: a slot a live process has just claimed is not judged by its previous owner's fields") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());
  REQUIRE(t.client->release(r).allowed());
  // Another live process claims the slot: the word names it, but the other fields are still the
  // previous reservation's, as between the claim and the owner's first stores.
  LiveChild child(t.spec.shm_name);
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(r.id)];
  const std::uint32_t gen = shm::resGen(s.word.load());
  s.word.store(shm::resWord(child.client, gen, shm::kResReserving, 0));
  CHECK_FALSE(t.admin->reap(test::nowNs()).any());
  CHECK(s.word.load() == shm::resWord(child.client, gen, shm::kResReserving, 0));
  s.word.store(shm::resWord(0, gen, shm::kResFree, 0));
}

TEST_CASE("reaper: a reservation charged by another process still belongs to its owner") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 1000, 0}, &r).allowed());
  const pid_t helper = ::fork();
  if (helper == 0) {
    std::unique_ptr<Client> c;
    ::_exit(Client::attach({t.spec.shm_name}, &c).ok() && c->charge(r, 10, 10).allowed() ? 0 : 1);
  }
  int status = 0;
  ::waitpid(helper, &status, 0);
  REQUIRE(WEXITSTATUS(status) == 0);
  CHECK(t.admin->reap(test::nowNs()).dead_owner == 0);   // the helper is gone, the owner is not
  CHECK(t.client->tenant("acme").held == usd("0.02"));
  CHECK(t.client->commit(r, "openai", 10, 10).allowed());
}

TEST_CASE("reaper: a half-finished reservation of a live client is never reaped, and one of a gone client at the "
          "next sweep, whatever its pid namespace") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 1000, 0, 0}, &r).allowed());
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(r.id)];
  const std::int64_t now = test::nowNs();
  {
    LiveChild child(t.spec.shm_name);
    s.word.store(shm::resWord(child.client, shm::reservationGen(r.id), shm::kResReserving, 0));   // all layers held
    CHECK_FALSE(t.admin->reap(now).any());
    CHECK_FALSE(t.admin->reap(now + 3600'000'000'000).any());   // an hour stopped: still its own
    for (int i = 0; i < 3; ++i) CHECK(t.admin->reconcileHolds().empty());   // and its holds stand
  }
  CHECK(t.admin->reap(now).dead_owner == 1);   // the child has exited: its lock is gone
  // How far it got is not known to the reaper; the layers' holds without a reservation are.
  CHECK(t.admin->reconcileHolds().empty());
  CHECK(t.admin->reconcileHolds().size() == 3);
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
  CHECK(t.client->run("run-1").held == NanoUsd(0));
  CHECK(t.client->platform().held == NanoUsd(0));
}

TEST_CASE("kill switch: an agent that died while writing the reason does not leave readers spinning") {
  TestRegion t;
  t.region->header().kill.seq.store(7);   // odd: a write that never finished
  t.admin->setKill("second try", test::nowNs(), 0);
  CHECK(t.region->header().kill.seq.load() % 2 == 0);
  CHECK(t.client->killSwitch().reason == "second try");
}

TEST_CASE("reservation ids: malformed ids are unknown, never a slot") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());
  CHECK(t.client->commit(Reservation{r.id | (std::uint64_t{1} << 60)}, "o", 1, 1).code == Code::kUnknownReservation);
  CHECK(t.client->release(r).allowed());
}

TEST_CASE("reaper: a table key half-written by a live client is never cleared, however long it takes, once the "
          "client is gone it is") {
  TestRegion t;
  const std::string key = "slow-tenant";
  const std::uint64_t h = hashKey(key);
  shm::BudgetSlot& slot = t.region->tenants()[h & (t.spec.tenant_capacity - 1)];
  const std::int64_t now = test::nowNs();
  {
    LiveChild child(t.spec.shm_name);   // stopped in a container, say
    slot.k.word.store(shm::keyWord(static_cast<std::uint32_t>(h >> 32), shm::kKeyInit, child.client));
    CHECK(t.admin->reap(now).stuck_keys == 0);
    CHECK(t.admin->reap(now + 3600'000'000'000).stuck_keys == 0);
    CHECK(shm::keyState(slot.k.word.load()) == shm::kKeyInit);
  }
  CHECK(t.admin->reap(now).stuck_keys == 1);
}
