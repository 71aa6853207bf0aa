// libtokenfuse: the pre-call budget check for LLM calls, answered from shared memory.
//
// An application attaches to the region that tokenfused owns on this host and asks, before each
// LLM call, whether the call may be made. The answer comes from a few atomic operations on the
// region: no system call, no lock, no allocation, no network.
//
// Layers are checked in the reference service's order:
//   1. the emergency kill switch (E-BUDGET-004) blocks every model;
//   2. free models (price 0, or a name starting with "ollama/") skip the money layers, but their
//      calls and tokens are still counted;
//   3. the run budget (E-BUDGET-001), the tenant's daily budget (E-BUDGET-002), the platform's
//      daily budget (E-BUDGET-003). A layer without a limit is unlimited.
//
// reserve() holds the estimated cost against every layer at once, so for every layer, at every
// instant, committed + held <= limit, however many threads and processes reserve together.
// commit() books the actual cost and returns the rest of the hold. A process that dies holding
// a reservation does not leak it: tokenfused returns the hold within seconds.
//
// Thread-safety: a Client is safe to use from any number of threads at once, and from any number
// of processes attached to the same region. Calls marked noexcept never allocate, never block
// and never make a system call.
#pragma once

#include <tokenfuse/export.h>
#include <tokenfuse/money.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace tokenfuse {

// The outcome of a budget operation. The values of the budget codes match the reference's
// E-BUDGET-00N numbers.
enum class Code : std::int32_t {
  kOk = 0,
  kRunBudgetExhausted = 1,        // E-BUDGET-001
  kTenantBudgetExhausted = 2,     // E-BUDGET-002
  kPlatformBudgetExhausted = 3,   // E-BUDGET-003
  kEmergencyKill = 4,             // E-BUDGET-004
  // Budget rules (docs/rules.md). A money rule on the run, tenant or platform scope denies with
  // the built-in layer's code above; the other kinds have their own.
  kModelBudgetExhausted = 5,      // E-BUDGET-005: a money rule on a model, model group or tenant x model
  kAgentBudgetExhausted = 6,      // E-BUDGET-006: a money rule on an agent (user, key) or tenant x agent
  kTagBudgetExhausted = 7,        // E-BUDGET-007: a money rule on a tag
  kRequestRateExceeded = 8,       // E-RATE-001: a rule on requests per window
  kTokenRateExceeded = 9,         // E-RATE-002: a rule on tokens per window (or all time)
  kConcurrencyExceeded = 10,      // E-CONCURRENCY-001: a cap on calls in flight
  kInvalidArgument = 100,         // an id too long, a token count negative or absurd
  kCapacityExhausted = 101,       // a table is full and the call could not be counted safely: a
                                  // tenant or run with a limit has no entry (or no reservation
                                  // slot is free). From record(): see there
  kUnknownReservation = 102,      // no such reservation (already settled, or never made)
  kReservationExpired = 103,      // charge() on a reservation whose hold the agent returned
  kRegionBusy = 104,              // a table entry was left half-written by a dead process
  kLedgerFull = 105,              // the ledger ring is full (the agent is behind): nothing was
                                  // booked, the reservation is still live; retry shortly
  kLedgerLost = 106,              // the cost was booked, but this process stalled so long while
                                  // writing the ledger entry that the agent gave up on it: the
                                  // entry is not in the ledger. Do not retry (it would book twice)
  kRegionCorrupt = 107,           // the region was damaged or changed from outside (its file
                                  // truncated, or words no correct process writes): nothing was
                                  // decided or booked. A changed ring word is repaired by tokenfused
                                  // within a flush interval (retry); after a truncation, tokenfused
                                  // replaces the region on restart: attach again
  kLedgerUnavailable = 108,       // tokenfused cannot write its ledger file (deleted, replaced,
                                  // garbled, disk error): nothing was booked; retry later
  kStaleOwner = 109,              // this process was stopped so long mid-operation that its
                                  // reservation slot was taken from it: nothing more was written
                                  // to it; the reservation is gone (its hold was returned)
};

// "E-BUDGET-002", "E-TOKENFUSE-INVALID-ARGUMENT", ...: a stable string for logs and APIs.
TOKENFUSE_EXPORT const char* errorCode(Code code) noexcept;

// The answer to check, reserve, charge, commit, release and record.
struct Decision {
  Code code = Code::kOk;
  // check/reserve: the estimated cost. charge: the cost of all tokens charged so far.
  // commit/record: the cost booked. release: the hold returned.
  NanoUsd cost;
  // On a budget denial: the denying layer's spending (committed + held) and its limit, in the
  // unit of its metric (nano-USD for money; tokens, requests or calls in flight for rules that
  // count those: read them with .count()).
  NanoUsd used;
  NanoUsd limit;
  // On a denial: the rule that denied (1 + its index in the region's rule table, as Client::rules
  // lists it; 0 for a built-in layer), and when its window ends and the count starts again (unix
  // ns; 0: never, as for a run or an all-time rule). HTTP answers turn it into Retry-After.
  std::uint32_t rule = 0;
  std::int64_t resets_unix_ns = 0;
  // commit only: the reservation had outlived its deadline and its hold was already returned;
  // the cost was still booked in full.
  bool reservation_expired = false;
  // commit and record: the entry's sequence number in this host's ledger (see waitDurable).
  std::uint64_t ledger_seq = 0;

