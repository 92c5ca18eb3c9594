// cgroup_limits: a sandbox's resource limits as a cgroup Ferry owns (cgroup_limits.h).

#include "cgroup_limits.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <sstream>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"

namespace ferry::sandbox {

std::string_view to_string(limit_hit::kind k) {
  switch (k) {
    case limit_hit::kind::memory:
      return "memory";
    case limit_hit::kind::pids:
      return "pids";
    case limit_hit::kind::disk:
      return "disk";
  }
  return "unknown";
}

}  // namespace ferry::sandbox

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;

namespace {

std::string errno_message(int e) { return std::error_code(e, std::system_category()).message(); }

/// Writes `value` to a cgroup control file (one write(2): the kernel parses each write whole).
result<void> write_control(const fs::path& file, const std::string& value) {
  int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0)
    return fail(fmt::format("cannot open {}: {}", file.string(), errno_message(errno)));
  ssize_t n = ::write(fd, value.data(), value.size());
  int e = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(value.size()))
    return fail(fmt::format("cannot write '{}' to {}: {}", value, file.string(),
                            n < 0 ? errno_message(e) : "short write"));
  return {};
}

/// The number after `key` in a "key value" file (memory.events, pids.events, oom_control).
uint64_t keyed_value(const fs::path& file, std::string_view key) {
  std::istringstream in(read_small_file(file));
  std::string k;
  uint64_t v = 0;
  while (in >> k >> v)
    if (k == key)
      return v;
  return 0;
}

uint64_t plain_value(const fs::path& file) {
  std::istringstream in(read_small_file(file));
  uint64_t v = 0;
  in >> v;
  return v;
}

fs::path v1_cpu_hierarchy(const fs::path& root) {
  for (const char* name : {"cpu", "cpu,cpuacct", "cpuacct,cpu"})
    if (fs::is_directory(root / name))
      return root / name;
  return {};
}

bool valid_name(const std::string& s) {
  return !s.empty() && s.size() <= 128 && s != "." && s != ".." &&
         std::all_of(s.begin(), s.end(), [](char c) {
           return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
         });
}

/// The controllers' parent directories for `parent` (v2: one).
std::vector<fs::path> parent_dirs(cgroup_mode mode, const fs::path& root, const std::string& parent) {
  if (mode == cgroup_mode::v2)
    return {root / parent};
  if (mode == cgroup_mode::v1) {
    std::vector<fs::path> dirs{root / "memory" / parent, root / "pids" / parent};
    if (auto cpu = v1_cpu_hierarchy(root); !cpu.empty())
      dirs.push_back(cpu / parent);
    return dirs;
  }
  return {};
}

}  // namespace

cgroup_mode detect_cgroup_mode(const fs::path& root) {
  if (fs::exists(root / "cgroup.controllers"))
    return cgroup_mode::v2;
  if (fs::is_directory(root / "memory") && fs::is_directory(root / "pids"))
    return cgroup_mode::v1;
  return cgroup_mode::none;
}

sandbox_cgroup sandbox_cgroup::existing(const std::string& parent, const std::string& id,
                                        const fs::path& root) {
  sandbox_cgroup g;
  g.mode_ = detect_cgroup_mode(root);
  g.parent_ = parent;
  g.id_ = id;
  if (g.mode_ == cgroup_mode::v2) {
    g.memory_ = g.pids_ = g.cpu_ = root / parent / id;
    g.dirs_ = {g.memory_};
  } else if (g.mode_ == cgroup_mode::v1) {
    g.memory_ = root / "memory" / parent / id;
    g.pids_ = root / "pids" / parent / id;
    g.dirs_ = {g.memory_, g.pids_};
    if (auto cpu = v1_cpu_hierarchy(root); !cpu.empty()) {
      g.cpu_ = cpu / parent / id;
      g.dirs_.push_back(g.cpu_);
    }
  }
  return g;
}

