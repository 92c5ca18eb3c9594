#define BOOST_TEST_MODULE sandbox_process_api
#include <boost/test/unit_test.hpp>

#include <openssl/evp.h>

// The process API through the sandbox interface, in real sandboxes of the backend under test
// (built once per backend: sandbox_runsc_process_api_test, sandbox_bwrap_process_api_test): idle sandboxes that
// run what they are asked and end on release(), several commands at once, argv and shell, env,
// cwd, pty, timeouts, signals (to a group, to everything), resource usage, a 50 MB output cut at
// the limit and kept whole in the workspace, a persistent shell session, re-attach with several
// commands, and the HTTP forwarder to an egress socket on the host. Needs root and the backend.

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/sandbox.h"
#include "backend_test_support.h"
#include "fake_egress_proxy.h"
#include "ferry/test_support/temp_dir.h"
#include "ferry/schemas/handshake.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using testing::recording_observer;

namespace {

std::string unique_id(const std::string& what) { return testing::unique_id("fp", what); }

using testing::argv;
using testing::percentile;
using testing::shell;

struct fixture {
  testing::temp_dir tmp;
  std::unique_ptr<sandbox_runtime> runtime;

  fixture() { runtime = make_runtime(); }

  std::unique_ptr<sandbox_runtime> make_runtime(std::shared_ptr<egress_binder> egress = {}) const {
    auto o = testing::test_config(tmp.path());
    o.egress = std::move(egress);
    auto r = ferry::sandbox::make_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    return std::move(*r);
  }

  fs::path sandbox_dir(const std::string& id) const { return tmp.path() / "sandboxes" / id; }

  /// A runtime of the backend under test with `limits` (same directories as `runtime`).
  std::unique_ptr<sandbox_runtime> limited_runtime(const sandbox_limits& limits) const {
    auto o = testing::test_config(tmp.path());
    o.limits = limits;
    auto r = ferry::sandbox::make_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    return std::move(*r);
  }

