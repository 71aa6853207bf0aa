// The ledger: from commit() in an application, through the ring, into SQLite.
#include "agent_support.h"

#include "ledger.h"
#include "ledger_ring.h"
#include "ledger_writer.h"
#include "proc.h"

#include <SQLiteCpp/SQLiteCpp.h>
#include <sys/wait.h>

#include <thread>

using namespace tokenfuse;
using namespace tokenfuse::test;


TEST_CASE("ledger: commit and record each write one entry with the call's fields, durable once drained") {
  LedgerFixture f;
  f.t.admin->setClock(1'800'000'000'000'000'000);
  Reservation r;
  REQUIRE(f.t.client->reserve({"acme", "gpt-4o", "run-1", "agent-7", 1000, 1000, 0}, &r).allowed());
  const Decision c = f.t.client->commit(r, "openai", 1000, 500);
  REQUIRE(c.allowed());
  CHECK(c.ledger_seq == 1);
  const Decision rec = f.t.client->record({"beta", "qwen3:8b", "ollama", {}, {}, 10, 20});
  CHECK(rec.ledger_seq == 2);
  CHECK(f.t.client->durableLedgerSeq() == 0);
  CHECK_FALSE(f.t.client->waitDurable(2, 1));

  const DrainStats d = f.writer->drainOnce();
  CHECK(d.written == 2);
  CHECK(f.t.client->durableLedgerSeq() == 2);
  CHECK(f.t.client->waitDurable(2, 0));

  const auto rows = f.ledger->list({});
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].seq == 1);
  CHECK(rows[0].host_id == "host-a");
  CHECK(rows[0].kind == "commit");
  CHECK(rows[0].project_id == "acme");
  CHECK(rows[0].run_id == "run-1");
  CHECK(rows[0].agent_id == "agent-7");
  CHECK(rows[0].model == "gpt-4o");
  CHECK(rows[0].provider == "openai");
  CHECK(rows[0].prompt_tokens == 1000);
  CHECK(rows[0].completion_tokens == 500);
  CHECK(rows[0].cost_nano_usd == 12'500'000);
  CHECK(rows[0].reservation_id == r.id);
  CHECK(rows[0].unix_ns == 1'800'000'000'000'000'000);
  CHECK(rows[0].day == 20'000);
  CHECK(rows[1].kind == "record");
  CHECK(rows[1].cost_nano_usd == 0);
  CHECK(rows[1].run_id.empty());
  CHECK(rows[1].reservation_id == 0);
  CHECK(f.ledger->integrityCheck() == "ok");
}

TEST_CASE("ledger: a call's tags go from the reservation or the record to its entry, checked with the rest") {
  LedgerFixture f;
  Call call{"acme", "gpt-4o", {}, {}, 10, 0, 0};
  call.tags = "batch,eval";
  Reservation r;
  REQUIRE(f.t.client->reserve(call, &r).allowed());
  REQUIRE(f.t.client->commit(r, "openai", 10, 0).allowed());
  Usage u{"beta", "qwen3:8b", "ollama", {}, {}, 1, 1};
  u.tags = "nightly";
  REQUIRE(f.t.client->record(u).allowed());
  REQUIRE(f.t.client->record({"beta", "qwen3:8b", "ollama", {}, {}, 1, 1}).allowed());
  // An entry whose tags were written over from outside after it was published: set aside.
  REQUIRE(f.t.client->record(u).allowed());
  f.t.region->ledger()[3].tags.bytes[0] = 'X';
  CHECK(f.writer->drainOnce().written == 3);
  const auto rows = f.ledger->list({});
  REQUIRE(rows.size() == 3);
  CHECK(rows[0].tags == "batch,eval");
  CHECK(rows[1].tags == "nightly");
  CHECK(rows[2].tags.empty());
  // The rebuild's totals keep calls of the same ids apart by their tags.
  int beta = 0;
  for (const CallTotal& t : f.ledger->callTotalsSince(INT64_MIN, INT32_MIN)) {
    if (t.project_id == "beta") beta += t.tags == "nightly" || t.tags.empty() ? 1 : 100;
  }
  CHECK(beta == 2);
  CHECK(toJson(rows[0])["tags"] == "batch,eval");
  CHECK(toJson(rows[2])["tags"].is_null());
  SQLite::Database db(f.dir.path + "/ledger.db", SQLite::OPEN_READONLY);
  CHECK(db.execAndGet("SELECT COUNT(*) FROM budget_ledger WHERE tags IS NULL").getInt() == 1);
  CHECK(db.execAndGet("SELECT tags FROM ledger_quarantine").getString() == "Xightly");
}

