// Control subjects: abort, steer and egress approvals travel as NATS requests on
// ferry.ctl.task.<id>.{abort,steer,approve} with an acknowledgement, so any gateway (or tool)
// connected to the same NATS can control any task. The REST endpoints go through the same
// subjects. Steering comments and approvals are persisted at once.

#define BOOST_TEST_MODULE integration_control
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <string>
#include <thread>

#include "ferry/actors/bus.h"
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

/// Waits (bounded) until GET says `status`.
json wait_for_status(const api_client& api, const std::string& id, const std::string& status,
                     std::chrono::seconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  json t = get_task_json(api, id);
  while (str(t, "status") != status && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
    t = get_task_json(api, id);
  }
  return t;
}

json request(ferry::actors::bus& bus, const std::string& subject, const json& body) {
  auto answer = bus.request(subject, body.dump(), 10s);
  BOOST_TEST_REQUIRE(answer.ok(), subject << ": " << (answer.ok() ? "" : answer.error().message));
  auto j = json::parse(*answer, nullptr, false);
  BOOST_TEST_REQUIRE(j.is_object(), subject << " answered " << *answer);
  return j;
}

}  // namespace

BOOST_AUTO_TEST_CASE(steer_is_persisted_at_once_and_abort_over_nats_preempts_the_task) {
  temp_dir nats_dir("ferry-nats");
  auto nats = ferry::actors::start_embedded_nats("nats-server", nats_dir.path() / "store");
  BOOST_TEST_REQUIRE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  auto bus = ferry::actors::connect_nats((*nats)->url());
  BOOST_TEST_REQUIRE(bus.ok());

  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = {"--nats-url", (*nats)->url()};
  ferryd_process ferryd(opts);
  api_client api(ferryd);

  const std::string id = submit_task(api, "sleep 60");
  sandbox_sweeper sweep(id);
  BOOST_TEST_REQUIRE(str(wait_for_status(api, id, "running", 30s), "status") == "running");

  // REST steer → 202 with the sequence the comment got.
  http_response r = api.authorized("POST", "/api/v1/tasks/" + id + "/steer",
                                   R"({"text": "use tabs, not spaces"})");
  BOOST_TEST_REQUIRE(r.status == 202, r.summary());
  const auto rest_seq = field(*r.json(), "seq");
  BOOST_TEST(rest_seq.is_number_unsigned(), r.summary());

  // The same over NATS, from outside ferryd.
  json steered = request(**bus, ferry::actors::task_control_subject(id, "steer"),
                         {{"user", "ops"}, {"text", "and add a test"}});
  BOOST_TEST_REQUIRE(steered.contains("seq"), steered.dump());
  BOOST_TEST(steered["seq"].get<uint64_t>() > rest_seq.get<uint64_t>());

  // Bad requests: clear errors, never a crash.
  expect_json_error(api.authorized("POST", "/api/v1/tasks/" + id + "/steer", R"({"text": ""})"),
                    400, "empty steering text");
  expect_json_error(api.authorized("POST", "/api/v1/tasks/" + id + "/steer",
                                   json{{"text", std::string(20000, 'x')}}.dump()),
                    413, "steering text over 16 KiB");
  expect_json_error(api.authorized("GET", "/api/v1/tasks/" + id + "/steer"), 405, "GET steer");
  json bad = request(**bus, ferry::actors::task_control_subject(id, "steer"), json::array());
  BOOST_TEST(str(bad, "code") == "invalid_argument", bad.dump());
  json unknown = request(**bus, ferry::actors::task_control_subject("00ff00ff", "abort"),
                         {{"user", "ops"}});
  BOOST_TEST(str(unknown, "outcome") == "not_found", unknown.dump());

  // An egress approval over NATS: recorded (normalised) and in the task's view; a destination
  // that is none is refused by the task before anything is recorded.
  json approved = request(**bus, ferry::actors::task_control_subject(id, "approve"),
                          {{"user", "ops"}, {"destination", "Registry.Example.ORG.:443"}});
  BOOST_TEST_REQUIRE(approved.contains("seq"), approved.dump());
  for (const char* bad_destination : {"a b", "*.", "example.com:0", "http://example.com"}) {
    json refused = request(**bus, ferry::actors::task_control_subject(id, "approve"),
                           {{"user", "ops"}, {"destination", bad_destination}});
    BOOST_TEST(str(refused, "code") == "invalid_argument", bad_destination << ": " << refused.dump());
  }
  json no_destination = request(**bus, ferry::actors::task_control_subject(id, "approve"), {{"user", "ops"}});
  BOOST_TEST(str(no_destination, "code") == "invalid_argument", no_destination.dump());
  BOOST_TEST(field(get_task_json(api, id), "egress")["approvals"] == json::array({"registry.example.org:443"}));

  // Abort over NATS: acknowledged once the task ended, and nothing of its sandbox is left.
  const auto t0 = std::chrono::steady_clock::now();
  json aborted = request(**bus, ferry::actors::task_control_subject(id, "abort"),
                         {{"user", "ops"}, {"reason", "stop via nats"}, {"wait_ms", 5000}});
  const auto ms =
    std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  BOOST_TEST_MESSAGE("abort over NATS acknowledged in " << ms.count() << " ms");
  BOOST_TEST(str(aborted, "outcome") == "aborted", aborted.dump());
  BOOST_TEST(sandbox_processes(id).empty(), "processes of the aborted sandbox are left");
  json t = get_task_json(api, id);
  BOOST_TEST(str(t, "status") == "aborted", t.dump());

  // Steering an ended task is a conflict; a second abort says it already finished.
  expect_json_error(api.authorized("POST", "/api/v1/tasks/" + id + "/steer", R"({"text": "x"})"),
                    409, "steer after the end");
  json again = request(**bus, ferry::actors::task_control_subject(id, "abort"), {{"user", "ops"}});
  BOOST_TEST((str(again, "outcome") == "not_found" || str(again, "outcome") == "already_finished"),
             again.dump());

  auto data_dir = ferryd.data_dir();
  ferryd.stop();
  ferry::storage::journal_options jo;
  jo.dir = data_dir / "journal";
  jo.create_if_missing = false;
  auto store = ferry::storage::open_journal(jo);
  BOOST_TEST_REQUIRE(store.ok(), (store.ok() ? "" : store.error().message));
  std::vector<std::pair<std::string, std::string>> comments;  // (user, text)
  std::string abort_user;
  auto visited = (*store)->for_each("task-" + id, {}, [&](const ev::Envelope& e, std::string_view) {
    if (e.event_type() == ev::Event::SteeringComment)
      comments.emplace_back(e.user()->str(), e.event_as_SteeringComment()->text()->str());
    if (e.event_type() == ev::Event::AbortRequested)
      abort_user = e.user()->str();
    return true;
  });
  BOOST_TEST_REQUIRE(visited.ok());
  BOOST_TEST_REQUIRE(comments.size() == 2u);
  BOOST_TEST(comments[0].second == "use tabs, not spaces");
  BOOST_TEST(comments[1].first == "ops");
  BOOST_TEST(comments[1].second == "and add a test");
  BOOST_TEST(abort_user == "ops");
}

