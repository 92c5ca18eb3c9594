#pragma once
// Private to ferry_sandbox: the seccomp filter of bwrap sandboxes, built with libseccomp (whose
// names stay in seccomp_filter.cpp). Default allow; what a coding agent never needs is denied
// with EPERM (clone3 with ENOSYS, so that libc falls back to clone, whose flags can be checked);
// other syscall ABIs than x86_64's (i386's int 0x80, x32) kill the process. The list and the
// reasons are in ../README.md ("The seccomp filter").
//
// Threading: pure function.

#include <string>

#include "ferry/schemas/result.h"

namespace ferry::sandbox::detail {

/// The filter as a classic BPF program (struct sock_filter[]), what `bwrap --seccomp FD` reads.
result<std::string> bwrap_seccomp_program();

}  // namespace ferry::sandbox::detail
