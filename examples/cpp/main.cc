// A minimal C++ application: reserve before an LLM call, commit what it used after.
//   cmake -S . -B build && cmake --build build && ./build/tokenfuse_example_cpp [shm_name]
#include <tokenfuse/tokenfuse.hpp>

#include <cstdio>
#include <memory>

int main(int argc, char** argv) {
  std::unique_ptr<tokenfuse::Client> client;
  const tokenfuse::Status s = tokenfuse::Client::attach({argc > 1 ? argv[1] : "tokenfuse"}, &client);
  if (!s.ok()) {   // no agent, or not in the tokenfuse group: the message says which
    std::fprintf(stderr, "tokenfuse: %s\n", s.message().c_str());
    return 3;
  }
  tokenfuse::Reservation r;
  const tokenfuse::Decision d =
      client->reserve({.project_id = "example-app", .model = "gpt-4o-mini", .run_id = "example-run",
                       .estimated_prompt_tokens = 2000, .estimated_completion_tokens = 500},
                      &r);
  if (!d.allowed()) {
    std::printf("refused: %s (used $%s of $%s)\n", d.errorCode(), d.used.toString().c_str(), d.limit.toString().c_str());
    return 1;
  }
  // ... make the LLM call here, then book what it actually used:
  const tokenfuse::Decision booked = client->commit(r, "openai", 1800, 420);
  std::printf("booked $%s as ledger entry %llu\n", booked.cost.toString().c_str(),
              static_cast<unsigned long long>(booked.ledger_seq));
  return 0;
}
