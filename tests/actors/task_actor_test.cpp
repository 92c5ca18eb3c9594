// The task actor's state machine (ferry/actors/lifecycle.h), driven through the actor's own
// messages on CAF's deterministic test coordinator (one thread; nothing runs until the test says
// so): every allowed transition is recorded on task-<id> as its event with the status changed;
// every forbidden one that a message can ask for is recorded as `transition_refused`, the status
// stays and the requester gets an error — never a silent change; a task that has ended has no
// actor left to change it; and a respawned actor replays to the same state and fences out the
// old incarnation.
//
// What is real and what is played: the task actor, its session actor and the journal are real
// (the journal in a temp dir, appended synchronously — journal_slot::synchronous — because the
// test coordinator admits no other thread). The sandbox side is played by the test. The task
// spawns its sandbox actor detached (it makes blocking runtime calls), which the test
// coordinator cannot schedule, and the real sandbox actor only moves when a sandbox runtime
// starts processes. So the task gets a stand-in through its test seam task_args::spawn_sandbox
// — an actor that only notes the `start` and `kill` the task sends it — and the test sends the
// task the very messages the sandbox actor sends, in the order it sends them (sbx_state after
// each recorded sandbox transition, cmd_start, output batches, cmd_exit). That makes this a unit
// test of the task's state machine; the sandbox actor's own machine is tested in
// state_machine_test.cpp, and task and sandbox actors together, on gVisor, in
// supervision_test.cpp and tests/integration/.

#define BOOST_TEST_MODULE actors_task_actor
#include <boost/test/unit_test.hpp>

#include <caf/all.hpp>
#include <caf/scheduler/test_coordinator.hpp>

#include <cstdio>
#include <map>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include "actors.h"
#include "ferry/storage/journal.h"
#include "ferry/test_support/temp_dir.h"
#include "task_edges.h"

namespace fa = ferry::actors;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using TS = ev::TaskStatus;
using SS = ev::SandboxStatus;

namespace {

// The task's edges, listed independently of lifecycle.h (task_edges.h; state_machine_test.cpp
// checks the table against the same list).
using ferry::test::task_edges;
const std::vector<TS>& all_task = ferry::test::all_task_statuses;

std::string str(TS s) { return std::string(sc::to_string(s)); }

/// One event of a task's stream, reduced to what these tests look at.
struct event {
  ev::Event type = ev::Event::NONE;
  std::string from, to;  ///< status changes, task_finished (to), transition_refused
  std::string text;      ///< reasons
};

std::ostream& operator<<(std::ostream& os, const event& e) {
  return os << sc::event_type_name(e.type) << "(" << e.from << " -> " << e.to << ": " << e.text
            << ")";
}

/// The answer to a request, once it came.
template <class... Vs>
struct answer {
  std::optional<std::tuple<Vs...>> value;
  std::optional<caf::error> error;
  caf::actor asker;  ///< the short-lived actor that asks
  bool answered() const { return value || error; }
};

/// Plays the task's sandbox actor: notes what the task sends it. The test sends the task the
/// sandbox actor's messages itself (see the file comment).
caf::behavior sandbox_stand_in(caf::event_based_actor*, std::string id,
                               std::vector<std::string>* log) {
  return {
    [=](fa::start_atom) { log->push_back("start " + id); },
    [=](fa::kill_atom) { log->push_back("kill " + id); },
  };
}

std::unique_ptr<ferry::storage::event_store> open_store(const std::filesystem::path& dir) {
  ferry::storage::journal_options o;
  o.dir = dir;
  o.durability = ferry::storage::durability::periodic;
  auto s = ferry::storage::open_journal(o);
  BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
  return std::move(*s);
}

struct task_fixture;

/// The test in the sandbox actor's part: sends the task what the real sandbox actor sends.
struct sandbox_role {
  task_fixture& f;
  caf::actor task;
  std::string id;
  SS status = SS::none;

  /// A recorded sandbox transition, mirrored to the task (sandbox_actor.cpp: transition()).
  void go(SS to, const std::string& reason = "");
  /// start → spawning → initializing → ready → executing, and the command's start.
  void start_command();
  /// One output batch; true once the task has stored it (the sandbox's backpressure answer).
  bool output(std::vector<std::string> chunks);
  /// The command's exit, then executing → ready.
  void exit(int32_t code);
  /// The sandbox ended: terminating → terminated.
  void end(const std::string& reason = "sandbox exited");
};

struct task_fixture {
  ferry::test::temp_dir dir{"ferry-task-actor"};
  std::unique_ptr<ferry::storage::event_store> store = open_store(dir.path() / "journal");
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;
  /// What the task actors did with their sandbox actors: "spawn <id>", "recover <id>" (spawned
  /// for a sandbox recorded as live), "start <id>", "kill <id>".
  std::vector<std::string> sandbox_log;
  std::vector<caf::actor> spawned;  // stopped at the end, so the actor system can shut down
  int next_id = 0;

  task_fixture() {
    fa::add_message_types(cfg);
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
  }

  ~task_fixture() {
    for (auto& a : spawned)
      caf::anon_send_exit(a, caf::exit_reason::kill);
    sched->run();
    spawned.clear();
    sys.reset();  // before the store: actors append to it
  }

  std::string new_id() {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%08x", 0xa000 + next_id++);
    return buf;
  }

