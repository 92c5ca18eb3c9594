#define BOOST_TEST_MODULE sandbox_init_client
#include <boost/test/unit_test.hpp>

// The host side of ferry-init's protocol (sandbox/src/init_client.h, shared by every backend)
// against a scripted ferry-init on a socketpair: the handshake (protocol, both proofs of the key,
// impostors, garbled and replayed frames),
// requests written from other threads while the reader serves, per-command checks of what
// ferry-init sends, the command line's automatic Release, and hostile frames from ferry-init (a
// fixed-seed fuzz loop: a protocol error, never a crash).

#include <sys/socket.h>

#include <atomic>
#include <functional>
#include <random>
#include <set>
#include <thread>
#include <tuple>

#include <fmt/format.h>

#include "init_client.h"
#include "init_test_support.h"
#include "backend_test_support.h"

using namespace ferry::sandbox;
using namespace ferry::sandbox::testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using ferry::sandbox::detail::init_client;

namespace {

std::string hello(uint16_t protocol = ferry::wire::socket_protocol, std::optional<std::string> nonce = std::string(32, 'n')) {
  flatbuffers::FlatBufferBuilder fbb;
  auto n = nonce ? fbb.CreateVector(reinterpret_cast<const uint8_t*>(nonce->data()), nonce->size())
                 : flatbuffers::Offset<flatbuffers::Vector<uint8_t>>();
  return frame(fbb, v1::Message::Hello, v1::CreateHello(fbb, protocol, 1, n));
}
std::string attached(std::optional<std::string> mac = std::nullopt) {
  flatbuffers::FlatBufferBuilder fbb;
  auto m = mac ? fbb.CreateVector(reinterpret_cast<const uint8_t*>(mac->data()), mac->size())
               : flatbuffers::Offset<flatbuffers::Vector<uint8_t>>();
  return frame(fbb, v1::Message::Attached, v1::CreateAttached(fbb, 0, 0, m));
}
std::string error_frame(const std::string& why) {
  flatbuffers::FlatBufferBuilder fbb;
  return frame(fbb, v1::Message::Error, v1::CreateError(fbb, fbb.CreateString(why)));
}
std::string started(uint32_t id) {
  flatbuffers::FlatBufferBuilder fbb;
  std::vector<std::string> argv{"x", "y"};
  return frame(fbb, v1::Message::Started, v1::CreateStarted(fbb, id, 10, fbb.CreateVectorOfStrings(argv), 10));
}
std::string output(uint32_t id, int stream, uint64_t offset, const std::string& data) {
  flatbuffers::FlatBufferBuilder fbb;
  auto d = fbb.CreateVector(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  return frame(fbb, v1::Message::Output, v1::CreateOutput(fbb, id, static_cast<uint8_t>(stream), d, offset));
}
std::string gap(uint32_t id, int stream, uint64_t offset, uint64_t lost) {
  flatbuffers::FlatBufferBuilder fbb;
  return frame(fbb, v1::Message::OutputGap, v1::CreateOutputGap(fbb, id, static_cast<uint8_t>(stream), offset, lost));
}
std::string truncated(uint32_t id, uint64_t out, uint64_t err) {
  flatbuffers::FlatBufferBuilder fbb;
  return frame(fbb, v1::Message::OutputTruncated, v1::CreateOutputTruncated(fbb, id, out, err, fbb.CreateString("/w/f.log")));
}
std::string exited(uint32_t id, int code = 0, v1::ExitReason reason = v1::ExitReason::Exited) {
  flatbuffers::FlatBufferBuilder fbb;
  v1::ExitedBuilder b(fbb);
  b.add_command_id(id);
  b.add_exit_code(code);
  b.add_reason(reason);
  b.add_user_cpu_ms(12);
  b.add_max_rss_kib(3456);
  b.add_truncated_bytes(7);
  return frame(fbb, v1::Message::Exited, b.Finish());
}
std::string command_error(uint32_t id, const std::string& why) {
  flatbuffers::FlatBufferBuilder fbb;
  return frame(fbb, v1::Message::CommandError,
               v1::CreateCommandError(fbb, id, v1::CommandErrorCode::ExecFailed, fbb.CreateString(why)));
}

/// A client and a scripted ferry-init on the two ends of a socketpair.
struct pair_fixture {
  int host = -1, init = -1;
  frame_decoder from_host;  // what the client wrote
  ferry::wire::handshake_key key = random_key();
  ferry::wire::handshake_nonce nonce{};  // the scripted ferry-init's, in its last Hello

  pair_fixture() {
    int sv[2];
    BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    host = sv[0];
    init = sv[1];
  }
  ~pair_fixture() {
    if (host >= 0)
      ::close(host);
    if (init >= 0)
      ::close(init);
  }
  void say(const std::string& bytes) const {
    BOOST_REQUIRE(::send(init, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
  }
  /// The next frame the client wrote (flattened to its type and, for Run, a few fields).
  const v1::InitMessage* heard(std::chrono::milliseconds timeout = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (from_host.next() == frame_decoder::status::message)
        return from_host.msg();
      if (std::chrono::steady_clock::now() > deadline)
        return nullptr;
      pollfd p{init, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0)
        continue;
      char buf[65536];
      ssize_t n = ::recv(init, buf, sizeof buf, 0);
      if (n <= 0)
        return nullptr;
      from_host.feed(buf, static_cast<size_t>(n));
    }
  }
  void close_init() {
    ::close(init);
    init = -1;
  }

  /// ferry-init's proof for an Attach (what the real one sends in Attached).
  std::string proof_for(const v1::Attach& a, const ferry::wire::handshake_key& k) const {
    auto host_nonce = ferry::wire::nonce_from(a.nonce() ? a.nonce()->data() : nullptr, a.nonce() ? a.nonce()->size() : 0);
    BOOST_REQUIRE(host_nonce);
    auto mac = ferry::wire::init_proof(k, *host_nonce, nonce);
    BOOST_REQUIRE(mac);
    return bytes_of(*mac);
  }

  /// Plays ferry-init's side of a handshake with `c` (which runs on a thread meanwhile): Hello
  /// with a fresh nonce, the client's Attach checked for its proof, then `answer(attach)` — by
  /// default a proper Attached. Returns the client's result.
  ferry::result<void> handshake(init_client& c, const std::function<std::string(const v1::Attach&)>& answer = {}) {
    BOOST_REQUIRE(ferry::wire::random_bytes(nonce));
    ferry::result<void> r;
    std::thread client([&] { r = c.handshake(host, key, 5s); });
    say(hello(ferry::wire::socket_protocol, bytes_of(nonce)));
    const v1::InitMessage* m = heard();
    if (m && m->message_type() == v1::Message::Attach) {
      const v1::Attach& a = *m->message_as_Attach();
      BOOST_TEST(a.protocol() == ferry::wire::socket_protocol);
      auto host_nonce = ferry::wire::nonce_from(a.nonce() ? a.nonce()->data() : nullptr, a.nonce() ? a.nonce()->size() : 0);
      BOOST_REQUIRE(host_nonce);
      BOOST_TEST(ferry::wire::proof_matches(ferry::wire::host_proof(key, nonce, *host_nonce), a.mac() ? a.mac()->data() : nullptr,
                                            a.mac() ? a.mac()->size() : 0),
                 "the client's Attach does not prove the key");
      say(answer ? answer(a) : attached(proof_for(a, key)));
    }
    client.join();
    return r;
  }
};

}  // namespace

BOOST_FIXTURE_TEST_CASE(handshake_refuses_another_protocol_with_a_clear_error, pair_fixture) {
  recording_observer obs;
  for (uint16_t old : {2, 3}) {
    pair_fixture p;
    init_client c(obs, {}, std::nullopt);
    p.say(hello(old, std::nullopt));
    auto r = c.handshake(p.host, p.key, 5s);
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.error().message.find(fmt::format("ferry-init speaks protocol {}, this host needs 4", old)) != std::string::npos,
               r.error().message);
    BOOST_TEST(!c.peer_failed_authentication());  // an old ferry-init, not an impostor
    BOOST_TEST(!p.heard(200ms));                  // no Attach: nothing is said to it
  }
}

BOOST_FIXTURE_TEST_CASE(handshake_proves_the_key_both_ways_with_fresh_nonces, pair_fixture) {
  recording_observer obs;
  std::set<std::string> host_nonces;
  for (int i = 0; i < 3; ++i) {
    pair_fixture p;
    init_client c(obs, {}, std::nullopt);
    std::string seen;
    BOOST_REQUIRE(p.handshake(c, [&](const v1::Attach& a) {
                     seen.assign(reinterpret_cast<const char*>(a.nonce()->data()), a.nonce()->size());
                     return attached(p.proof_for(a, p.key));
                   }).ok());
    BOOST_TEST(host_nonces.insert(seen).second);  // a fresh challenge every time
    BOOST_TEST(!c.peer_failed_authentication());
  }
}

BOOST_FIXTURE_TEST_CASE(handshake_takes_nothing_that_does_not_prove_the_key, pair_fixture) {
  // Impostors: each answers the Attach without ferry-init's proof. The client says so, marks the
  // peer as failed authentication, and writes nothing after its Attach.
  const auto other_key = random_key();
  std::string replayed;  // a good Attached from an earlier connection
  {
    pair_fixture p;
    recording_observer obs;
    init_client c(obs, {}, std::nullopt);
    BOOST_REQUIRE(p.handshake(c, [&](const v1::Attach& a) { return replayed = attached(p.proof_for(a, p.key)); }).ok());
  }
  struct impostor {
    std::string name;
    std::function<std::string(pair_fixture&, const v1::Attach&)> answer;
  };
  std::vector<impostor> cases{
      {"no mac", [](pair_fixture&, const v1::Attach&) { return attached(); }},
      {"a made-up mac", [](pair_fixture&, const v1::Attach&) { return attached(std::string(32, 'm')); }},
      {"another key's proof", [&](pair_fixture& p, const v1::Attach& a) { return attached(p.proof_for(a, other_key)); }},
      {"a cut proof", [](pair_fixture& p, const v1::Attach& a) { return attached(p.proof_for(a, p.key).substr(0, 31)); }},
      {"the host's own proof sent back", [](pair_fixture&, const v1::Attach& a) {
         return attached(std::string(reinterpret_cast<const char*>(a.mac()->data()), a.mac()->size()));
       }},
      {"a replayed Attached", [&](pair_fixture&, const v1::Attach&) { return replayed; }},
      {"Started instead of Attached", [](pair_fixture&, const v1::Attach&) { return started(1); }},
  };
  for (const auto& k : cases) {
    pair_fixture p;
    recording_observer obs;
    init_client c(obs, {}, std::nullopt);
    auto r = p.handshake(c, [&](const v1::Attach& a) { return k.answer(p, a); });
    BOOST_REQUIRE_MESSAGE(!r.ok(), k.name);
    BOOST_TEST(r.error().message.find("ferry-init failed authentication") != std::string::npos, k.name << ": " << r.error().message);
    BOOST_TEST(c.peer_failed_authentication(), k.name);
    BOOST_TEST(!p.heard(200ms), k.name);
  }
  {
    // A Hello of this protocol without a valid nonce is no ferry-init's either.
    pair_fixture p;
    recording_observer obs;
    init_client c(obs, {}, std::nullopt);
    p.say(hello(ferry::wire::socket_protocol, std::string(31, 'n')));
    auto r = c.handshake(p.host, p.key, 5s);
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.error().message.find("ferry-init failed authentication: its Hello carries no valid nonce") != std::string::npos,
               r.error().message);
    BOOST_TEST(c.peer_failed_authentication());
    BOOST_TEST(!p.heard(200ms));
  }
}