TEST_CASE("ledger: a ledger from before tags were kept gains the column, its entries with none") {
  TempDir dir;
  const std::string path = dir.path + "/ledger.db";
  {
    SQLite::Database db(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec("CREATE TABLE budget_ledger (seq INTEGER PRIMARY KEY, host_id TEXT NOT NULL, created_at_unix_ns INTEGER "
            "NOT NULL, day INTEGER NOT NULL, kind TEXT NOT NULL, project_id TEXT NOT NULL, agent_id TEXT, run_id TEXT, "
            "model TEXT NOT NULL, provider TEXT, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
            "cost_nano_usd INTEGER NOT NULL, reservation_id INTEGER)");
    db.exec("INSERT INTO budget_ledger VALUES (1, 'h', 0, 0, 'record', 'acme', '', NULL, 'm', 'p', 1, 2, 3, NULL)");
    db.exec("CREATE TABLE ledger_quarantine (seq INTEGER PRIMARY KEY, host_id TEXT NOT NULL, quarantined_unix_ns "
            "INTEGER NOT NULL, reason TEXT NOT NULL, kind INTEGER, created_at_unix_ns INTEGER, day INTEGER, "
            "prompt_tokens INTEGER, completion_tokens INTEGER, cost_nano_usd INTEGER, reservation_id INTEGER, "
            "checksum INTEGER, project_id BLOB, run_id BLOB, model BLOB, agent_id BLOB, provider BLOB)");
  }
  // Read as the CLI reads it, before any agent added the column.
  const auto old_rows = Ledger::openReadOnly(path)->list({});
  REQUIRE(old_rows.size() == 1);
  CHECK(old_rows[0].tags.empty());
  Ledger ledger(path, "h");
  const auto rows = ledger.list({});
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].tags.empty());
  CHECK(ledger.callTotalsSince(INT64_MIN, INT32_MIN).at(0).tags.empty());
  LedgerEntry e;
  e.seq = 2;
  e.kind = "record";
  e.project_id = "acme";
  e.model = "m";
  e.tags = "batch";
  std::vector<LedgerEntry> entries{e};
  CHECK(ledger.append(entries, {}, 0) == 1);
  CHECK(ledger.list({}).at(1).tags == "batch");
  QuarantinedEntry q;
  q.seq = 3;
  q.reason = "test";
  q.tags = "x";
  std::vector<LedgerEntry> none;
  (void)ledger.append(none, {q}, 0);
  CHECK(SQLite::Database(path).execAndGet("SELECT tags FROM ledger_quarantine").getString() == "x");
}

TEST_CASE("ledger: the reference's budget_ledger columns are there, with cost_usd as an exact decimal") {
  LedgerFixture f;
  REQUIRE(f.t.client->record({"acme", "gemini-2.0-flash", "google", "run-9", "a1", 1, 0}).allowed());
  f.writer->drainOnce();
  SQLite::Database db(f.dir.path + "/ledger.db", SQLite::OPEN_READONLY);
  SQLite::Statement q(db,
                      "SELECT project_id, agent_id, run_id, model, provider, prompt_tokens, completion_tokens, "
                      "cost_usd, created_at FROM budget_ledger");
  REQUIRE(q.executeStep());
  CHECK(q.getColumn(0).getString() == "acme");
  CHECK(q.getColumn(7).getString() == "0.000000075");
  CHECK(q.getColumn(8).getString().size() == 24);   // 2026-11-29T14:42:15.123Z
}

TEST_CASE("ledger: writing the same entries again stores them once") {
  TempDir dir;
  Ledger ledger(dir.path + "/ledger.db", "h");
  std::vector<LedgerEntry> batch(3);
  for (std::uint64_t i = 0; i < 3; ++i) {
    batch[i].seq = i + 1;
    batch[i].kind = "record";
    batch[i].project_id = "p";
    batch[i].model = "m";
    batch[i].cost_nano_usd = 10;
  }
  CHECK(ledger.append(batch) == 3);
  CHECK(ledger.append(batch) == 0);
  CHECK(ledger.maxSeq() == 3);
  CHECK(ledger.platformTotal(0).cost_nano_usd == 30);
}

TEST_CASE("ledger: a full ring refuses commit and record with E-TOKENFUSE-LEDGER-FULL and books nothing") {
  LedgerFixture f(16);
  for (int i = 0; i < 16; ++i) REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1000, 0}).allowed());
  const BudgetView before = f.t.client->tenant("acme");
  CHECK(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1000, 0}).code == Code::kLedgerFull);
  Reservation r;
  REQUIRE(f.t.client->reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());
  const Decision full = f.t.client->commit(r, "o", 1000, 0);
  CHECK(full.code == Code::kLedgerFull);
  CHECK(std::string(full.errorCode()) == "E-TOKENFUSE-LEDGER-FULL");
  CHECK(f.t.client->tenant("acme").committed == before.committed);
  CHECK(f.t.client->tenant("acme").held == NanoUsd(5'000'000));   // the reservation is still live
  CHECK(f.t.region->header().stats.ledger_full.load() == 2);

  CHECK(f.writer->drainOnce().written == 16);   // the agent catches up ...
  CHECK(f.t.client->commit(r, "o", 1000, 0).allowed());   // ... and the retry goes through
  f.writer->drainOnce();
  CHECK(f.ledger->maxSeq() == 17);
}

