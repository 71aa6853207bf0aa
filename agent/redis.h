// A Redis connection for the central link and fleet alerts: one hiredis context, commands as
// argument vectors (no string formatting, so ids cannot inject), pipelining by append()/next().
//
// Thread-safety: none; each thread that talks to Redis owns its own connection.
#pragma once

#include "config.h"

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct redisContext;
struct redisReply;

namespace tokenfuse {

// The central link (Redis or Postgres) failed: unreachable, refused, or answered an error.
class LinkError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RedisReplyDeleter {
  void operator()(redisReply* r) const noexcept;
};
using RedisReply = std::unique_ptr<redisReply, RedisReplyDeleter>;

// A string or status reply's text; "" for anything else (nil included).
std::string replyText(const redisReply* r);
// An integer reply, or a string reply read as one; 0 for anything else.
std::int64_t replyInteger(const redisReply* r);

class RedisConnection {
 public:
  // Connects, authenticates and selects the database. Throws LinkError naming host and port.
  RedisConnection(const RedisEndpoint& e, std::int64_t timeout_ms);
  ~RedisConnection();
  RedisConnection(const RedisConnection&) = delete;
  RedisConnection& operator=(const RedisConnection&) = delete;

  // Throws LinkError for a dead connection or an error reply.
  RedisReply command(const std::vector<std::string>& args);
  void append(const std::vector<std::string>& args);
  RedisReply next();

 private:
  [[noreturn]] void fail();
  redisContext* ctx_ = nullptr;
};

}  // namespace tokenfuse
