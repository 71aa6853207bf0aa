// Retention under load: prunes a ledger of ROWS entries (default 10 million, spread over the last
// 100 days) down to retain_days = 30 while a writer books entries as the agent's ledger writer
// does (a transaction every 10 ms, fsynced), and compares that writer's transaction latency with
// and without the pruning. Usage:
//
//   build/bench/tokenfuse_retention_bench [DIR]        (default DIR: /var/tmp)
//
// Env: ROWS (10000000), RATE (entries per second booked by the writer, 1000), SECONDS (the
// baseline's length, 20). The ledger file (DIR/tokenfuse-retention-bench.db, about 2.5 GB) is
// made afresh and removed at the end. docs/performance.md has the figures.
#include "calendar_window.h"
#include "day_clock.h"
#include "ledger.h"
#include "retention.h"

#include <SQLiteCpp/SQLiteCpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

using namespace tokenfuse;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::int64_t kDayNs = std::int64_t{86400} * 1'000'000'000;

std::int64_t envInt(const char* name, std::int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoll(v) : fallback;
}

std::int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

LedgerEntry entry(std::uint64_t seq, std::int64_t unix_ns) {
  LedgerEntry e;
  e.seq = seq;
  e.unix_ns = unix_ns;
  e.day = static_cast<std::int32_t>(unix_ns / kDayNs);
  e.kind = "commit";
  e.project_id = "tenant-" + std::to_string(seq % 200);
  e.run_id = "run-" + std::to_string(seq / 50);
  e.agent_id = "agent-" + std::to_string(seq % 7);
  e.model = seq % 3 == 0 ? "gpt-4o" : "gpt-4o-mini";
  e.provider = "openai";
  e.prompt_tokens = 900 + static_cast<std::int64_t>(seq % 300);
  e.completion_tokens = 200 + static_cast<std::int64_t>(seq % 100);
  e.cost_nano_usd = 1'000'000 + static_cast<std::int64_t>(seq % 5000);
  e.reservation_id = seq;
  return e;
}

struct Latencies {
  std::vector<double> us;
  double at(double q) {
    if (us.empty()) return 0;
    std::sort(us.begin(), us.end());
    return us[std::min(us.size() - 1, static_cast<std::size_t>(q * static_cast<double>(us.size())))];
  }
  void print(const char* what) {
    const std::size_t n = us.size();
    std::printf("%-34s %7zu transactions   p50 %8.0f us   p99 %8.0f us   p99.9 %8.0f us   max %8.0f us\n", what, n,
                at(0.50), at(0.99), at(0.999), at(1.0));
  }
};

