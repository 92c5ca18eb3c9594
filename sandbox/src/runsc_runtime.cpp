// The gVisor backend of sandbox_runtime (see ferry/sandbox/sandbox.h and ../README.md).
//
// One sandbox = one runsc container started with `runsc run --detach` in a session of its own,
// so that its processes (the Sentry, its ptrace stubs and the gofer) are not children of this
// process and survive it. ferry-init, PID 1 inside, listens on a unix socket in the host
// directory `sandboxes_dir/<id>/ctl/` (bind-mounted at /.ferry/ctl; `--host-uds=create` makes
// the socket a real host socket); the reader thread of the sandbox object talks to it through
// the shared protocol client (init_client.h), which also checks every command's story. Each
// sandbox has a random 256-bit key, kept in `sandboxes_dir/<id>/key` (outside the sandbox's view)
// and handed to ferry-init on the stdin of `runsc run`, which runsc gives to the container's
// PID 1: both sides prove they know it on every connection. Its files live in
// `sandboxes_dir/<id>/`; creating that directory claims the id, removing it is the last step
// before on_ended.
//
// Lifecycle of a sandbox object, driven by its reader thread:
//   (start) launching --runsc done--> starting --Hello+Attach+Attached--> running
//   (attach) handshake done by attach() --> running
//   running: commands come and go (run() → Started … Exited, or CommandError)
//   running --Release sent (release(), or the command line's Exited)--> (EOF: ferry-init ended)
//   any state --Error / bad frame / EOF / kill()--> (teardown)     detach() --> (released)
// Teardown (exactly once unless released): make sure every host process of the sandbox has
// exited (SIGKILL through pidfds), on_processes_gone, `runsc delete --force`, kill any runsc
// process still naming the sandbox directory, remove the directory, then on_ended.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/sandbox/sandbox.h"
#include "host_paths.h"
#include "init_client.h"
#include "unique_fd.h"
#include "ferry/schemas/frame.h"
#include "ferry/schemas/handshake.h"

namespace ferry::sandbox {
namespace {

namespace fs = std::filesystem;
namespace v1 = ferry::init::v1;
using detail::clean_path;
using detail::find_program;
using detail::unique_fd;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

constexpr auto helper_timeout = 10s;        // runsc delete / runsc kill
constexpr auto launch_timeout = 30s;        // runsc run --detach
constexpr auto straggler_timeout = 2s;      // for processes to vanish after SIGKILL
constexpr auto listen_timeout = 10s;        // from runsc run's return to ferry-init listening
constexpr auto handshake_timeout = 10s;     // for each of Hello and the answer to Attach
constexpr auto exit_grace = 5s;             // for the processes to exit after ferry-init did
constexpr auto busy_retry = 2s;             // attach: for ferry-init to notice a departed host
constexpr size_t log_tail_bytes = 4096;     // of runsc.log, for failure reasons
// Inside the sandbox: where ferry-init is bound and where the control directory is mounted.
constexpr std::string_view init_path = "/.ferry/init";
constexpr std::string_view ctl_mount = "/.ferry/ctl";
constexpr std::string_view socket_name = "init.sock";
constexpr std::string_view egress_mount = "/.ferry/egress.sock";
constexpr std::string_view command_line_file = "command_line";  // in the sandbox dir: its id
constexpr std::string_view key_file = "key";  // in the sandbox dir: the handshake key (hex)
constexpr std::string_view default_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

bool valid_id(std::string_view id) {
  if (id.empty() || id.size() > 64)
    return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
  });
}

std::string describe(const exit_status& s) {
  return s.signal != 0 ? fmt::format("signal {}", s.signal) : fmt::format("exit code {}", s.exit_code);
}

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
    s.pop_back();
  return s;
}

/// Writes `path` through a temporary file and rename. The temporary file is created with `perms`
/// (never wider first: the key file is 0600 from its first byte).
result<void> write_file_atomically(const fs::path& path, std::string_view content, fs::perms perms) {
  fs::path tmp = path;
  tmp += fmt::format(".tmp{}", ::getpid());
  const auto mode = static_cast<mode_t>(perms);
  unique_fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode & 0600));
  if (!fd)
    return fail(fmt::format("cannot write {}: {}", tmp.string(), std::generic_category().message(errno)));
  bool ok = ::fchmod(fd.get(), mode) == 0;
  for (size_t off = 0; ok && off < content.size();) {
    ssize_t w = ::write(fd.get(), content.data() + off, content.size() - off);
    if (w < 0 && errno == EINTR)
      continue;
    ok = w > 0;
    off += ok ? static_cast<size_t>(w) : 0;
  }
  if (!ok || ::close(fd.release()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return fail(fmt::format("cannot write {}: {}", tmp.string(), std::generic_category().message(err)));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec)
    return fail(fmt::format("cannot move {} into place: {}", path.string(), ec.message()));
  return {};
}


/// Host processes started by runsc (argv[0] runsc*) whose command line mentions `needle`.
std::vector<pid_t> runsc_processes_mentioning(const std::string& needle) {
  std::vector<pid_t> found;
  std::error_code ec;
  // Manual iteration: the error_code overloads never throw on the reader thread.
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const fs::directory_entry& e = *it;
    const std::string name = e.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    const std::string cmdline = read_small_file(e.path() / "cmdline");
    if (cmdline.empty())
      continue;  // a kernel thread or a zombie: nothing left to kill
    std::string argv0 = cmdline.substr(0, cmdline.find('\0'));
    if (fs::path(argv0).filename().string().rfind("runsc", 0) != 0)
      continue;
    if (cmdline.find(needle) != std::string::npos)
      found.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return found;
}

/// SIGKILLs runsc processes that still name `dir` until none is left. False if some survive.
bool kill_stragglers(const fs::path& dir) {
  const std::string needle = dir.string() + "/";
  const auto deadline = steady::now() + straggler_timeout;
  for (;;) {
    auto pids = runsc_processes_mentioning(needle);
    if (pids.empty())
      return true;
    if (steady::now() > deadline)
      return false;
    for (pid_t p : pids)
      ::kill(p, SIGKILL);
    std::this_thread::sleep_for(5ms);
  }
}

