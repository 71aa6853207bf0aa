#include "engine.h"

#include "budget_table.h"
#include "client_lock.h"
#include "ids.h"
#include "pricing.h"
#include "proc.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>

namespace tokenfuse {

namespace {

using shm::Counters;
using shm::ReservationSlot;
constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;

// getpid() is a system call since glibc 2.25, and the owner pid goes into every reservation:
// cache it, and refresh it in the child after fork.
std::atomic<std::uint32_t> g_pid{0};
std::atomic<std::uint64_t> g_start_time{0};

void refreshSelf() noexcept {
  const int pid = ::getpid();
  g_pid.store(static_cast<std::uint32_t>(pid), kRelaxed);
  g_start_time.store(proc::startTime(pid), kRelaxed);
}

void initSelfOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    refreshSelf();
    ::pthread_atfork(nullptr, nullptr, refreshSelf);
  });
}

// How often reserve and record look their keys up again when the agent reclaimed one under
// them: more than once in a row means keys are reclaimed as fast as they are used (kRegionBusy).
constexpr int kMaxKeyAttempts = 4;

// What acquire() returns when another party held the reservation for too long.
constexpr auto kAcquireBusy = static_cast<shm::ResState>(0xf);

constexpr Code kLayerCode[shm::kLayerCount] = {Code::kRunBudgetExhausted, Code::kTenantBudgetExhausted,
                                               Code::kPlatformBudgetExhausted};

Decision fail(Code code) noexcept {
  Decision d;
  d.code = code;
  return d;
}

bool validTokens(std::int64_t n) noexcept { return n >= 0 && n <= kMaxTokensPerCall; }

// Adds `amount` to the layer's `used` unless that would pass its limit. The compare-and-swap
// is what makes committed + held <= limit hold under any concurrency.
// Other hosts' spending (`elsewhere`) counts as used: this host may hold up to limit - elsewhere.
// `limit` is the layer's own, or for a rule counter ruleLimit()'s.
bool tryHoldWithin(Counters& c, std::int64_t amount, std::int64_t limit, Decision* denial) noexcept {
  const std::int64_t elsewhere = limit == shm::kUnlimited ? 0 : c.elsewhere.load(kRelaxed);
  std::int64_t seen = 0;
  std::int64_t room = shm::kUnlimited;
  if (limit == shm::kUnlimited || (elsewhere <= limit && !__builtin_sub_overflow(limit, elsewhere, &room))) {
    if (c.spend.tryHold(amount, room, &seen)) return true;
  } else {
    seen = c.spend.used();   // the fleet is already past the limit (or the words are nonsense)
  }
  denial->used = NanoUsd(shm::wrapAdd(seen, elsewhere));
  denial->limit = NanoUsd(limit);
  return false;
}

bool tryHold(Counters& c, std::int64_t amount, Decision* denial) noexcept {
  return tryHoldWithin(c, amount, c.limit.load(kRelaxed), denial);
}

// check(): what a layer has spent, counting other hosts'. Words another process can write: an
// overflow counts as spent to the brim, never wraps.
std::int64_t spent(const Counters& c) noexcept {
  std::int64_t used = 0;
  return __builtin_add_overflow(c.spend.used(), c.elsewhere.load(kRelaxed), &used) ? INT64_MAX : used;
}

// check(): whether `amount` more fits under `limit` with `used` spent.
bool fits(std::int64_t used, std::int64_t amount, std::int64_t limit) noexcept {
  std::int64_t room = 0;
  return limit == shm::kUnlimited || !(used > limit || (!__builtin_sub_overflow(limit, used, &room) && amount > room));
}


// Where a thread starts looking for a free reservation slot: a hash of an address on its stack,
// so threads spread over the table without thread-local storage (which, in a dlopen'ed library,
// may allocate on first use) and without a shared counter.
// A tenant or run layer without a table entry is limited when a default limit applies, or when the
// agent found no room for some key with an explicit limit (this may be that key).
bool limitedWithoutEntry(const shm::Header& h, std::uint32_t layer) noexcept {
  const bool run = layer == shm::kLayerRun;
  return (run ? h.defaults.run_limit : h.defaults.tenant_limit).load(kRelaxed) != shm::kUnlimited ||
         h.defaults.limited_untracked[run ? 1 : 0].load(kRelaxed) != 0;
}

// Whether a call site's tenant and run have the entries that enforcing their limits needs. A site
// from prepare(insert=true) has an index >= 0, kNone (no run given) or kUntracked (no room).
bool trackable(const shm::Header& h, std::int32_t tenant, std::int32_t run) noexcept {
  if (tenant < 0 && limitedWithoutEntry(h, shm::kLayerTenant)) return false;
  return !(run < 0 && run != site_index::kNone && limitedWithoutEntry(h, shm::kLayerRun));
}

std::uint32_t slotHint() noexcept {
  char probe;
  const auto a = reinterpret_cast<std::uintptr_t>(&probe);
  return static_cast<std::uint32_t>((a >> 12) * 0x9e3779b97f4a7c15ull >> 40);
}

// Finishes one step of reserve, settle or charge: the slot moves from the word this process left
// in it to `next` only if nobody took it meanwhile. A plain store here would write over a slot
// taken from a process that was stopped mid-way, and apply or return layers a second time.
// Each is a locked instruction, which is why an operation takes two or three, not one per layer.
bool step(ReservationSlot& s, std::uint64_t* w, std::uint64_t next) noexcept {
  std::uint64_t expect = *w;
  if (!s.word.compare_exchange_strong(expect, next, std::memory_order_acq_rel, kRelaxed)) return false;
  *w = next;
  return true;
}

