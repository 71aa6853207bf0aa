#include "region.h"

#include "client_lock.h"
#include "engine.h"
#include "proc.h"

#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/permissions.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <memory>
#include <mutex>
#include <new>
#include <utility>

namespace tokenfuse {

namespace bip = boost::interprocess;

namespace {

constexpr std::uint64_t alignUp(std::uint64_t n, std::uint64_t a) { return (n + a - 1) / a * a; }

struct Layout {
  std::uint64_t tenant_offset, run_offset, model_offset, reservation_offset, ledger_offset, rule_offset, total;
};

Layout layoutFor(const RegionSpec& spec) {
  Layout l{};
  std::uint64_t off = alignUp(sizeof(shm::Header), 4096);
  l.tenant_offset = off;
  off = alignUp(off + std::uint64_t{spec.tenant_capacity} * sizeof(shm::BudgetSlot), 4096);
  l.run_offset = off;
  off = alignUp(off + std::uint64_t{spec.run_capacity} * sizeof(shm::BudgetSlot), 4096);
  l.model_offset = off;
  off = alignUp(off + std::uint64_t{spec.model_capacity} * sizeof(shm::ModelSlot), 4096);
  l.reservation_offset = off;
  off = alignUp(off + std::uint64_t{spec.reservation_capacity} * sizeof(shm::ReservationSlot), 4096);
  l.ledger_offset = off;
  off = alignUp(off + std::uint64_t{spec.ledger_capacity} * sizeof(shm::LedgerSlot), 4096);
  l.rule_offset = off;
  off = alignUp(off + std::uint64_t{spec.rule_capacity} * sizeof(shm::RuleSlot), 4096);
  l.total = off;
  return l;
}

std::string capacityProblem(const char* what, std::uint32_t n) {
  if (n < 16 || n > (1u << 24) || !std::has_single_bit(n)) {
    return std::string(what) + " is " + std::to_string(n) +
           ": it must be a power of two from 16 to 16777216";
  }
  return {};
}

std::string displayName(const std::string& name) { return "/" + name; }

bool lockOwner(const bip::shared_memory_object& shm) {
  return ::flock(shm.get_mapping_handle().handle, LOCK_EX | LOCK_NB) == 0;
}

// --- surviving a truncated region ------------------------------------------------------------
// Any group member can truncate the region's file; touching a mapped page past the new end then
// raises SIGBUS, which would kill the process. As Wayland's wl_shm does, a handler maps anonymous
// zero pages over the whole mapping that faulted (so the faulting instruction, restarted, reads
// zeros) and marks that region lost; the library then answers kRegionCorrupt for it. Faults
// outside every region go to the handler that was there before.
//
// The registry is a fixed array of atomics: the handler neither allocates nor locks.
struct MappingEntry {
  std::atomic<std::uint32_t> used{0};
  std::atomic<std::uintptr_t> base{0};   // 0: no mapping; set last, cleared first
  std::atomic<std::size_t> len{0};
  std::atomic<std::atomic<std::uint32_t>*> lost{nullptr};
};
constexpr std::size_t kMaxMappings = 64;
MappingEntry g_mappings[kMaxMappings];
struct sigaction g_previous_sigbus;   // written once, before the handler is installed

void onSigbus(int sig, siginfo_t* info, void* context) {
  const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
  // Only a real fault (si_code > 0) names an address; a SIGBUS sent with kill() does not.
  for (MappingEntry& m : g_mappings) {
    if (info->si_code <= 0) break;
    const std::uintptr_t base = m.base.load(std::memory_order_acquire);
    const std::size_t len = m.len.load(std::memory_order_acquire);
    if (base == 0 || addr < base || addr - base >= len) continue;
    std::atomic<std::uint32_t>* lost = m.lost.load(std::memory_order_acquire);
    if (::mmap(reinterpret_cast<void*>(base), len, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
               -1, 0) != MAP_FAILED) {
      if (lost != nullptr) lost->store(1, std::memory_order_relaxed);
      return;   // the faulting access runs again, on zeros
    }
    break;
  }
  const struct sigaction& prev = g_previous_sigbus;
  if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    if (prev.sa_flags & SA_SIGINFO) {
      prev.sa_sigaction(sig, info, context);
    } else {
      prev.sa_handler(sig);
    }
    return;
  }
  // Nobody else wanted it: die of SIGBUS as if no handler were installed. A fault happens again
  // when the instruction restarts; a SIGBUS sent by kill() is raised again.
  ::signal(SIGBUS, SIG_DFL);
  if (info->si_code <= 0) ::raise(sig);
}

void installSigbusHandlerOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = onSigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, nullptr, &g_previous_sigbus);
    ::sigaction(SIGBUS, &sa, nullptr);
  });
}

