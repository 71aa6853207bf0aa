#include "ledger.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <nlohmann/json.hpp>
#include <tokenfuse/money.hpp>

#include <chrono>
#include <ctime>
#include <algorithm>
#include <random>

namespace tokenfuse {

namespace {

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budget_ledger (
  seq                INTEGER PRIMARY KEY,   -- this host's ledger sequence number
  host_id            TEXT    NOT NULL,
  created_at_unix_ns INTEGER NOT NULL,      -- the agent's clock when the call was booked
  day                INTEGER NOT NULL,      -- budget day: days since 1970-01-01 in the agent's zone
  kind               TEXT    NOT NULL CHECK (kind IN ('commit', 'record')),
  project_id         TEXT    NOT NULL,
  agent_id           TEXT,
  run_id             TEXT,
  model              TEXT    NOT NULL,
  provider           TEXT,
  prompt_tokens      INTEGER NOT NULL CHECK (prompt_tokens >= 0),
  completion_tokens  INTEGER NOT NULL CHECK (completion_tokens >= 0),
  cost_nano_usd      INTEGER NOT NULL CHECK (cost_nano_usd >= 0),
  reservation_id     INTEGER,               -- the reservation this entry settled; NULL for a record
  tags               TEXT,                  -- the caller's tags ("batch,eval"); NULL for none
  cost_usd   TEXT GENERATED ALWAYS AS
             (printf('%d.%09d', cost_nano_usd / 1000000000, cost_nano_usd % 1000000000)) VIRTUAL,
  created_at TEXT GENERATED ALWAYS AS
             (strftime('%Y-%m-%dT%H:%M:%fZ', created_at_unix_ns / 1000000000.0, 'unixepoch')) VIRTUAL
);
CREATE INDEX IF NOT EXISTS budget_ledger_day_project ON budget_ledger (day, project_id);
-- Each tenant's spending per budget day, kept with the entries in the same transaction, so the
-- central link pushes per-tenant totals at a cost that grows with the tenants touched, not calls.
CREATE TABLE IF NOT EXISTS spend_by_day (
  day               INTEGER NOT NULL,
  project_id        TEXT    NOT NULL,
  cost_nano_usd     INTEGER NOT NULL,
  prompt_tokens     INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  calls             INTEGER NOT NULL,
  updated_seq       INTEGER NOT NULL,       -- the newest ledger entry in it
  PRIMARY KEY (day, project_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_by_day_updated ON spend_by_day (updated_seq);
-- Each run's lifetime totals, kept the same way: a run's budget is lifelong, and its entry in the
-- region may be reclaimed after it has been idle a while (RegionAdmin::reclaimKeys), so its
-- totals come back from here when it returns, and a restart restores the recently active runs.
CREATE TABLE IF NOT EXISTS spend_by_run (
  run_id            TEXT    NOT NULL PRIMARY KEY,
  cost_nano_usd     INTEGER NOT NULL,
  prompt_tokens     INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  calls             INTEGER NOT NULL,
  last_seq          INTEGER NOT NULL,       -- the newest ledger entry in it
  last_unix_ns      INTEGER NOT NULL        -- and when it was booked
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_by_run_last ON spend_by_run (last_unix_ns);
-- Each tenant's spending per clock hour (UTC), kept the same way: the day's curve, without a
-- scan of the day's entries. Retention removes hours older than retain_days.
CREATE TABLE IF NOT EXISTS spend_by_hour (
  hour              INTEGER NOT NULL,       -- hours since 1970-01-01T00:00Z
  project_id        TEXT    NOT NULL,
  cost_nano_usd     INTEGER NOT NULL,
  prompt_tokens     INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  calls             INTEGER NOT NULL,
  PRIMARY KEY (hour, project_id)
) WITHOUT ROWID;
-- The totals of the entries retention removed, by the ids rules count: the all-time rules'
-- rebuild (callTotalsSince) adds them to the entries still here. Entries of windows still open
-- are never removed, so no other window needs them.
CREATE TABLE IF NOT EXISTS pruned_totals (
  project_id        TEXT    NOT NULL,
  run_id            TEXT    NOT NULL,       -- '' for none
  model             TEXT    NOT NULL,
  agent_id          TEXT    NOT NULL,       -- '' for none
  tags              TEXT    NOT NULL,       -- '' for none
  cost_nano_usd     INTEGER NOT NULL,
  prompt_tokens     INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  calls             INTEGER NOT NULL,
  PRIMARY KEY (project_id, run_id, model, agent_id, tags)
) WITHOUT ROWID;
-- Changes made through the admin API, which outlive a restart and win over the config file.
CREATE TABLE IF NOT EXISTS limit_override (
  scope          TEXT    NOT NULL CHECK (scope IN ('tenant', 'run', 'platform')),
  id             TEXT    NOT NULL,          -- '' for the platform
  limit_nano_usd INTEGER CHECK (limit_nano_usd >= 0),   -- NULL: unlimited
  set_unix_ns    INTEGER NOT NULL,
  PRIMARY KEY (scope, id)
);
-- Rules made, replaced or removed through the admin API (PUT/DELETE /v1/rules/{name}): they win
-- over the config file's [[rules]] of the same name.
CREATE TABLE IF NOT EXISTS rule_override (
  name        TEXT    PRIMARY KEY,
  spec        TEXT,                         -- the rule as JSON (docs/http-api.md); NULL: removed
  set_unix_ns INTEGER NOT NULL
);
-- Ring entries that cannot be valid (written over in shared memory, or by a broken client):
-- never budget rows, kept with what they held and why they were set aside.
CREATE TABLE IF NOT EXISTS ledger_quarantine (
  seq                INTEGER PRIMARY KEY,
  host_id            TEXT    NOT NULL,
  quarantined_unix_ns INTEGER NOT NULL,
  reason             TEXT    NOT NULL,
  kind               INTEGER,
  created_at_unix_ns INTEGER,
  day                INTEGER,
  prompt_tokens      INTEGER,
  completion_tokens  INTEGER,
  cost_nano_usd      INTEGER,
  reservation_id     INTEGER,
  checksum           INTEGER,
  project_id         BLOB,                  -- raw bytes: may not be UTF-8
  run_id             BLOB,
  model              BLOB,
  agent_id           BLOB,
  provider           BLOB,
  tags               BLOB
);
CREATE TABLE IF NOT EXISTS kill_switch (
  one             INTEGER PRIMARY KEY CHECK (one = 1),
  active          INTEGER NOT NULL,
  reason          TEXT    NOT NULL,
  since_unix_ns   INTEGER NOT NULL,
  expires_unix_ns INTEGER NOT NULL,        -- 0: until turned off
  published       INTEGER NOT NULL DEFAULT 1   -- 0: the fleet (Redis) has not been told yet
);
)sql";

// '' stays '' for agent_id and provider, as the reference stores them (its provider is NOT
// NULL); an absent run is NULL, as the reference's `UUID(run_id) if run_id else None` makes it.
void bindText(SQLite::Statement& q, int i, const std::string& s, bool empty_is_null) {
  if (s.empty() && empty_is_null) {
    q.bind(i);
  } else {
    q.bindNoCopy(i, s);
  }
}

std::string column(SQLite::Statement& q, int i) { return q.isColumnNull(i) ? std::string() : q.getColumn(i).getString(); }

LedgerTotal total(SQLite::Statement& q) {
  LedgerTotal t{column(q, 0), q.getColumn(1).getInt64(), q.getColumn(2).getInt64(), q.getColumn(3).getInt64(),
                q.getColumn(4).getInt64()};
  if (q.getColumnCount() > 5) t.last_seq = static_cast<std::uint64_t>(q.getColumn(5).getInt64());
  return t;
}

std::int64_t hourOf(std::int64_t unix_ns) { return unix_ns / 3'600'000'000'000; }

constexpr const char* kSums =
    "COALESCE(SUM(cost_nano_usd), 0), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), COUNT(*)";

}  // namespace

Ledger::Ledger(std::unique_ptr<SQLite::Database> db) : db_(std::move(db)) {}

Ledger::Ledger(const std::string& path, std::string host_id) : host_id_(std::move(host_id)) {
  try {
    // NOMUTEX: a Ledger is used by one thread at a time, so SQLite need not lock every call.
    db_ = std::make_unique<SQLite::Database>(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE | SQLite::OPEN_NOMUTEX);
    db_->setBusyTimeout(5000);
    // A new ledger can give back the pages retention frees (retention.h); it must be set before
    // the first table is made, so an older ledger keeps reusing its free pages instead.
    db_->exec("PRAGMA auto_vacuum=INCREMENTAL");
    db_->exec("PRAGMA journal_mode=WAL");
    // The WAL file shrinks back to this after a checkpoint (a large prune writes many pages).
    db_->exec("PRAGMA journal_size_limit=67108864");
    // FULL: a transaction is on disk when commit returns; group commit amortises the fsync.
    db_->exec("PRAGMA synchronous=FULL");
    db_->exec(kSchema);
    SQLite::Statement meta(*db_, "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1')");
    meta.exec();
    // A ledger from before tags were kept: the column is added, NULL (none) for its old entries.
    for (const char* table : {"budget_ledger", "ledger_quarantine"}) {
      SQLite::Statement has(*db_, "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = 'tags'");
      has.bind(1, table);
      if (has.executeStep() && has.getColumn(0).getInt() == 0) {
        db_->exec(std::string("ALTER TABLE ") + table + " ADD COLUMN tags " +
                  (std::string(table) == "budget_ledger" ? "TEXT" : "BLOB"));
      }
    }
    if (ledgerId().empty()) {
      // Names this ledger, so that a host id used again (a replaced host, a wiped data dir) is
      // not taken for the same sequence of entries by the central store.
      std::random_device rd;
      char id[17];
      std::snprintf(id, sizeof id, "%08x%08x", rd(), rd());
      SQLite::Statement q(*db_, "INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?)");
      q.bind(1, std::string(id));
      q.exec();
    }
    // A ledger from before a summary table (or the row count): filled once from the entries.
    // Each holds the write lock while it scans, so never again once its flag is set.
    struct Fill {
      const char* flag;
      const char* table;
      const char* select;
    };
    for (const Fill& f : {
             Fill{"spend_by_day_filled", "spend_by_day",
                  "SELECT day, project_id, SUM(cost_nano_usd), SUM(prompt_tokens), SUM(completion_tokens), COUNT(*), "
                  "MAX(seq) FROM budget_ledger GROUP BY day, project_id"},
             Fill{"spend_by_run_filled", "spend_by_run",
                  "SELECT run_id, SUM(cost_nano_usd), SUM(prompt_tokens), SUM(completion_tokens), COUNT(*), MAX(seq), "
                  "MAX(created_at_unix_ns) FROM budget_ledger WHERE run_id IS NOT NULL GROUP BY run_id"},
             Fill{"spend_by_hour_filled", "spend_by_hour",
                  "SELECT created_at_unix_ns / 3600000000000, project_id, SUM(cost_nano_usd), SUM(prompt_tokens), "
                  "SUM(completion_tokens), COUNT(*) FROM budget_ledger GROUP BY 1, 2"},
         }) {
      if (metaInt(f.flag) != 0) continue;
      SQLite::Transaction txn(*db_);
      db_->exec(std::string("DELETE FROM ") + f.table);
      db_->exec(std::string("INSERT INTO ") + f.table + " " + f.select);
      setMetaInt(f.flag, 1);
      txn.commit();
    }
    // The entry count, kept with every write from here on.
    if (!metaValue("rows")) {
      db_->exec("INSERT OR IGNORE INTO meta (key, value) SELECT 'rows', COUNT(*) FROM budget_ledger");
    }
    add_hour_ = std::make_unique<SQLite::Statement>(
        *db_,
        "INSERT INTO spend_by_hour VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (hour, project_id) DO UPDATE SET cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, calls = calls + excluded.calls");
    add_run_ = std::make_unique<SQLite::Statement>(
        *db_,
        "INSERT INTO spend_by_run VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (run_id) DO UPDATE SET cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, calls = calls + excluded.calls, "
        "last_seq = MAX(last_seq, excluded.last_seq), last_unix_ns = MAX(last_unix_ns, excluded.last_unix_ns)");
    add_spend_ = std::make_unique<SQLite::Statement>(
        *db_,
        "INSERT INTO spend_by_day VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (day, project_id) DO UPDATE SET cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, calls = calls + excluded.calls, "
        "updated_seq = MAX(updated_seq, excluded.updated_seq)");
    insert_ = std::make_unique<SQLite::Statement>(
        *db_,
        "INSERT OR IGNORE INTO budget_ledger (seq, host_id, created_at_unix_ns, day, kind, project_id, agent_id, "
        "run_id, model, provider, prompt_tokens, completion_tokens, cost_nano_usd, reservation_id, tags) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
  } catch (const SQLite::Exception& e) {
    throw LedgerError("ledger " + path + ": " + e.what());
  }
}

std::unique_ptr<Ledger> Ledger::openReadOnly(const std::string& path) {
  try {
    auto db = std::make_unique<SQLite::Database>(path, SQLite::OPEN_READONLY | SQLite::OPEN_NOMUTEX);
    db->setBusyTimeout(5000);
    (void)db->execAndGet("SELECT COUNT(*) FROM budget_ledger WHERE seq < 0");   // is it a ledger?
    return std::unique_ptr<Ledger>(new Ledger(std::move(db)));
  } catch (const SQLite::Exception& e) {
    throw LedgerError("ledger " + path + ": " + e.what() + " (is --data-dir the agent's data dir?)");
  }
}

Ledger::~Ledger() = default;

std::uint64_t Ledger::maxSeq() {
  // Exactly "SELECT MAX(seq)": SQLite then reads the last row of the b-tree instead of scanning.
  const SQLite::Column c = db_->execAndGet("SELECT MAX(seq) FROM budget_ledger");
  return c.isNull() ? 0 : static_cast<std::uint64_t>(c.getInt64());
}

void Ledger::requireFile(const char* what) {
  if (!guard_) return;
  if (const std::string problem = guard_(); !problem.empty()) {
    throw LedgerError(std::string(what) + ": not written, the ledger file " + problem);
  }
}

std::uint64_t Ledger::durableHead() {
  const SQLite::Column q = db_->execAndGet("SELECT MAX(seq) FROM ledger_quarantine");
  const std::uint64_t quarantined = q.isNull() ? 0 : static_cast<std::uint64_t>(q.getInt64());
  return std::max({maxSeq(), quarantined, static_cast<std::uint64_t>(metaInt("ledger_head"))});
}

std::int64_t Ledger::quarantinedCount() { return db_->execAndGet("SELECT COUNT(*) FROM ledger_quarantine").getInt64(); }

std::size_t Ledger::append(std::vector<LedgerEntry>& entries, const std::vector<QuarantinedEntry>& quarantined,
                           std::uint64_t head) {
  if (entries.empty() && quarantined.empty() && head == 0) return 0;
  requireFile("ledger entries");
  std::size_t added = 0;
  try {
    SQLite::Transaction txn(*db_);
    if (!quarantined.empty()) {
      SQLite::Statement qq(*db_,
                           "INSERT OR IGNORE INTO ledger_quarantine (seq, host_id, quarantined_unix_ns, reason, kind, "
                           "created_at_unix_ns, day, prompt_tokens, completion_tokens, cost_nano_usd, reservation_id, "
                           "checksum, project_id, run_id, model, agent_id, provider, tags) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
      const std::int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count();
      for (const QuarantinedEntry& e : quarantined) {
        int i = 1;
        qq.bind(i++, static_cast<std::int64_t>(e.seq));
        qq.bind(i++, host_id_);
        qq.bind(i++, now);
        qq.bind(i++, e.reason);
        for (const std::int64_t v : {e.kind, e.unix_ns, e.day, e.prompt_tokens, e.completion_tokens, e.cost_nano_usd,
                                     static_cast<std::int64_t>(e.reservation_id), static_cast<std::int64_t>(e.check)}) {
          qq.bind(i++, v);
        }
        for (const std::string* t : {&e.project_id, &e.run_id, &e.model, &e.agent_id, &e.provider, &e.tags}) {
          qq.bind(i++, t->data(), static_cast<int>(t->size()));   // a BLOB: the bytes as they were
        }
        qq.exec();
        qq.reset();
      }
    }
    if (head != 0) {
      SQLite::Statement m(*db_, "INSERT OR REPLACE INTO meta (key, value) VALUES ('ledger_head', ?)");
      m.bind(1, std::to_string(head));
      m.exec();
    }
    SQLite::Statement& q = *insert_;
    for (LedgerEntry& e : entries) {
      q.bind(1, static_cast<std::int64_t>(e.seq));
      q.bindNoCopy(2, host_id_);
      q.bind(3, e.unix_ns);
      q.bind(4, e.day);
      q.bindNoCopy(5, e.kind);
      q.bindNoCopy(6, e.project_id);
      bindText(q, 7, e.agent_id, false);
      bindText(q, 8, e.run_id, true);
      q.bindNoCopy(9, e.model);
      bindText(q, 10, e.provider, false);
      q.bind(11, e.prompt_tokens);
      q.bind(12, e.completion_tokens);
      q.bind(13, e.cost_nano_usd);
      if (e.reservation_id != 0) {
        q.bind(14, static_cast<std::int64_t>(e.reservation_id));
      } else {
        q.bind(14);
      }
      bindText(q, 15, e.tags, true);
      e.written = q.exec() == 1;
      added += e.written ? 1 : 0;
      q.reset();
      if (e.written) {
        BatchSpend& b = spend_[{e.day, e.project_id}];
        b.cost += e.cost_nano_usd;
        b.prompt += e.prompt_tokens;
        b.completion += e.completion_tokens;
        ++b.calls;
        b.seq = std::max(b.seq, e.seq);
        BatchSpend& h = hour_spend_[{hourOf(e.unix_ns), e.project_id}];
        h.cost += e.cost_nano_usd;
        h.prompt += e.prompt_tokens;
        h.completion += e.completion_tokens;
        ++h.calls;
        if (!e.run_id.empty()) {
          BatchSpend& r = run_spend_[e.run_id];
          r.cost += e.cost_nano_usd;
          r.prompt += e.prompt_tokens;
          r.completion += e.completion_tokens;
          ++r.calls;
          r.seq = std::max(r.seq, e.seq);
          r.unix_ns = std::max(r.unix_ns, e.unix_ns);
        }
      }
    }
    for (const auto& [run, b] : run_spend_) {
      SQLite::Statement& a = *add_run_;
      a.bindNoCopy(1, run);
      a.bind(2, b.cost);
      a.bind(3, b.prompt);
      a.bind(4, b.completion);
      a.bind(5, b.calls);
      a.bind(6, static_cast<std::int64_t>(b.seq));
      a.bind(7, b.unix_ns);
      a.exec();
      a.reset();
    }
    run_spend_.clear();
    // The batch's totals by (day, tenant) and (hour, tenant), into their tables.
    const auto flush = [](auto& totals, SQLite::Statement& a, bool with_seq) {
      for (const auto& [key, b] : totals) {
        a.bind(1, key.first);
        a.bindNoCopy(2, key.second);
        a.bind(3, b.cost);
        a.bind(4, b.prompt);
        a.bind(5, b.completion);
        a.bind(6, b.calls);
        if (with_seq) a.bind(7, static_cast<std::int64_t>(b.seq));
        a.exec();
        a.reset();
      }
      totals.clear();
    };
    flush(spend_, *add_spend_, true);
    flush(hour_spend_, *add_hour_, false);
    if (added != 0) addRows(static_cast<std::int64_t>(added));
    txn.commit();
  } catch (const SQLite::Exception& e) {
    insert_->reset();
    add_spend_->reset();
    add_run_->reset();
    add_hour_->reset();
    spend_.clear();
    run_spend_.clear();
    hour_spend_.clear();
    throw LedgerError(std::string("cannot write the ledger: ") + e.what());
  }
  return added;
}

// A day's totals come from spend_by_day, which the writer keeps with the entries: one row a
// tenant, rather than a scan of the day's entries.
std::vector<LedgerTotal> Ledger::tenantTotals(std::int32_t day) {
  SQLite::Statement q(*db_,
                      "SELECT project_id, cost_nano_usd, prompt_tokens, completion_tokens, calls, updated_seq FROM spend_by_day "
                      "WHERE day = ? ORDER BY project_id");
  q.bind(1, day);
  std::vector<LedgerTotal> out;
  while (q.executeStep()) out.push_back(total(q));
  return out;
}

LedgerTotal Ledger::platformTotal(std::int32_t day) {
  SQLite::Statement q(*db_,
                      "SELECT NULL, COALESCE(SUM(cost_nano_usd), 0), COALESCE(SUM(prompt_tokens), 0), "
                      "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(calls), 0) FROM spend_by_day WHERE day = ?");
  q.bind(1, day);
  q.executeStep();
  return total(q);
}

std::vector<LedgerTotal> Ledger::tenantTotalsFrom(std::int32_t first_day, std::uint64_t max_seq) {
  // spend_by_day's sums (a row a tenant and day, cheap), less the few entries after max_seq.
  try {
    SQLite::Statement q(*db_,
                        "SELECT project_id, SUM(c), SUM(p), SUM(k), SUM(n), MAX(u) FROM ("
                        "SELECT project_id, cost_nano_usd AS c, prompt_tokens AS p, completion_tokens AS k, calls AS n, "
                        "updated_seq AS u FROM spend_by_day WHERE day >= ?1 UNION ALL "
                        "SELECT project_id, -cost_nano_usd, -prompt_tokens, -completion_tokens, -1, 0 FROM budget_ledger "
                        "WHERE seq > ?2 AND day >= ?1) GROUP BY project_id ORDER BY project_id");
    q.bind(1, first_day);
    q.bind(2, static_cast<std::int64_t>(std::min<std::uint64_t>(max_seq, INT64_MAX)));
    std::vector<LedgerTotal> out;
    while (q.executeStep()) out.push_back(total(q));
    return out;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading spend_by_day: ") + e.what());
  }
}

std::vector<LedgerTotal> Ledger::runTotals(std::int64_t since_unix_ns) {
  SQLite::Statement q(*db_,
                      "SELECT run_id, cost_nano_usd, prompt_tokens, completion_tokens, calls, last_seq FROM spend_by_run "
                      "WHERE last_unix_ns >= ?");
  q.bind(1, since_unix_ns);
  std::vector<LedgerTotal> out;
  while (q.executeStep()) out.push_back(total(q));
  return out;
}

std::optional<LedgerTotal> Ledger::runTotal(const std::string& run_id) {
  SQLite::Statement q(*db_,
                      "SELECT run_id, cost_nano_usd, prompt_tokens, completion_tokens, calls, last_seq FROM spend_by_run "
                      "WHERE run_id = ?");
  q.bind(1, run_id);
  if (!q.executeStep()) return std::nullopt;
  return total(q);
}

std::vector<CallTotal> Ledger::callTotalsSince(std::int64_t since_unix_ns, std::int32_t first_day) {
  std::string sql = std::string("SELECT project_id, COALESCE(run_id, ''), model, COALESCE(agent_id, ''), ") + kSums +
                    ", COALESCE(tags, '') FROM budget_ledger WHERE day >= ?1 AND created_at_unix_ns >= ?2 "
                    "GROUP BY 1, 2, 3, 4, 9";
  if (since_unix_ns == INT64_MIN) {
    // All time: with the totals of the entries retention removed (every other window is newer
    // than what it removes).
    sql = "SELECT p, r, m, a, SUM(c), SUM(pt), SUM(ct), SUM(n), t FROM ("
          "SELECT project_id AS p, COALESCE(run_id, '') AS r, model AS m, COALESCE(agent_id, '') AS a, "
          "cost_nano_usd AS c, prompt_tokens AS pt, completion_tokens AS ct, 1 AS n, COALESCE(tags, '') AS t "
          "FROM budget_ledger WHERE day >= ?1 AND created_at_unix_ns >= ?2 UNION ALL "
          "SELECT project_id, run_id, model, agent_id, cost_nano_usd, prompt_tokens, completion_tokens, calls, tags "
          "FROM pruned_totals) GROUP BY 1, 2, 3, 4, 9";
  }
  SQLite::Statement q(*db_, sql);
  q.bind(1, first_day);
  q.bind(2, since_unix_ns);
  std::vector<CallTotal> out;
  while (q.executeStep()) {
    out.push_back({column(q, 0), column(q, 1), column(q, 2), column(q, 3), q.getColumn(4).getInt64(),
                   q.getColumn(5).getInt64(), q.getColumn(6).getInt64(), q.getColumn(7).getInt64(), column(q, 8)});
  }
  return out;
}

std::vector<LedgerEntry> Ledger::list(const LedgerFilter& f) {
  try {
    return listOrThrow(f);
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading the ledger: ") + e.what());
  }
}

std::vector<LedgerEntry> Ledger::listOrThrow(const LedgerFilter& f) {
  std::string sql =
      "SELECT seq, host_id, created_at_unix_ns, day, kind, project_id, agent_id, run_id, model, provider, "
      "prompt_tokens, completion_tokens, cost_nano_usd, reservation_id, ";
  // A ledger from before tags (read-only, before its agent added the column): none.
  sql += db_->execAndGet("SELECT COUNT(*) FROM pragma_table_info('budget_ledger') WHERE name = 'tags'").getInt() != 0
             ? "tags"
             : "NULL";
  sql += " FROM budget_ledger WHERE seq > ?";
  if (f.project_id) sql += " AND project_id = ?";
  if (f.run_id) sql += " AND run_id = ?";
  if (f.since_unix_ns) sql += " AND created_at_unix_ns >= ?";
  if (f.until_unix_ns) sql += " AND created_at_unix_ns < ?";
  sql += f.newest_first ? " ORDER BY seq DESC LIMIT ?" : " ORDER BY seq LIMIT ?";
  SQLite::Statement q(*db_, sql);
  int i = 1;
  q.bind(i++, static_cast<std::int64_t>(f.after_seq));
  if (f.project_id) q.bind(i++, *f.project_id);
  if (f.run_id) q.bind(i++, *f.run_id);
  if (f.since_unix_ns) q.bind(i++, *f.since_unix_ns);
  if (f.until_unix_ns) q.bind(i++, *f.until_unix_ns);
  q.bind(i, f.limit);
  std::vector<LedgerEntry> out;
  while (q.executeStep()) {
    LedgerEntry e;
    e.seq = static_cast<std::uint64_t>(q.getColumn(0).getInt64());
    e.host_id = column(q, 1);
    e.unix_ns = q.getColumn(2).getInt64();
    e.day = q.getColumn(3).getInt();
    e.kind = column(q, 4);
    e.project_id = column(q, 5);
    e.agent_id = column(q, 6);
    e.run_id = column(q, 7);
    e.model = column(q, 8);
    e.provider = column(q, 9);
    e.prompt_tokens = q.getColumn(10).getInt64();
    e.completion_tokens = q.getColumn(11).getInt64();
    e.cost_nano_usd = q.getColumn(12).getInt64();
    e.reservation_id = q.isColumnNull(13) ? 0 : static_cast<std::uint64_t>(q.getColumn(13).getInt64());
    e.tags = column(q, 14);
    out.push_back(std::move(e));
  }
  return out;
}

std::string Ledger::integrityCheck() { return db_->execAndGet("PRAGMA integrity_check").getString(); }

// --- Admin settings -----------------------------------------------------------------------------

void Ledger::saveLimit(const LimitOverride& o) {
  requireFile("a limit");
  try {
    SQLite::Statement q(*db_,
                        "INSERT INTO limit_override (scope, id, limit_nano_usd, set_unix_ns) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (scope, id) DO UPDATE SET limit_nano_usd = excluded.limit_nano_usd, "
                        "set_unix_ns = excluded.set_unix_ns");
    q.bind(1, o.scope);
    q.bind(2, o.id);
    if (o.limit_nano_usd) {
      q.bind(3, *o.limit_nano_usd);
    } else {
      q.bind(3);
    }
    q.bind(4, o.set_unix_ns);
    q.exec();
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("saving a limit: ") + e.what());
  }
}

bool Ledger::eraseLimit(const std::string& scope, const std::string& id) {
  requireFile("a limit");
  try {
    SQLite::Statement q(*db_, "DELETE FROM limit_override WHERE scope = ? AND id = ?");
    q.bind(1, scope);
    q.bind(2, id);
    return q.exec() > 0;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("erasing a limit: ") + e.what());
  }
}

std::vector<LimitOverride> Ledger::limitOverrides() {
  std::vector<LimitOverride> out;
  try {
    SQLite::Statement q(*db_, "SELECT scope, id, limit_nano_usd, set_unix_ns FROM limit_override ORDER BY scope, id");
    while (q.executeStep()) {
      LimitOverride o{q.getColumn(0).getString(), q.getColumn(1).getString(), std::nullopt, q.getColumn(3).getInt64()};
      if (!q.isColumnNull(2)) o.limit_nano_usd = q.getColumn(2).getInt64();
      out.push_back(std::move(o));
    }
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading saved limits (limit_override): ") + e.what());
  }
  return out;
}

void Ledger::saveRule(const RuleOverride& o) {
  requireFile("a rule");
  try {
    SQLite::Statement q(*db_,
                        "INSERT INTO rule_override (name, spec, set_unix_ns) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, set_unix_ns = excluded.set_unix_ns");
    q.bind(1, o.name);
    if (o.spec_json) {
      q.bind(2, *o.spec_json);
    } else {
      q.bind(2);
    }
    q.bind(3, o.set_unix_ns);
    q.exec();
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("saving a rule: ") + e.what());
  }
}

bool Ledger::eraseRule(const std::string& name) {
  requireFile("a rule");
  try {
    SQLite::Statement q(*db_, "DELETE FROM rule_override WHERE name = ?");
    q.bind(1, name);
    return q.exec() > 0;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("erasing a rule: ") + e.what());
  }
}

std::vector<RuleOverride> Ledger::ruleOverrides() {
  std::vector<RuleOverride> out;
  try {
    SQLite::Statement q(*db_, "SELECT name, spec, set_unix_ns FROM rule_override ORDER BY set_unix_ns, name");
    while (q.executeStep()) {
      RuleOverride o{q.getColumn(0).getString(), std::nullopt, q.getColumn(2).getInt64()};
      if (!q.isColumnNull(1)) o.spec_json = q.getColumn(1).getString();
      out.push_back(std::move(o));
    }
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading saved rules (rule_override): ") + e.what());
  }
  return out;
}

void Ledger::saveKill(const StoredKill& k) {
  requireFile("the kill switch");
  try {
    SQLite::Statement q(*db_,
                        "INSERT OR REPLACE INTO kill_switch (one, active, reason, since_unix_ns, expires_unix_ns, "
                        "published) VALUES (1, ?, ?, ?, ?, ?)");
    q.bind(1, k.active ? 1 : 0);
    q.bind(2, k.reason);
    q.bind(3, k.since_unix_ns);
    q.bind(4, k.expires_unix_ns);
    q.bind(5, k.published ? 1 : 0);
    q.exec();
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("saving the kill switch: ") + e.what());
  }
}

