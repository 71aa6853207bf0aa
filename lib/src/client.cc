#include "engine.h"
#include "region.h"

#include <tokenfuse/tokenfuse.hpp>

#include <chrono>
#include <cstdio>
#include <thread>

namespace tokenfuse {

// CallSite is opaque, but applications allocate it: its size is part of the ABI. It grew by the
// tags (layout 7, library 0.2).
static_assert(sizeof(CallSite) == 824 && alignof(CallSite) == 8);

const char* errorCode(Code code) noexcept {
  switch (code) {
    case Code::kOk: return "OK";
    case Code::kRunBudgetExhausted: return "E-BUDGET-001";
    case Code::kTenantBudgetExhausted: return "E-BUDGET-002";
    case Code::kPlatformBudgetExhausted: return "E-BUDGET-003";
    case Code::kEmergencyKill: return "E-BUDGET-004";
    case Code::kModelBudgetExhausted: return "E-BUDGET-005";
    case Code::kAgentBudgetExhausted: return "E-BUDGET-006";
    case Code::kTagBudgetExhausted: return "E-BUDGET-007";
    case Code::kRequestRateExceeded: return "E-RATE-001";
    case Code::kTokenRateExceeded: return "E-RATE-002";
    case Code::kConcurrencyExceeded: return "E-CONCURRENCY-001";
    case Code::kInvalidArgument: return "E-TOKENFUSE-INVALID-ARGUMENT";
    case Code::kCapacityExhausted: return "E-TOKENFUSE-CAPACITY";
    case Code::kUnknownReservation: return "E-TOKENFUSE-UNKNOWN-RESERVATION";
    case Code::kReservationExpired: return "E-TOKENFUSE-RESERVATION-EXPIRED";
    case Code::kRegionBusy: return "E-TOKENFUSE-BUSY";
    case Code::kLedgerFull: return "E-TOKENFUSE-LEDGER-FULL";
    case Code::kLedgerLost: return "E-TOKENFUSE-LEDGER-LOST";
    case Code::kRegionCorrupt: return "E-TOKENFUSE-REGION-CORRUPT";
    case Code::kLedgerUnavailable: return "E-TOKENFUSE-LEDGER-UNAVAILABLE";
    case Code::kStaleOwner: return "E-TOKENFUSE-STALE";
  }
  return "E-TOKENFUSE-UNKNOWN";
}

namespace {

// The reference prints amounts with four decimals: "$0.9660".
std::string usd4(NanoUsd v) {
  const std::int64_t tenth_milli = (v.count() + 50'000) / 100'000;   // round half up
  char buf[48];
  std::snprintf(buf, sizeof buf, "$%lld.%04lld", static_cast<long long>(tenth_milli / 10'000),
                static_cast<long long>(tenth_milli % 10'000));
  return buf;
}

}  // namespace

std::string describe(const Decision& d, std::string_view project_id) {
  switch (d.code) {
    case Code::kOk: return "allowed";
    case Code::kRunBudgetExhausted:
      return "Run budget exhausted: used " + usd4(d.used) + " / " + usd4(d.limit);
    case Code::kTenantBudgetExhausted:
      return "Tenant " + std::string(project_id) + " budget exhausted: used " + usd4(d.used) + " / " + usd4(d.limit);
    case Code::kPlatformBudgetExhausted:
      return "Platform budget exhausted: used " + usd4(d.used) + " / " + usd4(d.limit) + " — all LLM calls suspended";
    case Code::kEmergencyKill: return "Emergency kill switch activated — contact platform admin";
    case Code::kModelBudgetExhausted:
      return "Model budget exhausted (rule " + std::to_string(d.rule) + "): used " + usd4(d.used) + " / " + usd4(d.limit);
    case Code::kAgentBudgetExhausted:
      return "Agent budget exhausted (rule " + std::to_string(d.rule) + "): used " + usd4(d.used) + " / " + usd4(d.limit);
    case Code::kTagBudgetExhausted:
      return "Tag budget exhausted (rule " + std::to_string(d.rule) + "): used " + usd4(d.used) + " / " + usd4(d.limit);
    case Code::kRequestRateExceeded:
    case Code::kTokenRateExceeded:
    case Code::kConcurrencyExceeded:
      return std::string(d.code == Code::kRequestRateExceeded ? "Request rate" : d.code == Code::kTokenRateExceeded ? "Token budget" : "Concurrency") +
             " limit reached (rule " + std::to_string(d.rule) + "): " + std::to_string(d.used.count()) + " / " +
             std::to_string(d.limit.count());
    case Code::kInvalidArgument:
      return "invalid argument: ids must be 1 to 128 bytes of UTF-8 without NUL, at most 8 tags (256 bytes), "
             "token counts 0 to 4294967296, and a call may match at most 8 rule counters";
    case Code::kCapacityExhausted:
      return "a tokenfuse table is full, so this call's limit cannot be enforced: raise the region's capacity";
    case Code::kUnknownReservation: return "no such reservation: already committed or released, or never made";
    case Code::kReservationExpired: return "the reservation outlived its deadline and its hold was returned";
    case Code::kRegionBusy: return "a table entry is being repaired after a client died; retry";
    case Code::kLedgerFull:
      return "the ledger ring is full (is tokenfused running?): nothing was booked; retry shortly";
    case Code::kLedgerLost:
      return "the cost was booked, but this process was stopped so long while writing its ledger entry that "
             "tokenfused gave up on it; do not retry";
    case Code::kRegionCorrupt:
      return "the shared-memory region was damaged or changed from outside (truncated or overwritten): nothing "
             "was decided or booked; retry shortly (if it was truncated, attach again once tokenfused has restarted)";
    case Code::kLedgerUnavailable:
      return "tokenfused cannot write its ledger file (deleted, replaced, garbled or a disk error; see its log): "
             "nothing was booked; retry later";
    case Code::kStaleOwner:
      return "this process was stopped mid-operation long enough that its reservation was taken from it; "
             "the reservation is gone: reserve again";
  }
  return "unknown decision";
}

Client::Client(std::unique_ptr<Region> region, std::string shm_name)
    : region_(std::move(region)), engine_(std::make_unique<Engine>(*region_)), shm_name_(std::move(shm_name)) {}

Client::~Client() = default;

Status Client::attach(const Options& options, std::unique_ptr<Client>* out) {
  std::unique_ptr<Region> region;
  if (Status s = Region::attach(options.shm_name, &region); !s.ok()) return s;
  out->reset(new Client(std::move(region), options.shm_name));
  return {};
}

Decision Client::check(std::string_view project_id, std::string_view model, std::int64_t estimated_prompt_tokens,
                       std::string_view run_id) const noexcept {
  CallSite site;
  if (Decision d = engine_->prepare({project_id, model, run_id, {}, 0, 0, 0}, &site, false); !d.allowed()) return d;
  return engine_->check(site, estimated_prompt_tokens, 0);
}

Decision Client::check(const Call& call) const noexcept {
  CallSite site;
  if (Decision d = engine_->prepare(call, &site, false); !d.allowed()) return d;
  return engine_->check(site, call.estimated_prompt_tokens, call.estimated_completion_tokens);
}

Decision Client::check(const CallSite& site, std::int64_t estimated_prompt_tokens,
                       std::int64_t estimated_completion_tokens) const noexcept {
  return engine_->check(site, estimated_prompt_tokens, estimated_completion_tokens);
}

Decision Client::prepare(const Call& call, CallSite* site) noexcept { return engine_->prepare(call, site, true); }

Decision Client::reserve(const Call& call, Reservation* reservation) noexcept {
  *reservation = {};
  CallSite site;
  if (Decision d = engine_->prepare(call, &site, true); !d.allowed()) return d;
  return engine_->reserve(site, call.estimated_prompt_tokens, call.estimated_completion_tokens, call.ttl_ms,
                          reservation);
}

Decision Client::reserve(const CallSite& site, std::int64_t estimated_prompt_tokens,
                         std::int64_t estimated_completion_tokens, Reservation* reservation,
                         std::int64_t ttl_ms) noexcept {
  return engine_->reserve(site, estimated_prompt_tokens, estimated_completion_tokens, ttl_ms, reservation);
}

Decision Client::commit(Reservation r, std::string_view provider, std::int64_t prompt_tokens,
                        std::int64_t completion_tokens) noexcept {
  return engine_->commit(r, provider, prompt_tokens, completion_tokens);
}

Decision Client::charge(Reservation r, std::int64_t more_prompt_tokens, std::int64_t more_completion_tokens) noexcept {
  return engine_->charge(r, more_prompt_tokens, more_completion_tokens);
}

Decision Client::release(Reservation r) noexcept { return engine_->release(r); }

Decision Client::record(const Usage& usage) noexcept { return engine_->record(usage); }

Price Client::price(std::string_view model) const noexcept {
  CallSite site;
  if (!engine_->prepare({"-", model, {}, {}, 0, 0, 0}, &site, false).allowed()) return {};
  return engine_->price(site);
}

std::uint64_t Client::durableLedgerSeq() const noexcept { return engine_->durableLedgerSeq(); }

bool Client::waitDurable(std::uint64_t ledger_seq, std::int64_t timeout_ms) const {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (engine_->durableLedgerSeq() >= ledger_seq) return true;
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

KillSwitchState Client::killSwitch() const { return engine_->killSwitch(); }
BudgetView Client::tenant(std::string_view project_id) const { return engine_->tenant(project_id); }
BudgetView Client::run(std::string_view run_id) const { return engine_->run(run_id); }
BudgetView Client::platform() const { return engine_->platform(); }

RegionInfo Client::info() const {
  const shm::Header& h = region_->header();
  const Geometry& g = region_->geometry();   // as checked at attach, not as the header says now
  RegionInfo i;
  i.shm_name = shm_name_;
  i.layout_version = shm::kLayoutVersion;
  i.region_bytes = g.region_bytes;
  i.tenant_capacity = g.tenant_capacity;
  i.run_capacity = g.run_capacity;
  i.model_capacity = g.model_capacity;
  i.reservation_capacity = g.reservation_capacity;
  i.agent_pid = h.agent_pid.load(std::memory_order_relaxed);
  i.agent_clock_unix_ns = h.clock_unix_ns.load(std::memory_order_relaxed);
  i.day = h.day.load(std::memory_order_relaxed);
  i.live_reservations = engine_->liveReservations();
  i.ledger_appended = h.ledger_tail.load(std::memory_order_relaxed);
  i.ledger_durable = h.ledger_head.load(std::memory_order_relaxed);
  i.ledger_capacity = g.ledger_capacity;
  i.ledger_full = h.stats.ledger_full.load(std::memory_order_relaxed);
  i.ledger_abandoned = h.stats.ledger_abandoned.load(std::memory_order_relaxed);
  return i;
}

}  // namespace tokenfuse
