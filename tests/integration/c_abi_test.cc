#include "process.h"
#include "support.h"

using namespace tokenfuse;
using namespace tokenfuse::test;

TEST_CASE("c abi: a C program linked against libtokenfuse.so checks, reserves, charges, commits and reads views") {
  TestRegion t;
  REQUIRE(t.admin->setLimit(LimitTable::kTenant, "acme", usd("0.02")).ok());
  char out[] = "/tmp/tokenfuse-c-abi-XXXXXX";
  const int fd = ::mkstemp(out);
  REQUIRE(fd >= 0);
  ::close(fd);
  Process p({TOKENFUSE_C_CLIENT_PATH, t.spec.shm_name}, out);
  const int rc = p.wait();
  const std::string output = p.output();
  ::unlink(out);
  CHECK_MESSAGE(rc == 0, output);
  CHECK(output.find("c_abi_client: ok") != std::string::npos);
}
