// Sandbox limits through ferryd: a task whose command outgrows --sandbox-memory fails, and its
// timeline says why — a limit_reached event naming the memory limit, before the sandbox's end —
// instead of a bare exit; a task that fills its disk (--sandbox-disk) gets ENOSPC and a
// limit_reached disk_quota; and a --sandbox-memory or --sandbox-disk that is not a size stops
// ferryd at start-up.

#define BOOST_TEST_MODULE limits_test
#include <boost/test/unit_test.hpp>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;

BOOST_AUTO_TEST_CASE(a_task_over_its_sandbox_memory_fails_and_its_timeline_names_the_limit) {
  temp_dir dir("ferry-limits");
  ferryd_options opts(FERRYD_BINARY, dir.path() / "data");
  opts.extra_args = {"--sandbox-memory", "256MiB"};
  ferryd_process ferryd(opts);
  api_client api(ferryd);

  // 1 GiB written byte by byte.
  const std::string id = submit_task(api, "python3 -c \"b = b'x' * (1 << 30); print(len(b))\"");
  sandbox_sweeper sweeper(id);
  std::string last;
  auto ended =
    api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 120s, &last);
  BOOST_TEST_REQUIRE(ended.has_value(), "the task did not end; last: " << last);
  BOOST_TEST_MESSAGE("task: " << ended->dump());
  BOOST_TEST(str(*ended, "status") == "failed");
  const json limits = field(*ended, "limits_reached");
  BOOST_TEST_REQUIRE(limits.size() >= 1u, ended->dump());
  BOOST_TEST(str(limits[0], "kind") == "memory");
  BOOST_TEST(limits[0]["detail"].get<std::string>().find("memory limit reached (256 MiB)") !=
               std::string::npos,
             limits[0].dump());
  const json sandbox = field(*ended, "sandbox");
  if (str(sandbox, "backend") == "runsc") {
    // gVisor: the whole sandbox ends at the limit, and says which one.
    BOOST_TEST(limits[0]["whole_sandbox"] == true);
    BOOST_TEST(str(sandbox, "reason").find("memory limit reached (256 MiB)") == 0u,
               str(sandbox, "reason"));
  }
  // In the stream: limit_reached comes before the sandbox's terminal state.
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
  const ws_transcript t = read_until_close(ws, 60s);
  size_t limit_at = 0, end_at = 0;
  for (size_t i = 0; i < t.events.size(); ++i) {
    const json& e = t.events[i];
    if (str(e, "type") == "limit_reached" && !limit_at)
      limit_at = i + 1;
    if (str(e, "type") == "sandbox_state_changed") {
      const std::string to = str(data_of(e), "to");
      if ((to == "terminated" || to == "failed") && !end_at)
        end_at = i + 1;
    }
  }
  BOOST_TEST_CONTEXT("events:" << describe_events(t.events)) {
    BOOST_TEST(limit_at > 0u);
    BOOST_TEST(end_at > 0u);
    BOOST_TEST(limit_at < end_at);
  }
  BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 10s),
             "sandbox processes left: " << describe(sandbox_processes(id)));
}

// The disk quota: a command that fills the sandbox's disk gets ENOSPC, the task's timeline
// names the limit with the command, and the host paid no more than the quota.
BOOST_AUTO_TEST_CASE(a_task_that_fills_its_sandbox_disk_gets_enospc_and_its_timeline_names_the_quota) {
  temp_dir dir("ferry-limits-disk");
  ferryd_options opts(FERRYD_BINARY, dir.path() / "data");
  opts.extra_args = {"--sandbox-disk", "32MiB"};
  ferryd_process ferryd(opts);
  api_client api(ferryd);

  const std::string id = submit_task(api, "dd if=/dev/zero of=/workspace/big bs=1M count=100; echo rc=$?");
  sandbox_sweeper sweeper(id);
  std::string last;
  auto ended =
    api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 120s, &last);
  BOOST_TEST_REQUIRE(ended.has_value(), "the task did not end; last: " << last);
  BOOST_TEST_MESSAGE("task: " << ended->dump());
  const json limits = field(*ended, "limits_reached");
  BOOST_TEST_REQUIRE(limits.size() == 1u, ended->dump());
  BOOST_TEST(str(limits[0], "kind") == "disk_quota");
  BOOST_TEST(limits[0]["detail"].get<std::string>().find("disk quota reached (32 MiB)") != std::string::npos,
             limits[0].dump());
  BOOST_TEST(limits[0]["whole_sandbox"] == false);
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
  const ws_transcript t = read_until_close(ws, 60s);
  std::string output;
  for (const json& e : t.events)
    if (str(e, "type") == "output_chunk")
      output += str(data_of(e), "text");
  BOOST_TEST(output.find("No space left on device") != std::string::npos, output);
  BOOST_TEST(output.find("rc=1") != std::string::npos, output);
  BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 10s),
             "sandbox processes left: " << describe(sandbox_processes(id)));
}

BOOST_AUTO_TEST_CASE(a_sandbox_size_that_is_not_a_size_stops_ferryd_with_a_clear_message) {
  temp_dir dir("ferry-limits-flag");
  for (const std::string flag : {"--sandbox-memory", "--sandbox-disk"}) {
    for (const std::string bad : {"lots", "-1", "4 giga", "1.5GiB", "1MiB"}) {
      BOOST_TEST_CONTEXT(flag << " '" << bad << "'") {
        program_run run = run_program({FERRYD_BINARY, "--data-dir", (dir.path() / "d").string(),
                                       "--listen", "127.0.0.1:0", flag, bad},
                                      30s);
        BOOST_TEST(!run.timed_out, "ferryd started instead of refusing the flag");
        BOOST_TEST(!run.status.ok(), run.summary());
        BOOST_TEST(run.err.find(flag) != std::string::npos, run.err);
      }
    }
  }
}
