#pragma once
// ferry::sandbox::child_process — a child process with optional pipes (or an append-only log
// file), in its own process group (or session), that is always reaped. Used for `runsc`, the
// `nats-server` child of ferryd, and by tests to start ferryd itself.
//
// Threading: one owner thread; `signal_group()` and `pid()` may be called from any thread.

#include <chrono>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::sandbox {

/// How a child's standard stream is connected.
enum class stdio {
  inherit,
  null,
  pipe,
  /// `spawn_options::file`, opened for appending (created 0600); for output streams only.
  file,
  /// stdin only: a pipe that already holds `spawn_options::in_bytes` (at most 64 KiB) and whose
  /// write end is closed, so the child reads them and then end of file. Nothing is left for the
  /// parent to write (no SIGPIPE if the child is gone).
  bytes,
};

struct spawn_options {
  std::vector<std::string> argv;                 ///< argv[0] is looked up in PATH if not a path
  std::optional<std::vector<std::string>> env;   ///< "K=V" entries; nullopt inherits ferryd's env
  std::string cwd;                               ///< empty: inherit
  stdio in = stdio::null;
  stdio out = stdio::inherit;
  stdio err = stdio::inherit;
  bool stderr_to_stdout = false;                 ///< stderr shares stdout's target; `err` is ignored
  bool new_process_group = true;                 ///< child leads its own group (kill takes all)
  /// Child leads a new session (and so a new group): no terminal, no signals meant for ours.
  /// For children that must outlive this process (`runsc run --detach`).
  bool new_session = false;
  std::filesystem::path file;                    ///< target of stdio::file
  std::string in_bytes;                          ///< content of stdin with stdio::bytes
};

/// How a child ended.
struct exit_status {
  int exit_code = -1;  ///< valid when signal == 0
  int signal = 0;      ///< signal that killed it, 0 if it exited
  bool ok() const { return signal == 0 && exit_code == 0; }
};

class child_process {
 public:
  /// Starts the child. Errors name the program and errno text.
  static result<child_process> spawn(const spawn_options& opts);

  child_process(child_process&&) noexcept;
  child_process& operator=(child_process&&) noexcept;
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  /// Kills the whole process group with SIGKILL (if still running) and reaps the child.
  ~child_process();

  int pid() const { return pid_; }
  /// Parent ends of the pipes (-1 unless that stream is stdio::pipe). Owned by this object.
  int stdin_fd() const { return in_; }
  int stdout_fd() const { return out_; }
  int stderr_fd() const { return err_; }
  /// Closes the parent's end of stdin (EOF for the child).
  void close_stdin();

  /// Sends `sig` to the child's process group (or to the child alone without a group).
  void signal_group(int sig) const;
  /// Blocks until the child exits and reaps it.
  exit_status wait();
  /// Reaps the child if it has exited; nullopt while it runs.
  std::optional<exit_status> try_wait();
  /// Waits up to `timeout`; nullopt if still running then.
  std::optional<exit_status> wait_for(std::chrono::milliseconds timeout);
  /// SIGTERM to the group, wait up to `grace`, then SIGKILL; reaps.
  exit_status terminate(std::chrono::milliseconds grace);

 private:
  child_process() = default;
  void close_fds();
  void release();  // kill + reap if still running, close fds
  exit_status reap();

  int pid_ = -1;
  bool group_ = false;
  // Written only by the owner thread, under *reap_mu_; other threads read it under *reap_mu_.
  // Holding the lock while signalling guarantees the pid (or group id) is not reused: the child
  // is at worst a zombie until reap() runs.
  std::optional<exit_status> status_;
  std::unique_ptr<std::mutex> reap_mu_;
  int in_ = -1, out_ = -1, err_ = -1;
};

/// Reads everything from `fd` until EOF (retrying EINTR). For small outputs of helper commands.
std::string read_all(int fd);

/// Reads a small file with plain syscalls: /proc files of processes that exit meanwhile fail with
/// ESRCH, which libstdc++'s filebuf turns into an exception. Empty on any error.
std::string read_small_file(const std::filesystem::path& path);

/// Runs a helper command to completion, capturing stdout+stderr. For short commands like
/// `runsc delete`. Kills it (its whole group) after `timeout` and returns an error that says so.
/// A non-zero exit is not an error: check `status`. Whatever the command leaves running in its
/// process group is killed when it exits (helpers must not daemonise).
struct run_result {
  exit_status status;
  std::string output;
};
result<run_result> run_command(const std::vector<std::string>& argv,
                               std::chrono::milliseconds timeout);

}  // namespace ferry::sandbox
