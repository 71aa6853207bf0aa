// The shared-memory region: creating it (tokenfused), attaching to it (everyone), and finding
// the tables inside it. Set-up code: it may allocate and throw internally, and reports failures
// as a Status with a message a person can act on.
#pragma once

#include "layout.h"

#include <tokenfuse/tokenfuse.hpp>

#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace tokenfuse {

struct RegionSpec {
  std::string shm_name = "tokenfuse";
  std::uint32_t tenant_capacity = 16384;
  std::uint32_t run_capacity = 16384;
  std::uint32_t model_capacity = 1024;
  std::uint32_t reservation_capacity = 16384;
  std::uint32_t mode = 0660;
  std::uint32_t ledger_capacity = 16384;
  // The ledger sequence number the region continues from: the highest one already in the
  // agent's SQLite ledger, so that a new region never reuses a sequence number.
  std::uint64_t ledger_base = 0;
  std::uint32_t rule_capacity = 16384;   // counters of budget rules (one per rule and key)
};

// The bytes a region made to `spec` takes (header, tables and ledger ring, page-aligned).
std::uint64_t regionBytes(const RegionSpec& spec);

// Checks a shm name: 1 to 200 of [A-Za-z0-9._-]. Returns an empty string or the problem.
std::string validateShmName(const std::string& name);

// kDamaged: the object is smaller than its header says (truncated by someone): nothing in it
// can be drained, so its owner replaces it and rebuilds the counters from SQLite.
enum class AttachFailure { kNone, kNotFound, kNotReady, kIncompatible, kOwned, kDamaged, kOther };

// The region's shape, copied into this process at create or attach after it was checked, and
// never read from the region again: any group member can rewrite the header.
struct Geometry {
  std::uint64_t region_bytes = 0;
  std::uint32_t tenant_capacity = 0, run_capacity = 0, model_capacity = 0, reservation_capacity = 0,
                ledger_capacity = 0, rule_capacity = 0;
  std::uint64_t tenant_offset = 0, run_offset = 0, model_offset = 0, reservation_offset = 0, ledger_offset = 0,
                rule_offset = 0;
};

// What a CallSite's tenant, run or model holds when it is not a slot index. Internal: the public
// CallSite is opaque, so these markers (like the indices) are not part of the ABI.
namespace site_index {
inline constexpr std::int32_t kNone = -1;       // no run given; model not in the price table
inline constexpr std::int32_t kUntracked = -2;  // the table has no room for it: not counted
inline constexpr std::int32_t kAbsent = -3;     // not in the table yet (check by name): nothing spent
}  // namespace site_index

// A reservation's layers, from the run and tenant indices stored in its slot (or in a CallSite).
// A null entry is "no such layer". `bad` is set when an index was neither "none" (negative) nor in
// range: the region (or the caller's CallSite) was corrupted, and that layer is left alone.
struct ResLayers {
  shm::Counters* at[shm::kLayerCount];
  bool bad;
};

class Region {
 public:
  // Creates a new region and takes ownership of it; fails if one of that name exists. The new
  // region is not ready: its owner fills in limits and prices, then RegionAdmin::publish.
  static Status create(const RegionSpec& spec, std::unique_ptr<Region>* out);
  // Attaches to an existing, ready region of this layout version. With `own`, also takes the
  // owner's lock (an exclusive flock on the shm object, released by the kernel when the owner
  // exits, however it exits) and accepts a region that is not ready yet; fails if another live
  // process owns it. `why`, if given, says what kind of failure it was.
  static Status attach(const std::string& shm_name, std::unique_ptr<Region>* out, bool own = false,
                       AttachFailure* why = nullptr);
  // Removes the name; processes that have it mapped keep their mapping. True if it existed.
  static bool remove(const std::string& shm_name) noexcept;

  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  shm::Header& header() const noexcept { return *header_; }
  // Tables, at the offsets checked at create or attach (never re-read from the header).
  shm::BudgetSlot* tenants() const noexcept { return at<shm::BudgetSlot>(geo_.tenant_offset); }
  shm::BudgetSlot* runs() const noexcept { return at<shm::BudgetSlot>(geo_.run_offset); }
  shm::ModelSlot* models() const noexcept { return at<shm::ModelSlot>(geo_.model_offset); }
  shm::ReservationSlot* reservations() const noexcept { return at<shm::ReservationSlot>(geo_.reservation_offset); }
  shm::LedgerSlot* ledger() const noexcept { return at<shm::LedgerSlot>(geo_.ledger_offset); }
  shm::RuleSlot* ruleSlots() const noexcept { return at<shm::RuleSlot>(geo_.rule_offset); }
  const Geometry& geometry() const noexcept { return geo_; }
  const std::string& name() const noexcept { return name_; }