void Ledger::markKillPublished() {
  requireFile("the kill switch");
  try {
    db_->exec("UPDATE kill_switch SET published = 1");
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("saving the kill switch: ") + e.what());
  }
}

std::optional<StoredKill> Ledger::storedKill() {
  try {
    SQLite::Statement q(*db_,
                        "SELECT active, reason, since_unix_ns, expires_unix_ns, published FROM kill_switch WHERE one = 1");
    if (!q.executeStep()) return std::nullopt;
    return StoredKill{q.getColumn(0).getInt() != 0, q.getColumn(1).getString(), q.getColumn(2).getInt64(),
                      q.getColumn(3).getInt64(), q.getColumn(4).getInt() != 0};
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading the saved kill switch: ") + e.what());
  }
}

std::vector<FiredAlert> Ledger::alertsFired(std::int64_t limit) {
  try {
    if (db_->execAndGet("SELECT COUNT(*) FROM sqlite_master WHERE name = 'alert_fired'").getInt() == 0) return {};
    SQLite::Statement q(*db_,
                        "SELECT scope, scope_id, level_pct, day, fired_unix_ns FROM alert_fired "
                        "ORDER BY fired_unix_ns DESC LIMIT ?");
    q.bind(1, limit);
    std::vector<FiredAlert> out;
    while (q.executeStep()) {
      out.push_back({q.getColumn(0).getString(), q.getColumn(1).getString(), q.getColumn(2).getInt64(),
                     q.getColumn(3).getInt64(), q.getColumn(4).getInt64()});
    }
    return out;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading alert_fired: ") + e.what());
  }
}

