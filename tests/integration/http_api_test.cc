// The localhost HTTP API against a real tokenfused on port 0.
#include "agent_process.h"

#include <httplib.h>

#include <atomic>
#include <csignal>
#include <regex>
#include <sstream>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

struct HttpFixture : AgentFixture {
  explicit HttpFixture(const char* what, const std::string& extra = "") : AgentFixture(what, extra) {
    agent = start();
    client = waitForRegion(agent->pid());
    port = httpPort();
    token = adminToken();
  }
  httplib::Client http() const {
    httplib::Client c("127.0.0.1", port);
    c.set_connection_timeout(10);
    c.set_read_timeout(10);
    return c;
  }
  // POST/PUT with a JSON body; returns (status, parsed body or null).
  std::pair<int, json> send(const char* method, const std::string& path, const std::string& body,
                            bool admin = false) const {
    httplib::Client c = http();
    httplib::Headers h;
    if (admin) h.emplace("Authorization", "Bearer " + token);
    httplib::Result r = std::string(method) == "POST"  ? c.Post(path, h, body, "application/json")
                        : std::string(method) == "PUT" ? c.Put(path, h, body, "application/json")
                        : std::string(method) == "DELETE" ? c.Delete(path, h)
                                                          : c.Get(path, h);
    REQUIRE_MESSAGE(r, "no answer from the agent for " << method << " " << path);
    return {r->status, r->body.empty() ? json(nullptr) : json::parse(r->body)};
  }

  // Stops the agent and starts it again; with `new_region`, on a new region, as after a reboot.
  void restart(bool new_region) {
    agent->signal(SIGTERM);
    REQUIRE(agent->wait() == 0);
    client.reset();
    if (new_region) Region::remove(shm);
    agent = start();
    client = waitForRegion(agent->pid());
    port = httpPort();
  }

  std::unique_ptr<Process> agent;
  std::unique_ptr<Client> client;
  int port = 0;
  std::string token;
};

}  // namespace

TEST_CASE("http: check, reserve, charge, commit, release and usage behave as the library does") {
  HttpFixture f("http", "[budgets.tenants]\nacme = \"0.05\"\n");
  auto [s1, check] = f.send("POST", "/v1/check", R"({"project_id":"acme","model":"gpt-4o"})");
  CHECK(s1 == 200);
  CHECK(check == json{{"allowed", true}, {"estimated_cost_usd", "0.020000"}});

  auto [s2, res] = f.send("POST", "/v1/reservations",
                          R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":1000,
                              "estimated_completion_tokens":1000,"run_id":"r1","agent_id":"a1","ttl_s":60})");
  CHECK(s2 == 201);
  CHECK(res["reserved_usd"] == "0.020000");
  const std::string id = res["reservation_id"];
  CHECK(f.client->tenant("acme").held == NanoUsd(20'000'000));

  auto [s3, charge] = f.send("POST", "/v1/reservations/" + id + "/charge", R"({"prompt_tokens":1000,"completion_tokens":500})");
  CHECK(s3 == 200);
  CHECK(charge["consumed_usd"] == "0.012500");
  auto [s4, commit] = f.send("POST", "/v1/reservations/" + id + "/commit",
                             R"({"provider":"openai","prompt_tokens":1000,"completion_tokens":500})");
  CHECK(s4 == 200);
  CHECK(commit["cost_usd"] == "0.012500");
  CHECK(commit["ledger_seq"] == 1);
  CHECK(f.client->tenant("acme").committed == NanoUsd(12'500'000));
  CHECK(f.client->tenant("acme").held == NanoUsd(0));

  auto [s5, again] = f.send("POST", "/v1/reservations/" + id + "/commit", R"({"prompt_tokens":1,"completion_tokens":1})");
  CHECK(s5 == 404);
  CHECK(again["error_code"] == "E-TOKENFUSE-UNKNOWN-RESERVATION");

  auto [s6, r2] = f.send("POST", "/v1/reservations", R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":10})");
  REQUIRE(s6 == 201);
  CHECK(f.send("DELETE", "/v1/reservations/" + std::string(r2["reservation_id"]), "").first == 204);
  CHECK(f.send("DELETE", "/v1/reservations/" + std::string(r2["reservation_id"]), "").first == 404);

  auto [s7, usage] = f.send("POST", "/v1/usage",
                            R"({"project_id":"acme","model":"qwen3:8b","provider":"ollama","prompt_tokens":5,"completion_tokens":7})");
  CHECK(s7 == 201);
  CHECK(usage["cost_usd"] == "0.000000");

  // Over the limit now: 0.0125 + 0.04 > 0.05.
  auto [s8, denied] = f.send("POST", "/v1/check", R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":8000})");
  CHECK(s8 == 402);
  CHECK(denied["allowed"] == false);
  CHECK(denied["error_code"] == "E-BUDGET-002");
  CHECK(denied["message"] == "Tenant acme budget exhausted: used $0.0125 / $0.0500");

  auto [s9, tenant] = f.send("GET", "/v1/tenants/acme", "");
  CHECK(s9 == 200);
  CHECK(tenant["used_usd"] == "0.012500");
  CHECK(tenant["reserved_usd"] == "0.000000");
  CHECK(tenant["limit_usd"] == "0.050000");
  CHECK(tenant["usage_pct"] == 25.0);
  CHECK(f.send("GET", "/v1/platform", "").second["limit_usd"].is_null());
  CHECK(f.send("GET", "/v1/runs/r1", "").second["used_usd"] == "0.012500");
  CHECK(f.send("GET", "/healthz", "").first == 200);
}

