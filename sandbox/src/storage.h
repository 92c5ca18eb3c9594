#pragma once
// Private to ferry_sandbox: what a sandbox may write, and where it lives on the host. Shared by
// both backends (hosted.cpp and each backend's prepare).
//
// In the sandbox directory `<sandboxes_dir>/<id>/`:
//   disk.img    the sandbox's disk (quota_disk.h), with a quota (sandbox_limits::disk_bytes):
//   disk/       its mount point (without a quota: a plain directory of the host's filesystem)
//     workspace/  the workspace
//     upper/ work/  the writable root's layer and overlayfs's work directory
//   workspace/  a bind mount of disk/workspace (without a quota: the workspace itself)
//   root/       the writable root: overlayfs of disk/upper over the read-only root (root_layer.h)
// So everything a sandbox writes — in /workspace and anywhere in its root — is on its own disk,
// counted against its quota, and deleted with it; `/tmp` and `/dev/shm` are memory (counted
// against its memory limit). Deleting the sandbox unmounts all of it first (`release`).
//
// Disks come from a `disk_stock` of this runtime (`<sandboxes_dir>-disks/<pid>-<n>/`, next to
// the sandboxes directory, held by an flock on `<pid>-<n>.lock`): a runtime clears the stocks
// of runtimes that are gone.
//
// Threading: thread-safe (the stock is; everything else works on one sandbox's paths).

#include <sys/types.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "ferry/schemas/result.h"
#include "quota_disk.h"
#include "unique_fd.h"

namespace ferry::sandbox::detail {

class sandbox_storage {
 public:
  /// Probes once what this host allows (a disk of the quota made and removed, an overlay mounted
  /// over `probe_root`, idmapped as the backend will) and says loudly on stderr what it cannot do: without loop devices and ext4
  /// there is no disk quota (sandboxes write to the host's filesystem), without overlayfs the root
  /// is read-only. `disk_bytes` 0: no quota; `spare_disks`: disks kept ready.
  static std::shared_ptr<sandbox_storage> make(const std::filesystem::path& sandboxes_dir, uint64_t disk_bytes,
                                               size_t spare_disks, bool writable_root,
                                               const std::filesystem::path& probe_root,
                                               std::optional<uid_t> probe_map_root_to, std::string_view backend);
  ~sandbox_storage();

  uint64_t quota_bytes() const { return quota_bytes_; }
  bool writable_root() const { return writable_root_; }

  /// Makes `dir`'s disk/ (its own disk with a quota), workspace/ (mode 0755) and the root
  /// layer's directories. On failure the caller removes the sandbox with `release`.
  result<void> prepare(const std::filesystem::path& dir);

  /// The root a backend gives sandbox `dir`: `rootfs` itself (read-only), or with a writable root
  /// `dir`/root, an overlay over `layers` (topmost first, sandbox_spec::layers) and `rootfs`,
  /// mounted here (`map_root_to`: see root_layer_spec).
  result<std::filesystem::path> mount_root(const std::filesystem::path& dir, const std::filesystem::path& rootfs,
                                           const std::vector<std::filesystem::path>& layers,
                                           std::optional<uid_t> map_root_to) const;

  /// Copies sandbox `dir`'s writable layer to the new directory `dest` (see
  /// sandbox::save_root_layer); the upper directory's owner (bubblewrap: the sandbox's uid)
  /// becomes 0 in the copy. REQUIRES: nothing writes to the root meanwhile.
  static result<void> save_layer(const std::filesystem::path& dir, const std::filesystem::path& dest);

  /// Whether sandbox `dir` has a disk of its own, and how full it is.
  static std::optional<disk_usage> usage(const std::filesystem::path& dir);

  /// Unmounts everything mounted in sandbox `dir` and deletes its disk image; `dir` can then
  /// be deleted without reaching into another filesystem. Fine for half-made and orphaned ones.
  static result<void> release(const std::filesystem::path& dir);

 private:
  sandbox_storage() = default;

  uint64_t quota_bytes_ = 0;
  bool writable_root_ = false;
  std::unique_ptr<disk_stock> stock_;
  std::filesystem::path stock_dir_;
  unique_fd stock_lock_;
};

}  // namespace ferry::sandbox::detail