// A tenant or run key's entry: its index (or a site_index marker) and its word. False: busy.
bool resolveKey(const KeyedTable<shm::BudgetSlot>& table, std::string_view key, const shm::Header& h,
                const std::atomic<std::int64_t>& default_limit, bool insert, std::uint32_t client, std::int32_t* index,
                std::uint64_t* word) noexcept {
  const Found f = insert ? findOrInsertBudget(table, key, client, default_limit, h.ledger_tail) : table.find(key);
  // Not there yet (nothing spent) is not the same as no room for it (cannot be counted).
  *index = f.index >= 0 ? f.index : f.what == Lookup::kAbsent ? site_index::kAbsent : site_index::kUntracked;
  *word = f.word;
  return f.what != Lookup::kBusy;
}

void copyKey(char* dst, std::uint32_t* len, std::string_view src) noexcept {
  *len = static_cast<std::uint32_t>(src.size());
  if (!src.empty()) std::memcpy(dst, src.data(), src.size());   // an empty view may hold nullptr
}

}  // namespace

// On every operation (Region::client() compares it with the pid that claimed the client number):
// one load once initialised, not a call_once.
std::uint32_t selfPid() noexcept {
  if (const std::uint32_t pid = g_pid.load(kRelaxed); pid != 0) return pid;
  initSelfOnce();
  return g_pid.load(kRelaxed);
}

// Every table is built from the geometry the Region checked and copied, never from the header.
Engine::Engine(const Region& region, bool agent) noexcept
    : region_(region),
      lost_(region.lostFlag()),
      h_(region.header()),
      tenants_(region.tenants(), region.geometry().tenant_capacity),
      runs_(region.runs(), region.geometry().run_capacity),
      models_(region.models(), region.geometry().model_capacity),
      rule_table_(region.ruleSlots(), region.geometry().rule_capacity),
      ring_(region.header(), region.ledger(), region.geometry().ledger_capacity),
      res_(region.reservations()),
      res_mask_(region.geometry().reservation_capacity - 1),
      agent_(agent) {
  initSelfOnce();
}


bool Engine::killed() const noexcept {
  if (h_.kill.active.load(kAcquire) == 0) return false;
  const std::int64_t expires = h_.kill.expires_unix_ns.load(kRelaxed);
  return expires == 0 || h_.clock_unix_ns.load(kRelaxed) < expires;
}

// Returns `amount` held on the first `n` layers, newest first.
void Engine::unhold(const Layers& layers, std::uint32_t n, std::int64_t amount) noexcept {
  for (std::uint32_t j = n; j-- > 0;) {
    if (layers.at[j] != nullptr) layers.at[j]->spend.add(shm::wrapNeg(amount), 0);
  }
}

Price Engine::price(const CallSite& site) const noexcept {
  if (site.free_model) return {};
  if (site.model >= 0 && static_cast<std::uint32_t>(site.model) < models_.capacity()) {
    const shm::ModelSlot& m = models_.at(site.model);
    return {m.prompt_nano_per_mtok.load(kRelaxed), m.completion_nano_per_mtok.load(kRelaxed)};
  }
  return {h_.defaults.fallback_prompt_nano_per_mtok.load(kRelaxed),
          h_.defaults.fallback_completion_nano_per_mtok.load(kRelaxed)};
}

void Engine::deniedByRule(const RuleHit& hit, Decision* d) const noexcept {
  d->code = denied(ruleCode(hit.scope, hit.metric));
  d->rule = hit.rule + 1;
  const shm::RuleDef& def = h_.rules[hit.rule];
  const std::int64_t end = def.window_end_ns.load(kRelaxed);
  d->resets_unix_ns = def.has_window != 0 && end != INT64_MAX ? end : 0;
}

void Engine::deniedByLayer(std::uint32_t layer, Decision* d) const noexcept {
  d->code = denied(kLayerCode[layer]);
  d->resets_unix_ns = layer == shm::kLayerRun ? 0 : h_.day_end_unix_ns.load(kRelaxed);
}

Decision Engine::matchSite(const CallSite& site, bool free, bool insert, RuleHits* hits,
                           bool best_effort) const noexcept {
  hits->n = 0;
  if (h_.rule_count.load(kRelaxed) == 0) return {};   // the usual case: one load
  const RuleCall call{{site.project_id, site.project_len}, {site.run_id, site.run_len},
                      {site.model_name, site.model_len}, {site.agent_id, site.agent_id_len},
                      {site.tags, std::min<std::size_t>(site.tags_len, sizeof site.tags)}, free};
  switch (matchRules(h_, rule_table_, call, insert, self(), hits, best_effort)) {
    case RuleMatch::kOk: return {};
    case RuleMatch::kTooMany: return fail(Code::kInvalidArgument);
    case RuleMatch::kBusy: return fail(Code::kRegionBusy);
    case RuleMatch::kCapacity: break;
  }
  h_.stats.capacity_refused.fetch_add(1, kRelaxed);
  return fail(Code::kCapacityExhausted);
}

// Through the one checked helper the reaper uses too: an index out of range is no layer.
Engine::Layers Engine::layersOf(std::int32_t run, std::int32_t tenant) const noexcept {
  const ResLayers l = region_.layers(run, tenant);
  return {{l.at[shm::kLayerRun], l.at[shm::kLayerTenant], l.at[shm::kLayerPlatform]}};
}

