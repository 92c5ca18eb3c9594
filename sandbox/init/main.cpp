// ferry-init: PID 1 of every sandbox.
//
//   ferry-init [--command-id N] [--listen PATH [--linger-ms N] [--buffer-bytes N]] -- argv...
//
// Runs one command and reports on it with the framed protocol of schemas/init.fbs.
//
// stdio mode (no --listen; used to test ferry-init on the host): fd 1 is the channel, one-way.
// Hello, Started, Output*, Exited — or Error if it cannot do what it was asked (bad arguments,
// the command cannot be executed), after which it exits 1 without Started/Exited. A write to fd 1
// that fails means the host is gone: the command is killed and ferry-init exits 1.
//
// socket mode (--listen PATH; every runsc sandbox): ferry-init listens on a unix socket in a
// directory bind-mounted from the host, so the sandbox does not depend on any host process.
// Each connection gets Hello (with this ferry-init's random instance token), then must send
// Attach (the host's resume offsets); the first Attach starts the command. ferry-init then sends
// Started, OutputGap?, Output* from the resume offsets, and Exited when the command has ended;
// the host answers Release and ferry-init exits, which ends the sandbox. One host at a time.
//
// Output buffering (socket mode): each stream keeps at least the last --buffer-bytes bytes
// (default 8 MiB; at most one 64 KiB chunk more) as chunks tagged with their stream offset and a
// sequence number, so a host can resume from any kept offset and both streams are replayed in
// the order they were read.
// - While a host is attached: backpressure. A stream is not read while the host has
//   --buffer-bytes of it unsent; the command then blocks on write, as it would on a full pipe.
//   Bytes already sent are dropped oldest-first beyond --buffer-bytes.
// - While no host is attached: the command is drained anyway and the oldest bytes are dropped.
//   A host resuming from a dropped offset gets OutputGap for them first: never a silent loss.
// - The command not running (not started yet, or ended) and no host connected for --linger-ms
//   (default 10 minutes): ferry-init gives up, kills what is left and exits 3.
//
// Invariants:
// - In stdio mode only frames are written to fd 1; ferry-init's diagnostics always go to fd 2.
//   The command never sees ferry-init's fds (its stdout and stderr are pipes relayed as Output).
// - Exited is sent only after the command has been reaped, both its pipes reached EOF and every
//   kept byte from the host's resume point on has been sent.
// - Every child is reaped: as PID 1 (or a child subreaper on a host) ferry-init inherits orphans.
//
// Trust: this runs inside the sandbox, next to the untrusted command (same uid). It shares
// nothing with host code but the wire schema, is linked statically, and is built without
// sanitizers. In socket mode it is not dumpable, so the command can neither read its memory
// (the instance token) nor its fds through /proc. Frames from a host that fail to decode close
// that connection; ferry-init carries on. No exception leaves main().

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include <flatbuffers/flatbuffers.h>

#include "ferry/schemas/frame.h"
#include "ferry/schemas/init_generated.h"

namespace {

namespace v1 = ferry::init::v1;
using ferry::wire::max_output_chunk;

constexpr uint64_t attach_timeout_ms = 10'000;  // from Hello to the host's Attach
constexpr uint64_t default_linger_ms = 600'000;
constexpr uint64_t default_buffer_bytes = 8u << 20;
constexpr uint64_t chunk_overhead = 64;  // counted per kept chunk, so tiny writes stay bounded
constexpr int exit_gave_up = 3;          // lingered without a host

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

struct arguments {
  uint32_t command_id = 1;
  std::string listen;  // empty: stdio mode
  uint64_t linger_ms = default_linger_ms;
  uint64_t buffer_bytes = default_buffer_bytes;
  std::vector<std::string> argv;
};

constexpr const char* usage =
    "usage: ferry-init [--command-id N] [--listen PATH [--linger-ms N] [--buffer-bytes N]] -- argv...";

bool parse_number(const char* text, uint64_t max, uint64_t& out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || v > max)
    return false;
  out = v;
  return true;
}

