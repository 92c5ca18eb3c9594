#pragma once
// Private: the task, session and sandbox actors (persistent, see persistent.h) and what the task
// manager and the white-box tests need to spawn them. The contract is in ferry/actors/tasks.h
// and the state machines in ferry/actors/lifecycle.h.

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ferry/actors/lifecycle.h"
#include "ferry/actors/tasks.h"
#include "ferry/sandbox/environment.h"
#include "ferry/sandbox/sandbox.h"
#include "persistent.h"

namespace ferry::actors {

namespace ev = ferry::events::v1;

// -- sandbox actor -------------------------------------------------------------------------------

class observer_adapter;

/// Stream of a sandbox's own record.
inline std::string sandbox_stream(const std::string& sandbox_id) {
  return "sandbox-" + sandbox_id;
}

struct sandbox_state {
  static inline const char* name = "ferry.sandbox";
  journal_slot journal;
  // Folded from sandbox-<id>.
  ev::SandboxStatus status = ev::SandboxStatus::none;
  std::string id;
  std::string task_id;
  std::string backend;
  /// The runtime's id when it is not `id`: taken from the warm pool. Such a sandbox runs the
  /// task's command as command 1 (it was started idle) and is released once that has exited.
  std::string runtime_id;
  // Runtime glue (not event-sourced).
  /// Why a sandbox started idle is being released early (its clone or command 1 could not run,
  /// or the clone failed): its recorded end.
  std::string command_failure;
  sandbox::sandbox_runtime* runtime = nullptr;
  caf::actor task;
  std::vector<std::string> argv;
  bool kill_requested = false;
  bool ended = false;
  bool reattached = false;  // ferry-init repeats hello and command_started after an attach
  bool output_in_flight = false;  // a batch awaits the task's acknowledgement
  bool output_waiting = false;    // more output was announced meanwhile
  /// Facts that must reach the task after output still waiting to be sent (exit, end).
  std::vector<std::function<void()>> after_output;
  /// A handle on itself until finish(): the sandbox actor lives until its sandbox is gone even
  /// when every other handle is dropped (else CAF would destroy it — and join the runtime's
  /// reader, which can take seconds — on the thread of whoever dropped the last handle).
  caf::actor keep_alive;
  // Declared before `box` and `setup`: the observer must outlive the sandbox and the setup
  // thread that call it.
  std::unique_ptr<observer_adapter> observer;
  std::unique_ptr<sandbox::sandbox> box;
  /// The sandbox's environment (none: the bare root), and where its setup layers are cached.
  std::optional<sandbox::environment_spec> environment;
  std::string environment_name;
  sandbox::layer_cache* layers = nullptr;
  actors::warm_sandboxes* warm = nullptr;
  /// The task's repository ("org/name"; empty: none) and the git proxy it is cloned through.
  /// A sandbox with one starts idle, clones at `cloning` (command clone_command_id) and then runs
  /// the command line as command 1.
  std::string repo;
  std::string user;  ///< the task's user: the clone's commit author
  repo_access* git = nullptr;
  bool git_open = false;  ///< git->open succeeded: close() at the end
  /// Started idle (warm pool, or to clone first): runs the command line as command 1 itself and
  /// is released once it has exited. Folded too (a warm runtime id, or `cloning`), so that a
  /// recovered actor releases it as well.
  bool started_idle = false;
  /// Incarnations recovered so far (folded from actor_recovered): the n-th re-attach refreshes
  /// the git remote's credential as command clone_command_id + n.
  uint32_t recoveries = 0;
  bool renewal_armed = false;  ///< an egress renewal is scheduled (renew_atom)
  /// The environment's setup while it runs (on a thread of its own: the actor goes on taking
  /// its output and a kill). Destroying it cancels the setup and joins the thread.
  struct setup_job {
    sandbox::setup_cancel cancel;
    std::thread thread;
    ~setup_job() {
      cancel.cancel();
      if (thread.joinable())
        thread.join();
    }
  };
  std::unique_ptr<setup_job> setup;
  bool setup_abandoned = false;  ///< killed during the setup: ended without waiting for it

