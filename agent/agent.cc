#include "agent.h"

#include "ids.h"
#include "log.h"
#include "rule_match.h"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <bitset>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

namespace tokenfuse {

std::int64_t toUnixNs(std::chrono::system_clock::time_point t) noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

namespace {

std::string usdOrUnlimited(std::optional<NanoUsd> v) { return v ? v->toString() : "unlimited"; }

const char* scopeName(Agent::Scope s) {
  return s == Agent::Scope::kTenant ? "tenant" : s == Agent::Scope::kRun ? "run" : "platform";
}

std::optional<NanoUsd> limitOf(const LimitOverride& o) {
  return o.limit_nano_usd ? std::optional(NanoUsd(*o.limit_nano_usd)) : std::nullopt;
}

}  // namespace

Agent::Agent(Config config, Options options)
    : config_(std::move(config)),
      clock_(options.clock ? options.clock : Clock([] { return std::chrono::system_clock::now(); })),
      days_([&] {
        try {
          return DayClock(config_.timezone);
        } catch (const std::invalid_argument& e) {
          throw AgentConfigError(std::string("agent.timezone: ") + e.what());
        }
      }()),
      windows_(config_.timezone),   // the zone was checked just above
      steady_(options.steady ? std::move(options.steady)
              : options.clock ? std::function<std::int64_t()>([this] { return toUnixNs(clock_()); })
                              : std::function<std::int64_t()>([] {
                                  return std::chrono::duration_cast<std::chrono::nanoseconds>(
                                             std::chrono::steady_clock::now().time_since_epoch())
                                      .count();
                                })) {
  lockDataDir();
  try {
    ledger_file_ = std::make_unique<LedgerFile>(ledgerPath());   // before SQLite: it creates the file 0600
    ledger_ = std::make_unique<Ledger>(ledgerPath(), config_.host_id);
    settings_ = std::make_unique<Ledger>(ledgerPath(), config_.host_id);
    pruner_ledger_ = std::make_unique<Ledger>(ledgerPath(), config_.host_id);
    pruner_ledger_->skipFsync();   // the writer never waits for a prune's fsync
    // None writes into a deleted, replaced or garbled file: they fail, and say why.
    for (Ledger* l : {ledger_.get(), settings_.get(), pruner_ledger_.get()}) {
      l->guardWrites([f = ledger_file_.get()] { return f->problem(); });
    }
    if (!pruner_ledger_->size().incremental_vacuum && (config_.ledger_retain_days > 0 || config_.ledger_max_size_mb > 0)) {
      log::warn("ledger_vacuum_off", {{"path", ledgerPath()},
                                      {"why", "made before retention: its free pages are reused, the file does not shrink"},
                                      {"fix", "stop the agent, then: sqlite3 " + ledgerPath() +
                                                  " 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'"}});
    }
  } catch (const LedgerError& e) {
    throw AgentError(e.what());
  }
  openRegion(options.recreate_region);
  admin_ = std::make_unique<RegionAdmin>(*region_);
  writer_ = std::make_unique<LedgerWriter>(
      *admin_, *ledger_, config_.host_id,
      LedgerWriter::Options{65536, std::chrono::milliseconds(config_.ledger_flush_interval_ms),
                            std::chrono::milliseconds(5000)});
  writer_->watchFile(ledger_file_.get());
  // Entries carry the budget day they were booked in. After a forward clock step that was later
  // corrected, entries booked in the early days are still real: judge them against the latest day
  // this agent itself has set, not only against the clock (kept here, never read from the region).
  writer_->setClock([this] {
    const std::int64_t latest = std::int64_t{latest_day_.load(std::memory_order_relaxed)} * 86'400'000'000'000;
    return std::max(toUnixNs(clock_()), latest);
  });
  writer_->setDay([this] { return days_.dayOf(clock_()); });
  try {
    alerter_ = std::make_unique<Alerter>(config_.alerts, config_.central, config_.host_id + "/" + ledger_->ledgerId(),
                                         *admin_, ledgerPath(), [this] { return toUnixNs(clock_()); });
  } catch (const LedgerError& e) {
    throw AgentError(e.what());
  }
  applyConfig();
  if (config_.central.enabled()) {
    central_ = std::make_unique<CentralLink>(
        config_.central, *admin_, ledgerPath(), config_.host_id, [this] { return toUnixNs(clock_()); },
        [this](bool active, const std::string& reason, std::int64_t expires) { applyFleetKill(active, reason, expires); });
    central_->shareRules([this] {
      std::vector<SharedRule> out;
      std::lock_guard lock(rules_mu_);
      for (std::size_t i = 0; i < rules_.size() && i < rule_index_.size(); ++i) {
        const RuleSpec& r = rules_[i];
        if (sharedWithFleet(r)) {
          out.push_back({rule_index_[i], r.name, std::string(scopeName(r.scope)), std::string(metricName(r.metric)),
                         std::string(windowName(r.window.kind)), r.match,
                         r.window.kind == WindowKind::kWeek ? std::string(weekdayName(r.window.week_start)) : ""});
        }
      }
      return out;
    });
    // A change made here while Redis was away, then a restart: it still goes to the fleet.
    if (const auto k = settings_->storedKill(); k && !k->published) {
      const std::int64_t left_s = k->expires_unix_ns == 0 ? 0 : (k->expires_unix_ns - toUnixNs(clock_())) / 1'000'000'000;
      if (!k->active || k->expires_unix_ns == 0 || left_s > 0) central_->publishKill(k->active, k->reason, left_s);
    }
  }

  const auto now = clock_();
  const std::int32_t today = days_.dayOf(now);
  latest_day_.store(std::max(admin_->day(), today), std::memory_order_relaxed);   // before the ring is drained
  if (!adopted_) {
    rebuildFromLedger(today);
  } else {
    resyncStatsFromLedger();
  }
  if (adopted_ && admin_->day() < today) {
    log::info("budget_day_rollover", {{"day", DayClock::format(today)},
                                      {"previous", DayClock::format(admin_->day())},
                                      {"timezone", days_.zone()}});
    admin_->rollover(today);
  }
  admin_->publish(toUnixNs(now), adopted_ ? std::max(admin_->day(), today) : today);
  latest_day_.store(std::max(admin_->day(), today), std::memory_order_relaxed);
  // Sets the region's ledger_unavailable word from the file as it is now (a previous agent may
  // have left it set).
  (void)writer_->pass();
}

Agent::~Agent() {
  if (data_dir_lock_ >= 0) ::close(data_dir_lock_);
}

void Agent::lockDataDir() {
  std::error_code ec;
  std::filesystem::create_directories(config_.data_dir, ec);
  if (ec) throw AgentConfigError("agent.data_dir: cannot create " + config_.data_dir + ": " + ec.message());
  const std::string path = config_.data_dir + "/tokenfused.lock";
  data_dir_lock_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  // Whatever the umask, and for a file an older version created 0640.
  if (data_dir_lock_ >= 0) (void)::fchmod(data_dir_lock_, 0600);
  if (data_dir_lock_ < 0) {
    throw AgentConfigError("agent.data_dir: cannot write " + path + ": " + std::strerror(errno) +
                     " (run as the tokenfuse user, or pass --data-dir)");
  }
  if (::flock(data_dir_lock_, LOCK_EX | LOCK_NB) != 0) {
    throw AgentError("another tokenfused is running with data dir " + config_.data_dir);
  }
}

void Agent::openRegion(bool recreate) {
  const std::uint64_t ledger_seq = ledger_->durableHead();
  const RegionSpec spec{config_.shm_name,         config_.tenant_capacity, config_.run_capacity,
                        config_.model_capacity,   config_.reservation_capacity, 0660,
                        config_.ledger_capacity, ledger_seq,      config_.rule_capacity};
  AttachFailure why = AttachFailure::kNone;
  Status s = Region::attach(spec.shm_name, &region_, /*own=*/true, &why);
  if (const std::uint64_t tail = s.ok() ? region_->header().ledger_tail.load() : ledger_seq; tail < ledger_seq) {
    // The region would hand out sequence numbers the ledger already has: its tail was moved back
    // from outside, or the region belongs to another data dir (or the ledger was restored from
    // elsewhere). Either way the ledger's head wins: the writer's repair() moves the tail on, so
    // no sequence number is used twice, rather than refusing to start (a write into the region
    // must not be able to stop the agent).
    log::warn("ledger_ring_behind_ledger",
              {{"shm_name", spec.shm_name}, {"region_tail", tail}, {"ledger_head", ledger_seq},
               {"action", "the ring continues after the ledger's head"},
               {"note", "if this region belongs to another data dir, its unwritten entries are not in this ledger"}});
  }
  if (s.ok() && !region_->matches(spec) && recreate) {
    // Same layout, other sizes: its ledger entries can still be read, so they go to SQLite before
    // the region goes, and the new region continues after them.
    RegionAdmin old(*region_);
    LedgerWriter drain(old, *ledger_, config_.host_id, {});
    try {
      for (int rounds = 0; rounds < 1024 && drain.drainOnce().any(); ++rounds) {
      }
    } catch (const LedgerError& e) {
      throw AgentError(std::string("writing the old region's ledger entries: ") + e.what());
    }
  }
  if (s.ok() && !region_->matches(spec)) {
    why = AttachFailure::kIncompatible;
    const Geometry& h = region_->geometry();
    s = Status::error("region /" + spec.shm_name + " has capacities tenants=" + std::to_string(h.tenant_capacity) +
                      " runs=" + std::to_string(h.run_capacity) + " models=" + std::to_string(h.model_capacity) +
                      " reservations=" + std::to_string(h.reservation_capacity) +
                      ", the config asks for others: restore the old [region] values, or restart with "
                      "--recreate-region (in-flight reservations and today's counters in it are dropped)");
    region_.reset();
  }
  if (s.ok()) {
    adopted_ = true;
    log::info("region_adopted", {{"shm_name", spec.shm_name}, {"day", DayClock::format(region_->header().day)}});
    return;
  }
  switch (why) {
    case AttachFailure::kNotFound: break;
    case AttachFailure::kNotReady:
    case AttachFailure::kDamaged:   // truncated: nothing in it can be read, SQLite has the rest
      log::warn("region_recreated", {{"shm_name", spec.shm_name}, {"reason", s.message()}});
      Region::remove(spec.shm_name);
      break;
    case AttachFailure::kIncompatible:
      if (!recreate) throw AgentError(s.message());
      log::warn("region_recreated", {{"shm_name", spec.shm_name}, {"reason", s.message()}});
      Region::remove(spec.shm_name);
      break;
    default: throw AgentError(s.message());
  }
  RegionSpec fresh = spec;
  fresh.ledger_base = ledger_->durableHead();   // after anything drained from a replaced region
  if (Status c = Region::create(fresh, &region_); !c.ok()) throw AgentError(c.message());
  log::info("region_created", {{"shm_name", spec.shm_name}, {"bytes", region_->geometry().region_bytes}});
}

void Agent::rebuildFromLedger(std::int32_t today) {
  // A new region (first start, or after a reboot wiped /dev/shm) starts from the ledger, so that
  // today's counters equal its sums exactly. Nobody can use the region before it is published.
  // Runs are lifelong, so their ids can outgrow the run table: start-up never fails for that.
  // Keys with an explicit limit already have their entries (applyConfig ran first); the rest go
  // in newest activity first, so that what a full table leaves out is what was used longest ago.
  RegionAdmin& a = *admin_;
  auto restore_all = [&](LimitTable table, std::vector<LedgerTotal> totals, std::uint32_t capacity) {
    std::stable_sort(totals.begin(), totals.end(),
                     [](const LedgerTotal& x, const LedgerTotal& y) { return x.last_seq > y.last_seq; });
    LeftOut left(table, capacity);
    std::size_t restored = 0;
    for (const LedgerTotal& t : totals) {
      if (!validIdText(t.id)) {   // an old ledger's: the platform counts it, no key can be named by it
        log::warn("ledger_id_skipped", {{"scope", table == LimitTable::kTenant ? "tenant" : "run"},
                                        {"id", t.id}, {"why", "not UTF-8, or holds NUL"}});
        continue;
      }
      left.wanted();
      if (a.restore(table, t.id, NanoUsd(t.cost_nano_usd), t.prompt_tokens, t.completion_tokens, t.calls).ok()) {
        ++restored;
      } else {
        left.leftOut(t.id, false);
      }
    }
    left.log("rebuild_from_ledger");
    capacity_.left_out[table == LimitTable::kTenant ? 0 : 1].fetch_add(left.count());
    return restored;
  };
  // Entries under a later date than today were booked while the clock ran ahead, and it has been
  // set back since: they count for today (see backdateDay), on the side of refusing.
  const std::vector<LedgerTotal> daily = ledger_->tenantTotalsFrom(today, UINT64_MAX);
  const std::size_t tenants = restore_all(LimitTable::kTenant, daily, region_->geometry().tenant_capacity);
  // Runs idle for longer than their lifetime would only be reclaimed: they come back from the
  // ledger if they return (LedgerWriter).
  std::size_t runs =
      restore_all(LimitTable::kRun, ledger_->runTotals(runsActiveSince()), region_->geometry().run_capacity);
  // Runs with a limit of their own are never reclaimed: theirs come back whatever their age.
  std::vector<std::string> limited;
  a.forEachExplicit(LimitTable::kRun, [&](std::string_view id, std::optional<NanoUsd>) { limited.emplace_back(id); });
  for (const std::string& id : limited) {
    if (const std::optional<LedgerTotal> t = ledger_->runTotal(id)) {
      runs += a.restore(LimitTable::kRun, id, NanoUsd(t->cost_nano_usd), t->prompt_tokens, t->completion_tokens, t->calls).ok();
    }
  }
  LedgerTotal p;
  for (const LedgerTotal& t : daily) {
    p.cost_nano_usd += t.cost_nano_usd, p.prompt_tokens += t.prompt_tokens;
    p.completion_tokens += t.completion_tokens, p.calls += t.calls;
  }
  (void)a.restore(LimitTable::kTenant, {}, NanoUsd(p.cost_nano_usd), p.prompt_tokens, p.completion_tokens, p.calls);
  rebuildRulesFromLedger();
  log::info("counters_rebuilt", {{"day", DayClock::format(today)},
                                 {"platform_committed_usd", NanoUsd(p.cost_nano_usd).toString()},
                                 {"tenants", tenants},
                                 {"runs", runs},
                                 {"ledger_seq", ledger_->maxSeq()}});
}

void Agent::rebuildRulesFromLedger() {
  // Each rule's current window, from the entries booked since it began: rules that share a
  // window start share one pass over the ledger. Calls in flight (concurrency) are not in it.
  const shm::Header& h = admin_->header();
  std::set<std::int64_t> starts;
  std::lock_guard lock(rules_mu_);
  for (const std::uint32_t i : rule_index_) {
    const shm::RuleDef& d = h.rules[i];
    if (d.metric != shm::kMetricConcurrency) starts.insert(d.has_window != 0 ? d.window_start_ns.load() : INT64_MIN);
  }
  std::size_t rows = 0;
  std::uint32_t left_out = 0;
  for (const std::int64_t start : starts) {
    const std::int32_t first_day =
        start == INT64_MIN ? INT32_MIN
                           : days_.dayOf(std::chrono::system_clock::time_point(
                                 std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                     std::chrono::nanoseconds(start)))) - 1;
    for (const CallTotal& t : ledger_->callTotalsSince(start, first_day)) {
      if (!validIdText(t.project_id) || !validIdText(t.run_id) || !validIdText(t.model) || !validIdText(t.agent_id) ||
          !validTags(t.tags)) {
        continue;   // an old ledger's ids: no rule key can be named by them (the platform counts them)
      }
      ++rows;
      left_out += admin_->restoreRules({t.project_id, t.run_id, t.model, t.agent_id, t.tags, false}, start,
                                       t.cost_nano_usd, t.prompt_tokens, t.completion_tokens, t.calls);
    }
  }
  if (!starts.empty()) {
    log::info("rules_rebuilt", {{"windows", starts.size()}, {"ledger_groups", rows}, {"not_counted", left_out}});
  }
  if (left_out != 0) {
    log::error("rules_rebuild_incomplete",
               {{"groups", left_out}, {"why", "the rule table is full (raise region.rule_capacity)"}});
  }
}

