// tokenfuse: the admin CLI. It reads the region directly through libtokenfuse, as any
// application does, and makes changes (kill switch, limits) through the agent's admin API, so
// that the agent saves them. Exit codes, for scripts:
//   0 ok; 1 the check was denied; 2 bad usage; 3 no region, ledger or agent to talk to;
//   4 the agent refused the change (bad token, bad value); 5 the change is in force but the
//   agent could not save it (a restart would undo it).
#include <tokenfuse/tokenfuse.hpp>

#include "ledger.h"
#include "ledger_archive.h"

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <optional>
#include <ctime>
#include <fstream>
#include <iostream>

namespace {

using namespace tokenfuse;
using nlohmann::json;

constexpr int kDenied = 1;
constexpr int kUsage = 2;
constexpr int kNoRegion = 3;
constexpr int kRefused = 4;
constexpr int kNotSaved = 5;
std::string civilDay(std::int32_t day);

// The agent's admin API: where it listens and the token that lets us change things.
struct AdminEndpoint {
  std::string url;          // empty: 127.0.0.1 and the port in <data_dir>/http.port, else 8787
  std::string token_file;   // empty: <data_dir>/admin.token
  std::string data_dir;
};

// An id as one URL path segment.
std::string pathSegment(const std::string& id) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const unsigned char c : id) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string firstLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Sends one admin request; sets *reply to the agent's answer. Returns the exit code.
int adminRequest(const AdminEndpoint& ep, const std::string& method, const std::string& path, const json& body,
                 json* reply, bool quiet_if_unreachable = false) {
  std::string url = ep.url;
  if (url.empty()) {
    const std::string port = firstLine(ep.data_dir + "/http.port");
    url = "http://127.0.0.1:" + (port.empty() ? std::string("8787") : port);
  }
  const std::string token_file = ep.token_file.empty() ? ep.data_dir + "/admin.token" : ep.token_file;
  const std::string token = firstLine(token_file);
  if (token.empty() && method != "GET") {   // reading needs no token
    std::fprintf(stderr, "tokenfuse: cannot read the admin token from %s (run as root or the tokenfuse user, or pass "
                 "--token-file)\n", token_file.c_str());
    return kNoRegion;
  }
  httplib::Client http(url);
  http.set_connection_timeout(5);
  http.set_read_timeout(30);
  httplib::Headers headers;
  // Reading needs no token, so none is sent: the port may be stale and another process's.
  if (!token.empty() && method != "GET") headers.emplace("Authorization", "Bearer " + token);
  const std::string payload = body.is_null() ? std::string() : body.dump(-1, ' ', false, json::error_handler_t::replace);
  httplib::Result r = method == "PUT"      ? http.Put(path.c_str(), headers, payload, "application/json")
                      : method == "DELETE" ? http.Delete(path.c_str(), headers)
                                           : http.Get(path.c_str(), headers);
  if (!r) {
    if (quiet_if_unreachable) return kNoRegion;
    std::fprintf(stderr, "tokenfuse: cannot reach the agent at %s (%s): is tokenfused running with its HTTP API on? "
                 "(--url, or --data-dir for its http.port)\n", url.c_str(), httplib::to_string(r.error()).c_str());
    return kNoRegion;
  }
  *reply = r->body.empty() ? json::object() : json::parse(r->body, nullptr, false);
  if (r->status >= 300) {
    const json& msg = reply->is_object() ? reply->value("message", json(r->body)) : json(r->body);
    const bool applied = reply->is_object() && reply->value("applied", false);
    std::fprintf(stderr, "tokenfuse: %s: %s (HTTP %d)\n", applied ? "warning" : "the agent refused",
                 msg.is_string() ? msg.get<std::string>().c_str() : "", r->status);
    return applied ? kNotSaved : kRefused;
  }
  if (reply->is_discarded()) {
    std::fprintf(stderr, "tokenfuse: the agent at %s answered something that is not JSON\n", url.c_str());
    return kNoRegion;
  }
  return 0;
}

void printKill(const json& k, bool as_json) {
  if (as_json) {
    std::cout << k.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
  } else if (k.value("active", false)) {
    std::printf("kill switch ON: %s\n", k.value("reason", "").c_str());
  } else {
    std::printf("kill switch off\n");
  }
}

void printLimit(const json& v, bool as_json) {
  if (as_json) {
    std::cout << v.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    return;
  }
  const json& limit = v["limit_usd"];
  std::printf("limit %s  (used $%s, reserved $%s, day %s)\n",
              limit.is_string() ? ("$" + limit.get<std::string>()).c_str() : "unlimited",
              v.value("used_usd", "?").c_str(), v.value("reserved_usd", "?").c_str(), v.value("day", "?").c_str());
}

