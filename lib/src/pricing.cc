#include "pricing.h"

namespace tokenfuse {

std::vector<std::pair<std::string_view, Price>> referencePrices() {
  constexpr std::int64_t k = 1'000;   // nano-USD per Mtok in one micro-USD per Mtok
  return {
      {"claude-opus-4-7", {15'000'000 * k, 75'000'000 * k}},
      {"claude-sonnet-4-6", {3'000'000 * k, 15'000'000 * k}},
      {"claude-haiku-4-5", {800'000 * k, 4'000'000 * k}},
      {"gpt-4o", {5'000'000 * k, 15'000'000 * k}},
      {"gpt-4o-mini", {150'000 * k, 600'000 * k}},
      {"gemini-2.0-flash", {75'000 * k, 300'000 * k}},
      {"deepseek-r1:14b", {0, 0}},   // local Ollama: free
      {"qwen3:8b", {0, 0}},          // local Ollama: free
  };
}

}  // namespace tokenfuse
