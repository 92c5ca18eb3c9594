#pragma once
// ferry_sandbox public header: the sandbox runtime interface and its backends, gVisor (runsc) and
// bubblewrap (bwrap).
//
// A sandbox is one isolated run of ferry-init (PID 1) with a read-only root, a writable
// workspace at /workspace that is deleted when the sandbox ends, and no network (optionally an
// HTTP forwarder to an egress proxy's unix socket). ferry-init is a process API: it runs the
// commands the host asks for (`sandbox::run`), several at once, in argv form, as shell lines or in
// persistent shell sessions, and reports on each with the framed protocol of schemas/init.fbs over
// a unix socket that outlives the host process: a sandbox survives a crash of the process that
// started it, and a new process can re-attach to it (`attach`) and resume every command's output.
// A sandbox started with a command line (`sandbox_spec::argv`) runs it as its first command and
// ends once it has exited (protocol 2 behaviour); one started without is idle until `run` and
// ends on `release()`.
//
// Threading: `sandbox_runtime` is thread-safe. Each `sandbox` runs one reader thread that calls
// its observer, never concurrently for one sandbox. `sandbox::run()`, `signal()`, `write_stdin()`,
// `release()`, `kill()` and `detach()` may be called from any thread (also from the observer);
// the first four only queue a frame for the reader thread and never block on the sandbox.
// Destroying a sandbox kills it (unless detached) and joins its reader thread, so neither the
// destructor nor `wait()` may be called from the sandbox's own observer.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/sandbox/process.h"
#include "ferry/schemas/result.h"

namespace ferry::sandbox {

/// What to run in a new sandbox.
struct sandbox_spec {
  /// Unique id; becomes the runtime's container id. Letters, digits, '-' and '_' only, ≤ 64 chars.
  std::string id;
  /// The command line, run by ferry-init as command `command_id` on the first attach (e.g.
  /// {"/bin/sh", "-c", "echo hi"}); the sandbox ends once it has exited. Empty: an idle sandbox
  /// that runs what `sandbox::run` asks for and ends on `sandbox::release()`.
  std::vector<std::string> argv;
  /// Extra environment for every command ("K=V"); PATH, HOME and TERM have sane defaults.
  std::vector<std::string> env;
  /// Id ferry-init reports the command line under (on_command_started/on_output/...).
  uint32_t command_id = 1;
  /// Read-only layers over the runtime's root, topmost first: absolute host directories, e.g. an
  /// environment's setup (environment.h, saved by `sandbox::save_root_layer`). Needs a writable
  /// root (runtime_options::writable_root). Empty: the root alone.
  std::vector<std::filesystem::path> layers;

