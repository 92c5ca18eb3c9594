#define BOOST_TEST_MODULE sandbox_init_protocol
#include <boost/test/unit_test.hpp>

// ferry-init run directly on the host (no sandbox) with its stdout piped to the test, and the
// frame decoder fed hostile input. Pins the wire behaviour the runsc backend relies on.

#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>
#include <random>
#include <thread>

#include <flatbuffers/flatbuffers.h>

#include "ferry/sandbox/process.h"
#include "ferry/schemas/frame.h"
#include "test_support.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace v1 = ferry::init::v1;
using ferry::wire::frame_decoder;
namespace fs = std::filesystem;

namespace {

/// One decoded message, flattened for comparison.
struct event {
  v1::Message type = v1::Message::NONE;
  uint32_t command_id = 0;
  int32_t pid = 0;
  int stream = -1;
  std::string data;  // Output data or Error message
  std::vector<std::string> argv;
  int32_t exit_code = 0, signal = 0;
  uint64_t duration_ms = 0;
  uint64_t offset = 0, lost_bytes = 0;  // Output, OutputGap
};

event flatten(const v1::InitMessage& m) {
  event e;
  e.type = m.message_type();
  switch (e.type) {
    case v1::Message::Hello:
      e.pid = m.message_as_Hello()->pid();
      break;
    case v1::Message::Started: {
      auto* s = m.message_as_Started();
      e.command_id = s->command_id();
      e.pid = s->pid();
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
      break;
    }
    case v1::Message::Error:
      e.data = m.message_as_Error()->message() ? m.message_as_Error()->message()->str() : "";
      break;
    case v1::Message::OutputGap: {
      auto* g = m.message_as_OutputGap();
      e.command_id = g->command_id();
      e.stream = g->stream();
      e.offset = g->offset();
      e.lost_bytes = g->lost_bytes();
      break;
    }
    default:  // NONE, and the host's messages (Attach, Release)
      break;
  }
  return e;
}

/// Decodes a whole stream; fails the test on a protocol error or a trailing partial frame.
std::vector<event> decode_all(const std::string& bytes) {
  frame_decoder d;
  d.feed(bytes.data(), bytes.size());
  std::vector<event> out;
  for (;;) {
    auto st = d.next();
    if (st == frame_decoder::status::message) {
      out.push_back(flatten(*d.msg()));
      continue;
    }
    BOOST_TEST((st == frame_decoder::status::need_more), "decoder error: " << d.error_message());
    break;
  }
  BOOST_TEST(d.pending() == 0u);
  return out;
}

spawn_options init_options(std::vector<std::string> args) {
  spawn_options o;
  o.argv = {FERRY_INIT_BINARY};
  o.argv.insert(o.argv.end(), args.begin(), args.end());
  o.out = stdio::pipe;
  return o;
}

struct init_run {
  std::vector<event> events;
  std::string diagnostics;  // ferry-init's stderr
  exit_status status;
};

init_run run_init(std::vector<std::string> args) {
  auto o = init_options(std::move(args));
  o.err = stdio::pipe;
  auto c = child_process::spawn(o);
  BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
  auto bytes = testing::read_until_eof(c->stdout_fd(), 30s);
  BOOST_REQUIRE_MESSAGE(bytes, "ferry-init did not close its stdout");
  auto diagnostics = testing::read_until_eof(c->stderr_fd(), 5s);  // small: fits the pipe
  BOOST_REQUIRE(diagnostics);
  return {decode_all(*bytes), *diagnostics, c->wait()};
}

std::string output_of(const std::vector<event>& events, int stream) {
  std::string s;
  for (const auto& e : events)
    if (e.type == v1::Message::Output && e.stream == stream)
      s += e.data;
  return s;
}

std::string frame_of(flatbuffers::FlatBufferBuilder& fbb) {
  std::string out;
  ferry::wire::append_frame(out, fbb);
  return out;
}

std::string hello_frame() {
  flatbuffers::FlatBufferBuilder fbb;
  auto h = v1::CreateHello(fbb, 1, 1);
  v1::FinishInitMessageBuffer(fbb, v1::CreateInitMessage(fbb, v1::Message::Hello, h.Union()));
  return frame_of(fbb);
}

std::string exited_frame() {
  flatbuffers::FlatBufferBuilder fbb;
  auto x = v1::CreateExited(fbb, 1, 0, 0, 1234);
  v1::FinishInitMessageBuffer(fbb, v1::CreateInitMessage(fbb, v1::Message::Exited, x.Union()));
  return frame_of(fbb);
}

std::string le32(uint32_t n) {
  return {static_cast<char>(n), static_cast<char>(n >> 8), static_cast<char>(n >> 16),
          static_cast<char>(n >> 24)};
}

frame_decoder::status decode_one(const std::string& bytes, frame_decoder& d) {
  d.feed(bytes.data(), bytes.size());
  return d.next();
}

}  // namespace

