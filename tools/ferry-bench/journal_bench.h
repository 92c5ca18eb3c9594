#pragma once
// The Ferry side of `ferry-bench store`: each function opens a fresh journal (open_journal) in
// `dir`, drives it through the public event_store interface only, closes it and reports.
//
// Threading: each function runs one phase to completion on the calling thread (plus the threads
// it starts); call them one at a time.

#include <cstdint>
#include <filesystem>
#include <string>

#include "bench_support.h"
#include "ferry/storage/journal.h"

namespace ferry::bench {

/// `streams` writers, each on its own stream with exactly one single-event append in flight
/// (exact expected version), driven by append_async: each acknowledgement issues that stream's
/// next append from the callback (like an actor that persists, then waits). The headline figure.
throughput journal_closed_loop_async(const std::filesystem::path& dir,
                                     storage::durability durability, int streams,
                                     size_t event_bytes, const phase_timing& timing);

/// The same closed loop with one thread per stream calling the blocking append().
throughput journal_closed_loop_threads(const std::filesystem::path& dir, int streams,
                                       size_t event_bytes, const phase_timing& timing);

/// Open loop: single-event appends at a fixed `rate` (events/s), round-robin over `streams`
/// streams, each sent at its scheduled time (absolute deadlines) by one driver thread with
/// append_async, whether earlier ones were acknowledged or not. Latency runs from the scheduled
/// send time to the acknowledgement, so it includes any queueing and any lag of the driver.
struct open_loop_result {
  double offered_rate = 0;
  /// Acknowledged events per second in the measured window.
  double achieved_rate = 0;
  latency_summary latency;
  /// Sync and CPU figures of the measured window.
  throughput window;
  /// The furthest the driver fell behind its schedule when sending (its own lag).
  double max_send_lag_us = 0;
  std::string error;
};
open_loop_result journal_open_loop(const std::filesystem::path& dir, double rate, int streams,
                                   size_t event_bytes, const phase_timing& timing);

/// Replay of one long stream of `events` events (written first in pipelined batches, then
/// flushed so reads come from SST files): for_each over the whole stream, read_stream in batches
/// of `read_batch`, and the global log with read_all in batches of `read_batch`. Each read is
/// timed over one full pass, after one untimed for_each pass that warms the caches.
struct replay_result {
  uint64_t events = 0;
  throughput fill;
  throughput for_each;
  throughput read_stream;
  throughput read_all;
  std::string error;
};
replay_result journal_replay(const std::filesystem::path& dir, uint64_t events,
                             uint64_t read_batch, size_t event_bytes);

}  // namespace ferry::bench
