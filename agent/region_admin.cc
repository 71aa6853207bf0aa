#include "region_admin.h"

#include "budget_table.h"
#include "client_lock.h"
#include "ids.h"
#include "proc.h"
#include "rule_match.h"

#include <algorithm>
#include <unordered_map>

namespace tokenfuse {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kRelease = std::memory_order_release;
constexpr auto kAcquire = std::memory_order_acquire;

std::int64_t raw(std::optional<NanoUsd> limit) { return limit ? limit->count() : shm::kUnlimited; }

std::string idProblem(LimitTable t, std::string_view id) {
  const char* what = t == LimitTable::kTenant ? "project_id" : "run_id";
  if (id.empty()) return std::string(what) + " must not be empty";
  if (id.size() > shm::kKeyMax) {
    return std::string(what) + " is " + std::to_string(id.size()) + " bytes; the most is " +
           std::to_string(shm::kKeyMax);
  }
  if (!validIdText(id)) return std::string(what) + " must be valid UTF-8 without NUL bytes";
  return {};
}

std::string priceProblem(Price p) {
  if (p.prompt_nano_per_mtok < 0 || p.completion_nano_per_mtok < 0) return "a price must not be negative";
  if (p.prompt_nano_per_mtok > kMaxPriceNanoPerMtok || p.completion_nano_per_mtok > kMaxPriceNanoPerMtok) {
    return "a price may be at most 1000000 USD per million tokens";
  }
  return {};
}

// Returns the bookings it took out. `keep_elsewhere`: the caller sets `elsewhere` itself.
std::int64_t resetDay(shm::Counters& c, bool keep_elsewhere = false) noexcept {
  // Takes today's bookings out of `used` and leaves the holds of calls still in flight, in one
  // atomic step: a commit lands wholly in one day or the other.
  const std::int64_t taken = c.spend.takeCommitted();
  if (!keep_elsewhere) c.elsewhere.store(0, kRelaxed);   // other hosts' spending is per day too
  c.prompt_tokens.store(0, kRelaxed);
  c.completion_tokens.store(0, kRelaxed);
  c.calls.store(0, kRelaxed);
  c.denials.exchange(0, kRelaxed);
  return taken;
}

void setCounts(shm::Counters& c, std::int64_t prompt, std::int64_t completion, std::int64_t calls) noexcept {
  c.prompt_tokens.store(prompt, kRelaxed);
  c.completion_tokens.store(completion, kRelaxed);
  c.calls.store(calls, kRelaxed);
}

void addCounts(shm::Counters& c, std::int64_t prompt, std::int64_t completion) noexcept {
  // Only the agent writes these, and only under stats_mu_: plain read-modify-write suffices.
  // (Group members can write them too: the sums wrap rather than overflow.)
  c.prompt_tokens.store(shm::wrapAdd(c.prompt_tokens.load(kRelaxed), prompt), kRelaxed);
  c.completion_tokens.store(shm::wrapAdd(c.completion_tokens.load(kRelaxed), completion), kRelaxed);
  c.calls.store(shm::wrapAdd(c.calls.load(kRelaxed), 1), kRelaxed);
}

// The immutable part of a definition: a live rule with the same keeps its index and counters.
bool sameShape(const shm::RuleDef& d, const RuleSpec& r, const std::string& match, bool prefix) {
  return std::string_view(d.name, std::min<std::size_t>(d.name_len, sizeof d.name)) == r.name &&
         d.scope == static_cast<std::uint8_t>(r.scope) && d.metric == static_cast<std::uint8_t>(r.metric) &&
         std::string_view(d.match, std::min<std::size_t>(d.match_len, sizeof d.match)) == match &&
         (d.match_prefix != 0) == prefix && (d.has_window != 0) == (r.window.kind != WindowKind::kAllTime) &&
         d.window_kind == static_cast<std::uint8_t>(r.window.kind) &&
         d.week_start == static_cast<std::uint8_t>(r.window.week_start);
}

}  // namespace

static_assert(static_cast<int>(RuleScope::kTenantAgent) == shm::kScopeTenantAgent &&
              static_cast<int>(RuleScope::kTag) == shm::kScopeTag && static_cast<int>(RuleScope::kRun) == shm::kScopeRun);
static_assert(static_cast<int>(RuleMetric::kConcurrency) == shm::kMetricConcurrency &&
              static_cast<int>(RuleMetric::kRequests) == shm::kMetricRequests);

std::string ruleCounterName(const shm::Header& h, std::string_view key) {
  RuleKey k;
  if (!parseRuleKey(key, &k)) return "(not a rule counter)";
  const shm::RuleDef& d = h.rules[k.rule];
  std::string out(d.name, std::min<std::size_t>(d.name_len, sizeof d.name));
  out += ':';
  if (d.match_prefix != 0) {
    out.append(d.match, std::min<std::size_t>(d.match_len, sizeof d.match));
    out += '*';
  }
  out += k.first;
  if (d.scope == shm::kScopeTenantModel || d.scope == shm::kScopeTenantAgent) {
    out += '/';
    out += k.second;
  }
  return out;
}

RegionAdmin::RegionAdmin(Region& region) : region_(region), engine_(region, /*agent=*/true) {}

KeyedTable<shm::BudgetSlot> RegionAdmin::table(LimitTable t) const noexcept {
  const Geometry& g = region_.geometry();   // copied at attach: the header's words may lie
  return t == LimitTable::kTenant ? KeyedTable<shm::BudgetSlot>(region_.tenants(), g.tenant_capacity)
                                  : KeyedTable<shm::BudgetSlot>(region_.runs(), g.run_capacity);
}

const std::atomic<std::int64_t>& RegionAdmin::defaultLimit(LimitTable t) const noexcept {
  const shm::Defaults& d = region_.header().defaults;
  return t == LimitTable::kTenant ? d.tenant_limit : d.run_limit;
}

void RegionAdmin::setLimitedUntracked(LimitTable t, std::uint32_t n, LimitSource source) noexcept {
  const int table = t == LimitTable::kTenant ? 0 : 1;
  limited_untracked_[table][static_cast<int>(source)].store(n, kRelaxed);
  const std::uint64_t sum = std::uint64_t{limited_untracked_[table][0].load(kRelaxed)} +
                            limited_untracked_[table][1].load(kRelaxed);
  region_.header().defaults.limited_untracked[table].store(static_cast<std::uint32_t>(std::min<std::uint64_t>(sum, UINT32_MAX)),
                                                           kRelease);
}

