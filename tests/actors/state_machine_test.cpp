// The state machines of the task, session and sandbox actors (ferry/actors/lifecycle.h), tested
// deterministically: the tables exhaustively against an independent list of edges, and the
// sandbox and session actors under CAF's test coordinator (one thread, every message run by the
// test), where every allowed transition must be recorded as the state change and every forbidden
// one as `transition_refused` with the state unchanged — never applied silently.

#define BOOST_TEST_MODULE actors_state_machines
#include <boost/test/unit_test.hpp>

#include <caf/all.hpp>
#include <caf/scheduler/test_coordinator.hpp>

#include <set>
#include <utility>

#include "actors.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/storage/journal.h"
#include "ferry/test_support/temp_dir.h"
#include "task_edges.h"

namespace fa = ferry::actors;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using TS = ev::TaskStatus;
using SS = ev::SandboxStatus;

namespace {

// -- the edges, listed independently of lifecycle.h -------------------------------------------------

using ferry::test::task_edges;

const std::vector<SS> live_sandbox = {SS::spawning, SS::initializing, SS::cloning, SS::ready,
                                      SS::executing, SS::pushing,    SS::terminating};

std::set<std::pair<SS, SS>> sandbox_edges() {
  std::set<std::pair<SS, SS>> e = {
    {SS::none, SS::spawning},          {SS::spawning, SS::initializing},
    {SS::initializing, SS::cloning},   {SS::initializing, SS::ready},
    {SS::cloning, SS::ready},          {SS::ready, SS::executing},
    {SS::executing, SS::pushing},      {SS::executing, SS::ready},
    {SS::pushing, SS::executing},      {SS::pushing, SS::ready},
    {SS::terminating, SS::terminated},
  };
  for (auto s : live_sandbox) {
    e.insert({s, SS::failed});
    if (s != SS::terminating)
      e.insert({s, SS::terminating});
  }
  return e;
}

const std::vector<TS>& all_task = ferry::test::all_task_statuses;
const std::vector<SS> all_sandbox = {SS::none,      SS::spawning,     SS::running,
                                     SS::terminating, SS::terminated, SS::failed,
                                     SS::initializing, SS::cloning,   SS::ready,
                                     SS::executing,  SS::pushing};

std::unique_ptr<ferry::storage::event_store> open_store(const std::filesystem::path& dir) {
  ferry::storage::journal_options o;
  o.dir = dir;
  o.durability = ferry::storage::durability::periodic;
  auto s = ferry::storage::open_journal(o);
  BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
  return std::move(*s);
}

/// One actor system on the test coordinator: nothing runs until the test says so.
struct coordinator_fixture {
  ferry::test::temp_dir dir{"ferry-sm"};
  std::unique_ptr<ferry::storage::event_store> store = open_store(dir.path() / "journal");
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;

  coordinator_fixture() {
    fa::add_message_types(cfg);
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
  }

