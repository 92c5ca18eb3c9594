#define BOOST_TEST_MODULE sandbox_pool
#include <boost/test/unit_test.hpp>

// The warm pool (ferry/sandbox/pool.h) over real sandboxes of the backend under test (built once
// per backend: sandbox_runsc_pool_test, sandbox_bwrap_pool_test): a sandbox acquired is up and runs
// commands for the observer given to acquire (and no other); the pool refills to its target;
// keys are separate pools; one killed while idle is replaced; failing starts back off (no hot
// loop) and recover; destroying the pool leaves nothing behind (acquired ones live on);
// concurrent acquires get distinct sandboxes; acquisition latency printed. Needs root and the
// backend.

#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "backend_test_support.h"
#include "ferry/sandbox/pool.h"
#include "ferry/sandbox/sandbox.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using testing::recording_observer;
using testing::shell;

namespace {

constexpr auto ready_timeout = 60s;  // a few runsc sandboxes starting on a loaded 2-CPU VM

/// This process's id prefix: pooled sandboxes of two test runs never share ids or cgroups.
std::string prefix() { return fmt::format("pt{}", ::getpid()); }

struct fixture {
  testing::temp_dir tmp;
  std::unique_ptr<sandbox_runtime> runtime;

  fixture() { runtime = make_runtime(testing::test_config(tmp.path())); }

  static std::unique_ptr<sandbox_runtime> make_runtime(const runtime_config& c) {
    auto r = ferry::sandbox::make_runtime(c);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    return std::move(*r);
  }

  fs::path sandboxes_dir() const { return tmp.path() / "sandboxes"; }

  /// The ids of the sandbox directories that exist now.
  std::set<std::string> sandbox_dirs() const {
    std::set<std::string> out;
    std::error_code ec;
    for (fs::directory_iterator it(sandboxes_dir(), ec), end; !ec && it != end; it.increment(ec))
      out.insert(it->path().filename().string());
    return out;
  }

  static pool_options quick_options() {
    pool_options o;
    o.id_prefix = prefix();
    o.healthy_after = 200ms;
    return o;
  }

  static std::unique_ptr<sandbox_pool> make_pool(sandbox_runtime& rt, pool_options o = quick_options()) {
    auto p = make_sandbox_pool(rt, std::move(o));
    BOOST_REQUIRE_MESSAGE(p.ok(), (p.ok() ? "" : p.error().message));
    return std::move(*p);
  }

  static pool_config config(size_t target, std::vector<std::string> env = {}) {
    pool_config c;
    c.target = target;
    c.spec.env = std::move(env);
    return c;
  }
};

/// Polls the key's figures until `pred` holds; the last figures seen (the test fails on timeout).
template <class Pred>
pool_stats wait_stats(const sandbox_pool& pool, const std::string& key, Pred pred, std::chrono::milliseconds timeout,
                      const std::string& what) {
  const auto deadline = steady::now() + timeout;
  std::optional<pool_stats> s;
  for (;;) {
    s = pool.stats(key);
    BOOST_REQUIRE(s);
    if (pred(*s))
      return *s;
    if (steady::now() > deadline)
      break;
    std::this_thread::sleep_for(20ms);
  }
  BOOST_FAIL(what << " not within " << timeout.count() << " ms: ready " << s->ready << ", starting " << s->starting
                  << ", starts " << s->starts << ", failures " << s->start_failures << ", last error: " << s->last_error);
  return *s;
}

/// Acquires from `key`, waiting for a ready sandbox first (the test fails if none comes).
acquired_sandbox acquire_ready(sandbox_pool& pool, const std::string& key, sandbox_observer& obs) {
  BOOST_REQUIRE_MESSAGE(pool.wait_ready(key, 1, ready_timeout),
                        "no ready sandbox in pool " << key << ": " << pool.stats(key).value_or(pool_stats{}).last_error);
  auto a = pool.acquire(key, obs);
  BOOST_REQUIRE_MESSAGE(a.ok(), (a.ok() ? "" : a.error().message));
  BOOST_REQUIRE(a->box);
  return std::move(*a);
}

/// Pooled ids: `<prefix>-<12 hex>-<6 digits>`, valid container ids.
void check_id(const std::string& id) {
  const std::string p = prefix() + "-";
  const bool form = id.size() == p.size() + 12 + 1 + 6 && id.rfind(p, 0) == 0 &&
                    id.find_first_not_of("0123456789abcdef", p.size()) == p.size() + 12 && id[p.size() + 12] == '-' &&
                    id.find_first_not_of("0123456789", p.size() + 13) == std::string::npos;
  BOOST_TEST(form, "id " << id << " is not <prefix>-<12 hex>-<6 digits>");
  BOOST_TEST(id.size() <= 64u);
  BOOST_TEST(id.rfind(prefix() + "-", 0) == 0u, "id " << id);
}

/// No id is the start of another (runsc's "ambiguous" refusal).
void check_no_prefixes(const std::set<std::string>& ids) {
  for (const auto& a : ids)
    for (const auto& b : ids)
      BOOST_TEST((a == b || b.rfind(a, 0) != 0), a << " is a prefix of " << b);
}

/// SIGKILLs every host process of sandbox `id` (as an outside killer would).
void kill_from_outside(const fs::path& dir) {
  auto procs = testing::sandbox_processes(dir);
  BOOST_REQUIRE_MESSAGE(!procs.procs.empty(), "no host process of " << dir);
  for (auto& [pid, fd] : procs.procs)
    ::syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0);
}

