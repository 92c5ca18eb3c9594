#include "init_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "file_ops.h"
#include "util.h"

extern char** environ;

namespace ferry_init {
namespace {

using ferry::wire::max_output_chunk;

// From Hello to a valid Attach: a connection that has not authenticated may not hold the one
// host slot for long (a real host answers Hello within milliseconds).
constexpr uint64_t attach_timeout_ms = 2'000;
constexpr uint64_t chunk_overhead = 64;  // counted per kept chunk, so tiny writes stay bounded
constexpr size_t max_running = 64;              // commands running at once
constexpr size_t max_resume_entries = 4096;     // in one Attach
constexpr size_t max_finished_kept = 1024;      // ended commands remembered for a re-attach
constexpr size_t max_request_bytes = 512u << 10;  // argv + env + shell + cwd of one Run
constexpr size_t max_stdin_pending = 16u << 20;   // per command
constexpr size_t max_host_backlog = 1u << 20;     // frames unsent before we stop reading the host
constexpr uint64_t drain_grace_ms = 1000;  // after a kill, leftovers holding the pipes are ignored
// A pty's master never reports EOF under gVisor once the slave is closed (Linux says EIO): a
// pty command has ended this long after its process was reaped (what is readable is read first).
constexpr uint64_t pty_grace_ms = 200;
constexpr uint64_t release_reap_ms = 2000;  // on Release, how long to reap the killed processes
constexpr size_t max_message_bytes = 4096;  // of a CommandError or Error message

int signal_pipe_write = -1;

// Async-signal-safe: turns a signal into a byte the main loop polls for.
void on_posix_signal(int sig) {
  int saved = errno;
  unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = ::write(signal_pipe_write, &b, 1);
  errno = saved;
}

std::string clip(std::string s) {
  if (s.size() > max_message_bytes)
    s.resize(max_message_bytes);
  return s;
}

std::string str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

bool has_nul(const flatbuffers::String* s) { return s && std::memchr(s->data(), 0, s->size()) != nullptr; }

/// `env` with each "K=V" of `extra` replacing the entry for K (or appended).
void merge_env(std::vector<std::string>& env, const std::vector<std::string>& extra) {
  for (const auto& e : extra) {
    const std::string key = e.substr(0, e.find('=') + 1);
    auto same = std::find_if(env.begin(), env.end(), [&](const std::string& d) { return d.rfind(key, 0) == 0; });
    if (same != env.end())
      *same = e;
    else
      env.push_back(e);
  }
}

bool make_dirs(const std::string& path, mode_t mode) {
  for (size_t i = 1; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      std::string part = path.substr(0, i);
      if (::mkdir(part.c_str(), mode) != 0 && errno != EEXIST)
        return false;
    }
  }
  return true;
}

}  // namespace

const stream_buffer::chunk& stream_buffer::chunk_at(uint64_t offset) const {
  auto it = std::upper_bound(chunks.begin(), chunks.end(), offset,
                             [](uint64_t o, const chunk& c) { return o < c.offset; });
  return *(it - 1);
}

init_process::init_process(arguments args)
    : args_(std::move(args)), fbb_(max_output_chunk + 256), read_buf_(max_output_chunk) {
  for (char** e = environ; e && *e; ++e) {
    // The sandbox's egress credential goes into the proxy URLs (run()), not into commands
    // under its own name.
    if (std::strncmp(*e, egress_token_prefix, sizeof egress_token_prefix - 1) == 0)
      egress_token_ = *e + sizeof egress_token_prefix - 1;
    else
      base_env_.emplace_back(*e);
  }
}

init_process::~init_process() {
  for (auto& [id, cmd] : commands_) {
    close_fd(cmd->streams[0].fd);
    close_fd(cmd->streams[1].fd);
    close_fd(cmd->stdin_fd);
    close_fd(cmd->file_fd);
  }
  close_fd(listen_fd_);
}

// --- frames ------------------------------------------------------------------------------------

template <class T>
void init_process::send(connection& c, v1::Message type, flatbuffers::Offset<T> body) {
  if (c.fd < 0)
    return;
  ferry::wire::append_message(c.out, fbb_, type, body);
  flush(c);
}

void init_process::send_hello(connection& c) {
  fbb_.Clear();
  if (!c.stdio && !ferry::wire::random_bytes(c.nonce)) {
    drop(c, "cannot draw a nonce for a host connection (RAND_bytes failed)");
    return;
  }
  auto nonce = c.stdio ? flatbuffers::Offset<flatbuffers::Vector<uint8_t>>() : fbb_.CreateVector(c.nonce.data(), c.nonce.size());
  auto h = v1::CreateHello(fbb_, c.stdio ? ferry::wire::stdio_protocol : ferry::wire::socket_protocol,
                           static_cast<int32_t>(::getpid()), nonce);
  send(c, v1::Message::Hello, h);
}

void init_process::send_error(connection& c, const std::string& message) {
  fbb_.Clear();
  auto e = v1::CreateError(fbb_, fbb_.CreateString(clip(message)));
  send(c, v1::Message::Error, e);
}

void init_process::send_command_error(uint32_t id, v1::CommandErrorCode code, const std::string& message) {
  fbb_.Clear();
  auto e = v1::CreateCommandError(fbb_, id, code, fbb_.CreateString(clip(message)));
  send(conn_, v1::Message::CommandError, e);
}

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
  size_t off = 0;
  while (off < c.out.size()) {
    ssize_t w = ::send(c.fd, c.out.data() + off, c.out.size() - off, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        break;
      drop(c, "host connection lost: " + errno_text(errno));
      return;
    }
    off += static_cast<size_t>(w);
  }
  c.out.erase(0, off);
}

void init_process::drop(connection& c, const std::string& why) {
  if (c.fd < 0)
    return;
  if (!why.empty())
    log_error(why);
  if (!c.stdio)
    ::close(c.fd);
  const bool was_host = &c == &conn_;
  // The message being handled may point into this connection's decoder: keep its buffers alive
  // until the loop comes round again (a moved vector keeps its storage).
  retired_ = std::move(c);
  c = connection{};
  if (was_host) {
    for (auto& [id, cmd] : commands_)
      cmd->view = command_view{};
  }
}

void init_process::refuse(const std::string& why) {
  send_error(conn_, why);
  drop(conn_, "refused a host: " + why);
}

// --- commands ----------------------------------------------------------------------------------

command* init_process::find(uint32_t id) {
  auto it = commands_.find(id);
  return it == commands_.end() ? nullptr : it->second.get();
}

size_t init_process::running_count() const {
  return static_cast<size_t>(std::count_if(commands_.begin(), commands_.end(), [](const auto& kv) {
    return kv.second->state == command::phase::running;
  }));
}