  sandbox_state();
  ~sandbox_state();
  void apply(const ev::Envelope& env);
  nlohmann::json snapshot() const;
  result<void> restore(const nlohmann::json& j);
  schemas::envelope_meta meta() const;
};

using sandbox_actor_t = caf::stateful_actor<sandbox_state>;

/// How a sandbox actor begins.
struct sandbox_args {
  storage::event_store* store = nullptr;
  sandbox::sandbox_runtime* runtime = nullptr;  ///< may be null when nothing is started
  caf::actor task;                              ///< gets the mirrored facts; may be null
  std::string id;
  std::string task_id;
  std::vector<std::string> argv;
  /// The environment its sandbox is made from (none: the bare root), by name; `layers` caches
  /// the setups' results (required with an environment that has a setup script).
  std::optional<sandbox::environment_spec> environment;
  std::string environment_name;
  sandbox::layer_cache* layers = nullptr;
  /// Warm sandboxes to start from when one is ready (null: none).
  warm_sandboxes* warm = nullptr;
  /// The task's repository (empty: none), cloned through `git` before the command line runs.
  std::string repo;
  std::string user;
  repo_access* git = nullptr;
  /// Recover from the stream (ferryd restarted, task actor recovered): the sandbox is re-attached
  /// when still alive, else recorded failed with this reason.
  std::optional<std::string> recover_reason;
  /// Recovery: the sandbox outlived its ferryd (runtime list_live) and is re-attached, its output
  /// resuming after what the task already recorded.
  bool attachable = false;
  sandbox::resume_point resume;
  /// See journal_slot::synchronous (tests under the deterministic coordinator).
  bool synchronous_journal = false;
};

/// Messages: start, goto(int8 to, reason) → bool, kill (urgent), and the runtime's callbacks.
caf::behavior sandbox_actor(sandbox_actor_t* self, sandbox_args args);

// -- session actor -------------------------------------------------------------------------------

inline std::string session_stream(const std::string& task_id) { return "session-" + task_id; }

struct session_state {
  static inline const char* name = "ferry.session";
  journal_slot journal;
  std::string task_id;
  std::string user;
  // Folded from session-<task id>.
  session_status status = session_status::idle;
  uint32_t turn = 0;
  uint64_t delivered_upto = 0;  ///< highest task-stream seq of a comment delivered to a turn
  uint64_t input_tokens = 0;
  uint64_t output_tokens = 0;
  /// Steering comments not yet delivered: (task-stream seq, text). Given by the task actor (the
  /// comments live in the task's stream), bounded by the task's steering limit.
  std::vector<std::pair<uint64_t, std::string>> pending;

  void apply(const ev::Envelope& env);
  nlohmann::json snapshot() const;
  result<void> restore(const nlohmann::json& j);
  schemas::envelope_meta meta() const;
};

using session_actor_t = caf::stateful_actor<session_state>;

struct session_args {
  storage::event_store* store = nullptr;
  std::string task_id;
  std::string user;
  /// Steering comments of the task so far (seq, text); the delivered ones are dropped.
  std::vector<std::pair<uint64_t, std::string>> steering;
  /// See journal_slot::synchronous (tests under the deterministic coordinator).
  bool synchronous_journal = false;
};

/// Messages:
///   steer(uint64 seq, string text)              a comment the task persisted
///   turn_begin(string input, string sandbox) →  (uint32 turn, vector<string> steering texts)
///   turn_end(string outcome, uint64 in, uint64 out) → bool
///   close(string reason) → bool (then the actor stops)
///   status → (int8 status, uint32 turn, uint64 pending comments)
/// A refused transition answers an error and records transition_refused.
caf::behavior session_actor(session_actor_t* self, session_args args);

// -- task actor ----------------------------------------------------------------------------------

/// Test seam: called at named points of a task actor ("output", "sandbox_state", …); may throw
/// to simulate an actor crash. Null in production.
using fault_hook = decltype(task_deps::fault);

/// How a task actor begins.
struct task_args {
  task_deps deps;
  std::string id;
  task_request req;  ///< fresh submissions only
  /// Recover from the stream instead of starting fresh, and why ("ferryd restarted", "actor
  /// crashed: …", "resumed by user").
  std::optional<std::string> recover_reason;
  /// What a recovered running task does when its sandbox is gone: true → run the turn again in a
  /// fresh sandbox (the actor crashed, not the user's work); false → interrupted.
  bool rerun_lost_turn = false;
  /// Its sandbox outlived the earlier ferryd (runtime list_live): re-attach it.
  bool sandbox_attachable = false;
  /// Fail the task at once with this reason (repeated crashes).
  std::optional<std::string> fail_reason;
  fault_hook fault;
  /// See journal_slot::synchronous (tests under the deterministic coordinator); its session and
  /// sandbox actors get the same.
  bool synchronous_journal = false;
  /// Test seam (null in production: the real sandbox actor, detached, because it makes blocking
  /// runtime calls). Spawns whatever plays the part of the task's sandbox actor; the task
  /// monitors it and sends it `start` and `kill` as it would the real one. The deterministic
  /// tests put a stand-in here and send the task the sandbox actor's messages themselves.
  std::function<caf::actor(sandbox_args)> spawn_sandbox;
};

/// The status a task view names ("queued", …), if it names one.
inline std::optional<ev::TaskStatus> parse_task_status(std::string_view s) {
  for (auto st : {ev::TaskStatus::queued, ev::TaskStatus::running, ev::TaskStatus::succeeded,
                  ev::TaskStatus::failed, ev::TaskStatus::aborted, ev::TaskStatus::interrupted})
    if (schemas::to_string(st) == s)
      return st;
  return std::nullopt;
}

/// At most this many steering comments per task (each ≤ max_steering_bytes).
constexpr size_t max_steering_comments = 256;

struct task_state {
  static inline const char* name = "ferry.task";
  journal_slot journal;
  // Folded from task-<id>.
  task_view view;
  std::vector<std::pair<uint64_t, std::string>> steering;  // (seq, text)
  uint32_t sandboxes = 0;  // sandboxes started so far (names the next one)
  uint64_t output_bytes[2] = {0, 0};  // of the current sandbox's command 1: stdout, stderr
  // Runtime (not event-sourced).
  task_deps deps;
  fault_hook fault;
  std::string correlation;
  caf::actor sandbox;
  caf::actor session;
  /// (sandbox id, runtime id) of a sandbox taken from the warm pool, until the timeline has it.
  std::pair<std::string, std::string> pooled;
  bool turn_pending = false;  // waiting for the session to open a turn
  bool aborting = false;
  bool finishing = false;
  bool rerun_lost_turn = false;
  bool recovering_sandbox = false;  // a recovered sandbox actor will report its sandbox's fate
  /// Set once the wall-clock limit is reached: the reason the task fails with. The sandbox is
  /// killed and the task ends failed as soon as the sandbox is gone; nothing else starts.
  std::string limit_failure;
  /// Counts the wall-clock timers armed; a timer message carries its number, so one armed for
  /// an earlier run (before a resume) is recognised as stale.
  uint64_t wall_clock_arms = 0;
  std::optional<int32_t> exit_code;
  std::string sandbox_failure;
  std::vector<caf::response_promise> end_waiters;
  /// Aborts of a task that has ended (interrupted, waiting to be resumed), answered once their
  /// refusal is recorded (in order: the abort itself may arrive while a persist is in flight).
  std::deque<caf::response_promise> refused_aborts;
  std::function<caf::actor(sandbox_args)> spawn_sandbox;
  std::optional<caf::typed_response_promise<bool, std::string>> start_rp;

