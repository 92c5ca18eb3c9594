#pragma once
// ferry::gitproxy::git_proxy — git smart HTTP (protocol v0 and v2) between sandboxes and the
// forge. Runs on the host, outside every sandbox.
//
//  - A sandbox authenticates with a scoped credential (HTTP Basic password; any user name) that
//    `register_sandbox` draws: 32 random bytes in hex, of which only the SHA-256 is kept. It is
//    valid for that sandbox's repository alone, until `revoke_sandbox` or its expiry.
//  - Only `GET /<repo>.git/info/refs?service=git-upload-pack|git-receive-pack` and
//    `POST /<repo>.git/git-upload-pack|git-receive-pack` are served; the request target is
//    matched as bytes (no decoding: '%', "..", "//" are refused).
//  - Fetch and clone are relayed. A push is parsed (pkt_line.h) before anything goes upstream
//    and relayed only if every command updates `refs/heads/<the sandbox's branch>` (creation,
//    fast-forward or force) — no deletion, tag, other branch, malformed or duplicate ref, push
//    certificate. A refused push is answered as receive-pack would (`ng <ref> <reason>`, in
//    side-band when asked), so `git push` shows "! [remote rejected] … (<reason>)".
//  - Upstream, the forge's real token is added (HTTP Basic `<user>:<token>`) from `token`, called
//    at the moment of each request. The token never appears in an answer to the sandbox, in an
//    observer report or in an error message (upstream error bodies are scrubbed).
//  - Bodies are streamed both ways through bounded buffers; only the receive-pack command list
//    (at most 1 MiB) is held before it is checked.
//  - `Ferry-Sandbox: <id>` (added by the egress proxy) is recorded in reports, never trusted.
//
// Threading: thread-safe. Requests are served on `io_threads` internal threads; the observer and
// `token` are called from them.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::gitproxy {

/// Repository names as the proxy and the local forge accept them ("org/name"): 1–4 segments of
/// [A-Za-z0-9._-] separated by single '/', no segment starting with '.', at most 200 bytes.
bool valid_repo_name(std::string_view repo);

/// Hands the real forge token to the callback for the duration of the call (the credential
/// manager's `secret_use`; ferry::storage::credential_store::user_of gives one).
using token_source =
    std::function<result<void>(const std::function<void(std::string_view token)>&)>;

enum class git_service { upload_pack, receive_pack };
enum class op_result { ok, refused, upstream_error };

struct ref_update {
  std::string ref;
  std::string old_oid;
  std::string new_oid;
};

/// One request through the proxy, as reported to the observer.
struct git_operation {
  std::string sandbox_id;        ///< from the credential; empty when none was valid
  std::string ferry_sandbox;     ///< the `Ferry-Sandbox` header as received (untrusted)
  std::string repo;              ///< as requested (empty when the path was refused)
  git_service service = git_service::upload_pack;
  bool advertisement = false;    ///< GET info/refs (rather than the POST)
  int protocol_version = 0;      ///< 2 when the client sent `Git-Protocol: version=2`
  std::vector<ref_update> updates;  ///< receive-pack commands
  op_result result = op_result::ok;
  std::string reason;            ///< why refused / what failed upstream
  int http_status = 0;           ///< status answered to the sandbox
  std::uint64_t bytes_in = 0;    ///< request body bytes from the sandbox
  std::uint64_t bytes_out = 0;   ///< response body bytes to the sandbox
  std::chrono::microseconds duration{0};
};

struct git_proxy_options {
  /// Loopback TCP listener; `tcp_port` 0 picks a free port. Disabled when `listen_tcp` is false.
  bool listen_tcp = true;
  std::string tcp_host = "127.0.0.1";
  std::uint16_t tcp_port = 0;
  /// Unix socket listener (what the egress proxy relays `git.ferry.internal` to); empty: none.
  std::filesystem::path unix_socket;

  /// The forge's smart-HTTP base URL: `http://host[:port][/prefix]` (local forge) or
  /// `https://…` (verified against the system CAs, or `ca_file` when set).
  std::string upstream_url;
  std::filesystem::path ca_file;
  /// User name sent upstream with the token.
  std::string upstream_user = "x-access-token";
  token_source token;

  /// Pushes go to `refs/heads/<branch>`; registered branches must start with this.
  std::string branch_prefix = "ferry/";
  /// Called once per request, from an I/O thread; must not block.
  std::function<void(const git_operation&)> observer;
  int io_threads = 2;
  /// Any single read or write (sandbox or upstream) taking longer fails the request.
  std::chrono::seconds io_timeout{60};
};

class git_proxy {
 public:
  /// Listens and starts serving. Fails on a bad upstream URL, a missing token source, or a
  /// listener that cannot be opened.
  [[nodiscard]] static result<std::unique_ptr<git_proxy>> start(git_proxy_options opts);
  virtual ~git_proxy() = default;

  /// The TCP port (0 without a TCP listener).
  virtual std::uint16_t port() const = 0;

  /// Draws the credential for `sandbox_id` (replacing any earlier one): valid for `repo`
  /// ("org/name", as in the URL without ".git") and pushes to `refs/heads/<branch>` only, until
  /// `expires_at` or revocation. `branch` must start with the branch prefix.
  [[nodiscard]] virtual result<std::string> register_sandbox(
      std::string sandbox_id, std::string repo, std::string branch,
      std::chrono::system_clock::time_point expires_at) = 0;
  /// The sandbox's credential stops working at once (requests already relayed finish).
  virtual void revoke_sandbox(std::string_view sandbox_id) = 0;

  /// Stops accepting and ends live requests.
  virtual void stop() = 0;
};

}  // namespace ferry::gitproxy