  fa::task_args args(const std::string& id) {
    fa::task_args a;
    a.deps.store = store.get();
    a.id = id;
    a.req = fa::task_request{"make test", "", "alice", "req-" + id};
    a.synchronous_journal = true;
    a.spawn_sandbox = [this](fa::sandbox_args s) {
      sandbox_log.push_back((s.recover_reason ? "recover " : "spawn ") + s.id);
      return sys->spawn(sandbox_stand_in, s.id, &sandbox_log);
    };
    return a;
  }

  caf::actor spawn(fa::task_args a) {
    auto h = sys->spawn(fa::task_actor, std::move(a));
    spawned.push_back(h);
    sched->run();
    return h;
  }

  /// A task actor recovered from `id`'s stream.
  caf::actor recover(const std::string& id, std::string why, bool rerun_lost_turn = false) {
    auto a = args(id);
    a.recover_reason = std::move(why);
    a.rerun_lost_turn = rerun_lost_turn;
    return spawn(std::move(a));
  }

  /// Sends a request from a short-lived actor; the answer lands in the result once the
  /// scheduler has run (`ask` runs it; `ask_later` leaves that to the caller).
  template <class... Vs, class... Ts>
  std::shared_ptr<answer<Vs...>> ask_later(const caf::actor& dest, Ts... xs) {
    auto out = std::make_shared<answer<Vs...>>();
    // (The actors spawned from lambdas here take their inputs as arguments: CAF 0.17 binds
    // a null pointer for the arguments of one that takes none, which UBSan reports.)
    out->asker = sys->spawn(
      [=](caf::event_based_actor* self, caf::actor to) {
        self->request(to, caf::infinite, xs...)
          .then([out](Vs... vs) { out->value = std::make_tuple(std::move(vs)...); },
                [out](caf::error& e) { out->error = e; });
      },
      dest);
    spawned.push_back(out->asker);
    return out;
  }
  template <class... Vs, class... Ts>
  answer<Vs...> ask(const caf::actor& dest, Ts... xs) {
    auto out = ask_later<Vs...>(dest, xs...);
    sched->run();
    return *out;
  }

  /// The exit reason of `h` once it stopped; `watch` runs the scheduler, `watch_later` leaves
  /// that to the caller.
  std::shared_ptr<std::optional<caf::error>> watch_later(const caf::actor& h) {
    auto out = std::make_shared<std::optional<caf::error>>();
    // Kept in `spawned`: an actor nobody holds is destroyed at once.
    spawned.push_back(sys->spawn(
      [out](caf::event_based_actor* self, caf::actor_addr watched) -> caf::behavior {
        self->monitor(watched);
        self->set_down_handler([self, out](caf::down_msg& dm) {
          *out = dm.reason;
          self->quit();
        });
        return {[](int32_t) {}};
      },
      h.address()));
    return out;
  }
  std::shared_ptr<std::optional<caf::error>> watch(const caf::actor& h) {
    auto out = watch_later(h);
    sched->run();
    return out;
  }

  /// The live actor's state (white-box; only while it runs: CAF destroys it when it stops).
  fa::task_state& state(const caf::actor& h) {
    auto* p = dynamic_cast<caf::stateful_actor<fa::task_state>*>(
      caf::actor_cast<caf::abstract_actor*>(h));
    BOOST_REQUIRE(p != nullptr);
    return p->state;
  }

  std::vector<event> events(const std::string& id) {
    std::vector<event> out;
    auto n = store->for_each("task-" + id, {}, [&](const ev::Envelope& e, std::string_view) {
      event x;
      x.type = e.event_type();
      auto s = [](const flatbuffers::String* p) { return p ? p->str() : std::string(); };
      if (auto* c = e.event_as_TaskStateChanged()) {
        x.from = str(c->from());
        x.to = str(c->to());
        x.text = s(c->reason());
      } else if (auto* c = e.event_as_TaskFinished()) {
        x.to = str(c->status());
        x.text = s(c->reason());
      } else if (auto* c = e.event_as_TransitionRefused()) {
        x.from = s(c->from());
        x.to = s(c->to());
        x.text = s(c->machine()) + ": " + s(c->reason());
      } else if (auto* c = e.event_as_SandboxStateChanged()) {
        x.from = std::string(sc::to_string(c->from()));
        x.to = std::string(sc::to_string(c->to()));
        x.text = s(c->sandbox_id());
      }
      out.push_back(std::move(x));
      return true;
    });
    BOOST_REQUIRE(n.ok());
    return out;
  }

  std::vector<ev::Event> types(const std::string& stream) {
    std::vector<ev::Event> out;
    auto n = store->for_each(stream, {}, [&](const ev::Envelope& e, std::string_view) {
      out.push_back(e.event_type());
      return true;
    });
    BOOST_REQUIRE(n.ok());
    return out;
  }

  /// The task's status transitions as recorded, in order (task_finished closes the last one).
  std::vector<std::pair<std::string, std::string>> transitions(const std::string& id) {
    std::vector<std::pair<std::string, std::string>> out;
    std::string status;
    for (const auto& e : events(id)) {
      if (e.type == ev::Event::TaskSubmitted)
        status = "queued";
      else if (e.type == ev::Event::TaskStateChanged || e.type == ev::Event::TaskFinished) {
        out.emplace_back(e.type == ev::Event::TaskFinished ? status : e.from, e.to);
        status = e.to;
      }
    }
    return out;
  }

  /// The status folded from the stream (what every reader of the task sees).
  std::string stored_status(const std::string& id) {
    auto v = fa::load_task_view(*store, id);
    BOOST_REQUIRE(v.ok() && v->has_value());
    return (*v)->status;
  }

