#include "rule_match.h"

#include "ids.h"

#include <cstring>

namespace tokenfuse {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kAcquire = std::memory_order_acquire;

// Calls the function with each tag of a list validTags() accepted.
template <typename F>
bool forEachTag(std::string_view tags, F&& f) noexcept {
  while (!tags.empty()) {
    const std::size_t comma = tags.find(',');
    const std::string_view tag = tags.substr(0, comma);
    if (!f(tag)) return false;
    if (comma == std::string_view::npos) break;
    tags.remove_prefix(comma + 1);
  }
  return true;
}

// A definition as read from the region, checked word against word.
struct Def {
  std::uint32_t word;
  std::uint8_t scope, metric, prefix;
  std::string_view match;
  std::int64_t limit;
};

bool readDef(const shm::RuleDef& d, Def* out) noexcept {
  out->word = d.word.load(kAcquire);
  if (shm::ruleState(out->word) != shm::kRuleLive) return false;
  out->scope = d.scope;
  out->metric = d.metric;
  out->prefix = d.match_prefix;
  const std::uint32_t len = d.match_len;   // once: the region may change it under us
  out->match = {d.match, len < shm::kKeyMax ? len : shm::kKeyMax};
  out->limit = d.limit.load(kRelaxed);
  return true;
}

// Whether the rule applies to `id`, and the part of the counter's key that `id` gives: the id
// itself, or nothing for a prefix group (one counter for every id in it).
bool applies(const Def& d, std::string_view id, std::string_view* part) noexcept {
  if (d.match.empty()) {
    *part = id;
    return true;
  }
  if (d.prefix) {
    *part = {};
    return id.starts_with(d.match);
  }
  *part = id;
  return id == d.match;
}

}  // namespace

bool validTags(std::string_view tags) noexcept {
  if (tags.empty()) return true;
  if (tags.size() > kMaxTagBytes) return false;
  std::size_t n = 0;
  return forEachTag(tags, [&](std::string_view tag) noexcept {
    return ++n <= kMaxTags && !tag.empty() && tag.size() <= shm::kKeyMax && validIdText(tag);
  });
}

RuleMatch matchRules(const shm::Header& h, const KeyedTable<shm::RuleSlot>& table, const RuleCall& call,
                     bool insert, std::uint32_t client, RuleHits* out, bool best_effort) noexcept {
  out->n = 0;
  RuleMatch worst = RuleMatch::kOk;
  const std::uint32_t count = std::min(h.rule_count.load(kAcquire), shm::kMaxRules);
  for (std::uint32_t r = 0; r < count; ++r) {
    const shm::RuleDef& def = h.rules[r];
    Def d;
    // A rule replaced while it is read: read it again (bounded; the agent writes a definition
    // in microseconds, and a word that keeps changing is someone else's doing: skip the rule).
    bool read = false;
    for (int tries = 0; tries < 64 && !read; ++tries) {
      if (!readDef(def, &d)) break;
      std::atomic_thread_fence(kAcquire);
      read = def.word.load(kRelaxed) == d.word;
    }
    if (!read) continue;
    if (d.metric == shm::kMetricUsd && call.free_model) continue;   // free models skip money

    auto add = [&](std::string_view first, std::string_view second, bool two) noexcept -> RuleMatch {
      if (out->n == shm::kMaxRuleHolds) return RuleMatch::kTooMany;
      char key[shm::kRuleKeyMax];
      const std::string_view k = ruleKey(key, r, shm::ruleGen(d.word), first, second, two);
      const Found f = insert ? table.findOrInsert(k, client,
                                                  [](shm::RuleSlot& s) noexcept {
                                                    s.c.limit.store(shm::kUnlimited, kRelaxed);
                                                    s.c.limit_explicit.store(0, kRelaxed);
                                                  })
                             : table.find(k);
      if (f.what == Lookup::kBusy) return RuleMatch::kBusy;
      RuleHit& hit = out->at[out->n];
      hit.slot = f.index;
      hit.word = f.word;
      hit.rule = r;
      hit.metric = d.metric;
      hit.scope = d.scope;
      hit.rule_limit = d.limit;
      if (f.index < 0 && f.what == Lookup::kFull) {
        // No room for this key: refuse if it may be limited, else leave it uncounted.
        if (d.limit != shm::kUnlimited || def.limited_untracked.load(kRelaxed) != 0) return RuleMatch::kCapacity;
        return RuleMatch::kOk;
      }
      ++out->n;
      return RuleMatch::kOk;
    };

    RuleMatch m = RuleMatch::kOk;
    std::string_view part;
    switch (d.scope) {
      case shm::kScopePlatform: m = add({}, {}, false); break;
      case shm::kScopeTenant:
        if (applies(d, call.project_id, &part)) m = add(part, {}, false);
        break;
      case shm::kScopeRun:
        if (!call.run_id.empty() && applies(d, call.run_id, &part)) m = add(part, {}, false);
        break;
      case shm::kScopeAgent:
        if (!call.agent_id.empty() && applies(d, call.agent_id, &part)) m = add(part, {}, false);
        break;
      case shm::kScopeModel:
        if (applies(d, call.model, &part)) m = add(part, {}, false);
        break;
      case shm::kScopeTag: {
        // Each counter once per call: a tag given twice, or two tags of one prefix group.
        std::string_view done[kMaxTags];
        std::size_t n_done = 0;
        forEachTag(call.tags, [&](std::string_view tag) noexcept {
          if (!applies(d, tag, &part)) return true;
          for (std::size_t k = 0; k < n_done; ++k) {
            if (done[k] == part) return true;
          }
          if (n_done < kMaxTags) done[n_done++] = part;
          m = add(part, {}, false);
          return m == RuleMatch::kOk;
        });
        break;
      }
      case shm::kScopeTenantModel:
        if (applies(d, call.model, &part)) m = add(call.project_id, part, true);
        break;
      case shm::kScopeTenantAgent:
        if (!call.agent_id.empty() && applies(d, call.agent_id, &part)) m = add(call.project_id, part, true);
        break;
      default: break;   // a scope no correct agent writes
    }
    if (m == RuleMatch::kOk) continue;
    if (!best_effort || m == RuleMatch::kTooMany) return m;
    worst = m;   // go on: the other rules still count what they can
  }
  return worst;
}

