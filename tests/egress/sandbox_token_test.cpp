// Sandbox tokens: issue/verify, and every way a token is refused — altered payload or signature,
// alg none, HS256 keyed with the public key, another key, expired, not yet valid, another
// sandbox, a changed policy — each with its precise reason.
#define BOOST_TEST_MODULE egress_sandbox_token
#include <boost/test/unit_test.hpp>

#include <ferry/egress/sandbox_token.h>
#include <ferry/test_support/temp_dir.h>

#include <sys/stat.h>

#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

using namespace ferry::egress;
using namespace std::chrono_literals;
using std::chrono::system_clock;
namespace fs = std::filesystem;

namespace {

std::string b64url(std::string_view in) {
  std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(in.data()),
                          static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(n));
  while (!out.empty() && out.back() == '=')
    out.pop_back();
  for (char& c : out)
    c = c == '+' ? '-' : c == '/' ? '_' : c;
  return out;
}

std::string b64url_decode(std::string s) {
  for (char& c : s)
    c = c == '-' ? '+' : c == '_' ? '/' : c;
  while (s.size() % 4)
    s += '=';
  std::string out(s.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(s.data()),
                          static_cast<int>(s.size()));
  BOOST_REQUIRE(n >= 0);
  size_t pad = s.ends_with("==") ? 2 : s.ends_with("=") ? 1 : 0;
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

std::vector<std::string> parts(const std::string& token) {
  auto a = token.find('.'), b = token.rfind('.');
  BOOST_REQUIRE(a != std::string::npos && b != a);
  return {token.substr(0, a), token.substr(a + 1, b - a - 1), token.substr(b + 1)};
}

std::string public_pem(const fs::path& key_file) {
  std::ifstream in(key_file);
  std::string pem((std::istreambuf_iterator<char>(in)), {});
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  BOOST_REQUIRE(key);
  BIO* out = BIO_new(BIO_s_mem());
  PEM_write_bio_PUBKEY(out, key);
  char* data = nullptr;
  long n = BIO_get_mem_data(out, &data);
  std::string pub(data, static_cast<size_t>(n));
  BIO_free(out);
  EVP_PKEY_free(key);
  return pub;
}

struct fixture {
  ferry::test::temp_dir dir{"ferry-egress-token"};
  std::shared_ptr<const sandbox_tokens> tokens = sandbox_tokens::open(dir.path()).value();
  egress_policy policy = egress_policy::trusted();
  system_clock::time_point now = system_clock::now();

  std::string issue(std::string id = "sb-1") { return tokens->issue(id, policy, now).value(); }
  std::optional<token_failure> failure_of(const std::string& token, std::string id = "sb-1") {
    return tokens->verify(token, id, policy, now).failure;
  }
};

}  // namespace

BOOST_FIXTURE_TEST_CASE(an_issued_token_verifies_with_its_claims, fixture) {
  auto token = issue();
  auto check = tokens->verify(token, "sb-1", policy, now);
  BOOST_TEST(check.ok(), check.detail);
  BOOST_TEST(check.claims.sandbox_id == "sb-1");
  BOOST_TEST(check.claims.policy_hash == policy.hash());
  BOOST_TEST(check.claims.jti.size() == 32u);
  BOOST_TEST(std::chrono::duration_cast<std::chrono::seconds>(check.claims.expires_at - check.claims.issued_at).count() ==
             4 * 3600);
  BOOST_TEST(tokens->verify(issue(), "sb-1", policy, now).claims.jti != check.claims.jti);
  // The header says ES256 and the signature is the JWS raw R||S form: 64 bytes, not DER.
  auto p = parts(token);
  BOOST_TEST(nlohmann::json::parse(b64url_decode(p[0]))["alg"] == "ES256");
  BOOST_TEST(b64url_decode(p[2]).size() == 64u);
}

BOOST_FIXTURE_TEST_CASE(the_key_file_is_0600_and_reused, fixture) {
  struct stat st {};
  BOOST_REQUIRE(::stat(tokens->key_file().c_str(), &st) == 0);
  BOOST_TEST((st.st_mode & 07777) == 0600u);
  auto token = issue();
  auto again = sandbox_tokens::open(dir.path()).value();
  BOOST_TEST(again->verify(token, "sb-1", policy, now).ok());
  ::chmod(tokens->key_file().c_str(), 0644);
  auto loose = sandbox_tokens::open(dir.path());
  BOOST_TEST_REQUIRE(!loose.ok());
  BOOST_TEST(loose.error().message.find("0600") != std::string::npos, loose.error().message);
}

BOOST_AUTO_TEST_CASE(two_processes_starting_at_once_agree_on_one_key) {
  ferry::test::temp_dir dir{"ferry-egress-token"};
  std::vector<std::shared_ptr<const sandbox_tokens>> opened(8);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < opened.size(); ++i)
    threads.emplace_back([&, i] { opened[i] = sandbox_tokens::open(dir.path()).value(); });
  for (auto& t : threads)
    t.join();
  auto token = opened[0]->issue("sb", egress_policy::full()).value();
  for (auto& o : opened)
    BOOST_TEST(o->verify(token, "sb", egress_policy::full()).ok());
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path()))
    ++files;
  BOOST_TEST(files == 1u);  // no temporary left behind
}

