// An open-addressing hash table in shared memory, keyed by a string of at most the slot's key
// buffer (shm::kKeyMax bytes, shm::kRuleKeyMax for rule counters). Lock-free: a slot is claimed
// with one compare-and-swap that carries the key's hash tag and the claimer's client number,
// filled, then published as ready with release order. The word's states are in layout.h.
//
// A reader that meets a slot being filled with the same hash tag waits for it (a few hundred
// nanoseconds). If the filler died half-way, the wait is bounded and the call reports busy; the
// agent's reaper then tombstones the slot.
//
// Keys are removed by the agent only (RegionAdmin::reclaimKeys): it turns a Ready word into a
// reclaiming one, makes sure nothing holds or names the key, and tombstones it. Anyone who looks
// the key up meanwhile takes it back (the word turns Ready again, one generation on), so a lookup
// never waits for a reclaim and a key in use is never removed. An insert reuses the first
// tombstone of its probe sequence; two inserts of one key racing for different slots are
// resolved after the claim (the one further along gives way). Slots never become empty again, so
// probe sequences stay whole.
//
// A found index therefore stays this key's only as long as the slot's word is unchanged: callers
// that keep an index keep the word with it (Found::word) and check it (current()) around use.
//
// A key lives at most kMaxProbe - 1 slots after its home slot (hash & mask). An insert that finds
// no free slot within kMaxProbe slots answers kFull for that key, even if the table has room
// elsewhere; a lookup stops at the same bound and answers kFull too (the key is not there and
// could not be added). So a lookup in a full table costs at most kMaxProbe slots, not the table.
#pragma once

#include "layout.h"

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <string>
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
  std::uint64_t word = 0;   // kFound, kInserted: the slot's Ready word; still there, still this key
};

// A slot's key, with its length clamped to the key buffer: key_len is in the region, which any
// group member can write. Read key_len once.
template <std::size_t N>
inline std::string_view keyOf(const shm::KeyHeaderOf<N>& k) noexcept {
  const std::uint32_t len = k.key_len;
  return {k.key, len < N ? len : N};
}

