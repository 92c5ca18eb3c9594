// End to end: a task submitted over HTTP runs in a gVisor sandbox, its events stream over a
// WebSocket in order and are stored, and ferryctl reads the same events back from the data dir.

#define BOOST_TEST_MODULE e2e_task_test
#include <boost/test/unit_test.hpp>

#include <sstream>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const std::string echo_command = "echo hello; sleep 1; echo bye";
// For the live join: the second viewer connects after "hello"; three seconds keep the task
// running until then even on a loaded machine.
const std::string slow_echo_command = "echo hello; sleep 3; echo bye";

struct running_ferryd {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};
  running_ferryd() {
    BOOST_TEST_MESSAGE("ferryd ready in " << ferryd.startup_time().count() << " ms on "
                                          << ferryd.url());
  }
};

bool is_output_with(const json& e, const std::string& needle) {
  return str(e, "type") == "output_chunk" && chunk_text(data_of(e)).find(needle) != std::string::npos;
}

/// Opens the event stream from the start and reads it to the end.
ws_transcript watch_whole_task(const api_client& api, const std::string& id) {
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events of task " << id << ": " << hs.summary());
  return read_until_close(ws, 120s);
}

/// The story of a successful `echo_command` run, milestone by milestone, then its details.
void check_success_story(const std::vector<json>& ev, const std::string& id) {
  BOOST_TEST_CONTEXT("events:" << describe_events(ev)) {
    BOOST_TEST_REQUIRE(!ev.empty());

    BOOST_TEST(str(ev.front(), "type") == "task_submitted");
    const json submitted = data_of(ev.front());
    BOOST_TEST(str(submitted, "task_id") == id);
    BOOST_TEST(str(submitted, "command") == echo_command);

    // Milestones in order; each is searched after the previous one, stopping at the first
    // missing one (the rest would only repeat that failure).
    int at = 0;
    auto next = [&](const char* label, const std::string& type,
                    const std::function<bool(const json&)>& match) {
      int i = find_event(ev, type, at, match);
      BOOST_TEST(i >= 0, "no " << label << " after event #" << at);
      if (i >= 0)
        at = i + 1;
      return i;
    };
    auto to = [](const char* state) {
      return [state](const json& d) { return str(d, "to") == state; };
    };
    const int spawning = next("sandbox spawning", "sandbox_state_changed", to("spawning"));
    const int running = spawning >= 0 ? next("sandbox executing", "sandbox_state_changed", to("executing")) : -1;
    const int started = running >= 0 ? next("command_started", "command_started", nullptr) : -1;
    const int hello = started >= 0 ? next("output \"hello\"", "output_chunk", [](const json& d) {
      return chunk_text(d).find("hello") != std::string::npos;
    }) : -1;
    const int bye = hello >= 0 ? next("output \"bye\"", "output_chunk", [](const json& d) {
      return chunk_text(d).find("bye") != std::string::npos;
    }) : -1;
    const int exited = bye >= 0 ? next("command_exited", "command_exited", nullptr) : -1;
    const int finished = exited >= 0 ? next("task_finished", "task_finished", nullptr) : -1;

    // The command's lifecycle.
    if (exited >= 0) {
      const json d = data_of(ev[static_cast<size_t>(exited)]);
      BOOST_TEST(field(d, "exit_code") == json(0), "command_exited: " << d.dump());
      BOOST_TEST(field(d, "signal") == json(0), "command_exited: " << d.dump());
      // sleep 1 between the two echos: the command cannot have taken less.
      const json duration = field(d, "duration_ms");
      BOOST_TEST((duration.is_number() && duration.get<double>() >= 900),
                 "command_exited: " << d.dump());
    }
    if (started >= 0) {
      const json d = data_of(ev[static_cast<size_t>(started)]);
      BOOST_TEST((field(d, "argv").is_array() && !field(d, "argv").empty()),
                 "command_started: " << d.dump());
      const json command_id = field(d, "command_id");
      BOOST_TEST(command_id.is_number_integer(), "command_started: " << d.dump());
      for (const auto& e : ev) {
        const std::string type = str(e, "type");
        if (type == "output_chunk" || type == "command_exited")
          BOOST_TEST(field(data_of(e), "command_id") == command_id,
                     "command_id differs from command_started's: " << e.dump());
      }
    }
    // The output, whole and in order: "hello" and "bye" are separate chunks a second apart.
    BOOST_TEST(stdout_text(ev) == "hello\nbye\n");
    BOOST_TEST((hello >= 0 && bye > hello));

    // The end: task_finished(succeeded, 0) once, as the very last event.
    BOOST_TEST(finished == static_cast<int>(ev.size()) - 1, "task_finished is not the last event");
    if (finished >= 0) {
      const json d = data_of(ev[static_cast<size_t>(finished)]);
      BOOST_TEST(str(d, "status") == "succeeded", "task_finished: " << d.dump());
      BOOST_TEST(field(d, "exit_code") == json(0), "task_finished: " << d.dump());
    }
    BOOST_TEST(std::count_if(ev.begin(), ev.end(),
                             [](const json& e) { return str(e, "type") == "task_finished"; }) == 1);

    // Sandbox states follow the lifecycle (ferry/actors/lifecycle.h) — up, ready, the command
    // runs, ready again, then the end — and are over before the task is reported finished; one
    // sandbox, one backend throughout.
    std::vector<std::string> sandbox_states = check_state_chain(ev, "sandbox_state_changed", "none");
    const std::vector<std::string> expected_states{"none",      "spawning", "initializing",
                                                   "ready",     "executing", "ready",
                                                   "terminating", "terminated"};
    BOOST_TEST(sandbox_states == expected_states, boost::test_tools::per_element());
    int last_sandbox_event = -1;
    std::string sandbox_id, backend;
    for (size_t i = 0; i < ev.size(); ++i) {
      if (str(ev[i], "type") != "sandbox_state_changed")
        continue;
      last_sandbox_event = static_cast<int>(i);
      const json d = data_of(ev[i]);
      if (sandbox_id.empty()) {
        sandbox_id = str(d, "sandbox_id");
        backend = str(d, "backend");
      }
      BOOST_TEST(str(d, "sandbox_id") == sandbox_id);
      BOOST_TEST(str(d, "backend") == backend);
    }
    BOOST_TEST(!sandbox_id.empty());
    BOOST_TEST(backend == "runsc");
    BOOST_TEST((finished < 0 || last_sandbox_event < finished),
               "a sandbox state change came after task_finished");

    // Task states: a chain from queued that reaches running before the command starts.
    std::vector<std::string> task_states = check_state_chain(ev, "task_state_changed", "queued");
    const int task_running = find_event(ev, "task_state_changed", 0,
                                        [](const json& d) { return str(d, "to") == "running"; });
    BOOST_TEST(task_running >= 0, "no task_state_changed to running");
    BOOST_TEST((started < 0 || task_running < started),
               "the task became running only after its command started");
    for (size_t i = 1; i < task_states.size(); ++i) {
      const std::string& s = task_states[i];
      BOOST_TEST((s == "running" || s == "succeeded"), "unexpected task state " << s);
    }
  }
}