TEST_CASE("http: admin endpoints need the bearer token and change limits and the kill switch") {
  HttpFixture f("httpadmin");
  CHECK(f.send("PUT", "/v1/tenants/acme/limit", R"({"daily_limit_usd":"1.00"})").first == 401);
  auto [s1, t] = f.send("PUT", "/v1/tenants/acme/limit", R"({"daily_limit_usd":"1.00"})", true);
  CHECK(s1 == 200);
  CHECK(t["limit_usd"] == "1.000000");
  CHECK(f.client->tenant("acme").limit == NanoUsd::fromWholeUsd(1));
  CHECK(f.send("PUT", "/v1/tenants/acme/limit", R"({"daily_limit_usd":null})", true).second["limit_usd"].is_null());
  CHECK(f.send("PUT", "/v1/platform/limit", R"({"daily_limit_usd":"100"})", true).first == 200);
  CHECK(f.client->platform().limit == NanoUsd::fromWholeUsd(100));
  CHECK(f.send("PUT", "/v1/runs/run-9/limit", R"({"limit_usd":"0.5"})", true).first == 200);
  CHECK(f.client->run("run-9").limit == NanoUsd(500'000'000));

  CHECK(f.send("PUT", "/v1/kill", R"({"reason":"runaway loop"})").first == 401);
  auto [s2, kill] = f.send("PUT", "/v1/kill", R"({"reason":"runaway loop"})", true);
  CHECK(s2 == 200);
  CHECK(kill["active"] == true);
  CHECK_FALSE(kill["expires_at_unix_ms"].is_null());   // seven days, as the reference
  CHECK(f.send("POST", "/v1/check", R"({"project_id":"x","model":"qwen3:8b"})").second["error_code"] == "E-BUDGET-004");
  CHECK(f.send("GET", "/v1/kill", "").second["reason"] == "runaway loop");
  CHECK(f.send("DELETE", "/v1/kill", "", true).first == 204);
  CHECK(f.send("POST", "/v1/check", R"({"project_id":"x","model":"qwen3:8b"})").first == 200);
}

TEST_CASE("http: admin changes are saved, outlive a restart and win over the config file until reset") {
  HttpFixture f("httpsaved", "[budgets]\nplatform_daily_limit_usd = \"50\"\ntenant_default_daily_limit_usd = \"3\"\n"
                             "[budgets.tenants]\nacme = \"0.05\"\n");
  CHECK(f.send("PUT", "/v1/tenants/acme/limit", R"({"daily_limit_usd":"1.00"})", true).first == 200);
  CHECK(f.send("PUT", "/v1/tenants/beta/limit", R"({"daily_limit_usd":null})", true).first == 200);
  CHECK(f.send("PUT", "/v1/platform/limit", R"({"daily_limit_usd":"70"})", true).first == 200);
  CHECK(f.send("PUT", "/v1/kill", R"({"reason":"runaway loop","ttl_s":3600})", true).first == 200);
  CHECK_FALSE(f.client->tenant("beta").limit.has_value());

  // A restart, with a new region as after a reboot: the changes come back from the data dir.
  f.restart(/*new_region=*/true);
  CHECK(f.client->tenant("acme").limit == NanoUsd::fromWholeUsd(1));
  CHECK(f.client->platform().limit == NanoUsd::fromWholeUsd(70));
  CHECK(f.client->killSwitch().active);
  CHECK(f.client->killSwitch().reason == "runaway loop");
  CHECK(f.send("POST", "/v1/check", R"({"project_id":"beta","model":"gpt-4o"})").second["error_code"] == "E-BUDGET-004");

  // Reset: the config file's limits again; the kill switch off, and it stays off after a restart.
  CHECK(f.send("DELETE", "/v1/tenants/acme/limit", "", true).second["limit_usd"] == "0.050000");
  CHECK(f.send("DELETE", "/v1/platform/limit", "", true).second["limit_usd"] == "50.000000");
  CHECK(f.send("DELETE", "/v1/tenants/acme/limit", "").first == 401);
  CHECK(f.send("DELETE", "/v1/kill", "", true).first == 204);
  f.agent->signal(SIGTERM);
  REQUIRE(f.agent->wait() == 0);
  f.agent = f.start();
  f.client = f.waitForRegion(f.agent->pid());
  f.port = f.httpPort();
  CHECK(f.client->tenant("acme").limit == NanoUsd(50'000'000));
  CHECK_FALSE(f.client->tenant("beta").limit.has_value());   // still the saved "unlimited", not the default $3
  CHECK(f.client->tenant("gamma").limit == NanoUsd::fromWholeUsd(3));
  CHECK(f.client->platform().limit == NanoUsd::fromWholeUsd(50));
  CHECK_FALSE(f.client->killSwitch().active);
  CHECK(f.send("DELETE", "/v1/tenants/beta/limit", "", true).second["limit_usd"] == "3.000000");
}

