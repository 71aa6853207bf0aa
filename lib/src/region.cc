#include "region.h"

#include "proc.h"

#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/permissions.hpp>

#include <sys/file.h>

#include <bit>
#include <chrono>
#include <memory>
#include <new>
#include <utility>

namespace tokenfuse {

namespace bip = boost::interprocess;

namespace {

constexpr std::uint64_t alignUp(std::uint64_t n, std::uint64_t a) { return (n + a - 1) / a * a; }

struct Layout {
  std::uint64_t tenant_offset, run_offset, model_offset, reservation_offset, ledger_offset, total;
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

}  // namespace

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
      header_(static_cast<shm::Header*>(mapping_.get_address())) {}

bool Region::matches(const RegionSpec& spec) const noexcept {
  return header_->tenant_capacity == spec.tenant_capacity && header_->run_capacity == spec.run_capacity &&
         header_->model_capacity == spec.model_capacity &&
         header_->reservation_capacity == spec.reservation_capacity &&
         header_->ledger_capacity == spec.ledger_capacity;
}

Status Region::create(const RegionSpec& spec, std::unique_ptr<Region>* out) {
  if (auto p = validateShmName(spec.shm_name); !p.empty()) return Status::error(p);
  for (auto [what, n] : {std::pair{"tenant capacity", spec.tenant_capacity}, {"run capacity", spec.run_capacity},
                         {"model capacity", spec.model_capacity},
                         {"reservation capacity", spec.reservation_capacity},
                         {"ledger capacity", spec.ledger_capacity}}) {
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
    const auto* h = static_cast<const shm::Header*>(mapping.get_address());
    if (own && !locked) {
      *why = AttachFailure::kOwned;
      return Status::error("region " + shown + " is owned by another running tokenfused (pid " +
                           std::to_string(h->agent_pid.load()) +
                           "); stop it first, or give this one another shm name");
    }
    // A creator that died before publishing leaves a blank or unpublished header; nothing was
    // ever acknowledged through such a region.
    if (h->magic == 0 || (h->magic == shm::kMagic && h->ready.load(std::memory_order_acquire) != 1)) {
      *why = AttachFailure::kNotReady;
      return Status::error("region " + shown +
                           " is not ready: tokenfused is still starting, or died while creating it; "
                           "wait a moment, or restart tokenfused");
    }
    *why = AttachFailure::kIncompatible;
    if (h->magic != shm::kMagic) {
      return Status::error("region " + shown +
                           " is not a tokenfuse region (bad magic number); check the shm name, or stop "
                           "its owner and restart tokenfused with --recreate-region");
    }
    if (h->layout_version != shm::kLayoutVersion) {
      return Status::error("region " + shown + " has layout version " + std::to_string(h->layout_version) +
                           ", this library speaks " + std::to_string(shm::kLayoutVersion) +
                           ": run a tokenfused and a libtokenfuse of the same release (restart tokenfused "
                           "with --recreate-region once every client is upgraded)");
    }
    if (h->header_bytes != sizeof(shm::Header) || h->region_bytes != static_cast<std::uint64_t>(size)) {
      return Status::error("region " + shown + " is inconsistent (header says " + std::to_string(h->region_bytes) +
                           " bytes, the object has " + std::to_string(size) +
                           "): restart tokenfused with --recreate-region");
    }
    const RegionSpec spec{shm_name, h->tenant_capacity, h->run_capacity, h->model_capacity,
                          h->reservation_capacity, 0, h->ledger_capacity, 0};
    const Layout layout = layoutFor(spec);
    if (layout.total != h->region_bytes || layout.tenant_offset != h->tenant_offset ||
        layout.run_offset != h->run_offset || layout.model_offset != h->model_offset ||
        layout.reservation_offset != h->reservation_offset || layout.ledger_offset != h->ledger_offset) {
      return Status::error("region " + shown +
                           " has table offsets this library does not expect: restart tokenfused with "
                           "--recreate-region");
    }
    out->reset(new Region(shm_name, std::move(shm), std::move(mapping)));
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
