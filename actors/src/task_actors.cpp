// The task manager, task and sandbox actors (see ferry/actors/tasks.h for the contract).

#include <openssl/rand.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <optional>
#include <cstdio>
#include <functional>
#include <mutex>
#include <map>

#include "ferry/actors/tasks.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "messages.h"

namespace ferry::actors {

namespace {

namespace ev = ferry::events::v1;
using schemas::envelope_meta;

std::string random_hex(size_t bytes) {
  std::vector<unsigned char> buf(bytes);
  if (RAND_bytes(buf.data(), static_cast<int>(bytes)) != 1) {
    std::fprintf(stderr, "ferryd: fatal: OpenSSL RAND_bytes failed\n");
    std::abort();
  }
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  for (auto b : buf) {
    out += hex[b >> 4];
    out += hex[b & 15];
  }
  return out;
}

/// Appends `envs` to `stream`. Publishing is the outbox relay's job (outbox.h): it carries every
/// stored event to NATS in journal order, so an actor never waits for NATS.
result<void> record(const task_deps& d, const std::string& stream, std::vector<std::string>& envs,
                    storage::expected_version expected = storage::expected_version::any()) {
  auto appended = d.store->append(stream, envs, expected);
  if (!appended)
    return appended.error();
  return {};
}

// -- sandbox actor ---------------------------------------------------------------------------------

/// Allowed sandbox transitions (see SandboxStatus in schemas/events.fbs).
bool sandbox_transition_allowed(ev::SandboxStatus from, ev::SandboxStatus to) {
  using S = ev::SandboxStatus;
  switch (from) {
    case S::none: return to == S::spawning;
    case S::spawning: return to == S::executing || to == S::failed;
    case S::executing: return to == S::terminating || to == S::failed;
    case S::terminating: return to == S::terminated || to == S::failed;
    // Reserved for the full lifecycle (issue #4); `running` is schema version 1 only.
    case S::initializing:
    case S::cloning:
    case S::ready:
    case S::pushing:
    case S::running:
    case S::terminated:
    case S::failed: return false;
  }
  return false;
}

/// Output waiting for the task actor is bounded: past this many bytes the sandbox's reader thread
/// blocks, the pipe from ferry-init fills, and the command itself blocks on write. Backpressure
/// instead of unbounded memory.
constexpr size_t max_pending_output = 4u << 20;
/// Consecutive chunks of one stream are merged up to this size into one output_chunk event.
constexpr size_t max_piece_size = 256u << 10;

/// Turns runtime callbacks (on the sandbox's reader thread) into messages to the sandbox actor.
/// Output is not sent chunk by chunk: it collects here (merged, bounded) and the actor takes it
/// in batches, so one journal append (one fsync) covers whatever arrived meanwhile.
class observer_adapter final : public sandbox::sandbox_observer {
 public:
  explicit observer_adapter(caf::weak_actor_ptr target) : target_(std::move(target)) {}

  void on_running() override { send(running_atom_v); }
  void on_command_started(uint32_t id, const std::vector<std::string>& argv) override {
    send(cmd_start_atom_v, id, argv);
  }
  void on_output(uint32_t id, int stream, std::string_view data) override {
    std::unique_lock<std::mutex> lock(mtx_);
    room_.wait(lock, [&] { return pending_bytes_ < max_pending_output || closed_; });
    if (closed_)
      return;
    if (!pending_.empty() && pending_.back().command_id == id && pending_.back().stream == stream &&
        pending_.back().data.size() + data.size() <= max_piece_size)
      pending_.back().data.append(data);
    else
      pending_.push_back(output_piece{id, int32_t{stream}, std::string(data)});
    pending_bytes_ += data.size();
    if (std::exchange(announced_, true))
      return;
    lock.unlock();
    send(output_atom_v);
  }
  void on_command_exited(uint32_t id, int code, int signal, uint64_t ms) override {
    send(cmd_exit_atom_v, id, int32_t{code}, int32_t{signal}, ms);
  }
  void on_ended(std::optional<std::string> failure) override {
    send(ended_atom_v, failure.has_value(), failure.value_or(""));
  }

  /// Takes all collected output (actor side) and makes room for more.
  std::vector<output_piece> take_output() {
    std::vector<output_piece> out;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      out.swap(pending_);
      pending_bytes_ = 0;
      announced_ = false;
    }
    room_.notify_all();
    return out;
  }

  /// Unblocks the reader thread for good (the actor is going away); later output is dropped.
  void close() {
    {
      std::lock_guard<std::mutex> guard(mtx_);
      closed_ = true;
    }
    room_.notify_all();
  }

