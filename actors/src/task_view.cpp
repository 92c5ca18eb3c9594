// Folding a task's events into its current state.

#include <algorithm>
#include <cctype>

#include <nlohmann/json.hpp>

#include "ferry/actors/tasks.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace ferry::actors {

namespace ev = ferry::events::v1;

bool valid_task_id(std::string_view id) {
  if (id.empty() || id.size() > 64)
    return false;
  for (char c : id)
    if (!std::isxdigit(static_cast<unsigned char>(c)) || std::isupper(static_cast<unsigned char>(c)))
      return false;
  return true;
}

std::optional<std::string> task_of_sandbox(std::string_view sandbox_id) {
  constexpr std::string_view prefix = "ferry-";
  if (!sandbox_id.starts_with(prefix))
    return std::nullopt;
  sandbox_id.remove_prefix(prefix.size());
  if (sandbox_id.ends_with("-setup"))
    sandbox_id.remove_suffix(6);
  const auto dash = sandbox_id.rfind('-');
  if (dash == std::string_view::npos || dash + 1 == sandbox_id.size())
    return std::nullopt;
  for (char c : sandbox_id.substr(dash + 1))
    if (!std::isdigit(static_cast<unsigned char>(c)))
      return std::nullopt;
  const auto task = sandbox_id.substr(0, dash);
  if (!valid_task_id(task))
    return std::nullopt;
  return std::string(task);
}

namespace {

/// `host` of a `host:port` destination.
std::string_view host_of(std::string_view destination) {
  return destination.substr(0, destination.rfind(':'));
}

}  // namespace

void apply(task_view& v, const ev::Envelope& env) {
  v.last_sequence = env.sequence();
  switch (env.event_type()) {
    case ev::Event::TaskSubmitted: {
      auto* x = env.event_as_TaskSubmitted();
      v.command = x->command() ? x->command()->str() : "";
      v.repo = x->repo() ? x->repo()->str() : "";
      v.environment = x->environment() ? x->environment()->str() : "";
      v.environment_key = x->environment_key() ? x->environment_key()->str() : "";
      v.user = env.user() ? env.user()->str() : "";
      v.created_ns = env.timestamp_ns();
      v.wall_clock_limit_ms = x->wall_clock_limit_ms();
      v.status = "queued";
      break;
    }
    case ev::Event::TaskStateChanged:
      v.status = schemas::to_string(env.event_as_TaskStateChanged()->to());
      v.queue_position = 0;
      if (env.event_as_TaskStateChanged()->to() == ev::TaskStatus::running)
        v.running_since_ns = env.timestamp_ns();
      if (env.event_as_TaskStateChanged()->from() == ev::TaskStatus::interrupted) {
        // Resumed: the task runs again.
        v.finished = false;
        v.resumable = false;
        v.finished_ns = 0;
        v.reason.clear();
        v.exit_code.reset();
      }
      break;
    case ev::Event::TaskInterrupted:
      v.resumable = env.event_as_TaskInterrupted()->resumable();
      break;
    case ev::Event::AbortRequested:
      v.abort_requested = true;
      break;
    case ev::Event::TaskQueued:
      v.queue_position = env.event_as_TaskQueued()->position();
      break;
    case ev::Event::SandboxStateChanged: {
      auto* x = env.event_as_SandboxStateChanged();
      const std::string id = x->sandbox_id() ? x->sandbox_id()->str() : "";
      if (id != v.sandbox_id)
        v.sandbox_runtime_id.clear();  // a new sandbox
      v.sandbox_id = id;
      if (x->runtime_id())
        v.sandbox_runtime_id = x->runtime_id()->str();
      v.sandbox_backend = x->backend() ? x->backend()->str() : "";
      v.sandbox_status = schemas::to_string(x->to());
      v.sandbox_reason = x->reason() ? x->reason()->str() : "";
      break;
    }
    case ev::Event::CommandExited: {
      auto* x = env.event_as_CommandExited();
      // The setup's and Ferry's own commands (the clone) are not the task's.
      if (x->signal() == 0 && x->command_id() != setup_command_id && !is_ferry_command(x->command_id()))
        v.exit_code = x->exit_code();
      break;
    }
    case ev::Event::LimitReached: {
      auto* x = env.event_as_LimitReached();
      v.limits_reached.push_back({std::string(schemas::to_string(x->kind())), x->limit(),
                                  x->command_id(), x->whole_sandbox(),
                                  x->detail() ? x->detail()->str() : "", env.timestamp_ns()});
      break;
    }
    case ev::Event::EgressDecision: {
      auto* x = env.event_as_EgressDecision();
      auto& e = v.egress;
      ++(x->allowed() ? e.allowed : e.denied);
      e.bytes_up += x->bytes_up();
      e.bytes_down += x->bytes_down();
      if (!x->allowed() && x->approvable() && x->host()) {
        std::string destination = x->host()->str() + ":" + std::to_string(x->port());
        if (std::find(e.approvable.begin(), e.approvable.end(), destination) == e.approvable.end()) {
          if (e.approvable.size() >= egress_summary::max_approvable)
            e.approvable.erase(e.approvable.begin());
          e.approvable.push_back(std::move(destination));
        }
      }
      break;
    }
    case ev::Event::EgressApproved: {
      auto* x = env.event_as_EgressApproved();
      const std::string d = x->destination() ? x->destination()->str() : "";
      auto& e = v.egress;
      e.approvals.push_back(d);
      // What it allows is no longer waiting for a decision (an exact `host` or `host:port`;
      // wildcards leave the list to the UI's judgement).
      std::erase_if(e.approvable, [&](const std::string& a) { return a == d || host_of(a) == d; });
      break;
    }
    case ev::Event::GitOperation: {
      auto* x = env.event_as_GitOperation();
      auto& g = v.git;
      ++g.operations;
      const std::string result = x->result() ? x->result()->str() : "";
      if (result == "refused")
        ++g.refused;
      else if (result == "upstream_error")
        ++g.upstream_errors;
      else if (result == "ok" && !x->advertisement() && x->refs()) {
        // "<ref> <old oid> <new oid>" per update.
        for (const auto* r : *x->refs()) {
          const std::string u = r ? r->str() : "";
          const auto sp = u.find(' '), last = u.rfind(' ');
          if (sp == std::string::npos || last == sp)
            continue;
          const std::string ref = u.substr(0, sp), oid = u.substr(last + 1);
          auto it = std::find_if(g.pushed.begin(), g.pushed.end(), [&](const auto& p) { return p.first == ref; });
          if (it != g.pushed.end())
            it->second = oid;
          else
            g.pushed.emplace_back(ref, oid);
        }
      }
      break;
    }
    case ev::Event::TaskFinished: {
      auto* x = env.event_as_TaskFinished();
      v.status = schemas::to_string(x->status());
      v.reason = x->reason() ? x->reason()->str() : "";
      v.finished = true;
      v.finished_ns = env.timestamp_ns();
      v.queue_position = 0;
      break;
    }
    default: break;
  }
}

