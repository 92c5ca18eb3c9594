// The sandbox object and runtime every backend shares (see hosted.h and ../README.md).
//
// Lifecycle of a sandbox object, driven by its reader thread:
//   (start) launching --driver launched--> starting --Hello+Attach+Attached--> running
//   (attach) handshake done by attach() --> running
//   running: commands come and go (run() → Started … Exited, or CommandError)
//   running --Release sent (release(), or the command line's Exited)--> (EOF: ferry-init ended)
//   any state --Error / bad frame / EOF / kill()--> (teardown)     detach() --> (released)
// Teardown (exactly once unless released): make sure every host process of the sandbox has
// exited (SIGKILL through pidfds), on_processes_gone, the backend's cleanup, remove the
// directory, then on_ended.

#include "hosted.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <system_error>
#include <thread>

#include <fmt/format.h>

#include "host_paths.h"
#include "init_client.h"
#include "storage.h"
#include "ferry/schemas/frame.h"

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

constexpr auto straggler_timeout = 2s;      // for processes to vanish after SIGKILL
constexpr auto launch_wait = 32s;           // kill() while launching: for the reader to hold them
constexpr auto listen_timeout = 10s;        // from launch to ferry-init listening
constexpr auto handshake_timeout = 10s;     // for each of Hello and the answer to Attach
constexpr auto exit_grace = 5s;             // for the processes to exit after ferry-init did
constexpr auto busy_retry = 2s;             // attach: for ferry-init to notice a departed host
constexpr size_t log_tail_bytes = 4096;     // of the backend's log, for failure reasons

bool valid_id(std::string_view id) {
  if (id.empty() || id.size() > 64)
    return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
  });
}

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