 private:
  template <class... Ts>
  void send(Ts&&... xs) {
    if (auto strong = target_.lock())
      caf::anon_send(caf::actor_cast<caf::actor>(strong), std::forward<Ts>(xs)...);
  }

  caf::weak_actor_ptr target_;
  std::mutex mtx_;
  std::condition_variable room_;
  std::vector<output_piece> pending_;  // GUARDED_BY(mtx_)
  size_t pending_bytes_ = 0;           // GUARDED_BY(mtx_)
  bool announced_ = false;             // GUARDED_BY(mtx_): an output_atom is on its way
  bool closed_ = false;                // GUARDED_BY(mtx_)
};

struct sandbox_state {
  static inline const char* name = "ferry.sandbox";
  sandbox::sandbox_runtime* runtime = nullptr;
  caf::actor task;
  std::string id;
  std::vector<std::string> argv;
  ev::SandboxStatus status = ev::SandboxStatus::none;
  bool kill_requested = false;
  bool ended = false;
  bool output_in_flight = false;  // a batch awaits the task's acknowledgement
  bool output_waiting = false;    // more output was announced meanwhile
  /// Facts that must reach the task after output still waiting to be sent (exit, end).
  std::vector<std::function<void()>> after_output;
  // Declared before `box`: the observer must outlive the sandbox that calls it.
  std::unique_ptr<observer_adapter> observer;
  std::unique_ptr<sandbox::sandbox> box;