void registerMapping(void* base, std::size_t len, std::atomic<std::uint32_t>* lost) noexcept {
  installSigbusHandlerOnce();
  for (MappingEntry& m : g_mappings) {
    std::uint32_t expect = 0;
    if (!m.used.compare_exchange_strong(expect, 1, std::memory_order_acq_rel)) continue;
    m.len.store(len, std::memory_order_release);
    m.lost.store(lost, std::memory_order_release);
    m.base.store(reinterpret_cast<std::uintptr_t>(base), std::memory_order_release);
    return;
  }
  // More than kMaxMappings regions in one process: this one is not protected against truncation.
}

void unregisterMapping(void* base) noexcept {
  for (MappingEntry& m : g_mappings) {
    if (m.base.load(std::memory_order_acquire) != reinterpret_cast<std::uintptr_t>(base)) continue;
    m.base.store(0, std::memory_order_release);
    m.lost.store(nullptr, std::memory_order_release);
    m.len.store(0, std::memory_order_release);
    m.used.store(0, std::memory_order_release);
    return;
  }
}

Geometry geometryOf(const Layout& l, const RegionSpec& spec) {
  Geometry g;
  g.region_bytes = l.total;
  g.tenant_capacity = spec.tenant_capacity;
  g.run_capacity = spec.run_capacity;
  g.model_capacity = spec.model_capacity;
  g.reservation_capacity = spec.reservation_capacity;
  g.ledger_capacity = spec.ledger_capacity;
  g.rule_capacity = spec.rule_capacity;
  g.rule_offset = l.rule_offset;
  g.tenant_offset = l.tenant_offset;
  g.run_offset = l.run_offset;
  g.model_offset = l.model_offset;
  g.reservation_offset = l.reservation_offset;
  g.ledger_offset = l.ledger_offset;
  return g;
}

}  // namespace

std::uint64_t regionBytes(const RegionSpec& spec) { return layoutFor(spec).total; }

std::string validateShmName(const std::string& name) {
  if (name.empty() || name.size() > 200) return "shm name must be 1 to 200 characters";
  if (name == "." || name == "..") return "shm name '" + name + "' names a directory, not a region";
  for (char ch : name) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                    ch == '.' || ch == '_' || ch == '-';
    if (!ok) return "shm name '" + name + "' may use only letters, digits, '.', '_' and '-'";
  }
  return {};
}

Region::Region(std::string name, bip::shared_memory_object shm, bip::mapped_region mapping)
    : name_(std::move(name)), shm_(std::move(shm)), mapping_(std::move(mapping)),
      header_(static_cast<shm::Header*>(mapping_.get_address())) {
  registerMapping(mapping_.get_address(), mapping_.get_size(), &lost_);
}

Region::~Region() { unregisterMapping(mapping_.get_address()); }

std::uint32_t Region::selfPidForRegion() noexcept { return selfPid(); }

int Region::lockFd() const noexcept { return shm_.get_mapping_handle().handle; }

bool Region::othersAttached() const noexcept {
  return clientlock::anyHeld(lockFd()) == clientlock::Held::kYes;
}

namespace {
std::uint64_t claimSeed(std::uint32_t pid) noexcept {
  return (std::uint64_t{pid} << 32) ^
         static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
}
}  // namespace

Status Region::claimClient() {
  const std::uint32_t pid = selfPid();
  const std::uint32_t c = clientlock::claim(lockFd(), claimSeed(pid));
  if (c == 0) {
    return Status::error("cannot claim a client lock on region " + displayName(name_) + ": " +
                         std::strerror(errno) + " (at most " + std::to_string(clientlock::kMaxClients - 1) +
                         " processes may map it at once)");
  }
  client_.store(c, std::memory_order_relaxed);
  client_pid_.store(pid, std::memory_order_release);
  return {};
}

