#include "alerts.h"

#include "day_clock.h"
#include "layout.h"
#include "ledger.h"
#include "log.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>

namespace tokenfuse {

namespace {

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS alert_fired (
  day           INTEGER NOT NULL,   -- the budget day (days since 1970-01-01); -1 for a run's alerts
  scope         TEXT    NOT NULL,   -- tenant, run, platform
  scope_id      TEXT    NOT NULL,   -- '' for the platform
  level_pct     INTEGER NOT NULL,
  fired_unix_ns INTEGER NOT NULL,
  PRIMARY KEY (day, scope, scope_id, level_pct)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_outbox (
  id                INTEGER PRIMARY KEY,
  notifier          INTEGER NOT NULL,   -- index in [[alerts.notifiers]]
  body              TEXT    NOT NULL,   -- the alert as JSON
  attempts          INTEGER NOT NULL DEFAULT 0,
  next_unix_ns      INTEGER NOT NULL,
  delivered_unix_ns INTEGER
);
CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (delivered_unix_ns, next_unix_ns);
)sql";

constexpr std::int64_t kFirstRetryNs = 250'000'000;   // doubles up to a minute
constexpr std::int64_t kLastRetryNs = 60'000'000'000;
constexpr std::int32_t kLifetime = -1;   // alert_fired.day of a run's alerts: a run budget never resets
constexpr std::int64_t kRedisRetryNs = 5'000'000'000;   // a Redis that failed a claim is asked again after this

// Fleet claims, in two steps so that a claimer that cannot send does not silence the fleet:
// the first host to ask writes "pending:<host>" for kPendingS seconds (renewed on each of its
// attempts); once one of its notifiers accepted the alert, "sent:<host>" for the key's life.
// Another host that finds "pending:" waits and asks again; "sent:" means done; a pending claim
// whose host died or gave up expires, and the next host to ask takes it over.
// KEYS[1] the alert; ARGV[1] this host; ARGV[2] the pending life in seconds.
// Returns 1: this host sends; 0: another host sent it; 2: another host is sending it.
constexpr std::int64_t kPendingS = 180;   // longer than the longest retry backoff (a minute)
constexpr const char* kClaimScript = R"lua(
local owner = redis.call('GET', KEYS[1])
if owner == 'sent:' .. ARGV[1] then return 1 end
if not owner or owner == 'pending:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'pending:' .. ARGV[1], 'EX', ARGV[2])
  return 1
end
if string.sub(owner, 1, 5) == 'sent:' then return 0 end
return 2
)lua";
constexpr std::int64_t kOtherHostSendingNs = 5'000'000'000;   // then ask again

// The fleet-wide name of an alert, and how long its claim is kept.
std::pair<std::string, std::int64_t> claimKey(const nlohmann::json& body) {
  const std::string prefix = "{tokenfuse:alerts}:";
  if (body.contains("active")) {   // the kill switch: one change seen by every host within a sync interval
    const std::string reason = body.value("reason", "");
    return {prefix + (body.value("active", false) ? "kill:on:" + (reason.empty() ? "activated" : reason) : "kill:off"),
            60};
  }
  const std::string scope = body.value("scope", "");
  const bool run = scope == "run";
  return {prefix + (run ? "run" : body.value("day", "")) + ":" + scope + ":" +
              std::to_string(body.value("level_pct", 0)) + ":" + body.value("scope_id", ""),
          run ? 90 * 86400 : 3 * 86400};
}

std::unique_ptr<SQLite::Database> open(const std::string& path) {
  auto db = std::make_unique<SQLite::Database>(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE |
                                                         SQLite::OPEN_NOMUTEX);
  db->setBusyTimeout(5000);
  return db;
}

// The reference's names: warn (80 %), critical (95 %), hard_kill (100 %).
const char* levelName(std::int64_t pct) { return pct >= 100 ? "hard_kill" : pct >= 95 ? "critical" : "warn"; }

std::string text(const nlohmann::json& body) {
  const std::string event = body.value("event", "");
  if (event.rfind("budget_emergency_kill", 0) == 0) {
    return body.value("active", false) ? "tokenfuse: emergency kill switch ON (" + body.value("reason", "") +
                                             "): every LLM call is refused"
                                       : "tokenfuse: emergency kill switch off";
  }
  if (body.value("scope", "") == "rule") {
    const auto amount = [](const nlohmann::json& j) { return j.is_string() ? "$" + j.get<std::string>() : j.dump(); };
    return "tokenfuse: rule " + body.value("rule", "") + " (" + body.value("metric", "") + " per " +
           body.value("window", "") + ") for '" + body.value("key", "") + "' has used " +
           std::to_string(body.value("level_pct", 0)) + "% (" + amount(body["used"]) + " of " + amount(body["limit"]) + ")";
  }
  const std::string who = body.value("scope", "") == "platform"
                              ? std::string("The platform")
                              : body.value("scope", "") + " " + body.value("scope_id", "");
  return "tokenfuse: " + who + " has used " + std::to_string(body.value("level_pct", 0)) + "% of its budget ($" +
         body.value("used_usd", "") + " of $" + body.value("limit_usd", "") + ", " + body.value("day", "") + ")";
}

}  // namespace

