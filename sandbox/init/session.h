#pragma once
// Persistent shell sessions: each command of a session is a fresh `bash -c` running a wrapper
// that restores the session's saved state (working directory, variables, functions, aliases),
// evals the user's command, and on exit writes the new state to a side file. ferry-init moves the
// side file over the state only when the wrapper finished writing it (it ends with a marker), so
// a command killed half-way (timeout, Signal, exec) leaves the session as it was before it.
//
// The state lives under ferry-init's --state-dir (default /tmp/.ferry-init, outside the
// workspace). It is not secret from the commands: they run as the same uid.

#include <cstdint>
#include <string>
#include <vector>

namespace ferry_init {

/// Letters, digits, '-' and '_', 1..64 characters.
bool valid_session_name(const std::string& name);

struct session_files {
  std::string state;  // the saved state, sourced by the next command
  std::string next;   // written by the running command's wrapper
};

/// Paths of session `name`'s files under `sessions_dir`, for command `command_id`.
session_files session_paths(const std::string& sessions_dir, const std::string& name, uint32_t command_id);

/// The argv that runs `command` in the session: bash, the wrapper and its arguments.
/// `workspace`: where a new session starts (and where one whose directory is gone goes back to);
/// `cwd`: empty, or the directory to change to before the command; `env`: "K=V" to export.
std::vector<std::string> session_argv(const std::string& bash, const session_files& files,
                                      const std::string& workspace, const std::string& cwd,
                                      const std::string& command, const std::vector<std::string>& env);

/// After the command was reaped: adopts its new state if complete, drops it otherwise.
void commit_session_state(const session_files& files);

}  // namespace ferry_init
