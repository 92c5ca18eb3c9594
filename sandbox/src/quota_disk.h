#pragma once
// Private to ferry_sandbox: the disk quota of a sandbox. Everything a sandbox may write (its
// workspace, its writable root layer) lives on a filesystem of its own: a sparse ext4 image,
// loop-mounted `nosuid,nodev,noatime`. Filling it fails inside the sandbox with ENOSPC and
// touches nothing on the host; deleting the sandbox unmounts it and deletes the image.
//
// Formatting costs ~25-50 ms and mounting ~15-30 ms here, too much for a sandbox start
// (runsc itself takes ~150-200 ms): a `disk_stock` keeps a few disks formatted and mounted
// ahead, and a start only moves one into place (MS_MOVE, microseconds); a background thread
// refills the stock.
//
// Threading: quota_disk functions are free functions, safe from any thread (each works on
// its own paths). disk_stock is thread-safe.
//
// Needs root (loop devices, mount). The loop device is set up with LO_FLAGS_AUTOCLEAR, so it is
// released by the last unmount, also after a lazy (MNT_DETACH) one.

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::sandbox::detail {

/// The size and owner of a sandbox's disk.
struct disk_spec {
  uint64_t bytes = 10ull << 30;  ///< the quota: the filesystem's size (sparse on the host)
  uid_t owner_uid = 0;           ///< owner of the filesystem's root directory
  gid_t owner_gid = 0;
};

/// How full a mounted disk is (statvfs).
struct disk_usage {
  uint64_t total_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t free_bytes = 0;  ///< what an unprivileged writer can still use
  /// Whether it is practically full: a big write fails. Left at most 1% of it, but at least
  /// 4 MiB and at most 64 MiB (writes of a megabyte fail whole when less is left).
  bool full() const;
};

/// Creates `image` (sparse, spec.bytes) with an ext4 filesystem and mounts it on `mountpoint`
/// (created if missing). On failure nothing is left behind.
result<void> create_disk(const std::filesystem::path& image, const std::filesystem::path& mountpoint,
                         const disk_spec& spec);

/// Formats `image` only (mkfs.ext4, no journal: a sandbox's disk does not outlive a host crash).
result<void> format_disk(const std::filesystem::path& image, const disk_spec& spec);

/// Mounts the formatted `image` on `mountpoint` (created if missing) through a free loop device.
result<void> mount_disk(const std::filesystem::path& image, const std::filesystem::path& mountpoint);

/// Usage of the filesystem mounted on `mountpoint`.
result<disk_usage> usage_of(const std::filesystem::path& mountpoint);

/// Every mount point at or below `root` (absolute, clean), as /proc/self/mountinfo lists them
/// (a mount comes after the one it sits on).
std::vector<std::filesystem::path> mounts_at_or_below(const std::filesystem::path& root);

/// Whether something is mounted on `path` (it is a mount point, per /proc/self/mountinfo).
bool is_mount_point(const std::filesystem::path& path);

/// Unmounts whatever is mounted on `mountpoint` (and below it), lazily if still busy after a
/// few tries, then deletes `image` and the empty mount point. Missing pieces are fine: this is
/// also the cleanup of a half-made or orphaned disk.
result<void> remove_disk(const std::filesystem::path& image, const std::filesystem::path& mountpoint);

/// Formatted and mounted disks, made ahead in `dir` by a background thread (at most `target`).
/// take() moves one to where a sandbox wants it, or makes one there when the stock is empty.
/// Layout: `dir/images/spare-N.img`, mounted on `dir/mnt/spare-N`; `dir/mnt` is a private bind
/// mount of itself (MS_MOVE refuses to move a mount off a shared one, and systemd makes / shared).
/// Images move by rename(): `dir` must be on the filesystem of the sandboxes' directories.
class disk_stock {
 public:
  /// Clears what an earlier process left in `dir` (unmounts, deletes) and starts filling it.
  /// target 0: no stock; take() always makes the disk.
  disk_stock(std::filesystem::path dir, disk_spec spec, size_t target);
  ~disk_stock();  ///< stops the filler; removes the disks still in stock

  disk_stock(const disk_stock&) = delete;
  disk_stock& operator=(const disk_stock&) = delete;

  /// A mounted disk of this stock's spec at `mountpoint` with its image at `image`.
  result<void> take(const std::filesystem::path& image, const std::filesystem::path& mountpoint);

  const disk_spec& spec() const { return spec_; }
  /// Disks ready now (for tests and the benchmark).
  size_t ready() const;
  /// Blocks until `n` disks are ready or `timeout` passed; whether they are.
  bool wait_ready(size_t n, std::chrono::milliseconds timeout) const;
  /// The last error of the filler ("" when it is fine).
  std::string last_error() const;

 private:
  struct spare {
    std::filesystem::path image;
    std::filesystem::path mountpoint;
  };
  void fill();

  const std::filesystem::path dir_;
  const disk_spec spec_;
  const size_t target_;
  mutable std::mutex mtx_;
  mutable std::condition_variable cv_;
  std::deque<spare> spares_;  // GUARDED_BY(mtx_)
  uint64_t next_ = 0;         // GUARDED_BY(mtx_)
  bool stopping_ = false;     // GUARDED_BY(mtx_)
  std::string error_;         // GUARDED_BY(mtx_)
  std::thread filler_;
};

}  // namespace ferry::sandbox::detail
