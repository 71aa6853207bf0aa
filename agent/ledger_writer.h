// Moves ledger entries from the region's ring into SQLite: the ring's only consumer. An entry's
// ring slot is handed back only after the transaction holding it is on disk, so a crash of the
// agent at any point loses nothing and a restart writes nothing twice (re-reads are ignored by
// their sequence number).
//
// The region is writable by every member of its group, so the writer trusts none of it: its
// durable position (head) lives here, read from SQLite at start and advanced with each
// transaction, and is only published to the region (for waitDurable and info); every pass is
// bounded; an entry that cannot be valid goes to the quarantine table, never into the budget
// rows; ring words no correct process writes are repaired.
#pragma once

#include "region_admin.h"
#include "ledger.h"
#include "ledger_ring.h"
#include "region.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <stop_token>
#include <string>
#include <unordered_map>
#include <vector>

namespace tokenfuse {

class LedgerFile;

struct DrainStats {
  std::size_t written = 0;       // entries now durable in SQLite
  std::size_t skipped = 0;       // void entries and slots abandoned by a dead writer
  std::size_t quarantined = 0;   // entries that cannot be valid, set aside
  std::size_t restamped = 0;     // sound entries whose time or day (from the header) was wrong
  bool any() const noexcept { return written + skipped + quarantined > 0; }
};

// What the agent's metrics show about the ledger. One agent per process.
struct LedgerHealth {
  std::atomic<std::uint64_t> quarantined{0};   // entries set aside since start
  std::atomic<std::uint64_t> ring_repairs{0};  // ring words reset since start
  std::atomic<std::uint32_t> unavailable{0};   // 1 while acknowledgements are stopped
  // Retention (Agent::pruneLedger), as its last pass left them.
  std::atomic<std::int64_t> rows{0};
  std::atomic<std::int64_t> file_bytes{0};      // ledger.db and its WAL
  std::atomic<std::int64_t> used_bytes{0};      // pages in use
  std::atomic<std::int64_t> oldest_unix_ns{0};  // 0: empty
  std::atomic<std::int64_t> last_prune_unix_ns{0};
  std::atomic<std::uint64_t> pruned{0};         // entries removed since start
  std::atomic<std::uint32_t> over_ceiling{0};   // 1: above max_size_mb with nothing more it may remove
  std::atomic<std::int64_t> disk_free_bytes{-1};   // the data dir's file system; -1: unknown
  std::atomic<std::int64_t> disk_size_bytes{-1};
  std::atomic<std::uint32_t> disk_low{0};       // 1: less free than disk_warn_percent
};
LedgerHealth& ledgerHealth() noexcept;

class LedgerWriter {
 public:
  struct Options {
    std::size_t max_batch = 65536;
    std::chrono::milliseconds flush_interval{10};
    // A slot claimed but never published, whose writer's pid is unknown (another pid namespace),
    // is abandoned after this. A writer whose pid is known is abandoned only once proven dead.
    std::chrono::milliseconds abandon_after{60'000};
  };

  // Entries it writes also go into the region's token and call statistics, through `admin`.
  // Its head is the ledger's durable head (Ledger::durableHead).
  LedgerWriter(RegionAdmin& admin, Ledger& ledger, std::string host_id, Options options);

  // Writes every published entry (up to max_batch) in one transaction. Throws LedgerError.
  DrainStats drainOnce();
  // Drains every flush_interval until stopped, then drains what is left. Each pass is bounded,
  // and it stops the applications' acknowledgements while the ledger cannot be written.
  void run(std::stop_token stop);
  // One pass of run(): checks the file (restoring a deleted one), drains, and sets the region's
  // ledger_unavailable word to what it found. Returns whether the ledger is writable.
  bool pass(const std::stop_token& stop = {});

  // The ledger's file, checked on every pass (default: not checked).
  void watchFile(LedgerFile* file) noexcept { file_ = file; }
  // Unix time in ns, for the plausibility of an entry's time and day (default: not checked).
  void setClock(std::function<std::int64_t()> clock) { clock_ = std::move(clock); }
  // The agent's budget day, for entries whose stamp must be replaced (see timeProblem). Without
  // it, such entries are quarantined.
  void setDay(std::function<std::int32_t()> day) { day_ = std::move(day); }

  // Every entry up to this sequence number is dealt with. The agent's own copy.
  std::uint64_t head() const noexcept { return head_; }
  // Called by the constructor, on an adopted region as on a new one: sets a tail that cannot be right from what the ring holds,
  // and resets the slots ahead of the tail whose sequence word no correct process would leave
  // there (entries behind the tail are left to drainOnce, which writes the valid ones). Returns
  // how many words it changed.
  std::size_t repair();

 private:
  bool abandoned(std::uint64_t pos);
  void fixTail();
  // Resets the sequence words of up to `n` slots from `from` on that are neither free for their
  // ticket nor claimed or published: so producers are not refused one slot at a time.
  void healAhead(std::uint64_t from, std::uint64_t n);
  // Reads the slot once into a copy and sorts it: written to batch_, to quarantine_, or skipped.
  void take(std::uint64_t pos, const shm::LedgerSlot& s, const char* why, DrainStats& stats);
  void setAvailable(bool available, const std::string& problem);

  RegionAdmin& admin_;
  Region& region_;
  Ledger& ledger_;
  // drainOnce: the batch's runs whose entry lacks what they booked before it was made.
  struct History {
    std::uint64_t born;          // Counters::born_seq: later ledger entries are booked on it
    std::int64_t cost_since;     // the batch's cost booked on it
    LedgerTotal batch;           // the batch's tokens and calls (addStats counts them)
  };
  std::unordered_map<std::string, History> history_;
  LedgerRing ring_;
  std::string host_id_;
  Options options_;
  LedgerFile* file_ = nullptr;
  std::function<std::int64_t()> clock_;
  std::function<std::int32_t()> day_;
  std::string restamp_example_;   // one pass's first restamped entry, for the log line
  std::uint64_t head_ = 0;
  std::vector<LedgerEntry> batch_;
  std::vector<QuarantinedEntry> quarantine_;
  std::vector<std::uint64_t> release_;     // positions to hand back once the batch is durable
  std::uint64_t stuck_pos_ = UINT64_MAX;
  std::chrono::steady_clock::time_point stuck_since_;
  bool unavailable_ = false;
  std::string problem_;
};

}  // namespace tokenfuse
