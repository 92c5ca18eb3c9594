#pragma once
// What the egress proxy's end-to-end tests share: a network namespace of the test process's own
// (entered in main(), before any thread exists), "internal" and "public" addresses bound on its
// loopback, a hosts file bind-mounted over /etc/hosts in a private mount namespace, origin
// servers that count what reaches them, a TCP→unix relay (curl speaks to proxies over TCP only),
// a raw client, and curl. Nothing here can reach an address outside this namespace.

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>
#include <fmt/format.h>

#include "ferry/sandbox/process.h"

namespace ferry::egress::testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

/// The "public" destinations (TEST-NET-2, bound on this namespace's loopback only).
inline const std::string public_address = "198.51.100.10";
inline const std::string public_address_2 = "198.51.100.20";
/// Addresses the proxy must never connect to, each with a listener behind it.
inline const std::vector<std::string> internal_addresses = {"127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1",
                                                            "169.254.169.254", "100.64.0.1"};

inline const char* hosts_file = R"(127.0.0.1 localhost loopback.test
::1 localhost ip6-localhost
198.51.100.10 allowed.test tunnel.test
198.51.100.20 denied.test other.test
10.0.0.1 rebind.test mixed.test
198.51.100.10 mixed.test
169.254.169.254 metadata.test
192.168.1.1 private.test
172.16.0.1 private172.test
100.64.0.1 cgnat.test
::ffff:127.0.0.1 mapped.test
::ffff:a9fe:a9fe mapped-metadata.test
)";

/// Set up once in main(). `failure` says why not (as root); `entered` false otherwise.
struct test_network {
  bool entered = false;
  std::string failure;
  fs::path hosts_dir;

  void enter() {
    if (::geteuid() != 0) {
      failure = "needs root (network and mount namespaces)";
      return;
    }
    size_t threads = 0;
    for ([[maybe_unused]] const auto& t : fs::directory_iterator("/proc/self/task"))
      ++threads;
    if (threads != 1) {
      failure = fmt::format("{} threads before unshare: only the caller would move", threads);
      return;
    }
    if (::unshare(CLONE_NEWNET | CLONE_NEWNS) != 0) {
      failure = fmt::format("unshare(CLONE_NEWNET | CLONE_NEWNS): {}", std::strerror(errno));
      return;
    }
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
      failure = fmt::format("making mounts private: {}", std::strerror(errno));
      return;
    }
    std::vector<std::vector<std::string>> steps = {{"ip", "link", "set", "lo", "up"}};
    for (const auto& a : internal_addresses)
      if (a != "127.0.0.1")
        steps.push_back({"ip", "addr", "add", a + "/32", "dev", "lo"});
    for (const auto& a : {public_address, public_address_2})
      steps.push_back({"ip", "addr", "add", a + "/32", "dev", "lo"});
    for (const auto& step : steps) {
      auto r = ferry::sandbox::run_command(step, 10s);
      if (!r.ok() || !r->status.ok()) {
        failure = fmt::format("`{}` failed: {}", fmt::join(step, " "), r.ok() ? r->output : r.error().message);
        return;
      }
    }
    char dir[] = "/tmp/ferry-egress-hosts-XXXXXX";
    if (!::mkdtemp(dir)) {
      failure = "mkdtemp failed";
      return;
    }
    hosts_dir = dir;
    {
      std::ofstream out(hosts_dir / "hosts");
      out << hosts_file;
    }
    ::chmod((hosts_dir / "hosts").c_str(), 0644);
    if (::mount((hosts_dir / "hosts").c_str(), "/etc/hosts", nullptr, MS_BIND, nullptr) != 0) {
      failure = fmt::format("bind-mounting the test's hosts file over /etc/hosts: {}", std::strerror(errno));
      return;
    }
    entered = true;
  }

  /// After the tests (the mount namespace dies with the process; the file does not).
  void leave() {
    if (!hosts_dir.empty()) {
      ::umount2("/etc/hosts", MNT_DETACH);
      std::error_code ec;
      fs::remove_all(hosts_dir, ec);
    }
  }
};

inline test_network& network() {
  static test_network n;
  return n;
}

