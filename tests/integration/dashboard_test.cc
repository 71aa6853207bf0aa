// The dashboard (/ui) in a real browser: Debian's Chromium, headless, driven by playwright-core
// (tests/sdk/dashboard.mjs) against a real tokenfused with spending, a live reservation and an
// alert in it.
#include "agent_process.h"
#include "process.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

json post(int port, const std::string& path, const json& body) {
  httplib::Client c("127.0.0.1", port);
  const httplib::Result r = c.Post(path, body.dump(), "application/json");
  REQUIRE(r);
  REQUIRE_MESSAGE(r->status < 300, path << ": " << r->status << " " << r->body);
  return json::parse(r->body);
}

json get(int port, const std::string& path) {
  httplib::Client c("127.0.0.1", port);
  const httplib::Result r = c.Get(path);
  REQUIRE(r);
  REQUIRE_MESSAGE(r->status == 200, path << ": " << r->status << " " << r->body);
  return json::parse(r->body);
}

}  // namespace

TEST_CASE("dashboard: Chromium renders /ui from the agent's API, tenants nearest their limit first, toggles the kill "
          "switch with the admin token, and requests nothing beyond the agent") {
  const std::string sdk = std::string(TOKENFUSE_SOURCE_DIR) + "/tests/sdk";
  REQUIRE_MESSAGE(std::filesystem::exists("/usr/bin/chromium"), "Chromium is not installed: run packaging/install-deps.sh");
  REQUIRE_MESSAGE(std::filesystem::exists(sdk + "/node_modules/playwright-core"),
                  "playwright-core is not installed in " << sdk << "/node_modules: run packaging/install-deps.sh");
  AgentFixture f("dashboard",
                 "[budgets]\ntenant_default_daily_limit_usd = \"1.00\"\nplatform_daily_limit_usd = \"10.00\"\n"
                 "[[rules]]\nname = \"monthly\"\nscope = \"tenant\"\nwindow = \"month\"\nlimit = \"2.00\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  const int port = f.httpPort();

  // acme at 85% of its day (an 80% alert), beta at 30% with a call in flight, and a tenant
  // whose id is markup: it must show as text.
  const std::string markup = "<img src=/x onerror=alert(1)>";
  const auto usage = [&](const std::string& tenant, std::int64_t prompt) {
    return post(port, "/v1/usage", {{"project_id", tenant}, {"model", "gpt-4o"}, {"provider", "openai"},
                                    {"prompt_tokens", prompt}, {"completion_tokens", 0}});
  };
  usage("acme", 170'000);   // $5 per million prompt tokens: $0.85
  usage("beta", 60'000);    // $0.30
  usage(markup, 2'000);     // $0.01
  const json held = post(port, "/v1/reservations",
                         {{"project_id", "beta"}, {"model", "gpt-4o"}, {"run_id", "run-7"},
                          {"estimated_prompt_tokens", 2000}});
  REQUIRE(eventually([&] { return !get(port, "/v1/alerts")["alerts"].empty(); }));
  REQUIRE(eventually([&] { return client->durableLedgerSeq() >= 3; }));

  // Kept after the test, beside the test binary's working directory (build/tests under CTest).
  const std::string shot = (std::filesystem::current_path() / "dashboard.png").string();
  std::filesystem::remove(shot);
  Process node({"/usr/bin/env", "AGENT=http://127.0.0.1:" + std::to_string(port), "TOKEN=" + f.adminToken(),
                "SCREENSHOT=" + shot, "node", sdk + "/dashboard.mjs"},
               f.dir.path + "/node.out");
  const int rc = node.wait(std::chrono::seconds(120));
  const std::string text = node.output();
  REQUIRE_MESSAGE(rc == 0, "node exited with " << rc << ":\n" << text);
  const std::size_t line = text.rfind("\n{", text.size() - 2);
  const json r = json::parse(text.substr(line == std::string::npos ? 0 : line + 1), nullptr, false);
  REQUIRE_MESSAGE(!r.is_discarded(), "no JSON from the browser:\n" << text);
  REQUIRE_MESSAGE(!r.contains("uncaught"), r.dump(2));
  INFO(r.dump(2));

  // What the page showed, as the API has it.
  const json& before = r["before"];
  REQUIRE(before["tenants"].size() == 3);
  CHECK(before["tenants"][0]["id"] == "acme");   // 85% of its day
  CHECK(before["tenants"][0]["spent"] == "$0.8500");
  CHECK(before["tenants"][0]["share"].get<double>() == doctest::Approx(0.85));
  CHECK(before["tenants"][0]["limits"][0].get<std::string>().find("$0.8500 of $1.0000 (85%)") != std::string::npos);
  CHECK(before["tenants"][0]["limits"][1].get<std::string>().find("monthly (month)") != std::string::npos);
  CHECK(before["tenants"][1]["id"] == "beta");   // 30% and a hold of $0.005
  CHECK(before["tenants"][1]["spent"] == "$0.3000");
  CHECK(before["tenants"][2]["id"] == markup);
  CHECK(before["tenants"][2]["shown_id"] == markup);   // as text
  CHECK(before["injected"] == 0);
  CHECK(before["platform"].get<std::string>().find("committed $1.1600") != std::string::npos);
  CHECK(before["kill"] == "off");
  CHECK(before["kill_button"] == "Turn on");
  REQUIRE(before["reservations"].size() == 1);
  CHECK(before["reservations"][0][0] == held["reservation_id"]);
  CHECK(before["reservations"][0][1] == "beta");
  CHECK(before["reservations"][0][2] == "run-7");
  REQUIRE(before["alerts"].size() >= 1);
  CHECK(before["alerts"][0][1] == "tenant");
  CHECK(before["alerts"][0][2] == "acme");
  CHECK(before["alerts"][0][3] == "80%");
  CHECK(before["chart_bars"] == 24);
  CHECK(before["chart_total"].get<double>() == doctest::Approx(1.16));
  CHECK(before["ledger_locked"] == true);
  CHECK(before["ledger"].empty());

  // The kill switch through the page: a wrong token is refused, the right one turns it on (the
  // API agrees), the ledger then shows, and off again without asking for the token.
  CHECK(r["wrong_token_error"] == "The admin token was refused.");
  CHECK(r["after_wrong"] == "off");
  CHECK(r["on"]["kill"] == "on");
  CHECK(r["api_on"]["active"] == true);
  CHECK(r["api_on"]["reason"] == "browser test");
  CHECK(r["on"]["ledger"].size() == 3);
  CHECK(r["on"]["ledger"][0][2] == markup);   // newest first
  CHECK(r["token_stored"] == false);
  CHECK(r["token_asked_again"] == false);
  CHECK(r["off"] == "off");
  CHECK(r["api_off"]["active"] == false);

  // Nothing but the agent: every request went to its origin, none had to be refused.
  const std::string origin = "http://127.0.0.1:" + std::to_string(port) + "/";
  CHECK(r["blocked"].empty());
  CHECK(r["requests"].size() > 10);
  for (const json& url : r["requests"]) CHECK(url.get<std::string>().rfind(origin, 0) == 0);
  for (const json& message : r["console"]) CHECK(message.get<std::string>().find("pageerror") == std::string::npos);

  // The screenshot: a PNG of the whole page.
  std::ifstream png(shot, std::ios::binary);
  char signature[8] = {};
  png.read(signature, sizeof signature);
  CHECK(std::string(signature, 8) == "\x89PNG\r\n\x1a\n");
  CHECK(std::filesystem::file_size(shot) > 20'000);
  MESSAGE("screenshot: " << shot);
}

namespace {

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  REQUIRE_MESSAGE(in, "cannot read " << path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every tokenfuse_ metric name in `text`, without a histogram's _bucket, _sum or _count.
std::set<std::string> metricNames(const std::string& text) {
  std::set<std::string> out;
  const std::regex name("tokenfuse_[a-z_]+");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), name); it != std::sregex_iterator(); ++it) {
    std::string n = it->str();
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      if (n.ends_with(suffix)) n.resize(n.size() - std::strlen(suffix));
    }
    out.insert(n);
  }
  return out;
}

}  // namespace

TEST_CASE("dashboard: every metric the Grafana board and the alert rules in docs/operations.md query is one the agent "
          "exports") {
  const json board = json::parse(readFile(std::string(TOKENFUSE_SOURCE_DIR) + "/docs/grafana/tokenfuse.json"));
  std::string queries;
  std::size_t panels = 0;
  for (const json& p : board["panels"]) {
    if (p["type"] == "row") continue;
    ++panels;
    REQUIRE_MESSAGE(!p["targets"].empty(), p["title"]);
    for (const json& t : p["targets"]) queries += t["expr"].get<std::string>() + "\n";
  }
  CHECK(panels >= 15);
  std::string rules;
  std::istringstream ops(readFile(std::string(TOKENFUSE_SOURCE_DIR) + "/docs/operations.md"));
  for (std::string line; std::getline(ops, line);) {
    if (line.find("expr: ") != std::string::npos) rules += line + "\n";
  }
  const std::set<std::string> wanted = [&] {
    std::set<std::string> all = metricNames(queries);
    all.merge(metricNames(rules));
    return all;
  }();
  REQUIRE(wanted.size() > 30);

  // A real agent's /metrics, and the families only a proxy upstream or a central link adds (from
  // the code that registers them).
  AgentFixture f("grafana");
  auto agent = f.start();
  (void)f.waitForRegion(agent->pid());
  const int port = f.httpPort();
  (void)post(port, "/v1/check", {{"project_id", "acme"}, {"model", "gpt-4o"}});   // an HTTP decision, counted
  httplib::Client c("127.0.0.1", port);
  const httplib::Result scrape = c.Get("/metrics");
  REQUIRE(scrape);
  const std::set<std::string> exported = metricNames(scrape->body);
  std::set<std::string> registered;
  for (const char* file : {"/agent/proxy.cc", "/agent/metrics.cc"}) {
    registered.merge(metricNames(readFile(std::string(TOKENFUSE_SOURCE_DIR) + file)));
  }
  for (const std::string& name : wanted) {
    const bool optional = name.starts_with("tokenfuse_proxy_") || name.starts_with("tokenfuse_central_");
    CHECK_MESSAGE((exported.contains(name) || (optional && registered.contains(name))), name);
  }
}
