// make_runtime: the backend a configuration asks for, or with `auto` the best one this host has.

#include <unistd.h>

#include <cstdio>
#include <mutex>
#include <condition_variable>

#include <fmt/format.h>

#include "ferry/sandbox/sandbox.h"

namespace ferry::sandbox {
namespace {

/// Waits for the probe sandbox's end and keeps why it failed.
class probe_observer final : public sandbox_observer {
 public:
  void on_running() override {}
  void on_command_started(uint32_t, const std::vector<std::string>&) override {}
  void on_output(uint32_t, int, std::string_view) override {}
  void on_command_exited(uint32_t, int exit_code, int, uint64_t) override { exit_code_ = exit_code; }
  void on_ended(std::optional<std::string> failure) override { failure_ = std::move(failure); }

  /// Why the probe did not work; nullopt if it did. REQUIRES: the sandbox ended.
  std::optional<std::string> problem() const {
    if (failure_)
      return failure_;
    if (exit_code_ != 0)
      return fmt::format("the probe command exited with {}", exit_code_);
    return std::nullopt;
  }

 private:
  int exit_code_ = -1;
  std::optional<std::string> failure_;
};

/// Runs `true` in a sandbox of `runtime`; nullopt if it worked, else why not.
std::optional<std::string> probe(sandbox_runtime& runtime) {
  probe_observer obs;
  sandbox_spec spec;
  spec.id = fmt::format("ferry-probe-{}", ::getpid());
  spec.argv = {"true"};
  auto sb = runtime.start(spec, obs);
  if (!sb)
    return sb.error().message;
  (*sb)->wait();
  return obs.problem();
}

runsc_options runsc_of(const runtime_config& c) {
  runsc_options o;
  static_cast<runtime_options&>(o) = c;
  static_cast<runsc_settings&>(o) = c.runsc;
  return o;
}

bwrap_options bwrap_of(const runtime_config& c) {
  bwrap_options o;
  static_cast<runtime_options&>(o) = c;
  static_cast<bwrap_settings&>(o) = c.bwrap;
  return o;
}

}  // namespace

result<backend_choice> parse_backend_choice(std::string_view name) {
  if (name == "auto")
    return backend_choice::automatic;
  if (name == "runsc")
    return backend_choice::runsc;
  if (name == "bwrap")
    return backend_choice::bwrap;
  return error_info{fmt::format("unknown sandbox backend `{}` (auto, runsc or bwrap)", name), errc::invalid_argument};
}

std::string_view to_string(backend_choice c) {
  switch (c) {
    case backend_choice::automatic:
      return "auto";
    case backend_choice::runsc:
      return "runsc";
    case backend_choice::bwrap:
      return "bwrap";
  }
  return "?";
}

result<std::unique_ptr<sandbox_runtime>> make_runtime(const runtime_config& config) {
  switch (config.backend) {
    case backend_choice::runsc:
      return make_runsc_runtime(runsc_of(config));
    case backend_choice::bwrap:
      return make_bwrap_runtime(bwrap_of(config));
    case backend_choice::automatic:
      break;
  }
  std::string why;
  if (auto runsc = make_runsc_runtime(runsc_of(config)); !runsc) {
    why = runsc.error().message;
  } else if (auto problem = probe(**runsc); problem) {
    why = "a probe sandbox failed: " + *problem;
  } else {
    return runsc;
  }
  // Loudly: the sandboxes are weaker than the operator may think (the host kernel is exposed).
  std::fprintf(stderr,
               "ferry: ************************************************************************\n"
               "ferry: WARNING: gVisor (runsc) does not work on this host: %s\n"
               "ferry: WARNING: FALLING BACK to bubblewrap: sandboxes share the host's kernel\n"
               "ferry: WARNING: (namespaces + seccomp). Use --sandbox-runtime to choose one.\n"
               "ferry: ************************************************************************\n",
               why.c_str());
  return make_bwrap_runtime(bwrap_of(config));
}

}  // namespace ferry::sandbox