void RegionAdmin::publish(std::int64_t now_unix_ns, std::int32_t day) noexcept {
  shm::Header& h = region_.header();
  h.agent_pid.store(static_cast<std::int32_t>(selfPid()), kRelaxed);
  h.agent_pidns.store(proc::pidNamespace(), kRelaxed);
  h.clock_unix_ns.store(now_unix_ns, kRelaxed);
  h.day.store(day, kRelaxed);
  h.ready.store(1, kRelease);
}

void RegionAdmin::setClock(std::int64_t now_unix_ns) noexcept {
  region_.header().clock_unix_ns.store(now_unix_ns, kRelaxed);
}

void RegionAdmin::setPlatformLimit(std::optional<NanoUsd> limit) noexcept {
  region_.header().platform.limit.store(raw(limit), kRelease);
  region_.header().platform.limit_explicit.store(1, kRelaxed);
}

Status RegionAdmin::setLimit(LimitTable t, std::string_view id, std::optional<NanoUsd> limit) {
  if (auto p = idProblem(t, id); !p.empty()) return Status::error(p);
  std::lock_guard lock(stats_mu_);   // against reclaimKeys: a key given a limit stays
  const Found f = findOrInsertBudget(table(t), id, engine_.self(), defaultLimit(t), region_.header().ledger_tail);
  if (f.index < 0) {
    return Status::error(std::string(t == LimitTable::kTenant ? "tenant" : "run") + " table is " +
                         (f.what == Lookup::kBusy ? "busy (a client died while adding an entry; retry)"
                                                  : "full: raise its capacity in the config and restart"));
  }
  shm::Counters& c = table(t).at(f.index).c;
  c.limit.store(raw(limit), kRelease);
  c.limit_explicit.store(1, kRelaxed);
  return {};
}

Status RegionAdmin::setElsewhere(std::int32_t day, std::string_view project_id, NanoUsd spent) {
  std::lock_guard lock(stats_mu_);   // not into a day that has just ended
  if (day != region_.header().day.load(kAcquire)) return Status::error("the budget day has changed");
  shm::Counters* c = &region_.header().platform;
  if (!project_id.empty()) {
    if (auto p = idProblem(LimitTable::kTenant, project_id); !p.empty()) return Status::error(p);
    const Found f = findOrInsertBudget(table(LimitTable::kTenant), project_id, engine_.self(),
                                       defaultLimit(LimitTable::kTenant), region_.header().ledger_tail);
    if (f.index < 0) return Status::error("tenant table is full or busy");
    c = &table(LimitTable::kTenant).at(f.index).c;
  }
  c->elsewhere.store(spent.count(), kRelease);
  return {};
}

void RegionAdmin::forEachTenant(const std::function<void(std::string_view)>& fn) const {
  forEachEntry(LimitTable::kTenant, fn);
}

void RegionAdmin::forEachEntry(LimitTable t, const std::function<void(std::string_view)>& fn) const {
  const KeyedTable<shm::BudgetSlot> tab = table(t);
  std::string key;
  for (std::uint32_t i = 0; i < tab.capacity(); ++i) {
    const shm::BudgetSlot& s = tab.at(static_cast<std::int32_t>(i));
    if (copyReadyKey(s.k, &key)) fn(key);
  }
}

std::vector<std::pair<std::string, BudgetView>> RegionAdmin::tenantsNearestLimit(std::size_t n) const {
  struct Row {
    std::string id;
    BudgetView v;
    double key;   // limited tenants by share spent above all unlimited ones, by amount
  };
  std::vector<Row> rows;
  forEachTenant([&](std::string_view id) {
    BudgetView v = engine_.tenant(id);
    const double spent = static_cast<double>(v.committed.count()) + static_cast<double>(v.elsewhere.count());
    const double key =
        v.limit && v.limit->count() > 0 ? 1e6 + spent / static_cast<double>(v.limit->count()) : spent / 1e18;
    rows.push_back({std::string(id), v, key});
  });
  const auto nearer = [](const Row& a, const Row& b) { return a.key > b.key || (a.key == b.key && a.id < b.id); };
  const std::size_t keep = std::min(n, rows.size());
  std::partial_sort(rows.begin(), rows.begin() + static_cast<std::ptrdiff_t>(keep), rows.end(), nearer);
  std::vector<std::pair<std::string, BudgetView>> out;
  out.reserve(keep);
  for (std::size_t i = 0; i < keep; ++i) out.emplace_back(std::move(rows[i].id), rows[i].v);
  return out;
}

std::vector<LiveReservation> RegionAdmin::liveReservations(std::size_t n) const {
  constexpr auto kAcquire = std::memory_order_acquire;
  constexpr auto kRelaxed = std::memory_order_relaxed;
  std::vector<LiveReservation> out;
  const shm::ReservationSlot* slots = region_.reservations();
  const std::uint32_t capacity = region_.geometry().reservation_capacity;   // copied at attach
  for (std::uint32_t i = 0; i < capacity; ++i) {
    const shm::ReservationSlot& s = slots[i];
    const std::uint64_t w = s.word.load(kAcquire);
    const shm::ResState st = shm::resState(w);
    if (st != shm::kResActive && st != shm::kResCharging) continue;
    LiveReservation r;
    r.id = shm::reservationId(i, shm::resGen(w));
    r.held_nano_usd = s.held.load(kRelaxed);
    r.prompt_tokens = s.charged_prompt.load(kRelaxed);
    r.completion_tokens = s.charged_completion.load(kRelaxed);
    r.deadline_unix_ns = s.deadline_unix_ns.load(kRelaxed);
    r.owner_pid = s.owner_pid.load(kRelaxed);
    r.charging = st == shm::kResCharging;
    // The ids are plain bytes, written by the owner before it published the reservation.
    r.project_id = s.ids.get(shm::kResProject);
    r.run_id = s.ids.get(shm::kResRun);
    r.model = s.ids.get(shm::kResModel);
    r.agent_id = s.ids.get(shm::kResAgent);
    if (s.word.load(kAcquire) != w) continue;   // settled or reused meanwhile
    out.push_back(std::move(r));
  }
  const auto sooner = [](const LiveReservation& a, const LiveReservation& b) {
    return a.deadline_unix_ns < b.deadline_unix_ns || (a.deadline_unix_ns == b.deadline_unix_ns && a.id < b.id);
  };
  const std::size_t keep = std::min(n, out.size());
  std::partial_sort(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(keep), out.end(), sooner);
  out.resize(keep);
  return out;
}

