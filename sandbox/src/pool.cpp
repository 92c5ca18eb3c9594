// The warm pool (ferry/sandbox/pool.h).
//
// State: per key a `key_pool` (config, generation, entries by id, counters); each `entry` is one
// sandbox the pool holds, with its `forwarding_observer`. The refill thread plans under the
// pool's lock (what to reap, kill and start) and acts outside it. A forwarder's mutex and the
// pool's are never held together: a forwarder calls the pool after releasing its own, and the
// pool never calls a forwarder (hand_over) or a sandbox while it holds its own.

#include "ferry/sandbox/pool.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include <fmt/format.h>

namespace ferry::sandbox {

namespace {

using steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Two templates make the same sandboxes: every field of sandbox_spec is compared (its defaulted
// operator== picks up fields added later).
bool same_template(const sandbox_spec& a, const sandbox_spec& b) { return a == b; }

int64_t ms(steady::duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); }

}  // namespace

class sandbox_pool::impl {
 public:
  impl(sandbox_runtime& runtime, pool_options o) : runtime_(runtime), options_(std::move(o)) {
    new_nonce();
    refill_ = std::thread([this] { refill_loop(); });
  }

  ~impl() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    refill_.join();
    // What the pool still holds: killed all first (each kill() returns once the processes are
    // gone), then waited for (the slower cleanup — runsc delete, files, cgroups — runs on each
    // sandbox's reader thread, in parallel), then destroyed. Taken out of the map first: an
    // on_ended arriving meanwhile finds no entry and is dropped.
    std::vector<std::unique_ptr<entry>> all;
    {
      std::lock_guard lock(mu_);
      for (auto& [key, k] : keys_)
        for (auto& [id, e] : k.entries)
          all.push_back(std::move(e));
      keys_.clear();
    }
    for (auto& e : all)
      if (e->box)
        e->box->kill();
    for (auto& e : all)
      if (e->box)
        e->box->wait();
    all.clear();
  }

  result<void> configure(const std::string& key, pool_config c) {
    if (key.empty())
      return error_info{"sandbox pool: empty pool key", errc::invalid_argument};
    if (!c.spec.id.empty())
      return error_info{fmt::format("sandbox pool {}: the template has an id ({}); the pool names its sandboxes", key,
                                    c.spec.id.substr(0, 80)),
                        errc::invalid_argument};
    if (!c.spec.argv.empty())
      return error_info{fmt::format("sandbox pool {}: the template has a command line; pooled sandboxes are idle", key),
                        errc::invalid_argument};
    for (const auto& e : c.spec.env) {
      if (e.find('=') == std::string::npos || e.front() == '=')
        return error_info{fmt::format("sandbox pool {}: environment entry `{}` is not K=V", key, e),
                          errc::invalid_argument};
    }
    {
      std::lock_guard lock(mu_);
      if (stopping_)
        return error_info{"sandbox pool: being destroyed", errc::closed};
      auto [it, fresh] = keys_.try_emplace(key);
      key_pool& k = it->second;
      if (!fresh && !same_template(k.config.spec, c.spec)) {
        ++k.generation;  // the refill thread retires the old ones
        k.failures_in_a_row = 0;
        k.next_start_at.reset();
      }
      k.config = std::move(c);
      dirty_ = true;
    }
    cv_.notify_all();
    return {};
  }

