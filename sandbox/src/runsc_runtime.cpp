// The gVisor backend of sandbox_runtime (see ferry/sandbox/sandbox.h and ../README.md); the
// sandbox object and the runtime it shares with the other backends are in hosted.cpp.
//
// One sandbox = one runsc container started with `runsc run --detach` in a session of its own,
// so that its processes (the Sentry, its ptrace stubs and the gofer) are not children of this
// process and survive it. ferry-init, PID 1 inside, listens on a unix socket in the host
// directory `sandboxes_dir/<id>/ctl/` (bind-mounted at /.ferry/ctl; `--host-uds=create` makes
// the socket a real host socket); ferry-init gets the sandbox's key on the stdin of `runsc run`,
// which runsc gives to the container's PID 1. Besides the shared files, a sandbox has `bundle/config.json`
// (its OCI spec) and `runsc.log`. Teardown: the processes are SIGKILLed through pidfds (the
// Sentry's descendants included), then `runsc delete --force`, then any runsc process still
// naming the sandbox directory is killed.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/sandbox/sandbox.h"
#include "host_paths.h"
#include "hosted.h"

namespace ferry::sandbox {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;
using namespace detail;

constexpr auto helper_timeout = 10s;        // runsc delete / runsc kill
constexpr auto launch_timeout = 30s;        // runsc run --detach
constexpr auto straggler_timeout = 2s;      // for processes to vanish after SIGKILL

/// Host processes started by runsc (argv[0] runsc*) whose command line mentions `needle`.
std::vector<pid_t> runsc_processes_mentioning(const std::string& needle) {
  std::vector<pid_t> found;
  std::error_code ec;
  // Manual iteration: the error_code overloads never throw on the reader thread.
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const fs::directory_entry& e = *it;
    const std::string name = e.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    const std::string cmdline = read_small_file(e.path() / "cmdline");
    if (cmdline.empty())
      continue;  // a kernel thread or a zombie: nothing left to kill
    std::string argv0 = cmdline.substr(0, cmdline.find('\0'));
    if (fs::path(argv0).filename().string().rfind("runsc", 0) != 0)
      continue;
    if (cmdline.find(needle) != std::string::npos)
      found.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return found;
}

/// SIGKILLs runsc processes that still name `dir` until none is left. False if some survive.
bool kill_stragglers(const fs::path& dir) {
  const std::string needle = dir.string() + "/";
  const auto deadline = steady::now() + straggler_timeout;
  for (;;) {
    auto pids = runsc_processes_mentioning(needle);
    if (pids.empty())
      return true;
    if (steady::now() > deadline)
      return false;
    for (pid_t p : pids)
      ::kill(p, SIGKILL);
    std::this_thread::sleep_for(5ms);
  }
}

/// Settings shared by the runtime and its sandboxes; immutable once built.
struct runsc_context {
  common_settings common;
  std::string runsc;                   // resolved path of the binary
  std::vector<std::string> global;     // --root R --network=none ...
  fs::path state_dir;

  std::vector<std::string> command(std::initializer_list<std::string> args) const {
    std::vector<std::string> v{runsc};
    v.insert(v.end(), global.begin(), global.end());
    v.insert(v.end(), args.begin(), args.end());
    return v;
  }