  /// A fresh task, submitted: position 0 runs at once (a turn starts: its sandbox is spawned and
  /// told to start), else it waits as queued.
  caf::actor submit(const std::string& id, uint32_t position) {
    auto t = spawn(args(id));
    auto a = ask<bool, std::string>(t, fa::start_atom_v, position, uint32_t{1}, uint32_t{1},
                                    std::string(position ? "the limit is reached" : ""));
    BOOST_REQUIRE(a.value.has_value());
    BOOST_REQUIRE(std::get<0>(*a.value));
    BOOST_REQUIRE_EQUAL(std::get<1>(*a.value), id);
    BOOST_REQUIRE_EQUAL(stored_status(id), position ? "queued" : "running");
    return t;
  }

  std::string sandbox_of(const std::string& id, int n) {
    return "ferry-" + id + "-" + std::to_string(n);
  }

  /// An interrupted task (its earlier ferryd stopped it before its sandbox started), with a live
  /// actor recovered for a resume: it waits for `run`.
  caf::actor interrupted(const std::string& id) {
    auto first = submit(id, 0);
    caf::anon_send_exit(first, caf::exit_reason::kill);  // ferryd stops
    sched->run();
    recover(id, "ferryd restarted");  // the sandbox never started: interrupted, and it stops
    BOOST_REQUIRE_EQUAL(stored_status(id), "interrupted");
    return recover(id, "resumed by alice");
  }
};

void sandbox_role::go(SS to, const std::string& reason) {
  caf::anon_send(task, fa::sbx_state_atom_v, static_cast<int8_t>(status), static_cast<int8_t>(to),
                 reason, std::string("stand-in"), id);
  status = to;
  f.sched->run();
}

void sandbox_role::start_command() {
  go(SS::spawning);
  go(SS::initializing, "sandbox process started; waiting for ferry-init");
  go(SS::ready, "ferry-init is up");
  go(SS::executing, "command started");
  caf::anon_send(task, fa::cmd_start_atom_v, uint32_t{1},
                 std::vector<std::string>{"/bin/sh", "-c", "make test"});
  f.sched->run();
}

bool sandbox_role::output(std::vector<std::string> chunks) {
  std::vector<fa::output_piece> batch;
  for (auto& c : chunks)
    batch.push_back(fa::output_piece{1, 0, std::move(c), 0});
  auto a = f.ask<bool>(task, fa::output_atom_v, std::move(batch));
  return a.value && std::get<0>(*a.value);
}

void sandbox_role::exit(int32_t code) {
  caf::anon_send(task, fa::cmd_exit_atom_v, uint32_t{1}, code, int32_t{0}, uint64_t{5});
  f.sched->run();
  go(SS::ready, "command exited");
}

void sandbox_role::end(const std::string& reason) {
  go(SS::terminating, reason);
  go(SS::terminated, reason);
}

bool contains(const std::vector<std::string>& log, const std::string& line) {
  return std::find(log.begin(), log.end(), line) != log.end();
}

}  // namespace

