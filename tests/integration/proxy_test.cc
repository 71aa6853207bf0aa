// The LLM proxy at the HTTP level: what a hostile or broken client, a silent, refusing or failing
// upstream, and one that reports no usage each get, and what is booked for them.
#include "proxy_support.h"
#include "raw_http.h"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <zlib.h>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

struct Answer {
  int status = 0;
  json body;
  std::string raw;
  httplib::Headers headers;
};

Answer post(const ProxyAgent& p, const std::string& path, const std::string& body, httplib::Headers headers = {}) {
  httplib::Client c("127.0.0.1", p.port);
  c.set_read_timeout(30);
  headers.emplace("X-Tokenfuse-Project", "acme");
  const httplib::Result r = c.Post(path, headers, body, "application/json");
  REQUIRE_MESSAGE(r, "no answer from the agent for POST " << path);
  return {r->status, json::parse(r->body, nullptr, false), r->body, r->headers};
}

const std::string kChat = R"({"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"hi"}]})";

// An upstream that answers each connection with `head`, then `garbage` bytes of 'a' (written
// until the proxy stops reading), then closes: for answers no real server sends.
class ScriptedUpstream {
 public:
  ScriptedUpstream(std::string head, std::size_t garbage) : head_(std::move(head)), garbage_(garbage) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(fd_, 16) == 0);
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        const int c = ::accept(fd_, nullptr, nullptr);
        if (c < 0) return;
        std::string request;
        char buf[4096];
        while (request.find("\r\n\r\n") == std::string::npos) {   // the headers; the body is small
          const ssize_t n = ::read(c, buf, sizeof buf);
          if (n <= 0) break;
          request.append(buf, static_cast<std::size_t>(n));
        }
        ::send(c, head_.data(), head_.size(), MSG_NOSIGNAL);
        const std::string block(64 * 1024, 'a');
        for (std::size_t sent = 0; sent < garbage_; sent += block.size()) {
          if (::send(c, block.data(), block.size(), MSG_NOSIGNAL) <= 0) break;
          written += block.size();
        }
        ::close(c);
      }
    });
  }
  ~ScriptedUpstream() {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    thread_.join();
  }
  int port = 0;
  std::atomic<std::size_t> written{0};

 private:
  std::string head_;
  std::size_t garbage_;
  int fd_ = -1;
  std::thread thread_;
};

}  // namespace

TEST_CASE("proxy: a request the proxy cannot forward gets a 4xx in its API's shape, naming the problem, and never "
          "reaches the upstream") {
  ProxyAgent p("proxy-bad", "[budgets.tenants]\nacme = \"100.00\"\n", "max_request_bytes = 200000\n");
  Answer a = post(p, "/proxy/openai/v1/chat/completions", "{not json");
  CHECK(a.status == 400);
  CHECK(a.body["error"]["message"] == "the body is not valid JSON");
  CHECK(a.body["error"]["type"] == "invalid_request_error");

  a = post(p, "/proxy/anthropic/v1/messages", R"({"messages":[]})");
  CHECK(a.status == 400);
  CHECK(a.body == json{{"type", "error"}, {"error", {{"type", "invalid_request_error"}, {"message", "model is required (a non-empty string)"}, {"code", nullptr}}}});

  a = post(p, "/proxy/ollama/api/chat", R"({"model":"llama3.2","stream":"yes"})");
  CHECK(a.status == 400);
  CHECK(a.body["error"] == "stream must be true or false");

  a = post(p, "/proxy/nowhere/v1/chat/completions", kChat);
  CHECK(a.status == 404);
  CHECK(a.body["error"]["message"].get<std::string>().find("no upstream is named \"nowhere\"") != std::string::npos);

  a = post(p, "/proxy/anthropic/v1/chat/completions", kChat);   // an OpenAI path on an Anthropic upstream
  CHECK(a.status == 404);
  CHECK(a.body["error"]["type"] == "not_found_error");

  httplib::Headers no_tenant;
  httplib::Client c("127.0.0.1", p.port);
  const httplib::Result r = c.Post("/proxy/openai/v1/chat/completions", kChat, "application/json");
  REQUIRE(r);
  CHECK(r->status == 400);
  CHECK(json::parse(r->body)["error"]["message"].get<std::string>().find("names no tenant") != std::string::npos);

  // Larger bodies than the API's 64 KiB are proxied, up to proxy.max_request_bytes.
  const std::string big = R"({"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":")" +
                          std::string(150'000, 'a') + R"("}]})";
  CHECK(post(p, "/proxy/openai/v1/chat/completions", big).status == 200);
  CHECK(post(p, "/proxy/openai/v1/chat/completions", big + std::string(60'000, ' ')).status == 413);
  CHECK(post(p, "/v1/check", big).status == 413);   // the agent's own API keeps its limit

  CHECK(p.standin.requests() == 1);   // only the large call that fit
  CHECK(p.ledger().size() == 1);
  CHECK(p.metric("tokenfuse_proxy_requests_total{outcome=\"refused\",upstream=\"openai\"}") == 2);
}

TEST_CASE("proxy: the prompt's hold is estimated from its text, and a gzip body is read like any other") {
  ProxyAgent p("proxy-gzip", "[budgets.tenants]\nacme = \"100.00\"\n", "chars_per_token = 2.0\n");
  // 4,000 bytes of text at 2 bytes a token, 1 message: 2,004 prompt tokens held, 10 completion.
  const std::string body = R"({"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":")" +
                           std::string(4000, 'x') + R"("}]})";
  std::string gz(compressBound(body.size()) + 32, '\0');
  z_stream z{};
  REQUIRE(deflateInit2(&z, 6, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(body.data()));
  z.avail_in = static_cast<uInt>(body.size());
  z.next_out = reinterpret_cast<Bytef*>(gz.data());
  z.avail_out = static_cast<uInt>(gz.size());
  REQUIRE(deflate(&z, Z_FINISH) == Z_STREAM_END);
  gz.resize(z.total_out);
  deflateEnd(&z);
  p.standin.delay_ms = 300;   // a stream, slow enough to see its hold
  std::thread call([&] {
    const std::string streamed = R"({"model":"gpt-4o","max_tokens":10,"stream":true,"messages":[{"role":"user","content":")" +
                                 std::string(4000, 'x') + R"("}]})";
    CHECK(post(p, "/proxy/openai/v1/chat/completions", streamed).status == 200);
  });
  // The price charges completions only ($0.01 each): the 10 held are $0.10.
  CHECK(eventually([&] { return p.client->tenant("acme").held == NanoUsd(100'000'000); }));
  call.join();
  p.standin.delay_ms = 0;
  const Answer a = post(p, "/proxy/openai/v1/chat/completions", gz, {{"Content-Encoding", "gzip"}});
  CHECK(a.status == 200);
  CHECK(json::parse(p.standin.seen().back().body)["messages"][0]["content"].get<std::string>().size() == 4000);
  CHECK(p.ledger().size() == 2);
}

