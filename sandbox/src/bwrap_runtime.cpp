// The bubblewrap backend of sandbox_runtime (see ferry/sandbox/sandbox.h and ../README.md); the
// sandbox object and the runtime it shares with the other backends are in hosted.cpp.
//
// One sandbox = one `bwrap` run as a host uid of its own (uid_base + n, uid 0 inside its user
// namespace, no capabilities), with new user, pid, mount, network, ipc, uts (and cgroup)
// namespaces, the seccomp filter of seccomp_filter.cpp, and ferry-init as PID 1 (--as-pid-1).
// bwrap is started through a double fork in a session of its own, so neither it nor the sandbox
// is a child of this process: both survive it, and a later host re-attaches through the control
// socket like with runsc. Processes: bwrap's monitor (outside, waits for its child) and
// ferry-init (inside; the kernel kills every process of the PID namespace when it dies). Their
// pids and start times are recorded in `<id>/pids`; killing SIGKILLs both by pidfd and then
// anything still running under the sandbox's uid, which nothing else on the host uses.
//
// Host paths reach bwrap as file descriptors (--ro-bind-fd/--bind-fd), opened by this (root)
// process (bwrap still mounts them by name: they must be reachable by any uid). ferry-init's
// stdin is a pipe holding the sandbox's handshake key, filled and closed by the host.
//
// Besides the shared files, a sandbox has `uid` (its host uid), `cgroups` (its cgroup
// directories, one a line), `args` (the environment and ferry-init's command line as bwrap
// arguments, NUL-separated), `pids` and `bwrap.log` (bwrap's and ferry-init's stdout/stderr).

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/sandbox.h"
#include "host_paths.h"
#include "hosted.h"
#include "seccomp_filter.h"

namespace ferry::sandbox {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;
using namespace detail;

constexpr auto info_timeout = 10s;       // from exec to bwrap saying its child's pid
constexpr auto straggler_timeout = 2s;   // for processes to vanish after SIGKILL
constexpr std::string_view uid_file = "uid";
constexpr std::string_view cgroups_file = "cgroups";
constexpr std::string_view pids_file = "pids";
constexpr std::string_view args_file = "args";

// Where the launcher puts bwrap's descriptors (before it closes every other one).
constexpr int fd_seccomp = 3, fd_info = 4, fd_root = 5, fd_workspace = 6, fd_ctl = 7, fd_init = 8;
constexpr int fd_report = 10;  // the launcher's errno if exec fails (close-on-exec)
// The parent's descriptors are moved this high first, so that placing them never clobbers one.
constexpr int fd_high = 32;

struct bwrap_context {
  common_settings common;
  std::string bwrap;            // resolved path of the binary
  std::string seccomp_program;  // BPF, what --seccomp reads
  uint32_t uid_base = 0, uid_count = 0;
  uint64_t tmp_bytes = 0;
  std::mutex uid_mu;            // serialises uid allocation
};

/// `uid` is in use by a process on the host (/proc/<pid> belongs to its effective uid; for a
/// non-dumpable process in a user namespace, to that namespace's root: the sandbox's uid too).
bool uid_running(uid_t uid) {
  std::error_code ec;
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    struct stat st {};
    if (::stat(it->path().c_str(), &st) == 0 && st.st_uid == uid)
      return true;
  }
  return false;
}

/// The live processes whose real uid is `uid` (zombies are gone already), held.
std::vector<held_process> hold_uid_processes(uid_t uid) {
  std::vector<held_process> found;
  std::error_code ec;
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    auto running_as = [&] {
      const std::string status = read_small_file(it->path() / "status");
      const auto state = status.find("\nState:\t");
      if (state == std::string::npos || status.compare(state + 8, 1, "Z") == 0 || status.compare(state + 8, 1, "X") == 0)
        return false;
      const auto line = status.find("\nUid:\t");
      return line != std::string::npos && std::strtoul(status.c_str() + line + 6, nullptr, 10) == uid;
    };
    if (!running_as())
      continue;
    // Checked again after the pidfd is open: then it is this process, not a reused pid.
    auto held = hold(pid);
    if (held && running_as() && !held->exited())
      found.push_back(std::move(*held));
  }
  return found;
}