  /// Runs `argv` as the command line of a sandbox of `rt` until the sandbox ended; the first
  /// limit it reported (the test fails without one).
  static recording_observer::record run_to_limit(sandbox_runtime& rt, recording_observer& obs, const std::string& id,
                                                 std::vector<std::string> argv, std::chrono::milliseconds timeout) {
    sandbox_spec spec;
    spec.id = id;
    spec.argv = std::move(argv);
    auto sb = rt.start(spec, obs);
    BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));
    BOOST_REQUIRE(obs.wait_for("ended", timeout));
    const std::string ended = obs.find("ended")->failure.value_or("(normally)");
    auto hit = obs.find("limit");
    BOOST_REQUIRE_MESSAGE(hit, "no limit reported; ended: " << ended);
    BOOST_TEST_MESSAGE("limit: " << hit->data << "; ended: " << ended);
    return *hit;
  }

  /// An idle sandbox (no command line), up (on_running seen).
  std::unique_ptr<sandbox> start_idle(const std::string& id, sandbox_observer& obs, sandbox_runtime* rt = nullptr) {
    sandbox_spec spec;
    spec.id = id;
    auto s = (rt ? rt : runtime.get())->start(spec, obs);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    return std::move(*s);
  }

  static recording_observer::record run(sandbox& sb, recording_observer& obs, const command_spec& c,
                                        std::chrono::milliseconds timeout = 30s) {
    return testing::run_to_end(sb, obs, c, timeout);
  }

  /// Releases the sandbox and checks it ended cleanly with nothing left.
  void release_and_check(sandbox& sb, recording_observer& obs) {
    auto r = sb.release();
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    sb.wait();
    auto ended = obs.find("ended");
    BOOST_REQUIRE(ended);
    BOOST_TEST(!ended->failure.has_value(), ended->failure.value_or(""));
    BOOST_TEST(testing::processes_mentioning(sb.id()).empty());
    BOOST_TEST(!fs::exists(sandbox_dir(sb.id())));
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(process_api, *boost::unit_test::precondition(&testing::backend_available))

BOOST_FIXTURE_TEST_CASE(an_idle_sandbox_runs_commands_at_once_and_ends_on_release, fixture) {
  recording_observer obs;
  auto sb = start_idle(unique_id("idle"), obs);
  // Queued before the sandbox is even up: sent once it is.
  BOOST_REQUIRE(sb->run(shell(1, "for i in 1 2 3; do echo one-$i; sleep 0.2; done")).ok());
  BOOST_REQUIRE(sb->run(shell(2, "for i in 1 2 3; do echo two-$i >&2; sleep 0.2; done; exit 2")).ok());
  BOOST_REQUIRE(sb->run(argv(3, {"printf", "%s|", "a b", "$HOME"})).ok());
  BOOST_TEST((sb->run(argv(3, {"true"})).error().code == ferry::errc::conflict));  // in use
  BOOST_TEST((sb->run(argv(0, {"true"})).error().code == ferry::errc::invalid_argument));
  command_spec neither;
  neither.command_id = 9;
  BOOST_TEST((sb->run(neither).error().code == ferry::errc::invalid_argument));
  for (uint32_t id : {1u, 2u, 3u})
    BOOST_REQUIRE(obs.wait_for_end(id, 60s));
  BOOST_TEST(obs.output(1u, 0) == "one-1\none-2\none-3\n");
  BOOST_TEST(obs.output(2u, 1) == "two-1\ntwo-2\ntwo-3\n");
  BOOST_TEST(obs.output(3u, 0) == "a b|$HOME|");
  BOOST_TEST(obs.find("exited", 2)->exit_code == 2);
  BOOST_TEST(obs.find("started", 3)->data == "printf|%s||a b|$HOME|");
  // They ran at the same time: 2's first line came before 1's last.
  auto records = obs.records();
  auto first_two = std::find_if(records.begin(), records.end(), [](auto& r) { return r.command_id == 2 && r.what == "output"; });
  auto last_one = std::find_if(records.rbegin(), records.rend(), [](auto& r) { return r.command_id == 1 && r.what == "output"; });
  BOOST_TEST((first_two->at < last_one->at));

  // Environment and working directory, inside the sandbox.
  command_spec env = shell(4, "echo \"$FOO|$HOME\"; pwd; mkdir -p sub/dir");
  env.env = {"FOO=bar baz"};
  run(*sb, obs, env);
  BOOST_TEST(obs.output(4u, 0) == "bar baz|/workspace\n/workspace\n");
  command_spec cwd = argv(5, {"pwd"});
  cwd.cwd = "sub/dir";
  run(*sb, obs, cwd);
  BOOST_TEST(obs.output(5u, 0) == "/workspace/sub/dir\n");
  // A run that cannot be carried out: on_command_failed, the sandbox goes on.
  auto failed = run(*sb, obs, argv(6, {"/no/such/program"}));
  BOOST_TEST(failed.what == "failed");
  BOOST_TEST(failed.data.find("command 6: cannot execute `/no/such/program`") != std::string::npos, failed.data);
  command_spec bad_cwd = argv(7, {"true"});
  bad_cwd.cwd = "/nope";
  BOOST_TEST(run(*sb, obs, bad_cwd).data.find("working directory `/nope`") != std::string::npos);
  BOOST_TEST(!obs.find("ended"));

  // The exec round trip of `true` (run() → on_command_ended), argv and shell.
  std::vector<double> direct, via_shell;
  for (uint32_t i = 0; i < 40; ++i) {
    const auto t0 = steady::now();
    run(*sb, obs, i % 2 ? shell(100 + i, "true") : argv(100 + i, {"true"}));
    (i % 2 ? via_shell : direct).push_back(std::chrono::duration<double, std::milli>(steady::now() - t0).count());
  }
  BOOST_TEST_MESSAGE(fmt::format("exec round trip of `true` in {}: argv p50 {:.1f} ms p90 {:.1f} ms; "
                                 "bash -c p50 {:.1f} ms p90 {:.1f} ms ({} each)",
                                 testing::test_backend(), percentile(direct, 0.5), percentile(direct, 0.9), percentile(via_shell, 0.5),
                                 percentile(via_shell, 0.9), direct.size()));
  release_and_check(*sb, obs);
  BOOST_TEST((sb->run(argv(200, {"true"})).error().code == ferry::errc::closed));
}

// Limits: the sandbox's cgroup (made by Ferry for both backends) stops a memory hog and a fork
// bomb, and says which limit it was. gVisor ends the whole sandbox at either (the Sentry cannot
// allocate or make a thread); bubblewrap's kernel kills or refuses only the process.
BOOST_FIXTURE_TEST_CASE(a_memory_hog_is_stopped_at_the_limit_and_the_limit_is_named, fixture) {
  sandbox_limits limits;
  limits.memory_bytes = 256ull << 20;
  auto rt = limited_runtime(limits);
  recording_observer obs;
  const std::string id = unique_id("memhog");
  // 1 GiB written byte by byte (not calloc'd pages nobody touches).
  const auto hit = run_to_limit(*rt, obs, id, {"/usr/bin/python3", "-c", "b = b'x' * (1 << 30); print(len(b))"}, 60s);
  BOOST_TEST((hit.hit.what == limit_hit::kind::memory));
  BOOST_TEST(hit.hit.limit == 256ull << 20);
  BOOST_TEST(hit.hit.count >= 1u);
  BOOST_TEST(hit.data.find("memory limit reached (256 MiB)") != std::string::npos, hit.data);
  auto ended = obs.find("ended");
  if (testing::test_backend() == "runsc") {
    BOOST_TEST(hit.hit.whole_sandbox);
    BOOST_REQUIRE(ended->failure.has_value());
    BOOST_TEST(ended->failure->find("memory limit reached (256 MiB)") == 0u, *ended->failure);
  } else {
    // Only python3 was killed: the command line ended by SIGKILL, the sandbox then normally.
    auto exited = obs.find("exited", 1);
    BOOST_REQUIRE(exited);
    BOOST_TEST(exited->signal == SIGKILL);
    BOOST_TEST(!hit.hit.whole_sandbox);
    BOOST_TEST(hit.hit.command_id == 1u);
    BOOST_TEST((hit.at <= exited->at), "the limit is reported before the command's end");
    BOOST_TEST(!ended->failure.has_value(), ended->failure.value_or(""));
  }
  BOOST_TEST(obs.output(1, 0).find("1073741824") == std::string::npos);
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
  // The group is gone too (nothing of this runtime is left under the parent).
  auto left = rt->cleanup_orphans();
  BOOST_TEST((left.ok() && *left == 0u));
}

// In an idle sandbox, a command over the memory limit: under bwrap the kernel kills that
// command and the sandbox goes on, and the limit is reported with the command's id before its
// end; under gVisor the whole sandbox ends, and says why.
BOOST_FIXTURE_TEST_CASE(a_command_over_the_memory_limit_is_named_with_the_command, fixture) {
  sandbox_limits limits;
  limits.memory_bytes = 256ull << 20;
  auto rt = limited_runtime(limits);
  recording_observer obs;
  auto sb = start_idle(unique_id("idlehog"), obs, rt.get());
  auto first = run(*sb, obs, argv(2, {"true"}));
  BOOST_TEST(first.what == "exited");
  BOOST_TEST(!obs.find("limit"));
  BOOST_REQUIRE(sb->run(argv(3, {"/usr/bin/python3", "-c", "b = b'x' * (1 << 30)"})).ok());
  BOOST_REQUIRE(obs.wait_until(
    [](const std::vector<recording_observer::record>& rs) {
      return std::any_of(rs.begin(), rs.end(), [](const auto& r) {
        return (r.what == "exited" && r.command_id == 3) || r.what == "ended";
      });
    },
    60s));
  BOOST_REQUIRE(obs.wait_for("limit", 10s));
  auto hit = obs.find("limit");
  BOOST_TEST((hit->hit.what == limit_hit::kind::memory));
  if (testing::test_backend() == "bwrap") {
    BOOST_TEST(hit->hit.command_id == 3u);
    BOOST_TEST(!hit->hit.whole_sandbox);
    auto exited = obs.find("exited", 3);
    BOOST_REQUIRE(exited);
    BOOST_TEST(exited->signal == SIGKILL);
    BOOST_TEST((hit->at <= exited->at));
    // The sandbox goes on, and a later command reports no new limit.
    auto after = run(*sb, obs, argv(4, {"true"}));
    BOOST_TEST(after.what == "exited");
    BOOST_TEST(after.exit_code == 0);
    release_and_check(*sb, obs);
    size_t limits = 0;
    for (const auto& r : obs.records())
      limits += r.what == "limit";
    BOOST_TEST(limits == 1u);
  } else {
    BOOST_REQUIRE(obs.wait_for("ended", 30s));
    BOOST_TEST(hit->hit.whole_sandbox);
    BOOST_TEST(obs.find("ended")->failure.value_or("").find("memory limit reached (256 MiB)") == 0u,
               obs.find("ended")->failure.value_or(""));
  }
}

BOOST_FIXTURE_TEST_CASE(a_fork_bomb_stops_at_the_pids_limit_and_the_limit_is_named, fixture) {
  sandbox_limits limits;
  // Under runsc the Sentry's and gofer's threads count too: room for them, not for 300 more.
  limits.pids = testing::test_backend() == "runsc" ? 160 : 64;
  auto rt = limited_runtime(limits);
  recording_observer obs;
  const std::string id = unique_id("forkbomb");
  // Bounded: 300 sleepers of 3 s at most.
  const auto hit = run_to_limit(
    *rt, obs, id, {"/bin/sh", "-c", "i=0; while [ $i -lt 300 ]; do sleep 3 & i=$((i+1)); done; wait; echo done"}, 90s);
  BOOST_TEST((hit.hit.what == limit_hit::kind::pids));
  BOOST_TEST(hit.hit.limit == limits.pids);
  BOOST_TEST(hit.data.find("process limit reached") != std::string::npos, hit.data);
  auto ended = obs.find("ended");
  if (ended->failure)
    BOOST_TEST(ended->failure->find("process limit reached") == 0u, *ended->failure);
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
  auto left = rt->cleanup_orphans();
  BOOST_TEST((left.ok() && *left == 0u));
}



// The disk quota: a sandbox's workspace and its writable root are on a filesystem of its own.
// Filling it fails inside with ENOSPC, is reported once (with the command) until there is room
// again, costs the host no more than the quota, and is gone with the sandbox.
BOOST_FIXTURE_TEST_CASE(filling_the_disk_stops_at_the_quota_and_the_limit_is_named, fixture) {
  sandbox_limits limits;
  limits.disk_bytes = 64ull << 20;
  auto rt = limited_runtime(limits);
  recording_observer obs;
  const std::string id = unique_id("diskfill");
  auto sb = start_idle(id, obs, rt.get());
  // 200 MiB into the workspace: the write fails at the quota.
  auto fill = run(*sb, obs, shell(2, "dd if=/dev/zero of=/workspace/big bs=1M count=200 2>&1; echo rc=$?"), 60s);
  BOOST_TEST(fill.what == "exited");
  const std::string out = obs.output(2, 0);
  BOOST_TEST(out.find("No space left on device") != std::string::npos, out);
  BOOST_TEST(out.find("rc=0") == std::string::npos, out);
  auto hit = obs.find("limit");
  BOOST_REQUIRE_MESSAGE(hit, "no limit reported");
  BOOST_TEST((hit->hit.what == limit_hit::kind::disk));
  BOOST_TEST(hit->hit.command_id == 2u);
  BOOST_TEST(!hit->hit.whole_sandbox);
  BOOST_TEST(hit->hit.limit <= 64ull << 20);
  BOOST_TEST(hit->hit.limit >= 48ull << 20);
  BOOST_TEST(hit->data.find("disk quota reached (64 MiB)") != std::string::npos, hit->data);
  BOOST_TEST((hit->at <= obs.find("exited", 2)->at), "the limit is reported before the command's end");
  // The host paid at most the quota: the sandbox's files on the host's filesystem (its disk
  // image, sparse, among them).
  const uint64_t host_bytes = testing::host_bytes_of(sandbox_dir(id));
  BOOST_TEST(host_bytes <= (64ull + 1) << 20, "the sandbox holds " << (host_bytes >> 20) << " MiB of the host's disk");
  // Still full: not reported again. After removing the file there is room; filling the root
  // (its writable layer is on the same disk) fails at the quota too, and is reported anew.
  run(*sb, obs, shell(3, "dd if=/dev/zero of=/workspace/more bs=1M count=8 2>&1; rm -f /workspace/more"));
  run(*sb, obs, shell(4, "rm /workspace/big && echo small > /workspace/small && cat /workspace/small"));
  BOOST_TEST(obs.output(4, 0) == "small\n");
  run(*sb, obs, shell(5, "dd if=/dev/zero of=/etc/big bs=1M count=200 2>&1; echo rc=$?"), 60s);
  BOOST_TEST(obs.output(5, 0).find("No space left on device") != std::string::npos, obs.output(5, 0));
  std::vector<uint32_t> reported;
  for (const auto& r : obs.records())
    if (r.what == "limit")
      reported.push_back(r.hit.command_id);
  BOOST_TEST((reported == std::vector<uint32_t>{2, 5}));
  release_and_check(*sb, obs);
  BOOST_TEST(ferry::test::mounts_under(sandbox_dir(id)).empty());
}

// Each sandbox has a writable layer over the read-only root: it may write anywhere (as its
// root), other sandboxes do not see it, the image is never written, and it is gone at the end.
BOOST_FIXTURE_TEST_CASE(the_root_is_writable_per_sandbox_and_the_image_stays_untouched, fixture) {
  recording_observer a_obs, b_obs;
  const std::string a_id = unique_id("roota"), b_id = unique_id("rootb");
  auto a = start_idle(a_id, a_obs);
  auto b = start_idle(b_id, b_obs);
  auto wrote = run(*a, a_obs,
                   shell(2, "echo mine > /etc/ferry-root-test && mkdir -p /opt/tool/bin && touch /opt/tool/bin/t && "
                            "cat /etc/ferry-root-test && python3 -c 'import os\nfor p in (\"/etc/ferry-root-test\", \"/opt\"): "
                            "s = os.stat(p); print(s.st_uid, oct(s.st_mode & 0o777)[2:])'"));
  BOOST_TEST(wrote.exit_code == 0, a_obs.output(2, 1));
  // Owned by root inside (bubblewrap: the sandbox's uid on the host, idmapped).
  BOOST_TEST(a_obs.output(2, 0) == "mine\n0 644\n0 755\n");
  run(*b, b_obs, shell(2, "cat /etc/ferry-root-test 2>&1; ls /opt 2>&1; echo end"));
  BOOST_TEST(b_obs.output(2, 0).find("mine") == std::string::npos, b_obs.output(2, 0));
  BOOST_TEST(b_obs.output(2, 0).find("tool") == std::string::npos, b_obs.output(2, 0));
  // The image (here the host-tree root next to the sandboxes) has none of it.
  const fs::path image = tmp.path() / "rootfs-host";
  BOOST_REQUIRE(fs::is_directory(image / "etc"));
  BOOST_TEST(!fs::exists(image / "etc" / "ferry-root-test"));
  BOOST_TEST(!fs::exists(image / "opt"));
  release_and_check(*a, a_obs);
  release_and_check(*b, b_obs);
  BOOST_TEST(ferry::test::mounts_under(sandbox_dir(a_id)).empty());
  BOOST_TEST(ferry::test::mounts_under(sandbox_dir(b_id)).empty());
  // A new sandbox starts from the image again.
  recording_observer c_obs;
  auto c = start_idle(unique_id("rootc"), c_obs);
  run(*c, c_obs, shell(2, "test -e /etc/ferry-root-test && echo left || echo clean"));
  BOOST_TEST(c_obs.output(2, 0) == "clean\n");
  release_and_check(*c, c_obs);
}

BOOST_FIXTURE_TEST_CASE(a_pty_is_a_terminal_of_the_given_size, fixture) {
  recording_observer obs;
  auto sb = start_idle(unique_id("pty"), obs);
  command_spec c = shell(1, "[ -t 0 ] && [ -t 1 ] && echo tty; stty size; tty | cut -c1-9");
  c.pty = true;
  c.rows = 40;
  c.cols = 132;
  auto e = run(*sb, obs, c);
  BOOST_TEST(e.exit.exit_code == 0);
  BOOST_TEST(obs.output(1u, 0) == "tty\r\n40 132\r\n/dev/pts/\r\n", obs.output(1u, 0) + obs.output(1u, 1));
  release_and_check(*sb, obs);
}

BOOST_FIXTURE_TEST_CASE(timeouts_and_signals_end_whole_process_groups, fixture) {
  recording_observer obs;
  auto sb = start_idle(unique_id("sig"), obs);
  command_spec t = shell(1, "sleep 100 & sleep 100 & echo up; wait");
  t.timeout = 500ms;
  auto timed = run(*sb, obs, t);
  BOOST_TEST((timed.exit.reason == exit_reason::timeout));
  BOOST_TEST(timed.exit.signal == SIGKILL);
  // The group is gone: nothing but ferry-init and the next command runs.
  run(*sb, obs, shell(2, "set -- /proc/[0-9]*; echo $#"));
  BOOST_TEST(obs.output(2u, 0) == "2\n", obs.output(2u, 0));  // ferry-init and this bash

  BOOST_REQUIRE(sb->run(shell(3, "sleep 100 & echo up; wait")).ok());
  BOOST_REQUIRE(obs.wait_for_output("up\n", 20s));
  BOOST_REQUIRE(sb->signal(3, SIGTERM).ok());
  BOOST_REQUIRE(obs.wait_for_end(3, 20s));
  BOOST_TEST((obs.find("exited", 3)->exit.reason == exit_reason::killed));
  BOOST_TEST(obs.find("exited", 3)->exit.signal == SIGTERM);

  // Everything (kill(-1) as PID 1): every command dies, ferry-init carries on.
  for (uint32_t id : {4u, 5u})
    BOOST_REQUIRE(sb->run(argv(id, {"sleep", "100"})).ok());
  BOOST_REQUIRE(obs.wait_for("started", 20s));
  BOOST_REQUIRE(obs.wait_until([](auto& rs) { return std::count_if(rs.begin(), rs.end(), [](auto& r) { return r.what == "started" && r.command_id == 5; }) > 0; }, 20s));
  BOOST_REQUIRE(sb->signal(0, SIGKILL).ok());
  BOOST_REQUIRE(obs.wait_for_end(4, 20s) && obs.wait_for_end(5, 20s));
  BOOST_TEST((obs.find("exited", 4)->exit.reason == exit_reason::killed));
  BOOST_TEST((obs.find("exited", 5)->exit.reason == exit_reason::killed));
  BOOST_TEST(run(*sb, obs, argv(6, {"echo", "alive"})).exit.exit_code == 0);
  BOOST_TEST(obs.output(6u, 0) == "alive\n");
  BOOST_TEST((sb->signal(1, 0).error().code == ferry::errc::invalid_argument));
  release_and_check(*sb, obs);
}

BOOST_FIXTURE_TEST_CASE(resource_usage, fixture) {
  recording_observer obs;
  auto sb = start_idle(unique_id("rusage"), obs);
  auto busy = run(*sb, obs, shell(1, "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"), 120s);
  auto idle = run(*sb, obs, argv(2, {"sleep", "0.3"}));
  BOOST_TEST_MESSAGE(fmt::format("busy loop: user {} ms sys {} ms rss {} KiB over {} ms; sleep: user {} ms rss {} KiB",
                                 busy.exit.user_cpu_ms, busy.exit.sys_cpu_ms, busy.exit.max_rss_kib, busy.exit.duration_ms,
                                 idle.exit.user_cpu_ms, idle.exit.max_rss_kib));
  BOOST_TEST(busy.exit.user_cpu_ms >= 100u);
  BOOST_TEST(busy.exit.max_rss_kib > 0u);
  BOOST_TEST(idle.exit.user_cpu_ms < busy.exit.user_cpu_ms);
  BOOST_TEST(idle.exit.duration_ms >= 300u);
  release_and_check(*sb, obs);
}

BOOST_FIXTURE_TEST_CASE(a_huge_output_is_cut_at_the_limit_and_kept_whole_in_the_workspace, fixture) {
  recording_observer obs;
  const auto id = unique_id("huge");
  auto sb = start_idle(id, obs);
  auto e = run(*sb, obs, argv(7, {"head", "-c", "50000000", "/dev/urandom"}), 120s);
  BOOST_TEST(obs.output(7u, 0).size() == 1u << 20);
  auto truncated = obs.find("truncated", 7);
  BOOST_REQUIRE(truncated);
  BOOST_TEST(truncated->data == "/workspace/.ferry/output/7.log");
  BOOST_TEST(e.exit.stdout_bytes == 50000000u);
  BOOST_TEST(e.exit.truncated_bytes == 50000000u - (1u << 20));
  BOOST_TEST(e.exit.output_path == "/workspace/.ferry/output/7.log");
  const fs::path on_host = sandbox_dir(id) / "workspace" / ".ferry" / "output" / "7.log";
  BOOST_REQUIRE(fs::exists(on_host));
  BOOST_TEST(fs::file_size(on_host) == 50000000u);
  std::ifstream f(on_host, std::ios::binary);
  std::string head(1u << 20, '\0');
  f.read(head.data(), static_cast<std::streamsize>(head.size()));
  BOOST_TEST((head == obs.output(7u, 0)));  // what was sent is the file's beginning
  // The agent reads the rest from the file, inside the sandbox.
  run(*sb, obs, shell(8, "wc -c < /workspace/.ferry/output/7.log"));
  BOOST_TEST(obs.output(8u, 0) == "50000000\n");
  release_and_check(*sb, obs);
}

BOOST_FIXTURE_TEST_CASE(a_session_carries_directory_and_environment_like_a_terminal, fixture) {
  recording_observer obs;
  auto sb = start_idle(unique_id("session"), obs);
  run(*sb, obs, shell(1, "mkdir -p repo/src && cd repo && export GREETING='hi there'; f() { echo \"f:$1\"; }", "main"));
  auto second = run(*sb, obs, shell(2, "pwd; echo \"$GREETING\"; f x; cd src; exit 4", "main"));
  BOOST_TEST(obs.output(2u, 0) == "/workspace/repo\nhi there\nf:x\n");
  BOOST_TEST(second.exit.exit_code == 4);
  command_spec killed = shell(3, "cd /; export GREETING=changed; sleep 100", "main");
  killed.timeout = 300ms;
  BOOST_TEST((run(*sb, obs, killed).exit.reason == exit_reason::timeout));
  run(*sb, obs, shell(4, "pwd; echo \"$GREETING\"", "main"));
  BOOST_TEST(obs.output(4u, 0) == "/workspace/repo/src\nhi there\n");  // the killed command left no trace
  run(*sb, obs, shell(5, "pwd; echo \"${GREETING-none}\""));  // not in the session
  BOOST_TEST(obs.output(5u, 0) == "/workspace\nnone\n");
  release_and_check(*sb, obs);
}

BOOST_FIXTURE_TEST_CASE(a_new_host_re_attaches_to_several_commands, fixture) {
  recording_observer first;
  const auto id = unique_id("reattach");
  auto sb = start_idle(id, first);
  BOOST_REQUIRE(sb->run(shell(1, "echo quick")).ok());
  BOOST_REQUIRE(sb->run(shell(2, "echo two-a; echo two-err >&2; sleep 1.5; echo two-b")).ok());
  BOOST_REQUIRE(sb->run(shell(3, "echo three-a; sleep 1.5; echo three-b; exit 3")).ok());
  BOOST_REQUIRE(first.wait_for_end(1, 30s));
  BOOST_REQUIRE(first.wait_until(
      [&](auto& rs) {
        return recording_observer::output_in(rs, 2, 0) == "two-a\n" && recording_observer::output_in(rs, 2, 1) == "two-err\n" &&
               recording_observer::output_in(rs, 3, 0) == "three-a\n";
      },
      30s));
  sb->detach();  // as a crashed ferryd would
  sb.reset();
  std::this_thread::sleep_for(2s);  // 2 and 3 end meanwhile

  // The new host recorded 1's end and 2's output so far; it lost track of 3; 9 is not there.
  recording_observer obs;
  std::vector<resume_point> from{{1, 6, 0, true}, {2, 6, 8, false}, {9, 0, 0, false}};
  auto again = make_runtime()->attach(id, from, obs);
  BOOST_REQUIRE_MESSAGE(again.ok(), (again.ok() ? "" : again.error().message));
  BOOST_REQUIRE(obs.wait_for_end(2, 30s) && obs.wait_for_end(3, 30s) && obs.wait_for_end(9, 30s));
  BOOST_TEST(!obs.find("started", 1));  // forgotten
  BOOST_TEST(obs.output(2u, 0) == "two-b\n");  // only the rest
  BOOST_TEST(obs.output(2u, 1) == "");
  BOOST_TEST(obs.output(3u, 0) == "three-a\nthree-b\n");  // whole
  BOOST_TEST(obs.find("exited", 3)->exit_code == 3);
  BOOST_TEST(obs.find("failed", 9)->data.find("not known") != std::string::npos);
  // It goes on as an ordinary sandbox of the new host.
  run(**again, obs, argv(10, {"echo", "new host"}));
  BOOST_TEST(obs.output(10u, 0) == "new host\n");
  release_and_check(**again, obs);
}

using testing::fake_egress_binder;
using testing::fake_egress_proxy;

BOOST_FIXTURE_TEST_CASE(the_http_forwarder_is_the_way_out_through_the_egress_socket, fixture) {
  auto egress = std::make_shared<fake_egress_binder>();
  auto rt = make_runtime(egress);
  recording_observer obs;
  const auto id = unique_id("egress");
  auto sb = start_idle(id, obs, rt.get());
  // --network=none still has a loopback interface: the forwarder listens there.
  // The proxy URLs carry the sandbox's credential; the variable ferry-init got it in does not
  // reach commands.
  run(*sb, obs, shell(1, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo \"$HTTP_PROXY $HTTPS_PROXY $NO_PROXY\"; "
                         "env | grep -c FERRY_EGRESS_TOKEN"));
  const std::string url = "http://ferry:" + fake_egress_binder::credential(id) + "@127.0.0.1:3128";
  BOOST_TEST(obs.output(1u, 0) == "lo\n" + url + " " + url + " localhost,127.0.0.1\n0\n");
  auto curl = run(*sb, obs, argv(2, {"curl", "-sS", "--max-time", "20", "http://example.invalid/x"}));
  BOOST_TEST(obs.output(2u, 0) == fake_egress_proxy::body, obs.output(2u, 1));
  BOOST_TEST(curl.exit.exit_code == 0);
  BOOST_REQUIRE(egress->proxy(id));
  auto requests = egress->proxy(id)->requests();
  BOOST_REQUIRE(requests.size() == 1u);
  BOOST_TEST(requests[0].rfind("GET http://example.invalid/x HTTP/1.1\r\n", 0) == 0u, requests[0]);
  // curl sends the credential from the URL: Basic base64("ferry:cred.<id>").
  const std::string userpass = "ferry:" + fake_egress_binder::credential(id);
  std::string basic(4 * ((userpass.size() + 2) / 3) + 1, '\0');
  basic.resize(static_cast<size_t>(::EVP_EncodeBlock(reinterpret_cast<unsigned char*>(basic.data()),
                                                     reinterpret_cast<const unsigned char*>(userpass.data()),
                                                     static_cast<int>(userpass.size()))));
  BOOST_TEST(requests[0].find("Proxy-Authorization: Basic " + basic + "\r\n") != std::string::npos, requests[0]);
  // Nothing else gets out: a direct connection to a listener on the host's loopback reaches
  // only the sandbox's own loopback, where nothing listens; the host's listener sees nobody.
  int host_listener = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  BOOST_TEST_REQUIRE(host_listener >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  BOOST_TEST_REQUIRE(::bind(host_listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  BOOST_TEST_REQUIRE(::listen(host_listener, 4) == 0);
  BOOST_TEST_REQUIRE(::getsockname(host_listener, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  const int port = ntohs(addr.sin_port);
  run(*sb, obs, shell(3, fmt::format("curl -sS --noproxy '*' --max-time 5 http://127.0.0.1:{}/ "
                                     ">/dev/null 2>&1 && echo OUT || echo blocked", port)));
  BOOST_TEST(obs.output(3u, 0) == "blocked\n");
  BOOST_TEST(::accept(host_listener, nullptr, nullptr) < 0, "the host's listener was reached");
  ::close(host_listener);
  release_and_check(*sb, obs);
  // Its socket went with it.
  BOOST_TEST(egress->closed() == std::vector<std::string>{id});
  BOOST_TEST(!egress->proxy(id));
}

BOOST_FIXTURE_TEST_CASE(each_sandbox_has_its_own_egress_socket_and_gets_it_back_after_a_reattach, fixture) {
  // The proxy tells sandboxes apart by the socket a connection arrives on.
  auto egress = std::make_shared<fake_egress_binder>();
  recording_observer a_obs, b_obs;
  const auto a_id = unique_id("ega"), b_id = unique_id("egb");
  auto rt = make_runtime(egress);
  auto a = start_idle(a_id, a_obs, rt.get());
  auto b = start_idle(b_id, b_obs, rt.get());
  run(*a, a_obs, argv(1, {"curl", "-sS", "--max-time", "20", "http://a.invalid/"}));
  run(*b, b_obs, argv(1, {"curl", "-sS", "--max-time", "20", "http://b.invalid/"}));
  BOOST_REQUIRE(egress->proxy(a_id) && egress->proxy(b_id));
  BOOST_TEST(egress->proxy(a_id)->requests().size() == 1u);
  BOOST_TEST(egress->proxy(a_id)->last_request().find("a.invalid") != std::string::npos);
  BOOST_TEST(egress->proxy(b_id)->requests().size() == 1u);
  BOOST_TEST(egress->proxy(b_id)->last_request().find("b.invalid") != std::string::npos);
  release_and_check(*b, b_obs);

  // The host goes (its proxy with it); a new host with a proxy of its own re-attaches `a`,
  // which reaches the new proxy at the same path.
  a->detach();
  a.reset();
  rt.reset();
  egress.reset();
  auto egress2 = std::make_shared<fake_egress_binder>();
  auto rt2 = make_runtime(egress2);
  recording_observer again;
  auto attached = rt2->attach(a_id, std::vector<resume_point>{{1, a_obs.output(1u, 0).size(), 0, true}}, again);
  BOOST_REQUIRE_MESSAGE(attached.ok(), (attached.ok() ? "" : attached.error().message));
  run(**attached, again, argv(2, {"curl", "-sS", "--max-time", "20", "http://again.invalid/"}));
  BOOST_TEST(again.output(2u, 0) == fake_egress_proxy::body, again.output(2u, 1));
  BOOST_REQUIRE(egress2->proxy(a_id));
  BOOST_TEST(egress2->proxy(a_id)->last_request().find("again.invalid") != std::string::npos);
  release_and_check(**attached, again);
  BOOST_TEST(egress2->closed() == std::vector<std::string>{a_id});
}

// --- file operations ------------------------------------------------------------------------------

BOOST_FIXTURE_TEST_CASE(file_operations_work_inside_a_real_sandbox, fixture) {
  recording_observer obs;
  const auto id = unique_id("files");
  auto sb = start_idle(id, obs);
  auto w = sb->write_file("src/a.cpp", "int helper();\nint main() { return helper(); }\n");
  BOOST_REQUIRE_MESSAGE(w.ok(), (w.ok() ? "" : w.error().message));
  BOOST_TEST(w->created);
  BOOST_TEST(w->path == "/workspace/src/a.cpp");
  BOOST_TEST(testing::read_proc_file(sandbox_dir(id) / "workspace/src/a.cpp").find("int main()") == 14u);
  auto r = sb->read_file("src/a.cpp", {2, 1});
  BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  BOOST_TEST(r->content == "     2\tint main() { return helper(); }\n");
  auto e = sb->edit_file("/workspace/src/a.cpp", "return helper();", "return 0;");
  BOOST_REQUIRE_MESSAGE(e.ok(), (e.ok() ? "" : e.error().message));
  BOOST_TEST(e->replacements == 1u);
  BOOST_REQUIRE(sb->write_file("src/b.h", "int helper();\n").ok());
  auto l = sb->list_dir("src");
  BOOST_REQUIRE_MESSAGE(l.ok(), (l.ok() ? "" : l.error().message));
  BOOST_REQUIRE(l->entries.size() == 2u);
  BOOST_TEST(l->entries[0].name == "a.cpp");
  BOOST_TEST((l->entries[1].type == file_type::file));
  auto g = sb->glob("**/*.h");
  BOOST_REQUIRE_MESSAGE(g.ok(), (g.ok() ? "" : g.error().message));
  BOOST_TEST((g->matches == std::vector<std::string>{"src/b.h"}));
  auto found = sb->grep("helper", {});
  BOOST_REQUIRE_MESSAGE(found.ok(), (found.ok() ? "" : found.error().message));
  // The host-tree root binds the host's /usr: ripgrep when the host has it.
  BOOST_TEST(found->engine == (::access("/usr/bin/rg", X_OK) == 0 ? "rg" : "posix"));
  BOOST_REQUIRE(found->lines.size() == 2u);
  BOOST_TEST(found->lines[0].path == "src/a.cpp");
  BOOST_TEST(found->lines[0].line == 1u);
  BOOST_TEST(found->lines[1].path == "src/b.h");
  // Errors, typed: a missing file, the read-only root, a binary file.
  auto missing = sb->read_file("nope.txt");
  BOOST_REQUIRE(!missing.ok());
  BOOST_TEST((missing.error().code == ferry::errc::not_found), missing.error().message);
  auto ro = sb->write_file("/usr/ferry-test", "x");
  BOOST_REQUIRE(!ro.ok());
  BOOST_TEST(ro.error().message.find("read-only file system") != std::string::npos, ro.error().message);
  BOOST_REQUIRE(sb->write_file("/tmp/bin", std::string("\0\1\2", 3)).ok());  // outside the workspace: allowed
  auto bin = sb->read_file("/tmp/bin");
  BOOST_REQUIRE(!bin.ok());
  BOOST_TEST(bin.error().message.find("binary") != std::string::npos, bin.error().message);
  // Commands and file operations side by side.
  run(*sb, obs, shell(1, "cat src/a.cpp"));
  BOOST_TEST(obs.output(1u, 0) == "int helper();\nint main() { return 0; }\n");
  release_and_check(*sb, obs);
}

// --- the control socket when commands can reach it (--host-uds=all, with an egress socket) ------

namespace {

/// Copies the hostile probe (init_socket_probe.cpp) into the sandbox's workspace: /workspace/probe.
void copy_probe(const fs::path& sandbox_dir) {
  const fs::path to = sandbox_dir / "workspace" / "probe";
  testing::copy_executable(FERRY_INIT_SOCKET_PROBE, to);
}

/// Waits until `path` (on the host) exists.
bool wait_for_file(const fs::path& path, std::chrono::milliseconds timeout) {
  for (auto deadline = steady::now() + timeout; !fs::exists(path);) {
    if (steady::now() > deadline)
      return false;
    std::this_thread::sleep_for(20ms);
  }
  return true;
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_command_that_reaches_the_control_socket_cannot_attach_without_the_key, fixture) {
  auto egress = std::make_shared<fake_egress_binder>();
  recording_observer obs;
  const auto id = unique_id("probe");
  {
    auto rt = make_runtime(egress);
    auto sb = start_idle(id, obs, rt.get());
    copy_probe(sandbox_dir(id));
    // While a host is attached, a connection from inside is simply turned away.
    run(*sb, obs, shell(1, "/workspace/probe attach /.ferry/ctl/init.sock random"));
    BOOST_TEST(obs.output(1u, 0).find("first message Error") != std::string::npos, obs.output(1u, 0));
    // Then, with no host attached (ferryd restarting): the probe gets a Hello, but an Attach
    // without the key's proof is refused, and the Run behind it never runs.
    BOOST_REQUIRE(sb->run(shell(2, "sleep 1.5; for m in none random; do /workspace/probe attach /.ferry/ctl/init.sock $m; "
                                   "done > /workspace/probe.log 2>&1; touch /workspace/probe.done")).ok());
    // Command 2's own start (command 1's is recorded already): a detach before ferry-init got
    // the Run would drop it.
    BOOST_REQUIRE(obs.wait_for("started", 2, 20s));
    sb->detach();
  }
  BOOST_REQUIRE(wait_for_file(sandbox_dir(id) / "workspace" / "probe.done", 30s));
  const std::string log = testing::read_proc_file(sandbox_dir(id) / "workspace" / "probe.log");
  BOOST_TEST_MESSAGE("probe: " << log);
  // What the Hello gave away: a nonce, nothing else.
  BOOST_TEST(log.find("hello protocol=4 nonce_bytes=32") != std::string::npos, log);
  size_t refusals = 0;
  for (size_t at = 0; (at = log.find("answer: Error: authentication failed", at)) != std::string::npos; ++at)
    ++refusals;
  BOOST_TEST(refusals == 2u, log);
  BOOST_TEST(log.find("closed") != std::string::npos, log);
  BOOST_TEST(!fs::exists(sandbox_dir(id) / "workspace" / "pwned"));
  // The real host still attaches and runs commands.
  recording_observer again;
  auto rt = make_runtime(egress);
  auto sb = rt->attach(id, std::vector<resume_point>{{1, obs.output(1u, 0).size(), 0, true}, {2, 0, 0, false}}, again);
  BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));
  run(**sb, again, shell(3, "echo still mine"));
  BOOST_TEST(again.output(3u, 0) == "still mine\n");
  release_and_check(**sb, again);
}

BOOST_FIXTURE_TEST_CASE(a_command_that_replaces_the_control_socket_gets_the_sandbox_killed, fixture) {
  auto egress = std::make_shared<fake_egress_binder>();
  recording_observer obs;
  const auto id = unique_id("impostor");
  auto rt = make_runtime(egress);
  {
    auto sb = start_idle(id, obs, rt.get());
    copy_probe(sandbox_dir(id));
    BOOST_REQUIRE(sb->run(shell(1, "/workspace/probe impostor /.ferry/ctl/init.sock 60 > /workspace/impostor.log 2>&1")).ok());
    for (auto deadline = steady::now() + 20s;
         testing::read_proc_file(sandbox_dir(id) / "workspace" / "impostor.log").find("listening") == std::string::npos;) {
      BOOST_REQUIRE_MESSAGE(steady::now() < deadline, "the impostor did not listen: "
                                                         << testing::read_proc_file(sandbox_dir(id) / "workspace" / "impostor.log"));
      std::this_thread::sleep_for(50ms);
    }
    BOOST_TEST(fs::exists(sandbox_dir(id) / "ctl" / "init.sock.real"));
    sb->detach();
  }
  auto procs = testing::sandbox_processes(sandbox_dir(id));
  BOOST_REQUIRE(!procs.alive().empty());
  recording_observer next;
  auto r = make_runtime(egress)->attach(id, std::vector<resume_point>{{1, 0, 0, false}}, next);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("ferry-init failed authentication") != std::string::npos, r.error().message);
  BOOST_TEST(r.error().message.find("killed as compromised") != std::string::npos, r.error().message);
  BOOST_TEST(next.records().empty());  // nothing the impostor said reached the observer
  BOOST_TEST(procs.alive().empty());
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
}

BOOST_FIXTURE_TEST_CASE(the_key_is_not_readable_from_inside_the_sandbox, fixture) {
  // With an egress socket (--host-uds=all: the most a command can reach). The key is on the host
  // in <sandbox dir>/key; inside, look where it could leak: ferry-init's environment, command
  // line, stdin and memory, and every file a command can see outside /usr.
  auto egress = std::make_shared<fake_egress_binder>();
  recording_observer obs;
  const auto id = unique_id("key");
  auto rt = make_runtime(egress);
  auto sb = start_idle(id, obs, rt.get());
  const std::string key_hex = testing::read_proc_file(sandbox_dir(id) / "key");
  const auto key = ferry::wire::key_from_hex(key_hex);
  BOOST_REQUIRE(key);
  const std::string key_raw(reinterpret_cast<const char*>(key->data()), key->size());
  BOOST_TEST(((fs::status(sandbox_dir(id) / "key").permissions() & fs::perms::all) ==
              (fs::perms::owner_read | fs::perms::owner_write)));
  const std::string probe = R"sh(
    echo "== environ"; cat /proc/1/environ; echo
    echo "== cmdline"; cat /proc/1/cmdline; echo
    echo "== fd0"; readlink /proc/1/fd/0; timeout 2 cat /proc/1/fd/0; echo
    echo "== fds"; ls /proc/1/fd/
    echo "== files"; find /.ferry /workspace /tmp /etc -xdev -type f -size -4M 2>/dev/null | grep -v '^/workspace/mem' | xargs -r cat
    echo "== mem"
    while read -r range perms rest; do
      case $perms in rw*)
        s=$((16#${range%-*})); e=$((16#${range#*-}))
        dd if=/proc/1/mem bs=4096 skip=$((s / 4096)) count=$(((e - s) / 4096)) 2>>/workspace/mem.err >>/workspace/mem.bin;;
      esac
    done < /proc/1/maps
    echo "maps: $(wc -l < /proc/1/maps)"; cat /workspace/mem.err
  )sh";
  auto r = run(*sb, obs, shell(1, probe));
  const std::string out = obs.output(1u, 0) + obs.output(1u, 1);
  BOOST_TEST_MESSAGE("from inside: " << out.substr(0, 3000));
  BOOST_TEST(out.find("== mem") != std::string::npos);  // the probe ran to the end
  BOOST_TEST(out.find(key_hex.substr(0, 64)) == std::string::npos);
  BOOST_TEST(out.find(key_raw) == std::string::npos);
  const std::string fd0 = out.substr(out.find("== fd0"), out.find("== fds") - out.find("== fd0"));
  BOOST_TEST(fd0.find("pipe:") == std::string::npos, fd0);  // stdin no longer the key's pipe
  BOOST_TEST(fd0.find("host:") == std::string::npos, fd0);
  const std::string mem = testing::read_proc_file(sandbox_dir(id) / "workspace" / "mem.bin");
  BOOST_TEST_MESSAGE("ferry-init memory read from inside: " << mem.size() << " bytes");
  BOOST_TEST(mem.find(key_raw) == std::string::npos);
  BOOST_TEST(mem.find(key_hex.substr(0, 64)) == std::string::npos);
  release_and_check(*sb, obs);
}

BOOST_AUTO_TEST_SUITE_END()
