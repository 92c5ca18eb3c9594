#pragma once
// ferry_sandbox public header: environments — a root (an image) plus a setup script and
// environment variables — and the cache of what their setup left.
//
// An environment's setup script runs as root in a fresh sandbox at its initialisation (in
// /workspace, with the environment's variables), must exit 0 within its time limit, and its
// output is streamed to the caller as it comes. What it wrote to the root (packages, tools,
// /etc) is saved as a read-only layer (sandbox::save_root_layer) under
// `<cache dir>/<key>/`, keyed by a hash of the root's identity, the script and the variables:
// the next sandbox of that environment starts with the layer over the root
// (sandbox_spec::layers) instead of running the script again, and changing the script (or the
// variables, or the image) makes a new key. What the script writes to /workspace is not kept.
//
// On disk: `<dir>/<key>/` (a finished layer; never changed once there), `<dir>/<key>.lock`
// (flock: held while building, so concurrent builds of one key run once),
// `<dir>/.<key>.partial-<pid>` (a copy in progress; cleared by the next build).
//
// Threading: layer_cache is thread-safe, and processes sharing a directory coordinate through
// the locks. `ensure` blocks for the whole setup; its output callback is called on the
// sandbox's reader thread, never concurrently.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/result.h"

namespace ferry::sandbox {

struct environment_spec {
  /// What the runtime's root is, for the key: an image's hash (image.h), or any string that
  /// changes when the root does. Required.
  std::string base;
  /// Run with `/bin/bash -c` as root in /workspace; empty: no setup (no layer).
  std::string setup_script;
  /// "K=V" for the setup and for every command of the environment's sandboxes.
  std::vector<std::string> env;
  /// The setup is killed after this long (and fails).
  std::chrono::milliseconds setup_timeout = std::chrono::minutes(10);
};

/// The cache key of `env`: hex SHA-256 of its base, script and variables.
std::string environment_key(const environment_spec& env);

/// A setup's output as it comes: stream 0 stdout, 1 stderr.
using setup_output = std::function<void(int stream, std::string_view data)>;

/// The layer of an environment.
struct environment_layer {
  std::string key;
  /// `<dir>/<key>`: a sandbox_spec::layers entry.
  std::filesystem::path path;
  /// Found in the cache (no setup ran).
  bool cached = false;
  /// The setup's duration (0 when cached).
  std::chrono::milliseconds setup_time{0};
};

/// Stops an `ensure` in progress from another thread (a task's abort): its setup sandbox is
/// killed and ensure fails ("cancelled"), also while it waits for another build of the key.
/// Thread-safe; one per ensure call.
class setup_cancel {
 public:
  /// Idempotent; before the ensure starts, it fails at once.
  void cancel();
  bool cancelled() const;

 private:
  friend class layer_cache;
  /// Tells the canceller which sandbox to kill (null: none any more); false if already cancelled.
  bool watch(sandbox* box);

  mutable std::mutex mu_;
  bool cancelled_ = false;   // GUARDED_BY(mu_)
  sandbox* box_ = nullptr;   // GUARDED_BY(mu_)
};

class layer_cache {
 public:
  /// `dir` is created if missing; it must be on a filesystem the runtime's sandboxes can read.
  explicit layer_cache(std::filesystem::path dir);

  /// The finished layer of `key`, if cached.
  std::optional<std::filesystem::path> find(const std::string& key) const;

  /// The layer of `env`: from the cache, or made now by running its setup in a sandbox of
  /// `runtime` (id `sandbox_id`, else `setup-<key prefix>-<pid>-<n>`), its output passed to `output`. Errors: the
  /// script exited non-zero or was killed (errc::failed, the message names the exit and ends
  /// with its output's tail), the time limit passed (errc::failed, "timed out"), an empty
  /// script or base (errc::invalid_argument), the sandbox failed, `cancel` was cancelled
  /// (errc::closed, "… cancelled"; no layer is kept, the sandbox is gone when this returns).
  /// `egress` gets the egress proxy's decisions about the setup sandbox's connections (from the
  /// proxy's threads; all of them before this returns). `sandbox_id` names the setup sandbox
  /// (so that the runtime's egress binder knows whose it is); empty: the id above.
  result<environment_layer> ensure(sandbox_runtime& runtime, const environment_spec& env,
                                   const setup_output& output = {}, setup_cancel* cancel = nullptr,
                                   const egress_binder::report_fn& egress = {}, const std::string& sandbox_id = {});

  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
};

}  // namespace ferry::sandbox
