// Calendar windows for budget rules (issue 14): minute, hour, day, week, month and all time, in
// one IANA time zone, fixed and aligned to the local calendar. A window is named by a number
// that grows by one from each window to the next, and spans [start, end): consecutive windows
// share their boundary, so a counter kept per window id resets exactly at the boundary and never
// by a sliding TTL.
//
// Local wall-clock rules decide the edge cases: a day or week or month that contains a change
// to or from daylight saving time is an hour shorter or longer; an hour skipped by the change
// has no window (the window before it ends where the next valid hour begins); an hour that
// happens twice is one window of two hours. Minute and hour windows in zones with a half-hour
// offset start at the local :00.
//
// Thread-safety: a CalendarWindows is immutable after construction; call it from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace date {
class time_zone;
}

namespace tokenfuse {

enum class WindowKind { kMinute, kHour, kDay, kWeek, kMonth, kAllTime };

struct WindowSpec {
  WindowKind kind = WindowKind::kDay;
  unsigned week_start = 1;   // for kWeek: 0 Sunday, 1 Monday (ISO), ..., 6 Saturday
};

struct WindowSpan {
  std::int64_t id = 0;         // minutes, hours, days, weeks or months since 1970 in local time; 0 for all time
  std::int64_t start_ns = 0;   // unix ns; INT64_MIN for all time
  std::int64_t end_ns = 0;     // unix ns, exclusive; INT64_MAX for all time
};

class CalendarWindows {
 public:
  // Throws std::invalid_argument naming the zone if the tz database does not know it.
  explicit CalendarWindows(const std::string& zone);

  // The window of `spec` that contains the instant `unix_ns`.
  WindowSpan at(const WindowSpec& spec, std::int64_t unix_ns) const;
  // The window of `spec` named `id` (as at() returns it).
  WindowSpan byId(const WindowSpec& spec, std::int64_t id) const;

 private:
  // The instant a local time begins: the first valid one at or after it when it is skipped, the
  // earlier of two when it happens twice.
  std::int64_t instantOf(std::int64_t local_seconds) const;

  const date::time_zone* zone_;
};

}  // namespace tokenfuse