Status RegionAdmin::clearLimit(LimitTable t, std::string_view id) {
  if (auto p = idProblem(t, id); !p.empty()) return Status::error(p);
  std::lock_guard lock(stats_mu_);   // against reclaimKeys
  const Found f = table(t).find(id);
  if (f.index < 0) return {};
  shm::Counters& c = table(t).at(f.index).c;
  const auto& def = t == LimitTable::kTenant ? region_.header().defaults.tenant_limit
                                             : region_.header().defaults.run_limit;
  c.limit_explicit.store(0, kRelaxed);
  c.limit.store(def.load(kRelaxed), kRelease);
  return {};
}

void RegionAdmin::setDefaultLimit(LimitTable t, std::optional<NanoUsd> limit) noexcept {
  auto& def = t == LimitTable::kTenant ? region_.header().defaults.tenant_limit : region_.header().defaults.run_limit;
  // seq_cst pairs with the inserter (claim CAS, then load of the default, both seq_cst): an
  // inserter that read the old default claimed its slot before this store, so the sweep below
  // sees the slot, waits for it to be ready, and corrects it.
  def.store(raw(limit), std::memory_order_seq_cst);
  std::lock_guard lock(stats_mu_);   // against reclaimKeys, whose reclaiming words look half-written
  const KeyedTable<shm::BudgetSlot> tab = table(t);
  for (std::uint32_t i = 0; i < tab.capacity(); ++i) {
    shm::BudgetSlot& s = tab.at(static_cast<std::int32_t>(i));
    std::uint64_t w = s.k.word.load(std::memory_order_seq_cst);
    for (int spins = 0; shm::keyState(w) == shm::kKeyInit && spins < (1 << 16); ++spins) {
      cpuRelax();
      w = s.k.word.load(kAcquire);
    }
    if (shm::keyState(w) == shm::kKeyReady && s.c.limit_explicit.load(kRelaxed) == 0) {
      s.c.limit.store(raw(limit), kRelease);
    }
  }
}

void RegionAdmin::forEachExplicit(LimitTable t,
                                  const std::function<void(std::string_view, std::optional<NanoUsd>)>& fn) const {
  const KeyedTable<shm::BudgetSlot> tab = table(t);
  std::string key;
  for (std::uint32_t i = 0; i < tab.capacity(); ++i) {
    const shm::BudgetSlot& s = tab.at(static_cast<std::int32_t>(i));
    if (s.c.limit_explicit.load(kRelaxed) == 0 || !copyReadyKey(s.k, &key)) continue;
    const std::int64_t limit = s.c.limit.load(kRelaxed);
    fn(key, limit == shm::kUnlimited ? std::nullopt : std::optional(NanoUsd(limit)));
  }
}

Status RegionAdmin::setPrice(std::string_view model, Price price) {
  if (model.empty() || model.size() > shm::kKeyMax || !validIdText(model)) {
    return Status::error("model name must be 1 to " + std::to_string(shm::kKeyMax) + " bytes of UTF-8 without NUL");
  }
  if (auto p = priceProblem(price); !p.empty()) return Status::error(std::string(model) + ": " + p);
  const KeyedTable<shm::ModelSlot> models(region_.models(), region_.geometry().model_capacity);
  const Found f = models.findOrInsert(model, engine_.self(), [&](shm::ModelSlot& m) noexcept {
    m.prompt_nano_per_mtok.store(price.prompt_nano_per_mtok, kRelaxed);
    m.completion_nano_per_mtok.store(price.completion_nano_per_mtok, kRelaxed);
  });
  if (f.index < 0) return Status::error("price table is full: raise region.model_capacity and restart");
  shm::ModelSlot& m = models.at(f.index);
  m.prompt_nano_per_mtok.store(price.prompt_nano_per_mtok, kRelaxed);
  m.completion_nano_per_mtok.store(price.completion_nano_per_mtok, kRelaxed);
  return {};
}

std::vector<std::string> RegionAdmin::models() const {
  std::vector<std::string> out;
  const shm::ModelSlot* slots = region_.models();
  for (std::uint32_t i = 0; i < region_.geometry().model_capacity; ++i) {
    if (shm::keyState(slots[i].k.word.load(kAcquire)) == shm::kKeyReady) out.emplace_back(keyOf(slots[i].k));
  }
  return out;
}

Status RegionAdmin::setFallbackPrice(Price price) {
  if (auto p = priceProblem(price); !p.empty()) return Status::error("fallback: " + p);
  region_.header().defaults.fallback_prompt_nano_per_mtok.store(price.prompt_nano_per_mtok, kRelaxed);
  region_.header().defaults.fallback_completion_nano_per_mtok.store(price.completion_nano_per_mtok, kRelaxed);
  return {};
}

void RegionAdmin::setReservationTtl(std::int64_t ttl_ns) noexcept {
  region_.header().defaults.reservation_ttl_ns.store(ttl_ns, kRelaxed);
}

void RegionAdmin::setKill(std::string_view reason, std::int64_t since_unix_ns, std::int64_t expires_unix_ns) noexcept {
  std::lock_guard lock(kill_mu_);
  shm::KillSwitch& k = region_.header().kill;
  // Odd while writing. An agent that died mid-write left it odd: start from the next odd value.
  const std::uint32_t seq = (k.seq.load(kRelaxed) + 1) | 1u;
  k.seq.store(seq, kRelaxed);
  std::atomic_thread_fence(kRelease);
  char buf[shm::kReasonMax] = {};
  const std::size_t len = std::min(reason.size(), shm::kReasonMax);
  std::memcpy(buf, reason.data(), len);
  for (std::size_t i = 0; i < shm::kReasonMax / 8; ++i) {
    std::uint64_t w;
    std::memcpy(&w, buf + i * 8, 8);
    k.reason_words[i].store(w, kRelaxed);
  }
  k.reason_len.store(static_cast<std::uint32_t>(len), kRelaxed);
  k.since_unix_ns.store(since_unix_ns, kRelaxed);
  k.expires_unix_ns.store(expires_unix_ns, kRelaxed);
  k.seq.store(seq + 1, kRelease);
  k.active.store(1, kRelease);
}

