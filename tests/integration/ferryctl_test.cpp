// ferryctl against real data directories: listing, showing, tailing (live, with --follow) and
// replaying what a running ferryd stored, verifying the store, and the documented exit code of
// every failure (missing directory, no journal, unknown stream, bad flags, a locked journal for
// `token create`, a tampered or corrupt store).

#define BOOST_TEST_MODULE integration_ferryctl
#include <boost/test/unit_test.hpp>

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <rocksdb/db.h>

#include "ferry/sandbox/process.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// ferryctl's documented exit codes (tools/README.md, `ferryctl --help`).
constexpr int exit_problems = 1;
constexpr int exit_usage = 2;
constexpr int exit_no_journal = 3;
constexpr int exit_locked = 4;
constexpr int exit_corrupt = 5;
constexpr int exit_stream_not_found = 6;

program_run ferryctl(const fs::path& data_dir, std::vector<std::string> args) {
  std::vector<std::string> argv{FERRYCTL_BINARY, "--data-dir", data_dir.string()};
  argv.insert(argv.end(), args.begin(), args.end());
  const auto t0 = std::chrono::steady_clock::now();
  program_run run = run_program(argv, 60s);
  std::string line;
  for (const auto& a : args)
    line += " " + a;
  BOOST_TEST_MESSAGE("ferryctl" << line << ": " << run.summary() << " in " << ms_since(t0)
                                << " ms");
  return run;
}

/// The exit code of a run that exited (not killed, not timed out); -1 otherwise.
int exit_code(const program_run& run) {
  return run.spawn_error.empty() && !run.timed_out && run.status.signal == 0
           ? run.status.exit_code
           : -1;
}

/// One JSON value per non-empty line; a line that is not JSON fails the test.
std::vector<json> json_lines(const std::string& out) {
  std::vector<json> values;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    if (line.empty())
      continue;
    auto j = json::parse(line, nullptr, false);
    BOOST_TEST(!j.is_discarded(), "not a JSON line: " << line);
    if (!j.is_discarded())
      values.push_back(std::move(j));
  }
  return values;
}

std::vector<std::string> lines_of(const std::string& out) {
  std::vector<std::string> lines;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);)
    if (!line.empty())
      lines.push_back(line);
  return lines;
}

uint64_t u64(const json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_number_unsigned() ? j[key].get<uint64_t>()
                                                                          : 0;
}

/// Submits `command` and waits until the task has finished; returns its id.
std::string run_task(const api_client& api, const std::string& command) {
  const std::string id = submit_task(api, command);
  std::string last;
  auto done = api.wait_for_task(
    id, [](const json& t) { return field(t, "finished") == json(true); }, 120s, &last);
  BOOST_TEST_REQUIRE(done.has_value(), "task " << id << " did not finish: " << last);
  return id;
}

/// The positions of `events` increase strictly and each stream's sequences run 1, 2, … (in the
/// order they appear).
void check_global_order(const std::vector<json>& events) {
  uint64_t last_position = 0;
  std::map<std::string, uint64_t> last_seq;
  for (const auto& e : events) {
    BOOST_TEST(u64(e, "position") > last_position, "position does not increase: " << e.dump());
    last_position = u64(e, "position");
    auto& seq = last_seq[str(e, "stream")];
    BOOST_TEST(u64(e, "seq") == seq + 1, "sequence gap in " << str(e, "stream") << ": " << e.dump());
    seq = u64(e, "seq");
  }
}

/// A running ferryd whose journal holds one finished task ("echo hi").
struct ferryd_with_task {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};
  std::string id = run_task(api, "echo hi");
  std::string stream = "task-" + id;
  sandbox_sweeper sweeper{id};
};

// -- tampering with a stopped ferryd's journal (layout: storage/src/keys.h) ---------------------

std::string event_key(const std::string& stream, uint64_t seq) {
  std::string k = "e" + stream;
  k.push_back('\0');
  for (int i = 7; i >= 0; --i)
    k.push_back(static_cast<char>((seq >> (i * 8)) & 0xff));
  return k;
}

/// Opens the journal with RocksDB itself (ferryd must be stopped) and lets `edit` change it.
void with_raw_journal(const fs::path& data_dir, const std::function<void(rocksdb::DB&)>& edit) {
  rocksdb::Options o;
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::Open(o, (data_dir / "journal").string(), &raw);
  BOOST_TEST_REQUIRE(s.ok(), "open the journal with RocksDB: " << s.ToString());
  std::unique_ptr<rocksdb::DB> db(raw);
  edit(*db);
  BOOST_TEST_REQUIRE(db->Flush(rocksdb::FlushOptions()).ok());
  BOOST_TEST_REQUIRE(db->Close().ok());
}

