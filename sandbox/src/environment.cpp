// Environments and the cache of their setup layers (environment.h).

#include "ferry/sandbox/environment.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <utility>
#include <thread>

#include <fmt/format.h>

#include "sha256.h"
#include "unique_fd.h"

namespace ferry::sandbox {

namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
using detail::sha256_hex;
using detail::unique_fd;

namespace {

constexpr uint32_t setup_command = 1;
constexpr size_t tail_bytes = 2048;


/// Follows the setup sandbox: passes its output on, keeps the tail, says when it is over.
class setup_observer final : public sandbox_observer {
 public:
  setup_observer(const setup_output& out, const egress_binder::report_fn& egress) : out_(out), egress_(egress) {}

  void on_running() override {}
  void on_command_started(uint32_t, const std::vector<std::string>&) override {}
  void on_output(uint32_t, int stream, std::string_view data) override {
    if (out_)
      out_(stream, data);
    std::lock_guard lock(mu_);
    tail_.append(data);
    if (tail_.size() > tail_bytes)
      tail_.erase(0, tail_.size() - tail_bytes);
  }
  void on_command_ended(const command_exit& e) override {
    std::lock_guard lock(mu_);
    exit_ = e;
    cv_.notify_all();
  }
  void on_command_failed(uint32_t, std::string_view reason) override {
    std::lock_guard lock(mu_);
    failure_ = std::string(reason);
    cv_.notify_all();
  }
  void on_egress(const egress_event& e) override {
    if (egress_)
      egress_(e);
  }
  void on_ended(std::optional<std::string> failure) override {
    std::lock_guard lock(mu_);
    ended_ = true;
    if (!failure_ && !exit_)
      failure_ = failure.value_or("the sandbox ended before the setup did");
    cv_.notify_all();
  }

  /// Waits until the setup command ended (or could not run, or the sandbox ended).
  void wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return exit_ || failure_ || ended_; });
  }
  std::optional<command_exit> exit() const {
    std::lock_guard lock(mu_);
    return exit_;
  }
  std::optional<std::string> failure() const {
    std::lock_guard lock(mu_);
    return failure_;
  }
  std::string tail() const {
    std::lock_guard lock(mu_);
    return tail_;
  }

 private:
  const setup_output& out_;
  const egress_binder::report_fn& egress_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string tail_;                      // REQUIRES: mu_
  std::optional<command_exit> exit_;      // REQUIRES: mu_
  std::optional<std::string> failure_;    // REQUIRES: mu_
  bool ended_ = false;                    // REQUIRES: mu_
};

/// " — its output ended: …" or "".
std::string with_tail(std::string tail) {
  while (!tail.empty() && (tail.back() == '\n' || tail.back() == ' '))
    tail.pop_back();
  return tail.empty() ? "" : "; its output ended: " + tail;
}

}  // namespace

std::string environment_key(const environment_spec& env) {
  // Length-prefixed fields: no two different environments write the same bytes.
  std::string text = "ferry-environment-1\n";
  auto add = [&](std::string_view field) { text += fmt::format("{}:{}\n", field.size(), field); };
  add(env.base);
  add(env.setup_script);
  for (const auto& e : env.env)
    add(e);
  return sha256_hex(text);
}

void setup_cancel::cancel() {
  // Under the lock: `ensure` takes the sandbox back (watch(nullptr)) before it destroys it.
  std::lock_guard lock(mu_);
  if (std::exchange(cancelled_, true))
    return;
  if (box_)
    box_->kill();
}

bool setup_cancel::cancelled() const {
  std::lock_guard lock(mu_);
  return cancelled_;
}

bool setup_cancel::watch(sandbox* box) {
  std::lock_guard lock(mu_);
  box_ = cancelled_ ? nullptr : box;
  return !cancelled_;
}

layer_cache::layer_cache(fs::path dir) : dir_(std::move(dir)) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
}

std::optional<fs::path> layer_cache::find(const std::string& key) const {
  std::error_code ec;
  const fs::path path = dir_ / key;
  if (fs::is_directory(path, ec))
    return path;
  return std::nullopt;
}

