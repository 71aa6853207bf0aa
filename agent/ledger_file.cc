#include "ledger_file.h"

#include "ledger.h"
#include "log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace tokenfuse {

namespace {

constexpr char kSqliteHeader[16] = {'S', 'Q', 'L', 'i', 't', 'e', ' ', 'f', 'o', 'r', 'm', 'a', 't', ' ', '3', '\0'};

std::string linkPathOf(const std::string& path) {
  const std::filesystem::path p(path);
  return (p.parent_path() / ("." + p.filename().string() + ".link")).string();
}

}  // namespace

LedgerFile::LedgerFile(std::string path) : path_(std::move(path)), link_(linkPathOf(path_)) {
  struct stat st{};
  if (::lstat(path_.c_str(), &st) != 0 && errno == ENOENT && ::lstat(link_.c_str(), &st) == 0) {
    // Deleted while no agent ran: the second link still holds every entry and saved setting.
    if (::link(link_.c_str(), path_.c_str()) == 0) {
      log::warn("ledger_restored", {{"path", path_}, {"from", link_}, {"why", "ledger.db was deleted while stopped"}});
    }
  }
  // O_NOFOLLOW: the data dir is the agent's; a symlink there is not a ledger to write through.
  const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw LedgerError("ledger " + path_ + ": cannot open: " + std::strerror(errno));
  // Whatever the umask, and for a file an older version created 0644: the ledger holds every
  // tenant's spending. SQLite gives its -wal and -shm the mode of this file.
  const bool ok = ::fchmod(fd, 0600) == 0 && ::fstat(fd, &st) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) throw LedgerError("ledger " + path_ + ": cannot set its mode to 0600: " + std::strerror(err));
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  for (const char* suffix : {"-wal", "-shm", "-journal"}) (void)::chmod((path_ + suffix).c_str(), 0600);
  // The second link: replaced, so it always names this file (an operator who starts a new
  // ledger deletes both names while the agent is stopped).
  (void)::unlink(link_.c_str());
  linked_ = ::link(path_.c_str(), link_.c_str()) == 0;
  if (!linked_) {
    log::warn("ledger_link_failed", {{"path", link_}, {"error", std::strerror(errno)},
                                     {"consequence", "a deleted ledger.db cannot be restored while the agent runs"}});
  }
}

bool LedgerFile::deleted() const {
  struct stat st{};
  return ::lstat(path_.c_str(), &st) != 0 && errno == ENOENT;
}

std::string LedgerFile::problem() const {
  struct stat st{};
  if (::lstat(path_.c_str(), &st) != 0) {
    return errno == ENOENT ? "was deleted" : std::string("cannot be examined: ") + std::strerror(errno);
  }
  if (st.st_dev != dev_ || st.st_ino != ino_) return "was replaced by another file (not the one the agent opened)";
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return std::string("cannot be read: ") + std::strerror(errno);
  char head[sizeof kSqliteHeader] = {};
  const ssize_t n = ::pread(fd, head, sizeof head, 0);
  ::close(fd);
  // An empty file is a database SQLite has not written yet; anything else must be one.
  if (n == 0 && st.st_size == 0) return {};
  if (n != static_cast<ssize_t>(sizeof head) || std::memcmp(head, kSqliteHeader, sizeof head) != 0) {
    return "does not start with the SQLite header: it was written over";
  }
  return {};
}

bool LedgerFile::restore() const {
  if (!linked_ || !deleted()) return false;
  struct stat st{};
  if (::lstat(link_.c_str(), &st) != 0 || st.st_dev != dev_ || st.st_ino != ino_) return false;
  return ::link(link_.c_str(), path_.c_str()) == 0;
}

}  // namespace tokenfuse