  ~sandbox_state() {
    // Unblock a reader thread waiting for room before `box` joins it.
    if (observer)
      observer->close();
  }
};

using sandbox_actor_t = caf::stateful_actor<sandbox_state>;

void sandbox_transition(sandbox_actor_t* self, ev::SandboxStatus to, std::string reason) {
  auto& s = self->state;
  if (!sandbox_transition_allowed(s.status, to)) {
    std::fprintf(stderr, "ferryd: error: sandbox %s: refused transition %s -> %s (%s)\n",
                 s.id.c_str(), std::string(schemas::to_string(s.status)).c_str(),
                 std::string(schemas::to_string(to)).c_str(), reason.c_str());
    return;
  }
  self->send(s.task, sbx_state_atom_v, static_cast<int8_t>(s.status), static_cast<int8_t>(to),
             std::move(reason), std::string(s.runtime->name()), s.id);
  s.status = to;
}

/// Sends the collected output to the task as one batch and waits for its acknowledgement (the
/// batch is durable) before sending the next: the task's mailbox holds at most one batch.
void forward_output(sandbox_actor_t* self) {
  auto& s = self->state;
  if (s.output_in_flight) {
    s.output_waiting = true;
    return;
  }
  auto batch = s.observer ? s.observer->take_output() : std::vector<output_piece>{};
  if (batch.empty()) {
    // Drained: release what was held back behind the output, in order.
    auto held = std::exchange(s.after_output, {});
    for (auto& f : held)
      f();
    return;
  }
  s.output_in_flight = true;
  self->request(s.task, caf::infinite, output_atom_v, std::move(batch))
    .then(
      [=](bool) {
        auto& s = self->state;
        s.output_in_flight = false;
        if (std::exchange(s.output_waiting, false) || !s.after_output.empty())
          forward_output(self);
      },
      [=](caf::error&) {
        // The task is gone; nothing more to deliver. Keep the reader from blocking and let
        // what was held back run, so this actor still ends.
        auto& s = self->state;
        s.output_in_flight = false;
        s.output_waiting = false;
        if (s.observer)
          s.observer->close();
        auto held = std::exchange(s.after_output, {});
        for (auto& f : held)
          f();
      });
}

/// Runs `f` now, or after the output announced before it has been handed to the task (so the
/// task records, e.g., command_exited after all of the command's output).
void after_pending_output(sandbox_actor_t* self, std::function<void()> f) {
  auto& s = self->state;
  if (s.output_waiting || !s.after_output.empty()) {
    s.after_output.push_back(std::move(f));
    return;
  }
  f();
}

/// The sandbox is gone (on_ended): record its final state and stop.
void sandbox_ended(sandbox_actor_t* self, bool failed, const std::string& reason) {
  auto& s = self->state;
  s.ended = true;
  if (s.kill_requested) {
    if (s.status == ev::SandboxStatus::spawning) {
      sandbox_transition(self, ev::SandboxStatus::failed, "killed while starting");
    } else {
      // The kill may have come while spawning and ferry-init's hello after it.
      if (s.status == ev::SandboxStatus::executing)
        sandbox_transition(self, ev::SandboxStatus::terminating, "kill requested");
      sandbox_transition(self, ev::SandboxStatus::terminated, "killed on request");
    }
  } else if (failed || s.status != ev::SandboxStatus::terminating) {
    sandbox_transition(self, ev::SandboxStatus::failed,
                       reason.empty() ? "sandbox ended before its command exited" : reason);
  } else {
    sandbox_transition(self, ev::SandboxStatus::terminated, "");
  }

  if (s.observer)
    s.observer->close();
  s.box.reset();  // joins the reader thread (it has delivered on_ended)
  self->quit();
}

caf::behavior sandbox_actor(sandbox_actor_t* self, sandbox::sandbox_runtime* runtime,
                            caf::actor task, std::string id, std::vector<std::string> argv) {
  auto& s = self->state;
  s.runtime = runtime;
  s.task = std::move(task);
  s.id = std::move(id);
  s.argv = std::move(argv);
  return {
    [=](start_atom) {
      auto& s = self->state;
      sandbox_transition(self, ev::SandboxStatus::spawning, "");
      if (s.kill_requested) {
        // The kill (high priority) overtook the start: never start it.
        sandbox_transition(self, ev::SandboxStatus::failed, "killed before it started");
        self->quit();
        return;
      }
      s.observer = std::make_unique<observer_adapter>(self->ctrl());
      sandbox::sandbox_spec spec;
      spec.id = s.id;
      spec.argv = s.argv;
      auto box = s.runtime->start(spec, *s.observer);
      if (!box) {
        sandbox_transition(self, ev::SandboxStatus::failed, box.error().message);
        self->quit();
        return;
      }
      s.box = std::move(*box);
    },
    [=](running_atom) {
      if (self->state.status == ev::SandboxStatus::spawning)
        sandbox_transition(self, ev::SandboxStatus::executing, "");
    },
    [=](cmd_start_atom, uint32_t cmd, std::vector<std::string>& argv) {
      self->send(self->state.task, cmd_start_atom_v, cmd, std::move(argv));
    },
    [=](output_atom) { forward_output(self); },
    [=](cmd_exit_atom, uint32_t cmd, int32_t code, int32_t sig, uint64_t ms) {
      // All of the command's output was announced before its exit. A batch already sent is
      // ahead of this in the task's mailbox; output not yet sent must go first.
      after_pending_output(self, [=] {
        self->send(self->state.task, cmd_exit_atom_v, cmd, code, sig, ms);
        if (self->state.status == ev::SandboxStatus::executing)
          sandbox_transition(self, ev::SandboxStatus::terminating, "command exited");
      });
    },
    [=](kill_atom) {
      auto& s = self->state;
      if (s.ended || s.kill_requested)
        return;
      s.kill_requested = true;
      if (s.status == ev::SandboxStatus::executing)
        sandbox_transition(self, ev::SandboxStatus::terminating, "kill requested");
      if (s.box)
        s.box->kill();
    },
    [=](ended_atom, bool failed, std::string reason) {
      after_pending_output(self, [=] { sandbox_ended(self, failed, reason); });
    },
  };
}

// -- task actor ------------------------------------------------------------------------------------

struct task_state {
  static inline const char* name = "ferry.task";
  task_deps deps;
  std::string id;
  std::string stream;
  task_request req;
  caf::actor sandbox;
  std::optional<int32_t> exit_code;
  bool abort_requested = false;
  std::string sandbox_failure;
  bool finished = false;
  std::vector<caf::response_promise> end_waiters;

