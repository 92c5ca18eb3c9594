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
#include "ferry/test_support/temp_dir.h"

namespace fa = ferry::actors;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using namespace std::chrono_literals;

namespace {

bool can_run_sandboxes() {
  return ::geteuid() == 0 && std::system("runsc --version >/dev/null 2>&1") == 0;
}

struct fixture {
  ferry::test::temp_dir dir{"ferry-supervision"};
  std::unique_ptr<ferry::storage::event_store> store;
  std::unique_ptr<ferry::sandbox::sandbox_runtime> runtime;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<fa::task_service> tasks;
  std::mutex mu;
  std::map<std::string, int> crashes_left;  // task id → throws left at "output"

  explicit fixture(int crashes_per_task) {
    ferry::storage::journal_options o;
    o.dir = dir.path() / "journal";
    auto s = ferry::storage::open_journal(o);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    store = std::move(*s);
    ferry::sandbox::runsc_options ro;
    ro.state_dir = dir.path() / "runsc";
    ro.sandboxes_dir = dir.path() / "sandboxes";
    ro.init_binary = FERRY_INIT_BINARY;
    auto rt = ferry::sandbox::make_runsc_runtime(ro);
    BOOST_REQUIRE_MESSAGE(rt.ok(), (rt.ok() ? "" : rt.error().message));
    runtime = std::move(*rt);
    fa::add_message_types(cfg);
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    fa::task_deps deps;
    deps.store = store.get();
    deps.runtime = runtime.get();
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
    auto t = fa::start_task_manager(*sys, deps);
    BOOST_REQUIRE(t.ok());
    tasks = std::move(*t);
  }
  ~fixture() {
    (void)tasks->shutdown(20s);
    tasks.reset();
    sys.reset();
  }

  fa::task_view wait_finished(const std::string& id, std::chrono::seconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      auto v = fa::load_task_view(*store, id);
      BOOST_REQUIRE(v.ok());
      if (*v && (*v)->finished)
        return **v;
      BOOST_REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline,
                            "task " << id << " did not finish; status "
                                    << (*v ? (*v)->status : "none"));
      std::this_thread::sleep_for(20ms);
    }
  }

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