// `rules set`'s options: the keys of a [[rules]] table.
struct RuleOptions {
  std::string name, scope, window, week_start, metric, match, limit;
  std::vector<std::string> keys;   // KEY=LIMIT
  bool host_only = false, sliding = false;

  // The body of PUT /v1/rules/{name}, or what is wrong with the options. Limits go as the
  // config file writes them: USD as a string for usd, a whole number for the others; the agent
  // checks the rest.
  std::string toJson(json* out) const {
    const bool usd = metric.empty() || metric == "usd";
    std::string why;
    auto amount = [&](const std::string& text) -> json {
      if (text == "unlimited") return nullptr;
      if (usd) return text;
      std::int64_t v = 0;
      const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
      if (ec != std::errc{} || end != text.data() + text.size()) why = "'" + text + "' is not a whole number (or unlimited)";
      return v;
    };
    json j = {{"scope", scope}};
    if (!window.empty()) j["window"] = window;
    if (!week_start.empty()) j["week_start"] = week_start;
    if (!metric.empty()) j["metric"] = metric;
    if (!match.empty()) j["match"] = match;
    if (!limit.empty()) j["limit"] = amount(limit);
    if (host_only) j["host_only"] = true;
    if (sliding) j["sliding"] = true;
    for (const std::string& k : keys) {
      const auto eq = k.rfind('=');
      if (eq == std::string::npos || eq == 0) return "--key takes KEY=LIMIT, e.g. --key acme=50.00 (got '" + k + "')";
      j["keys"][k.substr(0, eq)] = amount(k.substr(eq + 1));
    }
    *out = std::move(j);
    return why;
  }
};

// GET /v1/rules for people: a line per rule, then one per counter.
void printRules(const json& v, bool as_json,
                const char* empty_note = "no rules ([[rules]] in the config file, or tokenfuse rules set: docs/rules.md)") {
  if (as_json) {
    std::cout << v.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    return;
  }
  auto text = [](const json& j) { return j.is_string() ? j.get<std::string>() : j.is_null() ? "unlimited" : j.dump(); };
  const json& rules = v["rules"];
  if (rules.empty() && *empty_note != '\0') std::printf("%s\n", empty_note);
  for (const json& r : rules) {
    const std::string match = r.value("match", "");
    std::printf("%d %s: %s%s%s, %s per %s, limit %s%s\n", r.value("rule", 0), r.value("name", "?").c_str(),
                r.value("scope", "?").c_str(), match.empty() ? "" : " ", match.c_str(), r.value("metric", "?").c_str(),
                r.value("window", "?").c_str(), text(r["limit"]).c_str(),
                r.value("source", "config") == "admin_api" ? "  (set through the admin API)" : "");
    for (const json& c : r["counters"]) {
      std::printf("    %-40s used %s  reserved %s  elsewhere %s  limit %s  denials %lld\n", c.value("key", "").c_str(),
                  text(c["used"]).c_str(), text(c["reserved"]).c_str(), text(c.value("elsewhere", json(0))).c_str(),
                  text(c["limit"]).c_str(), c.value("denials", 0LL));
    }
  }
  for (const json& name : v.value("removed", json::array())) {
    std::printf("- %s: the config file's rule, removed through the admin API (rules reset to bring it back)\n",
                name.get<std::string>().c_str());
  }
}

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

