// What only the owner of a region does: publish it, set limits, prices and the kill switch,
// return the holds of dead or overdue reservations, and reset the counters at the day boundary.
// Used by tokenfused (and by tests and benchmarks that stand in for it).
//
// Thread-safety: one RegionAdmin per region; its methods may be called from several threads of
// the owning process (the kill switch writer is serialised inside).
#pragma once

#include "engine.h"
#include "ledger.h"
#include "layout.h"
#include "region.h"
#include "rules.h"

#include <tokenfuse/tokenfuse.hpp>

#include <atomic>
#include <bitset>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tokenfuse {

struct ReapStats {
  std::uint32_t dead_owner = 0;     // holds returned because the owner process died
  std::uint32_t expired = 0;        // holds returned because the deadline passed
  std::uint32_t freed_expired = 0;  // expired slots finally recycled
  std::uint32_t stuck_keys = 0;     // half-written table keys of dead processes cleared
  // Reservations whose slot named a tenant or run index out of range (the region was written
  // from outside): their holds went back to the layers that exist, and the slot was freed.
  std::uint32_t corrupt = 0;
  bool any() const noexcept { return dead_owner + expired + freed_expired + stuck_keys + corrupt > 0; }
};

enum class LimitTable { kTenant, kRun };

// What one RegionAdmin::reclaimKeys call freed, per table; `kept`: keys it chose that turned out
// to be in use after all (a call looked them up meanwhile).
struct ReclaimStats {
  std::uint32_t tenants = 0, runs = 0, rule_counters = 0, kept = 0;
  std::uint32_t total() const noexcept { return tenants + runs + rule_counters; }
};

// One layer whose holds (used - committed) the agent corrected: what it held beyond (positive) or
// short of (negative) what the live reservations hold on it, unchanged over two sweeps.
struct HoldCorrection {
  const char* layer = "platform";   // "platform", "tenant" or "run"
  std::string id;                   // the tenant's or run's id; empty for the platform
  std::int64_t difference = 0;      // nano-USD taken out of `used` (negative: added)
};

// A live rule and its counters as they stand, for the views (RegionAdmin::rules).
struct LiveReservation {
  std::uint64_t id = 0;
  std::string project_id, run_id, model, agent_id;
  std::int64_t held_nano_usd = 0;                 // on each of its layers
  std::int64_t prompt_tokens = 0, completion_tokens = 0;   // charged so far (streamed calls)
  std::int64_t deadline_unix_ns = 0;
  std::uint32_t owner_pid = 0;                    // in the owner's pid namespace
  bool charging = false;                          // growing its hold (a streamed call)
};

struct RuleUsage {
  std::uint32_t number = 0;   // 1 + its index: what Decision::rule names
  std::uint32_t gen = 0;      // its definition's generation (setRuleElsewhere)
  std::string name;
  std::uint8_t scope = 0, metric = 0;   // shm::RuleScopeValue, shm::RuleMetricValue
  std::string match;          // as written: "", "x" or "x*"
  std::optional<std::int64_t> limit;   // the rule's own; nullopt: none
  WindowKind window = WindowKind::kAllTime;
  std::int64_t window_start_ns = 0, window_end_ns = INT64_MAX;   // INT64_MAX: never ends
  struct Counter {
    std::string key;          // "acme"; "acme/gpt-4o" for tenant x model; "" for a group or the platform
    std::string first;        // the tenant for the tenant scopes
    std::string second;       // the model or agent for tenant x model and tenant x agent
    std::int64_t committed = 0, held = 0, denials = 0;
    std::int64_t elsewhere = 0;   // counted on other hosts of the fleet (the central link)
    std::optional<std::int64_t> limit;   // what applies to it now; nullopt: unlimited
  };
  std::vector<Counter> counters;
};

// A rule counter for people: "<rule name>:<key>" (a prefix group shows its pattern; tenant x
// model shows "tenant/model").
std::string ruleCounterName(const shm::Header& h, std::string_view key);

