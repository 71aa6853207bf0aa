// tokenfused and the tokenfuse CLI as an operator runs them: real processes, real signals.
#include "agent_process.h"

#include <httplib.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <regex>

using namespace tokenfuse;
using namespace tokenfuse::test;

TEST_CASE("tokenfused: starts on its embedded defaults, serves the region, and stops cleanly on SIGTERM") {
  AgentFixture f("start", "[budgets]\nplatform_daily_limit_usd = \"10\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  CHECK(client->platform().limit == NanoUsd::fromWholeUsd(10));
  CHECK(client->check("acme", "gpt-4o").allowed());
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
  const std::string log = f.log();
  CHECK(log.find(R"("event":"agent_started")") != std::string::npos);
  CHECK(log.find(R"("event":"agent_stopped")") != std::string::npos);
  // The region outlives the agent, so clients keep deciding while it restarts.
  CHECK(client->check("acme", "gpt-4o").allowed());
}

TEST_CASE("tokenfused: logs one token_usage_recorded line per entry at level debug, and none per decision otherwise") {
  for (const bool debug : {false, true}) {
    AgentFixture f("logusage");
    auto agent = f.start(debug ? std::vector<std::string>{"--log-level", "debug"} : std::vector<std::string>{});
    auto client = f.waitForRegion(agent->pid());
    for (int i = 0; i < 3; ++i) REQUIRE(client->record({"acme", "gpt-4o", "openai", "run-7", {}, 1000, 500}).allowed());
    CHECK(client->check("acme", "gpt-4o").allowed());
    REQUIRE(eventually([&] { return client->info().ledger_durable == 3; }));
    agent->signal(SIGTERM);
    REQUIRE(agent->wait() == 0);
    std::istringstream lines(f.log());
    int usage = 0;
    for (std::string line; std::getline(lines, line);) {
      const auto j = nlohmann::json::parse(line);   // every line is one JSON object
      if (j["event"] != "token_usage_recorded") continue;
      ++usage;
      CHECK(j["level"] == "debug");
      CHECK(j["project_id"] == "acme");
      CHECK(j["run_id"] == "run-7");
      CHECK(j["prompt_tokens"] == 1000);
      CHECK(j["cost_usd"] == "0.012500");   // 1000 x $5 + 500 x $15 a million
    }
    CHECK(usage == (debug ? 3 : 0));
  }
}

TEST_CASE("tokenfused: tells systemd it is ready once the region is published and the API listens (Type=notify)") {
  AgentFixture f("notify");
  // systemd's side: a datagram socket named by NOTIFY_SOCKET.
  const std::string path = f.dir.path + "/notify.sock";
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  const timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  auto receive = [&] {
    char buf[512] = {};
    const ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  };
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  auto agent = f.start();
  ::unsetenv("NOTIFY_SOCKET");
  const std::string ready = receive();
  CHECK(ready.rfind("READY=1\nSTATUS=region " + f.shm + " ready, HTTP API on port ", 0) == 0);
  // By then the region is there and the API answers.
  std::unique_ptr<Client> c;
  CHECK(Client::attach({f.shm}, &c).ok());
  httplib::Client http("127.0.0.1", f.httpPort());
  const auto health = http.Get("/healthz");
  REQUIRE(health);
  CHECK(health->status == 200);
  agent->signal(SIGTERM);
  CHECK(receive().rfind("STOPPING=1", 0) == 0);
  CHECK(agent->wait() == 0);
  ::close(fd);
}

TEST_CASE("tokenfused: a bad config stops start-up with exit code 2 and a message naming the key") {
  AgentFixture f("badcfg", "[budgets]\nplatform_daily_limit_usd = 12.5\n");
  auto agent = f.start();
  CHECK(agent->wait() == 2);
  CHECK(f.log().find("budgets.platform_daily_limit_usd: write money as a string") != std::string::npos);
}

TEST_CASE("crash: the holds of a SIGKILLed client come back within seconds, from the running agent") {
  AgentFixture f("crash");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t app = ::fork();
  if (app == 0) {
    std::unique_ptr<Client> c;
    if (!Client::attach({f.shm}, &c).ok()) ::_exit(1);
    Reservation r;
    for (int i = 0; i < 10; ++i) {
      if (!c->reserve({"acme", "gpt-4o", "run-9", {}, 1000, 0, 0}, &r).allowed()) ::_exit(2);
    }
    (void)::write(ready[1], "k", 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);   // so that a child that dies early gives end-of-file, not a hang
  char ok = 0;
  REQUIRE_MESSAGE(::read(ready[0], &ok, 1) == 1, "the child process failed before it was ready");
  CHECK(client->tenant("acme").held == NanoUsd(50'000'000));
  const auto killed_at = std::chrono::steady_clock::now();
  ::kill(app, SIGKILL);
  ::waitpid(app, nullptr, 0);
  CHECK(eventually([&] { return client->tenant("acme").held == NanoUsd(0); }, std::chrono::seconds(5)));
  const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - killed_at);
  MESSAGE("holds returned " << took.count() << " ms after SIGKILL");
  CHECK(client->run("run-9").held == NanoUsd(0));
  CHECK(client->platform().held == NanoUsd(0));
  // The log line follows the reaping, so it may come a moment after the holds: wait for all ten
  // (in one sweep or, on a slow machine, several).
  const auto reaped_in_log = [&] {
    const std::string log = f.log();
    const std::regex line(R"re("event":"reservations_reaped","dead_owner":(\d+))re");
    int n = 0;
    for (auto it = std::sregex_iterator(log.begin(), log.end(), line); it != std::sregex_iterator(); ++it) {
      n += std::stoi((*it)[1].str());
    }
    return n;
  };
  CHECK(eventually([&] { return reaped_in_log() == 10; }));
  ::close(ready[0]);
}

TEST_CASE("tokenfused: a SIGKILLed agent restarts and adopts the region, with every counter kept") {
  AgentFixture f("restart");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 1000, 0}).allowed());
  agent->signal(SIGKILL);
  CHECK(agent->wait() == -SIGKILL);
  CHECK(client->check("acme", "gpt-4o").allowed());   // clients go on without the agent

  auto second = f.start();
  auto again = f.waitForRegion(second->pid());
  CHECK(again->tenant("acme").committed == NanoUsd(5'000'000));
  CHECK(f.log().find(R"("event":"region_adopted")") != std::string::npos);
}

