#define BOOST_TEST_MODULE sandbox_recovery
#include <boost/test/unit_test.hpp>

// Sandboxes outliving their owner: a real owner crash (SIGKILL of sandbox_owner mid-run) and
// re-attach from a new runtime, attach after the command finished, output gaps, attach errors,
// impostors and garbage on the control socket, and the bounded linger. Real sandboxes of the
// backend under test (built once per backend: sandbox_runsc_recovery_test,
// sandbox_bwrap_recovery_test); needs root and the backend (skipped with a message otherwise).

#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/frame.h"
#include "backend_test_support.h"
#include "ferry/schemas/handshake.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace v1 = ferry::init::v1;
using steady = std::chrono::steady_clock;
using testing::recording_observer;

namespace {

std::string unique_id(const std::string& what) { return testing::unique_id("fr", what); }

using testing::file_content;

/// `<prefix> 0\n` … `<prefix> n-1\n`.
std::string numbered_lines(const std::string& prefix, int n) {
  std::string s;
  for (int i = 0; i < n; ++i)
    s += fmt::format("{} {}\n", prefix, i);
  return s;
}

struct fixture {
  testing::temp_dir tmp;
  std::unique_ptr<sandbox_runtime> runtime;

  fixture() { runtime = make_runtime(); }

  std::unique_ptr<sandbox_runtime> make_runtime(uint64_t buffer_bytes = 8u << 20,
                                                std::chrono::milliseconds linger = 10min) const {
    auto o = testing::test_config(tmp.path());
    o.output_buffer_bytes = buffer_bytes;
    o.linger = linger;
    auto r = ferry::sandbox::make_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    return std::move(*r);
  }

  fs::path sandbox_dir(const std::string& id) const { return tmp.path() / "sandboxes" / id; }

  std::unique_ptr<sandbox> start(sandbox_runtime& rt, const std::string& id, std::vector<std::string> argv,
                                 sandbox_observer& obs) {
    sandbox_spec spec;
    spec.id = id;
    spec.argv = std::move(argv);
    auto s = rt.start(spec, obs);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    return std::move(*s);
  }

  /// A running sandbox (`sleep 600`) whose owner let go of it.
  std::string detached_sleeper() {
    recording_observer obs;
    const auto id = unique_id("sleeper");
    auto sb = start(*runtime, id, {"sleep", "600"}, obs);
    BOOST_REQUIRE(obs.wait_for("started", 20s));
    sb->detach();
    return id;
  }

  /// Kills a sandbox through a fresh attach and checks it is gone.
  void kill_via_attach(const std::string& id) {
    recording_observer obs;
    auto sb = make_runtime()->attach(id, resume_point{}, obs);
    BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));
    (*sb)->kill();
    (*sb)->wait();
    BOOST_TEST(!fs::exists(sandbox_dir(id)));
    BOOST_TEST(testing::processes_mentioning(id).empty());
  }
};

// --- a fake ferry-init on the control socket --------------------------------------------------

/// Moves the sandbox's real socket aside and listens at its place; restore() puts it back.
class impostor {
 public:
  explicit impostor(const fs::path& ctl) : ctl_(ctl) {
    fs::rename(ctl_ / "init.sock", ctl_ / "real.sock");
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const std::string path = (ctl_ / "init.sock").string();
    BOOST_REQUIRE(path.size() < sizeof addr.sun_path);
    std::memcpy(addr.sun_path, path.data(), path.size());
    BOOST_REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    BOOST_REQUIRE(::listen(fd_, 4) == 0);
  }
  ~impostor() { restore(); }
  void restore() {
    if (fd_ < 0)
      return;
    ::close(fd_);
    fd_ = -1;
    std::error_code ec;  // the sandbox (and its directory) may be gone by now
    fs::remove(ctl_ / "init.sock", ec);
    fs::rename(ctl_ / "real.sock", ctl_ / "init.sock", ec);
  }
  /// Serves one connection with `script` on a thread; join() before the next.
  void serve(std::function<void(int)> script) {
    thread_ = std::thread([this, script = std::move(script)] {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 10000) <= 0)
        return;
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0)
        return;
      script(c);
      ::close(c);
    });
  }
  void join() {
    if (thread_.joinable())
      thread_.join();
  }

 private:
  fs::path ctl_;
  int fd_ = -1;
  std::thread thread_;
};

void send_bytes(int fd, const std::string& bytes) {
  [[maybe_unused]] ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
}

