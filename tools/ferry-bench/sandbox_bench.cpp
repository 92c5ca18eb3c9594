// ferry-bench sandbox (see sandbox_bench.h and README.md).
//
// Per backend, one runtime (make_runtime, host-tree root, Ferry's own cgroups as ferryd has
// them) in the run's temporary directory, then:
//   rounds  each round starts an idle Ferry sandbox (start() → on_running: spawn-to-ready), runs
//           `true` in it `execs` times (run() → on_command_ended), starts a busy command tree and
//           kills the sandbox (kill() → every host process gone); and, interleaved with it (the
//           order alternates from round to round), a bare runsc container / bare bwrap whose
//           `sh` prints "ready" on a pipe: the spawn-to-ready baseline.
//   pool    a warm pool (sandbox_pool) of `pool_target` idle sandboxes; `acquires` times: wait
//           until one is ready, time acquire() (a ready sandbox in hand), run `true` in it, kill it.
//   memory  `count` idle sandboxes brought up `parallel` at a time; the PSS of their host
//           processes and the drop of MemAvailable while they all run.
// Every sandbox (Ferry's and bare) is owned by an object whose destructor kills it and waits
// until it is gone, so no path out of here leaves one running; at the end of each backend the
// runtime's cleanup_orphans, a scan of /proc for anything naming the run's directory and one of
// the cgroup hierarchies for groups naming the run's sandboxes check that nothing was left.

#include "sandbox_bench.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "bench_support.h"
#include "cgroup_limits.h"    // private to ferry_sandbox: the same cgroup with the same limits
#include "seccomp_filter.h"   // private to ferry_sandbox: the same seccomp program
#include "ferry/sandbox/pool.h"
#include "ferry/sandbox/process.h"
#include "ferry/sandbox/sandbox.h"

namespace ferry::bench {

namespace {

namespace fs = std::filesystem;
namespace sb = ferry::sandbox;
using namespace std::chrono_literals;
using time_point = bench_clock::time_point;

constexpr auto ready_timeout = 60s;    // start → running (100 runsc sandboxes on 2 CPUs take a while)
constexpr auto command_timeout = 30s;  // one command's round trip
constexpr auto gone_timeout = 10s;     // kill → processes gone
constexpr auto settle_time = 2s;       // idle sandboxes running before memory is read
// The bare sandbox's command: its "ready" on stdout marks it ready.
constexpr const char* bare_script = "echo ready; exec sleep 1000";
// The kill figure's command tree: sleepers and busy loops in the background, then "started".
constexpr const char* busy_script =
  "sleep 1000 & sleep 1000 & sleep 1000 & (while :; do :; done) & (while :; do :; done) & "
  "echo started; wait";
constexpr uint32_t busy_command_id = 2;
constexpr uint32_t first_exec_id = 100;

std::atomic<bool> interrupted{false};
void on_interrupt(int) { interrupted = true; }

int64_t ns(bench_clock::duration d) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}

// --- host processes ------------------------------------------------------------------------------

bool is_pid_name(const std::string& s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
}

/// Children of every thread of `pid`.
std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::error_code ec;
  const fs::path tasks = fs::path("/proc") / std::to_string(pid) / "task";
  for (fs::directory_iterator it(tasks, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string text = sb::read_small_file(it->path() / "children");
    const char* p = text.c_str();
    char* next = nullptr;
    for (long v = std::strtol(p, &next, 10); next != p; v = std::strtol(p, &next, 10)) {
      out.push_back(static_cast<pid_t>(v));
      p = next;
    }
  }
  return out;
}

/// Processes whose command line contains `needle` (never this one), and all their descendants:
/// runsc's Sentry and gofer (they name the bundle) with the Sentry's stub processes; bwrap's
/// monitor (its argv[0] names the sandbox directory) with ferry-init and what it runs.
std::vector<pid_t> processes_of(const std::string& needle) {
  std::vector<pid_t> found;
  const pid_t self = ::getpid();
  std::error_code ec;
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!is_pid_name(name))
      continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    if (pid == self)
      continue;
    if (sb::read_small_file(it->path() / "cmdline").find(needle) != std::string::npos)
      found.push_back(pid);
  }
  for (size_t i = 0; i < found.size(); ++i) {
    for (pid_t c : children_of(found[i])) {
      if (std::find(found.begin(), found.end(), c) == found.end())
        found.push_back(c);
    }
  }
  return found;
}

/// Proportional set size of `pid` in KiB (shared pages split among their users); nullopt if it
/// cannot be read.
std::optional<uint64_t> pss_kib(pid_t pid) {
  const std::string text = sb::read_small_file(fs::path("/proc") / std::to_string(pid) / "smaps_rollup");
  const auto at = text.find("\nPss:");
  if (at == std::string::npos)
    return std::nullopt;
  return std::strtoull(text.c_str() + at + 5, nullptr, 10);
}

/// The memory cgroup `pid` is in ("/ferry/…"), from /proc/<pid>/cgroup: the v1 memory
/// controller's line, else the v2 line; nothing if there is none or it is the root group (the
/// whole machine).
std::pair<fs::path, std::string> memory_cgroup_of(pid_t pid) {
  const std::string text = sb::read_small_file(fs::path("/proc") / std::to_string(pid) / "cgroup");
  std::string v2;
  size_t at = 0;
  while (at < text.size()) {
    size_t nl = text.find('\n', at);
    if (nl == std::string::npos)
      nl = text.size();
    const std::string line = text.substr(at, nl - at);
    at = nl + 1;
    const auto c1 = line.find(':'), c2 = c1 == std::string::npos ? c1 : line.find(':', c1 + 1);
    if (c2 == std::string::npos)
      continue;
    const std::string controllers = "," + line.substr(c1 + 1, c2 - c1 - 1) + ",";
    const std::string path = line.substr(c2 + 1);
    if (controllers.find(",memory,") != std::string::npos) {
      if (path.size() <= 1)
        return {};
      return {fs::path("/sys/fs/cgroup/memory") / path.substr(1), "memory.usage_in_bytes"};
    }
    if (line.rfind("0::", 0) == 0)
      v2 = path;
  }
  if (v2.size() > 1)
    return {fs::path("/sys/fs/cgroup") / v2.substr(1), "memory.current"};
  return {};
}

/// The machine's MemAvailable in KiB.
std::optional<uint64_t> mem_available_kib() {
  const std::string text = sb::read_small_file("/proc/meminfo");
  const auto at = text.find("MemAvailable:");
  if (at == std::string::npos)
    return std::nullopt;
  return std::strtoull(text.c_str() + at + 13, nullptr, 10);
}

/// Processes held by pidfds: they can be waited for and killed without ever hitting a reused pid.
class pidfd_set {
 public:
  explicit pidfd_set(const std::vector<pid_t>& pids) {
    for (pid_t p : pids) {
      const int fd = static_cast<int>(::syscall(SYS_pidfd_open, p, 0));
      if (fd >= 0)
        fds_.push_back(fd);
    }
  }
  ~pidfd_set() {
    for (int fd : fds_)
      ::close(fd);
  }
  pidfd_set(const pidfd_set&) = delete;
  pidfd_set& operator=(const pidfd_set&) = delete;

