// Exact money for the budget path. No floating point anywhere: an amount is a whole number of
// nano-USD (1e-9 USD), and a price is a whole number of nano-USD per million tokens.
//
// Thread-safety: value types; safe to use from any thread.
#pragma once

#include <tokenfuse/export.h>

#include <compare>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tokenfuse {

inline constexpr std::int64_t kNanosPerUsd = 1'000'000'000;

// An amount of money in nano-USD. int64 holds up to about 9.2 billion USD.
class NanoUsd {
 public:
  constexpr NanoUsd() noexcept = default;
  constexpr explicit NanoUsd(std::int64_t nanos) noexcept : nanos_(nanos) {}

  static constexpr NanoUsd fromWholeUsd(std::int64_t usd) noexcept { return NanoUsd(usd * kNanosPerUsd); }

  constexpr std::int64_t count() const noexcept { return nanos_; }

  friend constexpr auto operator<=>(NanoUsd, NanoUsd) noexcept = default;
  friend constexpr NanoUsd operator+(NanoUsd a, NanoUsd b) noexcept { return NanoUsd(a.nanos_ + b.nanos_); }
  friend constexpr NanoUsd operator-(NanoUsd a, NanoUsd b) noexcept { return NanoUsd(a.nanos_ - b.nanos_); }
  constexpr NanoUsd& operator+=(NanoUsd o) noexcept { nanos_ += o.nanos_; return *this; }

  // Decimal USD with at least six and at most nine fraction digits, exact: "0.012000",
  // "0.000000075", "-1.500000". Allocates; not for the hot path.
  TOKENFUSE_EXPORT std::string toString() const;

  // Parses a non-negative decimal USD amount such as "5", "5.00" or "0.000000075".
  // Returns nullopt and sets *error (if given) when the text is not such a number, has more than
  // nine fraction digits, or does not fit.
  TOKENFUSE_EXPORT static std::optional<NanoUsd> parse(std::string_view usd, std::string* error = nullptr);

 private:
  std::int64_t nanos_ = 0;
};

// A model's price in nano-USD per million tokens, separately for prompt and completion tokens.
// $3.00 per million tokens is 3'000'000'000.
struct Price {
  std::int64_t prompt_nano_per_mtok = 0;
  std::int64_t completion_nano_per_mtok = 0;

  constexpr bool isFree() const noexcept { return prompt_nano_per_mtok == 0 && completion_nano_per_mtok == 0; }
  friend constexpr bool operator==(const Price&, const Price&) noexcept = default;
};

// The largest token count one call may name, and the highest price a model may have ($1M per
// million tokens). Together they keep every cost below 2^63 nano-USD, so no cost can overflow;
// anything above them is rejected as invalid input.
inline constexpr std::int64_t kMaxTokensPerCall = std::int64_t{1} << 32;
inline constexpr std::int64_t kMaxPriceNanoPerMtok = 1'000'000 * kNanosPerUsd;

// Cost of a call: ceil((prompt * prompt_rate + completion * completion_rate) / 1e6) nano-USD.
// Rounds up, so rounding never lets spending slip past a limit. Returns nullopt when a token
// count is negative or above kMaxTokensPerCall, or a rate is negative or above
// kMaxPriceNanoPerMtok.
TOKENFUSE_EXPORT std::optional<NanoUsd> costOf(Price price, std::int64_t prompt_tokens,
                                               std::int64_t completion_tokens) noexcept;

}  // namespace tokenfuse
