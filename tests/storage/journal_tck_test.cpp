// The journal against the behaviours the Akka Persistence journal and snapshot-store TCKs check,
// re-stated for ferry's event_store contract (storage/include/ferry/storage/journal.h):
// range replay (lower/upper bound, count), highest sequence surviving deletion, atomic batches
// rejected whole, expected-version conflicts, idempotent re-append by event id, gapless
// sequences and strictly increasing positions; and for snapshots: bounded loads, single and
// range deletes, overwrite, and large binary round-trips.
#define BOOST_TEST_MODULE storage_journal_tck
#include <boost/test/unit_test.hpp>

#include <limits>
#include <map>
#include <random>

#include "journal_test_support.h"

using namespace ferry::storage;
using namespace ferry::storage::testing;
using ferry::errc;

namespace {

constexpr std::string_view tck_stream = "task-tck";
constexpr uint64_t max_u64 = std::numeric_limits<uint64_t>::max();

/// A fresh journal holding events 1..5 of `task-tck`: 1, 2, 3 appended one by one, 4 and 5 in
/// one atomic append. Event i has id "tck-<i>" and reason "e<i>".
struct journal_fixture {
  temp_dir dir;
  std::unique_ptr<event_store> j = open_store(dir.journal());
  /// Position of event i (index 0 unused).
  std::vector<uint64_t> positions = {0};

  journal_fixture() {
    for (int i = 1; i <= 3; ++i) {
      std::vector<std::string> one{event(tck_stream, "e" + std::to_string(i), id(i))};
      auto r = j->append(tck_stream, one, expected_version::exact(i - 1));
      BOOST_REQUIRE_MESSAGE(r.ok(), "append " << i << ": " << describe(r));
      positions.push_back(r->first_position);
    }
    std::vector<std::string> two{event(tck_stream, "e4", id(4)), event(tck_stream, "e5", id(5))};
    auto r = j->append(tck_stream, two, expected_version::exact(3));
    BOOST_REQUIRE_MESSAGE(r.ok(), "append 4,5: " << describe(r));
    positions.push_back(r->first_position);
    positions.push_back(r->last_position);
  }

  static std::string id(int i) { return "tck-" + std::to_string(i); }

  std::vector<uint64_t> replay(read_range range) {
    auto r = j->read_stream(tck_stream, range);
    BOOST_REQUIRE_MESSAGE(r.ok(), "read_stream: " << describe(r));
    return sequences(*r);
  }

  uint64_t highest() {
    auto h = j->highest_sequence(tck_stream);
    BOOST_REQUIRE_MESSAGE(h.ok(), "highest_sequence: " << describe(h));
    return *h;
  }

  /// Asserts the journal still holds exactly events 1..5 at their positions (nothing written).
  void expect_untouched() {
    BOOST_TEST(highest() == 5u);
    BOOST_TEST(j->last_position() == positions[5]);
    BOOST_TEST(replay({}) == iota(1, 5));
  }
};

using seqs = std::vector<uint64_t>;

}  // namespace

// ---------------------------------------------------------------------------------------------
BOOST_FIXTURE_TEST_SUITE(replay, journal_fixture)

BOOST_AUTO_TEST_CASE(replays_all_events) {
  BOOST_TEST(replay({}) == iota(1, 5));
  // for_each is the same replay without copies.
  seqs visited;
  auto n = j->for_each(tck_stream, {}, [&](const ev::Envelope& e, std::string_view) {
    visited.push_back(e.sequence());
    return true;
  });
  BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
  BOOST_TEST(*n == 5u);
  BOOST_TEST(visited == iota(1, 5));
}

BOOST_AUTO_TEST_CASE(replays_from_a_lower_bound) {
  BOOST_TEST(replay({3, max_u64, max_u64}) == (seqs{3, 4, 5}));
}

BOOST_AUTO_TEST_CASE(replays_up_to_an_upper_bound) {
  BOOST_TEST(replay({1, 3, max_u64}) == (seqs{1, 2, 3}));
}

BOOST_AUTO_TEST_CASE(replays_at_most_max_count_events) {
  BOOST_TEST(replay({1, max_u64, 3}) == (seqs{1, 2, 3}));
  // The shorthand overload means the same.
  auto r = j->read_stream(tck_stream, 1, 3);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(sequences(*r) == (seqs{1, 2, 3}));
}