  void apply(const ev::Envelope& env) {
    actors::apply(view, env);
    if (env.event_type() == ev::Event::SteeringComment) {
      auto* t = env.event_as_SteeringComment()->text();
      steering.emplace_back(env.sequence(), t ? t->str() : std::string());
    } else if (env.event_type() == ev::Event::SandboxStateChanged &&
               env.event_as_SandboxStateChanged()->to() == ev::SandboxStatus::spawning) {
      ++sandboxes;
      output_bytes[0] = output_bytes[1] = 0;
    } else if (env.event_type() == ev::Event::OutputChunk && env.event_as_OutputChunk()->command_id() == 1) {
      // The task's command's (what a re-attach resumes), not its environment's setup (which ran
      // in a sandbox of its own) nor Ferry's own commands (the clone).
      auto* x = env.event_as_OutputChunk();
      if (!x->gap())
        output_bytes[x->stream() == ev::OutputStream::stderr ? 1 : 0] +=
          x->data() ? x->data()->size() : 0;
      else
        output_bytes[x->stream() == ev::OutputStream::stderr ? 1 : 0] += x->gap();
    }
  }

  nlohmann::json snapshot() const {
    nlohmann::json comments = nlohmann::json::array();
    for (const auto& [seq, text] : steering)
      comments.push_back({seq, text});
    return {{"view", to_json(view)},
            {"steering", comments},
            {"sandboxes", sandboxes},
            {"output_bytes", {output_bytes[0], output_bytes[1]}}};
  }

  result<void> restore(const nlohmann::json& j) {
    auto v = task_view_from_json(j.at("view"));
    if (!v)
      return v.error();
    view = std::move(*v);
    steering.clear();
    for (const auto& c : j.at("steering"))
      steering.emplace_back(c.at(0).get<uint64_t>(), c.at(1).get<std::string>());
    sandboxes = j.at("sandboxes").get<uint32_t>();
    output_bytes[0] = j.at("output_bytes").at(0).get<uint64_t>();
    output_bytes[1] = j.at("output_bytes").at(1).get<uint64_t>();
    return {};
  }

  schemas::envelope_meta meta() const { return {journal.stream, correlation, "", view.user}; }
};

/// Messages (from the task manager, task_manager.cpp, and from its sandbox actor):
///   start(uint32 position, uint32 running, uint32 limit, string why) → (bool, string id)
///                                       the submission: → queued, or → running when position 0
///   run → bool                          queued → running, or interrupted → running (resume)
///   queued(uint32 position, uint32 running, uint32 limit, string why)   a waiting task's place
///   abort(string reason, string user) → int32 abort_outcome             urgent: kills first
///   steer(string user, string text) → (int32 errc, string message, uint64 seq)
///   wall_clock(uint64 arm)              to itself, when the wall-clock limit is up: records
///                                       limit_reached, kills the sandbox, fails the task
///   sbx_state, cmd_start, output → bool, cmd_exit                  the sandbox actor's facts
/// A transition lifecycle.h forbids is recorded as transition_refused and changes nothing; the
/// requester gets an error (abort: already_finished). A finished task has no actor: it stops
/// once task_finished is recorded, and a recovered one stops after fencing.
caf::behavior task_actor(caf::stateful_actor<task_state>* self, task_args args);

}  // namespace ferry::actors
