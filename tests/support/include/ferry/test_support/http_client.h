#pragma once
// Synchronous HTTP/1.1 and WebSocket clients for tests, built on Boost.Beast (the header keeps
// Beast out of the tests' translation units). Every operation has a deadline: a server that
// does not answer makes the call return with `timed_out`, never hang the test.
//
// Threading: one object per thread; objects are independent of each other.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace ferry::test {

using header_list = std::vector<std::pair<std::string, std::string>>;

/// {"Authorization", "Bearer <token>"}.
header_list bearer(const std::string& token);

struct http_response {
  int status = 0;  ///< 0 when no response was received (see `error`)
  std::string body;
  std::map<std::string, std::string> headers;  ///< names lower-cased; repeated fields joined by ", "
  std::string error;   ///< transport problem (connect, write, read); empty when all went well
  bool timed_out = false;

  /// The body as JSON, or nullopt if it is not JSON.
  std::optional<nlohmann::json> json() const;
  /// The header's value, or "" if absent. `name` is case-insensitive.
  std::string header(const std::string& name) const;
  /// "HTTP 404, body: {...}" or "no response: <error>", for failure messages.
  std::string summary() const;
};

/// Talks to one server, one connection per request (Connection: close).
class http_client {
 public:
  http_client(std::string host, uint16_t port,
              std::chrono::milliseconds timeout = std::chrono::seconds(15));

  /// Sends `method target` with `body` and `headers`; Host and Content-Length are set unless
  /// given, Content-Type defaults to application/json when there is a body. `target` is sent
  /// verbatim (no normalisation). `chunked` sends the body with Transfer-Encoding: chunked.
  /// If the server answers before the body is fully sent (e.g. 413), sending stops and that
  /// answer is returned.
  http_response request(const std::string& method, const std::string& target,
                        const std::string& body = {}, const header_list& headers = {},
                        bool chunked = false) const;

  const std::string& host() const { return host_; }
  uint16_t port() const { return port_; }

 private:
  std::string host_;
  uint16_t port_;
  std::chrono::milliseconds timeout_;
};

/// Outcome of a WebSocket opening handshake.
struct ws_handshake {
  bool upgraded = false;
  int status = 0;       ///< HTTP status of the server's answer (101 when upgraded); 0 if none
  std::string body;     ///< body of a refusal
  std::string error;    ///< why it did not upgrade (transport error, refusal); empty on success
  bool timed_out = false;
  std::string summary() const;
};

/// One thing read from a WebSocket.
struct ws_message {
  enum class kind { text, binary, closed, timeout, error };
  kind what = kind::error;
  std::string data;        ///< payload of text/binary frames; error text for `error`
  int close_code = 0;      ///< for `closed`: the code of the peer's close frame (1000 = normal)
  std::string close_reason;
  std::string summary() const;
};

/// A WebSocket client connection.
class ws_client {
 public:
  ws_client();
  ~ws_client();
  ws_client(ws_client&&) noexcept;
  ws_client& operator=(ws_client&&) noexcept;

  /// Connects to host:port and performs the handshake for `target` with extra `headers`
  /// (e.g. Authorization). On refusal the server's HTTP status and body are in the result.
  ws_handshake connect(const std::string& host, uint16_t port, const std::string& target,
                       const header_list& headers = {},
                       std::chrono::milliseconds timeout = std::chrono::seconds(15));

  /// Reads the next message. After `closed`, `timeout` or `error` the connection is finished
  /// and further reads return `error`.
  ws_message read(std::chrono::milliseconds timeout);

  /// Sends one message: a text frame, or a binary one if `binary`. Returns "" once sent, else
  /// what went wrong (a timeout or error finishes the connection).
  std::string send(const std::string& data, bool binary = false,
                   std::chrono::milliseconds timeout = std::chrono::seconds(15));

  /// Sends a normal close (best effort) and drops the connection.
  void close(std::chrono::milliseconds timeout = std::chrono::seconds(2));

  bool is_open() const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Everything a viewer saw on an event stream until it ended.
struct ws_transcript {
  std::vector<nlohmann::json> events;      ///< text frames, parsed, in arrival order
  std::vector<std::string> invalid_frames; ///< frames that were not JSON text
  bool closed = false;                     ///< the server sent a close frame
  int close_code = 0;
  std::string close_reason;
  bool timed_out = false;                  ///< gave up waiting before the close
  std::string error;                       ///< transport error, if any
  bool closed_normally() const { return closed && close_code == 1000; }
  /// "12 events, closed 1000" / "... timed out" / "... error: ...", for failure messages.
  std::string summary() const;
};

/// Reads `ws` until the server closes it, an error, or `total` has passed (whichever first).
/// Frames already in `seed` (read earlier by the caller) are kept at the front.
ws_transcript read_until_close(ws_client& ws, std::chrono::milliseconds total,
                               ws_transcript seed = {});

}  // namespace ferry::test