// Each allowed edge, through the messages that ask for it in production: start and run (the
// task manager), the sandbox actor's reports, abort, and recovery followed by run (a resume).
BOOST_FIXTURE_TEST_CASE(every_allowed_transition_is_recorded_through_the_actors_messages,
                        task_fixture) {
  std::set<std::pair<std::string, std::string>> seen;
  auto note = [&](const std::string& id) {
    for (const auto& t : transitions(id))
      seen.insert(t);
  };

  // queued → running (run from the manager) → succeeded (the command exits 0).
  {
    const auto id = new_id();
    auto t = submit(id, 2);
    auto evs = events(id);
    BOOST_REQUIRE_EQUAL(evs.size(), 2u);
    BOOST_TEST((evs[0].type == ev::Event::TaskSubmitted));
    BOOST_TEST((evs[1].type == ev::Event::TaskQueued));
    BOOST_TEST(sandbox_log.empty());  // waiting: no turn, no sandbox

    auto run = ask<bool>(t, fa::run_atom_v);
    BOOST_TEST((run.value && std::get<0>(*run.value)));
    BOOST_TEST((events(id).back().type == ev::Event::TaskStateChanged));
    BOOST_TEST(events(id).back().from == "queued");
    BOOST_TEST(events(id).back().to == "running");
    BOOST_TEST(state(t).view.status == "running");
    BOOST_TEST(contains(sandbox_log, "spawn " + sandbox_of(id, 1)));
    BOOST_TEST(contains(sandbox_log, "start " + sandbox_of(id, 1)));
    BOOST_TEST((types(fa::session_stream(id)) == std::vector<ev::Event>{ev::Event::TurnStarted}));

    auto stopped = watch(t);
    sandbox_role sb{*this, t, sandbox_of(id, 1)};
    sb.start_command();
    BOOST_TEST(sb.output({"hello\n"}));
    sb.exit(0);
    sb.end();
    BOOST_TEST(events(id).back().to == "succeeded");
    BOOST_TEST(stored_status(id) == "succeeded");
    BOOST_TEST((types(fa::session_stream(id)).back() == ev::Event::SessionClosed));
    BOOST_REQUIRE(stopped->has_value());
    BOOST_TEST(!**stopped);  // stopped normally once the end was recorded
    note(id);
  }

  // queued → running at once (start, position 0) → failed (the command exits 3).
  {
    const auto id = new_id();
    auto t = submit(id, 0);
    auto evs = events(id);
    BOOST_REQUIRE_EQUAL(evs.size(), 2u);
    BOOST_TEST((evs[1].type == ev::Event::TaskStateChanged && evs[1].to == "running"));
    sandbox_role sb{*this, t, sandbox_of(id, 1)};
    sb.start_command();
    sb.exit(3);
    sb.end();
    BOOST_TEST(events(id).back().to == "failed");
    BOOST_TEST(events(id).back().text == "command exited with status 3");
    note(id);
  }

  // running → aborted: the kill goes to the sandbox first, abort_requested is recorded, and the
  // task ends aborted once its sandbox reports its end; the abort is answered then.
  {
    const auto id = new_id();
    auto t = submit(id, 0);
    sandbox_role sb{*this, t, sandbox_of(id, 1)};
    sb.start_command();
    auto abort = ask_later<int32_t>(t, fa::abort_atom_v, std::string("stop"), std::string("bob"));
    sched->run();
    BOOST_TEST(contains(sandbox_log, "kill " + sb.id));
    BOOST_TEST((events(id).back().type == ev::Event::AbortRequested));
    BOOST_TEST(!abort->answered());  // not before the end
    sb.exit(0);  // the command finished just as the kill came: the abort still wins
    sb.go(SS::terminating, "kill requested");
    sb.go(SS::terminated, "killed on request");
    BOOST_TEST(events(id).back().to == "aborted");
    BOOST_REQUIRE(abort->value.has_value());
    BOOST_TEST(std::get<0>(*abort->value) == static_cast<int32_t>(fa::abort_outcome::aborted));
    note(id);
  }

  // queued → aborted: nothing runs, it ends at once.
  {
    const auto id = new_id();
    auto t = submit(id, 3);
    auto abort = ask<int32_t>(t, fa::abort_atom_v, std::string("nah"), std::string("alice"));
    BOOST_REQUIRE(abort.value.has_value());
    BOOST_TEST(std::get<0>(*abort.value) == static_cast<int32_t>(fa::abort_outcome::aborted));
    auto evs = events(id);
    BOOST_REQUIRE_EQUAL(evs.size(), 4u);
    BOOST_TEST((evs[2].type == ev::Event::AbortRequested));
    BOOST_TEST(evs[3].to == "aborted");
    BOOST_TEST(!contains(sandbox_log, "spawn " + sandbox_of(id, 1)));
    note(id);
  }

  // running → interrupted: ferryd stops while the command runs; the recovered task's sandbox
  // actor cannot re-attach and reports the sandbox failed. Then interrupted → running: a
  // resume (recovery, then run) starts a new turn in a fresh sandbox, which succeeds.
  {
    const auto id = new_id();
    auto first = submit(id, 0);
    sandbox_role sb{*this, first, sandbox_of(id, 1)};
    sb.start_command();
    BOOST_TEST(sb.output({"half way\n"}));
    caf::anon_send_exit(first, caf::exit_reason::kill);  // ferryd is gone
    sched->run();

    auto second = recover(id, "ferryd restarted");
    BOOST_TEST(contains(sandbox_log, "recover " + sb.id));
    auto stopped = watch(second);
    sandbox_role lost{*this, second, sb.id, SS::executing};
    lost.go(SS::failed, "sandbox lost: ferryd restarted");
    auto evs = events(id);
    BOOST_REQUIRE_GE(evs.size(), 2u);
    BOOST_TEST((evs[evs.size() - 2].type == ev::Event::TaskInterrupted));
    BOOST_TEST(evs.back().to == "interrupted");
    BOOST_TEST(stored_status(id) == "interrupted");
    BOOST_TEST(stopped->has_value());
    // The session's turn ended, the session stays open for the resume.
    BOOST_TEST((types(fa::session_stream(id)).back() == ev::Event::TurnEnded));

    auto resumed = recover(id, "resumed by alice");
    BOOST_TEST(state(resumed).view.status == "interrupted");  // waits for its slot
    auto run = ask<bool>(resumed, fa::run_atom_v);
    BOOST_TEST((run.value && std::get<0>(*run.value)));
    BOOST_TEST(events(id).back().from == "interrupted");
    BOOST_TEST(events(id).back().to == "running");
    BOOST_TEST(events(id).back().text == "resumed");
    BOOST_TEST(contains(sandbox_log, "start " + sandbox_of(id, 2)));
    BOOST_TEST((types(fa::session_stream(id)).back() == ev::Event::TurnStarted));
    sandbox_role again{*this, resumed, sandbox_of(id, 2)};
    again.start_command();
    again.exit(0);
    again.end();
    BOOST_TEST(stored_status(id) == "succeeded");
    note(id);
  }

  // interrupted → queued: a resumed task that must wait for a slot is told its place and is
  // recorded as queued again; it can then be aborted like any waiting task (queued → aborted).
  {
    const auto id = new_id();
    auto resumed = interrupted(id);
    caf::anon_send(resumed, fa::queued_atom_v, uint32_t{2}, uint32_t{1}, uint32_t{1},
                   std::string("the limit is reached"));
    sched->run();
    auto evs = events(id);
    BOOST_REQUIRE_GE(evs.size(), 2u);
    BOOST_TEST(evs[evs.size() - 2].from == "interrupted");
    BOOST_TEST(evs[evs.size() - 2].to == "queued");
    BOOST_TEST((evs.back().type == ev::Event::TaskQueued));
    BOOST_TEST(stored_status(id) == "queued");
    BOOST_TEST(state(resumed).view.status == "queued");
    auto abort = ask<int32_t>(resumed, fa::abort_atom_v, std::string("never mind"),
                              std::string("alice"));
    BOOST_REQUIRE(abort.value.has_value());
    BOOST_TEST(std::get<0>(*abort.value) == static_cast<int32_t>(fa::abort_outcome::aborted));
    BOOST_TEST(stored_status(id) == "aborted");
    BOOST_TEST(!contains(sandbox_log, "start " + sandbox_of(id, 2)));  // no turn ran
    note(id);
  }

  std::set<std::pair<std::string, std::string>> want;
  for (const auto& [from, to] : task_edges)
    want.insert({str(from), str(to)});
  BOOST_TEST((seen == want));
  BOOST_TEST(seen.size() == 8u);
}