std::vector<std::string> init_process::command_environment(const std::vector<std::string>& extra, bool pty) const {
  std::vector<std::string> env = base_env_;
  if (pty) {
    const bool term_given =
        std::any_of(extra.begin(), extra.end(), [](const std::string& e) { return e.rfind("TERM=", 0) == 0; });
    if (!term_given)
      merge_env(env, {"TERM=xterm-256color"});
  }
  merge_env(env, extra);
  return env;
}

bool init_process::start(command& cmd, const spawn_request& req, spawn_failure& why) {
  spawned s;
  cmd.started_at = now_ms();
  if (!spawn_command(req, s, why))
    return false;
  cmd.pid = s.pid;
  cmd.pty = req.pty;
  cmd.streams[0].fd = s.out_fd;
  cmd.streams[1].fd = s.err_fd;
  cmd.stdin_fd = s.in_fd;
  cmd.state = command::phase::running;
  pids_[s.pid] = cmd.id;
  if (cmd.stdin_fd >= 0)
    write_stdin(cmd);
  return true;
}

void init_process::read_stream(command& cmd, int stream) {
  stream_buffer& s = cmd.streams[stream];
  ssize_t n = ::read(s.fd, read_buf_.data(), read_buf_.size());
  if (n < 0 && (errno == EINTR || errno == EAGAIN))
    return;
  if (n <= 0) {  // EOF; EIO on a pty master once every slave fd is closed
    close_fd(s.fd);
    check_done(cmd);
    return;
  }
  keep_output(cmd, stream, read_buf_.data(), static_cast<size_t>(n));
}

void init_process::drain_now(command& cmd) {
  for (int st = 0; st < 2; ++st) {
    stream_buffer& s = cmd.streams[st];
    // Bounded: a leftover that keeps writing does not keep us here.
    for (int i = 0; s.fd >= 0 && i < 64; ++i) {
      pollfd p{s.fd, POLLIN, 0};
      if (::poll(&p, 1, 0) <= 0 || !(p.revents & POLLIN))
        break;
      ssize_t n = ::read(s.fd, read_buf_.data(), read_buf_.size());
      if (n <= 0)
        break;
      keep_output(cmd, st, read_buf_.data(), static_cast<size_t>(n));
    }
    close_fd(s.fd);
  }
}

void init_process::keep_output(command& cmd, int stream, const char* data, size_t n) {
  stream_buffer& s = cmd.streams[stream];
  if (cmd.file_fd >= 0)
    write_output_file(cmd, data, n);
  size_t keep = n;
  bool crossed = false;
  if (cmd.truncated) {
    keep = 0;
  } else if (cmd.output_limit > 0 && cmd.sendable_total + n > cmd.output_limit) {
    keep = static_cast<size_t>(cmd.output_limit - cmd.sendable_total);
    crossed = true;
  }
  if (keep > 0) {
    // Extend the newest chunk if nothing else was read since: fewer, larger frames, same order.
    if (!s.chunks.empty() && s.chunks.back().seq == seq_ && s.chunks.back().data.size() + keep <= max_output_chunk) {
      s.chunks.back().data.append(data, keep);
    } else {
      s.chunks.push_back({++seq_, s.end, std::string(data, keep)});
      s.kept += chunk_overhead;
    }
    s.kept += keep;
    cmd.sendable_total += keep;
  }
  s.end += n;
  if (crossed) {
    cmd.truncated = true;
    s.send_end = s.end - (n - keep);
    stream_buffer& other = cmd.streams[1 - stream];
    other.send_end = other.end;
    if (cmd.file_fd < 0 && !cmd.file_failed) {
      open_output_file(cmd);  // writes everything kept, which ends with this read's kept part
      write_output_file(cmd, data + keep, n - keep);
    }
  } else if (cmd.output_limit > 0 && !cmd.truncated && cmd.file_fd < 0 && !cmd.file_failed &&
             cmd.streams[0].kept + cmd.streams[1].kept > args_.buffer_bytes) {
    // Keeping the whole prefix in memory for the file would exceed the buffer: start the file
    // now (removed at the end if the limit is never reached), so the chunks may be evicted.
    open_output_file(cmd);
  }
  evict(cmd, stream);
}

void init_process::open_output_file(command& cmd) {
  const std::string dir = args_.workspace + "/.ferry/output";
  cmd.file_path = dir + "/" + std::to_string(cmd.id) + ".log";
  if (!make_dirs(dir, 0755)) {
    log_error("cannot create " + dir + ": " + errno_text(errno) + "; the complete output of command " +
              std::to_string(cmd.id) + " is not kept");
    cmd.file_failed = true;
    return;
  }
  cmd.file_fd = ::open(cmd.file_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (cmd.file_fd < 0) {
    log_error("cannot create " + cmd.file_path + ": " + errno_text(errno));
    cmd.file_failed = true;
    return;
  }
  // Everything so far is still kept (nothing of such a command is evicted before its file
  // exists): both streams, merged in the order read.
  size_t i[2] = {0, 0};
  for (;;) {
    int next = -1;
    for (int st = 0; st < 2; ++st) {
      const auto& chunks = cmd.streams[st].chunks;
      if (i[st] < chunks.size() && (next < 0 || chunks[i[st]].seq < cmd.streams[next].chunks[i[next]].seq))
        next = st;
    }
    if (next < 0)
      break;
    const auto& ch = cmd.streams[next].chunks[i[next]++];
    write_output_file(cmd, ch.data.data(), ch.data.size());
  }
}

void init_process::write_output_file(command& cmd, const char* data, size_t n) {
  if (cmd.file_fd < 0 || n == 0)
    return;
  if (!write_all(cmd.file_fd, data, n)) {
    log_error("writing " + cmd.file_path + ": " + errno_text(errno) + "; the complete output of command " +
              std::to_string(cmd.id) + " is not kept");
    close_fd(cmd.file_fd);
    ::unlink(cmd.file_path.c_str());
    cmd.file_failed = true;
  }
}

void init_process::write_stdin(command& cmd) {
  while (cmd.stdin_fd >= 0 && !cmd.stdin_pending.empty()) {
    ssize_t w = ::write(cmd.stdin_fd, cmd.stdin_pending.data(), cmd.stdin_pending.size());
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN)
        return;
      // The command closed its stdin (EPIPE) or it is otherwise gone: the rest is dropped.
      cmd.stdin_pending.clear();
      close_fd(cmd.stdin_fd);
      return;
    }
    cmd.stdin_pending.erase(0, static_cast<size_t>(w));
  }
  if (cmd.stdin_fd >= 0 && cmd.stdin_pending.empty() && cmd.stdin_close)
    close_fd(cmd.stdin_fd);
}

