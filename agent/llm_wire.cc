#include "llm_wire.h"

#include <tokenfuse/money.hpp>

#include <cmath>
#include <utility>

namespace tokenfuse::proxy {

using nlohmann::json;

namespace {

constexpr std::size_t kMaxDepth = 128;   // deeper requests are refused, never recursed into

// A token count the upstream reports: a whole number from 0 to kMaxTokensPerCall, or nullopt.
std::optional<std::int64_t> tokens(const json& j, const char* key) {
  if (!j.is_object()) return std::nullopt;
  const auto it = j.find(key);
  if (it == j.end()) return std::nullopt;
  std::int64_t v = -1;
  if (it->is_number_unsigned()) {
    const std::uint64_t u = it->get<std::uint64_t>();
    v = u > static_cast<std::uint64_t>(kMaxTokensPerCall) ? -1 : static_cast<std::int64_t>(u);
  } else if (it->is_number_integer()) {
    v = it->get<std::int64_t>();
  }
  if (v < 0 || v > kMaxTokensPerCall) return std::nullopt;
  return v;
}

std::optional<std::int64_t> add(std::optional<std::int64_t> a, std::optional<std::int64_t> b) {
  if (!a) return b;
  if (!b) return a;
  return std::min(*a + *b, kMaxTokensPerCall);
}

std::string stringAt(const json& j, const char* key) {
  if (!j.is_object()) return {};
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

const json& at(const json& j, const char* key) {
  static const json kNull;
  if (!j.is_object()) return kNull;
  const auto it = j.find(key);
  return it == j.end() ? kNull : *it;
}

// Calls visit(key, parent key, string) for every string in `body`, walking without recursion;
// throws WireError beyond kMaxDepth. Array elements take their array's key, and its parent's.
template <typename Visit>
void forEachString(const json& body, Visit&& visit) {
  // One frame per open container, holding its position: memory grows with the depth (at most
  // kMaxDepth), not with the number of elements.
  struct Frame {
    const json* container;
    json::const_iterator next;
    std::string_view key, parent;   // the container's key, and its parent's
  };
  if (body.is_string()) return visit(std::string_view(), std::string_view(), body.get_ref<const std::string&>());
  if (!body.is_structured()) return;
  std::vector<Frame> stack{{&body, body.cbegin(), {}, {}}};
  while (!stack.empty()) {
    Frame& f = stack.back();
    if (f.next == f.container->cend()) {
      stack.pop_back();
      continue;
    }
    const json::const_iterator it = f.next++;
    // Array elements take their array's key, and its parent's.
    const std::string_view key = f.container->is_object() ? std::string_view(it.key()) : f.key;
    const std::string_view parent = f.container->is_object() ? f.key : f.parent;
    if (it->is_string()) {
      visit(key, parent, it->get_ref<const std::string&>());
    } else if (it->is_structured()) {
      if (stack.size() >= kMaxDepth) throw WireError{"body", "is nested more than 128 deep"};
      stack.push_back({&*it, it->cbegin(), key, parent});
    }
  }
}

bool metadataKey(std::string_view key) {
  for (std::string_view k : {"model", "role", "type", "id", "object", "tool_call_id", "encoding_format", "keep_alive",
                             "user", "service_tier", "finish_reason", "stop_reason", "done_reason", "created_at",
                             "system_fingerprint"}) {
    if (key == k) return true;
  }
  return false;
}

// Sums the prompt's text and counts its images.
void measureText(const json& body, RequestFacts& f) {
  forEachString(body, [&f](std::string_view key, std::string_view parent, const std::string& s) {
    const bool image = s.starts_with("data:") || key == "images" || (key == "url" && parent == "image_url") ||
                       (key == "data" && parent == "source") || key == "image_url";
    if (image) {
      ++f.images;
    } else if (!metadataKey(key)) {
      f.text_bytes += static_cast<std::int64_t>(s.size());
    }
  });
}

// The request's own completion limit: the first of `keys` that is a whole number >= 0.
std::optional<std::int64_t> limitOf(const json& j, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    const auto it = j.find(k);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_number_integer()) throw WireError{k, "must be a whole number"};
    const std::int64_t v = it->get<std::int64_t>();
    if (v < 0) return std::nullopt;   // Ollama's num_predict -1 (no limit) and -2 (fill the context)
    return std::min(v, kMaxTokensPerCall);
  }
  return std::nullopt;
}

std::int64_t countOf(const json& j) { return j.is_array() ? static_cast<std::int64_t>(j.size()) : j.is_null() ? 0 : 1; }

// "/v1/models" or "/v1/models/<one id>": nothing else, so that no path such as
// "/v1/models/../files" reaches another of the upstream's endpoints with the operator's key.
bool modelsPath(std::string_view path) {
  if (path == "/v1/models") return true;
  if (!path.starts_with("/v1/models/")) return false;
  const std::string_view id = path.substr(11);
  return !id.empty() && id != "." && id != ".." &&
         id.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-") == std::string_view::npos;
}

}  // namespace

