#pragma once
// ferry_storage public header: the event journal.
//
// The journal stores ferry.events.v1 envelopes (schemas/events.fbs) in streams named
// `<kind>-<id>` (task-…, session-…, sandbox-…, user-…) or a bare kind (`tokens`).
//
// Guarantees:
//  - Per-stream sequences start at 1 and have no gaps; a global position (1, 2, …) orders every
//    event of the store. Positions of deleted events are not reused.
//  - An append carries an expected version (any, no stream, exact); a mismatch is an
//    errc::conflict error that writes nothing. The events of one append are atomic: a reader
//    sees all of them or none, and a crash keeps all or none.
//  - Idempotent by event id: re-appending a batch whose event ids the stream already holds (same
//    ids, same order) acknowledges the original append and writes nothing. A batch mixing known
//    and new ids is a conflict. (Ids of deleted events are forgotten with them.)
//  - Durability (journal_options::durability): `fsync` (default) acknowledges only after the
//    write-ahead log is fsynced; concurrent appends share one fsync (group commit).
//  - Tamper evidence: each stream is a SHA-256 hash chain. The journal stamps into every event the
//    hash of the previous event's stored bytes (Envelope.prev_hash) and records each event's own
//    hash in its global index entry. verify() names the first event whose bytes no longer match
//    what was recorded or what its successor committed to. Removing a stream's newest events
//    together with their index entries is only visible against an externally recorded head hash
//    (stream_info::head_hash; ferryctl prints it).
//  - Every record read passes the FlatBuffers verifier; corrupt bytes are an errc::corrupt error
//    naming the stream, sequence and (when known) position, never a crash. Readers get events
//    upcast to the current schema version (schemas::upcast_envelope); verify() checks the bytes
//    as stored.
//
// Threading and ownership:
//  - `event_store` is thread-safe: every function may be called from any thread.
//  - One process owns a data directory (RocksDB's lock; a second open fails with errc::busy).
//    Other processes read through open_journal_secondary (ferryctl), which never writes.
//  - One live writer per stream: while a process owns the directory, exactly one actor (the
//    stream's owner) appends to a stream, with exact expected versions; the journal's version
//    check is what fences out a stale writer. Appends to different streams run concurrently.
//  - All writes (appends, deletions) are applied in order by one internal commit thread, which
//    groups whatever is queued into one RocksDB write; a sync thread fsyncs the log once for every
//    group written meanwhile, then publishes and answers. append_async's callback runs on one of
//    these internal threads: it must be short and must not block (the blocking append() called
//    from it fails instead of deadlocking); queueing another append_async from it is fine.
//  - A `subscription` is used by one thread at a time; close() may be called from any thread. It
//    must not outlive its event_store.
//  - Readers (and subscriptions) see the published state: an event becomes visible when it is
//    durable and acknowledged, never before (the commit thread writes ahead of the fsync).

#include <array>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::events::v1 {
struct Envelope;
}

namespace ferry::storage {

/// SHA-256 digest (hash chain links and heads).
using digest = std::array<uint8_t, 32>;

/// Lowercase hex of a digest.
std::string to_hex(const digest& d);

/// What the writer expects the stream's highest sequence to be before an append.
struct expected_version {
  enum class kind { any, no_stream, exact };
  kind k = kind::any;
  uint64_t sequence = 0;

  static expected_version any() { return {}; }
  static expected_version no_stream() { return {kind::no_stream, 0}; }
  static expected_version exact(uint64_t seq) { return {kind::exact, seq}; }
};

/// Where an append landed.
struct append_result {
  uint64_t first_sequence = 0;
  uint64_t last_sequence = 0;
  uint64_t first_position = 0;
  uint64_t last_position = 0;
  /// True when the batch had been appended before (same event ids) and nothing was written; the
  /// sequences and positions are those of the original append.
  bool duplicate = false;
};

/// A range of a stream to read: sequences in [from, to], at most max_count of them.
struct read_range {
  uint64_t from = 1;
  uint64_t to = std::numeric_limits<uint64_t>::max();
  uint64_t max_count = std::numeric_limits<uint64_t>::max();
};

/// What the journal knows about a stream without reading its events.
struct stream_info {
  /// Highest sequence ever appended; 0 for an unknown stream. Never decreases, even when events
  /// are deleted.
  uint64_t highest_sequence = 0;
  /// Events 1..deleted_to were deleted (retention); 0 when none were.
  uint64_t deleted_to = 0;
  /// Hash of the stored bytes of event `highest_sequence` (all zero for an unknown stream). An
  /// auditor who records it can later prove the stream was not rewritten.
  digest head_hash{};
};

/// A stored snapshot of an actor's state.
struct snapshot {
  std::string stream;
  /// The sequence of the last event the state includes.
  uint64_t sequence = 0;
  /// When the state was taken, nanoseconds since the Unix epoch (set by the saver).
  int64_t timestamp_ns = 0;
  /// The state, opaque to the journal.
  std::string data;
};

/// Which snapshots a load or range delete considers: sequence and time within the bounds
/// (inclusive).
struct snapshot_criteria {
  uint64_t max_sequence = std::numeric_limits<uint64_t>::max();
  int64_t max_timestamp_ns = std::numeric_limits<int64_t>::max();
  uint64_t min_sequence = 0;
  int64_t min_timestamp_ns = 0;
};

/// One finding of verify().
struct verify_problem {
  std::string stream;
  /// The first event of the stream that fails (0 when the problem is the stream's record).
  uint64_t sequence = 0;
  /// Its global position when known, else 0.
  uint64_t position = 0;
  std::string reason;
};

struct verify_report {
  uint64_t streams_checked = 0;
  uint64_t events_checked = 0;
  /// At most one problem per stream: its first break (later ones follow from it). Empty when
  /// everything holds.
  std::vector<verify_problem> problems;
};

/// Catch-up-then-live reading of the global log, in position order. Delivers every event with
/// position ≥ the start exactly once, with no gap and no duplicate where catching up from disk
/// turns into waiting for new appends.
class subscription {
 public:
  virtual ~subscription() = default;

