// Real processes and real threads racing on one region: the budget property must hold exactly.
#include "support.h"

#include "region_admin.h"
#include "rule_match.h"

#include <map>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <random>
#include <thread>
#include <vector>

using namespace tokenfuse;
using tokenfuse::test::TestRegion;
using tokenfuse::test::usd;

namespace {

constexpr int kTenants = 4;
constexpr int kRuns = 8;

// What one child process booked, sent back to the parent through a pipe.
struct Booked {
  std::int64_t tenant[kTenants] = {};
  std::int64_t run[kRuns] = {};
  std::int64_t total = 0;
  std::int64_t reserved = 0;
  std::int64_t denied = 0;
  std::int64_t stopped_streams = 0;
  std::int64_t failures = 0;   // anything that should never happen
  std::int32_t failure = 0;    // the last of them: 1000 x the step (1 reserve, 2 release, 3 charge, 4 commit) + its code
};

// Memory shared by parent and children, for a start barrier.
struct Shared {
  std::atomic<int> waiting{0};
  std::atomic<int> go{0};
};

Shared* sharedPage() {
  void* p = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(p != MAP_FAILED);
  return new (p) Shared{};
}

// Children that cannot attach exit before the barrier; the parent then stops waiting.
bool allWaiting(Shared* s, int n) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (s->waiting.load() < n) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

void awaitStart(Shared* s) {
  s->waiting.fetch_add(1);
  while (s->go.load() == 0) std::this_thread::yield();
}

// Forks `processes` children attached to `shm_name`, each running `threads` threads of
// work(client, seed, &total, &mu) from the start barrier on; calls forked() (the parent may start
// threads only then: a fork after threads exist is unsafe, and ThreadSanitizer refuses it),
// releases them together and returns the sum of what each child sent back (add(sum, one) adds
// one child's Result to the sum).
template <typename Result, typename Work, typename Add, typename Forked>
Result raceChildren(const std::string& shm_name, int processes, int threads, Work work, Add add, Forked forked) {
  Shared* shared = sharedPage();
  std::vector<std::pair<pid_t, int>> children;
  for (int p = 0; p < processes; ++p) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      std::unique_ptr<Client> c;
      if (!Client::attach({shm_name}, &c).ok()) ::_exit(3);
      Result total;
      std::mutex mu;
      std::vector<std::thread> pool;
      for (int i = 0; i < threads; ++i) {
        pool.emplace_back([&, i] {
          awaitStart(shared);
          work(*c, p * 100 + i, &total, &mu);
        });
      }
      for (auto& th : pool) th.join();
      const bool sent = ::write(fds[1], &total, sizeof total) == static_cast<ssize_t>(sizeof total);
      ::_exit(sent ? 0 : 4);
    }
    ::close(fds[1]);
    children.emplace_back(pid, fds[0]);
  }
  forked();
  CHECK(allWaiting(shared, processes * threads));
  shared->go.store(1);
  Result sum;
  for (auto [pid, fd] : children) {
    Result one;
    CHECK(::read(fd, &one, sizeof one) == static_cast<ssize_t>(sizeof one));
    ::close(fd);
    int status = 0;
    ::waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    add(sum, one);
  }
  ::munmap(shared, sizeof(Shared));
  return sum;
}

