#pragma once
// Private to ferry_egress: what the proxy reads out of a request's head before anything else —
// the destination (CONNECT's authority-form or an absolute http:// URI) and the sandbox token in
// Proxy-Authorization. Pure functions over untrusted bytes, apart from Beast's parser of the
// head itself (tests/fuzz/fuzz_egress_request.cpp fuzzes both).

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <ferry/schemas/result.h>

namespace ferry::egress {

/// A request's destination.
struct target {
  std::string host;  // normalised (normalize_host)
  uint16_t port = 0;
  std::string path;  // origin-form for the upstream (plain HTTP only)
};

/// ASCII case-insensitive comparisons (header names and schemes).
bool iequals(std::string_view a, std::string_view b);
bool istarts_with(std::string_view s, std::string_view prefix);

/// `host[:port]` or `[v6][:port]`; no user info; `default_port` when none is given (none:
/// required, as CONNECT's).
result<target> parse_authority(std::string_view authority, std::optional<uint16_t> default_port);

/// The destination of a CONNECT (`connect`: authority-form) or of an absolute `http://` URI,
/// with the origin-form path the upstream gets; anything else is refused with the reason.
result<target> parse_target(bool connect, std::string_view raw);

/// base64 → bytes (OpenSSL's decoder); nullopt for anything that is not base64 or over 8 KiB.
std::optional<std::string> base64_decode(std::string_view in);

/// The token in `Proxy-Authorization: Basic base64(user:token)` or `Bearer token`.
std::optional<std::string> token_from(std::string_view header);

}  // namespace ferry::egress
