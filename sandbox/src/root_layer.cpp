// root_layer: a sandbox's writable root, an overlayfs over the read-only image (root_layer.h).

#include "root_layer.h"

#include <fcntl.h>
#include <linux/mount.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>

#include <fmt/format.h>

#include "ferry/sandbox/process.h"
#include "quota_disk.h"
#include "unique_fd.h"

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;

namespace {

std::string errno_message(int e) { return std::error_code(e, std::system_category()).message(); }

/// A descriptor of a new user namespace mapping uid and gid 0 to `host_id`, made by a child that
/// waits in it until the descriptor is open (the namespace lives on as long as that is).
result<unique_fd> mapping_namespace(uid_t host_id) {
  int ready[2], done[2];
  if (::pipe2(ready, O_CLOEXEC) != 0)
    return fail(fmt::format("pipe: {}", errno_message(errno)));
  unique_fd ready_r(ready[0]), ready_w(ready[1]);
  if (::pipe2(done, O_CLOEXEC) != 0)
    return fail(fmt::format("pipe: {}", errno_message(errno)));
  unique_fd done_r(done[0]), done_w(done[1]);
  const pid_t child = ::fork();
  if (child < 0)
    return fail(fmt::format("fork: {}", errno_message(errno)));
  if (child == 0) {
    // Only async-signal-safe calls: the host is multi-threaded.
    ::close(done[1]);  // else its own copy keeps the pipe open and read() never ends
    ::close(ready[0]);
    char ok = ::unshare(CLONE_NEWUSER) == 0 ? 'y' : 'n';
    (void)!::write(ready[1], &ok, 1);
    char b;
    (void)!::read(done[0], &b, 1);  // until the parent closes its end
    ::_exit(0);
  }
  ready_w.reset();
  done_r.reset();
  auto reap = [&] {
    done_w.reset();
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
  };
  char ok = 'n';
  ssize_t n;
  while ((n = ::read(ready_r.get(), &ok, 1)) < 0 && errno == EINTR) {
  }
  if (n != 1 || ok != 'y') {
    reap();
    return fail("cannot make a user namespace for the idmapped root (unshare(CLONE_NEWUSER) failed)");
  }
  const std::string map = fmt::format("0 {} 1", host_id);
  for (const char* file : {"uid_map", "gid_map"}) {
    const std::string path = fmt::format("/proc/{}/{}", child, file);
    unique_fd f(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    if (!f || ::write(f.get(), map.data(), map.size()) != static_cast<ssize_t>(map.size())) {
      const int e = errno;
      reap();
      return fail(fmt::format("cannot write {}: {}", path, errno_message(e)));
    }
  }
  unique_fd ns(::open(fmt::format("/proc/{}/ns/user", child).c_str(), O_RDONLY | O_CLOEXEC));
  const int e = errno;
  reap();
  if (!ns)
    return fail(fmt::format("cannot open the idmap's user namespace: {}", errno_message(e)));
  return ns;
}

/// A detached clone of the mount at `path` (idmapped through `userns` unless it is -1).
result<unique_fd> clone_layer(const fs::path& path, int userns) {
  unique_fd tree(static_cast<int>(
      ::syscall(SYS_open_tree, AT_FDCWD, path.c_str(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)));
  if (!tree)
    return fail(fmt::format("cannot clone {}: {}", path.string(), errno_message(errno)));
  if (userns >= 0) {
    mount_attr attr{};
    attr.attr_set = MOUNT_ATTR_IDMAP;
    attr.userns_fd = static_cast<uint64_t>(userns);
    if (::syscall(SYS_mount_setattr, tree.get(), "", AT_EMPTY_PATH, &attr, sizeof attr) != 0)
      return fail(fmt::format("cannot idmap {} (its filesystem may not support idmapped mounts): {}",
                              path.string(), errno_message(errno)));
  }
  return tree;
}

}  // namespace

result<void> mount_root_layer(const root_layer_spec& spec) {
  if (spec.lowers.empty())
    return fail("a root layer needs at least one read-only layer");
  std::error_code ec;
  fs::create_directories(spec.target, ec);
  if (ec)
    return fail(fmt::format("cannot create {}: {}", spec.target.string(), ec.message()));
  unique_fd userns;
  if (spec.map_root_to) {
    auto ns = mapping_namespace(*spec.map_root_to);
    if (!ns)
      return ns.error();
    userns = std::move(*ns);
    if (::chown(spec.upper.c_str(), *spec.map_root_to, *spec.map_root_to) != 0)
      return fail(fmt::format("cannot chown {}: {}", spec.upper.string(), errno_message(errno)));
  }
  // Every layer by descriptor (/proc/self/fd/N): no path ever needs overlayfs's escaping of ','
  // and ':', and an idmapped layer has no path at all.
  std::vector<unique_fd> held;
  std::string lowerdir;
  for (const auto& lower : spec.lowers) {
    auto layer = clone_layer(lower, userns ? userns.get() : -1);
    if (!layer)
      return layer.error();
    lowerdir += fmt::format("{}/proc/self/fd/{}", lowerdir.empty() ? "" : ":", layer->get());
    held.push_back(std::move(*layer));
  }
  unique_fd upper(::open(spec.upper.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  unique_fd work(::open(spec.work.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!upper || !work)
    return fail(fmt::format("cannot open {}: {}", (upper ? spec.work : spec.upper).string(), errno_message(errno)));
  const std::string options = fmt::format("lowerdir={},upperdir=/proc/self/fd/{},workdir=/proc/self/fd/{}", lowerdir,
                                          upper.get(), work.get());
  if (::mount("overlay", spec.target.c_str(), "overlay", MS_NOSUID | MS_NODEV, options.c_str()) != 0)
    return fail(fmt::format("cannot mount the writable root at {}: {}", spec.target.string(), errno_message(errno)));
  return {};
}

result<void> unmount_below(const fs::path& dir) {
  for (int round = 0; round < 8; ++round) {
    auto mounts = mounts_at_or_below(dir);
    if (mounts.empty())
      return {};
    for (auto it = mounts.rbegin(); it != mounts.rend(); ++it) {
      // At once when nothing uses it (a loop device is then free again); lazily when busy.
      if (::umount2(it->c_str(), UMOUNT_NOFOLLOW) == 0 || errno == EINVAL || errno == ENOENT)
        continue;
      if (::umount2(it->c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0 && errno != EINVAL && errno != ENOENT)
        return fail(fmt::format("cannot unmount {}: {}", it->string(), errno_message(errno)));
    }
  }
  return fail(fmt::format("mounts stay below {} after unmounting", dir.string()));
}

}  // namespace ferry::sandbox::detail