BOOST_AUTO_TEST_CASE(replays_between_lower_and_upper_bound) {
  BOOST_TEST(replay({2, 3, max_u64}) == (seqs{2, 3}));
}

BOOST_AUTO_TEST_CASE(replays_between_bounds_with_a_count_limit) {
  BOOST_TEST(replay({2, 5, 2}) == (seqs{2, 3}));
}

BOOST_AUTO_TEST_CASE(replays_one_event_when_lower_equals_upper) {
  BOOST_TEST(replay({3, 3, max_u64}) == (seqs{3}));
}

BOOST_AUTO_TEST_CASE(replays_one_event_when_count_is_one) {
  BOOST_TEST(replay({1, max_u64, 1}) == (seqs{1}));
}

BOOST_AUTO_TEST_CASE(replays_nothing_when_count_is_zero) {
  BOOST_TEST(replay({1, max_u64, 0}).empty());
  uint64_t calls = 0;
  auto n = j->for_each(tck_stream, {1, max_u64, 0}, [&](const ev::Envelope&, std::string_view) {
    ++calls;
    return true;
  });
  BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
  BOOST_TEST(*n == 0u);
  BOOST_TEST(calls == 0u);
}

BOOST_AUTO_TEST_CASE(replays_nothing_when_lower_is_above_upper) {
  // Reading of the contract: an empty range is an empty result, not an error.
  BOOST_TEST(replay({4, 2, max_u64}).empty());
}

BOOST_AUTO_TEST_CASE(replays_nothing_beyond_the_highest_sequence) {
  BOOST_TEST(replay({6, max_u64, max_u64}).empty());
}

BOOST_AUTO_TEST_CASE(for_each_stops_when_the_visitor_says_so) {
  seqs visited;
  auto n = j->for_each(tck_stream, {}, [&](const ev::Envelope& e, std::string_view) {
    visited.push_back(e.sequence());
    return visited.size() < 2;
  });
  BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
  BOOST_TEST(visited == (seqs{1, 2}));
  BOOST_TEST(*n == 2u);
}

BOOST_AUTO_TEST_CASE(unknown_stream_has_highest_zero_and_no_events) {
  auto h = j->highest_sequence("task-unknown");
  BOOST_REQUIRE(h.ok());
  BOOST_TEST(*h == 0u);
  auto i = j->info("task-unknown");
  BOOST_REQUIRE_MESSAGE(i.ok(), describe(i));
  BOOST_TEST(i->highest_sequence == 0u);
  BOOST_TEST(i->deleted_to == 0u);
  BOOST_TEST((i->head_hash == digest{}));
  auto r = j->read_stream("task-unknown", read_range{});
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->empty());
  // A stream whose name is a prefix of a known one is still unknown.
  BOOST_TEST(*j->highest_sequence("task-tc") == 0u);
}

