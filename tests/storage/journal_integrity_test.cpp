// The journal's integrity guarantees: each stream is a SHA-256 hash chain over the stored bytes
// (prev_hash of event n = SHA-256 of event n-1, head hash = SHA-256 of the last event), verify()
// names the first event whose bytes were changed behind the journal's back, corrupt records are
// errc::corrupt errors naming stream and sequence (never a crash), and readers get older schema
// versions upcast while verify() still checks the bytes as stored.
//
// The tampering tests close the journal and edit its RocksDB directly. The on-disk layout
// (storage/src/keys.h, format "ferry-journal/3": one column family, byte-ordered keys,
// be64 = 8-byte big-endian):
//   'e' + stream + '\0' + be64(seq)   → envelope bytes as stored
//   'g' + be64(position)              → stream + '\0' + be64(seq) + SHA-256 of the stored bytes
//   'h' + stream                      → be64 deleted_to, 32-byte hash of event deleted_to
//   'i' + stream + '\0' + event_id    → be64 seq, be64 position
//   's' + stream + '\0' + be64(seq)   → be64 timestamp_ns, snapshot bytes
//   'p'                               → be64 last position
//   'f'                               → format marker
// The tests rely only on the 'e' keys and on 'g' values starting with stream '\0' be64(seq);
// the head hash is found by content (format 2 kept it, with the highest sequence, in 'h').
#define BOOST_TEST_MODULE storage_journal_integrity
#include <boost/test/unit_test.hpp>

#include <openssl/evp.h>

#include <algorithm>
#include <cctype>
#include <set>

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include "journal_test_support.h"

using namespace ferry::storage;
using namespace ferry::storage::testing;
using ferry::errc;

namespace {

digest sha256(std::string_view bytes) {
  digest d{};
  unsigned int len = 0;
  BOOST_REQUIRE(EVP_Digest(bytes.data(), bytes.size(), d.data(), &len, EVP_sha256(), nullptr) == 1);
  BOOST_REQUIRE(len == d.size());
  return d;
}

digest prev_hash_of(std::string_view bytes) {
  auto* v = envelope(bytes)->prev_hash();
  BOOST_REQUIRE_MESSAGE(v != nullptr && v->size() == 32, "prev_hash missing or not 32 bytes");
  digest d{};
  std::copy(v->begin(), v->end(), d.begin());
  return d;
}

std::string hex(const digest& d) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  for (auto b : d) {
    s.push_back(digits[b >> 4]);
    s.push_back(digits[b & 0xf]);
  }
  return s;
}

std::string be64(uint64_t v) {
  std::string out;
  for (int i = 7; i >= 0; --i)
    out.push_back(static_cast<char>((v >> (i * 8)) & 0xff));
  return out;
}

std::string event_key(std::string_view stream, uint64_t seq) {
  return "e" + std::string(stream) + std::string(1, '\0') + be64(seq);
}
std::string global_key(uint64_t position) { return "g" + be64(position); }

/// The journal's RocksDB opened directly (the journal must be closed), for tampering.
class raw_db {
 public:
  explicit raw_db(const fs::path& dir) {
    rocksdb::Options o;
    o.create_if_missing = false;
    rocksdb::DB* db = nullptr;
    auto s = rocksdb::DB::Open(o, dir.string(), &db);
    BOOST_REQUIRE_MESSAGE(s.ok(), "rocksdb::DB::Open " << dir << ": " << s.ToString());
    db_.reset(db);
  }
  ~raw_db() {
    if (db_)
      (void)db_->Close();
  }

