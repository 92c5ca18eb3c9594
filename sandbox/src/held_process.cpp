#include "held_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

#include "ferry/sandbox/process.h"

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

bool held_process::exited() const {
  pollfd p{fd.get(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

void held_process::sigkill() const { ::syscall(SYS_pidfd_send_signal, fd.get(), SIGKILL, nullptr, 0); }

held_process held_process::duplicate() const {
  return held_process{pid, unique_fd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0))};
}

std::optional<held_process> hold(pid_t pid) {
  if (pid <= 0)
    return std::nullopt;
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0)
    return std::nullopt;
  return held_process{pid, unique_fd(fd)};
}

namespace {

/// The fields of /proc/<pid>/stat after the command name: "S <ppid> ..." (empty if gone).
std::string stat_fields(pid_t pid) {
  const std::string stat = read_small_file(fs::path("/proc") / std::to_string(pid) / "stat");
  auto paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size())
    return {};
  return stat.substr(paren + 2);
}

}  // namespace

pid_t parent_of(pid_t pid) {
  const std::string f = stat_fields(pid);
  if (f.size() < 3)
    return 0;
  return static_cast<pid_t>(std::strtol(f.c_str() + 2, nullptr, 10));
}

uint64_t start_time_of(pid_t pid) {
  // Fields from the state (field 3) on; starttime is field 22.
  const std::string f = stat_fields(pid);
  size_t at = 0;
  for (int field = 3; field < 22 && at != std::string::npos; ++field) {
    at = f.find(' ', at);
    if (at != std::string::npos)
      ++at;
  }
  if (at == std::string::npos || at >= f.size())
    return 0;
  return std::strtoull(f.c_str() + at, nullptr, 10);
}

void hold_descendants(std::vector<held_process>& procs) {
  if (procs.empty())
    return;
  std::vector<size_t> queue{0};
  for (size_t q = 0; q < queue.size() && procs.size() < 4096; ++q) {
    const pid_t parent = procs[queue[q]].pid;
    std::error_code ec;
    std::vector<pid_t> kids;
    const fs::path tasks = fs::path("/proc") / std::to_string(parent) / "task";
    for (fs::directory_iterator it(tasks, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string list = read_small_file(it->path() / "children");
      const char* p = list.c_str();
      char* next = nullptr;
      for (long v = std::strtol(p, &next, 10); next != p; v = std::strtol(p, &next, 10)) {
        kids.push_back(static_cast<pid_t>(v));
        p = next;
      }
    }
    for (pid_t kid : kids) {
      if (std::any_of(procs.begin(), procs.end(), [&](const held_process& h) { return h.pid == kid; }))
        continue;
      auto held = hold(kid);
      if (held && parent_of(kid) == parent && !procs[queue[q]].exited()) {
        procs.push_back(std::move(*held));
        queue.push_back(procs.size() - 1);
      }
    }
  }
}

bool kill_and_wait(const std::vector<held_process>& procs, std::chrono::milliseconds timeout) {
  for (const auto& p : procs)
    p.sigkill();
  const auto deadline = steady::now() + timeout;
  std::vector<pollfd> fds;
  for (const auto& p : procs)
    fds.push_back({p.fd.get(), POLLIN, 0});
  size_t alive = fds.size();
  while (alive > 0) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    if (left <= 0ms)
      return false;
    int r = ::poll(fds.data(), fds.size(), static_cast<int>(left.count()));
    if (r < 0 && errno != EINTR)
      return false;
    for (auto& f : fds) {
      if (f.fd >= 0 && f.revents) {
        f.fd = -1;  // poll ignores negative fds
        --alive;
      }
    }
  }
  return true;
}

bool wait_exited(const std::vector<held_process>& procs, std::chrono::milliseconds timeout) {
  const auto deadline = steady::now() + timeout;
  for (const auto& p : procs) {
    for (;;) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
      pollfd f{p.fd.get(), POLLIN, 0};
      int r = ::poll(&f, 1, static_cast<int>(std::max(left, 0ms).count()));
      if (r > 0)
        break;
      if (r == 0 || errno != EINTR)
        return false;
    }
  }
  return true;
}

}  // namespace ferry::sandbox::detail
