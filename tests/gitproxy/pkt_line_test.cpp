// The pkt-line parser and the receive-pack update-request parser (ferry/gitproxy/pkt_line.h):
// good inputs, every malformed shape, and the bounds (no read past the input, no packet over
// 65520 bytes, a bounded command list).
#define BOOST_TEST_MODULE gitproxy_pkt_line
#include <boost/test/unit_test.hpp>

#include <string>

#include "ferry/gitproxy/pkt_line.h"

namespace pkt = ferry::gitproxy::pkt;
using namespace std::string_literals;

namespace {
const std::string oid_a(40, 'a');
const std::string oid_b(40, 'b');
const std::string zero(40, '0');

std::string pkt_data(std::string_view payload) {
  std::string out;
  BOOST_REQUIRE(pkt::append_data(out, payload));
  return out;
}
}  // namespace

BOOST_AUTO_TEST_CASE(parses_data_and_special_packets) {
  auto r = pkt::parse_one("000ahello\n0000");
  BOOST_TEST((r.st == pkt::status::ok));
  BOOST_TEST((r.pkt.type == pkt::kind::data));
  BOOST_TEST(r.pkt.payload == "hello\n");
  BOOST_TEST(r.consumed == 10u);
  for (auto [text, k] : {std::pair{"0000", pkt::kind::flush}, std::pair{"0001", pkt::kind::delim},
                         std::pair{"0002", pkt::kind::response_end}}) {
    auto s = pkt::parse_one(text);
    BOOST_TEST((s.st == pkt::status::ok));
    BOOST_TEST((s.pkt.type == k));
    BOOST_TEST(s.consumed == 4u);
    BOOST_TEST(s.pkt.payload.empty());
  }
  auto empty = pkt::parse_one("0004");
  BOOST_TEST((empty.st == pkt::status::ok && empty.pkt.type == pkt::kind::data));
  BOOST_TEST(empty.pkt.payload.empty());
  // Upper-case hex is accepted.
  auto upper = pkt::parse_one("000Aabcdef");
  BOOST_TEST((upper.st == pkt::status::ok));
  BOOST_TEST(upper.pkt.payload == "abcdef");
}

BOOST_AUTO_TEST_CASE(refuses_every_malformed_length) {
  for (std::string bad : {"zzzz"s, "00g1"s, "-001"s, " 001"s, "0x10"s, "0003"s, "fff1"s,
                          "ffff"s, "\0\0\0\0"s})
    BOOST_TEST((pkt::parse_one(bad).st == pkt::status::malformed), "input " << bad);
  // A bad digit is refused as soon as it is seen, even in a short prefix.
  BOOST_TEST((pkt::parse_one("0g").st == pkt::status::malformed));
  // 65520 is the largest packet; 65521 is too long whatever follows.
  std::string max = "fff0" + std::string(65520 - 4, 'x');
  auto r = pkt::parse_one(max);
  BOOST_TEST((r.st == pkt::status::ok));
  BOOST_TEST(r.consumed == 65520u);
  BOOST_TEST((pkt::parse_one("fff1" + std::string(70000, 'x')).st == pkt::status::malformed));
  BOOST_TEST(!pkt::append_data(max, std::string(65517, 'x')));
}

BOOST_AUTO_TEST_CASE(truncated_input_needs_more_and_is_never_overread) {
  const std::string full = "000ahello\n";
  for (std::size_t n = 0; n < full.size(); ++n) {
    // A copy of exactly n bytes: ASan would flag a read past it.
    const std::string part = full.substr(0, n);
    auto r = pkt::parse_one(part);
    BOOST_TEST((r.st == pkt::status::need_more), "prefix of " << n);
    BOOST_TEST(r.consumed == 0u);
  }
}

BOOST_AUTO_TEST_CASE(ref_names_follow_git_rules) {
  for (auto good : {"refs/heads/main", "refs/heads/ferry/task-1", "refs/tags/v1.0",
                    "refs/heads/a.b_c-d"})
    BOOST_TEST(pkt::is_valid_ref_name(good), good);
  for (std::string bad :
       {""s, "main"s, "@"s, "refs/heads/../main"s, "refs/heads/a..b"s, "refs/heads/x@{1}"s,
        "refs/heads/x.lock"s, "refs/heads//x"s, "/refs/heads/x"s, "refs/heads/x/"s,
        "refs/heads/x."s, "refs/heads/.hidden"s, "refs/heads/a b"s, "refs/heads/a~1"s,
        "refs/heads/a^"s, "refs/heads/a:b"s, "refs/heads/a?"s, "refs/heads/a*"s,
        "refs/heads/a[b"s, "refs/heads/a\\b"s, "refs/heads/a\x01"s, "refs/heads/a\x7f"s,
        "refs/heads/\xc3\xa9"s, "refs/heads/a\nb"s, "refs/heads/a\0b"s,
        "refs/heads/" + std::string(1100, 'x')})
    BOOST_TEST(!pkt::is_valid_ref_name(bad), "accepted " << bad);
}

