#include "spawn.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>

#include "util.h"

namespace ferry_init {
namespace {

/// What the child reports through the exec pipe when it cannot exec: the step and errno.
struct child_report {
  int step;
  int err;
};

/// The command's stdin when it gets none: /dev/null, or an empty pipe if the root has none.
int open_null_stdin() {
  int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd >= 0)
    return fd;
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0)
    return -1;
  ::close(p[1]);
  return p[0];
}

/// Candidate paths for argv[0]: itself if it has a '/', else each directory of PATH (from the
/// command's environment, so `PATH=... prog` finds prog where the command would).
std::vector<std::string> exec_candidates(const std::string& name, const std::vector<std::string>& env) {
  if (name.find('/') != std::string::npos)
    return {name};
  std::string path = "/usr/local/bin:/usr/bin:/bin";
  for (const auto& e : env) {
    if (e.rfind("PATH=", 0) == 0)
      path = e.substr(5);
  }
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t colon = path.find(':', start);
    std::string dir = path.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
    out.push_back((dir.empty() ? std::string(".") : dir) + "/" + name);
    if (colon == std::string::npos)
      break;
    start = colon + 1;
  }
  return out;
}

struct fd_set_guard {
  std::vector<int*> fds;
  ~fd_set_guard() {
    for (int* fd : fds)
      close_fd(*fd);
  }
};

}  // namespace

bool spawn_command(const spawn_request& req, spawned& out, spawn_failure& why) {
  auto fail = [&](spawn_step step, std::string message) {
    why.step = step;
    why.message = std::move(message);
    return false;
  };
  if (req.argv.empty() || req.argv[0].empty())
    return fail(spawn_step::setup, "empty argv");

  // Every fd here is close-on-exec; the child dup2s what it needs onto 0, 1, 2.
  int in_read = -1, in_write = -1, out_read = -1, out_write = -1, err_read = -1, err_write = -1;
  int master = -1, slave = -1, report_read = -1, report_write = -1;
  fd_set_guard guard{{&in_read, &in_write, &out_read, &out_write, &err_read, &err_write, &master, &slave,
                      &report_read, &report_write}};
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0)
    return fail(spawn_step::setup, "pipe: " + errno_text(errno));
  report_read = p[0];
  report_write = p[1];

  if (req.pty) {
    master = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    char name[128];
    if (master < 0 || ::grantpt(master) != 0 || ::unlockpt(master) != 0 ||
        ::ptsname_r(master, name, sizeof name) != 0)
      return fail(spawn_step::setup, "cannot open a pseudo-terminal: " + errno_text(errno));
    slave = ::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (slave < 0)
      return fail(spawn_step::setup, std::string("cannot open ") + name + ": " + errno_text(errno));
    winsize ws{};
    ws.ws_row = req.rows;
    ws.ws_col = req.cols;
    ::ioctl(master, TIOCSWINSZ, &ws);
  } else {
    if (req.null_stdin) {
      in_read = open_null_stdin();
      if (in_read < 0)
        return fail(spawn_step::setup, "cannot open /dev/null: " + errno_text(errno));
    } else {
      if (::pipe2(p, O_CLOEXEC) != 0)
        return fail(spawn_step::setup, "pipe: " + errno_text(errno));
      in_read = p[0];
      in_write = p[1];
    }
    if (::pipe2(p, O_CLOEXEC) != 0)
      return fail(spawn_step::setup, "pipe: " + errno_text(errno));
    out_read = p[0];
    out_write = p[1];
    if (::pipe2(p, O_CLOEXEC) != 0)
      return fail(spawn_step::setup, "pipe: " + errno_text(errno));
    err_read = p[0];
    err_write = p[1];
  }

  // Everything the child needs, built before fork (ferry-init is single-threaded, but the child
  // should do as little as possible before exec).
  std::vector<char*> cargv;
  for (const auto& a : req.argv)
    cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  for (const auto& e : req.env)
    cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);
  const std::vector<std::string> candidates = exec_candidates(req.argv[0], req.env);

  pid_t pid = ::fork();
  if (pid < 0)
    return fail(spawn_step::setup, "fork: " + errno_text(errno));
  if (pid == 0) {
    auto report = [&](spawn_step step, int err) {
      child_report r{static_cast<int>(step), err};
      [[maybe_unused]] ssize_t n = ::write(report_write, &r, sizeof r);
      ::_exit(127);
    };
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGCHLD, &dfl, nullptr);
    ::sigaction(SIGPIPE, &dfl, nullptr);
    for (int s : forwarded_signals)
      ::sigaction(s, &dfl, nullptr);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (req.pty) {
      if (::setsid() < 0 || ::ioctl(slave, TIOCSCTTY, 0) != 0)
        report(spawn_step::setup, errno);
      if (::dup2(slave, 0) < 0 || ::dup2(slave, 1) < 0 || ::dup2(slave, 2) < 0)
        report(spawn_step::setup, errno);
    } else {
      ::setpgid(0, 0);
      if (::dup2(in_read, 0) < 0 || ::dup2(out_write, 1) < 0 || ::dup2(err_write, 2) < 0)
        report(spawn_step::setup, errno);
    }
    if (!req.cwd.empty() && ::chdir(req.cwd.c_str()) != 0)
      report(spawn_step::cwd, errno);
    int err = ENOENT;
    for (const auto& c : candidates) {
      ::execve(c.c_str(), cargv.data(), cenv.data());
      // Like execvp: remember a permission problem, keep looking past a missing file.
      if (errno != ENOENT && errno != ENOTDIR)
        err = errno;
      if (errno != ENOENT && errno != ENOTDIR && errno != EACCES)
        break;
    }
    report(spawn_step::exec, err);
  }
  if (!req.pty)
    ::setpgid(pid, pid);  // also here, so the group exists before we might signal it
  close_fd(report_write);
  close_fd(slave);
  close_fd(in_read);
  close_fd(out_write);
  close_fd(err_write);

  // The report pipe closes on a successful exec; otherwise it carries the child's report.
  child_report r{};
  ssize_t got;
  do {
    got = ::read(report_read, &r, sizeof r);
  } while (got < 0 && errno == EINTR);
  if (got == static_cast<ssize_t>(sizeof r)) {
    int st;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    const auto step = static_cast<spawn_step>(r.step);
    switch (step) {
      case spawn_step::cwd:
        return fail(step, "cannot change to directory `" + req.cwd + "`: " + errno_text(r.err));
      case spawn_step::exec:
        return fail(step, "cannot execute `" + req.argv[0] + "`: " + errno_text(r.err));
      case spawn_step::setup:
        break;
    }
    return fail(spawn_step::setup, "cannot set up the command's terminal or stdio: " + errno_text(r.err));
  }

  out.pid = pid;
  if (req.pty) {
    out.out_fd = master;
    out.in_fd = ::fcntl(master, F_DUPFD_CLOEXEC, 0);
    set_nonblocking(master);  // shared with in_fd: reads happen only after poll said so
    master = -1;
  } else {
    out.out_fd = out_read;
    out.err_fd = err_read;
    out_read = err_read = -1;
    if (in_write >= 0) {
      set_nonblocking(in_write);
      out.in_fd = in_write;
      in_write = -1;
    }
  }
  return true;
}

}  // namespace ferry_init
