#pragma once
// Checks shared by the integration tests: submitting a task, the shape of an error answer, the
// envelope every event carries, and the state chains events must follow. They record Boost.Test
// assertions at the caller's test case.

#include <boost/test/unit_test.hpp>

#include <signal.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/http_client.h"
#include "ferry/test_support/processes.h"

namespace ferry::test {

inline std::string lowercase(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

/// Submits `command`; requires 201 with a hex "id" and returns the id.
inline std::string submit_task(const api_client& api, const std::string& command) {
  const auto t0 = std::chrono::steady_clock::now();
  http_response r = api.submit(command);
  BOOST_TEST_MESSAGE("POST /api/v1/tasks (" << command << ") answered in " << ms_since(t0)
                                            << " ms");
  BOOST_TEST_REQUIRE(r.status == 201, "submitting `" << command << "`: " << r.summary());
  auto j = r.json();
  BOOST_TEST_REQUIRE((j && j->is_object()), "submit answer is not a JSON object: " << r.summary());
  const std::string id = str(*j, "id");
  BOOST_TEST_REQUIRE(!id.empty(), "submit answer has no string id: " << r.summary());
  BOOST_TEST((std::all_of(id.begin(), id.end(),
                          [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); })),
             "task id is not hex: " << id);
  return id;
}

/// The answer is `status` with a JSON body {"error": "<non-empty string>"}; returns the message.
inline std::string expect_json_error(const http_response& r, int status, const std::string& what) {
  BOOST_TEST_CONTEXT(what << " -> " << r.summary()) {
    BOOST_TEST(r.status == status);
    BOOST_TEST(r.header("content-type").find("application/json") != std::string::npos,
               "content-type is \"" << r.header("content-type") << "\"");
    auto j = r.json();
    BOOST_TEST((j && j->is_object() && !str(*j, "error").empty()),
               "body is not {\"error\": \"...\"}");
    return j ? str(*j, "error") : std::string();
  }
  return {};
}

/// GET /api/v1/tasks/{id}; requires 200 with a JSON object.
inline nlohmann::json get_task_json(const api_client& api, const std::string& id) {
  http_response r = api.get_task(id);
  BOOST_TEST_REQUIRE(r.status == 200, "GET task " << id << ": " << r.summary());
  auto j = r.json();
  BOOST_TEST_REQUIRE((j && j->is_object()), "GET task " << id << ": " << r.summary());
  return *j;
}

/// j[key] if j is an object that has it, else null (never throws, never asserts).
inline nlohmann::json field(const nlohmann::json& j, const char* key) {
  return j.is_object() && j.contains(key) ? j[key] : nlohmann::json();
}

/// The event's data object (an empty object if it has none).
inline nlohmann::json data_of(const nlohmann::json& event) {
  nlohmann::json d = field(event, "data");
  return d.is_object() ? d : nlohmann::json::object();
}

inline std::string sandbox_status(const nlohmann::json& task) {
  return str(field(task, "sandbox"), "status");
}

/// Every event belongs to stream task-<id>, seqs run first_seq, first_seq+1, ... without gaps,
/// positions increase strictly, and time/type/data are present.
inline void check_envelopes(const std::vector<nlohmann::json>& events, const std::string& task_id,
                            long first_seq) {
  BOOST_TEST_CONTEXT("events:" << describe_events(events)) {
    long expected_seq = first_seq;
    double last_position = -1;
    for (const auto& e : events) {
      BOOST_TEST_REQUIRE(e.is_object(), "event is not an object: " << e.dump());
      BOOST_TEST(str(e, "stream") == "task-" + task_id);
      BOOST_TEST_REQUIRE((e.contains("seq") && e["seq"].is_number_integer()),
                         "no integer seq in " << e.dump());
      BOOST_TEST(e["seq"].get<long>() == expected_seq, "seq gap or reorder at " << e.dump());
      expected_seq = e["seq"].get<long>() + 1;
      if (e.contains("position") && e["position"].is_number()) {
        BOOST_TEST(e["position"].get<double>() > last_position,
                   "position does not increase at " << e.dump());
        last_position = e["position"].get<double>();
      } else {
        BOOST_ERROR("no numeric position in " << e.dump());
      }
      BOOST_TEST(!str(e, "time").empty(), "no time in " << e.dump());
      BOOST_TEST(!str(e, "type").empty(), "no type in " << e.dump());
      BOOST_TEST((e.contains("data") && e["data"].is_object()), "no data object in " << e.dump());
    }
  }
}

/// The `from`/`to` fields of the events of `type` form one chain starting at `initial`
/// (each from == the previous to). Returns the states visited, initial first.
inline std::vector<std::string> check_state_chain(const std::vector<nlohmann::json>& events,
                                                  const std::string& type,
                                                  const std::string& initial) {
  std::vector<std::string> states{initial};
  for (const auto& e : events) {
    if (str(e, "type") != type)
      continue;
    const nlohmann::json d = data_of(e);
    BOOST_TEST(str(d, "from") == states.back(),
               type << " does not continue from \"" << states.back() << "\": " << e.dump());
    states.push_back(str(d, "to"));
  }
  return states;
}

/// Text of an output_chunk's data (decoding base64 chunks).
inline std::string chunk_text(const nlohmann::json& data) {
  if (data.contains("text") && data["text"].is_string())
    return data["text"].get<std::string>();
  return base64_decode(str(data, "base64")).value_or("");
}

/// Reads frames from `ws` into `t` until an event satisfies `stop` (true), the stream ends, or
/// `timeout` passes (false).
inline bool read_until_event(ws_client& ws, ws_transcript& t,
                             const std::function<bool(const nlohmann::json&)>& stop,
                             std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      t.timed_out = true;
      return false;
    }
    ws_message m = ws.read(left);
    switch (m.what) {
      case ws_message::kind::text: {
        auto j = nlohmann::json::parse(m.data, nullptr, false);
        if (j.is_discarded()) {
          t.invalid_frames.push_back(m.data);
          break;
        }
        t.events.push_back(j);
        if (stop(j))
          return true;
        break;
      }
      case ws_message::kind::binary:
        t.invalid_frames.push_back("(binary frame)");
        break;
      case ws_message::kind::closed:
        t.closed = true;
        t.close_code = m.close_code;
        t.close_reason = m.close_reason;
        return false;
      case ws_message::kind::timeout:
        t.timed_out = true;
        return false;
      case ws_message::kind::error:
        t.error = m.data;
        return false;
    }
  }
}

