// Fixtures for driving the agent in-process with an injected clock.
#pragma once

#include "agent.h"
#include "config.h"
#include "ledger.h"
#include "ledger_writer.h"
#include "log.h"

#include "support.h"

#include <filesystem>

namespace tokenfuse::test {

struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/tokenfuse-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

// A settable clock shared by the test and the agent.
struct FakeClock {
  std::chrono::system_clock::time_point now;
  Agent::Clock fn() {
    return [this] { return now; };
  }
};

inline std::chrono::system_clock::time_point utc(const char* iso8601) {
  std::tm tm{};
  REQUIRE(::strptime(iso8601, "%Y-%m-%dT%H:%M:%SZ", &tm) != nullptr);
  return std::chrono::system_clock::from_time_t(::timegm(&tm));
}

inline Config testConfig(const TempDir& dir, const char* what = "agent") {
  log::init("error");
  Config c = defaultConfig();
  c.shm_name = uniqueName(what);
  c.data_dir = dir.path;
  c.tenant_capacity = c.run_capacity = c.reservation_capacity = 256;
  c.model_capacity = 64;
  return c;
}

// Removes the agent's region when the test ends, whatever happened.
struct RegionCleanup {
  std::string name;
  ~RegionCleanup() { Region::remove(name); }
};

inline std::unique_ptr<Client> attachClient(const std::string& name) {
  std::unique_ptr<Client> c;
  const Status s = Client::attach({name}, &c);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return c;
}

// A region with the agent's ledger writer beside it, driven by hand (drainOnce).
struct LedgerFixture {
  explicit LedgerFixture(std::uint32_t ring = 4096) : t(64, "ledger", ring) {
    log::init("error");
    ledger = std::make_unique<Ledger>(dir.path + "/ledger.db", "host-a");
    writer = std::make_unique<LedgerWriter>(*t.admin, *ledger, "host-a",
                                            LedgerWriter::Options{65536, std::chrono::milliseconds(5),
                                                                  std::chrono::milliseconds(200)});
  }
  TempDir dir;
  TestRegion t;
  std::unique_ptr<Ledger> ledger;
  std::unique_ptr<LedgerWriter> writer;
};


}  // namespace tokenfuse::test
