#define BOOST_TEST_MODULE security_battery
#define BOOST_TEST_NO_MAIN
#include <boost/test/unit_test.hpp>

// The security battery: from inside real sandboxes of the backend under test (built once per
// backend: security_runsc_battery_test, security_bwrap_battery_test), every escape of issue 5 is
// tried and must fail while the host stays healthy — host files (/etc/shadow, a stand-in for
// Ferry's data directory, another sandbox's workspace), connections to loopback services (TCP
// and UDP listeners and a real nats-server), to [::1] and to private and metadata addresses, raw
// sockets, mounts, ptrace and kill of a host process, kernel modules, a fork bomb and a memory
// bomb (stopped at the limits, which are named), files that outlive the sandbox, credentials in
// the environment or the filesystem. Wherever a probe could pass by being broken, the same probe
// first succeeds on the host (the positive control).
//
// Isolation of the test itself: before Boost.Test starts (main, single-threaded) the process
// moves into a network namespace of its own, whose loopback also carries 10.0.0.1,
// 192.168.0.1 and 169.254.169.254; every listener is bound there, and no packet can reach a
// real network. Needs root and the backend; skipped with a message otherwise.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "../sandbox/backend_test_support.h"
#include "../sandbox/fake_egress_proxy.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/test_support/nats_server.h"
#include "ferry/test_support/processes.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using testing::recording_observer;

namespace {

/// Addresses a sandbox must never reach besides the loopback: private networks and the cloud
/// metadata service. Bound on the test namespace's loopback only.
const std::vector<std::string> trap_addresses = {"10.0.0.1", "192.168.0.1", "169.254.169.254"};

std::string random_token(std::string_view what) {
  std::random_device rd;
  return fmt::format("ferry-{}-{:08x}{:08x}{:08x}", what, rd(), rd(), rd());
}

// --- the test's own network namespace --------------------------------------------------------------

/// Set up once in main(), before Boost.Test or any thread exists: unshare(CLONE_NEWNET) moves only
/// the calling thread, and every process and thread the tests start inherits it.
struct test_network {
  bool entered = false;
  std::string failure;  // why not, as root
  /// /proc/self/ns/net before and after (net:[inode]).
  fs::path machine_netns, test_netns;
  /// In the test process's environment (so in runsc's and bwrap's, outside the sandboxes).
  std::string env_secret;

  void enter() {
    if (::geteuid() != 0)
      return;  // the suite's precondition skips
    size_t threads = 0;
    for ([[maybe_unused]] const auto& t : fs::directory_iterator("/proc/self/task"))
      ++threads;
    if (threads != 1) {
      failure = fmt::format("{} threads before unshare(CLONE_NEWNET): only the caller would move", threads);
      return;
    }
    machine_netns = fs::read_symlink("/proc/self/ns/net");
    if (::unshare(CLONE_NEWNET) != 0) {
      failure = fmt::format("unshare(CLONE_NEWNET): {}", std::strerror(errno));
      return;
    }
    std::vector<std::vector<std::string>> steps = {{"ip", "link", "set", "lo", "up"}};
    for (const auto& a : trap_addresses)
      steps.push_back({"ip", "addr", "add", a + "/32", "dev", "lo"});
    for (const auto& step : steps) {
      auto r = run_command(step, 10s);
      if (!r.ok() || !r->status.ok()) {
        failure = fmt::format("`{}` failed: {}", fmt::join(step, " "), r.ok() ? r->output : r.error().message);
        return;
      }
    }
    test_netns = fs::read_symlink("/proc/self/ns/net");
    env_secret = random_token("env-secret");
    ::setenv("FERRY_TEST_SECRET", env_secret.c_str(), 1);
    entered = true;
  }
};

test_network& network() {
  static test_network n;
  return n;
}

// --- listeners that count what arrives --------------------------------------------------------------

/// A TCP and a UDP listener (port 0) on each address, and a unix socket listener on each of
/// `unix_addresses` (a path, or `@name` for the abstract namespace, which belongs to the network
/// namespace), counting accepted connections and received datagrams on one thread until
/// destroyed. A sandbox's probe that reaches one shows up here. Threading: counts() from any
/// thread.
class trap_listeners {
 public:
  trap_listeners(const std::vector<std::string>& addresses, const std::vector<std::string>& unix_addresses) {
    for (const auto& address : addresses)
      for (const char* proto : {"tcp", "udp"})
        traps_.push_back(std::make_unique<trap>(proto, address));
    for (const auto& address : unix_addresses)
      traps_.push_back(std::make_unique<trap>("unix", address));
    BOOST_REQUIRE(::pipe2(stop_, O_CLOEXEC) == 0);
    thread_ = std::thread([this] { serve(); });
  }
  ~trap_listeners() {
    ::close(stop_[1]);
    thread_.join();
    ::close(stop_[0]);
  }
  trap_listeners(const trap_listeners&) = delete;
  trap_listeners& operator=(const trap_listeners&) = delete;

  /// "tcp/10.0.0.1/40123" … (security_probe's connect targets).
  std::vector<std::string> targets() const {
    std::vector<std::string> t;
    for (const auto& tr : traps_)
      t.push_back(tr->target);
    return t;
  }
  std::map<std::string, uint64_t> counts() const {
    std::map<std::string, uint64_t> c;
    for (const auto& tr : traps_)
      c[tr->target] = tr->arrived.load();
    return c;
  }

 private:
  struct trap {
    trap(const std::string& proto, const std::string& address) {
      if (proto == "unix") {
        sockaddr_un un{};
        un.sun_family = AF_UNIX;
        BOOST_REQUIRE(!address.empty() && address.size() < sizeof un.sun_path);
        std::memcpy(un.sun_path, address.data(), address.size());
        if (address[0] == '@')
          un.sun_path[0] = '\0';
        fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        BOOST_REQUIRE(fd >= 0);
        BOOST_REQUIRE_MESSAGE(::bind(fd, reinterpret_cast<sockaddr*>(&un),
                                     static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size())) == 0,
                              "bind " << address << ": " << std::strerror(errno));
        BOOST_REQUIRE(::listen(fd, 64) == 0);
        target = "unix/" + address + "/0";
        return;
      }
      const bool udp = proto == "udp";
      sockaddr_storage ss{};
      socklen_t len = 0;
      auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
      auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
      if (::inet_pton(AF_INET, address.c_str(), &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        len = sizeof *v4;
      } else {
        BOOST_REQUIRE(::inet_pton(AF_INET6, address.c_str(), &v6->sin6_addr) == 1);
        v6->sin6_family = AF_INET6;
        len = sizeof *v6;
      }
      fd = ::socket(ss.ss_family, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      BOOST_REQUIRE(fd >= 0);
      BOOST_REQUIRE_MESSAGE(::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0,
                            "bind " << address << ": " << std::strerror(errno));
      BOOST_REQUIRE(udp || ::listen(fd, 64) == 0);
      BOOST_REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0);
      const uint16_t port = ntohs(ss.ss_family == AF_INET ? v4->sin_port : v6->sin6_port);
      target = fmt::format("{}/{}/{}", proto, address, port);
      datagram = udp;
    }
    ~trap() { ::close(fd); }
    int fd = -1;
    bool datagram = false;
    std::string target;
    std::atomic<uint64_t> arrived{0};
  };

