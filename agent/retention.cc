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
  const auto dayOf = [&](std::int64_t ns) {
    return days.dayOf(std::chrono::system_clock::time_point(
        std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::nanoseconds(ns))));
  };
  RetentionBounds b;
  b.keep_since_ns = openWindowsStart(windows, now_ns);
  b.keep_since_day = dayOf(b.keep_since_ns);
  b.pushed_seq = pushed_seq;
  if (policy.retain_days > 0) {
    b.remove_before_ns = std::min(now_ns - policy.retain_days * kDayNs, b.keep_since_ns);
    b.remove_before_day = dayOf(b.remove_before_ns);
  }
  return b;
}

std::int64_t Pruner::removeOldest(std::int64_t before_ns, std::int32_t last_day, std::uint64_t pushed_seq,
                                  std::int64_t budget, const std::stop_token& stop, bool* stopped) {
  std::int64_t removed = 0;
  while (removed < budget) {
    if (stop.stop_requested()) {
      *stopped = true;
      break;
    }
    const std::int64_t want = std::min(policy_.batch_rows, budget - removed);
    const std::int64_t n = ledger_.removeOldest(before_ns, last_day, pushed_seq, want);
    removed += n;
    if (n != 0) rest();
    if (n < want) break;   // nothing older is left
  }
  return removed;
}

void Pruner::rest() {
  ledger_.checkpoint();
  std::this_thread::sleep_for(policy_.pause);
}

PruneReport Pruner::pass(const RetentionBounds& bounds, const std::stop_token& stop) {
  PruneReport r;
  // An entry's budget day is its booking time's, so none booked before a cut-off is on a later
  // day (one more day of slack for entries restamped by the ledger writer).
  if (bounds.remove_before_ns != INT64_MIN) {
    r.removed_for_age = removeOldest(bounds.remove_before_ns, bounds.remove_before_day + 1, bounds.pushed_seq,
                                     INT64_MAX, stop, &r.stopped);
  }
  if (policy_.max_bytes > 0 && !r.stopped) {
    const LedgerSize s = ledger_.size();
    const std::int64_t rows = ledger_.rowCount();
    if (s.usedBytes() > policy_.max_bytes && rows > 0) {
      // Down to 90% of the ceiling, at the entries' average size, so that it is not at the
      // ceiling again with the next batch the writer adds.
      const double per_row = static_cast<double>(s.usedBytes()) / static_cast<double>(rows);
      const auto excess = static_cast<std::int64_t>(
          std::ceil((static_cast<double>(s.usedBytes()) - 0.9 * static_cast<double>(policy_.max_bytes)) / per_row));
      r.removed_for_size =
          removeOldest(bounds.keep_since_ns, bounds.keep_since_day + 1, bounds.pushed_seq, excess, stop, &r.stopped);
    }
  }
  if (bounds.remove_before_ns != INT64_MIN) {
    for (std::int64_t n = policy_.batch_rows; n == policy_.batch_rows && !stop.stop_requested();) {
      n = ledger_.removeSummariesBefore(bounds.remove_before_ns, bounds.remove_before_day, bounds.pushed_seq,
                                        policy_.batch_rows);
      r.summaries_removed += n;
      if (n != 0) rest();
    }
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
    rest();
  }
  r.over_ceiling = policy_.max_bytes > 0 && r.size.usedBytes() > policy_.max_bytes;
  r.rows = ledger_.rowCount();
  if (const auto oldest = ledger_.oldestEntry()) r.oldest_unix_ns = oldest->second;
  return r;
}

}  // namespace tokenfuse
