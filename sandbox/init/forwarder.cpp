#include "forwarder.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "util.h"

namespace ferry_init {

struct http_forwarder::connection {
  int client = -1;    // accepted TCP connection
  int upstream = -1;  // the unix socket
  std::string to_upstream, to_client;
  bool client_eof = false, upstream_eof = false;        // read side reached EOF
  bool upstream_shut = false, client_shut = false;      // shutdown(SHUT_WR) passed on
  bool dead = false;

  ~connection() {
    close_fd(client);
    close_fd(upstream);
  }
};

http_forwarder::http_forwarder() = default;
http_forwarder::~http_forwarder() { close_fd(listen_fd_); }

bool http_forwarder::start(uint16_t port, std::string upstream, std::string& why) {
  if (upstream.empty() || upstream.size() >= sizeof(sockaddr_un::sun_path)) {
    why = "bad proxy socket path `" + upstream + "` (empty or too long)";
    return false;
  }
  upstream_ = std::move(upstream);
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) {
    why = "socket: " + errno_text(errno);
    return false;
  }
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 64) != 0) {
    why = "cannot listen on 127.0.0.1:" + std::to_string(port) + ": " + errno_text(errno);
    close_fd(listen_fd_);
    return false;
  }
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  return true;
}

void http_forwarder::add_polls(std::vector<pollfd>& fds) {
  slots_.clear();
  if (listen_fd_ < 0)
    return;
  if (conns_.size() < max_connections) {
    fds.push_back({listen_fd_, POLLIN, 0});
    slots_.push_back(-1);
  }
  for (size_t i = 0; i < conns_.size(); ++i) {
    const connection& c = *conns_[i];
    short client = 0, upstream = 0;
    if (!c.client_eof && c.to_upstream.size() < buffer_bytes)
      client |= POLLIN;
    if (!c.to_client.empty())
      client |= POLLOUT;
    if (!c.upstream_eof && c.to_client.size() < buffer_bytes)
      upstream |= POLLIN;
    if (!c.to_upstream.empty())
      upstream |= POLLOUT;
    fds.push_back({c.client, client, 0});
    fds.push_back({c.upstream, upstream, 0});
    slots_.push_back(static_cast<int>(i));
  }
}

void http_forwarder::handle(const std::vector<pollfd>& fds, size_t first) {
  if (listen_fd_ < 0)
    return;
  char buf[16384];
  // Reads one side into `into`: false on EOF, true otherwise; marks the connection dead on error.
  auto read_side = [&](connection& c, int fd, std::string& into, bool& eof) {
    size_t room = buffer_bytes - std::min(buffer_bytes, into.size());
    if (room == 0)
      return;
    ssize_t n = ::recv(fd, buf, std::min(room, sizeof buf), MSG_DONTWAIT);
    if (n > 0)
      into.append(buf, static_cast<size_t>(n));
    else if (n == 0)
      eof = true;
    else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      c.dead = true;
  };
  size_t at = first;
  bool accept_ready = false;
  for (int slot : slots_) {
    if (slot < 0) {
      accept_ready = fds[at].revents != 0;
      ++at;
      continue;
    }
    connection& c = *conns_[static_cast<size_t>(slot)];
    const short client = fds[at].revents, upstream = fds[at + 1].revents;
    at += 2;
    if ((client & (POLLIN | POLLHUP | POLLERR)) && !c.client_eof)
      read_side(c, c.client, c.to_upstream, c.client_eof);
    if ((upstream & (POLLIN | POLLHUP | POLLERR)) && !c.upstream_eof)
      read_side(c, c.upstream, c.to_client, c.upstream_eof);
    if (!c.dead)
      pump(c);
    // Both directions idle for good, or a side that errored: done.
    if ((client & POLLERR) || (upstream & POLLERR))
      c.dead = true;
  }
  std::erase_if(conns_, [](const std::unique_ptr<connection>& c) { return c->dead; });
  if (accept_ready)
    accept_one();
}

void http_forwarder::pump(connection& c) {
  auto write_side = [&](int fd, std::string& from) {
    while (!from.empty()) {
      ssize_t w = ::send(fd, from.data(), from.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR)
          continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
          c.dead = true;
        return;
      }
      from.erase(0, static_cast<size_t>(w));
    }
  };
  write_side(c.upstream, c.to_upstream);
  write_side(c.client, c.to_client);
  if (c.dead)
    return;
  if (c.client_eof && c.to_upstream.empty() && !c.upstream_shut) {
    ::shutdown(c.upstream, SHUT_WR);
    c.upstream_shut = true;
  }
  if (c.upstream_eof && c.to_client.empty() && !c.client_shut) {
    ::shutdown(c.client, SHUT_WR);
    c.client_shut = true;
  }
  if (c.upstream_shut && c.client_shut)
    c.dead = true;
}

void http_forwarder::accept_one() {
  auto c = std::make_unique<connection>();
  c->client = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (c->client < 0)
    return;
  c->upstream = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, upstream_.data(), upstream_.size());
  int r;
  do {
    r = ::connect(c->upstream, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  } while (r != 0 && errno == EINTR);
  if (c->upstream < 0 || r != 0) {
    // Nothing to relay to: the client sees its connection closed. Logged when the reason
    // changes, so a command retrying in a loop does not flood the log.
    if (errno != last_errno_)
      log_error("HTTP forwarder: cannot connect to " + upstream_ + ": " + errno_text(errno));
    last_errno_ = errno;
    return;
  }
  last_errno_ = 0;
  conns_.push_back(std::move(c));
}

}  // namespace ferry_init
