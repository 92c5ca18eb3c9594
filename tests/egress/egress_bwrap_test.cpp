// The egress proxy as a real bubblewrap sandbox sees it: the runtime's egress binder
// (make_egress_binder) gives the sandbox a socket of its own in its control directory
// (/.ferry/ctl/egress.sock inside), ferry-init's forwarder on 127.0.0.1:3128 inside, and curl run by the
// sandbox's own commands — allowed destinations reached, internal ones and a missing token
// refused (the listeners see nothing), no way around the proxy. In the test's own network
// namespace (test_network.h). Needs root and bwrap.
#define BOOST_TEST_NO_MAIN
#include <boost/test/unit_test.hpp>

#define FERRY_TEST_BACKEND "bwrap"
#include "backend_test_support.h"

#include <ferry/egress/egress_proxy.h>

#include "test_network.h"

using namespace ferry::egress;
using namespace ferry::egress::testing;
namespace sbx = ferry::sandbox;
namespace utf = boost::unit_test;

namespace {

boost::test_tools::assertion_result network_and_bwrap(utf::test_unit_id id) {
  auto net = needs_network()(id);
  if (!net)
    return net;
  return sbx::testing::bwrap_available(id);
}

/// The test's directory and, in it, the one the sandboxes' egress sockets go to.
struct socket_dirs {
  sbx::testing::temp_dir tmp;
  fs::path sockets = tmp.path() / "egress";
  socket_dirs() {
    fs::create_directories(sockets);
    // The sandbox's uid must reach its socket: o+x on the directory, the socket itself is 0666.
    fs::permissions(tmp.path(), fs::perms::others_exec, fs::perm_options::add);
    fs::permissions(sockets, fs::perms::others_exec, fs::perm_options::add);
  }
};

/// A listener on the public address (port 0) added to `origins`; its port.
uint16_t listen_public(origin_servers& origins) {
  int first = tcp_listen(public_address, 0);
  const uint16_t port = local_port(first);
  origins.add(first, public_address);
  return port;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(egress_bwrap, *utf::precondition(network_and_bwrap))

BOOST_AUTO_TEST_CASE(commands_in_a_bwrap_sandbox_get_out_only_through_the_proxy_and_its_policy) {
  socket_dirs dirs;
  const auto& tmp = dirs.tmp;
  const fs::path& sockets = dirs.sockets;
  origin_servers origins;
  const uint16_t port = listen_public(origins);
  for (const auto& a : internal_addresses)
    origins.add(tcp_listen(a, port), a);
  origins.start();

  std::mutex mu;
  std::vector<egress_decision> decisions;
  egress_proxy_options options;
  options.socket_dir = sockets;
  options.tokens = sandbox_tokens::open(tmp.path()).value();
  options.observer = [&](const egress_decision& d) {
    std::lock_guard lock(mu);
    decisions.push_back(d);
  };
  std::shared_ptr<egress_proxy> proxy = make_egress_proxy(options).value();
  const std::string id = sbx::testing::unique_id("eg", "curl");
  // rebind.test and metadata.test are allowed by name: only the address check can stop them.
  const auto policy =
    egress_policy::custom({"allowed.test", "tunnel.test", "rebind.test", "metadata.test"}, {}).value();
  // Another sandbox's token, and one signed by another key: the proxy knows them for what they are.
  const std::string foreign_token = options.tokens->issue(id + "x", policy).value();
  sbx::testing::temp_dir other_key;
  const std::string forged_token = sandbox_tokens::open(other_key.path()).value()->issue(id, policy).value();

  // The runtime opens the sandbox's socket (in its ctl/) before the start, with its policy, and
  // gives ferry-init the token that goes into the proxy URLs.
  std::vector<std::string> asked;
  auto config = sbx::testing::test_config(tmp.path());
  config.egress = make_egress_binder(proxy, options.tokens, [&](const std::string& sandbox_id) {
    std::lock_guard lock(mu);
    asked.push_back(sandbox_id);
    return sandbox_egress{sandbox_id == id ? policy : egress_policy::none(), {}};
  });
  auto runtime = sbx::make_runtime(config);
  BOOST_REQUIRE_MESSAGE(runtime.ok(), (runtime.ok() ? "" : runtime.error().message));
  sbx::testing::recording_observer obs;
  sbx::sandbox_spec spec;
  spec.id = id;
  auto sb = (*runtime)->start(spec, obs);
  BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));

