#define BOOST_TEST_MODULE storage_journal
#include <boost/test/unit_test.hpp>

#include <stdlib.h>

#include <filesystem>
#include <thread>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace fs = std::filesystem;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using ferry::storage::expected_version;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string tmpl = (fs::temp_directory_path() / "ferry-journal-XXXXXX").string();
    BOOST_REQUIRE(mkdtemp(tmpl.data()));
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::unique_ptr<ferry::storage::event_store> open(const fs::path& dir) {
  ferry::storage::journal_options o;
  o.dir = dir / "journal";
  auto s = ferry::storage::open_journal(o);
  BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
  return std::move(*s);
}

std::string out(const std::string& stream, std::string_view text) {
  sc::envelope_meta m;
  m.stream_id = stream;
  m.user = "u";
  return sc::output_chunk(m, 1, ev::OutputStream::stdout, text);
}

std::string text_of(const std::string& bytes) {
  auto e = sc::verify_envelope(bytes);
  BOOST_REQUIRE(e.ok());
  auto* d = (*e)->event_as_OutputChunk()->data();
  return std::string(reinterpret_cast<const char*>(d->data()), d->size());
}

uint64_t seq_of(const std::string& bytes) { return (*sc::verify_envelope(bytes))->sequence(); }

}  // namespace

BOOST_AUTO_TEST_CASE(append_assigns_gapless_sequences_and_global_positions) {
  temp_dir t;
  auto j = open(t.path);
  std::vector<std::string> a{out("task-a", "1"), out("task-a", "2")};
  auto r1 = j->append("task-a", a);
  BOOST_REQUIRE(r1.ok());
  BOOST_TEST(r1->first_sequence == 1u);
  BOOST_TEST(r1->last_sequence == 2u);
  BOOST_TEST(r1->last_position == 2u);
  // The appended buffers are stamped in place with what was stored.
  BOOST_TEST(seq_of(a[1]) == 2u);
  std::vector<std::string> b{out("task-b", "x")};
  auto r2 = j->append("task-b", b);
  BOOST_REQUIRE(r2.ok());
  BOOST_TEST(r2->first_sequence == 1u);
  BOOST_TEST(r2->last_position == 3u);
  BOOST_TEST(j->last_position() == 3u);
  auto events = j->read_stream("task-a", 1, 100);
  BOOST_REQUIRE(events.ok());
  BOOST_REQUIRE(events->size() == 2u);
  BOOST_TEST(text_of((*events)[0]) == "1");
  BOOST_TEST(text_of((*events)[1]) == "2");
  BOOST_TEST((*sc::verify_envelope((*events)[1]))->position() == 2u);
}

BOOST_AUTO_TEST_CASE(read_honours_from_and_count) {
  temp_dir t;
  auto j = open(t.path);
  for (int i = 1; i <= 10; ++i) {
    std::vector<std::string> e{out("task-a", std::to_string(i))};
    BOOST_REQUIRE(j->append("task-a", e).ok());
  }
  auto mid = j->read_stream("task-a", 4, 3);
  BOOST_REQUIRE(mid.ok());
  BOOST_REQUIRE(mid->size() == 3u);
  BOOST_TEST(seq_of((*mid)[0]) == 4u);
  BOOST_TEST(seq_of((*mid)[2]) == 6u);
  BOOST_TEST(j->read_stream("task-a", 11, 10)->empty());
  BOOST_TEST(j->read_stream("task-missing", 1, 10)->empty());
  BOOST_TEST(*j->highest_sequence("task-a") == 10u);
  BOOST_TEST(*j->highest_sequence("task-missing") == 0u);
  // A stream whose name is a prefix of another does not see the other's events.
  std::vector<std::string> e{out("task-a2", "z")};
  BOOST_REQUIRE(j->append("task-a2", e).ok());
  BOOST_TEST(j->read_stream("task-a", 1, 100)->size() == 10u);
}

