// ferry-bench — Ferry's benchmark program. `ferry-bench store` measures the event journal
// (durable append throughput and latency, replay) and, in the same run, plain RocksDB doing the
// minimum the journal must do, and prints each figure next to its baseline, the ratio and the
// target. See README.md for how to read the output.

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_support.h"
#include "abort_bench.h"
#include "events_bench.h"
#include "journal_bench.h"
#include "rocks_baseline.h"
#include "sandbox_bench.h"

namespace fs = std::filesystem;
using namespace ferry::bench;

namespace {

/// One row of the result table.
struct figure {
  enum class goal { none, at_least, at_most };

  std::string name;
  std::string unit;
  std::optional<double> ferry;
  std::optional<double> baseline;
  /// What the baseline value is ("RocksDB synced, 64 threads").
  std::string baseline_name;
  goal target_goal = goal::none;
  double target = 0;
  /// Why the Ferry value is missing.
  std::string error;

  std::optional<double> ratio() const {
    if (!ferry || !baseline || *baseline == 0)
      return std::nullopt;
    return *ferry / *baseline;
  }
  /// nullopt when the figure has no target.
  std::optional<bool> pass() const {
    if (target_goal == goal::none)
      return std::nullopt;
    if (!ferry)
      return false;
    return target_goal == goal::at_least ? *ferry >= target : *ferry <= target;
  }
};

/// One measured phase, for the details section and the JSON output.
struct phase_record {
  std::string name;
  throughput t;
  /// Whether every event waited for an fsync (else events per fsync means nothing).
  bool durable = true;
};

struct options {
  fs::path dir;
  uint64_t events = 1'000'000;
  double seconds = 3.0;
  double warmup = -1;  // < 0: derived from seconds
  double rate = 10'000;
  int open_loop_streams = 16;
  uint64_t read_batch = 1000;
  size_t event_bytes = 256;
  bool json = false;
  bool check = false;
  /// Figure groups to run (durable, unsynced, latency, replay); empty: all.
  std::vector<std::string> only;

  bool runs(const std::string& group) const {
    return only.empty() || std::find(only.begin(), only.end(), group) != only.end();
  }
};

std::string format_value(std::optional<double> v, const std::string& unit) {
  if (!v)
    return "-";
  char buf[64];
  if (unit == "ms")
    std::snprintf(buf, sizeof buf, "%.3f", *v);
  else
    std::snprintf(buf, sizeof buf, "%.0f", *v);
  return buf;
}

std::string format_target(const figure& f) {
  if (f.target_goal == figure::goal::none)
    return "";
  char buf[64];
  const char* op = f.target_goal == figure::goal::at_least ? ">=" : "<=";
  if (f.unit == "ms")
    std::snprintf(buf, sizeof buf, "%s %g ms", op, f.target);
  else
    std::snprintf(buf, sizeof buf, "%s %.0f", op, f.target);
  return buf;
}

std::string format_opt(std::optional<double> v, const char* fmt) {
  if (!v)
    return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, *v);
  return buf;
}

nlohmann::json to_json(const latency_summary& l) {
  return {{"count", l.count}, {"mean_us", l.mean_us}, {"p50_us", l.p50_us},
          {"p99_us", l.p99_us}, {"p999_us", l.p999_us}, {"max_us", l.max_us}};
}

nlohmann::json to_json(const phase_record& p) {
  nlohmann::json j = {{"name", p.name},
                      {"events", p.t.events},
                      {"seconds", p.t.seconds},
                      {"events_per_second", p.t.events_per_second()},
                      {"cpu_us_per_event", p.t.cpu_us_per_event()}};
  if (p.t.syncs)
    j["syncs"] = *p.t.syncs;
  if (auto e = p.t.events_per_sync(); e && p.durable)
    j["events_per_sync"] = *e;
  if (p.t.latency && p.t.latency->count)
    j["latency"] = to_json(*p.t.latency);
  if (!p.t.error.empty())
    j["error"] = p.t.error;
  return j;
}

class bench_run {
 public:
  explicit bench_run(options o) : opt_(std::move(o)) {}

