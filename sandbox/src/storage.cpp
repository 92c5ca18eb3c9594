// storage: each sandbox's disk, workspace and writable root on the host (storage.h).

#include "storage.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <string>
#include <system_error>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"
#include "root_layer.h"

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;

namespace {

/// Where the runtimes of one sandboxes directory keep their spare disks: next to it (the
/// disks move into it by rename, so the same filesystem), not in it (it holds sandboxes only).
fs::path disks_dir(const fs::path& sandboxes_dir) {
  return sandboxes_dir.parent_path() / (sandboxes_dir.filename().string() + "-disks");
}

std::string errno_message(int e) { return std::error_code(e, std::system_category()).message(); }

/// Locks `path` (created if missing) without waiting; an invalid fd if another holds it.
unique_fd try_lock(const fs::path& path) {
  unique_fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd || ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0)
    return unique_fd();
  return fd;
}

/// Stocks of runtimes that are gone (their lock is free): unmounted and deleted.
void clear_dead_stocks(const fs::path& disks) {
  std::error_code ec;
  for (fs::directory_iterator it(disks, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().extension() != ".lock")
      continue;
    unique_fd lock = try_lock(it->path());
    if (!lock)
      continue;  // its runtime is alive
    const fs::path dir = disks / it->path().stem();
    { disk_stock gone(dir, disk_spec{}, 0); }  // clears what is there, then deletes the directory
    std::error_code rm;
    fs::remove(it->path(), rm);
  }
}

/// Makes `path` a directory with `mode` (also if it exists).
result<void> make_dir(const fs::path& path, fs::perms mode) {
  std::error_code ec;
  fs::create_directory(path, ec);
  if (!ec)
    fs::permissions(path, mode, ec);
  if (ec)
    return fail(fmt::format("cannot create {}: {}", path.string(), ec.message()));
  return {};
}

}  // namespace

std::shared_ptr<sandbox_storage> sandbox_storage::make(const fs::path& sandboxes_dir, uint64_t disk_bytes,
                                                       size_t spare_disks, bool writable_root,
                                                       const fs::path& probe_root,
                                                       std::optional<uid_t> probe_map_root_to, std::string_view backend) {
  static std::atomic<uint64_t> runtimes{0};
  std::shared_ptr<sandbox_storage> s(new sandbox_storage());
  const fs::path disks = disks_dir(sandboxes_dir);
  std::error_code ec;
  fs::create_directories(disks, ec);
  clear_dead_stocks(disks);
  const std::string name = fmt::format("{}-{}", ::getpid(), runtimes.fetch_add(1));
  // This runtime's directory (its probe, then its stock), held by its lock until it goes: a
  // runtime that dies at any point leaves it to the next one (clear_dead_stocks).
  s->stock_dir_ = disks / name;
  s->stock_lock_ = try_lock(disks / (name + ".lock"));
  const fs::path probe = s->stock_dir_ / "probe";
  auto warn = [&](std::string_view what, const std::string& why, std::string_view consequence) {
    std::fprintf(stderr, "ferry: WARNING: %.*s runtime: %.*s: %s; %.*s\n", static_cast<int>(backend.size()),
                 backend.data(), static_cast<int>(what.size()), what.data(), why.c_str(),
                 static_cast<int>(consequence.size()), consequence.data());
  };

  // One probe sandbox directory: its disk (when there is a quota), then the overlay on it.
  if (!s->stock_lock_) {
    warn("cannot probe sandbox storage", fmt::format("cannot lock {}.lock", s->stock_dir_.string()),
         "sandboxes get no disk quota and a read-only root");
    return s;
  }
  result<void> dirs = make_dir(s->stock_dir_, fs::perms(0700));
  if (dirs)
    dirs = make_dir(probe, fs::perms(0700));
  if (!dirs) {
    warn("cannot probe sandbox storage", dirs.error().message, "sandboxes get no disk quota and a read-only root");
    return s;
  }
  if (disk_bytes > 0) {
    disk_spec spec;
    spec.bytes = disk_bytes;
    if (auto r = create_disk(probe / "disk.img", probe / "disk", spec); r) {
      s->quota_bytes_ = disk_bytes;
    } else {
      warn("cannot make sandbox disks (loop devices and ext4 are needed)", r.error().message,
           "sandboxes write to the host's filesystem WITHOUT A DISK QUOTA");
    }
  }
  if (writable_root) {
    const fs::path disk = probe / "disk";
    result<void> r = make_dir(disk, fs::perms(0755));
    for (const char* d : {"upper", "work"})
      if (r)
        r = make_dir(disk / d, fs::perms(0755));
    if (r)
      r = mount_root_layer({{probe_root}, disk / "upper", disk / "work", probe / "root", probe_map_root_to});
    if (r)
      s->writable_root_ = true;
    else
      warn("cannot mount writable roots (overlayfs)", r.error().message,
           "sandboxes get a read-only root (they can write /workspace, /tmp and /dev/shm only)");
  }
  if (auto r = release(probe); !r)
    warn("cannot remove the storage probe", r.error().message, "it is left in place");
  else
    fs::remove_all(probe, ec);

  if (s->quota_bytes_ > 0 && spare_disks > 0) {
    disk_spec spec;
    spec.bytes = disk_bytes;
    s->stock_ = std::make_unique<disk_stock>(s->stock_dir_, spec, spare_disks);
  }
  return s;
}

