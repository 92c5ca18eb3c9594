// rocks_event_store: the RocksDB implementation of event_store (layout in keys.h).
//
// Writes: append_async validates and verifies on the caller's thread, then queues the request.
// One commit thread drains the queue: it takes every queued append (bounded), assigns sequences,
// positions and hash links against its cache of stream heads, and writes the whole group as one
// WriteBatch. A request that fails its own checks (version conflict, …) is rolled back to a save
// point and does not affect the rest of the group. Deletions are queued the same way, alone.
//
// Durability is pipelined (durability::fsync): the commit thread writes a group without sync,
// takes a RocksDB snapshot right after it, and hands both to the sync thread, then goes on with
// the next group while the sync thread fsyncs the WAL (one fsync covers every group handed over
// meanwhile). Only after the fsync does the sync thread publish: it makes that snapshot the one
// readers read from, advances last_position_ (what subscriptions wait on) and runs the callbacks
// in order. So fsync and the CPU work of the next group overlap, and no reader or subscriber ever
// sees an event that is not yet durable. A failed fsync leaves the journal failed: every later
// write is refused (the state of the WAL is unknown; a restart recovers what is durable).
//
// Reads run on the caller's thread against the published snapshot; a write batch is atomic, so a
// reader sees a whole append or none of it.

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <variant>

#include <openssl/evp.h>
#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/slice_transform.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "journal_internal.h"
#include "keys.h"

namespace ferry::storage {

std::string to_hex(const digest& d) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(d.size() * 2);
  for (auto b : d) {
    out.push_back(hex[b >> 4]);
    out.push_back(hex[b & 0xf]);
  }
  return out;
}

namespace detail {

result<void> validate_stream_name(std::string_view stream) {
  if (stream.empty() || stream.size() > 200)
    return fail(errc::invalid_argument,
                "stream name must be 1..200 bytes, got " + std::to_string(stream.size()));
  for (char c : stream)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return fail(errc::invalid_argument, "stream name '" + std::string(stream) +
                                            "' may contain only letters, digits, '-', '_' and '.'");
  return {};
}

digest sha256(std::string_view bytes) {
  digest d{};
  unsigned int len = 0;
  // EVP_Digest cannot fail for SHA-256 on in-memory input short of allocation failure.
  EVP_Digest(bytes.data(), bytes.size(), d.data(), &len, EVP_sha256(), nullptr);
  return d;
}

error_info db_error(std::string_view what, std::string_view object, const rocksdb::Status& s) {
  auto code = s.IsCorruption()  ? errc::corrupt
              : s.IsNotFound()  ? errc::not_found
              : s.IsBusy()      ? errc::busy
              : errc::failed;
  return fail(code, std::string(what) + " " + std::string(object) + ": " + s.ToString());
}

}  // namespace detail

namespace {

using namespace detail;
namespace ev = ferry::events::v1;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
           std::chrono::system_clock::now().time_since_epoch())
    .count();
}

/// Checks a caller's batch before it is queued (runs on the caller's thread, so verification
/// of big batches is spread over the callers rather than serialised on the commit thread).
result<void> check_batch(std::string_view stream, const std::vector<std::string>& envelopes) {
  if (auto ok = validate_stream_name(stream); !ok)
    return ok.error();
  auto where = [&](size_t i) {
    return "append to " + std::string(stream) + ", event " + std::to_string(i + 1) + " of " +
           std::to_string(envelopes.size()) + ": ";
  };
  if (envelopes.empty())
    return fail(errc::invalid_argument, "append to " + std::string(stream) + ": no events given");
  std::unordered_set<std::string_view> ids;
  for (size_t i = 0; i < envelopes.size(); ++i) {
    auto verified = schemas::verify_envelope(envelopes[i]);
    if (!verified)
      return fail(errc::invalid_argument, where(i) + verified.error().message);
    const ev::Envelope* env = *verified;
    auto* sid = env->stream_id();
    if (!sid || sid->string_view() != stream)
      return fail(errc::invalid_argument,
                  where(i) + "envelope names stream '" + (sid ? sid->str() : std::string()) + "'");
    // Envelope derives privately from Table; the object is the table.
    auto* table = reinterpret_cast<const flatbuffers::Table*>(env);
    if (!table->CheckField(ev::Envelope::VT_SEQUENCE) ||
        !table->CheckField(ev::Envelope::VT_POSITION) ||
        !table->CheckField(ev::Envelope::VT_TIMESTAMP_NS) || !env->prev_hash() ||
        env->prev_hash()->size() != schemas::hash_size)
      return fail(errc::invalid_argument,
                  where(i) + "envelope lacks the sequence/position/timestamp/prev_hash slots "
                             "the journal stamps (build it with schemas::build_envelope)");
    auto version = env->schema_version();
    if (version == 0 || version > schemas::current_schema_version)
      return fail(errc::invalid_argument,
                  where(i) + "schema version " + std::to_string(version) +
                    " is not one this build knows (1.." +
                    std::to_string(schemas::current_schema_version) + ")");
    if (auto* id = env->event_id(); id && id->size() > 0) {
      if (id->size() > 128)
        return fail(errc::invalid_argument, where(i) + "event id longer than 128 bytes");
      if (!ids.insert(id->string_view()).second)
        return fail(errc::invalid_argument,
                    where(i) + "event id '" + id->str() + "' appears twice in the batch");
    }
  }
  return {};
}

/// Verifies stored bytes and checks they are the event the key says; upcasts in place.
result<const ev::Envelope*> decode_stored(std::string& bytes, std::string_view stream,
                                          uint64_t seq, uint64_t position) {
  auto where = [&] {
    std::string w = "read " + std::string(stream) + " seq " + std::to_string(seq);
    if (position)
      w += " (position " + std::to_string(position) + ")";
    return w + ": ";
  };
  auto verified = schemas::verify_envelope(bytes);
  if (!verified)
    return fail(errc::corrupt, where() + verified.error().message);
  const ev::Envelope* env = *verified;
  if (env->sequence() != seq || !env->stream_id() || env->stream_id()->string_view() != stream)
    return fail(errc::corrupt, where() + "the record holds " +
                                 (env->stream_id() ? env->stream_id()->str() : "?") + " seq " +
                                 std::to_string(env->sequence()));
  if (env->schema_version() != schemas::current_schema_version) {
    if (auto up = schemas::upcast_envelope(bytes); !up)
      return fail(errc::corrupt, where() + up.error().message);
    env = ev::GetEnvelope(bytes.data());
  }
  return env;
}