  envelope_meta meta() const { return {stream, req.correlation_id, "", req.user}; }
};

using task_actor_t = caf::stateful_actor<task_state>;

/// Persists (and publishes) one event; on a journal failure the task cannot go on: its sandbox
/// is killed and the actor stops, loudly.
/// The journal refused an event: the task cannot go on. Kills its sandbox and stops, loudly.
void persist_failed(task_actor_t* self, const error_info& e) {
  auto& s = self->state;
  std::fprintf(stderr, "ferryd: error: task %s: cannot record event: %s\n", s.id.c_str(),
               e.message.c_str());
  if (s.sandbox)
    self->send<caf::message_priority::high>(s.sandbox, kill_atom_v);
  for (auto& rp : s.end_waiters)
    rp.deliver(static_cast<int32_t>(abort_outcome::pending));
  s.end_waiters.clear();
  self->quit(caf::sec::runtime_error);
}

bool persist(task_actor_t* self, std::vector<std::string> envs) {
  auto& s = self->state;
  if (auto r = record(s.deps, s.stream, envs); !r) {
    persist_failed(self, r.error());
    return false;
  }
  return true;
}

bool persist(task_actor_t* self, std::string envelope) {
  std::vector<std::string> envs;
  envs.push_back(std::move(envelope));
  return persist(self, std::move(envs));
}

void finish_task(task_actor_t* self) {
  auto& s = self->state;
  if (s.finished)
    return;
  s.finished = true;
  ev::TaskStatus status;
  std::string reason;
  if (s.abort_requested) {
    status = ev::TaskStatus::aborted;
    reason = "aborted on request";
  } else if (!s.sandbox_failure.empty()) {
    status = ev::TaskStatus::failed;
    reason = "sandbox failed: " + s.sandbox_failure;
  } else if (s.exit_code && *s.exit_code == 0) {
    status = ev::TaskStatus::succeeded;
  } else {
    status = ev::TaskStatus::failed;
    reason = s.exit_code ? "command exited with status " + std::to_string(*s.exit_code)
                         : "command was killed";
  }
  if (!persist(self, schemas::task_finished(s.meta(), status, s.exit_code.value_or(-1), reason)))
    return;
  for (auto& rp : s.end_waiters)
    rp.deliver(static_cast<int32_t>(abort_outcome::aborted));
  s.end_waiters.clear();
  self->quit();
}

void start_sandbox(task_actor_t* self) {
  auto& s = self->state;
  std::vector<std::string> argv{"/bin/sh", "-c", s.req.command};
  s.sandbox = self->spawn<caf::detached + caf::monitored>(
    sandbox_actor, s.deps.runtime, caf::actor{self}, "ferry-" + s.id, std::move(argv));
  self->send(s.sandbox, start_atom_v);
}

caf::behavior task_actor(task_actor_t* self, task_deps deps, std::string id, task_request req) {
  auto& s = self->state;
  s.deps = deps;
  s.id = id;
  s.stream = "task-" + id;

  s.req = std::move(req);
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& s = self->state;
    if (dm.source == s.sandbox && !s.finished) {
      // The sandbox actor stopped without reporting an end (it crashed): the task fails.
      if (s.sandbox_failure.empty())
        s.sandbox_failure = "sandbox actor stopped: " + to_string(dm.reason);
      finish_task(self);
    }
  });
  return {
    [=](start_atom, uint32_t position, uint32_t running, uint32_t limit,
        std::string& why) -> caf::message {
      // Submission: durable before the id is handed out. Position 0: a slot is free, run now;
      // else wait for run_atom from the manager.
      auto& s = self->state;
      auto m = s.meta();
      std::vector<std::string> envs{schemas::task_submitted(m, s.id, s.req.command, s.req.repo)};
      if (position == 0)
        envs.push_back(
          schemas::task_state_changed(m, ev::TaskStatus::queued, ev::TaskStatus::running, ""));
      else
        envs.push_back(schemas::task_queued(m, position, running, limit, why));
      if (auto r = record(s.deps, s.stream, envs, storage::expected_version::no_stream()); !r) {
        self->quit();
        return caf::make_message(false, r.error().message);
      }
      if (position == 0)
        start_sandbox(self);
      return caf::make_message(true, s.id);
    },
    [=](run_atom) {
      auto& s = self->state;
      if (s.finished || s.abort_requested || s.sandbox)
        return;
      if (!persist(self, schemas::task_state_changed(s.meta(), ev::TaskStatus::queued,
                                                     ev::TaskStatus::running, "")))
        return;
      start_sandbox(self);
    },
    [=](queued_atom, uint32_t position, uint32_t running, uint32_t limit, std::string& why) {
      auto& s = self->state;
      if (s.finished || s.abort_requested || s.sandbox)
        return;
      persist(self, schemas::task_queued(s.meta(), position, running, limit, why));
    },
    [=](sbx_state_atom, int8_t from, int8_t to, std::string& reason, std::string& backend,
        std::string& sandbox_id) {
      auto& s = self->state;
      auto to_status = static_cast<ev::SandboxStatus>(to);
      if (!persist(self, schemas::sandbox_state_changed(s.meta(), sandbox_id, backend,
                                                        static_cast<ev::SandboxStatus>(from),
                                                        to_status, reason)))
        return;
      if (to_status == ev::SandboxStatus::failed)
        s.sandbox_failure = reason.empty() ? "unknown reason" : reason;
      if (to_status == ev::SandboxStatus::terminated || to_status == ev::SandboxStatus::failed)
        finish_task(self);
    },
    [=](cmd_start_atom, uint32_t cmd, std::vector<std::string>& argv) {
      persist(self, schemas::command_started(self->state.meta(), cmd, argv));
    },
    [=](output_atom, std::vector<output_piece>& batch) {
      // One append (one fsync) for the whole batch; the answer lets the sandbox send the next.
      auto m = self->state.meta();
      std::vector<std::string> envs;
      envs.reserve(batch.size());
      for (auto& p : batch)
        envs.push_back(schemas::output_chunk(
          m, p.command_id, p.stream == 1 ? ev::OutputStream::stderr : ev::OutputStream::stdout,
          p.data));
      return persist(self, std::move(envs));
    },
    [=](cmd_exit_atom, uint32_t cmd, int32_t code, int32_t sig, uint64_t ms) {
      auto& s = self->state;
      if (sig == 0)
        s.exit_code = code;
      persist(self, schemas::command_exited(s.meta(), cmd, code, sig, ms));
    },
    [=](steer_atom, std::string& user,
        std::string& text) -> caf::result<int32_t, std::string, uint64_t> {
      // Persisted at once; the session takes it into its next turn.
      auto& s = self->state;
      if (s.finished || s.abort_requested)
        return {static_cast<int32_t>(errc::conflict), std::string("the task has ended"),
                uint64_t{0}};
      auto m = s.meta();
      m.user = user;
      std::vector<std::string> envs{schemas::steering_comment(m, text)};
      auto appended = s.deps.store->append(s.stream, envs);
      if (!appended) {
        persist_failed(self, appended.error());
        return {static_cast<int32_t>(errc::failed), appended.error().message, uint64_t{0}};
      }
      return {int32_t{0}, std::string(), appended->last_sequence};
    },
    [=](abort_atom, std::string& reason, std::string& user) -> caf::result<int32_t> {
      auto& s = self->state;
      if (s.finished)
        return static_cast<int32_t>(abort_outcome::already_finished);
      auto rp = self->make_response_promise();
      s.end_waiters.push_back(rp);
      if (s.abort_requested)
        return rp;
      s.abort_requested = true;
      // Kill first (the sandbox actor takes it ahead of queued output), then record.
      if (s.sandbox)
        self->send<caf::message_priority::high>(s.sandbox, kill_atom_v);
      auto m = s.meta();
      m.user = user;
      if (!persist(self, schemas::abort_requested(m, reason)))
        return rp;
      if (!s.sandbox)
        finish_task(self);  // still queued: nothing runs, it ends here
      return rp;
    },
  };
}

