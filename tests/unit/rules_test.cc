// Budget rules (issue 14): every scope, metric and window kind enforced by the library, with its
// code, its rule and its reset time; holds returned by release, the reaper and the
// reconciliation; definitions replaced without losing counters.
#include "agent_support.h"

#include "rule_match.h"

using namespace tokenfuse;
using namespace tokenfuse::test;
using tokenfuse::test::usd;

namespace {

constexpr std::int64_t kStart = 1'700'000'000'000'000'000;   // a window's start (unix ns)
constexpr std::int64_t kEnd = kStart + 60'000'000'000;       // and its end, a minute later

RuleSpec rule(std::string name, RuleScope scope, RuleMetric metric, std::optional<std::int64_t> limit,
              WindowKind window = WindowKind::kMinute, std::string match = {}) {
  RuleSpec r;
  r.name = std::move(name);
  r.scope = scope;
  r.metric = metric;
  r.limit = limit;
  r.window.kind = window;
  r.match = std::move(match);
  return r;
}

// Installs `rules`, each in the window [kStart, kEnd) (all time for kAllTime).
std::vector<std::uint32_t> install(TestRegion& t, const std::vector<RuleSpec>& rules) {
  std::vector<WindowSpan> spans(rules.size(), WindowSpan{0, kStart, kEnd});
  std::vector<std::uint32_t> indices;
  const Status s = t.admin->setRules(rules, spans, &indices);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return indices;
}

Call call(std::string_view project, std::string_view model, std::int64_t prompt = 1000,
          std::int64_t completion = 0) {
  Call c;
  c.project_id = project;
  c.model = model;
  c.estimated_prompt_tokens = prompt;
  c.estimated_completion_tokens = completion;
  return c;
}

// The committed and held count of the counter of rule `index` for `key` (single-id scopes).
std::pair<std::int64_t, std::int64_t> counter(TestRegion& t, std::uint32_t index, std::string_view key) {
  const KeyedTable<shm::RuleSlot> table(t.region->ruleSlots(), t.spec.rule_capacity);
  char buf[shm::kRuleKeyMax];
  const std::uint32_t gen = shm::ruleGen(t.region->header().rules[index].word.load());
  const Found f = table.find(ruleKey(buf, index, gen, key, {}, false));
  if (f.index < 0) return {0, 0};
  const shm::Counters& c = table.at(f.index).c;
  return {c.spend.committed(), c.spend.used() - c.spend.committed()};
}

}  // namespace

TEST_CASE("rules: a tenant's monthly money rule denies with E-BUDGET-002, names the rule and when it resets") {
  TestRegion t;
  const auto idx = install(t, {rule("tenant-monthly", RuleScope::kTenant, RuleMetric::kUsd, usd("0.02").count(),
                                    WindowKind::kMonth)});
  Reservation r;
  // 1000 prompt tokens of gpt-4o: $0.005 each.
  for (int i = 0; i < 4; ++i) REQUIRE(t.client->reserve(call("acme", "gpt-4o"), &r).allowed());
  const Decision d = t.client->reserve(call("acme", "gpt-4o"), &r);
  CHECK(d.code == Code::kTenantBudgetExhausted);
  CHECK(std::string(d.errorCode()) == "E-BUDGET-002");
  CHECK(d.rule == idx[0] + 1);
  CHECK(d.resets_unix_ns == kEnd);
  CHECK(d.used == usd("0.02"));
  CHECK(d.limit == usd("0.02"));
  CHECK(!r.valid());
  // Every tenant has its own counter under the same rule.
  CHECK(t.client->reserve(call("other", "gpt-4o"), &r).allowed());
  CHECK(t.client->check("acme", "gpt-4o", 1000).code == Code::kTenantBudgetExhausted);
}