/// Cgroup directories anywhere under /sys/fs/cgroup whose name contains `needle`.
std::vector<fs::path> cgroups_naming(const std::string& needle) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (fs::recursive_directory_iterator it("/sys/fs/cgroup", fs::directory_options::skip_permission_denied, ec), end;
       !ec && it != end; it.increment(ec)) {
    std::error_code type_ec;
    if (!it->is_directory(type_ec)) {
      continue;
    }
    if (it->path().filename().string().find(needle) != std::string::npos)
      found.push_back(it->path());
    if (it.depth() >= 3)  // <hierarchy>/<parent>/<group>: deep enough
      it.disable_recursion_pending();
  }
  return found;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(pool, *boost::unit_test::precondition(testing::backend_available))

BOOST_FIXTURE_TEST_CASE(bad_options_and_templates_are_refused, fixture) {
  for (const char* bad : {"", "with-dash", "way-too-long-prefix-for-ids", "sp ace"}) {
    pool_options o;
    o.id_prefix = bad;
    auto p = make_sandbox_pool(*runtime, o);
    BOOST_TEST(!p.ok(), "prefix `" << bad << "` accepted");
  }
  pool_options zero;
  zero.max_starting = 0;
  BOOST_TEST(!make_sandbox_pool(*runtime, zero).ok());

  auto pool = make_pool(*runtime);
  auto with_id = config(1);
  with_id.spec.id = "mine";
  auto with_argv = config(1);
  with_argv.spec.argv = {"true"};
  for (auto& c : {with_id, with_argv, config(1, {"NOEQUALS"})}) {
    auto r = pool->configure("k", c);
    BOOST_TEST(!r.ok());
    BOOST_TEST((r.ok() || r.error().code == ferry::errc::invalid_argument));
  }
  BOOST_TEST(!pool->configure("", config(1)).ok());
  BOOST_TEST(!pool->stats("k"), "a refused configure made a pool");
  recording_observer obs;
  auto miss = pool->acquire("k", obs);
  BOOST_REQUIRE(!miss.ok());
  BOOST_TEST((miss.error().code == ferry::errc::not_found));
  BOOST_TEST(sandbox_dirs().empty());
}

