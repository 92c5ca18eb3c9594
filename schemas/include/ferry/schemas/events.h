#pragma once
// ferry_schemas public header: build, verify and render ferry.events.v1 envelopes.
//
// An event travels as the bytes of one finished `Envelope` FlatBuffer (see schemas/events.fbs).
// Writers build it with `build_envelope` (sequence, position and timestamp left 0 but present so
// the journal can set them in place), the journal stamps and stores it, and readers verify it with
// `verify_envelope` before touching it.
//
// Threading: free functions, thread-safe.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ferry/schemas/events_generated.h"
#include "ferry/schemas/result.h"

namespace ferry::schemas {

namespace ev = ferry::events::v1;

/// The schema version writers write (see Envelope.schema_version in events.fbs).
inline constexpr uint16_t current_schema_version = 2;

/// Size of Envelope.prev_hash (SHA-256).
inline constexpr size_t hash_size = 32;

/// Bookkeeping a writer supplies for an event; the journal adds sequence, position, time and the
/// hash link.
struct envelope_meta {
  std::string stream_id;
  std::string correlation_id;
  std::string causation_id;
  std::string user;
  /// Unique within the stream; empty: build_envelope makes one (random_event_id).
  std::string event_id{};
  /// Only tests and migrations write anything but the current version.
  uint16_t schema_version = current_schema_version;
};

/// A new event id: 32 lowercase hex digits — 48 bits of Unix milliseconds, a 16-bit per-thread
/// counter, 64 random bits. Unique, and increasing among the ids one thread makes; not a secret.
std::string random_event_id();

/// Builds a finished Envelope. `make_event(fbb)` creates the event table and returns
/// `{ev::Event::X, offset.Union()}`.
template <class MakeEvent>
std::string build_envelope(const envelope_meta& meta, MakeEvent&& make_event) {
  flatbuffers::FlatBufferBuilder fbb(256);
  auto stream = fbb.CreateString(meta.stream_id);
  auto corr = fbb.CreateString(meta.correlation_id);
  auto cause = fbb.CreateString(meta.causation_id);
  auto user = fbb.CreateString(meta.user);
  auto id = fbb.CreateString(meta.event_id.empty() ? random_event_id() : meta.event_id);
  // Zeroed placeholder the journal overwrites in place with the hash of the previous event.
  const uint8_t zero_hash[hash_size] = {};
  auto prev = fbb.CreateVector(zero_hash, hash_size);
  auto [type, body] = make_event(fbb);
  ev::EnvelopeBuilder b(fbb);
  // Force the journal-stamped scalars to be present so they can be mutated in place.
  fbb.ForceDefaults(true);
  b.add_sequence(0);
  b.add_position(0);
  b.add_timestamp_ns(0);
  b.add_schema_version(meta.schema_version);
  fbb.ForceDefaults(false);
  b.add_event_id(id);
  b.add_prev_hash(prev);
  b.add_stream_id(stream);
  b.add_correlation_id(corr);
  b.add_causation_id(cause);
  b.add_user(user);
  b.add_event_type(type);
  b.add_event(body);
  ev::FinishEnvelopeBuffer(fbb, b.Finish());
  return std::string(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize());
}

// -- convenience builders for each event of ferry.events.v1 ---------------------------------------

/// `wall_clock_limit_ms`: the limit in force for the task (0: none); `environment` and its key
/// (empty: none); see TaskSubmitted.
std::string task_submitted(const envelope_meta& m, std::string_view task_id,
                           std::string_view command, std::string_view repo,
                           uint64_t wall_clock_limit_ms = 0, std::string_view environment = {},
                           std::string_view environment_key = {});
std::string task_state_changed(const envelope_meta& m, ev::TaskStatus from, ev::TaskStatus to,
                               std::string_view reason);
/// `runtime_id`: the runtime's id when it differs from `sandbox_id` (a warm-pool sandbox).
std::string sandbox_state_changed(const envelope_meta& m, std::string_view sandbox_id,
                                  std::string_view backend, ev::SandboxStatus from,
                                  ev::SandboxStatus to, std::string_view reason,
                                  std::string_view runtime_id = {});
std::string command_started(const envelope_meta& m, uint32_t command_id,
                            const std::vector<std::string>& argv);
/// `gap` > 0: that many bytes of the stream were lost here (then `data` is empty).
std::string output_chunk(const envelope_meta& m, uint32_t command_id, ev::OutputStream stream,
                         std::string_view data, uint64_t gap = 0);
std::string command_exited(const envelope_meta& m, uint32_t command_id, int32_t exit_code,
                           int32_t signal, uint64_t duration_ms);
std::string abort_requested(const envelope_meta& m, std::string_view reason);
std::string task_finished(const envelope_meta& m, ev::TaskStatus status, int32_t exit_code,
                          std::string_view reason);
std::string task_queued(const envelope_meta& m, uint32_t position, uint32_t running,
                        uint32_t limit, std::string_view reason);
std::string steering_comment(const envelope_meta& m, std::string_view text);
/// A persistent actor recovered and took over its stream (fences out older incarnations).
std::string actor_recovered(const envelope_meta& m, uint32_t incarnation,
                            uint64_t snapshot_sequence, uint64_t replayed,
                            std::string_view reason);
/// A state machine ("task", "session", "sandbox") refused a transition.
std::string transition_refused(const envelope_meta& m, std::string_view machine,
                               std::string_view from, std::string_view to,
                               std::string_view reason);
std::string task_interrupted(const envelope_meta& m, std::string_view reason, bool resumable);
std::string turn_started(const envelope_meta& m, uint32_t turn, std::string_view input,
                         std::string_view sandbox_id, const std::vector<uint64_t>& steering);
std::string turn_ended(const envelope_meta& m, uint32_t turn, std::string_view outcome,
                       uint64_t input_tokens, uint64_t output_tokens);
std::string session_closed(const envelope_meta& m, std::string_view reason);
/// A limit was reached. `limit` in the kind's unit (see LimitReached in events.fbs);
/// `command_id` 0 when not about a command.
std::string limit_reached(const envelope_meta& m, ev::LimitKind kind, uint64_t limit,
                          uint32_t command_id, bool whole_sandbox, std::string_view detail);
/// What EgressDecision records (see events.fbs).
struct egress_decision_fields {
  std::string sandbox_id;
  std::string host;
  uint16_t port = 0;
  std::string method;
  bool allowed = false;
  std::string rule;
  bool approvable = false;
  uint64_t bytes_up = 0;
  uint64_t bytes_down = 0;
  uint64_t duration_ms = 0;
};
std::string egress_decision(const envelope_meta& m, const egress_decision_fields& d);
std::string egress_approved(const envelope_meta& m, std::string_view destination, std::string_view sandbox_id);
/// What GitOperation records (see events.fbs).
struct git_operation_fields {
  std::string sandbox_id;
  std::string repo;
  std::string service;            ///< "upload-pack" or "receive-pack"
  bool advertisement = false;
  uint8_t protocol_version = 0;
  std::vector<std::string> refs;  ///< "<ref> <old oid> <new oid>" per update
  std::string result;             ///< "ok", "refused", "upstream_error"
  std::string reason;
  uint16_t http_status = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t duration_ms = 0;
};
std::string git_operation(const envelope_meta& m, const git_operation_fields& g);
std::string egress_policy_set(const envelope_meta& m, std::string_view policy_json);
std::string token_created(const envelope_meta& m, std::string_view token_id,
                          std::string_view name, std::string_view sha256_hex, bool admin);

// -- reading ---------------------------------------------------------------------------------------

/// Verifies `bytes` as an Envelope (FlatBuffers verifier, identifier, a known event type).
/// Returns the envelope (pointing into `bytes`) or an error saying what is wrong.
result<const ev::Envelope*> verify_envelope(std::span<const uint8_t> bytes);
inline result<const ev::Envelope*> verify_envelope(std::string_view bytes) {
  return verify_envelope(
    std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
}

/// Rewrites an older-version envelope in `bytes` to the current schema version in place (the
/// bytes must already have passed verify_envelope). Current-version bytes are left untouched.
/// Fails for a version newer than this build knows (written by a newer ferry).
///   1 → 2: SandboxStateChanged `running` becomes `executing`.
result<void> upcast_envelope(std::string& bytes);

/// `ns` (since the Unix epoch) as UTC ISO 8601 with milliseconds: 2026-11-26T21:15:32.756Z.
std::string iso_time(int64_t ns);

/// Stable snake_case name of an event type ("task_submitted", …).
std::string_view event_type_name(ev::Event type);
std::string_view to_string(ev::TaskStatus s);
std::string_view to_string(ev::SandboxStatus s);
/// "memory", "pids", "disk_quota", "command_timeout", "task_wall_clock", "output".
std::string_view to_string(ev::LimitKind k);

/// JSON rendering used by the WebSocket stream and `ferryctl --json`:
/// {"stream","seq","position","time","type","correlation_id","causation_id","user","data":{...}}.
/// Byte payloads are given as "text" when valid UTF-8, else as "base64".
nlohmann::json to_json(const ev::Envelope& e);

/// One-line human rendering for `ferryctl events show`.
std::string to_text(const ev::Envelope& e);

}  // namespace ferry::schemas