class RegionAdmin {
 public:
  explicit RegionAdmin(Region& region);

  // Marks this process as the region's agent and, the first time, publishes the region.
  void publish(std::int64_t now_unix_ns, std::int32_t day) noexcept;
  void setClock(std::int64_t now_unix_ns) noexcept;

  // nullopt: unlimited.
  void setPlatformLimit(std::optional<NanoUsd> limit) noexcept;
  // Sets one entry's limit, creating the entry if needed. explicit=false puts it back on the
  // default. Fails with a message when the id is invalid or the table is full.
  Status setLimit(LimitTable table, std::string_view id, std::optional<NanoUsd> limit);
  Status clearLimit(LimitTable table, std::string_view id);   // back to the default
  // Changes the default and every entry that follows it.
  void setDefaultLimit(LimitTable table, std::optional<NanoUsd> limit) noexcept;
  // How many keys of `t` with an explicit limit found no table room, as one source of limits (the
  // agent's config and saved changes, or the central link's) counts them: while the sum over the
  // sources is non-zero, the library refuses every key of `t` that has no entry (layout.h,
  // Defaults::limited_untracked).
  enum class LimitSource { kAgent = 0, kCentral = 1 };
  void setLimitedUntracked(LimitTable t, std::uint32_t n, LimitSource source = LimitSource::kAgent) noexcept;
  // Calls fn(id, explicit_limit_or_nullopt) for every entry whose limit was set explicitly.
  void forEachExplicit(LimitTable table,
                       const std::function<void(std::string_view, std::optional<NanoUsd>)>& fn) const;

  // What the fleet's other hosts spent on budget day `day` (the central link), for a tenant
  // (creating its entry) or, with an empty id, the platform. Decisions count it as used. Refused
  // once the region has moved to another day, so a late answer never lands in the new day.
  Status setElsewhere(std::int32_t day, std::string_view project_id, NanoUsd spent);
  // Calls fn(project_id) for every tenant in the region.
  void forEachTenant(const std::function<void(std::string_view)>& fn) const;
  // Calls fn(id) for every entry of `table`.
  void forEachEntry(LimitTable table, const std::function<void(std::string_view)>& fn) const;
  // The `n` tenants nearest their daily limit (by the share spent, here and elsewhere), then the
  // unlimited ones spending most: one pass over the tenant table.
  std::vector<std::pair<std::string, BudgetView>> tenantsNearestLimit(std::size_t n) const;
  // Reservations holding budget now (active, or growing a streamed call's hold), at most `n`,
  // the oldest deadline first. Each is read twice over its state word: one that changed meanwhile
  // is left out, and ids are as their owner wrote them (possibly not UTF-8).
  std::vector<LiveReservation> liveReservations(std::size_t n) const;

  Status setPrice(std::string_view model, Price price);
  // Every model name in the price table.
  std::vector<std::string> models() const;
  Status setFallbackPrice(Price price);
  void setReservationTtl(std::int64_t ttl_ns) noexcept;

  void setKill(std::string_view reason, std::int64_t since_unix_ns, std::int64_t expires_unix_ns) noexcept;
  void clearKill() noexcept;
  // Turns an expired kill switch off. Returns true if it did.
  bool expireKill(std::int64_t now_unix_ns) noexcept;

  // Returns the holds of reservations whose owner died or whose deadline passed, and clears
  // half-written keys left by dead processes. A reservation's owner is dead when no process holds
  // its client lock (client_lock.h); the agent's own (client 0) are freed by deadline only.
  ReapStats reap(std::int64_t now_unix_ns);

  // Compares every layer's holds (used - committed) with the sum of what live reservations hold
  // on it (by state and progress; a step in flight counts as a range) and corrects a difference
  // seen, the same, in two consecutive calls while the layer did not move during either scan:
  // a process killed between a layer change and its progress step leaks its hold for ever
  // otherwise (rollover keeps holds; runs never roll over). Counted in stats.holds_reconciled.
  // Call it after reap(), every sweep; O(reservations + tables). Not thread-safe with itself.
  std::vector<HoldCorrection> reconcileHolds();