  /// The events of `stream` as (type, from, to) for state changes, (type, "", "") else.
  std::vector<std::tuple<ev::Event, std::string, std::string>> events(const std::string& stream) {
    std::vector<std::tuple<ev::Event, std::string, std::string>> out;
    auto n = store->for_each(stream, {}, [&](const ev::Envelope& e, std::string_view) {
      std::string from, to;
      if (e.event_type() == ev::Event::SandboxStateChanged) {
        from = sc::to_string(e.event_as_SandboxStateChanged()->from());
        to = sc::to_string(e.event_as_SandboxStateChanged()->to());
      } else if (e.event_type() == ev::Event::TransitionRefused) {
        from = e.event_as_TransitionRefused()->from()->str();
        to = e.event_as_TransitionRefused()->to()->str();
      }
      out.emplace_back(e.event_type(), from, to);
      return true;
    });
    BOOST_REQUIRE(n.ok());
    return out;
  }
};

/// A runtime whose sandboxes do nothing by themselves: the test plays ferry-init through the
/// observer the sandbox actor hands to start().
struct scripted_runtime final : ferry::sandbox::sandbox_runtime {
  struct box final : ferry::sandbox::sandbox {
    explicit box(std::string id) : id_(std::move(id)) {}
    const std::string& id() const override { return id_; }
    ferry::result<void> run(const ferry::sandbox::command_spec&) override {
      return ferry::fail("scripted sandboxes run nothing");
    }
    ferry::result<void> signal(uint32_t, int, bool) override { return {}; }
    ferry::result<void> write_stdin(uint32_t, std::string_view, bool) override { return {}; }
    ferry::result<void> release() override { return {}; }
    ferry::result<void> renew_egress() override { return {}; }
    static ferry::error_info no_files() { return ferry::fail("scripted sandboxes have no files"); }
    ferry::result<ferry::sandbox::file_text> read_file(const std::string&, const ferry::sandbox::read_options&) override {
      return no_files();
    }
    ferry::result<ferry::sandbox::file_written> write_file(const std::string&, std::string_view, uint32_t) override {
      return no_files();
    }
    ferry::result<ferry::sandbox::file_edited> edit_file(const std::string&, std::string_view, std::string_view,
                                                         bool) override {
      return no_files();
    }
    ferry::result<ferry::sandbox::dir_listing> list_dir(const std::string&, uint32_t) override { return no_files(); }
    ferry::result<ferry::sandbox::glob_matches> glob(const std::string&, const ferry::sandbox::glob_options&) override {
      return no_files();
    }
    ferry::result<ferry::sandbox::grep_matches> grep(const std::string&, const ferry::sandbox::grep_options&) override {
      return no_files();
    }
    ferry::result<void> save_root_layer(const std::filesystem::path&) override { return no_files(); }
    void kill() override {}
    void detach() override {}
    void wait() override {}
    std::string id_;
  };

  std::string_view name() const override { return "scripted"; }
  ferry::result<std::unique_ptr<ferry::sandbox::sandbox>> start(
    const ferry::sandbox::sandbox_spec& spec, ferry::sandbox::sandbox_observer& o) override {
    observer = &o;
    return std::unique_ptr<ferry::sandbox::sandbox>(std::make_unique<box>(spec.id));
  }
  using ferry::sandbox::sandbox_runtime::attach;
  ferry::result<std::unique_ptr<ferry::sandbox::sandbox>> attach(
    const std::string&, std::span<const ferry::sandbox::resume_point>,
    ferry::sandbox::sandbox_observer&) override {
    return ferry::fail(ferry::errc::not_found, "scripted sandboxes cannot be re-attached");
  }
  ferry::result<std::vector<std::string>> list_live() override {
    return std::vector<std::string>{};
  }
  ferry::result<size_t> cleanup_orphans(const std::set<std::string>&) override { return 0; }

  ferry::sandbox::sandbox_observer* observer = nullptr;
};

/// Path of allowed transitions from none to `target` (breadth-first over the table).
std::vector<SS> path_to(SS target) {
  std::map<SS, SS> prev;
  std::deque<SS> todo{SS::none};
  std::set<SS> seen{SS::none};
  while (!todo.empty()) {
    auto cur = todo.front();
    todo.pop_front();
    if (cur == target)
      break;
    for (auto n : all_sandbox)
      if (fa::sandbox_transition_allowed(cur, n) && seen.insert(n).second) {
        prev[n] = cur;
        todo.push_back(n);
      }
  }
  std::vector<SS> p;
  if (target != SS::none && !prev.count(target))
    return {SS::none};  // unreachable marker
  for (auto s = target; s != SS::none; s = prev[s])
    p.insert(p.begin(), s);
  return p;
}

}  // namespace

BOOST_AUTO_TEST_CASE(task_table_matches_the_listed_edges) {
  int allowed = 0;
  for (auto from : all_task)
    for (auto to : all_task) {
      const bool want = task_edges.count({from, to}) > 0;
      BOOST_CHECK_MESSAGE(fa::task_transition_allowed(from, to) == want,
                          "task " << sc::to_string(from) << " -> " << sc::to_string(to));
      allowed += want;
    }
  BOOST_TEST(allowed == 8);
  for (auto s : all_task)
    BOOST_TEST(fa::task_status_terminal(s) == (s != TS::queued && s != TS::running));
}