void Agent::resyncStatsFromLedger() {
  // What a previous agent left in the ring goes to SQLite first; then the statistics are set
  // from SQLite, which makes them exact whatever that agent's last moments were.
  // Up to what the ring held at start, not "until empty": applications keep appending. (The
  // writer repaired the ring when it was made: a tail or slot words that cannot be right.)
  try {
    const std::uint64_t target = region_->header().ledger_tail.load();
    for (int rounds = 0; rounds < 1024 && writer_->head() < target && writer_->drainOnce().any(); ++rounds) {
    }
  } catch (const LedgerError& e) {
    throw AgentError(e.what());
  }
  RegionAdmin& a = *admin_;
  const std::int32_t day = a.day();
  a.clearStats();
  for (const LedgerTotal& t : ledger_->tenantTotals(day)) {
    a.setStats(LimitTable::kTenant, t.id, t.prompt_tokens, t.completion_tokens, t.calls);
  }
  // Every run's, not only the recently active: one in the region without its statistics would
  // look new to the ledger writer, which would add its earlier totals a second time.
  for (const LedgerTotal& r : ledger_->runTotals()) {
    a.setStats(LimitTable::kRun, r.id, r.prompt_tokens, r.completion_tokens, r.calls);
  }
  const LedgerTotal p = ledger_->platformTotal(day);
  a.setStats(LimitTable::kTenant, {}, p.prompt_tokens, p.completion_tokens, p.calls);
}

