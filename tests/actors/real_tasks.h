#pragma once
// Test support for actors tests that need the real thing: a journal in a temp dir, a gVisor
// runtime and a task manager on a CAF actor system (supervision_test, wall_clock_test).

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>

#include <boost/test/unit_test.hpp>
#include <caf/all.hpp>

#include "ferry/actors/tasks.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/storage/journal.h"
#include "ferry/test_support/temp_dir.h"

namespace ferry::test {

/// Root and runsc: what these tests need (they skip with a message otherwise).
inline bool can_run_sandboxes() {
  return ::geteuid() == 0 && std::system("runsc --version >/dev/null 2>&1") == 0;
}

/// A task manager over a journal and gVisor sandboxes in a temp dir of its own.
struct real_tasks {
  temp_dir dir;
  std::unique_ptr<storage::event_store> store;
  std::unique_ptr<sandbox::sandbox_runtime> runtime;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<actors::task_service> tasks;

  /// `adjust` may change the deps (a fault seam, a default) before the manager starts.
  explicit real_tasks(const char* name, const std::function<void(actors::task_deps&)>& adjust = {})
      : dir(name) {
    storage::journal_options o;
    o.dir = dir.path() / "journal";
    auto s = storage::open_journal(o);
    BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
    store = std::move(*s);
    sandbox::runsc_options ro;
    ro.state_dir = dir.path() / "runsc";
    ro.sandboxes_dir = dir.path() / "sandboxes";
    ro.init_binary = FERRY_INIT_BINARY;
    auto rt = sandbox::make_runsc_runtime(ro);
    BOOST_REQUIRE_MESSAGE(rt.ok(), (rt.ok() ? "" : rt.error().message));
    runtime = std::move(*rt);
    actors::add_message_types(cfg);
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    actors::task_deps deps;
    deps.store = store.get();
    deps.runtime = runtime.get();
    if (adjust)
      adjust(deps);
    auto t = actors::start_task_manager(*sys, deps);
    BOOST_REQUIRE_MESSAGE(t.ok(), (t.ok() ? "" : t.error().message));
    tasks = std::move(*t);
  }
  ~real_tasks() { stop(); }

  /// Shuts the task manager and the actor system down (idempotent). A derived fixture whose
  /// members the actors use (a fault seam's state) calls it from its own destructor.
  void stop() {
    if (tasks)
      (void)tasks->shutdown(std::chrono::seconds(20));
    tasks.reset();
    sys.reset();
  }

  /// Polls the task's view until it is finished; fails the test after `limit`.
  actors::task_view wait_finished(const std::string& id, std::chrono::seconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      auto v = actors::load_task_view(*store, id);
      BOOST_REQUIRE(v.ok());
      if (*v && (*v)->finished)
        return **v;
      BOOST_REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline,
                            "task " << id << " did not finish; status " << (*v ? (*v)->status : "none"));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
};

}  // namespace ferry::test
