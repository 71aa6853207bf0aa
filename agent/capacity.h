// What the agent does about the region's fixed tables (tenants, runs, models, reservations):
// the region must fit the machine, start-up never fails because a table is full (what does not
// fit is logged and exported instead), and calls that could not be tracked are noticed.
//
// Thread-safety: CapacityStats may be read from any thread; LeftOut and UntrackedWatch belong to
// the thread that uses them.
#pragma once

#include "config.h"

#include "region_admin.h"
#include "layout.h"

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tokenfuse {

// Keys the agent wanted in a table at its start (limits from the config and the admin API,
// spending from the ledger) but found no room for. Exported as tokenfuse_capacity_left_out.
struct CapacityStats {
  std::atomic<std::uint64_t> left_out[2] = {0, 0};   // by LimitTable: tenant, run
};

// Counts what one table could not take during one phase of start-up, and logs it in one line.
class LeftOut {
 public:
  LeftOut(LimitTable table, std::uint32_t capacity) : table_(table), capacity_(capacity) {}
  void wanted() noexcept { ++wanted_; }
  void leftOut(std::string_view id, bool limited);
  std::uint64_t count() const noexcept { return left_out_; }
  std::uint64_t limited() const noexcept { return limited_; }
  // One "capacity_exceeded" warning with counts and a few example ids, if anything was left out.
  void log(std::string_view phase) const;

 private:
  LimitTable table_;
  std::uint32_t capacity_;
  std::uint64_t wanted_ = 0, left_out_ = 0, limited_ = 0;
  std::vector<std::string> examples_;
};

// Throws ConfigError when the region the [region] capacities describe is larger than this
// machine can map: more than the free space of /dev/shm (plus the size of an existing region of
// the same name, which a new one replaces), or more than half of the physical memory.
void checkRegionFits(const Config& config);

// Ready keys in a table (entries in use), for the fill metrics.
std::uint32_t tableEntries(RegionAdmin& admin, LimitTable table);
std::uint32_t modelEntries(RegionAdmin& admin);
std::uint32_t ruleEntries(RegionAdmin& admin);   // rule counters (one per rule and key)
std::uint32_t reservationEntries(RegionAdmin& admin);   // slots not free

// Notices, in the agent's tick, calls that a full table left uncounted (stats.untracked_calls)
// or refused (stats.capacity_refused), and logs them at most once a minute.
class UntrackedWatch {
 public:
  void tick(const shm::Header& header, std::int64_t now_unix_ns);

 private:
  static constexpr std::int64_t kEveryNs = std::int64_t{60} * 1'000'000'000;
  bool primed_ = false;
  std::uint64_t untracked_ = 0, refused_ = 0;   // as last logged
  std::int64_t last_log_ns_ = 0;
};

}  // namespace tokenfuse
