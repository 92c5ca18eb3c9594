#include "ferry/test_support/ferryd_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <sstream>
#include <stdexcept>

#include <boost/test/unit_test.hpp>

#include "ferry/test_support/processes.h"

namespace ferry::test {
namespace {

using namespace std::chrono_literals;
using clock = std::chrono::steady_clock;

constexpr std::string_view token_prefix = "ferryd: admin token: ";
constexpr std::string_view listening_prefix = "ferryd: listening on ";
constexpr size_t max_log = 256 * 1024;
// setsid(1) execs in place when its caller is not a group leader, so ferryd keeps the pid we
// spawned and leads a new session.
constexpr const char* setsid_path = "/usr/bin/setsid";

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\r' || s.back() == ' ' || s.back() == '\n'))
    s.pop_back();
  size_t i = 0;
  while (i < s.size() && s[i] == ' ')
    ++i;
  return s.substr(i);
}

std::string tail(const std::string& s, size_t n = 8192) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

std::string describe_status(const sandbox::exit_status& st) {
  return st.signal ? "signal " + std::to_string(st.signal) + " (" + strsignal(st.signal) + ")"
                   : "exit code " + std::to_string(st.exit_code);
}

/// Port of "http://127.0.0.1:12345" (optionally with a trailing path); 0 if unparsable.
uint16_t parse_port(const std::string& url) {
  auto scheme = url.find("://");
  if (scheme == std::string::npos)
    return 0;
  std::string authority = url.substr(scheme + 3);
  authority = authority.substr(0, authority.find('/'));
  auto colon = authority.rfind(':');
  if (colon == std::string::npos)
    return 0;
  unsigned value = 0;
  const char* first = authority.data() + colon + 1;
  const char* last = authority.data() + authority.size();
  auto [p, ec] = std::from_chars(first, last, value);
  if (ec != std::errc() || p != last || value == 0 || value > 65535)
    return 0;
  return static_cast<uint16_t>(value);
}

std::vector<std::string> split_spaces(const char* s) {
  std::vector<std::string> out;
  if (!s)
    return out;
  std::istringstream in(s);
  std::string word;
  while (in >> word)
    out.push_back(word);
  return out;
}

}  // namespace

ferryd_process::ferryd_process(ferryd_options opts) : token_(opts.token) {
  if (opts.binary.empty())
    throw std::runtime_error("ferryd_process: no ferryd binary given");
  const char* quiet = std::getenv("FERRY_TEST_QUIET");
  quiet_ = quiet && *quiet && std::string(quiet) != "0";

  std::filesystem::path cwd;
  if (opts.data_dir.empty()) {
    own_dir_.emplace("ferryd");
    data_dir_ = own_dir_->path() / "data";
    cwd = own_dir_->path();
  } else {
    data_dir_ = opts.data_dir;
    cwd = data_dir_.has_parent_path() ? data_dir_.parent_path() : std::filesystem::path(".");
  }

  sandbox::spawn_options spawn;
  own_session_ = ::access(setsid_path, X_OK) == 0;
  if (own_session_)
    spawn.argv.push_back(setsid_path);
  spawn.argv.insert(spawn.argv.end(), {opts.binary, "--listen", "127.0.0.1:0", "--data-dir",
                                       data_dir_.string()});
  spawn.argv.insert(spawn.argv.end(), opts.extra_args.begin(), opts.extra_args.end());
  for (auto& a : split_spaces(std::getenv("FERRYD_TEST_EXTRA_ARGS")))
    spawn.argv.push_back(std::move(a));
  spawn.cwd = cwd.string();
  spawn.in = sandbox::stdio::null;
  spawn.out = sandbox::stdio::pipe;
  spawn.err = sandbox::stdio::pipe;
  spawn.new_process_group = !own_session_;

  std::string command_line;
  for (const auto& a : spawn.argv)
    command_line += (command_line.empty() ? "" : " ") + a;

  if (::pipe2(wake_fds_, O_CLOEXEC) != 0)
    throw std::runtime_error(std::string("ferryd_process: pipe2: ") + std::strerror(errno));
  const auto started = clock::now();
  auto spawned = sandbox::child_process::spawn(spawn);
  if (!spawned) {
    ::close(wake_fds_[0]);
    ::close(wake_fds_[1]);
    throw std::runtime_error("cannot start ferryd (" + command_line + "): " +
                             spawned.error().message);
  }
  child_.emplace(std::move(*spawned));
  pid_ = child_->pid();
  drain_thread_ = std::thread([this] { drain(); });

  // Wait for the ready line, remembering the token line on the way.
  std::string failure;
  const auto deadline = started + opts.ready_timeout;
  size_t seen = 0;
  for (;;) {
    bool eof = false;
    {
      std::unique_lock lock(mu_);
      cv_.wait_until(lock, std::min(deadline, clock::now() + 100ms),
                     [&] { return stdout_lines_.size() > seen || drained_; });
      for (; seen < stdout_lines_.size(); ++seen) {
        const std::string line = trim(stdout_lines_[seen]);
        if (line.rfind(token_prefix, 0) == 0) {
          token_ = trim(line.substr(token_prefix.size()));
          printed_token_ = true;
        } else if (line.rfind(listening_prefix, 0) == 0 && url_.empty()) {
          url_ = trim(line.substr(listening_prefix.size()));
        }
      }
      eof = drained_;
    }
    if (!url_.empty()) {
      port_ = parse_port(url_);
      if (port_ == 0)
        failure = "ferryd printed a ready line with an unparsable URL: \"" + url_ + "\"";
      break;
    }
    if (auto st = child_->try_wait()) {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, 500ms, [&] { return drained_; });  // collect its last words
      failure = "ferryd exited with " + describe_status(*st) + " before it was ready";
      break;
    }
    if (eof) {
      failure = "ferryd closed its stdout and stderr before it was ready";
      break;
    }
    if (clock::now() >= deadline) {
      failure = "ferryd printed no \"" + std::string(listening_prefix) + "...\" line within " +
                std::to_string(opts.ready_timeout.count()) + " ms";
      break;
    }
  }
  startup_time_ = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - started);
  if (!failure.empty()) {
    auto report = stop_impl(2s);
    std::string message = failure + "\ncommand: " + command_line + "\noutput so far:\n" +
                          tail(output());
    if (!report.left_behind.empty()) {
      message += "\nleft behind (killed): ";
      for (const auto& p : report.left_behind)
        message += p + "; ";
    }
    throw std::runtime_error(message);
  }
}

