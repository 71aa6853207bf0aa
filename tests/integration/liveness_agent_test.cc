// Liveness across agent restarts, with a real tokenfused: what the agent holds for HTTP clients
// outlives it, and a region that applications still map is never silently replaced.
#include "agent_process.h"

#include <httplib.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <csignal>
#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;
using nlohmann::json;

namespace {

std::pair<int, json> post(int port, const std::string& path, const std::string& body) {
  httplib::Client c("127.0.0.1", port);
  c.set_connection_timeout(10);
  c.set_read_timeout(10);
  const httplib::Result r = c.Post(path, body, "application/json");
  REQUIRE_MESSAGE(r, "no answer from the agent for POST " << path);
  return {r->status, r->body.empty() ? json(nullptr) : json::parse(r->body)};
}

}  // namespace

TEST_CASE("http: a reservation made over HTTP by an agent that adopted the region survives a SIGKILL and restart "
          "of the agent, and its commit books") {
  AgentFixture f("httpkeep");
  // The agent that takes the reservation has adopted the region (a creator's differ in how they
  // name themselves), as after any restart.
  auto first = f.start();
  f.waitForRegion(first->pid());
  first->signal(SIGTERM);
  REQUIRE(first->wait() == 0);
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  auto [s1, res] = post(f.httpPort(), "/v1/reservations",
                        R"({"project_id":"acme","model":"gpt-4o","estimated_prompt_tokens":1000})");
  REQUIRE(s1 == 201);
  const std::string id = res["reservation_id"];
  CHECK(client->tenant("acme").held == NanoUsd(5'000'000));

  agent->signal(SIGKILL);
  REQUIRE(agent->wait() == -SIGKILL);
  auto again = f.start();
  client = f.waitForRegion(again->pid());
  // Several of the new agent's sweeps (tick 50 ms) go by before the HTTP client commits.
  const int port = f.httpPort();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto [s2, commit] = post(port, "/v1/reservations/" + id + "/commit",
                           R"({"provider":"openai","prompt_tokens":1000,"completion_tokens":0})");
  CHECK_MESSAGE(s2 == 200, commit.dump());
  CHECK(commit["cost_usd"] == "0.005000");
  CHECK(client->tenant("acme").committed == NanoUsd(5'000'000));
  CHECK(client->tenant("acme").held == NanoUsd(0));
}

TEST_CASE("region: an agent restarted after the region's ready word was zeroed keeps the region the applications "
          "map, and every record they were told was booked reaches SQLite") {
  AgentFixture f("readyzero");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  client.reset();

  // An application that records until told to stop, then reports how many records were acknowledged.
  int acked_pipe[2], stop_pipe[2];
  REQUIRE(::pipe(acked_pipe) == 0);
  REQUIRE(::pipe(stop_pipe) == 0);
  const pid_t app = ::fork();
  if (app == 0) {
    ::close(acked_pipe[0]);
    ::close(stop_pipe[1]);
    ::fcntl(stop_pipe[0], F_SETFL, O_NONBLOCK);
    std::unique_ptr<Client> c;
    if (!Client::attach({f.shm}, &c).ok()) ::_exit(1);
    std::int64_t acked = 0;
    char ch;
    while (::read(stop_pipe[0], &ch, 1) != 1) {
      if (c->record({"app", "gpt-4o", "openai", {}, {}, 100, 10}).allowed()) ++acked;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    (void)::write(acked_pipe[1], &acked, sizeof acked);
    ::_exit(0);
  }
  ::close(acked_pipe[1]);
  ::close(stop_pipe[0]);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  // Zero `ready` through a mapping of our own, then restart the agent.
  const int fd = ::shm_open(("/" + f.shm).c_str(), O_RDWR, 0);
  REQUIRE(fd >= 0);
  void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  REQUIRE(p != MAP_FAILED);
  ::close(fd);
  static_cast<shm::Header*>(p)->ready.store(0);
  ::munmap(p, 4096);
  agent->signal(SIGKILL);
  REQUIRE(agent->wait() == -SIGKILL);
  auto again = f.start();
  client = f.waitForRegion(again->pid());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  REQUIRE(::write(stop_pipe[1], "x", 1) == 1);
  std::int64_t acked = 0;
  REQUIRE(::read(acked_pipe[0], &acked, sizeof acked) == sizeof acked);
  int status = 0;
  ::waitpid(app, &status, 0);
  CHECK(acked > 50);
  // Everything acknowledged is durable once the agent's writer catches up.
  const bool durable = eventually([&] {
    const RegionInfo i = client->info();
    return i.ledger_durable >= i.ledger_appended;
  });
  CHECK(durable);
  again->signal(SIGTERM);
  CHECK(again->wait() == 0);
  auto ledger = Ledger::openReadOnly(f.dir.path + "/state/ledger.db");
  LedgerFilter filter;
  filter.project_id = "app";
  filter.limit = 1'000'000;
  CHECK(static_cast<std::int64_t>(ledger->list(filter).size()) == acked);
  CHECK_MESSAGE(f.log().find("region_recreated") == std::string::npos, f.log());
}
