// The holds reconciliation: a layer's holds that no live reservation accounts for are corrected,
// but only once the same difference has been seen in two consecutive sweeps.
#include "support.h"

using namespace tokenfuse;
using tokenfuse::test::TestRegion;
using tokenfuse::test::usd;

namespace {
shm::Counters& tenantCounters(TestRegion& t, const char* id) {
  const Found f = KeyedTable<shm::BudgetSlot>(t.region->tenants(), t.spec.tenant_capacity).find(id);
  REQUIRE(f.index >= 0);
  return t.region->tenants()[f.index].c;
}
}  // namespace

TEST_CASE("reconcile: a leaked hold is corrected at the second sweep that sees it, logged and counted") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());   // a live one
  tenantCounters(t, "acme").spend.add(777, 0);   // as a client killed between layer and progress leaves it
  CHECK(t.admin->reconcileHolds().empty());     // once is not enough: it may be in flight
  const std::vector<HoldCorrection> c = t.admin->reconcileHolds();
  REQUIRE(c.size() == 1);
  CHECK(std::string(c[0].layer) == "tenant");
  CHECK(c[0].id == "acme");
  CHECK(c[0].difference == 777);
  CHECK(t.client->tenant("acme").held == usd("0.005"));   // the live reservation's hold stays
  CHECK(t.region->header().stats.holds_reconciled.load() == 1);
  CHECK(t.admin->reconcileHolds().empty());
  CHECK(t.client->commit(r, "openai", 1000, 0).allowed());
  CHECK(t.client->tenant("acme").held == NanoUsd(0));
}

TEST_CASE("reconcile: a difference that changes between sweeps is left alone until it holds still") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());
  shm::Counters& c = t.region->header().platform;
  c.spend.add(100, 0);
  CHECK(t.admin->reconcileHolds().empty());
  c.spend.add(50, 0);   // something else happened in between
  CHECK(t.admin->reconcileHolds().empty());
  const auto fixed = t.admin->reconcileHolds();
  REQUIRE(fixed.size() == 1);
  CHECK(std::string(fixed[0].layer) == "platform");
  CHECK(fixed[0].difference == 150);
  CHECK(t.client->platform().held == usd("0.005"));
}

TEST_CASE("reconcile: a live client stopped between its layer changes and its step to active is not corrected") {
  TestRegion t;
  Reservation r;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", "run-1", {}, 1000, 0, 0}, &r).allowed());
  shm::ReservationSlot& s = t.region->reservations()[shm::reservationIndex(r.id)];
  const std::uint64_t active = s.word.load();
  // Reserving: every layer grown, the step to active not yet taken.
  s.word.store(shm::resWord(shm::resClient(active), shm::reservationGen(r.id), shm::kResReserving, 0));
  for (int i = 0; i < 3; ++i) CHECK(t.admin->reconcileHolds().empty());
  CHECK(t.client->platform().held == usd("0.005"));
  s.word.store(active);
  CHECK(t.client->release(r).allowed());
  CHECK(t.client->platform().held == NanoUsd(0));
}
