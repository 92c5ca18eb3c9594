// Steer and abort on the task's event WebSocket: the client sends {"type": "steer" | "abort",
// "id": ...} text messages on the socket it reads events from, and each is answered there with
// an "ack" (steer: the comment's seq; abort: the outcome) or an "error" (code + message). They
// go the way the REST calls go (control subjects, abort falling back to the local task manager
// with NATS down), in the name of the token that opened the socket. Bad or hostile messages are
// answered with errors and the stream keeps working; requests in flight are bounded per socket.

#define BOOST_TEST_MODULE integration_ws_control
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ferry/actors/bus.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

struct minted {
  std::string token;
  std::string id;  ///< the token id events record as their user
};

minted mint(const api_client& admin, const std::string& name) {
  http_response r = admin.authorized("POST", "/api/v1/tokens", json{{"name", name}}.dump());
  BOOST_TEST_REQUIRE(r.status == 201, "minting " << name << ": " << r.summary());
  auto j = *r.json();
  BOOST_TEST_REQUIRE((!str(j, "token").empty() && !str(j, "id").empty()), r.summary());
  return {str(j, "token"), str(j, "id")};
}

void wait_until_running(const api_client& api, const std::string& id) {
  std::string last;
  auto t = api.wait_for_task(
    id, [](const json& t) { return str(t, "status") == "running"; }, 60s, &last);
  BOOST_TEST_REQUIRE(t.has_value(), "task " << id << " never ran: " << last);
}

/// Everything read from one event socket, split into the task's events and the answers to the
/// client's messages.
struct socket_log {
  std::vector<json> events;   ///< frames with a "stream": the task's events
  std::vector<json> replies;  ///< "ack" and "error" frames, in arrival order
  std::vector<std::string> other;  ///< anything else (must stay empty)
  bool closed = false;
  int close_code = 0;
  std::string ended;  ///< why reading stopped without `done` (closed, timeout, error)
  std::string summary() const {
    std::string s = std::to_string(events.size()) + " events, " +
                    std::to_string(replies.size()) + " replies";
    if (!other.empty())
      s += ", " + std::to_string(other.size()) + " unexpected frames, first: " + other.front();
    if (!ended.empty())
      s += ", " + ended;
    if (!replies.empty())
      s += ", last reply: " + replies.back().dump().substr(0, 400);
    return s + "; events:" + describe_events(events);
  }
};

bool is_reply(const json& j) {
  return j.is_object() && !j.contains("stream") &&
         (str(j, "type") == "ack" || str(j, "type") == "error");
}

/// Reads frames into `log` until `done(log)` holds (true) or the socket closes, fails or
/// `timeout` passes (false).
bool read_until(ws_client& ws, socket_log& log, const std::function<bool(const socket_log&)>& done,
                std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done(log)) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      log.ended = "timed out";
      return false;
    }
    ws_message m = ws.read(left);
    if (m.what == ws_message::kind::text) {
      auto j = json::parse(m.data, nullptr, false);
      if (is_reply(j))
        log.replies.push_back(std::move(j));
      else if (j.is_object() && j.contains("stream"))
        log.events.push_back(std::move(j));
      else
        log.other.push_back(m.data.substr(0, 200));
      continue;
    }
    if (m.what == ws_message::kind::binary) {
      log.other.push_back("(binary frame)");
      continue;
    }
    log.closed = m.what == ws_message::kind::closed;
    log.close_code = m.close_code;
    log.ended = m.summary();
    return false;
  }
  return true;
}

/// The reply whose id is `id`, or null.
const json* reply_for(const socket_log& log, const json& id) {
  for (const auto& r : log.replies)
    if (field(r, "id") == id)
      return &r;
  return nullptr;
}

size_t count_replies(const socket_log& log, const json& id) {
  size_t n = 0;
  for (const auto& r : log.replies)
    n += field(r, "id") == id;
  return n;
}

void send_ok(ws_client& ws, const std::string& payload, bool binary = false) {
  const std::string error = ws.send(payload, binary);
  BOOST_TEST_REQUIRE(error.empty(), "sending a " << payload.size() << "-byte message: " << error);
}

void send_json(ws_client& ws, const json& message) { send_ok(ws, message.dump()); }