BOOST_FIXTURE_TEST_CASE(handshake_garbled_frames_fail_without_blaming_the_peer, pair_fixture) {
  // Garbage is a failed attach (the sandbox is not killed for it), unlike a wrong proof.
  recording_observer obs;
  {
    pair_fixture p;
    init_client c(obs, {}, std::nullopt);
    p.say(le32(12) + std::string(12, 'z'));
    auto r = c.handshake(p.host, p.key, 5s);
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.error().message.find("failed FlatBuffers verification") != std::string::npos, r.error().message);
    BOOST_TEST(!c.peer_failed_authentication());
  }
  {
    pair_fixture p;
    init_client c(obs, {}, std::nullopt);
    std::string good;
    auto r = p.handshake(c, [&](const v1::Attach& a) {
      good = attached(p.proof_for(a, p.key));
      std::string bad = good;
      bad[bad.size() - 10] ^= 0x55;  // the proof's bytes, or the frame no longer verifies
      return bad;
    });
    BOOST_REQUIRE(!r.ok());
  }
  {
    // ferry-init refusing our proof (a wrong key on file) is a refusal, not an impostor.
    pair_fixture p;
    init_client c(obs, {}, std::nullopt);
    auto r = p.handshake(c, [](const v1::Attach&) {
      return error_frame("authentication failed: the Attach does not prove this sandbox's key");
    });
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.error().message.find("ferry-init refused the attach: authentication failed") != std::string::npos);
    BOOST_TEST((r.error().code == ferry::errc::failed));
    BOOST_TEST(!c.peer_failed_authentication());
  }
}

