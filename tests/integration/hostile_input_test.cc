// Bad input, bad config and a bad environment, against a real tokenfused (and the agent in-process
// where a test must put bytes where no client could): ids that are not UTF-8 or hold NUL or '/',
// '' ids in the ledger, the admin token file, config values that only fail at start-up, and the
// kill switch with the disk full.
#include "agent_process.h"

#include "http_api.h"
#include "ids.h"
#include "table.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <httplib.h>

#include <sys/mount.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <fstream>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

// Sends a request with the path exactly as given (no encoding by the client).
std::pair<int, json> request(int port, const std::string& method, const std::string& path, const std::string& body = {},
                             const std::string& token = {}) {
  httplib::Client c("127.0.0.1", port);
  c.set_url_encode(false);
  c.set_connection_timeout(10);
  c.set_read_timeout(30);
  httplib::Headers h;
  if (!token.empty()) h.emplace("Authorization", "Bearer " + token);
  httplib::Result r = method == "POST"     ? c.Post(path, h, body, "application/json")
                      : method == "PUT"    ? c.Put(path, h, body, "application/json")
                      : method == "DELETE" ? c.Delete(path, h)
                                           : c.Get(path, h);
  REQUIRE_MESSAGE(r, "no answer from the agent for " << method << " " << path);
  const json j = r->body.empty() ? json(nullptr) : json::parse(r->body, nullptr, false);
  return {r->status, j};
}

struct RunningAgent : AgentFixture {
  explicit RunningAgent(const char* what, const std::string& extra = "") : AgentFixture(what, extra) {
    agent = start();
    client = waitForRegion(agent->pid());
    port = httpPort();
    token = adminToken();
  }
  std::unique_ptr<Process> agent;
  std::unique_ptr<Client> client;
  int port = 0;
  std::string token;
};

// tokenfused with a config file of the test's own; returns its exit code and output.
int runAgent(const TempDir& dir, const std::string& toml, std::vector<std::string> extra, std::string* output,
             const char* name = "run") {
  const std::string config = dir.path + "/" + name + ".toml";
  std::ofstream(config) << toml;
  std::vector<std::string> args{TOKENFUSED_PATH, "--config", config};
  args.insert(args.end(), extra.begin(), extra.end());
  const std::string out = dir.path + "/" + name + ".out";
  std::remove(out.c_str());
  Process p(args, out);
  const int rc = p.wait();
  *output = p.output();
  return rc;
}

}  // namespace

TEST_CASE("http: an id that is not UTF-8 or holds NUL gets a 400 that names the field, and nothing is applied") {
  RunningAgent f("badid");
  auto [put, put_body] = request(f.port, "PUT", "/v1/tenants/%FF/limit", R"({"daily_limit_usd":"1.00"})", f.token);
  CHECK(put == 400);
  CHECK(put_body["field"] == "project_id");
  CHECK(put_body["message"] == "project_id must be valid UTF-8 without NUL bytes");
  CHECK_FALSE(f.client->tenant("\xFF").tracked);   // the limit was not applied
  CHECK(request(f.port, "PUT", "/v1/runs/r%00x/limit", R"({"limit_usd":"1.00"})", f.token).second["field"] == "run_id");
  CHECK_FALSE(f.client->run(std::string_view("r\0x", 3)).tracked);
  CHECK(request(f.port, "DELETE", "/v1/tenants/a%C0%AF/limit", {}, f.token).first == 400);
  CHECK(request(f.port, "GET", "/v1/tenants/%FF").first == 400);

  // In a JSON body, "\u0000" is the way to a NUL.
  for (const auto& [path, body, field] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"/v1/check", R"({"project_id":"ac\u0000me","model":"gpt-4o"})", "project_id"},
           {"/v1/check", R"({"project_id":"acme","model":"gpt\u0000-4o"})", "model"},
           {"/v1/reservations", R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":10,"run_id":"\u0000"})",
            "run_id"},
           {"/v1/usage",
            R"({"project_id":"acme","model":"gpt-4o","provider":"openai","prompt_tokens":1,"completion_tokens":1,"agent_id":"a\u0000"})",
            "agent_id"},
           {"/v1/usage", R"({"project_id":"acme","model":"gpt-4o","provider":"o\u0000","prompt_tokens":1,"completion_tokens":1})",
            "provider"}}) {
    auto [status, answer] = request(f.port, "POST", path, body);
    CHECK_MESSAGE(status == 400, body);
    CHECK_MESSAGE(answer["field"] == field, body);
  }
  CHECK(f.client->info().ledger_appended == 0);
  CHECK_FALSE(f.client->tenant(std::string_view("ac\0me", 5)).tracked);
  auto [ledger, entries] = request(f.port, "GET", "/v1/ledger", {}, f.token);
  CHECK(ledger == 200);
  CHECK(entries["entries"].empty());
}

