#define BOOST_TEST_MODULE sandbox_init_process_api
#include <boost/test/unit_test.hpp>

// ferry-init's process API (protocol 4) on the host, in socket mode, talked to frame by frame:
// Run (argv, shell, env, cwd, pty, timeout, stdin, output limit), Signal, Stdin, persistent shell
// sessions, several commands at once, re-attach with several commands, Release, the HTTP
// forwarder, backpressure and memory, and hostile frames (a fixed-seed fuzz loop). The same
// behaviour inside real gVisor sandboxes is in runsc_process_api_test.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <fstream>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "fake_egress_proxy.h"
#include "init_test_support.h"

using namespace ferry::sandbox;
using namespace ferry::sandbox::testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

run_request argv_run(uint32_t id, std::vector<std::string> argv) {
  run_request r;
  r.command_id = id;
  r.argv = std::move(argv);
  return r;
}

run_request shell_run(uint32_t id, std::string shell, std::string session = "") {
  run_request r;
  r.command_id = id;
  r.shell = std::move(shell);
  r.session = std::move(session);
  return r;
}

/// Runs one command on `c` to its end and returns its story.
command_story run_to_end(init_connection& c, const run_request& r, std::chrono::milliseconds timeout = 20s) {
  c.stories.erase(r.command_id);  // a refused (or forgotten) id used again
  c.send(run_frame(r));
  BOOST_REQUIRE_MESSAGE(c.until_over(r.command_id, timeout), "command " << r.command_id << " did not end");
  return c.story(r.command_id);
}

bool group_exists(pid_t pgid) { return ::kill(-pgid, 0) == 0 || errno != ESRCH; }

/// Members of a killed group may be reaped (by ferry-init, their new parent) a moment after the
/// command's Exited: a zombie still counts as a member.
bool group_gone_soon(pid_t pgid) {
  for (auto deadline = std::chrono::steady_clock::now() + 3s; group_exists(pgid);) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

/// Value of a `Key:   N kB` line of /proc/<pid>/status, in KiB.
uint64_t proc_status_kib(pid_t pid, const std::string& key) {
  const std::string status = read_proc_file(fmt::format("/proc/{}/status", pid));
  auto at = status.find(key + ":");
  if (at == std::string::npos)
    return 0;
  return std::strtoull(status.c_str() + at + key.size() + 1, nullptr, 10);
}

uint16_t free_tcp_port() {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(s);
  return ntohs(addr.sin_port);
}

}  // namespace

// --- running commands ----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(an_idle_sandbox_runs_commands_given_as_argv_or_shell) {
  listening_init init;
  auto c = init.attach();
  BOOST_TEST(c->events.back().commands == 0u);
  auto a = run_to_end(*c, argv_run(7, {"printf", "%s|", "one two", "$HOME"}));
  BOOST_REQUIRE(a.started);
  BOOST_TEST((a.started->argv == std::vector<std::string>{"printf", "%s|", "one two", "$HOME"}));
  BOOST_TEST(a.started->pgid == a.started->pid);
  BOOST_TEST(!a.started->pty);
  BOOST_TEST(a.out[0] == "one two|$HOME|");  // argv: no shell in between
  BOOST_TEST(a.exited->exit_code == 0);
  BOOST_TEST((a.exited->reason == v1::ExitReason::Exited));

  auto b = run_to_end(*c, shell_run(8, "echo \"a  b\" 'c'; echo err >&2; exit 5"));
  BOOST_TEST((b.started->argv == std::vector<std::string>{"/bin/bash", "-c", "echo \"a  b\" 'c'; echo err >&2; exit 5"}));
  BOOST_TEST(b.out[0] == "a  b c\n");
  BOOST_TEST(b.out[1] == "err\n");
  BOOST_TEST(b.exited->exit_code == 5);
  BOOST_TEST(b.exited->stdout_bytes == 7u);
  BOOST_TEST(b.exited->stderr_bytes == 4u);
  BOOST_TEST(b.exited->truncated_bytes == 0u);
  BOOST_TEST(b.exited->data.empty());
  // Nothing of them is left in the workspace (the output file is only kept for truncations).
  BOOST_TEST(!fs::exists(init.workspace / ".ferry" / "output" / "8.log"));

  // The exec round trip of `true` on the host (Run written → Exited read), for comparison with
  // runsc_process_api_test's figure inside gVisor.
  std::vector<double> ms;
  for (uint32_t id = 100; id < 140; ++id) {
    const auto t0 = std::chrono::steady_clock::now();
    (void)run_to_end(*c, argv_run(id, {"true"}));
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  BOOST_TEST_MESSAGE(fmt::format("exec round trip of `true` on the host: p50 {:.2f} ms, p90 {:.2f} ms ({} runs)", ms[ms.size() / 2],
                                 ms[ms.size() * 9 / 10], ms.size()));
}

BOOST_AUTO_TEST_CASE(commands_run_concurrently_and_their_output_stays_apart) {
  listening_init init;
  auto c = init.attach();
  const auto t0 = std::chrono::steady_clock::now();
  for (uint32_t id = 1; id <= 4; ++id) {
    run_request r = shell_run(id, fmt::format("for i in 1 2 3 4 5; do echo c{}-$i; echo e{}-$i >&2; sleep 0.1; done", id, id));
    c->send(run_frame(r));
  }
  BOOST_REQUIRE(c->until([&] {
    for (uint32_t id = 1; id <= 4; ++id)
      if (!c->story(id).over())
        return false;
    return true;
  }));
  const auto took = std::chrono::steady_clock::now() - t0;
  BOOST_TEST((took < 2s), "4 × 0.5 s commands took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  for (uint32_t id = 1; id <= 4; ++id) {
    auto& s = c->story(id);
    std::string out, err;
    for (int i = 1; i <= 5; ++i) {
      out += fmt::format("c{}-{}\n", id, i);
      err += fmt::format("e{}-{}\n", id, i);
    }
    BOOST_TEST(s.out[0] == out);
    BOOST_TEST(s.out[1] == err);
    BOOST_TEST(s.exited->exit_code == 0);
  }
  // Interleaved on the wire: command 4's first output comes before command 1's last.
  size_t first4 = 0, last1 = 0;
  for (size_t i = 0; i < c->events.size(); ++i) {
    const auto& e = c->events[i];
    if (e.type == v1::Message::Output && e.command_id == 4 && first4 == 0)
      first4 = i;
    if (e.type == v1::Message::Output && e.command_id == 1)
      last1 = i;
  }
  BOOST_TEST(first4 < last1);
}