std::uint32_t Region::reclaim() const noexcept {
  // A child after fork(): its descriptor still names the parent's open file description, so the
  // parent's lock would live as long as either process. Open the object again, claim a number
  // of its own, and put the new description in place of the inherited one.
  const std::uint32_t pid = selfPid();
  std::lock_guard lock(reclaim_mu_);
  if (client_pid_.load(std::memory_order_acquire) == pid) return client_.load(std::memory_order_relaxed);
  const int fd = lockFd();
  const int fresh = ::shm_open(displayName(name_).c_str(), O_RDWR | O_CLOEXEC, 0);
  struct stat a {}, b {};
  if (fresh >= 0 && ::fstat(fd, &a) == 0 && ::fstat(fresh, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
    const std::uint32_t c = clientlock::claim(fresh, claimSeed(pid));
    const int flags = ::fcntl(fd, F_GETFD);
    if (c != 0 && ::dup2(fresh, fd) == fd) {
      if (flags >= 0) ::fcntl(fd, F_SETFD, flags);
      client_.store(c, std::memory_order_relaxed);
    }
  }
  // Failing that, the child keeps its parent's number: the shared lock lives while either does,
  // so neither is ever taken for dead too early (only deadlines reclaim their holds).
  if (fresh >= 0) ::close(fresh);
  client_pid_.store(pid, std::memory_order_release);
  return client_.load(std::memory_order_relaxed);
}

bool Region::matches(const RegionSpec& spec) const noexcept {
  return geo_.tenant_capacity == spec.tenant_capacity && geo_.run_capacity == spec.run_capacity &&
         geo_.model_capacity == spec.model_capacity && geo_.reservation_capacity == spec.reservation_capacity &&
         geo_.ledger_capacity == spec.ledger_capacity && geo_.rule_capacity == spec.rule_capacity;
}

std::string Region::damage() const {
  if (lost()) return "its file was truncated under the mapping (a SIGBUS was caught; the mapping now reads zeros)";
  struct stat mine {};
  if (::fstat(shm_.get_mapping_handle().handle, &mine) != 0) return std::string("fstat failed: ") + std::strerror(errno);
  if (static_cast<std::uint64_t>(mine.st_size) < geo_.region_bytes) {
    return "its file was truncated to " + std::to_string(mine.st_size) + " bytes of " +
           std::to_string(geo_.region_bytes);
  }
  const std::string path = "/dev/shm/" + name_;
  struct stat named {};
  if (::stat(path.c_str(), &named) != 0) {
    return errno == ENOENT ? path + " was removed" : "cannot stat " + path + ": " + std::strerror(errno);
  }
  if (named.st_ino != mine.st_ino || named.st_dev != mine.st_dev) {
    return path + " was replaced by another object (inode " + std::to_string(named.st_ino) + ", this agent maps " +
           std::to_string(mine.st_ino) + ")";
  }
  return {};
}

Status Region::create(const RegionSpec& spec, std::unique_ptr<Region>* out) {
  if (auto p = validateShmName(spec.shm_name); !p.empty()) return Status::error(p);
  for (auto [what, n] : {std::pair{"tenant capacity", spec.tenant_capacity}, {"run capacity", spec.run_capacity},
                         {"model capacity", spec.model_capacity},
                         {"reservation capacity", spec.reservation_capacity},
                         {"ledger capacity", spec.ledger_capacity}, {"rule capacity", spec.rule_capacity}}) {
    if (auto p = capacityProblem(what, n); !p.empty()) return Status::error(p);
  }
  const Layout layout = layoutFor(spec);
  try {
    bip::permissions perm;
    perm.set_permissions(static_cast<int>(spec.mode));
    bip::shared_memory_object shm(bip::create_only, spec.shm_name.c_str(), bip::read_write, perm);
    if (!lockOwner(shm)) {
      return Status::error("another process took ownership of region " + displayName(spec.shm_name) +
                           " while it was being created; is a second tokenfused starting?");
    }
    shm.truncate(static_cast<bip::offset_t>(layout.total));
    bip::mapped_region mapping(shm, bip::read_write);
    // A new POSIX shm object reads as zeros; constructing the objects in place starts their
    // lifetimes and leaves every atomic at zero.
    char* base = static_cast<char*>(mapping.get_address());
    auto* h = new (base) shm::Header{};
    std::uninitialized_value_construct_n(reinterpret_cast<shm::BudgetSlot*>(base + layout.tenant_offset),
                                         spec.tenant_capacity);
    std::uninitialized_value_construct_n(reinterpret_cast<shm::BudgetSlot*>(base + layout.run_offset),
                                         spec.run_capacity);
    std::uninitialized_value_construct_n(reinterpret_cast<shm::ModelSlot*>(base + layout.model_offset),
                                         spec.model_capacity);
    std::uninitialized_value_construct_n(
        reinterpret_cast<shm::ReservationSlot*>(base + layout.reservation_offset), spec.reservation_capacity);
    auto* ledger = reinterpret_cast<shm::LedgerSlot*>(base + layout.ledger_offset);
    std::uninitialized_value_construct_n(ledger, spec.ledger_capacity);
    std::uninitialized_value_construct_n(reinterpret_cast<shm::RuleSlot*>(base + layout.rule_offset),
                                         spec.rule_capacity);

    h->magic = shm::kMagic;
    h->layout_version = shm::kLayoutVersion;
    h->header_bytes = sizeof(shm::Header);
    h->region_bytes = layout.total;
    h->tenant_capacity = spec.tenant_capacity;
    h->run_capacity = spec.run_capacity;
    h->model_capacity = spec.model_capacity;
    h->reservation_capacity = spec.reservation_capacity;
    h->tenant_offset = layout.tenant_offset;
    h->run_offset = layout.run_offset;
    h->model_offset = layout.model_offset;
    h->reservation_offset = layout.reservation_offset;
    h->ledger_capacity = spec.ledger_capacity;
    h->ledger_offset = layout.ledger_offset;
    h->rule_capacity = spec.rule_capacity;
    h->rule_offset = layout.rule_offset;
    h->created_unix_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::system_clock::now().time_since_epoch()).count();
    h->clock_unix_ns.store(h->created_unix_ns, std::memory_order_relaxed);
    h->platform.limit.store(shm::kUnlimited, std::memory_order_relaxed);
    h->defaults.tenant_limit.store(shm::kUnlimited, std::memory_order_relaxed);
    h->defaults.run_limit.store(shm::kUnlimited, std::memory_order_relaxed);
    h->defaults.reservation_ttl_ns.store(std::int64_t{600} * 1'000'000'000, std::memory_order_relaxed);
    for (std::uint32_t i = 0; i < spec.reservation_capacity; ++i) {
      auto& slot = reinterpret_cast<shm::ReservationSlot*>(base + layout.reservation_offset)[i];
      slot.word.store(shm::resWord(0, 1, shm::kResFree, 0), std::memory_order_relaxed);
    }
    // The ring starts where the durable ledger ends: slot for ticket pos is free when seq == pos.
    for (std::uint64_t pos = spec.ledger_base; pos < spec.ledger_base + spec.ledger_capacity; ++pos) {
      ledger[pos & (spec.ledger_capacity - 1)].seq.store(pos, std::memory_order_relaxed);
    }
    h->ledger_tail.store(spec.ledger_base, std::memory_order_relaxed);
    h->ledger_head.store(spec.ledger_base, std::memory_order_relaxed);
    // `ready` stays 0: the creator publishes the region once it has filled in limits and prices.
    out->reset(new Region(spec.shm_name, std::move(shm), std::move(mapping)));
    (*out)->geo_ = geometryOf(layout, spec);
    if (Status c = (*out)->claimClient(); !c.ok()) {
      out->reset();
      return c;
    }
    return {};
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::already_exists_error) {
      return Status::error("shared memory " + displayName(spec.shm_name) + " already exists");
    }
    return Status::error("cannot create shared memory " + displayName(spec.shm_name) + " of " +
                         std::to_string(layout.total) + " bytes: " + e.what());
  }
}