BOOST_FIXTURE_TEST_CASE(acquired_sandbox_runs_commands_for_the_new_observer, fixture) {
  auto pool = make_pool(*runtime);
  BOOST_REQUIRE(pool->configure("env-a", config(2, {"POOL_VAR=from-template"})).ok());
  BOOST_REQUIRE(pool->wait_ready("env-a", 2, ready_timeout));
  // Ready means on_running came: the caller's observer will not see it, only what follows.
  recording_observer first, second;
  auto a = acquire_ready(*pool, "env-a", first);
  auto b = acquire_ready(*pool, "env-a", second);
  check_id(a.id);
  check_id(b.id);
  BOOST_TEST(a.id != b.id);
  BOOST_TEST(a.box->id() == a.id);
  BOOST_TEST(sandbox_dirs().count(a.id) == 1u, "the returned id names the sandbox's directory");

  auto ra = testing::run_to_end(*a.box, first, shell(1, "echo a:$POOL_VAR; echo err >&2"));
  BOOST_TEST(ra.what == "exited");
  BOOST_TEST(ra.exit_code == 0);
  BOOST_TEST(first.output(1, 0) == "a:from-template\n");
  BOOST_TEST(first.output(1, 1) == "err\n");
  // Nothing of a's command reached b's observer, and b's own output only b's.
  auto rb = testing::run_to_end(*b.box, second, shell(1, "echo b"));
  BOOST_TEST(rb.exit_code == 0);
  BOOST_TEST(second.output(1, 0) == "b\n");
  BOOST_TEST(first.output(1, 0) == "a:from-template\n");
  for (auto* o : {&first, &second})
    BOOST_TEST(!o->find("running"), "on_running is the pool's");

  // Its end is the caller's too.
  BOOST_REQUIRE(a.box->release().ok());
  a.box->wait();
  auto ended = first.find("ended");
  BOOST_REQUIRE(ended);
  BOOST_TEST(!ended->failure.has_value(), ended->failure.value_or(""));
  BOOST_TEST(!second.find("ended"));
  auto s = pool->stats("env-a");
  BOOST_REQUIRE(s);
  BOOST_TEST(s->acquired == 2u);
  BOOST_TEST(s->died_idle == 0u);
}

BOOST_FIXTURE_TEST_CASE(pool_refills_to_its_target, fixture) {
  auto pool = make_pool(*runtime);
  BOOST_REQUIRE(pool->configure("k", config(3)).ok());
  BOOST_REQUIRE(pool->wait_ready("k", 3, ready_timeout));
  auto s = pool->stats("k");
  BOOST_TEST(s->starts == 3u, "no more started than the target");
  recording_observer o1, o2;
  std::set<std::string> ids;
  auto a = acquire_ready(*pool, "k", o1);
  auto b = acquire_ready(*pool, "k", o2);
  ids.insert(a.id);
  ids.insert(b.id);
  auto refilled = wait_stats(*pool, "k", [](const pool_stats& s) { return s.ready == 3; }, ready_timeout, "refill to 3");
  BOOST_TEST(refilled.starts == 5u);
  BOOST_TEST(refilled.acquired == 2u);
  BOOST_TEST(refilled.start_failures == 0u);
  std::this_thread::sleep_for(300ms);
  BOOST_TEST(pool->stats("k")->starts == 5u, "nothing started beyond the target");
  for (const auto& id : sandbox_dirs())
    ids.insert(id);
  BOOST_TEST(ids.size() == 5u);
  for (const auto& id : ids)
    check_id(id);
  check_no_prefixes(ids);

  // A lower target retires the extra ones; 0 turns the key off.
  BOOST_REQUIRE(pool->configure("k", config(1)).ok());
  wait_stats(*pool, "k", [](const pool_stats& s) { return s.ready == 1 && s.retiring == 0; }, ready_timeout,
             "down to 1");
  BOOST_REQUIRE(pool->configure("k", config(0)).ok());
  recording_observer o3;
  auto off = pool->acquire("k", o3);
  BOOST_REQUIRE(!off.ok());
  BOOST_TEST((off.error().code == ferry::errc::not_found));
  wait_stats(*pool, "k", [](const pool_stats& s) { return s.ready == 0 && s.retiring == 0 && s.starting == 0; },
             ready_timeout, "off");
  // Only the two acquired ones are left.
  const auto deadline = steady::now() + 30s;
  while (sandbox_dirs().size() > 2 && steady::now() < deadline)
    std::this_thread::sleep_for(50ms);
  BOOST_TEST(sandbox_dirs() == (std::set<std::string>{a.id, b.id}));
}

