// Each layer's decision and error code, against the reference's behaviour.
#include "agent_support.h"

using namespace tokenfuse;
using namespace tokenfuse::test;
using tokenfuse::test::usd;

namespace {
// 4000 prompt tokens of claude-sonnet-4-6: the reference's default estimate, $0.012.
constexpr std::int64_t kPrompt = 4000;
const NanoUsd kEstimate = usd("0.012");

Decision reserve(Client& c, std::string_view project, std::string_view model, std::int64_t prompt,
                 std::int64_t completion, Reservation* r, std::string_view run = {}) {
  return c.reserve({project, model, run, "agent-1", prompt, completion, 0}, r);
}
}  // namespace

TEST_CASE("check: with no limits set, every call is allowed (NULL limit = unlimited)") {
  TestRegion t;
  const Decision d = t.client->check("acme", "claude-sonnet-4-6", kPrompt);
  CHECK(d.allowed());
  CHECK(d.cost == kEstimate);
  CHECK(std::string(d.errorCode()) == "OK");
}

TEST_CASE("check: the tenant layer denies with E-BUDGET-002 when used + estimate > limit") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.02")).ok());
  CHECK(t.client->record({"acme", "claude-sonnet-4-6", "anthropic", {}, {}, 4000, 0}).cost == kEstimate);
  // used 0.012 + 0.012 > 0.02
  const Decision d = t.client->check("acme", "claude-sonnet-4-6", kPrompt);
  CHECK(d.code == Code::kTenantBudgetExhausted);
  CHECK(std::string(d.errorCode()) == "E-BUDGET-002");
  CHECK(d.used == kEstimate);
  CHECK(d.limit == usd("0.02"));
  CHECK(describe(d, "acme") == "Tenant acme budget exhausted: used $0.0120 / $0.0200");
  // Other tenants are not affected.
  CHECK(t.client->check("other", "claude-sonnet-4-6", kPrompt).allowed());
}

TEST_CASE("check: reaching the limit exactly is allowed, as in the reference (used + estimate > limit)") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.024")).ok());
  t.client->record({"acme", "claude-sonnet-4-6", "anthropic", {}, {}, 4000, 0});
  CHECK(t.client->check("acme", "claude-sonnet-4-6", kPrompt).allowed());
  t.client->record({"acme", "claude-sonnet-4-6", "anthropic", {}, {}, 4000, 0});
  CHECK(t.client->check("acme", "claude-sonnet-4-6", kPrompt).code == Code::kTenantBudgetExhausted);
}

TEST_CASE("check: the platform layer denies with E-BUDGET-003 across all tenants") {
  TestRegion t;
  t.admin->setPlatformLimit(usd("0.03"));
  t.client->record({"a", "claude-sonnet-4-6", "anthropic", {}, {}, 4000, 0});
  t.client->record({"b", "claude-sonnet-4-6", "anthropic", {}, {}, 4000, 0});
  const Decision d = t.client->check("c", "claude-sonnet-4-6", kPrompt);
  CHECK(d.code == Code::kPlatformBudgetExhausted);
  CHECK(std::string(d.errorCode()) == "E-BUDGET-003");
  CHECK(describe(d, "c") == "Platform budget exhausted: used $0.0240 / $0.0300 — all LLM calls suspended");
}

TEST_CASE("check: layers are checked run, then tenant, then platform") {
  TestRegion t;
  t.admin->setPlatformLimit(usd("0.001"));
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.001")).ok());
  CHECK(t.client->check("acme", "gpt-4o", 1000).code == Code::kTenantBudgetExhausted);
  REQUIRE(t.admin->setLimit(LimitTable::kRun, "run-1", usd("0.001")).ok());
  const Decision d = t.client->check("acme", "gpt-4o", 1000, "run-1");
  CHECK(d.code == Code::kRunBudgetExhausted);
  CHECK(std::string(d.errorCode()) == "E-BUDGET-001");
  CHECK(t.client->check("zeta", "gpt-4o", 1000).code == Code::kPlatformBudgetExhausted);
}

