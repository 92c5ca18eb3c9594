// Bad input at the HTTP edge is refused with the right status and a JSON error, and none of it
// hurts ferryd. One ferryd serves the whole file (none of these requests may start a sandbox,
// except the control submission); the last test case checks it survived all the others, so the
// cases run in declaration order (Boost.Test's default).

#define BOOST_TEST_MODULE bad_input_test
#include <boost/test/unit_test.hpp>

#include <memory>

#include <utility>  // Boost 1.74 asio uses std::exchange without including it

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using nlohmann::json;

namespace {

const std::string unknown_id = "0123456789abcdef0123456789abcdef";
const std::string valid_body = R"({"command": "true"})";

struct shared_ferryd {
  static inline std::unique_ptr<ferryd_process> instance;
  shared_ferryd() {
    instance = std::make_unique<ferryd_process>(ferryd_options(FERRYD_BINARY));
  }
  ~shared_ferryd() {
    if (instance)
      instance->stop();
    instance.reset();
  }
};
BOOST_TEST_GLOBAL_FIXTURE(shared_ferryd);

ferryd_process& ferryd() { return *shared_ferryd::instance; }
api_client api() { return api_client(ferryd()); }
http_client http() { return ferryd().http(); }

std::string base64_encode(const std::string& in) {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  unsigned acc = 0;
  int bits = 0;
  for (unsigned char c : in) {
    acc = (acc << 8) | c;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(alphabet[(acc >> bits) & 63]);
    }
  }
  if (bits > 0)
    out.push_back(alphabet[(acc << (6 - bits)) & 63]);
  while (out.size() % 4)
    out.push_back('=');
  return out;
}

/// The same three API calls with the given Authorization header (none if empty).
void expect_all_unauthorized(const std::optional<std::string>& authorization, const std::string& what) {
  header_list h;
  if (authorization)
    h.emplace_back("Authorization", *authorization);
  expect_json_error(http().request("POST", "/api/v1/tasks", valid_body, h), 401,
                    "POST /api/v1/tasks with " + what);
  expect_json_error(http().request("GET", "/api/v1/tasks/" + unknown_id, {}, h), 401,
                    "GET task with " + what);
  expect_json_error(http().request("POST", "/api/v1/tasks/" + unknown_id + "/abort", {}, h), 401,
                    "abort with " + what);
  ws_client ws;
  ws_handshake hs = ws.connect("127.0.0.1", ferryd().port(),
                               "/api/v1/tasks/" + unknown_id + "/events", h);
  BOOST_TEST(!hs.upgraded, "events WebSocket with " << what << " was upgraded");
  BOOST_TEST(hs.status == 401, "events WebSocket with " << what << ": " << hs.summary());
}

http_response post_tasks(const std::string& body) {
  return http().request("POST", "/api/v1/tasks", body, bearer(ferryd().token()));
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_well_formed_submission_with_the_token_is_accepted) {
  // The control for everything below: with the token and a good body, the same calls succeed,
  // so the refusals that follow are about the input, not a broken server.
  BOOST_TEST(api().healthz().status == 200, "/healthz without a token: " << api().healthz().summary());
  const std::string id = submit_task(api(), "true");
  BOOST_TEST(api().get_task(id).status == 200);
  expect_json_error(api().get_task(unknown_id), 404, "GET unknown task with the token");
}

BOOST_AUTO_TEST_CASE(api_calls_without_a_token_are_unauthorized) {
  expect_all_unauthorized(std::nullopt, "no Authorization header");
}

BOOST_AUTO_TEST_CASE(a_wrong_or_mangled_bearer_token_is_unauthorized) {
  const std::string token = ferryd().token();
  BOOST_TEST_REQUIRE(token.size() > 1u);
  expect_all_unauthorized("Bearer wrong-token", "a wrong token");
  expect_all_unauthorized("Bearer " + token + "x", "the token with a suffix");
  expect_all_unauthorized("Bearer " + token.substr(0, token.size() - 1), "a token prefix");
  expect_all_unauthorized("Bearer ", "an empty bearer token");
  expect_all_unauthorized("Bearer", "a bare Bearer scheme");
}

