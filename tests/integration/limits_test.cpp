// Sandbox limits through ferryd: a task whose command outgrows --sandbox-memory fails, and its
// timeline says why — a limit_reached event naming the memory limit, before the sandbox's end —
// instead of a bare exit; and a --sandbox-memory that is not a size stops ferryd at start-up.

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

BOOST_AUTO_TEST_CASE(a_sandbox_memory_that_is_not_a_size_stops_ferryd_with_a_clear_message) {
  temp_dir dir("ferry-limits-flag");
  for (const std::string bad : {"lots", "-1", "4 giga", "1.5GiB", "1MiB"}) {
    BOOST_TEST_CONTEXT("--sandbox-memory '" << bad << "'") {
      program_run run = run_program({FERRYD_BINARY, "--data-dir", (dir.path() / "d").string(),
                                     "--listen", "127.0.0.1:0", "--sandbox-memory", bad},
                                    30s);
      BOOST_TEST(!run.timed_out, "ferryd started instead of refusing the flag");
      BOOST_TEST(!run.status.ok(), run.summary());
      BOOST_TEST(run.err.find("--sandbox-memory") != std::string::npos, run.err);
    }
  }
}