class rocks_event_store;

/// Shared between the store and its subscriptions: wakes waiting subscribers after a commit.
struct commit_signal {
  std::mutex mtx;
  std::condition_variable cv;
};

class live_subscription final : public subscription {
 public:
  live_subscription(rocks_event_store& store, std::shared_ptr<commit_signal> signal,
                    uint64_t from, bool secondary)
    : store_(store), signal_(std::move(signal)), next_(from == 0 ? 1 : from),
      secondary_(secondary) {}

  result<std::vector<std::string>> next(size_t max_count,
                                        std::chrono::milliseconds wait) override;
  uint64_t position() const override { return next_ - 1; }
  void close() override {
    closed_ = true;
    std::lock_guard<std::mutex> guard(signal_->mtx);
    signal_->cv.notify_all();
  }

 private:
  rocks_event_store& store_;
  std::shared_ptr<commit_signal> signal_;
  uint64_t next_;
  bool secondary_;
  std::atomic<bool> closed_{false};
};

class rocks_event_store final : public event_store {
 public:
  rocks_event_store(std::unique_ptr<rocksdb::DB> db, const journal_options& opts, bool secondary)
    : db_(std::move(db)), opts_(opts), secondary_(secondary),
      signal_(std::make_shared<commit_signal>()) {
    // The sync thread makes groups durable (durability::fsync); periodic mode syncs in the
    // commit loop.
    write_opts_.sync = false;
    refresh_last_position();
    // Snapshots are never synced on their own (see save_snapshot in journal.h): a synced write
    // would hold up RocksDB's write group, and with it the commit thread, for an fsync, and
    // block the saving actor's thread for as long.
    snapshot_write_opts_.sync = false;
    if (!secondary_) {
      last_written_position_ = last_position_.load();
      durable_ = take_snapshot();
      last_ts_ = last_event_time();
      if (opts_.durability == durability::fsync) {
        syncer_ = std::thread([this] { sync_loop(); });
        pthread_setname_np(syncer_.native_handle(), "journal-sync");
      }
      writer_ = std::thread([this] { commit_loop(); });
      pthread_setname_np(writer_.native_handle(), "journal-commit");
    }
  }

  ~rocks_event_store() override {
    if (writer_.joinable()) {
      {
        std::lock_guard<std::mutex> guard(queue_mtx_);
        stopping_ = true;
      }
      queue_cv_.notify_all();
      writer_.join();
    }
    if (syncer_.joinable()) {
      {
        std::lock_guard<std::mutex> guard(sync_mtx_);
        sync_stopping_ = true;
      }
      sync_cv_.notify_all();
      syncer_.join();
    }
    {
      std::lock_guard<std::mutex> guard(signal_->mtx);
      signal_->cv.notify_all();
    }
    {
      std::lock_guard<std::mutex> guard(published_mtx_);
      durable_.reset();
    }
    if (!secondary_)
      (void)db_->SyncWAL();
    (void)db_->Close();
  }

  // -- writing ------------------------------------------------------------------------------------

  result<append_result> append(std::string_view stream, std::vector<std::string>& envelopes,
                               expected_version expected) override {
    if (std::this_thread::get_id() == writer_.get_id() ||
        std::this_thread::get_id() == syncer_.get_id())
      return fail("append to " + std::string(stream) +
                  ": the blocking append() was called from an append_async callback (it would "
                  "deadlock); use append_async there");
    struct outcome {
      result<append_result> res;
      std::vector<std::string> stamped;
    };
    std::promise<outcome> done;
    auto fut = done.get_future();
    append_async(std::string(stream), std::move(envelopes), expected,
                 [&done](result<append_result> r, std::vector<std::string> stamped) {
                   done.set_value(outcome{std::move(r), std::move(stamped)});
                 });
    auto out = fut.get();
    envelopes = std::move(out.stamped);
    return std::move(out.res);
  }

  void append_async(std::string stream, std::vector<std::string> envelopes,
                    expected_version expected, append_callback done) override {
    if (secondary_) {
      // No commit thread: answer at once (there is no earlier call to keep order with).
      if (done)
        done(fail(errc::invalid_argument,
                  "append to " + stream + ": the journal is open read-only"),
             std::move(envelopes));
      return;
    }
    append_op op{std::move(stream), std::move(envelopes), expected, std::move(done), {}};
    if (auto ok = check_batch(op.stream, op.envelopes); !ok)
      op.early_error = ok.error();
    // Even a rejected request goes through the queue, so one thread's callbacks complete in the
    // order of its calls.
    enqueue(std::move(op));
  }

  result<uint64_t> delete_events(std::string_view stream, uint64_t to_sequence) override {
    if (secondary_)
      return fail(errc::invalid_argument,
                  "delete events of " + std::string(stream) + ": the journal is open read-only");
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    if (std::this_thread::get_id() == writer_.get_id() ||
        std::this_thread::get_id() == syncer_.get_id())
      return fail("delete events of " + std::string(stream) + ": called from an append callback");
    std::promise<result<uint64_t>> done;
    auto fut = done.get_future();
    enqueue(delete_op{std::string(stream), to_sequence,
                      [&done](result<uint64_t> r) { done.set_value(std::move(r)); }});
    return fut.get();
  }

  // -- reading a stream ---------------------------------------------------------------------------

  result<std::vector<std::string>> read_stream(std::string_view stream,
                                               read_range range) override {
    std::vector<std::string> out;
    auto visited = scan_stream(stream, range, [&](std::string& bytes, const ev::Envelope*) {
      out.push_back(std::move(bytes));
      return true;
    });
    if (!visited)
      return visited.error();
    return out;
  }

  result<uint64_t> for_each(std::string_view stream, read_range range,
                            const visitor& visit) override {
    return scan_stream(stream, range, [&](std::string& bytes, const ev::Envelope* env) {
      return visit(*env, bytes);
    });
  }

  result<uint64_t> highest_sequence(std::string_view stream) override {
    auto h = info(stream);
    if (!h)
      return h.error();
    return h->highest_sequence;
  }