  void serve() {
    std::vector<pollfd> fds;
    for (const auto& t : traps_)
      fds.push_back({t->fd, POLLIN, 0});
    fds.push_back({stop_[0], POLLIN, 0});
    for (;;) {
      if (::poll(fds.data(), fds.size(), -1) < 0)
        continue;
      if (fds.back().revents)
        return;
      for (size_t i = 0; i < traps_.size(); ++i) {
        if (!fds[i].revents)
          continue;
        auto& t = *traps_[i];
        if (t.datagram) {
          char buf[2048];
          while (::recv(t.fd, buf, sizeof buf, 0) >= 0)
            ++t.arrived;
        } else {
          for (int c; (c = ::accept4(t.fd, nullptr, nullptr, SOCK_CLOEXEC)) >= 0;) {
            ++t.arrived;
            ::close(c);
          }
        }
      }
    }
  }

  std::vector<std::unique_ptr<trap>> traps_;
  int stop_[2] = {-1, -1};
  std::thread thread_;
};

// --- probes and their results --------------------------------------------------------------------

/// security_probe's `name=RESULT` lines.
using probe_results = std::map<std::string, std::string>;

probe_results parse_results(const std::string& output) {
  probe_results r;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    const auto eq = line.find('=');
    if (eq != std::string::npos)
      r[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return r;
}

/// security_probe run on the host (in the test's network namespace): the positive control.
probe_results host_probe(std::vector<std::string> args, std::vector<std::string> prefix = {}) {
  std::vector<std::string> argv = std::move(prefix);
  argv.push_back(FERRY_SECURITY_PROBE);
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = run_command(argv, 30s);
  BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  BOOST_TEST_MESSAGE("host: " << fmt::format("{}", fmt::join(argv, " ")) << " → " << r->output);
  return parse_results(r->output);
}

// --- the host's health ---------------------------------------------------------------------------

size_t host_process_count() {
  size_t n = 0;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const auto name = e.path().filename().string();
    n += name.find_first_not_of("0123456789") == std::string::npos;
  }
  return n;
}

/// The host starts a process and gets its output, within 5 s.
bool host_can_fork() {
  auto r = run_command({"/bin/echo", "alive"}, 5s);
  return r.ok() && r->status.ok() && r->output == "alive\n";
}

/// Files and directories whose name contains `needle` in the places a sandbox's writes could
/// land on the host: its own directories under `base` (across the sandboxes' own mounts: disks,
/// workspaces), the host's temporary directories (not crossing into other filesystems there).
std::vector<std::string> host_files_named(const std::string& needle, const fs::path& base) {
  std::vector<std::string> temporary = {"find"};
  for (const char* d : {"/tmp", "/var/tmp", "/dev/shm", "/run"})
    if (fs::exists(d))
      temporary.push_back(d);
  std::set<std::string> found;  // `base` is under /tmp: found twice
  for (auto argv : {std::vector<std::string>{"find", base.string()}, temporary}) {
    if (argv.size() < 2)
      continue;
    if (argv[1] != base.string())
      argv.push_back("-xdev");
    argv.push_back("-name");
    argv.push_back("*" + needle + "*");
    auto r = run_command(argv, 30s);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    std::istringstream in(r->output);
    for (std::string line; std::getline(in, line);)
      if (line.find(needle) != std::string::npos && line.rfind("find:", 0) != 0)
        found.insert(line);
  }
  return {found.begin(), found.end()};
}

// --- the fixture ---------------------------------------------------------------------------------

struct battery {
  testing::temp_dir tmp;
  /// Stand-in for Ferry's data directory: what a sandbox must never read.
  fs::path data_dir;
  std::string data_secret = random_token("data-secret");
  std::string admin_token = random_token("admin-token");
  std::unique_ptr<sandbox_runtime> runtime;
  uint32_t next_command = 1;

  battery() {
    BOOST_REQUIRE_MESSAGE(network().entered, "the test's network namespace: " << network().failure);
    data_dir = tmp.path() / "var";
    fs::create_directories(data_dir);
    write(data_dir / "secret", data_secret + "\n");
    write(data_dir / "admin_token", admin_token + "\n");
    fs::permissions(data_dir / "secret", fs::perms::owner_read | fs::perms::owner_write);
    runtime = make_runtime({});
  }

  static void write(const fs::path& p, const std::string& content) {
    std::ofstream f(p, std::ios::binary);
    f << content;
    BOOST_REQUIRE(f.good());
  }

  std::unique_ptr<sandbox_runtime> make_runtime(const std::optional<sandbox_limits>& limits) const {
    auto o = testing::test_config(tmp.path());
    if (limits)
      o.limits = *limits;
    auto r = ferry::sandbox::make_runtime(o);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    return std::move(*r);
  }

  fs::path sandbox_dir(const std::string& id) const { return tmp.path() / "sandboxes" / id; }
  fs::path workspace(const std::string& id) const { return sandbox_dir(id) / "workspace"; }

  /// An idle sandbox, up, with security_probe at /workspace/security_probe.
  std::unique_ptr<sandbox> start(const std::string& id, recording_observer& obs, sandbox_runtime* rt = nullptr,
                                 std::vector<std::string> env = {}) {
    sandbox_spec spec;
    spec.id = id;
    spec.env = std::move(env);
    auto s = (rt ? rt : runtime.get())->start(spec, obs);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    const fs::path probe = workspace(id) / "security_probe";
    testing::copy_executable(FERRY_SECURITY_PROBE, probe);
    BOOST_REQUIRE_MESSAGE(obs.wait_for("running", 30s), "sandbox " << id << " did not come up");
    return std::move(*s);
  }

  /// Runs security_probe `args` inside; its results.
  probe_results probe(sandbox& sb, recording_observer& obs, std::vector<std::string> args) {
    args.insert(args.begin(), "/workspace/security_probe");
    const uint32_t id = next_command++;
    auto e = testing::run_to_end(sb, obs, testing::argv(id, args), 60s);
    BOOST_TEST(e.what == "exited", e.data);
    const std::string out = obs.output(id, 0);
    BOOST_TEST_MESSAGE(testing::test_backend() << ": " << fmt::format("{}", fmt::join(args, " ")) << " → " << out
                                               << obs.output(id, 1));
    return parse_results(out);
  }

  /// Runs a shell line inside (with `stdin` on its stdin); its stdout.
  std::string shell(sandbox& sb, recording_observer& obs, const std::string& line, const std::string& stdin_data = {},
                    std::chrono::milliseconds timeout = 60s) {
    auto c = testing::shell(next_command++, line);
    c.stdin_data = stdin_data;
    c.output_limit_bytes = 0;
    auto e = testing::run_to_end(sb, obs, c, timeout);
    BOOST_TEST(e.what == "exited", e.data);
    return obs.output(c.command_id, 0);
  }

  /// Releases the sandbox; checks it ended normally and left no directory and no process.
  void release_and_check(sandbox& sb, recording_observer& obs) {
    auto r = sb.release();
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    sb.wait();
    auto ended = obs.find("ended");
    BOOST_REQUIRE(ended);
    BOOST_TEST(!ended->failure.has_value(), ended->failure.value_or(""));
    BOOST_TEST(testing::processes_mentioning(sb.id()).empty());
    BOOST_TEST(!fs::exists(sandbox_dir(sb.id())));
  }