result<sandbox_cgroup> sandbox_cgroup::create(const std::string& parent, const std::string& id,
                                              const sandbox_limits& limits, const fs::path& root) {
  if (!valid_name(parent) || !valid_name(id))
    return fail(fmt::format("invalid cgroup name {}/{}", parent, id));
  sandbox_cgroup g = existing(parent, id, root);
  if (g.mode_ == cgroup_mode::none)
    return fail(fmt::format("no usable cgroup hierarchy under {} (neither cgroup v2 nor the v1 "
                            "memory and pids controllers): sandbox limits cannot be enforced",
                            root.string()));
  if (g.mode_ == cgroup_mode::v2) {
    // Controllers must be enabled for the children of the root and of `parent`.
    std::error_code ec;
    fs::create_directories(root / parent, ec);
    if (ec)
      return fail(fmt::format("cannot create cgroup {}: {}", (root / parent).string(), ec.message()));
    for (const auto& dir : {root, root / parent}) {
      std::string enabled = read_small_file(dir / "cgroup.subtree_control");
      for (const char* c : {"memory", "pids", "cpu"})
        if (enabled.find(c) == std::string::npos)
          if (auto ok = write_control(dir / "cgroup.subtree_control", std::string("+") + c); !ok)
            return fail(fmt::format("cannot enable the {} controller for sandboxes: {}", c,
                                    ok.error().message));
    }
  }
  // A cgroup that exists already belongs to a sandbox being re-attached: a failure below must
  // not remove it (remove() kills what is inside), only report.
  bool made = false;
  for (const auto& d : g.dirs_) {
    std::error_code ec;
    made |= fs::create_directories(d, ec);
    if (ec)
      return fail(fmt::format("cannot create cgroup {}: {}", d.string(), ec.message()));
  }
  auto undo = [&](error_info e) {
    if (made)
      (void)g.remove();
    return e;
  };
  if (g.mode_ == cgroup_mode::v2) {
    const std::string mem = limits.memory_bytes ? std::to_string(limits.memory_bytes) : "max";
    if (auto ok = write_control(g.memory_ / "memory.max", mem); !ok)
      return undo(ok.error());
    if (fs::exists(g.memory_ / "memory.swap.max"))
      if (auto ok = write_control(g.memory_ / "memory.swap.max", limits.memory_bytes ? "0" : "max"); !ok)
        return undo(ok.error());
    if (auto ok = write_control(g.pids_ / "pids.max", limits.pids ? std::to_string(limits.pids) : "max"); !ok)
      return undo(ok.error());
    const uint32_t weight = std::clamp<uint32_t>(limits.cpu_weight ? limits.cpu_weight : 100, 1, 10000);
    if (auto ok = write_control(g.cpu_ / "cpu.weight", std::to_string(weight)); !ok)
      return undo(ok.error());
    const std::string max = limits.cpu_millis > 0
                              ? fmt::format("{} 100000", std::max<uint64_t>(1000, uint64_t{limits.cpu_millis} * 100))
                              : "max 100000";
    if (auto ok = write_control(g.cpu_ / "cpu.max", max); !ok)
      return undo(ok.error());
  } else {
    const std::string mem = limits.memory_bytes ? std::to_string(limits.memory_bytes) : "-1";
    // Raising: memsw first would fail below the old limit; lowering: the limit first. Writing
    // the limit, then memsw, then the limit again covers both.
    if (auto ok = write_control(g.memory_ / "memory.limit_in_bytes", mem); !ok)
      return undo(ok.error());
    if (fs::exists(g.memory_ / "memory.memsw.limit_in_bytes")) {
      if (auto ok = write_control(g.memory_ / "memory.memsw.limit_in_bytes", mem); !ok)
        return undo(ok.error());
      (void)write_control(g.memory_ / "memory.limit_in_bytes", mem);
    }
    if (auto ok = write_control(g.pids_ / "pids.max", limits.pids ? std::to_string(limits.pids) : "max"); !ok)
      return undo(ok.error());
    if (!g.cpu_.empty()) {
      const uint32_t weight = std::clamp<uint32_t>(limits.cpu_weight ? limits.cpu_weight : 100, 1, 10000);
      if (auto ok = write_control(g.cpu_ / "cpu.shares", std::to_string(std::max<uint64_t>(2, weight * 1024ull / 100))); !ok)
        return undo(ok.error());
      (void)write_control(g.cpu_ / "cpu.cfs_period_us", "100000");
      const std::string quota =
        limits.cpu_millis > 0 ? std::to_string(std::max<uint64_t>(1000, uint64_t{limits.cpu_millis} * 100)) : "-1";
      if (auto ok = write_control(g.cpu_ / "cpu.cfs_quota_us", quota); !ok)
        return undo(ok.error());
    } else if (limits.cpu_millis > 0) {
      return undo(fail("a CPU limit was asked for, but this host has no cgroup v1 cpu controller"));
    }
  }
  return g;
}

result<void> sandbox_cgroup::add_process(pid_t pid) const {
  for (const auto& d : dirs_)
    if (auto ok = write_control(d / "cgroup.procs", std::to_string(pid)); !ok)
      return ok;
  return {};
}