// -- task manager ----------------------------------------------------------------------------------

/// The job queue: which tasks run, which wait, and in what order they start.
///
/// Fairness: when a slot frees, the next task comes from the user with the fewest running tasks
/// (ties: the user whose oldest waiting task was submitted first), among users below the per-user
/// limit. So one user's 50 tasks never starve another user's first. Positions reported to
/// waiting tasks are projected with the same rule.
struct job_queue {
  struct waiting_task {
    std::string id;
    caf::actor actor;
    uint64_t order;  // submission order
  };

  task_limits limits;
  uint32_t running_total = 0;
  std::map<std::string, uint32_t> running_by_user;
  std::map<std::string, std::deque<waiting_task>> waiting;  // per user, oldest first
  std::map<std::string, std::string> running_user;         // running task id → user
  std::map<std::string, uint32_t> reported;                // waiting task id → last position
  uint64_t next_order = 0;

  uint32_t running_of(const std::string& user) const {
    auto it = running_by_user.find(user);
    return it == running_by_user.end() ? 0 : it->second;
  }

  size_t waiting_of(const std::string& user) const {
    auto it = waiting.find(user);
    return it == waiting.end() ? 0 : it->second.size();
  }

  bool may_start(const std::string& user) const {
    return running_total < limits.max_running && running_of(user) < limits.max_running_per_user;
  }

  void mark_running(const std::string& id, const std::string& user) {
    ++running_total;
    ++running_by_user[user];
    running_user[id] = user;
  }

  /// The user whose task starts next, if any may start now.
  std::optional<std::string> next_user() const {
    std::optional<std::string> best;
    uint32_t best_running = 0;
    uint64_t best_order = 0;
    for (const auto& [user, q] : waiting) {
      if (q.empty() || running_of(user) >= limits.max_running_per_user)
        continue;
      auto r = running_of(user);
      if (!best || r < best_running || (r == best_running && q.front().order < best_order)) {
        best = user;
        best_running = r;
        best_order = q.front().order;
      }
    }
    return best;
  }

