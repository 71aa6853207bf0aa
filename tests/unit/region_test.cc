#include "support.h"

#include <sys/stat.h>

using namespace tokenfuse;
using tokenfuse::test::TestRegion;

TEST_CASE("region: a library refuses a region of another layout version, older or newer, and says what to do") {
  // An upgrade: an application still running the old library meets the new agent's region, or a
  // new application meets the old agent's. Neither reads or writes the other's layout.
  for (const std::uint32_t other : {shm::kLayoutVersion - 1, shm::kLayoutVersion + 1}) {
    CAPTURE(other);
    TestRegion t;
    t.region->header().layout_version = other;
    std::unique_ptr<Client> c;
    const Status s = Client::attach({t.spec.shm_name}, &c);
    REQUIRE_FALSE(s.ok());
    CHECK(c == nullptr);
    CHECK(s.message().find("layout version " + std::to_string(other)) != std::string::npos);
    CHECK(s.message().find("this library speaks " + std::to_string(shm::kLayoutVersion)) != std::string::npos);
    CHECK(s.message().find("--recreate-region") != std::string::npos);
    t.region->header().layout_version = shm::kLayoutVersion;
  }
}

TEST_CASE("region: a region with a foreign magic number is refused") {
  TestRegion t;
  t.region->header().magic ^= 1;
  std::unique_ptr<Client> c;
  const Status s = Client::attach({t.spec.shm_name}, &c);
  CHECK(s.message().find("not a tokenfuse region") != std::string::npos);
  t.region->header().magic ^= 1;
}

TEST_CASE("region: a missing region tells the user to start tokenfused") {
  std::unique_ptr<Client> c;
  const Status s = Client::attach({test::uniqueName("missing")}, &c);
  CHECK(s.message().find("does not exist: start tokenfused") != std::string::npos);
  CHECK(Client::attach({"bad/name"}, &c).message().find("may use only") != std::string::npos);
}

TEST_CASE("region: a region whose creator has not published it yet is refused as not ready") {
  RegionSpec spec;
  spec.shm_name = test::uniqueName("unready");
  spec.tenant_capacity = spec.run_capacity = spec.reservation_capacity = 16;
  spec.model_capacity = 16;
  std::unique_ptr<Region> r;
  REQUIRE(Region::create(spec, &r).ok());
  std::unique_ptr<Client> c;
  const Status s = Client::attach({spec.shm_name}, &c);
  CHECK(s.message().find("not ready") != std::string::npos);
  r.reset();
  Region::remove(spec.shm_name);
}

TEST_CASE("region: a second owner is refused while the first lives") {
  TestRegion t;
  std::unique_ptr<Region> second;
  AttachFailure why;
  const Status s = Region::attach(t.spec.shm_name, &second, /*own=*/true, &why);
  CHECK(why == AttachFailure::kOwned);
  CHECK(s.message().find("owned by another running tokenfused") != std::string::npos);
  RegionSpec dup = t.spec;
  CHECK(Region::create(dup, &second).message().find("already exists") != std::string::npos);
}

TEST_CASE("region: it is created with mode 0660, so the group can use it and others cannot") {
  TestRegion t;
  struct stat st {};
  REQUIRE(::stat(("/dev/shm/" + t.spec.shm_name).c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0660);
}

TEST_CASE("region: capacities must be powers of two within bounds") {
  RegionSpec spec;
  spec.shm_name = test::uniqueName("cap");
  spec.tenant_capacity = 1000;
  std::unique_ptr<Region> r;
  const Status s = Region::create(spec, &r);
  CHECK(s.message().find("tenant capacity is 1000: it must be a power of two") != std::string::npos);
}

TEST_CASE("region: the header layout is what docs/shm-format.md says") {
  CHECK(offsetof(shm::Header, magic) == 0);
  CHECK(offsetof(shm::Header, ready) == 96);
  CHECK(offsetof(shm::Header, clock_unix_ns) == 128);
  CHECK(offsetof(shm::Header, ledger_tail) == 192);
  CHECK(offsetof(shm::Header, ledger_head) == 256);
  CHECK(offsetof(shm::Header, kill) == 320);
  CHECK(sizeof(shm::BudgetSlot) == 320);
  CHECK(sizeof(shm::ModelSlot) == 256);
  CHECK(sizeof(shm::ReservationSlot) == 1088);
  CHECK(sizeof(shm::RuleDef) == 256);
  CHECK(sizeof(shm::RuleSlot) == 448);
  CHECK(sizeof(shm::LedgerSlot) == 1024);
  CHECK(shm::kMagic == 0x3145535546'4e4b54ull);   // "TKNFUSE1" in little-endian bytes
}

TEST_CASE("region: reservation ids carry a generation, so a stale id never settles a reused slot") {
  TestRegion t(16);
  Reservation first;
  REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 10, 0, 0}, &first).allowed());
  REQUIRE(t.client->release(first).allowed());
  // Fill every slot so the released one is reused.
  std::vector<Reservation> all(16);
  for (auto& r : all) REQUIRE(t.client->reserve({"acme", "gpt-4o", {}, {}, 10, 0, 0}, &r).allowed());
  Reservation extra;
  CHECK(t.client->reserve({"acme", "gpt-4o", {}, {}, 10, 0, 0}, &extra).code == Code::kCapacityExhausted);
  CHECK(t.client->commit(first, "o", 10, 0).code == Code::kUnknownReservation);
  for (auto& r : all) CHECK(t.client->commit(r, "o", 10, 0).allowed());
}