BOOST_AUTO_TEST_CASE(expected_version_mismatch_writes_nothing) {
  temp_dir t;
  auto j = open(t.path);
  std::vector<std::string> e1{out("task-a", "1")};
  BOOST_REQUIRE(j->append("task-a", e1, expected_version::no_stream()).ok());
  std::vector<std::string> e2{out("task-a", "2"), out("task-a", "3")};
  auto conflict = j->append("task-a", e2, expected_version::no_stream());
  BOOST_REQUIRE(!conflict.ok());
  BOOST_TEST((conflict.error().code == ferry::errc::conflict), conflict.error().message);
  BOOST_TEST(conflict.error().message.find("task-a") != std::string::npos,
             conflict.error().message);
  auto conflict2 = j->append("task-a", e2, expected_version::exact(5));
  BOOST_REQUIRE(!conflict2.ok());
  BOOST_TEST(*j->highest_sequence("task-a") == 1u);
  BOOST_TEST(j->last_position() == 1u);
  BOOST_TEST(j->append("task-a", e2, expected_version::exact(1)).ok());
  BOOST_TEST(*j->highest_sequence("task-a") == 3u);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_a_reason) {
  temp_dir t;
  auto j = open(t.path);
  std::vector<std::string> wrong_stream{out("task-b", "x")};
  auto r = j->append("task-a", wrong_stream);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("task-b") != std::string::npos);
  std::vector<std::string> garbage{"not a flatbuffer at all"};
  BOOST_TEST(!j->append("task-a", garbage).ok());
  std::vector<std::string> none;
  BOOST_TEST(!j->append("task-a", none).ok());
  std::vector<std::string> bad_name{out("a/b", "x")};
  BOOST_TEST(!j->append("a/b", bad_name).ok());
  BOOST_TEST(j->last_position() == 0u);
}

BOOST_AUTO_TEST_CASE(events_survive_reopen_and_positions_continue) {
  temp_dir t;
  {
    auto j = open(t.path);
    std::vector<std::string> e{out("task-a", "kept"), out("task-a", "too")};
    BOOST_REQUIRE(j->append("task-a", e).ok());
  }
  auto j = open(t.path);
  auto events = j->read_stream("task-a", 1, 10);
  BOOST_REQUIRE(events->size() == 2u);
  BOOST_TEST(text_of((*events)[0]) == "kept");
  BOOST_TEST(j->last_position() == 2u);
  std::vector<std::string> e{out("task-c", "next")};
  auto r = j->append("task-c", e);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->last_position == 3u);
}

BOOST_AUTO_TEST_CASE(second_writer_is_refused_but_secondary_reader_sees_new_events) {
  temp_dir t;
  auto j = open(t.path);
  ferry::storage::journal_options o;
  o.dir = t.path / "journal";
  auto second = ferry::storage::open_journal(o);
  BOOST_REQUIRE(!second.ok());
  BOOST_TEST((second.error().code == ferry::errc::busy), second.error().message);

  std::vector<std::string> e1{out("task-a", "1")};
  BOOST_REQUIRE(j->append("task-a", e1).ok());
  auto reader = ferry::storage::open_journal_secondary(t.path / "journal", t.path / "scratch");
  BOOST_REQUIRE_MESSAGE(reader.ok(), (reader.ok() ? "" : reader.error().message));
  BOOST_TEST((*reader)->read_stream("task-a", 1, 10)->size() == 1u);
  std::vector<std::string> e2{out("task-a", "2")};
  BOOST_REQUIRE(j->append("task-a", e2).ok());
  BOOST_REQUIRE((*reader)->catch_up().ok());
  BOOST_TEST((*reader)->read_stream("task-a", 1, 10)->size() == 2u);
  std::vector<std::string> e3{out("task-a", "3")};
  BOOST_TEST(!(*reader)->append("task-a", e3).ok());
}

BOOST_AUTO_TEST_CASE(concurrent_appenders_get_distinct_gapless_positions) {
  temp_dir t;
  auto j = open(t.path);
  constexpr int threads = 4, per_thread = 50;
  std::vector<std::thread> ts;
  for (int k = 0; k < threads; ++k)
    ts.emplace_back([&, k] {
      auto stream = "task-t" + std::to_string(k);
      for (int i = 0; i < per_thread; ++i) {
        std::vector<std::string> e{out(stream, std::to_string(i))};
        BOOST_REQUIRE(j->append(stream, e).ok());
      }
    });
  for (auto& th : ts)
    th.join();
  BOOST_TEST(j->last_position() == static_cast<uint64_t>(threads * per_thread));
  for (int k = 0; k < threads; ++k) {
    auto events = j->read_stream("task-t" + std::to_string(k), 1, 1000);
    BOOST_REQUIRE(events->size() == static_cast<size_t>(per_thread));
    for (int i = 0; i < per_thread; ++i) {
      BOOST_TEST(seq_of((*events)[i]) == static_cast<uint64_t>(i + 1));
      BOOST_TEST(text_of((*events)[i]) == std::to_string(i));
    }
  }
  auto names = j->list_streams("task-t");
  BOOST_REQUIRE(names.ok());
  BOOST_TEST(names->size() == static_cast<size_t>(threads));
}