// One thread's work: reserve, then commit at most the estimate, stream in chunks, or release.
void worker(Client& c, int seed, int iterations, Booked* out, std::mutex* mu) {
  std::mt19937 rng(static_cast<unsigned>(seed));
  Booked mine;
  for (int i = 0; i < iterations; ++i) {
    const int tenant = static_cast<int>(rng() % kTenants);
    const int run = static_cast<int>(rng() % kRuns);
    const std::string project = "tenant-" + std::to_string(tenant);
    const std::string run_id = "run-" + std::to_string(run);
    const std::int64_t prompt = 100 + rng() % 2000;
    const std::int64_t completion = rng() % 1000;
    Reservation r;
    const Decision d = c.reserve({project, "gpt-4o", run_id, "w", prompt, completion, 0}, &r);
    if (!d.allowed()) {
      mine.denied += 1;
      if (d.code != Code::kRunBudgetExhausted && d.code != Code::kTenantBudgetExhausted &&
          d.code != Code::kPlatformBudgetExhausted) {
        mine.failures += 1;
        mine.failure = 1000 + static_cast<std::int32_t>(d.code);
      }
      continue;
    }
    mine.reserved += 1;
    std::int64_t booked = 0;
    switch (rng() % 4) {
      case 0: {   // release: nothing booked
        if (const Decision k = c.release(r); !k.allowed()) {
          mine.failures += 1;
          mine.failure = 2000 + static_cast<std::int32_t>(k.code);
        }
        continue;
      }
      case 1: {   // stream: charge the prompt, then chunks until done or stopped; commit what was charged
        std::int64_t got = 0;
        if (const Decision k = c.charge(r, prompt, 0); !k.allowed()) {   // within the hold by construction
          mine.failures += 1;
          mine.failure = 3000 + static_cast<std::int32_t>(k.code);
        }
        const std::int64_t want = completion + rng() % 3000;
        while (got < want) {
          if (!c.charge(r, 0, 50).allowed()) {
            mine.stopped_streams += 1;
            break;
          }
          got += 50;
        }
        const Decision k = c.commit(r, "openai", prompt, got);
        if (!k.allowed()) {
          mine.failures += 1;
          mine.failure = 4000 + static_cast<std::int32_t>(k.code);
        }
        booked = k.cost.count();
        break;
      }
      default: {   // commit at most what was estimated
        const Decision k = c.commit(r, "openai", static_cast<std::int64_t>(rng() % (prompt + 1)),
                                    static_cast<std::int64_t>(rng() % (completion + 1)));
        if (!k.allowed()) {
          mine.failures += 1;
          mine.failure = 4000 + static_cast<std::int32_t>(k.code);
        }
        booked = k.cost.count();
        break;
      }
    }
    mine.tenant[tenant] += booked;
    mine.run[run] += booked;
    mine.total += booked;
  }
  std::lock_guard lock(*mu);
  for (int t = 0; t < kTenants; ++t) out->tenant[t] += mine.tenant[t];
  for (int r = 0; r < kRuns; ++r) out->run[r] += mine.run[r];
  out->total += mine.total;
  out->reserved += mine.reserved;
  out->denied += mine.denied;
  out->stopped_streams += mine.stopped_streams;
  out->failures += mine.failures;
  if (mine.failure != 0) out->failure = mine.failure;
}

}  // namespace

TEST_CASE("reserve: concurrent processes and threads never take any layer past its limit, and the counters "
          "equal the sum of what was committed") {
  TestRegion t(1024, "mp");
  const NanoUsd platform_limit = usd("5.00");
  const NanoUsd tenant_limit = usd("1.50");
  const NanoUsd run_limit = usd("0.60");
  t.admin->setPlatformLimit(platform_limit);
  t.admin->setDefaultLimit(LimitTable::kTenant, tenant_limit);
  t.admin->setDefaultLimit(LimitTable::kRun, run_limit);

  constexpr int kIterations = 1500;
  // Watch every layer while the children race: committed + held must never pass the limit.
  std::atomic<bool> done{false};
  std::atomic<std::int64_t> violations{0}, samples{0};
  std::thread monitor;
  auto watch = [&] {
    while (!done.load()) {
      auto over = [&](const shm::Counters& c) {
        const std::int64_t limit = c.limit.load();
        return limit != shm::kUnlimited && c.spend.used() > limit;
      };
      if (over(t.region->header().platform)) violations++;
      for (int i = 0; i < kTenants; ++i) {
        const Found f = KeyedTable<shm::BudgetSlot>(t.region->tenants(), 1024).find("tenant-" + std::to_string(i));
        if (f.index >= 0 && over(t.region->tenants()[f.index].c)) violations++;
      }
      for (int i = 0; i < kRuns; ++i) {
        const Found f = KeyedTable<shm::BudgetSlot>(t.region->runs(), 1024).find("run-" + std::to_string(i));
        if (f.index >= 0 && over(t.region->runs()[f.index].c)) violations++;
      }
      samples++;
    }
  };
  const Booked sum = raceChildren<Booked>(
      t.spec.shm_name, 4, 4,
      [](Client& c, int seed, Booked* total, std::mutex* mu) { worker(c, seed, kIterations, total, mu); },
      [](Booked& into, const Booked& b) {
        for (int i = 0; i < kTenants; ++i) into.tenant[i] += b.tenant[i];
        for (int i = 0; i < kRuns; ++i) into.run[i] += b.run[i];
        into.total += b.total;
        into.reserved += b.reserved;
        into.denied += b.denied;
        into.stopped_streams += b.stopped_streams;
        into.failures += b.failures;
        if (b.failure != 0) into.failure = b.failure;
      },
      [&] { monitor = std::thread(watch); });
  done = true;
  monitor.join();

  MESSAGE("reserved " << sum.reserved << ", denied " << sum.denied << ", streams stopped " << sum.stopped_streams
                      << ", monitor samples " << samples.load());
  CHECK_MESSAGE(sum.failures == 0, "the last failure: step " << sum.failure / 1000 << ", code " << sum.failure % 1000);
  CHECK(violations.load() == 0);
  // The race was real: both outcomes happened many times.
  CHECK(sum.reserved > 100);
  CHECK(sum.denied > 100);

  const BudgetView platform = t.client->platform();
  CHECK(platform.committed.count() == sum.total);
  CHECK(platform.held == NanoUsd(0));
  CHECK(platform.committed <= platform_limit);
  CHECK(platform.committed.count() > platform_limit.count() * 9 / 10);   // the budget was used, not starved
  for (int i = 0; i < kTenants; ++i) {
    const BudgetView v = t.client->tenant("tenant-" + std::to_string(i));
    CHECK(v.committed.count() == sum.tenant[i]);
    CHECK(v.held == NanoUsd(0));
    CHECK(v.committed <= tenant_limit);
  }
  for (int i = 0; i < kRuns; ++i) {
    const BudgetView v = t.client->run("run-" + std::to_string(i));
    CHECK(v.committed.count() == sum.run[i]);
    CHECK(v.held == NanoUsd(0));
    CHECK(v.committed <= run_limit);
  }
  CHECK(t.client->info().live_reservations == 0);
}