BOOST_FIXTURE_TEST_CASE(handshake_sends_the_resume_points_and_maps_refusals, pair_fixture) {
  recording_observer obs;
  std::vector<resume_point> from{{4, 10, 20, false}, {5, 1, 2, true}};
  init_client c(obs, from, std::nullopt);
  std::vector<std::tuple<uint32_t, uint64_t, uint64_t, bool>> resume;
  auto r = handshake(c, [&](const v1::Attach& a) {
    for (const auto* e : *a.resume())
      resume.emplace_back(e->command_id(), e->stdout_offset(), e->stderr_offset(), e->exited());
    return error_frame("another host is attached to this sandbox");
  });
  BOOST_REQUIRE(!r.ok());
  BOOST_REQUIRE(resume.size() == 2u);
  BOOST_TEST((resume[0] == std::make_tuple(4u, uint64_t{10}, uint64_t{20}, false)));
  BOOST_TEST(std::get<3>(resume[1]));
  // "another host" on Hello is errc::busy; so is being superseded before authenticating.
  for (const std::string& why : {std::string("another host is attached to this sandbox"),
                                 std::string("another connection arrived before this one authenticated")}) {
    pair_fixture busy;
    init_client b(obs, {}, std::nullopt);
    busy.say(error_frame(why));
    auto rb = b.handshake(busy.host, busy.key, 5s);
    BOOST_REQUIRE(!rb.ok());
    BOOST_TEST((rb.error().code == ferry::errc::busy), why);
  }
  pair_fixture superseded;
  init_client s2(obs, {}, std::nullopt);
  auto rs = superseded.handshake(s2, [](const v1::Attach&) {
    return error_frame("another connection arrived before this one authenticated");
  });
  BOOST_TEST((rs.error().code == ferry::errc::busy));
}