void init_process::reap_children() {
  int st;
  rusage ru{};
  pid_t r;
  while ((r = ::wait4(-1, &st, WNOHANG, &ru)) > 0 || (r < 0 && errno == EINTR)) {
    if (r < 0)
      continue;
    auto it = pids_.find(r);
    if (it == pids_.end()) {
      for (auto& [id, op] : file_ops_) {
        if (op.pid == r) {
          op.reaped = true;
          op.status = st;
          check_file_op(op);
          break;
        }
      }
      continue;  // or an orphan that PID 1 inherited
    }
    command* cmd = find(it->second);
    pids_.erase(it);
    if (!cmd)
      continue;
    cmd->reaped = true;
    cmd->usage = ru;
    cmd->duration_ms = now_ms() - cmd->started_at;
    if (WIFEXITED(st)) {
      cmd->exit_code = WEXITSTATUS(st);
    } else if (WIFSIGNALED(st)) {
      cmd->term_signal = WTERMSIG(st);
    }
    if (cmd->timed_out || cmd->host_signalled)
      cmd->drain_deadline = now_ms() + drain_grace_ms;
    else if (cmd->pty)
      cmd->drain_deadline = now_ms() + pty_grace_ms;
    check_done(*cmd);
  }
}

void init_process::check_done(command& cmd) {
  if (cmd.state == command::phase::running && cmd.reaped && cmd.streams[0].fd < 0 && cmd.streams[1].fd < 0)
    finish(cmd);
}

void init_process::finish(command& cmd) {
  cmd.state = command::phase::done;
  close_fd(cmd.stdin_fd);
  cmd.stdin_pending.clear();
  if (cmd.session_state) {
    commit_session_state(*cmd.session_state);
    busy_sessions_.erase(cmd.session);
  }
  if (cmd.file_fd >= 0) {
    close_fd(cmd.file_fd);
    if (!cmd.truncated)  // only insurance: everything was sent
      ::unlink(cmd.file_path.c_str());
  }
  if (cmd.command_line) {
    // Whatever the command line left behind in its group goes with it (protocol 2 behaviour;
    // inside a sandbox, PID 1 exiting does the same for every process).
    ::kill(-cmd.pid, SIGKILL);
  }
  cmd.finished_order = ++finished_counter_;
  finished_.push_back(cmd.id);
  retain();
}

void init_process::evict(command& cmd, int stream) {
  stream_buffer& s = cmd.streams[stream];
  // Until its output file exists, a command with an output limit keeps everything (bounded:
  // the file is started once that exceeds the buffer).
  if (cmd.output_limit > 0 && cmd.file_fd < 0 && !cmd.file_failed && !cmd.truncated)
    return;
  // Keep at least buffer_bytes: drop the oldest chunk only if what remains is still that much.
  while (!s.chunks.empty()) {
    const auto& front = s.chunks.front();
    const uint64_t front_cost = front.data.size() + chunk_overhead;
    if (s.kept - front_cost < args_.buffer_bytes)
      break;
    if (cmd.view.visible && front.end() > cmd.view.cursor[stream])
      break;  // not yet sent to the attached host (backpressure keeps this bounded)
    s.kept -= front_cost;
    s.chunks.pop_front();
  }
}

void init_process::retain() {
  // Ended commands are remembered for a host that re-attaches, within bounds: at most
  // max_finished_kept of them, and their kept output within 4 × buffer_bytes (oldest first; what
  // the attached host has not been sent yet stays).
  for (size_t i = 0; finished_.size() > max_finished_kept && i < finished_.size();) {
    const command* c = find(finished_[i]);
    if (c && c->view.visible && !c->view.exited_sent) {
      ++i;  // the attached host has not heard of its end yet
      continue;
    }
    forget(finished_[i]);
  }
  uint64_t total = 0;
  for (uint32_t id : finished_) {
    if (command* c = find(id))
      total += c->streams[0].kept + c->streams[1].kept;
  }
  const uint64_t budget = 4 * args_.buffer_bytes;
  for (size_t i = 0; i < finished_.size() && total > budget; ++i) {
    command* c = find(finished_[i]);
    if (!c)
      continue;
    for (int st = 0; st < 2 && total > budget; ++st) {
      stream_buffer& s = c->streams[st];
      while (!s.chunks.empty() && total > budget) {
        const auto& front = s.chunks.front();
        if (c->view.visible && front.end() > c->view.cursor[st])
          break;
        const uint64_t cost = front.data.size() + chunk_overhead;
        s.kept -= cost;
        total -= cost;
        s.chunks.pop_front();
      }
    }
  }
}

void init_process::forget(uint32_t id) {
  commands_.erase(id);
  finished_.erase(std::remove(finished_.begin(), finished_.end(), id), finished_.end());
}

void init_process::signal_running(int sig, bool from_host) {
  for (auto& [id, cmd] : commands_) {
    if (cmd->state != command::phase::running)
      continue;
    if (from_host)
      cmd->host_signalled = true;
    // The group outlives its leader only while it has members; the leader is not reaped yet.
    ::kill(-cmd->pid, sig);
  }
}

void init_process::kill_everything() {
  if (::getpid() == 1)
    ::kill(-1, SIGKILL);  // every process in the sandbox but PID 1
  signal_running(SIGKILL, false);
  for (auto& [id, op] : file_ops_) {
    if (!op.reaped)
      ::kill(-op.pid, SIGKILL);
  }
}

void init_process::check_deadlines(uint64_t now, int& timeout_ms) {
  auto wake_at = [&](uint64_t t) {
    int ms = t <= now ? 0 : static_cast<int>(std::min<uint64_t>(t - now, 1u << 30));
    timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
  };
  for (auto it = file_ops_.begin(); it != file_ops_.end();) {
    file_op_child& op = (it++)->second;  // check_file_op may erase it
    if (op.reaped)
      continue;
    if (now >= op.deadline && !op.timed_out) {
      op.timed_out = true;
      ::kill(-op.pid, SIGKILL);
    } else if (!op.timed_out) {
      wake_at(op.deadline);
    }
  }
  for (auto& [id, cmd] : commands_) {
    if (cmd->state != command::phase::running)
      continue;
    if (cmd->deadline > 0 && !cmd->timed_out) {
      if (now >= cmd->deadline) {
        cmd->timed_out = true;
        ::kill(-cmd->pid, SIGKILL);
        if (cmd->reaped)
          cmd->drain_deadline = now + drain_grace_ms;
      } else {
        wake_at(cmd->deadline);
      }
    }
    if (cmd->reaped && cmd->drain_deadline > 0) {
      if (now >= cmd->drain_deadline) {
        // A process that left the group (setsid) still holds the pipes (or a pty that will not
        // say EOF): take what is there and stop waiting.
        drain_now(*cmd);
        check_done(*cmd);
      } else {
        wake_at(cmd->drain_deadline);
      }
    }
  }
}