BOOST_AUTO_TEST_CASE(environment_and_working_directory) {
  listening_init init;
  fs::create_directories(init.workspace / "sub" / "deeper");
  auto c = init.attach();
  run_request r = shell_run(1, "echo \"$FOO|$BAR|${UNSET-none}\"; pwd");
  r.env = {"FOO=x y", "BAR=1=2"};
  auto s = run_to_end(*c, r);
  BOOST_TEST(s.out[0] == "x y|1=2|none\n" + init.workspace.string() + "\n");  // default: the workspace

  r = shell_run(2, "pwd");
  r.cwd = "sub/deeper";  // relative to the workspace
  BOOST_TEST(run_to_end(*c, r).out[0] == (init.workspace / "sub" / "deeper").string() + "\n");
  r = shell_run(3, "pwd");
  r.cwd = "/";
  BOOST_TEST(run_to_end(*c, r).out[0] == "/\n");
  // An environment entry overrides ferry-init's own (PATH decides where argv[0] is found).
  r = argv_run(4, {"ferry-test-tool"});
  fs::create_directories(init.tmp.path() / "bin");
  {
    std::ofstream f(init.tmp.path() / "bin" / "ferry-test-tool");
    f << "#!/bin/sh\necho found\n";
  }
  fs::permissions(init.tmp.path() / "bin" / "ferry-test-tool", fs::perms(0755));
  r.env = {"PATH=" + (init.tmp.path() / "bin").string() + ":/usr/bin:/bin"};
  BOOST_TEST(run_to_end(*c, r).out[0] == "found\n");
}

BOOST_AUTO_TEST_CASE(runs_that_cannot_be_carried_out_get_a_command_error_naming_them) {
  listening_init init;
  fs::create_directories(init.workspace / "dir");
  std::ofstream(init.workspace / "file") << "x";
  auto c = init.attach();
  c->send(run_frame(argv_run(1, {"sleep", "30"})));
  BOOST_REQUIRE(c->until([&] { return c->story(1).started.has_value(); }));
  struct refusal {
    run_request run;
    v1::CommandErrorCode code;
    std::string needle;
  };
  auto with = [](run_request r, auto&& change) {
    change(r);
    return r;
  };
  std::vector<refusal> cases{
      {argv_run(1, {"true"}), v1::CommandErrorCode::DuplicateId, "command 1: the id is in use"},
      {argv_run(0, {"true"}), v1::CommandErrorCode::BadRequest, "0 is not a command id"},
      {with(argv_run(10, {"true"}), [](auto& r) { r.shell = "true"; }), v1::CommandErrorCode::BadRequest, "either argv or shell"},
      {argv_run(11, {}), v1::CommandErrorCode::BadRequest, "either argv or shell"},
      {with(argv_run(12, {"true"}), [](auto& r) { r.cwd = "nope"; }), v1::CommandErrorCode::BadCwd, "No such file"},
      {with(argv_run(13, {"true"}), [](auto& r) { r.cwd = "file"; }), v1::CommandErrorCode::BadCwd, "is not a directory"},
      {argv_run(14, {"/nonexistent/prog"}), v1::CommandErrorCode::ExecFailed, "cannot execute `/nonexistent/prog`: No such file"},
      {argv_run(15, {"ferry-no-such-program"}), v1::CommandErrorCode::ExecFailed, "cannot execute `ferry-no-such-program`"},
      {argv_run(16, {(init.workspace / "file").string()}), v1::CommandErrorCode::ExecFailed, "Permission denied"},
      {with(argv_run(17, {"true"}), [](auto& r) { r.env = {"NOEQUALS"}; }), v1::CommandErrorCode::BadRequest, "`NOEQUALS` is not K=V"},
      {with(argv_run(18, {"true"}), [](auto& r) { r.env = {"=x"}; }), v1::CommandErrorCode::BadRequest, "not K=V"},
      {with(argv_run(19, {"true"}), [](auto& r) { r.session = "s"; }), v1::CommandErrorCode::BadRequest, "shell commands only"},
      {shell_run(20, "true", "bad name"), v1::CommandErrorCode::BadRequest, "bad session name"},
      {shell_run(21, "true", std::string(65, 'a')), v1::CommandErrorCode::BadRequest, "bad session name"},
      {argv_run(22, {"echo", std::string("a\0b", 3)}), v1::CommandErrorCode::BadRequest, "NUL"},
      {argv_run(23, {"echo", std::string(600 << 10, 'x')}), v1::CommandErrorCode::BadRequest, "exceed"},
      {with(argv_run(24, {"true"}), [](auto& r) { r.pty = true; r.rows = 0; }), v1::CommandErrorCode::BadRequest, "rows and cols"},
  };
  for (const auto& k : cases) {
    c->send(run_frame(k.run));
    auto e = c->next();
    BOOST_REQUIRE(e);
    BOOST_TEST_REQUIRE((e->type == v1::Message::CommandError), "run " << k.run.command_id);
    BOOST_TEST(e->command_id == k.run.command_id);
    BOOST_TEST((e->code == k.code), "run " << k.run.command_id << ": " << e->data);
    BOOST_TEST(e->data.find(k.needle) != std::string::npos, e->data);
    BOOST_TEST(e->data.find("command " + std::to_string(k.run.command_id) + ":") == 0u, e->data);
  }
  // None of them started anything; the sandbox carries on, and a refused id may be used again.
  BOOST_TEST(run_to_end(*c, argv_run(14, {"echo", "fine"})).out[0] == "fine\n");
  c->send(signal_frame(1, SIGKILL));
  BOOST_REQUIRE(c->until_over(1));
}