std::vector<HourSpend> Ledger::spendByHour(std::int64_t from_hour, std::int64_t to_hour) {
  try {
    SQLite::Statement q(*db_,
                        "SELECT hour, project_id, cost_nano_usd, prompt_tokens, completion_tokens, calls FROM spend_by_hour "
                        "WHERE hour >= ? AND hour < ? ORDER BY hour, project_id");
    q.bind(1, from_hour);
    q.bind(2, to_hour);
    std::vector<HourSpend> out;
    while (q.executeStep()) {
      out.push_back({q.getColumn(0).getInt64(), q.getColumn(1).getString(), q.getColumn(2).getInt64(),
                     q.getColumn(3).getInt64(), q.getColumn(4).getInt64(), q.getColumn(5).getInt64()});
    }
    return out;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading spend_by_hour: ") + e.what());
  }
}

// --- Retention ----------------------------------------------------------------------------------

void Ledger::addRows(std::int64_t n) {
  SQLite::Statement q(*db_, "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'rows'");
  q.bind(1, n);
  q.exec();
}

std::int64_t Ledger::rowCount() { return metaInt("rows"); }

std::optional<std::pair<std::uint64_t, std::int64_t>> Ledger::oldestEntry() {
  try {
    SQLite::Statement q(*db_, "SELECT seq, created_at_unix_ns FROM budget_ledger ORDER BY seq LIMIT 1");
    if (!q.executeStep()) return std::nullopt;
    return std::pair(static_cast<std::uint64_t>(q.getColumn(0).getInt64()), q.getColumn(1).getInt64());
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading the ledger's oldest entry: ") + e.what());
  }
}