  // Frees the table entries nothing needs any more, so that a region of fixed size serves any
  // number of keys over time (table.h says how a lookup takes a key back from a reclaim):
  //   - a tenant with nothing booked, held, counted or spent elsewhere in the current day;
  //   - a rule counter with nothing held and nothing counted in its current window, or of a rule
  //     that no longer exists;
  //   - a run with nothing held that booked nothing, or whose last booking is `run_idle_ns` old:
  //     its totals stay in the ledger, and the agent adds them back if the run returns
  //     (addHistory).
  // Keys with an explicit limit stay. A key goes only when two calls in a row found it idle with
  // its word unchanged, so one just added is not taken before its first use. Not thread-safe
  // with itself, reap() or the writers of limits; it takes stats_mu_ against the statistics'.
  ReclaimStats reclaimKeys(std::int64_t now_unix_ns, std::int64_t run_idle_ns);
  // For the ledger writer: the ledger's tail when the entry of `run_id` was made, if what the run
  // booked before that (on an entry since reclaimed) is not on it yet (Counters::history).
  std::optional<std::uint64_t> runWithoutHistory(std::string_view run_id);
  // Adds what a run booked before its entry was made (from the ledger: its entries up to
  // `born_seq`) to that entry, once.
  void addHistory(std::string_view run_id, std::uint64_t born_seq, const LedgerTotal& earlier);
  // Keys reclaimed since this agent started: tenants, runs, rule counters.
  std::uint64_t reclaimed(LimitTable t) const noexcept { return reclaimed_[t == LimitTable::kTenant ? 0 : 1].load(); }
  std::uint64_t reclaimedRuleCounters() const noexcept { return reclaimed_[2].load(); }

  // Sets an unpublished region's counters from the ledger: `committed` and the token and call
  // counts of one entry (creating it; id empty means the platform). Only before publish: it
  // overwrites, so it must not race with clients.
  Status restore(LimitTable table, std::string_view id, NanoUsd committed, std::int64_t prompt_tokens,
                 std::int64_t completion_tokens, std::int64_t calls);

  // Adds a ledger entry that is now durable to the token and call statistics of its tenant and
  // platform (when it belongs to the current budget day) and of its run. Serialised with
  // rollover(), so an entry never lands in the wrong day's statistics.
  void addStats(std::string_view project_id, std::string_view run_id, std::int32_t day, std::int64_t prompt_tokens,
                std::int64_t completion_tokens);
  // Sets statistics outright (an agent start over an adopted region resyncs them from SQLite).
  // id empty: the platform. Entries not in the table are skipped.
  void setStats(LimitTable table, std::string_view id, std::int64_t prompt_tokens, std::int64_t completion_tokens,
                std::int64_t calls);
  // Zeroes the token and call statistics of every tenant, run and the platform.
  void clearStats();

  // Starts budget day `day`: daily counters (platform and tenants) go to zero, holds stay held.
  // Run budgets are not daily: a run's spending counts for the run's whole life.
  void rollover(std::int32_t day);
  std::int32_t day() const noexcept;

  // The committed spending of every daily layer: the platform (id "") and each tenant.
  std::vector<std::pair<std::string, std::int64_t>> dailyCommitted() const;
  // Moves the budget day back to `day` (a clock step forward, later corrected, rolled it over
  // too early) and adds delta[id] to each daily layer's committed spending (and to its used), in
  // one 16-byte compare-and-swap per layer, so that a commit landing meanwhile is neither lost nor
  // counted twice; committed never goes below 0. Id "" is the platform. Fails, changing no day,
  // if a tenant cannot be added to a full table.
  Status backdate(std::int32_t day, const std::vector<std::pair<std::string, std::int64_t>>& delta);