void RegionAdmin::clearKill() noexcept {
  std::lock_guard lock(kill_mu_);
  region_.header().kill.active.store(0, kRelease);
}

bool RegionAdmin::expireKill(std::int64_t now_unix_ns) noexcept {
  std::lock_guard lock(kill_mu_);
  shm::KillSwitch& k = region_.header().kill;
  const std::int64_t expires = k.expires_unix_ns.load(kRelaxed);
  if (k.active.load(kRelaxed) == 0 || expires == 0 || now_unix_ns < expires) return false;
  k.active.store(0, kRelease);
  return true;
}

ReapStats RegionAdmin::reap(std::int64_t now_unix_ns) {
  ReapStats stats;
  shm::Header& h = region_.header();
  const std::uint32_t me = engine_.self();
  // Reservations and table keys name client numbers: a client is gone when the kernel says nobody holds its lock,
  // whatever pid namespace it ran in; a stopped or frozen client still holds it. Client 0 is the
  // agent's (HTTP reservations), which outlives any agent process: deadlines alone apply to it.
  std::unordered_map<std::uint32_t, bool> gone;
  auto clientGone = [&](std::uint32_t client) {
    if (client == clientlock::kAgentClient || client == me) return false;
    auto [it, fresh] = gone.try_emplace(client, false);
    if (fresh) it->second = clientlock::held(region_.lockFd(), client) == clientlock::Held::kNo;
    return it->second;
  };

  const Geometry& g = region_.geometry();
  shm::ReservationSlot* slots = region_.reservations();
  for (std::uint32_t i = 0; i < g.reservation_capacity; ++i) {
    shm::ReservationSlot& s = slots[i];
    const std::uint64_t w = s.word.load(kAcquire);
    const shm::ResState st = shm::resState(w);
    if (st == shm::kResFree) continue;
    const std::uint32_t client = shm::resClient(w);
    const std::uint32_t p = shm::resProgress(w);
    const bool owner_dead = clientGone(client);
    const bool overdue = s.deadline_unix_ns.load(kRelaxed) < now_unix_ns;
    if (!owner_dead && !((st == shm::kResActive || st == shm::kResExpired) && overdue)) continue;

    // Own the slot first, marked settling: if this agent dies half-way, the next one returns
    // nothing more, so a hold can leak (until reconciled) but never be returned twice.
    const std::uint32_t gen = shm::resGen(w);
    std::uint64_t expect = w;
    if (!s.word.compare_exchange_strong(expect, shm::resWord(me, gen, shm::kResSettling, 0),
                                        kAcquire, kRelaxed)) {
      continue;   // its owner moved on meanwhile; look again next sweep
    }
    // Only now, with the slot ours, what each layer certainly still holds for it, by state and
    // progress (see layout.h): a charge that finished between the load of `w` and the CAS, leaving
    // the same word behind, has grown `held`, and reading it earlier would leak that growth. What a
    // process killed half-way through reserving or settling left on the layers is not known here:
    // reconcileHolds() returns it.
    const std::int64_t held = s.held.load(kAcquire);
    const std::int64_t target = s.charge_target.load(kRelaxed);
    std::int64_t give_back = 0;
    if (st == shm::kResActive) give_back = held;
    if (st == shm::kResCharging) give_back = p == shm::kChargeGrown ? target : held;
    // The slot's indices go through the one checked helper: out of range is no layer.
    const ResLayers checked = region_.layers(s.run.load(kRelaxed), s.tenant.load(kRelaxed));
    shm::Counters* const* layers = checked.at;
    if (checked.bad) ++stats.corrupt;
    for (std::uint32_t j = 0; j < shm::kLayerCount; ++j) {
      if (layers[j] != nullptr && give_back != 0) layers[j]->spend.add(shm::wrapNeg(give_back), 0);
    }
    // The rule counters, by the same rules, each with its own hold and target.
    const std::uint32_t rules = std::min(s.rule_holds.load(kRelaxed), shm::kMaxRuleHolds);
    for (std::uint32_t j = 0; j < rules; ++j) {
      shm::ReservationSlot::RuleHold& r = s.rules[j];
      shm::Counters* c = region_.ruleCounters(r.slot.load(kRelaxed));
      if (c == nullptr) continue;
      std::int64_t back = 0;
      if (st == shm::kResActive) back = r.held.load(kRelaxed);
      if (st == shm::kResCharging) back = (p == shm::kChargeGrown ? r.target : r.held).load(kRelaxed);
      if (back != 0) c->spend.add(shm::wrapNeg(back), 0);
      r.held.store(0, kRelaxed);   // returned: an expired slot holds nothing
    }
    if (owner_dead || st == shm::kResExpired) {
      if (st == shm::kResExpired) {
        ++stats.freed_expired;
      } else {
        ++stats.dead_owner;
        h.stats.reaped_dead_owner.fetch_add(1, kRelaxed);
      }
      s.word.store(shm::resWord(0, shm::nextGen(gen), shm::kResFree, 0), kRelease);
    } else {
      // The owner lives but is overdue: keep the slot a while so that its commit can still book
      // the cost, which then counts in full without a hold.
      s.held.store(0, kRelaxed);
      s.deadline_unix_ns.store(shm::wrapAdd(now_unix_ns, s.ttl_ns.load(kRelaxed)), kRelaxed);
      s.word.store(shm::resWord(client, gen, shm::kResExpired, 0), kRelease);
      ++stats.expired;
      h.stats.reaped_expired.fetch_add(1, kRelaxed);
    }
  }

  auto clear_stuck = [&](auto* slots_of_table, std::uint32_t capacity) {
    for (std::uint32_t i = 0; i < capacity; ++i) {
      auto& k = slots_of_table[i].k;
      std::uint64_t w = k.word.load(kAcquire);
      if (shm::keyState(w) != shm::kKeyInit) continue;
      if (shm::keyReclaiming(w)) {   // a reclaim an agent left unfinished: the key stays
        (void)k.word.compare_exchange_strong(w, shm::keptWord(w), kRelaxed);
        continue;
      }
      // The inserter's client number; 0 is no client's (written from outside): cleared too.
      const std::uint32_t client = shm::keyPid(w);
      if (client != 0 && !clientGone(client)) continue;
      if (k.word.compare_exchange_strong(w, shm::keyWord(shm::keyTag(w), shm::kKeyTombstone, 0), kRelaxed)) {
        ++stats.stuck_keys;
        h.stats.stuck_keys_cleared.fetch_add(1, kRelaxed);
      }
    }
  };
  clear_stuck(region_.tenants(), g.tenant_capacity);
  clear_stuck(region_.runs(), g.run_capacity);
  clear_stuck(region_.models(), g.model_capacity);
  clear_stuck(region_.ruleSlots(), g.rule_capacity);
  return stats;
}

