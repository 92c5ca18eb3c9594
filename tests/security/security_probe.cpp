// security_probe: what security_test runs inside a sandbox (and, as a positive control, on the
// host) to try each escape of the battery. Each attempt prints one `name=RESULT` line: `ok` if
// the call succeeded, else the errno's name. Plain system calls only, linked statically and
// without sanitizers so it runs in any sandbox root.
//
//   security_probe connect PROTO/ADDR/PORT...  TCP connect (2 s at most) or one UDP datagram
//                                               to each target (IPv4 or IPv6 ADDR); `unix/PATH/0`
//                                               connects to a unix socket (`@name`: abstract)
//   security_probe raw-socket                   raw IPv4/IPv6 sockets, packet sockets
//   security_probe mount DIR                    a tmpfs on DIR, DIR bound onto itself, / remounted
//                                               read-write
//   security_probe ptrace PID                   PTRACE_ATTACH and PTRACE_SEIZE of PID (detached
//                                               again at once)
//   security_probe kill PID                     SIGKILL to PID
//   security_probe modules                      init_module, finit_module, delete_module
//   security_probe read PATH...                 open + read each file
//   security_probe write PATH...                create each file (O_EXCL) with the file's name as
//                                               its content
//   security_probe open-write PATH...           opens each existing file for writing (no create,
//                                               no truncation, nothing written)
//   security_probe mknod DIR MAJOR MINOR        a character device node in DIR, opened if made
//                                               (never read), then removed
//   security_probe privileges                   capability sets and no_new_privs
//   security_probe fork-bomb SECONDS            every process forks as fast as it can for SECONDS,
//                                               then all exit 2 s later (bounded)
//   security_probe mem-bomb MIB                 allocates and touches MIB MiB, 16 MiB at a time
//   security_probe fill-disk PATH MIB           writes PATH in 1 MiB blocks until an error or MIB
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/capability.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cstddef>
#include <string>

namespace {

const char* errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case ENOEXEC: return "ENOEXEC";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EDQUOT: return "EDQUOT";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EPROTONOSUPPORT: return "EPROTONOSUPPORT";
    case ESOCKTNOSUPPORT: return "ESOCKTNOSUPPORT";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: {
      static char buf[32];
      snprintf(buf, sizeof buf, "errno%d", e);
      return buf;
    }
  }
}

void report(const std::string& name, long r) {
  printf("%s=%s\n", name.c_str(), r >= 0 ? "ok" : errno_name(errno));
  fflush(stdout);
}

double now() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) / 1e9;
}

/// "tcp/10.0.0.1/8080", "udp/::1/53": a TCP connect (2 s at most) or one UDP datagram.
void connect_one(const std::string& target) {
  const auto a = target.find('/'), b = target.rfind('/');
  if (a == std::string::npos || a == b) {
    printf("%s=bad-target\n", target.c_str());
    return;
  }
  const std::string proto = target.substr(0, a), addr = target.substr(a + 1, b - a - 1);
  const int port = atoi(target.c_str() + b + 1);
  if (proto == "unix") {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    if (addr.empty() || addr.size() >= sizeof un.sun_path) {
      printf("%s=bad-address\n", target.c_str());
      return;
    }
    memcpy(un.sun_path, addr.data(), addr.size());
    if (addr[0] == '@')
      un.sun_path[0] = '\0';  // abstract: bound to the network namespace, not to a file
    const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + addr.size());
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    report(target, fd < 0 ? -1 : connect(fd, reinterpret_cast<sockaddr*>(&un), len));
    if (fd >= 0)
      close(fd);
    return;
  }
  sockaddr_storage ss{};
  socklen_t len = 0;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET, addr.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(port));
    len = sizeof *v4;
  } else if (inet_pton(AF_INET6, addr.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    len = sizeof *v6;
  } else {
    printf("%s=bad-address\n", target.c_str());
    return;
  }
  const bool udp = proto == "udp";
  int fd = socket(ss.ss_family, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    report(target, -1);
    return;
  }
  if (udp) {
    static const char datagram[] = "security-probe";
    report(target, sendto(fd, datagram, sizeof datagram, 0, reinterpret_cast<sockaddr*>(&ss), len));
  } else if (connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0) {
    report(target, 0);
  } else if (errno != EINPROGRESS) {
    report(target, -1);
  } else {
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 2000) <= 0) {
      printf("%s=ETIMEDOUT\n", target.c_str());
    } else {
      int err = 0;
      socklen_t el = sizeof err;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
      errno = err;
      report(target, err == 0 ? 0 : -1);
    }
  }
  close(fd);
}