BOOST_AUTO_TEST_CASE(parses_an_update_request) {
  std::string body = pkt_data(oid_a + " " + oid_b + " refs/heads/ferry/x\0report-status side-band-64k agent=git/2"s) +
                     pkt_data(zero + " " + oid_b + " refs/heads/ferry/y\n") + "0000" + "PACKdata";
  auto r = pkt::parse_update_request(body);
  BOOST_TEST((r.st == pkt::status::ok), r.error);
  BOOST_REQUIRE(r.req.commands.size() == 2u);
  BOOST_TEST(r.req.commands[0].old_oid == oid_a);
  BOOST_TEST(r.req.commands[0].new_oid == oid_b);
  BOOST_TEST(r.req.commands[0].ref == "refs/heads/ferry/x");
  BOOST_TEST(r.req.commands[1].ref == "refs/heads/ferry/y");
  BOOST_TEST(pkt::has_capability(r.req, "side-band-64k"));
  BOOST_TEST(pkt::has_capability(r.req, "report-status"));
  BOOST_TEST(body.substr(r.req.consumed) == "PACKdata");

  // Every prefix of the command list needs more; nothing is decided on partial input.
  const std::size_t end = r.req.consumed;
  for (std::size_t n = 0; n < end; ++n)
    BOOST_TEST((pkt::parse_update_request(body.substr(0, n)).st == pkt::status::need_more),
               "prefix " << n);

  // Shallow lines before the commands, push options after the flush.
  std::string with = pkt_data("shallow " + oid_a) +
                     pkt_data(oid_a + " " + oid_b + " refs/heads/ferry/x\0push-options"s) + "0000" +
                     pkt_data("ci.skip") + "0000" + "PACK";
  auto w = pkt::parse_update_request(with);
  BOOST_TEST((w.st == pkt::status::ok), w.error);
  BOOST_TEST(w.req.shallow.size() == 1u);
  BOOST_TEST(w.req.push_options.size() == 1u);
  BOOST_TEST(with.substr(w.req.consumed) == "PACK");

  // git's probe before a large push: a lone flush.
  auto probe = pkt::parse_update_request("0000");
  BOOST_TEST((probe.st == pkt::status::ok));
  BOOST_TEST(probe.req.commands.empty());
}

BOOST_AUTO_TEST_CASE(refuses_malformed_update_requests) {
  const std::vector<std::string> bad = {
      pkt_data("push-cert\0report-status"s) + "0000",
      pkt_data(oid_a + " " + oid_b) + "0000",                              // no ref
      pkt_data(oid_a + oid_b + " refs/heads/x") + "0000",                  // no space
      pkt_data(std::string(39, 'a') + " " + oid_b + " refs/heads/x") + "0000",
      pkt_data(std::string(40, 'A') + " " + oid_b + " refs/heads/x") + "0000",  // upper case
      pkt_data(oid_a + " " + std::string(64, 'b') + " refs/heads/x") + "0000",  // mixed lengths
      pkt_data(oid_a + " " + oid_b + " refs/heads/x") + pkt_data(oid_a + " " + oid_b + " refs/heads/y\0caps"s) + "0000",
      pkt_data(oid_a + " " + oid_b + " refs/heads/x") + "0001",             // delimiter
      pkt_data("shallow xyz") + "0000",
      pkt_data("shallow " + oid_a) + "0000",                               // shallow, no commands
      pkt_data(oid_a + " " + oid_b + " refs/heads/x\0bad\x01"s + "cap") + "0000",
      "00zz",
  };
  for (const auto& b : bad) {
    auto r = pkt::parse_update_request(b);
    BOOST_TEST((r.st == pkt::status::malformed), "accepted " << b);
    BOOST_TEST(!r.error.empty());
  }
}

BOOST_AUTO_TEST_CASE(the_command_list_is_bounded) {
  std::string body = pkt_data(oid_a + " " + oid_b + " refs/heads/ferry/x0\0report-status"s);
  for (int i = 1; i < 20; ++i)
    body += pkt_data(oid_a + " " + oid_b + " refs/heads/ferry/x" + std::to_string(i));
  body += "0000";
  BOOST_TEST((pkt::parse_update_request(body, 20).st == pkt::status::ok));
  auto r = pkt::parse_update_request(body, 19);
  BOOST_TEST((r.st == pkt::status::malformed));
  BOOST_TEST(r.error.find("too many") != std::string::npos);
}