TEST_CASE("ledger: a commit of an unknown reservation leaves no entry, and the sequence moves on") {
  LedgerFixture f;
  CHECK(f.t.client->commit(Reservation{999}, "o", 1, 1).code == Code::kUnknownReservation);
  REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1, 0}).allowed());
  const DrainStats d = f.writer->drainOnce();
  CHECK(d.written == 1);
  CHECK(d.skipped == 1);
  CHECK(f.ledger->list({})[0].seq == 2);
}

TEST_CASE("crash: an application killed in the middle of writing an entry does not wedge the ledger") {
  LedgerFixture f;
  REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1, 0}).allowed());
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t app = ::fork();
  if (app == 0) {
    // Claim the next slot as commit() does, then die before publishing it.
    std::unique_ptr<Region> region;
    if (!Region::attach(f.t.spec.shm_name, &region).ok()) ::_exit(1);
    LedgerRing ring(region->header(), region->ledger(), region->geometry().ledger_capacity);
    std::uint64_t pos = 0;
    if (ring.claim(region->client(), &pos) == nullptr) ::_exit(2);   // writers name their client number
    (void)::write(ready[1], "k", 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  REQUIRE_MESSAGE(::read(ready[0], &ok, 1) == 1, "the child failed before claiming a slot");
  ::close(ready[0]);
  REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 2, 0}).allowed());   // seq 3, behind it

  CHECK(f.writer->drainOnce().written == 1);   // seq 1; seq 2 is being written by a live process
  ::kill(app, SIGKILL);
  ::waitpid(app, nullptr, 0);
  const DrainStats d = f.writer->drainOnce();
  CHECK(d.skipped == 1);
  CHECK(d.written == 1);
  CHECK(f.t.client->durableLedgerSeq() == 3);
  CHECK(f.t.region->header().stats.ledger_abandoned.load() == 1);
  const auto rows = f.ledger->list({});
  REQUIRE(rows.size() == 2);
  CHECK(rows[1].seq == 3);
}

TEST_CASE("crash: a slot claimed by a writer with no pid is skipped only after the abandon timeout") {
  LedgerFixture f;
  LedgerRing ring(f.t.region->header(), f.t.region->ledger(), f.t.region->geometry().ledger_capacity);
  std::uint64_t pos = 0;
  REQUIRE(ring.claim(0, &pos) != nullptr);   // a writer in another pid namespace, say
  REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1, 0}).allowed());
  CHECK_FALSE(f.writer->drainOnce().any());
  CHECK_FALSE(f.writer->drainOnce().any());
  std::this_thread::sleep_for(std::chrono::milliseconds(250));
  const DrainStats d = f.writer->drainOnce();
  CHECK(d.skipped == 1);
  CHECK(d.written == 1);
}

TEST_CASE("crash: a writer that resumes after its slot was abandoned is told its entry is lost, and the ring "
          "goes on") {
  LedgerFixture f(16);
  LedgerRing ring(f.t.region->header(), f.t.region->ledger(), f.t.region->geometry().ledger_capacity);
  std::uint64_t pos = 0;
  shm::LedgerSlot* stalled = ring.claim(0, &pos);
  REQUIRE(stalled != nullptr);
  CHECK_FALSE(f.writer->drainOnce().any());
  std::this_thread::sleep_for(std::chrono::milliseconds(250));
  CHECK(f.writer->drainOnce().skipped == 1);
  stalled->kind = shm::kLedgerRecord;
  CHECK_FALSE(LedgerRing::publish(*stalled, pos));   // too late: never acknowledged
  // Two more laps of the ring go through.
  for (int i = 0; i < 32; ++i) {
    REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1, 0}).allowed());
    if (i % 8 == 7) REQUIRE(f.writer->drainOnce().written == 8);
  }
  CHECK(f.ledger->maxSeq() == 33);
  CHECK(f.ledger->list({}).size() == 32);
}

TEST_CASE("crash: an agent killed between recording its durable position and handing slots back leaves a "
          "ledger the next agent repairs") {
  LedgerFixture f(16);
  for (int i = 0; i < 10; ++i) REQUIRE(f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1, 0}).allowed());
  // As the dying agent left it: the entries are in SQLite and head is past them, slots not released.
  f.writer->drainOnce();
  for (std::uint64_t p = 0; p < 10; ++p) f.t.region->ledger()[p].seq.store(p + 1);   // "not handed back"
  LedgerWriter next(*f.t.admin, *f.ledger, "host-a", {});
  for (int i = 0; i < 20; ++i) {   // more than a lap: needs every slot back
    const Decision rd = f.t.client->record({"acme", "gpt-4o", "o", {}, {}, 1, 0});
    REQUIRE_MESSAGE(rd.allowed(), i << " " << std::string(rd.errorCode()));
    if (i % 8 == 7) next.drainOnce();
  }
  next.drainOnce();
  CHECK(f.ledger->maxSeq() == 30);
  CHECK(f.ledger->list({}).size() == 30);
}