std::vector<pid_t> sandbox_cgroup::processes() const {
  std::vector<pid_t> pids;
  for (const auto& d : dirs_) {
    std::istringstream in(read_small_file(d / "cgroup.procs"));
    for (pid_t p; in >> p;)
      if (std::find(pids.begin(), pids.end(), p) == pids.end())
        pids.push_back(p);
  }
  return pids;
}

limit_hits sandbox_cgroup::hits() const {
  limit_hits h;
  if (mode_ == cgroup_mode::v2) {
    h.oom_kills = keyed_value(memory_ / "memory.events", "oom_kill");
    h.pids_refused = keyed_value(pids_ / "pids.events", "max");
    h.memory_peak = plain_value(memory_ / "memory.peak");
  } else if (mode_ == cgroup_mode::v1) {
    h.oom_kills = keyed_value(memory_ / "memory.oom_control", "oom_kill");
    h.pids_refused = keyed_value(pids_ / "pids.events", "max");
    h.memory_peak = plain_value(memory_ / "memory.max_usage_in_bytes");
  }
  return h;
}

result<void> sandbox_cgroup::remove() const {
  using namespace std::chrono;
  const auto deadline = steady_clock::now() + seconds(2);
  for (auto pids = processes(); !pids.empty(); pids = processes()) {
    if (steady_clock::now() > deadline)
      return fail(fmt::format("cgroup {} still has {} processes after SIGKILL", oci_path(), pids.size()));
    if (mode_ == cgroup_mode::v2 && fs::exists(memory_ / "cgroup.kill"))
      (void)write_control(memory_ / "cgroup.kill", "1");
    else
      for (pid_t p : pids)
        ::kill(p, SIGKILL);
    std::this_thread::sleep_for(milliseconds(10));
  }
  for (const auto& d : dirs_)
    if (::rmdir(d.c_str()) != 0 && errno != ENOENT)
      return fail(fmt::format("cannot remove cgroup {}: {}", d.string(), errno_message(errno)));
  if (mode_ == cgroup_mode::v1 && !dirs_.empty()) {
    // runsc also makes the group in the hierarchies Ferry sets nothing in (blkio, cpuset,
    // devices, freezer, …) and removes them at `runsc delete`; when that fails they would stay.
    // Empty by now: removed too, quietly (one still busy or absent is not this group's).
    const fs::path root = dirs_.front().parent_path().parent_path().parent_path();
    std::error_code ec;
    for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
      const fs::path d = it->path() / parent_ / id_;
      if (std::find(dirs_.begin(), dirs_.end(), d) == dirs_.end())
        ::rmdir(d.c_str());
    }
  }
  return {};
}

std::vector<std::string> remove_orphan_cgroups(const std::string& parent, std::string_view prefix,
                                               const std::function<bool(const std::string&)>& remove,
                                               const std::function<void(const std::string&)>& done,
                                               const fs::path& root) {
  std::set<std::string> ids;
  for (const auto& dir : parent_dirs(detect_cgroup_mode(root), root, parent)) {
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string id = it->path().filename().string();
      if (it->is_directory(ec) && id.starts_with(prefix))
        ids.insert(id);
    }
  }
  std::vector<std::string> removed;
  for (const auto& id : ids) {
    if (!remove(id))
      continue;
    if (sandbox_cgroup::existing(parent, id, root).remove())
      removed.push_back(id);
    done(id);
  }
  return removed;
}

std::vector<std::string> remove_orphan_cgroups(const std::string& parent, std::string_view prefix,
                                               const std::set<std::string>& keep,
                                               const fs::path& root) {
  return remove_orphan_cgroups(
    parent, prefix, [&](const std::string& id) { return keep.count(id) == 0; }, [](const std::string&) {}, root);
}

std::vector<limit_hit> describe_hits(const limit_hits& h, const sandbox_limits& limits) {
  std::vector<limit_hit> hits;
  if (h.oom_kills > 0) {
    limit_hit hit;
    hit.what = limit_hit::kind::memory;
    hit.limit = limits.memory_bytes;
    hit.count = h.oom_kills;
    hit.detail = fmt::format("memory limit reached ({} MiB): the OOM killer ran", limits.memory_bytes >> 20);
    hits.push_back(std::move(hit));
  }
  if (h.pids_refused > 0) {
    limit_hit hit;
    hit.what = limit_hit::kind::pids;
    hit.limit = limits.pids;
    hit.count = h.pids_refused;
    hit.detail = fmt::format("process limit reached ({} processes and threads): {} fork{} refused", limits.pids,
                             h.pids_refused, h.pids_refused == 1 ? " was" : "s were");
    hits.push_back(std::move(hit));
  }
  return hits;
}

}  // namespace ferry::sandbox::detail
