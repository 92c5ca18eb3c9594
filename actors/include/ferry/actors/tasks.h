#pragma once
// ferry_actors public header: the task and sandbox actors and the task manager that owns them.
//
// Every task, its session and each of its sandboxes is a persistent CAF actor, the single
// writer of its own stream (`task-<id>`, `session-<id>`, `sandbox-<sandbox id>`): a command is
// validated, its events appended, then applied, then answered. The task's stream is its
// timeline: it also records what its session and sandbox report, so one stream tells the whole
// story (the outbox relay publishes it on `ferry.ev.task.<id>`). The state machines are in
// ferry/actors/lifecycle.h; a transition outside them is recorded as `transition_refused`.
// Task status: queued → running → succeeded | failed | aborted | interrupted (→ running when
// resumed).
//
// Non-actor code (HTTP handlers, ferryd's main) talks to the manager through `task_service`.
//
// Threading: `task_service` is thread-safe; its calls block the calling thread (bounded by
// timeouts) and must not be made from inside an actor.

#include <chrono>
#include <functional>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ferry/actors/bus.h"
#include "ferry/sandbox/environment.h"
#include "ferry/sandbox/pool.h"
#include "ferry/schemas/events.h"
#include "ferry/schemas/result.h"

namespace caf {
class actor_system;
class actor_system_config;
}  // namespace caf

namespace ferry::storage {
class event_store;
}
namespace ferry::events::v1 {
struct Envelope;
}
namespace ferry::sandbox {
class sandbox_runtime;
}

namespace ferry::actors {

/// Registers Ferry's message types with a CAF config. Call before creating the actor system.
void add_message_types(caf::actor_system_config& cfg);

/// Picks the scheduler ferryd runs its actors on: CAF's `sharing` policy (one job queue, idle
/// workers block on a condition variable) instead of the default work stealing, whose idle
/// workers poll (spinning, then waking every 50 µs) and take the CPU from the journal, relay and
/// NATS threads that carry the same events. On 2 cores that halved the event path's p99 at
/// 10k events/s (ferry-bench events: 9.1 / 6.8 ms → 4.4 / 3.9 ms, same run). Ferry's actors wait
/// on I/O rather than compute, so a shared queue costs nothing measurable. Call before creating
/// the actor system; `add_message_types` is separate so tests can choose CAF's test coordinator.
void use_ferry_scheduler(caf::actor_system_config& cfg);

/// What a user submits.
struct task_request {
  std::string command;         ///< shell command run with /bin/sh -c inside the sandbox
  std::string repo;            ///< optional repository ("org/name"): cloned into /workspace through
                               ///< task_deps::git before the command runs
  std::string user;            ///< acting token id
  std::string correlation_id;  ///< e.g. the HTTP request id
  /// How long the task may be running (see TaskSubmitted.wall_clock_limit_ms); 0: the service
  /// default (task_deps::default_wall_clock).
  std::chrono::milliseconds wall_clock_limit{0};
  /// The environment its sandboxes are made from, by name (task_deps::environments); empty:
  /// none. An unknown name is refused (errc::invalid_argument).
  std::string environment = {};
};

/// A limit the task or its sandbox ran into (a LimitReached event of its stream).
struct limit_hit {
  std::string kind;  ///< "memory", "pids", "disk_quota", "command_timeout", "task_wall_clock", …
  uint64_t limit = 0;  ///< the configured value, in the kind's unit (see events.fbs)
  uint32_t command_id = 0;
  bool whole_sandbox = false;
  std::string detail;
  int64_t time_ns = 0;  ///< when it was recorded
};

/// What the egress proxy did for a task's sandboxes (EgressDecision, EgressApproved events).
struct egress_summary {
  uint64_t allowed = 0;
  uint64_t denied = 0;
  uint64_t bytes_up = 0;
  uint64_t bytes_down = 0;
  /// Destinations a user allowed for the task, in order (each `host[:port]` or `*.domain[:port]`).
  std::vector<std::string> approvals;
  /// Destinations refused only because the policy does not list them, as `host:port`, oldest
  /// first, each once, at most max_approvable (the oldest go), without those approved since:
  /// what the UI offers to allow.
  std::vector<std::string> approvable;
  static constexpr size_t max_approvable = 20;
};

/// What the task's sandboxes did through the git proxy (GitOperation events).
struct git_summary {
  uint64_t operations = 0;       ///< requests, ref advertisements included
  uint64_t refused = 0;          ///< refused by the proxy (another branch, a tag, a deletion, …)
  uint64_t upstream_errors = 0;  ///< the forge failed or could not be reached
  /// What the task pushed: each ref once, with the object it was last set to, in first-push order.
  std::vector<std::pair<std::string, std::string>> pushed;
};

/// A task's current state, folded from its events (the journal is the source of truth).
struct task_view {
  std::string id;
  std::string user;
  std::string status;  ///< queued | running | succeeded | failed | aborted | interrupted
  std::string command;
  std::string repo;
  std::string environment;      ///< its name; empty: none
  std::string environment_key;  ///< the environment's key at submission
  std::optional<int> exit_code;
  std::string reason;
  std::string sandbox_id;
  /// The runtime's id of the sandbox when it is not `sandbox_id` (taken from the warm pool).
  std::string sandbox_runtime_id;
  std::string sandbox_backend;
  std::string sandbox_status;
  std::string sandbox_reason;  ///< reason given with the sandbox's latest state change
  uint32_t queue_position = 0;  ///< while queued: 1 = starts at the next free slot; else 0
  bool resumable = false;        ///< interrupted and can be resumed
  bool abort_requested = false;
  int64_t created_ns = 0;
  int64_t finished_ns = 0;
  /// When the task last changed to running (its start or its resume; 0: never ran). The
  /// wall-clock limit counts from here, also across a ferryd restart.
  int64_t running_since_ns = 0;
  /// The wall-clock limit in force (from task_submitted); 0: none.
  uint64_t wall_clock_limit_ms = 0;
  /// Every limit the task hit, oldest first (limit_reached events).
  std::vector<limit_hit> limits_reached;
  egress_summary egress;
  git_summary git;
  uint64_t last_sequence = 0;
  bool finished = false;
};

/// The view as JSON: the body of GET /api/v1/tasks/{id} and of `ferryctl replay --json`.
nlohmann::json to_json(const task_view& view);

/// The inverse of to_json (task snapshots).
[[nodiscard]] result<task_view> task_view_from_json(const nlohmann::json& j);

/// The fold: applies one event of the stream `task-<view.id>` (verified, upcast) to `view`. Every
/// task view — load_task_view, refresh_task_view, the gateway's cache, `ferryctl replay` — is
/// built by this one function, so they all agree with each other.
void apply(task_view& view, const events::v1::Envelope& event);

/// Folds the stream `task-<id>`; nullopt when there is no such task.
[[nodiscard]] result<std::optional<task_view>> load_task_view(storage::event_store& store,
                                                              const std::string& task_id);

/// Folds the events after `view.last_sequence` into `view` (whose `id` is set).
[[nodiscard]] result<void> refresh_task_view(storage::event_store& store, task_view& view);

/// Task views kept folded, so reading a task costs only its events since the last read, not its
/// whole history (a long task has many output events). Bounded: at most `capacity` tasks are
/// kept; past that the cache starts over. Thread-safe.
class task_view_cache {
 public:
  explicit task_view_cache(storage::event_store& store, size_t capacity = 4096)
    : store_(store), capacity_(capacity) {}
  /// Like load_task_view, incrementally.
  [[nodiscard]] result<std::optional<task_view>> get(const std::string& task_id);
  /// Number of views kept (≤ capacity).
  [[nodiscard]] size_t size();

