#include "client_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace tokenfuse::clientlock {

namespace {

struct flock byteLock(short type, std::int64_t start, std::int64_t len) noexcept {
  struct flock l {};
  l.l_type = type;
  l.l_whence = SEEK_SET;
  l.l_start = static_cast<off_t>(start);
  l.l_len = static_cast<off_t>(len);
  l.l_pid = 0;   // required by F_OFD_*
  return l;
}

Held ask(int fd, std::int64_t start, std::int64_t len) noexcept {
  struct flock l = byteLock(F_WRLCK, start, len);
  if (::fcntl(fd, F_OFD_GETLK, &l) != 0) return Held::kUnknown;
  return l.l_type == F_UNLCK ? Held::kNo : Held::kYes;
}

}  // namespace

std::uint32_t claim(int fd, std::uint64_t seed) noexcept {
  constexpr std::uint32_t kNumbers = kMaxClients - 1;
  const auto first = static_cast<std::uint32_t>((seed * 0x9e3779b97f4a7c15ull) >> 40) % kNumbers;
  for (std::uint32_t n = 0; n < kNumbers; ++n) {
    const std::uint32_t client = 1 + (first + n) % kNumbers;
    struct flock l = byteLock(F_WRLCK, kClientLockBase + client, 1);
    if (::fcntl(fd, F_OFD_SETLK, &l) == 0) return client;
    if (errno != EAGAIN && errno != EACCES) return 0;   // not "taken": the kernel refuses locks here
  }
  errno = EUSERS;
  return 0;
}

Held held(int fd, std::uint32_t client) noexcept {
  if (client == kAgentClient || client >= kMaxClients) return Held::kUnknown;
  return ask(fd, kClientLockBase + client, 1);
}

Held anyHeld(int fd) noexcept { return ask(fd, kClientLockBase + 1, kMaxClients - 1); }

}  // namespace tokenfuse::clientlock