  /// Projected start order of every waiting task: id → position (1 = next).
  std::map<std::string, uint32_t> positions() const {
    std::map<std::string, uint32_t> out;
    std::map<std::string, uint32_t> running = running_by_user;
    std::map<std::string, size_t> taken;
    uint32_t pos = 0;
    for (;;) {
      const waiting_task* best = nullptr;
      std::string best_user;
      for (const auto& [user, q] : waiting) {
        size_t i = taken[user];
        if (i >= q.size())
          continue;
        auto r = running[user];
        if (!best || r < running[best_user] ||
            (r == running[best_user] && q[i].order < best->order)) {
          best = &q[i];
          best_user = user;
        }
      }
      if (!best)
        return out;
      out[best->id] = ++pos;
      ++taken[best_user];
      ++running[best_user];
    }
  }

  std::string why_waiting() const {
    return running_total >= limits.max_running ? "global limit" : "per-user limit";
  }
};

struct manager_state {
  static inline const char* name = "ferry.task_manager";
  task_deps deps;
  std::map<std::string, caf::actor> live;
  job_queue queue;
  bool shutting_down = false;
  std::vector<caf::response_promise> shutdown_waiters;
};

using manager_actor_t = caf::stateful_actor<manager_state>;

/// Starts whatever may start now, then tells waiting tasks whose place changed.
void dispatch(manager_actor_t* self) {
  auto& q = self->state.queue;
  while (q.running_total < q.limits.max_running) {
    auto user = q.next_user();
    if (!user)
      break;
    auto& list = q.waiting[*user];
    auto next = std::move(list.front());
    list.pop_front();
    if (list.empty())
      q.waiting.erase(*user);
    q.reported.erase(next.id);
    q.mark_running(next.id, *user);
    self->send(next.actor, run_atom_v);
  }
  for (const auto& [id, pos] : q.positions()) {
    auto& last = q.reported[id];
    if (last == pos)
      continue;
    last = pos;
    for (const auto& [user, list] : q.waiting)
      for (const auto& w : list)
        if (w.id == id)
          self->send(w.actor, queued_atom_v, pos, q.running_total, q.limits.max_running,
                     q.why_waiting());
  }
}

