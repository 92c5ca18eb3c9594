#include "session.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>

#include "util.h"

namespace ferry_init {
namespace {

// The wrapper, run as `bash -c WRAPPER bash STATE NEXT HOME CWD COMMAND [K=V...]`.
// - Only builtins (prefixed with `builtin`, so user functions named like them do not interfere)
//   and quoted expansions (so a user's IFS, noglob or nocasematch do not either).
// - The user's command is an argument, never part of the script text: any quoting, heredoc or
//   `exit N` in it is just bash's. It is eval'ed at the top level, so `cd`, assignments,
//   `export`, functions and aliases affect the shell the EXIT trap saves.
// - Variable names are enumerated with ${!X@} per initial letter (no fork); bash's own
//   variables (and the wrapper's __ferry_*) are skipped. A variable that was saved is restored
//   with its attributes (declare -p); one the environment brings but the session had unset is
//   unset again.
// - Saved: variables, all functions, aliases, the directory; then a marker line. ferry-init
//   moves NEXT over STATE only if the marker is there.
constexpr const char* wrapper = R"WRAPPER(__ferry_state=$1 __ferry_next=$2 __ferry_home=$3 __ferry_cwd=$4 __ferry_cmd=$5
builtin shift 5
__ferry_env=("$@")
builtin set --
builtin shopt -s expand_aliases
if [[ -f $__ferry_state ]]; then
  builtin source -- "$__ferry_state"
fi
__ferry_all_names() {
  __ferry_list=("${!A@}" "${!B@}" "${!C@}" "${!D@}" "${!E@}" "${!F@}" "${!G@}" "${!H@}" "${!I@}"
    "${!J@}" "${!K@}" "${!L@}" "${!M@}" "${!N@}" "${!O@}" "${!P@}" "${!Q@}" "${!R@}" "${!S@}"
    "${!T@}" "${!U@}" "${!V@}" "${!W@}" "${!X@}" "${!Y@}" "${!Z@}" "${!a@}" "${!b@}" "${!c@}"
    "${!d@}" "${!e@}" "${!f@}" "${!g@}" "${!h@}" "${!i@}" "${!j@}" "${!k@}" "${!l@}" "${!m@}"
    "${!n@}" "${!o@}" "${!p@}" "${!q@}" "${!r@}" "${!s@}" "${!t@}" "${!u@}" "${!v@}" "${!w@}"
    "${!x@}" "${!y@}" "${!z@}" "${!_@}")
}
__ferry_skip() {
  case $1 in
    BASH|BASHOPTS|BASHPID|BASH_*|COLUMNS|COMP_WORDBREAKS|DIRSTACK|EPOCHREALTIME|EPOCHSECONDS|EUID|\
FUNCNAME|GROUPS|HISTCMD|HOSTNAME|HOSTTYPE|LINENO|LINES|MACHTYPE|OPTERR|OPTIND|OSTYPE|PIPESTATUS|\
PPID|PWD|RANDOM|SECONDS|SHELLOPTS|SHLVL|SRANDOM|UID|_|__ferry_*) return 0 ;;
  esac
  return 1
}
__ferry_save() {
  __ferry_status=$?
  { builtin set +euvx +o pipefail; } 2>/dev/null
  builtin trap - EXIT ERR DEBUG RETURN
  builtin shopt -u nocasematch extdebug 2>/dev/null
  __ferry_known=()
  __ferry_all_names
  {
    for __ferry_n in "${__ferry_list[@]}"; do
      __ferry_skip "$__ferry_n" && continue
      builtin declare -p -- "$__ferry_n" 2>/dev/null && __ferry_known+=("$__ferry_n")
    done
    builtin printf '__ferry_known=('
    builtin printf ' %q' "${__ferry_known[@]}"
    builtin printf ')\n'
    builtin declare -f
    builtin alias -p
    builtin printf '__ferry_dir=%q\n' "$PWD"
    builtin printf '# ferry-state-end\n'
  } > "$__ferry_next" 2>/dev/null
  builtin exit "$__ferry_status"
}
if [[ -f $__ferry_state ]]; then
  builtin unset -v __ferry_keep
  builtin declare -A __ferry_keep
  for __ferry_n in "${__ferry_known[@]}"; do
    [[ -n $__ferry_n ]] && __ferry_keep[$__ferry_n]=1
  done
  __ferry_all_names
  for __ferry_n in "${__ferry_list[@]}"; do
    __ferry_skip "$__ferry_n" || [[ -v __ferry_keep[$__ferry_n] ]] || builtin unset -v -- "$__ferry_n"
  done
  if ! builtin cd -- "$__ferry_dir" 2>/dev/null; then
    builtin printf 'ferry: %s is gone; now in %s\n' "$__ferry_dir" "$__ferry_home" >&2
    builtin cd -- "$__ferry_home"
  fi
else
  builtin cd -- "$__ferry_home"
fi
for __ferry_n in "${__ferry_env[@]}"; do
  builtin export -- "$__ferry_n"
done
if [[ -n $__ferry_cwd ]]; then
  builtin cd -- "$__ferry_cwd" || builtin exit 1
fi
builtin trap __ferry_save EXIT
builtin eval "$__ferry_cmd"
)WRAPPER";

constexpr const char* state_marker = "\n# ferry-state-end\n";

}  // namespace

bool valid_session_name(const std::string& name) {
  if (name.empty() || name.size() > 64)
    return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
  });
}

session_files session_paths(const std::string& sessions_dir, const std::string& name, uint32_t command_id) {
  session_files f;
  f.state = sessions_dir + "/" + name + ".state";
  f.next = sessions_dir + "/" + name + ".next." + std::to_string(command_id);
  return f;
}

std::vector<std::string> session_argv(const std::string& bash, const session_files& files,
                                      const std::string& workspace, const std::string& cwd,
                                      const std::string& command, const std::vector<std::string>& env) {
  std::vector<std::string> argv{bash, "-c", wrapper, "bash", files.state, files.next, workspace, cwd, command};
  argv.insert(argv.end(), env.begin(), env.end());
  return argv;
}

void commit_session_state(const session_files& files) {
  const std::string marker = state_marker;
  bool complete = false;
  int fd = ::open(files.next.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    off_t size = ::lseek(fd, 0, SEEK_END);
    if (size >= static_cast<off_t>(marker.size())) {
      std::string tail(marker.size(), '\0');
      complete = ::pread(fd, tail.data(), tail.size(), size - static_cast<off_t>(marker.size())) ==
                     static_cast<ssize_t>(tail.size()) &&
                 tail == marker;
    }
    ::close(fd);
  }
  if (complete) {
    if (::rename(files.next.c_str(), files.state.c_str()) != 0)
      log_error("cannot save the session state " + files.state + ": " + errno_text(errno));
  } else {
    ::unlink(files.next.c_str());
  }
}

}  // namespace ferry_init