TEST_CASE("proxy: an upstream that refuses, stays silent or fails books nothing, answers in the client's shape, and "
          "leaves no hold") {
  // A port with a listener that never answers, and one with nothing behind it.
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::acceptor silent(ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  const int silent_port = silent.local_endpoint().port();
  int closed_port = 0;
  {
    boost::asio::ip::tcp::acceptor a(ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
    closed_port = a.local_endpoint().port();
  }
  ProxyAgent p("proxy-down", "[budgets.tenants]\nacme = \"100.00\"\n",
               "[[proxy.upstreams]]\nname = \"silent\"\nkind = \"anthropic\"\ntimeout_ms = 300\nbase_url = \"http://127.0.0.1:" +
                   std::to_string(silent_port) + "\"\n[[proxy.upstreams]]\nname = \"gone\"\nkind = \"ollama\"\n"
                   "base_url = \"http://127.0.0.1:" + std::to_string(closed_port) + "\"\n");
  Answer a = post(p, "/proxy/silent/v1/messages", R"({"model":"claude-test","max_tokens":10,"messages":[]})");
  CHECK(a.status == 504);
  CHECK(a.body["error"]["type"] == "timeout_error");
  CHECK(a.body["error"]["message"].get<std::string>().find("within 300 ms") != std::string::npos);

  a = post(p, "/proxy/gone/api/chat", R"({"model":"llama3.2","stream":false})");
  CHECK(a.status == 502);
  CHECK(a.body["error"].get<std::string>().find("cannot connect") != std::string::npos);

  // The upstream's own error answer is relayed as it came; nothing was generated, nothing booked.
  a = post(p, "/proxy/openai/v1/chat/completions", kChat, {{"X-Standin-Status", "500"}});
  CHECK(a.status == 500);
  CHECK(a.body["error"]["message"] == "the stand-in was asked to fail");

  // Meanwhile the agent answers everything else.
  httplib::Client c("127.0.0.1", p.port);
  const httplib::Result health = c.Get("/healthz");
  REQUIRE(health);
  CHECK(health->status == 200);
  CHECK(p.ledger().empty());
  CHECK(p.client->tenant("acme").held == NanoUsd(0));
  CHECK(p.metric("tokenfuse_proxy_upstream_errors_total{kind=\"timeout\",upstream=\"silent\"}") == 1);
  CHECK(p.metric("tokenfuse_proxy_upstream_errors_total{kind=\"connect\",upstream=\"gone\"}") == 1);
}

TEST_CASE("proxy: an upstream that reports no usage is booked from the estimate, and counted") {
  ProxyAgent p("proxy-nousage", "[budgets.tenants]\nacme = \"100.00\"\n");
  // "tok " x 5 is 20 bytes: 5 tokens at 4 bytes a token; the prompt "hi" and one message: 1 + 4.
  Answer a = post(p, "/proxy/openai/v1/chat/completions", kChat, {{"X-Standin-No-Usage", "1"}});
  CHECK(a.status == 200);
  a = post(p, "/proxy/openai/v1/chat/completions",
           R"({"model":"gpt-4o","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"hi"}]})",
           {{"X-Standin-No-Usage", "1"}});
  CHECK(a.status == 200);
  CHECK(a.raw.find("data: [DONE]") != std::string::npos);
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 2);
  for (const LedgerRow& r : rows) {
    CHECK(r.prompt_tokens == 5);
    CHECK(r.completion_tokens == 5);
  }
  CHECK(p.metric("tokenfuse_proxy_usage_estimated_total{upstream=\"openai\"}") == 2);
}

