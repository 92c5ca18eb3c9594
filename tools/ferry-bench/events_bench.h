#pragma once
// ferry-bench events: end-to-end event latency through actors, journal, outbox relay and NATS.

#include <filesystem>
#include <string>
#include <vector>

namespace ferry::bench {

struct events_options {
  std::filesystem::path dir;
  std::vector<double> rates{1000, 10000};
  int tasks = 50;
  double seconds = 3;
  double warmup = 0.5;
  std::string nats_server = "nats-server";
  /// The JetStream stream's duplicate window (outbox_options::duplicate_window); 0: the relay's
  /// default.
  double duplicate_window_s = 0;
  bool check = false;
};

/// Runs the figures and prints the table. Exit code: 0 ran; 1 a component failed or (with
/// check) a target was missed; 2 no temporary directory.
int run_events_bench(const events_options& o);

}  // namespace ferry::bench
