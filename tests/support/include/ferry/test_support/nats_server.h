#pragma once
// ferry::test::nats_server — a real nats-server configured by the test (authentication, TLS),
// with JetStream, on a free loopback port, stopped and reaped with the object; and test_pki, a
// throw-away certificate authority with server and client certificates made with the openssl
// CLI at run time (nothing is committed).
//
// Threading: values owned by one thread.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "ferry/sandbox/process.h"
#include "ferry/test_support/temp_dir.h"

namespace ferry::test {

/// Certificates for one test, in a directory of their own. Throws std::runtime_error (with
/// openssl's output) if they cannot be made.
struct test_pki {
  explicit test_pki(const std::filesystem::path& dir);

  std::filesystem::path ca_cert, ca_key;
  /// Issued by the CA for DNS:localhost and IP:127.0.0.1 (server authentication).
  std::filesystem::path server_cert, server_key;
  /// Issued by the CA to CN=ferry-test-client (client authentication).
  std::filesystem::path client_cert, client_key;
  /// A second CA that issued nothing here: trusting it must not verify the server.
  std::filesystem::path other_ca_cert;
};

/// A quoted nats-server config string ("a\"b" style), for paths and secrets.
std::string nats_config_string(const std::string& s);

class nats_server {
 public:
  /// Starts `nats-server -c <config>` where the config is `config_body` (e.g. an
  /// `authorization {...}` and a `tls {...}` block) plus what this adds: listen on 127.0.0.1 with
  /// a free port, JetStream under the server's own temp dir, a log file. Waits until it
  /// listens. Throws std::runtime_error with its log if it does not start within 15 s.
  explicit nats_server(const std::string& config_body);
  ~nats_server();
  nats_server(const nats_server&) = delete;
  nats_server& operator=(const nats_server&) = delete;

  uint16_t port() const { return port_; }
  /// `<scheme>://<host>:<port>`.
  std::string url(const std::string& scheme = "nats", const std::string& host = "127.0.0.1") const;
  /// Its log so far.
  std::string log() const;
  const std::filesystem::path& dir() const { return dir_.path(); }

 private:
  temp_dir dir_;
  std::optional<sandbox::child_process> child_;
  uint16_t port_ = 0;
};

}  // namespace ferry::test
