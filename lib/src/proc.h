// Facts about processes, for telling a live reservation owner from a dead one. Set-up and agent
// code only: these read /proc.
#pragma once

#include <cstdint>

namespace tokenfuse::proc {

// The kernel's start time of `pid` (field 22 of /proc/PID/stat, in clock ticks since boot), or 0
// if there is no such process. Together with the pid it names one process, whatever pids the
// kernel reuses later.
std::uint64_t startTime(int pid) noexcept;

// The inode of this process's pid namespace, or 0 if unknown. Pids are comparable only between
// processes that share it.
std::uint64_t pidNamespace() noexcept;

enum class Liveness { kAlive, kDead, kUnknown };
// Whether the process that wrote (pid, start_time) still runs. start_time 0 means the writer
// had not recorded it: only the pid is compared. kDead only on proof: no such pid, a zombie, or
// a pid now used by a process with another start time.
Liveness liveness(int pid, std::uint64_t start_time) noexcept;

}  // namespace tokenfuse::proc