TEST_CASE("tokenfused: a second agent on the same region or data dir is refused") {
  AgentFixture f("twice");
  auto agent = f.start();
  f.waitForRegion(agent->pid());
  auto second = f.start();
  CHECK(second->wait() == 1);
  CHECK(f.log().find("another tokenfused is running with data dir") != std::string::npos);
}

TEST_CASE("tokenfused: a region of another layout is refused unless --recreate-region") {
  AgentFixture f("layout");
  {
    auto agent = f.start();
    f.waitForRegion(agent->pid());
    agent->signal(SIGKILL);
    agent->wait();
  }
  {
    std::unique_ptr<Region> r;
    REQUIRE(Region::attach(f.shm, &r).ok());
    r->header().layout_version = shm::kLayoutVersion + 1;
  }
  auto refused = f.start();
  CHECK(refused->wait() == 1);
  CHECK(f.log().find("has layout version " + std::to_string(shm::kLayoutVersion + 1)) != std::string::npos);
  auto agent = f.start({"--recreate-region"});
  auto client = f.waitForRegion(agent->pid());
  CHECK(client->info().layout_version == shm::kLayoutVersion);
  CHECK(f.log().find(R"("event":"region_recreated")") != std::string::npos);
}

TEST_CASE("cli: status, usage and check read the region, and check exits 1 on a denial") {
  AgentFixture f("cli", "[budgets.tenants]\nacme = \"0.001\"\n[kill_switch]\nactive = false\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  std::string out;
  CHECK(f.cli({"status"}, &out) == 0);
  CHECK(out.find("kill       off") != std::string::npos);
  CHECK(out.find("ledger     durable to #0, backlog 0 of 16384, refused (ring full) 0") != std::string::npos);
  CHECK(f.cli({"check", "acme", "gpt-4o", "--tokens", "100"}, &out) == 0);
  CHECK(out.find("allowed (estimated $0.000500)") != std::string::npos);
  CHECK(f.cli({"check", "acme", "gpt-4o", "--json"}, &out) == 1);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["allowed"] == false);
  CHECK(j["error_code"] == "E-BUDGET-002");
  CHECK(j["estimated_cost_usd"] == "0.020000");
  client->record({"acme", "gpt-4o", "openai", {}, {}, 10, 0});
  CHECK(f.cli({"usage", "acme", "--json"}, &out) == 0);
  CHECK(nlohmann::json::parse(out)["committed_usd"] == "0.000050");
  CHECK(f.cli({"--shm-name", "no-such-region-x", "status"}, &out) == 3);
  CHECK(out.find("does not exist: start tokenfused") != std::string::npos);
}

