/* libtokenfuse C ABI: the same engine as <tokenfuse/tokenfuse.hpp>, for C and for foreign
 * function interfaces (the Python binding uses it through ctypes).
 *
 * Conventions: strings are NUL-terminated UTF-8; an optional string may be NULL or "". Money is
 * int64 nano-USD (1e-9 USD). Every tf_decision-returning call is non-blocking, allocates nothing
 * and makes no system call. A tf_client is safe to use from many threads at once.
 *
 * Layers and error codes are described in tokenfuse.hpp: the code values 1..4 are the
 * reference's E-BUDGET-001..004. */
#ifndef TOKENFUSE_H_
#define TOKENFUSE_H_

#include <tokenfuse/export.h>

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum tf_code {
  TF_OK = 0,
  TF_RUN_BUDGET_EXHAUSTED = 1,      /* E-BUDGET-001 */
  TF_TENANT_BUDGET_EXHAUSTED = 2,   /* E-BUDGET-002 */
  TF_PLATFORM_BUDGET_EXHAUSTED = 3, /* E-BUDGET-003 */
  TF_EMERGENCY_KILL = 4,            /* E-BUDGET-004 */
  TF_MODEL_BUDGET_EXHAUSTED = 5,    /* E-BUDGET-005 (budget rules: docs/rules.md) */
  TF_AGENT_BUDGET_EXHAUSTED = 6,    /* E-BUDGET-006 */
  TF_TAG_BUDGET_EXHAUSTED = 7,      /* E-BUDGET-007 */
  TF_REQUEST_RATE_EXCEEDED = 8,     /* E-RATE-001 */
  TF_TOKEN_RATE_EXCEEDED = 9,       /* E-RATE-002 */
  TF_CONCURRENCY_EXCEEDED = 10,     /* E-CONCURRENCY-001 */
  TF_INVALID_ARGUMENT = 100,
  TF_CAPACITY_EXHAUSTED = 101,      /* a limited tenant or run has no table room: refused; from
                                       tf_record with ledger_seq > 0, booked but not counted
                                       against that limit: do not retry */
  TF_UNKNOWN_RESERVATION = 102,
  TF_RESERVATION_EXPIRED = 103,
  TF_REGION_BUSY = 104,
  TF_LEDGER_FULL = 105, /* nothing booked; retry shortly */
  TF_LEDGER_LOST = 106, /* booked, but the ledger entry was given up on: do not retry */
  TF_REGION_CORRUPT = 107,     /* the region was damaged or changed from outside: nothing decided or booked */
  TF_LEDGER_UNAVAILABLE = 108, /* the agent cannot write its ledger file: nothing booked */
  TF_STALE_OWNER = 109         /* the reservation was taken from this stalled process: it is gone */
};

typedef struct tf_decision {
  int32_t code;                /* enum tf_code */
  int32_t reservation_expired; /* commit only: 1 if the hold had already been returned */
  int64_t cost_nano_usd;       /* estimate, booked cost, or returned hold: see tokenfuse.hpp */
  int64_t used_nano_usd;       /* on a budget denial: the layer's committed + held */
  int64_t limit_nano_usd;      /* on a budget denial: the layer's limit */
  uint64_t ledger_seq;         /* commit and record: the entry's sequence number in the ledger */
  uint32_t rule;               /* on a denial: the denying rule's number, 0 for a built-in layer */
  uint32_t reserved_;
  int64_t resets_unix_ns;      /* on a denial: when the denying window ends; 0: never */
} tf_decision;

typedef struct tf_call {
  const char* project_id; /* required */
  const char* model;      /* required */
  const char* run_id;     /* optional */
  const char* agent_id;   /* optional */
  int64_t estimated_prompt_tokens;
  int64_t estimated_completion_tokens;
  int64_t ttl_ms; /* 0: the agent's default */
  const char* tags; /* optional: comma-separated labels for tag rules */
} tf_call;

typedef struct tf_usage {
  const char* project_id;
  const char* model;
  const char* provider;
  const char* run_id;   /* optional */
  const char* agent_id; /* optional */
  int64_t prompt_tokens;
  int64_t completion_tokens;
  const char* tags; /* optional, as tf_call.tags */
} tf_usage;

