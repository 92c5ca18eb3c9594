#pragma once
// ferry_storage public header: the credential manager.
//
// Stores named secrets (forge OAuth tokens, API keys) encrypted with AES-256-GCM: one file per
// secret, `<dir>/<name>.secret`, written atomically (temp file, fsync, rename, fsync of the
// directory) with mode 0600. Each write draws a fresh random 96-bit nonce; the secret's name is
// authenticated as associated data, so a file renamed to another name fails to decrypt.
//
// The key is 32 random bytes in a key file (mode 0600, created on first open; an existing file
// with wider permissions or another size is refused), or derived (HKDF-SHA-256) from a
// configured secret of at least 32 bytes.
//
// Reading is narrow on purpose: there is no call that returns the plaintext. `use(name, fn)`
// decrypts into a buffer, calls `fn` with a view of it, and wipes the buffer (OPENSSL_cleanse)
// before returning. Ferry hands a `secret_use` for one name to the proxies that need it (the git
// proxy, the egress proxy) and to nothing else, so a token is decrypted only there, at the moment
// of use. `fn` must not copy the secret anywhere that outlives the call.
//
// Key rotation (`rotate_key`) is crash-safe; see storage/README.md ("Credential manager").
//
// Threading: `credential_store` is thread-safe (one internal mutex; `use` callbacks run with it
// held, so they must be short and must not call back into the store). One process owns a
// directory.

#include <cstddef>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::storage {

struct credential_store_options {
  /// Where the secret files live (created 0700 if missing).
  std::filesystem::path dir;
  /// The key file; empty means `<dir>/master.key`. Ignored when `configured_secret` is set.
  std::filesystem::path key_file;
  /// A configured secret (at least 32 bytes) to derive the key from instead of a key file.
  /// Such a key cannot be rotated by `rotate_key` (change the configuration instead).
  std::optional<std::string> configured_secret;
  /// Test hook (a sync point, not a feature): `rotate_key` stops as if the process had crashed
  /// after re-encrypting this many secrets (before swapping the key), returning an error.
  std::size_t test_stop_rotation_after = std::numeric_limits<std::size_t>::max();
};

/// The callback of `use`: sees the secret for the duration of the call only.
using secret_callback = std::function<void(std::string_view secret)>;

/// Access to one secret and nothing else: what a proxy is given. Copyable; the store must
/// outlive it. Thread-safe like the store.
using secret_use = std::function<result<void>(const secret_callback&)>;

class credential_store {
 public:
  /// Opens (or creates) the store. Fails loudly on a key file with permissions other than 0600
  /// or the wrong size, an unreadable directory, or a configured secret shorter than 32 bytes.
  /// Completes a key rotation that a crash interrupted (see storage/README.md).
  [[nodiscard]] static result<std::unique_ptr<credential_store>> open(
      credential_store_options opts);

  virtual ~credential_store() = default;

  /// Stores (or replaces) `name`. Names: 1–128 of [A-Za-z0-9._-], not starting with '.'.
  [[nodiscard]] virtual result<void> put(std::string_view name, std::string_view secret) = 0;

  /// Decrypts `name` and calls `fn` with it; the plaintext is wiped before this returns.
  /// errc::not_found when there is no such secret; errc::corrupt when the file was tampered
  /// with, truncated, renamed or encrypted with another key (the callback is not called).
  [[nodiscard]] virtual result<void> use(std::string_view name, const secret_callback& fn) = 0;

  /// A handle that can `use` the secret `name` only (what the proxies are given).
  virtual secret_use user_of(std::string name) = 0;

  [[nodiscard]] virtual result<void> remove(std::string_view name) = 0;

  /// The stored names, sorted.
  [[nodiscard]] virtual result<std::vector<std::string>> names() = 0;

  /// Re-encrypts every secret with a fresh random key and swaps the key file. Crash-safe: a crash
  /// at any point leaves every secret readable after the next `open` (which completes the
  /// rotation). Fails for a key derived from a configured secret.
  [[nodiscard]] virtual result<void> rotate_key() = 0;
};

}  // namespace ferry::storage
