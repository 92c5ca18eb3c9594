// Ending tasks early: an abort kills the sandbox's processes and ends the task aborted within a
// second; aborts of ended or unknown tasks are refused; a ferryd shutdown kills running
// sandboxes, and after a restart their tasks read as aborted.

#define BOOST_TEST_MODULE abort_test
#include <boost/test/unit_test.hpp>

#include <optional>
#include <thread>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;
using steady = std::chrono::steady_clock;

namespace {

const std::string long_command = "sleep 600";

struct running_ferryd {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};
};

/// Waits (bounded) until the task and its sandbox both say running, and until its sandbox
/// processes are visible on the host: without them the "none left" checks could not fail.
void wait_until_sandbox_runs(const api_client& api, const std::string& id) {
  const auto t0 = steady::now();
  std::string last;
  auto task = api.wait_for_task(
      id,
      [](const json& t) { return str(t, "status") == "running" && sandbox_status(t) == "executing"; },
      60s, &last);
  BOOST_TEST_REQUIRE(task.has_value(),
                     "task " << id << " and its sandbox were not both running within 60 s; last "
                                  "answer: "
                             << last);
  BOOST_TEST_MESSAGE("task " << id << " running after " << ms_since(t0) << " ms");
  const bool visible = eventually([&] { return !sandbox_processes(id).empty(); }, 5s);
  BOOST_TEST_REQUIRE(visible, "no host process has ferry-" << id
                                                           << " in its command line although the "
                                                              "sandbox is running");
  BOOST_TEST_MESSAGE("sandbox processes: " << describe(sandbox_processes(id)));
}

bool is_aborted(const json& task) { return str(task, "status") == "aborted"; }

}  // namespace

BOOST_FIXTURE_TEST_CASE(abort_kills_the_sandbox_and_ends_the_task_aborted_within_one_second,
                        running_ferryd) {
  const std::string id = submit_task(api, long_command);
  sandbox_sweeper sweeper(id);
  wait_until_sandbox_runs(api, id);

  const auto t0 = steady::now();
  http_response r = api.abort(id);
  const double call_ms = ms_since(t0);
  BOOST_TEST_REQUIRE((r.status == 200 || r.status == 202), "abort: " << r.summary());
  bool answer_says_aborted = false;
  if (r.status == 200) {
    auto j = r.json();
    answer_says_aborted = j && is_aborted(*j);
    BOOST_TEST(answer_says_aborted, "a 200 abort answer must show the task aborted: "
                                        << r.summary());
  }
  // 200 means "ended": the figure is the call itself. After a 202, the first GET that reads
  // aborted (polled every 20 ms) ends it.
  std::string last;
  auto ended = api.wait_for_task(id, is_aborted, 10s, &last);
  const double aborted_ms = answer_says_aborted ? call_ms : ms_since(t0);
  BOOST_TEST_MESSAGE("abort answered " << r.status << " in " << call_ms
                                       << " ms; task read aborted " << aborted_ms
                                       << " ms after the abort call");
  BOOST_TEST_REQUIRE(ended.has_value(), "task not aborted 10 s after the abort; last: " << last);
  BOOST_TEST(aborted_ms < 1000.0, "task took " << aborted_ms << " ms to read aborted");

  // Once the task reads aborted, nothing of its sandbox may be left on the host.
  auto left = sandbox_processes(id);
  BOOST_TEST(left.empty(), "sandbox processes still alive after the task read aborted: "
                               << describe(left));
  if (!left.empty()) {
    const auto t1 = steady::now();
    const bool gone = eventually([&] { return sandbox_processes(id).empty(); }, 10s);
    BOOST_TEST_MESSAGE("(they " << (gone ? "were gone " : "were still there ") << ms_since(t1)
                                << " ms later)");
  }
  const std::string sb = sandbox_status(*ended);
  BOOST_TEST((sb == "terminated" || sb == "failed"), "sandbox state after abort: " << ended->dump());

  // The story ends with abort_requested ... task_finished(aborted), then a normal close.
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events: " << hs.summary());
  ws_transcript t = read_until_close(ws, 30s);
  check_clean_stream(t, "viewer after the abort");
  check_envelopes(t.events, id, 1);
  BOOST_TEST_CONTEXT("events:" << describe_events(t.events)) {
    const int requested = find_event(t.events, "abort_requested");
    const int finished = find_event(t.events, "task_finished");
    BOOST_TEST(requested >= 0, "no abort_requested event");
    BOOST_TEST(finished == static_cast<int>(t.events.size()) - 1,
               "task_finished is missing or not last");
    BOOST_TEST((requested >= 0 && finished > requested));
    if (finished >= 0)
      BOOST_TEST(str(data_of(t.events[static_cast<size_t>(finished)]), "status") == "aborted");
    BOOST_TEST(find_event(t.events, "abort_requested", requested + 1) == -1,
               "more than one abort_requested");
    std::vector<std::string> sandbox_states = check_state_chain(t.events, "sandbox_state_changed", "none");
    BOOST_TEST((sandbox_states.back() == "terminated" || sandbox_states.back() == "failed"),
               "the sandbox's last state is " << sandbox_states.back());
  }

  // A second abort finds the task finished.
  expect_json_error(api.abort(id), 409, "second abort of an aborted task");
  BOOST_TEST(str(get_task_json(api, id), "status") == "aborted");
}