  auto with = [](const std::string& token) { return fmt::format("--proxy http://ferry:{}@127.0.0.1:3128", token); };
  auto run = [&](uint32_t n, const std::string& line) {
    auto r = sbx::testing::run_to_end(**sb, obs, sbx::testing::shell(n, line), 60s);
    return std::pair{obs.output(n, 0), obs.output(n, 1)};
  };
  // --noproxy '': ferry-init's NO_PROXY exempts 127.0.0.1, which would send the literal below
  // straight at the sandbox's own loopback instead of the proxy.
  const std::string curl = "curl -sS -m 10 --noproxy '' -o /tmp/body -w '%{http_code} %{http_connect}'";

  // HTTP_PROXY as ferry-init sets it: with the sandbox's token.
  auto [plain, plain_err] = run(1, fmt::format("{} http://allowed.test:{}/inside; echo; cat /tmp/body", curl, port));
  BOOST_TEST(plain.starts_with("200 000\n"), plain << plain_err);
  BOOST_TEST(plain.find("origin 198.51.100.10 got:\nGET /inside HTTP/1.1") != std::string::npos, plain);
  auto [tunnel, tunnel_err] = run(2, fmt::format("{} -p http://tunnel.test:{}/tunnelled", curl, port));
  BOOST_TEST(tunnel == "200 200", tunnel << tunnel_err);
  BOOST_TEST(origins.connections(public_address) == 2);

  // Refused: internal names (plain and CONNECT), a literal, no token, another sandbox's token,
  // a token of another key; and nothing gets out around the proxy.
  auto [rebind, e3] = run(3, fmt::format("{} http://rebind.test:{}/", curl, port));
  BOOST_TEST(rebind == "403 000", rebind << e3);
  auto [metadata, e4] = run(4, fmt::format("{} -p http://metadata.test:{}/", curl, port));
  BOOST_TEST(metadata == "000 403", metadata << e4);
  auto [literal, e5] = run(5, fmt::format("{} http://0x7f.1:{}/", curl, port));
  BOOST_TEST(literal == "403 000", literal << e5);
  auto [no_token, e6] = run(6, fmt::format("{} --proxy http://127.0.0.1:3128 http://allowed.test:{}/", curl, port));
  BOOST_TEST(no_token == "407 000", no_token << e6);
  auto [foreign, e8] = run(8, fmt::format("{} {} http://allowed.test:{}/", curl, with(foreign_token), port));
  BOOST_TEST(foreign == "407 000", foreign << e8);
  auto [forged, e9] = run(9, fmt::format("{} {} http://allowed.test:{}/", curl, with(forged_token), port));
  BOOST_TEST(forged == "407 000", forged << e9);
  auto [direct, e7] = run(7, fmt::format("curl -sS -m 5 --noproxy '*' http://{}:{}/ >/dev/null 2>&1 && echo OUT || "
                                         "echo blocked", public_address, port));
  BOOST_TEST(direct == "blocked\n");
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  BOOST_TEST(origins.connections(public_address) == 2);
  for (const auto& a : internal_addresses)
    BOOST_TEST(origins.connections(a) == 0, a);

  {
    std::lock_guard lock(mu);
    std::map<std::string, std::string> rules;
    std::vector<std::string> seen_by_proxy;
    for (const auto& d : decisions) {
      BOOST_TEST(d.sandbox_id == id);
      rules[d.host + (d.method == "CONNECT" ? " CONNECT" : "")] = (d.allowed ? "allowed " : "denied ") + d.rule;
      seen_by_proxy.push_back(d.host + (d.allowed ? " allowed " : " denied ") + d.rule);
    }
    std::vector<std::string> token_rules;
    for (const auto& d : decisions)
      if (d.rule.starts_with("token:"))
        token_rules.push_back(d.rule);
    BOOST_TEST(token_rules == (std::vector<std::string>{"token:missing", "token:wrong-sandbox", "token:bad-signature"}),
               fmt::format("{}", fmt::join(token_rules, ", ")));
    // The sandbox's observer heard the same decisions, in the same order.
    std::vector<std::string> seen_by_sandbox;
    for (const auto& r : obs.records())
      if (r.what == "egress")
        seen_by_sandbox.push_back(r.data);
    BOOST_TEST(seen_by_sandbox == seen_by_proxy, fmt::format("{}", fmt::join(seen_by_sandbox, "; ")));
    BOOST_TEST(rules["allowed.test"] == "denied token:bad-signature");  // the last one for that host
    BOOST_TEST(rules["tunnel.test CONNECT"] == "allowed custom:allow:tunnel.test");
    BOOST_TEST(rules["rebind.test"] == "denied address:private 10.0.0.1");
    BOOST_TEST(rules["metadata.test CONNECT"] == "denied address:link-local 169.254.169.254");
    BOOST_TEST(rules["127.0.0.1"] == "denied address:loopback 127.0.0.1");
  }