  result<stream_info> info(std::string_view stream) override {
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    auto v = view();
    auto h = load_head(stream, v.options());
    if (!h)
      return h.error();
    return stream_info{h->highest, h->record.deleted_to, h->head_hash};
  }

  result<std::vector<std::string>> list_streams(std::string_view prefix) override {
    std::vector<std::string> out;
    std::string start = "h" + std::string(prefix);
    auto view_ = view();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(view_.options()));
    for (it->Seek(start); it->Valid(); it->Next()) {
      auto k = it->key();
      if (!k.starts_with(start))
        break;
      out.emplace_back(k.data() + 1, k.size() - 1);
    }
    if (!it->status().ok())
      return db_error("list streams with prefix", prefix, it->status());
    return out;
  }

  // -- reading the global log ---------------------------------------------------------------------

  uint64_t last_position() const override { return last_position_.load(); }

  result<std::vector<std::string>> read_all(uint64_t from_position, uint64_t max_count) override {
    std::vector<std::string> out;
    auto r = scan_global(from_position, std::numeric_limits<uint64_t>::max(), max_count, out);
    if (!r)
      return r.error();
    return out;
  }

  std::unique_ptr<subscription> subscribe(uint64_t from_position) override {
    return std::make_unique<live_subscription>(*this, signal_, from_position, secondary_);
  }

  /// Appends to `out` up to `max_count` events with position in [from, to]. Returns the position
  /// after the last one examined (so deleted positions are stepped over exactly once).
  result<uint64_t> scan_global(uint64_t from, uint64_t to, uint64_t max_count,
                               std::vector<std::string>& out) {
    if (from == 0)
      from = 1;
    if (max_count == 0 || from > to)
      return from;
    // The view holds exactly the events up to its position, so stepping over [.., position]
    // cannot skip a later commit.
    auto v = view();
    const uint64_t published = v.position;
    auto ro = v.options();
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro));
    uint64_t next = from;
    std::string value;
    for (it->Seek(global_key(from)); it->Valid() && out.size() < max_count; it->Next()) {
      auto k = it->key();
      if (k.size() != 9 || k[0] != 'g')
        break;
      uint64_t pos = get_be64(k.data() + 1);
      if (pos > to)
        break;
      next = pos + 1;
      auto entry = global_entry::decode(std::string_view(it->value().data(), it->value().size()));
      if (!entry)
        return fail(errc::corrupt, "read position " + std::to_string(pos) +
                                     ": global index entry is malformed");
      std::string_view stream = entry->stream;
      uint64_t seq = entry->sequence;
      auto s = db_->Get(ro, entry->event_key(), &value);
      if (s.IsNotFound())
        continue;  // deleted by retention after the index entry was read: skip it
      if (!s.ok())
        return db_error("read position", std::to_string(pos), s);
      auto env = decode_stored(value, stream, seq, pos);
      if (!env)
        return env.error();
      out.push_back(std::move(value));
    }
    if (!it->status().ok())
      return db_error("read the global log from position", std::to_string(from), it->status());
    if (out.size() < max_count && !it->Valid())
      next = std::max(next, std::min(to, published) + 1);
    return next;
  }

  /// Wakes after a commit; for subscriptions.
  commit_signal& signal() { return *signal_; }

  // -- snapshots ----------------------------------------------------------------------------------

  result<void> save_snapshot(const snapshot& s) override {
    if (auto ok = writable("save a snapshot of " + s.stream); !ok)
      return ok;
    if (auto ok = validate_stream_name(s.stream); !ok)
      return ok.error();
    std::string v;
    v.reserve(8 + s.data.size());
    put_be64(v, static_cast<uint64_t>(s.timestamp_ns));
    v.append(s.data);
    auto st = db_->Put(snapshot_write_opts_, snapshot_key(s.stream, s.sequence), v);
    if (!st.ok())
      return db_error("save snapshot of", s.stream, st);
    return {};
  }

  result<std::optional<snapshot>> load_snapshot(std::string_view stream,
                                                const snapshot_criteria& c) override {
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    auto prefix = snapshot_prefix(stream);
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekForPrev(snapshot_key(stream, c.max_sequence)); it->Valid(); it->Prev()) {
      auto k = it->key();
      if (!k.starts_with(prefix) || k.size() != prefix.size() + 8)
        break;
      uint64_t seq = get_be64(k.data() + prefix.size());
      if (seq < c.min_sequence)
        break;
      auto v = it->value();
      if (v.size() < 8)
        return fail(errc::corrupt, "snapshot of " + std::string(stream) + " at seq " +
                                     std::to_string(seq) + " is truncated");
      auto ts = static_cast<int64_t>(get_be64(v.data()));
      if (ts < c.min_timestamp_ns || ts > c.max_timestamp_ns)
        continue;
      return std::optional<snapshot>(
        snapshot{std::string(stream), seq, ts, std::string(v.data() + 8, v.size() - 8)});
    }
    if (!it->status().ok())
      return db_error("load snapshot of", stream, it->status());
    return std::optional<snapshot>();
  }

  result<void> delete_snapshot(std::string_view stream, uint64_t sequence) override {
    if (auto ok = writable("delete a snapshot of " + std::string(stream)); !ok)
      return ok;
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    auto st = db_->Delete(snapshot_write_opts_, snapshot_key(stream, sequence));
    if (!st.ok())
      return db_error("delete snapshot of", stream, st);
    return {};
  }

  result<uint64_t> delete_snapshots(std::string_view stream,
                                    const snapshot_criteria& c) override {
    if (auto ok = writable("delete snapshots of " + std::string(stream)); !ok)
      return ok.error();
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    auto prefix = snapshot_prefix(stream);
    rocksdb::WriteBatch batch;
    uint64_t n = 0;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(snapshot_key(stream, c.min_sequence)); it->Valid(); it->Next()) {
      auto k = it->key();
      if (!k.starts_with(prefix) || k.size() != prefix.size() + 8)
        break;
      if (get_be64(k.data() + prefix.size()) > c.max_sequence)
        break;
      auto v = it->value();
      auto ts = v.size() >= 8 ? static_cast<int64_t>(get_be64(v.data())) : 0;
      if (ts < c.min_timestamp_ns || ts > c.max_timestamp_ns)
        continue;
      batch.Delete(k);
      ++n;
    }
    if (!it->status().ok())
      return db_error("delete snapshots of", stream, it->status());
    if (n == 0)
      return n;
    auto st = db_->Write(snapshot_write_opts_, &batch);
    if (!st.ok())
      return db_error("delete snapshots of", stream, st);
    return n;
  }

  // -- maintenance --------------------------------------------------------------------------------

  result<verify_report> verify(std::string_view stream,
                               const std::function<void(uint64_t)>& progress) override {
    auto v = view();
    return verify_journal(*db_, v.options(), stream, progress);
  }

  result<void> flush() override {
    if (secondary_)
      return {};
    if (auto s = db_->SyncWAL(); !s.ok())
      return db_error("sync WAL of", "journal", s);
    if (auto s = db_->Flush(rocksdb::FlushOptions()); !s.ok())
      return db_error("flush memtables of", "journal", s);
    return {};
  }

  result<void> catch_up() override {
    if (!secondary_)
      return {};
    std::unique_lock<std::shared_mutex> guard(catch_up_mtx_);
    if (auto s = db_->TryCatchUpWithPrimary(); !s.ok())
      return db_error("catch up with", "primary journal", s);
    refresh_last_position();
    return {};
  }

 private:
  struct append_op {
    std::string stream;
    std::vector<std::string> envelopes;
    expected_version expected;
    append_callback done;
    std::optional<error_info> early_error;
  };
  struct delete_op {
    std::string stream;
    uint64_t to_sequence;
    std::function<void(result<uint64_t>)> done;
  };
  using op = std::variant<append_op, delete_op>;

  /// How much one group may hold: bounded so a flood does not make one huge write.
  static constexpr size_t max_group_ops = 4096;
  static constexpr size_t max_group_bytes = 16 << 20;
  /// The head cache is dropped when it grows past this (RocksDB stays the source of truth).
  static constexpr size_t max_cached_heads = 1 << 16;

  result<void> writable(const std::string& what) const {
    if (secondary_)
      return fail(errc::invalid_argument, what + ": the journal is open read-only");
    return {};
  }

  void enqueue(op o) {
    {
      std::lock_guard<std::mutex> guard(queue_mtx_);
      queue_.push_back(std::move(o));
    }
    queue_cv_.notify_one();
  }

  void refresh_last_position() {
    std::string v;
    if (db_->Get(rocksdb::ReadOptions(), last_position_key, &v).ok() && v.size() == 8)
      last_position_.store(get_be64(v.data()));
  }

  /// Time of the newest event, so timestamps never go backwards across restarts.
  int64_t last_event_time() {
    std::vector<std::string> last;
    auto pos = last_position_.load();
    if (pos == 0 || !scan_global(pos, pos, 1, last) || last.empty())
      return 0;
    return ev::GetEnvelope(last.front().data())->timestamp_ns();
  }

  /// A consistent read of the published state. Keep it alive for the duration of the read.
  struct read_view {
    /// Null on a secondary (it cannot take snapshots; its state only moves in catch_up, which
    /// the guard holds off).
    std::shared_ptr<const rocksdb::Snapshot> snap;
    /// The last position the view holds.
    uint64_t position = 0;
    std::shared_lock<std::shared_mutex> catch_up_guard;

    rocksdb::ReadOptions options() const {
      rocksdb::ReadOptions ro;
      ro.snapshot = snap.get();
      return ro;
    }
  };

  read_view view() {
    read_view v;
    if (secondary_) {
      v.catch_up_guard = std::shared_lock<std::shared_mutex>(catch_up_mtx_);
      v.position = last_position_.load();
      return v;
    }
    std::lock_guard<std::mutex> guard(published_mtx_);
    v.snap = durable_;
    v.position = last_position_.load();
    return v;
  }

  /// Where a stream ends, as far as the journal's records say.
  struct head_state {
    /// Highest sequence ever appended (the last stored event's, or deleted_to).
    uint64_t highest = 0;
    /// Hash recorded for event `highest` (what the next event links to).
    digest head_hash{};
    /// The 'h' record (exists once the stream has had an event).
    stream_record record;
    bool has_record = false;
  };

  /// Reads the stream record and the last stored event through `ro`.
  result<head_state> load_head(std::string_view stream, const rocksdb::ReadOptions& ro) {
    head_state h;
    std::string v;
    auto s = db_->Get(ro, head_key(stream), &v);
    if (s.ok()) {
      auto r = stream_record::decode(stream, v);
      if (!r)
        return r.error();
      h.record = *r;
      h.has_record = true;
    } else if (!s.IsNotFound()) {
      return db_error("read the stream record of", stream, s);
    }
    h.highest = h.record.deleted_to;
    h.head_hash = h.record.anchor_hash;
    auto prefix = event_prefix(stream);
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro));
    it->SeekForPrev(event_key(stream, std::numeric_limits<uint64_t>::max()));
    if (it->Valid() && it->key().starts_with(prefix) && it->key().size() == prefix.size() + 8) {
      uint64_t seq = get_be64(it->key().data() + prefix.size());
      if (seq > h.highest) {
        h.highest = seq;
        std::string bytes(it->value().data(), it->value().size());
        // The hash recorded at append, so a tampered last event cannot launder itself into the
        // chain; the bytes' own hash only when the record is unreadable (verify reports that).
        h.head_hash = sha256(bytes);
        if (auto env = schemas::verify_envelope(bytes); env) {
          if (db_->Get(ro, global_key((*env)->position()), &v).ok())
            if (auto g = global_entry::decode(v); g && g->sequence == seq)
              h.head_hash = g->hash;
        }
      }
    }
    if (!it->status().ok())
      return db_error("read the last event of", stream, it->status());
    return h;
  }

  template <class Fn>
  result<uint64_t> scan_stream(std::string_view stream, const read_range& range, Fn&& fn) {
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    uint64_t from = std::max<uint64_t>(range.from, 1);
    if (range.max_count == 0 || from > range.to)
      return uint64_t{0};
    auto prefix = event_prefix(stream);
    auto v = view();
    auto ro = v.options();
    ro.readahead_size = 2 << 20;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro));
    uint64_t n = 0;
    std::string bytes;
    for (it->Seek(event_key(stream, from)); it->Valid() && n < range.max_count; it->Next()) {
      auto k = it->key();
      if (k.size() != prefix.size() + 8 || !k.starts_with(prefix))
        break;
      uint64_t seq = get_be64(k.data() + prefix.size());
      if (seq > range.to)
        break;
      // A copy: RocksDB's value bytes are not aligned as FlatBuffers requires.
      bytes.assign(it->value().data(), it->value().size());
      auto env = decode_stored(bytes, stream, seq, 0);
      if (!env)
        return env.error();
      ++n;
      if (!fn(bytes, *env))
        break;
    }
    if (!it->status().ok())
      return db_error("read", stream, it->status());
    return n;
  }

  // -- commit thread ------------------------------------------------------------------------------

  void commit_loop() {
    ctx_ = EVP_MD_CTX_new();
    auto last_sync = std::chrono::steady_clock::now();
    bool unsynced = false;  // periodic mode: written since the last SyncWAL
    for (;;) {
      std::deque<op> group;
      {
        std::unique_lock<std::mutex> lock(queue_mtx_);
        if (unsynced)
          queue_cv_.wait_until(lock, last_sync + opts_.sync_interval,
                               [&] { return stopping_ || !queue_.empty(); });
        else
          queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (stopping_ && queue_.empty())
          break;
        take_group(group);
      }
      if (!group.empty()) {
        auto done = std::make_unique<written_group>();
        done->ops = std::move(group);
        if (std::holds_alternative<delete_op>(done->ops.front()))
          write_delete(*done);
        else
          write_appends(*done);
        if (opts_.durability == durability::fsync) {
          hand_to_syncer(std::move(done));
        } else {
          if (done->wrote)
            publish(done->snap, done->last_position);
          complete(*done, nullptr);
          unsynced = unsynced || done->wrote;
        }
      }
      if (unsynced && std::chrono::steady_clock::now() - last_sync >= opts_.sync_interval) {
        if (auto st = db_->SyncWAL(); !st.ok())
          mark_failed(db_error("sync the write-ahead log of", "journal", st));
        last_sync = std::chrono::steady_clock::now();
        unsynced = false;
      }
    }
    EVP_MD_CTX_free(ctx_);
  }

  /// A group written to RocksDB (not yet synced), waiting to be published and answered.
  struct written_group {
    std::deque<op> ops;
    /// One per op of an append group.
    std::vector<std::optional<result<append_result>>> outcomes;
    /// For a delete group.
    std::optional<result<uint64_t>> deleted;
    /// Whether anything was written (else there is nothing to sync or publish).
    bool wrote = false;
    /// The state right after this group's write: what readers see once it is durable.
    std::shared_ptr<const rocksdb::Snapshot> snap;
    uint64_t last_position = 0;
  };

  /// How many written groups may wait for the sync thread before the commit thread waits too.
  static constexpr size_t max_unsynced_groups = 8;

  void hand_to_syncer(std::unique_ptr<written_group> g) {
    std::unique_lock<std::mutex> lock(sync_mtx_);
    sync_cv_.wait(lock, [&] { return unsynced_.size() < max_unsynced_groups; });
    unsynced_.push_back(std::move(g));
    sync_cv_.notify_all();
  }

  /// The sync thread: one fsync for everything written since the last one, then publish and
  /// answer in order.
  void sync_loop() {
    for (;;) {
      std::vector<std::unique_ptr<written_group>> batch;
      {
        std::unique_lock<std::mutex> lock(sync_mtx_);
        sync_cv_.wait(lock, [&] { return sync_stopping_ || !unsynced_.empty(); });
        if (unsynced_.empty())
          break;  // stopping, and the commit thread (stopped first) handed over everything
        for (auto& g : unsynced_)
          batch.push_back(std::move(g));
        unsynced_.clear();
        sync_cv_.notify_all();  // room for the commit thread again
      }
      bool any_write = false;
      for (auto& g : batch)
        any_write = any_write || g->wrote;
      const error_info* sync_error = nullptr;
      error_info err;
      if (any_write) {
        if (auto st = db_->SyncWAL(); !st.ok()) {
          err = db_error("fsync the write-ahead log of", "journal", st);
          mark_failed(err);
          sync_error = &err;
        }
      }
      if (!sync_error) {
        for (auto it = batch.rbegin(); it != batch.rend(); ++it)
          if ((*it)->wrote) {
            publish((*it)->snap, (*it)->last_position);
            break;
          }
      }
      for (auto& g : batch)
        complete(*g, sync_error);
    }
  }

  /// Makes `snap` (covering positions up to `position`) what readers and subscriptions see.
  void publish(std::shared_ptr<const rocksdb::Snapshot> snap, uint64_t position) {
    {
      std::lock_guard<std::mutex> guard(published_mtx_);
      durable_ = std::move(snap);
      last_position_.store(position);
    }
    std::lock_guard<std::mutex> guard(signal_->mtx);
    signal_->cv.notify_all();
  }

  /// Runs a group's callbacks; `sync_error` turns its successful writes into that error.
  void complete(written_group& g, const error_info* sync_error) {
    if (g.deleted) {
      auto& d = std::get<delete_op>(g.ops.front());
      if (sync_error && g.wrote)
        g.deleted = result<uint64_t>(*sync_error);
      if (d.done)
        d.done(std::move(*g.deleted));
      return;
    }
    for (size_t i = 0; i < g.ops.size(); ++i) {
      auto& a = std::get<append_op>(g.ops[i]);
      auto& r = *g.outcomes[i];
      if (sync_error && r && !r->duplicate)
        r = result<append_result>(*sync_error);
      if (a.done)
        a.done(std::move(r), std::move(a.envelopes));
    }
  }

  /// After a failed fsync nothing more is written: the WAL's state is unknown.
  void mark_failed(const error_info& e) {
    std::lock_guard<std::mutex> guard(failed_mtx_);
    if (!failed_) {
      failed_ = fail(errc::failed, e.message +
                                     "; the journal refuses writes until ferryd is restarted");
      std::fprintf(stderr, "ferry journal: %s\n", failed_->message.c_str());
    }
    has_failed_.store(true);
  }

  std::optional<error_info> failure() {
    if (!has_failed_.load())
      return std::nullopt;
    std::lock_guard<std::mutex> guard(failed_mtx_);
    return failed_;
  }

  std::shared_ptr<const rocksdb::Snapshot> take_snapshot() {
    rocksdb::DB* db = db_.get();
    return std::shared_ptr<const rocksdb::Snapshot>(
      db->GetSnapshot(), [db](const rocksdb::Snapshot* s) { db->ReleaseSnapshot(s); });
  }

  // REQUIRES: queue_mtx_ held.
  void take_group(std::deque<op>& group) {
    if (std::holds_alternative<delete_op>(queue_.front())) {
      group.push_back(std::move(queue_.front()));
      queue_.pop_front();
      return;
    }
    size_t bytes = 0;
    while (!queue_.empty() && group.size() < max_group_ops && bytes < max_group_bytes &&
           std::holds_alternative<append_op>(queue_.front())) {
      for (auto& e : std::get<append_op>(queue_.front()).envelopes)
        bytes += e.size();
      group.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
  }

  /// The cached head of `stream` (loaded on first use). Commit thread only.
  result<head_state*> head_of(const std::string& stream) {
    if (auto it = heads_.find(stream); it != heads_.end())
      return &it->second;
    // The latest state, not the published view: the writer must see its own unsynced groups.
    auto h = load_head(stream, rocksdb::ReadOptions());
    if (!h)
      return h.error();
    return &heads_.emplace(stream, *h).first->second;
  }

  digest hash_of(std::string_view bytes) {
    digest d{};
    unsigned int len = 0;
    if (EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) != 1 ||
        EVP_DigestUpdate(ctx_, bytes.data(), bytes.size()) != 1 ||
        EVP_DigestFinal_ex(ctx_, d.data(), &len) != 1)
      return sha256(bytes);
    return d;
  }

  /// Looks up an event id: first among this group's appends, then on disk.
  result<std::optional<std::pair<uint64_t, uint64_t>>> find_id(const std::string& key) {
    if (auto it = group_ids_.find(key); it != group_ids_.end())
      return std::optional(it->second);
    std::string v;
    auto s = db_->Get(rocksdb::ReadOptions(), key, &v);
    if (s.IsNotFound())
      return std::optional<std::pair<uint64_t, uint64_t>>();
    if (!s.ok())
      return db_error("look up event id", key.substr(1), s);
    if (v.size() != 16)
      return fail(errc::corrupt, "idempotency record " + key.substr(1) + " is malformed");
    return std::optional(std::pair{get_be64(v.data()), get_be64(v.data() + 8)});
  }

  /// Adds one append to `batch`, advancing `pos`. On error nothing of it is in the head cache or
  /// in group_ids_ (the caller rolls the batch back to its save point).
  result<append_result> stage_append(append_op& a, rocksdb::WriteBatch& batch, uint64_t& pos,
                                     int64_t ts) {
    if (a.early_error)
      return *a.early_error;
    const std::string& stream = a.stream;
    auto head_p = head_of(stream);
    if (!head_p)
      return head_p.error();
    head_state head = **head_p;

    // Idempotency: a batch whose ids the stream already holds, in the same order and adjacent,
    // is acknowledged as the original append (whatever version it expects now); a batch mixing
    // known and new ids is a conflict.
    std::vector<std::string> id_keys(a.envelopes.size());
    size_t known = 0;
    append_result dup;
    dup.duplicate = true;
    for (size_t i = 0; i < a.envelopes.size(); ++i) {
      auto* id = ev::GetEnvelope(a.envelopes[i].data())->event_id();
      if (!id || id->size() == 0)
        continue;
      id_keys[i] = id_key(stream, id->string_view());
      auto found = find_id(id_keys[i]);
      if (!found)
        return found.error();
      if (!*found)
        continue;
      auto [seq, p] = **found;
      if (known != i || (i > 0 && seq != dup.last_sequence + 1))
        return fail(errc::conflict, "append to " + stream + ": event id '" + id->str() +
                                      "' was already appended, but the batch is not an exact "
                                      "repeat of that append");
      if (i == 0) {
        dup.first_sequence = seq;
        dup.first_position = p;
      }
      dup.last_sequence = seq;
      dup.last_position = p;
      ++known;
    }
    if (known == a.envelopes.size())
      return dup;
    if (known > 0)
      return fail(errc::conflict, "append to " + stream + ": the batch mixes " +
                                    std::to_string(known) +
                                    " events already appended (by event id) with new ones");

    const bool version_ok = a.expected.k == expected_version::kind::any ||
                            head.highest == a.expected.sequence;  // no_stream: sequence 0
    if (!version_ok) {
      if (a.expected.k == expected_version::kind::no_stream)
        return fail(errc::conflict, "append to " + stream +
                                      ": expected no stream, but it is at sequence " +
                                      std::to_string(head.highest));
      return fail(errc::conflict, "append to " + stream + ": expected version " +
                                    std::to_string(a.expected.sequence) + ", but it is at " +
                                    std::to_string(head.highest));
    }

    append_result res;
    res.first_sequence = head.highest + 1;
    res.first_position = pos + 1;
    std::vector<std::pair<std::string, std::pair<uint64_t, uint64_t>>> new_ids;
    for (size_t i = 0; i < a.envelopes.size(); ++i) {
      auto& bytes = a.envelopes[i];
      auto* env = ev::GetMutableEnvelope(bytes.data());
      ++head.highest;
      ++pos;
      // check_batch made sure every slot exists, so these cannot fail.
      env->mutate_sequence(head.highest);
      env->mutate_position(pos);
      env->mutate_timestamp_ns(ts);
      std::memcpy(env->mutable_prev_hash()->data(), head.head_hash.data(), head.head_hash.size());
      head.head_hash = hash_of(bytes);
      batch.Put(event_key(stream, head.highest), bytes);
      batch.Put(global_key(pos), global_entry::encode(stream, head.highest, head.head_hash));
      if (!id_keys[i].empty()) {
        std::string ival;
        put_be64(ival, head.highest);
        put_be64(ival, pos);
        batch.Put(id_keys[i], ival);
        new_ids.emplace_back(std::move(id_keys[i]), std::pair{head.highest, pos});
      }
    }
    if (!head.has_record) {
      batch.Put(head_key(stream), head.record.encode());
      head.has_record = true;
    }
    **head_p = head;
    for (auto& [k, v] : new_ids)
      group_ids_[std::move(k)] = v;
    res.last_sequence = head.highest;
    res.last_position = pos;
    return res;
  }

  void write_appends(written_group& g) {
    auto& group = g.ops;
    if (heads_.size() > max_cached_heads)
      heads_.clear();
    group_ids_.clear();
    rocksdb::WriteBatch batch;
    const uint64_t first_pos = last_written_position_;
    uint64_t pos = first_pos;
    int64_t ts = std::max(now_ns(), last_ts_);
    g.outcomes.resize(group.size());
    auto failed = failure();
    for (size_t i = 0; i < group.size(); ++i) {
      auto& a = std::get<append_op>(group[i]);
      if (failed) {
        g.outcomes[i] = result<append_result>(*failed);
        continue;
      }
      batch.SetSavePoint();
      uint64_t pos_before = pos;
      auto r = stage_append(a, batch, pos, ts);
      if (!r || r->duplicate) {
        (void)batch.RollbackToSavePoint();
        pos = pos_before;
      } else {
        (void)batch.PopSavePoint();
      }
      g.outcomes[i] = std::move(r);
    }
    group_ids_.clear();
    if (pos == first_pos)
      return;
    std::string pval;
    put_be64(pval, pos);
    batch.Put(last_position_key, pval);
    auto s = db_->Write(write_opts_, &batch);
    if (!s.ok()) {
      // Nothing of the group is stored: forget what the cache learned from it. The stamps in
      // the buffers are void; callers get them back with the error.
      heads_.clear();
      auto err = db_error("append to", "journal", s);
      for (auto& r : g.outcomes)
        if (*r && !(*r)->duplicate)
          r = result<append_result>(err);
      return;
    }
    last_ts_ = ts;
    last_written_position_ = pos;
    g.wrote = true;
    g.snap = take_snapshot();
    g.last_position = pos;
  }

  void write_delete(written_group& g) {
    auto& d = std::get<delete_op>(g.ops.front());
    if (auto failed = failure()) {
      g.deleted = result<uint64_t>(*failed);
      return;
    }
    g.deleted = stage_and_write_delete(d);
    if (*g.deleted && **g.deleted > 0) {
      g.wrote = true;
      g.snap = take_snapshot();
      g.last_position = last_written_position_;
    }
  }

  result<uint64_t> stage_and_write_delete(delete_op& d) {
    auto head_p = head_of(d.stream);
    if (!head_p)
      return head_p.error();
    head_state head = **head_p;
    uint64_t to = std::min(d.to_sequence, head.highest);
    if (to <= head.record.deleted_to)
      return uint64_t{0};
    rocksdb::WriteBatch batch;
    auto prefix = event_prefix(d.stream);
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    uint64_t n = 0;
    std::string bytes;
    for (it->Seek(event_key(d.stream, head.record.deleted_to + 1)); it->Valid(); it->Next()) {
      auto k = it->key();
      if (k.size() != prefix.size() + 8 || !k.starts_with(prefix))
        break;
      uint64_t seq = get_be64(k.data() + prefix.size());
      if (seq > to)
        break;
      bytes.assign(it->value().data(), it->value().size());
      if (seq == to)
        head.record.anchor_hash = hash_of(bytes);
      batch.Delete(k);
      ++n;
      // The index entries are found through the event; a corrupt event leaves its (harmless,
      // skipped) index entries behind.
      if (auto env = schemas::verify_envelope(bytes); env) {
        batch.Delete(global_key((*env)->position()));
        if (auto* id = (*env)->event_id(); id && id->size() > 0)
          batch.Delete(id_key(d.stream, id->string_view()));
      }
    }
    if (!it->status().ok())
      return db_error("delete events of", d.stream, it->status());
    head.record.deleted_to = to;
    head.has_record = true;
    batch.Put(head_key(d.stream), head.record.encode());
    auto s = db_->Write(write_opts_, &batch);
    if (!s.ok()) {
      heads_.erase(d.stream);
      return db_error("delete events of", d.stream, s);
    }
    **head_p = head;
    return n;
  }

  std::unique_ptr<rocksdb::DB> db_;
  journal_options opts_;
  bool secondary_;
  /// Event writes never sync themselves (the sync thread or the periodic sync does).
  rocksdb::WriteOptions write_opts_;
  /// Snapshot writes are direct and sync when the journal does.
  rocksdb::WriteOptions snapshot_write_opts_;
  std::shared_ptr<commit_signal> signal_;
  /// Published state: what readers read (durable_) and the last position it holds.
  std::mutex published_mtx_;
  std::shared_ptr<const rocksdb::Snapshot> durable_;  // GUARDED_BY(published_mtx_)
  std::atomic<uint64_t> last_position_{0};            // written under published_mtx_
  /// Secondary only: catch_up (exclusive) never runs in the middle of a read (shared).
  std::shared_mutex catch_up_mtx_;

  std::mutex failed_mtx_;
  std::optional<error_info> failed_;  // GUARDED_BY(failed_mtx_)
  std::atomic<bool> has_failed_{false};

  std::mutex sync_mtx_;
  std::condition_variable sync_cv_;
  std::vector<std::unique_ptr<written_group>> unsynced_;  // GUARDED_BY(sync_mtx_)
  bool sync_stopping_ = false;                            // GUARDED_BY(sync_mtx_)
  std::thread syncer_;

  std::mutex queue_mtx_;
  std::condition_variable queue_cv_;
  std::deque<op> queue_;  // GUARDED_BY(queue_mtx_)
  bool stopping_ = false;  // GUARDED_BY(queue_mtx_)
  std::thread writer_;

  // Commit thread only.
  uint64_t last_written_position_ = 0;
  std::unordered_map<std::string, head_state> heads_;
  std::unordered_map<std::string, std::pair<uint64_t, uint64_t>> group_ids_;
  int64_t last_ts_ = 0;
  EVP_MD_CTX* ctx_ = nullptr;
};

