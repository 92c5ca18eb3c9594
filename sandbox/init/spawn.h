#pragma once
// Starting one command: fork, its own process group (or session, with a pty), stdio on pipes or a
// pseudo-terminal, working directory, environment, exec. A failure before exec is reported with
// the step that failed, so the caller can tell a bad working directory from a missing program.

#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ferry_init {

struct spawn_request {
  std::vector<std::string> argv;  // argv[0] is looked up in the PATH of `env`
  std::vector<std::string> env;   // the complete environment, "K=V"
  std::string cwd;                // empty: ferry-init's own
  bool pty = false;
  uint16_t rows = 24, cols = 80;
  bool null_stdin = true;  // /dev/null (or an empty pipe); otherwise a pipe the caller writes
};

struct spawned {
  pid_t pid = -1;         // also its process group
  int out_fd = -1;        // stdout pipe, or the pty master (then also where stdin goes)
  int err_fd = -1;        // stderr pipe; -1 with a pty
  int in_fd = -1;         // non-blocking write end of stdin (a dup of the master with a pty); -1 for /dev/null
};

enum class spawn_step { setup, cwd, exec };

struct spawn_failure {
  spawn_step step = spawn_step::setup;
  std::string message;  // e.g. "cannot execute `nope`: No such file or directory"
};

/// Starts the command; on success `out` holds its pid and fds (all close-on-exec), otherwise
/// `why` says what failed and no process is left.
bool spawn_command(const spawn_request& req, spawned& out, spawn_failure& why);

/// Signals that ferry-init forwards to the commands and children reset to their default.
inline constexpr int forwarded_signals[] = {SIGTERM, SIGINT, SIGHUP};

}  // namespace ferry_init