BOOST_AUTO_TEST_CASE(reports_hello_started_output_and_exited_in_order) {
  auto r = run_init({"--command-id", "42", "--", "/bin/sh", "-c", "echo hello; echo err >&2; exit 3"});
  const auto& ev = r.events;
  BOOST_REQUIRE(ev.size() == 5u);
  BOOST_TEST((ev[0].type == v1::Message::Hello));
  BOOST_TEST(ev[0].pid > 0);
  BOOST_TEST((ev[1].type == v1::Message::Started));
  BOOST_TEST(ev[1].command_id == 42u);
  BOOST_TEST(ev[1].pid > 0);
  BOOST_TEST((ev[1].argv == std::vector<std::string>{"/bin/sh", "-c", "echo hello; echo err >&2; exit 3"}));
  BOOST_TEST((ev[2].type == v1::Message::Output));
  BOOST_TEST(ev[2].stream == 0);
  BOOST_TEST(ev[2].data == "hello\n");
  BOOST_TEST((ev[3].type == v1::Message::Output));
  BOOST_TEST(ev[3].stream == 1);
  BOOST_TEST(ev[3].data == "err\n");
  BOOST_TEST((ev[4].type == v1::Message::Exited));
  BOOST_TEST(ev[4].command_id == 42u);
  BOOST_TEST(ev[4].exit_code == 3);
  BOOST_TEST(ev[4].signal == 0);
  BOOST_TEST(r.status.ok());
}

BOOST_AUTO_TEST_CASE(command_id_defaults_to_1_and_duration_is_measured) {
  auto r = run_init({"--", "/bin/sh", "-c", "sleep 0.3"});
  BOOST_REQUIRE(r.events.size() == 3u);
  BOOST_TEST(r.events[1].command_id == 1u);
  BOOST_TEST((r.events[2].type == v1::Message::Exited));
  BOOST_TEST(r.events[2].exit_code == 0);
  BOOST_TEST(r.events[2].duration_ms >= 300u);
  BOOST_TEST(r.events[2].duration_ms < 5000u);
}

BOOST_AUTO_TEST_CASE(death_by_signal_is_reported) {
  auto r = run_init({"--", "/bin/sh", "-c", "kill -KILL $$"});
  BOOST_REQUIRE(!r.events.empty());
  const auto& last = r.events.back();
  BOOST_TEST((last.type == v1::Message::Exited));
  BOOST_TEST(last.exit_code == -1);
  BOOST_TEST(last.signal == SIGKILL);
}

BOOST_AUTO_TEST_CASE(large_output_arrives_complete_in_bounded_chunks) {
  // ~1.2 MB of distinct lines, so loss, duplication and reordering all show.
  auto r = run_init({"--", "seq", "1", "180000"});
  std::string expected;
  for (int i = 1; i <= 180000; ++i)
    expected += std::to_string(i) + "\n";
  size_t chunks = 0;
  uint64_t offset = 0;
  for (const auto& e : r.events) {
    if (e.type == v1::Message::Output) {
      ++chunks;
      BOOST_TEST(e.offset == offset);  // contiguous: each chunk starts where the last ended
      offset += e.data.size();
      BOOST_TEST(e.data.size() <= ferry::wire::max_output_chunk);
      BOOST_TEST(!e.data.empty());
    }
  }
  BOOST_TEST(output_of(r.events, 0) == expected);
  BOOST_TEST(chunks >= expected.size() / ferry::wire::max_output_chunk);
  BOOST_TEST((r.events.back().type == v1::Message::Exited));
}

