// child_process, read_all and run_command (see ferry/sandbox/process.h).
//
// Children are started with posix_spawn: glibc runs the child on a private stack with the parent
// suspended (CLONE_VFORK), so it is safe in a multi-threaded parent and exec failures come back
// as the return value instead of a child that exits 127. Every fd this file creates is O_CLOEXEC,
// and the child closes every fd above 2 before exec, so no parent pipe leaks into a child.

#include "ferry/sandbox/process.h"
#include "unique_fd.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>
#include <thread>

#include <fmt/format.h>

extern char** environ;

namespace ferry::sandbox {
namespace {

using namespace std::chrono_literals;

std::string errno_text(int err) { return std::generic_category().message(err); }

using detail::unique_fd;

/// posix_spawn's attribute objects, destroyed on scope exit.
struct spawn_attrs {
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  spawn_attrs() {
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attr);
  }
  ~spawn_attrs() {
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
  }
  spawn_attrs(const spawn_attrs&) = delete;
  spawn_attrs& operator=(const spawn_attrs&) = delete;
};

exit_status decode_wait_status(int st) {
  exit_status s;
  if (WIFEXITED(st)) {
    s.exit_code = WEXITSTATUS(st);
  } else if (WIFSIGNALED(st)) {
    s.exit_code = -1;
    s.signal = WTERMSIG(st);
  }
  return s;
}

std::string join_argv(const std::vector<std::string>& argv) {
  return fmt::format("{}", fmt::join(argv, " "));
}

std::string tail(const std::string& s, size_t n) { return s.size() <= n ? s : s.substr(s.size() - n); }

/// Waits up to `timeout` for `pid` (our child) to exit, without reaping it.
bool exited_unreaped(pid_t pid, std::chrono::milliseconds timeout) {
  auto exited = [pid] {
    siginfo_t info{};
    int r;
    do {
      r = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
    } while (r != 0 && errno == EINTR);
    return r != 0 || info.si_pid != 0;  // an error (ECHILD) also means there is nothing to wait for
  };
  if (exited())
    return true;
  if (timeout <= 0ms)
    return false;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // A pidfd becomes readable when the child exits: no polling loop, no SIGCHLD handler.
  unique_fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  for (;;) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left <= 0ms)
      return exited();
    if (pidfd.get() >= 0) {
      pollfd p{pidfd.get(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1 << 30))) < 0 &&
          errno != EINTR)
        pidfd.reset();  // fall back to sleeping
    } else {
      std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(left, 5ms));
    }
    if (exited())
      return true;
  }
}

}  // namespace

child_process::child_process(child_process&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)),
      group_(o.group_),
      status_(std::move(o.status_)),
      reap_mu_(std::move(o.reap_mu_)),
      in_(std::exchange(o.in_, -1)),
      out_(std::exchange(o.out_, -1)),
      err_(std::exchange(o.err_, -1)) {}

child_process& child_process::operator=(child_process&& o) noexcept {
  if (this != &o) {
    release();
    pid_ = std::exchange(o.pid_, -1);
    group_ = o.group_;
    status_ = std::move(o.status_);
    reap_mu_ = std::move(o.reap_mu_);
    in_ = std::exchange(o.in_, -1);
    out_ = std::exchange(o.out_, -1);
    err_ = std::exchange(o.err_, -1);
  }
  return *this;
}

child_process::~child_process() { release(); }

void child_process::release() {
  if (pid_ > 0 && !status_) {
    signal_group(SIGKILL);
    wait();
  }
  close_fds();
}

void child_process::close_fds() {
  for (int* fd : {&in_, &out_, &err_}) {
    if (*fd >= 0)
      ::close(*fd);
    *fd = -1;
  }
}

void child_process::close_stdin() {
  if (in_ >= 0)
    ::close(in_);
  in_ = -1;
}

void child_process::signal_group(int sig) const {
  if (!reap_mu_)
    return;
  std::lock_guard lock(*reap_mu_);
  if (pid_ <= 0 || status_)
    return;
  ::kill(group_ ? -pid_ : pid_, sig);
}