bool parse_arguments(int argc, char** argv, arguments& out, std::string& why) {
  int i = 1;
  for (; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (i + 1 >= argc) {
      why = "unexpected argument `" + a + "`; " + usage;
      return false;
    }
    uint64_t v = 0;
    if (a == "--command-id") {
      if (!parse_number(argv[++i], UINT32_MAX, v)) {
        why = std::string("bad --command-id `") + argv[i] + "`";
        return false;
      }
      out.command_id = static_cast<uint32_t>(v);
    } else if (a == "--listen") {
      out.listen = argv[++i];
      if (out.listen.empty() || out.listen.size() >= sizeof(sockaddr_un::sun_path)) {
        why = "bad --listen path `" + out.listen + "` (empty or too long)";
        return false;
      }
    } else if (a == "--linger-ms") {
      if (!parse_number(argv[++i], UINT64_MAX / 2, out.linger_ms)) {
        why = std::string("bad --linger-ms `") + argv[i] + "`";
        return false;
      }
    } else if (a == "--buffer-bytes") {
      if (!parse_number(argv[++i], uint64_t{1} << 40, out.buffer_bytes) ||
          out.buffer_bytes < max_output_chunk) {
        why = std::string("bad --buffer-bytes `") + argv[i] + "` (at least 65536)";
        return false;
      }
    } else {
      why = "unexpected argument `" + a + "`; " + usage;
      return false;
    }
  }
  for (; i < argc; ++i)
    out.argv.emplace_back(argv[i]);
  if (out.argv.empty()) {
    why = std::string("no command given; ") + usage;
    return false;
  }
  return true;
}

/// Makes sure fds 0, 1 and 2 are open, so that fds created later never land on them.
void ensure_std_fds() {
  for (int fd : {0, 1, 2}) {
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

std::string random_token() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof bytes) {
    ssize_t n = ::getrandom(bytes + got, sizeof bytes - got, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += static_cast<size_t>(n);
  }
  if (got < sizeof bytes) {  // no getrandom: still unique per boot, but guessable
    uint64_t t = now_ms() ^ (static_cast<uint64_t>(::getpid()) << 32);
    std::memcpy(bytes, &t, sizeof t);
  }
  static const char hex[] = "0123456789abcdef";
  std::string s;
  for (unsigned char b : bytes) {
    s += hex[b >> 4];
    s += hex[b & 15];
  }
  return s;
}

constexpr int forwarded_signals[] = {SIGTERM, SIGINT, SIGHUP};

// ---------------------------------------------------------------------------------------------

/// What the command wrote to one stream: the kept chunks, contiguous up to `end`.
struct stream_buffer {
  struct chunk {
    uint64_t seq;  // order of reads across both streams
    uint64_t offset;
    std::string data;
    uint64_t end() const { return offset + data.size(); }
  };
  std::deque<chunk> chunks;
  uint64_t end = 0;   // bytes the command wrote to the stream so far
  uint64_t kept = 0;  // bytes kept, plus chunk_overhead per chunk
  int fd = -1;        // read end of the command's pipe; -1 at EOF

  uint64_t first_kept() const { return chunks.empty() ? end : chunks.front().offset; }

  /// The chunk holding byte `offset` (first_kept() <= offset < end).
  const chunk& chunk_at(uint64_t offset) const {
    auto it = std::upper_bound(chunks.begin(), chunks.end(), offset,
                               [](uint64_t o, const chunk& c) { return o < c.offset; });
    return *(it - 1);
  }
};

/// One host connection (socket mode), or fd 1 (stdio mode).
struct connection {
  int fd = -1;
  bool stdio = false;
  bool attached = false;  // Attach received (always in stdio mode)
  uint64_t attach_deadline = 0;
  uint64_t cursor[2] = {0, 0};               // next byte of each stream to send
  std::optional<uint64_t> gap_lost[2];       // OutputGap to send before the stream's Output
  bool started_sent = false;
  bool exited_sent = false;
  ferry::wire::frame_decoder decoder;
  std::string out;  // frames not yet written (socket mode)
};

class init_process {
 public:
  explicit init_process(arguments args) : args_(std::move(args)) {}

  int run();

 private:
  enum class command_state { not_started, running, done };

  // --- frames ---
  void send_hello(connection& c) {
    fbb_.Clear();
    auto instance = c.stdio ? flatbuffers::Offset<flatbuffers::String>() : fbb_.CreateString(instance_);
    auto h = v1::CreateHello(fbb_, c.stdio ? ferry::wire::stdio_protocol : ferry::wire::socket_protocol,
                             static_cast<int32_t>(::getpid()), instance);
    send(c, v1::Message::Hello, h);
  }
  void send_error(connection& c, const std::string& message) {
    fbb_.Clear();
    auto e = v1::CreateError(fbb_, fbb_.CreateString(message));
    send(c, v1::Message::Error, e);
  }
  template <class T>
  void send(connection& c, v1::Message type, flatbuffers::Offset<T> body) {
    if (c.fd < 0)
      return;
    ferry::wire::append_message(c.out, fbb_, type, body);
    flush(c);
  }
  /// Writes what is pending: all of it in stdio mode (blocking), as much as fits otherwise.
  void flush(connection& c);
  void drop(connection& c, const std::string& why);

  // --- the command ---
  bool start_command(std::string& why);
  void read_command(int stream);
  void reap_children();
  bool command_running() const { return state_ == command_state::running; }

  // --- host connections ---
  void accept_host();
  void read_host();
  void on_host_message(const v1::InitMessage& m);
  void pump(connection& c);
  void evict(int stream);

  arguments args_;
  std::string instance_ = random_token();
  flatbuffers::FlatBufferBuilder fbb_{max_output_chunk + 256};

  command_state state_ = command_state::not_started;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int exit_code_ = -1, term_signal_ = 0;
  uint64_t started_at_ = 0, duration_ms_ = 0;
  stream_buffer streams_[2];
  uint64_t seq_ = 0;  // last chunk sequence number handed out
  std::vector<char> read_buf_ = std::vector<char>(max_output_chunk);

  int listen_fd_ = -1;
  connection conn_;             // fd < 0 when no host is connected
  bool finished_ = false;       // Release received
  std::optional<uint64_t> idle_since_;  // no host and no running command since
};

void init_process::flush(connection& c) {
  if (c.fd < 0 || c.out.empty())
    return;
  if (c.stdio) {
    if (!write_all(c.fd, c.out.data(), c.out.size())) {
      c.out.clear();
      drop(c, "the frame channel (fd 1) is closed: " + errno_text(errno));
      return;
    }
    c.out.clear();
    return;
  }
  while (!c.out.empty()) {
    ssize_t w = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return;
      drop(c, "host connection lost: " + errno_text(errno));
      return;
    }
    c.out.erase(0, static_cast<size_t>(w));
  }
}

