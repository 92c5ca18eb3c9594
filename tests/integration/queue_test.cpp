// The task manager's job queue: a global and a per-user concurrency limit, fair across users
// (one user's 30 queued tasks do not starve another user's first), queue positions visible as
// task_queued events, and queued tasks that end cleanly when aborted or on shutdown.

#define BOOST_TEST_MODULE integration_queue
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <thread>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace ev = ferry::events::v1;

namespace {

std::string mint(const api_client& admin, const std::string& name) {
  http_response r = admin.authorized("POST", "/api/v1/tokens", R"({"name": ")" + name + R"("})");
  BOOST_TEST_REQUIRE(r.status == 201, "mint " << name << ": " << r.summary());
  return str(*r.json(), "token");
}

/// Submits and returns the whole answer (201 required).
json submit(const api_client& api, const std::string& command) {
  http_response r = api.submit(command);
  BOOST_TEST_REQUIRE(r.status == 201, "submit `" << command << "`: " << r.summary());
  return *r.json();
}

/// What the journal says about one task, read after ferryd stopped.
struct task_record {
  int64_t running_ns = 0;   // when it became running (0: never)
  int64_t finished_ns = 0;  // task_finished (0: never)
  std::string final_status;
  std::vector<uint32_t> positions;  // task_queued positions, in order
  bool had_sandbox = false;
};

task_record read_task(ferry::storage::event_store& store, const std::string& id) {
  task_record t;
  auto visited = store.for_each("task-" + id, {}, [&](const ev::Envelope& e, std::string_view) {
    switch (e.event_type()) {
      case ev::Event::TaskStateChanged:
        if (e.event_as_TaskStateChanged()->to() == ev::TaskStatus::running)
          t.running_ns = e.timestamp_ns();
        break;
      case ev::Event::TaskQueued: t.positions.push_back(e.event_as_TaskQueued()->position()); break;
      case ev::Event::SandboxStateChanged: t.had_sandbox = true; break;
      case ev::Event::TaskFinished:
        t.finished_ns = e.timestamp_ns();
        t.final_status =
          std::string(ferry::schemas::to_string(e.event_as_TaskFinished()->status()));
        break;
      default: break;
    }
    return true;
  });
  BOOST_REQUIRE_MESSAGE(visited.ok(), (visited.ok() ? "" : visited.error().message));
  return t;
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_second_users_first_task_starts_at_the_first_free_slot) {
  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = {"--max-running", "2", "--max-running-per-user", "2"};
  ferryd_process ferryd{opts};
  api_client admin(ferryd);
  api_client alice(ferryd.port(), mint(admin, "alice"));
  api_client bob(ferryd.port(), mint(admin, "bob"));

  // Alice fills both slots and queues 28 more.
  std::vector<std::string> alice_tasks;
  for (int i = 0; i < 30; ++i) {
    json a = submit(alice, "sleep 1");
    alice_tasks.push_back(str(a, "id"));
    if (i < 2) {
      BOOST_TEST(str(a, "status") == "running", a.dump());
    } else {
      BOOST_TEST(str(a, "status") == "queued", a.dump());
      BOOST_TEST(field(a, "queue_position") == json(i - 1), a.dump());
    }
  }
  // Bob's first task goes ahead of Alice's 28: he has nothing running.
  json b = submit(bob, "echo bob");
  const std::string bob_task = str(b, "id");
  BOOST_TEST(str(b, "status") == "queued", b.dump());
  BOOST_TEST(field(b, "queue_position") == json(1), b.dump());
  json queued = get_task_json(bob, bob_task);
  BOOST_TEST(str(queued, "status") == "queued");
  BOOST_TEST(field(queued, "queue_position") == json(1), queued.dump());

  // Bounded wait for Bob's task to end.
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline &&
         !field(get_task_json(bob, bob_task), "finished").get<bool>())
    std::this_thread::sleep_for(100ms);
  BOOST_TEST_REQUIRE(field(get_task_json(bob, bob_task), "finished").get<bool>(),
                     "bob's task did not finish within 60 s");
  // And for Alice's third task, which the next free slot must go to (bounded).
  while (std::chrono::steady_clock::now() < deadline &&
         str(get_task_json(alice, alice_tasks[2]), "status") == "queued")
    std::this_thread::sleep_for(50ms);
  // Abort one of Alice's queued tasks: it ends at once, without a sandbox.
  const std::string dropped = alice_tasks.back();
  BOOST_TEST(alice.abort(dropped).status == 200);

  auto data_dir = ferryd.data_dir();
  ferryd.stop();  // aborts the rest: running and queued alike

  ferry::storage::journal_options jo;
  jo.dir = data_dir / "journal";
  jo.create_if_missing = false;
  auto store = ferry::storage::open_journal(jo);
  BOOST_TEST_REQUIRE(store.ok(), (store.ok() ? "" : store.error().message));

  std::vector<task_record> a;
  for (const auto& id : alice_tasks)
    a.push_back(read_task(**store, id));
  task_record bt = read_task(**store, bob_task);
  BOOST_TEST_REQUIRE(bt.running_ns > 0, "bob's task never ran");
  BOOST_TEST(bt.final_status == "succeeded");
  int64_t first_alice_end = INT64_MAX;
  for (int i = 0; i < 2; ++i)
    if (a[i].finished_ns)
      first_alice_end = std::min(first_alice_end, a[i].finished_ns);
  BOOST_TEST(bt.running_ns >= first_alice_end, "bob ran before a slot was free");
  BOOST_TEST_REQUIRE(a[2].running_ns > 0, "alice's third task never ran");
  BOOST_TEST(bt.running_ns <= a[2].running_ns, "alice's third task started before bob's first");
  BOOST_TEST_MESSAGE("bob's task started " << (bt.running_ns - first_alice_end) / 1000
                                           << " µs after the first slot freed");

  // Positions are events: Alice's third task was first in line, then moved back behind Bob.
  BOOST_TEST_REQUIRE(!a[2].positions.empty());
  BOOST_TEST(a[2].positions.front() == 1u);
  const bool moved_back =
    std::find(a[2].positions.begin(), a[2].positions.end(), 2u) != a[2].positions.end();
  BOOST_TEST(moved_back, "alice's third task never recorded moving back to position 2");
  // Nothing hangs: every task ended; queued ones that never ran had no sandbox.
  for (size_t i = 0; i < a.size(); ++i) {
    BOOST_TEST(a[i].finished_ns > 0, "alice's task " << i << " never finished");
    if (a[i].running_ns == 0)
      BOOST_TEST(!a[i].had_sandbox, "a task that never ran had a sandbox");
  }
  task_record d = read_task(**store, dropped);
  BOOST_TEST(d.final_status == "aborted");
  BOOST_TEST(d.running_ns == 0);
}