nlohmann::json to_json(const task_view& v) {
  using nlohmann::json;
  json j{{"id", v.id},
         {"status", v.status},
         {"command", v.command},
         {"repo", v.repo},
         {"environment", v.environment},
         {"environment_key", v.environment_key},
         {"user", v.user},
         {"exit_code", v.exit_code ? json(*v.exit_code) : json(nullptr)},
         {"reason", v.reason},
         {"finished", v.finished},
         {"last_seq", v.last_sequence},
         {"created_ns", v.created_ns},
         {"running_since_ns", v.running_since_ns},
         {"wall_clock_limit_ms", v.wall_clock_limit_ms}};
  json limits = json::array();
  for (const auto& l : v.limits_reached)
    limits.push_back({{"kind", l.kind},
                      {"limit", l.limit},
                      {"command_id", l.command_id},
                      {"whole_sandbox", l.whole_sandbox},
                      {"detail", l.detail},
                      {"time_ns", l.time_ns}});
  j["limits_reached"] = std::move(limits);
  j["egress"] = {{"allowed", v.egress.allowed},       {"denied", v.egress.denied},
                 {"bytes_up", v.egress.bytes_up},     {"bytes_down", v.egress.bytes_down},
                 {"approvals", v.egress.approvals}, {"approvable", v.egress.approvable}};
  json pushed = json::array();
  for (const auto& [ref, oid] : v.git.pushed)
    pushed.push_back({{"ref", ref}, {"oid", oid}});
  j["git"] = {{"operations", v.git.operations},
              {"refused", v.git.refused},
              {"upstream_errors", v.git.upstream_errors},
              {"pushed", std::move(pushed)}};
  j["sandbox"] = {{"id", v.sandbox_id},
                  {"runtime_id", v.sandbox_runtime_id.empty() ? v.sandbox_id : v.sandbox_runtime_id},
                  {"backend", v.sandbox_backend},
                  {"status", v.sandbox_status},
                  {"reason", v.sandbox_reason}};
  if (v.finished)
    j["finished_ns"] = v.finished_ns;
  if (v.status == "queued")
    j["queue_position"] = v.queue_position;
  if (v.status == "interrupted")
    j["resumable"] = v.resumable;
  if (v.abort_requested)
    j["abort_requested"] = true;
  return j;
}