void init_process::drop(connection& c, const std::string& why) {
  if (c.fd < 0)
    return;
  if (!why.empty())
    log_error(why);
  if (!c.stdio)
    ::close(c.fd);
  c = connection{};
}

bool init_process::start_command(std::string& why) {
  int out_pipe[2], err_pipe[2], exec_pipe[2];
  int null_in = open_null_stdin();
  if (null_in < 0 || ::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0 ||
      ::pipe2(exec_pipe, O_CLOEXEC) != 0) {
    why = "cannot set up the command's stdio: " + errno_text(errno);
    return false;
  }
  std::vector<char*> cargv;
  for (auto& a : args_.argv)
    cargv.push_back(a.data());
  cargv.push_back(nullptr);

  started_at_ = now_ms();
  pid_t pid = ::fork();
  if (pid < 0) {
    why = "fork: " + errno_text(errno);
    return false;
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
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    why = "cannot execute `" + args_.argv[0] + "`: " + errno_text(exec_errno);
    return false;
  }
  pid_ = pid;
  streams_[0].fd = out_pipe[0];
  streams_[1].fd = err_pipe[0];
  state_ = command_state::running;
  return true;
}

void init_process::read_command(int stream) {
  stream_buffer& s = streams_[stream];
  ssize_t n = ::read(s.fd, read_buf_.data(), read_buf_.size());
  if (n < 0 && (errno == EINTR || errno == EAGAIN))
    return;
  if (n <= 0) {
    ::close(s.fd);
    s.fd = -1;
    return;
  }
  // Extend the newest chunk if nothing was read from the other stream since: fewer, larger
  // frames, same order.
  if (!s.chunks.empty() && s.chunks.back().seq == seq_ &&
      s.chunks.back().data.size() + static_cast<size_t>(n) <= max_output_chunk) {
    s.chunks.back().data.append(read_buf_.data(), static_cast<size_t>(n));
  } else {
    s.chunks.push_back({++seq_, s.end, std::string(read_buf_.data(), static_cast<size_t>(n))});
    s.kept += chunk_overhead;
  }
  s.end += static_cast<uint64_t>(n);
  s.kept += static_cast<uint64_t>(n);
  evict(stream);
}

