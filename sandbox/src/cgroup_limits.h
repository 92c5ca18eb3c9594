#pragma once
// Private to ferry_sandbox: the resource limits of a sandbox as a cgroup of its own, made by
// Ferry (not by runsc) so that it outlives the sandbox's processes: once a sandbox has died,
// its cgroup still says which limit it hit (memory: the OOM killer ran; pids: a fork failed at
// the limit) before Ferry removes it.
//
// Layout: `<parent>/<id>` in each controller — cgroup v2 (unified, /sys/fs/cgroup): one
// directory with memory.max, pids.max, cpu.weight, cpu.max; cgroup v1: the same name under the
// memory, pids and cpu hierarchies (memory.limit_in_bytes, pids.max, cpu.shares,
// cpu.cfs_quota_us). The runtime hands `oci_path()` to runsc as the spec's cgroupsPath: runsc
// puts the sandbox's host processes there and, finding the directories made, leaves their
// settings and their removal to Ferry. (Debian's runsc, 2022: a limit that is hit kills the whole
// sandbox, not one process — the Sentry cannot make a thread or allocate — so hits are reported
// as the sandbox being killed by that limit.)
//
// Threading: sandbox_cgroup is a value owned by one sandbox; the free functions are safe from
// any thread.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/result.h"

namespace ferry::sandbox::detail {

/// Which cgroup hierarchy the host has.
enum class cgroup_mode { v2, v1, none };

/// What the host offers: /sys/fs/cgroup/cgroup.controllers → v2; memory and pids hierarchies → v1.
cgroup_mode detect_cgroup_mode(const std::filesystem::path& root = "/sys/fs/cgroup");

/// What a sandbox's cgroup counted.
struct limit_hits {
  uint64_t oom_kills = 0;     ///< times the OOM killer ran at the memory limit
  uint64_t pids_refused = 0;  ///< forks refused at the pids limit
  uint64_t memory_peak = 0;   ///< highest memory use seen (bytes; 0 if the kernel does not say)
};

class sandbox_cgroup {
 public:
  /// Makes `<parent>/<id>` in every controller (an existing one is reused: re-attach after a
  /// restart) and writes `limits`. `root` is the cgroup mount (tests may point elsewhere).
  static result<sandbox_cgroup> create(const std::string& parent, const std::string& id,
                                       const sandbox_limits& limits,
                                       const std::filesystem::path& root = "/sys/fs/cgroup");
  /// The cgroup of a sandbox made earlier (possibly by another process), without touching it.
  static sandbox_cgroup existing(const std::string& parent, const std::string& id,
                                 const std::filesystem::path& root = "/sys/fs/cgroup");

  /// "/<parent>/<id>": the OCI spec's linux.cgroupsPath.
  std::string oci_path() const { return "/" + parent_ + "/" + id_; }
  cgroup_mode mode() const { return mode_; }
  /// The directories, one per controller (v2: one).
  const std::vector<std::filesystem::path>& dirs() const { return dirs_; }

  /// Moves process `pid` into the cgroup (every controller). For bubblewrap and tests; runsc
  /// places its own processes.
  result<void> add_process(pid_t pid) const;
  /// Processes still in the cgroup (any controller).
  std::vector<pid_t> processes() const;
  /// What the cgroup counted so far.
  limit_hits hits() const;
  /// Removes the directories; processes still inside are SIGKILLed first (waits up to 2 s).
  result<void> remove() const;

 private:
  cgroup_mode mode_ = cgroup_mode::none;
  std::string parent_, id_;
  std::vector<std::filesystem::path> dirs_;
  std::filesystem::path memory_, pids_, cpu_;  // the controllers' directories (v2: all the same)
};

/// Removes every `<parent>/<id>` cgroup whose id starts with `prefix` and is not in `keep`
/// (leftovers of sandboxes a crashed ferryd had; other runtimes' groups have other prefixes).
/// Returns the ids removed.
std::vector<std::string> remove_orphan_cgroups(const std::string& parent, std::string_view prefix,
                                               const std::set<std::string>& keep,
                                               const std::filesystem::path& root = "/sys/fs/cgroup");
/// The same, asking `remove(id)` for each candidate (which may also take a lock on the id for
/// the duration: `done(id)` follows each removal attempt).
std::vector<std::string> remove_orphan_cgroups(const std::string& parent, std::string_view prefix,
                                               const std::function<bool(const std::string&)>& remove,
                                               const std::function<void(const std::string&)>& done,
                                               const std::filesystem::path& root = "/sys/fs/cgroup");

/// The limits `h` says were hit (none, one or both), described for people.
std::vector<limit_hit> describe_hits(const limit_hits& h, const sandbox_limits& limits);

}  // namespace ferry::sandbox::detail
