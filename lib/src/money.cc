#include <tokenfuse/money.hpp>

#include <charconv>
#include <limits>

namespace tokenfuse {


std::string NanoUsd::toString() const {
  const bool negative = nanos_ < 0;
  // Work in unsigned so that INT64_MIN has a magnitude.
  const std::uint64_t mag = negative ? 0 - static_cast<std::uint64_t>(nanos_) : static_cast<std::uint64_t>(nanos_);
  const std::uint64_t whole = mag / kNanosPerUsd;
  std::uint64_t frac = mag % kNanosPerUsd;
  char digits[10] = "000000000";
  for (int i = 8; i >= 0; --i) {
    digits[i] = static_cast<char>('0' + frac % 10);
    frac /= 10;
  }
  int len = 9;
  while (len > 6 && digits[len - 1] == '0') --len;
  std::string out = negative ? "-" : "";
  out += std::to_string(whole);
  out += '.';
  out.append(digits, static_cast<std::size_t>(len));
  return out;
}

std::optional<NanoUsd> NanoUsd::parse(std::string_view text, std::string* error) {
  auto fail = [&](const char* why) -> std::optional<NanoUsd> {
    if (error != nullptr) *error = "'" + std::string(text) + "' " + why;
    return std::nullopt;
  };
  if (text.empty()) return fail("is empty: write a USD amount such as \"5.00\"");
  const auto dot = text.find('.');
  const std::string_view whole = text.substr(0, dot);
  const std::string_view frac = dot == std::string_view::npos ? std::string_view{} : text.substr(dot + 1);
  auto all_digits = [](std::string_view s) {
    for (char c : s) if (c < '0' || c > '9') return false;
    return true;
  };
  if (whole.empty() || !all_digits(whole) || !all_digits(frac) || (dot != std::string_view::npos && frac.empty())) {
    return fail("is not a non-negative decimal USD amount such as \"5.00\"");
  }
  if (frac.size() > 9) return fail("has more than nine fraction digits (the resolution is one nano-USD)");
  std::int64_t w = 0;
  auto [p, ec] = std::from_chars(whole.data(), whole.data() + whole.size(), w);
  (void)p;
  std::int64_t nanos = 0;
  if (ec != std::errc{} || __builtin_mul_overflow(w, kNanosPerUsd, &nanos)) {
    return fail("is too large (the most is 9223372036 USD)");
  }
  std::int64_t f = 0;
  for (std::size_t i = 0; i < 9; ++i) f = f * 10 + (i < frac.size() ? frac[i] - '0' : 0);
  if (__builtin_add_overflow(nanos, f, &nanos)) return fail("is too large (the most is 9223372036 USD)");
  return NanoUsd(nanos);
}

std::optional<NanoUsd> costOf(Price price, std::int64_t prompt_tokens, std::int64_t completion_tokens) noexcept {
  if (prompt_tokens < 0 || completion_tokens < 0 || prompt_tokens > kMaxTokensPerCall ||
      completion_tokens > kMaxTokensPerCall || price.prompt_nano_per_mtok < 0 ||
      price.completion_nano_per_mtok < 0 || price.prompt_nano_per_mtok > kMaxPriceNanoPerMtok ||
      price.completion_nano_per_mtok > kMaxPriceNanoPerMtok) {
    return std::nullopt;
  }
  // tokens * rate / 1e6 without 128-bit division (a library call on x86-64): split each rate
  // into whole nano-USD per token and the remainder. Within the bounds above every product fits:
  // tokens * whole <= 2^32 * 1e9 < 2^62, tokens * remainder < 2^32 * 1e6 < 2^52, and the sum
  // of all four terms stays below 2^63.
  constexpr std::int64_t kPerMtok = 1'000'000;
  const std::int64_t whole = prompt_tokens * (price.prompt_nano_per_mtok / kPerMtok) +
                             completion_tokens * (price.completion_nano_per_mtok / kPerMtok);
  const std::int64_t rest = prompt_tokens * (price.prompt_nano_per_mtok % kPerMtok) +
                            completion_tokens * (price.completion_nano_per_mtok % kPerMtok);
  return NanoUsd(whole + (rest + kPerMtok - 1) / kPerMtok);   // round up to a whole nano-USD
}

}  // namespace tokenfuse