  // --- budget rules (rules.h, docs/rules.md) ---
  // Makes `rules` the region's rules. A rule already live with the same name, scope, match,
  // metric and window keeps its index and its counters (its limit and keys are updated); the
  // others are written into free definitions, and live rules not in `rules` are retired (nothing
  // matches them any more). windows[i] is rules[i]'s current window. Fills *indices with each
  // rule's index. Fails, changing nothing, for more than shm::kMaxRules rules or when no
  // definition is free; a key that finds no counter room is reported in the Status (its rule
  // then refuses keys it cannot count: E-TOKENFUSE-CAPACITY) and the rest is applied.
  Status setRules(const std::vector<RuleSpec>& rules, const std::vector<WindowSpan>& windows,
                  std::vector<std::uint32_t>* indices);
  // Starts window [start_ns, end_ns) of rule `index`: every counter's committed count goes to
  // zero, holds stay held, as rollover() does for days. With `sliding`, a counter keeps what it
  // counted as its `previous` window's, when that window ended where this one starts.
  void rollRule(std::uint32_t index, std::int64_t start_ns, std::int64_t end_ns, bool sliding = false);
  // Sliding rules at `now_ns` (sliding[i]: rule index i slides): each counter that carries a
  // previous window gets as `elsewhere` the share of it that the last window-length of time
  // still covers (rounded up), which decisions count as used; counters of rules that no longer
  // slide carry nothing. One pass over the rule table.
  void slideRules(const std::bitset<shm::kMaxRules>& sliding, std::int64_t now_ns);
  // Counts what a call's ids spent (a row of the ledger's totals: `prompt`, `completion`, `cost`
  // over `calls` calls) on every counter of every live rule that matches those ids and whose
  // window starts at `window_start_ns` (INT64_MIN: rules of all time), as committed. For a new
  // region, before it is published: the rebuild from the ledger. Returns how many counters it
  // could not create (table full).
  std::uint32_t restoreRules(const RuleCall& ids, std::int64_t window_start_ns, std::int64_t cost, std::int64_t prompt,
                             std::int64_t completion, std::int64_t calls);
  // Every live rule with its counters (one pass over the rule table).
  std::vector<RuleUsage> rules() const;
  // Sets what other hosts counted on the counter of rule `index` for `first` (and `second`) in
  // the window that starts at `window_start_ns` (ignored for rules of all time), as the central
  // link pulled it: decisions count it as used. Does nothing if the rule was replaced (its
  // generation is not `gen`), its window has rolled over since, or the counter is gone.
  void setRuleElsewhere(std::uint32_t index, std::uint32_t gen, std::int64_t window_start_ns, std::string_view first,
                        std::string_view second, std::int64_t elsewhere);
  // Zeroes `elsewhere` on the counters of every rule not in `keep`: the rules the fleet shares,
  // and the sliding ones (whose `elsewhere` is their carry). For a rule no longer shared, or no
  // central link any more.
  void clearRuleElsewhere(const std::bitset<shm::kMaxRules>& keep);
  // When the current budget day ends, for the daily layers' denials (Decision::resets_unix_ns).
  void setDayEnd(std::int64_t unix_ns) noexcept;

  Engine& engine() noexcept { return engine_; }
  Region& region() noexcept { return region_; }
  shm::Header& header() noexcept { return region_.header(); }

 private:
  KeyedTable<shm::BudgetSlot> table(LimitTable t) const noexcept;
  const std::atomic<std::int64_t>& defaultLimit(LimitTable t) const noexcept;

  // reconcileHolds(): each layer's difference at the previous call (0: none, or it moved).
  std::vector<std::int64_t> last_difference_;
  // reclaimKeys(): per table (tenant, run, rule), each slot's word when last found idle; 0: not.
  std::vector<std::uint64_t> idle_seen_[3];
  std::atomic<std::uint64_t> reclaimed_[3] = {};   // keys reclaimed so far, per table

  Region& region_;
  Engine engine_;
  std::mutex kill_mu_;
  std::mutex stats_mu_;   // addStats against rollover; limits and statistics against reclaimKeys
  std::atomic<std::uint32_t> limited_untracked_[2][2] = {};   // by table, by LimitSource
};

}  // namespace tokenfuse
