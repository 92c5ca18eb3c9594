// seccomp_probe: run inside a bwrap sandbox by bwrap_runtime_test. Tries each call the seccomp
// filter denies, in a way that would succeed (or fail otherwise) without the filter, and prints
// one `name=ERRNO` line per call (`name=ok` if it succeeded).
//
//   seccomp_probe denied    every denied call
//   seccomp_probe x32       a getpid through the x32 ABI (the filter kills the process)
//   seccomp_probe int80     a getpid through the i386 ABI (the filter kills the process)
//
// Plain system calls only; linked statically so it runs in any root.
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>

namespace {

const char* errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EACCES: return "EACCES";
    case EINVAL: return "EINVAL";
    case ENOENT: return "ENOENT";
    case EFAULT: return "EFAULT";
    case EBADF: return "EBADF";
    case ENOSPC: return "ENOSPC";
    case EUSERS: return "EUSERS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return "other";
  }
}

void report(const char* name, long r) {
  if (r >= 0)
    printf("%s=ok\n", name);
  else
    printf("%s=%s\n", name, errno_name(errno));
}

void denied() {
  report("mount", syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, nullptr));
  report("umount2", syscall(SYS_umount2, "/tmp", 0));
  report("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
  report("chroot", syscall(SYS_chroot, "/"));
  report("open_tree", syscall(SYS_open_tree, AT_FDCWD, "/tmp", 0));
  report("fsopen", syscall(SYS_fsopen, "tmpfs", 0));
  report("ptrace_traceme", syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0));
  report("ptrace_attach", syscall(SYS_ptrace, PTRACE_ATTACH, 1, 0, 0));
  char buf[8];
  iovec local{buf, sizeof buf}, remote{buf, sizeof buf};
  report("process_vm_readv", syscall(SYS_process_vm_readv, getpid(), &local, 1, &remote, 1, 0));
  report("init_module", syscall(SYS_init_module, nullptr, 0, ""));
  report("finit_module", syscall(SYS_finit_module, -1, "", 0));
  report("delete_module", syscall(SYS_delete_module, "ferry_none", 0));
  report("kexec_load", syscall(SYS_kexec_load, 0, 0, nullptr, 0));
  report("kexec_file_load", syscall(SYS_kexec_file_load, -1, -1, 0, "", 0));
  report("reboot", syscall(SYS_reboot, 0xfee1dead, 672274793, 0x89abcdef /* CAD on: harmless */, nullptr));
  report("swapon", syscall(SYS_swapon, "/tmp/none", 0));
  report("swapoff", syscall(SYS_swapoff, "/tmp/none"));
  report("iopl", syscall(SYS_iopl, 3));
  report("ioperm", syscall(SYS_ioperm, 0x80, 1, 1));
  report("acct", syscall(SYS_acct, nullptr));
  report("syslog", syscall(SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, nullptr, 0));
  report("setns", syscall(SYS_setns, 0, 0));
  report("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
  report("unshare_net", syscall(SYS_unshare, CLONE_NEWNET));
  report("unshare_mount", syscall(SYS_unshare, CLONE_NEWNS));
  report("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, nullptr, nullptr, nullptr, 0));
  clone_args ca{};
  ca.exit_signal = SIGCHLD;
  report("clone3", syscall(SYS_clone3, &ca, sizeof ca));
  report("bpf", syscall(SYS_bpf, 0, nullptr, 0));
  report("perf_event_open", syscall(SYS_perf_event_open, nullptr, 0, -1, -1, 0));
  report("userfaultfd", syscall(SYS_userfaultfd, 0));
  report("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 0));
  report("add_key", syscall(SYS_add_key, "user", "ferry", "x", 1, -3));
  report("request_key", syscall(SYS_request_key, "user", "ferry", nullptr, 0));
  report("io_uring_setup", syscall(SYS_io_uring_setup, 1, nullptr));
  report("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, nullptr, 0));
  char handle[128] = {};
  int mount_id = 0;
  reinterpret_cast<unsigned*>(handle)[0] = 64;
  report("name_to_handle_at", syscall(SYS_name_to_handle_at, AT_FDCWD, "/tmp", handle, &mount_id, 0));
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  report("clock_settime", syscall(SYS_clock_settime, CLOCK_REALTIME, &now));
  report("settimeofday", syscall(SYS_settimeofday, nullptr, nullptr));
  report("adjtimex", syscall(SYS_adjtimex, nullptr));
  report("socket_packet", syscall(SYS_socket, AF_PACKET, SOCK_RAW, 0));
  report("socket_raw_inet", syscall(SYS_socket, AF_INET, SOCK_RAW, 1));
  report("socket_raw_inet6", syscall(SYS_socket, AF_INET6, SOCK_RAW | SOCK_CLOEXEC, 58));
  report("personality_read_implies_exec", syscall(SYS_personality, READ_IMPLIES_EXEC));
  report("personality_linux32", syscall(SYS_personality, PER_LINUX32));
  report("personality_almost_query", syscall(SYS_personality, 0xfffffffe));
  // What stays allowed, for contrast: these must work.
  report("allowed_personality_query", syscall(SYS_personality, 0xffffffff));
  report("allowed_personality_no_randomize", syscall(SYS_personality, ADDR_NO_RANDOMIZE));
  report("allowed_personality_linux", syscall(SYS_personality, PER_LINUX));
  report("allowed_socket_netlink", syscall(SYS_socket, AF_NETLINK, SOCK_RAW, 0));
  report("allowed_socket_tcp", syscall(SYS_socket, AF_INET, SOCK_STREAM, 0));
  report("allowed_unshare_files", syscall(SYS_unshare, CLONE_FILES));
  pid_t child = fork();
  if (child == 0)
    _exit(0);
  report("allowed_fork", child);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && strcmp(argv[1], "denied") == 0) {
    denied();
    return 0;
  }
  if (argc == 2 && strcmp(argv[1], "x32") == 0) {
    long r = syscall(0x40000000 | SYS_getpid);
    printf("x32 survived: %ld (errno %d)\n", r, r < 0 ? errno : 0);
    return 0;
  }
  if (argc == 2 && strcmp(argv[1], "int80") == 0) {
    long r = 20;  // getpid on i386
    asm volatile("int $0x80" : "+a"(r) : : "memory");
    printf("int80 survived: %ld\n", r);
    return 0;
  }
  fprintf(stderr, "usage: seccomp_probe denied|x32|int80\n");
  return 2;
}
