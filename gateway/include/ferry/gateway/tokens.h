#pragma once
// API tokens: random secrets handed out once; only their SHA-256 is kept, as `token_created`
// events on the journal stream `tokens`.
//
// Threading: thread-safe.

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "ferry/schemas/result.h"

namespace ferry::storage {
class event_store;
}

namespace ferry::gateway {

struct token_info {
  std::string id;    ///< public id, safe to log; recorded as the acting user of events
  std::string name;  ///< given at creation
  bool admin = false;
};

class token_registry {
 public:
  /// Loads every token_created event of the stream `tokens`.
  [[nodiscard]] static result<std::unique_ptr<token_registry>> load(storage::event_store& store);

  /// Creates a token, persists its hash, and returns the secret (the only time it exists).
  [[nodiscard]] result<std::string> create(std::string_view name, bool admin);

  /// The token a secret belongs to, if any.
  [[nodiscard]] std::optional<token_info> verify(std::string_view secret) const;

  [[nodiscard]] size_t size() const;

 private:
  explicit token_registry(storage::event_store& store) : store_(store) {}

  storage::event_store& store_;
  mutable std::mutex mtx_;
  std::unordered_map<std::string, token_info> by_hash_;  // GUARDED_BY(mtx_)
};

/// Lowercase hex SHA-256 of `data`.
std::string sha256_hex(std::string_view data);

/// `n` random bytes from OpenSSL's CSPRNG as lowercase hex.
std::string random_hex(size_t n);

}  // namespace ferry::gateway
