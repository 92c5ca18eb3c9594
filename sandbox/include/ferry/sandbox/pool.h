#pragma once
// ferry_sandbox public header: the warm pool, idle sandboxes started ahead of time per pool key.
//
// A `sandbox_pool` keeps, for each pool key (later: an environment's hash), up to `target` idle
// sandboxes started from the key's template and already up (on_running delivered), so that a
// task takes one in microseconds instead of waiting for a start (~150 ms under runsc, ~25 ms
// under bwrap). One background thread per pool starts them, replaces each one acquired and each
// one that died in the pool, retires those beyond a lowered target or of a changed template, and
// backs off when starts keep failing. `acquire` hands one over: the returned sandbox behaves as
// one from `sandbox_runtime::start` whose observer is the caller's from then on, and the pool
// forgets it (it never comes back; ending it is the caller's business).
//
// Ids: pooled sandboxes are named `<id_prefix>-<12 hex digits>-<6 digits>` (random per pool, then
// a counter), not ferryd's `ferry-<task>-<n>`. A sandbox's id is fixed when it starts, so the
// caller must record the id `acquire` returns: that is the id to re-attach by after a crash.
// The fields have a fixed width so that no pooled id is the start of another (Debian's runsc
// refuses to delete an id that is the prefix of another live container's: "ambiguous").
//
// Invariants:
// - The pool holds only idle sandboxes (no argv; nothing was ever run in them) of its runtime.
//   Each is either the pool's (starting, ready, or retiring) or, after `acquire`, the caller's
//   alone: the pool never touches a sandbox it handed over.
// - `acquire` returns only a sandbox whose on_running was delivered (to the pool: the caller's
//   observer gets no on_running), of the key's current template, not being retired. It may
//   still die at any moment, like any sandbox: its on_ended then reaches the caller's observer.
// - Observer hand-over is atomic with respect to the sandbox's reader thread: every callback
//   goes either to the pool or, after the hand-over, to the caller's observer, never both, never
//   concurrently.
// - A start failure — start() refused, an end before on_running, no on_running within
//   `start_timeout`, an end within `healthy_after` of on_running — delays the key's next start by
//   `backoff_initial` × 2^(failures in a row − 1), at most `backoff_max`; a sandbox that came up
//   and stayed up (or was acquired) resets the count. `pool_stats::last_error` keeps the latest.
// - Destroying the pool kills every sandbox it still holds and waits for each one's on_ended:
//   afterwards no process, directory or cgroup of them remains. Handed-over ones live on.
// - After a crash of the process, the pool's idle sandboxes are orphans like any other:
//   `sandbox_runtime::cleanup_orphans` (keeping the tasks' ids) removes them.
//
// Threading: thread-safe. Every member function may be called from any thread, also from the
// observer of a sandbox acquired from this pool, but not concurrently with the destructor.
// The pool's lock is never held while it calls into the runtime or a sandbox. `acquire` may
// destroy a pooled sandbox that ended at that moment (joining its reader thread), so it must not
// be called from that sandbox's own observer — which, being the pool's until then, it cannot be.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/result.h"

