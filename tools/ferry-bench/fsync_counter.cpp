// See fsync_counter.h. Deliberately includes no libc header that declares fsync/fdatasync, so
// that the definitions below cannot disagree with a declaration's attributes.

#include <dlfcn.h>

#include <atomic>
#include <cerrno>
#include <cstdint>

#include "fsync_counter.h"

namespace {

std::atomic<uint64_t> syncs{0};

using sync_fn = int (*)(int);

sync_fn real(const char* name) {
  return reinterpret_cast<sync_fn>(dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" int fsync(int fd) {
  static const sync_fn next = real("fsync");
  syncs.fetch_add(1, std::memory_order_relaxed);
  if (!next) {
    errno = ENOSYS;
    return -1;
  }
  return next(fd);
}

extern "C" int fdatasync(int fd) {
  static const sync_fn next = real("fdatasync");
  syncs.fetch_add(1, std::memory_order_relaxed);
  if (!next) {
    errno = ENOSYS;
    return -1;
  }
  return next(fd);
}

namespace ferry::bench {

uint64_t sync_calls() { return syncs.load(std::memory_order_relaxed); }

}  // namespace ferry::bench
