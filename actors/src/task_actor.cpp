// The task actor: the single writer of task-<id>, the task's timeline. It records its own facts
// and mirrors those of its session and sandbox actors (which keep their own streams), so the
// timeline a user follows is one stream. See actors.h and ferry/actors/lifecycle.h.

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "actors.h"

namespace ferry::actors {

namespace {

using task_actor_t = caf::stateful_actor<task_state>;
using TS = ev::TaskStatus;

void hit(task_actor_t* self, std::string_view point) {
  if (self->state.fault)
    self->state.fault(point, self->state.view.id);
}


/// Request refused: a transition lifecycle.h forbids, or one the task cannot take now (it is
/// ending). Recorded as transition_refused — nothing else changes — then `answer` tells the
/// requester. Before its submission a task has no timeline to record it in: only the answer.
void refuse(task_actor_t* self, TS to, const std::string& why, std::function<void()> answer) {
  auto& s = self->state;
  const std::string from = s.view.status.empty() ? "none" : s.view.status;
  std::fprintf(stderr, "ferryd: task %s: refused transition %s -> %s: %s\n", s.view.id.c_str(),
               from.c_str(), std::string(schemas::to_string(to)).c_str(), why.c_str());
  if (s.view.status.empty()) {
    if (answer)
      answer();
    return;
  }
  persist(self, schemas::transition_refused(s.meta(), "task", from, schemas::to_string(to), why),
          [answer = std::move(answer)](const storage::append_result&) {
            if (answer)
              answer();
          });
}

/// True when the lifecycle lets the task go from its recorded status to `to`.
bool may_become(const task_state& s, TS to) {
  auto from = parse_task_status(s.view.status);
  return from && task_transition_allowed(*from, to);
}

/// The actor stops before the task's end is recorded (the journal failed, or a newer
/// incarnation fenced it out): everyone waiting for this one gets an answer.
void answer_waiters(task_actor_t* self, const std::string& why) {
  auto& s = self->state;
  for (auto& rp : s.end_waiters)
    rp.deliver(static_cast<int32_t>(abort_outcome::pending));
  s.end_waiters.clear();
  for (auto& rp : s.refused_aborts)
    rp.deliver(static_cast<int32_t>(abort_outcome::pending));
  s.refused_aborts.clear();
  if (s.start_rp)
    s.start_rp->deliver(false, why);
  s.start_rp.reset();
}

/// The journal refused an event (not a fence): the task cannot go on. Kills its sandbox and
/// stops, loudly; everyone waiting gets an answer.
void persist_failed(task_actor_t* self, const error_info& e) {
  auto& s = self->state;
  std::fprintf(stderr, "ferryd: error: task %s: cannot record event: %s\n", s.view.id.c_str(),
               e.message.c_str());
  if (s.sandbox)
    self->send<caf::message_priority::high>(s.sandbox, kill_atom_v);
  answer_waiters(self, e.message);
  self->quit(caf::make_error(caf::sec::runtime_error, e.message));
}

/// Records the task's end (after closing its session) and stops. `outcome` answers the aborts
/// waiting for the end: aborted only when the task did end aborted (an abort that came while it
/// was already ending otherwise is told it came too late).
void record_end(task_actor_t* self, std::vector<std::string> envs, abort_outcome outcome) {
  persist(self, std::move(envs), [self, outcome](const storage::append_result&) {
    for (auto& rp : self->state.end_waiters)
      rp.deliver(static_cast<int32_t>(outcome));
    self->state.end_waiters.clear();
    self->quit();
  });
}

/// Ends the session's turn or closes it, then runs `then` (also when there is no session). `then`
/// may persist: from the session's answer (a response handler, which CAF runs even while a
/// persist is in flight) it goes through when_idle.
void settle_session(task_actor_t* self, bool close, std::string outcome,
                    std::function<void()> then) {
  auto& s = self->state;
  if (!s.session)
    return when_idle(self, std::move(then));
  auto session = s.session;
  if (close)
    self->request(session, std::chrono::seconds(30), close_atom_v, outcome)
      .then(
        [self, then](bool) {
          self->state.session = nullptr;
          when_idle(self, then);
        },
        [self, then](caf::error&) {
          self->state.session = nullptr;
          when_idle(self, then);
        });
  else
    self->request(session, std::chrono::seconds(30), turn_end_atom_v, outcome, uint64_t{0},
                  uint64_t{0})
      .then(
        [self, session, then](bool) {
          // Resumable: the session stays open for a later turn; this actor lets it go.
          self->send_exit(session, caf::exit_reason::user_shutdown);
          self->state.session = nullptr;
          when_idle(self, then);
        },
        [self, then](caf::error&) {
          self->state.session = nullptr;
          when_idle(self, then);
        });
}

/// `ms` the way a person writes it: "4h", "15m", "90s", "1500ms".
std::string format_duration(uint64_t ms) {
  if (ms != 0 && ms % 3'600'000 == 0)
    return std::to_string(ms / 3'600'000) + "h";
  if (ms != 0 && ms % 60'000 == 0)
    return std::to_string(ms / 60'000) + "m";
  if (ms != 0 && ms % 1000 == 0)
    return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
           std::chrono::system_clock::now().time_since_epoch())
    .count();
}

/// The reason a task that ran out of wall-clock time fails with.
std::string wall_clock_failure(uint64_t limit_ms) {
  return "wall-clock limit of " + format_duration(limit_ms) + " reached";
}

/// True when the task's wall-clock limit is already recorded as reached for its current run
/// (limit_reached after its latest change to running): a recovered actor must not record it
/// again, only finish what it caused.
bool wall_clock_recorded(const task_view& v) {
  return std::any_of(v.limits_reached.begin(), v.limits_reached.end(), [&](const limit_hit& l) {
    return l.kind == schemas::to_string(ev::LimitKind::task_wall_clock) &&
           l.time_ns >= v.running_since_ns;
  });
}

void finish_task(task_actor_t* self, std::optional<std::string> forced_failure = std::nullopt) {
  auto& s = self->state;
  if (s.finishing)
    return;
  TS status;
  std::string reason;
  if (forced_failure) {
    status = TS::failed;
    reason = *forced_failure;
  } else if (!s.limit_failure.empty()) {
    status = TS::failed;
    reason = s.limit_failure;
  } else if (s.aborting || s.view.abort_requested) {
    status = TS::aborted;
    reason = "aborted on request";
  } else if (!s.sandbox_failure.empty()) {
    status = TS::failed;
    reason = "sandbox failed: " + s.sandbox_failure;
  } else if (s.exit_code && *s.exit_code == 0) {
    status = TS::succeeded;
  } else {
    status = TS::failed;
    reason = s.exit_code ? "command exited with status " + std::to_string(*s.exit_code)
                         : "command was killed";
  }
  if (!may_become(s, status)) {
    // E.g. a sandbox's end reported to a task that is queued or interrupted (no turn runs).
    refuse(self, status,
           (reason.empty() ? std::string("command succeeded") : reason) + ", but the task is " +
             (s.view.status.empty() ? std::string("not submitted") : s.view.status),
           {});
    return;
  }
  s.finishing = true;
  settle_session(self, true, std::string(schemas::to_string(status)), [self, status, reason] {
    auto& s = self->state;
    record_end(self, {schemas::task_finished(s.meta(), status, s.exit_code.value_or(-1), reason)},
               status == TS::aborted ? abort_outcome::aborted : abort_outcome::already_finished);
  });
}

/// The task cannot go on here (ferryd restarted and the sandbox is gone): interrupted, resumable.
void interrupt(task_actor_t* self, std::string reason) {
  auto& s = self->state;
  if (s.finishing)
    return;
  if (!may_become(s, TS::interrupted)) {
    refuse(self, TS::interrupted, reason + ", but the task is " + s.view.status, {});
    return;
  }
  s.finishing = true;
  settle_session(self, false, "interrupted", [self, reason] {
    auto& s = self->state;
    auto m = s.meta();
    m.user = "system";
    record_end(self,
               {schemas::task_interrupted(m, reason, true),
                schemas::task_finished(m, TS::interrupted, -1, "interrupted: " + reason)},
               abort_outcome::already_finished);
  });
}

/// Arms the wall-clock timer for the task's current run: it fires when the limit recorded in
/// task_submitted is up, counted from the task's latest change to running (the recorded
/// timestamp, so a recovered actor re-arms with the time that is left; at once when none is).
/// REQUIRES: the task is running.
void arm_wall_clock(task_actor_t* self) {
  auto& s = self->state;
  const uint64_t arm = ++s.wall_clock_arms;
  if (s.view.wall_clock_limit_ms == 0 || s.view.running_since_ns == 0)
    return;  // submitted before limits were recorded
  // Capped at ten years: nothing runs that long, and the deadline must not overflow.
  const int64_t limit_ns =
    static_cast<int64_t>(std::min<uint64_t>(s.view.wall_clock_limit_ms, 315'360'000'000ULL)) *
    1'000'000;
  const int64_t left_ns = s.view.running_since_ns + limit_ns - now_ns();
  if (left_ns <= 0) {
    self->send(self, wall_clock_atom_v, arm);
    return;
  }
  self->delayed_send(self,
                     std::chrono::ceil<std::chrono::milliseconds>(std::chrono::nanoseconds(left_ns)),
                     wall_clock_atom_v, arm);
}

/// The wall-clock limit is up: records limit_reached first (the user sees why before anything
/// dies), then kills the sandbox the way an abort does; the task fails once the sandbox is gone.
void reach_wall_clock(task_actor_t* self) {
  auto& s = self->state;
  const uint64_t limit = s.view.wall_clock_limit_ms;
  s.limit_failure = wall_clock_failure(limit);
  auto m = s.meta();
  m.user = "system";
  const auto detail = "running since " + schemas::iso_time(s.view.running_since_ns) +
                      "; the task and its sandbox are stopped";
  persist(self,
          schemas::limit_reached(m, ev::LimitKind::task_wall_clock, limit, 0, true, detail),
          [self](const storage::append_result&) {
            auto& s = self->state;
            if (s.sandbox)
              self->send<caf::message_priority::high>(s.sandbox, kill_atom_v);
            else if (!s.turn_pending)
              finish_task(self);  // no sandbox runs: it ends here
            // else: the turn's answer sees limit_failure and finishes the task
          });
}

/// Spawns the task's sandbox actor (monitored): the real one, detached (it makes blocking runtime
/// calls), or what the tests put in task_args::spawn_sandbox.
caf::actor spawn_sandbox(task_actor_t* self, sandbox_args a) {
  auto& s = self->state;
  a.synchronous_journal = s.journal.synchronous;
  if (!s.spawn_sandbox)
    return self->spawn<caf::detached + caf::monitored>(sandbox_actor, std::move(a));
  auto sandbox = s.spawn_sandbox(std::move(a));
  self->monitor(sandbox);
  return sandbox;
}

void start_sandbox(task_actor_t* self) {
  auto& s = self->state;
  sandbox_args a;
  a.store = s.deps.store;
  a.runtime = s.deps.runtime;
  a.task = caf::actor{self};
  a.id = "ferry-" + s.view.id + "-" + std::to_string(s.sandboxes + 1);
  a.task_id = s.view.id;
  a.argv = {"/bin/sh", "-c", s.view.command};
  a.warm = s.deps.warm;
  a.repo = s.view.repo;
  a.user = s.view.user;
  a.git = s.deps.git;
  if (!s.view.environment.empty()) {
    // As configured now (a queued or resumed task gets the current setup); gone from the
    // configuration since the submission: the sandbox fails and says so.
    a.environment_name = s.view.environment;
    if (auto it = s.deps.environments.find(s.view.environment); it != s.deps.environments.end())
      a.environment = it->second;
    a.layers = s.deps.layers;
  }
  s.sandbox = spawn_sandbox(self, std::move(a));
  self->send(s.sandbox, start_atom_v);
}

void ensure_session(task_actor_t* self) {
  auto& s = self->state;
  if (s.session)
    return;
  session_args a;
  a.store = s.deps.store;
  a.task_id = s.view.id;
  a.user = s.view.user;
  a.steering = s.steering;
  a.synchronous_journal = s.journal.synchronous;
  s.session = self->spawn<caf::monitored>(session_actor, std::move(a));
}

/// A turn: the session opens it (taking pending steering comments), then a fresh sandbox runs
/// the task's command.
void begin_turn(task_actor_t* self) {
  auto& s = self->state;
  hit(self, "begin_turn");
  ensure_session(self);
  s.exit_code.reset();
  s.sandbox_failure.clear();
  s.turn_pending = true;
  const auto sandbox_id = "ferry-" + s.view.id + "-" + std::to_string(s.sandboxes + 1);
  self->request(s.session, std::chrono::seconds(30), turn_begin_atom_v, s.view.command, sandbox_id)
    .then(
      [self](uint32_t, std::vector<std::string>&) {
        when_idle(self, [self] {
          auto& s = self->state;
          s.turn_pending = false;
          if (s.aborting || s.finishing || !s.limit_failure.empty())
            return finish_task(self);
          start_sandbox(self);
        });
      },
      [self](caf::error& err) {
        when_idle(self, [self, why = to_string(err)] {
          self->state.turn_pending = false;
          finish_task(self, "the session refused a new turn: " + why);
        });
      });
}

/// The sandbox reached its end (terminated or failed).
void sandbox_gone(task_actor_t* self) {
  auto& s = self->state;
  s.sandbox = nullptr;
  finish_task(self);
}

/// After recovery: carry on from the recovered state.
void carry_on(task_actor_t* self, const task_args& args) {
  auto& s = self->state;
  auto status = parse_task_status(s.view.status);
  if (!status || (task_status_terminal(*status) && *status != TS::interrupted)) {
    // Ended for good: nothing to carry on. An abort that came while this actor recovered is
    // told so (CAF answers the other requests with an error once the actor has stopped).
    for (auto& rp : s.refused_aborts)
      rp.deliver(static_cast<int32_t>(abort_outcome::already_finished));
    s.refused_aborts.clear();
    self->quit();
    return;
  }
  if (args.fail_reason) {
    if (*status == TS::running)
      ensure_session(self);
    finish_task(self, *args.fail_reason);
    return;
  }
  if (*status != TS::running)
    return;  // queued or interrupted: waits for run (the manager's queue)
  // The wall clock keeps running across a restart: re-armed with the time left, or — when the
  // limit was already recorded as reached — what it causes is carried out now.
  if (wall_clock_recorded(s.view))
    s.limit_failure = wall_clock_failure(s.view.wall_clock_limit_ms);
  else
    arm_wall_clock(self);
  s.exit_code = s.view.exit_code;
  if (s.view.sandbox_status == "failed")
    s.sandbox_failure = s.view.sandbox_reason;
  ensure_session(self);
  const bool sandbox_live = !s.view.sandbox_id.empty() && s.view.sandbox_status != "terminated" &&
                            s.view.sandbox_status != "failed";
  if (sandbox_live) {
    // Its actor records what became of it (re-attached, or lost) and reports here.
    sandbox_args a;
    a.store = s.deps.store;
    a.runtime = s.deps.runtime;
    a.task = caf::actor{self};
    a.id = s.view.sandbox_id;
    a.task_id = s.view.id;
    // A re-attached sandbox with a repository gets a fresh git credential (the proxy's are gone).
    a.repo = s.view.repo;
    a.user = s.view.user;
    a.git = s.deps.git;
    a.recover_reason = args.recover_reason;
    a.attachable = args.sandbox_attachable;
    a.resume.command_id = 1;
    a.resume.stdout_bytes = s.output_bytes[0];
    a.resume.stderr_bytes = s.output_bytes[1];
    s.recovering_sandbox = true;
    s.sandbox = spawn_sandbox(self, std::move(a));
    // The abort came while this actor recovered, before it had a sandbox; or the wall-clock
    // limit was reached before the restart.
    if (s.aborting || !s.limit_failure.empty())
      self->send<caf::message_priority::high>(s.sandbox, kill_atom_v);
    return;
  }
  if (s.view.sandbox_status == "terminated" || s.view.sandbox_status == "failed") {
    // The sandbox ended before the crash; only the task's end was not recorded yet.
    finish_task(self);
    return;
  }
  // Running, but no sandbox was started yet (the crash came between).
  if (!s.limit_failure.empty())
    finish_task(self);
  else if (s.rerun_lost_turn)
    begin_turn(self);
  else
    interrupt(self, "ferryd stopped before the task's sandbox started");
}

}  // namespace

caf::behavior task_actor(task_actor_t* self, task_args args) {
  auto& s = self->state;
  s.deps = args.deps;
  s.fault = args.fault;
  s.view.id = args.id;
  s.journal.store = args.deps.store;
  s.journal.stream = "task-" + args.id;
  s.journal.on_failure = [self](const error_info& e) { persist_failed(self, e); };
  s.journal.on_stop = [self] { answer_waiters(self, std::string(fenced_reason)); };
  s.journal.synchronous = args.synchronous_journal;
  s.spawn_sandbox = args.spawn_sandbox;
  s.rerun_lost_turn = args.rerun_lost_turn;
  if (!args.recover_reason) {
    s.view.command = args.req.command;
    s.view.repo = args.req.repo;
    s.view.environment = args.req.environment;
    if (auto it = args.deps.environments.find(args.req.environment); it != args.deps.environments.end())
      s.view.environment_key = sandbox::environment_key(it->second);
    s.view.user = args.req.user;
    s.correlation = args.req.correlation_id;
    const auto limit = args.req.wall_clock_limit.count() > 0 ? args.req.wall_clock_limit
                                                             : args.deps.default_wall_clock;
    s.view.wall_clock_limit_ms = static_cast<uint64_t>(std::max<int64_t>(0, limit.count()));
  }

  // A crash keeps its message: the supervisor logs it and, after repeated crashes, fails the
  // task with it.
  self->set_exception_handler([](caf::scheduled_actor*, std::exception_ptr& eptr) -> caf::error {
    try {
      std::rethrow_exception(eptr);
    } catch (const std::exception& e) {
      return caf::make_error(caf::sec::runtime_error, std::string("exception: ") + e.what());
    } catch (...) {
      return caf::make_error(caf::sec::runtime_error, std::string("unknown exception"));
    }
  });
  self->set_down_handler([=](caf::down_msg& dm) {
    // Handled in order with everything else (a down message is not stashed by CAF).
    self->send(self, down_atom_v, caf::actor_cast<caf::strong_actor_ptr>(dm.source) != nullptr,
               dm.source == self->state.sandbox.address(), to_string(dm.reason));
  });

  // Abort, the urgent part: the kill goes out at once, even while a persist is in flight. The
  // records follow in order (abort_rec, or abort_refused for a task that has ended).
  auto begin_abort = [=](caf::response_promise rp, std::string reason, std::string user) {
    auto& s = self->state;
    s.end_waiters.push_back(std::move(rp));
    if (s.aborting || s.finishing || !s.limit_failure.empty())
      return;  // ending already (a limit reached ends it failed: the abort is answered so)
    s.aborting = true;
    if (s.sandbox)
      self->send<caf::message_priority::high>(s.sandbox, kill_atom_v);
    self->send(self, abort_rec_atom_v, std::move(reason), std::move(user));
  };
  auto abort = [=](std::string& reason, std::string& user) -> caf::result<int32_t> {
    auto& s = self->state;
    auto rp = self->make_response_promise();
    if (s.view.finished && !s.finishing) {
      // Ended (interrupted, waiting for a resume): <status> → aborted is forbidden.
      s.refused_aborts.push_back(rp);
      self->send(self, abort_refused_atom_v, std::move(reason), std::move(user));
      return rp;
    }
    begin_abort(rp, std::move(reason), std::move(user));
    return rp;
  };
  s.journal.urgent = caf::message_handler{
    [=](abort_atom, std::string& reason, std::string& user) { return abort(reason, user); }};

  if (args.recover_reason) {
    auto loaded = load(s);
    if (!loaded || !*loaded) {
      std::fprintf(stderr, "ferryd: error: recover task %s: %s\n", args.id.c_str(),
                   loaded ? "no such task" : loaded.error().message.c_str());
      self->quit(caf::make_error(caf::sec::runtime_error, "cannot recover task " + args.id));
      return {};
    }
    self->send<caf::message_priority::high>(self, fence_atom_v);
  }

  return {
    [=](fence_atom) {
      fence(self, *args.recover_reason,
            [self, args](const storage::append_result&) { carry_on(self, args); });
    },
    [=](start_atom, uint32_t position, uint32_t running, uint32_t limit,
        std::string& why) -> caf::result<bool, std::string> {
      // Submission: durable before the id is handed out. Position 0: a slot is free, run now;
      // else wait for run_atom from the manager.
      auto& s = self->state;
      if (!s.view.status.empty()) {
        // Submitted once only: a second submission asks for <status> → queued.
        auto rp = self->make_response_promise<bool, std::string>();
        auto why = "submitted again, but the task is " + s.view.status;
        refuse(self, TS::queued, why, [rp, why]() mutable {
          rp.deliver(caf::make_error(caf::sec::runtime_error, why));
        });
        return rp;
      }
      auto m = s.meta();
      std::vector<std::string> envs{
        schemas::task_submitted(m, s.view.id, s.view.command, s.view.repo,
                                s.view.wall_clock_limit_ms, s.view.environment,
                                s.view.environment_key)};
      if (position == 0)
        envs.push_back(schemas::task_state_changed(m, TS::queued, TS::running, ""));
      else
        envs.push_back(schemas::task_queued(m, position, running, limit, why));
      auto rp = self->make_response_promise<bool, std::string>();
      s.start_rp = rp;
      persist(self, std::move(envs), [self, position](const storage::append_result&) {
        auto& s = self->state;
        s.start_rp->deliver(true, s.view.id);
        s.start_rp.reset();
        if (position == 0) {
          arm_wall_clock(self);
          begin_turn(self);
        }
      });
      return rp;
    },
    [=](run_atom) -> caf::result<bool> {
      // A slot is free: queued → running, or (resume) interrupted → running.
      auto& s = self->state;
      auto rp = self->make_response_promise<bool>();
      std::string refused;
      if (s.view.status.empty())
        refused = "run requested, but the task is not submitted";
      else if (!may_become(s, TS::running))
        refused = "run requested, but the task is " + s.view.status;
      else if (s.aborting || s.finishing)
        refused = "run requested, but the task is ending (an abort came first)";
      else if (s.sandbox || s.turn_pending)
        refused = "run requested, but a turn is already under way";
      if (!refused.empty()) {
        refuse(self, TS::running, refused, [rp, refused]() mutable {
          rp.deliver(caf::make_error(caf::sec::runtime_error, refused));
        });
        return rp;
      }
      auto from = *parse_task_status(s.view.status);
      auto why = from == TS::interrupted ? std::string("resumed") : std::string();
      persist(self, schemas::task_state_changed(s.meta(), from, TS::running, why),
              [self, rp](const storage::append_result&) mutable {
                rp.deliver(true);
                arm_wall_clock(self);
                begin_turn(self);
              });
      return rp;
    },
    [=](queued_atom, uint32_t position, uint32_t running, uint32_t limit, std::string& why) {
      // A waiting task's place in the queue. A resumed task that must wait for a slot is
      // recorded as queued again (interrupted → queued): it can be aborted like any waiting
      // task, and a restart of ferryd puts it back in the queue instead of losing the resume.
      auto& s = self->state;
      if (s.finishing || s.aborting || s.sandbox || position == 0)
        return;
      std::vector<std::string> envs;
      if (s.view.status == "interrupted" && s.view.resumable)
        envs.push_back(schemas::task_state_changed(s.meta(), TS::interrupted, TS::queued,
                                                   "resumed; waiting for a slot"));
      else if (s.view.status != "queued")
        return;
      envs.push_back(schemas::task_queued(s.meta(), position, running, limit, why));
      persist(self, std::move(envs), [](const storage::append_result&) {});
    },
    [=](sbx_state_atom, int8_t from, int8_t to, std::string& reason, std::string& backend,
        std::string& sandbox_id) {
      hit(self, "sandbox_state");
      auto& s = self->state;
      auto to_status = static_cast<ev::SandboxStatus>(to);
      // The timeline's chain continues from what the task last recorded for this sandbox (a
      // recovered sandbox reports its state, which the task may have missed while it was down).
      auto from_status = static_cast<ev::SandboxStatus>(from);
      if (s.view.sandbox_id == sandbox_id)
        for (auto st : {ev::SandboxStatus::spawning, ev::SandboxStatus::initializing,
                        ev::SandboxStatus::cloning, ev::SandboxStatus::ready,
                        ev::SandboxStatus::executing, ev::SandboxStatus::pushing,
                        ev::SandboxStatus::terminating, ev::SandboxStatus::terminated,
                        ev::SandboxStatus::failed})
          if (schemas::to_string(st) == s.view.sandbox_status)
            from_status = st;
      auto after = [self, to_status, reason] {
        auto& s = self->state;
        if (to_status == ev::SandboxStatus::failed)
          s.sandbox_failure = reason.empty() ? "unknown reason" : reason;
        if (!sandbox_status_terminal(to_status))
          return;
        const bool lost = std::exchange(s.recovering_sandbox, false) && !s.exit_code;
        if (lost && !s.aborting && !s.finishing && s.limit_failure.empty()) {
          // Recovered, and its sandbox ended before the command did: run the turn again (the
          // actor crashed) or stop resumably (ferryd restarted).
          s.sandbox = nullptr;
          if (s.rerun_lost_turn) {
            s.sandbox_failure.clear();
            self->request(s.session, std::chrono::seconds(30), turn_end_atom_v,
                          std::string("interrupted"), uint64_t{0}, uint64_t{0})
              .then([self](bool) { when_idle(self, [self] { begin_turn(self); }); },
                    [self](caf::error& e) {
                      when_idle(self, [self, why = to_string(e)] {
                        finish_task(self, "session: " + why);
                      });
                    });
          } else {
            interrupt(self, "ferryd stopped while the task ran and its sandbox is gone");
          }
          return;
        }
        sandbox_gone(self);
      };
      if (from_status == to_status && s.view.sandbox_id == sandbox_id)
        return after();  // nothing new for the timeline
      const std::string runtime_id = s.pooled.first == sandbox_id ? s.pooled.second
                                     : s.view.sandbox_id == sandbox_id ? s.view.sandbox_runtime_id
                                                                       : std::string();
      persist(self,
              schemas::sandbox_state_changed(s.meta(), sandbox_id, backend, from_status,
                                             to_status, reason, runtime_id),
              [after](const storage::append_result&) { after(); });
    },
    [=](pooled_atom, std::string& sandbox_id, std::string& runtime_id) {
      // Ahead of its state changes (same sender): they record the runtime's id with them.
      self->state.pooled = {std::move(sandbox_id), std::move(runtime_id)};
    },
    [=](cmd_start_atom, uint32_t cmd, std::vector<std::string>& argv) {
      persist(self, schemas::command_started(self->state.meta(), cmd, argv),
              [](const storage::append_result&) {});
    },
    [=](output_atom, std::vector<output_piece>& batch) -> caf::result<bool> {
      // One append (one fsync) for the whole batch; the answer lets the sandbox send the next.
      hit(self, "output");
      auto m = self->state.meta();
      std::vector<std::string> envs;
      envs.reserve(batch.size());
      for (auto& p : batch)
        envs.push_back(schemas::output_chunk(
          m, p.command_id, p.stream == 1 ? ev::OutputStream::stderr : ev::OutputStream::stdout,
          p.data, p.gap));
      auto rp = self->make_response_promise<bool>();
      persist(self, std::move(envs),
              [rp](const storage::append_result&) mutable { rp.deliver(true); });
      return rp;
    },
    [=](cmd_exit_atom, uint32_t cmd, int32_t code, int32_t sig, uint64_t ms) {
      auto& s = self->state;
      // The setup's and the clone's failures are the sandbox's.
      if (sig == 0 && cmd != setup_command_id && !is_ferry_command(cmd))
        s.exit_code = code;
      persist(self, schemas::command_exited(s.meta(), cmd, code, sig, ms),
              [](const storage::append_result&) {});
    },
    [=](limit_atom, const std::string& kind, uint64_t limit, uint64_t count, bool whole, uint32_t cmd,
        const std::string& detail) {
      // The sandbox's cgroup counted a limit, or its disk filled up: recorded on the task's stream, before the
      // command's exit or the sandbox's end that it may have caused.
      auto m = self->state.meta();
      m.user = "system";
      const auto k = kind == "pids"   ? ev::LimitKind::pids
                     : kind == "disk" ? ev::LimitKind::disk_quota
                                      : ev::LimitKind::memory;
      const std::string text = count > 1 && k == ev::LimitKind::memory ? detail + " (" + std::to_string(count) + " times)" : detail;
      persist(self, schemas::limit_reached(m, k, limit, cmd, whole, text),
              [](const storage::append_result&) {});
    },
    [=](egress_atom, const schemas::egress_decision_fields& d) {
      // What the egress proxy decided for one of the task's sandboxes (or its setup's).
      auto m = self->state.meta();
      m.user = "system";
      persist(self, schemas::egress_decision(m, d), [](const storage::append_result&) {});
    },
    [=](git_atom, const schemas::git_operation_fields& g) {
      // A request of one of the task's sandboxes through the git proxy: the audit record.
      auto m = self->state.meta();
      m.user = "system";
      persist(self, schemas::git_operation(m, g), [](const storage::append_result&) {});
    },
    [=](approve_atom, std::string& user,
        std::string& destination) -> caf::result<int32_t, std::string, uint64_t> {
      // Recorded first; then the running sandbox (and its environment's setup, if that is what
      // runs) may reach it. Later sandboxes of the task get it from the egress binder.
      auto& s = self->state;
      if (s.deps.egress_destination) {
        auto normal = s.deps.egress_destination(destination);
        if (!normal)
          return {static_cast<int32_t>(errc::invalid_argument), "destination: " + normal.error().message, uint64_t{0}};
        destination = std::move(*normal);
      } else if (destination.empty() || destination.size() > 300) {
        return {static_cast<int32_t>(errc::invalid_argument), std::string("destination: empty or longer than 300 bytes"),
                uint64_t{0}};
      }
      if (s.view.finished || s.aborting || s.finishing || !s.limit_failure.empty())
        return {static_cast<int32_t>(errc::conflict), std::string("the task has ended"), uint64_t{0}};
      if (s.view.egress.approvals.size() >= max_egress_approvals)
        return {static_cast<int32_t>(errc::busy),
                "too many egress approvals on this task (limit " + std::to_string(max_egress_approvals) + ")",
                uint64_t{0}};
      auto m = s.meta();
      m.user = user;
      const std::string sandbox =
        !s.sandbox ? std::string() : !s.view.sandbox_runtime_id.empty() ? s.view.sandbox_runtime_id : s.view.sandbox_id;
      auto rp = self->make_response_promise<int32_t, std::string, uint64_t>();
      persist(self, schemas::egress_approved(m, destination, sandbox),
              [self, rp, destination, sandbox](const storage::append_result& where) mutable {
                const auto& allow = self->state.deps.allow_egress;
                if (allow && !sandbox.empty())
                  for (const auto& id : {sandbox, sandbox + "-setup"})
                    (void)allow(id, destination);  // not open (any more): nothing to let through
                rp.deliver(int32_t{0}, std::string(), where.last_sequence);
              });
      return rp;
    },
    [=](steer_atom, std::string& user,
        std::string& text) -> caf::result<int32_t, std::string, uint64_t> {
      // Persisted at once; the session takes it into its next turn.
      auto& s = self->state;
      if (s.view.finished || s.aborting || s.finishing || !s.limit_failure.empty())
        return {static_cast<int32_t>(errc::conflict), std::string("the task has ended"),
                uint64_t{0}};
      if (s.steering.size() >= max_steering_comments)
        return {static_cast<int32_t>(errc::busy),
                "too many steering comments on this task (limit " +
                  std::to_string(max_steering_comments) + ")",
                uint64_t{0}};
      auto m = s.meta();
      m.user = user;
      auto rp = self->make_response_promise<int32_t, std::string, uint64_t>();
      persist(self, schemas::steering_comment(m, text),
              [self, rp, text](const storage::append_result& where) mutable {
                if (self->state.session)
                  self->send(self->state.session, steer_atom_v, where.last_sequence, text);
                rp.deliver(int32_t{0}, std::string(), where.last_sequence);
              });
      return rp;
    },
    [=](abort_atom, std::string& reason, std::string& user) { return abort(reason, user); },
    [=](abort_refused_atom, std::string& reason, std::string& user) {
      auto& s = self->state;
      auto rp = std::move(s.refused_aborts.front());
      s.refused_aborts.pop_front();
      if (!s.view.finished || s.finishing)
        return begin_abort(std::move(rp), std::move(reason), std::move(user));  // resumed since
      refuse(self, TS::aborted,
             "abort requested by " + user + ", but the task is " + s.view.status,
             [rp]() mutable { rp.deliver(static_cast<int32_t>(abort_outcome::already_finished)); });
    },
    [=](abort_rec_atom, std::string& reason, std::string& user) {
      auto& s = self->state;
      auto m = s.meta();
      m.user = user;
      persist(self, schemas::abort_requested(m, reason), [self](const storage::append_result&) {
        auto& s = self->state;
        if (!s.sandbox && !s.turn_pending)
          finish_task(self);  // nothing runs (queued, or between turns): it ends here
      });
    },
    [=](wall_clock_atom, uint64_t arm) {
      // Does nothing when late: the task ended or is ending, or it ran again (a resume) since
      // this timer was armed.
      auto& s = self->state;
      if (arm != s.wall_clock_arms || s.view.status != "running" || s.view.finished ||
          s.finishing || s.aborting || !s.limit_failure.empty())
        return;
      reach_wall_clock(self);
    },
    [=](down_atom, bool, bool was_sandbox, std::string& reason) {
      auto& s = self->state;
      if (was_sandbox && s.sandbox && !s.finishing) {
        // The sandbox actor stopped without reporting an end (it crashed): the task fails.
        s.sandbox = nullptr;
        if (s.sandbox_failure.empty())
          s.sandbox_failure = "sandbox actor stopped: " + reason;
        finish_task(self);
      }
    },
  };
}

}  // namespace ferry::actors
