// Policy matching, host-name normalisation, IP literals and the address checks. Numeric IPv4
// notations are left to libc's inet_aton (the classic BSD forms), IPv6 to inet_pton.

#include <ferry/egress/policy.h>

#include <arpa/inet.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <charconv>

#include <fmt/format.h>

namespace ferry::egress {
namespace {

namespace ip = boost::asio::ip;

constexpr size_t max_host_length = 253;
constexpr size_t max_label_length = 63;

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_ldh(char c) { return (c >= 'a' && c <= 'z') || is_digit(c) || c == '-'; }

std::string lower_ascii(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c); });
  return out;
}

/// Why a lower-case name without trailing dot is not a DNS host name, or empty.
std::string name_problem(std::string_view name) {
  if (name.empty())
    return "empty host name";
  if (name.size() > max_host_length)
    return fmt::format("host name longer than {} characters", max_host_length);
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('.', start);
    if (end == std::string_view::npos)
      end = name.size();
    std::string_view label = name.substr(start, end - start);
    if (label.empty())
      return "empty label in host name";
    if (label.size() > max_label_length)
      return fmt::format("label longer than {} characters in host name", max_label_length);
    for (char c : label)
      if (!is_ldh(c))
        return fmt::format("character '{}' not allowed in a host name", c);
    if (label.front() == '-' || label.back() == '-')
      return "label starts or ends with '-' in host name";
    start = end + 1;
  }
  return {};
}

std::string canonical_text(const ip::address& a) {
  return a.is_v6() ? "[" + a.to_string() + "]" : a.to_string();
}

result<uint16_t> parse_port(std::string_view text) {
  unsigned value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() || value == 0 || value > 65535)
    return fail(errc::invalid_argument, fmt::format("bad port '{}' (1-65535)", text));
  return static_cast<uint16_t>(value);
}

std::optional<std::string> v4_refusal(const ip::address_v4& a) {
  const uint32_t v = a.to_uint();
  auto in = [v](uint32_t net, int bits) { return (v >> (32 - bits)) == (net >> (32 - bits)); };
  const char* kind = nullptr;
  if (in(0x00000000, 8))
    kind = "this-network";
  else if (in(0x7f000000, 8))
    kind = "loopback";
  else if (in(0x0a000000, 8) || in(0xac100000, 12) || in(0xc0a80000, 16))
    kind = "private";
  else if (in(0xa9fe0000, 16))
    kind = "link-local";
  else if (in(0x64400000, 10))
    kind = "cgnat";
  else if (in(0xe0000000, 4))
    kind = "multicast";
  else if (v == 0xffffffff)
    kind = "broadcast";
  else if (in(0xf0000000, 4))
    kind = "reserved";
  if (!kind)
    return std::nullopt;
  return fmt::format("{} {}", kind, a.to_string());
}

std::optional<std::string> embedded_refusal(const char* kind, const ip::address_v6& a, const uint8_t* v4) {
  ip::address_v4 inner(ip::address_v4::bytes_type{v4[0], v4[1], v4[2], v4[3]});
  auto why = v4_refusal(inner);
  if (!why)
    return std::nullopt;
  return fmt::format("{} {} ({})", kind, a.to_string(), *why);
}

}  // namespace

std::string_view to_string(egress_level level) {
  switch (level) {
    case egress_level::none: return "none";
    case egress_level::trusted: return "trusted";
    case egress_level::full: return "full";
    case egress_level::custom: return "custom";
  }
  return "?";
}

result<std::optional<ip::address>> parse_ip_literal(std::string_view host) {
  if (host.empty())
    return fail(errc::invalid_argument, "empty host");
  if (host.front() == '[') {
    if (host.back() != ']')
      return fail(errc::invalid_argument, fmt::format("unterminated IPv6 literal '{}'", host));
    std::string inner(host.substr(1, host.size() - 2));
    if (inner.find('%') != std::string::npos)
      return fail(errc::invalid_argument, fmt::format("IPv6 zone ids are refused ('{}')", host));
    in6_addr a6{};
    if (::inet_pton(AF_INET6, inner.c_str(), &a6) != 1)
      return fail(errc::invalid_argument, fmt::format("malformed IPv6 literal '{}'", host));
    ip::address_v6::bytes_type bytes;
    std::copy(std::begin(a6.s6_addr), std::end(a6.s6_addr), bytes.begin());
    return std::optional<ip::address>(ip::address_v6(bytes));
  }
  if (host.find(':') != std::string_view::npos)
    return fail(errc::invalid_argument, fmt::format("an IPv6 literal needs brackets ('{}')", host));
  std::string_view trimmed = host.back() == '.' ? host.substr(0, host.size() - 1) : host;
  size_t dot = trimmed.rfind('.');
  std::string_view last = dot == std::string_view::npos ? trimmed : trimmed.substr(dot + 1);
  if (last.empty() || !is_digit(last.front()))
    return std::optional<ip::address>();  // a name
  // The last label is numeric: an IPv4 literal (as resolvers read it) or nothing at all.
  std::string text = lower_ascii(trimmed);
  bool plausible = std::all_of(text.begin(), text.end(), [](char c) {
    return is_digit(c) || (c >= 'a' && c <= 'f') || c == 'x' || c == '.';
  });
  in_addr a4{};
  if (!plausible || ::inet_aton(text.c_str(), &a4) == 0)
    return fail(errc::invalid_argument, fmt::format("malformed IPv4 literal '{}' (a host name's last label "
                                                    "cannot start with a digit)", host));
  return std::optional<ip::address>(ip::address_v4(ntohl(a4.s_addr)));
}