std::optional<Route> route(std::string_view kind, std::string_view method, std::string_view path) {
  const bool openai = kind == "openai" || kind == "ollama";
  if (method == "GET") {
    if (openai && modelsPath(path)) return Route{Endpoint::kModels, Family::kOpenAi, false};
    if (kind == "anthropic" && modelsPath(path)) return Route{Endpoint::kModels, Family::kAnthropic, false};
    if (kind == "ollama" && path == "/api/tags") return Route{Endpoint::kOllamaTags, Family::kOllama, false};
    return std::nullopt;
  }
  if (method != "POST") return std::nullopt;
  if (openai) {
    if (path == "/v1/chat/completions") return Route{Endpoint::kChatCompletions, Family::kOpenAi, true};
    if (path == "/v1/completions") return Route{Endpoint::kCompletions, Family::kOpenAi, true};
    if (path == "/v1/embeddings") return Route{Endpoint::kEmbeddings, Family::kOpenAi, true};
    if (path == "/v1/responses") return Route{Endpoint::kResponses, Family::kOpenAi, true};
  }
  if (kind == "anthropic" && path == "/v1/messages") return Route{Endpoint::kMessages, Family::kAnthropic, true};
  if (kind == "ollama") {
    if (path == "/api/chat") return Route{Endpoint::kOllamaChat, Family::kOllama, true};
    if (path == "/api/generate") return Route{Endpoint::kOllamaGenerate, Family::kOllama, true};
    if (path == "/api/embed") return Route{Endpoint::kOllamaEmbed, Family::kOllama, true};
  }
  return std::nullopt;
}

Family familyOf(std::string_view kind, std::string_view path) {
  if (kind == "anthropic") return Family::kAnthropic;
  if (kind == "ollama" && path.starts_with("/api/")) return Family::kOllama;
  return Family::kOpenAi;
}

RequestFacts inspect(Endpoint endpoint, const json& body) {
  if (!body.is_object()) throw WireError{"body", "must be a JSON object"};
  RequestFacts f;
  const auto model = body.find("model");
  if (model == body.end() || !model->is_string() || model->get_ref<const std::string&>().empty()) {
    throw WireError{"model", "is required (a non-empty string)"};
  }
  f.model = model->get<std::string>();
  if (f.model.size() > 128) throw WireError{"model", "may be at most 128 bytes"};
  const bool ollama = endpoint == Endpoint::kOllamaChat || endpoint == Endpoint::kOllamaGenerate;
  if (const auto s = body.find("stream"); s != body.end() && !s->is_null()) {
    if (!s->is_boolean()) throw WireError{"stream", "must be true or false"};
    f.stream = s->get<bool>();
  } else {
    f.stream = ollama;   // Ollama streams unless told not to
  }
  measureText(body, f);
  // How many answers the request asks for: servers that coerce "8" or 8.0 would generate 8.
  auto multiplier = [&body](const char* key) -> std::int64_t {
    const auto it = body.find(key);
    if (it == body.end() || it->is_null()) return 1;
    if (!it->is_number_integer() || it->get<std::int64_t>() < 1 || it->get<std::int64_t>() > 128) {
      throw WireError{key, "must be a whole number from 1 to 128"};
    }
    return it->get<std::int64_t>();
  };
  std::int64_t n = multiplier("n");
  switch (endpoint) {
    case Endpoint::kChatCompletions:
      f.parts = countOf(at(body, "messages"));
      f.max_completion = limitOf(body, {"max_completion_tokens", "max_tokens"});
      break;
    case Endpoint::kCompletions:
      f.parts = countOf(at(body, "prompt"));
      f.max_completion = limitOf(body, {"max_tokens"});
      n = std::max(n, multiplier("best_of"));
      break;
    case Endpoint::kResponses:
      // A background response is generated after the answer, where no stream can be cut and no
      // usage is reported: not proxied.
      if (const auto bg = body.find("background"); bg != body.end() && !(bg->is_boolean() && !bg->get<bool>()) && !bg->is_null()) {
        throw WireError{"background", "is not supported through the tokenfuse proxy (its cost could not be held or booked)"};
      }
      f.parts = countOf(at(body, "input")) + (body.contains("instructions") ? 1 : 0);
      f.max_completion = limitOf(body, {"max_output_tokens"});
      break;
    case Endpoint::kMessages:
      f.parts = countOf(at(body, "messages")) + (body.contains("system") ? 1 : 0);
      f.max_completion = limitOf(body, {"max_tokens"});
      break;
    case Endpoint::kOllamaChat:
    case Endpoint::kOllamaGenerate:
      f.parts = endpoint == Endpoint::kOllamaChat ? countOf(at(body, "messages")) : 1;
      if (const json& options = at(body, "options"); options.is_object()) {
        f.max_completion = limitOf(options, {"num_predict"});
      }
      break;
    case Endpoint::kEmbeddings:
    case Endpoint::kOllamaEmbed:
      f.parts = countOf(at(body, "input"));
      f.max_completion = 0;
      f.stream = false;
      break;
    case Endpoint::kModels:
    case Endpoint::kOllamaTags:
      break;
  }
  if (f.max_completion) f.max_completion = std::min(*f.max_completion * n, kMaxTokensPerCall);
  return f;
}