std::string get_raw(rocksdb::DB& db, const std::string& key) {
  std::string v;
  auto s = db.Get(rocksdb::ReadOptions(), key, &v);
  BOOST_TEST_REQUIRE(s.ok(), "read a stored event: " << s.ToString());
  return v;
}

void put_raw(rocksdb::DB& db, const std::string& key, const std::string& value) {
  rocksdb::WriteOptions wo;
  wo.sync = true;
  BOOST_TEST_REQUIRE(db.Put(wo, key, value).ok());
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(streams_show_replay_and_verify_read_what_a_running_ferryd_stored,
                        ferryd_with_task) {
  const fs::path dir = ferryd.data_dir();

  // events streams --kind task: the task's stream with its head; the tokens stream is not a task.
  program_run streams = ferryctl(dir, {"events", "streams", "--kind", "task", "--json"});
  BOOST_TEST_REQUIRE(exit_code(streams) == 0, streams.summary());
  std::vector<json> listed = json_lines(streams.out);
  BOOST_TEST_REQUIRE(listed.size() == 1u, streams.out);
  BOOST_TEST(str(listed[0], "stream") == stream);
  const uint64_t highest = u64(listed[0], "highest_sequence");
  BOOST_TEST(highest >= 8u, "a task that ran has at least 8 events: " << streams.out);
  BOOST_TEST(u64(listed[0], "deleted_to") == 0u);
  BOOST_TEST(str(listed[0], "head_hash").size() == 64u);
  program_run text_streams = ferryctl(dir, {"events", "streams"});
  BOOST_TEST(exit_code(text_streams) == 0, text_streams.summary());
  BOOST_TEST(text_streams.out.find(stream + "\t" + std::to_string(highest) + "\t0\n") !=
               std::string::npos,
             text_streams.out);
  BOOST_TEST(text_streams.out.find("tokens\t") != std::string::npos, text_streams.out);

  // events show --json: every event in order, and the same as the API's WebSocket shows.
  program_run show = ferryctl(dir, {"events", "show", stream, "--json"});
  BOOST_TEST_REQUIRE(exit_code(show) == 0, show.summary());
  const std::vector<json> events = json_lines(show.out);
  BOOST_TEST_REQUIRE(events.size() == highest, describe_events(events));
  check_envelopes(events, id, 1);
  BOOST_TEST(str(events.front(), "type") == "task_submitted");
  BOOST_TEST(str(events.back(), "type") == "task_finished");
  BOOST_TEST(stdout_text(events) == "hi\n");
  {
    ws_client ws;
    ws_handshake hs = api.open_events(ws, id);
    BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
    ws_transcript t = read_until_close(ws, 30s);
    BOOST_TEST(t.events == events, boost::test_tools::per_element());
  }
  // --from/--to select a range; text mode prints one line per event starting with its sequence.
  program_run range = ferryctl(dir, {"events", "show", stream, "--from", "2", "--to", "4"});
  BOOST_TEST_REQUIRE(exit_code(range) == 0, range.summary());
  std::vector<std::string> range_lines = lines_of(range.out);
  BOOST_TEST_REQUIRE(range_lines.size() == 3u, range.out);
  for (size_t i = 0; i < range_lines.size(); ++i)
    BOOST_TEST(range_lines[i].rfind(std::to_string(i + 2) + "  ", 0) == 0u, range_lines[i]);

  // replay: the state the task actor folds, the same as the gateway's view of the task.
  program_run replay = ferryctl(dir, {"replay", stream, "--json"});
  BOOST_TEST_REQUIRE(exit_code(replay) == 0, replay.summary());
  const json replayed = json::parse(replay.out, nullptr, false);
  BOOST_TEST_REQUIRE(replayed.is_object(), replay.out);
  const json state = field(replayed, "state");
  const json api_task = get_task_json(api, id);
  BOOST_TEST(str(state, "status") == "succeeded");
  BOOST_TEST(field(state, "exit_code") == json(0));
  BOOST_TEST(u64(replayed, "at") == highest);
  for (const char* key : {"status", "exit_code", "command", "user", "reason", "last_seq"})
    BOOST_TEST(field(state, key) == field(api_task, key), key << ": replay " << state.dump()
                                                              << " vs API " << api_task.dump());
  const json sandbox = field(state, "sandbox");
  BOOST_TEST(str(sandbox, "status") == "terminated");
  BOOST_TEST(str(sandbox, "backend") == "runsc");
  BOOST_TEST(!str(sandbox, "id").empty());
  BOOST_TEST(str(sandbox, "id") == str(field(api_task, "sandbox"), "id"));
  program_run replay_text = ferryctl(dir, {"replay", stream});
  BOOST_TEST(exit_code(replay_text) == 0, replay_text.summary());
  BOOST_TEST(replay_text.out.find("status:     succeeded\n") != std::string::npos,
             replay_text.out);
  BOOST_TEST(replay_text.out.find("status=terminated") != std::string::npos, replay_text.out);

  // replay --at 1: just submitted.
  program_run at1 = ferryctl(dir, {"replay", stream, "--at", "1", "--json"});
  BOOST_TEST_REQUIRE(exit_code(at1) == 0, at1.summary());
  const json first = json::parse(at1.out, nullptr, false);
  BOOST_TEST(str(field(first, "state"), "status") == "queued", at1.out);
  BOOST_TEST(str(field(field(first, "state"), "sandbox"), "status") == "none", at1.out);
  BOOST_TEST(field(field(first, "state"), "finished") == json(false), at1.out);

  // --timeline: the task's statuses in order, and one sandbox transition per
  // sandbox_state_changed event, at its sequence.
  program_run timeline_run = ferryctl(dir, {"replay", stream, "--timeline", "--json"});
  BOOST_TEST_REQUIRE(exit_code(timeline_run) == 0, timeline_run.summary());
  const json timeline = field(json::parse(timeline_run.out, nullptr, false), "timeline");
  BOOST_TEST_REQUIRE(timeline.is_array(), timeline_run.out);
  std::vector<std::string> task_path{"none"};
  std::vector<std::string> sandbox_moves;  // "seq from>to"
  uint64_t last_seq = 0;
  for (const auto& t : timeline) {
    BOOST_TEST(u64(t, "seq") >= last_seq, "timeline out of order: " << timeline.dump());
    last_seq = u64(t, "seq");
    BOOST_TEST(!str(t, "time").empty());
    if (str(t, "what") == "task") {
      BOOST_TEST(str(t, "from") == task_path.back(), t.dump());
      task_path.push_back(str(t, "to"));
    } else {
      sandbox_moves.push_back(std::to_string(u64(t, "seq")) + " " + str(t, "from") + ">" +
                              str(t, "to"));
    }
  }
  BOOST_TEST((task_path == std::vector<std::string>{"none", "queued", "running", "succeeded"}),
             timeline.dump());
  std::vector<std::string> sandbox_events;
  for (const auto& e : events)
    if (str(e, "type") == "sandbox_state_changed")
      sandbox_events.push_back(std::to_string(u64(e, "seq")) + " " + str(data_of(e), "from") +
                               ">" + str(data_of(e), "to"));
  BOOST_TEST(sandbox_moves == sandbox_events, boost::test_tools::per_element());
  BOOST_TEST(sandbox_events.size() >= 4u, describe_events(events));
  program_run timeline_text = ferryctl(dir, {"replay", stream, "--timeline"});
  BOOST_TEST(exit_code(timeline_text) == 0, timeline_text.summary());
  BOOST_TEST(timeline_text.out.find("queued -> running") != std::string::npos,
             timeline_text.out);

  // verify: the whole store and the one stream hold.
  program_run verify = ferryctl(dir, {"verify"});
  BOOST_TEST(exit_code(verify) == 0, verify.summary() << "\n" << verify.out);
  BOOST_TEST(verify.out.find(": ok") != std::string::npos, verify.out);
  program_run verify_json = ferryctl(dir, {"verify", stream, "--json"});
  BOOST_TEST(exit_code(verify_json) == 0, verify_json.summary());
  const json report = json::parse(verify_json.out, nullptr, false);
  BOOST_TEST(u64(report, "events_checked") == highest, verify_json.out);
  BOOST_TEST(field(report, "problems") == json::array(), verify_json.out);

  // events tail: the whole store in position order — every event of every stream, once.
  program_run tail = ferryctl(dir, {"events", "tail", "--json"});
  BOOST_TEST(exit_code(tail) == 0, tail.summary());
  const std::vector<json> all = json_lines(tail.out);
  check_global_order(all);
  std::vector<json> task_events;
  for (const auto& e : all)
    if (str(e, "stream") == stream)
      task_events.push_back(e);
  BOOST_TEST(task_events == events, boost::test_tools::per_element());
  BOOST_TEST((!all.empty() && str(all.front(), "stream") == "tokens"), tail.out);
  program_run tail_from = ferryctl(
    dir, {"events", "tail", "--json", "--from-position", std::to_string(u64(events[1], "position"))});
  BOOST_TEST(exit_code(tail_from) == 0, tail_from.summary());
  const std::vector<json> later = json_lines(tail_from.out);
  BOOST_TEST((!later.empty() && later.front() == events[1]), tail_from.out);

  // Errors on the live store: unknown streams, --at past the end, a kind replay has no fold for,
  // and the one writing command while ferryd holds the journal.
  const std::string unknown = "task-00000000000000000000000000000000";
  for (auto args : {std::vector<std::string>{"events", "show", unknown},
                    std::vector<std::string>{"replay", unknown},
                    std::vector<std::string>{"verify", unknown}}) {
    program_run r = ferryctl(dir, args);
    BOOST_TEST(exit_code(r) == exit_stream_not_found, r.summary());
    BOOST_TEST(r.err.find(unknown) != std::string::npos, r.err);
  }
  program_run past = ferryctl(dir, {"replay", stream, "--at", std::to_string(highest + 1)});
  BOOST_TEST(exit_code(past) == exit_usage, past.summary());
  program_run tokens = ferryctl(dir, {"replay", "tokens"});
  BOOST_TEST(exit_code(tokens) == exit_usage, tokens.summary());
  BOOST_TEST(tokens.err.find("task") != std::string::npos, tokens.err);
  program_run locked = ferryctl(dir, {"token", "create", "--name", "ci"});
  BOOST_TEST(exit_code(locked) == exit_locked, locked.summary());
  BOOST_TEST(locked.err.find("POST /api/v1/tokens") != std::string::npos, locked.err);
  BOOST_TEST(locked.out.empty(), "printed a token while ferryd runs: " << locked.out);
}

BOOST_AUTO_TEST_CASE(tail_follow_prints_a_new_task_live_and_exits_0_on_sigterm) {
  ferryd_process ferryd{ferryd_options(FERRYD_BINARY)};
  api_client api{ferryd};

  ferry::sandbox::spawn_options opts;
  opts.argv = {FERRYCTL_BINARY, "--data-dir", ferryd.data_dir().string(), "events",
               "tail",          "--follow",   "--json"};
  opts.out = ferry::sandbox::stdio::pipe;
  opts.err = ferry::sandbox::stdio::inherit;
  auto spawned = ferry::sandbox::child_process::spawn(opts);
  BOOST_TEST_REQUIRE(spawned.ok(), (spawned.ok() ? "" : spawned.error().message));
  ferry::sandbox::child_process& tail = *spawned;

  // Reads tail's stdout into `events` until `stop` holds for one or `timeout` passes.
  std::vector<json> events;
  std::string pending;
  auto read_until = [&](const std::function<bool(const json&)>& stop,
                        std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0)
        return false;
      pollfd p{tail.stdout_fd(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0)
        continue;
      char buf[8192];
      ssize_t n = ::read(tail.stdout_fd(), buf, sizeof buf);
      if (n <= 0)
        return false;  // EOF: tail exited
      pending.append(buf, static_cast<size_t>(n));
      for (size_t nl; (nl = pending.find('\n')) != std::string::npos;) {
        auto j = json::parse(pending.substr(0, nl), nullptr, false);
        BOOST_TEST(!j.is_discarded(), "not a JSON line: " << pending.substr(0, nl));
        pending.erase(0, nl + 1);
        if (j.is_discarded())
          continue;
        events.push_back(j);
        if (stop(j))
          return true;
      }
    }
  };

  // Catching up: the store's first event, the admin token.
  const bool caught_up =
    read_until([](const json& e) { return str(e, "stream") == "tokens"; }, 30s);
  if (!caught_up) {
    auto st = tail.wait_for(1s);
    BOOST_TEST_REQUIRE(caught_up, "tail printed no token_created event (it "
                                    << (st ? "exited " + std::to_string(st->exit_code)
                                           : std::string("still runs"))
                                    << "); got" << describe_events(events));
  }
  // Live: a task submitted now, while tail waits.
  const auto submitted = std::chrono::steady_clock::now();
  const std::string id = submit_task(api, "echo live");
  sandbox_sweeper sweeper(id);
  const std::string stream = "task-" + id;
  const bool first_seen =
    read_until([&](const json& e) { return str(e, "stream") == stream; }, 30s);
  BOOST_TEST_REQUIRE(first_seen, "tail did not print the new task's first event");
  BOOST_TEST_MESSAGE("tail --follow printed the new task's first event "
                     << ms_since(submitted) << " ms after the submission");
  const bool finished = read_until(
    [&](const json& e) { return str(e, "stream") == stream && str(e, "type") == "task_finished"; },
    120s);
  BOOST_TEST_REQUIRE(finished, "tail did not print task_finished:" << describe_events(events));

  check_global_order(events);
  std::vector<json> task_events;
  for (const auto& e : events)
    if (str(e, "stream") == stream)
      task_events.push_back(e);
  check_envelopes(task_events, id, 1);
  BOOST_TEST(stdout_text(task_events) == "live\n");

  // SIGTERM ends it with 0, promptly.
  const auto signalled = std::chrono::steady_clock::now();
  tail.signal_group(SIGTERM);
  auto status = tail.wait_for(10s);
  BOOST_TEST_REQUIRE(status.has_value(), "tail --follow ignored SIGTERM for 10 s");
  BOOST_TEST(status->ok(), "tail --follow after SIGTERM: exit " << status->exit_code << ", signal "
                                                                << status->signal);
  BOOST_TEST_MESSAGE("tail --follow exited " << ms_since(signalled) << " ms after SIGTERM");
}