TEST_CASE("http: a saved kill switch that has expired is not restored at start") {
  HttpFixture f("httpexpired");
  CHECK(f.send("PUT", "/v1/kill", R"({"reason":"short","ttl_s":1})", true).first == 200);
  CHECK(f.client->killSwitch().active);
  f.agent->signal(SIGTERM);
  REQUIRE(f.agent->wait() == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  f.client.reset();
  Region::remove(f.shm);
  f.agent = f.start();
  f.client = f.waitForRegion(f.agent->pid());
  CHECK_FALSE(f.client->killSwitch().active);
}

TEST_CASE("http: the ledger endpoint pages through durable entries, for the admin only") {
  HttpFixture f("httpledger");
  for (int i = 0; i < 5; ++i) {
    const std::string body = R"({"project_id":")" + std::string(i % 2 == 0 ? "acme" : "beta") +
                             R"(","model":"gpt-4o","provider":"openai","prompt_tokens":1000,"completion_tokens":0})";
    REQUIRE(f.send("POST", "/v1/usage", body).first == 201);
  }
  REQUIRE(f.client->waitDurable(5, 10000));
  CHECK(f.send("GET", "/v1/ledger", "").first == 401);
  auto [s1, page1] = f.send("GET", "/v1/ledger?project_id=acme&limit=2", "", true);
  CHECK(s1 == 200);
  REQUIRE(page1["entries"].size() == 2);
  CHECK(page1["entries"][0]["seq"] == 1);
  CHECK(page1["entries"][1]["seq"] == 3);
  CHECK(page1["entries"][0]["cost_usd"] == "0.005000");
  CHECK(page1["entries"][0]["kind"] == "record");
  CHECK(page1["entries"][0]["run_id"].is_null());
  CHECK(page1["durable_seq"] == 5);
  auto [s2, page2] = f.send("GET", "/v1/ledger?project_id=acme&since_seq=" + page1["next_since_seq"].dump(), "", true);
  CHECK(s2 == 200);
  REQUIRE(page2["entries"].size() == 1);
  CHECK(page2["entries"][0]["seq"] == 5);
  auto [s3, bad] = f.send("GET", "/v1/ledger?limit=-3", "", true);
  CHECK(s3 == 400);
  CHECK(bad["field"] == "limit");
  CHECK(f.send("GET", "/v1/ledger?since_seq=abc", "", true).second["field"] == "since_seq");
}

// The value of one sample in Prometheus text ("name{labels} value"), or -1 if it is absent.
double sampleValue(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

TEST_CASE("http: /metrics is Prometheus text, and its counters move with decisions") {
  HttpFixture f("httpmetrics", "[budgets.tenants]\nacme = \"0.01\"\n");
  auto scrape = [&] {
    httplib::Client c = f.http();
    auto r = c.Get("/metrics");
    REQUIRE(r);
    CHECK(r->status == 200);
    CHECK(r->get_header_value("Content-Type").rfind("text/plain; version=0.0.4", 0) == 0);
    return r->body;
  };
  const std::string before = scrape();
  // Every line is a comment or "name{labels} value" with a number for value.
  std::istringstream lines(before);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    CAPTURE(line);
    const auto space = line.rfind(' ');
    REQUIRE(space != std::string::npos);
    CHECK(std::regex_match(line.substr(0, space), std::regex(R"([a-z_:][a-z0-9_:]*(\{([a-z_]+="[^"]*",?)*\})?)")));
    CHECK_NOTHROW((void)std::stod(line.substr(space + 1)));
  }
  CHECK(sampleValue(before, R"(tokenfuse_denials_total{error_code="E-BUDGET-002"})") == 0);
  CHECK(sampleValue(before, "tokenfuse_kill_switch_active") == 0);

  CHECK(f.send("POST", "/v1/check", R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":100})").first == 200);
  CHECK(f.send("POST", "/v1/check", R"({"project_id":"acme","model":"gpt-4o"})").first == 402);
  CHECK(f.client->check("acme", "gpt-4o", 4000).code == Code::kTenantBudgetExhausted);   // the library counts too
  Reservation r;
  REQUIRE(f.client->reserve(Call{"acme", "gpt-4o", {}, {}, 100, 0, 0}, &r).allowed());
  const std::string after = scrape();
  CHECK(sampleValue(after, R"(tokenfuse_denials_total{error_code="E-BUDGET-002"})") == 2);
  CHECK(sampleValue(after, R"(tokenfuse_http_decisions_total{endpoint="check",error_code="",result="allowed"})") == 1);
  CHECK(sampleValue(after,
                    R"(tokenfuse_http_decisions_total{endpoint="check",error_code="E-BUDGET-002",result="refused"})") == 1);
  CHECK(sampleValue(after, "tokenfuse_reservations_live") == 1);
  CHECK(sampleValue(after, R"(tokenfuse_tenant_limit_usd{project_id="acme"})") == doctest::Approx(0.01));
  CHECK(sampleValue(after, "tokenfuse_platform_reserved_usd") == doctest::Approx(0.0005));
}