BOOST_FIXTURE_TEST_CASE(requests_from_any_thread_are_written_while_serving, pair_fixture) {
  recording_observer obs;
  init_client c(obs, {}, std::nullopt);
  BOOST_REQUIRE(handshake(c).ok());
  std::atomic<bool> stop{false};
  std::thread reader([&] { c.serve(host, [&] { return stop.load(); }); });
  std::vector<std::thread> callers;
  for (uint32_t t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      for (uint32_t i = 1; i <= 25; ++i) {
        command_spec s;
        s.command_id = t * 100 + i;
        s.shell = fmt::format("echo {}", s.command_id);
        s.env = {"A=1"};
        s.timeout = 1500ms;
        s.output_limit_bytes = 0;
        BOOST_TEST(c.run(s).ok());
      }
    });
  }
  for (auto& t : callers)
    t.join();
  command_spec dup;
  dup.command_id = 101;
  dup.argv = {"true"};
  BOOST_TEST((c.run(dup).error().code == ferry::errc::conflict));
  BOOST_TEST(c.signal(7, SIGTERM, false).ok());
  BOOST_TEST(c.write_stdin(7, std::string(700u << 10, 'x'), true).ok());  // split in two frames
  std::set<uint32_t> runs;
  int stdin_frames = 0;
  bool signal_seen = false;
  for (int i = 0; i < 103; ++i) {
    auto* m = heard();
    BOOST_REQUIRE(m);
    if (m->message_type() == v1::Message::Run) {
      const auto* r = m->message_as_Run();
      runs.insert(r->command_id());
      BOOST_TEST(r->shell()->str() == fmt::format("echo {}", r->command_id()));
      BOOST_TEST(r->timeout_ms() == 1500u);
      BOOST_TEST(r->output_limit_bytes() == 0u);
      BOOST_TEST(r->env()->Get(0)->str() == "A=1");
    } else if (m->message_type() == v1::Message::Signal) {
      signal_seen = m->message_as_Signal()->command_id() == 7 && !m->message_as_Signal()->group();
    } else if (m->message_type() == v1::Message::Stdin) {
      ++stdin_frames;
      BOOST_TEST(m->message_as_Stdin()->close() == (stdin_frames == 2));
    }
  }
  BOOST_TEST(runs.size() == 100u);
  BOOST_TEST(signal_seen);
  BOOST_TEST(stdin_frames == 2);
  // A Run's story, and a refused one.
  say(started(101) + output(101, 0, 0, "101\n") + exited(101, 0) + command_error(102, "command 102: no"));
  BOOST_REQUIRE(obs.wait_for_end(101, 5s) && obs.wait_for_end(102, 5s));
  auto e = obs.find("exited", 101);
  BOOST_TEST(e->exit.user_cpu_ms == 12u);
  BOOST_TEST(e->exit.max_rss_kib == 3456u);
  BOOST_TEST(e->exit.truncated_bytes == 7u);
  BOOST_TEST(obs.find("failed", 102)->data == "command 102: no");
  // An ended id may be used again (ferry-init decides whether it still keeps it).
  BOOST_TEST(c.run(dup).ok());
  BOOST_TEST(c.release().ok());
  BOOST_TEST((c.release().error().code == ferry::errc::closed));
  BOOST_TEST((c.run(dup).error().code == ferry::errc::closed));
  for (const v1::InitMessage* m = heard(); m; m = heard(1s)) {
    if (m->message_type() == v1::Message::Release)
      break;
  }
  close_init();
  reader.join();
  BOOST_TEST(c.release_sent());
  BOOST_TEST(!c.protocol_error().has_value());
}

