// Supervision: a task actor that crashes is restarted from its events with backoff — the new
// incarnation fences the stream (actor_recovered), runs the lost turn again in a fresh sandbox
// and the task still succeeds; an actor that keeps crashing fails its task with the reason.
// Real journal, real gVisor sandboxes; the crash is an exception thrown from the task actors'
// fault seam (task_deps::fault). Needs root and runsc (skipped with a message otherwise).

#define BOOST_TEST_MODULE actors_supervision
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <thread>

#include <caf/all.hpp>

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
  std::mutex mu;
  std::map<std::string, int> crashes_left;  // task id → throws left at "output"

  explicit fixture(int crashes_per_task)
      : real_tasks("ferry-supervision", [this, crashes_per_task](fa::task_deps& deps) {
          deps.fault = [this, crashes_per_task](std::string_view point, const std::string& id) {
            if (point != "output")
              return;
            std::lock_guard<std::mutex> guard(mu);
            auto [it, fresh] = crashes_left.try_emplace(id, crashes_per_task);
            if (it->second > 0) {
              --it->second;
              throw std::runtime_error("injected crash at output");
            }
          };
        }) {}
  // The fault seam uses mu and crashes_left: the actors stop before they go.
  ~fixture() { stop(); }

  std::vector<std::pair<ev::Event, std::string>> events(const std::string& stream) {
    std::vector<std::pair<ev::Event, std::string>> out;
    auto n = store->for_each(stream, {}, [&](const ev::Envelope& e, std::string_view) {
      std::string note;
      if (e.event_type() == ev::Event::ActorRecovered)
        note = e.event_as_ActorRecovered()->reason()->str();
      else if (e.event_type() == ev::Event::SandboxStateChanged)
        note = e.event_as_SandboxStateChanged()->sandbox_id()->str() + ":" +
               std::string(sc::to_string(e.event_as_SandboxStateChanged()->to()));
      out.emplace_back(e.event_type(), note);
      return true;
    });
    BOOST_REQUIRE(n.ok());
    return out;
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(a_crashed_task_actor_is_restarted_from_its_events_and_the_task_succeeds) {
  if (!can_run_sandboxes()) {
    BOOST_TEST_MESSAGE("skipped: needs root and runsc");
    return;
  }
  fixture f(1);
  auto sub = f.tasks->submit({"echo one; sleep 0.2; echo two", "", "alice", "c1"});
  BOOST_REQUIRE(sub.ok());
  auto v = f.wait_finished(sub->id, 60s);
  BOOST_TEST(v.status == "succeeded", v.reason);
  auto evs = f.events("task-" + sub->id);
  int recovered = 0;
  std::set<std::string> sandboxes;
  for (const auto& [type, note] : evs) {
    if (type == ev::Event::ActorRecovered) {
      ++recovered;
      BOOST_TEST(note.find("actor crashed") != std::string::npos, note);
    }
    if (type == ev::Event::SandboxStateChanged)
      sandboxes.insert(note.substr(0, note.find(':')));
  }
  BOOST_TEST(recovered == 1);
  // The lost turn ran again in a fresh sandbox.
  BOOST_TEST(sandboxes.size() == 2u);
  // The session recorded both turns: the first ended interrupted, the second completed.
  auto session = f.events("session-" + sub->id);
  int turns = 0;
  for (const auto& [type, note] : session)
    turns += type == ev::Event::TurnStarted;
  BOOST_TEST(turns == 2);
  BOOST_TEST((session.back().first == ev::Event::SessionClosed));
}

BOOST_AUTO_TEST_CASE(an_actor_that_keeps_crashing_fails_its_task_with_the_reason) {
  if (!can_run_sandboxes()) {
    BOOST_TEST_MESSAGE("skipped: needs root and runsc");
    return;
  }
  fixture f(1000);
  const auto t0 = std::chrono::steady_clock::now();
  auto sub = f.tasks->submit({"echo again", "", "alice", "c2"});
  BOOST_REQUIRE(sub.ok());
  auto v = f.wait_finished(sub->id, 90s);
  BOOST_TEST(v.status == "failed");
  BOOST_TEST(v.reason.find("crashed 3 times") != std::string::npos, v.reason);
  BOOST_TEST(v.reason.find("injected crash") != std::string::npos, v.reason);
  // Backoff: 100 ms + 400 ms between the restarts at least.
  BOOST_TEST((std::chrono::steady_clock::now() - t0 >= 500ms));
  int recovered = 0;
  for (const auto& [type, note] : f.events("task-" + sub->id))
    recovered += type == ev::Event::ActorRecovered;
  BOOST_TEST(recovered == 3);
}