Status RegionAdmin::restore(LimitTable t, std::string_view id, NanoUsd committed, std::int64_t prompt_tokens,
                            std::int64_t completion_tokens, std::int64_t calls) {
  shm::Counters* c = &region_.header().platform;
  if (!id.empty()) {
    if (auto p = idProblem(t, id); !p.empty()) return Status::error(p);
    const Found f = findOrInsertBudget(table(t), id, engine_.self(), defaultLimit(t), region_.header().ledger_tail);
    if (f.index < 0) return Status::error(std::string(t == LimitTable::kTenant ? "tenant" : "run") + " table is full");
    c = &table(t).at(f.index).c;
  }
  c->spend.reset(committed.count(), committed.count());
  c->history.store(1, kRelaxed);   // restored with every entry the ledger has of it
  setCounts(*c, prompt_tokens, completion_tokens, calls);
  return {};
}

void RegionAdmin::addStats(std::string_view project_id, std::string_view run_id, std::int32_t day,
                           std::int64_t prompt_tokens, std::int64_t completion_tokens) {
  std::lock_guard lock(stats_mu_);
  if (!run_id.empty()) {
    const Found r = table(LimitTable::kRun).find(run_id);
    if (r.index >= 0) {
      shm::Counters& c = table(LimitTable::kRun).at(r.index).c;
      addCounts(c, prompt_tokens, completion_tokens);
      c.last_unix_ns.store(region_.header().clock_unix_ns.load(kRelaxed), kRelaxed);   // its idle time starts
    }
  }
  if (day != region_.header().day.load(kAcquire)) return;   // a day already rolled over
  addCounts(region_.header().platform, prompt_tokens, completion_tokens);
  const Found t = table(LimitTable::kTenant).find(project_id);
  if (t.index >= 0) addCounts(table(LimitTable::kTenant).at(t.index).c, prompt_tokens, completion_tokens);
}

void RegionAdmin::setStats(LimitTable t, std::string_view id, std::int64_t prompt_tokens,
                           std::int64_t completion_tokens, std::int64_t calls) {
  std::lock_guard lock(stats_mu_);
  if (id.empty()) {
    setCounts(region_.header().platform, prompt_tokens, completion_tokens, calls);
    return;
  }
  const Found f = table(t).find(id);
  if (f.index >= 0) setCounts(table(t).at(f.index).c, prompt_tokens, completion_tokens, calls);
}

void RegionAdmin::clearStats() {
  std::lock_guard lock(stats_mu_);
  setCounts(region_.header().platform, 0, 0, 0);
  for (LimitTable t : {LimitTable::kTenant, LimitTable::kRun}) {
    const KeyedTable<shm::BudgetSlot> tab = table(t);
    for (std::uint32_t i = 0; i < tab.capacity(); ++i) {
      shm::BudgetSlot& s = tab.at(static_cast<std::int32_t>(i));
      if (shm::keyState(s.k.word.load(kAcquire)) == shm::kKeyReady) setCounts(s.c, 0, 0, 0);
    }
  }
}

void RegionAdmin::rollover(std::int32_t day) {
  std::lock_guard lock(stats_mu_);
  shm::Header& h = region_.header();
  resetDay(h.platform);
  const KeyedTable<shm::BudgetSlot> tenants = table(LimitTable::kTenant);
  for (std::uint32_t i = 0; i < tenants.capacity(); ++i) {
    shm::BudgetSlot& s = tenants.at(static_cast<std::int32_t>(i));
    if (shm::keyState(s.k.word.load(kAcquire)) == shm::kKeyReady) resetDay(s.c);
  }
  h.day.store(day, kRelease);
}

std::int32_t RegionAdmin::day() const noexcept { return region_.header().day.load(kAcquire); }

std::vector<std::pair<std::string, std::int64_t>> RegionAdmin::dailyCommitted() const {
  std::vector<std::pair<std::string, std::int64_t>> out;
  out.emplace_back(std::string(), region_.header().platform.spend.committed());
  const KeyedTable<shm::BudgetSlot> tenants = table(LimitTable::kTenant);
  for (std::uint32_t i = 0; i < tenants.capacity(); ++i) {
    const shm::BudgetSlot& s = tenants.at(static_cast<std::int32_t>(i));
    if (shm::keyState(s.k.word.load(kAcquire)) != shm::kKeyReady) continue;
    // The key is copied out and checked against the table's bound: another process may write it.
    const std::uint32_t len = std::min<std::uint32_t>(s.k.key_len, shm::kKeyMax);
    out.emplace_back(std::string(s.k.key, len), s.c.spend.committed());
  }
  return out;
}

