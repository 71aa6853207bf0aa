// The LLM proxy as applications meet it: the official SDKs from the npm registry (openai,
// @anthropic-ai/sdk, ollama; tests/sdk/scenarios.mjs) pointed at a real tokenfused, whose
// upstream is the LLM API stand-in. Each case checks what the client saw and what the ledger
// booked.
#include "proxy_support.h"

#include <openssl/evp.h>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

std::int64_t sum(const std::vector<LedgerRow>& rows, std::int64_t LedgerRow::*field) {
  std::int64_t n = 0;
  for (const LedgerRow& r : rows) n += r.*field;
  return n;
}

std::string tokens(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += "tok ";
  return s;
}

}  // namespace

TEST_CASE("proxy sdk: openai, anthropic and ollama clients, whole and streamed, see the upstream's answers and "
          "each call is booked from the usage it reported") {
  ProxyAgent p("proxy-sdk", "[budgets.tenants]\nacme = \"100.00\"\n");
  const json five = tokens(5);
  CHECK(p.sdk("openai_whole") ==
        json{{"text", five}, {"usage", {{"completion_tokens", 5}, {"prompt_tokens", 10}, {"total_tokens", 15}}}, {"model", "gpt-4o"}});
  // The proxy asks the stream for its usage; a client that did not ask never sees that chunk.
  CHECK(p.sdk("openai_stream") == json{{"text", five}, {"chunks", 5}, {"usage_chunks", 0}});
  CHECK(p.sdk("openai_stream_usage") ==
        json{{"text", five}, {"chunks", 5}, {"usage", {{"completion_tokens", 5}, {"prompt_tokens", 10}, {"total_tokens", 15}}}});
  CHECK(p.sdk("openai_embeddings") == json{{"dims", 3}, {"usage", {{"prompt_tokens", 10}, {"total_tokens", 10}}}});
  CHECK(p.sdk("openai_responses_stream") == json{{"text", five}, {"chunks", 5}});
  CHECK(p.sdk("openai_models") == json{{"ids", {"gpt-4o"}}});
  CHECK(p.sdk("anthropic_whole") == json{{"text", five}, {"usage", {{"input_tokens", 10}, {"output_tokens", 5}}}});
  CHECK(p.sdk("anthropic_stream") == json{{"text", five}, {"chunks", 5}});
  CHECK(p.sdk("ollama_whole") == json{{"text", five}, {"prompt_eval_count", 10}, {"eval_count", 5}});
  CHECK(p.sdk("ollama_stream") == json{{"text", five}, {"chunks", 5}});
  CHECK(p.sdk("ollama_generate_stream") == json{{"text", five}, {"chunks", 5}});
  CHECK(p.sdk("ollama_tags") == json{{"names", {"llama3.2:latest"}}});

  // Ten calls cost tokens (the listings are not calls); each is one ledger entry with the
  // upstream's usage, its provider, and the model priced (Ollama's as "ollama/...", free).
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 10);
  const char* models[] = {"gpt-4o",      "gpt-4o",      "gpt-4o",          "text-embedding-3-small", "gpt-4o",
                          "claude-test", "claude-test", "ollama/llama3.2", "ollama/llama3.2",        "ollama/llama3.2"};
  const char* providers[] = {"openai", "openai", "openai", "openai", "openai", "anthropic", "anthropic", "ollama", "ollama", "ollama"};
  for (std::size_t i = 0; i < rows.size(); ++i) {
    CAPTURE(i);
    CHECK(rows[i].project_id == "acme");
    CHECK(rows[i].run_id == "run-1");
    CHECK(rows[i].model == models[i]);
    CHECK(rows[i].provider == providers[i]);
    CHECK(rows[i].prompt_tokens == 10);
    CHECK(rows[i].completion_tokens == (i == 3 ? 0 : 5));
  }
  CHECK(rows[0].cost_nano == 50'000'000);   // 5 completion tokens at $0.01
  CHECK(rows[7].cost_nano == 0);            // a local model
  CHECK(p.client->tenant("acme").held == NanoUsd(0));
  CHECK(p.metric("tokenfuse_proxy_usage_estimated_total{upstream=\"openai\"}") == 0);

  // What the upstream received: the provider's key from the agent's file, never the client's
  // key nor the tokenfuse headers; an OpenAI stream asked for its usage.
  const std::vector<LlmStandin::Seen> seen = p.standin.seen();
  REQUIRE(seen.size() == 12);
  CHECK(seen[0].header("Authorization") == "Bearer sk-upstream-secret");
  CHECK(seen[0].header("X-Tokenfuse-Project").empty());
  CHECK(seen[0].header("X-Tokenfuse-Run").empty());
  CHECK(seen[6].header("x-api-key") == "sk-upstream-secret");
  CHECK(!seen[6].header("anthropic-version").empty());   // the SDK's own headers pass
  CHECK(seen[8].header("Authorization").empty());        // the ollama upstream has no key
  CHECK(json::parse(seen[1].body)["stream_options"]["include_usage"] == true);
}

