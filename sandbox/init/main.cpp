// ferry-init: PID 1 of every sandbox.
//
//   ferry-init [--command-id N] -- argv...
//
// Runs one command and reports on it over fd 1 with the framed protocol of schemas/init.fbs:
// Hello, Started, Output*, Exited — or Error if it cannot do what it was asked (bad arguments,
// the command cannot be executed), after which it exits 1 without Started/Exited.
//
// Invariants:
// - Only frames are ever written to fd 1. ferry-init's own diagnostics go to fd 2; the command
//   never sees fd 1 (its stdout and stderr are pipes that ferry-init relays as Output frames).
// - Exited is sent only after the command has been reaped and both its pipes reached EOF, so
//   every Output precedes it.
// - Every child is reaped: as PID 1 (or a child subreaper on a host) ferry-init inherits orphans.
//
// Trust: this runs inside the sandbox. It shares nothing with host code but the wire schema, is
// linked statically, and is built without sanitizers. No exception leaves main().

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <flatbuffers/flatbuffers.h>

#include "ferry/schemas/frame.h"
#include "ferry/schemas/init_generated.h"

namespace {

namespace v1 = ferry::init::v1;

constexpr int frames_fd = 1;

int signal_pipe_write = -1;

// Async-signal-safe: turns a signal into a byte the main loop polls for.
void on_signal(int sig) {
  int saved = errno;
  unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = ::write(signal_pipe_write, &b, 1);
  errno = saved;
}

void log_error(const std::string& what) {
  std::string line = "ferry-init: " + what + "\n";
  [[maybe_unused]] ssize_t n = ::write(2, line.data(), line.size());
}

std::string errno_text(int err) { return std::strerror(err); }  // single-threaded program

uint64_t now_ms() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}

bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

/// Writes protocol frames to fd 1. A failed write means the host is gone.
class reporter {
 public:
  bool hello() {
    fbb_.Clear();
    auto h = v1::CreateHello(fbb_, 1, static_cast<int32_t>(::getpid()));
    return send(v1::Message::Hello, h.Union());
  }
  bool started(uint32_t command_id, pid_t pid, const std::vector<std::string>& argv) {
    fbb_.Clear();
    auto args = fbb_.CreateVectorOfStrings(argv);
    auto s = v1::CreateStarted(fbb_, command_id, static_cast<int32_t>(pid), args);
    return send(v1::Message::Started, s.Union());
  }
  bool output(uint32_t command_id, int stream, const char* data, size_t n) {
    fbb_.Clear();
    auto bytes = fbb_.CreateVector(reinterpret_cast<const uint8_t*>(data), n);
    auto o = v1::CreateOutput(fbb_, command_id, static_cast<uint8_t>(stream), bytes);
    return send(v1::Message::Output, o.Union());
  }
  bool exited(uint32_t command_id, int exit_code, int signal, uint64_t duration_ms) {
    fbb_.Clear();
    auto e = v1::CreateExited(fbb_, command_id, exit_code, signal, duration_ms);
    return send(v1::Message::Exited, e.Union());
  }
  bool error(const std::string& message) {
    log_error(message);
    fbb_.Clear();
    auto m = fbb_.CreateString(message);
    auto e = v1::CreateError(fbb_, m);
    return send(v1::Message::Error, e.Union());
  }

 private:
  bool send(v1::Message type, flatbuffers::Offset<void> body) {
    auto msg = v1::CreateInitMessage(fbb_, type, body);
    v1::FinishInitMessageBuffer(fbb_, msg);
    frame_.clear();
    ferry::wire::append_frame(frame_, fbb_);
    return write_all(frames_fd, frame_.data(), frame_.size());
  }

  flatbuffers::FlatBufferBuilder fbb_{ferry::wire::max_output_chunk + 256};
  std::string frame_;
};

struct arguments {
  uint32_t command_id = 1;
  std::vector<std::string> argv;
};

bool parse_arguments(int argc, char** argv, arguments& out, std::string& why) {
  int i = 1;
  for (; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (a == "--command-id" && i + 1 < argc) {
      char* end = nullptr;
      errno = 0;
      unsigned long v = std::strtoul(argv[++i], &end, 10);
      if (errno != 0 || end == argv[i] || *end != '\0' || v > UINT32_MAX) {
        why = std::string("bad --command-id `") + argv[i] + "`";
        return false;
      }
      out.command_id = static_cast<uint32_t>(v);
      continue;
    }
    why = "unexpected argument `" + a + "`; usage: ferry-init [--command-id N] -- argv...";
    return false;
  }
  for (; i < argc; ++i)
    out.argv.emplace_back(argv[i]);
  if (out.argv.empty()) {
    why = "no command given; usage: ferry-init [--command-id N] -- argv...";
    return false;
  }
  return true;
}

/// Makes sure fds 0 and 2 are open, so that fds created later never land on them.
void ensure_std_fds() {
  for (int fd : {0, 2}) {
    if (::fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
      int n = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
      if (n >= 0 && n != fd) {
        ::dup2(n, fd);
        ::close(n);
      }
    }
  }
}

