// The egress proxy inside a real ferryd, for each sandbox backend the machine has: a task's
// commands reach the network only through the proxy, with the token ferryd gave their sandbox
// (in the proxy URLs ferry-init sets; never as a variable of its own); the environment's policy
// decides, the address checks hold whatever it says, every decision is an egress_decision event
// on the task's stream, a refused destination a user allows for the task (POST
// /api/v1/tasks/{id}/egress/approvals) is reached by the same running command, the default
// network applies to tasks without an environment, and the organisation's policy (PUT
// /api/v1/admin/egress-policy, admins only) bounds everything. In the test's own network
// namespace (test_network.h): every "destination" is a listener of this test, which counts
// what reaches it. Needs root, and bwrap or runsc.
#define BOOST_TEST_NO_MAIN
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/http_client.h"
#include "ferry/test_support/temp_dir.h"
#include "test_network.h"

using namespace ferry::egress::testing;
using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;
namespace utf = boost::unit_test;

namespace {

bool on_path(const char* program) {
  auto r = ferry::sandbox::run_command({"sh", "-c", fmt::format("command -v {}", program)}, 10s);
  return r.ok() && r->status.ok();
}

struct needs_backend {
  const char* program;
  boost::test_tools::assertion_result operator()(utf::test_unit_id id) const {
    auto net = needs_network()(id);
    if (!net)
      return net;
    boost::test_tools::assertion_result r(on_path(program));
    r.message() << program << " is not installed";
    return r;
  }
};

std::string text_of(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

/// One ferryd in the test's namespace, with the environments below.
struct ferryd_under_test {
  ferry::test::temp_dir dir{"ferry-egress-ferryd"};
  std::unique_ptr<ferry::test::ferryd_process> ferryd;
  std::unique_ptr<ferry::test::api_client> api;

  explicit ferryd_under_test(const std::string& backend, std::vector<std::string> more_args = {},
                             size_t custom_warm = 0) {
    // bwrap sandboxes run as uids of their own: they must reach their directories.
    fs::permissions(dir.path(), fs::perms::others_exec, fs::perm_options::add);
    const json environments = {
      {"environments",
       {{"custom", {{"network", {{"level", "custom"}, {"allow", {"allowed.test", "rebind.test", "metadata.test"}}}}}},
        {"closed", {{"network", {{"level", "none"}}}}}}}};
    json with_warm = environments;
    if (custom_warm > 0)
      with_warm["environments"]["custom"]["warm_pool"] = custom_warm;
    std::ofstream(dir.path() / "environments.json") << with_warm.dump(2);
    ferry::test::ferryd_options opts(FERRYD_BINARY, dir.path() / "data");
    opts.extra_args = {"--sandbox-runtime", backend, "--environments", (dir.path() / "environments.json").string(),
                       "--default-network", "none"};
    opts.extra_args.insert(opts.extra_args.end(), more_args.begin(), more_args.end());
    ferryd = std::make_unique<ferry::test::ferryd_process>(opts);
    api = std::make_unique<ferry::test::api_client>(*ferryd);
  }

  std::string submit(const std::string& command, const std::string& environment) {
    json body{{"command", command}};
    if (!environment.empty())
      body["environment"] = environment;
    auto r = api->authorized("POST", "/api/v1/tasks", body.dump());
    BOOST_TEST_REQUIRE(r.status == 201, r.summary());
    return text_of(*r.json(), "id");
  }

  json wait_finished(const std::string& id) {
    std::string last;
    auto t = api->wait_for_task(id, [](const json& j) { return j.value("finished", false); }, 120s, &last);
    BOOST_TEST_REQUIRE(t.has_value(), "task " << id << " did not end; last: " << last);
    return *t;
  }

  /// The task's events, from the journal (it has ended).
  std::vector<json> events(const std::string& id) {
    ferry::test::ws_client ws;
    auto hs = api->open_events(ws, id);
    BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
    return ferry::test::read_until_close(ws, 60s).events;
  }
};

/// Listeners on one port of both public addresses and every internal one; the port.
uint16_t start_origins(origin_servers& origins) {
  int first = tcp_listen(public_address, 0);
  const uint16_t port = local_port(first);
  origins.add(first, public_address);
  origins.add(tcp_listen(public_address_2, port), public_address_2);
  for (const auto& a : internal_addresses)
    origins.add(tcp_listen(a, port), a);
  origins.start();
  return port;
}

std::string stdout_of(const std::vector<json>& events) {
  std::string out;
  for (const auto& e : events)
    if (text_of(e, "type") == "output_chunk" && e["data"].value("command_id", -1) == 1 &&
        text_of(e["data"], "stream") == "stdout")
      out += text_of(e["data"], "text");
  return out;
}

std::vector<json> decisions(const std::vector<json>& events) {
  std::vector<json> out;
  for (const auto& e : events)
    if (text_of(e, "type") == "egress_decision")
      out.push_back(e["data"]);
  return out;
}

/// "host allowed|denied rule" of each decision.
std::string describe(const std::vector<json>& ds) {
  std::string s;
  for (const auto& d : ds)
    s += fmt::format("\n  {}:{} {} {}{}", text_of(d, "host"), d.value("port", 0), d.value("allowed", false) ? "allowed" : "denied",
                     text_of(d, "rule"), d.value("approvable", false) ? " (approvable)" : "");
  return s;
}

void the_task_gets_out_only_through_its_policy(const std::string& backend) {
  origin_servers origins;
  const uint16_t port = start_origins(origins);

  ferryd_under_test f(backend);
  const std::string curl = "curl -sS -m 10 -o /dev/null";
  // denied.test is not on the environment's list: refused (approvable) until the test allows it;
  // the loop is bounded (30 s).
  const std::string command = fmt::format(
    "{0} -w 'allowed=%{{http_code}}\\n' http://allowed.test:{1}/a; "
    "{0} -w 'rebind=%{{http_code}}\\n' http://rebind.test:{1}/; "
    "{0} -w 'metadata=%{{http_code}}\\n' -p http://metadata.test:{1}/; "
    "{0} -w 'literal=%{{http_code}}\\n' --noproxy '' http://0x7f.1:{1}/; "
    "case \"$HTTP_PROXY\" in http://ferry:*@127.0.0.1:3128) echo proxy-url-has-credential;; esac; "
    "echo token-variables=$(env | grep -c FERRY_EGRESS_TOKEN); "
    "i=0; until [ \"$({0} -w '%{{http_code}}' http://denied.test:{1}/later)\" = 200 ]; do "
    "i=$((i+1)); [ $i -ge 300 ] && echo never-allowed && exit 3; sleep 0.1; done; echo approved-ok",
    curl, port);
  const std::string id = f.submit(command, "custom");

  // The refusal shows in the task's view as waiting for a user's decision; allow it.
  const std::string destination = fmt::format("denied.test:{}", port);
  std::string last;
  auto waiting = f.api->wait_for_task(
    id,
    [&](const json& t) {
      if (t.value("finished", false))
        return true;
      for (const auto& a : t["egress"]["approvable"])
        if (a == destination)
          return true;
      return false;
    },
    60s, &last);
  BOOST_TEST_REQUIRE(waiting.has_value(), "no approvable refusal of " << destination << "; last: " << last);
  BOOST_TEST_REQUIRE(!(*waiting).value("finished", false), "the task ended first: " << waiting->dump());
  BOOST_TEST(origins.connections(public_address_2) == 0);

  // Bad input first: not a destination, no body.
  auto bad = f.api->authorized("POST", "/api/v1/tasks/" + id + "/egress/approvals", json{{"destination", "a b"}}.dump());
  BOOST_TEST(bad.status == 400, bad.summary());
  auto missing = f.api->authorized("POST", "/api/v1/tasks/" + id + "/egress/approvals", "{}");
  BOOST_TEST(missing.status == 400, missing.summary());
  auto approved =
    f.api->authorized("POST", "/api/v1/tasks/" + id + "/egress/approvals", json{{"destination", destination}}.dump());
  BOOST_TEST_REQUIRE(approved.status == 201, approved.summary());

  const json done = f.wait_finished(id);
  const auto events = f.events(id);
  const auto ds = decisions(events);
  const std::string out = stdout_of(events);
  BOOST_TEST_CONTEXT("task: " << done.dump() << "\nstdout:\n" << out << "\ndecisions:" << describe(ds)) {
    BOOST_TEST(text_of(done, "status") == "succeeded");
    BOOST_TEST(out.find("allowed=200\n") != std::string::npos);
    BOOST_TEST(out.find("rebind=403\n") != std::string::npos);
    BOOST_TEST(out.find("metadata=000\n") != std::string::npos);  // CONNECT refused: no HTTP status
    BOOST_TEST(out.find("literal=403\n") != std::string::npos);
    BOOST_TEST(out.find("proxy-url-has-credential\n") != std::string::npos);
    BOOST_TEST(out.find("token-variables=0\n") != std::string::npos);
    BOOST_TEST(out.find("approved-ok\n") != std::string::npos);

    // Every decision is on the task's stream, with what decided it.
    auto find = [&](const std::string& host, auto pred) {
      return std::any_of(ds.begin(), ds.end(), [&](const json& d) { return text_of(d, "host") == host && pred(d); });
    };
    BOOST_TEST(find("allowed.test", [](const json& d) {
      return d.value("allowed", false) && text_of(d, "rule") == "custom:allow:allowed.test" && d.value("bytes_down", 0) > 0;
    }));
    BOOST_TEST(find("rebind.test", [](const json& d) { return text_of(d, "rule") == "address:private 10.0.0.1"; }));
    BOOST_TEST(find("metadata.test", [](const json& d) {
      return text_of(d, "rule") == "address:link-local 169.254.169.254" && text_of(d, "method") == "CONNECT";
    }));
    BOOST_TEST(find("denied.test", [](const json& d) {
      return !d.value("allowed", false) && d.value("approvable", false) && text_of(d, "rule") == "custom:not-listed";
    }));
    BOOST_TEST(find("denied.test", [&](const json& d) {
      return d.value("allowed", false) && text_of(d, "rule") == "approval:" + destination;
    }));
    for (const auto& d : ds)
      BOOST_TEST(text_of(d, "sandbox_id").starts_with("ferry-" + id + "-"), d.dump());
    // The approval is an event of its own, by the user who gave it, before the allowed request.
    auto approval = std::find_if(events.begin(), events.end(), [](const json& e) { return text_of(e, "type") == "egress_approved"; });
    BOOST_TEST_REQUIRE((approval != events.end()));
    BOOST_TEST(text_of((*approval)["data"], "destination") == destination);
    BOOST_TEST(!text_of(*approval, "user").empty());
    BOOST_TEST(done["egress"]["approvals"] == json::array({destination}));
    BOOST_TEST(done["egress"]["approvable"] == json::array());
    BOOST_TEST(done["egress"]["allowed"].get<int>() >= 2);
    // No event carries the sandbox's token.
    for (const auto& e : events)
      BOOST_TEST(e.dump().find("eyJ") == std::string::npos, "a JWT in " << e.dump());
  }
  // What reached the listeners: the allowed names' addresses, only after the approval for
  // denied.test; never an internal address.
  BOOST_TEST(origins.connections(public_address) == 1);
  BOOST_TEST(origins.connections(public_address_2) == 1);
  for (const auto& a : internal_addresses)
    BOOST_TEST(origins.connections(a) == 0, a);

  // A task without an environment gets --default-network none; an environment may say none.
  for (const std::string environment : {"", "closed"}) {
    const std::string closed = f.submit(fmt::format("{} -w 'code=%{{http_code}}' http://allowed.test:{}/b", curl, port), environment);
    const json ended = f.wait_finished(closed);
    const auto ev = f.events(closed);
    BOOST_TEST(stdout_of(ev) == "code=403", environment << ": " << stdout_of(ev));
    const auto cd = decisions(ev);
    BOOST_TEST_REQUIRE(cd.size() == 1u, describe(cd));
    BOOST_TEST(text_of(cd[0], "rule") == "policy:none");
    BOOST_TEST(cd[0].value("approvable", false) == true);  // a user could allow it for the task
    BOOST_TEST(text_of(ended, "status") == "succeeded");
  }
  BOOST_TEST(origins.connections(public_address) == 1);

  // The organisation's policy: only admins set it, a bad one is refused, and it bounds the
  // environment's (allowed.test passes both; rebind.test is allowed by the environment only).
  auto user_token = f.api->authorized("POST", "/api/v1/tokens", json{{"name", "someone"}}.dump());
  BOOST_TEST_REQUIRE(user_token.status == 201, user_token.summary());
  ferry::test::api_client user(f.ferryd->port(), text_of(*user_token.json(), "token"));
  const json org = {{"level", "custom"}, {"allow", {"allowed.test"}}};
  auto refused = user.authorized("PUT", "/api/v1/admin/egress-policy", org.dump());
  BOOST_TEST(refused.status == 403, refused.summary());
  auto garbled = f.api->authorized("PUT", "/api/v1/admin/egress-policy", json{{"level", "sometimes"}}.dump());
  BOOST_TEST(garbled.status == 400, garbled.summary());
  auto set = f.api->authorized("PUT", "/api/v1/admin/egress-policy", org.dump());
  BOOST_TEST_REQUIRE(set.status == 200, set.summary());
  auto read = user.authorized("GET", "/api/v1/admin/egress-policy");
  BOOST_TEST(read.status == 200, read.summary());
  BOOST_TEST(read.body.find("\"allow\":[\"allowed.test\"]") != std::string::npos, read.body);
  BOOST_TEST(read.body.find("\"level\":\"custom\"") != std::string::npos, read.body);
  const std::string bounded = f.submit(fmt::format("{0} -w 'a=%{{http_code}} ' http://allowed.test:{1}/c; "
                                                   "{0} -w 'b=%{{http_code}}' http://tunnel.test:{1}/d",
                                                   curl, port),
                                       "custom");
  f.wait_finished(bounded);
  const auto bev = f.events(bounded);
  BOOST_TEST(stdout_of(bev) == "a=200 b=403", describe(decisions(bev)));
  for (const auto& d : decisions(bev))
    if (text_of(d, "host") == "tunnel.test")
      BOOST_TEST(text_of(d, "rule").starts_with("org:"), d.dump());
  BOOST_TEST(origins.connections(public_address) == 2);

  // The environments list says which policy each has.
  auto envs = f.api->authorized("GET", "/api/v1/environments");
  BOOST_TEST_REQUIRE(envs.status == 200, envs.summary());
  const json listed = *envs.json();
  BOOST_TEST(listed["default_network"] == json({{"level", "none"}}), envs.body);
  for (const auto& e : listed["environments"])
    if (e["name"] == "custom")
      BOOST_TEST(e["network"]["allow"] == json::array({"allowed.test", "rebind.test", "metadata.test"}), e.dump());

  auto stop = f.ferryd->stop();
  BOOST_TEST(stop.clean(), "ferryd did not stop cleanly");
}

/// A sandbox the "custom" environment's warm pool started ahead gets that environment's policy
/// (the pool's binder asks for it by the pool's id), and its decisions reach the task that took it.
void a_warm_sandbox_gets_its_environments_policy(const std::string& backend) {
  origin_servers origins;
  const uint16_t port = start_origins(origins);
  ferryd_under_test f(backend, {}, /*custom_warm=*/1);
  const std::string curl = "curl -sS -m 10 -o /dev/null";
  const std::string command =
    fmt::format("{0} -w 'a=%{{http_code}} ' http://allowed.test:{1}/w; {0} -w 'b=%{{http_code}}' http://denied.test:{1}/w",
                curl, port);
  // The pool may still be filling: bounded retries until a task takes a warm sandbox.
  std::string id;
  json done;
  for (int i = 0; i < 40 && id.empty(); ++i) {
    const std::string t = f.submit(command, "custom");
    done = f.wait_finished(t);
    if (text_of(done["sandbox"], "runtime_id").starts_with("w"))
      id = t;
    else
      std::this_thread::sleep_for(250ms);
  }
  BOOST_TEST_REQUIRE(!id.empty(), "no task took a warm sandbox; last: " << done.dump());
  const auto events = f.events(id);
  const auto ds = decisions(events);
  BOOST_TEST_CONTEXT("task: " << done.dump() << "\ndecisions:" << describe(ds)) {
    BOOST_TEST(stdout_of(events) == "a=200 b=403");
    BOOST_TEST_REQUIRE(ds.size() == 2u);
    BOOST_TEST(text_of(ds[0], "rule") == "custom:allow:allowed.test");
    BOOST_TEST(text_of(ds[1], "rule") == "custom:not-listed");
    for (const auto& d : ds)
      BOOST_TEST(text_of(d, "sandbox_id") == text_of(done["sandbox"], "runtime_id"));
  }
  BOOST_TEST(origins.connections(public_address_2) == 0);
  auto stop = f.ferryd->stop();
  BOOST_TEST(stop.clean(), "ferryd did not stop cleanly");
}

}  // namespace

BOOST_AUTO_TEST_SUITE(egress_ferryd)

BOOST_AUTO_TEST_CASE(bwrap_tasks_get_out_only_through_their_policy, *utf::precondition(needs_backend{"bwrap"})) {
  the_task_gets_out_only_through_its_policy("bwrap");
}

BOOST_AUTO_TEST_CASE(runsc_tasks_get_out_only_through_their_policy, *utf::precondition(needs_backend{"runsc"})) {
  the_task_gets_out_only_through_its_policy("runsc");
}

BOOST_AUTO_TEST_CASE(a_warm_bwrap_sandbox_gets_its_environments_policy, *utf::precondition(needs_backend{"bwrap"})) {
  a_warm_sandbox_gets_its_environments_policy("bwrap");
}

BOOST_AUTO_TEST_SUITE_END()

int main(int argc, char* argv[]) { return run_tests_in_network(argc, argv); }