  /// Returns the next events (up to max_count, each upcast and verified), waiting up to `wait`
  /// when there are none yet; an empty vector means nothing arrived in time. errc::closed after
  /// close(). REQUIRES: one caller at a time.
  [[nodiscard]] virtual result<std::vector<std::string>> next(size_t max_count,
                                                              std::chrono::milliseconds wait) = 0;

  /// The position of the last event returned (start - 1 before the first).
  virtual uint64_t position() const = 0;

  /// Wakes a waiting next() and makes this and later calls fail with errc::closed. Thread-safe.
  virtual void close() = 0;
};

class event_store {
 public:
  virtual ~event_store() = default;

  using append_callback =
    std::function<void(result<append_result> outcome, std::vector<std::string> stamped)>;

  // -- writing ------------------------------------------------------------------------------------

  /// Appends `envelopes` (finished Envelope buffers built with schemas::build_envelope whose
  /// stream_id is `stream`) atomically and blocks until they are durable. The journal stamps
  /// sequence, position, timestamp and prev_hash into the buffers in place, so on success
  /// `envelopes` hold exactly the stored bytes (ready to publish). On a duplicate (see header)
  /// `envelopes` are returned unstamped.
  [[nodiscard]] virtual result<append_result> append(std::string_view stream,
                                                     std::vector<std::string>& envelopes,
                                                     expected_version expected = {}) = 0;

  /// Same as append() without blocking: `done` is called on the commit thread once the batch is
  /// durable (or rejected), with the stamped buffers. Calls from one thread complete in the order
  /// they were made.
  virtual void append_async(std::string stream, std::vector<std::string> envelopes,
                            expected_version expected, append_callback done) = 0;

  /// Deletes events 1..min(to_sequence, highest) of `stream` (retention). The highest sequence
  /// is kept, so the stream never reuses a sequence; the hash chain stays verifiable from the
  /// first retained event. Returns how many events were deleted.
  [[nodiscard]] virtual result<uint64_t> delete_events(std::string_view stream,
                                                       uint64_t to_sequence) = 0;

  // -- reading a stream ---------------------------------------------------------------------------

  /// Events of `stream` in `range`, in order. Unknown stream → empty.
  [[nodiscard]] virtual result<std::vector<std::string>> read_stream(std::string_view stream,
                                                                     read_range range) = 0;

  /// Shorthand: up to `max_count` events with sequence ≥ `from_sequence`.
  [[nodiscard]] result<std::vector<std::string>> read_stream(std::string_view stream,
                                                             uint64_t from_sequence,
                                                             uint64_t max_count) {
    return read_stream(stream, read_range{from_sequence, read_range{}.to, max_count});
  }

  /// Calls `visit` for each event of `stream` in `range`, in order, without copying each into
  /// its own string (the fast path for replay). The envelope is verified and upcast; it and
  /// `bytes` are valid only during the call. `visit` returns false to stop early. Returns the
  /// number of events visited.
  using visitor = std::function<bool(const events::v1::Envelope& event, std::string_view bytes)>;
  [[nodiscard]] virtual result<uint64_t> for_each(std::string_view stream, read_range range,
                                                  const visitor& visit) = 0;

  /// Highest sequence of `stream`: 0 when it never had events; never decreases.
  [[nodiscard]] virtual result<uint64_t> highest_sequence(std::string_view stream) = 0;

