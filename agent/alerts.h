// Budget alerts: each threshold (default 80 %, 95 %, 100 % of a limit: the reference's warn,
// critical and hard_kill; configurable per scope and per tenant) fires once per scope and budget
// day for tenants and the platform, and once in its life for a run (run budgets do not reset),
// not once per call, and not again after a restart. A firing is logged (budget_tenant_warn,
// budget_tenant_critical, budget_tenant_hard_kill, ...) and queued in SQLite for each notifier
// (a JSON webhook, Slack, Telegram) in the same transaction that records it, so a crash can
// neither lose it nor send it twice as a new alert. A delivery thread sends the queue with retry
// and backoff; nothing of it touches a decision.
//
// With a central Redis, an alert goes out once per fleet: before sending, the delivery thread
// claims the alert's key (per day, scope, level and id) as pending, and marks it sent once a
// notifier took it; a host that finds it sent marks its copy sent_by_other_host, one that finds
// it pending asks again later, and a pending claim whose host died expires and passes on. A
// Redis that cannot be asked does not hold an alert back: the host sends it (a duplicate beats
// silence).
//
// Keys: {tokenfuse:alerts}:<YYYY-MM-DD|run>:<scope>:<pct>:<id>  value: pending:|sent: host_id/ledger_id
//       {tokenfuse:alerts}:kill:<on:reason|off>                    (a minute: one change, many hosts)
//
// Thread-safety: scan() and killChanged() from any thread (they take db_mu_); run() on one
// thread; stats() anywhere.
#pragma once

#include "config.h"
#include "redis.h"

#include "region_admin.h"

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>

namespace SQLite {
class Database;
}

namespace tokenfuse {

struct AlertStats {
  std::atomic<std::uint64_t> fired{0};        // alerts raised (each once)
  std::atomic<std::uint64_t> delivered{0};    // messages a notifier accepted
  std::atomic<std::uint64_t> failed{0};       // delivery attempts that failed (each is retried)
  std::atomic<std::uint64_t> dropped{0};      // undelivered messages dropped beyond queue_limit
  std::atomic<std::uint64_t> other_host{0};   // not sent: another host of the fleet claimed the alert
  std::atomic<std::uint64_t> queued{0};       // undelivered now
};

class Alerter {
 public:
  using Clock = std::function<std::int64_t()>;   // unix ns

  // Opens its tables in the ledger file. With central.redis_url set, alerts are claimed in that
  // Redis under `origin` (host_id/ledger_id). Throws LedgerError.
  Alerter(const AlertsConfig& config, const CentralConfig& central, std::string origin, RegionAdmin& admin,
          const std::string& ledger_path, Clock clock);
  ~Alerter();

  // Raises what the thresholds say about every limited tenant, every limited run and the platform.
  void scan();
  // The kill switch turned on or off: an alert too.
  void killChanged(bool active, const std::string& reason, const std::string& source);
  // Delivers queued messages until stopped.
  void run(std::stop_token stop);
  // Delivers what is due now; returns how many were sent (tests and run()).
  std::size_t deliverDue();

  const AlertStats& stats() const noexcept { return stats_; }

 private:
  struct Event;
  void raise(const Event& e);
  void scanOne(const char* scope, std::string_view id, const BudgetView& v);
  // Budget rules: each counter with a limit, its thresholds once per window.
  void scanRules();
  bool send(const NotifierConfig& n, const std::string& body);
  // Whether this host is the one to send the alert `body`: kMine without a central Redis, or
  // when Redis cannot be asked. markSent() tells the fleet that one of its notifiers took it.
  enum class Claim { kMine, kSentElsewhere, kSendingElsewhere };
  Claim claim(const std::string& body);
  void markSent(const std::string& body);

  AlertsConfig config_;
  CentralConfig central_;
  std::string origin_;
  RegionAdmin& admin_;
  Clock clock_;
  std::mutex db_mu_;                            // guards db_, day_ and fired_
  std::unique_ptr<SQLite::Database> db_;        // scan() and killChanged()
  std::unique_ptr<SQLite::Database> deliver_;   // run()
  std::unique_ptr<RedisConnection> redis_;      // run(): fleet claims
  std::int64_t next_redis_attempt_ns_ = 0;
  bool redis_warned_ = false;
  std::int32_t day_ = -1;
  // (scope, id) -> the highest level fired today (runs: ever)
  std::map<std::pair<std::string, std::string>, std::int64_t> fired_;
  // Rules: the highest threshold fired per (rule, key) in its current window (under db_mu_).
  struct RuleFired {
    std::int64_t period = INT64_MIN;
    std::int64_t pct = 0;
  };
  std::map<std::pair<std::string, std::string>, RuleFired> rule_fired_;
  std::mutex mu_;
  std::condition_variable_any cv_;
  bool wake_ = false;
  AlertStats stats_;
};

}  // namespace tokenfuse