struct Alerter::Event {
  nlohmann::json body;
  std::string scope, id;
  std::int64_t level_pct = -1;   // -1: not a threshold (the kill switch)
  // alert_fired.day: the budget day, kLifetime for a run, and for a rule its window (the minute
  // it starts, since 1970; kLifetime for all time), so that a threshold fires once per window.
  std::optional<std::int64_t> period;
};

Alerter::Alerter(const AlertsConfig& config, const CentralConfig& central, std::string origin, RegionAdmin& admin,
                 const std::string& ledger_path, Clock clock)
    : config_(config), central_(central), origin_(std::move(origin)), admin_(admin), clock_(std::move(clock)) {
  try {
    db_ = open(ledger_path);
    db_->exec(kSchema);
    // Ledgers from before runs' alerts were lifelong kept them per day: keep one row per level.
    db_->exec("UPDATE OR IGNORE alert_fired SET day = -1 WHERE scope = 'run' AND day <> -1;"
              "DELETE FROM alert_fired WHERE scope = 'run' AND day <> -1;");
    deliver_ = open(ledger_path);
    SQLite::Statement q(*db_, "SELECT COUNT(*) FROM alert_outbox WHERE delivered_unix_ns IS NULL");
    q.executeStep();
    stats_.queued = static_cast<std::uint64_t>(q.getColumn(0).getInt64());
  } catch (const SQLite::Exception& e) {
    throw LedgerError("alerts in " + ledger_path + ": " + e.what());
  }
}

Alerter::~Alerter() = default;

void Alerter::scan() {
  const std::int32_t day = admin_.day();
  std::lock_guard lock(db_mu_);
  if (day != day_) {
    // A new day (or the first scan): what already fired today, and runs' alerts, from SQLite, so a
    // restart adds none.
    fired_.clear();
    SQLite::Statement q(
        *db_, "SELECT scope, scope_id, MAX(level_pct) FROM alert_fired WHERE day IN (?, ?) GROUP BY 1, 2");
    q.bind(1, day);
    q.bind(2, kLifetime);
    while (q.executeStep()) fired_[{q.getColumn(0).getString(), q.getColumn(1).getString()}] = q.getColumn(2).getInt64();
    day_ = day;
  }
  Engine& engine = admin_.engine();
  scanOne("platform", "", engine.platform());
  admin_.forEachTenant([&](std::string_view id) { scanOne("tenant", id, engine.tenant(id)); });
  admin_.forEachEntry(LimitTable::kRun, [&](std::string_view id) { scanOne("run", id, engine.run(id)); });
  scanRules();
}

