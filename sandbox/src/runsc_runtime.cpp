// The gVisor backend of sandbox_runtime (see ferry/sandbox/sandbox.h and ../README.md).
//
// One sandbox = one `runsc run` child in its own process group, whose stdout carries
// ferry-init's frames and whose stderr carries runsc's (and ferry-init's) diagnostics. Its files
// live in `sandboxes_dir/<id>/` (bundle/config.json + workspace/); creating that directory claims
// the id, removing it is the last step before on_ended.
//
// Lifecycle of a sandbox, driven by its reader thread:
//   starting --Hello--> running --Started--> command_started --Exited--> command_exited
//   any state --Error / bad frame / runsc exits--> (teardown)
// Teardown (always, exactly once): reap runsc, `runsc delete --force`, kill any runsc process
// still naming the sandbox directory, remove the directory, then on_ended.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/frame.h"

namespace ferry::sandbox {
namespace {

namespace fs = std::filesystem;
namespace v1 = ferry::init::v1;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

constexpr auto helper_timeout = 10s;        // runsc delete / runsc kill
constexpr auto straggler_timeout = 2s;      // for processes to vanish after SIGKILL
constexpr auto lingering_pipe_grace = 2s;   // runsc exited but something holds its pipes
constexpr size_t stderr_tail_bytes = 4096;  // kept for failure reasons
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

/// Absolute, normalised, without a trailing separator.
fs::path clean_path(const fs::path& p) {
  std::error_code ec;
  fs::path a = fs::absolute(p, ec).lexically_normal();
  if (!a.has_filename() && a.has_parent_path() && a != a.root_path())
    a = a.parent_path();
  return a;
}

/// Finds `name` in PATH unless it already names a file.
std::optional<std::string> find_program(const std::string& name) {
  if (name.find('/') != std::string::npos)
    return ::access(name.c_str(), X_OK) == 0 ? std::optional(clean_path(name).string()) : std::nullopt;
  const char* path = std::getenv("PATH");
  std::string_view rest = path ? path : "/usr/bin:/bin";
  while (!rest.empty()) {
    auto colon = rest.find(':');
    std::string dir(rest.substr(0, colon));
    rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0)
      return candidate;
  }
  return std::nullopt;
}

result<void> write_file_atomically(const fs::path& path, std::string_view content, fs::perms perms) {
  fs::path tmp = path;
  tmp += fmt::format(".tmp{}", ::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(content.data(), static_cast<std::streamsize>(content.size()));
    if (!f)
      return fail(fmt::format("cannot write {}", tmp.string()));
  }
  std::error_code ec;
  fs::permissions(tmp, perms, ec);
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
  for (const char* d : {"usr", "proc", "tmp", "dev", "sys", "workspace", ".ferry", "etc"}) {
    fs::create_directories(root / d, ec);
    if (ec)
      return fail(fmt::format("cannot create {}: {}", (root / d).string(), ec.message()));
  }
  fs::permissions(root / "tmp", fs::perms::all | fs::perms::sticky_bit, ec);
  // A regular file to bind-mount ferry-init onto (the root is read-only inside the sandbox).
  if (!fs::exists(root / ".ferry/init", ec)) {
    if (auto r = write_file_atomically(root / ".ferry/init", "", fs::perms(0755)); !r)
      return r.error();
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
                           const fs::path& workspace) {
  using nlohmann::json;
  std::vector<std::string> args{"/.ferry/init", "--command-id", std::to_string(spec.command_id), "--"};
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
  mounts.push_back({{"destination", "/.ferry/init"},
                    {"type", "bind"},
                    {"source", ctx.init_binary.string()},
                    {"options", {"bind", "ro"}}});
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

// ---------------------------------------------------------------------------------------------

class runsc_sandbox final : public sandbox {
 public:
  runsc_sandbox(std::shared_ptr<const runsc_context> ctx, const sandbox_spec& spec, fs::path dir,
                child_process runsc, sandbox_observer& observer)
      : ctx_(std::move(ctx)),
        id_(spec.id),
        command_id_(spec.command_id),
        dir_(std::move(dir)),
        runsc_(std::move(runsc)),
        observer_(observer) {}

  /// Starts the reader thread; called once, right after construction.
  void begin() { reader_ = std::thread([this] { run(); }); }

  // REQUIRES: not called from this sandbox's observer (it joins the reader thread).
  ~runsc_sandbox() override {
    assert(std::this_thread::get_id() != reader_.get_id());
    kill();
    if (reader_.joinable())
      reader_.join();
  }

  const std::string& id() const override { return id_; }

  void kill() override {
    killed_by_owner_ = true;
    kill_container();
  }

  void wait() override {
    std::unique_lock lock(mu_);
    ended_cv_.wait(lock, [&] { return ended_; });
  }

 private:
  enum class phase { starting, running, command_started, command_exited, init_failed };

  /// Kills every process of the container: `runsc kill --all`, or, if runsc cannot (the
  /// container does not exist yet), SIGKILL to runsc's process group — the sandbox process runs
  /// "attached" and dies with runsc. Idempotent; thread-safe.
  void kill_container() {
    std::lock_guard lock(kill_mu_);
    if (kill_sent_ || runsc_reaped_)
      return;
    kill_sent_ = true;
    auto r = run_command(ctx_->command({"kill", "--all", id_, "KILL"}), helper_timeout);
    if (!r || !r->status.ok())
      runsc_.signal_group(SIGKILL);
  }

  // Reader thread.
  void run() {
    read_until_eof();
    // runsc has closed its pipes; it is exiting (or already gone).
    auto status = runsc_.wait_for(5s);
    if (!status) {
      runsc_.signal_group(SIGKILL);
      status = runsc_.wait();
    }
    {
      std::lock_guard lock(kill_mu_);
      runsc_reaped_ = true;
    }
    if (!protocol_error_ && decoder_.pending() > 0)
      protocol_error_ = fmt::format("stream ended inside a frame ({} bytes pending)", decoder_.pending());

    std::string cleanup_error;
    if (auto r = ctx_->delete_container(id_); !r)
      cleanup_error = r.error().message;
    if (!kill_stragglers(dir_) && cleanup_error.empty())
      cleanup_error = fmt::format("runsc processes of {} survived SIGKILL", dir_.string());
    std::error_code ec;
    fs::remove_all(dir_, ec);
    if (ec && cleanup_error.empty())
      cleanup_error = fmt::format("cannot remove {}: {}", dir_.string(), ec.message());

    observer_.on_ended(failure_reason(*status, cleanup_error));
    {
      std::lock_guard lock(mu_);
      ended_ = true;
    }
    ended_cv_.notify_all();
  }

  void read_until_eof() {
    pollfd fds[2] = {{runsc_.stdout_fd(), POLLIN, 0}, {runsc_.stderr_fd(), POLLIN, 0}};
    std::vector<char> buf(wire::max_output_chunk + 4096);
    std::optional<steady::time_point> runsc_exited_at;
    while (fds[0].fd >= 0 || fds[1].fd >= 0) {
      int r = ::poll(fds, 2, 100);
      if (r < 0) {
        if (errno == EINTR)
          continue;
        protocol_error_ = fmt::format("poll on runsc's pipes failed: {}", std::generic_category().message(errno));
        kill_container();
        return;
      }
      if (r == 0) {
        // Normally the pipes close when runsc exits; if something it left behind keeps them
        // open, do not wait for it forever (teardown kills it).
        if (!runsc_exited_at) {
          if (runsc_.try_wait())
            runsc_exited_at = steady::now();
        } else if (steady::now() - *runsc_exited_at > lingering_pipe_grace) {
          return;
        }
        continue;
      }
      for (int i = 0; i < 2; ++i) {
        if (fds[i].fd < 0 || fds[i].revents == 0)
          continue;
        ssize_t n = ::read(fds[i].fd, buf.data(), buf.size());
        if (n > 0) {
          if (i == 0)
            on_frame_bytes(buf.data(), static_cast<size_t>(n));
          else
            on_stderr_bytes(buf.data(), static_cast<size_t>(n));
        } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
          fds[i].fd = -1;  // the fd itself stays owned (and is closed) by runsc_
        }
      }
    }
  }

  void on_stderr_bytes(const char* p, size_t n) {
    stderr_tail_.append(p, n);
    if (stderr_tail_.size() > 2 * stderr_tail_bytes)
      stderr_tail_.erase(0, stderr_tail_.size() - stderr_tail_bytes);
  }

  void on_frame_bytes(const char* p, size_t n) {
    if (protocol_error_)
      return;  // keep draining, stop interpreting
    decoder_.feed(p, n);
    for (;;) {
      switch (decoder_.next()) {
        case wire::frame_decoder::status::need_more:
          return;
        case wire::frame_decoder::status::error:
          protocol_violation(decoder_.error_message());
          return;
        case wire::frame_decoder::status::message:
          dispatch(*decoder_.msg());
          if (protocol_error_)
            return;
      }
    }
  }

  void protocol_violation(std::string why) {
    protocol_error_ = std::move(why);
    kill_container();
  }

  bool check(bool ok, std::string_view what) {
    if (!ok)
      protocol_violation(std::string(what));
    return ok;
  }

  void dispatch(const v1::InitMessage& m) {
    switch (m.message_type()) {
      case v1::Message::Hello: {
        const auto* h = m.message_as_Hello();
        if (!check(phase_ == phase::starting, "Hello after the sandbox was already running") ||
            !check(h->protocol() == 1, fmt::format("unsupported ferry-init protocol {}", h->protocol())))
          return;
        phase_ = phase::running;
        observer_.on_running();
        return;
      }
      case v1::Message::Started: {
        const auto* s = m.message_as_Started();
        if (!check(phase_ == phase::running, "Started before Hello or twice") ||
            !check(s->command_id() == command_id_, fmt::format("Started for unknown command {}", s->command_id())))
          return;
        std::vector<std::string> argv;
        if (s->argv()) {
          for (const auto* a : *s->argv())
            argv.emplace_back(a ? a->str() : std::string());
        }
        phase_ = phase::command_started;
        observer_.on_command_started(s->command_id(), argv);
        return;
      }
      case v1::Message::Output: {
        const auto* o = m.message_as_Output();
        if (!check(phase_ == phase::command_started, "Output outside a running command") ||
            !check(o->command_id() == command_id_, fmt::format("Output for unknown command {}", o->command_id())) ||
            !check(o->stream() <= 1, fmt::format("Output on unknown stream {}", o->stream())))
          return;
        std::string_view data;
        if (o->data())
          data = {reinterpret_cast<const char*>(o->data()->data()), o->data()->size()};
        observer_.on_output(o->command_id(), o->stream(), data);
        return;
      }
      case v1::Message::Exited: {
        const auto* e = m.message_as_Exited();
        if (!check(phase_ == phase::command_started, "Exited outside a running command") ||
            !check(e->command_id() == command_id_, fmt::format("Exited for unknown command {}", e->command_id())))
          return;
        phase_ = phase::command_exited;
        observer_.on_command_exited(e->command_id(), e->exit_code(), e->signal(), e->duration_ms());
        return;
      }
      case v1::Message::Error: {
        const auto* e = m.message_as_Error();
        init_error_ = e->message() ? e->message()->str() : std::string("(no message)");
        phase_ = phase::init_failed;
        return;
      }
      case v1::Message::NONE:
        break;
    }
    protocol_violation(fmt::format("unknown message type {}", static_cast<int>(m.message_type())));
  }

  std::optional<std::string> failure_reason(const exit_status& runsc_status,
                                            const std::string& cleanup_error) const {
    if (protocol_error_)
      return "protocol error: " + *protocol_error_;
    if (!init_error_.empty())
      return "ferry-init: " + init_error_;
    if (phase_ != phase::command_exited || !runsc_status.ok()) {
      if (killed_by_owner_)
        return std::string("killed");
      std::string tail = trimmed(stderr_tail_.size() > stderr_tail_bytes
                                     ? stderr_tail_.substr(stderr_tail_.size() - stderr_tail_bytes)
                                     : stderr_tail_);
      if (phase_ == phase::starting)
        return fmt::format("sandbox failed to start (runsc: {}): {}", describe(runsc_status), tail);
      if (phase_ != phase::command_exited)
        return fmt::format("sandbox ended before the command did (runsc: {}): {}", describe(runsc_status), tail);
      return fmt::format("runsc failed after the command exited ({}): {}", describe(runsc_status), tail);
    }
    if (!cleanup_error.empty())
      return "cleanup failed: " + cleanup_error;
    return std::nullopt;
  }

  const std::shared_ptr<const runsc_context> ctx_;
  const std::string id_;
  const uint32_t command_id_;
  const fs::path dir_;
  child_process runsc_;  // owned by the reader thread; other threads only call signal_group()
  sandbox_observer& observer_;

  // Reader-thread state.
  wire::frame_decoder decoder_;
  phase phase_ = phase::starting;
  std::optional<std::string> protocol_error_;
  std::string init_error_;
  std::string stderr_tail_;

  std::atomic<bool> killed_by_owner_{false};
  std::mutex kill_mu_;
  bool kill_sent_ = false;     // REQUIRES: kill_mu_
  bool runsc_reaped_ = false;  // REQUIRES: kill_mu_

  std::mutex mu_;
  std::condition_variable ended_cv_;
  bool ended_ = false;  // REQUIRES: mu_

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
    if (spec.argv.empty())
      return fail(fmt::format("sandbox {}: empty command", spec.id));
    for (const auto& e : spec.env) {
      if (e.find('=') == std::string::npos || e.front() == '=')
        return fail(fmt::format("sandbox {}: environment entry `{}` is not K=V", spec.id, e));
    }

    const fs::path dir = ctx_->sandboxes_dir / spec.id;
    std::error_code ec;
    // Creating the directory claims the id; it exists until the sandbox has ended.
    if (!fs::create_directory(dir, ec)) {
      if (ec)
        return fail(fmt::format("sandbox {}: cannot create {}: {}", spec.id, dir.string(), ec.message()));
      return fail(fmt::format("sandbox {} already exists ({} is present)", spec.id, dir.string()));
    }
    auto started = launch(spec, dir, observer);
    if (!started)
      fs::remove_all(dir, ec);
    return started;
  }

  result<size_t> cleanup_orphans() override {
    size_t cleaned = 0;
    std::error_code ec;
    std::vector<fs::path> dirs;
    for (fs::directory_iterator it(ctx_->sandboxes_dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      if (it->is_directory(type_ec) && valid_id(it->path().filename().string()))
        dirs.push_back(it->path());
    }
    if (ec)
      return fail(fmt::format("cannot list {}: {}", ctx_->sandboxes_dir.string(), ec.message()));
    for (const auto& dir : dirs) {
      const std::string id = dir.filename().string();
      // The orphan's `runsc run` may still be alive (its parent died, not it): kill the
      // container and every runsc process of it first, then `delete` finds nothing running.
      (void)run_command(ctx_->command({"kill", "--all", id, "KILL"}), helper_timeout);
      if (!kill_stragglers(dir))
        return fail(fmt::format("cleaning up orphan sandbox {}: its runsc processes survived SIGKILL", id));
      if (auto r = ctx_->delete_container(id); !r)
        return fail(fmt::format("cleaning up orphan sandbox {}: {}", id, r.error().message));
      fs::remove_all(dir, ec);
      if (ec)
        return fail(fmt::format("cleaning up orphan sandbox {}: cannot remove {}: {}", id, dir.string(), ec.message()));
      ++cleaned;
    }
    return cleaned;
  }

 private:
  result<std::unique_ptr<sandbox>> launch(const sandbox_spec& spec, const fs::path& dir,
                                          sandbox_observer& observer) {
    std::error_code ec;
    const fs::path bundle = dir / "bundle";
    const fs::path workspace = dir / "workspace";
    fs::create_directory(bundle, ec);
    if (!ec)
      fs::create_directory(workspace, ec);
    if (!ec)
      fs::permissions(workspace, fs::perms(0755), ec);
    if (ec)
      return fail(fmt::format("sandbox {}: cannot create its directories under {}: {}", spec.id, dir.string(), ec.message()));
    std::string config;
    try {
      config = make_config(*ctx_, spec, workspace).dump(2);
    } catch (const nlohmann::json::exception&) {
      return fail(fmt::format("sandbox {}: argv and env must be valid UTF-8 (they go into the OCI "
                              "config.json)", spec.id));
    }
    if (auto r = write_file_atomically(bundle / "config.json", config, fs::perms(0644)); !r)
      return fail(fmt::format("sandbox {}: {}", spec.id, r.error().message));

    spawn_options o;
    o.argv = ctx_->command({"run", "--bundle", bundle.string(), spec.id});
    o.in = stdio::null;
    o.out = stdio::pipe;
    o.err = stdio::pipe;
    o.new_process_group = true;
    auto runsc = child_process::spawn(o);
    if (!runsc)
      return fail(fmt::format("sandbox {}: {}", spec.id, runsc.error().message));
    auto sb = std::make_unique<runsc_sandbox>(ctx_, spec, dir, std::move(*runsc), observer);
    sb->begin();
    return std::unique_ptr<sandbox>(std::move(sb));
  }

  const std::shared_ptr<const runsc_context> ctx_;
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

  ctx->global = {"--root", ctx->state_dir.string(), "--network=none"};
  if (opts.ignore_cgroups)
    ctx->global.emplace_back("--ignore-cgroups");
  ctx->global.insert(ctx->global.end(), opts.extra_flags.begin(), opts.extra_flags.end());
  return std::unique_ptr<sandbox_runtime>(std::make_unique<runsc_runtime>(std::move(ctx)));
}

}  // namespace ferry::sandbox
