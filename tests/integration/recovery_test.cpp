// Crash recovery under load: ferryd is SIGKILLed while 16 tasks run (each printing numbered lines
// steadily) and 4 wait in the queue. The sandboxes outlive it. After the restart: no event a
// client had seen is lost or changed (every stream's earlier events are an exact prefix of its
// events now); every running task was recovered from its events and its sandbox re-attached, so
// it goes on printing where it was — every line exactly once, in order, or an explicit gap —
// none is left hanging, and the waiting ones start.

#define BOOST_TEST_MODULE recovery_test
#include <boost/test/unit_test.hpp>

#include <map>
#include <sstream>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

constexpr int running_tasks = 16;
constexpr int waiting_tasks = 4;
const std::string chatty_command =
  "i=0; while [ $i -lt 100000 ]; do echo \"line $i\"; i=$((i+1)); sleep 0.01; done";

/// Every event of task `id` the server sends until it closes the stream (bounded).
ws_transcript all_events(const api_client& api, const std::string& id,
                         std::chrono::milliseconds limit) {
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events of " << id << ": " << hs.summary());
  return read_until_close(ws, limit);
}

/// The events a viewer has seen so far (reads until `quiet` passes without a new frame).
std::vector<json> seen_so_far(const api_client& api, const std::string& id) {
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events of " << id << ": " << hs.summary());
  ws_transcript t;
  read_until_event(ws, t, [](const json&) { return false; }, 300ms);
  return t.events;
}

}  // namespace

