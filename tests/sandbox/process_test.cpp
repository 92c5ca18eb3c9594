#define BOOST_TEST_MODULE sandbox_process
#include <boost/test/unit_test.hpp>

#include <signal.h>
#include <unistd.h>

#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"
#include "test_support.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
using ferry::sandbox::testing::read_line;
using ferry::sandbox::testing::read_until_eof;

namespace {

child_process spawn_ok(spawn_options o) {
  auto c = child_process::spawn(o);
  BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
  return std::move(*c);
}

spawn_options shell(std::string script) {
  spawn_options o;
  o.argv = {"/bin/sh", "-c", std::move(script)};
  return o;
}

bool process_exists(pid_t pid) { return ::kill(pid, 0) == 0; }

/// True once `pid` is gone or a zombie (someone else's child: we cannot reap it).
bool eventually_gone(pid_t pid) {
  for (int i = 0; i < 200; ++i) {
    std::string stat = testing::read_proc_file("/proc/" + std::to_string(pid) + "/stat");
    auto paren = stat.rfind(") ");
    if (stat.empty() || (paren != std::string::npos && stat[paren + 2] == 'Z'))
      return true;
    std::this_thread::sleep_for(10ms);
  }
  return false;
}

}  // namespace

BOOST_AUTO_TEST_CASE(stdout_and_stderr_pipes_carry_the_childs_output) {
  auto o = shell("echo hello; echo oops >&2");
  o.out = stdio::pipe;
  o.err = stdio::pipe;
  auto c = spawn_ok(o);
  BOOST_TEST(c.stdin_fd() == -1);  // stdio::null by default: no pipe
  BOOST_TEST(read_all(c.stdout_fd()) == "hello\n");
  BOOST_TEST(read_all(c.stderr_fd()) == "oops\n");
  BOOST_TEST(c.wait().ok());
}

BOOST_AUTO_TEST_CASE(stdin_pipe_reaches_the_child_and_close_gives_eof) {
  spawn_options o;
  o.argv = {"cat"};  // looked up in PATH
  o.in = stdio::pipe;
  o.out = stdio::pipe;
  auto c = spawn_ok(o);
  BOOST_REQUIRE(::write(c.stdin_fd(), "ping", 4) == 4);
  c.close_stdin();
  BOOST_TEST(read_all(c.stdout_fd()) == "ping");
  BOOST_TEST(c.wait().ok());
}

BOOST_AUTO_TEST_CASE(env_and_cwd_are_applied) {
  auto o = shell("echo \"$FERRY_X\"; pwd; echo \"${HOME:-unset}\"");
  o.env = std::vector<std::string>{"FERRY_X=42"};
  o.cwd = "/usr";
  o.out = stdio::pipe;
  auto c = spawn_ok(o);
  BOOST_TEST(read_all(c.stdout_fd()) == "42\n/usr\nunset\n");
  BOOST_TEST(c.wait().ok());
}

BOOST_AUTO_TEST_CASE(exit_code_is_reported) {
  auto c = spawn_ok(shell("exit 7"));
  auto s = c.wait();
  BOOST_TEST(s.exit_code == 7);
  BOOST_TEST(s.signal == 0);
  BOOST_TEST(!s.ok());
  // Waiting again returns the same status, without touching the (reaped) pid.
  BOOST_TEST(c.wait().exit_code == 7);
}

BOOST_AUTO_TEST_CASE(death_by_signal_is_reported) {
  auto c = spawn_ok(shell("kill -TERM $$; sleep 5"));
  auto s = c.wait();
  BOOST_TEST(s.signal == SIGTERM);
  BOOST_TEST(s.exit_code == -1);
  BOOST_TEST(!s.ok());
}

BOOST_AUTO_TEST_CASE(child_does_not_inherit_ignored_sigpipe_or_parent_fds) {
  // The test process ignores SIGPIPE; the child must still die of it.
  auto old = ::signal(SIGPIPE, SIG_IGN);
  int leaked[2];
  BOOST_REQUIRE(::pipe(leaked) == 0);  // deliberately without O_CLOEXEC
  auto o = shell(fmt::format(
      "for fd in {} {}; do [ -e /proc/$$/fd/$fd ] && echo leaked $fd; done; echo checked; yes | true",
      leaked[0], leaked[1]));
  o.out = stdio::pipe;
  auto c = spawn_ok(o);
  std::string fds = read_all(c.stdout_fd());
  auto s = c.wait();
  ::close(leaked[0]);
  ::close(leaked[1]);
  ::signal(SIGPIPE, old);
  BOOST_TEST(fds == "checked\n");
  BOOST_TEST(s.ok());  // `yes` died of SIGPIPE, the pipeline's status is `true`'s
}

BOOST_AUTO_TEST_CASE(signal_group_kills_grandchildren) {
  // The grandchild (`sleep`) holds the stdout pipe: EOF proves it died too.
  auto o = shell("sleep 100 & echo $!; wait");
  o.out = stdio::pipe;
  auto c = spawn_ok(o);
  auto grandchild = read_line(c.stdout_fd(), 5s);
  BOOST_REQUIRE(grandchild);
  c.signal_group(SIGKILL);
  BOOST_TEST(read_until_eof(c.stdout_fd(), 5s).has_value());
  BOOST_TEST(c.wait().signal == SIGKILL);
}

BOOST_AUTO_TEST_CASE(without_a_group_only_the_child_is_signalled) {
  // Counter-check for the test above: it would fail if the group were not used.
  auto o = shell("sleep 100 & echo $!; wait");
  o.out = stdio::pipe;
  o.new_process_group = false;
  auto c = spawn_ok(o);
  auto grandchild = read_line(c.stdout_fd(), 5s);
  BOOST_REQUIRE(grandchild);
  c.signal_group(SIGKILL);
  BOOST_TEST(c.wait().signal == SIGKILL);
  BOOST_TEST(!read_until_eof(c.stdout_fd(), 300ms).has_value());  // sleep still holds the pipe
  ::kill(std::stoi(*grandchild), SIGKILL);
  BOOST_TEST(read_until_eof(c.stdout_fd(), 5s).has_value());
}

