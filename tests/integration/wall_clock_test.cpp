// The task wall-clock limit through ferryd: the limit in force is recorded with the task, so a
// ferryd SIGKILLed while the task runs, restarted with a different default, still ends the task
// at its original deadline (not a fresh full limit from the restart); and a --task-wall-clock
// that is not a duration stops ferryd at start-up with a message that says what is expected; a
// task's own limit (POST "wall_clock_limit_s") replaces the default and bad ones are refused.

#define BOOST_TEST_MODULE wall_clock_test
#include <boost/test/unit_test.hpp>

#include <thread>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;

BOOST_AUTO_TEST_CASE(after_a_sigkill_the_recovered_task_still_ends_at_its_original_deadline) {
  temp_dir dir("ferry-wall-clock");
  const auto data_dir = dir.path() / "data";
  constexpr int64_t limit_s = 20;
  ferryd_options opts(FERRYD_BINARY, data_dir);
  opts.extra_args = {"--task-wall-clock", std::to_string(limit_s) + "s"};
  std::optional<ferryd_process> first(std::in_place, opts);
  const std::string token = first->token();
  api_client api1(*first);

  const std::string id = submit_task(api1, "sleep 600");
  sandbox_sweeper sweeper(id);
  std::string last;
  auto running = api1.wait_for_task(
    id, [](const json& t) { return sandbox_status(t) == "executing"; }, 60s, &last);
  BOOST_TEST_REQUIRE(running.has_value(), "the task did not start; last: " << last);
  BOOST_TEST(field(*running, "wall_clock_limit_ms") == limit_s * 1000);
  const int64_t since_ns = field(*running, "running_since_ns").get<int64_t>();
  BOOST_TEST_REQUIRE(since_ns > 0);

  // Half the limit passes, then ferryd dies; the sandbox outlives it.
  std::this_thread::sleep_until(std::chrono::system_clock::time_point(
    std::chrono::duration_cast<std::chrono::system_clock::duration>(
      std::chrono::nanoseconds(since_ns + limit_s / 2 * 1'000'000'000))));
  first->crash();
  // Restarted with the default limit (4h): the task keeps the limit recorded at its submission.
  ferryd_process second(ferryd_options(FERRYD_BINARY, data_dir, token));
  api_client api(second);
  auto ended =
    api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 60s, &last);
  BOOST_TEST_REQUIRE(ended.has_value(), "the recovered task did not end; last: " << last);
  BOOST_TEST_CONTEXT("task: " << ended->dump()) {
    BOOST_TEST(str(*ended, "status") == "failed");
    BOOST_TEST(str(*ended, "reason") == "wall-clock limit of 20s reached");
    BOOST_TEST(field(*ended, "wall_clock_limit_ms") == limit_s * 1000);
    BOOST_TEST(field(*ended, "running_since_ns").get<int64_t>() == since_ns);
    const json limits = field(*ended, "limits_reached");
    BOOST_TEST_REQUIRE(limits.size() == 1u);
    BOOST_TEST(str(limits[0], "kind") == "task_wall_clock");
    BOOST_TEST(limits[0]["whole_sandbox"] == true);
    const double at_s = static_cast<double>(limits[0]["time_ns"].get<int64_t>() - since_ns) / 1e9;
    BOOST_TEST_MESSAGE("limit reached " << at_s << " s after the task began to run");
    // At the original deadline: not before it, and well before a fresh limit from the restart
    // (which would be at least limit_s / 2 + limit_s = 30 s).
    BOOST_TEST(at_s >= static_cast<double>(limit_s));
    BOOST_TEST(at_s < static_cast<double>(limit_s) + 7.0);
  }
  BOOST_TEST(sandbox_status(*ended) == "terminated");
  BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 10s),
             "sandbox processes left: " << describe(sandbox_processes(id)));
}

BOOST_AUTO_TEST_CASE(a_task_submitted_with_its_own_wall_clock_limit_ends_at_it) {
  temp_dir dir("ferry-wall-clock-req");
  ferryd_process ferryd(ferryd_options(FERRYD_BINARY, dir.path() / "data"));
  api_client api(ferryd);
  for (const char* bad : {R"({"command": "true", "wall_clock_limit_s": 0})",
                          R"({"command": "true", "wall_clock_limit_s": 1.5})",
                          R"({"command": "true", "wall_clock_limit_s": "60"})",
                          R"({"command": "true", "wall_clock_limit_s": 604801})"}) {
    const std::string message = expect_json_error(api.authorized("POST", "/api/v1/tasks", bad), 400, bad);
    BOOST_TEST(message.find("wall_clock_limit_s") != std::string::npos, message);
  }
  http_response r = api.authorized("POST", "/api/v1/tasks", R"({"command": "sleep 600", "wall_clock_limit_s": 3})");
  BOOST_TEST_REQUIRE(r.status == 201, r.summary());
  const std::string id = str(*r.json(), "id");
  sandbox_sweeper sweeper(id);
  std::string last;
  auto ended = api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 60s, &last);
  BOOST_TEST_REQUIRE(ended.has_value(), "the task did not end; last: " << last);
  BOOST_TEST_CONTEXT("task: " << ended->dump()) {
    BOOST_TEST(field(*ended, "wall_clock_limit_ms") == 3000);
    BOOST_TEST(str(*ended, "status") == "failed");
    BOOST_TEST(str(*ended, "reason") == "wall-clock limit of 3s reached");
  }
  BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 10s),
             "sandbox processes left: " << describe(sandbox_processes(id)));
}

BOOST_AUTO_TEST_CASE(a_task_wall_clock_that_is_not_a_duration_stops_ferryd_with_a_clear_message) {
  temp_dir dir("ferry-wall-clock-flag");
  for (const std::string bad : {"15x", "900", "1.5h", "-5s", "4 hours", ""}) {
    BOOST_TEST_CONTEXT("--task-wall-clock '" << bad << "'") {
      program_run run = run_program({FERRYD_BINARY, "--data-dir", (dir.path() / "d").string(),
                                     "--listen", "127.0.0.1:0", "--task-wall-clock", bad},
                                    30s);
      BOOST_TEST(run.spawn_error.empty());
      BOOST_TEST(!run.timed_out, "ferryd started instead of refusing the flag");
      BOOST_TEST(!run.status.ok(), run.summary());
      BOOST_TEST(run.err.find("--task-wall-clock") != std::string::npos, run.err);
      if (!bad.empty())
        BOOST_TEST(run.err.find("e.g. 30s, 15m or 4h") != std::string::npos, run.err);
    }
  }
  program_run tiny = run_program({FERRYD_BINARY, "--data-dir", (dir.path() / "d").string(),
                                  "--listen", "127.0.0.1:0", "--task-wall-clock", "500ms"},
                                 30s);
  BOOST_TEST(!tiny.timed_out);
  BOOST_TEST(!tiny.status.ok(), tiny.summary());
  BOOST_TEST(tiny.err.find("--task-wall-clock must be at least 1s") != std::string::npos,
             tiny.err);
}
