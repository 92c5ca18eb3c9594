#pragma once
// Which destinations a sandbox may reach through the egress proxy: the policy levels, domain
// patterns, host-name normalisation, IP literals in every notation, and the address checks that
// hold whatever the policy says.
//
// Threading: value types and pure functions; an egress_policy is not synchronised.

#include <boost/asio/ip/address.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ferry/schemas/result.h>

namespace ferry::egress {

/// `none`: nothing; `trusted`: the maintained list (trusted_domains(), ports 80 and 443);
/// `full`: any public destination; `custom`: the policy's allow list minus its deny list.
enum class egress_level { none, trusted, full, custom };

std::string_view to_string(egress_level level);

/// Lower-cases, strips one trailing dot and checks a DNS host name (LDH labels of 1–63, at most
/// 253 in all; punycode `xn--` labels are ASCII and pass) or an IP literal (returned as written,
/// lower-cased; see parse_ip_literal). Non-ASCII (raw IDN), empty labels, `_`, spaces → error.
[[nodiscard]] result<std::string> normalize_host(std::string_view host);

/// If `host` is an IP literal — an IPv4 address in any notation inet_aton accepts (`2130706433`,
/// `0177.0.0.1`, `0x7f.1`, `127.1`) or a bracketed IPv6 address (`[::1]`) — the address it
/// denotes. nullopt: a host name. Error: looks like a literal but is not a valid one (a last
/// label that starts with a digit, an IPv6 zone id, a bare IPv6 address without brackets):
/// such a name is never resolved, since resolvers disagree on what it means.
[[nodiscard]] result<std::optional<boost::asio::ip::address>> parse_ip_literal(std::string_view host);

/// Why `address` must never be connected to, even under `full` (e.g. "private 10.0.0.1",
/// "link-local 169.254.169.254", "ipv4-mapped ::ffff:127.0.0.1 (loopback 127.0.0.1)"), or
/// nullopt for a public address. IPv6 forms that embed an IPv4 address (mapped, compatible,
/// NAT64 64:ff9b::/96, 6to4 2002::/16) are judged by the embedded address.
std::optional<std::string> address_refusal(const boost::asio::ip::address& address);

/// One allow/deny entry: `example.com` (that name only) or `*.example.com` (its subdomains
/// only), with an optional `:port` (otherwise any port). Host part normalised as normalize_host.
struct domain_pattern {
  std::string host;  // without the `*.`
  bool subdomains = false;
  std::optional<uint16_t> port;

  [[nodiscard]] static result<domain_pattern> parse(std::string_view text);
  /// `host` must be normalised (normalize_host).
  bool matches(std::string_view host, uint16_t port) const;
  std::string to_string() const;
  bool operator==(const domain_pattern&) const = default;
};

/// The verdict of one policy for one destination. `rule` names what decided, e.g.
/// `policy:trusted`, `policy:none`, `custom:allow:*.example.com`, `custom:deny:example.com`,
/// `custom:not-listed`.
struct policy_verdict {
  bool allowed = false;
  std::string rule;
  /// Denied only because nothing allowed it (not an explicit deny): a user could approve it.
  bool not_listed = false;
};

/// A sandbox's (or the organisation's) egress policy. Deny wins over allow.
struct egress_policy {
  egress_level level = egress_level::none;
  std::vector<domain_pattern> allow;  // custom only
  std::vector<domain_pattern> deny;   // custom only

  static egress_policy none() { return {egress_level::none, {}, {}}; }
  static egress_policy trusted() { return {egress_level::trusted, {}, {}}; }
  static egress_policy full() { return {egress_level::full, {}, {}}; }
  /// Each entry parsed by domain_pattern::parse; an error names the bad entry.
  [[nodiscard]] static result<egress_policy> custom(const std::vector<std::string>& allow,
                                                    const std::vector<std::string>& deny);

  /// For a normalised host (a name or an IP literal as written) and port. An IP literal matches
  /// only `full` and exact patterns of the same text.
  policy_verdict decide(std::string_view host, uint16_t port) const;

  /// {"level": "custom", "allow": [...], "deny": [...]} (lists only for custom).
  nlohmann::json to_json() const;
  /// Strict: unknown keys, wrong types, bad patterns and lists on a non-custom level are errors
  /// that say which field and why.
  [[nodiscard]] static result<egress_policy> from_json(const nlohmann::json& json);
  /// SHA-256 (hex) of the canonical JSON: what a sandbox token binds (`pol`).
  std::string hash() const;

  bool operator==(const egress_policy&) const = default;
};

/// The whole domain decision for a sandbox: the org policy first (a refusal is `org:deny:<its
/// rule>`, never approvable), then the sandbox's policy, whose not-listed refusals the runtime
/// `approvals` can turn into `approval:<pattern>` (explicit custom denies stay denied).
/// `not_listed` of the result = approvable.
policy_verdict decide_destination(const egress_policy& org, const egress_policy& sandbox,
                                  const std::vector<domain_pattern>& approvals, std::string_view host, uint16_t port);

/// The `trusted` level's list (package registries, git hosts, model APIs), exact names.
const std::vector<std::string>& trusted_domains();

}  // namespace ferry::egress