TEST_CASE("reserve: 200 concurrent calls of $0.042 against a $1.00 limit spend at most $1.00 (the reference "
          "let all 200 through and spent $8.40)") {
  TestRegion t(1024, "200");
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("1.00")).ok());
  constexpr int kProcesses = 4;
  constexpr int kThreads = 50;
  Shared* shared = sharedPage();
  std::vector<pid_t> children;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  for (int p = 0; p < kProcesses; ++p) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      std::unique_ptr<Client> c;
      if (!Client::attach({t.spec.shm_name}, &c).ok()) ::_exit(3);
      std::atomic<int> passed{0};
      std::vector<std::thread> threads;
      for (int i = 0; i < kThreads; ++i) {
        threads.emplace_back([&] {
          awaitStart(shared);
          Reservation r;
          // 8400 prompt tokens of gpt-4o: $0.042.
          if (c->reserve({"acme", "gpt-4o", {}, {}, 8400, 0, 0}, &r).allowed() &&
              c->commit(r, "openai", 8400, 0).allowed()) {
            passed++;
          }
        });
      }
      for (auto& th : threads) th.join();
      const int n = passed.load();
      ::_exit(::write(fds[1], &n, sizeof n) == sizeof n ? 0 : 4);
    }
    children.push_back(pid);
  }
  ::close(fds[1]);
  CHECK(allWaiting(shared, kProcesses * kThreads));
  shared->go.store(1);
  int passed = 0;
  for (pid_t pid : children) {
    int n = 0;
    CHECK(::read(fds[0], &n, sizeof n) == sizeof n);
    passed += n;
    ::waitpid(pid, nullptr, 0);
  }
  ::close(fds[0]);
  CHECK(passed == 23);   // 23 * 0.042 = 0.966; a 24th would make 1.008
  CHECK(t.client->tenant("acme").committed == usd("0.966"));
  CHECK(t.client->tenant("acme").denials == 200 - 23);
  ::munmap(shared, sizeof(Shared));
}