/// Settings shared by the runtime and its sandboxes; immutable once built.
struct runsc_context {
  std::string runsc;                   // resolved path of the binary
  std::vector<std::string> global;     // --root R --network=none ...
  fs::path state_dir;
  fs::path sandboxes_dir;
  fs::path rootfs;
  fs::path init_binary;
  std::vector<fs::path> host_binds;    // host dirs bind-mounted read-only (host-tree root only)
  uint64_t output_buffer_bytes = 0;
  std::chrono::milliseconds linger{0};
  fs::path egress_socket;              // empty: no HTTP forwarder
  uint16_t proxy_port = 0;

  std::vector<std::string> command(std::initializer_list<std::string> args) const {
    std::vector<std::string> v{runsc};
    v.insert(v.end(), global.begin(), global.end());
    v.insert(v.end(), args.begin(), args.end());
    return v;
  }

  /// `runsc delete --force id`; "does not exist" counts as success.
  result<void> delete_container(const std::string& id) const {
    auto r = run_command(command({"delete", "--force", id}), helper_timeout);
    if (!r)
      return r.error();
    if (!r->status.ok() && r->output.find("does not exist") == std::string::npos &&
        r->output.find("not found") == std::string::npos) {
      return fail(fmt::format("`runsc delete --force {}` failed ({}): {}", id, describe(r->status),
                              trimmed(r->output)));
    }
    return {};
  }
};

/// Prepares `root` as a read-only root made of the host's /usr: mount points, a minimal /etc,
/// and the merged-/usr symlinks. Host directories that are not symlinks into /usr are returned
/// for bind-mounting. Idempotent; safe to repeat while sandboxes use the tree.
result<std::vector<fs::path>> prepare_host_tree(const fs::path& root) {
  std::error_code ec;
  for (const char* d : {"usr", "proc", "tmp", "dev", "sys", "workspace", ".ferry", ".ferry/ctl", "etc"}) {
    fs::create_directories(root / d, ec);
    if (ec)
      return fail(fmt::format("cannot create {}: {}", (root / d).string(), ec.message()));
  }
  fs::permissions(root / "tmp", fs::perms::all | fs::perms::sticky_bit, ec);
  // Regular files to bind-mount ferry-init and the egress socket onto (the root is read-only
  // inside the sandbox).
  for (const char* f : {".ferry/init", ".ferry/egress.sock"}) {
    if (!fs::exists(root / f, ec)) {
      if (auto r = write_file_atomically(root / f, "", fs::perms(0755)); !r)
        return r.error();
    }
  }
  // Never the host's /etc: only what a shell and common tools need.
  const std::pair<const char*, std::string_view> etc_files[] = {
      {"etc/passwd", "root:x:0:0:root:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"},
      {"etc/group", "root:x:0:\nnogroup:x:65534:\n"},
      {"etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"},
      {"etc/hostname", "sandbox\n"},
      {"etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"},
  };
  for (const auto& [name, content] : etc_files) {
    if (read_small_file(root / name) == content)
      continue;
    if (auto r = write_file_atomically(root / name, content, fs::perms(0644)); !r)
      return r.error();
  }
  std::vector<fs::path> binds{"/usr"};
  for (const char* name : {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}) {
    const fs::path host = fs::path("/") / name;
    const fs::path mine = root / name;
    if (fs::is_symlink(host, ec)) {
      fs::path target = fs::read_symlink(host, ec);
      if (ec)
        return fail(fmt::format("cannot read symlink {}: {}", host.string(), ec.message()));
      if (fs::is_symlink(mine, ec) && fs::read_symlink(mine, ec) == target)
        continue;
      fs::remove(mine, ec);
      fs::create_symlink(target, mine, ec);
      if (ec)
        return fail(fmt::format("cannot create symlink {}: {}", mine.string(), ec.message()));
    } else if (fs::is_directory(host, ec)) {
      fs::create_directories(mine, ec);
      if (ec)
        return fail(fmt::format("cannot create {}: {}", mine.string(), ec.message()));
      binds.push_back(host);
    }
  }
  return binds;
}