/// Holds `pid` if it is the process recorded with `start_time` and still alive.
std::optional<held_process> hold_recorded(pid_t pid, uint64_t start_time) {
  auto p = hold(pid);
  if (!p || start_time == 0 || start_time_of(pid) != start_time || p->exited())
    return std::nullopt;
  return p;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at < text.size()) {
    auto nl = text.find('\n', at);
    if (nl == std::string::npos)
      nl = text.size();
    if (nl > at)
      out.push_back(text.substr(at, nl - at));
    at = nl + 1;
  }
  return out;
}

/// A pipe whose both ends are close-on-exec.
result<std::pair<unique_fd, unique_fd>> make_pipe() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0)
    return fail(fmt::format("pipe: {}", std::strerror(errno)));
  return std::pair{unique_fd(p[0]), unique_fd(p[1])};
}

/// `fd` moved to a number ≥ fd_high (close-on-exec).
unique_fd high(unique_fd fd) {
  if (!fd)
    return fd;
  return unique_fd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, fd_high));
}

/// Reads what bwrap writes to --info-fd ({"child-pid": N, ...}) until EOF; 0 if there is no pid.
pid_t read_child_pid(int fd, std::chrono::milliseconds timeout) {
  const auto deadline = steady::now() + timeout;
  std::string text;
  char buf[512];
  for (;;) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    if (left <= 0ms)
      break;
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    text.append(buf, static_cast<size_t>(n));
    if (text.find('}') != std::string::npos)
      break;
  }
  const auto key = text.find("\"child-pid\"");
  if (key == std::string::npos)
    return 0;
  const auto colon = text.find(':', key);
  return colon == std::string::npos ? 0 : static_cast<pid_t>(std::strtol(text.c_str() + colon + 1, nullptr, 10));
}

// ---------------------------------------------------------------------------------------------

class bwrap_driver final : public sandbox_driver {
 public:
  bwrap_driver(std::shared_ptr<bwrap_context> ctx, std::string id)
      : ctx_(std::move(ctx)), id_(std::move(id)), dir_(ctx_->common.sandboxes_dir / id_) {
    const std::string recorded = read_small_file(dir_ / std::string(uid_file));
    if (!recorded.empty())
      uid_ = static_cast<uid_t>(std::strtoul(recorded.c_str(), nullptr, 10));
  }

  launched launch(const wire::handshake_key& key) override {
    launched l;
    if (!uid_) {
      l.status = fail(fmt::format("{} is missing", (dir_ / std::string(uid_file)).string()));
      return l;
    }
    auto started = start_bwrap(key, l);
    if (!started)
      l.status = started.error();
    return l;
  }

  /// ferry-init (first) and bwrap's monitor as recorded in `pids`; empty unless ferry-init lives.
  std::vector<held_process> find() override {
    std::vector<held_process> procs;
    const std::string text = read_small_file(dir_ / std::string(pids_file));
    unsigned long long init_pid = 0, init_start = 0, monitor_pid = 0, monitor_start = 0;
    if (std::sscanf(text.c_str(), "%llu %llu %llu %llu", &init_pid, &init_start, &monitor_pid, &monitor_start) != 4)
      return procs;
    auto init = hold_recorded(static_cast<pid_t>(init_pid), init_start);
    if (!init)
      return procs;
    procs.push_back(std::move(*init));
    if (auto monitor = hold_recorded(static_cast<pid_t>(monitor_pid), monitor_start))
      procs.push_back(std::move(*monitor));
    return procs;
  }

  /// Nothing: the sandbox's processes all live in ferry-init's PID namespace, gone with it.
  void hold_more(std::vector<held_process>&) override {}

  bool kill(std::vector<held_process>& procs) override {
    // ferry-init first: its death takes every process of its namespace along.
    for (const auto& p : procs)
      p.sigkill();
    const auto deadline = steady::now() + straggler_timeout;
    for (;;) {
      // Anything else under the sandbox's uid: a monitor nobody recorded (a host that died
      // between starting bwrap and writing `pids`), or a process that outlived ferry-init.
      std::vector<held_process> rest;
      if (uid_)
        rest = hold_uid_processes(*uid_);
      for (const auto& p : rest)
        p.sigkill();
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
      if (rest.empty() && kill_and_wait(procs, std::max(left, 0ms)))
        return true;
      if (steady::now() > deadline)
        return false;
      kill_and_wait(rest, std::max(left, 0ms));
    }
  }

