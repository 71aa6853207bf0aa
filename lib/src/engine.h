// The budget engine: every data-plane operation on a region. Client is a thin owner around it;
// tokenfused uses it directly for its HTTP API. All methods are noexcept, allocate nothing and
// make no system call, except the views, which copy strings.
//
// Thread-safety: any number of Engines in any number of threads and processes may work on the
// same region at once.
#pragma once

#include "layout.h"
#include "ledger_ring.h"
#include "region.h"
#include "rule_match.h"
#include "table.h"

#include <tokenfuse/tokenfuse.hpp>

namespace tokenfuse {

class Engine {
 public:
  // `agent`: reservations this engine makes belong to "the agent" (client number 0), whichever
  // agent process runs now, so that an agent restart does not free them (tokenfused's HTTP API).
  explicit Engine(const Region& region, bool agent = false) noexcept;

  Decision prepare(const Call& call, CallSite* site, bool insert) noexcept;
  Decision check(const CallSite& site, std::int64_t prompt, std::int64_t completion) const noexcept;
  Decision reserve(const CallSite& site, std::int64_t prompt, std::int64_t completion, std::int64_t ttl_ms,
                   Reservation* out) noexcept;
  Decision commit(Reservation r, std::string_view provider, std::int64_t prompt, std::int64_t completion) noexcept;
  Decision charge(Reservation r, std::int64_t more_prompt, std::int64_t more_completion) noexcept;
  Decision release(Reservation r) noexcept;
  Decision record(const Usage& usage) noexcept;

  Price price(const CallSite& site) const noexcept;
  bool killed() const noexcept;

  KillSwitchState killSwitch() const;
  BudgetView tenant(std::string_view project_id) const;
  BudgetView run(std::string_view run_id) const;
  BudgetView platform() const;
  std::uint32_t liveReservations() const noexcept;
  std::uint64_t durableLedgerSeq() const noexcept { return h_.ledger_head.load(std::memory_order_acquire); }

  // This process's client number (client_lock.h): what reservation words, ledger slots and the
  // words of table keys being inserted name.
  std::uint32_t self() const noexcept { return region_.client(); }