/// Steers over the socket and waits for both the ack and the steering_comment event it names;
/// returns the ack.
json steer_and_see_it(ws_client& ws, socket_log& log, const std::string& text,
                      const std::string& id, const std::string& user) {
  send_json(ws, {{"type", "steer"}, {"text", text}, {"id", id}});
  auto comment_seen = [&](const socket_log& l) {
    const json* ack = reply_for(l, id);
    if (!ack)
      return false;
    return find_event(l.events, "steering_comment", 0, [&](const json& d) {
             return str(d, "text") == text;
           }) >= 0;
  };
  BOOST_TEST_REQUIRE(read_until(ws, log, comment_seen, 20s),
                     "steer " << id << ": no ack or no steering_comment event: " << log.summary());
  const json ack = *reply_for(log, id);
  BOOST_TEST_REQUIRE(str(ack, "type") == "ack", "steer " << id << " answered " << ack.dump());
  BOOST_TEST(field(ack, "ok") == json(true), ack.dump());
  BOOST_TEST(str(ack, "op") == "steer", ack.dump());
  BOOST_TEST_REQUIRE(field(ack, "seq").is_number_unsigned(), ack.dump());
  const int at = find_event(log.events, "steering_comment", 0,
                            [&](const json& d) { return str(d, "text") == text; });
  const json& event = log.events[static_cast<size_t>(at)];
  BOOST_TEST(field(event, "seq") == field(ack, "seq"),
             "the ack's seq is not the steering_comment's: " << ack.dump() << " vs "
                                                              << event.dump());
  BOOST_TEST(str(event, "user") == user, "recorded as another user: " << event.dump());
  return ack;
}

/// A bad message and the error it must be answered with.
struct bad_message {
  std::string what;
  std::string payload;
  bool binary = false;
  json id;  ///< the id the error must carry (null when the message has none we can read)
  std::string code;
};

}  // namespace

