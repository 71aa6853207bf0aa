// The insert-only tables when they fill up: a bounded probe, and the engine's answers for keys
// that are not in a table yet (nothing spent) or cannot be tracked (refused when limited).
#include "agent_support.h"

#include <memory>

using namespace tokenfuse;
using namespace tokenfuse::test;
using tokenfuse::test::usd;

namespace {

// A table of 256 slots in this process's memory.
struct LocalTable {
  LocalTable() : slots(std::make_unique<shm::BudgetSlot[]>(256)), table(slots.get(), 256) {}
  // Marks `n` slots from `first` (wrapping) as taken by other keys.
  void occupy(std::uint32_t first, std::uint32_t n) {
    for (std::uint32_t i = 0; i < n; ++i) {
      shm::KeyHeader& k = slots[(first + i) & 255].k;
      k.key_len = 1;
      k.key[0] = '#';
      k.word.store(shm::keyWord(0xdeadbeef, shm::kKeyReady, 0));
    }
  }
  std::unique_ptr<shm::BudgetSlot[]> slots;
  KeyedTable<shm::BudgetSlot> table;
};

auto noInit = [](shm::BudgetSlot&) noexcept {};

}  // namespace

TEST_CASE("table: an insert finds no room past 64 slots from the key's home slot and says full") {
  LocalTable t;
  const auto home = static_cast<std::uint32_t>(hashKey("acme")) & 255u;
  t.occupy(home, 64);
  const Found f = t.table.findOrInsert("acme", 1, noInit);
  CHECK(f.what == Lookup::kFull);
  CHECK(f.index == -1);
  // A lookup of the same key stops at the same bound, and says there is no room for it.
  CHECK(t.table.find("acme").what == Lookup::kFull);
}

TEST_CASE("table: within the probe bound an insert takes the first free slot") {
  LocalTable t;
  const auto home = static_cast<std::uint32_t>(hashKey("acme")) & 255u;
  t.occupy(home, 63);
  const Found f = t.table.findOrInsert("acme", 1, noInit);
  CHECK(f.what == Lookup::kInserted);
  CHECK(f.index == static_cast<std::int32_t>((home + 63) & 255u));
  CHECK(t.table.find("acme").what == Lookup::kFound);
  CHECK(t.table.find("unknown-key").what != Lookup::kFound);
}

TEST_CASE("table: a lookup of an unknown key in a full table answers full, not absent") {
  LocalTable t;
  t.occupy(0, 256);
  CHECK(t.table.find("never-seen").what == Lookup::kFull);
  CHECK(t.table.findOrInsert("never-seen", 1, noInit).what == Lookup::kFull);
}

TEST_CASE("check: a tenant not in the table yet has spent nothing, and is checked against the default limit") {
  TestRegion t(16);
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("0.01"));
  // 4000 prompt tokens of gpt-4o: $0.02, over the default.
  CHECK(t.client->check("fresh", "gpt-4o", 4000).code == Code::kTenantBudgetExhausted);
  CHECK(t.client->check("fresh", "gpt-4o", 1000).allowed());   // $0.005
}

TEST_CASE("check, reserve and record: a tenant that cannot be tracked is refused when a default limit applies") {
  TestRegion t(16);
  for (int i = 0; i < 200; ++i) (void)t.client->record({"t" + std::to_string(i), "gpt-4o", "openai", {}, {}, 1, 0});
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("1.00"));
  CHECK(t.client->check("newcomer", "gpt-4o", 1000).code == Code::kCapacityExhausted);
  Reservation r;
  CHECK(t.client->reserve({"newcomer", "gpt-4o", {}, {}, 1000, 0, 0}, &r).code == Code::kCapacityExhausted);
  const std::uint64_t refused = t.region->header().stats.capacity_refused.load();
  const Decision d = t.client->record({"newcomer", "gpt-4o", "openai", {}, {}, 1000, 0});
  CHECK(d.code == Code::kCapacityExhausted);
  CHECK(d.ledger_seq > 0);   // the entry is in the ledger ring all the same
  CHECK(d.cost == NanoUsd(5'000'000));
  CHECK(t.region->header().stats.capacity_refused.load() == refused + 1);
  CHECK(std::string(errorCode(d.code)) == "E-TOKENFUSE-CAPACITY");
}

TEST_CASE("check: a run that cannot be tracked is refused when a default run limit applies") {
  TestRegion t(16);
  for (int i = 0; i < 200; ++i) (void)t.client->record({"acme", "gpt-4o", "openai", "r" + std::to_string(i), {}, 1, 0});
  CHECK(t.client->check("acme", "gpt-4o", 1000, "new-run").allowed());   // no run limit anywhere
  t.admin->setDefaultLimit(LimitTable::kRun, usd("1.00"));
  CHECK(t.client->check("acme", "gpt-4o", 1000, "new-run").code == Code::kCapacityExhausted);
  CHECK(t.client->check("acme", "gpt-4o", 1000).allowed());   // no run given: no run layer
}

TEST_CASE("insert with the default limit: admin paths create entries that follow the default") {
  TestRegion t(16);
  t.admin->setDefaultLimit(LimitTable::kTenant, usd("2.00"));
  REQUIRE(t.admin->setElsewhere(t.admin->day(), "remote", usd("0.10")).ok());
  CHECK(t.client->tenant("remote").limit == usd("2.00"));
  REQUIRE(t.admin->restore(LimitTable::kRun, "restored", usd("0.10"), 1, 0, 1).ok());
  CHECK(t.client->run("restored").limit == std::nullopt);
  t.admin->setDefaultLimit(LimitTable::kRun, usd("3.00"));
  CHECK(t.client->run("restored").limit == usd("3.00"));
}