void init_process::evict(int stream) {
  stream_buffer& s = streams_[stream];
  // Keep at least buffer_bytes: drop the oldest chunk only if what remains is still that much.
  while (!s.chunks.empty()) {
    const auto& front = s.chunks.front();
    const uint64_t front_cost = front.data.size() + chunk_overhead;
    if (s.kept - front_cost < args_.buffer_bytes)
      break;
    if (conn_.attached && front.end() > conn_.cursor[stream])
      break;  // not yet sent to the attached host (backpressure keeps this bounded)
    s.kept -= front_cost;
    s.chunks.pop_front();
  }
}

void init_process::reap_children() {
  int st;
  pid_t r;
  while ((r = ::waitpid(-1, &st, WNOHANG)) > 0 || (r < 0 && errno == EINTR)) {
    if (r == pid_ && pid_ > 0) {
      reaped_ = true;
      duration_ms_ = now_ms() - started_at_;
      if (WIFEXITED(st)) {
        exit_code_ = WEXITSTATUS(st);
      } else if (WIFSIGNALED(st)) {
        term_signal_ = WTERMSIG(st);
      }
    }
  }
  if (state_ == command_state::running && reaped_ && streams_[0].fd < 0 && streams_[1].fd < 0) {
    state_ = command_state::done;
    // Whatever the command left behind in its group goes with it (inside a sandbox, PID 1
    // exiting does the same for every process).
    ::kill(-pid_, SIGKILL);
  }
}

void init_process::accept_host() {
  int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0)
    return;
  if (conn_.fd >= 0) {
    // A host that died has closed its end; only a live one keeps the sandbox.
    pollfd p{conn_.fd, POLLIN | POLLRDHUP, 0};
    if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR | POLLRDHUP)))
      drop(conn_, "");
  }
  if (conn_.fd >= 0) {
    connection refused;
    refused.fd = fd;
    send_error(refused, "another host is attached to this sandbox");
    drop(refused, "");
    return;
  }
  conn_.fd = fd;
  conn_.attach_deadline = now_ms() + attach_timeout_ms;
  send_hello(conn_);
}

void init_process::read_host() {
  char buf[4096];
  ssize_t n = ::recv(conn_.fd, buf, sizeof buf, 0);
  if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
    return;
  if (n <= 0) {
    drop(conn_, n < 0 ? "host connection: " + errno_text(errno) : "");
    return;
  }
  conn_.decoder.feed(buf, static_cast<size_t>(n));
  while (conn_.fd >= 0) {
    switch (conn_.decoder.next()) {
      case ferry::wire::frame_decoder::status::need_more:
        return;
      case ferry::wire::frame_decoder::status::error:
        drop(conn_, "bad frame from the host: " + conn_.decoder.error_message());
        return;
      case ferry::wire::frame_decoder::status::message:
        on_host_message(*conn_.decoder.msg());
        break;
    }
  }
}

void init_process::on_host_message(const v1::InitMessage& m) {
  auto refuse = [&](const std::string& why) {
    send_error(conn_, why);
    drop(conn_, "refused a host: " + why);
  };
  switch (m.message_type()) {
    case v1::Message::Attach: {
      const auto* a = m.message_as_Attach();
      if (conn_.attached)
        return refuse("Attach sent twice");
      if (a->protocol() != ferry::wire::socket_protocol)
        return refuse("unsupported host protocol " + std::to_string(a->protocol()));
      if (a->command_id() != args_.command_id)
        return refuse("no command " + std::to_string(a->command_id()) + " here (this sandbox runs command " +
                      std::to_string(args_.command_id) + ")");
      const uint64_t from[2] = {a->stdout_offset(), a->stderr_offset()};
      for (int s = 0; s < 2; ++s) {
        if (from[s] > streams_[s].end)
          return refuse("resume offset " + std::to_string(from[s]) + " of stream " + std::to_string(s) +
                        " is beyond its " + std::to_string(streams_[s].end) + " bytes");
      }
      for (int s = 0; s < 2; ++s) {
        const uint64_t kept_from = streams_[s].first_kept();
        conn_.cursor[s] = std::max(from[s], kept_from);
        if (from[s] < kept_from)
          conn_.gap_lost[s] = kept_from - from[s];
      }
      conn_.attached = true;
      if (state_ == command_state::not_started) {
        std::string why;
        if (!start_command(why)) {
          send_error(conn_, why);
          log_error(why);
          if (conn_.fd >= 0) {  // the last word: make sure it is written
            ::fcntl(conn_.fd, F_SETFL, ::fcntl(conn_.fd, F_GETFL) & ~O_NONBLOCK);
            flush(conn_);
          }
          std::exit(1);
        }
      }
      return;
    }
    case v1::Message::Release:
      if (!conn_.exited_sent)
        return refuse("Release before Exited");
      finished_ = true;
      return;
    default:
      return refuse("unexpected message type " + std::to_string(static_cast<int>(m.message_type())) +
                    " from the host");
  }
}

