// CallSite is opaque: an application keeps it and hands it back, and cannot read or set the slot
// indices behind it (they are not part of the ABI). Only lib/src, and these tests through it,
// see what prepare found.
#include "engine.h"
#include "support.h"

#include <doctest/doctest.h>

#include <type_traits>

using namespace tokenfuse;
using namespace tokenfuse::test;

// Compile-time: with the fields public (and the markers in the public header) these concepts
// were satisfied, and the file would not build.
template <typename T> concept ReadsTenant = requires(T s) { s.tenant; };
template <typename T> concept ReadsRun = requires(T s) { s.run; };
template <typename T> concept ReadsModel = requires(T s) { s.model; };
template <typename T> concept NamesMarkers = requires { T::kNone; };
static_assert(!ReadsTenant<CallSite> && !ReadsRun<CallSite> && !ReadsModel<CallSite>);
static_assert(!NamesMarkers<CallSite>);
static_assert(!std::is_aggregate_v<CallSite>);
static_assert(std::is_trivially_copyable_v<CallSite>);
static_assert(sizeof(CallSite) == 824);

TEST_CASE("call site: opaque to callers, yet prepare still finds the tenant, run and model it names") {
  TestRegion t;
  CallSite site;
  REQUIRE(t.client->prepare({"acme", "gpt-4o", "run-1", {}, 0, 0, 0}, &site).allowed());
  const SiteIndices found = siteIndices(site);
  CHECK(found.tenant >= 0);
  CHECK(found.run >= 0);
  CHECK(found.model >= 0);

  // No run given, and a model without a price: the markers, not indices.
  CallSite bare;
  REQUIRE(t.client->prepare({"acme", "no-such-model", {}, {}, 0, 0, 0}, &bare).allowed());
  CHECK(siteIndices(bare).tenant == found.tenant);
  CHECK(siteIndices(bare).run == site_index::kNone);
  CHECK(siteIndices(bare).model == site_index::kNone);

  // A copy is as good as the original: the value is all there is.
  const CallSite copy = site;
  Reservation r;
  REQUIRE(t.client->reserve(copy, 100, 0, &r).allowed());
  CHECK(t.client->release(r).allowed());
  CHECK(t.client->check(copy, 100).allowed());
}