BOOST_AUTO_TEST_CASE(at_most_64_commands_run_at_once) {
  listening_init init;
  auto c = init.attach();
  for (uint32_t id = 1; id <= 64; ++id)
    c->send(run_frame(argv_run(id, {"sleep", "30"})));
  BOOST_REQUIRE(c->until([&] { return c->story(64).started.has_value(); }));
  c->send(run_frame(argv_run(65, {"true"})));
  BOOST_REQUIRE(c->until([&] { return c->story(65).error.has_value(); }));
  BOOST_TEST((c->story(65).error->code == v1::CommandErrorCode::TooMany));
  c->send(signal_frame(0, SIGKILL));
  BOOST_REQUIRE(c->until([&] {
    for (uint32_t id = 1; id <= 64; ++id)
      if (!c->story(id).over())
        return false;
    return true;
  }));
  BOOST_TEST((c->story(33).exited->reason == v1::ExitReason::Killed));
  BOOST_TEST(run_to_end(*c, argv_run(66, {"true"})).exited->exit_code == 0);
}

BOOST_AUTO_TEST_CASE(stdin_bytes_and_streamed_stdin) {
  listening_init init;
  auto c = init.attach();
  run_request r = argv_run(1, {"cat"});
  r.stdin_data = "given\nat once\n";
  BOOST_TEST(run_to_end(*c, r).out[0] == "given\nat once\n");
  BOOST_TEST(run_to_end(*c, argv_run(2, {"wc", "-c"})).out[0] == "0\n");  // no stdin: /dev/null

  r = argv_run(3, {"cat"});
  r.stdin_data = "first\n";
  r.stdin_close = false;
  c->send(run_frame(r));
  BOOST_REQUIRE(c->until([&] { return c->story(3).out[0] == "first\n"; }));
  c->send(stdin_frame(3, "second\n", false));
  BOOST_REQUIRE(c->until([&] { return c->story(3).out[0] == "first\nsecond\n"; }));
  std::string big(3u << 20, 'z');  // more than a pipe holds: written as cat reads
  for (size_t off = 0; off < big.size(); off += 512u << 10)
    c->send(stdin_frame(3, big.substr(off, 512u << 10), false));
  c->send(stdin_frame(3, "", true));
  BOOST_REQUIRE(c->until_over(3, 60s));
  auto& s = c->story(3);
  BOOST_TEST(s.exited->exit_code == 0);
  // The default output limit (1 MiB) applies: the rest is in the file.
  BOOST_TEST(s.exited->stdout_bytes == 13u + big.size());
  BOOST_TEST(fs::file_size(s.exited->data) == 13u + big.size());
  // Stdin for a command that ended is dropped without a word.
  c->send(stdin_frame(3, "late", true));
  BOOST_TEST(run_to_end(*c, argv_run(4, {"true"})).exited->exit_code == 0);
}

BOOST_AUTO_TEST_CASE(a_pty_is_a_terminal_of_the_given_size) {
  listening_init init;
  auto c = init.attach();
  run_request r = shell_run(1, "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo tty; stty size; echo $TERM; echo err >&2");
  r.pty = true;
  r.rows = 33;
  r.cols = 111;
  auto s = run_to_end(*c, r);
  BOOST_TEST(s.started->pty);
  BOOST_TEST(s.out[0] == "tty\r\n33 111\r\nxterm-256color\r\nerr\r\n");  // one stream, terminal line endings
  BOOST_TEST(s.out[1].empty());
  BOOST_TEST(s.exited->exit_code == 0);

  // Interactive: input goes through the terminal (echoed), EOF closes it.
  r = argv_run(2, {"/bin/sh", "-c", "read line; echo \"got $line\"; cat"});
  r.pty = true;
  r.stdin_close = false;
  c->send(run_frame(r));
  BOOST_REQUIRE(c->until([&] { return c->story(2).started.has_value(); }));
  c->send(stdin_frame(2, "hello\n", false));
  BOOST_REQUIRE(c->until([&] { return c->story(2).out[0].find("got hello") != std::string::npos; }));
  c->send(stdin_frame(2, "more\n", true));
  BOOST_REQUIRE(c->until_over(2));
  BOOST_TEST(c->story(2).out[0] == "hello\r\ngot hello\r\nmore\r\nmore\r\n");
  BOOST_TEST(c->story(2).exited->exit_code == 0);
}

// --- ending commands -----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(a_timeout_kills_the_whole_process_group) {
  listening_init init;
  auto c = init.attach();
  run_request r = shell_run(1, "sleep 100 & sleep 100 & echo started; wait");
  r.timeout_ms = 400;
  const auto t0 = std::chrono::steady_clock::now();
  auto s = run_to_end(*c, r);
  const auto took = std::chrono::steady_clock::now() - t0;
  BOOST_TEST(s.out[0] == "started\n");
  BOOST_TEST((s.exited->reason == v1::ExitReason::Timeout));
  BOOST_TEST(s.exited->signal == SIGKILL);
  BOOST_TEST(s.exited->exit_code == -1);
  BOOST_TEST(s.exited->duration_ms >= 400u);
  BOOST_TEST((took < 3s));
  BOOST_TEST(group_gone_soon(s.started->pgid));

  // A process that left the group (setsid) and holds the pipe does not keep the command open.
  r = shell_run(2, "setsid sleep 100 & echo started; sleep 100");
  r.timeout_ms = 300;
  auto escaped = run_to_end(*c, r, 10s);
  BOOST_TEST((escaped.exited->reason == v1::ExitReason::Timeout));
  c->send(signal_frame(0, SIGKILL));  // the escaped sleep is still running: end it
}

