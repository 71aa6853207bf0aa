// Alerts against a real tokenfused, delivered to a local receiver that stands in for a webhook,
// Slack and Telegram's Bot API.
#include "agent_process.h"
#include "central_support.h"

#include <httplib.h>

#include <condition_variable>
#include <csignal>
#include <mutex>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

// An HTTP server on a free loopback port that records what it is sent, per path. /flaky answers
// 500 to its first two requests.
class Receiver {
 public:
  Receiver() {
    server_.Post(R"(/.*)", [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard lock(mu_);
      ++requests_[req.path];
      if (req.path == "/flaky" && requests_[req.path] <= 2) {
        res.status = 500;
        return;
      }
      bodies_[req.path].push_back(json::parse(req.body));
      res.set_content("{\"ok\":true}", "application/json");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    REQUIRE(eventually([&] { return server_.is_running(); }));
  }
  ~Receiver() {
    server_.stop();
    thread_.join();
  }
  std::vector<json> bodies(const std::string& path) {
    std::lock_guard lock(mu_);
    return bodies_[path];
  }
  int requests(const std::string& path) {
    std::lock_guard lock(mu_);
    return requests_[path];
  }
  std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port_) + path; }
  int port() const { return port_; }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::map<std::string, std::vector<json>> bodies_;
  std::map<std::string, int> requests_;
};

std::string notifiers(Receiver& r, const std::string& dir) {
  std::ofstream(dir + "/bot.token") << "123:secret-token\n";
  return "[alerts]\n"
         "[[alerts.notifiers]]\nkind = \"webhook\"\nurl = \"" + r.url("/hook") + "\"\n"
         "[[alerts.notifiers]]\nkind = \"slack\"\nurl = \"" + r.url("/slack") + "\"\n"
         "[[alerts.notifiers]]\nkind = \"telegram\"\nbot_token_file = \"" + dir + "/bot.token\"\nchat_id = \"-42\"\n"
         "api_base = \"" + r.url("") + "\"\n"
         "[[alerts.notifiers]]\nkind = \"webhook\"\nurl = \"" + r.url("/flaky") + "\"\n"
         "[[alerts.notifiers]]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/down\"\n";
}

