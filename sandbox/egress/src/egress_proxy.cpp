// The egress proxy on Boost.Asio C++20 coroutines and Beast's HTTP parser/serializer. Each
// connection runs on a strand of its own: its request coroutine, the two pumps of a tunnel and
// its watchdog never run at once, so a connection's members need no lock.

#include <ferry/egress/egress_proxy.h>

#include "request_head.h"

#include <sys/stat.h>
#include <sys/un.h>

#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstdio>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

namespace ferry::egress {
namespace {

namespace fs = std::filesystem;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using unix_socket = net::local::stream_protocol;
using strand_type = net::strand<net::io_context::executor_type>;
using clock = std::chrono::steady_clock;
using beast::error_code;

constexpr size_t header_limit = 16 * 1024;
constexpr size_t relay_chunk = 16 * 1024;
constexpr size_t max_sandbox_id = 64;
constexpr std::string_view sandbox_header = "Ferry-Sandbox";

auto awaitable_ec(error_code& ec) { return net::redirect_error(net::use_awaitable, ec); }

/// Beast 1.74 speaks boost::string_view.
std::string_view sv(beast::string_view s) { return {s.data(), s.size()}; }
beast::string_view bsv(std::string_view s) { return {s.data(), s.size()}; }


std::string sandbox_id_problem(const std::string& id) {
  if (id.empty() || id.size() > max_sandbox_id)
    return fmt::format("sandbox id must have 1-{} characters", max_sandbox_id);
  if (id.front() == '.' || id.front() == '-')
    return "sandbox id must not start with '.' or '-'";
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
          c == '-'))
      return fmt::format("character '{}' not allowed in a sandbox id", c);
  return {};
}

/// Drops hop-by-hop fields (RFC 9110 7.6.1: those named in Connection too) and every Proxy-*.
template <bool isRequest, class Body>
void strip_hop_by_hop(http::message<isRequest, Body>& m) {
  std::vector<std::string> named;
  for (auto token : http::token_list(m[http::field::connection]))
    named.emplace_back(token);
  for (const auto& n : named)
    m.erase(n);
  for (auto f : {http::field::connection, http::field::keep_alive, http::field::proxy_connection, http::field::te,
                 http::field::trailer, http::field::upgrade})
    m.erase(f);
  std::vector<std::string> proxy_fields;
  for (const auto& f : m)
    if (istarts_with(sv(f.name_string()), "proxy-") || iequals(sv(f.name_string()), sandbox_header))
      proxy_fields.emplace_back(f.name_string());
  for (const auto& n : proxy_fields)
    m.erase(n);
}

struct sandbox_entry;
class proxy_impl;

/// One client connection on a sandbox's socket. Strand-confined.
class connection : public std::enable_shared_from_this<connection> {
 public:
  connection(proxy_impl& proxy, std::shared_ptr<sandbox_entry> sandbox, strand_type strand, uint64_t id);
  ~connection();

  unix_socket::socket& client() { return client_; }
  /// `self` keeps the connection alive for as long as the coroutine runs (its frame holds it).
  net::awaitable<void> run(std::shared_ptr<connection> self);
  /// Closes every socket; pending operations end with an error. On the strand.
  void close_all();
  const strand_type& strand() const { return strand_; }

 private:
  enum class phase { head, connect, relay };

  net::awaitable<void> watchdog(std::shared_ptr<connection> self);
  void set_deadline(clock::duration from_now);
  /// Pushes the idle deadline forward (cheap: the watchdog re-checks when it wakes).
  void touch();
  net::awaitable<void> refuse(http::status status, std::string rule, std::string reason, bool approvable = false);
  void report(bool allowed, std::string rule, bool approvable = false);
  net::awaitable<void> to_destination(http::request_parser<http::buffer_body>& parser, const target& t);
  template <class Upstream>
  net::awaitable<void> forward(Upstream& upstream, http::request_parser<http::buffer_body>& parser, const target& t,
                               bool internal);
  template <class From, class To>
  net::awaitable<void> pump(From& from, To& to, uint64_t& counter);
  template <class Upstream>
  net::awaitable<void> tunnel(Upstream& upstream);
  template <bool isRequest, class From, class To>
  net::awaitable<error_code> relay_message(From& from, To& to, beast::flat_buffer& buffer,
                                           http::parser<isRequest, http::buffer_body>& parser, uint64_t& counter);