Status RegionAdmin::backdate(std::int32_t day, const std::vector<std::pair<std::string, std::int64_t>>& delta) {
  std::lock_guard lock(stats_mu_);   // against addStats, as rollover
  shm::Header& h = region_.header();
  // Find (or add) every layer first, so that a full table changes nothing.
  std::vector<std::pair<shm::Counters*, std::int64_t>> layers;
  for (const auto& [id, d] : delta) {
    if (id.empty()) {
      layers.emplace_back(&h.platform, d);
      continue;
    }
    const Found f =
        findOrInsertBudget(table(LimitTable::kTenant), id, engine_.self(), defaultLimit(LimitTable::kTenant),
                           region_.header().ledger_tail);
    if (f.index < 0) return Status::error("tenant table is full or busy: cannot bring back the spending of " + id);
    layers.emplace_back(&table(LimitTable::kTenant).at(f.index).c, d);
  }
  h.day.store(day, kRelease);
  bool all = true;
  for (const auto& [c, d] : layers) {
    if (d == 0) continue;
    shm::Spend& s = c->spend;
    shm::U128 cur = shm::packSpend(s.used(), s.committed());   // a torn read just fails the first CAS
    bool done = false;
    // Bounded: each failure means a client changed the layer meanwhile, which takes nanoseconds.
    for (int tries = 0; !done && tries < (1 << 20); ++tries) {
      const std::int64_t committed = shm::spendCommitted(cur);
      const std::int64_t step = std::max(d, shm::wrapNeg(committed));
      done = shm::cas16(&s, &cur, shm::packSpend(shm::wrapAdd(shm::spendUsed(cur), step), shm::wrapAdd(committed, step)));
    }
    all = all && done;
  }
  return all ? Status{} : Status::error("a budget layer changed too often during the correction; its spending stays as it was");
}

// --- budget rules ------------------------------------------------------------------------------

Status RegionAdmin::setRules(const std::vector<RuleSpec>& rules, const std::vector<WindowSpan>& windows,
                             std::vector<std::uint32_t>* indices) {
  static_assert(shm::kMaxRules >= 2 * kMaxRules, "a changed rule must always find a definition that is not live");
  if (rules.size() > kMaxRules) {
    return Status::error("at most " + std::to_string(kMaxRules) + " rules (" + std::to_string(rules.size()) + " given)");
  }
  if (windows.size() != rules.size()) return Status::error("setRules: one window per rule");
  std::lock_guard lock(stats_mu_);   // against reclaimKeys: counters given their own limit stay
  shm::Header& h = region_.header();
  // Which definition each rule goes to: the live one of the same shape, or a free (or retired)
  // one. Decided before anything is written, so that a failure changes nothing.
  std::vector<int> at(rules.size(), -1);
  std::vector<bool> taken(shm::kMaxRules, false);
  for (std::size_t i = 0; i < rules.size(); ++i) {
    const RuleSpec& r = rules[i];
    const bool prefix = r.match.ends_with('*');
    const std::string match = prefix ? r.match.substr(0, r.match.size() - 1) : r.match;
    for (std::uint32_t j = 0; j < shm::kMaxRules && at[i] < 0; ++j) {
      if (!taken[j] && shm::ruleState(h.rules[j].word.load(kAcquire)) == shm::kRuleLive &&
          sameShape(h.rules[j], r, match, prefix)) {
        at[i] = static_cast<int>(j);
        taken[j] = true;
      }
    }
  }
  for (std::size_t i = 0; i < rules.size(); ++i) {
    if (at[i] >= 0) continue;
    // One not live now: never used first, then one retired by an earlier change, so that a
    // definition is rewritten as seldom as can be (a process that read it while it was live
    // may still hold its words for a moment: reused after all 64 were, never at once). A
    // retired definition's counters stay in the table until reclaimed: the generation in their
    // keys tells them from the new rule's. A live definition is never rewritten: with twice as
    // many definitions as rules in force, one is always free or retired.
    for (int pass = 0; pass < 2 && at[i] < 0; ++pass) {
      for (std::uint32_t j = 0; j < shm::kMaxRules && at[i] < 0; ++j) {
        const shm::RuleState st = shm::ruleState(h.rules[j].word.load(kAcquire));
        if (!taken[j] && (pass == 0 ? st == shm::kRuleFree : st != shm::kRuleLive)) {
          at[i] = static_cast<int>(j);
          taken[j] = true;
        }
      }
    }
    if (at[i] < 0) return Status::error("no free rule definition in the region: restart tokenfused with --recreate-region");
  }

  // Retire the live rules no longer wanted: applications stop matching them at once.
  for (std::uint32_t j = 0; j < shm::kMaxRules; ++j) {
    const std::uint32_t w = h.rules[j].word.load(kAcquire);
    if (!taken[j] && shm::ruleState(w) == shm::kRuleLive) {
      h.rules[j].word.store(shm::ruleWord(shm::ruleGen(w), shm::kRuleRetired), kRelease);
    }
  }
  std::string problems;
  indices->assign(rules.size(), 0);
  std::uint32_t count = h.rule_count.load(kRelaxed);
  for (std::size_t i = 0; i < rules.size(); ++i) {
    const RuleSpec& r = rules[i];
    const auto j = static_cast<std::uint32_t>(at[i]);
    (*indices)[i] = j;
    shm::RuleDef& d = h.rules[j];
    std::uint32_t w = d.word.load(kAcquire);
    const auto limit = r.limit.value_or(shm::kUnlimited);
    if (shm::ruleState(w) != shm::kRuleLive) {
      // A new definition: written while not live, published with release order.
      const bool prefix = r.match.ends_with('*');
      const std::string match = prefix ? r.match.substr(0, r.match.size() - 1) : r.match;
      const std::uint32_t gen = (shm::ruleGen(w) + 1) & 0xff'ffffu;
      d.word.store(shm::ruleWord(gen, shm::kRuleFree), kRelease);
      d.scope = static_cast<std::uint8_t>(r.scope);
      d.metric = static_cast<std::uint8_t>(r.metric);
      d.match_prefix = prefix ? 1 : 0;
      d.has_window = r.window.kind != WindowKind::kAllTime ? 1 : 0;
      d.window_kind = static_cast<std::uint8_t>(r.window.kind);
      d.week_start = static_cast<std::uint8_t>(r.window.week_start);
      d.match_len = static_cast<std::uint32_t>(std::min(match.size(), sizeof d.match));
      std::memcpy(d.match, match.data(), d.match_len);
      d.name_len = static_cast<std::uint32_t>(std::min(r.name.size(), sizeof d.name));
      std::memcpy(d.name, r.name.data(), d.name_len);
      d.limited_untracked.store(0, kRelaxed);
      d.limit.store(limit, kRelaxed);
      d.window_start_ns.store(windows[i].start_ns, kRelaxed);
      d.window_end_ns.store(d.has_window != 0 ? windows[i].end_ns : INT64_MAX, kRelaxed);
      w = shm::ruleWord(gen, shm::kRuleLive);
      d.word.store(w, kRelease);
    } else {
      d.limit.store(limit, kRelease);
    }
    count = std::max(count, j + 1);
    h.rule_count.store(count, kRelease);

    // Per-key limits: set the listed ones, put every other key back on the rule's limit.
    const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
    for (std::uint32_t k = 0; k < table.capacity(); ++k) {
      shm::RuleSlot& slot = table.at(static_cast<std::int32_t>(k));
      RuleKey key;
      if (shm::keyState(slot.k.word.load(kAcquire)) != shm::kKeyReady || !parseRuleKey(keyOf(slot.k), &key) ||
          key.rule != j || key.gen != shm::ruleGen(w) || slot.c.limit_explicit.load(kRelaxed) == 0) {
        continue;
      }
      if (!r.keys.contains(key.first)) slot.c.limit_explicit.store(0, kRelease);
    }
    std::uint32_t untracked = 0;
    for (const auto& [id, key_limit] : r.keys) {
      char buf[shm::kRuleKeyMax];
      const Found f = table.findOrInsert(ruleKey(buf, j, shm::ruleGen(w), id, {}, false), engine_.self(),
                                         [](shm::RuleSlot& s) noexcept {
                                           s.c.limit.store(shm::kUnlimited, kRelaxed);
                                           s.c.limit_explicit.store(0, kRelaxed);
                                         });
      if (f.index < 0) {
        ++untracked;
        continue;
      }
      shm::Counters& c = table.at(f.index).c;
      c.limit.store(key_limit.value_or(shm::kUnlimited), kRelaxed);
      c.limit_explicit.store(1, kRelease);
    }
    d.limited_untracked.store(untracked, kRelease);
    if (untracked != 0) {
      problems += (problems.empty() ? "" : "; ") + std::string("rule ") + r.name + ": " + std::to_string(untracked) +
                  " key(s) with their own limit found no room in the rule table (raise region.rule_capacity); "
                  "its keys without a counter are refused";
    }
  }
  return problems.empty() ? Status{} : Status::error(problems);
}