Decision Engine::prepare(const Call& call, CallSite* site, bool insert) noexcept {
  *site = CallSite{};
  if (lost()) return fail(Code::kRegionCorrupt);
  if (call.project_id.empty() || call.project_id.size() > shm::kKeyMax || call.model.empty() ||
      call.model.size() > shm::kKeyMax || call.run_id.size() > shm::kKeyMax ||
      call.agent_id.size() > shm::kKeyMax) {
    return fail(Code::kInvalidArgument);
  }
  if (!validIdText(call.project_id) || !validIdText(call.model) || !validIdText(call.run_id) ||
      !validIdText(call.agent_id) || !validTags(call.tags)) {
    return fail(Code::kInvalidArgument);
  }
  const Found model = models_.find(call.model);
  if (model.what == Lookup::kBusy) return fail(Code::kRegionBusy);
  site->model = model.what == Lookup::kFound ? model.index : site_index::kNone;
  site->free_model = call.model.starts_with(kFreeModelPrefix);
  copyKey(site->model_name, &site->model_len, call.model);
  copyKey(site->agent_id, &site->agent_id_len, call.agent_id);
  copyKey(site->project_id, &site->project_len, call.project_id);
  copyKey(site->run_id, &site->run_len, call.run_id);
  copyKey(site->tags, &site->tags_len, call.tags);

  const std::uint32_t me = self();
  if (!resolveKey(tenants_, call.project_id, h_, h_.defaults.tenant_limit, insert, me, &site->tenant, &site->tenant_word)) {
    return fail(Code::kRegionBusy);
  }
  if (!call.run_id.empty() &&
      !resolveKey(runs_, call.run_id, h_, h_.defaults.run_limit, insert, me, &site->run, &site->run_word)) {
    return fail(Code::kRegionBusy);
  }
  return {};
}

bool Engine::findKeys(const CallSite& site, bool insert, Keys* keys) const noexcept {
  if (keys->tenant >= 0 && !tenants_.current(keys->tenant, keys->tenant_word) &&
      !resolveKey(tenants_, {site.project_id, site.project_len}, h_, h_.defaults.tenant_limit, insert, self(),
                  &keys->tenant, &keys->tenant_word)) {
    return false;
  }
  return !(keys->run >= 0 && !runs_.current(keys->run, keys->run_word) &&
           !resolveKey(runs_, {site.run_id, site.run_len}, h_, h_.defaults.run_limit, insert, self(), &keys->run,
                       &keys->run_word));
}

bool Engine::stillCurrent(const Keys& keys, const RuleHits& hits) const noexcept {
  if (keys.tenant >= 0 && !tenants_.current(keys.tenant, keys.tenant_word)) return false;
  if (keys.run >= 0 && !runs_.current(keys.run, keys.run_word)) return false;
  for (std::uint32_t j = 0; j < hits.n; ++j) {
    if (hits.at[j].slot >= 0 && !rule_table_.current(hits.at[j].slot, hits.at[j].word)) return false;
  }
  return true;
}

// One Decision, built where the caller receives it: returning one of several (fail()'s, a local
// one) made GCC copy 64 bytes with `rep movs` on every check, a third of its time.
Decision Engine::check(const CallSite& site, std::int64_t prompt, std::int64_t completion) const noexcept {
  Decision d;
  decide(site, prompt, completion, &d);
  return d;
}

void Engine::decide(const CallSite& site, std::int64_t prompt, std::int64_t completion, Decision* out) const noexcept {
  Decision& d = *out;
  auto refuse = [&](Code code) noexcept { d.code = code; };
  if (lost()) return refuse(Code::kRegionCorrupt);
  if (!validTokens(prompt) || !validTokens(completion) || !siteInRange(site)) return refuse(Code::kInvalidArgument);
  if (killed()) return refuse(denied(Code::kEmergencyKill));
  const Price p = price(site);
  const bool free = p.isFree();
  const auto cost = free ? NanoUsd(0) : costOf(p, prompt, completion);
  if (!cost) return refuse(Code::kInvalidArgument);
  d.cost = *cost;
  Keys keys;
  if (!keysOf(site, false, &keys)) return refuse(Code::kRegionBusy);
  const Layers layers = layersOf(keys.run, keys.tenant);
  for (std::uint32_t i = 0; i < shm::kLayerCount && !free; ++i) {
    std::int64_t used = 0;
    std::int64_t limit = shm::kUnlimited;
    if (Counters* c = layers.at[i]) {
      used = spent(*c);
      limit = c->limit.load(kRelaxed);
    } else if (i != shm::kLayerPlatform && !(i == shm::kLayerRun && keys.run == site_index::kNone)) {
      const std::int32_t index = i == shm::kLayerRun ? keys.run : keys.tenant;
      if (index == site_index::kAbsent || index == site_index::kNone) {
        // Not in the table yet: nothing spent, and the default limit is what it will get.
        limit = (i == shm::kLayerRun ? h_.defaults.run_limit : h_.defaults.tenant_limit).load(kRelaxed);
      } else if (limitedWithoutEntry(h_, i)) {
        // No room for it: what it spends could not be counted, so its limit cannot be enforced.
        h_.stats.capacity_refused.fetch_add(1, kRelaxed);
        return refuse(Code::kCapacityExhausted);
      }
    }
    if (!fits(used, cost->count(), limit)) {
      if (Counters* c = layers.at[i]) c->denials.fetch_add(1, kRelaxed);
      deniedByLayer(i, &d);
      d.used = NanoUsd(used);
      d.limit = NanoUsd(limit);
      return;
    }
  }
  if (h_.rule_count.load(kRelaxed) != 0) checkRules(site, free, prompt, completion, &d);   // usually none
}

void Engine::checkRules(const CallSite& site, bool free, std::int64_t prompt, std::int64_t completion,
                        Decision* out) const noexcept {
  Decision& d = *out;
  RuleHits hits;
  if (Decision m = matchSite(site, free, false, &hits); !m.allowed()) {
    d = m;
    return;
  }
  for (std::uint32_t j = 0; j < hits.n; ++j) {
    const RuleHit& hit = hits.at[j];
    const std::int64_t amount = ruleAmount(hit.metric, d.cost.count(), prompt, completion, false);
    Counters* c = ruleCounters(hit.slot);   // none yet: nothing spent, the rule's limit applies
    const std::int64_t used = c != nullptr ? spent(*c) : 0;
    const std::int64_t limit = c != nullptr ? ruleLimit(*c, hit.rule_limit) : hit.rule_limit;
    if (!fits(used, amount, limit)) {
      if (c != nullptr) c->denials.fetch_add(1, kRelaxed);
      deniedByRule(hit, &d);
      d.used = NanoUsd(used);
      d.limit = NanoUsd(limit);
      return;
    }
  }
}