BOOST_AUTO_TEST_CASE(output_of_orphaned_children_precedes_exited) {
  // The background subshell outlives the command and keeps stdout open: its output still comes
  // before Exited, and ferry-init reaps it.
  auto r = run_init({"--", "/bin/sh", "-c", "(sleep 0.3; echo late) & echo early"});
  BOOST_TEST(output_of(r.events, 0) == "early\nlate\n");
  BOOST_TEST((r.events.back().type == v1::Message::Exited));
  BOOST_TEST(r.events.back().exit_code == 0);
}

BOOST_AUTO_TEST_CASE(command_gets_empty_stdin) {
  auto r = run_init({"--", "/bin/sh", "-c", "wc -c"});
  BOOST_TEST(output_of(r.events, 0) == "0\n");
}

BOOST_AUTO_TEST_CASE(sigterm_is_forwarded_to_the_command) {
  auto c = child_process::spawn(init_options({"--", "sleep", "100"}));
  BOOST_REQUIRE(c.ok());
  frame_decoder d;
  std::vector<event> events;
  char buf[4096];
  bool terminated = false;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  for (;;) {
    BOOST_REQUIRE(std::chrono::steady_clock::now() < deadline);
    pollfd p{c->stdout_fd(), POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0)
      continue;
    ssize_t n = ::read(c->stdout_fd(), buf, sizeof buf);
    if (n <= 0)
      break;
    d.feed(buf, static_cast<size_t>(n));
    while (d.next() == frame_decoder::status::message)
      events.push_back(flatten(*d.msg()));
    if (!terminated && !events.empty() && events.back().type == v1::Message::Started) {
      ::kill(c->pid(), SIGTERM);  // ferry-init alone, not its group
      terminated = true;
    }
  }
  BOOST_REQUIRE(terminated);
  BOOST_TEST((events.back().type == v1::Message::Exited));
  BOOST_TEST(events.back().signal == SIGTERM);
  BOOST_TEST(c->wait().ok());
}

BOOST_AUTO_TEST_CASE(unexecutable_command_gives_error_and_no_started) {
  auto r = run_init({"--", "/nonexistent/ferry-no-such-command", "x"});
  BOOST_REQUIRE(r.events.size() == 2u);
  BOOST_TEST((r.events[0].type == v1::Message::Hello));
  BOOST_TEST((r.events[1].type == v1::Message::Error));
  BOOST_TEST(r.events[1].data.find("cannot execute `/nonexistent/ferry-no-such-command`") != std::string::npos);
  BOOST_TEST(r.events[1].data.find("No such file") != std::string::npos);
  BOOST_TEST(r.diagnostics.find("cannot execute") != std::string::npos);  // also on stderr
  BOOST_TEST(r.status.exit_code == 1);
}

BOOST_AUTO_TEST_CASE(bad_usage_gives_error) {
  for (auto args : std::vector<std::vector<std::string>>{
           {}, {"--"}, {"--command-id", "x", "--", "true"}, {"--bogus", "--", "true"}}) {
    auto r = run_init(args);
    BOOST_REQUIRE(r.events.size() == 1u);
    BOOST_TEST((r.events[0].type == v1::Message::Error));
    BOOST_TEST(r.status.exit_code == 2);
  }
}

// --- frame_decoder against hostile input -----------------------------------------------------

BOOST_AUTO_TEST_CASE(decoder_reassembles_frames_fed_byte_by_byte) {
  std::string stream = hello_frame() + exited_frame() + hello_frame();
  frame_decoder d;
  int messages = 0;
  for (char c : stream) {
    d.feed(&c, 1);
    auto st = d.next();
    BOOST_REQUIRE((st != frame_decoder::status::error));
    if (st == frame_decoder::status::message)
      ++messages;
  }
  BOOST_TEST(messages == 3);
  BOOST_TEST(d.pending() == 0u);
}