BOOST_AUTO_TEST_CASE(signal_reaches_a_group_a_process_or_everything) {
  listening_init init;
  auto c = init.attach();
  c->send(run_frame(shell_run(1, "trap 'echo term; exit 9' TERM; echo ready; while :; do sleep 0.1; done")));
  BOOST_REQUIRE(c->until([&] { return c->story(1).out[0] == "ready\n"; }));
  c->send(signal_frame(1, SIGTERM, /*group=*/false));  // bash only: it traps and exits
  BOOST_REQUIRE(c->until_over(1));
  BOOST_TEST(c->story(1).exited->exit_code == 9);
  BOOST_TEST((c->story(1).exited->reason == v1::ExitReason::Exited));

  c->send(run_frame(shell_run(2, "sleep 100 & sleep 100 & echo ready; wait")));
  BOOST_REQUIRE(c->until([&] { return c->story(2).out[0] == "ready\n"; }));
  const pid_t group2 = c->story(2).started->pgid;
  c->send(signal_frame(2, SIGTERM));
  BOOST_REQUIRE(c->until_over(2));
  BOOST_TEST((c->story(2).exited->reason == v1::ExitReason::Killed));
  BOOST_TEST(c->story(2).exited->signal == SIGTERM);
  BOOST_TEST(group_gone_soon(group2));

  // 0: every command.
  for (uint32_t id : {3u, 4u, 5u})
    c->send(run_frame(argv_run(id, {"sleep", "100"})));
  BOOST_REQUIRE(c->until([&] { return c->story(5).started.has_value(); }));
  c->send(signal_frame(0, SIGKILL));
  BOOST_REQUIRE(c->until([&] { return c->story(3).over() && c->story(4).over() && c->story(5).over(); }));
  for (uint32_t id : {3u, 4u, 5u}) {
    BOOST_TEST((c->story(id).exited->reason == v1::ExitReason::Killed));
    BOOST_TEST(c->story(id).exited->signal == SIGKILL);
  }
  // Signals for commands that ended, or never were, are ignored.
  c->send(signal_frame(2, SIGKILL));
  c->send(signal_frame(999, SIGKILL));
  BOOST_TEST(run_to_end(*c, argv_run(6, {"true"})).exited->exit_code == 0);
  // A command that dies of a signal nobody sent it.
  auto self = run_to_end(*c, shell_run(7, "kill -USR1 $$"));
  BOOST_TEST((self.exited->reason == v1::ExitReason::Signaled));
  BOOST_TEST(self.exited->signal == SIGUSR1);
}

BOOST_AUTO_TEST_CASE(signals_to_ferry_init_are_forwarded_to_the_commands) {
  listening_init init;
  auto c = init.attach();
  c->send(run_frame(argv_run(1, {"sleep", "100"})));
  c->send(run_frame(argv_run(2, {"sleep", "100"})));
  BOOST_REQUIRE(c->until([&] { return c->story(2).started.has_value(); }));
  ::kill(init.proc->pid(), SIGTERM);
  BOOST_REQUIRE(c->until([&] { return c->story(1).over() && c->story(2).over(); }));
  BOOST_TEST(c->story(1).exited->signal == SIGTERM);
  BOOST_TEST((c->story(1).exited->reason == v1::ExitReason::Signaled));
  BOOST_TEST(!init.proc->try_wait().has_value());  // ferry-init itself carries on
}

BOOST_AUTO_TEST_CASE(resource_usage_is_reported) {
  listening_init init;
  auto c = init.attach();
  // About 0.3-1 s of CPU in user mode, and 64 MiB touched.
  auto s = run_to_end(*c, shell_run(1, "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; "
                                       "head -c 67108864 /dev/zero | tr '\\0' x | (x=$(cat); echo ${#x})"), 60s);
  BOOST_TEST(s.exited->exit_code == 0);
  BOOST_TEST(s.exited->user_cpu_ms >= 100u, s.exited->user_cpu_ms);
  BOOST_TEST(s.exited->user_cpu_ms <= s.exited->duration_ms * 2 + 100);
  BOOST_TEST(s.exited->max_rss_kib >= 64u * 1024, s.exited->max_rss_kib);
  auto idle = run_to_end(*c, argv_run(2, {"sleep", "0.2"}));
  BOOST_TEST(idle.exited->user_cpu_ms < 100u);
  BOOST_TEST(idle.exited->max_rss_kib > 0u);
  BOOST_TEST(idle.exited->max_rss_kib < 64u * 1024);
  BOOST_TEST_MESSAGE(fmt::format("busy: user {} ms sys {} ms rss {} KiB; sleep: user {} ms rss {} KiB", s.exited->user_cpu_ms,
                                 s.exited->sys_cpu_ms, s.exited->max_rss_kib, idle.exited->user_cpu_ms,
                                 idle.exited->max_rss_kib));
}