std::int64_t estimatePromptTokens(const RequestFacts& f, double chars_per_token, std::int64_t image_tokens) {
  const double text = std::ceil(static_cast<double>(f.text_bytes) / chars_per_token);
  const double all = text + 4.0 * static_cast<double>(f.parts) + static_cast<double>(image_tokens) * static_cast<double>(f.images);
  return all >= static_cast<double>(kMaxTokensPerCall) ? kMaxTokensPerCall : static_cast<std::int64_t>(all);
}

std::optional<std::int64_t> answerTextBytes(const json& answer) {
  std::int64_t bytes = 0;
  try {
    forEachString(answer, [&bytes](std::string_view key, std::string_view, const std::string& s) {
      if (!metadataKey(key)) bytes += static_cast<std::int64_t>(s.size());
    });
  } catch (const WireError&) {
    return std::nullopt;   // nested absurdly deep: the caller counts the raw bytes
  }
  return bytes;
}

std::int64_t estimateCompletionTokens(std::int64_t text_bytes, std::int64_t text_chunks, double chars_per_token) {
  const double by_text = std::ceil(static_cast<double>(text_bytes) / chars_per_token);
  const std::int64_t t = by_text >= static_cast<double>(kMaxTokensPerCall) ? kMaxTokensPerCall : static_cast<std::int64_t>(by_text);
  return std::min(std::max(t, text_chunks), kMaxTokensPerCall);
}

UsageFacts usageOf(Endpoint endpoint, const json& r) {
  UsageFacts u;
  u.model = stringAt(r, "model");
  const json& usage = at(r, "usage");
  switch (endpoint) {
    case Endpoint::kChatCompletions:
    case Endpoint::kCompletions:
      u.prompt = tokens(usage, "prompt_tokens");
      u.completion = tokens(usage, "completion_tokens");
      break;
    case Endpoint::kEmbeddings:
      u.prompt = tokens(usage, "prompt_tokens");
      if (u.prompt) u.completion = 0;
      break;
    case Endpoint::kResponses:
      u.prompt = tokens(usage, "input_tokens");
      u.completion = tokens(usage, "output_tokens");
      break;
    case Endpoint::kMessages:
      // Cached prompt tokens are prompt tokens too (priced alike here: docs/proxy.md).
      u.prompt = add(add(tokens(usage, "input_tokens"), tokens(usage, "cache_creation_input_tokens")),
                     tokens(usage, "cache_read_input_tokens"));
      u.completion = tokens(usage, "output_tokens");
      break;
    case Endpoint::kOllamaChat:
    case Endpoint::kOllamaGenerate:
      u.prompt = tokens(r, "prompt_eval_count");
      u.completion = tokens(r, "eval_count");
      break;
    case Endpoint::kOllamaEmbed:
      u.prompt = tokens(r, "prompt_eval_count");
      if (u.prompt) u.completion = 0;
      break;
    case Endpoint::kModels:
    case Endpoint::kOllamaTags:
      break;
  }
  return u;
}

bool StreamSplitter::feed(std::string_view bytes) {
  if (start_ > 0 && start_ >= buffer_.size() / 2) {   // drop what was handed out
    buffer_.erase(0, start_);
    start_ = 0;
  }
  buffer_.append(bytes);
  return pending() <= max_event_ || next_end() != std::string::npos;
}