BOOST_AUTO_TEST_CASE(steer_and_abort_on_the_event_socket_are_acknowledged_and_their_events_follow) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client admin(ferryd);
  const minted alice_token = mint(admin, "alice");
  const minted bob_token = mint(admin, "bob");
  api_client alice(ferryd.port(), alice_token.token);
  api_client bob(ferryd.port(), bob_token.token);

  const std::string id = submit_task(alice, "sleep 30");
  sandbox_sweeper sweep(id);
  wait_until_running(alice, id);

  ws_client ws;
  ws_handshake hs = alice.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
  socket_log log;

  // Steer: acknowledged with the sequence of the steering_comment event that then arrives on
  // the same socket, recorded in the name of the socket's token.
  const auto t0 = std::chrono::steady_clock::now();
  const json first = steer_and_see_it(ws, log, "use tabs, not spaces", "s1", alice_token.id);
  BOOST_TEST_MESSAGE("steer over the socket: ack and event within " << ms_since(t0) << " ms");

  // Bad messages: each is answered with an error naming what is wrong; the stream goes on.
  const std::vector<bad_message> bad = {
    {"not JSON", "this is not json", false, nullptr, "bad_json"},
    {"an empty message", "", false, nullptr, "bad_json"},
    {"a JSON array", "[1, 2, 3]", false, nullptr, "bad_message"},
    {"an unknown type", R"({"type": "dance", "id": "u1"})", false, "u1", "unknown_type"},
    {"no type", R"({"text": "hello", "id": 7})", false, 7, "bad_message"},
    {"a type that is not a string", R"({"type": 1, "id": "t1"})", false, "t1", "bad_message"},
    {"steer without text", R"({"type": "steer", "id": "m1"})", false, "m1", "bad_message"},
    {"steer with a number as text", R"({"type": "steer", "text": 42, "id": "m2"})", false, "m2",
     "bad_message"},
    {"steer with empty text", R"({"type": "steer", "text": "", "id": "e1"})", false, "e1",
     "empty_text"},
    {"steer over 16 KiB", json{{"type", "steer"}, {"text", std::string(20000, 'x')}, {"id", "b1"}}
                            .dump(),
     false, "b1", "too_large"},
    {"abort with a reason that is not a string",
     R"({"type": "abort", "reason": ["stop"], "id": "r1"})", false, "r1", "bad_message"},
    {"an id that is an object", R"({"type": "steer", "text": "x", "id": {"a": 1}})", false,
     nullptr, "bad_message"},
    {"a 300 KiB message", std::string(300 * 1024, '{'), false, nullptr, "too_large"},
    {"a binary frame", std::string("\x01\x02\x03 binary", 10), true, nullptr, "bad_message"},
  };
  for (const auto& b : bad) {
    BOOST_TEST_CONTEXT(b.what) {
      const size_t before = log.replies.size();
      send_ok(ws, b.payload, b.binary);
      BOOST_TEST_REQUIRE(
        read_until(ws, log, [&](const socket_log& l) { return l.replies.size() > before; }, 10s),
        "no answer: " << log.summary());
      const json& r = log.replies.back();
      BOOST_TEST(str(r, "type") == "error", r.dump());
      BOOST_TEST(str(r, "code") == b.code, r.dump());
      BOOST_TEST(field(r, "id") == b.id, r.dump());
      BOOST_TEST(!str(r, "message").empty(), r.dump());
    }
  }

  // A flood of bad messages sent without reading the answers: every one is answered, in order
  // (reading pauses while answers wait to be written, and resumes), and the stream goes on.
  constexpr size_t flood = 2000;
  const size_t before_flood = log.replies.size();
  for (size_t i = 0; i < flood; ++i)
    send_ok(ws, "x");
  BOOST_TEST_REQUIRE(read_until(ws, log,
                                [&](const socket_log& l) {
                                  return l.replies.size() >= before_flood + flood;
                                },
                                60s),
                     "the flood was not answered: " << log.summary());
  size_t flood_errors = 0;
  for (size_t i = before_flood; i < log.replies.size(); ++i)
    flood_errors += str(log.replies[i], "code") == "bad_json";
  BOOST_TEST(flood_errors == flood);

  const json second = steer_and_see_it(ws, log, "and add a test", "s2", alice_token.id);
  BOOST_TEST(field(second, "seq").get<uint64_t>() > field(first, "seq").get<uint64_t>());
  BOOST_TEST(log.other.empty(), log.summary());

  // Another user can neither open this socket nor steer or abort over REST: the same rule,
  // the token's user must own the task (404, like a missing task).
  ws_client intruder;
  ws_handshake bob_hs = bob.open_events(intruder, id);
  BOOST_TEST(!bob_hs.upgraded, "bob opened the event socket of alice's task");
  BOOST_TEST(bob_hs.status == 404, bob_hs.summary());
  expect_json_error(bob.authorized("POST", "/api/v1/tasks/" + id + "/steer", R"({"text": "x"})"),
                    404, "bob steers alice's task");
  expect_json_error(bob.abort(id), 404, "bob aborts alice's task");

  // Abort: acknowledged with the outcome once the task ended; its events arrive on the same
  // socket, which then closes normally (the ack is never lost to the close).
  const auto t1 = std::chrono::steady_clock::now();
  send_json(ws, {{"type", "abort"}, {"reason", "enough"}, {"id", "a1"}});
  read_until(ws, log, [](const socket_log&) { return false; }, 30s);
  BOOST_TEST_MESSAGE("abort over the socket: stream closed " << ms_since(t1) << " ms later");
  BOOST_TEST(log.closed, log.summary());
  BOOST_TEST(log.close_code == 1000, log.summary());
  const json* ack = reply_for(log, "a1");
  BOOST_TEST_REQUIRE(ack != nullptr, "no answer to the abort: " << log.summary());
  BOOST_TEST(str(*ack, "type") == "ack", ack->dump());
  BOOST_TEST(str(*ack, "op") == "abort", ack->dump());
  BOOST_TEST(str(*ack, "outcome") == "aborted", ack->dump());
  const int requested = find_event(log.events, "abort_requested", 0,
                                   [](const json& d) { return str(d, "reason") == "enough"; });
  BOOST_TEST_REQUIRE(requested >= 0, log.summary());
  BOOST_TEST(str(log.events[static_cast<size_t>(requested)], "user") == alice_token.id);
  BOOST_TEST(find_event(log.events, "task_finished", requested,
                        [](const json& d) { return str(d, "status") == "aborted"; }) >= 0,
             log.summary());
  check_envelopes(log.events, id, 1);
  BOOST_TEST(log.other.empty(), log.summary());
  BOOST_TEST(str(get_task_json(alice, id), "status") == "aborted");
  BOOST_TEST(sandbox_processes(id).empty(), "processes of the aborted sandbox are left");
}

