#include "http_server.h"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <nlohmann/json.hpp>
#include <zlib.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <list>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace tokenfuse::http {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using net::use_awaitable;
using tcp = net::ip::tcp;
using unix_socket = net::local::stream_protocol;

bool iequals(std::string_view a, std::string_view b) noexcept {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return (x | 0x20) == (y | 0x20) && ((x >= 'a' && x <= 'z') || (x >= 'A' && x <= 'Z') || x == y);
         });
}

namespace {

std::string_view sv(boost::beast::string_view s) noexcept { return {s.data(), s.size()}; }

std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

int hexDigit(char c) noexcept {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

// Percent-decoding of a query component; '+' is a space there. A '%' without two hex digits
// stays as it is.
std::string queryDecode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%' && i + 2 < s.size() && hexDigit(s[i + 1]) >= 0 && hexDigit(s[i + 2]) >= 0) {
      out += static_cast<char>(hexDigit(s[i + 1]) * 16 + hexDigit(s[i + 2]));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// The standard reason phrase (Beast's table: 429, 504 and the rest), or "Status" for a code it
// does not know (an upstream's 529, relayed by the proxy).
std::string_view reasonPhrase(int status) noexcept {
  const bhttp::status known = bhttp::int_to_status(static_cast<unsigned>(status));
  return known == bhttp::status::unknown ? std::string_view("Status") : sv(bhttp::obsolete_reason(known));
}

std::string errorBody(std::string_view error, std::string_view message, std::string_view field = {}) {
  nlohmann::json j = {{"error", error}, {"message", message}};
  if (!field.empty()) j["field"] = field;
  return j.dump();
}

// Undoes Content-Encoding gzip or deflate (zlib or raw) into at most `max` bytes. Returns an
// empty optional with *too_large set past `max`, or with it clear for data that is not valid.
std::optional<std::string> inflateBody(std::string_view in, bool gzip, std::size_t max, bool* too_large) {
  *too_large = false;
  // gzip; deflate as it should be sent (zlib), then as some clients send it (raw).
  for (const int window : gzip ? std::vector<int>{16 + 15} : std::vector<int>{15, -15}) {
    z_stream z{};
    if (inflateInit2(&z, window) != Z_OK) return std::nullopt;
    std::string out;
    char chunk[16384];
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
    z.avail_in = static_cast<uInt>(in.size());
    int rc = Z_OK;
    while (rc == Z_OK) {
      z.next_out = reinterpret_cast<Bytef*>(chunk);
      z.avail_out = sizeof chunk;
      rc = inflate(&z, Z_NO_FLUSH);
      const std::size_t produced = sizeof chunk - z.avail_out;
      if (out.size() + produced > max) {
        inflateEnd(&z);
        *too_large = true;
        return std::nullopt;
      }
      out.append(chunk, produced);
      if (rc == Z_BUF_ERROR && z.avail_in == 0) break;   // truncated input
    }
    inflateEnd(&z);
    if (rc == Z_STREAM_END && z.avail_in == 0) return out;
  }
  return std::nullopt;
}

}  // namespace

// --- Request, Router, names -----------------------------------------------------------------

std::string_view Request::path() const noexcept {
  const std::string_view t = target;
  return t.substr(0, t.find('?'));
}

std::string Request::header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (iequals(k, name)) return v;
  }
  return {};
}

std::optional<std::string> Request::param(std::string_view name) const {
  const std::size_t q = target.find('?');
  if (q == std::string::npos) return std::nullopt;
  std::string_view rest = std::string_view(target).substr(q + 1);
  while (!rest.empty()) {
    const std::size_t amp = rest.find('&');
    const std::string_view pair = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
    const std::size_t eq = pair.find('=');
    if (queryDecode(pair.substr(0, eq)) == name) {
      return eq == std::string_view::npos ? std::string() : queryDecode(pair.substr(eq + 1));
    }
  }
  return std::nullopt;
}

void Router::exact(std::string method, std::string path, Handler h, Run run) {
  routes_.push_back({std::move(method), std::move(path), {}, true, run, std::move(h), {}});
}
void Router::pattern(std::string method, std::string prefix, std::string suffix, Handler h, Run run) {
  routes_.push_back({std::move(method), std::move(prefix), std::move(suffix), false, run, std::move(h), {}});
}
void Router::stream(std::string method, std::string path, StreamHandler h) {
  routes_.push_back({std::move(method), std::move(path), {}, true, Run::kOnLoop, {}, std::move(h)});
}
void Router::streamPrefix(std::string method, std::string prefix, StreamHandler h, std::size_t max_body_bytes) {
  routes_.push_back({std::move(method), std::move(prefix), {}, false, Run::kOnLoop, {}, std::move(h), max_body_bytes});
  max_body_ = std::max(max_body_, max_body_bytes);
}

