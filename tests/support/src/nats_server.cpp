#include "ferry/test_support/nats_server.h"

#include <signal.h>

#include <fstream>
#include <stdexcept>
#include <thread>

#include "ferry/test_support/processes.h"

namespace ferry::test {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

void openssl(const std::vector<std::string>& args) {
  std::vector<std::string> argv{"openssl"};
  argv.insert(argv.end(), args.begin(), args.end());
  program_run run = run_program(argv, 30s);
  if (!run.status.ok()) {
    std::string line;
    for (const auto& a : argv)
      line += a + " ";
    throw std::runtime_error("test_pki: " + line + "failed: " + run.summary() + " " + run.out);
  }
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out)
    throw std::runtime_error("cannot write " + path.string());
}

/// A self-signed CA certificate and its key.
void make_ca(const fs::path& cert, const fs::path& key, const std::string& name) {
  openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", key.string(), "-out", cert.string(), "-days", "2", "-subj", "/CN=" + name,
           "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
           "keyUsage=critical,keyCertSign,cRLSign"});
}

/// A certificate for `subject` signed by the CA, with the extensions in `extensions`.
void issue(const fs::path& dir, const std::string& name, const std::string& subject,
           const std::string& extensions, const fs::path& ca_cert, const fs::path& ca_key) {
  const fs::path key = dir / (name + ".key"), csr = dir / (name + ".csr"),
                 ext = dir / (name + ".ext"), cert = dir / (name + ".pem");
  openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
           key.string(), "-out", csr.string(), "-subj", subject});
  write_file(ext, extensions);
  static int serial = 1000;
  openssl({"x509", "-req", "-in", csr.string(), "-CA", ca_cert.string(), "-CAkey",
           ca_key.string(), "-set_serial", std::to_string(++serial), "-days", "2", "-out",
           cert.string(), "-extfile", ext.string()});
}

/// The port in "Listening for client connections on HOST:PORT", or 0.
uint16_t logged_port(const std::string& log) {
  static constexpr std::string_view marker = "Listening for client connections on ";
  auto at = log.find(marker);
  if (at == std::string::npos)
    return 0;
  auto eol = log.find('\n', at);
  if (eol == std::string::npos)
    return 0;
  auto line = log.substr(at + marker.size(), eol - at - marker.size());
  auto colon = line.rfind(':');
  if (colon == std::string::npos)
    return 0;
  try {
    return static_cast<uint16_t>(std::stoul(line.substr(colon + 1)));
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace

test_pki::test_pki(const fs::path& dir) {
  fs::create_directories(dir);
  ca_cert = dir / "ca.pem";
  ca_key = dir / "ca.key";
  make_ca(ca_cert, ca_key, "ferry-test-ca");
  issue(dir, "server", "/CN=localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        ca_cert, ca_key);
  server_cert = dir / "server.pem";
  server_key = dir / "server.key";
  issue(dir, "client", "/CN=ferry-test-client",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
        ca_cert, ca_key);
  client_cert = dir / "client.pem";
  client_key = dir / "client.key";
  other_ca_cert = dir / "other-ca.pem";
  make_ca(other_ca_cert, dir / "other-ca.key", "ferry-test-other-ca");
}

std::string nats_config_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\')
      out.push_back('\\');
    out.push_back(c);
  }
  return out + "\"";
}

nats_server::nats_server(const std::string& config_body) : dir_("ferry-nats") {
  const fs::path config = dir_.path() / "nats.conf";
  const fs::path log_path = dir_.path() / "nats.log";
  write_file(config, "listen: \"127.0.0.1:-1\"\n"
                     "jetstream {\n  store_dir: " +
                       nats_config_string((dir_.path() / "js").string()) +
                       "\n}\n"
                       "log_file: " +
                       nats_config_string(log_path.string()) + "\n" + config_body + "\n");
  sandbox::spawn_options o;
  o.argv = {"nats-server", "-c", config.string()};
  o.out = sandbox::stdio::null;
  o.err = sandbox::stdio::null;
  auto spawned = sandbox::child_process::spawn(o);
  if (!spawned)
    throw std::runtime_error("cannot start nats-server: " + spawned.error().message);
  child_.emplace(std::move(*spawned));
  const bool up = eventually(
    [&] {
      port_ = logged_port(log());
      return port_ != 0 || child_->try_wait().has_value();
    },
    15s);
  if (!up || port_ == 0) {
    const std::string log_text = log();
    child_->terminate(2s);
    child_.reset();
    throw std::runtime_error("nats-server did not start with config:\n" +
                             sandbox::read_small_file(config) + "\nits log:\n" + log_text);
  }
}

nats_server::~nats_server() {
  if (child_)
    child_->terminate(5s);
}

std::string nats_server::url(const std::string& scheme, const std::string& host) const {
  return scheme + "://" + host + ":" + std::to_string(port_);
}

std::string nats_server::log() const {
  return sandbox::read_small_file(dir_.path() / "nats.log");
}

}  // namespace ferry::test