TEST_CASE("rules: a model group (prefix) shares one counter and denies with E-BUDGET-005") {
  TestRegion t;
  install(t, {rule("gpt4-family", RuleScope::kModel, RuleMetric::kUsd, usd("0.008").count(), WindowKind::kDay,
                   "gpt-4*")});
  Reservation r;
  REQUIRE(t.client->reserve(call("a", "gpt-4o"), &r).allowed());          // $0.005
  REQUIRE(t.client->reserve(call("b", "gpt-4-turbo"), &r).allowed());     // the same group, at the fallback $0.003
  const Decision d = t.client->reserve(call("c", "gpt-4o-mini", 100000), &r);
  CHECK(d.code == Code::kModelBudgetExhausted);
  CHECK(std::string(d.errorCode()) == "E-BUDGET-005");
  CHECK(t.client->reserve(call("a", "claude-sonnet-4-6"), &r).allowed());   // not in the group
}

TEST_CASE("rules: agent and tenant x agent rules deny with E-BUDGET-006, calls without an agent do not match") {
  TestRegion t;
  install(t, {rule("per-user", RuleScope::kTenantAgent, RuleMetric::kUsd, usd("0.005").count(), WindowKind::kHour)});
  Call c = call("acme", "gpt-4o");
  c.agent_id = "alice";
  Reservation r;
  REQUIRE(t.client->reserve(c, &r).allowed());
  CHECK(t.client->reserve(c, &r).code == Code::kAgentBudgetExhausted);
  c.agent_id = "bob";
  CHECK(t.client->reserve(c, &r).allowed());
  c.project_id = "other";
  c.agent_id = "alice";   // another tenant's alice
  CHECK(t.client->reserve(c, &r).allowed());
  c.agent_id = {};
  CHECK(t.client->reserve(c, &r).allowed());
  CHECK(t.client->reserve(c, &r).allowed());
}

TEST_CASE("rules: tag rules count each tag the call passes, deny with E-BUDGET-007, and bound the matches") {
  TestRegion t;
  install(t, {rule("per-tag", RuleScope::kTag, RuleMetric::kUsd, usd("0.01").count(), WindowKind::kWeek)});
  Call c = call("acme", "gpt-4o");
  c.tags = "batch,eval";
  Reservation r;
  REQUIRE(t.client->reserve(c, &r).allowed());
  REQUIRE(t.client->reserve(c, &r).allowed());
  c.tags = "eval";
  CHECK(t.client->reserve(c, &r).code == Code::kTagBudgetExhausted);
  c.tags = "interactive";
  CHECK(t.client->reserve(c, &r).allowed());
  c.tags = {};
  CHECK(t.client->reserve(c, &r).allowed());
  // Nine tags would be nine counters: more than a call may match.
  c.tags = "a,b,c,d,e,f,g,h,i";
  CHECK(t.client->reserve(c, &r).code == Code::kInvalidArgument);
  c.tags = "a,,b";
  CHECK(t.client->reserve(c, &r).code == Code::kInvalidArgument);
}

TEST_CASE("rules: requests per minute deny with E-RATE-001 until the window rolls over") {
  TestRegion t;
  const auto idx = install(t, {rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 3)});
  Reservation r;
  REQUIRE(t.client->reserve(call("acme", "gpt-4o"), &r).allowed());
  REQUIRE(t.client->commit(r, "openai", 10, 10).allowed());
  REQUIRE(t.client->record({"acme", "gpt-4o", "openai", {}, {}, 10, 10}).allowed());
  REQUIRE(t.client->reserve(call("acme", "gpt-4o"), &r).allowed());
  Reservation denied;
  const Decision d = t.client->reserve(call("acme", "gpt-4o"), &denied);
  CHECK(d.code == Code::kRequestRateExceeded);
  CHECK(std::string(d.errorCode()) == "E-RATE-001");
  CHECK(d.used.count() == 3);
  CHECK(d.limit.count() == 3);
  CHECK(d.resets_unix_ns == kEnd);
  CHECK(counter(t, idx[0], "acme") == std::pair<std::int64_t, std::int64_t>{2, 1});
  // The next minute: bookings start again at zero, the live reservation still holds its one.
  t.admin->rollRule(idx[0], kEnd, kEnd + 60'000'000'000);
  CHECK(counter(t, idx[0], "acme") == std::pair<std::int64_t, std::int64_t>{0, 1});
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &denied).allowed());
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &denied).allowed());
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &denied).code == Code::kRequestRateExceeded);
  // Commit books the request in the window it commits in.
  REQUIRE(t.client->commit(r, "openai", 1, 1).allowed());
  CHECK(counter(t, idx[0], "acme") == std::pair<std::int64_t, std::int64_t>{1, 2});
}