// --- host connections ----------------------------------------------------------------------------

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
  if (conn_.fd >= 0 && !conn_.attached) {
    // Not authenticated yet: whatever it is (a stray connection, a command probing the socket,
    // a host that stalled), it does not keep the sandbox from a host that can prove the key.
    send_error(conn_, "another connection arrived before this one authenticated");
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
  char buf[65536];
  ssize_t n = ::recv(conn_.fd, buf, sizeof buf, 0);
  if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
    return;
  if (n <= 0) {
    drop(conn_, n < 0 ? "host connection: " + errno_text(errno) : "");
    return;
  }
  conn_.decoder.feed(buf, static_cast<size_t>(n));
  while (conn_.fd >= 0 && !released_) {
    switch (conn_.decoder.next()) {
      case ferry::wire::frame_decoder::status::need_more:
        return;
      case ferry::wire::frame_decoder::status::error:
        refuse("bad frame from the host: " + conn_.decoder.error_message());
        return;
      case ferry::wire::frame_decoder::status::message:
        on_host_message(*conn_.decoder.msg());
        break;
    }
  }
}

void init_process::on_host_message(const v1::InitMessage& m) {
  const auto type = m.message_type();
  if (type != v1::Message::Attach && !conn_.attached)
    return refuse("message type " + std::to_string(static_cast<int>(type)) + " before Attach");
  switch (type) {
    case v1::Message::Attach:
      return on_attach(*m.message_as_Attach());
    case v1::Message::Run:
      return on_run(*m.message_as_Run());
    case v1::Message::Signal:
      return on_signal(*m.message_as_Signal());
    case v1::Message::Stdin:
      return on_stdin(*m.message_as_Stdin());
    case v1::Message::Release:
      released_ = true;
      return;
    case v1::Message::FileRequest:
      return on_file_request(*m.message_as_FileRequest(), conn_.decoder.frame());
    case v1::Message::EgressToken:
      return on_egress_token(*m.message_as_EgressToken());
    default:
      return refuse("unexpected message type " + std::to_string(static_cast<int>(type)) + " from the host");
  }
}

void init_process::set_proxy_env() {
  // With the host's credential (a JWT: base64url and dots, nothing a URL must escape) the
  // proxy knows the requests are this sandbox's; without one it answers 407.
  const std::string url = "http://" + (egress_token_.empty() ? std::string() : "ferry:" + egress_token_ + "@") +
                          "127.0.0.1:" + std::to_string(forwarder_.port());
  proxy_env_ = {"HTTP_PROXY=" + url, "HTTPS_PROXY=" + url, "http_proxy=" + url, "https_proxy=" + url,
                "NO_PROXY=localhost,127.0.0.1", "no_proxy=localhost,127.0.0.1"};
  merge_env(base_env_, proxy_env_);
}

void init_process::on_egress_token(const v1::EgressToken& t) {
  const std::string token = str(t.token());
  const bool well_formed = !token.empty() && token.size() <= 8192 &&
                           std::all_of(token.begin(), token.end(), [](char c) {
                             return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                                    c == '-' || c == '_' || c == '.';
                           });
  if (!well_formed)
    return refuse("an egress token that is not base64url and dots (at most 8 KiB)");
  if (args_.proxy_socket.empty())
    return;  // no forwarder: nothing uses it
  egress_token_ = token;
  set_proxy_env();
}

void init_process::show_to_host(command& cmd, uint64_t from_out, uint64_t from_err) {
  cmd.view = command_view{};
  cmd.view.visible = true;
  const uint64_t from[2] = {from_out, from_err};
  for (int s = 0; s < 2; ++s) {
    const uint64_t kept_from = cmd.streams[s].first_kept();
    const uint64_t sendable = cmd.streams[s].sendable_end();
    // Bytes past the truncation point are not lost: they were never to be sent.
    const uint64_t lost_until = std::min(kept_from, sendable);
    cmd.view.cursor[s] = std::max(std::min(from[s], sendable), lost_until);
    if (from[s] < lost_until)
      cmd.view.gap_lost[s] = lost_until - from[s];
  }
}

void init_process::on_attach(const v1::Attach& a) {
  if (conn_.attached)
    return refuse("Attach sent twice");
  if (a.protocol() != ferry::wire::socket_protocol)
    return refuse("unsupported host protocol " + std::to_string(a.protocol()) + " (this ferry-init speaks " +
                  std::to_string(ferry::wire::socket_protocol) + ")");
  // The host proves it knows the key over our fresh nonce; nothing in the Attach is looked at
  // before that.
  const auto host_nonce = ferry::wire::nonce_from(a.nonce() ? a.nonce()->data() : nullptr, a.nonce() ? a.nonce()->size() : 0);
  if (!host_nonce || !ferry::wire::proof_matches(ferry::wire::host_proof(args_.key, conn_.nonce, *host_nonce),
                                                 a.mac() ? a.mac()->data() : nullptr, a.mac() ? a.mac()->size() : 0))
    return refuse("authentication failed: the Attach does not prove this sandbox's key");
  const auto proof = ferry::wire::init_proof(args_.key, *host_nonce, conn_.nonce);
  if (!proof)
    return refuse("cannot compute the proof for Attached (HMAC failed)");
  std::map<uint32_t, const v1::Resume*> given;
  if (const auto* list = a.resume()) {
    if (list->size() > max_resume_entries)
      return refuse("Attach lists " + std::to_string(list->size()) + " commands (at most " +
                    std::to_string(max_resume_entries) + ")");
    for (const auto* r : *list) {
      if (!given.emplace(r->command_id(), r).second)
        return refuse("Attach lists command " + std::to_string(r->command_id()) + " twice");
      const command* cmd = find(r->command_id());
      if (!cmd)
        continue;
      const uint64_t from[2] = {r->stdout_offset(), r->stderr_offset()};
      for (int s = 0; s < 2; ++s) {
        if (from[s] > cmd->streams[s].end)
          return refuse("resume offset " + std::to_string(from[s]) + " of stream " + std::to_string(s) +
                        " of command " + std::to_string(r->command_id()) + " is beyond its " +
                        std::to_string(cmd->streams[s].end) + " bytes");
      }
    }
  }
  conn_.attached = true;
  ++host_generation_;
  std::vector<uint32_t> unknown;
  for (const auto& [id, r] : given) {
    command* cmd = find(id);
    if (!cmd) {
      unknown.push_back(id);
    } else if (r->exited() && cmd->state == command::phase::done) {
      forget(id);
    }
  }
  for (auto& [id, cmd] : commands_) {
    auto it = given.find(id);
    if (it != given.end())
      show_to_host(*cmd, it->second->stdout_offset(), it->second->stderr_offset());
    else
      show_to_host(*cmd, 0, 0);
  }
  const bool starts_command_line =
      std::any_of(commands_.begin(), commands_.end(), [](const auto& kv) { return kv.second->state == command::phase::pending; });
  fbb_.Clear();
  auto mac = fbb_.CreateVector(proof->data(), proof->size());
  auto att = v1::CreateAttached(fbb_, static_cast<uint32_t>(commands_.size()),
                                static_cast<uint32_t>(running_count() + (starts_command_line ? 1 : 0)), mac);
  send(conn_, v1::Message::Attached, att);
  for (uint32_t id : unknown)
    send_command_error(id, v1::CommandErrorCode::UnknownCommand,
                       "command " + std::to_string(id) + " is not known here (never run, or forgotten)");
  // The command line starts on the first Attach ever (after Attached: a command line that
  // cannot be executed is the sandbox's Error, not a refused attach).
  for (auto& [id, cmd] : commands_) {
    if (cmd->state != command::phase::pending)
      continue;
    spawn_request req;
    req.argv = args_.argv;
    req.env = base_env_;
    spawn_failure why;
    if (!start(*cmd, req, why)) {
      send_error(conn_, why.message);
      log_error(why.message);
      if (conn_.fd >= 0) {  // the last word: make sure it is written
        ::fcntl(conn_.fd, F_SETFL, ::fcntl(conn_.fd, F_GETFL) & ~O_NONBLOCK);
        flush(conn_);
      }
      std::exit(1);
    }
  }
}

