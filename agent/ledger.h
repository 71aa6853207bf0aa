// The host's durable ledger: every committed or recorded call, in SQLite (WAL, synchronous=FULL),
// keyed by the host's sequence number so that writing an entry twice is a no-op. Its table has
// the reference's budget_ledger columns (project_id, agent_id, run_id, model, provider,
// prompt_tokens, completion_tokens, cost_usd, created_at), plus host_id, seq, the budget day,
// the exact cost in nano-USD and the reservation the entry settled.
//
// Thread-safety: one Ledger per thread; SQLite serialises writers across processes.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace SQLite {
class Database;
class Statement;
}  // namespace SQLite

namespace tokenfuse {

class LedgerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LedgerEntry {
  std::uint64_t seq = 0;
  std::string host_id;
  std::int64_t unix_ns = 0;
  std::int32_t day = 0;
  std::string kind;   // "commit" or "record"
  std::string project_id, agent_id, run_id, model, provider;
  std::int64_t prompt_tokens = 0, completion_tokens = 0, cost_nano_usd = 0;
  std::uint64_t reservation_id = 0;
  std::string tags;   // as the caller passed them ("batch,eval"); "" none
  bool written = false;   // set by Ledger::append: new in the ledger (not a repeat)
};

// A ring entry that cannot be valid (see LedgerWriter): kept aside with its raw fields and the
// reason, never a budget row.
struct QuarantinedEntry {
  std::uint64_t seq = 0;
  std::string reason;
  std::int64_t kind = 0, unix_ns = 0, day = 0, prompt_tokens = 0, completion_tokens = 0, cost_nano_usd = 0;
  std::uint64_t reservation_id = 0, check = 0;
  std::string project_id, run_id, model, agent_id, provider, tags;   // raw bytes, not necessarily UTF-8
};

struct LedgerTotal {
  std::string id;   // project_id or run_id; empty for the platform
  std::int64_t cost_nano_usd = 0, prompt_tokens = 0, completion_tokens = 0, calls = 0;
  // The newest ledger entry in it (tenantTotals, runTotals): the agent restores the most recently
  // active keys first when a table cannot take them all.
  std::uint64_t last_seq = 0;
};

// What a call's ids spent since some instant (Ledger::callTotalsSince): the rows budget rules are
// rebuilt from. Empty run_id and agent_id stand for none.
struct CallTotal {
  std::string project_id, run_id, model, agent_id;
  std::int64_t cost_nano_usd = 0, prompt_tokens = 0, completion_tokens = 0, calls = 0;
  std::string tags;
};

struct LedgerFilter {
  std::optional<std::string> project_id, run_id;
  std::optional<std::int64_t> since_unix_ns, until_unix_ns;   // [since, until)
  std::uint64_t after_seq = 0;
  std::int64_t limit = 1000;
  bool newest_first = false;   // the last `limit` entries, newest first
};

// A threshold alert as the alerter saved it (alerts.h): once per scope, id, level and period.
struct FiredAlert {
  std::string scope, id;   // "tenant", "run", "platform" or "rule"; id "" for the platform
  std::int64_t level_pct = 0;
  // The budget day; a rule's window start in minutes since 1970; -1 for a lifetime (a run, an
  // all-time rule).
  std::int64_t period = 0;
  std::int64_t fired_unix_ns = 0;
};

// A tenant's spending on one budget day, on this host.
struct DaySpend {
  std::int32_t day = 0;
  std::string project_id;
  std::int64_t cost_nano_usd = 0;
  std::uint64_t updated_seq = 0;   // the newest entry in it
};

// A tenant's spending in one clock hour (UTC), on this host: the day's curve.
struct HourSpend {
  std::int64_t hour = 0;   // hours since 1970-01-01T00:00Z
  std::string project_id;
  std::int64_t cost_nano_usd = 0, prompt_tokens = 0, completion_tokens = 0, calls = 0;
};

// How much of its file the ledger uses (retention.h).
struct LedgerSize {
  std::int64_t page_size = 0, pages = 0, free_pages = 0;
  bool incremental_vacuum = false;   // PRAGMA auto_vacuum = INCREMENTAL: freed pages can be returned
  std::int64_t bytes() const noexcept { return pages * page_size; }
  std::int64_t usedBytes() const noexcept { return (pages - free_pages) * page_size; }
};

// A limit set through the admin API: it outlives restarts and wins over the config file.
struct LimitOverride {
  std::string scope;   // "tenant", "run" or "platform"
  std::string id;      // empty for the platform
  std::optional<std::int64_t> limit_nano_usd;   // nullopt: unlimited
  std::int64_t set_unix_ns = 0;
};

// A rule made, replaced or removed through the admin API: it outlives restarts and wins over
// the config file's rule of the same name.
struct RuleOverride {
  std::string name;
  std::optional<std::string> spec_json;   // ruleToJson (config.h); nullopt: the rule is removed
  std::int64_t set_unix_ns = 0;
};

// The kill switch as the admin API last left it.
struct StoredKill {
  bool active = false;
  std::string reason;
  std::int64_t since_unix_ns = 0, expires_unix_ns = 0;   // expires 0: until turned off
  bool published = true;   // false: set here while the fleet's Redis could not be told yet
};

class Ledger {
 public:
  // Opens (creating if needed) the ledger for writing. Throws LedgerError naming the file.
  Ledger(const std::string& path, std::string host_id);
  // Opens an existing ledger read-only (for the CLI). Throws LedgerError.
  static std::unique_ptr<Ledger> openReadOnly(const std::string& path);
  ~Ledger();

