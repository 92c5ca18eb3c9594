#define BOOST_TEST_MODULE sandbox_environment
#include <boost/test/unit_test.hpp>

// Environments in real sandboxes of the backend under test (built once per backend:
// sandbox_runsc_environment_test, sandbox_bwrap_environment_test): a setup script runs as root
// once, its output streamed; what it left in the root is a cached layer that the next
// sandboxes start with (files added, changed and deleted), keyed by root + script + variables;
// a failing or slow script leaves no layer and says why; concurrent first uses build once.
// Needs root and the backend.

#include <sys/stat.h>

#include <atomic>
#include <mutex>
#include <set>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/environment.h"
#include "ferry/sandbox/sandbox.h"
#include "backend_test_support.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using testing::recording_observer;

namespace {

struct fixture {
  testing::temp_dir tmp;
  std::unique_ptr<sandbox_runtime> runtime;
  layer_cache cache{tmp.path() / "layers"};

  fixture() {
    auto o = testing::test_config(tmp.path());
    auto r = make_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    runtime = std::move(*r);
  }

  /// Runs `line` in a new sandbox with `layers`; its stdout.
  std::string run_with(const std::vector<fs::path>& layers, const std::string& line,
                       std::vector<std::string> env = {}) {
    recording_observer obs;
    sandbox_spec spec;
    spec.id = testing::unique_id("env", "use");
    spec.layers = layers;
    spec.env = std::move(env);
    auto sb = runtime->start(spec, obs);
    BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));
    auto done = testing::run_to_end(**sb, obs, testing::shell(2, line), 30s);
    BOOST_TEST(done.what == "exited", obs.output(2, 1));
    (void)(*sb)->release();
    (*sb)->wait();
    return obs.output(2, 0);
  }
};

environment_spec tools_env(std::string script) {
  environment_spec e;
  e.base = "host-tree";
  e.setup_script = std::move(script);
  e.env = {"FERRY_ENV=tools"};
  e.setup_timeout = 60s;
  return e;
}

const std::string setup_script =
  "set -e; id -u; echo \"env=$FERRY_ENV\"; mkdir -p /opt/tool/bin; "
  "printf '#!/bin/sh\\necho tool-ran\\n' > /opt/tool/bin/tool; chmod 755 /opt/tool/bin/tool; "
  "echo changed >> /etc/hosts; rm /etc/hostname; echo to-stderr >&2; echo in-workspace > /workspace/w";

}  // namespace

BOOST_AUTO_TEST_SUITE(environment, *boost::unit_test::precondition(&testing::backend_available))

BOOST_FIXTURE_TEST_CASE(setup_runs_once_and_its_layer_starts_the_next_sandboxes, fixture) {
  // The host-tree root has an /etc/hostname to delete (written by the runtime's host tree).
  BOOST_REQUIRE(fs::exists(tmp.path() / "rootfs-host" / "etc" / "hostname"));
  std::mutex mu;
  std::string out, err;
  auto collect = [&](int stream, std::string_view data) {
    std::lock_guard lock(mu);
    (stream == 0 ? out : err).append(data);
  };
  const auto env = tools_env(setup_script);
  auto built = cache.ensure(*runtime, env, collect);
  BOOST_REQUIRE_MESSAGE(built.ok(), (built.ok() ? "" : built.error().message));
  BOOST_TEST(!built->cached);
  BOOST_TEST(built->key == environment_key(env));
  BOOST_TEST(built->path == tmp.path() / "layers" / built->key);
  BOOST_TEST(out == "0\nenv=tools\n");  // root, with the environment's variables; streamed
  BOOST_TEST(err == "to-stderr\n");
  BOOST_TEST_MESSAGE(fmt::format("setup in {} ({}): {} ms", testing::test_backend(), built->key.substr(0, 12),
                                 built->setup_time.count()));
  // The layer holds what the root got, owned by root; not the workspace.
  struct stat st {};
  BOOST_REQUIRE(::lstat((built->path / "opt" / "tool" / "bin" / "tool").c_str(), &st) == 0);
  BOOST_TEST(st.st_uid == 0u);
  BOOST_TEST(!fs::exists(built->path / "workspace" / "w"));

  // Cached: no setup runs again (no output), at once.
  std::string again;
  const auto t0 = steady::now();
  auto cached = cache.ensure(*runtime, env, [&](int, std::string_view d) { again.append(d); });
  BOOST_REQUIRE(cached.ok());
  BOOST_TEST(cached->cached);
  BOOST_TEST(again.empty());
  BOOST_TEST((steady::now() - t0 < 1s));
  BOOST_TEST(cached->path == built->path);

  // A sandbox with the layer: the tool is there and runs, /etc/hosts changed, /etc/hostname
  // deleted (a whiteout), root still owns them, and the workspace is fresh.
  const std::string seen = run_with({built->path},
                                    "/opt/tool/bin/tool; tail -1 /etc/hosts; test -e /etc/hostname && echo hostname "
                                    "|| echo no-hostname; ls /workspace | wc -l; touch /opt/tool/x && echo writable");
  BOOST_TEST(seen == "tool-ran\nchanged\nno-hostname\n0\nwritable\n");
  // Without it, the root as it was; the layer itself was not written by that sandbox.
  BOOST_TEST(run_with({}, "test -e /opt/tool && echo tool || echo none; test -e /etc/hostname && echo hostname") ==
             "none\nhostname\n");
  BOOST_TEST(!fs::exists(built->path / "opt" / "tool" / "x"));
  BOOST_TEST(!fs::exists(tmp.path() / "rootfs-host" / "opt"));
}

