// Environments through ferryd (--environments): a task that names one runs after the
// environment's setup script, whose output is in the task's timeline as command 0; the next
// task of that environment starts from the cached result without running it again; a failing
// setup fails the task and says why; an abort during the setup ends the task aborted with no
// process left; an unknown environment is refused; GET /api/v1/environments lists them without
// the variables' values.

#define BOOST_TEST_MODULE environments_test
#include <boost/test/unit_test.hpp>

#include <fstream>
#include <thread>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const json environments = {
  {"environments",
   {{"tools",
     {{"setup", "echo setting-up; mkdir -p /opt/tool; echo from-setup > /opt/tool/marker; "
                "echo \"var in setup: $FERRY_TEST_VAR\"; echo to-stderr >&2"},
      {"env", {{"FERRY_TEST_VAR", "secret-ish-value"}}},
      {"setup_timeout_s", 60}}},
    {"plain", {{"env", {{"PLAIN_VAR", "p"}}}}},
    {"broken", {{"setup", "echo about-to-fail; exit 7"}}},
    {"slow", {{"setup", "echo slow-setup-started; touch /workspace/started; sleep 120"}}}}}};

struct fixture {
  temp_dir dir{"ferry-env"};
  fs::path file = dir.path() / "environments.json";
  std::unique_ptr<ferryd_process> ferryd;
  std::unique_ptr<api_client> api;

  fixture() {
    std::ofstream(file) << environments.dump(2);
    ferryd_options opts(FERRYD_BINARY, dir.path() / "data");
    opts.extra_args = {"--environments", file.string()};
    ferryd = std::make_unique<ferryd_process>(opts);
    api = std::make_unique<api_client>(*ferryd);
  }

  std::string submit(const std::string& command, const std::string& environment) {
    http_response r = api->authorized("POST", "/api/v1/tasks",
                                      json{{"command", command}, {"environment", environment}}.dump());
    BOOST_TEST_REQUIRE(r.status == 201, r.summary());
    return str(*r.json(), "id");
  }

  json wait_finished(const std::string& id, std::chrono::seconds timeout = 120s) {
    std::string last;
    auto ended = api->wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, timeout, &last);
    BOOST_TEST_REQUIRE(ended.has_value(), "task " << id << " did not end; last: " << last);
    return *ended;
  }

  std::vector<json> events(const std::string& id) {
    ws_client ws;
    ws_handshake hs = api->open_events(ws, id);
    BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
    return read_until_close(ws, 60s).events;
  }

  json environment_list() {
    http_response r = api->authorized("GET", "/api/v1/environments");
    BOOST_TEST_REQUIRE(r.status == 200, r.summary());
    return *r.json();
  }
};

/// The stdout of command `command_id` in `events`.
std::string output_of(const std::vector<json>& events, int command_id, const char* stream = "stdout") {
  std::string out;
  for (const auto& e : events) {
    if (str(e, "type") != "output_chunk")
      continue;
    const json d = data_of(e);
    if (d.value("command_id", -1) != command_id || str(d, "stream") != stream)
      continue;
    out += d.contains("text") ? d["text"].get<std::string>() : base64_decode(str(d, "base64")).value_or("");
  }
  return out;
}