  result<acquired_sandbox> acquire(const std::string& key, sandbox_observer& observer) {
    for (;;) {
      std::unique_ptr<entry> e;
      {
        std::lock_guard lock(mu_);
        if (stopping_)
          return error_info{"sandbox pool: being destroyed", errc::closed};
        auto it = keys_.find(key);
        if (it == keys_.end() || it->second.config.target == 0)
          return error_info{fmt::format("no sandbox pool for key {}", key), errc::not_found};
        key_pool& k = it->second;
        auto pick = k.entries.end();
        for (auto i = k.entries.begin(); i != k.entries.end(); ++i) {
          if (acquirable(k, *i->second) && (pick == k.entries.end() || i->second->running_at < pick->second->running_at))
            pick = i;
        }
        if (pick == k.entries.end()) {
          ++k.misses;
          return miss(key, k);
        }
        e = std::move(pick->second);
        k.entries.erase(pick);
        ++k.acquired;             // taken back below if it ended meanwhile
        k.failures_in_a_row = 0;  // it came up and stayed up until now
        dirty_ = true;            // one to replace
      }
      std::optional<std::string> failure;
      const bool handed_over = e->forwarder->hand_over(observer, failure);
      // The refill thread is woken only now, so that its work does not delay the hand-over.
      cv_.notify_all();
      if (handed_over) {
        acquired_sandbox out;
        out.id = e->id;
        out.box = std::make_unique<pooled_sandbox>(std::move(e->forwarder), std::move(e->box));
        return out;
      }
      // It ended between the pick and the hand-over: its on_ended reached the forwarder, which
      // found no entry. Count it here, destroy it (its reader thread is done or finishing), and
      // try the next one.
      {
        std::lock_guard lock(mu_);
        if (auto it = keys_.find(key); it != keys_.end()) {
          --it->second.acquired;
          ++it->second.died_idle;
          it->second.last_error =
            fmt::format("sandbox {} ended while idle in the pool: {}", e->id, failure.value_or("released"));
        }
      }
      e.reset();
    }
  }

  std::optional<pool_stats> stats(const std::string& key) const {
    std::lock_guard lock(mu_);
    auto it = keys_.find(key);
    if (it == keys_.end())
      return std::nullopt;
    const key_pool& k = it->second;
    pool_stats s;
    s.target = k.config.target;
    for (const auto& [id, e] : k.entries) {
      if (acquirable(k, *e))
        ++s.ready;
      else if (e->retiring)
        ++s.retiring;
      else if (!e->ended && !e->up)
        ++s.starting;
    }
    s.starts = k.starts;
    s.start_failures = k.start_failures;
    s.died_idle = k.died_idle;
    s.acquired = k.acquired;
    s.misses = k.misses;
    s.failures_in_a_row = k.failures_in_a_row;
    s.next_start_at = k.next_start_at;
    s.last_error = k.last_error;
    return s;
  }

