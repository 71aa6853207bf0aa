// The ledger against a hostile group member and an operator's mistakes: a real agent, real
// application processes, and the test writing into the region through its own mapping or
// deleting and garbling the ledger file. Every wait is bounded: a hang fails, it never hangs.
#include "agent_process.h"

#include "ledger.h"
#include "region.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <httplib.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <filesystem>
#include <random>
#include <set>

using namespace tokenfuse;
using namespace tokenfuse::test;

namespace {

// Runs `body` in a forked child and returns its exit code, or -1000 if it had not finished
// within `bound` (then it is killed): a hang is a failure, never a hung test.
int inChild(const std::function<int()>& body, std::chrono::seconds bound = std::chrono::seconds(10)) {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(body());
  const auto until = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < until) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return -1000;
}

// The hostile group member's view: the region mapped read-write, as any member of the group can.
std::unique_ptr<Region> hostileMapping(const std::string& shm) {
  std::unique_ptr<Region> r;
  const Status s = Region::attach(shm, &r);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return r;
}

shm::LedgerSlot& slotOf(Region& r, std::uint64_t pos) {
  return r.ledger()[pos & (r.header().ledger_capacity - 1)];
}

Usage usage(const std::string& project, std::int64_t prompt = 1000) {
  return {project, "gpt-4o", "openai", {}, {}, prompt, 10};
}

std::int64_t count(const std::string& db_path, const std::string& sql) {
  SQLite::Database db(db_path, SQLite::OPEN_READONLY);
  db.setBusyTimeout(5000);
  return db.execAndGet(sql).getInt64();
}

// project_id of every entry in the ledger, by seq.
std::map<std::uint64_t, std::string> ledgerRows(const std::string& db_path) {
  auto ledger = Ledger::openReadOnly(db_path);
  LedgerFilter all;
  all.limit = 1'000'000;
  std::map<std::uint64_t, std::string> out;
  for (const LedgerEntry& e : ledger->list(all)) out.emplace(e.seq, e.project_id);
  return out;
}

struct Acked {
  std::uint64_t seq;
  std::string project;
};

// Records `n` calls of `project`, each of which must be booked, and keeps what was acknowledged.
void recordAll(Client& client, int n, const char* project, std::vector<Acked>* acked) {
  for (int i = 0; i < n; ++i) {
    const Decision d = client.record(usage(project));
    REQUIRE_MESSAGE(d.allowed(), d.errorCode());
    acked->push_back({d.ledger_seq, project});
  }
}