BOOST_AUTO_TEST_CASE(reading_with_count_zero_still_reports_highest) {
  BOOST_TEST(replay({1, max_u64, 0}).empty());
  BOOST_TEST(highest() == 5u);
  auto i = j->info(tck_stream);
  BOOST_REQUIRE(i.ok());
  BOOST_TEST(i->highest_sequence == 5u);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_FIXTURE_TEST_SUITE(deletion, journal_fixture)

BOOST_AUTO_TEST_CASE(replays_only_events_after_a_deletion) {
  auto d = j->delete_events(tck_stream, 3);
  BOOST_REQUIRE_MESSAGE(d.ok(), describe(d));
  BOOST_TEST(*d == 3u);
  BOOST_TEST(replay({}) == (seqs{4, 5}));
  BOOST_TEST(replay({1, 3, max_u64}).empty());
  BOOST_TEST(replay({2, max_u64, 1}) == (seqs{4}));
  auto i = j->info(tck_stream);
  BOOST_REQUIRE(i.ok());
  BOOST_TEST(i->deleted_to == 3u);
  // Deleting what is already gone deletes nothing more.
  auto again = j->delete_events(tck_stream, 2);
  BOOST_REQUIRE(again.ok());
  BOOST_TEST(*again == 0u);
  BOOST_TEST(j->info(tck_stream)->deleted_to == 3u);
}

BOOST_AUTO_TEST_CASE(highest_is_not_reset_by_deletion) {
  BOOST_REQUIRE(j->delete_events(tck_stream, 3).ok());
  BOOST_TEST(highest() == 5u);
  // The next event continues the sequence.
  std::vector<std::string> e{event(tck_stream, "e6")};
  auto r = j->append(tck_stream, e, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->first_sequence == 6u);
  BOOST_TEST(replay({}) == (seqs{4, 5, 6}));
}

BOOST_AUTO_TEST_CASE(highest_is_not_reset_after_deleting_everything) {
  auto d = j->delete_events(tck_stream, 5);
  BOOST_REQUIRE_MESSAGE(d.ok(), describe(d));
  BOOST_TEST(*d == 5u);
  BOOST_TEST(highest() == 5u);
  BOOST_TEST(replay({}).empty());
  auto i = j->info(tck_stream);
  BOOST_REQUIRE(i.ok());
  BOOST_TEST(i->highest_sequence == 5u);
  BOOST_TEST(i->deleted_to == 5u);
  // The stream exists: no_stream is a conflict, and the next sequence is 6.
  std::vector<std::string> e{event(tck_stream, "e6")};
  auto fresh = j->append(tck_stream, e, expected_version::no_stream());
  BOOST_REQUIRE(!fresh.ok());
  BOOST_TEST(fresh.error().code == errc::conflict);
  auto r = j->append(tck_stream, e, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->first_sequence == 6u);
}

BOOST_AUTO_TEST_CASE(highest_survives_a_reopen_after_deleting_everything) {
  BOOST_REQUIRE(j->delete_events(tck_stream, 5).ok());
  j.reset();
  j = open_store(dir.journal());
  BOOST_TEST(highest() == 5u);
  auto i = j->info(tck_stream);
  BOOST_REQUIRE(i.ok());
  BOOST_TEST(i->deleted_to == 5u);
  BOOST_TEST(replay({}).empty());
  BOOST_TEST(j->last_position() == positions[5]);
  std::vector<std::string> e{event(tck_stream, "e6")};
  auto r = j->append(tck_stream, e, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->first_sequence == 6u);
  BOOST_TEST(r->first_position == positions[5] + 1);
}

BOOST_AUTO_TEST_CASE(highest_is_not_reset_after_deleting_up_to_a_huge_sequence) {
  auto d = j->delete_events(tck_stream, max_u64);
  BOOST_REQUIRE_MESSAGE(d.ok(), describe(d));
  BOOST_TEST(*d == 5u);
  BOOST_TEST(highest() == 5u);
  BOOST_TEST(replay({}).empty());
  auto i = j->info(tck_stream);
  BOOST_REQUIRE(i.ok());
  // min(to_sequence, highest): deleted_to does not run ahead of the stream.
  BOOST_TEST(i->deleted_to == 5u);
  std::vector<std::string> e{event(tck_stream, "e6")};
  auto r = j->append(tck_stream, e, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->first_sequence == 6u);
  BOOST_TEST(replay({}) == (seqs{6}));
}

BOOST_AUTO_TEST_CASE(deleting_from_an_unknown_stream_deletes_nothing) {
  auto d = j->delete_events("task-unknown", 10);
  BOOST_REQUIRE_MESSAGE(d.ok(), describe(d));
  BOOST_TEST(*d == 0u);
  BOOST_TEST(*j->highest_sequence("task-unknown") == 0u);
  expect_untouched();
}

BOOST_AUTO_TEST_CASE(deleted_positions_are_not_reused_and_read_all_skips_them) {
  BOOST_REQUIRE(j->delete_events(tck_stream, 2).ok());
  auto all = j->read_all(1, max_u64);
  BOOST_REQUIRE_MESSAGE(all.ok(), describe(all));
  BOOST_TEST(sequences(*all) == (seqs{3, 4, 5}));
  std::vector<std::string> e{event("task-other", "x")};
  auto r = j->append("task-other", e);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->first_position == positions[5] + 1);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_FIXTURE_TEST_SUITE(atomic_batches, journal_fixture)

BOOST_AUTO_TEST_CASE(a_batch_with_an_event_of_another_stream_is_rejected_whole) {
  std::vector<std::string> batch{event(tck_stream, "b1", "bad-1"), event("task-other", "b2"),
                                 event(tck_stream, "b3")};
  auto r = j->append(tck_stream, batch, expected_version::exact(5));
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().code == errc::invalid_argument, "code " << errc_name(r.error().code));
  BOOST_TEST(r.error().message.find("task-other") != std::string::npos, r.error().message);
  expect_untouched();
  BOOST_TEST(*j->highest_sequence("task-other") == 0u);
  // The first event's id was not recorded either: appending it alone is a new event, which
  // takes the next sequence and the next position (the rejected batch used none).
  std::vector<std::string> retry{event(tck_stream, "b1", "bad-1")};
  auto ok = j->append(tck_stream, retry, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(ok.ok(), describe(ok));
  BOOST_TEST(!ok->duplicate);
  BOOST_TEST(ok->first_sequence == 6u);
  BOOST_TEST(ok->first_position == positions[5] + 1);
}

BOOST_AUTO_TEST_CASE(a_batch_with_garbage_bytes_is_rejected_whole) {
  std::vector<std::string> batch{event(tck_stream, "b1"), std::string("not a flatbuffer"),
                                 event(tck_stream, "b3")};
  auto r = j->append(tck_stream, batch, expected_version::exact(5));
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().code == errc::invalid_argument, "code " << errc_name(r.error().code));
  expect_untouched();
}

