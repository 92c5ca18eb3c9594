// The credential manager (ferry/storage/credentials.h): round trips, the key file's checks,
// tampering, wrong keys, and key rotation including a crash at every stage of it.
#define BOOST_TEST_MODULE gitproxy_credentials
#include <boost/test/unit_test.hpp>

#include <sys/stat.h>

#include <fstream>
#include <iterator>
#include <map>

#include "ferry/storage/credentials.h"
#include "ferry/test_support/temp_dir.h"

namespace fs = std::filesystem;
using ferry::errc;
using ferry::storage::credential_store;
using ferry::storage::credential_store_options;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}

unsigned mode_of(const fs::path& p) {
  struct stat st {};
  BOOST_REQUIRE(::stat(p.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

std::unique_ptr<credential_store> open_store(const fs::path& dir,
                                             credential_store_options extra = {}) {
  extra.dir = dir;
  auto s = credential_store::open(extra);
  BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
  return std::move(*s);
}

// The secret, or an error message prefixed "ERR:".
std::string read_secret(credential_store& s, const std::string& name) {
  std::string got;
  bool called = false;
  auto r = s.use(name, [&](std::string_view v) {
    called = true;
    got = v;
  });
  if (!r) {
    BOOST_TEST(!called);
    return "ERR:" + r.error().message;
  }
  return got;
}

const std::map<std::string, std::string> samples = {
    {"github-oauth", "gho_16C7e42F292c6912E7710c838347Ae178B4a"},
    {"anthropic.api-key", "sk-ant-api03-xyz"},
    {"empty", ""},
    {"binary", std::string("\0\x01\xff zero", 9)},
    {"long", std::string(100000, 'k')},
};

}  // namespace

BOOST_AUTO_TEST_CASE(round_trip_and_reopen) {
  ferry::test::temp_dir tmp("cred");
  const auto dir = tmp.path() / "creds";
  {
    auto s = open_store(dir);
    for (const auto& [name, secret] : samples)
      BOOST_REQUIRE(s->put(name, secret).ok());
    for (const auto& [name, secret] : samples)
      BOOST_TEST(read_secret(*s, name) == secret);
    auto names = s->names();
    BOOST_REQUIRE(names.ok());
    BOOST_TEST(names->size() == samples.size());
    auto user = s->user_of("github-oauth");
    std::string via_user;
    BOOST_TEST(user([&](std::string_view v) { via_user = v; }).ok());
    BOOST_TEST(via_user == samples.at("github-oauth"));
  }
  // The key file is created 0600 with 32 bytes; secrets are 0600 and hold no plaintext.
  BOOST_TEST(mode_of(dir / "master.key") == 0600u);
  BOOST_TEST(fs::file_size(dir / "master.key") == 32u);
  BOOST_TEST(mode_of(dir / "github-oauth.secret") == 0600u);
  BOOST_TEST(slurp(dir / "github-oauth.secret").find("gho_16C7") == std::string::npos);

  auto s = open_store(dir);
  for (const auto& [name, secret] : samples)
    BOOST_TEST(read_secret(*s, name) == secret);
  BOOST_TEST(read_secret(*s, "absent").rfind("ERR:", 0) == 0);
  BOOST_TEST(s->remove("empty").ok());
  BOOST_TEST(read_secret(*s, "empty").find("no secret named") != std::string::npos);
  // Names are a strict charset: no path games.
  BOOST_TEST(!s->put("../escape", "x").ok());
  BOOST_TEST(!s->put(".hidden", "x").ok());
  BOOST_TEST(!s->put("a/b", "x").ok());
}

BOOST_AUTO_TEST_CASE(every_write_draws_a_fresh_nonce) {
  ferry::test::temp_dir tmp("cred");
  auto s = open_store(tmp.path());
  BOOST_REQUIRE(s->put("t", "same").ok());
  const auto first = slurp(tmp.path() / "t.secret");
  BOOST_REQUIRE(s->put("t", "same").ok());
  const auto second = slurp(tmp.path() / "t.secret");
  BOOST_TEST(first.size() == second.size());
  BOOST_TEST(first != second);
}

BOOST_AUTO_TEST_CASE(wrong_key_is_a_clear_error) {
  ferry::test::temp_dir tmp("cred");
  {
    auto s = open_store(tmp.path());
    BOOST_REQUIRE(s->put("t", "secret-value").ok());
  }
  // Another 32-byte key in the key file.
  std::string other(32, '\x5a');
  spit(tmp.path() / "master.key", other);
  fs::permissions(tmp.path() / "master.key", fs::perms::owner_read | fs::perms::owner_write);
  auto s = open_store(tmp.path());
  const auto got = read_secret(*s, "t");
  BOOST_TEST(got.find("key this store does not hold") != std::string::npos, got);
  auto r = s->use("t", [](std::string_view) {});
  BOOST_TEST((!r.ok() && r.error().code == errc::corrupt));

  // A key derived from a configured secret: another secret cannot read.
  ferry::test::temp_dir tmp2("cred");
  {
    credential_store_options o;
    o.configured_secret = std::string(40, 'a');
    auto c = open_store(tmp2.path(), o);
    BOOST_REQUIRE(c->put("t", "v").ok());
    BOOST_TEST(read_secret(*c, "t") == "v");
    BOOST_TEST(!c->rotate_key().ok());
  }
  credential_store_options o;
  o.configured_secret = std::string(40, 'b');
  auto c = open_store(tmp2.path(), o);
  BOOST_TEST(read_secret(*c, "t").rfind("ERR:", 0) == 0);
  o.configured_secret = "short";
  o.dir = tmp2.path();
  BOOST_TEST(!credential_store::open(o).ok());
}

BOOST_AUTO_TEST_CASE(tampered_files_never_give_garbage) {
  ferry::test::temp_dir tmp("cred");
  auto s = open_store(tmp.path());
  BOOST_REQUIRE(s->put("t", "the-real-token-value").ok());
  const auto path = tmp.path() / "t.secret";
  const auto original = slurp(path);
  // Flip one bit anywhere: header (magic, key id, nonce), ciphertext or tag.
  for (std::size_t i = 0; i < original.size(); ++i) {
    std::string bad = original;
    bad[i] = static_cast<char>(bad[i] ^ 0x01);
    spit(path, bad);
    const auto got = read_secret(*s, "t");
    BOOST_TEST(got.rfind("ERR:", 0) == 0, "byte " << i << " gave " << got);
  }
  // Truncated, extended, emptied.
  for (const auto& bad : {original.substr(0, original.size() - 1), original + "x",
                          original.substr(0, 10), std::string()}) {
    spit(path, bad);
    BOOST_TEST(read_secret(*s, "t").rfind("ERR:", 0) == 0);
  }
  // The name is authenticated: a copy under another name does not decrypt.
  spit(path, original);
  fs::copy_file(path, tmp.path() / "u.secret");
  BOOST_TEST(read_secret(*s, "u").find("failed authentication") != std::string::npos);
  BOOST_TEST(read_secret(*s, "t") == "the-real-token-value");
}

BOOST_AUTO_TEST_CASE(key_file_permissions_and_size_are_enforced) {
  ferry::test::temp_dir tmp("cred");
  { auto s = open_store(tmp.path()); }
  const auto key = tmp.path() / "master.key";
  credential_store_options o;
  o.dir = tmp.path();
  for (auto mode : {0644, 0640, 0604, 0660, 0777}) {
    ::chmod(key.c_str(), static_cast<mode_t>(mode));
    auto r = credential_store::open(o);
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(r.error().message.find("must be 0600") != std::string::npos, r.error().message);
  }
  ::chmod(key.c_str(), 0600);
  BOOST_TEST(credential_store::open(o).ok());
  // Wrong size.
  const auto bytes = slurp(key);
  spit(key, bytes.substr(0, 31));
  auto r = credential_store::open(o);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("exactly 32 bytes") != std::string::npos, r.error().message);
  spit(key, bytes + "x");
  BOOST_TEST(!credential_store::open(o).ok());
  // A symlink is not a key file.
  spit(key, bytes);
  fs::rename(key, tmp.path() / "real.key");
  fs::create_symlink(tmp.path() / "real.key", key);
  BOOST_TEST(!credential_store::open(o).ok());
}

BOOST_AUTO_TEST_CASE(a_missing_key_with_secrets_is_refused) {
  ferry::test::temp_dir tmp("cred");
  {
    auto s = open_store(tmp.path());
    BOOST_REQUIRE(s->put("t", "v").ok());
  }
  fs::remove(tmp.path() / "master.key");
  credential_store_options o;
  o.dir = tmp.path();
  auto r = credential_store::open(o);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("is missing") != std::string::npos, r.error().message);
  BOOST_TEST(!fs::exists(tmp.path() / "master.key"));
}