  proxy_impl& proxy_;
  std::shared_ptr<sandbox_entry> sandbox_;
  strand_type strand_;
  uint64_t id_;
  unix_socket::socket client_;
  tcp::socket upstream_tcp_;
  unix_socket::socket upstream_unix_;
  tcp::resolver resolver_;
  net::steady_timer timer_;
  clock::time_point deadline_;
  phase phase_ = phase::head;
  bool closed_ = false;
  bool timed_out_ = false;
  bool reported_ = false;
  clock::time_point started_ = clock::now();
  beast::flat_buffer buffer_;
  egress_decision decision_;
};

struct sandbox_entry {
  sandbox_entry(std::string sandbox_id, fs::path path, egress_policy p, strand_type s, double burst)
      : id(std::move(sandbox_id)), socket_path(std::move(path)), acceptor(s), strand(s), policy(std::move(p)),
        bucket(burst), refilled(clock::now()) {}
  const std::string id;
  const fs::path socket_path;
  unix_socket::acceptor acceptor;  // on `strand`
  strand_type strand;

  std::mutex mu;
  egress_policy policy;                               // GUARDED_BY(mu)
  std::vector<domain_pattern> approvals;              // GUARDED_BY(mu)
  double bucket;                                      // GUARDED_BY(mu)
  clock::time_point refilled;                         // GUARDED_BY(mu)
  std::map<uint64_t, std::weak_ptr<connection>> open; // GUARDED_BY(mu)
  std::condition_variable drained;                    // signalled as `open` shrinks
  /// The sandbox's own observer (open_sandbox_at), called under `mu`; cleared by close.
  std::function<void(const egress_decision&)> observer; // GUARDED_BY(mu)
  uint64_t next_connection = 0;                       // GUARDED_BY(mu)
  bool closed = false;                                // GUARDED_BY(mu)
};

class proxy_impl final : public egress_proxy {
 public:
  explicit proxy_impl(egress_proxy_options options)
      : options_(std::move(options)), org_(std::make_shared<const egress_policy>(options_.org_policy)),
        work_(net::make_work_guard(io_)) {
    for (size_t i = 0; i < std::max<size_t>(1, options_.io_threads); ++i)
      threads_.emplace_back([this] { io_.run(); });
  }
  ~proxy_impl() override { stop(); }

  result<fs::path> open_sandbox(const std::string& sandbox_id, egress_policy policy) override;
  result<void> open_sandbox_at(const std::string& sandbox_id, egress_policy policy, const fs::path& socket,
                               std::function<void(const egress_decision&)> observer) override;
  result<void> close_sandbox(const std::string& sandbox_id) override;
  result<void> allow_for_sandbox(const std::string& sandbox_id, const std::string& destination) override;
  void set_org_policy(egress_policy policy) override {
    std::lock_guard lock(mu_);
    org_ = std::make_shared<const egress_policy>(std::move(policy));
  }
  void stop() override;

  const egress_proxy_options& options() const { return options_; }
  std::shared_ptr<const egress_policy> org_policy() const {
    std::lock_guard lock(mu_);
    return org_;
  }
  void observe(sandbox_entry& sandbox, const egress_decision& d) const {
    if (options_.observer)
      options_.observer(d);
    std::lock_guard lock(sandbox.mu);
    if (sandbox.observer)
      sandbox.observer(d);
  }

 private:
  net::awaitable<void> accept_loop(std::shared_ptr<sandbox_entry> sandbox);
  result<void> open_at(const std::string& sandbox_id, egress_policy policy, const fs::path& path, bool replace_any,
                       std::function<void(const egress_decision&)> observer = {});
  static void shut(const std::shared_ptr<sandbox_entry>& sandbox);

  const egress_proxy_options options_;
  mutable std::mutex mu_;
  std::shared_ptr<const egress_policy> org_;                          // GUARDED_BY(mu_)
  std::map<std::string, std::shared_ptr<sandbox_entry>> sandboxes_;   // GUARDED_BY(mu_)
  bool stopped_ = false;                                              // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
  // Last: destroyed first, with any coroutine frame still held by its handlers.
  net::io_context io_;
  net::executor_work_guard<net::io_context::executor_type> work_;
};

void log_exception(std::exception_ptr e) {
  if (!e)
    return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    std::fprintf(stderr, "egress proxy: connection failed: %s\n", x.what());
  }
}

// --- connection -------------------------------------------------------------------------------------

connection::connection(proxy_impl& proxy, std::shared_ptr<sandbox_entry> sandbox, strand_type strand, uint64_t id)
    : proxy_(proxy), sandbox_(std::move(sandbox)), strand_(strand), id_(id), client_(strand), upstream_tcp_(strand),
      upstream_unix_(strand), resolver_(strand), timer_(strand) {
  decision_.sandbox_id = sandbox_->id;
}

connection::~connection() {
  std::lock_guard lock(sandbox_->mu);
  if (sandbox_->open.erase(id_) > 0)
    sandbox_->drained.notify_all();
}