void RegionAdmin::rollRule(std::uint32_t index, std::int64_t start_ns, std::int64_t end_ns, bool sliding) {
  if (index >= shm::kMaxRules) return;
  std::lock_guard lock(stats_mu_);   // against setRuleElsewhere
  shm::Header& h = region_.header();
  shm::RuleDef& d = h.rules[index];
  const std::uint32_t gen = shm::ruleGen(d.word.load(kAcquire));
  // The window that ended is the previous one only if the new one follows it at once.
  const bool carry = sliding && d.window_end_ns.load(kRelaxed) == start_ns;
  const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
  for (std::uint32_t k = 0; k < table.capacity(); ++k) {
    shm::RuleSlot& slot = table.at(static_cast<std::int32_t>(k));
    RuleKey key;
    if (shm::keyState(slot.k.word.load(kAcquire)) == shm::kKeyReady && parseRuleKey(keyOf(slot.k), &key) &&
        key.rule == index && key.gen == gen) {
      // At the window's start the sliding window still covers all of the previous one. The carry
      // is in place before the count leaves, so no call meanwhile finds the whole limit free
      // (for a moment both count: stricter, never looser).
      if (carry) slot.c.elsewhere.store(std::max<std::int64_t>(0, slot.c.spend.committed()), kRelease);
      // A window like a day: bookings out, holds kept; `elsewhere` is set just below.
      const std::int64_t counted = resetDay(slot.c, /*keep_elsewhere=*/true);
      const std::int64_t previous = carry ? std::max<std::int64_t>(0, counted) : 0;
      slot.c.previous.store(previous, kRelaxed);
      slot.c.elsewhere.store(previous, kRelease);
    }
  }
  d.window_start_ns.store(start_ns, kRelaxed);
  d.window_end_ns.store(end_ns, kRelease);
}

void RegionAdmin::slideRules(const std::bitset<shm::kMaxRules>& sliding, std::int64_t now_ns) {
  std::lock_guard lock(stats_mu_);   // against rollRule
  const shm::Header& h = region_.header();
  const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
  std::string bytes;
  for (std::uint32_t k = 0; k < table.capacity(); ++k) {
    shm::RuleSlot& slot = table.at(static_cast<std::int32_t>(k));
    const std::int64_t previous = slot.c.previous.load(kRelaxed);
    RuleKey key;
    if (previous == 0 || !copyReadyKey(slot.k, &bytes) || !parseRuleKey(bytes, &key) || key.rule >= shm::kMaxRules) {
      continue;
    }
    const shm::RuleDef& d = h.rules[key.rule];
    const std::uint32_t w = d.word.load(kAcquire);
    const std::int64_t start = d.window_start_ns.load(kRelaxed), end = d.window_end_ns.load(kAcquire);
    std::int64_t share = 0;   // a rule no longer sliding (or gone) carries nothing
    if (sliding[key.rule] && shm::ruleState(w) == shm::kRuleLive && shm::ruleGen(w) == key.gen && end > start &&
        previous > 0) {
      // The part of the previous window still inside [now - length, now): (end - now) / length.
      // Unsigned differences (end > start: exact whatever the region's words) and a 128-bit
      // product: the window's words are the region's, which any process can write.
      const std::uint64_t length = static_cast<std::uint64_t>(end) - static_cast<std::uint64_t>(start);
      const std::uint64_t left =
          now_ns >= end ? 0 : std::min(static_cast<std::uint64_t>(end) - static_cast<std::uint64_t>(now_ns), length);
      share = static_cast<std::int64_t>((shm::U128{static_cast<std::uint64_t>(previous)} * left + length - 1) / length);
    }
    slot.c.elsewhere.store(share, kRelease);
    if (share == 0) slot.c.previous.store(0, kRelaxed);
  }
}

