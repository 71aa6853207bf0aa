// Budget days: calendar days in one IANA time zone. A budget resets at local midnight, on days
// of 23 or 25 hours too, and never by a sliding TTL.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace date { class time_zone; }

namespace tokenfuse {

class DayClock {
 public:
  // Throws std::invalid_argument naming the zone if the tz database does not know it.
  explicit DayClock(const std::string& zone);

  // Days since 1970-01-01 of the local date at `t`.
  std::int32_t dayOf(std::chrono::system_clock::time_point t) const;
  // The instant local day `day` begins (the first valid local time, if midnight is skipped).
  std::chrono::system_clock::time_point startOf(std::int32_t day) const;
  // "2026-11-29"
  static std::string format(std::int32_t day);
  const std::string& zone() const noexcept { return name_; }

 private:
  std::string name_;
  const date::time_zone* zone_;
};

}  // namespace tokenfuse
