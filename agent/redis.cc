#include "redis.h"

#include <hiredis/hiredis.h>

#include <cstdlib>

namespace tokenfuse {

void RedisReplyDeleter::operator()(redisReply* r) const noexcept { freeReplyObject(r); }

std::string replyText(const redisReply* r) {
  return r != nullptr && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) ? std::string(r->str, r->len)
                                                                                          : std::string();
}

std::int64_t replyInteger(const redisReply* r) {
  if (r == nullptr) return 0;
  if (r->type == REDIS_REPLY_INTEGER) return r->integer;
  if (r->type == REDIS_REPLY_STRING) return std::strtoll(r->str, nullptr, 10);
  return 0;
}

RedisConnection::RedisConnection(const RedisEndpoint& e, std::int64_t timeout_ms) {
  timeval tv{static_cast<time_t>(timeout_ms / 1000), static_cast<suseconds_t>(timeout_ms % 1000 * 1000)};
  ctx_ = redisConnectWithTimeout(e.host.c_str(), e.port, tv);
  if (ctx_ == nullptr || ctx_->err != 0) {
    const std::string why = ctx_ != nullptr ? ctx_->errstr : "out of memory";
    if (ctx_ != nullptr) redisFree(ctx_);
    ctx_ = nullptr;
    throw LinkError("redis " + e.host + ":" + std::to_string(e.port) + ": " + why);
  }
  redisSetTimeout(ctx_, tv);
  try {
    if (!e.password.empty()) {
      if (e.user.empty()) {
        command({"AUTH", e.password});
      } else {
        command({"AUTH", e.user, e.password});
      }
    }
    if (e.db != 0) command({"SELECT", std::to_string(e.db)});
  } catch (...) {
    redisFree(ctx_);   // the destructor does not run for a constructor that throws
    ctx_ = nullptr;
    throw;
  }
}

RedisConnection::~RedisConnection() {
  if (ctx_ != nullptr) redisFree(ctx_);
}

RedisReply RedisConnection::command(const std::vector<std::string>& args) {
  append(args);
  return next();
}

void RedisConnection::append(const std::vector<std::string>& args) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (const std::string& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  if (redisAppendCommandArgv(ctx_, static_cast<int>(args.size()), argv.data(), lens.data()) != REDIS_OK) fail();
}

RedisReply RedisConnection::next() {
  void* raw = nullptr;
  if (redisGetReply(ctx_, &raw) != REDIS_OK || raw == nullptr) fail();
  RedisReply r(static_cast<redisReply*>(raw));
  if (r->type == REDIS_REPLY_ERROR) throw LinkError("redis: " + std::string(r->str, r->len));
  return r;
}

void RedisConnection::fail() { throw LinkError(std::string("redis: ") + (ctx_->err != 0 ? ctx_->errstr : "no reply")); }

}  // namespace tokenfuse