  /// `runsc delete --force id`; "does not exist" counts as success.
  result<void> delete_container(const std::string& id) const {
    auto r = run_command(command({"delete", "--force", id}), helper_timeout);
    if (!r)
      return r.error();
    if (!r->status.ok() && r->output.find("does not exist") == std::string::npos &&
        r->output.find("not found") == std::string::npos) {
      return fail(fmt::format("`runsc delete --force {}` failed ({}): {}", id, describe(r->status),
                              trimmed(r->output)));
    }
    return {};
  }
};

nlohmann::json make_config(const runsc_context& ctx, const sandbox_spec& spec, const fs::path& root,
                           const fs::path& workspace, const fs::path& ctl, const sandbox_cgroup* cgroup) {
  using nlohmann::json;
  const common_settings& s = ctx.common;
  json mounts = json::array();
  mounts.push_back({{"destination", "/proc"}, {"type", "proc"}, {"source", "proc"}});
  mounts.push_back({{"destination", "/tmp"},
                    {"type", "tmpfs"},
                    {"source", "tmpfs"},
                    {"options", {"nosuid", "nodev", "mode=1777"}}});
  // /dev and /sys are provided by runsc itself (tmpfs with the usual nodes, and sysfs).
  for (const auto& host : s.host_binds) {
    mounts.push_back({{"destination", host.string()},
                      {"type", "bind"},
                      {"source", host.string()},
                      {"options", {"rbind", "ro"}}});
  }
  mounts.push_back({{"destination", std::string(init_path)},
                    {"type", "bind"},
                    {"source", s.init_binary.string()},
                    {"options", {"bind", "ro"}}});
  // ferry-init's control socket; only ferry-init binds there (the command could too, being the
  // same uid, and with an egress socket it can connect: which is why both sides prove the
  // sandbox's key on every connection).
  mounts.push_back({{"destination", std::string(ctl_mount)},
                    {"type", "bind"},
                    {"source", ctl.string()},
                    {"options", {"rbind", "rw"}}});
  mounts.push_back({{"destination", "/workspace"},
                    {"type", "bind"},
                    {"source", workspace.string()},
                    {"options", {"rbind", "rw"}}});

  json namespaces = json::array();
  for (const char* ns : {"pid", "ipc", "uts", "mount", "network"})
    namespaces.push_back({{"type", ns}});

  // The limits. In Ferry's own cgroup (made, with the limits written, before the launch): runsc
  // puts the sandbox's host processes there and, finding it made, leaves its settings and its
  // removal to Ferry, which reads after the end which limit was hit. Without: as the OCI spec
  // has them, in cgroups runsc makes (and removes) itself.
  json linux_section = {{"namespaces", namespaces}};
  if (cgroup) {
    linux_section["cgroupsPath"] = cgroup->oci_path();
  } else {
    json resources = json::object();
    if (s.limits.memory_bytes > 0)
      resources["memory"] = {{"limit", s.limits.memory_bytes}};
    if (s.limits.pids > 0)
      resources["pids"] = {{"limit", s.limits.pids}};
    if (s.limits.cpu_millis > 0)
      resources["cpu"] = {{"quota", uint64_t{s.limits.cpu_millis} * 100}, {"period", 100000}};
    linux_section["resources"] = resources;
  }

  return {
      {"ociVersion", "1.0.2"},
      {"process",
       {{"terminal", false},
        {"user", {{"uid", 0}, {"gid", 0}}},
        {"args", init_command(s, spec)},
        {"env", sandbox_environment(spec)},
        {"cwd", "/workspace"},
        {"noNewPrivileges", true}}},
      // The image itself, read-only, or the sandbox's writable layer over it (storage.h).
      {"root", {{"path", root.string()}, {"readonly", root == s.rootfs}}},
      {"hostname", "sandbox"},
      {"mounts", mounts},
      {"linux", linux_section},
  };
}

/// Holds `pid` if it is a live runsc process of the sandbox whose bundle is `bundle` (its command
/// line names it). Checked after opening the pidfd, and the process still alive after the check:
/// then the pidfd and the checked command line are the same process.
std::optional<held_process> hold_runsc_process(pid_t pid, const std::string& bundle) {
  auto p = hold(pid);
  if (!p)
    return std::nullopt;
  const std::string cmdline = read_small_file(fs::path("/proc") / std::to_string(pid) / "cmdline");
  const std::string argv0 = cmdline.substr(0, cmdline.find('\0'));
  if (fs::path(argv0).filename().string().rfind("runsc", 0) != 0 ||
      cmdline.find(bundle) == std::string::npos || p->exited())
    return std::nullopt;
  return p;
}

/// The Sentry's and gofer's pids from runsc's state file (`<root>/<id>_sandbox:<id>.state`, a
/// runsc-internal JSON document: `sandbox.pid`, `goferPid`).
struct runsc_pids {
  pid_t sandbox = 0;
  pid_t gofer = 0;
};

std::optional<runsc_pids> read_runsc_state(const fs::path& state_dir, const std::string& id) {
  const std::string text = read_small_file(state_dir / fmt::format("{}_sandbox:{}.state", id, id));
  if (text.empty())
    return std::nullopt;
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return std::nullopt;
  runsc_pids p;
  if (auto s = j.find("sandbox"); s != j.end() && s->is_object()) {
    if (auto pid = s->find("pid"); pid != s->end() && pid->is_number_integer())
      p.sandbox = pid->get<pid_t>();
  }
  if (auto g = j.find("goferPid"); g != j.end() && g->is_number_integer())
    p.gofer = g->get<pid_t>();
  if (p.sandbox <= 0)
    return std::nullopt;
  return p;
}

/// The runsc container id of sandbox `id`: the id and ".f". Debian's runsc (2022) resolves an id
/// by prefix and refuses one that is the start of another live container's ("ambiguous": a
/// `delete` of `x1` while `x10` runs fails and leaves its cgroups behind); sandbox ids cannot
/// contain '.', so no container id is the start of another. A sandbox started by an older
/// ferryd under its bare id (its state file says so) keeps it.
std::string container_id(const fs::path& state_dir, const std::string& id) {
  std::error_code ec;
  const std::string suffixed = id + ".f";
  if (!fs::exists(state_dir / fmt::format("{}_sandbox:{}.state", suffixed, suffixed), ec) &&
      fs::exists(state_dir / fmt::format("{}_sandbox:{}.state", id, id), ec))
    return id;
  return suffixed;
}

/// One runsc container: its processes are the Sentry (procs[0]), the gofer and the Sentry's
/// ptrace stubs.
class runsc_driver final : public sandbox_driver {
 public:
  runsc_driver(std::shared_ptr<const runsc_context> ctx, std::string id)
      : ctx_(std::move(ctx)), cid_(container_id(ctx_->state_dir, id)), dir_(ctx_->common.sandboxes_dir / id) {}