void connection::close_all() {
  closed_ = true;
  error_code ignored;
  client_.close(ignored);
  upstream_tcp_.close(ignored);
  upstream_unix_.close(ignored);
  resolver_.cancel();
  timer_.cancel();
}

void connection::set_deadline(clock::duration from_now) {
  deadline_ = clock::now() + from_now;
  timer_.cancel();  // the watchdog re-arms for the new (maybe earlier) deadline
}

void connection::touch() { deadline_ = clock::now() + proxy_.options().idle_timeout; }

// `self` keeps the connection alive while the coroutine runs.
net::awaitable<void> connection::watchdog([[maybe_unused]] std::shared_ptr<connection> self) {
  while (!closed_) {
    timer_.expires_at(deadline_);
    error_code ec;
    co_await timer_.async_wait(awaitable_ec(ec));
    if (closed_)
      co_return;
    if (clock::now() < deadline_)
      continue;  // moved forward, or re-armed by set_deadline
    timed_out_ = true;
    error_code ignored;
    if (phase_ == phase::connect) {
      // The client still gets its 504; only the attempt is abandoned.
      resolver_.cancel();
      upstream_tcp_.close(ignored);
      upstream_unix_.close(ignored);
      deadline_ = clock::time_point::max();
      continue;
    }
    close_all();
    co_return;
  }
}

void connection::report(bool allowed, std::string rule, bool approvable) {
  if (reported_)
    return;
  reported_ = true;
  decision_.allowed = allowed;
  decision_.rule = std::move(rule);
  decision_.approvable = approvable;
  decision_.duration = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - started_);
  proxy_.observe(*sandbox_, decision_);
}

net::awaitable<void> connection::refuse(http::status status, std::string rule, std::string reason, bool approvable) {
  report(false, rule, approvable);
  http::response<http::string_body> res{status, 11};
  res.set(http::field::server, "ferry-egress");
  res.set(http::field::content_type, "text/plain; charset=utf-8");
  if (status == http::status::proxy_authentication_required)
    res.set(http::field::proxy_authenticate, "Basic realm=\"ferry-egress\"");
  res.set("Ferry-Egress-Rule", rule);
  res.keep_alive(false);
  res.body() = fmt::format("ferry egress proxy: {}: {}{}\n", static_cast<unsigned>(status), reason,
                           approvable ? " (a user can allow this destination for the task)" : "");
  res.prepare_payload();
  error_code ec;
  co_await http::async_write(client_, res, awaitable_ec(ec));
  client_.shutdown(unix_socket::socket::shutdown_send, ec);
  close_all();
}