TEST_CASE("check: the emergency kill switch comes first and blocks every model, free ones too") {
  TestRegion t;
  t.admin->setKill("runaway agent in prod", test::nowNs(), 0);
  for (const char* model : {"gpt-4o", "qwen3:8b", "ollama/llama3", "unknown-model"}) {
    CAPTURE(model);
    const Decision d = t.client->check("acme", model, kPrompt);
    CHECK(d.code == Code::kEmergencyKill);
    CHECK(std::string(d.errorCode()) == "E-BUDGET-004");
  }
  Reservation r;
  CHECK(reserve(*t.client, "acme", "gpt-4o", 10, 0, &r).code == Code::kEmergencyKill);
  CHECK_FALSE(r.valid());
  CHECK(describe(t.client->check("acme", "gpt-4o"), "acme") ==
        "Emergency kill switch activated — contact platform admin");
  const KillSwitchState k = t.client->killSwitch();
  CHECK(k.active);
  CHECK(k.reason == "runaway agent in prod");

  t.admin->clearKill();
  CHECK(t.client->check("acme", "gpt-4o", kPrompt).allowed());
}

TEST_CASE("check: a kill switch with an expiry stops blocking once the agent's clock passes it") {
  TestRegion t;
  const std::int64_t now = test::nowNs();
  t.admin->setClock(now);
  t.admin->setKill("maintenance", now, now + 1'000'000'000);
  CHECK(t.client->check("acme", "gpt-4o").code == Code::kEmergencyKill);
  t.admin->setClock(now + 1'000'000'001);
  CHECK(t.client->check("acme", "gpt-4o").allowed());
  CHECK(t.admin->expireKill(now + 1'000'000'001));
  CHECK_FALSE(t.client->killSwitch().active);
}

TEST_CASE("check: free local models skip the money layers but are still counted") {
  LedgerFixture f;
  TestRegion& t = f.t;
  t.admin->setPlatformLimit(NanoUsd(0));
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", NanoUsd(0)).ok());
  for (const char* model : {"qwen3:8b", "deepseek-r1:14b", "ollama/llama3:70b"}) {
    CAPTURE(model);
    CHECK(t.client->check("acme", model, 100'000).allowed());
    Reservation r;
    REQUIRE(reserve(*t.client, "acme", model, 100, 100, &r).allowed());
    const Decision c = t.client->commit(r, "ollama", 100, 200);
    CHECK(c.allowed());
    CHECK(c.cost == NanoUsd(0));
  }
  t.client->record({"acme", "qwen3:8b", "ollama", {}, {}, 1, 2});
  // The calls are in the ledger with their tokens, and the statistics come from it.
  CHECK(f.writer->drainOnce().written == 4);
  CHECK(f.ledger->tenantTotals(t.client->info().day).at(0).prompt_tokens == 301);
  const BudgetView v = t.client->tenant("acme");
  CHECK(v.calls == 4);
  CHECK(v.prompt_tokens == 301);
  CHECK(v.completion_tokens == 602);
  CHECK(v.committed == NanoUsd(0));
  // A paid model is still refused by the same zero limits.
  CHECK(t.client->check("acme", "gpt-4o", 1).code == Code::kTenantBudgetExhausted);
}

TEST_CASE("reserve: holds the estimate on every layer, and commit books the actual cost and returns the rest") {
  LedgerFixture f;
  TestRegion& t = f.t;
  Reservation r;
  const Decision d = reserve(*t.client, "acme", "gpt-4o", 1000, 1000, &r, "run-7");
  REQUIRE(d.allowed());
  CHECK(r.valid());
  CHECK(d.cost == usd("0.02"));   // 1000 * $5/M + 1000 * $15/M
  for (const BudgetView& v : {t.client->tenant("acme"), t.client->platform(), t.client->run("run-7")}) {
    CHECK(v.held == usd("0.02"));
    CHECK(v.committed == NanoUsd(0));
  }
  const Decision c = t.client->commit(r, "openai", 1000, 500);
  CHECK(c.allowed());
  CHECK(c.cost == usd("0.0125"));
  CHECK_FALSE(c.reservation_expired);
  f.writer->drainOnce();
  for (const BudgetView& v : {t.client->tenant("acme"), t.client->platform(), t.client->run("run-7")}) {
    CHECK(v.held == NanoUsd(0));
    CHECK(v.committed == usd("0.0125"));
    CHECK(v.calls == 1);
    CHECK(v.prompt_tokens == 1000);
    CHECK(v.completion_tokens == 500);
  }
  // A reservation settles once.
  CHECK(t.client->commit(r, "openai", 1, 1).code == Code::kUnknownReservation);
  CHECK(t.client->release(r).code == Code::kUnknownReservation);
}

TEST_CASE("reserve: a denied reservation holds nothing on any layer") {
  TestRegion t;
  t.admin->setPlatformLimit(usd("0.01"));
  REQUIRE(t.admin->setLimit(LimitTable::kRun, "run-1", usd("1")).ok());
  Reservation r;
  const Decision d = reserve(*t.client, "acme", "gpt-4o", 1000, 1000, &r, "run-1");
  CHECK(d.code == Code::kPlatformBudgetExhausted);
  CHECK_FALSE(r.valid());
  CHECK(t.client->run("run-1").held == NanoUsd(0));
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
  CHECK(t.client->platform().held == NanoUsd(0));
  CHECK(t.client->platform().denials == 1);
  CHECK(t.client->info().live_reservations == 0);
}

TEST_CASE("release: returns the whole hold and books nothing") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.02")).ok());
  Reservation r;
  REQUIRE(reserve(*t.client, "acme", "gpt-4o", 1000, 1000, &r).allowed());
  Reservation r2;
  CHECK(reserve(*t.client, "acme", "gpt-4o", 1, 0, &r2).code == Code::kTenantBudgetExhausted);
  CHECK(t.client->release(r).cost == usd("0.02"));
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
  CHECK(t.client->tenant("acme").committed == NanoUsd(0));
  CHECK(reserve(*t.client, "acme", "gpt-4o", 1000, 1000, &r2).allowed());
}

TEST_CASE("commit: a cost above the hold is still booked in full, and later calls are refused") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.01")).ok());
  Reservation r;
  REQUIRE(reserve(*t.client, "acme", "gpt-4o", 1000, 0, &r).allowed());   // holds $0.005
  CHECK(t.client->commit(r, "openai", 1000, 1000).cost == usd("0.02"));    // the call happened
  CHECK(t.client->tenant("acme").committed == usd("0.02"));
  CHECK(t.client->check("acme", "gpt-4o", 0).code == Code::kTenantBudgetExhausted);
  Reservation none;
  CHECK(t.client->reserve({"acme", "gpt-4o", {}, {}, 0, 0, 0}, &none).code == Code::kTenantBudgetExhausted);
  CHECK(t.client->reserve({"acme", "qwen3:8b", {}, {}, 10, 10, 0}, &none).allowed());   // free: no money layer
}

TEST_CASE("charge: a stream runs within the hold, grows it within the limit, and is stopped before it crosses") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.05")).ok());
  Reservation r;
  REQUIRE(reserve(*t.client, "acme", "gpt-4o", 1000, 1000, &r).allowed());   // holds $0.02
  CHECK(t.client->charge(r, 1000, 0).allowed());                            // $0.005 consumed
  Decision d = t.client->charge(r, 0, 1000);                                // $0.02: still within the hold
  CHECK(d.allowed());
  CHECK(d.cost == usd("0.02"));
  CHECK(t.client->tenant("acme").held == usd("0.02"));
  d = t.client->charge(r, 0, 1000);                                         // $0.035: hold grows
  CHECK(d.allowed());
  CHECK(t.client->tenant("acme").held == usd("0.035"));
  d = t.client->charge(r, 0, 1000);                                         // $0.05: exactly the limit
  CHECK(d.allowed());
  d = t.client->charge(r, 0, 1);                                            // one more token crosses it
  CHECK(d.code == Code::kTenantBudgetExhausted);
  CHECK(t.client->tenant("acme").held == usd("0.05"));                      // nothing was added
  CHECK(t.client->commit(r, "openai", 1000, 3000).cost == usd("0.05"));
  CHECK(t.client->tenant("acme").committed == usd("0.05"));
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
}

TEST_CASE("charge: turning the kill switch on stops a running stream") {
  TestRegion t;
  Reservation r;
  REQUIRE(reserve(*t.client, "acme", "gpt-4o", 100, 100, &r).allowed());
  CHECK(t.client->charge(r, 0, 10).allowed());
  t.admin->setKill("stop everything", test::nowNs(), 0);
  CHECK(t.client->charge(r, 0, 10).code == Code::kEmergencyKill);
  CHECK(t.client->commit(r, "openai", 100, 10).allowed());   // what was used is still booked
}

TEST_CASE("record: books a finished call without a limit check, as record_token_usage") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.001")).ok());
  const Decision d = t.client->record({"acme", "gpt-4o", "openai", "run-1", "agent-1", 1000, 1000});
  CHECK(d.allowed());
  CHECK(d.cost == usd("0.02"));
  CHECK(t.client->tenant("acme").committed == usd("0.02"));
  CHECK(t.client->run("run-1").committed == usd("0.02"));
  CHECK(t.client->platform().committed == usd("0.02"));
}

TEST_CASE("limits: a default limit applies to new entries, and explicit limits override it and can be cleared") {
  TestRegion t;
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("0.01"));
  t.admin->setDefaultLimit(LimitTable::kRun, usd("0.005"));
  CHECK(t.client->check("new-tenant", "gpt-4o", 3000).code == Code::kTenantBudgetExhausted);   // $0.015
  CHECK(t.client->check("new-tenant", "gpt-4o", 1000, "run-x").allowed());                        // $0.005
  CHECK(t.client->check("new-tenant", "gpt-4o", 1001, "run-x").code == Code::kRunBudgetExhausted);
  CHECK(t.client->tenant("never-seen").limit == usd("0.01"));
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "big", usd("1")).ok());
  CHECK(t.client->check("big", "gpt-4o", 3000).allowed());
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "free-for-all", std::nullopt).ok());
  CHECK_FALSE(t.client->tenant("free-for-all").limit.has_value());
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("2"));
  CHECK(t.client->tenant("big").limit == usd("1"));             // explicit: unchanged
  t.client->record({"tracked", "gpt-4o", "o", {}, {}, 1, 0});
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("3"));
  CHECK(t.client->tenant("tracked").limit == usd("3"));          // follows the default
  REQUIRE(t.admin->clearLimit(LimitTable::kTenant, "big").ok());
  CHECK(t.client->tenant("big").limit == usd("3"));
}

