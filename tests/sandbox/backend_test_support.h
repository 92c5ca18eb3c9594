#pragma once
// Helpers shared by the tests that start real sandboxes (runsc_runtime_test, bwrap_runtime_test,
// and process_api_test and recovery_test, which are built once per backend with
// FERRY_TEST_BACKEND "runsc" or "bwrap"): the backend under test and its precondition (root + the
// backend's binary), an observer that records every callback, and finding a sandbox's host
// processes in /proc.

#include <poll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>

#include <boost/test/unit_test.hpp>
#include <fmt/format.h>

#include "ferry/sandbox/sandbox.h"
#include <cstdlib>
#include <stdexcept>

#include "test_support.h"

namespace ferry::sandbox::testing {

namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using namespace std::chrono_literals;


#ifndef FERRY_TEST_BACKEND
#define FERRY_TEST_BACKEND "runsc"
#endif

/// The backend under test: "runsc" or "bwrap" — $FERRY_TEST_BACKEND (how CTest runs one
/// executable per backend, tests/CMakeLists.txt ferry_add_backend_test), else the source's
/// default. Any other value is an error, not a silent default.
inline std::string test_backend() {
  const char* env = std::getenv("FERRY_TEST_BACKEND");
  if (env == nullptr || *env == '\0')
    return FERRY_TEST_BACKEND;
  const std::string b = env;
  if (b != "runsc" && b != "bwrap")
    throw std::invalid_argument("FERRY_TEST_BACKEND must be runsc or bwrap, not \"" + b + "\"");
  return b;
}

/// The file in a sandbox directory with the backend's (and ferry-init's) stdout and stderr.
inline std::string log_name() { return test_backend() + ".log"; }

inline bool installed(const std::string& backend) {
  auto r = run_command({backend, "--version"}, 10s);
  return r.ok() && r->status.ok();
}

/// Precondition of a suite of `backend`: root and its binary.
inline boost::test_tools::assertion_result available(const std::string& backend) {
  boost::test_tools::assertion_result ok(true);
  if (::geteuid() != 0) {
    ok = false;
    ok.message() << "skipped: " << backend << " sandboxes need root";
  } else if (!installed(backend)) {
    ok = false;
    ok.message() << "skipped: " << backend << (backend == "runsc" ? " (gVisor)" : " (bubblewrap)") << " is not installed";
  }
  return ok;
}
inline boost::test_tools::assertion_result runsc_available(boost::unit_test::test_unit_id) { return available("runsc"); }
inline boost::test_tools::assertion_result bwrap_available(boost::unit_test::test_unit_id) { return available("bwrap"); }
inline boost::test_tools::assertion_result backend_available(boost::unit_test::test_unit_id) {
  return available(test_backend());
}

/// A configuration of the backend under test with everything in `dir` (state/, sandboxes/).
inline runtime_config test_config(const fs::path& dir) {
  // bwrap sandboxes run as uids of their own, which must reach their directories.
  fs::permissions(dir, fs::perms::others_exec, fs::perm_options::add);
  runtime_config c;
  c.backend = test_backend() == "bwrap" ? backend_choice::bwrap : backend_choice::runsc;
  c.sandboxes_dir = dir / "sandboxes";
  c.runsc.state_dir = dir / "state";
  c.init_binary = FERRY_INIT_BINARY;
  return c;
}

/// A sandbox id unique to this test process: `<prefix>-<what>-<pid>-<n>`.
inline std::string unique_id(std::string_view prefix, std::string_view what) {
  static std::atomic<int> counter{0};
  return fmt::format("{}-{}-{}-{}", prefix, what, ::getpid(), ++counter);
}

/// A shell command line (in `session`, if given).
inline command_spec shell(uint32_t id, std::string line, std::string session = "") {
  command_spec c;
  c.command_id = id;
  c.shell = std::move(line);
  c.session = std::move(session);
  return c;
}

/// An argument vector.
inline command_spec argv(uint32_t id, std::vector<std::string> args) {
  command_spec c;
  c.command_id = id;
  c.argv = std::move(args);
  return c;
}

inline double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

/// Bytes the host's filesystem holds for sandbox directory `dir`: allocated blocks of its files
/// on `dir`'s own device (its disk image among them), not what is mounted from the disk (that
/// is inside the image). Per sandbox, so other tests writing meanwhile do not count.
inline uint64_t host_bytes_of(const fs::path& dir) {
  struct stat top {};
  if (::stat(dir.c_str(), &top) != 0)
    return 0;
  uint64_t bytes = 0;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0)
      continue;
    if (st.st_dev != top.st_dev) {
      if (S_ISDIR(st.st_mode))
        it.disable_recursion_pending();
      continue;
    }
    if (S_ISREG(st.st_mode))
      bytes += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return bytes;
}