std::string hello_frame(const ferry::wire::handshake_nonce& nonce) {
  flatbuffers::FlatBufferBuilder fbb;
  auto h = v1::CreateHello(fbb, ferry::wire::socket_protocol, 1, fbb.CreateVector(nonce.data(), nonce.size()));
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::Hello, h);
  return out;
}

std::string started_frame() {
  flatbuffers::FlatBufferBuilder fbb;
  std::vector<std::string> argv{"sleep", "600"};
  auto s = v1::CreateStarted(fbb, 1, 2, fbb.CreateVectorOfStrings(argv));
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::Started, s);
  return out;
}

std::string attached_frame(const ferry::wire::handshake_mac& mac) {
  flatbuffers::FlatBufferBuilder fbb;
  auto a = v1::CreateAttached(fbb, 1, 1, fbb.CreateVector(mac.data(), mac.size()));
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::Attached, a);
  return out;
}

std::string output_frame(uint64_t offset, const std::string& data) {
  flatbuffers::FlatBufferBuilder fbb;
  auto bytes = fbb.CreateVector(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  auto o = v1::CreateOutput(fbb, 1, 0, bytes, offset);
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::Output, o);
  return out;
}

/// Reads the host's Attach frame, so the script answers after it; returns its nonce (zeros if
/// none came).
ferry::wire::handshake_nonce read_attach(int fd) {
  ferry::wire::frame_decoder d;
  char buf[512];
  for (auto deadline = steady::now() + 10s; steady::now() < deadline;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0)
      continue;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0)
      break;
    d.feed(buf, static_cast<size_t>(n));
    if (d.next() == ferry::wire::frame_decoder::status::message && d.msg()->message_type() == v1::Message::Attach) {
      const auto* a = d.msg()->message_as_Attach();
      if (auto nonce = ferry::wire::nonce_from(a->nonce() ? a->nonce()->data() : nullptr, a->nonce() ? a->nonce()->size() : 0))
        return *nonce;
      break;
    }
  }
  return {};
}

ferry::wire::handshake_nonce random_nonce() {
  ferry::wire::handshake_nonce n{};
  BOOST_REQUIRE(ferry::wire::random_bytes(n));
  return n;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(recovery, *boost::unit_test::precondition(&testing::backend_available))

BOOST_FIXTURE_TEST_CASE(a_sandbox_survives_its_owners_sigkill_and_resumes_after_the_persisted_offsets, fixture) {
  const auto id = unique_id("crash");
  const int lines = 300;
  const std::string script = fmt::format(
      "i=0; while [ $i -lt {0} ]; do echo \"line $i\"; echo \"err $i\" >&2; i=$((i+1)); sleep 0.01; done; exit 7",
      lines);
  spawn_options o;
  o.argv = {FERRY_SANDBOX_OWNER, testing::test_backend(), tmp.path().string(), id, "/bin/sh", "-c", script};
  o.out = stdio::pipe;
  o.err = stdio::pipe;
  auto owner = child_process::spawn(o);
  BOOST_REQUIRE(owner.ok());
  // Kill the owner once it has some output, well before the command ends.
  bool enough = false;
  for (auto deadline = steady::now() + 30s; !enough && steady::now() < deadline;) {
    auto line = testing::read_line(owner->stdout_fd(), 10s);
    BOOST_REQUIRE_MESSAGE(line, "sandbox_owner stopped reporting");
    BOOST_REQUIRE_MESSAGE(line->rfind("ended", 0) != 0, "the sandbox ended early: " << *line);
    enough = line->rfind("output 0 ", 0) == 0 && std::stoul(line->substr(9)) >= 40 * 7;
  }
  BOOST_REQUIRE(enough);
  auto procs = testing::sandbox_processes(sandbox_dir(id));
  BOOST_REQUIRE(procs.alive().size() >= 3u);
  owner->signal_group(SIGKILL);
  auto st = owner->wait();
  BOOST_TEST(st.signal == SIGKILL);
  // The owner's death took nothing of the sandbox with it.
  BOOST_TEST(procs.alive().size() >= 3u);

  const std::string before_out = file_content(tmp.path() / "received.0");
  const std::string before_err = file_content(tmp.path() / "received.1");
  const std::string all_out = numbered_lines("line", lines), all_err = numbered_lines("err", lines);
  BOOST_REQUIRE(before_out.size() < all_out.size());
  BOOST_REQUIRE(all_out.compare(0, before_out.size(), before_out) == 0);
  BOOST_REQUIRE(all_err.compare(0, before_err.size(), before_err) == 0);

  auto restarted = make_runtime();
  auto live = restarted->list_live();
  BOOST_REQUIRE(live.ok());
  BOOST_TEST((*live == std::vector<std::string>{id}));

  recording_observer obs;
  resume_point from{1, before_out.size(), before_err.size()};
  auto sb = restarted->attach(id, from, obs);
  BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));
  (*sb)->wait();
  auto seq = obs.sequence();
  BOOST_TEST((seq == std::vector<std::string>{"running", "started", "output", "exited", "gone", "ended"}),
             fmt::format("{}", fmt::join(seq, ",")));
  BOOST_TEST(!obs.find("gap"));  // 8 MiB kept: nothing lost in a few seconds
  // Exactly the rest: nothing the owner had is sent again, nothing is missing.
  BOOST_TEST(before_out + obs.output(0) == all_out);
  BOOST_TEST(before_err + obs.output(1) == all_err);
  auto exited = obs.find("exited");
  BOOST_REQUIRE(exited);
  BOOST_TEST(exited->exit_code == 7);
  auto ended = obs.find("ended");
  BOOST_TEST(!ended->failure.has_value(), ended->failure.value_or(""));
  BOOST_TEST(procs.alive().empty());
  BOOST_TEST(testing::processes_mentioning(id).empty());
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
  auto after = restarted->list_live();
  BOOST_REQUIRE(after.ok());
  BOOST_TEST(after->empty());
}