// --- output ----------------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(huge_output_is_truncated_with_a_marker_and_kept_whole_in_a_file) {
  listening_init init;
  auto c = init.attach();
  const uint64_t total = 50'000'000;
  auto s = run_to_end(*c, shell_run(1, "echo start; echo oops >&2; head -c 49999990 /dev/urandom | base64 -w 0 | head -c 49999990; echo oops >&2"),
                      120s);
  // "start\n" (6) + 49999990 + "oops\n" × 2 (10) = 50000006 bytes in all.
  const uint64_t written = 6 + 49'999'990 + 10;
  (void)total;
  BOOST_REQUIRE(s.truncated);
  BOOST_REQUIRE(s.exited);
  BOOST_TEST(s.out[0].size() + s.out[1].size() == 1u << 20);  // exactly the limit was sent
  BOOST_TEST(s.out[0].rfind("start\n", 0) == 0u);
  BOOST_TEST(s.out[1] == "oops\n");
  BOOST_TEST(s.truncated->stdout_offset == s.out[0].size());
  BOOST_TEST(s.truncated->stderr_offset == 5u);
  BOOST_TEST(s.exited->stdout_bytes + s.exited->stderr_bytes == written);
  BOOST_TEST(s.exited->stderr_bytes == 10u);
  BOOST_TEST(s.exited->truncated_bytes == written - (1u << 20));
  const fs::path path = init.workspace / ".ferry" / "output" / "1.log";
  BOOST_TEST(s.exited->data == path.string());
  BOOST_TEST(s.truncated->data == path.string());
  BOOST_REQUIRE(fs::exists(path));
  BOOST_TEST(fs::file_size(path) == written);
  // The file is the whole output in the order read: what was sent is its beginning (here
  // stderr's first line came in between, wherever it was read).
  std::ifstream f(path, std::ios::binary);
  std::string head(1u << 20, '\0');
  f.read(head.data(), static_cast<std::streamsize>(head.size()));
  std::string sent_merged = head;
  BOOST_TEST(head.find("oops\n") != std::string::npos);
  sent_merged.erase(sent_merged.find("oops\n"), 5);
  BOOST_TEST((sent_merged == s.out[0].substr(0, sent_merged.size())));
  BOOST_TEST(c->story(1).outputs >= (1u << 20) / ferry::wire::max_output_chunk);
}

BOOST_AUTO_TEST_CASE(output_limits_are_per_run_and_exact) {
  listening_init init;
  auto c = init.attach();
  run_request r = argv_run(1, {"head", "-c", "100000", "/dev/zero"});
  r.output_limit_bytes = 100000;  // exactly the limit: nothing cut, no file
  auto exact = run_to_end(*c, r);
  BOOST_TEST(!exact.truncated);
  BOOST_TEST(exact.out[0].size() == 100000u);
  BOOST_TEST(exact.exited->truncated_bytes == 0u);
  BOOST_TEST(!fs::exists(init.workspace / ".ferry" / "output" / "1.log"));

  r.command_id = 2;
  r.output_limit_bytes = 99999;
  auto one_over = run_to_end(*c, r);
  BOOST_REQUIRE(one_over.truncated);
  BOOST_TEST(one_over.out[0].size() == 99999u);
  BOOST_TEST(one_over.exited->truncated_bytes == 1u);
  BOOST_TEST(fs::file_size(init.workspace / ".ferry" / "output" / "2.log") == 100000u);

  r.command_id = 3;
  r.argv = {"head", "-c", "20000000", "/dev/zero"};
  r.output_limit_bytes = 0;  // no limit: all of it is sent
  auto all = run_to_end(*c, r, 60s);
  BOOST_TEST(all.out[0].size() == 20000000u);
  BOOST_TEST(!all.truncated);

  r.command_id = 4;
  r.output_limit_bytes = 12u << 20;  // larger than the buffer: the file is written from the start
  auto big = run_to_end(*c, r, 60s);
  BOOST_TEST(big.out[0].size() == 12u << 20);
  BOOST_TEST(fs::file_size(big.exited->data) == 20000000u);
}

BOOST_AUTO_TEST_CASE(a_slow_host_bounds_ferry_inits_memory) {
  // 200 MB through a host that reads slowly at first: ferry-init stops reading the command's pipe
  // (the command blocks) instead of buffering. Its peak RSS stays near buffer + socket buffers.
  listening_init init({}, {"--buffer-bytes", "1048576"});
  auto c = init.attach();
  c->keep_output = false;
  run_request r = argv_run(1, {"head", "-c", "200000000", "/dev/zero"});
  r.output_limit_bytes = 0;
  c->send(run_frame(r));
  std::this_thread::sleep_for(1s);  // not reading at all
  const uint64_t while_stalled = proc_status_kib(init.proc->pid(), "VmRSS");
  BOOST_REQUIRE(c->until_over(1, 120s));
  auto& s = c->story(1);
  BOOST_TEST(s.at[0] == 200000000u);
  const uint64_t peak = proc_status_kib(init.proc->pid(), "VmHWM");
  BOOST_TEST_MESSAGE("ferry-init RSS while the host stalled: " << while_stalled << " KiB; peak over 200 MB: " << peak << " KiB");
  BOOST_TEST(peak < 24u * 1024, peak);
}

