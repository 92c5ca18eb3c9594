#define BOOST_TEST_MODULE sandbox_pool_logic
#include <boost/test/unit_test.hpp>

// The warm pool's logic against a scripted runtime (no real sandboxes, no root): the test decides
// when each sandbox comes up, what it says and when it ends. Pins down what the real-sandbox
// pool_test cannot make happen at will: callbacks before the hand-over never reach the caller and
// after it never reach the pool; a start refused backs off exponentially, one probe at a time;
// a sandbox that never comes up is killed after start_timeout and counts as a failure; one that
// ends right after coming up counts as a failed start, one that lived long enough does not.

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "ferry/sandbox/pool.h"
#include "ferry/sandbox/sandbox.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

/// A sandbox whose "reader thread" delivers what the test pushes, in order.
class scripted_sandbox final : public sandbox {
 public:
  scripted_sandbox(std::string id, sandbox_observer& obs, std::shared_ptr<std::atomic<bool>> killed)
      : id_(std::move(id)), obs_(obs), killed_(std::move(killed)) {
    reader_ = std::thread([this] { loop(); });
  }
  ~scripted_sandbox() override {
    kill();
    wait();
    reader_.join();
  }

  /// Delivers `f(observer)` on the reader thread.
  void push(std::function<void(sandbox_observer&)> f) {
    std::lock_guard lock(mu_);
    queue_.push_back(std::move(f));
    ++pushed_;
    cv_.notify_all();
  }
  /// Waits until everything pushed so far has been delivered.
  void drain() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return delivered_ == pushed_ || ended_; });
  }
  void end(std::optional<std::string> failure) {
    std::lock_guard lock(mu_);
    if (ending_)
      return;
    ending_ = true;
    queue_.push_back([failure](sandbox_observer& o) { o.on_ended(failure); });
    ++pushed_;
    cv_.notify_all();
  }

  const std::string& id() const override { return id_; }
  ferry::result<void> run(const command_spec&) override { return {}; }
  ferry::result<void> signal(uint32_t, int, bool) override { return {}; }
  ferry::result<void> write_stdin(uint32_t, std::string_view, bool) override { return {}; }
  ferry::result<void> release() override {
    end(std::nullopt);
    return {};
  }
  ferry::result<void> renew_egress() override { return ferry::error_info{"scripted: no egress"}; }
  ferry::result<file_text> read_file(const std::string&, const read_options&) override { return ferry::fail("no"); }
  ferry::result<void> save_root_layer(const std::filesystem::path&) override { return ferry::fail("no"); }
  ferry::result<file_written> write_file(const std::string&, std::string_view, uint32_t) override {
    return ferry::fail("no");
  }
  ferry::result<file_edited> edit_file(const std::string&, std::string_view, std::string_view, bool) override {
    return ferry::fail("no");
  }
  ferry::result<dir_listing> list_dir(const std::string&, uint32_t) override { return ferry::fail("no"); }
  ferry::result<glob_matches> glob(const std::string&, const glob_options&) override { return ferry::fail("no"); }
  ferry::result<grep_matches> grep(const std::string&, const grep_options&) override { return ferry::fail("no"); }
  void kill() override {
    *killed_ = true;
    end("killed");
  }
  void detach() override {}
  void wait() override {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return ended_; });
  }

 private:
  void loop() {
    for (;;) {
      std::function<void(sandbox_observer&)> f;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty(); });
        f = std::move(queue_.front());
        queue_.pop_front();
      }
      bool last = false;
      struct ending_probe final : sandbox_observer {
        sandbox_observer& inner;
        bool& last;
        ending_probe(sandbox_observer& i, bool& l) : inner(i), last(l) {}
        void on_running() override { inner.on_running(); }
        void on_command_started(uint32_t id, const std::vector<std::string>& a) override { inner.on_command_started(id, a); }
        void on_output(uint32_t id, int s, std::string_view d) override { inner.on_output(id, s, d); }
        void on_ended(std::optional<std::string> f) override {
          inner.on_ended(std::move(f));
          last = true;
        }
      } probe(obs_, last);
      f(probe);
      std::lock_guard lock(mu_);
      ++delivered_;
      ended_ = ended_ || last;
      cv_.notify_all();
      if (last)
        return;
    }
  }

  const std::string id_;
  sandbox_observer& obs_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void(sandbox_observer&)>> queue_;
  std::shared_ptr<std::atomic<bool>> killed_;
  uint64_t pushed_ = 0, delivered_ = 0;
  bool ending_ = false, ended_ = false;
  std::thread reader_;
};

