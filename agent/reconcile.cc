// The holds reconciliation (RegionAdmin::reconcileHolds): what each layer holds, checked against
// what the live reservations hold on it.
#include "region_admin.h"

#include <algorithm>

namespace tokenfuse {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kAcquire = std::memory_order_acquire;

// What a reservation may hold on one layer: [lo, hi]. A range, because an operation in flight
// changes the layers one after the other without a step between them (see layout.h).
struct Range {
  std::int64_t lo = 0;
  std::int64_t hi = 0;
};

Range between(std::int64_t a, std::int64_t b) { return {std::min(a, b), std::max(a, b)}; }

Range heldOn(shm::ResState st, std::uint32_t p, std::int64_t held, std::int64_t target) {
  switch (st) {
    case shm::kResReserving:   // nothing yet, the estimate, or part way (the fields may still be
    case shm::kResSettling:    // the previous reservation's: a range that is too wide only waits)
      return between(0, held);
    case shm::kResActive: return {held, held};
    case shm::kResCharging:    // grows from held to target, layer after layer
      return p == shm::kChargeGrown ? Range{target, target} : between(held, target);
    default: return {};        // expired: the reaper returned the hold
  }
}

std::int64_t holdsOf(const shm::Counters& c) { return shm::wrapSub(c.spend.used(), c.spend.committed()); }

}  // namespace

std::vector<HoldCorrection> RegionAdmin::reconcileHolds() {
  shm::Header& h = region_.header();
  const Geometry& g = region_.geometry();   // copied at attach: the header's words may lie
  const std::uint32_t tenants = g.tenant_capacity;
  const std::uint32_t runs = g.run_capacity;
  // Layer k: 0 the platform, 1 + i tenant slot i, 1 + tenants + i run slot i, then rule counter
  // i at rules_base + i.
  const std::size_t rules_base = 1 + std::size_t{tenants} + runs;
  const std::size_t n = rules_base + g.rule_capacity;
  auto counters = [&](std::size_t k) -> shm::Counters& {
    if (k == 0) return h.platform;
    if (k >= rules_base) return region_.ruleSlots()[k - rules_base].c;
    return k <= tenants ? region_.tenants()[k - 1].c : region_.runs()[k - 1 - tenants].c;
  };
  auto keyWord = [&](std::size_t k) -> const std::atomic<std::uint64_t>& {
    if (k >= rules_base) return region_.ruleSlots()[k - rules_base].k.word;
    return k <= tenants ? region_.tenants()[k - 1].k.word : region_.runs()[k - 1 - tenants].k.word;
  };
  auto ready = [&](std::size_t k) { return k == 0 || shm::keyState(keyWord(k).load(kAcquire)) == shm::kKeyReady; };
  if (last_difference_.size() != n) last_difference_.assign(n, 0);

  std::vector<std::int64_t> before(n);
  for (std::size_t k = 0; k < n; ++k) before[k] = holdsOf(counters(k));
  std::vector<Range> expected(n);
  std::vector<bool> moved(n, false);
  const shm::ReservationSlot* slots = region_.reservations();
  for (std::uint32_t i = 0; i < g.reservation_capacity; ++i) {
    const shm::ReservationSlot& s = slots[i];
    const std::uint64_t w = s.word.load(kAcquire);
    const shm::ResState st = shm::resState(w);
    const std::uint32_t p = shm::resProgress(w);
    if (st == shm::kResFree) continue;
    const std::int64_t held = s.held.load(kAcquire);
    const std::int64_t target = s.charge_target.load(kRelaxed);
    const std::int32_t run = s.run.load(kRelaxed);
    const std::int32_t tenant = s.tenant.load(kRelaxed);
    // The rule counters it holds on, each with its own hold and target.
    const std::uint32_t rule_holds = std::min(s.rule_holds.load(kRelaxed), shm::kMaxRuleHolds);
    std::size_t rule_layer[shm::kMaxRuleHolds];
    Range rule_range[shm::kMaxRuleHolds];
    for (std::uint32_t j = 0; j < rule_holds; ++j) {
      const std::int32_t slot = s.rules[j].slot.load(kRelaxed);
      rule_layer[j] = slot >= 0 && static_cast<std::uint32_t>(slot) < g.rule_capacity ? rules_base + static_cast<std::size_t>(slot) : n;
      rule_range[j] = heldOn(st, p, s.rules[j].held.load(kRelaxed), s.rules[j].target.load(kRelaxed));
    }
    const bool stable = s.word.load(kAcquire) == w;   // the fields above belong to that word
    const std::size_t layer[shm::kLayerCount] = {
        run >= 0 && static_cast<std::uint32_t>(run) < runs ? 1 + std::size_t{tenants} + static_cast<std::size_t>(run) : n,
        tenant >= 0 && static_cast<std::uint32_t>(tenant) < tenants ? 1 + static_cast<std::size_t>(tenant) : n, 0};
    const Range r = heldOn(st, p, held, target);
    auto expect = [&](std::size_t k, Range range) {
      if (k == n) return;
      if (!stable) {
        moved[k] = true;
        return;
      }
      expected[k].lo = shm::wrapAdd(expected[k].lo, range.lo);
      expected[k].hi = shm::wrapAdd(expected[k].hi, range.hi);
    };
    for (std::uint32_t j = 0; j < shm::kLayerCount; ++j) expect(layer[j], r);
    for (std::uint32_t j = 0; j < rule_holds; ++j) expect(rule_layer[j], rule_range[j]);
  }

  std::vector<HoldCorrection> corrections;
  for (std::size_t k = 0; k < n; ++k) {
    const std::int64_t now = holdsOf(counters(k));
    std::int64_t difference = 0;
    if (now != before[k] || moved[k] || !ready(k)) {
      last_difference_[k] = 0;   // something was in flight: judge it next time
      continue;
    }
    if (now > expected[k].hi) difference = shm::wrapSub(now, expected[k].hi);
    if (now < expected[k].lo) difference = shm::wrapSub(now, expected[k].lo);
    if (difference == 0 || difference != last_difference_[k]) {
      last_difference_[k] = difference;
      continue;
    }
    last_difference_[k] = 0;
    counters(k).spend.add(shm::wrapNeg(difference), 0);
    h.stats.holds_reconciled.fetch_add(1, kRelaxed);
    HoldCorrection& c = corrections.emplace_back();
    c.difference = difference;
    if (k >= rules_base) {
      c.layer = "rule";
      c.id = ruleCounterName(region_.header(), keyOf(region_.ruleSlots()[k - rules_base].k));
    } else if (k > 0) {
      const shm::KeyHeader& key = k <= tenants ? region_.tenants()[k - 1].k : region_.runs()[k - 1 - tenants].k;
      c.layer = k <= tenants ? "tenant" : "run";
      c.id.assign(key.key, std::min<std::size_t>(key.key_len, shm::kKeyMax));
    }
  }
  return corrections;
}

}  // namespace tokenfuse
