// Matching a call against the region's budget rules (layout.h, "budget rules"): which rule
// counters it counts on, how much each one holds, and which code a rule denies with. The engine
// applies the result; this file decides nothing by itself and allocates nothing.
#pragma once

#include "layout.h"
#include "table.h"

#include <tokenfuse/tokenfuse.hpp>

#include <cstdint>
#include <string_view>

namespace tokenfuse {

// What identifies a call to the rules. Tags are comma-separated, as Call::tags.
struct RuleCall {
  std::string_view project_id, run_id, model, agent_id, tags;
  bool free_model = false;
};

// One rule counter a call counts on. No default member initialisers: RuleHits lives on the
// stack of every check and reserve, and matchRules() sets every field of each hit it counts.
struct RuleHit {
  std::int32_t slot;          // RuleSlot index; -1: none yet (check() without insert), nothing spent
  std::uint32_t rule;         // index of the rule's definition
  std::uint8_t metric;        // shm::RuleMetricValue, copied from the definition
  std::uint8_t scope;         // shm::RuleScopeValue
  std::int64_t rule_limit;    // the definition's limit, read with it
  std::uint64_t word;         // the counter slot's word when matched (KeyedTable::current)
};

struct RuleHits {
  std::uint32_t n = 0;
  RuleHit at[shm::kMaxRuleHolds];
};

enum class RuleMatch {
  kOk,
  kTooMany,    // more than kMaxRuleHolds counters (kInvalidArgument)
  kBusy,       // a counter's key was left half-written by a dead process (kRegionBusy)
  kCapacity,   // a limited key has no room in the rule table (kCapacityExhausted)
};

// Whether `tags` is a valid tag list: at most kMaxTags comma-separated tags of 1 to kKeyMax bytes
// of id text, kMaxTagBytes in all; empty is none.
bool validTags(std::string_view tags) noexcept;

// Fills *out with the counters of every live rule that applies to `call`, in definition order,
// creating them when `insert` (a counter that does not exist yet and may not be created is
// slot -1). `client` names the inserter (client_lock.h). Reads definitions as layout.h says:
// a definition replaced while it was read is read again. Stops at the first rule it cannot
// match, unless `best_effort` (a call that has happened: book what can be), which goes on past
// a busy or full key and returns the worst of them; more than kMaxRuleHolds always stops.
RuleMatch matchRules(const shm::Header& h, const KeyedTable<shm::RuleSlot>& table, const RuleCall& call,
                     bool insert, std::uint32_t client, RuleHits* out, bool best_effort = false) noexcept;

// The limit that applies to a rule counter now: its own when set explicitly, else the rule's.
inline std::int64_t ruleLimit(const shm::Counters& c, std::int64_t rule_limit) noexcept {
  return c.limit_explicit.load(std::memory_order_relaxed) != 0 ? c.limit.load(std::memory_order_relaxed) : rule_limit;
}

// What a call counts on a rule of `metric`: its cost in nano-USD, its tokens, 1 request, or 1
// call in flight. `settled`: what stays booked once the call is over (calls in flight: nothing).
inline std::int64_t ruleAmount(std::uint32_t metric, std::int64_t cost, std::int64_t prompt, std::int64_t completion,
                               bool settled) noexcept {
  switch (metric) {
    case shm::kMetricUsd: return cost;
    case shm::kMetricTokens: return shm::wrapAdd(prompt, completion);
    case shm::kMetricPromptTokens: return prompt;
    case shm::kMetricCompletionTokens: return completion;
    case shm::kMetricRequests: return 1;
    case shm::kMetricConcurrency: return settled ? 0 : 1;
    default: return 0;   // a metric no correct agent writes: counts nothing
  }
}

// The code a rule denies with (docs/rules.md).
Code ruleCode(std::uint32_t scope, std::uint32_t metric) noexcept;

// A rule counter's key taken apart (see shm::kRuleKeyMax): false if it is not one (the region
// may hold anything).
struct RuleKey {
  std::uint32_t rule = 0;   // index
  std::uint32_t gen = 0;    // the definition's generation when the counter was made
  std::string_view first, second;   // the ids; second only for tenant x model, tenant x agent
};
bool parseRuleKey(std::string_view key, RuleKey* out) noexcept;
// The counter key of rule `index` (generation `gen`) for `first` (and `second`, if `two`).
std::string_view ruleKey(char (&buf)[shm::kRuleKeyMax], std::uint32_t index, std::uint32_t gen, std::string_view first,
                         std::string_view second, bool two) noexcept;

}  // namespace tokenfuse
