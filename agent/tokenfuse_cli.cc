// tokenfuse: the admin CLI. It reads the region directly through libtokenfuse, as any
// application does. Exit codes: 0 ok, 1 the check was denied, 2 bad usage, 3 no region.
#include <tokenfuse/tokenfuse.hpp>

#include "ledger.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <optional>
#include <ctime>
#include <iostream>

namespace {

using namespace tokenfuse;
using nlohmann::json;

constexpr int kDenied = 1;
std::string civilDay(std::int32_t day);
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

// "2026-11-29" or "2026-11-29T14:00:00Z" (UTC) to unix seconds; nullopt if neither.
std::optional<std::int64_t> parseUtc(const std::string& text) {
  std::tm tm{};
  const char* end = ::strptime(text.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (end == nullptr || *end != '\0') {
    tm = {};
    end = ::strptime(text.c_str(), "%Y-%m-%d", &tm);
    if (end == nullptr || *end != '\0') return std::nullopt;
  }
  return static_cast<std::int64_t>(::timegm(&tm));
}

std::string csvField(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

std::string isoTime(std::int64_t unix_ns) {
  const std::time_t t = static_cast<std::time_t>(unix_ns / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof out, "%s.%03lldZ", buf, static_cast<long long>(unix_ns / 1'000'000 % 1000));
  return out;
}

json entryJson(const LedgerEntry& e) {
  auto opt = [](const std::string& s) { return s.empty() ? json(nullptr) : json(s); };
  return {{"seq", e.seq},
          {"host_id", e.host_id},
          {"created_at", isoTime(e.unix_ns)},
          {"kind", e.kind},
          {"project_id", e.project_id},
          {"agent_id", opt(e.agent_id)},
          {"run_id", opt(e.run_id)},
          {"model", e.model},
          {"provider", opt(e.provider)},
          {"prompt_tokens", e.prompt_tokens},
          {"completion_tokens", e.completion_tokens},
          {"cost_usd", NanoUsd(e.cost_nano_usd).toString()},
          {"reservation_id", e.reservation_id == 0 ? json(nullptr) : json(e.reservation_id)}};
}

int ledgerCommand(const std::string& data_dir, bool list, const LedgerFilter& filter, const std::string& format,
                  const std::string& day_text, bool as_json) {
  std::unique_ptr<Ledger> ledger;
  try {
    ledger = Ledger::openReadOnly(data_dir + "/ledger.db");
    if (list) {
      const std::vector<LedgerEntry> rows = ledger->list(filter);
      if (format == "csv") {
        std::printf("seq,host_id,created_at,kind,project_id,agent_id,run_id,model,provider,prompt_tokens,"
                    "completion_tokens,cost_usd,reservation_id\n");
        for (const LedgerEntry& e : rows) {
          std::printf("%llu,%s,%s,%s,%s,%s,%s,%s,%s,%lld,%lld,%s,%s\n", static_cast<unsigned long long>(e.seq),
                      csvField(e.host_id).c_str(), isoTime(e.unix_ns).c_str(), e.kind.c_str(),
                      csvField(e.project_id).c_str(), csvField(e.agent_id).c_str(), csvField(e.run_id).c_str(),
                      csvField(e.model).c_str(), csvField(e.provider).c_str(), static_cast<long long>(e.prompt_tokens),
                      static_cast<long long>(e.completion_tokens), NanoUsd(e.cost_nano_usd).toString().c_str(),
                      e.reservation_id == 0 ? "" : std::to_string(e.reservation_id).c_str());
        }
      } else if (format == "jsonl" || as_json) {
        for (const LedgerEntry& e : rows) std::printf("%s\n", entryJson(e).dump().c_str());
      } else {
        std::printf("%8s  %-24s  %-16s  %-16s  %-20s  %9s  %9s  %14s\n", "seq", "created_at", "project_id", "run_id",
                    "model", "prompt", "compl", "cost_usd");
        for (const LedgerEntry& e : rows) {
          std::printf("%8llu  %-24s  %-16s  %-16s  %-20s  %9lld  %9lld  %14s\n", static_cast<unsigned long long>(e.seq),
                      isoTime(e.unix_ns).c_str(), e.project_id.c_str(), e.run_id.c_str(), e.model.c_str(),
                      static_cast<long long>(e.prompt_tokens), static_cast<long long>(e.completion_tokens),
                      NanoUsd(e.cost_nano_usd).toString().c_str());
        }
      }
      return 0;
    }
    std::int32_t day = 0;
    if (day_text.empty()) {
      day = static_cast<std::int32_t>(std::time(nullptr) / 86400);
    } else if (const auto t = parseUtc(day_text); t && day_text.size() == 10) {
      day = static_cast<std::int32_t>(*t / 86400);
    } else {
      std::fprintf(stderr, "tokenfuse: --day: '%s' is not a date such as 2026-11-29\n", day_text.c_str());
      return 2;
    }
    const std::vector<LedgerTotal> totals = ledger->tenantTotals(day);
    if (as_json) {
      json out = json::array();
      for (const LedgerTotal& t : totals) {
        out.push_back({{"project_id", t.id}, {"day", civilDay(day)}, {"cost_usd", NanoUsd(t.cost_nano_usd).toString()},
                       {"prompt_tokens", t.prompt_tokens}, {"completion_tokens", t.completion_tokens},
                       {"calls", t.calls}});
      }
      std::cout << out.dump(2) << "\n";
    } else {
      std::printf("%-32s  %14s  %10s  %12s  %12s   (budget day %s)\n", "project_id", "cost_usd", "calls", "prompt",
                  "completion", civilDay(day).c_str());
      for (const LedgerTotal& t : totals) {
        std::printf("%-32s  %14s  %10lld  %12lld  %12lld\n", t.id.c_str(), NanoUsd(t.cost_nano_usd).toString().c_str(),
                    static_cast<long long>(t.calls), static_cast<long long>(t.prompt_tokens),
                    static_cast<long long>(t.completion_tokens));
      }
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenfuse: %s\n", e.what());
    return kNoRegion;
  }
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

  auto* ledger = app.add_subcommand("ledger", "read this host's ledger (SQLite in the agent's data dir)");
  ledger->require_subcommand(1);
  std::string data_dir = "/var/lib/tokenfuse", since, until, format = "table", day_text;
  ledger->add_option("--data-dir", data_dir, "the agent's data dir")->envname("TOKENFUSE_DATA_DIR");
  LedgerFilter filter;
  auto* list = ledger->add_subcommand("list", "entries in sequence order (also: export)")->alias("export");
  list->add_option("--project", filter.project_id, "only this tenant");
  list->add_option("--run", filter.run_id, "only this run");
  list->add_option("--since", since, "from this UTC time (2026-11-29 or 2026-11-29T14:00:00Z)");
  list->add_option("--until", until, "before this UTC time");
  list->add_option("--after-seq", filter.after_seq, "only entries after this sequence number");
  list->add_option("--limit", filter.limit, "at most this many (default 1000)")->check(CLI::PositiveNumber);
  list->add_option("--format", format, "table, csv or jsonl")->check(CLI::IsMember({"table", "csv", "jsonl"}));
  auto* totals = ledger->add_subcommand("totals", "per-tenant totals for one budget day");
  totals->add_option("--day", day_text, "budget day, e.g. 2026-11-29 (default: today, UTC)");
  CLI11_PARSE(app, argc, argv);

  if (*ledger) {
    for (auto [text, field] : {std::pair{&since, &filter.since_unix_ns}, {&until, &filter.until_unix_ns}}) {
      if (text->empty()) continue;
      const auto t = parseUtc(*text);
      if (!t) {
        std::fprintf(stderr, "tokenfuse: '%s' is not a UTC time such as 2026-11-29 or 2026-11-29T14:00:00Z\n",
                     text->c_str());
        return 2;
      }
      *field = *t * 1'000'000'000;
    }
    return ledgerCommand(data_dir, list->parsed(), filter, format, day_text, as_json);
  }

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
                        {"ledger",
                         {{"appended_seq", info.ledger_appended},
                          {"durable_seq", info.ledger_durable},
                          {"backlog", info.ledger_appended - info.ledger_durable},
                          {"ring_capacity", info.ledger_capacity},
                          {"refused_ring_full", info.ledger_full},
                          {"abandoned_slots", info.ledger_abandoned}}},
                        {"kill_switch", {{"active", kill.active}, {"reason", kill.reason}}},
                        {"platform", budgetJson(platform)}}
                       .dump(2)
                << "\n";
    } else {
      std::printf("region     /%s  layout v%u  %llu bytes  agent pid %d (heartbeat %.1fs ago)\n", info.shm_name.c_str(),
                  info.layout_version, static_cast<unsigned long long>(info.region_bytes), info.agent_pid,
                  heartbeat_age_s);
      std::printf("day        %s  live reservations %u\n", civilDay(info.day).c_str(), info.live_reservations);
      std::printf("ledger     durable to #%llu, backlog %llu of %u, refused (ring full) %llu, abandoned %llu\n",
                  static_cast<unsigned long long>(info.ledger_durable),
                  static_cast<unsigned long long>(info.ledger_appended - info.ledger_durable), info.ledger_capacity,
                  static_cast<unsigned long long>(info.ledger_full),
                  static_cast<unsigned long long>(info.ledger_abandoned));
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