BOOST_FIXTURE_TEST_CASE(keys_are_separate_pools, fixture) {
  auto pool = make_pool(*runtime);
  BOOST_REQUIRE(pool->configure("env-1", config(1, {"WHICH=one"})).ok());
  BOOST_REQUIRE(pool->configure("env-2", config(1, {"WHICH=two"})).ok());
  recording_observer o1, o2, o3;
  auto a = acquire_ready(*pool, "env-1", o1);
  auto b = acquire_ready(*pool, "env-2", o2);
  testing::run_to_end(*a.box, o1, shell(1, "echo $WHICH"));
  testing::run_to_end(*b.box, o2, shell(1, "echo $WHICH"));
  BOOST_TEST(o1.output(1, 0) == "one\n");
  BOOST_TEST(o2.output(1, 0) == "two\n");
  BOOST_TEST(pool->stats("env-1")->acquired == 1u);
  BOOST_TEST(pool->stats("env-2")->acquired == 1u);
  BOOST_TEST(!pool->stats("env-3"));

  // A changed template: the old key's sandbox is retired, never handed out.
  BOOST_REQUIRE(pool->wait_ready("env-1", 1, ready_timeout));
  BOOST_REQUIRE(pool->configure("env-1", config(1, {"WHICH=uno"})).ok());
  auto c = acquire_ready(*pool, "env-1", o3);
  testing::run_to_end(*c.box, o3, shell(1, "echo $WHICH"));
  BOOST_TEST(o3.output(1, 0) == "uno\n");
}

BOOST_FIXTURE_TEST_CASE(sandbox_killed_while_idle_is_replaced, fixture) {
  auto pool = make_pool(*runtime);
  BOOST_REQUIRE(pool->configure("k", config(1)).ok());
  BOOST_REQUIRE(pool->wait_ready("k", 1, ready_timeout));
  const auto before = sandbox_dirs();
  BOOST_REQUIRE_EQUAL(before.size(), 1u);
  const std::string victim = *before.begin();
  std::this_thread::sleep_for(300ms);  // past healthy_after: a death, not a failed start
  kill_from_outside(sandboxes_dir() / victim);

  auto s = wait_stats(*pool, "k", [](const pool_stats& s) { return s.died_idle == 1 && s.ready == 1; },
                      ready_timeout, "replacement");
  BOOST_TEST(s.starts == 2u);
  BOOST_TEST(s.start_failures == 0u);
  BOOST_TEST(s.failures_in_a_row == 0u);
  BOOST_TEST(s.last_error.find(victim) != std::string::npos, s.last_error);
  BOOST_TEST_MESSAGE("after the kill: " << s.last_error);
  // The dead one is gone (directory removed before its on_ended), the new one is another.
  const auto deadline = steady::now() + 30s;
  while (sandbox_dirs().count(victim) && steady::now() < deadline)
    std::this_thread::sleep_for(50ms);
  const auto after = sandbox_dirs();
  BOOST_TEST(after.count(victim) == 0u);
  BOOST_TEST(after.size() == 1u);

  recording_observer obs;
  auto a = acquire_ready(*pool, "k", obs);
  BOOST_TEST(a.id != victim);
  auto r = testing::run_to_end(*a.box, obs, shell(1, "echo alive"));
  BOOST_TEST(obs.output(1, 0) == "alive\n");
}