BOOST_FIXTURE_TEST_CASE(aborting_a_task_that_already_succeeded_is_a_conflict_and_changes_nothing,
                        running_ferryd) {
  const std::string id = submit_task(api, "true");
  // The stream closes after task_finished, the last event: from then on last_seq is final.
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events: " << hs.summary());
  ws_transcript t = read_until_close(ws, 60s);
  check_clean_stream(t, "viewer of `true`");
  const json before = get_task_json(api, id);
  BOOST_TEST_REQUIRE(str(before, "status") == "succeeded", "`true` did not succeed: "
                                                               << before.dump()
                                                               << describe_events(t.events));

  expect_json_error(api.abort(id), 409, "abort of a succeeded task");
  const json after = get_task_json(api, id);
  BOOST_TEST(str(after, "status") == "succeeded");
  BOOST_TEST(field(after, "last_seq") == field(before, "last_seq"),
             "the refused abort changed the task's events: " << after.dump());
}

BOOST_FIXTURE_TEST_CASE(aborting_an_unknown_task_is_not_found, running_ferryd) {
  expect_json_error(api.abort("0123456789abcdef0123456789abcdef"), 404, "abort of an unknown id");
  expect_json_error(api.abort("does-not-exist"), 404, "abort of a non-hex id");
}

BOOST_AUTO_TEST_CASE(shutdown_kills_running_sandboxes_promptly_and_a_restart_reads_their_tasks_aborted) {
  temp_dir dir("ferry-restart");
  const auto data_dir = dir.path() / "data";
  std::string id, token;
  std::optional<sandbox_sweeper> sweeper;
  {
    ferryd_process first(ferryd_options(FERRYD_BINARY, data_dir));
    BOOST_TEST_REQUIRE(first.printed_admin_token(), "the first start of a data dir prints a token");
    token = first.token();
    api_client api(first);
    id = submit_task(api, long_command);
    sweeper.emplace(id);
    wait_until_sandbox_runs(api, id);

    ferryd_stop_report stop = first.stop(20s);  // checks exit 0 and nothing left behind
    BOOST_TEST_MESSAGE("ferryd shut down with a running sandbox in " << stop.elapsed.count() << " ms");
    BOOST_TEST(stop.elapsed < 10s, "shutdown took " << stop.elapsed.count() << " ms");
    auto left = sandbox_processes(id);
    BOOST_TEST(left.empty(), "sandbox processes alive after ferryd exited: " << describe(left));
  }

  ferryd_process second(
      ferryd_options(FERRYD_BINARY, data_dir, token));
  BOOST_TEST(!second.printed_admin_token(), "a restart must not print (or mint) an admin token");
  api_client api(second);
  const json task = get_task_json(api, id);  // the old token still works, too
  BOOST_TEST(str(task, "status") == "aborted", "after restart: " << task.dump());
  BOOST_TEST(sandbox_status(task) != "executing", "after restart: " << task.dump());

  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events after restart: " << hs.summary());
  ws_transcript t = read_until_close(ws, 15s);
  check_clean_stream(t, "viewer after restart");
  check_envelopes(t.events, id, 1);
  BOOST_TEST_CONTEXT("events:" << describe_events(t.events)) {
    BOOST_TEST_REQUIRE(!t.events.empty());
    BOOST_TEST(str(t.events.back(), "type") == "task_finished");
    BOOST_TEST(str(data_of(t.events.back()), "status") == "aborted");
  }
}