const Router::Route* Router::find(std::string_view method, std::string_view path) const noexcept {
  for (const Route& r : routes_) {
    if (r.method != method) continue;
    if (r.exact ? path == r.prefix
                : path.size() > r.prefix.size() + r.suffix.size() && path.starts_with(r.prefix) &&
                      path.ends_with(r.suffix)) {
      return &r;
    }
  }
  return nullptr;
}

int statusOf(Refusal r) noexcept {
  switch (r) {
    case Refusal::kBadRequest:
    case Refusal::kBadHost: return 400;
    case Refusal::kHeaderTimeout:
    case Refusal::kBodyTimeout: return 408;
    case Refusal::kBodyTooLarge: return 413;
    case Refusal::kUnsupportedEncoding: return 415;
    case Refusal::kHeaderTooLarge:
    case Refusal::kTooManyHeaders: return 431;
    case Refusal::kOverCapacity:
    case Refusal::kCount: break;
  }
  return 503;
}

const char* nameOf(Refusal r) noexcept {
  static constexpr const char* kNames[] = {"bad_request",  "bad_host",         "header_timeout",
                                           "body_timeout", "body_too_large",   "unsupported_encoding",
                                           "header_too_large", "too_many_headers", "over_capacity"};
  return kNames[static_cast<std::size_t>(r)];
}

const char* nameOf(Closed c) noexcept {
  static constexpr const char* kNames[] = {"idle_timeout", "evicted", "request_limit"};
  return kNames[static_cast<std::size_t>(c)];
}

bool loopbackHost(std::string_view host) noexcept {
  std::string_view name = host, port;
  if (host.starts_with('[')) {
    const std::size_t close = host.find(']');
    if (close == std::string_view::npos) return false;
    name = host.substr(0, close + 1);
    const std::string_view rest = host.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return false;
      port = rest.substr(1);
      if (port.empty()) return false;
    }
  } else if (const std::size_t colon = host.rfind(':'); colon != std::string_view::npos) {
    name = host.substr(0, colon);
    port = host.substr(colon + 1);
    if (port.empty()) return false;
  }
  if (!port.empty()) {
    unsigned value = 0;
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc{} || end != port.data() + port.size() || port.size() > 5 || value > 65535) return false;
  }
  return iequals(name, "localhost") || name == "127.0.0.1" || name == "[::1]";
}

// --- the server ---------------------------------------------------------------------------------

struct SessionBase;

struct Server::Impl {
  Impl(Router r, Options o) : router(std::move(r)), options(std::move(o)), limits(options.limits) {}

  // Declared before the io_context: coroutine frames destroyed with it still reach these.
  Router router;
  Options options;
  const Limits limits;
  ServerStats stats;
  // Every open connection, for the sweeper (deadlines) and for eviction (the oldest idle one).
  std::mutex sessions_mu;
  std::list<std::weak_ptr<SessionBase>> sessions;

  net::io_context ioc{};
  std::optional<tcp::acceptor> tcp_acceptor;
  std::optional<unix_socket::acceptor> unix_acceptor;
  net::thread_pool blocking{static_cast<std::size_t>(std::max(1, options.blocking_threads))};
  std::vector<std::thread> threads;
  int port = -1;

  void add(const std::shared_ptr<SessionBase>& s);
  bool evictOldestIdle();
  // Every kSweep, cancels the I/O of every session past its deadline: one timer for all the
  // connections instead of one per read and write.
  net::awaitable<void> sweep();
  template <typename Acceptor, typename Protocol>
  net::awaitable<void> acceptLoop(Acceptor& acceptor);
  void count(Refusal r) noexcept { stats.refused[static_cast<std::size_t>(r)].fetch_add(1, std::memory_order_relaxed); }
  void count(Closed c) noexcept { stats.closed[static_cast<std::size_t>(c)].fetch_add(1, std::memory_order_relaxed); }
};

std::int64_t steadyNs() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr auto kSweep = std::chrono::milliseconds(50);
constexpr std::int64_t kNoDeadline = INT64_MAX;

