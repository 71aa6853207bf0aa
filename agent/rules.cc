#include "rules.h"

#include "ids.h"

#include <array>

namespace tokenfuse {

namespace {

// Indexed by the enums' values, which are fixed (they will be stored in the region), so a name
// never moves to another value.
constexpr std::array<std::string_view, 8> kScopeNames{"platform", "tenant",       "run",         "agent",
                                                      "model",    "tag",          "tenant+model", "tenant+agent"};
constexpr std::array<std::string_view, 6> kMetricNames{"usd",      "tokens",   "prompt_tokens", "completion_tokens",
                                                       "requests", "concurrency"};
constexpr std::array<std::string_view, 6> kWindowNames{"minute", "hour", "day", "week", "month", "all-time"};
constexpr std::array<std::string_view, 7> kWeekdayNames{"sunday",   "monday", "tuesday", "wednesday",
                                                        "thursday", "friday", "saturday"};

template <typename T, std::size_t N>
std::string_view nameOf(const std::array<std::string_view, N>& names, T value) noexcept {
  const auto i = static_cast<std::size_t>(value);
  return i < N ? names[i] : std::string_view("unknown");   // a value from outside (the region) may be anything
}

template <typename T, std::size_t N>
std::optional<T> valueOf(const std::array<std::string_view, N>& names, std::string_view name) noexcept {
  for (std::size_t i = 0; i < N; ++i) {
    if (names[i] == name) return static_cast<T>(i);
  }
  return std::nullopt;
}

constexpr std::size_t kMaxRuleName = 63;
constexpr std::size_t kMaxMatch = 128;   // as long as an id

}  // namespace

std::string_view scopeName(RuleScope s) noexcept { return nameOf(kScopeNames, s); }
std::string_view metricName(RuleMetric m) noexcept { return nameOf(kMetricNames, m); }
std::string_view windowName(WindowKind k) noexcept { return nameOf(kWindowNames, k); }
std::string_view weekdayName(unsigned day) noexcept { return nameOf(kWeekdayNames, day); }

std::optional<RuleScope> parseScope(std::string_view name) noexcept { return valueOf<RuleScope>(kScopeNames, name); }
std::optional<RuleMetric> parseMetric(std::string_view name) noexcept {
  return valueOf<RuleMetric>(kMetricNames, name);
}
std::optional<WindowKind> parseWindow(std::string_view name) noexcept {
  return valueOf<WindowKind>(kWindowNames, name);
}
std::optional<unsigned> parseWeekday(std::string_view name) noexcept { return valueOf<unsigned>(kWeekdayNames, name); }

std::string ruleNameProblem(std::string_view name) {
  // A name goes into logs, metrics labels and (later) admin API paths unquoted, so it is kept to
  // characters that need no escaping anywhere.
  if (name.empty()) return "must not be empty";
  if (name.size() > kMaxRuleName) return "may be at most " + std::to_string(kMaxRuleName) + " characters";
  for (const char ch : name) {
    const bool ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                    ch == '_' || ch == '-';
    if (!ok) return "may hold only A-Z, a-z, 0-9, '.', '_' and '-'";
  }
  return {};
}

std::string ruleMatchProblem(std::string_view match) {
  if (match.size() > kMaxMatch) return "may be at most " + std::to_string(kMaxMatch) + " bytes";
  if (!validIdText(match)) return "must be UTF-8 text without NUL (\\u0000)";
  // '*' only at the end, so that the pattern means one thing now and a richer syntax can come
  // later without changing what an existing pattern matches.
  const auto star = match.find('*');
  if (star != std::string_view::npos && star + 1 != match.size()) {
    return "may hold '*' only at its end (\"gpt-4*\": every key that starts with gpt-4)";
  }
  if (match == "*") return "\"*\" alone is not a pattern: write \"\" for every key, or a prefix before the '*'";
  return {};
}

bool isRate(WindowKind window) noexcept { return window == WindowKind::kMinute || window == WindowKind::kHour; }

bool sharedWithFleet(const RuleSpec& rule) noexcept {
  return !rule.host_only && rule.metric != RuleMetric::kConcurrency && !isRate(rule.window.kind);
}

}  // namespace tokenfuse
