// An event-driven HTTP/1.1 server (Boost.Beast on Boost.Asio, C++20 coroutines) for the agent's
// localhost API: a few threads serve any number of connections; an idle or slow connection costs
// a socket and a few kilobytes, never a thread. Every limit holds against a hostile client and is
// answered with its own status and a JSON body, and counted (ServerStats).
//
// Handlers come in two kinds. A plain Handler fills a Response and returns; it runs on the event
// loop, or, if registered as blocking (SQLite, admin changes), on a small pool of its own so that
// it never stalls the loop. A StreamHandler is a coroutine on the connection's executor: it may
// write its body chunk by chunk (Server-Sent Events, NDJSON) and make requests of its own with
// Asio on the same loop, without a thread per request.
//
// Thread-safety: a Server is built, then only destroyed; handlers run concurrently on several
// threads and must be thread-safe themselves.
#pragma once

// Before Asio: Boost 1.74's awaitable.hpp uses std::exchange without including <utility>.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

namespace tokenfuse::http {

// What a client may send, and for how long it may take. The defaults suit a loopback API whose
// requests are small JSON objects.
struct Limits {
  std::size_t max_header_bytes = 8 * 1024;    // request line and headers: 431 beyond
  std::size_t max_headers = 64;               // header fields: 431 beyond
  std::size_t max_body_bytes = 64 * 1024;     // after decoding gzip or deflate: 413 beyond
  std::chrono::milliseconds header_timeout{5000};   // from a request's first byte to its last header: 408
  std::chrono::milliseconds body_timeout{10000};    // to read the body after the headers: 408
  std::chrono::milliseconds idle_timeout{60000};    // a keep-alive connection waiting for a request
  std::size_t max_connections = 10000;        // beyond: the oldest idle one is closed; none idle: 503
  std::size_t max_requests_per_connection = 10000;  // then "Connection: close"
};

struct Request {
  std::string method;   // "GET", "POST", ...
  std::string target;   // as sent: path and query, percent-encoded
  std::string body;     // decoded (Content-Encoding undone)
  std::vector<std::pair<std::string, std::string>> headers;

  std::string_view path() const noexcept;   // target up to '?'
  // The value of header `name` (case-insensitive), or "".
  std::string header(std::string_view name) const;
  // Query parameter `name`, percent-decoded ('+' is a space); nullopt if absent.
  std::optional<std::string> param(std::string_view name) const;
};

struct Response {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
};

// The writing end of a streamed response, valid while its StreamHandler runs.
class Stream {
 public:
  virtual ~Stream() = default;
  // The status line and headers; the body follows in chunks (Transfer-Encoding: chunked). They
  // are sent with the first chunk (or end()), in one write, so a client that has gone shows in
  // what write() returns; begin() itself returns false only after a failed write.
  virtual boost::asio::awaitable<bool> begin(int status, std::string content_type,
                                             std::vector<std::pair<std::string, std::string>> headers = {}) = 0;
  virtual boost::asio::awaitable<bool> write(std::string_view chunk) = 0;
  // Instead of begin/write/end: the whole response at once, with a Content-Length. False if the
  // client has gone, or the response was begun already.
  virtual boost::asio::awaitable<bool> respond(int status, std::string content_type, std::string body,
                                               std::vector<std::pair<std::string, std::string>> headers = {}) = 0;
  // Ends the body. A handler that returns without calling it has it called for it.
  virtual boost::asio::awaitable<void> end() = 0;
  // The connection's executor, for sockets and timers of the handler's own (an upstream call).
  virtual boost::asio::any_io_executor executor() = 0;
};

using Handler = std::function<void(const Request&, Response&)>;
using StreamHandler = std::function<boost::asio::awaitable<void>(const Request&, Stream&)>;

// Routes by method and path. A pattern route matches prefix + one or more bytes + suffix; the
// handler takes what it needs from the target itself. The first route that matches wins.
class Router {
 public:
  enum class Run { kOnLoop, kBlocking };
  void exact(std::string method, std::string path, Handler h, Run run = Run::kOnLoop);
  void pattern(std::string method, std::string prefix, std::string suffix, Handler h, Run run = Run::kOnLoop);
  void stream(std::string method, std::string path, StreamHandler h);
  // Every path that starts with `prefix`; its requests may have bodies of up to `max_body_bytes`
  // (0: Limits::max_body_bytes).
  void streamPrefix(std::string method, std::string prefix, StreamHandler h, std::size_t max_body_bytes = 0);
  // The largest body any route takes beyond Limits::max_body_bytes (0: none).
  std::size_t maxBodyBytes() const noexcept { return max_body_; }

