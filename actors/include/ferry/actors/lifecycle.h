#pragma once
// The state machines of Ferry's persistent actors, written down once. Each actor checks every
// transition here before it records it; a transition not listed is refused and recorded as a
// `transition_refused` event (the state does not change), never applied silently.
//
// Task (stream task-<id>, status in TaskStateChanged / TaskFinished):
//
//   queued ──► running ──► succeeded | failed | aborted | interrupted
//     └──────────────────► aborted            (aborted while waiting)
//                          interrupted ──► running   (resumed by the user, a slot is free)
//                          interrupted ──► queued    (resumed by the user, waits for a slot)
//
// Session (stream session-<task id>; the agent conversation of a task):
//
//   idle ──► in_turn ──► idle ──► … ──► closed
//              └───────────────────────► closed   (the task ended during a turn)
//
// Sandbox (stream sandbox-<id>, SandboxStateChanged):
//
//   none ──► spawning ──► initializing ──► ready ──► executing ──► terminating ──► terminated
//                              │  ▲                    │  ▲
//                              ▼  │                    ▼  │
//                            cloning                pushing
//   (initializing ──► cloning ──► ready when the task has a repository; executing ──► pushing
//    ──► executing when a branch is pushed; from any state but terminated: ──► failed; from any
//    live state: ──► terminating on kill)
//
// Pure functions; thread-safe.

#include <cstdint>
#include <string_view>

#include "ferry/schemas/events_generated.h"

namespace ferry::actors {

/// The task's status machine (see the diagram above).
constexpr bool task_transition_allowed(events::v1::TaskStatus from, events::v1::TaskStatus to) {
  using S = events::v1::TaskStatus;
  switch (from) {
    case S::queued: return to == S::running || to == S::aborted;
    case S::running:
      return to == S::succeeded || to == S::failed || to == S::aborted || to == S::interrupted;
    case S::interrupted: return to == S::running || to == S::queued;
    case S::succeeded:
    case S::failed:
    case S::aborted: return false;
  }
  return false;
}

/// True for statuses a task can stay in for good (interrupted can still be resumed).
constexpr bool task_status_terminal(events::v1::TaskStatus s) {
  using S = events::v1::TaskStatus;
  return s == S::succeeded || s == S::failed || s == S::aborted || s == S::interrupted;
}

/// The session's states.
enum class session_status : uint8_t { idle, in_turn, closed };

constexpr std::string_view to_string(session_status s) {
  switch (s) {
    case session_status::idle: return "idle";
    case session_status::in_turn: return "in_turn";
    case session_status::closed: return "closed";
  }
  return "unknown";
}

constexpr bool session_transition_allowed(session_status from, session_status to) {
  switch (from) {
    case session_status::idle: return to == session_status::in_turn || to == session_status::closed;
    case session_status::in_turn: return to == session_status::idle || to == session_status::closed;
    case session_status::closed: return false;
  }
  return false;
}

/// The sandbox lifecycle (see the diagram above). `running` is schema version 1's name of
/// `executing` and is never a live state (old events are upcast).
constexpr bool sandbox_transition_allowed(events::v1::SandboxStatus from,
                                          events::v1::SandboxStatus to) {
  using S = events::v1::SandboxStatus;
  if (to == S::failed)
    return from != S::none && from != S::terminated && from != S::failed && from != S::running;
  switch (from) {
    case S::none: return to == S::spawning;
    case S::spawning: return to == S::initializing || to == S::terminating;
    case S::initializing: return to == S::cloning || to == S::ready || to == S::terminating;
    case S::cloning: return to == S::ready || to == S::terminating;
    case S::ready: return to == S::executing || to == S::terminating;
    case S::executing: return to == S::pushing || to == S::ready || to == S::terminating;
    case S::pushing: return to == S::executing || to == S::ready || to == S::terminating;
    case S::terminating: return to == S::terminated;
    case S::running:
    case S::terminated:
    case S::failed: return false;
  }
  return false;
}

/// True once the sandbox is gone for good.
constexpr bool sandbox_status_terminal(events::v1::SandboxStatus s) {
  return s == events::v1::SandboxStatus::terminated || s == events::v1::SandboxStatus::failed;
}

}  // namespace ferry::actors
