// The sandbox actor: one sandbox's lifecycle (ferry/actors/lifecycle.h), recorded on its own
// stream sandbox-<id> and mirrored to its task, which records the facts in the task's timeline.

#include <chrono>
#include <cstdio>
#include <filesystem>

#include <fmt/format.h>

#include "actors.h"

namespace ferry::actors {

namespace {
using S = ev::SandboxStatus;
}  // namespace

/// Output waiting for the task actor is bounded: past this many bytes the sandbox's reader thread
/// blocks, the pipe from ferry-init fills, and the command itself blocks on write. Backpressure
/// instead of unbounded memory.
constexpr size_t max_pending_output = 4u << 20;
/// How often a running sandbox's egress credential is renewed (tokens live 4 h: a command started
/// just before a renewal still has 3 h).
constexpr auto egress_renewal_interval = std::chrono::hours(1);
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
        pending_.back().gap == 0 &&
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
  void on_output_gap(uint32_t id, int stream, uint64_t lost_bytes) override {
    {
      std::lock_guard<std::mutex> guard(mtx_);
      if (closed_)
        return;
      output_piece p{id, int32_t{stream}, std::string(), lost_bytes};
      pending_.push_back(std::move(p));
      if (std::exchange(announced_, true))
        return;
    }
    send(output_atom_v);
  }
  void on_command_failed(uint32_t id, std::string_view reason) override {
    send(cmd_failed_atom_v, id, std::string(reason));
  }
  void on_command_exited(uint32_t id, int code, int signal, uint64_t ms) override {
    send(cmd_exit_atom_v, id, int32_t{code}, int32_t{signal}, ms);
  }
  void on_processes_gone(std::chrono::steady_clock::time_point) override { send(gone_atom_v); }
  void on_limit_reached(const sandbox::limit_hit& hit) override {
    send(limit_atom_v, std::string(sandbox::to_string(hit.what)), hit.limit, hit.count, hit.whole_sandbox,
         hit.command_id, hit.detail);
  }
  void on_egress(const sandbox::egress_event& e) override {
    // From the proxy's threads; the sandbox's end comes after its last decision (the runtime
    // closes its egress before on_ended).
    send(egress_atom_v, schemas::egress_decision_fields{e.sandbox_id, e.host, e.port, e.method, e.allowed, e.rule,
                                                        e.approvable, e.bytes_up, e.bytes_down,
                                                        static_cast<uint64_t>(e.duration.count())});
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

  /// Sends the actor a message (from a runtime thread), if it still lives.
  template <class... Ts>
  void send(Ts&&... xs) {
    if (auto strong = target_.lock())
      caf::anon_send(caf::actor_cast<caf::actor>(strong), std::forward<Ts>(xs)...);
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
  caf::weak_actor_ptr target_;
  std::mutex mtx_;
  std::condition_variable room_;
  std::vector<output_piece> pending_;  // GUARDED_BY(mtx_)
  size_t pending_bytes_ = 0;           // GUARDED_BY(mtx_)
  bool announced_ = false;             // GUARDED_BY(mtx_): an output_atom is on its way
  bool closed_ = false;                // GUARDED_BY(mtx_)
};

// -- state -----------------------------------------------------------------------------------------

sandbox_state::sandbox_state() = default;

sandbox_state::~sandbox_state() {
  // Unblock a reader thread waiting for room before `box` joins it.
  if (observer)
    observer->close();
}

void sandbox_state::apply(const ev::Envelope& env) {
  if (env.event_type() == ev::Event::ActorRecovered)
    ++recoveries;
  if (env.event_type() != ev::Event::SandboxStateChanged)
    return;
  auto* x = env.event_as_SandboxStateChanged();
  status = x->to();
  if (x->backend())
    backend = x->backend()->str();
  if (x->runtime_id())
    runtime_id = x->runtime_id()->str();
  // Taken from the warm pool, or cloning first: it was started idle (also for a recovered actor).
  if (!runtime_id.empty() || status == S::cloning)
    started_idle = true;
}

nlohmann::json sandbox_state::snapshot() const {
  return {{"status", static_cast<int>(status)}, {"backend", backend}, {"runtime_id", runtime_id},
          {"started_idle", started_idle}, {"recoveries", recoveries}};
}

result<void> sandbox_state::restore(const nlohmann::json& j) {
  status = static_cast<S>(j.at("status").get<int>());
  backend = j.at("backend").get<std::string>();
  runtime_id = j.value("runtime_id", std::string());  // absent from older snapshots
  started_idle = j.value("started_idle", !runtime_id.empty());
  recoveries = j.value("recoveries", uint32_t{0});
  return {};
}

schemas::envelope_meta sandbox_state::meta() const {
  return {journal.stream, "task-" + task_id, "", "system"};
}

namespace {

/// Records `to` (or, when the lifecycle forbids it, transition_refused and nothing else), tells
/// the task, then runs `then` (only when the transition happened).
void transition(sandbox_actor_t* self, S to, std::string reason,
                std::function<void()> then = {}) {
  auto& s = self->state;
  const S from = s.status;
  if (!sandbox_transition_allowed(from, to)) {
    std::fprintf(stderr, "ferryd: error: sandbox %s: refused transition %s -> %s (%s)\n",
                 s.id.c_str(), std::string(schemas::to_string(from)).c_str(),
                 std::string(schemas::to_string(to)).c_str(), reason.c_str());
    persist(self,
            schemas::transition_refused(s.meta(), "sandbox", schemas::to_string(from),
                                        schemas::to_string(to), reason),
            [](const storage::append_result&) {});
    return;
  }
  persist(self,
          schemas::sandbox_state_changed(s.meta(), s.id, s.backend, from, to, reason, s.runtime_id),
          [self, from, to, reason, then = std::move(then)](const storage::append_result&) {
            auto& s = self->state;
            if (s.task)
              self->send(s.task, sbx_state_atom_v, static_cast<int8_t>(from),
                         static_cast<int8_t>(to), reason, s.backend, s.id);
            if (then)
              then();
          });
}

/// Runs what was held back behind the output (after_pending_output), in order. Often called from
/// the response handler of an output batch, which CAF runs even while a persist is in flight; and
/// the steps record transitions (the command's exit, then the sandbox's end) that must each see
/// the state the previous one left. So each step goes through when_idle: it runs once no persist
/// is in flight, and the next only after the persist it started.
void release_held(sandbox_actor_t* self) {
  auto held = std::exchange(self->state.after_output, {});
  for (auto& f : held)
    when_idle(self, std::move(f));
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
    // Drained: release what was held back behind the output, in order — one persist at a
    // time, since each step may record a transition (see release_held).
    release_held(self);
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
        release_held(self);
      });
}

/// Runs `f` now, or after the output announced before it has been handed to the task (so the
/// task records, e.g., command_exited after all of the command's output).
void after_pending_output(sandbox_actor_t* self, std::function<void()> f) {
  auto& s = self->state;
  if (s.output_waiting || s.output_in_flight || !s.after_output.empty()) {
    s.after_output.push_back(std::move(f));
    if (!s.output_in_flight)
      forward_output(self);
    return;
  }
  when_idle(self, std::move(f));
}

void finish(sandbox_actor_t* self) {
  auto& s = self->state;
  if (std::exchange(s.git_open, false))
    s.git->close(s.id);
  if (s.observer)
    s.observer->close();
  s.setup.reset();  // cancels a setup still running and joins its thread
  s.box.reset();  // joins the reader thread (it has delivered on_ended)
  self->quit();
  s.keep_alive = nullptr;
}

/// Walks to `terminated` (through terminating when needed), or records `failed`; then stops,
/// unless `stay` (the runtime's cleanup is still running: on_ended stops it later).
void end_with(sandbox_actor_t* self, bool failed, std::string reason, bool stay = false) {
  auto& s = self->state;
  auto done = [self, stay] {
    if (!stay)
      finish(self);
  };
  if (sandbox_status_terminal(s.status))
    return done();
  if (failed)
    return transition(self, S::failed, std::move(reason), done);
  if (s.status != S::terminating)
    return transition(self, S::terminating, reason, [self, reason, done] {
      transition(self, S::terminated, reason, done);
    });
  transition(self, S::terminated, std::move(reason), done);
}

/// The sandbox is gone (on_ended): record its final state and stop.
void sandbox_ended(sandbox_actor_t* self, bool failed, const std::string& reason) {
  auto& s = self->state;
  s.ended = true;
  if (s.kill_requested)
    return end_with(self, false, "killed on request");
  if (!s.command_failure.empty())
    return end_with(self, true, s.command_failure);
  if (failed)
    return end_with(self, true, reason.empty() ? "sandbox ended abnormally" : reason);
  end_with(self, false, "sandbox exited");
}

/// A sandbox started idle (warm pool, or cloning first) runs the task's command as command 1.
void run_command_line(sandbox_actor_t* self) {
  auto& s = self->state;
  if (s.kill_requested || !s.box)
    return;  // kill_now has killed it
  sandbox::command_spec c;
  c.command_id = 1;
  c.argv = s.argv;
  if (auto r = s.box->run(c); !r) {
    s.command_failure = "the task's command could not run: " + r.error().message;
    (void)s.box->release();
  }
}

/// What the clone runs (sh; the remote, with its credential, comes in the environment so that it
/// is in no event): the repository into the empty /workspace, the task's branch checked out,
/// the task's user as the author of what the task commits.
constexpr const char* clone_script =
  "set -e\n"
  "git clone --quiet --no-tags -- \"$FERRY_GIT_REMOTE\" /workspace\n"
  "cd /workspace\n"
  "git checkout --quiet -b \"$FERRY_GIT_BRANCH\"\n"
  "git config user.name \"$FERRY_GIT_AUTHOR\"\n"
  "git config user.email \"$FERRY_GIT_AUTHOR@users.ferry.invalid\"\n"
  "echo \"ferry: cloned $FERRY_GIT_REPO, on branch $FERRY_GIT_BRANCH\"\n";

/// Opens the repository at the git proxy for this sandbox, reporting its requests here.
result<repo_access::grant> open_repo(sandbox_actor_t* self) {
  auto& s = self->state;
  auto grant = s.git->open(s.id, s.task_id, s.repo,
                           [weak = caf::actor_cast<caf::weak_actor_ptr>(self)](const schemas::git_operation_fields& g) {
                             if (auto strong = weak.lock())
                               caf::anon_send(caf::actor_cast<caf::actor>(strong), git_atom_v, g);
                           });
  if (grant)
    s.git_open = true;
  return grant;
}

/// ferry-init is up in a sandbox that has a repository to clone: opens the repository for it
/// at the git proxy and runs the clone (command clone_command_id); its exit (cmd_exit_atom) leads
/// to ready and the command line, or ends the sandbox failed.
void begin_clone(sandbox_actor_t* self) {
  auto& s = self->state;
  if (s.kill_requested || !s.box)
    return;
  auto grant = open_repo(self);
  if (!grant) {
    s.command_failure = "cannot open " + s.repo + " at the git proxy: " + grant.error().message;
    (void)s.box->release();
    return;
  }
  transition(self, S::cloning, "cloning " + s.repo + " through the git proxy (branch " + grant->branch + ")",
             [self, grant = *grant] {
               auto& s = self->state;
               if (s.kill_requested || !s.box)
                 return;
               sandbox::command_spec c;
               c.command_id = clone_command_id;
               c.argv = {"/bin/sh", "-c", clone_script};
               c.env = {"FERRY_GIT_REMOTE=" + grant.remote_url, "FERRY_GIT_BRANCH=" + grant.branch,
                        "FERRY_GIT_REPO=" + s.repo, "FERRY_GIT_AUTHOR=" + (s.user.empty() ? std::string("ferry") : s.user),
                        "GIT_TERMINAL_PROMPT=0"};
               c.timeout = std::chrono::minutes(30);
               if (auto r = s.box->run(c); !r) {
                 s.command_failure = "the clone could not run: " + r.error().message;
                 (void)s.box->release();
               }
             });
}

/// A re-attached sandbox past its clone: the git proxy's credentials did not survive ferryd, so
/// it gets a fresh one, written into the remote by command clone_command_id + recoveries (its
/// output and exit on the task's timeline like the clone's).
void refresh_git_credential(sandbox_actor_t* self) {
  auto& s = self->state;
  auto grant = open_repo(self);
  if (!grant) {
    std::fprintf(stderr, "ferryd: sandbox %s: cannot open %s at the git proxy again: %s\n", s.id.c_str(),
                 s.repo.c_str(), grant.error().message.c_str());
    return;
  }
  sandbox::command_spec c;
  c.command_id = clone_command_id + std::max<uint32_t>(s.recoveries, 1);
  c.argv = {"/bin/sh", "-c",
            "git -C /workspace remote set-url origin \"$FERRY_GIT_REMOTE\" && "
            "echo \"ferry: the git remote has a fresh credential (ferryd restarted)\""};
  c.env = {"FERRY_GIT_REMOTE=" + grant->remote_url, "GIT_TERMINAL_PROMPT=0"};
  c.timeout = std::chrono::minutes(1);
  if (auto r = s.box->run(c); !r)
    std::fprintf(stderr, "ferryd: sandbox %s: cannot refresh its git credential: %s\n", s.id.c_str(),
                 r.error().message.c_str());
}

/// Gives the sandbox a fresh egress credential now (`now`: taken from the warm pool, where it may
/// have waited for hours, or re-attached) and every egress_renewal_interval while it runs.
void renew_egress(sandbox_actor_t* self, bool now) {
  auto& s = self->state;
  if (s.ended || s.kill_requested || !s.box)
    return;
  if (now) {
    if (auto r = s.box->renew_egress(); !r && r.error().code != errc::closed)
      std::fprintf(stderr, "ferryd: sandbox %s: egress credential not renewed: %s\n", s.id.c_str(),
                   r.error().message.c_str());
  }
  if (!std::exchange(s.renewal_armed, true))
    self->delayed_send(self, egress_renewal_interval, renew_atom_v);
}

/// ferry-init is up (started or taken idle): clone first when there is a repository, else run
/// the command line.
void after_init(sandbox_actor_t* self) {
  auto& s = self->state;
  if (!s.repo.empty() && s.git)
    return begin_clone(self);
  transition(self, S::ready, "ferry-init is up", [self] { run_command_line(self); });
}

/// Takes a ready sandbox of the environment from the warm pool, if one is: true when it did
/// (then it runs the command once the timeline says it is ready).
bool take_warm(sandbox_actor_t* self, const std::string& note) {
  auto& s = self->state;
  if (!s.warm || s.argv.empty())
    return false;
  auto got = s.warm->acquire(s.environment_name, s.task_id, *s.observer);
  if (!got)
    return false;  // none ready: started the normal way
  s.box = std::move(got->box);
  s.runtime_id = got->id;
  s.started_idle = true;
  renew_egress(self, true);
  if (s.task)
    self->send(s.task, pooled_atom_v, s.id, s.runtime_id);
  transition(self, S::initializing, "taken from the warm pool (" + s.runtime_id + ")" + (note.empty() ? "" : "; " + note),
             [self] { after_init(self); });
  return true;
}

/// Starts the sandbox itself, over `layers` (its environment's setup), with the environment's
/// variables; `note` (what the environment gave) goes into the recorded reason.
void launch(sandbox_actor_t* self, std::vector<std::filesystem::path> layers, const std::string& note) {
  auto& s = self->state;
  sandbox::sandbox_spec spec;
  spec.id = s.id;
  // With a repository to clone first, it starts idle and runs the command line after the clone.
  s.started_idle = !s.repo.empty() && s.git;
  if (!s.started_idle)
    spec.argv = s.argv;
  spec.layers = std::move(layers);
  if (s.environment)
    spec.env = s.environment->env;
  // Blocking (~0.2 s for runsc): this actor is detached.
  auto box = s.runtime->start(spec, *s.observer);
  if (!box)
    return end_with(self, true, box.error().message);
  s.box = std::move(*box);
  transition(self, S::initializing,
             "sandbox process started; waiting for ferry-init" + (note.empty() ? "" : "; " + note));
}

/// Runs the environment's setup script on a thread of its own (the actor goes on taking its
/// output, recorded as command setup_command_id, and a kill, which cancels it); `setup_atom`
/// brings the outcome back.
void run_setup(sandbox_actor_t* self) {
  auto& s = self->state;
  s.observer->on_command_started(setup_command_id, {"environment-setup", s.environment_name});
  s.setup = std::make_unique<sandbox_state::setup_job>();
  s.setup->thread = std::thread([job = s.setup.get(), adapter = s.observer.get(), runtime = s.runtime,
                                 layers = s.layers, env = *s.environment, id = s.id + "-setup"] {
    const auto t0 = std::chrono::steady_clock::now();
    auto layer = layers->ensure(
      *runtime, env, [adapter](int stream, std::string_view data) { adapter->on_output(setup_command_id, stream, data); },
      &job->cancel, [adapter](const sandbox::egress_event& e) { adapter->on_egress(e); }, id);
    const auto ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count());
    adapter->on_command_exited(setup_command_id, layer ? 0 : 1, 0, ms);
    if (layer)
      adapter->send(setup_atom_v, true, layer->path.string(), layer->cached, ms);
    else
      adapter->send(setup_atom_v, false, layer.error().message, false, ms);
  });
}

