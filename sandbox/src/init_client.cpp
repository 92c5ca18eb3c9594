#include "init_client.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"

namespace ferry::sandbox {

std::string_view to_string(exit_reason r) {
  switch (r) {
    case exit_reason::exited:
      return "exited";
    case exit_reason::signaled:
      return "signaled";
    case exit_reason::timeout:
      return "timeout";
    case exit_reason::killed:
      return "killed";
  }
  return "unknown";
}

namespace detail {
namespace {

namespace v1 = ferry::init::v1;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr size_t max_tracked_commands = 8192;   // a ferry-init inventing ids is a protocol error
constexpr size_t max_queued_bytes = 64u << 20;  // frames waiting to be written
constexpr size_t stdin_piece = 512u << 10;      // stdin bytes per Stdin frame

std::string errno_message(int err) { return std::generic_category().message(err); }

std::string describe(v1::Message t) {
  const char* name = v1::EnumNameMessage(t);
  return name && *name ? std::string(name) : fmt::format("message type {}", static_cast<int>(t));
}

exit_reason reason_of(v1::ExitReason r) {
  switch (r) {
    case v1::ExitReason::Signaled:
      return exit_reason::signaled;
    case v1::ExitReason::Timeout:
      return exit_reason::timeout;
    case v1::ExitReason::Killed:
      return exit_reason::killed;
    case v1::ExitReason::Exited:
      break;
  }
  return exit_reason::exited;
}

template <class T>
std::string frame_of(flatbuffers::FlatBufferBuilder& fbb, v1::Message type, flatbuffers::Offset<T> body) {
  std::string out;
  wire::append_message(out, fbb, type, body);
  return out;
}

}  // namespace

init_client::init_client(sandbox_observer& observer, std::span<const resume_point> resume,
                         std::optional<uint32_t> command_line_id)
    : observer_(observer), command_line_id_(command_line_id), resume_(resume.begin(), resume.end()),
      wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  for (const auto& r : resume_) {
    if (r.exited)
      continue;
    command_state c;
    c.state = phase::resumed;
    c.expected[0] = r.stdout_bytes;
    c.expected[1] = r.stderr_bytes;
    commands_[r.command_id] = c;
    active_.insert(r.command_id);
  }
}

// --- handshake -----------------------------------------------------------------------------------

result<void> init_client::read_message(int fd, steady::time_point deadline) {
  for (;;) {
    switch (decoder_.next()) {
      case wire::frame_decoder::status::message:
        return {};
      case wire::frame_decoder::status::error:
        return fail(decoder_.error_message());
      case wire::frame_decoder::status::need_more:
        break;
    }
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    if (left <= 0ms)
      return fail("ferry-init did not answer in time");
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno != EINTR)
      return fail(fmt::format("poll: {}", errno_message(errno)));
    if (r <= 0)
      continue;
    ssize_t n = ::recv(fd, buf_.data(), buf_.size(), 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return fail("ferry-init closed the connection");
    decoder_.feed(buf_.data(), static_cast<size_t>(n));
  }
}

result<void> init_client::handshake(int fd, const wire::handshake_key& key, steady::duration timeout) {
  if (auto r = read_message(fd, steady::now() + timeout); !r)
    return fail(fmt::format("waiting for ferry-init's Hello: {}", r.error().message));
  const v1::InitMessage& hello = *decoder_.msg();
  if (hello.message_type() == v1::Message::Error) {
    const auto* e = hello.message_as_Error();
    std::string why = e->message() ? e->message()->str() : "(no message)";
    const bool busy = why.find("another host") != std::string::npos || why.find("another connection") != std::string::npos;
    return error_info{"ferry-init refused the connection: " + why, busy ? errc::busy : errc::failed};
  }
  if (hello.message_type() != v1::Message::Hello)
    return fail(fmt::format("expected Hello, got {}", describe(hello.message_type())));
  const auto* h = hello.message_as_Hello();
  if (h->protocol() != wire::socket_protocol) {
    return fail(fmt::format("ferry-init speaks protocol {}, this host needs {}: the sandbox runs an older (or newer) "
                            "ferry-init than this ferryd; it cannot be attached (kill it, or attach from a matching ferryd)",
                            h->protocol(), wire::socket_protocol));
  }
  auto compromised = [&](std::string why) {
    peer_failed_auth_ = true;
    return fail("ferry-init failed authentication: " + why +
                " (something other than the sandbox's ferry-init answers on its control socket)");
  };
  const auto init_nonce = wire::nonce_from(h->nonce() ? h->nonce()->data() : nullptr, h->nonce() ? h->nonce()->size() : 0);
  if (!init_nonce)
    return compromised("its Hello carries no valid nonce");
  wire::handshake_nonce host_nonce{};
  if (!wire::random_bytes(host_nonce))
    return fail("cannot draw a nonce (RAND_bytes failed)");
  const auto proof = wire::host_proof(key, *init_nonce, host_nonce);
  if (!proof)
    return fail("cannot compute the handshake proof (HMAC failed)");

  flatbuffers::FlatBufferBuilder fbb;
  std::vector<flatbuffers::Offset<v1::Resume>> entries;
  for (const auto& r : resume_)
    entries.push_back(v1::CreateResume(fbb, r.command_id, r.stdout_bytes, r.stderr_bytes, r.exited));
  auto a = v1::CreateAttach(fbb, wire::socket_protocol, fbb.CreateVector(entries),
                            fbb.CreateVector(host_nonce.data(), host_nonce.size()),
                            fbb.CreateVector(proof->data(), proof->size()));
  const std::string frame = frame_of(fbb, v1::Message::Attach, a);
  for (size_t off = 0; off < frame.size();) {
    ssize_t w = ::send(fd, frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0)
      return fail(fmt::format("cannot write to ferry-init: {}", errno_message(errno)));
    off += static_cast<size_t>(w);
  }
  if (auto r = read_message(fd, steady::now() + timeout); !r)
    return fail(fmt::format("waiting for ferry-init's answer to Attach: {}", r.error().message));
  const v1::InitMessage& answer = *decoder_.msg();
  if (answer.message_type() == v1::Message::Error) {
    const auto* e = answer.message_as_Error();
    std::string why = e->message() ? e->message()->str() : std::string("(no message)");
    const bool busy = why.find("another connection") != std::string::npos;
    return error_info{"ferry-init refused the attach: " + why, busy ? errc::busy : errc::failed};
  }
  if (answer.message_type() != v1::Message::Attached)
    return compromised(fmt::format("it answered Attach with {}", describe(answer.message_type())));
  const auto* att = answer.message_as_Attached();
  if (!wire::proof_matches(wire::init_proof(key, host_nonce, *init_nonce), att->mac() ? att->mac()->data() : nullptr,
                           att->mac() ? att->mac()->size() : 0))
    return compromised("its Attached does not prove the sandbox's key");
  return {};
}

// --- requests (any thread) --------------------------------------------------------------------------

result<void> init_client::enqueue(std::string frame, bool is_release) {
  // REQUIRES: mu_ held by the caller.
  if (queue_.size() + frame.size() > max_queued_bytes)
    return error_info{"too many requests wait to be written to ferry-init", errc::busy};
  queue_ += frame;
  queued_release_ = queued_release_ || is_release;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
  return {};
}

result<void> init_client::run(const command_spec& spec) {
  if (spec.command_id == 0)
    return error_info{"command id 0 is reserved (it means every process)", errc::invalid_argument};
  if (spec.argv.empty() == spec.shell.empty())
    return error_info{fmt::format("command {}: give either argv or shell", spec.command_id), errc::invalid_argument};
  if (!spec.session.empty() && spec.shell.empty())
    return error_info{fmt::format("command {}: a session runs shell commands only", spec.command_id), errc::invalid_argument};
  for (const auto& e : spec.env) {
    if (e.find('=') == std::string::npos || e.front() == '=')
      return error_info{fmt::format("command {}: environment entry `{}` is not K=V", spec.command_id, e),
                        errc::invalid_argument};
  }
  flatbuffers::FlatBufferBuilder fbb;
  auto argv = spec.argv.empty() ? flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<flatbuffers::String>>>()
                                : fbb.CreateVectorOfStrings(spec.argv);
  auto env = spec.env.empty() ? flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<flatbuffers::String>>>()
                              : fbb.CreateVectorOfStrings(spec.env);
  auto str = [&](const std::string& s) { return s.empty() ? flatbuffers::Offset<flatbuffers::String>() : fbb.CreateString(s); };
  auto shell = str(spec.shell);
  auto session = str(spec.session);
  auto cwd = str(spec.cwd);
  auto in = spec.stdin_data.empty()
                ? flatbuffers::Offset<flatbuffers::Vector<uint8_t>>()
                : fbb.CreateVector(reinterpret_cast<const uint8_t*>(spec.stdin_data.data()), spec.stdin_data.size());
  const auto timeout_ms = static_cast<uint64_t>(std::max<int64_t>(spec.timeout.count(), 0));
  auto r = v1::CreateRun(fbb, spec.command_id, argv, shell, session, env, cwd, spec.pty, spec.rows, spec.cols,
                         timeout_ms, in, spec.close_stdin, spec.output_limit_bytes);
  std::string frame = frame_of(fbb, v1::Message::Run, r);
  if (frame.size() - 4 > wire::max_frame_size)
    return error_info{fmt::format("command {}: the request is larger than a frame ({} bytes)", spec.command_id,
                                  wire::max_frame_size),
                      errc::invalid_argument};
  std::lock_guard lock(mu_);
  if (closed_ || releasing_)
    return error_info{"the sandbox is ending", errc::closed};
  if (active_.count(spec.command_id) || (command_line_id_ && *command_line_id_ == spec.command_id))
    return error_info{fmt::format("command id {} is in use", spec.command_id), errc::conflict};
  if (auto q = enqueue(std::move(frame)); !q)
    return q;
  active_.insert(spec.command_id);
  return {};
}

result<void> init_client::signal(uint32_t command_id, int signo, bool whole_group) {
  if (signo < 1 || signo > 64)
    return error_info{fmt::format("bad signal number {}", signo), errc::invalid_argument};
  flatbuffers::FlatBufferBuilder fbb;
  std::string frame = frame_of(fbb, v1::Message::Signal, v1::CreateSignal(fbb, command_id, signo, whole_group));
  std::lock_guard lock(mu_);
  if (closed_ || releasing_)
    return error_info{"the sandbox is ending", errc::closed};
  return enqueue(std::move(frame));
}

result<void> init_client::egress_token(const std::string& token) {
  flatbuffers::FlatBufferBuilder fbb;
  std::string frame = frame_of(fbb, v1::Message::EgressToken, v1::CreateEgressToken(fbb, fbb.CreateString(token)));
  std::lock_guard lock(mu_);
  if (closed_ || releasing_)
    return error_info{"the sandbox is ending", errc::closed};
  return enqueue(std::move(frame));
}

result<void> init_client::write_stdin(uint32_t command_id, std::string_view data, bool close) {
  std::string frames;
  do {
    const std::string_view piece = data.substr(0, std::min(data.size(), stdin_piece));
    data.remove_prefix(piece.size());
    flatbuffers::FlatBufferBuilder fbb;
    auto d = fbb.CreateVector(reinterpret_cast<const uint8_t*>(piece.data()), piece.size());
    frames += frame_of(fbb, v1::Message::Stdin, v1::CreateStdin(fbb, command_id, d, close && data.empty()));
  } while (!data.empty());
  std::lock_guard lock(mu_);
  if (closed_ || releasing_)
    return error_info{"the sandbox is ending", errc::closed};
  return enqueue(std::move(frames));
}

result<void> init_client::release() {
  flatbuffers::FlatBufferBuilder fbb;
  std::string frame = frame_of(fbb, v1::Message::Release, v1::CreateRelease(fbb));
  std::lock_guard lock(mu_);
  if (closed_ || releasing_)
    return error_info{"the sandbox is already ending", errc::closed};
  releasing_ = true;
  return enqueue(std::move(frame), /*is_release=*/true);
}

void init_client::close() {
  std::lock_guard lock(mu_);
  closed_ = true;
  for (auto& [id, w] : file_ops_) {
    w->done = true;
    w->failure = error_info{"the sandbox ended before the file operation was answered", errc::closed};
  }
  file_ops_.clear();
  file_cv_.notify_all();
}

// --- file operations (any thread but the reader) -------------------------------------------------

namespace {

constexpr auto file_answer_timeout = 40s;  // ferry-init kills an operation after 30 s

errc errc_of(v1::FileErrorCode c) {
  switch (c) {
    case v1::FileErrorCode::NotFound:
      return errc::not_found;
    case v1::FileErrorCode::BadRequest:
    case v1::FileErrorCode::IsDirectory:
    case v1::FileErrorCode::NotDirectory:
    case v1::FileErrorCode::TooLarge:
    case v1::FileErrorCode::Binary:
    case v1::FileErrorCode::NoMatch:
    case v1::FileErrorCode::NotUnique:
      return errc::invalid_argument;
    case v1::FileErrorCode::DuplicateId:
      return errc::conflict;
    case v1::FileErrorCode::TooMany:
      return errc::busy;
    case v1::FileErrorCode::PermissionDenied:
    case v1::FileErrorCode::Timeout:
    case v1::FileErrorCode::Failed:
      break;
  }
  return errc::failed;
}

flatbuffers::Offset<flatbuffers::String> string_or_none(flatbuffers::FlatBufferBuilder& fbb, std::string_view s) {
  return s.empty() ? flatbuffers::Offset<flatbuffers::String>() : fbb.CreateString(s.data(), s.size());
}

std::string str_of(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

/// The reply of a FileResponse frame, if it is of type `want` (decoded afresh: aligned and
/// verified by the decoder).
template <class T>
const T* reply_of(wire::frame_decoder& d, const std::string& frame, v1::FileReply want) {
  d.feed(frame.data(), frame.size());
  if (d.next() != wire::frame_decoder::status::message || d.msg()->message_type() != v1::Message::FileResponse)
    return nullptr;
  const auto* r = d.msg()->message_as_FileResponse();
  return r->reply_type() == want ? static_cast<const T*>(r->reply()) : nullptr;
}

error_info wrong_reply(std::string_view op) {
  return error_info{fmt::format("ferry-init answered {} with another operation's result", op), errc::failed};
}

}  // namespace

result<std::string> init_client::file_request(const std::function<file_op_body(flatbuffers::FlatBufferBuilder&)>& build) {
  auto waiter = std::make_shared<file_waiter>();
  uint32_t id;
  {
    std::lock_guard lock(mu_);
    if (closed_ || releasing_)
      return error_info{"the sandbox is ending", errc::closed};
    id = next_request_id_++;
    if (next_request_id_ == 0)
      next_request_id_ = 1;
  }
  flatbuffers::FlatBufferBuilder fbb;
  const file_op_body body = build(fbb);
  std::string frame = frame_of(fbb, v1::Message::FileRequest, v1::CreateFileRequest(fbb, id, body.type, body.offset));
  if (frame.size() - 4 > wire::max_frame_size)
    return error_info{fmt::format("the file request is larger than a frame ({} bytes)", wire::max_frame_size),
                      errc::invalid_argument};
  std::unique_lock lock(mu_);
  if (closed_ || releasing_)
    return error_info{"the sandbox is ending", errc::closed};
  if (auto q = enqueue(std::move(frame)); !q)
    return q.error();
  file_ops_[id] = waiter;
  if (!file_cv_.wait_for(lock, file_answer_timeout, [&] { return waiter->done; })) {
    file_ops_.erase(id);
    return error_info{fmt::format("ferry-init did not answer file request {} within {} s", id,
                                  std::chrono::duration_cast<std::chrono::seconds>(file_answer_timeout).count()),
                      errc::failed};
  }
  if (waiter->failure)
    return *waiter->failure;
  // A FileError becomes the error; a FileResponse is returned for the caller to read.
  wire::frame_decoder d;
  d.feed(waiter->frame.data(), waiter->frame.size());
  if (d.next() == wire::frame_decoder::status::message && d.msg()->message_type() == v1::Message::FileError) {
    const auto* e = d.msg()->message_as_FileError();
    return error_info{e->message() ? e->message()->str() : std::string("file operation failed"), errc_of(e->code())};
  }
  return std::move(waiter->frame);
}

void init_client::file_answer(uint32_t request_id, std::string frame) {
  // REQUIRES: reader thread.
  std::lock_guard lock(mu_);
  auto it = file_ops_.find(request_id);
  if (it == file_ops_.end()) {
    // Not asked for, or its caller gave up waiting (a timeout): ferry-init may answer late.
    if (request_id == 0 || request_id >= next_request_id_)
      violation(fmt::format("file answer for request {}, which was never made", request_id));
    return;
  }
  it->second->done = true;
  it->second->frame = std::move(frame);
  file_ops_.erase(it);
  file_cv_.notify_all();
}

template <class Reply, class Out>
result<Out> init_client::file_call(v1::FileOp op, v1::FileReply want,
                                   const std::function<flatbuffers::Offset<void>(flatbuffers::FlatBufferBuilder&)>& build,
                                   const std::function<Out(const Reply&)>& convert) {
  auto answer = file_request([&](flatbuffers::FlatBufferBuilder& fbb) { return file_op_body{op, build(fbb)}; });
  if (!answer)
    return answer.error();
  wire::frame_decoder d;
  const auto* r = reply_of<Reply>(d, *answer, want);
  if (!r)
    return wrong_reply(v1::EnumNameFileOp(op));
  return convert(*r);
}

result<file_text> init_client::read_file(const std::string& path, const read_options& o) {
  return file_call<v1::ReadResult, file_text>(
      v1::FileOp::ReadFile, v1::FileReply::ReadResult,
      [&](flatbuffers::FlatBufferBuilder& fbb) {
        return v1::CreateReadFile(fbb, string_or_none(fbb, path), o.offset, o.limit, o.max_bytes).Union();
      },
      [](const v1::ReadResult& r) {
        return file_text{str_of(r.path()), str_of(r.content()), r.first_line(), r.lines(), r.truncated(), r.more(),
                         r.next_line(), r.size()};
      });
}

result<file_written> init_client::write_file(const std::string& path, std::string_view content, uint32_t mode) {
  return file_call<v1::WriteResult, file_written>(
      v1::FileOp::WriteFile, v1::FileReply::WriteResult,
      [&](flatbuffers::FlatBufferBuilder& fbb) {
        auto bytes = fbb.CreateVector(reinterpret_cast<const uint8_t*>(content.data()), content.size());
        return v1::CreateWriteFile(fbb, string_or_none(fbb, path), bytes, mode).Union();
      },
      [](const v1::WriteResult& r) { return file_written{str_of(r.path()), r.bytes(), r.created()}; });
}

result<file_edited> init_client::edit_file(const std::string& path, std::string_view old_string,
                                           std::string_view new_string, bool replace_all) {
  return file_call<v1::EditResult, file_edited>(
      v1::FileOp::EditFile, v1::FileReply::EditResult,
      [&](flatbuffers::FlatBufferBuilder& fbb) {
        auto p = string_or_none(fbb, path);
        auto o = fbb.CreateString(old_string.data(), old_string.size());
        auto n = fbb.CreateString(new_string.data(), new_string.size());
        return v1::CreateEditFile(fbb, p, o, n, replace_all).Union();
      },
      [](const v1::EditResult& r) { return file_edited{str_of(r.path()), r.replacements(), r.bytes()}; });
}

result<dir_listing> init_client::list_dir(const std::string& path, uint32_t max_entries) {
  return file_call<v1::ListResult, dir_listing>(
      v1::FileOp::ListDir, v1::FileReply::ListResult,
      [&](flatbuffers::FlatBufferBuilder& fbb) { return v1::CreateListDir(fbb, string_or_none(fbb, path), max_entries).Union(); },
      [](const v1::ListResult& r) {
        dir_listing l{str_of(r.path()), {}, r.total(), r.truncated()};
        if (r.entries()) {
          for (const auto* e : *r.entries()) {
            file_type t = file_type::other;
            switch (e->type()) {
              case v1::FileType::File:
                t = file_type::file;
                break;
              case v1::FileType::Directory:
                t = file_type::directory;
                break;
              case v1::FileType::Symlink:
                t = file_type::symlink;
                break;
              case v1::FileType::Other:
                break;
            }
            l.entries.push_back({str_of(e->name()), t, e->size()});
          }
        }
        return l;
      });
}

result<glob_matches> init_client::glob(const std::string& pattern, const glob_options& o) {
  return file_call<v1::GlobResult, glob_matches>(
      v1::FileOp::GlobFiles, v1::FileReply::GlobResult,
      [&](flatbuffers::FlatBufferBuilder& fbb) {
        return v1::CreateGlobFiles(fbb, string_or_none(fbb, pattern), string_or_none(fbb, o.path), o.max_results,
                                   o.include_git)
            .Union();
      },
      [](const v1::GlobResult& r) {
        glob_matches g{str_of(r.path()), {}, r.truncated()};
        if (r.matches()) {
          for (const auto* m : *r.matches())
            g.matches.push_back(str_of(m));
        }
        return g;
      });
}

result<grep_matches> init_client::grep(const std::string& pattern, const grep_options& o) {
  return file_call<v1::GrepResult, grep_matches>(
      v1::FileOp::GrepFiles, v1::FileReply::GrepResult,
      [&](flatbuffers::FlatBufferBuilder& fbb) {
        return v1::CreateGrepFiles(fbb, string_or_none(fbb, pattern), string_or_none(fbb, o.path),
                                   string_or_none(fbb, o.glob), o.ignore_case, o.context, o.max_matches)
            .Union();
      },
      [](const v1::GrepResult& r) {
        grep_matches g{str_of(r.path()), {}, r.matches(), r.files(), r.truncated(), str_of(r.engine())};
        if (r.lines()) {
          for (const auto* l : *r.lines())
            g.lines.push_back({str_of(l->path()), l->line(), str_of(l->text()), l->match()});
        }
        return g;
      });
}

// --- reader thread ----------------------------------------------------------------------------------

bool init_client::write_pending(int fd) {
  while (!writing_.empty()) {
    ssize_t w = ::send(fd, writing_.data(), writing_.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return true;
      violation(fmt::format("cannot write to ferry-init: {}", errno_message(errno)));
      return false;
    }
    writing_.erase(0, static_cast<size_t>(w));
  }
  if (writing_release_) {
    release_sent_ = true;
    writing_release_ = false;
  }
  return true;
}

void init_client::serve(int fd, const std::function<bool()>& stop) {
  observer_.on_running();
  drain();
  while (!protocol_error_ && !init_error_ && !stop()) {
    if (writing_.empty()) {
      std::lock_guard lock(mu_);
      writing_.swap(queue_);
      writing_release_ = queued_release_;
      queued_release_ = false;
    }
    pollfd p[2] = {{fd, static_cast<short>(POLLIN | (writing_.empty() ? 0 : POLLOUT)), 0}, {wake_.get(), POLLIN, 0}};
    int r = ::poll(p, 2, 1000);
    if (r < 0 && errno != EINTR) {
      violation(fmt::format("poll on the control socket: {}", errno_message(errno)));
      return;
    }
    if (r <= 0)
      continue;
    if (p[1].revents) {
      uint64_t v;
      [[maybe_unused]] ssize_t n = ::read(wake_.get(), &v, sizeof v);
    }
    if ((p[0].revents & POLLOUT) && !write_pending(fd)) {
      if (stop())
        protocol_error_.reset();  // kill() or detach() shut the socket down: not ferry-init's doing
      return;
    }
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::recv(fd, buf_.data(), buf_.size(), MSG_DONTWAIT);
      if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
        continue;
      if (n <= 0)
        return;  // ferry-init ended (after Release, an Error, or the sandbox died), or kill/detach
      decoder_.feed(buf_.data(), static_cast<size_t>(n));
      drain();
    }
  }
}

void init_client::drain() {
  while (!protocol_error_ && !init_error_) {
    switch (decoder_.next()) {
      case wire::frame_decoder::status::need_more:
        return;
      case wire::frame_decoder::status::error:
        violation(decoder_.error_message());
        return;
      case wire::frame_decoder::status::message:
        dispatch(*decoder_.msg());
    }
  }
}

void init_client::violation(std::string why) {
  if (!protocol_error_)
    protocol_error_ = std::move(why);
}

bool init_client::check(bool ok, std::string_view what) {
  if (!ok)
    violation(std::string(what));
  return ok;
}

init_client::command_state* init_client::running(uint32_t id, std::string_view what) {
  auto it = commands_.find(id);
  if (it == commands_.end() || it->second.state != phase::running) {
    violation(fmt::format("{} for command {}, which is not running", what, id));
    return nullptr;
  }
  return &it->second;
}

void init_client::dispatch(const v1::InitMessage& m) {
  switch (m.message_type()) {
    case v1::Message::Started: {
      const auto* s = m.message_as_Started();
      const uint32_t id = s->command_id();
      auto it = commands_.find(id);
      if (!check(it == commands_.end() || it->second.state == phase::resumed,
                 [&] { return fmt::format("Started twice for command {}", id); }))
        return;
      if (it == commands_.end()) {
        if (!check(commands_.size() < max_tracked_commands, "more commands than a host tracks"))
          return;
        it = commands_.emplace(id, command_state{}).first;
        std::lock_guard lock(mu_);
        active_.insert(id);
      }
      it->second.state = phase::running;
      std::vector<std::string> argv;
      if (s->argv()) {
        for (const auto* a : *s->argv())
          argv.emplace_back(a ? a->str() : std::string());
      }
      observer_.on_command_started(id, argv);
      return;
    }
    case v1::Message::Output: {
      const auto* o = m.message_as_Output();
      command_state* c = running(o->command_id(), "Output");
      if (!c || !check(o->stream() <= 1, [&] { return fmt::format("Output on unknown stream {}", o->stream()); }) ||
          !check(!c->truncated,
                 [&] { return fmt::format("Output for command {} after OutputTruncated", o->command_id()); }) ||
          !check(o->offset() == c->expected[o->stream()], [&] {
            return fmt::format("Output of stream {} at offset {}, expected {}", o->stream(), o->offset(),
                               c->expected[o->stream()]);
          }))
        return;
      std::string_view data;
      if (o->data())
        data = {reinterpret_cast<const char*>(o->data()->data()), o->data()->size()};
      c->expected[o->stream()] += data.size();
      observer_.on_output(o->command_id(), o->stream(), data);
      return;
    }
    case v1::Message::OutputGap: {
      const auto* g = m.message_as_OutputGap();
      command_state* c = running(g->command_id(), "OutputGap");
      if (!c || !check(g->stream() <= 1, [&] { return fmt::format("OutputGap on unknown stream {}", g->stream()); }) ||
          !check(g->offset() == c->expected[g->stream()] && g->lost_bytes() > 0 &&
                     g->lost_bytes() <= UINT64_MAX - c->expected[g->stream()],
                 [&] {
                   return fmt::format("OutputGap of stream {} at offset {} (+{}), expected offset {}", g->stream(),
                                      g->offset(), g->lost_bytes(), c->expected[g->stream()]);
                 }))
        return;
      c->expected[g->stream()] += g->lost_bytes();
      observer_.on_output_gap(g->command_id(), g->stream(), g->lost_bytes());
      return;
    }
    case v1::Message::OutputTruncated: {
      const auto* t = m.message_as_OutputTruncated();
      command_state* c = running(t->command_id(), "OutputTruncated");
      if (!c ||
          !check(!c->truncated, [&] { return fmt::format("OutputTruncated twice for command {}", t->command_id()); }) ||
          !check(t->stdout_offset() == c->expected[0] && t->stderr_offset() == c->expected[1], [&] {
            return fmt::format("OutputTruncated at offsets {}/{}, expected {}/{}", t->stdout_offset(),
                               t->stderr_offset(), c->expected[0], c->expected[1]);
          }))
        return;
      c->truncated = true;
      observer_.on_output_truncated(t->command_id(), t->path() ? t->path()->string_view() : std::string_view());
      return;
    }
    case v1::Message::Exited: {
      const auto* e = m.message_as_Exited();
      if (!running(e->command_id(), "Exited"))
        return;
      commands_.erase(e->command_id());
      {
        std::lock_guard lock(mu_);
        active_.erase(e->command_id());
      }
      command_exit x;
      x.command_id = e->command_id();
      x.reason = reason_of(e->reason());
      x.exit_code = e->exit_code();
      x.signal = e->signal();
      x.duration_ms = e->duration_ms();
      x.user_cpu_ms = e->user_cpu_ms();
      x.sys_cpu_ms = e->sys_cpu_ms();
      x.max_rss_kib = e->max_rss_kib();
      x.stdout_bytes = e->stdout_bytes();
      x.stderr_bytes = e->stderr_bytes();
      x.truncated_bytes = e->truncated_bytes();
      if (e->output_path())
        x.output_path = e->output_path()->str();
      observer_.on_command_ended(x);
      if (command_line_id_ && *command_line_id_ == x.command_id) {
        // The sandbox ends with its command line: reported, so ferry-init may end.
        command_line_exited_ = true;
        flatbuffers::FlatBufferBuilder fbb;
        std::string frame = frame_of(fbb, v1::Message::Release, v1::CreateRelease(fbb));
        std::lock_guard lock(mu_);
        if (!releasing_) {
          releasing_ = true;
          (void)enqueue(std::move(frame), /*is_release=*/true);
        }
      }
      return;
    }
    case v1::Message::CommandError: {
      const auto* e = m.message_as_CommandError();
      const uint32_t id = e->command_id();
      auto it = commands_.find(id);
      bool requested;
      {
        std::lock_guard lock(mu_);
        requested = active_.count(id) > 0;
      }
      // Only for a Run not yet started, or a resume point the sandbox does not know.
      if (!check(requested && (it == commands_.end() || it->second.state == phase::resumed), [&] {
            return fmt::format("CommandError for command {}, which was not asked for or is running", id);
          }))
        return;
      if (it != commands_.end())
        commands_.erase(it);
      {
        std::lock_guard lock(mu_);
        active_.erase(id);
      }
      observer_.on_command_failed(id, e->message() ? e->message()->string_view() : std::string_view("(no message)"));
      return;
    }
    case v1::Message::Error: {
      const auto* e = m.message_as_Error();
      init_error_ = e->message() ? e->message()->str() : std::string("(no message)");
      return;
    }
    case v1::Message::FileResponse:
      file_answer(m.message_as_FileResponse()->request_id(), decoder_.frame());
      return;
    case v1::Message::FileError:
      file_answer(m.message_as_FileError()->request_id(), decoder_.frame());
      return;
    case v1::Message::Hello:
    case v1::Message::Attached:
      violation(fmt::format("{} after the handshake", describe(m.message_type())));
      return;
    case v1::Message::Attach:
    case v1::Message::Release:
    case v1::Message::Run:
    case v1::Message::Signal:
    case v1::Message::Stdin:
    case v1::Message::FileRequest:
    case v1::Message::EgressToken:
      violation(fmt::format("host message {} from ferry-init", describe(m.message_type())));
      return;
    case v1::Message::NONE:
      break;
  }
  violation(fmt::format("unknown message type {}", static_cast<int>(m.message_type())));
}

}  // namespace detail
}  // namespace ferry::sandbox