const json* find_environment(const json& list, const std::string& name) {
  for (const auto& e : list["environments"])
    if (str(e, "name") == name)
      return &e;
  return nullptr;
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_task_runs_after_its_environments_setup_and_the_next_one_reuses_it, fixture) {
  const json before = environment_list();
  BOOST_TEST_MESSAGE("environments: " << before.dump());
  const json* tools = find_environment(before, "tools");
  BOOST_TEST_REQUIRE(tools);
  BOOST_TEST((*tools)["setup"] == true);
  BOOST_TEST((*tools)["set_up"] == false);
  BOOST_TEST((*tools)["variables"] == json::array({"FERRY_TEST_VAR"}));
  BOOST_TEST(before.dump().find("secret-ish-value") == std::string::npos, "a variable's value is listed");
  BOOST_TEST(str(*tools, "key").size() == 64u);
  BOOST_TEST_REQUIRE(find_environment(before, "plain"));

  const std::string command = "cat /opt/tool/marker; echo \"var: $FERRY_TEST_VAR\"";
  const std::string first = submit(command, "tools");
  sandbox_sweeper sweep_first(first);
  const json done = wait_finished(first);
  BOOST_TEST_MESSAGE("first: " << done.dump());
  BOOST_TEST(str(done, "status") == "succeeded");
  BOOST_TEST(str(done, "environment") == "tools");
  BOOST_TEST(str(done, "environment_key") == str(*tools, "key"));
  const auto ev = events(first);
  BOOST_TEST_CONTEXT("events:" << describe_events(ev)) {
    // The setup is command 0 of the timeline: started, its output, its exit — before command 1.
    const int setup_start = find_event(ev, "command_started", 0, [](const json& d) {
      return d.value("command_id", -1) == 0 && d["argv"] == json::array({"environment-setup", "tools"});
    });
    const int setup_exit = find_event(ev, "command_exited", 0, [](const json& d) {
      return d.value("command_id", -1) == 0 && d.value("exit_code", -1) == 0;
    });
    const int command_start = find_event(ev, "command_started", 0, [](const json& d) { return d.value("command_id", -1) == 1; });
    BOOST_TEST(setup_start >= 0);
    BOOST_TEST(setup_exit > setup_start);
    BOOST_TEST(command_start > setup_exit);
    BOOST_TEST(output_of(ev, 0) == "setting-up\nvar in setup: secret-ish-value\n");
    BOOST_TEST(output_of(ev, 0, "stderr") == "to-stderr\n");
    BOOST_TEST(output_of(ev, 1) == "from-setup\nvar: secret-ish-value\n");
  }
  BOOST_TEST((find_environment(environment_list(), "tools")->at("set_up") == true));

  // The next task of the environment: no setup, the same root.
  const std::string second = submit(command, "tools");
  sandbox_sweeper sweep_second(second);
  const json done2 = wait_finished(second);
  BOOST_TEST(str(done2, "status") == "succeeded");
  const auto ev2 = events(second);
  BOOST_TEST_CONTEXT("events:" << describe_events(ev2)) {
    BOOST_TEST(find_event(ev2, "command_started", 0, [](const json& d) { return d.value("command_id", -1) == 0; }) < 0);
    BOOST_TEST(output_of(ev2, 0).empty());
    BOOST_TEST(output_of(ev2, 1) == "from-setup\nvar: secret-ish-value\n");
    BOOST_TEST(find_event(ev2, "sandbox_state_changed", 0, [](const json& d) {
                 return str(d, "reason").find("environment tools (layer ") != std::string::npos &&
                        str(d, "reason").find("cached") != std::string::npos;
               }) >= 0);
  }

  // Without an environment, and in one without a setup: the bare root, the variables only.
  const std::string bare = submit("test -e /opt/tool/marker && echo leaked || echo bare; echo \"plain=$PLAIN_VAR\"", "plain");
  sandbox_sweeper sweep_bare(bare);
  BOOST_TEST(str(wait_finished(bare), "status") == "succeeded");
  BOOST_TEST(output_of(events(bare), 1) == "bare\nplain=p\n");
}

BOOST_FIXTURE_TEST_CASE(an_unknown_environment_is_refused_and_a_failing_setup_fails_the_task, fixture) {
  http_response r = api->authorized("POST", "/api/v1/tasks", json{{"command", "true"}, {"environment", "nope"}}.dump());
  const std::string message = expect_json_error(r, 400, "unknown environment");
  BOOST_TEST(message.find("no environment named \"nope\"") != std::string::npos, message);
  BOOST_TEST(message.find("tools") != std::string::npos, message);
  r = api->authorized("POST", "/api/v1/tasks", json{{"command", "true"}, {"environment", 5}}.dump());
  expect_json_error(r, 400, "environment not a string");

  const std::string id = submit("echo never", "broken");
  sandbox_sweeper sweep(id);
  const json done = wait_finished(id);
  BOOST_TEST_MESSAGE("broken: " << done.dump());
  BOOST_TEST(str(done, "status") == "failed");
  BOOST_TEST(field(done, "exit_code").is_null(), "the setup's exit is not the command's");
  const std::string reason = str(field(done, "sandbox"), "reason");
  BOOST_TEST(reason.find("the setup script exited 7") != std::string::npos, reason);
  BOOST_TEST(reason.find("about-to-fail") != std::string::npos, reason);
  const auto ev = events(id);
  BOOST_TEST(output_of(ev, 0) == "about-to-fail\n");
  BOOST_TEST(output_of(ev, 1).empty());
  BOOST_TEST(!find_environment(environment_list(), "broken")->at("set_up").get<bool>());
}