// Books `rate` entries a second, a transaction every 10 ms, until `stop`; times each transaction.
Latencies write(const std::string& path, std::atomic<std::uint64_t>& seq, std::int64_t rate,
                const std::atomic<bool>& stop) {
  Ledger ledger(path, "bench");
  Latencies l;
  const auto period = std::chrono::milliseconds(10);
  const std::int64_t per_batch = std::max<std::int64_t>(1, rate / 100);
  auto next = Clock::now();
  while (!stop.load()) {
    std::vector<LedgerEntry> batch;
    for (std::int64_t i = 0; i < per_batch; ++i) batch.push_back(entry(++seq, nowNs()));
    const auto t0 = Clock::now();
    ledger.append(batch);
    l.us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    next += period;
    std::this_thread::sleep_until(next);
  }
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/var/tmp";
  const std::string path = dir + "/tokenfuse-retention-bench.db";
  const std::int64_t rows = envInt("ROWS", 10'000'000);
  const std::int64_t rate = envInt("RATE", 1000);
  const std::int64_t seconds = envInt("SECONDS", 20);
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix);

  // A ledger of `rows` entries over the last 100 days, oldest first, made by SQLite itself (the
  // entries only: retention reads and removes nothing else).
  const std::int64_t now = nowNs();
  std::atomic<std::uint64_t> seq{static_cast<std::uint64_t>(rows)};
  {
    { Ledger schema(path, "bench"); }
    const auto t0 = Clock::now();
    SQLite::Database db(path, SQLite::OPEN_READWRITE);
    SQLite::Transaction txn(db);
    SQLite::Statement fill(
        db,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) "
        "INSERT INTO budget_ledger (seq, host_id, created_at_unix_ns, day, kind, project_id, agent_id, run_id, model, "
        "provider, prompt_tokens, completion_tokens, cost_nano_usd, reservation_id) "
        "SELECT i, 'bench', ?2 + i * ?3, (?2 + i * ?3) / 86400000000000, 'commit', 'tenant-' || (i % 200), "
        "'agent-' || (i % 7), 'run-' || (i / 50), CASE WHEN i % 3 = 0 THEN 'gpt-4o' ELSE 'gpt-4o-mini' END, 'openai', "
        "900 + i % 300, 200 + i % 100, 1000000 + i % 5000, i FROM n");
    fill.bind(1, rows);
    fill.bind(2, now - 100 * kDayNs);
    fill.bind(3, (100 * kDayNs - 3'600'000'000'000) / rows);
    fill.exec();
    SQLite::Statement count(db, "UPDATE meta SET value = ? WHERE key = 'rows'");
    count.bind(1, rows);
    count.exec();
    txn.commit();
    Ledger ledger(path, "bench");
    const LedgerSize s = ledger.size();
    std::printf("made %lld entries in %.0f s: %.2f GB (%.0f bytes an entry with its index)\n",
                static_cast<long long>(ledger.rowCount()), std::chrono::duration<double>(Clock::now() - t0).count(),
                static_cast<double>(s.bytes()) / 1e9, static_cast<double>(s.bytes()) / static_cast<double>(rows));
    std::fflush(stdout);
  }

  std::printf("writer: %lld entries/s, one fsynced transaction every 10 ms\n", static_cast<long long>(rate));
  // The writer alone.
  {
    std::atomic<bool> stop{false};
    std::thread timer([&] {
      std::this_thread::sleep_for(std::chrono::seconds(seconds));
      stop = true;
    });
    Latencies alone = write(path, seq, rate, stop);
    timer.join();
    alone.print("writer alone:");
    std::fflush(stdout);
  }
  // The writer while the pruner takes the ledger down to 30 days.
  {
    std::atomic<bool> stop{false};
    Latencies during;
    std::thread writer([&] { during = write(path, seq, rate, stop); });
    Ledger ledger(path, "bench");
    if (envInt("FSYNC", 0) == 0) ledger.skipFsync();   // as the agent's retention connection
    const CalendarWindows windows("UTC");
    const DayClock days("UTC");
    RetentionPolicy policy{30, 0};
    policy.batch_rows = envInt("BATCH", policy.batch_rows);
    policy.vacuum_pages = envInt("VACUUM_PAGES", policy.vacuum_pages);
    policy.pause = std::chrono::milliseconds(envInt("PAUSE_MS", policy.pause.count()));
    const auto t0 = Clock::now();
    const PruneReport r = Pruner(ledger, policy).pass(retentionBounds(policy, windows, days, nowNs(), UINT64_MAX));
    const double took = std::chrono::duration<double>(Clock::now() - t0).count();
    stop = true;
    writer.join();
    during.print("writer while pruning:");
    std::fflush(stdout);
    std::printf("pruned %lld entries in %.0f s (%.0f entries/s), returned %lld pages; %lld entries left, file %.2f GB\n",
                static_cast<long long>(r.removed()), took, static_cast<double>(r.removed()) / took,
                static_cast<long long>(r.pages_returned), static_cast<long long>(r.rows),
                static_cast<double>(r.size.bytes()) / 1e9);
  }
  // And alone again, on the smaller file.
  {
    std::atomic<bool> stop{false};
    std::thread timer([&] {
      std::this_thread::sleep_for(std::chrono::seconds(seconds));
      stop = true;
    });
    Latencies after = write(path, seq, rate, stop);
    timer.join();
    after.print("writer alone, after:");
  }
  for (const char* suffix : {"", "-wal", "-shm"}) std::filesystem::remove(path + suffix);
  return 0;
}