  bool wait_ready(const std::string& key, size_t n, std::chrono::milliseconds timeout) const {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      if (stopping_)
        return true;
      auto it = keys_.find(key);
      if (it == keys_.end())
        return n == 0;
      size_t ready = 0;
      for (const auto& [id, e] : it->second.entries)
        ready += acquirable(it->second, *e) ? 1 : 0;
      return ready >= n;
    }) && !stopping_;
  }

 private:
  /// Between a pooled sandbox and whoever observes it: the pool until the hand-over, then the
  /// caller's observer. The sandbox's reader thread is the only caller of the callbacks; the
  /// mutex orders them against hand_over.
  class forwarding_observer final : public sandbox_observer {
   public:
    forwarding_observer(impl& pool, std::string key, std::string id)
        : pool_(&pool), key_(std::move(key)), id_(std::move(id)) {}

    /// From now on every callback goes to `to`. False (nothing changes) if the sandbox already
    /// ended while the pool's: `failure` is then its reason.
    bool hand_over(sandbox_observer& to, std::optional<std::string>& failure) {
      std::lock_guard lock(mu_);
      if (ended_) {
        failure = failure_;
        return false;
      }
      target_ = &to;
      pool_ = nullptr;
      return true;
    }

    // The pool's bookkeeping runs outside mu_: an acquire that picked this sandbox the moment
    // it came up must not wait in hand_over for the reader thread to finish it (measured: up to
    // 3.6 ms when the reader thread lost its CPU meanwhile). Safe: the pool hands over only a
    // sandbox whose on_running it has noted, and one whose end is marked here under mu_.
    void on_running() override {
      impl* pool = nullptr;
      {
        std::lock_guard lock(mu_);
        if (target_) {
          target_->on_running();
          return;
        }
        pool = pool_;
      }
      pool->note_running(key_, id_);
    }
    void on_command_started(uint32_t id, const std::vector<std::string>& argv) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_command_started(id, argv);
    }
    void on_output(uint32_t id, int stream, std::string_view data) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_output(id, stream, data);
    }
    void on_output_gap(uint32_t id, int stream, uint64_t lost_bytes) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_output_gap(id, stream, lost_bytes);
    }
    void on_output_truncated(uint32_t id, std::string_view path) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_output_truncated(id, path);
    }
    void on_command_ended(const command_exit& e) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_command_ended(e);
    }
    void on_command_exited(uint32_t id, int exit_code, int signal, uint64_t duration_ms) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_command_exited(id, exit_code, signal, duration_ms);
    }
    void on_command_failed(uint32_t id, std::string_view reason) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_command_failed(id, reason);
    }
    void on_processes_gone(steady::time_point at) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_processes_gone(at);
    }
    void on_limit_reached(const limit_hit& hit) override {
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_limit_reached(hit);
    }
    void on_egress(const egress_event& e) override {
      // While pooled nobody records them (the sandbox runs nothing); after the hand-over the
      // caller's observer does.
      std::lock_guard lock(mu_);
      if (target_)
        target_->on_egress(e);
    }
    void on_ended(std::optional<std::string> failure) override {
      impl* pool = nullptr;
      {
        std::lock_guard lock(mu_);
        if (target_) {
          target_->on_ended(std::move(failure));
          return;
        }
        ended_ = true;
        failure_ = failure;
        pool = pool_;
      }
      pool->note_ended(key_, id_, std::move(failure));
    }

   private:
    std::mutex mu_;
    impl* pool_;                          // REQUIRES: mu_. Until the hand-over
    sandbox_observer* target_ = nullptr;  // REQUIRES: mu_. After it
    bool ended_ = false;                  // REQUIRES: mu_. on_ended reached the pool
    std::optional<std::string> failure_;  // REQUIRES: mu_
    const std::string key_, id_;
  };

  /// A handed-over sandbox: the sandbox and the forwarder it was started with, which must
  /// outlive it (the sandbox is destroyed first: declared last).
  class pooled_sandbox final : public sandbox {
   public:
    pooled_sandbox(std::unique_ptr<forwarding_observer> f, std::unique_ptr<sandbox> b)
        : forwarder_(std::move(f)), box_(std::move(b)) {}

    const std::string& id() const override { return box_->id(); }
    result<void> run(const command_spec& spec) override { return box_->run(spec); }
    result<void> signal(uint32_t command_id, int signo, bool whole_group) override {
      return box_->signal(command_id, signo, whole_group);
    }
    result<void> write_stdin(uint32_t command_id, std::string_view data, bool close) override {
      return box_->write_stdin(command_id, data, close);
    }
    result<void> release() override { return box_->release(); }
    result<void> renew_egress() override { return box_->renew_egress(); }
    result<file_text> read_file(const std::string& path, const read_options& options) override {
      return box_->read_file(path, options);
    }
    result<file_written> write_file(const std::string& path, std::string_view content, uint32_t mode) override {
      return box_->write_file(path, content, mode);
    }
    result<file_edited> edit_file(const std::string& path, std::string_view old_string, std::string_view new_string,
                                  bool replace_all) override {
      return box_->edit_file(path, old_string, new_string, replace_all);
    }
    result<dir_listing> list_dir(const std::string& path, uint32_t max_entries) override {
      return box_->list_dir(path, max_entries);
    }
    result<glob_matches> glob(const std::string& pattern, const glob_options& options) override {
      return box_->glob(pattern, options);
    }
    result<grep_matches> grep(const std::string& pattern, const grep_options& options) override {
      return box_->grep(pattern, options);
    }
    result<void> save_root_layer(const std::filesystem::path& dest) override { return box_->save_root_layer(dest); }
    void kill() override { box_->kill(); }
    void detach() override { box_->detach(); }
    void wait() override { box_->wait(); }

   private:
    std::unique_ptr<forwarding_observer> forwarder_;
    std::unique_ptr<sandbox> box_;
  };

  /// One sandbox the pool holds.
  struct entry {
    std::string id;
    uint64_t generation = 0;
    steady::time_point started_at, running_at;
    bool start_returned = false;  // start() came back with box set (until then no reaping)
    bool up = false;              // on_running reached the pool
    bool ended = false;           // on_ended reached the pool
    bool retiring = false;        // killed by the pool: never handed out, its end no failure
    std::unique_ptr<forwarding_observer> forwarder;  // outlives box (declared first)
    std::unique_ptr<sandbox> box;
  };

  struct key_pool {
    pool_config config;
    uint64_t generation = 0;  // of config.spec; entries of an older one are retired
    std::map<std::string, std::unique_ptr<entry>> entries;  // by id
    uint64_t starts = 0, start_failures = 0, died_idle = 0, acquired = 0, misses = 0;
    uint32_t failures_in_a_row = 0;
    std::optional<steady::time_point> next_start_at;
    std::string last_error;
  };

  // REQUIRES: mu_
  static bool acquirable(const key_pool& k, const entry& e) {
    return e.up && !e.ended && !e.retiring && e.box && e.generation == k.generation;
  }

  // REQUIRES: mu_
  error_info miss(const std::string& key, const key_pool& k) const {
    size_t starting = 0;
    for (const auto& [id, e] : k.entries)
      starting += (!e->up && !e->ended && !e->retiring) ? 1 : 0;
    if (k.failures_in_a_row > 0) {
      const auto wait = k.next_start_at ? std::max<int64_t>(0, ms(*k.next_start_at - steady::now())) : 0;
      return error_info{fmt::format("no sandbox ready in pool {}: its starts are failing ({} in a row, next try in "
                                    "{} ms): {}",
                                    key, k.failures_in_a_row, wait, k.last_error),
                        errc::failed};
    }
    return error_info{
      fmt::format("no sandbox ready in pool {} yet ({} starting, target {})", key, starting, k.config.target),
      errc::busy};
  }

  // REQUIRES: mu_. A start failure of key `k`: counted, remembered, and the next start delayed.
  void start_failed(key_pool& k, std::string why) {
    ++k.start_failures;
    ++k.failures_in_a_row;
    k.last_error = std::move(why);
    auto delay = options_.backoff_initial;
    for (uint32_t i = 1; i < k.failures_in_a_row && delay < options_.backoff_max; ++i)
      delay *= 2;
    k.next_start_at = steady::now() + std::min(delay, options_.backoff_max);
  }

  // From a forwarder (the sandbox's reader thread, not holding the forwarder's mutex).
  // Both notify under the lock: once it is released, an acquire may hand the sandbox over and
  // the pool may be destroyed while this reader thread is still on its way out.
  void note_running(const std::string& key, const std::string& id) {
    std::lock_guard lock(mu_);
    entry* e = find(key, id);
    if (!e || e->ended)
      return;
    e->up = true;
    e->running_at = steady::now();
    dirty_ = true;  // one fewer starting: another may start
    cv_.notify_all();
  }

  void note_ended(const std::string& key, const std::string& id, std::optional<std::string> failure) {
    std::lock_guard lock(mu_);
    entry* e = find(key, id);
    if (!e)
      return;  // taken by acquire a moment ago (it sees the end in hand_over), or the pool is ending
    e->ended = true;
    dirty_ = true;
    key_pool& k = keys_[key];
    const std::string why = failure.value_or("released");
    if (e->retiring) {
      // Killed by the pool: expected (a start timeout was counted when it was decided).
    } else if (!e->up) {
      start_failed(k, fmt::format("sandbox {} failed to start: {}", id, why));
    } else {
      ++k.died_idle;
      const auto lived = steady::now() - e->running_at;
      if (lived < options_.healthy_after) {
        start_failed(k, fmt::format("sandbox {} ended {} ms after it came up: {}", id, ms(lived), why));
      } else {
        k.failures_in_a_row = 0;
        k.next_start_at.reset();
        k.last_error = fmt::format("sandbox {} ended while idle in the pool: {}", id, why);
      }
    }
    cv_.notify_all();
  }

  // REQUIRES: mu_
  entry* find(const std::string& key, const std::string& id) {
    auto k = keys_.find(key);
    if (k == keys_.end())
      return nullptr;
    auto e = k->second.entries.find(id);
    return e == k->second.entries.end() ? nullptr : e->second.get();
  }

  // REQUIRES: mu_. A new random part for the ids; the counter starts again.
  void new_nonce() {
    uint64_t r = 0;
    try {
      std::random_device rd;
      r = (uint64_t{rd()} << 32) ^ rd();
    } catch (const std::exception&) {
      // No entropy source: the time and this process still make a clash with a leftover unlikely
      // (and a clash is only a refused start: the directory claims the id).
      r = static_cast<uint64_t>(steady::now().time_since_epoch().count()) * 0x9e3779b97f4a7c15ull ^
          static_cast<uint64_t>(::getpid());
    }
    nonce_ = fmt::format("{:012x}", r & 0xffffffffffffull);
    counter_ = 0;
  }

  // REQUIRES: mu_. `<prefix>-<12 hex>-<6 digits>`: every id of this pool has the same length.
  std::string next_id() {
    if (++counter_ > 999999) {
      new_nonce();
      counter_ = 1;
    }
    return fmt::format("{}-{}-{:06d}", options_.id_prefix, nonce_, counter_);
  }

  /// What one refill pass does outside the lock.
  struct plan {
    std::vector<std::unique_ptr<entry>> reap;  // ended: destroyed (joins their reader threads)
    std::vector<sandbox*> kill;                // retiring: entries stay in the map until they end
    struct start_item {
      std::string key, id;
      sandbox_spec spec;
      forwarding_observer* forwarder;
    };
    std::vector<start_item> start;
    std::optional<steady::time_point> wake_at;
    bool empty() const { return reap.empty() && kill.empty() && start.empty(); }
  };

  // REQUIRES: mu_. Only the refill thread erases entries that are not handed over, so the
  // sandbox pointers in the plan stay valid while it acts.
  plan make_plan() {
    plan p;
    const auto now = steady::now();
    auto wake = [&](steady::time_point t) { p.wake_at = p.wake_at ? std::min(*p.wake_at, t) : t; };
    size_t starting = 0;
    for (auto& [key, k] : keys_)
      for (auto& [id, e] : k.entries)
        starting += (!e->up && !e->ended) ? 1 : 0;
    for (auto& [key, k] : keys_) {
      size_t live = 0;
      for (auto it = k.entries.begin(); it != k.entries.end();) {
        entry& e = *it->second;
        if (e.ended && e.start_returned) {
          p.reap.push_back(std::move(it->second));
          it = k.entries.erase(it);
          continue;
        }
        if (!e.ended && !e.retiring && e.box) {
          if (e.generation != k.generation) {
            e.retiring = true;
            p.kill.push_back(e.box.get());
          } else if (!e.up && now - e.started_at > options_.start_timeout) {
            e.retiring = true;
            p.kill.push_back(e.box.get());
            start_failed(k, fmt::format("sandbox {} did not come up within {} ms", e.id, ms(options_.start_timeout)));
          } else if (e.up && now - e.running_at >= options_.healthy_after) {
            k.failures_in_a_row = 0;  // it came up and stayed up
          } else if (e.up && k.failures_in_a_row > 0) {
            wake(e.running_at + options_.healthy_after);  // then the back-off ends
          }
        }
        if (!e.ended && !e.retiring) {
          ++live;
          if (!e.up)
            wake(e.started_at + options_.start_timeout + 1ms);
        }
        ++it;
      }
      // Beyond the target: retire the newest first (the starting ones, then the youngest ready).
      for (auto it = k.entries.rbegin(); live > k.config.target && it != k.entries.rend(); ++it) {
        entry& e = *it->second;
        if (!e.ended && !e.retiring && e.box) {
          e.retiring = true;
          p.kill.push_back(e.box.get());
          --live;
        }
      }
      if (k.failures_in_a_row == 0)
        k.next_start_at.reset();
      // While starts fail, one at a time per key (a probe), each after its back-off.
      size_t key_starting = 0;
      for (const auto& [id, e] : k.entries)
        key_starting += (!e->up && !e->ended && !e->retiring) ? 1 : 0;
      while (live < k.config.target && starting < options_.max_starting &&
             (k.failures_in_a_row == 0 || key_starting == 0)) {
        if (k.next_start_at && now < *k.next_start_at) {
          wake(*k.next_start_at);
          break;
        }
        auto e = std::make_unique<entry>();
        e->id = next_id();
        e->generation = k.generation;
        e->started_at = now;
        e->forwarder = std::make_unique<forwarding_observer>(*this, key, e->id);
        sandbox_spec spec = k.config.spec;
        spec.id = e->id;
        p.start.push_back({key, e->id, std::move(spec), e->forwarder.get()});
        k.entries.emplace(e->id, std::move(e));
        ++k.starts;
        ++live;
        ++starting;
        ++key_starting;
      }
    }
    return p;
  }

  void refill_loop() {
    std::unique_lock lock(mu_);
    while (!stopping_) {
      plan p = make_plan();
      if (p.empty()) {
        auto pending = [&] { return stopping_ || dirty_; };
        if (p.wake_at)
          cv_.wait_until(lock, *p.wake_at, pending);
        else
          cv_.wait(lock, pending);
        dirty_ = false;
        continue;
      }
      lock.unlock();
      p.reap.clear();
      for (sandbox* s : p.kill)
        s->kill();
      std::set<std::string> refused;  // keys whose start was refused in this pass
      for (auto& item : p.start) {
        std::optional<result<std::unique_ptr<sandbox>>> r;
        if (!refused.count(item.key))
          r = runtime_.start(item.spec, *item.forwarder);
        std::lock_guard relock(mu_);
        auto k = keys_.find(item.key);
        if (k == keys_.end())
          continue;  // cannot happen: keys are never erased while the refill thread runs
        auto e = k->second.entries.find(item.id);
        if (e == k->second.entries.end())
          continue;  // cannot happen: only this thread erases entries not handed over
        if (!r) {
          // The key's start before was refused: the rest of its batch waits for the back-off.
          --k->second.starts;
          k->second.entries.erase(e);
          continue;
        }
        if (*r) {
          e->second->box = std::move(**r);
          e->second->start_returned = true;
        } else {
          refused.insert(item.key);
          start_failed(k->second, fmt::format("sandbox {}: start refused: {}", item.id, r->error().message));
          k->second.entries.erase(e);  // no sandbox object: nothing will call its forwarder
        }
      }
      cv_.notify_all();  // a box stored may make a sandbox acquirable (wait_ready)
      lock.lock();
    }
  }

  sandbox_runtime& runtime_;
  const pool_options options_;

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;  // refill work, readiness, stopping
  std::map<std::string, key_pool> keys_;  // REQUIRES: mu_
  bool dirty_ = false;                    // REQUIRES: mu_. Something for the refill thread to look at
  bool stopping_ = false;                 // REQUIRES: mu_
  std::string nonce_;                     // REQUIRES: mu_ (or the constructor)
  uint32_t counter_ = 0;                  // REQUIRES: mu_
  std::thread refill_;                    // last: starts once everything above exists
};