sandbox_storage::~sandbox_storage() {
  stock_.reset();  // unmounts and deletes the spare disks
  if (stock_lock_) {
    { disk_stock gone(stock_dir_, disk_spec{}, 0); }  // whatever is left (a probe), and the directory
    std::error_code ec;
    fs::remove(stock_dir_.parent_path() / (stock_dir_.filename().string() + ".lock"), ec);
  }
}

result<void> sandbox_storage::prepare(const fs::path& dir) {
  const fs::path disk = dir / "disk";
  if (quota_bytes_ > 0) {
    result<void> made;
    if (stock_) {
      made = stock_->take(dir / "disk.img", disk);
    } else {
      disk_spec spec;
      spec.bytes = quota_bytes_;
      made = create_disk(dir / "disk.img", disk, spec);
    }
    if (!made)
      return fail(fmt::format("its disk: {}", made.error().message));
  }
  if (auto r = make_dir(disk, fs::perms(0755)); !r)
    return r;
  // The root layer's upper directory becomes the root directory's mode: 0755 like any root.
  for (const char* d : {"workspace", "upper", "work"})
    if (auto r = make_dir(disk / d, fs::perms(0755)); !r)
      return r;
  const fs::path workspace = dir / "workspace";
  if (auto r = make_dir(workspace, fs::perms(0755)); !r)
    return r;
  if (quota_bytes_ > 0 &&
      ::mount((disk / "workspace").c_str(), workspace.c_str(), nullptr, MS_BIND, nullptr) != 0)
    return fail(fmt::format("cannot bind {} to {}: {}", (disk / "workspace").string(), workspace.string(),
                            errno_message(errno)));
  return {};
}

result<fs::path> sandbox_storage::mount_root(const fs::path& dir, const fs::path& rootfs,
                                             const std::vector<fs::path>& layers,
                                             std::optional<uid_t> map_root_to) const {
  if (!writable_root_) {
    if (!layers.empty())
      return fail(errc::invalid_argument, "layers need a writable root, which this runtime does not have");
    return rootfs;
  }
  const fs::path disk = dir / "disk";
  std::vector<fs::path> lowers = layers;
  lowers.push_back(rootfs);
  if (auto r = mount_root_layer({lowers, disk / "upper", disk / "work", dir / "root", map_root_to}); !r)
    return fail(fmt::format("its writable root: {}", r.error().message));
  return dir / "root";
}

result<void> sandbox_storage::save_layer(const fs::path& dir, const fs::path& dest) {
  const fs::path upper = dir / "disk" / "upper";
  std::error_code ec;
  struct stat st {};
  if (!is_mount_point(dir / "root") || ::lstat(upper.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return fail(errc::invalid_argument, "the sandbox has no writable root to save");
  if (fs::exists(dest, ec) || ec)
    return fail(errc::invalid_argument, fmt::format("cannot save the root layer to {}: it exists", dest.string()));
  const fs::path partial = dest.parent_path() / fmt::format(".{}.partial-{}", dest.filename().string(), ::getpid());
  fs::remove_all(partial, ec);
  // cp -a: the tree as it is, with modes, owners, times, symlinks, device nodes (overlayfs's
  // whiteouts are 0/0 character devices) and extended attributes (trusted.overlay.opaque).
  auto copied = run_command({"cp", "-a", "--", upper.string(), partial.string()}, std::chrono::minutes(30));
  if (!copied || !copied->status.ok()) {
    fs::remove_all(partial, ec);
    return fail(fmt::format("cannot copy the root layer to {}: {}", partial.string(),
                            copied ? copied->output : copied.error().message));
  }
  // What the sandbox's uid owns is its root's: 0 in a layer (idmapped again when used).
  const uid_t owner = st.st_uid;
  if (owner != 0) {
    auto normalise = [&](const fs::path& p) -> bool {
      struct stat f {};
      if (::lstat(p.c_str(), &f) != 0)
        return false;
      const uid_t u = f.st_uid == owner ? 0 : f.st_uid;
      const gid_t g = f.st_gid == owner ? 0 : f.st_gid;
      return (u == f.st_uid && g == f.st_gid) || ::lchown(p.c_str(), u, g) == 0;
    };
    bool ok = normalise(partial);
    for (fs::recursive_directory_iterator it(partial, ec), end; ok && !ec && it != end; it.increment(ec))
      ok = normalise(it->path());
    if (!ok || ec) {
      fs::remove_all(partial, ec);
      return fail(fmt::format("cannot give the root layer in {} to root", partial.string()));
    }
  }
  if (::rename(partial.c_str(), dest.c_str()) != 0) {
    const int e = errno;
    fs::remove_all(partial, ec);
    return fail(fmt::format("cannot move the root layer to {}: {}", dest.string(), errno_message(e)));
  }
  return {};
}

std::optional<disk_usage> sandbox_storage::usage(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir / "disk.img", ec))
    return std::nullopt;
  auto u = usage_of(dir / "disk");
  if (!u)
    return std::nullopt;
  return *u;
}

result<void> sandbox_storage::release(const fs::path& dir) {
  if (auto r = unmount_below(dir); !r)
    return r;
  return remove_disk(dir / "disk.img", dir / "disk");
}

}  // namespace ferry::sandbox::detail