TEST_CASE("invalid input: ids too long or missing, token counts negative or absurd") {
  TestRegion t;
  const std::string long_id(129, 'x');
  CHECK(t.client->check(long_id, "gpt-4o").code == Code::kInvalidArgument);
  CHECK(t.client->check("", "gpt-4o").code == Code::kInvalidArgument);
  CHECK(t.client->check("acme", "").code == Code::kInvalidArgument);
  CHECK(t.client->check("acme", "gpt-4o", -1).code == Code::kInvalidArgument);
  CHECK(t.client->check("acme", "gpt-4o", kMaxTokensPerCall + 1).code == Code::kInvalidArgument);
  Reservation r;
  CHECK(reserve(*t.client, "acme", "gpt-4o", 1, -5, &r).code == Code::kInvalidArgument);
  CHECK(t.client->commit(Reservation{12345}, "p", 1, 1).code == Code::kUnknownReservation);
  CHECK(t.client->commit(Reservation{}, "p", 1, 1).code == Code::kUnknownReservation);
  REQUIRE(reserve(*t.client, "acme", "gpt-4o", 1, 1, &r).allowed());
  CHECK(t.client->commit(r, "p", -1, 1).code == Code::kInvalidArgument);
  CHECK(t.client->commit(r, "p", 1, 1).allowed());   // the bad commit changed nothing
  CHECK(std::string(errorCode(Code::kInvalidArgument)) == "E-TOKENFUSE-INVALID-ARGUMENT");
}

