// ferryd — the Ferry server. With no flags it runs everything on embedded defaults: the journal
// under ./var, a nats-server child on a free loopback port, the gVisor sandbox runtime, and the
// HTTP/WebSocket API on 127.0.0.1:8080.

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>
#include <caf/all.hpp>

#include "ferry/actors/bus.h"
#include "ferry/actors/outbox.h"
#include "ferry/actors/tasks.h"
#include "ferry/gateway/gateway.h"
#include "ferry/gateway/tokens.h"
#include "ferry/sandbox/sandbox.h"
#include "ferry/storage/journal.h"

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

fs::path self_dir() {
  std::error_code ec;
  auto exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::current_path() : exe.parent_path();
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"ferryd — the Ferry server (tasks in gVisor sandboxes, event-sourced)"};
  std::string listen = "127.0.0.1:8080";
  std::string data_dir = "./var";
  std::string nats_url;
  std::string nats_server = "nats-server";
  std::string runsc = "runsc";
  std::string rootfs;
  std::string init_binary;
  bool ignore_cgroups = false;
  bool no_fsync = false;
  ferry::actors::task_limits limits;
  app.add_option("--listen", listen, "HTTP/WebSocket address HOST:PORT (port 0: pick a free one)")
    ->capture_default_str();
  app.add_option("--data-dir", data_dir, "Where the journal, NATS store and sandboxes live")
    ->capture_default_str();
  app.add_option("--nats-url", nats_url,
                 "Use this NATS server instead of starting a nats-server child");
  app.add_option("--nats-server", nats_server, "nats-server binary for the embedded child")
    ->capture_default_str();
  app.add_option("--runsc", runsc, "gVisor runsc binary")->capture_default_str();
  app.add_option("--rootfs", rootfs,
                 "Read-only sandbox root filesystem (default: a read-only view of the host's /usr)");
  app.add_option("--init-binary", init_binary,
                 "ferry-init binary mounted into sandboxes (default: next to ferryd)");
  app.add_flag("--runsc-ignore-cgroups", ignore_cgroups,
               "Pass --ignore-cgroups to runsc (needed inside `ip netns exec`)");
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
  app.add_flag("--no-fsync", no_fsync,
               "Acknowledge appends before fsync; fsync every 100 ms instead (a machine crash may "
               "lose the last 100 ms of events; a ferryd crash loses nothing)");
  CLI11_PARSE(app, argc, argv);

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

  ferry::storage::journal_options jopts;
  jopts.dir = data / "journal";
  jopts.durability =
    no_fsync ? ferry::storage::durability::periodic : ferry::storage::durability::fsync;
  auto store = ferry::storage::open_journal(jopts);
  if (!store)
    die(store.error().message);

  std::unique_ptr<ferry::actors::embedded_nats> nats_child;
  if (nats_url.empty()) {
    auto child = ferry::actors::start_embedded_nats(nats_server, data / "nats");
    if (!child)
      die(child.error().message + " (install nats-server or pass --nats-url)");
    nats_child = std::move(*child);
    nats_url = nats_child->url();
  }
  auto bus = ferry::actors::connect_nats(nats_url);
  if (!bus)
    die(bus.error().message);
  // Every stored event reaches NATS through the relay (JetStream stream FERRY_EVENTS), in
  // journal order; actors never wait for NATS.
  ferry::actors::outbox_options oo;
  oo.nats_url = nats_url;
  auto relay = ferry::actors::start_outbox_relay(**store, oo);
  if (!relay)
    die("outbox relay: " + relay.error().message);

  ferry::sandbox::runsc_options ro;
  ro.runsc = runsc;
  ro.state_dir = data / "runsc";
  ro.sandboxes_dir = data / "sandboxes";
  ro.rootfs = rootfs;
  ro.init_binary = init_binary.empty() ? self_dir() / "ferry-init" : fs::path(init_binary);
  ro.ignore_cgroups = ignore_cgroups;
  auto runtime = ferry::sandbox::make_runsc_runtime(ro);
  if (!runtime)
    die("sandbox runtime: " + runtime.error().message);
  if (auto n = (*runtime)->cleanup_orphans(); !n)
    std::fprintf(stderr, "ferryd: warning: cleaning up orphaned sandboxes: %s\n",
                 n.error().message.c_str());
  else if (*n > 0)
    std::fprintf(stderr, "ferryd: removed %zu sandbox(es) left by an earlier run\n", *n);

  caf::actor_system_config cfg;
  ferry::actors::add_message_types(cfg);
  caf::actor_system sys{cfg};

  ferry::actors::task_deps deps{store->get(), runtime->get(), limits};
  auto tasks = ferry::actors::start_task_manager(sys, deps);
  if (!tasks)
    die(tasks.error().message);
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
  auto gw = ferry::gateway::start_gateway(
    go, {store->get(), bus->get(), tasks->get(), tokens->get()});
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
  std::printf("ferryd: data in %s, NATS at %s, sandboxes: %s\n", data.c_str(), nats_url.c_str(),
              std::string((*runtime)->name()).c_str());
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