BOOST_AUTO_TEST_CASE(session_table_matches_the_listed_edges) {
  using fa::session_status;
  const std::set<std::pair<session_status, session_status>> edges = {
    {session_status::idle, session_status::in_turn},
    {session_status::idle, session_status::closed},
    {session_status::in_turn, session_status::idle},
    {session_status::in_turn, session_status::closed},
  };
  for (auto from : {session_status::idle, session_status::in_turn, session_status::closed})
    for (auto to : {session_status::idle, session_status::in_turn, session_status::closed})
      BOOST_CHECK_MESSAGE(fa::session_transition_allowed(from, to) == (edges.count({from, to}) > 0),
                          "session " << fa::to_string(from) << " -> " << fa::to_string(to));
}

BOOST_AUTO_TEST_CASE(sandbox_table_matches_the_listed_edges) {
  const auto edges = sandbox_edges();
  for (auto from : all_sandbox)
    for (auto to : all_sandbox)
      BOOST_CHECK_MESSAGE(fa::sandbox_transition_allowed(from, to) == (edges.count({from, to}) > 0),
                          "sandbox " << sc::to_string(from) << " -> " << sc::to_string(to));
}

// Every (from, to) pair on the actor: drive a fresh sandbox actor to `from` along allowed
// transitions, request `to`, and read its stream back.
BOOST_FIXTURE_TEST_CASE(sandbox_actor_records_allowed_and_refuses_forbidden, coordinator_fixture) {
  int n = 0, applied = 0, refused = 0;
  for (auto from : all_sandbox) {
    auto path = path_to(from);
    if (from != SS::none && path == std::vector<SS>{SS::none})
      continue;  // `running` (schema v1 only) is never reached
    for (auto to : all_sandbox) {
      const std::string id = "sm-" + std::to_string(n++);
      fa::sandbox_args a;
      a.store = store.get();
      a.id = id;
      a.task_id = "t" + id;
      a.synchronous_journal = true;
      auto actor = sys->spawn(fa::sandbox_actor, std::move(a));
      sched->run();
      caf::scoped_actor self{*sys};
      for (auto step : path) {
        self->send(actor, fa::goto_atom_v, static_cast<int8_t>(step), std::string("path"));
        sched->run();
      }
      const auto before = events(fa::sandbox_stream(id)).size();
      BOOST_REQUIRE_EQUAL(before, path.size());
      self->send(actor, fa::goto_atom_v, static_cast<int8_t>(to), std::string("probe"));
      sched->run();
      auto evs = events(fa::sandbox_stream(id));
      BOOST_REQUIRE_EQUAL(evs.size(), before + 1);
      const auto& [type, f, t] = evs.back();
      BOOST_TEST(f == std::string(sc::to_string(from)));
      BOOST_TEST(t == std::string(sc::to_string(to)));
      if (fa::sandbox_transition_allowed(from, to)) {
        BOOST_TEST((type == ev::Event::SandboxStateChanged));
        ++applied;
      } else {
        BOOST_TEST((type == ev::Event::TransitionRefused));
        ++refused;
        // The state did not change: the next allowed step from `from` still applies.
        for (auto next : all_sandbox)
          if (fa::sandbox_transition_allowed(from, next)) {
            self->send(actor, fa::goto_atom_v, static_cast<int8_t>(next), std::string("after"));
            sched->run();
            auto after = events(fa::sandbox_stream(id));
            BOOST_REQUIRE_EQUAL(after.size(), before + 2);
            BOOST_TEST((std::get<0>(after.back()) == ev::Event::SandboxStateChanged));
            BOOST_TEST(std::get<1>(after.back()) == std::string(sc::to_string(from)));
            break;
          }
      }
      self->send_exit(actor, caf::exit_reason::user_shutdown);
      sched->run();
    }
  }
  BOOST_TEST(applied == static_cast<int>(sandbox_edges().size()));
  BOOST_TEST(refused == n - applied);
  BOOST_TEST(n == 10 * 11);  // every from-state but `running` (schema v1 only), every to-state
  BOOST_TEST_MESSAGE("sandbox actor: " << applied << " transitions applied, " << refused
                                       << " refused");
}

