#define BOOST_TEST_MODULE sandbox_bwrap_runtime
#include <boost/test/unit_test.hpp>

// Real bubblewrap sandboxes through the sandbox_runtime interface: what the bwrap backend adds to
// the checks every backend passes (process_api_test and recovery_test, built for bwrap too) —
// a clean environment, a uid of its own that is not root on the host, no network but a
// loopback, nosuid mounts, the seccomp filter (each denied call, other ABIs killed), the pids and
// memory limits, kill and its latency, start-up time, nothing left after the end (directory,
// cgroups, processes of its uid), orphans of a SIGKILLed owner cleaned up, and make_runtime's
// choice. Needs root and bwrap; every test keeps its sandboxes in its own temp dir.

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "backend_test_support.h"
#include "ferry/sandbox/sandbox.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using testing::recording_observer;

namespace {

std::string unique_id(const std::string& what) { return testing::unique_id("fb", what); }

using testing::file_content;
using testing::percentile;
using testing::shell;

/// Processes on the host (zombies excluded) running as `uid`.
std::vector<pid_t> processes_of_uid(uid_t uid) {
  std::vector<pid_t> found;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const std::string status = testing::read_proc_file(e.path() / "status");
    auto state = status.find("\nState:\t");
    auto line = status.find("\nUid:\t");
    if (state == std::string::npos || line == std::string::npos || status[state + 8] == 'Z')
      continue;
    if (std::strtoul(status.c_str() + line + 6, nullptr, 10) == uid)
      found.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return found;
}

struct fixture {
  testing::temp_dir tmp;
  std::unique_ptr<sandbox_runtime> runtime;

  fixture() { runtime = make_runtime(); }

  std::unique_ptr<sandbox_runtime> make_runtime(sandbox_limits limits = {}) const {
    auto o = testing::test_config(tmp.path());
    o.limits = limits;
    auto r = ferry::sandbox::make_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    BOOST_REQUIRE((*r)->name() == "bwrap");
    return std::move(*r);
  }

  fs::path sandbox_dir(const std::string& id) const { return tmp.path() / "sandboxes" / id; }

  /// An idle sandbox, up; its host uid in `uid`.
  std::unique_ptr<sandbox> start_idle(const std::string& id, recording_observer& obs, uid_t& uid,
                                      sandbox_runtime* rt = nullptr, std::vector<std::string> env = {}) {
    sandbox_spec spec;
    spec.id = id;
    spec.env = std::move(env);
    auto s = (rt ? rt : runtime.get())->start(spec, obs);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    BOOST_REQUIRE_MESSAGE(obs.wait_for("running", 30s),
                          "not up: " << (obs.find("ended") ? obs.find("ended")->failure.value_or("") : "still starting"));
    uid = static_cast<uid_t>(std::stoul(file_content(sandbox_dir(id) / "uid")));
    return std::move(*s);
  }

  static recording_observer::record run(sandbox& sb, recording_observer& obs, const command_spec& c) {
    return testing::run_to_end(sb, obs, c, 60s);
  }

  /// Releases the sandbox: it ends cleanly and leaves nothing (directory, cgroups, processes).
  void release_and_check(sandbox& sb, recording_observer& obs, uid_t uid) {
    const std::string cgroups = file_content(sandbox_dir(sb.id()) / "cgroups");
    BOOST_REQUIRE(sb.release().ok());
    sb.wait();
    auto ended = obs.find("ended");
    BOOST_REQUIRE(ended);
    BOOST_TEST(!ended->failure.has_value(), ended->failure.value_or(""));
    check_gone(sb.id(), uid, cgroups);
  }

