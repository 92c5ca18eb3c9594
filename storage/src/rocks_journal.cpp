// rocks_event_store: the RocksDB implementation of event_store.
//
// Key layout (one default column family, byte-ordered):
//   'e' stream '\0' be64(seq)   → envelope bytes
//   'h' stream                  → be64(highest seq)    (never decreases)
//   'g' be64(position)          → stream '\0' be64(seq) (global order index)
//   'p'                         → be64(last position)
// Appends take a mutex for sequence/position assignment and write one WriteBatch.

#include <cctype>
#include <chrono>
#include <cstring>
#include <mutex>

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace ferry::storage {

namespace {

namespace ev = ferry::events::v1;

void put_be64(std::string& out, uint64_t v) {
  for (int i = 7; i >= 0; --i)
    out.push_back(static_cast<char>((v >> (i * 8)) & 0xff));
}

uint64_t get_be64(std::string_view s) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8 && i < s.size(); ++i)
    v = v << 8 | static_cast<uint8_t>(s[i]);
  return v;
}

std::string event_key(std::string_view stream, uint64_t seq) {
  std::string k;
  k.reserve(stream.size() + 10);
  k.push_back('e');
  k.append(stream);
  k.push_back('\0');
  put_be64(k, seq);
  return k;
}

std::string head_key(std::string_view stream) {
  std::string k("h");
  k.append(stream);
  return k;
}

const std::string last_position_key = "p";

error_info db_error(std::string_view what, std::string_view object, const rocksdb::Status& s) {
  return error_info{std::string(what) + " " + std::string(object) + ": " + s.ToString()};
}

result<void> validate_stream_name(std::string_view stream) {
  if (stream.empty() || stream.size() > 200)
    return fail("stream name must be 1..200 bytes, got " + std::to_string(stream.size()));
  for (char c : stream)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return fail("stream name '" + std::string(stream) +
                  "' may contain only letters, digits, '-', '_' and '.'");
  return {};
}

class rocks_event_store final : public event_store {
 public:
  rocks_event_store(std::unique_ptr<rocksdb::DB> db, bool sync, bool secondary)
    : db_(std::move(db)), secondary_(secondary) {
    write_opts_.sync = sync;
    std::string v;
    if (db_->Get(rocksdb::ReadOptions(), last_position_key, &v).ok())
      last_position_ = get_be64(v);
  }

  ~rocks_event_store() override {
    if (!secondary_)
      (void)db_->FlushWAL(true);
    (void)db_->Close();
  }

  result<append_result> append(std::string_view stream, std::vector<std::string>& envelopes,
                               expected_version expected) override {
    if (secondary_)
      return fail("append to " + std::string(stream) + ": journal is open read-only");
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    if (envelopes.empty())
      return fail("append to " + std::string(stream) + ": no events given");
    std::lock_guard<std::mutex> guard(mtx_);
    auto head = read_head(stream);
    if (!head)
      return head.error();
    uint64_t seq = *head;
    switch (expected.k) {
      case expected_version::kind::any: break;
      case expected_version::kind::no_stream:
        if (seq != 0)
          return fail("append to " + std::string(stream) + ": expected no stream, but it is at " +
                      std::to_string(seq));
        break;
      case expected_version::kind::exact:
        if (seq != expected.sequence)
          return fail("append to " + std::string(stream) + ": expected version " +
                      std::to_string(expected.sequence) + ", but it is at " + std::to_string(seq));
        break;
    }
    auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
    rocksdb::WriteBatch batch;
    uint64_t pos = last_position_;
    append_result res;
    res.first_sequence = seq + 1;
    for (auto& bytes : envelopes) {
      auto verified = schemas::verify_envelope(bytes);
      if (!verified)
        return fail("append to " + std::string(stream) + ": " + verified.error().message);
      auto* sid = (*verified)->stream_id();
      if (!sid || sid->string_view() != stream)
        return fail("append to " + std::string(stream) + ": envelope names stream '" +
                    (sid ? sid->str() : std::string()) + "'");
      auto* env = ev::GetMutableEnvelope(bytes.data());
      ++seq;
      ++pos;
      if (!env->mutate_sequence(seq) || !env->mutate_position(pos) ||
          !env->mutate_timestamp_ns(now))
        return fail("append to " + std::string(stream) +
                    ": envelope lacks sequence/position/timestamp fields (build it with "
                    "schemas::build_envelope)");
      auto key = event_key(stream, seq);
      batch.Put(key, bytes);
      std::string gkey("g");
      put_be64(gkey, pos);
      batch.Put(gkey, rocksdb::Slice(key.data() + 1, key.size() - 1));
    }
    std::string head_val, pos_val;
    put_be64(head_val, seq);
    put_be64(pos_val, pos);
    batch.Put(head_key(stream), head_val);
    batch.Put(last_position_key, pos_val);
    auto s = db_->Write(write_opts_, &batch);
    if (!s.ok())
      return db_error("append to", stream, s);
    last_position_ = pos;
    res.last_sequence = seq;
    res.last_position = pos;
    return res;
  }