BOOST_FIXTURE_TEST_CASE(an_abort_during_the_setup_ends_the_task_aborted_with_no_process_left, fixture) {
  const std::string id = submit("echo never", "slow");
  sandbox_sweeper sweep(id);
  // The setup runs in a sandbox of its own, named after the task's (ferry-<task>-1-setup): wait
  // until its script has started. Its processes name its bundle under this ferryd's data
  // directory.
  const std::string needle = (dir.path() / "data" / "sandboxes" / ("ferry-" + id + "-1-setup")).string();
  BOOST_TEST_REQUIRE(eventually([&] { return !processes_with_cmdline_containing(needle).empty(); }, 30s),
                     "the setup sandbox did not start");
  // The script has printed its line (it touches the file after the echo): wait for that, not
  // for a fixed time, which a loaded machine can outlast.
  auto script_ran = [&] {
    std::error_code ec;
    return fs::exists(fs::path(needle) / "workspace" / "started", ec);
  };
  BOOST_TEST_REQUIRE(eventually(script_ran, 30s), "the setup script did not run");
  std::this_thread::sleep_for(200ms);
  const auto t0 = std::chrono::steady_clock::now();
  http_response r = api->abort(id);
  BOOST_TEST_REQUIRE((r.status == 200 || r.status == 202), r.summary());
  std::string last;
  auto ended = api->wait_for_task(id, [](const json& t) { return str(t, "status") == "aborted"; }, 10s, &last);
  BOOST_TEST_REQUIRE(ended.has_value(), "not aborted; last: " << last);
  const double aborted_ms = ms_since(t0);
  BOOST_TEST_MESSAGE("aborted after " << aborted_ms << " ms");
  BOOST_TEST(aborted_ms < 1000.0, "the abort took " << aborted_ms << " ms");
  BOOST_TEST(eventually([&] { return processes_with_cmdline_containing(needle).empty(); }, 5s),
             "setup processes left: " << describe(processes_with_cmdline_containing(needle)));
  BOOST_TEST(!find_environment(environment_list(), "slow")->at("set_up").get<bool>());
  const auto ev = events(id);
  BOOST_TEST(output_of(ev, 0).find("slow-setup-started") == 0u, describe_events(ev));
}

BOOST_AUTO_TEST_CASE(a_bad_environments_file_stops_ferryd_with_the_reason) {
  temp_dir dir("ferry-env-bad");
  const std::pair<std::string, std::string> cases[] = {
    {"{", "not valid JSON"},
    {R"({"environments": {"a b": {}}})", "environment name \"a b\""},
    {R"({"environments": {"x": {"env": {"1X": "v"}}}})", "not a shell identifier"},
    {R"({"environments": {"x": {"setup_timeout_s": 0}}})", "setup_timeout_s"},
    {R"({"environments": {"x": {"script": "true"}}})", "unknown field \"script\""},
    {R"({"environments": {"x": {"network": {"level": "sometimes"}}}})", "environment x: \"network\""},
    {R"({"environments": {"x": {"network": {"level": "trusted", "allow": ["a.example"]}}}})", "\"network\""},
    {R"({"environments": {"x": {"network": {"level": "custom", "allow": ["bad host"]}}}})", "\"network\""},
    {R"({"environments": {"x": {"warm_pool": -1}}})", "warm_pool"},
    {R"({"environments": {"x": {"warm_pool": 65}}})", "warm_pool"},
  };
  for (const auto& [text, expected] : cases) {
    const fs::path file = dir.path() / "env.json";
    std::ofstream(file) << text;
    program_run run = run_program({FERRYD_BINARY, "--listen", "127.0.0.1:0", "--data-dir", (dir.path() / "data").string(),
                                   "--environments", file.string()},
                                  30s);
    BOOST_TEST_CONTEXT(text << " -> " << run.summary()) {
      BOOST_TEST(!run.status.ok());
      BOOST_TEST((run.out + run.err).find(expected) != std::string::npos);
    }
  }
}
