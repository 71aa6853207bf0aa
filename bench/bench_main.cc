// tokenfuse_bench: the hot path against the cost of one atomic operation on shared memory.
//
//   build/bench/tokenfuse_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// BM_FloorAtomicLoad and BM_FloorFetchAdd are the floor: one uncontended atomic load and one
// fetch_add on a word of the same region, measured in the same run. docs/performance.md has the
// figures and what they mean.
#include "admin.h"
#include "pricing.h"
#include "region.h"

#include <tokenfuse/tokenfuse.hpp>

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

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
  ~BenchRegion() { Region::remove(spec.shm_name); }

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

// Hold on three layers (compare-and-swap each), then book and return the rest.
void BM_ReserveCommit(benchmark::State& state) {
  for (auto _ : state) {
    Reservation r;
    Decision d = g->client->reserve(g->site, 1000, 200, &r);
    Decision c = g->client->commit(r, "openai", 1000, 150);
    benchmark::DoNotOptimize(d);
    benchmark::DoNotOptimize(c);
  }
}
BENCHMARK(BM_ReserveCommit);
BENCHMARK(BM_ReserveCommit)->Threads(2);

void BM_ReserveCommitByName(benchmark::State& state) {
  for (auto _ : state) {
    Reservation r;
    Decision d = g->client->reserve({"acme", "gpt-4o", "run-1", "bench", 1000, 200, 0}, &r);
    Decision c = g->client->commit(r, "openai", 1000, 150);
    benchmark::DoNotOptimize(d);
    benchmark::DoNotOptimize(c);
  }
}
BENCHMARK(BM_ReserveCommitByName);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    BenchRegion region;
    g = &region;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenfuse_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
