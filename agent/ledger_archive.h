// `tokenfuse ledger archive --before DATE`: moves old entries out of ledger.db into a gzip file of
// JSON lines, one entry a line (toJson's fields, plus created_at_unix_ns, budget_day and
// cost_nano_usd, so nothing is rounded). Entries are removed only after the file is complete,
// fsynced and renamed to its name, and they leave through Ledger::removeEntries, so their totals
// stay in pruned_totals for the all-time rules.
//
// It keeps what retention keeps (retention.h): the agent leaves its bounds in the ledger's meta
// table on every pass (retention_keep_since_ns, retention_pushed_seq); without them, entries of
// the last 38 days and those the central link has not pushed stay.
#pragma once

#include "ledger.h"

#include <cstdint>
#include <string>

namespace tokenfuse {

struct ArchiveOptions {
  std::int64_t before_unix_ns = 0;   // entries booked before it
  std::int64_t now_unix_ns = 0;      // for the bound without the agent's
  std::string path;                  // must not exist; written as path + ".tmp" first
  std::int64_t page_rows = 10000;
};

struct ArchiveReport {
  std::int64_t written = 0;        // entries in the file
  std::int64_t removed = 0;        // of them, removed from the ledger (fewer if the agent pruned some meanwhile)
  std::uint64_t first_seq = 0, last_seq = 0;
  std::int64_t file_bytes = 0;
  std::int64_t before_unix_ns = 0;   // the bound used: the one asked for, or earlier (what must stay)
  std::string kept_because;          // what stayed that was asked for, and why ("; " between); "" none
};

// Throws LedgerError, or std::runtime_error naming the file: before anything is removed, the
// ledger is as it was.
ArchiveReport archiveLedger(Ledger& ledger, const ArchiveOptions& options);

}  // namespace tokenfuse