  std::string get(const std::string& key) {
    std::string v;
    auto s = db_->Get(rocksdb::ReadOptions(), key, &v);
    BOOST_REQUIRE_MESSAGE(s.ok(), "raw get: " << s.ToString());
    return v;
  }
  /// Every key whose value contains `needle`.
  std::vector<std::string> keys_whose_value_contains(const std::string& needle) {
    std::vector<std::string> out;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekToFirst(); it->Valid(); it->Next())
      if (it->value().ToString().find(needle) != std::string::npos)
        out.push_back(it->key().ToString());
    BOOST_REQUIRE_MESSAGE(it->status().ok(), "raw scan: " << it->status().ToString());
    return out;
  }
  void remove(const std::string& key) {
    rocksdb::WriteOptions w;
    w.sync = true;
    auto s = db_->Delete(w, key);
    BOOST_REQUIRE_MESSAGE(s.ok(), "raw delete: " << s.ToString());
  }
  void put(const std::string& key, const std::string& value) {
    rocksdb::WriteOptions w;
    w.sync = true;
    auto s = db_->Put(w, key, value);
    BOOST_REQUIRE_MESSAGE(s.ok(), "raw put: " << s.ToString());
  }

 private:
  std::unique_ptr<rocksdb::DB> db_;
};

/// Appends `n` OutputChunk events "payload-<seq>-xxxxxxxx" to `stream` one by one; returns their
/// positions (index 0 unused).
std::vector<uint64_t> append_payloads(event_store& j, std::string_view stream, int n) {
  std::vector<uint64_t> positions{0};
  for (int i = 1; i <= n; ++i) {
    sc::envelope_meta m;
    m.stream_id = std::string(stream);
    std::vector<std::string> e{sc::output_chunk(m, 1, ev::OutputStream::stdout,
                                                "payload-" + std::to_string(i) + "-xxxxxxxx")};
    auto r = j.append(stream, e);
    BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
    positions.push_back(r->first_position);
  }
  return positions;
}

std::string problems_text(const verify_report& r) {
  std::string s;
  for (auto& p : r.problems)
    s += "[" + p.stream + " seq " + std::to_string(p.sequence) + " pos " +
         std::to_string(p.position) + ": " + p.reason + "] ";
  return s;
}

/// Runs verify(); checks the report keeps to "at most one problem per stream".
verify_report verify_ok(event_store& j, std::string_view stream = {}) {
  auto r = j.verify(stream);
  BOOST_REQUIRE_MESSAGE(r.ok(), "verify could not run: " << describe(r));
  std::set<std::string> named;
  for (auto& p : r->problems)
    BOOST_TEST(named.insert(p.stream).second,
               "more than one problem for " << p.stream << ": " << problems_text(*r));
  return std::move(*r);
}

/// True when `message` names sequence `seq` as a number of its own (not a digit of another).
bool names_number(const std::string& message, uint64_t seq) {
  const std::string n = std::to_string(seq);
  auto digit = [&](size_t i) {
    return i < message.size() && std::isdigit(static_cast<unsigned char>(message[i]));
  };
  for (size_t at = message.find(n); at != std::string::npos; at = message.find(n, at + 1))
    if ((at == 0 || !digit(at - 1)) && !digit(at + n.size()))
      return true;
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(hash_chain)

BOOST_AUTO_TEST_CASE(prev_hash_links_each_event_to_the_stored_bytes_of_the_one_before) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  // Interleave another stream so positions and sequences differ: chains are per stream.
  for (int round = 0; round < 3; ++round) {
    std::vector<std::string> mine{event("task-chain", "a" + std::to_string(round)),
                                  event("task-chain", "b" + std::to_string(round))};
    BOOST_REQUIRE(j->append("task-chain", mine).ok());
    std::vector<std::string> other{event("task-other", "o" + std::to_string(round))};
    BOOST_REQUIRE(j->append("task-other", other).ok());
  }
  for (std::string_view s : {"task-chain", "task-other"}) {
    auto events = read_all_of(*j, s);
    BOOST_REQUIRE(!events.empty());
    BOOST_TEST((prev_hash_of(events[0]) == digest{}), s << ": event 1 links to all zeros");
    for (size_t k = 1; k < events.size(); ++k)
      BOOST_TEST((prev_hash_of(events[k]) == sha256(events[k - 1])),
                 s << ": prev_hash of " << k + 1 << " is " << hex(prev_hash_of(events[k]))
                   << ", SHA-256 of " << k << " is " << hex(sha256(events[k - 1])));
    auto info = j->info(s);
    BOOST_REQUIRE(info.ok());
    BOOST_TEST(info->highest_sequence == events.size());
    BOOST_TEST((info->head_hash == sha256(events.back())),
               s << ": head " << hex(info->head_hash) << " vs " << hex(sha256(events.back())));
    BOOST_TEST(to_hex(info->head_hash) == hex(sha256(events.back())));
  }
}