int Engine::claimSlot(std::uint32_t client, std::uint64_t* word) noexcept {
  const std::uint32_t hint = slotHint();
  for (std::uint32_t n = 0; n <= res_mask_; ++n) {
    const std::uint32_t i = (hint + n) & res_mask_;
    std::uint64_t w = res_[i].word.load(kRelaxed);
    if (shm::resState(w) != shm::kResFree) continue;
    const std::uint64_t claimed = shm::resWord(client, shm::resGen(w), shm::kResReserving, 0);
    if (res_[i].word.compare_exchange_strong(w, claimed, kAcquire, kRelaxed)) {
      *word = claimed;
      return static_cast<int>(i);
    }
  }
  return -1;
}

Decision Engine::reserve(const CallSite& site, std::int64_t prompt, std::int64_t completion, std::int64_t ttl_ms,
                         Reservation* out) noexcept {
  *out = {};
  if (lost()) return fail(Code::kRegionCorrupt);
  if (!validTokens(prompt) || !validTokens(completion) || ttl_ms < 0 || ttl_ms > 7 * 86'400'000LL ||
      !siteInRange(site)) {
    return fail(Code::kInvalidArgument);
  }
  if (killed()) return fail(denied(Code::kEmergencyKill));
  const Price p = price(site);
  const bool free = p.isFree();
  const auto estimate = free ? NanoUsd(0) : costOf(p, prompt, completion);
  if (!estimate) return fail(Code::kInvalidArgument);
  Keys keys;
  if (!keysOf(site, true, &keys)) return fail(Code::kRegionBusy);
  // A limited layer that could not get a table entry cannot be enforced: refuse rather than
  // let it spend unchecked. Unlimited ones are simply not counted per tenant or run.
  if (!trackable(h_, keys.tenant, keys.run)) {
    h_.stats.capacity_refused.fetch_add(1, kRelaxed);
    return fail(Code::kCapacityExhausted);
  }
  // The rules' counters too, before anything changes: a call that cannot be matched holds nothing.
  RuleHits hits;
  if (Decision m = matchSite(site, free, true, &hits); !m.allowed()) return m;
  if (keys.tenant < 0 || (keys.run < 0 && keys.run != site_index::kNone)) {
    h_.stats.untracked_calls.fetch_add(1, kRelaxed);
  }

  // Half-way words name the process acting (its lock tells the reaper whether it lives); the
  // finished reservation names its owner, which for the agent is "the agent", not this process.
  const std::uint32_t me = self();
  const std::uint32_t owner = agent_ ? clientlock::kAgentClient : me;
  std::uint64_t w = 0;
  const int index = claimSlot(me, &w);
  if (index < 0) {
    h_.stats.capacity_refused.fetch_add(1, kRelaxed);
    return fail(Code::kCapacityExhausted);
  }
  ReservationSlot& s = res_[index];
  const std::uint32_t gen = shm::resGen(w);
  const std::int64_t ttl_ns = ttl_ms > 0 ? ttl_ms * 1'000'000 : h_.defaults.reservation_ttl_ns.load(kRelaxed);
  // For people reading the region (pid in the owner's own namespace); liveness does not use them.
  s.owner_pid.store(g_pid.load(kRelaxed), kRelaxed);
  s.owner_start.store(g_start_time.load(kRelaxed), kRelaxed);
  s.deadline_unix_ns.store(shm::wrapAdd(h_.clock_unix_ns.load(kRelaxed), ttl_ns), kRelaxed);
  s.ttl_ns.store(ttl_ns, kRelaxed);
  s.held.store(estimate->count(), kRelaxed);
  s.charge_target.store(0, kRelaxed);
  s.charged_prompt.store(0, kRelaxed);
  s.charged_completion.store(0, kRelaxed);
  s.prompt_nano_per_mtok.store(p.prompt_nano_per_mtok, kRelaxed);
  s.completion_nano_per_mtok.store(p.completion_nano_per_mtok, kRelaxed);
  s.free_model.store(free ? 1 : 0, kRelaxed);
  s.ids.set({{site.project_id, site.project_len},
              {site.run_id, site.run_len},
              {site.model_name, site.model_len},
              {site.agent_id, site.agent_id_len}});
  s.tags.set({site.tags, std::min<std::size_t>(site.tags_len, sizeof site.tags)});
  auto release_slot = [&]() noexcept { return step(s, &w, shm::resWord(0, shm::nextGen(gen), shm::kResFree, 0)); };

  Decision d;
  d.cost = *estimate;
  std::int64_t amount[shm::kMaxRuleHolds];
  Layers layers{};
  auto undo = [&](std::uint32_t held_layers, std::uint32_t held_rules) noexcept {
    for (std::uint32_t j = held_rules; j-- > 0;) ruleCounters(hits.at[j].slot)->spend.add(shm::wrapNeg(amount[j]), 0);
    if (!free) unhold(layers, held_layers, estimate->count());
  };
  auto refuse = [&](std::uint32_t held_layers, std::uint32_t held_rules) noexcept {
    undo(held_layers, held_rules);
    return release_slot();
  };
  for (int attempt = 1;; ++attempt) {
    // The entries and what each rule counter will hold, written before any of them changes (as
    // `held` is), so that the reconciliation knows what a reserving slot may hold on each, and
    // the agent sees which keys it must not reclaim.
    s.tenant.store(keys.tenant, kRelaxed);
    s.run.store(keys.run, kRelaxed);
    s.rule_holds.store(hits.n, kRelaxed);
    for (std::uint32_t j = 0; j < hits.n; ++j) {
      amount[j] = ruleAmount(hits.at[j].metric, estimate->count(), prompt, completion, false);
      s.rules[j].slot.store(hits.at[j].slot, kRelaxed);
      s.rules[j].rule.store(static_cast<std::uint16_t>(hits.at[j].rule), kRelaxed);
      s.rules[j].metric.store(hits.at[j].metric, kRelaxed);
      s.rules[j].held.store(amount[j], kRelaxed);
      s.rules[j].target.store(0, kRelaxed);
    }

    // The layers are held without a step between them (see layout.h): a process that dies here
    // leaves holds the reaper does not return, and the agent's reconciliation does.
    layers = layersOf(keys.run, keys.tenant);
    for (std::uint32_t i = 0; i < shm::kLayerCount; ++i) {
      Counters* c = layers.at[i];
      // Free models skip the money layers. A paid call estimated at zero is still refused by a
      // layer already past its limit, as check() refuses it.
      if (c == nullptr || free || tryHold(*c, estimate->count(), &d)) continue;
      c->denials.fetch_add(1, kRelaxed);
      if (!refuse(i, 0)) return fail(Code::kStaleOwner);
      deniedByLayer(i, &d);
      return d;
    }
    for (std::uint32_t j = 0; j < hits.n; ++j) {
      Counters& c = *ruleCounters(hits.at[j].slot);   // matched with insert: every hit has a counter
      if (tryHoldWithin(c, amount[j], ruleLimit(c, hits.at[j].rule_limit), &d)) continue;
      c.denials.fetch_add(1, kRelaxed);
      if (!refuse(shm::kLayerCount, j)) return fail(Code::kStaleOwner);
      deniedByRule(hits.at[j], &d);
      return d;
    }
    // Pairs with the fence in RegionAdmin::reclaimKeys: either it sees these holds and the
    // entries named above, or this sees its reclaim. A hold is a locked instruction (cas16),
    // which on x86-64 orders every store before it with every load after it; only a call that
    // held nothing (a free model without rules) needs the fence itself.
    if (free && hits.n == 0) std::atomic_thread_fence(std::memory_order_seq_cst);
    if (stillCurrent(keys, hits)) break;
    undo(shm::kLayerCount, hits.n);
    const bool again = attempt < kMaxKeyAttempts && keysOf(site, true, &keys) && trackable(h_, keys.tenant, keys.run);
    const Decision m = again ? matchSite(site, free, true, &hits) : fail(Code::kRegionBusy);
    if (!again || !m.allowed()) {
      if (!release_slot()) return fail(Code::kStaleOwner);
      return m;
    }
  }
  // Publishes the fields with the reservation. Whoever took the slot meanwhile returned nothing
  // for a reserving slot, so every hold above is this call's to return.
  if (!step(s, &w, shm::resWord(owner, gen, shm::kResActive, 0))) {
    undo(shm::kLayerCount, hits.n);
    return fail(Code::kStaleOwner);
  }
  out->id = shm::reservationId(static_cast<std::uint32_t>(index), gen);
  return d;
}

