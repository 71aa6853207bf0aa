// The agent's Prometheus metrics (GET /metrics), built with prometheus-cpp.
//
// Two sources: the region, read at scrape time (refusals by error code from every process,
// spending, live reservations, ledger lag and back-pressure, the reaper), and the HTTP API's
// own decision counters. Allowed checks made through the library are not counted anywhere: a
// check stays a few loads (docs/performance.md); allowed calls show up as ledger entries.
//
// Thread-safety: every member may be called from any thread.
#pragma once

#include <tokenfuse/tokenfuse.hpp>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

namespace tokenfuse {

class RegionAdmin;
namespace http {
struct ServerStats;
}
struct LinkStats;
struct AlertStats;
struct CapacityStats;

class Metrics {
 public:
  enum class Endpoint { kCheck, kReserve, kCommit, kCharge, kRelease, kUsage, kCount };

  // `link`: the central link's state, or nullptr when the agent runs alone. `capacity`: what the
  // agent's start found no table room for (nullptr: not exported).
  Metrics(RegionAdmin& admin, const LinkStats* link, const AlertStats* alerts,
          const CapacityStats* capacity = nullptr);
  ~Metrics();

  // Counts one decision made over HTTP.
  void decision(Endpoint endpoint, Code code) noexcept;
  // The HTTP server's connections and refusals, exported from now on (before the first scrape).
  void setHttpStats(const http::ServerStats* stats) noexcept { http_.store(stats, std::memory_order_release); }
  // Exports `c`'s families too (before the first scrape).
  void add(std::shared_ptr<prometheus::Collectable> c) { extra_.push_back(std::move(c)); }
  // The Prometheus text exposition format.
  std::string scrape() const;

 private:
  static constexpr std::size_t kCodes = 15;   // kOk, E-BUDGET-001..004, the ten others (100..109)
  static std::size_t codeIndex(Code code) noexcept;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> region_;
  std::shared_ptr<prometheus::Collectable> link_;   // nullptr: no central link
  std::shared_ptr<prometheus::Collectable> alerts_;
  std::vector<std::shared_ptr<prometheus::Collectable>> extra_;
  std::atomic<const http::ServerStats*> http_{nullptr};
  prometheus::Family<prometheus::Counter>& decisions_family_;
  // Created on first use, so that only codes that occurred are exported.
  std::array<std::array<std::atomic<prometheus::Counter*>, kCodes>, static_cast<std::size_t>(Endpoint::kCount)>
      decisions_{};
};

}  // namespace tokenfuse