nlohmann::json make_config(const runsc_context& ctx, const sandbox_spec& spec,
                           const fs::path& workspace, const fs::path& ctl) {
  using nlohmann::json;
  std::vector<std::string> args{std::string(init_path),
                                "--command-id",
                                std::to_string(spec.command_id),
                                "--listen",
                                fmt::format("{}/{}", ctl_mount, socket_name),
                                "--linger-ms",
                                std::to_string(ctx.linger.count()),
                                "--buffer-bytes",
                                std::to_string(ctx.output_buffer_bytes)};
  if (!ctx.egress_socket.empty()) {
    args.insert(args.end(), {"--proxy-socket", std::string(egress_mount), "--proxy-port", std::to_string(ctx.proxy_port)});
  }
  args.push_back("--");
  args.insert(args.end(), spec.argv.begin(), spec.argv.end());

  std::vector<std::string> env{"PATH=" + std::string(default_path), "HOME=/workspace", "TERM=dumb"};
  for (const auto& e : spec.env) {
    auto key = e.substr(0, e.find('=') + 1);
    auto same = std::find_if(env.begin(), env.end(), [&](const std::string& d) { return d.rfind(key, 0) == 0; });
    if (same != env.end())
      *same = e;
    else
      env.push_back(e);
  }

  json mounts = json::array();
  mounts.push_back({{"destination", "/proc"}, {"type", "proc"}, {"source", "proc"}});
  mounts.push_back({{"destination", "/tmp"},
                    {"type", "tmpfs"},
                    {"source", "tmpfs"},
                    {"options", {"nosuid", "nodev", "mode=1777"}}});
  // /dev and /sys are provided by runsc itself (tmpfs with the usual nodes, and sysfs).
  for (const auto& host : ctx.host_binds) {
    mounts.push_back({{"destination", host.string()},
                      {"type", "bind"},
                      {"source", host.string()},
                      {"options", {"rbind", "ro"}}});
  }
  mounts.push_back({{"destination", std::string(init_path)},
                    {"type", "bind"},
                    {"source", ctx.init_binary.string()},
                    {"options", {"bind", "ro"}}});
  // ferry-init's control socket; only ferry-init binds there (the command could too, being the
  // same uid, and with an egress socket it can connect: which is why both sides prove the
  // sandbox's key on every connection).
  mounts.push_back({{"destination", std::string(ctl_mount)},
                    {"type", "bind"},
                    {"source", ctl.string()},
                    {"options", {"rbind", "rw"}}});
  if (!ctx.egress_socket.empty()) {
    // The egress proxy's socket: the forwarder in ferry-init connects to it (--host-uds=all).
    mounts.push_back({{"destination", std::string(egress_mount)},
                      {"type", "bind"},
                      {"source", ctx.egress_socket.string()},
                      {"options", {"bind", "rw"}}});
  }
  mounts.push_back({{"destination", "/workspace"},
                    {"type", "bind"},
                    {"source", workspace.string()},
                    {"options", {"rbind", "rw"}}});

  json namespaces = json::array();
  for (const char* ns : {"pid", "ipc", "uts", "mount", "network"})
    namespaces.push_back({{"type", ns}});

  return {
      {"ociVersion", "1.0.2"},
      {"process",
       {{"terminal", false},
        {"user", {{"uid", 0}, {"gid", 0}}},
        {"args", args},
        {"env", env},
        {"cwd", "/workspace"},
        {"noNewPrivileges", true}}},
      {"root", {{"path", ctx.rootfs.string()}, {"readonly", true}}},
      {"hostname", "sandbox"},
      {"mounts", mounts},
      {"linux", {{"namespaces", namespaces}}},
  };
}

// --- host processes of a sandbox, by pidfd --------------------------------------------------

/// A host process held by a pidfd: signalling it can never hit a reused pid.
struct held_process {
  pid_t pid = 0;
  unique_fd fd;

  bool exited() const {
    pollfd p{fd.get(), POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
  }
  void sigkill() const { ::syscall(SYS_pidfd_send_signal, fd.get(), SIGKILL, nullptr, 0); }
};

std::optional<held_process> hold(pid_t pid) {
  if (pid <= 0)
    return std::nullopt;
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0)
    return std::nullopt;
  return held_process{pid, unique_fd(fd)};
}

/// Holds `pid` if it is a live runsc process of the sandbox whose bundle is `bundle` (its command
/// line names it). Checked after opening the pidfd, and the process still alive after the check:
/// then the pidfd and the checked command line are the same process.
std::optional<held_process> hold_runsc_process(pid_t pid, const std::string& bundle) {
  auto p = hold(pid);
  if (!p)
    return std::nullopt;
  const std::string cmdline = read_small_file(fs::path("/proc") / std::to_string(pid) / "cmdline");
  const std::string argv0 = cmdline.substr(0, cmdline.find('\0'));
  if (fs::path(argv0).filename().string().rfind("runsc", 0) != 0 ||
      cmdline.find(bundle) == std::string::npos || p->exited())
    return std::nullopt;
  return p;
}

/// Parent pid from /proc/<pid>/stat; 0 if gone.
pid_t parent_of(pid_t pid) {
  const std::string stat = read_small_file(fs::path("/proc") / std::to_string(pid) / "stat");
  auto paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 4 >= stat.size())
    return 0;
  // ") S <ppid> ..."
  return static_cast<pid_t>(std::strtol(stat.c_str() + paren + 4, nullptr, 10));
}

/// Adds every live descendant of procs[0] (the Sentry's ptrace stubs) to `procs`, from the
/// children lists of each process's threads. Each is checked to still be a child of its (live)
/// parent after its pidfd was opened, so a pid reused meanwhile is never taken.
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

/// SIGKILLs every process and waits until all have exited. False if some survive `timeout`.
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

/// Waits until every process has exited by itself. False if some still run after `timeout`.
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

/// The Sentry's and gofer's pids from runsc's state file (`<root>/<id>_sandbox:<id>.state`, a
/// runsc-internal JSON document: `sandbox.pid`, `goferPid`).
struct runsc_pids {
  pid_t sandbox = 0;
  pid_t gofer = 0;
};

std::optional<runsc_pids> read_runsc_state(const fs::path& state_dir, const std::string& id) {
  const std::string text = read_small_file(state_dir / fmt::format("{}_sandbox:{}.state", id, id));
  if (text.empty())
    return std::nullopt;
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return std::nullopt;
  runsc_pids p;
  if (auto s = j.find("sandbox"); s != j.end() && s->is_object()) {
    if (auto pid = s->find("pid"); pid != s->end() && pid->is_number_integer())
      p.sandbox = pid->get<pid_t>();
  }
  if (auto g = j.find("goferPid"); g != j.end() && g->is_number_integer())
    p.gofer = g->get<pid_t>();
  if (p.sandbox <= 0)
    return std::nullopt;
  return p;
}

/// The Sentry (first) and the gofer of sandbox `id`, held; empty if its Sentry is not alive.
std::vector<held_process> hold_sandbox_processes(const runsc_context& ctx, const std::string& id) {
  std::vector<held_process> procs;
  auto pids = read_runsc_state(ctx.state_dir, id);
  if (!pids)
    return procs;
  const std::string bundle = (ctx.sandboxes_dir / id / "bundle").string();
  auto sentry = hold_runsc_process(pids->sandbox, bundle);
  if (!sentry)
    return procs;
  procs.push_back(std::move(*sentry));
  if (auto gofer = hold_runsc_process(pids->gofer, bundle))
    procs.push_back(std::move(*gofer));
  return procs;
}

/// Kills the held processes of a sandbox and the Sentry's descendants (procs[0] is the Sentry).
bool kill_sandbox_processes(std::vector<held_process>& procs) {
  hold_descendants(procs);
  return kill_and_wait(procs, straggler_timeout);
}

