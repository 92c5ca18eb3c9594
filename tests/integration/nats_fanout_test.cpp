// ferryd publishes every stored event of a task on NATS subject `ferry.ev.task.<id>`, in order,
// as the same envelope bytes the journal holds; with --nats-url it uses that server and starts
// no nats-server of its own.

#define BOOST_TEST_MODULE integration_nats_fanout
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ferry/actors/bus.h"
#include "ferry/schemas/events.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
namespace ev = ferry::events::v1;

namespace {

/// Collects what arrives on a subject.
struct collector {
  std::mutex mtx;
  std::condition_variable cv;
  std::vector<std::pair<std::string, std::string>> messages;  // subject, payload

  bool wait_for_type(ev::Event type, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mtx);
    return cv.wait_for(lock, timeout, [&] {
      for (auto& [subject, payload] : messages)
        if (auto e = ferry::schemas::verify_envelope(payload); e && (*e)->event_type() == type)
          return true;
      return false;
    });
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(every_event_is_published_on_the_task_subject_of_an_external_nats) {
  temp_dir nats_dir("ferry-nats");
  auto nats = ferry::actors::start_embedded_nats("nats-server", nats_dir.path() / "store");
  BOOST_TEST_REQUIRE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  auto bus = ferry::actors::connect_nats((*nats)->url());
  BOOST_TEST_REQUIRE(bus.ok(), (bus.ok() ? "" : bus.error().message));

  collector got;
  auto sub = (*bus)->subscribe("ferry.ev.task.*", [&](std::string_view subject,
                                                      std::string_view payload) {
    std::lock_guard<std::mutex> guard(got.mtx);
    got.messages.emplace_back(std::string(subject), std::string(payload));
    got.cv.notify_all();
  });
  BOOST_TEST_REQUIRE(sub.ok());

  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = {"--nats-url", (*nats)->url()};
  ferryd_process ferryd(opts);
  api_client api(ferryd);
  // ferryd must not have started a nats-server of its own.
  BOOST_TEST(processes_with_cmdline_containing(ferryd.data_dir().string() + "/nats").empty());

  auto id = submit_task(api, "echo one; echo two >&2");
  BOOST_TEST_REQUIRE(got.wait_for_type(ev::Event::TaskFinished, 60s),
                     "no task_finished on NATS within 60 s");
  ferryd.stop();

  // What NATS carried is exactly the task's stream: seq 1..N in order, on its subject, and
  // byte-identical to what the journal stored (as read back by ferryctl).
  std::vector<std::string> payloads;
  {
    std::lock_guard<std::mutex> guard(got.mtx);
    for (auto& [subject, payload] : got.messages) {
      BOOST_TEST(subject == "ferry.ev.task." + id);
      payloads.push_back(payload);
    }
  }
  BOOST_TEST_REQUIRE(payloads.size() >= 8u);
  std::vector<std::string> types;
  for (size_t i = 0; i < payloads.size(); ++i) {
    auto e = ferry::schemas::verify_envelope(payloads[i]);
    BOOST_TEST_REQUIRE(e.ok(), "NATS payload " << i << " is not an envelope");
    BOOST_TEST((*e)->sequence() == i + 1);
    BOOST_TEST((*e)->stream_id()->str() == "task-" + id);
    types.emplace_back(ferry::schemas::event_type_name((*e)->event_type()));
  }
  BOOST_TEST(types.front() == "task_submitted");
  BOOST_TEST(types.back() == "task_finished");

  program_run run = run_program({FERRYCTL_BINARY, "--data-dir", ferryd.data_dir().string(),
                                 "events", "show", "task-" + id, "--json"},
                                30s);
  BOOST_TEST_REQUIRE(run.status.ok(), run.summary());
  std::vector<std::string> journal_lines;
  std::string line;
  for (char c : run.out) {
    if (c == '\n') {
      journal_lines.push_back(line);
      line.clear();
    } else {
      line += c;
    }
  }
  BOOST_TEST_REQUIRE(journal_lines.size() == payloads.size());
  for (size_t i = 0; i < payloads.size(); ++i) {
    auto e = ferry::schemas::verify_envelope(payloads[i]);
    auto from_nats = ferry::schemas::to_json(**e);
    BOOST_TEST(from_nats == nlohmann::json::parse(journal_lines[i]),
               "event " << i + 1 << " differs between NATS and the journal");
  }
}
