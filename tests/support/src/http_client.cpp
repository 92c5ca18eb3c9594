// Beast-based HTTP and WebSocket clients (see ferry/test_support/http_client.h).
//
// Beast's synchronous calls have no timeouts, so every step is an asynchronous operation run on
// a private io_context until it completes or its deadline passes; at the deadline the socket is
// closed, which completes the operation with an error, and the call reports `timed_out`.

#include "ferry/test_support/http_client.h"

#include <algorithm>
#include <cctype>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

namespace ferry::test {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = net::ip::tcp;
using clock = std::chrono::steady_clock;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string clip(const std::string& s, size_t n = 2000) {
  return s.size() <= n ? s : s.substr(0, n) + "...(" + std::to_string(s.size()) + " bytes)";
}

/// Runs one asynchronous operation to completion or until `deadline`. `start` receives the
/// completion handler to pass to the async call. At the deadline `on_timeout` must make the
/// operation complete (by closing the socket); the function then returns timed_out = true.
struct op_outcome {
  beast::error_code ec;
  bool timed_out = false;
};

template <class Start, class OnTimeout>
op_outcome run_op(net::io_context& ioc, clock::time_point deadline, Start&& start,
                  OnTimeout&& on_timeout) {
  op_outcome out;
  bool done = false;
  start([&](beast::error_code ec, auto&&...) {
    out.ec = ec;
    done = true;
  });
  ioc.restart();
  while (!done && clock::now() < deadline) {
    if (ioc.run_one_until(deadline) == 0 && ioc.stopped())
      break;
  }
  if (!done) {
    out.timed_out = true;
    on_timeout();
    ioc.restart();
    while (!done && ioc.run_one() > 0) {
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// HTTP

header_list bearer(const std::string& token) { return {{"Authorization", "Bearer " + token}}; }

std::optional<nlohmann::json> http_response::json() const {
  auto j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return std::nullopt;
  return j;
}

std::string http_response::header(const std::string& name) const {
  auto it = headers.find(lower(name));
  return it == headers.end() ? std::string() : it->second;
}

std::string http_response::summary() const {
  if (status == 0)
    return "no response: " + (error.empty() ? std::string("(no error recorded)") : error);
  std::string s = "HTTP " + std::to_string(status) + ", body: " + clip(body);
  if (!error.empty())
    s += " (transport: " + error + ")";
  return s;
}

http_client::http_client(std::string host, uint16_t port, std::chrono::milliseconds timeout)
    : host_(std::move(host)), port_(port), timeout_(timeout) {}

http_response http_client::request(const std::string& method, const std::string& target,
                                   const std::string& body, const header_list& headers,
                                   bool chunked) const {
  http_response out;
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  const auto deadline = clock::now() + timeout_;
  auto close_socket = [&] {
    beast::error_code ignored;
    stream.socket().close(ignored);
  };

  // Connect.
  beast::error_code ec;
  auto address = net::ip::make_address(host_, ec);
  if (ec) {
    out.error = "bad host " + host_ + ": " + ec.message();
    return out;
  }
  const tcp::endpoint endpoint(address, port_);
  auto connected = run_op(
      ioc, deadline, [&](auto handler) { stream.async_connect(endpoint, std::move(handler)); },
      close_socket);
  if (connected.timed_out || connected.ec) {
    out.timed_out = connected.timed_out;
    out.error = "connect to " + host_ + ":" + std::to_string(port_) + ": " +
                (connected.timed_out ? "timed out" : connected.ec.message());
    return out;
  }

  // Build the request.
  http::request<http::string_body> req;
  const auto verb = http::string_to_verb(method);
  if (verb == http::verb::unknown)
    req.method_string(method);
  else
    req.method(verb);
  req.target(target);
  req.version(11);
  req.keep_alive(false);
  bool has_host = false, has_type = false;
  for (const auto& [name, value] : headers) {
    has_host |= lower(name) == "host";
    has_type |= lower(name) == "content-type";
    req.insert(name, value);
  }
  if (!has_host)
    req.set(http::field::host, host_ + ":" + std::to_string(port_));
  if (!has_type && !body.empty())
    req.set(http::field::content_type, "application/json");
  req.set(http::field::user_agent, "ferry-integration-test");
  req.body() = body;
  if (chunked)
    req.chunked(true);
  else
    req.prepare_payload();

  // Send it piecewise, stopping if the server already answered (e.g. 413 on a large body):
  // writing on would only run into a reset and lose the answer.
  http::request_serializer<http::string_body> sr(req);
  sr.limit(64 * 1024);
  std::string write_error;
  while (!sr.is_done()) {
    beast::error_code avail_ec;
    if (stream.socket().available(avail_ec) > 0)
      break;
    auto wrote = run_op(
        ioc, deadline,
        [&](auto handler) { http::async_write_some(stream, sr, std::move(handler)); },
        close_socket);
    if (wrote.timed_out || wrote.ec) {
      out.timed_out = wrote.timed_out;
      write_error = "write: " + (wrote.timed_out ? std::string("timed out") : wrote.ec.message());
      break;
    }
  }

  // Read the response (even after a write error: the server may have answered and closed).
  if (!out.timed_out) {
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 * 1024 * 1024);
    auto read = run_op(
        ioc, deadline,
        [&](auto handler) { http::async_read(stream, buffer, parser, std::move(handler)); },
        close_socket);
    if (read.timed_out || read.ec) {
      out.timed_out |= read.timed_out;
      std::string read_error =
          "read: " + (read.timed_out ? std::string("timed out") : read.ec.message());
      write_error = write_error.empty() ? read_error : write_error + "; " + read_error;
    }
    if (parser.is_header_done()) {
      const auto& res = parser.get();
      out.status = static_cast<int>(res.result_int());
      out.body = res.body();
      for (const auto& field : res) {
        std::string name = lower(std::string(field.name_string()));
        auto [it, inserted] = out.headers.emplace(name, std::string(field.value()));
        if (!inserted)
          it->second += ", " + std::string(field.value());
      }
    }
  }
  out.error = write_error;
  beast::error_code ignored;
  stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  stream.socket().close(ignored);
  return out;
}

// ---------------------------------------------------------------------------------------------
// WebSocket

std::string ws_handshake::summary() const {
  if (upgraded)
    return "upgraded (HTTP 101)";
  std::string s = status ? "refused with HTTP " + std::to_string(status) : "no HTTP answer";
  if (!body.empty())
    s += ", body: " + clip(body);
  if (!error.empty())
    s += " (" + error + ")";
  return s;
}

std::string ws_message::summary() const {
  switch (what) {
    case kind::text:
      return "text frame: " + clip(data);
    case kind::binary:
      return "binary frame of " + std::to_string(data.size()) + " bytes";
    case kind::closed:
      return "closed by the server with code " + std::to_string(close_code) +
             (close_reason.empty() ? "" : " (" + close_reason + ")");
    case kind::timeout:
      return "timed out waiting for a frame";
    case kind::error:
      return "error: " + data;
  }
  return "?";
}

struct ws_client::impl {
  net::io_context ioc;
  websocket::stream<beast::tcp_stream> ws{ioc};
  beast::flat_buffer buffer;
  bool open = false;

  void drop() {
    beast::error_code ignored;
    beast::get_lowest_layer(ws).socket().close(ignored);
    open = false;
  }
};

ws_client::ws_client() : impl_(std::make_unique<impl>()) {}
ws_client::~ws_client() {
  if (impl_ && impl_->open)
    close(std::chrono::milliseconds(500));
}
ws_client::ws_client(ws_client&&) noexcept = default;
ws_client& ws_client::operator=(ws_client&&) noexcept = default;

bool ws_client::is_open() const { return impl_ && impl_->open; }

ws_handshake ws_client::connect(const std::string& host, uint16_t port, const std::string& target,
                                const header_list& headers, std::chrono::milliseconds timeout) {
  ws_handshake out;
  auto& s = *impl_;
  const auto deadline = clock::now() + timeout;
  auto drop = [&] { s.drop(); };

  beast::error_code ec;
  auto address = net::ip::make_address(host, ec);
  if (ec) {
    out.error = "bad host " + host + ": " + ec.message();
    return out;
  }
  const tcp::endpoint endpoint(address, port);
  auto connected = run_op(
      s.ioc, deadline,
      [&](auto handler) { beast::get_lowest_layer(s.ws).async_connect(endpoint, std::move(handler)); },
      drop);
  if (connected.timed_out || connected.ec) {
    out.timed_out = connected.timed_out;
    out.error = "connect: " + (connected.timed_out ? std::string("timed out") : connected.ec.message());
    return out;
  }
  // The websocket stream keeps its own (here: no) timeouts; ours is the deadline above.
  beast::get_lowest_layer(s.ws).expires_never();
  websocket::stream_base::timeout opt{};
  opt.handshake_timeout = websocket::stream_base::none();
  opt.idle_timeout = websocket::stream_base::none();
  opt.keep_alive_pings = false;
  s.ws.set_option(opt);
  s.ws.set_option(websocket::stream_base::decorator([headers](websocket::request_type& req) {
    req.set(http::field::user_agent, "ferry-integration-test");
    for (const auto& [name, value] : headers)
      req.set(name, value);
  }));
  s.ws.read_message_max(64 * 1024 * 1024);

  websocket::response_type res;
  const std::string host_port = host + ":" + std::to_string(port);
  auto shook = run_op(
      s.ioc, deadline,
      [&](auto handler) { s.ws.async_handshake(res, host_port, target, std::move(handler)); },
      drop);
  out.status = static_cast<int>(res.result_int());
  out.body = res.body();
  if (shook.timed_out || shook.ec) {
    out.timed_out = shook.timed_out;
    out.error = "handshake: " + (shook.timed_out ? std::string("timed out") : shook.ec.message());
    s.drop();
    return out;
  }
  out.upgraded = true;
  s.open = true;
  return out;
}

ws_message ws_client::read(std::chrono::milliseconds timeout) {
  ws_message out;
  auto& s = *impl_;
  if (!s.open) {
    out.data = "the connection is not open";
    return out;
  }
  s.buffer.clear();
  auto got = run_op(
      s.ioc, clock::now() + timeout,
      [&](auto handler) { s.ws.async_read(s.buffer, std::move(handler)); }, [&] { s.drop(); });
  if (got.timed_out) {
    out.what = ws_message::kind::timeout;
    s.drop();
    return out;
  }
  if (got.ec == websocket::error::closed) {
    out.what = ws_message::kind::closed;
    out.close_code = static_cast<int>(s.ws.reason().code);
    out.close_reason = std::string(s.ws.reason().reason.c_str());
    s.drop();
    return out;
  }
  if (got.ec) {
    out.what = ws_message::kind::error;
    out.data = got.ec.message();
    s.drop();
    return out;
  }
  out.what = s.ws.got_text() ? ws_message::kind::text : ws_message::kind::binary;
  out.data = beast::buffers_to_string(s.buffer.data());
  return out;
}

std::string ws_client::send(const std::string& data, bool binary,
                            std::chrono::milliseconds timeout) {
  auto& s = *impl_;
  if (!s.open)
    return "the connection is not open";
  s.ws.binary(binary);
  auto sent = run_op(
      s.ioc, clock::now() + timeout,
      [&](auto handler) { s.ws.async_write(net::buffer(data), std::move(handler)); },
      [&] { s.drop(); });
  if (sent.timed_out) {
    s.drop();
    return "timed out sending " + std::to_string(data.size()) + " bytes";
  }
  if (sent.ec) {
    s.drop();
    return "sending: " + sent.ec.message();
  }
  return {};
}

void ws_client::close(std::chrono::milliseconds timeout) {
  auto& s = *impl_;
  if (!s.open)
    return;
  run_op(
      s.ioc, clock::now() + timeout,
      [&](auto handler) { s.ws.async_close(websocket::close_code::normal, std::move(handler)); },
      [&] { s.drop(); });
  s.drop();
}

std::string ws_transcript::summary() const {
  std::string s = std::to_string(events.size()) + " events";
  if (!invalid_frames.empty())
    s += ", " + std::to_string(invalid_frames.size()) + " invalid frames";
  if (closed)
    s += ", closed with code " + std::to_string(close_code);
  if (timed_out)
    s += ", timed out before the close";
  if (!error.empty())
    s += ", error: " + error;
  if (!events.empty())
    s += ", last event: " + clip(events.back().dump(), 500);
  return s;
}

ws_transcript read_until_close(ws_client& ws, std::chrono::milliseconds total, ws_transcript seed) {
  ws_transcript t = std::move(seed);
  const auto deadline = clock::now() + total;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    if (left.count() <= 0) {
      t.timed_out = true;
      ws.close(std::chrono::milliseconds(200));
      return t;
    }
    ws_message m = ws.read(left);
    switch (m.what) {
      case ws_message::kind::text: {
        auto j = nlohmann::json::parse(m.data, nullptr, false);
        if (j.is_discarded())
          t.invalid_frames.push_back(m.data);
        else
          t.events.push_back(std::move(j));
        break;
      }
      case ws_message::kind::binary:
        t.invalid_frames.push_back("(binary) " + clip(m.data, 200));
        break;
      case ws_message::kind::closed:
        t.closed = true;
        t.close_code = m.close_code;
        t.close_reason = m.close_reason;
        return t;
      case ws_message::kind::timeout:
        t.timed_out = true;
        return t;
      case ws_message::kind::error:
        t.error = m.data;
        return t;
    }
  }
}

}  // namespace ferry::test