TEST_CASE("http: bad requests get 400 naming the field, and change nothing") {
  HttpFixture f("httpbad");
  const auto bad = [&](const std::string& path, const std::string& body, const char* field) {
    auto [status, j] = f.send("POST", path, body);
    CAPTURE(body);
    CHECK(status == 400);
    CHECK(j["field"] == field);
  };
  bad("/v1/check", "{not json", "body");
  bad("/v1/check", "[1,2]", "body");
  bad("/v1/check", R"({"model":"gpt-4o"})", "project_id");
  bad("/v1/check", R"({"project_id":"acme","model":42})", "model");
  bad("/v1/check", R"({"project_id":"acme","model":"m","estimated_prompt_tokens":-1})", "estimated_prompt_tokens");
  bad("/v1/check", R"({"project_id":"acme","model":"m","estimated_prompt_tokens":1e30})", "estimated_prompt_tokens");
  bad("/v1/check", R"({"project_id":")" + std::string(200, 'x') + R"(","model":"m"})", "project_id");
  bad("/v1/reservations", R"({"project_id":"acme","model":"gpt-4o"})", "estimated_prompt_tokens");
  bad("/v1/usage", R"({"project_id":"acme","model":"gpt-4o","provider":"o","prompt_tokens":"10","completion_tokens":1})",
      "prompt_tokens");
  auto [s1, j1] = f.send("PUT", "/v1/tenants/acme/limit", R"({"daily_limit_usd":1.5})", true);
  CHECK(s1 == 400);
  CHECK(j1["field"] == "daily_limit_usd");
  CHECK(f.send("POST", "/v1/reservations/99999/commit", R"({"prompt_tokens":1,"completion_tokens":1})").first == 404);
  CHECK(f.send("DELETE", "/v1/reservations/99999999999999999999999", "").first == 404);   // beyond 2^64

  httplib::Client c = f.http();
  auto big = c.Post("/v1/check", std::string(100 * 1024, ' '), "application/json");
  REQUIRE(big);
  CHECK(big->status == 413);
  auto rebinding = c.Get("/healthz", {{"Host", "attacker.example:8787"}});
  REQUIRE(rebinding);
  CHECK(rebinding->status == 400);
  CHECK(json::parse(rebinding->body)["field"] == "Host");

  // Nothing was booked or held by any of it.
  CHECK(f.client->platform().committed == NanoUsd(0));
  CHECK(f.client->platform().held == NanoUsd(0));
  CHECK(f.client->info().live_reservations == 0);
  CHECK_FALSE(f.client->tenant("acme").limit.has_value());
}

TEST_CASE("http: 200 concurrent reservations of $0.042 against $1.00 spend at most $1.00") {
#if defined(__SANITIZE_THREAD__)
  // Open finding (issue 4): with the agent under ThreadSanitizer, cpp-httplib drops a few of 400
  // burst requests (client: Error::Read). The budget held even then; the counts below did not.
  MESSAGE("skipped under ThreadSanitizer");
  return;
#endif
  HttpFixture f("http200", "[budgets.tenants]\nacme = \"1.00\"\n");
  std::atomic<int> passed{0}, answered{0};
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  for (int i = 0; i < 200; ++i) {
    threads.emplace_back([&] {
      httplib::Client c = f.http();
      while (!go.load()) std::this_thread::yield();
      auto r = c.Post("/v1/reservations",
                      R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":8400})", "application/json");
      if (!r) {
        MESSAGE("no answer: " << httplib::to_string(r.error()));
        return;
      }
      ++answered;
      if (r->status != 201) return;
      const std::string id = json::parse(r->body)["reservation_id"];
      auto k = c.Post("/v1/reservations/" + id + "/commit", R"({"provider":"openai","prompt_tokens":8400,"completion_tokens":0})",
                      "application/json");
      if (k && k->status == 200) ++passed;
    });
  }
  go = true;
  for (auto& t : threads) t.join();
  CHECK_MESSAGE(f.agent->wait(std::chrono::milliseconds(0)) == -1000, "the agent died:\n" << f.log());
  CHECK(answered == 200);
  CHECK(passed == 23);
  CHECK(f.client->tenant("acme").committed == *NanoUsd::parse("0.966"));
}

