// Structured logs: one JSON object per line on stderr, with an event name in the reference's
// style (budget_tenant_warn, token_usage_recorded, ...) and the event's fields.
#pragma once

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <string>
#include <string_view>

namespace tokenfuse::log {

// Throws std::invalid_argument for a level name spdlog does not know.
void init(const std::string& level);
void event(spdlog::level::level_enum level, std::string_view name, const nlohmann::ordered_json& fields = nlohmann::ordered_json::object());

inline void info(std::string_view name, const nlohmann::ordered_json& fields = nlohmann::ordered_json::object()) {
  event(spdlog::level::info, name, fields);
}
inline void warn(std::string_view name, const nlohmann::ordered_json& fields = nlohmann::ordered_json::object()) {
  event(spdlog::level::warn, name, fields);
}
inline void error(std::string_view name, const nlohmann::ordered_json& fields = nlohmann::ordered_json::object()) {
  event(spdlog::level::err, name, fields);
}

}  // namespace tokenfuse::log