TEST_CASE("http: ids with '/' are managed over HTTP: a tenant's and a run's limit set, read and reset") {
  RunningAgent f("slashid");
  auto [put, set] = request(f.port, "PUT", "/v1/tenants/team%2Fa/limit", R"({"daily_limit_usd":"2.50"})", f.token);
  CHECK(put == 200);
  CHECK(set["project_id"] == "team/a");
  CHECK(f.client->tenant("team/a").limit == usd("2.50"));
  auto [get, view] = request(f.port, "GET", "/v1/tenants/team%2Fa");
  CHECK(get == 200);
  CHECK(view["project_id"] == "team/a");
  CHECK(view["limit_usd"] == "2.500000");
  auto [del, reset] = request(f.port, "DELETE", "/v1/tenants/team%2Fa/limit", {}, f.token);
  CHECK(del == 200);
  CHECK(reset["limit_usd"] == nullptr);
  CHECK_FALSE(f.client->tenant("team/a").limit.has_value());

  // An id that ends in "/limit" is an id like any other.
  CHECK(request(f.port, "PUT", "/v1/tenants/b%2Flimit/limit", R"({"daily_limit_usd":"1"})", f.token).first == 200);
  CHECK(f.client->tenant("b/limit").limit == usd("1"));
  CHECK(request(f.port, "GET", "/v1/tenants/b%2Flimit").second["project_id"] == "b/limit");
  CHECK(request(f.port, "PUT", "/v1/runs/r%2F1/limit", R"({"limit_usd":"0.25"})", f.token).first == 200);
  CHECK(f.client->run("r/1").limit == usd("0.25"));
  CHECK(request(f.port, "GET", "/v1/runs/r%2F1").second["run_id"] == "r/1");
  // A '/' that is not encoded is a path separator: no such endpoint.
  CHECK(request(f.port, "GET", "/v1/tenants/team/a").first == 404);
  CHECK(request(f.port, "PUT", "/v1/tenants/team/a/limit", R"({"daily_limit_usd":"1"})", f.token).first == 404);
  CHECK_FALSE(f.client->tenant("team").tracked);

  // The CLI encodes the id and gets the same.
  std::string out;
  CHECK(f.cli({"limit", "set", "team/c", "3", "--data-dir", f.dir.path + "/state"}, &out) == 0);
  CHECK(f.client->tenant("team/c").limit == usd("3"));
}