namespace {

// What one child process booked on the rules test's counters.
struct RuleBooked {
  std::int64_t commits = 0, tokens = 0, reserved = 0, denied = 0, failures = 0;
  std::int32_t failure = 0;   // the last failure: 1000 x the step (1 reserve, 2 a call beside, 3 release, 4 charge, 5 commit) + its code
};

// Makes `iterations` calls, and more (up to 4 times as many) until `min_reserved` of them were
// reserved: on a loaded machine the concurrency cap refuses most calls, and the other rules must
// still see enough to reach their limits.
void ruleWorker(Client& c, int seed, int iterations, int min_reserved, RuleBooked* out, std::mutex* mu) {
  std::mt19937 rng(static_cast<unsigned>(seed));
  static const char* const kTagLists[] = {"", "batch", "eval", "batch,eval"};
  static const char* const kModels[] = {"gpt-4o", "gpt-4o-mini", "ollama/llama3"};
  RuleBooked mine;
  for (int i = 0; i < iterations || (mine.reserved < min_reserved && i < 4 * iterations); ++i) {
    const std::string project = "tenant-" + std::to_string(rng() % kTenants);
    const std::string agent = "agent-" + std::to_string(rng() % 3);
    Call call;
    call.project_id = project;
    call.model = kModels[rng() % 3];
    call.agent_id = agent;
    call.tags = kTagLists[rng() % 4];
    call.estimated_prompt_tokens = 50 + rng() % 400;
    call.estimated_completion_tokens = rng() % 200;
    Reservation r;
    const Decision d = c.reserve(call, &r);
    if (!d.allowed()) {
      mine.denied += 1;
      if (d.rule == 0 || (d.code != Code::kModelBudgetExhausted && d.code != Code::kTagBudgetExhausted &&
                          d.code != Code::kRequestRateExceeded && d.code != Code::kTokenRateExceeded &&
                          d.code != Code::kConcurrencyExceeded && d.code != Code::kAgentBudgetExhausted)) {
        mine.failures += 1;
        mine.failure = 1000 + static_cast<std::int32_t>(d.code);
      }
      continue;
    }
    mine.reserved += 1;
    // Two more calls in flight beside it: with the cap at 2, the third is refused by it even when
    // no other thread's call overlaps (a machine of two cores runs few at once).
    Reservation beside[2];
    for (Reservation& b : beside) {
      const Decision more = c.reserve(call, &b);
      if (!more.allowed() && more.rule == 0) {
        mine.failures += 1;
        mine.failure = 2000 + static_cast<std::int32_t>(more.code);
      }
    }
    for (Reservation& b : beside) {
      if (b.valid()) {
        if (const Decision k = c.release(b); !k.allowed()) {
          mine.failures += 1;
          mine.failure = 3000 + static_cast<std::int32_t>(k.code);
        }
      }
    }
    const std::int64_t prompt = call.estimated_prompt_tokens;
    switch (rng() % 3) {
      case 0:
        if (const Decision k = c.release(r); !k.allowed()) {
          mine.failures += 1;
          mine.failure = 3000 + static_cast<std::int32_t>(k.code);
        }
        break;
      case 1: {   // stream until done or stopped by a rule
        std::int64_t got = 0;
        if (const Decision k = c.charge(r, prompt, 0); !k.allowed()) {
          mine.failures += 1;
          mine.failure = 4000 + static_cast<std::int32_t>(k.code);
        }
        const std::int64_t want = call.estimated_completion_tokens + rng() % 400;
        while (got < want && c.charge(r, 0, 25).allowed()) got += 25;
        if (const Decision k = c.commit(r, "openai", prompt, got); !k.allowed()) {
          mine.failures += 1;
          mine.failure = 5000 + static_cast<std::int32_t>(k.code);
        }
        mine.commits += 1;
        mine.tokens += prompt + got;
        break;
      }
      default: {
        const auto p = static_cast<std::int64_t>(rng() % (prompt + 1));
        const auto k = static_cast<std::int64_t>(rng() % (call.estimated_completion_tokens + 1));
        if (const Decision done = c.commit(r, "openai", p, k); !done.allowed()) {
          mine.failures += 1;
          mine.failure = 5000 + static_cast<std::int32_t>(done.code);
        }
        mine.commits += 1;
        mine.tokens += p + k;
        break;
      }
    }
  }
  std::lock_guard lock(*mu);
  out->commits += mine.commits;
  out->tokens += mine.tokens;
  out->reserved += mine.reserved;
  out->denied += mine.denied;
  out->failures += mine.failures;
  if (mine.failure != 0) out->failure = mine.failure;
}

}  // namespace

