// Calendar windows: every kind's boundaries in UTC and in zones with daylight saving time and
// half-hour offsets, month ends, leap years and week starts, with instants given, not read.
#include "calendar_window.h"

#include <date/date.h>
#include <doctest/doctest.h>

#include <random>

using namespace tokenfuse;

namespace {

// Unix ns of a UTC date and time.
std::int64_t utc(int y, unsigned m, unsigned d, int hh = 0, int mm = 0, int ss = 0) {
  const date::sys_days day{date::year{y} / date::month{m} / date::day{d}};
  return (day.time_since_epoch().count() * 86400LL + hh * 3600LL + mm * 60LL + ss) * 1'000'000'000LL;
}

constexpr std::int64_t kHourNs = 3600LL * 1'000'000'000;

const WindowSpec kMinute{WindowKind::kMinute};
const WindowSpec kHour{WindowKind::kHour};
const WindowSpec kDay{WindowKind::kDay};
const WindowSpec kMonth{WindowKind::kMonth};

}  // namespace

TEST_CASE("windows: minute, hour, day, week and month in UTC start and end where the calendar says") {
  const CalendarWindows w("UTC");
  const std::int64_t t = utc(2026, 12, 3, 17, 49, 29);
  CHECK(w.at(kMinute, t).start_ns == utc(2026, 12, 3, 17, 49));
  CHECK(w.at(kMinute, t).end_ns == utc(2026, 12, 3, 17, 50));
  CHECK(w.at(kHour, t).start_ns == utc(2026, 12, 3, 17));
  CHECK(w.at(kHour, t).end_ns == utc(2026, 12, 3, 18));
  CHECK(w.at(kDay, t).start_ns == utc(2026, 12, 3));
  CHECK(w.at(kDay, t).end_ns == utc(2026, 12, 4));
  CHECK(w.at(kDay, t).id == date::sys_days{date::year{2026} / 12 / 3}.time_since_epoch().count());
  // 2026-12-03 is a Thursday: its ISO week began on Monday 11-30, a Sunday week on 11-29.
  CHECK(w.at({WindowKind::kWeek, 1}, t).start_ns == utc(2026, 11, 30));
  CHECK(w.at({WindowKind::kWeek, 1}, t).end_ns == utc(2026, 12, 7));
  CHECK(w.at({WindowKind::kWeek, 0}, t).start_ns == utc(2026, 11, 29));
  CHECK(w.at({WindowKind::kWeek, 4}, t).start_ns == utc(2026, 12, 3));   // a Thursday week starts today
  CHECK(w.at(kMonth, t).start_ns == utc(2026, 12, 1));
  CHECK(w.at(kMonth, t).end_ns == utc(2027, 1, 1));   // December into the next year
  CHECK(w.at(kMonth, t).id == (2026 - 1970) * 12 + 11);
  const WindowSpan all = w.at({WindowKind::kAllTime}, t);
  CHECK(all.id == 0);
  CHECK(all.start_ns == INT64_MIN);
  CHECK(all.end_ns == INT64_MAX);
  // A boundary belongs to the window it starts, not to the one it ends.
  CHECK(w.at(kDay, utc(2026, 12, 4)).start_ns == utc(2026, 12, 4));
  CHECK(w.at(kDay, utc(2026, 12, 4) - 1).start_ns == utc(2026, 12, 3));
}

TEST_CASE("windows: month ends and leap years") {
  const CalendarWindows w("UTC");
  CHECK(w.at(kMonth, utc(2026, 1, 31, 23, 59, 59)).end_ns == utc(2026, 2, 1));
  CHECK(w.at(kMonth, utc(2026, 2, 15)).end_ns == utc(2026, 3, 1));   // 28 days
  CHECK(w.at(kMonth, utc(2028, 2, 15)).end_ns == utc(2028, 3, 1));   // leap year: 29 days
  CHECK(w.at(kDay, utc(2028, 2, 29, 12)).start_ns == utc(2028, 2, 29));
  CHECK(w.at(kMonth, utc(2100, 2, 15)).end_ns == utc(2100, 3, 1));   // 2100 is not a leap year
  CHECK(w.at(kMonth, utc(2100, 2, 28, 23)).id + 1 == w.at(kMonth, utc(2100, 3, 1)).id);
  CHECK(w.at(kMonth, utc(1969, 12, 31)).id == -1);   // before the epoch, consistently
  CHECK(w.at(kMonth, utc(1969, 12, 31)).start_ns == utc(1969, 12, 1));
}