net::awaitable<void> connection::run(std::shared_ptr<connection> self) {
  const auto& options = proxy_.options();
  deadline_ = clock::now() + options.head_timeout;
  net::co_spawn(strand_, watchdog(self), log_exception);

  http::request_parser<http::buffer_body> parser;
  parser.header_limit(header_limit);
  parser.body_limit(std::numeric_limits<std::uint64_t>::max());
  error_code ec;
  co_await http::async_read_header(client_, buffer_, parser, awaitable_ec(ec));
  if (ec) {
    if (ec == http::error::header_limit)
      co_await refuse(http::status::request_header_fields_too_large, "request:header-too-large",
                      fmt::format("request head larger than {} bytes", header_limit));
    else if (timed_out_)
      report(false, "request:head-timeout");  // the client is gone: nobody to answer
    else if (ec != http::error::end_of_stream && ec != net::error::eof && !closed_)
      co_await refuse(http::status::bad_request, "request:malformed", "bad request: " + ec.message());
    close_all();
    co_return;
  }
  auto& req = parser.get();
  decision_.method = std::string(req.method_string());
  auto t = parse_target(req.method() == http::verb::connect, sv(req.target()));
  if (!t) {
    co_await refuse(http::status::bad_request, "request:bad-target", t.error().message);
    co_return;
  }
  decision_.host = t->host;
  decision_.port = t->port;

  // The token, checked against the sandbox this socket belongs to and its current policy.
  egress_policy policy;
  {
    std::lock_guard lock(sandbox_->mu);
    policy = sandbox_->policy;
  }
  auto auth = req.find(http::field::proxy_authorization);
  if (auth == req.end()) {
    co_await refuse(http::status::proxy_authentication_required, "token:missing",
                    "no sandbox token in Proxy-Authorization");
    co_return;
  }
  auto token = token_from(sv(auth->value()));
  if (!token) {
    co_await refuse(http::status::proxy_authentication_required, "token:malformed",
                    "Proxy-Authorization must be Basic base64(user:token) or Bearer token");
    co_return;
  }
  auto check = options.tokens->verify(*token, sandbox_->id, policy);
  if (!check.ok()) {
    co_await refuse(http::status::proxy_authentication_required, fmt::format("token:{}", to_string(*check.failure)),
                    "sandbox token refused: " + check.detail);
    co_return;
  }

  // Limits.
  {
    std::unique_lock lock(sandbox_->mu);
    size_t open = sandbox_->open.size();
    auto now = clock::now();
    double elapsed = std::chrono::duration<double>(now - sandbox_->refilled).count();
    sandbox_->refilled = now;
    sandbox_->bucket = std::min(options.limits.burst, sandbox_->bucket + elapsed * options.limits.requests_per_second);
    bool over_connections = open > options.limits.max_connections;
    bool over_rate = !over_connections && sandbox_->bucket < 1.0;
    if (!over_connections && !over_rate)
      sandbox_->bucket -= 1.0;
    lock.unlock();
    if (over_connections) {
      co_await refuse(http::status::too_many_requests, "limit:connections",
                      fmt::format("more than {} connections at once", options.limits.max_connections));
      co_return;
    }
    if (over_rate) {
      co_await refuse(http::status::too_many_requests, "limit:rate",
                      fmt::format("more than {} requests per second", options.limits.requests_per_second));
      co_return;
    }
  }

  // Internal routes: the token was enough.
  if (auto route = options.internal_routes.find(t->host); route != options.internal_routes.end()) {
    phase_ = phase::connect;
    set_deadline(options.connect_timeout);
    co_await upstream_unix_.async_connect(unix_socket::endpoint(route->second.string()), awaitable_ec(ec));
    if (ec) {
      co_await refuse(http::status::bad_gateway, "upstream:route-unreachable",
                      fmt::format("internal service {} is not reachable", t->host));
      co_return;
    }
    co_await forward(upstream_unix_, parser, *t, true);
    report(true, "route:" + t->host);
    close_all();
    co_return;
  }
  co_await to_destination(parser, *t);
  close_all();
}

net::awaitable<void> connection::to_destination(http::request_parser<http::buffer_body>& parser, const target& t) {
  const auto& options = proxy_.options();
  auto literal = parse_ip_literal(t.host);
  if (!literal) {  // normalize_host accepted it: cannot happen
    co_await refuse(http::status::bad_request, "request:bad-target", literal.error().message);
    co_return;
  }
  // A literal denotes its address: refused for what it is before any policy is asked (no user
  // can approve it).
  if (*literal) {
    if (auto why = address_refusal(**literal)) {
      co_await refuse(http::status::forbidden, "address:" + *why, "destination address refused: " + *why);
      co_return;
    }
  }

  auto org = proxy_.org_policy();
  std::string rule;
  {
    std::unique_lock lock(sandbox_->mu);
    auto verdict = decide_destination(*org, sandbox_->policy, sandbox_->approvals, t.host, t.port);
    lock.unlock();
    rule = verdict.rule;
    if (!verdict.allowed) {
      co_await refuse(http::status::forbidden, rule,
                      fmt::format("{}:{} is not allowed by the {} egress policy ({})", t.host, t.port,
                                  rule.starts_with("org:") ? "organisation's" : "sandbox's", rule),
                      verdict.not_listed);
      co_return;
    }
  }

  // Resolve (or take the literal) and keep only addresses that pass.
  phase_ = phase::connect;
  set_deadline(options.connect_timeout);
  std::vector<tcp::endpoint> passed;
  std::string first_refusal;
  error_code ec;
  if (*literal) {
    passed.emplace_back(**literal, t.port);
  } else {
    auto results = co_await resolver_.async_resolve(t.host, std::to_string(t.port), awaitable_ec(ec));
    if (ec) {
      if (timed_out_)
        co_await refuse(http::status::gateway_timeout, "upstream:resolve-timeout", "resolving " + t.host + " timed out");
      else
        co_await refuse(http::status::bad_gateway, "upstream:resolve-failed",
                        fmt::format("cannot resolve {}: {}", t.host, ec.message()));
      co_return;
    }
    for (const auto& r : results) {
      auto why = address_refusal(r.endpoint().address());
      if (!why)
        passed.push_back(r.endpoint());
      else if (first_refusal.empty())
        first_refusal = *why;
    }
    if (passed.empty()) {
      co_await refuse(http::status::forbidden, "address:" + first_refusal,
                      fmt::format("{} resolves to a refused address: {}", t.host, first_refusal));
      co_return;
    }
  }
  // Connect only to what was checked: never by name again (DNS rebinding cannot win).
  ec = net::error::host_unreachable;
  for (const auto& endpoint : passed) {
    if (timed_out_ || closed_)
      break;
    error_code ignored;
    upstream_tcp_.close(ignored);
    co_await upstream_tcp_.async_connect(endpoint, awaitable_ec(ec));
    if (!ec)
      break;
  }
  if (ec || closed_) {
    if (timed_out_)
      co_await refuse(http::status::gateway_timeout, "upstream:connect-timeout",
                      fmt::format("connecting to {}:{} timed out", t.host, t.port));
    else if (!closed_)
      co_await refuse(http::status::bad_gateway, "upstream:connect-failed",
                      fmt::format("cannot connect to {}:{}: {}", t.host, t.port, ec.message()));
    co_return;
  }
  co_await forward(upstream_tcp_, parser, t, false);
  report(true, rule);
}