caf::behavior task_manager(manager_actor_t* self, task_deps deps) {
  self->state.deps = deps;
  self->state.queue.limits = deps.limits;
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& s = self->state;
    for (auto it = s.live.begin(); it != s.live.end(); ++it)
      if (it->second.address() == dm.source) {
        const std::string id = it->first;
        s.live.erase(it);
        auto& q = s.queue;
        if (auto r = q.running_user.find(id); r != q.running_user.end()) {
          --q.running_total;
          if (--q.running_by_user[r->second] == 0)
            q.running_by_user.erase(r->second);
          q.running_user.erase(r);
        } else {
          // Ended while waiting (aborted): drop it from its queue.
          for (auto u = q.waiting.begin(); u != q.waiting.end(); ++u) {
            auto& list = u->second;
            list.erase(std::remove_if(list.begin(), list.end(),
                                      [&](const job_queue::waiting_task& w) { return w.id == id; }),
                       list.end());
            if (list.empty()) {
              q.waiting.erase(u);
              break;
            }
          }
          q.reported.erase(id);
        }
        if (!s.shutting_down)
          dispatch(self);
        break;
      }
    if (s.shutting_down && s.live.empty()) {
      for (auto& rp : s.shutdown_waiters)
        rp.deliver(true);
      s.shutdown_waiters.clear();
    }
  });
  return {
    [=](submit_atom, std::string& command, std::string& repo, std::string& user,
        std::string& correlation) -> caf::result<int32_t, std::string, uint32_t> {
      auto& s = self->state;
      if (s.shutting_down)
        return {static_cast<int32_t>(errc::closed),
                std::string("ferryd is shutting down; not accepting tasks"), uint32_t{0}};
      auto& q = s.queue;
      const bool run_now = q.may_start(user) && q.waiting_of(user) == 0;
      if (!run_now && q.waiting_of(user) >= q.limits.max_queued_per_user)
        return {static_cast<int32_t>(errc::busy),
                "too many waiting tasks: " + std::to_string(q.waiting_of(user)) +
                  " of yours are queued (limit " + std::to_string(q.limits.max_queued_per_user) +
                  "); try again later",
                uint32_t{0}};
      auto id = random_hex(8);
      task_request req{std::move(command), std::move(repo), user, std::move(correlation)};
      auto task = self->spawn<caf::monitored>(task_actor, s.deps, id, std::move(req));
      s.live.emplace(id, task);
      uint32_t position = 0;
      std::string why;
      if (run_now) {
        q.mark_running(id, user);
      } else {
        q.waiting[user].push_back({id, task, q.next_order++});
        position = q.positions()[id];
        q.reported[id] = position;
        why = q.why_waiting();
      }
      auto rp = self->make_response_promise<int32_t, std::string, uint32_t>();
      self
        ->request(task, caf::infinite, start_atom_v, position, q.running_total,
                  q.limits.max_running, std::move(why))
        .then(
          [rp, position](bool ok, std::string& text) mutable {
            rp.deliver(static_cast<int32_t>(ok ? 0 : static_cast<int>(errc::failed)),
                       std::move(text), position);
          },
          [rp](caf::error& err) mutable {
            rp.deliver(static_cast<int32_t>(errc::failed),
                       "task failed to start: " + to_string(err), uint32_t{0});
          });
      // A new waiting task may move others back (it can go ahead of a busier user's).
      if (!run_now)
        dispatch(self);
      return rp;
    },
    [=](steer_atom, std::string& id, std::string& user,
        std::string& text) -> caf::result<int32_t, std::string, uint64_t> {
      auto& s = self->state;
      auto it = s.live.find(id);
      if (it == s.live.end())
        return {static_cast<int32_t>(errc::not_found), "no live task " + id, uint64_t{0}};
      auto rp = self->make_response_promise<int32_t, std::string, uint64_t>();
      self->request(it->second, caf::infinite, steer_atom_v, std::move(user), std::move(text))
        .then(
          [rp](int32_t code, std::string& message, uint64_t seq) mutable {
            rp.deliver(code, std::move(message), seq);
          },
          [rp](caf::error& err) mutable {
            rp.deliver(static_cast<int32_t>(errc::failed), "steer: " + to_string(err),
                       uint64_t{0});
          });
      return rp;
    },
    [=](abort_atom, std::string& id, std::string& user, std::string& reason) -> caf::result<int32_t> {
      auto& s = self->state;
      auto it = s.live.find(id);
      if (it == s.live.end())
        return static_cast<int32_t>(abort_outcome::not_found);
      auto rp = self->make_response_promise<int32_t>();
      self->request(it->second, caf::infinite, abort_atom_v, std::move(reason), std::move(user))
        .then([rp](int32_t outcome) mutable { rp.deliver(outcome); },
              [rp](caf::error&) mutable {
                // The task stopped without answering (its journal failed): nothing to report.
                rp.deliver(static_cast<int32_t>(abort_outcome::pending));
              });
      return rp;
    },
    [=](count_atom) { return static_cast<uint64_t>(self->state.live.size()); },
    [=](shutdown_atom) -> caf::result<bool> {
      auto& s = self->state;
      s.shutting_down = true;
      if (s.live.empty())
        return true;
      // Anonymous: the tasks' answers (their abort outcomes) are not needed here; their ends
      // arrive as down messages.
      for (auto& [id, task] : s.live)
        caf::anon_send<caf::message_priority::high>(task, abort_atom_v,
                                                    std::string("ferryd shutting down"),
                                                    std::string("system"));
      auto rp = self->make_response_promise<bool>();
      s.shutdown_waiters.push_back(rp);
      return rp;
    },
  };
}

/// Finishes tasks an earlier ferryd left unfinished (it stopped or crashed while they ran).
result<size_t> recover_interrupted_tasks(const task_deps& d) {
  auto streams = d.store->list_streams("task-");
  if (!streams)
    return streams.error();
  size_t n = 0;
  for (const auto& stream : *streams) {
    auto head = d.store->highest_sequence(stream);
    if (!head)
      return head.error();
    auto last = d.store->read_stream(stream, *head, 1);
    if (!last)
      return last.error();
    if (last->empty())
      continue;
    auto e = schemas::verify_envelope(last->front());
    if (!e)
      return fail("recover " + stream + ": " + e.error().message);
    if ((*e)->event_type() == ev::Event::TaskFinished)
      continue;
    auto id = stream.substr(5);
    auto view = load_task_view(*d.store, id);
    if (!view)
      return view.error();
    envelope_meta m{stream, "", "", "system"};
    std::vector<std::string> envs;
    const auto& v = **view;
    if (!v.sandbox_id.empty() && v.sandbox_status != "terminated" && v.sandbox_status != "failed") {
      ev::SandboxStatus from = ev::SandboxStatus::none;
      for (auto st : {ev::SandboxStatus::spawning, ev::SandboxStatus::executing,
                      ev::SandboxStatus::terminating})
        if (schemas::to_string(st) == v.sandbox_status)
          from = st;
      envs.push_back(schemas::sandbox_state_changed(m, v.sandbox_id, v.sandbox_backend, from,
                                                    ev::SandboxStatus::failed,
                                                    "ferryd stopped while the sandbox ran"));
    }
    envs.push_back(schemas::task_finished(m, ev::TaskStatus::failed, -1,
                                          "interrupted: ferryd stopped while the task ran"));
    if (auto r = record(d, stream, envs,
                        storage::expected_version::exact(*head));
        !r)
      return r.error();
    ++n;
  }
  return n;
}