BOOST_AUTO_TEST_CASE(missing_directories_and_bad_command_lines_have_their_exit_codes) {
  temp_dir tmp("ferryctl-test");

  const fs::path missing = tmp.path() / "no-such-dir";
  program_run r = ferryctl(missing, {"events", "streams"});
  BOOST_TEST(exit_code(r) == exit_no_journal, r.summary());
  BOOST_TEST(r.err.find(missing.string()) != std::string::npos, r.err);

  // A directory without a journal, and one whose journal/ is empty: not a journal.
  for (const fs::path& dir : {tmp.path(), tmp.path() / "empty"}) {
    if (dir != tmp.path())
      fs::create_directories(dir / "journal");
    for (auto args : {std::vector<std::string>{"events", "streams"},
                      std::vector<std::string>{"replay", "task-00"},
                      std::vector<std::string>{"verify"}}) {
      program_run run = ferryctl(dir, args);
      BOOST_TEST(exit_code(run) == exit_no_journal, run.summary());
      BOOST_TEST(run.err.find(dir.string()) != std::string::npos, run.err);
    }
  }
  // `token create` does not invent a data directory either.
  program_run create = ferryctl(missing, {"token", "create", "--name", "x"});
  BOOST_TEST(exit_code(create) == exit_no_journal, create.summary());
  BOOST_TEST(!fs::exists(missing));

  // Usage errors are 2, whatever CLI11's own code for them.
  for (auto args : {std::vector<std::string>{"events", "show", "task-1", "--bogus"},
                    std::vector<std::string>{"events"},
                    std::vector<std::string>{},
                    std::vector<std::string>{"replay"},
                    std::vector<std::string>{"events", "show", "x", "--from", "-3"},
                    std::vector<std::string>{"events", "tail", "--from-position", "0"},
                    std::vector<std::string>{"replay", "task-1", "--at", "zero"}}) {
    program_run run = ferryctl(missing, args);
    BOOST_TEST(exit_code(run) == exit_usage, run.summary());
  }
  program_run help = ferryctl(missing, {"--help"});
  BOOST_TEST(exit_code(help) == 0, help.summary());
  BOOST_TEST(help.out.find("Exit codes") != std::string::npos, help.out);
}