/// A viewer's whole stream: upgraded, only JSON text frames, ended by a normal close.
inline void check_clean_stream(const ws_transcript& t, const std::string& who) {
  BOOST_TEST_CONTEXT(who << ": " << t.summary()) {
    BOOST_TEST(t.invalid_frames.empty());
    BOOST_TEST(!t.timed_out, "the server did not close the stream after the task ended");
    BOOST_TEST(t.error.empty());
    BOOST_TEST(t.closed_normally(), "expected a close frame with code 1000");
  }
}

/// Host processes of task `task_id`'s sandbox: those with "ferry-<id>" in their command line —
/// but not ferryd's `runsc delete` helper, which removes a sandbox's state after its last
/// process is gone (that cleanup may outlast the task's end by a second or two).
inline std::vector<process_info> sandbox_processes(const std::string& task_id) {
  auto all = processes_with_cmdline_containing("ferry-" + task_id);
  std::vector<process_info> out;
  for (auto& p : all)
    if (p.cmdline.find(" delete --force ") == std::string::npos)
      out.push_back(std::move(p));
  return out;
}

/// At scope exit, SIGKILLs whatever host processes of the task's sandbox are still alive, so a
/// failed test does not leak a gVisor sandbox into later ones. (A passing test leaves none:
/// the tests check that before this runs.)
class sandbox_sweeper {
 public:
  explicit sandbox_sweeper(std::string task_id) : task_id_(std::move(task_id)) {}
  ~sandbox_sweeper() {
    auto left = sandbox_processes(task_id_);
    for (const auto& p : left)
      ::kill(p.pid, SIGKILL);
    if (!left.empty())
      BOOST_TEST_MESSAGE("killed leftover processes of ferry-" << task_id_ << ": " << describe(left));
  }
  sandbox_sweeper(const sandbox_sweeper&) = delete;
  sandbox_sweeper& operator=(const sandbox_sweeper&) = delete;

 private:
  std::string task_id_;
};

}  // namespace ferry::test
