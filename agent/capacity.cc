#include "capacity.h"

#include "log.h"
#include "region.h"

#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstdio>

namespace tokenfuse {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr std::size_t kExamples = 5;

const char* tableName(LimitTable t) { return t == LimitTable::kTenant ? "tenant" : "run"; }

std::string gib(std::uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace

void LeftOut::leftOut(std::string_view id, bool limited) {
  ++left_out_;
  if (limited) ++limited_;
  if (examples_.size() < kExamples) examples_.emplace_back(id);
}

void LeftOut::log(std::string_view phase) const {
  if (left_out_ == 0) return;
  const std::string key = std::string("region.") + tableName(table_) + "_capacity";
  log::warn("capacity_exceeded",
            {{"table", tableName(table_)},
             {"phase", phase},
             {"capacity", capacity_},
             {"wanted", wanted_},
             {"left_out", left_out_},
             {"limited_left_out", limited_},
             {"examples", examples_},
             {"effect", limited_ > 0 ? "every key this table cannot track is refused (E-TOKENFUSE-CAPACITY)"
                                     : "keys left out are tracked again only if there is room; with a default "
                                       "limit they are refused (E-TOKENFUSE-CAPACITY)"},
             {"fix", "raise " + key + " and restart with --recreate-region"}});
}

void checkRegionFits(const Config& c) {
  const RegionSpec spec{c.shm_name, c.tenant_capacity, c.run_capacity, c.model_capacity, c.reservation_capacity,
                        0660, c.ledger_capacity, 0, c.rule_capacity};
  const std::uint64_t need = regionBytes(spec);
  // The region's pages all become resident when it is created (every slot is constructed), and
  // tmpfs pages cannot be swapped out without swap: the applications, SQLite's page cache and the
  // rest of the host need room beside it. Half of the memory is also tmpfs's default size.
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  const std::uint64_t phys = pages > 0 && page > 0 ? std::uint64_t(pages) * std::uint64_t(page) : 0;
  std::uint64_t shm_free = UINT64_MAX;
  struct statvfs vfs {};
  if (::statvfs("/dev/shm", &vfs) == 0) {
    shm_free = std::uint64_t(vfs.f_bavail) * vfs.f_frsize;
    // A region of the same name is replaced (or adopted) by this one: its pages count as free.
    struct stat st {};
    if (::stat(("/dev/shm/" + c.shm_name).c_str(), &st) == 0) shm_free += std::uint64_t(st.st_blocks) * 512;
  }
  const bool too_big_for_memory = phys != 0 && need > phys / 2;
  const bool too_big_for_shm = need > shm_free;
  if (!too_big_for_memory && !too_big_for_shm) return;
  throw ConfigError(
      "region.tenant_capacity=" + std::to_string(c.tenant_capacity) + ", region.run_capacity=" +
      std::to_string(c.run_capacity) + ", region.model_capacity=" + std::to_string(c.model_capacity) +
      ", region.reservation_capacity=" + std::to_string(c.reservation_capacity) + ", region.ledger_capacity=" +
      std::to_string(c.ledger_capacity) + " make a region of " + gib(need) + " (" + std::to_string(need) +
      " bytes); this machine has " + (phys != 0 ? gib(phys) : std::string("unknown")) +
      " of memory (a region may take at most half) and /dev/shm has " +
      (shm_free == UINT64_MAX ? std::string("unknown") : gib(shm_free)) + " free: lower the capacities");
}

namespace {

// The keys of a keyed table that are in use.
template <typename Slot>
std::uint32_t readyKeys(const Slot* slots, std::uint32_t capacity) {
  std::uint32_t n = 0;
  for (std::uint32_t i = 0; i < capacity; ++i) {
    if (shm::keyState(slots[i].k.word.load(kRelaxed)) == shm::kKeyReady) ++n;
  }
  return n;
}

}  // namespace

std::uint32_t tableEntries(RegionAdmin& admin, LimitTable table) {
  const Region& r = admin.region();
  return table == LimitTable::kTenant ? readyKeys(r.tenants(), r.geometry().tenant_capacity)
                                      : readyKeys(r.runs(), r.geometry().run_capacity);
}

std::uint32_t modelEntries(RegionAdmin& admin) {
  return readyKeys(admin.region().models(), admin.region().geometry().model_capacity);
}

std::uint32_t ruleEntries(RegionAdmin& admin) {
  return readyKeys(admin.region().ruleSlots(), admin.region().geometry().rule_capacity);
}

std::uint32_t reservationEntries(RegionAdmin& admin) {
  const Region& r = admin.region();
  std::uint32_t n = 0;
  for (std::uint32_t i = 0; i < r.geometry().reservation_capacity; ++i) {
    if (shm::resState(r.reservations()[i].word.load(kRelaxed)) != shm::kResFree) ++n;
  }
  return n;
}

void UntrackedWatch::tick(const shm::Header& h, std::int64_t now) {
  const std::uint64_t untracked = h.stats.untracked_calls.load(kRelaxed);
  const std::uint64_t refused = h.stats.capacity_refused.load(kRelaxed);
  if (!primed_) {   // what an adopted region counted before this agent was logged by an earlier one
    primed_ = true;
    untracked_ = untracked;
    refused_ = refused;
    return;
  }
  if (untracked == untracked_ && refused == refused_) return;
  if (last_log_ns_ != 0 && now - last_log_ns_ < kEveryNs) return;
  log::warn("capacity_untracked_calls",
            {{"untracked_calls", untracked - untracked_},
             {"capacity_refused", refused - refused_},
             {"untracked_calls_total", untracked},
             {"capacity_refused_total", refused},
             {"why", "the tenant or run table is full: calls without a limit were counted in the platform only, "
                     "calls with a limit were refused (E-TOKENFUSE-CAPACITY)"},
             {"fix", "raise region.tenant_capacity / region.run_capacity and restart with --recreate-region"}});
  untracked_ = untracked;
  refused_ = refused;
  last_log_ns_ = now;
}

}  // namespace tokenfuse
