// tokenfused's core, without main(): takes ownership of the region (creating it, or adopting the
// one a previous agent left, so that clients never lose their counters across an agent restart),
// applies the configuration, and runs the maintenance loop: heartbeat clock, kill-switch
// expiry, the reaper, and the budget-day rollover.
//
// Thread-safety: construct and destroy on one thread; tick() and run() on one thread at a time.
#pragma once

#include "alerts.h"
#include "capacity.h"
#include "central.h"
#include "calendar_window.h"
#include "config.h"
#include "day_clock.h"
#include "ledger.h"
#include "ledger_file.h"
#include "ledger_writer.h"

#include "region_admin.h"
#include "region.h"
#include "retention.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

namespace tokenfuse {

class AgentError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A config value, or what it names on this host (the data dir, the time zone), is unusable: a
// restart cannot fix it, so tokenfused exits 2, which systemd does not restart.
class AgentConfigError : public AgentError {
 public:
  using AgentError::AgentError;
};

// A rule change refused because it conflicts with the rules in force (too many of them).
class RuleConflictError : public AgentError {
 public:
  using AgentError::AgentError;
};

// An admin change is in force, but saving it failed, so a restart would undo it.
class NotSavedError : public AgentError {
 public:
  using AgentError::AgentError;
};

class Agent {
 public:
  using Clock = std::function<std::chrono::system_clock::time_point()>;
  struct Options {
    bool recreate_region = false;   // replace an incompatible region instead of refusing
    Clock clock;                    // empty: the system clock (tests inject their own)
    // Monotonic ns, for what must not follow a wall clock's steps (retention). Empty: the steady
    // clock, or, when `clock` is injected, that clock (tests that move time move both).
    std::function<std::int64_t()> steady = {};
  };

  // Throws AgentError with a message that says what to do.
  Agent(Config config, Options options);
  ~Agent();

  // One maintenance step at clock() time.
  void tick();
  // Ticks every config.tick_ms, and writes the ledger from another thread, until `stop` is
  // requested; then writes what is left in the ring.
  void run(std::stop_token stop);


  // Set by tick() once the region's file was truncated, removed or replaced under this agent: it
  // stops using the region and run() returns; tokenfused then exits with kExitRegionDamaged so
  // that systemd restarts it, and the next start makes a new region from the SQLite ledger.
  bool regionDamaged() const noexcept { return region_damaged_.load(std::memory_order_acquire); }
  static constexpr int kExitRegionDamaged = 3;

  // Writes what the ring holds to SQLite now, as run()'s writer thread would (tests that drive
  // tick() themselves). Throws LedgerError.
  void drainLedger();
  // One retention pass at clock() time (retention.h), as run()'s pruning thread makes every
  // ledger.prune_interval_s; also checks the disk. Thread-safe against the writer and the API.
  // Throws LedgerError.
  PruneReport pruneLedger(const std::stop_token& stop = {});

  RegionAdmin& admin() noexcept { return *admin_; }
  bool adoptedRegion() const noexcept { return adopted_; }
  const Config& config() const noexcept { return config_; }
  CentralLink* central() noexcept { return central_.get(); }   // nullptr: alone
  const Alerter& alerter() const noexcept { return *alerter_; }
  const CapacityStats& capacityStats() const noexcept { return capacity_; }
  std::string ledgerPath() const { return config_.data_dir + "/ledger.db"; }
  // When the region's budget day began (unix ns, in the agent's zone).
  std::int64_t budgetDayStartNs() const;

