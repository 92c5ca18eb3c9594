#include "ferry/gateway/tokens.h"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstdio>
#include <cstdlib>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace ferry::gateway {

namespace ev = ferry::events::v1;

namespace {
constexpr const char* tokens_stream = "tokens";

std::string to_hex(const unsigned char* p, size_t n) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    out += hex[p[i] >> 4];
    out += hex[p[i] & 15];
  }
  return out;
}
}  // namespace

std::string sha256_hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) {
    std::fprintf(stderr, "ferryd: fatal: OpenSSL SHA-256 failed\n");
    std::abort();
  }
  return to_hex(md, len);
}

std::string random_hex(size_t n) {
  std::string buf(n, '\0');
  auto* p = reinterpret_cast<unsigned char*>(buf.data());
  if (RAND_bytes(p, static_cast<int>(n)) != 1) {
    std::fprintf(stderr, "ferryd: fatal: OpenSSL RAND_bytes failed\n");
    std::abort();
  }
  return to_hex(p, n);
}

result<std::unique_ptr<token_registry>> token_registry::load(storage::event_store& store) {
  std::unique_ptr<token_registry> reg(new token_registry(store));
  uint64_t next = 1;
  for (;;) {
    auto events = store.read_stream(tokens_stream, next, 256);
    if (!events)
      return fail("load tokens: " + events.error().message);
    for (const auto& bytes : *events) {
      auto e = schemas::verify_envelope(bytes);
      if (!e)
        return fail("load tokens: " + e.error().message);
      if (auto* t = (*e)->event_as_TokenCreated(); t && t->sha256())
        reg->by_hash_[t->sha256()->str()] =
          token_info{t->token_id() ? t->token_id()->str() : "", t->name() ? t->name()->str() : "",
                     t->admin()};
    }
    if (events->size() < 256)
      break;
    next += 256;
  }
  return reg;
}

result<std::string> token_registry::create(std::string_view name, bool admin) {
  if (name.empty() || name.size() > 100)
    return fail("token name must be 1..100 characters");
  auto secret = "ferry_" + random_hex(32);
  auto id = "tok_" + random_hex(6);
  auto hash = sha256_hex(secret);
  std::vector<std::string> envs{
    schemas::token_created({tokens_stream, "", "", "system"}, id, name, hash, admin)};
  if (auto r = store_.append(tokens_stream, envs); !r)
    return fail("store token: " + r.error().message);
  std::lock_guard<std::mutex> guard(mtx_);
  by_hash_[hash] = token_info{id, std::string(name), admin};
  return secret;
}

std::optional<token_info> token_registry::verify(std::string_view secret) const {
  if (secret.empty() || secret.size() > 256)
    return std::nullopt;
  auto hash = sha256_hex(secret);
  std::lock_guard<std::mutex> guard(mtx_);
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end())
    return std::nullopt;
  return it->second;
}

size_t token_registry::size() const {
  std::lock_guard<std::mutex> guard(mtx_);
  return by_hash_.size();
}

}  // namespace ferry::gateway
