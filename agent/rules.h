// Budget rules as the operator writes them (the config file's [[rules]], later the admin API):
// a scope, a window, a metric and a limit. RegionAdmin::setRules puts them in the region, where
// the library enforces them beside the three built-in layers (run, tenant daily, platform daily).
// docs/rules.md is the chapter for people.
#pragma once

#include "calendar_window.h"

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace tokenfuse {

// The most rules in force at once: a config file's, with the admin API's changes over them (the
// region has twice as many definitions, shm::kMaxRules: RegionAdmin::setRules).
inline constexpr std::size_t kMaxRules = 32;

// Whose calls a rule counts. A call with several tags matches a tag rule once per tag.
enum class RuleScope : std::uint8_t {
  kPlatform = 0,      // every call on this host (one counter)
  kTenant = 1,        // project_id
  kRun = 2,           // run_id (calls without one do not match)
  kAgent = 3,         // agent_id: a user, API key or end user (calls without one do not match)
  kModel = 4,         // the model name
  kTag = 5,           // each tag the caller passes
  kTenantModel = 6,   // project_id x model
  kTenantAgent = 7,   // project_id x agent_id
};

// What a rule counts. Money rules skip free models (the reference's layer order); the others
// count every call, so a runaway loop on a local model is stopped too.
enum class RuleMetric : std::uint8_t {
  kUsd = 0,                // nano-USD, as the built-in layers
  kTokens = 1,             // prompt + completion tokens
  kPromptTokens = 2,
  kCompletionTokens = 3,
  kRequests = 4,           // calls made (a reservation holds 1)
  kConcurrency = 5,        // calls in flight: live reservations; nothing is ever committed
};

struct RuleSpec {
  std::string name;             // unique; 1 to 63 of [A-Za-z0-9._-]
  RuleScope scope = RuleScope::kTenant;
  // Which keys the rule applies to: "" every key (each with its own counter); "x" only the key x;
  // "x*" every key that starts with x, counted together (a group: "gpt-4*"). For tenant x model
  // and tenant x agent it applies to the model or agent; the tenant is always per key. Not for
  // the platform.
  std::string match;
  RuleMetric metric = RuleMetric::kUsd;
  WindowSpec window;            // kAllTime for concurrency rules (they have no window)
  // The limit for every key the rule applies to (nullopt: only keys listed in `keys` are
  // limited). In the metric's unit: nano-USD, tokens, requests or calls in flight.
  std::optional<std::int64_t> limit;
  // Per-key limits that replace `limit` (nullopt: that key is unlimited). Keys as the scope names
  // them; not for tenant x model or tenant x agent.
  std::map<std::string, std::optional<std::int64_t>, std::less<>> keys;
  // Counted on this host only, never shared with the fleet through the central link. Rates and
  // concurrency are per host whatever this says.
  bool host_only = false;
  // Minute and hour windows only: a sliding window rather than a fixed one. The previous
  // window's count, weighted by how much of it the last window-length of time still covers,
  // counts as used beside the current window's (two buckets interpolated).
  bool sliding = false;
};

// Rates: windows of a minute or an hour. Only they may slide, and the fleet never shares them
// (they are shorter than what a fleet's sync can follow).
bool isRate(WindowKind window) noexcept;
// Whether the fleet shares the rule's counts through the central link: not when it is marked
// host_only, and never for rates or concurrency (calls in flight on this host).
bool sharedWithFleet(const RuleSpec& rule) noexcept;

// The names the config file and docs/rules.md use: "tenant+model", "completion_tokens", "all-time".
// The parse functions take exactly these names (lower case) and return nullopt for anything else.
std::string_view scopeName(RuleScope s) noexcept;
std::string_view metricName(RuleMetric m) noexcept;
std::string_view windowName(WindowKind k) noexcept;
std::optional<RuleScope> parseScope(std::string_view name) noexcept;
std::optional<RuleMetric> parseMetric(std::string_view name) noexcept;
std::optional<WindowKind> parseWindow(std::string_view name) noexcept;
// "sunday" (0) to "saturday" (6), as WindowSpec::week_start counts them.
std::string_view weekdayName(unsigned day) noexcept;
std::optional<unsigned> parseWeekday(std::string_view name) noexcept;

// What is wrong with a rule's name or match pattern, or "" (for the config file now, the admin
// API later; the caller names the key).
std::string ruleNameProblem(std::string_view name);
std::string ruleMatchProblem(std::string_view match);

}  // namespace tokenfuse
