// tokenfuse: the admin CLI. It reads the region directly through libtokenfuse, as any
// application does. Exit codes: 0 ok, 1 the check was denied, 2 bad usage, 3 no region.
#include <tokenfuse/tokenfuse.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <iostream>

namespace {

using namespace tokenfuse;
using nlohmann::json;

constexpr int kDenied = 1;
constexpr int kNoRegion = 3;

json budgetJson(const BudgetView& v) {
  return {{"tracked", v.tracked},
          {"limit_usd", v.limit ? json(v.limit->toString()) : json(nullptr)},
          {"committed_usd", v.committed.toString()},
          {"held_usd", v.held.toString()},
          {"prompt_tokens", v.prompt_tokens},
          {"completion_tokens", v.completion_tokens},
          {"calls", v.calls},
          {"denials", v.denials}};
}

void printBudget(const char* name, const BudgetView& v) {
  std::printf("%-10s committed $%s  held $%s  limit %s  calls %lld  tokens %lld/%lld  denials %lld\n", name,
              v.committed.toString().c_str(), v.held.toString().c_str(),
              v.limit ? ("$" + v.limit->toString()).c_str() : "unlimited", static_cast<long long>(v.calls),
              static_cast<long long>(v.prompt_tokens), static_cast<long long>(v.completion_tokens),
              static_cast<long long>(v.denials));
}

std::string civilDay(std::int32_t day) {
  const std::time_t t = static_cast<std::time_t>(day) * 86400;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", &tm);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tokenfuse: inspect the tokenfuse budget agent on this host"};
  app.require_subcommand(1);
  app.fallthrough();   // --json and --shm-name may come after the subcommand too
  std::string shm_name = "tokenfuse";
  bool as_json = false;
  app.add_option("--shm-name", shm_name, "region name tokenfused was started with")->envname("TOKENFUSE_SHM");
  app.add_flag("--json", as_json, "print JSON for scripts");

  auto* status = app.add_subcommand("status", "region, kill switch and platform budget");
  std::string project, model, run_id;
  std::int64_t tokens = 4000;
  auto* usage = app.add_subcommand("usage", "a tenant's budget today");
  usage->add_option("project_id", project)->required();
  auto* run = app.add_subcommand("run", "a run's budget");
  run->add_option("run_id", run_id)->required();
  auto* check = app.add_subcommand("check", "would a call be allowed now? (exit 1 if not)");
  check->add_option("project_id", project)->required();
  check->add_option("model", model)->required();
  check->add_option("--tokens", tokens, "estimated prompt tokens")->check(CLI::NonNegativeNumber);
  check->add_option("--run", run_id, "run id");
  CLI11_PARSE(app, argc, argv);

  std::unique_ptr<Client> client;
  if (Status s = Client::attach({shm_name}, &client); !s.ok()) {
    std::fprintf(stderr, "tokenfuse: %s\n", s.message().c_str());
    return kNoRegion;
  }

  if (*status) {
    const RegionInfo info = client->info();
    const KillSwitchState kill = client->killSwitch();
    const BudgetView platform = client->platform();
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    const double heartbeat_age_s =
        static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count() - info.agent_clock_unix_ns) / 1e9;
    if (as_json) {
      std::cout << json{{"shm_name", info.shm_name},
                        {"layout_version", info.layout_version},
                        {"region_bytes", info.region_bytes},
                        {"agent_pid", info.agent_pid},
                        {"agent_heartbeat_age_s", heartbeat_age_s},
                        {"day", civilDay(info.day)},
                        {"live_reservations", info.live_reservations},
                        {"kill_switch", {{"active", kill.active}, {"reason", kill.reason}}},
                        {"platform", budgetJson(platform)}}
                       .dump(2)
                << "\n";
    } else {
      std::printf("region     /%s  layout v%u  %llu bytes  agent pid %d (heartbeat %.1fs ago)\n", info.shm_name.c_str(),
                  info.layout_version, static_cast<unsigned long long>(info.region_bytes), info.agent_pid,
                  heartbeat_age_s);
      std::printf("day        %s  live reservations %u\n", civilDay(info.day).c_str(), info.live_reservations);
      std::printf("kill       %s%s%s\n", kill.active ? "ON" : "off", kill.active ? ": " : "", kill.reason.c_str());
      printBudget("platform", platform);
    }
    return 0;
  }
  if (*usage || *run) {
    const BudgetView v = *usage ? client->tenant(project) : client->run(run_id);
    if (as_json) {
      std::cout << budgetJson(v).dump(2) << "\n";
    } else {
      printBudget(*usage ? "tenant" : "run", v);
    }
    return 0;
  }
  const Decision d = client->check(project, model, tokens, run_id);
  if (as_json) {
    json out = {{"allowed", d.allowed()}, {"estimated_cost_usd", d.cost.toString()}};
    if (!d.allowed()) {
      out["error_code"] = d.errorCode();
      out["message"] = describe(d, project);
    }
    std::cout << out.dump(2) << "\n";
  } else if (d.allowed()) {
    std::printf("allowed (estimated $%s)\n", d.cost.toString().c_str());
  } else {
    std::printf("denied [%s] %s\n", d.errorCode(), describe(d, project).c_str());
  }
  return d.allowed() ? 0 : kDenied;
}
