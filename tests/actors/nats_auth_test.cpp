// connect_nats and the outbox relay against real nats-servers that demand credentials (password,
// token, NKey, .creds in operator mode) and TLS:
// both connections are opened from the same nats_options, the right credentials work end to end
// (publish/subscribe on the bus, JetStream publishes acknowledged through the relay), wrong ones
// fail at once with a clear error that never contains a secret, and TLS verifies the server
// (CA, name) and presents a client certificate when the server asks for one.
#define BOOST_TEST_MODULE actors_nats_auth
#include <boost/test/unit_test.hpp>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/actors/bus.h"
#include "ferry/actors/outbox.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "ferry/test_support/nats_server.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"

namespace fs = std::filesystem;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using namespace std::chrono_literals;
using ferry::actors::nats_options;
using ferry::test::nats_config_string;
using ferry::test::nats_server;
using ferry::test::temp_dir;
using ferry::test::test_pki;

namespace {

const std::string the_password = "pw-Xq7rT2vLm9sK";  // long enough to be found if it leaks
const std::string the_token = "tok-Zr4nW8pQe3yH";

template <class R>
std::string error_of(const R& r) {
  return r.ok() ? std::string("(no error)") : r.error().message;
}

/// Publishes on a fresh subject over `bus` and waits for it to come back through a subscription
/// of the same bus: the connection is really usable, not just open.
void check_round_trip(ferry::actors::bus& bus) {
  std::mutex mtx;
  std::condition_variable cv;
  std::string got;
  static std::atomic<int> n{0};
  const std::string subject = "ferry.test.rt" + std::to_string(++n);
  auto sub = bus.subscribe(subject, [&](std::string_view, std::string_view payload) {
    std::lock_guard<std::mutex> guard(mtx);
    got = std::string(payload);
    cv.notify_all();
  });
  BOOST_TEST_REQUIRE(sub.ok(), error_of(sub));
  BOOST_TEST_REQUIRE(bus.publish(subject, "ping").ok());
  std::unique_lock<std::mutex> lock(mtx);
  BOOST_TEST(cv.wait_for(lock, 10s, [&] { return got == "ping"; }),
             "published message did not come back on " << subject);
}

std::unique_ptr<ferry::storage::event_store> open_store(const fs::path& dir) {
  ferry::storage::journal_options o;
  o.dir = dir;
  o.durability = ferry::storage::durability::periodic;
  auto s = ferry::storage::open_journal(o);
  BOOST_TEST_REQUIRE(s.ok(), error_of(s));
  return std::move(*s);
}

/// Runs the outbox relay with `opts` over a fresh journal: events appended to it are
/// acknowledged by JetStream (wait_for) and seen by a core subscriber on `observer`.
void check_relay_publishes(const nats_options& opts, ferry::actors::bus& observer) {
  temp_dir dir("ferry-relay");
  auto store = open_store(dir.path() / "journal");
  std::atomic<int> seen{0};
  auto sub = observer.subscribe("ferry.ev.task.auth",
                                [&](std::string_view, std::string_view) { ++seen; });
  BOOST_TEST_REQUIRE(sub.ok(), error_of(sub));
  ferry::actors::outbox_options oo;
  oo.nats = opts;
  auto relay = ferry::actors::start_outbox_relay(*store, oo);
  BOOST_TEST_REQUIRE(relay.ok(), error_of(relay));
  sc::envelope_meta m;
  m.stream_id = "task-auth";
  m.user = "system";
  std::vector<std::string> batch;
  for (int i = 0; i < 5; ++i)
    batch.push_back(sc::output_chunk(m, 1, ev::OutputStream::stdout, "line " + std::to_string(i)));
  auto appended = store->append("task-auth", batch);
  BOOST_TEST_REQUIRE(appended.ok(), error_of(appended));
  BOOST_TEST_REQUIRE((*relay)->wait_for(appended->last_position, 30s),
                     "JetStream acknowledged up to " << (*relay)->stats().cursor << " of "
                                                     << appended->last_position << ": "
                                                     << (*relay)->stats().last_error);
  BOOST_TEST((*relay)->stats().published == 5u);
  BOOST_TEST(ferry::test::eventually([&] { return seen.load() == 5; }, 10s),
             "a core subscriber saw " << seen.load() << " of 5 relayed events");
}

void check_no_secret(const std::string& message) {
  BOOST_TEST(message.find(the_password) == std::string::npos, "password leaked: " << message);
  BOOST_TEST(message.find("wrong-" + the_password) == std::string::npos,
             "wrong password leaked: " << message);
  BOOST_TEST(message.find(the_token) == std::string::npos, "token leaked: " << message);
}

std::string lower(std::string s) {
  for (char& c : s)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string tls_block(const test_pki& pki, bool verify_clients) {
  return "tls {\n  cert_file: " + nats_config_string(pki.server_cert.string()) +
         "\n  key_file: " + nats_config_string(pki.server_key.string()) +
         "\n  ca_file: " + nats_config_string(pki.ca_cert.string()) +
         (verify_clients ? "\n  verify: true" : "") + "\n  timeout: 5\n}\n";
}

}  // namespace

BOOST_AUTO_TEST_CASE(urls_are_redacted_in_messages) {
  using ferry::actors::redact_nats_url;
  BOOST_TEST(redact_nats_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222");
  BOOST_TEST(redact_nats_url("nats://ferry:" + the_password + "@h:4222") ==
             "nats://ferry:***@h:4222");
  BOOST_TEST(redact_nats_url("tls://" + the_token + "@h:4222/x") == "tls://***@h:4222/x");
  BOOST_TEST(redact_nats_url("u:" + the_password + "@h:1,nats://h2:2,nats://" + the_token +
                             "@h3") == "u:***@h:1,nats://h2:2,nats://***@h3");
}

BOOST_AUTO_TEST_CASE(inconsistent_options_are_refused_before_connecting) {
  temp_dir dir("ferry-nats-opts");
  const fs::path file = dir.path() / "exists.pem";
  std::ofstream(file) << "x";
  auto refused = [](const nats_options& o, const std::string& expected) {
    auto ok = ferry::actors::check_nats_options(o);
    BOOST_TEST(!ok.ok(), "accepted; expected: " << expected);
    if (!ok.ok()) {
      BOOST_TEST(ok.error().message.find(expected) != std::string::npos, ok.error().message);
      check_no_secret(ok.error().message);
    }
    auto bus = ferry::actors::connect_nats(o);
    BOOST_TEST(!bus.ok(), "connect_nats accepted what check_nats_options refuses");
  };
  nats_options o;
  o.url = "nats://127.0.0.1:1";
  BOOST_TEST(ferry::actors::check_nats_options(o).ok());

  nats_options no_user = o;
  no_user.password = the_password;
  refused(no_user, "needs a user");
  nats_options no_password = o;
  no_password.user = "ferry";
  refused(no_password, "has no password");
  nats_options two_methods = o;
  two_methods.user = "ferry";
  two_methods.password = the_password;
  two_methods.token = the_token;
  refused(two_methods, "more than one");
  nats_options cert_only = o;
  cert_only.tls_cert_file = file;
  refused(cert_only, "needs its key");
  nats_options key_only = o;
  key_only.tls_key_file = file;
  refused(key_only, "needs its certificate");
  nats_options missing_ca = o;
  missing_ca.tls_ca_file = dir.path() / "missing-ca.pem";
  refused(missing_ca, (dir.path() / "missing-ca.pem").string() + ": No such file");
  nats_options dir_as_creds = o;
  dir_as_creds.creds_file = dir.path();
  refused(dir_as_creds, "is a directory");
  nats_options no_url;
  refused(no_url, "no NATS URL");
}

BOOST_AUTO_TEST_CASE(user_and_password) {
  nats_server server("authorization {\n  user: \"ferry\"\n  password: " +
                     nats_config_string(the_password) + "\n}\n");
  nats_options right;
  right.url = server.url();
  right.user = "ferry";
  right.password = the_password;
  auto bus = ferry::actors::connect_nats(right);
  BOOST_TEST_REQUIRE(bus.ok(), error_of(bus));
  check_round_trip(**bus);
  check_relay_publishes(right, **bus);

  // Wrong password: a clear refusal, at once, from both connections; no secret in it.
  nats_options wrong = right;
  wrong.password = "wrong-" + the_password;
  const auto t0 = std::chrono::steady_clock::now();
  auto refused = ferry::actors::connect_nats(wrong);
  BOOST_TEST_REQUIRE(!refused.ok());
  BOOST_TEST_MESSAGE("wrong password: " << refused.error().message);
  BOOST_TEST(lower(refused.error().message).find("authoriz") != std::string::npos,
             refused.error().message);
  BOOST_TEST(refused.error().message.find(server.url()) != std::string::npos,
             "the error should say which server: " << refused.error().message);
  check_no_secret(refused.error().message);
  temp_dir dir("ferry-relay");
  auto store = open_store(dir.path() / "journal");
  ferry::actors::outbox_options oo;
  oo.nats = wrong;
  auto relay = ferry::actors::start_outbox_relay(*store, oo);
  BOOST_TEST_REQUIRE(!relay.ok(), "the relay accepted a wrong password");
  BOOST_TEST(lower(relay.error().message).find("authoriz") != std::string::npos,
             relay.error().message);
  check_no_secret(relay.error().message);
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 10s), "refusals should not retry");