  /// Nothing of bwrap's own is left once its processes are gone (the cgroup is hosted.cpp's).
  result<void> cleanup() override { return {}; }

  std::string_view log_name() const override { return "bwrap.log"; }

 private:
  /// bwrap's command line; the descriptors are the launcher's fd_* numbers.
  std::vector<std::string> bwrap_argv() const {
    const common_settings& s = ctx_->common;
    // argv[0] names the sandbox directory, so that ps (and the tests) can tell whose bwrap it is.
    std::vector<std::string> a{fmt::format("bwrap {}/", dir_.string()),
                               // uid 0 inside a user namespace of its own, mapped to the sandbox's
                               // uid; no capabilities, none to gain, no nested user namespaces.
                               "--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns",
                               "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                               "--unshare-cgroup-try", "--hostname", "sandbox",
                               // No --die-with-parent: the sandbox outlives ferryd.
                               "--new-session", "--as-pid-1", "--cap-drop", "ALL",
                               "--clearenv"};
    // The image read-only, or the sandbox's writable layer over it (storage.h).
    a.insert(a.end(), {s.storage->writable_root() ? "--bind-fd" : "--ro-bind-fd", std::to_string(fd_root), "/"});
    for (const auto& host : s.host_binds)
      a.insert(a.end(), {"--ro-bind", host.string(), host.string()});
    a.insert(a.end(), {"--proc", "/proc", "--dev", "/dev",
                       "--perms", "1777", "--size", std::to_string(ctx_->tmp_bytes), "--tmpfs", "/tmp",
                       "--bind-fd", std::to_string(fd_workspace), "/workspace",
                       "--bind-fd", std::to_string(fd_ctl), std::string(ctl_mount),
                       "--ro-bind-fd", std::to_string(fd_init), std::string(init_path)});
    a.insert(a.end(), {"--chdir", "/workspace", "--seccomp", std::to_string(fd_seccomp), "--info-fd",
                       std::to_string(fd_info)});
    return a;  // `args` follows: the environment, "--" and ferry-init's command line
  }

