// What the proxy knows of the LLM wire APIs it serves (docs/proxy.md): OpenAI's (which vLLM,
// llama.cpp's server, LM Studio and Ollama's /v1 also speak), Anthropic's Messages API and
// Ollama's native API. Pure functions over parsed JSON and bytes, with no I/O, so that each
// format is tested on the providers' published examples (tests/unit/llm_wire_test.cc).
//
// Thread-safety: free functions are thread-safe; a StreamSplitter belongs to one stream.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tokenfuse::proxy {

// The API family a client speaks, which fixes the shape of errors and streams.
enum class Family { kOpenAi, kAnthropic, kOllama };

enum class Endpoint {
  kChatCompletions,   // POST /v1/chat/completions
  kCompletions,       // POST /v1/completions
  kEmbeddings,        // POST /v1/embeddings
  kResponses,         // POST /v1/responses
  kModels,            // GET /v1/models (and /v1/models/{id}): passed through, not metered
  kMessages,          // POST /v1/messages (Anthropic)
  kOllamaChat,        // POST /api/chat
  kOllamaGenerate,    // POST /api/generate
  kOllamaEmbed,       // POST /api/embed
  kOllamaTags,        // GET /api/tags: passed through, not metered
};

struct Route {
  Endpoint endpoint;
  Family family;
  bool metered;   // a call that costs tokens: reserved, booked, and in the ledger
};

// The endpoint for `method` and `path` (after /proxy/<upstream>) on an upstream of `kind`
// ("openai", "anthropic" or "ollama"), or nullopt. An ollama upstream serves both Ollama's API
// and its OpenAI-compatible /v1.
std::optional<Route> route(std::string_view kind, std::string_view method, std::string_view path);
// The family whose error shape answers a path that matched no route.
Family familyOf(std::string_view kind, std::string_view path);

// A request body's facts that decide its reservation.
struct RequestFacts {
  std::string model;
  bool stream = false;
  std::optional<std::int64_t> max_completion;   // from the request's own limit (times n), if any
  std::int64_t text_bytes = 0;                  // of the prompt's text
  std::int64_t parts = 0;                       // messages or inputs (each costs a few tokens)
  std::int64_t images = 0;
};

// A request that cannot be forwarded: the field and what is wrong, for a 400.
struct WireError {
  std::string field;
  std::string message;
};

// Throws WireError if the body lacks a model or has fields of the wrong type.
RequestFacts inspect(Endpoint endpoint, const nlohmann::json& body);

// The estimate of a prompt's tokens (docs/proxy.md, "Estimates"): its text at
// `chars_per_token` bytes a token, rounded up, plus 4 tokens per message or input, plus
// `image_tokens` per image. Never a network call, never a tokenizer.
std::int64_t estimatePromptTokens(const RequestFacts& facts, double chars_per_token, std::int64_t image_tokens);
// The estimate of a streamed completion so far: its text at chars_per_token, but never fewer
// tokens than the chunks that carried text (a provider streams about one token a chunk).
std::int64_t estimateCompletionTokens(std::int64_t text_bytes, std::int64_t text_chunks, double chars_per_token);

// The bytes of an answer's generated text (strings other than ids, roles, model names and the
// like): what the completion estimate reads when an upstream reports no usage. nullopt for an
// answer nested too deep to walk (then count its raw bytes).
std::optional<std::int64_t> answerTextBytes(const nlohmann::json& answer);

// Usage as an upstream reports it; a count it did not report stays nullopt.
struct UsageFacts {
  std::optional<std::int64_t> prompt;
  std::optional<std::int64_t> completion;
  std::string model;   // as the upstream names it
};
UsageFacts usageOf(Endpoint endpoint, const nlohmann::json& response);

// Splits a streamed body into whole events as its bytes arrive: Server-Sent Events (blank-line
// separated, for OpenAI and Anthropic) or NDJSON lines (Ollama). Holds only an unfinished event.
class StreamSplitter {
 public:
  enum class Format { kSse, kNdjson };
  explicit StreamSplitter(Format format, std::size_t max_event_bytes = 1 << 20)
      : format_(format), max_event_(max_event_bytes) {}
  // Appends bytes; false if an event grew beyond max_event_bytes (a malformed stream).
  bool feed(std::string_view bytes);
  // The next whole event, raw as received (its terminator included), or nullopt.
  std::optional<std::string> next();
  // Bytes of an event not yet ended.
  std::size_t pending() const noexcept { return buffer_.size() - start_; }

 private:
  std::size_t next_end() const;   // the end of the next whole event, or npos

  Format format_;
  std::size_t max_event_;
  std::string buffer_;
  std::size_t start_ = 0;
};

// One event of a stream, parsed.
struct StreamEvent {
  std::string name;    // SSE "event:" field, or ""
  std::string data;    // SSE "data:" lines joined with '\n', or the NDJSON line
  bool done_marker = false;   // OpenAI's "data: [DONE]"
};
StreamEvent parseEvent(StreamSplitter::Format format, std::string_view raw);

// What one event means for the charge.
struct EventFacts {
  std::int64_t text_bytes = 0;      // of generated content (text, tool-call arguments, thinking)
  bool carries_text = false;
  UsageFacts usage;                 // counts the event reports (cumulative, as the APIs do)
  bool usage_only = false;          // an OpenAI usage chunk with no choices (include_usage)
  bool error = false;               // the upstream reports an error in the stream
  bool final = false;               // the last event of a finished call
};
EventFacts interpret(Endpoint endpoint, const StreamEvent& event);

// The stream's format for an endpoint.
StreamSplitter::Format streamFormat(Endpoint endpoint);

// Budget denials and proxy failures in each family's own shape (docs/proxy.md, "Errors").
struct ErrorReply {
  int status = 500;
  std::string body;   // JSON
  // For a stream already begun: the final event that ends it (SSE or an NDJSON line).
  std::string stream_event;
};
// `kind`: "budget" (a money limit or the kill switch), "rate" (a rate or concurrency cap),
// "auth" (401), "bad_request" (400), "not_found" (404), "upstream" (502), "timeout" (504),
// "unavailable" (503), "too_large" (413).
ErrorReply errorReply(Family family, std::string_view kind, std::string_view code, std::string_view message);

}  // namespace tokenfuse::proxy