// The entries whose seq is in temp.prune_batch leave the ledger, their totals staying in
// pruned_totals; inside the caller's transaction. Returns how many.
std::int64_t Ledger::removeBatch() {
  db_->exec(
      "INSERT INTO pruned_totals SELECT * FROM (SELECT project_id, COALESCE(run_id, ''), model, COALESCE(agent_id, ''), "
      "COALESCE(tags, ''), SUM(cost_nano_usd), SUM(prompt_tokens), SUM(completion_tokens), COUNT(*) FROM budget_ledger "
      "WHERE seq IN (SELECT seq FROM temp.prune_batch) GROUP BY 1, 2, 3, 4, 5) "
      // "WHERE true": SQLite's upsert after a SELECT needs a WHERE to parse.
      "WHERE true ON CONFLICT (project_id, run_id, model, agent_id, tags) DO UPDATE SET "
      "cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
      "completion_tokens = completion_tokens + excluded.completion_tokens, calls = calls + excluded.calls");
  const std::int64_t removed = db_->exec("DELETE FROM budget_ledger WHERE seq IN (SELECT seq FROM temp.prune_batch)");
  db_->exec("DELETE FROM temp.prune_batch");
  if (removed != 0) addRows(-removed);
  return removed;
}

std::int64_t Ledger::removeWhere(const std::string& select_seqs, const std::function<void(SQLite::Statement&)>& bind,
                                 const char* what) {
  requireFile(what);
  try {
    db_->exec("CREATE TEMP TABLE IF NOT EXISTS prune_batch (seq INTEGER PRIMARY KEY)");
    // IMMEDIATE: the write lock first, waiting for the writer's transaction as long as the busy
    // timeout allows. A read first would fail at once with SQLITE_BUSY when the writer committed
    // in between (WAL cannot upgrade a stale snapshot).
    SQLite::Transaction txn(*db_, SQLite::TransactionBehavior::IMMEDIATE);
    SQLite::Statement pick(*db_, "INSERT INTO temp.prune_batch " + select_seqs);
    bind(pick);
    pick.exec();
    const std::int64_t removed = removeBatch();
    txn.commit();
    return removed;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string(what) + ": " + e.what());
  }
}