  /// Forks the launcher (which forks bwrap in a new session and exits), holds bwrap's monitor
  /// and then ferry-init, and records both. Fills l.procs as it goes. ferry-init's stdin is a
  /// pipe that holds the key and whose write end is closed before the fork: no process but the
  /// launcher, bwrap (outside the sandbox) and ferry-init ever has it, and ferry-init reads it
  /// to the end and puts /dev/null in its place before any command runs.
  result<void> start_bwrap(const wire::handshake_key& key, launched& l) {
    const common_settings& s = ctx_->common;
    std::vector<std::string> argv = bwrap_argv();
    // The environment and ferry-init's command line, written by prepare().
    const std::string tail = read_small_file(dir_ / std::string(args_file));
    for (size_t at = 0; at < tail.size();) {
      const auto nul = std::min(tail.find('\0', at), tail.size());
      argv.push_back(tail.substr(at, nul - at));
      at = nul + 1;
    }
    std::vector<char*> cargv;
    for (auto& a : argv)
      cargv.push_back(a.data());
    cargv.push_back(nullptr);
    char* envp[] = {nullptr};

    // Everything the launcher needs, opened before the fork (it only makes system calls).
    auto open_path = [](const fs::path& p, int flags) { return high(unique_fd(::open(p.c_str(), flags | O_PATH | O_CLOEXEC))); };
    unique_fd root = open_path(s.storage->writable_root() ? dir_ / "root" : s.rootfs, O_DIRECTORY);
    unique_fd workspace = open_path(dir_ / "workspace", O_DIRECTORY);
    unique_fd ctl = open_path(dir_ / "ctl", O_DIRECTORY);
    unique_fd init = open_path(s.init_binary, 0);
    if (!root || !workspace || !ctl || !init)
      return fail(fmt::format("cannot open the sandbox's paths: {}", std::strerror(errno)));
    unique_fd log = high(unique_fd(
        ::open(log_path(dir_, log_name()).c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600)));
    unique_fd seccomp = high(unique_fd(::memfd_create("ferry-seccomp", MFD_CLOEXEC)));
    if (!log || !seccomp)
      return fail(fmt::format("cannot open {} or a memfd: {}", log_name(), std::strerror(errno)));
    if (::pwrite(seccomp.get(), ctx_->seccomp_program.data(), ctx_->seccomp_program.size(), 0) !=
        static_cast<ssize_t>(ctx_->seccomp_program.size()))
      return fail(fmt::format("cannot write the seccomp filter: {}", std::strerror(errno)));
    std::vector<unique_fd> cgroup_procs;
    for (const auto& line : lines_of(read_small_file(dir_ / std::string(cgroups_file)))) {
      cgroup_procs.push_back(high(unique_fd(::open((fs::path(line) / "cgroup.procs").c_str(), O_WRONLY | O_CLOEXEC))));
      if (!cgroup_procs.back())
        return fail(fmt::format("cannot open {}/cgroup.procs: {}", line, std::strerror(errno)));
    }
    auto stdin_pipe = make_pipe(), info = make_pipe(), go = make_pipe(), report = make_pipe();
    for (auto* p : {&stdin_pipe, &info, &go, &report}) {
      if (!*p)
        return p->error();
      (*p)->first = high(std::move((*p)->first));
      (*p)->second = high(std::move((*p)->second));
    }
    // 64 hex digits: the pipe's buffer takes them at once.
    const std::string key_hex = wire::key_to_hex(key);
    if (::write(stdin_pipe->second.get(), key_hex.data(), key_hex.size()) != static_cast<ssize_t>(key_hex.size()))
      return fail(fmt::format("cannot write the key to ferry-init's stdin: {}", std::strerror(errno)));
    stdin_pipe->second.reset();
    const int stdin_read = stdin_pipe->first.get(), info_write = info->second.get(), go_read = go->first.get(),
              report_write = report->second.get();
    const uid_t uid = *uid_;
    rlimit nproc{ctx_->common.limits.pids, ctx_->common.limits.pids};
    rlimit as{ctx_->common.limits.memory_bytes, ctx_->common.limits.memory_bytes};
    const bool rlimits = ctx_->common.cgroup_parent.empty();
    std::vector<int> cgroup_fds;
    for (const auto& fd : cgroup_procs)
      cgroup_fds.push_back(fd.get());
    const std::pair<int, int> placed[] = {{stdin_read, 0},         {log.get(), 1},        {log.get(), 2},
                                          {seccomp.get(), fd_seccomp}, {info_write, fd_info}, {root.get(), fd_root},
                                          {workspace.get(), fd_workspace}, {ctl.get(), fd_ctl}, {init.get(), fd_init}};

    const pid_t launcher = ::fork();
    if (launcher < 0)
      return fail(fmt::format("fork: {}", std::strerror(errno)));
    if (launcher == 0) {
      // The launcher: only system calls from here on (this process has one thread of many).
      ::setsid();
      const pid_t child = ::fork();
      if (child != 0) {
        (void)!::write(report_write, &child, sizeof child);
        ::_exit(child > 0 ? 0 : 1);
      }
      // bwrap-to-be: wait until the host holds us by pidfd (so it can never hold a reused pid).
      char go_byte = 0;
      if (::read(go_read, &go_byte, 1) != 1)
        ::_exit(126);
      int err = 0;
      for (int fd : cgroup_fds) {
        if (::write(fd, "0", 1) != 1 && !err)
          err = errno;
      }
      if (rlimits) {
        if (nproc.rlim_cur > 0)
          ::setrlimit(RLIMIT_NPROC, &nproc);
        if (as.rlim_cur > 0)
          ::setrlimit(RLIMIT_AS, &as);
      }
      for (const auto& [from, to] : placed) {
        if (from >= 0 && ::dup2(from, to) < 0 && !err)
          err = errno;
      }
      if (::dup3(report_write, fd_report, O_CLOEXEC) < 0 && !err)
        err = errno;
      ::close_range(fd_report + 1, ~0U, 0);
      if (!err && (::setgroups(0, nullptr) != 0 || ::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0))
        err = errno;
      if (!err) {
        ::execve(ctx_->bwrap.c_str(), cargv.data(), envp);
        err = errno;
      }
      (void)!::write(fd_report, &err, sizeof err);
      ::_exit(127);
    }

    // The host. The launcher's ends are its own now.
    stdin_pipe->first.reset();
    info->second.reset();
    go->first.reset();
    report->second.reset();
    int status = 0;
    while (::waitpid(launcher, &status, 0) < 0 && errno == EINTR) {
    }
    pid_t monitor_pid = 0;
    if (::read(report->first.get(), &monitor_pid, sizeof monitor_pid) != sizeof monitor_pid || monitor_pid <= 0)
      return fail("the bwrap launcher failed to fork");
    auto monitor = hold(monitor_pid);
    if (!monitor)
      return fail("bwrap's launcher vanished before it was held");
    l.procs.push_back(std::move(*monitor));
    if (::write(go->second.get(), "g", 1) != 1)
      return fail(fmt::format("cannot start bwrap: {}", std::strerror(errno)));
    go->second.reset();
    int exec_error = 0;
    if (::read(report->first.get(), &exec_error, sizeof exec_error) == sizeof exec_error)
      return fail(fmt::format("cannot execute {} as uid {}: {}", ctx_->bwrap, uid, std::strerror(exec_error)));

    const pid_t init_pid = read_child_pid(info->first.get(), info_timeout);
    if (init_pid <= 0)
      return fail("bwrap did not start the sandbox");
    auto init_proc = hold(init_pid);
    // Its parent is the (live) monitor: then the pidfd is ferry-init's, not a reused pid's.
    if (!init_proc || parent_of(init_pid) != monitor_pid || l.procs[0].exited())
      return fail("the sandbox ended at once");
    const uint64_t init_start = start_time_of(init_pid), monitor_start = start_time_of(monitor_pid);
    l.procs.insert(l.procs.begin(), std::move(*init_proc));
    return write_file_atomically(dir_ / std::string(pids_file),
                                 fmt::format("{} {} {} {}\n", init_pid, init_start, monitor_pid, monitor_start),
                                 fs::perms(0644));
  }