BOOST_AUTO_TEST_CASE(the_chain_stays_verifiable_after_deletion_and_continues_from_the_head) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  (void)append_payloads(*j, "task-ret", 5);
  const auto before = read_all_of(*j, "task-ret");
  const auto head_before = j->info("task-ret")->head_hash;
  auto d = j->delete_events("task-ret", 2);
  BOOST_REQUIRE_MESSAGE(d.ok(), describe(d));
  auto after = read_all_of(*j, "task-ret");
  BOOST_REQUIRE(after.size() == 3u);
  // The first retained event still links to the deleted one; nothing was re-stamped.
  BOOST_TEST((after[0] == before[2]));
  BOOST_TEST((prev_hash_of(after[0]) == sha256(before[1])));
  auto info = j->info("task-ret");
  BOOST_REQUIRE(info.ok());
  BOOST_TEST((info->head_hash == head_before));
  auto report = verify_ok(*j, "task-ret");
  BOOST_TEST(report.problems.empty(), problems_text(report));
  BOOST_TEST(report.events_checked == 3u);
  // The next event links to the head.
  std::vector<std::string> next{event("task-ret", "six")};
  BOOST_REQUIRE(j->append("task-ret", next).ok());
  BOOST_TEST((prev_hash_of(next[0]) == head_before));
  BOOST_TEST((j->info("task-ret")->head_hash == sha256(next[0])));
  // Deleting everything keeps the head, also across a reopen, and the chain continues from it.
  BOOST_REQUIRE(j->delete_events("task-ret", 100).ok());
  BOOST_TEST((j->info("task-ret")->head_hash == sha256(next[0])));
  j.reset();
  j = open_store(dir.journal());
  auto reopened = j->info("task-ret");
  BOOST_REQUIRE(reopened.ok());
  BOOST_TEST(reopened->highest_sequence == 6u);
  BOOST_TEST(reopened->deleted_to == 6u);
  BOOST_TEST((reopened->head_hash == sha256(next[0])));
  auto empty = verify_ok(*j);
  BOOST_TEST(empty.problems.empty(), problems_text(empty));
  std::vector<std::string> seventh{event("task-ret", "seven")};
  BOOST_REQUIRE(j->append("task-ret", seventh, expected_version::exact(6)).ok());
  BOOST_TEST((prev_hash_of(seventh[0]) == sha256(next[0])));
  auto after_all = verify_ok(*j);
  BOOST_TEST(after_all.problems.empty(), problems_text(after_all));
}