  /// Runs every phase; returns the process exit code.
  int run() {
    temp_dir root(opt_.dir, "ferry-bench-");
    if (!root.ok()) {
      std::fprintf(stderr, "ferry-bench: cannot create a temporary directory in %s\n",
                   opt_.dir.c_str());
      return 2;
    }
    root_ = root.path();
    fs_type_ = filesystem_type(root_);
    if (fs_type_ == "tmpfs")
      progress("WARNING: " + root_.string() +
               " is on tmpfs, where fsync does nothing: durable figures are meaningless "
               "(use --dir on a disk)");
    // Every benchmark stream name has this length (see journal_bench.cpp).
    event_bytes_ = event_factory("task-a-0000", opt_.event_bytes).size();
    if (event_bytes_ > opt_.event_bytes)
      progress("note: the smallest benchmark envelope is " + std::to_string(event_bytes_) +
               " bytes, more than the " + std::to_string(opt_.event_bytes) + " asked for");
    double warm = opt_.warmup >= 0 ? opt_.warmup : std::min(0.5, opt_.seconds / 5);
    timing_.warmup = std::chrono::duration<double>(warm);
    timing_.measure = std::chrono::duration<double>(opt_.seconds);
    progress("temporary data in " + root_.string() + " (" + fs_type_ + "), events of " +
             std::to_string(event_bytes_) + " bytes");

    if (opt_.runs("durable"))
      measure_durable();
    if (opt_.runs("unsynced"))
      measure_unsynced();
    if (opt_.runs("latency"))
      measure_latency();
    if (opt_.runs("replay"))
      measure_replay();

    bool all_pass = true;
    bool any_error = false;
    for (const auto& f : figures_) {
      if (auto p = f.pass(); p && !*p)
        all_pass = false;
      if (!f.error.empty())
        any_error = true;
    }
    for (const auto& p : phases_)
      if (!p.t.error.empty())
        any_error = true;
    if (opt_.json)
      print_json(all_pass);
    else
      print_table();
    if (any_error)
      return 1;
    return opt_.check && !all_pass ? 1 : 0;
  }

 private:
  /// A fresh directory for one phase, removed when the phase is done.
  fs::path phase_dir(const std::string& name) { return root_ / name; }

  /// Logs and keeps a phase's outcome; returns a copy (phases_ grows, references would dangle).
  throughput record(std::string name, throughput t, bool durable = true) {
    std::string line = name + ": ";
    if (!t.error.empty()) {
      line += "ERROR " + t.error;
    } else {
      line += format_opt(t.events_per_second(), "%.0f") + " events/s";
      if (auto e = t.events_per_sync(); e && durable)
        line += ", " + format_opt(*e, "%.1f") + " events/fsync";
      line += ", " + format_opt(t.cpu_us_per_event(), "%.1f") + " CPU µs/event";
    }
    progress(line);
    phases_.push_back({std::move(name), t, durable});
    return t;
  }

  template <class Run>
  throughput phase(const std::string& name, const std::string& dir, bool durable, Run&& run) {
    progress("running " + name + " ...");
    auto path = phase_dir(dir);
    throughput t = run(path);
    std::error_code ec;
    fs::remove_all(path, ec);
    return record(name, std::move(t), durable);
  }

  static std::string streams_label(int n, const char* what) {
    return std::to_string(n) + " " + what + (n == 1 ? "" : "s");
  }

  void add_throughput_figure(std::string name, const throughput& ferry,
                             const throughput& baseline, std::string baseline_name,
                             figure::goal goal = figure::goal::none, double target = 0) {
    figure f;
    f.name = std::move(name);
    f.unit = "events/s";
    if (ferry.error.empty())
      f.ferry = ferry.events_per_second();
    else
      f.error = ferry.error;
    if (baseline.error.empty())
      f.baseline = baseline.events_per_second();
    f.baseline_name = std::move(baseline_name);
    f.target_goal = goal;
    f.target = target;
    figures_.push_back(std::move(f));
  }

