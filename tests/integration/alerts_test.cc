// Alerts against a real tokenfused, delivered to a local receiver that stands in for a webhook,
// Slack and Telegram's Bot API.
#include "agent_process.h"

#include <httplib.h>

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