BOOST_AUTO_TEST_CASE(after_a_crash_a_restart_re_attaches_the_sandbox_and_the_task_goes_on) {
  temp_dir dir("ferry-crash");
  const auto data_dir = dir.path() / "data";
  ferryd_process first(ferryd_options(FERRYD_BINARY, data_dir));
  const std::string token = first.token();
  api_client first_api(first);
  const std::string id = submit_task(first_api, long_command);
  sandbox_sweeper sweeper(id);
  wait_until_sandbox_runs(first_api, id);
  const std::string sandbox = str(field(get_task_json(first_api, id), "sandbox"), "id");

  first.crash();
  // The sandbox outlives its ferryd.
  BOOST_TEST_REQUIRE(!sandbox_processes(id).empty(), "the crash took the sandbox down");

  ferryd_process second(ferryd_options(FERRYD_BINARY, data_dir, token));
  BOOST_TEST(processes_with_cmdline_containing((data_dir / "nats").string()).size() == 1u,
             "the crashed ferryd's nats-server must be replaced, not duplicated");
  api_client api(second);
  // Recovered from its events and re-attached: still running, in the same sandbox.
  std::this_thread::sleep_for(1s);
  json task = get_task_json(api, id);
  BOOST_TEST(str(task, "status") == "running", task.dump());
  BOOST_TEST(sandbox_status(task) == "executing", task.dump());
  BOOST_TEST(str(field(task, "sandbox"), "id") == sandbox, task.dump());
  BOOST_TEST(!sandbox_processes(id).empty());
  http_response r = api.abort(id);
  BOOST_TEST((r.status == 200 || r.status == 202), "abort: " << r.summary());
  std::string last;
  auto ended = api.wait_for_task(id, is_aborted, 10s, &last);
  BOOST_TEST(ended.has_value(), "re-attached task not aborted; last: " << last);
  BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 5s),
             "sandbox processes left: " << describe(sandbox_processes(id)));
}

