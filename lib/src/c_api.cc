// The C ABI: a thin translation onto Client. No exception crosses this boundary.
#include <tokenfuse/tokenfuse.h>
#include <tokenfuse/tokenfuse.hpp>

#include "pricing.h"

#include <algorithm>
#include <cstring>
#include <new>

struct tf_client {
  std::unique_ptr<tokenfuse::Client> client;
};

namespace {

using tokenfuse::Decision;

std::string_view sv(const char* s) noexcept { return s == nullptr ? std::string_view{} : std::string_view(s); }

tf_decision toC(const Decision& d) noexcept {
  return {static_cast<int32_t>(d.code), d.reservation_expired ? 1 : 0, d.cost.count(), d.used.count(),
          d.limit.count(), d.ledger_seq, d.rule, 0, d.resets_unix_ns};
}

tf_decision invalid() noexcept {
  Decision d;
  d.code = tokenfuse::Code::kInvalidArgument;
  return toC(d);
}

void toC(const tokenfuse::BudgetView& v, tf_budget_view* out) noexcept {
  *out = {};
  out->tracked = v.tracked ? 1 : 0;
  out->has_limit = v.limit ? 1 : 0;
  out->limit_nano_usd = v.limit ? v.limit->count() : 0;
  out->committed_nano_usd = v.committed.count();
  out->held_nano_usd = v.held.count();
  out->prompt_tokens = v.prompt_tokens;
  out->completion_tokens = v.completion_tokens;
  out->calls = v.calls;
  out->denials = v.denials;
  out->day = v.day;
  out->elsewhere_nano_usd = v.elsewhere.count();
}

// A model name the region accepts: 1 to 128 bytes.
bool validModel(const char* model) noexcept { return model != nullptr && *model != '\0' && std::strlen(model) <= 128; }

void copyError(const std::string& message, char* error, size_t len) noexcept {
  if (error == nullptr || len == 0) return;
  const size_t n = std::min(message.size(), len - 1);
  std::memcpy(error, message.data(), n);
  error[n] = '\0';
}

template <typename F>
int view(F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // namespace

extern "C" {

int tf_attach(const char* shm_name, tf_client** out, char* error, size_t error_len) {
  if (out == nullptr) return -1;
  *out = nullptr;
  try {
    tokenfuse::Client::Options options;
    if (shm_name != nullptr && *shm_name != '\0') options.shm_name = shm_name;
    std::unique_ptr<tokenfuse::Client> client;
    const tokenfuse::Status s = tokenfuse::Client::attach(options, &client);
    if (!s.ok()) {
      copyError(s.message(), error, error_len);
      return -1;
    }
    *out = new tf_client{std::move(client)};
    return 0;
  } catch (const std::exception& e) {
    copyError(e.what(), error, error_len);
    return -1;
  }
}

void tf_detach(tf_client* client) { delete client; }

tf_decision tf_check(const tf_client* c, const char* project_id, const char* model, int64_t est_prompt,
                     const char* run_id) {
  if (c == nullptr) return invalid();
  return toC(c->client->check(sv(project_id), sv(model), est_prompt, sv(run_id)));
}

tf_decision tf_check_call(const tf_client* c, const tf_call* call) {
  if (c == nullptr || call == nullptr) return invalid();
  return toC(c->client->check({sv(call->project_id), sv(call->model), sv(call->run_id), sv(call->agent_id),
                               call->estimated_prompt_tokens, call->estimated_completion_tokens, 0, sv(call->tags)}));
}

tf_decision tf_reserve(tf_client* c, const tf_call* call, uint64_t* reservation) {
  if (c == nullptr || call == nullptr || reservation == nullptr) return invalid();
  tokenfuse::Reservation r;
  const Decision d = c->client->reserve({sv(call->project_id), sv(call->model), sv(call->run_id), sv(call->agent_id),
                                         call->estimated_prompt_tokens, call->estimated_completion_tokens,
                                         call->ttl_ms, sv(call->tags)},
                                        &r);
  *reservation = r.id;
  return toC(d);
}

tf_decision tf_commit(tf_client* c, uint64_t reservation, const char* provider, int64_t prompt, int64_t completion) {
  if (c == nullptr) return invalid();
  return toC(c->client->commit({reservation}, sv(provider), prompt, completion));
}

tf_decision tf_charge(tf_client* c, uint64_t reservation, int64_t more_prompt, int64_t more_completion) {
  if (c == nullptr) return invalid();
  return toC(c->client->charge({reservation}, more_prompt, more_completion));
}

tf_decision tf_release(tf_client* c, uint64_t reservation) {
  if (c == nullptr) return invalid();
  return toC(c->client->release({reservation}));
}

tf_decision tf_record(tf_client* c, const tf_usage* u) {
  if (c == nullptr || u == nullptr) return invalid();
  return toC(c->client->record({sv(u->project_id), sv(u->model), sv(u->provider), sv(u->run_id), sv(u->agent_id),
                                u->prompt_tokens, u->completion_tokens, sv(u->tags)}));
}

int tf_wait_durable(const tf_client* c, uint64_t ledger_seq, int64_t timeout_ms) {
  if (c == nullptr || timeout_ms < 0) return -1;
  try {
    return c->client->waitDurable(ledger_seq, timeout_ms) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

int tf_price(const tf_client* c, const char* model, int64_t* prompt, int64_t* completion) {
  if (c == nullptr || !validModel(model) || prompt == nullptr || completion == nullptr) return -1;
  const tokenfuse::Price p = c->client->price(model);
  *prompt = p.prompt_nano_per_mtok;
  *completion = p.completion_nano_per_mtok;
  return 0;
}

int tf_reference_price(const char* model, int64_t* prompt, int64_t* completion) {
  if (!validModel(model) || prompt == nullptr || completion == nullptr) return -1;
  tokenfuse::Price p = tokenfuse::kReferenceFallbackPrice;
  for (const auto& [name, price] : tokenfuse::referencePrices()) {
    if (name == model) p = price;
  }
  if (std::string_view(model).starts_with(tokenfuse::kFreeModelPrefix)) p = {};   // as the agent prices it
  *prompt = p.prompt_nano_per_mtok;
  *completion = p.completion_nano_per_mtok;
  return 0;
}

int tf_tenant_usage(const tf_client* c, const char* project_id, tf_budget_view* out) {
  if (c == nullptr || project_id == nullptr || out == nullptr) return -1;
  return view([&] { toC(c->client->tenant(project_id), out); });
}

int tf_run_usage(const tf_client* c, const char* run_id, tf_budget_view* out) {
  if (c == nullptr || run_id == nullptr || out == nullptr) return -1;
  return view([&] { toC(c->client->run(run_id), out); });
}

int tf_platform_usage(const tf_client* c, tf_budget_view* out) {
  if (c == nullptr || out == nullptr) return -1;
  return view([&] { toC(c->client->platform(), out); });
}

int tf_kill_switch(const tf_client* c, tf_kill_state* out) {
  if (c == nullptr || out == nullptr) return -1;
  return view([&] {
    const tokenfuse::KillSwitchState k = c->client->killSwitch();
    *out = {};
    out->active = k.active ? 1 : 0;
    out->since_unix_ns = k.since_unix_ns;
    out->expires_unix_ns = k.expires_unix_ns;
    copyError(k.reason, out->reason, sizeof out->reason);
  });
}

const char* tf_error_code(int32_t code) { return tokenfuse::errorCode(static_cast<tokenfuse::Code>(code)); }

size_t tf_describe(const tf_decision* d, const char* project_id, char* buf, size_t len) {
  if (d == nullptr) return 0;
  try {
    Decision decision;
    decision.code = static_cast<tokenfuse::Code>(d->code);
    decision.cost = tokenfuse::NanoUsd(d->cost_nano_usd);
    decision.used = tokenfuse::NanoUsd(d->used_nano_usd);
    decision.limit = tokenfuse::NanoUsd(d->limit_nano_usd);
    decision.reservation_expired = d->reservation_expired != 0;
    decision.ledger_seq = d->ledger_seq;
    decision.rule = d->rule;
    decision.resets_unix_ns = d->resets_unix_ns;
    const std::string text = tokenfuse::describe(decision, sv(project_id));
    copyError(text, buf, len);
    return text.size();
  } catch (...) {
    return 0;
  }
}

}  // extern "C"
