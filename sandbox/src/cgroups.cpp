#include "cgroups.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"
#include "held_process.h"
#include "unique_fd.h"

namespace ferry::sandbox::detail {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

const fs::path cgroup_root = "/sys/fs/cgroup";
constexpr auto empty_timeout = 2s;  // for a cgroup's processes to vanish after SIGKILL

result<void> write_control(const fs::path& file, const std::string& value) {
  unique_fd fd(::open(file.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd || ::write(fd.get(), value.data(), value.size()) != static_cast<ssize_t>(value.size()))
    return fail(fmt::format("cannot write `{}` to {}: {}", value, file.string(), std::strerror(errno)));
  return {};
}

bool is_v2() {
  std::error_code ec;
  return fs::exists(cgroup_root / "cgroup.controllers", ec);
}

/// Makes `dir` and its missing parents below `top`; returns the ones it made, deepest last.
result<std::vector<fs::path>> make_dirs(const fs::path& top, const fs::path& relative) {
  std::vector<fs::path> made;
  fs::path at = top;
  for (const auto& part : relative) {
    at /= part;
    if (::mkdir(at.c_str(), 0755) == 0)
      made.push_back(at);
    else if (errno != EEXIST)
      return fail(fmt::format("cannot create cgroup {}: {}", at.string(), std::strerror(errno)));
  }
  return made;
}

/// Creates the sandbox's cgroup(s); `made` collects every directory created (for undoing).
result<std::vector<fs::path>> create(const std::string& parent, const std::string& name, const sandbox_limits& limits,
                                     std::vector<fs::path>& made) {
  const fs::path relative = fs::path(parent) / name;
  std::vector<fs::path> dirs;
  if (is_v2()) {
    // Controllers must be enabled in every ancestor's subtree_control; the parent holds no
    // processes, so that is allowed below the root.
    const std::string enable = "+memory +pids +cpu";
    if (auto r = write_control(cgroup_root / "cgroup.subtree_control", enable); !r)
      return r.error();
    auto m = make_dirs(cgroup_root, relative);
    if (!m)
      return m.error();
    made.insert(made.end(), m->begin(), m->end());
    fs::path at = cgroup_root;
    for (const auto& part : fs::path(parent)) {
      at /= part;
      if (auto r = write_control(at / "cgroup.subtree_control", enable); !r)
        return r.error();
    }
    const fs::path dir = cgroup_root / relative;
    dirs.push_back(dir);
    if (limits.memory_bytes > 0) {
      if (auto r = write_control(dir / "memory.max", std::to_string(limits.memory_bytes)); !r)
        return r.error();
      std::error_code ec;
      if (fs::exists(dir / "memory.swap.max", ec)) {
        if (auto r = write_control(dir / "memory.swap.max", "0"); !r)
          return r.error();
      }
    }
    if (limits.pids > 0) {
      if (auto r = write_control(dir / "pids.max", std::to_string(limits.pids)); !r)
        return r.error();
    }
    if (limits.cpu_millis > 0) {
      if (auto r = write_control(dir / "cpu.max", fmt::format("{} 100000", uint64_t{limits.cpu_millis} * 100)); !r)
        return r.error();
    }
    return dirs;
  }
  // v1: a hierarchy per controller, each mounted at /sys/fs/cgroup/<controller>.
  struct controller {
    const char* name;
    bool needed;
  };
  for (const controller& c : {controller{"memory", limits.memory_bytes > 0}, controller{"pids", limits.pids > 0},
                              controller{"cpu", limits.cpu_millis > 0}}) {
    if (!c.needed)
      continue;
    const fs::path top = cgroup_root / c.name;
    std::error_code ec;
    if (!fs::exists(top / "cgroup.procs", ec))
      return fail(fmt::format("no cgroup v1 hierarchy for {} at {}", c.name, top.string()));
    auto m = make_dirs(top, relative);
    if (!m)
      return m.error();
    made.insert(made.end(), m->begin(), m->end());
    const fs::path dir = top / relative;
    dirs.push_back(dir);
    result<void> r;
    if (std::strcmp(c.name, "memory") == 0) {
      r = write_control(dir / "memory.limit_in_bytes", std::to_string(limits.memory_bytes));
      // With swap accounting, swap too (memsw counts memory + swap, so the same figure).
      if (r && fs::exists(dir / "memory.memsw.limit_in_bytes", ec))
        r = write_control(dir / "memory.memsw.limit_in_bytes", std::to_string(limits.memory_bytes));
    } else if (std::strcmp(c.name, "pids") == 0) {
      r = write_control(dir / "pids.max", std::to_string(limits.pids));
    } else {
      r = write_control(dir / "cpu.cfs_period_us", "100000");
      if (r)
        r = write_control(dir / "cpu.cfs_quota_us", std::to_string(uint64_t{limits.cpu_millis} * 100));
    }
    if (!r)
      return r.error();
  }
  return dirs;
}

/// The pids in a cgroup.
std::vector<pid_t> members(const fs::path& dir) {
  std::vector<pid_t> pids;
  const std::string list = read_small_file(dir / "cgroup.procs");
  const char* p = list.c_str();
  char* next = nullptr;
  for (long v = std::strtol(p, &next, 10); next != p; v = std::strtol(p, &next, 10)) {
    pids.push_back(static_cast<pid_t>(v));
    p = next;
  }
  return pids;
}

/// `pid` is in cgroup `dir` (a line of /proc/<pid>/cgroup ends with its last two components:
/// `<parent>/<name>`, which identify a sandbox's group in any hierarchy).
bool in_cgroup(pid_t pid, const fs::path& dir) {
  const std::string tail = "/" + (dir.parent_path().filename() / dir.filename()).string() + "\n";
  const std::string lines = read_small_file(fs::path("/proc") / std::to_string(pid) / "cgroup");
  return lines.find(tail) != std::string::npos;
}

}  // namespace

result<std::vector<fs::path>> create_cgroups(const std::string& parent, const std::string& name,
                                             const sandbox_limits& limits) {
  std::vector<fs::path> made;
  auto dirs = create(parent, name, limits, made);
  if (!dirs) {
    // Undo, deepest first; a parent still used by other sandboxes stays (EBUSY).
    for (auto it = made.rbegin(); it != made.rend(); ++it)
      ::rmdir(it->c_str());
  }
  return dirs;
}

result<void> remove_cgroups(const std::vector<fs::path>& dirs) {
  const auto deadline = steady::now() + empty_timeout;
  for (const auto& dir : dirs) {
    for (;;) {
      if (::rmdir(dir.c_str()) == 0 || errno == ENOENT)
        break;
      if (errno != EBUSY)
        return fail(fmt::format("cannot remove cgroup {}: {}", dir.string(), std::strerror(errno)));
      if (steady::now() > deadline)
        return fail(fmt::format("cgroup {} still has processes after SIGKILL", dir.string()));
      // By pidfd, checked to still be in the group after it was opened: never a reused pid.
      for (pid_t pid : members(dir)) {
        auto held = hold(pid);
        if (held && in_cgroup(pid, dir) && !held->exited())
          held->sigkill();
      }
      std::this_thread::sleep_for(5ms);
    }
  }
  return {};
}

}  // namespace ferry::sandbox::detail