TEST_CASE("windows: days, hours and months across daylight saving time in America/New_York") {
  const CalendarWindows w("America/New_York");
  // 2026-03-08: clocks go from 02:00 EST to 03:00 EDT. The day has 23 hours.
  const WindowSpan spring = w.at(kDay, utc(2026, 3, 8, 12));
  CHECK(spring.start_ns == utc(2026, 3, 8, 5));   // local midnight, EST (UTC-5)
  CHECK(spring.end_ns == utc(2026, 3, 9, 4));     // next local midnight, EDT (UTC-4)
  CHECK(spring.end_ns - spring.start_ns == 23 * kHourNs);
  // The 01:00 EST hour ends where 03:00 EDT begins: the skipped hour has no window.
  const WindowSpan before = w.at(kHour, utc(2026, 3, 8, 6, 30));   // 01:30 EST
  CHECK(before.start_ns == utc(2026, 3, 8, 6));
  CHECK(before.end_ns == utc(2026, 3, 8, 7));
  const WindowSpan after = w.at(kHour, utc(2026, 3, 8, 7, 30));    // 03:30 EDT
  CHECK(after.start_ns == utc(2026, 3, 8, 7));
  CHECK(after.id == before.id + 2);

  // 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST. The day has 25 hours, and the
  // repeated 01:00 hour is one window of two hours.
  const WindowSpan fall = w.at(kDay, utc(2026, 11, 1, 12));
  CHECK(fall.end_ns - fall.start_ns == 25 * kHourNs);
  const WindowSpan first = w.at(kHour, utc(2026, 11, 1, 5, 30));    // 01:30 EDT
  const WindowSpan second = w.at(kHour, utc(2026, 11, 1, 6, 30));   // 01:30 EST
  CHECK(first.id == second.id);
  CHECK(first.start_ns == utc(2026, 11, 1, 5));
  CHECK(first.end_ns == utc(2026, 11, 1, 7));   // 02:00 EST
  // A minute of the repeated hour is itself, in either pass (not the first pass's, long over).
  const WindowSpan minute = w.at(kMinute, utc(2026, 11, 1, 6, 30, 30));   // 01:30:30 EST
  CHECK(minute.start_ns == utc(2026, 11, 1, 6, 30));
  CHECK(minute.end_ns == utc(2026, 11, 1, 6, 31));
  CHECK(w.at(kMinute, utc(2026, 11, 1, 5, 30, 30)).start_ns == utc(2026, 11, 1, 5, 30));   // 01:30:30 EDT
  // The month of the change starts and ends at local midnight, in different offsets.
  const WindowSpan march = w.at(kMonth, utc(2026, 3, 15));
  CHECK(march.start_ns == utc(2026, 3, 1, 5));
  CHECK(march.end_ns == utc(2026, 4, 1, 4));
}

TEST_CASE("windows: a zone with a half-hour offset starts hours at the local :00") {
  const CalendarWindows w("Asia/Kolkata");   // UTC+5:30, no daylight saving time
  const WindowSpan h = w.at(kHour, utc(2026, 12, 3, 10, 45));   // 16:15 local
  CHECK(h.start_ns == utc(2026, 12, 3, 10, 30));
  CHECK(h.end_ns == utc(2026, 12, 3, 11, 30));
  CHECK(w.at(kDay, utc(2026, 12, 3, 18, 29)).end_ns == utc(2026, 12, 3, 18, 30));   // local midnight
}

TEST_CASE("windows: over two years of random instants, each window contains its instant, and the next one starts "
          "where it ends") {
  for (const char* zone : {"UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"}) {
    CAPTURE(zone);
    const CalendarWindows w(zone);
    std::mt19937_64 rng(42);
    for (const WindowSpec spec :
         {kMinute, kHour, kDay, WindowSpec{WindowKind::kWeek, 1}, WindowSpec{WindowKind::kWeek, 0}, kMonth}) {
      CAPTURE(static_cast<int>(spec.kind));
      for (int i = 0; i < 2000; ++i) {
        const std::int64_t t = utc(2026, 1, 1) + static_cast<std::int64_t>(rng() % (2ULL * 366 * 86400)) * 1'000'000'000;
        const WindowSpan s = w.at(spec, t);
        REQUIRE(s.start_ns <= t);
        REQUIRE(t < s.end_ns);
        const WindowSpan next = w.at(spec, s.end_ns);
        REQUIRE(next.start_ns == s.end_ns);
        REQUIRE(next.id > s.id);
        REQUIRE(w.byId(spec, s.id).start_ns == s.start_ns);
      }
    }
  }
}