ferryd_process::~ferryd_process() {
  if (stopped_)
    return;
  if (std::uncaught_exceptions() > 0) {
    // The test already failed; just leave nothing behind.
    auto r = stop_impl(5s);
    for (const auto& p : r.left_behind)
      std::cerr << "ferry test: killed a process ferryd left behind: " << p << "\n";
  } else {
    stop();
  }
}

bool ferryd_process::running() { return child_ && !child_->try_wait(); }

std::string ferryd_process::output() const {
  std::lock_guard lock(mu_);
  return log_;
}

ferryd_stop_report ferryd_process::stop(std::chrono::milliseconds grace) {
  if (stopped_)
    return *stopped_;
  ferryd_stop_report r = stop_impl(grace);
  const std::string out = tail(output());
  if (crashed_) {
    // Killed on purpose by crash(); only what it left behind still counts below.
  } else if (r.exited_before_stop) {
    BOOST_CHECK_MESSAGE(false, "ferryd (pid " << pid_ << ") had already exited with "
                                              << describe_status(r.status)
                                              << " before it was asked to stop; output:\n"
                                              << out);
  } else if (r.killed) {
    BOOST_CHECK_MESSAGE(false, "ferryd (pid " << pid_ << ") did not exit within " << grace.count()
                                              << " ms of SIGTERM and was killed; output:\n"
                                              << out);
  } else {
    BOOST_CHECK_MESSAGE(r.status.ok(), "ferryd (pid " << pid_ << ") exited with "
                                                      << describe_status(r.status)
                                                      << " after SIGTERM, expected exit code 0; "
                                                         "output:\n"
                                                      << out);
  }
  std::string left;
  for (const auto& p : r.left_behind)
    left += "\n  " + p;
  BOOST_CHECK_MESSAGE(r.left_behind.empty(),
                      "ferryd left processes running after it exited (now killed):" << left);
  std::string mounts;
  for (const auto& m : r.left_mounts)
    mounts += "\n  " + m;
  BOOST_CHECK_MESSAGE(r.left_mounts.empty(),
                      "ferryd left mounts under its data dir after it exited:" << mounts);
  BOOST_TEST_MESSAGE("ferryd (pid " << pid_ << ") stopped " << describe_status(r.status) << " in "
                                    << r.elapsed.count() << " ms after SIGTERM");
  return r;
}

