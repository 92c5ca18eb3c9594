// The Beast HTTP/WebSocket server behind ferry/gateway/gateway.h.

#include <utility>  // Boost 1.74 asio uses std::exchange without including it

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

#include <atomic>
#include <charconv>
#include <cstdio>
#include <deque>
#include <list>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "ferry/actors/bus.h"
#include "ferry/actors/tasks.h"
#include "ferry/gateway/gateway.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace ferry::gateway {

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using json = nlohmann::json;
namespace ev = ferry::events::v1;

using request_t = http::request<http::string_body>;
using response_t = http::response<http::string_body>;

constexpr uint32_t header_limit = 16 * 1024;
constexpr uint64_t catch_up_batch = 256;
constexpr size_t live_buffer_limit = 4096;

response_t json_response(http::status status, const json& body, unsigned version, bool keep_alive) {
  response_t res{status, version};
  res.set(http::field::server, "ferryd");
  res.set(http::field::content_type, "application/json");
  res.set(http::field::cache_control, "no-store");
  res.keep_alive(keep_alive);
  res.body() = body.dump() + "\n";
  res.prepare_payload();
  return res;
}

response_t error_response(http::status status, std::string_view message, unsigned version,
                          bool keep_alive) {
  return json_response(status, json{{"error", message}}, version, keep_alive);
}

json task_json(const actors::task_view& v) {
  json j{{"id", v.id},
         {"status", v.status},
         {"command", v.command},
         {"repo", v.repo},
         {"user", v.user},
         {"exit_code", v.exit_code ? json(*v.exit_code) : json(nullptr)},
         {"reason", v.reason},
         {"finished", v.finished},
         {"last_seq", v.last_sequence},
         {"created_ns", v.created_ns},
         {"events", "/api/v1/tasks/" + v.id + "/events"}};
  j["sandbox"] = {{"id", v.sandbox_id}, {"backend", v.sandbox_backend},
                  {"status", v.sandbox_status}};
  if (v.finished)
    j["finished_ns"] = v.finished_ns;
  return j;
}

/// Splits "/a/b/c?x=y" into path segments and the raw query.
struct target_parts {
  std::vector<std::string_view> segments;
  std::string_view query;
};

target_parts split_target(std::string_view target) {
  target_parts out;
  auto q = target.find('?');
  if (q != std::string_view::npos) {
    out.query = target.substr(q + 1);
    target = target.substr(0, q);
  }
  size_t i = 0;
  while (i < target.size()) {
    while (i < target.size() && target[i] == '/')
      ++i;
    auto j = target.find('/', i);
    if (j == std::string_view::npos)
      j = target.size();
    if (j > i)
      out.segments.push_back(target.substr(i, j - i));
    i = j;
  }
  return out;
}

/// Value of `key` in a query string ("a=1&b=2"), if present.
std::optional<std::string_view> query_param(std::string_view query, std::string_view key) {
  while (!query.empty()) {
    auto amp = query.find('&');
    auto part = query.substr(0, amp);
    auto eq = part.find('=');
    if (part.substr(0, eq) == key)
      return eq == std::string_view::npos ? std::string_view{} : part.substr(eq + 1);
    if (amp == std::string_view::npos)
      break;
    query = query.substr(amp + 1);
  }
  return std::nullopt;
}

bool iequals_prefix(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size())
    return false;
  for (size_t i = 0; i < prefix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[i])) !=
        std::tolower(static_cast<unsigned char>(prefix[i])))
      return false;
  return true;
}

class server;

// -- WebSocket event stream ------------------------------------------------------------------------

/// Carries live NATS messages to a session without ever owning it (so the NATS thread never
/// destroys a session or its subscription). Closed by the session before it goes away.
struct live_mailbox {
  std::mutex mtx;
  bool closed = false;
  std::function<void(std::string)> deliver;  // posts onto the session's strand
};

/// Streams one task's events: catch-up from the journal from `next_seq_`, then live messages
/// from NATS, de-duplicated and gap-checked by sequence number. A gap or an overflowing live
/// buffer falls back to catch-up: the journal has every event, so nothing is lost and memory stays
/// bounded. Ends (normal close) after the task_finished event.
class event_stream_session : public std::enable_shared_from_this<event_stream_session> {
 public:
  event_stream_session(tcp::socket&& socket, server& srv, std::string task_id, uint64_t from)
    : ws_(std::move(socket)), srv_(srv), task_id_(std::move(task_id)), next_seq_(from) {}

