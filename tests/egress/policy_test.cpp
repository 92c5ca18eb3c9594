// ferry::egress policy: host names, IP literals in every notation, the address checks, domain
// patterns, the org bound and the JSON form.
#define BOOST_TEST_MODULE egress_policy
#include <boost/test/unit_test.hpp>

#include <ferry/egress/policy.h>

namespace ip = boost::asio::ip;
using namespace ferry::egress;

namespace {

std::string literal_text(std::string_view host) {
  auto r = parse_ip_literal(host);
  BOOST_REQUIRE_MESSAGE(r.ok(), std::string(host) + ": " + (r.ok() ? "" : r.error().message));
  BOOST_REQUIRE_MESSAGE(r->has_value(), std::string(host) + " was not taken as a literal");
  return (*r)->to_string();
}

std::string refusal(std::string_view address) {
  auto why = address_refusal(ip::make_address(std::string(address)));
  return why.value_or("");
}

}  // namespace

BOOST_AUTO_TEST_CASE(host_names_are_lower_cased_and_lose_one_trailing_dot) {
  BOOST_TEST(normalize_host("Example.COM").value() == "example.com");
  BOOST_TEST(normalize_host("example.com.").value() == "example.com");
  BOOST_TEST(normalize_host("xn--bcher-kva.example").value() == "xn--bcher-kva.example");
  BOOST_TEST(normalize_host("a-b.c0").value() == "a-b.c0");
}

