// statx_shim.so — preloaded into every process of a Ferry image (/etc/ld.so.preload).
//
// Why: Debian 12's runsc (gVisor 2022-12-19) fails statx(2) with EINVAL when the flags carry
// AT_NO_AUTOMOUNT and the path is a directory. coreutils 9 (`ls -l`, `stat`, `cp -a`, …) always
// passes AT_NO_AUTOMOUNT, through glibc's statx() wrapper, so those tools fail on every directory.
// gVisor has no automount points, so the flag means nothing there: clearing it before the syscall
// is exactly the behaviour the caller asked for.
//
// What: the two ways a dynamically linked program reaches the syscall — glibc's statx() and the
// generic syscall(SYS_statx, …) (libuv, Rust's std) — are wrapped; both clear AT_NO_AUTOMOUNT and
// make the raw syscall. Static binaries (ferry-init) are not affected and do not need to be.
//
// Built by the image builder with the host's C compiler (ferry/sandbox/image.h); this file's
// bytes are part of the image's content hash. Keep it free of other behaviour.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_NO_AUTOMOUNT
#define AT_NO_AUTOMOUNT 0x800
#endif

// The raw system call, without going through syscall() (which this file replaces).
static long raw_syscall6(long n, long a1, long a2, long a3, long a4, long a5, long a6) {
  long ret;
#if defined(__x86_64__)
  register long r10 __asm__("r10") = a4;
  register long r8 __asm__("r8") = a5;
  register long r9 __asm__("r9") = a6;
  __asm__ volatile("syscall"
                   : "=a"(ret)
                   : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                   : "rcx", "r11", "memory");
#elif defined(__aarch64__)
  register long x8 __asm__("x8") = n;
  register long x0 __asm__("x0") = a1;
  register long x1 __asm__("x1") = a2;
  register long x2 __asm__("x2") = a3;
  register long x3 __asm__("x3") = a4;
  register long x4 __asm__("x4") = a5;
  register long x5 __asm__("x5") = a6;
  __asm__ volatile("svc 0"
                   : "+r"(x0)
                   : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                   : "memory");
  ret = x0;
#endif
  return ret;
}

// glibc's convention: -4095..-1 is an error number.
static long to_libc(long ret) {
  if ((unsigned long)ret > -4096UL) {
    errno = (int)-ret;
    return -1;
  }
  return ret;
}

__attribute__((visibility("default"))) int statx(int dirfd, const char* path, int flags,
                                                 unsigned int mask, struct statx* buf) {
  return (int)to_libc(raw_syscall6(SYS_statx, dirfd, (long)path, flags & ~AT_NO_AUTOMOUNT,
                                   (long)mask, (long)buf, 0));
}

// syscall(2) takes up to six register-sized arguments; reading six is what glibc's own does.
__attribute__((visibility("default"))) long syscall(long number, ...) {
  va_list ap;
  va_start(ap, number);
  long a1 = va_arg(ap, long), a2 = va_arg(ap, long), a3 = va_arg(ap, long);
  long a4 = va_arg(ap, long), a5 = va_arg(ap, long), a6 = va_arg(ap, long);
  va_end(ap);
  if (number == SYS_statx)
    a3 &= ~(long)AT_NO_AUTOMOUNT;
  return to_libc(raw_syscall6(number, a1, a2, a3, a4, a5, a6));
}