  size_t size() const { return fds_.size(); }
  /// Every process has exited (a pidfd is readable once its process has).
  bool all_exited_now() const {
    for (int fd : fds_) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 0) <= 0)
        return false;
    }
    return true;
  }
  bool wait_all(std::chrono::milliseconds limit) const {
    const auto deadline = bench_clock::now() + limit;
    for (int fd : fds_) {
      for (;;) {
        pollfd p{fd, POLLIN, 0};
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - bench_clock::now());
        if (left.count() <= 0)
          return false;
        const int r = ::poll(&p, 1, static_cast<int>(left.count()));
        if (r > 0)
          break;
      }
    }
    return true;
  }
  void kill_all() const {
    for (int fd : fds_)
      ::syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0);
  }

 private:
  std::vector<int> fds_;
};

// --- Ferry's sandboxes -----------------------------------------------------------------------------

/// Records what one sandbox reports, with the time each thing arrived; waits for it.
class bench_observer final : public sb::sandbox_observer {
 public:
  void on_running() override {
    const auto at = bench_clock::now();
    note([&] { running_at_ = at; });
  }
  void on_command_started(uint32_t, const std::vector<std::string>&) override {}
  void on_output(uint32_t command_id, int, std::string_view data) override {
    note([&] {
      std::string& out = output_[command_id];
      if (out.size() < 4096)
        out.append(data.substr(0, 4096 - out.size()));
    });
  }
  void on_command_ended(const sb::command_exit& e) override {
    const auto at = bench_clock::now();
    std::string error;
    if (e.exit_code != 0 || e.signal != 0)
      error = "exit code " + std::to_string(e.exit_code) + ", signal " + std::to_string(e.signal);
    note([&] { ended_[e.command_id] = {at, std::move(error)}; });
  }
  void on_command_failed(uint32_t command_id, std::string_view reason) override {
    note([&] { ended_[command_id] = {bench_clock::now(), "failed: " + std::string(reason)}; });
  }
  void on_processes_gone(std::chrono::steady_clock::time_point at) override { note([&] { gone_at_ = at; }); }
  void on_ended(std::optional<std::string> failure) override {
    note([&] {
      ended_sandbox_ = true;
      failure_ = std::move(failure);
    });
  }

  /// When on_running came; nullopt on timeout or if the sandbox ended first.
  std::optional<time_point> wait_running(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, limit, [&] { return running_at_ || ended_sandbox_; });
    return running_at_;
  }
  bool running() {
    std::lock_guard lock(mu_);
    return running_at_.has_value();
  }
  bool ended() {
    std::lock_guard lock(mu_);
    return ended_sandbox_;
  }
  /// When command `id` ended, or why it failed / did not end in time.
  struct command_end {
    std::optional<time_point> at;
    std::string error;
  };
  command_end wait_command(uint32_t id, std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, limit, [&] { return ended_.count(id) || ended_sandbox_; });
    auto it = ended_.find(id);
    if (it == ended_.end())
      return {std::nullopt, ended_sandbox_ ? "the sandbox ended: " + failure_.value_or("released")
                                           : "no answer within " + std::to_string(limit.count()) + " ms"};
    if (!it->second.error.empty())
      return {std::nullopt, it->second.error};
    return {it->second.at, ""};
  }
  bool wait_output(uint32_t id, std::string_view needle, std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return output_[id].find(needle) != std::string::npos || ended_sandbox_; }) &&
           !ended_sandbox_;
  }
  std::optional<time_point> wait_gone(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, limit, [&] { return gone_at_ || ended_sandbox_; });
    return gone_at_;
  }
  /// Why the sandbox ended ("" if it has not, "released" if normally).
  std::string end_reason() {
    std::lock_guard lock(mu_);
    return ended_sandbox_ ? failure_.value_or("released") : "";
  }

 private:
  struct ended_command {
    time_point at;
    std::string error;
  };
  template <class F>
  void note(F&& f) {
    {
      std::lock_guard lock(mu_);
      f();
    }
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<time_point> running_at_;
  std::map<uint32_t, std::string> output_;
  std::map<uint32_t, ended_command> ended_;
  std::optional<time_point> gone_at_;
  bool ended_sandbox_ = false;
  std::optional<std::string> failure_;
};

/// A sandbox and its observer. Destruction kills the sandbox and waits for its on_ended (which
/// comes after its processes are gone and its files removed), on every path out.
struct live_sandbox {
  std::string id;
  std::string needle;        // what its host processes' command lines name
  bench_observer observer;   // outlives box (declared first)
  std::unique_ptr<sb::sandbox> box;

  ~live_sandbox() {
    if (box) {
      box->kill();
      box->wait();
    }
  }
};

/// Starts idle sandbox `id`; `t0` is taken right before start().
std::unique_ptr<live_sandbox> start_idle(sb::sandbox_runtime& rt, const fs::path& sandboxes_dir, const std::string& id,
                                         time_point& t0, std::string& error) {
  auto s = std::make_unique<live_sandbox>();
  s->id = id;
  s->needle = (sandboxes_dir / id).string() + "/";
  sb::sandbox_spec spec;
  spec.id = id;
  t0 = bench_clock::now();
  auto box = rt.start(spec, s->observer);
  if (!box) {
    error = "start " + id + ": " + box.error().message;
    return nullptr;
  }
  s->box = std::move(*box);
  return s;
}

// --- bare sandboxes (the baseline) ------------------------------------------------------------------

/// What a bare sandbox is made of, from the same places as Ferry's.
struct bare_settings {
  fs::path dir;          // bare sandboxes' directories go here
  fs::path rootfs;       // the runtime's host-tree root
  std::vector<fs::path> host_binds;
  fs::path init_binary;
  sb::sandbox_limits limits;
  std::string runsc;     // runsc: the binary, and its --root
  fs::path state_dir;
  uint64_t tmp_bytes = 1ull << 30;  // bwrap: /tmp's size, as Ferry's default
  std::string bwrap = "bwrap";      // bwrap: the binary, the uid it runs as, the seccomp program,
  uid_t bwrap_uid = 0;              // the cgroup parent (empty: no cgroups on this host)
  std::string seccomp_program;
  std::string cgroup_parent;
};

/// The host directories Ferry's host-tree root binds (hosted.cpp's prepare_host_tree): /usr and
/// any of the merged-/usr names that is a real directory here.
std::vector<fs::path> host_tree_binds() {
  std::vector<fs::path> binds{"/usr"};
  std::error_code ec;
  for (const char* name : {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}) {
    const fs::path host = fs::path("/") / name;
    if (!fs::is_symlink(host, ec) && fs::is_directory(host, ec))
      binds.push_back(host);
  }
  return binds;
}

/// Reads `fd` until "ready" arrives (true) or `limit` passes / end of file (false).
bool wait_ready(int fd, std::chrono::milliseconds limit) {
  const auto deadline = bench_clock::now() + limit;
  std::string got;
  char buf[256];
  for (;;) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - bench_clock::now());
    if (left.count() <= 0)
      return false;
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    got.append(buf, static_cast<size_t>(n));
    if (got.find("ready") != std::string::npos)
      return true;
  }
}

/// A bare runsc container or bwrap sandbox. Destruction kills every host process of it and
/// removes what it left (runsc: `runsc delete --force`, its cgroup; the directory).
class bare_sandbox {
 public:
  bare_sandbox(const bare_settings& s, bool runsc, std::string id)
      : s_(s), runsc_(runsc), id_(std::move(id)), dir_(s.dir / id_), cgroup_name_("ferry-bench-bare-" + id_) {}
  bare_sandbox(const bare_sandbox&) = delete;
  bare_sandbox& operator=(const bare_sandbox&) = delete;

