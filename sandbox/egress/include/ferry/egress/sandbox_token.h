#pragma once
// Sandbox tokens: what a sandbox shows the egress proxy (in Proxy-Authorization) to prove which
// sandbox it is. A JWT (RFC 7519) signed ES256 (JWS raw R||S) by Ferry's key, with the claims
//   sub = sandbox id, pol = egress_policy::hash() of its policy, iat, exp, jti = 128 random bits.
// Signing and verification are libjwt's; the algorithm is pinned to ES256 before and after
// verification (libjwt alone would accept HS256 keyed with the public key's PEM).
//
// Threading: a sandbox_tokens is immutable after open(): thread-safe.

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <ferry/egress/policy.h>
#include <ferry/schemas/result.h>

namespace ferry::egress {

/// Why a token was refused.
enum class token_failure {
  malformed,       // not three base64url parts, bad JSON, missing or mistyped claims, too long
  wrong_alg,       // header alg is not ES256 (none, HS256, RS256, …)
  bad_signature,   // not signed by this Ferry's key, or altered
  expired,         // now >= exp
  not_yet_valid,   // iat in the future (beyond the allowed clock skew)
  wrong_sandbox,   // sub is another sandbox
  policy_changed,  // pol is not the hash of the sandbox's current policy
};

std::string_view to_string(token_failure failure);

struct token_claims {
  std::string sandbox_id;
  std::string policy_hash;
  std::string jti;
  std::chrono::system_clock::time_point issued_at;
  std::chrono::system_clock::time_point expires_at;
};

/// verify()'s answer: ok, or the failure and a sentence for the 407 body.
struct token_check {
  std::optional<token_failure> failure;
  std::string detail;
  token_claims claims;  // filled once the token was parsed
  bool ok() const { return !failure; }
};

struct token_options {
  std::chrono::seconds lifetime{4 * 3600};
  /// How far in the future `iat` may be (clocks of Ferry's hosts differ a little).
  std::chrono::seconds clock_skew{60};
};

class sandbox_tokens {
 public:
  /// Loads `<key_dir>/egress-token-key.pem` (a P-256 private key, must be a regular file of this
  /// uid with mode 0600), or creates it (0600, O_EXCL: two processes starting at once agree on
  /// one key). `key_dir` must exist.
  [[nodiscard]] static result<std::shared_ptr<const sandbox_tokens>> open(const std::filesystem::path& key_dir,
                                                                          token_options options = {});
  ~sandbox_tokens();
  sandbox_tokens(const sandbox_tokens&) = delete;
  sandbox_tokens& operator=(const sandbox_tokens&) = delete;

  /// A token for `sandbox_id` bound to `policy`, valid from `now` for options.lifetime.
  [[nodiscard]] result<std::string> issue(std::string_view sandbox_id, const egress_policy& policy,
                                          std::chrono::system_clock::time_point now =
                                            std::chrono::system_clock::now()) const;

  /// Checks signature, algorithm, times, subject and policy binding, in that order.
  token_check verify(std::string_view token, std::string_view expected_sandbox_id, const egress_policy& current_policy,
                     std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) const;

  const std::filesystem::path& key_file() const { return key_file_; }

 private:
  sandbox_tokens() = default;
  std::filesystem::path key_file_;
  std::string private_pem_, public_pem_;
  token_options options_;
};

}  // namespace ferry::egress