BOOST_FIXTURE_TEST_CASE(a_changed_script_or_variable_is_a_new_layer, fixture) {
  auto a = tools_env("echo one > /etc/which");
  auto b = tools_env("echo two > /etc/which");
  auto c = a;
  c.env = {"FERRY_ENV=other"};
  auto d = a;
  d.base = "another-image";
  const std::set<std::string> keys{environment_key(a), environment_key(b), environment_key(c), environment_key(d)};
  BOOST_TEST(keys.size() == 4u);
  BOOST_TEST(environment_key(a) == environment_key(tools_env("echo one > /etc/which")));
  auto la = cache.ensure(*runtime, a);
  auto lb = cache.ensure(*runtime, b);
  BOOST_REQUIRE((la.ok() && lb.ok()));
  BOOST_TEST(!lb->cached);
  BOOST_TEST(run_with({la->path}, "cat /etc/which") == "one\n");
  BOOST_TEST(run_with({lb->path}, "cat /etc/which") == "two\n");
  // Two layers stack, the first on top.
  BOOST_TEST(run_with({lb->path, la->path}, "cat /etc/which") == "two\n");
}

BOOST_FIXTURE_TEST_CASE(a_failing_or_slow_setup_leaves_no_layer_and_says_why, fixture) {
  auto failing = tools_env("echo installing; echo 'E: package nope not found' >&2; exit 3");
  auto r = cache.ensure(*runtime, failing);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("the setup script exited 3") != std::string::npos, r.error().message);
  BOOST_TEST(r.error().message.find("E: package nope not found") != std::string::npos, r.error().message);
  BOOST_TEST(!cache.find(environment_key(failing)));

  auto slow = tools_env("echo started; sleep 30");
  slow.setup_timeout = 1500ms;
  const auto t0 = steady::now();
  auto s = cache.ensure(*runtime, slow);
  BOOST_REQUIRE(!s.ok());
  BOOST_TEST(s.error().message.find("timed out after 1.5 s") != std::string::npos, s.error().message);
  BOOST_TEST((steady::now() - t0 < 20s));
  BOOST_TEST(!cache.find(environment_key(slow)));

  environment_spec empty;
  empty.base = "host-tree";
  BOOST_TEST((cache.ensure(*runtime, empty).error().code == ferry::errc::invalid_argument));
  // Nothing of the setup sandboxes is left.
  auto left = runtime->cleanup_orphans();
  BOOST_TEST((left.ok() && *left == 0u));
  BOOST_TEST(fs::is_empty(tmp.path() / "sandboxes"));
}