  // Changes made through the admin API. Each is applied to the region and saved in the data
  // dir, so that it outlives a restart of the agent and of the host, and wins over the config
  // file (docs/operations.md, "Where limits come from"). Thread-safe. A bad id or a full table
  // is a Status error, and nothing changes; LedgerError: saving failed first, nothing changed;
  // NotSavedError: in force, but not saved.
  enum class Scope { kTenant, kRun, kPlatform };
  Status setLimit(Scope scope, const std::string& id, std::optional<NanoUsd> limit);
  // Forgets the admin API's limit: the config file's (or the default) applies again.
  Status resetLimit(Scope scope, const std::string& id);
  // Budget rules through the admin API, saved as limits are: a rule put here replaces the config
  // file's rule of its name (or adds one), removeRule takes a rule out of force (the config
  // file's too), resetRule forgets the admin API's change so that the config file's rule (if any)
  // applies again. No such rule: a Status error. RuleConflictError: more than kMaxRules rules
  // would be in force. Either way nothing changes. *warning is set when the rule is in force
  // but some of its keys found no counter room. NotSavedError: in force, not saved; resetRule's
  // LedgerError: saving failed first, nothing changed.
  Status putRule(const RuleSpec& rule, std::string* warning);
  Status removeRule(const std::string& name);
  Status resetRule(const std::string& name);
  // Where each rule in force comes from ("config" or "admin_api"), and the config file's rules
  // that the admin API removed.
  struct RuleSources {
    std::map<std::string, std::string, std::less<>> of;
    std::vector<std::string> removed;
  };
  RuleSources ruleSources();

  // ttl_s 0: until turned off. Both apply to the region first, then save (NotSavedError: in
  // force, but not saved), so the kill switch turns off with the disk full as it turns on.
  void setKill(const std::string& reason, std::int64_t ttl_s);
  void clearKill();

 private:
  void openRegion(bool recreate);
  void applyConfig();
  static LimitTable tableOf(Scope scope);
  // The config file's limit for `id`: nullopt when it names none (the default applies).
  std::optional<std::optional<NanoUsd>> configuredLimit(Scope scope, const std::string& id) const;
  // Whether the kill switch is the fleet's (a central Redis).
  bool fleetKill() const noexcept { return central_ != nullptr && central_->hasRedis(); }
  // The kill switch as the fleet has it (the central link).
  void applyFleetKill(bool active, const std::string& reason, std::int64_t expires_unix_ns);
  // `limit` nullopt: back to the default.
  Status applyLimit(Scope scope, const std::string& id, std::optional<std::optional<NanoUsd>> limit);
  void lockDataDir();
  void rebuildFromLedger(std::int32_t today);
  // The clock's day is behind the region's budget day: after kClockBehindGraceNs of that, the
  // budget day goes back to `today`, with its spending rebuilt from the ledger. Returns whether.
  bool backdateDay(std::int32_t today);
  // Waits (briefly) until the ledger writer has made every entry before `target` durable.
  bool drainLedgerTo(std::uint64_t target);
  void resyncStatsFromLedger();
  // A new region's rule counters, from the ledger.
  void rebuildRulesFromLedger();
  // Puts the config's [[rules]], with the admin API's saved changes over them, in the region
  // (start-up). Never fails for capacity: it logs.
  void applyRules(std::int64_t now_ns);
  // The config file's rules with `overrides` over them: each replaces or removes the file's rule
  // of its name, or follows the file's rules.
  std::vector<RuleSpec> mergedRules(const std::map<std::string, std::optional<RuleSpec>, std::less<>>& overrides) const;
  // Makes `rules` the region's rules (RegionAdmin::setRules) and rules_; rules_mu_ held. An
  // error Status with *applied: some keys found no counter room (the rules are in force).
  // *applied false: refused (more rules than definitions), nothing changed.
  Status installRules(std::vector<RuleSpec> rules, std::int64_t now_ns, bool* applied);
  bool inConfig(std::string_view rule_name) const;
  // Throws RuleConflictError when `rules` are more than kMaxRules.
  static void checkRuleCount(const std::vector<RuleSpec>& rules);
  // Whether a rule of that name is in force; settings_mu_ held.
  bool inForce(const std::string& name) const;
  // Saves an admin API rule change (spec nullopt: removed). Throws NotSavedError.
  void saveRule(const std::string& name, std::optional<std::string> spec_json);
  // Every tick: starts the next window of each rule whose window has ended, and keeps the
  // region's end of the budget day current.
  void rollRules(std::int64_t now_ns);
  // Every reclaim_interval_s: frees the entries of keys nothing needs (RegionAdmin::reclaimKeys).
  void reclaimKeys(std::int64_t now_ns);
  // Runs whose last booking is older than this are past their idle lifetime.
  std::int64_t runsActiveSince() const;

