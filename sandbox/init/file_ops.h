#pragma once
// File operations for the agent's tools (FileRequest in schemas/init.fbs): read with line
// ranges, write, exact-string edit, list, glob, grep. Each request runs in a child of ferry-init
// started as `ferry-init --file-op` (run_file_op): it reads one FileRequest frame on stdin and
// writes one FileResponse or FileError frame on stdout, so a slow or stuck operation (a big grep,
// a FIFO, a network mount) never blocks the protocol loop, and a crash is one failed request.
//
// Threading: single-threaded (a process of its own).

#include <cstdint>
#include <string>

#include "ferry/schemas/init_generated.h"

namespace ferry_init {

/// Bounds of the file operations (init.fbs documents them to the host).
inline constexpr uint64_t default_read_bytes = 256u << 10;
inline constexpr uint64_t max_read_bytes = 768u << 10;
inline constexpr uint64_t max_write_bytes = 768u << 10;
inline constexpr uint64_t max_edit_bytes = 16u << 20;
inline constexpr uint32_t max_list_entries = 10000;
inline constexpr uint64_t max_list_scanned = 100000;
inline constexpr uint32_t max_glob_results = 10000;
inline constexpr uint64_t max_glob_visited = 1000000;
inline constexpr uint32_t max_grep_matches = 10000;
inline constexpr uint32_t max_grep_context = 20;
inline constexpr uint64_t max_answer_bytes = 768u << 10;  // of a glob or grep answer
inline constexpr uint64_t search_time_ms = 20000;         // glob walk, grep (then truncated)
inline constexpr size_t max_file_ops = 16;                // in progress at once

struct file_op_config {
  std::string workspace = "/workspace";
  std::string ripgrep = "/usr/bin/rg";  // used for grep when executable
};

/// The child's whole life: one frame in on fd 0, one frame out on fd 1. Returns the exit status.
int run_file_op(const file_op_config& config);

/// The FileError frame for `request_id` (also what the parent sends when the child failed).
std::string file_error_frame(uint32_t request_id, ferry::init::v1::FileErrorCode code, const std::string& message);

}  // namespace ferry_init