/// Connects to ferry-init's control socket. errc::not_found when nothing listens there.
result<unique_fd> connect_control(const fs::path& socket_path) {
  unique_fd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock)
    return fail(fmt::format("socket: {}", std::generic_category().message(errno)));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string path = socket_path.string();
  unique_fd dir;
  if (path.size() >= sizeof addr.sun_path) {
    // Too long for sun_path: go through the directory's fd.
    dir.reset(::open(socket_path.parent_path().c_str(), O_PATH | O_CLOEXEC));
    if (!dir)
      return error_info{fmt::format("cannot open {}: {}", socket_path.parent_path().string(),
                                    std::generic_category().message(errno)),
                        errc::not_found};
    path = fmt::format("/proc/self/fd/{}/{}", dir.get(), socket_path.filename().string());
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  int r;
  do {
    r = ::connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  } while (r != 0 && errno == EINTR);
  if (r != 0) {
    const int err = errno;
    return error_info{fmt::format("cannot connect to {}: {}", socket_path.string(),
                                  std::generic_category().message(err)),
                      err == ENOENT || err == ECONNREFUSED ? errc::not_found : errc::failed};
  }
  return sock;
}

/// Last `n` bytes of a file (runsc.log), trimmed.
std::string file_tail(const fs::path& path, size_t n) {
  std::string s = read_small_file(path);
  return trimmed(s.size() > n ? s.substr(s.size() - n) : s);
}

/// Sandbox ids held by sandbox objects of one runtime (started or attached, not yet ended or
/// released): list_live and cleanup_orphans leave them alone, attach refuses them.
class holder_registry {
 public:
  bool try_hold(const std::string& id) {
    std::lock_guard lock(mu_);
    return ids_.insert(id).second;
  }
  void release(const std::string& id) {
    std::lock_guard lock(mu_);
    ids_.erase(id);
  }
  bool held(const std::string& id) const {
    std::lock_guard lock(mu_);
    return ids_.count(id) > 0;
  }

 private:
  mutable std::mutex mu_;
  std::set<std::string> ids_;
};

// ---------------------------------------------------------------------------------------------

class runsc_sandbox final : public sandbox {
 public:
  /// `from`: the resume points (none for a new sandbox); `command_line_id`: the command line's id
  /// if the sandbox has one (it then ends once that has exited).
  runsc_sandbox(std::shared_ptr<const runsc_context> ctx, std::shared_ptr<holder_registry> registry,
                std::string id, const wire::handshake_key& key, std::span<const resume_point> from,
                std::optional<uint32_t> command_line_id, sandbox_observer& observer)
      : ctx_(std::move(ctx)),
        registry_(std::move(registry)),
        id_(std::move(id)),
        dir_(ctx_->sandboxes_dir / id_),
        key_(key),
        observer_(observer),
        has_command_line_(command_line_id.has_value()),
        client_(observer, from, command_line_id) {}

  /// start(): launches the container and talks to it on the reader thread.
  void begin_new() {
    reader_ = std::thread([this] { run_new(); });
  }

  /// attach(): takes the sandbox's processes and a connected socket, and does the handshake
  /// here (synchronously, so a refusal is attach()'s error and never kills the sandbox).
  result<void> adopt(std::vector<held_process> procs, unique_fd sock) {
    {
      std::lock_guard lock(kill_mu_);
      procs_ = std::move(procs);
      procs_known_ = true;
      sock_ = std::move(sock);
    }
    return client_.handshake(sock_.get(), key_, handshake_timeout);
  }
  /// After a failed adopt(): the peer on the socket could not prove the key.
  bool impostor() const { return client_.peer_failed_authentication(); }
  void begin_attached() {
    reader_ = std::thread([this] { run_attached(); });
  }
  /// A failed adopt(): let go without killing or reporting anything (the id stays held by
  /// attach(), which releases it).
  void abandon() {
    detached_ = true;
    close_socket();
  }

  // REQUIRES: not called from this sandbox's observer (it joins the reader thread).
  ~runsc_sandbox() override {
    assert(std::this_thread::get_id() != reader_.get_id());
    if (!detached_)
      kill();
    if (reader_.joinable())
      reader_.join();
  }

  const std::string& id() const override { return id_; }

  result<void> run(const command_spec& spec) override { return client_.run(spec); }
  result<void> signal(uint32_t command_id, int signo, bool whole_group) override {
    return client_.signal(command_id, signo, whole_group);
  }
  result<void> write_stdin(uint32_t command_id, std::string_view data, bool close) override {
    return client_.write_stdin(command_id, data, close);
  }
  result<void> release() override { return client_.release(); }
  result<file_text> read_file(const std::string& path, const read_options& o) override {
    return client_.read_file(path, o);
  }
  result<file_written> write_file(const std::string& path, std::string_view content, uint32_t mode) override {
    return client_.write_file(path, content, mode);
  }
  result<file_edited> edit_file(const std::string& path, std::string_view old_string, std::string_view new_string,
                                bool replace_all) override {
    return client_.edit_file(path, old_string, new_string, replace_all);
  }
  result<dir_listing> list_dir(const std::string& path, uint32_t max_entries) override {
    return client_.list_dir(path, max_entries);
  }
  result<glob_matches> glob(const std::string& pattern, const glob_options& o) override {
    return client_.glob(pattern, o);
  }
  result<grep_matches> grep(const std::string& pattern, const grep_options& o) override {
    return client_.grep(pattern, o);
  }

  void kill() override {
    {
      std::lock_guard lock(kill_mu_);
      if (detached_ || reader_done_)
        return;
    }
    killed_by_owner_ = true;
    const bool gone = kill_processes();
    shutdown_socket();
    if (!gone) {
      // Still launching (the processes are not known yet): the reader kills them as soon as
      // they are; wait for that, bounded.
      std::unique_lock lock(kill_mu_);
      gone_cv_.wait_for(lock, launch_timeout + straggler_timeout,
                        [&] { return gone_at_.has_value() || reader_done_; });
    }
  }

