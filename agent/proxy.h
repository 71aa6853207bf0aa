// The LLM proxy (docs/proxy.md): tokenfused serves OpenAI's, Anthropic's and Ollama's wire APIs
// under /proxy/<upstream>/..., so that an application enforces its budgets by changing only its
// SDK's base URL. Each call is reserved against every budget and rule before it is forwarded,
// charged chunk by chunk as a stream arrives, cut with an error event in the client's own API
// shape the moment the next chunk would cross a limit, and booked from the usage the upstream
// reports (or, failing that, from the estimate). A call that never reached the upstream books
// nothing.
//
// Thread-safety: a Proxy is built, its routes added to a server, then only destroyed after the
// server; calls run concurrently on the server's threads.
#pragma once

#include "config.h"
#include "http_server.h"

#include <tokenfuse/tokenfuse.hpp>

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace prometheus {
class Collectable;
class Registry;
}

namespace tokenfuse {

class Engine;
namespace shm {
struct Header;
}

// Whole seconds until a denying window ends (RFC 9110 Retry-After: rounded up, at least 1), by
// the agent's clock; nullopt when the denial names no end or the words are nonsense.
std::optional<std::int64_t> retryAfterSeconds(const Decision& d, const shm::Header& header);

namespace proxy {
class Exchange;
class Upstream;
class UpstreamError;
struct ErrorReply;
struct Metrics;
}

class Proxy {
 public:
  // Throws ConfigError when an upstream cannot be set up (its CA file).
  Proxy(const ProxyConfig& config, Engine& engine, const shm::Header& header);
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // GET and POST /proxy/<upstream>/...
  void addRoutes(http::Router& router);
  // Closes the pooled upstream connections; for the server's after_stop (they belong to its
  // event loop).
  void dropIdleConnections();
  // Per upstream: requests by outcome, tokens, cost, latency, streams cut, estimates, errors.
  std::shared_ptr<prometheus::Collectable> metrics() const;

 private:
  struct Payer;
  struct Call;
  boost::asio::awaitable<void> serve(const http::Request& request, http::Stream& out);
  // Fills *payer from the request's key or headers; "" or what is wrong ("auth:..." or
  // "bad_request:...").
  std::string identify(const http::Request& request, Payer* payer) const;
  double charsPerToken(std::string_view model) const;
  boost::asio::awaitable<void> passThrough(Call& call, http::Stream& out);
  boost::asio::awaitable<void> metered(Call& call, http::Stream& out);
  boost::asio::awaitable<void> whole(Call& call, http::Stream& out);
  boost::asio::awaitable<void> streamed(Call& call, http::Stream& out);
  // Answers with a whole response (or `failed`), booking or releasing the call.
  boost::asio::awaitable<void> finishWhole(Call& call, http::Stream& out, proxy::Exchange* ex, const std::string& body,
                                           const std::optional<proxy::ErrorReply>& failed);
  proxy::ErrorReply upstreamFailed(Call& call, const proxy::UpstreamError& e);
  // Books the call (retrying while the ledger ring is full) and counts it.
  boost::asio::awaitable<void> book(Call& call, std::int64_t prompt, std::int64_t completion, bool estimated);

  ProxyConfig config_;
  Engine& engine_;
  const shm::Header& header_;
  std::vector<std::unique_ptr<proxy::Upstream>> upstreams_;
  std::unordered_map<std::string, const VirtualKeyConfig*> keys_;   // by SHA-256 hex
  std::shared_ptr<prometheus::Registry> registry_;
  std::vector<std::unique_ptr<proxy::Metrics>> metrics_;   // one per upstream, as upstreams_
};

}  // namespace tokenfuse