  Config config_;
  Clock clock_;
  DayClock days_;
  CalendarWindows windows_;                // the same zone, for rules
  // The rules in force and each one's definition in the region, under rules_mu_ (the admin API
  // changes them while tick() rolls their windows). settings_mu_ is taken first when both are.
  std::mutex rules_mu_;
  std::vector<RuleSpec> rules_;
  std::vector<std::uint32_t> rule_index_;
  // The admin API's saved rule changes (nullopt: removed), under settings_mu_.
  std::map<std::string, std::optional<RuleSpec>, std::less<>> rule_overrides_;
  std::int32_t day_end_for_ = INT32_MIN;   // the budget day whose end the region was given
  int data_dir_lock_ = -1;
  std::unique_ptr<LedgerFile> ledger_file_;   // which file ledger.db is; checked by the writer
  std::unique_ptr<Ledger> ledger_;         // the ledger writer's connection
  std::mutex settings_mu_;                 // guards settings_ and the order of admin changes
  std::unique_ptr<Ledger> settings_;       // the admin API's connection to the same file
  std::mutex prune_mu_;                    // one retention pass at a time
  std::unique_ptr<Ledger> pruner_ledger_;  // retention's connection (under prune_mu_)
  std::int64_t disk_warned_ns_ = INT64_MIN / 2;   // the clock's time of the last ledger_disk_low (prune_mu_)
  // Retention's time (pruneLedger): the clock, but never further ahead of the last pass's than
  // twice the monotonic time since, plus a minute. Under prune_mu_.
  std::function<std::int64_t()> steady_;
  std::int64_t prune_now_ns_ = INT64_MIN, prune_steady_ns_ = 0;
  // The central link's pushed position at the last pass: only entries pushed a pass ago go, so
  // that a push Postgres loses in a crash (synchronous_commit is off) can be made again.
  std::uint64_t pushed_before_ = 0;
  std::unique_ptr<Region> region_;
  std::unique_ptr<RegionAdmin> admin_;
  std::unique_ptr<LedgerWriter> writer_;
  std::unique_ptr<CentralLink> central_;
  std::unique_ptr<Alerter> alerter_;
  CapacityStats capacity_;                 // what start-up found no table room for
  UntrackedWatch untracked_;
  bool adopted_ = false;
  bool warned_clock_behind_ = false;
  std::atomic<bool> region_damaged_{false};
  // A clock corrected after a step forward reads a day before the budget day. The budget day
  // follows it back once it has stayed behind this long: a lasting correction, not one odd
  // reading (a VM resuming, two time sources fighting), which must not move the day to and fro;
  // short enough that daily budgets are right again within a minute or two.
  static constexpr std::int64_t kClockBehindGraceNs = std::int64_t{60} * 1'000'000'000;
  static constexpr std::int64_t kNotBehind = INT64_MIN;
  std::int64_t behind_since_ns_ = kNotBehind;   // the clock's time when it was first seen behind
  std::int64_t last_reclaim_ns_ = INT64_MIN / 2;  // the clock's time at the last reclaimKeys
  static constexpr std::int64_t kSlideIntervalNs = 1'000'000'000;
  std::int64_t last_slide_ns_ = INT64_MIN / 2;    // the clock's time at the last slideRules
  std::atomic<bool> writer_running_{false};
  std::atomic<std::int32_t> latest_day_{0};    // the latest budget day this agent has set (ledger checks)     // run()'s ledger writer thread is on
};

std::int64_t toUnixNs(std::chrono::system_clock::time_point t) noexcept;

}  // namespace tokenfuse
