#pragma once
// The egress proxy: runs on the host, outside every sandbox; each sandbox reaches it through a
// unix socket of its own (in its control directory, /.ferry/ctl/egress.sock inside, where
// ferry-init's forwarder relays 127.0.0.1:3128 to it). HTTP/1.1 forward proxy: CONNECT host:port (a byte-for-byte
// tunnel, no TLS interception) and absolute-URI plain HTTP (one request per connection).
//
// Per request, in order: head (≤ 16 KiB → 431, within head_timeout, else closed) → target
// (400) → sandbox token in Proxy-Authorization (407) → the sandbox's connection and rate limits
// (429) → internal route? (relayed to its unix socket, no policy or address check) → the org
// policy, then the sandbox's runtime approvals and policy (403) → resolution by the proxy and
// the address check of every resolved address (403) → connect only to an address that passed.
// See README.md.
//
// Threading: every member function is thread-safe. The observer is called from I/O threads.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ferry/egress/policy.h>
#include <ferry/egress/sandbox_token.h>
#include <ferry/sandbox/sandbox.h>
#include <ferry/schemas/result.h>

namespace ferry::egress {

/// One decision of the proxy, for the task's event stream and audits (sandbox.h: whose,
/// destination, allowed, the rule that decided, bytes, duration).
using egress_decision = sandbox::egress_event;

struct egress_limits {
  /// Connections of one sandbox open at once (each holds one request or tunnel).
  size_t max_connections = 64;
  /// Token bucket per sandbox: requests per second, and the burst it allows.
  double requests_per_second = 50;
  double burst = 100;
};

struct egress_proxy_options {
  /// Where the sandboxes' sockets are created (`<dir>/<sandbox id>.sock`, mode 0666). Must exist.
  std::filesystem::path socket_dir;
  /// Verifies the sandboxes' tokens. Required.
  std::shared_ptr<const sandbox_tokens> tokens;
  /// Bounds every sandbox's policy (a destination must pass both). Changeable: set_org_policy.
  egress_policy org_policy = egress_policy::full();
  /// Reserved host name (e.g. `git.ferry.internal`) → a unix socket on the host. Requests for it
  /// skip the domain policy and the address checks, not the token check; plain HTTP ones carry
  /// `Ferry-Sandbox: <verified id>` (any such header from the client is dropped).
  std::map<std::string, std::filesystem::path> internal_routes;
  egress_limits limits;
  size_t io_threads = 2;
  std::chrono::milliseconds head_timeout{30'000};
  std::chrono::milliseconds connect_timeout{10'000};
  /// A tunnel or relay with no byte either way for this long is closed.
  std::chrono::milliseconds idle_timeout{300'000};
  /// How long close_sandbox waits for the sandbox's connections to wind down (a resolution
  /// stuck in getaddrinfo cannot be interrupted); what they report later goes to
  /// options.observer only.
  std::chrono::milliseconds close_wait{2'000};
  /// Called once per decision (an allowed connection once, at its end, with its byte counts),
  /// from an I/O thread. Must not block and must not call back into the proxy synchronously.
  std::function<void(const egress_decision&)> observer;
};

class egress_proxy {
 public:
  virtual ~egress_proxy() = default;

  /// Starts listening for `sandbox_id` (letters, digits, `.`, `_`, `-`; ≤ 64) and returns the
  /// socket's path. errc::conflict if it is already open.
  [[nodiscard]] virtual result<std::filesystem::path> open_sandbox(const std::string& sandbox_id,
                                                                   egress_policy policy) = 0;
  /// As open_sandbox, but listening at `socket`, a path the caller chooses (the sandbox
  /// runtime's: in the sandbox's control directory), replacing whatever file is there; a
  /// sandbox already open is closed first (a host re-attaching it makes its socket again).
  /// `observer`, if set, gets the sandbox's decisions too (after options.observer), until
  /// close_sandbox returns.
  [[nodiscard]] virtual result<void> open_sandbox_at(const std::string& sandbox_id, egress_policy policy,
                                                     const std::filesystem::path& socket,
                                                     std::function<void(const egress_decision&)> observer = {}) = 0;
  /// Closes the sandbox's listener and every connection of it (tunnels included), removes the
  /// socket, and waits (at most options.close_wait) until its connections have reported their
  /// decisions: after it returns, no per-sandbox observer hears of the sandbox again. Not from
  /// an observer. errc::not_found if it is not open.
  [[nodiscard]] virtual result<void> close_sandbox(const std::string& sandbox_id) = 0;
  /// A runtime approval: `host[:port]` (or `*.domain[:port]`) is allowed for this sandbox from
  /// now on — still bounded by the org policy, explicit custom denies and the address checks.
  [[nodiscard]] virtual result<void> allow_for_sandbox(const std::string& sandbox_id, const std::string& destination) = 0;
  virtual void set_org_policy(egress_policy policy) = 0;
  /// Closes every listener and connection and joins the I/O threads. Idempotent; the
  /// destructor calls it.
  virtual void stop() = 0;
};

/// Checks the options (socket_dir exists, tokens set, routes' names valid) and starts the I/O
/// threads.
[[nodiscard]] result<std::unique_ptr<egress_proxy>> make_egress_proxy(egress_proxy_options options);

/// What the proxy applies to one sandbox: its policy and the destinations allowed for it at
/// run time so far (allow_for_sandbox patterns, e.g. approvals its task recorded).
struct sandbox_egress {
  egress_policy policy;
  std::vector<std::string> approvals;
};

/// The proxy as the sandbox runtime sees it (runtime_options::egress): each sandbox's socket is
/// made where the runtime asks (open_sandbox_at) with what `egress_for(sandbox_id)` returns at
/// that moment (approvals that are not valid patterns are skipped), its decisions go to the
/// sandbox's observer, and it is closed when the runtime says the sandbox has ended. The
/// credential is a token from `tokens` (the proxy's) bound to the sandbox and its policy. `proxy`
/// must outlive the runtime's sandboxes (it is held).
[[nodiscard]] std::shared_ptr<sandbox::egress_binder> make_egress_binder(
  std::shared_ptr<egress_proxy> proxy, std::shared_ptr<const sandbox_tokens> tokens,
  std::function<sandbox_egress(const std::string& sandbox_id)> egress_for);

}  // namespace ferry::egress