// --- persistent shell sessions --------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(a_session_carries_directory_variables_functions_and_aliases) {
  listening_init init;
  fs::create_directories(init.workspace / "proj" / "src");
  auto c = init.attach();
  uint32_t id = 0;
  auto run = [&](const std::string& cmd, std::string session = "main") {
    return run_to_end(*c, shell_run(++id, cmd, std::move(session)));
  };
  auto a = run("cd proj; export X=1; Y='it''s \"quoted\"'; greet() { echo \"hi $1\"; }; alias ll='echo aliased'; pwd");
  BOOST_TEST(a.out[0] == (init.workspace / "proj").string() + "\n");
  BOOST_TEST(a.started->session == "main");
  BOOST_TEST((a.started->argv == std::vector<std::string>{"/bin/bash", "-c",
                                                          "cd proj; export X=1; Y='it''s \"quoted\"'; greet() { echo \"hi $1\"; }; alias ll='echo aliased'; pwd"}));
  auto b = run("pwd; echo \"$X|$Y\"; greet you; ll; env | grep -c '^X=1$'; env | grep -c '^Y=' ; echo \"[$0|$1]\"");
  BOOST_TEST(b.out[0] == (init.workspace / "proj").string() + "\n1|its \"quoted\"\nhi you\naliased\n1\n0\n[bash|]\n",
             b.out[0] + b.out[1]);
  // Heredocs, quotes and the command's exit code.
  auto h = run("cd src\ncat <<'EOF'\n$X 'single' \"double\"\nEOF\nexit 3");
  BOOST_TEST(h.out[0] == "$X 'single' \"double\"\n");
  BOOST_TEST(h.exited->exit_code == 3);
  BOOST_TEST(run("pwd").out[0] == (init.workspace / "proj" / "src").string() + "\n");  // saved despite exit 3
  // set -e ends the command at the failure, and does not carry over.
  auto e = run("set -e; unset X; false; echo not-reached");
  BOOST_TEST(e.out[0].empty());
  BOOST_TEST(e.exited->exit_code == 1);
  auto after = run("false; echo carried-on; echo \"X=${X-unset}\"; env | grep -c '^X=' || true");
  BOOST_TEST(after.out[0] == "carried-on\nX=unset\n0\n");
  // Another session, and commands outside any session, see none of it.
  BOOST_TEST(run("pwd; echo \"${X-unset}\"", "other").out[0] == init.workspace.string() + "\nunset\n");
  BOOST_TEST(run("type greet >/dev/null 2>&1 || echo no-greet", "").out[0] == "no-greet\n");
  // Run.env and cwd apply in the session like `export` and `cd`.
  run_request r = shell_run(++id, "echo $Z; pwd", "main");
  r.env = {"Z=zed"};
  r.cwd = "proj";
  auto z = run_to_end(*c, r);
  BOOST_TEST(z.out[0] == "zed\n" + (init.workspace / "proj").string() + "\n");
  BOOST_TEST(run("echo $Z; pwd").out[0] == "zed\n" + (init.workspace / "proj").string() + "\n");
  // A directory that disappeared: back to the workspace, with a note.
  run("mkdir gone; cd gone; rmdir ../gone");
  auto gone = run("pwd");
  BOOST_TEST(gone.out[0] == init.workspace.string() + "\n");
  BOOST_TEST(gone.out[1].find("is gone") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_session_command_killed_half_way_leaves_the_session_as_it_was) {
  listening_init init;
  fs::create_directories(init.workspace / "a");
  fs::create_directories(init.workspace / "b");
  auto c = init.attach();
  BOOST_TEST(run_to_end(*c, shell_run(1, "cd a; export K=before", "s")).exited->exit_code == 0);
  run_request r = shell_run(2, "cd ../b; export K=after; sleep 100", "s");
  r.timeout_ms = 300;
  auto killed = run_to_end(*c, r);
  BOOST_TEST((killed.exited->reason == v1::ExitReason::Timeout));
  // One command at a time per session.
  c->send(run_frame(shell_run(3, "sleep 1", "s")));
  BOOST_REQUIRE(c->until([&] { return c->story(3).started.has_value(); }));
  c->send(run_frame(shell_run(4, "true", "s")));
  BOOST_REQUIRE(c->until([&] { return c->story(4).error.has_value(); }));
  BOOST_TEST((c->story(4).error->code == v1::CommandErrorCode::SessionBusy));
  BOOST_REQUIRE(c->until_over(3));
  auto next = run_to_end(*c, shell_run(5, "pwd; echo $K", "s"));
  BOOST_TEST(next.out[0] == (init.workspace / "a").string() + "\nbefore\n");
  // The state is outside the workspace.
  BOOST_TEST(fs::exists(init.state / "sessions" / "s.state"));
  BOOST_TEST(!fs::exists(init.state / "sessions" / "s.next.2"));
  std::error_code ec;
  for (auto& e : fs::recursive_directory_iterator(init.workspace, ec))
    BOOST_TEST(e.path().filename().string().find("state") == std::string::npos, e.path());
}

// --- re-attach, Release -----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(a_re_attaching_host_resumes_each_command_it_knows_and_gets_the_rest_whole) {
  listening_init init;
  {
    auto c = init.attach();
    c->send(run_frame(shell_run(1, "echo one-a; sleep 0.5; echo one-b")));
    c->send(run_frame(shell_run(2, "echo two; echo two-err >&2")));
    c->send(run_frame(shell_run(3, "echo three-a; sleep 0.5; echo three-b; exit 3")));
    c->send(run_frame(argv_run(4, {"true"})));
    BOOST_REQUIRE(c->until([&] {
      return c->story(1).out[0] == "one-a\n" && c->story(2).over() && c->story(3).out[0] == "three-a\n" && c->story(4).over();
    }));
  }  // gone without Release, mid-run: 1 and 3 still run
  std::this_thread::sleep_for(800ms);
  // This host had 1 up to "one-a\n", 2 in full (and its Exited), and never heard of 3; it names
  // 4 as exited (ferry-init forgets it), and 9, which ferry-init does not know.
  auto c = init.attach({{1, 6, 0}, {2, 4, 8, true}, {4, 0, 0, true}, {9, 0, 0}});
  c->story(1).at[0] = 6;
  BOOST_TEST(c->events.back().commands == 2u);  // 1 and 3 (2 and 4 forgotten)
  BOOST_REQUIRE(c->until([&] { return c->story(1).over() && c->story(3).over() && c->story(9).over(); }));
  BOOST_TEST(c->story(1).out[0] == "one-b\n");
  BOOST_TEST(c->story(1).exited->exit_code == 0);
  BOOST_TEST(c->story(3).out[0] == "three-a\nthree-b\n");  // unknown to the host: from 0
  BOOST_TEST(c->story(3).exited->exit_code == 3);
  BOOST_TEST((c->story(9).error->code == v1::CommandErrorCode::UnknownCommand));
  BOOST_TEST(!c->story(2).started.has_value());
  BOOST_TEST(!c->story(4).started.has_value());
  // The forgotten ids are free again.
  BOOST_TEST(run_to_end(*c, argv_run(2, {"echo", "again"})).out[0] == "again\n");
}

BOOST_AUTO_TEST_CASE(release_ends_the_sandbox_at_any_time_with_every_process) {
  listening_init init({"sleep", "100"});
  auto c = init.attach();
  c->send(run_frame(shell_run(2, "sleep 100 & sleep 100")));
  BOOST_REQUIRE(c->until([&] { return c->story(1).started.has_value() && c->story(2).started.has_value(); }));
  const pid_t g1 = c->story(1).started->pgid, g2 = c->story(2).started->pgid;
  c->send(release_frame());
  BOOST_TEST(!c->next(5s, true));  // closed without another word
  auto st = init.proc->wait_for(5s);
  BOOST_REQUIRE(st);
  BOOST_TEST(st->ok());
  BOOST_TEST(!group_exists(g1));
  BOOST_TEST(!group_exists(g2));
}