  /// Field by field, every field (the warm pool tells a key's changed template by it).
  bool operator==(const sandbox_spec&) const = default;
};

/// Where a host resumes one command's output: the bytes of each stream it already has.
struct resume_point {
  uint32_t command_id = 1;
  uint64_t stdout_bytes = 0;
  uint64_t stderr_bytes = 0;
  /// The host has recorded this command's end: the sandbox forgets it (and frees what it kept of
  /// it) and nothing more is delivered for it.
  bool exited = false;
};

/// A command to run in a sandbox (`sandbox::run`). Exactly one of `argv` and `shell`.
struct command_spec {
  /// Chosen by the caller: unique per sandbox, not 0, not the command line's id.
  uint32_t command_id = 0;
  /// The argument vector; argv[0] is looked up in the command's PATH.
  std::vector<std::string> argv;
  /// Or a shell command line, run with `/bin/bash -c`.
  std::string shell;
  /// With `shell`: run it in this persistent session (letters, digits, '-', '_'; ≤ 64). Like a
  /// terminal, the working directory, variables, functions and aliases carry over to the next
  /// command of the session; shell options do not. One command at a time per session.
  std::string session;
  /// Extra environment ("K=V") on top of the sandbox's (in a session: exported into it).
  std::vector<std::string> env;
  /// Working directory, relative to /workspace unless absolute. Empty: /workspace (a session:
  /// its current directory).
  std::string cwd;
  /// Run on a pseudo-terminal of rows × cols (then all output arrives as stream 0).
  bool pty = false;
  uint16_t rows = 24, cols = 80;
  /// Kill the command's process group after this long; 0 = never.
  std::chrono::milliseconds timeout{0};
  /// Bytes for its stdin; more may follow with `sandbox::write_stdin`.
  std::string stdin_data;
  /// Close stdin after `stdin_data` (on a pty: send EOF). Without stdin_data: stdin is /dev/null.
  bool close_stdin = true;
  /// Output (both streams) delivered at most; past it `on_output_truncated`, no more on_output,
  /// and the complete output is kept in the sandbox in /workspace/.ferry/output/<id>.log.
  /// 0 = no limit.
  uint64_t output_limit_bytes = 1u << 20;
};

/// Why a command ended.
enum class exit_reason {
  exited,    ///< it exited by itself: exit_code is valid
  signaled,  ///< a signal neither the host nor a timeout sent ended it
  timeout,   ///< command_spec::timeout expired: its process group was SIGKILLed
  killed,    ///< a signal ended it after `sandbox::signal` was sent for it (or for everything)
};
std::string_view to_string(exit_reason r);

/// Everything about how a command ended.
struct command_exit {
  uint32_t command_id = 0;
  exit_reason reason = exit_reason::exited;
  int exit_code = -1;  ///< exit status; -1 when a signal ended it
  int signal = 0;      ///< the signal that ended it; 0 when it exited
  uint64_t duration_ms = 0;
  /// From wait4: CPU time (the command and the descendants it waited for) and peak memory.
  uint64_t user_cpu_ms = 0, sys_cpu_ms = 0, max_rss_kib = 0;
  /// Bytes it wrote to stdout / stderr in all (delivered or not).
  uint64_t stdout_bytes = 0, stderr_bytes = 0;
  /// Output past the command's output limit, never delivered as on_output; 0 if none.
  uint64_t truncated_bytes = 0;
  /// When truncated_bytes > 0: the file inside the sandbox with the complete output (empty if
  /// it could not be written).
  std::string output_path;
};

// --- file operations for the agent's tools (sandbox::read_file …) ---------------------------------
// Paths are relative to /workspace unless absolute (inside the sandbox: the sandbox is the
// boundary); a NUL byte is refused. Each call blocks its caller until ferry-init answers (it runs
// every operation in a child process, killed after 30 s), so it must not be called from the
// sandbox's own observer. Errors: errc::not_found (no such file or directory),
// errc::invalid_argument (a bad request, a directory where a file is needed or the reverse, a
// binary file, a file or content over its limit, an edit's old string absent or not unique),
// errc::busy (16 operations in progress), errc::closed (the sandbox is ending), errc::failed
// (permission denied, a timeout, anything else); the message says which, naming the path.

enum class file_type { file, directory, symlink, other };

struct read_options {
  /// First line, 1-based (0 = 1).
  uint64_t offset = 0;
  /// Lines at most; 0 = as many as max_bytes allows.
  uint64_t limit = 0;
  /// Size of file_text::content at most (≤ 768 KiB).
  uint64_t max_bytes = 256u << 10;
};

/// Lines of a text file (read_file).
struct file_text {
  std::string path;  ///< absolute
  /// "<number>\t<line>\n" per line, the number right-aligned in 6 columns (as `cat -n`).
  std::string content;
  uint64_t first_line = 0;  ///< 0 when there is no line at the offset
  uint64_t lines = 0;
  /// The byte cap ended it before `limit` lines (the last one may be cut): read on from next_line.
  bool truncated = false;
  bool more = false;  ///< lines follow the ones returned
  uint64_t next_line = 0;
  uint64_t size = 0;  ///< the file's size in bytes
};

struct file_written {
  std::string path;
  uint64_t bytes = 0;
  bool created = false;
};

struct file_edited {
  std::string path;
  uint64_t replacements = 0;
  uint64_t bytes = 0;  ///< the new size
};

struct dir_entry {
  std::string name;
  file_type type = file_type::other;
  uint64_t size = 0;
};

struct dir_listing {
  std::string path;
  std::vector<dir_entry> entries;  ///< sorted by name
  uint64_t total = 0;              ///< entries in the directory
  bool truncated = false;
};

struct glob_options {
  std::string path;  ///< where a relative pattern starts; empty: /workspace
  uint32_t max_results = 1000;
  bool include_git = false;  ///< descend into .git directories
};

struct glob_matches {
  std::string path;                  ///< what the matches are relative to
  std::vector<std::string> matches;  ///< sorted
  bool truncated = false;
};

struct grep_options {
  std::string path;  ///< file or directory; empty: /workspace
  std::string glob;  ///< only files whose name matches (e.g. "*.cpp")
  bool ignore_case = false;
  uint32_t context = 0;  ///< lines before and after each match (≤ 20)
  uint32_t max_matches = 200;
};

struct grep_line {
  std::string path;  ///< relative to grep_matches::path
  uint64_t line = 0;
  std::string text;
  bool match = false;  ///< else a context line
};

struct grep_matches {
  std::string path;
  std::vector<grep_line> lines;  ///< by file, then line
  uint32_t matches = 0;
  uint32_t files = 0;
  bool truncated = false;
  std::string engine;  ///< "rg" (the image has ripgrep) or "posix" (ferry-init's own)
};

/// A resource limit a sandbox hit, as its cgroup counted it.
struct limit_hit {
  enum class kind { memory, pids, disk };
  kind what = kind::memory;
  /// The limit in force: bytes (memory, disk) or processes and threads (pids).
  uint64_t limit = 0;
  /// How often: OOM kills, forks refused; 1 for a disk that became full.
  uint64_t count = 0;
  /// The sandbox ended abnormally with it (gVisor: a hit kills the whole sandbox).
  bool whole_sandbox = false;
  /// The command during whose run the limit was counted (bubblewrap: the kernel stopped only a
  /// process, the sandbox goes on); 0 when noticed at the sandbox's end.
  uint32_t command_id = 0;
  /// A sentence for people ("memory limit reached (4096 MiB): the OOM killer ran").
  std::string detail;
};
/// "memory", "pids" or "disk".
std::string_view to_string(limit_hit::kind k);

/// One decision of the egress proxy about a connection of a sandbox (egress_binder).
struct egress_event {
  std::string sandbox_id;
  std::string host;  // normalised (IP literals canonical); empty if the request had no target
  uint16_t port = 0;
  std::string method;  // CONNECT, GET, …
  bool allowed = false;
  /// What decided: `policy:trusted`, `custom:allow:*.example.com`, `custom:deny:example.com`,
  /// `approval:example.com:443`, `org:deny:…`, `address:private 10.0.0.1`, `token:expired`,
  /// `limit:rate`, `limit:connections`, `route:git.ferry.internal`, `request:…`, `upstream:…`.
  std::string rule;
  /// Denied only because the sandbox's policy does not list it: a user could allow it for the
  /// task. Never for address, token, org or explicit deny refusals.
  bool approvable = false;
  uint64_t bytes_up = 0;    // client → destination, after the head
  uint64_t bytes_down = 0;  // destination → client
  std::chrono::milliseconds duration{0};
};

/// Receives what happens in one sandbox. Called on the sandbox's reader thread, in order:
///   on_running, then per command: on_command_started (on_output | on_output_gap)*
///   on_output_truncated? on_command_ended — or only on_command_failed; and at the end
///   on_processes_gone? on_limit_reached* on_ended.
/// Commands interleave. A command still running (or not yet started) when the sandbox ends gets
/// no on_command_ended: on_ended says why the sandbox ended. on_ended comes exactly once per
/// sandbox object, unless the object was detached (then nothing follows the detach). After `attach`, on_running and on_command_started
/// (same argv) are delivered again for the commands the sandbox still has.
///
/// Output offsets: the observer counts them. Each stream starts at the resume point's offset (0
/// for a new command); every on_output advances its stream by data.size(), every on_output_gap by
/// lost_bytes. The runtime checks that ferry-init's frames are contiguous with these counts (a
/// mismatch is a protocol error), so the counts are the byte offsets of the command's streams.
class sandbox_observer {
 public:
  virtual ~sandbox_observer() = default;
  /// ferry-init said hello: the sandbox is up (again, after attach).
  virtual void on_running() = 0;
  virtual void on_command_started(uint32_t command_id, const std::vector<std::string>& argv) = 0;
  /// stream: 0 stdout (or the pty), 1 stderr. `data` is valid only during the call.
  virtual void on_output(uint32_t command_id, int stream, std::string_view data) = 0;
  /// Only after `attach`: `lost_bytes` (≥ 1) of `stream` after the resume point were no longer
  /// kept by the sandbox (it keeps the last runtime_options::output_buffer_bytes per stream while
  /// no host is attached); output continues after them. An observer used with `attach` must
  /// override this to record the loss; the default ignores it.
  virtual void on_output_gap(uint32_t /*command_id*/, int /*stream*/, uint64_t /*lost_bytes*/) {}
  /// The command reached its output limit: no more on_output for it; `path` (inside the
  /// sandbox) will hold its complete output (empty if it cannot be written).
  virtual void on_output_truncated(uint32_t /*command_id*/, std::string_view /*path*/) {}
  /// The command ended. The default passes the protocol-2 fields to on_command_exited.
  virtual void on_command_ended(const command_exit& e) {
    on_command_exited(e.command_id, e.exit_code, e.signal, e.duration_ms);
  }
  /// The short form of on_command_ended (what the command line's observers need).
  virtual void on_command_exited(uint32_t /*command_id*/, int /*exit_code*/, int /*signal*/,
                                 uint64_t /*duration_ms*/) {}
  /// A `run` that was not carried out (bad request, duplicate id, bad working directory, the
  /// program cannot be executed, too many commands, the session is busy), or after `attach` a
  /// command the sandbox no longer knows. `reason` names the command.
  virtual void on_command_failed(uint32_t /*command_id*/, std::string_view /*reason*/) {}
  /// Every host process of the sandbox has exited, confirmed at `at` (by kill() or by the
  /// reader thread, whichever saw it); the slower cleanup (runsc delete, files) follows, then
  /// on_ended. Not delivered if the runtime could not confirm it (on_ended then says why).
  virtual void on_processes_gone(std::chrono::steady_clock::time_point /*at*/) {}
  /// The sandbox hit a limit: its cgroup counted an OOM kill or a refused fork, or its disk is
  /// full. Read when a command ends (then just before its on_command_ended, with its id: the
  /// sandbox went on) and once its processes are gone (before on_ended: what was not reported
  /// yet). Memory and pids only with Ferry's own cgroups (runtime_options::cgroup_parent); the
  /// disk only with a quota (sandbox_limits::disk_bytes), once each time it fills up.
  virtual void on_limit_reached(const limit_hit& /*hit*/) {}
  /// The egress proxy decided about one of the sandbox's connections (an allowed one once, at
  /// its end). Called from the proxy's threads, concurrently with the other calls, between the
  /// start (or attach) and on_ended (never after it, nor after a detach).
  virtual void on_egress(const egress_event& /*event*/) {}
  /// The sandbox is gone: no process of it remains and its files are deleted. `failure` is set
  /// when it ended abnormally (runtime error, protocol error, killed) with the reason.
  virtual void on_ended(std::optional<std::string> failure) = 0;
};

/// A running sandbox, owned by this object until it ends or is detached.
class sandbox {
 public:
  virtual ~sandbox() = default;
  virtual const std::string& id() const = 0;
  /// Runs a command (queued until the sandbox is up). Its story arrives through the observer:
  /// on_command_started ... on_command_ended, or on_command_failed. Errors here: errc::invalid_argument
  /// (id 0, not exactly one of argv and shell, a bad env entry), errc::conflict (the id is in
  /// use by this object), errc::closed (the sandbox is ending, ended or detached).
  virtual result<void> run(const command_spec& spec) = 0;
  /// Sends `signo` to command `command_id` (its whole process group unless `whole_group` is
  /// false), or with command_id 0 to every process of the sandbox. A command that then dies of
  /// a signal ends with exit_reason::killed. A command that already ended is not an error.
  virtual result<void> signal(uint32_t command_id, int signo, bool whole_group = true) = 0;
  /// More stdin for a running command (started with close_stdin = false); `close` closes it.
  virtual result<void> write_stdin(uint32_t command_id, std::string_view data, bool close) = 0;
  /// Ends the sandbox normally: ferry-init kills every process and exits; on_ended(nullopt)
  /// follows once everything is cleaned up. errc::closed if it is already ending.
  virtual result<void> release() = 0;
  /// Draws a fresh egress credential for the sandbox from its runtime's egress binder
  /// (egress_binder::renew) and hands it to ferry-init: commands started from now on carry it.
  /// Call well before the current one expires (sandbox tokens live 4 hours). Fails without an
  /// egress binder, and with errc::closed when the sandbox is ending.
  virtual result<void> renew_egress() = 0;