BOOST_FIXTURE_TEST_CASE(the_command_line_ending_releases_the_sandbox, pair_fixture) {
  recording_observer obs;
  init_client c(obs, {}, 1u);
  BOOST_REQUIRE(handshake(c).ok());
  say(started(1) + output(1, 0, 0, "hi\n") + exited(1, 3));
  std::thread reader([&] { c.serve(host, [] { return false; }); });
  auto* m = heard();
  BOOST_REQUIRE(m);
  BOOST_TEST((m->message_type() == v1::Message::Release));
  close_init();
  reader.join();
  BOOST_TEST(c.release_sent());
  BOOST_TEST(c.command_line_exited());
  BOOST_TEST(obs.output(1u, 0) == "hi\n");
  BOOST_TEST(obs.find("exited", 1)->exit_code == 3);
}

BOOST_AUTO_TEST_CASE(what_ferry_init_must_not_send_is_a_protocol_error) {
  struct bad_case {
    std::string frames;
    std::string needle;
  };
  std::vector<bad_case> cases{
      {output(1, 0, 0, "x"), "Output for command 1, which is not running"},
      {started(1) + started(1), "Started twice for command 1"},
      {started(1) + output(1, 0, 5, "x"), "Output of stream 0 at offset 5, expected 0"},
      {started(1) + output(1, 2, 0, "x"), "unknown stream 2"},
      {started(1) + gap(1, 0, 0, 0), "OutputGap of stream 0"},
      {started(1) + gap(1, 1, 0, UINT64_MAX) + gap(1, 1, UINT64_MAX, 1), "OutputGap of stream 1"},
      {started(1) + truncated(1, 3, 0), "OutputTruncated at offsets 3/0, expected 0/0"},
      {started(1) + truncated(1, 0, 0) + output(1, 0, 0, "x"), "after OutputTruncated"},
      {started(1) + exited(1) + exited(1), "Exited for command 1, which is not running"},
      {command_error(5, "no"), "CommandError for command 5, which was not asked for"},
      {started(1) + command_error(1, "no"), "CommandError for command 1"},
      {attached(), "Attached after the handshake"},
      {hello(), "Hello after the handshake"},
      {run_frame([] { run_request r; r.command_id = 1; r.argv = {"x"}; return r; }()), "host message Run from ferry-init"},
      {release_frame(), "host message Release"},
      {le32(0) + "xxxx", "frame length 0"},
  };
  for (const auto& k : cases) {
    pair_fixture p;
    recording_observer obs;
    init_client c(obs, {}, std::nullopt);
    BOOST_REQUIRE(p.handshake(c).ok());
    p.say(k.frames);
    p.close_init();
    c.serve(p.host, [] { return false; });
    BOOST_REQUIRE_MESSAGE(c.protocol_error().has_value(), "no protocol error for: " << k.needle);
    BOOST_TEST(c.protocol_error()->find(k.needle) != std::string::npos, *c.protocol_error());
  }
}

