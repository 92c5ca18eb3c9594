#define BOOST_TEST_MODULE schemas_events
#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

#include "ferry/schemas/events.h"

namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;

namespace {
const sc::envelope_meta meta{"task-abc", "req-1", "cause-1", "tok_1"};

const ev::Envelope& verified(const std::string& bytes) {
  auto e = sc::verify_envelope(bytes);
  BOOST_REQUIRE_MESSAGE(e.ok(), (e.ok() ? "" : e.error().message));
  return **e;
}
}  // namespace

BOOST_AUTO_TEST_CASE(envelope_fields_round_trip) {
  auto bytes = sc::task_submitted(meta, "abc", "echo hi", "git@x:y");
  const auto& e = verified(bytes);
  BOOST_TEST(e.stream_id()->str() == "task-abc");
  BOOST_TEST(e.correlation_id()->str() == "req-1");
  BOOST_TEST(e.causation_id()->str() == "cause-1");
  BOOST_TEST(e.user()->str() == "tok_1");
  BOOST_TEST(e.schema_version() == sc::current_schema_version);
  BOOST_TEST(e.sequence() == 0u);
  BOOST_TEST(e.event_id()->size() == 32u);
  BOOST_REQUIRE(e.prev_hash());
  BOOST_TEST(e.prev_hash()->size() == sc::hash_size);
  BOOST_REQUIRE(e.event_type() == ev::Event::TaskSubmitted);
  BOOST_TEST(e.event_as_TaskSubmitted()->command()->str() == "echo hi");
  BOOST_TEST(e.event_as_TaskSubmitted()->repo()->str() == "git@x:y");
}

BOOST_AUTO_TEST_CASE(journal_stamped_fields_are_mutable_in_place) {
  // The journal relies on these scalars being present so it can stamp them without a rebuild.
  auto bytes = sc::abort_requested(meta, "stop");
  auto* env = ev::GetMutableEnvelope(bytes.data());
  BOOST_TEST(env->mutate_sequence(7));
  BOOST_TEST(env->mutate_position(42));
  BOOST_TEST(env->mutate_timestamp_ns(1'700'000'000'000'000'000));
  const auto& e = verified(bytes);
  BOOST_TEST(e.sequence() == 7u);
  BOOST_TEST(e.position() == 42u);
}

BOOST_AUTO_TEST_CASE(every_event_type_round_trips_through_json) {
  std::vector<std::pair<std::string, std::string>> cases = {
    {"task_submitted", sc::task_submitted(meta, "abc", "ls", "")},
    {"task_state_changed",
     sc::task_state_changed(meta, ev::TaskStatus::queued, ev::TaskStatus::running, "go")},
    {"sandbox_state_changed",
     sc::sandbox_state_changed(meta, "ferry-abc", "runsc", ev::SandboxStatus::none,
                               ev::SandboxStatus::spawning, "")},
    {"command_started", sc::command_started(meta, 1, {"/bin/sh", "-c", "ls"})},
    {"output_chunk", sc::output_chunk(meta, 1, ev::OutputStream::stderr, "oops\n")},
    {"command_exited", sc::command_exited(meta, 1, 3, 0, 12)},
    {"abort_requested", sc::abort_requested(meta, "enough")},
    {"task_finished", sc::task_finished(meta, ev::TaskStatus::failed, 3, "exit 3")},
    {"token_created", sc::token_created(meta, "tok_1", "admin", "ab12", true)},
    {"limit_reached", sc::limit_reached(meta, ev::LimitKind::task_wall_clock, 900'000, 0, true,
                                        "ran 15m")},
  };
  for (auto& [type, bytes] : cases) {
    auto j = sc::to_json(verified(bytes));
    BOOST_TEST(j["type"] == type);
    BOOST_TEST(j["stream"] == "task-abc");
    BOOST_TEST(j["data"].is_object());
  }
  auto out = sc::to_json(verified(cases[4].second));
  BOOST_TEST(out["data"]["stream"] == "stderr");
  BOOST_TEST(out["data"]["text"] == "oops\n");
  auto exited = sc::to_json(verified(cases[5].second));
  BOOST_TEST(exited["data"]["exit_code"] == 3);
  BOOST_TEST(exited["data"]["duration_ms"] == 12);
  auto tok = sc::to_json(verified(cases[8].second));
  BOOST_TEST(!tok["data"].contains("sha256"));  // the hash never leaves the journal
  auto sbx = sc::to_json(verified(cases[2].second));
  BOOST_TEST(sbx["data"]["from"] == "none");
  BOOST_TEST(sbx["data"]["to"] == "spawning");
}