  // Credentials in the URL work too, and are redacted from errors.
  auto in_url = ferry::actors::connect_nats("nats://ferry:" + the_password + "@127.0.0.1:" +
                                            std::to_string(server.port()));
  BOOST_TEST_REQUIRE(in_url.ok(), error_of(in_url));
  check_round_trip(**in_url);
  auto wrong_in_url = ferry::actors::connect_nats("nats://ferry:wrong-" + the_password +
                                                  "@127.0.0.1:" + std::to_string(server.port()));
  BOOST_TEST_REQUIRE(!wrong_in_url.ok());
  BOOST_TEST(wrong_in_url.error().message.find("ferry:***@") != std::string::npos,
             wrong_in_url.error().message);
  check_no_secret(wrong_in_url.error().message);

  // No credentials at all: refused as well.
  auto anonymous = ferry::actors::connect_nats(server.url());
  BOOST_TEST(!anonymous.ok(), "a server that requires a password let an anonymous client in");
}

BOOST_AUTO_TEST_CASE(token_auth) {
  nats_server server("authorization {\n  token: " + nats_config_string(the_token) + "\n}\n");
  nats_options right;
  right.url = server.url();
  right.token = the_token;
  auto bus = ferry::actors::connect_nats(right);
  BOOST_TEST_REQUIRE(bus.ok(), error_of(bus));
  check_round_trip(**bus);
  check_relay_publishes(right, **bus);

  nats_options wrong = right;
  wrong.token = "tok-wrong-" + the_token;
  auto refused = ferry::actors::connect_nats(wrong);
  BOOST_TEST_REQUIRE(!refused.ok());
  BOOST_TEST_MESSAGE("wrong token: " << refused.error().message);
  BOOST_TEST(lower(refused.error().message).find("authoriz") != std::string::npos,
             refused.error().message);
  check_no_secret(refused.error().message);
  BOOST_TEST(refused.error().message.find("tok-wrong-") == std::string::npos,
             refused.error().message);
}