  void check_gone(const std::string& id, uid_t uid, const std::string& cgroups) {
    BOOST_TEST(!fs::exists(sandbox_dir(id)));
    BOOST_TEST(processes_of_uid(uid).empty());
    BOOST_TEST(testing::processes_mentioning(sandbox_dir(id).string() + "/").empty());
    std::istringstream lines(cgroups);
    for (std::string line; std::getline(lines, line);)
      BOOST_TEST(!fs::exists(line), line);
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(bwrap_runtime, *boost::unit_test::precondition(&testing::bwrap_available))

BOOST_FIXTURE_TEST_CASE(the_environment_is_only_what_the_sandbox_is_given, fixture) {
  ::setenv("FERRY_HOST_SECRET", "do-not-leak", 1);
  recording_observer obs;
  uid_t uid = 0;
  auto sb = start_idle(unique_id("env"), obs, uid, nullptr, {"FOO=bar"});
  run(*sb, obs, testing::argv(1, {"env"}));
  std::vector<std::string> lines;
  std::istringstream out(obs.output(1u, 0));
  for (std::string line; std::getline(out, line);)
    lines.push_back(line);
  std::sort(lines.begin(), lines.end());
  const std::vector<std::string> expected{"FOO=bar", "HOME=/workspace",
                                          "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                          "PWD=/workspace", "TERM=dumb"};
  BOOST_TEST(lines == expected, boost::test_tools::per_element());
  const auto t0 = steady::now();
  release_and_check(*sb, obs, uid);
  BOOST_TEST_MESSAGE("bwrap: release() -> on_ended "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(obs.find("ended")->at - t0).count()
                     << " ms");
  ::unsetenv("FERRY_HOST_SECRET");
}

BOOST_FIXTURE_TEST_CASE(root_inside_is_a_uid_of_its_own_without_capabilities_on_the_host, fixture) {
  recording_observer obs;
  uid_t uid = 0;
  const auto id = unique_id("uid");
  auto sb = start_idle(id, obs, uid);
  BOOST_TEST(uid >= 200000u);
  // A file of the host's root in the workspace: the sandbox's "root" may not write it.
  const fs::path host_file = sandbox_dir(id) / "workspace" / "roots-file";
  std::ofstream(host_file) << "host\n";
  ::chown(host_file.c_str(), 0, 0);
  fs::permissions(host_file, fs::perms(0644));
  run(*sb, obs,
      shell(1, "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' "
               "/proc/self/status | tr -d '\\t'; stat -c %u roots-file; "
               "(echo x >> roots-file) 2>/dev/null && echo WROTE || echo refused; "
               "touch /usr/ferry-x 2>/dev/null && echo WROTE || echo refused; "
               "touch /etc/ferry-x 2>/dev/null && echo WROTE || echo refused; "
               "echo mine > own-file && stat -c %u own-file"));
  BOOST_TEST(obs.output(1u, 0) == "0\nCapEff:0000000000000000\nCapBnd:0000000000000000\n"
                                  "NoNewPrivs:1\nSeccomp:2\n65534\nrefused\nrefused\nWROTE\n0\n",
             obs.output(1u, 1));
  // Seen from the host, its uid 0 is the sandbox's uid (inside, a nested user namespace of
  // --disable-userns maps 0 to 0).
  const pid_t init_pid = static_cast<pid_t>(std::stol(file_content(sandbox_dir(id) / "pids")));
  std::istringstream map(testing::read_proc_file(fs::path("/proc") / std::to_string(init_pid) / "uid_map"));
  uint64_t inside = 1, outside = 0, count = 0;
  map >> inside >> outside >> count;
  BOOST_TEST(inside == 0u);
  BOOST_TEST(outside == uid);
  BOOST_TEST(count == 1u);
  BOOST_TEST(file_content(host_file) == "host\n");
  // /etc is the sandbox's own layer over the root (its root's, idmapped); the host's /usr is a
  // read-only bind; the root on the host is untouched.
  BOOST_TEST(!fs::exists(tmp.path() / "rootfs-host" / "etc" / "ferry-x"));
  // What the sandbox writes belongs to its uid on the host, never to root.
  struct stat st {};
  BOOST_REQUIRE(::stat((sandbox_dir(id) / "workspace" / "own-file").c_str(), &st) == 0);
  BOOST_TEST(st.st_uid == uid);
  // Every process of the sandbox, bwrap's monitor too, runs as that uid on the host.
  BOOST_TEST(processes_of_uid(uid).size() == 2u);  // bwrap and ferry-init

  // ferry-init's stdin was the key's pipe from the host; it read the key and put /dev/null there
  // (process_api_test checks that the key is nowhere a command can look).
  const fs::path init_stdin = fs::read_symlink(fs::path("/proc") / std::to_string(init_pid) / "fd" / "0");
  BOOST_TEST(init_stdin == "/dev/null");
  release_and_check(*sb, obs, uid);
}

BOOST_FIXTURE_TEST_CASE(mounts_are_nosuid_and_the_root_is_the_sandboxs_own_layer, fixture) {
  recording_observer obs;
  uid_t uid = 0;
  auto sb = start_idle(unique_id("mounts"), obs, uid);
  run(*sb, obs,
      shell(1, "for m in / /usr /workspace /tmp /.ferry/ctl /dev; do "
               "while read -r dev mnt type opts rest; do [ \"$mnt\" = $m ] && last=$opts; done < /proc/self/mounts; "
               "echo \"$m: $(echo $last | tr , '\\n' | grep -xE 'ro|rw|nosuid' | tr '\\n' ' ')\"; done"));
  BOOST_TEST(obs.output(1u, 0) == "/: rw nosuid \n/usr: ro nosuid \n/workspace: rw nosuid \n/tmp: rw nosuid \n"
                                  "/.ferry/ctl: rw nosuid \n/dev: rw nosuid \n",
             obs.output(1u, 1));
  release_and_check(*sb, obs, uid);
}

BOOST_FIXTURE_TEST_CASE(has_no_network_but_its_own_loopback, fixture) {
  recording_observer obs;
  uid_t uid = 0;
  auto sb = start_idle(unique_id("net"), obs, uid);
  run(*sb, obs, shell(1, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; ip -o link | cut -d: -f2 | tr -d ' '; "
                         "ip route | wc -l"));
  BOOST_TEST(obs.output(1u, 0) == "lo\nlo\n0\n", obs.output(1u, 1));
  release_and_check(*sb, obs, uid);
}

BOOST_FIXTURE_TEST_CASE(the_seccomp_filter_denies_each_call_and_kills_other_abis, fixture) {
  recording_observer obs;
  uid_t uid = 0;
  const auto id = unique_id("seccomp");
  auto sb = start_idle(id, obs, uid);
  const fs::path probe = sandbox_dir(id) / "workspace" / "probe";
  testing::copy_executable(FERRY_SECCOMP_PROBE, probe);
  auto denied = run(*sb, obs, shell(1, "./probe denied"));
  BOOST_TEST(denied.exit.exit_code == 0, obs.output(1u, 1));
  std::istringstream out(obs.output(1u, 0));
  size_t checked = 0;
  for (std::string line; std::getline(out, line);) {
    const auto eq = line.find('=');
    const std::string name = line.substr(0, eq), result = line.substr(eq + 1);
    const std::string expected = name.rfind("allowed_", 0) == 0 ? "ok" : name == "clone3" ? "ENOSYS" : "EPERM";
    BOOST_TEST(result == expected, name);
    ++checked;
  }
  BOOST_TEST(checked == 52u);  // every call the probe makes
  for (uint32_t cmd : {2u, 3u}) {
    auto killed = run(*sb, obs, shell(cmd, cmd == 2 ? "exec ./probe x32" : "exec ./probe int80"));
    BOOST_TEST((killed.exit.reason == exit_reason::signaled), obs.output(cmd, 0));
    BOOST_TEST(killed.exit.signal == SIGSYS);
  }
  // Threads still work (libc falls back from clone3 to clone), and so do ordinary tools.
  auto threads = run(*sb, obs, shell(4, "python3 -c 'import threading; t = threading.Thread(target=print, args=(\"thread\",)); "
                                        "t.start(); t.join()'"));
  BOOST_TEST(obs.output(4u, 0) == "thread\n", obs.output(4u, 1));
  BOOST_TEST(threads.exit.exit_code == 0);
  release_and_check(*sb, obs, uid);
}

BOOST_FIXTURE_TEST_CASE(the_pids_and_memory_limits_hold, fixture) {
  sandbox_limits limits;
  limits.pids = 40;
  limits.memory_bytes = 96ull << 20;
  auto rt = make_runtime(limits);
  recording_observer obs;
  uid_t uid = 0;
  const auto id = unique_id("limits");
  auto sb = start_idle(id, obs, uid, rt.get());
  // 100 sleepers: the pids limit stops them well before (bash gives up forking).
  run(*sb, obs, shell(1, "for i in $(seq 100); do sleep 60 >/dev/null 2>&1 & done 2>/dev/null; true"));
  const size_t running = processes_of_uid(uid).size();  // bwrap, ferry-init and the sleepers
  BOOST_TEST(running > 5u);
  BOOST_TEST(running <= 40u);
  BOOST_REQUIRE(sb->signal(0, SIGKILL).ok());
  BOOST_REQUIRE(obs.wait_until([&](auto&) { return processes_of_uid(uid).size() == 2u; }, 10s));
  // 200 MiB in one process against 96 MiB: the kernel kills it; the sandbox goes on.
  auto hog = run(*sb, obs, shell(2, "exec python3 -c 'b = bytearray(200 << 20); b[::4096] = b\"x\" * len(b[::4096]); print(\"survived\")'"));
  BOOST_TEST(hog.exit.signal == SIGKILL, obs.output(2u, 0) + obs.output(2u, 1));
  BOOST_TEST(obs.output(2u, 0) == "");
  run(*sb, obs, shell(3, "echo alive"));
  BOOST_TEST(obs.output(3u, 0) == "alive\n");
  BOOST_TEST_MESSAGE("cgroups: " << file_content(sandbox_dir(id) / "cgroups"));
  release_and_check(*sb, obs, uid);
}

BOOST_FIXTURE_TEST_CASE(kill_ends_everything_fast_and_start_up_is_quick, fixture) {
  std::vector<double> ready_ms, kill_ms;
  for (int i = 0; i < 8; ++i) {
    recording_observer obs;
    uid_t uid = 0;
    const auto id = unique_id("kill");
    const auto t0 = steady::now();
    auto sb = start_idle(id, obs, uid);
    ready_ms.push_back(std::chrono::duration<double, std::milli>(obs.find("running")->at - t0).count());
    // Busy processes, some in sessions of their own, all over the sandbox.
    BOOST_REQUIRE(sb->run(shell(1, "for i in 1 2 3; do setsid sh -c 'while :; do :; done' & done; "
                                   "sleep 600 & echo up; wait")).ok());
    BOOST_REQUIRE(obs.wait_for_output("up\n", 30s));
    BOOST_TEST(processes_of_uid(uid).size() >= 7u);  // bwrap, ferry-init, sh, 3 loops, sleep
    const std::string cgroups = file_content(sandbox_dir(id) / "cgroups");
    const auto k0 = steady::now();
    sb->kill();
    kill_ms.push_back(std::chrono::duration<double, std::milli>(steady::now() - k0).count());
    BOOST_TEST(processes_of_uid(uid).empty());  // gone when kill() returns
    sb->wait();
    BOOST_TEST(obs.find("ended")->failure.value_or("") == "killed");
    check_gone(id, uid, cgroups);
  }
  BOOST_TEST_MESSAGE(fmt::format("bwrap: start() -> on_running p50 {:.1f} ms max {:.1f} ms; kill() p50 {:.1f} ms "
                                 "max {:.1f} ms ({} sandboxes)",
                                 percentile(ready_ms, 0.5), percentile(ready_ms, 1.0), percentile(kill_ms, 0.5),
                                 percentile(kill_ms, 1.0), ready_ms.size()));
}

BOOST_FIXTURE_TEST_CASE(orphans_of_a_sigkilled_owner_are_cleaned_up_on_start, fixture) {
  // sandbox_owner starts the sandbox and is SIGKILLed, as a crashing ferryd would be.
  spawn_options o;
  const auto id = unique_id("orphan");
  o.argv = {FERRY_SANDBOX_OWNER, "bwrap", tmp.path().string(), id, "sleep", "600"};
  o.out = stdio::pipe;
  auto owner = child_process::spawn(o);
  BOOST_REQUIRE(owner.ok());
  std::string seen;
  while (seen.find("started") == std::string::npos) {
    auto line = testing::read_line(owner->stdout_fd(), 30s);
    BOOST_REQUIRE_MESSAGE(line, "sandbox_owner stopped reporting");
    seen += *line + "\n";
  }
  owner->signal_group(SIGKILL);
  owner->wait();
  const uid_t uid = static_cast<uid_t>(std::stoul(file_content(sandbox_dir(id) / "uid")));
  const std::string cgroups = file_content(sandbox_dir(id) / "cgroups");
  BOOST_TEST(processes_of_uid(uid).size() >= 3u);  // it outlived its owner

  // The restarted host: it is live, then cleaned up as an orphan.
  auto restarted = make_runtime();
  auto live = restarted->list_live();
  BOOST_REQUIRE(live.ok());
  BOOST_TEST((*live == std::vector<std::string>{id}));
  auto cleaned = restarted->cleanup_orphans();
  BOOST_REQUIRE_MESSAGE(cleaned.ok(), (cleaned.ok() ? "" : cleaned.error().message));
  BOOST_TEST(*cleaned == 1u);
  check_gone(id, uid, cgroups);

  // A leftover whose `pids` was never written (the host died while starting it): found by uid.
  recording_observer obs;
  uid_t uid2 = 0;
  const auto id2 = unique_id("nopids");
  auto sb = start_idle(id2, obs, uid2);
  const std::string cgroups2 = file_content(sandbox_dir(id2) / "cgroups");
  sb->detach();
  fs::remove(sandbox_dir(id2) / "pids");
  BOOST_TEST(!processes_of_uid(uid2).empty());
  auto again = make_runtime()->cleanup_orphans();
  BOOST_REQUIRE_MESSAGE(again.ok(), (again.ok() ? "" : again.error().message));
  BOOST_TEST(*again == 1u);
  check_gone(id2, uid2, cgroups2);
}

BOOST_FIXTURE_TEST_CASE(uids_are_not_shared_between_live_sandboxes, fixture) {
  std::vector<std::unique_ptr<recording_observer>> observers;
  std::vector<std::unique_ptr<sandbox>> sandboxes;
  std::vector<uid_t> uids;
  for (int i = 0; i < 4; ++i) {
    observers.push_back(std::make_unique<recording_observer>());
    uids.push_back(0);
    sandboxes.push_back(start_idle(unique_id("uids"), *observers.back(), uids.back()));
  }
  BOOST_TEST(std::set<uid_t>(uids.begin(), uids.end()).size() == 4u);
  for (size_t i = 0; i < sandboxes.size(); ++i)
    release_and_check(*sandboxes[i], *observers[i], uids[i]);
}

BOOST_AUTO_TEST_CASE(make_runtime_falls_back_to_bwrap_when_runsc_does_not_work) {
  testing::temp_dir tmp;
  auto o = testing::test_config(tmp.path());
  o.backend = backend_choice::automatic;
  o.runsc.runsc = "ferry-no-such-runsc";
  auto r = make_runtime(o);
  BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  BOOST_TEST((*r)->name() == "bwrap");
  BOOST_TEST(parse_backend_choice("auto").ok());
  BOOST_TEST(!parse_backend_choice("docker").ok());
  if (testing::installed("runsc")) {
    o.runsc.runsc = "runsc";
    auto chosen = make_runtime(o);
    BOOST_REQUIRE(chosen.ok());
    BOOST_TEST((*chosen)->name() == "runsc");  // it works here: no fallback
    BOOST_TEST(fs::is_empty(tmp.path() / "sandboxes"));  // the probe left nothing
  }
}

BOOST_AUTO_TEST_SUITE_END()
