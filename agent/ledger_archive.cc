#include "ledger_archive.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>
#include <vector>

namespace tokenfuse {

namespace {

constexpr std::int64_t kDayNs = std::int64_t{86400} * 1'000'000'000;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("archive " + path + ": " + what);
}

void syncPath(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    fail(path, std::string("fsync: ") + std::strerror(err));
  }
  ::close(fd);
}

// The gzip stream over a file made for it alone (O_EXCL, mode 0600: it holds the tenants' calls).
class GzFile {
 public:
  explicit GzFile(std::string path) : path_(std::move(path)) {
    const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) fail(path_, std::strerror(errno));
    gz_ = ::gzdopen(fd, "wb6");
    if (gz_ == nullptr) {
      ::close(fd);
      fail(path_, "cannot start gzip");
    }
  }
  ~GzFile() {
    if (gz_ != nullptr) ::gzclose(gz_);
  }
  void write(const std::string& line) {
    if (::gzwrite(gz_, line.data(), static_cast<unsigned>(line.size())) != static_cast<int>(line.size())) {
      int err = 0;
      fail(path_, std::string("write: ") + ::gzerror(gz_, &err));
    }
  }
  void close() {
    const int rc = ::gzclose(gz_);
    gz_ = nullptr;
    if (rc != Z_OK) fail(path_, "write: the gzip stream did not close (disk full?)");
  }

 private:
  std::string path_;
  gzFile gz_ = nullptr;
};

}  // namespace

ArchiveReport archiveLedger(Ledger& ledger, const ArchiveOptions& o) {
  ArchiveReport r;
  // What must stay: the agent's last bounds, or a month and a week; and whatever a central link
  // has not pushed, by the lowest position any of them left (a link that pushed nothing: 0).
  std::int64_t keep_since = ledger.metaValue("retention_keep_since_ns").value_or(o.now_unix_ns - 38 * kDayNs);
  std::uint64_t pushed = UINT64_MAX;
  for (const char* key : {"retention_pushed_seq", "central_redis_seq", "central_postgres_seq"}) {
    if (const std::optional<std::int64_t> seq = ledger.metaValue(key)) {
      pushed = std::min(pushed, static_cast<std::uint64_t>(std::max<std::int64_t>(0, *seq)));
    }
  }
  r.before_unix_ns = o.before_unix_ns;
  if (keep_since < r.before_unix_ns) {
    r.before_unix_ns = keep_since;
    r.kept_because = "entries from " + isoTime(keep_since) +
                     " on stay: a budget rule's window (this month, the last 7 days) may still need them";
  }

  if (std::filesystem::exists(o.path)) fail(o.path, "exists already (an archive is never overwritten)");
  const std::string tmp = o.path + ".tmp";
  // A half-written file goes when anything fails before it has its name.
  struct RemoveTmp {
    const std::string& path;
    bool keep = false;
    ~RemoveTmp() {
      if (!keep) ::unlink(path.c_str());
    }
  } remove_tmp{tmp};
  std::vector<std::pair<std::uint64_t, std::uint64_t>> pages;   // each page's first and last seq
  {
    std::filesystem::remove(tmp);   // one a killed archive left
    GzFile gz(tmp);
    LedgerFilter f;
    f.until_unix_ns = r.before_unix_ns;
    f.limit = o.page_rows;
    bool done = false;
    while (!done) {
      const std::vector<LedgerEntry> rows = ledger.list(f);
      if (rows.empty()) break;
      std::string chunk;
      std::uint64_t first = 0, last = 0;
      for (const LedgerEntry& e : rows) {
        if (e.seq > pushed) {   // not pushed yet: it and everything after it stay
          r.kept_because += std::string(r.kept_because.empty() ? "" : "; ") + "entries after seq " +
                            std::to_string(pushed) + " stay: the central link has not pushed them";
          done = true;
          break;
        }
        nlohmann::json j = toJson(e);
        j["created_at_unix_ns"] = e.unix_ns;
        j["budget_day"] = e.day;
        j["cost_nano_usd"] = e.cost_nano_usd;
        chunk += j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        chunk += '\n';
        if (first == 0) first = e.seq;
        last = e.seq;
        ++r.written;
      }
      gz.write(chunk);
      if (first != 0) pages.emplace_back(first, last);
      f.after_seq = rows.back().seq;
      if (static_cast<std::int64_t>(rows.size()) < o.page_rows) break;
    }
    gz.close();
  }
  // On disk before anything is removed: the file, its name, the directory entry.
  syncPath(tmp, O_RDONLY);
  // link() fails if the name was taken meanwhile: never over another file.
  if (::link(tmp.c_str(), o.path.c_str()) != 0) fail(o.path, std::string("naming it: ") + std::strerror(errno));
  std::string dir = std::filesystem::path(o.path).parent_path().string();
  syncPath(dir.empty() ? "." : dir, O_RDONLY | O_DIRECTORY);
  r.file_bytes = static_cast<std::int64_t>(std::filesystem::file_size(o.path));
  if (!pages.empty()) {
    r.first_seq = pages.front().first;
    r.last_seq = pages.back().second;
  }
  for (const auto& [first, last] : pages) r.removed += ledger.removeEntries(first, last, r.before_unix_ns);
  return r;
}

}  // namespace tokenfuse
