// The warm pool through ferryd (--warm-pool): a task takes a sandbox that was started ahead of
// time (its timeline says so and records the runtime's id), runs its command in it as command 1,
// and the sandbox ends with the command, as a started one does; the pool refills; a task whose
// pooled sandbox outlives a SIGKILLed ferryd is re-attached by the runtime's id and finishes;
// ferryd's stop leaves no idle sandbox behind. Bad --warm-pool values are refused.

#define BOOST_TEST_MODULE warm_pool_test
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
namespace fs = std::filesystem;

namespace {

/// Pool sandboxes (`w0-…`) with their control socket under the data dir: up, or nearly.
size_t pool_sandboxes_up(const fs::path& data_dir) {
  size_t n = 0;
  std::error_code ec;
  for (fs::directory_iterator it(data_dir / "sandboxes", ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code sec;
    if (it->path().filename().string().starts_with("w0-") && fs::is_socket(it->path() / "ctl" / "init.sock", sec))
      ++n;
  }
  return n;
}

bool wait_for_pool(const fs::path& data_dir, size_t n, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pool_sandboxes_up(data_dir) >= n)
      return true;
    std::this_thread::sleep_for(50ms);
  }
  return false;
}

/// The task's sandbox_state_changed events.
std::vector<json> sandbox_changes(const std::vector<json>& events) {
  std::vector<json> out;
  for (const auto& e : events)
    if (str(e, "type") == "sandbox_state_changed")
      out.push_back(data_of(e));
  return out;
}

std::string stdout_of(const std::vector<json>& events) {
  std::string out;
  for (const auto& e : events)
    if (str(e, "type") == "output_chunk" && str(data_of(e), "stream") == "stdout")
      out += chunk_text(data_of(e));
  return out;
}

std::vector<json> all_events(const api_client& api, const std::string& id) {
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
  return read_until_close(ws, 60s).events;
}

/// Submits `command` until a task takes a warm sandbox (the pool may still be filling), at
/// most `tries` times; the id of the one that did, else "".
std::string submit_warm(const api_client& api, const std::string& command, int tries = 20) {
  for (int i = 0; i < tries; ++i) {
    const std::string id = submit_task(api, command);
    auto t = api.wait_for_task(id, [](const json& t) { return !str(field(t, "sandbox"), "status").empty() &&
                                                              str(field(t, "sandbox"), "status") != "spawning"; },
                               60s);
    if (t && str(field(*t, "sandbox"), "runtime_id").starts_with("w0-"))
      return id;
    api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 60s);
    std::this_thread::sleep_for(200ms);
  }
  return {};
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_task_runs_in_a_warm_sandbox_and_the_pool_refills) {
  temp_dir dir("ferry-warm");
  const fs::path data = dir.path() / "data";
  ferryd_options opts(FERRYD_BINARY, data);
  opts.extra_args = {"--warm-pool", "1"};
  ferryd_process ferryd(opts);
  BOOST_TEST(ferryd.output().find("warm pools: no environment (1)") != std::string::npos, ferryd.output());
  api_client api(ferryd);
  BOOST_TEST_REQUIRE(wait_for_pool(data, 1, 60s), "no pool sandbox came up; ferryd: " << ferryd.output());

  const std::string id = submit_warm(api, "echo from-warm; echo to-err >&2; exit 3");
  BOOST_TEST_REQUIRE(!id.empty(), "no task took a warm sandbox");
  sandbox_sweeper sweep(id);
  std::string last;
  auto done = api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 60s, &last);
  BOOST_TEST_REQUIRE(done.has_value(), last);
  BOOST_TEST(str(*done, "status") == "failed");
  BOOST_TEST(field(*done, "exit_code") == 3);
  const std::string runtime_id = str(field(*done, "sandbox"), "runtime_id");
  BOOST_TEST(runtime_id.starts_with("w0-"));
  BOOST_TEST(str(field(*done, "sandbox"), "id") == "ferry-" + id + "-1");

  const auto events = all_events(api, id);
  BOOST_TEST_CONTEXT("events:" << describe_events(events)) {
    BOOST_TEST(stdout_of(events) == "from-warm\n");
    const auto changes = sandbox_changes(events);
    std::vector<std::string> chain;
    for (const auto& c : changes) {
      chain.push_back(str(c, "to"));
      // From the moment it was taken (spawning is recorded before: nothing was taken yet).
      if (str(c, "to") != "spawning")
        BOOST_TEST(str(c, "runtime_id") == runtime_id, c.dump());
      BOOST_TEST(str(c, "sandbox_id") == "ferry-" + id + "-1");
    }
    BOOST_TEST(chain == (std::vector<std::string>{"spawning", "initializing", "ready", "executing", "ready",
                                                  "terminating", "terminated"}),
               [&] {
                 std::string j;
                 for (const auto& c : chain)
                   j += c + " ";
                 return j;
               }());
    BOOST_TEST_REQUIRE(changes.size() >= 2u);
    BOOST_TEST(str(changes[1], "reason").find("taken from the warm pool (" + runtime_id + ")") != std::string::npos,
               changes[1].dump());
    // Command 1 is the task's command, with its exit.
    const int started = find_event(events, "command_started", 0, [](const json& d) {
      return d.value("command_id", -1) == 1 && d["argv"].size() == 3u;
    });
    BOOST_TEST(started >= 0);
  }
  // The sandbox is gone with its command, and the pool started another.
  std::error_code ec;
  BOOST_TEST(!fs::exists(data / "sandboxes" / runtime_id, ec));
  BOOST_TEST(wait_for_pool(data, 1, 60s), "the pool did not refill");

  // A second task takes the refilled one.
  const std::string second = submit_warm(api, "echo again", 5);
  BOOST_TEST(!second.empty(), "the refilled pool was not used");
  if (!second.empty()) {
    sandbox_sweeper sweep2(second);
    auto t = api.wait_for_task(second, [](const json& t) { return field(t, "finished") == true; }, 60s);
    BOOST_TEST_REQUIRE(t.has_value());
    BOOST_TEST(str(*t, "status") == "succeeded");
    BOOST_TEST(str(field(*t, "sandbox"), "runtime_id") != runtime_id);
  }
  auto stop = ferryd.stop();
  BOOST_TEST(stop.clean(), "ferryd left something behind");
  BOOST_TEST(pool_sandboxes_up(data) == 0u);
}

