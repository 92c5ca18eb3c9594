// Accepting connections, start-up and orderly stop.

#include "server.h"

#include <cstdio>

namespace ferry::gateway {
namespace detail {

server::server(const gateway_options& opts, gateway_deps deps)
  : opts_(opts),
    deps_(deps),
    views_(*deps.store),
    acceptor_(net::make_strand(ioc_)),
    blocking_(4) {}

server::~server() { stop(); }

result<void> server::listen() {
  beast::error_code ec;
  auto addr = net::ip::make_address(opts_.host, ec);
  if (ec)
    return fail("listen address '" + opts_.host + "': " + ec.message());
  tcp::endpoint ep{addr, opts_.port};
  acceptor_.open(ep.protocol(), ec);
  if (!ec)
    acceptor_.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec)
    acceptor_.bind(ep, ec);
  if (!ec)
    acceptor_.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return fail("listen on " + opts_.host + ":" + std::to_string(opts_.port) + ": " +
                ec.message());
  port_ = acceptor_.local_endpoint().port();
  do_accept();
  for (int i = 0; i < std::max(1, opts_.io_threads); ++i)
    threads_.emplace_back([this] { ioc_.run(); });
  return {};
}

void server::stop() {
  if (stopped_.exchange(true))
    return;
  net::post(acceptor_.get_executor(), [this] {
    beast::error_code ec;
    acceptor_.close(ec);
  });
  // Close every live event stream (each on its own strand), then stop the loop.
  std::vector<std::shared_ptr<event_stream_session>> streams;
  {
    std::lock_guard<std::mutex> guard(streams_mtx_);
    for (auto& w : streams_)
      if (auto s = w.lock())
        streams.push_back(std::move(s));
  }
  for (auto& s : streams)
    s->close_from_server();
  streams.clear();
  blocking_.join();
  // Give closes a moment to be sent, then stop.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < deadline) {
    std::lock_guard<std::mutex> guard(streams_mtx_);
    streams_.remove_if([](auto& w) { return w.expired(); });
    if (streams_.empty())
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ioc_.stop();
  for (auto& t : threads_)
    if (t.joinable())
      t.join();
}

void server::track(const std::shared_ptr<event_stream_session>& s) {
  std::lock_guard<std::mutex> guard(streams_mtx_);
  streams_.remove_if([](auto& w) { return w.expired(); });
  streams_.push_back(s);
}

void server::do_accept() {
  acceptor_.async_accept(net::make_strand(ioc_), [this](beast::error_code ec, tcp::socket s) {
    if (ec) {
      if (ec == net::error::operation_aborted || !acceptor_.is_open())
        return;
      std::fprintf(stderr, "ferryd: accept: %s\n", ec.message().c_str());
    } else {
      std::make_shared<http_session>(std::move(s), *this)->run();
    }
    if (acceptor_.is_open())
      do_accept();
  });
}

}  // namespace detail

result<std::unique_ptr<gateway>> start_gateway(const gateway_options& opts, gateway_deps deps) {
  if (!deps.store || !deps.tasks || !deps.tokens)
    return fail("start gateway: journal, task service and token registry are required");
  auto srv = std::make_unique<detail::server>(opts, deps);
  if (auto r = srv->listen(); !r)
    return r.error();
  return std::unique_ptr<gateway>(std::move(srv));
}

}  // namespace ferry::gateway