// Every forbidden (from, to) of the table, for each status a task actor can be in while it runs
// (queued, running, interrupted waiting for a resume): the message that asks for `to` is sent,
// and must be recorded as transition_refused with the status unchanged and an error for the
// requester; after that the next allowed transition still applies.
BOOST_FIXTURE_TEST_CASE(every_forbidden_transition_is_refused_and_recorded, task_fixture) {
  int refused = 0, no_message = 0;
  for (auto from : {TS::queued, TS::running, TS::interrupted})
    for (auto to : all_task) {
      if (fa::task_transition_allowed(from, to))
        continue;
      if (to == TS::interrupted) {
        // Only recovery decides it (a running task whose sandbox was lost with ferryd); no
        // message asks a queued or interrupted task for it.
        BOOST_TEST((from != TS::running));
        ++no_message;
        continue;
      }
      const auto id = new_id();
      BOOST_TEST_CONTEXT("task " << str(from) << " -> " << str(to) << " (" << id << ")") {
        caf::actor t = from == TS::queued    ? submit(id, 1)
                       : from == TS::running ? submit(id, 0)
                                             : interrupted(id);
        BOOST_REQUIRE_EQUAL(state(t).view.status, str(from));
        const auto before = events(id);
        const auto log_before = sandbox_log.size();

        // The request, and what the requester hears.
        bool error_answered = false;
        switch (to) {
          case TS::queued: {  // a second submission
            auto a = ask<bool, std::string>(t, fa::start_atom_v, uint32_t{0}, uint32_t{0},
                                            uint32_t{1}, std::string());
            error_answered = a.error.has_value() && !a.value;
            break;
          }
          case TS::running: {  // the manager's run
            auto a = ask<bool>(t, fa::run_atom_v);
            error_answered = a.error.has_value() && !a.value;
            break;
          }
          case TS::aborted: {  // abort's answer for a task that has ended: already_finished
            auto a = ask<int32_t>(t, fa::abort_atom_v, std::string("stop"), std::string("bob"));
            error_answered = a.value && std::get<0>(*a.value) ==
                                          static_cast<int32_t>(fa::abort_outcome::already_finished);
            break;
          }
          case TS::succeeded:
          case TS::failed: {
            // A sandbox reporting a command's end and its own to a task that runs no turn.
            // One-way messages: there is no requester to answer.
            sandbox_role sb{*this, t, "ferry-" + id + "-stray", SS::executing};
            if (to == TS::succeeded) {
              caf::anon_send(t, fa::cmd_exit_atom_v, uint32_t{1}, int32_t{0}, int32_t{0},
                             uint64_t{1});
              sched->run();
              sb.go(SS::terminating, "sandbox exited");
              sb.go(SS::terminated, "sandbox exited");
            } else {
              sb.go(SS::failed, "runsc died");
            }
            error_answered = true;
            break;
          }
          case TS::interrupted: break;
        }
        BOOST_TEST(error_answered);

        const auto after = events(id);
        BOOST_REQUIRE_GT(after.size(), before.size());
        const auto& last = after.back();
        BOOST_TEST((last.type == ev::Event::TransitionRefused));
        BOOST_TEST(last.from == str(from));
        BOOST_TEST(last.to == str(to));
        BOOST_TEST(last.text.rfind("task: ", 0) == 0);
        for (size_t i = before.size(); i < after.size(); ++i)
          BOOST_TEST((after[i].type != ev::Event::TaskStateChanged &&
                      after[i].type != ev::Event::TaskFinished),
                     "no status change recorded: " << after[i]);
        BOOST_TEST(stored_status(id) == str(from));
        BOOST_TEST(state(t).view.status == str(from));
        BOOST_TEST(!state(t).finishing);
        BOOST_TEST(sandbox_log.size() == log_before);  // nothing started, nothing killed
        ++refused;

        // Nothing changed: the next allowed transition still applies.
        if (from == TS::running) {
          ask_later<int32_t>(t, fa::abort_atom_v, std::string("after"), std::string("b"));
          sched->run();
          BOOST_TEST((events(id).back().type == ev::Event::AbortRequested));
          BOOST_TEST(contains(sandbox_log, "kill " + sandbox_of(id, 1)));
        } else {
          auto a = ask<bool>(t, fa::run_atom_v);
          BOOST_TEST((a.value && std::get<0>(*a.value)));
          BOOST_TEST(events(id).back().from == str(from));
          BOOST_TEST(events(id).back().to == "running");
        }
        caf::anon_send_exit(t, caf::exit_reason::kill);
        sched->run();
      }
    }
  // 28 forbidden edges in all; the 18 from succeeded, failed and aborted are the next test's.
  BOOST_TEST(refused == 8);
  BOOST_TEST(no_message == 2);
  BOOST_TEST_MESSAGE("task actor: " << refused << " forbidden transitions refused and recorded, "
                                    << no_message << " asked for by no message");
}

