#include "ferry/test_support/processes.h"

#include "ferry/sandbox/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

namespace ferry::test {
namespace {

using clock = std::chrono::steady_clock;

bool read_file(const std::string& path, std::string& out) {
  // Not std::ifstream: reading /proc of a process that exits meanwhile throws from its filebuf.
  out = sandbox::read_small_file(path);
  return !out.empty();
}

bool parse_int(std::string_view s, int& out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}

/// Parses /proc/<pid>/stat: "pid (comm) state ppid pgrp session ...". comm may contain spaces
/// and parentheses, so the fields are counted from the last ')'.
bool parse_stat(const std::string& stat, process_info& p) {
  auto close = stat.rfind(')');
  if (close == std::string::npos)
    return false;
  std::istringstream rest(stat.substr(close + 1));
  std::string state, ppid, pgrp, session;
  if (!(rest >> state >> ppid >> pgrp >> session) || state.empty())
    return false;
  p.state = state[0];
  return parse_int(ppid, p.ppid) && parse_int(session, p.session);
}

std::vector<process_info> live_matching(const std::function<bool(const process_info&)>& keep) {
  std::vector<process_info> out;
  for (auto& p : list_processes()) {
    if (p.state != 'Z' && keep(p))
      out.push_back(std::move(p));
  }
  return out;
}

}  // namespace

std::vector<process_info> list_processes() {
  std::vector<process_info> out;
  DIR* dir = ::opendir("/proc");
  if (dir == nullptr)
    return out;
  const int self = static_cast<int>(::getpid());
  while (dirent* e = ::readdir(dir)) {
    process_info p;
    if (!parse_int(e->d_name, p.pid) || p.pid == self)
      continue;
    const std::string base = std::string("/proc/") + e->d_name;
    std::string stat;
    if (!read_file(base + "/stat", stat) || !parse_stat(stat, p))
      continue;  // gone meanwhile
    if (read_file(base + "/cmdline", p.cmdline)) {
      while (!p.cmdline.empty() && p.cmdline.back() == '\0')
        p.cmdline.pop_back();
      for (char& c : p.cmdline) {
        if (c == '\0')
          c = ' ';
      }
    }
    out.push_back(std::move(p));
  }
  ::closedir(dir);
  return out;
}

std::vector<process_info> processes_with_cmdline_containing(std::string_view needle) {
  return live_matching(
      [&](const process_info& p) { return p.cmdline.find(needle) != std::string::npos; });
}

std::vector<process_info> processes_in_session(int sid) {
  return live_matching([&](const process_info& p) { return p.session == sid; });
}

std::string describe(const std::vector<process_info>& processes) {
  if (processes.empty())
    return "none";
  std::string out;
  for (const auto& p : processes) {
    if (!out.empty())
      out += "; ";
    std::string cmdline = p.cmdline.size() > 300 ? p.cmdline.substr(0, 300) + "..." : p.cmdline;
    for (char& c : cmdline) {
      if (static_cast<unsigned char>(c) < 0x20)
        c = ' ';
    }
    out += "pid " + std::to_string(p.pid) + " (" + p.state + "): " + cmdline;
  }
  return out;
}

std::string program_run::summary() const {
  std::string s;
  if (!spawn_error.empty())
    return "cannot start: " + spawn_error;
  if (timed_out)
    s = "timed out and was killed";
  else if (status.signal != 0)
    s = "killed by signal " + std::to_string(status.signal);
  else
    s = "exit " + std::to_string(status.exit_code);
  if (!err.empty())
    s += "; stderr: " + (err.size() > 4000 ? err.substr(err.size() - 4000) : err);
  return s;
}

program_run run_program(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  program_run run;
  sandbox::spawn_options opts;
  opts.argv = argv;
  opts.in = sandbox::stdio::null;
  opts.out = sandbox::stdio::pipe;
  opts.err = sandbox::stdio::pipe;
  auto spawned = sandbox::child_process::spawn(opts);
  if (!spawned) {
    run.spawn_error = spawned.error().message;
    return run;
  }
  sandbox::child_process& child = *spawned;

  const auto deadline = clock::now() + timeout;
  pollfd fds[2] = {{child.stdout_fd(), POLLIN, 0}, {child.stderr_fd(), POLLIN, 0}};
  std::string* sinks[2] = {&run.out, &run.err};
  char buf[16384];
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    if (left.count() <= 0) {
      run.timed_out = true;
      break;
    }
    int r = ::poll(fds, 2, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0)
        continue;
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0)
        sinks[i]->append(buf, static_cast<size_t>(n));
      else if (n == 0 || errno != EINTR)
        fds[i].fd = -1;  // EOF (or error): stop watching; the fd is closed by child_process
    }
  }
  if (run.timed_out) {
    child.signal_group(SIGKILL);
    run.status = child.wait();
    return run;
  }
  // Both pipes are at EOF; the program may still be finishing. Give it what is left.
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
  if (auto st = child.wait_for(std::max(left, std::chrono::milliseconds(0)))) {
    run.status = *st;
  } else {
    run.timed_out = true;
    child.signal_group(SIGKILL);
    run.status = child.wait();
  }
  return run;
}

bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds timeout,
                std::chrono::milliseconds interval) {
  const auto deadline = clock::now() + timeout;
  for (;;) {
    if (condition())
      return true;
    auto now = clock::now();
    if (now >= deadline)
      return false;
    std::this_thread::sleep_for(std::min<clock::duration>(interval, deadline - now));
  }
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(clock::now() - start).count();
}

}  // namespace ferry::test
