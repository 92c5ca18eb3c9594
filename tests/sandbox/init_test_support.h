#pragma once
// Helpers for the tests that talk to ferry-init directly on the host (init_protocol_test,
// init_process_api_test): decoded messages flattened for comparison, ferry-init in socket mode
// in a temp dir, a test host that attaches, runs commands and collects each command's story
// (checking the protocol's per-command order and stream offsets as it goes), and frame builders.

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>
#include <flatbuffers/flatbuffers.h>

#include "ferry/sandbox/process.h"
#include "ferry/schemas/frame.h"
#include "ferry/schemas/handshake.h"
#include "test_support.h"

namespace ferry::sandbox::testing {

namespace v1 = ferry::init::v1;
using ferry::wire::frame_decoder;

/// One decoded message, flattened for comparison.
struct event {
  v1::Message type = v1::Message::NONE;
  uint32_t command_id = 0;
  int32_t pid = 0, pgid = 0;
  int stream = -1;
  std::string data;  // Output data, Error / CommandError message, OutputTruncated / Exited path,
                     // Hello's nonce, Attached's mac
  std::vector<std::string> argv;
  std::string session;
  bool pty = false;
  int32_t exit_code = 0, signal = 0;
  uint64_t duration_ms = 0;
  v1::ExitReason reason = v1::ExitReason::Exited;
  uint64_t user_cpu_ms = 0, sys_cpu_ms = 0, max_rss_kib = 0;
  uint64_t stdout_bytes = 0, stderr_bytes = 0, truncated_bytes = 0;
  uint64_t offset = 0, lost_bytes = 0;          // Output, OutputGap
  uint64_t stdout_offset = 0, stderr_offset = 0;  // OutputTruncated
  v1::CommandErrorCode code = v1::CommandErrorCode::BadRequest;
  uint32_t commands = 0, running = 0;  // Attached
  uint16_t protocol = 0;               // Hello
};

inline std::string str_of(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

inline event flatten(const v1::InitMessage& m) {
  event e;
  e.type = m.message_type();
  switch (e.type) {
    case v1::Message::Hello:
      e.pid = m.message_as_Hello()->pid();
      e.protocol = m.message_as_Hello()->protocol();
      if (const auto* n = m.message_as_Hello()->nonce())
        e.data.assign(reinterpret_cast<const char*>(n->data()), n->size());
      break;
    case v1::Message::Started: {
      auto* s = m.message_as_Started();
      e.command_id = s->command_id();
      e.pid = s->pid();
      e.pgid = s->pgid();
      e.session = str_of(s->session());
      e.pty = s->pty();
      if (s->argv())
        for (auto* a : *s->argv())
          e.argv.push_back(a->str());
      break;
    }
    case v1::Message::Output: {
      auto* o = m.message_as_Output();
      e.command_id = o->command_id();
      e.stream = o->stream();
      if (o->data())
        e.data.assign(reinterpret_cast<const char*>(o->data()->data()), o->data()->size());
      e.offset = o->offset();
      break;
    }
    case v1::Message::Exited: {
      auto* x = m.message_as_Exited();
      e.command_id = x->command_id();
      e.exit_code = x->exit_code();
      e.signal = x->signal();
      e.duration_ms = x->duration_ms();
      e.reason = x->reason();
      e.user_cpu_ms = x->user_cpu_ms();
      e.sys_cpu_ms = x->sys_cpu_ms();
      e.max_rss_kib = x->max_rss_kib();
      e.stdout_bytes = x->stdout_bytes();
      e.stderr_bytes = x->stderr_bytes();
      e.truncated_bytes = x->truncated_bytes();
      e.data = str_of(x->output_path());
      break;
    }
    case v1::Message::Error:
      e.data = str_of(m.message_as_Error()->message());
      break;
    case v1::Message::OutputGap: {
      auto* g = m.message_as_OutputGap();
      e.command_id = g->command_id();
      e.stream = g->stream();
      e.offset = g->offset();
      e.lost_bytes = g->lost_bytes();
      break;
    }
    case v1::Message::Attached:
      e.commands = m.message_as_Attached()->commands();
      e.running = m.message_as_Attached()->running();
      if (const auto* mac = m.message_as_Attached()->mac())
        e.data.assign(reinterpret_cast<const char*>(mac->data()), mac->size());
      break;
    case v1::Message::CommandError: {
      auto* c = m.message_as_CommandError();
      e.command_id = c->command_id();
      e.code = c->code();
      e.data = str_of(c->message());
      break;
    }
    case v1::Message::FileError: {
      auto* f = m.message_as_FileError();
      e.command_id = f->request_id();
      e.data = str_of(f->message());
      break;
    }
    case v1::Message::OutputTruncated: {
      auto* t = m.message_as_OutputTruncated();
      e.command_id = t->command_id();
      e.stdout_offset = t->stdout_offset();
      e.stderr_offset = t->stderr_offset();
      e.data = str_of(t->path());
      break;
    }
    default:  // NONE, and the host's messages
      break;
  }
  return e;
}

inline spawn_options init_options(std::vector<std::string> args) {
  spawn_options o;
  o.argv = {FERRY_INIT_BINARY};
  o.argv.insert(o.argv.end(), args.begin(), args.end());
  o.out = stdio::pipe;
  return o;
}

// --- frames a host sends -------------------------------------------------------------------------

template <class T>
std::string frame(flatbuffers::FlatBufferBuilder& fbb, v1::Message type, flatbuffers::Offset<T> body) {
  std::string out;
  ferry::wire::append_message(out, fbb, type, body);
  return out;
}

struct resume_entry {
  uint32_t command_id = 0;
  uint64_t out = 0, err = 0;
  bool exited = false;
};

/// An Attach with the given nonce and proof (none: an Attach that proves nothing). Tests that
/// attach for real use init_connection::attach_frame.
inline std::string raw_attach_frame(std::vector<resume_entry> resume = {}, uint16_t protocol = ferry::wire::socket_protocol,
                                    std::optional<std::string> nonce = std::nullopt,
                                    std::optional<std::string> mac = std::nullopt) {
  flatbuffers::FlatBufferBuilder fbb;
  std::vector<flatbuffers::Offset<v1::Resume>> entries;
  for (const auto& r : resume)
    entries.push_back(v1::CreateResume(fbb, r.command_id, r.out, r.err, r.exited));
  auto bytes = [&](const std::optional<std::string>& b) {
    return b ? fbb.CreateVector(reinterpret_cast<const uint8_t*>(b->data()), b->size())
             : flatbuffers::Offset<flatbuffers::Vector<uint8_t>>();
  };
  auto n = bytes(nonce);
  auto m = bytes(mac);
  auto a = v1::CreateAttach(fbb, protocol, fbb.CreateVector(entries), n, m);
  return frame(fbb, v1::Message::Attach, a);
}

inline std::string bytes_of(const std::array<uint8_t, 32>& a) { return std::string(reinterpret_cast<const char*>(a.data()), a.size()); }
inline std::array<uint8_t, 32> array_of(const std::string& s) {
  std::array<uint8_t, 32> a{};
  std::memcpy(a.data(), s.data(), std::min(s.size(), a.size()));
  return a;
}

/// A fresh random key, as a host draws one per sandbox.
inline ferry::wire::handshake_key random_key() {
  ferry::wire::handshake_key k{};
  BOOST_REQUIRE(ferry::wire::random_bytes(k));
  return k;
}

/// The protocol-2 Attach (command id and offsets in the Attach itself), as an old host sends it.
inline std::string protocol2_attach_frame(uint32_t command_id = 1) {
  flatbuffers::FlatBufferBuilder fbb;
  v1::AttachBuilder b(fbb);
  b.add_protocol(2);
  fbb.AddElement<uint32_t>(6, command_id, 0);  // the deprecated command_id field (slot 1)
  return frame(fbb, v1::Message::Attach, b.Finish());
}

inline std::string release_frame() {
  flatbuffers::FlatBufferBuilder fbb;
  return frame(fbb, v1::Message::Release, v1::CreateRelease(fbb));
}

/// What to run (mirrors the Run table; defaults as in the schema).
struct run_request {
  uint32_t command_id = 0;
  std::vector<std::string> argv;
  std::string shell;
  std::string session;
  std::vector<std::string> env;
  std::string cwd;
  bool pty = false;
  uint16_t rows = 24, cols = 80;
  uint64_t timeout_ms = 0;
  std::string stdin_data;
  bool stdin_close = true;
  uint64_t output_limit_bytes = 1u << 20;
};

inline std::string run_frame(const run_request& r) {
  flatbuffers::FlatBufferBuilder fbb;
  auto argv = r.argv.empty() ? 0 : fbb.CreateVectorOfStrings(r.argv);
  auto env = r.env.empty() ? 0 : fbb.CreateVectorOfStrings(r.env);
  auto shell = r.shell.empty() ? 0 : fbb.CreateString(r.shell);
  auto session = r.session.empty() ? 0 : fbb.CreateString(r.session);
  auto cwd = r.cwd.empty() ? 0 : fbb.CreateString(r.cwd);
  auto in = r.stdin_data.empty() ? 0 : fbb.CreateVector(reinterpret_cast<const uint8_t*>(r.stdin_data.data()), r.stdin_data.size());
  auto run = v1::CreateRun(fbb, r.command_id, argv, shell, session, env, cwd, r.pty, r.rows, r.cols, r.timeout_ms, in,
                           r.stdin_close, r.output_limit_bytes);
  return frame(fbb, v1::Message::Run, run);
}

inline std::string signal_frame(uint32_t command_id, int signo, bool group = true) {
  flatbuffers::FlatBufferBuilder fbb;
  return frame(fbb, v1::Message::Signal, v1::CreateSignal(fbb, command_id, signo, group));
}

inline std::string stdin_frame(uint32_t command_id, const std::string& data, bool close) {
  flatbuffers::FlatBufferBuilder fbb;
  auto d = fbb.CreateVector(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  return frame(fbb, v1::Message::Stdin, v1::CreateStdin(fbb, command_id, d, close));
}

inline std::string le32(uint32_t n) {
  return {static_cast<char>(n), static_cast<char>(n >> 8), static_cast<char>(n >> 16), static_cast<char>(n >> 24)};
}

// --- ferry-init in socket mode, and a test host ------------------------------------------------------

/// What one command did, as a host saw it.
struct command_story {
  std::optional<event> started;
  std::string out[2];
  uint64_t at[2] = {0, 0};  // next expected offset per stream
  uint64_t lost[2] = {0, 0};
  std::optional<event> truncated;
  std::optional<event> exited;
  std::optional<event> error;  // CommandError
  size_t outputs = 0;
  bool over() const { return exited.has_value() || error.has_value(); }
};

/// A connection to ferry-init (closed by the destructor).
struct init_connection {
  int fd = -1;
  frame_decoder decoder;
  std::map<uint32_t, command_story> stories;
  std::vector<event> events;  // everything received, in order
  std::map<uint32_t, std::string> file_answers;  // FileResponse / FileError frames by request id
  bool keep_output = true;    // false: Output is counted (offsets checked), its bytes not kept
  ferry::wire::handshake_key key{};           // the sandbox's key (the listening_init's)
  std::optional<std::string> hello_nonce;     // from ferry-init's Hello
  ferry::wire::handshake_nonce host_nonce{};  // sent in our Attach

  explicit init_connection(int f) : fd(f) {}

  /// An Attach that proves `key` over this connection's Hello nonce (REQUIRES: Hello received).
  std::string attach_frame(std::vector<resume_entry> resume = {}, uint16_t protocol = ferry::wire::socket_protocol) {
    BOOST_REQUIRE_MESSAGE(hello_nonce, "Attach before Hello");
    BOOST_REQUIRE(ferry::wire::random_bytes(host_nonce));
    auto mac = ferry::wire::host_proof(key, array_of(*hello_nonce), host_nonce);
    BOOST_REQUIRE(mac);
    return raw_attach_frame(std::move(resume), protocol, bytes_of(host_nonce), bytes_of(*mac));
  }
  /// Whether an Attached carries ferry-init's proof of the key for this connection.
  bool proves_key(const event& attached) const {
    return hello_nonce && ferry::wire::proof_matches(
                              ferry::wire::init_proof(key, host_nonce, array_of(*hello_nonce)),
                              reinterpret_cast<const uint8_t*>(attached.data.data()), attached.data.size());
  }
  init_connection(const init_connection&) = delete;
  ~init_connection() {
    if (fd >= 0)
      ::close(fd);
  }

  void send(const std::string& bytes) const {
    ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    BOOST_REQUIRE_MESSAGE(n == static_cast<ssize_t>(bytes.size()),
                          "send of " << bytes.size() << " bytes: " << n << " (" << std::strerror(errno) << ")");
  }
  /// Sends without requiring success (the peer may have closed on us).
  bool try_send(const std::string& bytes) const {
    return ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
  }

  /// The next message; nullopt at EOF or on timeout (a failed check says which unless quiet).
  std::optional<event> next(std::chrono::milliseconds timeout = std::chrono::seconds(10), bool quiet = false) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto st = decoder.next();
      if (st == frame_decoder::status::message) {
        const auto type = decoder.msg()->message_type();
        if (type == v1::Message::FileResponse)
          file_answers[decoder.msg()->message_as_FileResponse()->request_id()] = decoder.frame();
        else if (type == v1::Message::FileError)
          file_answers[decoder.msg()->message_as_FileError()->request_id()] = decoder.frame();
        event e = flatten(*decoder.msg());
        record(e);
        return e;
      }
      BOOST_REQUIRE_MESSAGE((st == frame_decoder::status::need_more), decoder.error_message());
      if (std::chrono::steady_clock::now() > deadline) {
        if (!quiet)
          BOOST_TEST_FAIL("no message from ferry-init in time");
        return std::nullopt;
      }
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0)
        continue;
      char buf[65536];
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0)
        return std::nullopt;
      decoder.feed(buf, static_cast<size_t>(n));
    }
  }

  /// Reads until `pred()` holds; false on EOF or timeout.
  template <class Pred>
  bool until(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0 || !next(left, true))
        return pred();
    }
    return true;
  }
  bool until_over(uint32_t id, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    return until([&] { return stories.count(id) && stories[id].over(); }, timeout);
  }
  command_story& story(uint32_t id) { return stories[id]; }

 private:
  /// Checks each message against the per-command order and stream offsets.
  void record(event e) {
    if (!keep_output && e.type == v1::Message::Output) {
      auto& s = stories[e.command_id];
      BOOST_TEST(e.offset == s.at[e.stream]);
      s.at[e.stream] = e.offset + e.data.size();
      ++s.outputs;
      return;
    }
    events.push_back(e);
    switch (e.type) {
      case v1::Message::Hello:
        hello_nonce = e.data;
        break;
      case v1::Message::Started: {
        auto& s = stories[e.command_id];
        BOOST_TEST(!s.started.has_value(), "Started twice for command " << e.command_id);
        s.started = e;
        break;
      }
      case v1::Message::Output: {
        auto& s = stories[e.command_id];
        BOOST_TEST(s.started.has_value(), "Output before Started for command " << e.command_id);
        BOOST_TEST(!s.truncated.has_value(), "Output after OutputTruncated for command " << e.command_id);
        BOOST_TEST(!s.exited.has_value(), "Output after Exited for command " << e.command_id);
        BOOST_TEST(e.offset == s.at[e.stream], "command " << e.command_id << " stream " << e.stream);
        s.at[e.stream] = e.offset + e.data.size();
        s.out[e.stream] += e.data;
        ++s.outputs;
        break;
      }
      case v1::Message::OutputGap: {
        auto& s = stories[e.command_id];
        BOOST_TEST(e.offset == s.at[e.stream]);
        s.at[e.stream] += e.lost_bytes;
        s.lost[e.stream] += e.lost_bytes;
        break;
      }
      case v1::Message::OutputTruncated: {
        auto& s = stories[e.command_id];
        BOOST_TEST(e.stdout_offset == s.at[0]);
        BOOST_TEST(e.stderr_offset == s.at[1]);
        s.truncated = e;
        break;
      }
      case v1::Message::Exited: {
        auto& s = stories[e.command_id];
        BOOST_TEST(s.started.has_value(), "Exited before Started for command " << e.command_id);
        BOOST_TEST(!s.exited.has_value());
        s.exited = e;
        break;
      }
      case v1::Message::CommandError:
        stories[e.command_id].error = e;
        break;
      default:
        break;
    }
  }
};