sandbox_pool::sandbox_pool(std::unique_ptr<impl> i) : impl_(std::move(i)) {}
sandbox_pool::~sandbox_pool() = default;

result<void> sandbox_pool::configure(const std::string& key, pool_config config) {
  return impl_->configure(key, std::move(config));
}
result<acquired_sandbox> sandbox_pool::acquire(const std::string& key, sandbox_observer& observer) {
  return impl_->acquire(key, observer);
}
std::optional<pool_stats> sandbox_pool::stats(const std::string& key) const { return impl_->stats(key); }
bool sandbox_pool::wait_ready(const std::string& key, size_t n, std::chrono::milliseconds timeout) const {
  return impl_->wait_ready(key, n, timeout);
}

result<std::unique_ptr<sandbox_pool>> make_sandbox_pool(sandbox_runtime& runtime, pool_options options) {
  const auto& p = options.id_prefix;
  if (p.empty() || p.size() > 16 ||
      !std::all_of(p.begin(), p.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)); }))
    return error_info{fmt::format("sandbox pool: id prefix `{}`: use 1 to 16 letters and digits", p.substr(0, 80)),
                      errc::invalid_argument};
  if (options.max_starting == 0)
    return error_info{"sandbox pool: max_starting must be at least 1", errc::invalid_argument};
  if (options.start_timeout <= 0ms || options.backoff_initial <= 0ms || options.backoff_max < options.backoff_initial ||
      options.healthy_after < 0ms)
    return error_info{"sandbox pool: start_timeout and backoff_initial must be positive, backoff_max ≥ backoff_initial, "
                      "healthy_after ≥ 0",
                      errc::invalid_argument};
  return std::make_unique<sandbox_pool>(std::make_unique<sandbox_pool::impl>(runtime, std::move(options)));
}

}  // namespace ferry::sandbox
