#include "ferry/test_support/ferry_api.h"

#include <thread>

namespace ferry::test {

using clock = std::chrono::steady_clock;

api_client::api_client(uint16_t port, std::string token)
    : http_("127.0.0.1", port), token_(std::move(token)) {}

http_response api_client::authorized(const std::string& method, const std::string& target,
                                     const std::string& body) const {
  return http_.request(method, target, body, bearer(token_));
}

http_response api_client::submit(const std::string& command) const {
  return authorized("POST", "/api/v1/tasks", nlohmann::json{{"command", command}}.dump());
}

http_response api_client::get_task(const std::string& id) const {
  return authorized("GET", "/api/v1/tasks/" + id);
}

http_response api_client::abort(const std::string& id) const {
  return authorized("POST", "/api/v1/tasks/" + id + "/abort");
}

http_response api_client::healthz() const { return http_.request("GET", "/healthz"); }

ws_handshake api_client::open_events(ws_client& ws, const std::string& id,
                                     std::optional<uint64_t> from) const {
  std::string target = "/api/v1/tasks/" + id + "/events";
  if (from)
    target += "?from=" + std::to_string(*from);
  return ws.connect(http_.host(), http_.port(), target, bearer(token_));
}

std::optional<nlohmann::json> api_client::wait_for_task(
    const std::string& id, const std::function<bool(const nlohmann::json&)>& done,
    std::chrono::milliseconds timeout, std::string* last) const {
  const auto deadline = clock::now() + timeout;
  for (;;) {
    http_response r = get_task(id);
    if (last)
      *last = r.summary();
    if (r.status == 200) {
      if (auto j = r.json(); j && j->is_object() && done(*j))
        return j;
    }
    if (clock::now() >= deadline)
      return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string str(const nlohmann::json& j, const char* key) {
  if (!j.is_object())
    return {};
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string describe_events(const std::vector<nlohmann::json>& events) {
  std::string out;
  for (const auto& e : events) {
    std::string line = e.is_object() && e.contains("seq") ? e["seq"].dump() : "?";
    line += " " + str(e, "type") + " ";
    line += e.is_object() && e.contains("data") ? e["data"].dump() : e.dump();
    if (line.size() > 400)
      line = line.substr(0, 400) + "...";
    out += "\n  " + line;
  }
  return out.empty() ? " (no events)" : out;
}

int find_event(const std::vector<nlohmann::json>& events, const std::string& type, int from,
               const std::function<bool(const nlohmann::json& data)>& match) {
  for (int i = std::max(from, 0); i < static_cast<int>(events.size()); ++i) {
    const auto& e = events[static_cast<size_t>(i)];
    if (str(e, "type") != type)
      continue;
    const nlohmann::json data = e.is_object() && e.contains("data") ? e["data"] : nlohmann::json();
    if (!match || match(data))
      return i;
  }
  return -1;
}

std::string stdout_text(const std::vector<nlohmann::json>& events) {
  std::string out;
  for (const auto& e : events) {
    if (str(e, "type") != "output_chunk" || !e.contains("data"))
      continue;
    const auto& d = e["data"];
    if (str(d, "stream") != "stdout")
      continue;
    if (d.contains("text") && d["text"].is_string())
      out += d["text"].get<std::string>();
    else if (auto bytes = base64_decode(str(d, "base64")))
      out += *bytes;
  }
  return out;
}

std::optional<std::string> base64_decode(const std::string& in) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  unsigned acc = 0;
  int bits = 0;
  size_t i = 0;
  for (; i < in.size() && in[i] != '='; ++i) {
    int v = value(in[i]);
    if (v < 0)
      return std::nullopt;
    acc = (acc << 6) | static_cast<unsigned>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  for (; i < in.size(); ++i) {
    if (in[i] != '=')
      return std::nullopt;
  }
  return out;
}

}  // namespace ferry::test
