// The ledger ring's writers are judged by their client locks too: a stopped writer is never
// given up on while it lives, in any pid namespace.
#include "agent_support.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <random>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {

bool isStopped(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all;
  try {
    all.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } catch (const std::ios_base::failure&) {
    return false;   // it exited between the open and the read (ESRCH): libstdc++ throws even so
  }
  const auto p = all.rfind(')');
  return p != std::string::npos && p + 2 < all.size() && all[p + 2] == 'T';
}

struct Outcome {
  std::int64_t acked = 0;
  std::int64_t lost = 0;
};

}  // namespace

TEST_CASE("ledger: a writer in another pid namespace stopped between claiming a ring slot and publishing it is "
          "never given up on, and every record it was told was booked is written once") {
  LedgerFixture f;   // the writer gives up on a slot with no writer number after 200 ms
  constexpr int kRecords = 20'000;
  shm::Header& h = f.t.region->header();
  LedgerRing ring(h, f.t.region->ledger(), f.t.region->geometry().ledger_capacity);
  std::mt19937 rng(7);
  // One writer process, stopped at random moments until it is caught half-way or has finished
  // (a loaded machine can let it finish first: then another writer tries). Returns whether it
  // was caught; adds what it was told to `total`.
  Outcome total;
  auto round = [&]() -> bool {
    int out[2], pids[2];
    REQUIRE(::pipe(out) == 0);
    REQUIRE(::pipe(pids) == 0);
    const pid_t middle = ::fork();
    if (middle == 0) {
      if (::unshare(CLONE_NEWPID) != 0) ::_exit(10);
      const pid_t inner = ::fork();
      if (inner == 0) {
        std::unique_ptr<Client> c;
        if (!Client::attach({f.t.spec.shm_name}, &c).ok()) ::_exit(11);
        Outcome o;
        for (int i = 0; i < kRecords; ++i) {
          Decision d;
          // The ring may be full for a moment while the parent is not draining: retry.
          for (int tries = 0; tries < 100000; ++tries) {
            d = c->record({"app", "gpt-4o", "openai", {}, {}, 100, 10});
            if (d.code != Code::kLedgerFull) break;
            std::this_thread::sleep_for(std::chrono::microseconds(100));
          }
          if (d.allowed()) ++o.acked;
          if (d.code == Code::kLedgerLost) ++o.lost;
        }
        (void)::write(out[1], &o, sizeof o);
        ::_exit(0);
      }
      (void)::write(pids[1], &inner, sizeof inner);
      int st = 0;
      ::waitpid(inner, &st, 0);
      ::_exit(WIFEXITED(st) ? WEXITSTATUS(st) : 20);
    }
    ::close(out[1]);
    ::close(pids[1]);
    ::fcntl(out[0], F_SETFL, O_NONBLOCK);   // the ring is drained while waiting for the outcome
    pid_t inner = 0;
    REQUIRE(::read(pids[0], &inner, sizeof inner) == sizeof inner);

    bool caught = false;
    Outcome o;
    bool done = false;
    for (int attempt = 0; attempt < 5000 && !caught; ++attempt) {
      f.writer->drainOnce();
      // A writer that finished before it was caught half-way cannot be stopped any more (waiting
      // for it to stop took half a second per attempt, 40 minutes in all): the race was lost.
      if ((done = ::read(out[0], &o, sizeof o) == sizeof o)) break;
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
      ::kill(inner, SIGSTOP);
      for (int i = 0; i < 10000 && !isStopped(inner); ++i) std::this_thread::sleep_for(std::chrono::microseconds(50));
      const std::uint64_t tail = h.ledger_tail.load();
      // Half-way, and named: a writer stopped between taking its ticket and storing its client
      // number in the slot (two instructions) cannot be judged by its lock, and is given up on
      // after a timeout by design (docs/shm-format.md); that case is not this test's.
      caught = tail > 0 && ring.state(tail - 1) == LedgerRing::State::kWriting &&
               ring.at(tail - 1).writer_pid.load() != 0;
      if (caught) {
        // Well past the writer's abandon timeout, while it is stopped half-way.
        const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(600);
        while (std::chrono::steady_clock::now() < until) {
          f.writer->drainOnce();
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        CHECK(h.stats.ledger_abandoned.load() == 0);
      }
      ::kill(inner, SIGCONT);
    }
    for (int i = 0; i < 6000 && !done; ++i) {   // 60 s: a bound for correctness, not speed
      f.writer->drainOnce();
      done = ::read(out[0], &o, sizeof o) == sizeof o;
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    REQUIRE(done);
    int status = 0;
    ::waitpid(middle, &status, 0);
    ::close(out[0]);
    ::close(pids[0]);
    CHECK(o.lost == 0);
    CHECK(o.acked == kRecords);
    total.acked += o.acked;
    total.lost += o.lost;
    return caught;
  };
  bool caught = false;
  for (int writers = 0; writers < 20 && !caught; ++writers) caught = round();
  CHECK(caught);
  while (f.writer->drainOnce().any()) {
  }
  LedgerFilter filter;
  filter.project_id = "app";
  filter.limit = 1'000'000;
  CHECK(static_cast<std::int64_t>(f.ledger->list(filter).size()) == total.acked);
  CHECK(h.stats.ledger_abandoned.load() == 0);
}
