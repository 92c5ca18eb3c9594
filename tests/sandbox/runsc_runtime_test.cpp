#define BOOST_TEST_MODULE sandbox_runsc_runtime
#include <boost/test/unit_test.hpp>

// Real gVisor sandboxes through the sandbox_runtime interface. Needs root and runsc; every
// test keeps its runsc state and sandboxes in its own temp dir.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/frame.h"
#include "test_support.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;

namespace {

bool runsc_installed() {
  auto r = run_command({"runsc", "--version"}, 10s);
  return r.ok() && r->status.ok();
}

/// Precondition of the suite: root and an installed runsc.
boost::test_tools::assertion_result runsc_available(boost::unit_test::test_unit_id) {
  boost::test_tools::assertion_result ok(true);
  if (::geteuid() != 0) {
    ok = false;
    ok.message() << "skipped: runsc sandboxes need root";
  } else if (!runsc_installed()) {
    ok = false;
    ok.message() << "skipped: runsc (gVisor) is not installed";
  }
  return ok;
}

/// Records every callback with its time; lets the test wait for a condition on them.
class recording_observer : public sandbox_observer {
 public:
  struct record {
    std::string what;  // "running", "started", "output", "exited", "ended"
    steady::time_point at;
    int stream = -1;
    std::string data;
    int exit_code = 0, signal = 0;
    uint64_t duration_ms = 0;
    std::optional<std::string> failure;
  };

  static record make(std::string what) {
    record r;
    r.what = std::move(what);
    r.at = steady::now();
    return r;
  }

  void on_running() override { add(make("running")); }
  void on_command_started(uint32_t, const std::vector<std::string>& argv) override {
    auto r = make("started");
    for (const auto& a : argv)
      r.data += a + "|";
    add(r);
  }
  void on_output(uint32_t, int stream, std::string_view data) override {
    auto r = make("output");
    r.stream = stream;
    r.data = data;
    add(r);
  }
  void on_command_exited(uint32_t, int exit_code, int signal, uint64_t duration_ms) override {
    auto r = make("exited");
    r.exit_code = exit_code;
    r.signal = signal;
    r.duration_ms = duration_ms;
    add(r);
  }
  void on_ended(std::optional<std::string> failure) override {
    auto r = make("ended");
    r.failure = std::move(failure);
    add(r);
  }

  std::vector<record> records() const {
    std::lock_guard lock(mu_);
    return records_;
  }
  std::vector<std::string> sequence() const {
    std::vector<std::string> s;
    for (const auto& r : records()) {
      if (s.empty() || s.back() != r.what || r.what != "output")
        s.push_back(r.what);
    }
    return s;
  }
  std::string output(int stream) const {
    std::string s;
    for (const auto& r : records())
      if (r.what == "output" && r.stream == stream)
        s += r.data;
    return s;
  }
  std::optional<record> find(const std::string& what) const {
    for (const auto& r : records())
      if (r.what == what)
        return r;
    return std::nullopt;
  }
  /// Waits until `pred(records)` holds; false after `timeout`.
  template <class Pred>
  bool wait_until(Pred pred, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return pred(records_); });
  }
  bool wait_for_output(const std::string& needle, std::chrono::milliseconds timeout) {
    return wait_until(
        [&](const std::vector<record>& rs) {
          std::string all;
          for (const auto& r : rs)
            if (r.what == "output")
              all += r.data;
          return all.find(needle) != std::string::npos;
        },
        timeout);
  }
  bool wait_for(const std::string& what, std::chrono::milliseconds timeout) {
    return wait_until(
        [&](const std::vector<record>& rs) {
          return std::any_of(rs.begin(), rs.end(), [&](const record& r) { return r.what == what; });
        },
        timeout);
  }

 private:
  void add(record r) {
    {
      std::lock_guard lock(mu_);
      records_.push_back(std::move(r));
    }
    cv_.notify_all();
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<record> records_;
};

/// Host processes whose command line mentions `needle` (zombies have none).
std::vector<std::string> processes_mentioning(const std::string& needle) {
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos ||
        name == std::to_string(::getpid()))
      continue;
    std::string cmd = testing::read_proc_file(e.path() / "cmdline");
    if (cmd.find(needle) != std::string::npos) {
      std::replace(cmd.begin(), cmd.end(), '\0', ' ');
      found.push_back(name + ": " + cmd);
    }
  }
  return found;
}

