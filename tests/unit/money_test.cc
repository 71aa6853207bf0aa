#include <tokenfuse/money.hpp>

#include "pricing.h"

#include <doctest/doctest.h>
#include "printers.h"

using tokenfuse::costOf;
using tokenfuse::NanoUsd;
using tokenfuse::Price;

namespace {
NanoUsd cost(std::string_view model, std::int64_t prompt, std::int64_t completion) {
  for (const auto& [name, price] : tokenfuse::referencePrices()) {
    if (name == model) return *costOf(price, prompt, completion);
  }
  return *costOf(tokenfuse::kReferenceFallbackPrice, prompt, completion);
}
}  // namespace

TEST_CASE("money: USD text parses exactly to nano-USD") {
  CHECK(NanoUsd::parse("5")->count() == 5'000'000'000);
  CHECK(NanoUsd::parse("5.00")->count() == 5'000'000'000);
  CHECK(NanoUsd::parse("0.1")->count() == 100'000'000);
  CHECK(NanoUsd::parse("0.000000075")->count() == 75);
  CHECK(NanoUsd::parse("9223372036.854775807")->count() == INT64_MAX);
}

TEST_CASE("money: malformed or out-of-range USD text is refused with a reason") {
  std::string why;
  for (const char* bad : {"", "-1", "1.", ".5", "abc", "1,5", "1e3", " 1", "0x10"}) {
    CAPTURE(bad);
    CHECK_FALSE(NanoUsd::parse(bad, &why).has_value());
    CHECK(why.find("USD") != std::string::npos);
  }
  CHECK_FALSE(NanoUsd::parse("1.0000000001", &why));
  CHECK(why.find("nine fraction digits") != std::string::npos);
  CHECK_FALSE(NanoUsd::parse("9223372037", &why));
  CHECK(why.find("too large") != std::string::npos);
}

TEST_CASE("money: amounts print exactly with six to nine fraction digits") {
  CHECK(NanoUsd(12'000'000).toString() == "0.012000");
  CHECK(NanoUsd(75).toString() == "0.000000075");
  CHECK(NanoUsd(1'500'000'000).toString() == "1.500000");
  CHECK(NanoUsd(-1'500'000'000).toString() == "-1.500000");
  CHECK(NanoUsd(INT64_MIN).toString() == "-9223372036.854775808");
}

TEST_CASE("pricing: costs match the reference's estimate_cost") {
  // Expected values are the reference's Decimal results for the same calls.
  CHECK(cost("gpt-4o", 1000, 500) == *NanoUsd::parse("0.0125"));
  CHECK(cost("claude-sonnet-4-6", 4000, 0) == *NanoUsd::parse("0.012"));   // the default check estimate
  CHECK(cost("claude-opus-4-7", 10'000, 2'000) == *NanoUsd::parse("0.3"));
  CHECK(cost("claude-haiku-4-5", 1'000'000, 1'000'000) == *NanoUsd::parse("4.8"));
  CHECK(cost("gpt-4o-mini", 2000, 1000) == *NanoUsd::parse("0.0009"));
  CHECK(cost("gemini-2.0-flash", 1'000'000, 0) == *NanoUsd::parse("0.075"));
  CHECK(cost("qwen3:8b", 1'000'000, 1'000'000) == NanoUsd(0));
  CHECK(cost("deepseek-r1:14b", 5000, 5000) == NanoUsd(0));
}

TEST_CASE("pricing: an unknown model costs the reference's fallback, claude-sonnet's price") {
  CHECK(cost("some-new-model", 1'000'000, 1'000'000) == NanoUsd::fromWholeUsd(18));
  CHECK(tokenfuse::kReferenceFallbackPrice == Price{3'000'000'000, 15'000'000'000});
}

TEST_CASE("pricing: sub-micro costs are kept, where the reference rounds them to zero") {
  // The reference rounds to six decimals, so one gemini token costs it $0.000000; we keep 75 n$.
  CHECK(cost("gemini-2.0-flash", 1, 0) == NanoUsd(75));
}

TEST_CASE("pricing: a fraction of a nano-USD rounds up, never down") {
  CHECK(costOf({1, 0}, 1, 0) == NanoUsd(1));
  CHECK(costOf({1'000'000, 0}, 1, 0) == NanoUsd(1));
  CHECK(costOf({1'000'001, 0}, 1, 0) == NanoUsd(2));
  CHECK(costOf({0, 0}, 5, 5) == NanoUsd(0));
}

TEST_CASE("pricing: out-of-range tokens and prices are refused, and the largest legal cost fits") {
  CHECK_FALSE(costOf({1, 1}, -1, 0));
  CHECK_FALSE(costOf({1, 1}, 0, -1));
  CHECK_FALSE(costOf({1, 1}, tokenfuse::kMaxTokensPerCall + 1, 0));
  CHECK_FALSE(costOf({-1, 1}, 1, 0));
  CHECK_FALSE(costOf({tokenfuse::kMaxPriceNanoPerMtok + 1, 0}, 1, 0));
  const auto most = costOf({tokenfuse::kMaxPriceNanoPerMtok, tokenfuse::kMaxPriceNanoPerMtok},
                           tokenfuse::kMaxTokensPerCall, tokenfuse::kMaxTokensPerCall);
  REQUIRE(most.has_value());
  CHECK(most->count() == 2 * tokenfuse::kMaxTokensPerCall * (tokenfuse::kMaxPriceNanoPerMtok / 1'000'000));
}