result<std::string> normalize_host(std::string_view host) {
  for (unsigned char c : host)
    if (c >= 0x80)
      return fail(errc::invalid_argument,
                  "non-ASCII host name: internationalised names must be given in punycode (xn--…)");
  std::string lower = lower_ascii(host);
  auto literal = parse_ip_literal(lower);
  if (!literal)
    return literal.error();
  if (*literal)
    return canonical_text(**literal);
  if (!lower.empty() && lower.back() == '.')
    lower.pop_back();
  if (auto why = name_problem(lower); !why.empty())
    return fail(errc::invalid_argument, fmt::format("{}: '{}'", why, host));
  return lower;
}

std::optional<std::string> address_refusal(const ip::address& address) {
  if (address.is_v4())
    return v4_refusal(address.to_v4());
  const ip::address_v6 a = address.to_v6();
  const auto b = a.to_bytes();
  auto zero = [&b](size_t from, size_t to) {
    return std::all_of(b.begin() + static_cast<long>(from), b.begin() + static_cast<long>(to),
                       [](uint8_t x) { return x == 0; });
  };
  if (a.is_unspecified())
    return fmt::format("unspecified {}", a.to_string());
  if (a.is_loopback())
    return fmt::format("loopback {}", a.to_string());
  if (zero(0, 10) && b[10] == 0xff && b[11] == 0xff)
    return embedded_refusal("ipv4-mapped", a, &b[12]);
  if (zero(0, 12))
    return embedded_refusal("ipv4-compatible", a, &b[12]);
  if (b[0] == 0x00 && b[1] == 0x64 && b[2] == 0xff && b[3] == 0x9b) {
    if (zero(4, 12))
      return embedded_refusal("nat64", a, &b[12]);
    return fmt::format("nat64-local {}", a.to_string());  // 64:ff9b:1::/48 and the rest: translator-specific
  }
  if (b[0] == 0x20 && b[1] == 0x02)
    return embedded_refusal("6to4", a, &b[2]);
  if (b[0] == 0x20 && b[1] == 0x01 && b[2] == 0x00 && b[3] == 0x00)
    return fmt::format("teredo {}", a.to_string());
  if ((b[0] & 0xfe) == 0xfc)
    return fmt::format("unique-local {}", a.to_string());
  if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)
    return fmt::format("link-local {}", a.to_string());
  if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0)
    return fmt::format("site-local {}", a.to_string());
  if (b[0] == 0xff)
    return fmt::format("multicast {}", a.to_string());
  return std::nullopt;
}

result<domain_pattern> domain_pattern::parse(std::string_view text) {
  domain_pattern p;
  std::string_view rest = text;
  if (rest.starts_with("*.")) {
    p.subdomains = true;
    rest.remove_prefix(2);
  }
  std::string_view host = rest;
  size_t colon = rest.rfind(':');
  size_t bracket = rest.rfind(']');
  if (colon != std::string_view::npos && (bracket == std::string_view::npos || colon > bracket)) {
    auto port = parse_port(rest.substr(colon + 1));
    if (!port)
      return fail(errc::invalid_argument, fmt::format("pattern '{}': {}", text, port.error().message));
    p.port = *port;
    host = rest.substr(0, colon);
  }
  auto normal = normalize_host(host);
  if (!normal)
    return fail(errc::invalid_argument, fmt::format("pattern '{}': {}", text, normal.error().message));
  p.host = std::move(*normal);
  if (p.subdomains && (p.host.front() == '[' || p.host.find_first_not_of("0123456789.") == std::string::npos))
    return fail(errc::invalid_argument, fmt::format("pattern '{}': `*.` needs a domain name", text));
  return p;
}

bool domain_pattern::matches(std::string_view candidate, uint16_t candidate_port) const {
  if (port && *port != candidate_port)
    return false;
  if (!subdomains)
    return candidate == host;
  return candidate.size() > host.size() + 1 && candidate.ends_with(host) &&
         candidate[candidate.size() - host.size() - 1] == '.';
}

std::string domain_pattern::to_string() const {
  std::string out = subdomains ? "*." + host : host;
  if (port)
    out += fmt::format(":{}", *port);
  return out;
}

result<egress_policy> egress_policy::custom(const std::vector<std::string>& allow,
                                            const std::vector<std::string>& deny) {
  egress_policy p{egress_level::custom, {}, {}};
  for (const auto& [texts, into] : {std::pair{&allow, &p.allow}, std::pair{&deny, &p.deny}})
    for (const auto& t : *texts) {
      auto pattern = domain_pattern::parse(t);
      if (!pattern)
        return pattern.error();
      into->push_back(std::move(*pattern));
    }
  return p;
}