/// Connects to ferry-init's control socket. errc::not_found when nothing listens there. A command
/// can replace the socket file (it runs as ferry-init's uid), so the file is opened without
/// following a symlink and must be a socket, and the connect goes through /proc/self/fd/N, which
/// names exactly that inode: a symlink there must not send the host (root) to another unix
/// socket of the host, such as another sandbox's. (This also keeps long paths within sun_path.)
result<unique_fd> connect_control(const fs::path& socket_path) {
  unique_fd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock)
    return fail(fmt::format("socket: {}", std::generic_category().message(errno)));
  unique_fd file(::open(socket_path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (!file) {
    const int err = errno;
    return error_info{fmt::format("cannot connect to {}: {}", socket_path.string(), std::generic_category().message(err)),
                      err == ENOENT ? errc::not_found : errc::failed};
  }
  struct stat st {};
  if (::fstat(file.get(), &st) != 0 || !S_ISSOCK(st.st_mode))
    return error_info{fmt::format("cannot connect to {}: it is {}, not a socket (replaced inside the sandbox?)",
                                  socket_path.string(), S_ISLNK(st.st_mode) ? "a symbolic link" : "another kind of file"),
                      errc::failed};
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string path = fmt::format("/proc/self/fd/{}", file.get());
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

/// Last `n` bytes of a file (the backend's log), trimmed.
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

class hosted_sandbox final : public sandbox {
 public:
  /// `from`: the resume points (none for a new sandbox); `command_line_id`: the command line's id
  /// if the sandbox has one (it then ends once that has exited).
  hosted_sandbox(std::shared_ptr<backend> backend, std::shared_ptr<holder_registry> registry, std::string id,
                 const wire::handshake_key& key, std::span<const resume_point> from,
                 std::optional<uint32_t> command_line_id, sandbox_observer& observer)
      : backend_(std::move(backend)),
        registry_(std::move(registry)),
        id_(std::move(id)),
        dir_(backend_->settings().sandboxes_dir / id_),
        key_(key),
        driver_(backend_->driver(id_)),
        observer_(observer),
        has_command_line_(command_line_id.has_value()),
        watch_(*this),
        client_(watch_, from, command_line_id) {
    const common_settings& s = backend_->settings();
    if (!s.cgroup_parent.empty())
      cgroup_ = sandbox_cgroup::existing(s.cgroup_parent, s.cgroup_id(id_));
  }

  /// start(): launches the sandbox and talks to it on the reader thread.
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
  ~hosted_sandbox() override {
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
  result<void> renew_egress() override {
    const auto& egress = backend_->settings().egress;
    if (!egress)
      return error_info{fmt::format("sandbox {}: no egress proxy", id_), errc::failed};
    auto token = egress->renew(id_);
    if (!token)
      return token.error();
    return client_.egress_token(*token);
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

  result<void> save_root_layer(const fs::path& dest) override {
    std::lock_guard storage(storage_mu_);  // the teardown waits: the disk stays mounted
    if (storage_gone_ || detached_)
      return fail(errc::closed, fmt::format("sandbox {} is ending", id_));
    return sandbox_storage::save_layer(dir_, dest);
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
      gone_cv_.wait_for(lock, launch_wait, [&] { return gone_at_.has_value() || reader_done_; });
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
    {
      std::unique_lock lock(kill_mu_);
      gone_cv_.wait(lock, [&] { return reader_done_; });
    }
    // Its way out goes with its host: the observer must hear nothing more. A host that attaches
    // makes the socket again.
    if (const auto& egress = backend_->settings().egress)
      egress->close(id_);
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
    const bool gone = driver_->kill(procs_);
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
      } else if (auto h = client_.handshake(sock_.get(), key_, handshake_timeout); !h && !stop_requested()) {
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

  result<void> launch() {
    auto launched = driver_->launch(key_);
    {
      // Whatever the launch left (a sandbox, half or fully started) is ours to kill from here on.
      std::lock_guard lock(kill_mu_);
      procs_ = std::move(launched.procs);
      procs_known_ = true;
    }
    if (killed_by_owner_)
      kill_processes();
    return launched.status;
  }

  /// Waits for ferry-init to listen and connects, while the sandbox lives.
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
      // ferry-init listens a few milliseconds after the launch: a short step keeps that wait
      // short (a connect attempt costs microseconds).
      std::this_thread::sleep_for(500us);
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
          driver_->hold_more(procs_);
          for (const auto& p : procs_)
            watched.push_back(p.duplicate());
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
    if (const auto& egress = backend_->settings().egress)
      egress->close(id_);  // nothing of the sandbox runs any more
    if (gone_at)
      observer_.on_processes_gone(*gone_at);

    std::string cleanup_error;
    const std::string log = file_tail(log_path(dir_, driver_->log_name()), log_tail_bytes);
    if (!gone_at)
      cleanup_error = fmt::format("processes of sandbox {} survived SIGKILL", id_);
    if (auto r = driver_->cleanup(); !r && cleanup_error.empty())
      cleanup_error = r.error().message;
    // What the cgroup counted and was not reported yet, read once nothing of the sandbox runs
    // any more (the counters are read before the group goes).
    std::optional<limit_hits> at_end;
    if (cgroup_) {
      at_end = cgroup_->hits();
      if (auto r = cgroup_->remove(); !r && cleanup_error.empty())
        cleanup_error = r.error().message;
    }
    std::optional<limit_hit> disk_at_end = new_disk_hit();
    std::unique_lock storage(storage_mu_);  // after a save_root_layer in progress
    storage_gone_ = true;
    if (auto r = sandbox_storage::release(dir_); !r) {
      // Never delete through a mount that stays (the root's overlay reaches the image).
      if (cleanup_error.empty())
        cleanup_error = r.error().message;
    } else {
      std::error_code ec;
      fs::remove_all(dir_, ec);
      if (ec && cleanup_error.empty())
        cleanup_error = fmt::format("cannot remove {}: {}", dir_.string(), ec.message());
    }
    storage.unlock();
    registry_->release(id_);

    auto failure = failure_reason(cleanup_error, log);
    std::vector<limit_hit> hits;
    if (at_end)
      hits = new_hits(*at_end);
    if (disk_at_end)
      hits.push_back(std::move(*disk_at_end));
    {
      for (auto& hit : hits) {
        hit.whole_sandbox = failure.has_value() && !killed_by_owner_;
        observer_.on_limit_reached(hit);
      }
    }
    // A sandbox that died at a limit says so first (runsc: the Sentry cannot go on and the whole
    // sandbox ends, with nothing in its log that names the limit).
    if (failure && !hits.empty() && !killed_by_owner_)
      failure = fmt::format("{} ({})", hits.front().detail, *failure);
    observer_.on_ended(std::move(failure));
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
      if (killed_by_owner_)  // what was asked for, unless cleaning up after it failed
        return cleanup_error.empty() ? std::string("killed") : "killed; cleanup failed: " + cleanup_error;
      // The backend's log, when it said anything.
      // The log is the sandbox's own output: its commands can write to it too (ferry-init's
      // descriptors through /proc/1/fd), so it is quoted as such, never as Ferry's words.
      auto with_log = [&](std::string what) { return log.empty() ? what : what + "; sandbox log (untrusted): " + log; };
      if (launch_failure_ || phase_ == phase::launching || phase_ == phase::starting)
        return with_log(
          fmt::format("sandbox failed to start ({})", launch_failure_.value_or(std::string(backend_->name()))));
      if (has_command_line_ && !client_.command_line_exited())
        return with_log("sandbox ended before the command did");
      return with_log("sandbox ended before it was released");
    }
    if (!cleanup_error.empty())
      return "cleanup failed: " + cleanup_error;
    return std::nullopt;
  }

  const std::shared_ptr<backend> backend_;
  const std::shared_ptr<holder_registry> registry_;
  const std::string id_;
  const fs::path dir_;
  const wire::handshake_key key_;
  const std::unique_ptr<sandbox_driver> driver_;  // REQUIRES: kill_mu_ for kill(); reader otherwise
  std::optional<sandbox_cgroup> cgroup_;           // without cgroups: none. Reader thread (finish)
  sandbox_observer& observer_;
  const bool has_command_line_;

  /// Between init_client and the owner's observer: when a command ends, reports what the
  /// sandbox's cgroup counted since the last look (a limit the kernel enforced on a process
  /// while the sandbox goes on, as under bwrap), before the command's end. Reader thread only.
  class limit_watch final : public sandbox_observer {
   public:
    explicit limit_watch(hosted_sandbox& sb) : sb_(sb) {}
    void on_running() override { sb_.observer_.on_running(); }
    void on_command_started(uint32_t id, const std::vector<std::string>& argv) override {
      sb_.observer_.on_command_started(id, argv);
    }
    void on_output(uint32_t id, int stream, std::string_view data) override {
      sb_.observer_.on_output(id, stream, data);
    }
    void on_output_gap(uint32_t id, int stream, uint64_t lost) override {
      sb_.observer_.on_output_gap(id, stream, lost);
    }
    void on_output_truncated(uint32_t id, std::string_view path) override {
      sb_.observer_.on_output_truncated(id, path);
    }
    void on_command_ended(const command_exit& e) override {
      sb_.report_new_hits(e.command_id);
      sb_.observer_.on_command_ended(e);
    }
    void on_command_failed(uint32_t id, std::string_view reason) override {
      sb_.observer_.on_command_failed(id, reason);
    }
    void on_processes_gone(steady::time_point at) override { sb_.observer_.on_processes_gone(at); }
    void on_limit_reached(const limit_hit& hit) override { sb_.observer_.on_limit_reached(hit); }
    void on_ended(std::optional<std::string> failure) override { sb_.observer_.on_ended(std::move(failure)); }

   private:
    hosted_sandbox& sb_;
  };

  /// The limits the cgroup counted beyond `reported_`, described; `reported_` becomes `now`.
  std::vector<limit_hit> new_hits(const limit_hits& now) {
    limit_hits fresh = now;
    fresh.oom_kills -= std::min(fresh.oom_kills, reported_.oom_kills);
    fresh.pids_refused -= std::min(fresh.pids_refused, reported_.pids_refused);
    reported_ = now;
    return describe_hits(fresh, backend_->settings().limits);
  }

  /// Reports what the cgroup counted since the last report, as hit during command `command_id`
  /// (the sandbox goes on). Reader thread only.
  void report_new_hits(uint32_t command_id) {
    std::vector<limit_hit> hits;
    if (cgroup_)
      hits = new_hits(cgroup_->hits());
    if (auto disk = new_disk_hit())
      hits.push_back(std::move(*disk));
    for (auto& hit : hits) {
      hit.command_id = command_id;
      observer_.on_limit_reached(hit);
    }
  }

  /// The sandbox's disk, if it has one of its own and it became full since the last look (then
  /// once, until it has room again). Reader thread only.
  std::optional<limit_hit> new_disk_hit() {
    if (!has_disk_)
      return std::nullopt;
    auto usage = sandbox_storage::usage(dir_);
    if (!usage || !usage->full()) {
      disk_full_reported_ = false;
      return std::nullopt;
    }
    if (std::exchange(disk_full_reported_, true))
      return std::nullopt;
    limit_hit hit;
    hit.what = limit_hit::kind::disk;
    hit.limit = usage->total_bytes;
    hit.count = 1;
    hit.detail = fmt::format("disk quota reached ({} MiB): the sandbox's disk is full ({} MiB used, {} MiB left; "
                             "writes fail with ENOSPC)",
                             backend_->settings().limits.disk_bytes >> 20, usage->used_bytes >> 20,
                             usage->free_bytes >> 20);
    return hit;
  }

  limit_watch watch_;
  /// Whether the sandbox has a disk of its own (a quota), and whether its being full was
  /// reported (reader thread).
  const bool has_disk_ = sandbox_storage::usage(dir_).has_value();
  bool disk_full_reported_ = false;
  // What was reported so far (reader thread). Starts at zero after an attach too: a limit hit
  // while no host was attached is reported then; one reported before is reported again.
  limit_hits reported_;
  init_client client_;

  // Reader-thread state (and attach()'s, before the reader starts).
  phase phase_ = phase::launching;
  std::optional<std::string> launch_failure_;
  std::optional<std::string> handshake_error_;

  std::mutex storage_mu_;     // the sandbox's disk and root: save_root_layer against teardown
  bool storage_gone_ = false;  // REQUIRES: storage_mu_
  std::atomic<bool> killed_by_owner_{false};
  std::atomic<bool> detached_{false};
  std::mutex kill_mu_;
  std::condition_variable gone_cv_;
  std::vector<held_process> procs_;  // REQUIRES: kill_mu_. procs_[0]'s exit ends the sandbox
  bool procs_known_ = false;         // REQUIRES: kill_mu_. launch (or adopt) is done
  std::optional<steady::time_point> gone_at_;  // REQUIRES: kill_mu_
  unique_fd sock_;  // REQUIRES: kill_mu_ to set, reset or shut down; the reader reads it freely
  bool reader_done_ = false;  // REQUIRES: kill_mu_. on_ended delivered, or released

  std::thread reader_;
};

// ---------------------------------------------------------------------------------------------

class hosted_runtime final : public sandbox_runtime {
 public:
  explicit hosted_runtime(std::shared_ptr<backend> b) : backend_(std::move(b)) {}

  std::string_view name() const override { return backend_->name(); }

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
    for (const auto& layer : spec.layers) {
      std::error_code ec;
      if (!layer.is_absolute() || !fs::is_directory(layer, ec))
        return fail(errc::invalid_argument,
                    fmt::format("sandbox {}: layer `{}` is not an absolute path of a directory", spec.id, layer.string()));
    }

    const fs::path dir = sandboxes_dir() / spec.id;
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
    if (auto r = prepare(spec, dir, observer); !r) {
      discard(spec.id, dir);
      return r.error();
    }
    auto key = read_key(dir);
    if (!key) {
      discard(spec.id, dir);
      return key.error();
    }
    std::optional<uint32_t> command_line;
    if (!spec.argv.empty())
      command_line = spec.command_id;
    auto sb = std::make_unique<hosted_sandbox>(backend_, registry_, spec.id, *key, std::span<const resume_point>(),
                                               command_line, observer);
    sb->begin_new();
    return std::unique_ptr<sandbox>(std::move(sb));
  }

  using sandbox_runtime::attach;
  result<std::unique_ptr<sandbox>> attach(const std::string& id, std::span<const resume_point> from,
                                          sandbox_observer& observer) override {
    if (!valid_id(id))
      return error_info{fmt::format("invalid sandbox id `{}`", id.substr(0, 80)), errc::invalid_argument};
    const fs::path dir = sandboxes_dir() / id;
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
      // A socket, not whatever a command may have put in its place (a symlink is not followed).
      if (!backend_->driver(id)->find().empty() &&
          fs::is_socket(fs::symlink_status(dir / "ctl" / std::string(socket_name), ec)))
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
    // Groups whose sandbox directory is already gone (a crash between the two removals, or in
    // prepare): of this runtime (its prefix) and neither held nor kept.
    // Each is held while it is looked at, so that a sandbox starting meanwhile keeps its group.
    const common_settings& settings = backend_->settings();
    if (!settings.cgroup_parent.empty()) {
      const size_t skip = settings.cgroup_prefix.size();
      auto orphan = [&](const std::string& group) {
        const std::string id = group.substr(skip);
        if (keep.count(id) > 0 || !registry_->try_hold(id))
          return false;
        std::error_code ec;
        if (fs::exists(sandboxes_dir() / id, ec) || ec) {
          registry_->release(id);
          return false;
        }
        return true;
      };
      auto done = [&](const std::string& group) { registry_->release(group.substr(skip)); };
      cleaned += remove_orphan_cgroups(settings.cgroup_parent, settings.cgroup_prefix, orphan, done).size();
    }
    return cleaned;
  }

 private:
  const fs::path& sandboxes_dir() const { return backend_->settings().sandboxes_dir; }

  // REQUIRES: `id` held in registry_ by the caller (released by the caller on failure).
  result<std::unique_ptr<sandbox>> try_attach(const std::string& id, const fs::path& dir,
                                              std::span<const resume_point> from, sandbox_observer& observer) {
    auto procs = backend_->driver(id)->find();
    if (procs.empty())
      return error_info{fmt::format("sandbox {} is gone (its processes are not running)", id), errc::not_found};
    auto key = read_key(dir);
    if (!key)
      return error_info{fmt::format("sandbox {}: {}", id, key.error().message), errc::failed};
    auto sock = connect_control(dir / "ctl" / std::string(socket_name));
    if (!sock)
      return error_info{fmt::format("sandbox {}: {}", id, sock.error().message), sock.error().code};
    // Its way out again: the proxy that served it may have gone with an earlier host (a crash),
    // and the sandbox reaches whichever socket is at that path now.
    if (const auto& egress = backend_->settings().egress) {
      // The credential ferry-init was given at the start stays valid (same key, same policy).
      if (auto r = egress->open(id, dir / "ctl" / std::string(egress_socket_name), egress_report(observer)); !r)
        return error_info{fmt::format("sandbox {}: its egress socket: {}", id, r.error().message), errc::failed};
    }
    // The command line's id, recorded at start (the sandbox ends once it has exited).
    std::optional<uint32_t> command_line;
    const std::string recorded = read_small_file(dir / std::string(command_line_file));
    if (!recorded.empty())
      command_line = static_cast<uint32_t>(std::strtoul(recorded.c_str(), nullptr, 10));
    auto sb = std::make_unique<hosted_sandbox>(backend_, registry_, id, *key, from, command_line, observer);
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

  /// The egress binder's report for a sandbox: to its observer (valid until the binder's close,
  /// which comes before on_ended and at a detach).
  static egress_binder::report_fn egress_report(sandbox_observer& observer) {
    return [&observer](const egress_event& e) { observer.on_egress(e); };
  }

  /// Sandbox directories not held by this runtime.
  result<std::vector<fs::path>> leftover_dirs() const {
    std::error_code ec;
    std::vector<fs::path> dirs;
    for (fs::directory_iterator it(sandboxes_dir(), ec), end; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      const std::string id = it->path().filename().string();
      if (it->is_directory(type_ec) && valid_id(id) && !registry_->held(id))
        dirs.push_back(it->path());
    }
    if (ec)
      return fail(fmt::format("cannot list {}: {}", sandboxes_dir().string(), ec.message()));
    return dirs;
  }

  result<void> remove_orphan(const std::string& id, const fs::path& dir) const {
    if (const auto& egress = backend_->settings().egress)
      egress->close(id);
    auto driver = backend_->driver(id);
    auto procs = driver->find();
    if (!driver->kill(procs))
      return fail(fmt::format("cleaning up orphan sandbox {}: its processes survived SIGKILL", id));
    if (auto r = driver->cleanup(); !r)
      return fail(fmt::format("cleaning up orphan sandbox {}: {}", id, r.error().message));
    if (auto r = remove_cgroup(id); !r)
      return fail(fmt::format("cleaning up orphan sandbox {}: {}", id, r.error().message));
    if (auto r = sandbox_storage::release(dir); !r)
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

  /// Disk, workspace, control directory, key and command line of a new sandbox, then the
  /// backend's files.
  result<void> prepare(const sandbox_spec& spec, const fs::path& dir, sandbox_observer& observer) const {
    const common_settings& settings = backend_->settings();
    if (auto r = settings.storage->prepare(dir); !r)
      return fail(fmt::format("sandbox {}: {}", spec.id, r.error().message));
    std::error_code ec;
    const fs::path ctl = dir / "ctl";
    fs::create_directory(ctl, ec);
    if (!ec)
      fs::permissions(ctl, fs::perms(0700), ec);
    if (ec)
      return fail(fmt::format("sandbox {}: cannot create its directories under {}: {}", spec.id, dir.string(), ec.message()));
    // What the backend launches: the spec, plus the egress credential for ferry-init.
    sandbox_spec launched = spec;
    if (settings.egress) {
      auto credential = settings.egress->open(spec.id, ctl / std::string(egress_socket_name), egress_report(observer));
      if (!credential)
        return fail(fmt::format("sandbox {}: its egress socket: {}", spec.id, credential.error().message));
      if (!credential->empty())
        launched.env.push_back(std::string(egress_token_variable) + "=" + *credential);
    }
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
    std::optional<sandbox_cgroup> cgroup;
    if (!settings.cgroup_parent.empty()) {
      auto made = sandbox_cgroup::create(settings.cgroup_parent, settings.cgroup_id(spec.id), settings.limits);
      if (!made)
        return fail(fmt::format("sandbox {}: its cgroup: {}", spec.id, made.error().message));
      cgroup = std::move(*made);
    }
    if (auto r = backend_->prepare(launched, dir, cgroup ? &*cgroup : nullptr); !r)
      return fail(fmt::format("sandbox {}: {}", spec.id, r.error().message));
    return {};
  }

  /// Removes sandbox `id`'s cgroup (absent, or no cgroups: nothing to do).
  result<void> remove_cgroup(const std::string& id) const {
    const common_settings& settings = backend_->settings();
    if (settings.cgroup_parent.empty())
      return {};
    return sandbox_cgroup::existing(settings.cgroup_parent, settings.cgroup_id(id)).remove();
  }

  /// Undoes a start that failed before the sandbox object took over.
  void discard(const std::string& id, const fs::path& dir) {
    if (const auto& egress = backend_->settings().egress)
      egress->close(id);
    (void)remove_cgroup(id);
    // Never delete through a mount that stays (the root's overlay reaches the image).
    if (sandbox_storage::release(dir)) {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
    registry_->release(id);
  }

  const std::shared_ptr<backend> backend_;
  const std::shared_ptr<holder_registry> registry_ = std::make_shared<holder_registry>();
};

}  // namespace

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

result<common_settings> check_options(const runtime_options& opts, std::string_view backend, bool use_cgroups,
                                      std::string_view fallback, std::optional<uid_t> map_root_to) {
  common_settings s;
  if (opts.sandboxes_dir.empty())
    return fail(fmt::format("{} runtime: sandboxes_dir must be set", backend));
  std::error_code ec;
  if (opts.init_binary.empty() || !fs::is_regular_file(opts.init_binary, ec))
    return fail(fmt::format("{} runtime: ferry-init binary `{}` does not exist", backend, opts.init_binary.string()));
  s.init_binary = clean_path(opts.init_binary);
  s.sandboxes_dir = clean_path(opts.sandboxes_dir);
  fs::create_directories(s.sandboxes_dir, ec);
  if (ec)
    return fail(fmt::format("{} runtime: cannot create {}: {}", backend, s.sandboxes_dir.string(), ec.message()));

  if (opts.rootfs.empty()) {
    s.rootfs = s.sandboxes_dir.parent_path() / "rootfs-host";
    auto binds = prepare_host_tree(s.rootfs);
    if (!binds)
      return fail(fmt::format("{} runtime: preparing the host-tree root: {}", backend, binds.error().message));
    s.host_binds = std::move(*binds);
  } else {
    s.rootfs = clean_path(opts.rootfs);
    if (!fs::is_directory(s.rootfs, ec))
      return fail(fmt::format("{} runtime: root filesystem {} is not a directory", backend, s.rootfs.string()));
  }

  if (opts.output_buffer_bytes < wire::max_output_chunk)
    return fail(fmt::format("{} runtime: output_buffer_bytes {} is below the minimum of {}", backend,
                            opts.output_buffer_bytes, wire::max_output_chunk));
  if (opts.linger.count() <= 0)
    return fail(fmt::format("{} runtime: linger must be positive", backend));
  s.output_buffer_bytes = opts.output_buffer_bytes;
  s.linger = opts.linger;
  if (opts.egress) {
    s.egress = opts.egress;
    s.proxy_port = opts.proxy_port;
    if (opts.proxy_port == 0)
      return fail(fmt::format("{} runtime: proxy_port must not be 0", backend));
  }
  s.limits = opts.limits;
  if (opts.limits.disk_bytes != 0 && opts.limits.disk_bytes < min_disk_bytes)
    return fail(fmt::format("{} runtime: a disk quota of {} bytes is below the minimum of {} MiB", backend,
                            opts.limits.disk_bytes, min_disk_bytes >> 20));
  s.storage = sandbox_storage::make(s.sandboxes_dir, opts.limits.disk_bytes, opts.spare_disks, opts.writable_root,
                                    s.rootfs, map_root_to, backend);
  s.limits.disk_bytes = s.storage->quota_bytes();

  // Every sandbox's cgroup is `<parent>/<prefix><id>`; the prefix keeps runtimes with other
  // sandbox directories (tests, a second ferryd) out of each other's groups.
  s.cgroup_prefix = fmt::format("{:012x}-", fnv1a(s.sandboxes_dir.string()) & 0xffffffffffffull);
  if (use_cgroups && !opts.cgroup_parent.empty()) {
    // Probe once: a group made (with the limits) and removed here.
    auto probe = sandbox_cgroup::create(opts.cgroup_parent, fmt::format("{}probe-{}", s.cgroup_prefix, ::getpid()),
                                        s.limits);
    if (probe && probe->remove()) {
      s.cgroup_parent = opts.cgroup_parent;
    } else {
      std::fprintf(stderr,
                   "ferry: WARNING: %.*s runtime: cannot make sandbox cgroups under %s (%s); the sandboxes' limits "
                   "fall back to %.*s, and a limit a sandbox hits is not named\n",
                   static_cast<int>(backend.size()), backend.data(), opts.cgroup_parent.c_str(),
                   probe ? "the probe group could not be removed" : probe.error().message.c_str(),
                   static_cast<int>(fallback.size()), fallback.data());
    }
  }
  return s;
}

std::vector<std::string> init_command(const common_settings& s, const sandbox_spec& spec) {
  std::vector<std::string> args{std::string(init_path),
                                "--command-id",
                                std::to_string(spec.command_id),
                                "--listen",
                                fmt::format("{}/{}", ctl_mount, socket_name),
                                "--linger-ms",
                                std::to_string(s.linger.count()),
                                "--buffer-bytes",
                                std::to_string(s.output_buffer_bytes)};
  if (s.egress)
    args.insert(args.end(), {"--proxy-socket", fmt::format("{}/{}", ctl_mount, egress_socket_name), "--proxy-port",
                             std::to_string(s.proxy_port)});
  args.push_back("--");
  args.insert(args.end(), spec.argv.begin(), spec.argv.end());
  return args;
}

std::vector<std::string> sandbox_environment(const sandbox_spec& spec) {
  std::vector<std::string> env{"PATH=" + std::string(default_path), "HOME=/workspace", "TERM=dumb"};
  for (const auto& e : spec.env) {
    auto key = e.substr(0, e.find('=') + 1);
    auto same = std::find_if(env.begin(), env.end(), [&](const std::string& d) { return d.rfind(key, 0) == 0; });
    if (same != env.end())
      *same = e;
    else
      env.push_back(e);
  }
  return env;
}

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

std::string describe(const exit_status& s) {
  return s.signal != 0 ? fmt::format("signal {}", s.signal) : fmt::format("exit code {}", s.exit_code);
}

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
    s.pop_back();
  return s;
}

std::unique_ptr<sandbox_runtime> make_hosted_runtime(std::shared_ptr<backend> b) {
  return std::make_unique<hosted_runtime>(std::move(b));
}

}  // namespace ferry::sandbox::detail
