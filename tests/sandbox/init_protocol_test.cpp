#define BOOST_TEST_MODULE sandbox_init_protocol
#include <boost/test/unit_test.hpp>

// ferry-init run directly on the host (no sandbox) with its stdout piped to the test, and the
// frame decoder fed hostile input. Pins the wire behaviour the runsc backend relies on.

#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <thread>

#include <flatbuffers/flatbuffers.h>

#include "ferry/sandbox/process.h"
#include "ferry/schemas/frame.h"
#include "init_test_support.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace v1 = ferry::init::v1;
using ferry::wire::frame_decoder;
namespace fs = std::filesystem;

namespace {

using namespace ferry::sandbox::testing;

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
// The command line's part of the process API (protocol 2 behaviour kept in protocols 3 and 4); Run,
// Signal and the rest are in init_process_api_test.

namespace {


}  // namespace

BOOST_AUTO_TEST_CASE(socket_mode_starts_the_command_line_on_the_first_attach_and_ends_on_release) {
  testing::temp_dir marker_dir;
  const auto marker = marker_dir.path() / "ran";
  listening_init init({"/bin/sh", "-c", "touch " + marker.string() + "; echo out; echo err >&2; exit 4"});
  auto c = init.connect();
  auto hello = c->next();
  BOOST_REQUIRE(hello);
  BOOST_TEST((hello->type == v1::Message::Hello));
  BOOST_TEST(hello->protocol == 4);
  std::this_thread::sleep_for(200ms);
  BOOST_TEST(!fs::exists(marker));  // nothing runs before a host has attached
  c->send(c->attach_frame());
  auto attached = c->next();
  BOOST_REQUIRE(attached);
  BOOST_TEST((attached->type == v1::Message::Attached));
  BOOST_TEST(attached->commands == 1u);
  BOOST_TEST(attached->running == 1u);
  BOOST_REQUIRE(c->until_over(1));
  auto& s = c->story(1);
  BOOST_REQUIRE(s.started);
  BOOST_TEST((s.started->argv == std::vector<std::string>{"/bin/sh", "-c", "touch " + marker.string() + "; echo out; echo err >&2; exit 4"}));
  BOOST_TEST(s.started->pgid == s.started->pid);
  BOOST_TEST(s.out[0] == "out\n");
  BOOST_TEST(s.out[1] == "err\n");
  BOOST_REQUIRE(s.exited);
  BOOST_TEST(s.exited->exit_code == 4);
  BOOST_TEST((s.exited->reason == v1::ExitReason::Exited));
  BOOST_TEST(s.exited->stdout_bytes == 4u);
  BOOST_TEST(s.exited->truncated_bytes == 0u);
  BOOST_TEST(fs::exists(marker));
  BOOST_TEST(!init.proc->try_wait().has_value());  // waits for Release
  c->send(release_frame());
  BOOST_TEST(!c->next(5s, true));  // EOF: ferry-init ended
  auto st = init.proc->wait_for(5s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->ok());
}

BOOST_AUTO_TEST_CASE(socket_mode_hello_carries_a_fresh_nonce_and_no_secret) {
  listening_init init({"sleep", "100"});
  std::set<std::string> seen;
  const std::string key = ferry::wire::key_to_hex(init.key);
  for (int i = 0; i < 3; ++i) {
    auto c = init.connect();
    auto hello = c->next();
    BOOST_REQUIRE(hello);
    BOOST_TEST(hello->protocol == ferry::wire::socket_protocol);
    BOOST_TEST(hello->data.size() == 32u);
    BOOST_TEST(seen.insert(hello->data).second);  // never the same challenge twice
    // Nothing of the key in the frame: neither its bytes nor its hex form.
    BOOST_TEST(hello->data.find(bytes_of(init.key)) == std::string::npos);
    BOOST_TEST(c->decoder.pending() == 0u);
  }
  BOOST_TEST(init.diagnostics().find(key) == std::string::npos);
}

BOOST_AUTO_TEST_CASE(socket_mode_needs_a_key_on_stdin) {
  testing::temp_dir tmp;
  for (const std::string& given : {std::string(), std::string("abc"), std::string(64, 'g'), std::string(65, 'a')}) {
    auto o = init_options({"--listen", (tmp.path() / "init.sock").string(), "--workspace", tmp.path().string()});
    o.in = stdio::bytes;
    o.in_bytes = given;
    o.err = stdio::pipe;
    auto c = child_process::spawn(o);
    BOOST_REQUIRE(c.ok());
    auto st = c->wait_for(15s);
    BOOST_REQUIRE(st);
    BOOST_TEST(st->exit_code == 2);
    auto diagnostics = testing::read_until_eof(c->stderr_fd(), 5s);
    BOOST_REQUIRE(diagnostics);
    BOOST_TEST(diagnostics->find("key on stdin") != std::string::npos, *diagnostics);
    BOOST_TEST(!fs::exists(tmp.path() / "init.sock"));  // never listened
  }
}

BOOST_AUTO_TEST_CASE(socket_mode_refuses_attaches_that_do_not_prove_the_key) {
  testing::temp_dir marker_dir;
  const auto marker = marker_dir.path() / "ran";
  listening_init init({"/bin/sh", "-c", "touch " + marker.string() + "; sleep 100"});
  auto refused = [&](const std::function<std::string(init_connection&)>& attach, const std::string& why) {
    auto c = init.connect();
    BOOST_REQUIRE(c->next());  // Hello
    c->send(attach(*c));
    auto e = c->next(10s, true);
    BOOST_REQUIRE_MESSAGE(e, why);
    BOOST_TEST((e->type == v1::Message::Error), why);
    BOOST_TEST(e->data.find("authentication failed") != std::string::npos, why << ": " << e->data);
    BOOST_TEST(!c->next(5s, true).has_value(), why);  // closed
  };
  const auto other_key = random_key();
  ferry::wire::handshake_nonce n{};
  BOOST_REQUIRE(ferry::wire::random_bytes(n));
  refused([](init_connection&) { return raw_attach_frame(); }, "no nonce, no mac");
  refused([&](init_connection&) { return raw_attach_frame({}, ferry::wire::socket_protocol, bytes_of(n)); }, "no mac");
  refused([&](init_connection&) { return raw_attach_frame({}, ferry::wire::socket_protocol, bytes_of(n), std::string(32, 'x')); },
          "a made-up mac");
  refused([&](init_connection& c) {
    auto mac = ferry::wire::host_proof(other_key, array_of(*c.hello_nonce), n);
    return raw_attach_frame({}, ferry::wire::socket_protocol, bytes_of(n), bytes_of(*mac));
  }, "another sandbox's key");
  refused([&](init_connection& c) {
    // ferry-init's own proof (the other label) does not pass for a host's.
    auto mac = ferry::wire::init_proof(init.key, array_of(*c.hello_nonce), n);
    return raw_attach_frame({}, ferry::wire::socket_protocol, bytes_of(n), bytes_of(*mac));
  }, "the wrong label");
  refused([&](init_connection& c) {
    auto mac = ferry::wire::host_proof(init.key, array_of(*c.hello_nonce), n);
    return raw_attach_frame({}, ferry::wire::socket_protocol, bytes_of(n), bytes_of(*mac).substr(0, 16));
  }, "a cut mac");
  refused([&](init_connection& c) {
    auto mac = ferry::wire::host_proof(init.key, array_of(*c.hello_nonce), n);
    return raw_attach_frame({}, ferry::wire::socket_protocol, bytes_of(n).substr(0, 31), bytes_of(*mac));
  }, "a short nonce");
  {
    // Replay: a proof that was good for one connection is worthless on the next (new nonce).
    auto first = init.connect();
    BOOST_REQUIRE(first->next());
    const std::string good = first->attach_frame();
    first.reset();
    std::this_thread::sleep_for(100ms);
    refused([&](init_connection&) { return good; }, "a replayed Attach");
  }
  std::this_thread::sleep_for(200ms);
  BOOST_TEST(!fs::exists(marker));  // no refused Attach started the command line
  BOOST_TEST(!init.proc->try_wait().has_value());

  // The real host still attaches, and gets ferry-init's proof back.
  auto host = init.attach();
  BOOST_REQUIRE(host->until([&] { return host->story(1).started.has_value(); }));
  BOOST_REQUIRE(host->until([&] { return fs::exists(marker); }, 10s));
}

BOOST_AUTO_TEST_CASE(socket_mode_does_not_let_an_unauthenticated_connection_hold_the_host_slot) {
  listening_init init({"sleep", "100"});
  // Silent after Hello: dropped after 2 s.
  auto idle = init.connect();
  BOOST_REQUIRE(idle->next());
  const auto t0 = std::chrono::steady_clock::now();
  BOOST_TEST(!idle->next(10s, true).has_value());
  const auto held = std::chrono::steady_clock::now() - t0;
  BOOST_TEST(held >= 1500ms);
  BOOST_TEST(held < 5s);
  // One that has not authenticated yet gives way to the next connection at once.
  auto prober = init.connect();
  BOOST_REQUIRE(prober->next());
  auto host = init.attach();
  auto e = prober->next(5s, true);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->type == v1::Message::Error));
  BOOST_TEST(e->data.find("another connection") != std::string::npos, e->data);
  // An authenticated host keeps the slot: the next connection is refused.
  auto late = init.connect();
  auto refused = late->next();
  BOOST_REQUIRE(refused);
  BOOST_TEST((refused->type == v1::Message::Error));
  BOOST_TEST(refused->data.find("another host") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(socket_mode_refuses_bad_hosts_and_carries_on) {
  listening_init init({"/bin/sh", "-c", "echo hi; sleep 100"});
  auto refused_with = [&](const std::function<std::string(init_connection&)>& bytes, const std::string& needle) {
    auto c = init.connect();
    BOOST_REQUIRE(c->next());  // Hello
    c->send(bytes(*c));
    auto e = c->next(10s, true);
    BOOST_REQUIRE(e);
    BOOST_TEST((e->type == v1::Message::Error));
    BOOST_TEST(e->data.find(needle) != std::string::npos, e->data);
    BOOST_TEST(!c->next(5s, true).has_value());  // closed
    BOOST_TEST(!init.proc->try_wait().has_value());
  };
  auto refused = [&](const std::string& bytes, const std::string& needle) {
    refused_with([&](init_connection&) { return bytes; }, needle);
  };
  refused(protocol2_attach_frame(), "unsupported host protocol 2 (this ferry-init speaks 4)");
  refused(raw_attach_frame({}, 3), "unsupported host protocol 3 (this ferry-init speaks 4)");
  refused(raw_attach_frame({}, 7), "unsupported host protocol 7");
  // Authenticated, but asking for what cannot be: refused all the same.
  refused_with([](init_connection& c) { return c.attach_frame({{1, 5, 0}}); }, "beyond");  // nothing written yet
  refused_with([](init_connection& c) { return c.attach_frame({{9, 0, 0}, {9, 0, 0}}); }, "command 9 twice");
  refused(release_frame(), "before Attach");
  run_request early;
  early.command_id = 2;
  early.argv = {"true"};
  refused(run_frame(early), "before Attach");
  refused(le32(0) + "xxxx", "frame length 0");
  refused(std::string(4, '\xff'), "frame length");
  refused(le32(12) + std::string(12, 'z'), "failed FlatBuffers verification");
  {
    // A message of the wrong direction, after a good Attach: refused (this Attach started the
    // command line).
    auto c = init.connect();
    BOOST_REQUIRE(c->next());
    c->send(c->attach_frame());
    BOOST_REQUIRE(c->until([&] { return c->story(1).out[0] == "hi\n"; }));
    c->send(hello_frame());
    BOOST_REQUIRE(c->until([&] { return !c->events.empty() && c->events.back().type == v1::Message::Error; }));
    BOOST_TEST(c->events.back().data.find("unexpected message type 1 from the host") != std::string::npos);
  }

  auto host = init.attach({{1, 0, 0}});
  BOOST_REQUIRE(host->until([&] { return host->story(1).out[0] == "hi\n"; }));
  // One host at a time: a second one gets Error instead of Hello.
  auto second = init.connect();
  auto e = second->next();
  BOOST_REQUIRE(e);
  BOOST_TEST((e->type == v1::Message::Error));
  BOOST_TEST(e->data.find("another host") != std::string::npos);
  BOOST_TEST(!second->next(5s, true).has_value());
  // The first one is undisturbed; once it is gone, a new host may attach and resume.
  host.reset();
  std::this_thread::sleep_for(100ms);
  auto third = init.connect();
  BOOST_REQUIRE(third->next());
  third->send(third->attach_frame({{1, 3, 0}}));
  BOOST_REQUIRE(third->until([&] { return third->story(1).started.has_value(); }));  // replayed for every host
  std::this_thread::sleep_for(100ms);
  BOOST_TEST(third->story(1).out[0].empty());  // it had all 3 bytes
  third->send(third->attach_frame());  // Attach twice: refused
  BOOST_REQUIRE(third->until([&] { return third->events.back().type == v1::Message::Error; }));
  BOOST_TEST(third->events.back().data.find("Attach sent twice") != std::string::npos);
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
    auto c = init.attach();
    BOOST_REQUIRE(c->until([&] { return c->story(1).started.has_value(); }));
  }  // the host goes away before the output comes
  for (auto deadline = std::chrono::steady_clock::now() + 20s; !fs::exists(done);) {
    BOOST_REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(100ms);
  {
    auto c = init.attach({{1, 0, 0}});
    BOOST_REQUIRE(c->until_over(1));
    auto& s = c->story(1);
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
    auto c = init.attach({{1, all.size() - 10, 2}});
    c->story(1).at[0] = all.size() - 10;
    c->story(1).at[1] = 2;
    BOOST_REQUIRE(c->until_over(1));
    auto& s = c->story(1);
    BOOST_TEST(s.lost[0] == 0u);
    BOOST_TEST(s.out[0] == all.substr(all.size() - 10));
    BOOST_TEST(s.out[1] == "");
    c->send(release_frame());
    BOOST_TEST(!c->next(5s, true));
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
  auto c = init.attach();
  std::this_thread::sleep_for(1s);  // socket buffers fill, then ferry-init stops reading
  BOOST_REQUIRE(c->until_over(1));
  auto& s = c->story(1);
  BOOST_TEST(s.lost[0] == 0u);
  BOOST_TEST(s.out[0].size() == all.size());
  BOOST_TEST((s.out[0] == all));
  c->send(release_frame());
}

BOOST_AUTO_TEST_CASE(socket_mode_gives_up_after_lingering_without_a_host) {
  listening_init init({"true"}, {"--linger-ms", "300"});
  {
    auto c = init.attach();
    BOOST_REQUIRE(c->until_over(1));
  }  // no Release
  auto st = init.proc->wait_for(10s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->exit_code == 3);
  BOOST_TEST(init.diagnostics().find("giving up") != std::string::npos, init.diagnostics());
}

BOOST_AUTO_TEST_CASE(an_idle_sandbox_also_gives_up_after_lingering_and_not_while_a_command_runs) {
  listening_init idle({}, {"--linger-ms", "300"});
  auto st = idle.proc->wait_for(10s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->exit_code == 3);

  listening_init busy({}, {"--linger-ms", "300"});
  {
    auto c = busy.attach();
    run_request sleeper;
    sleeper.command_id = 5;
    sleeper.argv = {"sleep", "1.5"};
    c->send(run_frame(sleeper));
    BOOST_REQUIRE(c->until([&] { return c->story(5).started.has_value(); }));
  }
  std::this_thread::sleep_for(1s);
  BOOST_TEST(!busy.proc->try_wait().has_value());  // sleep still runs
  auto c = busy.attach({{5, 0, 0}});
  BOOST_REQUIRE(c->until_over(5));
  BOOST_TEST(c->story(5).exited->exit_code == 0);
}
