// Keys that never run out (issue 14): the agent reclaims the table entries of keys nothing needs
// any more (RegionAdmin::reclaimKeys), a lookup takes back a key being reclaimed, an insert reuses
// the freed slot, and nothing held, booked or limited is lost on the way.
#include "agent_support.h"

#include "rule_match.h"

#include <set>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;
using tokenfuse::test::usd;

namespace {

constexpr std::int64_t kDayNs = 86'400'000'000'000;

Call call(std::string_view project, std::int64_t prompt = 1000, std::string_view run = {}) {
  Call c;
  c.project_id = project;
  c.model = "gpt-4o";
  c.run_id = run;
  c.estimated_prompt_tokens = prompt;
  return c;
}

// Two passes (a key goes when both found it idle): what both reclaimed.
ReclaimStats reclaimTwice(TestRegion& t, std::int64_t now = nowNs(), std::int64_t run_idle = kDayNs) {
  const ReclaimStats a = t.admin->reclaimKeys(now, run_idle);
  const ReclaimStats b = t.admin->reclaimKeys(now, run_idle);
  return {a.tenants + b.tenants, a.runs + b.runs, a.rule_counters + b.rule_counters, a.kept + b.kept};
}

// A per-tenant request count over `window`.
RuleSpec tenantRequests(std::string name, std::int64_t limit, WindowKind window) {
  RuleSpec r;
  r.name = std::move(name);
  r.scope = RuleScope::kTenant;
  r.metric = RuleMetric::kRequests;
  r.limit = limit;
  r.window.kind = window;
  return r;
}

// Every key in Ready slots of a table, with how many slots hold it.
template <typename Slot>
std::map<std::string, int> readyKeys(const Slot* slots, std::uint32_t capacity) {
  std::map<std::string, int> out;
  for (std::uint32_t i = 0; i < capacity; ++i) {
    if (shm::keyState(slots[i].k.word.load()) == shm::kKeyReady) ++out[std::string(keyOf(slots[i].k))];
  }
  return out;
}

}  // namespace