template <class Upstream>
net::awaitable<void> connection::forward(Upstream& upstream, http::request_parser<http::buffer_body>& parser,
                                         const target& t, bool internal) {
  phase_ = phase::relay;
  touch();
  timer_.cancel();
  error_code ec;
  if (parser.get().method() == http::verb::connect) {
    static constexpr std::string_view established = "HTTP/1.1 200 Connection established\r\n\r\n";
    co_await net::async_write(client_, net::buffer(established), awaitable_ec(ec));
    if (ec)
      co_return;
    if (buffer_.size() > 0) {  // bytes the client sent right behind the head
      decision_.bytes_up += buffer_.size();
      co_await net::async_write(upstream, buffer_.data(), awaitable_ec(ec));
      if (ec)
        co_return;
      buffer_.consume(buffer_.size());
    }
    co_await tunnel(upstream);
    co_return;
  }

  // Plain HTTP: one request, origin-form, hop-by-hop and Proxy-* fields gone, then the answer.
  auto& req = parser.get();
  const bool head = req.method() == http::verb::head;
  strip_hop_by_hop(req);
  req.erase(http::field::expect);  // no 100-continue dance through a one-shot relay
  // RFC 9112 6.3: with Transfer-Encoding, Content-Length is ignored and a proxy removes it, so
  // the destination frames the body exactly as it was read here (no smuggled second request).
  if (req.find(http::field::transfer_encoding) != req.end())
    req.erase(http::field::content_length);
  req.target(t.path);
  req.set(http::field::host, t.port == 80 ? t.host : fmt::format("{}:{}", t.host, t.port));
  if (internal)
    req.set(bsv(sandbox_header), sandbox_->id);
  req.keep_alive(false);
  ec = co_await relay_message(client_, upstream, buffer_, parser, decision_.bytes_up);
  if (ec)
    co_return;

  beast::flat_buffer upstream_buffer;
  http::response_parser<http::buffer_body> response;
  response.header_limit(64 * 1024);
  response.body_limit(std::numeric_limits<std::uint64_t>::max());
  if (head)
    response.skip(true);
  co_await http::async_read_header(upstream, upstream_buffer, response, awaitable_ec(ec));
  if (ec) {
    if (!closed_)
      co_await refuse(http::status::bad_gateway, "upstream:bad-response", "the destination's answer: " + ec.message());
    co_return;
  }
  strip_hop_by_hop(response.get());
  response.get().keep_alive(false);
  co_await relay_message(upstream, client_, upstream_buffer, response, decision_.bytes_down);
  error_code ignored;
  client_.shutdown(unix_socket::socket::shutdown_send, ignored);
}

template <bool isRequest, class From, class To>
net::awaitable<error_code> connection::relay_message(From& from, To& to, beast::flat_buffer& buffer,
                                                     http::parser<isRequest, http::buffer_body>& parser,
                                                     uint64_t& counter) {
  http::serializer<isRequest, http::buffer_body> serializer{parser.get()};
  std::vector<char> chunk(relay_chunk);
  error_code ec;
  do {
    auto& body = parser.get().body();
    if (!parser.is_done()) {
      body.data = chunk.data();
      body.size = chunk.size();
      co_await http::async_read(from, buffer, parser, awaitable_ec(ec));
      if (ec == http::error::need_buffer)
        ec = {};
      if (ec)
        co_return ec;
      body.size = chunk.size() - body.size;
      body.data = chunk.data();
      body.more = !parser.is_done();
      counter += body.size;
      touch();
    } else {
      body.data = nullptr;
      body.size = 0;
      body.more = false;
    }
    co_await http::async_write(to, serializer, awaitable_ec(ec));
    if (ec == http::error::need_buffer)
      ec = {};
    if (ec)
      co_return ec;
  } while (!parser.is_done() && !serializer.is_done());
  co_return ec;
}