  void detach() override {
    {
      std::lock_guard lock(kill_mu_);
      if (reader_done_)
        return;
      detached_ = true;
      if (sock_)
        ::shutdown(sock_.get(), SHUT_RDWR);
    }
    client_.close();
    std::unique_lock lock(kill_mu_);
    gone_cv_.wait(lock, [&] { return reader_done_; });
  }

  void wait() override {
    std::unique_lock lock(kill_mu_);
    gone_cv_.wait(lock, [&] { return reader_done_; });
  }

 private:
  enum class phase { launching, starting, running };

  // --- killing (any thread) ---

  /// Kills every host process of the sandbox and waits until they are gone; records when.
  /// Before the processes are known (launching) it only returns false. Idempotent; thread-safe.
  bool kill_processes() {
    std::lock_guard lock(kill_mu_);
    if (gone_at_)
      return true;
    if (!procs_known_)
      return false;
    bool gone;
    if (!procs_.empty()) {
      gone = kill_sandbox_processes(procs_);
    } else {
      // No pidfds (no state file, no pidfd_open): the slow way.
      (void)run_command(ctx_->command({"kill", "--all", id_, "KILL"}), helper_timeout);
      gone = kill_stragglers(dir_);
    }
    if (gone)
      gone_at_ = steady::now();
    gone_cv_.notify_all();
    return gone;
  }

  void shutdown_socket() {
    std::lock_guard lock(kill_mu_);
    if (sock_)
      ::shutdown(sock_.get(), SHUT_RDWR);
  }
  void close_socket() {
    std::lock_guard lock(kill_mu_);
    sock_.reset();
  }
  bool stop_requested() const { return killed_by_owner_ || detached_; }

  // --- reader thread ---

  void run_new() {
    if (auto r = launch(); !r) {
      launch_failure_ = r.error().message;
    } else if (!stop_requested()) {
      if (auto c = connect_new(); !c) {
        if (!stop_requested())
          launch_failure_ = c.error().message;
      } else if (auto h = client_.handshake(sock_.get(), key_, handshake_timeout);
                 !h && !stop_requested()) {
        handshake_error_ = h.error().message;
      }
    }
    if (!launch_failure_ && !handshake_error_ && !stop_requested())
      serve();
    finish();
  }

  void run_attached() {
    serve();
    finish();
  }

  void serve() {
    phase_ = phase::running;
    client_.serve(sock_.get(), [this] { return stop_requested(); });
  }

  /// `runsc run --detach` in a session of its own, its stdout and stderr (and so ferry-init's) to
  /// runsc.log. Its stdin is a pipe holding the key, then end of file: runsc gives its stdin to
  /// the container's init process (verified with this runsc: the container's fd 0 is the host
  /// pipe, "host:[1]"), and ferry-init reads it to the end and replaces it with /dev/null
  /// before any command runs.
  result<void> launch() {
    spawn_options o;
    o.argv = ctx_->command({"run", "--detach", "--bundle", (dir_ / "bundle").string(), id_});
    o.in = stdio::bytes;
    o.in_bytes = wire::key_to_hex(key_);
    o.out = stdio::file;
    o.err = stdio::file;
    o.file = dir_ / "runsc.log";
    o.new_session = true;
    auto runsc = child_process::spawn(o);
    if (!runsc)
      return runsc.error();
    auto status = runsc->wait_for(launch_timeout);
    if (!status) {
      runsc->signal_group(SIGKILL);
      runsc->wait();
    }
    // Whatever runsc left (a container, half or fully started) is ours to kill from here on.
    std::vector<held_process> procs = hold_sandbox_processes(*ctx_, id_);
    {
      std::lock_guard lock(kill_mu_);
      procs_ = std::move(procs);
      procs_known_ = true;
    }
    if (killed_by_owner_)
      kill_processes();
    if (!status)
      return fail(fmt::format("`runsc run` did not finish within {} s", launch_timeout.count()));
    if (!status->ok())
      return fail(fmt::format("runsc: {}", describe(*status)));
    return {};
  }

  /// Waits for ferry-init to listen and connects, while the Sentry lives.
  result<void> connect_new() {
    phase_ = phase::starting;
    const auto deadline = steady::now() + listen_timeout;
    for (;;) {
      if (stop_requested())
        return fail("stopped");
      auto sock = connect_control(dir_ / "ctl" / std::string(socket_name));
      if (sock) {
        std::lock_guard lock(kill_mu_);
        sock_ = std::move(*sock);
        if (stop_requested())
          ::shutdown(sock_.get(), SHUT_RDWR);
        return {};
      }
      if (sock.error().code != errc::not_found)
        return sock.error();
      {
        std::lock_guard lock(kill_mu_);
        if (!procs_.empty() && procs_[0].exited())
          return fail("the sandbox exited before ferry-init listened");
      }
      if (steady::now() > deadline)
        return fail(fmt::format("ferry-init did not listen on its socket within {} s", listen_timeout.count()));
      std::this_thread::sleep_for(2ms);
    }
  }