// Allowed by the table, but not now: a run that comes after an abort of a queued task (the
// manager's dispatch racing the abort) is refused and recorded; the abort goes on.
BOOST_FIXTURE_TEST_CASE(a_run_after_an_abort_is_refused, task_fixture) {
  const auto id = new_id();
  auto t = submit(id, 1);
  auto abort = ask_later<int32_t>(t, fa::abort_atom_v, std::string("nah"), std::string("alice"));
  auto run = ask_later<bool>(t, fa::run_atom_v);
  sched->run();
  BOOST_TEST(run->error.has_value());
  BOOST_REQUIRE(abort->value.has_value());
  BOOST_TEST(std::get<0>(*abort->value) == static_cast<int32_t>(fa::abort_outcome::aborted));
  auto evs = events(id);
  BOOST_REQUIRE_EQUAL(evs.size(), 5u);
  BOOST_TEST((evs[2].type == ev::Event::TransitionRefused));
  BOOST_TEST(evs[2].from == "queued");
  BOOST_TEST(evs[2].to == "running");
  BOOST_TEST((evs[3].type == ev::Event::AbortRequested));
  BOOST_TEST(evs[4].to == "aborted");
  BOOST_TEST(sandbox_log.empty());
}

// An abort that comes while the task is already ending (its command succeeded, the end is being
// recorded) is told so: already_finished, not aborted.
BOOST_FIXTURE_TEST_CASE(an_abort_while_the_task_ends_is_answered_already_finished,
                        task_fixture) {
  const auto id = new_id();
  auto t = submit(id, 0);
  sandbox_role sb{*this, t, sandbox_of(id, 1)};
  sb.start_command();
  sb.exit(0);
  sb.go(SS::terminating, "sandbox exited");
  // terminated, and the abort, before the task runs again: it records the sandbox's end, then
  // asks its session to close (finishing) and handles the abort meanwhile.
  caf::anon_send(t, fa::sbx_state_atom_v, static_cast<int8_t>(SS::terminating),
                 static_cast<int8_t>(SS::terminated), std::string("sandbox exited"),
                 std::string("stand-in"), sb.id);
  auto abort = ask_later<int32_t>(t, fa::abort_atom_v, std::string("late"), std::string("bob"));
  sched->run();
  BOOST_TEST(events(id).back().to == "succeeded");
  BOOST_REQUIRE(abort->value.has_value());
  BOOST_TEST(std::get<0>(*abort->value) ==
             static_cast<int32_t>(fa::abort_outcome::already_finished));
  BOOST_TEST(!contains(sandbox_log, "kill " + sb.id));
}

// From succeeded, failed and aborted no transition is allowed, and no actor is left to ask: the
// task's actor stops once task_finished is recorded, and one recovered on the stream fences it
// and stops. Every request gets an error; the stream gains nothing but actor_recovered.
BOOST_FIXTURE_TEST_CASE(a_finished_task_has_no_actor_to_change_it, task_fixture) {
  int refused = 0;
  for (auto end : {TS::succeeded, TS::failed, TS::aborted}) {
    const auto id = new_id();
    BOOST_TEST_CONTEXT("task " << str(end) << " (" << id << ")") {
      auto t = submit(id, 0);
      auto stopped = watch(t);
      sandbox_role sb{*this, t, sandbox_of(id, 1)};
      if (end == TS::aborted) {
        ask_later<int32_t>(t, fa::abort_atom_v, std::string("x"), std::string("y"));
        sb.go(SS::terminating, "kill requested");
        sb.go(SS::terminated, "killed on request");
      } else {
        sb.start_command();
        sb.exit(end == TS::succeeded ? 0 : 1);
        sb.end();
      }
      BOOST_REQUIRE_EQUAL(stored_status(id), str(end));
      BOOST_REQUIRE(stopped->has_value());
      const auto ended = events(id).size();

      // Every request, to the stopped actor and to one recovered on the stream (in its mailbox
      // before it first runs: they wait behind its recovery).
      auto ask_all = [&](const caf::actor& h) {
        auto start = ask_later<bool, std::string>(h, fa::start_atom_v, uint32_t{0}, uint32_t{0},
                                                  uint32_t{1}, std::string());
        auto run = ask_later<bool>(h, fa::run_atom_v);
        auto abort = ask_later<int32_t>(h, fa::abort_atom_v, std::string("x"), std::string("y"));
        auto output = ask_later<bool>(h, fa::output_atom_v,
                                      std::vector<fa::output_piece>{{1, 0, "late", 0}});
        for (const auto& asker : {start->asker, run->asker, abort->asker, output->asker}) {
          BOOST_REQUIRE(sched->prioritize(asker));
          sched->run_once();
        }
        caf::anon_send(h, fa::cmd_exit_atom_v, uint32_t{1}, int32_t{0}, int32_t{0}, uint64_t{1});
        caf::anon_send(h, fa::sbx_state_atom_v, static_cast<int8_t>(SS::terminating),
                       static_cast<int8_t>(SS::terminated), std::string("late"),
                       std::string("stand-in"), sb.id);
        sched->run();
        // (abort's answer for a task that has ended: already_finished)
        const bool abort_refused =
          (abort->error.has_value() && !abort->value) ||
          (abort->value && std::get<0>(*abort->value) ==
                             static_cast<int32_t>(fa::abort_outcome::already_finished));
        const std::pair<const char*, bool> errors[] = {
          {"start", start->error.has_value() && !start->value},
          {"run", run->error.has_value() && !run->value},
          {"abort", abort_refused},
          {"output", output->error.has_value() && !output->value}};
        for (const auto& [what, err] : errors) {
          BOOST_TEST(err, what << " answered with an error");
          refused += err;
        }
      };
      ask_all(t);
      BOOST_TEST(events(id).size() == ended);

      auto a = args(id);
      a.recover_reason = "ferryd restarted";
      auto again = sys->spawn(fa::task_actor, std::move(a));
      spawned.push_back(again);
      auto stopped_again = watch_later(again);
      ask_all(again);
      auto evs = events(id);
      BOOST_REQUIRE_EQUAL(evs.size(), ended + 1);
      BOOST_TEST((evs.back().type == ev::Event::ActorRecovered));
      BOOST_TEST(stored_status(id) == str(end));
      BOOST_TEST(stopped_again->has_value());
    }
  }
  BOOST_TEST(refused == 3 * 2 * 4);
}

