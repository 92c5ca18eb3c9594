// ferryd against an external NATS that demands a password and mutual TLS: it starts with the
// --nats-* flags, answers /healthz, its outbox relay publishes its first event (the admin token
// it mints) into JetStream, and the password is nowhere in its command line or output. Bad flag
// combinations and unreadable files end ferryd at start-up with a message (exit code 1, never a
// crash), and a wrong password is a clear refusal that does not contain the password.
#define BOOST_TEST_MODULE actors_ferryd_nats
#include <boost/test/unit_test.hpp>

#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/actors/bus.h"
#include "ferry/schemas/events.h"
#include "ferry/sandbox/process.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/nats_server.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"

namespace fs = std::filesystem;
namespace ev = ferry::events::v1;
using namespace ferry::test;
using namespace std::chrono_literals;

namespace {

const std::string password = "pw-ferryd-K3mW9xQz7";

/// A password+mutual-TLS NATS server, its certificates and a password file, for one test.
struct secured_nats {
  temp_dir dir{"ferry-ferryd-nats"};
  test_pki pki{dir.path() / "pki"};
  nats_server server{"authorization {\n  user: \"ferryd\"\n  password: " +
                     nats_config_string(password) + "\n}\ntls {\n  cert_file: " +
                     nats_config_string(pki.server_cert.string()) + "\n  key_file: " +
                     nats_config_string(pki.server_key.string()) + "\n  ca_file: " +
                     nats_config_string(pki.ca_cert.string()) + "\n  verify: true\n}\n"};
  fs::path password_file = dir.path() / "nats-password";

  secured_nats() {
    std::ofstream(password_file) << password << "\n";
    ::chmod(password_file.c_str(), 0600);
  }

  ferry::actors::nats_options client_options() const {
    ferry::actors::nats_options o;
    o.url = server.url();
    o.user = "ferryd";
    o.password = password;
    o.tls_ca_file = pki.ca_cert;
    o.tls_cert_file = pki.client_cert;
    o.tls_key_file = pki.client_key;
    return o;
  }

  /// Every NATS flag ferryd needs for this server (the password by file).
  std::vector<std::string> flags() const {
    return {"--nats-url",      server.url(),         "--nats-user",
            "ferryd",          "--nats-password-file", password_file.string(),
            "--nats-tls",      "--nats-tls-ca",      pki.ca_cert.string(),
            "--nats-tls-cert", pki.client_cert.string(), "--nats-tls-key",
            pki.client_key.string()};
  }
};

/// Envelopes that arrive on ferry.ev.> (core NATS: JetStream publishes are NATS publishes).
struct event_collector {
  std::mutex mtx;
  std::condition_variable cv;
  std::vector<ev::Event> types;

  bool wait_for(ev::Event type, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mtx);
    return cv.wait_for(lock, timeout, [&] {
      return std::find(types.begin(), types.end(), type) != types.end();
    });
  }
};

/// Messages JetStream holds in FERRY_EVENTS (asked over the bus, JetStream's JSON API), or -1.
long stream_messages(ferry::actors::bus& bus) {
  auto answer = bus.request("$JS.API.STREAM.INFO.FERRY_EVENTS", "", 5s);
  if (!answer)
    return -1;
  auto j = nlohmann::json::parse(*answer, nullptr, false);
  if (!j.is_object() || !j.contains("state"))
    return -1;
  return j["state"].value("messages", -1L);
}

/// ferryd with `args` (plus a fresh --data-dir and --listen), expected to refuse to start.
program_run run_ferryd_expecting_refusal(const std::vector<std::string>& args) {
  temp_dir data("ferryd-refused");
  std::vector<std::string> argv{FERRYD_BINARY, "--listen", "127.0.0.1:0", "--data-dir",
                                (data.path() / "data").string()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_program(argv, 60s);
}

void check_refused(const std::vector<std::string>& args, const std::string& expected) {
  std::string line;
  for (const auto& a : args)
    line += a + " ";
  program_run run = run_ferryd_expecting_refusal(args);
  BOOST_TEST(!run.timed_out, line << ": ferryd did not exit");
  BOOST_TEST(run.status.signal == 0, line << ": ferryd crashed: " << run.summary());
  BOOST_TEST(run.status.exit_code == 1, line << ": " << run.summary());
  BOOST_TEST(run.err.find(expected) != std::string::npos,
             line << ": expected '" << expected << "' in: " << run.err);
  BOOST_TEST((run.out + run.err).find(password) == std::string::npos,
             line << ": the password is in ferryd's output");
}

}  // namespace