void checkAllInLedger(const std::string& db_path, const std::vector<Acked>& acked) {
  const auto rows = ledgerRows(db_path);
  std::size_t missing = 0, wrong = 0;
  for (const Acked& a : acked) {
    const auto it = rows.find(a.seq);
    if (it == rows.end()) {
      ++missing;
    } else if (it->second != a.project) {
      ++wrong;
    }
  }
  CHECK(missing == 0);
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("hostile region: ledger_tail moved back by one never hangs an app, and a restarted agent starts and keeps "
          "every entry") {
  AgentFixture f("tailback");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  std::vector<Acked> acked;
  recordAll(*client, 10, "before", &acked);
  REQUIRE(client->waitDurable(acked.back().seq, 10000));
  auto region = hostileMapping(f.shm);
  region->header().ledger_tail.fetch_sub(1);

  const std::string shm = f.shm;
  const int rc = inChild([&] {
    std::unique_ptr<Client> c;
    if (!Client::attach({shm}, &c).ok()) return 2;
    for (int i = 0; i < 20; ++i) {
      const Decision d = c->record(usage("child"));
      if (!d.allowed() && d.code != Code::kRegionCorrupt && d.code != Code::kLedgerFull) return 3;
    }
    return 0;
  });
  CHECK_MESSAGE(rc == 0, "the application hung or failed in the ledger claim (" << rc << ")");

  // The agent dies; the tail is moved back again; the next agent must start, not refuse.
  agent->signal(SIGKILL);
  REQUIRE(agent->wait() == -SIGKILL);
  region->header().ledger_tail.fetch_sub(1);
  agent = f.start();
  client = f.waitForRegion(agent->pid());
  recordAll(*client, 10, "after", &acked);
  REQUIRE(client->waitDurable(acked.back().seq, 10000));
  agent->signal(SIGTERM);
  REQUIRE(agent->wait() == 0);
  checkAllInLedger(f.dir.path + "/state/ledger.db", acked);
}

TEST_CASE("hostile region: a ring slot's sequence word changed never hangs an app, and the agent heals the ring") {
  AgentFixture f("slotseq");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record(usage("before")).allowed());
  auto region = hostileMapping(f.shm);
  const std::uint64_t tail = region->header().ledger_tail.load();
  slotOf(*region, tail).seq.store(tail + 7777);

  const std::string shm = f.shm;
  const int rc = inChild([&] {
    std::unique_ptr<Client> c;
    if (!Client::attach({shm}, &c).ok()) return 2;
    // Refused (corrupt) until the agent resets the slot, then accepted and written.
    for (int i = 0; i < 500; ++i) {
      const Decision d = c->record(usage("child"));
      if (d.allowed()) return c->waitDurable(d.ledger_seq, 5000) ? 0 : 4;
      if (d.code != Code::kRegionCorrupt && d.code != Code::kLedgerFull) return 3;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return 5;
  });
  CHECK_MESSAGE(rc == 0, "the application hung, or the ring was never healed (" << rc << ")");
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
}

TEST_CASE("hostile region: ledger_head moved back by one never wedges the ledger writer, and SIGTERM still stops "
          "the agent") {
  AgentFixture f("headback");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  std::vector<Acked> acked;
  recordAll(*client, 5, "before", &acked);
  REQUIRE(client->waitDurable(acked.back().seq, 10000));
  auto region = hostileMapping(f.shm);
  region->header().ledger_head.fetch_sub(1);
  // Longer than the agent waits for a slot with no writer (5 s).
  std::this_thread::sleep_for(std::chrono::milliseconds(6500));
  recordAll(*client, 5, "after", &acked);
  const std::string db = f.dir.path + "/state/ledger.db";
  CHECK(eventually([&] { return count(db, "SELECT COUNT(*) FROM budget_ledger") == 10; }));
  agent->signal(SIGTERM);
  CHECK_MESSAGE(agent->wait() == 0, "the agent did not stop on SIGTERM; its log:\n" << f.log());
  checkAllInLedger(db, acked);
}

TEST_CASE("hostile region: random bytes over the whole ring never wedge the agent, and nothing absurd reaches the "
          "ledger") {
  AgentFixture f("ringnoise");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  for (int i = 0; i < 5; ++i) REQUIRE(client->record(usage("before")).allowed());
  REQUIRE(client->waitDurable(5, 10000));
  auto region = hostileMapping(f.shm);
  std::mt19937_64 rng(12);
  auto* bytes = reinterpret_cast<std::uint64_t*>(region->ledger());
  const std::size_t words = region->header().ledger_capacity * sizeof(shm::LedgerSlot) / 8;
  for (std::size_t i = 0; i < words; ++i) bytes[i] = rng();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  agent->signal(SIGTERM);
  CHECK_MESSAGE(agent->wait() == 0, "the agent did not stop on SIGTERM; its log:\n" << f.log());

  // The next agent starts on that ring, and the ledger works again.
  agent = f.start();
  client = f.waitForRegion(agent->pid());
  const std::string shm = f.shm;
  const int rc = inChild([&] {
    std::unique_ptr<Client> c;
    if (!Client::attach({shm}, &c).ok()) return 2;
    for (int i = 0; i < 500; ++i) {
      const Decision d = c->record(usage("after"));
      if (d.allowed()) return c->waitDurable(d.ledger_seq, 5000) ? 0 : 4;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return 5;
  });
  CHECK(rc == 0);
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
  const std::string db = f.dir.path + "/state/ledger.db";
  CHECK(count(db, "SELECT COUNT(*) FROM budget_ledger WHERE project_id NOT IN ('before', 'after')") == 0);
  CHECK(count(db, "SELECT COALESCE(MAX(cost_nano_usd), 0) FROM spend_by_day") < 1'000'000'000);
}

TEST_CASE("hostile region: ledger_head moved forward by 5000 skips no acknowledged entry") {
  AgentFixture f("headfwd");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record(usage("first")).allowed());
  REQUIRE(client->waitDurable(1, 10000));
  std::vector<Acked> acked;
  agent->signal(SIGSTOP);   // so the entries wait in the ring while the head moves
  recordAll(*client, 20, "acked", &acked);
  auto region = hostileMapping(f.shm);
  region->header().ledger_head.fetch_add(5000);
  agent->signal(SIGCONT);
  const std::string db = f.dir.path + "/state/ledger.db";
  CHECK(eventually([&] { return count(db, "SELECT COUNT(*) FROM budget_ledger WHERE project_id = 'acked'") == 20; }));
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
  checkAllInLedger(db, acked);
}

TEST_CASE("hostile region: entries scribbled on after publishing go to quarantine, never into budget_ledger or "
          "spend_by_day") {
  AgentFixture f("quarantine");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record(usage("first")).allowed());
  REQUIRE(client->waitDurable(1, 10000));
  auto region = hostileMapping(f.shm);
  agent->signal(SIGSTOP);
  std::vector<std::uint64_t> noisy;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 30; ++i) {
    const Decision d = client->record(usage("victim"));
    REQUIRE(d.allowed());
    noisy.push_back(d.ledger_seq);
    // Random payload, the sequence word left as published.
    shm::LedgerSlot& s = slotOf(*region, d.ledger_seq - 1);
    auto* p = reinterpret_cast<unsigned char*>(&s) + sizeof(s.seq);
    for (std::size_t b = 0; b < sizeof(s) - sizeof(s.seq); ++b) p[b] = static_cast<unsigned char>(rng());
  }
  // One plausible-looking change: a cost off by one nano-USD.
  const Decision subtle = client->record(usage("subtle"));
  REQUIRE(subtle.allowed());
  slotOf(*region, subtle.ledger_seq - 1).cost_nano_usd += 1;
  const Decision fine = client->record(usage("fine"));
  REQUIRE(fine.allowed());
  agent->signal(SIGCONT);

  const std::string db = f.dir.path + "/state/ledger.db";
  REQUIRE(eventually([&] {
    try {
      return count(db, "SELECT COUNT(*) FROM budget_ledger WHERE project_id = 'fine'") == 1 &&
             count(db, "SELECT COUNT(*) FROM ledger_quarantine") == 31;
    } catch (const std::exception&) {
      return false;   // no quarantine table
    }
  }));
  CHECK(count(db, "SELECT COUNT(*) FROM budget_ledger") == 2);   // 'first' and 'fine'
  CHECK(count(db, "SELECT COUNT(*) FROM spend_by_day WHERE project_id NOT IN ('first', 'fine')") == 0);
  CHECK(count(db, "SELECT COUNT(*) FROM ledger_quarantine WHERE seq = " + std::to_string(subtle.ledger_seq) +
                      " AND reason LIKE '%checksum%'") == 1);
  CHECK(f.log().find(R"("event":"ledger_entry_quarantined")") != std::string::npos);

  httplib::Client http("127.0.0.1", f.httpPort());
  const auto m = http.Get("/metrics", {{"Authorization", "Bearer " + f.adminToken()}});
  REQUIRE(m);
  CHECK(m->body.find("tokenfuse_ledger_quarantined_total 31") != std::string::npos);
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
}