void Alerter::scanRules() {
  for (const RuleUsage& r : admin_.rules()) {
    if (r.metric == shm::kMetricConcurrency) continue;   // calls in flight: nothing is ever spent
    const std::int64_t period = r.window_end_ns == INT64_MAX ? kLifetime : r.window_start_ns / 60'000'000'000;
    for (const RuleUsage::Counter& c : r.counters) {
      if (!c.limit || *c.limit <= 0) continue;
      // What counts as used: this host's count, and other hosts' (or a sliding rule's carry).
      std::int64_t used = 0;
      if (__builtin_add_overflow(std::max<std::int64_t>(0, c.committed), std::max<std::int64_t>(0, c.elsewhere), &used)) {
        used = INT64_MAX;
      }
      // What already fired in this window (or, after a restart, the database says: raise()
      // inserts each threshold once per window, so a lost cache only costs a lookup).
      RuleFired& done = rule_fired_[{r.name, c.key}];
      if (done.period != period) done = {period, 0};
      for (const std::int64_t pct : config_.thresholdsFor("rule", c.key)) {
        if (pct <= done.pct) continue;
        if (shm::U128{static_cast<std::uint64_t>(used)} * 100 <
            shm::U128{static_cast<std::uint64_t>(*c.limit)} * static_cast<std::uint64_t>(pct)) {
          break;
        }
        const auto amount = [&](std::int64_t v) {
          return r.metric == shm::kMetricUsd ? nlohmann::json(NanoUsd(v).toString()) : nlohmann::json(v);
        };
        Event e;
        e.scope = "rule";
        e.id = r.name + ":" + c.key;
        e.level_pct = pct;
        e.period = period;
        e.body = {{"event", std::string("budget_rule_") + levelName(pct)},
                  {"scope", "rule"},
                  {"rule", r.name},
                  {"key", c.key},
                  {"metric", metricName(static_cast<RuleMetric>(r.metric))},
                  {"window", windowName(r.window)},
                  {"level_pct", pct},
                  {"used", amount(used)},
                  {"limit", amount(*c.limit)}};
        if (r.window_end_ns != INT64_MAX) e.body["window_end_unix_ns"] = r.window_end_ns;
        raise(e);
        done.pct = pct;
      }
    }
  }
}

void Alerter::scanOne(const char* scope, std::string_view id, const BudgetView& v) {
  if (!v.limit || v.limit->count() == 0) return;
  // What was spent, here and elsewhere in the fleet; holds are not spending yet.
  const std::int64_t used = shm::wrapAdd(v.committed.count(), v.elsewhere.count());   // region words: wrap, never UB
  const auto key = std::pair{std::string(scope), std::string(id)};
  const auto it = fired_.find(key);
  const std::int64_t done = it == fired_.end() ? 0 : it->second;
  for (const std::int64_t pct : config_.thresholdsFor(scope, id)) {
    if (pct <= done) continue;
    if (shm::U128{static_cast<std::uint64_t>(std::max<std::int64_t>(0, used))} * 100 <
        shm::U128{static_cast<std::uint64_t>(v.limit->count())} * static_cast<std::uint64_t>(pct)) {
      break;
    }
    Event e;
    e.scope = scope;
    e.id = std::string(id);
    e.level_pct = pct;
    e.body = {{"event", std::string("budget_") + scope + "_" + levelName(pct)},
              {"scope", scope},
              {"scope_id", e.id},
              {"day", DayClock::format(v.day)},
              {"level_pct", pct},
              {"used_usd", NanoUsd(used).toString()},
              {"limit_usd", v.limit->toString()}};
    raise(e);
    fired_[key] = pct;
  }
}

void Alerter::killChanged(bool active, const std::string& reason, const std::string& source) {
  std::lock_guard lock(db_mu_);
  Event e;
  e.body = {{"event", active ? "budget_emergency_kill_activated" : "budget_emergency_kill_deactivated"},
            {"active", active},
            {"reason", reason},
            {"source", source}};
  raise(e);
}

