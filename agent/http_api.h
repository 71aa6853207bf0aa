// The localhost HTTP API of tokenfused (docs/http-api.md), for applications that do not link
// libtokenfuse. Reservations made over HTTP belong to the agent's process, so only their
// deadline (ttl_s) returns an abandoned one.
//
// Served by the event-driven http::Server: decisions run on its event loop (the lock-free
// engine, no system call); admin changes, the ledger and /metrics run on its blocking pool,
// since they read or write SQLite or walk the region's tables.
//
// Thread-safety: handlers run on several threads at once; admin changes go through the Agent,
// which serialises and saves them.
#pragma once

#include "agent.h"
#include "http_server.h"
#include "metrics.h"
#include "proxy.h"

#include <memory>
#include <string>

namespace tokenfuse {

class HttpApi {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 8787;              // 0: any free port (tests)
    std::string admin_token;      // Bearer token for the admin endpoints
    std::string unix_socket;      // also listen here if not empty
    int threads = 0;              // event-loop threads; 0: one per core
    http::Limits limits;
    ProxyConfig proxy;            // [proxy]: the LLM proxy, served when it has upstreams
  };

  // Binds, or throws std::runtime_error naming the address.
  HttpApi(Agent& agent, Options options);
  ~HttpApi();   // stops and joins

  int port() const noexcept { return server_->port(); }

 private:
  http::Router routes();

  Agent& agent_;
  RegionAdmin& admin_;
  Engine& engine_;
  Options options_;
  Metrics metrics_;
  std::unique_ptr<Proxy> proxy_;   // nullptr: no [[proxy.upstreams]]
  std::unique_ptr<http::Server> server_;
};

// Reads the admin token from `path`, creating it (mode 0600, 32 random bytes in hex) if missing.
// Refuses (ConfigError naming the file and the fix) a token file that group or others may read
// or write, or that another user owns.
std::string loadOrCreateToken(const std::string& path);

}  // namespace tokenfuse