TEST_CASE("rules: a token budget stops a local (free) model with E-RATE-002, money rules skip it") {
  TestRegion t;
  install(t, {rule("money", RuleScope::kTenant, RuleMetric::kUsd, 0, WindowKind::kDay),
              rule("ollama-tokens", RuleScope::kModel, RuleMetric::kTokens, 5000, WindowKind::kDay, "ollama/*")});
  Reservation r;
  REQUIRE(t.client->reserve(call("acme", "ollama/llama3", 2000, 1000), &r).allowed());
  REQUIRE(t.client->commit(r, "ollama", 2000, 1500).allowed());   // 3500 booked
  const Decision d = t.client->reserve(call("acme", "ollama/llama3", 1000, 1000), &r);
  CHECK(d.code == Code::kTokenRateExceeded);
  CHECK(std::string(d.errorCode()) == "E-RATE-002");
  CHECK(d.used.count() == 3500);
  CHECK(t.client->reserve(call("acme", "ollama/llama3", 1000, 500), &r).allowed());   // exactly 5000
  // The paid model meets the $0 money rule instead.
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &r).code == Code::kTenantBudgetExhausted);
}

TEST_CASE("rules: a concurrency cap counts live reservations of every process and denies with E-CONCURRENCY-001") {
  TestRegion t;
  const auto idx = install(t, {rule("two-at-once", RuleScope::kPlatform, RuleMetric::kConcurrency, 2,
                                    WindowKind::kAllTime)});
  Reservation a, b, c;
  REQUIRE(t.client->reserve(call("x", "gpt-4o"), &a).allowed());
  REQUIRE(t.engine().reserve([&] { CallSite s; REQUIRE(t.engine().prepare(call("y", "gpt-4o"), &s, true).allowed()); return s; }(),
                             100, 0, 0, &b).allowed());
  const Decision d = t.client->reserve(call("z", "gpt-4o"), &c);
  CHECK(d.code == Code::kConcurrencyExceeded);
  CHECK(std::string(d.errorCode()) == "E-CONCURRENCY-001");
  CHECK(d.resets_unix_ns == 0);
  REQUIRE(t.client->commit(a, "openai", 1, 1).allowed());
  CHECK(counter(t, idx[0], "") == std::pair<std::int64_t, std::int64_t>{0, 1});   // nothing stays booked
  REQUIRE(t.client->reserve(call("z", "gpt-4o"), &c).allowed());
  REQUIRE(t.client->release(c).allowed());
  REQUIRE(t.client->release(b).allowed());
  CHECK(counter(t, idx[0], "") == std::pair<std::int64_t, std::int64_t>{0, 0});
}

TEST_CASE("rules: charge stops a stream before the chunk that would cross a token rule") {
  TestRegion t;
  const auto idx = install(t, {rule("completion-cap", RuleScope::kRun, RuleMetric::kCompletionTokens, 100,
                                    WindowKind::kAllTime)});
  Call c = call("acme", "gpt-4o", 10, 20);
  c.run_id = "run-1";
  Reservation r;
  REQUIRE(t.client->reserve(c, &r).allowed());
  CHECK(counter(t, idx[0], "run-1") == std::pair<std::int64_t, std::int64_t>{0, 20});
  REQUIRE(t.client->charge(r, 10, 60).allowed());
  CHECK(counter(t, idx[0], "run-1") == std::pair<std::int64_t, std::int64_t>{0, 60});
  REQUIRE(t.client->charge(r, 0, 40).allowed());   // 100: exactly the limit
  const Decision d = t.client->charge(r, 0, 1);
  CHECK(d.code == Code::kTokenRateExceeded);
  CHECK(d.resets_unix_ns == 0);
  REQUIRE(t.client->commit(r, "openai", 10, 100).allowed());
  CHECK(counter(t, idx[0], "run-1") == std::pair<std::int64_t, std::int64_t>{100, 0});
  CHECK(t.client->reserve(c, &r).code == Code::kTokenRateExceeded);
}

