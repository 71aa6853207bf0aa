// The central link: a fleet of agents shares one budget through Redis and Postgres, and a
// broken link never blocks a call.
//
// Push (idempotent, so a retry, a reconnect or an agent killed half-way never counts twice):
//  * ledger entries go to Postgres `budget_ledger` with (host_id, host_seq) unique, in batches
//    through COPY into a staging table and INSERT ... ON CONFLICT DO NOTHING;
//  * each tenant's and the platform's spending per budget day goes to Redis as this host's
//    cumulative total (exact nano-USD integers), by a script that adds only the difference to the
//    fleet total: setting a cumulative value twice changes nothing.
// Pull:
//  * fleet totals for today, and for each shared rule's current window, so that the region holds
//    "spent elsewhere" beside "spent here" and checks stay in shared memory;
//  * the emergency kill switch, the reference's key platform:budget:emergency_kill;
//  * tenant limits from the reference's awooop_projects.budget_limit_usd (NULL = unlimited).
// Fail open: while Redis or Postgres is unreachable, decisions go on with the last-known fleet
// totals plus local spending; entries wait in SQLite and drain exactly once when it is back.
// Link state changes are logged once. With a lease fraction set, a host that loses Redis may
// spend only its share of each tenant's remaining budget until it is back.
//
// Keys (all of one day share a hash tag, so the scripts work on a Redis Cluster):
//   {tokenfuse:YYYY-MM-DD}:total            field "t:<project_id>" | "p" -> fleet nano-USD
//   {tokenfuse:YYYY-MM-DD}:host:<host_id>   field "t:<project_id>" | "p" -> this host's nano-USD
// and for each shared budget rule and window, in the rule's metric:
//   {tokenfuse:rule:<name>:<scope>:<metric>:<window>:<shape>:<start unix s | all>}:total        field "<len>:<ids>"
//   {tokenfuse:rule:<name>:<scope>:<metric>:<window>:<shape>:<start unix s | all>}:host:<host>  field "<len>:<ids>"
// (<shape>: a hash of the rule's match and week start; a rule of all time's keys never expire)
//
// Thread-safety: syncOnce()/run() on one thread; publishKill(), wake(), writeTenantLimit() and
// stats() from any thread.
#pragma once

#include "config.h"
#include "ledger.h"
#include "redis.h"

#include "region_admin.h"

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

namespace tokenfuse {

struct PgConnection;

// What /metrics and `tokenfuse status` show of the link.
struct LinkStats {
  std::atomic<bool> redis_configured{false}, postgres_configured{false};
  std::atomic<bool> redis_up{false}, postgres_up{false};
  std::atomic<std::uint64_t> redis_seq{0};      // ledger entries whose spending is in Redis
  std::atomic<std::uint64_t> postgres_seq{0};   // ledger entries in Postgres
  std::atomic<std::uint64_t> ledger_seq{0};     // the newest durable entry, at the last sync
  std::atomic<std::int64_t> redis_ok_unix_ns{0}, postgres_ok_unix_ns{0};   // last success
  std::atomic<std::uint64_t> pushed_entries{0}, pushed_totals{0};
  std::atomic<std::uint64_t> sync_errors{0};
};

// A budget rule whose counts the fleet shares (docs/rules.md, "Across a fleet").
struct SharedRule {
  std::uint32_t index = 0;   // its definition in the region
  // rules.h's names, with the window's start its Redis keys: hosts share a rule's count when
  // all of these are the same.
  std::string name, scope, metric, window, match, week_start;
};

class CentralLink {
 public:
  using Clock = std::function<std::int64_t()>;   // unix ns
  // The kill switch as the fleet has it: the agent applies it (and saves it, and logs a change).
  using KillSink = std::function<void(bool active, const std::string& reason, std::int64_t expires_unix_ns)>;

  CentralLink(const CentralConfig& config, RegionAdmin& admin, const std::string& ledger_path, std::string host_id,
              Clock clock, KillSink on_kill);
  ~CentralLink();

  // One round: push, then pull. Never throws: a link that fails is marked down and retried.
  void syncOnce();
  // syncOnce every sync interval (at once after wake()) until stopped.
  void run(std::stop_token stop);
  void wake();
  // Which rules the fleet shares, asked at every sync (the admin API changes rules). Set before
  // run().
  void shareRules(std::function<std::vector<SharedRule>()> rules) { shared_rules_ = std::move(rules); }

  // The admin API changed the kill switch here: publish it to the fleet (now, or once Redis is back).
  void publishKill(bool active, const std::string& reason, std::int64_t ttl_s);
  // Whether a change of this host's is still to be published: the fleet's state must not undo it.
  bool killPublishPending();
  // Sets a tenant's limit in awooop_projects, over a connection of its own. Throws LinkError.
  void writeTenantLimit(const std::string& project_id, std::optional<NanoUsd> limit);

  bool hasPostgres() const noexcept { return !config_.postgres_url.empty(); }
  bool hasRedis() const noexcept { return !config_.redis_url.empty(); }
  const LinkStats& stats() const noexcept { return stats_; }

 private:
  void syncRedis();
  void pushTotals();
  void pushPendingKill();
  void pullKill();
  void pullTotals();
  void applyLeases();
  // Pushes this host's count of every shared rule's counters in their current windows, then sets
  // each counter's count elsewhere from the fleet's totals.
  void syncRules();
  void syncPostgres();
  void pushLedger();
  // COPY into `table` (budget_ledger, or the staging table to merge), and this host's position.
  void copyRows(const std::vector<LedgerEntry>& rows, const char* table, bool merge);
  void pullLimits();
  void ensureSchema(PgConnection& c);
  std::string pgOptions() const;
  void linkDown(const char* link, const std::string& why, std::atomic<bool>& up);
  void linkUp(const char* link, std::atomic<bool>& up);

  CentralConfig config_;
  RegionAdmin& admin_;
  std::unique_ptr<Ledger> ledger_;   // this thread's connection
  std::string host_id_;
  std::string ledger_id_;   // this data dir's ledger: with host_id_, who pushes
  std::string origin_;      // host_id/ledger_id, in Redis keys
  Clock clock_;
  KillSink on_kill_;
  std::unique_ptr<RedisConnection> redis_;
  std::unique_ptr<PgConnection> pg_;
  std::int64_t next_redis_attempt_ns_ = 0, next_pg_attempt_ns_ = 0, next_limits_ns_ = 0;
  std::set<std::string> warned_;          // links whose failure was logged, until they are back
  std::set<std::string> fleet_limited_;   // tenants whose limit came from awooop_projects

  bool leases_applied_ = false;
  std::int32_t leases_day_ = 0;   // the budget day of the last pulled totals (and of ref_base_)
  std::map<std::string, std::int64_t, std::less<>> ref_base_;   // reference keys at the day's first look
  bool push_failed_ = false;      // the last Postgres round failed: wait before the next
  std::function<std::vector<SharedRule>()> shared_rules_;
  // What this host last pushed of each shared rule counter: (host key, field) -> count.
  std::map<std::pair<std::string, std::string>, std::int64_t> rule_pushed_;

  std::mutex mu_;   // guards pending_kill_ and wake_
  struct PendingKill {
    bool active;
    std::string reason;
    std::int64_t ttl_s;
  };
  std::optional<PendingKill> pending_kill_;
  bool wake_ = false;
  std::condition_variable_any cv_;
  LinkStats stats_;
};

}  // namespace tokenfuse
