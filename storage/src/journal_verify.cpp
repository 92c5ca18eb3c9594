// verify_journal: walks event records in key order and checks every stream's hash chain.
//
// Two records commit to each event's stored bytes: its global index entry (the hash recorded at
// append) and the next event's prev_hash. For each event s, in order:
//  1. the record must pass the FlatBuffers verifier and be the event its key names;
//  2. H(s) must equal the hash recorded in its index entry — else s was altered;
//  3. prev_hash(s) must equal H(s-1) — else s-1 was altered and its index entry forged along
//     with it (step 2 passed for s-1), or, for the first retained event, the chain does not start
//     at the all-zero hash / the anchor kept by retention.
// So a single altered event is named exactly. Removing a stream's newest events together with
// their index entries is visible only against a head hash recorded elsewhere (ferryctl verify
// prints them).

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>

#include <rocksdb/iterator.h>

#include "ferry/schemas/events.h"
#include "journal_internal.h"
#include "keys.h"

namespace ferry::storage::detail {

namespace {

namespace ev = ferry::events::v1;

/// Checks one stream's events, fed in key order.
class chain_checker {
 public:
  chain_checker(rocksdb::DB& db, const rocksdb::ReadOptions& ro, std::string stream,
                stream_record record, bool record_found)
    : db_(db), ro_(ro), stream_(std::move(stream)), record_(record),
      record_found_(record_found), expected_seq_(record.deleted_to + 1),
      link_(record.deleted_to > 0 ? record.anchor_hash : digest{}) {}

  /// Feeds the stored record of `seq`. Returns false once a problem is found (stop feeding).
  result<bool> feed(uint64_t seq, std::string_view raw) {
    if (problem_)
      return false;
    if (!record_found_)
      return report(seq, 0, "events exist but the stream has no stream record");
    if (seq != expected_seq_)
      return report(expected_seq_, 0,
                    seq < expected_seq_
                      ? "event " + std::to_string(seq) + " is still stored although events up to " +
                          std::to_string(record_.deleted_to) + " were deleted"
                      : "missing (the next stored event is " + std::to_string(seq) + ")");
    bytes_.assign(raw.data(), raw.size());  // aligned copy for the verifier
    auto verified = schemas::verify_envelope(bytes_);
    if (!verified)
      return report(seq, 0, "not a valid event record: " + verified.error().message);
    const ev::Envelope* env = *verified;
    const uint64_t pos = env->position();
    if (!env->stream_id() || env->stream_id()->string_view() != stream_ ||
        env->sequence() != seq)
      return report(seq, pos,
                    "the record holds " + (env->stream_id() ? env->stream_id()->str() : "?") +
                      " seq " + std::to_string(env->sequence()));
    const digest hash = sha256(bytes_);
    auto s = db_.Get(ro_, global_key(pos), &index_value_);
    if (s.IsNotFound())
      return report(seq, pos, "its global index entry (position " + std::to_string(pos) +
                                ") is missing");
    if (!s.ok())
      return db_error("verify: read position", std::to_string(pos), s);
    auto entry = global_entry::decode(index_value_);
    if (!entry || entry->stream != stream_ || entry->sequence != seq)
      return report(seq, pos, "its global index entry (position " + std::to_string(pos) +
                                ") names another event");
    if (entry->hash != hash)
      return report(seq, pos, "altered after it was written: its bytes do not match the hash "
                              "recorded when it was appended");
    auto* prev = env->prev_hash();
    bool link_ok = prev && prev->size() == link_.size() &&
                   std::memcmp(prev->data(), link_.data(), link_.size()) == 0;
    if (!link_ok) {
      if (seq - 1 == record_.deleted_to)
        return report(seq, pos,
                      record_.deleted_to == 0
                        ? "its prev_hash is not the all-zero start of a chain"
                        : "does not link to the anchor kept when events up to " +
                            std::to_string(record_.deleted_to) + " were deleted");
      return report(seq - 1, prev_position_,
                    "altered after it was written (with its index entry): its bytes do not "
                    "match what seq " + std::to_string(seq) + " committed to");
    }
    prev_position_ = pos;
    link_ = hash;
    ++expected_seq_;
    ++checked_;
    return true;
  }

  /// Called after the last record. Returns the problem, if any.
  std::optional<verify_problem> finish() { return problem_; }

  uint64_t checked() const { return checked_; }

 private:
  bool report(uint64_t seq, uint64_t position, std::string reason) {
    if (!problem_)
      problem_ = verify_problem{stream_, seq, position, std::move(reason)};
    return false;
  }