BOOST_AUTO_TEST_CASE(nkey_seed_file) {
  // The documented example pair (docs.nats.io, NKey authentication): the server knows only the
  // public key, the client derives it from the seed and signs the server's nonce.
  const std::string seed = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY";
  const std::string pub = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
  nats_server server("authorization {\n  users: [ { nkey: " + nats_config_string(pub) +
                     " } ]\n}\n");
  temp_dir dir("ferry-nkey");
  const fs::path seed_file = dir.path() / "user.nk";
  std::ofstream(seed_file) << seed << "\n";
  nats_options o;
  o.url = server.url();
  o.nkey_seed_file = seed_file;
  auto bus = ferry::actors::connect_nats(o);
  BOOST_TEST_REQUIRE(bus.ok(), error_of(bus));
  check_round_trip(**bus);
  check_relay_publishes(o, **bus);

  // A seed with a broken checksum is refused by us, without echoing it.
  std::string broken = seed;
  broken[10] = broken[10] == 'A' ? 'B' : 'A';
  std::ofstream(seed_file) << broken << "\n";
  auto refused = ferry::actors::connect_nats(o);
  BOOST_TEST_REQUIRE(!refused.ok());
  BOOST_TEST(refused.error().message.find("not a valid NKey seed") != std::string::npos,
             refused.error().message);
  BOOST_TEST(refused.error().message.find(broken.substr(2, 20)) == std::string::npos,
             refused.error().message);
}