TEST_CASE("capacity: a full tenant table refuses limited tenants and counts unlimited ones in the platform") {
  TempDir dir;
  TestRegion t(16);
  Ledger ledger(dir.path + "/ledger.db", "h");
  LedgerWriter writer(*t.admin, ledger, "h", {});
  for (int i = 0; i < 16; ++i) REQUIRE(t.client->record({"t" + std::to_string(i), "gpt-4o", "o", {}, {}, 1, 0}).allowed());
  CHECK(t.client->record({"overflow", "gpt-4o", "o", {}, {}, 1000, 0}).allowed());
  CHECK(t.region->header().stats.untracked_calls.load() == 1);
  CHECK(writer.drainOnce().written == 17);
  CHECK(t.client->platform().calls == 17);
  CHECK(t.client->platform().committed == usd("0.005080"));
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("1"));
  Reservation r;
  CHECK(reserve(*t.client, "overflow", "gpt-4o", 1, 0, &r).code == Code::kCapacityExhausted);
  CHECK_FALSE(t.admin->setLimit(LimitTable::kTenant, "overflow", usd("1")).ok());
}

TEST_CASE("price: the table's price, the fallback for an unknown model, zero for ollama/") {
  TestRegion t;
  CHECK(t.client->price("gpt-4o") == Price{5'000'000'000, 15'000'000'000});
  CHECK(t.client->price("not-in-table") == Price{3'000'000'000, 15'000'000'000});
  CHECK(t.client->price("ollama/mistral").isFree());
  REQUIRE(t.admin->setPrice("gpt-4o", {1, 2}).ok());
  CHECK(t.client->price("gpt-4o") == Price{1, 2});
  CHECK_FALSE(t.admin->setPrice("x", {kMaxPriceNanoPerMtok + 1, 0}).ok());
}

