// Key reclamation (RegionAdmin::reclaimKeys): the tenant, run and rule-counter entries that
// nothing needs any more go back to their tables, so a fixed region serves any number of keys.
//
// The protocol, against applications that look keys up and hold on them at the same time
// (table.h has the lookup's side):
//   1. the key's Ready word becomes a reclaiming word (a compare-and-swap: a key that changed
//      since it was found idle is skipped);
//   2. a sequentially consistent fence, then the counters and every reservation are read again:
//      a key that holds something, or that a reservation names, is kept (its word goes back to
//      Ready, one generation on). Reserve and record fence between their holds and checking their
//      keys' words, so either this sees their holds and the keys they named, or they see the
//      reclaiming word and take the key back (or find it gone, return their holds and look the
//      key up again);
//   3. the word becomes the agent's "being filled" word (a compare-and-swap: it fails if a lookup
//      took the key back meanwhile), the counters are cleared for the next key (what it booked is
//      taken out by adding its negative, so that whatever a late holder still adds or returns adds
//      up), and only then does the slot become a tombstone an insert may reuse. A key whose counts
//      or holds changed since it was chosen is kept.
#include "region_admin.h"

#include "rule_match.h"

#include <algorithm>

namespace tokenfuse {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kAcquire = std::memory_order_acquire;

enum TableIndex : int { kTenants = 0, kRuns = 1, kRules = 2 };

// How many keys one pass marks before checking them: lookups of those keys meanwhile take them
// back rather than wait, so this only bounds the agent's own work between checks.
constexpr std::size_t kBatch = 256;

struct Candidate {
  int table;
  std::uint32_t index;
  std::uint64_t word;       // its Ready word when chosen
  std::int64_t committed;   // and what it had booked: a booking since keeps it
  shm::Counters* c;
};

// Nothing held: `used` is what was committed.
bool holdsNothing(const shm::Counters& c) { return c.spend.used() == c.spend.committed(); }

}  // namespace