// Recovery: a task actor respawned on the stream of a live one (a snapshot, then more events)
// replays to the same state, records actor_recovered, and the old incarnation's next append is
// refused: it stops "fenced out by a newer incarnation" without writing. The new one finishes
// the task with the sandbox it found recorded as live.
BOOST_FIXTURE_TEST_CASE(a_respawned_task_replays_to_the_same_state_and_fences_out_the_old_one,
                        task_fixture) {
  const auto id = new_id();
  auto old_one = submit(id, 0);
  sandbox_role sb{*this, old_one, sandbox_of(id, 1)};
  sb.start_command();
  std::vector<std::string> many;
  for (int i = 0; i < 70; ++i)
    many.push_back("line " + std::to_string(i) + "\n");
  BOOST_TEST(sb.output(many));  // past 64 events: a snapshot
  auto steer = ask<int32_t, std::string, uint64_t>(old_one, fa::steer_atom_v,
                                                   std::string("carol"), std::string("use tabs"));
  BOOST_REQUIRE(steer.value.has_value());
  BOOST_TEST(std::get<0>(*steer.value) == 0);
  BOOST_TEST(sb.output({"err\n"}));

  auto snap = store->load_snapshot("task-" + id);
  BOOST_REQUIRE(snap.ok() && snap->has_value());
  auto& old_state = state(old_one);
  auto expected = old_state.snapshot();
  expected["view"].erase("last_seq");
  const auto old_version = old_state.journal.version;
  const auto old_incarnation = old_state.journal.incarnation;
  BOOST_TEST(old_state.journal.snapshot_version > 0u);
  const auto old_fenced = watch(old_one);

  auto new_one = recover(id, "actor crashed: test", true);
  auto& new_state = state(new_one);
  auto got = new_state.snapshot();
  got["view"].erase("last_seq");
  BOOST_TEST(got.dump() == expected.dump());
  BOOST_TEST(new_state.journal.snapshot_version == (*snap)->sequence);
  BOOST_TEST(new_state.journal.replayed == old_version - (*snap)->sequence);
  BOOST_TEST(new_state.journal.version == old_version + 1);
  BOOST_TEST(new_state.journal.incarnation == old_incarnation + 1);
  BOOST_TEST((events(id).back().type == ev::Event::ActorRecovered));
  BOOST_TEST(contains(sandbox_log, "recover " + sb.id));  // its sandbox is recorded as live
  BOOST_TEST(!old_fenced->has_value());                   // the old one does not know yet

  // The old incarnation's next append (a steering comment) is refused: it stops, fenced out,
  // and its stream did not change.
  const auto n = events(id).size();
  auto late = ask<int32_t, std::string, uint64_t>(old_one, fa::steer_atom_v, std::string("carol"),
                                                  std::string("too late"));
  BOOST_TEST(!late.value.has_value());
  BOOST_REQUIRE(old_fenced->has_value());
  BOOST_TEST(to_string(**old_fenced).find(std::string(fa::fenced_reason)) != std::string::npos);
  BOOST_TEST(events(id).size() == n);

  // The new incarnation goes on: its re-attached sandbox's command ends, and so does the task.
  sandbox_role reattached{*this, new_one, sb.id, SS::executing};
  reattached.exit(0);
  reattached.end();
  BOOST_TEST(stored_status(id) == "succeeded");
  auto session = types(fa::session_stream(id));
  BOOST_TEST((std::count(session.begin(), session.end(), ev::Event::ActorRecovered) == 1));
  BOOST_TEST((session.back() == ev::Event::SessionClosed));
}