  /// After the reader loop: let go (detached), or tear down and report.
  void finish() {
    client_.close();
    if (detached_) {
      close_socket();
      registry_->release(id_);
      std::lock_guard lock(kill_mu_);
      reader_done_ = true;
      gone_cv_.notify_all();
      return;
    }
    // Processes: after Release they exit by themselves; otherwise (a protocol error, ferry-init's
    // Error, a sandbox that ended on its own, kill()), or if they linger, they are killed.
    const bool self_ending = client_.release_sent() && !client_.protocol_error() && !client_.init_error();
    if (self_ending) {
      // Wait on duplicates of the pidfds, so kill() is not blocked meanwhile.
      std::vector<held_process> watched;
      {
        std::lock_guard lock(kill_mu_);
        if (!gone_at_) {
          hold_descendants(procs_);
          for (const auto& p : procs_)
            watched.push_back(held_process{p.pid, unique_fd(::fcntl(p.fd.get(), F_DUPFD_CLOEXEC, 0))});
        }
      }
      if (!watched.empty() &&
          std::all_of(watched.begin(), watched.end(), [](const held_process& p) { return bool(p.fd); }) &&
          wait_exited(watched, exit_grace)) {
        std::lock_guard lock(kill_mu_);
        if (!gone_at_)
          gone_at_ = steady::now();
      }
    }
    {
      std::lock_guard lock(kill_mu_);
      procs_known_ = true;  // a launch that failed before holding anything: the slow way
    }
    kill_processes();
    std::optional<steady::time_point> gone_at;
    {
      std::lock_guard lock(kill_mu_);
      gone_at = gone_at_;
    }
    close_socket();
    if (gone_at)
      observer_.on_processes_gone(*gone_at);

    std::string cleanup_error;
    const std::string log = file_tail(dir_ / "runsc.log", log_tail_bytes);
    if (!gone_at)
      cleanup_error = fmt::format("processes of sandbox {} survived SIGKILL", id_);
    if (auto r = ctx_->delete_container(id_); !r && cleanup_error.empty())
      cleanup_error = r.error().message;
    if (!kill_stragglers(dir_) && cleanup_error.empty())
      cleanup_error = fmt::format("runsc processes of {} survived SIGKILL", dir_.string());
    std::error_code ec;
    fs::remove_all(dir_, ec);
    if (ec && cleanup_error.empty())
      cleanup_error = fmt::format("cannot remove {}: {}", dir_.string(), ec.message());
    registry_->release(id_);

    observer_.on_ended(failure_reason(cleanup_error, log));
    std::lock_guard lock(kill_mu_);
    reader_done_ = true;
    gone_cv_.notify_all();
  }

  std::optional<std::string> failure_reason(const std::string& cleanup_error, const std::string& log) const {
    if (client_.protocol_error())
      return "protocol error: " + *client_.protocol_error();
    if (handshake_error_)
      return "protocol error: " + *handshake_error_;
    if (client_.init_error())
      return "ferry-init: " + *client_.init_error();
    if (!client_.release_sent()) {
      if (killed_by_owner_)
        return std::string("killed");
      if (launch_failure_ || phase_ == phase::launching || phase_ == phase::starting)
        return fmt::format("sandbox failed to start ({}): {}", launch_failure_.value_or("runsc"), log);
      if (has_command_line_ && !client_.command_line_exited())
        return fmt::format("sandbox ended before the command did: {}", log);
      return fmt::format("sandbox ended before it was released: {}", log);
    }
    if (!cleanup_error.empty())
      return "cleanup failed: " + cleanup_error;
    return std::nullopt;
  }

  const std::shared_ptr<const runsc_context> ctx_;
  const std::shared_ptr<holder_registry> registry_;
  const std::string id_;
  const fs::path dir_;
  const wire::handshake_key key_;
  sandbox_observer& observer_;
  const bool has_command_line_;
  detail::init_client client_;

  // Reader-thread state (and attach()'s, before the reader starts).
  phase phase_ = phase::launching;
  std::optional<std::string> launch_failure_;
  std::optional<std::string> handshake_error_;

  std::atomic<bool> killed_by_owner_{false};
  std::atomic<bool> detached_{false};
  std::mutex kill_mu_;
  std::condition_variable gone_cv_;
  std::vector<held_process> procs_;  // REQUIRES: kill_mu_. Sentry first, then gofer, stubs
  bool procs_known_ = false;         // REQUIRES: kill_mu_. launch (or adopt) is done
  std::optional<steady::time_point> gone_at_;  // REQUIRES: kill_mu_
  unique_fd sock_;  // REQUIRES: kill_mu_ to set, reset or shut down; the reader reads it freely
  bool reader_done_ = false;  // REQUIRES: kill_mu_. on_ended delivered, or released

  std::thread reader_;
};

// ---------------------------------------------------------------------------------------------

class runsc_runtime final : public sandbox_runtime {
 public:
  explicit runsc_runtime(std::shared_ptr<const runsc_context> ctx) : ctx_(std::move(ctx)) {}

  std::string_view name() const override { return "runsc"; }

  result<std::unique_ptr<sandbox>> start(const sandbox_spec& spec, sandbox_observer& observer) override {
    if (!valid_id(spec.id)) {
      return fail(fmt::format("invalid sandbox id `{}`: use 1 to 64 letters, digits, '-' or '_'",
                              spec.id.substr(0, 80)));
    }
    if (!spec.argv.empty() && spec.command_id == 0)
      return fail(fmt::format("sandbox {}: command id 0 is reserved", spec.id));
    for (const auto& e : spec.env) {
      if (e.find('=') == std::string::npos || e.front() == '=')
        return fail(fmt::format("sandbox {}: environment entry `{}` is not K=V", spec.id, e));
    }

    const fs::path dir = ctx_->sandboxes_dir / spec.id;
    // Held first, so that cleanup_orphans never takes the directory for a leftover.
    if (!registry_->try_hold(spec.id))
      return error_info{fmt::format("sandbox {} already exists (held by this runtime)", spec.id), errc::conflict};
    std::error_code ec;
    // Creating the directory claims the id; it exists until the sandbox has ended.
    if (!fs::create_directory(dir, ec)) {
      registry_->release(spec.id);
      if (ec)
        return fail(fmt::format("sandbox {}: cannot create {}: {}", spec.id, dir.string(), ec.message()));
      return error_info{fmt::format("sandbox {} already exists ({} is present)", spec.id, dir.string()),
                        errc::conflict};
    }
    if (auto r = prepare(spec, dir); !r) {
      fs::remove_all(dir, ec);
      registry_->release(spec.id);
      return r.error();
    }
    std::optional<uint32_t> command_line;
    if (!spec.argv.empty())
      command_line = spec.command_id;
    auto key = read_key(dir);
    if (!key) {
      fs::remove_all(dir, ec);
      registry_->release(spec.id);
      return key.error();
    }
    auto sb = std::make_unique<runsc_sandbox>(ctx_, registry_, spec.id, *key, std::span<const resume_point>(),
                                              command_line, observer);
    sb->begin_new();
    return std::unique_ptr<sandbox>(std::move(sb));
  }

