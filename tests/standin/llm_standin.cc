#include "llm_standin.h"

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include <algorithm>
#include <functional>
#include <stdexcept>

namespace tokenfuse::test {

namespace net = boost::asio;
using nlohmann::json;

namespace {


int headerInt(const http::Request& req, const char* name, int fallback) {
  const std::string v = req.header(name);
  return v.empty() ? fallback : std::stoi(v);
}

constexpr const char* kToken = "tok ";

std::string text(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += kToken;
  return s;
}

net::awaitable<void> sleepMs(int ms) {
  if (ms <= 0) co_return;
  net::steady_timer t(co_await net::this_coro::executor, std::chrono::milliseconds(ms));
  co_await t.async_wait(net::use_awaitable);
}

std::string sse(const json& data, const char* event = nullptr) {
  std::string out;
  if (event != nullptr) out += std::string("event: ") + event + "\n";
  return out + "data: " + data.dump() + "\n\n";
}

}  // namespace

std::string LlmStandin::Seen::header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (http::iequals(k, name)) return v;
  }
  return {};
}

struct LlmStandin::Impl {
  LlmStandin& self;
  mutable std::mutex mu;
  std::vector<Seen> seen;
  std::unique_ptr<http::Server> server;

  explicit Impl(LlmStandin& s) : self(s) {}

  struct Plan {
    json body;
    std::string model;
    int tokens, delay_ms, die_after, status, prompt;
    bool usage;
  };

  Plan plan(const http::Request& req) {
    {
      std::lock_guard lock(mu);
      seen.push_back({req.method, req.target, req.body, req.headers});
    }
    Plan p;
    p.body = req.body.empty() ? json::object() : json::parse(req.body, nullptr, false);
    p.model = p.body.is_object() ? p.body.value("model", std::string("standin")) : "standin";
    p.tokens = headerInt(req, "X-Standin-Tokens", self.tokens.load());
    p.delay_ms = headerInt(req, "X-Standin-Delay-Ms", self.delay_ms.load());
    p.die_after = headerInt(req, "X-Standin-Die-After", self.die_after.load());
    p.status = headerInt(req, "X-Standin-Status", self.status.load());
    p.prompt = self.prompt_tokens.load();
    p.usage = req.header("X-Standin-No-Usage").empty();
    return p;
  }

  // Streams `n` pieces from `piece(i)`, then `tail`; dies (throws, so the server drops the
  // connection mid-body) after die_after pieces. Returns false if the client went away.
  net::awaitable<bool> stream(http::Stream& out, const Plan& p, std::string type, std::string head,
                              std::function<std::string(int)> piece, std::string tail) {
    struct Count {
      std::atomic<int>& n;
      explicit Count(std::atomic<int>& c) : n(c) { ++n; }
      ~Count() { --n; }
    } count(self.streaming);
    if (!co_await out.begin(200, type)) co_return false;
    if (!head.empty() && !co_await out.write(head)) co_return false;
    for (int i = 0; i < p.tokens; ++i) {
      if (i == p.die_after) throw std::runtime_error("the stand-in dies mid-stream, as asked");
      co_await sleepMs(p.delay_ms);
      if (!co_await out.write(piece(i))) {
        ++self.abandoned;
        co_return false;
      }
    }
    if (!co_await out.write(tail)) {
      ++self.abandoned;
      co_return false;
    }
    co_return true;
  }