BOOST_FIXTURE_TEST_CASE(a_cancelled_setup_stops_at_once_and_leaves_nothing, fixture) {
  // A task aborted while its environment sets up: the setup sandbox is killed, no layer stays.
  auto slow = tools_env("echo started; touch /etc/half-done; sleep 60");
  setup_cancel cancel;
  std::atomic<bool> started{false};
  std::optional<ferry::result<environment_layer>> r;
  std::thread t([&] {
    r = cache.ensure(*runtime, slow, [&](int, std::string_view d) {
      if (d.find("started") != std::string_view::npos)
        started = true;
    }, &cancel);
  });
  for (auto deadline = steady::now() + 30s; !started && steady::now() < deadline;)
    std::this_thread::sleep_for(10ms);
  BOOST_REQUIRE(started.load());
  const auto t0 = steady::now();
  cancel.cancel();
  t.join();
  const auto took = steady::now() - t0;
  BOOST_TEST_MESSAGE("ensure returned " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                                        << " ms after the cancel");
  BOOST_TEST((took < 5s));
  BOOST_REQUIRE(r.has_value());
  BOOST_REQUIRE(!r->ok());
  BOOST_TEST((r->error().code == ferry::errc::closed));
  BOOST_TEST(r->error().message.find("setup cancelled") != std::string::npos, r->error().message);
  BOOST_TEST(!cache.find(environment_key(slow)));
  BOOST_TEST(fs::is_empty(tmp.path() / "sandboxes"));
  BOOST_TEST(testing::processes_mentioning("setup-" + environment_key(slow).substr(0, 12)).empty());

  // Cancelled before it starts: it fails at once, nothing runs.
  setup_cancel early;
  early.cancel();
  auto e = cache.ensure(*runtime, slow, {}, &early);
  BOOST_REQUIRE(!e.ok());
  BOOST_TEST((e.error().code == ferry::errc::closed));
  // A cancel while another build of the key holds the lock: noticed without waiting for it.
  auto held = tools_env("echo held; sleep 3");
  std::thread builder([&] { (void)cache.ensure(*runtime, held); });
  for (auto deadline = steady::now() + 10s; !fs::exists(cache.dir() / (environment_key(held) + ".lock")) &&
                                            steady::now() < deadline;)
    std::this_thread::sleep_for(10ms);
  std::this_thread::sleep_for(300ms);
  setup_cancel waiting;
  std::thread canceller([&] {
    std::this_thread::sleep_for(200ms);
    waiting.cancel();
  });
  const auto w0 = steady::now();
  auto w = cache.ensure(*runtime, held, {}, &waiting);
  const auto waited = steady::now() - w0;
  canceller.join();
  builder.join();
  BOOST_TEST(!w.ok());
  BOOST_TEST((waited < 2s));
}

BOOST_FIXTURE_TEST_CASE(concurrent_first_uses_build_the_layer_once, fixture) {
  const auto env = tools_env("echo built; echo x > /etc/once");
  std::atomic<int> setups{0};
  std::vector<ferry::result<environment_layer>> results(3, ferry::fail("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] {
      results[i] = cache.ensure(*runtime, env, [&](int, std::string_view d) {
        if (d.find("built") != std::string_view::npos)
          ++setups;
      });
    });
  }
  for (auto& t : threads)
    t.join();
  int built = 0;
  for (auto& r : results) {
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    built += !r->cached;
  }
  BOOST_TEST(built == 1);
  BOOST_TEST(setups.load() == 1);
}

BOOST_FIXTURE_TEST_CASE(a_layer_that_is_not_a_directory_is_refused, fixture) {
  recording_observer obs;
  sandbox_spec spec;
  spec.id = testing::unique_id("env", "bad");
  spec.layers = {tmp.path() / "no-such-layer"};
  auto sb = runtime->start(spec, obs);
  BOOST_REQUIRE(!sb.ok());
  BOOST_TEST((sb.error().code == ferry::errc::invalid_argument));
  spec.layers = {"relative/layer"};
  BOOST_TEST(!runtime->start(spec, obs).ok());
}

BOOST_AUTO_TEST_SUITE_END()
