// The latency the LLM proxy adds, and the streams it holds (docs/performance.md, "The LLM
// proxy"). Starts the LLM API stand-in (tests/standin) in this process and a real tokenfused
// proxying to it, then, in the same run and alternating round by round:
//   1. non-streamed chat completions at RATE requests/s over CONNS keep-alive connections, sent
//      to the stand-in directly and through the proxy; latency from each request's scheduled send
//      (so that a stall is not hidden) to its last byte;
//   2. streamed ones, to the first content chunk (time to first token);
// and last 3. STREAMS concurrent streams through the proxy, each a token every 100 ms for
// STREAM_SECONDS, with the agent's CPU time over them read from /proc.
//
//   build/bench/tokenfuse_proxy_bench [build-dir]     (RATE=1000 CONNS=4 ROUNDS=5 SECONDS=5
//                                                      STREAMS=1000 STREAM_SECONDS=10 AGENT_THREADS=0)
#include "llm_standin.h"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
namespace net = boost::asio;

int env(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : fallback;
}

// A blocking keep-alive HTTP/1.1 connection to 127.0.0.1:port.
class Conn {
 public:
  explicit Conn(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) throw std::runtime_error("connect failed");
    const int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~Conn() { ::close(fd_); }
  // Sends `request`; returns when the response is whole (or, with `until`, when `until` appears
  // in it: then the rest is still read before returning, and *first is when it appeared).
  void exchange(const std::string& request, const char* until = nullptr, Clock::time_point* first = nullptr) {
    if (::write(fd_, request.data(), request.size()) != static_cast<ssize_t>(request.size())) throw std::runtime_error("write");
    std::string in;
    char buf[16384];
    std::size_t need = std::string::npos, head_end = std::string::npos;
    bool chunked = false, seen = until == nullptr;
    for (;;) {
      const ssize_t n = ::read(fd_, buf, sizeof buf);
      if (n <= 0) throw std::runtime_error("the server closed the connection");
      in.append(buf, static_cast<std::size_t>(n));
      if (!seen && in.find(until) != std::string::npos) {
        seen = true;
        *first = Clock::now();
      }
      if (head_end == std::string::npos) {
        head_end = in.find("\r\n\r\n");
        if (head_end == std::string::npos) continue;
        if (in.compare(0, 12, "HTTP/1.1 200") != 0) throw std::runtime_error("not 200: " + in.substr(0, 200));
        const std::size_t cl = in.find("Content-Length: ");
        if (cl != std::string::npos && cl < head_end) need = head_end + 4 + std::stoul(in.substr(cl + 16));
        chunked = in.find("Transfer-Encoding: chunked") < head_end;
      }
      if (need != std::string::npos && in.size() >= need) return;
      if (chunked && in.size() >= 5 && in.compare(in.size() - 5, 5, "0\r\n\r\n") == 0) return;
    }
  }

 private:
  int fd_ = -1;
};

std::string chatRequest(const std::string& path, bool stream) {
  const std::string body = std::string(R"({"model":"gpt-4o","max_tokens":16,"stream":)") + (stream ? "true" : "false") +
                           R"(,"messages":[{"role":"user","content":"Say something short."}]})";
  return "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
         "X-Tokenfuse-Project: acme\r\nX-Standin-Tokens: 5\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

struct Result {
  std::vector<double> us;   // latencies, microseconds
  int late = 0;             // sends more than 1 ms behind schedule
};

// RATE requests/s over CONNS connections for `seconds`; each latency from its scheduled send.
Result load(int port, const std::string& path, bool stream, int rate, int conns, int seconds) {
  std::vector<std::thread> threads;
  std::vector<Result> parts(static_cast<std::size_t>(conns));
  const auto interval = std::chrono::nanoseconds(1'000'000'000LL * conns / rate);
  const auto start = Clock::now() + std::chrono::milliseconds(50);
  for (int c = 0; c < conns; ++c) {
    threads.emplace_back([&, c] {
      Conn conn(port);
      const std::string req = chatRequest(path, stream);
      Result& r = parts[static_cast<std::size_t>(c)];
      // Each connection's schedule is offset, so that sends are spread evenly.
      auto next = start + interval * c / conns;
      const auto end = start + std::chrono::seconds(seconds);
      while (next < end) {
        std::this_thread::sleep_until(next);
        if (Clock::now() - next > std::chrono::milliseconds(1)) ++r.late;
        Clock::time_point done;
        conn.exchange(req, stream ? "\"content\":\"tok \"" : nullptr, &done);
        if (!stream) done = Clock::now();
        r.us.push_back(std::chrono::duration<double, std::micro>(done - next).count());
        next += interval;
      }
    });
  }
  for (auto& t : threads) t.join();
  Result all;
  for (auto& p : parts) {
    all.us.insert(all.us.end(), p.us.begin(), p.us.end());
    all.late += p.late;
  }
  std::sort(all.us.begin(), all.us.end());
  return all;
}

double pct(const std::vector<double>& v, double p) {
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<std::size_t>(p / 100.0 * static_cast<double>(v.size())))];
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// CPU seconds (user + system) a process has used.
double cpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(in)), {});
  std::size_t at = s.rfind(')');
  std::vector<std::string> f;
  std::string cur;
  for (std::size_t i = at + 2; i < s.size(); ++i) {
    if (s[i] == ' ') {
      f.push_back(cur);
      cur.clear();
    } else {
      cur += s[i];
    }
  }
  // Fields 14 and 15 (utime, stime) are f[11] and f[12] after the name.
  return (std::stod(f[11]) + std::stod(f[12])) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// `n` streams through the proxy at once, held open for their whole length; returns how many