template <class From, class To>
net::awaitable<void> connection::pump(From& from, To& to, uint64_t& counter) {
  std::vector<char> chunk(relay_chunk);
  for (;;) {
    error_code ec;
    size_t n = co_await from.async_read_some(net::buffer(chunk), awaitable_ec(ec));
    if (ec) {
      error_code ignored;
      if (ec == net::error::eof)
        to.shutdown(To::shutdown_send, ignored);  // half-close passed on
      else
        close_all();
      co_return;
    }
    counter += n;
    touch();
    co_await net::async_write(to, net::buffer(chunk.data(), n), awaitable_ec(ec));
    if (ec) {
      close_all();
      co_return;
    }
  }
}

template <class Upstream>
net::awaitable<void> connection::tunnel(Upstream& upstream) {
  // Two pumps on this strand; this coroutine runs one and waits for the other.
  auto self = shared_from_this();
  auto down_done = std::make_shared<bool>(false);
  auto latch = std::make_shared<net::steady_timer>(strand_, clock::time_point::max());
  net::co_spawn(strand_, pump(upstream, client_, decision_.bytes_down),
                [self, down_done, latch](std::exception_ptr e) {
                  log_exception(e);
                  *down_done = true;
                  latch->cancel();
                });
  co_await pump(client_, upstream, decision_.bytes_up);
  if (!*down_done) {
    error_code ec;
    co_await latch->async_wait(awaitable_ec(ec));
  }
}

// --- proxy ------------------------------------------------------------------------------------------

net::awaitable<void> proxy_impl::accept_loop(std::shared_ptr<sandbox_entry> sandbox) {
  for (;;) {
    auto strand = net::make_strand(io_);
    uint64_t id = 0;
    {
      std::lock_guard lock(sandbox->mu);
      id = sandbox->next_connection++;
    }
    auto conn = std::make_shared<connection>(*this, sandbox, strand, id);
    error_code ec;
    co_await sandbox->acceptor.async_accept(conn->client(), awaitable_ec(ec));
    if (ec) {
      if (ec == net::error::operation_aborted || !sandbox->acceptor.is_open())
        co_return;
      // Out of descriptors and the like: wait a little instead of spinning.
      net::steady_timer pause(sandbox->strand, std::chrono::milliseconds(100));
      co_await pause.async_wait(awaitable_ec(ec));
      continue;
    }
    bool over_cap = false;
    {
      std::lock_guard lock(sandbox->mu);
      if (sandbox->closed)
        co_return;  // conn's destructor closes the socket
      // Beyond twice the limit a connection is not even read: idle ones would otherwise hold a
      // descriptor each until head_timeout.
      over_cap = sandbox->open.size() >= 2 * options_.limits.max_connections;
      if (!over_cap)
        sandbox->open.emplace(id, conn);
    }
    if (over_cap) {
      egress_decision d;
      d.sandbox_id = sandbox->id;
      d.rule = "limit:connections";
      observe(*sandbox, d);
      error_code ignored;
      conn->client().close(ignored);
      continue;
    }
    net::co_spawn(strand, conn->run(conn), log_exception);
  }
}

result<fs::path> proxy_impl::open_sandbox(const std::string& sandbox_id, egress_policy policy) {
  fs::path path = options_.socket_dir / (sandbox_id + ".sock");
  if (auto r = open_at(sandbox_id, std::move(policy), path, false); !r)
    return r.error();
  return path;
}

result<void> proxy_impl::open_sandbox_at(const std::string& sandbox_id, egress_policy policy, const fs::path& socket,
                                         std::function<void(const egress_decision&)> observer) {
  if (socket.empty() || !socket.is_absolute())
    return fail(errc::invalid_argument, fmt::format("egress proxy: socket path '{}' is not absolute", socket.string()));
  (void)close_sandbox(sandbox_id);  // a re-attach: the sandbox reaches the new socket
  return open_at(sandbox_id, std::move(policy), socket, true, std::move(observer));
}