void raw_socket() {
  struct attempt {
    const char* name;
    int domain, type, protocol;
  };
  const attempt attempts[] = {
      {"raw_inet_icmp", AF_INET, SOCK_RAW, IPPROTO_ICMP},
      {"raw_inet_tcp", AF_INET, SOCK_RAW, IPPROTO_TCP},
      {"raw_inet_raw", AF_INET, SOCK_RAW, IPPROTO_RAW},
      {"raw_inet6_icmp", AF_INET6, SOCK_RAW, IPPROTO_ICMPV6},
      {"packet_raw", AF_PACKET, SOCK_RAW, htons(ETH_P_ALL)},
      {"packet_dgram", AF_PACKET, SOCK_DGRAM, htons(ETH_P_ALL)},
      {"inet_sock_packet", AF_INET, SOCK_PACKET, htons(ETH_P_ALL)},
  };
  for (const auto& a : attempts) {
    int fd = socket(a.domain, a.type | SOCK_CLOEXEC, a.protocol);
    report(a.name, fd);
    if (fd >= 0)
      close(fd);
  }
}

void mounts(const char* dir) {
  long r = mount("none", dir, "tmpfs", 0, "size=1m");
  report("mount_tmpfs", r);
  if (r == 0)
    umount2(dir, MNT_DETACH);
  r = mount(dir, dir, nullptr, MS_BIND, nullptr);
  report("mount_bind", r);
  if (r == 0)
    umount2(dir, MNT_DETACH);
  // Changing a superblock's flags: harmless where / is writable already (the host control runs
  // in a mount namespace of its own), and the way out of a read-only root if it ever worked.
  report("remount_root_rw", mount(nullptr, "/", nullptr, MS_REMOUNT | MS_BIND, nullptr));
  report("mount_proc", mount("proc", dir, "proc", 0, nullptr));
  umount2(dir, MNT_DETACH);
}

void ptrace_pid(pid_t pid) {
  long r = ptrace(PTRACE_ATTACH, pid, nullptr, nullptr);
  report("ptrace_attach", r);
  if (r == 0) {
    int status = 0;
    waitpid(pid, &status, __WALL);
    ptrace(PTRACE_DETACH, pid, nullptr, nullptr);
  }
  r = ptrace(PTRACE_SEIZE, pid, nullptr, nullptr);
  report("ptrace_seize", r);
  if (r == 0)
    ptrace(PTRACE_DETACH, pid, nullptr, nullptr);
}

void modules() {
  // Not an ELF image: a kernel that lets us that far refuses it (ENOEXEC) without loading anything.
  static char image[512];
  report("init_module", syscall(SYS_init_module, image, sizeof image, ""));
  int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
  report("finit_module", syscall(SYS_finit_module, fd, "", 0));
  close(fd);
  report("delete_module", syscall(SYS_delete_module, "ferry_security_probe_none", O_NONBLOCK));
}

void read_files(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    int fd = open(argv[i], O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      report(argv[i], -1);
      continue;
    }
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    report(argv[i], n);
    close(fd);
  }
}

void write_files(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    int fd = open(argv[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
      report(argv[i], -1);
      continue;
    }
    const size_t len = strlen(argv[i]);
    ssize_t n = write(fd, argv[i], len);
    if (n >= 0 && fsync(fd) != 0)
      n = -1;
    report(argv[i], n);
    close(fd);
  }
}

void open_for_writing(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    int fd = open(argv[i], O_WRONLY | O_CLOEXEC | O_NOCTTY);
    report(argv[i], fd);
    if (fd >= 0)
      close(fd);
  }
}

/// A character device node: made, and opened (never read).
void device_node(const std::string& dir, unsigned major_number, unsigned minor_number) {
  const std::string path = dir + "/probe-device";
  long r = mknod(path.c_str(), S_IFCHR | 0600, makedev(major_number, minor_number));
  report("mknod_char", r);
  if (r != 0)
    return;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  report("open_char", fd);
  if (fd >= 0)
    close(fd);
  unlink(path.c_str());
}

