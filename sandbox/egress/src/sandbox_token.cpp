// Sandbox tokens over libjwt (ES256) and OpenSSL (the key pair, randomness). libjwt and OpenSSL
// names stay in this file.

#include <ferry/egress/sandbox_token.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jwt.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace ferry::egress {
namespace {

namespace fs = std::filesystem;
using std::chrono::system_clock;

constexpr std::string_view key_file_name = "egress-token-key.pem";
constexpr size_t max_token_bytes = 4096;

struct jwt_deleter {
  void operator()(jwt_t* j) const { jwt_free(j); }
};
using jwt_ptr = std::unique_ptr<jwt_t, jwt_deleter>;
struct pkey_deleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using pkey_ptr = std::unique_ptr<EVP_PKEY, pkey_deleter>;
struct bio_deleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
using bio_ptr = std::unique_ptr<BIO, bio_deleter>;
/// libjwt's *_json getters return malloc'd strings (1.10 has no jwt_free_str).
struct malloc_deleter {
  void operator()(char* p) const { std::free(p); }
};
using malloc_str = std::unique_ptr<char, malloc_deleter>;

std::string bio_string(BIO* bio) {
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(n));
}

result<std::string> random_hex(size_t bytes) {
  std::string raw(bytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(bytes)) != 1)
    return fail("sandbox token: RAND_bytes failed");
  std::string hex;
  for (unsigned char c : raw)
    hex += fmt::format("{:02x}", c);
  return hex;
}

/// Private key PEM (PKCS#8) → the key, checked to be P-256.
result<pkey_ptr> read_key(const std::string& pem, const fs::path& where) {
  bio_ptr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  pkey_ptr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key)
    return fail(errc::corrupt, fmt::format("sandbox token key {}: not a PEM private key", where.string()));
  char group[64] = {};
  size_t len = 0;
  if (!EVP_PKEY_is_a(key.get(), "EC") ||
      EVP_PKEY_get_utf8_string_param(key.get(), "group", group, sizeof group, &len) != 1 ||
      std::string_view(group) != "prime256v1")
    return fail(errc::corrupt, fmt::format("sandbox token key {}: not a P-256 (prime256v1) EC key", where.string()));
  return key;
}

result<std::string> public_pem_of(EVP_PKEY* key) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_PUBKEY(bio.get(), key) != 1)
    return fail("sandbox token: cannot write the public key");
  return bio_string(bio.get());
}

result<std::string> generate_private_pem() {
  pkey_ptr key(EVP_EC_gen("P-256"));
  if (!key)
    return fail("sandbox token: cannot generate a P-256 key");
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return fail("sandbox token: cannot write the private key");
  return bio_string(bio.get());
}

/// Reads the key file: a regular file of ours, not readable by group or others.
result<std::string> load_key_file(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return fail(errno == ENOENT ? errc::not_found : errc::failed,
                fmt::format("sandbox token key {}: {}", path.string(), std::strerror(errno)));
  struct stat st {};
  std::string pem;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return fail(fmt::format("sandbox token key {}: not a regular file", path.string()));
  }
  if (st.st_uid != ::geteuid() || (st.st_mode & 077) != 0) {
    ::close(fd);
    return fail(fmt::format("sandbox token key {}: must be owned by uid {} with mode 0600 (is uid {}, mode {:o})",
                            path.string(), ::geteuid(), st.st_uid, st.st_mode & 07777));
  }
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    pem.append(buf, static_cast<size_t>(n));
    if (pem.size() > 64 * 1024)
      break;
  }
  ::close(fd);
  return pem;
}

