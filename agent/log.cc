#include "log.h"

#include <spdlog/sinks/stdout_sinks.h>

#include <stdexcept>

namespace tokenfuse::log {

void init(const std::string& level) {
  spdlog::drop("tokenfused");
  auto logger = spdlog::stderr_logger_mt("tokenfused");
  // The message is the tail of a JSON object; spdlog supplies the head.
  logger->set_pattern(R"({"ts":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l",%v})", spdlog::pattern_time_type::utc);
  const auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") throw std::invalid_argument("unknown log level '" + level + "'");
  logger->set_level(lvl);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(logger);
}

void event(spdlog::level::level_enum level, std::string_view name, const nlohmann::ordered_json& fields) {
  if (!spdlog::default_logger_raw()->should_log(level)) return;
  nlohmann::ordered_json body = {{"event", name}};
  body.update(fields);
  std::string text = body.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  // Drop the braces: the pattern wraps the fields in the record's own object.
  spdlog::log(level, "{}", std::string_view(text).substr(1, text.size() - 2));
}

}  // namespace tokenfuse::log