/// The task as GET shows it after it succeeded, consistent with its events.
void check_task_after_success(const api_client& api, const std::string& id,
                              const std::vector<json>& ev) {
  json task = get_task_json(api, id);
  BOOST_TEST_CONTEXT("task: " << task.dump()) {
    BOOST_TEST(str(task, "id") == id);
    BOOST_TEST(str(task, "status") == "succeeded");
    BOOST_TEST(field(task, "exit_code") == json(0));
    BOOST_TEST(str(task, "command") == echo_command);
    BOOST_TEST(task.contains("repo"));
    if (!ev.empty())
      BOOST_TEST(field(task, "last_seq") == field(ev.back(), "seq"));
    const json sb = field(task, "sandbox");
    BOOST_TEST_REQUIRE(sb.is_object());
    BOOST_TEST(str(sb, "status") == "terminated");
    BOOST_TEST(str(sb, "backend") == "runsc");
    const int first = find_event(ev, "sandbox_state_changed");
    if (first >= 0)
      BOOST_TEST(str(sb, "id") == str(data_of(ev[static_cast<size_t>(first)]), "sandbox_id"));
  }
}

/// Parses `ferryctl ... --json` output: one JSON object per non-empty line.
std::vector<json> parse_json_lines(const std::string& out) {
  std::vector<json> events;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty())
      continue;
    auto j = json::parse(line, nullptr, false);
    BOOST_TEST(!j.is_discarded(), "ferryctl --json printed a line that is not JSON: " << line);
    if (!j.is_discarded())
      events.push_back(std::move(j));
  }
  return events;
}