BOOST_AUTO_TEST_CASE(a_limit_reached_names_its_limit_in_json_and_text) {
  const std::pair<ev::LimitKind, const char*> kinds[] = {
    {ev::LimitKind::memory, "memory"},
    {ev::LimitKind::pids, "pids"},
    {ev::LimitKind::disk_quota, "disk_quota"},
    {ev::LimitKind::command_timeout, "command_timeout"},
    {ev::LimitKind::task_wall_clock, "task_wall_clock"},
    {ev::LimitKind::output, "output"},
  };
  for (auto [kind, name] : kinds) {
    const auto bytes = sc::limit_reached(meta, kind, 512, 3, false, "d");
    const auto& e = verified(bytes);
    BOOST_REQUIRE((e.event_type() == ev::Event::LimitReached));
    auto j = sc::to_json(e);
    BOOST_TEST(j["type"] == "limit_reached");
    BOOST_TEST(j["data"]["kind"] == name);
  }
  auto bytes = sc::limit_reached(meta, ev::LimitKind::memory, 256u << 20, 2, true,
                                 "the sandbox used all its memory");
  auto j = sc::to_json(verified(bytes));
  BOOST_TEST(j["data"] == (nlohmann::json{{"kind", "memory"},
                                          {"limit", 256u << 20},
                                          {"command_id", 2},
                                          {"whole_sandbox", true},
                                          {"detail", "the sandbox used all its memory"}}),
             j["data"].dump());
  auto text = sc::to_text(verified(bytes));
  BOOST_TEST(text.find("limit_reached") != std::string::npos, text);
  BOOST_TEST(text.find("kind=\"memory\"") != std::string::npos, text);
  BOOST_TEST(text.find("limit=268435456") != std::string::npos, text);
  BOOST_TEST(text.find("whole_sandbox=true") != std::string::npos, text);
  // The wall-clock limit in force is part of the submission.
  auto sub = sc::to_json(verified(sc::task_submitted(meta, "abc", "ls", "", 60'000)));
  BOOST_TEST(sub["data"]["wall_clock_limit_ms"] == 60'000);
  BOOST_TEST(sc::to_json(verified(sc::task_submitted(meta, "abc", "ls", "")))["data"]
               ["wall_clock_limit_ms"] == 0);
}

BOOST_AUTO_TEST_CASE(binary_output_is_rendered_as_base64) {
  std::string data("\xff\x00\x01hi", 5);
  auto j = sc::to_json(verified(sc::output_chunk(meta, 1, ev::OutputStream::stdout, data)));
  BOOST_TEST(!j["data"].contains("text"));
  BOOST_TEST(j["data"]["base64"] == "/wABaGk=");
}

BOOST_AUTO_TEST_CASE(corrupt_records_are_errors_not_crashes) {
  auto good = sc::task_finished(meta, ev::TaskStatus::succeeded, 0, "");
  BOOST_TEST(!sc::verify_envelope(std::string_view()).ok());
  BOOST_TEST(!sc::verify_envelope(std::string_view("short")).ok());
  BOOST_TEST(!sc::verify_envelope(good.substr(0, good.size() / 2)).ok());
  // Flip every byte once: the verifier must either reject it or yield a readable envelope.
  for (size_t i = 0; i < good.size(); ++i) {
    auto bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x5a);
    if (auto e = sc::verify_envelope(bad); e.ok())
      (void)sc::to_json(**e);
  }
  std::string wrong_id = good;
  wrong_id[4] = 'X';  // file identifier lives at bytes 4..7
  auto r = sc::verify_envelope(wrong_id);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("identifier") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(event_ids_are_unique_and_increase_within_a_thread) {
  // The journal's id index relies on one writer's ids arriving in increasing order.
  std::string prev = sc::random_event_id();
  for (int i = 0; i < 100000; ++i) {
    auto id = sc::random_event_id();
    BOOST_REQUIRE_MESSAGE(id > prev, "id " << id << " does not follow " << prev);
    prev = id;
  }
  auto given = sc::envelope_meta{meta};
  given.event_id = "chosen-1";
  BOOST_TEST(verified(sc::abort_requested(given, "x")).event_id()->str() == "chosen-1");
}

BOOST_AUTO_TEST_CASE(version_1_sandbox_running_is_upcast_to_executing) {
  auto old_meta = meta;
  old_meta.schema_version = 1;
  auto bytes = sc::sandbox_state_changed(old_meta, "sb", "runsc", ev::SandboxStatus::running,
                                         ev::SandboxStatus::terminating, "");
  BOOST_TEST(verified(bytes).schema_version() == 1);
  BOOST_REQUIRE(sc::upcast_envelope(bytes).ok());
  const auto& e = verified(bytes);
  BOOST_TEST(e.schema_version() == sc::current_schema_version);
  BOOST_TEST((e.event_as_SandboxStateChanged()->from() == ev::SandboxStatus::executing));
  BOOST_TEST((e.event_as_SandboxStateChanged()->to() == ev::SandboxStatus::terminating));

  // Current-version bytes are left as they are; unknown newer versions are refused.
  auto current = sc::abort_requested(meta, "x");
  auto copy = current;
  BOOST_REQUIRE(sc::upcast_envelope(copy).ok());
  BOOST_TEST((copy == current));
  auto newer_meta = meta;
  newer_meta.schema_version = 99;
  auto newer = sc::abort_requested(newer_meta, "x");
  auto r = sc::upcast_envelope(newer);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("99") != std::string::npos, r.error().message);
}