  using sandbox_runtime::attach;
  result<std::unique_ptr<sandbox>> attach(const std::string& id, std::span<const resume_point> from,
                                          sandbox_observer& observer) override {
    if (!valid_id(id))
      return error_info{fmt::format("invalid sandbox id `{}`", id.substr(0, 80)), errc::invalid_argument};
    const fs::path dir = ctx_->sandboxes_dir / id;
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
      return error_info{fmt::format("sandbox {}: no such sandbox ({} is absent)", id, dir.string()), errc::not_found};
    if (!registry_->try_hold(id))
      return error_info{fmt::format("sandbox {} is held by this runtime", id), errc::busy};
    // A host that has just let go (detach, or a crash) may not have been noticed yet by
    // ferry-init, which refuses a second host: retry a busy refusal for a moment.
    const auto deadline = steady::now() + busy_retry;
    for (;;) {
      auto sb = try_attach(id, dir, from, observer);
      if (sb || sb.error().code != errc::busy || steady::now() > deadline) {
        if (!sb)
          registry_->release(id);
        return sb;
      }
      std::this_thread::sleep_for(20ms);
    }
  }

  result<std::vector<std::string>> list_live() override {
    auto dirs = leftover_dirs();
    if (!dirs)
      return dirs.error();
    std::vector<std::string> live;
    for (const auto& dir : *dirs) {
      const std::string id = dir.filename().string();
      std::error_code ec;
      if (!hold_sandbox_processes(*ctx_, id).empty() &&
          fs::exists(dir / "ctl" / std::string(socket_name), ec))
        live.push_back(id);
    }
    std::sort(live.begin(), live.end());
    return live;
  }

  result<size_t> cleanup_orphans(const std::set<std::string>& keep) override {
    auto dirs = leftover_dirs();
    if (!dirs)
      return dirs.error();
    size_t cleaned = 0;
    for (const auto& dir : *dirs) {
      const std::string id = dir.filename().string();
      if (keep.count(id) > 0 || !registry_->try_hold(id))
        continue;
      auto r = remove_orphan(id, dir);
      registry_->release(id);
      if (!r)
        return r.error();
      ++cleaned;
    }
    return cleaned;
  }

 private:
  // REQUIRES: `id` held in registry_ by the caller (released by the caller on failure).
  result<std::unique_ptr<sandbox>> try_attach(const std::string& id, const fs::path& dir,
                                              std::span<const resume_point> from, sandbox_observer& observer) {
    auto procs = hold_sandbox_processes(*ctx_, id);
    if (procs.empty())
      return error_info{fmt::format("sandbox {} is gone (its Sentry is not running)", id), errc::not_found};
    auto key = read_key(dir);
    if (!key)
      return error_info{fmt::format("sandbox {}: {}", id, key.error().message), errc::failed};
    auto sock = connect_control(dir / "ctl" / std::string(socket_name));
    if (!sock)
      return error_info{fmt::format("sandbox {}: {}", id, sock.error().message), sock.error().code};
    // The command line's id, recorded at start (the sandbox ends once it has exited).
    std::optional<uint32_t> command_line;
    const std::string recorded = read_small_file(dir / std::string(command_line_file));
    if (!recorded.empty())
      command_line = static_cast<uint32_t>(std::strtoul(recorded.c_str(), nullptr, 10));
    auto sb = std::make_unique<runsc_sandbox>(ctx_, registry_, id, *key, from, command_line, observer);
    if (auto r = sb->adopt(std::move(procs), std::move(*sock)); !r) {
      sb->abandon();
      if (sb->impostor()) {
        // Something in the sandbox replaced ferry-init on the control socket: nothing it says
        // can be trusted, and the sandbox is no longer ours to run commands in.
        sb.reset();
        auto removed = remove_orphan(id, dir);
        return error_info{fmt::format("attaching to sandbox {}: {}; the sandbox was killed as compromised{}", id,
                                      r.error().message,
                                      removed ? "" : " (cleanup: " + removed.error().message + ")"),
                          errc::failed};
      }
      return error_info{fmt::format("attaching to sandbox {}: {}", id, r.error().message), r.error().code};
    }
    sb->begin_attached();
    return std::unique_ptr<sandbox>(std::move(sb));
  }

