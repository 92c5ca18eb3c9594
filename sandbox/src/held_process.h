#pragma once
// Private to ferry_sandbox: host processes of a sandbox held by pidfds, so that signalling them
// never hits a reused pid, and waiting for them to be gone (every backend's kill and teardown).
//
// Threading: values; one owner each. The free functions are thread-safe.

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include "unique_fd.h"

namespace ferry::sandbox::detail {

/// A host process held by a pidfd.
struct held_process {
  pid_t pid = 0;
  unique_fd fd;

  /// It has exited (a zombie counts as exited).
  bool exited() const;
  void sigkill() const;
  /// Another pidfd of the same process (to wait on without holding the owner's lock).
  held_process duplicate() const;
};

/// Opens a pidfd for `pid`; nullopt if it is gone (or pid ≤ 0).
std::optional<held_process> hold(pid_t pid);

/// Parent pid from /proc/<pid>/stat; 0 if gone.
pid_t parent_of(pid_t pid);

/// Start time of `pid` (field 22 of /proc/<pid>/stat, clock ticks since boot); 0 if gone.
/// Together with the pid it names one process for good: pids are reused, start times are not.
uint64_t start_time_of(pid_t pid);

/// Adds every live descendant of procs[0] to `procs`, from the children lists of each process's
/// threads. Each is checked to still be a child of its (live) parent after its pidfd was opened,
/// so a pid reused meanwhile is never taken.
void hold_descendants(std::vector<held_process>& procs);

/// SIGKILLs every process and waits until all have exited. False if some survive `timeout`.
bool kill_and_wait(const std::vector<held_process>& procs, std::chrono::milliseconds timeout);

/// Waits until every process has exited by itself. False if some still run after `timeout`.
bool wait_exited(const std::vector<held_process>& procs, std::chrono::milliseconds timeout);

}  // namespace ferry::sandbox::detail
