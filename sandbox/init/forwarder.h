#pragma once
// The sandbox's only way out: a TCP listener on 127.0.0.1:<port> inside the sandbox whose
// connections are relayed byte for byte to a unix socket (the egress proxy's, bind-mounted into
// the sandbox). Commands find it through HTTP_PROXY / HTTPS_PROXY; it does not parse HTTP.
//
// Bounded: at most max_connections relayed at once (further connections wait in the listen
// backlog), at most buffer_bytes in flight per direction per connection (a side is not read while
// the other has that much unwritten). Half-closes are passed on (EOF one way shuts down writing
// the other way); a connection ends when both directions ended or on any error. A unix socket
// that refuses (missing, backlog full) closes the TCP connection at once.
//
// Single-threaded, driven by ferry-init's poll loop: add_polls() then handle().

#include <poll.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ferry_init {

class http_forwarder {
 public:
  static constexpr size_t max_connections = 64;
  static constexpr size_t buffer_bytes = 64 * 1024;

  http_forwarder();
  ~http_forwarder();
  http_forwarder(const http_forwarder&) = delete;
  http_forwarder& operator=(const http_forwarder&) = delete;

  /// Listens on 127.0.0.1:`port` (0: any free port) and relays to `upstream`. False with `why`.
  bool start(uint16_t port, std::string upstream, std::string& why);
  bool enabled() const { return listen_fd_ >= 0; }
  uint16_t port() const { return port_; }
  size_t connections() const { return conns_.size(); }

  /// Appends what to poll; `handle` must get the same vector (from `first` on) after poll.
  void add_polls(std::vector<pollfd>& fds);
  void handle(const std::vector<pollfd>& fds, size_t first);

 private:
  struct connection;
  void accept_one();
  static void pump(connection& c);

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::string upstream_;
  std::vector<std::unique_ptr<connection>> conns_;
  // What add_polls put in the vector, for handle(): -1 = the listener, else connection index
  // (two entries each: client, upstream).
  std::vector<int> slots_;
  int last_errno_ = 0;  // of the last failed connect to upstream_, 0 after a success
};

}  // namespace ferry_init