/// Copies an executable (a probe) into a sandbox's workspace through a `cp` child. Copied by this
/// process, the destination would be open for writing here for a moment, and a fork of another
/// thread at that moment (the runtime's disk stock runs mkfs, the pool starts sandboxes) would
/// inherit it — for as long as that child lives, when the descriptor is not close-on-exec, as
/// std::filesystem::copy_file's is not — and executing the copy then fails with ETXTBSY.
inline void copy_executable(const fs::path& from, const fs::path& to) {
  auto r = run_command({"cp", "--", from.string(), to.string()}, std::chrono::seconds(30));
  BOOST_REQUIRE_MESSAGE(r.ok() && r->status.ok(),
                        "cp " << from << " " << to << ": " << (r.ok() ? r->output : r.error().message));
  fs::permissions(to, fs::perms(0755));
}

inline std::string file_content(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

/// Records every callback with its time; lets the test wait for a condition on them.
class recording_observer : public sandbox_observer {
 public:
  struct record {
    /// "running", "started", "output", "gap", "truncated", "exited", "failed", "gone", "limit",
    /// "egress", "ended"
    std::string what;
    steady::time_point at;
    uint32_t command_id = 0;
    int stream = -1;
    std::string data;  // output; started: argv joined by '|'; truncated: the path; failed: the reason
    int exit_code = 0, signal = 0;
    uint64_t duration_ms = 0;
    uint64_t lost_bytes = 0;
    command_exit exit;  // "exited"
    limit_hit hit;      // "limit"
    egress_event egress;  // "egress" (data: "<host> allowed|denied <rule>")
    std::optional<std::string> failure;
  };

  static record make(std::string what) {
    record r;
    r.what = std::move(what);
    r.at = steady::now();
    return r;
  }

  void on_running() override { add(make("running")); }
  void on_command_started(uint32_t id, const std::vector<std::string>& argv) override {
    auto r = make("started");
    r.command_id = id;
    for (const auto& a : argv)
      r.data += a + "|";
    add(r);
  }
  void on_output(uint32_t id, int stream, std::string_view data) override {
    auto r = make("output");
    r.command_id = id;
    r.stream = stream;
    r.data = data;
    add(r);
  }
  void on_output_gap(uint32_t id, int stream, uint64_t lost_bytes) override {
    auto r = make("gap");
    r.command_id = id;
    r.stream = stream;
    r.lost_bytes = lost_bytes;
    add(r);
  }
  void on_output_truncated(uint32_t id, std::string_view path) override {
    auto r = make("truncated");
    r.command_id = id;
    r.data = path;
    add(r);
  }
  void on_command_failed(uint32_t id, std::string_view reason) override {
    auto r = make("failed");
    r.command_id = id;
    r.data = reason;
    add(r);
  }
  void on_processes_gone(steady::time_point at) override {
    auto r = make("gone");
    r.at = at;  // when the runtime confirmed it, not when it told us
    add(r);
  }
  void on_command_ended(const command_exit& e) override {
    auto r = make("exited");
    r.command_id = e.command_id;
    r.exit_code = e.exit_code;
    r.signal = e.signal;
    r.duration_ms = e.duration_ms;
    r.exit = e;
    add(r);
  }
  void on_limit_reached(const limit_hit& hit) override {
    auto r = make("limit");
    r.hit = hit;
    r.data = hit.detail;
    add(r);
  }
  void on_egress(const egress_event& e) override {
    auto r = make("egress");
    r.egress = e;
    r.data = e.host + (e.allowed ? " allowed " : " denied ") + e.rule;
    add(r);
  }
  void on_ended(std::optional<std::string> failure) override {
    auto r = make("ended");
    r.failure = std::move(failure);
    add(r);
  }

  std::vector<record> records() const {
    std::lock_guard lock(mu_);
    return records_;
  }
  std::vector<std::string> sequence() const {
    std::vector<std::string> s;
    for (const auto& r : records()) {
      if (s.empty() || s.back() != r.what || r.what != "output")
        s.push_back(r.what);
    }
    return s;
  }
  std::string output(int stream) const {
    std::string s;
    for (const auto& r : records())
      if (r.what == "output" && r.stream == stream)
        s += r.data;
    return s;
  }
  /// Output of one command's stream.
  std::string output(uint32_t command_id, int stream) const { return output_in(records(), command_id, stream); }
  /// The same from records at hand (in a wait_until predicate, which holds the lock).
  static std::string output_in(const std::vector<record>& rs, uint32_t command_id, int stream) {
    std::string s;
    for (const auto& r : rs)
      if (r.what == "output" && r.command_id == command_id && r.stream == stream)
        s += r.data;
    return s;
  }
  std::optional<record> find(const std::string& what) const {
    for (const auto& r : records())
      if (r.what == what)
        return r;
    return std::nullopt;
  }
  /// The first record `what` of command `command_id`.
  std::optional<record> find(const std::string& what, uint32_t command_id) const {
    for (const auto& r : records())
      if (r.what == what && r.command_id == command_id)
        return r;
    return std::nullopt;
  }
  /// Waits until command `command_id` ended (exited or failed).
  bool wait_for_end(uint32_t command_id, std::chrono::milliseconds timeout) {
    return wait_until(
        [&](const std::vector<record>& rs) {
          return std::any_of(rs.begin(), rs.end(), [&](const record& r) {
            return r.command_id == command_id && (r.what == "exited" || r.what == "failed");
          });
        },
        timeout);
  }
  /// Waits until `pred(records)` holds; false after `timeout`.
  template <class Pred>
  bool wait_until(Pred pred, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return pred(records_); });
  }
  bool wait_for_output(const std::string& needle, std::chrono::milliseconds timeout) {
    return wait_until(
        [&](const std::vector<record>& rs) {
          std::string all;
          for (const auto& r : rs)
            if (r.what == "output")
              all += r.data;
          return all.find(needle) != std::string::npos;
        },
        timeout);
  }
  /// Waits for record `what` of command `command_id` (not just any command's).
  bool wait_for(const std::string& what, uint32_t command_id, std::chrono::milliseconds timeout) {
    return wait_until(
        [&](const std::vector<record>& rs) {
          return std::any_of(rs.begin(), rs.end(),
                             [&](const record& r) { return r.what == what && r.command_id == command_id; });
        },
        timeout);
  }
  bool wait_for(const std::string& what, std::chrono::milliseconds timeout) {
    return wait_until(
        [&](const std::vector<record>& rs) {
          return std::any_of(rs.begin(), rs.end(), [&](const record& r) { return r.what == what; });
        },
        timeout);
  }

 private:
  void add(record r) {
    {
      std::lock_guard lock(mu_);
      records_.push_back(std::move(r));
    }
    cv_.notify_all();
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<record> records_;
};