BOOST_AUTO_TEST_CASE(decoder_reads_lengths_with_high_bit_bytes) {
  // Lengths like 0x84 or 0x1ff: each length byte must be read unsigned.
  for (size_t payload : {100u, 200u, 400u, 70000u}) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<uint8_t> data(payload, 'x');
    auto out = v1::CreateOutput(fbb, 1, 0, fbb.CreateVector(data));
    v1::FinishInitMessageBuffer(fbb, v1::CreateInitMessage(fbb, v1::Message::Output, out.Union()));
    std::string frame = frame_of(fbb);
    frame_decoder d;
    BOOST_TEST_REQUIRE((decode_one(frame, d) == frame_decoder::status::message),
                       "payload " << payload << ": " << d.error_message());
    BOOST_TEST(d.msg()->message_as_Output()->data()->size() == payload);
  }
}

BOOST_AUTO_TEST_CASE(decoder_rejects_bad_lengths) {
  frame_decoder zero;
  BOOST_TEST((decode_one(le32(0) + "xxxx", zero) == frame_decoder::status::error));
  BOOST_TEST(zero.error_message().find("frame length 0") != std::string::npos);
  BOOST_TEST((zero.next() == frame_decoder::status::error));  // no resuming after an error

  frame_decoder huge;
  BOOST_TEST((decode_one(le32(ferry::wire::max_frame_size + 1), huge) == frame_decoder::status::error));
  frame_decoder all_ones;
  BOOST_TEST((decode_one(std::string(4, '\xff'), all_ones) == frame_decoder::status::error));
}

BOOST_AUTO_TEST_CASE(decoder_rejects_truncated_frames) {
  std::string good = exited_frame();
  std::string body = good.substr(4);
  for (size_t cut = 1; cut < body.size(); ++cut) {
    // The length is honest about the truncated body: verification must catch it.
    frame_decoder d;
    BOOST_TEST((decode_one(le32(static_cast<uint32_t>(cut)) + body.substr(0, cut), d) ==
                frame_decoder::status::error),
               "cut at " << cut);
  }
  // A frame cut short by the end of the stream is left pending (the host treats it as an error).
  frame_decoder d;
  BOOST_TEST((decode_one(good.substr(0, good.size() - 1), d) == frame_decoder::status::need_more));
  BOOST_TEST(d.pending() == good.size() - 1);
}

BOOST_AUTO_TEST_CASE(decoder_rejects_random_bytes) {
  std::mt19937 rng(20240611);
  for (int i = 0; i < 5000; ++i) {
    uint32_t n = 1 + rng() % 300;
    std::string bytes = le32(n);
    for (uint32_t j = 0; j < n; ++j)
      bytes += static_cast<char>(rng());
    frame_decoder d;
    BOOST_TEST_REQUIRE((decode_one(bytes, d) == frame_decoder::status::error), "iteration " << i);
  }
}

BOOST_AUTO_TEST_CASE(decoder_survives_every_single_byte_corruption) {
  // Flipping a data byte may still verify; what matters is no crash and no out-of-bounds read
  // (run under ASan), and that header corruption is caught.
  std::string good = exited_frame();
  int errors = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    for (unsigned char mask : {0x01, 0x80, 0xff}) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ mask);
      frame_decoder d;
      auto st = decode_one(bad, d);
      if (st == frame_decoder::status::error)
        ++errors;
      if (st == frame_decoder::status::message)
        (void)flatten(*d.msg());
    }
  }
  BOOST_TEST(errors > 0);
}

// --- socket mode (--listen): what every runsc sandbox runs ------------------------------------

namespace {

/// ferry-init in socket mode on the host, listening in a temp dir.
struct listening_init {
  testing::temp_dir tmp;
  fs::path socket = tmp.path() / "init.sock";
  std::optional<child_process> proc;

