// Folding a task's events into its current state.

#include <cctype>

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

result<std::optional<task_view>> load_task_view(storage::event_store& store,
                                                const std::string& task_id) {
  if (!valid_task_id(task_id))
    return std::optional<task_view>{};
  auto stream = "task-" + task_id;
  task_view v;
  v.id = task_id;
  uint64_t next = 1;
  constexpr uint64_t batch = 512;
  for (;;) {
    auto events = store.read_stream(stream, next, batch);
    if (!events)
      return events.error();
    for (const auto& bytes : *events) {
      auto e = schemas::verify_envelope(bytes);
      if (!e)
        return fail("task " + task_id + ": " + e.error().message);
      const auto& env = **e;
      v.last_sequence = env.sequence();
      switch (env.event_type()) {
        case ev::Event::TaskSubmitted: {
          auto* x = env.event_as_TaskSubmitted();
          v.command = x->command() ? x->command()->str() : "";
          v.repo = x->repo() ? x->repo()->str() : "";
          v.user = env.user() ? env.user()->str() : "";
          v.created_ns = env.timestamp_ns();
          v.status = "queued";
          break;
        }
        case ev::Event::TaskStateChanged:
          v.status = schemas::to_string(env.event_as_TaskStateChanged()->to());
          break;
        case ev::Event::SandboxStateChanged: {
          auto* x = env.event_as_SandboxStateChanged();
          v.sandbox_id = x->sandbox_id() ? x->sandbox_id()->str() : "";
          v.sandbox_backend = x->backend() ? x->backend()->str() : "";
          v.sandbox_status = schemas::to_string(x->to());
          break;
        }
        case ev::Event::CommandExited: {
          auto* x = env.event_as_CommandExited();
          if (x->signal() == 0)
            v.exit_code = x->exit_code();
          break;
        }
        case ev::Event::TaskFinished: {
          auto* x = env.event_as_TaskFinished();
          v.status = schemas::to_string(x->status());
          v.reason = x->reason() ? x->reason()->str() : "";
          v.finished = true;
          v.finished_ns = env.timestamp_ns();
          break;
        }
        default: break;
      }
    }
    if (events->size() < batch)
      break;
    next += batch;
  }
  if (v.last_sequence == 0)
    return std::optional<task_view>{};
  return std::optional<task_view>{std::move(v)};
}

}  // namespace ferry::actors