policy_verdict egress_policy::decide(std::string_view host, uint16_t port) const {
  switch (level) {
    case egress_level::none:
      return {false, "policy:none", true};
    case egress_level::full:
      return {true, "policy:full", false};
    case egress_level::trusted: {
      const auto& list = trusted_domains();
      bool listed = std::find(list.begin(), list.end(), host) != list.end();
      if (listed && (port == 443 || port == 80))
        return {true, "policy:trusted", false};
      return {false, "policy:trusted:not-listed", true};
    }
    case egress_level::custom:
      for (const auto& d : deny)
        if (d.matches(host, port))
          return {false, "custom:deny:" + d.to_string(), false};
      for (const auto& a : allow)
        if (a.matches(host, port))
          return {true, "custom:allow:" + a.to_string(), false};
      return {false, "custom:not-listed", true};
  }
  return {false, "policy:unknown", false};
}

nlohmann::json egress_policy::to_json() const {
  nlohmann::json j = {{"level", std::string(egress::to_string(level))}};
  if (level == egress_level::custom) {
    auto list = [](const std::vector<domain_pattern>& ps) {
      nlohmann::json a = nlohmann::json::array();
      for (const auto& p : ps)
        a.push_back(p.to_string());
      return a;
    };
    j["allow"] = list(allow);
    j["deny"] = list(deny);
  }
  return j;
}

result<egress_policy> egress_policy::from_json(const nlohmann::json& json) {
  if (!json.is_object())
    return fail(errc::invalid_argument, "egress policy: expected a JSON object");
  for (const auto& [key, value] : json.items())
    if (key != "level" && key != "allow" && key != "deny")
      return fail(errc::invalid_argument, fmt::format("egress policy: unknown field '{}'", key));
  auto level_it = json.find("level");
  if (level_it == json.end() || !level_it->is_string())
    return fail(errc::invalid_argument, "egress policy: 'level' must be a string (none, trusted, full, custom)");
  const std::string level = level_it->get<std::string>();
  std::vector<std::string> lists[2];
  const char* names[2] = {"allow", "deny"};
  for (int i = 0; i < 2; ++i) {
    auto it = json.find(names[i]);
    if (it == json.end())
      continue;
    if (level != "custom")
      return fail(errc::invalid_argument,
                  fmt::format("egress policy: '{}' is only for level custom, not '{}'", names[i], level));
    if (!it->is_array())
      return fail(errc::invalid_argument, fmt::format("egress policy: '{}' must be an array of strings", names[i]));
    for (const auto& e : *it) {
      if (!e.is_string())
        return fail(errc::invalid_argument, fmt::format("egress policy: '{}' must be an array of strings", names[i]));
      lists[i].push_back(e.get<std::string>());
    }
  }
  if (level == "none")
    return none();
  if (level == "trusted")
    return trusted();
  if (level == "full")
    return full();
  if (level == "custom") {
    auto p = custom(lists[0], lists[1]);
    if (!p)
      return fail(errc::invalid_argument, "egress policy: " + p.error().message);
    return p;
  }
  return fail(errc::invalid_argument,
              fmt::format("egress policy: unknown level '{}' (none, trusted, full, custom)", level));
}

std::string egress_policy::hash() const {
  const std::string canonical = to_json().dump();  // object keys are sorted: canonical
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned len = 0;
  EVP_Digest(canonical.data(), canonical.size(), md.data(), &len, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned i = 0; i < len; ++i)
    hex += fmt::format("{:02x}", md[i]);
  return hex;
}

policy_verdict decide_destination(const egress_policy& org, const egress_policy& sandbox,
                                  const std::vector<domain_pattern>& approvals, std::string_view host, uint16_t port) {
  auto org_verdict = org.decide(host, port);
  if (!org_verdict.allowed)
    return {false, "org:deny:" + org_verdict.rule, false};
  auto verdict = sandbox.decide(host, port);
  if (!verdict.allowed && verdict.not_listed)
    for (const auto& a : approvals)
      if (a.matches(host, port))
        return {true, "approval:" + a.to_string(), false};
  return verdict;
}

const std::vector<std::string>& trusted_domains() {
  // Maintained list: registries, git hosts, model APIs. Exact names; ports 80 and 443.
  static const std::vector<std::string> list = {
    // package registries
    "registry.npmjs.org", "registry.yarnpkg.com", "pypi.org", "files.pythonhosted.org", "crates.io",
    "static.crates.io", "index.crates.io", "proxy.golang.org", "sum.golang.org", "deb.debian.org",
    "security.debian.org", "rubygems.org", "repo.maven.apache.org", "repo1.maven.org",
    // git hosts
    "github.com", "codeload.github.com", "objects.githubusercontent.com", "raw.githubusercontent.com",
    "gitlab.com", "bitbucket.org",
    // model APIs
    "api.anthropic.com", "api.openai.com",
  };
  return list;
}

}  // namespace ferry::egress
