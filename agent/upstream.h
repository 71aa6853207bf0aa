// The proxy's HTTP/1.1 client for one upstream (an LLM API): plain TCP or TLS (OpenSSL, the
// system's CA store or a configured bundle, the host name verified), keep-alive connections
// pooled between calls, and the body read as it arrives so that a stream is passed on chunk by
// chunk. Runs on the caller's Asio executor (C++20 coroutines): no thread per call.
//
// Thread-safety: an Upstream is shared by every call to it (its pool is locked); an Exchange
// belongs to one call.
#pragma once

#include "config.h"

// Before Asio: Boost 1.74's awaitable.hpp uses std::exchange without including <utility>.
#include <utility>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace tokenfuse::proxy {

using Headers = std::vector<std::pair<std::string, std::string>>;

class Upstream;

// One request and its response. Destroying it before the body's end closes the connection
// (which is how a call is stopped: the upstream sees the connection go).
class Exchange {
 public:
  Exchange(Exchange&&) noexcept;
  Exchange& operator=(Exchange&&) noexcept;
  ~Exchange();

  int status() const noexcept;
  const Headers& headers() const noexcept;
  std::string header(std::string_view name) const;   // case-insensitive; "" if absent

  // Appends the next body bytes to *out. Returns false at the body's end. Throws
  // UpstreamError when the upstream fails (connection lost, silent beyond its timeout, a body
  // that is not HTTP).
  boost::asio::awaitable<bool> read(std::string* out);
  // Reads the rest of the body (at most `max_bytes`: beyond, UpstreamError).
  boost::asio::awaitable<std::string> readAll(std::size_t max_bytes);

  struct Impl;
  explicit Exchange(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

// Why an upstream call failed, for the client's error and the metrics.
class UpstreamError : public std::runtime_error {
 public:
  enum class Kind { kConnect, kTimeout, kProtocol, kTooLarge };
  UpstreamError(Kind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  Kind kind() const noexcept { return kind_; }

 private:
  Kind kind_;
};

class Upstream {
 public:
  // Throws ConfigError if the TLS set-up fails (an unreadable CA file).
  explicit Upstream(UpstreamConfig config);
  ~Upstream();

  const UpstreamConfig& config() const noexcept { return config_; }

  // Sends `method` `path_and_query` (appended to the base URL's path) with `headers` (Host,
  // Content-Length and the API key are added here) and `body`; returns once the response's
  // headers are in. A pooled connection the upstream closed meanwhile is retried on a new one.
  // Throws UpstreamError.
  boost::asio::awaitable<Exchange> send(boost::asio::any_io_executor ex, std::string method,
                                        std::string path_and_query, Headers headers, std::string body);

  // Closes the pooled connections (before the event loop they belong to goes).
  void dropIdle();

  struct Connection;

 private:
  friend struct Exchange::Impl;
  std::unique_ptr<Connection> take();               // a pooled connection, or nullptr
  void give(std::unique_ptr<Connection> c);         // back to the pool after a whole response

  UpstreamConfig config_;
  struct Tls;
  std::unique_ptr<Tls> tls_;   // https only
  std::mutex mu_;
  std::vector<std::unique_ptr<Connection>> idle_;
};

}  // namespace tokenfuse::proxy
