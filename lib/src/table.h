// An insert-only, open-addressing hash table in shared memory, keyed by a string of at most
// the slot's key buffer (shm::kKeyMax bytes, shm::kRuleKeyMax for rule counters). Lock-free: a slot is claimed with one compare-and-swap that carries the
// key's hash tag and the claimer's pid, filled, then published as ready with release order.
//
// A reader that meets a slot being filled with the same hash tag waits for it (a few hundred
// nanoseconds). If the filler died half-way, the wait is bounded and the call reports busy; the
// agent's reaper then tombstones the slot. Entries are never removed while the region lives, so
// a found index stays valid: callers may cache it (CallSite).
//
// A key lives at most kMaxProbe - 1 slots after its home slot (hash & mask). An insert that finds
// no free slot within kMaxProbe slots answers kFull for that key, even if the table has room
// elsewhere; a lookup stops at the same bound and answers kFull too (the key is not there and
// could not be added). So a lookup in a full table costs at most kMaxProbe slots, not the table.
#pragma once

#include "layout.h"

#include <cstdint>
#include <cstring>
#include <string_view>

namespace tokenfuse {

// FNV-1a, 64-bit: keys are short, so a simple byte loop beats anything with a set-up cost.
inline std::uint64_t hashKey(std::string_view key) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : key) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

inline void cpuRelax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

enum class Lookup { kFound, kInserted, kAbsent, kFull, kBusy };

struct Found {
  Lookup what;
  std::int32_t index;
};

// A slot's key, with its length clamped to the key buffer: key_len is in the region, which any
// group member can write. Read key_len once.
template <std::size_t N>
inline std::string_view keyOf(const shm::KeyHeaderOf<N>& k) noexcept {
  const std::uint32_t len = k.key_len;
  return {k.key, len < N ? len : N};
}

template <typename Slot>
class KeyedTable {
 public:
  static constexpr std::uint32_t kMaxProbe = 64;

  KeyedTable(Slot* slots, std::uint32_t capacity) noexcept : slots_(slots), mask_(capacity - 1) {}

  Slot& at(std::int32_t index) const noexcept { return slots_[index]; }
  std::uint32_t capacity() const noexcept { return mask_ + 1; }

  // kFound, kAbsent (not there: an insert would add it), kFull (not there, and no room for it
  // within the probe bound) or kBusy.
  Found find(std::string_view key) const noexcept {
    return probe(key, 0, false, [](Slot&) noexcept {});
  }

  // Finds `key`, or inserts it: `init(slot)` fills the value before the slot is published.
  template <typename Init>
  Found findOrInsert(std::string_view key, std::uint32_t pid, Init&& init) const noexcept {
    return probe(key, pid, true, init);
  }

 private:
  static constexpr int kSpinLimit = 1 << 16;

  template <typename Init>
  Found probe(std::string_view key, std::uint32_t pid, bool insert, Init&& init) const noexcept {
    const std::uint64_t h = hashKey(key);
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    std::uint32_t i = static_cast<std::uint32_t>(h) & mask_;
    for (std::uint32_t n = 0; n <= mask_ && n < kMaxProbe; ++n, i = (i + 1) & mask_) {
      auto& k = slots_[i].k;
      constexpr std::size_t kMax = sizeof(k.key);
      std::uint64_t w = k.word.load(std::memory_order_acquire);
      int spins = 0;
      for (;;) {   // look at slot i until it is decided; then go on to the next slot
        const shm::KeyState state = shm::keyState(w);
        if (state == shm::kKeyEmpty) {
          if (!insert) return {Lookup::kAbsent, -1};
          const std::uint64_t claimed = shm::keyWord(tag, shm::kKeyInit, pid);
          if (k.word.compare_exchange_strong(w, claimed, std::memory_order_seq_cst, std::memory_order_acquire)) {
            k.key_len = static_cast<std::uint32_t>(key.size());
            std::memcpy(k.key, key.data(), key.size());
            init(slots_[i]);
            // A CAS, not a store: if the reaper took this slot for a dead writer's (it cannot
            // tell a stopped process from a dead one forever), look further instead.
            std::uint64_t expect = claimed;
            if (k.word.compare_exchange_strong(expect, shm::keyWord(tag, shm::kKeyReady, 0),
                                               std::memory_order_release, std::memory_order_relaxed)) {
              return {Lookup::kInserted, static_cast<std::int32_t>(i)};
            }
            break;
          }
          continue;   // lost the race: w holds what won; look again
        }
        if (state == shm::kKeyTombstone || shm::keyTag(w) != tag) break;
        if (state == shm::kKeyInit) {
          if (++spins > kSpinLimit) return {Lookup::kBusy, -1};
          cpuRelax();
          w = k.word.load(std::memory_order_acquire);
          continue;
        }
        const std::uint32_t len = k.key_len;   // once: the region may change it under us
        if (len == key.size() && len <= kMax && std::memcmp(k.key, key.data(), len) == 0) {
          return {Lookup::kFound, static_cast<std::int32_t>(i)};
        }
        break;
      }
    }
    return {Lookup::kFull, -1};
  }

  Slot* slots_;
  std::uint32_t mask_;
};

}  // namespace tokenfuse