shm::ResState Engine::acquire(Reservation r, std::uint32_t accepted_mask, shm::ResState into,
                              std::uint64_t* word, std::uint32_t* owner) noexcept {
  const std::uint32_t index = shm::reservationIndex(r.id);
  const std::uint32_t gen = shm::reservationGen(r.id);
  if (!shm::reservationIdWellFormed(r.id) || index > res_mask_) return shm::kResFree;
  ReservationSlot& s = res_[index];
  std::uint64_t w = s.word.load(kAcquire);
  for (int spins = 0;; ++spins) {
    if (shm::resGen(w) != gen) return shm::kResFree;
    const shm::ResState st = shm::resState(w);
    if (st == shm::kResFree) return shm::kResFree;
    if ((accepted_mask >> st) & 1u) {
      const std::uint64_t mine = shm::resWord(self(), gen, into, 0);
      if (s.word.compare_exchange_weak(w, mine, kAcquire, kAcquire)) {
        *word = mine;
        *owner = shm::resClient(w);   // an active or expired word names the owner
        return st;
      }
      continue;
    }
    // Another thread or the reaper is in the middle of an operation on it: wait it out.
    if (spins > (1 << 20)) return kAcquireBusy;
    cpuRelax();
    w = s.word.load(kAcquire);
  }
}

shm::LedgerSlot* Engine::claimEntry(std::uint64_t* pos, Code* refused) noexcept {
  // The agent cannot write its ledger file: an entry acknowledged now could only wait in the
  // ring, and the operator has been told; refuse before anything is booked. One load.
  if (h_.ledger_unavailable.load(kRelaxed) != 0) {
    *refused = Code::kLedgerUnavailable;
    return nullptr;
  }
  // The ring's writer identity is the client number too (its lock says whether the writer lives).
  bool corrupt = false;
  shm::LedgerSlot* entry = ring_.claim(self(), pos, &corrupt);
  if (entry == nullptr) {
    if (!corrupt) h_.stats.ledger_full.fetch_add(1, kRelaxed);
    *refused = corrupt ? Code::kRegionCorrupt : Code::kLedgerFull;
  }
  return entry;
}

Decision Engine::commit(Reservation r, std::string_view provider, std::int64_t prompt,
                        std::int64_t completion) noexcept {
  if (lost()) return fail(Code::kRegionCorrupt);
  if (!validTokens(prompt) || !validTokens(completion) || provider.size() > shm::kKeyMax || !validIdText(provider)) {
    return fail(Code::kInvalidArgument);
  }
  // The ledger slot first: if the ring is full, nothing has changed and the caller may retry.
  std::uint64_t pos = 0;
  Code refused = Code::kOk;
  shm::LedgerSlot* entry = claimEntry(&pos, &refused);
  if (entry == nullptr) return fail(refused);
  Decision d = settle(r, true, prompt, completion, entry, provider);
  if (d.allowed()) {
    d.ledger_seq = pos + 1;
  } else {
    entry->kind = shm::kLedgerVoid;
  }
  if (!LedgerRing::publish(*entry, pos) && d.allowed()) {
    d.code = Code::kLedgerLost;
    d.ledger_seq = 0;
  }
  return d;
}

Decision Engine::release(Reservation r) noexcept {
  if (lost()) return fail(Code::kRegionCorrupt);
  return settle(r, false, 0, 0, nullptr, {});
}