/// ferry-init in socket mode on the host, listening in a temp dir, with its workspace and state
/// directories there too.
struct listening_init {
  temp_dir tmp;
  std::filesystem::path socket = tmp.path() / "init.sock";
  std::filesystem::path workspace = tmp.path() / "workspace";
  std::filesystem::path state = tmp.path() / "state";
  std::filesystem::path log = tmp.path() / "init.log";
  ferry::wire::handshake_key key = random_key();
  std::optional<child_process> proc;

  listening_init(const listening_init&) = delete;
  /// Leaves nothing running: ferry-init is a subreaper, so every process it left is below it.
  ~listening_init() {
    if (!proc || proc->try_wait())
      return;
    for (bool found = true; found;) {
      found = false;
      for (pid_t pid : descendants(proc->pid())) {
        ::kill(pid, SIGKILL);
        found = true;
      }
      if (found)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  /// Live descendants of `root` (from /proc/<pid>/stat; zombies excluded).
  static std::vector<pid_t> descendants(pid_t root) {
    std::map<pid_t, pid_t> parent;
    for (const auto& e : std::filesystem::directory_iterator("/proc")) {
      const std::string name = e.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos)
        continue;
      const std::string stat = read_proc_file(e.path() / "stat");
      auto paren = stat.rfind(')');
      if (paren == std::string::npos || paren + 4 >= stat.size() || stat[paren + 2] == 'Z')
        continue;
      parent[static_cast<pid_t>(std::stol(name))] = static_cast<pid_t>(std::strtol(stat.c_str() + paren + 4, nullptr, 10));
    }
    std::vector<pid_t> out;
    std::vector<pid_t> queue{root};
    while (!queue.empty()) {
      pid_t p = queue.back();
      queue.pop_back();
      for (auto [pid, ppid] : parent) {
        if (ppid == p) {
          out.push_back(pid);
          queue.push_back(pid);
        }
      }
    }
    return out;
  }

  explicit listening_init(std::vector<std::string> command = {}, std::vector<std::string> flags = {}) {
    std::filesystem::create_directories(workspace);
    std::vector<std::string> args{"--listen", socket.string(), "--workspace", workspace.string(),
                                  "--state-dir", state.string()};
    args.insert(args.end(), flags.begin(), flags.end());
    args.push_back("--");
    args.insert(args.end(), command.begin(), command.end());
    auto o = init_options(args);
    o.in = stdio::bytes;  // the key, as runsc hands it to PID 1
    o.in_bytes = ferry::wire::key_to_hex(key);
    o.out = stdio::null;
    o.err = stdio::file;  // a file, not a pipe: a chatty ferry-init never blocks on it
    o.file = log;
    auto c = child_process::spawn(o);
    BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
    proc.emplace(std::move(*c));
    for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10); !std::filesystem::exists(socket);) {
      BOOST_REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline, "ferry-init did not listen");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  /// A new connection (closed by the returned object).
  std::unique_ptr<init_connection> connect() const {
    auto c = try_connect();
    BOOST_REQUIRE_MESSAGE(c, "connect: " << std::strerror(errno));
    return c;
  }

