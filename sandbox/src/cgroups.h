#pragma once
// Private to ferry_sandbox: per-sandbox cgroups for the bwrap backend (runsc makes its own). On
// cgroup v2 one directory `<root>/<parent>/<name>`; on v1 one per controller that a limit needs
// (`/sys/fs/cgroup/{memory,pids,cpu}/<parent>/<name>`). A process joins them by writing "0" to
// each directory's cgroup.procs (the bwrap launcher does, before exec).
//
// Threading: free functions; callers serialise work on one sandbox's cgroups.

#include <filesystem>
#include <string>
#include <vector>

#include "ferry/sandbox/sandbox.h"

namespace ferry::sandbox::detail {

/// Creates the cgroups of one sandbox with `limits` applied; their directories, to join and to
/// remove. Fails (having removed what it made) if the machine has no cgroup hierarchy this
/// process can create groups and set limits in.
result<std::vector<std::filesystem::path>> create_cgroups(const std::string& parent, const std::string& name,
                                                          const sandbox_limits& limits);

/// SIGKILLs whatever is still in the cgroups and removes them; absent ones count as removed.
result<void> remove_cgroups(const std::vector<std::filesystem::path>& dirs);

}  // namespace ferry::sandbox::detail
