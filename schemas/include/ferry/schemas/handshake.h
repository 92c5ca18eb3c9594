#pragma once
// The mutual challenge-response handshake of ferry-init's socket mode (protocol 4, see
// schemas/init.fbs): the per-sandbox key, the nonces and the two proofs, computed with OpenSSL's
// HMAC-SHA256 and compared in constant time. Header-only and shared by both sides like frame.h:
// ferry-init links libcrypto statically, the host links it as usual.
//
//   ferry-init → host: Hello{nonce_init}
//   host → ferry-init: Attach{nonce_host, mac = HMAC(key, "ferry-host" | nonce_init | nonce_host)}
//   ferry-init → host: Attached{mac = HMAC(key, "ferry-init" | nonce_host | nonce_init)}
//
// Each side proves it knows the key over the other side's fresh nonce, so neither proof can be
// replayed to another connection; the labels keep a proof of one side from passing as the other's.
// Nonces and MACs have fixed sizes, so the concatenations are unambiguous.
//
// Threading: stateless functions; OpenSSL 3's one-shot HMAC and RAND_bytes are thread-safe.

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace ferry::wire {

/// The secret shared by the host and one sandbox's ferry-init (256 bits, drawn per sandbox).
using handshake_key = std::array<uint8_t, 32>;
/// A fresh random challenge, one per connection and side.
using handshake_nonce = std::array<uint8_t, 32>;
/// HMAC-SHA256 output.
using handshake_mac = std::array<uint8_t, 32>;

inline constexpr std::string_view host_proof_label = "ferry-host";
inline constexpr std::string_view init_proof_label = "ferry-init";

/// Fills `out` from OpenSSL's CSPRNG. False if it failed (then `out` must not be used).
template <size_t N>
[[nodiscard]] inline bool random_bytes(std::array<uint8_t, N>& out) {
  return RAND_bytes(out.data(), static_cast<int>(N)) == 1;
}

/// HMAC-SHA256(key, label | first | second); nullopt if OpenSSL failed.
inline std::optional<handshake_mac> proof_of(const handshake_key& key, std::string_view label,
                                             const handshake_nonce& first, const handshake_nonce& second) {
  std::array<uint8_t, 16 + 2 * std::tuple_size_v<handshake_nonce>> msg{};
  if (label.size() > 16)
    return std::nullopt;
  size_t n = 0;
  std::memcpy(msg.data(), label.data(), label.size());
  n += label.size();
  std::memcpy(msg.data() + n, first.data(), first.size());
  n += first.size();
  std::memcpy(msg.data() + n, second.data(), second.size());
  n += second.size();
  handshake_mac out{};
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), msg.data(), n, out.data(), &len) ||
      len != out.size())
    return std::nullopt;
  OPENSSL_cleanse(msg.data(), msg.size());
  return out;
}

/// The host's proof, sent in Attach.
inline std::optional<handshake_mac> host_proof(const handshake_key& key, const handshake_nonce& nonce_init,
                                               const handshake_nonce& nonce_host) {
  return proof_of(key, host_proof_label, nonce_init, nonce_host);
}

/// ferry-init's proof, sent in Attached.
inline std::optional<handshake_mac> init_proof(const handshake_key& key, const handshake_nonce& nonce_host,
                                               const handshake_nonce& nonce_init) {
  return proof_of(key, init_proof_label, nonce_host, nonce_init);
}

/// Whether `got` (`n` bytes from a frame) is `expected`, in constant time; a wrong size fails.
inline bool proof_matches(const std::optional<handshake_mac>& expected, const uint8_t* got, size_t n) {
  return expected && got && n == expected->size() && CRYPTO_memcmp(expected->data(), got, n) == 0;
}

/// A nonce from a frame's byte vector; nullopt unless it has exactly the right size.
inline std::optional<handshake_nonce> nonce_from(const uint8_t* data, size_t n) {
  handshake_nonce out{};
  if (!data || n != out.size())
    return std::nullopt;
  std::memcpy(out.data(), data, n);
  return out;
}

/// The key as 64 lowercase hex digits (how it is stored on the host and handed to ferry-init).
inline std::string key_to_hex(const handshake_key& key) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  s.reserve(key.size() * 2);
  for (uint8_t b : key) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

/// Parses exactly 64 hex digits (a trailing newline is allowed); nullopt otherwise.
inline std::optional<handshake_key> key_from_hex(std::string_view text) {
  if (!text.empty() && text.back() == '\n')
    text.remove_suffix(1);
  handshake_key key{};
  if (text.size() != key.size() * 2)
    return std::nullopt;
  auto value = [](char c) -> int {
    if (c >= '0' && c <= '9')
      return c - '0';
    if (c >= 'a' && c <= 'f')
      return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
      return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < key.size(); ++i) {
    const int hi = value(text[2 * i]), lo = value(text[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return std::nullopt;
    key[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return key;
}

}  // namespace ferry::wire
