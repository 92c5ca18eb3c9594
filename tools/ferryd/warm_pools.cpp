// ferryd's warm pools (see warm_pools.h).

#include "warm_pools.h"

#include <cstdio>

#include <fmt/format.h>

namespace ferryd {

namespace sbx = ferry::sandbox;

namespace {

/// The one key of each pool (a pool serves one environment).
constexpr const char* pool_key = "env";

}  // namespace

warm_pools::warm_pools(sbx::sandbox_runtime& runtime, sbx::layer_cache* layers, std::vector<entry> entries,
                       std::function<void(const std::string&, const std::string&)> approve)
    : runtime_(runtime), layers_(layers), approve_(std::move(approve)) {
  size_t n = 0;
  for (auto& e : entries) {
    const std::string name = e.name;
    slots_.emplace(name, pool_slot{std::move(e), "w" + std::to_string(n++), nullptr, false});
  }
}

warm_pools::~warm_pools() { stop(); }

ferry::result<void> warm_pools::configure(pool_slot& slot, std::vector<std::filesystem::path> layers) {
  sbx::pool_config config;
  if (slot.e.spec)
    config.spec.env = slot.e.spec->env;
  config.spec.layers = std::move(layers);
  config.target = slot.e.target;
  if (auto r = slot.pool->configure(pool_key, std::move(config)); !r)
    return r.error();
  slot.configured = true;
  return {};
}

ferry::result<void> warm_pools::start() {
  std::lock_guard lock(mu_);
  started_ = true;
  for (auto& [name, slot] : slots_) {
    if (slot.e.target == 0)
      continue;
    sbx::pool_options options;
    options.id_prefix = slot.prefix;
    auto pool = sbx::make_sandbox_pool(runtime_, options);
    if (!pool)
      return ferry::fail(fmt::format("warm pool of {}: {}", name.empty() ? "tasks without an environment" : name,
                                     pool.error().message));
    slot.pool = std::move(*pool);
    const auto& spec = slot.e.spec;
    if (spec && !spec->setup_script.empty()) {
      // Its sandboxes start from the setup's layer: once that exists.
      auto layer = layers_ ? layers_->find(sbx::environment_key(*spec)) : std::nullopt;
      if (!layer)
        continue;
      if (auto r = configure(slot, {*layer}); !r)
        return ferry::fail(fmt::format("warm pool of {}: {}", name, r.error().message));
      continue;
    }
    if (auto r = configure(slot, {}); !r)
      return ferry::fail(fmt::format("warm pool of {}: {}", name.empty() ? "tasks without an environment" : name,
                                     r.error().message));
  }
  return {};
}

void warm_pools::stop() {
  std::map<std::string, pool_slot> gone;
  {
    std::lock_guard lock(mu_);
    for (auto& [name, slot] : slots_)
      if (slot.pool)
        gone[name].pool = std::move(slot.pool);
    started_ = false;
  }
  gone.clear();  // each pool kills its idle sandboxes and waits for them (outside the lock)
}

std::optional<std::string> warm_pools::environment_of(const std::string& sandbox_id) const {
  std::lock_guard lock(mu_);
  for (const auto& [name, slot] : slots_)
    if (sandbox_id.size() > slot.prefix.size() && sandbox_id.starts_with(slot.prefix) &&
        sandbox_id[slot.prefix.size()] == '-')
      return name;
  return std::nullopt;
}

std::string warm_pools::describe() const {
  std::lock_guard lock(mu_);
  std::string out;
  for (const auto& [name, slot] : slots_) {
    if (slot.e.target == 0)
      continue;
    out += fmt::format("{}{} ({}){}", out.empty() ? "" : ", ", name.empty() ? "no environment" : name, slot.e.target,
                       slot.configured ? "" : " once its setup has run");
  }
  return out.empty() ? "off" : out;
}

ferry::result<sbx::acquired_sandbox> warm_pools::acquire(const std::string& environment, const std::string& task_id,
                                                         sbx::sandbox_observer& observer) {
  sbx::sandbox_pool* pool = nullptr;
  {
    std::lock_guard lock(mu_);
    auto it = slots_.find(environment);
    if (it == slots_.end() || !it->second.pool || !it->second.configured)
      return ferry::fail(ferry::errc::not_found, "no warm pool for this environment");
    pool = it->second.pool.get();  // lives until stop(), which comes after every task ended
  }
  auto got = pool->acquire(pool_key, observer);
  if (!got)
    return got.error();
  if (approve_)
    approve_(got->id, task_id);
  return got;
}

void warm_pools::layer_ready(const std::string& environment, const std::filesystem::path& layer) {
  std::lock_guard lock(mu_);
  auto it = slots_.find(environment);
  if (!started_ || it == slots_.end() || !it->second.pool || it->second.configured)
    return;
  if (auto r = configure(it->second, {layer}); !r)
    std::fprintf(stderr, "ferryd: warning: warm pool of %s: %s\n", environment.c_str(), r.error().message.c_str());
}

}  // namespace ferryd
