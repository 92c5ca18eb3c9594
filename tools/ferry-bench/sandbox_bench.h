#pragma once
// ferry-bench sandbox: what the sandbox runtime costs, per backend (gVisor and bubblewrap), with
// real sandboxes through the public sandbox API — start-up against a bare runsc/bwrap launched
// side by side in the same run, the exec round trip, killing a busy sandbox, the memory of many
// idle sandboxes, acquiring from a warm pool — printed as one table (see README.md).

#include <filesystem>
#include <string>

namespace ferry::bench {

struct sandbox_bench_options {
  std::filesystem::path dir;
  /// "runsc", "bwrap" or "both".
  std::string backend = "both";
  /// Rounds of spawn-to-ready (each a Ferry sandbox and a bare one), exec and kill.
  int rounds = 30;
  /// `true` round trips per round, in the round's sandbox.
  int execs = 10;
  /// Idle sandboxes running at once for the memory figures.
  int count = 100;
  /// Sandboxes starting at once while the memory figure's sandboxes are brought up.
  int parallel = 4;
  /// The warm pool's target (ready sandboxes kept), and how many are acquired from it.
  int pool_target = 4;
  int acquires = 30;
  std::string init_binary;  ///< ferry-init; default: next to ferry-bench
  bool check = false;
};

/// Runs and prints the table. Exit code: 0 ran; 1 a measurement failed or (with check) a target
/// was missed; 2 cannot run here (not root, no temporary directory, no backend binary at all).
int run_sandbox_bench(const sandbox_bench_options& o);

}  // namespace ferry::bench
