// task_control: the control subjects ferry.ctl.task.<id>.{abort,steer,approve} (see tasks.h). A thin
// adapter: a request becomes an asynchronous task_service call, whose callback answers it. No
// NATS thread ever waits for a task.

#include <algorithm>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/actors/tasks.h"

namespace ferry::actors {

std::string_view to_string(abort_outcome o) {
  switch (o) {
    case abort_outcome::aborted: return "aborted";
    case abort_outcome::already_finished: return "already_finished";
    case abort_outcome::not_found: return "not_found";
    case abort_outcome::pending: return "pending";
  }
  return "pending";
}

namespace {

using json = nlohmann::json;

std::string_view code_name(errc c) {
  switch (c) {
    case errc::not_found: return "not_found";
    case errc::conflict: return "conflict";
    case errc::invalid_argument: return "invalid_argument";
    case errc::busy: return "busy";
    case errc::closed: return "closed";
    case errc::corrupt:
    case errc::failed: break;
  }
  return "failed";
}

std::string error_answer(std::string_view message, errc code) {
  return json{{"error", message}, {"code", code_name(code)}}.dump(
    -1, ' ', false, json::error_handler_t::replace);
}

/// The task id in `ferry.ctl.task.<id>.<verb>`, or "" when the subject has another shape.
std::string task_id_of(std::string_view subject) {
  constexpr std::string_view prefix = "ferry.ctl.task.";
  if (!subject.starts_with(prefix))
    return {};
  auto rest = subject.substr(prefix.size());
  auto dot = rest.find('.');
  if (dot == std::string_view::npos)
    return {};
  std::string id(rest.substr(0, dot));
  return valid_task_id(id) ? id : std::string();
}

/// `payload` as a JSON object; null when it is not one (an empty payload is an empty object).
json parse_object(std::string_view payload) {
  if (payload.empty())
    return json::object();
  auto j = json::parse(payload, nullptr, false);
  return j.is_object() ? j : json();
}

std::string string_field(const json& j, const char* key, std::string fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

class control final : public task_control {
 public:
  std::vector<std::unique_ptr<subscription>> subs;
};

}  // namespace

result<std::unique_ptr<task_control>> start_task_control(bus& events, task_service& tasks) {
  auto c = std::make_unique<control>();
  auto abort_sub = events.serve("ferry.ctl.task.*.abort", [&tasks](std::string_view subject,
                                                                    std::string_view payload,
                                                                    responder reply) {
    auto id = task_id_of(subject);
    auto body = parse_object(payload);
    if (id.empty() || body.is_null())
      return reply(error_answer("expected ferry.ctl.task.<hex id>.abort with a JSON object "
                                "{\"user\", \"reason\", \"wait_ms\"}",
                                errc::invalid_argument));
    int64_t wait_ms = 5000;
    if (auto it = body.find("wait_ms"); it != body.end() && it->is_number_integer())
      wait_ms = std::clamp<int64_t>(it->get<int64_t>(), 0, 30000);
    tasks.abort_async(id, string_field(body, "user", "system"), string_field(body, "reason", ""),
                      std::chrono::milliseconds(wait_ms),
                      [reply](result<abort_outcome> r) {
                        if (!r)
                          return reply(error_answer(r.error().message, r.error().code));
                        reply(json{{"outcome", to_string(*r)}}.dump());
                      });
  });
  if (!abort_sub)
    return abort_sub.error();
  c->subs.push_back(std::move(*abort_sub));

  auto steer_sub = events.serve("ferry.ctl.task.*.steer", [&tasks](std::string_view subject,
                                                                    std::string_view payload,
                                                                    responder reply) {
    auto id = task_id_of(subject);
    auto body = parse_object(payload);
    auto text = body.is_object() ? string_field(body, "text", "") : std::string();
    if (id.empty() || text.empty())
      return reply(error_answer("expected ferry.ctl.task.<hex id>.steer with a JSON object "
                                "{\"user\", \"text\"} and a non-empty text",
                                errc::invalid_argument));
    if (text.size() > max_steering_bytes)
      return reply(error_answer("a steering comment may have at most " +
                                  std::to_string(max_steering_bytes) + " bytes, got " +
                                  std::to_string(text.size()),
                                errc::invalid_argument));
    tasks.steer_async(id, string_field(body, "user", "system"), text,
                      [reply](result<uint64_t> r) {
                        if (!r)
                          return reply(error_answer(r.error().message, r.error().code));
                        reply(json{{"seq", *r}}.dump());
                      });
  });
  if (!steer_sub)
    return steer_sub.error();
  c->subs.push_back(std::move(*steer_sub));

  auto approve_sub = events.serve("ferry.ctl.task.*.approve", [&tasks](std::string_view subject,
                                                                        std::string_view payload,
                                                                        responder reply) {
    auto id = task_id_of(subject);
    auto body = parse_object(payload);
    auto destination = body.is_object() ? string_field(body, "destination", "") : std::string();
    if (id.empty() || destination.empty())
      return reply(error_answer("expected ferry.ctl.task.<hex id>.approve with a JSON object "
                                "{\"user\", \"destination\"} and a non-empty destination",
                                errc::invalid_argument));
    // The task checks the destination itself (task_deps::egress_destination).
    tasks.approve_egress_async(id, string_field(body, "user", "system"), destination,
                               [reply](result<uint64_t> r) {
                                 if (!r)
                                   return reply(error_answer(r.error().message, r.error().code));
                                 reply(json{{"seq", *r}}.dump());
                               });
  });
  if (!approve_sub)
    return approve_sub.error();
  c->subs.push_back(std::move(*approve_sub));
  return std::unique_ptr<task_control>(std::move(c));
}

}  // namespace ferry::actors