BOOST_AUTO_TEST_CASE(a_batch_with_a_zero_byte_string_is_rejected_whole) {
  std::vector<std::string> batch{event(tck_stream, "b1"), std::string(64, '\0')};
  auto r = j->append(tck_stream, batch, expected_version::any());
  BOOST_REQUIRE(!r.ok());
  expect_untouched();
}

BOOST_AUTO_TEST_CASE(an_atomic_batch_is_stored_with_consecutive_sequences_and_positions) {
  BOOST_TEST(positions[5] == positions[4] + 1);
  auto r = j->read_stream(tck_stream, {4, 5, max_u64});
  BOOST_REQUIRE(r.ok());
  BOOST_REQUIRE(r->size() == 2u);
  BOOST_TEST(reason_of((*r)[0]) == "e4");
  BOOST_TEST(reason_of((*r)[1]) == "e5");
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_FIXTURE_TEST_SUITE(expected_versions, journal_fixture)

BOOST_AUTO_TEST_CASE(no_stream_on_an_existing_stream_is_a_conflict_that_writes_nothing) {
  std::vector<std::string> e{event(tck_stream, "x"), event(tck_stream, "y")};
  auto r = j->append(tck_stream, e, expected_version::no_stream());
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().code == errc::conflict, "code " << errc_name(r.error().code));
  BOOST_TEST(r.error().message.find(std::string(tck_stream)) != std::string::npos,
             "message names the stream: " << r.error().message);
  expect_untouched();
}

BOOST_AUTO_TEST_CASE(an_exact_mismatch_is_a_conflict_that_writes_nothing) {
  for (uint64_t wrong : {0u, 3u, 4u, 6u, 100u}) {
    std::vector<std::string> e{event(tck_stream, "x")};
    auto r = j->append(tck_stream, e, expected_version::exact(wrong));
    BOOST_REQUIRE_MESSAGE(!r.ok(), "exact(" << wrong << ") accepted at highest 5");
    BOOST_TEST(r.error().code == errc::conflict, "exact(" << wrong << "): " << describe(r));
  }
  expect_untouched();
  std::vector<std::string> e{event(tck_stream, "x")};
  auto r = j->append(tck_stream, e, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->first_sequence == 6u);
}

