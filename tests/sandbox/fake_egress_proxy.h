#pragma once
// A stand-in for the egress proxy on the host, for the HTTP forwarder's tests: a unix socket
// server that reads each request's head and answers it with a fixed HTTP response. Counts
// connections (and how many at once) and keeps the requests it saw.

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>
#include <fmt/format.h>

#include "ferry/sandbox/sandbox.h"

namespace ferry::sandbox::testing {

class fake_egress_proxy {
 public:
  /// The body every answer carries.
  static constexpr std::string_view body = "hello from the egress proxy\n";

  /// Listens at `path`; each answer is held back `hold` (to see requests at once).
  explicit fake_egress_proxy(std::filesystem::path path, std::chrono::milliseconds hold = std::chrono::milliseconds(0))
      : path_(std::move(path)), hold_(hold) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.c_str(), path_.string().size());
    BOOST_REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    // bwrap sandboxes run as a uid of their own: connecting needs write permission.
    std::filesystem::permissions(path_, std::filesystem::perms(0666));
    BOOST_REQUIRE(::listen(fd_, 256) == 0);
    thread_ = std::thread([this] { serve(); });
  }
  ~fake_egress_proxy() {
    stop_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    thread_.join();
    for (auto& t : workers_)
      t.join();
    ::close(fd_);
  }
  int accepted() const { return accepted_; }
  int max_concurrent() const { return max_concurrent_; }
  std::vector<std::string> requests() const {
    std::lock_guard lock(mu_);
    return requests_;
  }
  std::string last_request() const {
    std::lock_guard lock(mu_);
    return requests_.empty() ? std::string() : requests_.back();
  }

 private:
  void serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0)
        continue;
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0)
        continue;
      ++accepted_;
      int now = ++concurrent_;
      for (int m = max_concurrent_; now > m && !max_concurrent_.compare_exchange_weak(m, now);) {
      }
      workers_.emplace_back([this, c] { answer(c); });
    }
  }

  void answer(int c) {
    std::string req;
    char buf[4096];
    while (req.find("\r\n\r\n") == std::string::npos) {
      pollfd q{c, POLLIN, 0};
      if (::poll(&q, 1, 5000) <= 0)
        break;
      ssize_t n = ::recv(c, buf, sizeof buf, 0);
      if (n <= 0)
        break;
      req.append(buf, static_cast<size_t>(n));
    }
    {
      std::lock_guard lock(mu_);
      requests_.push_back(req);
    }
    std::this_thread::sleep_for(hold_);
    const std::string resp =
      fmt::format("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.size(), body);
    [[maybe_unused]] ssize_t w = ::send(c, resp.data(), resp.size(), MSG_NOSIGNAL);
    --concurrent_;
    ::close(c);
  }

  std::filesystem::path path_;
  std::chrono::milliseconds hold_;
  int fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0}, concurrent_{0}, max_concurrent_{0};
  mutable std::mutex mu_;
  std::vector<std::string> requests_;
  std::thread thread_;
  std::vector<std::thread> workers_;
};

/// An egress_binder whose sockets are fake_egress_proxy servers, one per sandbox; it remembers
/// what it was asked to open and close.
class fake_egress_binder final : public ferry::sandbox::egress_binder {
 public:
  explicit fake_egress_binder(std::chrono::milliseconds hold = std::chrono::milliseconds(0)) : hold_(hold) {}

  /// The credential a sandbox is given: `cred.<id>`.
  static std::string credential(const std::string& sandbox_id) { return "cred." + sandbox_id; }

  ferry::result<std::string> open(const std::string& sandbox_id, const std::filesystem::path& socket,
                                  report_fn) override {
    std::lock_guard lock(mu_);
    std::error_code ec;
    std::filesystem::remove(socket, ec);
    proxies_[sandbox_id] = std::make_unique<fake_egress_proxy>(socket, hold_);
    opened_.push_back(sandbox_id);
    return credential(sandbox_id);
  }
  void close(const std::string& sandbox_id) override {
    std::unique_ptr<fake_egress_proxy> gone;
    {
      std::lock_guard lock(mu_);
      if (auto it = proxies_.find(sandbox_id); it != proxies_.end()) {
        gone = std::move(it->second);
        proxies_.erase(it);
      }
      closed_.push_back(sandbox_id);
    }
  }

  /// Sandbox `id`'s proxy while it is open (else null).
  fake_egress_proxy* proxy(const std::string& id) {
    std::lock_guard lock(mu_);
    auto it = proxies_.find(id);
    return it == proxies_.end() ? nullptr : it->second.get();
  }
  std::vector<std::string> opened() const {
    std::lock_guard lock(mu_);
    return opened_;
  }
  std::vector<std::string> closed() const {
    std::lock_guard lock(mu_);
    return closed_;
  }

 private:
  const std::chrono::milliseconds hold_;
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<fake_egress_proxy>> proxies_;  // GUARDED_BY(mu_)
  std::vector<std::string> opened_, closed_;                           // GUARDED_BY(mu_)
};

}  // namespace ferry::sandbox::testing