TEST_CASE("rules: under 4 processes x 4 threads no rule counter of any kind passes its limit, and the counts "
          "equal what was committed") {
  TestRegion t(1024, "mp-rules");
  auto rule = [](std::string name, RuleScope scope, RuleMetric metric, std::int64_t limit, std::string match = {}) {
    RuleSpec r;
    r.name = std::move(name);
    r.scope = scope;
    r.metric = metric;
    r.limit = limit;
    r.window.kind = metric == RuleMetric::kConcurrency ? WindowKind::kAllTime : WindowKind::kHour;
    r.match = std::move(match);
    return r;
  };
  // Checked in this order: the ones that deny least come first, so that each gets to deny.
  const std::vector<RuleSpec> rules = {
      rule("in-flight", RuleScope::kPlatform, RuleMetric::kConcurrency, 2),
      rule("gpt4-money", RuleScope::kTenantModel, RuleMetric::kUsd, usd("0.03").count(), "gpt-4*"),
      rule("agent-requests", RuleScope::kAgent, RuleMetric::kRequests, 150),
      rule("tenant-tokens", RuleScope::kTenant, RuleMetric::kTokens, 1'000'000'000),   // counts, never denies
      rule("agent-money", RuleScope::kTenantAgent, RuleMetric::kUsd, usd("0.015").count()),
      rule("tag-tokens", RuleScope::kTag, RuleMetric::kTokens, 20'000),
  };
  std::vector<std::uint32_t> indices;
  REQUIRE(t.admin->setRules(rules, std::vector<WindowSpan>(rules.size(), WindowSpan{0, 0, INT64_MAX}), &indices).ok());

  constexpr int kIterations = 1500;
  // Every rule counter, sampled while the children race: committed + held within its limit.
  const shm::Header& h = t.region->header();
  auto forEachCounter = [&](auto&& f) {
    for (std::uint32_t i = 0; i < t.spec.rule_capacity; ++i) {
      const shm::RuleSlot& s = t.region->ruleSlots()[i];
      RuleKey key;
      if (shm::keyState(s.k.word.load()) != shm::kKeyReady || !parseRuleKey(keyOf(s.k), &key)) continue;
      f(key.rule, s.c, ruleLimit(s.c, h.rules[key.rule].limit.load()));
    }
  };
  std::atomic<bool> done{false};
  std::atomic<std::int64_t> violations{0}, samples{0};
  std::thread monitor;
  auto watch = [&] {
    while (!done.load()) {
      forEachCounter([&](std::uint32_t, const shm::Counters& c, std::int64_t limit) {
        if (c.spend.used() > limit) violations++;
      });
      samples++;
    }
  };
  const RuleBooked sum = raceChildren<RuleBooked>(
      t.spec.shm_name, 4, 4,
      // 16 workers x 50: enough committed requests (about 2 in 3) to pass 3 agents x 150.
      [](Client& c, int seed, RuleBooked* total, std::mutex* mu) { ruleWorker(c, seed, kIterations, 50, total, mu); },
      [](RuleBooked& into, const RuleBooked& b) {
        into.commits += b.commits;
        into.tokens += b.tokens;
        into.reserved += b.reserved;
        into.denied += b.denied;
        into.failures += b.failures;
        if (b.failure != 0) into.failure = b.failure;
      },
      [&] { monitor = std::thread(watch); });
  done = true;
  monitor.join();

  MESSAGE("reserved " << sum.reserved << ", denied " << sum.denied << ", monitor samples " << samples.load());
  CHECK_MESSAGE(sum.failures == 0, "the last failure: step " << sum.failure / 1000 << ", code " << sum.failure % 1000);
  CHECK(violations.load() == 0);
  CHECK(sum.reserved > 100);
  CHECK(sum.denied > 100);
  // At rest: nothing held anywhere, every count within its limit, and the counts that see every
  // call (requests per agent, tokens per tenant) add up to what the children committed.
  std::int64_t requests = 0, tokens = 0;
  std::map<std::uint32_t, std::int64_t> denials;
  forEachCounter([&](std::uint32_t index, const shm::Counters& c, std::int64_t limit) {
    CHECK(c.spend.used() == c.spend.committed());
    CHECK(c.spend.committed() <= limit);
    if (index == indices[2]) requests += c.spend.committed();
    if (index == indices[3]) tokens += c.spend.committed();
    if (index == indices[0]) CHECK(c.spend.committed() == 0);
    denials[index] += c.denials.load();
  });
  CHECK(requests == sum.commits);
  CHECK(tokens == sum.tokens);
  // The limiting rules denied calls: the race covered the kinds. Which rule gets to deny first is
  // the race's to decide, and under ThreadSanitizer on a loaded machine one of them now and then
  // never does (agent-money, once in eight runs): four of the five must.
  int denying = 0;
  for (std::size_t i : {0u, 1u, 2u, 4u, 5u}) {
    if (denials[indices[i]] > 0) {
      ++denying;
    } else {
      MESSAGE("rule " << rules[i].name << " denied no call this time");
    }
  }
  CHECK(denying >= 4);
  CHECK(t.client->info().live_reservations == 0);
}
