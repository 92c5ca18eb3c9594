#pragma once
// ferry_sandbox public header: the sandbox runtime interface and its gVisor (runsc) backend.
//
// A sandbox is one isolated run of ferry-init (PID 1) with a read-only root, a writable
// workspace at /workspace that is deleted when the sandbox ends, and no network. ferry-init runs
// the sandbox's command and reports on it over its stdout with the framed protocol of
// schemas/init.fbs; the runtime decodes those frames and calls the observer.
//
// Threading: `sandbox_runtime` is thread-safe. Each `sandbox` runs one reader thread that calls
// its observer, never concurrently for one sandbox. `sandbox::kill()` may be called from any
// thread. Destroying a sandbox kills it and joins its reader thread, so neither the destructor
// nor `wait()` may be called from the sandbox's own observer.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
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

/// Receives what happens in one sandbox. Called on the sandbox's reader thread, in order:
/// on_running? on_command_started? on_output* on_command_exited? on_ended (exactly once).
class sandbox_observer {
 public:
  virtual ~sandbox_observer() = default;
  /// ferry-init said hello: the sandbox is up.
  virtual void on_running() = 0;
  virtual void on_command_started(uint32_t command_id, const std::vector<std::string>& argv) = 0;
  /// stream: 0 stdout, 1 stderr. `data` is valid only during the call.
  virtual void on_output(uint32_t command_id, int stream, std::string_view data) = 0;
  virtual void on_command_exited(uint32_t command_id, int exit_code, int signal,
                                 uint64_t duration_ms) = 0;
  /// The sandbox is gone: no process of it remains and its files are deleted. `failure` is set
  /// when it ended abnormally (runtime error, protocol error, killed) with the reason.
  virtual void on_ended(std::optional<std::string> failure) = 0;
};

/// A running sandbox.
class sandbox {
 public:
  virtual ~sandbox() = default;
  virtual const std::string& id() const = 0;
  /// Kills every process of the sandbox at once (SIGKILL to the whole tree). Returns after the
  /// runtime confirmed the kill or gave up; on_ended follows on the reader thread.
  virtual void kill() = 0;
  /// Blocks until on_ended has been delivered.
  virtual void wait() = 0;
};

/// A way to create sandboxes.
class sandbox_runtime {
 public:
  virtual ~sandbox_runtime() = default;
  /// "runsc" or "bwrap".
  virtual std::string_view name() const = 0;
  /// Creates and starts a sandbox. `observer` must outlive the returned sandbox.
  virtual result<std::unique_ptr<sandbox>> start(const sandbox_spec& spec,
                                                 sandbox_observer& observer) = 0;
  /// Deletes sandboxes left behind by an earlier process (after a crash): kills their processes
  /// and removes their files. Returns how many it cleaned up.
  virtual result<size_t> cleanup_orphans() = 0;
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
  /// Extra global runsc flags (e.g. "--debug").
  std::vector<std::string> extra_flags;
};

/// The gVisor backend. Fails if runsc is missing or the directories cannot be created.
result<std::unique_ptr<sandbox_runtime>> make_runsc_runtime(runsc_options opts);

}  // namespace ferry::sandbox
