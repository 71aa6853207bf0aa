// Ids (project_id, run_id, agent_id, model, provider) are valid UTF-8 without NUL, checked by the
// library at check time as well as at record, reserve and commit time, and by the admin paths
// before anything is applied.
#include "support.h"

#include "ids.h"

#include <tokenfuse/tokenfuse.h>

using namespace tokenfuse;
using namespace tokenfuse::test;
using namespace std::string_view_literals;

TEST_CASE("ids: valid UTF-8 without NUL is accepted, anything else is not") {
  for (std::string_view ok : {""sv, "acme"sv, "team/a"sv, "caf\xC3\xA9"sv, "\xE2\x82\xAC"sv, "\xF0\x9F\x92\xB8"sv,
                              "\xEF\xBF\xBF"sv, "\xF4\x8F\xBF\xBF"sv, "\x7F"sv}) {
    CHECK_MESSAGE(validIdText(ok), ok);
  }
  for (std::string_view bad : {"\xFF"sv, "a\0b"sv, "\0"sv, "\x80"sv, "\xC3"sv, "\xC0\xAF"sv /* overlong '/' */,
                               "\xE0\x80\xAF"sv, "\xF0\x80\x80\xAF"sv, "\xED\xA0\x80"sv /* surrogate */,
                               "\xF4\x90\x80\x80"sv /* past U+10FFFF */, "\xE2\x82"sv, "ok\xF5\x80\x80\x80"sv}) {
    CHECK_FALSE(validIdText(bad));
  }
  CHECK(displayId("bad\xFF") == "bad\xEF\xBF\xBD");
  CHECK(displayId("a\0b"sv) == "a\xEF\xBF\xBD" "b");
  CHECK(displayId("caf\xC3\xA9") == "caf\xC3\xA9");
}

TEST_CASE("library: an id that is not UTF-8 or holds NUL is refused at check, reserve, record and commit") {
  TestRegion t;
  Client& c = *t.client;
  const std::string_view nul_project("ac\0me", 5);
  CHECK(c.check("\xFF", "gpt-4o", 1000).code == Code::kInvalidArgument);
  CHECK(c.check(nul_project, "gpt-4o", 1000).code == Code::kInvalidArgument);
  CHECK(c.check("acme", "gpt\xC0", 1000).code == Code::kInvalidArgument);
  CHECK(c.check("acme", "gpt-4o", 1000, "run\xFF").code == Code::kInvalidArgument);

  Reservation r;
  CHECK(c.reserve({"acme", "gpt-4o", {}, "agent\xED\xA0\x80", 1000, 0, 0}, &r).code == Code::kInvalidArgument);
  CallSite site;
  CHECK(c.prepare({nul_project, "gpt-4o", {}, {}, 1000, 0, 0}, &site).code == Code::kInvalidArgument);
  CHECK(c.record({"acme", "gpt-4o", "openai", {}, std::string_view("a\0", 2), 1000, 0}).code == Code::kInvalidArgument);
  CHECK(c.record({"acme", "gpt-4o", "open\xFF", {}, {}, 1000, 0}).code == Code::kInvalidArgument);
  CHECK(c.record({"\xFF", "gpt-4o", "openai", {}, {}, 1000, 0}).code == Code::kInvalidArgument);
  // Nothing was booked or added for any of them.
  CHECK_FALSE(c.tenant("\xFF").tracked);
  CHECK_FALSE(c.tenant(nul_project).tracked);
  CHECK(c.platform().committed == NanoUsd(0));
  CHECK(c.info().ledger_appended == 0);

  // A commit with a bad provider changes nothing: the reservation is still live.
  REQUIRE(c.reserve({"acme", "gpt-4o", {}, {}, 1000, 0, 0}, &r).allowed());
  CHECK(c.commit(r, "open\xFF", 1000, 0).code == Code::kInvalidArgument);
  CHECK(c.commit(r, std::string_view("open\0ai", 7), 1000, 0).code == Code::kInvalidArgument);
  CHECK(c.tenant("acme").committed == NanoUsd(0));
  CHECK(c.commit(r, "openai", 1000, 0).allowed());
  CHECK(c.tenant("acme").committed == NanoUsd(5'000'000));
}

TEST_CASE("c abi: an id that is not UTF-8 is refused with TF_INVALID_ARGUMENT at check, reserve and record") {
  TestRegion t;
  char error[256];
  tf_client* client = nullptr;
  REQUIRE(tf_attach(t.spec.shm_name.c_str(), &client, error, sizeof error) == 0);
  CHECK(tf_check(client, "\xFF", "gpt-4o", 1000, nullptr).code == TF_INVALID_ARGUMENT);
  CHECK(tf_check(client, "acme", "gpt-4o", 1000, "r\xC3").code == TF_INVALID_ARGUMENT);
  tf_call call = {"acme\xFF", "gpt-4o", nullptr, nullptr, 1000, 0, 0, nullptr};
  std::uint64_t r = 0;
  CHECK(tf_reserve(client, &call, &r).code == TF_INVALID_ARGUMENT);
  tf_usage usage = {"acme", "gpt-4o", "openai", nullptr, "agent\x80", 10, 20, nullptr};
  CHECK(tf_record(client, &usage).code == TF_INVALID_ARGUMENT);
  CHECK(std::string(tf_error_code(TF_INVALID_ARGUMENT)) == "E-TOKENFUSE-INVALID-ARGUMENT");
  tf_detach(client);
  CHECK_FALSE(t.client->tenant("\xFF").tracked);
  CHECK_FALSE(t.client->tenant("acme\xFF").tracked);
  CHECK(t.client->info().ledger_appended == 0);
}

TEST_CASE("admin: a limit, price or fleet total for an id that is not UTF-8 is refused before anything is applied") {
  TestRegion t;
  RegionAdmin& a = *t.admin;
  const Status s = a.setLimit(LimitTable::kTenant, "\xFF", usd("1"));
  CHECK_FALSE(s.ok());
  CHECK(s.message().find("project_id must be valid UTF-8") != std::string::npos);
  CHECK_FALSE(a.setLimit(LimitTable::kRun, std::string_view("r\0", 2), usd("1")).ok());
  CHECK_FALSE(a.clearLimit(LimitTable::kTenant, "\xFF").ok());
  CHECK_FALSE(a.setElsewhere(a.day(), "\xFF", usd("1")).ok());
  CHECK_FALSE(a.setPrice("model\xFF", {1, 1}).ok());
  CHECK_FALSE(a.restore(LimitTable::kTenant, "\xFF", usd("1"), 0, 0, 0).ok());
  int tenants = 0;
  a.forEachTenant([&](std::string_view) { ++tenants; });
  CHECK(tenants == 0);
  CHECK_FALSE(t.client->run(std::string_view("r\0", 2)).tracked);
}