struct SessionBase : std::enable_shared_from_this<SessionBase> {
  explicit SessionBase(Server::Impl& impl) : server(impl) {}
  virtual ~SessionBase() = default;
  // From any thread: cancels the I/O in progress if the deadline has passed.
  virtual void expire() = 0;
  // From any thread: closes the connection if it is still waiting for a request.
  virtual void evict() = 0;

  Server::Impl& server;
  std::atomic<std::int64_t> deadline_ns{kNoDeadline};   // steady clock
  std::atomic<std::int64_t> idle_since_ns{-1};           // >= 0 while waiting for a request
  std::atomic<bool> evicting{false};                     // chosen to make room; not chosen again
};

// A session is listed from its accept on; the sweeper drops the entries of those that are gone.
// (A destructor that took sessions_mu could deadlock: the last reference to a session may be a
// temporary of a scan that holds the mutex.)
void Server::Impl::add(const std::shared_ptr<SessionBase>& s) {
  std::lock_guard lock(sessions_mu);
  sessions.push_back(s);
}

bool Server::Impl::evictOldestIdle() {
  std::shared_ptr<SessionBase> victim;
  {
    std::lock_guard lock(sessions_mu);
    std::int64_t oldest = INT64_MAX;
    for (const std::weak_ptr<SessionBase>& w : sessions) {
      std::shared_ptr<SessionBase> s = w.lock();   // (if it is the last reference, its destructor takes no lock)
      const std::int64_t since =
          s && !s->evicting.load(std::memory_order_relaxed) ? s->idle_since_ns.load(std::memory_order_relaxed) : -1;
      if (since >= 0 && since < oldest) {
        oldest = since;
        victim = std::move(s);
      }
    }
  }
  if (!victim) return false;
  victim->evicting.store(true, std::memory_order_relaxed);
  victim->evict();
  return true;
}

net::awaitable<void> Server::Impl::sweep() {
  net::steady_timer timer(co_await net::this_coro::executor);
  for (;;) {
    timer.expires_after(kSweep);
    beast::error_code ec;
    co_await timer.async_wait(net::redirect_error(use_awaitable, ec));
    if (ec) co_return;
    const std::int64_t now = steadyNs();
    std::vector<std::shared_ptr<SessionBase>> due;
    {
      std::lock_guard lock(sessions_mu);
      for (auto it = sessions.begin(); it != sessions.end();) {
        std::shared_ptr<SessionBase> s = it->lock();
        if (!s) {
          it = sessions.erase(it);
          continue;
        }
        if (s->deadline_ns.load(std::memory_order_relaxed) <= now) due.push_back(std::move(s));
        ++it;
      }
    }
    for (const auto& s : due) s->expire();
  }
}

namespace {

template <typename Protocol>
using SocketOf = typename Protocol::socket::template rebind_executor<net::any_io_executor>::other;

template <typename Protocol>
class Session final : public SessionBase {
 public:
  Session(Server::Impl& impl, net::any_io_executor ex)
      : SessionBase(impl),
        socket_(std::move(ex)),
        // Bounded: chunk extensions and trailers have no limit of their own in the parser.
        buffer_(std::max<std::size_t>(impl.limits.max_header_bytes, 16 * 1024) + 64 * 1024) {}
  ~Session() override {
    if (counted_) server.stats.open.fetch_sub(1, std::memory_order_relaxed);
  }
  // Counts the connection as open, once it is accepted.
  void accepted() {
    beast::error_code ignored;
    socket_.non_blocking(true, ignored);   // run() reads what async_wait said is there
    counted_ = true;
    server.stats.open.fetch_add(1, std::memory_order_relaxed);
    server.stats.accepted.fetch_add(1, std::memory_order_relaxed);
    server.add(shared_from_this());
  }

  SocketOf<Protocol>& socket() noexcept { return socket_; }

  void expire() override {
    auto self = std::static_pointer_cast<Session>(shared_from_this());
    net::post(socket_.get_executor(), [self] {
      if (self->deadline_ns.load(std::memory_order_relaxed) > steadyNs()) return;   // moved on meanwhile
      self->timed_out_ = true;
      beast::error_code ignored;
      self->socket_.cancel(ignored);
    });
  }

  void evict() override {
    auto self = std::static_pointer_cast<Session>(shared_from_this());
    net::post(socket_.get_executor(), [self] {
      // A request came first, or its bytes are already here though not yet read (a busy machine):
      // it is served, and the newcomer goes over the limit by one for a moment.
      beast::error_code ec;
      if (self->idle_since_ns.load(std::memory_order_relaxed) < 0 || self->socket_.available(ec) > 0) {
        self->evicting.store(false, std::memory_order_relaxed);
        return;
      }
      self->evicted_ = true;
      self->server.count(Closed::kEvicted);
      beast::error_code ignored;
      self->socket_.close(ignored);
    });
  }