namespace ferry::sandbox {

/// How a pool runs; fixed when it is made.
struct pool_options {
  /// Starts every pooled sandbox's id: 1 to 16 letters and digits (no '-', which keeps the ids
  /// of pools with different prefixes from being prefixes of one another). Choose one that no
  /// other id of the runtime starts with followed by '-' (ferryd's are `ferry-…`).
  std::string id_prefix = "pool";
  /// Sandboxes starting (started, not yet on_running) at once, all keys together (≥ 1).
  size_t max_starting = 2;
  /// A sandbox not up after this long is killed and counts as a start failure.
  std::chrono::milliseconds start_timeout = std::chrono::seconds(60);
  /// A sandbox that ends sooner than this after on_running counts as a start failure; one that
  /// lived longer (or was acquired) is a success and resets the key's failures in a row.
  std::chrono::milliseconds healthy_after = std::chrono::seconds(2);
  /// The first back-off after a start failure, doubled per failure in a row up to backoff_max.
  std::chrono::milliseconds backoff_initial = std::chrono::milliseconds(250);
  std::chrono::milliseconds backoff_max = std::chrono::seconds(30);
};

/// One pool key's settings.
struct pool_config {
  /// What each sandbox is started from: `env` (and any other field of a sandbox's make-up).
  /// `id` must be empty (the pool names its sandboxes) and `argv` too (idle sandboxes only).
  sandbox_spec spec;
  /// Ready sandboxes to keep; 0 = off (the key's sandboxes are retired, acquire misses).
  size_t target = 0;
};

/// A sandbox handed over by `acquire`.
struct acquired_sandbox {
  /// Running and idle; its observer is the one given to acquire. Destroying it kills it, as
  /// for any sandbox. Behaves as a sandbox from sandbox_runtime::start in every way except
  /// that the caller's observer does not see on_running (the pool saw it).
  std::unique_ptr<sandbox> box;
  /// Its id (as box->id()): the caller records it to re-attach by it.
  std::string id;
};

/// What one key's pool is doing, for logs and metrics.
struct pool_stats {
  size_t target = 0;
  size_t ready = 0;     ///< up and idle: what acquire can take now
  size_t starting = 0;  ///< started, not yet up
  size_t retiring = 0;  ///< being killed by the pool (beyond target, old template, start timeout)
  uint64_t starts = 0;          ///< sandbox_runtime::start() calls
  uint64_t start_failures = 0;  ///< see pool_options::healthy_after
  uint64_t died_idle = 0;       ///< sandboxes that ended while ready in the pool
  uint64_t acquired = 0;        ///< sandboxes handed over
  uint64_t misses = 0;          ///< acquire calls that found none ready
  uint32_t failures_in_a_row = 0;
  /// No start before this (back-off), if a back-off is in force.
  std::optional<std::chrono::steady_clock::time_point> next_start_at;
  /// The latest start failure or death in the pool, naming the sandbox ("" if none yet).
  std::string last_error;
};

/// A warm pool of idle sandboxes per key, over one runtime. Thread-safe (see above).
class sandbox_pool {
 public:
  class impl;
  explicit sandbox_pool(std::unique_ptr<impl> i);
  /// Kills the sandboxes the pool holds and waits until each one has ended.
  ~sandbox_pool();
  sandbox_pool(const sandbox_pool&) = delete;
  sandbox_pool& operator=(const sandbox_pool&) = delete;

  /// Sets (or changes) key `key`'s template and target; the refill thread acts on it at once.
  /// A changed template (any field of the spec) retires the key's sandboxes of the old one and
  /// resets its back-off. Errors: errc::invalid_argument (empty key, a spec with an id or argv,
  /// an env entry that is not K=V), errc::closed (the pool is being destroyed).
  result<void> configure(const std::string& key, pool_config config);

  /// Hands over a ready sandbox of `key`, whose observer from now on is `observer` (which must
  /// outlive the returned sandbox). Returns at once, never waits for a start. When none is ready
  /// the caller starts a sandbox the normal way; the error says why, for its log:
  /// errc::not_found (no pool for `key`: never configured, or target 0), errc::busy (none ready
  /// yet: the pool is filling), errc::failed (none ready and the key's starts keep failing: the
  /// message carries the last error), errc::closed (the pool is being destroyed).
  result<acquired_sandbox> acquire(const std::string& key, sandbox_observer& observer);

  /// The key's figures; nullopt for a key never configured.
  std::optional<pool_stats> stats(const std::string& key) const;

  /// Blocks until `key` has at least `n` ready sandboxes (true) or `timeout` passed (false).
  bool wait_ready(const std::string& key, size_t n, std::chrono::milliseconds timeout) const;

 private:
  std::unique_ptr<impl> impl_;
};

/// A pool over `runtime`, which must outlive it; its refill thread starts at once (with no key
/// configured it has nothing to do). Errors: errc::invalid_argument for bad options.
result<std::unique_ptr<sandbox_pool>> make_sandbox_pool(sandbox_runtime& runtime, pool_options options = {});

}  // namespace ferry::sandbox