  void run(request_t req);
  void close_from_server();

 private:
  void on_accept(beast::error_code ec);
  void on_live(std::string payload);
  void pump();
  void enqueue_event(const ev::Envelope& e);
  void write_next();
  void do_read();
  void finish(websocket::close_code code, std::string reason);
  void teardown();

  websocket::stream<beast::tcp_stream> ws_;
  server& srv_;
  std::string task_id_;
  std::string stream_;
  uint64_t next_seq_;
  bool catching_up_ = true;
  bool ended_ = false;       // task_finished queued: close after the queue drains
  bool closing_ = false;
  bool writing_ = false;
  std::deque<std::string> live_;
  std::deque<std::string> out_;
  std::shared_ptr<live_mailbox> mailbox_;
  std::unique_ptr<actors::subscription> sub_;
  beast::flat_buffer read_buf_;
};

// -- HTTP session -----------------------------------------------------------------------------------

class http_session : public std::enable_shared_from_this<http_session> {
 public:
  http_session(tcp::socket&& socket, server& srv) : stream_(std::move(socket)), srv_(srv) {}
  void run() { do_read(); }

 private:
  void do_read();
  void on_read(beast::error_code ec, size_t);
  void handle(request_t req);
  void send(response_t res);
  void on_write(bool close, beast::error_code ec, size_t);
  void route(request_t& req);
  std::optional<token_info> authenticate(const request_t& req);

  beast::tcp_stream stream_;
  server& srv_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
};

// -- server -----------------------------------------------------------------------------------------

class server final : public gateway {
 public:
  server(const gateway_options& opts, gateway_deps deps)
    : opts_(opts), deps_(deps), acceptor_(net::make_strand(ioc_)), blocking_(4) {}

  ~server() override { stop(); }