 private:
  storage::event_store& store_;
  size_t capacity_;
  std::mutex mtx_;
  std::unordered_map<std::string, task_view> views_;  // GUARDED_BY(mtx_)
};

/// True when `id` has the shape of a task id (so it can safely name a stream and a subject).
bool valid_task_id(std::string_view id);

/// The task whose sandbox `sandbox_id` is (`ferry-<task id>-<n>`, its environment's setup
/// `ferry-<task id>-<n>-setup`), or nullopt for an id of another shape.
std::optional<std::string> task_of_sandbox(std::string_view sandbox_id);

/// Outcome of an abort request.
enum class abort_outcome { aborted, already_finished, not_found, pending };

/// "aborted", "already_finished", "not_found", "pending" (the control subject's answers).
std::string_view to_string(abort_outcome o);

/// Concurrency limits of the task manager's job queue.
struct task_limits {
  /// Tasks running at once, all users together.
  uint32_t max_running = 8;
  /// Tasks one user may have running at once.
  uint32_t max_running_per_user = 8;
  /// Tasks one user may have waiting; a submission past that is refused.
  uint32_t max_queued_per_user = 200;
};

/// Sandboxes started ahead of time (ferryd: a sandbox_pool per environment), which a task's
/// sandbox starts from when one is ready instead of waiting for a start.
///
/// Threading: called from the sandbox actors' threads, concurrently.
class warm_sandboxes {
 public:
  virtual ~warm_sandboxes() = default;
  /// A ready, idle sandbox for task `task_id` of `environment` (empty: none), whose observer is
  /// `observer` from now on, and that may reach what the task's users allowed. An error when
  /// none is ready (the caller starts one the normal way); its message is for the log.
  [[nodiscard]] virtual result<sandbox::acquired_sandbox> acquire(const std::string& environment,
                                                                  const std::string& task_id,
                                                                  sandbox::sandbox_observer& observer) = 0;
  /// `environment`'s setup has produced its layer at `layer`: its sandboxes can be started
  /// ahead from now on.
  virtual void layer_ready(const std::string& environment, const std::filesystem::path& layer) = 0;
};

/// The git access of a task's sandboxes (ferryd: the git proxy, reached from inside through the
/// egress proxy's internal route). A sandbox of a task with a repository clones it through
/// this at its `cloning` step, with a credential scoped to that sandbox, that repository and the
/// task's branch; nothing else in the sandbox can reach the forge.
///
/// Threading: called from the sandbox actors' threads, concurrently; `report` is called from
/// the proxy's I/O threads and must not block.
class repo_access {
 public:
  virtual ~repo_access() = default;
  struct grant {
    /// What the sandbox's git remote is: the proxy's URL with the scoped credential in it.
    std::string remote_url;
    /// The task's branch: the only one the sandbox may push to.
    std::string branch;
  };
  /// Opens `repo` ("org/name") for sandbox `sandbox_id` of task `task_id` until close():
  /// errc::invalid_argument for a repository name the forge cannot have. Every request the
  /// sandbox makes through the proxy (allowed or refused) goes to `report`.
  [[nodiscard]] virtual result<grant> open(const std::string& sandbox_id, const std::string& task_id,
                                           const std::string& repo,
                                           std::function<void(const schemas::git_operation_fields&)> report) = 0;
  /// The sandbox's credential stops working; `report` is not called any more.
  virtual void close(const std::string& sandbox_id) = 0;
};

/// The command id a task's timeline gives the clone of its repository (command_started,
/// output_chunk, command_exited), above any command the task runs itself. Ids from here up are
/// Ferry's own commands in the task's sandbox (clone_command_id + n: the n-th re-attach's
/// refresh of the git remote's credential), never the task's.
inline constexpr uint32_t clone_command_id = 0x80000000u;
inline constexpr bool is_ferry_command(uint32_t command_id) { return command_id >= clone_command_id; }

/// What the actors need from the rest of ferryd. All must outlive the task_service.
struct task_deps {
  storage::event_store* store = nullptr;
  sandbox::sandbox_runtime* runtime = nullptr;
  task_limits limits;
  /// Test seam (null in production): called at named points of every task actor ("begin_turn",
  /// "output", "sandbox_state") with the task id; throwing from it crashes that actor, which the
  /// supervision then restarts from its events.
  std::function<void(std::string_view point, const std::string& task_id)> fault;
  /// Wall-clock limit of a task whose request names none (ferryd --task-wall-clock). A task
  /// running longer is killed with its sandbox and fails (limit_reached, task_wall_clock).
  std::chrono::milliseconds default_wall_clock = std::chrono::hours(4);
  /// The environments a task may name (ferryd --environments), by name. Each one's `base` is
  /// the runtime's root (an image's hash, "host-tree"). An environment with a setup script has
  /// it run once per key (in a sandbox of its own, its output recorded as command 0 of the
  /// first task that needs it) and its result cached in `layers` as a layer the task's sandbox
  /// starts from; the next tasks find it there. Fixed for the service's life.
  std::map<std::string, sandbox::environment_spec> environments;
  sandbox::layer_cache* layers = nullptr;  ///< required when an environment has a setup script
  /// Lets a running sandbox of the task reach `destination` (`host[:port]`, `*.domain[:port]`)
  /// from now on: called after a user's approval is recorded (approve_egress_async). Sandboxes
  /// started later get the task's approvals from the egress binder (ferryd reads them from the
  /// task's view). Null: approvals are recorded only.
  std::function<result<void>(const std::string& sandbox_id, const std::string& destination)> allow_egress;
  /// Checks an approval's destination and returns it normalised (ferryd: egress::domain_pattern,
  /// `host[:port]` or `*.domain[:port]`); an error refuses the approval (errc::invalid_argument)
  /// before anything is recorded. Null: any non-empty destination of at most 300 bytes.
  std::function<result<std::string>(const std::string& destination)> egress_destination;
  /// Warm sandboxes; null: every sandbox is started when its task needs it.
  warm_sandboxes* warm = nullptr;
  /// The git proxy; null: a task's repository is recorded, not cloned.
  repo_access* git = nullptr;
};

/// The command id a task's timeline gives its environment's setup (command_started,
/// output_chunk, command_exited), ahead of the task's own commands.
inline constexpr uint32_t setup_command_id = 0;

/// Facade over the task manager actor for non-actor threads.
class task_service {
 public:
  virtual ~task_service() = default;
  /// Where a submission landed.
  struct submission {
    std::string id;
    /// 0: started at once; else its place in the queue (1 = next to start).
    uint32_t queue_position = 0;
  };
  /// Persists task_submitted (with the wall-clock limit in force: the request's, else
  /// task_deps::default_wall_clock) and starts the task, or queues it when a concurrency limit is
  /// reached (task_queued). Returns once the submission is durable. Fails with errc::busy when
  /// the user already has task_limits::max_queued_per_user tasks waiting, errc::closed while
  /// shutting down.
  [[nodiscard]] virtual result<submission> submit(const task_request& req) = 0;
  /// Asks the task to stop: kills its sandbox's processes, records abort_requested and, once the
  /// sandbox is gone, task_finished(aborted). Waits up to `wait` for the end.
  [[nodiscard]] virtual result<abort_outcome> abort(const std::string& task_id,
                                                    const std::string& user,
                                                    const std::string& reason,
                                                    std::chrono::milliseconds wait) = 0;
  /// abort() without blocking: `done` runs once, on an actor thread (keep it short).
  using abort_callback = std::function<void(result<abort_outcome>)>;
  virtual void abort_async(const std::string& task_id, const std::string& user,
                           const std::string& reason, std::chrono::milliseconds wait,
                           abort_callback done) = 0;
  /// Persists a steering comment on the task's stream at once (steering_comment) for the
  /// session's next turn; `done` gets its sequence, errc::not_found for no live task,
  /// errc::conflict when the task is ending.
  using steer_callback = std::function<void(result<uint64_t>)>;
  virtual void steer_async(const std::string& task_id, const std::string& user,
                           const std::string& text, steer_callback done) = 0;
  /// Records that `user` allows `destination` (`host[:port]` or `*.domain[:port]`, checked by
  /// task_deps::egress_destination) for the rest of the task (egress_approved) and lets its
  /// running sandbox reach it at once (task_deps::allow_egress). `done` gets the event's
  /// sequence; errc::invalid_argument for a bad destination, errc::not_found for no live task,
  /// errc::conflict when it is ending, errc::busy past max_egress_approvals.
  virtual void approve_egress_async(const std::string& task_id, const std::string& user,
                                    const std::string& destination, steer_callback done) = 0;
  /// Resumes an interrupted task (status `interrupted`, resumable): its actor is recovered from
  /// its events and, when the concurrency limits allow, runs a new turn in a fresh sandbox.
  /// errc::not_found, errc::conflict (not interrupted, or live), errc::closed.
  [[nodiscard]] virtual result<submission> resume(const std::string& task_id,
                                                  const std::string& user) = 0;
  /// Number of tasks with a live actor.
  [[nodiscard]] virtual size_t running() = 0;
  /// Refuses new tasks, aborts running ones ("ferryd shutting down") and waits up to `wait`
  /// until their sandboxes are gone.
  [[nodiscard]] virtual result<void> shutdown(std::chrono::milliseconds wait) = 0;
};

/// Serves the control subjects `ferry.ctl.task.<id>.abort`, `.steer` and `.approve`
/// (request/reply, JSON) on `events` for `tasks`, so any gateway instance can control any task:
///   abort: {"user", "reason", "wait_ms"} → {"outcome": "aborted" | "pending" |
///          "already_finished" | "not_found"} once the task ended (or wait_ms passed: pending)
///   steer: {"user", "text"} → {"seq": N} once the comment is persisted, or
///          {"error": "...", "code": "not_found" | "conflict" | "invalid_argument" | "failed"}
///   approve: {"user", "destination"} → {"seq": N} once egress_approved is persisted (and the
///          running sandbox may reach it), or an error as for steer ("busy": too many)
/// Destroying the returned handle stops serving. Both must outlive nothing but each other.
class task_control {
 public:
  virtual ~task_control() = default;
};
[[nodiscard]] result<std::unique_ptr<task_control>> start_task_control(bus& events,
                                                                       task_service& tasks);

/// Longest steering comment accepted, in bytes.
inline constexpr size_t max_steering_bytes = 16 * 1024;
/// At most this many egress approvals per task.
inline constexpr size_t max_egress_approvals = 64;

/// Spawns the task manager in `sys`. Before it accepts work it recovers every task an earlier
/// ferryd left unfinished from its events: queued ones wait again; a running one whose sandbox
/// is gone ends `interrupted` (task_interrupted + task_finished(interrupted)), resumable.
[[nodiscard]] result<std::unique_ptr<task_service>> start_task_manager(caf::actor_system& sys,
                                                                       task_deps deps);

}  // namespace ferry::actors