  explicit listening_init(std::vector<std::string> command, std::vector<std::string> flags = {}) {
    std::vector<std::string> args{"--listen", socket.string()};
    args.insert(args.end(), flags.begin(), flags.end());
    args.push_back("--");
    args.insert(args.end(), command.begin(), command.end());
    auto o = init_options(args);
    o.out = stdio::null;
    o.err = stdio::pipe;
    auto c = child_process::spawn(o);
    BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
    proc.emplace(std::move(*c));
    for (auto deadline = std::chrono::steady_clock::now() + 10s; !fs::exists(socket);) {
      BOOST_REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline, "ferry-init did not listen");
      std::this_thread::sleep_for(5ms);
    }
  }

  /// A new connection (closed by the returned object).
  struct conn {
    int fd = -1;
    frame_decoder decoder;
    explicit conn(int f) : fd(f) {}
    conn(const conn&) = delete;
    ~conn() {
      if (fd >= 0)
        ::close(fd);
    }
    void send(const std::string& bytes) const {
      BOOST_REQUIRE(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
    }
    /// The next message; nullopt at EOF (or on timeout: a failed check says which).
    std::optional<event> next(std::chrono::milliseconds timeout = 10s) {
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      for (;;) {
        auto st = decoder.next();
        if (st == frame_decoder::status::message)
          return flatten(*decoder.msg());
        BOOST_REQUIRE_MESSAGE((st == frame_decoder::status::need_more), decoder.error_message());
        if (std::chrono::steady_clock::now() > deadline) {
          BOOST_TEST_FAIL("no message from ferry-init in time");
          return std::nullopt;
        }
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 50) <= 0)
          continue;
        char buf[65536];
        ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n <= 0)
          return std::nullopt;
        decoder.feed(buf, static_cast<size_t>(n));
      }
    }
  };

  std::unique_ptr<conn> connect() const {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, socket.c_str(), socket.string().size());
    BOOST_REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    return std::make_unique<conn>(fd);
  }
};

std::string attach_frame(uint64_t out, uint64_t err, uint32_t command_id = 1, uint16_t protocol = 2) {
  flatbuffers::FlatBufferBuilder fbb;
  auto a = v1::CreateAttach(fbb, protocol, command_id, out, err);
  std::string frame;
  ferry::wire::append_message(frame, fbb, v1::Message::Attach, a);
  return frame;
}

std::string release_frame() {
  flatbuffers::FlatBufferBuilder fbb;
  auto r = v1::CreateRelease(fbb);
  std::string frame;
  ferry::wire::append_message(frame, fbb, v1::Message::Release, r);
  return frame;
}

/// Reads messages up to and including Exited (or EOF); checks each stream's offsets are
/// contiguous from `from` (gaps included) and returns what came.
struct story {
  std::vector<event> events;
  std::string out[2];
  uint64_t lost[2] = {0, 0};
  std::optional<event> exited;
};
story read_story(listening_init::conn& c, uint64_t from_out = 0, uint64_t from_err = 0) {
  story s;
  uint64_t at[2] = {from_out, from_err};
  while (auto e = c.next()) {
    s.events.push_back(*e);
    if (e->type == v1::Message::Output) {
      BOOST_TEST(e->offset == at[e->stream]);
      at[e->stream] += e->data.size();
      s.out[e->stream] += e->data;
    } else if (e->type == v1::Message::OutputGap) {
      BOOST_TEST(e->offset == at[e->stream]);
      at[e->stream] += e->lost_bytes;
      s.lost[e->stream] += e->lost_bytes;
    } else if (e->type == v1::Message::Exited) {
      s.exited = e;
      break;
    }
  }
  return s;
}

bool is_hex_token(const std::string& s) {
  return s.size() == 32 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

}  // namespace