  /// Every file a command inside can read — all of it but /usr (the host's, read-only, shared by
  /// design), /sys and /proc, of which every process's environ and cmdline — that contains any of
  /// `needles`. The needles come on stdin, so they are in no file, argument or environment a
  /// search could find (each grep under `timeout`, the whole within 60 s).
  std::vector<std::string> files_containing(sandbox& sb, recording_observer& obs,
                                            const std::vector<std::string>& needles) {
    std::string in;
    for (const auto& n : needles) {
      BOOST_REQUIRE(!n.empty());
      in += n + "\n";
    }
    const std::string out = shell(sb, obs,
                                  "needles=$(cat); "
                                  "for d in /* /.[!.]*; do [ -L \"$d\" ] && continue; "
                                  "  case \"$d\" in /usr|/proc|/sys) continue;; esac; "
                                  "  printf '%s\\n' \"$needles\" | timeout 30 grep -rlsF -D skip -f - \"$d\"; "
                                  "done; "
                                  "printf '%s\\n' \"$needles\" | timeout 10 grep -lsF -f - /proc/[0-9]*/environ "
                                  "/proc/[0-9]*/cmdline; true",
                                  in, 60s);
    std::vector<std::string> found;
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);)
      found.push_back(line);
    return found;
  }
};

std::string unique_id(const std::string& what) { return testing::unique_id("sec", what); }

bool failed(const probe_results& r, const std::string& name) {
  auto it = r.find(name);
  return it != r.end() && it->second != "ok";
}