  net::awaitable<void> run();
  // Answers 503 and closes: no room for another connection, and none idle to close for it.
  net::awaitable<void> refuseOverCapacity();

  // Writes one whole response. False if the client has gone.
  // `head_only`: the answer to HEAD, headers without the body.
  net::awaitable<bool> send(int status, std::string_view content_type, std::string_view body, bool keep_alive,
                            const std::vector<std::pair<std::string, std::string>>& headers = {},
                            bool head_only = false);
  net::awaitable<bool> writeRaw(std::string_view a, std::string_view b = {}, std::string_view c = {});

 private:
  // Answers `why` and closes, after reading what the client still sends for up to `linger`.
  net::awaitable<void> refuse(Refusal why, std::string_view message, std::string_view field = {},
                              std::chrono::milliseconds linger = std::chrono::seconds(1));
  net::awaitable<void> refuseTooLarge(std::size_t limit, const char* when) {
    co_await refuse(Refusal::kBodyTooLarge, "the body is larger than the limit (" + std::to_string(limit) + " bytes)" + when);
  }
  net::awaitable<void> lingeringClose(std::chrono::milliseconds linger = std::chrono::seconds(1));
  net::awaitable<bool> dispatch(Request& request, bool keep_alive);

  // The I/O in progress is cancelled once `d` has passed (by the server's sweeper, within
  // kSweep); then timedOut() says so.
  void deadline(std::chrono::milliseconds d) {
    timed_out_ = false;
    deadline_ns.store(steadyNs() + std::chrono::duration_cast<std::chrono::nanoseconds>(d).count(),
                      std::memory_order_relaxed);
  }
  bool timedOut() {
    deadline_ns.store(kNoDeadline, std::memory_order_relaxed);
    return timed_out_;
  }

  SocketOf<Protocol> socket_;
  beast::flat_buffer buffer_;
  bool evicted_ = false;
  bool timed_out_ = false;
  bool http10_ = false;   // the request being answered is HTTP/1.0
  bool counted_ = false;
};

template <typename Protocol>
class ChunkedStream final : public Stream {
 public:
  ChunkedStream(Session<Protocol>& s, bool keep_alive) : s_(s), keep_alive_(keep_alive) {}
  // The status line and headers wait for the first chunk, to go out in one write with it.
  net::awaitable<bool> begin(int status, std::string content_type,
                             std::vector<std::pair<std::string, std::string>> headers) override {
    if (begun_) co_return ok_;
    begun_ = true;
    head_ = "HTTP/1.1 " + std::to_string(status) + " " + std::string(reasonPhrase(status)) + "\r\nContent-Type: " +
            content_type + "\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n";
    if (!keep_alive_) head_ += "Connection: close\r\n";
    for (const auto& [k, v] : headers) head_ += k + ": " + v + "\r\n";
    head_ += "\r\n";
    co_return ok_;
  }
  net::awaitable<bool> write(std::string_view chunk) override {
    if (!begun_) co_await begin(200, "application/octet-stream", {});
    if (ended_) co_return false;
    if (!ok_ || chunk.empty()) co_return ok_;
    char size[24];
    const auto [end, ec] = std::to_chars(size, size + sizeof size - 2, chunk.size(), 16);
    (void)ec;
    head_.append(size, end);
    head_ += "\r\n";
    ok_ = co_await s_.writeRaw(head_, chunk, "\r\n");   // one write: a streamed token is one segment
    head_.clear();
    wrote_ = true;
    co_return ok_;
  }
  net::awaitable<bool> respond(int status, std::string content_type, std::string body,
                               std::vector<std::pair<std::string, std::string>> headers) override {
    if (begun_) co_return false;
    begun_ = ended_ = wrote_ = true;
    ok_ = co_await s_.send(status, content_type, body, keep_alive_, headers);
    co_return ok_;
  }
  net::awaitable<void> end() override {
    if (!begun_) co_await begin(200, "application/octet-stream", {});
    if (ended_) co_return;
    ended_ = wrote_ = true;
    if (ok_) ok_ = co_await s_.writeRaw(head_, "0\r\n\r\n");
    head_.clear();
  }
  net::any_io_executor executor() override { return s_.socket().get_executor(); }
  bool ok() const noexcept { return ok_; }
  // Whether any byte of the response went out (begin() alone sends nothing).
  bool sent() const noexcept { return wrote_; }

