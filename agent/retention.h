// Ledger retention (docs/operations.md, "Retention"): a ledger that books 100 calls a second
// grows by about 1.3 GB a day, so entries older than [ledger] retain_days, and the oldest beyond
// a size ceiling, are removed in small batches on a thread of their own, and the pages they held
// are given back to the file system (incremental vacuum). What must stay, stays:
//
// - entries the central link has not pushed yet;
// - entries of a window a rule may still have open: this month's and the last seven days' (a
//   week rule), whatever rules are configured now, since a rule added later is rebuilt from them;
// - what the rebuild needs of the rest: runs' lifetimes (spend_by_run), tenants' days
//   (spend_by_day) and the all-time rules' totals (pruned_totals, kept by Ledger::removeEntries).
//
// Thread-safety: a Pruner uses its own Ledger connection; one pass at a time.
#pragma once

#include "ledger.h"

#include <chrono>
#include <cstdint>
#include <optional>
#include <stop_token>
#include <string>

namespace tokenfuse {

class CalendarWindows;
class DayClock;

struct RetentionPolicy {
  std::int64_t retain_days = 90;   // 0: no entry is removed for its age
  std::int64_t max_bytes = 0;      // the file's ceiling (pages in use); 0: none
  // Entries per transaction: the ledger writer waits for one at most. With the pause, 17,000 to
  // 32,000 entries a second on a 2-vCPU VM (docs/performance.md): far more than a host books.
  std::int64_t batch_rows = 500;
  std::chrono::milliseconds pause{5};   // between transactions: the writer's turn
  std::int64_t vacuum_pages = 128;      // pages given back per transaction
};

// What a pass may remove.
struct RetentionBounds {
  std::int64_t remove_before_ns = INT64_MIN;   // entries booked before it go for their age
  std::int32_t remove_before_day = INT32_MIN;  // its budget day: the tenants' day totals before it go
  std::int64_t keep_since_ns = INT64_MIN;      // entries booked at or after it stay, even over the ceiling
  std::int32_t keep_since_day = INT32_MIN;     // its budget day
  std::uint64_t pushed_seq = UINT64_MAX;       // entries after it stay (the central link has not pushed them)
};

// The earliest instant whose entries a rule window could need now: the start of the month, or
// of the day seven days ago if earlier.
std::int64_t openWindowsStart(const CalendarWindows& windows, std::int64_t now_ns);
// The bounds of a pass at `now_ns` under `policy`.
RetentionBounds retentionBounds(const RetentionPolicy& policy, const CalendarWindows& windows, const DayClock& days,
                                std::int64_t now_ns, std::uint64_t pushed_seq);

struct PruneReport {
  std::int64_t removed_for_age = 0;     // entries
  std::int64_t removed_for_size = 0;    // entries
  // Batches' largest count among hourly totals, daily totals and quarantined entries, summed.
  std::int64_t summaries_removed = 0;
  std::int64_t pages_returned = 0;
  bool over_ceiling = false;            // still above max_bytes: what must stay is more
  bool stopped = false;                 // the stop token ended it early
  LedgerSize size;                      // after the pass
  std::int64_t rows = 0;                // after the pass
  std::optional<std::int64_t> oldest_unix_ns;   // after the pass; nullopt: empty
  std::int64_t removed() const noexcept { return removed_for_age + removed_for_size; }
};

class Pruner {
 public:
  Pruner(Ledger& ledger, RetentionPolicy policy) : ledger_(ledger), policy_(policy) {}

  // Removes what the policy lets go within `bounds`, oldest first, and returns the freed pages.
  // Throws LedgerError (what was removed before stays removed: each batch is a transaction).
  PruneReport pass(const RetentionBounds& bounds, const std::stop_token& stop = {});

 private:
  // Removes entries booked before `before_ns` (on days up to `last_day`) with seq <= pushed_seq,
  // oldest day first, at most `budget` of them, a batch per transaction.
  std::int64_t removeOldest(std::int64_t before_ns, std::int32_t last_day, std::uint64_t pushed_seq,
                            std::int64_t budget, const std::stop_token& stop, bool* stopped);

  // After a transaction that changed something: checkpoints it (never into a file that is no
  // longer the ledger: Ledger::checkpoint checks), then gives the writer its turn.
  void rest();

  Ledger& ledger_;
  RetentionPolicy policy_;
};

}  // namespace tokenfuse
