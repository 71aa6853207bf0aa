// tokenfused as a real process with its LLM proxy in front of the LLM API stand-in
// (tests/standin/llm_standin.h), and ways to see what it booked.
#pragma once

#include "agent_process.h"
#include "llm_standin.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <map>

namespace tokenfuse::test {

// gpt-4o and claude-test cost $0.01 a completion token and nothing for the prompt, so that a
// limit in dollars is a number of tokens; llama3.2 is an Ollama model, free.
inline const char* kProxyPrices =
    "[prices.models]\n\"gpt-4o\" = { prompt = \"0\", completion = \"10000\" }\n"
    "\"claude-test\" = { prompt = \"0\", completion = \"10000\" }\n";

struct LedgerRow {
  std::string project_id, run_id, model, provider, tags;
  std::int64_t prompt_tokens = 0, completion_tokens = 0, cost_nano = 0;
};

struct ProxyAgent {
  // `toml`: tables of the agent's config; `proxy_keys`: keys of its [proxy] table.
  ProxyAgent(const char* what, const std::string& toml, const std::string& proxy_keys = "", int standin_threads = 1)
      : standin(standin_threads), f(what, toml + kProxyPrices + proxyTable(proxy_keys)) {
    std::ofstream(files.path + "/upstream.key") << "sk-upstream-secret\n";
    agent = f.start();
    client = f.waitForRegion(agent->pid());
    port = f.httpPort();
  }

  std::string proxyTable(const std::string& keys) const {
    const std::string base = standin.baseUrl();
    return "[proxy]\n" + keys +
           "\n[[proxy.upstreams]]\nname = \"openai\"\nkind = \"openai\"\nbase_url = \"" + base +
           "\"\napi_key_file = \"" + files.path + "/upstream.key\"\n"
           "[[proxy.upstreams]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"" + base +
           "\"\napi_key_file = \"" + files.path + "/upstream.key\"\n"
           "[[proxy.upstreams]]\nname = \"ollama\"\nkind = \"ollama\"\nbase_url = \"" + base + "\"\n";
  }

  std::string proxyUrl() const { return "http://127.0.0.1:" + std::to_string(port) + "/proxy"; }

  // Runs tests/sdk/scenarios.mjs `scenario` with the official SDKs; what the client saw.
  nlohmann::json sdk(const std::string& scenario, const std::map<std::string, std::string>& env = {}) {
    const std::string dir = std::string(TOKENFUSE_SOURCE_DIR) + "/tests/sdk";
    REQUIRE_MESSAGE(std::filesystem::exists(dir + "/node_modules/openai"),
                    "the SDKs are not installed in " << dir << "/node_modules: run packaging/install-deps.sh");
    std::vector<std::string> args{"/usr/bin/env", "PROXY=" + proxyUrl()};
    for (const auto& [k, v] : env) args.push_back(k + "=" + v);
    args.insert(args.end(), {"node", dir + "/scenarios.mjs", scenario});
    const std::string out = f.dir.path + "/node-" + std::to_string(runs++) + ".out";
    Process p(args, out);
    const int rc = p.wait(std::chrono::seconds(120));
    const std::string text = p.output();
    REQUIRE_MESSAGE(rc == 0, "node " << scenario << " exited with " << rc << ":\n" << text);
    const std::size_t line = text.rfind("\n{", text.size() - 2);
    const nlohmann::json j = nlohmann::json::parse(text.substr(line == std::string::npos ? 0 : line + 1), nullptr, false);
    REQUIRE_MESSAGE(!j.is_discarded(), "node " << scenario << " printed no JSON:\n" << text);
    REQUIRE_MESSAGE(!j.contains("uncaught"), "node " << scenario << " failed: " << j.dump());
    return j;
  }

  // Every ledger entry, once every booked call is on disk.
  std::vector<LedgerRow> ledger() {
    REQUIRE(eventually([&] { return client->durableLedgerSeq() >= client->info().ledger_appended; }));
    SQLite::Database db(f.dir.path + "/state/ledger.db", SQLite::OPEN_READONLY);
    SQLite::Statement q(db, "SELECT project_id, COALESCE(run_id, ''), model, COALESCE(provider, ''), COALESCE(tags, ''), "
                            "prompt_tokens, completion_tokens, cost_nano_usd FROM budget_ledger ORDER BY seq");
    std::vector<LedgerRow> rows;
    while (q.executeStep()) {
      rows.push_back({q.getColumn(0).getString(), q.getColumn(1).getString(), q.getColumn(2).getString(),
                      q.getColumn(3).getString(), q.getColumn(4).getString(), q.getColumn(5).getInt64(),
                      q.getColumn(6).getInt64(), q.getColumn(7).getInt64()});
    }
    return rows;
  }

  // One sample of /metrics, e.g. metric("tokenfuse_proxy_requests_total{outcome=\"denied\",upstream=\"openai\"}").
  double metric(const std::string& series) {
    httplib::Client c("127.0.0.1", port);
    const httplib::Result r = c.Get("/metrics");
    REQUIRE(r);
    const std::size_t at = r->body.find("\n" + series + " ");
    if (at == std::string::npos) return 0;
    return std::stod(r->body.substr(at + series.size() + 2));
  }

  TempDir files;   // the upstream's API key
  LlmStandin standin;
  AgentFixture f;
  std::unique_ptr<Process> agent;
  std::unique_ptr<Client> client;
  int port = 0;
  int runs = 0;
};

}  // namespace tokenfuse::test
