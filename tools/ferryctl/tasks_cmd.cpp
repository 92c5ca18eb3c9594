// ferryctl tasks list | show (folded from the journal, like replay) and tasks abort | steer
// (requests on the task's control subjects over ferryd's NATS, like the API's).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctl.h"
#include "ferry/actors/bus.h"
#include "ferry/actors/tasks.h"
#include "ferry/gateway/control_client.h"

namespace ferry::ctl {

namespace {

using json = nlohmann::json;

std::string to_line(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

/// The task id in `arg` ("<id>" or its stream name "task-<id>"), or "" when it is not one.
std::string task_id_of(const std::string& arg) {
  std::string id = arg.compare(0, 5, "task-") == 0 ? arg.substr(5) : arg;
  return actors::valid_task_id(id) ? id : std::string();
}

int bad_task_id(const std::string& arg) {
  return fail(exit_usage, "'" + arg + "' is not a task id (lowercase hex, as `ferryctl tasks "
                                      "list` shows them; the stream name task-<id> works too)");
}

/// A command for one line of a table: control characters shown as spaces, long ones clipped.
std::string one_line(const std::string& s, size_t max = 60) {
  std::string out;
  for (char c : s.substr(0, max))
    out += static_cast<unsigned char>(c) < 0x20 || c == 0x7f ? ' ' : c;
  return s.size() > max ? out + "..." : out;
}

/// Connects to ferryd's NATS for a control request; exit code and message when it cannot.
result<std::unique_ptr<actors::bus>> connect(const control_args& c) {
  if (c.nats_url.empty())
    return ferry::fail(errc::invalid_argument,
                       "--nats-url (or FERRY_NATS_URL) is required: ferryd records no NATS URL "
                       "in its data directory. It prints it when it starts (\"ferryd: data in "
                       "..., NATS at nats://127.0.0.1:PORT\"), or it is the --nats-url it was "
                       "given");
  auto bus = actors::connect_nats(c.nats_url);
  if (!bus)
    return ferry::fail(errc::closed, bus.error().message);
  return bus;
}

/// The exit code for a failed control request (see control_client.h for the codes).
int control_exit_code(errc code) {
  switch (code) {
    case errc::not_found:
    case errc::conflict: return exit_task_ended;
    case errc::invalid_argument: return exit_usage;
    case errc::busy:
    case errc::closed:
    case errc::corrupt:
    case errc::failed: break;
  }
  return exit_no_answer;
}

}  // namespace

int run_tasks_list(const std::filesystem::path& data_dir, const tasks_list_args& a) {
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();
  auto names = store.list_streams("task-");
  if (!names)
    return fail(names.error());
  std::vector<actors::task_view> views;
  for (const auto& name : *names) {
    if (should_stop())
      break;
    auto view = actors::load_task_view(store, name.substr(5));
    if (!view)
      return fail(exit_corrupt, name + ": " + view.error().message);
    if (!*view)
      continue;  // not a task id (load_task_view checks), or nothing left after retention
    if ((!a.status.empty() && (*view)->status != a.status) ||
        (!a.user.empty() && (*view)->user != a.user))
      continue;
    views.push_back(std::move(**view));
  }
  if (int code = early_stop_exit_code(); code >= 0)
    return code;
  // Oldest first, as they were submitted.
  std::sort(views.begin(), views.end(), [](const auto& x, const auto& y) {
    return std::tie(x.created_ns, x.id) < std::tie(y.created_ns, y.id);
  });
  if (!a.json)
    emit("ID\tSTATUS\tCREATED\tUSER\tCOMMAND");
  for (const auto& v : views) {
    const bool printed =
      a.json ? emit(to_line(task_view_json(v)))
             : emit(v.id + "\t" + v.status + "\t" + iso_time(v.created_ns) + "\t" +
                    (v.user.empty() ? "-" : v.user) + "\t" + one_line(v.command));
    if (!printed || should_stop())
      break;
  }
  if (int code = early_stop_exit_code(); code >= 0)
    return code;
  return exit_ok;
}

int run_tasks_show(const std::filesystem::path& data_dir, const tasks_show_args& a) {
  const std::string id = task_id_of(a.id);
  if (id.empty())
    return bad_task_id(a.id);
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();
  const std::string stream = "task-" + id;
  auto info = store.info(stream);
  if (!info)
    return fail(info.error());
  auto view = actors::load_task_view(store, id);
  if (!view)
    return fail(exit_corrupt, stream + ": " + view.error().message);
  if (info->highest_sequence == 0 || !*view)
    return fail(exit_stream_not_found, "no task " + id + " (see `ferryctl tasks list`)");
  if (a.json)
    emit(to_line(task_view_json(**view)));
  else
    print_task_view(stream, **view, info->highest_sequence);
  return exit_ok;
}

int run_tasks_abort(const tasks_abort_args& a) {
  const std::string id = task_id_of(a.id);
  if (id.empty())
    return bad_task_id(a.id);
  auto bus = connect(a.control);
  if (!bus)
    return fail(control_exit_code(bus.error().code), bus.error().message);
  auto outcome = gateway::request_abort(**bus, id, a.control.as, a.reason,
                                        std::chrono::seconds(a.wait_s));
  if (!outcome)
    return fail(control_exit_code(outcome.error().code),
                "abort task " + id + ": " + outcome.error().message);
  switch (*outcome) {
    case actors::abort_outcome::already_finished:
      return fail(exit_task_ended, "task " + id + " had already finished");
    case actors::abort_outcome::not_found:
      return fail(exit_task_ended, "no live task " + id +
                                     ": it has ended, or no ferryd on this NATS runs it");
    case actors::abort_outcome::aborted:
    case actors::abort_outcome::pending: break;
  }
  const std::string word(actors::to_string(*outcome));
  if (a.control.json)
    emit(to_line(json{{"id", id}, {"outcome", word}}));
  else
    emit("task " + id + ": " + word +
         (*outcome == actors::abort_outcome::pending
            ? " (abort recorded; the task was still ending after " + std::to_string(a.wait_s) +
                " s)"
            : ""));
  return exit_ok;
}

int run_tasks_steer(const tasks_steer_args& a) {
  const std::string id = task_id_of(a.id);
  if (id.empty())
    return bad_task_id(a.id);
  if (a.text.empty())
    return fail(exit_usage, "the steering text is empty");
  if (a.text.size() > actors::max_steering_bytes)
    return fail(exit_usage, "a steering comment may have at most " +
                              std::to_string(actors::max_steering_bytes) + " bytes, got " +
                              std::to_string(a.text.size()));
  auto bus = connect(a.control);
  if (!bus)
    return fail(control_exit_code(bus.error().code), bus.error().message);
  auto seq = gateway::request_steer(**bus, id, a.control.as, a.text);
  if (!seq)
    return fail(control_exit_code(seq.error().code), "steer task " + id + ": " +
                                                         seq.error().message);
  if (a.control.json)
    emit(to_line(json{{"id", id}, {"seq", *seq}}));
  else
    emit("task " + id + ": steering comment stored as seq " + std::to_string(*seq));
  return exit_ok;
}

}  // namespace ferry::ctl