/// "Client connection created" lines in a nats-server log (debug on).
size_t nats_connections(const ferry::test::nats_server& nats) {
  const std::string log = nats.log();
  size_t n = 0;
  for (size_t at = 0; (at = log.find("Client connection created", at)) != std::string::npos; ++at)
    ++n;
  return n;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(security_battery, *boost::unit_test::precondition(&testing::backend_available))

// Loopback services of the host (TCP and UDP on 127.0.0.1 and [::1], standing in for ferryd's
// ports, and a real nats-server), private networks and the metadata address: the probe reaches
// each from the host, and nothing from inside a sandbox.
BOOST_FIXTURE_TEST_CASE(no_connection_from_inside_reaches_host_loopback_private_or_metadata_addresses, battery) {
  // The whole process runs in the test's namespace, not the machine's.
  BOOST_TEST(network().test_netns != network().machine_netns);
  BOOST_TEST(fs::read_symlink("/proc/self/ns/net") == network().test_netns);

  std::vector<std::string> addresses = {"127.0.0.1", "::1"};
  addresses.insert(addresses.end(), trap_addresses.begin(), trap_addresses.end());
  // Unix sockets of the host: one in the abstract namespace (bound to the network namespace, as
  // containerd-shim's once were) and one in a host directory (as Ferry's control sockets are).
  const fs::path host_socket = data_dir / "host.sock";
  trap_listeners traps(addresses, {"@" + random_token("abstract"), host_socket.string()});
  ferry::test::nats_server nats("debug: true\n");
  auto targets = traps.targets();
  targets.push_back(fmt::format("tcp/127.0.0.1/{}", nats.port()));

  // Positive control: every target is reachable from the host, and each listener sees it.
  const size_t nats_before = nats_connections(nats);
  auto host = host_probe([&] {
    std::vector<std::string> a = {"connect"};
    a.insert(a.end(), targets.begin(), targets.end());
    return a;
  }());
  for (const auto& t : targets)
    BOOST_TEST(host[t] == "ok", t);
  const bool all_seen = ferry::test::eventually(
      [&] {
        for (const auto& [t, n] : traps.counts())
          if (n != 1)
            return false;
        return nats_connections(nats) == nats_before + 1;
      },
      5s);
  BOOST_REQUIRE_MESSAGE(all_seen, "the host's own probe did not reach every listener");
  const auto before = traps.counts();
  const size_t nats_seen = nats_connections(nats);

  recording_observer obs;
  auto sb = start(unique_id("net"), obs);
  std::vector<std::string> args = {"connect"};
  args.insert(args.end(), targets.begin(), targets.end());
  auto inside = probe(*sb, obs, args);
  for (const auto& t : targets) {
    BOOST_TEST(inside.count(t) == 1u, t);
    if (t.rfind("udp/", 0) != 0)  // a datagram to the sandbox's own loopback is sent, to no one
      BOOST_TEST(inside[t] != "ok", t << " connected from inside");
  }
  // The same through a tool an agent would use: curl's exit code per attempt, 7 = could not connect
  // (a trap accepting would give 52, an empty reply).
  std::string curl_line;
  size_t tcp_traps = 0;
  for (const auto& t : traps.targets()) {
    if (t.rfind("tcp/", 0) != 0)
      continue;
    const auto a = t.find('/'), b = t.rfind('/');
    std::string addr = t.substr(a + 1, b - a - 1);
    if (addr.find(':') != std::string::npos)
      addr = "[" + addr + "]";
    ++tcp_traps;
    curl_line += fmt::format("timeout 5 curl -s -m 3 -o /dev/null http://{}:{}/ ; echo \"$?\"; ", addr, t.substr(b + 1));
  }
  curl_line += "timeout 5 curl -s -m 3 -o /dev/null http://169.254.169.254/latest/meta-data/ ; echo \"$?\"";
  std::istringstream curls(shell(*sb, obs, curl_line));
  size_t attempts = 0;
  for (std::string code; std::getline(curls, code); ++attempts)
    BOOST_TEST(code == "7", "curl attempt " << attempts);
  BOOST_TEST(attempts == tcp_traps + 1);

  std::this_thread::sleep_for(300ms);  // what was sent has arrived by now on a loopback
  BOOST_TEST((traps.counts() == before), "a listener saw a connection or datagram from inside the sandbox");
  for (const auto& [t, n] : traps.counts())
    BOOST_TEST(n == before.at(t), t);
  BOOST_TEST(nats_connections(nats) == nats_seen, "nats-server saw a client from inside the sandbox");
  release_and_check(*sb, obs);
}

// Raw and packet sockets, mounts (a tmpfs, a bind, remounting the root read-write, proc), device
// nodes, the kernel's knobs that have let containers out before (core_pattern, ferry-init's
// binary through /proc/1/exe, its memory) and kernel modules: refused inside; the same probes
// work on the host (mounts in a private mount namespace), so a broken probe cannot pass.
BOOST_FIXTURE_TEST_CASE(raw_sockets_mounts_devices_kernel_knobs_and_modules_are_refused, battery) {
  auto host_raw = host_probe({"raw-socket"});
  BOOST_TEST(host_raw["raw_inet_icmp"] == "ok");
  BOOST_TEST(host_raw["packet_raw"] == "ok");
  testing::temp_dir mnt;
  auto host_mount = host_probe({"mount", mnt.path().string()}, {"unshare", "--mount", "--propagation", "private"});
  BOOST_TEST(host_mount["mount_tmpfs"] == "ok");
  BOOST_TEST(host_mount["mount_bind"] == "ok");
  // A node for /dev/kmsg (1:11, the host kernel's log): made and opened on the host.
  auto host_nodes = host_probe({"mknod", mnt.path().string(), "1", "11"});
  BOOST_TEST(host_nodes["mknod_char"] == "ok");
  BOOST_TEST(host_nodes["open_char"] == "ok");
  // Opened for writing, never written.
  const std::vector<std::string> knobs = {"/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches",
                                          "/proc/sys/kernel/hostname"};
  auto host_knobs = host_probe([&] {
    std::vector<std::string> a = {"open-write"};
    a.insert(a.end(), knobs.begin(), knobs.end());
    return a;
  }());
  for (const auto& k : knobs)
    BOOST_TEST(host_knobs[k] == "ok", k);
  auto host_modules = host_probe({"modules"});
  // Where the kernel has module support, root on the host gets past the permission check (and
  // the image is refused as not ELF); a kernel without it answers ENOSYS to everyone.
  if (host_modules["init_module"] == "ENOSYS")
    BOOST_TEST_MESSAGE("this kernel has no module support: the module calls are ENOSYS on the host too");
  else
    BOOST_TEST(host_modules["delete_module"] == "ENOENT");

  recording_observer obs;
  const auto id = unique_id("calls");
  auto sb = start(id, obs);
  auto raw = probe(*sb, obs, {"raw-socket"});
  for (const char* name : {"raw_inet_icmp", "raw_inet_tcp", "raw_inet_raw", "raw_inet6_icmp", "packet_raw",
                           "packet_dgram", "inet_sock_packet"})
    BOOST_TEST(failed(raw, name), name << "=" << raw[name]);

  shell(*sb, obs, "mkdir -p /tmp/m");
  const std::string root_options_line =  // (no awk: Debian's is an alternatives link into the host's /etc)
      "while read -r id parent dev root point options rest; do [ \"$point\" = / ] && echo \"$options\"; done "
      "< /proc/self/mountinfo";
  const std::string root_options = shell(*sb, obs, root_options_line);
  BOOST_TEST(!root_options.empty());
  auto mounted = probe(*sb, obs, {"mount", "/tmp/m"});
  for (const char* name : {"mount_tmpfs", "mount_bind", "remount_root_rw", "mount_proc"})
    BOOST_TEST(failed(mounted, name), name << "=" << mounted[name]);
  // The root is still read-only after the attempts.
  // The root's mount keeps its options (read-only, or a writable root's), whatever was tried.
  BOOST_TEST(shell(*sb, obs, root_options_line) == root_options);

  // bwrap: no node at all; gVisor lets a node be made in its own tmpfs, which leads to no device.
  auto nodes = probe(*sb, obs, {"mknod", "/tmp", "1", "11"});
  BOOST_REQUIRE(nodes.count("mknod_char"));
  BOOST_TEST((nodes["mknod_char"] != "ok" || failed(nodes, "open_char")),
             "mknod=" << nodes["mknod_char"] << " open=" << nodes["open_char"]);
  std::vector<std::string> refused = {"/proc/1/exe", "/.ferry/init", "/proc/1/mem"};
  refused.insert(refused.end(), knobs.begin(), knobs.end());
  shell(*sb, obs, "touch /tmp/own-file");
  std::vector<std::string> open_args = {"open-write", "/tmp/own-file"};
  open_args.insert(open_args.end(), refused.begin(), refused.end());
  auto opened = probe(*sb, obs, open_args);
  BOOST_TEST(opened["/tmp/own-file"] == "ok", "the probe cannot open even a file of its own");
  for (const auto& path : refused)
    BOOST_TEST(failed(opened, path), path << "=" << opened[path]);

  auto mods = probe(*sb, obs, {"modules"});
  for (const char* name : {"init_module", "finit_module", "delete_module"})
    BOOST_TEST((mods[name] == "EPERM" || mods[name] == "ENOSYS"), name << "=" << mods[name]);
  release_and_check(*sb, obs);
}

// No capabilities in any set and no_new_privs, where root on the host has them (the control).
BOOST_FIXTURE_TEST_CASE(commands_run_without_capabilities_or_new_privileges, battery) {
  auto host = host_probe({"privileges"});
  BOOST_TEST(host["cap_effective"] != "0");
  BOOST_TEST(host["cap_bounding"] != "0");
  recording_observer obs;
  auto sb = start(unique_id("caps"), obs);
  auto inside = probe(*sb, obs, {"privileges"});
  for (const char* set : {"cap_effective", "cap_permitted", "cap_inheritable", "cap_bounding", "cap_ambient"})
    BOOST_TEST(inside[set] == "0", set << "=" << inside[set]);
  BOOST_TEST(inside["no_new_privs"] == "1");
  release_and_check(*sb, obs);
}

// Descriptors: a command and ferry-init (PID 1) hold nothing of the host's but pipes, sockets,
// /dev/null and (runsc) the log ferry-init writes its diagnostics to: no host directory, whose
// descriptor would be a way out of the mount namespace (/proc/1/fd/N/..), and no other host file.
// (bwrap: ferry-init is not dumpable, its /proc/1/fd cannot be read at all; gVisor lets a
// process of the same uid read and open it anyway.)
BOOST_FIXTURE_TEST_CASE(no_host_directory_or_file_descriptor_reaches_the_sandbox, battery) {
  recording_observer obs;
  auto sb = start(unique_id("fds"), obs);
  const std::string fds = shell(*sb, obs, "for p in $$ 1; do for f in /proc/$p/fd/*; do "
                                          "t=$(readlink $f 2>/dev/null); [ -d $f ] && t=\"dir:$t\"; "
                                          "echo \"$p ${f##*/} $t\"; done; done");
  BOOST_TEST_MESSAGE(testing::test_backend() << ":\n" << fds);
  std::istringstream lines(fds);
  size_t own = 0;
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string pid, fd, target;
    fields >> pid >> fd >> target;
    own += pid != "1";
    const bool allowed = (target.empty() && pid == "1")  // not readable: not dumpable
                         || target == "/dev/null" || target.rfind("pipe:", 0) == 0 || target.rfind("socket:", 0) == 0 ||
                         target.rfind("anon_inode:", 0) == 0 ||
                         (pid == "1" && testing::test_backend() == "runsc" && target.rfind("host:", 0) == 0);
    BOOST_TEST(allowed, line);
  }
  BOOST_TEST(own >= 3u, fds);  // stdin, stdout, stderr
  release_and_check(*sb, obs);
}