BOOST_AUTO_TEST_CASE(a_warm_task_survives_a_crash_of_ferryd) {
  temp_dir dir("ferry-warm-crash");
  const fs::path data = dir.path() / "data";
  ferryd_options opts(FERRYD_BINARY, data);
  opts.extra_args = {"--warm-pool", "1"};
  std::optional<ferryd_process> first(std::in_place, opts);
  const std::string token = first->token();
  api_client api1(*first);
  BOOST_TEST_REQUIRE(wait_for_pool(data, 1, 60s));
  const std::string id = submit_warm(api1, "echo before; sleep 4; echo after");
  BOOST_TEST_REQUIRE(!id.empty());
  sandbox_sweeper sweep(id);
  std::string last;
  auto running = api1.wait_for_task(id, [](const json& t) { return sandbox_status(t) == "executing"; }, 60s, &last);
  BOOST_TEST_REQUIRE(running.has_value(), last);
  const std::string runtime_id = str(field(*running, "sandbox"), "runtime_id");
  first->crash();

  ferryd_options again(FERRYD_BINARY, data, token);
  again.extra_args = {"--warm-pool", "1"};
  ferryd_process second(again);
  api_client api(second);
  auto done = api.wait_for_task(id, [](const json& t) { return field(t, "finished") == true; }, 90s, &last);
  BOOST_TEST_REQUIRE(done.has_value(), "not finished after the restart; last: " << last);
  const auto events = all_events(api, id);
  BOOST_TEST_CONTEXT("events:" << describe_events(events)) {
    BOOST_TEST(str(*done, "status") == "succeeded");
    BOOST_TEST(stdout_of(events) == "before\nafter\n");
    BOOST_TEST(str(field(*done, "sandbox"), "runtime_id") == runtime_id);
    BOOST_TEST(second.output().find("sandbox ferry-" + id + "-1 re-attached") != std::string::npos, second.output());
  }
  std::error_code ec;
  BOOST_TEST(!fs::exists(data / "sandboxes" / runtime_id, ec));
  auto stop = second.stop();
  BOOST_TEST(stop.clean());
}

BOOST_AUTO_TEST_CASE(bad_warm_pool_sizes_are_refused) {
  for (const char* bad : {"-1", "65", "lots"}) {
    temp_dir dir("ferry-warm-bad");
    ferryd_options opts(FERRYD_BINARY, dir.path() / "data");
    opts.extra_args = {"--warm-pool", bad};
    opts.ready_timeout = 10s;
    BOOST_CHECK_THROW(ferryd_process{opts}, std::runtime_error);
  }
}