std::int64_t Ledger::removeEntries(std::uint64_t first, std::uint64_t last, std::int64_t before_unix_ns) {
  if (first > last) return 0;
  return removeWhere("SELECT seq FROM budget_ledger WHERE seq BETWEEN ?1 AND ?2 AND created_at_unix_ns < ?3",
                     [&](SQLite::Statement& q) {
                       q.bind(1, static_cast<std::int64_t>(std::min<std::uint64_t>(first, INT64_MAX)));
                       q.bind(2, static_cast<std::int64_t>(std::min<std::uint64_t>(last, INT64_MAX)));
                       q.bind(3, before_unix_ns);
                     },
                     "cannot remove ledger entries");
}

std::int64_t Ledger::removeOldest(std::int64_t before_unix_ns, std::int32_t last_day, std::uint64_t max_seq,
                                  std::int64_t limit) {
  // Through the day index, oldest day first: entries stamped in the future (a clock that ran
  // ahead) do not stand in the way of the older ones behind them in seq order.
  return removeWhere("SELECT seq FROM budget_ledger WHERE day <= ?1 AND created_at_unix_ns < ?2 AND seq <= ?3 "
                     "ORDER BY day LIMIT ?4",
                     [&](SQLite::Statement& q) {
                       q.bind(1, last_day);
                       q.bind(2, before_unix_ns);
                       q.bind(3, static_cast<std::int64_t>(std::min<std::uint64_t>(max_seq, INT64_MAX)));
                       q.bind(4, limit);
                     },
                     "cannot remove old ledger entries");
}