class caf_task_service final : public task_service {
 public:
  caf_task_service(caf::actor_system& sys, caf::actor mgr) : sys_(sys), mgr_(std::move(mgr)) {}
  ~caf_task_service() override { caf::anon_send_exit(mgr_, caf::exit_reason::user_shutdown); }

  result<submission> submit(const task_request& req) override {
    caf::scoped_actor self{sys_};
    result<submission> out = fail("task manager did not answer");
    self
      ->request(mgr_, std::chrono::seconds(30), submit_atom_v, req.command, req.repo, req.user,
                req.correlation_id)
      .receive(
        [&](int32_t code, std::string& text, uint32_t position) {
          if (code == 0)
            out = submission{std::move(text), position};
          else
            out = fail(static_cast<errc>(code), std::move(text));
        },
        [&](caf::error& err) { out = fail("submit: " + to_string(err)); });
    return out;
  }

  result<abort_outcome> abort(const std::string& task_id, const std::string& user,
                              const std::string& reason, std::chrono::milliseconds wait) override {
    caf::scoped_actor self{sys_};
    result<abort_outcome> out = fail("task manager did not answer");
    self->request(mgr_, wait, abort_atom_v, task_id, user, reason)
      .receive([&](int32_t outcome) { out = static_cast<abort_outcome>(outcome); },
               [&](caf::error& err) {
                 if (err == caf::sec::request_timeout)
                   out = abort_outcome::pending;
                 else
                   out = fail("abort " + task_id + ": " + to_string(err));
               });
    return out;
  }

  void abort_async(const std::string& task_id, const std::string& user, const std::string& reason,
                   std::chrono::milliseconds wait, abort_callback done) override {
    // The manager goes in as a spawn argument: CAF 0.17 dereferences a null argument tuple
    // when a function actor takes none (UBSan flags it).
    sys_.spawn(
      [=](caf::event_based_actor* self, caf::actor mgr) {
        self->request(mgr, wait, abort_atom_v, task_id, user, reason)
          .then([=](int32_t outcome) { done(static_cast<abort_outcome>(outcome)); },
                [=](caf::error& err) {
                  if (err == caf::sec::request_timeout)
                    done(abort_outcome::pending);
                  else
                    done(fail("abort " + task_id + ": " + to_string(err)));
                });
      },
      mgr_);
  }

  void steer_async(const std::string& task_id, const std::string& user, const std::string& text,
                   steer_callback done) override {
    sys_.spawn(
      [=](caf::event_based_actor* self, caf::actor mgr) {
        self->request(mgr, std::chrono::seconds(30), steer_atom_v, task_id, user, text)
          .then(
            [=](int32_t code, std::string& message, uint64_t seq) {
              if (code == 0)
                done(seq);
              else
                done(fail(static_cast<errc>(code), std::move(message)));
            },
            [=](caf::error& err) { done(fail("steer " + task_id + ": " + to_string(err))); });
      },
      mgr_);
  }

  size_t running() override {
    caf::scoped_actor self{sys_};
    size_t n = 0;
    self->request(mgr_, std::chrono::seconds(10), count_atom_v)
      .receive([&](uint64_t count) { n = count; }, [&](caf::error&) {});
    return n;
  }

  result<void> shutdown(std::chrono::milliseconds wait) override {
    caf::scoped_actor self{sys_};
    result<void> out;
    self->request(mgr_, wait, shutdown_atom_v)
      .receive([&](bool) {},
               [&](caf::error& err) { out = fail("shut down tasks: " + to_string(err)); });
    return out;
  }

 private:
  caf::actor_system& sys_;
  caf::actor mgr_;
};

}  // namespace

void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_types<caf::id_block::ferry>();
}

result<std::unique_ptr<task_service>> start_task_manager(caf::actor_system& sys, task_deps deps) {
  if (!deps.store || !deps.runtime)
    return fail("start task manager: journal and sandbox runtime are required");
  auto recovered = recover_interrupted_tasks(deps);
  if (!recovered)
    return fail("recover interrupted tasks: " + recovered.error().message);
  if (*recovered > 0)
    std::fprintf(stderr, "ferryd: marked %zu interrupted task(s) as failed\n", *recovered);
  auto mgr = sys.spawn(task_manager, deps);
  return std::unique_ptr<task_service>(new caf_task_service(sys, mgr));
}

}  // namespace ferry::actors