BOOST_AUTO_TEST_CASE(tls_verifies_the_server) {
  temp_dir dir("ferry-pki");
  test_pki pki(dir.path());
  nats_server server(tls_block(pki, false));

  nats_options with_ca;
  with_ca.url = server.url();
  with_ca.tls_ca_file = pki.ca_cert;
  auto bus = ferry::actors::connect_nats(with_ca);
  BOOST_TEST_REQUIRE(bus.ok(), error_of(bus));
  check_round_trip(**bus);
  check_relay_publishes(with_ca, **bus);
  // By name as well as by address: the certificate carries both.
  nats_options by_name = with_ca;
  by_name.url = server.url("tls", "localhost");
  auto named = ferry::actors::connect_nats(by_name);
  BOOST_TEST(named.ok(), error_of(named));

  // Without the CA (the system's trust store does not know it): verification fails, clearly.
  nats_options without_ca;
  without_ca.url = server.url();
  without_ca.require_tls = true;
  auto unverified = ferry::actors::connect_nats(without_ca);
  BOOST_TEST_REQUIRE(!unverified.ok(), "connected to a server whose CA it does not trust");
  BOOST_TEST_MESSAGE("without the CA: " << unverified.error().message);
  BOOST_TEST(lower(unverified.error().message).find("certificate") != std::string::npos,
             unverified.error().message);
  // The relay refuses too, at once (no silent retrying against an untrusted server).
  {
    temp_dir jdir("ferry-relay");
    auto store = open_store(jdir.path() / "journal");
    ferry::actors::outbox_options oo;
    oo.nats = without_ca;
    auto relay = ferry::actors::start_outbox_relay(*store, oo);
    BOOST_TEST(!relay.ok(), "the relay connected to an untrusted server");
  }
  // Another CA does not vouch for it either.
  nats_options other_ca = without_ca;
  other_ca.tls_ca_file = pki.other_ca_cert;
  auto wrong_ca = ferry::actors::connect_nats(other_ca);
  BOOST_TEST(!wrong_ca.ok(), "connected with a CA that did not issue the server's certificate");
  // A certificate from the right CA for another name is refused.
  nats_options other_name = with_ca;
  other_name.tls_server_name = "nats.other.test";
  auto wrong_name = ferry::actors::connect_nats(other_name);
  BOOST_TEST_REQUIRE(!wrong_name.ok(), "accepted a certificate issued for another name");
  BOOST_TEST_MESSAGE("wrong name: " << wrong_name.error().message);
  BOOST_TEST(wrong_name.error().message.find("hostname mismatch") != std::string::npos,
             wrong_name.error().message);
  // A plain (non-TLS) client never gets in.
  auto plain = ferry::actors::connect_nats(server.url());
  BOOST_TEST(!plain.ok(), "a client without TLS settings connected to a TLS server");
}

