// Ledger retention (retention.h) over many simulated days: what it removes, what it must keep,
// and that every total the agent rebuilds from the ledger is the same after a prune as before.
#include "agent_support.h"

#include "calendar_window.h"
#include "day_clock.h"
#include "retention.h"

#include "process.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <nlohmann/json.hpp>
#include <zlib.h>

#include <atomic>
#include <map>
#include <set>
#include <thread>
#include <tuple>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {

constexpr std::int64_t kHourNs = std::int64_t{3600} * 1'000'000'000;
constexpr std::int64_t kDayNs = 24 * kHourNs;

std::int64_t unixNs(const char* iso) { return toUnixNs(utc(iso)); }

// Books `per_day` entries across one day: five tenants, runs that live ten days, two models,
// agents and tags, as a busy host would.
struct Booker {
  Ledger& ledger;
  std::uint64_t seq = 0;
  std::int64_t booked = 0;
  void day(std::int64_t day_start_ns, int per_day) {
    std::vector<LedgerEntry> batch;
    const std::int64_t day = day_start_ns / kDayNs;
    for (int i = 0; i < per_day; ++i) {
      LedgerEntry e;
      e.seq = ++seq;
      e.host_id = "host-a";
      e.unix_ns = day_start_ns + (kDayNs / per_day) * i;
      e.day = static_cast<std::int32_t>(day);
      e.kind = "commit";
      e.project_id = "tenant-" + std::to_string(i % 5);
      e.run_id = i % 3 == 0 ? std::string() : "run-" + std::to_string(day / 10) + "-" + std::to_string(i % 4);
      e.agent_id = i % 2 == 0 ? "agent-a" : "";
      e.model = i % 7 == 0 ? "gpt-4o" : "gpt-4o-mini";
      e.provider = "openai";
      e.prompt_tokens = 100 + i;
      e.completion_tokens = 50 + i % 13;
      e.cost_nano_usd = 1'000 * (1 + i % 17);
      e.reservation_id = e.seq;
      e.tags = i % 4 == 0 ? "batch,eval" : "";
      batch.push_back(std::move(e));
    }
    booked += static_cast<std::int64_t>(ledger.append(batch));
  }
};

using Key = std::tuple<std::string, std::string, std::string, std::string, std::string>;
using Sums = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>;

std::map<Key, Sums> byKey(const std::vector<CallTotal>& totals) {
  std::map<Key, Sums> out;
  for (const CallTotal& t : totals) {
    out[{t.project_id, t.run_id, t.model, t.agent_id, t.tags}] = {t.cost_nano_usd, t.prompt_tokens, t.completion_tokens,
                                                                   t.calls};
  }
  return out;
}

std::map<std::string, Sums> byId(const std::vector<LedgerTotal>& totals) {
  std::map<std::string, Sums> out;
  for (const LedgerTotal& t : totals) out[t.id] = {t.cost_nano_usd, t.prompt_tokens, t.completion_tokens, t.calls};
  return out;
}

// Everything the agent rebuilds its counters from (Agent::rebuildFromLedger and
// rebuildRulesFromLedger) at `now`: all-time rules, the open month, week and day windows, runs'
// lifetimes, today's tenants.
struct Rebuilt {
  std::map<Key, Sums> all_time, month, week, day;
  std::map<std::string, Sums> runs, tenants_today;
  bool operator==(const Rebuilt&) const = default;
};

Rebuilt rebuild(Ledger& l, const CalendarWindows& w, std::int64_t now) {
  Rebuilt r;
  r.all_time = byKey(l.callTotalsSince(INT64_MIN, INT32_MIN));
  for (auto [kind, out] : {std::pair{WindowKind::kMonth, &r.month}, std::pair{WindowKind::kWeek, &r.week},
                           std::pair{WindowKind::kDay, &r.day}}) {
    const std::int64_t start = w.at({kind}, now).start_ns;
    *out = byKey(l.callTotalsSince(start, static_cast<std::int32_t>(start / kDayNs) - 1));
  }
  r.runs = byId(l.runTotals());
  r.tenants_today = byId(l.tenantTotalsFrom(static_cast<std::int32_t>(now / kDayNs), UINT64_MAX));
  return r;
}