TEST_CASE("proxy sdk: a stream is cut exactly at a $ limit: the client gets every token the limit pays for, then "
          "an error in its SDK's type with the code, the ledger books what was delivered, and the upstream is stopped") {
  // $1.00 is 100 completion tokens; the request names no max_tokens, so 1 token is held at
  // first and the hold grows chunk by chunk. The upstream would stream 150.
  ProxyAgent p("proxy-cut", "[budgets.tenants]\nacme = \"1.00\"\nbeta = \"0.50\"\n", "default_max_tokens = 1\n");
  p.standin.tokens = 150;
  p.standin.delay_ms = 1;

  const json seen = p.sdk("openai_stream");
  CHECK(seen["chunks"] == 100);
  CHECK(seen["text"] == tokens(100));
  CHECK(seen["failure"]["error"] == "APIError");
  CHECK(seen["failure"]["code"] == "E-BUDGET-002");
  CHECK(seen["failure"]["message"].get<std::string>().find("the stream was cut here") != std::string::npos);

  // Anthropic's requests carry max_tokens, which is held whole; this one asks for 1 and the
  // stand-in, like a server that ignores the limit, streams on.
  const json claude = p.sdk("anthropic_stream", {{"TENANT", "beta"}, {"MAX_TOKENS", "1"}});
  CHECK(claude["chunks"] == 50);
  CHECK(claude["failure"]["code"] == "E-BUDGET-002");
  CHECK(claude["failure"]["error"] == "APIError");

  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].completion_tokens == 100);
  CHECK(rows[0].cost_nano == 1'000'000'000);
  CHECK(rows[1].project_id == "beta");
  CHECK(rows[1].completion_tokens == 50);
  CHECK(rows[1].cost_nano == 500'000'000);
  const BudgetView acme = p.client->tenant("acme");
  CHECK(acme.committed == NanoUsd(1'000'000'000));   // the limit, not a token beyond
  CHECK(acme.held == NanoUsd(0));
  CHECK(p.client->tenant("beta").committed == NanoUsd(500'000'000));
  CHECK(eventually([&] { return p.standin.abandoned.load() == 2; }));   // both upstream calls were stopped
  CHECK(p.metric("tokenfuse_proxy_streams_cut_total{upstream=\"openai\"}") == 1);
}

TEST_CASE("proxy sdk: a denial reaches each SDK as its own error type with the E-BUDGET code, is not retried, and "
          "never reaches the upstream") {
  ProxyAgent p("proxy-deny", "[budgets.tenants]\nacme = \"0\"\n");
  const json openai = p.sdk("openai_denied");
  CHECK(openai["error"] == "RateLimitError");
  CHECK(openai["status"] == 429);
  CHECK(openai["code"] == "E-BUDGET-002");

  const json anthropic = p.sdk("anthropic_denied");
  CHECK(anthropic["error"] == "PaymentRequiredError");   // Anthropic's billing_error, 402
  CHECK(anthropic["status"] == 402);
  CHECK(anthropic["type"] == "billing_error");
  CHECK(anthropic["code"] == "E-BUDGET-002");

  // Ollama's models are free: the kill switch still stops them (E-BUDGET-004).
  CHECK(p.sdk("ollama_whole")["text"] == tokens(5));
  httplib::Client admin("127.0.0.1", p.port);
  const httplib::Result kill = admin.Put("/v1/kill", {{"Authorization", "Bearer " + p.f.adminToken()}},
                                         R"({"reason":"runaway loop"})", "application/json");
  REQUIRE(kill);
  REQUIRE(kill->status == 200);
  const json ollama = p.sdk("ollama_denied");
  CHECK(ollama["error"] == "ResponseError");
  CHECK(ollama["status"] == 429);
  CHECK(ollama["message"].get<std::string>().starts_with("E-BUDGET-004"));

  // SDKs retry a 429 unless told not to: each denial was asked for once.
  CHECK(p.metric("tokenfuse_proxy_requests_total{outcome=\"denied\",upstream=\"openai\"}") == 1);
  CHECK(p.metric("tokenfuse_proxy_requests_total{outcome=\"denied\",upstream=\"anthropic\"}") == 1);
  CHECK(p.metric("tokenfuse_proxy_requests_total{outcome=\"denied\",upstream=\"ollama\"}") == 1);
  CHECK(p.standin.requests() == 1);   // only the allowed Ollama call
  CHECK(p.ledger().size() == 1);
}

TEST_CASE("proxy sdk: a client that disconnects mid-stream books what was delivered and releases the rest") {
  ProxyAgent p("proxy-gone", "[budgets.tenants]\nacme = \"100.00\"\n");
  p.standin.tokens = 200;
  p.standin.delay_ms = 20;
  const json seen = p.sdk("openai_disconnect", {{"STOP_AFTER", "3"}});
  CHECK(seen["chunks"] == 3);
  CHECK(seen["aborted"].is_null());   // the openai SDK ends an aborted stream's loop quietly
  CHECK(eventually([&] { return p.standin.abandoned.load() == 1; }));   // the upstream call was stopped
  CHECK(eventually([&] { return p.client->info().ledger_appended == 1; }));
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 1);
  // Delivered: the 3 the client read, and at most the one or two in flight when it went.
  CHECK(rows[0].completion_tokens >= 3);
  CHECK(rows[0].completion_tokens <= 5);
  CHECK(p.client->tenant("acme").held == NanoUsd(0));
  CHECK(p.metric("tokenfuse_proxy_requests_total{outcome=\"client_gone\",upstream=\"openai\"}") == 1);
}

TEST_CASE("proxy sdk: an upstream that dies mid-stream ends the client's stream with an error and books what was "
          "delivered, one that refuses the connection books nothing") {
  ProxyAgent p("proxy-dies", "[budgets.tenants]\nacme = \"100.00\"\n");
  p.standin.tokens = 10;
  p.standin.die_after = 3;
  const json seen = p.sdk("openai_stream");
  CHECK(seen["chunks"] == 3);
  CHECK(seen["failure"]["error"] == "APIError");
  CHECK(seen["failure"]["message"].get<std::string>().find("upstream openai") != std::string::npos);
  const json claude = p.sdk("anthropic_stream");
  CHECK(claude["chunks"] == 3);
  CHECK(claude["failure"]["error"] == "APIError");
  const json llama = p.sdk("ollama_stream");
  CHECK(llama["chunks"] == 3);
  CHECK(llama["failure"]["message"].get<std::string>().find("upstream ollama") != std::string::npos);

  std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 3);
  for (const LedgerRow& r : rows) CHECK(r.completion_tokens == 3);
  CHECK(p.client->tenant("acme").held == NanoUsd(0));

  // The stand-in goes away: the SDK's retries each get a 502 in OpenAI's shape, nothing is booked.
  p.standin.status = 503;
  const json refused = p.sdk("openai_denied");
  CHECK(refused["error"] == "InternalServerError");
  CHECK(refused["status"] == 503);   // the upstream's own answer, relayed
  CHECK(p.ledger().size() == 3);
  CHECK(p.client->tenant("acme").held == NanoUsd(0));
}