/// Runs `c` in `sb` and waits for its end; its record ("exited" or "failed").
inline recording_observer::record run_to_end(sandbox& sb, recording_observer& obs, const command_spec& c,
                                             std::chrono::milliseconds timeout = 30s) {
  auto r = sb.run(c);
  BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  BOOST_REQUIRE_MESSAGE(obs.wait_for_end(c.command_id, timeout), "command " << c.command_id << " did not end");
  auto e = obs.find("exited", c.command_id);
  if (!e)
    e = obs.find("failed", c.command_id);
  return *e;
}

/// Live host processes of a sandbox, held by pidfds: every process whose command line names
/// the sandbox directory (Sentry, gofer), and all their descendants (the ptrace stubs, whose
/// command lines are empty).
struct held_processes {
  std::vector<std::pair<pid_t, int>> procs;  // pid, pidfd
  held_processes() = default;
  held_processes(const held_processes&) = delete;
  held_processes& operator=(const held_processes&) = delete;
  held_processes(held_processes&& o) noexcept : procs(std::move(o.procs)) { o.procs.clear(); }
  ~held_processes() {
    for (auto& [pid, fd] : procs)
      ::close(fd);
  }
  /// Pids of those still running (a zombie counts as gone).
  std::vector<pid_t> alive() const {
    std::vector<pid_t> out;
    for (auto& [pid, fd] : procs) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 0) == 0)
        out.push_back(pid);
    }
    return out;
  }
};

inline held_processes sandbox_processes(const fs::path& dir) {
  std::map<pid_t, pid_t> parent;  // pid -> ppid
  std::set<pid_t> roots;
  const std::string needle = dir.string() + "/";
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    std::string stat = read_proc_file(e.path() / "stat");
    auto paren = stat.rfind(')');
    if (paren == std::string::npos || paren + 4 >= stat.size())
      continue;
    parent[pid] = static_cast<pid_t>(std::strtol(stat.c_str() + paren + 4, nullptr, 10));
    if (read_proc_file(e.path() / "cmdline").find(needle) != std::string::npos)
      roots.insert(pid);
  }
  std::set<pid_t> all = roots;
  for (bool grew = true; grew;) {
    grew = false;
    for (auto [pid, ppid] : parent)
      if (all.count(ppid) && all.insert(pid).second)
        grew = true;
  }
  held_processes h;
  for (pid_t pid : all) {
    int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (fd >= 0)
      h.procs.emplace_back(pid, fd);
  }
  return h;
}

/// Host processes whose command line mentions `needle` (zombies have none).
inline std::vector<std::string> processes_mentioning(const std::string& needle) {
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos ||
        name == std::to_string(::getpid()))
      continue;
    std::string cmd = read_proc_file(e.path() / "cmdline");
    if (cmd.find(needle) != std::string::npos) {
      std::replace(cmd.begin(), cmd.end(), '\0', ' ');
      found.push_back(name + ": " + cmd);
    }
  }
  return found;
}

}  // namespace ferry::sandbox::testing
