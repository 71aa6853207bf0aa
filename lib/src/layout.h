// The bytes of the shared-memory region. Everything here is fixed-width and standard-layout:
// indices instead of pointers, no virtuals, no references, so that every process maps the same
// meaning at whatever address. docs/shm-format.md describes the same layout for people.
//
// Concurrency rules:
//   - Header fields that are not atomic are written once by the creator, before `ready` is set
//     with release order, and never again.
//   - Everything that changes afterwards is a lock-free std::atomic; no lock lives here, so no
//     crashed process can leave one held.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace tokenfuse::shm {

inline constexpr std::uint64_t kMagic = 0x31'45'53'55'46'4e'4b'54ull;   // "TKNFUSE1"
// Increment whenever anything in this file changes the bytes or the meaning of the region.
inline constexpr std::uint32_t kLayoutVersion = 8;

inline constexpr std::size_t kKeyMax = 128;      // project_id, run_id, model, agent_id bytes
inline constexpr std::size_t kReasonMax = 256;   // kill switch reason bytes
inline constexpr std::int64_t kUnlimited = -1;   // a limit that is not set (the reference's NULL)
inline constexpr std::int32_t kNoSlot = -1;

static_assert(std::atomic<std::int64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

// A layer's spending: `used` (committed + held) and `committed`, side by side in 16 bytes and
// changed together by one 16-byte compare-and-swap. A commit thus moves money from held to
// committed in a single atomic step, and the day rollover zeroes `committed` and takes it out of
// `used` in another. Halves are read with ordinary 8-byte atomic loads.
struct alignas(16) Spend {
  std::int64_t used() const noexcept { return __atomic_load_n(&used_, __ATOMIC_RELAXED); }
  std::int64_t committed() const noexcept { return __atomic_load_n(&committed_, __ATOMIC_RELAXED); }

  // used += amount, unless that would pass `limit` (kUnlimited: no limit). On refusal *seen is
  // the `used` that refused it.
  bool tryHold(std::int64_t amount, std::int64_t limit, std::int64_t* seen) noexcept;
  void add(std::int64_t used_delta, std::int64_t committed_delta) noexcept;
  // Starts a new day: {used, committed} -> {used - committed, 0}. Returns what was committed.
  std::int64_t takeCommitted() noexcept;
  // Overwrites both; only while no other process can use the region (before it is published).
  void reset(std::int64_t used, std::int64_t committed) noexcept {
    __atomic_store_n(&used_, used, __ATOMIC_RELAXED);
    __atomic_store_n(&committed_, committed, __ATOMIC_RELAXED);
  }

  std::int64_t used_;
  std::int64_t committed_;
};
static_assert(sizeof(Spend) == 16);

// One budget layer: the platform, a tenant or a run. Money in nano-USD. The first cache line is
// what decisions read and write; the second holds statistics the agent writes.
struct alignas(64) Counters {
  Spend spend;                             // CAS-guarded against limit; applications keep it
  std::atomic<std::int64_t> limit;         // kUnlimited, or the most committed + held may reach
  // Spent today on other hosts of the fleet (the central link; 0 without one). The agent sets it;
  // decisions count it as used, so the layer allows limit - elsewhere here.
  std::atomic<std::int64_t> elsewhere;
  std::atomic<std::int64_t> denials;       // applications count their denials
  std::atomic<std::uint32_t> limit_explicit;  // 0: limit follows the region default
  // Runs only (their budget is lifelong, their entry may be reclaimed: RegionAdmin::reclaimKeys):
  // 1 once the agent has added what the run booked before this entry was made (or restored the
  // entry with its totals); born_seq is the ledger's tail when the entry was made, so that the
  // ledger entries before it are told from those booked on this entry.
  std::atomic<std::uint32_t> history;
  std::atomic<std::uint64_t> born_seq;
  // Statistics the agent keeps from the ledger entries it writes, so that the hot path pays for
  // money only. They trail the ledger by at most its flush interval.
  alignas(64) std::atomic<std::int64_t> prompt_tokens;
  std::atomic<std::int64_t> completion_tokens;
  std::atomic<std::int64_t> calls;
  // When the last call the ledger booked for it was made (the agent's clock), or when its totals
  // were restored; 0: none yet. A run idle longer than its lifetime may be reclaimed.
  std::atomic<std::int64_t> last_unix_ns;
  // Counters of sliding rules only: what the previous window counted. The agent keeps
  // `elsewhere` at its share still inside the sliding window (RegionAdmin::slideRules).
  std::atomic<std::int64_t> previous;
};
static_assert(sizeof(Counters) == 128);

// Key slot state word: [63..32] hash tag | [31..30] state | [29..0] by state:
//   kKeyEmpty      never used (all zero);
//   kKeyInit       being filled by the client number in [28..0] (client_lock.h; keyPid()), or, with
//                  bit 29 (kKeyReclaiming) set, the agent deciding whether to reclaim the key of
//                  generation [28..0]: anyone who looks that key up takes it back (table.h);
//   kKeyReady      holds a key; [28..0] its generation, which grows each time the slot is reused,
//                  so a word seen once and seen again means the same key is still there;
//   kKeyTombstone  held the key of generation [28..0] and is free for another.
enum KeyState : std::uint32_t { kKeyEmpty = 0, kKeyInit = 1, kKeyReady = 2, kKeyTombstone = 3 };
inline constexpr std::uint32_t kKeyReclaiming = 1u << 29;
inline constexpr std::uint32_t kKeyGenMask = kKeyReclaiming - 1;

template <std::size_t N>
struct KeyHeaderOf {
  std::atomic<std::uint64_t> word;
  std::uint32_t key_len;      // written before the word turns kKeyReady
  char key[N];
};
using KeyHeader = KeyHeaderOf<kKeyMax>;

// A tenant or run entry of an open-addressing hash table (table.h).
struct alignas(64) BudgetSlot {
  KeyHeader k;
  alignas(64) Counters c;
};
static_assert(sizeof(BudgetSlot) == 320);
static_assert(offsetof(BudgetSlot, c) == 192);

// A price table entry. Rates are atomics so the agent can change a price while clients read it.
struct alignas(64) ModelSlot {
  KeyHeader k;
  alignas(64) std::atomic<std::int64_t> prompt_nano_per_mtok;
  std::atomic<std::int64_t> completion_nano_per_mtok;
};
static_assert(sizeof(ModelSlot) == 256);

// --- budget rules ------------------------------------------------------------------------------
// Rules beyond the three built-in layers (docs/rules.md): the agent writes their definitions;
// applications match each call against them and keep one counter per rule and key in the rule
// table. Scope and metric values are agent/rules.h's RuleScope and RuleMetric.
// Rule definitions in a region: twice the rules that may be in force at once (the agent's
// config.h kMaxRules), so that a rule changed in shape always finds a definition that was free or
// retired before, never one rewritten under a process reading it.
inline constexpr std::uint32_t kMaxRules = 64;
inline constexpr std::uint32_t kMaxRuleHolds = 8;    // rule counters one call may match
enum RuleScopeValue : std::uint8_t {
  kScopePlatform = 0, kScopeTenant = 1, kScopeRun = 2, kScopeAgent = 3, kScopeModel = 4, kScopeTag = 5,
  kScopeTenantModel = 6, kScopeTenantAgent = 7
};
enum RuleMetricValue : std::uint8_t {
  kMetricUsd = 0, kMetricTokens = 1, kMetricPromptTokens = 2, kMetricCompletionTokens = 3, kMetricRequests = 4,
  kMetricConcurrency = 5
};
// A rule counter's key: the rule's number (4 bytes: index and generation), then the scope's ids,
// two of them (tenant x model, tenant x agent) separated by a NUL, which no id contains.
inline constexpr std::size_t kRuleKeyMax = 4 + kKeyMax + 1 + kKeyMax + 3;   // 264

// Rule definition word: [31..8] generation | [7..0] RuleState. Every field but the atomics is
// written while the rule is not live and never while it is; a reader checks the word again after
// reading them, so a definition replaced under it is read again, never half-old.
enum RuleState : std::uint32_t { kRuleFree = 0, kRuleLive = 1, kRuleRetired = 2 };
constexpr std::uint32_t ruleWord(std::uint32_t gen, RuleState st) noexcept { return (gen << 8) | st; }
constexpr RuleState ruleState(std::uint32_t w) noexcept { return static_cast<RuleState>(w & 0xffu); }
constexpr std::uint32_t ruleGen(std::uint32_t w) noexcept { return w >> 8; }

struct alignas(64) RuleDef {
  std::atomic<std::uint32_t> word;
  std::uint8_t scope;                        // RuleScopeValue
  std::uint8_t metric;                       // RuleMetricValue
  std::uint8_t match_prefix;                 // 1: `match` is a prefix, and its keys one group
  std::uint8_t has_window;                   // 0: all time (never resets)
  std::uint32_t match_len;                   // 0: every key
  std::uint32_t name_len;
  // Keys with their own limit (config) that the agent found no room for: while non-zero, a key
  // of this rule without a counter may be one of them, and is refused (E-TOKENFUSE-CAPACITY).
  std::atomic<std::uint32_t> limited_untracked;
  std::uint8_t window_kind;                  // for people: agent/calendar_window.h's WindowKind
  std::uint8_t week_start;                   // for people: 0 Sunday .. 6 Saturday
  std::uint16_t pad_;
  std::atomic<std::int64_t> limit;           // for every key without its own; kUnlimited: none
  std::atomic<std::int64_t> window_start_ns; // the current window, kept by the agent
  std::atomic<std::int64_t> window_end_ns;   // exclusive; INT64_MAX: never ends
  char match[kKeyMax];
  char name[64];
};
static_assert(sizeof(RuleDef) == 256);

// A rule's counter for one key. `c.limit` applies when `c.limit_explicit` is set; otherwise the
// rule's own limit does, read at each decision (so a changed rule limit needs no sweep).
struct alignas(64) RuleSlot {
  KeyHeaderOf<kRuleKeyMax> k;
  alignas(64) Counters c;
};
static_assert(sizeof(RuleSlot) == 448);

// N strings of at most kKeyMax bytes each, stored back to back so that short ids (the usual
// case) touch one or two cache lines rather than N. Lengths are checked before set().
template <std::size_t N>
struct PackedStrings {
  std::uint16_t len[N];
  char bytes[N * kKeyMax];

  void set(const std::string_view (&values)[N]) noexcept {
    std::size_t off = 0;
    for (std::size_t i = 0; i < N; ++i) {
      len[i] = static_cast<std::uint16_t>(values[i].size());
      if (!values[i].empty()) std::memcpy(bytes + off, values[i].data(), values[i].size());
      off += values[i].size();
    }
  }
  // Never reads outside `bytes`, whatever the lengths say (a region corrupted from outside).
  std::string_view get(std::size_t i) const noexcept {
    std::size_t off = 0;
    for (std::size_t j = 0; j < i; ++j) off += len[j];
    off = off < sizeof bytes ? off : sizeof bytes;
    const std::size_t want = len[i];   // once: the region may change it under us
    std::size_t n = want < sizeof bytes - off ? want : sizeof bytes - off;
    n = n < kKeyMax ? n : kKeyMax;   // no id is longer
    return {bytes + off, n};
  }
};

// A call's tags as its caller passed them ("batch,eval", checked by rule_match.h's validTags),
// kept with a reservation and in its ledger entry so that tag rules are rebuilt from the ledger.
inline constexpr std::size_t kTagsMax = 256;   // tokenfuse::kMaxTagBytes
struct TagText {
  std::uint16_t len;
  char bytes[kTagsMax];

  void set(std::string_view tags) noexcept {
    const std::size_t n = tags.size() < kTagsMax ? tags.size() : kTagsMax;
    len = static_cast<std::uint16_t>(n);
    if (n != 0) std::memcpy(bytes, tags.data(), n);
  }
  // Never reads outside `bytes`, whatever `len` says.
  std::string_view get() const noexcept {
    const std::size_t n = __atomic_load_n(&len, __ATOMIC_RELAXED);   // once: the region may change it under us
    return {bytes, n < kTagsMax ? n : kTagsMax};
  }
};

// Reservation slot state word: [63..32] client number (client_lock.h) | [31..8] generation |
// [7..4] state | [3..0] progress (charging only: kChargeGrown once every layer has grown).
// While an operation is half-way (reserving, charging, settling) the client is the process acting
// on it; while the reservation waits (active, expired) it is its owner: client 0 for "the agent",
// whichever agent process runs now, which the reaper frees by deadline only. Every change of the
// word after the claim is a compare-and-swap from the word its process left there, so a process
// that lost its slot (taken by someone who thought it dead) gets an error instead of writing it.
enum ResState : std::uint32_t {
  kResFree = 0,
  kResReserving = 1,   // holding the estimate on each layer; fields not published yet
  kResActive = 2,      // holding; waiting for commit, charge or release
  kResCharging = 3,    // growing the hold to charge_target on each layer
  kResSettling = 4,    // returning the hold (and booking the cost) on each layer
  kResExpired = 5,     // the agent returned the hold after the deadline; commit still books
};

// Crash safety of multi-layer operations. An operation changes the three layers one after the
// other between two compare-and-swaps of the word, with no step in between (a step per layer
// costs a locked instruction each, and the hot path cannot pay for it). What the slot says a
// layer holds may understate what it holds, never overstate it: the reaper returns, for a dead
// process, only what is certainly held, and the agent's reconciliation (reconcileHolds) returns
// what a process killed half-way left behind, once two sweeps agree on it. Never too much,
// which could let spending pass a limit:
//   - reserving, settling: the reaper returns nothing (any layer may or may not have changed);
//   - charging: the old `held` before kChargeGrown (the growth may be partial), charge_target
//     after it (every layer has grown);
//   - active: `held` on every layer.
inline constexpr std::uint32_t kChargeGrown = 1;

// Layers in the order they are checked, which is also the order operations apply them.
enum Layer : std::uint32_t { kLayerRun = 0, kLayerTenant = 1, kLayerPlatform = 2, kLayerCount = 3 };

struct alignas(64) ReservationSlot {
  std::atomic<std::uint64_t> word;
  std::atomic<std::uint64_t> owner_start;     // /proc start time of owner_pid (for people; unused)
  std::atomic<std::int64_t> deadline_unix_ns; // in the agent's clock
  std::atomic<std::int64_t> held;             // nano-USD held on each layer
  std::atomic<std::int64_t> charge_target;    // the hold being grown to while kResCharging
  std::atomic<std::int64_t> charged_prompt;   // tokens charged so far (streaming)
  std::atomic<std::int64_t> charged_completion;
  std::atomic<std::int32_t> tenant;           // BudgetSlot index or kNoSlot
  std::atomic<std::int32_t> run;              // BudgetSlot index or kNoSlot
  std::atomic<std::int64_t> prompt_nano_per_mtok;   // price fixed at reserve time
  std::atomic<std::int64_t> completion_nano_per_mtok;
  std::atomic<std::int64_t> ttl_ns;
  std::atomic<std::uint32_t> owner_pid;      // the reserving process's pid in its own namespace (for people)
  std::atomic<std::uint32_t> free_model;
  // project_id, run_id, model, agent_id: written by the owner while kResReserving, copied into
  // the ledger entry by the commit.
  PackedStrings<4> ids;
  TagText tags;                               // written with ids; copied into the ledger entry
  // The rule counters this reservation holds on, in the units of each one's metric. Written while
  // kResReserving, before the counter changes; `held` and `target` follow the same crash-safety
  // rules as the slot's own (see kChargeGrown).
  struct RuleHold {
    std::atomic<std::int32_t> slot;     // RuleSlot index
    std::atomic<std::uint16_t> rule;    // the rule's index (its definition gives the limit)
    std::atomic<std::uint16_t> metric;  // RuleMetricValue, copied from the rule at reserve time
    std::atomic<std::int64_t> held;
    std::atomic<std::int64_t> target;   // while kResCharging
  };
  std::atomic<std::uint32_t> rule_holds;   // entries of `rules` in use
  RuleHold rules[kMaxRuleHolds];
};
static_assert(sizeof(ReservationSlot) == 1088);
enum ReservationText : std::size_t { kResProject = 0, kResRun = 1, kResModel = 2, kResAgent = 3 };

// --- the ledger ring ---------------------------------------------------------------------------
// A bounded multi-producer, single-consumer queue (after Dmitry Vyukov's bounded queue): every
// committed or recorded call is appended by the application process, with no system call, and
// the agent (the only consumer) writes it to SQLite. A slot's `seq` says where it stands for
// ticket `pos`: pos = free for that ticket, pos + 1 = published. The agent frees a slot
// (seq = pos + capacity) only after the entry is durable in SQLite, so an entry in the ring
// survives the crash of the application and of the agent alike.
//
// A writer stores its client number (client_lock.h) in writer_pid right after claiming a slot.
// If it dies before publishing, the agent sees its client lock gone (or, with no number yet, the
// slot stuck for a while) and abandons the slot with a compare-and-swap; publishing is a compare-and-swap too, so exactly one of the
// two happens. A writer that finds its slot abandoned (it was stopped for that long) reports the
// entry lost instead of acknowledging it.
enum LedgerKind : std::uint32_t { kLedgerVoid = 0, kLedgerCommit = 1, kLedgerRecord = 2 };

struct alignas(64) LedgerSlot {
  std::atomic<std::uint64_t> seq;
  std::atomic<std::uint32_t> writer_pid;
  // The entry: written by its writer between claim and publish, read by the agent after.
  std::uint32_t kind;                 // LedgerKind; void entries (a commit that found no
                                      // reservation) are skipped
  std::uint64_t unused_;              // zero; was the writer's /proc start time (layout 5)
  std::int64_t unix_ns;               // the agent's clock when the call was booked
  std::int64_t prompt_tokens;
  std::int64_t completion_tokens;
  std::int64_t cost_nano_usd;
  std::uint64_t reservation_id;       // 0 for record()
  std::int32_t day;                   // the budget day the cost was booked in
  PackedStrings<5> text;              // project_id, run_id, model, agent_id, provider
  TagText tags;                       // the call's tags ("" none)
  // ledgerChecksum() of the entry and its ticket, written last before publishing: the agent
  // quarantines an entry whose bytes were changed from outside after they were written.
  std::uint64_t check;
};
static_assert(sizeof(LedgerSlot) == 1024);
static_assert(offsetof(LedgerSlot, check) == 976);
enum LedgerText : std::size_t { kTextProject = 0, kTextRun = 1, kTextModel = 2, kTextAgent = 3, kTextProvider = 4 };

// The emergency kill switch. `active` is what the hot path reads; the rest sits behind a
// sequence lock (seq odd while the agent writes) so a reader sees a consistent reason.
struct alignas(64) KillSwitch {
  std::atomic<std::uint32_t> active;
  std::atomic<std::uint32_t> seq;
  std::atomic<std::int64_t> expires_unix_ns;  // 0: until turned off
  std::atomic<std::int64_t> since_unix_ns;
  std::atomic<std::uint32_t> reason_len;
  std::uint32_t pad_;
  std::atomic<std::uint64_t> reason_words[kReasonMax / 8];
};

// Values the library applies when it creates an entry or prices an unknown model.
struct alignas(64) Defaults {
  std::atomic<std::int64_t> tenant_limit;     // kUnlimited, or a daily limit for new tenants
  std::atomic<std::int64_t> run_limit;        // kUnlimited, or a limit for new runs
  std::atomic<std::int64_t> fallback_prompt_nano_per_mtok;
  std::atomic<std::int64_t> fallback_completion_nano_per_mtok;
  std::atomic<std::int64_t> reservation_ttl_ns;
  // Keys with an explicit limit (config or admin API) that the agent found no table room for,
  // by table: tenants, runs. While non-zero, a key of that table without an entry may be one of
  // them, so the library refuses every such key (E-TOKENFUSE-CAPACITY) instead of letting it
  // spend unchecked.
  std::atomic<std::uint32_t> limited_untracked[2];
};

// Counters the agent exports; the library only increments them.
struct alignas(64) Stats {
  std::atomic<std::uint64_t> untracked_calls;     // a table was full; counted in platform only
  std::atomic<std::uint64_t> reaped_dead_owner;   // holds returned from dead processes
  std::atomic<std::uint64_t> reaped_expired;      // holds returned after their deadline
  std::atomic<std::uint64_t> stuck_keys_cleared;  // half-written keys of dead inserters
  std::atomic<std::uint64_t> ledger_full;         // commits and records refused: ring full
  std::atomic<std::uint64_t> ledger_abandoned;    // ring slots skipped: their writer died
  std::atomic<std::uint64_t> holds_reconciled;    // layers whose holds the agent corrected
  // Calls refused, by code (E-BUDGET-001 .. -004), since the region was created. Only refusals
  // pay for this count: allowed checks count nothing, to stay a few loads.
  std::atomic<std::uint64_t> denied[4];
  // Calls refused with the codes only rules give (E-BUDGET-005 .. -007, E-RATE-001, -002,
  // E-CONCURRENCY-001), by code. Rules that deny with -001 .. -003 count in `denied`.
  std::atomic<std::uint64_t> denied_by_rule[6];
  // Calls refused with E-TOKENFUSE-CAPACITY, and records booked that could not be counted
  // against a limited tenant or run: no table room for a key with a limit.
  std::atomic<std::uint64_t> capacity_refused;
};

struct alignas(64) Header {
  // Written once by the creator before `ready`.
  std::uint64_t magic;
  std::uint32_t layout_version;
  std::uint32_t header_bytes;
  std::uint64_t region_bytes;
  std::uint32_t tenant_capacity;        // each a power of two
  std::uint32_t run_capacity;
  std::uint32_t model_capacity;
  std::uint32_t reservation_capacity;
  std::uint64_t tenant_offset;          // byte offsets from the start of the region
  std::uint64_t run_offset;
  std::uint64_t model_offset;
  std::uint64_t reservation_offset;
  std::int64_t created_unix_ns;
  std::uint32_t ledger_capacity;        // power of two
  std::uint32_t pad0_;
  std::uint64_t ledger_offset;
  std::atomic<std::uint32_t> ready;     // set last, with release order

  // Kept current by the agent that owns the region now.
  std::atomic<std::int32_t> agent_pid;
  std::atomic<std::uint64_t> agent_pidns;        // inode of the agent's pid namespace
  alignas(64) std::atomic<std::int64_t> clock_unix_ns;   // the agent's heartbeat and time base
  std::atomic<std::int32_t> day;                 // current budget day (days since epoch, local)
  // Non-zero while the agent cannot write its ledger file (deleted, replaced, garbled, a disk
  // error): commit() and record() then refuse with kLedgerUnavailable and book nothing. The
  // agent checks it on every pass of its ledger writer. On the clock's line, which every commit
  // reads anyway, and away from ledger_head, which the agent writes on every pass.
  std::atomic<std::uint32_t> ledger_unavailable;

  alignas(64) std::atomic<std::uint64_t> ledger_tail;   // next ticket; producers CAS it
  // Entries with seq <= head are durable. Published by the agent for waitDurable() and info();
  // the agent keeps its own copy and never reads this one back.
  alignas(64) std::atomic<std::uint64_t> ledger_head;
  alignas(64) KillSwitch kill;
  alignas(64) Counters platform;
  alignas(64) Defaults defaults;
  alignas(64) Stats stats;

  // Budget rules. Written once by the creator, before `ready`:
  std::uint32_t rule_capacity;          // rule counters; a power of two
  std::uint32_t pad1_;
  std::uint64_t rule_offset;
  // Kept by the agent: one past the highest definition ever live (readers look no further), and
  // when the current budget day ends (unix ns), for denials of the daily layers.
  std::atomic<std::uint32_t> rule_count;
  std::atomic<std::int64_t> day_end_unix_ns;
  alignas(64) RuleDef rules[kMaxRules];
};

static_assert(offsetof(Header, magic) == 0);
static_assert(offsetof(Header, layout_version) == 8);
static_assert(offsetof(Header, region_bytes) == 16);
static_assert(offsetof(Header, ready) == 96);
static_assert(offsetof(Header, clock_unix_ns) == 128);
static_assert(offsetof(Header, ledger_tail) == 192);
static_assert(offsetof(Header, ledger_head) == 256);
static_assert(offsetof(Header, ledger_unavailable) == 140);
static_assert(offsetof(Header, kill) == 320);
static_assert(sizeof(Header) % 64 == 0);

// --- Spend: 16-byte compare-and-swap -------------------------------------------------------------

__extension__ typedef unsigned __int128 U128;

// A 16-byte compare-and-swap that is atomic across processes. On x86-64 it is the instruction
// itself: sanitizer runtimes (ThreadSanitizer) and, on old CPUs, libatomic implement 16-byte
// atomics with a lock private to one process, which would silently break the budget between
// processes. ThreadSanitizer does not see this instruction; it still checks the 8-byte loads.
inline bool cas16(void* p, U128* expected, U128 desired) noexcept {
#if defined(__x86_64__)
  auto lo = static_cast<std::uint64_t>(*expected);
  auto hi = static_cast<std::uint64_t>(*expected >> 64);
  bool swapped;
  asm volatile("lock cmpxchg16b %1"
               : "=@ccz"(swapped), "+m"(*static_cast<U128*>(p)), "+a"(lo), "+d"(hi)
               : "b"(static_cast<std::uint64_t>(desired)), "c"(static_cast<std::uint64_t>(desired >> 64))
               : "memory");
  *expected = (U128{hi} << 64) | lo;
  return swapped;
#else
  // libatomic may implement this with a lock private to one process (AArch64 before GCC 13
  // does), which would break budgets across processes. Port with LDXP/STXP or CASP first.
#error "tokenfuse needs a 16-byte compare-and-swap that is atomic across processes; only x86-64 has one here"
#endif
}

inline U128 packSpend(std::int64_t used, std::int64_t committed) noexcept {
  return (U128{static_cast<std::uint64_t>(committed)} << 64) | static_cast<std::uint64_t>(used);
}
inline std::int64_t spendUsed(U128 v) noexcept { return static_cast<std::int64_t>(static_cast<std::uint64_t>(v)); }
inline std::int64_t spendCommitted(U128 v) noexcept {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(v >> 64));
}