BOOST_AUTO_TEST_CASE(orphans_are_reaped) {
  listening_init init;
  auto c = init.attach();
  // The daemon leaves the command's group and outlives it; ferry-init (subreaper here, PID 1 in a
  // sandbox) reaps it when it exits.
  auto s = run_to_end(*c, shell_run(1, "setsid sh -c 'sleep 0.5' >/dev/null 2>&1 < /dev/null & echo $!"));
  const std::string orphan = s.out[0].substr(0, s.out[0].size() - 1);
  std::this_thread::sleep_for(1s);
  (void)run_to_end(*c, argv_run(2, {"true"}));  // a SIGCHLD round trip later
  BOOST_TEST(read_proc_file("/proc/" + orphan + "/stat").empty(), "pid " << orphan << " is still there (a zombie?)");
}

// --- the HTTP forwarder (fake_egress_proxy.h stands for the egress proxy) ----------------------------

BOOST_AUTO_TEST_CASE(the_http_forwarder_relays_to_the_egress_socket_and_commands_find_it) {
  testing::temp_dir sock_dir;
  fake_egress_proxy proxy(sock_dir.path() / "egress.sock");
  const uint16_t port = free_tcp_port();
  listening_init init({}, {"--proxy-socket", (sock_dir.path() / "egress.sock").string(), "--proxy-port", std::to_string(port)});
  auto c = init.attach();
  auto env = run_to_end(*c, shell_run(1, "env | grep -i -E '^(https?|no)_proxy=' | LC_ALL=C sort"));
  const std::string url = fmt::format("http://127.0.0.1:{}", port);
  BOOST_TEST(env.out[0] == fmt::format("HTTPS_PROXY={0}\nHTTP_PROXY={0}\nNO_PROXY=localhost,127.0.0.1\nhttp_proxy={0}\n"
                                       "https_proxy={0}\nno_proxy=localhost,127.0.0.1\n", url));
  auto curl = run_to_end(*c, argv_run(2, {"curl", "-sS", "--max-time", "10", "http://example.invalid/path?q=1"}));
  BOOST_TEST(curl.out[0] == "hello from the egress proxy\n", curl.out[1]);
  BOOST_TEST(curl.exited->exit_code == 0);
  BOOST_TEST(proxy.last_request().rfind("GET http://example.invalid/path?q=1 HTTP/1.1\r\n", 0) == 0u, proxy.last_request());
}

BOOST_AUTO_TEST_CASE(the_http_forwarder_bounds_its_connections) {
  testing::temp_dir sock_dir;
  fake_egress_proxy proxy(sock_dir.path() / "egress.sock", 600ms);  // each answer takes a while
  const uint16_t port = free_tcp_port();
  listening_init init({}, {"--proxy-socket", (sock_dir.path() / "egress.sock").string(), "--proxy-port", std::to_string(port)});
  // 80 clients at once (from the test: on a host the forwarder listens on the host's loopback).
  std::vector<std::thread> clients;
  std::atomic<int> ok{0};
  for (int i = 0; i < 80; ++i) {
    clients.emplace_back([&] {
      int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(port);
      if (::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
        const std::string req = "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n";
        ::send(s, req.data(), req.size(), MSG_NOSIGNAL);
        std::string resp;
        char buf[4096];
        ssize_t n;
        while ((n = ::recv(s, buf, sizeof buf, 0)) > 0)
          resp.append(buf, static_cast<size_t>(n));
        if (resp.find("hello from the egress proxy") != std::string::npos)
          ++ok;
      }
      ::close(s);
    });
  }
  for (auto& t : clients)
    t.join();
  BOOST_TEST(ok == 80);  // the ones over the bound waited, none was lost
  BOOST_TEST(proxy.accepted() == 80);
  BOOST_TEST(proxy.max_concurrent() <= 64, proxy.max_concurrent());
  BOOST_TEST(proxy.max_concurrent() > 1);
}

BOOST_AUTO_TEST_CASE(without_the_egress_socket_a_proxied_request_fails_fast) {
  testing::temp_dir sock_dir;
  const uint16_t port = free_tcp_port();
  listening_init init({}, {"--proxy-socket", (sock_dir.path() / "absent.sock").string(), "--proxy-port", std::to_string(port)});
  auto c = init.attach();
  auto curl = run_to_end(*c, argv_run(1, {"curl", "-sS", "--max-time", "10", "http://example.invalid/"}));
  BOOST_TEST(curl.exited->exit_code != 0);
  BOOST_TEST(curl.exited->duration_ms < 5000u);
  BOOST_TEST(init.diagnostics().find("HTTP forwarder: cannot connect") != std::string::npos, init.diagnostics());
}