  const std::shared_ptr<bwrap_context> ctx_;
  const std::string id_;
  const fs::path dir_;
  std::optional<uid_t> uid_;
};

// ---------------------------------------------------------------------------------------------

class bwrap_backend final : public backend {
 public:
  explicit bwrap_backend(std::shared_ptr<bwrap_context> ctx) : ctx_(std::move(ctx)) {}

  std::string_view name() const override { return "bwrap"; }
  const common_settings& settings() const override { return ctx_->common; }

  /// The sandbox's uid (owner of its workspace and control directory), its cgroups, and
  /// ferry-init's command line with the environment as bwrap arguments.
  result<void> prepare(const sandbox_spec& spec, const fs::path& dir, const sandbox_cgroup* cgroup) override {
    auto uid = allocate_uid(dir);
    if (!uid)
      return uid.error();
    for (const char* d : {"workspace", "ctl"}) {
      if (::chown((dir / d).c_str(), *uid, *uid) != 0)
        return fail(fmt::format("cannot give {} to uid {}: {}", (dir / d).string(), *uid, std::strerror(errno)));
    }
    // The image's root-owned files are the sandbox's root's (its uid on the host) in its layer.
    if (auto root = ctx_->common.storage->mount_root(dir, ctx_->common.rootfs, spec.layers, *uid); !root)
      return root.error();
    if (cgroup) {
      // The launcher joins them (cgroup.procs) before it execs bwrap.
      std::string text;
      for (const auto& d : cgroup->dirs())
        text += d.string() + "\n";
      if (auto r = write_file_atomically(dir / std::string(cgroups_file), text, fs::perms(0644)); !r)
        return r;
    }
    // The rest of bwrap's command line, NUL-separated: the environment, then ferry-init's.
    std::string args;
    auto add = [&](const std::string& a) {
      args += a;
      args += '\0';
    };
    for (const auto& e : sandbox_environment(spec)) {
      const auto eq = e.find('=');
      add("--setenv");
      add(e.substr(0, eq));
      add(e.substr(eq + 1));
    }
    add("--");
    for (const auto& a : init_command(ctx_->common, spec))
      add(a);
    return write_file_atomically(dir / std::string(args_file), args, fs::perms(0644));
  }

  std::unique_ptr<sandbox_driver> driver(const std::string& id) override {
    return std::make_unique<bwrap_driver>(ctx_, id);
  }

