#pragma once
// ferry_sandbox public header: the sandbox runtime interface and its gVisor (runsc) backend.
//
// A sandbox is one isolated run of ferry-init (PID 1) with a read-only root, a writable
// workspace at /workspace that is deleted when the sandbox ends, and no network. ferry-init runs
// the sandbox's command and reports on it with the framed protocol of schemas/init.fbs over a
// unix socket that outlives the host process: a sandbox survives a crash of the process that
// started it, and a new process can re-attach to it (`attach`) and resume its output.
//
// Threading: `sandbox_runtime` is thread-safe. Each `sandbox` runs one reader thread that calls
// its observer, never concurrently for one sandbox. `sandbox::kill()` and `detach()` may be
// called from any thread. Destroying a sandbox kills it (unless detached) and joins its reader
// thread, so neither the destructor nor `wait()` may be called from the sandbox's own observer.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
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
  /// The command, run by ferry-init inside the sandbox (e.g. {"/bin/sh", "-c", "echo hi"}).
  std::vector<std::string> argv;
  /// Extra environment for the command ("K=V"); PATH, HOME and TERM have sane defaults.
  std::vector<std::string> env;
  /// Id ferry-init reports the command under (CommandStarted/Output/Exited).
  uint32_t command_id = 1;
};

/// Where a host resumes a sandbox's output: the bytes of each stream it already has.
struct resume_point {
  uint32_t command_id = 1;
  uint64_t stdout_bytes = 0;
  uint64_t stderr_bytes = 0;
};

/// Receives what happens in one sandbox. Called on the sandbox's reader thread, in order:
///   on_running? on_command_started? (on_output | on_output_gap)* on_command_exited?
///   on_processes_gone? on_ended
/// on_ended comes exactly once per sandbox object, unless the object was detached (then nothing
/// follows the detach). After `attach`, on_running and on_command_started (same argv) are
/// delivered again for that object.
///
/// Output offsets: the observer counts them. Each stream starts at the resume point's offset (0
/// for `start`); every on_output advances its stream by data.size(), every on_output_gap by
/// lost_bytes. The runtime checks that ferry-init's frames are contiguous with these counts (a
/// mismatch is a protocol error), so the counts are the byte offsets of the command's streams.
class sandbox_observer {
 public:
  virtual ~sandbox_observer() = default;
  /// ferry-init said hello: the sandbox is up (again, after attach).
  virtual void on_running() = 0;
  virtual void on_command_started(uint32_t command_id, const std::vector<std::string>& argv) = 0;
  /// stream: 0 stdout, 1 stderr. `data` is valid only during the call.
  virtual void on_output(uint32_t command_id, int stream, std::string_view data) = 0;
  /// Only after `attach`: `lost_bytes` (≥ 1) of `stream` after the resume point were no longer
  /// kept by the sandbox (it keeps the last runsc_options::output_buffer_bytes per stream while
  /// no host is attached); output continues after them. An observer used with `attach` must
  /// override this to record the loss; the default ignores it.
  virtual void on_output_gap(uint32_t /*command_id*/, int /*stream*/, uint64_t /*lost_bytes*/) {}
  virtual void on_command_exited(uint32_t command_id, int exit_code, int signal,
                                 uint64_t duration_ms) = 0;
  /// Every host process of the sandbox has exited, confirmed at `at` (by kill() or by the
  /// reader thread, whichever saw it); the slower cleanup (runsc delete, files) follows, then
  /// on_ended. Not delivered if the runtime could not confirm it (on_ended then says why).
  virtual void on_processes_gone(std::chrono::steady_clock::time_point /*at*/) {}
  /// The sandbox is gone: no process of it remains and its files are deleted. `failure` is set
  /// when it ended abnormally (runtime error, protocol error, killed) with the reason.
  virtual void on_ended(std::optional<std::string> failure) = 0;
};

/// A running sandbox, owned by this object until it ends or is detached.
class sandbox {
 public:
  virtual ~sandbox() = default;
  virtual const std::string& id() const = 0;
  /// Kills every process of the sandbox at once: SIGKILL to its host processes (Sentry, gofer
  /// and the Sentry's stub processes) through pidfds, then waits until they have all exited.
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
  /// state_dir) that is still alive; output resumes after `from`; on_running is called again
  /// once attached. Errors: errc::not_found if it is gone (or never was), errc::busy if this
  /// runtime or another live host holds it, errc::invalid_argument for a bad id; other failures
  /// (ferry-init refused the resume point, it is not the sandbox's ferry-init) are errc::failed.
  /// A failed attach never kills the sandbox. `observer` must outlive the returned sandbox.
  virtual result<std::unique_ptr<sandbox>> attach(const std::string& id, const resume_point& from,
                                                  sandbox_observer& observer) = 0;
  /// Ids of sandboxes left by an earlier process that are still alive (attachable): their
  /// processes run and ferry-init listens. Sandboxes held by this runtime are not listed.
  virtual result<std::vector<std::string>> list_live() = 0;
  /// Kills and deletes every leftover sandbox (alive or not) except those in `keep` and those
  /// held by this runtime: kills its processes, deletes the runsc container and its files.
  /// Returns how many it cleaned up.
  virtual result<size_t> cleanup_orphans(const std::set<std::string>& keep = {}) = 0;
};

struct runsc_options {
  /// The runsc binary.
  std::string runsc = "runsc";
  /// Where runsc keeps container state (`runsc --root`).
  std::filesystem::path state_dir;
  /// Per-sandbox directories (bundle + workspace) are created under here and deleted at the end.
  std::filesystem::path sandboxes_dir;
  /// Read-only root filesystem. Empty: a "host tree" root made of read-only bind mounts of the
  /// host's /usr (plus the merged-/usr symlinks), prepared under `sandboxes_dir/../rootfs-host`.
  std::filesystem::path rootfs;
  /// Host path of the ferry-init binary; bind-mounted read-only into every sandbox.
  std::filesystem::path init_binary;
  /// Pass --ignore-cgroups (needed under `ip netns exec`).
  bool ignore_cgroups = false;
  /// Output ferry-init keeps per stream for a host that re-attaches (at least 64 KiB).
  uint64_t output_buffer_bytes = 8u << 20;
  /// How long a sandbox whose command has ended (or not started) waits for a host to attach
  /// before it ends itself, its exit status unreported.
  std::chrono::milliseconds linger = std::chrono::minutes(10);
  /// Extra global runsc flags (e.g. "--debug").
  std::vector<std::string> extra_flags;
};

/// The gVisor backend. Fails if runsc is missing or the directories cannot be created.
result<std::unique_ptr<sandbox_runtime>> make_runsc_runtime(runsc_options opts);

}  // namespace ferry::sandbox