TEST_CASE("rules: per-key limits override the rule's, a key with none of its own follows the rule") {
  TestRegion t;
  RuleSpec r = rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 1);
  r.keys["vip"] = 3;
  r.keys["free-for-all"] = std::nullopt;
  install(t, {r});
  Reservation x;
  for (int i = 0; i < 3; ++i) REQUIRE(t.client->reserve(call("vip", "gpt-4o"), &x).allowed());
  CHECK(t.client->reserve(call("vip", "gpt-4o"), &x).code == Code::kRequestRateExceeded);
  for (int i = 0; i < 10; ++i) REQUIRE(t.client->reserve(call("free-for-all", "gpt-4o"), &x).allowed());
  REQUIRE(t.client->reserve(call("acme", "gpt-4o"), &x).allowed());
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &x).code == Code::kRequestRateExceeded);
  // The key loses its own limit when the rule no longer lists it.
  r.keys.erase("vip");
  install(t, {r});
  CHECK(t.client->reserve(call("vip", "gpt-4o"), &x).code == Code::kRequestRateExceeded);
}

TEST_CASE("rules: the built-in layers come first, so an app using only them sees the reference's codes") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.001")).ok());
  install(t, {rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 0)});
  Reservation r;
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &r).code == Code::kTenantBudgetExhausted);
  CHECK(t.client->check("acme", "gpt-4o", 1000).code == Code::kTenantBudgetExhausted);
  t.admin->setKill("stop", nowNs(), 0);
  CHECK(t.client->reserve(call("acme", "gpt-4o"), &r).code == Code::kEmergencyKill);
}

TEST_CASE("rules: unchanged rules keep their counters across setRules, removed ones stop matching") {
  TestRegion t;
  const auto first = install(t, {rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 2),
                                 rule("tokens", RuleScope::kTenant, RuleMetric::kTokens, 10)});
  Reservation r;
  REQUIRE(t.client->reserve(call("acme", "gpt-4o", 5), &r).allowed());
  REQUIRE(t.client->commit(r, "openai", 5, 0).allowed());
  // The request rule's limit changes, the token rule goes.
  const auto second = install(t, {rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 1)});
  CHECK(second[0] == first[0]);
  CHECK(counter(t, second[0], "acme").first == 1);
  CHECK(t.client->reserve(call("acme", "gpt-4o", 50), &r).code == Code::kRequestRateExceeded);
  // Brought back, the token rule is a new one: its count starts at zero.
  const auto third = install(t, {rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 5),
                                 rule("tokens", RuleScope::kTenant, RuleMetric::kTokens, 10)});
  CHECK(counter(t, third[1], "acme").first == 0);
  CHECK(t.client->reserve(call("acme", "gpt-4o", 10), &r).allowed());
  CHECK(t.client->reserve(call("acme", "gpt-4o", 1), &r).code == Code::kTokenRateExceeded);
}

