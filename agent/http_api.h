// The localhost HTTP API of tokenfused (docs/http-api.md), for applications that do not link
// libtokenfuse. Reservations made over HTTP belong to the agent's process, so only their
// deadline (ttl_s) returns an abandoned one.
//
// Thread-safety: handlers run on cpp-httplib's worker threads; decisions use the lock-free
// engine, admin changes go through the Agent, which serialises and saves them.
#pragma once

#include "agent.h"
#include "metrics.h"

#include <memory>
#include <string>
#include <thread>

namespace httplib {
class Server;
}

namespace tokenfuse {

class HttpApi {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 8787;              // 0: any free port (tests)
    std::string admin_token;      // Bearer token for the admin endpoints
    std::size_t max_body_bytes = 64 * 1024;
  };

  // Binds, or throws std::runtime_error naming the address.
  HttpApi(Agent& agent, Options options);
  ~HttpApi();   // stops and joins

  int port() const noexcept { return port_; }

 private:
  void routes();

  Agent& agent_;
  RegionAdmin& admin_;
  Engine& engine_;
  Options options_;
  Metrics metrics_;
  std::unique_ptr<httplib::Server> server_;
  int port_ = 0;
  std::thread thread_;
};

// Reads the admin token from `path`, creating it (mode 0600, 32 random bytes in hex) if missing.
// Refuses (ConfigError naming the file and the fix) a token file that group or others may read
// or write, or that another user owns.
std::string loadOrCreateToken(const std::string& path);

}  // namespace tokenfuse
