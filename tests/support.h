// Test fixtures: a private region per test, owned by the test as tokenfused would own it.
#pragma once

#include "region_admin.h"
#include "engine.h"
#include "pricing.h"
#include "region.h"

#include <tokenfuse/tokenfuse.hpp>

#include <doctest/doctest.h>
#include "printers.h"
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

namespace tokenfuse::test {

inline std::string uniqueName(const char* what) {
  static std::atomic<int> counter{0};
  return std::string("tf-test-") + what + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

inline std::int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

inline NanoUsd usd(const char* text) { return *NanoUsd::parse(text); }

// A published region with the reference's prices, like a freshly started tokenfused.
struct TestRegion {
  explicit TestRegion(std::uint32_t capacity = 1024, const char* what = "region", std::uint32_t ledger = 4096) {
    spec.shm_name = uniqueName(what);
    spec.tenant_capacity = capacity;
    spec.run_capacity = capacity;
    spec.model_capacity = 64;
    spec.reservation_capacity = capacity;
    spec.ledger_capacity = ledger;
    spec.rule_capacity = capacity;
    const Status s = Region::create(spec, &region);
    REQUIRE_MESSAGE(s.ok(), s.message());
    admin = std::make_unique<RegionAdmin>(*region);
    REQUIRE(admin->setFallbackPrice({3'000'000'000, 15'000'000'000}).ok());
    for (const auto& [model, price] : referencePrices()) REQUIRE(admin->setPrice(model, price).ok());
    admin->publish(nowNs(), 20'000);
    std::unique_ptr<Client> c;
    const Status a = Client::attach({spec.shm_name}, &c);
    REQUIRE_MESSAGE(a.ok(), a.message());
    client = std::move(c);
  }
  ~TestRegion() {
    client.reset();
    admin.reset();
    region.reset();
    Region::remove(spec.shm_name);
  }
  Engine& engine() { return admin->engine(); }

  RegionSpec spec;
  std::unique_ptr<Region> region;
  std::unique_ptr<RegionAdmin> admin;
  std::unique_ptr<Client> client;
};

}  // namespace tokenfuse::test