// --- hostile hosts --------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(hostile_frames_from_the_host_get_an_error_and_never_a_crash) {
  // Valid frames to start from: everything a host may send, and what only ferry-init sends.
  std::vector<std::string> seeds{
      raw_attach_frame(),  // proves nothing: refused
      raw_attach_frame({{1, 0, 0}, {2, 5, 5, true}}, ferry::wire::socket_protocol, std::string(32, 'n'), std::string(32, 'm')),
      run_frame(shell_run(1, "echo hi")),
      run_frame([] {
        run_request r = argv_run(2, {"true"});
        r.env = {"A=1"};
        r.pty = true;
        r.stdin_data = "x";
        return r;
      }()),
      signal_frame(1, SIGTERM),
      stdin_frame(1, "data", true),
      release_frame(),
  };
  {
    flatbuffers::FlatBufferBuilder fbb;
    seeds.push_back(frame(fbb, v1::Message::Output,
                          v1::CreateOutput(fbb, 1, 0, fbb.CreateVector(std::vector<uint8_t>(100, 'x')), 0)));
  }
  {
    flatbuffers::FlatBufferBuilder fbb;
    seeds.push_back(frame(fbb, v1::Message::Exited, v1::CreateExited(fbb, 1, 0, 0, 5)));
  }
  std::mt19937 rng(5150);
  auto mutate = [&](std::string f) {
    switch (rng() % 6) {
      case 0:  // random bytes
        f.assign(1 + rng() % 300, '\0');
        for (auto& ch : f)
          ch = static_cast<char>(rng());
        return rng() % 2 ? le32(static_cast<uint32_t>(f.size())) + f : f;
      case 1:  // truncated
        return f.substr(0, rng() % f.size());
      case 2:  // an absurd length
        return le32(static_cast<uint32_t>((1u << 20) + 1 + rng() % 1000)) + f.substr(4);
      case 3:  // flipped bytes in the body
        for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k)
          f[4 + rng() % (f.size() - 4)] ^= static_cast<char>(1 + rng() % 255);
        return f;
      case 4:  // the length says less than follows
        return le32(static_cast<uint32_t>(std::max<size_t>(1, f.size() - 4 - rng() % 8))) + f.substr(4);
      default:  // as is (valid, maybe the wrong direction or the wrong time)
        return f;
    }
  };
  int errors = 0, rounds = 0, restarts = 0;
  auto init = std::make_unique<listening_init>(std::vector<std::string>{}, std::vector<std::string>{"--linger-ms", "60000"});
  for (int i = 0; i < 400; ++i, ++rounds) {
    if (auto st = init->proc->try_wait()) {
      // Only a Release that got through ends it, and then cleanly.
      BOOST_REQUIRE_MESSAGE(st->ok(), "round " << i << ": ferry-init ended with " << st->exit_code << "/" << st->signal
                                                << "; its log: " << init->diagnostics());
      init = std::make_unique<listening_init>(std::vector<std::string>{}, std::vector<std::string>{"--linger-ms", "60000"});
      ++restarts;
    }
    auto c = init->try_connect();
    auto hello = c ? c->next(10s, true) : std::nullopt;
    if (!hello && init->proc->wait_for(5s))
      continue;  // the previous round's Release was still being carried out
    BOOST_REQUIRE_MESSAGE(hello, "round " << i << ": no Hello");
    BOOST_REQUIRE((hello->type == v1::Message::Hello));
    // Half the rounds attach properly first, so later frames meet an attached ferry-init.
    if (i % 2 == 0) {
      c->send(c->attach_frame());
      BOOST_REQUIRE(c->until([&] { return !c->events.empty() && c->events.back().type == v1::Message::Attached; }));
    }
    for (int k = 0; k < 3; ++k) {
      if (!c->try_send(mutate(seeds[rng() % seeds.size()])))
        break;
    }
    // Whatever happens: an Error and a close, or ferry-init goes on. Never a crash.
    while (auto e = c->next(200ms, true)) {
      if (e->type == v1::Message::Error)
        ++errors;
    }
  }
  BOOST_TEST(errors > 100);
  BOOST_TEST_MESSAGE(fmt::format("{} rounds, {} Error answers, {} clean exits after a Release", rounds, errors, restarts));
  // Still serving a good host.
  if (!init->proc->try_wait()) {
    std::this_thread::sleep_for(300ms);  // a connection of the last round may still hold it
    auto c = init->attach();
    c->send(signal_frame(0, SIGKILL));  // what the fuzz may have started
    auto s = run_to_end(*c, shell_run(77777, "echo alive"));
    BOOST_TEST(s.out[0] == "alive\n");
  }
}

BOOST_AUTO_TEST_CASE(oversized_requests_are_refused) {
  listening_init init;
  {
    // An Attach naming more commands than allowed.
    std::vector<resume_entry> many;
    for (uint32_t i = 1; i <= 5000; ++i)
      many.push_back({i, 0, 0});
    auto c = init.connect();
    BOOST_REQUIRE(c->next());
    c->send(c->attach_frame(many));
    auto e = c->next();
    BOOST_REQUIRE(e);
    BOOST_TEST((e->type == v1::Message::Error));
    BOOST_TEST(e->data.find("5000 commands") != std::string::npos, e->data);
  }
  auto c = init.attach();
  // 9000 environment entries (567 KB) in one (valid, < 1 MiB) frame: refused as too large, not a crash.
  run_request r = argv_run(1, {"true"});
  for (int i = 0; i < 9000; ++i)
    r.env.push_back("K=" + std::string(60, 'v'));
  c->send(run_frame(r));
  BOOST_REQUIRE(c->until([&] { return c->story(1).error.has_value(); }));
  BOOST_TEST((c->story(1).error->code == v1::CommandErrorCode::BadRequest));
  // A signal number out of range is a protocol error.
  c->send(signal_frame(1, 1000));
  BOOST_REQUIRE(c->until([&] { return c->events.back().type == v1::Message::Error; }));
  BOOST_TEST(c->events.back().data.find("signal number 1000") != std::string::npos);
  // Too much stdin waiting for a command that does not read.
  auto d = init.attach();
  run_request sleeper = argv_run(2, {"sleep", "30"});
  sleeper.stdin_close = false;
  d->send(run_frame(sleeper));
  BOOST_REQUIRE(d->until([&] { return d->story(2).started.has_value(); }));
  const std::string chunk(900u << 10, 'x');
  for (int i = 0; i < 20 && d->try_send(stdin_frame(2, chunk, false)); ++i) {
  }
  BOOST_REQUIRE(d->until([&] { return !d->events.empty() && d->events.back().type == v1::Message::Error; }));
  BOOST_TEST(d->events.back().data.find("bytes of stdin wait for command 2") != std::string::npos);
}