/// A test module's main(): enters the network namespace (before Boost.Test starts anything),
/// runs the tests, leaves it.
inline int run_tests_in_network(int argc, char* argv[]) {
  network().enter();
  int rc = boost::unit_test::unit_test_main([] { return true; }, argc, argv);
  network().leave();
  return rc;
}

/// Skips a test (with the reason) outside the namespace.
struct needs_network {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    boost::test_tools::assertion_result r(network().entered);
    r.message() << "not in the test's network namespace: " << network().failure;
    return r;
  }
};

inline int tcp_listen(const std::string& address, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  ::inet_pton(AF_INET, address.c_str(), &a.sin_addr);
  BOOST_REQUIRE_MESSAGE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0,
                        "bind " << address << ":" << port << ": " << std::strerror(errno));
  BOOST_REQUIRE(::listen(fd, 128) == 0);
  return fd;
}

inline uint16_t local_port(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

inline int unix_listen(const fs::path& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  BOOST_REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  BOOST_REQUIRE(::listen(fd, 128) == 0);
  return fd;
}

inline int unix_connect(const fs::path& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

/// Reads until EOF, an error or `timeout`; what arrived.
inline std::string read_until_closed(int fd, std::chrono::milliseconds timeout = 10s) {
  std::string out;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  char buf[8192];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      break;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0)
      break;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0)
      break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

/// HTTP servers on listening sockets (TCP or unix), one thread polling them and a thread per
/// connection. Each connection is counted per listener name; the answer's body is the request
/// head it got. A request for a path starting with /hold gets a head announcing 1 MB and 5
/// bytes of it, then nothing until the client goes away (for tunnels that must be cut).
class origin_servers {
 public:
  origin_servers() { BOOST_REQUIRE(::pipe2(stop_, O_CLOEXEC) == 0); }
  ~origin_servers() {
    stopping_ = true;
    ::close(stop_[1]);
    if (thread_.joinable())
      thread_.join();
    std::vector<std::thread> workers;
    {
      std::lock_guard lock(mu_);
      workers.swap(workers_);
    }
    for (auto& w : workers)
      w.join();
    for (auto& [fd, name] : listeners_)
      ::close(fd);
    ::close(stop_[0]);
  }

  /// Adds a listener (before start()).
  void add(int fd, std::string name) { listeners_.emplace_back(fd, std::move(name)); }
  void start() {
    thread_ = std::thread([this] { serve(); });
  }

  int connections(const std::string& name) const {
    std::lock_guard lock(mu_);
    auto it = counts_.find(name);
    return it == counts_.end() ? 0 : it->second;
  }
  int total() const {
    std::lock_guard lock(mu_);
    int n = 0;
    for (auto& [name, c] : counts_)
      n += c;
    return n;
  }
  std::vector<std::string> heads(const std::string& name) const {
    std::lock_guard lock(mu_);
    auto it = heads_.find(name);
    return it == heads_.end() ? std::vector<std::string>{} : it->second;
  }
  int held_closed() const { return held_closed_; }

 private:
  void serve() {
    std::vector<pollfd> fds;
    fds.push_back({stop_[0], POLLIN, 0});
    for (auto& [fd, name] : listeners_)
      fds.push_back({fd, POLLIN, 0});
    for (;;) {
      if (::poll(fds.data(), fds.size(), -1) < 0)
        continue;
      if (fds[0].revents)
        return;
      for (size_t i = 1; i < fds.size(); ++i) {
        if (!(fds[i].revents & POLLIN))
          continue;
        int c = ::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0)
          continue;
        const std::string& name = listeners_[i - 1].second;
        std::lock_guard lock(mu_);
        ++counts_[name];
        workers_.emplace_back([this, c, name] { answer(c, name); });
      }
    }
  }

  void answer(int c, const std::string& name) {
    std::string head;
    char buf[4096];
    while (head.find("\r\n\r\n") == std::string::npos && head.size() < 65536) {
      pollfd p[2] = {{c, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, 10000) <= 0 || p[1].revents)
        break;
      ssize_t n = ::recv(c, buf, sizeof buf, 0);
      if (n <= 0)
        break;
      head.append(buf, static_cast<size_t>(n));
    }
    {
      std::lock_guard lock(mu_);
      heads_[name].push_back(head);
    }
    auto space = head.find(' ');
    bool hold = space != std::string::npos && head.compare(space + 1, 5, "/hold") == 0;
    bool big = space != std::string::npos && head.compare(space + 1, 4, "/big") == 0;
    // A request body (Content-Length only): read it whole, answer its size and a checksum.
    std::string body_note;
    if (auto cl = head.find("Content-Length: "); cl != std::string::npos && cl < head.find("\r\n\r\n")) {
      size_t want = std::stoul(head.substr(cl + 16));
      std::string body = head.substr(head.find("\r\n\r\n") + 4);
      while (body.size() < want) {
        pollfd p{c, POLLIN, 0};
        if (::poll(&p, 1, 10000) <= 0)
          break;
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0)
          break;
        body.append(buf, static_cast<size_t>(n));
      }
      uint64_t sum = 0;
      for (unsigned char ch : body)
        sum = sum * 31 + ch;
      body_note = fmt::format("request body {} bytes, sum {}\n", body.size(), sum);
    }
    if (big) {
      std::string payload(1 << 20, '\0');
      for (size_t i = 0; i < payload.size(); ++i)
        payload[i] = static_cast<char>('a' + i % 26);
      std::string resp = fmt::format("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", payload.size()) + payload;
      size_t sent = 0;
      while (sent < resp.size()) {
        ssize_t n = ::send(c, resp.data() + sent, resp.size() - sent, MSG_NOSIGNAL);
        if (n <= 0)
          break;
        sent += static_cast<size_t>(n);
      }
    } else if (hold) {
      std::string start = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nheld.";
      [[maybe_unused]] auto w = ::send(c, start.data(), start.size(), MSG_NOSIGNAL);
      for (;;) {
        pollfd p[2] = {{c, POLLIN, 0}, {stop_[0], POLLIN, 0}};
        if (::poll(p, 2, 30000) <= 0 || p[1].revents)
          break;
        if (::recv(c, buf, sizeof buf, 0) <= 0) {
          ++held_closed_;
          break;
        }
      }
    } else {
      std::string body = fmt::format("origin {} got:\n{}{}", name, head.substr(0, head.find("\r\n\r\n") + 4), body_note);
      std::string resp = fmt::format(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n"
        "Proxy-Authenticate: Basic realm=\"origin\"\r\nX-Origin: {}\r\n\r\n{}",
        body.size(), name, body);
      [[maybe_unused]] auto w = ::send(c, resp.data(), resp.size(), MSG_NOSIGNAL);
    }
    ::close(c);
  }

  std::vector<std::pair<int, std::string>> listeners_;
  int stop_[2] = {-1, -1};
  std::atomic<bool> stopping_{false};
  std::atomic<int> held_closed_{0};
  mutable std::mutex mu_;
  std::map<std::string, int> counts_;
  std::map<std::string, std::vector<std::string>> heads_;
  std::vector<std::thread> workers_;
  std::thread thread_;
};

