// http::Server on its own: a handler that streams its body, one that calls an upstream from the
// event loop, and one that waits without holding the loop's only thread.
#include "http_server.h"
#include "raw_http.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;
using namespace std::chrono_literals;
namespace net = boost::asio;

namespace {

net::awaitable<void> sleepFor(std::chrono::milliseconds d) {
  net::steady_timer t(co_await net::this_coro::executor, d);
  co_await t.async_wait(net::use_awaitable);
}

// GET http://127.0.0.1:port/path with Connection: close, on the caller's executor; the raw answer.
net::awaitable<std::string> upstreamGet(int port, std::string path) {
  net::ip::tcp::socket s(co_await net::this_coro::executor);
  co_await s.async_connect({net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)}, net::use_awaitable);
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  co_await net::async_write(s, net::buffer(req), net::use_awaitable);
  std::string out;
  boost::system::error_code ec;
  co_await net::async_read(s, net::dynamic_buffer(out), net::redirect_error(net::use_awaitable, ec));
  co_return out;
}

http::Server::Options oneThread() {
  http::Server::Options o;
  o.port = 0;
  o.threads = 1;   // so that a handler holding the thread would hold every connection
  return o;
}

}  // namespace

TEST_CASE("http::Server: a stream handler writes chunks as they come, a waiting handler holds no thread, and a "
          "handler calls an upstream from the event loop") {
  http::Router upstream_routes;
  upstream_routes.exact("GET", "/plain", [](const http::Request&, http::Response& res) {
    res.body = "hello from upstream";
    res.content_type = "text/plain";
  });
  http::Server upstream(std::move(upstream_routes), oneThread());
  const int upstream_port = upstream.port();

  http::Router routes;
  routes.stream("GET", "/ndjson", [](const http::Request&, http::Stream& out) -> net::awaitable<void> {
    co_await out.begin(200, "application/x-ndjson");
    for (int i = 0; i < 3; ++i) {
      if (!co_await out.write("{\"n\":" + std::to_string(i) + "}\n")) co_return;
      co_await sleepFor(50ms);
    }
  });
  routes.stream("GET", "/slow", [](const http::Request&, http::Stream& out) -> net::awaitable<void> {
    co_await sleepFor(1500ms);
    co_await out.write("done");
  });
  routes.stream("GET", "/proxy", [upstream_port](const http::Request&, http::Stream& out) -> net::awaitable<void> {
    const std::string answer = co_await upstreamGet(upstream_port, "/plain");
    co_await out.begin(200, "text/plain");
    co_await out.write(answer.substr(answer.find("\r\n\r\n") + 4));
  });
  routes.exact("GET", "/fast", [](const http::Request&, http::Response& res) { res.body = "{}"; });
  http::Server server(std::move(routes), oneThread());

  // A slow stream in flight on the only thread...
  const int slow = connectTcp(server.port());
  REQUIRE(sendAll(slow, "GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  std::this_thread::sleep_for(100ms);
  // ...and other requests are still answered at once.
  const auto t0 = std::chrono::steady_clock::now();
  const int fast = connectTcp(server.port());
  REQUIRE(sendAll(fast, "GET /fast HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  CHECK(readResponse(fast, 10s).status == 200);
  CHECK(std::chrono::steady_clock::now() - t0 < 500ms);
  ::close(fast);

  const int nd = connectTcp(server.port());
  REQUIRE(sendAll(nd, "GET /ndjson HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  const RawResponse lines = readResponse(nd, 10s);
  CHECK(lines.status == 200);
  CHECK(lines.head.find("Transfer-Encoding: chunked") != std::string::npos);
  CHECK(lines.body == "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n");
  ::close(nd);

  const int px = connectTcp(server.port());
  REQUIRE(sendAll(px, "GET /proxy HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  const RawResponse proxied = readResponse(px, 10s);
  CHECK(proxied.status == 200);
  CHECK(proxied.body == "hello from upstream");
  ::close(px);

  const RawResponse done = readResponse(slow, 10s);
  CHECK(done.status == 200);
  CHECK(done.body == "done");
  ::close(slow);
}

TEST_CASE("http::Server: a blocking handler runs off the event loop, which meanwhile answers others") {
  http::Router routes;
  routes.exact(
      "GET", "/block",
      [](const http::Request&, http::Response& res) {
        std::this_thread::sleep_for(800ms);   // as a slow SQLite write would
        res.body = "{}";
      },
      http::Router::Run::kBlocking);
  routes.exact("GET", "/fast", [](const http::Request&, http::Response& res) { res.body = "{}"; });
  http::Server server(std::move(routes), oneThread());
  const int blocked = connectTcp(server.port());
  REQUIRE(sendAll(blocked, "GET /block HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  std::this_thread::sleep_for(100ms);
  const auto t0 = std::chrono::steady_clock::now();
  const int fast = connectTcp(server.port());
  REQUIRE(sendAll(fast, "GET /fast HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  CHECK(readResponse(fast, 10s).status == 200);
  CHECK(std::chrono::steady_clock::now() - t0 < 500ms);   // not after the 800 ms of /block
  CHECK(readResponse(blocked, 10s).status == 200);
  ::close(fast);
  ::close(blocked);
}

TEST_CASE("http::loopbackHost: loopback names only, and a port only if numeric") {
  for (const char* ok : {"localhost", "localhost:1", "LocalHost:65535", "127.0.0.1", "127.0.0.1:8787", "[::1]", "[::1]:80"}) {
    CAPTURE(ok);
    CHECK(http::loopbackHost(ok));
  }
  for (const char* bad : {"", "localhost:evil", "localhost:", "localhost:65536", "localhost:+80", "127.0.0.2",
                          "evil.com", "localhost.evil.com", "[::1", "[::1]:", "[::1]x", "[::2]", "127.0.0.1:80:80"}) {
    CAPTURE(bad);
    CHECK_FALSE(http::loopbackHost(bad));
  }
}