// Entries booked at or after `since_ns` still in the ledger.
std::int64_t entriesSince(Ledger& l, std::int64_t since_ns) {
  std::int64_t n = 0;
  for (const CallTotal& t : l.callTotalsSince(std::max(since_ns, INT64_MIN + 1), INT32_MIN)) n += t.calls;
  return n;
}

}  // namespace

TEST_CASE("retention: over 240 simulated days the ledger stays bounded, keeps what rules and the central link need, "
          "and rebuilds the same totals") {
  log::init("error");
  TempDir dir;
  Ledger ledger(dir.path + "/ledger.db", "host-a");
  REQUIRE(ledger.size().incremental_vacuum);
  const CalendarWindows windows("UTC");
  const DayClock days("UTC");
  const RetentionPolicy policy{30, 0, 500, std::chrono::milliseconds(0)};
  Booker book{ledger};
  constexpr int kPerDay = 200;
  const std::int64_t first = unixNs("2026-01-01T00:00:00Z");
  std::int64_t pruned = 0, plateau_bytes = 0;
  std::uint64_t link_down_at = 0;   // the central link's pushed position while it is down
  for (int d = 0; d < 240; ++d) {
    const std::int64_t day_start = first + d * kDayNs;
    book.day(day_start, kPerDay);
    const std::int64_t now = day_start + kDayNs - 1;   // the end of the simulated day
    // Days 100 to 129: the central link is down, and has pushed nothing since day 100 began.
    if (d == 100) link_down_at = book.seq - kPerDay;
    const std::uint64_t pushed = d >= 100 && d < 130 ? link_down_at : UINT64_MAX;
    const RetentionBounds bounds = retentionBounds(policy, windows, days, now, pushed);
    CAPTURE(d);

    const Rebuilt before = rebuild(ledger, windows, now);
    const std::int64_t young = entriesSince(ledger, bounds.remove_before_ns);
    const PruneReport r = Pruner(ledger, policy).pass(bounds);
    pruned += r.removed();
    CHECK(r.removed_for_size == 0);
    CHECK(rebuild(ledger, windows, now) == before);
    // Nothing booked since the cut-off went, nor anything the link has not pushed.
    CHECK(entriesSince(ledger, bounds.remove_before_ns) == young);
    CHECK(ledger.rowCount() == book.booked - pruned);
    if (d % 20 == 0) {
      LedgerFilter all;
      all.limit = INT64_MAX;
      CHECK(static_cast<std::int64_t>(ledger.list(all).size()) == ledger.rowCount());
    }
    if (pushed != UINT64_MAX) {
      LedgerFilter unpushed;
      unpushed.after_seq = link_down_at;
      unpushed.limit = INT64_MAX;
      CHECK(static_cast<std::uint64_t>(ledger.list(unpushed).size()) == book.seq - link_down_at);
    }
    // The cut-off: 30 days, or the month's start or 7 days back when earlier.
    CHECK(bounds.remove_before_ns <= now - 30 * kDayNs);
    CHECK(bounds.remove_before_ns <= windows.at({WindowKind::kMonth}, now).start_ns);
    CHECK(bounds.remove_before_ns <= day_start - 7 * kDayNs);
    if (r.oldest_unix_ns && pushed == UINT64_MAX) CHECK(*r.oldest_unix_ns >= bounds.remove_before_ns);
    // Bounded: at most 30 days and a month's start, i.e. 62 days of entries (a link outage aside).
    if (d >= 62 && (d < 100 || d >= 130)) CHECK(ledger.rowCount() <= 62 * kPerDay);
    if (d == 90) plateau_bytes = ledger.size().bytes();
    if (d > 90 && (d < 100 || d >= 160)) {
      // The freed pages went back to the file system: the file does not grow past its plateau.
      CHECK(ledger.size().bytes() <= plateau_bytes * 5 / 4);
      CHECK(ledger.size().free_pages <= 8);
    }
  }
  CHECK(pruned > 150 * kPerDay);
  CHECK(ledger.integrityCheck() == "ok");
  // The day's curve and the quarantine go with their entries; the day totals of pushed days too.
  CHECK(ledger.spendByHour(0, (first + 200 * kDayNs) / kHourNs).empty());
  CHECK_FALSE(ledger.spendByHour(0, INT64_MAX).empty());
  CHECK(ledger.spendOfDay(static_cast<std::int32_t>(first / kDayNs)).empty());
  CHECK_FALSE(ledger.spendOfDay(static_cast<std::int32_t>((first + 239 * kDayNs) / kDayNs)).empty());
}

