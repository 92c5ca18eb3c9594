// Sending abort/steer requests on the control subjects and decoding their acknowledgements
// (see ferry/gateway/control_client.h).

#include "ferry/gateway/control_client.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "ferry/actors/bus.h"

namespace ferry::gateway {

namespace {

using json = nlohmann::json;

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

/// The errc an error answer names (task_control's code names); failed for anything else.
errc code_of(const json& answer) {
  auto it = answer.find("code");
  if (it == answer.end() || !it->is_string())
    return errc::failed;
  const auto& name = it->get_ref<const std::string&>();
  if (name == "not_found")
    return errc::not_found;
  if (name == "conflict")
    return errc::conflict;
  if (name == "invalid_argument")
    return errc::invalid_argument;
  if (name == "busy")
    return errc::busy;
  if (name == "closed")
    return errc::closed;
  return errc::failed;
}

/// Sends one request; the answer as a JSON object, or why there is none.
result<json> send(actors::bus& bus, const std::string& subject, const json& body,
                  std::chrono::milliseconds timeout) {
  auto answer = bus.request(subject, dump(body), timeout);
  if (!answer)
    // Whatever the transport said (not connected, no responders, timeout), the request may not
    // have reached the task: the caller can retry or act locally.
    return fail(errc::closed, "no answer on " + subject + ": " + answer.error().message);
  auto j = json::parse(*answer, nullptr, false);
  if (!j.is_object())
    return fail(errc::corrupt, subject + " answered with something other than a JSON object: " +
                                 answer->substr(0, 200));
  // An error answer, whatever the verb: {"error": "...", "code": "..."}.
  if (auto e = j.find("error"); e != j.end()) {
    std::string message = e->is_string() ? e->get<std::string>() : dump(*e);
    return fail(code_of(j), message);
  }
  return j;
}

/// A request answered {"seq": N} (steer, approve): N, which is never 0.
result<uint64_t> request_sequence(actors::bus& bus, const std::string& subject, const json& body,
                                  std::chrono::milliseconds timeout) {
  auto answer = send(bus, subject, body, timeout);
  if (!answer)
    return answer.error();
  auto it = answer->find("seq");
  if (it == answer->end() || !it->is_number_unsigned() || it->get<uint64_t>() == 0)
    return fail(errc::corrupt, subject + " answered without a sequence: " + dump(*answer));
  return it->get<uint64_t>();
}

}  // namespace

result<actors::abort_outcome> request_abort(actors::bus& bus, const std::string& task_id,
                                            const std::string& user, const std::string& reason,
                                            std::chrono::milliseconds wait) {
  wait = std::clamp(wait, std::chrono::milliseconds(0), max_abort_wait);
  const auto subject = actors::task_control_subject(task_id, "abort");
  auto answer = send(bus, subject, {{"user", user}, {"reason", reason}, {"wait_ms", wait.count()}},
                     wait + std::chrono::seconds(2));
  if (!answer)
    return answer.error();
  auto it = answer->find("outcome");
  if (it != answer->end() && it->is_string()) {
    for (auto o : {actors::abort_outcome::aborted, actors::abort_outcome::pending,
                   actors::abort_outcome::already_finished, actors::abort_outcome::not_found})
      if (it->get_ref<const std::string&>() == actors::to_string(o))
        return o;
  }
  return fail(errc::corrupt, subject + " answered without a known outcome: " + dump(*answer));
}

result<uint64_t> request_steer(actors::bus& bus, const std::string& task_id,
                               const std::string& user, const std::string& text,
                               std::chrono::milliseconds timeout) {
  return request_sequence(bus, actors::task_control_subject(task_id, "steer"), {{"user", user}, {"text", text}},
                          timeout);
}

result<uint64_t> request_approve(actors::bus& bus, const std::string& task_id, const std::string& user,
                                 const std::string& destination, std::chrono::milliseconds timeout) {
  return request_sequence(bus, actors::task_control_subject(task_id, "approve"),
                          {{"user", user}, {"destination", destination}}, timeout);
}

}  // namespace ferry::gateway
