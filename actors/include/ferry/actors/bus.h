#pragma once
// The event bus: NATS subjects that carry events out (`ferry.ev.<kind>.<id>`) to streamers.
//
// `bus` is the interface, `connect_nats` its one implementation; `embedded_nats` runs the
// `nats-server` child process ferryd uses when no --nats-url is given.
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

/// Connects to a NATS server (`nats://host:port`), reconnecting forever when the link drops.
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