TEST_CASE("retention: a size ceiling removes the oldest entries beyond retain_days, never this month's, and says "
          "when it cannot get below it") {
  log::init("error");
  TempDir dir;
  Ledger ledger(dir.path + "/ledger.db", "host-a");
  const CalendarWindows windows("UTC");
  const DayClock days("UTC");
  Booker book{ledger};
  const std::int64_t first = unixNs("2026-03-01T00:00:00Z");
  for (int d = 0; d < 45; ++d) book.day(first + d * kDayNs, 1000);   // March and April 1 to 14
  const std::int64_t now = unixNs("2026-04-15T12:00:00Z");
  const std::int64_t april = unixNs("2026-04-01T00:00:00Z");
  const std::int64_t used = ledger.size().usedBytes();
  const Rebuilt before = rebuild(ledger, windows, now);

  // Kept forever by age, but at most half the file: March goes, oldest first.
  RetentionPolicy policy{0, used / 2, 1000, std::chrono::milliseconds(0)};
  const RetentionBounds bounds = retentionBounds(policy, windows, days, now, UINT64_MAX);
  CHECK(bounds.remove_before_ns == INT64_MIN);
  CHECK(bounds.keep_since_ns == april);
  PruneReport r = Pruner(ledger, policy).pass(bounds);
  CHECK(r.removed_for_age == 0);
  CHECK(r.removed_for_size > 0);
  CHECK_FALSE(r.over_ceiling);
  CHECK(r.size.usedBytes() <= policy.max_bytes);
  CHECK(*r.oldest_unix_ns >= first + 15 * kDayNs);   // about half: the oldest went first
  CHECK(*r.oldest_unix_ns < april);
  CHECK(entriesSince(ledger, april) == 14 * 1000);
  CHECK(rebuild(ledger, windows, now) == before);

  // A ceiling below April's entries: all of March goes, April stays, and the pass says so.
  policy.max_bytes = used / 10;
  r = Pruner(ledger, policy).pass(bounds);
  CHECK(r.over_ceiling);
  CHECK(*r.oldest_unix_ns >= april);
  CHECK(entriesSince(ledger, april) == 14 * 1000);
  CHECK(ledger.rowCount() == 14 * 1000);
  CHECK(rebuild(ledger, windows, now) == before);
}