std::size_t StreamSplitter::next_end() const {
  if (format_ == Format::kNdjson) {
    const std::size_t nl = buffer_.find('\n', start_);
    return nl == std::string::npos ? nl : nl + 1;
  }
  // An event ends at a blank line: "\n\n", "\r\n\r\n" or "\r\r" (and mixes of them).
  for (std::size_t i = start_; i < buffer_.size(); ++i) {
    const char c = buffer_[i];
    if (c != '\n' && c != '\r') continue;
    std::size_t j = i + 1;
    if (c == '\r' && j < buffer_.size() && buffer_[j] == '\n') ++j;
    if (j < buffer_.size() && (buffer_[j] == '\n' || buffer_[j] == '\r')) {
      std::size_t k = j + 1;
      if (buffer_[j] == '\r') {
        if (k >= buffer_.size()) return std::string::npos;   // "\r" then maybe "\n": wait
        if (buffer_[k] == '\n') ++k;
      }
      return k;
    }
  }
  return std::string::npos;
}

std::optional<std::string> StreamSplitter::next() {
  const std::size_t end = next_end();
  if (end == std::string::npos) return std::nullopt;
  std::string event = buffer_.substr(start_, end - start_);
  start_ = end;
  return event;
}

StreamEvent parseEvent(StreamSplitter::Format format, std::string_view raw) {
  StreamEvent e;
  if (format == StreamSplitter::Format::kNdjson) {
    while (!raw.empty() && (raw.back() == '\n' || raw.back() == '\r')) raw.remove_suffix(1);
    e.data = std::string(raw);
    return e;
  }
  bool first_data = true;
  while (!raw.empty()) {
    std::size_t eol = raw.find_first_of("\r\n");
    std::string_view line = raw.substr(0, eol);
    raw = eol == std::string_view::npos ? std::string_view() : raw.substr(eol + 1);
    if (line.empty() || line.front() == ':') continue;   // blank, or a comment
    const std::size_t colon = line.find(':');
    std::string_view field = line.substr(0, colon);
    std::string_view value = colon == std::string_view::npos ? std::string_view() : line.substr(colon + 1);
    if (value.starts_with(' ')) value.remove_prefix(1);
    if (field == "event") {
      e.name = std::string(value);
    } else if (field == "data") {
      if (!first_data) e.data += '\n';
      e.data += value;
      first_data = false;
    }
  }
  e.done_marker = e.data == "[DONE]";
  return e;
}

StreamSplitter::Format streamFormat(Endpoint endpoint) {
  return endpoint == Endpoint::kOllamaChat || endpoint == Endpoint::kOllamaGenerate ? StreamSplitter::Format::kNdjson
                                                                                      : StreamSplitter::Format::kSse;
}