  ~bare_sandbox() {
    // Everything that names the directory (runsc's Sentry and gofer, bwrap's monitor) and what
    // it started.
    pidfd_set procs(processes_of(dir_.string() + "/"));
    if (runsc_ && launched_)
      (void)sb::run_command({s_.runsc, "--root", s_.state_dir.string(), "delete", "--force", id_}, 10s);
    procs.kill_all();
    if (child_)
      child_->signal_group(SIGKILL);
    if (bwrap_pid_ > 0)
      ::kill(-bwrap_pid_, SIGKILL);  // its session's group
    (void)procs.wait_all(10s);
    child_.reset();  // reaps it
    if (bwrap_pid_ > 0) {
      while (::waitpid(bwrap_pid_, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
    if (ready_fd_ >= 0)
      ::close(ready_fd_);
    if (cgroup_)
      (void)cgroup_->remove();
    if (runsc_) {
      // runsc removes the group it made; this is for a run that broke off before that.
      std::error_code ec;
      for (fs::directory_iterator it("/sys/fs/cgroup", ec), end; !ec && it != end; it.increment(ec)) {
        ::rmdir((it->path() / cgroup_name_).c_str());
      }
      ::rmdir((fs::path("/sys/fs/cgroup") / cgroup_name_).c_str());
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  /// Creates the sandbox's files and starts it, and waits until its "ready" arrives. Timed by
  /// the caller around the whole call (the bundle is part of what a bare runsc needs too).
  bool start(std::string& error) {
    std::error_code ec;
    for (const char* d : {"workspace", "ctl", "bundle"})
      fs::create_directories(dir_ / d, ec);
    if (ec) {
      error = "cannot create " + dir_.string() + ": " + ec.message();
      return false;
    }
    sb::spawn_options o;
    o.out = sb::stdio::pipe;
    o.err = sb::stdio::file;
    o.new_session = true;
    if (runsc_) {
      if (!write_bundle(error))
        return false;
      o.file = dir_ / "runsc.log";
      o.argv = {s_.runsc, "--root", s_.state_dir.string(), "--network=none", "--host-uds=create",
                "run", "--detach", "--bundle", (dir_ / "bundle").string(), id_};
    } else {
      return start_bwrap(error);
    }
    auto child = sb::child_process::spawn(o);
    if (!child) {
      error = child.error().message;
      return false;
    }
    child_.emplace(std::move(*child));
    launched_ = true;
    if (!wait_ready(child_->stdout_fd(), ready_timeout)) {
      error = "bare " + std::string(runsc_ ? "runsc" : "bwrap") + " " + id_ + " did not say ready: " +
              sb::read_small_file(o.file).substr(0, 2000);
      return false;
    }
    return true;
  }

 private:
  /// The bare bwrap as an operator would start an equivalent one by hand: a cgroup with the
  /// same limits, a fork that joins it and drops to an unprivileged uid, bwrap with the same
  /// seccomp program. Its `sh` writes "ready" to a pipe.
  bool start_bwrap(std::string& error) {
    for (const char* d : {"workspace", "ctl"}) {
      if (::chown((dir_ / d).c_str(), s_.bwrap_uid, s_.bwrap_uid) != 0) {
        error = "cannot chown " + (dir_ / d).string() + ": " + std::strerror(errno);
        return false;
      }
    }
    std::vector<int> procs_fds;
    auto close_all = [&] {
      for (int fd : procs_fds)
        ::close(fd);
    };
    if (!s_.cgroup_parent.empty()) {
      auto made = sb::detail::sandbox_cgroup::create(s_.cgroup_parent, cgroup_name_, s_.limits);
      if (!made) {
        error = "bare cgroup: " + made.error().message;
        return false;
      }
      cgroup_ = std::move(*made);
      for (const auto& d : cgroup_->dirs()) {
        procs_fds.push_back(::open((d / "cgroup.procs").c_str(), O_WRONLY | O_CLOEXEC));
        if (procs_fds.back() < 0) {
          error = "cannot open " + (d / "cgroup.procs").string();
          close_all();
          return false;
        }
      }
    }
    int seccomp = ::memfd_create("bare-seccomp", MFD_CLOEXEC);
    int out[2] = {-1, -1};
    int log = ::open((dir_ / "bwrap.log").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (seccomp < 0 || log < 0 || ::pipe2(out, O_CLOEXEC) != 0 ||
        ::pwrite(seccomp, s_.seccomp_program.data(), s_.seccomp_program.size(), 0) !=
            static_cast<ssize_t>(s_.seccomp_program.size())) {
      error = std::string("bare bwrap: cannot set up its descriptors: ") + std::strerror(errno);
      for (int fd : {seccomp, log, out[0], out[1]})
        if (fd >= 0)
          ::close(fd);
      close_all();
      return false;
    }
    std::vector<std::string> argv = bwrap_argv();
    std::vector<char*> cargv;
    for (auto& a : argv)
      cargv.push_back(a.data());
    cargv.push_back(nullptr);
    char* envp[] = {nullptr};
    const uid_t uid = s_.bwrap_uid;
    const pid_t pid = ::fork();
    if (pid == 0) {
      // Only system calls: the bench has other threads.
      ::setsid();
      for (int fd : procs_fds)
        if (::write(fd, "0", 1) != 1)
          ::_exit(125);
      if (::dup2(out[1], 1) < 0 || ::dup2(log, 2) < 0 || ::dup2(seccomp, 3) < 0)
        ::_exit(125);
      ::close_range(4, ~0U, 0);
      if (::setgroups(0, nullptr) != 0 || ::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0)
        ::_exit(125);
      ::execvpe(s_.bwrap.c_str(), cargv.data(), envp);
      ::_exit(127);
    }
    ::close(out[1]);
    ::close(seccomp);
    ::close(log);
    close_all();
    if (pid < 0) {
      ::close(out[0]);
      error = std::string("fork: ") + std::strerror(errno);
      return false;
    }
    bwrap_pid_ = pid;
    ready_fd_ = out[0];
    launched_ = true;
    if (!wait_ready(ready_fd_, ready_timeout)) {
      error = "bare bwrap " + id_ + " did not say ready: " + sb::read_small_file(dir_ / "bwrap.log").substr(0, 2000);
      return false;
    }
    return true;
  }

  bool write_bundle(std::string& error) {
    using nlohmann::json;
    json mounts = json::array();
    mounts.push_back({{"destination", "/proc"}, {"type", "proc"}, {"source", "proc"}});
    mounts.push_back({{"destination", "/tmp"}, {"type", "tmpfs"}, {"source", "tmpfs"},
                      {"options", {"nosuid", "nodev", "mode=1777"}}});
    for (const auto& host : s_.host_binds)
      mounts.push_back({{"destination", host.string()}, {"type", "bind"}, {"source", host.string()},
                        {"options", {"rbind", "ro"}}});
    mounts.push_back({{"destination", "/.ferry/init"}, {"type", "bind"}, {"source", s_.init_binary.string()},
                      {"options", {"bind", "ro"}}});
    mounts.push_back({{"destination", "/.ferry/ctl"}, {"type", "bind"}, {"source", (dir_ / "ctl").string()},
                      {"options", {"rbind", "rw"}}});
    mounts.push_back({{"destination", "/workspace"}, {"type", "bind"}, {"source", (dir_ / "workspace").string()},
                      {"options", {"rbind", "rw"}}});
    json namespaces = json::array();
    for (const char* n : {"pid", "ipc", "uts", "mount", "network"})
      namespaces.push_back({{"type", n}});
    // The same limits as Ferry's sandboxes, in a cgroup runsc makes and removes itself.
    json resources = json::object();
    if (s_.limits.memory_bytes > 0)
      resources["memory"] = {{"limit", s_.limits.memory_bytes}};
    if (s_.limits.pids > 0)
      resources["pids"] = {{"limit", s_.limits.pids}};
    json config = {
      {"ociVersion", "1.0.2"},
      {"process",
       {{"terminal", false},
        {"user", {{"uid", 0}, {"gid", 0}}},
        {"args", {"/bin/sh", "-c", bare_script}},
        {"env", {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/workspace", "TERM=dumb"}},
        {"cwd", "/workspace"},
        {"noNewPrivileges", true}}},
      {"root", {{"path", s_.rootfs.string()}, {"readonly", true}}},
      {"hostname", "sandbox"},
      {"mounts", mounts},
      {"linux", {{"namespaces", namespaces}, {"cgroupsPath", "/" + cgroup_name_}, {"resources", resources}}},
    };
    const std::string text = config.dump(2);
    const fs::path path = dir_ / "bundle" / "config.json";
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f || std::fwrite(text.data(), 1, text.size(), f) != text.size() || std::fclose(f) != 0) {
      error = "cannot write " + path.string();
      return false;
    }
    return true;
  }

  /// Ferry's bwrap flags (bwrap_runtime.cpp) where they shape the cost: the same namespaces,
  /// mounts and seccomp program (descriptor 3); --die-with-parent so the bench never leaves it
  /// behind.
  std::vector<std::string> bwrap_argv() const {
    std::vector<std::string> a{"bwrap", "--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns",
                               "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                               "--unshare-cgroup-try", "--hostname", "sandbox", "--new-session", "--as-pid-1",
                               "--cap-drop", "ALL", "--clearenv", "--die-with-parent",
                               "--ro-bind", s_.rootfs.string(), "/"};
    for (const auto& host : s_.host_binds)
      a.insert(a.end(), {"--ro-bind", host.string(), host.string()});
    a.insert(a.end(), {"--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", std::to_string(s_.tmp_bytes),
                       "--tmpfs", "/tmp", "--bind", (dir_ / "workspace").string(), "/workspace",
                       "--bind", (dir_ / "ctl").string(), "/.ferry/ctl",
                       "--ro-bind", s_.init_binary.string(), "/.ferry/init", "--chdir", "/workspace",
                       "--seccomp", "3",
                       "--setenv", "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "--setenv", "HOME", "/workspace", "--setenv", "TERM", "dumb",
                       // The monitor's command line names the directory (the binds above): that
                       // is how the destructor finds it.
                       "--", "/bin/sh", "-c", bare_script});
    return a;
  }

  const bare_settings& s_;
  const bool runsc_;
  const std::string id_;
  const fs::path dir_;
  const std::string cgroup_name_;
  bool launched_ = false;
  std::optional<sb::child_process> child_;
  std::optional<sb::detail::sandbox_cgroup> cgroup_;  // bare bwrap's
  pid_t bwrap_pid_ = -1;                              // bare bwrap's (its own session)
  int ready_fd_ = -1;
};

// --- results ----------------------------------------------------------------------------------------

struct row {
  enum class goal { none, ratio_at_most, at_most, at_least };
  std::string name;
  std::string unit;  // "ms", "MiB" or "" (a count)
  std::optional<double> ferry;
  std::optional<double> baseline;
  std::string baseline_name;
  goal target = goal::none;
  double target_value = 0;
  std::string note;   // printed instead of a value ("not built yet")
  std::string error;  // why the value is missing

  std::optional<double> ratio() const {
    if (!ferry || !baseline || *baseline == 0)
      return std::nullopt;
    return *ferry / *baseline;
  }
  std::optional<bool> pass() const {
    switch (target) {
      case goal::none: return std::nullopt;
      case goal::ratio_at_most: return ratio() && *ratio() <= target_value;
      case goal::at_most: return ferry && *ferry <= target_value;
      case goal::at_least: return ferry && *ferry >= target_value;
    }
    return std::nullopt;
  }
  std::string target_text() const {
    char buf[64];
    switch (target) {
      case goal::none: return "";
      case goal::ratio_at_most: std::snprintf(buf, sizeof buf, "ratio <= %g", target_value); break;
      case goal::at_most: std::snprintf(buf, sizeof buf, "<= %g%s%s", target_value, unit.empty() ? "" : " ", unit.c_str()); break;
      case goal::at_least: std::snprintf(buf, sizeof buf, ">= %g%s%s", target_value, unit.empty() ? "" : " ", unit.c_str()); break;
    }
    return buf;
  }
};

row make_row(std::string name, std::string unit, std::optional<double> ferry, std::optional<double> baseline = {},
             std::string baseline_name = "") {
  row r;
  r.name = std::move(name);
  r.unit = std::move(unit);
  r.ferry = ferry;
  r.baseline = baseline;
  r.baseline_name = std::move(baseline_name);
  return r;
}

std::string value_text(std::optional<double> v, const std::string& unit) {
  if (!v)
    return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, unit.empty() ? "%.0f" : (unit == "ms" ? "%.2f" : "%.1f"), *v);
  return buf;
}

/// What one backend measured.
struct backend_result {
  std::string name;
  std::string error;  // the backend could not run at all
  std::vector<int64_t> spawn_ns, bare_ns, exec_ns, kill_ns;
  int spawn_failures = 0, bare_failures = 0, exec_failures = 0, kill_failures = 0;
  /// Kills after which some pidfd was still alive when kill() returned (then the figure is the
  /// time the bench saw the last one go).
  int kill_unconfirmed = 0;
  size_t kill_processes = 0;  // host processes held, summed over the kill_attempts
  int kill_attempts = 0;
  // warm pool
  std::vector<int64_t> acquire_ns;        // acquire() → a ready sandbox in hand
  std::vector<int64_t> acquire_exec_ns;   // acquire() + `true` in it → on_command_ended
  int acquire_failures = 0;
  std::string pool_error;
  std::optional<ferry::sandbox::pool_stats> pool_stats;
  std::vector<std::string> errors;
  // memory
  int memory_target = 0, memory_running = 0;
  std::string memory_error;
  uint64_t pss_kib = 0;
  size_t pss_processes = 0, pss_unreadable = 0;
  /// Memory charged to the sandboxes' cgroups (kernel memory and page cache they brought in
  /// included), and sandboxes none of whose processes was in a cgroup of its own.
  uint64_t cgroup_kib = 0;
  size_t cgroup_missing = 0;
  std::optional<uint64_t> available_before_kib, available_after_kib;
  // after the backend's end
  size_t orphans = 0;
  size_t leftover_processes = 0;
  std::vector<fs::path> leftover_cgroups;

  void fail(std::string e) {
    if (errors.size() < 8)
      errors.push_back(e);
    progress(name + ": " + e);
  }
};

/// Removes (rmdir: only empty ones go) every cgroup named `<parent>/…<bench prefix>…` in every
/// hierarchy — what the runtime or runsc left of this run's sandboxes — and returns them.
std::vector<fs::path> remove_leftover_cgroups(const std::string& parent, const std::string& bench_prefix) {
  std::vector<fs::path> found;
  if (parent.empty())
    return found;
  std::error_code ec;
  std::vector<fs::path> parents{fs::path("/sys/fs/cgroup") / parent};
  for (fs::directory_iterator it("/sys/fs/cgroup", ec), end; !ec && it != end; it.increment(ec))
    parents.push_back(it->path() / parent);
  for (const auto& p : parents) {
    std::error_code dir_ec;
    for (fs::directory_iterator it(p, dir_ec), end; !dir_ec && it != end; it.increment(dir_ec)) {
      std::error_code type_ec;
      if (it->is_directory(type_ec) && it->path().filename().string().find(bench_prefix) != std::string::npos)
        found.push_back(it->path());
    }
  }
  for (const auto& d : found)
    ::rmdir(d.c_str());
  return found;
}

/// "blkio: …-m1, …" — the hierarchies and the first few names.
std::string leftover_cgroups_text(const std::vector<fs::path>& groups) {
  std::map<std::string, size_t> per_hierarchy;
  for (const auto& g : groups)
    ++per_hierarchy[g.parent_path().parent_path().filename().string()];
  std::string out;
  for (const auto& [h, n] : per_hierarchy)
    out += (out.empty() ? "" : ", ") + h + " " + std::to_string(n);
  for (size_t i = 0; i < groups.size() && i < 12; ++i)
    out += (i == 0 ? "; e.g. " : " ") + groups[i].filename().string();
  return out;
}

// --- one backend ------------------------------------------------------------------------------------

class backend_run {
 public:
  backend_run(const sandbox_bench_options& o, std::string backend, const fs::path& root)
      : o_(o), root_(root / backend), prefix_("fb" + std::to_string(::getpid()) + "-") {
    r_.name = std::move(backend);
  }

  backend_result run() {
    std::error_code ec;
    fs::create_directories(root_, ec);
    fs::permissions(root_, fs::perms(0755), ec);  // bwrap's uids must reach the sandboxes
    sb::runtime_config cfg;
    cfg.backend = r_.name == "runsc" ? sb::backend_choice::runsc : sb::backend_choice::bwrap;
    cfg.sandboxes_dir = root_ / "sandboxes";
    cfg.init_binary = o_.init_binary;
    cfg.runsc.state_dir = root_ / "state";
    auto rt = sb::make_runtime(cfg);
    if (!rt) {
      r_.error = rt.error().message;
      return r_;
    }
    sandboxes_dir_ = cfg.sandboxes_dir;
    bare_.dir = root_ / "bare";
    bare_.rootfs = root_ / "rootfs-host";  // what make_runtime prepared (runtime_options::rootfs empty)
    bare_.host_binds = host_tree_binds();
    bare_.init_binary = o_.init_binary;
    bare_.limits = cfg.limits;
    bare_.runsc = cfg.runsc.runsc;
    bare_.state_dir = root_ / "bare-state";
    bare_.tmp_bytes = cfg.bwrap.tmp_bytes;
    bare_.bwrap = cfg.bwrap.bwrap.empty() ? "bwrap" : cfg.bwrap.bwrap;
    // Below Ferry's uid range, so never one of its sandboxes' uids.
    bare_.bwrap_uid = cfg.bwrap.uid_base - 1;
    bare_.cgroup_parent = cfg.cgroup_parent;
    if (r_.name == "bwrap") {
      auto program = sb::detail::bwrap_seccomp_program();
      if (!program) {
        r_.error = "seccomp program: " + program.error().message;
        return r_;
      }
      bare_.seccomp_program = std::move(*program);
    }
    fs::create_directories(bare_.dir, ec);
    fs::create_directories(bare_.state_dir, ec);

    rounds(**rt);
    if (!interrupted)
      warm_pool(**rt);
    if (!interrupted)
      memory(**rt);

    if (auto left = (*rt)->cleanup_orphans(); left)
      r_.orphans = *left;
    rt->reset();
    r_.leftover_processes = processes_of(root_.string() + "/").size();
    r_.leftover_cgroups = remove_leftover_cgroups(cfg.cgroup_parent, prefix_);
    if (r_.orphans || r_.leftover_processes || !r_.leftover_cgroups.empty())
      r_.fail("left behind: " + std::to_string(r_.orphans) + " sandbox(es) for cleanup_orphans, " +
              std::to_string(r_.leftover_processes) + " process(es) naming " + root_.string() + ", " +
              std::to_string(r_.leftover_cgroups.size()) + " cgroup(s) (removed now): " +
              leftover_cgroups_text(r_.leftover_cgroups));
    return r_;
  }

 private:
  void rounds(sb::sandbox_runtime& rt) {
    progress(r_.name + ": " + std::to_string(o_.rounds) + " rounds of spawn-to-ready (Ferry and bare, interleaved), " +
             std::to_string(o_.execs) + " × `true`, kill of a busy sandbox");
    for (int i = 0; i < o_.rounds && !interrupted; ++i) {
      std::string line = r_.name + ": round " + std::to_string(i + 1) + "/" + std::to_string(o_.rounds) + ":";
      // Alternate which goes first, so that neither always follows the other's teardown.
      if (i % 2 == 0) {
        ferry_round(rt, i, line);
        bare_round(i, line);
      } else {
        bare_round(i, line);
        ferry_round(rt, i, line);
      }
      progress(line);
    }
  }

  static std::string ms_text(int64_t v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f ms", static_cast<double>(v) / 1e6);
    return buf;
  }

  void bare_round(int i, std::string& line) {
    bare_sandbox bare(bare_, r_.name == "runsc", prefix_ + "bare-" + std::to_string(i));
    std::string error;
    const auto t0 = bench_clock::now();
    if (!bare.start(error)) {
      ++r_.bare_failures;
      r_.fail(error);
      line += " bare FAILED";
      return;
    }
    r_.bare_ns.push_back(ns(bench_clock::now() - t0));
    line += " bare ready " + ms_text(r_.bare_ns.back());
  }  // killed and removed here

  void ferry_round(sb::sandbox_runtime& rt, int i, std::string& line) {
    std::string error;
    time_point t0;
    auto s = start_idle(rt, sandboxes_dir_, prefix_ + "s" + std::to_string(i), t0, error);
    if (!s) {
      ++r_.spawn_failures;
      r_.fail(error);
      line += " ferry FAILED";
      return;
    }
    auto at = s->observer.wait_running(ready_timeout);
    if (!at) {
      ++r_.spawn_failures;
      r_.fail("sandbox " + s->id + " not running: " + s->observer.end_reason());
      line += " ferry FAILED";
      return;
    }
    r_.spawn_ns.push_back(ns(*at - t0));
    line += " ferry ready " + ms_text(r_.spawn_ns.back());

    // The exec round trip.
    std::vector<int64_t> execs;
    for (int j = 0; j < o_.execs; ++j) {
      sb::command_spec c;
      c.command_id = first_exec_id + static_cast<uint32_t>(j);
      c.argv = {"true"};
      const auto e0 = bench_clock::now();
      if (auto r = s->box->run(c); !r) {
        ++r_.exec_failures;
        r_.fail("run true in " + s->id + ": " + r.error().message);
        continue;
      }
      auto end = s->observer.wait_command(c.command_id, command_timeout);
      if (!end.at) {
        ++r_.exec_failures;
        r_.fail("true in " + s->id + ": " + end.error);
        continue;
      }
      execs.push_back(ns(*end.at - e0));
    }
    if (!execs.empty()) {
      std::vector<int64_t> sorted = execs;
      auto sum = summarize(sorted);
      char buf[64];
      std::snprintf(buf, sizeof buf, ", exec p50 %.2f ms", sum.p50_us / 1000);
      line += buf;
      r_.exec_ns.insert(r_.exec_ns.end(), execs.begin(), execs.end());
    }

    // Kill everything: a busy tree runs, its host processes are held, then kill().
    sb::command_spec busy;
    busy.command_id = busy_command_id;
    busy.argv = {"/bin/sh", "-c", busy_script};
    if (auto r = s->box->run(busy); !r || !s->observer.wait_output(busy_command_id, "started", command_timeout)) {
      ++r_.kill_failures;
      std::string why = !r ? r.error().message : s->observer.end_reason();
      if (why.empty())
        why = "no \"started\" within " + std::to_string(command_timeout.count()) + " s";
      r_.fail("busy tree in " + s->id + " did not start: " + why);
      line += ", kill FAILED";
      return;
    }
    std::this_thread::sleep_for(100ms);  // the loops spin, the stubs exist
    pidfd_set procs(processes_of(s->needle));
    r_.kill_processes += procs.size();
    ++r_.kill_attempts;
    const auto k0 = bench_clock::now();
    s->box->kill();
    const bool confirmed = procs.all_exited_now();
    auto gone = s->observer.wait_gone(gone_timeout);
    if (!gone || procs.size() == 0) {
      ++r_.kill_failures;
      r_.fail("kill of " + s->id + ": " + (procs.size() == 0 ? "no host process found" : "no on_processes_gone: " + s->observer.end_reason()));
      line += ", kill FAILED";
      return;
    }
    auto end = *gone;
    if (!confirmed) {
      // on_processes_gone came while a held process still ran: time it to when the bench saw
      // the last one go, and say so.
      ++r_.kill_unconfirmed;
      if (!procs.wait_all(gone_timeout)) {
        ++r_.kill_failures;
        r_.fail("kill of " + s->id + ": a host process outlived on_processes_gone by " +
                std::to_string(gone_timeout.count()) + " s");
        line += ", kill FAILED";
        return;
      }
      end = std::max(end, bench_clock::now());
    }
    r_.kill_ns.push_back(ns(end - k0));
    line += ", kill " + ms_text(r_.kill_ns.back()) + " (" + std::to_string(procs.size()) + " host processes)";
    s->box->wait();
    if (auto why = s->observer.end_reason(); why != "killed")
      r_.fail("sandbox " + s->id + " ended with \"" + why + "\", not \"killed\"");
  }  // s: on_ended has come; destruction only joins

  /// A bench observer that can be handed to acquire (a live_sandbox without the start).
  struct acquired_box {
    std::string id;
    bench_observer observer;  // outlives box (declared first)
    std::unique_ptr<sb::sandbox> box;
    ~acquired_box() {
      if (box) {
        box->kill();
        box->wait();
      }
    }
  };

  void warm_pool(sb::sandbox_runtime& rt) {
    progress(r_.name + ": warm pool of " + std::to_string(o_.pool_target) + ", " + std::to_string(o_.acquires) +
             " acquisitions");
    sb::pool_options po;
    po.id_prefix = prefix_.substr(0, prefix_.size() - 1);  // "fb<pid>": the ids carry the run's prefix
    auto made = sb::make_sandbox_pool(rt, po);
    if (!made) {
      r_.pool_error = made.error().message;
      r_.fail("warm pool: " + r_.pool_error);
      return;
    }
    auto& pool = **made;
    const std::string key = "bench";
    sb::pool_config pc;
    pc.target = static_cast<size_t>(o_.pool_target);
    if (auto c = pool.configure(key, pc); !c) {
      r_.pool_error = c.error().message;
      r_.fail("warm pool: " + r_.pool_error);
      return;
    }
    // Handed-over sandboxes are killed at once (so they cost nothing while the pool refills) and
    // destroyed at the end: their cleanup (runsc delete) runs meanwhile on their reader threads.
    std::vector<std::unique_ptr<acquired_box>> taken;
    for (int i = 0; i < o_.acquires && !interrupted; ++i) {
      if (!pool.wait_ready(key, 1, ready_timeout)) {
        ++r_.acquire_failures;
        r_.fail("warm pool: no sandbox ready within " + std::to_string(ready_timeout.count()) +
                " s: " + pool.stats(key).value_or(sb::pool_stats{}).last_error);
        break;
      }
      auto a = std::make_unique<acquired_box>();
      const auto t0 = bench_clock::now();
      auto got = pool.acquire(key, a->observer);
      const auto t1 = bench_clock::now();
      if (!got) {
        ++r_.acquire_failures;
        r_.fail("warm pool: acquire: " + got.error().message);
        continue;
      }
      r_.acquire_ns.push_back(ns(t1 - t0));
      a->id = got->id;
      a->box = std::move(got->box);
      sb::command_spec c;
      c.command_id = first_exec_id;
      c.argv = {"true"};
      if (auto r = a->box->run(c); !r) {
        r_.fail("warm pool: run true in " + a->id + ": " + r.error().message);
      } else if (auto end = a->observer.wait_command(c.command_id, command_timeout); !end.at) {
        r_.fail("warm pool: true in " + a->id + ": " + end.error);
      } else {
        r_.acquire_exec_ns.push_back(ns(*end.at - t0));
      }
      a->box->kill();
      taken.push_back(std::move(a));
    }
    r_.pool_stats = pool.stats(key);
    if (!r_.acquire_ns.empty()) {
      std::vector<int64_t> sorted = r_.acquire_ns;
      auto sum = summarize(sorted);
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s: warm pool: acquire p50 %.3f ms, p99 %.3f ms over %zu", r_.name.c_str(),
                    sum.p50_us / 1000, sum.p99_us / 1000, r_.acquire_ns.size());
      progress(buf);
    }
    made->reset();  // the pool's idle sandboxes: killed and waited for
    taken.clear();
  }

  void memory(sb::sandbox_runtime& rt) {
    r_.memory_target = o_.count;
    progress(r_.name + ": memory: bringing up " + std::to_string(o_.count) + " idle sandboxes, " +
             std::to_string(o_.parallel) + " at a time");
    std::this_thread::sleep_for(settle_time);  // what the rounds freed, freed
    r_.available_before_kib = mem_available_kib();
    std::vector<std::unique_ptr<live_sandbox>> boxes;  // killed and waited for on every way out
    int next = 0, reported = 0;
    const auto deadline_per_start = ready_timeout;
    std::map<live_sandbox*, time_point> starting;
    while (!interrupted) {
      int running = 0;
      for (auto it = starting.begin(); it != starting.end();) {
        if (it->first->observer.running()) {
          it = starting.erase(it);
        } else if (it->first->observer.ended() || bench_clock::now() - it->second > deadline_per_start) {
          r_.memory_error = "sandbox " + it->first->id + " did not come up: " + it->first->observer.end_reason();
          break;
        } else {
          ++it;
        }
      }
      if (!r_.memory_error.empty())
        break;
      running = static_cast<int>(boxes.size() - starting.size());
      if (running >= reported + 10 || running == o_.count) {
        progress(r_.name + ": memory: " + std::to_string(running) + "/" + std::to_string(o_.count) + " running");
        reported = running;
      }
      if (running == o_.count)
        break;
      while (static_cast<int>(starting.size()) < o_.parallel && next < o_.count) {
        std::string error;
        time_point t0;
        // Fixed width: `…-m1` would be a prefix of `…-m10`, and runsc refuses to delete an id
        // that is the start of another live one ("ambiguous").
        char name[16];
        std::snprintf(name, sizeof name, "m%04d", next++);
        auto s = start_idle(rt, sandboxes_dir_, prefix_ + name, t0, error);
        if (!s) {
          r_.memory_error = error;
          break;
        }
        starting[s.get()] = t0;
        boxes.push_back(std::move(s));
      }
      if (!r_.memory_error.empty())
        break;
      std::this_thread::sleep_for(5ms);
    }
    r_.memory_running = static_cast<int>(boxes.size() - starting.size());
    if (r_.memory_error.empty() && !interrupted) {
      std::this_thread::sleep_for(settle_time);
      r_.available_after_kib = mem_available_kib();
      for (const auto& s : boxes) {
        std::set<fs::path> groups;
        for (pid_t p : processes_of(s->needle)) {
          ++r_.pss_processes;
          if (auto k = pss_kib(p))
            r_.pss_kib += *k;
          else
            ++r_.pss_unreadable;
          // The sandbox's own cgroup (never a root group: that would be the whole machine).
          auto [dir, file] = memory_cgroup_of(p);
          if (!file.empty() && groups.insert(dir).second)
            r_.cgroup_kib += std::strtoull(sb::read_small_file(dir / file).c_str(), nullptr, 10) / 1024;
        }
        if (groups.empty())
          ++r_.cgroup_missing;
      }
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s: memory: %zu host processes, PSS %.1f MiB in all", r_.name.c_str(),
                    r_.pss_processes, static_cast<double>(r_.pss_kib) / 1024);
      progress(buf);
    } else if (!r_.memory_error.empty()) {
      r_.fail("memory: " + r_.memory_error);
    }
    progress(r_.name + ": memory: killing the " + std::to_string(boxes.size()) + " sandboxes");
    for (auto& s : boxes)
      s->box->kill();
    for (auto& s : boxes) {
      s->box->wait();
      if (auto why = s->observer.end_reason(); why != "killed")
        r_.fail("memory: sandbox " + s->id + " ended with \"" + why + "\", not \"killed\"");
    }
    boxes.clear();
    progress(r_.name + ": memory: all ended");
  }

  const sandbox_bench_options& o_;
  const fs::path root_;
  const std::string prefix_;
  fs::path sandboxes_dir_;
  bare_settings bare_;
  backend_result r_;
};

// --- the table --------------------------------------------------------------------------------------

std::vector<row> rows_of(const backend_result& b, const sandbox_bench_options& o) {
  std::vector<row> rows;
  const std::string& n = b.name;
  auto err = [&](row r) {
    if (!b.error.empty())
      r.error = b.error;
    rows.push_back(std::move(r));
  };
  auto ms = [](const std::vector<int64_t>& v, bool p99) -> std::optional<double> {
    if (v.empty())
      return std::nullopt;
    std::vector<int64_t> c = v;
    auto s = summarize(c);
    return (p99 ? s.p99_us : s.p50_us) / 1000;
  };
  const std::string bare_name = n == "runsc" ? "bare `runsc run --detach`, same bundle" : "bare `bwrap`, same namespaces";
  for (bool p99 : {false, true}) {
    row r = make_row(n + " spawn-to-ready " + (p99 ? "p99" : "p50"), "ms", ms(b.spawn_ns, p99), ms(b.bare_ns, p99),
                     bare_name);
    if (!p99) {
      r.target = row::goal::ratio_at_most;
      r.target_value = 1.2;
    }
    if (b.spawn_ns.empty() && b.error.empty())
      r.error = "no sandbox came up";
    err(std::move(r));
  }
  for (bool p99 : {false, true}) {
    row r = make_row(n + " exec round trip `true` " + (p99 ? "p99" : "p50"), "ms", ms(b.exec_ns, p99));
    if (b.exec_ns.empty() && b.error.empty())
      r.error = "no command ended";
    err(std::move(r));
  }
  for (bool p99 : {false, true}) {
    row r = make_row(n + " kill-everything " + (p99 ? "p99" : "p50"), "ms", ms(b.kill_ns, p99));
    if (p99) {
      r.target = row::goal::at_most;
      r.target_value = 20;
    }
    if (b.kill_ns.empty() && b.error.empty())
      r.error = "no kill measured";
    err(std::move(r));
  }
  const std::string count = std::to_string(b.memory_target ? b.memory_target : o.count);
  const bool memory_ok = b.error.empty() && b.memory_error.empty() && b.memory_running > 0 && b.available_after_kib;
  auto mib = [](uint64_t kib) { return static_cast<double>(kib) / 1024; };
  std::optional<double> pss_each, pss_total, cgroup_each, drop_each, drop_total, fit;
  if (memory_ok) {
    pss_total = mib(b.pss_kib);
    pss_each = *pss_total / b.memory_running;
    if (b.cgroup_missing == 0)
      cgroup_each = mib(b.cgroup_kib) / b.memory_running;
    if (b.available_before_kib && b.available_after_kib) {
      const double drop = mib(*b.available_before_kib) - mib(*b.available_after_kib);
      drop_total = drop;
      drop_each = drop / b.memory_running;
      // What one more idle sandbox costs: the largest of the views.
      const double each = std::max({*pss_each, *drop_each, cgroup_each.value_or(0)});
      if (each > 0)
        fit = mib(*b.available_before_kib) / each;
    }
  }
  auto memory_row = [&](std::string name, std::string unit, std::optional<double> v) {
    row r = make_row(n + " " + std::move(name), std::move(unit), v);
    if (!memory_ok && b.error.empty())
      r.error = b.memory_error.empty() ? "not measured" : b.memory_error;
    return r;
  };
  err(memory_row("idle sandbox PSS, each", "MiB", pss_each));
  err(memory_row("idle sandboxes PSS, " + count + " in all", "MiB", pss_total));
  err(memory_row("idle sandbox cgroup-charged memory, each", "MiB", cgroup_each));
  err(memory_row("MemAvailable drop, each", "MiB", drop_each));
  err(memory_row("MemAvailable drop, " + count + " in all", "MiB", drop_total));
  {
    row r = memory_row("idle sandboxes that fit in MemAvailable", "", fit);
    r.target = row::goal::at_least;
    r.target_value = o.count;
    err(std::move(r));
  }
  // The warm pool: acquire() against the cold start it saves (row 1's p50).
  auto pool_row = [&](std::string name, const std::vector<int64_t>& v, bool p99) {
    row r = make_row(n + " " + std::move(name) + (p99 ? " p99" : " p50"), "ms", ms(v, p99), ms(b.spawn_ns, p99),
                     "cold start() → on_running (row 1)");
    if (v.empty() && b.error.empty())
      r.error = b.pool_error.empty() ? "no sandbox acquired" : b.pool_error;
    return r;
  };
  for (bool p99 : {false, true}) {
    row r = pool_row("warm-pool acquisition", b.acquire_ns, p99);
    if (!p99) {
      r.target = row::goal::at_most;
      r.target_value = 10;
    }
    err(std::move(r));
  }
  err(pool_row("warm-pool acquire + first `true`", b.acquire_exec_ns, false));
  return rows;
}

void print_table(const std::vector<backend_result>& results, const std::vector<row>& rows,
                 const sandbox_bench_options& o) {
  const auto total = [] {
    const std::string text = sb::read_small_file("/proc/meminfo");
    const auto at = text.find("MemTotal:");
    return at == std::string::npos ? 0.0 : std::strtod(text.c_str() + at + 9, nullptr) / (1024 * 1024);
  }();
  std::printf("ferry-bench sandbox: %d rounds (%d × `true` each), %d idle sandboxes (%d starting at once), "
              "warm pool of %d with %d acquisitions; host-tree root; %u CPUs, MemTotal %.1f GiB; load %s\n\n",
              o.rounds, o.execs, o.count, o.parallel, o.pool_target, o.acquires, std::thread::hardware_concurrency(),
              total, sb::read_small_file("/proc/loadavg").substr(0, 14).c_str());
  std::printf("%-52s %10s %10s %6s  %-14s %-6s  %s\n", "figure", "ferry", "baseline", "ratio", "target", "result",
              "baseline is");
  for (const auto& r : rows) {
    const std::string name = r.name + (r.unit.empty() ? "" : " (" + r.unit + ")");
    std::string value = !r.note.empty() ? r.note : !r.error.empty() ? "ERROR" : value_text(r.ferry, r.unit);
    auto pass = r.note.empty() ? r.pass() : std::nullopt;
    const auto ratio = r.ratio();
    char ratio_text[32] = "-";
    if (ratio)
      std::snprintf(ratio_text, sizeof ratio_text, "%.2f", *ratio);
    std::printf("%-52s %10s %10s %6s  %-14s %-6s  %s\n", name.c_str(), value.c_str(),
                value_text(r.baseline, r.unit).c_str(), ratio_text, r.target_text().c_str(),
                pass ? (*pass ? "PASS" : "FAIL") : "", r.baseline_name.c_str());
  }
  std::printf("\n");
  for (const auto& b : results) {
    if (!b.error.empty()) {
      std::printf("%s: could not run: %s\n", b.name.c_str(), b.error.c_str());
      continue;
    }
    auto n_max = [](const std::vector<int64_t>& v) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "n=%zu max %.2f ms", v.size(),
                    v.empty() ? 0.0 : static_cast<double>(*std::max_element(v.begin(), v.end())) / 1e6);
      return std::string(buf);
    };
    std::printf("%s: spawn %s (%d failed), bare %s (%d failed); exec %s (%d failed); kill %s (%d failed, "
                "%d not confirmed by pidfds when kill() returned, %.1f host processes held per kill)\n",
                b.name.c_str(), n_max(b.spawn_ns).c_str(), b.spawn_failures, n_max(b.bare_ns).c_str(),
                b.bare_failures, n_max(b.exec_ns).c_str(), b.exec_failures, n_max(b.kill_ns).c_str(),
                b.kill_failures, b.kill_unconfirmed,
                b.kill_attempts ? static_cast<double>(b.kill_processes) / b.kill_attempts : 0.0);
    std::printf("%s: memory: %d/%d idle sandboxes ran at once, %zu host processes (%zu unreadable), %zu sandboxes "
                "without a cgroup of their own, MemAvailable %s → %s MiB; left behind: %zu orphan(s), %zu "
                "process(es)\n",
                b.name.c_str(), b.memory_running, b.memory_target, b.pss_processes, b.pss_unreadable,
                b.cgroup_missing,
                value_text(b.available_before_kib ? std::optional<double>(*b.available_before_kib / 1024.0) : std::nullopt, "MiB").c_str(),
                value_text(b.available_after_kib ? std::optional<double>(*b.available_after_kib / 1024.0) : std::nullopt, "MiB").c_str(),
                b.orphans, b.leftover_processes);
    if (b.pool_stats) {
      const auto& ps = *b.pool_stats;
      std::printf("%s: warm pool: target %zu, acquire %s (%d failed), acquire + `true` %s; %llu starts, %llu start "
                  "failures, %llu died idle, %llu misses%s%s\n",
                  b.name.c_str(), ps.target, n_max(b.acquire_ns).c_str(), b.acquire_failures,
                  n_max(b.acquire_exec_ns).c_str(), static_cast<unsigned long long>(ps.starts),
                  static_cast<unsigned long long>(ps.start_failures), static_cast<unsigned long long>(ps.died_idle),
                  static_cast<unsigned long long>(ps.misses), ps.last_error.empty() ? "" : "; last error: ",
                  ps.last_error.c_str());
    }
    for (const auto& e : b.errors)
      std::printf("%s: error: %s\n", b.name.c_str(), e.c_str());
  }
}

}  // namespace

int run_sandbox_bench(const sandbox_bench_options& o) {
  if (::geteuid() != 0) {
    std::fprintf(stderr, "ferry-bench sandbox: needs root (runsc and bwrap sandboxes, cgroups)\n");
    return 2;
  }
  std::error_code ec;
  if (!fs::is_regular_file(o.init_binary, ec)) {
    std::fprintf(stderr, "ferry-bench sandbox: no ferry-init at %s (build the ferry-init target, or --init-binary)\n",
                 o.init_binary.c_str());
    return 2;
  }
  std::vector<std::string> backends;
  if (o.backend == "both")
    backends = {"runsc", "bwrap"};
  else
    backends = {o.backend};
  temp_dir tmp(o.dir, "ferry-bench-sandbox-");
  if (!tmp.ok()) {
    std::fprintf(stderr, "ferry-bench sandbox: no temporary directory under %s\n", o.dir.c_str());
    return 2;
  }
  // bwrap runs each sandbox as a uid of its own, which must reach the sandbox directories.
  fs::permissions(tmp.path(), fs::perms(0755), ec);
  progress("sandbox: working in " + tmp.path().string());

  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);

  std::vector<backend_result> results;
  for (const auto& b : backends) {
    if (interrupted)
      break;
    results.push_back(backend_run(o, b, tmp.path()).run());
  }
  std::vector<row> rows;
  for (const auto& b : results) {
    auto r = rows_of(b, o);
    rows.insert(rows.end(), r.begin(), r.end());
  }
  print_table(results, rows, o);

  bool all_ran = !interrupted;
  bool all_pass = true;
  for (const auto& b : results) {
    if (!b.error.empty() || !b.errors.empty())
      all_ran = false;
  }
  for (const auto& r : rows) {
    if (!r.error.empty())
      all_ran = false;
    if (auto p = r.pass(); p && !*p)
      all_pass = false;
  }
  if (interrupted)
    std::printf("interrupted: the figures cover the rounds done so far\n");
  return !all_ran || (o.check && !all_pass) ? 1 : 0;
}

}  // namespace ferry::bench