BOOST_AUTO_TEST_CASE(no_stream_and_any_succeed_where_they_should) {
  std::vector<std::string> a{event("task-new", "x")};
  auto r1 = j->append("task-new", a, expected_version::no_stream());
  BOOST_REQUIRE_MESSAGE(r1.ok(), describe(r1));
  BOOST_TEST(r1->first_sequence == 1u);
  std::vector<std::string> b{event(tck_stream, "x")};
  auto r2 = j->append(tck_stream, b, expected_version::any());
  BOOST_REQUIRE_MESSAGE(r2.ok(), describe(r2));
  BOOST_TEST(r2->first_sequence == 6u);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_FIXTURE_TEST_SUITE(idempotence, journal_fixture)

BOOST_AUTO_TEST_CASE(re_appending_known_ids_acknowledges_the_original_and_writes_nothing) {
  // The 4,5 batch again, freshly built with the same ids and different content.
  std::vector<std::string> again{event(tck_stream, "other", id(4)),
                                 event(tck_stream, "other", id(5))};
  const auto unstamped = again;
  // exact(3) is stale now (highest is 5): a retry must still be acknowledged.
  auto r = j->append(tck_stream, again, expected_version::exact(3));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->duplicate);
  BOOST_TEST(r->first_sequence == 4u);
  BOOST_TEST(r->last_sequence == 5u);
  BOOST_TEST(r->first_position == positions[4]);
  BOOST_TEST(r->last_position == positions[5]);
  BOOST_TEST((again == unstamped), "a duplicate's buffers come back unstamped");
  expect_untouched();
  // What is stored is the original, not the retry's content.
  auto stored = j->read_stream(tck_stream, {4, 5, max_u64});
  BOOST_REQUIRE(stored.ok() && stored->size() == 2u);
  BOOST_TEST(reason_of((*stored)[0]) == "e4");
}

BOOST_AUTO_TEST_CASE(re_appending_a_single_known_id_acknowledges_its_sequence) {
  for (auto expected : {expected_version::any(), expected_version::exact(2),
                        expected_version::no_stream()}) {
    std::vector<std::string> again{event(tck_stream, "e3", id(3))};
    auto r = j->append(tck_stream, again, expected);
    BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
    BOOST_TEST(r->duplicate);
    BOOST_TEST(r->first_sequence == 3u);
    BOOST_TEST(r->last_sequence == 3u);
    BOOST_TEST(r->first_position == positions[3]);
  }
  expect_untouched();
}

BOOST_AUTO_TEST_CASE(a_batch_mixing_known_and_new_ids_is_a_conflict) {
  std::vector<std::string> known_then_new{event(tck_stream, "e5", id(5)),
                                          event(tck_stream, "new", "tck-new")};
  auto r1 = j->append(tck_stream, known_then_new, expected_version::any());
  BOOST_REQUIRE_MESSAGE(!r1.ok(), "known+new accepted: duplicate=" << (r1.ok() && r1->duplicate));
  BOOST_TEST(r1.error().code == errc::conflict, describe(r1));
  std::vector<std::string> new_then_known{event(tck_stream, "new", "tck-new"),
                                          event(tck_stream, "e1", id(1))};
  auto r2 = j->append(tck_stream, new_then_known, expected_version::any());
  BOOST_REQUIRE(!r2.ok());
  BOOST_TEST(r2.error().code == errc::conflict, describe(r2));
  expect_untouched();
  // Neither rejected batch recorded "tck-new".
  std::vector<std::string> fresh{event(tck_stream, "new", "tck-new")};
  auto r3 = j->append(tck_stream, fresh, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r3.ok(), describe(r3));
  BOOST_TEST(!r3->duplicate);
}

BOOST_AUTO_TEST_CASE(known_ids_in_another_order_write_nothing) {
  // Not "same ids, same order": whatever the answer, no id may be stored twice.
  std::vector<std::string> swapped{event(tck_stream, "e5", id(5)), event(tck_stream, "e4", id(4))};
  auto r = j->append(tck_stream, swapped, expected_version::any());
  BOOST_TEST(!(r.ok() && !r->duplicate), "swapped known ids were appended as new events");
  expect_untouched();
}

BOOST_AUTO_TEST_CASE(ids_are_per_stream) {
  std::vector<std::string> e{event("task-other", "e1", id(1))};
  auto r = j->append("task-other", e, expected_version::no_stream());
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(!r->duplicate);
  BOOST_TEST(r->first_sequence == 1u);
}