TEST_CASE("proxy sdk: virtual keys name the tenant, a key the proxy does not know is refused as the SDK expects") {
  unsigned char md[32];
  unsigned len = 0;
  const std::string key = "tf-virtual-acme-0123456789";
  EVP_Digest(key.data(), key.size(), md, &len, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) {
    char b[3];
    std::snprintf(b, sizeof b, "%02x", md[i]);
    hex += b;
  }
  ProxyAgent p("proxy-keys", "[budgets.tenants]\nacme = \"100.00\"\n",
               "require_key = true\n[[proxy.keys]]\nsha256 = \"" + hex + "\"\ntenant = \"acme\"\nagent = \"batch-bot\"\n");
  CHECK(p.sdk("openai_key", {{"API_KEY", key}})["text"] == tokens(5));
  const json wrong = p.sdk("openai_key", {{"API_KEY", "tf-virtual-guess"}});
  CHECK(wrong["error"] == "AuthenticationError");
  CHECK(wrong["status"] == 401);
  // Headers cannot pick another tenant without a key.
  const json headers_only = p.sdk("openai_denied", {{"TENANT", "someone-else"}});
  CHECK(headers_only["status"] == 401);
  const std::vector<LedgerRow> rows = p.ledger();
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].project_id == "acme");
  CHECK(p.standin.seen()[0].header("Authorization") == "Bearer sk-upstream-secret");   // never the virtual key
}

TEST_CASE("proxy sdk: 200 concurrent streamed calls against a $1.00 limit spend at most $1.00, and every token a "
          "client received is booked") {
  ProxyAgent p("proxy-200", "[budgets.tenants]\nacme = \"1.00\"\n", "default_max_tokens = 1\n", 2);
  p.standin.tokens = 20;
  p.standin.delay_ms = 2;
  const json seen = p.sdk("openai_concurrent", {{"CALLS", "200"}});
  MESSAGE("outcomes: " << seen["outcomes"].dump());
  const std::vector<LedgerRow> rows = p.ledger();
  const std::int64_t cost = sum(rows, &LedgerRow::cost_nano);
  CHECK(cost <= 1'000'000'000);
  CHECK(cost == seen["tokens"].get<std::int64_t>() * 10'000'000);   // what clients got is what was booked
  CHECK(seen["tokens"].get<int>() >= 90);   // and the budget was used, not refused wholesale
  const BudgetView acme = p.client->tenant("acme");
  CHECK(acme.committed.count() == cost);
  CHECK(acme.held == NanoUsd(0));
}