  /// Head record of `stream` (highest sequence, deletions, head hash).
  [[nodiscard]] virtual result<stream_info> info(std::string_view stream) = 0;

  /// Names of all streams starting with `prefix`, in byte order.
  [[nodiscard]] virtual result<std::vector<std::string>> list_streams(std::string_view prefix) = 0;

  // -- reading the global log ---------------------------------------------------------------------

  /// Highest global position stored; 0 when the store is empty.
  [[nodiscard]] virtual uint64_t last_position() const = 0;

  /// Up to `max_count` events with position ≥ `from_position`, in position order (deleted events
  /// are skipped).
  [[nodiscard]] virtual result<std::vector<std::string>> read_all(uint64_t from_position,
                                                                  uint64_t max_count) = 0;

  /// A subscription delivering every event with position ≥ `from_position` (1: everything),
  /// first from disk, then live. On a secondary instance "live" means polling the primary.
  [[nodiscard]] virtual std::unique_ptr<subscription> subscribe(uint64_t from_position) = 0;

  // -- snapshots ----------------------------------------------------------------------------------

  /// Saves a snapshot; saving the same (stream, sequence) again overwrites it. Not synced by
  /// itself: it is written at once (a process crash keeps it) and becomes crash-proof with the
  /// next fsync of an append. A power loss before that may lose the newest snapshots, never a
  /// suffix out of order (a later delete_snapshots never survives without the save before it),
  /// which recovery tolerates: the events are the truth, a snapshot only shortens the replay.
  [[nodiscard]] virtual result<void> save_snapshot(const snapshot& s) = 0;

  /// The snapshot of `stream` with the highest sequence that matches `criteria`; nullopt when
  /// none does.
  [[nodiscard]] virtual result<std::optional<snapshot>> load_snapshot(
    std::string_view stream, const snapshot_criteria& criteria = {}) = 0;

  /// Deletes the snapshot of `stream` at `sequence` (no error when there is none).
  [[nodiscard]] virtual result<void> delete_snapshot(std::string_view stream,
                                                     uint64_t sequence) = 0;

  /// Deletes every snapshot of `stream` matching `criteria`; returns how many.
  [[nodiscard]] virtual result<uint64_t> delete_snapshots(std::string_view stream,
                                                          const snapshot_criteria& criteria) = 0;

  // -- maintenance --------------------------------------------------------------------------------

  /// Checks the hash chain and the FlatBuffers verifier of `stream`, or of every stream (and the
  /// global index) when `stream` is empty. `progress`, when given, is called now and then with the
  /// number of events checked so far. An error means the check could not run (I/O); what it
  /// found is in the report.
  [[nodiscard]] virtual result<verify_report> verify(
    std::string_view stream, const std::function<void(uint64_t)>& progress = {}) = 0;

  /// Makes everything appended so far durable (matters only without fsync) and flushes memtables.
  [[nodiscard]] virtual result<void> flush() = 0;

  /// For a secondary (read-only) instance: picks up what the primary wrote since. No-op otherwise.
  [[nodiscard]] virtual result<void> catch_up() = 0;
};

/// How an acknowledged append survives failures.
enum class durability {
  /// Acknowledged after the write-ahead log is fsynced (shared by concurrent appends). Loses
  /// nothing acknowledged, even on power loss.
  fsync,
  /// Acknowledged after the write-ahead log is handed to the OS; the commit thread fsyncs it at
  /// least every `sync_interval`. A crash of ferryd loses nothing acknowledged; a crash of the
  /// machine (kernel panic, power loss) may lose what was acknowledged in the last interval.
  periodic,
};

struct journal_options {
  /// The RocksDB directory (ferryd: `<data-dir>/journal`).
  std::filesystem::path dir;
  enum durability durability = durability::fsync;
  /// For durability::periodic: the longest time between fsyncs.
  std::chrono::milliseconds sync_interval{100};
  /// Create the directory and an empty journal when there is none (ferryd: yes).
  bool create_if_missing = true;
};

/// Opens (creating if allowed) the journal for writing. Fails with errc::busy if another process
/// holds it, errc::corrupt when RocksDB finds it damaged, errc::not_found when it is missing and
/// may not be created.
[[nodiscard]] result<std::unique_ptr<event_store>> open_journal(const journal_options& opts);

/// Opens the journal read-only next to a running writer, as a RocksDB secondary instance whose
/// private files live in `scratch_dir` (created; the caller removes it). Appends, deletions and
/// snapshot writes fail with errc::invalid_argument. errc::not_found when `dir` holds no journal.
[[nodiscard]] result<std::unique_ptr<event_store>> open_journal_secondary(
  const std::filesystem::path& dir, const std::filesystem::path& scratch_dir);

}  // namespace ferry::storage
