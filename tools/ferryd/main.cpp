// ferryd — the Ferry server. With no flags it runs everything on embedded defaults: the journal
// under ./var, a nats-server child on a free loopback port, the gVisor sandbox runtime, and the
// HTTP/WebSocket API on 127.0.0.1:8080.

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <openssl/crypto.h>
#include <nlohmann/json.hpp>
#include <caf/all.hpp>

#include "ferry/actors/bus.h"
#include "ferry/actors/outbox.h"
#include "ferry/actors/tasks.h"
#include "ferry/egress/egress_proxy.h"
#include "ferry/egress/policy.h"
#include "ferry/egress/sandbox_token.h"
#include "ferry/gateway/gateway.h"
#include "ferry/gateway/org_policy.h"
#include "ferry/gateway/tokens.h"
#include "ferry/sandbox/environment.h"
#include "ferry/sandbox/image.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/sandbox/process.h"
#include "ferry/storage/credentials.h"
#include "ferry/storage/journal.h"
#include "git_access.h"
#include "warm_pools.h"

namespace fs = std::filesystem;

namespace {

/// A start-up failure. Thrown (inside this file only) so that everything started so far — the
/// nats-server child, running actors — is stopped by its destructor on the way out.
struct fatal_error {
  std::string message;
};

[[noreturn]] void die(const std::string& message) { throw fatal_error{message}; }

/// "HOST:PORT" or "[V6]:PORT" → host, port.
std::pair<std::string, uint16_t> parse_listen(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos || colon + 1 == s.size())
    die("--listen must be HOST:PORT, got '" + s + "'");
  auto host = s.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  unsigned long port = 0;
  try {
    size_t used = 0;
    port = std::stoul(s.substr(colon + 1), &used);
    if (used != s.size() - colon - 1 || port > 65535)
      throw std::out_of_range("port");
  } catch (const std::exception&) {
    die("--listen port must be 0..65535, got '" + s.substr(colon + 1) + "'");
  }
  return {host, static_cast<uint16_t>(port)};
}

/// The content of the file `path` named by option `flag`, at most `max` bytes (else `too_big`
/// says why); every failure stops ferryd naming the flag and the file, never the content.
std::string read_option_file(const std::string& flag, const std::string& path, size_t max,
                             const std::string& too_big) {
  std::error_code ec;
  if (!fs::exists(path, ec))
    die(flag + " " + path + ": no such file");
  if (fs::is_directory(path, ec))
    die(flag + " " + path + ": is a directory");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f)
    die(flag + " " + path + ": cannot read it: " + std::strerror(errno));
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0 && text.size() <= max)
    text.append(buf, n);
  const bool failed = std::ferror(f);
  std::fclose(f);
  if (failed)
    die(flag + " " + path + ": cannot read it");
  if (text.size() > max)
    die(flag + " " + path + ": " + too_big);
  return text;
}

/// The secret in `path` (a password or token file), without its trailing line break. `flag`
/// names the option in errors; the secret itself never appears in one.
std::string read_secret_file(const std::string& flag, const std::string& path) {
  std::string secret = read_option_file(flag, path, 64 * 1024, "larger than 64 KiB, not a secret file");
  while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r'))
    secret.pop_back();
  if (secret.empty())
    die(flag + " " + path + ": is empty");
  if (secret.find('\n') != std::string::npos)
    die(flag + " " + path + ": holds more than one line");
  return secret;
}

/// Most idle sandboxes one warm pool may keep.
constexpr size_t max_warm_pool = 64;