Decision Engine::settle(Reservation r, bool book_cost, std::int64_t prompt, std::int64_t completion,
                        shm::LedgerSlot* entry, std::string_view provider) noexcept {
  std::uint64_t w = 0;
  std::uint32_t owner = 0;
  const shm::ResState was =
      acquire(r, (1u << shm::kResActive) | (1u << shm::kResExpired), shm::kResSettling, &w, &owner);
  if (was == shm::kResFree) return fail(Code::kUnknownReservation);
  if (was == kAcquireBusy) return fail(Code::kRegionBusy);
  ReservationSlot& s = res_[shm::reservationIndex(r.id)];
  const std::uint32_t gen = shm::resGen(w);
  const bool expired = was == shm::kResExpired;
  const std::int64_t held = expired ? 0 : s.held.load(kRelaxed);
  std::int64_t cost = 0;
  if (book_cost && s.free_model.load(kRelaxed) == 0) {
    // Tokens are checked by the caller and prices when they enter the region; within those
    // bounds a cost always fits. The fallback only guards a region corrupted from outside.
    const Price p{s.prompt_nano_per_mtok.load(kRelaxed), s.completion_nano_per_mtok.load(kRelaxed)};
    cost = costOf(p, prompt, completion).value_or(NanoUsd(held)).count();
  }
  // No step between the layers (see layout.h): whoever takes a settling slot returns nothing
  // for it, so each layer is settled once, by this call, even if the slot is taken meanwhile.
  const Layers layers = layersOf(s.run.load(kRelaxed), s.tenant.load(kRelaxed));
  for (Counters* c : layers.at) {
    if (c == nullptr) continue;
    if (book_cost) {
      c->spend.add(shm::wrapSub(cost, held), cost);
    } else {
      c->spend.add(shm::wrapNeg(held), 0);
    }
  }
  // The rules' counters, each in its metric: the hold back, and what the call counts booked.
  const std::uint32_t rules = std::min(s.rule_holds.load(kRelaxed), shm::kMaxRuleHolds);
  for (std::uint32_t j = 0; j < rules; ++j) {
    Counters* c = ruleCounters(s.rules[j].slot.load(kRelaxed));
    if (c == nullptr) continue;
    const std::int64_t rule_held = expired ? 0 : s.rules[j].held.load(kRelaxed);
    const std::int64_t booked =
        book_cost ? ruleAmount(s.rules[j].metric.load(kRelaxed), cost, prompt, completion, true) : 0;
    c->spend.add(shm::wrapSub(booked, rule_held), booked);
  }
  if (entry != nullptr) {
    entry->kind = shm::kLedgerCommit;
    entry->unix_ns = h_.clock_unix_ns.load(kRelaxed);
    entry->day = h_.day.load(kRelaxed);
    entry->prompt_tokens = prompt;
    entry->completion_tokens = completion;
    entry->cost_nano_usd = cost;
    entry->reservation_id = r.id;
    entry->text.set({s.ids.get(shm::kResProject), s.ids.get(shm::kResRun), s.ids.get(shm::kResModel),
                     s.ids.get(shm::kResAgent), provider});
    entry->tags.set(s.tags.get());
  }
  // If someone took the slot only now, every layer was settled exactly once by this call: the
  // booking stands, and the slot is theirs to free.
  (void)step(s, &w, shm::resWord(0, shm::nextGen(gen), shm::kResFree, 0));
  Decision d;
  d.cost = NanoUsd(book_cost ? cost : held);
  d.reservation_expired = book_cost && expired;
  return d;
}