// The key of a slot that holds one, copied: false when it holds none, or when it was reclaimed
// and reused while being copied (the agent's threads read keys while applications insert).
template <std::size_t N>
inline bool copyReadyKey(const shm::KeyHeaderOf<N>& k, std::string* out) {
  const std::uint64_t w = k.word.load(std::memory_order_acquire);
  if (shm::keyState(w) != shm::kKeyReady) return false;
  const std::uint32_t len = std::min<std::uint32_t>(__atomic_load_n(&k.key_len, __ATOMIC_RELAXED), N);
  out->resize(len);
  for (std::uint32_t j = 0; j < len; ++j) (*out)[j] = __atomic_load_n(&k.key[j], __ATOMIC_RELAXED);
  std::atomic_thread_fence(std::memory_order_acquire);
  return k.word.load(std::memory_order_relaxed) == w;
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

  // Finds `key`, or inserts it: `init(slot)` fills the value before the slot is published. A
  // reused slot's counters are as the agent left them when it reclaimed the key (layout.h).
  template <typename Init>
  Found findOrInsert(std::string_view key, std::uint32_t pid, Init&& init) const noexcept {
    return probe(key, pid, true, init);
  }

  // Whether the slot at `index` still holds the key it held with Ready word `word`. A reclaim
  // under way is undone: whoever still uses a key keeps it.
  // (Callers that need it ordered after their holds fence first: see Engine::reserve.)
  bool current(std::int32_t index, std::uint64_t word) const noexcept {
    const std::uint64_t now = slots_[index].k.word.load(std::memory_order_seq_cst);
    return now == word || takeBack(index, word, now);
  }

 private:
  [[gnu::cold]] [[gnu::noinline]] bool takeBack(std::int32_t index, std::uint64_t word, std::uint64_t now) const noexcept {
    return now == shm::reclaimWord(word) && slots_[index].k.word.compare_exchange_strong(now, shm::keptWord(now));
  }

  static constexpr int kSpinLimit = 1 << 16;
  static constexpr int kMaxRounds = 64;

  enum class Seen { kEmpty, kTombstone, kOther, kMatch, kBusy };
  struct Look {
    Seen what;
    std::uint64_t word;
  };

  // The key bytes of a slot can be rewritten while they are compared (the slot reclaimed and
  // reused meanwhile; look() then sees its word change): read and written one atomic byte at a
  // time, so that this is a race the language allows. Keys are short.
  template <std::size_t N>
  static bool sameKey(const shm::KeyHeaderOf<N>& k, std::string_view key) noexcept {
    const std::uint32_t len = __atomic_load_n(&k.key_len, __ATOMIC_RELAXED);   // once: the region may change it
    if (len != key.size() || len > N) return false;
    for (std::size_t j = 0; j < len; ++j) {
      if (__atomic_load_n(&k.key[j], __ATOMIC_RELAXED) != key[j]) return false;
    }
    return true;
  }
  template <std::size_t N>
  static void setKey(shm::KeyHeaderOf<N>& k, std::string_view key) noexcept {
    __atomic_store_n(&k.key_len, static_cast<std::uint32_t>(key.size()), __ATOMIC_RELAXED);
    for (std::size_t j = 0; j < key.size(); ++j) __atomic_store_n(&k.key[j], key[j], __ATOMIC_RELAXED);
  }

  // What slot i holds for `key`, waiting out a fill of the same tag; a reclaim of this very key is
  // undone, and the key found.
  Look look(std::uint32_t i, std::uint32_t tag, std::string_view key) const noexcept {
    auto& k = slots_[i].k;
    std::uint64_t w = k.word.load(std::memory_order_acquire);
    for (int spins = 0;;) {
      const shm::KeyState state = shm::keyState(w);
      if (state == shm::kKeyEmpty) return {Seen::kEmpty, w};
      if (state == shm::kKeyTombstone) return {Seen::kTombstone, w};
      if (shm::keyTag(w) != tag) return {Seen::kOther, w};
      if (state == shm::kKeyInit && !shm::keyReclaiming(w)) {
        if (++spins > kSpinLimit) return {Seen::kBusy, w};
        cpuRelax();
        w = k.word.load(std::memory_order_acquire);
        continue;
      }
      // Ready or reclaiming: the key bytes are whole. Read again after comparing, so that a
      // slot reused meanwhile is not taken for this key.
      const bool same = sameKey(k, key);
      std::atomic_thread_fence(std::memory_order_acquire);   // the key's bytes before the word again
      const std::uint64_t again = k.word.load(std::memory_order_relaxed);
      if (again != w) {
        if (++spins > kSpinLimit) return {Seen::kBusy, again};
        w = again;
        continue;
      }
      if (!same) return {Seen::kOther, w};
      if (state == shm::kKeyReady) return {Seen::kMatch, w};
      const std::uint64_t kept = shm::keptWord(w);
      if (k.word.compare_exchange_strong(w, kept, std::memory_order_acq_rel, std::memory_order_acquire)) {
        return {Seen::kMatch, kept};
      }
    }
  }

  template <typename Init>
  Found probe(std::string_view key, std::uint32_t pid, bool insert, Init&& init) const noexcept {
    const std::uint64_t h = hashKey(key);
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    const std::uint32_t home = static_cast<std::uint32_t>(h) & mask_;
    const std::uint32_t bound = mask_ < kMaxProbe ? mask_ + 1 : kMaxProbe;
    for (int round = 0; round < kMaxRounds; ++round) {
      // The key, or the first slot it could go in: a tombstone, or the empty slot that ends the
      // probe sequence.
      std::int32_t free_at = -1;
      std::uint32_t free_n = 0;
      std::uint64_t free_word = 0;
      for (std::uint32_t n = 0; n < bound; ++n) {
        const std::uint32_t i = (home + n) & mask_;
        const Look l = look(i, tag, key);
        if (l.what == Seen::kBusy) return {Lookup::kBusy, -1};
        if (l.what == Seen::kMatch) return {Lookup::kFound, static_cast<std::int32_t>(i), l.word};
        if ((l.what == Seen::kEmpty || l.what == Seen::kTombstone) && free_at < 0) {
          free_at = static_cast<std::int32_t>(i);
          free_n = n;
          free_word = l.word;
        }
        if (l.what == Seen::kEmpty) break;
      }
      if (free_at < 0) return {Lookup::kFull, -1};
      if (!insert) return {Lookup::kAbsent, -1};

      auto& k = slots_[free_at].k;
      const std::uint64_t claimed = shm::keyWord(tag, shm::kKeyInit, pid);
      if (!k.word.compare_exchange_strong(free_word, claimed, std::memory_order_seq_cst, std::memory_order_relaxed)) {
        continue;   // taken meanwhile: look again
      }
      const std::uint32_t gen =
          shm::keyState(free_word) == shm::kKeyTombstone ? (shm::keyGen(free_word) + 1) & shm::kKeyGenMask : 0;
      setKey(k, key);
      init(slots_[free_at]);
      const Found other = rival(home, bound, free_n, tag, key);
      if (other.what != Lookup::kInserted) {
        // Gives way: the slot goes back to being free. (A CAS, as below: if the reaper took it
        // meanwhile, it is already free.)
        std::uint64_t expect = claimed;
        (void)k.word.compare_exchange_strong(expect, shm::keyWord(tag, shm::kKeyTombstone, gen), std::memory_order_release,
                                             std::memory_order_relaxed);
        if (other.what == Lookup::kFound || other.what == Lookup::kBusy) return other;
        continue;   // an insert further back in the sequence: look again (it will be waited for)
      }
      // A CAS, not a store: if the reaper took this slot for a dead writer's (it cannot tell a
      // stopped process from a dead one forever), look again instead.
      const std::uint64_t ready = shm::keyWord(tag, shm::kKeyReady, gen);
      std::uint64_t expect = claimed;
      if (k.word.compare_exchange_strong(expect, ready, std::memory_order_release, std::memory_order_relaxed)) {
        return {Lookup::kInserted, free_at, ready};
      }
    }
    return {Lookup::kBusy, -1};
  }

  // After claiming the slot `mine_n` places into the probe sequence: another slot of the sequence
  // that holds or is getting `key` (a slot turned free under an insert that had passed it lets two
  // inserts of one key claim two slots). The one further along gives way: kInserted means none
  // ahead, keep mine; kFound, the key is in another slot; kAbsent, an insert further back is under
  // way; kBusy, one further along never finished.
  Found rival(std::uint32_t home, std::uint32_t bound, std::uint32_t mine_n, std::uint32_t tag,
              std::string_view key) const noexcept {
    for (std::uint32_t n = 0; n < bound; ++n) {
      if (n == mine_n) continue;
      const std::uint32_t i = (home + n) & mask_;
      std::uint64_t w = slots_[i].k.word.load(std::memory_order_seq_cst);
      if (shm::keyState(w) == shm::kKeyEmpty) break;
      if (shm::keyState(w) == shm::kKeyTombstone || shm::keyTag(w) != tag) continue;
      if (shm::keyState(w) == shm::kKeyInit && !shm::keyReclaiming(w) && n < mine_n) return {Lookup::kAbsent, -1};
      // Further along and being filled: wait for it, as it gives way to this one or has seen none.
      const Look l = look(i, tag, key);
      if (l.what == Seen::kMatch) return {Lookup::kFound, static_cast<std::int32_t>(i), l.word};
      if (l.what == Seen::kBusy) return {Lookup::kBusy, -1};
    }
    return {Lookup::kInserted, -1};
  }

  Slot* slots_;
  std::uint32_t mask_;
};

}  // namespace tokenfuse