EventFacts interpret(Endpoint endpoint, const StreamEvent& event) {
  EventFacts f;
  if (event.done_marker) {
    f.final = true;
    return f;
  }
  if (event.data.empty()) return f;
  const json j = json::parse(event.data, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    f.error = true;   // not a stream this API sends
    return f;
  }
  // Every string of a generated part (text, tool-call arguments, audio transcripts, refusals,
  // thinking, fields this code does not know yet), but not ids, roles and types: whatever a
  // client receives is charged. Nested beyond belief: the raw event's size.
  const std::int64_t raw_size = static_cast<std::int64_t>(event.data.size());
  auto generated = [&f, raw_size](const json& part) {
    std::int64_t bytes = 0;
    try {
      forEachString(part, [&bytes](std::string_view key, std::string_view, const std::string& s) {
        if (!metadataKey(key) && key != "name" && key != "stop_reason" && key != "index") bytes += static_cast<std::int64_t>(s.size());
      });
    } catch (const WireError&) {
      bytes = raw_size;
    }
    if (bytes > 0) {
      f.text_bytes += bytes;
      f.carries_text = true;
    }
  };
  switch (endpoint) {
    case Endpoint::kChatCompletions:
    case Endpoint::kCompletions: {
      if (j.contains("error")) {
        f.error = true;
        return f;
      }
      const json& choices = at(j, "choices");
      if (choices.is_array()) {
        for (const json& c : choices) {
          generated(at(c, "text"));
          generated(at(c, "delta"));
          // The answer is over once a choice says why, even from a server that sends no [DONE].
          if (const json& why = at(c, "finish_reason"); why.is_string() && !why.get_ref<const std::string&>().empty()) {
            f.final = true;
          }
        }
      }
      if (const json& usage = at(j, "usage"); usage.is_object()) {
        f.usage = usageOf(endpoint, j);
        f.usage_only = !choices.is_array() || choices.empty();
      }
      f.usage.model = stringAt(j, "model");
      break;
    }
    case Endpoint::kResponses: {
      const std::string type = stringAt(j, "type");
      if (type == "error" || type == "response.failed") f.error = true;
      if (type.ends_with(".delta")) generated(at(j, "delta"));
      if (type == "response.completed" || type == "response.incomplete") {
        f.usage = usageOf(endpoint, at(j, "response"));
        f.final = true;
      }
      break;
    }
    case Endpoint::kMessages: {
      const std::string type = stringAt(j, "type");
      if (event.name == "error" || type == "error") {
        f.error = true;
      } else if (type == "message_start") {
        f.usage = usageOf(endpoint, at(j, "message"));
        f.usage.completion.reset();   // the first count, not the answer's
      } else if (type == "content_block_delta") {
        generated(at(j, "delta"));
      } else if (type == "content_block_start") {
        generated(at(j, "content_block"));   // a block may start with content of its own
      } else if (type == "message_delta") {
        f.usage.completion = tokens(at(j, "usage"), "output_tokens");
        const json& usage = at(j, "usage");
        if (usage.contains("input_tokens")) f.usage.prompt = usageOf(endpoint, j).prompt;
      } else if (type == "message_stop") {
        f.final = true;
      }
      break;
    }
    case Endpoint::kOllamaChat:
    case Endpoint::kOllamaGenerate: {
      if (j.contains("error")) {
        f.error = true;
        return f;
      }
      generated(at(j, "message"));
      generated(at(j, "response"));
      generated(at(j, "thinking"));
      if (const auto done = j.find("done"); done != j.end() && done->is_boolean() && done->get<bool>()) {
        f.final = true;
        f.usage = usageOf(endpoint, j);
      }
      f.usage.model = stringAt(j, "model");
      break;
    }
    case Endpoint::kEmbeddings:
    case Endpoint::kOllamaEmbed:
    case Endpoint::kModels:
    case Endpoint::kOllamaTags:
      break;
  }
  return f;
}

ErrorReply errorReply(Family family, std::string_view kind, std::string_view code, std::string_view message) {
  ErrorReply r;
  const std::string text = code.empty() ? std::string(message) : std::string(code) + ": " + std::string(message);
  const bool budget = kind == "budget", rate = kind == "rate";
  r.status = budget || rate        ? 429
             : kind == "auth"      ? 401
             : kind == "not_found" ? 404
             : kind == "upstream"  ? 502
             : kind == "timeout"   ? 504
             : kind == "unavailable" ? 503
             : kind == "too_large" ? 413
                                   : 400;
  const json code_json = code.empty() ? json(nullptr) : json(std::string(code));
  switch (family) {
    case Family::kOpenAi: {
      const char* type = budget ? "insufficient_quota"
                         : rate ? "rate_limit_exceeded"
                         : (r.status == 502 || r.status == 503) ? "api_error"
                         : r.status == 504 ? "timeout"
                                           : "invalid_request_error";
      const json body{{"error", {{"message", text}, {"type", type}, {"param", nullptr}, {"code", code_json}}}};
      r.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
      r.stream_event = "data: " + r.body + "\n\n";
      break;
    }
    case Family::kAnthropic: {
      // Anthropic's convention: 402 billing_error when spending is refused, 429 for rate limits.
      if (budget) r.status = 402;
      const char* type = budget ? "billing_error"
                         : rate ? "rate_limit_error"
                         : r.status == 401 ? "authentication_error"
                         : r.status == 404 ? "not_found_error"
                         : r.status == 413 ? "request_too_large"
                         : r.status == 504 ? "timeout_error"
                         : r.status == 503 ? "overloaded_error"
                         : r.status == 502 ? "api_error"
                                           : "invalid_request_error";
      const json body{{"type", "error"}, {"error", {{"type", type}, {"message", text}, {"code", code_json}}}};
      r.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
      r.stream_event = "event: error\ndata: " + r.body + "\n\n";
      break;
    }
    case Family::kOllama: {
      const json body{{"error", text}, {"code", code_json}};
      r.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
      r.stream_event = r.body + "\n";
      break;
    }
  }
  return r;
}

}  // namespace tokenfuse::proxy