TEST_CASE("fleet: what other hosts spent counts as used, in checks, reservations and streaming charges") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("1.00")).ok());
  REQUIRE(t.admin->setElsewhere(t.admin->day(), "acme", usd("0.98")).ok());
  CHECK(t.client->tenant("acme").elsewhere == usd("0.98"));
  // 4000 sonnet prompt tokens: $0.012; 0.98 + 0.012 <= 1.00, and a second would not fit.
  CHECK(t.client->check("acme", "claude-sonnet-4-6", kPrompt).allowed());
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "claude-sonnet-4-6", {}, {}, kPrompt, 0, 0}, &r).allowed());
  const Decision d = t.client->check("acme", "claude-sonnet-4-6", kPrompt);
  CHECK(d.code == Code::kTenantBudgetExhausted);
  CHECK(d.used == usd("0.992"));   // held here + spent elsewhere
  Reservation r2;
  const Decision d2 = t.client->reserve({"acme", "claude-sonnet-4-6", {}, {}, kPrompt, 0, 0}, &r2);
  CHECK(d2.code == Code::kTenantBudgetExhausted);
  CHECK(d2.used == usd("0.992"));
  // A stream may grow its hold only up to what is left: 1.00 - 0.98 = 0.02 in all.
  CHECK(t.client->charge(r, kPrompt, 500).allowed());                        // $0.0195
  CHECK(t.client->charge(r, 0, 100).code == Code::kTenantBudgetExhausted);   // $0.021
  CHECK(t.client->release(r).allowed());

  // The fleet already past the limit: even a zero estimate of a paid model is refused.
  REQUIRE(t.admin->setElsewhere(t.admin->day(), "acme", usd("1.5")).ok());
  CHECK(t.client->check("acme", "claude-sonnet-4-6", 0).code == Code::kTenantBudgetExhausted);
  CHECK(t.client->reserve({"acme", "claude-sonnet-4-6", {}, {}, 0, 0, 0}, &r).code == Code::kTenantBudgetExhausted);
  CHECK(t.client->check("acme", "qwen3:8b", kPrompt).allowed());   // free models skip the money layers

  // The platform layer likewise; and a new day forgets what other hosts spent yesterday.
  REQUIRE(t.admin->setElsewhere(t.admin->day(), "", usd("10")).ok());
  t.admin->setPlatformLimit(usd("10"));
  CHECK(t.client->check("beta", "claude-sonnet-4-6", kPrompt).code == Code::kPlatformBudgetExhausted);
  const std::int32_t yesterday = t.admin->day();
  t.admin->rollover(yesterday + 1);
  CHECK(t.client->platform().elsewhere == NanoUsd(0));
  CHECK(t.client->tenant("acme").elsewhere == NanoUsd(0));
  CHECK(t.client->check("acme", "claude-sonnet-4-6", kPrompt).allowed());
  CHECK_FALSE(t.admin->setElsewhere(yesterday, "acme", usd("0.5")).ok());   // a late answer for yesterday
  CHECK(t.client->tenant("acme").elsewhere == NanoUsd(0));
}