// Filling the disk: with a quota of 64 MiB, the probe writes up to 256 MiB into /workspace and
// then into the root (a writable root's layer is on the same disk; a read-only root refuses).
// Each stops at ENOSPC (or EROFS) before the quota, the host's free space falls by no more than
// the quota (plus slack for the other builds on this machine) and comes back after the end, and
// the limit is reported as the disk's.
BOOST_FIXTURE_TEST_CASE(filling_the_disk_stops_at_the_quota, battery) {
  sandbox_limits limits;
  limits.disk_bytes = 64ull << 20;
  auto rt = make_runtime(limits);
  recording_observer obs;
  const auto id = unique_id("diskfill");
  auto sb = start(id, obs, rt.get());
  auto in_workspace = probe(*sb, obs, {"fill-disk", "/workspace/fill", "256"});
  BOOST_TEST(in_workspace["fill"] == "ENOSPC");
  const uint64_t written = std::strtoull(in_workspace["written"].c_str(), nullptr, 10);
  BOOST_TEST(written >= (32ull << 20), "the probe wrote only " << written << " bytes");  // it did fill
  BOOST_TEST(written <= limits.disk_bytes);
  auto in_root = probe(*sb, obs, {"fill-disk", "/fill", "256"});
  BOOST_TEST((in_root["fill"] == "ENOSPC" || in_root["open"] == "EROFS"), "fill=" << in_root["fill"] << " open="
                                                                                  << in_root["open"]);
  // What the sandbox holds of the host's disk (its image and its files there; per sandbox, so
  // other tests writing meanwhile do not count).
  const uint64_t cost = testing::host_bytes_of(sandbox_dir(id));
  BOOST_TEST(cost <= limits.disk_bytes + (1ull << 20), "the sandbox holds " << (cost >> 20) << " MiB of the host's disk");
  BOOST_TEST_MESSAGE("wrote " << (written >> 20) << " MiB in /workspace; the sandbox holds " << (cost >> 20)
                              << " MiB of the host's disk");
  BOOST_REQUIRE(obs.wait_for("limit", 10s));
  auto hit = obs.find("limit");
  BOOST_TEST((hit->hit.what == limit_hit::kind::disk));
  BOOST_TEST(hit->hit.limit <= limits.disk_bytes);
  BOOST_TEST(hit->data.find("disk quota reached (64 MiB)") != std::string::npos, hit->data);
  BOOST_TEST(host_can_fork());
  release_and_check(*sb, obs);
}

// The control socket is the sandbox's to replace (same uid as ferry-init; under runsc with an
// egress socket, --host-uds=all, as here): a symlink put in its place must not send the host
// anywhere else. After the owner lets go, a new host lists and attaches: the host's unix socket
// the symlink names sees no connection.
BOOST_FIXTURE_TEST_CASE(a_symlinked_control_socket_does_not_redirect_the_host, battery) {
  const fs::path victim = data_dir / "victim.sock";
  trap_listeners traps({}, {victim.string()});
  auto egress = std::make_shared<testing::fake_egress_binder>();
  auto config = testing::test_config(tmp.path());
  config.egress = egress;
  auto made = ferry::sandbox::make_runtime(config);
  BOOST_REQUIRE_MESSAGE(made.ok(), (made.ok() ? "" : made.error().message));
  auto& rt = **made;

  recording_observer obs;
  const auto id = unique_id("ctl-link");
  auto sb = start(id, obs, &rt);
  const std::string moved = shell(*sb, obs, fmt::format("cd /.ferry/ctl && ln -s {} link 2>&1 && "
                                                        "{{ mv -T -f link init.sock 2>&1 || "
                                                        "{{ rm -f init.sock 2>&1 && mv -T link init.sock 2>&1; }}; }} "
                                                        "&& echo replaced",
                                                        victim.string()));
  BOOST_TEST_MESSAGE(testing::test_backend() << ": " << moved);
  BOOST_REQUIRE_MESSAGE(moved == "replaced\n", moved);
  BOOST_REQUIRE(fs::is_symlink(sandbox_dir(id) / "ctl" / "init.sock"));
  sb->detach();
  sb.reset();

  auto host = ferry::sandbox::make_runtime(config);
  BOOST_REQUIRE(host.ok());
  auto live = (*host)->list_live();
  BOOST_TEST_MESSAGE("list_live: " << (live.ok() ? fmt::format("{}", fmt::join(*live, ", ")) : live.error().message));
  recording_observer obs2;
  auto attached = (*host)->attach(id, resume_point{}, obs2);
  BOOST_TEST(!attached.ok(), "attached through a symlink");
  if (!attached.ok())
    BOOST_TEST_MESSAGE("attach: " << attached.error().message);
  else
    (*attached)->detach();
  std::this_thread::sleep_for(200ms);
  for (const auto& [t, n] : traps.counts())
    BOOST_TEST(n == 0u, "the host connected to " << t << " through the sandbox's symlink");
  if (auto* proxy = egress->proxy(id))
    BOOST_TEST(proxy->accepted() == 0, "the host connected to the sandbox's egress socket");
  auto cleaned = (*host)->cleanup_orphans();
  BOOST_TEST((cleaned.ok() && *cleaned == 1u));
  BOOST_TEST(!fs::exists(sandbox_dir(id)));
  BOOST_TEST(testing::processes_mentioning(id).empty());
}

// Found by this battery (fixed): besides its disk, a command could write host files without any
// bound — /.ferry/ctl was a writable bind of the host's <sandbox>/ctl/ (both backends), and
// under runsc ferry-init's stdout and stderr, host descriptors of the sandbox's log, open to a
// command through /proc/1/fd/1 and /proc/1/fd/2 (gVisor does not refuse them although ferry-init
// is not dumpable). Both now live on the sandbox's disk (storage.h): the host's filesystem pays
// nothing, the quota bounds them, and a failure reason quotes the log as the sandbox's own,
// untrusted output.
BOOST_FIXTURE_TEST_CASE(host_files_outside_the_workspace_are_not_writable_without_bound, battery) {
  recording_observer obs;
  const auto id = unique_id("hostfill");
  auto sb = start(id, obs);
  shell(*sb, obs, "head -c 67108864 /dev/zero > /.ferry/ctl/fill; "
                  "for f in 1 2; do [ -e /proc/1/fd/$f ] && { head -c 33554432 /dev/zero; "
                  "echo 'memory limit reached (forged by a command)'; } >> /proc/1/fd/$f; done; true");
  // Allocated bytes of files on the host's own filesystem (the sandbox directory's device) in
  // the sandbox's directory and ctl/: its key, pids, … — not its disk (disk.img, sparse, and
  // what is mounted from it, another device: bounded by the quota).
  struct stat dir_st {};
  BOOST_REQUIRE(::stat(sandbox_dir(id).c_str(), &dir_st) == 0);
  auto allocated = [&](const fs::path& p) {
    struct stat st {};
    return ::lstat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_dev == dir_st.st_dev &&
               p.filename() != "disk.img"
             ? static_cast<uint64_t>(st.st_blocks) * 512
             : 0;
  };
  uint64_t outside = 0;
  for (const char* sub : {"", "ctl", "disk"})
    for (const auto& e : fs::directory_iterator(sandbox_dir(id) / sub))
      outside += allocated(e.path());
  BOOST_TEST(outside < (1ull << 20), "a command wrote " << (outside >> 20) << " MiB of host files outside /workspace");
  // The disk took it: ctl/ and (runsc) the log are on it.
  struct stat ctl_st {};
  BOOST_REQUIRE(::stat((sandbox_dir(id) / "ctl").c_str(), &ctl_st) == 0);
  BOOST_TEST(ctl_st.st_dev != dir_st.st_dev);
  release_and_check(*sb, obs);
}