  result<std::vector<std::string>> read_stream(std::string_view stream, uint64_t from_sequence,
                                               uint64_t max_count) override {
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    std::vector<std::string> out;
    if (max_count == 0)
      return out;
    auto start = event_key(stream, from_sequence == 0 ? 1 : from_sequence);
    auto prefix_len = stream.size() + 2;  // 'e' stream '\0'
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(start); it->Valid() && out.size() < max_count; it->Next()) {
      auto k = it->key();
      if (k.size() != prefix_len + 8 || std::memcmp(k.data(), start.data(), prefix_len) != 0)
        break;
      auto v = it->value();
      // Copy first: RocksDB's value bytes are not aligned as FlatBuffers requires.
      out.emplace_back(v.data(), v.size());
      auto verified = schemas::verify_envelope(out.back());
      if (!verified)
        return fail("read " + std::string(stream) + " seq " +
                    std::to_string(get_be64(std::string_view(k.data() + prefix_len, 8))) + ": " +
                    verified.error().message);
    }
    if (!it->status().ok())
      return db_error("read", stream, it->status());
    return out;
  }

  result<uint64_t> highest_sequence(std::string_view stream) override {
    if (auto ok = validate_stream_name(stream); !ok)
      return ok.error();
    return read_head(stream);
  }

  result<std::vector<std::string>> list_streams(std::string_view prefix) override {
    std::vector<std::string> out;
    std::string start = "h" + std::string(prefix);
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
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

  uint64_t last_position() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return last_position_;
  }

  result<void> flush() override {
    if (secondary_)
      return {};
    if (auto s = db_->FlushWAL(true); !s.ok())
      return db_error("flush WAL of", "journal", s);
    if (auto s = db_->Flush(rocksdb::FlushOptions()); !s.ok())
      return db_error("flush memtables of", "journal", s);
    return {};
  }

  result<void> catch_up() override {
    if (!secondary_)
      return {};
    if (auto s = db_->TryCatchUpWithPrimary(); !s.ok())
      return db_error("catch up with", "primary journal", s);
    return {};
  }

 private:
  result<uint64_t> read_head(std::string_view stream) {
    std::string v;
    auto s = db_->Get(rocksdb::ReadOptions(), head_key(stream), &v);
    if (s.IsNotFound())
      return uint64_t{0};
    if (!s.ok())
      return db_error("read head of", stream, s);
    return get_be64(v);
  }

  std::unique_ptr<rocksdb::DB> db_;
  bool secondary_;
  rocksdb::WriteOptions write_opts_;
  mutable std::mutex mtx_;
  uint64_t last_position_ = 0;  // GUARDED_BY(mtx_)
};

}  // namespace

result<std::unique_ptr<event_store>> open_journal(const journal_options& opts) {
  std::error_code ec;
  std::filesystem::create_directories(opts.dir, ec);
  if (ec)
    return fail("create journal directory " + opts.dir.string() + ": " + ec.message());
  rocksdb::Options o;
  o.create_if_missing = true;
  o.paranoid_checks = true;
  o.keep_log_file_num = 4;
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::Open(o, opts.dir.string(), &raw);
  if (!s.ok()) {
    if (s.IsIOError() && s.ToString().find("lock") != std::string::npos)
      return fail("open journal " + opts.dir.string() +
                  ": it is in use by another process (is ferryd running?): " + s.ToString());
    return db_error("open journal", opts.dir.string(), s);
  }
  return std::unique_ptr<event_store>(
    new rocks_event_store(std::unique_ptr<rocksdb::DB>(raw), opts.sync, false));
}

result<std::unique_ptr<event_store>> open_journal_secondary(
  const std::filesystem::path& dir, const std::filesystem::path& scratch_dir) {
  std::error_code ec;
  if (!std::filesystem::exists(dir / "CURRENT", ec))
    return fail("open journal " + dir.string() + ": no journal there (wrong --data-dir?)");
  std::filesystem::create_directories(scratch_dir, ec);
  if (ec)
    return fail("create scratch directory " + scratch_dir.string() + ": " + ec.message());
  rocksdb::Options o;
  o.max_open_files = -1;  // required for secondary instances
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::OpenAsSecondary(o, dir.string(), scratch_dir.string(), &raw);
  if (!s.ok())
    return db_error("open journal (secondary)", dir.string(), s);
  std::unique_ptr<rocksdb::DB> db(raw);
  if (auto c = db->TryCatchUpWithPrimary(); !c.ok())
    return db_error("catch up with primary journal", dir.string(), c);
  return std::unique_ptr<event_store>(new rocks_event_store(std::move(db), false, true));
}

}  // namespace ferry::storage