BOOST_FIXTURE_TEST_CASE(attach_after_the_command_finished_reports_the_gap_then_the_kept_output_and_exit, fixture) {
  // A small buffer (64 KiB per stream) and more stdout than that while nobody is attached.
  runtime = make_runtime(64 * 1024);
  recording_observer first;
  const auto id = unique_id("gap");
  auto sb = start(*runtime, id,
                  {"/bin/sh", "-c", "sleep 1; seq 1 60000; echo small >&2; touch /workspace/done; exit 3"}, first);
  BOOST_REQUIRE(first.wait_for("started", 20s));
  sb->detach();
  sb.reset();
  BOOST_TEST(first.output(0).empty());  // detached before the command wrote anything
  for (auto deadline = steady::now() + 30s; !fs::exists(sandbox_dir(id) / "workspace" / "done");) {
    BOOST_REQUIRE(steady::now() < deadline);
    std::this_thread::sleep_for(20ms);
  }
  std::this_thread::sleep_for(200ms);  // the command exits after the touch

  std::string all;
  for (int i = 1; i <= 60000; ++i)
    all += std::to_string(i) + "\n";
  recording_observer obs;
  auto attached = make_runtime(64 * 1024)->attach(id, resume_point{}, obs);
  BOOST_REQUIRE_MESSAGE(attached.ok(), (attached.ok() ? "" : attached.error().message));
  (*attached)->wait();
  auto gap = obs.find("gap");
  BOOST_REQUIRE(gap);
  BOOST_TEST(gap->stream == 0);
  BOOST_TEST(gap->lost_bytes > 0u);
  // What was lost plus what came is the whole stream, and what came is its end.
  const std::string got = obs.output(0);
  BOOST_TEST(gap->lost_bytes + got.size() == all.size());
  BOOST_TEST(got.size() >= 60u * 1024);  // about the buffer's worth is kept
  BOOST_TEST((got == all.substr(all.size() - got.size())));
  BOOST_TEST(obs.output(1) == "small\n");  // stderr fit: no gap there
  auto records = obs.records();
  BOOST_TEST(std::count_if(records.begin(), records.end(), [](auto& r) { return r.what == "gap"; }) == 1);
  BOOST_TEST(obs.find("exited")->exit_code == 3);
  BOOST_TEST(!obs.find("ended")->failure.has_value(), obs.find("ended")->failure.value_or(""));
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_FIXTURE_TEST_CASE(attach_refuses_missing_held_invalid_and_dead_sandboxes_without_killing, fixture) {
  recording_observer obs;
  auto missing = runtime->attach("fr-no-such-sandbox", resume_point{}, obs);
  BOOST_REQUIRE(!missing.ok());
  BOOST_TEST((missing.error().code == ferry::errc::not_found), missing.error().message);

  auto bad = runtime->attach("../etc", resume_point{}, obs);
  BOOST_REQUIRE(!bad.ok());
  BOOST_TEST((bad.error().code == ferry::errc::invalid_argument));

  fs::create_directories(sandbox_dir("fr-bare-dir") / "ctl");
  auto bare = runtime->attach("fr-bare-dir", resume_point{}, obs);
  BOOST_REQUIRE(!bare.ok());
  BOOST_TEST((bare.error().code == ferry::errc::not_found), bare.error().message);

  // Held by this runtime: its own running sandbox.
  recording_observer own_obs;
  const auto own_id = unique_id("own");
  auto own = start(*runtime, own_id, {"sleep", "600"}, own_obs);
  BOOST_REQUIRE(own_obs.wait_for("started", 20s));
  auto held = runtime->attach(own_id, resume_point{}, obs);
  BOOST_REQUIRE(!held.ok());
  BOOST_TEST((held.error().code == ferry::errc::busy), held.error().message);

  // Held by another live host: ferry-init refuses the second connection; the first goes on.
  auto other = make_runtime()->attach(own_id, resume_point{}, obs);
  BOOST_REQUIRE(!other.ok());
  BOOST_TEST((other.error().code == ferry::errc::busy), other.error().message);
  // A resume point beyond the output: refused, and the sandbox is not killed.
  const auto sleeper = detached_sleeper();
  auto beyond = make_runtime()->attach(sleeper, resume_point{1, 100, 0}, obs);
  BOOST_REQUIRE(!beyond.ok());
  BOOST_TEST(beyond.error().message.find("beyond") != std::string::npos, beyond.error().message);
  BOOST_TEST(obs.records().empty());
  // A command the sandbox does not know: the attach succeeds, that command is reported failed
  // (its story is lost), and the command the host did not name comes whole.
  recording_observer wrong_obs;
  auto wrong_command = make_runtime()->attach(sleeper, resume_point{9, 0, 0}, wrong_obs);
  BOOST_REQUIRE_MESSAGE(wrong_command.ok(), (wrong_command.ok() ? "" : wrong_command.error().message));
  BOOST_REQUIRE(wrong_obs.wait_for("failed", 10s));
  BOOST_TEST(wrong_obs.find("failed")->command_id == 9u);
  BOOST_TEST(wrong_obs.find("failed")->data.find("command 9 is not known here") != std::string::npos);
  BOOST_REQUIRE(wrong_obs.wait_for("started", 10s));
  BOOST_TEST(wrong_obs.find("started")->command_id == 1u);
  (*wrong_command)->detach();

  BOOST_TEST(!own_obs.find("ended"));
  own->kill();
  own->wait();
  kill_via_attach(sleeper);
}

BOOST_FIXTURE_TEST_CASE(garbage_on_the_control_socket_fails_the_attach_never_the_sandbox, fixture) {
  const auto id = detached_sleeper();
  const fs::path ctl = sandbox_dir(id) / "ctl";
  recording_observer obs;
  {
    impostor fake(ctl);
    auto attempt = [&](const std::string& what, std::function<void(int)> script) {
      fake.serve(std::move(script));
      auto r = make_runtime()->attach(id, resume_point{}, obs);
      fake.join();
      BOOST_TEST(!r.ok(), what << ": attach succeeded");
      if (!r.ok()) {
        BOOST_TEST_MESSAGE(what << ": " << r.error().message);
        BOOST_TEST(r.error().message.find("failed authentication") == std::string::npos, what << ": " << r.error().message);
      }
      return r.ok() ? std::string() : r.error().message;
    };
    attempt("closes at once", [](int) {});
    auto huge = attempt("oversized length", [](int c) { send_bytes(c, std::string(4, '\xff') + "xxxx"); });
    BOOST_TEST(huge.find("frame length") != std::string::npos);
    attempt("zero length", [](int c) { send_bytes(c, std::string(4, '\0') + "xxxx"); });
    attempt("truncated Hello", [&](int c) {
      auto h = hello_frame(random_nonce());
      send_bytes(c, h.substr(0, h.size() - 3));
    });
    attempt("garbage after Attach", [&](int c) {
      send_bytes(c, hello_frame(random_nonce()));
      read_attach(c);
      send_bytes(c, "\x10\x00\x00\x00" + std::string(16, '\x7f'));
    });
    std::mt19937 rng(4242);
    for (int i = 0; i < 20; ++i) {
      std::string junk(1 + rng() % 200, '\0');
      for (auto& ch : junk)
        ch = static_cast<char>(rng());
      if (i % 2 == 0)  // a plausible length in front
        junk = std::string{static_cast<char>(junk.size()), 0, 0, 0} + junk;
      attempt(fmt::format("random bytes #{}", i), [&](int c) { send_bytes(c, junk); });
    }
    BOOST_TEST(obs.records().empty());
    fake.restore();
  }
  // The real sandbox took no harm.
  BOOST_TEST((make_runtime()->list_live().value() == std::vector<std::string>{id}));
  kill_via_attach(id);
}

BOOST_FIXTURE_TEST_CASE(an_impostor_that_cannot_prove_the_key_gets_the_sandbox_killed, fixture) {
  // Something other than ferry-init on the control socket that plays the protocol (a valid Hello,
  // an Attached) but does not know the key: the attach fails naming it, and the sandbox is
  // killed and removed as compromised.
  const auto id = detached_sleeper();
  const fs::path ctl = sandbox_dir(id) / "ctl";
  auto procs = testing::sandbox_processes(sandbox_dir(id));
  BOOST_REQUIRE(!procs.alive().empty());
  recording_observer obs;
  impostor fake(ctl);
  fake.serve([&](int c) {
    send_bytes(c, hello_frame(random_nonce()));
    read_attach(c);
    ferry::wire::handshake_mac made_up{};
    made_up.fill(0x42);
    send_bytes(c, attached_frame(made_up) + started_frame());
    std::this_thread::sleep_for(500ms);
  });
  auto r = make_runtime()->attach(id, resume_point{}, obs);
  fake.join();
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("ferry-init failed authentication") != std::string::npos, r.error().message);
  BOOST_TEST(r.error().message.find("killed as compromised") != std::string::npos, r.error().message);
  BOOST_TEST(obs.records().empty());  // nothing it said was delivered
  BOOST_TEST(procs.alive().empty());
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_FIXTURE_TEST_CASE(a_ferry_init_that_breaks_the_offsets_is_a_protocol_error_fatal_to_the_sandbox, fixture) {
  // Accepted (this fake knows the key, as a buggy ferry-init would), then a frame that breaks the
  // stream's offsets: a protocol error, fatal to the sandbox (the host no longer knows what it
  // has), reported, and everything cleaned up.
  const auto id = detached_sleeper();
  const fs::path ctl = sandbox_dir(id) / "ctl";
  const auto key = ferry::wire::key_from_hex(file_content(sandbox_dir(id) / "key"));
  BOOST_REQUIRE(key);
  auto procs = testing::sandbox_processes(sandbox_dir(id));
  recording_observer obs;
  {
    impostor fake(ctl);
    fake.serve([&](int c) {
      const auto nonce = random_nonce();
      send_bytes(c, hello_frame(nonce));
      const auto host_nonce = read_attach(c);
      send_bytes(c, attached_frame(*ferry::wire::init_proof(*key, host_nonce, nonce)) + started_frame() +
                        output_frame(5, "hello"));
      std::this_thread::sleep_for(500ms);
    });
    auto sb = make_runtime()->attach(id, resume_point{}, obs);
    BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));
    (*sb)->wait();
    fake.join();
  }
  auto ended = obs.find("ended");
  BOOST_REQUIRE(ended);
  BOOST_TEST(ended->failure.value_or("").find("protocol error: Output of stream 0 at offset 5, expected 0") !=
                 std::string::npos,
             ended->failure.value_or(""));
  BOOST_TEST(obs.output(0).empty());
  BOOST_TEST(procs.alive().empty());
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_FIXTURE_TEST_CASE(a_finished_sandbox_nobody_attaches_to_ends_itself_after_the_linger, fixture) {
  runtime = make_runtime(8u << 20, 1500ms);
  recording_observer obs;
  const auto id = unique_id("linger");
  auto sb = start(*runtime, id, {"/bin/sh", "-c", "sleep 0.5; echo bye"}, obs);
  BOOST_REQUIRE(obs.wait_for("started", 20s));
  sb->detach();
  auto procs = testing::sandbox_processes(sandbox_dir(id));
  BOOST_REQUIRE(procs.alive().size() >= 2u);
  std::this_thread::sleep_for(1s);  // the command has ended; still lingering, still attachable
  BOOST_TEST((runtime->list_live().value() == std::vector<std::string>{id}));
  for (auto deadline = steady::now() + 20s; !procs.alive().empty();) {
    BOOST_REQUIRE_MESSAGE(steady::now() < deadline, "the sandbox did not end after its linger");
    std::this_thread::sleep_for(50ms);
  }
  BOOST_TEST(runtime->list_live().value().empty());
  auto gone = runtime->attach(id, resume_point{}, obs);
  BOOST_REQUIRE(!gone.ok());
  BOOST_TEST((gone.error().code == ferry::errc::not_found), gone.error().message);
  BOOST_TEST(file_content(sandbox_dir(id) / "disk" / testing::log_name()).find("giving up") != std::string::npos);
  auto cleaned = runtime->cleanup_orphans();
  BOOST_REQUIRE(cleaned.ok());
  BOOST_TEST(*cleaned == 1u);
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_AUTO_TEST_SUITE_END()