// A host process: invisible or untouchable from inside (ptrace attach and seize, SIGKILL), and
// untouched afterwards (alive, not traced). The same probe attaches to and kills another host
// process from the host.
BOOST_FIXTURE_TEST_CASE(a_host_process_cannot_be_traced_or_killed_from_inside, battery) {
  auto spawn_sleeper = [] {
    spawn_options o;
    o.argv = {"sleep", "120"};
    auto c = child_process::spawn(o);
    BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
    return std::move(*c);
  };
  auto control = spawn_sleeper();
  auto host = host_probe({"ptrace", std::to_string(control.pid())});
  BOOST_TEST(host["ptrace_attach"] == "ok");
  BOOST_TEST(host["ptrace_seize"] == "ok");
  BOOST_TEST(host_probe({"kill", std::to_string(control.pid())})["kill"] == "ok");
  BOOST_TEST(control.wait_for(5s).has_value(), "the host probe's SIGKILL did not end the control sleeper");

  auto victim = spawn_sleeper();
  const std::string status_path = fmt::format("/proc/{}/status", victim.pid());
  BOOST_REQUIRE(testing::read_proc_file(status_path).find("TracerPid:\t0\n") != std::string::npos);

  recording_observer obs;
  auto sb = start(unique_id("ptrace"), obs);
  auto inside = probe(*sb, obs, {"ptrace", std::to_string(victim.pid())});
  for (const char* name : {"ptrace_attach", "ptrace_seize"})
    BOOST_TEST(failed(inside, name), name << "=" << inside[name]);
  auto killed = probe(*sb, obs, {"kill", std::to_string(victim.pid())});
  BOOST_TEST(failed(killed, "kill"), "kill=" << killed["kill"]);
  // ptrace of the sandbox's own PID 1 (ferry-init: not dumpable) is refused too.
  auto own = probe(*sb, obs, {"ptrace", "1"});
  BOOST_TEST(failed(own, "ptrace_attach"), "ptrace_attach of PID 1=" << own["ptrace_attach"]);
  release_and_check(*sb, obs);

  BOOST_TEST(!victim.try_wait().has_value(), "the host process died");
  const std::string status = testing::read_proc_file(status_path);
  BOOST_TEST(status.find("TracerPid:\t0\n") != std::string::npos, status);
  BOOST_TEST(status.find("State:\tS") != std::string::npos, status);
}

// Host files and another sandbox's workspace: every path a command could think of fails (the
// host paths, /proc/<host pid>/root of the test and of the other sandbox's processes, `..` out
// of the workspace and out of /.ferry/ctl), and a search of everything readable inside finds
// none of their contents. The host itself reads them all (the control), and the search finds a
// canary placed in the sandbox's own workspace and /tmp.
BOOST_FIXTURE_TEST_CASE(host_files_and_another_sandbox_s_workspace_are_out_of_reach, battery) {
  recording_observer obs_a;
  const auto id_a = unique_id("a");
  auto a = start(id_a, obs_a);
  const std::string a_secret = random_token("workspace-a");
  BOOST_REQUIRE(a->write_file("a-secret.txt", a_secret + "\n").ok());
  const fs::path a_file = workspace(id_a) / "a-secret.txt";
  BOOST_REQUIRE(testing::file_content(a_file) == a_secret + "\n");

  std::string shadow_line;
  {
    std::ifstream shadow("/etc/shadow");
    std::getline(shadow, shadow_line);
  }
  BOOST_REQUIRE_MESSAGE(shadow_line.size() > 8, "the host's /etc/shadow has no first line to look for");

  std::vector<std::string> targets = {"/etc/shadow", "/etc/gshadow",
                                      (data_dir / "secret").string(),
                                      (data_dir / "admin_token").string(),
                                      a_file.string(),
                                      fmt::format("/proc/{}/root/etc/shadow", ::getpid()),
                                      fmt::format("/proc/{}/root{}", ::getpid(), a_file.string()),
                                      fmt::format("/proc/{}/environ", ::getpid()),
                                      fmt::format("/workspace/../{}/workspace/a-secret.txt", id_a),
                                      fmt::format("/workspace/../../sandboxes/{}/workspace/a-secret.txt", id_a),
                                      fmt::format("/.ferry/ctl/../../{}/workspace/a-secret.txt", id_a),
                                      fmt::format("/.ferry/ctl/../{}/workspace/a-secret.txt", id_a)};
  // Through A's host processes (bwrap: its monitor, ferry-init, commands; runsc: Sentry, gofer).
  for (pid_t pid : testing::sandbox_processes(sandbox_dir(id_a)).alive()) {
    targets.push_back(fmt::format("/proc/{}/root/workspace/a-secret.txt", pid));
    targets.push_back(fmt::format("/proc/{}/cwd/a-secret.txt", pid));
    targets.push_back(fmt::format("/proc/{}/root{}", pid, a_file.string()));
  }
  auto read_args = targets;
  read_args.insert(read_args.begin(), "read");
  // Control: the host reads each host path (those of A's processes resolve on the host too).
  auto host = host_probe(read_args);
  for (const auto& t : std::vector<std::string>{"/etc/shadow", (data_dir / "secret").string(), a_file.string(),
                                                fmt::format("/proc/{}/environ", ::getpid())})
    BOOST_TEST(host[t] == "ok", t);

  recording_observer obs_b;
  const auto id_b = unique_id("b");
  auto b = start(id_b, obs_b);
  const std::string canary = random_token("canary");
  write(workspace(id_b) / "canary.txt", canary + "\n");
  BOOST_REQUIRE(b->write_file("/tmp/canary.txt", canary + "\n").ok());
  read_args.push_back("/workspace/canary.txt");
  auto inside = probe(*b, obs_b, read_args);
  BOOST_TEST(inside["/workspace/canary.txt"] == "ok", "the probe cannot read even its own workspace");
  for (const auto& t : targets)
    BOOST_TEST(failed(inside, t), t << "=" << inside[t]);

  auto found = files_containing(*b, obs_b, {a_secret, data_secret, admin_token, shadow_line, canary});
  std::sort(found.begin(), found.end());
  BOOST_TEST((found == std::vector<std::string>{"/tmp/canary.txt", "/workspace/canary.txt"}),
             "found: " << fmt::format("{}", fmt::join(found, ", ")));
  // Nor does B find A's workspace by name.
  const std::string by_name = shell(*b, obs_b, "timeout 20 find / -xdev -name 'a-secret.txt' 2>/dev/null; "
                                               "timeout 20 find / -path /usr -prune -o -path /proc -prune -o "
                                               "-path /sys -prune -o -name 'a-secret.txt' -print 2>/dev/null; true");
  BOOST_TEST(by_name.empty(), by_name);

  release_and_check(*b, obs_b);
  release_and_check(*a, obs_a);
}

