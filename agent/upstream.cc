#include "upstream.h"

#include "http_server.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <openssl/ssl.h>

#include <algorithm>
#include <limits>

namespace tokenfuse::proxy {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using net::ip::tcp;
using net::use_awaitable;

namespace {

constexpr auto kPoolIdle = std::chrono::seconds(30);   // upstreams commonly close idle connections after 60 s
constexpr std::size_t kPoolMax = 256;
constexpr std::uint32_t kMaxResponseHeader = 64 * 1024;


}  // namespace

struct Upstream::Tls {
  net::ssl::context ctx{net::ssl::context::tls_client};
};

struct Upstream::Connection {
  std::unique_ptr<tcp::socket> plain;
  std::unique_ptr<net::ssl::stream<tcp::socket>> tls;
  // Bounded: Beast 1.74 limits no chunk extension or trailer, so an upstream sending one without
  // end fails here (with buffer_overflow) instead of growing it.
  beast::flat_buffer buffer{kMaxResponseHeader + 64 * 1024};
  std::chrono::steady_clock::time_point idle_since;

  tcp::socket& socket() { return tls ? tls->next_layer() : *plain; }
};

// Cancels the connection's I/O when an operation outlasts its time. The timer runs on the
// call's executor, as the call's own I/O does, so that the two never touch the socket at once.
// It is started once per call: arming again only moves the due time later, and the timer, when
// it goes off early, waits again for the rest (a call makes several operations; each restart of
// a timer costs the event loop a little).
class Deadline {
 public:
  explicit Deadline(net::any_io_executor ex) : state_(std::make_shared<State>(std::move(ex))) {}
  ~Deadline() {
    state_->conn = nullptr;
    state_->timer.cancel();
  }
  void arm(Upstream::Connection& c, std::chrono::milliseconds after) {
    State& s = *state_;
    s.conn = &c;
    s.fired = false;
    s.due = std::chrono::steady_clock::now() + after;
    if (!s.waiting || s.timer.expiry() > s.due) wait(state_);
  }
  // True if the operation armed last was cut by the deadline.
  bool disarm() {
    state_->conn = nullptr;
    return state_->fired;
  }

 private:
  struct State {
    explicit State(net::any_io_executor ex) : timer(std::move(ex)) {}
    net::steady_timer timer;
    Upstream::Connection* conn = nullptr;   // nullptr: disarmed
    std::chrono::steady_clock::time_point due;
    bool waiting = false;
    bool fired = false;
  };
  static void wait(const std::shared_ptr<State>& state) {
    state->waiting = true;
    state->timer.expires_at(state->due);
    state->timer.async_wait([state](const boost::system::error_code& ec) {
      state->waiting = false;
      if (ec || state->conn == nullptr) return;   // cancelled, or the call is between operations
      if (std::chrono::steady_clock::now() < state->due) return wait(state);   // moved later meanwhile
      state->fired = true;
      boost::system::error_code ignored;
      state->conn->socket().cancel(ignored);
    });
  }
  std::shared_ptr<State> state_;
};

struct Exchange::Impl {
  Upstream* owner = nullptr;
  std::unique_ptr<Upstream::Connection> conn;
  bhttp::response_parser<bhttp::buffer_body> parser;
  Deadline deadline;
  std::chrono::milliseconds timeout;
  int status = 0;
  Headers headers;
  bool done = false;

  Impl(net::any_io_executor ex, std::chrono::milliseconds t) : deadline(std::move(ex)), timeout(t) {}