BOOST_AUTO_TEST_CASE(only_the_bearer_scheme_is_accepted) {
  const std::string token = ferryd().token();
  expect_all_unauthorized("Basic " + base64_encode("admin:" + token), "Basic credentials");
  expect_all_unauthorized("Basic " + token, "Basic with the raw token");
  expect_all_unauthorized("Token " + token, "scheme Token");
  expect_all_unauthorized(token, "the token without a scheme");
}

BOOST_AUTO_TEST_CASE(malformed_json_is_a_bad_request_that_names_the_parse_problem) {
  for (const std::string& body : {std::string(R"({"command": "echo hi")"),
                                 std::string(R"({command: "echo hi"})"), std::string("not json"),
                                 std::string(R"({"command": "echo hi"} trailing)"), std::string()}) {
    const std::string message =
        lowercase(expect_json_error(post_tasks(body), 400, "POST body `" + body + "`"));
    BOOST_TEST((message.find("json") != std::string::npos ||
                message.find("parse") != std::string::npos ||
                message.find("syntax") != std::string::npos),
               "the error for `" << body << "` does not say it is a parse problem: " << message);
  }
}

BOOST_AUTO_TEST_CASE(a_body_that_is_not_a_json_object_is_a_bad_request) {
  for (const std::string body : {"[]", R"(["echo hi"])", R"("echo hi")", "42", "null", "true"})
    expect_json_error(post_tasks(body), 400, "POST body `" + body + "`");
}

BOOST_AUTO_TEST_CASE(a_missing_empty_or_non_string_command_is_a_bad_request) {
  for (const std::string body :
       {"{}", R"({"repo": "x"})", R"({"Command": "echo hi"})", R"({"command": 42})",
        R"({"command": null})", R"({"command": true})", R"({"command": ["echo", "hi"]})",
        R"({"command": {"sh": "echo hi"}})", R"({"command": ""})"}) {
    const std::string message =
        lowercase(expect_json_error(post_tasks(body), 400, "POST body `" + body + "`"));
    BOOST_TEST(message.find("command") != std::string::npos,
               "the error for `" << body << "` does not name the command field: " << message);
  }
}

BOOST_AUTO_TEST_CASE(unknown_and_garbage_task_ids_are_not_found) {
  for (const std::string& id : {unknown_id, std::string("ffff"), std::string("..%2F..%2Fetc"),
                               std::string("%00"), std::string(300, 'a'), std::string("-1")}) {
    expect_json_error(api().get_task(id), 404, "GET task `" + id + "`");
    expect_json_error(api().abort(id), 404, "abort task `" + id + "`");
  }
  // Dot segments sent raw: whatever the router makes of them, it is not a task.
  expect_json_error(api().authorized("GET", "/api/v1/tasks/../../etc"), 404,
                    "GET /api/v1/tasks/../../etc");
  expect_json_error(api().authorized("GET", "/api/v1/tasks/../../etc/passwd"), 404,
                    "GET /api/v1/tasks/../../etc/passwd");
}

BOOST_AUTO_TEST_CASE(a_body_over_one_mebibyte_is_too_large) {
  // A valid document, so that only its size is wrong.
  const std::string big = json{{"command", "echo " + std::string(2 * 1024 * 1024, 'a')}}.dump();
  const auto t0 = std::chrono::steady_clock::now();
  http_response sized = post_tasks(big);
  BOOST_TEST_MESSAGE("2 MiB body with Content-Length answered in " << ms_since(t0) << " ms");
  expect_json_error(sized, 413, "2 MiB body with Content-Length");

  http_response chunked =
      http().request("POST", "/api/v1/tasks", big, bearer(ferryd().token()), /*chunked=*/true);
  expect_json_error(chunked, 413, "2 MiB chunked body");

  // The limit is 1 MiB, not less: a 900 KiB (malformed) document is read and parsed.
  const std::string below = R"({"command": ")" + std::string(900 * 1024, 'a');
  expect_json_error(post_tasks(below), 400, "900 KiB unterminated JSON");
}