std::string unique_id(const std::string& what) {
  static int counter = 0;
  return fmt::format("ft-{}-{}-{}", what, ::getpid(), ++counter);
}

struct fixture {
  testing::temp_dir tmp;
  std::unique_ptr<sandbox_runtime> runtime;

  fixture() {
    runsc_options o;
    o.state_dir = tmp.path() / "state";
    o.sandboxes_dir = tmp.path() / "sandboxes";
    o.init_binary = FERRY_INIT_BINARY;
    auto r = make_runsc_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    runtime = std::move(*r);
  }

  fs::path sandbox_dir(const std::string& id) const { return tmp.path() / "sandboxes" / id; }

  std::unique_ptr<sandbox> start(const std::string& id, std::vector<std::string> argv,
                                 sandbox_observer& obs, std::vector<std::string> env = {}) {
    sandbox_spec spec;
    spec.id = id;
    spec.argv = std::move(argv);
    spec.env = std::move(env);
    auto s = runtime->start(spec, obs);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    return std::move(*s);
  }

  /// Runs `script` under /bin/sh in a sandbox to the end.
  std::unique_ptr<recording_observer> run_shell(const std::string& script,
                                                std::vector<std::string> env = {}) {
    auto obs = std::make_unique<recording_observer>();
    auto id = unique_id("sh");
    auto sb = start(id, {"/bin/sh", "-c", script}, *obs, std::move(env));
    sb->wait();
    BOOST_TEST(!fs::exists(sandbox_dir(id)));
    return obs;
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(runsc_runtime, *boost::unit_test::precondition(&runsc_available))

BOOST_FIXTURE_TEST_CASE(streams_output_in_order_and_ends_clean, fixture) {
  recording_observer obs;
  const auto id = unique_id("echo");
  const auto t0 = steady::now();
  auto sb = start(id, {"/bin/sh", "-c", "echo hello; sleep 1; echo bye"}, obs);
  BOOST_TEST(sb->id() == id);
  BOOST_TEST(fs::is_directory(sandbox_dir(id) / "workspace"));
  sb->wait();

  BOOST_TEST((obs.sequence() ==
              std::vector<std::string>{"running", "started", "output", "exited", "ended"}));
  BOOST_TEST(obs.output(0) == "hello\nbye\n");
  BOOST_TEST(obs.output(1) == "");
  auto started = obs.find("started");
  BOOST_REQUIRE(started);
  BOOST_TEST(started->data == "/bin/sh|-c|echo hello; sleep 1; echo bye|");
  auto exited = obs.find("exited");
  BOOST_REQUIRE(exited);
  BOOST_TEST(exited->exit_code == 0);
  BOOST_TEST(exited->signal == 0);
  BOOST_TEST(exited->duration_ms >= 1000u);
  auto ended = obs.find("ended");
  BOOST_REQUIRE(ended);
  BOOST_TEST(!ended->failure.has_value(), "failure: " << ended->failure.value_or(""));
  // Output is streamed as it happens, not collected at the end.
  auto records = obs.records();
  auto hello = std::find_if(records.begin(), records.end(), [](auto& r) { return r.data == "hello\n"; });
  BOOST_REQUIRE(hello != records.end());
  BOOST_TEST((exited->at - hello->at >= 900ms));
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
  BOOST_TEST_MESSAGE("runsc run -> Hello: "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(obs.find("running")->at - t0).count()
                     << " ms; Exited -> on_ended: "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(ended->at - exited->at).count()
                     << " ms");
}

BOOST_FIXTURE_TEST_CASE(failing_command_reports_its_exit_code, fixture) {
  auto owned = run_shell("echo oops >&2; exit 42");
  auto& obs = *owned;
  auto exited = obs.find("exited");
  BOOST_REQUIRE(exited);
  BOOST_TEST(exited->exit_code == 42);
  BOOST_TEST(obs.output(1) == "oops\n");
  // A failing command is not a failing sandbox.
  BOOST_TEST(!obs.find("ended")->failure.has_value());
}

BOOST_FIXTURE_TEST_CASE(environment_has_defaults_and_spec_overrides, fixture) {
  auto owned = run_shell("echo \"$FOO|$TERM|$HOME|$PATH\"; pwd; id -u", {"FOO=bar baz", "TERM=xterm"});
  auto& obs = *owned;
  BOOST_TEST(obs.output(0) ==
             "bar baz|xterm|/workspace|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
             "/workspace\n0\n");
}

BOOST_FIXTURE_TEST_CASE(workspace_is_writable_and_the_root_is_not, fixture) {
  recording_observer obs;
  const auto id = unique_id("ws");
  auto sb = start(id,
                  {"/bin/sh", "-c",
                   "echo data > /workspace/f && echo wrote; "
                   "if echo x > /rootfile; then echo ROOT-WRITABLE; else echo root-ro; fi; "
                   "if touch /usr/ferry-x; then echo USR-WRITABLE; else echo usr-ro; fi; "
                   "if echo x > /etc/passwd; then echo ETC-WRITABLE; else echo etc-ro; fi; "
                   "echo t > /tmp/t && echo tmp-rw; echo done; sleep 600"},
                  obs);
  BOOST_REQUIRE(obs.wait_for_output("done\n", 20s));
  // The workspace is the host directory, bind-mounted.
  std::ifstream f(sandbox_dir(id) / "workspace" / "f");
  std::string content((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  BOOST_TEST(content == "data\n");
  BOOST_TEST(!fs::exists("/usr/ferry-x"));
  sb->kill();
  sb->wait();
  BOOST_TEST(obs.output(0) == "wrote\nroot-ro\nusr-ro\netc-ro\ntmp-rw\ndone\n");
  BOOST_TEST(obs.output(1).find("Read-only file system") != std::string::npos);
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_FIXTURE_TEST_CASE(kill_ends_a_running_sandbox_fast_and_leaves_no_process, fixture) {
  recording_observer obs;
  const auto id = unique_id("kill");
  auto sb = start(id, {"sleep", "600"}, obs);
  BOOST_REQUIRE(obs.wait_for("started", 20s));
  BOOST_TEST(!processes_mentioning(id).empty());  // the check below can see runsc's processes
  const auto t0 = steady::now();
  sb->kill();
  const auto kill_returned = steady::now();
  sb->wait();
  auto ended = obs.find("ended");
  BOOST_REQUIRE(ended);
  const auto latency = ended->at - t0;
  BOOST_TEST_MESSAGE("kill() returned after "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(kill_returned - t0).count()
                     << " ms; on_ended after "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(latency).count() << " ms");
  BOOST_TEST((latency < 1s));
  BOOST_TEST(ended->failure.value_or("") == "killed");
  BOOST_TEST(!obs.find("exited").has_value());
  auto left = processes_mentioning(id);
  BOOST_TEST(left.empty(), "left behind: " << (left.empty() ? "" : left.front()));
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
  sb->kill();  // idempotent after the end
}

BOOST_FIXTURE_TEST_CASE(kill_right_after_start_is_clean, fixture) {
  for (int i = 0; i < 3; ++i) {
    recording_observer obs;
    const auto id = unique_id("early");
    auto sb = start(id, {"sleep", "600"}, obs);
    std::this_thread::sleep_for(std::chrono::milliseconds(i * 40));
    sb->kill();
    BOOST_REQUIRE(obs.wait_for("ended", 10s));
    sb->wait();
    BOOST_TEST(obs.find("ended")->failure.has_value());
    BOOST_TEST(processes_mentioning(id).empty());
    BOOST_TEST(!fs::exists(sandbox_dir(id)));
  }
}

BOOST_FIXTURE_TEST_CASE(concurrent_kills_and_destruction_are_safe, fixture) {
  recording_observer obs;
  const auto id = unique_id("conc");
  auto sb = start(id, {"sleep", "600"}, obs);
  BOOST_REQUIRE(obs.wait_for("started", 20s));
  std::vector<std::thread> killers;
  for (int i = 0; i < 4; ++i)
    killers.emplace_back([&] { sb->kill(); });
  for (auto& t : killers)
    t.join();
  sb.reset();  // destruction after kill: joins the reader
  auto records = obs.records();
  BOOST_TEST(std::count_if(records.begin(), records.end(), [](auto& r) { return r.what == "ended"; }) == 1);
  BOOST_TEST(processes_mentioning(id).empty());
}

BOOST_FIXTURE_TEST_CASE(destroying_a_running_sandbox_kills_it, fixture) {
  recording_observer obs;
  const auto id = unique_id("dtor");
  {
    auto sb = start(id, {"sleep", "600"}, obs);
    BOOST_REQUIRE(obs.wait_for("running", 20s));
  }
  BOOST_TEST(obs.find("ended")->failure.value_or("") == "killed");
  BOOST_TEST(processes_mentioning(id).empty());
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_FIXTURE_TEST_CASE(has_no_network_but_its_own_loopback, fixture) {
  // A listener on the host's loopback: a sandbox sharing the host network could reach it.
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  BOOST_REQUIRE(listener >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  BOOST_REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  BOOST_REQUIRE(::listen(listener, 1) == 0);
  socklen_t len = sizeof addr;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);

  auto owned = run_shell(fmt::format(
      "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
      "if bash -c 'echo > /dev/tcp/127.0.0.1/{}' 2>/dev/null; then echo CONNECTED; else echo refused; fi",
      port));
  auto& obs = *owned;
  ::close(listener);
  BOOST_TEST(obs.output(0) == "lo\nrefused\n");
}

BOOST_FIXTURE_TEST_CASE(large_output_arrives_complete, fixture) {
  auto owned = run_shell("seq 1 150000");
  auto& obs = *owned;
  std::string expected;
  for (int i = 1; i <= 150000; ++i)
    expected += std::to_string(i) + "\n";
  BOOST_TEST(obs.output(0) == expected);
  BOOST_TEST(!obs.find("ended")->failure.has_value());
}

BOOST_FIXTURE_TEST_CASE(unexecutable_command_ends_with_ferry_init_error, fixture) {
  recording_observer obs;
  auto sb = start(unique_id("noexec"), {"/no/such/program"}, obs);
  sb->wait();
  BOOST_TEST((obs.sequence() == std::vector<std::string>{"running", "ended"}));
  auto failure = obs.find("ended")->failure.value_or("");
  BOOST_TEST(failure.find("ferry-init: cannot execute `/no/such/program`") != std::string::npos, failure);
}

BOOST_FIXTURE_TEST_CASE(cleanup_orphans_removes_leftovers_and_their_containers, fixture) {
  // A real orphan: a container started behind the runtime's back from a copy of a live
  // sandbox's bundle, plus a bare leftover directory.
  recording_observer obs;
  const auto donor_id = unique_id("donor");
  auto donor = start(donor_id, {"sleep", "600"}, obs);
  BOOST_REQUIRE(obs.wait_for("running", 20s));
  std::ifstream cf(sandbox_dir(donor_id) / "bundle" / "config.json");
  auto config = nlohmann::json::parse(cf);
  donor->kill();
  donor->wait();

  const auto orphan_id = unique_id("orphan");
  const auto orphan_dir = sandbox_dir(orphan_id);
  fs::create_directories(orphan_dir / "bundle");
  fs::create_directories(orphan_dir / "workspace");
  for (auto& m : config["mounts"])
    if (m["destination"] == "/workspace")
      m["source"] = (orphan_dir / "workspace").string();
  std::ofstream(orphan_dir / "bundle" / "config.json") << config.dump();
  spawn_options o;
  o.argv = {"runsc", "--root", (tmp.path() / "state").string(), "--network=none", "run", "--bundle",
            (orphan_dir / "bundle").string(), orphan_id};
  o.out = stdio::pipe;
  o.err = stdio::pipe;
  auto orphan = child_process::spawn(o);
  BOOST_REQUIRE(orphan.ok());
  // Wait for ferry-init's Hello: the container is up.
  ferry::wire::frame_decoder decoder;
  bool hello = false;
  for (auto deadline = steady::now() + 20s; !hello && steady::now() < deadline;) {
    pollfd p{orphan->stdout_fd(), POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0)
      continue;
    char buf[4096];
    ssize_t n = ::read(orphan->stdout_fd(), buf, sizeof buf);
    BOOST_REQUIRE(n > 0);
    decoder.feed(buf, static_cast<size_t>(n));
    hello = decoder.next() == ferry::wire::frame_decoder::status::message &&
            decoder.msg()->message_type() == ferry::init::v1::Message::Hello;
  }
  BOOST_REQUIRE(hello);
  BOOST_REQUIRE(!processes_mentioning(orphan_id).empty());

  fs::create_directories(sandbox_dir("leftover-dir") / "workspace");
  std::ofstream(sandbox_dir("leftover-dir") / "workspace" / "file") << "x";

  auto cleaned = runtime->cleanup_orphans();
  BOOST_REQUIRE_MESSAGE(cleaned.ok(), (cleaned.ok() ? "" : cleaned.error().message));
  BOOST_TEST(*cleaned == 2u);
  BOOST_TEST(!fs::exists(orphan_dir));
  BOOST_TEST(!fs::exists(sandbox_dir("leftover-dir")));
  BOOST_TEST(orphan->wait_for(5s).has_value());  // its runsc ended with the container
  BOOST_TEST(processes_mentioning(orphan_id).empty());
  auto again = runtime->cleanup_orphans();
  BOOST_REQUIRE(again.ok());
  BOOST_TEST(*again == 0u);
}

BOOST_FIXTURE_TEST_CASE(duplicate_id_is_rejected_while_running, fixture) {
  recording_observer a, b;
  const auto id = unique_id("dup");
  auto first = start(id, {"sleep", "600"}, a);
  sandbox_spec spec;
  spec.id = id;
  spec.argv = {"true"};
  auto second = runtime->start(spec, b);
  BOOST_REQUIRE(!second.ok());
  BOOST_TEST(second.error().message.find("already exists") != std::string::npos);
  first->kill();
  first->wait();
  BOOST_TEST(b.records().empty());
}

BOOST_AUTO_TEST_SUITE_END()

// These need neither root nor runsc to run.

BOOST_AUTO_TEST_CASE(bad_ids_are_rejected) {
  testing::temp_dir tmp;
  runsc_options o;
  o.runsc = "/bin/true";  // never run: ids are checked first
  o.state_dir = tmp.path() / "state";
  o.sandboxes_dir = tmp.path() / "sandboxes";
  o.init_binary = FERRY_INIT_BINARY;
  auto made = make_runsc_runtime(o);
  BOOST_REQUIRE(made.ok());
  auto& runtime = *made;
  recording_observer obs;
  for (std::string id : {std::string(), std::string("a/b"), std::string("../x"), std::string("a b"),
                         std::string("x.y"), std::string(65, 'a'), std::string("é")}) {
    sandbox_spec spec;
    spec.id = id;
    spec.argv = {"true"};
    auto r = runtime->start(spec, obs);
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.error().message.find("invalid sandbox id") != std::string::npos, r.error().message);
  }
  BOOST_TEST(fs::is_empty(tmp.path() / "sandboxes"));
  BOOST_TEST(obs.records().empty());

  sandbox_spec ok_id;
  ok_id.id = std::string(64, 'a');
  ok_id.argv = {};
  auto r = runtime->start(ok_id, obs);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("empty command") != std::string::npos);

  ok_id.argv = {"echo", "\xff\xfe"};
  r = runtime->start(ok_id, obs);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("UTF-8") != std::string::npos);

  ok_id.argv = {"true"};
  ok_id.env = {"NO_EQUALS_SIGN"};
  r = runtime->start(ok_id, obs);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("NO_EQUALS_SIGN") != std::string::npos);
  BOOST_TEST(fs::is_empty(tmp.path() / "sandboxes"));  // failed starts leave nothing behind
}

BOOST_AUTO_TEST_CASE(missing_runsc_or_init_binary_fails_at_creation) {
  testing::temp_dir tmp;
  runsc_options o;
  o.state_dir = tmp.path() / "state";
  o.sandboxes_dir = tmp.path() / "sandboxes";
  o.init_binary = FERRY_INIT_BINARY;
  o.runsc = "ferry-no-such-runsc";
  auto r = make_runsc_runtime(o);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("ferry-no-such-runsc") != std::string::npos);

  o.runsc = "/bin/true";
  o.init_binary = tmp.path() / "no-init";
  r = make_runsc_runtime(o);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("no-init") != std::string::npos);
}