/// Starts scripted sandboxes (or refuses, while `refuse` is set) and lets the test reach them.
class scripted_runtime final : public sandbox_runtime {
 public:
  std::string_view name() const override { return "scripted"; }
  ferry::result<std::unique_ptr<sandbox>> start(const sandbox_spec& spec, sandbox_observer& obs) override {
    std::lock_guard lock(mu_);
    attempts_.push_back(steady::now());
    if (refuse_)
      return ferry::fail("refused by the script");
    killed_.push_back(std::make_shared<std::atomic<bool>>(false));
    auto sb = std::make_unique<scripted_sandbox>(spec.id, obs, killed_.back());
    started_.push_back(sb.get());
    envs_.push_back(spec.env);
    if (auto_up_)
      sb->push([](sandbox_observer& o) { o.on_running(); });
    cv_.notify_all();
    return std::unique_ptr<sandbox>(std::move(sb));
  }
  ferry::result<std::unique_ptr<sandbox>> attach(const std::string&, std::span<const resume_point>,
                                                 sandbox_observer&) override {
    return ferry::fail("no");
  }
  ferry::result<std::vector<std::string>> list_live() override { return std::vector<std::string>{}; }
  ferry::result<size_t> cleanup_orphans(const std::set<std::string>&) override { return size_t{0}; }

  void set_refuse(bool r) {
    std::lock_guard lock(mu_);
    refuse_ = r;
  }
  void set_auto_up(bool u) {
    std::lock_guard lock(mu_);
    auto_up_ = u;
  }
  /// The n-th sandbox started (0-based), once it is (valid while the pool holds it).
  scripted_sandbox* wait_started(size_t n, std::chrono::milliseconds timeout = 5s) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return started_.size() > n; }))
      return nullptr;
    return started_[n];
  }
  std::vector<steady::time_point> attempts() const {
    std::lock_guard lock(mu_);
    return attempts_;
  }
  /// Whether the n-th sandbox started was killed (also once it is gone).
  bool killed(size_t n) const {
    std::lock_guard lock(mu_);
    return n < killed_.size() && *killed_[n];
  }
  size_t started() const {
    std::lock_guard lock(mu_);
    return started_.size();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool refuse_ = false, auto_up_ = true;
  std::vector<scripted_sandbox*> started_;
  std::vector<std::shared_ptr<std::atomic<bool>>> killed_;
  std::vector<std::vector<std::string>> envs_;
  std::vector<steady::time_point> attempts_;
};

/// Counts what reaches it.
struct counting_observer final : sandbox_observer {
  std::mutex mu;
  std::condition_variable cv;
  int running = 0, ended = 0;
  std::string output;
  void on_running() override {
    std::lock_guard l(mu);
    ++running;
    cv.notify_all();
  }
  void on_command_started(uint32_t, const std::vector<std::string>&) override {}
  void on_output(uint32_t, int, std::string_view d) override {
    std::lock_guard l(mu);
    output += d;
    cv.notify_all();
  }
  void on_ended(std::optional<std::string>) override {
    std::lock_guard l(mu);
    ++ended;
    cv.notify_all();
  }
  template <class P>
  bool wait(P pred) {
    std::unique_lock l(mu);
    return cv.wait_for(l, 5s, pred);
  }
};

std::unique_ptr<sandbox_pool> make_pool(sandbox_runtime& rt, pool_options o) {
  auto p = make_sandbox_pool(rt, std::move(o));
  BOOST_REQUIRE_MESSAGE(p.ok(), (p.ok() ? "" : p.error().message));
  return std::move(*p);
}

pool_config target(size_t n) {
  pool_config c;
  c.target = n;
  return c;
}

