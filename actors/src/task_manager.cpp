// The task manager (job queue, routing) and the session manager's supervision of task actors:
// a crashed task actor is restarted from its events with backoff; repeated crashes fail the task.
// See ferry/actors/tasks.h for the contract.

#include <openssl/rand.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <optional>
#include <cstdio>
#include <functional>
#include <mutex>
#include <map>
#include <set>

#include "ferry/actors/tasks.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "actors.h"
#include "messages.h"

namespace ferry::actors {

namespace {

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

/// Supervision (the session manager's part): how often a task's actor crashed lately.
struct crash_record {
  uint32_t count = 0;
  std::chrono::steady_clock::time_point first;
};

/// Crashes within this window count towards the limit; the limit fails the task.
constexpr auto crash_window = std::chrono::seconds(60);
constexpr uint32_t max_crashes = 3;
/// Restart delay after the n-th crash: 100 ms, 400 ms, 1.6 s, …
std::chrono::milliseconds restart_backoff(uint32_t n) {
  return std::chrono::milliseconds(100 << (2 * std::min<uint32_t>(n - 1, 4)));
}

struct manager_state {
  static inline const char* name = "ferry.task_manager";
  task_deps deps;
  std::map<std::string, caf::actor> live;
  std::map<caf::actor_addr, std::string> ids;
  job_queue queue;
  std::map<std::string, crash_record> crashes;
  std::map<std::string, std::string> restarting;  // id → why (waiting out its backoff)
  bool shutting_down = false;
  std::vector<caf::response_promise> shutdown_waiters;
};

using manager_actor_t = caf::stateful_actor<manager_state>;

caf::actor spawn_task(manager_actor_t* self, task_args args) {
  auto& s = self->state;
  args.deps = s.deps;
  args.fault = s.deps.fault;
  auto id = args.id;
  auto task = self->spawn<caf::monitored>(task_actor, std::move(args));
  s.live[id] = task;
  s.ids[task.address()] = id;
  return task;
}

/// Tells a task a slot is free (queued → running, or a resume). A refusal (it is ending: an
/// abort came first) is on the task's stream; its slot comes back when its actor stops.
void tell_run(manager_actor_t* self, const caf::actor& task) {
  self->request(task, caf::infinite, run_atom_v).then([](bool) {}, [](caf::error&) {});
}

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
    tell_run(self, next.actor);
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

/// Takes a task out of the queue's books (it ended).
void release(manager_actor_t* self, const std::string& id) {
  auto& q = self->state.queue;
  if (auto r = q.running_user.find(id); r != q.running_user.end()) {
    --q.running_total;
    if (--q.running_by_user[r->second] == 0)
      q.running_by_user.erase(r->second);
    q.running_user.erase(r);
    return;
  }
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

/// Puts a (new, recovered or resumed) task in the queue: runs it now or lets it wait.
/// Returns its position (0: runs now).
uint32_t enqueue(manager_actor_t* self, const std::string& id, const std::string& user,
                 caf::actor task, bool send_run) {
  auto& q = self->state.queue;
  if (q.may_start(user) && q.waiting_of(user) == 0) {
    q.mark_running(id, user);
    if (send_run)
      tell_run(self, task);
    return 0;
  }
  q.waiting[user].push_back({id, std::move(task), q.next_order++});
  auto position = q.positions()[id];
  q.reported[id] = position;
  return position;
}

bool is_crash(const caf::error& reason) {
  if (!reason || reason == caf::exit_reason::user_shutdown || reason == caf::exit_reason::kill)
    return false;
  return to_string(reason).find(fenced_reason) == std::string::npos;
}

/// On start: every task an earlier ferryd left unfinished gets its actor back, recovered from
/// its events. Running ones keep their slot; queued ones wait again in submission order.
/// What start-up recovery works on: the unfinished tasks and the sandboxes to re-attach.
struct recovery_plan {
  std::vector<task_view> running;  // not queued: recovered, keep their slot
  std::vector<task_view> waiting;  // queued: wait again, in submission order
  std::set<std::string> attach;    // sandbox ids still alive for a running task
};

/// Reads the unfinished tasks from the journal (a stream not ending in task_finished), matches
/// their sandboxes with those still alive, and removes every other sandbox an earlier ferryd
/// left. Runs before the manager starts, so nothing races the cleanup.
result<recovery_plan> plan_recovery(const task_deps& d) {
  recovery_plan plan;
  auto streams = d.store->list_streams("task-");
  if (!streams)
    return streams.error();
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
    auto view = load_task_view(*d.store, stream.substr(5));
    if (!view)
      return view.error();
    if (!*view)
      continue;
    // Ended, though something followed task_finished (an actor recovered on the stream only
    // to find it ended): nothing to run. Interrupted ones wait for their user's resume.
    if (auto st = parse_task_status((*view)->status); st && task_status_terminal(*st))
      continue;
    if ((*view)->status == "queued")
      plan.waiting.push_back(std::move(**view));
    else
      plan.running.push_back(std::move(**view));
  }
  std::sort(plan.waiting.begin(), plan.waiting.end(),
            [](const task_view& a, const task_view& b) { return a.created_ns < b.created_ns; });
  std::set<std::string> live;
  if (auto l = d.runtime->list_live(); !l)
    std::fprintf(stderr, "ferryd: warning: listing sandboxes left by an earlier run: %s\n",
                 l.error().message.c_str());
  else
    live.insert(l->begin(), l->end());
  for (const auto& v : plan.running) {
    // A warm-pool sandbox is known to the runtime by the id it was started with.
    const auto& id = v.sandbox_runtime_id.empty() ? v.sandbox_id : v.sandbox_runtime_id;
    if (!id.empty() && live.count(id) && v.sandbox_status != "terminated" && v.sandbox_status != "failed")
      plan.attach.insert(id);
  }
  // Every other sandbox an earlier ferryd left is killed and deleted.
  if (auto n = d.runtime->cleanup_orphans(plan.attach); !n)
    std::fprintf(stderr, "ferryd: warning: cleaning up orphaned sandboxes: %s\n",
                 n.error().message.c_str());
  else if (*n > 0)
    std::fprintf(stderr, "ferryd: removed %zu sandbox(es) left by an earlier run\n", *n);
  const size_t n = plan.running.size() + plan.waiting.size();
  if (n > 0)
    std::fprintf(stderr,
                 "ferryd: recovering %zu unfinished task(s) from their events; re-attaching %zu "
                 "sandbox(es) that outlived the earlier ferryd\n",
                 n, plan.attach.size());
  return plan;
}

/// On start: every task an earlier ferryd left unfinished gets its actor back, recovered from
/// its events. Running ones keep their slot; queued ones wait again in submission order.
void recover_tasks(manager_actor_t* self, const recovery_plan& plan) {
  for (const auto& v : plan.running) {
    task_args a;
    a.id = v.id;
    a.recover_reason = "ferryd restarted";
    a.sandbox_attachable =
      plan.attach.count(v.sandbox_runtime_id.empty() ? v.sandbox_id : v.sandbox_runtime_id) > 0;
    spawn_task(self, std::move(a));
    self->state.queue.mark_running(v.id, v.user);
  }
  for (const auto& v : plan.waiting) {
    task_args a;
    a.id = v.id;
    a.recover_reason = "ferryd restarted";
    auto task = spawn_task(self, std::move(a));
    enqueue(self, v.id, v.user, task, true);
  }
}

caf::behavior task_manager(manager_actor_t* self, task_deps deps, recovery_plan plan) {
  self->state.deps = deps;
  self->state.queue.limits = deps.limits;
  recover_tasks(self, plan);
  dispatch(self);

  self->set_down_handler([=](caf::down_msg& dm) {
    auto& s = self->state;
    auto idit = s.ids.find(dm.source);
    if (idit == s.ids.end())
      return;
    const std::string id = idit->second;
    s.ids.erase(idit);
    if (auto it = s.live.find(id); it != s.live.end() && it->second.address() == dm.source)
      s.live.erase(it);
    if (!s.shutting_down && is_crash(dm.reason)) {
      // Supervision: restart it from its events after a backoff; its queue slot stays taken.
      auto& c = s.crashes[id];
      const auto now = std::chrono::steady_clock::now();
      if (c.count == 0 || now - c.first > crash_window) {
        c.count = 0;
        c.first = now;
      }
      ++c.count;
      auto why = to_string(dm.reason);
      std::fprintf(stderr, "ferryd: task %s: actor crashed (%u in a row): %s\n", id.c_str(),
                   c.count, why.c_str());
      s.restarting[id] = why;
      self->delayed_send(self, restart_backoff(c.count), restart_atom_v, id);
      return;
    }
    release(self, id);
    if (!s.shutting_down)
      dispatch(self);
    if (s.shutting_down && s.live.empty() && s.restarting.empty()) {
      for (auto& rp : s.shutdown_waiters)
        rp.deliver(true);
      s.shutdown_waiters.clear();
    }
  });
  // steer and approve: handed to the live task, whose answer (code, message, sequence) goes
  // back as it is.
  auto to_task = [self](auto atom, const std::string& id, std::string& user, std::string& text,
                        const char* what) -> caf::result<int32_t, std::string, uint64_t> {
    auto& s = self->state;
    auto it = s.live.find(id);
    if (it == s.live.end())
      return {static_cast<int32_t>(errc::not_found), "no live task " + id, uint64_t{0}};
    auto rp = self->make_response_promise<int32_t, std::string, uint64_t>();
    self->request(it->second, caf::infinite, atom, std::move(user), std::move(text))
      .then([rp](int32_t code, std::string& message, uint64_t seq) mutable { rp.deliver(code, std::move(message), seq); },
            [rp, what](caf::error& err) mutable {
              rp.deliver(static_cast<int32_t>(errc::failed), std::string(what) + ": " + to_string(err), uint64_t{0});
            });
    return rp;
  };
  return {
    [=](restart_atom, std::string& id) {
      auto& s = self->state;
      auto it = s.restarting.find(id);
      if (it == s.restarting.end())
        return;
      auto why = std::move(it->second);
      s.restarting.erase(it);
      task_args a;
      a.id = id;
      a.recover_reason = "actor crashed: " + why;
      a.rerun_lost_turn = true;
      if (s.crashes[id].count >= max_crashes || s.shutting_down)
        a.fail_reason = "the task's actor crashed " + std::to_string(s.crashes[id].count) +
                        " times within " + std::to_string(crash_window.count()) +
                        " s; last: " + why;
      spawn_task(self, std::move(a));
    },
    [=](submit_atom, std::string& command, std::string& repo, std::string& user,
        std::string& correlation, int64_t wall_clock_ms,
        std::string& environment) -> caf::result<int32_t, std::string, uint32_t> {
      auto& s = self->state;
      if (s.shutting_down)
        return {static_cast<int32_t>(errc::closed),
                std::string("ferryd is shutting down; not accepting tasks"), uint32_t{0}};
      if (!environment.empty() && !s.deps.environments.count(environment)) {
        std::string known;
        for (const auto& [name, spec] : s.deps.environments)
          known += (known.empty() ? "" : ", ") + name;
        return {static_cast<int32_t>(errc::invalid_argument),
                "no environment named \"" + environment.substr(0, 64) + "\" (" +
                  (known.empty() ? std::string("none are configured") : "configured: " + known) + ")",
                uint32_t{0}};
      }
      auto& q = s.queue;
      const bool run_now = q.may_start(user) && q.waiting_of(user) == 0;
      if (!run_now && q.waiting_of(user) >= q.limits.max_queued_per_user)
        return {static_cast<int32_t>(errc::busy),
                "too many waiting tasks: " + std::to_string(q.waiting_of(user)) +
                  " of yours are queued (limit " + std::to_string(q.limits.max_queued_per_user) +
                  "); try again later",
                uint32_t{0}};
      task_args a;
      a.id = random_hex(8);
      a.req = task_request{std::move(command), std::move(repo), user, std::move(correlation),
                           std::chrono::milliseconds(wall_clock_ms), std::move(environment)};
      auto id = a.id;
      auto task = spawn_task(self, std::move(a));
      const uint32_t position = enqueue(self, id, user, task, false);
      auto why = position == 0 ? std::string() : q.why_waiting();
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
      if (position != 0)
        dispatch(self);
      return rp;
    },
    [=](resume_atom, std::string& id,
        std::string& user) -> caf::result<int32_t, std::string, uint32_t> {
      auto& s = self->state;
      auto refuse = [](errc code, std::string text) {
        return caf::result<int32_t, std::string, uint32_t>{static_cast<int32_t>(code),
                                                           std::move(text), uint32_t{0}};
      };
      if (s.shutting_down)
        return refuse(errc::closed, "ferryd is shutting down");
      if (s.live.count(id) || s.restarting.count(id))
        return refuse(errc::conflict, "task " + id + " is not interrupted: it is live");
      auto view = load_task_view(*s.deps.store, id);
      if (!view)
        return refuse(errc::failed, view.error().message);
      if (!*view)
        return refuse(errc::not_found, "no task " + id);
      if ((*view)->status != "interrupted" || !(*view)->resumable)
        return refuse(errc::conflict, "task " + id + " is " + (*view)->status +
                                        "; only an interrupted task can be resumed");
      task_args a;
      a.id = id;
      a.recover_reason = "resumed by " + user;
      auto task = spawn_task(self, std::move(a));
      // Waits like a submission when the limits say so (recorded as interrupted → queued);
      // `run` moves it to running.
      const auto position = enqueue(self, id, (*view)->user, task, true);
      if (position != 0) {
        auto& q = s.queue;
        self->send(task, queued_atom_v, position, q.running_total, q.limits.max_running,
                   q.why_waiting());
        dispatch(self);
      }
      return {int32_t{0}, id, position};
    },
    [=](steer_atom atom, std::string& id, std::string& user, std::string& text) {
      return to_task(atom, id, user, text, "steer");
    },
    [=](approve_atom atom, std::string& id, std::string& user, std::string& destination) {
      return to_task(atom, id, user, destination, "approve");
    },
    [=](abort_atom, std::string& id, std::string& user, std::string& reason) -> caf::result<int32_t> {
      auto& s = self->state;
      auto it = s.live.find(id);
      if (it == s.live.end())
        return static_cast<int32_t>(s.restarting.count(id) ? abort_outcome::pending
                                                           : abort_outcome::not_found);
      auto rp = self->make_response_promise<int32_t>();
      // High priority: the task's kill goes out ahead of whatever it has queued.
      self->request<caf::message_priority::high>(it->second, caf::infinite, abort_atom_v,
                                                 std::move(reason), std::move(user))
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
      s.restarting.clear();
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

class caf_task_service final : public task_service {
 public:
  caf_task_service(caf::actor_system& sys, caf::actor mgr) : sys_(sys), mgr_(std::move(mgr)) {}
  ~caf_task_service() override { caf::anon_send_exit(mgr_, caf::exit_reason::user_shutdown); }

  result<submission> submit(const task_request& req) override {
    return ask_submission("submit", submit_atom_v, req.command, req.repo, req.user,
                          req.correlation_id, static_cast<int64_t>(req.wall_clock_limit.count()),
                          req.environment);
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
    ask_sequence("steer", steer_atom_v, task_id, user, text, std::move(done));
  }

  void approve_egress_async(const std::string& task_id, const std::string& user, const std::string& destination,
                            steer_callback done) override {
    ask_sequence("approve", approve_atom_v, task_id, user, destination, std::move(done));
  }

  /// Asks the manager `(atom, task_id, user, text)`, answered (code, message, sequence) by the
  /// task: `done` gets the sequence of what the task recorded, or the error (`what` names it).
  template <class Atom>
  void ask_sequence(const char* what, Atom atom, const std::string& task_id, const std::string& user,
                    const std::string& text, steer_callback done) {
    sys_.spawn(
      [=](caf::event_based_actor* self, caf::actor mgr) {
        self->request(mgr, std::chrono::seconds(30), atom, task_id, user, text)
          .then(
            [=](int32_t code, std::string& message, uint64_t seq) {
              if (code == 0)
                done(seq);
              else
                done(fail(static_cast<errc>(code), std::move(message)));
            },
            [=](caf::error& err) { done(fail(std::string(what) + " " + task_id + ": " + to_string(err))); });
      },
      mgr_);
  }

  result<submission> resume(const std::string& task_id, const std::string& user) override {
    return ask_submission("resume", resume_atom_v, task_id, user);
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
  /// Asks the manager something answered as (code, id or error text, queue position).
  template <class... Ts>
  result<submission> ask_submission(const char* what, Ts&&... xs) {
    caf::scoped_actor self{sys_};
    result<submission> out = fail("task manager did not answer");
    self->request(mgr_, std::chrono::seconds(30), std::forward<Ts>(xs)...)
      .receive(
        [&](int32_t code, std::string& text, uint32_t position) {
          if (code == 0)
            out = submission{std::move(text), position};
          else
            out = fail(static_cast<errc>(code), std::move(text));
        },
        [&](caf::error& err) { out = fail(std::string(what) + ": " + to_string(err)); });
    return out;
  }

  caf::actor_system& sys_;
  caf::actor mgr_;
};

}  // namespace

void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_types<caf::id_block::ferry>();
}

void use_ferry_scheduler(caf::actor_system_config& cfg) {
  cfg.set("scheduler.policy", caf::atom("sharing"));
}

result<std::unique_ptr<task_service>> start_task_manager(caf::actor_system& sys, task_deps deps) {
  if (!deps.store || !deps.runtime)
    return fail("start task manager: journal and sandbox runtime are required");
  // Sandboxes an earlier ferryd left running: re-attached when their task is recovered, else
  // removed — before the manager (and any new sandbox) starts.
  auto plan = plan_recovery(deps);
  if (!plan)
    return fail("recovering unfinished tasks: " + plan.error().message);
  auto mgr = sys.spawn(task_manager, deps, std::move(*plan));
  return std::unique_ptr<task_service>(new caf_task_service(sys, mgr));
}

}  // namespace ferry::actors