result<environment_layer> layer_cache::ensure(sandbox_runtime& runtime, const environment_spec& env,
                                              const setup_output& output, setup_cancel* cancel,
                                              const egress_binder::report_fn& egress, const std::string& sandbox_id) {
  if (env.base.empty())
    return fail(errc::invalid_argument, "an environment needs a base (its root's identity)");
  if (env.setup_script.empty())
    return fail(errc::invalid_argument, "an environment without a setup script has no layer");
  if (env.setup_timeout.count() <= 0)
    return fail(errc::invalid_argument, "an environment's setup timeout must be positive");
  environment_layer layer;
  layer.key = environment_key(env);
  layer.path = dir_ / layer.key;
  if (find(layer.key)) {
    layer.cached = true;
    return layer;
  }

  // One build per key at a time, across processes: the second waits and finds it made.
  std::error_code ec;
  fs::create_directories(dir_, ec);
  const fs::path lock_path = dir_ / (layer.key + ".lock");
  unique_fd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!lock)
    return fail(fmt::format("cannot open {}: {}", lock_path.string(), std::generic_category().message(errno)));
  auto cancelled = [&] {
    return fail(errc::closed, fmt::format("environment {}: setup cancelled", layer.key.substr(0, 12)));
  };
  // Polled, so that a cancel is noticed while another build of the key holds the lock.
  while (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EINTR && errno != EWOULDBLOCK)
      return fail(fmt::format("cannot lock {}: {}", lock_path.string(), std::generic_category().message(errno)));
    if (cancel && cancel->cancelled())
      return cancelled();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (find(layer.key)) {
    layer.cached = true;
    return layer;
  }
  // A copy a process that died left (holding the lock, nobody else writes them).
  for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().filename().string().rfind("." + layer.key + ".partial-", 0) == 0) {
      std::error_code rm;
      fs::remove_all(it->path(), rm);
    }
  }
  ec.clear();

  static std::atomic<uint64_t> builds{0};
  sandbox_spec spec;
  spec.id = !sandbox_id.empty()
              ? sandbox_id
              : fmt::format("setup-{}-{}-{:06}", layer.key.substr(0, 12), ::getpid(), builds.fetch_add(1) % 1000000);
  spec.env = env.env;
  setup_observer obs(output, egress);
  const auto t0 = steady::now();
  if (cancel && cancel->cancelled())
    return cancelled();
  auto box = runtime.start(spec, obs);
  if (!box)
    return fail(fmt::format("environment {}: cannot start its setup sandbox: {}", layer.key.substr(0, 12),
                            box.error().message));
  // From here a cancel kills the sandbox (the command then ends killed, or never starts).
  if (cancel && !cancel->watch(box->get())) {
    (*box)->kill();
    (*box)->wait();
    return cancelled();
  }
  struct unwatch {
    setup_cancel* c;
    ~unwatch() {
      if (c)
        c->watch(nullptr);
    }
  } unwatch_at_end{cancel};
  command_spec setup;
  setup.command_id = setup_command;
  setup.shell = env.setup_script;
  setup.timeout = env.setup_timeout;
  setup.output_limit_bytes = 0;  // all of it goes to `output`
  if (auto r = (*box)->run(setup); !r)
    return fail(fmt::format("environment {}: {}", layer.key.substr(0, 12), r.error().message));
  obs.wait();
  layer.setup_time = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0);

  const auto exit = obs.exit();
  std::optional<std::string> why;
  if (!exit) {
    why = "did not run: " + obs.failure().value_or("unknown");
  } else if (exit->reason == exit_reason::timeout) {
    why = fmt::format("timed out after {} s", env.setup_timeout.count() / 1000.0);
  } else if (exit->reason != exit_reason::exited) {
    why = fmt::format("was killed by signal {}", exit->signal);
  } else if (exit->exit_code != 0) {
    why = fmt::format("exited {}", exit->exit_code);
  }
  if (why || (cancel && cancel->cancelled())) {
    (*box)->kill();
    (*box)->wait();
    if (cancel && cancel->cancelled())
      return cancelled();
    return fail(fmt::format("environment {}: the setup script {}{}", layer.key.substr(0, 12), *why,
                            with_tail(obs.tail())));
  }
  auto saved = (*box)->save_root_layer(layer.path);
  (void)(*box)->release();
  (*box)->wait();
  if (!saved)
    return fail(fmt::format("environment {}: {}", layer.key.substr(0, 12), saved.error().message));
  return layer;
}

}  // namespace ferry::sandbox
