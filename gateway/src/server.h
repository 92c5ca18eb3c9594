#pragma once
// Private to ferry_gateway: the server and its two kinds of session. Split over server.cpp,
// http_session.cpp and event_stream.cpp so the Beast-heavy code compiles in parallel.

#include <utility>  // Boost 1.74 asio uses std::exchange without including it

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

#include <atomic>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "ferry/actors/bus.h"
#include "ferry/actors/tasks.h"
#include "ferry/gateway/gateway.h"
#include "ferry/schemas/events.h"

namespace ferry::gateway::detail {

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

class server;

// -- WebSocket event stream ------------------------------------------------------------------------

/// Carries live NATS messages to a session without ever owning it (so the NATS thread never
/// destroys a session or its subscription). Closed by the session before it goes away.
struct live_mailbox {
  std::mutex mtx;
  bool closed = false;
  std::function<void(std::string)> deliver;  // posts onto the session's strand
};

/// Limits of the control messages a client sends on the event stream.
constexpr size_t max_control_message_bytes = 128 * 1024;  // a 16 KiB comment, JSON-escaped
constexpr size_t max_ws_message_bytes = 1024 * 1024;      // beyond: closed with 1009 (too big)
constexpr size_t max_control_in_flight = 4;   // per socket; more are answered "busy"
constexpr size_t max_unsent_replies = 16;     // per socket; reading pauses until they are written

/// Streams one task's events: catch-up from the journal from `next_seq_`, then live messages
/// from NATS, de-duplicated and gap-checked by sequence number. A gap or an overflowing live
/// buffer falls back to catch-up: the journal has every event, so nothing is lost and memory stays
/// bounded. Ends (normal close) after the task_finished event, once every control request still
/// in flight has been answered.
///
/// The client may steer or abort the task on the same socket ({"type": "steer" | "abort", ...},
/// see the README): each message is answered with an "ack" or an "error" frame carrying the
/// client's id. The request itself runs on the server's blocking pool (task_commands.h), the
/// same path as REST, in the name of the token that opened the socket; its answer is posted back
/// here and written in turn with the events.
///
/// Threading: strand-confined (every member is touched only on the socket's strand).
class event_stream_session : public std::enable_shared_from_this<event_stream_session> {
 public:
  /// `final_seq`: the task's last sequence if it had already finished when the stream opened.
  /// `user`: the token id that opened it (authorised for the task): controls act in its name.
  event_stream_session(tcp::socket&& socket, server& srv, std::string task_id, std::string user,
                       uint64_t from, std::optional<uint64_t> final_seq)
    : ws_(std::move(socket)),
      srv_(srv),
      task_id_(std::move(task_id)),
      user_(std::move(user)),
      next_seq_(from),
      final_seq_(final_seq) {}

  void run(request_t req);
  void close_from_server();

 private:
  /// One frame waiting to be written: an event, or the answer to a client message.
  struct frame {
    std::string text;
    bool reply = false;
  };

  void on_accept(beast::error_code ec);
  void on_live(std::string payload);
  void pump();
  void enqueue_event(const ev::Envelope& e);
  void write_next();
  void do_read();
  void on_read(beast::error_code ec, size_t n);
  void on_message(std::string_view text);
  void start_control(json id, std::string op, std::string argument);
  void reply(json message);
  void reply_error(const json& id, std::string_view op, std::string_view code,
                   std::string message);
  void finish(websocket::close_code code, std::string reason);
  void teardown();

  websocket::stream<beast::tcp_stream> ws_;
  server& srv_;
  std::string task_id_;
  std::string user_;
  std::string stream_;
  uint64_t next_seq_;
  std::optional<uint64_t> final_seq_;
  bool accepted_ = false;   // the handshake is done: frames may be written
  bool catching_up_ = true;
  bool ended_ = false;       // task_finished queued: close after the queue drains
  bool closing_ = false;
  bool writing_ = false;
  bool reading_ = false;
  bool oversized_ = false;   // the message being read is over the limit: its bytes are dropped
  size_t in_flight_ = 0;     // control requests sent and not yet answered
  size_t unsent_replies_ = 0;  // reply frames in out_
  std::deque<std::string> live_;
  std::deque<frame> out_;
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
  void read_body();
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
  server(const gateway_options& opts, gateway_deps deps);
  ~server() override;

  /// Binds, starts accepting and starts the I/O threads.
  result<void> listen();
  uint16_t port() const override { return port_; }
  void stop() override;

  const gateway_options& opts() const { return opts_; }
  const gateway_deps& deps() const { return deps_; }
  net::thread_pool& blocking() { return blocking_; }
  /// Task states, folded incrementally from the journal (thread-safe).
  actors::task_view_cache& views() { return views_; }
  bool stopping() const { return stopped_.load(); }
  /// Remembers a live event stream so stop() can close it.
  void track(const std::shared_ptr<event_stream_session>& s);

 private:
  void do_accept();

  gateway_options opts_;
  gateway_deps deps_;
  actors::task_view_cache views_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  net::thread_pool blocking_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stopped_{false};
  uint16_t port_ = 0;
  std::mutex streams_mtx_;
  std::list<std::weak_ptr<event_stream_session>> streams_;  // GUARDED_BY(streams_mtx_)
};

}  // namespace ferry::gateway::detail