void init_process::on_run(const v1::Run& r) {
  const uint32_t id = r.command_id();
  const std::string name = "command " + std::to_string(id);
  auto bad = [&](v1::CommandErrorCode code, const std::string& why) { send_command_error(id, code, name + ": " + why); };
  if (id == 0)
    return bad(v1::CommandErrorCode::BadRequest, "0 is not a command id");
  if (find(id))
    return bad(v1::CommandErrorCode::DuplicateId, "the id is in use");
  const bool has_argv = r.argv() && r.argv()->size() > 0;
  const bool has_shell = r.shell() && r.shell()->size() > 0;
  if (has_argv == has_shell)
    return bad(v1::CommandErrorCode::BadRequest, "give either argv or shell");
  size_t bytes = (r.shell() ? r.shell()->size() : 0) + (r.cwd() ? r.cwd()->size() : 0);
  bool nul = has_nul(r.shell()) || has_nul(r.cwd()) || has_nul(r.session());
  std::vector<std::string> argv, env;
  if (r.argv()) {
    for (const auto* a : *r.argv()) {
      nul = nul || has_nul(a);
      bytes += a ? a->size() + 1 : 1;
      argv.push_back(str(a));
    }
  }
  if (r.env()) {
    for (const auto* e : *r.env()) {
      nul = nul || has_nul(e);
      bytes += e ? e->size() + 1 : 1;
      std::string kv = str(e);
      if (kv.find('=') == std::string::npos || kv.front() == '=')
        return bad(v1::CommandErrorCode::BadRequest, "environment entry `" + kv.substr(0, 200) + "` is not K=V");
      env.push_back(std::move(kv));
    }
  }
  if (nul)
    return bad(v1::CommandErrorCode::BadRequest, "a string contains a NUL byte");
  if (bytes > max_request_bytes)
    return bad(v1::CommandErrorCode::BadRequest, "argv, env, shell and cwd exceed " + std::to_string(max_request_bytes) + " bytes");
  if (has_argv && argv[0].empty())
    return bad(v1::CommandErrorCode::BadRequest, "argv[0] is empty");
  const std::string session = str(r.session());
  if (!session.empty() && (!has_shell || !valid_session_name(session)))
    return bad(v1::CommandErrorCode::BadRequest,
               has_shell ? "bad session name `" + session.substr(0, 80) + "` (letters, digits, '-', '_'; at most 64)"
                         : "a session runs shell commands only");
  if (running_count() >= max_running)
    return bad(v1::CommandErrorCode::TooMany, std::to_string(max_running) + " commands are running");
  if (!session.empty() && busy_sessions_.count(session))
    return bad(v1::CommandErrorCode::SessionBusy, "session `" + session + "` is running another command");
  if (r.pty() && (r.rows() == 0 || r.cols() == 0))
    return bad(v1::CommandErrorCode::BadRequest, "a pty needs rows and cols");

  std::string cwd = str(r.cwd());
  if (!cwd.empty() && cwd.front() != '/')
    cwd = args_.workspace + "/" + cwd;
  if (!cwd.empty() || session.empty()) {
    if (cwd.empty())
      cwd = args_.workspace;
    struct stat st {};
    if (::stat(cwd.c_str(), &st) != 0)
      return bad(v1::CommandErrorCode::BadCwd, "working directory `" + cwd + "`: " + errno_text(errno));
    if (!S_ISDIR(st.st_mode))
      return bad(v1::CommandErrorCode::BadCwd, "working directory `" + cwd + "` is not a directory");
  }

  auto cmd = std::make_unique<command>();
  cmd->id = id;
  cmd->session = session;
  cmd->output_limit = r.output_limit_bytes();
  if (r.stdin())
    cmd->stdin_pending.assign(reinterpret_cast<const char*>(r.stdin()->data()), r.stdin()->size());
  cmd->stdin_close = r.stdin_close();
  if (cmd->stdin_close && r.pty())
    cmd->stdin_pending += '\x04';  // EOF on a terminal (at the start of a line)

  spawn_request req;
  req.pty = r.pty();
  req.rows = r.rows();
  req.cols = r.cols();
  req.null_stdin = !r.pty() && cmd->stdin_close && cmd->stdin_pending.empty();
  if (has_argv) {
    req.argv = argv;
    req.env = command_environment(env, req.pty);
    req.cwd = cwd;
    cmd->reported_argv = argv;
  } else {
    cmd->reported_argv = {args_.shell, "-c", str(r.shell())};
    if (session.empty()) {
      req.argv = cmd->reported_argv;
      req.env = command_environment(env, req.pty);
      req.cwd = cwd;
    } else {
      const std::string dir = args_.state_dir + "/sessions";
      if (!make_dirs(dir, 0700))
        return bad(v1::CommandErrorCode::ExecFailed, "cannot create " + dir + ": " + errno_text(errno));
      cmd->session_state = session_paths(dir, session, id);
      // Run.env goes into the session (exported by the wrapper); the process starts with the
      // sandbox's environment, which the saved state then overrides.
      // The proxy variables too: the saved state may hold an older egress token.
      std::vector<std::string> session_env = proxy_env_;
      merge_env(session_env, env);
      req.argv = session_argv(args_.shell, *cmd->session_state, args_.workspace, cwd, str(r.shell()), session_env);
      req.env = command_environment({}, req.pty);
      req.cwd = args_.workspace;
    }
  }
  spawn_failure why;
  if (!start(*cmd, req, why)) {
    const auto code = why.step == spawn_step::cwd ? v1::CommandErrorCode::BadCwd : v1::CommandErrorCode::ExecFailed;
    return bad(code, why.message);
  }
  if (r.timeout_ms() > 0)
    cmd->deadline = cmd->started_at + std::min<uint64_t>(r.timeout_ms(), UINT64_MAX / 4);
  if (!session.empty())
    busy_sessions_.insert(session);
  cmd->view.visible = true;
  commands_[id] = std::move(cmd);
}