BOOST_AUTO_TEST_CASE(after_a_crash_that_took_the_sandbox_too_the_task_is_interrupted_and_resumable) {
  temp_dir dir("ferry-crash");
  const auto data_dir = dir.path() / "data";
  ferryd_process first(ferryd_options(FERRYD_BINARY, data_dir));
  const std::string token = first.token();
  api_client first_api(first);
  const std::string id = submit_task(first_api, long_command);
  sandbox_sweeper sweeper(id);
  wait_until_sandbox_runs(first_api, id);

  first.crash();
  // The host lost the sandbox as well (as after a reboot).
  for (const auto& p : sandbox_processes(id))
    ::kill(p.pid, SIGKILL);
  BOOST_TEST_REQUIRE(eventually([&] { return sandbox_processes(id).empty(); }, 5s));

  const auto t0 = std::chrono::steady_clock::now();
  ferryd_process second(ferryd_options(FERRYD_BINARY, data_dir, token));
  BOOST_TEST_MESSAGE("restart after the crash ready in " << ms_since(t0) << " ms");

  // Recovered from its events: the sandbox is gone, so the task ends `interrupted`, resumable.
  api_client api(second);
  std::string last;
  auto task = api.wait_for_task(
    id, [](const json& t) { return str(t, "status") == "interrupted"; }, 20s, &last);
  BOOST_TEST_REQUIRE(task.has_value(), "not interrupted 20 s after the restart; last: " << last);
  BOOST_TEST(str(*task, "reason").find("interrupted") != std::string::npos, task->dump());
  BOOST_TEST(field(*task, "resumable") == json(true), task->dump());
  BOOST_TEST(sandbox_status(*task) == "failed", task->dump());
  std::error_code ec;
  std::string left_files;
  for (const auto& e : std::filesystem::recursive_directory_iterator(data_dir / "sandboxes", ec))
    left_files += e.path().string() + " ";
  BOOST_TEST(std::filesystem::is_empty(data_dir / "sandboxes", ec),
             "the orphan's bundle and workspace are still on disk: " << left_files);

  {
    ws_client ws;
    ws_handshake hs = api.open_events(ws, id);
    BOOST_TEST_REQUIRE(hs.upgraded, "events after the crash: " << hs.summary());
    ws_transcript t = read_until_close(ws, 15s);
    check_clean_stream(t, "viewer after the crash");
    BOOST_TEST_REQUIRE(t.events.size() >= 3u);
    BOOST_TEST_CONTEXT("events:" << describe_events(t.events)) {
      BOOST_TEST(str(t.events.back(), "type") == "task_finished");
      BOOST_TEST(str(data_of(t.events.back()), "status") == "interrupted");
      const auto& why = t.events[t.events.size() - 2];
      BOOST_TEST(str(why, "type") == "task_interrupted");
      BOOST_TEST(data_of(why)["resumable"] == json(true));
      BOOST_TEST(str(data_of(why), "reason").find("sandbox is gone") != std::string::npos);
      // The recovered actor fenced the stream before it wrote anything.
      bool recovered = false;
      for (const auto& e : t.events)
        recovered = recovered || str(e, "type") == "actor_recovered";
      BOOST_TEST(recovered);
    }
  }

  // Resume: a new turn in a fresh sandbox; then it can be aborted like any running task.
  http_response r = api.authorized("POST", "/api/v1/tasks/" + id + "/resume");
  BOOST_TEST_REQUIRE(r.status == 202, "resume: " << r.summary());
  auto again = api.wait_for_task(
    id,
    [](const json& t) { return str(t, "status") == "running" && sandbox_status(t) == "executing"; },
    60s, &last);
  BOOST_TEST_REQUIRE(again.has_value(), "resumed task not running; last: " << last);
  BOOST_TEST(str(field(*again, "sandbox"), "id").find("-2") != std::string::npos,
             "a resumed task runs in a fresh sandbox: " << again->dump());
  // Resuming twice is refused while it runs.
  BOOST_TEST(api.authorized("POST", "/api/v1/tasks/" + id + "/resume").status == 409);
  BOOST_TEST(eventually([&] { return !sandbox_processes(id).empty(); }, 5s));
  r = api.abort(id);
  BOOST_TEST((r.status == 200 || r.status == 202), "abort: " << r.summary());
  auto ended = api.wait_for_task(id, is_aborted, 10s, &last);
  BOOST_TEST(ended.has_value(), "resumed task not aborted; last: " << last);
  BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 5s),
             "sandbox processes left: " << describe(sandbox_processes(id)));
}

BOOST_FIXTURE_TEST_CASE(an_abort_right_after_submission_still_stops_the_task, running_ferryd) {
  // The abort races the sandbox's start at different points: before the runtime is asked, while
  // runsc starts, just after ferry-init said hello. Every time the task must end aborted, with a
  // final sandbox state and nothing left on the host.
  for (int delay_ms : {0, 0, 50, 150, 300}) {
    BOOST_TEST_CONTEXT("abort " << delay_ms << " ms after submission") {
      const std::string id = submit_task(api, long_command);
      sandbox_sweeper sweeper(id);
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      http_response r = api.abort(id);
      BOOST_TEST((r.status == 200 || r.status == 202), "abort: " << r.summary());
      std::string last;
      auto ended = api.wait_for_task(id, is_aborted, 5s, &last);
      BOOST_TEST_REQUIRE(ended.has_value(), "not aborted 5 s after the abort; last: " << last);
      // Either the abort came before the task asked for a sandbox (then none was ever
      // started), or its sandbox reached a final state.
      const std::string sb = sandbox_status(*ended);
      BOOST_TEST((sb.empty() || sb == "terminated" || sb == "failed"),
                 "sandbox state: " << ended->dump());
      BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 5s),
                 "sandbox processes left: " << describe(sandbox_processes(id)));
    }
  }
}
