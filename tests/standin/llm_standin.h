// A stand-in for the LLM APIs the proxy forwards to (no real model runs on a test machine). It
// speaks each API's wire format as the providers document it: OpenAI's chat completions,
// completions, embeddings, responses and models; Anthropic's messages (with its SSE events);
// Ollama's chat, generate, embed and tags (NDJSON streams). It answers with `tokens` tokens of
// 4 bytes each ("tok "), one per streamed chunk, `delay_ms` apart, and reports usage as the
// real APIs do.
//
// Each default can be changed per request with a header (forwarded by the proxy):
//   X-Standin-Tokens: N        tokens in the answer
//   X-Standin-Delay-Ms: N      between streamed chunks
//   X-Standin-Die-After: N     close the connection after N streamed tokens, without ending the stream
//   X-Standin-Status: N        answer with this status and the API's error body
//   X-Standin-No-Usage: 1      report no usage
//
// Thread-safety: every member may be called from any thread.
#pragma once

#include "http_server.h"

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace tokenfuse::test {

class LlmStandin {
 public:
  explicit LlmStandin(int threads = 1);
  ~LlmStandin();

  int port() const;
  std::string baseUrl() const { return "http://127.0.0.1:" + std::to_string(port()); }

  std::atomic<int> tokens{5};
  std::atomic<int> delay_ms{0};
  std::atomic<int> prompt_tokens{10};   // the prompt_tokens / input_tokens it reports
  std::atomic<int> die_after{-1};       // as X-Standin-Die-After, for every stream
  std::atomic<int> status{200};         // as X-Standin-Status, for every call

  struct Seen {
    std::string method, target, body;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string header(std::string_view name) const;
  };
  std::vector<Seen> seen() const;
  std::size_t requests() const;
  // Streams whose client went away before the last token (the proxy stopped them).
  std::atomic<int> abandoned{0};
  // Streams in progress now.
  std::atomic<int> streaming{0};

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenfuse::test