BOOST_FIXTURE_TEST_CASE(an_altered_payload_is_a_bad_signature, fixture) {
  auto p = parts(issue("sb-1"));
  auto claims = nlohmann::json::parse(b64url_decode(p[1]));
  claims["sub"] = "sb-2";
  BOOST_TEST((failure_of(p[0] + "." + b64url(claims.dump()) + "." + p[2], "sb-2") == token_failure::bad_signature));
  claims["sub"] = "sb-1";
  claims["exp"] = claims["exp"].get<int64_t>() + 3600;
  BOOST_TEST((failure_of(p[0] + "." + b64url(claims.dump()) + "." + p[2]) == token_failure::bad_signature));
  // One character of the base64 text changed.
  std::string payload = p[1];
  payload[payload.size() / 2] = payload[payload.size() / 2] == 'A' ? 'B' : 'A';
  auto f = failure_of(p[0] + "." + payload + "." + p[2]);
  BOOST_TEST((f == token_failure::bad_signature || f == token_failure::malformed));
}

BOOST_FIXTURE_TEST_CASE(an_altered_signature_is_a_bad_signature, fixture) {
  auto p = parts(issue());
  for (size_t at : {size_t(0), p[2].size() / 2, p[2].size() - 2}) {
    std::string sig = p[2];
    sig[at] = sig[at] == 'A' ? 'B' : 'A';
    BOOST_TEST((failure_of(p[0] + "." + p[1] + "." + sig) == token_failure::bad_signature), "at " << at);
  }
  BOOST_TEST((failure_of(p[0] + "." + p[1] + ".") == token_failure::bad_signature));
  // A DER signature (what a careless ES256 signer makes) is not R||S.
  BOOST_TEST(failure_of(p[0] + "." + p[1] + "." + b64url(std::string("\x30\x44\x02\x20", 4) + std::string(68, 'x'))).has_value());
}

BOOST_FIXTURE_TEST_CASE(alg_none_and_hs256_with_the_public_key_are_refused, fixture) {
  auto p = parts(issue());
  const std::string none = b64url(R"({"alg":"none","typ":"JWT"})");
  BOOST_TEST((failure_of(none + "." + p[1] + ".") == token_failure::wrong_alg));
  BOOST_TEST((failure_of(none + "." + p[1] + "." + p[2]) == token_failure::wrong_alg));
  BOOST_TEST((failure_of(b64url(R"({"alg":"NONE"})") + "." + p[1] + ".") == token_failure::wrong_alg));
  // No alg at all: libjwt does not parse it.
  BOOST_TEST((failure_of(b64url(R"({"typ":"JWT"})") + "." + p[1] + ".") == token_failure::malformed));

  // The classic confusion: HS256 with the public key's PEM as the HMAC secret (libjwt 1.10
  // verifies this when handed the public key, so the algorithm must be pinned first).
  const std::string pub = public_pem(tokens->key_file());
  const std::string signing_input = b64url(R"({"alg":"HS256","typ":"JWT"})") + "." + p[1];
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned mac_len = 0;
  HMAC(EVP_sha256(), pub.data(), static_cast<int>(pub.size()), reinterpret_cast<const unsigned char*>(signing_input.data()),
       signing_input.size(), mac, &mac_len);
  auto check = tokens->verify(signing_input + "." + b64url(std::string(reinterpret_cast<char*>(mac), mac_len)), "sb-1",
                              policy, now);
  BOOST_TEST((check.failure == token_failure::wrong_alg));
  BOOST_TEST(check.detail.find("HS256") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(a_token_of_another_ferry_key_is_a_bad_signature, fixture) {
  ferry::test::temp_dir other_dir{"ferry-egress-token"};
  auto other = sandbox_tokens::open(other_dir.path()).value();
  BOOST_TEST((failure_of(other->issue("sb-1", policy, now).value()) == token_failure::bad_signature));
}

BOOST_FIXTURE_TEST_CASE(times_are_checked, fixture) {
  BOOST_TEST((failure_of(tokens->issue("sb-1", policy, now - 4h - 1s).value()) == token_failure::expired));
  BOOST_TEST(!failure_of(tokens->issue("sb-1", policy, now - 4h + 5s).value()).has_value());
  BOOST_TEST((failure_of(tokens->issue("sb-1", policy, now + 1h).value()) == token_failure::not_yet_valid));
  BOOST_TEST(!failure_of(tokens->issue("sb-1", policy, now + 30s).value()).has_value());  // within the skew
  auto check = tokens->verify(tokens->issue("sb-1", policy, now - 5h).value(), "sb-1", policy, now);
  BOOST_TEST(check.detail.find("expired") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(another_sandbox_and_a_changed_policy_are_refused, fixture) {
  BOOST_TEST((failure_of(issue("sb-2"), "sb-1") == token_failure::wrong_sandbox));
  BOOST_TEST((failure_of(issue("sb-1"), "sb-10") == token_failure::wrong_sandbox));
  auto token = issue("sb-1");
  BOOST_TEST((tokens->verify(token, "sb-1", egress_policy::full(), now).failure == token_failure::policy_changed));
}

BOOST_FIXTURE_TEST_CASE(malformed_tokens_are_malformed, fixture) {
  auto p = parts(issue());
  for (std::string bad : {std::string(), std::string("abc"), std::string("a.b"), std::string("a.b.c.d"),
                          std::string("!!!.###.$$$"), p[0] + "." + p[1], std::string(5000, 'a') + ".b.c",
                          b64url("not json") + "." + p[1] + "." + p[2]})
    BOOST_TEST((failure_of(bad) == token_failure::malformed), "'" << bad.substr(0, 40) << "'");
}