template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = 5s) {
  const auto deadline = steady::now() + timeout;
  while (!pred()) {
    if (steady::now() > deadline)
      return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

}  // namespace

BOOST_AUTO_TEST_CASE(callbacks_reach_the_pool_before_the_hand_over_and_the_caller_after) {
  scripted_runtime rt;
  auto pool = make_pool(rt, pool_options{});
  BOOST_REQUIRE(pool->configure("k", target(1)).ok());
  BOOST_REQUIRE(pool->wait_ready("k", 1, 5s));
  scripted_sandbox* sb = rt.wait_started(0);
  BOOST_REQUIRE(sb);
  // Something said while the sandbox is the pool's is the pool's (an idle sandbox says nothing
  // but on_running; this one does, to show where it goes).
  sb->push([](sandbox_observer& o) { o.on_output(7, 0, "before"); });
  sb->drain();
  counting_observer caller;
  auto a = pool->acquire("k", caller);
  BOOST_REQUIRE(a.ok());
  BOOST_TEST(a->id == sb->id());
  sb->push([](sandbox_observer& o) { o.on_output(7, 0, "after"); });
  BOOST_REQUIRE(caller.wait([&] { return caller.output == "after"; }));
  BOOST_TEST(caller.running == 0, "on_running was the pool's");
  // The end is the caller's; the pool does not count it as a death in the pool.
  a->box->release().ok();
  a->box->wait();
  BOOST_TEST(caller.ended == 1);
  BOOST_REQUIRE(eventually([&] { return pool->stats("k")->ready == 1; }));
  BOOST_TEST(pool->stats("k")->died_idle == 0u);
  BOOST_TEST(pool->stats("k")->acquired == 1u);
  // Outliving the pool: the handed-over sandbox's observer is still the caller's.
  counting_observer second;
  auto b = pool->acquire("k", second);
  BOOST_REQUIRE(b.ok());
  auto* inner = rt.wait_started(1);
  pool.reset();
  inner->push([](sandbox_observer& o) { o.on_output(1, 0, "still"); });
  BOOST_REQUIRE(second.wait([&] { return second.output == "still"; }));
}

BOOST_AUTO_TEST_CASE(refused_starts_back_off_exponentially_one_probe_at_a_time) {
  scripted_runtime rt;
  rt.set_refuse(true);
  pool_options o;
  o.backoff_initial = 40ms;
  o.backoff_max = 320ms;
  o.max_starting = 4;
  auto pool = make_pool(rt, o);
  BOOST_REQUIRE(pool->configure("k", target(4)).ok());
  std::this_thread::sleep_for(1500ms);
  const auto at = rt.attempts();
  // 0, 40, 80, 160, 320, 320 … ms apart: ~8 in 1.5 s (a hot loop: thousands).
  BOOST_TEST_MESSAGE(at.size() << " attempts in 1.5 s");
  BOOST_TEST(at.size() >= 5u);
  BOOST_TEST(at.size() <= 10u);
  for (size_t i = 1; i < at.size(); ++i) {
    const auto gap = at[i] - at[i - 1];
    const auto expected = std::min(o.backoff_initial * (1 << std::min<size_t>(i - 1, 10)), o.backoff_max);
    BOOST_TEST((gap >= expected - 2ms), "attempt " << i << " came "
                                                   << std::chrono::duration_cast<std::chrono::milliseconds>(gap).count()
                                                   << " ms after the one before, back-off " << expected.count() << " ms");
  }
  auto s = *pool->stats("k");
  BOOST_TEST(s.start_failures == at.size());
  BOOST_TEST(s.last_error.find("refused by the script") != std::string::npos, s.last_error);
  BOOST_TEST(s.next_start_at.has_value());
  counting_observer obs;
  auto miss = pool->acquire("k", obs);
  BOOST_REQUIRE(!miss.ok());
  BOOST_TEST((miss.error().code == ferry::errc::failed));
  // Starts succeed again: the next probe comes up, the failures are forgotten once it was
  // acquired, and the pool fills.
  rt.set_refuse(false);
  BOOST_REQUIRE(pool->wait_ready("k", 1, 2s));
  auto a = pool->acquire("k", obs);
  BOOST_REQUIRE(a.ok());
  BOOST_REQUIRE(pool->wait_ready("k", 4, 2s));
  BOOST_TEST(pool->stats("k")->failures_in_a_row == 0u);
}

BOOST_AUTO_TEST_CASE(a_sandbox_that_never_comes_up_is_killed_and_counted) {
  scripted_runtime rt;
  rt.set_auto_up(false);
  pool_options o;
  o.start_timeout = 200ms;
  o.backoff_initial = 1s;
  auto pool = make_pool(rt, o);
  BOOST_REQUIRE(pool->configure("k", target(1)).ok());
  auto* sb = rt.wait_started(0);
  BOOST_REQUIRE(sb);
  BOOST_REQUIRE(eventually([&] { return rt.killed(0); }, 2s));
  BOOST_REQUIRE(eventually([&] { return pool->stats("k")->start_failures == 1; }));
  BOOST_TEST(pool->stats("k")->last_error.find("did not come up within 200 ms") != std::string::npos,
             pool->stats("k")->last_error);
  BOOST_TEST(rt.started() == 1u, "the next start waits for the back-off");
}

BOOST_AUTO_TEST_CASE(an_end_right_after_coming_up_is_a_failed_start_a_later_one_is_not) {
  scripted_runtime rt;
  pool_options o;
  o.healthy_after = 300ms;
  o.backoff_initial = 50ms;
  auto pool = make_pool(rt, o);
  BOOST_REQUIRE(pool->configure("k", target(1)).ok());
  BOOST_REQUIRE(pool->wait_ready("k", 1, 5s));
  rt.wait_started(0)->end("crashed at once");
  BOOST_REQUIRE(eventually([&] { return pool->stats("k")->start_failures == 1 && pool->stats("k")->ready == 1; }));
  BOOST_TEST(pool->stats("k")->died_idle == 1u);
  BOOST_TEST(pool->stats("k")->last_error.find("crashed at once") != std::string::npos);
  std::this_thread::sleep_for(400ms);  // the replacement lived past healthy_after
  BOOST_REQUIRE(eventually([&] { return pool->stats("k")->failures_in_a_row == 0; }));
  rt.wait_started(1)->end("crashed later");
  BOOST_REQUIRE(eventually([&] { return pool->stats("k")->died_idle == 2 && pool->stats("k")->ready == 1; }));
  BOOST_TEST(pool->stats("k")->start_failures == 1u);
  BOOST_TEST(pool->stats("k")->failures_in_a_row == 0u);
  BOOST_TEST(!pool->stats("k")->next_start_at.has_value());
}