// Money words in the region may hold anything a group member wrote there. Arithmetic on them
// wraps (two's complement, as the hardware does) instead of being undefined behaviour: a wrong
// number for a region someone scribbled on, never a trap or a miscompiled check.
constexpr std::int64_t wrapAdd(std::int64_t a, std::int64_t b) noexcept {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) + static_cast<std::uint64_t>(b));
}
constexpr std::int64_t wrapSub(std::int64_t a, std::int64_t b) noexcept {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) - static_cast<std::uint64_t>(b));
}
constexpr std::int64_t wrapNeg(std::int64_t a) noexcept { return wrapSub(0, a); }

inline bool Spend::tryHold(std::int64_t amount, std::int64_t limit, std::int64_t* seen) noexcept {
  U128 cur = packSpend(used(), committed());   // a torn read just fails the first CAS
  for (;;) {
    std::int64_t next;
    if (__builtin_add_overflow(spendUsed(cur), amount, &next) || (limit != kUnlimited && next > limit)) {
      *seen = spendUsed(cur);
      return false;
    }
    if (cas16(this, &cur, packSpend(next, spendCommitted(cur)))) return true;
  }
}

inline void Spend::add(std::int64_t used_delta, std::int64_t committed_delta) noexcept {
  U128 cur = packSpend(used(), committed());
  while (!cas16(this, &cur,
               packSpend(wrapAdd(spendUsed(cur), used_delta), wrapAdd(spendCommitted(cur), committed_delta)))) {
  }
}