void Alerter::raise(const Event& e) {
  const std::int64_t now = clock_();
  nlohmann::json body = e.body;
  body["unix_ms"] = now / 1'000'000;
  try {
    SQLite::Transaction txn(*db_);
    if (e.level_pct >= 0) {
      SQLite::Statement f(*db_, "INSERT OR IGNORE INTO alert_fired VALUES (?, ?, ?, ?, ?)");
      f.bind(1, e.period ? *e.period : e.scope == "run" ? kLifetime : admin_.day());
      f.bind(2, e.scope);
      f.bind(3, e.id);
      f.bind(4, e.level_pct);
      f.bind(5, now);
      if (f.exec() == 0) return;   // fired before (this day, this scope, this level)
    }
    // An id that is not UTF-8 (an old ledger's, a region written by someone else) is shown with
    // U+FFFD: one such id must not stop the alerts of every tenant.
    const std::string text = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    for (std::size_t i = 0; i < config_.notifiers.size(); ++i) {
      SQLite::Statement q(*db_, "INSERT INTO alert_outbox (notifier, body, next_unix_ns) VALUES (?, ?, ?)");
      q.bind(1, static_cast<std::int64_t>(i));
      q.bind(2, text);
      q.bind(3, now);
      q.exec();
    }
    // Bounded: beyond queue_limit undelivered messages, the oldest go.
    SQLite::Statement drop(*db_,
                           "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox WHERE delivered_unix_ns "
                           "IS NULL ORDER BY id DESC LIMIT -1 OFFSET ?)");
    drop.bind(1, config_.queue_limit);
    const auto dropped = static_cast<std::uint64_t>(drop.exec());
    txn.commit();
    stats_.dropped += dropped;
    stats_.queued -= std::min<std::uint64_t>(stats_.queued, dropped);
  } catch (const SQLite::Exception& ex) {
    log::error("alert_not_saved", {{"event", body.value("event", "")}, {"error", ex.what()}});
  }
  ++stats_.fired;
  stats_.queued += config_.notifiers.size();
  nlohmann::ordered_json fields;
  for (const auto& [k, v] : body.items()) fields[k] = v;
  log::warn(body.value("event", "budget_alert"), fields);
  {
    std::lock_guard lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

Alerter::Claim Alerter::claim(const std::string& body_text) {
  if (central_.redis_url.empty()) return Claim::kMine;
  const std::string key = claimKey(nlohmann::json::parse(body_text)).first;
  const std::int64_t now = clock_();
  try {
    if (!redis_) {
      if (now < next_redis_attempt_ns_) return Claim::kMine;
      redis_ = std::make_unique<RedisConnection>(central_.redis, central_.connect_timeout_ms);
    }
    const RedisReply r = redis_->command({"EVAL", kClaimScript, "1", key, origin_, std::to_string(kPendingS)});
    if (redis_warned_) log::info("alert_fleet_claims_back");
    redis_warned_ = false;
    const std::int64_t answer = replyInteger(r.get());
    return answer == 1 ? Claim::kMine : answer == 0 ? Claim::kSentElsewhere : Claim::kSendingElsewhere;
  } catch (const LinkError& e) {
    redis_.reset();
    next_redis_attempt_ns_ = now + kRedisRetryNs;
    if (!redis_warned_) log::warn("alert_fleet_claims_unavailable", {{"error", e.what()}, {"sending_anyway", true}});
    redis_warned_ = true;
    return Claim::kMine;
  }
}

void Alerter::markSent(const std::string& body_text) {
  if (!redis_) return;   // no central Redis, or it is away: nothing to tell
  const auto [key, ttl_s] = claimKey(nlohmann::json::parse(body_text));
  try {
    redis_->command({"SET", key, "sent:" + origin_, "EX", std::to_string(ttl_s)});
  } catch (const LinkError&) {
    redis_.reset();   // the pending claim expires; a host asking after that sends it again
    next_redis_attempt_ns_ = clock_() + kRedisRetryNs;
  }
}

bool Alerter::send(const NotifierConfig& n, const std::string& body_text) {
  const nlohmann::json body = nlohmann::json::parse(body_text);
  std::string url = n.url, payload;
  if (n.kind == "webhook") {
    payload = body_text;
  } else if (n.kind == "slack") {
    payload = nlohmann::json{{"text", text(body)}}.dump();
  } else {   // telegram: the Bot API's sendMessage
    url = n.api_base + "/bot" + n.bot_token + "/sendMessage";
    payload = nlohmann::json{{"chat_id", n.chat_id}, {"text", text(body)}}.dump();
  }
  // scheme://host[:port] and the path, for httplib.
  const auto host_end = url.find('/', url.find("://") + 3);
  httplib::Client http(url.substr(0, host_end));
  http.set_connection_timeout(5);
  http.set_read_timeout(10);
  const auto r = http.Post(host_end == std::string::npos ? "/" : url.substr(host_end).c_str(), payload,
                           "application/json");
  return r && r->status >= 200 && r->status < 300;
}

std::size_t Alerter::deliverDue() {
  const std::int64_t now = clock_();
  struct Row {
    std::int64_t id, notifier, attempts;
    std::string body;
  };
  std::vector<Row> due;
  try {
    SQLite::Statement q(*deliver_,
                        "SELECT id, notifier, attempts, body FROM alert_outbox WHERE delivered_unix_ns IS NULL AND "
                        "next_unix_ns <= ? ORDER BY id LIMIT 50");
    q.bind(1, now);
    while (q.executeStep()) {
      due.push_back({q.getColumn(0).getInt64(), q.getColumn(1).getInt64(), q.getColumn(2).getInt64(),
                     q.getColumn(3).getString()});
    }
  } catch (const SQLite::Exception& e) {
    log::error("alert_delivery_failed", {{"error", e.what()}});
    return 0;
  }
  std::size_t sent = 0;
  std::map<std::string, Claim, std::less<>> claims;   // body -> claim, asked once per pass for all its notifiers
  for (const Row& r : due) {
    const bool known = r.notifier >= 0 && static_cast<std::size_t>(r.notifier) < config_.notifiers.size();
    bool ok = false, other_host = false, wait = false;
    try {
      if (known) {   // a notifier no longer configured: nothing to send it to, and nothing to claim
        auto it = claims.find(r.body);
        if (it == claims.end()) it = claims.emplace(r.body, claim(r.body)).first;
        other_host = it->second == Claim::kSentElsewhere;
        wait = it->second == Claim::kSendingElsewhere;
        ok = it->second == Claim::kMine && send(config_.notifiers[static_cast<std::size_t>(r.notifier)], r.body);
        if (ok) markSent(r.body);
      }
    } catch (const std::exception&) {   // a body that does not parse, a URL httplib refuses: a failed attempt
    }
    try {
      if (wait) {   // another host holds the claim: ask again later (not a failed attempt)
        SQLite::Statement u(*deliver_, "UPDATE alert_outbox SET next_unix_ns = ? WHERE id = ?");
        u.bind(1, clock_() + kOtherHostSendingNs);
        u.bind(2, r.id);
        u.exec();
      } else if (ok || !known || other_host) {
        SQLite::Statement u(*deliver_, "UPDATE alert_outbox SET delivered_unix_ns = ?, attempts = attempts + 1 WHERE id = ?");
        u.bind(1, clock_());
        u.bind(2, r.id);
        u.exec();
        if (stats_.queued > 0) --stats_.queued;
        if (ok) ++stats_.delivered, ++sent;
        if (other_host) ++stats_.other_host;
      } else {
        const std::int64_t backoff = std::min(kLastRetryNs, kFirstRetryNs << std::min<std::int64_t>(r.attempts, 8));
        SQLite::Statement u(*deliver_, "UPDATE alert_outbox SET attempts = attempts + 1, next_unix_ns = ? WHERE id = ?");
        u.bind(1, clock_() + backoff);
        u.bind(2, r.id);
        u.exec();
        ++stats_.failed;
        // The notifier is named by kind and position: its URL or token is a secret.
        log::warn("alert_delivery_failed", {{"notifier", config_.notifiers[static_cast<std::size_t>(r.notifier)].kind},
                                            {"index", r.notifier},
                                            {"attempt", r.attempts + 1},
                                            {"retry_in_ms", backoff / 1'000'000}});
      }
    } catch (const SQLite::Exception& e) {
      log::error("alert_delivery_failed", {{"error", e.what()}});
    }
  }
  return sent;
}

void Alerter::run(std::stop_token stop) {
  while (!stop.stop_requested()) {
    deliverDue();
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, stop, std::chrono::milliseconds(100), [this] { return wake_; });
    wake_ = false;
  }
}

}  // namespace tokenfuse
