// Real Redis and Postgres servers for the central link's tests: Debian's redis-server and
// postgresql, each on a free loopback port with its data in a temp dir, started and stopped by
// the test. As root, Postgres runs as the postgres user (it refuses root).
#pragma once

#include "agent_support.h"
#include "process.h"

#include <hiredis/hiredis.h>
#include <pqxx/pqxx>

#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>

#include <filesystem>

namespace tokenfuse::test {

// A loopback TCP port that was free a moment ago.
inline int freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

class RedisServer {
 public:
  RedisServer() : port_(freePort()) { start(); }
  void start() {
    proc_ = std::make_unique<Process>(
        std::vector<std::string>{"/usr/bin/redis-server", "--port", std::to_string(port_), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", dir_.path},
        dir_.path + "/redis.log");
    REQUIRE_MESSAGE(eventually([&] { return ping(); }), "redis-server did not start");
  }
  // Stops it the hard way: its data is lost, as on a crash without persistence.
  void kill() {
    proc_->signal(SIGKILL);
    proc_->wait();
  }
  bool ping() {
    redisContext* c = redisConnect("127.0.0.1", port_);
    void* reply = c != nullptr && c->err == 0 ? redisCommand(c, "PING") : nullptr;
    const bool ok = reply != nullptr;
    if (reply != nullptr) freeReplyObject(reply);
    if (c != nullptr) redisFree(c);
    return ok;
  }
  // Runs one command; returns its reply as text (integers in decimal), "" for nil.
  std::string command(const std::vector<std::string>& args) {
    redisContext* c = redisConnect("127.0.0.1", port_);
    REQUIRE((c != nullptr && c->err == 0));
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(redisCommandArgv(c, static_cast<int>(args.size()), argv.data(), lens.data()));
    REQUIRE(r != nullptr);
    std::string out = r->type == REDIS_REPLY_INTEGER ? std::to_string(r->integer)
                      : r->str != nullptr            ? std::string(r->str, r->len)
                                                     : std::string();
    freeReplyObject(r);
    redisFree(c);
    return out;
  }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_) + "/0"; }

 private:
  TempDir dir_;
  int port_;
  std::unique_ptr<Process> proc_;
};

class PostgresServer {
 public:
  PostgresServer() : port_(freePort()) {
    for (const auto& e : std::filesystem::directory_iterator("/usr/lib/postgresql")) {
      if (std::filesystem::exists(e.path() / "bin/initdb")) bin_ = (e.path() / "bin").string();
    }
    REQUIRE_MESSAGE(!bin_.empty(), "no /usr/lib/postgresql/*/bin/initdb: apt-get install postgresql");
    if (::geteuid() == 0) {
      const passwd* pw = ::getpwnam("postgres");
      REQUIRE_MESSAGE(pw != nullptr, "running as root, and there is no postgres user to run the server as");
      REQUIRE(::chown(dir_.path.c_str(), pw->pw_uid, pw->pw_gid) == 0);
    }
    Process init(asServerUser({bin_ + "/initdb", "-D", dir_.path + "/data", "-A", "trust", "-U", "tokenfuse",
                               "--no-sync", "-E", "UTF8", "--no-locale"}),
                 dir_.path + "/initdb.log");
    REQUIRE_MESSAGE(init.wait(std::chrono::seconds(60)) == 0, "initdb failed:\n" << init.output());
    start();
  }
  ~PostgresServer() { stop(); }
  void start() {
    proc_ = std::make_unique<Process>(
        asServerUser({bin_ + "/postgres", "-D", dir_.path + "/data", "-p", std::to_string(port_), "-k", dir_.path, "-c",
                      "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=50"}),
        dir_.path + "/postgres.log");
    REQUIRE_MESSAGE(eventually([&] { return connects(); }, std::chrono::seconds(30)),
                    "postgres did not start:\n" << proc_->output());
  }
  // Fast shutdown (SIGINT): clients are cut off, committed data stays.
  void stop() {
    if (proc_ == nullptr) return;
    proc_->signal(SIGINT);
    proc_->wait(std::chrono::seconds(30));
    proc_.reset();
  }
  bool connects() {
    try {
      pqxx::connection c(url());
      return c.is_open();
    } catch (const std::exception&) {
      return false;
    }
  }
  std::string url() const { return "postgresql://tokenfuse@127.0.0.1:" + std::to_string(port_) + "/postgres"; }
  pqxx::result query(const std::string& sql) {
    pqxx::connection c(url());
    pqxx::work w(c);
    pqxx::result r = w.exec(sql);
    w.commit();
    return r;
  }

 private:
  std::vector<std::string> asServerUser(std::vector<std::string> args) const {
    if (::geteuid() != 0) return args;
    std::vector<std::string> wrapped{"/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"};
    wrapped.insert(wrapped.end(), args.begin(), args.end());
    return wrapped;
  }

  TempDir dir_;
  int port_;
  std::string bin_;
  std::unique_ptr<Process> proc_;
};

}  // namespace tokenfuse::test