std::int64_t Ledger::removeSummariesBefore(std::int64_t before_unix_ns, std::int32_t before_day,
                                           std::uint64_t pushed_seq, std::int64_t limit) {
  requireFile("removing old ledger summaries");
  try {
    SQLite::Transaction txn(*db_);
    // Each a batch of at most `limit` rows: the caller repeats while they are full.
    SQLite::Statement quarantined(*db_,
                                  "DELETE FROM ledger_quarantine WHERE seq IN (SELECT seq FROM ledger_quarantine "
                                  "WHERE quarantined_unix_ns < ? ORDER BY seq LIMIT ?)");
    quarantined.bind(1, before_unix_ns);
    quarantined.bind(2, limit);
    SQLite::Statement hours(*db_,
                            "DELETE FROM spend_by_hour WHERE (hour, project_id) IN (SELECT hour, project_id FROM "
                            "spend_by_hour WHERE hour < ? ORDER BY hour LIMIT ?)");
    hours.bind(1, hourOf(before_unix_ns));
    hours.bind(2, limit);
    SQLite::Statement days(*db_,
                           "DELETE FROM spend_by_day WHERE (day, project_id) IN (SELECT day, project_id FROM spend_by_day "
                           "WHERE day < ? AND updated_seq <= ? ORDER BY day LIMIT ?)");
    days.bind(1, before_day);
    days.bind(2, static_cast<std::int64_t>(std::min<std::uint64_t>(pushed_seq, INT64_MAX)));
    days.bind(3, limit);
    const std::int64_t removed = std::max({quarantined.exec(), hours.exec(), days.exec()});
    txn.commit();
    return removed;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("cannot remove old ledger summaries: ") + e.what());
  }
}

