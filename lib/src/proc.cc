#include "proc.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace tokenfuse::proc {

namespace {

// Reads field 3 (state) and field 22 (start time) of /proc/PID/stat. Returns start time, or 0.
std::uint64_t readStat(int pid, char* state) noexcept {
  *state = '?';
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return 0;
  if (p[1] == ' ') *state = p[2];
  // After ") " come fields 3, 4, ...; start time is field 22.
  int field = 2;
  for (++p; *p != '\0'; ++p) {
    if (*p == ' ') {
      ++field;
      if (field == 22) return std::strtoull(p + 1, nullptr, 10);
    }
  }
  return 0;
}

}  // namespace

std::uint64_t startTime(int pid) noexcept {
  char state;
  return readStat(pid, &state);
}

std::uint64_t pidNamespace() noexcept {
  struct stat st {};
  if (::stat("/proc/self/ns/pid", &st) != 0) return 0;
  return static_cast<std::uint64_t>(st.st_ino);
}

}  // namespace tokenfuse::proc
