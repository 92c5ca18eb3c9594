// The request head's destination and token (request_head.h).
#include "request_head.h"

#include <openssl/evp.h>

#include <charconv>

#include <fmt/format.h>

#include <ferry/egress/policy.h>

namespace ferry::egress {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size())
    return false;
  for (size_t i = 0; i < a.size(); ++i) {
    auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i]))
      return false;
  }
  return true;
}

bool istarts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

/// base64 → bytes (OpenSSL's decoder; it counts padding as zero bytes, which are dropped).
std::optional<std::string> base64_decode(std::string_view in) {
  if (in.empty() || in.size() % 4 != 0 || in.size() > 8192)
    return std::nullopt;
  std::string out(in.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(in.data()),
                          static_cast<int>(in.size()));
  if (n < 0)
    return std::nullopt;
  size_t pad = in.ends_with("==") ? 2 : in.ends_with("=") ? 1 : 0;
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

/// The token in `Proxy-Authorization: Basic base64(user:token)` or `Bearer token`.
std::optional<std::string> token_from(std::string_view header) {
  auto space = header.find(' ');
  if (space == std::string_view::npos)
    return std::nullopt;
  std::string_view scheme = header.substr(0, space), value = header.substr(space + 1);
  while (!value.empty() && value.front() == ' ')
    value.remove_prefix(1);
  while (!value.empty() && value.back() == ' ')
    value.remove_suffix(1);
  if (iequals(scheme, "Bearer"))
    return std::string(value);
  if (!iequals(scheme, "Basic"))
    return std::nullopt;
  auto decoded = base64_decode(value);
  if (!decoded)
    return std::nullopt;
  auto colon = decoded->find(':');
  if (colon == std::string::npos)
    return std::nullopt;
  return decoded->substr(colon + 1);
}

result<target> parse_authority(std::string_view authority, std::optional<uint16_t> default_port) {
  if (authority.empty())
    return fail(errc::invalid_argument, "empty authority");
  if (authority.find('@') != std::string_view::npos)
    return fail(errc::invalid_argument, "user info in the authority is refused");
  std::string_view host = authority, port_text;
  if (authority.front() == '[') {
    auto close = authority.find(']');
    if (close == std::string_view::npos)
      return fail(errc::invalid_argument, "unterminated IPv6 literal");
    host = authority.substr(0, close + 1);
    std::string_view rest = authority.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':')
        return fail(errc::invalid_argument, "garbage after the IPv6 literal");
      port_text = rest.substr(1);
    }
  } else if (auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    if (authority.find(':') != colon)
      return fail(errc::invalid_argument, "an IPv6 literal needs brackets");
    host = authority.substr(0, colon);
    port_text = authority.substr(colon + 1);
  }
  target t;
  if (port_text.empty() && authority.back() != ':') {
    if (!default_port)
      return fail(errc::invalid_argument, "CONNECT needs host:port");
    t.port = *default_port;
  } else {
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), value);
    if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() || value == 0 ||
        value > 65535)
      return fail(errc::invalid_argument, fmt::format("bad port '{}'", port_text));
    t.port = static_cast<uint16_t>(value);
  }
  auto normal = normalize_host(host);
  if (!normal)
    return normal.error();
  t.host = std::move(*normal);
  return t;
}

result<target> parse_target(bool connect, std::string_view raw) {
  if (connect)
    return parse_authority(raw, std::nullopt);
  if (!istarts_with(raw, "http://")) {
    if (raw.starts_with("/"))
      return fail(errc::invalid_argument, "origin-form request: this is a proxy, send an absolute http:// URI or CONNECT");
    return fail(errc::invalid_argument, "only http:// absolute URIs and CONNECT are proxied (use CONNECT for https)");
  }
  std::string_view rest = raw.substr(7);
  auto end = rest.find_first_of("/?#");
  auto t = parse_authority(rest.substr(0, end), 80);
  if (!t)
    return t;
  std::string_view path = end == std::string_view::npos ? std::string_view() : rest.substr(end);
  if (auto hash = path.find('#'); hash != std::string_view::npos)
    path = path.substr(0, hash);
  t->path = path.empty() ? "/" : path.front() == '?' ? "/" + std::string(path) : std::string(path);
  return t;
}

}  // namespace ferry::egress
