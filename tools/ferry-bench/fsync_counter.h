#pragma once
// Counts the process's fsync and fdatasync calls, so a phase can report how many events shared
// one WAL sync (group commit) without any hook in the journal or in RocksDB.
//
// How: fsync_counter.cpp defines fsync() and fdatasync() in the ferry-bench executable. The
// dynamic linker resolves librocksdb's calls to the executable's definitions (the executable
// comes first in symbol lookup), which count and forward to libc's through dlsym(RTLD_NEXT).
// The count covers every sync of the process: WAL syncs, and also the few of flushes,
// compactions and MANIFEST writes, so events per sync is a slight underestimate.
//
// Threading: thread-safe.

#include <cstdint>

namespace ferry::bench {

/// fsync + fdatasync calls made by the process so far.
uint64_t sync_calls();

}  // namespace ferry::bench
