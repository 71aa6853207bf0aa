// The ledger ring in the region (see layout.h): producers are the application processes that
// commit or record calls; the single consumer is the agent.
#pragma once

#include "layout.h"
#include "table.h"

#include <cstdint>
#include <cstring>
#include <string_view>

namespace tokenfuse {

class LedgerRing {
 public:
  // `capacity`: the region's copied geometry (Region::geometry()), never the header's word.
  LedgerRing(shm::Header& header, shm::LedgerSlot* slots, std::uint32_t capacity) noexcept
      : h_(header), slots_(slots), mask_(capacity - 1) {}

  shm::LedgerSlot& at(std::uint64_t pos) const noexcept { return slots_[pos & mask_]; }
  std::uint64_t capacity() const noexcept { return std::uint64_t{mask_} + 1; }

  // --- producers (noexcept, no system call) ---

  // Claims the slot for the next ticket and records the writer's pid in it. Returns nullptr when
  // the ring is full: the agent is behind by a whole ring.
  shm::LedgerSlot* claim(std::uint32_t pid, std::uint64_t start_time, std::uint64_t* pos) noexcept {
    std::uint64_t p = h_.ledger_tail.load(std::memory_order_relaxed);
    for (;;) {
      shm::LedgerSlot& s = at(p);
      const std::uint64_t seq = s.seq.load(std::memory_order_acquire);
      const auto lag = static_cast<std::int64_t>(seq - p);
      if (lag == 0) {
        if (h_.ledger_tail.compare_exchange_weak(p, p + 1, std::memory_order_relaxed, std::memory_order_relaxed)) {
          s.writer_pid.store(pid, std::memory_order_relaxed);
          s.writer_start.store(start_time, std::memory_order_relaxed);
          *pos = p;
          return &s;
        }
      } else if (lag < 0) {
        return nullptr;   // still holds an entry of the previous lap
      } else {
        p = h_.ledger_tail.load(std::memory_order_relaxed);   // another producer took it
      }
    }
  }

  // Makes the entry visible to the agent; its sequence number is pos + 1. False if the agent
  // abandoned the slot first (this writer was stopped for longer than the agent waits).
  static bool publish(shm::LedgerSlot& s, std::uint64_t pos) noexcept {
    std::uint64_t expect = pos;
    return s.seq.compare_exchange_strong(expect, pos + 1, std::memory_order_release, std::memory_order_relaxed);
  }

  // --- the consumer (the agent) ---

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
    s.writer_start.store(0, std::memory_order_relaxed);
    s.seq.store(pos + capacity(), std::memory_order_release);
  }
  // Gives up on a claimed, unpublished slot. False if its writer published it meanwhile.
  bool abandon(std::uint64_t pos) noexcept {
    shm::LedgerSlot& s = at(pos);
    std::uint64_t expect = pos;
    return s.seq.compare_exchange_strong(expect, pos + capacity(), std::memory_order_acq_rel,
                                         std::memory_order_relaxed);
  }
  // After an agent restart: slots before `head` that were written (or abandoned) but not yet
  // handed back when the previous agent died are handed back now.
  void repairBefore(std::uint64_t head) noexcept {
    const std::uint64_t from = head > capacity() ? head - capacity() : 0;
    for (std::uint64_t p = from; p < head; ++p) {
      const std::uint64_t seq = at(p).seq.load(std::memory_order_acquire);
      if (seq == p + 1 || seq == p) release(p);
    }
  }

 private:
  shm::Header& h_;
  shm::LedgerSlot* slots_;
  std::uint32_t mask_;
};

}  // namespace tokenfuse