BOOST_AUTO_TEST_CASE(rotation_reencrypts_every_secret) {
  ferry::test::temp_dir tmp("cred");
  auto s = open_store(tmp.path());
  for (const auto& [name, secret] : samples)
    BOOST_REQUIRE(s->put(name, secret).ok());
  const auto old_key = slurp(tmp.path() / "master.key");
  const auto old_file = slurp(tmp.path() / "github-oauth.secret");
  auto r = s->rotate_key();
  BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  const auto new_key = slurp(tmp.path() / "master.key");
  BOOST_TEST(new_key.size() == 32u);
  BOOST_TEST(new_key != old_key);
  BOOST_TEST(mode_of(tmp.path() / "master.key") == 0600u);
  BOOST_TEST(!fs::exists(tmp.path() / "master.key.new"));
  // The key id (bytes 4..12) changed: the file really was re-encrypted.
  BOOST_TEST(slurp(tmp.path() / "github-oauth.secret").substr(4, 8) != old_file.substr(4, 8));
  for (const auto& [name, secret] : samples)
    BOOST_TEST(read_secret(*s, name) == secret);
  s.reset();
  auto again = open_store(tmp.path());
  for (const auto& [name, secret] : samples)
    BOOST_TEST(read_secret(*again, name) == secret);
  // The old key can no longer read anything.
  spit(tmp.path() / "master.key", old_key);
  auto with_old = open_store(tmp.path());
  BOOST_TEST(read_secret(*with_old, "github-oauth").rfind("ERR:", 0) == 0);
}