TEST_CASE("http: [[rules]] from the config file are enforced, a rate denial is 429 with the rule, Retry-After "
          "and the window's end") {
  HttpFixture f("http-rules", R"(
[[rules]]
name = "batch-rpm"
scope = "tag"
match = "batch"
window = "minute"
metric = "requests"
limit = 2

[[rules]]
name = "acme-monthly"
scope = "tenant"
match = "acme"
window = "month"
limit = "0.01"
)");
  const std::string batch = R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":10,"tags":"batch"})";
  for (int i = 0; i < 2; ++i) CHECK(f.send("POST", "/v1/reservations", batch).first == 201);
  httplib::Client c = f.http();
  const httplib::Result r = c.Post("/v1/reservations", batch, "application/json");
  REQUIRE(r);
  CHECK(r->status == 429);
  const json body = json::parse(r->body);
  CHECK(body["error_code"] == "E-RATE-001");
  CHECK(body["rule"] == "batch-rpm");
  const int retry = std::stoi(r->get_header_value("Retry-After"));
  CHECK(retry >= 1);
  CHECK(retry <= 61);
  // The window ends on a minute boundary, within the minute.
  const std::int64_t resets = body["resets_unix_ns"];
  CHECK(resets % 60'000'000'000 == 0);
  // Untagged calls and other tags are not counted by it.
  CHECK(f.send("POST", "/v1/check", R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":10})").first == 200);
  // The money rule: $0.01 a month for acme (1000 prompt tokens of gpt-4o cost $0.005).
  const std::string paid = R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":1000})";
  CHECK(f.send("POST", "/v1/reservations", paid).first == 201);
  auto [status, denied] = f.send("POST", "/v1/reservations", paid);
  CHECK(status == 402);
  CHECK(denied["error_code"] == "E-BUDGET-002");
  CHECK(denied["rule"] == "acme-monthly");
  CHECK(f.send("POST", "/v1/reservations", R"({"project_id":"other","model":"gpt-4o","estimated_prompt_tokens":1000})")
            .first == 201);

  // The views: every rule with its counters; a tenant's view with the rules that count it.
  auto [s_rules, rules] = f.send("GET", "/v1/rules", "");
  CHECK(s_rules == 200);
  REQUIRE(rules["rules"].size() == 2);
  const json& rpm = rules["rules"][0];
  CHECK(rpm["name"] == "batch-rpm");
  CHECK(rpm["scope"] == "tag");
  CHECK(rpm["match"] == "batch");
  CHECK(rpm["metric"] == "requests");
  CHECK(rpm["window"] == "minute");
  CHECK(rpm["limit"] == 2);
  CHECK(rpm["window_end_unix_ns"] == resets);
  REQUIRE(rpm["counters"].size() == 1);
  CHECK(rpm["counters"][0] == json{{"key", "batch"}, {"used", 0}, {"reserved", 2}, {"elsewhere", 0}, {"limit", 2}, {"denials", 1}});
  auto [s_tenant, acme] = f.send("GET", "/v1/tenants/acme", "");
  CHECK(s_tenant == 200);
  REQUIRE(acme["rules"].size() == 1);
  CHECK(acme["rules"][0]["name"] == "acme-monthly");
  CHECK(acme["rules"][0]["window"] == "month");
  REQUIRE(acme["rules"][0]["counters"].size() == 1);
  CHECK(acme["rules"][0]["counters"][0]["reserved"] == "0.005100");   // two batch calls and one paid
  CHECK(acme["rules"][0]["counters"][0]["limit"] == "0.010000");
  CHECK(f.send("GET", "/v1/tenants/other", "").second["rules"].empty());   // the rule matches acme only
  // Refusals by the rules' codes, and the rule table's fill, are metrics.
  const httplib::Result m = c.Get("/metrics");
  REQUIRE(m);
  CHECK(m->body.find("tokenfuse_denials_total{error_code=\"E-RATE-001\"} 1") != std::string::npos);
  CHECK(m->body.find("tokenfuse_table_entries{table=\"rule\"} 2") != std::string::npos);   // batch and acme
  CHECK(m->body.find("tokenfuse_table_capacity{table=\"rule\"} 16384") != std::string::npos);
  std::string out;
  CHECK(f.cli({"rules", "list", "--data-dir", f.dir.path + "/state"}, &out) == 0);
  CHECK(out.find("1 batch-rpm: tag batch, requests per minute, limit 2") != std::string::npos);
  CHECK(out.find("acme  ") != std::string::npos);
  // A tenant's usage shows the rules that count it, with its counters.
  CHECK(f.cli({"usage", "acme", "--data-dir", f.dir.path + "/state"}, &out) == 0);
  CHECK(out.find("2 acme-monthly: tenant acme, usd per month, limit 0.010000") != std::string::npos);
  CHECK(out.find("batch-rpm") == std::string::npos);
  CHECK(out.find("used 0.000000  reserved 0.005100  elsewhere 0.000000  limit 0.010000") != std::string::npos);
  CHECK(f.cli({"usage", "acme", "--json", "--data-dir", f.dir.path + "/state"}, &out) == 0);
  CHECK(nlohmann::json::parse(out)["rules"][0]["name"] == "acme-monthly");
}

TEST_CASE("http: rule counters come back from the ledger in a new region: a restart keeps every rule's limit") {
  HttpFixture f("http-rules-rebuild", R"(
[[rules]]
name = "acme-monthly"
scope = "tenant"
match = "acme"
window = "month"
limit = "0.012"

[[rules]]
name = "model-tokens"
scope = "tenant+model"
window = "day"
metric = "tokens"
limit = 3000

[[rules]]
name = "agent-requests"
scope = "agent"
window = "hour"
metric = "requests"
limit = 3

[[rules]]
name = "run-tokens"
scope = "run"
window = "all-time"
metric = "completion_tokens"
limit = 500

[[rules]]
name = "batch-tokens"
scope = "tag"
match = "batch"
window = "day"
metric = "tokens"
limit = 1000
)");
  auto usage = [&](const char* model, int prompt, int completion) {
    const std::string body = std::string(R"({"project_id":"acme","model":")") + model +
                             R"(","provider":"p","prompt_tokens":)" + std::to_string(prompt) +
                             R"(,"completion_tokens":)" + std::to_string(completion) +
                             R"(,"agent_id":"bot","run_id":"run-7"})";
    return f.send("POST", "/v1/usage", body).first;
  };
  REQUIRE(usage("gpt-4o", 2000, 100) == 201);        // $0.0115, 2100 tokens
  REQUIRE(usage("ollama/llama3", 800, 300) == 201);  // free: 1100 tokens of another model
  REQUIRE(f.client->waitDurable(2, 5000));
  auto denied = [&](const char* model, int prompt, const char* agent, const char* run) {
    const std::string body = std::string(R"({"project_id":"acme","model":")") + model +
                             R"(","estimated_prompt_tokens":)" + std::to_string(prompt) + R"(,"agent_id":")" + agent +
                             R"(","run_id":")" + run + R"("})";
    return f.send("POST", "/v1/check", body).second.value("error_code", std::string("OK"));
  };
  REQUIRE(f.send("POST", "/v1/usage", R"({"project_id":"zeta","model":"ollama/llama3","provider":"p",
                 "prompt_tokens":0,"completion_tokens":0,"agent_id":"bot"})").first == 201);   // bot's 3rd request
  REQUIRE(f.client->waitDurable(3, 5000));
  REQUIRE(f.send("POST", "/v1/usage", R"({"project_id":"zeta","model":"ollama/llama3","provider":"p",
                 "prompt_tokens":900,"completion_tokens":0,"tags":"eval,batch"})").first == 201);
  REQUIRE(f.client->waitDurable(4, 5000));
  auto tagged = [&](int prompt) {
    return f.send("POST", "/v1/check", R"({"project_id":"zeta","model":"ollama/llama3","tags":"batch",)"
                                       R"("estimated_prompt_tokens":)" + std::to_string(prompt) + "}")
        .second.value("error_code", std::string("OK"));
  };
  // Each rule at its edge: refused one step past it, allowed up to it.
  auto reserveRun = [&](int completion) {
    auto [status, body] = f.send("POST", "/v1/reservations",
                                 R"({"project_id":"acme","model":"gpt-4o-mini","estimated_prompt_tokens":1,"run_id":"run-7",)"
                                 R"("estimated_completion_tokens":)" + std::to_string(completion) + "}");
    if (status == 201) f.send("DELETE", "/v1/reservations/" + body["reservation_id"].get<std::string>(), "");
    return status == 201 ? std::string("OK") : body.value("error_code", std::string("?"));
  };
  auto expect = [&] {
    CHECK(denied("gpt-4o", 200, "x", "r") == "E-BUDGET-002");         // $0.0115 + $0.001 > $0.012
    CHECK(denied("gpt-4o-mini", 100, "x", "r") == "OK");              // $0.000015 still fits
    CHECK(denied("ollama/llama3", 1901, "x", "r") == "E-RATE-002");   // 1100 + 1901 > 3000 tokens today
    CHECK(denied("ollama/llama3", 1900, "x", "r") == "OK");
    CHECK(denied("ollama/llama3", 1, "bot", "r") == "E-RATE-001");    // a 4th request this hour
    CHECK(reserveRun(101) == "E-RATE-002");                           // 400 + 101 > 500 completion tokens
    CHECK(reserveRun(100) == "OK");
    CHECK(tagged(101) == "E-RATE-002");                               // 900 + 101 > 1000 tokens tagged batch
    CHECK(tagged(100) == "OK");
  };
  expect();

  // A restart on a new region (as after a reboot): the counters are rebuilt from the ledger.
  f.restart(/*new_region=*/true);
  expect();
}