TEST_CASE("rules: the reaper returns an overdue reservation's rule holds, the reconciliation a leaked one") {
  TestRegion t;
  const auto idx = install(t, {rule("cap", RuleScope::kTenant, RuleMetric::kConcurrency, 1, WindowKind::kAllTime)});
  Call c = call("acme", "gpt-4o");
  c.ttl_ms = 1000;
  Reservation r;
  REQUIRE(t.client->reserve(c, &r).allowed());
  Reservation refused;
  CHECK(t.client->reserve(c, &refused).code == Code::kConcurrencyExceeded);
  t.admin->setClock(nowNs() + 10'000'000'000);
  const ReapStats s = t.admin->reap(nowNs() + 10'000'000'000);
  CHECK(s.expired == 1);
  CHECK(counter(t, idx[0], "acme") == std::pair<std::int64_t, std::int64_t>{0, 0});
  Reservation again;
  REQUIRE(t.client->reserve(c, &again).allowed());
  // A commit of the expired one books nothing on a concurrency rule and returns nothing twice.
  const Decision late = t.client->commit(r, "openai", 1, 1);
  CHECK_MESSAGE(late.allowed(), std::string(late.errorCode()));
  CHECK(late.reservation_expired);
  CHECK(counter(t, idx[0], "acme") == std::pair<std::int64_t, std::int64_t>{0, 1});

  // A hold no reservation explains (a process killed half-way): returned after two sweeps.
  const KeyedTable<shm::RuleSlot> table(t.region->ruleSlots(), t.spec.rule_capacity);
  char buf[shm::kRuleKeyMax];
  const Found f = table.find(ruleKey(buf, idx[0], shm::ruleGen(t.region->header().rules[idx[0]].word.load()), "acme", {}, false));
  REQUIRE(f.index >= 0);
  table.at(f.index).c.spend.add(1, 0);
  CHECK(t.admin->reconcileHolds().empty());
  const auto fixed = t.admin->reconcileHolds();
  REQUIRE(fixed.size() == 1);
  CHECK(std::string(fixed[0].layer) == "rule");
  CHECK(fixed[0].id == "cap:acme");
  CHECK(fixed[0].difference == 1);
  CHECK(counter(t, idx[0], "acme") == std::pair<std::int64_t, std::int64_t>{0, 1});
}

TEST_CASE("rules: a tag given twice, or two tags of one prefix group, count once on its counter") {
  TestRegion t;
  const auto idx = install(t, {rule("batch-group", RuleScope::kTag, RuleMetric::kConcurrency, 1, WindowKind::kAllTime,
                                    "batch*"),
                               rule("per-tag", RuleScope::kTag, RuleMetric::kRequests, 5)});
  Call c = call("acme", "gpt-4o");
  c.tags = "batch-a,batch-b,eval,eval";
  Reservation r;
  REQUIRE(t.client->reserve(c, &r).allowed());   // one call in flight in the group, not two
  CHECK(counter(t, idx[0], "") == std::pair<std::int64_t, std::int64_t>{0, 1});
  CHECK(counter(t, idx[1], "eval") == std::pair<std::int64_t, std::int64_t>{0, 1});
  REQUIRE(t.client->commit(r, "openai", 1, 1).allowed());
  CHECK(counter(t, idx[1], "eval") == std::pair<std::int64_t, std::int64_t>{1, 0});
}

TEST_CASE("rules: record books a call that matches more rule counters than a call may hold, as far as it can") {
  TestRegion t;
  const auto idx = install(t, {rule("per-tag", RuleScope::kTag, RuleMetric::kRequests, 100),
                               rule("tenant", RuleScope::kTenant, RuleMetric::kRequests, 100)});
  Usage u{"acme", "gpt-4o", "openai", {}, {}, 10, 0};
  u.tags = "a,b,c,d,e,f,g,h";   // 8 tag counters, then the tenant's would be the 9th
  const Decision d = t.client->record(u);
  CHECK(d.code == Code::kCapacityExhausted);   // booked, but not counted against every limit
  CHECK(d.ledger_seq > 0);
  CHECK(t.client->tenant("acme").committed == d.cost);
  CHECK(counter(t, idx[0], "h").first == 1);
  CHECK(counter(t, idx[1], "acme").first == 0);
}

TEST_CASE("rules: the agent rolls a window at its end, and a clock stepped back does not wipe the window again") {
  TempDir dir;
  Config c = testConfig(dir, "rulesroll");
  c.rules = {rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 2)};
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:10Z")};
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);
  auto request = [&] { return client->record({"acme", "gpt-4o", "openai", {}, {}, 1, 0}).code; };
  auto refused = [&] { return client->check(call("acme", "gpt-4o", 1)).code; };
  REQUIRE(request() == Code::kOk);
  REQUIRE(request() == Code::kOk);
  CHECK(refused() == Code::kRequestRateExceeded);
  clock.now = utc("2026-11-29T10:00:59Z");   // still the same minute
  agent.tick();
  CHECK(refused() == Code::kRequestRateExceeded);
  clock.now = utc("2026-11-29T10:01:00Z");   // the next minute, to the nanosecond
  agent.tick();
  CHECK(refused() == Code::kOk);
  REQUIRE(request() == Code::kOk);
  REQUIRE(request() == Code::kOk);
  CHECK(refused() == Code::kRequestRateExceeded);
  clock.now = utc("2026-11-29T10:00:30Z");   // stepped back into the minute before
  agent.tick();
  CHECK(refused() == Code::kRequestRateExceeded);   // the count stands
}

