// Moves ledger entries from the region's ring into SQLite: the ring's only consumer. An entry's
// ring slot is handed back only after the transaction holding it is on disk, and the durable
// position (header.ledger_head) advances with it, so a crash of the agent at any point loses
// nothing and a restart writes nothing twice (re-reads are ignored by their sequence number).
#pragma once

#include "admin.h"
#include "ledger.h"
#include "ledger_ring.h"
#include "region.h"

#include <chrono>
#include <cstdint>
#include <stop_token>
#include <vector>

namespace tokenfuse {

struct DrainStats {
  std::size_t written = 0;     // entries now durable in SQLite
  std::size_t skipped = 0;     // void entries and slots abandoned by a dead writer
  bool any() const noexcept { return written + skipped > 0; }
};

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
  LedgerWriter(RegionAdmin& admin, Ledger& ledger, std::string host_id, Options options);

  // Writes every published entry (up to max_batch) in one transaction. Throws LedgerError.
  DrainStats drainOnce();
  // Drains every flush_interval until stopped, then drains what is left.
  void run(std::stop_token stop);

 private:
  bool abandoned(std::uint64_t pos);

  RegionAdmin& admin_;
  Region& region_;
  Ledger& ledger_;
  LedgerRing ring_;
  std::string host_id_;
  Options options_;
  std::vector<LedgerEntry> batch_;
  std::vector<std::uint64_t> abandoned_;   // positions of this batch already handed back
  std::uint64_t stuck_pos_ = UINT64_MAX;
  std::chrono::steady_clock::time_point stuck_since_;
};

}  // namespace tokenfuse