TEST_CASE("http: rules made, replaced and removed through the admin API apply at once, outlive a restart and win "
          "over the config file until reset") {
  HttpFixture f("http-rules-admin", R"(
[[rules]]
name = "acme-monthly"
scope = "tenant"
match = "acme"
window = "month"
limit = "0.004"
)");
  const std::string paid = R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":1000})";   // $0.005
  const std::string bot_call = R"({"project_id":"zeta","model":"ollama/llama3","provider":"ollama","prompt_tokens":1,)"
                               R"("completion_tokens":1,"agent_id":"bot"})";
  const std::string bot_check = R"({"project_id":"zeta","model":"ollama/llama3","agent_id":"bot"})";
  auto code = [&](const std::string& body) {
    return f.send("POST", "/v1/check", body).second.value("error_code", std::string("OK"));
  };
  auto names = [](const json& rules) {
    std::vector<std::string> out;
    for (const json& r : rules["rules"]) out.push_back(r["name"].get<std::string>() + "/" + r["source"].get<std::string>());
    return out;
  };
  CHECK(code(paid) == "E-BUDGET-002");

  // A new rule: two requests an hour for the agent "bot".
  const std::string rph = R"({"scope":"agent","match":"bot","window":"hour","metric":"requests","limit":2})";
  CHECK(f.send("PUT", "/v1/rules/bot-rph", rph).first == 401);
  auto [s_put, put] = f.send("PUT", "/v1/rules/bot-rph", rph, true);
  CHECK(s_put == 200);
  CHECK(names(put) == std::vector<std::string>{"acme-monthly/config", "bot-rph/admin_api"});
  for (int i = 0; i < 2; ++i) REQUIRE(f.send("POST", "/v1/usage", bot_call).first == 201);
  CHECK(code(bot_check) == "E-RATE-001");
  CHECK(f.send("POST", "/v1/check", bot_check).second["rule"] == "bot-rph");

  // Bad rules are refused naming the field, as the config file's are, and change nothing.
  auto refused = [&](const std::string& path, const std::string& body) {
    auto [status, reply] = f.send("PUT", path, body, true);
    CHECK(status == 400);
    return reply.value("field", std::string()) + ": " + reply.value("message", std::string());
  };
  CHECK(refused("/v1/rules/x", R"({"scope":"tenant","window":"fortnight"})").starts_with("window: window must be one of"));
  CHECK(refused("/v1/rules/x", R"({"scope":"tenant","window":"day","limit":0.5})").find("write money as a string") !=
        std::string::npos);
  CHECK(refused("/v1/rules/x", R"({"scope":"tenant","window":"day","limt":"1"})").starts_with("limt: limt unknown key"));
  CHECK(refused("/v1/rules/x", R"({"name":"y","scope":"tenant","window":"day"})").starts_with("name:"));
  CHECK(refused("/v1/rules/x", R"({"scope":"run","window":"day","keys":{"r1":"x"}})").starts_with("keys.\"r1\":"));
  CHECK(refused("/v1/rules/bad%20name", R"({"scope":"tenant","window":"day"})").starts_with("name:"));
  CHECK(refused("/v1/rules/x", "[1]").starts_with("body:"));
  CHECK(names(f.send("GET", "/v1/rules", "").second).size() == 2);

  // The config file's rule, replaced, then removed.
  CHECK(f.send("PUT", "/v1/rules/acme-monthly", R"({"scope":"tenant","match":"acme","window":"month","limit":"1.00"})",
               true).first == 200);
  CHECK(code(paid) == "OK");
  auto [s_del, del] = f.send("DELETE", "/v1/rules/acme-monthly", "", true);
  CHECK(s_del == 200);
  CHECK(names(del) == std::vector<std::string>{"bot-rph/admin_api"});
  CHECK(del["removed"] == json{"acme-monthly"});
  CHECK(f.send("DELETE", "/v1/rules/acme-monthly", "", true).first == 404);
  CHECK(f.send("DELETE", "/v1/rules/nosuch/override", "", true).first == 404);

  // A restart on a new region: the admin API's rules come back from the data dir, and the
  // request rule's count from the ledger.
  REQUIRE(f.client->waitDurable(2, 5000));
  f.restart(/*new_region=*/true);
  CHECK(names(f.send("GET", "/v1/rules", "").second) == std::vector<std::string>{"bot-rph/admin_api"});
  CHECK(code(bot_check) == "E-RATE-001");
  CHECK(code(paid) == "OK");

  // Reset: the config file's rule again, as the file has it.
  auto [s_reset, reset] = f.send("DELETE", "/v1/rules/acme-monthly/override", "", true);
  CHECK(s_reset == 200);
  CHECK(names(reset) == std::vector<std::string>{"bot-rph/admin_api", "acme-monthly/config"});
  CHECK(reset["removed"].empty());
  CHECK(code(paid) == "E-BUDGET-002");
  // A rule only the admin API made goes for good.
  CHECK(f.send("DELETE", "/v1/rules/bot-rph", "", true).first == 200);
  CHECK(code(bot_check) == "OK");
  CHECK(f.send("DELETE", "/v1/rules/bot-rph/override", "", true).first == 404);

  // The CLI speaks the same API.
  std::string out;
  const std::string data_dir = f.dir.path + "/state";
  CHECK(f.cli({"rules", "set", "gpt4-daily", "--scope", "model", "--match", "gpt-4*", "--window", "day", "--limit",
               "2.50", "--data-dir", data_dir}, &out) == 0);
  CHECK(out.find("gpt4-daily: model gpt-4*, usd per day, limit 2.500000  (set through the admin API)") != std::string::npos);
  CHECK(f.cli({"rules", "set", "bot-tokens", "--scope", "agent", "--metric", "tokens", "--window", "week",
               "--week-start", "sunday", "--key", "bot=100", "--key", "vip=unlimited", "--data-dir", data_dir}, &out) == 0);
  const json saved = f.send("GET", "/v1/rules", "").second;
  REQUIRE(saved["rules"].size() == 3);
  CHECK(saved["rules"][2]["window"] == "week");
  CHECK(f.cli({"rules", "set", "bad", "--scope", "tenant", "--window", "fortnight", "--data-dir", data_dir}, &out) != 0);
  CHECK(out.find("window must be one of") != std::string::npos);
  CHECK(f.cli({"rules", "clear", "acme-monthly", "--data-dir", data_dir}, &out) == 0);
  CHECK(out.find("- acme-monthly: the config file's rule, removed") != std::string::npos);
  CHECK(f.cli({"rules", "reset", "acme-monthly", "--data-dir", data_dir}, &out) == 0);
  CHECK(f.cli({"rules", "clear", "gpt4-daily", "--data-dir", data_dir}, &out) == 0);
  CHECK(out.find("gpt4-daily") == std::string::npos);

  // At most 32 rules in force, the config file's and the admin API's together.
  int made = 0;
  for (int i = 0; i < 40; ++i) {
    auto [status, reply] = f.send("PUT", "/v1/rules/r" + std::to_string(i), R"({"scope":"tenant","window":"day"})", true);
    if (status != 200) {
      CHECK(status == 409);
      CHECK(reply["message"].get<std::string>().find("at most 32 rules") != std::string::npos);
      break;
    }
    ++made;
  }
  CHECK(made == 30);   // beside acme-monthly and bot-tokens
  // With every definition in use, a rule whose shape changes takes the one it leaves.
  auto [s_shape, shape] = f.send("PUT", "/v1/rules/r0", R"({"scope":"tenant","window":"week"})", true);
  CHECK(s_shape == 200);
  CHECK(shape["rules"].size() == 32);
  for (const json& r : shape["rules"]) {
    if (r["name"] == "r0") CHECK(r["window"] == "week");
  }
  // Bringing the config file's rule back would make 33: refused, and nothing changes.
  CHECK(f.send("DELETE", "/v1/rules/acme-monthly", "", true).first == 200);
  CHECK(f.send("PUT", "/v1/rules/r30", R"({"scope":"tenant","window":"day"})", true).first == 200);
  auto [s_back, back] = f.send("DELETE", "/v1/rules/acme-monthly/override", "", true);
  CHECK(s_back == 409);
  CHECK(back["error"] == "conflict");
  CHECK(f.send("GET", "/v1/rules", "").second["removed"] == json{"acme-monthly"});

  // A saved rule that no longer reads is skipped at start, and reset erases it.
  f.agent->signal(SIGTERM);
  REQUIRE(f.agent->wait() == 0);
  Ledger(f.dir.path + "/state/ledger.db", "test").saveRule({"broken", "{not json", 0});
  f.agent = f.start();
  f.client = f.waitForRegion(f.agent->pid());
  f.port = f.httpPort();
  CHECK(f.send("GET", "/v1/rules", "").second["rules"].size() == 32);
  CHECK(f.send("DELETE", "/v1/rules/broken/override", "", true).first == 200);
  CHECK(f.send("DELETE", "/v1/rules/broken/override", "", true).first == 404);
}
