#pragma once
// ferry-bench abort: abort latency — from the abort request to the moment the last host process
// of the task's sandbox is gone — through the real task manager, journal and gVisor sandboxes,
// against the runtime's own kill of a sandbox (no actors, no journal) in the same run.

#include <filesystem>
#include <string>

namespace ferry::bench {

struct abort_options {
  std::filesystem::path dir;
  int rounds = 30;
  std::string init_binary;  ///< ferry-init; default: next to ferry-bench
  bool check = false;
};

/// Runs and prints the table. Exit code: 0 ran; 1 a component failed or (with check) the target
/// was missed; 2 cannot run here (not root, no runsc).
int run_abort_bench(const abort_options& o);

}  // namespace ferry::bench
