#pragma once
// ferry_gateway public header: the HTTP/WebSocket front door (Boost.Beast).
//
// Routes (all /api routes need `Authorization: Bearer <token>`; errors are `{"error": "..."}`):
//   GET  /healthz                        liveness, no auth
//   POST /api/v1/tasks                   {"command": "...", "repo": "..."} → 201 {"id": ...}
//   GET  /api/v1/tasks/{id}              the task's state, folded from its events
//   POST /api/v1/tasks/{id}/abort        kill the sandbox; 200 once aborted, 202 if still ending
//   POST /api/v1/tasks/{id}/steer        {"text": "..."} → 202 {"id", "seq"} once persisted
//   GET  /api/v1/tasks/{id}/events?from=SEQ   WebSocket: the task's events as JSON text frames,
//                                        from the journal, then live from NATS, until it ends;
//                                        the client may send {"type": "steer"|"abort", "id", …}
//                                        and gets {"type": "ack"|"error", "id", …} (README)
// Abort, steer and egress approvals (REST and WebSocket alike) go through the control subjects
// (control_client.h); an abort falls back to this process's task service when NATS is down.
//   GET  /api/v1/tasks/{id}/egress       the task's egress: counts, approvals, and the
//                                        destinations waiting for one (approvable)
//   POST /api/v1/tasks/{id}/egress/approvals  {"destination": "host[:port]" | "*.domain[:port]"}
//                                        → 201 {"id", "seq", "destination"}: allowed for the rest
//                                        of the task (still bounded by the org policy, explicit
//                                        denies and the address checks)
//   GET  /api/v1/environments            the environments a task may name, with their network
//                                        policies (variables by name only)
//   GET  /api/v1/admin/egress-policy     the organisation's egress policy
//   PUT  /api/v1/admin/egress-policy     {"level": "none|trusted|full|custom", "allow": [...],
//                                        "deny": [...]}; admin tokens only (403 otherwise)
//   POST /api/v1/tokens                  {"name": "...", "admin": false} → 201 {"token": ...};
//                                        admin tokens only (403 otherwise)
// Limits: request bodies ≤ `max_body_bytes` (413 beyond), headers ≤ 16 KiB (431), a request must
// arrive within `request_timeout`.
//
// Threading: the gateway runs its own I/O threads and a small pool for blocking calls; `stop()`
// may be called from any thread and is idempotent.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "ferry/egress/policy.h"
#include "ferry/gateway/org_policy.h"
#include "ferry/gateway/tokens.h"
#include "ferry/sandbox/environment.h"
#include "ferry/schemas/result.h"

namespace ferry::storage {
class event_store;
}
namespace ferry::actors {
class bus;
class task_service;
}  // namespace ferry::actors

namespace ferry::gateway {

struct gateway_options {
  std::string host = "127.0.0.1";
  uint16_t port = 8080;  ///< 0 picks a free port
  int io_threads = 2;
  size_t max_body_bytes = 1u << 20;
  std::chrono::seconds request_timeout{30};
};

struct gateway_deps {
  storage::event_store* store = nullptr;
  actors::bus* events = nullptr;
  actors::task_service* tasks = nullptr;
  token_registry* tokens = nullptr;
  /// The environments tasks may name (GET /api/v1/environments lists them) and the cache of
  /// their setup layers; both optional (none configured).
  const std::map<std::string, sandbox::environment_spec>* environments = nullptr;
  const sandbox::layer_cache* layers = nullptr;
  /// Each environment's network policy, by name (absent: `default_network`); listed with the
  /// environments.
  const std::map<std::string, egress::egress_policy>* networks = nullptr;
  egress::egress_policy default_network = egress::egress_policy::trusted();
  /// The organisation's egress policy (GET/PUT /api/v1/admin/egress-policy); null: those
  /// routes answer 404.
  org_egress_policy* org_egress = nullptr;
};

class gateway {
 public:
  virtual ~gateway() = default;
  /// The port actually bound.
  virtual uint16_t port() const = 0;
  /// Stops accepting, closes every connection and joins the I/O threads.
  virtual void stop() = 0;
};

/// Binds and starts serving. Fails clearly if the address cannot be bound.
[[nodiscard]] result<std::unique_ptr<gateway>> start_gateway(const gateway_options& opts,
                                                             gateway_deps deps);

}  // namespace ferry::gateway