 private:
  Session<Protocol>& s_;
  bool keep_alive_;
  bool begun_ = false, ended_ = false, ok_ = true, wrote_ = false;
  std::string head_;   // bytes not yet written: the status line and headers, then a chunk's size
};

template <typename Protocol>
net::awaitable<bool> Session<Protocol>::writeRaw(std::string_view a, std::string_view b, std::string_view c) {
  beast::error_code ec;
  deadline(server.limits.body_timeout);   // a client that does not read is let go
  const std::array<net::const_buffer, 3> bufs{net::buffer(a.data(), a.size()), net::buffer(b.data(), b.size()),
                                              net::buffer(c.data(), c.size())};
  co_await net::async_write(socket_, bufs, net::redirect_error(use_awaitable, ec));
  co_return !timedOut() && !ec;
}

template <typename Protocol>
net::awaitable<bool> Session<Protocol>::send(int status, std::string_view content_type, std::string_view body,
                                             bool keep_alive,
                                             const std::vector<std::pair<std::string, std::string>>& headers,
                                             bool head_only) {
  std::string head = "HTTP/1.1 " + std::to_string(status) + " " + std::string(reasonPhrase(status)) + "\r\n";
  const bool bodiless = status == 204 || status == 304 || status < 200;
  if (!bodiless) {
    head += "Content-Type: ";
    head += content_type;
    head += "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  if (!keep_alive) head += "Connection: close\r\n";
  if (keep_alive && http10_) head += "Connection: keep-alive\r\n";   // 1.0 closes by default
  for (const auto& [k, v] : headers) head += k + ": " + v + "\r\n";
  head += "\r\n";
  co_return co_await writeRaw(head, bodiless || head_only ? std::string_view() : body);
}

template <typename Protocol>
net::awaitable<void> Session<Protocol>::lingeringClose(std::chrono::milliseconds linger) {
  // Half-close, then read what the client still sends for a moment: closing with unread data
  // makes the kernel send a reset, which can destroy the answer before the client reads it.
  beast::error_code ec;
  socket_.shutdown(net::socket_base::shutdown_send, ec);
  std::size_t drained = 0;
  deadline(linger);
  while (!ec && drained < 1024 * 1024) {
    buffer_.clear();
    drained += co_await socket_.async_read_some(buffer_.prepare(16384), net::redirect_error(use_awaitable, ec));
  }
  (void)timedOut();
  socket_.close(ec);
}

template <typename Protocol>
net::awaitable<void> Session<Protocol>::refuse(Refusal why, std::string_view message, std::string_view field,
                                               std::chrono::milliseconds linger) {
  server.count(why);
  const int status = statusOf(why);
  const char* error = status == 408   ? "timeout"
                      : status == 413 ? "too_large"
                      : status == 415 ? "unsupported_media_type"
                      : status == 431 ? "headers_too_large"
                      : status == 503 ? "unavailable"
                                      : "bad_request";
  if (co_await send(status, "application/json", errorBody(error, message, field), false)) co_await lingeringClose(linger);
}

template <typename Protocol>
net::awaitable<void> Session<Protocol>::refuseOverCapacity() {
  co_await refuse(Refusal::kOverCapacity,
                  "the agent has max_connections (" + std::to_string(server.limits.max_connections) +
                      ") connections open and none of them idle; retry shortly",
                  {}, std::chrono::milliseconds(100));   // over capacity: no descriptor held for long
}

template <typename Protocol>
net::awaitable<bool> Session<Protocol>::dispatch(Request& request, bool keep_alive) {
  // HEAD is GET without the body (same status and headers, Content-Length included).
  const bool head = request.method == "HEAD";
  const Router::Route* route = server.router.find(head ? "GET" : request.method, request.path());
  if (route == nullptr || (head && route->stream)) {
    co_return co_await send(404, "application/json", errorBody("not_found", "no such endpoint"), keep_alive, {},
                            head);
  }
  if (route->stream) {
    ChunkedStream<Protocol> out(*this, keep_alive);
    bool failed = false;
    std::string failure = "the handler failed";
    try {
      co_await route->stream(request, out);
    } catch (const std::exception& e) {
      failed = true;
      failure = e.what();
    } catch (...) {
      failed = true;
    }
    if (failed) {
      // Before the first byte a whole error answer is still possible; after it, only a close,
      // which tells the client the body is cut short.
      if (!out.sent()) co_await send(500, "application/json", errorBody("internal", failure), false);
      co_return false;
    }
    co_await out.end();
    co_return out.ok();
  }
  Response response;
  auto call = [&] {
    try {
      route->handler(request, response);
    } catch (const std::exception& e) {
      response = Response{};
      response.status = 500;
      response.body = errorBody("internal", e.what());
    } catch (...) {   // on the pool, an escaping exception would end the process
      response = Response{};
      response.status = 500;
      response.body = errorBody("internal", "the handler failed");
    }
  };
  if (route->run == Router::Run::kBlocking) {
    // Runs `call` on the pool and resumes here on the session's strand. (co_await post(pool,
    // use_awaitable) would not do: Asio 1.18 hands the coroutine back to its own executor.)
    co_await net::async_initiate<decltype(use_awaitable), void()>(
        [this, &call](auto handler) {
          net::post(server.blocking, [&call, handler = std::move(handler)]() mutable {
            call();
            net::post(std::move(handler));   // to the handler's executor: the strand
          });
        },
        use_awaitable);
  } else {
    call();
  }
  co_return co_await send(response.status, response.content_type, response.body, keep_alive, response.headers, head);
}

template <typename Protocol>
net::awaitable<void> Session<Protocol>::run() {
  const auto self = shared_from_this();   // alive while this runs
  const Limits& limits = server.limits;
  beast::error_code ec;
  for (std::size_t served = 0;;) {
    // Waiting for a request: the idle timeout, and first in line to be closed for a newcomer.
    if (buffer_.size() == 0) {
      if (buffer_.capacity() > 8192) buffer_.shrink_to_fit();   // an idle connection costs little
      // Waits for the request's first bytes without taking them, so that while this connection
      // counts as idle its bytes stay in the socket, where evict() sees them (an async read
      // takes them at once and reports later: a busy connection evicted on a busy machine).
      std::size_t n = 0;
      do {
        idle_since_ns.store(steadyNs(), std::memory_order_relaxed);
        deadline(limits.idle_timeout);
        co_await socket_.async_wait(net::socket_base::wait_read, net::redirect_error(use_awaitable, ec));
        idle_since_ns.store(-1, std::memory_order_relaxed);
        if (evicted_) co_return;
        if (timedOut()) server.count(Closed::kIdleTimeout);
        if (ec) break;
        n = socket_.read_some(buffer_.prepare(4096), ec);   // non-blocking (accepted())
      } while (ec == net::error::would_block || ec == net::error::try_again);
      if (ec) break;
      buffer_.commit(n);
    }
    // Empty lines before a request line are to be ignored (RFC 9112, 2.2); the parser does not.
    while (buffer_.size() >= 2 && std::string_view(static_cast<const char*>(buffer_.data().data()), 2) == "\r\n") {
      buffer_.consume(2);
    }
    if (buffer_.size() == 0) continue;

    // The request line and headers, within header_timeout of their first byte (slowloris).
    bhttp::request_parser<bhttp::string_body> parser;
    parser.header_limit(static_cast<std::uint32_t>(std::min<std::size_t>(limits.max_header_bytes, UINT32_MAX)));
    parser.body_limit(std::max(limits.max_body_bytes, server.router.maxBodyBytes()));
    deadline(limits.header_timeout);
    co_await bhttp::async_read_header(socket_, buffer_, parser, net::redirect_error(use_awaitable, ec));
    if (timedOut()) {
      co_return co_await refuse(Refusal::kHeaderTimeout, "the request's headers did not arrive within " +
                                                             std::to_string(limits.header_timeout.count()) + " ms");
    }
    if (ec == bhttp::error::header_limit) {
      co_return co_await refuse(Refusal::kHeaderTooLarge, "the request line and headers are larger than " +
                                                              std::to_string(limits.max_header_bytes) + " bytes");
    }
    if (ec == bhttp::error::body_limit) {   // the parser checks Content-Length with the headers
      co_return co_await refuseTooLarge(std::max(limits.max_body_bytes, server.router.maxBodyBytes()), "");
    }
    if (ec == bhttp::error::end_of_stream || ec == net::error::connection_reset || ec == net::error::eof) break;
    if (ec == bhttp::error::buffer_overflow) {
      co_return co_await refuse(Refusal::kHeaderTooLarge, "the request line and headers are larger than " +
                                                              std::to_string(limits.max_header_bytes) + " bytes");
    }
    if (ec) co_return co_await refuse(Refusal::kBadRequest, "the request is not valid HTTP/1.1: " + ec.message());

    bhttp::request<bhttp::string_body>& msg = parser.get();
    http10_ = msg.version() == 10;
    const std::size_t fields = static_cast<std::size_t>(std::distance(msg.begin(), msg.end()));
    if (fields > limits.max_headers) {
      co_return co_await refuse(Refusal::kTooManyHeaders,
                                "the request has " + std::to_string(fields) + " header fields; at most " +
                                    std::to_string(limits.max_headers) + " are accepted");
    }
    if (!loopbackHost(trim(sv(msg[bhttp::field::host])))) {
      co_return co_await refuse(Refusal::kBadHost, "Host must be a loopback address (localhost, 127.0.0.1 or [::1]) "
                                                   "with a numeric port, if any", "Host");
    }
    const std::string_view encoding = trim(sv(msg[bhttp::field::content_encoding]));
    const bool gzip = iequals(encoding, "gzip") || iequals(encoding, "x-gzip");
    const bool deflate = iequals(encoding, "deflate");
    if (!encoding.empty() && !iequals(encoding, "identity") && !gzip && !deflate) {
      co_return co_await refuse(Refusal::kUnsupportedEncoding,
                                "Content-Encoding " + std::string(encoding) + " is not accepted (identity, gzip, deflate)");
    }
    // The route's own limit, if it has one (the LLM proxy takes larger bodies than the API).
    std::size_t body_limit = limits.max_body_bytes;
    {
      const std::string_view target = sv(msg.target());
      const std::string_view method = sv(msg.method_string());
      const Router::Route* r =
          server.router.find(method == "HEAD" ? "GET" : method, target.substr(0, target.find('?')));
      if (r != nullptr && r->max_body_bytes > 0) body_limit = r->max_body_bytes;
    }
    parser.body_limit(body_limit);
    if (const auto length = parser.content_length(); length && *length > body_limit) {
      co_return co_await refuseTooLarge(body_limit, "");
    }
    if (!parser.is_done()) {
      if (!http10_ && iequals(trim(sv(msg[bhttp::field::expect])), "100-continue")) {
        if (!co_await writeRaw("HTTP/1.1 100 Continue\r\n\r\n")) break;
      }
      deadline(limits.body_timeout);
      co_await bhttp::async_read(socket_, buffer_, parser, net::redirect_error(use_awaitable, ec));
      if (timedOut()) {
        co_return co_await refuse(Refusal::kBodyTimeout, "the request's body did not arrive within " +
                                                             std::to_string(limits.body_timeout.count()) + " ms");
      }
      if (ec == bhttp::error::body_limit || ec == bhttp::error::buffer_overflow) {
        co_return co_await refuseTooLarge(body_limit, "");   // (overflow: a chunk extension or trailer without end)
      }
      if (ec) co_return co_await refuse(Refusal::kBadRequest, "the request's body is not valid: " + ec.message());
      // Trailer fields of a chunked body join the headers: the same count holds for them.
      if (const auto all = static_cast<std::size_t>(std::distance(msg.begin(), msg.end())); all > limits.max_headers) {
        co_return co_await refuse(Refusal::kTooManyHeaders, "the request has " + std::to_string(all) +
                                                                " header and trailer fields; at most " +
                                                                std::to_string(limits.max_headers) + " are accepted");
      }
    }

    Request request;
    request.method = std::string(msg.method_string());
    request.target = std::string(msg.target());
    request.headers.reserve(fields);
    for (const auto& f : msg) request.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    if (gzip || deflate) {
      bool too_large = false;
      std::optional<std::string> body = inflateBody(msg.body(), gzip, body_limit, &too_large);
      if (too_large) {
        co_return co_await refuseTooLarge(body_limit, " once decoded");
      }
      if (!body) {
        co_return co_await refuse(Refusal::kBadRequest,
                                  std::string("the body is not valid ") + (gzip ? "gzip" : "deflate") + " data");
      }
      request.body = std::move(*body);
    } else {
      request.body = std::move(msg.body());
    }

    ++served;
    bool keep_alive = msg.keep_alive();
    if (keep_alive && served >= limits.max_requests_per_connection) {
      keep_alive = false;
      server.count(Closed::kRequestLimit);
    }
    if (!co_await dispatch(request, keep_alive)) break;
    if (!keep_alive) co_return co_await lingeringClose();   // what a pipelining client sent after it
  }
  socket_.shutdown(net::socket_base::shutdown_both, ec);
  socket_.close(ec);
}

}  // namespace

template <typename Acceptor, typename Protocol>
net::awaitable<void> Server::Impl::acceptLoop(Acceptor& acceptor) {
  for (;;) {
    auto session = std::make_shared<Session<Protocol>>(*this, net::make_strand(ioc));
    beast::error_code ec;
    co_await acceptor.async_accept(session->socket(), net::redirect_error(use_awaitable, ec));
    if (ec == net::error::operation_aborted || !acceptor.is_open()) co_return;
    if (ec) {
      // Out of file descriptors (EMFILE) or the like: wait a moment rather than spin; the
      // connections open now are served meanwhile.
      session.reset();
      net::steady_timer pause(co_await net::this_coro::executor, std::chrono::milliseconds(50));
      co_await pause.async_wait(net::redirect_error(use_awaitable, ec));
      continue;
    }
    session->accepted();
    if constexpr (std::is_same_v<Protocol, tcp>) {
      session->socket().set_option(tcp::no_delay(true), ec);
    }
    // Over the limit: the oldest idle connection makes room; with none idle, a 503.
    const bool over = stats.open.load(std::memory_order_relaxed) > limits.max_connections;
    if (over && !evictOldestIdle()) {
      net::co_spawn(session->socket().get_executor(),
                    [session]() -> net::awaitable<void> { co_await session->refuseOverCapacity(); }, net::detached);
      continue;
    }
    net::co_spawn(session->socket().get_executor(), [session]() -> net::awaitable<void> { co_await session->run(); },
                  net::detached);
  }
}

Server::Server(Router router, Options options) : impl_(std::make_unique<Impl>(std::move(router), std::move(options))) {
  Impl& m = *impl_;
  const Options& o = m.options;
  if (o.port >= 0) {
    beast::error_code ec;
    const auto address = net::ip::make_address(o.host, ec);
    if (ec) throw std::runtime_error("http: " + o.host + " is not an IP address");
    tcp::acceptor& a = m.tcp_acceptor.emplace(m.ioc);
    const tcp::endpoint at(address, static_cast<unsigned short>(o.port));
    a.open(at.protocol(), ec);
    if (!ec) a.set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) a.bind(at, ec);
    if (!ec) a.listen(net::socket_base::max_listen_connections, ec);
    if (ec) {
      throw std::runtime_error("http: cannot listen on " + o.host + ":" + std::to_string(o.port) + ": " +
                               ec.message() + " (in use? set [http] listen or --listen)");
    }
    m.port = a.local_endpoint().port();
  }
  if (!o.unix_socket.empty()) {
    beast::error_code ec;
    ::unlink(o.unix_socket.c_str());   // a socket file left by an agent that did not stop cleanly
    unix_socket::acceptor& a = m.unix_acceptor.emplace(m.ioc);
    a.open(unix_socket(), ec);
    if (!ec) a.bind(unix_socket::endpoint(o.unix_socket), ec);
    if (!ec && ::chmod(o.unix_socket.c_str(), o.unix_socket_mode) != 0) ec.assign(errno, boost::system::system_category());
    if (!ec) a.listen(net::socket_base::max_listen_connections, ec);
    if (ec) throw std::runtime_error("http: cannot listen on unix socket " + o.unix_socket + ": " + ec.message());
  }
  if (m.tcp_acceptor) {
    net::co_spawn(m.ioc, m.acceptLoop<tcp::acceptor, tcp>(*m.tcp_acceptor), net::detached);
  }
  if (m.unix_acceptor) {
    net::co_spawn(m.ioc, m.acceptLoop<unix_socket::acceptor, unix_socket>(*m.unix_acceptor), net::detached);
  }
  net::co_spawn(m.ioc, m.sweep(), net::detached);
  const int n = o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 0; i < n; ++i) m.threads.emplace_back([&m] { m.ioc.run(); });
}

Server::~Server() {
  Impl& m = *impl_;
  net::post(m.ioc, [&m] {
    beast::error_code ignored;
    if (m.tcp_acceptor) m.tcp_acceptor->close(ignored);
    if (m.unix_acceptor) m.unix_acceptor->close(ignored);
  });
  m.ioc.stop();
  for (std::thread& t : m.threads) t.join();
  if (m.options.after_stop) m.options.after_stop();
  m.blocking.join();
  if (!m.options.unix_socket.empty()) ::unlink(m.options.unix_socket.c_str());
}

int Server::port() const noexcept { return impl_->port; }
const ServerStats& Server::stats() const noexcept { return impl_->stats; }

}  // namespace tokenfuse::http
