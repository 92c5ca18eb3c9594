#pragma once
// Private: the messages Ferry's actors exchange (CAF type-id block and atoms).

#include <cstdint>
#include <string>
#include <vector>

#include <caf/all.hpp>

namespace ferry::actors {

/// Output of one command on one stream, merged from consecutive chunks.
struct output_piece {
  uint32_t command_id = 0;
  int32_t stream = 0;  ///< 0 stdout, 1 stderr
  std::string data;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, output_piece& x) {
  return f(caf::meta::type_name("output_piece"), x.command_id, x.stream, x.data);
}

}  // namespace ferry::actors

CAF_BEGIN_TYPE_ID_BLOCK(ferry, caf::first_custom_type_id)

  CAF_ADD_TYPE_ID(ferry, (std::vector<std::string>))
  CAF_ADD_TYPE_ID(ferry, (ferry::actors::output_piece))
  CAF_ADD_TYPE_ID(ferry, (std::vector<ferry::actors::output_piece>))

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
  // task → sandbox (sent with high priority)
  CAF_ADD_ATOM(ferry, ferry::actors, kill_atom, "kill")

CAF_END_TYPE_ID_BLOCK(ferry)
