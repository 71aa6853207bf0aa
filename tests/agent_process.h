// tokenfused as a real process, configured for one test.
#pragma once

#include "agent_support.h"
#include "process.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

namespace tokenfuse::test {

struct AgentFixture {
  // `extra_toml` is appended after the [region] table; `agent_toml` goes into [agent] and
  // `http_toml` into [http].
  AgentFixture(const char* what, const std::string& extra_toml = "", const std::string& agent_toml = "",
               const std::string& http_toml = "")
      : shm(uniqueName(what)), cleanup{shm} {
    config_path = dir.path + "/tokenfuse.toml";
    std::ofstream(config_path) << "[agent]\nshm_name = \"" << shm << "\"\ndata_dir = \"" << dir.path
                               << "/state\"\ntick_ms = 50\n" << agent_toml << "[http]\nlisten = \"127.0.0.1:0\"\n"
                               << http_toml
                               << "[region]\ntenant_capacity = 256\nrun_capacity = 256\n"
                                  "reservation_capacity = 256\n"
                               << extra_toml;
  }
  std::unique_ptr<Process> start(std::vector<std::string> extra = {}) {
    std::filesystem::remove(dir.path + "/state/http.port");   // a killed agent's
    std::vector<std::string> args{TOKENFUSED_PATH, "--config", config_path};
    args.insert(args.end(), extra.begin(), extra.end());
    return std::make_unique<Process>(args, dir.path + "/agent.log");
  }
  std::unique_ptr<Client> waitForRegion(pid_t agent_pid) {
    std::unique_ptr<Client> c;
    REQUIRE_MESSAGE(eventually([&] {
                      c.reset();
                      return Client::attach({shm}, &c).ok() && c->info().agent_pid == agent_pid;
                    }),
                    "tokenfused did not publish its region; its log:\n" << log());
    return c;
  }
  // The HTTP port the agent chose, once it is listening.
  int httpPort() {
    int port = 0;
    REQUIRE(eventually([&] {
      std::ifstream in(dir.path + "/state/http.port");
      return static_cast<bool>(in >> port) && port > 0;
    }));
    return port;
  }
  std::string adminToken() {
    std::ifstream in(dir.path + "/state/admin.token");
    std::string token;
    std::getline(in, token);
    return token;
  }
  std::string log() const {
    std::ifstream in(dir.path + "/agent.log");
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  int cli(std::vector<std::string> args, std::string* output) {
    if (std::find(args.begin(), args.end(), "--shm-name") == args.end()) args.insert(args.begin(), {"--shm-name", shm});
    args.insert(args.begin(), TOKENFUSE_CLI_PATH);
    const std::string out = dir.path + "/cli-" + std::to_string(cli_runs++) + ".out";
    Process p(args, out);
    const int rc = p.wait();
    *output = p.output();
    return rc;
  }

  TempDir dir;
  std::string shm;
  RegionCleanup cleanup;
  std::string config_path;
  int cli_runs = 0;
};


}  // namespace tokenfuse::test
