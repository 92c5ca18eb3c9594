#pragma once
// ferry::test::ferryd_process — a real ferryd for one test: its own data dir (a temp dir unless
// given), `--listen 127.0.0.1:0`, ready when it prints its "listening on" line; stopped with
// SIGTERM and always reaped. ferryd runs in a session of its own, so that whatever it leaves
// behind when it exits (a nats-server, a runsc) can be found, reported and killed.
//
// Its stdout and stderr are drained by a thread for the whole run (a full pipe would stall
// ferryd), kept for failure messages, and echoed to the test's stderr with a "[ferryd]" prefix
// unless FERRY_TEST_QUIET is set. FERRYD_TEST_EXTRA_ARGS (split on spaces) is appended to the
// command line, for hosts that need e.g. a different --runsc.
//
// Threading: owned and called by one thread (the drain thread is internal).

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "ferry/sandbox/process.h"
#include "ferry/test_support/http_client.h"
#include "ferry/test_support/temp_dir.h"

namespace ferry::test {

struct ferryd_options {
  explicit ferryd_options(std::string binary_path, std::filesystem::path data_dir_path = {},
                          std::string known_token = {})
      : binary(std::move(binary_path)),
        data_dir(std::move(data_dir_path)),
        token(std::move(known_token)) {}

  std::string binary;                        ///< path of ferryd (FERRYD_BINARY in tests)
  std::filesystem::path data_dir;            ///< empty: a fresh directory owned by the process
  /// Token to use when this start prints none (a restart of an existing data dir).
  std::string token;
  std::vector<std::string> extra_args;       ///< appended after --listen/--data-dir
  std::chrono::milliseconds ready_timeout = std::chrono::seconds(30);
};

/// How a stop went.
struct ferryd_stop_report {
  sandbox::exit_status status;
  std::chrono::milliseconds elapsed{0};  ///< from SIGTERM to the exit
  bool exited_before_stop = false;       ///< it had already exited (crashed?) when stop began
  bool killed = false;                   ///< it ignored SIGTERM for the grace time: SIGKILLed
  std::vector<std::string> left_behind;  ///< processes of its session/data dir still running
  std::vector<std::string> left_mounts;  ///< mount points left under its data dir
  bool clean() const {
    return status.ok() && !exited_before_stop && !killed && left_behind.empty() &&
           left_mounts.empty();
  }
};

class ferryd_process {
 public:
  /// Starts ferryd and waits for its "listening on" line. Throws std::runtime_error (with the
  /// output so far) if it cannot start, exits, or is not ready within `ready_timeout`.
  explicit ferryd_process(ferryd_options opts);
  /// Stops it like stop() if still running; checks the exit only when no exception is in flight.
  ~ferryd_process();
  ferryd_process(const ferryd_process&) = delete;
  ferryd_process& operator=(const ferryd_process&) = delete;

  const std::string& url() const { return url_; }     ///< "http://127.0.0.1:<port>"
  uint16_t port() const { return port_; }
  /// The admin token it printed, or the options' token if it printed none.
  const std::string& token() const { return token_; }
  /// Whether this start printed an admin token line.
  bool printed_admin_token() const { return printed_token_; }
  const std::filesystem::path& data_dir() const { return data_dir_; }
  int pid() const { return pid_; }
  /// Time from spawn to the "listening on" line.
  std::chrono::milliseconds startup_time() const { return startup_time_; }

  /// True while the process has not exited.
  bool running();
  /// Everything it wrote so far (stdout and stderr interleaved by line), at most the last 256 KiB.
  std::string output() const;

  /// An HTTP client for it.
  http_client http(std::chrono::milliseconds timeout = std::chrono::seconds(15)) const {
    return http_client("127.0.0.1", port_, timeout);
  }

  /// SIGTERM to ferryd alone, wait up to `grace`, else SIGKILL its process group; reaps it,
  /// kills what it left behind, and records Boost.Test checks that it exited 0 on its own and
  /// left nothing running or mounted. Idempotent: later calls return the first report.
  ferryd_stop_report stop(std::chrono::milliseconds grace = std::chrono::seconds(20));

  /// Simulates a crash: SIGKILL to ferryd alone and reap it, leaving whatever it started (its
  /// nats-server, running sandboxes) alive for a restart to clean up. A later stop() does not
  /// count the early exit as a failure but still checks that nothing is left behind by then.
  void crash();

 private:
  ferryd_stop_report stop_impl(std::chrono::milliseconds grace);
  void drain();
  void append_line(bool is_stderr, const std::string& line);
  std::string output_locked() const;

  std::optional<temp_dir> own_dir_;
  std::filesystem::path data_dir_;
  std::optional<sandbox::child_process> child_;
  int pid_ = -1;
  bool own_session_ = false;
  bool quiet_ = false;
  bool crashed_ = false;

  std::string url_;
  uint16_t port_ = 0;
  std::string token_;
  bool printed_token_ = false;
  std::chrono::milliseconds startup_time_{0};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> stdout_lines_;  // GUARDED_BY(mu_)
  std::string log_;                        // GUARDED_BY(mu_), tail of both streams
  bool drained_ = false;                   // GUARDED_BY(mu_): both pipes hit EOF
  int wake_fds_[2] = {-1, -1};             // self-pipe that stops the drain thread
  std::thread drain_thread_;

  std::optional<ferryd_stop_report> stopped_;
};

}  // namespace ferry::test