result<task_view> task_view_from_json(const nlohmann::json& j) {
  try {
    task_view v;
    v.id = j.at("id").get<std::string>();
    v.status = j.at("status").get<std::string>();
    v.command = j.at("command").get<std::string>();
    v.repo = j.at("repo").get<std::string>();
    // Absent from snapshots taken before environments existed.
    v.environment = j.value("environment", std::string());
    v.environment_key = j.value("environment_key", std::string());
    v.user = j.at("user").get<std::string>();
    if (!j.at("exit_code").is_null())
      v.exit_code = j.at("exit_code").get<int>();
    v.reason = j.at("reason").get<std::string>();
    v.finished = j.at("finished").get<bool>();
    v.last_sequence = j.at("last_seq").get<uint64_t>();
    v.created_ns = j.at("created_ns").get<int64_t>();
    const auto& sb = j.at("sandbox");
    v.sandbox_id = sb.at("id").get<std::string>();
    if (auto rt = sb.value("runtime_id", std::string()); rt != v.sandbox_id)
      v.sandbox_runtime_id = rt;
    v.sandbox_backend = sb.at("backend").get<std::string>();
    v.sandbox_status = sb.at("status").get<std::string>();
    v.sandbox_reason = sb.at("reason").get<std::string>();
    v.finished_ns = j.value("finished_ns", int64_t{0});
    v.queue_position = j.value("queue_position", uint32_t{0});
    v.resumable = j.value("resumable", false);
    v.abort_requested = j.value("abort_requested", false);
    // Absent from snapshots taken before limits were recorded.
    v.running_since_ns = j.value("running_since_ns", int64_t{0});
    v.wall_clock_limit_ms = j.value("wall_clock_limit_ms", uint64_t{0});
    if (auto it = j.find("limits_reached"); it != j.end())
      for (const auto& l : *it)
        v.limits_reached.push_back({l.at("kind").get<std::string>(), l.at("limit").get<uint64_t>(),
                                    l.at("command_id").get<uint32_t>(),
                                    l.at("whole_sandbox").get<bool>(),
                                    l.at("detail").get<std::string>(),
                                    l.value("time_ns", int64_t{0})});
    // Absent from snapshots taken before egress was recorded.
    if (auto it = j.find("egress"); it != j.end()) {
      v.egress.allowed = it->at("allowed").get<uint64_t>();
      v.egress.denied = it->at("denied").get<uint64_t>();
      v.egress.bytes_up = it->at("bytes_up").get<uint64_t>();
      v.egress.bytes_down = it->at("bytes_down").get<uint64_t>();
      v.egress.approvals = it->at("approvals").get<std::vector<std::string>>();
      v.egress.approvable = it->at("approvable").get<std::vector<std::string>>();
    }
    // Absent from snapshots taken before git operations were recorded.
    if (auto it = j.find("git"); it != j.end()) {
      v.git.operations = it->at("operations").get<uint64_t>();
      v.git.refused = it->at("refused").get<uint64_t>();
      v.git.upstream_errors = it->at("upstream_errors").get<uint64_t>();
      for (const auto& p : it->at("pushed"))
        v.git.pushed.emplace_back(p.at("ref").get<std::string>(), p.at("oid").get<std::string>());
    }
    return v;
  } catch (const nlohmann::json::exception& e) {
    return fail(errc::corrupt, std::string("task view: ") + e.what());
  }
}

result<void> refresh_task_view(storage::event_store& store, task_view& v) {
  auto stream = "task-" + v.id;
  constexpr uint64_t batch = 512;
  for (;;) {
    auto events = store.read_stream(stream, v.last_sequence + 1, batch);
    if (!events)
      return events.error();
    for (const auto& bytes : *events) {
      auto e = schemas::verify_envelope(bytes);
      if (!e)
        return fail("task " + v.id + ": " + e.error().message);
      apply(v, **e);
    }
    if (events->size() < batch)
      return {};
  }
}

result<std::optional<task_view>> load_task_view(storage::event_store& store,
                                                const std::string& task_id) {
  if (!valid_task_id(task_id))
    return std::optional<task_view>{};
  task_view v;
  v.id = task_id;
  if (auto r = refresh_task_view(store, v); !r)
    return r.error();
  if (v.last_sequence == 0)
    return std::optional<task_view>{};
  return std::optional<task_view>{std::move(v)};
}

size_t task_view_cache::size() {
  std::lock_guard<std::mutex> guard(mtx_);
  return views_.size();
}

result<std::optional<task_view>> task_view_cache::get(const std::string& task_id) {
  if (!valid_task_id(task_id))
    return std::optional<task_view>{};
  task_view v;
  {
    std::lock_guard<std::mutex> guard(mtx_);
    if (auto it = views_.find(task_id); it != views_.end())
      v = it->second;
  }
  v.id = task_id;
  // A finished task's stream does not grow; anything else is brought up to date (outside the
  // lock: reads of different tasks proceed in parallel).
  if (!v.finished || v.status == "interrupted")  // an interrupted task can be resumed
    if (auto r = refresh_task_view(store_, v); !r)
      return r.error();
  if (v.last_sequence == 0)
    return std::optional<task_view>{};
  std::lock_guard<std::mutex> guard(mtx_);
  if (views_.size() >= capacity_ && !views_.count(task_id))
    views_.clear();
  auto& slot = views_[task_id];
  if (slot.last_sequence <= v.last_sequence)
    slot = v;
  return std::optional<task_view>{std::move(v)};
}

}  // namespace ferry::actors
