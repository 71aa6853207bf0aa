// Raw-socket HTTP for tests that must control every byte and every pause: slow clients, bad
// headers, pipelining, connections held open by the thousand.
#pragma once

#include <doctest/doctest.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <string>

namespace tokenfuse::test {

// A connected socket to 127.0.0.1:port (or -1).
inline int connectTcp(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

inline int connectUnix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

inline bool sendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

struct RawResponse {
  int status = 0;     // 0: none (closed or timed out first)
  std::string head;   // status line and headers
  std::string body;   // de-chunked
  bool closed = false;   // the server closed the connection after it
};

// Reads one response (Content-Length or chunked; none after HEAD) within `timeout`. Bytes after
// it stay in *rest.
inline RawResponse readResponse(int fd, std::chrono::milliseconds timeout, std::string* rest, bool head = false) {
  RawResponse r;
  std::string& buf = *rest;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto fill = [&]() -> bool {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    char chunk[65536];
    const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n <= 0) {
      r.closed = true;
      return false;
    }
    buf.append(chunk, static_cast<std::size_t>(n));
    return true;
  };
  std::size_t end;
  while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
    if (!fill()) return r;
  }
  r.head = buf.substr(0, end + 2);
  buf.erase(0, end + 4);
  r.status = std::atoi(r.head.c_str() + 9);
  std::string lower = r.head;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (head || r.status == 100 || r.status == 204) return r;
  if (lower.find("transfer-encoding: chunked") != std::string::npos) {
    for (;;) {
      std::size_t eol;
      while ((eol = buf.find("\r\n")) == std::string::npos) {
        if (!fill()) return r;
      }
      const std::size_t size = std::stoul(buf.substr(0, eol), nullptr, 16);
      while (buf.size() < eol + 2 + size + 2) {
        if (!fill()) return r;
      }
      r.body.append(buf, eol + 2, size);
      buf.erase(0, eol + 2 + size + 2);
      if (size == 0) break;
    }
  } else {
    const std::size_t at = lower.find("content-length: ");
    const std::size_t length = at == std::string::npos ? 0 : std::stoul(lower.substr(at + 16));
    while (buf.size() < length) {
      if (!fill()) return r;
    }
    r.body = buf.substr(0, length);
    buf.erase(0, length);
  }
  return r;
}

inline RawResponse readResponse(int fd, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  std::string rest;
  return readResponse(fd, timeout, &rest);
}

// Whether the peer has closed `fd` (end of file within `timeout`).
inline bool peerClosed(int fd, std::chrono::milliseconds timeout) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
  char c;
  return ::recv(fd, &c, 1, MSG_PEEK) == 0;
}

inline std::string checkRequest(std::string_view host = "127.0.0.1") {
  const std::string body = R"({"project_id":"acme","model":"gpt-4o"})";
  return "POST /v1/check HTTP/1.1\r\nHost: " + std::string(host) +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

// Raises this process's open-file limit (and its children's) to `want`, or as far as it may: past
// the hard limit only as root. Returns the new soft limit.
inline rlim_t raiseFileLimit(rlim_t want = 32768) {
  rlimit lim{};
  ::getrlimit(RLIMIT_NOFILE, &lim);
  if (lim.rlim_max < want) {
    const rlimit raised{want, want};
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) return want;
  }
  lim.rlim_cur = lim.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &lim);
  ::getrlimit(RLIMIT_NOFILE, &lim);
  return lim.rlim_cur;
}

// A line of /proc/<pid>/status as a number ("VmHWM" in kB, "Threads").
inline long procStatus(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  }
  return -1;
}

}  // namespace tokenfuse::test
