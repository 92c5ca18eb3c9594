// libFuzzer target: the egress proxy's check of a sandbox token (sandbox_tokens::verify: libjwt
// decoding, the algorithm pinned to ES256, the claims read with nlohmann-json). Every input must
// be refused — a forged token is never valid — without a crash, leak or UB; a real token with
// bytes flipped is among the seeds.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include <ferry/egress/sandbox_token.h>

using namespace ferry::egress;

namespace {
std::shared_ptr<const sandbox_tokens> tokens;
egress_policy policy = egress_policy::trusted();
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // A key of this run's own, in a fresh directory (removed at exit).
  char dir[] = "/tmp/ferry-fuzz-token-XXXXXX";
  if (!::mkdtemp(dir))
    std::abort();
  static const std::filesystem::path key_dir = dir;
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(key_dir, ec);
  });
  auto opened = sandbox_tokens::open(key_dir);
  if (!opened.ok())
    std::abort();
  tokens = std::move(*opened);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string token(reinterpret_cast<const char*>(data), size);
  auto check = tokens->verify(token, "sandbox-1", policy);
  if (check.ok())
    __builtin_trap();  // the fuzzer cannot sign with this run's key: acceptance is a forgery
  return 0;
}