TEST_CASE("proxy: the kill switch turned on mid-stream cuts the stream at the next chunk (E-BUDGET-004)") {
  ProxyAgent p("proxy-kill", "[budgets.tenants]\nacme = \"100.00\"\n");
  p.standin.tokens = 1000;
  p.standin.delay_ms = 5;
  std::string received;
  std::atomic<bool> first{false};
  std::thread reader([&] {
    httplib::Client c("127.0.0.1", p.port);
    c.set_read_timeout(30);
    httplib::Request req;
    req.method = "POST";
    req.path = "/proxy/ollama/api/chat";
    req.headers = {{"X-Tokenfuse-Project", "acme"}};
    req.body = R"({"model":"llama3.2","messages":[{"role":"user","content":"hi"}]})";
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char* data, std::size_t n, std::uint64_t, std::uint64_t) {
      received.append(data, n);
      first = true;
      return true;
    };
    CHECK(c.send(req));
  });
  REQUIRE(eventually([&] { return first.load(); }));
  httplib::Client admin("127.0.0.1", p.port);
  const httplib::Result kill = admin.Put("/v1/kill", {{"Authorization", "Bearer " + p.f.adminToken()}},
                                         R"({"reason":"stop everything"})", "application/json");
  REQUIRE(kill);
  CHECK(kill->status == 200);
  reader.join();
  const std::size_t last = received.rfind('\n', received.size() - 2);
  const json end = json::parse(received.substr(last + 1));
  CHECK(end["code"] == "E-BUDGET-004");
  CHECK(end["error"].get<std::string>().starts_with("E-BUDGET-004"));
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].completion_tokens > 0);
  CHECK(rows[0].completion_tokens < 1000);
  CHECK(eventually([&] { return p.standin.abandoned.load() == 1; }));
}

TEST_CASE("proxy: review findings: an unknown key is refused once keys exist, the client's cookies and account "
          "headers never reach the upstream, a non-boolean include_usage is no error, and the agent stops cleanly "
          "with pooled connections") {
  ProxyAgent p("proxy-review", "[budgets.tenants]\nacme = \"100.00\"\n",
               "[[proxy.keys]]\nsha256 = \"" + std::string(64, 'a') + "\"\ntenant = \"acme\"\n");
  // A revoked or mistyped key does not fall back to paying by header.
  Answer a = post(p, "/proxy/openai/v1/chat/completions", kChat, {{"Authorization", "Bearer sk-revoked"}});
  CHECK(a.status == 401);
  // Without a key, the header still names the tenant (require_key is false).
  a = post(p, "/proxy/openai/v1/chat/completions",
           R"({"model":"gpt-4o","max_tokens":10,"stream":true,"stream_options":{"include_usage":1},"messages":[]})",
           {{"Cookie", "session=secret"}, {"OpenAI-Organization", "org-other"}, {"X-Forwarded-For", "10.0.0.1"},
            {"api-key", "azure-key"}});
  CHECK(a.status == 200);
  const LlmStandin::Seen seen = p.standin.seen().back();
  CHECK(seen.header("Cookie").empty());
  CHECK(seen.header("OpenAI-Organization").empty());
  CHECK(seen.header("X-Forwarded-For").empty());
  CHECK(seen.header("api-key").empty());
  CHECK(json::parse(seen.body)["stream_options"]["include_usage"] == true);
  CHECK(a.raw.find("\"usage\":{") == std::string::npos);   // the client asked with a non-boolean: not given
  CHECK(p.ledger().size() == 1);
  // A pooled upstream connection is open; SIGTERM stops the agent cleanly (under ASan, a
  // connection outliving its event loop would be reported here).
  p.agent->signal(SIGTERM);
  CHECK(p.agent->wait(std::chrono::seconds(30)) == 0);
}

