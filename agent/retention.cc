#include "retention.h"

#include "calendar_window.h"
#include "day_clock.h"

#include <algorithm>
#include <cmath>
#include <thread>

namespace tokenfuse {

namespace {
constexpr std::int64_t kDayNs = std::int64_t{86400} * 1'000'000'000;
}

std::int64_t openWindowsStart(const CalendarWindows& windows, std::int64_t now_ns) {
  const WindowSpan today = windows.at({WindowKind::kDay}, now_ns);
  const std::int64_t week = windows.byId({WindowKind::kDay}, today.id - 7).start_ns;
  return std::min(windows.at({WindowKind::kMonth}, now_ns).start_ns, week);
}

RetentionBounds retentionBounds(const RetentionPolicy& policy, const CalendarWindows& windows, const DayClock& days,
                                std::int64_t now_ns, std::uint64_t pushed_seq) {
  RetentionBounds b;
  b.keep_since_ns = openWindowsStart(windows, now_ns);
  b.pushed_seq = pushed_seq;
  if (policy.retain_days > 0) {
    b.remove_before_ns = std::min(now_ns - policy.retain_days * kDayNs, b.keep_since_ns);
    b.remove_before_day = days.dayOf(std::chrono::system_clock::time_point(
        std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::nanoseconds(b.remove_before_ns))));
  }
  return b;
}

std::int64_t Pruner::removeOldest(std::int64_t before_ns, std::uint64_t pushed_seq, std::int64_t budget,
                                  const std::stop_token& stop, bool* stopped) {
  std::int64_t removed = 0;
  const std::optional<std::pair<std::uint64_t, std::int64_t>> oldest = ledger_.oldestEntry();
  if (!oldest || oldest->second >= before_ns) return 0;
  std::uint64_t cursor = oldest->first;
  while (removed < budget && cursor <= pushed_seq) {
    if (stop.stop_requested()) {
      *stopped = true;
      break;
    }
    const std::uint64_t last =
        std::min(ledger_.nthSeqFrom(cursor, std::min(policy_.batch_rows, budget - removed)), pushed_seq);
    if (last < cursor) break;   // no entry from the cursor on (nthSeqFrom gave 0)
    const std::int64_t n = ledger_.removeEntries(cursor, last, before_ns);
    if (n == 0) break;   // the oldest entries left are too young
    removed += n;
    cursor = last + 1;
    std::this_thread::sleep_for(policy_.pause);
  }
  return removed;
}

PruneReport Pruner::pass(const RetentionBounds& bounds, const std::stop_token& stop) {
  PruneReport r;
  r.removed_for_age = removeOldest(bounds.remove_before_ns, bounds.pushed_seq, INT64_MAX, stop, &r.stopped);
  if (policy_.max_bytes > 0 && !r.stopped) {
    const LedgerSize s = ledger_.size();
    const std::int64_t rows = ledger_.rowCount();
    if (s.usedBytes() > policy_.max_bytes && rows > 0) {
      // Down to 90% of the ceiling, at the entries' average size, so that it is not at the
      // ceiling again with the next batch the writer adds.
      const double per_row = static_cast<double>(s.usedBytes()) / static_cast<double>(rows);
      const auto excess = static_cast<std::int64_t>(
          std::ceil((static_cast<double>(s.usedBytes()) - 0.9 * static_cast<double>(policy_.max_bytes)) / per_row));
      r.removed_for_size = removeOldest(bounds.keep_since_ns, bounds.pushed_seq, excess, stop, &r.stopped);
    }
  }
  if (bounds.remove_before_ns != INT64_MIN && !r.stopped) {
    r.summaries_removed = ledger_.removeSummariesBefore(bounds.remove_before_ns, bounds.remove_before_day,
                                                        bounds.pushed_seq, policy_.batch_rows);
  }
  r.size = ledger_.size();
  // Pages freed go back to the file system a batch at a time, so that the writer waits for one
  // short transaction at most.
  while (r.size.incremental_vacuum && r.size.free_pages > 0 && !stop.stop_requested()) {
    const std::int64_t before = r.size.free_pages;
    ledger_.incrementalVacuum(std::min(before, policy_.vacuum_pages));
    r.size = ledger_.size();
    if (r.size.free_pages >= before) break;
    r.pages_returned += before - r.size.free_pages;
    std::this_thread::sleep_for(policy_.pause);
  }
  r.over_ceiling = policy_.max_bytes > 0 && r.size.usedBytes() > policy_.max_bytes;
  r.rows = ledger_.rowCount();
  if (const auto oldest = ledger_.oldestEntry()) r.oldest_unix_ns = oldest->second;
  return r;
}

}  // namespace tokenfuse
