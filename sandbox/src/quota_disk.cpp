// quota_disk: a sandbox's own ext4 filesystem on a sparse, loop-mounted image (quota_disk.h).

#include "quota_disk.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <optional>
#include <system_error>
#include <vector>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"
#include "host_paths.h"
#include "unique_fd.h"

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;

namespace {

std::string errno_message(int e) { return std::error_code(e, std::system_category()).message(); }

/// /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
std::string unescape_mount_path(std::string_view s) {
  auto octal = [](char c) { return c >= '0' && c <= '7'; };
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && octal(s[i + 1]) && octal(s[i + 2]) && octal(s[i + 3])) {
      out.push_back(static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}


/// Attaches `image` to a free loop device that goes away with its last user (autoclear).
result<unique_fd> attach_loop(const fs::path& image) {
  unique_fd img(::open(image.c_str(), O_RDWR | O_CLOEXEC));
  if (!img)
    return fail(fmt::format("cannot open disk image {}: {}", image.string(), errno_message(errno)));
  unique_fd ctl(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
  if (!ctl)
    return fail(fmt::format("cannot open /dev/loop-control (loop devices are needed for the "
                            "sandbox disk quota; is the loop module loaded?): {}",
                            errno_message(errno)));
  // Another process may take the free device between asking and configuring it: ask again.
  for (int attempt = 0; attempt < 32; ++attempt) {
    int n = ::ioctl(ctl.get(), LOOP_CTL_GET_FREE);
    if (n < 0)
      return fail(fmt::format("no free loop device: {}", errno_message(errno)));
    const std::string dev = "/dev/loop" + std::to_string(n);
    unique_fd loop(::open(dev.c_str(), O_RDWR | O_CLOEXEC));
    if (!loop) {
      if (errno == ENOENT || errno == ENXIO)
        continue;
      return fail(fmt::format("cannot open {}: {}", dev, errno_message(errno)));
    }
    loop_config cfg{};
    cfg.fd = static_cast<uint32_t>(img.get());
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    std::strncpy(reinterpret_cast<char*>(cfg.info.lo_file_name), image.c_str(), LO_NAME_SIZE - 1);
    if (::ioctl(loop.get(), LOOP_CONFIGURE, &cfg) == 0)
      return loop;
    if (errno == EBUSY)
      continue;
    if (errno != EINVAL && errno != ENOTTY)
      return fail(fmt::format("cannot attach {} to {}: {}", image.string(), dev, errno_message(errno)));
    // Kernels before 5.8 have no LOOP_CONFIGURE: the two-step way.
    if (::ioctl(loop.get(), LOOP_SET_FD, img.get()) != 0) {
      if (errno == EBUSY)
        continue;
      return fail(fmt::format("cannot attach {} to {}: {}", image.string(), dev, errno_message(errno)));
    }
    loop_info64 info{};
    info.lo_flags = LO_FLAGS_AUTOCLEAR;
    std::strncpy(reinterpret_cast<char*>(info.lo_file_name), image.c_str(), LO_NAME_SIZE - 1);
    if (::ioctl(loop.get(), LOOP_SET_STATUS64, &info) != 0) {
      int e = errno;
      ::ioctl(loop.get(), LOOP_CLR_FD, 0);
      return fail(fmt::format("cannot configure {}: {}", dev, errno_message(e)));
    }
    return loop;
  }
  return fail("no free loop device after 32 attempts (others keep taking them)");
}

std::string loop_path(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return {};
  return fmt::format("/dev/loop{}", minor(st.st_rdev));
}

}  // namespace

/// Every mount point at or below `root` (absolute, clean), deepest last as listed.
std::vector<fs::path> mounts_at_or_below(const fs::path& root) {
  std::vector<fs::path> found;
  std::istringstream in(read_small_file("/proc/self/mountinfo"));
  const std::string prefix = root.string();
  for (std::string line; std::getline(in, line);) {
    // id parent major:minor root mount-point options ...
    std::istringstream fields(line);
    std::string id, parent, dev, mroot, point;
    if (!(fields >> id >> parent >> dev >> mroot >> point))
      continue;
    std::string p = unescape_mount_path(point);
    if (p == prefix || (p.size() > prefix.size() && p.compare(0, prefix.size(), prefix) == 0 &&
                        p[prefix.size()] == '/'))
      found.emplace_back(std::move(p));
  }
  return found;
}

bool disk_usage::full() const {
  // A large write fails whole when less than it is left (gVisor's gofer writes megabytes at
  // once: `dd bs=1M` got ENOSPC with ~1 MiB free), so "full" has a margin: 1%, at least 4 MiB
  // and at most 64 MiB.
  const uint64_t margin = std::clamp<uint64_t>(total_bytes / 100, 4ull << 20, 64ull << 20);
  return free_bytes <= margin;
}

result<void> format_disk(const fs::path& image, const disk_spec& spec) {
  if (spec.bytes < (16ull << 20))
    return fail(fmt::format("a sandbox disk of {} bytes is too small (at least 16 MiB)", spec.bytes));
  auto mkfs = find_program("mkfs.ext4");
  if (!mkfs)
    return fail("mkfs.ext4 not found (package e2fsprogs); it makes the sandbox disk quota");
  {
    unique_fd f(::open(image.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!f)
      return fail(fmt::format("cannot create disk image {}: {}", image.string(), errno_message(errno)));
    if (::ftruncate(f.get(), static_cast<off_t>(spec.bytes)) != 0) {
      int e = errno;
      ::unlink(image.c_str());
      return fail(fmt::format("cannot size disk image {} to {} bytes: {}", image.string(), spec.bytes,
                              errno_message(e)));
    }
  }
  // No journal (the disk does not outlive its sandbox, let alone a host crash), no blocks
  // reserved for root (the quota is what the sandbox gets), inode tables initialised lazily.
  auto r = run_command({*mkfs, "-q", "-F", "-m", "0", "-O", "^has_journal", "-E",
                        fmt::format("lazy_itable_init=1,root_owner={}:{}", spec.owner_uid, spec.owner_gid),
                        image.string()},
                       std::chrono::seconds(60));
  if (!r || !r->status.ok()) {
    ::unlink(image.c_str());
    return fail(fmt::format("mkfs.ext4 of {} failed: {}", image.string(),
                            r ? r->output : r.error().message));
  }
  return {};
}

result<void> mount_disk(const fs::path& image, const fs::path& mountpoint) {
  std::error_code ec;
  fs::create_directories(mountpoint, ec);
  if (ec)
    return fail(fmt::format("cannot create {}: {}", mountpoint.string(), ec.message()));
  auto loop = attach_loop(image);
  if (!loop)
    return loop.error();
  const std::string dev = loop_path(loop->get());
  if (::mount(dev.c_str(), mountpoint.c_str(), "ext4", MS_NOSUID | MS_NODEV | MS_NOATIME, "") != 0)
    return fail(fmt::format("cannot mount {} ({}) on {}: {}", image.string(), dev,
                            mountpoint.string(), errno_message(errno)));
  return {};  // closing `loop` leaves it to the mount (autoclear)
}

result<void> create_disk(const fs::path& image, const fs::path& mountpoint, const disk_spec& spec) {
  if (auto ok = format_disk(image, spec); !ok)
    return ok;
  if (auto ok = mount_disk(image, mountpoint); !ok) {
    (void)remove_disk(image, mountpoint);
    return ok;
  }
  return {};
}

result<disk_usage> usage_of(const fs::path& mountpoint) {
  struct statvfs st {};
  if (::statvfs(mountpoint.c_str(), &st) != 0)
    return fail(fmt::format("cannot read the usage of {}: {}", mountpoint.string(), errno_message(errno)));
  disk_usage u;
  u.total_bytes = static_cast<uint64_t>(st.f_blocks) * st.f_frsize;
  u.free_bytes = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  u.used_bytes = u.total_bytes - static_cast<uint64_t>(st.f_bfree) * st.f_frsize;
  return u;
}

bool is_mount_point(const fs::path& path) {
  const fs::path clean = clean_path(path);
  for (const auto& m : mounts_at_or_below(clean))
    if (m == clean)
      return true;
  return false;
}

result<void> remove_disk(const fs::path& image, const fs::path& mountpoint) {
  const fs::path clean = clean_path(mountpoint);
  // Deepest first; a mount stacked on the mount point shows up once per layer.
  for (int round = 0; round < 64; ++round) {
    auto mounts = mounts_at_or_below(clean);
    if (mounts.empty())
      break;
    const fs::path& m = mounts.back();
    bool done = false;
    for (int attempt = 0; attempt < 5 && !done; ++attempt) {
      if (::umount2(m.c_str(), UMOUNT_NOFOLLOW) == 0 || errno == EINVAL || errno == ENOENT)
        done = true;
      else if (errno == EBUSY)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      else
        return fail(fmt::format("cannot unmount {}: {}", m.string(), errno_message(errno)));
    }
    // Still in use (a process that has not died yet holds a file): detach it now; the kernel
    // frees the filesystem and, by autoclear, its loop device once the last user is gone.
    if (!done && ::umount2(m.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0 && errno != EINVAL)
      return fail(fmt::format("cannot detach {}: {}", m.string(), errno_message(errno)));
  }
  std::error_code ec;
  fs::remove(clean, ec);  // empty once unmounted; a non-empty dir here is not ours to delete
  if (::unlink(image.c_str()) != 0 && errno != ENOENT)
    return fail(fmt::format("cannot delete disk image {}: {}", image.string(), errno_message(errno)));
  return {};
}

// --- disk_stock --------------------------------------------------------------------------------

disk_stock::disk_stock(fs::path dir, disk_spec spec, size_t target)
    : dir_(clean_path(dir)), spec_(spec), target_(target) {
  // What an earlier process left: spares mounted in the stock, the stock's own bind mount.
  for (auto m = mounts_at_or_below(dir_); !m.empty(); m = mounts_at_or_below(dir_))
    if (::umount2(m.back().c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0)
      break;
  std::error_code ec;
  fs::remove_all(dir_, ec);
  fs::create_directories(dir_, ec);
  if (target_ == 0)
    return;
  // take() moves a spare's mount (MS_MOVE), which the kernel refuses when the mount it sits on
  // is shared (systemd makes / shared): the stock is a private mount of its own.
  // The images stay outside that mount, or moving one to a sandbox would cross it (EXDEV).
  const fs::path mounts = dir_ / "mnt";
  fs::create_directories(mounts, ec);
  if (!ec)
    fs::create_directories(dir_ / "images", ec);
  if (ec || ::mount(mounts.c_str(), mounts.c_str(), nullptr, MS_BIND, nullptr) != 0 ||
      ::mount(nullptr, mounts.c_str(), nullptr, MS_PRIVATE, nullptr) != 0) {
    error_ = fmt::format("cannot make the disk stock {} a private mount: {}; sandbox disks are "
                         "made at start instead",
                         mounts.string(), ec ? ec.message() : errno_message(errno));
    ::umount2(mounts.c_str(), MNT_DETACH);
    return;
  }
  filler_ = std::thread([this] { fill(); });
}

disk_stock::~disk_stock() {
  {
    std::lock_guard guard(mtx_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (filler_.joinable())
    filler_.join();
  for (const auto& s : spares_)
    (void)remove_disk(s.image, s.mountpoint);
  spares_.clear();
  if (is_mount_point(dir_ / "mnt"))
    ::umount2((dir_ / "mnt").c_str(), MNT_DETACH | UMOUNT_NOFOLLOW);
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

void disk_stock::fill() {
  std::unique_lock lock(mtx_);
  while (!stopping_) {
    if (spares_.size() >= target_) {
      cv_.wait(lock);
      continue;
    }
    const uint64_t n = next_++;
    lock.unlock();
    spare s{dir_ / "images" / fmt::format("spare-{}.img", n), dir_ / "mnt" / fmt::format("spare-{}", n)};
    auto made = create_disk(s.image, s.mountpoint, spec_);
    lock.lock();
    if (made) {
      spares_.push_back(std::move(s));
      error_.clear();
      cv_.notify_all();
    } else {
      error_ = made.error().message;
      std::fprintf(stderr, "ferry sandbox: disk stock: %s (retrying in 1 s)\n", error_.c_str());
      cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_; });
    }
  }
}

result<void> disk_stock::take(const fs::path& image, const fs::path& mountpoint) {
  std::optional<spare> s;
  {
    std::lock_guard guard(mtx_);
    if (!spares_.empty()) {
      s = std::move(spares_.front());
      spares_.pop_front();
    }
  }
  cv_.notify_all();  // the filler makes the next one
  if (s) {
    std::error_code ec;
    fs::create_directories(mountpoint, ec);
    if (!ec && ::mount(s->mountpoint.c_str(), mountpoint.c_str(), nullptr, MS_MOVE, nullptr) == 0) {
      if (::rename(s->image.c_str(), image.c_str()) == 0) {
        fs::remove(s->mountpoint, ec);
        return {};
      }
      // The image stays where it is; the mount is already in place. Remove both.
      int e = errno;
      (void)remove_disk(s->image, mountpoint);
      fs::remove(s->mountpoint, ec);
      return fail(fmt::format("cannot move disk image {} to {}: {}", s->image.string(),
                              image.string(), errno_message(e)));
    }
    // Could not move it (e.g. the destination is on another mount namespace's view): make one.
    (void)remove_disk(s->image, s->mountpoint);
  }
  return create_disk(image, mountpoint, spec_);
}

size_t disk_stock::ready() const {
  std::lock_guard guard(mtx_);
  return spares_.size();
}

bool disk_stock::wait_ready(size_t n, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mtx_);
  return cv_.wait_for(lock, timeout, [&] { return spares_.size() >= n; });
}

std::string disk_stock::last_error() const {
  std::lock_guard guard(mtx_);
  return error_;
}

}  // namespace ferry::sandbox::detail