  BOOST_TEST(asked == std::vector<std::string>{id});
  BOOST_TEST(fs::is_socket(tmp.path() / "sandboxes" / id / "ctl" / "egress.sock"));
  BOOST_REQUIRE((*sb)->release().ok());
  (*sb)->wait();
  // The sandbox's end closed its socket in the proxy.
  BOOST_TEST((proxy->close_sandbox(id).error().code == ferry::errc::not_found));
  proxy->stop();
}

// Tokens that live 2 s: once expired the sandbox's requests get 407 (token:expired); after
// renew_egress() commands started from then on — a new one, and one in a persistent session whose
// saved state holds the old proxy URL — get out again.
BOOST_AUTO_TEST_CASE(a_renewed_egress_token_reaches_new_commands_and_sessions) {
  socket_dirs dirs;
  const auto& tmp = dirs.tmp;
  const fs::path& sockets = dirs.sockets;
  origin_servers origins;
  const uint16_t port = listen_public(origins);
  origins.start();

  std::mutex mu;
  std::vector<egress_decision> decisions;
  egress_proxy_options options;
  options.socket_dir = sockets;
  token_options short_lived;
  short_lived.lifetime = std::chrono::seconds(2);
  options.tokens = sandbox_tokens::open(tmp.path(), short_lived).value();
  options.observer = [&](const egress_decision& d) {
    std::lock_guard lock(mu);
    decisions.push_back(d);
  };
  std::shared_ptr<egress_proxy> proxy = make_egress_proxy(options).value();
  const auto policy = egress_policy::custom({"allowed.test"}, {}).value();
  auto config = sbx::testing::test_config(tmp.path());
  config.egress = make_egress_binder(proxy, options.tokens,
                                     [&](const std::string&) { return sandbox_egress{policy, {}}; });
  auto runtime = sbx::make_runtime(config);
  BOOST_REQUIRE_MESSAGE(runtime.ok(), (runtime.ok() ? "" : runtime.error().message));
  sbx::testing::recording_observer obs;
  sbx::sandbox_spec spec;
  spec.id = sbx::testing::unique_id("eg", "renew");
  auto sb = (*runtime)->start(spec, obs);
  BOOST_REQUIRE_MESSAGE(sb.ok(), (sb.ok() ? "" : sb.error().message));

  const std::string curl = fmt::format("curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://allowed.test:{}/", port);
  auto run = [&](uint32_t n, const std::string& line, const std::string& session = "") {
    (void)sbx::testing::run_to_end(**sb, obs, sbx::testing::shell(n, line, session), 60s);
    return obs.output(n, 0) + obs.output(n, 1);
  };
  BOOST_TEST(run(1, curl) == "200");
  BOOST_TEST(run(2, "true", "s") == "");  // the session saves its state, proxy URL included
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));
  BOOST_TEST(run(3, curl) == "407");  // expired: what renewal is for
  auto renewed = (*sb)->renew_egress();
  BOOST_REQUIRE_MESSAGE(renewed.ok(), (renewed.ok() ? "" : renewed.error().message));
  BOOST_TEST(run(4, curl) == "200");
  BOOST_TEST(run(5, curl, "s") == "200");
  {
    std::lock_guard lock(mu);
    std::vector<std::string> rules;
    for (const auto& d : decisions)
      rules.push_back(d.allowed ? "allowed" : d.rule);
    BOOST_TEST(rules == (std::vector<std::string>{"allowed", "token:expired", "allowed", "allowed"}),
               fmt::format("{}", fmt::join(rules, ", ")));
  }
  // A sandbox the binder does not have open cannot be renewed.
  auto not_open = config.egress->renew("not-open");
  BOOST_TEST((!not_open && not_open.error().code == ferry::errc::not_found));
  BOOST_REQUIRE((*sb)->release().ok());
  (*sb)->wait();
}

BOOST_AUTO_TEST_SUITE_END()

int main(int argc, char* argv[]) { return run_tests_in_network(argc, argv); }