ReclaimStats RegionAdmin::reclaimKeys(std::int64_t now_unix_ns, std::int64_t run_idle_ns) {
  std::lock_guard lock(stats_mu_);
  const Geometry& g = region_.geometry();
  const shm::Header& h = region_.header();
  const std::uint32_t capacity[3] = {g.tenant_capacity, g.run_capacity, g.rule_capacity};
  for (int t = 0; t < 3; ++t) idle_seen_[t].resize(capacity[t], 0);

  // Whether a key may go, from its counters alone.
  auto tenantIdle = [](shm::Counters& c) {
    return c.limit_explicit.load(kRelaxed) == 0 && c.spend.used() == 0 && c.spend.committed() == 0 &&
           c.elsewhere.load(kRelaxed) == 0 && c.calls.load(kRelaxed) == 0;
  };
  auto runIdle = [&](shm::Counters& c) {
    if (c.limit_explicit.load(kRelaxed) != 0 || !holdsNothing(c)) return false;
    if (c.spend.committed() == 0 && c.calls.load(kRelaxed) == 0) return true;   // never booked
    const std::int64_t last = c.last_unix_ns.load(kRelaxed);
    if (last == 0) {   // booked before anyone kept the time (restored, or a region of an older agent)
      c.last_unix_ns.store(now_unix_ns, kRelaxed);
      return false;
    }
    return now_unix_ns - last >= run_idle_ns;
  };
  auto ruleIdle = [&](const shm::RuleSlot& s) {
    const shm::Counters& c = s.c;
    if (c.limit_explicit.load(kRelaxed) != 0 || !holdsNothing(c)) return false;
    RuleKey key;
    if (!parseRuleKey(keyOf(s.k), &key) || key.rule >= shm::kMaxRules) return true;   // no rule's
    const std::uint32_t w = h.rules[key.rule].word.load(kAcquire);
    if (shm::ruleState(w) != shm::kRuleLive || shm::ruleGen(w) != key.gen) return true;   // its rule is gone
    // Nothing counted in the current window, here or (the central link) on other hosts.
    return c.spend.committed() == 0 && c.elsewhere.load(kRelaxed) == 0;
  };

  ReclaimStats stats;
  std::vector<Candidate> batch;
  batch.reserve(kBatch);
  auto settle = [&] {
    if (batch.empty()) return;
    std::atomic_thread_fence(std::memory_order_seq_cst);   // pairs with reserve's and record's
    // Every entry a reservation names (a reserving slot's may be its previous reservation's:
    // keeping one key too many only waits for the next pass).
    std::vector<std::uint32_t> named[3];
    const shm::ReservationSlot* res = region_.reservations();
    for (std::uint32_t i = 0; i < g.reservation_capacity; ++i) {
      const shm::ReservationSlot& r = res[i];
      if (shm::resState(r.word.load(kAcquire)) == shm::kResFree) continue;
      if (const std::int32_t t = r.tenant.load(kRelaxed); t >= 0) named[kTenants].push_back(static_cast<std::uint32_t>(t));
      if (const std::int32_t t = r.run.load(kRelaxed); t >= 0) named[kRuns].push_back(static_cast<std::uint32_t>(t));
      const std::uint32_t n = std::min(r.rule_holds.load(kRelaxed), shm::kMaxRuleHolds);
      for (std::uint32_t j = 0; j < n; ++j) {
        if (const std::int32_t t = r.rules[j].slot.load(kRelaxed); t >= 0) named[kRules].push_back(static_cast<std::uint32_t>(t));
      }
    }
    for (auto& v : named) std::sort(v.begin(), v.end());
    for (const Candidate& k : batch) {
      auto& word = k.table == kTenants ? region_.tenants()[k.index].k.word
                   : k.table == kRuns  ? region_.runs()[k.index].k.word
                                       : region_.ruleSlots()[k.index].k.word;
      const std::int64_t committed = k.c->spend.committed();
      const bool idle = holdsNothing(*k.c) && committed == k.committed &&
                        !std::binary_search(named[k.table].begin(), named[k.table].end(), k.index);
      std::uint64_t expect = shm::reclaimWord(k.word);
      if (!idle) {
        (void)word.compare_exchange_strong(expect, shm::keptWord(expect));   // unless a lookup did
        ++stats.kept;
        continue;
      }
      // Gone for lookups, but not free for inserts until its counters are cleared: a lookup of
      // its key meanwhile waits, as for a key being inserted (nanoseconds).
      const std::uint64_t clearing = shm::keyWord(shm::keyTag(k.word), shm::kKeyInit, engine_.self());
      if (!word.compare_exchange_strong(expect, clearing)) {
        ++stats.kept;   // a lookup took it back
        continue;
      }
      shm::Counters& c = *k.c;
      c.spend.add(shm::wrapNeg(committed), shm::wrapNeg(committed));
      c.elsewhere.store(0, kRelaxed);
      c.limit_explicit.store(0, kRelaxed);
      c.denials.store(0, kRelaxed);
      c.history.store(0, kRelaxed);
      c.prompt_tokens.store(0, kRelaxed);
      c.completion_tokens.store(0, kRelaxed);
      c.calls.store(0, kRelaxed);
      c.last_unix_ns.store(0, kRelaxed);
      c.previous.store(0, kRelaxed);
      word.store(shm::keyWord(shm::keyTag(k.word), shm::kKeyTombstone, shm::keyGen(k.word)), std::memory_order_release);
      ++(k.table == kTenants ? stats.tenants : k.table == kRuns ? stats.runs : stats.rule_counters);
    }
    batch.clear();
  };

  auto sweep = [&](int table, auto* slots, auto&& idle) {
    std::vector<std::uint64_t>& seen = idle_seen_[table];
    for (std::uint32_t i = 0; i < capacity[table]; ++i) {
      auto& s = slots[i];
      const std::uint64_t w = s.k.word.load(kAcquire);
      if (shm::keyState(w) != shm::kKeyReady || !idle(s)) {
        seen[i] = 0;
        continue;
      }
      // Idle now: it goes if it still is next time, with the same key and the same committed
      // total (a run may book and stay idle by its last booking's time until the ledger has it).
      const std::uint64_t print = w ^ (static_cast<std::uint64_t>(s.c.spend.committed()) * 0x9e3779b97f4a7c15ull);
      if (seen[i] != print) {
        seen[i] = print;
        continue;
      }
      seen[i] = 0;
      const std::int64_t committed = s.c.spend.committed();
      std::uint64_t expect = w;
      if (!s.k.word.compare_exchange_strong(expect, shm::reclaimWord(w))) continue;   // it moved
      batch.push_back({table, i, w, committed, &s.c});
      if (batch.size() == kBatch) settle();
    }
    settle();
  };
  sweep(kTenants, region_.tenants(), [&](shm::BudgetSlot& s) { return tenantIdle(s.c); });
  sweep(kRuns, region_.runs(), [&](shm::BudgetSlot& s) { return runIdle(s.c); });
  sweep(kRules, region_.ruleSlots(), [&](shm::RuleSlot& s) { return ruleIdle(s); });
  reclaimed_[kTenants].fetch_add(stats.tenants, kRelaxed);
  reclaimed_[kRuns].fetch_add(stats.runs, kRelaxed);
  reclaimed_[kRules].fetch_add(stats.rule_counters, kRelaxed);
  return stats;
}

std::optional<std::uint64_t> RegionAdmin::runWithoutHistory(std::string_view run_id) {
  std::lock_guard lock(stats_mu_);
  const Found f = table(LimitTable::kRun).find(run_id);
  if (f.index < 0) return std::nullopt;
  const shm::Counters& c = table(LimitTable::kRun).at(f.index).c;
  if (c.history.load(kRelaxed) != 0) return std::nullopt;
  return c.born_seq.load(kRelaxed);
}

void RegionAdmin::addHistory(std::string_view run_id, std::uint64_t born_seq, const LedgerTotal& earlier) {
  std::lock_guard lock(stats_mu_);
  const Found f = table(LimitTable::kRun).find(run_id);
  if (f.index < 0) return;
  shm::Counters& c = table(LimitTable::kRun).at(f.index).c;
  if (c.history.load(kRelaxed) != 0 || c.born_seq.load(kRelaxed) != born_seq) return;   // done, or another entry
  c.spend.add(earlier.cost_nano_usd, earlier.cost_nano_usd);
  c.prompt_tokens.store(shm::wrapAdd(c.prompt_tokens.load(kRelaxed), earlier.prompt_tokens), kRelaxed);
  c.completion_tokens.store(shm::wrapAdd(c.completion_tokens.load(kRelaxed), earlier.completion_tokens), kRelaxed);
  c.calls.store(shm::wrapAdd(c.calls.load(kRelaxed), earlier.calls), kRelaxed);
  c.history.store(1, kRelaxed);
}

}  // namespace tokenfuse
