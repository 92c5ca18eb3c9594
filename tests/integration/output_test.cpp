// Output of a task's command reaches the journal and the event stream complete, in order and
// before command_exited, however it is written: large buffered writes or thousands of tiny ones
// (which are batched: one journal append per batch, not per write).

#define BOOST_TEST_MODULE integration_output
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <string>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/http_client.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

ws_transcript watch(const api_client& api, const std::string& id) {
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events of task " << id << ": " << hs.summary());
  return read_until_close(ws, 120s);
}

std::string stream_text(const std::vector<json>& events, const std::string& which) {
  std::string out;
  for (const auto& e : events)
    if (str(e, "type") == "output_chunk" && str(data_of(e), "stream") == which)
      out += chunk_text(data_of(e));
  return out;
}

size_t count_type(const std::vector<json>& events, const std::string& type) {
  size_t n = 0;
  for (const auto& e : events)
    n += str(e, "type") == type;
  return n;
}

/// Every output_chunk comes before command_exited, and sequences have no gaps.
void check_order(const std::vector<json>& events) {
  int exited = find_event(events, "command_exited");
  BOOST_TEST_REQUIRE(exited >= 0, "no command_exited:" << describe_events(events));
  BOOST_TEST(find_event(events, "output_chunk", exited + 1) == -1,
             "output after command_exited");
  for (size_t i = 0; i < events.size(); ++i)
    BOOST_TEST(events[i]["seq"].get<uint64_t>() == i + 1);
}

}  // namespace

BOOST_AUTO_TEST_CASE(megabytes_of_output_arrive_whole_and_in_order) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};
  // ~1.9 MB on stdout in large buffered writes, a marker on stderr at the end.
  const auto t0 = std::chrono::steady_clock::now();
  auto id = submit_task(api, "seq 1 300000; echo done >&2");
  auto t = watch(api, id);
  BOOST_TEST_REQUIRE(t.closed_normally(), t.summary());
  BOOST_TEST_MESSAGE("1.9 MB task streamed in " << ms_since(t0) << " ms as "
                                                << count_type(t.events, "output_chunk")
                                                << " output_chunk events");
  std::string expected;
  for (int i = 1; i <= 300000; ++i)
    expected += std::to_string(i) + "\n";
  auto got = stream_text(t.events, "stdout");
  BOOST_TEST(got.size() == expected.size());
  BOOST_TEST((got == expected), "stdout differs from `seq 1 300000`");
  BOOST_TEST(stream_text(t.events, "stderr") == "done\n");
  check_order(t.events);
  auto task = api.get_task(id).json();
  BOOST_TEST_REQUIRE(task.has_value());
  BOOST_TEST(str(*task, "status") == "succeeded");
  BOOST_TEST((*task)["last_seq"].get<uint64_t>() == t.events.size());
}

BOOST_AUTO_TEST_CASE(interleaved_tiny_writes_to_both_streams_lose_nothing) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};
  // dash's echo builtin makes one write(2) per line; the streams alternate line by line.
  constexpr int lines = 3000;
  auto id = submit_task(api, "i=0; while [ $i -lt " + std::to_string(lines) +
                               " ]; do echo line$i; echo err$i >&2; i=$((i+1)); done");
  auto t = watch(api, id);
  BOOST_TEST_REQUIRE(t.closed_normally(), t.summary());
  std::string out, err;
  for (int i = 0; i < lines; ++i) {
    out += "line" + std::to_string(i) + "\n";
    err += "err" + std::to_string(i) + "\n";
  }
  BOOST_TEST((stream_text(t.events, "stdout") == out), "stdout lost or reordered lines");
  BOOST_TEST((stream_text(t.events, "stderr") == err), "stderr lost or reordered lines");
  check_order(t.events);
}

BOOST_AUTO_TEST_CASE(thousands_of_tiny_writes_do_not_become_thousands_of_events) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};
  constexpr int lines = 5000;
  auto id = submit_task(api, "i=0; while [ $i -lt " + std::to_string(lines) +
                               " ]; do echo line$i; i=$((i+1)); done");
  auto t = watch(api, id);
  BOOST_TEST_REQUIRE(t.closed_normally(), t.summary());
  std::string out;
  for (int i = 0; i < lines; ++i)
    out += "line" + std::to_string(i) + "\n";
  BOOST_TEST((stream_text(t.events, "stdout") == out), "stdout lost or reordered lines");
  check_order(t.events);
  auto chunks = count_type(t.events, "output_chunk");
  BOOST_TEST_MESSAGE(lines << " writes became " << chunks << " output_chunk events");
  // Writes that outpace the journal merge into larger chunks (one append per batch).
  BOOST_TEST(chunks < static_cast<size_t>(lines) / 2);
}