 private:
  /// A uid of the range that no sandbox of this runtime has and no host process runs as; the
  /// search starts at an offset derived from sandboxes_dir, so runtimes sharing a range rarely
  /// meet. Recorded in `<dir>/uid` before the lock is let go.
  result<uid_t> allocate_uid(const fs::path& dir) {
    std::lock_guard lock(ctx_->uid_mu);
    std::set<uid_t> taken;
    std::error_code ec;
    for (fs::directory_iterator it(ctx_->common.sandboxes_dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string recorded = read_small_file(it->path() / std::string(uid_file));
      if (!recorded.empty())
        taken.insert(static_cast<uid_t>(std::strtoul(recorded.c_str(), nullptr, 10)));
    }
    const uint32_t start = static_cast<uint32_t>(fnv1a(ctx_->common.sandboxes_dir.string()) % ctx_->uid_count);
    for (uint32_t i = 0; i < ctx_->uid_count; ++i) {
      const uid_t uid = ctx_->uid_base + (start + i) % ctx_->uid_count;
      if (taken.count(uid) || uid_running(uid))
        continue;
      if (auto r = write_file_atomically(dir / std::string(uid_file), std::to_string(uid), fs::perms(0644)); !r)
        return r.error();
      return uid;
    }
    return fail(fmt::format("all {} uids from {} are in use", ctx_->uid_count, ctx_->uid_base));
  }

  const std::shared_ptr<bwrap_context> ctx_;
};

/// Fails unless a process of any uid can reach `path`: bwrap runs as the sandbox's uid and binds
/// host paths by name (even --bind-fd: it mounts the path the descriptor names).
result<void> check_reachable(const fs::path& path, std::string_view what) {
  for (fs::path dir = path.parent_path(); !dir.empty(); dir = dir.parent_path()) {
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0)
      return fail(fmt::format("bwrap runtime: cannot stat {}: {}", dir.string(), std::strerror(errno)));
    if ((st.st_mode & S_IXOTH) == 0)
      return fail(fmt::format("bwrap runtime: {} {} is out of the sandboxes' reach: {} is not searchable by other "
                              "users (each sandbox runs as a uid of its own; chmod o+x it)",
                              what, path.string(), dir.string()));
    if (dir == dir.root_path())
      break;
  }
  return {};
}

}  // namespace

result<std::unique_ptr<sandbox_runtime>> make_bwrap_runtime(bwrap_options opts) {
  auto ctx = std::make_shared<bwrap_context>();
  auto bwrap = find_program(opts.bwrap);
  if (!bwrap)
    return fail(fmt::format("bwrap runtime: `{}` not found or not executable (is bubblewrap installed?)", opts.bwrap));
  ctx->bwrap = *bwrap;
  if (::geteuid() != 0)
    return fail("bwrap runtime: needs root (each sandbox runs as a uid of its own)");
  if (opts.uid_base == 0 || opts.uid_count == 0 || opts.uid_base + uint64_t{opts.uid_count} > 0xfffffffeull)
    return fail(fmt::format("bwrap runtime: bad uid range {} + {}", opts.uid_base, opts.uid_count));
  ctx->uid_base = opts.uid_base;
  ctx->uid_count = opts.uid_count;
  ctx->tmp_bytes = opts.tmp_bytes;
  auto common = check_options(opts, "bwrap", true,
                              "RLIMIT_NPROC (per sandbox: its uid is its own) and RLIMIT_AS (per process)",
                              opts.uid_base);
  if (!common)
    return common.error();
  ctx->common = std::move(*common);
  for (const auto& [path, what] : {std::pair{ctx->common.sandboxes_dir / "x", "the sandboxes directory"},
                                   std::pair{ctx->common.rootfs / "x", "the root filesystem"},
                                   std::pair{ctx->common.init_binary, "ferry-init"}}) {
    if (path.empty())
      continue;
    if (auto r = check_reachable(path, what); !r)
      return r.error();
  }
  auto program = bwrap_seccomp_program();
  if (!program)
    return fail("bwrap runtime: " + program.error().message);
  ctx->seccomp_program = std::move(*program);

  return make_hosted_runtime(std::make_shared<bwrap_backend>(std::move(ctx)));
}

}  // namespace ferry::sandbox