  /// `runsc run --detach` in a session of its own, its stdout and stderr (and so ferry-init's) to
  /// runsc.log. Its stdin is a pipe holding the key, then end of file: runsc gives its stdin to
  /// the container's init process (verified with this runsc: the container's fd 0 is the host
  /// pipe, "host:[1]"), and ferry-init reads it to the end and replaces it with /dev/null
  /// before any command runs.
  launched launch(const wire::handshake_key& key) override {
    launched l;
    spawn_options o;
    o.argv = ctx_->command({"run", "--detach", "--bundle", (dir_ / "bundle").string(), cid_});
    o.in = stdio::bytes;
    o.in_bytes = wire::key_to_hex(key);
    o.out = stdio::file;
    o.err = stdio::file;
    o.file = log_path(dir_, log_name());
    o.new_session = true;
    auto runsc = child_process::spawn(o);
    if (!runsc) {
      l.status = runsc.error();
      return l;
    }
    auto status = runsc->wait_for(launch_timeout);
    if (!status) {
      runsc->signal_group(SIGKILL);
      runsc->wait();
    }
    l.procs = find();
    if (!status)
      l.status = fail(fmt::format("`runsc run` did not finish within {} s", launch_timeout.count()));
    else if (!status->ok())
      l.status = fail(fmt::format("runsc: {}", describe(*status)));
    return l;
  }

  /// The Sentry (first) and the gofer, held; empty if the Sentry is not alive.
  std::vector<held_process> find() override {
    std::vector<held_process> procs;
    auto pids = read_runsc_state(ctx_->state_dir, cid_);
    if (!pids)
      return procs;
    const std::string bundle = (dir_ / "bundle").string();
    auto sentry = hold_runsc_process(pids->sandbox, bundle);
    if (!sentry)
      return procs;
    procs.push_back(std::move(*sentry));
    if (auto gofer = hold_runsc_process(pids->gofer, bundle))
      procs.push_back(std::move(*gofer));
    return procs;
  }

  void hold_more(std::vector<held_process>& procs) override { hold_descendants(procs); }

