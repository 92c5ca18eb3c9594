#pragma once
// Private to ferry_sandbox: what every backend shares. A backend (runsc_runtime.cpp,
// bwrap_runtime.cpp) says how one sandbox's processes are started, found, killed and cleaned up
// (`sandbox_driver`) and what files a new sandbox needs (`backend::prepare`); the sandbox object
// (reader thread, control socket, kill, detach, teardown, the exactly-once on_ended) and the
// runtime (ids, the sandbox directories, attach, list_live, cleanup_orphans) are the same for all
// and live in hosted.cpp. Both talk to ferry-init through init_client.
//
// On disk, for every backend: `<sandboxes_dir>/<id>/` (creating it claims the id; removing it is
// the last step before on_ended) with `workspace/`, `disk/` and `root/` (storage.h),
// `ctl/init.sock`, `key` (the sandbox's handshake key, 0600, hex) and `command_line`; the
// backend adds its own files. With cgroups, each
// sandbox has `<cgroup_parent>/<cgroup_prefix><id>` in every hierarchy, made before its launch and
// removed after its processes (hits read first: on_limit_reached).
//
// Threading: `backend` and `sandbox_driver` implementations are called from any thread, but a
// driver never concurrently with itself (the sandbox object serialises its calls, or the runtime
// holds the id).

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/sandbox/sandbox.h"
#include "cgroup_limits.h"
#include "ferry/schemas/handshake.h"
#include "held_process.h"
#include "storage.h"
#include "unique_fd.h"

namespace ferry::sandbox::detail {

// Inside every sandbox: where ferry-init is bound, where the control directory is mounted.
inline constexpr std::string_view init_path = "/.ferry/init";
inline constexpr std::string_view ctl_mount = "/.ferry/ctl";
inline constexpr std::string_view socket_name = "init.sock";
/// The egress proxy's socket of a sandbox, in its control directory (egress_binder).
inline constexpr std::string_view egress_socket_name = "egress.sock";
/// ferry-init's variable for the sandbox's egress credential (sandbox/init: egress_token_prefix).
inline constexpr std::string_view egress_token_variable = "FERRY_EGRESS_TOKEN";
inline constexpr std::string_view default_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
// In the sandbox directory: the command line's id (absent for an idle sandbox), and the key.
inline constexpr std::string_view command_line_file = "command_line";
inline constexpr std::string_view key_file = "key";

/// runtime_options checked and made absolute; immutable once built.
struct common_settings {
  std::filesystem::path sandboxes_dir;
  std::filesystem::path rootfs;
  /// Host directories to bind read-only at the same place (host-tree root only).
  std::vector<std::filesystem::path> host_binds;
  std::filesystem::path init_binary;
  uint64_t output_buffer_bytes = 0;
  std::chrono::milliseconds linger{0};
  std::shared_ptr<egress_binder> egress;  // null: no HTTP forwarder
  uint16_t proxy_port = 0;
  sandbox_limits limits;
  /// Where the sandboxes' cgroups go (runtime_options::cgroup_parent), empty when this host has
  /// none Ferry can make (checked once by making and removing one); and what starts each group's
  /// name, set apart from other runtimes' (a hash of sandboxes_dir).
  std::string cgroup_parent;
  std::string cgroup_prefix;
  /// The name of sandbox `id`'s cgroup below cgroup_parent.
  std::string cgroup_id(const std::string& id) const { return cgroup_prefix + id; }
  /// Each sandbox's disk, workspace and writable root (never null).
  std::shared_ptr<sandbox_storage> storage;
};

/// The file with a sandbox's own stdout and stderr (the backend's and ferry-init's): on its disk
/// (storage.h), so that a command writing to it through ferry-init's descriptors
/// (/proc/1/fd/1) fills its own quota, not the host.
inline std::filesystem::path log_path(const std::filesystem::path& dir, std::string_view name) {
  return dir / "disk" / std::string(name);
}

/// FNV-1a, for stable names derived from paths.
uint64_t fnv1a(std::string_view s);

/// Checks `opts` (errors start with "<backend> runtime: "), creates sandboxes_dir and, without
/// a rootfs, prepares the host-tree root next to it. With `use_cgroups`, probes that a cgroup
/// can be made under opts.cgroup_parent, and says loudly on stderr when not (the sandboxes' limits
/// are then `fallback`). Probes the sandboxes' storage likewise (`map_root_to`: the backend
/// idmaps the root to a uid like this one; see storage.h).
result<common_settings> check_options(const runtime_options& opts, std::string_view backend, bool use_cgroups,
                                      std::string_view fallback, std::optional<uid_t> map_root_to = std::nullopt);

/// ferry-init's command line in a sandbox of `spec` (its socket, linger, buffer, forwarder).
std::vector<std::string> init_command(const common_settings& s, const sandbox_spec& spec);

/// The sandbox's environment: PATH, HOME=/workspace, TERM=dumb, overridden and extended by
/// spec.env.
std::vector<std::string> sandbox_environment(const sandbox_spec& spec);

/// Writes `path` through a temporary file and rename. The temporary file is created with `perms`
/// (never wider first: the key file is 0600 from its first byte).
result<void> write_file_atomically(const std::filesystem::path& path, std::string_view content,
                                   std::filesystem::perms perms);
std::string describe(const exit_status& s);
/// Without trailing newlines and blanks.
std::string trimmed(std::string s);

/// One sandbox's processes as its backend starts, finds, kills and cleans up after them.
class sandbox_driver {
 public:
  virtual ~sandbox_driver() = default;

