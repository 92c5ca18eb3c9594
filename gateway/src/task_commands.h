#pragma once
// Private to ferry_gateway: abort and steer exactly as every gateway handler sends them (REST
// and the event stream's WebSocket), so both behave the same: through the control subjects
// (any ferryd on the same NATS may run the task), and an abort that cannot be sent there is
// carried out by this process's task manager instead — a stop must never wait for NATS.
//
// Threading: thread-safe. REQUIRES: called on the server's blocking pool, never on an I/O
// thread: each call blocks up to ~13 s (abort: 1 s for a PING, 7 s for NATS, then up to 5 s
// locally).

#include <chrono>
#include <cstdint>
#include <string>

#include "ferry/actors/tasks.h"
#include "ferry/gateway/gateway.h"
#include "ferry/schemas/result.h"

namespace ferry::gateway::detail {

/// How long abort_task waits for NATS to answer a PING before it aborts locally.
inline constexpr std::chrono::milliseconds abort_liveness_timeout{1000};

/// request_abort over the control subject; when NATS does not answer a PING within
/// abort_liveness_timeout, no acknowledgement came (errc::closed) or there is no bus,
/// task_service::abort here. Errors: the local abort's, or request_abort's.
[[nodiscard]] result<actors::abort_outcome> abort_task(const gateway_deps& deps,
                                                      const std::string& task_id,
                                                      const std::string& user,
                                                      const std::string& reason);

/// request_steer over the control subject (no local fallback: a comment is not urgent and must
/// reach the ferryd whose task it is). Errors as request_steer's; errc::closed without a bus.
[[nodiscard]] result<uint64_t> steer_task(const gateway_deps& deps, const std::string& task_id,
                                          const std::string& user, const std::string& text);

/// request_approve over the control subject, like steer_task (no local fallback).
[[nodiscard]] result<uint64_t> approve_task(const gateway_deps& deps, const std::string& task_id,
                                            const std::string& user, const std::string& destination);

}  // namespace ferry::gateway::detail
