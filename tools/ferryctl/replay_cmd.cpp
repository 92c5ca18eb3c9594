// ferryctl replay: rebuilds a stream's state at a sequence with the fold its actor uses
// (actors::apply for task streams), optionally with the timeline of state transitions.

#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctl.h"
#include "ferry/actors/tasks.h"
#include "ferry/schemas/events.h"

namespace ferry::ctl {

namespace {

namespace ev = ferry::events::v1;
using json = nlohmann::json;

/// One state transition seen while folding: the fold's own view before and after an event.
struct transition {
  uint64_t sequence = 0;
  uint64_t position = 0;
  int64_t time_ns = 0;
  std::string what;  ///< "task" or "sandbox"
  std::string sandbox_id;
  std::string from;
  std::string to;
  std::string reason;  ///< the reason the event gives, if any
};

std::string str_of(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

/// The reason an event states for the change it records (empty for events without one).
std::string reason_of(const ev::Envelope& e) {
  switch (e.event_type()) {
    case ev::Event::TaskStateChanged: return str_of(e.event_as_TaskStateChanged()->reason());
    case ev::Event::SandboxStateChanged: return str_of(e.event_as_SandboxStateChanged()->reason());
    case ev::Event::TaskFinished: return str_of(e.event_as_TaskFinished()->reason());
    case ev::Event::AbortRequested: return str_of(e.event_as_AbortRequested()->reason());
    case ev::Event::LimitReached: return str_of(e.event_as_LimitReached()->detail());
    default: return {};
  }
}

std::string or_none(const std::string& s) { return s.empty() ? "none" : s; }
std::string or_dash(const std::string& s) { return s.empty() ? "-" : s; }

std::string to_line(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

json transition_json(const transition& t) {
  json j{{"seq", t.sequence}, {"position", t.position}, {"time", iso_time(t.time_ns)},
         {"what", t.what},    {"from", t.from},         {"to", t.to},
         {"reason", t.reason}};
  if (t.what == "sandbox")
    j["sandbox_id"] = t.sandbox_id;
  return j;
}

void print_transition_text(const transition& t) {
  std::string subject = t.what == "sandbox" ? "sandbox " + t.sandbox_id : "task";
  std::printf("  seq %-5llu %s  %-32s %s -> %s%s\n", static_cast<unsigned long long>(t.sequence),
              iso_time(t.time_ns).c_str(), subject.c_str(), t.from.c_str(), t.to.c_str(),
              t.reason.empty() ? "" : ("  (" + t.reason + ")").c_str());
}

/// The kind of a stream: `task` for `task-…`, the whole name for a bare kind (`tokens`).
std::string kind_of(const std::string& stream) {
  auto dash = stream.find('-');
  return dash == std::string::npos ? stream : stream.substr(0, dash);
}

}  // namespace

json task_view_json(const actors::task_view& v) {
  json j = actors::to_json(v);  // the shape of GET /api/v1/tasks/{id}
  if (v.sandbox_status.empty())
    j["sandbox"]["status"] = "none";
  return j;
}

void print_task_view(const std::string& stream, const actors::task_view& v, uint64_t highest) {
  std::printf("stream:     %s\n", stream.c_str());
  std::printf("at:         seq %llu of %llu\n", static_cast<unsigned long long>(v.last_sequence),
              static_cast<unsigned long long>(highest));
  std::printf("status:     %s\n", v.status.c_str());
  std::printf("finished:   %s\n", v.finished ? iso_time(v.finished_ns).c_str() : "no");
  std::printf("exit_code:  %s\n", v.exit_code ? std::to_string(*v.exit_code).c_str() : "-");
  std::printf("reason:     %s\n", or_dash(v.reason).c_str());
  std::printf("command:    %s\n", v.command.c_str());
  std::printf("repo:       %s\n", or_dash(v.repo).c_str());
  std::printf("user:       %s\n", or_dash(v.user).c_str());
  std::printf("created:    %s\n", iso_time(v.created_ns).c_str());
  std::printf("sandbox:    id=%s backend=%s status=%s reason=%s\n", or_dash(v.sandbox_id).c_str(),
              or_dash(v.sandbox_backend).c_str(), or_none(v.sandbox_status).c_str(),
              or_dash(v.sandbox_reason).c_str());
  std::printf("wall-clock: %s\n", v.wall_clock_limit_ms
                                    ? (std::to_string(v.wall_clock_limit_ms) + " ms limit").c_str()
                                    : "no limit");
  if (v.limits_reached.empty())
    std::printf("limits:     none reached\n");
  for (const auto& l : v.limits_reached)
    std::printf("limit:      %s=%llu command=%u whole_sandbox=%s  %s\n", l.kind.c_str(),
                static_cast<unsigned long long>(l.limit), l.command_id,
                l.whole_sandbox ? "yes" : "no", or_dash(l.detail).c_str());
}

int run_replay(const std::filesystem::path& data_dir, const replay_args& a) {
  if (a.stream.size() <= 5 || a.stream.compare(0, 5, "task-") != 0)
    return fail(exit_usage, "replay supports task streams (task-<id>) only; " +
                              (kind_of(a.stream) == "task"
                                 ? "'" + a.stream + "' names no task"
                                 : "'" + a.stream + "' is a " + kind_of(a.stream) +
                                     " stream, which has no fold yet"));
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();
  auto info = store.info(a.stream);
  if (!info)
    return fail(info.error());
  if (info->highest_sequence == 0)
    return fail(exit_stream_not_found,
                "no stream '" + a.stream + "' (see `ferryctl events streams --kind task`)");
  const uint64_t at = a.at ? a.at : info->highest_sequence;
  if (at > info->highest_sequence)
    return fail(exit_usage, "--at " + std::to_string(at) + " is past the end of " + a.stream +
                              " (highest sequence " + std::to_string(info->highest_sequence) + ")");
  if (info->deleted_to > 0) {
    if (at <= info->deleted_to)
      return fail(exit_usage, "--at " + std::to_string(at) + ": events 1.." +
                                std::to_string(info->deleted_to) + " of " + a.stream +
                                " were deleted (retention); the earliest state is at " +
                                std::to_string(info->deleted_to + 1));
    // The actor folds what the journal still holds; so does replay, but says so.
    std::fprintf(stderr,
                 "ferryctl: note: events 1..%llu of %s were deleted (retention); the state is "
                 "folded from sequence %llu on, as the task actor would\n",
                 static_cast<unsigned long long>(info->deleted_to), a.stream.c_str(),
                 static_cast<unsigned long long>(info->deleted_to + 1));
  }

  actors::task_view view;
  view.id = a.stream.substr(5);
  std::vector<transition> timeline;
  auto visited = store.for_each(
    a.stream, storage::read_range{1, at}, [&](const ev::Envelope& e, std::string_view) {
      const actors::task_view before = a.timeline ? view : actors::task_view{};
      actors::apply(view, e);
      if (!a.timeline)
        return !should_stop();
      // A transition is whatever the fold's state says changed; the event adds time and reason.
      if (view.status != before.status)
        timeline.push_back({e.sequence(), e.position(), e.timestamp_ns(), "task", "",
                            or_none(before.status), view.status, reason_of(e)});
      if (view.sandbox_status != before.sandbox_status || view.sandbox_id != before.sandbox_id)
        timeline.push_back({e.sequence(), e.position(), e.timestamp_ns(), "sandbox",
                            view.sandbox_id,
                            view.sandbox_id == before.sandbox_id ? or_none(before.sandbox_status)
                                                                 : "none",
                            or_none(view.sandbox_status), reason_of(e)});
      return !should_stop();
    });
  if (int code = early_stop_exit_code(); code >= 0)
    return code;
  if (!visited)
    return fail(visited.error());
  if (view.last_sequence != at)
    return fail(exit_corrupt, a.stream + ": the journal's head says sequence " +
                                std::to_string(at) + " exists, but reading stopped at " +
                                std::to_string(view.last_sequence));

  if (a.json) {
    json out{{"stream", a.stream},
             {"at", view.last_sequence},
             {"highest_sequence", info->highest_sequence},
             {"deleted_to", info->deleted_to},
             {"state", task_view_json(view)}};
    if (a.timeline) {
      json t = json::array();
      for (const auto& x : timeline)
        t.push_back(transition_json(x));
      out["timeline"] = std::move(t);
    }
    std::printf("%s\n", to_line(out).c_str());
    return exit_ok;
  }
  print_task_view(a.stream, view, info->highest_sequence);
  if (a.timeline) {
    std::printf("timeline:\n");
    for (const auto& x : timeline)
      print_transition_text(x);
  }
  return exit_ok;
}

}  // namespace ferry::ctl