TEST_CASE("proxy: an https upstream is reached through OpenSSL, its certificate checked against the configured CA "
          "and its name, one the CA store does not vouch for is refused with a 502") {
  TempDir tls;
  // A self-signed certificate for "localhost", made here with the openssl tool.
  Process make({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                "-addext", "subjectAltName=DNS:localhost", "-keyout", tls.path + "/key.pem", "-out", tls.path + "/cert.pem"},
               tls.path + "/openssl.out");
  REQUIRE_MESSAGE(make.wait(std::chrono::seconds(60)) == 0, make.output());
  Process upstream({"/usr/bin/env", "python3", std::string(TOKENFUSE_SOURCE_DIR) + "/tests/standin/tls_upstream.py",
                    tls.path + "/cert.pem", tls.path + "/key.pem"},
                   tls.path + "/upstream.out");
  int port = 0;
  REQUIRE_MESSAGE(eventually([&] {
                    std::istringstream in(upstream.output());
                    return static_cast<bool>(in >> port) && port > 0;
                  }),
                  upstream.output());
  const std::string base = "https://localhost:" + std::to_string(port);
  ProxyAgent p("proxy-tls", "[budgets.tenants]\nacme = \"100.00\"\n",
               "[[proxy.upstreams]]\nname = \"tls\"\nkind = \"openai\"\nbase_url = \"" + base + "\"\nca_file = \"" +
                   tls.path + "/cert.pem\"\napi_key_file = \"" + tls.path + "/cert.pem\"\n"
                   "[[proxy.upstreams]]\nname = \"untrusted\"\nkind = \"openai\"\nbase_url = \"" + base + "\"\n");
  Answer a = post(p, "/proxy/tls/v1/chat/completions", kChat);
  CHECK(a.status == 200);
  CHECK(a.body["choices"][0]["message"]["content"] == "over tls");
  CHECK(a.body["authorization_seen"] == "Bearer -----BEGIN CERTIFICATE-----");   // the key file's first line, injected
  a = post(p, "/proxy/tls/v1/chat/completions", kChat);   // again, on the pooled connection
  CHECK(a.status == 200);
  a = post(p, "/proxy/untrusted/v1/chat/completions", kChat);   // the system's store does not know this CA
  CHECK(a.status == 502);
  CHECK(a.body["error"]["message"].get<std::string>().find("certificate verify failed") != std::string::npos);
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].provider == "tls");
  CHECK(rows[0].prompt_tokens == 7);
  CHECK(rows[0].completion_tokens == 2);
  CHECK(p.client->tenant("acme").held == NanoUsd(0));
}

TEST_CASE("proxy: an upstream that says 200 and then breaks off, or sends a chunk header without end, gets a 502, "
          "its hold is booked, and the agent's memory stays bounded") {
  // 200 with a body 1000 bytes long, of which 10 come.
  ScriptedUpstream short_body("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"id\":\"x\"", 0);
  // A chunk size followed by an extension that never ends: 256 MiB of it, if the proxy kept reading.
  ScriptedUpstream endless("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1;", 256u << 20);
  ProxyAgent p("proxy-broken", "[budgets.tenants]\nacme = \"100.00\"\n",
               "[[proxy.upstreams]]\nname = \"short\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:" +
                   std::to_string(short_body.port) + "\"\n[[proxy.upstreams]]\nname = \"endless\"\nkind = \"openai\"\n"
                   "base_url = \"http://127.0.0.1:" + std::to_string(endless.port) + "\"\n");
  const long rss_before = procStatus(p.agent->pid(), "VmRSS");
  Answer a = post(p, "/proxy/short/v1/chat/completions", kChat);
  CHECK(a.status == 502);
  CHECK(a.body["error"]["message"].get<std::string>().find("broke off") != std::string::npos);
  a = post(p, "/proxy/endless/v1/chat/completions", kChat);
  CHECK(a.status == 502);
  CHECK(endless.written.load() < (64u << 20));   // the proxy stopped reading long before the end
  CHECK(procStatus(p.agent->pid(), "VmRSS") - rss_before < 32 * 1024);
  // The upstream accepted both calls, so each books its hold: "hi" and a message (5 tokens) and
  // max_tokens 10, at $0.01 a completion token.
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 2);
  for (const LedgerRow& r : rows) {
    CHECK(r.prompt_tokens == 5);
    CHECK(r.completion_tokens == 10);
  }
  CHECK(p.client->tenant("acme").held == NanoUsd(0));
  CHECK(p.metric("tokenfuse_proxy_usage_estimated_total{upstream=\"short\"}") == 1);
}

