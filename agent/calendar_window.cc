#include "calendar_window.h"

#include <date/date.h>
#include <date/tz.h>

#include <climits>
#include <stdexcept>

namespace tokenfuse {

namespace {

using std::chrono::seconds;
constexpr std::int64_t kNsPerSecond = 1'000'000'000;

// Floor division: windows before 1970 get negative ids, consistently.
constexpr std::int64_t floorDiv(std::int64_t a, std::int64_t b) noexcept {
  const std::int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

// 1970-01-01 was a Thursday (weekday 4 with Sunday 0).
constexpr std::int64_t kEpochWeekday = 4;

}  // namespace

CalendarWindows::CalendarWindows(const std::string& zone) {
  try {
    zone_ = date::locate_zone(zone);
  } catch (const std::exception&) {
    throw std::invalid_argument("unknown time zone '" + zone +
                                "': use an IANA name such as UTC or Europe/Berlin (is tzdata installed?)");
  }
}

std::int64_t CalendarWindows::instantOf(std::int64_t local_seconds) const {
  const date::local_seconds local{seconds{local_seconds}};
  const date::local_info info = zone_->get_info(local);
  if (info.result == date::local_info::nonexistent) {   // skipped: where valid time resumes
    return std::chrono::duration_cast<std::chrono::nanoseconds>(info.second.begin.time_since_epoch()).count();
  }
  const auto sys = zone_->to_sys(local, date::choose::earliest);
  return std::chrono::duration_cast<std::chrono::nanoseconds>(sys.time_since_epoch()).count();
}

WindowSpan CalendarWindows::byId(const WindowSpec& spec, std::int64_t id) const {
  WindowSpan w;
  w.id = id;
  // The local start of window `id` and of the next one, in seconds since the local epoch.
  std::int64_t from = 0, to = 0;
  switch (spec.kind) {
    case WindowKind::kMinute:
      // Minutes in UTC: every zone's offset is whole minutes, so they start at the local :00
      // second as well, and a minute of a repeated hour is the one it is, not its first pass.
      w.start_ns = id * 60 * kNsPerSecond;
      w.end_ns = w.start_ns + 60 * kNsPerSecond;
      return w;
    case WindowKind::kHour:
      from = id * 3600, to = from + 3600;
      break;
    case WindowKind::kDay:
      from = id * 86400, to = from + 86400;
      break;
    case WindowKind::kWeek: {
      // Week `id` starts on the week_start day on or before local day 7 * id + shift.
      const std::int64_t shift = (static_cast<std::int64_t>(spec.week_start % 7) - kEpochWeekday + 7) % 7;
      from = (id * 7 + shift) * 86400, to = from + 7 * 86400;
      break;
    }
    case WindowKind::kMonth: {
      const auto ym = date::year_month{date::year{1970}, date::month{1}} + date::months{id};
      const date::sys_days first{ym / 1};
      const date::sys_days next{(ym + date::months{1}) / 1};
      from = std::int64_t{first.time_since_epoch().count()} * 86400;   // days are an int: widen first
      to = std::int64_t{next.time_since_epoch().count()} * 86400;
      break;
    }
    case WindowKind::kAllTime:
      w.id = 0;
      w.start_ns = INT64_MIN;
      w.end_ns = INT64_MAX;
      return w;
  }
  w.start_ns = instantOf(from);
  w.end_ns = instantOf(to);
  return w;
}

WindowSpan CalendarWindows::at(const WindowSpec& spec, std::int64_t unix_ns) const {
  const date::sys_seconds sys{seconds{floorDiv(unix_ns, kNsPerSecond)}};
  const std::int64_t local = zone_->to_local(sys).time_since_epoch().count();
  const std::int64_t day = floorDiv(local, 86400);
  std::int64_t id = 0;
  switch (spec.kind) {
    case WindowKind::kMinute: id = floorDiv(floorDiv(unix_ns, kNsPerSecond), 60); break;
    case WindowKind::kHour: id = floorDiv(local, 3600); break;
    case WindowKind::kDay: id = day; break;
    case WindowKind::kWeek: {
      const std::int64_t shift = (static_cast<std::int64_t>(spec.week_start % 7) - kEpochWeekday + 7) % 7;
      id = floorDiv(day - shift, 7);
      break;
    }
    case WindowKind::kMonth: {
      const date::year_month_day ymd{date::sys_days{date::days{day}}};
      id = (static_cast<int>(ymd.year()) - 1970) * 12 + static_cast<int>(static_cast<unsigned>(ymd.month())) - 1;
      break;
    }
    case WindowKind::kAllTime: break;
  }
  // An instant in the second pass of a repeated hour has the same local time, hence the same id,
  // as the first: one window whose span covers both.
  return byId(spec, id);
}

}  // namespace tokenfuse