BOOST_AUTO_TEST_CASE(hostile_frames_from_ferry_init_never_crash_the_host) {
  // Valid ferry-init frames, mutated and shuffled: after each script, the client either got
  // through (a consistent story) or recorded a protocol error; ASan/UBSan watch for the rest.
  std::vector<std::string> seeds{started(1),          started(2),           output(1, 0, 0, "abc"), output(1, 1, 0, "e"),
                                 gap(1, 0, 3, 10),    truncated(1, 3, 1),   exited(1),              exited(2, 1),
                                 command_error(2, "x"), attached(),         hello(),                output(2, 0, 0, std::string(70000, 'z'))};
  {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<std::string> huge(20000, "arg");
    seeds.push_back(frame(fbb, v1::Message::Started, v1::CreateStarted(fbb, 3, 1, fbb.CreateVectorOfStrings(huge))));
  }
  std::mt19937 rng(8086);
  int errors = 0, clean = 0;
  for (int round = 0; round < 500; ++round) {
    pair_fixture p;
    recording_observer obs;
    std::vector<resume_point> from{{2, 0, 0, false}};
    init_client c(obs, from, round % 3 == 0 ? std::optional<uint32_t>(1) : std::nullopt);
    std::string script;
    for (int k = 0; k < 1 + static_cast<int>(rng() % 6); ++k) {
      std::string f = seeds[rng() % seeds.size()];
      switch (rng() % 5) {
        case 0:
          f = f.substr(0, 1 + rng() % (f.size() - 1));
          break;
        case 1:
          for (int n = 0; n < 3; ++n)
            f[4 + rng() % (f.size() - 4)] ^= static_cast<char>(1 + rng() % 255);
          break;
        case 2:
          f = le32(static_cast<uint32_t>(rng())) + f.substr(4);
          break;
        default:
          break;
      }
      script += f;
    }
    BOOST_REQUIRE(p.handshake(c).ok());
    // Written by a thread: the script may be larger than the socket buffers.
    std::thread writer([&] {
      [[maybe_unused]] ssize_t n = ::send(p.init, script.data(), script.size(), MSG_NOSIGNAL);
      ::shutdown(p.init, SHUT_WR);
    });
    c.serve(p.host, [] { return false; });
    ::shutdown(p.host, SHUT_RDWR);  // a serve() that stopped early unblocks the writer
    writer.join();
    if (c.protocol_error())
      ++errors;
    else
      ++clean;
  }
  BOOST_TEST_MESSAGE(fmt::format("500 scripts: {} protocol errors, {} consistent", errors, clean));
  BOOST_TEST(errors > 100);
  BOOST_TEST(clean > 10);
}