TEST_CASE("cli: ledger list filters by tenant, run and time, exports CSV and JSON lines, and totals sum a day") {
  AgentFixture f("cliledger");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  Decision last;
  for (int i = 0; i < 5; ++i) {
    last = client->record({i % 2 == 0 ? "acme" : "beta, inc", "gpt-4o", "openai", i < 2 ? "run-1" : "", "a", 1000, 0});
    REQUIRE(last.allowed());
  }
  REQUIRE(client->waitDurable(last.ledger_seq, 5000));
  const std::string dd = f.dir.path + "/state";
  std::string out;
  CHECK(f.cli({"ledger", "--data-dir", dd, "list", "--project", "acme", "--format", "jsonl"}, &out) == 0);
  std::vector<nlohmann::json> lines;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  REQUIRE(lines.size() == 3);
  CHECK(lines[0]["project_id"] == "acme");
  CHECK(lines[0]["cost_usd"] == "0.005000");
  CHECK(lines[0]["run_id"] == "run-1");
  CHECK(lines[2]["run_id"].is_null());

  CHECK(f.cli({"ledger", "--data-dir", dd, "export", "--run", "run-1", "--format", "csv"}, &out) == 0);
  CHECK(out.find("seq,host_id,created_at,kind,project_id") == 0);
  CHECK(out.find(",\"beta, inc\",") != std::string::npos);   // CSV quoting
  CHECK(std::count(out.begin(), out.end(), '\n') == 3);

  CHECK(f.cli({"ledger", "--data-dir", dd, "list", "--since", "2000-01-01", "--until", "2000-01-02"}, &out) == 0);
  CHECK(std::count(out.begin(), out.end(), '\n') == 1);   // the header only
  CHECK(f.cli({"ledger", "--data-dir", dd, "list", "--since", "yesterday"}, &out) == 2);
  CHECK(out.find("is not a UTC time") != std::string::npos);

  CHECK(f.cli({"ledger", "--data-dir", dd, "--json", "totals"}, &out) == 0);
  const auto totals = nlohmann::json::parse(out);
  REQUIRE(totals.size() == 2);
  CHECK(totals[0]["project_id"] == "acme");
  CHECK(totals[0]["cost_usd"] == "0.015000");
  CHECK(totals[0]["calls"] == 3);
  CHECK(f.cli({"ledger", "--data-dir", "/nonexistent", "list"}, &out) == 3);
  CHECK(out.find("/nonexistent/ledger.db") != std::string::npos);
}

TEST_CASE("cli: kill and limit change the agent through its admin API, with exit codes scripts can rely on") {
  AgentFixture f("cliadmin", "[budgets.tenants]\nacme = \"0.05\"\n");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  (void)f.httpPort();
  const std::string data_dir = f.dir.path + "/state";
  std::string out;
  CHECK(f.cli({"kill", "on", "--reason", "runaway loop", "--data-dir", data_dir}, &out) == 0);
  CHECK(out == "kill switch ON: runaway loop\n");
  CHECK(client->killSwitch().active);
  CHECK(f.cli({"check", "acme", "qwen3:8b"}, &out) == 1);
  CHECK(f.cli({"kill", "show", "--json", "--data-dir", data_dir}, &out) == 0);
  CHECK(nlohmann::json::parse(out)["reason"] == "runaway loop");
  CHECK(f.cli({"kill", "off", "--data-dir", data_dir}, &out) == 0);
  CHECK(out == "kill switch off\n");
  CHECK_FALSE(client->killSwitch().active);

  CHECK(f.cli({"limit", "set", "acme", "2.50", "--data-dir", data_dir}, &out) == 0);
  CHECK(out.find("limit $2.500000") == 0);
  CHECK(client->tenant("acme").limit == NanoUsd(2'500'000'000));
  CHECK(f.cli({"limit", "set", "--platform", "100", "--data-dir", data_dir}, &out) == 0);
  CHECK(client->platform().limit == NanoUsd::fromWholeUsd(100));
  CHECK(f.cli({"limit", "set", "--run", "r1", "0.25", "--data-dir", data_dir, "--json"}, &out) == 0);
  CHECK(nlohmann::json::parse(out)["limit_usd"] == "0.250000");
  CHECK(f.cli({"limit", "clear", "acme", "--data-dir", data_dir}, &out) == 0);
  CHECK(out.find("limit unlimited") == 0);
  CHECK_FALSE(client->tenant("acme").limit.has_value());
  CHECK(f.cli({"limit", "reset", "acme", "--data-dir", data_dir}, &out) == 0);
  CHECK(client->tenant("acme").limit == NanoUsd(50'000'000));

  // 2: bad usage, nothing sent.
  CHECK(f.cli({"limit", "set", "acme", "1.2.3", "--data-dir", data_dir}, &out) == 2);
  CHECK(out.find("'1.2.3' is not a USD amount") != std::string::npos);
  CHECK(f.cli({"limit", "set", "--platform", "acme", "5", "--data-dir", data_dir}, &out) == 2);
  CHECK(f.cli({"kill", "on", "--data-dir", data_dir}, &out) == 2);   // --reason is required
  // 4: the agent refused (wrong token).
  const std::string wrong = f.dir.path + "/wrong.token";
  std::ofstream(wrong) << "0123456789abcdef0123456789abcdef\n";
  CHECK(f.cli({"kill", "on", "--reason", "x", "--data-dir", data_dir, "--token-file", wrong}, &out) == 4);
  CHECK(out.find("the agent refused: Authorization must be") != std::string::npos);
  CHECK_FALSE(client->killSwitch().active);
  // 3: no agent to talk to.
  CHECK(f.cli({"kill", "on", "--reason", "x", "--data-dir", data_dir, "--url", "http://127.0.0.1:1"}, &out) == 3);
  CHECK(out.find("cannot reach the agent at http://127.0.0.1:1") != std::string::npos);
  CHECK(f.cli({"kill", "on", "--reason", "x", "--data-dir", f.dir.path + "/nowhere"}, &out) == 3);
  CHECK(out.find("cannot read the admin token from") != std::string::npos);
}