void do_start(sandbox_actor_t* self) {
  auto& s = self->state;
  if (s.kill_requested)
    return end_with(self, false, "killed before it started");
  s.observer = std::make_unique<observer_adapter>(caf::actor_cast<caf::weak_actor_ptr>(self));
  if (!s.environment_name.empty() && !s.environment)
    return end_with(self, true, "environment \"" + s.environment_name + "\" is not configured (any more)");
  if (!s.environment)
    return take_warm(self, "") ? void() : launch(self, {}, "");
  if (s.environment->setup_script.empty()) {
    const std::string note = "environment " + s.environment_name + " (no setup script)";
    return take_warm(self, note) ? void() : launch(self, {}, note);
  }
  if (!s.layers)
    return end_with(self, true, "environment " + s.environment_name + " has a setup script, but ferryd has no layer cache");
  const std::string key = sandbox::environment_key(*s.environment);
  if (auto path = s.layers->find(key)) {
    if (s.warm)
      s.warm->layer_ready(s.environment_name, *path);
    const std::string note = "environment " + s.environment_name + " (layer " + key.substr(0, 12) + ", cached)";
    return take_warm(self, note) ? void() : launch(self, {*path}, note);
  }
  run_setup(self);
}

/// Kill, the urgent part: never waits for a journal flush.
void kill_now(sandbox_actor_t* self) {
  auto& s = self->state;
  if (s.ended || s.kill_requested)
    return;
  s.kill_requested = true;
  if (s.box)
    s.box->kill();
  if (s.setup)
    s.setup->cancel.cancel();  // kills the setup's sandbox; setup_atom follows
  // The record follows in order (stashed behind a persist in flight, if any).
  self->send(self, killed_atom_v);
}

}  // namespace