void Agent::applyConfig() {
  RegionAdmin& a = *admin_;
  a.setReservationTtl(config_.reservation_ttl_s * 1'000'000'000);
  if (Status s = a.setFallbackPrice(config_.fallback_price); !s.ok()) throw AgentError("prices: " + s.message());
  // Models that left the price table fall back to the fallback price.
  for (const std::string& model : a.models()) {
    if (!config_.prices.contains(model)) (void)a.setPrice(model, config_.fallback_price);
  }
  for (const auto& [model, price] : config_.prices) {
    if (Status s = a.setPrice(model, price); !s.ok()) throw AgentError("prices.models: " + s.message());
  }
  a.setDefaultLimit(LimitTable::kTenant, config_.tenant_default_daily_limit);
  a.setDefaultLimit(LimitTable::kRun, config_.run_default_limit);

  // Limits: the config file's, then the admin API's saved changes over them. An entry whose
  // explicit limit is no longer set either way goes back to the default. (The new limits are set
  // first, so no entry is ever briefly unlimited.)
  a.setPlatformLimit(config_.platform_daily_limit);
  std::set<std::pair<LimitTable, std::string>> explicit_ids;
  // A key with a limit that finds no table room does not stop start-up: it is logged, exported,
  // and the library refuses every key of that table without an entry (it may be this one).
  LeftOut left_out[2] = {{LimitTable::kTenant, region_->geometry().tenant_capacity},
                         {LimitTable::kRun, region_->geometry().run_capacity}};
  auto left = [&](LimitTable t) -> LeftOut& { return left_out[t == LimitTable::kTenant ? 0 : 1]; };
  for (auto [table, limits] : {std::pair{LimitTable::kTenant, &config_.tenant_limits},
                               std::pair{LimitTable::kRun, &config_.run_limits}}) {
    for (const auto& [id, limit] : *limits) {
      left(table).wanted();
      if (Status s = a.setLimit(table, id, limit); !s.ok()) {
        left(table).leftOut(id, limit.has_value());
        continue;
      }
      explicit_ids.emplace(table, id);
    }
  }
  const std::vector<LimitOverride> overrides = settings_->limitOverrides();
  const bool tenants_from_postgres = !config_.central.postgres_url.empty();
  for (const LimitOverride& o : overrides) {
    const Scope scope = o.scope == "platform" ? Scope::kPlatform : o.scope == "run" ? Scope::kRun : Scope::kTenant;
    if (scope == Scope::kTenant && tenants_from_postgres) {
      log::warn("limit_override_ignored", {{"scope", o.scope}, {"id", o.id},
                                           {"why", "tenant limits come from awooop_projects (central.postgres_url)"}});
      continue;
    }
    if (scope != Scope::kPlatform) left(tableOf(scope)).wanted();
    if (Status s = applyLimit(scope, o.id, limitOf(o)); !s.ok()) {
      if (scope != Scope::kPlatform) left(tableOf(scope)).leftOut(o.id, o.limit_nano_usd.has_value());
      // A saved change must not stop the agent: the config's limit stays in force for it.
      log::error("limit_override_skipped", {{"scope", o.scope}, {"id", o.id}, {"error", s.message()},
                                            {"fix", "tokenfuse limit reset, or delete it from limit_override in " +
                                                        ledgerPath()}});
      continue;
    }
    if (scope != Scope::kPlatform) explicit_ids.emplace(tableOf(scope), o.id);
  }
  for (const LimitTable table : {LimitTable::kTenant, LimitTable::kRun}) {
    if (table == LimitTable::kTenant && tenants_from_postgres) continue;   // the central link keeps them
    std::vector<std::string> stale;
    a.forEachExplicit(table, [&](std::string_view id, std::optional<NanoUsd>) {
      if (!explicit_ids.contains({table, std::string(id)})) stale.emplace_back(id);
    });
    for (const std::string& id : stale) (void)a.clearLimit(table, id);
  }
  for (const LimitTable table : {LimitTable::kTenant, LimitTable::kRun}) {
    const LeftOut& l = left(table);
    l.log("config");
    a.setLimitedUntracked(table, static_cast<std::uint32_t>(std::min<std::uint64_t>(l.limited(), UINT32_MAX)));
    capacity_.left_out[table == LimitTable::kTenant ? 0 : 1].store(l.count());
  }

  // The kill switch: the admin API's, while it lasts; else the config file's.
  const std::int64_t now = toUnixNs(clock_());
  applyRules(now);
  const std::optional<StoredKill> saved = settings_->storedKill();
  if (saved && saved->active && (saved->expires_unix_ns == 0 || saved->expires_unix_ns > now)) {
    a.setKill(saved->reason, saved->since_unix_ns, saved->expires_unix_ns);
    log::warn("budget_emergency_kill_active", {{"reason", saved->reason}, {"source", "admin_api"}});
  } else if (config_.kill_active) {
    a.setKill(config_.kill_reason.empty() ? "activated" : config_.kill_reason, now, 0);
    log::warn("budget_emergency_kill_activated", {{"reason", config_.kill_reason}, {"source", "config"}});
  } else {
    a.clearKill();
  }
  log::info("config_applied",
            {{"platform_daily_limit_usd", usdOrUnlimited(a.engine().platform().limit)},
             {"tenant_default_daily_limit_usd", usdOrUnlimited(config_.tenant_default_daily_limit)},
             {"run_default_limit_usd", usdOrUnlimited(config_.run_default_limit)},
             {"tenant_limits", config_.tenant_limits.size()},
             {"run_limits", config_.run_limits.size()},
             {"admin_limit_overrides", overrides.size()},
             {"models", config_.prices.size()},
             {"timezone", days_.zone()}});
}

void Agent::applyRules(std::int64_t now_ns) {
  std::lock_guard settings(settings_mu_);
  rule_overrides_.clear();
  std::size_t admin_rules = 0;
  for (const RuleOverride& o : settings_->ruleOverrides()) {
    // A saved change that no longer reads (a newer agent's, or edited by hand) must not stop the
    // agent: it is logged, and the config file's rule of that name stays in force.
    std::optional<RuleSpec> rule;
    try {
      if (o.spec_json) rule = ruleFromJson(o.name, nlohmann::json::parse(*o.spec_json));
    } catch (const std::exception& e) {
      log::error("rule_override_skipped", {{"rule", o.name}, {"error", e.what()},
                                           {"fix", "tokenfuse rules reset " + o.name + ", or set it again"}});
      continue;
    }
    auto next = rule_overrides_;
    next[o.name] = std::move(rule);
    if (mergedRules(next).size() > kMaxRules) {
      log::error("rule_override_skipped", {{"rule", o.name}, {"error", "more than " + std::to_string(kMaxRules) + " rules"},
                                           {"fix", "remove a rule, or tokenfuse rules reset " + o.name}});
      continue;
    }
    rule_overrides_ = std::move(next);
    ++admin_rules;
  }
  std::lock_guard lock(rules_mu_);
  bool applied = false;
  if (Status s = installRules(mergedRules(rule_overrides_), now_ns, &applied); !s.ok()) {
    // Too many keys for the table, or no definition free (a region full of retired rules):
    // logged, never fatal; the rules that could not count a key refuse it.
    log::error("rules_not_all_applied", {{"error", s.message()}});
  }
  log::info("rules_applied", {{"rules", rules_.size()}, {"admin_api_changes", admin_rules}});
}

std::vector<RuleSpec> Agent::mergedRules(
    const std::map<std::string, std::optional<RuleSpec>, std::less<>>& overrides) const {
  std::vector<RuleSpec> out;
  for (const RuleSpec& r : config_.rules) {
    const auto it = overrides.find(r.name);
    if (it == overrides.end()) {
      out.push_back(r);
    } else if (it->second) {
      out.push_back(*it->second);
    }
  }
  for (const auto& [name, rule] : overrides) {
    if (rule && !inConfig(name)) out.push_back(*rule);
  }
  return out;
}

Status Agent::installRules(std::vector<RuleSpec> rules, std::int64_t now_ns, bool* applied) {
  std::vector<WindowSpan> spans;
  for (const RuleSpec& r : rules) spans.push_back(windows_.at(r.window, now_ns));
  std::vector<std::uint32_t> index;
  Status s = admin_->setRules(rules, spans, &index);
  *applied = index.size() == rules.size();   // else setRules changed nothing
  if (*applied) {
    rules_ = std::move(rules);
    rule_index_ = std::move(index);
    // Other hosts' counts stay only on rules the fleet still shares; a sliding rule's `elsewhere`
    // is its carry (slideRules).
    std::bitset<shm::kMaxRules> keep;
    for (std::size_t i = 0; i < rules_.size(); ++i) {
      if ((!config_.central.redis_url.empty() && sharedWithFleet(rules_[i])) || rules_[i].sliding) keep.set(rule_index_[i]);
    }
    admin_->clearRuleElsewhere(keep);
  }
  return s;
}

bool Agent::inConfig(std::string_view name) const {
  return std::ranges::any_of(config_.rules, [&](const RuleSpec& r) { return r.name == name; });
}

bool Agent::inForce(const std::string& name) const {
  return std::ranges::any_of(mergedRules(rule_overrides_), [&](const RuleSpec& r) { return r.name == name; });
}

Status Agent::putRule(const RuleSpec& rule, std::string* warning) {
  std::lock_guard settings(settings_mu_);
  auto next = rule_overrides_;
  next[rule.name] = rule;
  std::vector<RuleSpec> merged = mergedRules(next);
  checkRuleCount(merged);
  {
    std::lock_guard lock(rules_mu_);
    bool applied = false;
    if (Status s = installRules(std::move(merged), toUnixNs(clock_()), &applied); !s.ok()) {
      if (!applied) return s;   // refused: nothing changed
      *warning = s.message();
      log::error("rules_not_all_applied", {{"rule", rule.name}, {"error", s.message()}});
    }
  }
  rule_overrides_ = std::move(next);
  saveRule(rule.name, ruleToJson(rule).dump());
  log::info("rule_set", {{"rule", rule.name}, {"spec", ruleToJson(rule)}});
  return {};
}

Status Agent::removeRule(const std::string& name) {
  std::lock_guard settings(settings_mu_);
  const bool in_config = inConfig(name);
  auto next = rule_overrides_;
  if (in_config) {
    next[name] = std::nullopt;
  } else {
    next.erase(name);
  }
  if (!inForce(name)) return Status::error("no rule named \"" + name + "\" is in force");
  {
    std::lock_guard lock(rules_mu_);
    bool applied = false;
    if (Status s = installRules(mergedRules(next), toUnixNs(clock_()), &applied); !s.ok()) {
      if (!applied) return s;
      log::error("rules_not_all_applied", {{"error", s.message()}});
    }
  }
  rule_overrides_ = std::move(next);
  if (in_config) {
    saveRule(name, std::nullopt);
  } else {
    try {
      settings_->eraseRule(name);
    } catch (const LedgerError& e) {
      log::error("rule_not_saved", {{"rule", name}, {"error", e.what()}});
      throw NotSavedError(std::string("the rule is out of force but that could not be saved, so a restart would bring "
                                      "it back: ") + e.what());
    }
  }
  log::info("rule_removed", {{"rule", name}, {"from_config", in_config}});
  return {};
}

Status Agent::resetRule(const std::string& name) {
  std::lock_guard settings(settings_mu_);
  auto next = rule_overrides_;
  const bool in_force = next.erase(name) > 0;
  // The config file's rule back beside the admin API's may be one too many: refused first.
  if (in_force) checkRuleCount(mergedRules(next));
  // A saved change that did not read at start (rule_override_skipped) is in the file only.
  if (!settings_->eraseRule(name) && !in_force) {   // throws LedgerError: nothing changed
    return Status::error("the admin API has not changed a rule named \"" + name + "\"");
  }
  rule_overrides_ = std::move(next);
  if (in_force) {
    std::lock_guard lock(rules_mu_);
    bool applied = false;
    if (Status s = installRules(mergedRules(rule_overrides_), toUnixNs(clock_()), &applied); !s.ok()) {
      log::error("rules_not_all_applied", {{"error", s.message()}});
    }
  }
  log::info("rule_reset", {{"rule", name}});
  return {};
}

void Agent::checkRuleCount(const std::vector<RuleSpec>& rules) {
  if (rules.size() <= kMaxRules) return;
  throw RuleConflictError("at most " + std::to_string(kMaxRules) +
                          " rules may be in force (config file and admin API together): remove one first");
}

void Agent::saveRule(const std::string& name, std::optional<std::string> spec_json) {
  try {
    settings_->saveRule({name, std::move(spec_json), toUnixNs(clock_())});
  } catch (const LedgerError& e) {
    // In force but not saved: say so, rather than let a restart undo it silently.
    log::error("rule_not_saved", {{"rule", name}, {"error", e.what()}});
    throw NotSavedError(std::string("the rule change is in force but could not be saved, so a restart would undo it: ") +
                        e.what());
  }
}

Agent::RuleSources Agent::ruleSources() {
  RuleSources out;
  std::lock_guard settings(settings_mu_);
  for (const RuleSpec& r : mergedRules(rule_overrides_)) {
    out.of[r.name] = rule_overrides_.contains(r.name) ? "admin_api" : "config";
  }
  for (const auto& [name, rule] : rule_overrides_) {
    if (!rule) out.removed.push_back(name);
  }
  return out;
}

void Agent::rollRules(std::int64_t now_ns) {
  RegionAdmin& a = *admin_;
  if (const std::int32_t day = a.day(); day != day_end_for_) {
    a.setDayEnd(toUnixNs(days_.startOf(day + 1)));
    day_end_for_ = day;
  }
  const shm::Header& h = a.header();
  std::lock_guard lock(rules_mu_);
  for (std::size_t i = 0; i < rule_index_.size() && i < rules_.size(); ++i) {
    const RuleSpec& r = rules_[i];
    if (r.window.kind == WindowKind::kAllTime) continue;
    const shm::RuleDef& d = h.rules[rule_index_[i]];
    // Only forward: a clock stepped back is still in a window that began later, whose count must
    // not be wiped again (docs/rules.md, "Not yet": the window it left early is not rebuilt).
    if (now_ns < d.window_end_ns.load(std::memory_order_relaxed)) continue;
    const WindowSpan w = windows_.at(r.window, now_ns);
    a.rollRule(rule_index_[i], w.start_ns, w.end_ns, r.sliding);
    log::info("rule_window_rollover", {{"rule", r.name}, {"window", windowName(r.window.kind)},
                                       {"start_unix_ns", w.start_ns}, {"end_unix_ns", w.end_ns}});
  }
  // Sliding rules: what their counters carry from the previous window, once a second. Between
  // two updates it is the larger share of the two moments: never looser than exact.
  if (now_ns - last_slide_ns_ >= kSlideIntervalNs || now_ns < last_slide_ns_) {
    std::bitset<shm::kMaxRules> sliding;
    bool rates = false;   // counters of a rule that stopped sliding may still carry something
    for (std::size_t i = 0; i < rule_index_.size() && i < rules_.size(); ++i) {
      rates = rates || isRate(rules_[i].window.kind);
      if (rules_[i].sliding) sliding.set(rule_index_[i]);
    }
    if (rates) a.slideRules(sliding, now_ns);
    last_slide_ns_ = now_ns;
  }
}

void Agent::tick() {
  if (regionDamaged()) return;
  // Any group member can truncate, remove or replace the region's file. A truncated mapping
  // reads zeros (Region's SIGBUS handler); the reaper must not act on those, and nothing that
  // apps write there can reach SQLite. Stop using it: run() returns and the agent exits, so
  // that the next start makes a new region and rebuilds its counters from SQLite.
  if (const std::string damage = region_->damage(); !damage.empty()) {
    log::error("region_damaged", {{"shm_name", config_.shm_name},
                                  {"seen", damage},
                                  {"action", "stopping; the next start replaces the region and rebuilds its "
                                             "counters from the ledger"},
                                  {"exit_code", kExitRegionDamaged}});
    region_damaged_.store(true, std::memory_order_release);
    return;
  }
  const auto now = clock_();
  const std::int64_t ns = toUnixNs(now);
  RegionAdmin& a = *admin_;
  a.setClock(ns);
  if (a.expireKill(ns)) {
    log::info("budget_emergency_kill_expired");
    alerter_->killChanged(false, "expired", "expiry");
  }

  untracked_.tick(a.header(), ns);

  const ReapStats r = a.reap(ns);
  if (r.corrupt > 0) {
    log::error("region_corrupt_reservation",
               {{"slots", r.corrupt},
                {"seen", "a reservation slot names a tenant or run index out of range: the region was written "
                         "from outside; its holds went back to the layers that exist and the slot was freed"}});
  }
  if (r.any()) {
    log::warn("reservations_reaped", {{"dead_owner", r.dead_owner},
                                      {"expired", r.expired},
                                      {"recycled_expired", r.freed_expired},
                                      {"stuck_keys_cleared", r.stuck_keys}});
  }
  // A hold left by a client killed half-way through an operation (the reaper cannot tell which
  // layers it had changed) would stay for ever (rollover keeps holds; runs never roll over):
  // compare with the live reservations.
  for (const HoldCorrection& c : a.reconcileHolds()) {
    log::warn("holds_reconciled", {{"layer", c.layer}, {"id", c.id}, {"difference_nano_usd", c.difference}});
  }

  const std::int32_t today = days_.dayOf(now);
  const std::int32_t current = a.day();
  if (today > current) {
    a.rollover(today);
    latest_day_.store(std::max(latest_day_.load(std::memory_order_relaxed), today), std::memory_order_relaxed);
    log::info("budget_day_rollover",
              {{"day", DayClock::format(today)}, {"previous", DayClock::format(current)}, {"timezone", days_.zone()}});
    warned_clock_behind_ = false;
    behind_since_ns_ = kNotBehind;
  } else if (today < current) {
    // The clock was stepped back after a step forward rolled the day over too early (a clock
    // simply behind at start is the same case). Waiting for the clock would freeze daily budgets
    // until that future date; once the clock has stayed behind for a while, the day goes back.
    if (behind_since_ns_ == kNotBehind || ns < behind_since_ns_) behind_since_ns_ = ns;
    if (!warned_clock_behind_) {
      log::warn("clock_behind_budget_day", {{"clock_day", DayClock::format(today)},
                                            {"budget_day", DayClock::format(current)},
                                            {"correct_after_s", kClockBehindGraceNs / 1'000'000'000}});
      warned_clock_behind_ = true;
    }
    if (ns - behind_since_ns_ >= kClockBehindGraceNs && backdateDay(today)) {
      warned_clock_behind_ = false;
      behind_since_ns_ = kNotBehind;
    }
  } else {
    behind_since_ns_ = kNotBehind;
  }
  rollRules(ns);
  reclaimKeys(ns);
  try {
    alerter_->scan();
  } catch (const std::exception& e) {   // an alert is never worth stopping the tick
    log::error("alert_scan_failed", {{"error", e.what()}});
  }
}

std::int64_t Agent::runsActiveSince() const {
  return shm::wrapSub(toUnixNs(clock_()), config_.run_idle_lifetime_s * 1'000'000'000);
}

void Agent::reclaimKeys(std::int64_t now_ns) {
  // After the rollovers above, so that a day or window that just ended frees its keys.
  const std::int64_t interval = config_.reclaim_interval_s * 1'000'000'000;
  if (now_ns >= last_reclaim_ns_ && now_ns - last_reclaim_ns_ < interval) return;
  last_reclaim_ns_ = now_ns;
  const ReclaimStats r = admin_->reclaimKeys(now_ns, config_.run_idle_lifetime_s * 1'000'000'000);
  if (r.total() > 0) {
    log::info("keys_reclaimed", {{"tenants", r.tenants}, {"runs", r.runs}, {"rule_counters", r.rule_counters},
                                 {"kept_in_use", r.kept}});
  }
}

void Agent::drainLedger() {
  while (writer_->drainOnce().any()) {
  }
}

std::int64_t Agent::budgetDayStartNs() const { return toUnixNs(days_.startOf(admin_->day())); }

PruneReport Agent::pruneLedger(const std::stop_token& stop) {
  std::lock_guard lock(prune_mu_);
  // A clock stepped forward (a VM resumed with a wrong clock, a bad time source) must not make
  // today's entries look months old: retention's time runs at most twice as fast as the
  // monotonic clock between passes. (The first pass after a start takes the clock as it is.)
  const std::int64_t steady = steady_();
  std::int64_t now = toUnixNs(clock_());
  if (prune_now_ns_ != INT64_MIN) {
    now = std::min(now, prune_now_ns_ + 2 * std::max<std::int64_t>(0, steady - prune_steady_ns_) +
                            std::int64_t{60} * 1'000'000'000);
  }
  prune_now_ns_ = now;
  prune_steady_ns_ = steady;
  Ledger& l = *pruner_ledger_;
  // Entries the central link has not pushed stay: the lower of its two positions in use, as it
  // was a pass ago.
  std::uint64_t pushed = UINT64_MAX;
  if (central_) {
    std::uint64_t seen = UINT64_MAX;
    if (central_->hasRedis()) seen = std::min(seen, static_cast<std::uint64_t>(l.metaInt("central_redis_seq")));
    if (central_->hasPostgres()) seen = std::min(seen, static_cast<std::uint64_t>(l.metaInt("central_postgres_seq")));
    pushed = std::min(seen, pushed_before_);
    pushed_before_ = seen;
  }
  const RetentionPolicy policy{config_.ledger_retain_days, config_.ledger_max_size_mb * 1024 * 1024};
  const RetentionBounds bounds = retentionBounds(policy, windows_, days_, now, pushed);
  // For `tokenfuse ledger archive`, which runs without the config: what it must keep.
  l.setMetaInt("retention_keep_since_ns", bounds.keep_since_ns);
  l.setMetaInt("retention_pushed_seq", static_cast<std::int64_t>(std::min<std::uint64_t>(pushed, INT64_MAX)));
  const PruneReport r = Pruner(l, policy).pass(bounds, stop);

  LedgerHealth& h = ledgerHealth();
  h.rows = r.rows;
  std::error_code ec;
  std::int64_t bytes = 0;
  for (const char* suffix : {"", "-wal"}) {
    const auto n = std::filesystem::file_size(ledgerPath() + suffix, ec);
    if (!ec) bytes += static_cast<std::int64_t>(n);
  }
  h.file_bytes = bytes;
  h.used_bytes = r.size.usedBytes();
  h.oldest_unix_ns = r.oldest_unix_ns.value_or(0);
  h.last_prune_unix_ns = now;
  h.pruned += static_cast<std::uint64_t>(r.removed());
  h.over_ceiling = r.over_ceiling ? 1 : 0;
  if (r.removed() != 0 || r.pages_returned != 0) {
    log::info("ledger_pruned", {{"removed_for_age", r.removed_for_age},
                                {"removed_for_size", r.removed_for_size},
                                {"pages_returned", r.pages_returned},
                                {"rows", r.rows},
                                {"oldest", r.oldest_unix_ns ? isoTime(*r.oldest_unix_ns) : std::string("none")}});
  }
  const bool warn_again = now - disk_warned_ns_ >= std::int64_t{3600} * 1'000'000'000;
  if (r.over_ceiling && warn_again) {
    log::warn("ledger_over_ceiling",
              {{"used_bytes", r.size.usedBytes()},
               {"max_size_mb", config_.ledger_max_size_mb},
               {"why", "the rest is this month's and the last 7 days' entries (rule windows) or not yet pushed to "
                       "the central link"}});
  }
  struct statvfs fs{};
  if (::statvfs(config_.data_dir.c_str(), &fs) == 0 && fs.f_blocks > 0) {
    const auto free_bytes = static_cast<std::int64_t>(fs.f_bavail) * static_cast<std::int64_t>(fs.f_frsize);
    const auto size_bytes = static_cast<std::int64_t>(fs.f_blocks) * static_cast<std::int64_t>(fs.f_frsize);
    h.disk_free_bytes = free_bytes;
    h.disk_size_bytes = size_bytes;
    const bool low = free_bytes * 100 < size_bytes * config_.ledger_disk_warn_percent;
    h.disk_low = low ? 1 : 0;
    if (low && warn_again) {
      log::warn("ledger_disk_low",
                {{"data_dir", config_.data_dir},
                 {"free_bytes", free_bytes},
                 {"free_percent", static_cast<double>(free_bytes) * 100.0 / static_cast<double>(size_bytes)},
                 {"ledger_bytes", bytes},
                 {"why", "when the disk is full, every commit and record is refused"},
                 {"fix", "free space, lower [ledger] retain_days or set max_size_mb, or archive old entries "
                         "(tokenfuse ledger archive)"}});
    }
    if ((low || r.over_ceiling) && warn_again) disk_warned_ns_ = now;
  }
  return r;
}

bool Agent::drainLedgerTo(std::uint64_t target) {
  Engine& e = admin_->engine();
  if (!writer_running_.load()) {   // no writer thread (tests drive tick() alone): drain here
    try {
      while (e.durableLedgerSeq() < target && writer_->drainOnce().any()) {
      }
    } catch (const LedgerError& ex) {
      log::error("budget_day_not_corrected", {{"error", ex.what()}});
    }
    return e.durableLedgerSeq() >= target;
  }
  // The writer flushes every few milliseconds; a slot a stalled client has not finished holds it
  // up, and then the next tick tries again rather than stall the tick loop.
  for (int i = 0; i < 200 && e.durableLedgerSeq() < target; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return e.durableLedgerSeq() >= target;
}

bool Agent::backdateDay(std::int32_t today) {
  RegionAdmin& a = *admin_;
  const std::int32_t current = a.day();
  // Everything booked under today's date and under the future dates the early rollover started
  // happened today in reality (as far as this host can tell: the ledger's times came from the
  // same wrong clock); the rollovers zeroed it in the region. The ledger has it all. So each
  // daily layer becomes what the ledger holds from today on, up to entry `target`, plus what
  // the region booked after that: committed += ledger - (region's committed when `target` was
  // taken). The region's committed is read first, so a commit in between counts twice (for
  // microseconds, and on the side of refusing) rather than not at all.
  const std::vector<std::pair<std::string, std::int64_t>> before = a.dailyCommitted();
  const std::uint64_t target = a.header().ledger_tail.load(std::memory_order_acquire);
  if (!drainLedgerTo(target)) return false;
  std::vector<LedgerTotal> totals;
  try {
    std::lock_guard lock(settings_mu_);
    totals = settings_->tenantTotalsFrom(today, target);
  } catch (const LedgerError& e) {
    log::error("budget_day_not_corrected", {{"error", e.what()}});
    return false;
  }
  std::map<std::string, std::int64_t> delta;
  LedgerTotal platform;
  for (const auto& [id, committed] : before) delta[id] -= committed;
  for (const LedgerTotal& t : totals) {
    if (validIdText(t.id)) delta[t.id] += t.cost_nano_usd;   // an old ledger's bad id: the platform only
    platform.cost_nano_usd += t.cost_nano_usd;
    platform.prompt_tokens += t.prompt_tokens;
    platform.completion_tokens += t.completion_tokens;
    platform.calls += t.calls;
  }
  delta[std::string()] += platform.cost_nano_usd;
  if (Status s = a.backdate(today, {delta.begin(), delta.end()}); !s.ok()) {
    log::error("budget_day_not_corrected", {{"error", s.message()}});
    if (a.day() != today) return false;
  }
  // Token and call statistics: from the same totals.
  for (const auto& [id, committed] : before) {
    if (!id.empty()) a.setStats(LimitTable::kTenant, id, 0, 0, 0);
  }
  for (const LedgerTotal& t : totals) a.setStats(LimitTable::kTenant, t.id, t.prompt_tokens, t.completion_tokens, t.calls);
  a.setStats(LimitTable::kTenant, {}, platform.prompt_tokens, platform.completion_tokens, platform.calls);
  log::warn("budget_day_corrected", {{"day", DayClock::format(today)},
                                     {"was", DayClock::format(current)},
                                     {"platform_committed_usd", NanoUsd(a.engine().platform().committed).toString()},
                                     {"tenants", totals.size()},
                                     {"why", "the clock was stepped back after a step forward rolled the day over"}});
  return true;
}

void Agent::run(std::stop_token stop) {
  writer_running_ = true;
  struct WriterStopped {   // destroyed after the writer thread below is joined
    std::atomic<bool>& running;
    ~WriterStopped() { running = false; }
  } writer_stopped{writer_running_};
  std::jthread writer([this](std::stop_token s) { writer_->run(s); });
  std::jthread central;
  if (central_) central = std::jthread([this](std::stop_token s) { central_->run(s); });
  std::jthread alerts([this](std::stop_token s) { alerter_->run(s); });
  std::jthread pruner([this](std::stop_token s) {
    std::mutex m;
    std::condition_variable_any wake;
    while (!s.stop_requested()) {
      try {
        (void)pruneLedger(s);
      } catch (const std::exception& e) {   // a bad file or meta value: the next pass tries again
        log::error("ledger_prune_failed", {{"error", e.what()}});
      }
      std::unique_lock lock(m);
      wake.wait_for(lock, s, std::chrono::seconds(config_.ledger_prune_interval_s), [] { return false; });
    }
  });
  std::mutex mu;
  std::condition_variable_any cv;
  const auto period = std::chrono::milliseconds(config_.tick_ms);
  while (!stop.stop_requested() && !regionDamaged()) {
    tick();
    std::unique_lock lock(mu);
    cv.wait_for(lock, stop, period, [] { return false; });
  }
}

LimitTable Agent::tableOf(Scope scope) { return scope == Scope::kRun ? LimitTable::kRun : LimitTable::kTenant; }

std::optional<std::optional<NanoUsd>> Agent::configuredLimit(Scope scope, const std::string& id) const {
  if (scope == Scope::kPlatform) return config_.platform_daily_limit;
  const auto& limits = scope == Scope::kTenant ? config_.tenant_limits : config_.run_limits;
  const auto it = limits.find(id);
  if (it == limits.end()) return std::nullopt;
  return it->second;
}

Status Agent::applyLimit(Scope scope, const std::string& id, std::optional<std::optional<NanoUsd>> limit) {
  RegionAdmin& a = *admin_;
  if (scope == Scope::kPlatform) {
    a.setPlatformLimit(limit.value_or(config_.platform_daily_limit));
    return {};
  }
  return limit ? a.setLimit(tableOf(scope), id, *limit) : a.clearLimit(tableOf(scope), id);
}

Status Agent::setLimit(Scope scope, const std::string& id, std::optional<NanoUsd> limit) {
  std::lock_guard lock(settings_mu_);
  if (scope == Scope::kTenant && central_ && central_->hasPostgres()) {
    // The fleet's source of tenant limits: Postgres first (throws LinkError), then here at once.
    if (Status s = admin_->setLimit(LimitTable::kTenant, id, admin_->engine().tenant(id).limit); !s.ok()) return s;
    central_->writeTenantLimit(id, limit);
    (void)applyLimit(scope, id, limit);
    log::info("budget_limit_set", {{"scope", "tenant"}, {"id", id}, {"limit_usd", usdOrUnlimited(limit)},
                                   {"saved_in", "awooop_projects"}});
    return {};
  }
  // Into the region first: it checks the id and has room, or nothing is saved.
  if (Status s = applyLimit(scope, id, limit); !s.ok()) return s;
  try {
    settings_->saveLimit({scopeName(scope), id, limit ? std::optional(limit->count()) : std::nullopt,
                          toUnixNs(clock_())});
  } catch (const LedgerError& e) {
    // Applied but not saved: say so, rather than let a restart undo it silently.
    log::error("limit_not_saved", {{"scope", scopeName(scope)}, {"id", id}, {"error", e.what()}});
    throw NotSavedError(std::string("the limit is in force but could not be saved, so a restart would undo it: ") +
                        e.what());
  }
  log::info("budget_limit_set", {{"scope", scopeName(scope)}, {"id", id}, {"limit_usd", usdOrUnlimited(limit)}});
  return {};
}

Status Agent::resetLimit(Scope scope, const std::string& id) {
  std::lock_guard lock(settings_mu_);
  if (scope == Scope::kTenant && central_ && central_->hasPostgres()) {
    return Status::error("tenant limits come from awooop_projects.budget_limit_usd: set one (limit set) or make it "
                         "unlimited (limit clear)");
  }
  settings_->eraseLimit(scopeName(scope), id);   // throws LedgerError: nothing changed
  const auto limit = configuredLimit(scope, id);
  if (Status s = applyLimit(scope, id, limit); !s.ok()) return s;
  log::info("budget_limit_reset", {{"scope", scopeName(scope)}, {"id", id},
                                   {"limit_usd", limit ? usdOrUnlimited(*limit) : "the default"}});
  return {};
}

void Agent::setKill(const std::string& reason, std::int64_t ttl_s) {
  std::lock_guard lock(settings_mu_);
  const std::int64_t now = toUnixNs(clock_());
  const StoredKill k{true, reason, now, ttl_s == 0 ? 0 : now + ttl_s * 1'000'000'000, !fleetKill()};
  admin_->setKill(k.reason, k.since_unix_ns, k.expires_unix_ns);   // first: it must not wait for a disk
  alerter_->killChanged(true, reason, "admin_api");
  if (fleetKill()) central_->publishKill(true, reason, ttl_s);   // to every host, now or once Redis is back
  try {
    settings_->saveKill(k);
  } catch (const LedgerError& e) {
    log::error("kill_switch_not_saved", {{"error", e.what()}});
    throw NotSavedError(std::string("the kill switch is on but could not be saved, so a restart would undo it: ") +
                        e.what());
  }
}

void Agent::clearKill() {
  std::lock_guard lock(settings_mu_);
  // As setKill: into the region first, so that an operator can turn it off with the disk full
  // (a kill switch that can be turned on but not off is an outage), then saved.
  admin_->clearKill();
  alerter_->killChanged(false, {}, "admin_api");
  if (fleetKill()) central_->publishKill(false, {}, 0);
  try {
    settings_->saveKill({false, {}, toUnixNs(clock_()), 0, !fleetKill()});
  } catch (const LedgerError& e) {
    log::error("kill_switch_not_saved", {{"error", e.what()}, {"active", false}});
    throw NotSavedError(std::string("the kill switch is off but could not be saved, so a restart would turn it on "
                                    "again: ") + e.what());
  }
}

void Agent::applyFleetKill(bool active, const std::string& reason, std::int64_t expires_unix_ns) {
  std::lock_guard lock(settings_mu_);
  if (!active && config_.kill_active) return;   // this host's config file keeps it on
  if (central_->killPublishPending()) return;    // this host's own change is on its way to the fleet
  const std::int64_t now = toUnixNs(clock_());
  if (active) {
    admin_->setKill(reason, now, expires_unix_ns);
  } else {
    admin_->clearKill();
  }
  alerter_->killChanged(active, reason, "fleet");
  try {
    settings_->saveKill({active, reason, now, expires_unix_ns, true});
  } catch (const LedgerError& e) {
    log::error("kill_switch_not_saved", {{"error", e.what()}, {"source", "fleet"}});
  }
}

}  // namespace tokenfuse
