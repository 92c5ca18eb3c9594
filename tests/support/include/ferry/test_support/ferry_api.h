#pragma once
// ferry::test::api_client — ferryd's HTTP API as the tests use it (bearer token, JSON bodies),
// plus helpers to look at event lists in failure messages.
//
// Threading: a value; one thread per object.

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/http_client.h"

namespace ferry::test {

class api_client {
 public:
  api_client(uint16_t port, std::string token);
  explicit api_client(const ferryd_process& ferryd) : api_client(ferryd.port(), ferryd.token()) {}

  /// POST /api/v1/tasks {"command": command}.
  http_response submit(const std::string& command) const;
  /// GET /api/v1/tasks/{id}.
  http_response get_task(const std::string& id) const;
  /// POST /api/v1/tasks/{id}/abort.
  http_response abort(const std::string& id) const;
  /// GET /healthz (no token).
  http_response healthz() const;
  /// Any request with the token added.
  http_response authorized(const std::string& method, const std::string& target,
                           const std::string& body = {}) const;

  /// Opens the event stream of task `id` (from `from` if given) with the token.
  ws_handshake open_events(ws_client& ws, const std::string& id,
                           std::optional<uint64_t> from = std::nullopt) const;

  /// Polls GET /api/v1/tasks/{id} every 20 ms until `done(task)` holds or `timeout` passes.
  /// Returns the task JSON that satisfied it, or nullopt; `last` receives the last answer seen.
  std::optional<nlohmann::json> wait_for_task(const std::string& id,
                                              const std::function<bool(const nlohmann::json&)>& done,
                                              std::chrono::milliseconds timeout,
                                              std::string* last = nullptr) const;

  const http_client& http() const { return http_; }
  const std::string& token() const { return token_; }

 private:
  http_client http_;
  std::string token_;
};

/// The string at `key` in `j`, or "" if absent or not a string.
std::string str(const nlohmann::json& j, const char* key);

/// One line per event: "seq type {data}", for failure messages.
std::string describe_events(const std::vector<nlohmann::json>& events);

/// Index of the first event at or after `from` with type `type` for which `match(data)` holds;
/// -1 if none.
int find_event(const std::vector<nlohmann::json>& events, const std::string& type, int from = 0,
               const std::function<bool(const nlohmann::json& data)>& match = nullptr);

/// The stdout text of the output_chunk events, decoded (base64 chunks included), in order.
std::string stdout_text(const std::vector<nlohmann::json>& events);

/// Decodes standard base64 (padding optional); nullopt if it is not base64.
std::optional<std::string> base64_decode(const std::string& in);

}  // namespace ferry::test