// Another sandbox's services and processes: A listens on TCP 127.0.0.1 and on an abstract unix
// socket inside; B's connects to the same port and name are refused, and B's SIGKILLs to A's host
// processes reach nothing. A's own probe reaches its listener (the control), and A goes on.
BOOST_FIXTURE_TEST_CASE(another_sandbox_s_services_and_processes_are_out_of_reach, battery) {
  recording_observer obs_a, obs_b;
  const auto id_a = unique_id("svc-a");
  auto a = start(id_a, obs_a);
  auto b = start(unique_id("svc-b"), obs_b);
  const std::string abstract_name = random_token("a-abstract");
  const uint32_t listener = next_command++;
  auto serve = testing::argv(listener, {"/usr/bin/python3", "-c",
                                        "import select, socket, sys\n"
                                        "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen()\n"
                                        "u = socket.socket(socket.AF_UNIX); u.bind('\\0' + sys.argv[1]); u.listen()\n"
                                        "print(t.getsockname()[1], flush=True)\n"
                                        "while True:\n"
                                        "  ready, _, _ = select.select([t, u], [], [], 60)\n"
                                        "  if not ready: break\n"
                                        "  for s in ready:\n"
                                        "    s.accept()[0].close(); print('accepted', flush=True)\n",
                                        abstract_name});
  serve.timeout = 90s;
  BOOST_REQUIRE(a->run(serve).ok());
  BOOST_REQUIRE_MESSAGE(obs_a.wait_for_output("\n", 30s), "A's listener did not start: " << obs_a.output(listener, 1));
  const std::string port = obs_a.output(listener, 0).substr(0, obs_a.output(listener, 0).find('\n'));
  const std::vector<std::string> targets = {"tcp/127.0.0.1/" + port, "unix/@" + abstract_name + "/0"};

  std::vector<std::string> args = {"connect"};
  args.insert(args.end(), targets.begin(), targets.end());
  auto from_b = probe(*b, obs_b, args);
  for (const auto& t : targets)
    BOOST_TEST(failed(from_b, t), t << "=" << from_b[t]);
  std::vector<std::string> killed;
  for (pid_t pid : testing::sandbox_processes(sandbox_dir(id_a)).alive()) {
    auto k = probe(*b, obs_b, {"kill", std::to_string(pid)});
    BOOST_TEST(failed(k, "kill"), "kill " << pid << "=" << k["kill"]);
    killed.push_back(std::to_string(pid));
  }
  BOOST_TEST(!killed.empty(), "A has no host processes to aim at");
  BOOST_TEST(obs_a.output(listener, 0).find("accepted") == std::string::npos, "A's listener saw B");

  // Control: A reaches its own listener, once per target, and is alive and well.
  auto from_a = probe(*a, obs_a, args);
  for (const auto& t : targets)
    BOOST_TEST(from_a[t] == "ok", t);
  BOOST_TEST(obs_a.wait_until(
      [&](const std::vector<recording_observer::record>& rs) {
        const std::string out = recording_observer::output_in(rs, listener, 0);
        size_t n = 0;
        for (size_t at = 0; (at = out.find("accepted", at)) != std::string::npos; ++at)
          ++n;
        return n == targets.size();
      },
      10s));
  BOOST_TEST(!obs_a.find("ended"));
  BOOST_TEST(shell(*a, obs_a, "echo alive") == "alive\n");
  BOOST_REQUIRE(a->signal(listener, SIGKILL).ok());
  BOOST_REQUIRE(obs_a.wait_for_end(listener, 10s));
  release_and_check(*b, obs_b);
  release_and_check(*a, obs_a);
}

// Credentials: the secret in the test process's environment (so in runsc's and bwrap's), the
// host's admin token, the sandbox's own handshake key: not in `env`, not in any process's
// environ or cmdline, not in any file a command can read. The environment the sandbox was given
// is visible (the control for the reads), and the search finds the canary.
BOOST_FIXTURE_TEST_CASE(no_credential_is_found_in_the_environment_or_the_filesystem, battery) {
  BOOST_REQUIRE(std::getenv("FERRY_TEST_SECRET") && network().env_secret == std::getenv("FERRY_TEST_SECRET"));
  const std::string visible = random_token("visible");
  recording_observer obs;
  const auto id = unique_id("creds");
  auto sb = start(id, obs, nullptr, {"FERRY_VISIBLE=" + visible});
  const std::string key = testing::file_content(sandbox_dir(id) / "key");
  BOOST_REQUIRE(key.size() >= 64u);

  const std::string env = shell(*sb, obs, "env; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\"; done");
  BOOST_TEST(env.find("FERRY_VISIBLE=" + visible) != std::string::npos, env);
  BOOST_TEST(env.find(network().env_secret) == std::string::npos);
  BOOST_TEST(env.find("FERRY_TEST_SECRET") == std::string::npos);
  BOOST_TEST(env.find(admin_token) == std::string::npos);

  const std::string canary = random_token("canary");
  write(workspace(id) / "canary.txt", canary + "\n");
  auto found = files_containing(*sb, obs, {network().env_secret, admin_token, data_secret, key.substr(0, 64), canary});
  BOOST_TEST((found == std::vector<std::string>{"/workspace/canary.txt"}),
             "found: " << fmt::format("{}", fmt::join(found, ", ")));
  // No credential files of the host's either.
  const std::string creds = shell(*sb, obs,
                                  "for p in /root/.ssh /root/.aws /root/.config /etc/ssh /etc/shadow /var/lib "
                                  "/run/secrets /home; do [ -e \"$p\" ] && echo \"$p\"; done; true");
  BOOST_TEST(creds.empty(), creds);
  release_and_check(*sb, obs);
}

// Writes everywhere a command might: /workspace, /tmp and /dev/shm take them; the root refuses
// them, or with a writable root takes them into the sandbox's own layer — never into the host's
// /usr or the shared root underneath (a file of the root changed inside stays as it was on the
// host). Once the sandbox has ended, no file of them is left on the host (its directory, the
// runtime's directories, the host's temporary directories). Before the end the host search does
// find the workspace's copy (the control).
BOOST_FIXTURE_TEST_CASE(nothing_written_inside_survives_the_sandbox, battery) {
  recording_observer obs;
  const auto id = unique_id("survive");
  auto sb = start(id, obs);
  const std::string token = random_token("survivor");
  std::vector<std::string> args = {"write"};
  for (const char* dir : {"/workspace", "/tmp", "/dev/shm", "", "/etc", "/usr", "/.ferry", "/.ferry/ctl", "/dev",
                          "/proc", "/var/tmp", "/run", "/root"})
    args.push_back(fmt::format("{}/{}", dir, token));
  auto written = probe(*sb, obs, args);
  BOOST_TEST(written["/workspace/" + token] == "ok");
  BOOST_TEST(written["/tmp/" + token] == "ok");
  // The root's files, changed inside: Ferry's /etc of the host-tree root (under the test's
  // directory) and the host's own /usr (only an mtime: nothing that could harm if it got through).
  const fs::path shared_root = tmp.path() / "rootfs-host";
  const std::string passwd_before = testing::file_content(shared_root / "etc" / "passwd");
  BOOST_REQUIRE(!passwd_before.empty());
  std::error_code ec;
  const auto env_mtime = fs::last_write_time("/usr/bin/env", ec);
  BOOST_REQUIRE(!ec);
  const std::string tampered = shell(*sb, obs,
                                     "echo 'intruder::0:0::/:/bin/sh' >> /etc/passwd && echo passwd-changed; "
                                     "touch -m -d @0 /usr/bin/env 2>/dev/null && echo env-touched; "
                                     "rm -f /etc/hosts 2>/dev/null && echo hosts-removed; true");
  BOOST_TEST_MESSAGE(testing::test_backend() << ": root changes inside: " << tampered);
  auto root_untouched = [&] {
    for (const char* dir : {"", "/etc", "/usr", "/.ferry"})
      BOOST_TEST(!fs::exists(fmt::format("{}/{}", dir, token)), dir << "/" << token << " on the host");
    BOOST_TEST(testing::file_content(shared_root / "etc" / "passwd") == passwd_before);
    BOOST_TEST(fs::exists(shared_root / "etc" / "hosts"));
    BOOST_TEST((fs::last_write_time("/usr/bin/env", ec) == env_mtime));
  };
  root_untouched();
  // Symlinks out of the sandbox's directories to the host's data directory: its removal at the end
  // must not follow them.
  shell(*sb, obs, fmt::format("ln -s {0} /workspace/{1}-dir; ln -s {0}/secret /workspace/{1}-file; "
                              "ln -s / /workspace/{1}-root; mkdir -p /workspace/deep/er; ln -s {0} /workspace/deep/er/{1}; "
                              "ln -s {0} /.ferry/ctl/{1}-dir",
                              data_dir.string(), token));
  BOOST_REQUIRE(fs::is_symlink(workspace(id) / (token + "-dir")));
  // A background process keeps writing as the sandbox ends.
  shell(*sb, obs, fmt::format("(while :; do date > /workspace/{0}-late; date > /tmp/{0}-late; sleep 0.05; done) "
                              ">/dev/null 2>&1 & sleep 0.2",
                              token));
  const auto before = host_files_named(token, tmp.path());
  BOOST_TEST(std::count_if(before.begin(), before.end(),
                           [&](const std::string& f) { return f == (workspace(id) / token).string(); }) == 1,
             "the host search does not find the workspace's file: " << fmt::format("{}", fmt::join(before, ", ")));
  release_and_check(*sb, obs);
  const auto after = host_files_named(token, tmp.path());
  BOOST_TEST(after.empty(), fmt::format("{}", fmt::join(after, ", ")));
  root_untouched();
  BOOST_TEST(testing::file_content(data_dir / "secret") == data_secret + "\n");
  BOOST_TEST(testing::file_content(data_dir / "admin_token") == admin_token + "\n");
}