exit_status child_process::reap() {
  std::lock_guard lock(*reap_mu_);
  int st = 0;
  pid_t r;
  do {
    r = ::waitpid(pid_, &st, WNOHANG);
  } while (r < 0 && errno == EINTR);
  // r == 0 cannot happen (waitid said it exited); r < 0 means someone else reaped it (ECHILD):
  // either way it is gone and we record an unknown status.
  status_ = r == pid_ ? decode_wait_status(st) : exit_status{};
  return *status_;
}

exit_status child_process::wait() {
  if (status_ || pid_ <= 0)
    return status_.value_or(exit_status{});
  // Wait without reaping, so the pid stays ours until reap() takes the lock.
  siginfo_t info{};
  while (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOWAIT) != 0) {
    if (errno != EINTR)
      break;
  }
  return reap();
}

std::optional<exit_status> child_process::try_wait() {
  if (status_ || pid_ <= 0)
    return status_.value_or(exit_status{});
  siginfo_t info{};
  int r;
  do {
    r = ::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT);
  } while (r != 0 && errno == EINTR);
  if (r == 0 && info.si_pid == 0)
    return std::nullopt;
  return reap();
}

std::optional<exit_status> child_process::wait_for(std::chrono::milliseconds timeout) {
  if (status_ || pid_ <= 0)
    return status_.value_or(exit_status{});
  if (!exited_unreaped(pid_, timeout))
    return std::nullopt;
  return reap();
}

exit_status child_process::terminate(std::chrono::milliseconds grace) {
  if (status_ || pid_ <= 0)
    return status_.value_or(exit_status{});
  signal_group(SIGTERM);
  if (auto s = wait_for(grace))
    return *s;
  signal_group(SIGKILL);
  return wait();
}

result<child_process> child_process::spawn(const spawn_options& opts) {
  if (opts.argv.empty())
    return fail("cannot start a child process: empty argv");
  const std::string& program = opts.argv[0];

  spawn_attrs sa;
  unique_fd in_parent, out_parent, err_parent;
  std::vector<unique_fd> child_ends;  // closed in the parent once the child has them

  auto add_pipe = [&](int target, bool parent_reads, unique_fd& parent_end) -> int {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0)
      return errno;
    parent_end.reset(parent_reads ? p[0] : p[1]);
    int child_end = parent_reads ? p[1] : p[0];
    child_ends.emplace_back(child_end);
    return posix_spawn_file_actions_adddup2(&sa.actions, child_end, target);
  };
  auto connect = [&](stdio how, int target, unique_fd& parent_end) -> int {
    switch (how) {
      case stdio::inherit:
        return 0;
      case stdio::null:
        return posix_spawn_file_actions_addopen(&sa.actions, target, "/dev/null",
                                                target == 0 ? O_RDONLY : O_WRONLY, 0);
      case stdio::pipe:
        return add_pipe(target, target != 0, parent_end);
      case stdio::bytes: {
        // The pipe buffer (64 KiB on Linux) takes them all before the child runs.
        if (target != 0 || opts.in_bytes.size() > (64u << 10))
          return EINVAL;
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0)
          return errno;
        unique_fd write_end(p[1]);
        child_ends.emplace_back(p[0]);
        for (size_t off = 0; off < opts.in_bytes.size();) {
          ssize_t w = ::write(write_end.get(), opts.in_bytes.data() + off, opts.in_bytes.size() - off);
          if (w < 0 && errno == EINTR)
            continue;
          if (w < 0)
            return errno;
          off += static_cast<size_t>(w);
        }
        return posix_spawn_file_actions_adddup2(&sa.actions, p[0], target);
      }
      case stdio::file:
        if (target == 0 || opts.file.empty())
          return EINVAL;
        return posix_spawn_file_actions_addopen(&sa.actions, target, opts.file.c_str(),
                                                O_WRONLY | O_CREAT | O_APPEND, 0600);
    }
    return EINVAL;
  };

  int rc = connect(opts.in, 0, in_parent);
  if (rc == 0)
    rc = connect(opts.out, 1, out_parent);
  if (rc == 0) {
    rc = opts.stderr_to_stdout ? posix_spawn_file_actions_adddup2(&sa.actions, 1, 2)
                          : connect(opts.err, 2, err_parent);
  }
  if (rc == 0 && !opts.cwd.empty())
    rc = posix_spawn_file_actions_addchdir_np(&sa.actions, opts.cwd.c_str());
  if (rc == 0)
    rc = posix_spawn_file_actions_addclosefrom_np(&sa.actions, 3);
  if (rc != 0)
    return fail(fmt::format("cannot start `{}`: setting up its stdio: {}", program, errno_text(rc)));

  // The child starts with no blocked signals and default dispositions, whatever this thread
  // had (a parent that ignores SIGPIPE must not pass that on).
  sigset_t empty, defaults;
  sigemptyset(&empty);
  sigfillset(&defaults);
  sigdelset(&defaults, SIGKILL);
  sigdelset(&defaults, SIGSTOP);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  if (opts.new_session)
    flags |= POSIX_SPAWN_SETSID;
  else if (opts.new_process_group)
    flags |= POSIX_SPAWN_SETPGROUP;
  posix_spawnattr_setflags(&sa.attr, flags);
  posix_spawnattr_setsigmask(&sa.attr, &empty);
  posix_spawnattr_setsigdefault(&sa.attr, &defaults);
  posix_spawnattr_setpgroup(&sa.attr, 0);

  std::vector<char*> argv;
  argv.reserve(opts.argv.size() + 1);
  for (const auto& a : opts.argv)
    argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  if (opts.env) {
    envp.reserve(opts.env->size() + 1);
    for (const auto& e : *opts.env)
      envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
  }

  pid_t pid = -1;
  rc = ::posix_spawnp(&pid, program.c_str(), &sa.actions, &sa.attr, argv.data(),
                      opts.env ? envp.data() : environ);
  if (rc != 0) {
    return fail(fmt::format("cannot start `{}`{}: {}", program,
                            opts.cwd.empty() ? "" : fmt::format(" in {}", opts.cwd),
                            errno_text(rc)));
  }

  child_process c;
  c.pid_ = pid;
  c.group_ = opts.new_process_group || opts.new_session;
  c.reap_mu_ = std::make_unique<std::mutex>();
  c.in_ = in_parent.release();
  c.out_ = out_parent.release();
  c.err_ = err_parent.release();
  return c;
}