result<std::vector<std::string>> live_subscription::next(size_t max_count,
                                                         std::chrono::milliseconds wait) {
  auto deadline = std::chrono::steady_clock::now() + wait;
  std::vector<std::string> out;
  for (;;) {
    if (closed_)
      return fail(errc::closed, "subscription closed");
    if (secondary_) {
      if (auto ok = store_.catch_up(); !ok)
        return ok.error();
    }
    auto upto = store_.last_position();
    if (next_ <= upto) {
      auto next = store_.scan_global(next_, upto, max_count, out);
      if (!next)
        return next.error();
      next_ = *next;
      if (!out.empty())
        return out;
      continue;  // everything in range was deleted; look again
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return out;
    auto& sig = store_.signal();
    std::unique_lock<std::mutex> lock(sig.mtx);
    if (secondary_) {
      // Nothing wakes us: poll the primary's progress.
      sig.cv.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() +
                                                   std::chrono::milliseconds(50)),
                        [&] { return closed_.load(); });
    } else {
      sig.cv.wait_until(lock, deadline,
                        [&] { return closed_.load() || store_.last_position() >= next_; });
    }
  }
}

/// Prefixes under which keys arrive in increasing order: one stream's events, ids and snapshots
/// ('e'/'i'/'s' stream '\0'), the global index ('g'), and each single-key record. The memtable
/// keeps an insert hint per prefix, so appending to a stream does not search the skiplist from
/// the top for every key (most of the commit thread's CPU otherwise).
class insert_hint_prefix final : public rocksdb::SliceTransform {
 public:
  const char* Name() const override { return "ferry.InsertHintPrefix"; }
  // The memtable passes internal keys (user key + 8-byte sequence/type trailer). Only keys that
  // grow in order get a hint; rewriting one key ('h', 'p') sorts before its old version, where
  // a hint never helps (and a per-version prefix would only pile up hints).
  rocksdb::Slice Transform(const rocksdb::Slice& key) const override {
    if (key[0] == 'g')
      return rocksdb::Slice(key.data(), 1);
    const void* z = std::memchr(key.data(), '\0', key.size());
    return rocksdb::Slice(key.data(), static_cast<const char*>(z) - key.data() + 1);
  }
  bool InDomain(const rocksdb::Slice& key) const override {
    if (key.size() <= 8)
      return false;
    if (key[0] == 'g')
      return true;
    return (key[0] == 'e' || key[0] == 'i' || key[0] == 's') &&
           std::memchr(key.data(), '\0', key.size() - 8) != nullptr;
  }
};