BOOST_AUTO_TEST_CASE(sigkill_during_twenty_tasks_loses_no_seen_event_and_every_task_goes_on) {
  temp_dir dir("ferry-recovery");
  const auto data_dir = dir.path() / "data";
  ferryd_options opts(FERRYD_BINARY, data_dir);
  opts.extra_args = {"--max-running", std::to_string(running_tasks), "--max-running-per-user",
                     std::to_string(running_tasks)};
  std::optional<ferryd_process> first(std::in_place, opts);
  const std::string token = first->token();
  api_client api1(*first);

  std::vector<std::string> ids;
  std::vector<std::unique_ptr<sandbox_sweeper>> sweepers;
  for (int i = 0; i < running_tasks + waiting_tasks; ++i) {
    ids.push_back(submit_task(api1, chatty_command));
    sweepers.push_back(std::make_unique<sandbox_sweeper>(ids.back()));
  }
  // The first 16 run and print; the last 4 wait.
  for (int i = 0; i < running_tasks; ++i) {
    std::string last;
    auto t = api1.wait_for_task(
      ids[i],
      [](const json& t) {
        return sandbox_status(t) == "executing" && field(t, "last_seq").get<long>() >= 12;
      },
      120s, &last);
    BOOST_TEST_REQUIRE(t.has_value(), "task " << i << " not running with output; last: " << last);
  }
  for (int i = running_tasks; i < running_tasks + waiting_tasks; ++i)
    BOOST_TEST(str(get_task_json(api1, ids[i]), "status") == "queued");

  // What clients have seen: delivered to a viewer means durable (the journal publishes only
  // what it has fsynced).
  std::map<std::string, std::vector<json>> before;
  size_t seen = 0;
  for (const auto& id : ids) {
    before[id] = seen_so_far(api1, id);
    seen += before[id].size();
  }
  BOOST_TEST_MESSAGE("events seen before the crash: " << seen);

  first->crash();
  const auto t0 = std::chrono::steady_clock::now();
  ferryd_process second(ferryd_options(FERRYD_BINARY, data_dir, token));
  BOOST_TEST_MESSAGE("restart ready in " << ms_since(t0) << " ms");
  api_client api(second);
  // Everything stored before the crash is in the journal now: output past these marks is output
  // the re-attached sandboxes produced after the restart.
  std::map<std::string, long> at_restart;
  for (const auto& id : ids)
    at_restart[id] = field(get_task_json(api, id), "last_seq").get<long>();

  // Every task that ran goes on in its re-attached sandbox: more output, no line twice, no line
  // missing unless an explicit gap says so. Then it is aborted (bounded: none hangs).
  for (int i = 0; i < running_tasks; ++i) {
    BOOST_TEST_CONTEXT("task " << i << " " << ids[i]) {
      const auto& pre = before[ids[i]];
      std::string last;
      auto t = api.wait_for_task(
        ids[i],
        [&](const json& t) {
          return str(t, "status") == "running" &&
                 field(t, "last_seq").get<long>() > at_restart[ids[i]] + 10;
        },
        60s, &last);
      BOOST_TEST_REQUIRE(t.has_value(), "not going on after the restart; last: " << last);
      BOOST_TEST(sandbox_status(*t) == "executing");
      http_response r = api.abort(ids[i]);
      BOOST_TEST((r.status == 200 || r.status == 202), "abort: " << r.summary());
      ws_transcript after = all_events(api, ids[i], 30s);
      check_clean_stream(after, "viewer after the restart");
      BOOST_TEST_REQUIRE(after.events.size() > pre.size());
      // An exact prefix: same seq, type, id and data for every event seen before.
      for (size_t k = 0; k < pre.size(); ++k)
        BOOST_TEST(after.events[k] == pre[k], "event " << k << " changed or lost: before "
                                                       << pre[k].dump() << " after "
                                                       << after.events[k].dump());
      check_envelopes(after.events, ids[i], 1);
      BOOST_TEST(str(data_of(after.events.back()), "status") == "aborted",
                 "events from " << pre.size() << ":"
                                << describe_events(std::vector<json>(
                                     after.events.begin() + static_cast<long>(pre.size()),
                                     after.events.end())));
      // The lines: 0, 1, 2, … each once; a gap may only skip lines it accounts for.
      std::string out;
      int recovered = 0, gaps = 0, started = 0;
      for (const auto& e : after.events) {
        const auto type = str(e, "type");
        recovered += type == "actor_recovered";
        started += type == "command_started";
        if (type != "output_chunk" || str(data_of(e), "stream") != "stdout")
          continue;
        if (data_of(e).contains("lost_bytes")) {
          ++gaps;
          out += "<gap>\n";
        }
        out += chunk_text(data_of(e));
      }
      BOOST_TEST(recovered >= 1);
      BOOST_TEST(started == 1, "one command, re-attached, not started again");
      std::istringstream lines(out);
      std::string line;
      long expect = 0, count = 0;
      bool after_gap = false;
      while (std::getline(lines, line)) {
        if (line == "<gap>") {
          after_gap = true;
          continue;
        }
        if (line.rfind("line ", 0) != 0) {
          BOOST_TEST(lines.eof(), "not a line of the command: " << line);  // a cut last line
          continue;
        }
        long n = std::stol(line.substr(5));
        if (after_gap)
          BOOST_TEST(n > expect - 1, "a gap went backwards at line " << n);
        else
          BOOST_TEST(n == expect, "line " << n << " where " << expect << " was due");
        expect = n + 1;
        after_gap = false;
        ++count;
      }
      BOOST_TEST(gaps == 0, "output lost while ferryd was down (the buffer holds 8 MiB)");
      BOOST_TEST(count > 30);
    }
  }
  // The waiting ones kept their place and start now that slots are free.
  for (int i = running_tasks; i < running_tasks + waiting_tasks; ++i) {
    BOOST_TEST_CONTEXT("waiting task " << ids[i]) {
      std::string last;
      auto t = api.wait_for_task(
        ids[i], [](const json& t) { return sandbox_status(t) == "executing"; }, 60s, &last);
      BOOST_TEST(t.has_value(), "a queued task did not start after the restart; last: " << last);
      http_response r = api.abort(ids[i]);
      BOOST_TEST((r.status == 200 || r.status == 202), "abort: " << r.summary());
      auto ended = api.wait_for_task(
        ids[i], [](const json& t) { return str(t, "status") == "aborted"; }, 10s, &last);
      BOOST_TEST(ended.has_value(), "not aborted; last: " << last);
    }
  }
  for (const auto& id : ids)
    BOOST_TEST(eventually([&] { return sandbox_processes(id).empty(); }, 10s),
               "sandbox processes of " << id << " left: " << describe(sandbox_processes(id)));
}