// The wall-clock limit's timer is a message the task sends itself (wall_clock, with the number
// of the arming); here the test delivers it as the clock would. Firing on a running task: the
// limit is recorded, the sandbox killed, and the task fails naming the limit once the sandbox
// is gone. A stale or repeated timer changes nothing.
BOOST_FIXTURE_TEST_CASE(the_wall_clock_timer_records_the_limit_kills_the_sandbox_and_fails_it,
                        task_fixture) {
  const auto id = new_id();
  auto a = args(id);
  a.req.wall_clock_limit = std::chrono::minutes(15);
  auto t = spawn(std::move(a));
  auto started = ask<bool, std::string>(t, fa::start_atom_v, uint32_t{0}, uint32_t{1},
                                        uint32_t{1}, std::string());
  BOOST_REQUIRE(started.value.has_value());
  sandbox_role sb{*this, t, sandbox_of(id, 1)};
  sb.start_command();
  const uint64_t arm = state(t).wall_clock_arms;
  BOOST_TEST(arm == 1u);  // armed when it began to run

  caf::anon_send(t, fa::wall_clock_atom_v, arm + 1);  // not this run's timer
  sched->run();
  BOOST_TEST(!contains(sandbox_log, "kill " + sb.id));
  BOOST_TEST(fa::load_task_view(*store, id).value()->limits_reached.empty());

  caf::anon_send(t, fa::wall_clock_atom_v, arm);
  sched->run();
  BOOST_TEST(contains(sandbox_log, "kill " + sb.id));
  auto v = fa::load_task_view(*store, id).value();
  BOOST_REQUIRE(v->limits_reached.size() == 1u);
  BOOST_TEST(v->limits_reached[0].kind == "task_wall_clock");
  BOOST_TEST(v->limits_reached[0].limit == 900'000u);
  BOOST_TEST(v->status == "running");  // until its sandbox is gone

  caf::anon_send(t, fa::wall_clock_atom_v, arm);  // again: already handled
  sched->run();
  // An abort now is too late: the task ends failed, as the limit decided.
  auto aborted = ask_later<int32_t>(t, fa::abort_atom_v, std::string("stop"), std::string("bob"));
  sched->run();
  sb.end("killed");
  BOOST_REQUIRE(aborted->value.has_value());
  BOOST_TEST(std::get<0>(*aborted->value) == static_cast<int32_t>(fa::abort_outcome::already_finished));
  v = fa::load_task_view(*store, id).value();
  BOOST_TEST(v->status == "failed");
  BOOST_TEST(v->reason == "wall-clock limit of 15m reached");
  BOOST_TEST(v->limits_reached.size() == 1u);
  BOOST_TEST(!v->abort_requested);
}

// After a restart the timer is armed with the time that is left of the recorded limit, counted
// from the recorded change to running: when none is left it fires at once. And a limit recorded
// before the restart is carried out (the sandbox killed), not recorded again.
BOOST_FIXTURE_TEST_CASE(a_recovered_task_keeps_its_deadline_across_a_restart, task_fixture) {
  const auto id = new_id();
  auto a = args(id);
  a.req.wall_clock_limit = std::chrono::seconds(1);
  auto first = spawn(std::move(a));
  auto started = ask<bool, std::string>(first, fa::start_atom_v, uint32_t{0}, uint32_t{1},
                                        uint32_t{1}, std::string());
  BOOST_REQUIRE(started.value.has_value());
  sandbox_role sb{*this, first, sandbox_of(id, 1)};
  sb.start_command();
  BOOST_TEST(fa::load_task_view(*store, id).value()->wall_clock_limit_ms == 1000u);
  caf::anon_send_exit(first, caf::exit_reason::kill);  // ferryd stops; its timer with it
  sched->run();
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // the deadline passes meanwhile

  // Recovered with the sandbox alive: the time is up, so the limit is reached at once.
  auto second = recover(id, "ferryd restarted");
  BOOST_TEST(contains(sandbox_log, "recover " + sb.id));
  BOOST_TEST(contains(sandbox_log, "kill " + sb.id));
  auto v = fa::load_task_view(*store, id).value();
  BOOST_REQUIRE(v->limits_reached.size() == 1u);
  BOOST_TEST(v->limits_reached[0].time_ns - v->running_since_ns >= 1'000'000'000);

  // ferryd stops again before the sandbox is gone: the next incarnation kills it again and
  // records nothing new; the task fails naming the limit.
  caf::anon_send_exit(second, caf::exit_reason::kill);
  sched->run();
  sandbox_log.clear();
  auto third = recover(id, "ferryd restarted");
  BOOST_TEST(contains(sandbox_log, "kill " + sb.id));
  sandbox_role reattached{*this, third, sb.id, SS::executing};
  reattached.end("killed");
  v = fa::load_task_view(*store, id).value();
  BOOST_TEST(v->status == "failed");
  BOOST_TEST(v->reason == "wall-clock limit of 1s reached");
  BOOST_TEST(v->limits_reached.size() == 1u);
}

// A resume is a fresh run: the limit counts from the change interrupted → running, and the
// timer is armed for it.
BOOST_FIXTURE_TEST_CASE(a_resumed_task_gets_its_wall_clock_from_the_resume, task_fixture) {
  const auto id = new_id();
  auto t = interrupted(id);
  const auto before = fa::load_task_view(*store, id).value();
  BOOST_TEST(before->wall_clock_limit_ms == 4u * 3600 * 1000);  // task_deps' default
  BOOST_TEST(state(t).wall_clock_arms == 0u);  // interrupted: nothing runs, no timer
  auto run = ask<bool>(t, fa::run_atom_v);
  BOOST_REQUIRE(run.value.has_value());
  const auto after = fa::load_task_view(*store, id).value();
  BOOST_TEST(after->status == "running");
  BOOST_TEST(after->running_since_ns > before->running_since_ns);
  BOOST_TEST(state(t).wall_clock_arms == 1u);
  BOOST_TEST(after->limits_reached.empty());
}