void ferryd_process::crash() {
  if (stopped_ || crashed_ || !child_)
    return;
  crashed_ = true;
  ::kill(pid_, SIGKILL);  // ferryd alone: its children stay, as after a real crash
  auto st = child_->wait();
  BOOST_TEST_MESSAGE("ferryd (pid " << pid_ << ") crashed on purpose: " << describe_status(st));
}

ferryd_stop_report ferryd_process::stop_impl(std::chrono::milliseconds grace) {
  if (stopped_)
    return *stopped_;
  ferryd_stop_report r;
  const auto t0 = clock::now();
  auto st = child_->try_wait();
  if (st) {
    r.exited_before_stop = true;
  } else {
    // To ferryd alone, as a service manager would: stopping its children is ferryd's job.
    // The pid cannot have been reused: we have not reaped it yet.
    ::kill(pid_, SIGTERM);
    st = child_->wait_for(grace);
    if (!st) {
      r.killed = true;
      ::kill(-pid_, SIGKILL);  // its process group (it leads one, via setsid or spawn)
      st = child_->wait();
    }
  }
  r.status = *st;
  r.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - t0);

  // Whatever is still alive in its session, or mentions its data dir, was left behind.
  std::vector<process_info> left;
  if (own_session_)
    left = processes_in_session(pid_);
  for (auto& p : processes_with_cmdline_containing(data_dir_.string())) {
    bool known = false;
    for (const auto& q : left)
      known |= q.pid == p.pid;
    if (!known)
      left.push_back(std::move(p));
  }
  for (const auto& p : left) {
    ::kill(p.pid, SIGKILL);
    r.left_behind.push_back(describe({p}));
  }

  r.left_mounts = mounts_under(data_dir_);

  // Let the drain thread see EOF (a leftover that still held the pipes is dead now), then stop it.
  {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, 2s, [&] { return drained_; });
  }
  if (drain_thread_.joinable()) {
    char byte = 'x';
    while (::write(wake_fds_[1], &byte, 1) < 0 && errno == EINTR) {
    }
    drain_thread_.join();
  }
  for (int& fd : wake_fds_) {
    if (fd >= 0)
      ::close(fd);
    fd = -1;
  }
  stopped_ = r;
  return r;
}

void ferryd_process::drain() {
  pollfd fds[3] = {{child_->stdout_fd(), POLLIN, 0},
                   {child_->stderr_fd(), POLLIN, 0},
                   {wake_fds_[0], POLLIN, 0}};
  std::string partial[2];
  char buf[8192];
  auto consume = [&](int i) -> bool {  // false at EOF
    ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
      return true;
    if (n <= 0) {
      if (!partial[i].empty())
        append_line(i == 1, std::exchange(partial[i], {}));
      fds[i].fd = -1;
      return false;
    }
    partial[i].append(buf, static_cast<size_t>(n));
    size_t start = 0, nl;
    while ((nl = partial[i].find('\n', start)) != std::string::npos) {
      append_line(i == 1, partial[i].substr(start, nl - start));
      start = nl + 1;
    }
    partial[i].erase(0, start);
    return true;
  };

  bool woken = false;
  while ((fds[0].fd >= 0 || fds[1].fd >= 0) && !woken) {
    int r = ::poll(fds, 3, -1);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      break;
    }
    if (fds[2].revents)
      woken = true;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd >= 0 && fds[i].revents)
        consume(i);
    }
  }
  // Woken while something still holds the pipes: take what is buffered, without waiting.
  for (int i = 0; i < 2; ++i) {
    while (fds[i].fd >= 0) {
      pollfd p{fds[i].fd, POLLIN, 0};
      if (::poll(&p, 1, 0) <= 0)
        break;
      consume(i);
    }
    if (!partial[i].empty())
      append_line(i == 1, std::exchange(partial[i], {}));
  }
  std::lock_guard lock(mu_);
  drained_ = true;
  cv_.notify_all();
}

void ferryd_process::append_line(bool is_stderr, const std::string& line) {
  if (!quiet_)
    std::cerr << "[ferryd " << pid_ << (is_stderr ? " err] " : " out] ") + line + "\n"
              << std::flush;
  std::lock_guard lock(mu_);
  if (!is_stderr)
    stdout_lines_.push_back(line);
  log_ += line;
  log_ += '\n';
  if (log_.size() > max_log)
    log_.erase(0, log_.size() - max_log);
  cv_.notify_all();
}

}  // namespace ferry::test