void init_process::on_signal(const v1::Signal& s) {
  if (s.signal() < 1 || s.signal() > 64)
    return refuse("Signal with signal number " + std::to_string(s.signal()));
  if (s.command_id() == 0) {
    if (::getpid() == 1) {
      for (auto& [id, cmd] : commands_) {
        if (cmd->state == command::phase::running)
          cmd->host_signalled = true;
      }
      ::kill(-1, s.signal());  // every process in the sandbox but PID 1
    } else {
      signal_running(s.signal(), true);  // on a host, kill(-1) would reach far too much
    }
    return;
  }
  command* cmd = find(s.command_id());
  if (!cmd || cmd->state != command::phase::running || cmd->reaped) {
    // Not running (any more): a race with its end, nothing to do.
    return;
  }
  cmd->host_signalled = true;
  ::kill(s.group() ? -cmd->pid : cmd->pid, s.signal());
}

void init_process::on_stdin(const v1::Stdin& s) {
  command* cmd = find(s.command_id());
  if (!cmd || cmd->state != command::phase::running || cmd->stdin_fd < 0 || cmd->stdin_close)
    return;  // it ended, or its stdin is closed: the bytes have nowhere to go
  const size_t n = s.data() ? s.data()->size() : 0;
  if (cmd->stdin_pending.size() + n > max_stdin_pending)
    return refuse("more than " + std::to_string(max_stdin_pending) + " bytes of stdin wait for command " +
                  std::to_string(cmd->id));
  if (n > 0)
    cmd->stdin_pending.append(reinterpret_cast<const char*>(s.data()->data()), n);
  if (s.close()) {
    cmd->stdin_close = true;
    if (cmd->pty)
      cmd->stdin_pending += '\x04';
  }
  write_stdin(*cmd);
}

// --- file operations ------------------------------------------------------------------------------

void init_process::send_file_error(uint32_t request_id, v1::FileErrorCode code, const std::string& message) {
  conn_.out += file_error_frame(request_id, code, clip(message));
  flush(conn_);
}

void init_process::on_file_request(const v1::FileRequest& r, std::string frame) {
  const uint32_t id = r.request_id();
  if (file_ops_.count(id))
    return send_file_error(id, v1::FileErrorCode::DuplicateId, "file request " + std::to_string(id) + " is in progress");
  if (file_ops_.size() >= max_file_ops)
    return send_file_error(id, v1::FileErrorCode::TooMany, std::to_string(max_file_ops) + " file operations are in progress");
  if (r.op_type() == v1::FileOp::NONE)
    return send_file_error(id, v1::FileErrorCode::BadRequest, "file request " + std::to_string(id) + " names no operation");
  // In a child of its own (file_ops.h): the request as it came on its stdin, the answer frame on
  // its stdout. Nothing of ours but the binary: it is exec'd afresh.
  spawn_request req;
  req.argv = {args_.self, "--file-op", "--workspace", args_.workspace, "--ripgrep", args_.ripgrep};
  req.env = base_env_;
  req.null_stdin = false;
  spawned s;
  spawn_failure why;
  if (!spawn_command(req, s, why))
    return send_file_error(id, v1::FileErrorCode::Failed, "cannot start the file operation: " + why.message);
  file_op_child op;
  op.request_id = id;
  op.pid = s.pid;
  op.in_fd = s.in_fd;
  op.out_fd = s.out_fd;
  op.err_fd = s.err_fd;
  op.in_pending = std::move(frame);
  op.deadline = now_ms() + args_.file_op_timeout_ms;
  op.host_generation = host_generation_;
  auto& placed = file_ops_.emplace(id, std::move(op)).first->second;
  write_file_op(placed);
}

void init_process::write_file_op(file_op_child& op) {
  while (op.in_fd >= 0 && !op.in_pending.empty()) {
    ssize_t w = ::write(op.in_fd, op.in_pending.data(), op.in_pending.size());
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0 && errno == EAGAIN)
      return;
    if (w < 0) {
      op.in_pending.clear();  // it died: its status says so
      break;
    }
    op.in_pending.erase(0, static_cast<size_t>(w));
  }
  close_fd(op.in_fd);  // all written: end of file for the child
}

void init_process::read_file_op(file_op_child& op, int& fd, std::string& into, size_t cap) {
  char buf[65536];
  ssize_t n = ::read(fd, buf, sizeof buf);
  if (n < 0 && (errno == EINTR || errno == EAGAIN))
    return;
  if (n <= 0) {
    close_fd(fd);
    check_file_op(op);
    return;
  }
  if (into.size() + static_cast<size_t>(n) > cap) {
    if (&into == &op.out && !op.too_large) {
      op.too_large = true;  // more than a frame: it is not going to be a valid answer
      ::kill(-op.pid, SIGKILL);
    }
    return;
  }
  into.append(buf, static_cast<size_t>(n));
}

void init_process::check_file_op(file_op_child& op) {
  if (!op.reaped || op.out_fd >= 0 || op.err_fd >= 0)
    return;
  const uint32_t id = op.request_id;
  std::string answer;
  if (op.timed_out) {
    answer = file_error_frame(id, v1::FileErrorCode::Timeout,
                              "the file operation did not finish within " + std::to_string(args_.file_op_timeout_ms) +
                                  " ms and was killed");
  } else {
    ferry::wire::frame_decoder d;
    d.feed(op.out.data(), op.out.size());
    const bool one_frame = d.next() == ferry::wire::frame_decoder::status::message && d.pending() == 0;
    const auto type = one_frame ? d.msg()->message_type() : v1::Message::NONE;
    const bool ours = (type == v1::Message::FileResponse && d.msg()->message_as_FileResponse()->request_id() == id) ||
                      (type == v1::Message::FileError && d.msg()->message_as_FileError()->request_id() == id);
    if (ours && !op.too_large) {
      answer = std::move(op.out);
    } else {
      std::string how = WIFSIGNALED(op.status) ? "killed by signal " + std::to_string(WTERMSIG(op.status))
                                               : "exit status " + std::to_string(WEXITSTATUS(op.status));
      if (op.too_large)
        how = "its answer exceeded a frame";
      while (!op.err.empty() && op.err.back() == '\n')
        op.err.pop_back();
      answer = file_error_frame(id, v1::FileErrorCode::Failed,
                                "the file operation failed (" + how + ")" + (op.err.empty() ? "" : ": " + op.err));
    }
  }
  const bool same_host = conn_.fd >= 0 && conn_.attached && op.host_generation == host_generation_;
  file_ops_.erase(id);
  if (same_host) {
    conn_.out += answer;
    flush(conn_);
  }
}