void init_process::pump(connection& c) {
  while (c.fd >= 0 && c.attached && c.out.size() < max_output_chunk) {
    if (!c.started_sent) {
      if (state_ == command_state::not_started)
        return;
      fbb_.Clear();
      auto s = v1::CreateStarted(fbb_, args_.command_id, static_cast<int32_t>(pid_),
                                 fbb_.CreateVectorOfStrings(args_.argv));
      c.started_sent = true;
      send(c, v1::Message::Started, s);
      continue;
    }
    int gap = c.gap_lost[0] ? 0 : c.gap_lost[1] ? 1 : -1;
    if (gap >= 0) {
      const uint64_t lost = *c.gap_lost[gap];
      c.gap_lost[gap].reset();
      fbb_.Clear();
      auto g = v1::CreateOutputGap(fbb_, args_.command_id, static_cast<uint8_t>(gap),
                                   c.cursor[gap] - lost, lost);
      send(c, v1::Message::OutputGap, g);
      continue;
    }
    // The stream whose next unsent byte was read first.
    int next = -1;
    uint64_t next_seq = 0;
    for (int s = 0; s < 2; ++s) {
      if (c.cursor[s] >= streams_[s].end)
        continue;
      uint64_t seq = streams_[s].chunk_at(c.cursor[s]).seq;
      if (next < 0 || seq < next_seq) {
        next = s;
        next_seq = seq;
      }
    }
    if (next >= 0) {
      const auto& ch = streams_[next].chunk_at(c.cursor[next]);
      const size_t skip = static_cast<size_t>(c.cursor[next] - ch.offset);
      const size_t n = ch.data.size() - skip;
      fbb_.Clear();
      auto bytes = fbb_.CreateVector(reinterpret_cast<const uint8_t*>(ch.data.data() + skip), n);
      auto o = v1::CreateOutput(fbb_, args_.command_id, static_cast<uint8_t>(next), bytes, c.cursor[next]);
      c.cursor[next] += n;
      send(c, v1::Message::Output, o);
      continue;
    }
    if (state_ == command_state::done && !c.exited_sent) {
      fbb_.Clear();
      auto e = v1::CreateExited(fbb_, args_.command_id, exit_code_, term_signal_, duration_ms_);
      c.exited_sent = true;
      send(c, v1::Message::Exited, e);
    }
    return;
  }
}

