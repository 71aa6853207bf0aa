#include "day_clock.h"

#include <date/date.h>
#include <date/tz.h>

#include <stdexcept>

namespace tokenfuse {

DayClock::DayClock(const std::string& zone) : name_(zone) {
  try {
    zone_ = date::locate_zone(zone);
  } catch (const std::exception&) {
    throw std::invalid_argument("unknown time zone '" + zone +
                                "': use an IANA name such as UTC or Europe/Berlin (is tzdata installed?)");
  }
}

std::int32_t DayClock::dayOf(std::chrono::system_clock::time_point t) const {
  const auto local = zone_->to_local(t);
  return static_cast<std::int32_t>(date::floor<date::days>(local).time_since_epoch().count());
}

std::chrono::system_clock::time_point DayClock::startOf(std::int32_t day) const {
  const date::local_days midnight{date::days{day}};
  const auto info = zone_->get_info(midnight);
  if (info.result == date::local_info::nonexistent) return info.second.begin;   // midnight skipped
  return zone_->to_sys(midnight, date::choose::earliest);
}

std::string DayClock::format(std::int32_t day) {
  // Days come from the region too, which anyone in the group can write: the calendar arithmetic
  // is only defined well within int's range, so a day beyond year 9999 is shown as a number.
  constexpr std::int32_t kLastDay = 2'932'896;   // 9999-12-31
  if (day < -kLastDay || day > kLastDay) return "day " + std::to_string(day) + " (out of range)";
  return date::format("%F", date::sys_days{date::days{day}});
}

}  // namespace tokenfuse