BOOST_AUTO_TEST_CASE(abort_still_preempts_when_nats_is_down) {
  // The REST abort goes through the control subject; with NATS unreachable it must not wait
  // for it: the serving ferryd aborts the task itself.
  temp_dir nats_dir("ferry-nats");
  auto nats = ferry::actors::start_embedded_nats("nats-server", nats_dir.path() / "store");
  BOOST_TEST_REQUIRE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = {"--nats-url", (*nats)->url()};
  ferryd_process ferryd(opts);
  api_client api(ferryd);

  const std::string id = submit_task(api, "sleep 60");
  sandbox_sweeper sweep(id);
  BOOST_TEST_REQUIRE(str(wait_for_status(api, id, "running", 30s), "status") == "running");
  (*nats)->stop();

  const auto t0 = std::chrono::steady_clock::now();
  http_response r = api.abort(id);
  const auto ms =
    std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  BOOST_TEST_MESSAGE("abort with NATS down answered in " << ms.count() << " ms");
  BOOST_TEST(r.status == 200, r.summary());
  BOOST_TEST(ms.count() < 3000, "the abort waited for the unreachable NATS");
  BOOST_TEST(str(get_task_json(api, id), "status") == "aborted");
  BOOST_TEST(sandbox_processes(id).empty(), "processes of the aborted sandbox are left");
}