  struct launched {
    result<void> status;
    /// What the launch holds, also after a failure (to be killed). procs[0] is the process
    /// whose exit means the sandbox is gone.
    std::vector<held_process> procs;
  };
  /// Starts the sandbox's processes (on the reader thread; `runsc run` takes a while). `key`
  /// reaches ferry-init on its stdin (hex, then end of file) through a pipe that nothing else
  /// in the sandbox can read, and nowhere else.
  virtual launched launch(const wire::handshake_key& key) = 0;
  /// The processes of the sandbox started earlier, maybe by another host process; empty unless
  /// it is alive (procs[0] running).
  virtual std::vector<held_process> find() = 0;
  /// Adds what the held processes started that must be waited for too.
  virtual void hold_more(std::vector<held_process>& procs) = 0;
  /// SIGKILLs the held processes, everything they started and anything else of the sandbox, and
  /// waits until all are gone (without held processes: the backend's slow way). False if some
  /// survive.
  virtual bool kill(std::vector<held_process>& procs) = 0;
  /// After the processes are gone: the backend's own leftovers (runsc's container state, stray
  /// runsc processes). The sandbox's cgroup and directory are removed afterwards by the caller.
  virtual result<void> cleanup() = 0;
  /// The name of the file with the sandbox's own stdout and stderr (log_path; failure reasons
  /// quote its tail).
  virtual std::string_view log_name() const = 0;
};

/// A sandbox backend as hosted.cpp drives it.
class backend {
 public:
  virtual ~backend() = default;
  virtual std::string_view name() const = 0;
  virtual const common_settings& settings() const = 0;
  /// Writes what a new sandbox needs in `dir` besides `workspace/` and `ctl/` (made before).
  /// `cgroup`: the sandbox's cgroup, made with the limits written (null without cgroups); its
  /// processes must go there. hosted.cpp reads it after the sandbox's end and removes it.
  virtual result<void> prepare(const sandbox_spec& spec, const std::filesystem::path& dir,
                               const sandbox_cgroup* cgroup) = 0;
  /// The driver of sandbox `id` (new or found in sandboxes_dir).
  virtual std::unique_ptr<sandbox_driver> driver(const std::string& id) = 0;
};

/// The sandbox_runtime of a backend.
std::unique_ptr<sandbox_runtime> make_hosted_runtime(std::shared_ptr<backend> b);

}  // namespace ferry::sandbox::detail