Decision Engine::charge(Reservation r, std::int64_t more_prompt, std::int64_t more_completion) noexcept {
  if (lost()) return fail(Code::kRegionCorrupt);
  if (!validTokens(more_prompt) || !validTokens(more_completion)) return fail(Code::kInvalidArgument);
  if (killed()) return fail(denied(Code::kEmergencyKill));
  std::uint64_t w = 0;
  std::uint32_t owner = 0;
  const shm::ResState was =
      acquire(r, (1u << shm::kResActive) | (1u << shm::kResExpired), shm::kResCharging, &w, &owner);
  if (was == shm::kResFree) return fail(Code::kUnknownReservation);
  if (was == kAcquireBusy) return fail(Code::kRegionBusy);
  ReservationSlot& s = res_[shm::reservationIndex(r.id)];
  const std::uint32_t gen = shm::resGen(w);
  const std::uint32_t me = shm::resClient(w);
  // Back to waiting: the word names the owner again, not this caller, so that the reaper judges
  // the reservation by its owner's life.
  auto back = [&](shm::ResState st) noexcept { return step(s, &w, shm::resWord(owner, gen, st, 0)); };
  if (was == shm::kResExpired) {
    return fail(back(shm::kResExpired) ? Code::kReservationExpired : Code::kStaleOwner);
  }
  // The slot's totals are words another process can write: an overflow is no cost at all.
  std::int64_t total_prompt = 0, total_completion = 0;
  const bool overflow = __builtin_add_overflow(s.charged_prompt.load(kRelaxed), more_prompt, &total_prompt) ||
                        __builtin_add_overflow(s.charged_completion.load(kRelaxed), more_completion, &total_completion);
  const Price p{s.prompt_nano_per_mtok.load(kRelaxed), s.completion_nano_per_mtok.load(kRelaxed)};
  const auto consumed = overflow                            ? std::nullopt
                        : s.free_model.load(kRelaxed) != 0 ? std::optional(NanoUsd(0))
                                                           : costOf(p, total_prompt, total_completion);
  if (!consumed) return fail(back(shm::kResActive) ? Code::kInvalidArgument : Code::kStaleOwner);
  Decision d;
  d.cost = *consumed;
  const std::int64_t held = s.held.load(kRelaxed);
  // What each rule counter must hold for the tokens charged so far (never less than it holds).
  const std::uint32_t rules = std::min(s.rule_holds.load(kRelaxed), shm::kMaxRuleHolds);
  std::int64_t rule_held[shm::kMaxRuleHolds], rule_want[shm::kMaxRuleHolds];
  bool rules_grow = false;
  for (std::uint32_t j = 0; j < rules; ++j) {
    rule_held[j] = s.rules[j].held.load(kRelaxed);
    rule_want[j] = std::max(rule_held[j], ruleAmount(s.rules[j].metric.load(kRelaxed), consumed->count(),
                                                     total_prompt, total_completion, false));
    rules_grow = rules_grow || rule_want[j] > rule_held[j];
  }
  if (consumed->count() > held || rules_grow) {
    // Grows every layer and rule counter by the difference, then one step (progress 1) says so
    // before the holds are written: a process that dies before that step leaves the growth to
    // reconciliation, and whoever takes the slot before it returns the old holds only, which this
    // call then undoes. The targets are written first, for the reaper after that step.
    const std::int64_t target = std::max(consumed->count(), held);
    const std::int64_t delta = shm::wrapSub(target, held);
    s.charge_target.store(target, kRelaxed);
    for (std::uint32_t j = 0; j < rules; ++j) s.rules[j].target.store(rule_want[j], kRelaxed);
    const Layers layers = layersOf(s.run.load(kRelaxed), s.tenant.load(kRelaxed));
    auto undo = [&](std::uint32_t grown_layers, std::uint32_t grown_rules) noexcept {
      for (std::uint32_t j = grown_rules; j-- > 0;) {
        if (Counters* c = ruleCounters(s.rules[j].slot.load(kRelaxed))) {
          c->spend.add(shm::wrapSub(rule_held[j], rule_want[j]), 0);
        }
      }
      if (delta != 0) unhold(layers, grown_layers, delta);
    };
    for (std::uint32_t i = 0; i < shm::kLayerCount && delta != 0; ++i) {
      Counters* c = layers.at[i];
      if (c == nullptr || tryHold(*c, delta, &d)) continue;
      c->denials.fetch_add(1, kRelaxed);
      undo(i, 0);
      if (!back(shm::kResActive)) return fail(Code::kStaleOwner);
      deniedByLayer(i, &d);
      return d;
    }
    for (std::uint32_t j = 0; j < rules; ++j) {
      Counters* c = ruleCounters(s.rules[j].slot.load(kRelaxed));
      if (c == nullptr || rule_want[j] == rule_held[j]) continue;
      // The rule's current limit, read from its definition as reserve did.
      const std::uint32_t number = s.rules[j].rule.load(kRelaxed) & (shm::kMaxRules - 1);   // checked
      RuleHit hit{};
      hit.rule = number;
      hit.scope = h_.rules[number].scope;
      hit.metric = static_cast<std::uint8_t>(s.rules[j].metric.load(kRelaxed));
      const std::int64_t rule_limit = ruleLimit(*c, h_.rules[number].limit.load(kRelaxed));
      if (tryHoldWithin(*c, shm::wrapSub(rule_want[j], rule_held[j]), rule_limit, &d)) continue;
      c->denials.fetch_add(1, kRelaxed);
      undo(shm::kLayerCount, j);
      if (!back(shm::kResActive)) return fail(Code::kStaleOwner);
      deniedByRule(hit, &d);
      return d;
    }
    if (!step(s, &w, shm::resWord(me, gen, shm::kResCharging, shm::kChargeGrown))) {
      undo(shm::kLayerCount, rules);
      return fail(Code::kStaleOwner);
    }
    for (std::uint32_t j = 0; j < rules; ++j) s.rules[j].held.store(rule_want[j], kRelaxed);
    s.held.store(target, kRelease);
  }
  s.charged_prompt.store(total_prompt, kRelaxed);
  s.charged_completion.store(total_completion, kRelaxed);
  s.deadline_unix_ns.store(shm::wrapAdd(h_.clock_unix_ns.load(kRelaxed), s.ttl_ns.load(kRelaxed)), kRelaxed);
  if (!back(shm::kResActive)) return fail(Code::kStaleOwner);
  return d;
}

