// API tokens: admins mint more while ferryd runs; a token sees only its own tasks (another
// user's task is a 404, like a missing one); only admin tokens mint tokens or see every task.

#define BOOST_TEST_MODULE integration_tokens
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <string>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

std::string mint(const api_client& admin, const std::string& body, int expected_status) {
  http_response r = admin.authorized("POST", "/api/v1/tokens", body);
  BOOST_TEST_REQUIRE(r.status == expected_status, "POST /api/v1/tokens " << body << ": "
                                                                           << r.summary());
  auto j = r.json();
  return j && j->is_object() ? str(*j, "token") : std::string();
}

}  // namespace

BOOST_AUTO_TEST_CASE(tokens_minted_through_the_api_work_and_see_only_their_own_tasks) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client admin(ferryd);

  const std::string alice_token = mint(admin, R"({"name": "alice"})", 201);
  const std::string bob_token = mint(admin, R"({"name": "bob", "admin": false})", 201);
  BOOST_TEST_REQUIRE(!alice_token.empty());
  BOOST_TEST(alice_token != bob_token);
  api_client alice(ferryd.port(), alice_token);
  api_client bob(ferryd.port(), bob_token);

  const std::string alice_task = submit_task(alice, "echo mine");
  const std::string admin_task = submit_task(admin, "echo admin's");

  // Alice sees her task; Bob gets the same 404 as for a task that does not exist.
  BOOST_TEST(alice.get_task(alice_task).status == 200);
  expect_json_error(bob.get_task(alice_task), 404, "bob reads alice's task");
  expect_json_error(bob.abort(alice_task), 404, "bob aborts alice's task");
  expect_json_error(alice.get_task(admin_task), 404, "alice reads the admin's task");
  ws_client ws;
  ws_handshake hs = bob.open_events(ws, alice_task);
  BOOST_TEST(!hs.upgraded, "bob opened the events of alice's task");
  BOOST_TEST(hs.status == 404, hs.summary());
  // The admin sees every task.
  BOOST_TEST(admin.get_task(alice_task).status == 200);

  // Only admins mint tokens; bad bodies are clear 400s.
  expect_json_error(alice.authorized("POST", "/api/v1/tokens", R"({"name": "eve"})"), 403,
                    "non-admin mints a token");
  expect_json_error(admin.authorized("POST", "/api/v1/tokens", R"({"admin": true})"), 400,
                    "token without a name");
  expect_json_error(admin.authorized("POST", "/api/v1/tokens", R"({"name": 5})"), 400,
                    "token name not a string");
  expect_json_error(admin.authorized("POST", "/api/v1/tokens", R"({"name": "x", "admin": "yes"})"),
                    400, "admin flag not a boolean");
  expect_json_error(admin.authorized("POST", "/api/v1/tokens", "{"), 400, "malformed JSON");
  expect_json_error(admin.authorized("GET", "/api/v1/tokens"), 405, "GET on tokens");

  // An admin token minted through the API is an admin too, and tokens survive a restart.
  const std::string second_admin = mint(admin, R"({"name": "ops", "admin": true})", 201);
  api_client ops(ferryd.port(), second_admin);
  BOOST_TEST(ops.get_task(alice_task).status == 200);
  auto data_dir = ferryd.data_dir();
  ferryd.stop();
  ferryd_process again{ferryd_options(FERRYD_BINARY, data_dir, ferryd.token())};
  api_client alice_again(again.port(), alice_token);
  BOOST_TEST(alice_again.get_task(alice_task).status == 200);
  expect_json_error(api_client(again.port(), bob_token).get_task(alice_task), 404,
                    "bob after restart");
}
