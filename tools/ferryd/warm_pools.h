#pragma once
// ferryd's warm pools: one sandbox_pool per environment (and one for tasks without an
// environment), each keeping `target` idle sandboxes of it up, so that a task's sandbox is taken
// ready instead of started. A pool's sandboxes are named `w<n>-…` (n: the environment's index),
// which is how ferryd's egress binder gives them their environment's network policy; the task's
// approvals are applied when one is taken. An environment with a setup script gets its pool once
// its layer exists (at start, or when a task's setup made it: layer_ready).
//
// Threading: thread-safe; acquire and layer_ready come from the sandbox actors' threads.

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ferry/actors/tasks.h"
#include "ferry/sandbox/environment.h"
#include "ferry/sandbox/pool.h"

namespace ferryd {

class warm_pools final : public ferry::actors::warm_sandboxes {
 public:
  /// One warm environment: its name ("" for tasks without one), spec (none for ""), target.
  struct entry {
    std::string name;
    std::optional<ferry::sandbox::environment_spec> spec;
    size_t target = 0;
  };
  /// `approve(sandbox_id, task_id)` lets a taken sandbox reach what the task's users allowed.
  warm_pools(ferry::sandbox::sandbox_runtime& runtime, ferry::sandbox::layer_cache* layers, std::vector<entry> entries,
             std::function<void(const std::string& sandbox_id, const std::string& task_id)> approve);
  ~warm_pools() override;

  /// Starts the pools (after the start-up recovery removed every leftover sandbox: the pools'
  /// own would be among them). Errors name the environment.
  [[nodiscard]] ferry::result<void> start();
  /// Kills the idle sandboxes and waits until they are gone. Idempotent.
  void stop();

  /// The environment whose pool started `sandbox_id` (`w<n>-…`), if any.
  std::optional<std::string> environment_of(const std::string& sandbox_id) const;
  /// "name: ready/target" per pool, for the start-up line.
  std::string describe() const;

  ferry::result<ferry::sandbox::acquired_sandbox> acquire(const std::string& environment, const std::string& task_id,
                                                          ferry::sandbox::sandbox_observer& observer) override;
  void layer_ready(const std::string& environment, const std::filesystem::path& layer) override;

 private:
  struct pool_slot {
    entry e;
    std::string prefix;  // w<n>
    std::unique_ptr<ferry::sandbox::sandbox_pool> pool;
    bool configured = false;
  };
  ferry::result<void> configure(pool_slot& slot, std::vector<std::filesystem::path> layers);

  ferry::sandbox::sandbox_runtime& runtime_;
  ferry::sandbox::layer_cache* const layers_;
  const std::function<void(const std::string&, const std::string&)> approve_;
  mutable std::mutex mu_;
  std::map<std::string, pool_slot> slots_;  // by environment name; GUARDED_BY(mu_) (pools themselves are thread-safe)
  bool started_ = false;                    // GUARDED_BY(mu_)
};

}  // namespace ferryd