  bool allowed() const noexcept { return code == Code::kOk; }
  const char* errorCode() const noexcept { return tokenfuse::errorCode(code); }
};

// The reference's wording for a denial, e.g. "Tenant acme budget exhausted: used $0.9660 /
// $1.0000". Allocates; for logs and error replies, not for the hot path.
TOKENFUSE_EXPORT std::string describe(const Decision& decision, std::string_view project_id);

// A live reservation. A plain value: copy it, pass it to another thread, or to another process
// attached to the same region. Zero is never a valid id.
struct Reservation {
  std::uint64_t id = 0;
  bool valid() const noexcept { return id != 0; }
};

// One LLM call, as reserve() and prepare() see it. Ids are at most 128 bytes.
struct Call {
  std::string_view project_id;                  // the tenant; required
  std::string_view model;                       // prices the call; required
  std::string_view run_id;                      // empty: no run budget applies
  std::string_view agent_id;                    // kept with the reservation for the ledger
  std::int64_t estimated_prompt_tokens = 4000;  // the reference's default
  // Holds the cost of this many completion tokens too. Set it to the request's max_tokens to
  // make the limit exact; a commit above the hold is still booked, and may overshoot.
  std::int64_t estimated_completion_tokens = 0;
  std::int64_t ttl_ms = 0;                      // 0: the agent's default reservation lifetime
  // Labels for tag rules, comma-separated ("batch,eval"): at most kMaxTags, each 1 to 128
  // bytes, kMaxTagBytes in all. Tags select rules, and are kept in the ledger.
  std::string_view tags = {};
};

inline constexpr std::size_t kMaxTags = 8;
inline constexpr std::size_t kMaxTagBytes = 256;

// A finished call booked without a reservation (the reference's record_token_usage).
struct Usage {
  std::string_view project_id;
  std::string_view model;
  std::string_view provider;
  std::string_view run_id;
  std::string_view agent_id;
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::string_view tags = {};   // as Call::tags
};

struct CallSiteAccess;  // libtokenfuse's own (lib/src); not part of the API

// A call's tenant, run and model looked up once, so that repeated checks and reservations for
// the same triple skip the hashing. Obtain from Client::prepare; valid for the Client's life.
//
// Opaque: a value to copy, keep and hand back to check and reserve, nothing to read or set. What
// it holds (table slot indices into the shared region, and the ids) is the library's business:
// keeping it private means the indices are not part of the ABI, so the table layout can change
// without breaking applications, and an application cannot build one that names another
// tenant's slot (the library still checks every index it reads back, as the bytes live in the
// caller's memory).
class CallSite {
 public:
  CallSite() noexcept = default;

 private:
  friend class Engine;
  friend struct CallSiteAccess;
  std::int32_t tenant = -1;  // slot index, or one of lib/src's site_index markers
  std::int32_t run = -1;
  std::int32_t model = -1;
  std::uint64_t tenant_word = 0;  // the slots' words when found: a key reclaimed since is looked up again
  std::uint64_t run_word = 0;
  bool free_model = false;
  std::uint32_t model_len = 0;
  std::uint32_t agent_id_len = 0;
  std::uint32_t project_len = 0;
  std::uint32_t run_len = 0;
  char model_name[128] = {};
  char agent_id[128] = {};
  char project_id[128] = {};
  char run_id[128] = {};
  std::uint32_t tags_len = 0;
  char tags[kMaxTagBytes] = {};
};

// One budget layer as it stands now.
struct BudgetView {
  bool tracked = false;               // false: nothing recorded for it in this region yet
  std::optional<NanoUsd> limit;       // nullopt: unlimited
  NanoUsd committed;                  // booked in the current budget day
  NanoUsd held;                       // held by live reservations
  NanoUsd elsewhere;                  // spent today on the fleet's other hosts (central link)
  // From the ledger: these trail committed by at most the agent's ledger flush interval.
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::int64_t calls = 0;
  std::int64_t denials = 0;
  std::int32_t day = 0;               // the budget day: days since 1970-01-01 in the agent's zone
};

struct KillSwitchState {
  bool active = false;
  std::string reason;
  std::int64_t since_unix_ns = 0;
  std::int64_t expires_unix_ns = 0;   // 0: until turned off
};

struct RegionInfo {
  std::string shm_name;
  std::uint32_t layout_version = 0;
  std::uint64_t region_bytes = 0;
  std::uint32_t tenant_capacity = 0, run_capacity = 0, model_capacity = 0, reservation_capacity = 0;
  std::int32_t agent_pid = 0;
  std::int64_t agent_clock_unix_ns = 0;   // last heartbeat of tokenfused
  std::int32_t day = 0;
  std::uint32_t live_reservations = 0;
  std::uint64_t ledger_appended = 0;      // highest ledger sequence number handed out
  std::uint64_t ledger_durable = 0;       // every entry up to this one is on disk
  std::uint32_t ledger_capacity = 0;
  std::uint64_t ledger_full = 0;          // commits and records refused because the ring was full
  std::uint64_t ledger_abandoned = 0;     // ring slots skipped because their writer died
};