  // The one checked way from stored indices to a reservation's layers (the engine and the
  // reaper both use it). An index that is not in range yields no layer, never a wild pointer.
  ResLayers layers(std::int32_t run, std::int32_t tenant) const noexcept {
    ResLayers l{{nullptr, nullptr, &header_->platform}, false};
    if (run >= 0 && static_cast<std::uint32_t>(run) < geo_.run_capacity) {
      l.at[shm::kLayerRun] = &runs()[run].c;
    } else if (run < site_index::kAbsent || run >= 0) {
      l.bad = true;
    }
    if (tenant >= 0 && static_cast<std::uint32_t>(tenant) < geo_.tenant_capacity) {
      l.at[shm::kLayerTenant] = &tenants()[tenant].c;
    } else if (tenant < site_index::kAbsent || tenant >= 0) {
      l.bad = true;
    }
    return l;
  }

  // A rule counter by its index in the rule table (a reservation's RuleHold); nullptr when the
  // index is out of range, as layers() does.
  shm::Counters* ruleCounters(std::int32_t slot) const noexcept {
    return slot >= 0 && static_cast<std::uint32_t>(slot) < geo_.rule_capacity ? &ruleSlots()[slot].c : nullptr;
  }

  // Set (from a SIGBUS handler) when the region's file was truncated under this mapping: the
  // mapping now reads zeros, and every call on it answers kRegionCorrupt. One relaxed load.
  bool lost() const noexcept { return lost_.load(std::memory_order_relaxed) != 0; }
  const std::atomic<std::uint32_t>& lostFlag() const noexcept { return lost_; }

  // For the owner, every tick: whether the region's file still is the one mapped here, whole.
  // Empty when it is; otherwise what was seen ("truncated to 4096 bytes of 1310720", "removed",
  // "replaced by another object (inode 12 is not 34)", ...). Makes two system calls.
  std::string damage() const;

  // Whether this region was made with the same capacities as `spec`.
  bool matches(const RegionSpec& spec) const noexcept;

  // This process's client number on the region (see client_lock.h): claimed at create/attach,
  // and claimed afresh, once, by a child after fork() (which shares its parent's open file
  // description, hence its parent's lock). No system call except that once after a fork.
  std::uint32_t client() const noexcept {
    if (client_pid_.load(std::memory_order_acquire) == selfPidForRegion()) return client_.load(std::memory_order_relaxed);
    return reclaim();
  }
  // The descriptor whose open file description holds this process's client lock.
  int lockFd() const noexcept;
  // Whether another process holds a client lock on the object this region maps.
  bool othersAttached() const noexcept;

 private:
  static std::uint32_t selfPidForRegion() noexcept;
  std::uint32_t reclaim() const noexcept;
  Status claimClient();

  Region(std::string name, boost::interprocess::shared_memory_object shm,
         boost::interprocess::mapped_region mapping);
  template <typename T>
  T* at(std::uint64_t offset) const noexcept {
    return reinterpret_cast<T*>(reinterpret_cast<char*>(header_) + offset);
  }

  std::string name_;
  boost::interprocess::shared_memory_object shm_;
  boost::interprocess::mapped_region mapping_;
  shm::Header* header_;
  Geometry geo_;
  std::atomic<std::uint32_t> lost_{0};
  mutable std::atomic<std::uint32_t> client_{0};
  mutable std::atomic<std::uint32_t> client_pid_{0};   // the process that claimed client_
  mutable std::mutex reclaim_mu_;
};

}  // namespace tokenfuse
