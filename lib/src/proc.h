// Facts about processes, recorded in the region for people reading it (liveness itself comes from
// the client locks, client_lock.h). Set-up code only: these read /proc.
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

}  // namespace tokenfuse::proc