// The result of a set-up call: ok, or a message a person can act on.
class TOKENFUSE_EXPORT Status {
 public:
  Status() = default;
  static Status error(std::string message) { Status s; s.message_ = std::move(message); s.ok_ = false; return s; }
  bool ok() const noexcept { return ok_; }
  const std::string& message() const noexcept { return message_; }

 private:
  bool ok_ = true;
  std::string message_;
};

class Engine;
class Region;

class TOKENFUSE_EXPORT Client {
 public:
  struct Options {
    std::string shm_name = "tokenfuse";   // the region tokenfused was started with
  };

  // Attaches to a region tokenfused created. Fails, with a message that says what to do, when
  // the region does not exist, is not ready, or has a layout this library does not speak.
  static Status attach(const Options& options, std::unique_ptr<Client>* out);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // The reference's pre-call check: may a call estimated at this many prompt tokens be made?
  // Reads only; holds nothing. A concurrent caller may still take the budget first: use reserve
  // for a guarantee.
  Decision check(std::string_view project_id, std::string_view model,
                 std::int64_t estimated_prompt_tokens = 4000,
                 std::string_view run_id = {}) const noexcept;
  Decision check(const CallSite& site, std::int64_t estimated_prompt_tokens,
                 std::int64_t estimated_completion_tokens = 0) const noexcept;
  // The check for a whole call, as reserve would see it: its agent_id and tags select budget
  // rules too. Holds nothing.
  Decision check(const Call& call) const noexcept;

  // Looks up (creating if needed) the call's tenant and run entries. On success fills *site.
  Decision prepare(const Call& call, CallSite* site) noexcept;

  // Holds the estimated cost against the run, tenant and platform budgets, all or nothing.
  // On success *reservation is set; on denial it is left invalid and nothing is held.
  Decision reserve(const Call& call, Reservation* reservation) noexcept;
  Decision reserve(const CallSite& site, std::int64_t estimated_prompt_tokens,
                   std::int64_t estimated_completion_tokens, Reservation* reservation,
                   std::int64_t ttl_ms = 0) noexcept;

  // Books the call's actual cost, returns the rest of the hold, and ends the reservation.
  // The cost is booked even above the limit: the call has happened. `provider` is for the ledger.
  //
  // Durability: when commit (or record) returns kOk, its ledger entry is in the region, which
  // outlives both this process and tokenfused; the agent writes it to SQLite and fsyncs within
  // its flush interval (default 10 ms, at most 50 ms under load). Only a power loss of the host
  // inside that interval can lose it. Callers that must know it is on disk use waitDurable.
  // If the ledger ring is full, the call returns kLedgerFull and books nothing.
  Decision commit(Reservation reservation, std::string_view provider, std::int64_t prompt_tokens,
                  std::int64_t completion_tokens) noexcept;

  // For streaming: adds the next chunk's tokens to the reservation. Allowed while the total
  // stays within the hold, or the hold can grow within every limit; otherwise the decision says
  // stop (with the denying layer's code) and nothing is added, so the stream can be cut before
  // it crosses a limit. Also says stop the moment the kill switch is turned on.
  Decision charge(Reservation reservation, std::int64_t more_prompt_tokens,
                  std::int64_t more_completion_tokens) noexcept;

  // Ends the reservation without booking anything (the call was not made).
  Decision release(Reservation reservation) noexcept;

  // Books a finished call that had no reservation. Not subject to limits: the call happened.
  // kCapacityExhausted with ledger_seq > 0: the entry IS in the ledger and counted in the
  // platform (and any layer that has an entry), but its tenant or run has a limit and no table
  // entry, so it could not be counted against that limit; calls for that key are refused. Do not
  // record it again (it would book twice).
  Decision record(const Usage& usage) noexcept;

  // The price the region applies to `model` (the fallback price if it is not in the table).
  Price price(std::string_view model) const noexcept;

  // Blocks (polling, with sleeps) until the ledger entry `ledger_seq` is durable in the agent's
  // SQLite ledger, or `timeout_ms` passes. Returns whether it is durable. Not for the hot path.
  bool waitDurable(std::uint64_t ledger_seq, std::int64_t timeout_ms) const;
  // Every ledger entry with a sequence number up to this one is durable.
  std::uint64_t durableLedgerSeq() const noexcept;

  // Read-only views. They copy strings, so they may allocate.
  KillSwitchState killSwitch() const;
  BudgetView tenant(std::string_view project_id) const;
  BudgetView run(std::string_view run_id) const;
  BudgetView platform() const;
  RegionInfo info() const;

 private:
  Client(std::unique_ptr<Region> region, std::string shm_name);
  std::unique_ptr<Region> region_;
  std::unique_ptr<Engine> engine_;
  std::string shm_name_;
};

}  // namespace tokenfuse