// A crash mid-rotation (simulated by the test hook, which leaves the disk exactly as a crash at
// that point would): the next open finishes the rotation and every secret is readable.
BOOST_AUTO_TEST_CASE(a_crash_mid_rotation_loses_no_secret) {
  for (std::size_t stop_after : {std::size_t{0}, std::size_t{2}, samples.size()}) {
    BOOST_TEST_CONTEXT("stopped after " << stop_after << " secrets") {
      ferry::test::temp_dir tmp("cred");
      credential_store_options o;
      o.test_stop_rotation_after = stop_after;
      auto s = open_store(tmp.path(), o);
      for (const auto& [name, secret] : samples)
        BOOST_REQUIRE(s->put(name, secret).ok());
      const auto old_key = slurp(tmp.path() / "master.key");
      auto r = s->rotate_key();
      BOOST_REQUIRE(!r.ok());
      BOOST_TEST(r.error().message.find("test hook") != std::string::npos);
      s.reset();  // the "crash": nothing more runs in this store
      const auto pending = tmp.path() / "master.key.new";
      BOOST_REQUIRE(fs::exists(pending));
      const auto new_key = slurp(pending);
      BOOST_TEST(slurp(tmp.path() / "master.key") == old_key);
      // A temp file of an interrupted write is cleaned up too.
      spit(tmp.path() / ".long.secret.tmp", "half-written");

      auto recovered = open_store(tmp.path());
      BOOST_TEST(!fs::exists(pending));
      BOOST_TEST(!fs::exists(tmp.path() / ".long.secret.tmp"));
      BOOST_TEST(slurp(tmp.path() / "master.key") == new_key);
      for (const auto& [name, secret] : samples)
        BOOST_TEST(read_secret(*recovered, name) == secret, name);
      recovered.reset();
      // And the state after recovery is final: a plain reopen reads everything.
      auto again = open_store(tmp.path());
      for (const auto& [name, secret] : samples)
        BOOST_TEST(read_secret(*again, name) == secret, name);
    }
  }
}