inline std::int64_t Spend::takeCommitted() noexcept {
  U128 cur = packSpend(used(), committed());
  while (!cas16(this, &cur, packSpend(wrapSub(spendUsed(cur), spendCommitted(cur)), 0))) {
  }
  return spendCommitted(cur);
}

// --- word packing ------------------------------------------------------------------------------

constexpr std::uint64_t keyWord(std::uint32_t tag, KeyState state, std::uint32_t pid) noexcept {
  return (std::uint64_t{tag} << 32) | (std::uint64_t{state} << 30) | (pid & 0x3fff'ffffu);
}
constexpr std::uint32_t keyTag(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w >> 32); }
constexpr KeyState keyState(std::uint64_t w) noexcept { return static_cast<KeyState>((w >> 30) & 3u); }
constexpr std::uint32_t keyPid(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w & 0x3fff'ffffu); }
constexpr std::uint32_t keyGen(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w) & kKeyGenMask; }
constexpr bool keyReclaiming(std::uint64_t w) noexcept {
  return keyState(w) == kKeyInit && (static_cast<std::uint32_t>(w) & kKeyReclaiming) != 0;
}
// The word a reclaim of the key with Ready word `ready` starts with, and the one that takes the
// key back from it (or from a reclaim left unfinished): Ready, one generation on.
constexpr std::uint64_t reclaimWord(std::uint64_t ready) noexcept {
  return keyWord(keyTag(ready), kKeyInit, kKeyReclaiming | keyGen(ready));
}
constexpr std::uint64_t keptWord(std::uint64_t reclaiming) noexcept {
  return keyWord(keyTag(reclaiming), kKeyReady, (keyGen(reclaiming) + 1) & kKeyGenMask);
}