/// The environments of `--environments FILE`, each one's base set to `base` (the sandbox root's
/// identity), and the network policies of those that name one (into `networks`). The file is
/// JSON:
///   {"environments": {"NAME": {"setup": "SCRIPT", "env": {"K": "V"}, "setup_timeout_s": 600,
///                              "network": {"level": "custom", "allow": [...], "deny": [...]},
///                              "warm_pool": 2}}}
/// every field but the name optional; `warm_pool` sizes go into `warm`. Refused with a message
/// naming the place: anything else.
std::map<std::string, ferry::sandbox::environment_spec> read_environments(
  const std::string& path, const std::string& base, std::map<std::string, ferry::egress::egress_policy>& networks,
  std::map<std::string, size_t>& warm) {
  std::map<std::string, ferry::sandbox::environment_spec> out;
  const std::string text = read_option_file("--environments", path, 4u << 20, "larger than 4 MiB");
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& what) { die("--environments " + path + ": " + what); };
  if (j.is_discarded())
    bad("not valid JSON");
  if (!j.is_object() || !j.contains("environments") || !j["environments"].is_object())
    bad("expected {\"environments\": {\"NAME\": {...}, ...}}");
  for (const auto& [name, e] : j["environments"].items()) {
    const bool name_ok = !name.empty() && name.size() <= 64 &&
                         std::all_of(name.begin(), name.end(), [](char c) {
                           return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
                         });
    if (!name_ok)
      bad("environment name \"" + name.substr(0, 64) + "\": use 1 to 64 letters, digits, '-', '_' or '.'");
    const std::string where = "environment " + name + ": ";
    if (!e.is_object())
      bad(where + "expected an object");
    ferry::sandbox::environment_spec spec;
    spec.base = base;
    for (const auto& [field, value] : e.items()) {
      if (field == "setup") {
        if (!value.is_string())
          bad(where + "\"setup\" must be a string (a bash script)");
        spec.setup_script = value.get<std::string>();
      } else if (field == "env") {
        if (!value.is_object())
          bad(where + "\"env\" must be an object of strings");
        for (const auto& [k, v] : value.items()) {
          const bool key_ok = !k.empty() && !std::isdigit(static_cast<unsigned char>(k[0])) &&
                              std::all_of(k.begin(), k.end(), [](char c) {
                                return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
                              });
          if (!key_ok)
            bad(where + "variable name \"" + k.substr(0, 64) + "\" is not a shell identifier");
          if (!v.is_string())
            bad(where + "variable " + k + " must be a string");
          spec.env.push_back(k + "=" + v.get<std::string>());
        }
      } else if (field == "setup_timeout_s") {
        if (!value.is_number() || value.get<double>() < 1 || value.get<double>() > 24 * 3600)
          bad(where + "\"setup_timeout_s\" must be a number of seconds from 1 to 86400");
        spec.setup_timeout = std::chrono::milliseconds(static_cast<int64_t>(value.get<double>() * 1000));
      } else if (field == "network") {
        auto policy = ferry::egress::egress_policy::from_json(value);
        if (!policy)
          bad(where + "\"network\": " + policy.error().message);
        networks.insert_or_assign(name, std::move(*policy));
      } else if (field == "warm_pool") {
        if (!value.is_number_unsigned() || value.get<uint64_t>() > max_warm_pool)
          bad(where + "\"warm_pool\" must be a whole number of sandboxes from 0 to " + std::to_string(max_warm_pool));
        warm.insert_or_assign(name, value.get<size_t>());
      } else {
        bad(where + "unknown field \"" + field.substr(0, 64) +
            "\" (known: setup, env, setup_timeout_s, network, warm_pool)");
      }
    }
    out.emplace(name, std::move(spec));
  }
  return out;
}