BOOST_AUTO_TEST_CASE(garbage_and_raw_idn_host_names_are_refused_with_a_reason) {
  for (const std::string& bad : std::vector<std::string>{"", ".", "a..b", "exa mple.com", "under_score.com", "-lead.com", "trail-.com", "a/b",
                          "example.com..", "host%00", std::string(64, 'a') + ".com", "bücher.example", "[::1"}) {
    auto r = normalize_host(bad);
    BOOST_TEST(!r.ok(), "accepted '" << bad << "'");
    if (!r.ok())
      BOOST_TEST(!r.error().message.empty());
  }
  BOOST_TEST(normalize_host("bücher.example").error().message.find("punycode") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(every_ipv4_notation_denotes_its_address) {
  for (auto n : {"127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.1", "0x7F.0.0.1", "127.1", "127.0.1", "0x7f000001",
                 "017700000001", "127.0.0.1."})
    BOOST_TEST(literal_text(n) == "127.0.0.1", n);
  BOOST_TEST(literal_text("10.1") == "10.0.0.1");
  BOOST_TEST(literal_text("0xa9.0xfe.0xa9.0xfe") == "169.254.169.254");
  BOOST_TEST(literal_text("2852039166") == "169.254.169.254");
  BOOST_TEST(literal_text("0") == "0.0.0.0");
  // And normalize_host gives the canonical text, which is what the policy sees.
  BOOST_TEST(normalize_host("0X7F.1").value() == "127.0.0.1");
}

BOOST_AUTO_TEST_CASE(bracketed_ipv6_literals_parse_and_zone_ids_are_refused) {
  BOOST_TEST(literal_text("[::1]") == "::1");
  BOOST_TEST(literal_text("[::ffff:7f00:1]") == "::ffff:127.0.0.1");
  BOOST_TEST(literal_text("[::FFFF:127.0.0.1]") == "::ffff:127.0.0.1");
  BOOST_TEST(normalize_host("[::1]").value() == "[::1]");
  BOOST_TEST(!parse_ip_literal("[fe80::1%eth0]").ok());
  BOOST_TEST(parse_ip_literal("[fe80::1%25eth0]").error().message.find("zone") != std::string::npos);
  BOOST_TEST(!parse_ip_literal("::1").ok());         // brackets required
  BOOST_TEST(!parse_ip_literal("[::1:]").ok());
}

BOOST_AUTO_TEST_CASE(names_ending_in_a_number_are_literals_or_refused) {
  BOOST_TEST(!parse_ip_literal("1.2.3.999").ok());
  BOOST_TEST(!parse_ip_literal("foo.123").ok());
  BOOST_TEST(!parse_ip_literal("0x7g.1").ok());
  BOOST_TEST(!parse_ip_literal("1.2.3.4.5").ok());
  BOOST_TEST(!normalize_host("1.2.3.4 ").ok());
  auto name = parse_ip_literal("3com.com");
  BOOST_TEST(name.ok());
  BOOST_TEST(!name->has_value());
}

BOOST_AUTO_TEST_CASE(internal_ipv4_ranges_are_refused_by_kind) {
  const std::pair<const char*, const char*> cases[] = {
    {"0.0.0.0", "this-network"},      {"0.1.2.3", "this-network"},    {"127.0.0.1", "loopback"},
    {"127.255.0.9", "loopback"},      {"10.0.0.1", "private"},        {"10.255.255.255", "private"},
    {"172.16.0.1", "private"},        {"172.31.255.1", "private"},    {"192.168.1.1", "private"},
    {"169.254.169.254", "link-local"}, {"169.254.0.1", "link-local"}, {"100.64.0.1", "cgnat"},
    {"100.127.255.254", "cgnat"},     {"224.0.0.1", "multicast"},     {"239.255.255.250", "multicast"},
    {"255.255.255.255", "broadcast"}, {"240.0.0.1", "reserved"},
  };
  for (auto [address, kind] : cases) {
    auto why = refusal(address);
    BOOST_TEST(why.starts_with(kind), address << " → '" << why << "', expected " << kind);
    BOOST_TEST(why.find(address) != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(public_addresses_pass_including_next_to_internal_ranges) {
  for (auto a : {"198.51.100.10", "8.8.8.8", "172.32.0.1", "172.15.255.255", "100.128.0.1", "100.63.255.255",
                 "169.255.0.1", "11.0.0.1", "223.255.255.255", "2606:4700::1111", "::ffff:198.51.100.10",
                 "2002:c633:640a::1", "64:ff9b::c633:640a"})
    BOOST_TEST(refusal(a).empty(), a << " refused: " << refusal(a));
}

BOOST_AUTO_TEST_CASE(internal_ipv6_and_embedded_ipv4_are_refused) {
  const std::pair<const char*, const char*> cases[] = {
    {"::1", "loopback"},
    {"::", "unspecified"},
    {"::ffff:127.0.0.1", "ipv4-mapped ::ffff:127.0.0.1 (loopback 127.0.0.1)"},
    {"::ffff:10.0.0.1", "ipv4-mapped ::ffff:10.0.0.1 (private 10.0.0.1)"},
    {"::ffff:169.254.169.254", "ipv4-mapped"},
    {"::10.0.0.1", "ipv4-compatible"},
    {"::127.0.0.1", "ipv4-compatible"},
    {"64:ff9b::a9fe:a9fe", "nat64 64:ff9b::a9fe:a9fe (link-local 169.254.169.254)"},
    {"64:ff9b:1::1", "nat64-local"},
    {"2002:7f00:1::", "6to4 2002:7f00:1:: (loopback 127.0.0.1)"},
    {"2002:c0a8:0101::1", "6to4"},
    {"fc00::1", "unique-local"},
    {"fd12:3456::1", "unique-local"},
    {"fe80::1", "link-local"},
    {"febf::1", "link-local"},
    {"fec0::1", "site-local"},
    {"ff02::1", "multicast"},
    {"2001:0:4136:e378::1", "teredo"},
  };
  for (auto [address, expected] : cases) {
    auto why = refusal(address);
    BOOST_TEST(why.starts_with(expected), address << " → '" << why << "', expected " << expected);
  }
}

BOOST_AUTO_TEST_CASE(patterns_match_exact_names_subdomains_and_ports) {
  auto exact = domain_pattern::parse("Example.com").value();
  BOOST_TEST(exact.matches("example.com", 443));
  BOOST_TEST(exact.matches("example.com", 8080));
  BOOST_TEST(!exact.matches("www.example.com", 443));
  auto wild = domain_pattern::parse("*.example.com").value();
  BOOST_TEST(wild.matches("www.example.com", 443));
  BOOST_TEST(wild.matches("a.b.example.com", 80));
  BOOST_TEST(!wild.matches("example.com", 443));  // subdomains only
  BOOST_TEST(!wild.matches("badexample.com", 443));
  BOOST_TEST(!wild.matches("example.com.evil.org", 443));
  auto port = domain_pattern::parse("*.example.com:8443").value();
  BOOST_TEST(port.matches("api.example.com", 8443));
  BOOST_TEST(!port.matches("api.example.com", 443));
  BOOST_TEST(port.to_string() == "*.example.com:8443");
  for (auto bad : {"", "*.", "*.com:0", "example.com:65536", "example.com:x", "exa mple.com", "**.example.com",
                   "*.10.0.0.1", "example.com:"})
    BOOST_TEST(!domain_pattern::parse(bad).ok(), "accepted '" << bad << "'");
}

BOOST_AUTO_TEST_CASE(levels_decide_and_deny_wins_over_allow) {
  BOOST_TEST(!egress_policy::none().decide("example.com", 443).allowed);
  BOOST_TEST(egress_policy::full().decide("example.com", 443).allowed);
  auto trusted = egress_policy::trusted();
  BOOST_TEST(trusted.decide("registry.npmjs.org", 443).allowed);
  BOOST_TEST(trusted.decide("github.com", 443).rule == "policy:trusted");
  BOOST_TEST(!trusted.decide("github.com", 22).allowed);
  BOOST_TEST(!trusted.decide("evil.github.com.example", 443).allowed);
  BOOST_TEST(trusted.decide("evil.example", 443).not_listed);

  auto custom = egress_policy::custom({"*.example.com", "example.com:443"}, {"secret.example.com"}).value();
  BOOST_TEST(custom.decide("www.example.com", 80).allowed);
  BOOST_TEST(custom.decide("www.example.com", 80).rule == "custom:allow:*.example.com");
  BOOST_TEST(custom.decide("example.com", 443).allowed);
  BOOST_TEST(!custom.decide("example.com", 80).allowed);
  auto denied = custom.decide("secret.example.com", 443);
  BOOST_TEST(!denied.allowed);
  BOOST_TEST(denied.rule == "custom:deny:secret.example.com");
  BOOST_TEST(!denied.not_listed);
  auto unlisted = custom.decide("other.org", 443);
  BOOST_TEST(!unlisted.allowed);
  BOOST_TEST(unlisted.rule == "custom:not-listed");
  BOOST_TEST(unlisted.not_listed);
  // An IP literal matches only full or an exact pattern of its canonical text.
  BOOST_TEST(!custom.decide("198.51.100.10", 443).allowed);
  auto by_address = egress_policy::custom({"198.51.100.10:443"}, {}).value();
  BOOST_TEST(by_address.decide(normalize_host("3325256714").value(), 443).allowed);
}

BOOST_AUTO_TEST_CASE(the_org_policy_bounds_the_sandbox_policy_and_approvals) {
  auto org = egress_policy::custom({"*.example.com", "pypi.org"}, {"evil.example.com"}).value();
  auto sandbox = egress_policy::full();
  BOOST_TEST(decide_destination(org, sandbox, {}, "www.example.com", 443).allowed);
  auto out = decide_destination(org, sandbox, {}, "other.org", 443);
  BOOST_TEST(!out.allowed);
  BOOST_TEST(out.rule == "org:deny:custom:not-listed");
  BOOST_TEST(!out.not_listed);  // not approvable
  BOOST_TEST(decide_destination(org, sandbox, {}, "evil.example.com", 443).rule == "org:deny:custom:deny:evil.example.com");

  // A sandbox policy narrower than the org: not-listed is approvable; an approval lets it through,
  // but never past the org or an explicit deny.
  auto narrow = egress_policy::custom({"pypi.org"}, {"blocked.example.com"}).value();
  auto unlisted = decide_destination(org, narrow, {}, "www.example.com", 443);
  BOOST_TEST(!unlisted.allowed);
  BOOST_TEST(unlisted.not_listed);
  std::vector<domain_pattern> approvals = {domain_pattern::parse("www.example.com:443").value(),
                                           domain_pattern::parse("other.org").value(),
                                           domain_pattern::parse("blocked.example.com").value()};
  auto approved = decide_destination(org, narrow, approvals, "www.example.com", 443);
  BOOST_TEST(approved.allowed);
  BOOST_TEST(approved.rule == "approval:www.example.com:443");
  BOOST_TEST(!decide_destination(org, narrow, approvals, "www.example.com", 80).allowed);
  BOOST_TEST(decide_destination(org, narrow, approvals, "other.org", 443).rule.starts_with("org:deny"));
  BOOST_TEST(decide_destination(org, narrow, approvals, "blocked.example.com", 443).rule ==
             "custom:deny:blocked.example.com");
  BOOST_TEST(!decide_destination(egress_policy::none(), egress_policy::full(), {}, "pypi.org", 443).allowed);
}

BOOST_AUTO_TEST_CASE(json_round_trips_and_bad_input_says_what_is_wrong) {
  auto custom = egress_policy::custom({"*.example.com:443"}, {"x.example.com"}).value();
  auto back = egress_policy::from_json(custom.to_json());
  BOOST_REQUIRE(back.ok());
  BOOST_TEST((back.value() == custom));
  BOOST_TEST(custom.to_json().dump() == R"({"allow":["*.example.com:443"],"deny":["x.example.com"],"level":"custom"})");
  for (auto level : {egress_policy::none(), egress_policy::trusted(), egress_policy::full()})
    BOOST_TEST((egress_policy::from_json(level.to_json()).value() == level));

  const std::pair<const char*, const char*> bad[] = {
    {R"([])", "JSON object"},
    {R"({})", "'level'"},
    {R"({"level": 3})", "'level'"},
    {R"({"level": "open"})", "unknown level 'open'"},
    {R"({"level": "full", "allow": ["a.com"]})", "only for level custom"},
    {R"({"level": "custom", "allow": "a.com"})", "array of strings"},
    {R"({"level": "custom", "allow": [1]})", "array of strings"},
    {R"({"level": "custom", "allow": ["a..com"]})", "pattern 'a..com'"},
    {R"({"level": "custom", "deny": ["*.com:99999"]})", "bad port"},
    {R"({"level": "custom", "alow": []})", "unknown field 'alow'"},
  };
  for (auto [text, expected] : bad) {
    auto r = egress_policy::from_json(nlohmann::json::parse(text));
    BOOST_TEST_REQUIRE(!r.ok(), text);
    BOOST_TEST(r.error().message.find(expected) != std::string::npos, text << " → " << r.error().message);
  }
}

BOOST_AUTO_TEST_CASE(the_hash_changes_with_the_policy_and_only_with_it) {
  auto a = egress_policy::custom({"a.com"}, {}).value();
  auto b = egress_policy::custom({"a.com", "b.com"}, {}).value();
  BOOST_TEST(a.hash() == egress_policy::custom({"A.com."}, {}).value().hash());
  BOOST_TEST(a.hash() != b.hash());
  BOOST_TEST(egress_policy::full().hash() != egress_policy::trusted().hash());
  BOOST_TEST(a.hash().size() == 64u);
}
