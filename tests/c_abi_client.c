/* A C application using libtokenfuse through <tokenfuse/tokenfuse.h> only, linked against the
 * shared library. Run by tests/integration/c_abi_test.cc against a region the test owns.
 * Prints one line per step; exits 0 when every step behaved as the contract says. */
#include <tokenfuse/tokenfuse.h>

#include <stdio.h>
#include <string.h>

#define EXPECT(cond)                                              \
  do {                                                            \
    if (!(cond)) {                                                \
      fprintf(stderr, "c_abi_client: failed: %s (line %d)\n", #cond, __LINE__); \
      return 1;                                                   \
    }                                                             \
  } while (0)

int main(int argc, char** argv) {
  char error[256];
  tf_client* client = NULL;
  EXPECT(tf_attach("tf-no-such-region-for-c", &client, error, sizeof error) == -1);
  EXPECT(strstr(error, "does not exist") != NULL);
  EXPECT(argc == 2);
  EXPECT(tf_attach(argv[1], &client, error, sizeof error) == 0);

  tf_decision d = tf_check(client, "acme", "gpt-4o", 1000, NULL);
  EXPECT(d.code == TF_OK && d.cost_nano_usd == 5000000);

  tf_call call = {"acme", "gpt-4o", "run-c", "agent-c", 1000, 1000, 0, NULL};
  uint64_t r = 0;
  d = tf_reserve(client, &call, &r);
  EXPECT(d.code == TF_OK && r != 0 && d.cost_nano_usd == 20000000);
  EXPECT(tf_charge(client, r, 1000, 0).code == TF_OK);
  d = tf_commit(client, r, "openai", 1000, 500);
  EXPECT(d.code == TF_OK && d.cost_nano_usd == 12500000);
  EXPECT(tf_release(client, r).code == TF_UNKNOWN_RESERVATION);

  tf_usage usage = {"acme", "qwen3:8b", "ollama", NULL, NULL, 10, 20, NULL};
  d = tf_record(client, &usage);
  EXPECT(d.code == TF_OK && d.cost_nano_usd == 0 && d.ledger_seq == 2);

  /* The test set acme's limit to $0.02: another $0.0125 would pass it. */
  d = tf_check(client, "acme", "gpt-4o", 2500, NULL);
  EXPECT(d.code == TF_TENANT_BUDGET_EXHAUSTED);
  EXPECT(strcmp(tf_error_code(d.code), "E-BUDGET-002") == 0);
  char message[128];
  const size_t n = tf_describe(&d, "acme", message, sizeof message);
  EXPECT(n > 0 && strcmp(message, "Tenant acme budget exhausted: used $0.0125 / $0.0200") == 0);

  tf_budget_view view;
  EXPECT(tf_tenant_usage(client, "acme", &view) == 0);
  EXPECT(view.tracked && view.has_limit && view.committed_nano_usd == 12500000 && view.held_nano_usd == 0);
  EXPECT(tf_run_usage(client, "run-c", &view) == 0 && view.committed_nano_usd == 12500000);
  EXPECT(tf_platform_usage(client, &view) == 0 && !view.has_limit);

  int64_t prompt = 0, completion = 0;
  EXPECT(tf_price(client, "claude-opus-4-7", &prompt, &completion) == 0);
  EXPECT(prompt == 15000000000LL && completion == 75000000000LL);

  /* No agent writes this region's ledger in this test: the wait times out, and says so. */
  EXPECT(tf_wait_durable(client, 2, 0) == 0);
  EXPECT(tf_wait_durable(NULL, 1, 0) == -1);

  tf_kill_state kill;
  EXPECT(tf_kill_switch(client, &kill) == 0 && kill.active == 0);
  EXPECT(tf_check(NULL, "acme", "gpt-4o", 1, NULL).code == TF_INVALID_ARGUMENT);
  tf_detach(client);
  printf("c_abi_client: ok\n");
  return 0;
}