BOOST_FIXTURE_TEST_CASE(file_operations_block_until_answered_and_map_errors, pair_fixture) {
  recording_observer obs;
  init_client c(obs, {}, std::nullopt);
  BOOST_REQUIRE(handshake(c).ok());
  std::thread reader([&] { c.serve(host, [] { return false; }); });
  // The scripted ferry-init answers each request as it comes: a ReadResult, a NotUnique error, a
  // GrepResult, then an answer to a request never made (a protocol error).
  std::thread script([&] {
    for (int i = 0; i < 3; ++i) {
      const v1::InitMessage* m = heard(10s);
      if (!m || m->message_type() != v1::Message::FileRequest)
        return;
      const auto* r = m->message_as_FileRequest();
      flatbuffers::FlatBufferBuilder fbb;
      if (r->op_type() == v1::FileOp::ReadFile) {
        BOOST_TEST(r->op_as_ReadFile()->path()->str() == "src/a.cpp");
        BOOST_TEST(r->op_as_ReadFile()->offset() == 3u);
        auto res = v1::CreateReadResult(fbb, fbb.CreateString("/workspace/src/a.cpp"), fbb.CreateString("     3\tx\n"), 3, 1,
                                        false, true, 4, 99);
        say(frame(fbb, v1::Message::FileResponse, v1::CreateFileResponse(fbb, r->request_id(), v1::FileReply::ReadResult, res.Union())));
      } else if (r->op_type() == v1::FileOp::EditFile) {
        say(frame(fbb, v1::Message::FileError,
                  v1::CreateFileError(fbb, r->request_id(), v1::FileErrorCode::NotUnique, fbb.CreateString("/w/a: occurs 2 times"))));
      } else {
        std::vector<flatbuffers::Offset<v1::GrepLine>> lines{
            v1::CreateGrepLine(fbb, fbb.CreateString("a.cpp"), 7, fbb.CreateString("int x;"), true)};
        auto res = v1::CreateGrepResult(fbb, fbb.CreateString("/workspace"), fbb.CreateVector(lines), 1, 1, false,
                                        fbb.CreateString("rg"));
        say(frame(fbb, v1::Message::FileResponse, v1::CreateFileResponse(fbb, r->request_id(), v1::FileReply::GrepResult, res.Union())));
      }
    }
  });
  ferry::sandbox::read_options ro;
  ro.offset = 3;
  auto t = c.read_file("src/a.cpp", ro);
  BOOST_REQUIRE_MESSAGE(t.ok(), (t.ok() ? "" : t.error().message));
  BOOST_TEST(t->content == "     3\tx\n");
  BOOST_TEST(t->more);
  BOOST_TEST(t->next_line == 4u);
  BOOST_TEST(t->size == 99u);
  auto e = c.edit_file("a", "x", "y", false);
  BOOST_REQUIRE(!e.ok());
  BOOST_TEST((e.error().code == ferry::errc::invalid_argument));
  BOOST_TEST(e.error().message == "/w/a: occurs 2 times");
  auto g = c.grep("int", {});
  BOOST_REQUIRE(g.ok());
  BOOST_TEST(g->engine == "rg");
  BOOST_REQUIRE(g->lines.size() == 1u);
  BOOST_TEST(g->lines[0].line == 7u);
  BOOST_TEST(g->lines[0].match);
  script.join();
  // An answer nobody asked for: a protocol error, which ends serve(); a caller still waiting
  // (none here) and any later one get errc::closed once the client is closed.
  {
    flatbuffers::FlatBufferBuilder fbb;
    say(frame(fbb, v1::Message::FileError, v1::CreateFileError(fbb, 999, v1::FileErrorCode::Failed, fbb.CreateString("?"))));
  }
  reader.join();
  BOOST_REQUIRE(c.protocol_error());
  BOOST_TEST(c.protocol_error()->find("file answer for request 999, which was never made") != std::string::npos);
  c.close();
  BOOST_TEST((c.list_dir("", 10).error().code == ferry::errc::closed));
}

BOOST_FIXTURE_TEST_CASE(a_file_operation_waiting_when_the_sandbox_ends_fails_closed, pair_fixture) {
  recording_observer obs;
  init_client c(obs, {}, std::nullopt);
  BOOST_REQUIRE(handshake(c).ok());
  std::thread reader([&] { c.serve(host, [] { return false; }); });
  std::thread caller([&] {
    auto r = c.glob("**/*.cpp", {});
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST((r.error().code == ferry::errc::closed), r.error().message);
  });
  BOOST_REQUIRE(heard());  // the request: never answered
  close_init();
  reader.join();
  c.close();  // what the runtime does once serve() returned
  caller.join();
}