std::uint32_t RegionAdmin::restoreRules(const RuleCall& ids, std::int64_t window_start_ns, std::int64_t cost,
                                        std::int64_t prompt, std::int64_t completion, std::int64_t calls) {
  shm::Header& h = region_.header();
  const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
  RuleHits hits;
  // Each matching rule's counter, found or created exactly as a call with these ids would.
  const bool all = matchRules(h, table, ids, true, engine_.self(), &hits, /*best_effort=*/true) == RuleMatch::kOk;
  for (std::uint32_t j = 0; j < hits.n; ++j) {
    const RuleHit& hit = hits.at[j];
    const shm::RuleDef& d = h.rules[hit.rule];
    const std::int64_t start = d.has_window != 0 ? d.window_start_ns.load(kRelaxed) : INT64_MIN;
    if (start != window_start_ns) continue;
    const std::int64_t amount =
        hit.metric == shm::kMetricRequests ? calls : ruleAmount(hit.metric, cost, prompt, completion, true);
    table.at(hit.slot).c.spend.add(amount, amount);
  }
  return all ? 0 : 1;
}

std::vector<RuleUsage> RegionAdmin::rules() const {
  const shm::Header& h = region_.header();
  std::vector<RuleUsage> out;
  std::vector<int> at(shm::kMaxRules, -1);   // index -> position in out
  std::uint32_t gen[shm::kMaxRules] = {};
  for (std::uint32_t i = 0; i < std::min(h.rule_count.load(kAcquire), shm::kMaxRules); ++i) {
    const shm::RuleDef& d = h.rules[i];
    const std::uint32_t w = d.word.load(kAcquire);
    if (shm::ruleState(w) != shm::kRuleLive) continue;
    gen[i] = shm::ruleGen(w);
    at[i] = static_cast<int>(out.size());
    RuleUsage& r = out.emplace_back();
    r.number = i + 1;
    r.gen = gen[i];
    r.name.assign(d.name, std::min<std::size_t>(d.name_len, sizeof d.name));
    r.scope = d.scope;
    r.metric = d.metric;
    r.match.assign(d.match, std::min<std::size_t>(d.match_len, sizeof d.match));
    if (d.match_prefix != 0) r.match += '*';
    r.window = d.window_kind <= static_cast<std::uint8_t>(WindowKind::kAllTime) ? static_cast<WindowKind>(d.window_kind)
                                                                                : WindowKind::kAllTime;
    if (const std::int64_t limit = d.limit.load(kRelaxed); limit != shm::kUnlimited) r.limit = limit;
    if (d.has_window != 0) {
      r.window_start_ns = d.window_start_ns.load(kRelaxed);
      r.window_end_ns = d.window_end_ns.load(kRelaxed);
    }
  }
  if (out.empty()) return out;   // no rules: the table is not read
  const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
  std::string bytes;
  for (std::uint32_t k = 0; k < table.capacity(); ++k) {
    const shm::RuleSlot& slot = table.at(static_cast<std::int32_t>(k));
    RuleKey key;
    if (!copyReadyKey(slot.k, &bytes) || !parseRuleKey(bytes, &key) || at[key.rule] < 0 || key.gen != gen[key.rule]) {
      continue;
    }
    RuleUsage& r = out[static_cast<std::size_t>(at[key.rule])];
    RuleUsage::Counter& c = r.counters.emplace_back();
    const bool two = r.scope == shm::kScopeTenantModel || r.scope == shm::kScopeTenantAgent;
    c.first = key.first;
    c.second = key.second;
    c.key = two ? std::string(key.first) + "/" + std::string(key.second) : std::string(key.first);
    c.committed = slot.c.spend.committed();
    c.elsewhere = slot.c.elsewhere.load(kRelaxed);
    c.held = std::max<std::int64_t>(0, shm::wrapSub(slot.c.spend.used(), c.committed));
    c.denials = slot.c.denials.load(kRelaxed);
    const std::int64_t limit = ruleLimit(slot.c, r.limit.value_or(shm::kUnlimited));
    if (limit != shm::kUnlimited) c.limit = limit;
  }
  return out;
}

void RegionAdmin::setRuleElsewhere(std::uint32_t index, std::uint32_t gen, std::int64_t window_start_ns,
                                   std::string_view first, std::string_view second, std::int64_t elsewhere) {
  if (index >= shm::kMaxRules) return;
  std::lock_guard lock(stats_mu_);   // against rollRule: not into a window that has just begun
  const shm::RuleDef& d = region_.header().rules[index];
  const std::uint32_t w = d.word.load(kAcquire);
  if (shm::ruleState(w) != shm::kRuleLive || shm::ruleGen(w) != gen) return;
  if (d.has_window != 0 && d.window_start_ns.load(kRelaxed) != window_start_ns) return;
  const bool two = d.scope == shm::kScopeTenantModel || d.scope == shm::kScopeTenantAgent;
  char buf[shm::kRuleKeyMax];
  const std::string_view key = ruleKey(buf, index, gen, first, second, two);
  const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
  const Found f = table.find(key);
  if (f.index >= 0) table.at(f.index).c.elsewhere.store(elsewhere, kRelease);
}

void RegionAdmin::clearRuleElsewhere(const std::bitset<shm::kMaxRules>& keep) {
  std::lock_guard lock(stats_mu_);
  const KeyedTable<shm::RuleSlot> table(region_.ruleSlots(), region_.geometry().rule_capacity);
  std::string bytes;
  for (std::uint32_t k = 0; k < table.capacity(); ++k) {
    shm::RuleSlot& slot = table.at(static_cast<std::int32_t>(k));
    RuleKey key;
    if (slot.c.elsewhere.load(kRelaxed) == 0 || !copyReadyKey(slot.k, &bytes) || !parseRuleKey(bytes, &key) ||
        key.rule >= shm::kMaxRules || keep[key.rule]) {
      continue;
    }
    slot.c.elsewhere.store(0, kRelease);
  }
}

void RegionAdmin::setDayEnd(std::int64_t unix_ns) noexcept {
  region_.header().day_end_unix_ns.store(unix_ns, kRelaxed);
}

}  // namespace tokenfuse