LedgerSize Ledger::size() {
  try {
    LedgerSize s;
    s.page_size = db_->execAndGet("PRAGMA page_size").getInt64();
    s.pages = db_->execAndGet("PRAGMA page_count").getInt64();
    s.free_pages = db_->execAndGet("PRAGMA freelist_count").getInt64();
    s.incremental_vacuum = db_->execAndGet("PRAGMA auto_vacuum").getInt() == 2;
    return s;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading the ledger's size: ") + e.what());
  }
}

void Ledger::incrementalVacuum(std::int64_t pages) {
  requireFile("returning free ledger pages");
  try {
    db_->exec("PRAGMA incremental_vacuum(" + std::to_string(pages) + ")");
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("cannot return free ledger pages: ") + e.what());
  }
}

void Ledger::skipFsync() { db_->exec("PRAGMA synchronous=NORMAL"); }

void Ledger::checkpoint() {
  requireFile("checkpointing the ledger");   // it writes into ledger.db itself
  try {
    db_->exec("PRAGMA wal_checkpoint(PASSIVE)");
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("cannot checkpoint the ledger's WAL: ") + e.what());
  }
}

std::string isoTime(std::int64_t unix_ns) {
  const auto t = static_cast<std::time_t>(unix_ns / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof out, "%s.%03lldZ", buf, static_cast<long long>(unix_ns / 1'000'000 % 1000));
  return out;
}