BOOST_AUTO_TEST_CASE(destructor_kills_the_group_and_reaps) {
  pid_t pid;
  {
    auto c = spawn_ok(shell("sleep 100"));
    pid = c.pid();
    BOOST_TEST(process_exists(pid));
  }
  BOOST_TEST(!process_exists(pid));  // killed and reaped: not even a zombie
}

BOOST_AUTO_TEST_CASE(moved_child_is_owned_once) {
  auto a = spawn_ok(shell("exit 3"));
  pid_t pid = a.pid();
  child_process b = std::move(a);
  BOOST_TEST(a.pid() == -1);
  BOOST_TEST(b.pid() == pid);
  BOOST_TEST(b.wait().exit_code == 3);
}

BOOST_AUTO_TEST_CASE(wait_for_times_out_while_the_child_runs) {
  auto c = spawn_ok(shell("sleep 10"));
  auto t0 = std::chrono::steady_clock::now();
  BOOST_TEST(!c.wait_for(150ms).has_value());
  auto waited = std::chrono::steady_clock::now() - t0;
  BOOST_TEST((waited >= 150ms), "waited " << std::chrono::duration_cast<std::chrono::milliseconds>(waited).count() << " ms");
  BOOST_TEST((waited < 2s));
  BOOST_TEST(!c.try_wait().has_value());
  auto s = c.terminate(2s);
  BOOST_TEST(s.signal == SIGTERM);
}

BOOST_AUTO_TEST_CASE(wait_for_returns_as_soon_as_the_child_exits) {
  auto c = spawn_ok(shell("sleep 0.1; exit 4"));
  auto t0 = std::chrono::steady_clock::now();
  auto s = c.wait_for(10s);
  BOOST_REQUIRE(s.has_value());
  BOOST_TEST(s->exit_code == 4);
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 2s));
}

BOOST_AUTO_TEST_CASE(terminate_escalates_to_sigkill) {
  auto o = shell("trap '' TERM; echo ready; while :; do sleep 0.05; done");
  o.out = stdio::pipe;
  auto c = spawn_ok(o);
  BOOST_REQUIRE(read_line(c.stdout_fd(), 5s));
  auto s = c.terminate(200ms);
  BOOST_TEST(s.signal == SIGKILL);
}

BOOST_AUTO_TEST_CASE(signal_group_is_safe_while_another_thread_waits) {
  auto c = spawn_ok(shell("sleep 100"));
  std::thread killer([&] {
    std::this_thread::sleep_for(50ms);
    for (int i = 0; i < 100; ++i)
      c.signal_group(SIGKILL);  // racing with wait(): never hits a reaped pid
  });
  auto s = c.wait();
  killer.join();
  BOOST_TEST(s.signal == SIGKILL);
}

BOOST_AUTO_TEST_CASE(spawning_a_missing_program_is_an_error_not_a_crash) {
  spawn_options o;
  o.argv = {"/nonexistent/ferry-no-such-program"};
  auto c = child_process::spawn(o);
  BOOST_REQUIRE(!c.ok());
  BOOST_TEST(c.error().message.find("ferry-no-such-program") != std::string::npos);
  BOOST_TEST(c.error().message.find("No such file") != std::string::npos);

  o.argv = {"ferry-no-such-program-in-path"};
  BOOST_TEST(!child_process::spawn(o).ok());

  o.argv = {"/bin/true"};
  o.cwd = "/nonexistent-dir";
  auto d = child_process::spawn(o);
  BOOST_REQUIRE(!d.ok());
  BOOST_TEST(d.error().message.find("/nonexistent-dir") != std::string::npos);

  o.argv.clear();
  BOOST_TEST(!child_process::spawn(o).ok());
}

BOOST_AUTO_TEST_CASE(run_command_captures_combined_output_and_status) {
  auto r = run_command({"/bin/sh", "-c", "echo out; echo err >&2; echo out2; exit 3"}, 5s);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->output == "out\nerr\nout2\n");  // one pipe: the order is preserved
  BOOST_TEST(r->status.exit_code == 3);
}

BOOST_AUTO_TEST_CASE(run_command_kills_a_command_that_overruns) {
  auto t0 = std::chrono::steady_clock::now();
  auto r = run_command({"/bin/sh", "-c", "echo started; sleep 30 & sleep 30"}, 300ms);
  auto took = std::chrono::steady_clock::now() - t0;
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("did not finish within 300 ms") != std::string::npos);
  BOOST_TEST(r.error().message.find("started") != std::string::npos);
  BOOST_TEST((took >= 300ms));
  BOOST_TEST((took < 3s));
}

BOOST_AUTO_TEST_CASE(run_command_neither_waits_for_nor_leaves_a_grandchild) {
  // The shell exits at once, leaving a grandchild that holds the output pipe.
  auto t0 = std::chrono::steady_clock::now();
  auto r = run_command({"/bin/sh", "-c", "sleep 30 & echo $!; exit 0"}, 10s);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->status.ok());
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 3s));
  pid_t grandchild = std::stoi(r->output);
  BOOST_TEST(eventually_gone(grandchild));
}

BOOST_AUTO_TEST_CASE(run_command_of_a_missing_program_is_an_error) {
  auto r = run_command({"ferry-no-such-program-in-path"}, 1s);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("ferry-no-such-program-in-path") != std::string::npos);
}