rocksdb::Options base_options() {
  rocksdb::Options o;
  // One writer thread: concurrent memtable inserts buy nothing, and insert hints need them off.
  o.allow_concurrent_memtable_write = false;
  o.memtable_insert_with_hint_prefix_extractor = std::make_shared<insert_hint_prefix>();
  o.paranoid_checks = true;
  o.keep_log_file_num = 4;
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  o.max_background_jobs = 2;
  rocksdb::BlockBasedTableOptions t;
  // Idempotency lookups are mostly misses: a bloom filter answers them without reading blocks.
  t.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  t.whole_key_filtering = true;
  o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(t));
  o.memtable_whole_key_filtering = true;
  o.memtable_prefix_bloom_size_ratio = 0.02;
  return o;
}

/// Checks (primary) or writes (new store) the format marker.
result<void> check_format(rocksdb::DB& db, const std::filesystem::path& dir, bool writable) {
  std::string v;
  auto s = db.Get(rocksdb::ReadOptions(), format_key, &v);
  if (s.ok()) {
    if (v != format_marker)
      return fail(errc::corrupt, "journal " + dir.string() + " has format '" + v +
                                   "', this build reads '" + std::string(format_marker) + "'");
    return {};
  }
  if (!s.IsNotFound())
    return db_error("read the format of journal", dir.string(), s);
  std::unique_ptr<rocksdb::Iterator> it(db.NewIterator(rocksdb::ReadOptions()));
  it->SeekToFirst();
  if (it->Valid())
    return fail(errc::corrupt,
                "journal " + dir.string() +
                  " was written by an earlier development version of ferry (no hash chains, "
                  "format 1); move it away to start a fresh one");
  if (!writable)
    return {};
  rocksdb::WriteOptions wo;
  wo.sync = true;
  if (auto w = db.Put(wo, format_key, std::string(format_marker)); !w.ok())
    return db_error("write the format marker of journal", dir.string(), w);
  return {};
}

}  // namespace

