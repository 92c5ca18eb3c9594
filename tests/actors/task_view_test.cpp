#define BOOST_TEST_MODULE actors_task_view
#include <boost/test/unit_test.hpp>

#include <stdlib.h>

#include <filesystem>

#include <nlohmann/json.hpp>

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

BOOST_FIXTURE_TEST_CASE(a_limit_reached_round_trips_through_the_journal_into_the_view,
                        journal_fixture) {
  append(sc::task_submitted(meta, id, "sleep 600", "", 15 * 60'000));
  append(sc::task_state_changed(meta, ev::TaskStatus::queued, ev::TaskStatus::running, ""));
  append(sc::limit_reached(meta, ev::LimitKind::task_wall_clock, 15 * 60'000, 0, true,
                           "ran too long"));
  append(sc::task_finished(meta, ev::TaskStatus::failed, -1, "wall-clock limit of 15m reached"));

  // Stored and read back: the journal's envelope renders as the API and ferryctl show it.
  std::vector<nlohmann::json> rendered;
  std::vector<std::string> lines;
  int64_t running_at = 0;
  auto n = store->for_each(meta.stream_id, {}, [&](const ev::Envelope& e, std::string_view) {
    rendered.push_back(sc::to_json(e));
    lines.push_back(sc::to_text(e));
    if (e.event_type() == ev::Event::TaskStateChanged)
      running_at = e.timestamp_ns();
    return true;
  });
  BOOST_REQUIRE(n.ok());
  BOOST_REQUIRE(rendered.size() == 4u);
  BOOST_TEST(rendered[0]["data"]["wall_clock_limit_ms"] == 900'000);
  const auto& limit = rendered[2];
  BOOST_TEST(limit["type"] == "limit_reached");
  BOOST_TEST(limit["seq"] == 3);
  BOOST_TEST(limit["data"]["kind"] == "task_wall_clock");
  BOOST_TEST(limit["data"]["limit"] == 900'000);
  BOOST_TEST(limit["data"]["command_id"] == 0);
  BOOST_TEST(limit["data"]["whole_sandbox"] == true);
  BOOST_TEST(limit["data"]["detail"] == "ran too long");
  BOOST_TEST(lines[2].rfind("3  ", 0) == 0, lines[2]);
  BOOST_TEST(lines[2].find("limit_reached  ") != std::string::npos, lines[2]);
  BOOST_TEST(lines[2].find("kind=\"task_wall_clock\"") != std::string::npos, lines[2]);

  // The fold keeps the limit in force, when the task began to run and what it hit.
  auto v = ferry::actors::load_task_view(*store, id);
  BOOST_REQUIRE(v.ok() && v->has_value());
  const auto& view = **v;
  BOOST_TEST(view.wall_clock_limit_ms == 900'000u);
  BOOST_TEST(view.running_since_ns == running_at);
  BOOST_TEST(view.running_since_ns > 0);
  BOOST_REQUIRE(view.limits_reached.size() == 1u);
  BOOST_TEST(view.limits_reached[0].kind == "task_wall_clock");
  BOOST_TEST(view.limits_reached[0].whole_sandbox);
  BOOST_TEST(view.limits_reached[0].detail == "ran too long");
  BOOST_TEST(view.status == "failed");
  BOOST_TEST(view.reason == "wall-clock limit of 15m reached");

  // to_json and task_view_from_json are inverses (task snapshots).
  auto j = ferry::actors::to_json(view);
  BOOST_TEST(j["limits_reached"][0]["kind"] == "task_wall_clock");
  auto back = ferry::actors::task_view_from_json(j);
  BOOST_REQUIRE(back.ok());
  BOOST_TEST(back->wall_clock_limit_ms == view.wall_clock_limit_ms);
  BOOST_TEST(back->running_since_ns == view.running_since_ns);
  BOOST_REQUIRE(back->limits_reached.size() == 1u);
  BOOST_TEST(back->limits_reached[0].detail == "ran too long");
  BOOST_TEST(back->limits_reached[0].limit == 900'000u);
  BOOST_TEST(back->limits_reached[0].time_ns == view.limits_reached[0].time_ns);

  // A snapshot taken before these fields existed still loads, without a limit.
  j.erase("running_since_ns");
  j.erase("wall_clock_limit_ms");
  j.erase("limits_reached");
  auto old = ferry::actors::task_view_from_json(j);
  BOOST_REQUIRE(old.ok());
  BOOST_TEST(old->wall_clock_limit_ms == 0u);
  BOOST_TEST(old->running_since_ns == 0);
  BOOST_TEST(old->limits_reached.empty());
  BOOST_TEST(old->status == "failed");
}

BOOST_FIXTURE_TEST_CASE(egress_decisions_and_approvals_fold_into_the_view, journal_fixture) {
  append(sc::task_submitted(meta, id, "npm install", ""));
  auto decision = [&](std::string host, uint16_t port, bool allowed, std::string rule, bool approvable,
                      uint64_t up = 0, uint64_t down = 0) {
    return sc::egress_decision(meta, {"ferry-0123abcd-1", std::move(host), port, "CONNECT", allowed, std::move(rule),
                                      approvable, up, down, 12});
  };
  append(decision("registry.npmjs.org", 443, true, "policy:trusted", false, 100, 5000));
  append(decision("example.com", 443, false, "policy:trusted:not-listed", true));
  append(decision("example.com", 443, false, "policy:trusted:not-listed", true));  // listed once
  append(decision("other.example", 80, false, "policy:trusted:not-listed", true));
  append(decision("10.0.0.1", 80, false, "address:private 10.0.0.1", false));  // never approvable
  for (int i = 0; i < 25; ++i)  // the list keeps the latest max_approvable
    append(decision("h" + std::to_string(i) + ".example", 443, false, "custom:not-listed", true));
  auto v = ferry::actors::load_task_view(*store, id);
  BOOST_REQUIRE(v.ok() && v->has_value());
  auto e = (*v)->egress;
  BOOST_TEST(e.allowed == 1u);
  BOOST_TEST(e.denied == 29u);
  BOOST_TEST(e.bytes_up == 100u);
  BOOST_TEST(e.bytes_down == 5000u);
  BOOST_REQUIRE(e.approvable.size() == ferry::actors::egress_summary::max_approvable);
  BOOST_TEST(e.approvable.front() == "h5.example:443");
  BOOST_TEST(e.approvable.back() == "h24.example:443");

  // An approval of a host (any port) or of host:port takes what it allows off the list.
  append(sc::egress_approved(meta, "h24.example", "ferry-0123abcd-1"));
  append(sc::egress_approved(meta, "h23.example:443", ""));
  append(sc::egress_approved(meta, "h22.example:80", ""));  // another port: h22:443 stays
  v = ferry::actors::load_task_view(*store, id);
  e = (*v)->egress;
  BOOST_TEST(e.approvals == (std::vector<std::string>{"h24.example", "h23.example:443", "h22.example:80"}));
  BOOST_TEST(e.approvable.size() == ferry::actors::egress_summary::max_approvable - 2);
  BOOST_TEST(e.approvable.back() == "h22.example:443");

  // Rendered for the API and ferryctl; snapshots keep it.
  auto j = ferry::actors::to_json(**v);
  BOOST_TEST(j["egress"]["approvals"].size() == 3u);
  auto back = ferry::actors::task_view_from_json(j);
  BOOST_REQUIRE(back.ok());
  BOOST_TEST(back->egress.approvable == e.approvable);
  BOOST_TEST(back->egress.denied == 29u);
  std::vector<nlohmann::json> rendered;
  BOOST_REQUIRE(store->for_each(meta.stream_id, {}, [&](const ev::Envelope& env, std::string_view) {
    rendered.push_back(sc::to_json(env));
    return true;
  }).ok());
  BOOST_TEST(rendered[1]["type"] == "egress_decision");
  BOOST_TEST(rendered[1]["data"]["host"] == "registry.npmjs.org");
  BOOST_TEST(rendered[1]["data"]["bytes_down"] == 5000);
  BOOST_TEST(rendered[1]["data"]["rule"] == "policy:trusted");
  BOOST_TEST(rendered.back()["type"] == "egress_approved");
  BOOST_TEST(rendered.back()["data"]["destination"] == "h22.example:80");
}

BOOST_FIXTURE_TEST_CASE(git_operations_fold_into_the_view, journal_fixture) {
  append(sc::task_submitted(meta, id, "make test", "demo/hello"));
  auto op = [&](std::string service, bool advertisement, std::vector<std::string> refs, std::string result,
                std::string reason = "") {
    sc::git_operation_fields g;
    g.sandbox_id = "ferry-0123abcd-1";
    g.repo = "demo/hello";
    g.service = std::move(service);
    g.advertisement = advertisement;
    g.protocol_version = 2;
    g.refs = std::move(refs);
    g.result = std::move(result);
    g.reason = std::move(reason);
    g.http_status = g.result == "ok" ? 200 : 403;
    g.bytes_in = 10;
    g.bytes_out = 2000;
    g.duration_ms = 7;
    return sc::git_operation(meta, g);
  };
  const std::string a(40, 'a'), b(40, 'b'), c(40, 'c'), z(40, '0');
  append(op("upload-pack", true, {}, "ok"));
  append(op("upload-pack", false, {}, "ok"));
  append(op("receive-pack", false, {"refs/heads/ferry/0123abcd " + z + " " + b}, "ok"));
  append(op("receive-pack", false, {"refs/heads/main " + a + " " + b}, "refused", "only refs/heads/ferry/0123abcd"));
  append(op("receive-pack", false, {"refs/heads/ferry/0123abcd " + b + " " + c}, "ok"));
  append(op("upload-pack", false, {}, "upstream_error", "the forge answered 500"));
  auto v = ferry::actors::load_task_view(*store, id);
  BOOST_REQUIRE(v.ok() && v->has_value());
  const auto& g = (*v)->git;
  BOOST_TEST(g.operations == 6u);
  BOOST_TEST(g.refused == 1u);
  BOOST_TEST(g.upstream_errors == 1u);
  BOOST_REQUIRE(g.pushed.size() == 1u);  // one ref, at its latest object
  BOOST_TEST(g.pushed[0].first == "refs/heads/ferry/0123abcd");
  BOOST_TEST(g.pushed[0].second == c);

  auto j = ferry::actors::to_json(**v);
  BOOST_TEST(j["git"]["pushed"][0]["oid"] == c);
  auto back = ferry::actors::task_view_from_json(j);
  BOOST_REQUIRE(back.ok());
  BOOST_TEST(back->git.pushed == g.pushed);
  BOOST_TEST(back->git.refused == 1u);
  j.erase("git");  // a snapshot from before git operations
  auto old = ferry::actors::task_view_from_json(j);
  BOOST_REQUIRE(old.ok());
  BOOST_TEST(old->git.operations == 0u);

  std::vector<nlohmann::json> rendered;
  BOOST_REQUIRE(store->for_each(meta.stream_id, {}, [&](const ev::Envelope& env, std::string_view) {
    rendered.push_back(sc::to_json(env));
    return true;
  }).ok());
  BOOST_TEST(rendered[4]["type"] == "git_operation");
  BOOST_TEST(rendered[4]["data"]["result"] == "refused");
  BOOST_TEST(rendered[4]["data"]["refs"][0] == "refs/heads/main " + a + " " + b);
  BOOST_TEST(rendered[4]["data"]["protocol_version"] == 2);
  BOOST_TEST(rendered[4]["data"]["reason"] == "only refs/heads/ferry/0123abcd");
}

BOOST_AUTO_TEST_CASE(a_sandbox_id_names_its_task) {
  using ferry::actors::task_of_sandbox;
  BOOST_TEST(task_of_sandbox("ferry-0123abcd-1").value_or("") == "0123abcd");
  BOOST_TEST(task_of_sandbox("ferry-0123abcd-12-setup").value_or("") == "0123abcd");
  for (const char* other : {"", "ferry-", "ferry-0123abcd", "ferry-0123abcd-", "ferry-0123abcd-x", "ferry-XYZ-1",
                            "setup-0123abcd-1", "pool-0123abcd-1", "ferry-0123abcd-1-setupx", "ferry--1"})
    BOOST_TEST(!task_of_sandbox(other).has_value(), other);
}