 private:
  struct Layers {
    shm::Counters* at[shm::kLayerCount];
  };
  Layers layersOf(std::int32_t run, std::int32_t tenant) const noexcept;
  // A call site's tenant and run entries, each checked against the word it was found with: a key
  // reclaimed since the site was prepared is looked up again (inserted when `insert`). False when
  // a slot is busy.
  struct Keys {
    std::int32_t tenant, run;
    std::uint64_t tenant_word, run_word;
  };
  bool keysOf(const CallSite& site, bool insert, Keys* keys) const noexcept {
    *keys = {site.tenant, site.run, site.tenant_word, site.run_word};
    // The usual case: both entries are still the site's (a load each).
    if ((keys->tenant < 0 || tenants_.current(keys->tenant, keys->tenant_word)) &&
        (keys->run < 0 || runs_.current(keys->run, keys->run_word))) {
      return true;
    }
    return findKeys(site, insert, keys);
  }
  bool findKeys(const CallSite& site, bool insert, Keys* keys) const noexcept;
  // After holding on them (and a fence): whether every entry held on is still the call's. One
  // that is not is the agent's reclaim winning the race, so the holds go back and the call
  // looks its keys up again.
  bool stillCurrent(const Keys& keys, const RuleHits& hits) const noexcept;
  static void unhold(const Layers& layers, std::uint32_t n, std::int64_t amount) noexcept;
  BudgetView view(const shm::Counters* c, std::int64_t default_limit) const;
  int claimSlot(std::uint32_t client, std::uint64_t* word) noexcept;
  // Counts a refusal (E-BUDGET-001 .. -007, E-RATE-*, E-CONCURRENCY-001) in the region's
  // statistics; returns `code`.
  Code denied(Code code) const noexcept {
    const int n = static_cast<int>(code);
    auto& counter = n <= 4 ? h_.stats.denied[n - 1] : h_.stats.denied_by_rule[n - 5];
    counter.fetch_add(1, std::memory_order_relaxed);
    return code;
  }
  // A rule's denial: its code (counted), the rule and when its window ends.
  void deniedByRule(const RuleHit& hit, Decision* d) const noexcept;
  // The built-in daily layers' denials say when the day ends; a run's never resets.
  void deniedByLayer(std::uint32_t layer, Decision* d) const noexcept;
  // The rules that apply to the call `site` describes (creating their counters when `insert`);
  // a failure to match is the returned decision's code.
  Decision matchSite(const CallSite& site, bool free, bool insert, RuleHits* hits,
                     bool best_effort = false) const noexcept;
  // check()'s work, into *d (a default Decision).
  void decide(const CallSite& site, std::int64_t prompt, std::int64_t completion, Decision* d) const noexcept;
  // check() for the rules, once the built-in layers allowed the call: a denial goes into *d.
  void checkRules(const CallSite& site, bool free, std::int64_t prompt, std::int64_t completion,
                  Decision* d) const noexcept;
  shm::Counters* ruleCounters(std::int32_t slot) const noexcept { return region_.ruleCounters(slot); }
  // Ends a reservation: returns its hold and, if `book_cost`, books the call's cost.
  Decision settle(Reservation r, bool book_cost, std::int64_t prompt, std::int64_t completion,
                  shm::LedgerSlot* entry, std::string_view provider) noexcept;
  // Claims a ledger slot for a commit or record; nullptr (and counted) when the ring is full.
  // A ring slot for a new entry, or nullptr with *refused saying why (kLedgerUnavailable,
  // kLedgerFull or kRegionCorrupt).
  shm::LedgerSlot* claimEntry(std::uint64_t* pos, Code* refused) noexcept;
  // Takes the reservation `r` out of one of the `accepted` states into kResSettling or
  // kResCharging, owned by this process. Returns the state it left, or kResFree when `r` is
  // not live. *word is the word it now owns, *owner the client the reservation belongs to.
  shm::ResState acquire(Reservation r, std::uint32_t accepted_mask, shm::ResState into, std::uint64_t* word,
                        std::uint32_t* owner) noexcept;

  // Whether the region's file was truncated under this mapping (Region::lost): one load of
  // this process's memory, so the hot path pays about nothing for it.
  bool lost() const noexcept { return lost_.load(std::memory_order_relaxed) != 0; }
  // A CallSite comes from the caller's memory: its indices are checked before they are used.
  bool siteInRange(const CallSite& site) const noexcept {
    return site.tenant >= site_index::kAbsent && site.tenant < static_cast<std::int64_t>(tenants_.capacity()) &&
           site.run >= site_index::kAbsent && site.run < static_cast<std::int64_t>(runs_.capacity()) &&
           site.model >= site_index::kNone && site.model < static_cast<std::int64_t>(models_.capacity());
  }

  const Region& region_;
  const std::atomic<std::uint32_t>& lost_;
  shm::Header& h_;
  KeyedTable<shm::BudgetSlot> tenants_;
  KeyedTable<shm::BudgetSlot> runs_;
  KeyedTable<shm::ModelSlot> models_;
  KeyedTable<shm::RuleSlot> rule_table_;
  LedgerRing ring_;
  shm::ReservationSlot* res_;
  std::uint32_t res_mask_;
  bool agent_;
};

// What prepare put in a CallSite (the public type is opaque). For the tests, which check what
// prepare found and stand in for a caller whose CallSite memory was overwritten.
struct SiteIndices {
  std::int32_t tenant, run, model;  // a slot index, or a site_index marker
};
struct CallSiteAccess {
  static SiteIndices get(const CallSite& s) noexcept { return {s.tenant, s.run, s.model}; }
  static void set(CallSite* s, SiteIndices i) noexcept {
    s->tenant = i.tenant;
    s->run = i.run;
    s->model = i.model;
  }
};
inline SiteIndices siteIndices(const CallSite& s) noexcept { return CallSiteAccess::get(s); }

// This process's pid, cached and refreshed after fork (getpid() is a system call).
std::uint32_t selfPid() noexcept;

}  // namespace tokenfuse