  rocksdb::DB& db_;
  const rocksdb::ReadOptions& ro_;
  std::string stream_;
  stream_record record_;
  bool record_found_;
  uint64_t expected_seq_;
  digest link_;
  uint64_t prev_position_ = 0;
  uint64_t checked_ = 0;
  std::string bytes_;
  std::string index_value_;
  std::optional<verify_problem> problem_;
};

result<std::pair<stream_record, bool>> load_record(rocksdb::DB& db,
                                                   const rocksdb::ReadOptions& ro,
                                                   const std::string& stream) {
  std::string v;
  auto s = db.Get(ro, head_key(stream), &v);
  if (s.IsNotFound())
    return std::pair{stream_record{}, false};
  if (!s.ok())
    return db_error("read the stream record of", stream, s);
  auto r = stream_record::decode(stream, v);
  if (!r)
    return r.error();
  return std::pair{*r, true};
}

}  // namespace

result<verify_report> verify_journal(rocksdb::DB& db, const rocksdb::ReadOptions& base,
                                     std::string_view only_stream,
                                     const std::function<void(uint64_t)>& progress) {
  verify_report report;
  // One consistent view (the caller's): a verify next to a running writer checks a point in time.
  rocksdb::ReadOptions ro = base;
  ro.readahead_size = 2 << 20;
  ro.fill_cache = false;

  auto tick = [&] {
    if (progress && report.events_checked % 100000 == 0)
      progress(report.events_checked);
  };

  std::unique_ptr<chain_checker> current;
  std::string current_stream;
  auto close_stream = [&] {
    if (!current)
      return;
    if (auto p = current->finish())
      report.problems.push_back(std::move(*p));
    ++report.streams_checked;
    current.reset();
  };
  auto open_stream = [&](const std::string& stream) -> result<void> {
    close_stream();
    auto h = load_record(db, ro, stream);
    if (!h)
      return h.error();
    current = std::make_unique<chain_checker>(db, ro, stream, h->first, h->second);
    current_stream = stream;
    return {};
  };

  // Streams with a head record but no stored events still need their head checked.
  std::string start = only_stream.empty() ? std::string("e") : event_prefix(only_stream);
  if (!only_stream.empty()) {
    if (auto ok = validate_stream_name(only_stream); !ok)
      return ok.error();
    auto h = load_record(db, ro, std::string(only_stream));
    if (!h)
      return h.error();
    if (!h->second)
      return fail(errc::not_found, "verify " + std::string(only_stream) + ": no such stream");
  }

  std::unique_ptr<rocksdb::Iterator> it(db.NewIterator(ro));
  for (it->Seek(start); it->Valid(); it->Next()) {
    auto k = it->key();
    if (!k.starts_with(start))
      break;
    std::string_view key(k.data(), k.size());
    if (key.size() < 10 || key[key.size() - 9] != '\0') {
      report.problems.push_back(
        verify_problem{"(unknown)", 0, 0, "malformed event key of " + std::to_string(k.size()) +
                                            " bytes"});
      continue;
    }
    std::string stream(key.substr(1, key.size() - 10));
    uint64_t seq = get_be64(key.data() + key.size() - 8);
    if (!current || stream != current_stream)
      if (auto ok = open_stream(stream); !ok)
        return ok.error();
    auto fed = current->feed(seq, std::string_view(it->value().data(), it->value().size()));
    if (!fed)
      return fed.error();
    if (*fed) {
      ++report.events_checked;
      tick();
    }
  }
  if (!it->status().ok())
    return db_error("verify: read events", only_stream.empty() ? "of all streams" : only_stream,
                    it->status());
  if (!current && !only_stream.empty())
    if (auto ok = open_stream(std::string(only_stream)); !ok)
      return ok.error();
  close_stream();

  if (!only_stream.empty())
    return report;

  // Stream records must be readable (a stream whose events are all deleted has only its record).
  std::string value;
  std::unique_ptr<rocksdb::Iterator> heads(db.NewIterator(ro));
  for (heads->Seek("h"); heads->Valid(); heads->Next()) {
    auto k = heads->key();
    if (k.empty() || k[0] != 'h')
      break;
    std::string stream(k.data() + 1, k.size() - 1);
    auto r = stream_record::decode(stream, std::string_view(heads->value().data(),
                                                            heads->value().size()));
    if (!r)
      report.problems.push_back(verify_problem{stream, 0, 0, r.error().message});
  }
  if (!heads->status().ok())
    return db_error("verify: read", "the stream records", heads->status());

  // The global index: every entry must name a stored event that carries that position.
  std::unordered_set<std::string> reported;
  for (auto& p : report.problems)
    reported.insert(p.stream);
  std::unique_ptr<rocksdb::Iterator> g(db.NewIterator(ro));
  uint64_t index_problems = 0;
  for (g->Seek("g"); g->Valid() && index_problems < 10; g->Next()) {
    auto k = g->key();
    if (k.empty() || k[0] != 'g')
      break;
    if (k.size() != 9) {
      report.problems.push_back(verify_problem{"(global index)", 0, 0, "malformed index key"});
      ++index_problems;
      continue;
    }
    uint64_t pos = get_be64(k.data() + 1);
    auto entry = global_entry::decode(std::string_view(g->value().data(), g->value().size()));
    if (!entry) {
      report.problems.push_back(
        verify_problem{"(global index)", 0, pos, "malformed index entry"});
      ++index_problems;
      continue;
    }
    std::string stream(entry->stream);
    uint64_t seq = entry->sequence;
    auto s = db.Get(ro, entry->event_key(), &value);
    std::string reason;
    if (s.IsNotFound()) {
      reason = "the global index names an event that is not stored";
    } else if (!s.ok()) {
      return db_error("verify: read position", std::to_string(pos), s);
    } else if (auto env = schemas::verify_envelope(value); env && (*env)->position() != pos) {
      reason = "the global index entry for position " + std::to_string(pos) +
               " names an event that carries position " + std::to_string((*env)->position());
    }
    // One problem per stream: the chain walk may already have named this one's first break.
    if (!reason.empty() && !reported.contains(stream)) {
      reported.insert(stream);
      report.problems.push_back(verify_problem{stream, seq, pos, std::move(reason)});
      ++index_problems;
    }
  }
  if (!g->status().ok())
    return db_error("verify: read", "the global index", g->status());
  return report;
}

}  // namespace ferry::storage::detail