std::string read_small_file(const std::filesystem::path& path) {
  std::string out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      if (n < 0)
        out.clear();
      break;
    }
  }
  ::close(fd);
  return out;
}

std::string read_all(int fd) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN) {
      pollfd p{fd, POLLIN, 0};
      ::poll(&p, 1, -1);
    } else {
      break;
    }
  }
  return out;
}

result<run_result> run_command(const std::vector<std::string>& argv,
                               std::chrono::milliseconds timeout) {
  spawn_options o;
  o.argv = argv;
  o.in = stdio::null;
  o.out = stdio::pipe;
  o.stderr_to_stdout = true;
  auto spawned = child_process::spawn(o);
  if (!spawned)
    return spawned.error();
  child_process& child = *spawned;

  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto left = [&] {
    return std::max(0ms, std::chrono::ceil<std::chrono::milliseconds>(
                             deadline - std::chrono::steady_clock::now()));
  };
  std::string output;
  char buf[16384];
  auto read_some = [&]() -> bool {  // false at EOF or on a read error
    ssize_t n;
    do {
      n = ::read(child.stdout_fd(), buf, sizeof buf);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
      return false;
    output.append(buf, static_cast<size_t>(n));
    return true;
  };
  for (;;) {
    if (left() <= 0ms)
      break;
    pollfd p{child.stdout_fd(), POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(std::min(left(), 50ms).count()));
    if (r < 0 && errno == EINTR)
      continue;
    if (r > 0) {
      if (!read_some())
        break;
      continue;
    }
    if (r == 0 && exited_unreaped(child.pid(), 0ms)) {
      // The command is done but something it started still holds the pipe: take what is
      // buffered and stop; the group kill below ends the straggler.
      while (::poll(&p, 1, 0) > 0 && read_some()) {
      }
      break;
    }
  }
  if (!exited_unreaped(child.pid(), left())) {
    child.signal_group(SIGKILL);
    child.wait();
    return fail(fmt::format("`{}` did not finish within {} ms and was killed; output: {}",
                            join_argv(argv), timeout.count(), tail(output, 2048)));
  }
  // Helpers leave nothing behind: kill what remains of the group while the leader, still a
  // zombie, keeps the group id from being reused.
  child.signal_group(SIGKILL);
  return run_result{child.wait(), std::move(output)};
}

}  // namespace ferry::sandbox