  result<void> listen() {
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

  uint16_t port() const override { return port_; }

  void stop() override {
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

  const gateway_options& opts() const { return opts_; }
  const gateway_deps& deps() const { return deps_; }
  net::thread_pool& blocking() { return blocking_; }
  bool stopping() const { return stopped_.load(); }

  void track(const std::shared_ptr<event_stream_session>& s) {
    std::lock_guard<std::mutex> guard(streams_mtx_);
    streams_.remove_if([](auto& w) { return w.expired(); });
    streams_.push_back(s);
  }

 private:
  void do_accept() {
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

  gateway_options opts_;
  gateway_deps deps_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  net::thread_pool blocking_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stopped_{false};
  uint16_t port_ = 0;
  std::mutex streams_mtx_;
  std::list<std::weak_ptr<event_stream_session>> streams_;
};

// -- http_session implementation ------------------------------------------------------------------

void http_session::do_read() {
  parser_.emplace();
  parser_->header_limit(header_limit);
  parser_->body_limit(srv_.opts().max_body_bytes);
  stream_.expires_after(srv_.opts().request_timeout);
  http::async_read(stream_, buffer_, *parser_,
                   beast::bind_front_handler(&http_session::on_read, shared_from_this()));
}

void http_session::on_read(beast::error_code ec, size_t) {
  if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
      ec == net::error::operation_aborted || ec == net::error::connection_reset ||
      ec == net::error::eof) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    return;
  }
  if (ec == http::error::body_limit)
    return send(error_response(http::status::payload_too_large,
                               "request body exceeds " +
                                 std::to_string(srv_.opts().max_body_bytes) + " bytes",
                               11, false));
  if (ec == http::error::header_limit)
    return send(error_response(http::status::request_header_fields_too_large,
                               "request headers exceed 16 KiB", 11, false));
  if (ec)
    return send(error_response(http::status::bad_request,
                               "malformed HTTP request: " + ec.message(), 11, false));
  handle(parser_->release());
}

std::optional<token_info> http_session::authenticate(const request_t& req) {
  auto it = req.find(http::field::authorization);
  if (it == req.end())
    return std::nullopt;
  std::string_view value(it->value().data(), it->value().size());
  if (!iequals_prefix(value, "bearer "))
    return std::nullopt;
  value.remove_prefix(7);
  while (!value.empty() && value.front() == ' ')
    value.remove_prefix(1);
  return srv_.deps().tokens->verify(value);
}

void http_session::handle(request_t req) {
  try {
    route(req);
  } catch (const std::exception& e) {
    // Last line of defence: a bug in a handler answers 500 rather than taking ferryd down.
    std::fprintf(stderr, "ferryd: error: handling %s: %s\n", std::string(req.target()).c_str(),
                 e.what());
    send(error_response(http::status::internal_server_error, "internal error", req.version(),
                        false));
  }
}

void http_session::route(request_t& req) {
  auto version = req.version();
  auto keep = req.keep_alive();
  std::string_view target(req.target().data(), req.target().size());
  auto parts = split_target(target);
  auto& segs = parts.segments;

  if (segs.size() == 1 && segs[0] == "healthz") {
    if (req.method() != http::verb::get && req.method() != http::verb::head)
      return send(error_response(http::status::method_not_allowed, "use GET", version, keep));
    return send(json_response(http::status::ok, json{{"status", "ok"}}, version, keep));
  }
  if (segs.empty() || segs[0] != "api")
    return send(error_response(http::status::not_found, "no such resource", version, keep));

  auto who = authenticate(req);
  if (!who) {
    auto res = error_response(http::status::unauthorized,
                              req.find(http::field::authorization) == req.end()
                                ? "missing Authorization: Bearer <token> header"
                                : "invalid token",
                              version, keep);
    res.set(http::field::www_authenticate, "Bearer realm=\"ferry\"");
    return send(std::move(res));
  }

  if (segs.size() < 3 || segs[1] != "v1" || segs[2] != "tasks")
    return send(error_response(http::status::not_found, "no such resource", version, keep));

  auto& deps = srv_.deps();
  auto self = shared_from_this();

  // /api/v1/tasks
  if (segs.size() == 3) {
    if (req.method() != http::verb::post) {
      auto res = error_response(http::status::method_not_allowed, "use POST to create a task",
                                version, keep);
      res.set(http::field::allow, "POST");
      return send(std::move(res));
    }
    json body;
    try {
      body = json::parse(req.body());
    } catch (const json::parse_error& e) {
      return send(error_response(http::status::bad_request,
                                 std::string("malformed JSON: ") + e.what(), version, keep));
    }
    if (!body.is_object())
      return send(error_response(http::status::bad_request, "body must be a JSON object",
                                 version, keep));
    auto cmd = body.find("command");
    if (cmd == body.end() || !cmd->is_string())
      return send(error_response(http::status::bad_request,
                                 "\"command\" is required and must be a string", version, keep));
    if (cmd->get_ref<const std::string&>().empty())
      return send(error_response(http::status::bad_request, "\"command\" must not be empty",
                                 version, keep));
    std::string repo;
    if (auto r = body.find("repo"); r != body.end() && !r->is_null()) {
      if (!r->is_string())
        return send(error_response(http::status::bad_request, "\"repo\" must be a string",
                                   version, keep));
      repo = r->get<std::string>();
    }
    actors::task_request treq{cmd->get<std::string>(), std::move(repo), who->id,
                              "req-" + random_hex(8)};
    net::post(srv_.blocking(), [self, treq = std::move(treq), &deps, version, keep] {
      auto id = deps.tasks->submit(treq);
      response_t res;
      if (!id) {
        res = error_response(http::status::service_unavailable, id.error().message, version,
                             keep);
      } else {
        res = json_response(http::status::created,
                            json{{"id", *id},
                                 {"status", "running"},
                                 {"url", "/api/v1/tasks/" + *id},
                                 {"events", "/api/v1/tasks/" + *id + "/events"}},
                            version, keep);
        res.set(http::field::location, "/api/v1/tasks/" + *id);
      }
      net::post(self->stream_.get_executor(),
                [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }

  std::string task_id(segs[3]);
  auto view = actors::load_task_view(*deps.store, task_id);
  if (!view)
    return send(error_response(http::status::internal_server_error, view.error().message, version,
                               keep));
  // Another user's task answers 404 like a missing one, so ids cannot be probed.
  if (!*view || (!who->admin && (*view)->user != who->id))
    return send(error_response(http::status::not_found, "no such task", version, keep));

  // /api/v1/tasks/{id}
  if (segs.size() == 4) {
    if (req.method() != http::verb::get)
      return send(error_response(http::status::method_not_allowed, "use GET", version, keep));
    return send(json_response(http::status::ok, task_json(**view), version, keep));
  }
  if (segs.size() == 5 && segs[4] == "abort") {
    if (req.method() != http::verb::post)
      return send(error_response(http::status::method_not_allowed, "use POST", version, keep));
    if ((*view)->finished)
      return send(json_response(http::status::conflict,
                                json{{"error", "task already finished"},
                                     {"status", (*view)->status}},
                                version, keep));
    std::string reason;
    if (!req.body().empty()) {
      auto body = json::parse(req.body(), nullptr, false);
      if (body.is_object() && body.contains("reason") && body["reason"].is_string())
        reason = body["reason"].get<std::string>();
    }
    net::post(srv_.blocking(), [self, task_id, user = who->id, reason, &deps, version, keep] {
      auto outcome = deps.tasks->abort(task_id, user, reason, std::chrono::seconds(5));
      auto after = actors::load_task_view(*deps.store, task_id);
      json j = after && *after ? task_json(**after) : json{{"id", task_id}};
      response_t res;
      if (!outcome)
        res = error_response(http::status::internal_server_error, outcome.error().message,
                             version, keep);
      else if (*outcome == actors::abort_outcome::aborted)
        res = json_response(http::status::ok, j, version, keep);
      else if (*outcome == actors::abort_outcome::pending)
        res = json_response(http::status::accepted, j, version, keep);
      else {
        j["error"] = "task already finished";
        res = json_response(http::status::conflict, j, version, keep);
      }
      net::post(self->stream_.get_executor(),
                [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }
  if (segs.size() == 5 && segs[4] == "events") {
    if (req.method() != http::verb::get)
      return send(error_response(http::status::method_not_allowed, "use GET", version, keep));
    if (!websocket::is_upgrade(req))
      return send(error_response(http::status::upgrade_required,
                                 "this endpoint is a WebSocket: send an Upgrade request", version,
                                 keep));
    uint64_t from = 1;
    if (auto f = query_param(parts.query, "from")) {
      auto [p, errc] = std::from_chars(f->data(), f->data() + f->size(), from);
      if (errc != std::errc() || p != f->data() + f->size())
        return send(error_response(http::status::bad_request,
                                   "\"from\" must be a non-negative integer", version, keep));
      if (from == 0)
        from = 1;
    }
    stream_.expires_never();
    auto session = std::make_shared<event_stream_session>(stream_.release_socket(), srv_,
                                                          task_id, from);
    srv_.track(session);
    session->run(std::move(req));
    return;
  }
  send(error_response(http::status::not_found, "no such resource", version, keep));
}

void http_session::send(response_t res) {
  auto close = res.need_eof();
  auto sp = std::make_shared<response_t>(std::move(res));
  http::async_write(stream_, *sp,
                    [self = shared_from_this(), sp, close](beast::error_code ec, size_t n) {
                      self->on_write(close, ec, n);
                    });
}

void http_session::on_write(bool close, beast::error_code ec, size_t) {
  if (ec)
    return;
  if (close || srv_.stopping()) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    return;
  }
  do_read();
}

// -- event_stream_session implementation ----------------------------------------------------------

void event_stream_session::run(request_t req) {
  stream_ = "task-" + task_id_;
  // Subscribe before the first journal read: every event stored after that read is then
  // guaranteed to arrive live, so the hand-over has no gap.
  mailbox_ = std::make_shared<live_mailbox>();
  auto weak = weak_from_this();
  auto exec = ws_.get_executor();
  mailbox_->deliver = [weak, exec](std::string payload) {
    net::post(exec, [weak, payload = std::move(payload)]() mutable {
      if (auto s = weak.lock())
        s->on_live(std::move(payload));
    });
  };
  if (auto* bus = srv_.deps().events) {
    auto mb = mailbox_;
    auto sub = bus->subscribe(actors::task_subject(task_id_),
                              [mb](std::string_view, std::string_view payload) {
                                std::lock_guard<std::mutex> guard(mb->mtx);
                                if (!mb->closed)
                                  mb->deliver(std::string(payload));
                              });
    if (sub)
      sub_ = std::move(*sub);
    else
      std::fprintf(stderr, "ferryd: warning: live events for %s unavailable: %s\n",
                   task_id_.c_str(), sub.error().message.c_str());
  }
  ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
  ws_.set_option(websocket::stream_base::decorator(
    [](websocket::response_type& res) { res.set(http::field::server, "ferryd"); }));
  ws_.read_message_max(64 * 1024);
  ws_.async_accept(req, beast::bind_front_handler(&event_stream_session::on_accept,
                                                  shared_from_this()));
}

void event_stream_session::on_accept(beast::error_code ec) {
  if (ec)
    return teardown();
  ws_.text(true);
  do_read();
  pump();
}

void event_stream_session::do_read() {
  // Reading keeps control frames (ping/close) flowing; client messages are not used yet.
  ws_.async_read(read_buf_, [self = shared_from_this()](beast::error_code ec, size_t) {
    if (ec)
      return self->teardown();
    self->read_buf_.consume(self->read_buf_.size());
    self->do_read();
  });
}

void event_stream_session::on_live(std::string payload) {
  if (closing_ || ended_)
    return;
  if (live_.size() >= live_buffer_limit) {
    // A slow reader: drop the live buffer and let the journal catch it up.
    live_.clear();
    catching_up_ = true;
    return;
  }
  live_.push_back(std::move(payload));
  pump();
}

void event_stream_session::enqueue_event(const ev::Envelope& e) {
  out_.push_back(schemas::to_json(e).dump(-1, ' ', false, json::error_handler_t::replace));
  next_seq_ = e.sequence() + 1;
  if (e.event_type() == ev::Event::TaskFinished)
    ended_ = true;
}

void event_stream_session::pump() {
  if (closing_ || writing_ || !out_.empty())
    return;
  while (!ended_ && out_.empty()) {
    if (catching_up_) {
      auto events = srv_.deps().store->read_stream(stream_, next_seq_, catch_up_batch);
      if (!events)
        return finish(websocket::close_code::internal_error, "journal read failed");
      for (const auto& bytes : *events) {
        auto e = schemas::verify_envelope(bytes);
        if (!e)
          return finish(websocket::close_code::internal_error, "corrupt event in journal");
        enqueue_event(**e);
        if (ended_)
          break;
      }
      if (events->size() < catch_up_batch)
        catching_up_ = false;
      if (!out_.empty())
        break;
      continue;
    }
    if (live_.empty())
      break;
    auto payload = std::move(live_.front());
    live_.pop_front();
    auto e = schemas::verify_envelope(payload);
    if (!e)
      continue;  // not ours to judge: the journal copy is authoritative
    if ((*e)->sequence() < next_seq_)
      continue;  // already sent from the journal
    if ((*e)->sequence() > next_seq_) {
      // Missed something live (e.g. a publish failed): read the gap from the journal.
      live_.push_front(std::move(payload));
      catching_up_ = true;
      continue;
    }
    enqueue_event(**e);
  }
  write_next();
}

void event_stream_session::write_next() {
  if (writing_ || closing_)
    return;
  if (out_.empty()) {
    if (ended_)
      finish(websocket::close_code::normal, "task finished");
    return;
  }
  writing_ = true;
  ws_.async_write(net::buffer(out_.front()),
                  [self = shared_from_this()](beast::error_code ec, size_t) {
                    self->writing_ = false;
                    if (ec)
                      return self->teardown();
                    self->out_.pop_front();
                    if (!self->out_.empty())
                      return self->write_next();
                    self->pump();
                  });
}

void event_stream_session::finish(websocket::close_code code, std::string reason) {
  if (closing_)
    return;
  closing_ = true;
  teardown();
  ws_.async_close(websocket::close_reason(code, reason),
                  [self = shared_from_this()](beast::error_code) {});
}

void event_stream_session::close_from_server() {
  net::post(ws_.get_executor(), [self = shared_from_this()] {
    if (!self->closing_ && !self->writing_)
      self->finish(websocket::close_code::going_away, "ferryd shutting down");
    else
      self->teardown();
  });
}

void event_stream_session::teardown() {
  if (mailbox_) {
    std::lock_guard<std::mutex> guard(mailbox_->mtx);
    mailbox_->closed = true;
  }
  sub_.reset();
  live_.clear();
}

}  // namespace

result<std::unique_ptr<gateway>> start_gateway(const gateway_options& opts, gateway_deps deps) {
  if (!deps.store || !deps.tasks || !deps.tokens)
    return fail("start gateway: journal, task service and token registry are required");
  auto srv = std::make_unique<server>(opts, deps);
  if (auto r = srv->listen(); !r)
    return r.error();
  return std::unique_ptr<gateway>(std::move(srv));
}

}  // namespace ferry::gateway
