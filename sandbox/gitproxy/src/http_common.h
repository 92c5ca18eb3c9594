#pragma once
// Private helpers shared by the git proxy and the local forge: Beast/Asio aliases, the strict
// smart-HTTP request-target check, HTTP Basic credentials, hashing and the I/O thread pool.

#include <utility>  // before Asio: boost 1.74's awaitable.hpp uses std::exchange without it

#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <variant>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "ferry/gitproxy/git_proxy.h"
#include "ferry/schemas/result.h"

namespace ferry::gitproxy::detail {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

/// Beast's string_view (boost's in 1.74) as std::string_view.
inline std::string_view sv(beast::string_view s) { return {s.data(), s.size()}; }

/// "No limit" for Beast parsers: Boost 1.74's `body_limit(boost::none)` refuses every body
/// with a Content-Length (it compares the length against an empty optional), so use the maximum.
inline constexpr std::uint64_t no_body_limit = std::numeric_limits<std::uint64_t>::max();

enum class git_endpoint { info_refs, upload_pack, receive_pack };

/// A smart-HTTP request for one repository.
struct git_target {
  std::string repo;          ///< "org/name" (no ".git")
  git_endpoint endpoint = git_endpoint::info_refs;
  bool receive = false;      ///< the service is git-receive-pack
};

/// Why a target was refused, and the HTTP status to answer with.
struct target_refusal {
  http::status status = http::status::bad_request;
  std::string reason;
};

// valid_repo_name: in ferry/gitproxy/git_proxy.h (public: the gateway checks submissions).

/// Accepts exactly
///   GET  /<repo>.git/info/refs?service=git-upload-pack|git-receive-pack
///   POST /<repo>.git/git-upload-pack | /<repo>.git/git-receive-pack
/// Anything else (other paths, dumb HTTP, '%' anywhere, "..", "//", '\\', other queries or
/// methods) is refused: the target is matched as bytes, never decoded.
std::variant<git_target, target_refusal> parse_git_target(http::verb method,
                                                          std::string_view target);

/// The user and password of an `Authorization: Basic …` value; nullopt when it is not one.
struct basic_credentials {
  std::string user;
  std::string password;
};
std::optional<basic_credentials> parse_basic(std::string_view authorization);
std::string base64(std::string_view bytes);

std::string sha256_hex(std::string_view bytes);
/// Constant-time comparison (lengths are compared through their SHA-256).
bool equal_secret(std::string_view a, std::string_view b);
/// `bytes` random bytes in lower-case hex, or an error when the CSPRNG fails.
result<std::string> random_hex(std::size_t bytes);

/// Replaces every occurrence of each needle in `text` with "[redacted]".
void scrub(std::string& text, const std::vector<std::string>& needles);

/// An io_context run by a few threads (SIGPIPE blocked in them: writes to a closed pipe or
/// socket fail with EPIPE instead of killing the process) plus TCP / unix acceptors.
class io_pool {
 public:
  explicit io_pool(int threads) : threads_wanted_(threads < 1 ? 1 : threads) {}
  ~io_pool() { stop(); }
  net::io_context& context() { return *ioc_; }
  void run();
  /// Stops the loop and joins the threads; pending coroutines are destroyed by `reset`.
  void stop();
  /// Destroys every pending handler (coroutine frames); REQUIRES: stop() called.
  void reset() {
    work_.reset();
    ioc_.reset();
  }

 private:
  int threads_wanted_;
  std::unique_ptr<net::io_context> ioc_ = std::make_unique<net::io_context>();
  net::executor_work_guard<net::io_context::executor_type> work_ = net::make_work_guard(*ioc_);
  std::vector<std::thread> threads_;
  std::atomic<bool> stopped_{false};
};

}  // namespace ferry::gitproxy::detail