program_run ferryctl_show(const std::filesystem::path& data_dir, const std::string& id, bool as_json) {
  std::vector<std::string> argv{FERRYCTL_BINARY, "--data-dir", data_dir.string(), "events", "show",
                                "task-" + id};
  if (as_json)
    argv.push_back("--json");
  const auto t0 = std::chrono::steady_clock::now();
  program_run run = run_program(argv, 30s);
  BOOST_TEST_MESSAGE("ferryctl events show" << (as_json ? " --json" : "") << " took "
                                            << ms_since(t0) << " ms");
  return run;
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_submitted_task_streams_its_events_in_order_and_the_stream_closes_after_task_finished,
                        running_ferryd) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string id = submit_task(api, echo_command);
  ws_transcript t = watch_whole_task(api, id);
  BOOST_TEST_MESSAGE("task " << id << " streamed " << t.events.size() << " events and closed after "
                             << ms_since(t0) << " ms from submission");

  check_clean_stream(t, "viewer from the start");
  check_envelopes(t.events, id, 1);
  check_success_story(t.events, id);
  check_task_after_success(api, id, t.events);
}

BOOST_FIXTURE_TEST_CASE(reconnecting_with_from_replays_exactly_the_events_from_that_seq,
                        running_ferryd) {
  const std::string id = submit_task(api, echo_command);
  ws_transcript whole = watch_whole_task(api, id);
  check_clean_stream(whole, "viewer from the start");
  BOOST_TEST_REQUIRE(whole.events.size() > 3u, whole.summary());

  ws_client ws;
  ws_handshake hs = api.open_events(ws, id, 3);
  BOOST_TEST_REQUIRE(hs.upgraded, "events?from=3: " << hs.summary());
  ws_transcript replay = read_until_close(ws, 30s);
  check_clean_stream(replay, "viewer from seq 3");

  const std::vector<json> expected(whole.events.begin() + 2, whole.events.end());
  BOOST_TEST_CONTEXT("whole stream:" << describe_events(whole.events)
                                     << "\nreplay from 3:" << describe_events(replay.events)) {
    BOOST_TEST_REQUIRE(!replay.events.empty());
    BOOST_TEST(field(replay.events.front(), "seq") == json(3));
    BOOST_TEST(replay.events == expected, boost::test_tools::per_element());
  }

  // A client that already saw everything resumes after the last event: the stream has nothing
  // more to send and must close normally instead of waiting forever.
  const uint64_t after_last = whole.events.back()["seq"].get<uint64_t>() + 1;
  ws_client resumed;
  ws_handshake hs3 = api.open_events(resumed, id, after_last);
  BOOST_TEST_REQUIRE(hs3.upgraded, "events?from=" << after_last << ": " << hs3.summary());
  ws_transcript rest = read_until_close(resumed, 10s);
  BOOST_TEST(rest.closed_normally(), "resume after the end: " << rest.summary());
  BOOST_TEST(rest.events.empty(), "resume after the end:" << describe_events(rest.events));
}

