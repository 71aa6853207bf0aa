// Liveness without timeouts: the kernel tells the agent which client is gone (open-file-description
// locks on the region's object), in every pid namespace. A stopped client is never reaped while it
// lives, and a client that lost its slot gets an error instead of writing over it.
#include "support.h"

#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <random>
#include <thread>

using namespace tokenfuse;
using tokenfuse::test::TestRegion;
using tokenfuse::test::usd;

namespace {

constexpr std::int64_t kCharges = 200'000;

// Whether /proc says `pid` is stopped (state T).
bool stopped(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto p = all.rfind(')');
  return p != std::string::npos && p + 2 < all.size() && all[p + 2] == 'T';
}

bool inFlight(std::uint64_t w) {
  const shm::ResState st = shm::resState(w);
  return st == shm::kResReserving || st == shm::kResCharging || st == shm::kResSettling;
}

// A client in its own pid namespace (as in a container) that reserves, then charges one token at
// a time kCharges times, then commits. Returns the middle process; *inner is the client's pid as
// this process sees it and *id its reservation. The middle exits with the client's exit code.
pid_t startContainedCharger(const std::string& shm_name, pid_t* inner, std::uint64_t* id) {
  int fds[2], pids[2];   // the reservation id from the client; its pid from the middle process
  REQUIRE(::pipe(fds) == 0);
  REQUIRE(::pipe(pids) == 0);
  const pid_t middle = ::fork();
  REQUIRE(middle >= 0);
  if (middle == 0) {
    ::close(fds[0]);
    if (::unshare(CLONE_NEWPID) != 0) ::_exit(10);
    const pid_t in = ::fork();
    if (in == 0) {
      std::unique_ptr<Client> c;
      if (!Client::attach({shm_name}, &c).ok()) ::_exit(11);
      Reservation r;
      if (!c->reserve({"acme", "gpt-4o", "run-1", {}, 0, 0, 0}, &r).allowed()) ::_exit(12);
      (void)::write(fds[1], &r.id, sizeof r.id);
      for (std::int64_t i = 0; i < kCharges; ++i) {
        const Decision d = c->charge(r, 0, 1);
        if (d.code == Code::kStaleOwner) ::_exit(30);
        if (!d.allowed()) ::_exit(13);
      }
      const Decision d = c->commit(r, "openai", 0, kCharges);
      if (d.code == Code::kStaleOwner) ::_exit(30);
      ::_exit(d.allowed() ? 0 : 14);
    }
    (void)::write(pids[1], &in, sizeof in);
    int st = 0;
    ::waitpid(in, &st, 0);
    ::_exit(WIFEXITED(st) ? WEXITSTATUS(st) : 20);
  }
  ::close(fds[1]);
  ::close(pids[1]);
  REQUIRE(::read(pids[0], inner, sizeof *inner) == sizeof *inner);
  ::close(pids[0]);
  REQUIRE_MESSAGE(::read(fds[0], id, sizeof *id) == sizeof *id, "the contained client failed to reserve");
  ::close(fds[0]);
  return middle;
}

// Stops `pid` at a random moment until its reservation's word is half-way through an operation.
// Returns that word; the process stays stopped.
std::uint64_t stopMidWay(pid_t pid, shm::ReservationSlot& s) {
  std::mt19937 rng(42);
  for (int attempt = 0; attempt < 5000; ++attempt) {
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
    ::kill(pid, SIGSTOP);
    for (int i = 0; i < 10000 && !stopped(pid); ++i) std::this_thread::sleep_for(std::chrono::microseconds(50));
    const std::uint64_t w = s.word.load();
    if (inFlight(w)) return w;
    ::kill(pid, SIGCONT);
  }
  FAIL("never caught the client half-way through a charge");
  return 0;
}

int exitCode(pid_t pid) {
  int status = 0;
  for (int i = 0; i < 6000; ++i) {   // 60 s: a bound for correctness, not speed
    if (::waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  return -1000;
}

}  // namespace

TEST_CASE("liveness: a client in another pid namespace stopped half-way through a charge is never reaped, "
          "and when it resumes every layer's books are exact") {
  TestRegion t;
  const std::int64_t now = test::nowNs();
  t.admin->setClock(now);
  pid_t inner = 0;
  std::uint64_t id = 0;
  const pid_t middle = startContainedCharger(t.spec.shm_name, &inner, &id);
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(id)];
  const std::uint64_t w = stopMidWay(inner, s);

  // A minute of sweeps while it is stopped (deadlines are ten minutes away).
  for (std::int64_t sec = 0; sec <= 60; sec += 5) {
    CHECK(t.admin->reap(now + sec * 1'000'000'000).dead_owner == 0);
  }
  CHECK(s.word.load() == w);   // still its own, exactly as it left it
  ::kill(inner, SIGCONT);
  REQUIRE(exitCode(middle) == 0);

  const NanoUsd cost = usd("3");   // 200,000 completion tokens of gpt-4o at $15 a million
  for (const BudgetView& v : {t.client->run("run-1"), t.client->tenant("acme"), t.client->platform()}) {
    CHECK(v.held == NanoUsd(0));
    CHECK(v.committed == cost);
  }
  CHECK(t.region->header().platform.spend.used() == cost.count());
}

TEST_CASE("liveness: a stopped client whose slot was taken over gets E-TOKENFUSE-STALE when it resumes and "
          "never writes over the slot") {
  TestRegion t;
  pid_t inner = 0;
  std::uint64_t id = 0;
  const pid_t middle = startContainedCharger(t.spec.shm_name, &inner, &id);
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(id)];
  std::uint64_t w = stopMidWay(inner, s);
  // Someone takes the slot from under it, as a reaper that wrongly thought it dead would.
  const std::uint64_t taken = shm::resWord(0, shm::resGen(w), shm::kResSettling, shm::kLayerCount);
  REQUIRE(s.word.compare_exchange_strong(w, taken));
  ::kill(inner, SIGCONT);
  CHECK(exitCode(middle) == 30);   // E-TOKENFUSE-STALE, from the charge it was in
  CHECK(s.word.load() == taken);
  CHECK(std::string(errorCode(Code::kStaleOwner)) == "E-TOKENFUSE-STALE");
}

TEST_CASE("liveness: a child forked after attaching claims its own client number, so its death frees its "
          "reservations and never its parent's") {
  TestRegion t;
  Reservation mine;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &mine).allowed());
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t child = ::fork();
  if (child == 0) {
    Reservation r;   // through the Client it inherited, as a pre-forking server's worker would
    const bool ok = t.client->reserve({"acme", "gpt-4o", {}, {}, 2000, 0, 0}, &r).allowed();
    (void)::write(fds[1], &r.id, sizeof r.id);
    ::_exit(ok ? 0 : 1);   // dies holding it
  }
  std::uint64_t id = 0;
  REQUIRE(::read(fds[0], &id, sizeof id) == sizeof id);
  REQUIRE(exitCode(child) == 0);
  ::close(fds[0]);
  ::close(fds[1]);
  const std::uint32_t parent = t.region->reservations()[shm::reservationIndex(mine.id)].word.load() >> 32;
  const std::uint32_t orphan = t.region->reservations()[shm::reservationIndex(id)].word.load() >> 32;
  CHECK(parent != orphan);
  CHECK(t.admin->reap(test::nowNs()).dead_owner == 1);
  CHECK(t.client->tenant("acme").held == usd("0.005"));   // the parent's, still held
  CHECK(t.client->commit(mine, "openai", 1000, 0).allowed());
}