void init_process::pump(connection& c) {
  while (c.fd >= 0 && c.attached && c.out.size() < max_output_chunk) {
    command* best = nullptr;
    int best_stream = -1;
    uint64_t best_seq = UINT64_MAX;
    bool sent = false;
    for (auto& [id, cmd_ptr] : commands_) {
      command& cmd = *cmd_ptr;
      command_view& v = cmd.view;
      if (!v.visible || cmd.state == command::phase::pending || v.exited_sent)
        continue;
      if (!v.started_sent) {
        fbb_.Clear();
        auto argv = fbb_.CreateVectorOfStrings(cmd.reported_argv);
        auto session = cmd.session.empty() ? flatbuffers::Offset<flatbuffers::String>() : fbb_.CreateString(cmd.session);
        auto s = v1::CreateStarted(fbb_, cmd.id, static_cast<int32_t>(cmd.pid), argv, static_cast<int32_t>(cmd.pid),
                                   session, cmd.pty);
        v.started_sent = true;
        send(c, v1::Message::Started, s);
        sent = true;
        break;
      }
      for (int st = 0; st < 2 && !sent; ++st) {
        if (!v.gap_lost[st])
          continue;
        const uint64_t lost = *v.gap_lost[st];
        v.gap_lost[st].reset();
        fbb_.Clear();
        auto g = v1::CreateOutputGap(fbb_, cmd.id, static_cast<uint8_t>(st), v.cursor[st] - lost, lost);
        send(c, v1::Message::OutputGap, g);
        sent = true;
      }
      if (sent)
        break;
      bool pending_output = false;
      for (int st = 0; st < 2; ++st) {
        const stream_buffer& s = cmd.streams[st];
        if (v.cursor[st] >= s.sendable_end())
          continue;
        pending_output = true;
        const uint64_t seq = s.chunk_at(v.cursor[st]).seq;
        if (seq < best_seq) {
          best = &cmd;
          best_stream = st;
          best_seq = seq;
        }
      }
      if (pending_output)
        continue;
      if (cmd.truncated && !v.truncated_sent) {
        fbb_.Clear();
        const std::string path = cmd.file_failed ? std::string() : cmd.file_path;
        auto t = v1::CreateOutputTruncated(fbb_, cmd.id, cmd.streams[0].send_end, cmd.streams[1].send_end,
                                           fbb_.CreateString(path));
        v.truncated_sent = true;
        send(c, v1::Message::OutputTruncated, t);
        sent = true;
        break;
      }
      if (cmd.state == command::phase::done) {
        const auto ms = [](const timeval& t) {
          return static_cast<uint64_t>(t.tv_sec) * 1000 + static_cast<uint64_t>(t.tv_usec) / 1000;
        };
        v1::ExitReason reason = v1::ExitReason::Exited;
        if (cmd.timed_out)
          reason = v1::ExitReason::Timeout;
        else if (cmd.term_signal != 0)
          reason = cmd.host_signalled ? v1::ExitReason::Killed : v1::ExitReason::Signaled;
        fbb_.Clear();
        const bool kept_file = cmd.truncated && !cmd.file_failed;
        auto path = kept_file ? fbb_.CreateString(cmd.file_path) : flatbuffers::Offset<flatbuffers::String>();
        v1::ExitedBuilder e(fbb_);
        e.add_command_id(cmd.id);
        e.add_exit_code(cmd.exit_code);
        e.add_signal(cmd.term_signal);
        e.add_duration_ms(cmd.duration_ms);
        e.add_reason(reason);
        e.add_user_cpu_ms(ms(cmd.usage.ru_utime));
        e.add_sys_cpu_ms(ms(cmd.usage.ru_stime));
        e.add_max_rss_kib(static_cast<uint64_t>(std::max<long>(cmd.usage.ru_maxrss, 0)));
        e.add_stdout_bytes(cmd.streams[0].end);
        e.add_stderr_bytes(cmd.streams[1].end);
        e.add_truncated_bytes(cmd.total_bytes() - cmd.sendable_total);
        if (kept_file)
          e.add_output_path(path);
        auto off = e.Finish();
        v.exited_sent = true;
        send(c, v1::Message::Exited, off);
        sent = true;
        break;
      }
    }
    if (sent)
      continue;
    if (!best)
      return;
    command_view& v = best->view;
    const auto& ch = best->streams[best_stream].chunk_at(v.cursor[best_stream]);
    const size_t skip = static_cast<size_t>(v.cursor[best_stream] - ch.offset);
    const size_t n = ch.data.size() - skip;
    fbb_.Clear();
    auto bytes = fbb_.CreateVector(reinterpret_cast<const uint8_t*>(ch.data.data() + skip), n);
    auto o = v1::CreateOutput(fbb_, best->id, static_cast<uint8_t>(best_stream), bytes, v.cursor[best_stream]);
    v.cursor[best_stream] += n;
    send(c, v1::Message::Output, o);
  }
}

int init_process::release() {
  kill_everything();
  if (conn_.fd >= 0 && !conn_.stdio) {
    ::shutdown(conn_.fd, SHUT_RDWR);
    ::close(conn_.fd);
    conn_.fd = -1;
  }
  // Reap what was killed (as PID 1 the sandbox ends with us anyway; on a host, leave no zombie).
  const uint64_t deadline = now_ms() + release_reap_ms;
  while (now_ms() < deadline) {
    int st;
    pid_t r = ::waitpid(-1, &st, WNOHANG);
    if (r < 0 && errno == ECHILD)
      break;
    if (r <= 0)
      ::usleep(2000);
  }
  return 0;
}