BOOST_AUTO_TEST_CASE(socket_mode_starts_the_command_on_the_first_attach_and_ends_on_release) {
  testing::temp_dir marker_dir;
  const auto marker = marker_dir.path() / "ran";
  listening_init init({"/bin/sh", "-c", "touch " + marker.string() + "; echo out; echo err >&2; exit 4"});
  auto c = init.connect();
  auto hello = c->next();
  BOOST_REQUIRE(hello);
  BOOST_TEST((hello->type == v1::Message::Hello));
  std::this_thread::sleep_for(200ms);
  BOOST_TEST(!fs::exists(marker));  // nothing runs before a host has attached
  c->send(attach_frame(0, 0));
  auto s = read_story(*c);
  BOOST_REQUIRE(!s.events.empty());
  BOOST_TEST((s.events.front().type == v1::Message::Started));
  BOOST_TEST(s.out[0] == "out\n");
  BOOST_TEST(s.out[1] == "err\n");
  BOOST_REQUIRE(s.exited);
  BOOST_TEST(s.exited->exit_code == 4);
  BOOST_TEST(fs::exists(marker));
  BOOST_TEST(!init.proc->try_wait().has_value());  // waits for Release
  c->send(release_frame());
  BOOST_TEST(!c->next(5s));  // EOF: ferry-init ended
  auto st = init.proc->wait_for(5s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->ok());
}

BOOST_AUTO_TEST_CASE(socket_mode_hello_carries_the_same_instance_token_on_every_connection) {
  listening_init init({"sleep", "100"});
  std::string first;
  for (int i = 0; i < 3; ++i) {
    auto c = init.connect();
    auto hello = c->next();
    BOOST_REQUIRE(hello);
    auto* h = c->decoder.msg()->message_as_Hello();
    BOOST_REQUIRE(h);
    BOOST_TEST(h->protocol() == 2);
    const std::string token = h->instance() ? h->instance()->str() : "";
    BOOST_TEST(is_hex_token(token), token);
    if (i == 0)
      first = token;
    BOOST_TEST(token == first);
  }
  listening_init other({"sleep", "100"});
  auto c = other.connect();
  BOOST_REQUIRE(c->next());
  BOOST_TEST(c->decoder.msg()->message_as_Hello()->instance()->str() != first);
}