result<void> proxy_impl::open_at(const std::string& sandbox_id, egress_policy policy, const fs::path& path,
                                 bool replace_any, std::function<void(const egress_decision&)> observer) {
  if (auto why = sandbox_id_problem(sandbox_id); !why.empty())
    return fail(errc::invalid_argument, fmt::format("egress proxy: {}: '{}'", why, sandbox_id));
  if (path.string().size() >= sizeof(sockaddr_un{}.sun_path))
    return fail(errc::invalid_argument, fmt::format("egress proxy: socket path {} is too long", path.string()));
  std::lock_guard lock(mu_);
  if (stopped_)
    return fail(errc::closed, "egress proxy: stopped");
  if (sandboxes_.count(sandbox_id))
    return fail(errc::conflict, fmt::format("egress proxy: sandbox {} is already open", sandbox_id));
  std::error_code fec;
  auto st = fs::symlink_status(path, fec);
  if (fs::exists(st)) {
    // In socket_dir only a stale socket of an earlier run is replaced. At a path the caller
    // chose (the sandbox's own control directory, which the sandbox can write) whatever the
    // sandbox put there goes — unlinked, never followed — except a directory.
    if (fs::is_directory(st) || (!replace_any && !fs::is_socket(st)))
      return fail(fmt::format("egress proxy: {} exists and is not a socket", path.string()));
    fs::remove(path, fec);
  }
  auto sandbox = std::make_shared<sandbox_entry>(sandbox_id, path, std::move(policy), net::make_strand(io_),
                                                 options_.limits.burst);
  sandbox->observer = std::move(observer);  // not shared yet
  error_code ec;
  sandbox->acceptor.open(unix_socket(), ec);
  if (!ec)
    sandbox->acceptor.bind(unix_socket::endpoint(path.string()), ec);
  if (!ec)
    sandbox->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return fail(fmt::format("egress proxy: cannot listen on {}: {}", path.string(), ec.message()));
  // Sandboxes run as uids of their own (bwrap): connecting needs write permission for others.
  if (::chmod(path.c_str(), 0666) != 0) {
    sandbox->acceptor.close(ec);
    return fail(fmt::format("egress proxy: chmod 0666 {}: {}", path.string(), std::strerror(errno)));
  }
  sandboxes_.emplace(sandbox_id, sandbox);
  net::co_spawn(sandbox->strand, accept_loop(sandbox), log_exception);
  return {};
}

void proxy_impl::shut(const std::shared_ptr<sandbox_entry>& sandbox) {
  std::vector<std::shared_ptr<connection>> open;
  {
    std::lock_guard lock(sandbox->mu);
    sandbox->closed = true;
    for (auto& [id, weak] : sandbox->open)
      if (auto c = weak.lock())
        open.push_back(std::move(c));
  }
  net::post(sandbox->strand, [sandbox] {
    error_code ignored;
    sandbox->acceptor.close(ignored);
  });
  for (auto& c : open)
    net::post(c->strand(), [c] { c->close_all(); });
  std::error_code fec;
  fs::remove(sandbox->socket_path, fec);
}

result<void> proxy_impl::close_sandbox(const std::string& sandbox_id) {
  std::shared_ptr<sandbox_entry> sandbox;
  {
    std::lock_guard lock(mu_);
    auto it = sandboxes_.find(sandbox_id);
    if (it == sandboxes_.end())
      return fail(errc::not_found, fmt::format("egress proxy: sandbox {} is not open", sandbox_id));
    sandbox = std::move(it->second);
    sandboxes_.erase(it);
  }
  shut(sandbox);
  // Their decisions are the sandbox's last words: wait for them (bounded), then silence its
  // observer.
  std::unique_lock lock(sandbox->mu);
  const bool drained = sandbox->drained.wait_for(lock, options_.close_wait, [&] {
    return std::none_of(sandbox->open.begin(), sandbox->open.end(),
                        [](const auto& entry) { return !entry.second.expired(); });
  });
  if (!drained && sandbox->observer)
    std::fprintf(stderr, "egress proxy: sandbox %s: connections still open %lld ms after close; their decisions "
                 "reach only the proxy's observer\n", sandbox_id.c_str(),
                 static_cast<long long>(options_.close_wait.count()));
  sandbox->observer = nullptr;
  return {};
}

result<void> proxy_impl::allow_for_sandbox(const std::string& sandbox_id, const std::string& destination) {
  auto pattern = domain_pattern::parse(destination);
  if (!pattern)
    return fail(errc::invalid_argument, "egress proxy: approval: " + pattern.error().message);
  std::lock_guard lock(mu_);
  auto it = sandboxes_.find(sandbox_id);
  if (it == sandboxes_.end())
    return fail(errc::not_found, fmt::format("egress proxy: sandbox {} is not open", sandbox_id));
  std::lock_guard sandbox_lock(it->second->mu);
  it->second->approvals.push_back(std::move(*pattern));
  return {};
}

void proxy_impl::stop() {
  std::map<std::string, std::shared_ptr<sandbox_entry>> all;
  {
    std::lock_guard lock(mu_);
    if (stopped_)
      return;
    stopped_ = true;
    all.swap(sandboxes_);
  }
  for (auto& [id, sandbox] : all)
    shut(sandbox);
  work_.reset();
  // Connections end as their sockets close; a resolution in getaddrinfo may not: stop after a
  // grace period rather than wait for it.
  auto grace = clock::now() + std::chrono::seconds(2);
  while (!io_.stopped() && clock::now() < grace)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  io_.stop();
  for (auto& t : threads_)
    t.join();
}

}  // namespace