// The session: turn_begin / turn_end / close are its transitions.
BOOST_FIXTURE_TEST_CASE(session_actor_records_allowed_and_refuses_forbidden, coordinator_fixture) {
  using fa::session_status;
  auto spawn = [&](const std::string& task) {
    fa::session_args a;
    a.store = store.get();
    a.task_id = task;
    a.user = "u";
    a.steering = {{3, "first comment"}, {5, "second"}};
    a.synchronous_journal = true;
    auto s = sys->spawn(fa::session_actor, std::move(a));
    sched->run();
    return s;
  };
  caf::scoped_actor self{*sys};
  // Ask and collect the answer (ok / refused) deterministically.
  auto ask_turn = [&](const caf::actor& s, std::string input, std::string sandbox) {
    auto h = self->request(s, caf::infinite, fa::turn_begin_atom_v, input, sandbox);
    std::optional<bool> ok;
    sched->run();
    h.receive([&](uint32_t, std::vector<std::string>&) { ok = true; },
              [&](caf::error&) { ok = false; });
    return ok.value_or(false);
  };
  auto ask_bool = [&](const caf::actor& s, auto... xs) {
    auto h = self->request(s, caf::infinite, xs...);
    std::optional<bool> ok;
    sched->run();
    h.receive([&](bool) { ok = true; }, [&](caf::error&) { ok = false; });
    return ok.value_or(false);
  };

  auto last_type = [&](const std::string& task) {
    auto evs = events(fa::session_stream(task));
    return evs.empty() ? ev::Event::NONE : std::get<0>(evs.back());
  };

  // idle: turn_end refused; turn_begin allowed (delivers both pending comments).
  auto s1 = spawn("s1");
  BOOST_TEST(!ask_bool(s1, fa::turn_end_atom_v, std::string("completed"), uint64_t{0}, uint64_t{0}));
  BOOST_TEST((last_type("s1") == ev::Event::TransitionRefused));
  BOOST_TEST(ask_turn(s1, std::string("work"), std::string("sb-1")));
  BOOST_TEST((last_type("s1") == ev::Event::TurnStarted));
  {
    auto evs = store->read_stream(fa::session_stream("s1"), 2, 1);
    BOOST_REQUIRE(evs.ok() && evs->size() == 1);
    auto e = sc::verify_envelope(evs->front());
    BOOST_REQUIRE(e.ok());
    auto* steering = (*e)->event_as_TurnStarted()->steering();
    BOOST_REQUIRE(steering != nullptr);
    BOOST_TEST(steering->size() == 2u);
  }
  // in_turn: turn_begin refused; turn_end allowed; then close allowed (actor stops).
  BOOST_TEST(!ask_turn(s1, std::string("again"), std::string("sb-2")));
  BOOST_TEST((last_type("s1") == ev::Event::TransitionRefused));
  BOOST_TEST(ask_bool(s1, fa::turn_end_atom_v, std::string("completed"), uint64_t{10}, uint64_t{20}));
  BOOST_TEST((last_type("s1") == ev::Event::TurnEnded));
  BOOST_TEST(ask_bool(s1, fa::close_atom_v, std::string("succeeded")));
  BOOST_TEST((last_type("s1") == ev::Event::SessionClosed));

  // in_turn → closed: the open turn is ended first.
  auto s2 = spawn("s2");
  BOOST_TEST(ask_turn(s2, std::string("work"), std::string("sb-1")));
  BOOST_TEST(ask_bool(s2, fa::close_atom_v, std::string("aborted")));
  auto evs = events(fa::session_stream("s2"));
  BOOST_REQUIRE(evs.size() == 3u);
  BOOST_TEST((std::get<0>(evs[1]) == ev::Event::TurnEnded));
  BOOST_TEST((std::get<0>(evs[2]) == ev::Event::SessionClosed));

  // closed (recovered from its stream): every transition refused, and the recovery fenced.
  auto s3 = spawn("s2");
  BOOST_TEST((last_type("s2") == ev::Event::ActorRecovered));
  BOOST_TEST(!ask_turn(s3, std::string("x"), std::string("sb-3")));
  BOOST_TEST(!ask_bool(s3, fa::turn_end_atom_v, std::string("x"), uint64_t{0}, uint64_t{0}));
  BOOST_TEST(!ask_bool(s3, fa::close_atom_v, std::string("x")));
  BOOST_TEST((last_type("s2") == ev::Event::TransitionRefused));
  self->send_exit(s3, caf::exit_reason::user_shutdown);
  sched->run();
}