BOOST_AUTO_TEST_CASE(ids_of_deleted_events_are_forgotten) {
  BOOST_REQUIRE(j->delete_events(tck_stream, 3).ok());
  std::vector<std::string> e{event(tck_stream, "e1 again", id(1))};
  auto r = j->append(tck_stream, e, expected_version::exact(5));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(!r->duplicate);
  BOOST_TEST(r->first_sequence == 6u);
  // A retained one is still known.
  std::vector<std::string> e4{event(tck_stream, "e4", id(4))};
  auto d = j->append(tck_stream, e4, expected_version::any());
  BOOST_REQUIRE_MESSAGE(d.ok(), describe(d));
  BOOST_TEST(d->duplicate);
  BOOST_TEST(d->first_sequence == 4u);
}

BOOST_AUTO_TEST_CASE(known_ids_are_remembered_across_reopen) {
  j.reset();
  j = open_store(dir.journal());
  std::vector<std::string> again{event(tck_stream, "e4", id(4)), event(tck_stream, "e5", id(5))};
  auto r = j->append(tck_stream, again, expected_version::exact(3));
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->duplicate);
  BOOST_TEST(r->first_sequence == 4u);
  BOOST_TEST(r->last_position == positions[5]);
  expect_untouched();
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(ordering)

BOOST_AUTO_TEST_CASE(sequences_are_gapless_and_positions_strictly_increase_across_streams) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  const std::vector<std::string> streams{"task-a", "task-b", "session-c", "tokens"};
  std::map<std::string, uint64_t> highest;
  uint64_t last_position = 0;
  std::mt19937 rng(7);
  for (int i = 0; i < 60; ++i) {
    const auto& s = streams[rng() % streams.size()];
    const size_t n = 1 + rng() % 4;
    std::vector<std::string> batch;
    for (size_t k = 0; k < n; ++k)
      batch.push_back(event(s, "i" + std::to_string(i)));
    auto r = j->append(s, batch, expected_version::exact(highest[s]));
    BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
    BOOST_TEST(r->first_sequence == highest[s] + 1);
    BOOST_TEST(r->last_sequence == highest[s] + n);
    BOOST_TEST(r->first_position == last_position + 1);
    BOOST_TEST(r->last_position == last_position + n);
    for (size_t k = 0; k < n; ++k) {
      BOOST_TEST(seq_of(batch[k]) == highest[s] + 1 + k);
      BOOST_TEST(pos_of(batch[k]) == last_position + 1 + k);
    }
    highest[s] += n;
    last_position += n;
  }
  BOOST_TEST(j->last_position() == last_position);
  auto all = j->read_all(1, max_u64);
  BOOST_REQUIRE_MESSAGE(all.ok(), describe(all));
  BOOST_REQUIRE(all->size() == last_position);
  for (uint64_t p = 1; p <= last_position; ++p)
    BOOST_TEST(pos_of((*all)[p - 1]) == p);
  // read_all from the middle with a count.
  auto mid = j->read_all(10, 5);
  BOOST_REQUIRE(mid.ok());
  BOOST_REQUIRE(mid->size() == 5u);
  BOOST_TEST(pos_of(mid->front()) == 10u);
  BOOST_TEST(pos_of(mid->back()) == 14u);
  for (auto& s : streams) {
    BOOST_TEST(sequences(read_all_of(*j, s)) == iota(1, highest[s]), s);
    BOOST_TEST(*j->highest_sequence(s) == highest[s]);
  }
  auto names = j->list_streams("");
  BOOST_REQUIRE(names.ok());
  BOOST_TEST(*names == (std::vector<std::string>{"session-c", "task-a", "task-b", "tokens"}));
  auto tasks = j->list_streams("task-");
  BOOST_REQUIRE(tasks.ok());
  BOOST_TEST(*tasks == (std::vector<std::string>{"task-a", "task-b"}));
}