  void measure_durable() {
    using ferry::storage::durability;
    for (int n : {1, 16, 64}) {
      const auto label = streams_label(n, "stream");
      throughput async = phase("ferry durable, " + label + ", async closed loop",
                               "ferry-async-" + std::to_string(n), true, [&](const fs::path& d) {
                                 return journal_closed_loop_async(d, durability::fsync, n,
                                                                  event_bytes_, timing_);
                               });
      throughput threads = phase("ferry durable, " + label + ", thread per stream",
                                 "ferry-threads-" + std::to_string(n), true,
                                 [&](const fs::path& d) {
                                   return journal_closed_loop_threads(d, n, event_bytes_,
                                                                      timing_);
                                 });
      const auto base_name = "RocksDB synced, " + streams_label(n, "thread");
      throughput base = phase(base_name, "rocks-sync-" + std::to_string(n), true,
                              [&](const fs::path& d) {
                                return rocks_write_loop(d, n, true, event_bytes_, timing_);
                              });
      if (n == 1)
        synced_one_thread_ = base;
      add_throughput_figure("durable appends/s, " + label + ", async", async, base, base_name,
                            n == 64 ? figure::goal::at_least : figure::goal::none, 100'000);
      if (n == 64)
        add_throughput_figure("durable appends/s, 64 streams, async (vs 1 writer)", async,
                              synced_one_thread_, "RocksDB synced, 1 thread");
      add_throughput_figure("durable appends/s, " + label + ", threads", threads, base,
                            base_name);
    }
  }

  void measure_unsynced() {
    using ferry::storage::durability;
    for (int n : {1, 64}) {
      const auto label = streams_label(n, "stream");
      throughput ferry = phase("ferry periodic, " + label + ", async closed loop",
                               "ferry-periodic-" + std::to_string(n), false,
                               [&](const fs::path& d) {
                                 return journal_closed_loop_async(d, durability::periodic, n,
                                                                  event_bytes_, timing_);
                               });
      const auto base_name = "RocksDB unsynced, " + streams_label(n, "thread");
      throughput base = phase(base_name, "rocks-nosync-" + std::to_string(n), false,
                              [&](const fs::path& d) {
                                return rocks_write_loop(d, n, false, event_bytes_, timing_);
                              });
      add_throughput_figure("periodic-sync appends/s, " + label + ", async", ferry, base,
                            base_name);
    }
  }

  void measure_latency() {
    char name[96];
    std::snprintf(name, sizeof name, "ferry durable, open loop %.0f events/s over %d streams",
                  opt_.rate, opt_.open_loop_streams);
    progress(std::string("running ") + name + " ...");
    auto dir = phase_dir("ferry-open-loop");
    open_loop_ = journal_open_loop(dir, opt_.rate, opt_.open_loop_streams, event_bytes_, timing_);
    std::error_code ec;
    fs::remove_all(dir, ec);
    throughput t = open_loop_.window;
    t.error = open_loop_.error;
    t.latency = open_loop_.latency;
    record(name, t);
    if (open_loop_.error.empty()) {
      char line[200];
      std::snprintf(line, sizeof line,
                    "  achieved %.0f events/s; latency p50 %.0f µs, p99 %.0f µs, p999 %.0f µs, "
                    "max %.0f µs; driver lag max %.0f µs",
                    open_loop_.achieved_rate, open_loop_.latency.p50_us,
                    open_loop_.latency.p99_us, open_loop_.latency.p999_us,
                    open_loop_.latency.max_us, open_loop_.max_send_lag_us);
      progress(line);
    }
    char rate[32];
    std::snprintf(rate, sizeof rate, "%gk/s", opt_.rate / 1000);
    auto add = [&](const char* which, double us, bool with_target) {
      figure f;
      f.name = std::string("append latency ") + which + " at " + rate;
      f.unit = "ms";
      if (open_loop_.error.empty())
        f.ferry = us / 1000;
      else
        f.error = open_loop_.error;
      if (with_target) {
        f.target_goal = figure::goal::at_most;
        f.target = 2;
      }
      figures_.push_back(std::move(f));
    };
    add("p50", open_loop_.latency.p50_us, false);
    add("p99", open_loop_.latency.p99_us, true);
    add("p999", open_loop_.latency.p999_us, false);
    add("max", open_loop_.latency.max_us, false);
  }

  void measure_replay() {
    const auto n = std::to_string(opt_.events);
    progress("running ferry replay of one stream of " + n + " events (fill, then read) ...");
    auto dir = phase_dir("ferry-replay");
    replay_result replay = journal_replay(dir, opt_.events, opt_.read_batch, event_bytes_);
    std::error_code ec;
    fs::remove_all(dir, ec);
    auto with_error = [&](throughput t) {
      if (t.error.empty())
        t.error = replay.error;
      return t;
    };
    record("ferry replay fill (batches of 256, fsync)", with_error(replay.fill));
    const throughput for_each =
      record("ferry replay for_each", with_error(replay.for_each), false);
    const auto batch = std::to_string(opt_.read_batch);
    const throughput by_stream =
      record("ferry replay read_stream, batches of " + batch, with_error(replay.read_stream),
             false);
    const throughput by_all =
      record("ferry replay read_all, batches of " + batch, with_error(replay.read_all), false);

    progress("running RocksDB iterator scan of " + n + " values ...");
    dir = phase_dir("rocks-scan");
    scan_result scan = rocks_scan(dir, opt_.events, event_bytes_);
    fs::remove_all(dir, ec);
    auto base_error = [&](throughput t) {
      if (t.error.empty())
        t.error = scan.error;
      return t;
    };
    record("RocksDB fill (unsynced batches of 1000)", base_error(scan.fill), false);
    const throughput base = record("RocksDB iterator scan", base_error(scan.scan), false);

    const auto base_name = "RocksDB iterator scan";
    add_throughput_figure("replay events/s, for_each", for_each, base, base_name,
                          figure::goal::at_least, 1'000'000);
    add_throughput_figure("replay events/s, read_stream (batch " + batch + ")", by_stream, base,
                          base_name);
    add_throughput_figure("replay events/s, read_all (batch " + batch + ")", by_all, base,
                          base_name);
  }

  void print_table() const {
    std::printf("ferry-bench store: events of %zu bytes (output_chunk envelope, measured), "
                "%g s per figure after %g s warm-up, replay of %llu events\n",
                event_bytes_, timing_.measure.count(), timing_.warmup.count(),
                static_cast<unsigned long long>(opt_.events));
    std::printf("data: %s (%s); RocksDB %s (baseline: default options); %u CPUs\n\n",
                root_.c_str(), fs_type_.c_str(), rocksdb_version().c_str(),
                std::thread::hardware_concurrency());
    std::printf("%-50s %10s %10s %7s  %-12s %-6s  %s\n", "figure", "ferry", "baseline", "ratio",
                "target", "result", "baseline is");
    for (const auto& f : figures_) {
      std::string unit_name = f.name + (f.unit == "ms" ? " (ms)" : "");
      auto pass = f.pass();
      std::printf("%-50s %10s %10s %7s  %-12s %-6s  %s\n", unit_name.c_str(),
                  f.error.empty() ? format_value(f.ferry, f.unit).c_str() : "ERROR",
                  format_value(f.baseline, f.unit).c_str(),
                  format_opt(f.ratio(), "%.2f").c_str(), format_target(f).c_str(),
                  pass ? (*pass ? "PASS" : "FAIL") : "", f.baseline_name.c_str());
    }
    std::printf("\nphases (measured window; fsyncs counted process-wide, CPU of all threads):\n");
    std::printf("%-56s %10s %8s %8s %9s %8s %8s %8s\n", "phase", "events/s", "fsyncs/s",
                "ev/fsync", "CPU µs/ev", "p50 µs", "p99 µs", "max µs");
    for (const auto& p : phases_) {
      if (!p.t.error.empty()) {
        std::printf("%-56s ERROR %s\n", p.name.c_str(), p.t.error.c_str());
        continue;
      }
      bool lat = p.t.latency && p.t.latency->count;
      std::optional<double> syncs_per_second;
      if (p.t.syncs && p.t.seconds > 0)
        syncs_per_second = static_cast<double>(*p.t.syncs) / p.t.seconds;
      auto per_sync = p.durable ? p.t.events_per_sync() : std::nullopt;
      std::printf("%-56s %10.0f %8s %8s %9.1f %8s %8s %8s\n", p.name.c_str(),
                  p.t.events_per_second(), format_opt(syncs_per_second, "%.0f").c_str(),
                  format_opt(per_sync, "%.1f").c_str(), p.t.cpu_us_per_event(),
                  lat ? format_opt(p.t.latency->p50_us, "%.0f").c_str() : "-",
                  lat ? format_opt(p.t.latency->p99_us, "%.0f").c_str() : "-",
                  lat ? format_opt(p.t.latency->max_us, "%.0f").c_str() : "-");
    }
    if (opt_.runs("latency") && open_loop_.error.empty())
      std::printf("\nopen loop: offered %.0f events/s, achieved %.0f events/s, driver lag max "
                  "%.0f µs\n",
                  open_loop_.offered_rate, open_loop_.achieved_rate, open_loop_.max_send_lag_us);
    for (const auto& f : figures_)
      if (!f.error.empty())
        std::printf("error in \"%s\": %s\n", f.name.c_str(), f.error.c_str());
  }

  void print_json(bool all_pass) const {
    nlohmann::json figures = nlohmann::json::array();
    for (const auto& f : figures_) {
      nlohmann::json j = {{"name", f.name}, {"unit", f.unit}, {"baseline_is", f.baseline_name}};
      j["ferry"] = f.ferry ? nlohmann::json(*f.ferry) : nlohmann::json();
      j["baseline"] = f.baseline ? nlohmann::json(*f.baseline) : nlohmann::json();
      j["ratio"] = f.ratio() ? nlohmann::json(*f.ratio()) : nlohmann::json();
      if (f.target_goal != figure::goal::none) {
        j["target"] = format_target(f);
        j["pass"] = *f.pass();
      }
      if (!f.error.empty())
        j["error"] = f.error;
      figures.push_back(std::move(j));
    }
    nlohmann::json phases = nlohmann::json::array();
    for (const auto& p : phases_)
      phases.push_back(to_json(p));
    nlohmann::json out = {
      {"benchmark", "store"},
      {"event_bytes", event_bytes_},
      {"seconds", timing_.measure.count()},
      {"warmup_seconds", timing_.warmup.count()},
      {"replay_events", opt_.events},
      {"filesystem", fs_type_},
      {"rocksdb", rocksdb_version()},
      {"cpus", std::thread::hardware_concurrency()},
      {"figures", std::move(figures)},
      {"phases", std::move(phases)},
      {"all_pass", all_pass},
    };
    if (opt_.runs("latency"))
      out["open_loop"] = {{"offered_rate", open_loop_.offered_rate},
                          {"achieved_rate", open_loop_.achieved_rate},
                          {"max_send_lag_us", open_loop_.max_send_lag_us},
                          {"latency", to_json(open_loop_.latency)}};
    std::printf("%s\n", out.dump(2).c_str());
  }

  options opt_;
  phase_timing timing_;
  fs::path root_;
  std::string fs_type_;
  size_t event_bytes_ = 0;
  throughput synced_one_thread_;
  open_loop_result open_loop_;
  std::vector<figure> figures_;
  std::vector<phase_record> phases_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferry-bench — Ferry's benchmarks, each next to a plain RocksDB baseline"};
  app.require_subcommand(1);
  options opt;
  std::string dir;
  auto* store = app.add_subcommand(
    "store", "Event journal: durable appends (throughput, latency) and replay vs RocksDB");
  store->add_option("--dir", dir, "Where to make the temporary directories (default: $TMPDIR "
                                  "or /tmp); must be on the disk you want measured");
  store->add_option("--events", opt.events, "Events in the replay stream")
    ->capture_default_str()
    ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40));
  store->add_option("--seconds", opt.seconds, "Measured time of each timed figure")
    ->capture_default_str()
    ->check(CLI::Range(0.01, 3600.0));
  store->add_option("--warmup", opt.warmup,
                    "Unmeasured run-in before each timed figure (default: min(0.5, seconds/5))")
    ->check(CLI::Range(0.0, 600.0));
  store->add_option("--rate", opt.rate, "Offered rate of the latency figure, events/s")
    ->capture_default_str()
    ->check(CLI::Range(1.0, 10'000'000.0));
  store->add_option("--read-batch", opt.read_batch, "Batch size of read_stream and read_all")
    ->capture_default_str()
    ->check(CLI::Range(uint64_t{1}, uint64_t{1'000'000}));
  store->add_option("--event-bytes", opt.event_bytes, "Size of each event envelope")
    ->capture_default_str()
    ->check(CLI::Range(size_t{64}, size_t{1} << 20));
  store->add_flag("--json", opt.json, "Print the results as JSON instead of a table");
  store->add_flag("--check", opt.check, "Exit non-zero when a figure misses its target");
  store
    ->add_option("--only", opt.only,
                 "Run only these figure groups (repeatable; e.g. to profile one): durable, "
                 "unsynced, latency, replay")
    ->check(CLI::IsMember({"durable", "unsynced", "latency", "replay"}));
  ferry::bench::events_options eo;
  auto* events = app.add_subcommand(
    "events", "End-to-end event latency (actor → journal → relay → NATS → subscriber)");
  events->add_option("--dir", dir, "Where to make the temporary directory");
  events->add_option("--rate", eo.rates, "Offered rates, events/s (repeatable)")
    ->capture_default_str()
    ->check(CLI::Range(1.0, 1'000'000.0));
  events->add_option("--tasks", eo.tasks, "Concurrent task streams")
    ->capture_default_str()
    ->check(CLI::Range(1, 100000));
  events->add_option("--seconds", eo.seconds, "Measured time per rate")
    ->capture_default_str()
    ->check(CLI::Range(0.01, 3600.0));
  events->add_option("--nats-server", eo.nats_server, "nats-server binary")->capture_default_str();
  events->add_option("--duplicate-window", eo.duplicate_window_s,
                     "JetStream duplicate window of the relay's stream, seconds (default: the relay's, 120)")
    ->check(CLI::Range(1.0, 86400.0));
  events->add_flag("--check", eo.check, "Exit non-zero when a figure misses its target");
  ferry::bench::abort_options ao;
  auto* abort_cmd = app.add_subcommand(
    "abort", "Abort latency: request → last sandbox process gone (real gVisor; needs root)");
  abort_cmd->add_option("--dir", dir, "Where to make the temporary directory");
  abort_cmd->add_option("--rounds", ao.rounds, "Sandboxes aborted (and killed for the baseline)")
    ->capture_default_str()
    ->check(CLI::Range(1, 10000));
  abort_cmd->add_option("--init-binary", ao.init_binary, "ferry-init (default: next to ferry-bench)");
  abort_cmd->add_flag("--check", ao.check, "Exit non-zero when the p99 target is missed");
  ferry::bench::sandbox_bench_options so;
  auto* sandbox_cmd = app.add_subcommand(
    "sandbox", "Sandbox runtime: spawn-to-ready vs bare runsc/bwrap, exec round trip, kill, memory "
               "of idle sandboxes, warm-pool acquisition (real sandboxes; needs root)");
  sandbox_cmd->add_option("--dir", dir, "Where to make the temporary directory");
  sandbox_cmd->add_option("--backend", so.backend, "Which backends to measure")
    ->capture_default_str()
    ->check(CLI::IsMember({"runsc", "bwrap", "both"}));
  sandbox_cmd->add_option("--rounds", so.rounds, "Rounds of spawn-to-ready (Ferry and bare), exec and kill")
    ->capture_default_str()
    ->check(CLI::Range(1, 10000));
  sandbox_cmd->add_option("--execs", so.execs, "`true` round trips per round")
    ->capture_default_str()
    ->check(CLI::Range(0, 10000));
  sandbox_cmd->add_option("--count", so.count, "Idle sandboxes running at once for the memory figures")
    ->capture_default_str()
    ->check(CLI::Range(1, 2000));
  sandbox_cmd->add_option("--parallel", so.parallel, "Sandboxes starting at once while they are brought up")
    ->capture_default_str()
    ->check(CLI::Range(1, 256));
  sandbox_cmd->add_option("--pool-target", so.pool_target, "Warm pool: ready sandboxes kept")
    ->capture_default_str()
    ->check(CLI::Range(1, 64));
  sandbox_cmd->add_option("--acquires", so.acquires, "Warm pool: sandboxes acquired from it")
    ->capture_default_str()
    ->check(CLI::Range(1, 10000));
  sandbox_cmd->add_option("--init-binary", so.init_binary, "ferry-init (default: next to ferry-bench)");
  sandbox_cmd->add_flag("--check", so.check, "Exit non-zero when a figure misses its target");
  CLI11_PARSE(app, argc, argv);

  if (*sandbox_cmd) {
    std::error_code ec;
    so.dir = dir.empty() ? fs::temp_directory_path(ec) : fs::path(dir);
    if (so.dir.empty())
      so.dir = "/tmp";
    so.dir = fs::absolute(so.dir, ec);
    if (so.init_binary.empty())
      so.init_binary = (fs::read_symlink("/proc/self/exe", ec).parent_path() / "ferry-init").string();
    return ferry::bench::run_sandbox_bench(so);
  }

  if (*abort_cmd) {
    std::error_code ec;
    ao.dir = dir.empty() ? fs::temp_directory_path(ec) : fs::path(dir);
    if (ao.dir.empty())
      ao.dir = "/tmp";
    if (ao.init_binary.empty())
      ao.init_binary = (fs::read_symlink("/proc/self/exe", ec).parent_path() / "ferry-init").string();
    return ferry::bench::run_abort_bench(ao);
  }

  if (*events) {
    std::error_code ec;
    eo.dir = dir.empty() ? fs::temp_directory_path(ec) : fs::path(dir);
    if (eo.dir.empty())
      eo.dir = "/tmp";
    eo.warmup = std::min(0.5, eo.seconds / 5);
    return ferry::bench::run_events_bench(eo);
  }

  if (dir.empty()) {
    std::error_code ec;
    opt.dir = fs::temp_directory_path(ec);
    if (ec)
      opt.dir = "/tmp";
  } else {
    opt.dir = dir;
  }
  return bench_run(std::move(opt)).run();
}
