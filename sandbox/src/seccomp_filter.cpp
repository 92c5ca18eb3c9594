#include "seccomp_filter.h"

#include <errno.h>
#include <linux/sched.h>
#include <seccomp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <initializer_list>
#include <memory>

#include <fmt/format.h>

#include "unique_fd.h"

namespace ferry::sandbox::detail {
namespace {

struct ctx_deleter {
  void operator()(void* c) const { seccomp_release(c); }
};
using seccomp_ctx = std::unique_ptr<void, ctx_deleter>;

// Namespace flags of clone(2) and unshare(2). CLONE_NEWTIME (0x80) only for unshare: in clone's
// first argument the low byte is the exit signal.
constexpr uint64_t clone_namespace_flags[] = {CLONE_NEWNS,  CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC,
                                              CLONE_NEWUSER, CLONE_NEWPID,   CLONE_NEWNET};
constexpr uint64_t clone_newtime = 0x80;

// personality(2) values allowed: PER_LINUX, PER_LINUX | ADDR_NO_RANDOMIZE (what `setarch -R` and
// debuggers use; it weakens only the caller's own layout), and 0xffffffff (a query).
constexpr uint32_t addr_no_randomize = 0x0040000;

}  // namespace

result<std::string> bwrap_seccomp_program() {
  seccomp_ctx ctx(seccomp_init(SCMP_ACT_ALLOW));
  if (!ctx)
    return fail("seccomp_init failed");
  // Another ABI than the native one (i386 via int 0x80, x32): kill. libseccomp checks the
  // architecture and, on x86_64, the x32 bit of the syscall number.
  if (seccomp_attr_set(ctx.get(), SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS) != 0)
    return fail("seccomp: cannot set the action for other architectures");

  int rc = 0;
  std::string failed;
  auto add = [&](const char* name, uint32_t action, std::initializer_list<scmp_arg_cmp> args = {}) {
    if (rc != 0)
      return;
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) {
      rc = -EINVAL;
      failed = name;
      return;
    }
    rc = seccomp_rule_add_array(ctx.get(), action, nr, static_cast<unsigned>(args.size()),
                                args.size() ? args.begin() : nullptr);
    if (rc != 0)
      failed = name;
  };
  const uint32_t eperm = SCMP_ACT_ERRNO(EPERM);

  for (const char* name : {
           // Filesystems: the mounts are bwrap's, made before the filter; none may change.
           "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
           "fsmount", "fspick", "mount_setattr",
           // Other processes' memory and state.
           "ptrace", "process_vm_readv", "process_vm_writev",
           // The kernel itself.
           "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
           "swapon", "swapoff", "iopl", "ioperm", "acct", "syslog", "quotactl", "lookup_dcookie",
           "uselib",
           // Namespaces: joining any (creating new ones: clone and unshare below).
           "setns",
           // Kernel interfaces with a long record of privilege escalations.
           "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
           "io_uring_setup", "io_uring_enter", "io_uring_register",
           // Files by handle (bypasses the mount view).
           "open_by_handle_at", "name_to_handle_at",
           // The clock of the whole machine.
           "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
       })
    add(name, eperm);

  // clone3 passes its flags in memory the filter cannot read: ENOSYS makes libc use clone.
  add("clone3", SCMP_ACT_ERRNO(ENOSYS));
  for (uint64_t flag : clone_namespace_flags) {
    add("clone", eperm, {SCMP_A0(SCMP_CMP_MASKED_EQ, flag, flag)});
    add("unshare", eperm, {SCMP_A0(SCMP_CMP_MASKED_EQ, flag, flag)});
  }
  add("unshare", eperm, {SCMP_A0(SCMP_CMP_MASKED_EQ, clone_newtime, clone_newtime)});

  // Packet and raw IP sockets: no crafting of packets (there is only a loopback, but still).
  // Raw netlink sockets stay: `ip` and getifaddrs(3) use them.
  add("socket", eperm, {SCMP_A0(SCMP_CMP_EQ, AF_PACKET)});
  for (scmp_datum_t family : {scmp_datum_t{AF_INET}, scmp_datum_t{AF_INET6}}) {
    for (scmp_datum_t type : {scmp_datum_t{SOCK_RAW}, scmp_datum_t{SOCK_PACKET}})
      add("socket", eperm, {SCMP_A0(SCMP_CMP_EQ, family), SCMP_A1(SCMP_CMP_MASKED_EQ, 0xf, type)});
  }

  // personality: anything but 0, ADDR_NO_RANDOMIZE and the query 0xffffffff (the kernel reads
  // the low 32 bits). libseccomp compares one argument once per rule, so the complement of the
  // allowed values is spelled out as masked comparisons:
  //   bit 31 clear and any bit but ADDR_NO_RANDOMIZE's set;
  //   bit 31 set and not all of the low 32 bits set (bits 31..k+1 set, bit k clear, for each k).
  constexpr uint64_t bit31 = 1ull << 31;
  for (int i = 0; i < 31; ++i) {
    const uint64_t bit = 1ull << i;
    if (bit != addr_no_randomize)
      add("personality", eperm, {SCMP_A0(SCMP_CMP_MASKED_EQ, bit | bit31, bit)});
  }
  for (int k = 0; k < 31; ++k) {
    const uint64_t above = 0xffffffffull & ~((2ull << k) - 1);  // bits 31..k+1
    add("personality", eperm, {SCMP_A0(SCMP_CMP_MASKED_EQ, above | (1ull << k), above)});
  }
  if (rc != 0)
    return fail(fmt::format("seccomp: cannot add the rule for {}: {}", failed, std::strerror(-rc)));

  // libseccomp writes the program to a file descriptor.
  unique_fd mem(::memfd_create("ferry-seccomp", MFD_CLOEXEC));
  if (!mem)
    return fail(fmt::format("seccomp: memfd_create: {}", std::strerror(errno)));
  if (int r = seccomp_export_bpf(ctx.get(), mem.get()); r != 0)
    return fail(fmt::format("seccomp: exporting the filter: {}", std::strerror(-r)));
  std::string program;
  char buf[4096];
  for (off_t at = 0;;) {
    ssize_t n = ::pread(mem.get(), buf, sizeof buf, at);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return fail(fmt::format("seccomp: reading the filter back: {}", std::strerror(errno)));
    if (n == 0)
      break;
    program.append(buf, static_cast<size_t>(n));
    at += n;
  }
  return program;
}

}  // namespace ferry::sandbox::detail