BOOST_AUTO_TEST_CASE(socket_mode_refuses_bad_hosts_and_carries_on) {
  listening_init init({"/bin/sh", "-c", "echo hi; sleep 100"});
  auto refused = [&](const std::string& bytes, const std::string& needle) {
    auto c = init.connect();
    BOOST_REQUIRE(c->next());  // Hello
    c->send(bytes);
    auto e = c->next();
    if (!needle.empty()) {
      BOOST_REQUIRE(e);
      BOOST_TEST((e->type == v1::Message::Error));
      BOOST_TEST(e->data.find(needle) != std::string::npos, e->data);
      e = c->next();
    }
    BOOST_TEST(!e.has_value());  // closed
    BOOST_TEST(!init.proc->try_wait().has_value());
  };
  refused(attach_frame(0, 0, 7), "no command 7");
  refused(attach_frame(0, 0, 1, 1), "unsupported host protocol 1");
  refused(attach_frame(5, 0), "beyond");  // nothing written yet: the command has not started
  refused(release_frame(), "Release before Exited");
  refused(hello_frame(), "unexpected message type");
  refused(le32(0) + "xxxx", "");             // garbage: dropped without a word
  refused(std::string(4, '\xff'), "");
  refused(le32(12) + std::string(12, 'z'), "");

  auto host = init.connect();
  BOOST_REQUIRE(host->next());
  host->send(attach_frame(0, 0));
  auto started = host->next();
  BOOST_REQUIRE(started);
  BOOST_TEST((started->type == v1::Message::Started));
  auto out = host->next();
  BOOST_REQUIRE(out);
  BOOST_TEST(out->data == "hi\n");

  // One host at a time: a second one gets Error instead of Hello.
  auto second = init.connect();
  auto e = second->next();
  BOOST_REQUIRE(e);
  BOOST_TEST((e->type == v1::Message::Error));
  BOOST_TEST(e->data.find("another host") != std::string::npos);
  BOOST_TEST(!second->next().has_value());
  // The first one is undisturbed; once it is gone, a new host may attach and resume.
  host.reset();
  std::this_thread::sleep_for(100ms);
  auto third = init.connect();
  BOOST_REQUIRE(third->next());
  third->send(attach_frame(3, 0));
  auto again = third->next();
  BOOST_REQUIRE(again);
  BOOST_TEST((again->type == v1::Message::Started));  // replayed for every host
  third->send(attach_frame(0, 0));                     // Attach twice: refused
  auto err = third->next();
  BOOST_REQUIRE(err);
  BOOST_TEST(err->data.find("Attach sent twice") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(socket_mode_keeps_draining_without_a_host_and_reports_what_it_dropped) {
  testing::temp_dir marker_dir;
  const auto done = marker_dir.path() / "done";
  std::string all;
  for (int i = 1; i <= 50000; ++i)
    all += std::to_string(i) + "\n";
  listening_init init({"/bin/sh", "-c", "sleep 0.3; seq 1 50000; echo e >&2; touch " + done.string()},
                      {"--buffer-bytes", "65536", "--linger-ms", "20000"});
  {
    auto c = init.connect();
    BOOST_REQUIRE(c->next());
    c->send(attach_frame(0, 0));
    auto started = c->next();
    BOOST_REQUIRE(started);
    BOOST_TEST((started->type == v1::Message::Started));
  }  // the host goes away before the output comes
  for (auto deadline = std::chrono::steady_clock::now() + 20s; !fs::exists(done);) {
    BOOST_REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(100ms);
  {
    auto c = init.connect();
    BOOST_REQUIRE(c->next());
    c->send(attach_frame(0, 0));
    auto s = read_story(*c);
    BOOST_REQUIRE(s.exited);
    BOOST_TEST(s.lost[0] > 0u);
    BOOST_TEST(s.lost[0] + s.out[0].size() == all.size());
    BOOST_TEST(s.out[0].size() >= 65536u);  // at least the buffer's worth is kept
    BOOST_TEST(s.out[0].size() <= 2u * 65536u);
    BOOST_TEST((s.out[0] == all.substr(all.size() - s.out[0].size())));
    BOOST_TEST(s.lost[1] == 0u);
    BOOST_TEST(s.out[1] == "e\n");
  }  // gone again without Release: ferry-init lingers
  {
    // Resume from the middle of what is kept: exactly the rest, no gap.
    auto c = init.connect();
    BOOST_REQUIRE(c->next());
    c->send(attach_frame(all.size() - 10, 2));
    auto s = read_story(*c, all.size() - 10, 2);
    BOOST_REQUIRE(s.exited);
    BOOST_TEST(s.lost[0] == 0u);
    BOOST_TEST(s.out[0] == all.substr(all.size() - 10));
    BOOST_TEST(s.out[1] == "");
    c->send(release_frame());
    BOOST_TEST(!c->next(5s));
  }
  auto st = init.proc->wait_for(5s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->ok());
}

BOOST_AUTO_TEST_CASE(socket_mode_applies_backpressure_while_a_host_is_attached) {
  // The host reads nothing for a while: the command must block rather than lose output.
  listening_init init({"/bin/sh", "-c", "seq 1 200000"}, {"--buffer-bytes", "65536"});
  std::string all;
  for (int i = 1; i <= 200000; ++i)
    all += std::to_string(i) + "\n";
  auto c = init.connect();
  BOOST_REQUIRE(c->next());
  c->send(attach_frame(0, 0));
  std::this_thread::sleep_for(1s);  // socket buffers fill, then ferry-init stops reading
  auto s = read_story(*c);
  BOOST_REQUIRE(s.exited);
  BOOST_TEST(s.lost[0] == 0u);
  BOOST_TEST(s.out[0].size() == all.size());
  BOOST_TEST((s.out[0] == all));
  c->send(release_frame());
}

BOOST_AUTO_TEST_CASE(socket_mode_gives_up_after_lingering_without_a_host) {
  listening_init init({"true"}, {"--linger-ms", "300"});
  {
    auto c = init.connect();
    BOOST_REQUIRE(c->next());
    c->send(attach_frame(0, 0));
    auto s = read_story(*c);
    BOOST_REQUIRE(s.exited);
  }  // no Release
  auto st = init.proc->wait_for(10s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->exit_code == 3);
  auto diagnostics = testing::read_until_eof(init.proc->stderr_fd(), 5s);
  BOOST_REQUIRE(diagnostics);
  BOOST_TEST(diagnostics->find("giving up") != std::string::npos, *diagnostics);
}