TEST_CASE("reclaim: an idle tenant goes after two passes, and a site prepared before looks it up again") {
  TestRegion t(64);
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("1.00"));
  CallSite site;
  REQUIRE(t.client->prepare(call("a"), &site).allowed());
  REQUIRE(t.client->tenant("a").tracked);

  CHECK(t.admin->reclaimKeys(nowNs(), kDayNs).tenants == 0);   // once idle is not yet gone
  CHECK(t.admin->reclaimKeys(nowNs(), kDayNs).tenants == 1);
  CHECK_FALSE(t.client->tenant("a").tracked);

  // The site still names the old slot; the library sees its word changed and finds the key anew.
  Reservation r;
  REQUIRE(t.client->reserve(site, 50'000, 0, &r).allowed());   // $0.25 at gpt-4o's price
  CHECK(t.client->tenant("a").held == usd("0.25"));
  Reservation more[3];
  for (Reservation& m : more) REQUIRE(t.client->reserve(site, 50'000, 0, &m).allowed());
  CHECK(t.client->check(site, 50'000).code == Code::kTenantBudgetExhausted);   // $1.25 > $1.00
  CHECK(t.client->tenant("a").held == usd("1.00"));
  CHECK(readyKeys(t.region->tenants(), t.spec.tenant_capacity)["a"] == 1);
}

TEST_CASE("reclaim: keys in use stay: spent today, held, named by a reservation holding nothing, or limited") {
  TestRegion t(64);
  REQUIRE(t.client->record({"spent", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  Reservation held, zero;
  REQUIRE(t.client->reserve(call("held"), &held).allowed());
  REQUIRE(t.client->reserve(call("zero", 0), &zero).allowed());   // holds $0, but names the entry
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "limited", usd("5")).ok());
  CallSite idle;
  REQUIRE(t.client->prepare(call("idle"), &idle).allowed());

  for (int i = 0; i < 3; ++i) (void)t.admin->reclaimKeys(nowNs(), kDayNs);
  CHECK_FALSE(t.client->tenant("idle").tracked);
  for (const char* id : {"spent", "held", "zero", "limited"}) {
    CAPTURE(id);
    CHECK(t.client->tenant(id).tracked);
  }
  // The reservation that held nothing still books its call on the entry it named.
  REQUIRE(t.client->commit(zero, "openai", 2000, 0).allowed());
  CHECK(t.client->tenant("zero").committed == usd("0.01"));

  // A new day: what was spent yesterday no longer keeps a tenant; a limit still does.
  REQUIRE(t.client->release(held).allowed());
  t.admin->rollover(t.admin->day() + 1);
  CHECK(reclaimTwice(t).tenants == 3);
  CHECK_FALSE(t.client->tenant("spent").tracked);
  CHECK_FALSE(t.client->tenant("zero").tracked);
  CHECK(t.client->tenant("limited").tracked);
  CHECK(t.client->tenant("limited").limit == usd("5"));
}

TEST_CASE("reclaim: a lookup of a key being reclaimed takes it back, and the reclaim gives up") {
  TestRegion t(64);
  REQUIRE(t.client->record({"busy", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  const KeyedTable<shm::BudgetSlot> table(t.region->tenants(), t.spec.tenant_capacity);
  const Found f = table.find("busy");
  REQUIRE(f.what == Lookup::kFound);
  std::atomic<std::uint64_t>& word = table.at(f.index).k.word;
  // The agent's first step, by hand: the Ready word becomes a reclaiming one.
  std::uint64_t w = f.word;
  REQUIRE(word.compare_exchange_strong(w, shm::reclaimWord(f.word)));
  const Found again = table.find("busy");
  CHECK(again.what == Lookup::kFound);
  CHECK(again.index == f.index);
  CHECK(again.word == shm::keptWord(shm::reclaimWord(f.word)));   // Ready, one generation on
  CHECK(shm::keyState(word.load()) == shm::kKeyReady);
  CHECK_FALSE(table.current(f.index, f.word));   // a holder of the old word looks again
  CHECK(t.client->tenant("busy").committed == usd("0.005"));

  // A reclaim an agent left half-done is undone by the reaper of the next.
  w = again.word;
  REQUIRE(word.compare_exchange_strong(w, shm::reclaimWord(again.word)));
  (void)t.admin->reap(nowNs());
  CHECK(shm::keyState(word.load()) == shm::kKeyReady);
  CHECK(t.client->tenant("busy").committed == usd("0.005"));
}

TEST_CASE("reclaim: a freed slot is reused by the next key of its probe sequence, one generation on") {
  TestRegion t(64);
  const KeyedTable<shm::BudgetSlot> table(t.region->tenants(), t.spec.tenant_capacity);
  // Two keys with the same home slot: the second sits after the first.
  std::string a = "k0", b;
  for (int i = 1; b.empty(); ++i) {
    const std::string k = "k" + std::to_string(i);
    if ((hashKey(k) & 63) == (hashKey(a) & 63)) b = k;
  }
  CallSite sa;
  REQUIRE(t.client->prepare(call(a), &sa).allowed());
  const Found fa = table.find(a);
  CHECK(reclaimTwice(t).tenants == 1);
  // b goes where a was (the first free slot of the sequence), and a new a after it.
  REQUIRE(t.client->record({b, "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  const Found fb = table.find(b);
  CHECK(fb.index == fa.index);
  CHECK(shm::keyGen(fb.word) == shm::keyGen(fa.word) + 1);
  REQUIRE(t.client->record({a, "gpt-4o", "openai", {}, {}, 2000, 0}).allowed());
  CHECK(t.client->tenant(a).committed == usd("0.01"));
  CHECK(t.client->tenant(b).committed == usd("0.005"));
  // The site prepared for a before does not book on b's entry.
  CHECK(t.client->check(sa, 1000).allowed());
  Reservation r;
  REQUIRE(t.client->reserve(sa, 1000, 0, &r).allowed());
  CHECK(t.client->tenant(a).held == usd("0.005"));
  CHECK(t.client->tenant(b).held == NanoUsd(0));
}

TEST_CASE("reclaim: a rule counter goes once its window rolled with nothing in it, or once its rule is gone") {
  TestRegion t(64);
  const RuleSpec per_tenant = tenantRequests("hourly", 10, WindowKind::kHour);
  const std::int64_t start = 1'700'000'000'000'000'000, hour = 3'600'000'000'000;
  std::vector<std::uint32_t> idx;
  REQUIRE(t.admin->setRules({per_tenant}, {WindowSpan{0, start, start + hour}}, &idx).ok());
  REQUIRE(t.client->record({"a", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  CHECK(reclaimTwice(t).rule_counters == 0);   // counted this hour
  t.admin->rollRule(idx[0], start + hour, start + 2 * hour);
  CHECK(reclaimTwice(t).rule_counters == 1);
  // Counting again starts from zero, as it would have anyway.
  REQUIRE(t.client->record({"a", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  CHECK(t.admin->rules()[0].counters.at(0).committed == 1);

  // The rule removed: its counters go, whatever they counted.
  REQUIRE(t.admin->setRules({}, {}, &idx).ok());
  CHECK(reclaimTwice(t).rule_counters == 1);
  CHECK(readyKeys(t.region->ruleSlots(), t.spec.rule_capacity).empty());
}

TEST_CASE("reclaim: a run idle past its lifetime goes, and its totals come back from the ledger when it returns") {
  LedgerFixture f;
  TestRegion& t = f.t;
  t.admin->setDefaultLimit(LimitTable::kRun, usd("0.012"));
  const std::int64_t t0 = nowNs();
  t.admin->setClock(t0);
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-1", {}, 2000, 0}).allowed());   // $0.01
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "fresh", {}, 0, 0}).allowed());      // books $0
  (void)f.writer->drainOnce();
  CHECK(t.client->run("run-1").calls == 1);

  const std::int64_t lifetime = 3'600'000'000'000;
  CHECK(reclaimTwice(t, t0 + lifetime / 2, lifetime).runs == 0);   // not idle long enough
  CHECK(reclaimTwice(t, t0 + lifetime + 1, lifetime).runs == 2);   // "fresh" never booked a cent
  CHECK_FALSE(t.client->run("run-1").tracked);

  // It returns: its first call is checked against nothing but its own; once the agent has the
  // entry, the run's earlier $0.01 is back, and the run's limit holds.
  t.admin->setClock(t0 + lifetime + 2);
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-1", {}, 400, 0}).allowed());    // $0.002
  (void)f.writer->drainOnce();
  const BudgetView v = t.client->run("run-1");
  CHECK(v.committed == usd("0.012"));
  CHECK(v.calls == 2);
  CHECK(t.client->check("p", "gpt-4o", 100, "run-1").code == Code::kRunBudgetExhausted);
  // A run that is simply new gets nothing added.
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-2", {}, 400, 0}).allowed());
  (void)f.writer->drainOnce();
  CHECK(t.client->run("run-2").committed == usd("0.002"));
}

TEST_CASE("reclaim: under 4 threads booking, holding and letting go of keys while the agent reclaims, every "
          "hold and booking lands on its own key, once, and no key is in two slots") {
  TestRegion t(1024, "reclaimrace", 65536);
  constexpr int kThreads = 4;
  constexpr int kKeys = 400;        // tenants t0..t399; the even ones are booked, the odd held and let go
  constexpr int kRounds = 6;
  std::atomic<bool> stop{false};
  std::thread reclaimer([&] {
    while (!stop.load()) (void)t.admin->reclaimKeys(nowNs(), kDayNs);
  });
  std::vector<std::thread> workers;
  std::atomic<std::int64_t> booked[kKeys] = {};
  std::atomic<int> lost_holds{0};   // a hold that did not land on its key's entry
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&, w] {
      for (int round = 0; round < kRounds; ++round) {
        for (int k = w; k < kKeys; k += kThreads) {
          const std::string id = "t" + std::to_string(k);
          CallSite site;
          if (!t.client->prepare(call(id, 1000), &site).allowed()) continue;
          if (k % 2 == 1) {
            // Held and let go, again and again: idle between, so reclaimed under the holds. This
            // thread alone uses the key, so its entry shows exactly the hold while it is held.
            for (int i = 0; i < 20; ++i) {
              Reservation r;
              REQUIRE(t.client->reserve(site, 1000, 0, &r).allowed());
              const BudgetView v = t.client->tenant(id);
              if (v.held != usd("0.005")) lost_holds.fetch_add(1);
              REQUIRE(t.client->release(r).allowed());
            }
            continue;
          }
          Reservation r;
          const Decision d = t.client->reserve(site, 1000, 0, &r);
          REQUIRE(d.allowed());
          REQUIRE(t.client->commit(r, "openai", 1000, 0).allowed());   // $0.005
          REQUIRE(t.client->record({id, "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
          booked[k] += 2;
        }
      }
    });
  }
  for (auto& th : workers) th.join();
  stop = true;
  reclaimer.join();
  CHECK(lost_holds.load() == 0);
  for (int k = 0; k < kKeys; k += 2) {
    CAPTURE(k);
    CHECK(t.client->tenant("t" + std::to_string(k)).committed == NanoUsd(5'000'000 * booked[k].load()));
    CHECK(t.client->tenant("t" + std::to_string(k)).held == NanoUsd(0));
  }
  for (const auto& [key, n] : readyKeys(t.region->tenants(), t.spec.tenant_capacity)) {
    CAPTURE(key);
    CHECK(n == 1);
  }
  CHECK(t.client->platform().committed == NanoUsd(5'000'000LL * (kKeys / 2 * 2 * kRounds)));
}

TEST_CASE("reclaim: a call booked on a run's old entry, still in the ring when the entry is reclaimed, counts "
          "once on the run's new entry") {
  LedgerFixture f;
  TestRegion& t = f.t;
  const std::int64_t t0 = nowNs(), lifetime = 3'600'000'000'000;
  t.admin->setClock(t0);
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-1", {}, 2000, 0}).allowed());   // $0.01
  (void)f.writer->drainOnce();
  t.admin->setClock(t0 + lifetime + 1);
  // Booked on the old entry, not yet written by the agent: the entry still looks idle by its
  // last written booking.
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-1", {}, 400, 0}).allowed());    // $0.002
  CHECK(reclaimTwice(t, t0 + lifetime + 1, lifetime).runs == 1);
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-1", {}, 400, 0}).allowed());    // $0.002, new entry
  (void)f.writer->drainOnce();
  CHECK(t.client->run("run-1").committed == usd("0.014"));
  CHECK(t.client->run("run-1").calls == 3);
  // Once: more calls add only themselves.
  REQUIRE(t.client->record({"p", "gpt-4o", "openai", "run-1", {}, 400, 0}).allowed());
  (void)f.writer->drainOnce();
  CHECK(t.client->run("run-1").committed == usd("0.016"));
}

TEST_CASE("reclaim: a rule counter that counts a call between being chosen and being reclaimed is kept") {
  TestRegion t(64);
  const RuleSpec r = tenantRequests("all-time-requests", 3, WindowKind::kAllTime);
  std::vector<std::uint32_t> idx;
  REQUIRE(t.admin->setRules({r}, {WindowSpan{0, 0, INT64_MAX}}, &idx).ok());
  CallSite site;
  Call c = call("a");
  REQUIRE(t.client->prepare(c, &site).allowed());
  Reservation res;   // creates the counter, holds one request, then gives it back: idle, all time
  REQUIRE(t.client->reserve(site, 1000, 0, &res).allowed());
  REQUIRE(t.client->release(res).allowed());
  (void)t.admin->reclaimKeys(nowNs(), kDayNs);   // seen idle once
  REQUIRE(t.client->record({"a", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());   // counts one request
  CHECK(t.admin->reclaimKeys(nowNs(), kDayNs).rule_counters == 0);
  CHECK(t.admin->rules()[0].counters.at(0).committed == 1);
}
