#pragma once
// Opening a nats.c connection from `nats_options`: the one place where natsOptions are built, so
// the bus (nats_bus.cpp) and the outbox relay (outbox_relay.cpp) always authenticate and verify
// TLS the same way, whether the server is the embedded child or an external one. Private to
// actors/src; natsX_Verb names stay in this folder.
//
// Threading: free functions, safe from any thread.

#include <cstdint>
#include <string>
#include <string_view>

#include <nats/nats.h>

#include "ferry/actors/bus.h"
#include "ferry/schemas/result.h"

namespace ferry::actors::detail {

/// What may differ between ferryd's connections: tuning, never security.
struct connection_tuning {
  /// Appended to nats_options::client_name ("-outbox" for the relay).
  std::string name_suffix;
  /// Bytes nats.c buffers while reconnecting.
  int reconnect_buffer_bytes = 8 * 1024 * 1024;
  /// Write each publish to the socket at once instead of waiting for the flusher.
  bool send_asap = false;
  /// When the server cannot be reached (refused, timed out), return a connection that keeps
  /// trying in the background instead of failing. Refused credentials and TLS failures still
  /// fail at once: retrying cannot fix them.
  bool retry_when_unreachable = false;
};

/// Connects; the caller owns the connection (natsConnection_Destroy). Errors say what failed
/// (the URL redacted) and why, with nats.c's detail; they never contain a secret of `opts`.
[[nodiscard]] result<natsConnection*> open_connection(const nats_options& opts,
                                                      const connection_tuning& tuning);

/// `text` with every secret of `opts` (password, token, the secrets of its URL) replaced by
/// "***". Secrets shorter than 4 characters are left alone (they would garble the text).
std::string scrub_secrets(std::string text, const nats_options& opts);

/// "<what>: <status text>[: <nats.c's last error on this thread>]", scrubbed of `opts`' secrets.
error_info nats_failure(std::string_view what, natsStatus s, const nats_options& opts);

}  // namespace ferry::actors::detail