result<std::unique_ptr<event_store>> open_journal(const journal_options& opts) {
  std::error_code ec;
  if (!std::filesystem::exists(opts.dir / "CURRENT", ec)) {
    if (!opts.create_if_missing)
      return fail(errc::not_found, "open journal " + opts.dir.string() + ": no journal there");
    std::filesystem::create_directories(opts.dir, ec);
    if (ec)
      return fail("create journal directory " + opts.dir.string() + ": " + ec.message());
  }
  auto o = base_options();
  o.create_if_missing = opts.create_if_missing;
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::Open(o, opts.dir.string(), &raw);
  if (!s.ok()) {
    if (s.IsIOError() && s.ToString().find("lock") != std::string::npos)
      return fail(errc::busy, "open journal " + opts.dir.string() +
                                ": it is in use by another process (is ferryd running?): " +
                                s.ToString());
    return db_error("open journal", opts.dir.string(), s);
  }
  std::unique_ptr<rocksdb::DB> db(raw);
  if (auto ok = check_format(*db, opts.dir, true); !ok)
    return ok.error();
  return std::unique_ptr<event_store>(new rocks_event_store(std::move(db), opts, false));
}

result<std::unique_ptr<event_store>> open_journal_secondary(
  const std::filesystem::path& dir, const std::filesystem::path& scratch_dir) {
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec))
    return fail(errc::not_found, "open journal " + dir.string() + ": no such directory");
  if (!std::filesystem::exists(dir / "CURRENT", ec))
    return fail(errc::not_found,
                "open journal " + dir.string() + ": no journal there (wrong --data-dir?)");
  std::filesystem::create_directories(scratch_dir, ec);
  if (ec)
    return fail("create scratch directory " + scratch_dir.string() + ": " + ec.message());
  auto o = base_options();
  o.max_open_files = -1;  // required for secondary instances
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::OpenAsSecondary(o, dir.string(), scratch_dir.string(), &raw);
  if (!s.ok())
    return db_error("open journal (secondary)", dir.string(), s);
  std::unique_ptr<rocksdb::DB> db(raw);
  if (auto c = db->TryCatchUpWithPrimary(); !c.ok())
    return db_error("catch up with primary journal", dir.string(), c);
  if (auto ok = check_format(*db, dir, false); !ok)
    return ok.error();
  journal_options opts;
  opts.dir = dir;
  return std::unique_ptr<event_store>(new rocks_event_store(std::move(db), opts, true));
}

}  // namespace ferry::storage
