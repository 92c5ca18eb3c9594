#pragma once
// Helpers to look at host processes (/proc), to run a short helper program to completion, and
// to wait for a condition with a bound.
//
// Threading: free functions, safe from any thread.

#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/sandbox/process.h"

namespace ferry::test {

/// One live process as /proc showed it at the time of the scan.
struct process_info {
  int pid = 0;
  int ppid = 0;
  int session = 0;
  char state = '?';     ///< R, S, D, Z, ... from /proc/<pid>/stat
  std::string cmdline;  ///< arguments joined by spaces; empty for zombies and kernel threads
};

/// Every process except this one. Processes that vanish during the scan are skipped.
std::vector<process_info> list_processes();

/// Live (non-zombie) processes other than this one whose command line contains `needle`.
std::vector<process_info> processes_with_cmdline_containing(std::string_view needle);

/// Live (non-zombie) processes of session `sid`, other than this one.
std::vector<process_info> processes_in_session(int sid);

/// "pid 12 (S): runsc ...; pid 13 ..." for failure messages; "none" when empty.
std::string describe(const std::vector<process_info>& processes);

/// What a helper program did.
struct program_run {
  sandbox::exit_status status;
  std::string out;
  std::string err;
  bool timed_out = false;  ///< it was killed (whole group) when `timeout` expired
  std::string spawn_error;  ///< set when it could not be started at all
  /// "exit 0" / "signal 9" / "timed out" / "cannot start: ..." plus stderr, for messages.
  std::string summary() const;
};

/// Runs `argv` with stdin from /dev/null, capturing stdout and stderr separately, and reaps it.
/// Kills its process group if it outlives `timeout`.
program_run run_program(const std::vector<std::string>& argv, std::chrono::milliseconds timeout);

/// Calls `condition` every `interval` until it returns true or `timeout` has passed; returns
/// whether it did. Always calls it at least once, and once more at the deadline.
bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds timeout,
                std::chrono::milliseconds interval = std::chrono::milliseconds(20));

/// Milliseconds since `start`, as a double with sub-millisecond precision, for messages.
double ms_since(std::chrono::steady_clock::time_point start);

}  // namespace ferry::test