std::string_view ruleKey(char (&buf)[shm::kRuleKeyMax], std::uint32_t index, std::uint32_t gen, std::string_view first,
                         std::string_view second, bool two) noexcept {
  const std::uint32_t number = (gen << 8) | (index & 0xffu);
  std::memcpy(buf, &number, 4);
  std::size_t len = 4;
  first = first.substr(0, shm::kKeyMax);   // ids were checked; this only keeps the buffer safe
  second = second.substr(0, shm::kKeyMax);
  if (!first.empty()) std::memcpy(buf + len, first.data(), first.size());
  len += first.size();
  if (two) {
    buf[len++] = '\0';
    if (!second.empty()) std::memcpy(buf + len, second.data(), second.size());
    len += second.size();
  }
  return {buf, len};
}

bool parseRuleKey(std::string_view key, RuleKey* out) noexcept {
  if (key.size() < 4) return false;
  std::uint32_t number = 0;
  std::memcpy(&number, key.data(), 4);
  out->rule = number & 0xffu;
  out->gen = number >> 8;
  key.remove_prefix(4);
  const std::size_t nul = key.find('\0');
  out->first = key.substr(0, nul);
  out->second = nul == std::string_view::npos ? std::string_view{} : key.substr(nul + 1);
  return out->rule < shm::kMaxRules;
}

Code ruleCode(std::uint32_t scope, std::uint32_t metric) noexcept {
  switch (metric) {
    case shm::kMetricRequests: return Code::kRequestRateExceeded;
    case shm::kMetricConcurrency: return Code::kConcurrencyExceeded;
    case shm::kMetricUsd: break;
    default: return Code::kTokenRateExceeded;
  }
  switch (scope) {
    case shm::kScopePlatform: return Code::kPlatformBudgetExhausted;
    case shm::kScopeTenant: return Code::kTenantBudgetExhausted;
    case shm::kScopeRun: return Code::kRunBudgetExhausted;
    case shm::kScopeAgent:
    case shm::kScopeTenantAgent: return Code::kAgentBudgetExhausted;
    case shm::kScopeTag: return Code::kTagBudgetExhausted;
    default: return Code::kModelBudgetExhausted;
  }
}

}  // namespace tokenfuse