BOOST_FIXTURE_TEST_CASE(failing_starts_back_off_and_recover, fixture) {
  // A runtime whose ferry-init is garbage once the runtime exists: every sandbox fails to start.
  const fs::path init = tmp.path() / "ferry-init-copy";
  testing::copy_executable(FERRY_INIT_BINARY, init);
  auto cfg = testing::test_config(tmp.path());
  cfg.sandboxes_dir = tmp.path() / "bad-sandboxes";
  cfg.runsc.state_dir = tmp.path() / "bad-state";
  cfg.init_binary = init;
  auto bad_runtime = make_runtime(cfg);
  {
    std::ofstream f(init, std::ios::trunc);
    f << "not a program\n";
  }
  fs::permissions(init, fs::perms(0755));

  pool_options o = quick_options();
  o.backoff_initial = 100ms;
  o.backoff_max = 1s;
  auto pool = make_pool(*bad_runtime, o);
  BOOST_REQUIRE(pool->configure("k", config(2)).ok());
  const auto t0 = steady::now();
  const auto window = 5s;
  std::this_thread::sleep_for(window);
  auto s = *pool->stats("k");
  const auto starts_in_window = s.starts;
  BOOST_TEST_MESSAGE(fmt::format("{} starts, {} failures in {} s; last error: {}", s.starts, s.start_failures,
                                 std::chrono::duration_cast<std::chrono::seconds>(steady::now() - t0).count(),
                                 s.last_error));
  // Back-off 0.1, 0.2, 0.4, 0.8, 1, 1 … s, one probe at a time: about 8 in 5 s (fewer under runsc,
  // whose failed starts take a while to end). A hot loop would make hundreds.
  BOOST_TEST(starts_in_window >= 3u, "it keeps trying");
  BOOST_TEST(starts_in_window <= 12u, "no hot loop");
  BOOST_TEST(s.start_failures >= 2u);
  BOOST_TEST(s.failures_in_a_row >= 2u);
  BOOST_TEST(s.ready == 0u);
  BOOST_TEST(!s.last_error.empty());
  BOOST_TEST(s.last_error.find(prefix()) != std::string::npos, "names the sandbox: " << s.last_error);
  recording_observer obs;
  auto miss = pool->acquire("k", obs);
  BOOST_REQUIRE(!miss.ok());
  BOOST_TEST((miss.error().code == ferry::errc::failed), miss.error().message);
  BOOST_TEST(miss.error().message.find("failing") != std::string::npos, miss.error().message);
  BOOST_TEST(pool->stats("k")->misses == 1u);

  // Fixed: the next probe succeeds and the pool fills (within the 1 s back-off and the starts).
  testing::copy_executable(FERRY_INIT_BINARY, init);
  BOOST_REQUIRE_MESSAGE(pool->wait_ready("k", 2, ready_timeout), pool->stats("k")->last_error);
  // Once one has stayed up for healthy_after, the failures in a row are forgotten.
  wait_stats(*pool, "k", [](const pool_stats& s) { return s.failures_in_a_row == 0 && !s.next_start_at; }, 5s,
             "back-off reset");
  pool.reset();
  BOOST_TEST(fixture::sandbox_dirs().empty());
  std::error_code ec;
  BOOST_TEST(fs::is_empty(cfg.sandboxes_dir, ec));
}

BOOST_FIXTURE_TEST_CASE(destroying_the_pool_leaves_nothing, fixture) {
  auto pool = make_pool(*runtime);
  BOOST_REQUIRE(pool->configure("k", config(3)).ok());
  BOOST_REQUIRE(pool->configure("other", config(1, {"X=1"})).ok());
  recording_observer kept_obs;
  auto kept = acquire_ready(*pool, "k", kept_obs);
  BOOST_REQUIRE(pool->wait_ready("k", 1, ready_timeout));
  // Destroyed while some are up and others (the refill of the acquired one, "other") may still
  // be starting.
  const auto t0 = steady::now();
  pool.reset();
  BOOST_TEST_MESSAGE("pool destroyed in " << std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count()
                                          << " ms");
  BOOST_TEST(sandbox_dirs() == std::set<std::string>{kept.id}, "only the acquired sandbox's directory is left");
  const std::string needle = prefix() + "-";
  for (const auto& p : testing::processes_mentioning(needle))
    if (p.find(kept.id) == std::string::npos)
      BOOST_ERROR("left running: " << p);
  for (const auto& g : cgroups_naming(needle))
    if (g.filename().string().find(kept.id) == std::string::npos)
      BOOST_ERROR("cgroup left: " << g);
  auto live = runtime->list_live();
  BOOST_REQUIRE(live.ok());
  BOOST_TEST(live->empty());
  auto orphans = runtime->cleanup_orphans();
  BOOST_REQUIRE(orphans.ok());
  BOOST_TEST(*orphans == 0u);

  // The acquired one lives on, and is the caller's to end.
  auto r = testing::run_to_end(*kept.box, kept_obs, shell(1, "echo still here"));
  BOOST_TEST(kept_obs.output(1, 0) == "still here\n");
  kept.box->kill();
  kept.box->wait();
  kept.box.reset();
  BOOST_TEST(sandbox_dirs().empty());
  BOOST_TEST(testing::processes_mentioning(needle).empty());
}

