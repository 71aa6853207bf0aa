// The ledger ring in the region (see layout.h): producers are the application processes that
// commit or record calls; the single consumer is the agent.
//
// Any member of the region's group can write any word of the ring, so neither side trusts what
// it reads there: every loop is bounded, a word that no correct process would have written ends
// a producer's call with "corrupt" (kRegionCorrupt) instead of a spin, and the agent, which keeps
// its own durable position, repairs what it finds.
#pragma once

#include "layout.h"
#include "table.h"

#include <cstdint>
#include <cstring>
#include <string_view>

namespace tokenfuse {

// A 64-bit hash of a ledger entry and its ticket, computed by the producer just before it
// publishes and checked by the agent on its own copy of the slot: an entry scribbled on after it
// was written (or a stale one from another lap) does not match. Not a secret: it detects
// accidents and blind writes, not a forger who recomputes it (who could as well have recorded
// the call). `E` is a LedgerSlot or the agent's copy of one (same field names).
template <typename E>
std::uint64_t ledgerChecksum(const E& e, std::uint64_t pos) noexcept {
  std::uint64_t h = 0x243f'6a88'85a3'08d3ull;
  auto mix = [&h](std::uint64_t v) noexcept {
    h = (h ^ v) * 0x9e37'79b9'7f4a'7c15ull;
    h ^= h >> 29;
  };
  mix(pos);
  mix(e.kind);
  mix(static_cast<std::uint64_t>(e.unix_ns));
  mix(static_cast<std::uint64_t>(e.prompt_tokens));
  mix(static_cast<std::uint64_t>(e.completion_tokens));
  mix(static_cast<std::uint64_t>(e.cost_nano_usd));
  mix(e.reservation_id);
  mix(static_cast<std::uint32_t>(e.day));
  std::size_t total = 0;
  std::uint64_t lens = 0;
  for (std::size_t i = 0; i < 5; ++i) {
    total += e.text.len[i];
    lens = (lens << 12) ^ e.text.len[i];
  }
  mix(lens);
  if (total > sizeof e.text.bytes) total = sizeof e.text.bytes;
  for (std::size_t off = 0; off < total; off += 8) {
    std::uint64_t w = 0;
    std::memcpy(&w, e.text.bytes + off, total - off < 8 ? total - off : 8);
    mix(w);
  }
  const std::string_view tags = e.tags.get();
  mix(e.tags.len);
  for (std::size_t off = 0; off < tags.size(); off += 8) {
    std::uint64_t w = 0;
    std::memcpy(&w, tags.data() + off, tags.size() - off < 8 ? tags.size() - off : 8);
    mix(w);
  }
  return h;
}

class LedgerRing {
 public:
  // `capacity`: the region's copied geometry (Region::geometry()), never the header's word.
  LedgerRing(shm::Header& header, shm::LedgerSlot* slots, std::uint32_t capacity) noexcept
      : h_(header), slots_(slots), mask_(capacity - 1) {}

  shm::LedgerSlot& at(std::uint64_t pos) const noexcept { return slots_[pos & mask_]; }
  std::uint64_t capacity() const noexcept { return std::uint64_t{mask_} + 1; }

  // --- producers (noexcept, no system call) ---

  // Claims the slot for the next ticket and records the writer's client number in it. Returns nullptr when
  // the ring is full (the agent is behind by a whole ring), or, with *corrupt set, when the ring
  // holds words no correct process writes (the agent repairs them; retry later). Bounded.
  shm::LedgerSlot* claim(std::uint32_t client, std::uint64_t* pos,
                         bool* corrupt = nullptr) noexcept {
    if (corrupt != nullptr) *corrupt = false;
    std::uint64_t p = h_.ledger_tail.load(std::memory_order_relaxed);
    for (std::uint32_t tries = 0; tries < kClaimTries; ++tries) {
      shm::LedgerSlot& s = at(p);
      const std::uint64_t seq = s.seq.load(std::memory_order_acquire);
      const auto lag = static_cast<std::int64_t>(seq - p);
      if (lag == 0) {
        if (h_.ledger_tail.compare_exchange_weak(p, p + 1, std::memory_order_relaxed, std::memory_order_relaxed)) {
          s.writer_pid.store(client, std::memory_order_relaxed);
          *pos = p;
          return &s;
        }
        continue;   // p is the tail another producer left
      }
      if (lag > 0) {
        const std::uint64_t now = h_.ledger_tail.load(std::memory_order_relaxed);
        if (now != p) {   // another producer took ticket p: the usual race
          p = now;
          continue;
        }
        // Ticket p is taken (published, or written and handed back) yet the tail still names
        // it: the tail was moved back from outside. Moving it on is what the producer that took
        // p did; a correct ring never gets here, so this only repairs.
        if (seq == p + 1 || seq == p + capacity()) {
          std::uint64_t expect = p;
          p = h_.ledger_tail.compare_exchange_strong(expect, p + 1, std::memory_order_relaxed) ? p + 1 : expect;
          continue;
        }
        break;   // corrupt
      }
      // The slot still holds the previous lap's entry, claimed or published: full.
      if (seq == p - capacity() || seq == p - capacity() + 1) return nullptr;
      break;   // corrupt
    }
    if (corrupt != nullptr) *corrupt = true;
    return nullptr;
  }

  // Makes the entry visible to the agent; its sequence number is pos + 1. False if the agent
  // abandoned the slot first (this writer was stopped for longer than the agent waits).
  static bool publish(shm::LedgerSlot& s, std::uint64_t pos) noexcept {
    s.check = ledgerChecksum(s, pos);
    std::uint64_t expect = pos;
    return s.seq.compare_exchange_strong(expect, pos + 1, std::memory_order_release, std::memory_order_relaxed);
  }

  // --- the consumer (the agent) ---

  // Where ticket `pos` stands, for a consumer that trusts the region (benchmarks); the agent's
  // writer reads the words itself and checks them.
  enum class State { kPublished, kEmpty, kWriting };
  State state(std::uint64_t pos) const noexcept {
    const std::uint64_t seq = at(pos).seq.load(std::memory_order_acquire);
    if (seq == pos + 1) return State::kPublished;
    return h_.ledger_tail.load(std::memory_order_acquire) > pos ? State::kWriting : State::kEmpty;
  }

  // Hands the slot of ticket `pos` to the next lap. Only after its entry is durable.
  void release(std::uint64_t pos) noexcept {
    shm::LedgerSlot& s = at(pos);
    s.writer_pid.store(0, std::memory_order_relaxed);
    s.seq.store(pos + capacity(), std::memory_order_release);
  }
  // Gives up on a claimed, unpublished slot. False if its writer published it meanwhile.
  bool abandon(std::uint64_t pos) noexcept {
    shm::LedgerSlot& s = at(pos);
    std::uint64_t expect = pos;
    return s.seq.compare_exchange_strong(expect, pos + capacity(), std::memory_order_acq_rel,
                                         std::memory_order_relaxed);
  }
  // Sets a slot's sequence word from `seen` (what the agent read) to `want`; false if it changed
  // meanwhile.
  bool resetSeq(std::uint64_t pos, std::uint64_t seen, std::uint64_t want) noexcept {
    return at(pos).seq.compare_exchange_strong(seen, want, std::memory_order_acq_rel, std::memory_order_relaxed);
  }

 private:
  // Each try is a few loads; a correct ring needs more only under extreme contention, where
  // every failed try is another producer's success.
  static constexpr std::uint32_t kClaimTries = 1u << 16;

  shm::Header& h_;
  shm::LedgerSlot* slots_;
  std::uint32_t mask_;
};

}  // namespace tokenfuse
