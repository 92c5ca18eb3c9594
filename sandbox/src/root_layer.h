#pragma once
// Private to ferry_sandbox: a sandbox's writable root. The image (or the host-tree root) stays
// read-only and shared; each sandbox gets an overlayfs over it whose upper layer lives on the
// sandbox's own disk (quota_disk.h), so what it writes outside /workspace counts against its
// quota and is deleted with it.
//
// bubblewrap runs a sandbox as a host uid of its own, for which the image's root-owned files are
// not writable. For it the lower layers are idmapped (a detached clone of each mount, with
// MOUNT_ATTR_IDMAP through a user namespace mapping 0 to that uid): inside the sandbox, root's
// files of the image are its root's, and what it writes lands in the upper layer owned by that
// uid. (An idmapped overlayfs itself is refused by the kernel, EINVAL; idmapped layers are not.)
//
// Needs root (mount, and for the idmap a user namespace made by a short-lived child).
//
// Threading: free functions, safe from any thread; each works on its own paths.

#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::sandbox::detail {

struct root_layer_spec {
  /// Read-only layers, topmost first (the image last).
  std::vector<std::filesystem::path> lowers;
  /// The writable layer and overlayfs's work directory: empty directories on one filesystem.
  std::filesystem::path upper;
  std::filesystem::path work;
  /// Where the merged root is mounted (created if missing).
  std::filesystem::path target;
  /// Show the lower layers' uid/gid 0 as this host uid/gid (bubblewrap's sandbox uid); the
  /// upper directory is then chowned to it too.
  std::optional<uid_t> map_root_to;
};

/// Mounts the overlay `nosuid,nodev`. On failure nothing stays mounted.
result<void> mount_root_layer(const root_layer_spec& spec);

/// Unmounts everything mounted at or below `dir` (deepest first; lazily, MNT_DETACH, if busy), so that
/// deleting `dir` afterwards cannot reach into another filesystem. Fails if a mount stays.
result<void> unmount_below(const std::filesystem::path& dir);

}  // namespace ferry::sandbox::detail
