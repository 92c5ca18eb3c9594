#pragma once
// The baseline of `ferry-bench store`: plain RocksDB, default options, in its own directory,
// doing what the journal does at minimum per event (one Put of a value as large as the
// envelope), with nothing of the journal's bookkeeping (no version check, no index, no hash
// chain, no verification).
//
// Threading: each function runs one phase to completion on the calling thread (plus the threads
// it starts); call them one at a time.

#include <cstdint>
#include <filesystem>
#include <string>

#include "bench_support.h"

namespace ferry::bench {

/// `threads` threads, each writing in a closed loop one WriteBatch holding one Put of a
/// `value_bytes` value under its own keys, with WriteOptions::sync = `sync` (RocksDB's own
/// group commit joins concurrent synced writes into one WAL fsync).
throughput rocks_write_loop(const std::filesystem::path& dir, int threads, bool sync,
                            size_t value_bytes, const phase_timing& timing);

/// A raw iterator scan over `values` values of `value_bytes` bytes (written unsynced in batches,
/// then flushed so they are read from SST files), timed over one full pass after an untimed one.
struct scan_result {
  throughput fill;
  throughput scan;
  std::string error;
};
scan_result rocks_scan(const std::filesystem::path& dir, uint64_t values, size_t value_bytes);

/// "major.minor.patch" of the linked RocksDB.
std::string rocksdb_version();

}  // namespace ferry::bench
