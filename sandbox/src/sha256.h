#pragma once
// Private to ferry_sandbox: hex SHA-256 (OpenSSL's EVP), for content keys — image hashes
// (image.cpp) and environment keys (environment.cpp).
//
// Threading: a pure function.

#include <openssl/evp.h>

#include <string>
#include <string_view>

#include <fmt/format.h>

namespace ferry::sandbox::detail {

inline std::string sha256_hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned i = 0; i < len; ++i)
    hex += fmt::format("{:02x}", md[i]);
  return hex;
}

}  // namespace ferry::sandbox::detail