BOOST_AUTO_TEST_CASE(every_read_event_carries_its_stream_sequence_position_and_id) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  std::map<uint64_t, std::string> appended;  // position → stamped bytes
  for (int i = 0; i < 6; ++i) {
    const std::string s = i % 2 ? "task-odd" : "task-even";
    std::vector<std::string> e{event(s, "r" + std::to_string(i), "id-" + std::to_string(i))};
    auto r = j->append(s, e);
    BOOST_REQUIRE(r.ok());
    appended[r->first_position] = e[0];
  }
  for (const std::string s : {"task-even", "task-odd"}) {
    auto events = read_all_of(*j, s);
    BOOST_REQUIRE(events.size() == 3u);
    for (size_t k = 0; k < events.size(); ++k) {
      auto* e = envelope(events[k]);
      BOOST_TEST(e->stream_id()->str() == s);
      BOOST_TEST(e->sequence() == k + 1);
      BOOST_TEST(e->schema_version() == ferry::schemas::current_schema_version);
      BOOST_TEST(e->timestamp_ns() > 0);
      BOOST_TEST(e->prev_hash() != nullptr);
      BOOST_TEST(e->event_id()->str() ==
                 "id-" + std::to_string(2 * k + (s == "task-odd" ? 1 : 0)));
      // The stamped buffers the append returned are exactly the stored bytes.
      BOOST_REQUIRE(appended.count(e->position()) == 1u);
      BOOST_TEST((appended[e->position()] == events[k]), s << " seq " << k + 1);
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------------
namespace {

constexpr std::string_view snap_stream = "task-snap";
constexpr int64_t t0 = 1'700'000'000'000'000'000;

/// Snapshots of `task-snap` at sequences 11..15, timestamps t0 + seq seconds, data "state-<seq>".
struct snapshot_fixture {
  temp_dir dir;
  std::unique_ptr<event_store> j = open_store(dir.journal());

  static int64_t ts(uint64_t seq) { return t0 + static_cast<int64_t>(seq) * 1'000'000'000; }

  snapshot_fixture() {
    for (uint64_t s = 11; s <= 15; ++s) {
      auto r = j->save_snapshot({std::string(snap_stream), s, ts(s), "state-" + std::to_string(s)});
      BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
    }
  }

  std::optional<snapshot> load(const snapshot_criteria& c = {},
                               std::string_view stream = snap_stream) {
    auto r = j->load_snapshot(stream, c);
    BOOST_REQUIRE_MESSAGE(r.ok(), "load_snapshot: " << describe(r));
    return *r;
  }

  /// The sequence of the snapshot `load(c)` finds, 0 for none.
  uint64_t latest(const snapshot_criteria& c = {}) {
    auto s = load(c);
    return s ? s->sequence : 0;
  }

  static snapshot_criteria max_seq(uint64_t s) {
    snapshot_criteria c;
    c.max_sequence = s;
    return c;
  }
};

}  // namespace

BOOST_FIXTURE_TEST_SUITE(snapshots, snapshot_fixture)

BOOST_AUTO_TEST_CASE(unknown_stream_loads_none) {
  BOOST_TEST(!load({}, "task-unknown").has_value());
  // Nor does a stream whose name is a prefix or an extension of a known one.
  BOOST_TEST(!load({}, "task-sna").has_value());
  BOOST_TEST(!load({}, "task-snap2").has_value());
}

BOOST_AUTO_TEST_CASE(non_matching_time_bound_loads_none) {
  snapshot_criteria c;
  c.max_timestamp_ns = ts(11) - 1;
  BOOST_TEST(!load(c).has_value());
}

BOOST_AUTO_TEST_CASE(non_matching_sequence_bound_loads_none) {
  BOOST_TEST(!load(max_seq(10)).has_value());
}

BOOST_AUTO_TEST_CASE(loads_the_latest) {
  auto s = load();
  BOOST_REQUIRE(s.has_value());
  BOOST_TEST(s->stream == std::string(snap_stream));
  BOOST_TEST(s->sequence == 15u);
  BOOST_TEST(s->timestamp_ns == ts(15));
  BOOST_TEST(s->data == "state-15");
}

BOOST_AUTO_TEST_CASE(loads_the_latest_within_a_sequence_bound) {
  auto s = load(max_seq(13));
  BOOST_REQUIRE(s.has_value());
  BOOST_TEST(s->sequence == 13u);
  BOOST_TEST(s->timestamp_ns == ts(13));
  BOOST_TEST(s->data == "state-13");
}

BOOST_AUTO_TEST_CASE(loads_the_latest_within_sequence_and_time_bounds) {
  snapshot_criteria c = max_seq(13);
  c.max_timestamp_ns = ts(12);
  BOOST_TEST(latest(c) == 12u);
  c.max_timestamp_ns = ts(14);  // the sequence bound is the tighter one
  BOOST_TEST(latest(c) == 13u);
  snapshot_criteria lower;
  lower.min_sequence = 16;
  BOOST_TEST(latest(lower) == 0u);
}

BOOST_AUTO_TEST_CASE(deletes_one_snapshot) {
  auto r = j->delete_snapshot(snap_stream, 15);
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(latest() == 14u);
  // Deleting one that does not exist is no error and changes nothing.
  BOOST_TEST(j->delete_snapshot(snap_stream, 15).ok());
  BOOST_TEST(j->delete_snapshot("task-unknown", 3).ok());
  BOOST_TEST(latest() == 14u);
}

BOOST_AUTO_TEST_CASE(deletes_a_range_of_snapshots) {
  auto n = j->delete_snapshots(snap_stream, max_seq(13));
  BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
  BOOST_TEST(*n == 3u);
  BOOST_TEST(latest(max_seq(13)) == 0u);
  BOOST_TEST(latest(max_seq(14)) == 14u);
  BOOST_TEST(latest() == 15u);
}

BOOST_AUTO_TEST_CASE(deletes_a_range_with_lower_bounds) {
  snapshot_criteria c = max_seq(13);
  c.min_sequence = 12;
  auto n = j->delete_snapshots(snap_stream, c);
  BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
  BOOST_TEST(*n == 2u);
  BOOST_TEST(latest(max_seq(13)) == 11u);
  snapshot_criteria by_time;
  by_time.min_timestamp_ns = ts(15);
  auto m = j->delete_snapshots(snap_stream, by_time);
  BOOST_REQUIRE(m.ok());
  BOOST_TEST(*m == 1u);
  BOOST_TEST(latest() == 14u);
}

BOOST_AUTO_TEST_CASE(does_not_delete_on_a_time_mismatch) {
  snapshot_criteria c;
  c.max_timestamp_ns = ts(11) - 1;
  auto n = j->delete_snapshots(snap_stream, c);
  BOOST_REQUIRE_MESSAGE(n.ok(), describe(n));
  BOOST_TEST(*n == 0u);
  BOOST_TEST(latest() == 15u);
  BOOST_TEST(latest(max_seq(11)) == 11u);
}

BOOST_AUTO_TEST_CASE(saving_the_same_sequence_overwrites) {
  auto r = j->save_snapshot({std::string(snap_stream), 15, ts(15) + 5, "newer state"});
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  auto s = load();
  BOOST_REQUIRE(s.has_value());
  BOOST_TEST(s->sequence == 15u);
  BOOST_TEST(s->data == "newer state");
  BOOST_TEST(s->timestamp_ns == ts(15) + 5);
  // Overwritten, not added: there are still five.
  auto n = j->delete_snapshots(snap_stream, {});
  BOOST_REQUIRE(n.ok());
  BOOST_TEST(*n == 5u);
  BOOST_TEST(!load().has_value());
}

BOOST_AUTO_TEST_CASE(snapshots_are_per_stream) {
  BOOST_REQUIRE(j->save_snapshot({"task-snap2", 20, ts(20), "other"}).ok());
  BOOST_TEST(latest() == 15u);
  auto n = j->delete_snapshots(snap_stream, {});
  BOOST_REQUIRE(n.ok());
  BOOST_TEST(*n == 5u);
  auto other = load({}, "task-snap2");
  BOOST_REQUIRE(other.has_value());
  BOOST_TEST(other->data == "other");
}

BOOST_AUTO_TEST_CASE(a_large_binary_snapshot_round_trips_exactly) {
  std::mt19937 rng(42);
  std::string data(10'000, '\0');
  for (auto& c : data)
    c = static_cast<char>(rng() % 4 == 0 ? 0 : rng() & 0xff);
  BOOST_REQUIRE(data.find('\0') != std::string::npos);
  auto r = j->save_snapshot({std::string(snap_stream), 16, ts(16), data});
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  j.reset();
  j = open_store(dir.journal());
  auto s = load();
  BOOST_REQUIRE(s.has_value());
  BOOST_TEST(s->sequence == 16u);
  BOOST_TEST(s->data.size() == data.size());
  BOOST_TEST((s->data == data), "snapshot bytes differ after the round trip");
}

BOOST_AUTO_TEST_SUITE_END()