BOOST_AUTO_TEST_CASE(mutual_tls) {
  temp_dir dir("ferry-pki");
  test_pki pki(dir.path());
  nats_server server(tls_block(pki, true));

  nats_options with_cert;
  with_cert.url = server.url("tls");
  with_cert.tls_ca_file = pki.ca_cert;
  with_cert.tls_cert_file = pki.client_cert;
  with_cert.tls_key_file = pki.client_key;
  auto bus = ferry::actors::connect_nats(with_cert);
  BOOST_TEST_REQUIRE(bus.ok(), error_of(bus));
  check_round_trip(**bus);
  check_relay_publishes(with_cert, **bus);

  nats_options without_cert = with_cert;
  without_cert.tls_cert_file.clear();
  without_cert.tls_key_file.clear();
  auto refused = ferry::actors::connect_nats(without_cert);
  BOOST_TEST_REQUIRE(!refused.ok(), "a server that verifies clients let one in without a cert");
  BOOST_TEST_MESSAGE("without a client certificate: " << refused.error().message);
  BOOST_TEST(refused.error().message.find("client certificate") != std::string::npos,
             refused.error().message);

  // A client certificate the server's CA did not issue: refused by the server.
  nats_options wrong_cert = with_cert;
  wrong_cert.tls_cert_file = pki.other_ca_cert;
  wrong_cert.tls_key_file = dir.path() / "other-ca.key";
  auto wrong = ferry::actors::connect_nats(wrong_cert);
  BOOST_TEST(!wrong.ok(), "a client certificate from another CA was accepted");
}

// ---- .creds files: a user JWT signed by an account, in operator (decentralised) mode ----

namespace {

// NKeys and JWTs made here with OpenSSL, independently of the code under test: the server
// checks every signature, so a mistake on either side fails the connection.
std::string base32(const std::vector<uint8_t>& in) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  std::string out;
  uint32_t buffer = 0;
  int bits = 0;
  for (uint8_t b : in) {
    buffer = (buffer << 8) | b;
    bits += 8;
    for (; bits >= 5; bits -= 5)
      out.push_back(alphabet[(buffer >> (bits - 5)) & 31]);
  }
  if (bits > 0)
    out.push_back(alphabet[(buffer << (5 - bits)) & 31]);
  return out;
}

std::vector<uint8_t> with_crc16(std::vector<uint8_t> bytes) {
  uint16_t crc = 0;  // CRC-16/XMODEM, as nkeys uses
  for (uint8_t b : bytes) {
    crc ^= static_cast<uint16_t>(b << 8);
    for (int i = 0; i < 8; ++i)
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                           : static_cast<uint16_t>(crc << 1);
  }
  bytes.push_back(static_cast<uint8_t>(crc & 0xff));
  bytes.push_back(static_cast<uint8_t>(crc >> 8));
  return bytes;
}

std::string base64url(std::string_view in) {
  std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()),
                          static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(n));
  while (!out.empty() && out.back() == '=')
    out.pop_back();
  for (char& c : out)
    c = c == '+' ? '-' : c == '/' ? '_' : c;
  return out;
}

struct nkey_pair {
  std::string public_key, seed;
  std::shared_ptr<EVP_PKEY> key;
};

/// A fresh Ed25519 NKey of type `prefix` (operator 'O' = 14 << 3, account 'A' = 0,
/// user 'U' = 20 << 3).
nkey_pair make_nkey(uint8_t prefix) {
  std::vector<uint8_t> raw(32);
  BOOST_TEST_REQUIRE(RAND_bytes(raw.data(), 32) == 1);
  nkey_pair k;
  k.key.reset(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, raw.data(), 32),
              EVP_PKEY_free);
  BOOST_TEST_REQUIRE(k.key != nullptr);
  std::vector<uint8_t> pub(1 + 32);
  pub[0] = prefix;
  size_t len = 32;
  BOOST_TEST_REQUIRE(EVP_PKEY_get_raw_public_key(k.key.get(), pub.data() + 1, &len) == 1);
  k.public_key = base32(with_crc16(pub));
  std::vector<uint8_t> seed{static_cast<uint8_t>((18 << 3) | (prefix >> 5)),
                            static_cast<uint8_t>((prefix & 31) << 3)};
  seed.insert(seed.end(), raw.begin(), raw.end());
  k.seed = base32(with_crc16(seed));
  return k;
}