caf::behavior sandbox_actor(sandbox_actor_t* self, sandbox_args args) {
  auto& s = self->state;
  s.journal.store = args.store;
  s.journal.stream = sandbox_stream(args.id);
  s.journal.synchronous = args.synchronous_journal;
  s.runtime = args.runtime;
  s.task = std::move(args.task);
  s.id = std::move(args.id);
  s.task_id = std::move(args.task_id);
  s.argv = std::move(args.argv);
  s.environment = std::move(args.environment);
  s.environment_name = std::move(args.environment_name);
  s.layers = args.layers;
  s.warm = args.warm;
  s.repo = std::move(args.repo);
  s.user = std::move(args.user);
  s.git = args.git;
  if (s.runtime)
    s.backend = std::string(s.runtime->name());
  s.journal.urgent = caf::message_handler{[=](kill_atom) { kill_now(self); }};
  s.keep_alive = caf::actor_cast<caf::actor>(self);
  // Fenced out or the journal failed: nothing of this sandbox can be recorded any more.
  s.journal.on_stop = [self] { finish(self); };
  if (s.task)
    self->monitor(s.task);
  self->set_down_handler([=](caf::down_msg& dm) {
    // The task's actor is gone (it crashed, or the test ended): nobody can record what this
    // sandbox does any more, so it must not run on. Kill it; the end is recorded here.
    if (dm.source == self->state.task.address()) {
      self->state.task = nullptr;
      kill_now(self);
    }
  });

  if (args.recover_reason) {
    auto loaded = load(s);
    if (!loaded || !*loaded) {
      std::fprintf(stderr, "ferryd: error: recover sandbox %s: %s\n", s.id.c_str(),
                   loaded ? "no such stream" : loaded.error().message.c_str());
      finish(self);
      return {};
    }
    self->send<caf::message_priority::high>(self, fence_atom_v);
  }

  return {
    [=](fence_atom) {
      fence(self, *args.recover_reason, [self, why = *args.recover_reason,
                                         attachable = args.attachable,
                                         resume = args.resume](auto&) {
        auto& s = self->state;
        if (sandbox_status_terminal(s.status)) {
          // It ended while its task was down: tell the task, which may not know yet.
          if (s.task)
            self->send(s.task, sbx_state_atom_v, static_cast<int8_t>(s.status),
                       static_cast<int8_t>(s.status), "ended while its task was down: " + why,
                       s.backend, s.id);
          return finish(self);
        }
        if (s.runtime && attachable) {
          s.observer =
            std::make_unique<observer_adapter>(caf::actor_cast<caf::weak_actor_ptr>(self));
          // A warm-pool sandbox is known to the runtime by the id it was started with.
          auto box = s.runtime->attach(s.runtime_id.empty() ? s.id : s.runtime_id, resume, *s.observer);
          if (box) {
            s.box = std::move(*box);
            s.reattached = true;
            if (s.kill_requested)  // the kill came while recovering: it applies now
              s.box->kill();
            std::fprintf(stderr, "ferryd: sandbox %s re-attached (%s)\n", s.id.c_str(),
                         why.c_str());
            renew_egress(self, true);
            if (!s.kill_requested && !s.repo.empty() && s.git && s.status == S::executing)
              refresh_git_credential(self);
            return;
          }
          std::fprintf(stderr, "ferryd: sandbox %s could not be re-attached: %s\n", s.id.c_str(),
                       box.error().message.c_str());
          s.observer.reset();
        }
        end_with(self, true, "sandbox lost: " + why);
      });
    },
    [=](start_atom) {
      transition(self, S::spawning, "", [self] { do_start(self); });
    },
    [=](goto_atom, int8_t to, std::string& reason) {
      const bool ok = sandbox_transition_allowed(self->state.status, static_cast<S>(to));
      transition(self, static_cast<S>(to), std::move(reason));
      return ok;
    },
    [=](running_atom) {
      // ferry-init said hello: a sandbox started with its command line runs it already; one
      // started idle clones first, then runs it. (A warm one was up before it was taken.)
      auto& s = self->state;
      if (s.status != S::initializing || !s.runtime_id.empty())
        return;
      renew_egress(self, false);
      if (s.started_idle)
        return after_init(self);
      transition(self, S::ready, "ferry-init is up");
    },
    [=](cmd_start_atom, uint32_t cmd, std::vector<std::string>& argv) {
      // ferry-init repeats the task's running command after an attach; the task has it already.
      // (Ferry's own commands started after the attach — a credential refresh — are new.)
      if (!is_ferry_command(cmd) && std::exchange(self->state.reattached, false))
        return;
      auto go = [self, cmd, argv = std::move(argv)] {
        if (self->state.task)
          self->send(self->state.task, cmd_start_atom_v, cmd, argv);
      };
      if (self->state.status == S::ready)
        transition(self, S::executing, "command started", go);
      else
        go();
    },
    [=](output_atom) { forward_output(self); },
    [=](setup_atom, bool ok, std::string& what, bool cached, uint64_t ms) {
      // After the setup's output and its exit (sent before this) have reached the task.
      after_pending_output(self, [=] {
        auto& s = self->state;
        if (s.setup_abandoned)
          return;  // killed meanwhile: ended already (killed_atom)
        s.setup.reset();  // the thread has returned (this was its last act)
        if (s.kill_requested)
          return end_with(self, false, "killed during its environment's setup");
        if (!ok)
          return end_with(self, true, what);
        if (s.warm)
          s.warm->layer_ready(s.environment_name, what);
        const std::string key = sandbox::environment_key(*s.environment);
        launch(self, {std::filesystem::path(what)},
               fmt::format("environment {} (layer {}, {})", s.environment_name, key.substr(0, 12),
                           cached ? std::string("cached") : fmt::format("set up in {:.1f} s", ms / 1000.0)));
      });
    },
    [=](cmd_exit_atom, uint32_t cmd, int32_t code, int32_t sig, uint64_t ms) {
      // All of the command's output was announced before its exit. A batch already sent is
      // ahead of this in the task's mailbox; output not yet sent must go first.
      after_pending_output(self, [=] {
        if (self->state.task)
          self->send(self->state.task, cmd_exit_atom_v, cmd, code, sig, ms);
        auto& s = self->state;
        if (cmd == clone_command_id && s.status == S::cloning) {
          if (code == 0 && sig == 0 && !s.argv.empty())
            return transition(self, S::ready, "cloned " + s.repo, [self] { run_command_line(self); });
          if (code == 0 && sig == 0)  // a recovered actor: the command line was not kept
            s.command_failure = "ferryd restarted while the repository was being cloned; resume the task";
          else
            s.command_failure = fmt::format("cloning {} failed ({}); its output is above", s.repo,
                                            sig != 0 ? fmt::format("signal {}", sig) : fmt::format("exit code {}", code));
          if (s.box)
            (void)s.box->release();
          return;
        }
        if (s.status == S::executing && !is_ferry_command(cmd))
          transition(self, S::ready, "command exited");
        // A sandbox started idle (warm pool, or cloning first) ends once the task's command
        // has, as one started with the command does.
        if (s.started_idle && cmd == 1 && s.box)
          (void)s.box->release();
      });
    },
    [=](cmd_failed_atom, uint32_t cmd, std::string& reason) {
      auto& s = self->state;
      if (!s.started_idle || (cmd != 1 && cmd != clone_command_id) || !s.box)
        return;
      s.command_failure = (cmd == clone_command_id ? "the clone could not run: " : "the task's command could not run: ") + reason;
      (void)s.box->release();
    },
    [=](kill_atom) { kill_now(self); },
    [=](killed_atom) {
      auto& s = self->state;
      if (s.setup && !s.setup_abandoned) {
        // Killed during its environment's setup: the cancel has killed the setup's sandbox (every
        // process of it is gone), so it ends now, without waiting for the setup's cleanup (its
        // thread is joined when the actor stops; its late answer is ignored).
        s.setup_abandoned = true;
        return after_pending_output(self, [=] { end_with(self, false, "killed during its environment's setup"); });
      }
      if (!sandbox_status_terminal(s.status) && s.status != S::terminating &&
          s.status != S::none)
        transition(self, S::terminating, "kill requested");
      else if (s.status == S::none)
        finish(self);  // never started: nothing to record
    },
    [=](gone_atom) {
      // Every process of the sandbox has exited (its files are still being removed): a killed
      // sandbox is terminated from here on, so an abort ends without waiting for the cleanup.
      if (self->state.kill_requested)
        after_pending_output(self, [=] { end_with(self, false, "killed on request", true); });
    },
    [=](limit_atom, std::string& kind, uint64_t limit, uint64_t count, bool whole, uint32_t cmd,
        std::string& detail) {
      // In the order the runtime reported it: before the command's exit or the sandbox's end
      // that follows it, after the output before it.
      after_pending_output(self, [=] {
        if (self->state.task)
          self->send(self->state.task, limit_atom_v, kind, limit, count, whole, cmd, detail);
      });
    },
    [=](egress_atom, schemas::egress_decision_fields& note) {
      if (self->state.task)
        self->send(self->state.task, egress_atom_v, std::move(note));
    },
    [=](renew_atom) {
      self->state.renewal_armed = false;
      renew_egress(self, true);
    },
    [=](git_atom, schemas::git_operation_fields& op) {
      if (self->state.task)
        self->send(self->state.task, git_atom_v, std::move(op));
    },
    [=](ended_atom, bool failed, std::string reason) {
      after_pending_output(self, [=] { sandbox_ended(self, failed, reason); });
    },
  };
}

}  // namespace ferry::actors
