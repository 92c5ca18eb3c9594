#pragma once
// ferry_gateway public header: the client side of the control subjects
// `ferry.ctl.task.<id>.abort` / `.steer` / `.approve` (served by actors::start_task_control, protocol in
// ferry/actors/tasks.h). One request each, its acknowledgement decoded into a value. The
// gateway's REST and WebSocket handlers and `ferryctl tasks abort|steer` all send through here,
// so they agree on timeouts and on what every answer means.
//
// (It belongs next to start_task_control in ferry_actors; it lives here while the task actors
// are being rewritten.)
//
// Threading: thread-safe (as `actors::bus`); every call blocks the calling thread up to its
// timeout, so it must not run on an I/O thread or inside an actor.

#include <chrono>
#include <cstdint>
#include <string>

#include "ferry/actors/tasks.h"
#include "ferry/schemas/result.h"

namespace ferry::actors {
class bus;
}

namespace ferry::gateway {

/// How long an abort waits, by default, for the task to end before it is answered `pending`.
inline constexpr std::chrono::milliseconds default_abort_wait{5000};
/// How long a steer waits for its acknowledgement (the comment is persisted, nothing more).
inline constexpr std::chrono::milliseconds default_steer_timeout{5000};
/// Longest wait the control subject honours (it clamps wait_ms to this).
inline constexpr std::chrono::milliseconds max_abort_wait{30000};

/// Asks task `task_id` to stop, in the name of `user`, and waits up to `wait` (clamped to
/// max_abort_wait) for it to end: aborted, pending (still ending when `wait` passed),
/// already_finished or not_found (no live task).
/// Errors: errc::closed when no acknowledgement came — NATS unreachable, nobody serves the
/// subject, no answer within `wait` + 2 s — or the serving ferryd is shutting down;
/// errc::corrupt for an answer outside the protocol; otherwise the code the server answered.
[[nodiscard]] result<actors::abort_outcome> request_abort(
  actors::bus& bus, const std::string& task_id, const std::string& user,
  const std::string& reason, std::chrono::milliseconds wait = default_abort_wait);

/// Records a steering comment on task `task_id` in the name of `user`; returns the sequence of
/// its steering_comment event once persisted.
/// Errors: errc::not_found (no live task), errc::conflict (the task is ending),
/// errc::invalid_argument (empty, or over actors::max_steering_bytes), errc::closed (no
/// acknowledgement within `timeout`, as for request_abort), errc::corrupt (answer outside the
/// protocol), errc::failed.
[[nodiscard]] result<uint64_t> request_steer(
  actors::bus& bus, const std::string& task_id, const std::string& user, const std::string& text,
  std::chrono::milliseconds timeout = default_steer_timeout);
/// Allows `destination` for the rest of task `task_id` in the name of `user`; returns the
/// sequence of its egress_approved event once persisted. Errors as request_steer's, and
/// errc::busy (too many approvals on the task).
[[nodiscard]] result<uint64_t> request_approve(
  actors::bus& bus, const std::string& task_id, const std::string& user, const std::string& destination,
  std::chrono::milliseconds timeout = default_steer_timeout);

}  // namespace ferry::gateway