inline constexpr std::uint32_t kGenMask = 0xff'ffffu;   // 24-bit generation

constexpr std::uint64_t resWord(std::uint32_t client, std::uint32_t gen, ResState state,
                                std::uint32_t progress) noexcept {
  return (std::uint64_t{client} << 32) | (std::uint64_t{gen & kGenMask} << 8) |
         (std::uint64_t{state} << 4) | (progress & 0xfu);
}
constexpr std::uint32_t resClient(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w >> 32); }
constexpr std::uint32_t resGen(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w >> 8) & kGenMask; }
constexpr ResState resState(std::uint64_t w) noexcept { return static_cast<ResState>((w >> 4) & 0xfu); }
constexpr std::uint32_t resProgress(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w & 0xfu); }
constexpr std::uint32_t nextGen(std::uint32_t gen) noexcept {
  const std::uint32_t g = (gen + 1) & kGenMask;
  return g == 0 ? 1 : g;   // generation 0 is never live, so reservation id 0 is never valid
}

// A reservation id: [55..32] generation | [31..0] slot index; bits 63..56 are zero. The
// generation wraps after 2^24 reuses of one slot: a stale id is rejected unless it is exactly
// that many reuses old.
constexpr std::uint64_t reservationId(std::uint32_t index, std::uint32_t gen) noexcept {
  return (std::uint64_t{gen & kGenMask} << 32) | index;
}
constexpr std::uint32_t reservationIndex(std::uint64_t id) noexcept { return static_cast<std::uint32_t>(id); }
constexpr std::uint32_t reservationGen(std::uint64_t id) noexcept { return static_cast<std::uint32_t>(id >> 32) & kGenMask; }
constexpr bool reservationIdWellFormed(std::uint64_t id) noexcept { return id != 0 && (id >> 56) == 0; }

}  // namespace tokenfuse::shm
