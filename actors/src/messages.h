#pragma once
// Private: the messages Ferry's actors exchange (CAF type-id block and atoms).

#include <cstdint>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "ferry/schemas/events.h"

namespace ferry::actors {

/// Output of one command on one stream, merged from consecutive chunks.
struct output_piece {
  uint32_t command_id = 0;
  int32_t stream = 0;  ///< 0 stdout, 1 stderr
  std::string data;
  uint64_t gap = 0;  ///< > 0: bytes lost here (data empty), see OutputChunk.gap
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, output_piece& x) {
  return f(caf::meta::type_name("output_piece"), x.command_id, x.stream, x.data, x.gap);
}

/// What the journal said about one persist (see persistent.h).
struct persist_outcome {
  int32_t code = 0;  ///< 0: durable; else an errc
  std::string error;
  uint64_t first_sequence = 0;
  uint64_t last_sequence = 0;
  uint64_t first_position = 0;
  uint64_t last_position = 0;
  std::vector<std::string> stamped;  ///< the stored envelopes, for apply
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, persist_outcome& x) {
  return f(caf::meta::type_name("persist_outcome"), x.code, x.error, x.first_sequence,
           x.last_sequence, x.first_position, x.last_position, x.stamped);
}

}  // namespace ferry::actors

namespace ferry::schemas {

/// An egress proxy decision on its way from a sandbox's observer to its task's stream.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, egress_decision_fields& x) {
  return f(caf::meta::type_name("egress_decision"), x.sandbox_id, x.host, x.port, x.method, x.allowed, x.rule,
           x.approvable, x.bytes_up, x.bytes_down, x.duration_ms);
}

/// A git proxy request on its way from ferryd's git access to the sandbox's task stream.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, git_operation_fields& x) {
  return f(caf::meta::type_name("git_operation"), x.sandbox_id, x.repo, x.service, x.advertisement,
           x.protocol_version, x.refs, x.result, x.reason, x.http_status, x.bytes_in, x.bytes_out,
           x.duration_ms);
}

}  // namespace ferry::schemas

CAF_BEGIN_TYPE_ID_BLOCK(ferry, caf::first_custom_type_id)

  CAF_ADD_TYPE_ID(ferry, (std::vector<std::string>))
  CAF_ADD_TYPE_ID(ferry, (ferry::actors::output_piece))
  CAF_ADD_TYPE_ID(ferry, (std::vector<ferry::actors::output_piece>))
  CAF_ADD_TYPE_ID(ferry, (ferry::actors::persist_outcome))
  CAF_ADD_TYPE_ID(ferry, (ferry::schemas::egress_decision_fields))
  CAF_ADD_TYPE_ID(ferry, (ferry::schemas::git_operation_fields))

  // task manager
  CAF_ADD_ATOM(ferry, ferry::actors, submit_atom, "submit")
  CAF_ADD_ATOM(ferry, ferry::actors, count_atom, "count")
  CAF_ADD_ATOM(ferry, ferry::actors, shutdown_atom, "shutdown")
  // task
  CAF_ADD_ATOM(ferry, ferry::actors, start_atom, "start")
  CAF_ADD_ATOM(ferry, ferry::actors, abort_atom, "abort")
  // task manager → queued task
  CAF_ADD_ATOM(ferry, ferry::actors, run_atom, "run")
  CAF_ADD_ATOM(ferry, ferry::actors, queued_atom, "queued")
  CAF_ADD_ATOM(ferry, ferry::actors, steer_atom, "steer")
  // sandbox → task facts, observer → sandbox
  CAF_ADD_ATOM(ferry, ferry::actors, sbx_state_atom, "sbx_state")
  CAF_ADD_ATOM(ferry, ferry::actors, running_atom, "sbx_run")
  CAF_ADD_ATOM(ferry, ferry::actors, cmd_start_atom, "cmd_start")
  CAF_ADD_ATOM(ferry, ferry::actors, output_atom, "output")
  CAF_ADD_ATOM(ferry, ferry::actors, cmd_exit_atom, "cmd_exit")
  CAF_ADD_ATOM(ferry, ferry::actors, ended_atom, "sbx_ended")
  CAF_ADD_ATOM(ferry, ferry::actors, gone_atom, "sbx_gone")
  // task → sandbox (sent with high priority)
  CAF_ADD_ATOM(ferry, ferry::actors, kill_atom, "kill")
  // persistent actors (persistent.h)
  CAF_ADD_ATOM(ferry, ferry::actors, persisted_atom, "persisted")
  CAF_ADD_ATOM(ferry, ferry::actors, fence_atom, "fence")
  // any state machine: a transition request (the runtime glue and tests)
  CAF_ADD_ATOM(ferry, ferry::actors, goto_atom, "goto")
  // sandbox: record the kill (after the urgent part ran); task: record the abort
  CAF_ADD_ATOM(ferry, ferry::actors, killed_atom, "killed")
  CAF_ADD_ATOM(ferry, ferry::actors, abort_rec_atom, "abort_rec")
  // task: record the refusal of an abort of a task that has ended
  CAF_ADD_ATOM(ferry, ferry::actors, abort_refused_atom, "abort_ref")
  // task → session
  CAF_ADD_ATOM(ferry, ferry::actors, turn_begin_atom, "turn_begin")
  CAF_ADD_ATOM(ferry, ferry::actors, turn_end_atom, "turn_end")
  CAF_ADD_ATOM(ferry, ferry::actors, close_atom, "close")
  // manager → task
  CAF_ADD_ATOM(ferry, ferry::actors, resume_atom, "resume")
  CAF_ADD_ATOM(ferry, ferry::actors, down_atom, "down")
  CAF_ADD_ATOM(ferry, ferry::actors, status_atom, "status")
  CAF_ADD_ATOM(ferry, ferry::actors, restart_atom, "restart")
  // task → itself: its wall-clock limit is up (delayed_send)
  CAF_ADD_ATOM(ferry, ferry::actors, wall_clock_atom, "wall_clock")
  // sandbox → task: a limit the sandbox's cgroup counted (kind, limit, count, whole sandbox,
  // detail).
  CAF_ADD_ATOM(ferry, ferry::actors, limit_atom, "sbx_limit")
  // sandbox actor ← its environment's setup thread: (ok, layer path or why, cached, ms)
  CAF_ADD_ATOM(ferry, ferry::actors, setup_atom, "sbx_setup")
  // sandbox → task: an egress proxy decision (schemas::egress_decision_fields)
  CAF_ADD_ATOM(ferry, ferry::actors, egress_atom, "egress")
  // manager → task: a user allows a destination for the task (user, destination)
  CAF_ADD_ATOM(ferry, ferry::actors, approve_atom, "approve")
  // sandbox → task: it was taken from the warm pool (sandbox id, runtime id)
  CAF_ADD_ATOM(ferry, ferry::actors, pooled_atom, "sbx_pooled")
  // observer → sandbox: a command could not run (id, reason)
  CAF_ADD_ATOM(ferry, ferry::actors, cmd_failed_atom, "cmd_failed")
  // git access → sandbox → task: a request of the sandbox through the git proxy
  CAF_ADD_ATOM(ferry, ferry::actors, git_atom, "git_op")
  // sandbox → itself: time to renew its egress credential (delayed_send)
  CAF_ADD_ATOM(ferry, ferry::actors, renew_atom, "sbx_renew")

CAF_END_TYPE_ID_BLOCK(ferry)