// were open together at most, as the stand-in counted them.
int holdStreams(int port, int n, int seconds, tokenfuse::test::LlmStandin& standin, pid_t agent, double* agent_cores) {
  net::io_context ioc;
  std::atomic<int> finished{0}, failed{0};
  const std::string body = R"({"model":"gpt-4o","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]})";
  const std::string req = "POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          "X-Tokenfuse-Project: acme\r\nX-Standin-Tokens: " + std::to_string(seconds * 10) +
                          "\r\nX-Standin-Delay-Ms: 100\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  for (int i = 0; i < n; ++i) {
    net::co_spawn(ioc, [&]() -> net::awaitable<void> {
      try {
        net::ip::tcp::socket s(co_await net::this_coro::executor);
        co_await s.async_connect({net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)}, net::use_awaitable);
        co_await net::async_write(s, net::buffer(req), net::use_awaitable);
        std::string in;
        char buf[4096];
        for (;;) {
          const std::size_t got = co_await s.async_read_some(net::buffer(buf), net::use_awaitable);
          in.append(buf, got);
          if (in.size() > 5 && in.compare(in.size() - 5, 5, "0\r\n\r\n") == 0) break;
          if (in.size() > 8192) in.erase(0, in.size() - 16);
        }
        ++finished;
      } catch (...) {
        ++failed;
      }
    }, net::detached);
  }
  std::atomic<int> most{0};
  std::atomic<bool> done{false};
  std::thread watch([&] {
    double cpu0 = 0;
    Clock::time_point t0;
    bool started = false;
    while (!done) {
      const int now = standin.streaming.load();
      most = std::max(most.load(), now);
      if (!started && now == n) {   // all open: measure the agent over the steady state
        started = true;
        cpu0 = cpuSeconds(agent);
        t0 = Clock::now();
      }
      if (started && now < n && *agent_cores == 0) {
        *agent_cores = (cpuSeconds(agent) - cpu0) / std::chrono::duration<double>(Clock::now() - t0).count();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  ioc.run();
  done = true;
  watch.join();
  if (failed > 0) std::cerr << "proxy_bench: " << failed << " of " << n << " streams failed\n";
  return most;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string build = argc > 1 ? argv[1] : "build";
  const int rate = env("RATE", 1000), conns = env("CONNS", 4), rounds = env("ROUNDS", 5), seconds = env("SECONDS", 5);
  const int streams = env("STREAMS", 1000), stream_seconds = env("STREAM_SECONDS", 10);
  const int agent_threads = env("AGENT_THREADS", 0);   // [http] threads; 0: the agent's default, one per core
  rlimit nofile{};
  ::getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &nofile);

  tokenfuse::test::LlmStandin standin(1);
  standin.prompt_tokens = 10;
  char tmpl[] = "/tmp/tokenfuse-proxy-bench-XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  const std::string shm = "tfbench-proxy-" + std::to_string(::getpid());
  std::ofstream(dir + "/tokenfuse.toml") << "[agent]\nshm_name = \"" << shm << "\"\ndata_dir = \"" << dir
                                         << "/state\"\nlog_level = \"warn\"\n[http]\nlisten = \"127.0.0.1:0\"\nthreads = "
                                         << agent_threads << "\nmax_connections = 20000\n[region]\nreservation_capacity = 4096\n"
                                            "[budgets.tenants]\nacme = \"1000000\"\n[proxy]\n[[proxy.upstreams]]\n"
                                            "name = \"openai\"\nkind = \"openai\"\nbase_url = \""
                                         << standin.baseUrl() << "\"\n";
  const std::string agent_path = build + "/agent/tokenfused", config = dir + "/tokenfuse.toml";
  std::vector<char*> args{const_cast<char*>(agent_path.c_str()), const_cast<char*>("--config"), const_cast<char*>(config.c_str()),
                          nullptr};
  pid_t agent = 0;
  if (posix_spawn(&agent, args[0], nullptr, nullptr, args.data(), environ) != 0) {
    std::cerr << "proxy_bench: cannot start " << agent_path << " (build first)\n";
    return 2;
  }
  int port = 0;
  for (int i = 0; i < 100 && port == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream(dir + "/state/http.port") >> port;
  }
  if (port == 0) {
    std::cerr << "proxy_bench: tokenfused did not start\n";
    return 1;
  }
  int status_code = 0;
  try {
    std::printf("%d requests/s over %d connections, %d s a round, agent [http] threads = %d; microseconds from "
                "scheduled send\n", rate, conns, seconds, agent_threads);
    std::printf("%-22s %5s %9s %9s %9s %9s %6s\n", "", "round", "p50", "p90", "p99", "p99.9", "late");
    struct Series {
      const char* name;
      bool stream, proxied;
      std::vector<double> p50, p99;
    };
    std::vector<Series> series{{"whole, direct", false, false, {}, {}},
                               {"whole, via proxy", false, true, {}, {}},
                               {"first token, direct", true, false, {}, {}},
                               {"first token, via proxy", true, true, {}, {}}};
    load(port, "/proxy/openai/v1/chat/completions", false, rate, conns, 1);   // warm up both
    load(standin.port(), "/v1/chat/completions", false, rate, conns, 1);
    double agent_cpu = 0;   // the agent's CPU seconds over the proxied rounds
    std::size_t proxied = 0;
    for (int r = 1; r <= rounds; ++r) {
      for (Series& s : series) {
        const double cpu0 = cpuSeconds(agent);
        const Result res = s.proxied ? load(port, "/proxy/openai/v1/chat/completions", s.stream, rate, conns, seconds)
                                     : load(standin.port(), "/v1/chat/completions", s.stream, rate, conns, seconds);
        if (s.proxied) {
          agent_cpu += cpuSeconds(agent) - cpu0;
          proxied += res.us.size();
        }
        s.p50.push_back(pct(res.us, 50));
        s.p99.push_back(pct(res.us, 99));
        std::printf("%-22s %5d %9.1f %9.1f %9.1f %9.1f %6d\n", s.name, r, pct(res.us, 50), pct(res.us, 90),
                    pct(res.us, 99), pct(res.us, 99.9), res.late);
      }
    }
    std::printf("\nmedian of %d rounds            p50       p99\n", rounds);
    for (const Series& s : series) std::printf("%-26s %9.1f %9.1f\n", s.name, median(s.p50), median(s.p99));
    std::printf("added by the proxy, whole:       %9.1f %9.1f\n", median(series[1].p50) - median(series[0].p50),
                median(series[1].p99) - median(series[0].p99));
    std::printf("added by the proxy, first token: %9.1f %9.1f\n", median(series[3].p50) - median(series[2].p50),
                median(series[3].p99) - median(series[2].p99));
    if (proxied > 0) std::printf("agent CPU per proxied call: %.1f us\n", agent_cpu / static_cast<double>(proxied) * 1e6);

    double cores = 0;
    const int most = holdStreams(port, streams, stream_seconds, standin, agent, &cores);
    std::printf("\n%d streams through the proxy, a token every 100 ms for %d s: %d open at once; agent CPU %.2f cores\n",
                streams, stream_seconds, most, cores);
  } catch (const std::exception& e) {
    std::cerr << "proxy_bench: " << e.what() << "\n";
    status_code = 1;
  }
  ::kill(agent, SIGTERM);
  ::waitpid(agent, nullptr, 0);
  std::filesystem::remove_all(dir);
  std::filesystem::remove("/dev/shm/" + shm);
  return status_code;
}
