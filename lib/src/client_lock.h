// Client numbers: who is alive, asked of the kernel rather than guessed from a timeout.
//
// Every process that maps the region holds an open-file-description (OFD) write lock on one byte
// of the region's shm object, far beyond its end (locks may lie past EOF, and these bytes are
// never mapped): byte kClientLockBase + i for client number i. The lock is the claim; nothing in
// the region records it, so nothing there can be corrupted to fake it. The kernel drops the lock
// when the last descriptor of that open file description closes, which happens when the process
// exits however it exits (SIGKILL included), in whatever pid namespace it runs; a stopped, frozen
// or swapped-out process keeps it. The agent asks F_OFD_GETLK whether another open file
// description holds client i's byte: no conflicting lock means client i is gone.
//
// Number 0 is never locked: it stands for "the agent, whoever it is now" (reservations the agent
// makes for its HTTP clients), which outlives any one agent process.
#pragma once

#include <cstdint>

namespace tokenfuse::clientlock {

inline constexpr std::int64_t kClientLockBase = std::int64_t{1} << 40;
inline constexpr std::uint32_t kMaxClients = 65536;   // numbers 1 .. kMaxClients - 1
inline constexpr std::uint32_t kAgentClient = 0;

// Claims a free client number through `fd` (an open file description of the region's object),
// probing from a number derived from `seed` so that a number just freed is rarely reused at once.
// Returns the number (>= 1), or 0 if none could be claimed (every number taken, or the kernel
// refused: errno says why). Set-up code: makes system calls.
std::uint32_t claim(int fd, std::uint64_t seed) noexcept;

enum class Held { kYes, kNo, kUnknown };
// Whether an open file description other than `fd`'s holds client `client`'s lock.
Held held(int fd, std::uint32_t client) noexcept;
// Whether an open file description other than `fd`'s holds any client lock: whether any other
// process still maps the region (through the library).
Held anyHeld(int fd) noexcept;

}  // namespace tokenfuse::clientlock
