// The ledger's file as the agent opened it: which file (device and inode) the path named, so
// that the agent notices when it is deleted, replaced or written over, and a second hard link to
// the same inode (.ledger.db.link), so that a `rm ledger.db` loses nothing: the agent links the
// path back to the inode it still writes.
//
// Thread-safety: problem() and restore() may be called from any thread.
#pragma once

#include <sys/types.h>

#include <string>

namespace tokenfuse {

class LedgerFile {
 public:
  // Creates `path` (mode 0600) if it is missing, or links it back from the second link if a
  // previous run's file was deleted while it was stopped; sets the mode of the file and of its
  // SQLite companions (-wal, -shm, -journal) to 0600; remembers the inode; makes the second link.
  // Throws LedgerError.
  explicit LedgerFile(std::string path);

  // An empty string while the path names the file opened at start and that file starts with the
  // SQLite header; else what is wrong, for a log line and an error message.
  std::string problem() const;
  // Whether problem() is that the path no longer exists.
  bool deleted() const;
  // Links the path back to the opened inode, if it was deleted and the second link still names
  // it. True if it did.
  bool restore() const;

  const std::string& path() const noexcept { return path_; }
  const std::string& linkPath() const noexcept { return link_; }

 private:
  std::string path_;
  std::string link_;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  bool linked_ = false;   // the second link exists
};

}  // namespace tokenfuse