BOOST_FIXTURE_TEST_CASE(a_second_viewer_joining_while_the_task_runs_sees_the_same_stream,
                        running_ferryd) {
  const std::string id = submit_task(api, slow_echo_command);
  ws_client first;
  ws_handshake hs = api.open_events(first, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "first viewer: " << hs.summary());

  // Join once "hello" is out: the task then still sleeps before "bye".
  ws_transcript a;
  const bool saw_hello = read_until_event(
      first, a, [](const json& e) { return is_output_with(e, "hello"); }, 90s);
  BOOST_TEST_REQUIRE(saw_hello, "first viewer never saw \"hello\": " << a.summary()
                                                                     << describe_events(a.events));
  ws_client second;
  const auto joined = std::chrono::steady_clock::now();
  ws_handshake hs2 = api.open_events(second, id);
  BOOST_TEST_REQUIRE(hs2.upgraded, "second viewer: " << hs2.summary());
  BOOST_TEST_MESSAGE("second viewer upgraded in " << ms_since(joined) << " ms");
  // The status only moves forward, so "running" now means it was running at the handshake.
  json task = get_task_json(api, id);
  BOOST_TEST_REQUIRE(str(task, "status") == "running",
                     "the task was no longer running when the second viewer joined, so this run "
                     "cannot show a live join: "
                         << task.dump());

  a = read_until_close(first, 60s, std::move(a));
  ws_transcript b = read_until_close(second, 60s);
  check_clean_stream(a, "first viewer");
  check_clean_stream(b, "second viewer");
  check_envelopes(b.events, id, 1);
  BOOST_TEST_CONTEXT("first viewer:" << describe_events(a.events)
                                     << "\nsecond viewer:" << describe_events(b.events)) {
    BOOST_TEST(b.events == a.events, boost::test_tools::per_element());
    BOOST_TEST((!b.events.empty() && str(b.events.back(), "type") == "task_finished"));
  }
}

BOOST_FIXTURE_TEST_CASE(ferryctl_shows_the_stored_events_while_ferryd_runs_and_after_it_stopped,
                        running_ferryd) {
  const std::string id = submit_task(api, echo_command);
  ws_transcript t = watch_whole_task(api, id);
  check_clean_stream(t, "viewer from the start");
  BOOST_TEST_REQUIRE(!t.events.empty(), t.summary());

  {
    program_run run = ferryctl_show(ferryd.data_dir(), id, true);
    BOOST_TEST_CONTEXT("ferryctl --json while ferryd runs: " << run.summary()) {
      BOOST_TEST(run.status.ok());
      std::vector<json> stored = parse_json_lines(run.out);
      BOOST_TEST(stored == t.events, boost::test_tools::per_element());
    }
  }

  ferryd_stop_report stop = ferryd.stop();
  BOOST_TEST_REQUIRE(stop.clean(), "ferryd did not stop cleanly; see above");

  {
    program_run run = ferryctl_show(ferryd.data_dir(), id, true);
    BOOST_TEST_CONTEXT("ferryctl --json after ferryd stopped: " << run.summary()
                                                                << "\nstdout:\n" << run.out) {
      BOOST_TEST(run.status.ok());
      std::vector<json> stored = parse_json_lines(run.out);
      BOOST_TEST(stored == t.events, boost::test_tools::per_element());
      check_envelopes(stored, id, 1);
      BOOST_TEST(stdout_text(stored) == "hello\nbye\n");
    }
  }
  {
    program_run run = ferryctl_show(ferryd.data_dir(), id, false);
    BOOST_TEST_CONTEXT("ferryctl (text) after ferryd stopped: " << run.summary()
                                                                << "\nstdout:\n" << run.out) {
      BOOST_TEST(run.status.ok());
      std::vector<std::string> lines;
      std::istringstream in(run.out);
      for (std::string line; std::getline(in, line);) {
        if (!line.empty())
          lines.push_back(line);
      }
      BOOST_TEST_REQUIRE(lines.size() == t.events.size(), "one line per event");
      for (size_t i = 0; i < lines.size(); ++i) {
        const std::string seq = std::to_string(i + 1);
        const std::string& line = lines[i];
        BOOST_TEST((line.rfind(seq, 0) == 0 &&
                    (line.size() == seq.size() || !std::isdigit(static_cast<unsigned char>(line[seq.size()])))),
                   "line " << i + 1 << " does not start with its sequence number: " << line);
        const std::string type = str(t.events[i], "type");
        BOOST_TEST(line.find(type) != std::string::npos,
                   "line " << i + 1 << " does not name its type " << type << ": " << line);
      }
      BOOST_TEST(run.out.find("hello") != std::string::npos);
      BOOST_TEST(run.out.find("bye") != std::string::npos);
    }
  }
}