int init_process::run() {
  // A closed channel must show up as EPIPE so we can kill the command first.
  ::signal(SIGPIPE, SIG_IGN);
  int sig_pipe[2];
  if (::pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    log_error("pipe: " + errno_text(errno));
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

  const bool stdio_mode = args_.listen.empty();
  if (stdio_mode) {
    conn_.fd = 1;
    conn_.stdio = true;
    conn_.attached = true;
    send_hello(conn_);
    if (conn_.fd < 0)
      return 1;
    std::string why;
    if (!start_command(why)) {
      send_error(conn_, why);
      log_error(why);
      return 1;
    }
  } else {
    // The command runs as the same uid: keep it out of our memory and fds.
    ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, args_.listen.data(), args_.listen.size());
    if (listen_fd_ < 0 || ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listen_fd_, 4) != 0) {
      log_error("cannot listen on " + args_.listen + ": " + errno_text(errno));
      return 1;
    }
  }

  for (;;) {
    if (stdio_mode && conn_.fd < 0) {  // the host is gone
      if (pid_ > 0)
        ::kill(-pid_, SIGKILL);
      return 1;
    }
    pump(conn_);
    if (stdio_mode && conn_.exited_sent)
      return conn_.fd >= 0 ? 0 : 1;
    if (finished_)
      return 0;

    const uint64_t now = now_ms();
    int timeout = -1;
    auto wake_at = [&](uint64_t t) {
      int ms = t <= now ? 0 : static_cast<int>(std::min<uint64_t>(t - now, 1u << 30));
      timeout = timeout < 0 ? ms : std::min(timeout, ms);
    };
    if (!stdio_mode) {
      if (conn_.fd < 0 && !command_running()) {
        if (!idle_since_)
          idle_since_ = now;
        if (now - *idle_since_ >= args_.linger_ms) {
          log_error("no host for " + std::to_string(args_.linger_ms) + " ms while the command " +
                    (state_ == command_state::done ? "had ended" : "had not started") + "; giving up");
          if (pid_ > 0)
            ::kill(-pid_, SIGKILL);
          return exit_gave_up;
        }
        wake_at(*idle_since_ + args_.linger_ms);
      } else {
        idle_since_.reset();
      }
      if (conn_.fd >= 0 && !conn_.attached) {
        if (now >= conn_.attach_deadline) {
          drop(conn_, "the host sent no Attach in time");
          continue;
        }
        wake_at(conn_.attach_deadline);
      }
    }

    pollfd fds[6];
    int n = 0;
    fds[n++] = {sig_pipe[0], POLLIN, 0};
    int stream_slot[2] = {-1, -1};
    for (int s = 0; s < 2; ++s) {
      // Backpressure while a host is attached: at most buffer_bytes of a stream unsent.
      if (streams_[s].fd >= 0 &&
          (!conn_.attached || streams_[s].end - conn_.cursor[s] < args_.buffer_bytes)) {
        stream_slot[s] = n;
        fds[n++] = {streams_[s].fd, POLLIN, 0};
      }
    }
    int listen_slot = -1, conn_slot = -1;
    if (listen_fd_ >= 0) {
      listen_slot = n;
      fds[n++] = {listen_fd_, POLLIN, 0};
    }
    if (conn_.fd >= 0 && !conn_.stdio) {
      conn_slot = n;
      fds[n++] = {conn_.fd, static_cast<short>(POLLIN | (conn_.out.empty() ? 0 : POLLOUT)), 0};
    }
    // A stream held back by backpressure still ends the command's story when it closes; the
    // reap check below covers that. Nothing to poll at all cannot happen: sig_pipe is there.
    int r = ::poll(fds, static_cast<nfds_t>(n), timeout);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      log_error("poll: " + errno_text(errno));
      if (pid_ > 0)
        ::kill(-pid_, SIGKILL);
      return 1;
    }
    if (fds[0].revents) {
      unsigned char sigs[64];
      ssize_t got;
      while ((got = ::read(sig_pipe[0], sigs, sizeof sigs)) > 0) {
        for (ssize_t i = 0; i < got; ++i) {
          if (sigs[i] != SIGCHLD && command_running())
            ::kill(-pid_, sigs[i]);  // the group outlives the command only while it has members
        }
      }
    }
    for (int s = 0; s < 2; ++s) {
      if (stream_slot[s] >= 0 && fds[stream_slot[s]].revents)
        read_command(s);
    }
    reap_children();
    if (listen_slot >= 0 && fds[listen_slot].revents)
      accept_host();
    if (conn_slot >= 0 && conn_.fd >= 0) {
      if (fds[conn_slot].revents & POLLOUT)
        flush(conn_);
      if (conn_.fd >= 0 && (fds[conn_slot].revents & (POLLIN | POLLHUP | POLLERR)))
        read_host();
    }
  }
}

int run(int argc, char** argv) {
  ensure_std_fds();
  arguments args;
  std::string why;
  if (!parse_arguments(argc, argv, args, why)) {
    // Only stdio mode has a channel to report on before listening.
    bool listening = false;
    for (int i = 1; i < argc && std::strcmp(argv[i], "--") != 0; ++i)
      listening = listening || std::strcmp(argv[i], "--listen") == 0;
    if (listening) {
      log_error(why);
    } else {
      connection c;
      c.fd = 1;
      c.stdio = true;
      flatbuffers::FlatBufferBuilder fbb;
      auto e = v1::CreateError(fbb, fbb.CreateString(why));
      ferry::wire::append_message(c.out, fbb, v1::Message::Error, e);
      log_error(why);
      [[maybe_unused]] bool ok = write_all(1, c.out.data(), c.out.size());
    }
    return 2;
  }
  init_process p(std::move(args));
  return p.run();
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