/// The command's stdin: /dev/null, or an empty pipe if the root has no /dev/null.
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

constexpr int forwarded_signals[] = {SIGTERM, SIGINT, SIGHUP};

int run(int argc, char** argv) {
  ensure_std_fds();
  if (::fcntl(frames_fd, F_GETFD) < 0) {
    log_error("fd 1 (the frame channel) is not open");
    return 1;
  }
  reporter report;
  arguments args;
  std::string why;
  if (!parse_arguments(argc, argv, args, why)) {
    report.error(why);
    return 2;
  }

  // A closed frame channel must show up as EPIPE so we can kill the command first.
  ::signal(SIGPIPE, SIG_IGN);
  int sig_pipe[2];
  if (::pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    report.error("pipe: " + errno_text(errno));
    return 1;
  }
  signal_pipe_write = sig_pipe[1];
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGCHLD, &sa, nullptr);
  for (int s : forwarded_signals)
    ::sigaction(s, &sa, nullptr);
  // Outside a sandbox (tests), adopt the command's orphans as PID 1 would. Best effort.
  ::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

  if (!report.hello())
    return 1;

  int out_pipe[2], err_pipe[2], exec_pipe[2];
  int null_in = open_null_stdin();
  if (null_in < 0 || ::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0 ||
      ::pipe2(exec_pipe, O_CLOEXEC) != 0) {
    report.error("cannot set up the command's stdio: " + errno_text(errno));
    return 1;
  }

  std::vector<char*> cargv;
  for (auto& a : args.argv)
    cargv.push_back(a.data());
  cargv.push_back(nullptr);

  const uint64_t started_at = now_ms();
  pid_t pid = ::fork();
  if (pid < 0) {
    report.error("fork: " + errno_text(errno));
    return 1;
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    ::setpgid(0, 0);
    ::dup2(null_in, 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
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
    ::execvp(cargv[0], cargv.data());
    int err = errno;
    [[maybe_unused]] ssize_t n = ::write(exec_pipe[1], &err, sizeof err);
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also here, so the group exists before we might signal it
  ::close(null_in);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  ::close(exec_pipe[1]);

  // exec_pipe closes on a successful exec; otherwise it carries the child's errno.
  int exec_errno = 0;
  ssize_t got;
  do {
    got = ::read(exec_pipe[0], &exec_errno, sizeof exec_errno);
  } while (got < 0 && errno == EINTR);
  ::close(exec_pipe[0]);
  if (got == static_cast<ssize_t>(sizeof exec_errno)) {
    int st;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    report.error("cannot execute `" + args.argv[0] + "`: " + errno_text(exec_errno));
    return 1;
  }
  if (!report.started(args.command_id, pid, args.argv)) {
    ::kill(-pid, SIGKILL);
    return 1;
  }

  bool command_done = false;
  int exit_code = -1, term_signal = 0;
  uint64_t duration_ms = 0;
  pollfd fds[3] = {{sig_pipe[0], POLLIN, 0}, {out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  static char buf[ferry::wire::max_output_chunk];

  auto reap_children = [&] {
    int st;
    pid_t r;
    while ((r = ::waitpid(-1, &st, WNOHANG)) > 0 || (r < 0 && errno == EINTR)) {
      if (r == pid) {
        command_done = true;
        duration_ms = now_ms() - started_at;
        if (WIFEXITED(st)) {
          exit_code = WEXITSTATUS(st);
        } else if (WIFSIGNALED(st)) {
          term_signal = WTERMSIG(st);
        }
      }
    }
  };

  while (!command_done || fds[1].fd >= 0 || fds[2].fd >= 0) {
    int r = ::poll(fds, 3, -1);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      log_error("poll: " + errno_text(errno));
      ::kill(-pid, SIGKILL);
      return 1;
    }
    if (fds[0].revents) {
      unsigned char sigs[64];
      ssize_t n;
      while ((n = ::read(sig_pipe[0], sigs, sizeof sigs)) > 0) {
        for (ssize_t i = 0; i < n; ++i) {
          if (sigs[i] != SIGCHLD)
            ::kill(-pid, sigs[i]);  // the group outlives the command only while it has members
        }
      }
    }
    for (int stream = 0; stream < 2; ++stream) {
      pollfd& p = fds[1 + stream];
      if (p.fd < 0 || p.revents == 0)
        continue;
      ssize_t n = ::read(p.fd, buf, sizeof buf);
      if (n > 0) {
        if (!report.output(args.command_id, stream, buf, static_cast<size_t>(n))) {
          ::kill(-pid, SIGKILL);
          return 1;
        }
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        ::close(p.fd);
        p.fd = -1;
      }
    }
    reap_children();
  }

  bool sent = report.exited(args.command_id, exit_code, term_signal, duration_ms);
  // Whatever the command left behind in its group goes with it (inside a sandbox, PID 1 exiting
  // does the same for every process).
  ::kill(-pid, SIGKILL);
  return sent ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    log_error(std::string("fatal: ") + e.what());
  } catch (...) {
    log_error("fatal: unknown exception");
  }
  return 1;
}