  // File operations (see above): each blocks until ferry-init answers. REQUIRES: not called from
  // this sandbox's observer.
  /// `limit` lines from line `offset`, numbered, within a byte cap; a binary file is an error.
  virtual result<file_text> read_file(const std::string& path, const read_options& options = {}) = 0;
  /// Writes the whole file atomically (parents created; an existing file keeps its mode; `mode`
  /// for a new one, 0 = 0644). At most 768 KiB.
  virtual result<file_written> write_file(const std::string& path, std::string_view content, uint32_t mode = 0) = 0;
  /// Replaces `old_string` (which must occur exactly once unless `replace_all`) by `new_string`.
  virtual result<file_edited> edit_file(const std::string& path, std::string_view old_string,
                                        std::string_view new_string, bool replace_all = false) = 0;
  /// A directory's entries (not recursive), sorted; empty path: /workspace.
  virtual result<dir_listing> list_dir(const std::string& path, uint32_t max_entries = 1000) = 0;
  /// Files matching a pattern with `**`, `*`, `?`, `[...]` (e.g. "src/**/*.cpp").
  virtual result<glob_matches> glob(const std::string& pattern, const glob_options& options = {}) = 0;
  /// Lines matching a regular expression (ripgrep's syntax if the image has it, else POSIX ERE).
  virtual result<grep_matches> grep(const std::string& pattern, const grep_options& options = {}) = 0;
  /// Copies what the sandbox wrote to its root — its writable layer: new and changed files,
  /// deletions as overlayfs whiteouts; not /workspace, /tmp or /dev/shm — to the new directory
  /// `dest` (its parent must exist), owned as they are inside (bubblewrap: the sandbox's uid
  /// becomes 0), for use as a layer (sandbox_spec::layers). A consistent copy needs the sandbox
  /// quiet: REQUIRES no command running. errc::invalid_argument without a writable root or if
  /// `dest` exists; errc::closed once the sandbox is ending. Blocks for the copy (any thread but
  /// the reader, like the file operations).
  virtual result<void> save_root_layer(const std::filesystem::path& dest) = 0;
  /// Kills every process of the sandbox at once: SIGKILL to its host processes through pidfds
  /// (runsc: Sentry, gofer and the Sentry's stub processes; bwrap: ferry-init, which takes its
  /// PID namespace along, and bwrap), then waits until they have all exited.
  /// Returns once they are gone (or the runtime gave up); on_processes_gone and on_ended follow
  /// on the reader thread. Idempotent. No-op after detach().
  virtual void kill() = 0;
  /// Lets go of the sandbox without killing it: the reader thread stops, nothing more is
  /// delivered (no on_ended) and the sandbox keeps running, attachable by `attach`. Returns once
  /// the reader thread let go. Idempotent; no-op once the sandbox ended.
  virtual void detach() = 0;
  /// Blocks until on_ended has been delivered, or the sandbox was detached.
  virtual void wait() = 0;
};

/// The egress proxy as the runtime sees it: a listening unix socket per sandbox, so that the
/// proxy knows which sandbox a connection comes from by the socket it arrived on. The socket is
/// in the sandbox's control directory (`/.ferry/ctl/egress.sock` inside; a directory mount, so a
/// socket made again at that path — by a restarted host that re-attaches — is the one the
/// sandbox reaches).
///
/// Threading: called from any thread (a start's, a sandbox's reader thread at its end), also
/// concurrently; must not block for long.
class egress_binder {
 public:
  virtual ~egress_binder() = default;
  /// What the binder reports a decision to (the sandbox's observer).
  using report_fn = std::function<void(const egress_event&)>;
  /// Listens for sandbox `sandbox_id` at host path `socket`, replacing whatever is there, mode
  /// 0666 (bwrap sandboxes run as a uid of their own), and reports each decision about its
  /// connections to `report` until close. Called before the sandbox starts, and again when a
  /// host re-attaches it. Returns the credential the sandbox's requests must carry (given to
  /// ferry-init, which puts it into the proxy URLs; empty: none). An error fails the start (or
  /// the attach).
  [[nodiscard]] virtual result<std::string> open(const std::string& sandbox_id, const std::filesystem::path& socket,
                                                 report_fn report) = 0;
  /// The sandbox has ended, never started or is being detached: no more connections from it,
  /// those still open are closed, and once this returns `report` is never called again.
  /// Idempotent; also for an id never opened.
  virtual void close(const std::string& sandbox_id) = 0;
  /// A fresh credential for an open sandbox, bound to what it was opened with (its policy);
  /// errc::not_found for a sandbox not open here. Default: an error (cannot renew).
  [[nodiscard]] virtual result<std::string> renew(const std::string& sandbox_id) {
    return error_info{"this egress binder cannot renew credentials (sandbox " + sandbox_id + ")", errc::failed};
  }
};

/// A way to create sandboxes.
class sandbox_runtime {
 public:
  virtual ~sandbox_runtime() = default;
  /// "runsc" or "bwrap".
  virtual std::string_view name() const = 0;
  /// Creates and starts a sandbox. `observer` must outlive the returned sandbox. Returns at
  /// once; start-up failures arrive as on_ended.
  virtual result<std::unique_ptr<sandbox>> start(const sandbox_spec& spec,
                                                 sandbox_observer& observer) = 0;
  /// Re-attaches to sandbox `id` started by an earlier process (same sandboxes_dir and
  /// state_dir) that is still alive; every command it still has is delivered again from where
  /// `from` says this host is (on_command_started, then output after the resume point), and
  /// commands not in `from` from their start; one in `from` that the sandbox no longer has gets
  /// on_command_failed. on_running is called once attached. Errors: errc::not_found if it is
  /// gone (or never was), errc::busy if this runtime or another live host holds it,
  /// errc::invalid_argument for a bad id; other failures (ferry-init refused the resume points,
  /// it is not the sandbox's ferry-init, it speaks another protocol) are errc::failed. A failed
  /// attach never kills the sandbox. `observer` must outlive the returned sandbox.
  virtual result<std::unique_ptr<sandbox>> attach(const std::string& id, std::span<const resume_point> from,
                                                  sandbox_observer& observer) = 0;
  /// attach() with one command's resume point (the command line's).
  result<std::unique_ptr<sandbox>> attach(const std::string& id, const resume_point& from,
                                          sandbox_observer& observer) {
    return attach(id, std::span<const resume_point>(&from, 1), observer);
  }
  /// Ids of sandboxes left by an earlier process that are still alive (attachable): their
  /// processes run and ferry-init listens. Sandboxes held by this runtime are not listed.
  virtual result<std::vector<std::string>> list_live() = 0;
  /// Kills and deletes every leftover sandbox (alive or not) except those in `keep` and those
  /// held by this runtime: kills its processes, deletes what the backend left (the runsc
  /// container; the bwrap cgroups) and its files.
  /// Returns how many it cleaned up.
  virtual result<size_t> cleanup_orphans(const std::set<std::string>& keep = {}) = 0;
};

/// Resource limits of each sandbox; 0 = unlimited.
struct sandbox_limits {
  /// Memory of all its processes (and its tmpfs) together.
  uint64_t memory_bytes = 4ull << 30;
  /// Processes and threads at once (host tasks: under runsc every sandbox address space is a
  /// host stub process, and the Sentry's and gofer's threads count too).
  uint32_t pids = 4096;
  /// CPU time per wall-clock second, in thousandths of a CPU (1500 = one and a half CPUs).
  uint32_t cpu_millis = 0;
  /// CPU share against other sandboxes when the CPUs are busy: 100 = an even share (cgroup v2
  /// cpu.weight scale, 1..10000; v1 cpu.shares = weight × 1024 / 100).
  uint32_t cpu_weight = 100;
  /// The disk quota: everything the sandbox writes outside memory (its workspace and its
  /// writable root) is on an ext4 filesystem of its own of this size (a sparse, loop-mounted
  /// image: the host pays only what is used); filling it fails with ENOSPC inside and is an
  /// on_limit_reached. 0: no quota (the sandbox writes to the host's filesystem); else at least
  /// min_disk_bytes.
  uint64_t disk_bytes = 10ull << 30;
};

/// The smallest disk quota (ext4 needs room for its own metadata).
inline constexpr uint64_t min_disk_bytes = 16ull << 20;

/// Settings every backend shares.
struct runtime_options {
  /// Per-sandbox directories (workspace, control socket, backend files) are created under here
  /// and deleted when the sandbox ends.
  std::filesystem::path sandboxes_dir;
  /// Read-only root filesystem. Empty: a "host tree" root made of read-only bind mounts of the
  /// host's /usr (plus the merged-/usr symlinks), prepared under `sandboxes_dir/../rootfs-host`.
  std::filesystem::path rootfs;
  /// Host path of the ferry-init binary; bind-mounted read-only into every sandbox.
  std::filesystem::path init_binary;
  /// Output ferry-init keeps per stream for a host that re-attaches (at least 64 KiB).
  uint64_t output_buffer_bytes = 8u << 20;
  /// How long a sandbox whose command has ended (or not started) waits for a host to attach
  /// before it ends itself, its exit status unreported.
  std::chrono::milliseconds linger = std::chrono::minutes(10);
  /// The egress proxy. Set: every sandbox gets a unix socket of its own from it (in its
  /// control directory, `/.ferry/ctl/egress.sock` inside) and ferry-init relays
  /// 127.0.0.1:`proxy_port` inside to it (HTTP_PROXY/HTTPS_PROXY point there). runsc then needs
  /// `--host-uds=all` (the control socket is then reachable from inside too, as it always is
  /// under bwrap; the key's handshake makes that safe, see README). Null: sandboxes have no way
  /// out.
  std::shared_ptr<egress_binder> egress;
  uint16_t proxy_port = 3128;
  sandbox_limits limits;
  /// A writable layer over the read-only root per sandbox (overlayfs, on its disk): a command
  /// may write anywhere in its root (e.g. install packages) and it is gone with the sandbox; the
  /// image itself is never written. False (or a host without overlayfs, said loudly): the root
  /// is read-only and only /workspace, /tmp and /dev/shm are writable.
  bool writable_root = true;
  /// Sandbox disks kept formatted and mounted ahead (a start takes one in ~0.3 ms instead of
  /// making one in 25-50 ms); refilled in the background. 0: made at each start.
  size_t spare_disks = 2;
  /// Where each sandbox's cgroup goes, below the root of each cgroup hierarchy (v2: the unified
  /// one; v1: memory, pids, cpu): `<cgroup_parent>/<runtime>-<sandbox id>`. Ferry makes it before
  /// the sandbox starts, writes the limits, reads after the sandbox's end which limit it hit,
  /// and removes it. Empty, or no cgroup can be made here: runsc applies the limits in cgroups
  /// of its own (a hit is then not named), bwrap falls back to rlimits; either says so loudly.
  std::string cgroup_parent = "ferry";
};

/// What only the gVisor backend needs.
struct runsc_settings {
  /// The runsc binary.
  std::string runsc = "runsc";
  /// Where runsc keeps container state (`runsc --root`).
  std::filesystem::path state_dir;
  /// Pass --ignore-cgroups (needed under `ip netns exec`; the limits are then not applied).
  bool ignore_cgroups = false;
  /// Extra global runsc flags (e.g. "--debug").
  std::vector<std::string> extra_flags;
};

/// What only the bubblewrap backend needs.
struct bwrap_settings {
  /// The bwrap binary.
  std::string bwrap = "bwrap";
  /// Each sandbox runs as its own host uid and gid (uid 0 inside its user namespace), taken from
  /// [uid_base, uid_base + uid_count); none of them may belong to anything else on the host.
  uint32_t uid_base = 200000;
  uint32_t uid_count = 65536;
  /// Size of the sandbox's /tmp (a tmpfs; it also counts against memory_bytes).
  uint64_t tmp_bytes = 1ull << 30;
};

struct runsc_options : runtime_options, runsc_settings {};
struct bwrap_options : runtime_options, bwrap_settings {};

/// The gVisor backend. Fails if runsc is missing or the directories cannot be created.
result<std::unique_ptr<sandbox_runtime>> make_runsc_runtime(runsc_options opts);

/// The bubblewrap backend (namespaces + a seccomp filter on the host kernel; see README for what
/// differs from gVisor). Fails if bwrap is missing or the directories cannot be created.
result<std::unique_ptr<sandbox_runtime>> make_bwrap_runtime(bwrap_options opts);

/// Which backend `make_runtime` uses.
enum class backend_choice {
  automatic,  ///< runsc if a probe sandbox runs on this host, else bwrap (logged loudly)
  runsc,
  bwrap,
};
/// "auto", "runsc" or "bwrap".
result<backend_choice> parse_backend_choice(std::string_view name);
std::string_view to_string(backend_choice c);

struct runtime_config : runtime_options {
  backend_choice backend = backend_choice::automatic;
  runsc_settings runsc;
  bwrap_settings bwrap;
};

/// The backend `config` asks for. `automatic` starts one probe sandbox with runsc (once per
/// call: a second or two) and falls back to bwrap if that fails, saying so on stderr; the
/// chosen runtime's name() says which one it is.
result<std::unique_ptr<sandbox_runtime>> make_runtime(const runtime_config& config);

}  // namespace ferry::sandbox