// A receiver that takes each request and holds it until released: a notifier that hangs.
class HangingReceiver {
 public:
  HangingReceiver() {
    server_.Post("/hook", [this](const httplib::Request& req, httplib::Response& res) {
      std::unique_lock lock(mu_);
      ++entered_;
      cv_.wait(lock, [&] { return released_; });
      bodies_.push_back(json::parse(req.body));
      res.set_content("{}", "application/json");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    REQUIRE(eventually([&] { return server_.is_running(); }));
  }
  ~HangingReceiver() {
    release();
    server_.stop();
    thread_.join();
  }
  void release() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }
  int entered() {
    std::lock_guard lock(mu_);
    return entered_;
  }
  std::vector<json> bodies() {
    std::lock_guard lock(mu_);
    return bodies_;
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/hook"; }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;
  int entered_ = 0;
  std::vector<json> bodies_;
};

// A sample's value in the agent's /metrics ("name{labels}" as written there); -1 if it is absent.
double metric(AgentFixture& f, const std::string& sample) {
  httplib::Client http("127.0.0.1", f.httpPort());
  const auto r = http.Get("/metrics");
  REQUIRE_MESSAGE(r, "GET /metrics: " << httplib::to_string(r.error()) << "; the agent's log:\n" << f.log());
  const auto at = r->body.find("\n" + sample + " ");
  return at == std::string::npos ? -1 : std::stod(r->body.substr(at + sample.size() + 2));
}

// The events, in order, as "a b c" (doctest prints a string, not a vector).
std::string events(const std::vector<json>& bodies) {
  std::string out;
  for (const json& b : bodies) out += (out.empty() ? "" : " ") + b.value("event", "");
  return out;
}

}  // namespace

TEST_CASE("alerts: 80, 95 and 100 percent reach every notifier once each, across a restart, with retries") {
  Receiver receiver;
  TempDir secrets;
  AgentFixture f("alerts", "[budgets.tenants]\nacme = \"1.00\"\n" + notifiers(receiver, secrets.path));
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  // gpt-4o prompt tokens cost $5 a million.
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 170'000, 0}).allowed());   // $0.85: 85 %
  REQUIRE(eventually([&] { return receiver.bodies("/hook").size() == 1; }));
  CHECK(receiver.bodies("/hook")[0]["event"] == "budget_tenant_warn");
  CHECK(receiver.bodies("/hook")[0]["used_usd"] == "0.850000");
  CHECK(receiver.bodies("/hook")[0]["limit_usd"] == "1.000000");

  // A restart: what fired today does not fire again.
  agent->signal(SIGTERM);
  REQUIRE(agent->wait() == 0);
  agent = f.start();
  client = f.waitForRegion(agent->pid());
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 22'000, 0}).allowed());    // $0.96
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 10'000, 0}).allowed());    // $1.01
  REQUIRE(eventually([&] { return receiver.bodies("/hook").size() == 3 && receiver.bodies("/flaky").size() == 3; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));   // nothing more comes
  const auto hook = receiver.bodies("/hook");
  REQUIRE(hook.size() == 3);
  CHECK(hook[1]["event"] == "budget_tenant_critical");
  CHECK(hook[2]["event"] == "budget_tenant_hard_kill");
  CHECK(hook[2]["level_pct"] == 100);

  const auto slack = receiver.bodies("/slack");
  REQUIRE(slack.size() == 3);
  CHECK(slack[2]["text"] == "tokenfuse: tenant acme has used 100% of its budget ($1.010000 of $1.000000, " +
                                hook[2]["day"].get<std::string>() + ")");
  const auto telegram = receiver.bodies("/bot123:secret-token/sendMessage");
  REQUIRE(telegram.size() == 3);
  CHECK(telegram[0]["chat_id"] == "-42");
  CHECK(receiver.requests("/flaky") == 5);   // two failures, then the three messages
  CHECK(receiver.bodies("/flaky").size() == 3);

  // The kill switch is an alert too.
  httplib::Client http("127.0.0.1", f.httpPort());
  const auto r = http.Put("/v1/kill", {{"Authorization", "Bearer " + f.adminToken()}}, R"({"reason":"runaway"})",
                          "application/json");
  REQUIRE(r);
  REQUIRE(eventually([&] { return receiver.bodies("/hook").size() == 4; }));
  CHECK(receiver.bodies("/hook")[3]["event"] == "budget_emergency_kill_activated");
  CHECK(receiver.bodies("/hook")[3]["reason"] == "runaway");

  // The notifier that is down: its messages wait and are retried, decisions go on, and its
  // secret never reaches the log.
  const auto metrics = http.Get("/metrics");
  REQUIRE(metrics);
  CHECK(metrics->body.find("tokenfuse_alerts_fired_total 3") != std::string::npos);   // since the restart
  CHECK(metrics->body.find("tokenfuse_alert_deliveries_total{result=\"failed_attempt\"}") != std::string::npos);
  CHECK(client->check("acme", "qwen3:8b").code == Code::kEmergencyKill);
  CHECK(f.log().find("secret-token") == std::string::npos);
  CHECK(f.log().find("\"event\":\"budget_tenant_critical\"") != std::string::npos);
}

TEST_CASE("alerts: a notifier that hangs holds up no decision, admin change or later alert") {
  HangingReceiver receiver;
  AgentFixture f("alerthang", "[budgets.tenants]\nacme = \"1.00\"\n[alerts]\n[[alerts.notifiers]]\nkind = \"webhook\"\n"
                              "url = \"" + receiver.url() + "\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 170'000, 0}).allowed());   // 85 %
  REQUIRE(eventually([&] { return receiver.entered() == 1; }));   // the delivery thread is stuck in it now

  // Everything else the agent does goes on while that request hangs: decisions over HTTP and
  // in-process, usage that raises more alerts, the kill switch.
  httplib::Client http("127.0.0.1", f.httpPort());
  for (int i = 0; i < 200; ++i) {
    const auto r = http.Post("/v1/check", R"({"project_id":"acme","model":"gpt-4o","estimated_tokens":1000})",
                             "application/json");
    REQUIRE(r);
    REQUIRE(r->status == 200);
    REQUIRE(client->check("acme", "gpt-4o", 1000).allowed());
  }
  for (const char* tokens : {"22000", "10000"}) {   // 96 %, then 102 %
    const auto r = http.Post("/v1/usage",
                             std::string(R"({"project_id":"acme","model":"gpt-4o","provider":"openai","prompt_tokens":)") +
                                 tokens + R"(,"completion_tokens":0})",
                             "application/json");
    REQUIRE(r);
    REQUIRE(r->status == 201);
  }
  REQUIRE(client->check("acme", "gpt-4o", 1000).code == Code::kTenantBudgetExhausted);
  REQUIRE(eventually([&] { return metric(f, "tokenfuse_alerts_fired_total") == 3; }));
  const auto kill = http.Put("/v1/kill", {{"Authorization", "Bearer " + f.adminToken()}}, R"({"reason":"hang test"})",
                             "application/json");
  REQUIRE(kill);
  CHECK(kill->status == 200);
  CHECK(client->check("acme", "qwen3:8b").code == Code::kEmergencyKill);
  REQUIRE(eventually([&] { return metric(f, "tokenfuse_alerts_fired_total") == 4; }));   // raised and queued
  CHECK(receiver.entered() == 1);   // and the first delivery is still hanging: nothing above waited for it
  CHECK(receiver.bodies().empty());

  receiver.release();
  REQUIRE(eventually([&] { return receiver.bodies().size() >= 4; }));
  CHECK(events(receiver.bodies()) ==
        "budget_tenant_warn budget_tenant_critical budget_tenant_hard_kill budget_emergency_kill_activated");
}

TEST_CASE("alerts: with a central Redis an alert goes out once per fleet, and a Redis that is down holds none back") {
  Receiver receiver;
  RedisServer redis;
  const std::string toml = "[budgets.tenants]\nacme = \"1.00\"\n[central]\nsync_interval_ms = 100\nredis_url = \"" +
                           redis.url() + "\"\n[alerts]\n[[alerts.notifiers]]\nkind = \"webhook\"\nurl = \"" +
                           receiver.url("/hook") + "\"\n";
  AgentFixture a("fleetalert", toml, "host_id = \"host-a\"\n"), b("fleetalert", toml, "host_id = \"host-b\"\n");
  auto agent_a = a.start(), agent_b = b.start();
  auto client_a = a.waitForRegion(agent_a->pid()), client_b = b.waitForRegion(agent_b->pid());
  const std::string other = "tokenfuse_alert_deliveries_total{result=\"sent_by_other_host\"}";

  // Host a spends 85 %; host b sees it through Redis and raises the same alert; one message goes out.
  REQUIRE(client_a->record({"acme", "gpt-4o", "openai", {}, {}, 170'000, 0}).allowed());
  REQUIRE(eventually([&] {
    return metric(a, "tokenfuse_alerts_fired_total") == 1 && metric(b, "tokenfuse_alerts_fired_total") == 1 &&
           metric(a, other) + metric(b, other) == 1;
  }));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(events(receiver.bodies("/hook")) == "budget_tenant_warn");
  const std::string day = receiver.bodies("/hook")[0]["day"];
  CHECK(redis.command({"GET", "{tokenfuse:alerts}:" + day + ":tenant:80:acme"}).rfind("sent:host-", 0) == 0);

  // The kill switch turned on at host a reaches host b through Redis: both raise it, one sends it.
  httplib::Client http("127.0.0.1", a.httpPort());
  REQUIRE(http.Put("/v1/kill", {{"Authorization", "Bearer " + a.adminToken()}}, R"({"reason":"fleet test"})",
                   "application/json"));
  REQUIRE(eventually([&] { return client_b->check("acme", "qwen3:8b").code == Code::kEmergencyKill; }));
  REQUIRE(eventually([&] {
    return metric(a, "tokenfuse_alerts_fired_total") == 2 && metric(b, "tokenfuse_alerts_fired_total") == 2 &&
           metric(a, other) + metric(b, other) == 2;
  }));
  REQUIRE(http.Delete("/v1/kill", {{"Authorization", "Bearer " + a.adminToken()}}));
  REQUIRE(eventually([&] { return client_b->check("acme", "qwen3:8b").allowed(); }));
  REQUIRE(eventually([&] { return metric(a, other) + metric(b, other) == 3; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(events(receiver.bodies("/hook")) ==
        "budget_tenant_warn budget_emergency_kill_activated budget_emergency_kill_deactivated");

  // A host that claimed an alert and died: its pending claim holds the fleet back until it
  // expires (deleted here), then another host sends the alert, once.
  const std::string critical_key = "{tokenfuse:alerts}:" + day + ":tenant:95:acme";
  redis.command({"SET", critical_key, "pending:ghost/0", "EX", "600"});
  REQUIRE(client_b->record({"acme", "gpt-4o", "openai", {}, {}, 22'000, 0}).allowed());   // $0.96 for the fleet
  REQUIRE(eventually([&] {
    return metric(a, "tokenfuse_alerts_fired_total") == 4 && metric(b, "tokenfuse_alerts_fired_total") == 4;
  }));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  CHECK(receiver.bodies("/hook").size() == 3);   // waiting for the ghost
  redis.command({"DEL", critical_key});
  REQUIRE(eventually([&] { return receiver.bodies("/hook").size() == 4; }));
  CHECK(receiver.bodies("/hook")[3]["event"] == "budget_tenant_critical");
  REQUIRE(eventually([&] { return metric(a, other) + metric(b, other) == 4; }));
  CHECK(redis.command({"GET", critical_key}).rfind("sent:host-", 0) == 0);

  // Redis gone: host b crosses 100 % on what it last knew plus its own spending, cannot claim the
  // alert, and sends it anyway.
  redis.kill();
  REQUIRE(client_b->record({"acme", "gpt-4o", "openai", {}, {}, 10'000, 0}).allowed());   // $1.01
  REQUIRE(eventually([&] { return receiver.bodies("/hook").size() == 5; }));
  CHECK(receiver.bodies("/hook")[4]["event"] == "budget_tenant_hard_kill");
  CHECK(b.log().find("alert_fleet_claims_unavailable") != std::string::npos);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(receiver.bodies("/hook").size() == 5);
}