  net::awaitable<void> openai(const http::Request& req, http::Stream& out) {
    const Plan p = plan(req);
    const std::string path = std::string(req.path());
    if (p.status != 200) {
      const json e{{"error", {{"message", "the stand-in was asked to fail"}, {"type", "server_error"}, {"param", nullptr}, {"code", nullptr}}}};
      co_await out.respond(p.status, "application/json", e.dump());
      co_return;
    }
    const json usage{{"prompt_tokens", p.prompt}, {"completion_tokens", p.tokens}, {"total_tokens", p.prompt + p.tokens}};
    if (path == "/v1/models") {
      const std::string models =
          json{{"object", "list"}, {"data", {{{"id", "gpt-4o"}, {"object", "model"}, {"created", 1}, {"owned_by", "standin"}}}}}.dump();
      co_await out.respond(200, "application/json", models);
      co_return;
    }
    if (path == "/v1/embeddings") {
      // As OpenAI does: floats, or their little-endian float32 bytes in base64 (the SDK's default).
      json embedding = {0.5, 0.25, 0.125};
      if (p.body.value("encoding_format", std::string()) == "base64") {
        const float v[3] = {0.5f, 0.25f, 0.125f};
        std::string bytes(reinterpret_cast<const char*>(v), sizeof v), b64((sizeof v + 2) / 3 * 4, '\0');
        EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()), reinterpret_cast<const unsigned char*>(bytes.data()),
                        static_cast<int>(bytes.size()));
        embedding = b64;
      }
      json r{{"object", "list"},
             {"data", {{{"object", "embedding"}, {"index", 0}, {"embedding", embedding}}}},
             {"model", p.model}};
      if (p.usage) r["usage"] = {{"prompt_tokens", p.prompt}, {"total_tokens", p.prompt}};
      co_await out.respond(200, "application/json", r.dump());
      co_return;
    }
    const bool chat = path == "/v1/chat/completions";
    const bool stream = p.body.value("stream", false);
    if (path == "/v1/responses") {
      json resp{{"id", "resp_1"}, {"object", "response"}, {"created_at", 1}, {"status", "completed"}, {"model", p.model},
                {"output", {{{"type", "message"}, {"id", "msg_1"}, {"status", "completed"}, {"role", "assistant"},
                             {"content", {{{"type", "output_text"}, {"text", text(p.tokens)}, {"annotations", json::array()}}}}}}}};
      if (p.usage) resp["usage"] = {{"input_tokens", p.prompt}, {"output_tokens", p.tokens}, {"total_tokens", p.prompt + p.tokens}};
      if (!stream) {
        co_await out.respond(200, "application/json", resp.dump());
        co_return;
      }
      json created = resp;
      created["status"] = "in_progress";
      created["output"] = json::array();
      created.erase("usage");
      // (Braced JSON is built outside co_await expressions: GCC 12 cannot keep an initializer
      // list's array alive across a suspension.)
      const std::string head =
          sse({{"type", "response.created"}, {"sequence_number", 0}, {"response", created}}, "response.created");
      const std::function<std::string(int)> piece = [](int i) {
        return sse({{"type", "response.output_text.delta"}, {"sequence_number", i + 1}, {"item_id", "msg_1"},
                    {"output_index", 0}, {"content_index", 0}, {"delta", kToken}},
                   "response.output_text.delta");
      };
      const std::string tail =
          sse({{"type", "response.completed"}, {"sequence_number", p.tokens + 1}, {"response", resp}}, "response.completed");
      co_await this->stream(out, p, "text/event-stream", head, piece, tail);
      co_return;
    }
    if (!stream) {
      json r{{"id", "chatcmpl-1"}, {"created", 1}, {"model", p.model}};
      if (chat) {
        r["object"] = "chat.completion";
        r["choices"] = {{{"index", 0}, {"message", {{"role", "assistant"}, {"content", text(p.tokens)}, {"refusal", nullptr}}},
                         {"logprobs", nullptr}, {"finish_reason", "stop"}}};
      } else {
        r["object"] = "text_completion";
        r["choices"] = {{{"index", 0}, {"text", text(p.tokens)}, {"logprobs", nullptr}, {"finish_reason", "stop"}}};
      }
      if (p.usage) r["usage"] = usage;
      co_await out.respond(200, "application/json", r.dump());
      co_return;
    }
    const bool include_usage = p.usage && p.body.contains("stream_options") &&
                               p.body["stream_options"].value("include_usage", false);
    auto chunk = [&](json choice) {
      json c{{"id", "chatcmpl-1"}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", 1},
             {"model", p.model}, {"choices", {std::move(choice)}}};
      if (include_usage) c["usage"] = nullptr;
      return sse(c);
    };
    std::string head = chat ? chunk({{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"finish_reason", nullptr}}) : "";
    std::string tail = chat ? chunk({{"index", 0}, {"delta", json::object()}, {"finish_reason", "stop"}})
                            : chunk({{"index", 0}, {"text", ""}, {"finish_reason", "stop"}});
    if (include_usage) {
      tail += sse({{"id", "chatcmpl-1"}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", 1},
                   {"model", p.model}, {"choices", json::array()}, {"usage", usage}});
    }
    tail += "data: [DONE]\n\n";
    std::function<std::string(int)> piece = [&](int) {
      return chat ? chunk({{"index", 0}, {"delta", {{"content", kToken}}}, {"finish_reason", nullptr}})
                  : chunk({{"index", 0}, {"text", kToken}, {"finish_reason", nullptr}});
    };
    co_await this->stream(out, p, "text/event-stream", head, piece, tail);
  }

  net::awaitable<void> anthropic(const http::Request& req, http::Stream& out) {
    const Plan p = plan(req);
    if (p.status != 200) {
      const json e{{"type", "error"}, {"error", {{"type", "api_error"}, {"message", "the stand-in was asked to fail"}}}};
      co_await out.respond(p.status, "application/json", e.dump());
      co_return;
    }
    json message{{"id", "msg_1"}, {"type", "message"}, {"role", "assistant"}, {"model", p.model},
                 {"content", {{{"type", "text"}, {"text", text(p.tokens)}}}}, {"stop_reason", "end_turn"},
                 {"stop_sequence", nullptr}};
    if (p.usage) message["usage"] = {{"input_tokens", p.prompt}, {"output_tokens", p.tokens}};
    if (!p.body.value("stream", false)) {
      co_await out.respond(200, "application/json", message.dump());
      co_return;
    }
    json start = message;
    start["content"] = json::array();
    start["stop_reason"] = nullptr;
    start["usage"] = {{"input_tokens", p.prompt}, {"output_tokens", 1}};
    std::string head = sse({{"type", "message_start"}, {"message", start}}, "message_start") +
                       sse({{"type", "content_block_start"}, {"index", 0}, {"content_block", {{"type", "text"}, {"text", ""}}}},
                           "content_block_start") +
                       sse({{"type", "ping"}}, "ping");
    json delta{{"type", "message_delta"}, {"delta", {{"stop_reason", "end_turn"}, {"stop_sequence", nullptr}}}};
    if (p.usage) delta["usage"] = {{"output_tokens", p.tokens}};
    std::string tail = sse({{"type", "content_block_stop"}, {"index", 0}}, "content_block_stop") +
                       sse(delta, "message_delta") + sse({{"type", "message_stop"}}, "message_stop");
    const std::function<std::string(int)> piece = [](int) {
      return sse({{"type", "content_block_delta"}, {"index", 0}, {"delta", {{"type", "text_delta"}, {"text", kToken}}}},
                 "content_block_delta");
    };
    co_await stream(out, p, "text/event-stream", head, piece, tail);
  }

  net::awaitable<void> ollama(const http::Request& req, http::Stream& out) {
    const Plan p = plan(req);
    const std::string path = std::string(req.path());
    if (p.status != 200) {
      const std::string e = json{{"error", "the stand-in was asked to fail"}}.dump();
      co_await out.respond(p.status, "application/json", e);
      co_return;
    }
    if (path == "/api/tags") {
      const std::string tags = json{{"models", {{{"name", "llama3.2:latest"}, {"model", "llama3.2:latest"},
                                                 {"modified_at", "2026-01-01T00:00:00Z"}, {"size", 1}, {"digest", "abc"},
                                                 {"details", {{"format", "gguf"}, {"family", "llama"}}}}}}}
                                   .dump();
      co_await out.respond(200, "application/json", tags);
      co_return;
    }
    if (path == "/api/embed") {
      json r{{"model", p.model}, {"embeddings", {{0.1, 0.2, 0.3}}}, {"total_duration", 1}, {"load_duration", 1}};
      if (p.usage) r["prompt_eval_count"] = p.prompt;
      co_await out.respond(200, "application/json", r.dump());
      co_return;
    }
    const bool chat = path == "/api/chat";
    auto piece = [&](const std::string& t, bool done) {
      json j{{"model", p.model}, {"created_at", "2026-01-01T00:00:00.000000Z"}, {"done", done}};
      if (chat) {
        j["message"] = {{"role", "assistant"}, {"content", t}};
      } else {
        j["response"] = t;
      }
      if (done) {
        j["done_reason"] = "stop";
        j["total_duration"] = 1;
        j["load_duration"] = 1;
        j["prompt_eval_duration"] = 1;
        j["eval_duration"] = 1;
        if (p.usage) {
          j["prompt_eval_count"] = p.prompt;
          j["eval_count"] = p.tokens;
        }
      }
      return j;
    };
    if (!p.body.value("stream", true)) {
      const std::string whole = piece(text(p.tokens), true).dump();
      co_await out.respond(200, "application/json", whole);
      co_return;
    }
    std::function<std::string(int)> each = [&](int) { return piece(kToken, false).dump() + "\n"; };
    const std::string last = piece("", true).dump() + "\n";
    co_await stream(out, p, "application/x-ndjson", "", each, last);
  }
};

LlmStandin::LlmStandin(int threads) : impl_(std::make_unique<Impl>(*this)) {
  http::Router router;
  for (const char* method : {"GET", "POST"}) {
    router.streamPrefix(
        method, "/",
        [this](const http::Request& q, http::Stream& out) -> net::awaitable<void> {
          const std::string_view path = q.path();
          if (path == "/v1/messages") return impl_->anthropic(q, out);
          if (path.starts_with("/api/")) return impl_->ollama(q, out);
          return impl_->openai(q, out);
        },
        8 << 20);
  }
  http::Server::Options o;
  o.port = 0;
  o.threads = threads;
  impl_->server = std::make_unique<http::Server>(std::move(router), std::move(o));
}

LlmStandin::~LlmStandin() { impl_->server.reset(); }

int LlmStandin::port() const { return impl_->server->port(); }

std::vector<LlmStandin::Seen> LlmStandin::seen() const {
  std::lock_guard lock(impl_->mu);
  return impl_->seen;
}

std::size_t LlmStandin::requests() const {
  std::lock_guard lock(impl_->mu);
  return impl_->seen.size();
}

}  // namespace tokenfuse::test
