/* A minimal C application: check a call, then record what a finished call used.
 *   make && ./tokenfuse_example_c [shm_name] */
#include <tokenfuse/tokenfuse.h>

#include <stdio.h>

int main(int argc, char** argv) {
  char error[256];
  tf_client* client = NULL;
  if (tf_attach(argc > 1 ? argv[1] : "tokenfuse", &client, error, sizeof error) != 0) {
    fprintf(stderr, "tokenfuse: %s\n", error);
    return 3;
  }
  tf_decision d = tf_check(client, "example-app", "gpt-4o-mini", 2000, NULL);
  if (d.code != TF_OK) {
    char why[256];
    tf_describe(&d, "example-app", why, sizeof why);
    printf("refused: %s: %s\n", tf_error_code(d.code), why);
    tf_detach(client);
    return 1;
  }
  /* ... make the LLM call here, then book what it used: */
  tf_usage usage = {"example-app", "gpt-4o-mini", "openai", "example-run", NULL, 1800, 420, NULL};
  d = tf_record(client, &usage);
  printf("booked %lld nano-USD as ledger entry %llu\n", (long long)d.cost_nano_usd, (unsigned long long)d.ledger_seq);
  tf_detach(client);
  return d.code == TF_OK ? 0 : 1;
}