  // One read of the body into `buf`; the bytes read.
  net::awaitable<std::size_t> readSome(char* buf, std::size_t size) {
    parser.get().body().data = buf;
    parser.get().body().size = size;
    beast::error_code ec;
    deadline.arm(*conn, timeout);
    if (conn->tls) {
      co_await bhttp::async_read_some(*conn->tls, conn->buffer, parser, net::redirect_error(use_awaitable, ec));
    } else {
      co_await bhttp::async_read_some(*conn->plain, conn->buffer, parser, net::redirect_error(use_awaitable, ec));
    }
    const bool timed_out = deadline.disarm();
    if (ec == bhttp::error::need_buffer) ec = {};
    if (timed_out) {
      throw UpstreamError(UpstreamError::Kind::kTimeout,
                          "the upstream sent nothing for " + std::to_string(timeout.count()) + " ms");
    }
    if (ec) {
      throw UpstreamError(ec == bhttp::error::partial_message || ec == net::error::eof ||
                                  ec == net::error::connection_reset || ec == net::ssl::error::stream_truncated
                              ? UpstreamError::Kind::kConnect
                              : UpstreamError::Kind::kProtocol,
                          "the upstream's answer broke off: " + ec.message());
    }
    const std::size_t got = size - parser.get().body().size;
    if (parser.is_done()) {
      done = true;
      if (parser.keep_alive() && conn->buffer.size() == 0) owner->give(std::move(conn));
    }
    co_return got;
  }
};

Exchange::Exchange(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Exchange::Exchange(Exchange&&) noexcept = default;
Exchange& Exchange::operator=(Exchange&&) noexcept = default;
Exchange::~Exchange() {
  if (impl_ && impl_->conn) {
    impl_->deadline.disarm();
    boost::system::error_code ignored;
    impl_->conn->socket().close(ignored);   // mid-body: the upstream sees the call end
  }
}

int Exchange::status() const noexcept { return impl_->status; }
const Headers& Exchange::headers() const noexcept { return impl_->headers; }
std::string Exchange::header(std::string_view name) const {
  for (const auto& [k, v] : impl_->headers) {
    if (http::iequals(k, name)) return v;
  }
  return {};
}

net::awaitable<bool> Exchange::read(std::string* out) {
  char buf[16384];
  while (!impl_->done) {
    const std::size_t got = co_await impl_->readSome(buf, sizeof buf);
    if (got > 0) {
      out->append(buf, got);
      co_return true;
    }
  }
  co_return false;
}

net::awaitable<std::string> Exchange::readAll(std::size_t max_bytes) {
  std::string body;
  while (co_await read(&body)) {
    if (body.size() > max_bytes) {
      throw UpstreamError(UpstreamError::Kind::kTooLarge,
                          "the upstream's answer is larger than proxy.max_response_bytes (" + std::to_string(max_bytes) + ")");
    }
  }
  co_return body;
}

Upstream::Upstream(UpstreamConfig config) : config_(std::move(config)) {
  if (config_.url.tls) {
    tls_ = std::make_unique<Tls>();
    boost::system::error_code ec;
    tls_->ctx.set_verify_mode(net::ssl::verify_peer);
    if (config_.ca_file.empty()) {
      tls_->ctx.set_default_verify_paths(ec);
    } else {
      tls_->ctx.load_verify_file(config_.ca_file, ec);
    }
    if (ec) {
      throw ConfigError("proxy upstream " + config_.name + ": cannot load the CA certificates" +
                        (config_.ca_file.empty() ? std::string(" of the system") : " from " + config_.ca_file) + ": " +
                        ec.message());
    }
  }
}

Upstream::~Upstream() = default;

std::unique_ptr<Upstream::Connection> Upstream::take() {
  const auto now = std::chrono::steady_clock::now();
  std::unique_ptr<Connection> stale;   // closed outside the lock
  std::lock_guard lock(mu_);
  while (!idle_.empty()) {
    std::unique_ptr<Connection> c = std::move(idle_.back());
    idle_.pop_back();
    if (now - c->idle_since < kPoolIdle) return c;
    stale = std::move(c);
  }
  return nullptr;
}

void Upstream::dropIdle() {
  std::vector<std::unique_ptr<Connection>> idle;
  {
    std::lock_guard lock(mu_);
    idle.swap(idle_);
  }
}

void Upstream::give(std::unique_ptr<Connection> c) {
  c->idle_since = std::chrono::steady_clock::now();
  std::lock_guard lock(mu_);
  if (idle_.size() < kPoolMax) idle_.push_back(std::move(c));
}

net::awaitable<Exchange> Upstream::send(net::any_io_executor ex, std::string method, std::string path_and_query,
                                        Headers headers, std::string body) {
  const BaseUrl& url = config_.url;
  const bhttp::verb verb = bhttp::string_to_verb(method);
  bhttp::request<bhttp::string_body> req{verb, url.path + path_and_query, 11};
  const bool default_port = url.port == (url.tls ? "443" : "80");
  const std::string host = url.host.find(':') != std::string::npos ? "[" + url.host + "]" : url.host;
  req.set(bhttp::field::host, default_port ? host : host + ":" + url.port);
  for (auto& [k, v] : headers) req.insert(k, v);
  if (!config_.api_key.empty()) {
    if (config_.kind == "anthropic") {
      req.set("x-api-key", config_.api_key);
    } else {
      req.set(bhttp::field::authorization, "Bearer " + config_.api_key);
    }
  }
  req.body() = std::move(body);
  req.prepare_payload();
  req.keep_alive(true);

  const auto timeout = std::chrono::milliseconds(config_.timeout_ms);
  for (int attempt = 0;; ++attempt) {
    auto impl = std::make_unique<Exchange::Impl>(ex, timeout);
    impl->owner = this;
    impl->conn = attempt == 0 ? take() : nullptr;
    const bool reused = impl->conn != nullptr;
    Connection* c = impl->conn.get();
    beast::error_code ec;
    if (!reused) {
      impl->conn = std::make_unique<Connection>();
      c = impl->conn.get();
      tcp::resolver resolver(ex);
      const auto endpoints = co_await resolver.async_resolve(url.host, url.port, net::redirect_error(use_awaitable, ec));
      if (ec) {
        throw UpstreamError(UpstreamError::Kind::kConnect,
                            "cannot resolve " + url.host + " (upstream " + config_.name + "): " + ec.message());
      }
      if (tls_) {
        c->tls = std::make_unique<net::ssl::stream<tcp::socket>>(ex, tls_->ctx);
      } else {
        c->plain = std::make_unique<tcp::socket>(ex);
      }
      impl->deadline.arm(*c, std::chrono::milliseconds(config_.connect_timeout_ms));
      co_await net::async_connect(c->socket(), endpoints, net::redirect_error(use_awaitable, ec));
      if (!ec) c->socket().set_option(tcp::no_delay(true), ec);
      if (!ec && c->tls) {
        // SNI, and the certificate must name the host.
        if (SSL_set_tlsext_host_name(c->tls->native_handle(), url.host.c_str()) != 1) {
          ec = beast::error_code(static_cast<int>(::ERR_get_error()), net::error::get_ssl_category());
        }
        c->tls->set_verify_callback(net::ssl::host_name_verification(url.host));
        if (!ec) co_await c->tls->async_handshake(net::ssl::stream_base::client, net::redirect_error(use_awaitable, ec));
      }
      if (impl->deadline.disarm()) {
        throw UpstreamError(UpstreamError::Kind::kTimeout, "cannot connect to " + config_.base_url + " within " +
                                                               std::to_string(config_.connect_timeout_ms) + " ms");
      }
      if (ec) {
        throw UpstreamError(UpstreamError::Kind::kConnect,
                            "cannot connect to " + config_.base_url + ": " + ec.message());
      }
    }
    impl->deadline.arm(*c, timeout);
    if (c->tls) {
      co_await bhttp::async_write(*c->tls, req, net::redirect_error(use_awaitable, ec));
    } else {
      co_await bhttp::async_write(*c->plain, req, net::redirect_error(use_awaitable, ec));
    }
    if (!ec) {
      impl->parser.header_limit(kMaxResponseHeader);
      // The caller bounds what it keeps. (Not boost::none: Beast 1.74 compares a Content-Length
      // with the optional itself, and every length is greater than none.)
      impl->parser.body_limit(std::numeric_limits<std::uint64_t>::max());
      if (c->tls) {
        co_await bhttp::async_read_header(*c->tls, c->buffer, impl->parser, net::redirect_error(use_awaitable, ec));
      } else {
        co_await bhttp::async_read_header(*c->plain, c->buffer, impl->parser, net::redirect_error(use_awaitable, ec));
      }
    }
    if (impl->deadline.disarm()) {
      throw UpstreamError(UpstreamError::Kind::kTimeout,
                          "the upstream did not answer within " + std::to_string(config_.timeout_ms) + " ms");
    }
    // A pooled connection the upstream had closed fails before any answer: once more, anew.
    const bool closed_before_answer = ec == bhttp::error::end_of_stream || ec == net::error::eof ||
                                      ec == net::error::connection_reset || ec == net::error::broken_pipe ||
                                      ec == net::ssl::error::stream_truncated;
    if (ec && reused && closed_before_answer) {
      boost::system::error_code ignored;
      c->socket().close(ignored);
      continue;
    }
    if (ec) {
      throw UpstreamError(closed_before_answer ? UpstreamError::Kind::kConnect : UpstreamError::Kind::kProtocol,
                          "no valid answer from " + config_.base_url + ": " + ec.message());
    }
    const auto& res = impl->parser.get();
    impl->status = static_cast<int>(res.result_int());
    for (const auto& f : res) impl->headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    if (impl->parser.is_done()) {
      impl->done = true;
      if (impl->parser.keep_alive() && c->buffer.size() == 0) give(std::move(impl->conn));
    }
    co_return Exchange(std::move(impl));
  }
}

}  // namespace tokenfuse::proxy
