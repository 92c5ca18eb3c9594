// The task wall-clock limit, with the real task manager, journal and gVisor sandboxes: a task
// that outlives its limit is killed with its sandbox and fails with a limit_reached event naming
// task_wall_clock and a reason naming the limit; a task that ends in time records no limit and
// its timer, firing later, changes nothing. (Recovery across a ferryd SIGKILL, which must keep
// the original deadline, is tests/integration/wall_clock_test.cpp.) Needs root and runsc
// (skipped with a message otherwise).

#define BOOST_TEST_MODULE actors_wall_clock
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <algorithm>
#include <thread>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "ferry/actors/tasks.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "real_tasks.h"

namespace fa = ferry::actors;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using namespace std::chrono_literals;

namespace {

using ferry::test::can_run_sandboxes;

struct fixture : ferry::test::real_tasks {
  fixture() : real_tasks("ferry-wall-clock") {}

  std::string submit(const std::string& command, std::chrono::milliseconds limit) {
    fa::task_request req{command, "", "alice", "c1"};
    req.wall_clock_limit = limit;
    auto sub = tasks->submit(req);
    BOOST_REQUIRE_MESSAGE(sub.ok(), (sub.ok() ? "" : sub.error().message));
    return sub->id;
  }

  fa::task_view load(const std::string& id) {
    auto v = fa::load_task_view(*store, id);
    BOOST_REQUIRE(v.ok() && v->has_value());
    return **v;
  }

  /// The task's events as the API renders them.
  std::vector<nlohmann::json> events(const std::string& id) {
    std::vector<nlohmann::json> out;
    auto n = store->for_each("task-" + id, {}, [&](const ev::Envelope& e, std::string_view) {
      out.push_back(sc::to_json(e));
      return true;
    });
    BOOST_REQUIRE(n.ok());
    return out;
  }

  bool sandbox_live(const std::string& sandbox_id) {
    auto live = runtime->list_live();
    BOOST_REQUIRE(live.ok());
    return std::find(live->begin(), live->end(), sandbox_id) != live->end();
  }
};

std::string types(const std::vector<nlohmann::json>& evs) {
  std::string out;
  for (const auto& e : evs)
    out += " " + e["type"].get<std::string>();
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_task_past_its_wall_clock_limit_is_killed_and_fails_naming_the_limit) {
  if (!can_run_sandboxes()) {
    BOOST_TEST_MESSAGE("skipped: needs root and runsc");
    return;
  }
  fixture f;
  const auto t0 = std::chrono::steady_clock::now();
  const auto id = f.submit("sleep 600", 2s);
  auto v = f.wait_finished(id, 60s);
  const auto took = std::chrono::steady_clock::now() - t0;
  BOOST_TEST_MESSAGE("ended after "
                     << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                     << " ms");
  BOOST_TEST(v.status == "failed");
  BOOST_TEST(v.reason == "wall-clock limit of 2s reached");
  BOOST_TEST(v.wall_clock_limit_ms == 2000u);
  BOOST_TEST((took >= 2s));
  BOOST_TEST((took < 30s), "the limit must end the task within seconds, not the command");
  BOOST_REQUIRE(v.limits_reached.size() == 1u);
  BOOST_TEST(v.limits_reached[0].kind == "task_wall_clock");
  BOOST_TEST(v.limits_reached[0].limit == 2000u);
  BOOST_TEST(v.limits_reached[0].whole_sandbox);
  // Not before the deadline, counted from the recorded change to running.
  BOOST_TEST(v.limits_reached[0].time_ns - v.running_since_ns >= 2'000'000'000);

  auto evs = f.events(id);
  BOOST_TEST_CONTEXT("events:" << types(evs)) {
    BOOST_TEST(evs.front()["data"]["wall_clock_limit_ms"] == 2000);
    auto limit = std::find_if(evs.begin(), evs.end(),
                              [](const auto& e) { return e["type"] == "limit_reached"; });
    BOOST_REQUIRE((limit != evs.end()));
    BOOST_TEST((*limit)["data"]["kind"] == "task_wall_clock");
    BOOST_TEST((*limit)["data"]["limit"] == 2000);
    BOOST_TEST((*limit)["data"]["whole_sandbox"] == true);
    // The limit is recorded before the sandbox is stopped, and the task's end is last.
    auto terminating = std::find_if(evs.begin(), evs.end(), [](const auto& e) {
      return e["type"] == "sandbox_state_changed" && e["data"]["to"] == "terminating";
    });
    BOOST_REQUIRE((terminating != evs.end()));
    BOOST_TEST((limit < terminating));
    BOOST_TEST(evs.back()["type"] == "task_finished");
    BOOST_TEST(evs.back()["data"]["reason"] == "wall-clock limit of 2s reached");
  }
  // The sandbox is gone: recorded so, and the runtime has nothing of it left.
  BOOST_TEST(v.sandbox_status == "terminated");
  BOOST_TEST(!f.sandbox_live(v.sandbox_id));
}

BOOST_AUTO_TEST_CASE(a_task_that_ends_within_its_limit_records_no_limit_and_its_timer_is_inert) {
  if (!can_run_sandboxes()) {
    BOOST_TEST_MESSAGE("skipped: needs root and runsc");
    return;
  }
  fixture f;
  const auto t0 = std::chrono::steady_clock::now();
  const auto id = f.submit("echo done", 4s);
  auto v = f.wait_finished(id, 60s);
  BOOST_TEST(v.status == "succeeded", v.reason);
  BOOST_TEST(v.wall_clock_limit_ms == 4000u);
  BOOST_REQUIRE_MESSAGE((std::chrono::steady_clock::now() - t0 < 4s),
                        "the task took longer than its limit here; the test proves nothing");
  const auto ended_at = f.events(id).size();
  // Past the deadline: the timer armed at the start has come and gone without a trace.
  std::this_thread::sleep_until(t0 + 5s);
  auto after = f.load(id);
  BOOST_TEST(after.limits_reached.empty());
  BOOST_TEST(after.status == "succeeded");
  auto evs = f.events(id);
  BOOST_TEST(evs.size() == ended_at, "events:" << types(evs));
  for (const auto& e : evs)
    BOOST_TEST(e["type"] != "limit_reached");
}

BOOST_AUTO_TEST_CASE(the_service_default_applies_when_the_request_names_no_limit) {
  if (!can_run_sandboxes()) {
    BOOST_TEST_MESSAGE("skipped: needs root and runsc");
    return;
  }
  fixture f;
  const auto id = f.submit("true", 0ms);
  auto v = f.wait_finished(id, 60s);
  BOOST_TEST(v.wall_clock_limit_ms == 4u * 3600 * 1000);  // task_deps' default: 4h
  BOOST_TEST(v.limits_reached.empty());
}