  std::uint64_t maxSeq();
  // Every ring entry up to this sequence number has been dealt with (written, quarantined or
  // skipped): where the agent's ledger writer resumes.
  std::uint64_t durableHead();
  // Writes the entries and the quarantined ones in one transaction, ignoring any whose seq is
  // already there, records `head` (if not 0) as the durable head, and waits for the disk. Marks
  // each entry `written` if it was new; returns how many were. Throws LedgerError.
  std::size_t append(std::vector<LedgerEntry>& entries, const std::vector<QuarantinedEntry>& quarantined = {},
                     std::uint64_t head = 0);
  std::int64_t quarantinedCount();
  // Every write (append and the admin settings) first asks `problem`; a non-empty answer (the
  // file was deleted, replaced, garbled) fails it with LedgerError instead of writing.
  void guardWrites(std::function<std::string()> problem) { guard_ = std::move(problem); }

  std::vector<LedgerTotal> tenantTotals(std::int32_t day);
  LedgerTotal platformTotal(std::int32_t day);
  // Each tenant's totals over budget days from `first_day` on, counting entries up to `max_seq`
  // only (the agent moves the budget day back after a corrected clock step: see Agent::tick).
  std::vector<LedgerTotal> tenantTotalsFrom(std::int32_t first_day, std::uint64_t max_seq);
  // Runs are budgeted over their whole life: the totals of each run whose last entry was booked
  // at or after `since_unix_ns`, and of one run (nullopt: it booked nothing).
  std::vector<LedgerTotal> runTotals(std::int64_t since_unix_ns = INT64_MIN);
  std::optional<LedgerTotal> runTotal(const std::string& run_id);
  // Totals of the entries booked at or after `since_unix_ns` (INT64_MIN: all), by tenant, run,
  // model and agent. `first_day` (a budget day at or before that instant) lets SQLite use its day
  // index; INT32_MIN for all.
  std::vector<CallTotal> callTotalsSince(std::int64_t since_unix_ns, std::int32_t first_day);
  std::vector<LedgerEntry> list(const LedgerFilter& filter);
  std::string integrityCheck();           // "ok", or what SQLite found
  // The newest alerts fired, newest first (none before the alerter made its table).
  std::vector<FiredAlert> alertsFired(std::int64_t limit);
  // Each tenant's spending per hour in [from_hour, to_hour).
  std::vector<HourSpend> spendByHour(std::int64_t from_hour, std::int64_t to_hour);