/// The calling process's capability sets (effective, permitted, inheritable as hex; how many
/// capabilities are in the bounding and ambient sets) and no_new_privs.
void privileges() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2]{};
  if (syscall(SYS_capget, &header, data) != 0) {
    report("capget", -1);
    return;
  }
  auto both = [&](uint32_t __user_cap_data_struct::*set) {
    return (static_cast<unsigned long long>(data[1].*set) << 32) | data[0].*set;
  };
  printf("cap_effective=%llx\ncap_permitted=%llx\ncap_inheritable=%llx\n", both(&__user_cap_data_struct::effective),
         both(&__user_cap_data_struct::permitted), both(&__user_cap_data_struct::inheritable));
  int bounding = 0, ambient = 0;
  for (int cap = 0; cap < 64; ++cap) {
    bounding += prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1;
    ambient += prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap, 0, 0) == 1;
  }
  printf("cap_bounding=%d\ncap_ambient=%d\nno_new_privs=%d\n", bounding, ambient, prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
}

void fork_bomb(double seconds) {
  const double stop_forking = now() + seconds, stop = stop_forking + 2;
  long forks = 0, refused = 0;
  const pid_t top = getpid();
  while (now() < stop_forking) {
    pid_t p = fork();
    if (p == 0) {
      forks = refused = 0;  // a child forks on too, and reports nothing
      continue;
    }
    if (p > 0)
      ++forks;
    else
      ++refused;
    if (p < 0)
      usleep(1000);
  }
  while (now() < stop)
    usleep(50000);
  if (getpid() != top)
    _exit(0);
  while (waitpid(-1, nullptr, 0) > 0 || errno == EINTR) {
  }
  printf("forks=%ld refused=%ld\n", forks, refused);
}

void mem_bomb(long mib) {
  const size_t chunk = 16u << 20;
  long touched = 0;
  while (touched < mib) {
    auto* p = static_cast<char*>(mmap(nullptr, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p == MAP_FAILED) {
      report("mmap", -1);
      break;
    }
    for (size_t i = 0; i < chunk; i += 4096)
      p[i] = 1;
    touched += 16;
    printf("touched=%ld\n", touched);
    fflush(stdout);
  }
}

void fill_disk(const char* path, long mib) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    report("open", -1);
    return;
  }
  static char block[1 << 20];
  memset(block, 'x', sizeof block);
  long written = 0;
  int err = 0;
  while (written < (mib << 20)) {
    ssize_t n = write(fd, block, sizeof block);
    if (n <= 0) {
      err = n < 0 ? errno : ENOSPC;
      break;
    }
    written += n;
  }
  if (err == 0 && fsync(fd) != 0)
    err = errno;
  close(fd);
  printf("written=%ld\n", written);
  if (err)
    printf("fill=%s\n", errno_name(err));
  else
    printf("fill=ok\n");
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 2) {
    fprintf(stderr, "usage: security_probe connect|raw-socket|mount|ptrace|kill|modules|read|write|open-write|mknod|privileges|fork-bomb|mem-bomb|fill-disk ...\n");
    return 2;
  }
  const std::string what = argv[1];
  if (what == "connect") {
    for (int i = 2; i < argc; ++i)
      connect_one(argv[i]);
  } else if (what == "raw-socket") {
    raw_socket();
  } else if (what == "mount" && argc == 3) {
    mounts(argv[2]);
  } else if (what == "ptrace" && argc == 3) {
    ptrace_pid(static_cast<pid_t>(atol(argv[2])));
  } else if (what == "kill" && argc == 3) {
    report("kill", kill(static_cast<pid_t>(atol(argv[2])), SIGKILL));
  } else if (what == "modules") {
    modules();
  } else if (what == "read") {
    read_files(argc - 2, argv + 2);
  } else if (what == "write") {
    write_files(argc - 2, argv + 2);
  } else if (what == "open-write") {
    open_for_writing(argc - 2, argv + 2);
  } else if (what == "mknod" && argc == 5) {
    device_node(argv[2], static_cast<unsigned>(atoi(argv[3])), static_cast<unsigned>(atoi(argv[4])));
  } else if (what == "privileges") {
    privileges();
  } else if (what == "fork-bomb" && argc == 3) {
    fork_bomb(atof(argv[2]));
  } else if (what == "mem-bomb" && argc == 3) {
    mem_bomb(atol(argv[2]));
  } else if (what == "fill-disk" && argc == 4) {
    fill_disk(argv[2], atol(argv[3]));
  } else {
    fprintf(stderr, "security_probe: bad arguments for %s\n", what.c_str());
    return 2;
  }
  return 0;
}
