#pragma once
// ferry_storage public header: the event journal.
//
// The journal stores ferry.events.v1 envelopes (schemas/events.fbs) in streams named
// `<kind>-<id>`. Per-stream sequence numbers start at 1 and have no gaps; a global position
// orders every event of the store. An append is acknowledged only after the write-ahead log is
// fsynced (unless `sync` is off), so an acknowledged event survives a crash of the process or the
// machine.
//
// Threading: `event_store` is thread-safe. Ownership: one live writer per stream — the actor that
// owns the stream — while one ferryd process owns the data directory (RocksDB's lock file enforces
// the latter). Readers may call any read function from any thread; `open_secondary` lets another
// process (ferryctl) read while ferryd writes.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::storage {

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
  uint64_t last_position = 0;
};

class event_store {
 public:
  virtual ~event_store() = default;

  /// Appends `envelopes` (finished Envelope buffers whose stream_id is `stream`) atomically: all or
  /// none. The journal stamps sequence, position and timestamp into the buffers in place, so on
  /// success `envelopes` hold exactly the stored bytes (ready to publish). A version mismatch is an
  /// error that writes nothing.
  [[nodiscard]] virtual result<append_result> append(std::string_view stream,
                                                     std::vector<std::string>& envelopes,
                                                     expected_version expected = {}) = 0;

  /// Reads up to `max_count` events of `stream` with sequence ≥ `from_sequence`, in order. Every
  /// record is verified; a corrupt one is an error naming stream and sequence. Unknown stream →
  /// empty vector.
  [[nodiscard]] virtual result<std::vector<std::string>> read_stream(std::string_view stream,
                                                                     uint64_t from_sequence,
                                                                     uint64_t max_count) = 0;

  /// Highest sequence of `stream`; 0 when it has no events.
  [[nodiscard]] virtual result<uint64_t> highest_sequence(std::string_view stream) = 0;

  /// Names of all streams starting with `prefix`, in byte order.
  [[nodiscard]] virtual result<std::vector<std::string>> list_streams(std::string_view prefix) = 0;

  /// Highest global position stored; 0 when the store is empty.
  [[nodiscard]] virtual uint64_t last_position() const = 0;

  /// Makes everything appended so far durable (matters only with sync off) and flushes memtables.
  [[nodiscard]] virtual result<void> flush() = 0;

  /// For a secondary (read-only) instance: picks up what the primary wrote since. No-op otherwise.
  [[nodiscard]] virtual result<void> catch_up() = 0;
};

struct journal_options {
  /// The RocksDB directory (ferryd: `<data-dir>/journal`).
  std::filesystem::path dir;
  /// fsync the write-ahead log before acknowledging an append. Off: a machine crash may lose the
  /// last appends (a process crash loses nothing).
  bool sync = true;
};

/// Opens (creating if needed) the journal for writing. Fails clearly if another process holds it.
[[nodiscard]] result<std::unique_ptr<event_store>> open_journal(const journal_options& opts);

/// Opens the journal read-only next to a running writer, as a RocksDB secondary instance whose
/// private files live in `scratch_dir` (created; the caller removes it).
[[nodiscard]] result<std::unique_ptr<event_store>> open_journal_secondary(
  const std::filesystem::path& dir, const std::filesystem::path& scratch_dir);

}  // namespace ferry::storage