BOOST_AUTO_TEST_CASE(a_healthy_store_verifies_clean_and_counts_its_events) {
  temp_dir dir;
  {
    auto j = open_store(dir.journal());
    for (int i = 0; i < 3; ++i) {
      std::vector<std::string> b{event("task-a", "x"), event("task-a", "y")};
      BOOST_REQUIRE(j->append("task-a", b).ok());
    }
    (void)append_payloads(*j, "task-b", 4);
    BOOST_REQUIRE(j->delete_events("task-b", 2).ok());
    (void)append_payloads(*j, "tokens", 3);
    BOOST_REQUIRE(j->save_snapshot({"task-a", 4, 1, "snap"}).ok());

    std::vector<uint64_t> progress;
    auto r = j->verify("", [&](uint64_t n) { progress.push_back(n); });
    BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
    BOOST_TEST(r->problems.empty(), problems_text(*r));
    BOOST_TEST(r->streams_checked == 3u);
    BOOST_TEST(r->events_checked == 6u + 2u + 3u);
    BOOST_TEST(std::is_sorted(progress.begin(), progress.end()), "progress never goes back");
    if (!progress.empty())
      BOOST_TEST(progress.back() <= r->events_checked);

    auto one = verify_ok(*j, "task-b");
    BOOST_TEST(one.problems.empty(), problems_text(one));
    BOOST_TEST(one.streams_checked == 1u);
    BOOST_TEST(one.events_checked == 2u);
  }
  // And after reopening (the heads come back from disk).
  auto j = open_store(dir.journal());
  auto r = verify_ok(*j);
  BOOST_TEST(r.problems.empty(), problems_text(r));
  BOOST_TEST(r.events_checked == 11u);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(tampering)

BOOST_AUTO_TEST_CASE(a_changed_byte_in_event_3_is_named_as_the_first_break) {
  temp_dir dir;
  std::vector<uint64_t> positions;
  {
    auto j = open_store(dir.journal());
    positions = append_payloads(*j, "task-tamper", 6);
    (void)append_payloads(*j, "task-clean", 3);
    auto r = verify_ok(*j);
    BOOST_REQUIRE_MESSAGE(r.problems.empty(), "clean before tampering: " << problems_text(r));
  }
  {
    raw_db db(dir.journal());
    auto key = event_key("task-tamper", 3);
    auto v = db.get(key);
    auto at = v.find("payload-3-xxxx");
    BOOST_REQUIRE_MESSAGE(at != std::string::npos, "payload of event 3 not found in its record");
    v[at + 10] = 'y';  // inside the byte vector: the verifier still passes
    BOOST_REQUIRE(sc::verify_envelope(v).ok());
    db.put(key, v);
  }
  auto j = open_store(dir.journal());
  auto all = verify_ok(*j);
  BOOST_REQUIRE_MESSAGE(all.problems.size() == 1u, "problems: " << problems_text(all));
  BOOST_TEST(all.problems[0].stream == "task-tamper");
  BOOST_TEST(all.problems[0].sequence == 3u, problems_text(all));
  BOOST_TEST((all.problems[0].position == positions[3] || all.problems[0].position == 0u),
             problems_text(all));
  BOOST_TEST(!all.problems[0].reason.empty());

  auto one = verify_ok(*j, "task-tamper");
  BOOST_REQUIRE_MESSAGE(one.problems.size() == 1u, "problems: " << problems_text(one));
  BOOST_TEST(one.problems[0].stream == "task-tamper");
  BOOST_TEST(one.problems[0].sequence == 3u);

  auto clean = verify_ok(*j, "task-clean");
  BOOST_TEST(clean.problems.empty(), problems_text(clean));
  BOOST_TEST(clean.events_checked == 3u);
}

BOOST_AUTO_TEST_CASE(a_changed_last_event_is_caught_by_the_head_record) {
  temp_dir dir;
  {
    auto j = open_store(dir.journal());
    (void)append_payloads(*j, "task-tamper", 6);
  }
  {
    raw_db db(dir.journal());
    auto key = event_key("task-tamper", 6);
    auto v = db.get(key);
    auto at = v.find("payload-6-xxxx");
    BOOST_REQUIRE(at != std::string::npos);
    v[at + 10] = 'z';
    db.put(key, v);
  }
  auto j = open_store(dir.journal());
  auto r = verify_ok(*j);
  BOOST_REQUIRE_MESSAGE(r.problems.size() == 1u, "problems: " << problems_text(r));
  BOOST_TEST(r.problems[0].stream == "task-tamper");
  BOOST_TEST(r.problems[0].sequence == 6u, problems_text(r));
}

BOOST_AUTO_TEST_CASE(a_changed_head_hash_is_reported) {
  // Wherever the journal keeps the head hash (the stream's head record, or the index entry of
  // its last event), it is the SHA-256 of the last event's stored bytes: find it by content.
  temp_dir dir;
  digest head{};
  {
    auto j = open_store(dir.journal());
    (void)append_payloads(*j, "task-tamper", 4);
    head = sha256(read_all_of(*j, "task-tamper").back());
    BOOST_REQUIRE((j->info("task-tamper")->head_hash == head));
  }
  {
    raw_db db(dir.journal());
    const std::string needle(reinterpret_cast<const char*>(head.data()), head.size());
    auto holders = db.keys_whose_value_contains(needle);
    BOOST_REQUIRE_MESSAGE(!holders.empty(), "no record holds the head hash");
    for (auto& key : holders) {
      auto v = db.get(key);
      auto at = v.find(needle);
      v[at] = static_cast<char>(v[at] ^ 0x01);
      db.put(key, v);
    }
  }
  auto j = open_store(dir.journal());
  auto r = verify_ok(*j);
  BOOST_TEST_MESSAGE("a changed head hash is reported as: " << problems_text(r));
  BOOST_REQUIRE_MESSAGE(r.problems.size() == 1u, "problems: " << problems_text(r));
  BOOST_TEST(r.problems[0].stream == "task-tamper");
  // A head that disagrees with the last event: the head record (0) or the last event (4).
  BOOST_TEST((r.problems[0].sequence == 0u || r.problems[0].sequence == 4u), problems_text(r));
}

BOOST_AUTO_TEST_CASE(a_removed_last_event_is_reported) {
  // Only the event record goes; everything that committed to it stays.
  temp_dir dir;
  {
    auto j = open_store(dir.journal());
    (void)append_payloads(*j, "task-cut", 5);
  }
  {
    raw_db db(dir.journal());
    db.remove(event_key("task-cut", 5));
  }
  auto j = open_store(dir.journal());
  auto r = verify_ok(*j);
  BOOST_TEST_MESSAGE("a removed last event is reported as: " << problems_text(r));
  BOOST_REQUIRE_MESSAGE(r.problems.size() == 1u, "problems: " << problems_text(r));
  BOOST_TEST(r.problems[0].stream == "task-cut");
  BOOST_TEST((r.problems[0].sequence == 0u || r.problems[0].sequence == 5u), problems_text(r));
}

BOOST_AUTO_TEST_CASE(a_dangling_global_index_entry_is_reported) {
  temp_dir dir;
  std::vector<uint64_t> positions;
  {
    auto j = open_store(dir.journal());
    positions = append_payloads(*j, "task-idx", 3);
  }
  {
    raw_db db(dir.journal());
    // Position 2 now claims to be sequence 99 of the stream, which does not exist (whatever
    // follows stream '\0' be64(seq) in the entry is kept).
    const std::string prefix = "task-idx" + std::string(1, '\0');
    auto v = db.get(global_key(positions[2]));
    BOOST_REQUIRE_MESSAGE(v.size() >= prefix.size() + 8 && v.compare(0, prefix.size(), prefix) == 0,
                          "unexpected global index entry");
    v.replace(prefix.size(), 8, be64(99));
    db.put(global_key(positions[2]), v);
  }
  auto j = open_store(dir.journal());
  auto r = verify_ok(*j);
  BOOST_TEST_MESSAGE("a dangling index entry is reported as: " << problems_text(r));
  BOOST_TEST(!r.problems.empty(), "verify(\"\") missed a global index entry to nowhere");
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(corrupt_records)

BOOST_AUTO_TEST_CASE(garbage_bytes_are_a_corrupt_error_naming_stream_and_sequence) {
  temp_dir dir;
  {
    auto j = open_store(dir.journal());
    // Other events first, so sequence 2 of the stream is not also position 2.
    (void)append_payloads(*j, "task-before", 4);
    (void)append_payloads(*j, "task-garbage", 4);
  }
  {
    raw_db db(dir.journal());
    db.put(event_key("task-garbage", 2), "not a flatbuffer");
  }
  auto j = open_store(dir.journal());

  auto read = j->read_stream("task-garbage", read_range{});
  BOOST_REQUIRE_MESSAGE(!read.ok(), "read_stream returned garbage as an event");
  BOOST_TEST(read.error().code == errc::corrupt, describe(read));
  BOOST_TEST(read.error().message.find("task-garbage") != std::string::npos, read.error().message);
  BOOST_TEST(names_number(read.error().message, 2), "names sequence 2: " << read.error().message);

  uint64_t visited = 0;
  auto each = j->for_each("task-garbage", {}, [&](const ev::Envelope& e, std::string_view) {
    BOOST_TEST(e.sequence() != 2u);
    ++visited;
    return true;
  });
  BOOST_REQUIRE_MESSAGE(!each.ok(), "for_each visited garbage as an event");
  BOOST_TEST(each.error().code == errc::corrupt, describe(each));
  BOOST_TEST(each.error().message.find("task-garbage") != std::string::npos, each.error().message);
  BOOST_TEST(names_number(each.error().message, 2), each.error().message);
  BOOST_TEST(visited <= 1u);

  // The global log hits the same record.
  auto all = j->read_all(1, 100);
  BOOST_REQUIRE(!all.ok());
  BOOST_TEST(all.error().code == errc::corrupt, describe(all));
  BOOST_TEST(all.error().message.find("task-garbage") != std::string::npos, all.error().message);
  auto sub = j->subscribe(1);
  BOOST_REQUIRE(sub);
  ferry::result<std::vector<std::string>> got = std::vector<std::string>{};
  size_t delivered = 0;
  for (int i = 0; i < 20 && got.ok(); ++i) {  // bounded: stops at the bad record
    got = sub->next(100, std::chrono::milliseconds(50));
    if (got.ok())
      delivered += got->size();
  }
  BOOST_REQUIRE_MESSAGE(!got.ok(), "the subscription delivered past a corrupt record");
  BOOST_TEST(got.error().code == errc::corrupt, describe(got));
  BOOST_TEST(delivered <= 5u, "delivered " << delivered << " events, stops at position 6");

  // The rest of the stream stays readable around the bad record.
  auto tail = j->read_stream("task-garbage", {3, 4, 10});
  BOOST_REQUIRE_MESSAGE(tail.ok(), describe(tail));
  BOOST_TEST(sequences(*tail) == (std::vector<uint64_t>{3, 4}));
  BOOST_TEST(read_all_of(*j, "task-before").size() == 4u);

  auto r = verify_ok(*j);
  BOOST_REQUIRE_MESSAGE(r.problems.size() == 1u, "problems: " << problems_text(r));
  BOOST_TEST(r.problems[0].stream == "task-garbage");
  BOOST_TEST(r.problems[0].sequence == 2u, problems_text(r));
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(schema_versions)

BOOST_AUTO_TEST_CASE(a_version_1_event_is_read_upcast_and_verified_as_stored) {
  temp_dir dir;
  std::string appended_v1;
  {
    auto j = open_store(dir.journal());
    sc::envelope_meta m;
    m.stream_id = "sandbox-old";
    m.schema_version = 1;
    std::vector<std::string> old{sc::sandbox_state_changed(m, "sb-1", "runsc",
                                                           ev::SandboxStatus::spawning,
                                                           ev::SandboxStatus::running, "")};
    auto r = j->append("sandbox-old", old);
    BOOST_REQUIRE_MESSAGE(r.ok(), "appending a version-1 event: " << describe(r));
    appended_v1 = old[0];
    BOOST_TEST(envelope(appended_v1)->schema_version() == 1u, "the stamped bytes are as stored");
    sc::envelope_meta current;
    current.stream_id = "sandbox-old";
    std::vector<std::string> next{sc::sandbox_state_changed(current, "sb-1", "runsc",
                                                            ev::SandboxStatus::executing,
                                                            ev::SandboxStatus::terminating, "")};
    BOOST_REQUIRE(j->append("sandbox-old", next).ok());

    auto events = read_all_of(*j, "sandbox-old");
    BOOST_REQUIRE(events.size() == 2u);
    auto* e = envelope(events[0]);
    BOOST_TEST(e->schema_version() == sc::current_schema_version);
    auto* x = e->event_as_SandboxStateChanged();
    BOOST_REQUIRE(x != nullptr);
    BOOST_TEST((x->to() == ev::SandboxStatus::executing), "to = " << sc::to_string(x->to()));
    BOOST_TEST((x->from() == ev::SandboxStatus::spawning));
    BOOST_TEST(x->sandbox_id()->str() == "sb-1");
    // The chain commits to the stored (version 1) bytes, not to what readers see.
    BOOST_TEST((prev_hash_of(events[1]) == sha256(appended_v1)));

    bool seen = false;
    auto n = j->for_each("sandbox-old", {1, 1, 1}, [&](const ev::Envelope& env,
                                                       std::string_view b) {
      seen = true;
      BOOST_TEST(env.schema_version() == sc::current_schema_version);
      BOOST_TEST((env.event_as_SandboxStateChanged()->to() == ev::SandboxStatus::executing));
      BOOST_TEST(envelope(b)->schema_version() == sc::current_schema_version);
      return true;
    });
    BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
    BOOST_TEST(seen);
    auto all = j->read_all(1, 10);
    BOOST_REQUIRE(all.ok() && all->size() == 2u);
    BOOST_TEST((envelope((*all)[0])->event_as_SandboxStateChanged()->to() ==
                ev::SandboxStatus::executing));

    auto report = verify_ok(*j);
    BOOST_TEST(report.problems.empty(), problems_text(report));
  }
  // On disk it is still version 1 with `running`.
  raw_db db(dir.journal());
  auto stored = db.get(event_key("sandbox-old", 1));
  BOOST_TEST((stored == appended_v1));
  BOOST_TEST((envelope(stored)->event_as_SandboxStateChanged()->to() ==
              ev::SandboxStatus::running));
}

BOOST_AUTO_TEST_CASE(an_append_of_a_newer_schema_version_is_not_misread) {
  // The header does not say whether append refuses a version this build cannot read; whatever
  // it does, no reader may ever be handed a version-99 event as if it were current.
  temp_dir dir;
  auto j = open_store(dir.journal());
  sc::envelope_meta m;
  m.stream_id = "task-future";
  m.schema_version = 99;
  std::vector<std::string> e{sc::task_state_changed(m, ev::TaskStatus::queued,
                                                    ev::TaskStatus::running, "from the future")};
  auto r = j->append("task-future", e);
  BOOST_TEST_MESSAGE("append of schema version 99: " << describe(r));
  if (!r.ok()) {
    BOOST_TEST(r.error().code == errc::invalid_argument, describe(r));
    BOOST_TEST(names_number(r.error().message, 99), r.error().message);
    BOOST_TEST(*j->highest_sequence("task-future") == 0u);
    BOOST_TEST(j->last_position() == 0u);
    return;
  }
  auto read = j->read_stream("task-future", read_range{});
  BOOST_REQUIRE_MESSAGE(!read.ok(), "a version-99 event was read back as an event");
  BOOST_TEST(read.error().code == errc::corrupt, describe(read));
}

BOOST_AUTO_TEST_CASE(a_stored_newer_schema_version_is_a_clear_read_error) {
  temp_dir dir;
  {
    auto j = open_store(dir.journal());
    (void)append_payloads(*j, "task-newer", 2);
  }
  {
    raw_db db(dir.journal());
    auto key = event_key("task-newer", 2);
    auto v = db.get(key);
    auto* env = ev::GetMutableEnvelope(v.data());
    BOOST_REQUIRE(env->mutate_schema_version(99));
    db.put(key, v);
  }
  auto j = open_store(dir.journal());
  auto read = j->read_stream("task-newer", read_range{});
  BOOST_REQUIRE_MESSAGE(!read.ok(), "a version-99 event was read back as an event");
  BOOST_TEST(read.error().code == errc::corrupt, describe(read));
  BOOST_TEST(read.error().message.find("task-newer") != std::string::npos, read.error().message);
  BOOST_TEST(names_number(read.error().message, 99),
             "says which version: " << read.error().message);
  auto each = j->for_each("task-newer", {}, [](const ev::Envelope& e, std::string_view) {
    BOOST_TEST(e.schema_version() != 99u);
    return true;
  });
  BOOST_REQUIRE(!each.ok());
  BOOST_TEST(each.error().code == errc::corrupt, describe(each));
  auto first = j->read_stream("task-newer", {1, 1, 1});
  BOOST_TEST(first.ok(), describe(first));
}

BOOST_AUTO_TEST_SUITE_END()