Status Region::attach(const std::string& shm_name, std::unique_ptr<Region>* out, bool own, AttachFailure* why) {
  AttachFailure ignored;
  if (why == nullptr) why = &ignored;
  *why = AttachFailure::kOther;
  if (auto p = validateShmName(shm_name); !p.empty()) return Status::error(p);
  const std::string shown = displayName(shm_name);
  try {
    bip::shared_memory_object shm(bip::open_only, shm_name.c_str(), bip::read_write);
    const bool locked = own && lockOwner(shm);
    bip::offset_t size = 0;
    if (!shm.get_size(size) || size < static_cast<bip::offset_t>(sizeof(shm::Header))) {
      *why = AttachFailure::kNotReady;
      return Status::error("region " + shown + " is " + std::to_string(size) +
                           " bytes, smaller than a tokenfuse header: its creator died while making it, or "
                           "it is not a tokenfuse region; restart tokenfused");
    }
    bip::mapped_region mapping(shm, bip::read_write);
    // The Region first, so that a truncation while the header is read below is caught too (it
    // then reads as zeros: not ready).
    std::unique_ptr<Region> region(new Region(shm_name, std::move(shm), std::move(mapping)));
    const shm::Header* h = region->header_;
    if (own && !locked) {
      *why = AttachFailure::kOwned;
      return Status::error("region " + shown + " is owned by another running tokenfused (pid " +
                           std::to_string(h->agent_pid.load()) +
                           "); stop it first, or give this one another shm name");
    }
    // Each header word is read once into a local, checked, and only the locals are used.
    const std::uint64_t magic = h->magic;
    const std::uint32_t ready = h->ready.load(std::memory_order_acquire);
    // A creator that died before publishing leaves a blank or unpublished header; nothing was
    // ever acknowledged through such a region.
    // A region whose `ready` word was cleared while processes still map it is not one whose
    // creator died: they may have been told entries were booked through it. The owner adopts it
    // (the rest of the header is checked below, and publishing sets `ready` again) rather than
    // replace it under them.
    const bool unready_in_use = own && magic == shm::kMagic &&
                                clientlock::anyHeld(region->lockFd()) == clientlock::Held::kYes;
    if (magic == 0 || (magic == shm::kMagic && ready != 1 && !unready_in_use)) {
      *why = AttachFailure::kNotReady;
      return Status::error("region " + shown +
                           " is not ready: tokenfused is still starting, or died while creating it; "
                           "wait a moment, or restart tokenfused");
    }
    *why = AttachFailure::kIncompatible;
    if (magic != shm::kMagic) {
      return Status::error("region " + shown +
                           " is not a tokenfuse region (bad magic number); check the shm name, or stop "
                           "its owner and restart tokenfused with --recreate-region");
    }
    const std::uint32_t version = h->layout_version;
    if (version != shm::kLayoutVersion) {
      return Status::error("region " + shown + " has layout version " + std::to_string(version) +
                           ", this library speaks " + std::to_string(shm::kLayoutVersion) +
                           ": run a tokenfused and a libtokenfuse of the same release (restart tokenfused "
                           "with --recreate-region once every client is upgraded)");
    }
    const std::uint32_t header_bytes = h->header_bytes;
    const std::uint64_t region_bytes = h->region_bytes;
    if (header_bytes == sizeof(shm::Header) && region_bytes > static_cast<std::uint64_t>(size)) {
      *why = AttachFailure::kDamaged;
      return Status::error("region " + shown + " is damaged: its header says " + std::to_string(region_bytes) +
                           " bytes, the object has " + std::to_string(size) +
                           " (someone truncated it); restart tokenfused, which replaces it");
    }
    if (header_bytes != sizeof(shm::Header) || region_bytes != static_cast<std::uint64_t>(size)) {
      return Status::error("region " + shown + " is inconsistent (header says " + std::to_string(region_bytes) +
                           " bytes, the object has " + std::to_string(size) +
                           "): restart tokenfused with --recreate-region");
    }
    const RegionSpec spec{shm_name, h->tenant_capacity, h->run_capacity, h->model_capacity,
                          h->reservation_capacity, 0, h->ledger_capacity, 0, h->rule_capacity};
    for (auto [what, n] : {std::pair{"tenant capacity", spec.tenant_capacity}, {"run capacity", spec.run_capacity},
                           {"model capacity", spec.model_capacity},
                           {"reservation capacity", spec.reservation_capacity},
                           {"ledger capacity", spec.ledger_capacity}, {"rule capacity", spec.rule_capacity}}) {
      if (auto p = capacityProblem(what, n); !p.empty()) {
        return Status::error("region " + shown + " has a bad header (" + p +
                             "): restart tokenfused with --recreate-region");
      }
    }
    const Layout layout = layoutFor(spec);
    if (layout.total != region_bytes || layout.tenant_offset != h->tenant_offset ||
        layout.run_offset != h->run_offset || layout.model_offset != h->model_offset ||
        layout.reservation_offset != h->reservation_offset || layout.ledger_offset != h->ledger_offset ||
        layout.rule_offset != h->rule_offset) {
      return Status::error("region " + shown +
                           " has table offsets this library does not expect: restart tokenfused with "
                           "--recreate-region");
    }
    // From here on only these copies are used: the header may change under us at any time.
    region->geo_ = geometryOf(layout, spec);
    if (Status c = region->claimClient(); !c.ok()) return c;
    *out = std::move(region);
    *why = AttachFailure::kNone;
    return {};
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::not_found_error) {
      *why = AttachFailure::kNotFound;
      return Status::error("region " + shown + " does not exist: start tokenfused (or pass the shm name it "
                           "was started with)");
    }
    if (e.get_error_code() == bip::security_error) {
      return Status::error("no permission to open region " + shown +
                           ": run as a member of the region's group (usually 'tokenfuse')");
    }
    return Status::error("cannot attach to region " + shown + ": " + e.what());
  }
}

bool Region::remove(const std::string& shm_name) noexcept {
  return bip::shared_memory_object::remove(shm_name.c_str());
}

}  // namespace tokenfuse