  struct Route {
    std::string method, prefix, suffix;
    bool exact = true;
    Run run = Run::kOnLoop;
    Handler handler;
    StreamHandler stream;
    std::size_t max_body_bytes = 0;   // 0: Limits::max_body_bytes
  };
  // The route for (method, path), or nullptr.
  const Route* find(std::string_view method, std::string_view path) const noexcept;

 private:
  std::vector<Route> routes_;
  std::size_t max_body_ = 0;
};

// Why a request was refused before any handler saw it, or a connection closed; counted.
enum class Refusal : std::size_t {
  kBadRequest,            // 400: not HTTP/1.1 as the parser reads it
  kBadHost,               // 400: Host is not a loopback name (DNS rebinding), or its port is not a number
  kHeaderTimeout,         // 408
  kBodyTimeout,           // 408
  kBodyTooLarge,          // 413: as sent, or once decoded
  kUnsupportedEncoding,   // 415: Content-Encoding other than identity, gzip, deflate
  kHeaderTooLarge,        // 431
  kTooManyHeaders,        // 431
  kOverCapacity,          // 503: max_connections reached and none of them idle
  kCount
};
enum class Closed : std::size_t {
  kIdleTimeout,    // idle for idle_timeout
  kEvicted,        // the oldest idle connection, closed for a new one at max_connections
  kRequestLimit,   // served max_requests_per_connection requests
  kCount
};
int statusOf(Refusal r) noexcept;
const char* nameOf(Refusal r) noexcept;
const char* nameOf(Closed c) noexcept;

struct ServerStats {
  std::atomic<std::uint64_t> open{0};       // connections open now
  std::atomic<std::uint64_t> accepted{0};   // since start
  std::atomic<std::uint64_t> refused[static_cast<std::size_t>(Refusal::kCount)] = {};
  std::atomic<std::uint64_t> closed[static_cast<std::size_t>(Closed::kCount)] = {};
};

class Server {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 8787;                  // 0: any free port; -1: no TCP listener
    std::string unix_socket;          // also listen here if not empty (the file is replaced)
    unsigned unix_socket_mode = 0660;
    int threads = 0;                  // event-loop threads; 0: one per core
    int blocking_threads = 2;         // for Router::Run::kBlocking handlers
    // Runs once the event-loop threads have stopped, before the event loop goes: for handlers'
    // objects bound to it (the proxy's pooled upstream connections).
    std::function<void()> after_stop;
    Limits limits;
  };
  // Binds, starts the threads, and serves. Throws std::runtime_error naming the address.
  Server(Router router, Options options);
  ~Server();   // stops accepting, closes every connection, joins
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const noexcept;
  const ServerStats& stats() const noexcept;

  struct Impl;   // in http_server.cc

 private:
  std::unique_ptr<Impl> impl_;
};

// ASCII case-insensitive equality, as HTTP compares header names and tokens.
bool iequals(std::string_view a, std::string_view b) noexcept;

// Whether `host` (a Host header) names this machine's loopback: localhost, 127.0.0.1 or [::1],
// with no port or a numeric one.
bool loopbackHost(std::string_view host) noexcept;

}  // namespace tokenfuse::http