// The command exits and the sandbox ends while a batch of its output still waits for the task's
// acknowledgement: both facts are held back behind it. The acknowledgement is a response, which
// CAF delivers even while the actor is busy, and each held fact records a transition — so they
// must be recorded one persist after the other, each from the state the previous one left:
// executing → ready (exit), then ready → terminating → terminated (end). Recorded at once, the
// second append expected the version the first had just replaced, was refused as a conflict, and
// the sandbox actor stopped as "fenced out": its task failed with "sandbox actor stopped" (seen
// with 50 tasks printing at once).
BOOST_FIXTURE_TEST_CASE(exit_and_end_held_behind_output_are_recorded_in_order, coordinator_fixture) {
  scripted_runtime runtime;
  std::vector<std::string> told;  // what the task heard, in order
  std::optional<caf::response_promise> ack;
  // (An unused argument: CAF 0.17 dereferences a null argument tuple when there is none.)
  auto task = sys->spawn([&](caf::event_based_actor* self, int) -> caf::behavior {
    return {
      [&, self](fa::output_atom, std::vector<fa::output_piece>& batch) -> caf::result<bool> {
        told.push_back("output " + std::to_string(batch.size()));
        ack = self->make_response_promise();  // acknowledged when the test says so
        return caf::delegated<bool>();
      },
      [&](fa::run_atom) {
        if (ack)
          ack->deliver(true);
        ack.reset();
      },
      [&](fa::cmd_start_atom, uint32_t, std::vector<std::string>&) { told.push_back("started"); },
      [&](fa::cmd_exit_atom, uint32_t, int32_t code, int32_t, uint64_t) {
        told.push_back("exited " + std::to_string(code));
      },
      [&](fa::sbx_state_atom, int8_t, int8_t to, std::string&, std::string&, std::string&) {
        told.push_back(std::string(sc::to_string(static_cast<SS>(to))));
      },
    };
  }, 0);
  fa::sandbox_args a;
  a.store = store.get();
  a.runtime = &runtime;
  a.task = task;
  a.id = "held";
  a.task_id = "theld";
  a.argv = {"/bin/true"};
  a.synchronous_journal = true;
  auto sandbox = sys->spawn(fa::sandbox_actor, std::move(a));
  caf::scoped_actor self{*sys};
  self->send(sandbox, fa::start_atom_v);
  sched->run();
  BOOST_REQUIRE(runtime.observer != nullptr);
  runtime.observer->on_running();
  runtime.observer->on_command_started(1, {"/bin/true"});
  runtime.observer->on_output(1, 0, "last words\n");
  sched->run();
  BOOST_REQUIRE(ack.has_value());  // the batch waits for the task
  runtime.observer->on_command_exited(1, 0, 0, 5);
  runtime.observer->on_ended(std::nullopt);
  sched->run();
  BOOST_TEST(std::get<2>(events(fa::sandbox_stream("held")).back()) == "executing",
             "the exit was recorded before the output it follows reached the task");
  self->send(task, fa::run_atom_v);  // the task acknowledges the batch
  sched->run();

  std::vector<std::string> stream;
  for (const auto& [type, from, to] : events(fa::sandbox_stream("held")))
    stream.push_back((type == ev::Event::SandboxStateChanged ? "" : "refused ") + from + "->" + to);
  const std::vector<std::string> want_stream = {
    "none->spawning",       "spawning->initializing", "initializing->ready",
    "ready->executing",     "executing->ready",       "ready->terminating",
    "terminating->terminated"};
  BOOST_TEST(stream == want_stream, boost::test_tools::per_element());
  const std::vector<std::string> want_told = {
    "spawning", "initializing", "ready",       "executing", "started",
    "output 1", "exited 0",     "ready",       "terminating", "terminated"};
  BOOST_TEST(told == want_told, boost::test_tools::per_element());
  self->send_exit(task, caf::exit_reason::user_shutdown);
  sched->run();
}
