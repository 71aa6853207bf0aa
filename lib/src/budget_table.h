// Inserting a tenant or run key: written once, for the engine (a call's first sight of a key) and
// the agent (limits, the central link's spending elsewhere, the rebuild from the ledger) alike.
#pragma once

#include "layout.h"
#include "table.h"

#include <atomic>
#include <cstdint>
#include <string_view>

namespace tokenfuse {

// Finds `key`, or inserts it with the region's current default limit for its table
// (`default_limit`: Defaults::tenant_limit or ::run_limit), so that a new entry is never briefly
// unlimited, and the ledger's tail (Counters::born_seq). kFull when the table has no room for it within the probe bound (table.h).
inline Found findOrInsertBudget(const KeyedTable<shm::BudgetSlot>& table, std::string_view key, std::uint32_t pid,
                                const std::atomic<std::int64_t>& default_limit,
                                const std::atomic<std::uint64_t>& ledger_tail) noexcept {
  return table.findOrInsert(key, pid, [&](shm::BudgetSlot& s) noexcept {
    s.c.born_seq.store(ledger_tail.load(std::memory_order_relaxed), std::memory_order_relaxed);
    // seq_cst pairs with RegionAdmin::setDefaultLimit: an inserter that read the old default
    // claimed its slot before the new default was stored, so that sweep sees the slot and
    // corrects it.
    s.c.limit.store(default_limit.load(std::memory_order_seq_cst), std::memory_order_relaxed);
  });
}

}  // namespace tokenfuse