// --- the loop ------------------------------------------------------------------------------------

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
  sa.sa_handler = on_posix_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGCHLD, &sa, nullptr);
  for (int s : forwarded_signals)
    ::sigaction(s, &sa, nullptr);
  // Outside a sandbox (tests), adopt the commands' orphans as PID 1 would. Best effort.
  ::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
  if (args_.self.empty()) {
    // File operations run in children exec'd from this binary (/.ferry/init in a sandbox).
    char self[4096];
    ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    args_.self = n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string("/.ferry/init");
  }

  if (!args_.proxy_socket.empty()) {
    std::string why;
    if (!forwarder_.start(args_.proxy_port, args_.proxy_socket, why)) {
      log_error("HTTP forwarder: " + why);
      return 1;
    }
    set_proxy_env();
  }

  if (!args_.argv.empty()) {
    auto cmd = std::make_unique<command>();
    cmd->id = args_.command_id;
    cmd->command_line = true;
    cmd->reported_argv = args_.argv;
    commands_[cmd->id] = std::move(cmd);
  }

  const bool stdio_mode = args_.listen.empty();
  if (stdio_mode) {
    conn_.fd = 1;
    conn_.stdio = true;
    conn_.attached = true;
    send_hello(conn_);
    if (conn_.fd < 0)
      return 1;
    command& cmd = *commands_.begin()->second;
    spawn_request req;
    req.argv = args_.argv;
    req.env = base_env_;
    spawn_failure why;
    if (!start(cmd, req, why)) {
      send_error(conn_, why.message);
      log_error(why.message);
      return 1;
    }
    cmd.view.visible = true;
  } else {
    // main() made us non-dumpable before reading the key: the commands run as the same uid, and
    // may read neither our memory nor our fds.
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

  enum class slot_kind { signals, listener, host, stream, input, file_in, file_out, file_err };
  struct slot {
    slot_kind kind;
    uint32_t command_id = 0;
    int stream = 0;
    int fd = -1;
  };
  std::vector<pollfd> fds;
  std::vector<slot> slots;

  for (;;) {
    if (stdio_mode && conn_.fd < 0) {  // the host is gone
      kill_everything();
      return 1;
    }
    if (released_)
      return release();
    retired_ = connection{};
    const uint64_t now = now_ms();
    int timeout = -1;
    auto wake_at = [&](uint64_t t) {
      int ms = t <= now ? 0 : static_cast<int>(std::min<uint64_t>(t - now, 1u << 30));
      timeout = timeout < 0 ? ms : std::min(timeout, ms);
    };
    check_deadlines(now, timeout);  // before pump: a command it ends is reported at once
    pump(conn_);
    if (stdio_mode && commands_.begin()->second->view.exited_sent)
      return conn_.fd >= 0 ? 0 : 1;
    if (!stdio_mode) {
      if (conn_.fd < 0 && running_count() == 0) {
        if (!idle_since_)
          idle_since_ = now;
        if (now - *idle_since_ >= args_.linger_ms) {
          log_error("no host for " + std::to_string(args_.linger_ms) + " ms while no command ran; giving up");
          kill_everything();
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

    fds.clear();
    slots.clear();
    fds.push_back({sig_pipe[0], POLLIN, 0});
    slots.push_back({slot_kind::signals});
    for (auto& [id, cmd] : commands_) {
      for (int s = 0; s < 2; ++s) {
        const stream_buffer& sb = cmd->streams[s];
        if (sb.fd < 0)
          continue;
        // Backpressure while a host is attached: at most buffer_bytes of a stream unsent.
        if (cmd->view.visible && sb.sendable_end() - std::min(sb.sendable_end(), cmd->view.cursor[s]) >= args_.buffer_bytes)
          continue;
        fds.push_back({sb.fd, POLLIN, 0});
        slots.push_back({slot_kind::stream, id, s, sb.fd});
      }
      if (cmd->stdin_fd >= 0 && !cmd->stdin_pending.empty()) {
        fds.push_back({cmd->stdin_fd, POLLOUT, 0});
        slots.push_back({slot_kind::input, id, 0, cmd->stdin_fd});
      }
    }
    for (auto& [id, op] : file_ops_) {
      if (op.in_fd >= 0) {
        fds.push_back({op.in_fd, POLLOUT, 0});
        slots.push_back({slot_kind::file_in, id, 0, op.in_fd});
      }
      if (op.out_fd >= 0) {
        fds.push_back({op.out_fd, POLLIN, 0});
        slots.push_back({slot_kind::file_out, id, 0, op.out_fd});
      }
      if (op.err_fd >= 0) {
        fds.push_back({op.err_fd, POLLIN, 0});
        slots.push_back({slot_kind::file_err, id, 0, op.err_fd});
      }
    }
    if (listen_fd_ >= 0) {
      fds.push_back({listen_fd_, POLLIN, 0});
      slots.push_back({slot_kind::listener});
    }
    if (conn_.fd >= 0 && !conn_.stdio) {
      short events = conn_.out.empty() ? 0 : POLLOUT;
      if (conn_.out.size() < max_host_backlog)
        events |= POLLIN;  // a host that does not read its answers is not read either
      fds.push_back({conn_.fd, events, 0});
      slots.push_back({slot_kind::host, 0, 0, conn_.fd});
    }
    const size_t forwarder_first = fds.size();
    forwarder_.add_polls(fds);

    int r = ::poll(fds.data(), static_cast<nfds_t>(fds.size()), timeout);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      log_error("poll: " + errno_text(errno));
      kill_everything();
      return 1;
    }
    bool host_ready = false, listener_ready = false;
    short host_events = 0;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (!fds[i].revents)
        continue;
      const slot& sl = slots[i];
      switch (sl.kind) {
        case slot_kind::signals: {
          unsigned char sigs[64];
          ssize_t got;
          while ((got = ::read(sig_pipe[0], sigs, sizeof sigs)) > 0) {
            for (ssize_t k = 0; k < got; ++k) {
              if (sigs[k] != SIGCHLD)
                signal_running(sigs[k], false);
            }
          }
          break;
        }
        case slot_kind::stream: {
          command* cmd = find(sl.command_id);
          if (cmd && cmd->streams[sl.stream].fd == sl.fd)
            read_stream(*cmd, sl.stream);
          break;
        }
        case slot_kind::input: {
          command* cmd = find(sl.command_id);
          if (cmd && cmd->stdin_fd == sl.fd)
            write_stdin(*cmd);
          break;
        }
        case slot_kind::file_in:
        case slot_kind::file_out:
        case slot_kind::file_err: {
          auto it = file_ops_.find(sl.command_id);
          if (it == file_ops_.end())
            break;
          file_op_child& op = it->second;
          if (sl.kind == slot_kind::file_in && op.in_fd == sl.fd)
            write_file_op(op);
          else if (sl.kind == slot_kind::file_out && op.out_fd == sl.fd)
            read_file_op(op, op.out_fd, op.out, ferry::wire::max_frame_size + 4);
          else if (sl.kind == slot_kind::file_err && op.err_fd == sl.fd)
            read_file_op(op, op.err_fd, op.err, 4096);
          break;
        }
        case slot_kind::listener:
          listener_ready = true;
          break;
        case slot_kind::host:
          host_ready = true;
          host_events = fds[i].revents;
          break;
      }
    }
    reap_children();
    forwarder_.handle(fds, forwarder_first);
    if (host_ready && conn_.fd >= 0) {
      if (host_events & POLLOUT)
        flush(conn_);
      if (conn_.fd >= 0 && (host_events & (POLLIN | POLLHUP | POLLERR)))
        read_host();
    }
    if (listener_ready)
      accept_host();
  }
}

}  // namespace ferry_init