// A fork bomb (every process forking as fast as it can for 4 s) stops at the pids limit, which
// is named; the host can start processes throughout, and its process count grows by no more
// than the limit allows.
BOOST_FIXTURE_TEST_CASE(a_fork_bomb_is_contained_by_the_pids_limit, battery) {
  sandbox_limits limits;
  // Under runsc the Sentry's and gofer's threads count too (as in process_api_test).
  limits.pids = testing::test_backend() == "runsc" ? 160 : 64;
  limits.memory_bytes = 512ull << 20;
  limits.cpu_millis = 1000;  // one CPU: the other stays the host's
  auto rt = make_runtime(limits);
  recording_observer obs;
  const auto id = unique_id("forkbomb");
  auto sb = start(id, obs, rt.get());
  const size_t baseline = host_process_count();
  const uint32_t cmd = next_command++;
  BOOST_REQUIRE(sb->run(testing::argv(cmd, {"/workspace/security_probe", "fork-bomb", "4"})).ok());
  // The sandbox's host processes (bwrap: its monitor and every process inside; runsc: Sentry,
  // gofer and a stub per address space) and, for the message, the whole host's (noisy: other
  // builds share this machine).
  size_t peak = 0, host_peak = baseline, samples = 0;
  bool host_forked = true;
  const auto deadline = steady::now() + 60s;
  auto over = [&] {
    return obs.find("exited", cmd) || obs.find("failed", cmd) || obs.find("ended");
  };
  while (!over() && steady::now() < deadline) {
    peak = std::max(peak, testing::sandbox_processes(sandbox_dir(id)).alive().size());
    host_peak = std::max(host_peak, host_process_count());
    host_forked = host_forked && host_can_fork();
    ++samples;
    std::this_thread::sleep_for(50ms);
  }
  BOOST_REQUIRE_MESSAGE(over(), "the fork bomb did not end within 60 s");
  BOOST_TEST(host_forked, "the host could not start a process during the bomb");
  BOOST_TEST(peak <= limits.pids, "the sandbox's host processes peaked at " << peak);
  BOOST_TEST(samples > 0u);
  BOOST_TEST_MESSAGE("sandbox's host processes peaked at " << peak << " (pids limit " << limits.pids << ", "
                                                           << samples << " samples); host processes " << baseline
                                                           << " → peak " << host_peak);
  BOOST_REQUIRE(obs.wait_for("limit", 15s));
  auto hit = obs.find("limit");
  BOOST_TEST((hit->hit.what == limit_hit::kind::pids));
  BOOST_TEST(hit->hit.limit == limits.pids);
  BOOST_TEST(hit->data.find("process limit reached") != std::string::npos, hit->data);
  if (obs.find("ended")) {
    BOOST_TEST(hit->hit.whole_sandbox);
    BOOST_TEST(obs.find("ended")->failure.value_or("").find("process limit reached") == 0u,
               obs.find("ended")->failure.value_or("(normally)"));
    BOOST_TEST(!fs::exists(sandbox_dir(id)));
  } else {
    BOOST_TEST(hit->hit.command_id == cmd);
    BOOST_TEST(obs.output(cmd, 0).find("refused=0") == std::string::npos, obs.output(cmd, 0));
    // The sandbox goes on.
    BOOST_TEST(shell(*sb, obs, "echo alive") == "alive\n");
    release_and_check(*sb, obs);
  }
  BOOST_TEST(host_can_fork());
  auto left = rt->cleanup_orphans();
  BOOST_TEST((left.ok() && *left == 0u));
}

// A memory bomb (touching 2 GiB) is killed at the memory limit, which is named; the host goes on.
BOOST_FIXTURE_TEST_CASE(a_memory_bomb_is_killed_at_the_memory_limit, battery) {
  sandbox_limits limits;
  limits.memory_bytes = 256ull << 20;
  auto rt = make_runtime(limits);
  recording_observer obs;
  const auto id = unique_id("membomb");
  auto sb = start(id, obs, rt.get());
  const uint32_t cmd = next_command++;
  BOOST_REQUIRE(sb->run(testing::argv(cmd, {"/workspace/security_probe", "mem-bomb", "2048"})).ok());
  BOOST_REQUIRE(obs.wait_until(
      [&](const std::vector<recording_observer::record>& rs) {
        return std::any_of(rs.begin(), rs.end(), [&](const auto& r) {
          return ((r.what == "exited" || r.what == "failed") && r.command_id == cmd) || r.what == "ended";
        });
      },
      60s));
  BOOST_REQUIRE(obs.wait_for("limit", 15s));
  auto hit = obs.find("limit");
  BOOST_TEST((hit->hit.what == limit_hit::kind::memory));
  BOOST_TEST(hit->hit.limit == limits.memory_bytes);
  BOOST_TEST(hit->data.find("memory limit reached (256 MiB)") != std::string::npos, hit->data);
  BOOST_TEST(obs.output(cmd, 0).find("touched=512\n") == std::string::npos, "it got past twice the limit");
  if (obs.find("ended")) {
    BOOST_TEST(hit->hit.whole_sandbox);
    BOOST_TEST(obs.find("ended")->failure.value_or("").find("memory limit reached (256 MiB)") == 0u,
               obs.find("ended")->failure.value_or("(normally)"));
    BOOST_TEST(!fs::exists(sandbox_dir(id)));
  } else {
    auto exited = obs.find("exited", cmd);
    BOOST_REQUIRE(exited);
    BOOST_TEST(exited->signal == SIGKILL);
    BOOST_TEST(hit->hit.command_id == cmd);
    BOOST_TEST(shell(*sb, obs, "echo alive") == "alive\n");
    release_and_check(*sb, obs);
  }
  BOOST_TEST(host_can_fork());
  auto left = rt->cleanup_orphans();
  BOOST_TEST((left.ok() && *left == 0u));
}

BOOST_AUTO_TEST_SUITE_END()

int main(int argc, char* argv[]) {
  network().enter();
  return boost::unit_test::unit_test_main(&init_unit_test, argc, argv);
}