BOOST_AUTO_TEST_CASE(token_create_writes_a_working_token_once_ferryd_stopped) {
  ferryd_process first{ferryd_options(FERRYD_BINARY)};  // owns the data dir: kept to the end
  const fs::path dir = first.data_dir();
  BOOST_TEST_REQUIRE(first.stop().clean());

  program_run create = ferryctl(dir, {"token", "create", "--name", "ci"});
  BOOST_TEST_REQUIRE(exit_code(create) == 0, create.summary());
  const std::vector<std::string> printed = lines_of(create.out);
  BOOST_TEST_REQUIRE(printed.size() == 1u, create.out);
  const std::string secret = printed.front();

  ferryd_process again{ferryd_options(FERRYD_BINARY, dir, first.token())};
  BOOST_TEST(!again.printed_admin_token());
  // A valid token gets 404 for a task that does not exist; an unknown one gets 401.
  http_response known = api_client(again.port(), secret).get_task("0123");
  BOOST_TEST(known.status == 404, known.summary());
  http_response bogus = api_client(again.port(), "ferry_bogus").get_task("0123");
  BOOST_TEST(bogus.status == 401, bogus.summary());
}

BOOST_FIXTURE_TEST_CASE(a_tampered_or_corrupt_journal_is_exit_5_for_readers_and_1_for_verify,
                        ferryd_with_task) {
  const fs::path dir = ferryd.data_dir();
  BOOST_TEST_REQUIRE(ferryd.stop().clean());
  program_run clean = ferryctl(dir, {"verify"});
  BOOST_TEST_REQUIRE(exit_code(clean) == 0, clean.summary() << "\n" << clean.out);

  // 1. Event 2 of the task is no longer an envelope (RocksDB's own checksums still hold).
  // 2. The tokens stream's first event is a valid envelope with one byte changed: only the hash
  //    chain can tell.
  with_raw_journal(dir, [&](rocksdb::DB& db) {
    put_raw(db, event_key(stream, 2), "this is not a FlatBuffer");
    std::string token_event = get_raw(db, event_key("tokens", 1));
    const auto at = token_event.find("admin");
    BOOST_TEST_REQUIRE(at != std::string::npos, "the admin token's name is not in its event");
    token_event[at] = 'A';
    put_raw(db, event_key("tokens", 1), token_event);
  });

  program_run show = ferryctl(dir, {"events", "show", stream});
  BOOST_TEST(exit_code(show) == exit_corrupt, show.summary());
  BOOST_TEST(show.err.find(stream) != std::string::npos, show.err);
  BOOST_TEST(lines_of(show.out).size() == 1u, "expected only event 1 before the break:\n"
                                                  << show.out);
  program_run replay = ferryctl(dir, {"replay", stream});
  BOOST_TEST(exit_code(replay) == exit_corrupt, replay.summary());
  program_run tail = ferryctl(dir, {"events", "tail"});
  BOOST_TEST(exit_code(tail) == exit_corrupt, tail.summary());

  program_run verify = ferryctl(dir, {"verify", "--json"});
  BOOST_TEST(exit_code(verify) == exit_problems, verify.summary() << "\n" << verify.out);
  const json report = json::parse(verify.out, nullptr, false);
  std::map<std::string, uint64_t> broken;
  for (const auto& p : field(report, "problems"))
    broken[str(p, "stream")] = u64(p, "seq");
  BOOST_TEST(broken.count(stream) == 1u, verify.out);
  BOOST_TEST(broken[stream] == 2u, verify.out);
  BOOST_TEST(broken.count("tokens") == 1u, verify.out);
  program_run verify_text = ferryctl(dir, {"verify"});
  BOOST_TEST(exit_code(verify_text) == exit_problems, verify_text.summary());
  BOOST_TEST(verify_text.out.find("problem: " + stream + " seq 2 ") != std::string::npos,
             verify_text.out);

  // 3. A byte flipped inside RocksDB's table files: its block checksums catch it.
  std::vector<fs::path> tables;
  for (const auto& f : fs::directory_iterator(dir / "journal"))
    if (f.path().extension() == ".sst")
      tables.push_back(f.path());
  BOOST_TEST_REQUIRE(!tables.empty(), "no table file after a flush");
  for (const auto& t : tables) {
    std::fstream f(t, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(16);
    char c = 0;
    f.get(c);
    f.seekp(16);
    f.put(static_cast<char>(c ^ 0x5a));
  }
  for (auto args : {std::vector<std::string>{"events", "show", stream},
                    std::vector<std::string>{"events", "streams"},
                    std::vector<std::string>{"verify"}}) {
    program_run run = ferryctl(dir, args);
    BOOST_TEST(exit_code(run) == exit_corrupt, run.summary());
  }
}