/// A NATS JWT (alg ed25519-nkey) with `claims`, issued and signed by `issuer`.
std::string make_jwt(const nkey_pair& issuer, const std::string& subject,
                     const std::string& claims_nats, const std::string& name) {
  const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count();
  const std::string claims = "{\"jti\":\"" + base32({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}) +
                             "\",\"iat\":" + std::to_string(now) + ",\"iss\":\"" +
                             issuer.public_key + "\",\"name\":\"" + name + "\",\"sub\":\"" +
                             subject + "\",\"nats\":" + claims_nats + "}";
  const std::string signing_input =
    base64url(R"({"typ":"JWT","alg":"ed25519-nkey"})") + "." + base64url(claims);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  BOOST_TEST_REQUIRE(
    EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, issuer.key.get()) == 1);
  std::string sig(64, '\0');
  size_t sig_len = sig.size();
  BOOST_TEST_REQUIRE(EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()),
                                    &sig_len,
                                    reinterpret_cast<const unsigned char*>(signing_input.data()),
                                    signing_input.size()) == 1);
  sig.resize(sig_len);
  return signing_input + "." + base64url(sig);
}

}  // namespace

BOOST_AUTO_TEST_CASE(creds_file) {
  const auto op = make_nkey(14 << 3), account = make_nkey(0), user = make_nkey(20 << 3),
             system = make_nkey(0);
  const std::string op_jwt =
    make_jwt(op, op.public_key, R"({"type":"operator","version":2})", "ferry-test-operator");
  const std::string account_jwt = make_jwt(
    op, account.public_key,
    R"({"limits":{"subs":-1,"data":-1,"payload":-1,"imports":-1,"exports":-1,"wildcards":true,)"
    R"("conn":-1,"leaf":-1,"mem_storage":-1,"disk_storage":-1,"streams":-1,"consumer":-1},)"
    R"("default_permissions":{"pub":{},"sub":{}},"type":"account","version":2})",
    "ferry-test-account");
  // JetStream needs a system account in operator mode.
  const std::string system_jwt = make_jwt(
    op, system.public_key,
    R"({"limits":{"subs":-1,"data":-1,"payload":-1,"imports":-1,"exports":-1,"wildcards":true,)"
    R"("conn":-1,"leaf":-1},"type":"account","version":2})",
    "SYS");
  const std::string user_jwt = make_jwt(
    account, user.public_key,
    R"({"pub":{},"sub":{},"subs":-1,"data":-1,"payload":-1,"type":"user","version":2})",
    "ferryd");

  temp_dir dir("ferry-creds");
  const fs::path op_file = dir.path() / "operator.jwt";
  std::ofstream(op_file) << op_jwt;
  nats_server server("operator: " + nats_config_string(op_file.string()) +
                     "\nsystem_account: " + system.public_key +
                     "\nresolver: MEMORY\nresolver_preload: {\n  " + account.public_key + ": " +
                     nats_config_string(account_jwt) + "\n  " + system.public_key + ": " +
                     nats_config_string(system_jwt) + "\n}\n");
  const fs::path creds = dir.path() / "ferryd.creds";
  std::ofstream(creds) << "-----BEGIN NATS USER JWT-----\n"
                       << user_jwt << "\n------END NATS USER JWT------\n\n"
                       << "-----BEGIN USER NKEY SEED-----\n"
                       << user.seed << "\n------END USER NKEY SEED------\n";
  nats_options o;
  o.url = server.url();
  o.creds_file = creds;
  auto bus = ferry::actors::connect_nats(o);
  BOOST_TEST_REQUIRE(bus.ok(), error_of(bus) << "\nserver log:\n" << server.log());
  check_round_trip(**bus);
  check_relay_publishes(o, **bus);

  // A user the account never signed (same JWT, another key): refused.
  const auto stranger = make_nkey(20 << 3);
  std::ofstream(creds) << "-----BEGIN NATS USER JWT-----\n"
                       << user_jwt << "\n------END NATS USER JWT------\n\n"
                       << "-----BEGIN USER NKEY SEED-----\n"
                       << stranger.seed << "\n------END USER NKEY SEED------\n";
  auto refused = ferry::actors::connect_nats(o);
  BOOST_TEST_REQUIRE(!refused.ok(), "a .creds file with a foreign key was accepted");
  BOOST_TEST_MESSAGE("foreign key: " << refused.error().message);
  BOOST_TEST(refused.error().message.find(stranger.seed.substr(2, 20)) == std::string::npos);
}