/// Writes a new key beside `path` and links it into place: whoever links first wins, and no
/// reader ever sees a half-written file.
result<void> create_key_file(const fs::path& path) {
  auto pem = generate_private_pem();
  if (!pem)
    return pem.error();
  auto suffix = random_hex(8);
  if (!suffix)
    return suffix.error();
  fs::path tmp = path.string() + ".tmp-" + *suffix;
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return fail(fmt::format("sandbox token key {}: {}", tmp.string(), std::strerror(errno)));
  bool written = ::write(fd, pem->data(), pem->size()) == static_cast<ssize_t>(pem->size()) && ::fsync(fd) == 0;
  ::close(fd);
  OPENSSL_cleanse(pem->data(), pem->size());
  if (!written) {
    ::unlink(tmp.c_str());
    return fail(fmt::format("sandbox token key {}: write failed", tmp.string()));
  }
  int linked = ::link(tmp.c_str(), path.c_str());
  int link_errno = errno;
  ::unlink(tmp.c_str());
  if (linked != 0 && link_errno != EEXIST)
    return fail(fmt::format("sandbox token key {}: {}", path.string(), std::strerror(link_errno)));
  return {};
}

token_check refused(token_failure f, std::string detail, token_claims claims = {}) {
  return token_check{f, std::move(detail), std::move(claims)};
}

}  // namespace

std::string_view to_string(token_failure failure) {
  switch (failure) {
    case token_failure::malformed: return "malformed";
    case token_failure::wrong_alg: return "wrong-alg";
    case token_failure::bad_signature: return "bad-signature";
    case token_failure::expired: return "expired";
    case token_failure::not_yet_valid: return "not-yet-valid";
    case token_failure::wrong_sandbox: return "wrong-sandbox";
    case token_failure::policy_changed: return "policy-changed";
  }
  return "?";
}

sandbox_tokens::~sandbox_tokens() { OPENSSL_cleanse(private_pem_.data(), private_pem_.size()); }

result<std::shared_ptr<const sandbox_tokens>> sandbox_tokens::open(const fs::path& key_dir, token_options options) {
  std::error_code ec;
  if (!fs::is_directory(key_dir, ec))
    return fail(errc::not_found, fmt::format("sandbox token key directory {} does not exist", key_dir.string()));
  const fs::path path = key_dir / key_file_name;
  auto pem = load_key_file(path);
  if (!pem && pem.error().code == errc::not_found) {
    if (auto created = create_key_file(path); !created)
      return created.error();
    pem = load_key_file(path);
  }
  if (!pem)
    return pem.error();
  auto key = read_key(*pem, path);
  if (!key)
    return key.error();
  auto pub = public_pem_of(key->get());
  if (!pub)
    return pub.error();
  std::shared_ptr<sandbox_tokens> t(new sandbox_tokens());
  t->key_file_ = path;
  t->private_pem_ = std::move(*pem);
  t->public_pem_ = std::move(*pub);
  t->options_ = options;
  return std::shared_ptr<const sandbox_tokens>(std::move(t));
}

result<std::string> sandbox_tokens::issue(std::string_view sandbox_id, const egress_policy& policy,
                                          system_clock::time_point now) const {
  auto jti = random_hex(16);
  if (!jti)
    return jti.error();
  const auto iat = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  const auto exp = iat + options_.lifetime.count();
  nlohmann::json claims = {{"sub", std::string(sandbox_id)}, {"pol", policy.hash()}, {"iat", iat}, {"exp", exp},
                           {"jti", *jti}};
  jwt_t* raw = nullptr;
  if (jwt_new(&raw) != 0)
    return fail("sandbox token: jwt_new failed");
  jwt_ptr jwt(raw);
  if (jwt_add_grants_json(jwt.get(), claims.dump().c_str()) != 0)
    return fail("sandbox token: cannot set the claims");
  if (jwt_set_alg(jwt.get(), JWT_ALG_ES256, reinterpret_cast<const unsigned char*>(private_pem_.data()),
                  static_cast<int>(private_pem_.size())) != 0)
    return fail("sandbox token: cannot set ES256 with the key");
  malloc_str token(jwt_encode_str(jwt.get()));
  if (!token)
    return fail(fmt::format("sandbox token: signing failed for sandbox {}", sandbox_id));
  return std::string(token.get());
}

