// The reference service's price table and fallback, which tokenfused loads into the region
// unless its config file says otherwise.
#pragma once

#include <tokenfuse/money.hpp>

#include <string_view>
#include <utility>
#include <vector>

namespace tokenfuse {

// USD per million tokens, as the reference's _COST_PER_MILLION_TOKENS, in exact nano-USD.
std::vector<std::pair<std::string_view, Price>> referencePrices();

// The reference's _DEFAULT_COST_PER_M: (3.0, 15.0), claude-sonnet's price.
inline constexpr Price kReferenceFallbackPrice{3'000'000'000, 15'000'000'000};

// Models whose name starts with this are local and free, whatever the table says.
inline constexpr std::string_view kFreeModelPrefix = "ollama/";

}  // namespace tokenfuse