nlohmann::json toJson(const LedgerEntry& e) {
  using nlohmann::json;
  auto optional = [](const std::string& s) { return s.empty() ? json(nullptr) : json(s); };
  return {{"seq", e.seq},
          {"host_id", e.host_id},
          {"created_at", isoTime(e.unix_ns)},
          {"kind", e.kind},
          {"project_id", e.project_id},
          {"agent_id", e.agent_id},   // '' stays '' (an old ledger's NULL reads as '' too)
          {"run_id", optional(e.run_id)},
          {"model", e.model},
          {"provider", e.provider},
          {"prompt_tokens", e.prompt_tokens},
          {"completion_tokens", e.completion_tokens},
          {"cost_usd", NanoUsd(e.cost_nano_usd).toString()},
          {"reservation_id", e.reservation_id == 0 ? json(nullptr) : json(std::to_string(e.reservation_id))},
          {"tags", optional(e.tags)}};
}

// --- For the central link ---------------------------------------------------------------------

std::string Ledger::ledgerId() {
  SQLite::Statement q(*db_, "SELECT value FROM meta WHERE key = 'ledger_id'");
  return q.executeStep() ? q.getColumn(0).getString() : std::string();
}

std::int64_t Ledger::metaInt(const std::string& key) { return metaValue(key).value_or(0); }

std::optional<std::int64_t> Ledger::metaValue(const std::string& key) {
  try {
    SQLite::Statement q(*db_, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?");
    q.bind(1, key);
    if (!q.executeStep()) return std::nullopt;
    return q.getColumn(0).getInt64();
  } catch (const SQLite::Exception& e) {
    throw LedgerError("reading " + key + ": " + e.what());
  }
}

void Ledger::setMetaInt(const std::string& key, std::int64_t value) {
  requireFile("a setting");
  try {
    SQLite::Statement q(*db_, "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)");
    q.bind(1, key);
    q.bind(2, std::to_string(value));
    q.exec();
  } catch (const SQLite::Exception& e) {
    throw LedgerError("saving " + key + ": " + e.what());
  }
}

std::vector<DaySpend> Ledger::spendUpdatedAfter(std::uint64_t seq) { return spend("updated_seq > ?", seq); }

std::vector<DaySpend> Ledger::spendOfDay(std::int32_t day) { return spend("day = ?", day); }

std::vector<DaySpend> Ledger::spend(const char* where, std::int64_t value) {
  try {
    SQLite::Statement q(*db_, std::string("SELECT day, project_id, cost_nano_usd, updated_seq FROM spend_by_day WHERE ") +
                                  where + " ORDER BY day, project_id");
    q.bind(1, value);
    std::vector<DaySpend> out;
    while (q.executeStep()) {
      out.push_back({q.getColumn(0).getInt(), q.getColumn(1).getString(), q.getColumn(2).getInt64(),
                     static_cast<std::uint64_t>(q.getColumn(3).getInt64())});
    }
    return out;
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading spend_by_day: ") + e.what());
  }
}

std::int64_t Ledger::daySpend(std::int32_t day) {
  try {
    SQLite::Statement q(*db_, "SELECT COALESCE(SUM(cost_nano_usd), 0) FROM spend_by_day WHERE day = ?");
    q.bind(1, day);
    q.executeStep();
    return q.getColumn(0).getInt64();
  } catch (const SQLite::Exception& e) {
    throw LedgerError(std::string("reading spend_by_day: ") + e.what());
  }
}

}  // namespace tokenfuse