Decision Engine::record(const Usage& u) noexcept {
  if (lost()) return fail(Code::kRegionCorrupt);
  if (!validTokens(u.prompt_tokens) || !validTokens(u.completion_tokens) || u.provider.size() > shm::kKeyMax || !validIdText(u.provider)) {
    return fail(Code::kInvalidArgument);
  }
  CallSite site;
  Call call{u.project_id, u.model, u.run_id, u.agent_id, 0, 0, 0};
  call.tags = u.tags;
  if (Decision d = prepare(call, &site, true); !d.allowed()) return d;
  const auto cost = costOf(price(site), u.prompt_tokens, u.completion_tokens);
  if (!cost) return fail(Code::kInvalidArgument);
  // The call has happened: every rule counter that can count it does; one that cannot (no room,
  // a key left half-written, more rules than a call may match) makes the answer
  // kCapacityExhausted, as a tenant without a table entry does (below).
  const bool free = price(site).isFree();
  RuleHits hits;
  Decision matched = matchSite(site, free, true, &hits, /*best_effort=*/true);
  std::uint64_t pos = 0;
  Code refused = Code::kOk;
  shm::LedgerSlot* entry = claimEntry(&pos, &refused);
  if (entry == nullptr) return fail(refused);
  // The call has happened: its entry is written and counted where it can be, even when its
  // tenant or run has a limit but no entry; the answer then says so (kCapacityExhausted).
  if (site.tenant < 0 || (site.run < 0 && site.run != site_index::kNone)) {
    h_.stats.untracked_calls.fetch_add(1, kRelaxed);
  }
  bool layers_counted = false;
  for (int attempt = 1;; ++attempt) {
    layers_counted = trackable(h_, site.tenant, site.run);
    auto book = [&](std::int64_t sign) noexcept {
      for (Counters* c : layersOf(site.run, site.tenant).at) {
        if (c != nullptr) c->spend.add(sign * cost->count(), sign * cost->count());
      }
      for (std::uint32_t j = 0; j < hits.n; ++j) {
        const std::int64_t booked =
            sign * ruleAmount(hits.at[j].metric, cost->count(), u.prompt_tokens, u.completion_tokens, true);
        ruleCounters(hits.at[j].slot)->spend.add(booked, booked);
      }
    };
    book(1);
    // As in reserve: an entry the agent reclaimed under this booking is booked again on the
    // key's new entry. The platform's booking is a locked instruction, the fence reserve needs
    // (x86-64).
    if (stillCurrent({site.tenant, site.run, site.tenant_word, site.run_word}, hits)) break;
    book(-1);
    const Decision again = attempt < kMaxKeyAttempts ? prepare(call, &site, true) : fail(Code::kRegionBusy);
    if (!again.allowed()) {
      // Keys reclaimed as fast as they are booked on, or a slot busy: counted in the platform
      // only, and the answer says the call's own keys could not count it.
      h_.platform.spend.add(cost->count(), cost->count());
      layers_counted = false;
      break;
    }
    matched = matchSite(site, free, true, &hits, /*best_effort=*/true);
  }
  entry->kind = shm::kLedgerRecord;
  entry->unix_ns = h_.clock_unix_ns.load(kRelaxed);
  entry->day = h_.day.load(kRelaxed);
  entry->prompt_tokens = u.prompt_tokens;
  entry->completion_tokens = u.completion_tokens;
  entry->cost_nano_usd = cost->count();
  entry->reservation_id = 0;
  entry->text.set({u.project_id, u.run_id, u.model, u.agent_id, u.provider});
  entry->tags.set(u.tags);
  Decision d;
  d.cost = *cost;
  if (LedgerRing::publish(*entry, pos)) {
    d.ledger_seq = pos + 1;
    if (!layers_counted || !matched.allowed()) {
      if (!layers_counted) h_.stats.capacity_refused.fetch_add(1, kRelaxed);   // matchSite counted its own
      d.code = Code::kCapacityExhausted;
    }
  } else {
    d.code = Code::kLedgerLost;
  }
  return d;
}

// --- views -----------------------------------------------------------------------------------

BudgetView Engine::view(const Counters* c, std::int64_t default_limit) const {
  BudgetView v;
  v.day = h_.day.load(kRelaxed);
  if (c == nullptr) {
    if (default_limit != shm::kUnlimited) v.limit = NanoUsd(default_limit);
    return v;
  }
  v.tracked = true;
  const std::int64_t limit = c->limit.load(kRelaxed);
  if (limit != shm::kUnlimited) v.limit = NanoUsd(limit);
  const std::int64_t committed = c->spend.committed();
  v.committed = NanoUsd(committed);
  // Two separate loads: clamp the transient a concurrent commit can show between them.
  v.held = NanoUsd(std::max<std::int64_t>(0, shm::wrapSub(c->spend.used(), committed)));
  v.elsewhere = NanoUsd(c->elsewhere.load(kRelaxed));
  v.prompt_tokens = c->prompt_tokens.load(kRelaxed);
  v.completion_tokens = c->completion_tokens.load(kRelaxed);
  v.calls = c->calls.load(kRelaxed);
  v.denials = c->denials.load(kRelaxed);
  return v;
}

BudgetView Engine::tenant(std::string_view project_id) const {
  const Found f = tenants_.find(project_id);
  return view(f.index >= 0 ? &tenants_.at(f.index).c : nullptr, h_.defaults.tenant_limit.load(kRelaxed));
}

BudgetView Engine::run(std::string_view run_id) const {
  const Found f = runs_.find(run_id);
  return view(f.index >= 0 ? &runs_.at(f.index).c : nullptr, h_.defaults.run_limit.load(kRelaxed));
}

BudgetView Engine::platform() const { return view(&h_.platform, shm::kUnlimited); }

KillSwitchState Engine::killSwitch() const {
  KillSwitchState k;
  const shm::KillSwitch& ks = h_.kill;
  // Bounded: the agent writes the reason in microseconds, so a sequence that stays odd (or keeps
  // changing) this long was left so by a dead agent or written by someone else. `active`, read
  // on its own, still decides.
  constexpr int kMaxTries = 1 << 16;
  for (int tries = 0;; ++tries) {
    if (tries == kMaxTries) {
      k.reason = "(kill switch reason unreadable: region corrupt)";
      k.since_unix_ns = ks.since_unix_ns.load(kRelaxed);
      k.expires_unix_ns = ks.expires_unix_ns.load(kRelaxed);
      break;
    }
    const std::uint32_t seq = ks.seq.load(kAcquire);
    if (seq & 1u) {
      cpuRelax();
      continue;
    }
    char buf[shm::kReasonMax];
    for (std::size_t i = 0; i < shm::kReasonMax / 8; ++i) {
      const std::uint64_t word = ks.reason_words[i].load(kRelaxed);
      std::memcpy(buf + i * 8, &word, 8);
    }
    const std::uint32_t len = std::min<std::uint32_t>(ks.reason_len.load(kRelaxed), shm::kReasonMax);
    k.since_unix_ns = ks.since_unix_ns.load(kRelaxed);
    k.expires_unix_ns = ks.expires_unix_ns.load(kRelaxed);
    std::atomic_thread_fence(kAcquire);
    if (ks.seq.load(kRelaxed) == seq) {
      k.reason.assign(buf, len);
      break;
    }
  }
  k.active = killed();
  return k;
}

std::uint32_t Engine::liveReservations() const noexcept {
  std::uint32_t n = 0;
  for (std::uint32_t i = 0; i <= res_mask_; ++i) {
    const shm::ResState st = shm::resState(res_[i].word.load(kRelaxed));
    if (st != shm::kResFree && st != shm::kResExpired) ++n;
  }
  return n;
}

}  // namespace tokenfuse