token_check sandbox_tokens::verify(std::string_view token, std::string_view expected_sandbox_id,
                                   const egress_policy& current_policy, system_clock::time_point now) const {
  if (token.empty())
    return refused(token_failure::malformed, "empty token");
  if (token.size() > max_token_bytes)
    return refused(token_failure::malformed, fmt::format("token longer than {} bytes", max_token_bytes));
  if (std::count(token.begin(), token.end(), '.') != 2)
    return refused(token_failure::malformed, "not a JWS compact token (three dot-separated parts)");
  const std::string text(token);

  // Unverified parse first, only to name the failure precisely: a header with another algorithm
  // is refused before any key is used (libjwt would verify HS256 with the public key's PEM as
  // the HMAC secret).
  jwt_t* raw = nullptr;
  if (jwt_decode(&raw, text.c_str(), nullptr, 0) != 0 || !raw)
    return refused(token_failure::malformed, "not a JWT (bad base64url or JSON)");
  jwt_ptr unverified(raw);
  const char* alg = jwt_get_header(unverified.get(), "alg");
  if (!alg || std::string_view(alg) != "ES256")
    return refused(token_failure::wrong_alg, fmt::format("algorithm {} is refused (ES256 only)", alg ? alg : "(none)"));

  raw = nullptr;
  if (jwt_decode(&raw, text.c_str(), reinterpret_cast<const unsigned char*>(public_pem_.data()),
                 static_cast<int>(public_pem_.size())) != 0 ||
      !raw)
    return refused(token_failure::bad_signature, "signature does not verify with Ferry's key");
  jwt_ptr jwt(raw);
  if (jwt_get_alg(jwt.get()) != JWT_ALG_ES256)
    return refused(token_failure::wrong_alg, "algorithm is not ES256");

  malloc_str grants(jwt_get_grants_json(jwt.get(), nullptr));
  nlohmann::json claims = nlohmann::json::parse(grants ? grants.get() : "", nullptr, false);
  if (!claims.is_object())
    return refused(token_failure::malformed, "claims are not a JSON object");
  auto string_claim = [&](const char* name) -> const std::string* {
    auto it = claims.find(name);
    return it != claims.end() && it->is_string() ? it->get_ptr<const std::string*>() : nullptr;
  };
  auto int_claim = [&](const char* name) -> std::optional<int64_t> {
    auto it = claims.find(name);
    if (it == claims.end() || !it->is_number_integer())
      return std::nullopt;
    return it->get<int64_t>();
  };
  const std::string* sub = string_claim("sub");
  const std::string* pol = string_claim("pol");
  const std::string* jti = string_claim("jti");
  auto iat = int_claim("iat");
  auto exp = int_claim("exp");
  if (!sub || !pol || !jti || !iat || !exp)
    return refused(token_failure::malformed, "missing or mistyped claim (sub, pol, jti: strings; iat, exp: integers)");
  token_claims c{*sub, *pol, *jti, system_clock::time_point(std::chrono::seconds(*iat)),
                 system_clock::time_point(std::chrono::seconds(*exp))};
  const auto now_s = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  if (now_s >= *exp)
    return refused(token_failure::expired, fmt::format("token expired {} s ago", now_s - *exp), std::move(c));
  if (*iat > now_s + options_.clock_skew.count())
    return refused(token_failure::not_yet_valid, fmt::format("token issued {} s in the future", *iat - now_s),
                   std::move(c));
  if (*sub != expected_sandbox_id)
    return refused(token_failure::wrong_sandbox,
                   fmt::format("token is for sandbox '{}', not this one", *sub), std::move(c));
  if (*pol != current_policy.hash())
    return refused(token_failure::policy_changed, "the sandbox's egress policy changed since the token was issued",
                   std::move(c));
  return token_check{std::nullopt, {}, std::move(c)};
}

}  // namespace ferry::egress