TEST_CASE("files: rm ledger.db while the agent runs loses no acknowledged entry and no saved limit") {
  AgentFixture f("rmledger");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  const std::string data_dir = f.dir.path + "/state";
  std::string out;
  REQUIRE(f.cli({"limit", "set", "acme", "5", "--data-dir", data_dir}, &out) == 0);
  std::vector<Acked> acked;
  recordAll(*client, 5, "acme", &acked);
  REQUIRE(client->waitDurable(acked.back().seq, 10000));
  const std::string db = data_dir + "/ledger.db";
  REQUIRE(std::filesystem::remove(db));
  int refused = 0;
  for (int i = 0; i < 200; ++i) {
    const Decision d = client->record(usage("acme", 10));
    if (d.allowed()) {
      acked.push_back({d.ledger_seq, "acme"});
    } else {
      CHECK(d.code == Code::kLedgerUnavailable);
      ++refused;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  MESSAGE(acked.size() << " acknowledged, " << refused << " refused while the file was gone");
  CHECK(eventually([&] { return f.log().find(R"("event":"ledger_file_missing")") != std::string::npos; }));
  REQUIRE(client->waitDurable(acked.back().seq, 10000));
  agent->signal(SIGTERM);
  REQUIRE(agent->wait() == 0);
  REQUIRE(std::filesystem::exists(db));
  checkAllInLedger(db, acked);
  CHECK(count(db, "SELECT COUNT(*) FROM limit_override WHERE id = 'acme'") == 1);

  // After a reboot (no region), the next agent rebuilds the tenant's spending from it.
  const NanoUsd spent = client->tenant("acme").committed;
  client.reset();
  Region::remove(f.shm);
  agent = f.start();
  client = f.waitForRegion(agent->pid());
  CHECK(client->tenant("acme").committed == spent);
  CHECK(client->tenant("acme").limit == NanoUsd::fromWholeUsd(5));
}

TEST_CASE("files: garbage over ledger.db in place stops acknowledgements with E-TOKENFUSE-LEDGER-UNAVAILABLE, and "
          "admin changes fail clearly") {
  AgentFixture f("garbled");
  auto agent = f.start();
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record(usage("acme")).allowed());
  REQUIRE(client->waitDurable(1, 10000));
  const std::string data_dir = f.dir.path + "/state";
  {
    const int fd = ::open((data_dir + "/ledger.db").c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    const std::string junk(4096, '\xab');
    REQUIRE(::pwrite(fd, junk.data(), junk.size(), 0) == static_cast<ssize_t>(junk.size()));
    ::close(fd);
  }
  Decision d;
  CHECK(eventually([&] {
    d = client->record(usage("acme"));
    return d.code == Code::kLedgerUnavailable;
  }));
  CHECK(std::string(d.errorCode()) == "E-TOKENFUSE-LEDGER-UNAVAILABLE");
  // The flag in the region is raised before the line is logged: wait for the line.
  CHECK(eventually([&] { return f.log().find(R"("event":"ledger_unavailable")") != std::string::npos; }));
  std::string out;
  CHECK(f.cli({"limit", "set", "acme", "5", "--data-dir", data_dir}, &out) != 0);
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
}

TEST_CASE("files: ledger.db, its -wal and -shm, and the lock file are created 0600 whatever the umask") {
  AgentFixture f("modes");
  const mode_t old = ::umask(022);
  auto agent = f.start();
  ::umask(old);
  auto client = f.waitForRegion(agent->pid());
  REQUIRE(client->record(usage("acme")).allowed());
  REQUIRE(client->waitDurable(1, 10000));
  for (const char* name : {"ledger.db", "ledger.db-wal", "ledger.db-shm", "tokenfused.lock"}) {
    struct stat st{};
    REQUIRE_MESSAGE(::stat((f.dir.path + "/state/" + name).c_str(), &st) == 0, name);
    CHECK_MESSAGE((st.st_mode & 0777) == 0600, name << " has mode " << std::oct << (st.st_mode & 0777));
  }
  agent->signal(SIGTERM);
  CHECK(agent->wait() == 0);
}