BOOST_AUTO_TEST_CASE(control_requests_in_flight_are_bounded_per_socket) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api(ferryd);
  const std::string id = submit_task(api, "sleep 30");
  sandbox_sweeper sweep(id);
  wait_until_running(api, id);
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());

  // Past the hard limit (1 MiB) a frame is not read at all: the server ends that connection
  // (close 1009, message too big; our blocking client usually sees the reset while still
  // sending). Had it read the frame, it would answer "too_large" and keep the socket open.
  {
    ws_client huge;
    BOOST_TEST_REQUIRE(api.open_events(huge, id).upgraded);
    const std::string sent = huge.send(std::string(2 * 1024 * 1024, 'x'));
    socket_log huge_log;
    if (sent.empty())
      read_until(huge, huge_log, [](const socket_log&) { return false; }, 15s);
    BOOST_TEST_MESSAGE("2 MiB frame: send: " << (sent.empty() ? "ok" : sent)
                                              << "; then: " << huge_log.ended);
    BOOST_TEST(huge_log.replies.empty(), huge_log.summary());
    BOOST_TEST(huge_log.ended != "timed out", "the server kept the connection open");
    if (huge_log.closed)
      BOOST_TEST(huge_log.close_code == 1009, huge_log.summary());
  }

  // A burst of aborts: an abort is answered once the sandbox is gone (well over the
  // microseconds the burst takes), so past the bound the socket answers "busy" at once.
  constexpr int burst = 12;
  for (int i = 0; i < burst; ++i)
    send_json(ws, {{"type", "abort"}, {"id", i}});
  socket_log log;
  read_until(ws, log, [](const socket_log&) { return false; }, 60s);
  BOOST_TEST(log.closed, log.summary());
  BOOST_TEST(log.close_code == 1000, log.summary());

  size_t busy = 0;
  size_t aborted = 0;
  for (int i = 0; i < burst; ++i) {
    BOOST_TEST(count_replies(log, i) == 1u, "abort " << i << ": " << log.summary());
    const json* r = reply_for(log, i);
    if (!r)
      continue;
    if (str(*r, "type") == "ack") {
      BOOST_TEST((str(*r, "outcome") == "aborted" || str(*r, "outcome") == "pending"), r->dump());
      aborted += str(*r, "outcome") == "aborted";
      continue;
    }
    const std::string code = str(*r, "code");
    BOOST_TEST((code == "busy" || code == "task_ended" || code == "not_found"), r->dump());
    busy += code == "busy";
  }
  BOOST_TEST_MESSAGE(busy << " of " << burst << " aborts answered busy");
  BOOST_TEST(busy >= 1u, "no bound on the requests in flight: " << log.summary());
  BOOST_TEST(busy <= static_cast<size_t>(burst) - 1, log.summary());
  BOOST_TEST(aborted >= 1u, log.summary());
  BOOST_TEST(find_event(log.events, "task_finished", 0,
                        [](const json& d) { return str(d, "status") == "aborted"; }) >= 0,
             log.summary());
  BOOST_TEST(sandbox_processes(id).empty(), "processes of the aborted sandbox are left");
}

BOOST_AUTO_TEST_CASE(abort_on_the_socket_still_preempts_when_nats_is_down) {
  // The socket's abort takes the REST abort's path: with NATS unreachable the serving ferryd
  // aborts the task itself, at once. A steer has no such fallback: it says NATS is unavailable.
  temp_dir nats_dir("ferry-nats");
  auto nats = ferry::actors::start_embedded_nats("nats-server", nats_dir.path() / "store");
  BOOST_TEST_REQUIRE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = {"--nats-url", (*nats)->url()};
  ferryd_process ferryd(opts);
  api_client api(ferryd);

  const std::string id = submit_task(api, "sleep 30");
  sandbox_sweeper sweep(id);
  wait_until_running(api, id);
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
  (*nats)->stop();

  socket_log log;
  send_json(ws, {{"type", "steer"}, {"text", "hello?"}, {"id", "s"}});
  BOOST_TEST_REQUIRE(
    read_until(ws, log, [](const socket_log& l) { return reply_for(l, "s") != nullptr; }, 15s),
    log.summary());
  BOOST_TEST(str(*reply_for(log, "s"), "code") == "unavailable", reply_for(log, "s")->dump());

  const auto t0 = std::chrono::steady_clock::now();
  send_json(ws, {{"type", "abort"}, {"id", "a"}});
  BOOST_TEST_REQUIRE(
    read_until(ws, log, [](const socket_log& l) { return reply_for(l, "a") != nullptr; }, 15s),
    log.summary());
  const double ms = ms_since(t0);
  BOOST_TEST_MESSAGE("abort over the socket with NATS down answered in " << ms << " ms");
  BOOST_TEST(str(*reply_for(log, "a"), "outcome") == "aborted", reply_for(log, "a")->dump());
  BOOST_TEST(ms < 3000, "the abort waited for the unreachable NATS");
  BOOST_TEST(str(get_task_json(api, id), "status") == "aborted");
  BOOST_TEST(sandbox_processes(id).empty(), "processes of the aborted sandbox are left");
  ws.close();
}