int ledgerCommand(const std::string& data_dir, bool list, const LedgerFilter& filter, const std::string& format,
                  const std::string& day_text, bool as_json) {
  std::unique_ptr<Ledger> ledger;
  try {
    ledger = Ledger::openReadOnly(data_dir + "/ledger.db");
    if (list) {
      const std::vector<LedgerEntry> rows = ledger->list(filter);
      if (format == "csv") {
        std::printf("seq,host_id,created_at,kind,project_id,agent_id,run_id,model,provider,prompt_tokens,"
                    "completion_tokens,cost_usd,reservation_id,tags\n");
        for (const LedgerEntry& e : rows) {
          std::printf("%llu,%s,%s,%s,%s,%s,%s,%s,%s,%lld,%lld,%s,%s,%s\n", static_cast<unsigned long long>(e.seq),
                      csvField(e.host_id).c_str(), isoTime(e.unix_ns).c_str(), e.kind.c_str(),
                      csvField(e.project_id).c_str(), csvField(e.agent_id).c_str(), csvField(e.run_id).c_str(),
                      csvField(e.model).c_str(), csvField(e.provider).c_str(), static_cast<long long>(e.prompt_tokens),
                      static_cast<long long>(e.completion_tokens), NanoUsd(e.cost_nano_usd).toString().c_str(),
                      e.reservation_id == 0 ? "" : std::to_string(e.reservation_id).c_str(), csvField(e.tags).c_str());
        }
      } else if (format == "jsonl" || as_json) {
        for (const LedgerEntry& e : rows) std::printf("%s\n", toJson(e).dump(-1, ' ', false, json::error_handler_t::replace).c_str());
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
      return kUsage;
    }
    const std::vector<LedgerTotal> totals = ledger->tenantTotals(day);
    if (as_json) {
      json out = json::array();
      for (const LedgerTotal& t : totals) {
        out.push_back({{"project_id", t.id}, {"day", civilDay(day)}, {"cost_usd", NanoUsd(t.cost_nano_usd).toString()},
                       {"prompt_tokens", t.prompt_tokens}, {"completion_tokens", t.completion_tokens},
                       {"calls", t.calls}});
      }
      std::cout << out.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
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

// `tokenfuse ledger archive`: needs write access to the ledger (run it as the agent's user).
int archiveCommand(const std::string& data_dir, const std::string& before_text, std::string out, bool as_json) {
  const auto before = parseUtc(before_text);
  if (!before) {
    std::fprintf(stderr, "tokenfuse: --before: '%s' is not a UTC time such as 2026-09-01 or 2026-09-01T00:00:00Z\n",
                 before_text.c_str());
    return kUsage;
  }
  const std::string path = data_dir + "/ledger.db";
  // As the ledger's owner only: SQLite's -wal and -shm files made by another user (root) would
  // lock the agent out of its own ledger.
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) {
    std::fprintf(stderr, "tokenfuse: ledger %s: %s (is --data-dir the agent's data dir?)\n", path.c_str(),
                 std::strerror(errno));
    return kNoRegion;
  }
  if (st.st_uid != ::geteuid()) {
    std::fprintf(stderr, "tokenfuse: ledger %s belongs to uid %u: run the archive as that user (sudo -u tokenfuse ...)\n",
                 path.c_str(), static_cast<unsigned>(st.st_uid));
    return kNoRegion;
  }
  if (out.empty()) out = "ledger-before-" + before_text + ".jsonl.gz";
  try {
    Ledger ledger(path, {});
    const auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    const ArchiveReport r = archiveLedger(ledger, {*before * 1'000'000'000, now, out});
    if (as_json) {
      std::cout << json{{"file", out},
                        {"written", r.written},
                        {"removed", r.removed},
                        {"first_seq", r.first_seq},
                        {"last_seq", r.last_seq},
                        {"file_bytes", r.file_bytes},
                        {"before", isoTime(r.before_unix_ns)},
                        {"kept_because", r.kept_because.empty() ? json(nullptr) : json(r.kept_because)}}
                       .dump(2)
                << "\n";
    } else {
      std::printf("%s: %lld entries (seq %llu to %llu, %lld bytes); %lld removed from the ledger\n", out.c_str(),
                  static_cast<long long>(r.written), static_cast<unsigned long long>(r.first_seq),
                  static_cast<unsigned long long>(r.last_seq), static_cast<long long>(r.file_bytes),
                  static_cast<long long>(r.removed));
      if (!r.kept_because.empty()) std::printf("kept: %s\n", r.kept_because.c_str());
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
  std::string archive_before, archive_out;
  auto* archive = ledger->add_subcommand(
      "archive", "move the entries booked before a date into a gzip file of JSON lines, then remove them from the ledger");
  archive->add_option("--before", archive_before, "UTC date or time: 2026-09-01 or 2026-09-01T00:00:00Z")->required();
  archive->add_option("--out", archive_out, "the file to write, which must not exist (default: ledger-before-DATE.jsonl.gz)");
  auto* totals = ledger->add_subcommand("totals", "per-tenant totals for one budget day");
  totals->add_option("--day", day_text, "budget day, e.g. 2026-11-29 (default: today, UTC)");

  // Changes go through the agent's admin API.
  AdminEndpoint ep;
  auto add_endpoint = [&ep](CLI::App* cmd) {
    cmd->add_option("--url", ep.url, "the agent's HTTP API (default: from --data-dir, else http://127.0.0.1:8787)")
        ->envname("TOKENFUSE_URL");
    cmd->add_option("--token-file", ep.token_file, "the admin token (default: <data-dir>/admin.token)")
        ->envname("TOKENFUSE_ADMIN_TOKEN_FILE");
    cmd->add_option("--data-dir", ep.data_dir, "the agent's data dir")->envname("TOKENFUSE_DATA_DIR");
  };
  ep.data_dir = "/var/lib/tokenfuse";
  add_endpoint(usage);   // the rules that count the tenant come from the agent's HTTP API
  auto* rules = app.add_subcommand("rules", "budget rules: the config file's [[rules]] and the admin API's (docs/rules.md)");
  rules->require_subcommand(1);
  add_endpoint(rules);
  rules->add_subcommand("list", "every rule with its counters: used, reserved, limit");
  // rules set: the keys of a [[rules]] table as options; the agent checks them as it checks the file.
  RuleOptions rule;
  auto* rule_set = rules->add_subcommand("set", "make or replace a rule (saved: it wins over the config file until reset): "
                                                "rules set tenant-monthly --scope tenant --window month --limit 1000.00");
  rule_set->add_option("name", rule.name, "the rule's name")->required();
  rule_set->add_option("--scope", rule.scope, "platform, tenant, run, agent, model, tag, tenant+model or tenant+agent")
      ->required();
  rule_set->add_option("--window", rule.window, "minute, hour, day, week, month or all-time (not for concurrency)");
  rule_set->add_option("--week-start", rule.week_start, "the day a week starts, for --window week (default monday)");
  rule_set->add_option("--metric", rule.metric, "usd (default), tokens, prompt_tokens, completion_tokens, requests or concurrency");
  rule_set->add_option("--match", rule.match, "only this key, or a group of keys by prefix: \"gpt-4*\"");
  rule_set->add_option("--limit", rule.limit, "for every key: USD (5.00) for usd, a whole number for the others, or unlimited");
  rule_set->add_option("--key", rule.keys, "a key's own limit, KEY=LIMIT (repeatable)");
  rule_set->add_flag("--host-only", rule.host_only, "count on this host only, never shared with the fleet");
  rule_set->add_flag("--sliding", rule.sliding, "a sliding minute or hour: the previous window's share counts too");
  std::string rule_name;
  auto* rule_clear = rules->add_subcommand("clear", "take a rule out of force, the config file's too (saved)");
  rule_clear->add_option("name", rule_name, "the rule's name")->required();
  auto* rule_reset = rules->add_subcommand("reset", "forget the admin API's change: the config file's rule applies again");
  rule_reset->add_option("name", rule_name, "the rule's name")->required();
  auto* kill_cmd = app.add_subcommand("kill", "the emergency kill switch: every paid and free call is refused (E-BUDGET-004)");
  kill_cmd->require_subcommand(1);
  add_endpoint(kill_cmd);
  std::string reason;
  std::int64_t ttl_s = 7 * 86400;
  auto* kill_on = kill_cmd->add_subcommand("on", "turn it on (saved: it survives restarts of the agent)");
  kill_on->add_option("--reason", reason, "why; shown to every refused caller")->required();
  kill_on->add_option("--ttl", ttl_s, "seconds until it turns itself off; 0: never (default 7 days)")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{365} * 86400));
  auto* kill_off = kill_cmd->add_subcommand("off", "turn it off");
  kill_cmd->add_subcommand("show", "print its state");

  auto* limit = app.add_subcommand("limit", "budget limits (saved: they win over the config file until reset)");
  limit->require_subcommand(1);
  add_endpoint(limit);
  std::string scope_id, amount;
  bool scope_run = false, scope_platform = false;
  for (CLI::App* cmd : {limit->add_subcommand("set", "set a daily limit in USD: limit set TENANT 5.00"),
                        limit->add_subcommand("clear", "make it unlimited: limit clear TENANT"),
                        limit->add_subcommand("reset", "forget the change: the config file's limit applies again")}) {
    cmd->add_flag("--run", scope_run, "the id is a run id (a run's limit covers its whole life)");
    cmd->add_flag("--platform", scope_platform, "the platform's daily limit (no id)");
    cmd->add_option("id", scope_id, "tenant (project_id) or, with --run, run id");
    if (cmd->get_name() == "set") cmd->add_option("usd", amount, "the limit, e.g. 5.00");
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);   // prints help, or the error
    return rc == 0 ? 0 : kUsage;
  }

  if (*archive) return archiveCommand(data_dir, archive_before, archive_out, as_json);
  if (*ledger) {
    for (auto [text, field] : {std::pair{&since, &filter.since_unix_ns}, {&until, &filter.until_unix_ns}}) {
      if (text->empty()) continue;
      const auto t = parseUtc(*text);
      if (!t) {
        std::fprintf(stderr, "tokenfuse: '%s' is not a UTC time such as 2026-11-29 or 2026-11-29T14:00:00Z\n",
                     text->c_str());
        return kUsage;
      }
      *field = *t * 1'000'000'000;
    }
    return ledgerCommand(data_dir, list->parsed(), filter, format, day_text, as_json);
  }

  if (*rules) {
    json reply;
    int rc = 0;
    if (rule_set->parsed()) {
      json body;
      if (std::string why = rule.toJson(&body); !why.empty()) {
        std::fprintf(stderr, "tokenfuse: rules set: %s\n", why.c_str());
        return kUsage;
      }
      rc = adminRequest(ep, "PUT", "/v1/rules/" + pathSegment(rule.name), body, &reply);
    } else if (rule_clear->parsed()) {
      rc = adminRequest(ep, "DELETE", "/v1/rules/" + pathSegment(rule_name), nullptr, &reply);
    } else if (rule_reset->parsed()) {
      rc = adminRequest(ep, "DELETE", "/v1/rules/" + pathSegment(rule_name) + "/override", nullptr, &reply);
    } else {
      rc = adminRequest(ep, "GET", "/v1/rules", nullptr, &reply);
    }
    if (rc == 0) {
      if (reply.contains("warning")) std::fprintf(stderr, "tokenfuse: warning: %s\n", reply.value("warning", "").c_str());
      printRules(reply, as_json);
    }
    return rc;
  }
  if (*kill_cmd) {
    json reply;
    int rc = 0;
    if (kill_on->parsed()) {
      rc = adminRequest(ep, "PUT", "/v1/kill", {{"reason", reason}, {"ttl_s", ttl_s}}, &reply);
    } else {
      if (kill_off->parsed()) rc = adminRequest(ep, "DELETE", "/v1/kill", nullptr, &reply);
      if (rc == 0) rc = adminRequest(ep, "GET", "/v1/kill", nullptr, &reply);
    }
    if (rc == 0) printKill(reply, as_json);
    return rc;
  }
  if (*limit) {
    CLI::App* cmd = limit->get_subcommands().front();
    if (cmd->get_name() == "set" && scope_platform && amount.empty()) std::swap(scope_id, amount);   // limit set --platform 100
    if (scope_platform == !scope_id.empty() || (scope_platform && scope_run)) {
      std::fprintf(stderr, "tokenfuse: limit %s: give a tenant id, --run RUN_ID, or --platform alone\n",
                   cmd->get_name().c_str());
      return kUsage;
    }
    if (cmd->get_name() == "set" && amount.empty()) {
      std::fprintf(stderr, "tokenfuse: limit set: give the limit in USD, e.g. limit set acme 5.00\n");
      return kUsage;
    }
    if (cmd->get_name() == "set" && !NanoUsd::parse(amount)) {
      std::fprintf(stderr, "tokenfuse: limit set: '%s' is not a USD amount such as 5.00\n", amount.c_str());
      return kUsage;
    }
    const std::string path = scope_platform ? "/v1/platform/limit"
                             : scope_run    ? "/v1/runs/" + pathSegment(scope_id) + "/limit"
                                            : "/v1/tenants/" + pathSegment(scope_id) + "/limit";
    const char* field = scope_run ? "limit_usd" : "daily_limit_usd";
    json reply;
    const int rc = cmd->get_name() == "reset"
                       ? adminRequest(ep, "DELETE", path, nullptr, &reply)
                       : adminRequest(ep, "PUT", path, {{field, cmd->get_name() == "set" ? json(amount) : json(nullptr)}},
                                      &reply);
    if (rc == 0) printLimit(reply, as_json);
    return rc;
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
                       .dump(2, ' ', false, json::error_handler_t::replace)
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
    // A tenant's rules, with its counters, from the agent (the region alone does not say which
    // rules apply): left out when its HTTP API is off or unreachable.
    json tenant;
    const bool with_rules = *usage && adminRequest(ep, "GET", "/v1/tenants/" + pathSegment(project), nullptr, &tenant,
                                                   /*quiet_if_unreachable=*/true) == 0 && tenant.contains("rules");
    if (as_json) {
      json out = budgetJson(v);
      if (with_rules) out["rules"] = tenant["rules"];
      std::cout << out.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      printBudget(*usage ? "tenant" : "run", v);
      if (with_rules) printRules(tenant, false, /*empty_note=*/"");
      if (*usage && !with_rules) std::printf("(its rules: the agent's HTTP API did not answer)\n");
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
    std::cout << out.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
  } else if (d.allowed()) {
    std::printf("allowed (estimated $%s)\n", d.cost.toString().c_str());
  } else {
    std::printf("denied [%s] %s\n", d.errorCode(), describe(d, project).c_str());
  }
  return d.allowed() ? 0 : kDenied;
}