BOOST_AUTO_TEST_CASE(expect_100_continue_gets_the_go_ahead_before_the_body_is_sent) {
  // curl sends `Expect: 100-continue` for bodies over 1 KiB and otherwise waits a second.
  namespace asio = boost::asio;
  namespace beast = boost::beast;
  namespace http = beast::http;
  asio::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.expires_after(5s);  // every step below is bounded; a server waiting for the body fails
  const std::string body = valid_body;
  http::request<http::empty_body> head{http::verb::post, "/api/v1/tasks", 11};
  head.set(http::field::host, "127.0.0.1");
  head.set(http::field::authorization, "Bearer " + ferryd().token());
  head.set(http::field::expect, "100-continue");
  head.content_length(body.size());
  http::request_serializer<http::empty_body> sr{head};
  beast::flat_buffer buf;
  http::response<http::empty_body> interim;
  http::response<http::string_body> final_res;
  std::string failure;
  auto fail_on = [&](const char* step, beast::error_code ec) {
    if (ec && failure.empty())
      failure = std::string(step) + ": " + ec.message();
    return static_cast<bool>(ec);
  };
  stream.async_connect({asio::ip::make_address("127.0.0.1"), ferryd().port()},
                       [&](beast::error_code ec) {
    if (fail_on("connect", ec))
      return;
    http::async_write_header(stream, sr, [&](beast::error_code ec, size_t) {
      if (fail_on("write header", ec))
        return;
      http::async_read(stream, buf, interim, [&](beast::error_code ec, size_t) {
        if (fail_on("read the interim answer (before sending the body)", ec))
          return;
        asio::async_write(stream, asio::buffer(body), [&](beast::error_code ec, size_t) {
          if (fail_on("write body", ec))
            return;
          http::async_read(stream, buf, final_res, [&](beast::error_code ec, size_t) {
            fail_on("read the final answer", ec);
          });
        });
      });
    });
  });
  ioc.run();
  BOOST_TEST_REQUIRE(failure.empty(), failure);
  BOOST_TEST(interim.result_int() == 100);
  BOOST_TEST(final_res.result_int() == 201, final_res.body());
}

BOOST_AUTO_TEST_CASE(unknown_paths_are_not_found) {
  for (const std::string target : {"/api/v1/nope", "/api/v2/tasks", "/api/v1/tasks/x/y/z", "/nope"})
    expect_json_error(api().authorized("GET", target), 404, "GET " + target);
}

BOOST_AUTO_TEST_CASE(a_wrong_method_on_the_tasks_collection_is_not_allowed) {
  for (const std::string method : {"DELETE", "PUT", "PATCH"})
    expect_json_error(api().authorized(method, "/api/v1/tasks", valid_body), 405,
                      method + " /api/v1/tasks");
}

BOOST_AUTO_TEST_CASE(the_event_stream_of_an_unknown_task_is_refused_with_404) {
  for (const std::string& id : {unknown_id, std::string("..%2F..%2Fetc")}) {
    ws_client ws;
    ws_handshake hs = api().open_events(ws, id);
    BOOST_TEST(!hs.upgraded, "events of unknown task " << id << " were upgraded");
    BOOST_TEST(hs.status == 404, "events of unknown task " << id << ": " << hs.summary());
  }
}

BOOST_AUTO_TEST_CASE(ferryd_survived_all_of_the_above) {
  BOOST_TEST_REQUIRE(ferryd().running(), "ferryd exited; output:\n" << ferryd().output());
  http_response health = api().healthz();
  BOOST_TEST(health.status == 200, "/healthz: " << health.summary());
  expect_json_error(api().get_task(unknown_id), 404, "GET unknown task at the end");
}
