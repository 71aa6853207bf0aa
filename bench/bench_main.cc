// tokenfuse_bench: the hot path against the cost of one atomic operation on shared memory.
//
//   build/bench/tokenfuse_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// BM_FloorAtomicLoad and BM_FloorFetchAdd are the floor: one uncontended atomic load and one
// fetch_add on a word of the same region, measured in the same run. docs/performance.md has the
// figures and what they mean.
#include "region_admin.h"
#include "ledger.h"
#include "ledger_ring.h"
#include "ledger_writer.h"
#include "log.h"
#include "pricing.h"
#include "region.h"

#include <tokenfuse/tokenfuse.hpp>

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

namespace {

using namespace tokenfuse;

struct BenchRegion {
  BenchRegion() {
    spec.shm_name = "tokenfuse-bench-" + std::to_string(::getpid());
    Status s = Region::create(spec, &region);
    if (!s.ok()) throw std::runtime_error(s.message());
    admin = std::make_unique<RegionAdmin>(*region);
    (void)admin->setFallbackPrice(kReferenceFallbackPrice);
    for (const auto& [model, price] : referencePrices()) (void)admin->setPrice(model, price);
    // Limited layers, so every reserve takes the compare-and-swap path, but high enough never to
    // run out during a run.
    admin->setPlatformLimit(NanoUsd::fromWholeUsd(9'000'000'000));
    (void)admin->setLimit(LimitTable::kTenant, "acme", NanoUsd::fromWholeUsd(9'000'000'000));
    (void)admin->setLimit(LimitTable::kRun, "run-1", NanoUsd::fromWholeUsd(9'000'000'000));
    admin->publish(std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::system_clock::now().time_since_epoch()).count(), 20'000);
    s = Client::attach({spec.shm_name}, &client);
    if (!s.ok()) throw std::runtime_error(s.message());
    if (!client->prepare({"acme", "gpt-4o", "run-1", "bench", 1000, 0, 0}, &site).allowed()) {
      throw std::runtime_error("prepare failed");
    }
  }
  ~BenchRegion() {
    stopDiscarding();
    Region::remove(spec.shm_name);
  }

  // Stands in for the agent's ledger writer: hands ring slots back as soon as they are published,
  // so that benchmarks which commit measure the application's side only.
  void startDiscarding() {
    discarding_ = std::thread([this] {
      LedgerRing ring(region->header(), region->ledger(), region->geometry().ledger_capacity);
      std::uint64_t pos = region->header().ledger_head.load();
      while (!stop_.load(std::memory_order_relaxed)) {
        bool any = false;
        while (ring.state(pos) == LedgerRing::State::kPublished) {
          ring.release(pos++);
          any = true;
        }
        region->header().ledger_head.store(pos, std::memory_order_release);
        if (!any) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  void stopDiscarding() {
    stop_ = true;
    if (discarding_.joinable()) discarding_.join();
    stop_ = false;
  }

  std::thread discarding_;
  std::atomic<bool> stop_{false};
  RegionSpec spec;
  std::unique_ptr<Region> region;
  std::unique_ptr<RegionAdmin> admin;
  std::unique_ptr<Client> client;
  CallSite site;
};

BenchRegion* g = nullptr;

void BM_FloorAtomicLoad(benchmark::State& state) {
  auto& word = g->region->header().platform.limit;
  for (auto _ : state) benchmark::DoNotOptimize(word.load(std::memory_order_acquire));
}
BENCHMARK(BM_FloorAtomicLoad);

void BM_FloorFetchAdd(benchmark::State& state) {
  // A word of its own per thread count, in the region: uncontended, as the floor should be.
  auto& word = g->region->header().stats.untracked_calls;
  for (auto _ : state) benchmark::DoNotOptimize(word.fetch_add(1, std::memory_order_relaxed));
  word.store(0);
}
BENCHMARK(BM_FloorFetchAdd);

// The pre-call check for a prepared (tenant, model, run): kill switch, price, three layers.
void BM_Check(benchmark::State& state) {
  for (auto _ : state) {
    Decision d = g->client->check(g->site, 1000);
    benchmark::DoNotOptimize(d);
  }
}
BENCHMARK(BM_Check);
BENCHMARK(BM_Check)->Threads(2);

// The same check by name: hashes and finds the tenant, model and run each time.
void BM_CheckByName(benchmark::State& state) {
  for (auto _ : state) {
    Decision d = g->client->check("acme", "gpt-4o", 1000, "run-1");
    benchmark::DoNotOptimize(d);
  }
}
BENCHMARK(BM_CheckByName);

// Publishes a benchmark's own region and attaches to it; nullptr (the benchmark skipped) if that fails.
std::unique_ptr<Client> publishAndAttach(RegionAdmin& admin, const RegionSpec& spec, benchmark::State& state) {
  admin.publish(std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::system_clock::now().time_since_epoch()).count(), 20'000);
  std::unique_ptr<Client> client;
  if (Status s = Client::attach({spec.shm_name}, &client); !s.ok()) state.SkipWithError(s.message().c_str());
  return client;
}

// A check by name for a tenant that is not in a full tenant table (16,384 slots, the default):
// the lookup's probe is bounded (table.h, kMaxProbe), so this stays near BM_CheckByName instead of
// walking the whole table.
void BM_CheckUnknownFullTable(benchmark::State& state) {
  RegionSpec spec;
  spec.shm_name = "tokenfuse-bench-full-" + std::to_string(::getpid());
  std::unique_ptr<Region> region;
  if (Status s = Region::create(spec, &region); !s.ok()) {
    state.SkipWithError(s.message().c_str());
    return;
  }
  {
    RegionAdmin admin(*region);
    for (std::uint32_t i = 0; i < spec.tenant_capacity * 4; ++i) {   // every slot taken
      (void)admin.setLimit(LimitTable::kTenant, "tenant-" + std::to_string(i), std::nullopt);
    }
    std::unique_ptr<Client> client = publishAndAttach(admin, spec, state);
    if (client) {
      for (auto _ : state) {
        Decision d = client->check("never-seen-tenant", "gpt-4o", 1000);
        benchmark::DoNotOptimize(d);
      }
    }
  }
  region.reset();
  Region::remove(spec.shm_name);
}
BENCHMARK(BM_CheckUnknownFullTable);

// Check cost against the number of keys in the tables (issue 14: flat is the goal): a tenant table
// holding N tenants (1,000 or 1,000,000, in a table of twice that), and checks of 1,024 of them
// spread over it, in turn: prepared (the call site keeps the entry and its word) or by name (a
// hash lookup each time). With a million keys the entries no longer fit the CPU's caches, so a
// by-name check pays for memory misses; the lookup itself is the same bounded probe.
void checkKeys(benchmark::State& state, bool by_name) {
  const auto n = static_cast<std::uint32_t>(state.range(0));
  RegionSpec spec;
  spec.shm_name = "tokenfuse-bench-keys-" + std::to_string(::getpid());
  spec.tenant_capacity = std::bit_ceil(2 * n);
  std::unique_ptr<Region> region;
  if (Status s = Region::create(spec, &region); !s.ok()) {
    state.SkipWithError(s.message().c_str());
    return;
  }
  {
    RegionAdmin admin(*region);
    (void)admin.setFallbackPrice(kReferenceFallbackPrice);
    for (const auto& [model, price] : referencePrices()) (void)admin.setPrice(model, price);
    std::unique_ptr<Client> client = publishAndAttach(admin, spec, state);
    if (client) {
      std::vector<std::string> ids;
      std::vector<CallSite> sites;
      for (std::uint32_t i = 0; i < n; ++i) {
        const std::string id = "tenant-" + std::to_string(i);
        CallSite site;
        (void)client->prepare({id, "gpt-4o", {}, {}, 1000, 0, 0}, &site);
        if (i % std::max<std::uint32_t>(1, n / 1024) == 0 && ids.size() < 1024) {
          ids.push_back(id);
          sites.push_back(site);
        }
      }
      std::size_t k = 0;
      for (auto _ : state) {
        const Decision d = by_name ? client->check(ids[k], "gpt-4o", 1000) : client->check(sites[k], 1000);
        benchmark::DoNotOptimize(d);
        k = k + 1 == ids.size() ? 0 : k + 1;
      }
    }
  }
  region.reset();
  Region::remove(spec.shm_name);
}
void BM_CheckKeys(benchmark::State& state) { checkKeys(state, false); }
void BM_CheckKeysByName(benchmark::State& state) { checkKeys(state, true); }
BENCHMARK(BM_CheckKeys)->Arg(1000)->Arg(1'000'000);
BENCHMARK(BM_CheckKeysByName)->Arg(1000)->Arg(1'000'000);

// A reserve and a commit as an application makes them: on E-TOKENFUSE-LEDGER-FULL it retries.
// Any other failure stops the benchmark, so the figure is never that of a failing path.
void reserveCommit(benchmark::State& state, const Call* by_name) {
  std::int64_t full = 0;
  for (auto _ : state) {
    Reservation r;
    const Decision d = by_name != nullptr ? g->client->reserve(*by_name, &r) : g->client->reserve(g->site, 1000, 200, &r);
    Decision c;
    while ((c = g->client->commit(r, "openai", 1000, 150)).code == Code::kLedgerFull) ++full;
    if (!d.allowed() || !c.allowed()) {
      state.SkipWithError(d.allowed() ? c.errorCode() : d.errorCode());
      break;
    }
  }
  state.counters["ledger_full_retries"] = static_cast<double>(full);
}

// Hold on three layers (a 16-byte compare-and-swap each), then book, return the rest and append
// the ledger entry.
void BM_ReserveCommit(benchmark::State& state) { reserveCommit(state, nullptr); }
BENCHMARK(BM_ReserveCommit);
BENCHMARK(BM_ReserveCommit)->Threads(2);

void BM_ReserveCommitByName(benchmark::State& state) {
  const Call call{"acme", "gpt-4o", "run-1", "bench", 1000, 200, 0};
  reserveCommit(state, &call);
}
BENCHMARK(BM_ReserveCommitByName);

// One ledger entry from an application into the ring: claim a slot, fill it, publish it.
void BM_LedgerAppend(benchmark::State& state) {
  LedgerRing ring(g->region->header(), g->region->ledger(), g->region->geometry().ledger_capacity);
  const std::uint32_t pid = static_cast<std::uint32_t>(::getpid());
  for (auto _ : state) {
    std::uint64_t pos = 0;
    shm::LedgerSlot* e;
    while ((e = ring.claim(pid, &pos)) == nullptr) {
    }
    e->kind = shm::kLedgerRecord;
    e->cost_nano_usd = 5'000'000;
    e->prompt_tokens = 1000;
    e->text.set({"acme", "", "gpt-4o", "", "openai"});
    LedgerRing::publish(*e, pos);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LedgerAppend);

std::vector<LedgerEntry> sampleEntries(std::uint64_t first, std::size_t n) {
  std::vector<LedgerEntry> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    LedgerEntry& e = v[i];
    e.seq = first + i;
    e.unix_ns = 1'800'000'000'000'000'000 + static_cast<std::int64_t>(i);
    e.day = 20'000;
    e.kind = "commit";
    e.project_id = "tenant-" + std::to_string(i % 100);
    e.agent_id = "agent-7";
    e.run_id = "run-" + std::to_string(i % 1000);
    e.model = "gpt-4o";
    e.provider = "openai";
    e.prompt_tokens = 1000;
    e.completion_tokens = 200;
    e.cost_nano_usd = 8'000'000;
    e.reservation_id = i + 1;
  }
  return v;
}

// Raw SQLite ingest: one transaction (WAL, synchronous=FULL, so one fsync) per batch.
void BM_LedgerSqliteIngest(benchmark::State& state) {
  const std::string dir = "/tmp/tokenfuse-bench-ledger-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  {
    Ledger ledger(dir + "/ledger.db", "bench-host");
    const auto batch = static_cast<std::size_t>(state.range(0));
    std::uint64_t next = 1;
    for (auto _ : state) {
      state.PauseTiming();
      std::vector<LedgerEntry> entries = sampleEntries(next, batch);
      next += batch;
      state.ResumeTiming();
      ledger.append(entries);
    }
    state.SetItemsProcessed(static_cast<std::int64_t>(next - 1));
  }
  std::filesystem::remove_all(dir);
}
BENCHMARK(BM_LedgerSqliteIngest)->Arg(1000)->Arg(10000)->UseRealTime()->Unit(benchmark::kMillisecond);

// Sustained, end to end: one application thread records 200,000 calls as fast as the ring lets
// it while the agent's LedgerWriter moves them into SQLite. Time until the last one is durable.
void BM_LedgerSustained(benchmark::State& state) {
  g->stopDiscarding();
  const std::string dir = "/tmp/tokenfuse-bench-sustained-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  {
    Ledger ledger(dir + "/ledger.db", "bench-host");
    LedgerWriter writer(*g->admin, ledger, "bench-host",
                        LedgerWriter::Options{65536, std::chrono::milliseconds(1), std::chrono::milliseconds(5000)});
    constexpr std::int64_t kEntries = 200'000;
    for (auto _ : state) {
      const std::uint64_t start = g->region->header().ledger_head.load();
      std::jthread drain([&](std::stop_token stop) { writer.run(stop); });
      std::int64_t full = 0;
      for (std::int64_t i = 0; i < kEntries; ++i) {
        while (g->client->record({"acme", "gpt-4o", "openai", "run-1", "bench", 1000, 200}).code == Code::kLedgerFull) {
          ++full;
          std::this_thread::yield();
        }
      }
      while (g->region->header().ledger_head.load() < start + kEntries) std::this_thread::sleep_for(std::chrono::microseconds(100));
      drain.request_stop();
      state.counters["ring_full_retries"] = static_cast<double>(full);
    }
    state.SetItemsProcessed(state.iterations() * kEntries);
  }
  std::filesystem::remove_all(dir);
  g->startDiscarding();
}
BENCHMARK(BM_LedgerSustained)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);

// Budget rules (docs/rules.md): the cost of each rule a call matches, beside the three built-in
// layers. N rules on the benchmark's tenant, of every metric in turn, limited but never reached;
// installed for the benchmark and retired after it. Registered last: a retired definition is
// still looked at (one load) by every later call.
struct WithRules {
  explicit WithRules(std::int64_t n) {
    std::vector<RuleSpec> rules;
    constexpr RuleMetric kMetrics[] = {RuleMetric::kUsd, RuleMetric::kTokens, RuleMetric::kRequests,
                                       RuleMetric::kConcurrency};
    for (std::int64_t i = 0; i < n; ++i) {
      RuleSpec r;
      r.name = "bench-" + std::to_string(i);
      r.scope = i % 2 == 0 ? RuleScope::kTenant : RuleScope::kTenantModel;
      r.metric = kMetrics[i % 4];
      r.window.kind = r.metric == RuleMetric::kConcurrency ? WindowKind::kAllTime : WindowKind::kMonth;
      r.limit = std::int64_t{1} << 60;
      rules.push_back(r);
    }
    std::vector<std::uint32_t> indices;
    const std::vector<WindowSpan> spans(rules.size(), WindowSpan{0, 0, INT64_MAX});
    if (Status s = g->admin->setRules(rules, spans, &indices); !s.ok()) throw std::runtime_error(s.message());
  }
  ~WithRules() {
    std::vector<std::uint32_t> none;
    (void)g->admin->setRules({}, {}, &none);
  }
};

void BM_CheckRules(benchmark::State& state) {
  const WithRules rules(state.range(0));
  for (auto _ : state) {
    const Decision d = g->client->check(g->site, 1000, 0);
    benchmark::DoNotOptimize(d);
  }
}
BENCHMARK(BM_CheckRules)->Arg(1)->Arg(4)->Arg(8);

void BM_ReserveCommitRules(benchmark::State& state) {
  const WithRules rules(state.range(0));
  reserveCommit(state, nullptr);
}
BENCHMARK(BM_ReserveCommitRules)->Arg(1)->Arg(4)->Arg(8);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    tokenfuse::log::init("warn");
    BenchRegion region;
    g = &region;
    region.startDiscarding();
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenfuse_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
