#pragma once
// The outbox relay: carries every event of the journal to a JetStream stream, in journal order.
//
// The journal is the source of truth; NATS is the transport. The relay tails the journal's global
// log (storage::event_store::subscribe) from a persisted cursor and publishes each event to
// `ferry.ev.<kind>.<id>` (event_subject) with the JetStream message id `<stream>:<seq>`, so the
// server de-duplicates re-sends, and with the previous event's id as the expected last message
// id, so a stale re-send after a connection loss cannot be stored out of order. Publishing is
// pipelined (up to 4096 events in flight); the cursor advances as JetStream's acknowledgements
// arrive, in order. Any refusal, lost acknowledgement or timeout makes the relay start over
// from the cursor; a lost connection does so at once (nothing in flight can be acknowledged any
// more), and nothing is published until the client has reconnected, so a restarted server gets
// the backlog straight away instead of after `ack_wait` and a timed-out stream request. The
// cursor is saved in the journal's snapshot store (stream `outbox-<js stream>`) at most every
// `cursor_save_interval`, so a restart re-sends at most that much (de-duplicated by the server
// within its duplicate window, and by subscribers on (stream, seq) beyond it).
//
// Actors never wait for the relay: with NATS down they keep persisting, the relay waits for the
// reconnect and then catches up. Core NATS subscribers of `ferry.ev.…` (the
// gateway's streamers) receive the same messages, since a JetStream publish is a NATS publish.
//
// Threading: start_outbox_relay starts one thread that does all the work; stats() and wait_for()
// are thread-safe. Destroying the relay stops that thread (finishing or abandoning the batch in
// flight within ack_wait) and saves the cursor.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "ferry/actors/bus.h"
#include "ferry/schemas/result.h"
#include "ferry/storage/journal.h"

namespace ferry::actors {

/// NATS subject of a stream's events: `task-7f3a` → `ferry.ev.task.7f3a`, `tokens` →
/// `ferry.ev.tokens`. Characters NATS reserves in subjects ('.', '*', '>') in the id become '_'.
std::string event_subject(std::string_view stream_id);

struct outbox_options {
  /// The server and credentials: the same options as the bus's connection (embedded child or
  /// external server; same code path). The relay opens its own connection from them.
  nats_options nats;
  /// Shorthand for callers that need nothing but a URL: used as `nats.url` when that is empty.
  /// Setting both is refused.
  std::string nats_url;
  /// The JetStream stream; created (file storage, subjects `ferry.ev.>`) or updated at start.
  std::string jetstream_stream = "FERRY_EVENTS";
  /// How long JetStream keeps events (the journal keeps them for good).
  std::chrono::hours max_age{24 * 7};
  /// JetStream's duplicate window for message ids.
  std::chrono::seconds duplicate_window{120};
  /// Events read from the journal at a time.
  size_t batch = 1024;
  /// How long the relay waits, while events are in flight, for the next acknowledgement before
  /// it starts over from the cursor (a slow server that keeps acknowledging is not stuck).
  std::chrono::milliseconds ack_wait{5000};
  /// How often the cursor is saved while events flow.
  std::chrono::milliseconds cursor_save_interval{250};
};

struct outbox_stats {
  /// Global position up to which every event is acknowledged by JetStream.
  uint64_t cursor = 0;
  /// Events acknowledged since start.
  uint64_t published = 0;
  /// Times the relay started over from its cursor (NATS down, timeouts, refusals).
  uint64_t retries = 0;
  /// The last error seen; empty when the last batch went through.
  std::string last_error;
};

class outbox_relay {
 public:
  virtual ~outbox_relay() = default;

  virtual outbox_stats stats() const = 0;

  /// Waits until every event up to `position` is acknowledged by JetStream. False on timeout.
  virtual bool wait_for(uint64_t position, std::chrono::milliseconds timeout) = 0;
};

/// Starts the relay over `store` (which must outlive it). Does not wait for NATS: if the server
/// is unreachable the relay keeps trying in the background. Inconsistent options, refused
/// credentials and TLS failures are errors at once (retrying cannot fix them).
[[nodiscard]] result<std::unique_ptr<outbox_relay>> start_outbox_relay(
  storage::event_store& store, const outbox_options& opts);

}  // namespace ferry::actors