TEST_CASE("retention: a ledger made before retention reuses its freed pages, gets its counts once, and prunes") {
  log::init("error");
  TempDir dir;
  const std::string path = dir.path + "/ledger.db";
  {
    // An older ledger: no auto_vacuum, no spend_by_hour, no row count.
    Ledger ledger(path, "host-a");
    Booker book{ledger};
    for (int d = 0; d < 3; ++d) book.day(unixNs("2026-01-01T00:00:00Z") + d * kDayNs, 100);
  }
  {
    SQLite::Database db(path, SQLite::OPEN_READWRITE);
    db.exec("PRAGMA auto_vacuum=NONE");
    db.exec("VACUUM");
    db.exec("DROP TABLE spend_by_hour");
    db.exec("DELETE FROM meta WHERE key IN ('rows', 'spend_by_hour_filled')");
  }
  Ledger ledger(path, "host-a");
  CHECK_FALSE(ledger.size().incremental_vacuum);
  CHECK(ledger.rowCount() == 300);
  std::int64_t calls = 0;
  for (const HourSpend& h : ledger.spendByHour(0, INT64_MAX)) calls += h.calls;
  CHECK(calls == 300);
  const CalendarWindows windows("UTC");
  const DayClock days("UTC");
  const RetentionPolicy policy{30, 0, 1000, std::chrono::milliseconds(0)};
  const PruneReport r =
      Pruner(ledger, policy).pass(retentionBounds(policy, windows, days, unixNs("2026-06-01T00:00:00Z"), UINT64_MAX));
  CHECK(r.removed_for_age == 300);
  CHECK(r.pages_returned == 0);
  CHECK(r.size.free_pages > 0);   // kept for the next entries
  CHECK(ledger.rowCount() == 0);
  CHECK_FALSE(r.oldest_unix_ns.has_value());
}

namespace {

RuleSpec tenantRule(std::string name, RuleMetric metric, WindowKind window) {
  RuleSpec r;
  r.name = std::move(name);
  r.scope = RuleScope::kTenant;
  r.metric = metric;
  r.limit = std::int64_t{1} << 50;
  r.window.kind = window;
  return r;
}

// Every counter the agent keeps that a restart rebuilds from the ledger.
std::map<std::string, std::int64_t> counters(Agent& agent, Client& client) {
  std::map<std::string, std::int64_t> out;
  for (const RuleUsage& r : agent.admin().rules()) {
    for (const RuleUsage::Counter& c : r.counters) out[r.name + ":" + c.key] = c.committed;
  }
  for (const char* t : {"acme", "beta"}) out[std::string("tenant:") + t] = client.tenant(t).committed.count();
  out["run:run-long"] = client.run("run-long").committed.count();
  out["platform"] = client.platform().committed.count();
  return out;
}

}  // namespace

TEST_CASE("retention: the agent prunes on its clock, and a new region rebuilt after pruning has every counter it had") {
  TempDir dir;
  Config c = testConfig(dir, "retention");
  c.ledger_retain_days = 20;
  c.rules = {tenantRule("lifetime-requests", RuleMetric::kRequests, WindowKind::kAllTime),
             tenantRule("lifetime-usd", RuleMetric::kUsd, WindowKind::kAllTime),
             tenantRule("monthly-usd", RuleMetric::kUsd, WindowKind::kMonth),
             tenantRule("weekly-tokens", RuleMetric::kTokens, WindowKind::kWeek)};
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-01-01T10:00:00Z")};
  std::map<std::string, std::int64_t> before;
  std::int64_t pruned = 0;
  {
    Agent agent(c, {false, clock.fn()});
    auto client = attachClient(c.shm_name);
    for (int d = 0; d < 75; ++d) {
      clock.now = utc("2026-01-01T10:00:00Z") + std::chrono::hours(24 * d);
      agent.tick();
      for (int i = 0; i < 4; ++i) {
        REQUIRE(client->record({i % 2 ? "acme" : "beta", "gpt-4o", "openai", i == 0 ? "run-long" : "", "",
                                1000 + i, 10 * d})
                    .allowed());
      }
      agent.drainLedger();
      pruned += agent.pruneLedger().removed();
    }
    before = counters(agent, *client);
    // Mid-March: entries before Feb 24 (20 days) went; March's and the last week's stayed.
    CHECK(pruned > 40 * 4);
    CHECK(ledgerHealth().rows.load() == 75 * 4 - pruned);
    CHECK(ledgerHealth().oldest_unix_ns.load() >= toUnixNs(utc("2026-02-24T00:00:00Z")));
    CHECK(ledgerHealth().last_prune_unix_ns.load() == toUnixNs(clock.now));
    CHECK(before.at("lifetime-requests:acme") == 75 * 2);
    CHECK(before.at("run:run-long") > 0);
  }
  // A new region (a reboot): every counter comes back from what the ledger kept.
  Region::remove(c.shm_name);
  Agent agent(c, {false, clock.fn()});
  auto client = attachClient(c.shm_name);
  CHECK(counters(agent, *client) == before);
}