/// 127.0.0.1:<port> → a unix socket, byte for byte, half-closes passed on (what ferry-init's
/// forwarder does inside a sandbox; curl needs a TCP proxy).
class tcp_to_unix_relay {
 public:
  explicit tcp_to_unix_relay(fs::path target) : target_(std::move(target)) {
    fd_ = tcp_listen("127.0.0.1", 0);
    port_ = local_port(fd_);
    BOOST_REQUIRE(::pipe2(stop_, O_CLOEXEC) == 0);
    thread_ = std::thread([this] { serve(); });
  }
  ~tcp_to_unix_relay() {
    ::close(stop_[1]);
    thread_.join();
    std::vector<std::thread> workers;
    {
      std::lock_guard lock(mu_);
      workers.swap(workers_);
    }
    for (auto& w : workers)
      w.join();
    ::close(fd_);
    ::close(stop_[0]);
  }
  uint16_t port() const { return port_; }

 private:
  void serve() {
    for (;;) {
      pollfd p[2] = {{fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0)
        continue;
      if (p[1].revents)
        return;
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0)
        continue;
      std::lock_guard lock(mu_);
      workers_.emplace_back([this, c] { relay(c); });
    }
  }
  void relay(int c) {
    int u = unix_connect(target_);
    if (u < 0) {
      ::close(c);
      return;
    }
    bool open[2] = {true, true};  // c→u, u→c
    char buf[16384];
    while (open[0] || open[1]) {
      pollfd p[3] = {{c, static_cast<short>(open[0] ? POLLIN : 0), 0},
                     {u, static_cast<short>(open[1] ? POLLIN : 0), 0},
                     {stop_[0], POLLIN, 0}};
      if (::poll(p, 3, 60000) <= 0 || p[2].revents)
        break;
      bool failed = false;
      for (int i = 0; i < 2; ++i) {
        if (!open[i] || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
          continue;
        int from = i == 0 ? c : u, to = i == 0 ? u : c;
        ssize_t n = ::recv(from, buf, sizeof buf, 0);
        if (n == 0) {
          ::shutdown(to, SHUT_WR);
          open[i] = false;
        } else if (n < 0 || ::send(to, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) {
          failed = true;
        }
      }
      if (failed)
        break;
    }
    ::close(c);
    ::close(u);
  }

  fs::path target_;
  int fd_ = -1;
  uint16_t port_ = 0;
  int stop_[2] = {-1, -1};
  std::mutex mu_;
  std::vector<std::thread> workers_;
  std::thread thread_;
};

/// One raw request straight to a unix socket; the whole answer (read to EOF).
inline std::string raw_request(const fs::path& socket, const std::string& request, std::chrono::milliseconds timeout = 10s) {
  int fd = unix_connect(socket);
  BOOST_REQUIRE_MESSAGE(fd >= 0, "connect " << socket << ": " << std::strerror(errno));
  [[maybe_unused]] auto w = ::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string answer = read_until_closed(fd, timeout);
  ::close(fd);
  return answer;
}

inline int status_of(const std::string& response) {
  if (response.size() < 12 || !response.starts_with("HTTP/1.1 "))
    return 0;
  return std::stoi(response.substr(9, 3));
}

struct curl_result {
  int exit_code = -1;
  int http_code = 0;     // of the answer (the proxy's for plain HTTP refusals)
  int connect_code = 0;  // of the proxy's answer to CONNECT
  std::string body;
  std::string errors;
};

/// curl through the proxy at 127.0.0.1:`proxy_port`, the token as the proxy password (what
/// HTTP_PROXY=http://ferry:<token>@… gives every tool); `tunnel`: CONNECT (-p) even for http.
inline curl_result curl(uint16_t proxy_port, const std::string& token, const std::string& url, bool tunnel,
                        std::vector<std::string> extra = {}) {
  char dir[] = "/tmp/ferry-egress-curl-XXXXXX";
  BOOST_REQUIRE(::mkdtemp(dir));
  fs::path d = dir;
  std::string proxy = token.empty() ? fmt::format("http://127.0.0.1:{}", proxy_port)
                                    : fmt::format("http://ferry:{}@127.0.0.1:{}", token, proxy_port);
  std::vector<std::string> argv = {"curl", "-sS", "-m", "10", "--noproxy", "", "--proxy", proxy,
                                   "-o", (d / "body").string(), "--stderr", (d / "errors").string(),
                                   "-w", "%{http_code} %{http_connect}"};
  if (tunnel)
    argv.push_back("-p");
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.push_back(url);
  auto r = ferry::sandbox::run_command(argv, 20s);
  BOOST_REQUIRE_MESSAGE(r.ok(), "curl: " << (r.ok() ? "" : r.error().message));
  curl_result out;
  out.exit_code = r->status.exit_code;
  std::sscanf(r->output.c_str(), "%d %d", &out.http_code, &out.connect_code);
  auto slurp = [](const fs::path& p) {
    std::ifstream in(p);
    return std::string((std::istreambuf_iterator<char>(in)), {});
  };
  out.body = slurp(d / "body");
  out.errors = slurp(d / "errors");
  std::error_code ec;
  fs::remove_all(d, ec);
  return out;
}

}  // namespace ferry::egress::testing
