// ferry-bench abort (see abort_bench.h).
//
// Each round starts `sleep 600` in a fresh sandbox, waits until it runs, takes a pidfd of every
// host process of that sandbox (Sentry, gofer, …: found by the sandbox id in /proc/*/cmdline),
// then times until all of them have exited:
//   ferry    task_service::abort_async — the manager, the task actor (kill at high priority
//            first, then the record), the sandbox actor, the runtime's kill;
//   baseline sandbox::kill() on a sandbox started directly from the runtime.

#include "abort_bench.h"

#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <caf/all.hpp>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <thread>

#include "bench_support.h"
#include "ferry/actors/tasks.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/storage/journal.h"

namespace ferry::bench {

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

/// pidfds of every process whose command line names `needle`.
std::vector<int> pidfds_of(const std::string& needle) {
  std::vector<int> fds;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const auto name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    std::ifstream in(e.path() / "cmdline", std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (cmd.find(needle) == std::string::npos || cmd.find("delete") != std::string::npos)
      continue;
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, std::stoi(name), 0));
    if (fd >= 0)
      fds.push_back(fd);
  }
  return fds;
}

/// Waits until every pidfd reports its process gone; closes them. False on timeout.
bool wait_gone(std::vector<int>& fds, std::chrono::milliseconds limit) {
  const auto deadline = bench_clock::now() + limit;
  for (int fd : fds) {
    for (;;) {
      pollfd p{fd, POLLIN, 0};
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - bench_clock::now());
      if (left.count() <= 0) {
        for (int f : fds)
          ::close(f);
        fds.clear();
        return false;
      }
      if (::poll(&p, 1, static_cast<int>(left.count())) > 0)
        break;
    }
  }
  for (int f : fds)
    ::close(f);
  fds.clear();
  return true;
}

/// Waits until `needle`'s processes appear (the sandbox is up).
std::vector<int> wait_processes(const std::string& needle, std::chrono::milliseconds limit) {
  const auto deadline = bench_clock::now() + limit;
  while (bench_clock::now() < deadline) {
    auto fds = pidfds_of(needle);
    if (fds.size() >= 2)  // Sentry and gofer at least
      return fds;
    for (int f : fds)
      ::close(f);
    std::this_thread::sleep_for(5ms);
  }
  return {};
}

class quiet_observer final : public sandbox::sandbox_observer {
 public:
  void on_running() override {
    std::lock_guard<std::mutex> g(mu_);
    running_ = true;
  }
  void on_command_started(uint32_t, const std::vector<std::string>&) override {}
  void on_output(uint32_t, int, std::string_view) override {}
  void on_command_exited(uint32_t, int, int, uint64_t) override {}
  void on_ended(std::optional<std::string>) override {}
  bool running() {
    std::lock_guard<std::mutex> g(mu_);
    return running_;
  }

 private:
  std::mutex mu_;
  bool running_ = false;
};

void print_row(const char* name, latency_summary s) {
  std::printf("  %-34s %6llu %10.2f %10.2f %10.2f\n", name, static_cast<unsigned long long>(s.count),
              s.p50_us / 1000, s.p99_us / 1000, s.max_us / 1000);
}

}  // namespace

int run_abort_bench(const abort_options& o) {
  if (::geteuid() != 0 || std::system("runsc --version >/dev/null 2>&1") != 0) {
    std::fprintf(stderr, "ferry-bench abort: needs root and runsc\n");
    return 2;
  }
  temp_dir tmp(o.dir, "ferry-bench-abort-");
  if (!tmp.ok()) {
    std::fprintf(stderr, "ferry-bench abort: no temporary directory under %s\n",
                 o.dir.c_str());
    return 2;
  }
  const fs::path root = tmp.path();

  storage::journal_options jo;
  jo.dir = root / "journal";
  auto store = storage::open_journal(jo);
  if (!store) {
    std::fprintf(stderr, "ferry-bench abort: %s\n", store.error().message.c_str());
    return 1;
  }
  sandbox::runsc_options ro;
  ro.state_dir = root / "runsc";
  ro.sandboxes_dir = root / "sandboxes";
  ro.init_binary = o.init_binary;
  auto runtime = sandbox::make_runsc_runtime(ro);
  if (!runtime) {
    std::fprintf(stderr, "ferry-bench abort: %s\n", runtime.error().message.c_str());
    return 1;
  }

  std::vector<int64_t> ferry_ns, base_ns;
  int failures = 0;
  {
    caf::actor_system_config cfg;
    actors::add_message_types(cfg);
    caf::actor_system sys{cfg};
    actors::task_deps deps;
    deps.store = store->get();
    deps.runtime = runtime->get();
    auto tasks = actors::start_task_manager(sys, deps);
    if (!tasks) {
      std::fprintf(stderr, "ferry-bench abort: %s\n", tasks.error().message.c_str());
      return 1;
    }
    std::fprintf(stderr, "ferry-bench abort: %d rounds each…\n", o.rounds);
    for (int i = 0; i < o.rounds; ++i) {
      // Through Ferry.
      auto sub = (*tasks)->submit({"sleep 600", "", "bench", "bench"});
      if (!sub) {
        std::fprintf(stderr, "ferry-bench abort: submit: %s\n", sub.error().message.c_str());
        return 1;
      }
      auto fds = wait_processes("ferry-" + sub->id + "-1", 30s);
      // Give ferry-init time to start the command (the task is then `executing`).
      std::this_thread::sleep_for(200ms);
      const auto t0 = bench_clock::now();
      (*tasks)->abort_async(sub->id, "bench", "bench", 10s, [](result<actors::abort_outcome>) {});
      if (fds.empty() || !wait_gone(fds, 10s))
        ++failures;
      else
        ferry_ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(bench_clock::now() - t0).count());

      // The runtime alone.
      quiet_observer obs;
      sandbox::sandbox_spec spec;
      spec.id = "base-" + std::to_string(i);
      spec.argv = {"/bin/sh", "-c", "sleep 600"};
      auto box = (*runtime)->start(spec, obs);
      if (!box) {
        std::fprintf(stderr, "ferry-bench abort: %s\n", box.error().message.c_str());
        return 1;
      }
      auto bfds = wait_processes(spec.id, 30s);
      std::this_thread::sleep_for(200ms);
      const auto b0 = bench_clock::now();
      std::thread killer([&] { (*box)->kill(); });
      if (bfds.empty() || !wait_gone(bfds, 10s))
        ++failures;
      else
        base_ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(bench_clock::now() - b0).count());
      killer.join();
      box->reset();
    }
    (void)(*tasks)->shutdown(30s);
  }
  auto f = summarize(ferry_ns);
  auto b = summarize(base_ns);
  std::printf("\nferry-bench abort — request → last host process of the sandbox gone (ms)\n");
  std::printf("  %-34s %6s %10s %10s %10s\n", "", "n", "p50", "p99", "max");
  print_row("ferry: abort through the actors", f);
  print_row("baseline: runtime kill() alone", b);
  if (b.p50_us > 0 && b.p99_us > 0)
    std::printf("  ratio ferry/baseline: p50 %.2f, p99 %.2f\n", f.p50_us / b.p50_us,
                f.p99_us / b.p99_us);
  const bool met = f.count > 0 && f.p99_us <= 20000;
  std::printf("  target p99 <= 20 ms: %s%s\n", met ? "met" : "MISSED",
              failures ? " (some rounds failed)" : "");
  if (failures)
    std::fprintf(stderr, "ferry-bench abort: %d round(s) did not end within 10 s\n", failures);
  return failures > 0 || (o.check && !met) ? 1 : 0;
}

}  // namespace ferry::bench