result<std::unique_ptr<egress_proxy>> make_egress_proxy(egress_proxy_options options) {
  std::error_code ec;
  if (options.socket_dir.empty() || !fs::is_directory(options.socket_dir, ec))
    return fail(errc::invalid_argument,
                fmt::format("egress proxy: socket_dir '{}' is not a directory", options.socket_dir.string()));
  if (!options.tokens)
    return fail(errc::invalid_argument, "egress proxy: options.tokens is required");
  std::map<std::string, fs::path> routes;
  for (const auto& [name, path] : options.internal_routes) {
    auto normal = normalize_host(name);
    if (!normal || (*normal)[0] == '[' || parse_ip_literal(*normal).value())
      return fail(errc::invalid_argument, fmt::format("egress proxy: internal route '{}' is not a host name", name));
    routes.emplace(*normal, path);
  }
  options.internal_routes = std::move(routes);
  if (options.limits.max_connections == 0 || options.limits.requests_per_second <= 0 || options.limits.burst < 1)
    return fail(errc::invalid_argument, "egress proxy: limits must be positive (burst >= 1)");
  return std::unique_ptr<egress_proxy>(std::make_unique<proxy_impl>(std::move(options)));
}

}  // namespace ferry::egress

namespace ferry::egress {

namespace {

/// The runtime's side: sockets where the runtime puts them, policies and approvals from the
/// caller, decisions to the sandbox's observer, a token per open.
class proxy_binder final : public sandbox::egress_binder {
 public:
  proxy_binder(std::shared_ptr<egress_proxy> proxy, std::shared_ptr<const sandbox_tokens> tokens,
               std::function<sandbox_egress(const std::string&)> egress_for)
      : proxy_(std::move(proxy)), tokens_(std::move(tokens)), egress_for_(std::move(egress_for)) {}

  result<std::string> open(const std::string& sandbox_id, const fs::path& socket, report_fn report) override {
    sandbox_egress egress = egress_for_ ? egress_for_(sandbox_id) : sandbox_egress{egress_policy::none(), {}};
    auto token = tokens_->issue(sandbox_id, egress.policy);
    if (!token)
      return token.error();
    std::function<void(const egress_decision&)> observer;
    if (report)
      observer = [report = std::move(report)](const egress_decision& d) { report(d); };
    if (auto r = proxy_->open_sandbox_at(sandbox_id, egress.policy, socket, std::move(observer)); !r)
      return r.error();
    for (const auto& destination : egress.approvals) {
      if (auto r = proxy_->allow_for_sandbox(sandbox_id, destination); !r)
        std::fprintf(stderr, "egress proxy: sandbox %s: approval skipped: %s\n", sandbox_id.c_str(),
                     r.error().message.c_str());
    }
    {
      std::lock_guard lock(mu_);
      policies_.insert_or_assign(sandbox_id, egress.policy);
    }
    return std::move(*token);
  }
  void close(const std::string& sandbox_id) override {
    (void)proxy_->close_sandbox(sandbox_id);
    std::lock_guard lock(mu_);
    policies_.erase(sandbox_id);
  }
  /// A token bound to the policy the sandbox's socket was opened with (what the proxy checks).
  result<std::string> renew(const std::string& sandbox_id) override {
    std::optional<egress_policy> policy;
    {
      std::lock_guard lock(mu_);
      if (auto it = policies_.find(sandbox_id); it != policies_.end())
        policy = it->second;
    }
    if (!policy)
      return error_info{fmt::format("egress: sandbox {} is not open here", sandbox_id), errc::not_found};
    return tokens_->issue(sandbox_id, *policy);
  }

 private:
  std::mutex mu_;
  std::map<std::string, egress_policy> policies_;  // GUARDED_BY(mu_): open sandboxes
  const std::shared_ptr<egress_proxy> proxy_;
  const std::shared_ptr<const sandbox_tokens> tokens_;
  const std::function<sandbox_egress(const std::string&)> egress_for_;
};

}  // namespace

std::shared_ptr<sandbox::egress_binder> make_egress_binder(std::shared_ptr<egress_proxy> proxy,
                                                           std::shared_ptr<const sandbox_tokens> tokens,
                                                           std::function<sandbox_egress(const std::string&)> egress_for) {
  return std::make_shared<proxy_binder>(std::move(proxy), std::move(tokens), std::move(egress_for));
}

}  // namespace ferry::egress