  bool kill(std::vector<held_process>& procs) override {
    if (!procs.empty()) {
      hold_descendants(procs);
      return kill_and_wait(procs, straggler_timeout);
    }
    // No pidfds (no state file, no pidfd_open): whatever runsc still has of it, the slow way.
    (void)run_command(ctx_->command({"kill", "--all", cid_, "KILL"}), helper_timeout);
    return kill_stragglers(dir_);
  }

  result<void> cleanup() override {
    auto deleted = ctx_->delete_container(cid_);
    if (!kill_stragglers(dir_))
      return fail(fmt::format("runsc processes of {} survived SIGKILL", dir_.string()));
    return deleted;
  }

  std::string_view log_name() const override { return "runsc.log"; }

 private:
  const std::shared_ptr<const runsc_context> ctx_;
  const std::string cid_;
  const fs::path dir_;
};

class runsc_backend final : public backend {
 public:
  explicit runsc_backend(std::shared_ptr<const runsc_context> ctx) : ctx_(std::move(ctx)) {}

  std::string_view name() const override { return "runsc"; }
  const common_settings& settings() const override { return ctx_->common; }

  /// The OCI bundle.
  result<void> prepare(const sandbox_spec& spec, const fs::path& dir, const sandbox_cgroup* cgroup) override {
    std::error_code ec;
    const fs::path bundle = dir / "bundle";
    fs::create_directory(bundle, ec);
    if (ec)
      return fail(fmt::format("cannot create {}: {}", bundle.string(), ec.message()));
    auto root = ctx_->common.storage->mount_root(dir, ctx_->common.rootfs, spec.layers, std::nullopt);
    if (!root)
      return root.error();
    std::string config;
    try {
      config = make_config(*ctx_, spec, *root, dir / "workspace", dir / "ctl", cgroup).dump(2);
    } catch (const nlohmann::json::exception&) {
      return fail("argv and env must be valid UTF-8 (they go into the OCI config.json)");
    }
    return write_file_atomically(bundle / "config.json", config, fs::perms(0644));
  }

  std::unique_ptr<sandbox_driver> driver(const std::string& id) override {
    return std::make_unique<runsc_driver>(ctx_, id);
  }

 private:
  const std::shared_ptr<const runsc_context> ctx_;
};

}  // namespace

result<std::unique_ptr<sandbox_runtime>> make_runsc_runtime(runsc_options opts) {
  if (opts.state_dir.empty())
    return fail("runsc runtime: state_dir must be set");
  auto ctx = std::make_shared<runsc_context>();
  auto runsc = find_program(opts.runsc);
  if (!runsc)
    return fail(fmt::format("runsc runtime: `{}` not found or not executable (is gVisor installed?)", opts.runsc));
  ctx->runsc = *runsc;
  // --ignore-cgroups: runsc would not put the sandbox into any group (under `ip netns exec`).
  auto common = check_options(opts, "runsc", !opts.ignore_cgroups, "the cgroups runsc makes itself");
  if (!common)
    return common.error();
  ctx->common = std::move(*common);
  ctx->state_dir = clean_path(opts.state_dir);
  std::error_code ec;
  fs::create_directories(ctx->state_dir, ec);
  if (ec)
    return fail(fmt::format("runsc runtime: cannot create {}: {}", ctx->state_dir.string(), ec.message()));

  // --host-uds=create: ferry-init's listening socket in ctl/ is a real host socket (sandbox
  // processes may create host sockets in their rw bind mounts, but never connect to one).
  // With an egress socket: =all, so ferry-init's forwarder can connect to it — and so can the
  // commands to the control socket, where without the key they get nothing (README: why
  // --host-uds=all is safe with the handshake).
  ctx->global = {"--root", ctx->state_dir.string(), "--network=none",
                 !ctx->common.egress ? "--host-uds=create" : "--host-uds=all"};
  if (opts.ignore_cgroups)
    ctx->global.emplace_back("--ignore-cgroups");
  ctx->global.insert(ctx->global.end(), opts.extra_flags.begin(), opts.extra_flags.end());
  return make_hosted_runtime(std::make_shared<runsc_backend>(std::move(ctx)));
}

}  // namespace ferry::sandbox