TEST_CASE("hostile input: ids stored before they were checked never fail the alert scan, the ledger views or the CLI") {
  TempDir dir;
  Config c = testConfig(dir, "storedbad");
  c.tenant_default_daily_limit = usd("1");
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-11-29T10:00:00Z")};
  auto agent = std::make_unique<Agent>(c, Agent::Options{false, clock.fn()});
  auto client = attachClient(c.shm_name);
  // As a region written by someone else, or an old agent, leaves them: straight into the table.
  Region& region = agent->admin().region();
  KeyedTable<shm::BudgetSlot> tenants(region.tenants(), region.header().tenant_capacity);
  const Found bad = tenants.findOrInsert("bad\xFF", 0, [](shm::BudgetSlot& s) noexcept {
    s.c.limit.store(1'000'000'000, std::memory_order_relaxed);
  });
  REQUIRE(bad.index >= 0);
  tenants.at(bad.index).c.spend.add(2'000'000'000, 2'000'000'000);   // $2 of $1
  REQUIRE(client->record({"acme", "gpt-4o", "openai", {}, {}, 400'000, 0}).allowed());   // $2 of $1
  {  // and a ledger row from before ids were checked
    Ledger old(dir.path + "/ledger.db", "old-host");
    std::vector<LedgerEntry> rows(1);
    rows[0].seq = 1'000'000;
    rows[0].unix_ns = toUnixNs(clock.now);
    rows[0].day = agent->admin().day();
    rows[0].kind = "record";
    rows[0].project_id = "bad\xFF";
    rows[0].model = "gpt-4o";
    rows[0].provider = "openai";
    rows[0].cost_nano_usd = 7'000'000;
    REQUIRE(old.append(rows) == 1);
  }

  agent->tick();   // the alert scan
  std::vector<std::string> fired;
  {
    SQLite::Database db(dir.path + "/ledger.db");
    SQLite::Statement q(db, "SELECT DISTINCT scope_id FROM alert_fired WHERE scope = 'tenant' ORDER BY scope_id");
    while (q.executeStep()) fired.push_back(q.getColumn(0).getString());
  }
  CHECK(fired == std::vector<std::string>{"acme", "bad\xFF"});
  CHECK(agent->alerter().stats().fired == 2 * 3);   // 80, 95 and 100 % for each

  HttpApi::Options options;
  options.port = 0;
  options.admin_token = "0123456789abcdef0123456789abcdef";
  auto http = std::make_unique<HttpApi>(*agent, options);
  auto [status, answer] = request(http->port(), "GET", "/v1/ledger", {}, "0123456789abcdef0123456789abcdef");
  CHECK(status == 200);
  REQUIRE(answer.is_object());
  REQUIRE(answer["entries"].size() == 1);
  CHECK(answer["entries"][0]["project_id"] == "bad\xEF\xBF\xBD");
  httplib::Client plain("127.0.0.1", http->port());
  auto metrics = plain.Get("/metrics");
  REQUIRE(metrics);
  CHECK(metrics->status == 200);
  CHECK(metrics->body.find("project_id=\"bad\xEF\xBF\xBD\"") != std::string::npos);
  CHECK(validIdText(metrics->body));

  for (const char* format : {"jsonl", "csv", "table"}) {
    const std::string out = dir.path + "/cli-" + format + ".out";
    Process cli({TOKENFUSE_CLI_PATH, "--shm-name", c.shm_name, "ledger", "list", "--format", format, "--data-dir", dir.path},
                out);
    CHECK_MESSAGE(cli.wait() == 0, format << ": " << cli.output());
    CHECK(cli.output().find("bad") != std::string::npos);
  }
  Process totals({TOKENFUSE_CLI_PATH, "--shm-name", c.shm_name, "ledger", "totals", "--json", "--day", "2026-11-29",
                  "--data-dir", dir.path},
                 dir.path + "/cli-totals.out");
  CHECK_MESSAGE(totals.wait() == 0, totals.output());
  CHECK(totals.output().find("bad\xEF\xBF\xBD") != std::string::npos);

  // A new region (a reboot) rebuilt from that ledger: the agent starts, the platform counts it.
  http.reset();
  client.reset();
  agent.reset();
  Region::remove(c.shm_name);
  Agent again(c, {false, clock.fn()});
  CHECK(attachClient(c.shm_name)->platform().committed == usd("0.007"));
}

TEST_CASE("ledger: an empty agent_id or provider stays '', an absent run_id is NULL, as the reference stores them") {
  LedgerFixture f;
  REQUIRE(f.t.client->record({"acme", "gpt-4o", "", {}, {}, 1000, 0}).allowed());
  Reservation r;
  REQUIRE(f.t.client->reserve({"acme", "gpt-4o", "run-1", {}, 1000, 0, 0}, &r).allowed());
  REQUIRE(f.t.client->commit(r, "", 1000, 0).allowed());
  while (f.writer->drainOnce().any()) {
  }
  SQLite::Database db(f.dir.path + "/ledger.db");
  SQLite::Statement q(db,
                      "SELECT agent_id IS NULL, agent_id, provider IS NULL, provider, run_id IS NULL FROM budget_ledger "
                      "ORDER BY seq");
  std::vector<std::string> rows;
  while (q.executeStep()) {
    rows.push_back(std::to_string(q.getColumn(0).getInt()) + "'" + q.getColumn(1).getString() + "'" +
                   std::to_string(q.getColumn(2).getInt()) + "'" + q.getColumn(3).getString() + "'" +
                   std::to_string(q.getColumn(4).getInt()));
  }
  CHECK(rows == std::vector<std::string>{"0''0''1", "0''0''0"});
  const std::vector<LedgerEntry> entries = f.ledger->list({});
  REQUIRE(entries.size() == 2);
  const json j = toJson(entries[0]);
  CHECK(j["agent_id"] == "");
  CHECK(j["provider"] == "");
  CHECK(j["run_id"] == nullptr);
  CHECK(f.ledger->runTotals().size() == 1);   // the run's entry, not the run-less one
}

TEST_CASE("tokenfused: an admin token file that group or others can read, or another user owns, stops start-up (exit 2)") {
  TempDir dir;
  const std::string shm = uniqueName("token");
  RegionCleanup cleanup{shm};
  const std::string state = dir.path + "/state";
  REQUIRE(::mkdir(state.c_str(), 0700) == 0);
  const std::string token = state + "/admin.token";
  const std::string toml = "[agent]\nshm_name = \"" + shm + "\"\ndata_dir = \"" + state +
                           "\"\n[http]\nlisten = \"127.0.0.1:0\"\n[region]\ntenant_capacity = 64\nrun_capacity = 64\n"
                           "reservation_capacity = 64\n";
  std::ofstream(token) << "0123456789abcdef0123456789abcdef\n";
  std::string out;
  for (const mode_t mode : {0644, 0640, 0602, 0660}) {
    REQUIRE(::chmod(token.c_str(), mode) == 0);
    CHECK(runAgent(dir, toml, {}, &out) == 2);
    CHECK_MESSAGE(out.find(token + ": the admin token file has mode") != std::string::npos, out);
    CHECK(out.find("chmod 600 " + token) != std::string::npos);
  }
  REQUIRE(::chmod(token.c_str(), 0600) == 0);
  if (::geteuid() == 0) {   // only root can give a file away
    REQUIRE(::chown(token.c_str(), 4242, 4242) == 0);
    CHECK(runAgent(dir, toml, {}, &out) == 2);
    CHECK_MESSAGE(out.find("owned by uid 4242, not by the agent's user") != std::string::npos, out);
    REQUIRE(::chown(token.c_str(), ::geteuid(), ::getegid()) == 0);
  }
  // A missing file is created 0600, whatever the umask.
  std::remove(token.c_str());
  std::remove((state + "/http.port").c_str());   // an earlier agent's (one that was not refused)
  const mode_t old_umask = ::umask(0);
  Process agent({TOKENFUSED_PATH, "--config", dir.path + "/run.toml"}, dir.path + "/agent.log");
  ::umask(old_umask);
  REQUIRE(eventually([&] {
    struct stat st{};
    return ::stat((state + "/http.port").c_str(), &st) == 0;
  }));
  struct stat st{};
  REQUIRE(::stat(token.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  // The right token works; a wrong one of the same length, a prefix or a longer one does not.
  int port = 0;
  std::ifstream(state + "/http.port") >> port;
  std::string good;
  std::getline(std::ifstream(token), good);
  CHECK(request(port, "PUT", "/v1/kill", R"({"reason":"t"})", good).first == 200);
  std::string wrong = good;
  wrong.back() = wrong.back() == '0' ? '1' : '0';
  for (const std::string& bad : {wrong, good.substr(0, good.size() - 1), good + "0", std::string()}) {
    CHECK(request(port, "DELETE", "/v1/kill", {}, bad).first == 401);
  }
  CHECK(request(port, "DELETE", "/v1/kill", {}, good).first == 204);
}

TEST_CASE("tokenfused: a time zone, shm name, listen address or data dir that start-up cannot use is a config error (exit 2)") {
  TempDir dir;
  const std::string shm = uniqueName("badcfg");
  RegionCleanup cleanup{shm};
  const std::string file = dir.path + "/a-file";
  std::ofstream(file) << "not a directory\n";
  auto config = [&](const std::string& agent_keys, const std::string& listen = "127.0.0.1:0") {
    return "[agent]\n" + agent_keys + "\n[http]\nlisten = \"" + listen +
           "\"\n[region]\ntenant_capacity = 64\nrun_capacity = 64\nreservation_capacity = 64\n";
  };
  const std::string ok_keys = "shm_name = \"" + shm + "\"\ndata_dir = \"" + dir.path + "/state\"";
  struct Case {
    std::string toml;
    std::vector<std::string> args;
    std::string key;
  };
  const std::vector<Case> cases{
      {config(ok_keys + "\ntimezone = \"Mars/Olympus\""), {}, "agent.timezone: unknown time zone 'Mars/Olympus'"},
      {config("shm_name = \"..\"\ndata_dir = \"" + dir.path + "/state\""), {}, "agent.shm_name"},
      {config(ok_keys), {"--shm-name", ".."}, "--shm-name"},
      {config(ok_keys, "no-such-host.invalid:0"), {}, "http.listen: 'no-such-host.invalid' is not an IP address"},
      {config(ok_keys), {"--listen", "example.com:0"}, "--listen"},
      {config("shm_name = \"" + shm + "\"\ndata_dir = \"" + file + "\""), {}, "agent.data_dir: '" + file + "' exists"},
      {config(ok_keys), {"--data-dir", file}, "--data-dir"},
  };
  std::string out;
  for (const Case& c : cases) {
    for (const bool check_only : {true, false}) {
      std::vector<std::string> args = c.args;
      if (check_only) args.push_back("--check-config");
      CHECK_MESSAGE(runAgent(dir, c.toml, args, &out) == 2, c.key << (check_only ? " --check-config" : "") << ": " << out);
      CHECK_MESSAGE(out.find(c.key) != std::string::npos, c.key << ": " << out);
    }
  }
  // A data dir that cannot be made (under a file) passes --check-config (it may be made by then)
  // but is still exit 2 at start, naming the key.
  const std::string under_file = config("shm_name = \"" + shm + "\"\ndata_dir = \"" + file + "/state\"");
  CHECK(runAgent(dir, under_file, {}, &out) == 2);
  CHECK_MESSAGE(out.find("agent.data_dir: cannot create") != std::string::npos, out);
  CHECK(runAgent(dir, config(ok_keys), {"--check-config"}, &out) == 0);
}

TEST_CASE("config: an id with NUL in [budgets.tenants], [budgets.runs] or [prices.models] is refused by name") {
  for (const char* table : {"budgets.tenants", "budgets.runs", "prices.models"}) {
    const std::string value = std::string(table) == "prices.models" ? "{ prompt = \"1\", completion = \"1\" }" : "\"1\"";
    const std::string toml = std::string("[") + table + "]\n\"a\\u0000b\" = " + value + "\n";
    CHECK_THROWS_WITH_AS(parseConfig(toml, "t.toml"), doctest::Contains("must not hold NUL"), ConfigError);
  }
}

namespace {

// A tmpfs of `bytes` at `path`, unmounted at the end of the test: a disk that can really fill up.
struct SmallDisk {
  SmallDisk(const std::string& at, std::size_t bytes) : path(at) {
    ::mkdir(path.c_str(), 0700);
    mounted = ::mount("tokenfuse-test", path.c_str(), "tmpfs", 0, ("size=" + std::to_string(bytes)).c_str()) == 0;
  }
  ~SmallDisk() {
    if (mounted) ::umount2(path.c_str(), MNT_DETACH);
  }
  // Fills it: returns once a write failed with ENOSPC.
  bool fill() {
    FILE* f = std::fopen((path + "/filler").c_str(), "w");
    if (f == nullptr) return false;
    std::vector<char> block(4096, 'x');
    while (std::fwrite(block.data(), 1, block.size(), f) == block.size() && std::fflush(f) == 0) {
    }
    const bool full = errno == ENOSPC;
    std::fclose(f);
    return full;
  }
  void unfill() { std::remove((path + "/filler").c_str()); }
  std::string path;
  bool mounted = false;
};

}  // namespace

TEST_CASE("kill switch: with the disk full it turns off as it turns on: in force at once, 503 'not saved', CLI exit 5") {
  TempDir dir;
  SmallDisk disk(dir.path + "/state", 4 << 20);
  if (!disk.mounted) {
    MESSAGE("skipped: mounting a tmpfs needs root (CAP_SYS_ADMIN)");
    return;
  }
  AgentFixture f("diskfull");
  std::ofstream(f.config_path) << "[agent]\nshm_name = \"" << f.shm << "\"\ndata_dir = \"" << disk.path
                               << "\"\ntick_ms = 50\n[http]\nlisten = \"127.0.0.1:0\"\n"
                                  "[region]\ntenant_capacity = 64\nrun_capacity = 64\nreservation_capacity = 64\n";
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  int port = 0;
  REQUIRE(eventually([&] { return static_cast<bool>(std::ifstream(disk.path + "/http.port") >> port) && port > 0; }));
  std::string token;
  std::getline(std::ifstream(disk.path + "/admin.token"), token);
  REQUIRE(disk.fill());

  auto [on, on_body] = request(port, "PUT", "/v1/kill", R"({"reason":"runaway"})", token);
  CHECK(on == 503);
  CHECK(on_body["applied"] == true);
  CHECK(client->killSwitch().active);
  CHECK(client->check("acme", "gpt-4o").code == Code::kEmergencyKill);

  auto [off, off_body] = request(port, "DELETE", "/v1/kill", {}, token);
  CHECK(off == 503);
  CHECK(off_body["error"] == "not_saved");
  CHECK(off_body["applied"] == true);
  CHECK_FALSE(client->killSwitch().active);
  CHECK(client->check("acme", "gpt-4o").allowed());

  std::string out;
  REQUIRE(request(port, "PUT", "/v1/kill", R"({"reason":"again"})", token).first == 503);
  CHECK(f.cli({"kill", "off", "--data-dir", disk.path}, &out) == 5);   // 5: in force, not saved
  CHECK(out.find("warning") != std::string::npos);
  CHECK_FALSE(client->killSwitch().active);

  disk.unfill();   // room again: the next change is saved, and outlives a restart
  CHECK(request(port, "DELETE", "/v1/kill", {}, token).first == 204);
  agent->signal(SIGTERM);
  REQUIRE(agent->wait() == 0);
  agent = f.start();
  client = f.waitForRegion(agent->pid());
  CHECK_FALSE(client->killSwitch().active);
  CHECK(f.log().find(R"("event":"kill_switch_not_saved")") != std::string::npos);
}