BOOST_FIXTURE_TEST_CASE(concurrent_acquires_get_distinct_sandboxes, fixture) {
  constexpr int threads = 6;
  auto pool = make_pool(*runtime);
  BOOST_REQUIRE(pool->configure("k", config(threads)).ok());
  BOOST_REQUIRE(pool->wait_ready("k", threads, ready_timeout));
  std::vector<recording_observer> observers(threads);
  std::vector<acquired_sandbox> got(threads);
  std::vector<std::string> errors(threads);
  std::atomic<bool> go{false};
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i) {
    workers.emplace_back([&, i] {
      while (!go)
        std::this_thread::yield();
      auto a = pool->acquire("k", observers[i]);
      if (a)
        got[i] = std::move(*a);
      else
        errors[i] = a.error().message;
    });
  }
  go = true;
  for (auto& w : workers)
    w.join();
  std::set<std::string> ids;
  for (int i = 0; i < threads; ++i) {
    BOOST_TEST(errors[i].empty(), errors[i]);
    if (got[i].box)
      ids.insert(got[i].id);
  }
  BOOST_TEST(ids.size() == static_cast<size_t>(threads), "each thread its own sandbox");
  // Each works, for its own observer.
  for (int i = 0; i < threads; ++i) {
    if (!got[i].box)
      continue;
    BOOST_REQUIRE(got[i].box->run(shell(1, fmt::format("echo {}", got[i].id))).ok());
  }
  for (int i = 0; i < threads; ++i) {
    if (!got[i].box)
      continue;
    BOOST_REQUIRE(observers[i].wait_for_end(1, 30s));
    BOOST_TEST(observers[i].output(1, 0) == got[i].id + "\n");
  }
  for (auto& g : got)
    if (g.box)
      g.box->kill();
}

BOOST_FIXTURE_TEST_CASE(acquisition_latency, fixture) {
  constexpr int rounds = 20;
  pool_options o = quick_options();
  auto pool = make_pool(*runtime, o);
  BOOST_REQUIRE(pool->configure("k", config(4)).ok());
  std::vector<double> latencies_ms;
  std::vector<std::unique_ptr<recording_observer>> observers;
  std::vector<acquired_sandbox> taken;
  std::set<std::string> ids;
  for (int i = 0; i < rounds; ++i) {
    BOOST_REQUIRE_MESSAGE(pool->wait_ready("k", 1, ready_timeout), pool->stats("k")->last_error);
    observers.push_back(std::make_unique<recording_observer>());
    const auto t0 = steady::now();
    auto a = pool->acquire("k", *observers.back());
    const auto t1 = steady::now();
    BOOST_REQUIRE_MESSAGE(a.ok(), (a.ok() ? "" : a.error().message));
    latencies_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    ids.insert(a->id);
    taken.push_back(std::move(*a));
  }
  // The last one is in hand and working.
  auto r = testing::run_to_end(*taken.back().box, *observers.back(), shell(1, "echo ok"));
  BOOST_TEST(observers.back()->output(1, 0) == "ok\n");
  BOOST_TEST(ids.size() == static_cast<size_t>(rounds));
  check_no_prefixes(ids);
  const double p50 = testing::percentile(latencies_ms, 0.5), p99 = testing::percentile(latencies_ms, 0.99);
  BOOST_TEST_MESSAGE(fmt::format("{}: acquire() of a ready sandbox over {}: p50 {:.3f} ms, p99 {:.3f} ms (load {})",
                                 testing::test_backend(), rounds, p50, p99,
                                 testing::file_content("/proc/loadavg").substr(0, 14)));
  // acquire() never waits for a start: far below a cold start even in this sanitizer build
  // (1.5–3 ms p50 seen under bwrap in full runs, with the refill's starts running alongside). The
  // figure against the 10 ms target is ferry-bench sandbox's, from a release build.
  BOOST_TEST(p50 <= 10.0, "p50 " << p50 << " ms");
  for (auto& t : taken)
    t.box->kill();
}

BOOST_AUTO_TEST_SUITE_END()