  /// Sandbox directories not held by this runtime.
  result<std::vector<fs::path>> leftover_dirs() const {
    std::error_code ec;
    std::vector<fs::path> dirs;
    for (fs::directory_iterator it(ctx_->sandboxes_dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      const std::string id = it->path().filename().string();
      if (it->is_directory(type_ec) && valid_id(id) && !registry_->held(id))
        dirs.push_back(it->path());
    }
    if (ec)
      return fail(fmt::format("cannot list {}: {}", ctx_->sandboxes_dir.string(), ec.message()));
    return dirs;
  }

  result<void> remove_orphan(const std::string& id, const fs::path& dir) const {
    auto procs = hold_sandbox_processes(*ctx_, id);
    if (!procs.empty()) {
      if (!kill_sandbox_processes(procs))
        return fail(fmt::format("cleaning up orphan sandbox {}: its processes survived SIGKILL", id));
    } else {
      // No state to go by (or its Sentry is gone): whatever runsc still has of it.
      (void)run_command(ctx_->command({"kill", "--all", id, "KILL"}), helper_timeout);
    }
    if (!kill_stragglers(dir))
      return fail(fmt::format("cleaning up orphan sandbox {}: its runsc processes survived SIGKILL", id));
    if (auto r = ctx_->delete_container(id); !r)
      return fail(fmt::format("cleaning up orphan sandbox {}: {}", id, r.error().message));
    std::error_code ec;
    fs::remove_all(dir, ec);
    if (ec)
      return fail(fmt::format("cleaning up orphan sandbox {}: cannot remove {}: {}", id, dir.string(), ec.message()));
    return {};
  }

  /// The sandbox's handshake key, from `<dir>/key`.
  static result<wire::handshake_key> read_key(const fs::path& dir) {
    const fs::path path = dir / std::string(key_file);
    auto key = wire::key_from_hex(read_small_file(path));
    if (!key)
      return fail(fmt::format("{} is missing or not a key (a sandbox of an older ferryd?)", path.string()));
    return *key;
  }

  /// Bundle, workspace, control directory and key of a new sandbox.
  result<void> prepare(const sandbox_spec& spec, const fs::path& dir) const {
    std::error_code ec;
    const fs::path bundle = dir / "bundle";
    const fs::path workspace = dir / "workspace";
    const fs::path ctl = dir / "ctl";
    for (const auto& d : {bundle, workspace, ctl}) {
      if (!ec)
        fs::create_directory(d, ec);
    }
    if (!ec)
      fs::permissions(workspace, fs::perms(0755), ec);
    if (!ec)
      fs::permissions(ctl, fs::perms(0700), ec);
    if (ec)
      return fail(fmt::format("sandbox {}: cannot create its directories under {}: {}", spec.id, dir.string(), ec.message()));
    std::string config;
    try {
      config = make_config(*ctx_, spec, workspace, ctl).dump(2);
    } catch (const nlohmann::json::exception&) {
      return fail(fmt::format("sandbox {}: argv and env must be valid UTF-8 (they go into the OCI "
                              "config.json)", spec.id));
    }
    if (auto r = write_file_atomically(bundle / "config.json", config, fs::perms(0644)); !r)
      return fail(fmt::format("sandbox {}: {}", spec.id, r.error().message));
    wire::handshake_key key{};
    if (!wire::random_bytes(key))
      return fail(fmt::format("sandbox {}: cannot draw its key (RAND_bytes failed)", spec.id));
    // 0600, in the sandbox directory, which the sandbox does not see (it sees only workspace/,
    // ctl/ and the root).
    if (auto r = write_file_atomically(dir / std::string(key_file), wire::key_to_hex(key), fs::perms(0600)); !r)
      return fail(fmt::format("sandbox {}: {}", spec.id, r.error().message));
    if (!spec.argv.empty()) {
      if (auto r = write_file_atomically(dir / std::string(command_line_file), std::to_string(spec.command_id),
                                         fs::perms(0644));
          !r)
        return fail(fmt::format("sandbox {}: {}", spec.id, r.error().message));
    }
    return {};
  }

  const std::shared_ptr<const runsc_context> ctx_;
  const std::shared_ptr<holder_registry> registry_ = std::make_shared<holder_registry>();
};

}  // namespace

result<std::unique_ptr<sandbox_runtime>> make_runsc_runtime(runsc_options opts) {
  if (opts.state_dir.empty() || opts.sandboxes_dir.empty())
    return fail("runsc runtime: state_dir and sandboxes_dir must be set");
  auto ctx = std::make_shared<runsc_context>();
  auto runsc = find_program(opts.runsc);
  if (!runsc)
    return fail(fmt::format("runsc runtime: `{}` not found or not executable (is gVisor installed?)", opts.runsc));
  ctx->runsc = *runsc;

  std::error_code ec;
  if (opts.init_binary.empty() || !fs::is_regular_file(opts.init_binary, ec))
    return fail(fmt::format("runsc runtime: ferry-init binary `{}` does not exist", opts.init_binary.string()));
  ctx->init_binary = clean_path(opts.init_binary);
  ctx->state_dir = clean_path(opts.state_dir);
  ctx->sandboxes_dir = clean_path(opts.sandboxes_dir);
  for (const auto& d : {ctx->state_dir, ctx->sandboxes_dir}) {
    fs::create_directories(d, ec);
    if (ec)
      return fail(fmt::format("runsc runtime: cannot create {}: {}", d.string(), ec.message()));
  }

  if (opts.rootfs.empty()) {
    ctx->rootfs = ctx->sandboxes_dir.parent_path() / "rootfs-host";
    auto binds = prepare_host_tree(ctx->rootfs);
    if (!binds)
      return fail("runsc runtime: preparing the host-tree root: " + binds.error().message);
    ctx->host_binds = std::move(*binds);
  } else {
    ctx->rootfs = clean_path(opts.rootfs);
    if (!fs::is_directory(ctx->rootfs, ec))
      return fail(fmt::format("runsc runtime: root filesystem {} is not a directory", ctx->rootfs.string()));
  }

  if (opts.output_buffer_bytes < wire::max_output_chunk)
    return fail(fmt::format("runsc runtime: output_buffer_bytes {} is below the minimum of {}",
                            opts.output_buffer_bytes, wire::max_output_chunk));
  if (opts.linger.count() <= 0)
    return fail("runsc runtime: linger must be positive");
  ctx->output_buffer_bytes = opts.output_buffer_bytes;
  ctx->linger = opts.linger;
  if (!opts.egress_socket.empty()) {
    ctx->egress_socket = clean_path(opts.egress_socket);
    ctx->proxy_port = opts.proxy_port;
    if (opts.proxy_port == 0)
      return fail("runsc runtime: proxy_port must not be 0");
  }

  // --host-uds=create: ferry-init's listening socket in ctl/ is a real host socket (sandbox
  // processes may create host sockets in their rw bind mounts, but never connect to one).
  // With an egress socket: =all, so ferry-init's forwarder can connect to it — and so can the
  // commands to the control socket, where without the key they get nothing (README: why
  // --host-uds=all is safe with the handshake).
  ctx->global = {"--root", ctx->state_dir.string(), "--network=none",
                 ctx->egress_socket.empty() ? "--host-uds=create" : "--host-uds=all"};
  if (opts.ignore_cgroups)
    ctx->global.emplace_back("--ignore-cgroups");
  ctx->global.insert(ctx->global.end(), opts.extra_flags.begin(), opts.extra_flags.end());
  return std::unique_ptr<sandbox_runtime>(std::make_unique<runsc_runtime>(std::move(ctx)));
}

}  // namespace ferry::sandbox
