/* Links the installed libtokenfuse from C (C99, <tokenfuse/tokenfuse.h> only). */
#include <tokenfuse/tokenfuse.h>

#include <stdio.h>

int main(int argc, char** argv) {
  char error[256];
  tf_client* c = NULL;
  tf_usage u = {"consumer", "gpt-4o", "openai", NULL, NULL, 1000, 0, NULL};
  tf_decision d;
  if (argc != 2) return 2;
  if (tf_attach(argv[1], &c, error, sizeof error) != 0) {
    fprintf(stderr, "consumer_c: %s\n", error);
    return 3;
  }
  d = tf_record(c, &u);
  if (d.code != TF_OK || d.cost_nano_usd != 5000000) return 1;
  if (tf_wait_durable(c, d.ledger_seq, 5000) != 1) return 4;
  printf("consumer_c: ok, ledger entry %llu\n", (unsigned long long)d.ledger_seq);
  tf_detach(c);
  return 0;
}