namespace {

std::vector<nlohmann::json> readArchive(const std::string& path) {
  gzFile gz = ::gzopen(path.c_str(), "rb");
  REQUIRE(gz != nullptr);
  std::string text;
  char buf[65536];
  for (int n; (n = ::gzread(gz, buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  REQUIRE(::gzclose(gz) == Z_OK);
  std::vector<nlohmann::json> out;
  std::size_t at = 0;
  for (std::size_t nl; (nl = text.find('\n', at)) != std::string::npos; at = nl + 1) {
    out.push_back(nlohmann::json::parse(text.substr(at, nl - at)));
  }
  CHECK(at == text.size());   // every line ends with a newline
  return out;
}

}  // namespace

TEST_CASE("retention: tokenfuse ledger archive writes each entry it removes to the file exactly once, keeps what "
          "must stay, and rebuilds the same totals") {
  log::init("error");
  TempDir dir;
  const std::string db = dir.path + "/ledger.db";
  const CalendarWindows windows("UTC");
  const std::int64_t now = unixNs("2026-03-20T12:00:00Z");
  std::vector<LedgerEntry> all;
  Rebuilt before;
  std::uint64_t pushed = 0;
  {
    Ledger ledger(db, "host-a");
    Booker book{ledger};
    for (int d = 0; d < 78; ++d) book.day(unixNs("2026-01-01T00:00:00Z") + d * kDayNs, 300);   // to Mar 19
    // As the agent leaves them: March stays (a rule's month), and the link has pushed up to
    // Feb 20's entries.
    ledger.setMetaInt("retention_keep_since_ns", unixNs("2026-03-01T00:00:00Z"));
    pushed = 50 * 300;
    ledger.setMetaInt("retention_pushed_seq", static_cast<std::int64_t>(pushed));
    LedgerFilter f;
    f.limit = INT64_MAX;
    all = ledger.list(f);
    before = rebuild(ledger, windows, now);
  }
  const std::string out = dir.path + "/old.jsonl.gz";
  const auto archive = [&](const char* before_date) {
    Process cli({TOKENFUSE_CLI_PATH, "ledger", "archive", "--data-dir", dir.path, "--before", before_date, "--out", out,
                 "--json"},
                dir.path + "/cli.out");
    const int rc = cli.wait(std::chrono::seconds(60));
    return std::pair(rc, cli.output());
  };
  const auto [rc, report_text] = archive("2026-03-15");
  REQUIRE_MESSAGE(rc == 0, report_text);
  const nlohmann::json report = nlohmann::json::parse(report_text);
  // Asked for up to Mar 15, it stopped at the entries the central link has not pushed.
  CHECK(report["written"] == pushed);
  CHECK(report["removed"] == pushed);
  CHECK(report["last_seq"] == pushed);
  CHECK(report["before"] == "2026-03-01T00:00:00.000Z");
  CHECK(report["kept_because"].get<std::string>().find("not pushed") != std::string::npos);

  const std::vector<nlohmann::json> lines = readArchive(out);
  REQUIRE(lines.size() == pushed);
  std::set<std::uint64_t> seqs;
  for (const nlohmann::json& j : lines) {
    const auto seq = j["seq"].get<std::uint64_t>();
    CHECK(seqs.insert(seq).second);   // once
    REQUIRE(seq >= 1);
    REQUIRE(seq <= all.size());
    // Every field as the ledger had it, nothing rounded.
    nlohmann::json expected = toJson(all[seq - 1]);
    expected["created_at_unix_ns"] = all[seq - 1].unix_ns;
    expected["budget_day"] = all[seq - 1].day;
    expected["cost_nano_usd"] = all[seq - 1].cost_nano_usd;
    CHECK(j == expected);
  }
  CHECK(*seqs.rbegin() == pushed);
  {
    Ledger ledger(db, "host-a");
    CHECK(ledger.rowCount() == static_cast<std::int64_t>(all.size() - pushed));
    LedgerFilter f;
    f.limit = INT64_MAX;
    const std::vector<LedgerEntry> left = ledger.list(f);
    REQUIRE_FALSE(left.empty());
    CHECK(left.front().seq == pushed + 1);   // in the file or here, never both, never neither
    CHECK(left.size() + lines.size() == all.size());
    CHECK(rebuild(ledger, windows, now) == before);
  }
  // An archive is never overwritten, and nothing is removed then.
  const auto [again, message] = archive("2026-03-15");
  CHECK(again == 3);
  CHECK(message.find("exists already") != std::string::npos);
  CHECK(Ledger(db, "host-a").rowCount() == static_cast<std::int64_t>(all.size() - pushed));
}

// Review findings (each failed before its fix).

TEST_CASE("retention: entries a clock stepped forward stamped in the future do not stop the older ones behind them "
          "from going") {
  log::init("error");
  TempDir dir;
  Ledger ledger(dir.path + "/ledger.db", "host-a");
  Booker book{ledger};
  book.day(unixNs("2027-06-01T00:00:00Z"), 300);   // the clock a year ahead, then set right
  for (int d = 0; d < 10; ++d) book.day(unixNs("2026-01-01T00:00:00Z") + d * kDayNs, 300);
  const CalendarWindows windows("UTC");
  const DayClock days("UTC");
  const RetentionPolicy policy{30, 0, 100, std::chrono::milliseconds(0)};
  const PruneReport r =
      Pruner(ledger, policy).pass(retentionBounds(policy, windows, days, unixNs("2026-04-01T00:00:00Z"), UINT64_MAX));
  CHECK(r.removed_for_age == 10 * 300);
  CHECK(ledger.rowCount() == 300);   // the future ones wait for their time
}

TEST_CASE("retention: the summaries go in bounded batches") {
  log::init("error");
  TempDir dir;
  Ledger ledger(dir.path + "/ledger.db", "host-a");
  Booker book{ledger};
  for (int d = 0; d < 3; ++d) book.day(unixNs("2026-01-01T00:00:00Z") + d * kDayNs, 240);   // 5 tenants x 24 h
  const std::size_t hours = ledger.spendByHour(0, INT64_MAX).size();
  REQUIRE(hours == 3 * 24 * 5);
  CHECK(ledger.removeSummariesBefore(unixNs("2026-02-01T00:00:00Z"), 0, 0, 50) == 50);
  CHECK(ledger.spendByHour(0, INT64_MAX).size() == hours - 50);
}

TEST_CASE("retention: a clock stepped forward during a run does not make today's entries old") {
  TempDir dir;
  Config c = testConfig(dir, "retentionjump");
  c.ledger_retain_days = 30;
  RegionCleanup cleanup{c.shm_name};
  FakeClock clock{utc("2026-03-10T10:00:00Z")};
  std::int64_t steady = 0;
  Agent agent(c, {false, clock.fn(), [&] { return steady; }});
  auto client = attachClient(c.shm_name);
  for (int i = 0; i < 10; ++i) REQUIRE(client->record({"acme", "gpt-4o", "openai", "", "", 1000, 0}).allowed());
  agent.drainLedger();
  CHECK(agent.pruneLedger().removed() == 0);
  // A bad time source puts the clock 200 days ahead for a minute.
  clock.now += std::chrono::hours(24 * 200);
  steady += std::int64_t{60} * 1'000'000'000;
  const PruneReport r = agent.pruneLedger();
  CHECK(r.removed() == 0);
  CHECK(r.rows == 10);
  CHECK(ledgerHealth().rows.load() == 10);
  // Retention's time catches up at twice the monotonic clock's pace, so after 100 days of it the
  // entries are old.
  steady += std::int64_t{100} * 86400 * 1'000'000'000;
  CHECK(agent.pruneLedger().removed() == 10);
}

TEST_CASE("retention: the archive keeps what a central link has not pushed, even one that pushed nothing, and a "
          "failed archive leaves no file behind") {
  log::init("error");
  TempDir dir;
  const std::string db = dir.path + "/ledger.db";
  {
    Ledger ledger(db, "host-a");
    Booker book{ledger};
    for (int d = 0; d < 3; ++d) book.day(unixNs("2026-01-01T00:00:00Z") + d * kDayNs, 100);
    ledger.setMetaInt("central_postgres_seq", 0);   // a link that has pushed nothing yet
  }
  int runs = 0;
  const auto archive = [&](const std::string& out) {
    Process cli({TOKENFUSE_CLI_PATH, "ledger", "archive", "--data-dir", dir.path, "--before", "2026-02-01", "--out", out,
                 "--json"},
                dir.path + "/cli-" + std::to_string(runs++) + ".out");
    const int rc = cli.wait(std::chrono::seconds(60));
    return std::pair(rc, cli.output());
  };
  const auto [bad, message] = archive(dir.path + "/no-such-dir/a.jsonl.gz");
  CHECK(bad == 3);
  CHECK(message.find("no-such-dir") != std::string::npos);
  const auto [rc, text] = archive(dir.path + "/a.jsonl.gz");
  REQUIRE_MESSAGE(rc == 0, text);
  const nlohmann::json report = nlohmann::json::parse(text);
  CHECK(report["written"] == 0);
  CHECK(report["removed"] == 0);
  CHECK(report["kept_because"].get<std::string>().find("not pushed") != std::string::npos);
  CHECK(Ledger(db, "host-a").rowCount() == 300);
  for (const auto& f : std::filesystem::directory_iterator(dir.path)) {
    CHECK_MESSAGE(!f.path().string().ends_with(".tmp"), f.path());
  }
}

TEST_CASE("retention: pruning while the writer books fails neither, and loses nothing") {
  log::init("error");
  TempDir dir;
  const std::string path = dir.path + "/ledger.db";
  Ledger ledger(path, "host-a");
  Booker old{ledger};
  for (int d = 0; d < 20; ++d) old.day(unixNs("2026-01-01T00:00:00Z") + d * kDayNs, 1000);
  const CalendarWindows windows("UTC");
  const DayClock days("UTC");
  const std::int64_t now = unixNs("2026-06-10T00:00:00Z");
  const Rebuilt before = rebuild(ledger, windows, now);
  // The agent's writer, on its own connection: a transaction every millisecond, as under load.
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> booked{0};
  std::string failed;
  std::thread writer([&] {
    try {
      Ledger w(path, "host-a");
      Booker book{w, old.seq};
      for (std::int64_t day = now - kDayNs; !stop.load(); day += 1000) {
        book.day(day, 5);
        booked = book.booked;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    } catch (const std::exception& e) {
      failed = e.what();
    }
  });
  const RetentionPolicy policy{30, 0, 200, std::chrono::milliseconds(0)};
  PruneReport r;
  CHECK_NOTHROW(r = Pruner(ledger, policy).pass(retentionBounds(policy, windows, days, now, UINT64_MAX)));
  stop = true;
  writer.join();
  CHECK(failed.empty());
  CHECK(r.removed_for_age == 20 * 1000);
  CHECK(booked.load() > 0);
  CHECK(ledger.rowCount() == booked.load());
  // Every call is counted once, removed or not.
  std::int64_t calls = 0;
  for (const auto& [key, sums] : rebuild(ledger, windows, now).all_time) calls += std::get<3>(sums);
  CHECK(calls == 20 * 1000 + booked.load());
  CHECK(before.all_time.size() > 0);
}