  // Retention (retention.h, `tokenfuse ledger archive`). Entries leave the ledger only through
  // removeEntries, which keeps their totals in pruned_totals: callTotalsSince(INT64_MIN) (the
  // all-time rules' rebuild) counts them there, and spend_by_day and spend_by_run keep the
  // tenants' days and the runs' lifetimes. Throw LedgerError.
  std::int64_t rowCount();   // kept in meta by every write: no scan
  // The oldest entry's seq and booking time; nullopt for an empty ledger.
  std::optional<std::pair<std::uint64_t, std::int64_t>> oldestEntry();
  // Removes the entries with seq in [first, last] booked before `before_unix_ns`, in one
  // transaction that adds their totals to pruned_totals. Returns how many it removed.
  std::int64_t removeEntries(std::uint64_t first, std::uint64_t last, std::int64_t before_unix_ns);
  // The same for up to `limit` entries booked before `before_unix_ns` on budget days up to
  // `last_day`, with seq <= max_seq, the oldest days first.
  std::int64_t removeOldest(std::int64_t before_unix_ns, std::int32_t last_day, std::uint64_t max_seq,
                            std::int64_t limit);
  // Removes a batch (up to `limit` rows each) of the quarantined entries set aside before
  // `before_unix_ns`, the hourly spending of hours before it, and the daily spending of days
  // before `before_day` that the central link has pushed (updated_seq <= pushed_seq). Returns
  // the largest of the three counts: the caller repeats while it is `limit`.
  std::int64_t removeSummariesBefore(std::int64_t before_unix_ns, std::int32_t before_day, std::uint64_t pushed_seq,
                                     std::int64_t limit);
  LedgerSize size();
  // Returns up to `pages` free pages to the file system (auto_vacuum = INCREMENTAL only).
  void incrementalVacuum(std::int64_t pages);
  // For retention's connection: its transactions are not fsynced (synchronous=NORMAL). One lost
  // to a power cut only comes back as the entries it removed, with their totals (each is atomic
  // all the same), and the writer's next fsync makes them durable anyway; meanwhile the writer
  // never waits for a prune's fsync.
  void skipFsync();
  // Copies the WAL into the file without waiting for or blocking the writer (PASSIVE), so that
  // the writer's own commits seldom meet a long WAL to checkpoint.
  void checkpoint();

  // For the central link. Throw LedgerError.
  std::string ledgerId();   // random, made when the ledger was created
  std::int64_t metaInt(const std::string& key);   // 0 if unset
  std::optional<std::int64_t> metaValue(const std::string& key);   // nullopt if unset
  void setMetaInt(const std::string& key, std::int64_t value);
  // Per-tenant day totals that changed after ledger entry `seq`.
  std::vector<DaySpend> spendUpdatedAfter(std::uint64_t seq);
  std::vector<DaySpend> spendOfDay(std::int32_t day);
  std::int64_t daySpend(std::int32_t day);   // the platform's: all tenants

  // Admin settings, kept in the same file. Throw LedgerError.
  void saveLimit(const LimitOverride& o);
  bool eraseLimit(const std::string& scope, const std::string& id);   // false: there was none
  std::vector<LimitOverride> limitOverrides();
  void saveRule(const RuleOverride& o);
  bool eraseRule(const std::string& name);   // false: there was none
  std::vector<RuleOverride> ruleOverrides();   // oldest change first
  void saveKill(const StoredKill& k);
  std::optional<StoredKill> storedKill();
  void markKillPublished();

 private:
  explicit Ledger(std::unique_ptr<SQLite::Database> db);
  void requireFile(const char* what);
  void addRows(std::int64_t n);   // the meta 'rows' count, inside the caller's transaction
  // Removes the entries `select_seqs` (a SELECT of seqs, bound by `bind`) picks, in one
  // transaction, through temp.prune_batch and removeBatch.
  std::int64_t removeWhere(const std::string& select_seqs, const std::function<void(SQLite::Statement&)>& bind,
                           const char* what);
  std::int64_t removeBatch();
  std::function<std::string()> guard_;
  std::vector<LedgerEntry> listOrThrow(const LedgerFilter& filter);
  std::vector<DaySpend> spend(const char* where, std::int64_t value);
  std::unique_ptr<SQLite::Database> db_;
  std::unique_ptr<SQLite::Statement> insert_;
  std::unique_ptr<SQLite::Statement> add_spend_;
  std::unique_ptr<SQLite::Statement> add_run_;
  std::unique_ptr<SQLite::Statement> add_hour_;
  struct BatchSpend {
    std::int64_t cost = 0, prompt = 0, completion = 0, calls = 0;
    std::uint64_t seq = 0;
    std::int64_t unix_ns = 0;
  };
  std::map<std::pair<std::int32_t, std::string>, BatchSpend> spend_;   // one batch's, by (day, tenant)
  std::map<std::string, BatchSpend> run_spend_;                         // and by run
  std::map<std::pair<std::int64_t, std::string>, BatchSpend> hour_spend_;   // and by (hour, tenant)
  std::string host_id_;
};

// One entry as JSON, as the CLI and the HTTP API show it (ids of reservations as strings:
// they do not fit a JavaScript number).
nlohmann::json toJson(const LedgerEntry& e);
// "2026-11-29T14:00:00.123Z".
std::string isoTime(std::int64_t unix_ns);

}  // namespace tokenfuse