  /// A new connection, or nullptr if ferry-init does not accept one (errno says why).
  std::unique_ptr<init_connection> try_connect() const {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, socket.c_str(), socket.string().size());
    // The socket file appears at bind(), a moment before listen(): retry a refusal briefly.
    int r = -1;
    for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);;) {
      r = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
      if (r == 0 || errno != ECONNREFUSED || std::chrono::steady_clock::now() > deadline)
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (r != 0) {
      const int err = errno;
      ::close(fd);
      errno = err;
      return nullptr;
    }
    auto c = std::make_unique<init_connection>(fd);
    c->key = key;
    return c;
  }

  /// Connects, reads Hello, attaches and reads Attached.
  std::unique_ptr<init_connection> attach(std::vector<resume_entry> resume = {}) const {
    auto c = connect();
    auto hello = c->next();
    BOOST_REQUIRE(hello);
    BOOST_REQUIRE((hello->type == v1::Message::Hello));
    c->send(c->attach_frame(std::move(resume)));
    auto attached = c->next();
    BOOST_REQUIRE(attached);
    BOOST_REQUIRE_MESSAGE((attached->type == v1::Message::Attached), "got message type " << int(attached->type) << ": " << attached->data);
    BOOST_REQUIRE_MESSAGE(c->proves_key(*attached), "Attached does not prove the key");
    return c;
  }

  /// ferry-init's diagnostics so far.
  std::string diagnostics() const { return read_proc_file(log); }
};

}  // namespace ferry::sandbox::testing