fs::path self_dir() {
  std::error_code ec;
  auto exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::current_path() : exe.parent_path();
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"ferryd — the Ferry server (tasks in gVisor or bubblewrap sandboxes, event-sourced)"};
  std::string listen = "127.0.0.1:8080";
  std::string data_dir = "./var";
  // NATS: an external server (--nats-url and how to authenticate to it), else an embedded child.
  ferry::actors::nats_options nats;
  std::string nats_password_file;
  std::string nats_token_file;
  std::string nats_server = "nats-server";
  std::string runsc = "runsc";
  std::string sandbox_runtime = "auto";
  std::string rootfs;
  std::string image = "auto";
  std::string init_binary;
  bool ignore_cgroups = false;
  bool no_fsync = false;
  std::string environments_file;
  std::string default_network = "trusted";
  size_t warm_pool = 0;
  std::string forge_url;
  std::string forge_user = "x-access-token";
  std::string forge_token_file;
  std::string forge_ca;
  ferry::actors::task_limits limits;
  ferry::sandbox::sandbox_limits sandbox_limits;
  app.add_option("--listen", listen, "HTTP/WebSocket address HOST:PORT (port 0: pick a free one)")
    ->capture_default_str();
  app.add_option("--data-dir", data_dir, "Where the journal, NATS store and sandboxes live")
    ->capture_default_str();
  app.add_option("--nats-url", nats.url,
                 "Use this NATS server (nats://HOST:PORT or tls://HOST:PORT, comma-separated for "
                 "a cluster) instead of starting a nats-server child");
  app.add_option("--nats-user", nats.user,
                 "NATS user name; the password comes from --nats-password-file or "
                 "$FERRY_NATS_PASSWORD (never from the command line, which ps shows)");
  app.add_option("--nats-password-file", nats_password_file,
                 "File holding the NATS user's password (one line)");
  app.add_option("--nats-token-file", nats_token_file,
                 "File holding a NATS authentication token (one line)");
  app.add_option("--nats-creds", nats.creds_file,
                 "NATS credentials file (user JWT + NKey seed, as nsc writes it)");
  app.add_option("--nats-nkey-seed", nats.nkey_seed_file, "File holding a NATS user NKey seed");
  app.add_flag("--nats-tls", nats.require_tls,
               "Require TLS to NATS (implied by tls:// and by the other --nats-tls-* options)");
  app.add_option("--nats-tls-ca", nats.tls_ca_file,
                 "PEM CA certificate(s) to verify the NATS server with (default: the system's)");
  app.add_option("--nats-tls-cert", nats.tls_cert_file,
                 "PEM client certificate for NATS servers that verify clients (needs "
                 "--nats-tls-key)");
  app.add_option("--nats-tls-key", nats.tls_key_file, "PEM key of --nats-tls-cert");
  app.add_option("--forge-url", forge_url,
                 "The forge's smart-HTTP base URL (https://HOST[/PREFIX]) that tasks' repositories "
                 "(org/name) are cloned from and pushed to, through the git proxy; default: the "
                 "embedded local forge under DATA/forge");
  app.add_option("--forge-user", forge_user, "User name sent to the forge with its token")
    ->capture_default_str();
  app.add_option("--forge-token-file", forge_token_file,
                 "File holding the forge's token (one line): stored encrypted by the credential "
                 "manager (as forge-token), used only by the git proxy; needed once")
    ->check(CLI::ExistingFile);
  app.add_option("--forge-ca", forge_ca, "PEM CA certificate(s) for the forge (default: the system's)")
    ->check(CLI::ExistingFile);
  app.add_option("--nats-tls-server-name", nats.tls_server_name,
                 "Name the NATS server's certificate must carry (default: the URL's host)");
  app.add_option("--nats-server", nats_server, "nats-server binary for the embedded child")
    ->capture_default_str();
  app.add_option("--sandbox-runtime", sandbox_runtime,
                 "Sandbox backend: runsc (gVisor), bwrap (bubblewrap: namespaces and a seccomp filter "
                 "on the host's kernel), or auto: runsc if a probe sandbox runs on this host, else "
                 "bwrap (said loudly)")
    ->check(CLI::IsMember({"auto", "runsc", "bwrap"}))
    ->capture_default_str();
  app.add_option("--runsc", runsc, "gVisor runsc binary")->capture_default_str();
  app.add_option("--image", image,
                 "Sandbox root: an image from `ferryctl image build` (its hash, a unique prefix, or "
                 "latest), none (a read-only view of the host's /usr), or auto: the latest image "
                 "under <data-dir>/images if there is one, else none")
    ->capture_default_str();
  app.add_option("--rootfs", rootfs,
                 "Read-only sandbox root filesystem directory (instead of --image)");
  app.add_option("--init-binary", init_binary,
                 "ferry-init binary mounted into sandboxes (default: next to ferryd)");
  app.add_flag("--runsc-ignore-cgroups", ignore_cgroups,
               "Pass --ignore-cgroups to runsc (needed inside `ip netns exec`)");
  app.add_option("--sandbox-memory", sandbox_limits.memory_bytes,
                 "Memory of each sandbox, all its processes together (e.g. 512MiB, 4GiB; 0: no "
                 "limit); reaching it is recorded as limit_reached memory")
    ->transform(CLI::AsSizeValue(false))
    ->check(CLI::Range(0.0, static_cast<double>(uint64_t{1} << 50)).description(""))
    ->type_name("SIZE")
    ->default_str("4GiB");
  app.add_option("--sandbox-disk", sandbox_limits.disk_bytes,
                 "Disk quota of each sandbox: its workspace and its writable root on a filesystem "
                 "of their own (e.g. 2GiB, 10GiB; 0: no quota); filling it is recorded as "
                 "limit_reached disk_quota")
    ->transform(CLI::AsSizeValue(false))
    ->check(CLI::Range(0.0, static_cast<double>(uint64_t{1} << 50)).description(""))
    ->type_name("SIZE")
    ->default_str("10GiB");
  app.add_option("--sandbox-pids", sandbox_limits.pids,
                 "Processes and threads of each sandbox at once (0: no limit); reaching it is "
                 "recorded as limit_reached pids")
    ->check(CLI::Range(0u, 4194304u))
    ->capture_default_str();
  app.add_option("--max-running", limits.max_running, "Tasks running at once, all users")
    ->check(CLI::Range(1u, 10000u))
    ->capture_default_str();
  app.add_option("--max-running-per-user", limits.max_running_per_user,
                 "Tasks one user may have running at once")
    ->check(CLI::Range(1u, 10000u))
    ->capture_default_str();
  app.add_option("--max-queued-per-user", limits.max_queued_per_user,
                 "Tasks one user may have waiting for a slot; more are refused")
    ->check(CLI::Range(0u, 100000u))
    ->capture_default_str();
  // Durations are given with their unit (CLI11 converts them to milliseconds); a bare number or
  // an unknown unit is refused at start-up with what is expected.
  uint64_t task_wall_clock_ms = 4 * 3'600'000;  // task_deps::default_wall_clock
  const CLI::AsNumberWithUnit duration_ms(
    std::map<std::string, uint64_t>{{"ms", 1}, {"s", 1000}, {"m", 60'000}, {"h", 3'600'000}},
    static_cast<CLI::AsNumberWithUnit::Options>(CLI::AsNumberWithUnit::CASE_SENSITIVE |
                                                CLI::AsNumberWithUnit::UNIT_REQUIRED));
  const CLI::Validator duration(
    [duration_ms](std::string& in) -> std::string {
      const std::string given = in;
      try {
        if (given.find('-') == std::string::npos && duration_ms(in).empty())
          return {};
      } catch (const CLI::ValidationError&) {
      }
      in = given;
      return "'" + given +
             "' is not a duration: give a whole number and a unit, e.g. 30s, 15m or 4h (units: "
             "ms, s, m, h)";
    },
    "");
  app.add_option("--task-wall-clock", task_wall_clock_ms,
                 "Longest a task may run (from its start or resume) when its request names no "
                 "limit, e.g. 30s, 15m, 4h; then it is killed with its sandbox and fails "
                 "(limit_reached task_wall_clock). At least 1s")
    ->transform(duration)
    ->type_name("DURATION")
    ->default_str("4h");
  app.add_option("--environments", environments_file,
                 "JSON file of the environments tasks may name: {\"environments\": {\"NAME\": "
                 "{\"setup\": SCRIPT, \"env\": {K: V}, \"setup_timeout_s\": N}}}; each setup "
                 "runs once per change, its result cached under DATA/layers");
  app.add_option("--default-network", default_network,
                 "Network policy of tasks without an environment and of environments that name "
                 "none: none (no way out), trusted (package registries, git hosts, model APIs) or "
                 "full (any public address); always bounded by the organisation's policy (PUT "
                 "/api/v1/admin/egress-policy) and never reaching private or local addresses")
    ->check(CLI::IsMember({"none", "trusted", "full"}))
    ->capture_default_str();
  app.add_option("--warm-pool", warm_pool,
                 "Idle sandboxes to keep started ahead, per environment (and for tasks without "
                 "one), so that a task's sandbox is ready at once; an environment's \"warm_pool\" "
                 "overrides it. 0: none")
    ->check(CLI::Range(size_t{0}, max_warm_pool))
    ->capture_default_str();
  app.add_flag("--no-fsync", no_fsync,
               "Acknowledge appends before fsync; fsync every 100 ms instead (a machine crash may "
               "lose the last 100 ms of events; a ferryd crash loses nothing)");
  CLI11_PARSE(app, argc, argv);
  if (sandbox_limits.memory_bytes != 0 && sandbox_limits.memory_bytes < (uint64_t{64} << 20))
    die("--sandbox-memory must be 0 (no limit) or at least 64MiB (a sandbox's own processes need "
        "that much), got " + std::to_string(sandbox_limits.memory_bytes) + " bytes");
  if (sandbox_limits.disk_bytes != 0 && sandbox_limits.disk_bytes < ferry::sandbox::min_disk_bytes)
    die("--sandbox-disk must be 0 (no quota) or at least " + std::to_string(ferry::sandbox::min_disk_bytes >> 20) +
        "MiB, got " + std::to_string(sandbox_limits.disk_bytes) + " bytes");
  if (task_wall_clock_ms < 1000)
    die("--task-wall-clock must be at least 1s, got " + std::to_string(task_wall_clock_ms) +
        "ms");

  // NATS credentials: secrets come from files or the environment, never from argv. The
  // variable is removed so that no child (nats-server, runsc) inherits it.
  const char* env_password = std::getenv("FERRY_NATS_PASSWORD");
  if (env_password && *env_password) {
    if (!nats_password_file.empty())
      die("both --nats-password-file and FERRY_NATS_PASSWORD are set: use one");
    nats.password = env_password;
  }
  ::unsetenv("FERRY_NATS_PASSWORD");
  if (!nats_password_file.empty())
    nats.password = read_secret_file("--nats-password-file", nats_password_file);
  if (!nats_token_file.empty())
    nats.token = read_secret_file("--nats-token-file", nats_token_file);
  if (nats.url.empty()) {
    const bool credentials = !nats.user.empty() || !nats.password.empty() ||
                             !nats.token.empty() || !nats.creds_file.empty() ||
                             !nats.nkey_seed_file.empty() || nats.uses_tls();
    if (credentials)
      die("NATS credentials and TLS options need --nats-url (the embedded nats-server takes "
          "none)");
  } else {
    if (!nats.password.empty() && nats.user.empty())
      die(std::string(nats_password_file.empty() ? "FERRY_NATS_PASSWORD" : "--nats-password-file") +
          " needs --nats-user");
    if (!nats.user.empty() && nats.password.empty())
      die("--nats-user needs a password: --nats-password-file FILE or FERRY_NATS_PASSWORD");
    if (auto ok = ferry::actors::check_nats_options(nats); !ok)
      die(ok.error().message);
    if (ferry::actors::redact_nats_url(nats.url) != nats.url)
      std::fprintf(stderr,
                   "ferryd: warning: --nats-url carries a secret, which every local user can "
                   "read in the process list; use --nats-user with --nats-password-file, or "
                   "--nats-token-file\n");
  }

  // Signals are taken synchronously by the main thread; every thread started later inherits the
  // mask, so SIGINT/SIGTERM never interrupt a worker.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto [host, port] = parse_listen(listen);
  std::error_code ec;
  fs::path data = fs::absolute(data_dir, ec).lexically_normal();
  fs::create_directories(data, ec);
  if (ec)
    die("create data directory " + data.string() + ": " + ec.message());

  // The sandboxes' root, chosen before anything starts: --rootfs, else an image (held for as
  // long as ferryd runs, so that `ferryctl image rm` refuses it), else the host tree.
  std::optional<ferry::sandbox::image_lease> image_lease;
  std::string root_description = "host tree (read-only host /usr)";
  // The root's identity, part of every environment's key (a new root: new setups).
  std::string root_identity = "host-tree";
  if (!rootfs.empty()) {
    if (image != "auto" && image != "none")
      die("--rootfs and --image " + image + " both choose the sandbox root: give one");
    root_description = "--rootfs " + rootfs;
    root_identity = "rootfs:" + fs::absolute(rootfs, ec).lexically_normal().string();
  } else if (image != "none") {
    const fs::path images = data / "images";
    auto listing = ferry::sandbox::list_images(images);
    if (!listing)
      die("--image: " + listing.error().message);
    if (image != "auto" || !listing->images.empty()) {
      auto lease = ferry::sandbox::lease_image(images, image == "auto" ? "latest" : image);
      if (!lease)
        die("--image " + image + ": " + lease.error().message);
      image_lease = std::move(*lease);
      const auto& i = image_lease->image();
      root_description = "image " + i.hash.substr(0, 12) + " (" + i.recipe.suite + ", " +
                         std::to_string(i.recipe.packages.size()) + " extra packages, built " +
                         i.created + ")";
      rootfs = i.rootfs.string();
      root_identity = "image:" + i.hash;
    }
  }
  std::map<std::string, ferry::sandbox::environment_spec> environments;
  std::map<std::string, ferry::egress::egress_policy> networks;
  std::map<std::string, size_t> warm_sizes;
  if (!environments_file.empty())
    environments = read_environments(environments_file, root_identity, networks, warm_sizes);
  const ferry::egress::egress_policy default_policy = default_network == "none"   ? ferry::egress::egress_policy::none()
                                                      : default_network == "full" ? ferry::egress::egress_policy::full()
                                                                                  : ferry::egress::egress_policy::trusted();
  // Where the environments' setup results are kept (a layer per key, never changed once made).
  ferry::sandbox::layer_cache layers(data / "layers");

  ferry::storage::journal_options jopts;
  jopts.dir = data / "journal";
  jopts.durability =
    no_fsync ? ferry::storage::durability::periodic : ferry::storage::durability::fsync;
  auto store = ferry::storage::open_journal(jopts);
  if (!store)
    die(store.error().message);

  std::unique_ptr<ferry::actors::embedded_nats> nats_child;
  if (nats.url.empty()) {
    auto child = ferry::actors::start_embedded_nats(nats_server, data / "nats");
    if (!child)
      die(child.error().message + " (install nats-server or pass --nats-url)");
    nats_child = std::move(*child);
    nats.url = nats_child->url();  // and default options: the same connect code as external
  }
  auto bus = ferry::actors::connect_nats(nats);
  if (!bus)
    die(bus.error().message);
  // Every stored event reaches NATS through the relay (JetStream stream FERRY_EVENTS), in
  // journal order; actors never wait for NATS. Its own connection, with the same options.
  ferry::actors::outbox_options oo;
  oo.nats = nats;
  auto relay = ferry::actors::start_outbox_relay(**store, oo);
  if (!relay)
    die("outbox relay: " + relay.error().message);

  // The egress proxy: every sandbox's only way out, through a socket of its own, with a token
  // signed by a key that never leaves <data>/keys (0700; the key file 0600).
  const fs::path keys = data / "keys";
  const fs::path egress_sockets = data / "egress";
  for (const auto& dir : {keys, egress_sockets}) {
    fs::create_directories(dir, ec);
    if (!ec)
      fs::permissions(dir, fs::perms::owner_all, ec);
    if (ec)
      die("create " + dir.string() + ": " + ec.message());
  }
  auto sandbox_tokens = ferry::egress::sandbox_tokens::open(keys);
  if (!sandbox_tokens)
    die("egress tokens: " + sandbox_tokens.error().message);
  // The credential manager: forge tokens (and later API keys) encrypted under a key file in
  // <data>/keys; only the git proxy is given a way to read the forge's.
  ferry::storage::credential_store_options co;
  co.dir = data / "credentials";
  co.key_file = keys / "credentials.key";
  auto credentials = ferry::storage::credential_store::open(co);
  if (!credentials)
    die("credential manager: " + credentials.error().message);
  if (!forge_token_file.empty()) {
    std::string token = ferry::sandbox::read_small_file(forge_token_file);
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' '))
      token.pop_back();
    if (token.empty())
      die("--forge-token-file " + forge_token_file + ": empty");
    if (forge_url.empty())
      die("--forge-token-file needs --forge-url (the embedded forge draws its own token)");
    auto put = (*credentials)->put("forge-token", token);
    OPENSSL_cleanse(token.data(), token.size());
    if (!put)
      die("credential manager: forge-token: " + put.error().message);
  }
  // The forge and the git proxy in front of it, which sandboxes reach as git.ferry.internal.
  ferry::ferryd::git_access_options gao;
  gao.data_dir = data;
  gao.forge_url = forge_url;
  gao.forge_user = forge_user;
  gao.ca_file = forge_ca;
  gao.credentials = credentials->get();
  auto git = ferry::ferryd::git_access::start(gao);
  if (!git)
    die(git.error().message);
  ferry::egress::egress_proxy_options eo;
  eo.socket_dir = egress_sockets;
  eo.tokens = *sandbox_tokens;
  eo.internal_routes[ferry::ferryd::git_internal_host] = (*git)->socket();
  auto made_proxy = ferry::egress::make_egress_proxy(eo);
  if (!made_proxy)
    die("egress proxy: " + made_proxy.error().message);
  std::shared_ptr<ferry::egress::egress_proxy> proxy = std::move(*made_proxy);
  auto org_egress = ferry::gateway::org_egress_policy::load(
    **store, [proxy](const ferry::egress::egress_policy& p) { proxy->set_org_policy(p); });
  if (!org_egress)
    die("organisation egress policy: " + org_egress.error().message);
  // What a sandbox may reach: its task's environment's policy (else the default) and the
  // destinations users allowed for the task so far, read from the task's events when the
  // sandbox's socket is made (also when ferryd re-attaches it after a restart).
  auto egress_views = std::make_shared<ferry::actors::task_view_cache>(**store, 1024);
  auto policy_of = [&networks, &environments, default_policy](const std::string& env) {
    auto network = networks.find(env);
    return !env.empty() && environments.count(env) && network != networks.end() ? network->second : default_policy;
  };
  // Set once the warm pools exist (before any of them starts a sandbox).
  auto warm_of = std::make_shared<std::atomic<const ferryd::warm_pools*>>(nullptr);
  auto egress_for = [egress_views, policy_of, warm_of](const std::string& sandbox_id) {
    ferry::egress::sandbox_egress out{ferry::egress::egress_policy::none(), {}};
    auto task = ferry::actors::task_of_sandbox(sandbox_id);
    if (!task) {
      // A warm pool's: its environment's policy (the task's approvals come when it is taken).
      if (const auto* warm = warm_of->load())
        if (auto env = warm->environment_of(sandbox_id))
          out.policy = policy_of(*env);
      return out;  // else not a task's: no way out
    }
    auto view = egress_views->get(*task);
    if (!view || !*view) {
      std::fprintf(stderr, "ferryd: egress for sandbox %s: its task cannot be read (%s); no way out\n",
                   sandbox_id.c_str(), view ? "no such task" : view.error().message.c_str());
      return out;
    }
    out.policy = policy_of((*view)->environment);
    out.approvals = (*view)->egress.approvals;
    return out;
  };

  ferry::sandbox::runtime_config rc;
  rc.egress = ferry::egress::make_egress_binder(proxy, *sandbox_tokens, egress_for);
  rc.backend = *ferry::sandbox::parse_backend_choice(sandbox_runtime);  // checked by CLI11
  rc.runsc.runsc = runsc;
  rc.runsc.state_dir = data / "runsc";
  rc.runsc.ignore_cgroups = ignore_cgroups;
  rc.limits = sandbox_limits;
  rc.sandboxes_dir = data / "sandboxes";
  rc.rootfs = rootfs;
  rc.init_binary = init_binary.empty() ? self_dir() / "ferry-init" : fs::path(init_binary);
  auto runtime = ferry::sandbox::make_runtime(rc);
  if (!runtime)
    die("sandbox runtime: " + runtime.error().message);
  // The start-up line names the backend, and so does every sandbox's SandboxStateChanged.
  // Sandboxes an earlier ferryd left behind are re-attached or removed by the task manager's
  // recovery (start_task_manager).

  caf::actor_system_config cfg;
  ferry::actors::add_message_types(cfg);
  ferry::actors::use_ferry_scheduler(cfg);
  caf::actor_system sys{cfg};

  ferry::actors::task_deps deps;
  deps.store = store->get();
  deps.runtime = runtime->get();
  deps.limits = limits;
  deps.default_wall_clock = std::chrono::milliseconds(task_wall_clock_ms);
  deps.environments = environments;
  deps.layers = &layers;
  deps.allow_egress = [proxy](const std::string& sandbox_id, const std::string& destination) {
    return proxy->allow_for_sandbox(sandbox_id, destination);
  };
  deps.egress_destination = [](const std::string& destination) -> ferry::result<std::string> {
    auto pattern = ferry::egress::domain_pattern::parse(destination);
    if (!pattern)
      return ferry::fail(ferry::errc::invalid_argument, pattern.error().message);
    return pattern->to_string();
  };
  // Warm pools: per environment (its "warm_pool", else --warm-pool), and for tasks without one.
  std::vector<ferryd::warm_pools::entry> warm_entries{{"", std::nullopt, warm_pool}};
  for (const auto& [name, spec] : environments)
    warm_entries.push_back({name, spec, warm_sizes.count(name) ? warm_sizes.at(name) : warm_pool});
  ferryd::warm_pools warm(**runtime, &layers, std::move(warm_entries),
                          [proxy, egress_views](const std::string& sandbox_id, const std::string& task_id) {
                            // The task's approvals so far, for the sandbox it took.
                            auto view = egress_views->get(task_id);
                            if (view && *view)
                              for (const auto& d : (*view)->egress.approvals)
                                (void)proxy->allow_for_sandbox(sandbox_id, d);
                          });
  warm_of->store(&warm);
  deps.warm = &warm;
  deps.git = git->get();
  auto tasks = ferry::actors::start_task_manager(sys, deps);
  if (!tasks)
    die(tasks.error().message);
  // After the recovery above removed every sandbox an earlier ferryd left (idle ones of its
  // pools among them).
  if (auto r = warm.start(); !r)
    die(r.error().message);
  // Abort and steer arrive as requests on ferry.ctl.task.<id>.{abort,steer}, from any gateway.
  auto control = ferry::actors::start_task_control(**bus, **tasks);
  if (!control)
    die("task control subjects: " + control.error().message);

  auto tokens = ferry::gateway::token_registry::load(**store);
  if (!tokens)
    die(tokens.error().message);

  ferry::gateway::gateway_options go;
  go.host = host;
  go.port = port;
  ferry::gateway::gateway_deps gd{store->get(), bus->get(), tasks->get(), tokens->get(), &environments, &layers};
  gd.networks = &networks;
  gd.default_network = default_policy;
  gd.org_egress = org_egress->get();
  auto gw = ferry::gateway::start_gateway(go, gd);
  if (!gw)
    die(gw.error().message);
  // The first admin token is minted only once the API is up, so a failed start mints none.
  if ((*tokens)->size() == 0) {
    auto secret = (*tokens)->create("admin", true);
    if (!secret)
      die(secret.error().message);
    std::printf("ferryd: admin token: %s\n", secret->c_str());
    std::printf("ferryd: (shown once; only its hash is stored. More: POST /api/v1/tokens, or "
                "`ferryctl token create` while ferryd is stopped)\n");
  }
  auto shown_host = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  std::printf("ferryd: data in %s, NATS at %s%s, sandboxes: %s\n", data.c_str(),
              ferry::actors::redact_nats_url(nats.url).c_str(), nats.uses_tls() ? " (TLS)" : "",
              std::string((*runtime)->name()).c_str());
  std::printf("ferryd: sandbox root: %s\n", root_description.c_str());
  std::printf("ferryd: egress: default network %s, organisation policy %s\n", default_network.c_str(),
              (*org_egress)->current().to_json().dump().c_str());
  std::printf("ferryd: warm pools: %s\n", warm.describe().c_str());
  std::printf("ferryd: git: %s\n", (*git)->describe().c_str());
  for (const auto& [name, spec] : environments) {
    auto network = networks.count(name) ? networks.at(name) : default_policy;
    std::printf("ferryd: environment %s: %s, network %s (key %s)\n", name.c_str(),
                spec.setup_script.empty() ? "no setup script" : "setup script",
                std::string(ferry::egress::to_string(network.level)).c_str(),
                ferry::sandbox::environment_key(spec).substr(0, 12).c_str());
  }
  std::printf("ferryd: listening on http://%s:%u\n", shown_host.c_str(), (*gw)->port());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::printf("ferryd: %s received, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  std::fflush(stdout);

  // Order: stop accepting → end running sandboxes → flush the journal → stop NATS.
  (*gw)->stop();
  if (auto r = (*tasks)->shutdown(std::chrono::seconds(15)); !r)
    std::fprintf(stderr, "ferryd: warning: %s\n", r.error().message.c_str());
  gw->reset();
  control->reset();
  tasks->reset();
  sys.await_all_actors_done();
  if (auto r = (*store)->flush(); !r)
    std::fprintf(stderr, "ferryd: error: %s\n", r.error().message.c_str());
  // Let the relay hand the last events to NATS (bounded: a restart resumes from its cursor).
  if (!(*relay)->wait_for((*store)->last_position(), std::chrono::seconds(2)))
    std::fprintf(stderr, "ferryd: warning: %s; the next start publishes the rest\n",
                 (*relay)->stats().last_error.empty() ? "NATS did not acknowledge every event"
                                                       : (*relay)->stats().last_error.c_str());
  warm.stop();    // the idle sandboxes go; the tasks' have ended or were detached
  warm_of->store(nullptr);
  proxy->stop();  // nothing is relayed any more
  relay->reset();
  (void)(*bus)->flush(std::chrono::seconds(2));
  bus->reset();
  if (nats_child)
    nats_child->stop();
  store->reset();
  std::printf("ferryd: stopped\n");
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const fatal_error& e) {
    std::fprintf(stderr, "ferryd: fatal: %s\n", e.message.c_str());
    return 1;
  }
}
