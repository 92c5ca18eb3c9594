#pragma once
// The event bus: NATS subjects that carry events out (`ferry.ev.<kind>.<id>`) to streamers.
//
// `bus` is the interface, `connect_nats` its one implementation; `nats_options` says how to reach
// and authenticate to the server (the outbox relay's connection uses the same); `embedded_nats`
// runs the `nats-server` child process ferryd uses when no --nats-url is given.
//
// Threading: `bus` and `subscription` are thread-safe. Subscription callbacks run on a NATS
// library thread; they must not block for long.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "ferry/schemas/result.h"

namespace ferry::actors {

/// Subject of a task's event stream.
inline std::string task_subject(std::string_view task_id) {
  return "ferry.ev.task." + std::string(task_id);
}

/// Active while alive; destroying it unsubscribes and waits until no callback runs any more.
class subscription {
 public:
  virtual ~subscription() = default;
};

using message_handler = std::function<void(std::string_view subject, std::string_view payload)>;

/// Answers one request; may be called later and from any thread, at most once. REQUIRES: the
/// bus is still alive.
using responder = std::function<void(std::string_view answer)>;
using request_handler =
  std::function<void(std::string_view subject, std::string_view payload, responder reply)>;

/// Control subjects: requests to one task (request/reply; the answer is the acknowledgement).
inline std::string task_control_subject(std::string_view task_id, std::string_view verb) {
  return "ferry.ctl.task." + std::string(task_id) + "." + std::string(verb);
}

class bus {
 public:
  virtual ~bus() = default;
  /// Publishes without waiting for delivery. While disconnected, messages are buffered (bounded)
  /// by the client and sent on reconnect; an error means the message was not accepted.
  [[nodiscard]] virtual result<void> publish(std::string_view subject,
                                             std::string_view payload) = 0;
  /// Subscribes; `on_message` is called for every message on `subject` (wildcards allowed).
  /// When this returns, the server knows about the subscription (it has been flushed).
  [[nodiscard]] virtual result<std::unique_ptr<subscription>> subscribe(
    std::string subject, message_handler on_message) = 0;
  /// Serves requests on `subject` (wildcards allowed): `on_request` gets each with a responder.
  [[nodiscard]] virtual result<std::unique_ptr<subscription>> serve(
    std::string subject, request_handler on_request) = 0;

  /// Sends a request and waits up to `timeout` for the answer. errc::not_found when nobody
  /// serves the subject, errc::closed at once while not connected; a timeout is an error too.
  [[nodiscard]] virtual result<std::string> request(std::string_view subject,
                                                    std::string_view payload,
                                                    std::chrono::milliseconds timeout) = 0;

  /// Waits until everything published so far reached the server.
  [[nodiscard]] virtual result<void> flush(std::chrono::milliseconds timeout) = 0;
};

/// How to reach and authenticate to a NATS server: the one description both of ferryd's
/// connections (the bus and the outbox relay) are opened from, whether the server is the
/// embedded child (a bare URL, everything else default) or an external one.
///
/// At most one authentication method: user+password, token, NKey seed file, or a `.creds` file
/// (user JWT + NKey seed). Any TLS file, `require_tls` or a `tls://` URL makes the connection
/// TLS-only. The server certificate is always verified (against `tls_ca_file`, else the system's
/// trust store) unless `tls_skip_verify`, and its name is checked against `tls_server_name`,
/// else against the URL's host.
///
/// `password` and `token` are secrets: no message this library produces contains them, nor the
/// password part of a `user:pass@` URL (see redact_nats_url). The struct itself is a plain value:
/// do not print it.
struct nats_options {
  /// `nats://host:port` or `tls://host:port`; a comma-separated list for a cluster. May carry
  /// `user:pass@` or `token@`, but then the secret is visible wherever the URL is (argv!).
  std::string url;
  std::string user;
  /// Secret. Only with `user`.
  std::string password;
  /// Secret.
  std::string token;
  /// A file holding a user NKey seed (`SU…`); the public key is derived from it.
  std::filesystem::path nkey_seed_file;
  /// A `.creds` file (user JWT + NKey seed), as `nsc` writes it.
  std::filesystem::path creds_file;

  bool require_tls = false;
  /// PEM CA certificates the server's certificate must chain to (default: system trust store).
  std::filesystem::path tls_ca_file;
  /// PEM client certificate (chain) and its key, for servers that verify clients (mutual TLS).
  /// Both or neither.
  std::filesystem::path tls_cert_file;
  std::filesystem::path tls_key_file;
  /// Name the server certificate must carry; empty: the URL's host (for a single URL).
  std::string tls_server_name;
  /// Accept any server certificate. Insecure; for tests against throw-away servers only.
  bool tls_skip_verify = false;

  /// Shown by the server (connz); not a secret.
  std::string client_name = "ferryd";

  /// Whether the connection will use TLS (see above).
  bool uses_tls() const;
};

/// Checks `opts` for contradictions (two auth methods, a password without a user, a cert without
/// its key, an empty URL) and that every file it names can be read. Errors name the file and the
/// reason; they never contain a secret.
[[nodiscard]] result<void> check_nats_options(const nats_options& opts);

/// `url` with every secret replaced: `nats://u:pw@h:4222` → `nats://u:***@h:4222`,
/// `nats://tok@h` → `nats://***@h`, for each URL of a comma-separated list. Use it for every URL
/// that goes into a message.
std::string redact_nats_url(std::string_view url);

/// Connects to a NATS server, reconnecting forever when the link drops. Fails at once if the
/// options are inconsistent, the server cannot be reached, refuses the credentials, or TLS fails
/// (the message says which, e.g. the certificate verification error).
[[nodiscard]] result<std::unique_ptr<bus>> connect_nats(const nats_options& opts);

/// Shorthand for a server that needs nothing but its URL (the embedded child, tests).
[[nodiscard]] result<std::unique_ptr<bus>> connect_nats(const std::string& url);

/// A `nats-server` child process with JetStream, listening on a free loopback port.
class embedded_nats {
 public:
  virtual ~embedded_nats() = default;
  /// `nats://127.0.0.1:<port>`.
  virtual const std::string& url() const = 0;
  /// Stops the server (SIGTERM, then SIGKILL after a grace period) and reaps it. Idempotent.
  virtual void stop() = 0;
};

/// Starts `binary` (`nats-server`) with its JetStream store under `store_dir`; waits until it
/// accepts clients. `port` 0 picks a free one; a fixed port lets a restarted server keep the URL
/// its clients reconnect to.
[[nodiscard]] result<std::unique_ptr<embedded_nats>> start_embedded_nats(
  const std::string& binary, const std::filesystem::path& store_dir, uint16_t port = 0);

}  // namespace ferry::actors