TEST_CASE("rules: a sliding minute counts the share of the previous minute still inside the last 60 s") {
  TempDir dir;
  Config c = testConfig(dir, "rulesslide");
  RuleSpec rpm = rule("rpm", RuleScope::kTenant, RuleMetric::kRequests, 10);
  rpm.sliding = true;
  c.rules = {rpm};
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:30Z")};
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);
  auto request = [&] { return client->record({"acme", "gpt-4o", "openai", {}, {}, 1, 0}).code; };
  // How many more requests acme may make now (making them).
  auto left = [&] {
    for (std::int64_t n = 0; n <= 10; ++n) {
      if (client->check(call("acme", "gpt-4o", 1)).code == Code::kRequestRateExceeded) return n;
      REQUIRE(request() == Code::kOk);
    }
    return std::int64_t{-1};
  };
  CHECK(left() == 10);
  // A fixed window would allow 10 again at 10:01:00; the sliding one still counts all 10.
  clock.now = utc("2026-11-29T10:01:00Z");
  agent.tick();
  const Decision d = client->check(call("acme", "gpt-4o", 1));
  CHECK(d.code == Code::kRequestRateExceeded);
  CHECK(d.used.count() == 10);
  // Half-way through the minute, half of the previous one is still inside the last 60 s.
  clock.now = utc("2026-11-29T10:01:30Z");
  agent.tick();
  CHECK(left() == 5);
  // The next minute carries those 5 whole, then a quarter of them (rounded up: 2).
  clock.now = utc("2026-11-29T10:02:00Z");
  agent.tick();
  CHECK(left() == 5);
  clock.now = utc("2026-11-29T10:02:45Z");
  agent.tick();
  CHECK(left() == 3);   // 10 - 5 this minute - 2 carried
  // A minute with nothing after it: the window after an idle one carries nothing.
  clock.now = utc("2026-11-29T10:05:10Z");
  agent.tick();
  CHECK(left() == 10);
  // A rule that stops sliding carries nothing from then on.
  clock.now = utc("2026-11-29T10:06:00Z");
  agent.tick();
  CHECK(client->check(call("acme", "gpt-4o", 1)).code == Code::kRequestRateExceeded);
  agent.admin().slideRules({}, toUnixNs(clock.now));
  CHECK(left() == 10);
}

TEST_CASE("rules: a rule the fleet no longer shares drops what other hosts counted on it") {
  TempDir dir;
  Config c = testConfig(dir, "rulesunshared");
  c.rules = {rule("monthly", RuleScope::kTenant, RuleMetric::kRequests, 10, WindowKind::kMonth)};
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 1, 0}).code == Code::kOk);
  // As a central link would have left it: 9 requests on other hosts.
  const RuleUsage r = agent.admin().rules().at(0);
  agent.admin().setRuleElsewhere(r.number - 1, r.gen, r.window_start_ns, "acme", {}, 9);
  CHECK(client->check(call("acme", "gpt-4o", 1)).code == Code::kRequestRateExceeded);
  // The same rule, now this host's alone (no central link here at all): only its own count.
  RuleSpec local = c.rules[0];
  local.host_only = true;
  std::string warning;
  REQUIRE(agent.putRule(local, &warning).ok());
  CHECK(agent.admin().rules().at(0).counters.at(0).committed == 1);   // the same counter
  CHECK(client->check(call("acme", "gpt-4o", 1)).code == Code::kOk);
}