BOOST_AUTO_TEST_CASE(ferryd_uses_an_external_nats_with_password_and_mutual_tls) {
  secured_nats nats;
  auto observer = ferry::actors::connect_nats(nats.client_options());
  BOOST_TEST_REQUIRE(observer.ok(), (observer.ok() ? "" : observer.error().message));
  event_collector events;
  auto sub = (*observer)->subscribe("ferry.ev.>", [&](std::string_view, std::string_view data) {
    const std::string bytes(data);  // aligned, as FlatBuffers needs (a NATS payload is not)
    auto env = ferry::schemas::verify_envelope(bytes);
    if (!env)
      return;
    std::lock_guard<std::mutex> guard(events.mtx);
    events.types.push_back((*env)->event_type());
    events.cv.notify_all();
  });
  BOOST_TEST_REQUIRE(sub.ok());

  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = nats.flags();
  ferryd_process ferryd(opts);
  api_client api(ferryd);
  http_response health = api.healthz();
  BOOST_TEST(health.status == 200, health.summary());

  // Its first start mints the admin token: an event, relayed over the TLS+password connection.
  BOOST_TEST(events.wait_for(ev::Event::TokenCreated, 30s),
             "no token_created on ferry.ev.> within 30 s; ferryd said:\n" << ferryd.output());
  BOOST_TEST(eventually([&] { return stream_messages(**observer) >= 1; }, 30s),
             "FERRY_EVENTS holds " << stream_messages(**observer) << " messages");
  // It started no nats-server of its own.
  BOOST_TEST(processes_with_cmdline_containing(ferryd.data_dir().string() + "/nats").empty());

  // The password is in neither its command line (what ps shows) nor anything it printed; the
  // URL it prints is the server's.
  const std::string cmdline =
    ferry::sandbox::read_small_file("/proc/" + std::to_string(ferryd.pid()) + "/cmdline");
  BOOST_TEST_REQUIRE(!cmdline.empty());
  BOOST_TEST(cmdline.find("--nats-password-file") != std::string::npos);
  BOOST_TEST(cmdline.find(password) == std::string::npos, "the password is in ferryd's argv");
  BOOST_TEST(ferryd.output().find("NATS at " + nats.server.url() + " (TLS)") != std::string::npos,
             ferryd.output());
  ferryd.stop();
  BOOST_TEST(ferryd.output().find(password) == std::string::npos,
             "the password is in ferryd's output");
}

BOOST_AUTO_TEST_CASE(the_password_may_come_from_the_environment) {
  secured_nats nats;
  std::vector<std::string> flags;
  for (const auto& f : nats.flags())
    flags.push_back(f);
  // Drop "--nats-password-file FILE"; the password comes from FERRY_NATS_PASSWORD instead.
  auto at = std::find(flags.begin(), flags.end(), "--nats-password-file");
  flags.erase(at, at + 2);
  ::setenv("FERRY_NATS_PASSWORD", password.c_str(), 1);
  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = flags;
  std::unique_ptr<ferryd_process> ferryd;
  try {
    ferryd = std::make_unique<ferryd_process>(opts);
  } catch (...) {
    ::unsetenv("FERRY_NATS_PASSWORD");
    throw;
  }
  ::unsetenv("FERRY_NATS_PASSWORD");
  BOOST_TEST(api_client(*ferryd).healthz().status == 200);
  ferryd->stop();
  BOOST_TEST(ferryd->output().find(password) == std::string::npos);

  // Without it (and without a file) --nats-user is refused.
  check_refused(flags, "--nats-user needs a password");
}

BOOST_AUTO_TEST_CASE(bad_nats_flags_end_ferryd_with_a_message) {
  secured_nats nats;
  const std::string url = nats.server.url();
  const std::string pw = nats.password_file.string();
  const std::string missing = (nats.dir.path() / "missing.pem").string();
  check_refused({"--nats-url", url, "--nats-tls-cert", nats.pki.client_cert.string()},
                "certificate needs its key");
  check_refused({"--nats-url", url, "--nats-tls-key", nats.pki.client_key.string()},
                "key needs its certificate");
  check_refused({"--nats-url", url, "--nats-tls-ca", missing}, missing + ": No such file");
  check_refused({"--nats-url", url, "--nats-user", "ferryd", "--nats-password-file", missing},
                "--nats-password-file " + missing + ": no such file");
  check_refused({"--nats-url", url, "--nats-password-file", pw}, "needs --nats-user");
  check_refused({"--nats-url", url, "--nats-user", "ferryd", "--nats-password-file", pw,
                 "--nats-token-file", pw},
                "more than one NATS authentication method");
  check_refused({"--nats-user", "ferryd", "--nats-password-file", pw}, "need --nats-url");
  check_refused({"--nats-tls"}, "need --nats-url");

  // A wrong password against the real server: refused at start-up, without the password.
  const fs::path wrong = nats.dir.path() / "wrong-password";
  std::ofstream(wrong) << "wrong-" << password << "\n";
  std::vector<std::string> flags = nats.flags();
  auto at = std::find(flags.begin(), flags.end(), pw);
  *at = wrong.string();
  program_run run = run_ferryd_expecting_refusal(flags);
  BOOST_TEST(run.status.exit_code == 1, run.summary());
  BOOST_TEST(run.err.find("connect to NATS at " + url) != std::string::npos, run.err);
  BOOST_TEST(run.err.find("uthoriz") != std::string::npos, run.err);
  BOOST_TEST((run.out + run.err).find(password) == std::string::npos, run.err);

  // Without the client certificate the server (verify: true) refuses the TLS handshake.
  flags = nats.flags();
  auto cert = std::find(flags.begin(), flags.end(), "--nats-tls-cert");
  flags.erase(cert, cert + 4);  // --nats-tls-cert F --nats-tls-key F
  run = run_ferryd_expecting_refusal(flags);
  BOOST_TEST(run.status.exit_code == 1, run.summary());
  BOOST_TEST(run.err.find("connect to NATS at " + url) != std::string::npos, run.err);
}
