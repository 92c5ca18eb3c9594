#pragma once
// Small helpers shared by ferry-init's units. ferry-init is single-threaded: nothing here locks.

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

namespace ferry_init {

/// A diagnostic on fd 2 (never fd 1: in stdio mode fd 1 carries frames).
inline void log_error(const std::string& what) {
  std::string line = "ferry-init: " + what + "\n";
  [[maybe_unused]] ssize_t n = ::write(2, line.data(), line.size());
}

inline std::string errno_text(int err) { return std::strerror(err); }  // single-threaded program

inline uint64_t now_ms() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000 + static_cast<uint64_t>(ts.tv_nsec) / 1000000;
}

/// Writes everything, retrying on EINTR; false on any other error (errno says which).
inline bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

inline bool set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

/// Closes `fd` if open and sets it to -1.
inline void close_fd(int& fd) {
  if (fd >= 0)
    ::close(fd);
  fd = -1;
}

}  // namespace ferry_init