typedef struct tf_budget_view {
  int32_t tracked;
  int32_t has_limit; /* 0: unlimited */
  int64_t limit_nano_usd;
  int64_t committed_nano_usd;
  int64_t held_nano_usd;
  int64_t prompt_tokens;
  int64_t completion_tokens;
  int64_t calls;
  int64_t denials;
  int32_t day;
  int32_t reserved_;
  int64_t elsewhere_nano_usd; /* spent today on the fleet's other hosts (central link) */
} tf_budget_view;

typedef struct tf_kill_state {
  int32_t active;
  int32_t reserved_;
  int64_t since_unix_ns;
  int64_t expires_unix_ns; /* 0: until turned off */
  char reason[257];
} tf_kill_state;

typedef struct tf_client tf_client;

/* Attaches to the region `shm_name` (NULL: "tokenfuse"). Returns 0 and sets *out, or returns -1
 * and writes a message a person can act on into error (if error_len > 0). */
TOKENFUSE_EXPORT int tf_attach(const char* shm_name, tf_client** out, char* error, size_t error_len);
TOKENFUSE_EXPORT void tf_detach(tf_client* client);

TOKENFUSE_EXPORT tf_decision tf_check(const tf_client* client, const char* project_id, const char* model,
                                      int64_t estimated_prompt_tokens, const char* run_id);
/* The check for a whole call: its agent_id and tags select budget rules too (tf_check cannot
 * name them). Holds nothing; ttl_ms is ignored. */
TOKENFUSE_EXPORT tf_decision tf_check_call(const tf_client* client, const tf_call* call);
/* On success sets *reservation to a non-zero id. */
TOKENFUSE_EXPORT tf_decision tf_reserve(tf_client* client, const tf_call* call, uint64_t* reservation);
TOKENFUSE_EXPORT tf_decision tf_commit(tf_client* client, uint64_t reservation, const char* provider,
                                       int64_t prompt_tokens, int64_t completion_tokens);
TOKENFUSE_EXPORT tf_decision tf_charge(tf_client* client, uint64_t reservation, int64_t more_prompt_tokens,
                                       int64_t more_completion_tokens);
TOKENFUSE_EXPORT tf_decision tf_release(tf_client* client, uint64_t reservation);
TOKENFUSE_EXPORT tf_decision tf_record(tf_client* client, const tf_usage* usage);

/* Waits (sleeping) until ledger entry `ledger_seq` is durable on disk, or `timeout_ms` passes.
 * Returns 1 if durable, 0 on time-out, -1 on a bad argument. Not for the hot path. */
TOKENFUSE_EXPORT int tf_wait_durable(const tf_client* client, uint64_t ledger_seq, int64_t timeout_ms);

/* The model's price in nano-USD per million tokens. Returns 0, or -1 for a bad model name. */
TOKENFUSE_EXPORT int tf_price(const tf_client* client, const char* model, int64_t* prompt_nano_per_mtok,
                              int64_t* completion_nano_per_mtok);

/* The reference service's price for `model` (its table, else its fallback; "ollama/" models are
 * free), without a region: what the agent loads unless its config says otherwise. Returns 0, or
 * -1 for a bad argument (a model name must be 1 to 128 bytes). */
TOKENFUSE_EXPORT int tf_reference_price(const char* model, int64_t* prompt_nano_per_mtok,
                                        int64_t* completion_nano_per_mtok);

/* Views: return 0, or -1 on a bad argument. */
TOKENFUSE_EXPORT int tf_tenant_usage(const tf_client* client, const char* project_id, tf_budget_view* out);
TOKENFUSE_EXPORT int tf_run_usage(const tf_client* client, const char* run_id, tf_budget_view* out);
TOKENFUSE_EXPORT int tf_platform_usage(const tf_client* client, tf_budget_view* out);
TOKENFUSE_EXPORT int tf_kill_switch(const tf_client* client, tf_kill_state* out);

/* "E-BUDGET-002" and so on. Static storage. */
TOKENFUSE_EXPORT const char* tf_error_code(int32_t code);
/* The reference's wording for a decision, written NUL-terminated into buf. Returns the length
 * it needed, excluding the NUL (as snprintf). */
TOKENFUSE_EXPORT size_t tf_describe(const tf_decision* decision, const char* project_id, char* buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* TOKENFUSE_H_ */
