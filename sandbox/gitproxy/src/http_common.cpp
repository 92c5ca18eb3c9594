#include "http_common.h"

#include <pthread.h>
#include <signal.h>

#include <algorithm>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

namespace ferry::gitproxy {

bool valid_repo_name(std::string_view repo) {
  if (repo.empty() || repo.size() > 200)
    return false;
  int segments = 0;
  std::size_t start = 0;
  while (start <= repo.size()) {
    std::size_t end = repo.find('/', start);
    if (end == std::string_view::npos)
      end = repo.size();
    const std::string_view seg = repo.substr(start, end - start);
    if (seg.empty() || seg.front() == '.' || ++segments > 4)
      return false;
    for (char c : seg)
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '.' || c == '_' || c == '-'))
        return false;
    if (seg.find("..") != std::string_view::npos)
      return false;
    start = end + 1;
  }
  return true;
}

}  // namespace ferry::gitproxy

namespace ferry::gitproxy::detail {

std::variant<git_target, target_refusal> parse_git_target(http::verb method,
                                                          std::string_view target) {
  auto refuse = [](http::status s, std::string why) {
    return target_refusal{s, std::move(why)};
  };
  if (target.size() > 512)
    return refuse(http::status::bad_request, "request path too long");
  for (char c : target) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f || c == '%' || c == '\\' || c == '#')
      return refuse(http::status::bad_request,
                    "request path contains a character the git proxy does not accept");
  }
  if (target.empty() || target.front() != '/' || target.find("//") != std::string_view::npos ||
      target.find("/.") != std::string_view::npos)
    return refuse(http::status::bad_request, "malformed request path");
  std::string_view path = target;
  std::string_view query;
  if (const auto q = target.find('?'); q != std::string_view::npos) {
    path = target.substr(0, q);
    query = target.substr(q + 1);
  }
  const auto dotgit = path.find(".git/");
  if (dotgit == std::string_view::npos)
    return refuse(http::status::not_found, "not a git smart-HTTP path");
  git_target t;
  t.repo = std::string(path.substr(1, dotgit - 1));
  if (!valid_repo_name(t.repo))
    return refuse(http::status::bad_request, "invalid repository name");
  const std::string_view rest = path.substr(dotgit + 5);
  if (rest == "info/refs") {
    if (method != http::verb::get)
      return refuse(http::status::method_not_allowed, "info/refs takes GET");
    if (query == "service=git-upload-pack")
      t.receive = false;
    else if (query == "service=git-receive-pack")
      t.receive = true;
    else
      return refuse(http::status::forbidden,
                    "only smart HTTP is served (service=git-upload-pack or git-receive-pack)");
    t.endpoint = git_endpoint::info_refs;
    return t;
  }
  if (rest == "git-upload-pack" || rest == "git-receive-pack") {
    if (method != http::verb::post)
      return refuse(http::status::method_not_allowed, std::string(rest) + " takes POST");
    if (!query.empty() || target.find('?') != std::string_view::npos)
      return refuse(http::status::bad_request, "unexpected query string");
    t.receive = rest == "git-receive-pack";
    t.endpoint = t.receive ? git_endpoint::receive_pack : git_endpoint::upload_pack;
    return t;
  }
  return refuse(http::status::not_found,
                "only git smart HTTP is served (dumb HTTP and other paths are refused)");
}

std::string base64(std::string_view bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(bytes.data()),
                                static_cast<int>(bytes.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

std::optional<basic_credentials> parse_basic(std::string_view value) {
  static constexpr std::string_view scheme = "Basic ";
  if (value.size() <= scheme.size() || value.size() > 4096)
    return std::nullopt;
  if (!std::equal(scheme.begin(), scheme.end(), value.begin(),
                  [](char a, char b) { return std::tolower(a) == std::tolower(b); }))
    return std::nullopt;
  std::string_view b64 = value.substr(scheme.size());
  while (!b64.empty() && b64.front() == ' ')
    b64.remove_prefix(1);
  while (!b64.empty() && b64.back() == ' ')
    b64.remove_suffix(1);
  if (b64.empty() || b64.size() % 4 != 0)
    return std::nullopt;
  std::size_t pad = 0;
  for (std::size_t i = 0; i < b64.size(); ++i) {
    const char c = b64[i];
    const bool alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (c == '=') {
      if (i + 2 < b64.size())
        return std::nullopt;
      ++pad;
    } else if (pad || !(alnum || c == '+' || c == '/')) {
      return std::nullopt;
    }
  }
  std::string raw(b64.size() / 4 * 3, '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(raw.data()),
                                reinterpret_cast<const unsigned char*>(b64.data()),
                                static_cast<int>(b64.size()));
  if (n < 0 || static_cast<std::size_t>(n) < pad)
    return std::nullopt;
  raw.resize(static_cast<std::size_t>(n) - pad);
  const auto colon = raw.find(':');
  if (colon == std::string::npos)
    return std::nullopt;
  basic_credentials c{raw.substr(0, colon), raw.substr(colon + 1)};
  OPENSSL_cleanse(raw.data(), raw.size());
  return c;
}

std::string sha256_hex(std::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr);
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out.push_back(digits[md[i] >> 4]);
    out.push_back(digits[md[i] & 0xf]);
  }
  return out;
}

bool equal_secret(std::string_view a, std::string_view b) {
  const std::string ha = sha256_hex(a), hb = sha256_hex(b);
  return CRYPTO_memcmp(ha.data(), hb.data(), ha.size()) == 0;
}

result<std::string> random_hex(std::size_t bytes) {
  std::vector<unsigned char> raw(bytes);
  if (RAND_bytes(raw.data(), static_cast<int>(raw.size())) != 1)
    return fail("cannot draw random bytes (RAND_bytes failed)");
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 0xf]);
  }
  OPENSSL_cleanse(raw.data(), raw.size());
  return out;
}

void scrub(std::string& text, const std::vector<std::string>& needles) {
  static constexpr std::string_view mark = "[redacted]";
  for (const auto& n : needles) {
    if (n.empty())
      continue;
    for (auto pos = text.find(n); pos != std::string::npos; pos = text.find(n, pos + mark.size()))
      text.replace(pos, n.size(), mark);
  }
}

void io_pool::run() {
  for (int i = 0; i < threads_wanted_; ++i)
    threads_.emplace_back([this] {
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGPIPE);
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      ioc_->run();
    });
}

void io_pool::stop() {
  if (stopped_.exchange(true))
    return;
  if (ioc_)
    ioc_->stop();
  for (auto& t : threads_)
    if (t.joinable())
      t.join();
}

}  // namespace ferry::gitproxy::detail
