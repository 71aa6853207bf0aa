// Links the installed libtokenfuse from C++: attaches to the region named by argv[1], checks,
// reserves and commits, and prints what the agent's region says. Exit 0 when all is as expected.
#include <tokenfuse/tokenfuse.hpp>

#include <cstdio>
#include <memory>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  std::unique_ptr<tokenfuse::Client> c;
  if (const auto s = tokenfuse::Client::attach({argv[1]}, &c); !s.ok()) {
    std::fprintf(stderr, "consumer_cpp: %s\n", s.message().c_str());
    return 3;
  }
  if (!c->check("consumer", "gpt-4o", 1000).allowed()) return 1;
  tokenfuse::Reservation r;
  if (!c->reserve({.project_id = "consumer", .model = "gpt-4o", .estimated_prompt_tokens = 1000}, &r).allowed()) return 1;
  const tokenfuse::Decision d = c->commit(r, "openai", 1000, 0);   // $5 a million prompt tokens
  if (!d.allowed() || d.cost != tokenfuse::NanoUsd(5'000'000)) return 1;
  if (!c->waitDurable(d.ledger_seq, 5000)) return 4;   // the installed agent wrote it to SQLite
  std::printf("consumer_cpp: ok, tenant consumer at $%s, agent pid %d\n", c->tenant("consumer").committed.toString().c_str(),
              static_cast<int>(c->info().agent_pid));
  return 0;
}
