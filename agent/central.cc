#include "central.h"

#include "day_clock.h"
#include "ids.h"
#include "layout.h"
#include "log.h"
#include "redis.h"

#include <hiredis/hiredis.h>
#include <pqxx/pqxx>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <tuple>

namespace tokenfuse {

namespace {

constexpr const char* kKillKey = "platform:budget:emergency_kill";   // the reference's
constexpr const char* kRefTenantPrefix = "budget:tenant:";             // the reference's
constexpr const char* kRefPlatformKey = "budget:platform:daily_used_usd";
constexpr std::int64_t kKeyTtlS = 3 * 86400;   // a day's keys outlive the day (time zones, late hosts)

// Sets this host's cumulative spending for each field, adding only the difference to the fleet
// total: running it twice with the same values changes nothing. ARGV[1] is the keys' time to
// live in seconds (0: they never expire), then field, value pairs. Returns field, delta pairs.
// Lua numbers are doubles: exact for totals below 2^53 nano-USD (9 million USD a tenant a day).
constexpr const char* kPushScript = R"lua(
local out = {}
for i = 2, #ARGV, 2 do
  local field, new = ARGV[i], tonumber(ARGV[i + 1])
  local old = tonumber(redis.call('HGET', KEYS[2], field) or '0')
  if new > old then
    redis.call('HINCRBY', KEYS[1], field, new - old)
    redis.call('HSET', KEYS[2], field, ARGV[i + 1])
    out[#out + 1] = field
    out[#out + 1] = string.format('%.0f', new - old)   -- tostring() would say 1e+14
  end
end
if tonumber(ARGV[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return out
)lua";

std::string dayTag(std::int32_t day) { return "{tokenfuse:" + DayClock::format(day) + "}"; }
std::string totalKey(std::int32_t day) { return dayTag(day) + ":total"; }
std::string hostKey(std::int32_t day, const std::string& host) { return dayTag(day) + ":host:" + host; }
std::string tenantField(std::string_view project_id) { return "t:" + std::string(project_id); }

// A shared rule's keys, per window: the rule's name, scope, metric and window, a hash of what
// else makes it the rule it is (its match and week start), and the window's start (unix
// seconds; "all" for a rule of all time) in the hash tag, so that hosts share a count only for
// the same rule and the same window.
std::string ruleTag(const SharedRule& rule, std::int64_t window_start_ns) {
  std::uint64_t h = 0xcbf29ce484222325ull;   // FNV-1a 64
  for (const char c : rule.match + '\0' + rule.week_start) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  char shape[17];
  std::snprintf(shape, sizeof shape, "%016llx", static_cast<unsigned long long>(h));
  return "{tokenfuse:rule:" + rule.name + ":" + rule.scope + ":" + rule.metric + ":" + rule.window + ":" + shape + ":" +
         (rule.window == "all-time" ? std::string("all") : std::to_string(window_start_ns / 1'000'000'000)) + "}";
}
// A counter's field: its ids, the first length-prefixed ("4:acmegpt-4o" for acme x gpt-4o).
std::string ruleField(const RuleUsage::Counter& c) {
  return std::to_string(c.first.size()) + ":" + c.first + c.second;
}

// "0.0125" (the reference's INCRBYFLOAT value) in nano-USD, rounded up; 0 if unreadable.
std::int64_t floatUsdToNano(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || !std::isfinite(v) || v <= 0) return 0;
  return static_cast<std::int64_t>(std::ceil(v * 1e9));
}

std::string usdText(std::int64_t nano) { return NanoUsd(nano).toString(); }

// Field k of two HMGET replies, of the fleet's total key and of this host's: (fleet, here), 0
// for a field that is not there.
std::pair<std::int64_t, std::int64_t> fleetAndHere(const RedisReply& total, const RedisReply& host, std::size_t k) {
  return {k < total->elements ? replyInteger(total->element[k]) : 0,
          k < host->elements ? replyInteger(host->element[k]) : 0};
}

}  // namespace

struct PgConnection {
  explicit PgConnection(const std::string& url) : c(url) {}
  pqxx::connection c;
};

// --- The link ------------------------------------------------------------------------------------

CentralLink::CentralLink(const CentralConfig& config, RegionAdmin& admin, const std::string& ledger_path,
                         std::string host_id, Clock clock, KillSink on_kill)
    : config_(config), admin_(admin), host_id_(std::move(host_id)), clock_(std::move(clock)),
      on_kill_(std::move(on_kill)) {
  ledger_ = std::make_unique<Ledger>(ledger_path, host_id_);
  ledger_id_ = ledger_->ledgerId();
  origin_ = host_id_ + "/" + ledger_id_;
  stats_.redis_configured = hasRedis();
  stats_.postgres_configured = hasPostgres();
  stats_.redis_seq = static_cast<std::uint64_t>(ledger_->metaInt("central_redis_seq"));
  stats_.postgres_seq = static_cast<std::uint64_t>(ledger_->metaInt("central_postgres_seq"));
}

CentralLink::~CentralLink() = default;

void CentralLink::linkDown(const char* link, const std::string& why, std::atomic<bool>& up) {
  ++stats_.sync_errors;
  if (up.exchange(false) || !warned_.contains(link)) {
    // Once per change: no log line per failed attempt.
    warned_.insert(link);
    log::warn("central_link_down", {{"link", link}, {"error", why}, {"fail_open", true}});
  }
}

void CentralLink::linkUp(const char* link, std::atomic<bool>& up) {
  if (!up.exchange(true)) log::info("central_link_up", {{"link", link}});
  warned_.erase(link);
}

void CentralLink::syncOnce() {
  stats_.ledger_seq = ledger_->maxSeq();
  if (hasRedis()) syncRedis();
  if (hasPostgres()) syncPostgres();
}

void CentralLink::run(std::stop_token stop) {
  while (!stop.stop_requested()) {
    try {
      syncOnce();
    } catch (const std::exception& e) {   // never the agent's end: the link is retried
      ++stats_.sync_errors;
      log::error("central_sync_failed", {{"error", e.what()}});
    }
    // A backlog drains at once; otherwise wait the interval, or until woken.
    const bool backlog = stats_.postgres_up && stats_.postgres_seq < stats_.ledger_seq && !push_failed_;
    std::unique_lock lock(mu_);
    if (!backlog) {
      cv_.wait_for(lock, stop, std::chrono::milliseconds(config_.sync_interval_ms), [this] { return wake_; });
    }
    wake_ = false;
  }
}

void CentralLink::wake() {
  {
    std::lock_guard lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

void CentralLink::publishKill(bool active, const std::string& reason, std::int64_t ttl_s) {
  {
    std::lock_guard lock(mu_);
    pending_kill_ = PendingKill{active, reason, ttl_s};
  }
  wake();
}

// --- Redis: totals and the kill switch -------------------------------------------------------------

void CentralLink::syncRedis() {
  const std::int64_t now = clock_();
  if (redis_ == nullptr) {
    if (now < next_redis_attempt_ns_) return;
    try {
      redis_ = std::make_unique<RedisConnection>(config_.redis, config_.connect_timeout_ms);
      rule_pushed_.clear();   // what a Redis that was away holds is not known: push every count again
    } catch (const LinkError& e) {
      next_redis_attempt_ns_ = now + config_.sync_interval_ms * 1'000'000;
      linkDown("redis", e.what(), stats_.redis_up);
      applyLeases();
      return;
    }
  }
  try {
    pushPendingKill();
    pushTotals();
    pullKill();
    pullTotals();
    syncRules();
    stats_.redis_ok_unix_ns = clock_();
    linkUp("redis", stats_.redis_up);
    leases_applied_ = false;
  } catch (const LinkError& e) {
    redis_.reset();
    linkDown("redis", e.what(), stats_.redis_up);
    applyLeases();
  } catch (const std::exception& e) {
    // SQLite failed half-way: replies may be queued on the connection, so it goes too.
    redis_.reset();
    ++stats_.sync_errors;
    log::error("central_sync_failed", {{"link", "redis"}, {"error", e.what()}});
  }
}

void CentralLink::pushPendingKill() {
  std::optional<PendingKill> k;
  {
    std::lock_guard lock(mu_);
    k = pending_kill_;
  }
  if (!k) return;
  if (k->active) {
    std::vector<std::string> set{"SET", kKillKey, k->reason.empty() ? "activated" : k->reason};
    if (k->ttl_s > 0) {
      set.emplace_back("EX");
      set.push_back(std::to_string(k->ttl_s));
    }
    redis_->command(set);
  } else {
    redis_->command({"DEL", kKillKey});
  }
  {
    std::lock_guard lock(mu_);
    if (pending_kill_ && pending_kill_->active == k->active && pending_kill_->reason == k->reason) pending_kill_.reset();
  }
  try {
    ledger_->markKillPublished();
  } catch (const LedgerError& e) {
    log::error("kill_switch_not_saved", {{"error", e.what()}});
  }
}

bool CentralLink::killPublishPending() {
  std::lock_guard lock(mu_);
  return pending_kill_.has_value();
}

void CentralLink::pushTotals() {
  // A Redis that lost its data (restarted without persistence, failed over, flushed) has lost
  // this host's share too: put back all of today's, rather than forget spending as the
  // reference did. The marker is this host's "seq" field, written after every push.
  const std::int32_t today = admin_.day();
  std::vector<DaySpend> changed;
  if (stats_.redis_seq > 0 && redis_->command({"HEXISTS", hostKey(today, origin_), "seq"})->integer == 0) {
    changed = ledger_->spendOfDay(today);
    if (!changed.empty()) log::warn("central_totals_repushed", {{"day", DayClock::format(today)}, {"tenants", changed.size()}});
  }
  for (DaySpend& d : ledger_->spendUpdatedAfter(stats_.redis_seq)) changed.push_back(std::move(d));
  if (changed.empty()) return;
  const auto key = [](const DaySpend& d) { return std::tie(d.day, d.project_id); };
  std::sort(changed.begin(), changed.end(), [&](const DaySpend& a, const DaySpend& b) { return key(a) < key(b); });
  changed.erase(std::unique(changed.begin(), changed.end(), [&](const DaySpend& a, const DaySpend& b) {
                  return key(a) == key(b);   // the same row, read twice
                }),
                changed.end());

  // One script call per day and 1000 tenants, so Redis is never blocked for long; pipelined.
  constexpr std::size_t kFieldsPerCall = 1000;
  std::map<std::int32_t, std::int64_t> platform;   // read from SQLite before anything is queued
  for (const DaySpend& d : changed) platform.try_emplace(d.day, 0);
  for (auto& [day, total] : platform) total = ledger_->daySpend(day);
  std::uint64_t newest = stats_.redis_seq;
  std::size_t calls = 0;
  for (auto it = changed.begin(); it != changed.end();) {
    const std::int32_t day = it->day;
    std::vector<std::string> cmd{"EVAL", kPushScript, "2", totalKey(day), hostKey(day, origin_), std::to_string(kKeyTtlS)};
    for (std::size_t n = 0; it != changed.end() && it->day == day && n < kFieldsPerCall; ++it, ++n) {
      cmd.push_back(tenantField(it->project_id));
      cmd.push_back(std::to_string(it->cost_nano_usd));
      newest = std::max(newest, it->updated_seq);
    }
    if (it == changed.end() || it->day != day) {   // the day's last call carries the platform
      cmd.emplace_back("p");
      cmd.push_back(std::to_string(platform.at(day)));
    }
    stats_.pushed_totals += (cmd.size() - 6) / 2;
    redis_->append(cmd);
    ++calls;
  }
  std::map<std::string, std::int64_t> ref_deltas;   // for the reference's keys, mixed fleets only
  for (std::size_t i = 0; i < calls; ++i) {
    const RedisReply r = redis_->next();
    for (std::size_t j = 0; r->type == REDIS_REPLY_ARRAY && j + 1 < r->elements; j += 2) {
      ref_deltas[replyText(r->element[j])] += replyInteger(r->element[j + 1]);
    }
  }
  if (config_.reference_keys) {
    // The reference service's own counters (USD floats with a 24 h TTL), so that its hosts and
    // ours see each other's spending during a migration. Best effort: a crash between the script
    // and these can leave them short by one sync's spending.
    for (const auto& [field, delta] : ref_deltas) {
      const std::string k = field == "p" ? std::string(kRefPlatformKey) : kRefTenantPrefix + field.substr(2);
      redis_->append({"INCRBYFLOAT", k, usdText(delta)});
      redis_->append({"EXPIRE", k, "86400"});
    }
    for (std::size_t i = 0; i < ref_deltas.size() * 2; ++i) redis_->next();
  }
  ledger_->setMetaInt("central_redis_seq", static_cast<std::int64_t>(newest));
  stats_.redis_seq = newest;
  redis_->append({"HSET", hostKey(today, origin_), "seq", std::to_string(newest)});
  redis_->append({"EXPIRE", hostKey(today, origin_), std::to_string(kKeyTtlS)});
  redis_->next();
  redis_->next();
}

void CentralLink::pullKill() {
  redis_->append({"GET", kKillKey});
  redis_->append({"PTTL", kKillKey});
  const RedisReply value = redis_->next();
  const RedisReply pttl = redis_->next();
  const KillSwitchState local = admin_.engine().killSwitch();
  if (value->type == REDIS_REPLY_STRING) {
    const std::string reason = replyText(value.get()).substr(0, 256);   // as much as the region keeps
    const std::int64_t ttl_ms = replyInteger(pttl.get());
    if (!local.active || local.reason != reason) on_kill_(true, reason, ttl_ms > 0 ? clock_() + ttl_ms * 1'000'000 : 0);
  } else if (local.active) {
    // Redis is the fleet's kill switch: off there is off here, unless this host's config file
    // says otherwise (the agent keeps that rule).
    on_kill_(false, {}, 0);
  }
}

void CentralLink::pullTotals() {
  const std::int32_t day = admin_.day();
  if (day != leases_day_) ref_base_.clear();
  leases_day_ = day;
  std::vector<std::string> tenants;
  admin_.forEachTenant([&](std::string_view id) { tenants.emplace_back(id); });
  tenants.emplace_back();   // "" = the platform, last
  constexpr std::size_t kChunk = 1000;
  for (std::size_t begin = 0; begin < tenants.size(); begin += kChunk) {
    const std::size_t end = std::min(tenants.size(), begin + kChunk);
    std::vector<std::string> fields;
    for (std::size_t i = begin; i < end; ++i) fields.push_back(tenants[i].empty() ? "p" : tenantField(tenants[i]));
    std::vector<std::string> total{"HMGET", totalKey(day)}, mine{"HMGET", hostKey(day, origin_)};
    total.insert(total.end(), fields.begin(), fields.end());
    mine.insert(mine.end(), fields.begin(), fields.end());
    redis_->append(total);
    redis_->append(mine);
    if (config_.reference_keys) {
      for (std::size_t i = begin; i < end; ++i) {
        redis_->append({"GET", tenants[i].empty() ? std::string(kRefPlatformKey) : kRefTenantPrefix + tenants[i]});
      }
    }
    const RedisReply t = redis_->next();
    const RedisReply m = redis_->next();
    for (std::size_t i = begin; i < end; ++i) {
      const auto [fleet, here] = fleetAndHere(t, m, i - begin);
      std::int64_t elsewhere = std::max<std::int64_t>(0, fleet - here);
      if (config_.reference_keys) {
        // The reference's counter holds everyone's spending (ours too), but over a sliding 24 h
        // that every write renews: what it held at this host's first look of the day beyond
        // tokenfuse's own spending today is taken as yesterday's. Above that, the larger of the
        // two views counts.
        const RedisReply ref = redis_->next();
        const std::int64_t ref_nano = floatUsdToNano(replyText(ref.get()));
        const std::int64_t base =
            ref_base_.try_emplace(tenants[i], std::max<std::int64_t>(0, ref_nano - fleet)).first->second;
        elsewhere = std::max(elsewhere, ref_nano - base - here);
      }
      (void)admin_.setElsewhere(day, tenants[i], NanoUsd(elsewhere));
    }
  }
}

void CentralLink::syncRules() {
  if (!shared_rules_) return;
  std::map<std::uint32_t, SharedRule> shared;
  for (SharedRule& r : shared_rules_()) shared.emplace(r.index, std::move(r));
  if (shared.empty()) return;
  const std::int64_t now = clock_();
  struct Window {
    const RuleUsage* usage;
    std::string total, host;
    std::vector<std::string> fields;   // ruleField of each counter, in usage->counters' order
  };
  std::vector<Window> windows;
  const std::vector<RuleUsage> rules = admin_.rules();   // one pass over the rule table
  for (const RuleUsage& r : rules) {
    const auto it = shared.find(r.number - 1);
    if (it == shared.end() || it->second.name != r.name) continue;   // not shared, or replaced meanwhile
    const std::string tag = ruleTag(it->second, r.window_start_ns);
    Window& w = windows.emplace_back(Window{&r, tag + ":total", tag + ":host:" + origin_, {}});
    for (const RuleUsage::Counter& c : r.counters) w.fields.push_back(ruleField(c));
  }
  // Counters already pushed for windows that are no longer current are forgotten.
  std::set<std::string, std::less<>> current;
  for (const Window& w : windows) current.insert(w.host);
  std::erase_if(rule_pushed_, [&](const auto& kv) { return !current.contains(kv.first.first); });

  // Push: this host's count of each counter that changed. A Redis that lost the window's keys (the
  // marker field "m" is gone) is given every counter again.
  for (const Window& w : windows) redis_->append({"HEXISTS", w.host, "m"});
  for (const Window& w : windows) {
    if (redis_->next()->integer == 0) {
      std::erase_if(rule_pushed_, [&](const auto& kv) { return kv.first.first == w.host; });
    }
  }
  std::size_t calls = 0;
  std::vector<std::pair<std::pair<std::string, std::string>, std::int64_t>> sent;   // into rule_pushed_ once answered
  for (const Window& w : windows) {
    // A window's keys outlive it by three days, in absolute time whichever host pushes; a rule of
    // all time's never expire (a host key gone before the total would count that host twice).
    const std::int64_t ttl_s = w.usage->window_end_ns == INT64_MAX
                                   ? 0
                                   : std::max<std::int64_t>(0, (w.usage->window_end_ns - now) / 1'000'000'000) + kKeyTtlS;
    std::vector<std::string> cmd{"EVAL", kPushScript, "2", w.total, w.host, std::to_string(ttl_s), "m", "1"};
    constexpr std::size_t kHead = 8, kFieldsPerCall = 1000;   // so that Redis is never blocked for long
    for (std::size_t i = 0; i < w.fields.size(); ++i) {
      const std::int64_t committed = w.usage->counters[i].committed;
      if (committed == 0) continue;
      std::pair<std::string, std::string> key{w.host, w.fields[i]};
      if (const auto it = rule_pushed_.find(key); it != rule_pushed_.end() && committed <= it->second) continue;
      cmd.push_back(w.fields[i]);
      cmd.push_back(std::to_string(committed));
      sent.emplace_back(std::move(key), committed);
      if ((cmd.size() - kHead) / 2 == kFieldsPerCall) {
        redis_->append(cmd);
        ++calls;
        cmd.resize(kHead);
      }
    }
    redis_->append(cmd);   // with "m" alone, it keeps the window's keys alive
    ++calls;
  }
  for (std::size_t i = 0; i < calls; ++i) redis_->next();
  for (auto& [key, count] : sent) rule_pushed_[std::move(key)] = count;

  // Pull: what the other hosts counted on each of this host's counters.
  constexpr std::size_t kChunk = 1000;
  for (const Window& w : windows) {
    const std::vector<RuleUsage::Counter>& counters = w.usage->counters;
    for (std::size_t begin = 0; begin < counters.size(); begin += kChunk) {
      const std::size_t end = std::min(counters.size(), begin + kChunk);
      std::vector<std::string> total{"HMGET", w.total}, mine{"HMGET", w.host};
      total.insert(total.end(), w.fields.begin() + begin, w.fields.begin() + end);
      mine.insert(mine.end(), w.fields.begin() + begin, w.fields.begin() + end);
      redis_->append(total);
      redis_->append(mine);
      const RedisReply t = redis_->next();
      const RedisReply m = redis_->next();
      for (std::size_t i = begin; i < end; ++i) {
        const std::size_t k = i - begin;
        const auto [fleet, here] = fleetAndHere(t, m, k);
        // Redis holds less of this host's count than was pushed (restored from an older
        // snapshot, a replica that lagged): the next sync pushes it again.
        if (const auto it = rule_pushed_.find({w.host, w.fields[i]}); it != rule_pushed_.end() && here < it->second) {
          rule_pushed_.erase(it);
        }
        admin_.setRuleElsewhere(w.usage->number - 1, w.usage->gen, w.usage->window_start_ns, counters[i].first,
                                counters[i].second, std::max<std::int64_t>(0, fleet - here));
      }
    }
  }
}

void CentralLink::applyLeases() {
  // While Redis is down, this host may spend beyond what it has spent only its lease: a share of
  // what each limited tenant (and the platform) has left, as this host knows it now: the last
  // fleet totals it pulled and its own spending since. Applied once per outage, and only on the
  // day those totals are from.
  if (config_.lease_fraction_ppb == 0 || leases_applied_) return;
  leases_applied_ = true;
  const std::int32_t day = admin_.day();
  if (day != leases_day_) return;   // what was left yesterday says nothing about today
  std::size_t n = 0;
  const auto lease = [&](std::string_view id) {
    const BudgetView v = id.empty() ? admin_.engine().platform() : admin_.engine().tenant(id);
    if (!v.limit) return;
    const std::int64_t used_here = shm::wrapAdd(v.committed.count(), v.held.count());
    const std::int64_t left =
        std::max<std::int64_t>(0, shm::wrapSub(shm::wrapSub(v.limit->count(), used_here), v.elsewhere.count()));
    const auto share = static_cast<std::int64_t>(shm::U128{static_cast<std::uint64_t>(left)} *
                                                 static_cast<std::uint64_t>(config_.lease_fraction_ppb) / 1'000'000'000);
    // limit - elsewhere = used here now + share: the most this host can reach until Redis is back.
    (void)admin_.setElsewhere(day, id, NanoUsd(std::max(v.elsewhere.count(), shm::wrapSub(shm::wrapSub(v.limit->count(), used_here), share))));
    ++n;
  };
  lease("");
  admin_.forEachTenant(lease);
  log::warn("central_leases_applied", {{"scopes", n}, {"lease_fraction", usdText(config_.lease_fraction_ppb)}});
}

// --- Postgres: the ledger and tenant limits -----------------------------------------------------------

// libpq parameters appended to the configured URL: a bounded connect, and a name in pg_stat_activity.
std::string CentralLink::pgOptions() const {
  return std::string(config_.postgres_url.find('?') == std::string::npos ? "?" : "&") + "connect_timeout=" +
         std::to_string(std::max<std::int64_t>(1, (config_.connect_timeout_ms + 999) / 1000)) +
         "&application_name=tokenfused";
}

void CentralLink::ensureSchema(PgConnection& pg) {
  pqxx::work w(pg.c);
  // Several agents may start at once: one creates, the others wait.
  w.exec("SELECT pg_advisory_xact_lock(7384626151)");
  w.exec(R"sql(
CREATE TABLE IF NOT EXISTS budget_ledger (
  id                BIGSERIAL PRIMARY KEY,
  project_id        TEXT        NOT NULL,
  agent_id          TEXT,
  run_id            TEXT,
  model             TEXT        NOT NULL,
  provider          TEXT,
  prompt_tokens     BIGINT      NOT NULL,
  completion_tokens BIGINT      NOT NULL,
  cost_usd          NUMERIC(20, 9) NOT NULL,
  created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS host_id TEXT;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS ledger_id TEXT;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS host_seq BIGINT;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS budget_day DATE;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS kind TEXT;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS cost_nano_usd BIGINT;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS reservation_id BIGINT;
ALTER TABLE budget_ledger ADD COLUMN IF NOT EXISTS tags TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS budget_ledger_host_seq ON budget_ledger (host_id, ledger_id, host_seq);
CREATE TABLE IF NOT EXISTS tokenfuse_push (
  host_id   TEXT NOT NULL,
  ledger_id TEXT NOT NULL,
  host_seq  BIGINT NOT NULL,          -- every entry of this ledger up to here is in budget_ledger
  PRIMARY KEY (host_id, ledger_id)
);
CREATE TABLE IF NOT EXISTS awooop_projects (
  project_id       TEXT PRIMARY KEY,
  budget_limit_usd NUMERIC(20, 9)
);
)sql");
  const pqxx::result type = w.exec(
      "SELECT data_type FROM information_schema.columns WHERE table_name = 'budget_ledger' AND column_name = 'run_id'");
  if (!type.empty() && type[0][0].as<std::string>() == "uuid") {
    throw LinkError("postgres: budget_ledger.run_id is a uuid column (the reference's), and tokenfuse run ids are any "
                    "text: ALTER TABLE budget_ledger ALTER COLUMN run_id TYPE text");
  }
  w.exec("CREATE TEMP TABLE IF NOT EXISTS tf_stage (LIKE budget_ledger INCLUDING DEFAULTS) ON COMMIT DELETE ROWS");
  // Where this host's entries stop: committed with them, so it is exact whatever happened here.
  const pqxx::result pushed =
      w.exec_params("SELECT host_seq FROM tokenfuse_push WHERE host_id = $1 AND ledger_id = $2", host_id_, ledger_id_);
  w.commit();
  stats_.postgres_seq = pushed.empty() ? 0 : static_cast<std::uint64_t>(pushed[0][0].as<std::int64_t>());
}

void CentralLink::syncPostgres() {
  const std::int64_t now = clock_();
  if (pg_ == nullptr) {
    if (now < next_pg_attempt_ns_) return;
    try {
      const std::string& url = config_.postgres_url;
      pg_ = std::make_unique<PgConnection>(url + pgOptions());
      // A commit lost to a Postgres crash is lost with its position (they commit together), and
      // is pushed again from SQLite: waiting for Postgres's WAL flush buys nothing here.
      pqxx::nontransaction(pg_->c).exec("SET synchronous_commit = off; SET statement_timeout = '60s'");
      ensureSchema(*pg_);
    } catch (const std::exception& e) {
      pg_.reset();
      next_pg_attempt_ns_ = now + config_.sync_interval_ms * 1'000'000;
      linkDown("postgres", e.what(), stats_.postgres_up);
      return;
    }
  }
  push_failed_ = true;   // until this round gets through
  try {
    pushLedger();
    push_failed_ = false;
    if (now >= next_limits_ns_) {
      pullLimits();
      next_limits_ns_ = now + config_.limits_interval_ms * 1'000'000;
    }
    stats_.postgres_ok_unix_ns = clock_();
    linkUp("postgres", stats_.postgres_up);
  } catch (const LedgerError& e) {
    ++stats_.sync_errors;
    log::error("central_sync_failed", {{"link", "postgres"}, {"error", e.what()}});
  } catch (const std::exception& e) {   // pqxx: broken connection, SQL errors
    pg_.reset();
    linkDown("postgres", e.what(), stats_.postgres_up);
  }
}

void CentralLink::pushLedger() {
  // One batch per round; run() comes straight back while there is a backlog. Exactly once: the
  // rows and this host's position (tokenfuse_push) commit in one transaction, and the position
  // is read back from Postgres on every connect.
  LedgerFilter f;
  f.after_seq = stats_.postgres_seq;
  f.limit = config_.push_batch;
  const std::vector<LedgerEntry> rows = ledger_->list(f);
  if (rows.empty()) return;
  try {
    copyRows(rows, "budget_ledger", false);
  } catch (const pqxx::unique_violation&) {
    // Rows of this batch are there already, without the position that should have come with
    // them (written by an older agent, or restored from a backup): merge, skipping them.
    log::warn("central_push_merged", {{"from_seq", rows.front().seq}, {"entries", rows.size()}});
    copyRows(rows, "tf_stage", true);
  }
  const std::uint64_t last = rows.back().seq;
  stats_.postgres_seq = last;   // Postgres holds the position; the copy in SQLite is for status only
  stats_.pushed_entries += rows.size();
  try {
    ledger_->setMetaInt("central_postgres_seq", static_cast<std::int64_t>(last));
  } catch (const LedgerError&) {
  }
}

void CentralLink::copyRows(const std::vector<LedgerEntry>& rows, const char* table, bool merge) {
  static const std::vector<std::string> kColumns{
      "project_id", "agent_id", "run_id",   "model",      "provider", "prompt_tokens", "completion_tokens", "cost_usd",
      "created_at", "host_id",  "ledger_id", "host_seq", "budget_day", "kind", "cost_nano_usd", "reservation_id",
      "tags"};
  pqxx::work w(pg_->c);
  {
    pqxx::stream_to copy(w, table, kColumns);
    auto opt = [](const std::string& s) { return s.empty() ? std::optional<std::string>() : std::optional(s); };
    // Formatting dates and times is slow, and a batch is nearly always one day and few seconds.
    std::int32_t day = -1;
    std::string day_text, time_text;
    std::int64_t second = -1;
    for (const LedgerEntry& e : rows) {
      if (e.day != day) {
        day = e.day;
        day_text = DayClock::format(day);
      }
      if (e.unix_ns / 1'000'000'000 != second) {
        second = e.unix_ns / 1'000'000'000;
        time_text = isoTime(second * 1'000'000'000);   // "....T14:00:00.000Z"
      }
      const auto ms = static_cast<int>(e.unix_ns / 1'000'000 % 1000);
      time_text[20] = static_cast<char>('0' + ms / 100);
      time_text[21] = static_cast<char>('0' + ms / 10 % 10);
      time_text[22] = static_cast<char>('0' + ms % 10);
      // '' stays '' (the reference's provider is NOT NULL); only an absent run is NULL. An id
      // that is not UTF-8 (written by an agent from before ids were checked) would make Postgres
      // refuse the whole batch for ever: it goes as displayId() shows it, as in /metrics.
      copy << std::make_tuple(displayId(e.project_id), displayId(e.agent_id), opt(displayId(e.run_id)),
                              displayId(e.model), displayId(e.provider), e.prompt_tokens,
                              e.completion_tokens, NanoUsd(e.cost_nano_usd).toString(), time_text, host_id_, ledger_id_,
                              static_cast<std::int64_t>(e.seq), day_text, e.kind, e.cost_nano_usd,
                              e.reservation_id == 0 ? std::optional<std::int64_t>()
                                                    : std::optional(static_cast<std::int64_t>(e.reservation_id)),
                              opt(displayId(e.tags)));
    }
    copy.complete();
  }
  if (merge) {
    w.exec("INSERT INTO budget_ledger (" + pqxx::separated_list(", ", kColumns.begin(), kColumns.end()) + ") SELECT " +
           pqxx::separated_list(", ", kColumns.begin(), kColumns.end()) +
           " FROM tf_stage ON CONFLICT (host_id, ledger_id, host_seq) DO NOTHING");
  }
  w.exec_params(
      "INSERT INTO tokenfuse_push (host_id, ledger_id, host_seq) VALUES ($1, $2, $3) "
      "ON CONFLICT (host_id, ledger_id) DO UPDATE SET host_seq = excluded.host_seq",
      host_id_, ledger_id_, static_cast<std::int64_t>(rows.back().seq));
  w.commit();
}

void CentralLink::pullLimits() {
  pqxx::work w(pg_->c);
  const pqxx::result rows = w.exec("SELECT project_id, budget_limit_usd::text FROM awooop_projects");
  w.commit();
  std::set<std::string> seen;
  std::uint32_t limited_left_out = 0;   // limits with no table room: the library must know
  for (const auto& row : rows) {
    const std::string id = row[0].as<std::string>();
    std::optional<NanoUsd> limit;
    if (!row[1].is_null()) {
      std::string why;
      limit = NanoUsd::parse(row[1].as<std::string>(), &why);
      if (!limit) {
        log::warn("tenant_limit_skipped", {{"project_id", id}, {"budget_limit_usd", row[1].as<std::string>()},
                                           {"error", why}});
        continue;
      }
    }
    if (Status s = admin_.setLimit(LimitTable::kTenant, id, limit); !s.ok()) {
      if (limit) ++limited_left_out;
      log::warn("tenant_limit_skipped", {{"project_id", id}, {"error", s.message()}});
      continue;
    }
    seen.insert(id);
  }
  // A project that left awooop_projects goes back to the default limit.
  for (const std::string& id : fleet_limited_) {
    if (!seen.contains(id)) (void)admin_.clearLimit(LimitTable::kTenant, id);
  }
  fleet_limited_ = std::move(seen);
  admin_.setLimitedUntracked(LimitTable::kTenant, limited_left_out, RegionAdmin::LimitSource::kCentral);
}

void CentralLink::writeTenantLimit(const std::string& project_id, std::optional<NanoUsd> limit) {
  try {
    pqxx::connection c(config_.postgres_url + pgOptions());
    pqxx::work w(c);
    w.exec("SET LOCAL statement_timeout = '10s'");
    const std::optional<std::string> value = limit ? std::optional(limit->toString()) : std::nullopt;
    w.exec_params(
        "INSERT INTO awooop_projects (project_id, budget_limit_usd) VALUES ($1, $2::numeric) "
        "ON CONFLICT (project_id) DO UPDATE SET budget_limit_usd = excluded.budget_limit_usd",
        project_id, value);
    w.commit();
  } catch (const std::exception& e) {
    throw LinkError(std::string("postgres: cannot set awooop_projects.budget_limit_usd: ") + e.what());
  }
}

}  // namespace tokenfuse
