// libFuzzer target: what the egress proxy reads from a sandbox before anything else — a request
// head through Beast's parser (the proxy's limits), then the destination (CONNECT authority-form
// or absolute http:// URI, request_head.h) and the token in Proxy-Authorization; and the same
// functions on the raw bytes. A crash, an out-of-bounds read or UB is a finding; so is a
// destination the parser accepts whose host the policy's normaliser would not.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <ferry/egress/policy.h>

#include "request_head.h"

namespace http = boost::beast::http;
using namespace ferry::egress;

namespace {

void check_target(bool connect, std::string_view raw) {
  auto t = parse_target(connect, raw);
  if (!t)
    return;
  // An accepted host is already normal: normalising it again changes nothing.
  auto again = normalize_host(t->host);
  if (!again || *again != t->host || t->port == 0)
    __builtin_trap();
  if (!connect && (t->path.empty() || t->path.front() != '/'))
    __builtin_trap();
  (void)parse_ip_literal(t->host);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  check_target(true, in);
  check_target(false, in);
  (void)token_from(in);
  (void)base64_decode(in);

  http::request_parser<http::empty_body> parser;
  parser.header_limit(16 * 1024);
  boost::beast::error_code ec;
  parser.put(boost::asio::buffer(data, size), ec);
  if (!ec || parser.is_header_done()) {
    const auto& req = parser.get();
    check_target(req.method() == http::verb::connect, std::string_view(req.target().data(), req.target().size()));
    if (auto auth = req.find(http::field::proxy_authorization); auth != req.end())
      (void)token_from(std::string_view(auth->value().data(), auth->value().size()));
  }
  return 0;
}
