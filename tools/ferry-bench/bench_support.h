#pragma once
// ferry-bench's shared pieces: what one measurement produced, how long phases run, latency
// summaries, benchmark events of a fixed size, and the counters a phase samples (fsyncs, CPU).
//
// Threading: free functions are thread-safe; `event_factory` and `phase_probe` are value types
// used by one thread at a time.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::bench {

using bench_clock = std::chrono::steady_clock;

/// How long each timed phase runs.
struct phase_timing {
  /// Run but not counted: lets the WAL, memtable and threads reach a steady state.
  std::chrono::duration<double> warmup{0.5};
  /// The measured window.
  std::chrono::duration<double> measure{3.0};
};

/// Percentiles of a set of latencies, in microseconds.
struct latency_summary {
  uint64_t count = 0;
  double mean_us = 0;
  double p50_us = 0;
  double p99_us = 0;
  double p999_us = 0;
  double max_us = 0;
};

/// Summarises latencies given in nanoseconds (reorders `samples_ns`).
latency_summary summarize(std::vector<int64_t>& samples_ns);

/// What one throughput phase measured inside its window.
struct throughput {
  uint64_t events = 0;
  double seconds = 0;
  /// fsync + fdatasync calls of the whole process during the window (see fsync_counter.h);
  /// nullopt when the counter is not hooked in.
  std::optional<uint64_t> syncs;
  /// User + system CPU of the whole process during the window.
  double cpu_seconds = 0;
  /// Per-append round trip (closed loops only).
  std::optional<latency_summary> latency;
  /// Set when the phase failed; the figures are then meaningless.
  std::string error;

  /// A phase that failed with `message`.
  static throughput failure(std::string message) {
    throughput t;
    t.error = std::move(message);
    return t;
  }

  double events_per_second() const { return seconds > 0 ? events / seconds : 0; }
  std::optional<double> events_per_sync() const {
    if (!syncs || *syncs == 0)
      return std::nullopt;
    return static_cast<double>(events) / static_cast<double>(*syncs);
  }
  double cpu_us_per_event() const { return events ? cpu_seconds * 1e6 / events : 0; }
};

/// A snapshot of the process counters a phase reports on; `since` turns two into a throughput.
struct phase_probe {
  bench_clock::time_point at;
  uint64_t events = 0;
  uint64_t syncs = 0;
  double cpu_seconds = 0;

  static phase_probe take(uint64_t events_so_far);
  throughput since(const phase_probe& start) const;
};

/// Runs `threads` threads, each calling `step(thread_index)` in a closed loop (one operation per
/// call; it returns an error message, or "" on success) for timing.warmup + timing.measure, and
/// reports the operations completed in the measured window with their latencies. The first
/// error stops the phase and is returned in throughput::error.
throughput run_closed_loop_threads(int threads, const phase_timing& timing,
                                   const std::function<std::string(int)>& step);

/// Sleeps for `d` or until `stop()` holds (checked every few milliseconds).
void sleep_unless(std::chrono::duration<double> d, const std::function<bool()>& stop);

/// Process CPU time (user + system, all threads) in seconds.
double process_cpu_seconds();

/// Builds the benchmark's events: output_chunk envelopes for one stream, all of one size, each
/// with its own event id (unique within the stream) and its own pseudo-random payload (so that
/// RocksDB's block compression sees no more redundancy than real command output has). The
/// envelope is built once; each event is a copy with the id and payload rewritten in place,
/// so making one costs about a memcpy (cheap enough for the journal's commit thread).
class event_factory {
 public:
  /// Aims for envelopes of exactly `target_bytes` (FlatBuffers alignment may leave them up to
  /// 3 bytes short; a target below the fixed part gives the smallest envelope); see size().
  /// Streams whose names have the same length get envelopes of the same size.
  event_factory(std::string stream, size_t target_bytes);

  /// Event number `n` of the stream (its id is derived from n: distinct n, distinct ids).
  std::string make(uint64_t n) const;

  const std::string& stream() const { return stream_; }
  /// The size of every envelope this factory makes.
  size_t size() const { return template_.size(); }

 private:
  std::string stream_;
  std::string template_;
  size_t id_offset_ = 0;
  size_t payload_offset_ = 0;
  size_t payload_size_ = 0;
  uint64_t seed_ = 0;
};

/// Fills `out` with `n` pseudo-random printable bytes derived from `seed` (benchmark values).
void fill_payload(char* out, size_t n, uint64_t seed);

/// A directory made with mkdtemp and removed, with everything in it, on destruction.
class temp_dir {
 public:
  /// Creates `<parent>/<prefix>XXXXXX`; check ok().
  temp_dir(const std::filesystem::path& parent, std::string_view prefix);
  ~temp_dir();
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  bool ok() const { return !path_.empty(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// The file system type of `dir` ("ext4", "tmpfs", … or the hex magic).
std::string filesystem_type(const std::filesystem::path& dir);

/// Progress line on stderr ("ferry-bench: …").
void progress(const std::string& line);

}  // namespace ferry::bench
