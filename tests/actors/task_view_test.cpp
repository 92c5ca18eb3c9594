#define BOOST_TEST_MODULE actors_task_view
#include <boost/test/unit_test.hpp>

#include <stdlib.h>

#include <filesystem>

#include "ferry/actors/tasks.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace fs = std::filesystem;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;

namespace {

struct journal_fixture {
  fs::path dir;
  std::unique_ptr<ferry::storage::event_store> store;
  const std::string id = "0123abcd";
  const sc::envelope_meta meta{"task-0123abcd", "", "", "tok_a"};

  journal_fixture() {
    std::string tmpl = (fs::temp_directory_path() / "ferry-view-XXXXXX").string();
    BOOST_REQUIRE(mkdtemp(tmpl.data()));
    dir = tmpl;
    ferry::storage::journal_options opts;
    opts.dir = dir / "journal";
    opts.durability = ferry::storage::durability::periodic;
    auto s = ferry::storage::open_journal(opts);
    BOOST_REQUIRE(s.ok());
    store = std::move(*s);
  }
  ~journal_fixture() {
    store.reset();
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  void append(std::string e) {
    std::vector<std::string> envs{std::move(e)};
    BOOST_REQUIRE(store->append(meta.stream_id, envs).ok());
  }
};

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_view_folds_the_task_lifecycle, journal_fixture) {
  BOOST_TEST(!ferry::actors::load_task_view(*store, id)->has_value());
  append(sc::task_submitted(meta, id, "make", "repo"));
  append(sc::task_state_changed(meta, ev::TaskStatus::queued, ev::TaskStatus::running, ""));
  append(sc::sandbox_state_changed(meta, "ferry-x", "runsc", ev::SandboxStatus::spawning,
                                   ev::SandboxStatus::executing, ""));
  auto v = ferry::actors::load_task_view(*store, id);
  BOOST_REQUIRE(v.ok() && v->has_value());
  BOOST_TEST((*v)->status == "running");
  BOOST_TEST((*v)->user == "tok_a");
  BOOST_TEST((*v)->sandbox_status == "executing");
  BOOST_TEST(!(*v)->exit_code.has_value());
  append(sc::command_exited(meta, 1, 2, 0, 5));
  append(sc::task_finished(meta, ev::TaskStatus::failed, 2, "exit 2"));
  v = ferry::actors::load_task_view(*store, id);
  BOOST_TEST((*v)->status == "failed");
  BOOST_TEST((*v)->exit_code.value_or(-1) == 2);
  BOOST_TEST((*v)->finished);
  BOOST_TEST((*v)->last_sequence == 5u);
}

BOOST_FIXTURE_TEST_CASE(the_cache_follows_new_events_and_matches_a_full_fold, journal_fixture) {
  ferry::actors::task_view_cache cache(*store);
  BOOST_TEST(!cache.get(id)->has_value());
  BOOST_TEST(!cache.get("../etc")->has_value());
  append(sc::task_submitted(meta, id, "make", ""));
  BOOST_TEST((*cache.get(id))->status == "queued");
  for (int i = 0; i < 1500; ++i)  // more than one read batch of output
    append(sc::output_chunk(meta, 1, ev::OutputStream::stdout, "x"));
  append(sc::command_exited(meta, 1, 0, 0, 5));
  append(sc::task_finished(meta, ev::TaskStatus::succeeded, 0, ""));
  auto cached = cache.get(id);
  auto full = ferry::actors::load_task_view(*store, id);
  BOOST_REQUIRE(cached->has_value());
  BOOST_TEST((*cached)->last_sequence == 1503u);
  BOOST_TEST((*cached)->last_sequence == (*full)->last_sequence);
  BOOST_TEST((*cached)->status == "succeeded");
  BOOST_TEST((*cached)->exit_code.value_or(-1) == 0);
}

BOOST_FIXTURE_TEST_CASE(the_cache_stays_bounded_and_correct_past_its_capacity, journal_fixture) {
  ferry::actors::task_view_cache cache(*store, 2);
  std::vector<std::string> ids{"a1", "b2", "c3"};
  for (auto& t : ids) {
    sc::envelope_meta m{"task-" + t, "", "", "u"};
    std::vector<std::string> envs{sc::task_submitted(m, t, "cmd-" + t, "")};
    BOOST_REQUIRE(store->append(m.stream_id, envs).ok());
  }
  for (int round = 0; round < 3; ++round)
    for (auto& t : ids) {
      auto v = cache.get(t);
      BOOST_REQUIRE(v->has_value());
      BOOST_TEST((*v)->command == "cmd-" + t);
      BOOST_TEST(cache.size() <= 2u);
    }
}
