#include "ferry/schemas/events.h"

#include <chrono>
#include <ctime>
#include <random>

#include <nlohmann/json.hpp>

namespace ferry::schemas {

namespace {

using fbb_t = flatbuffers::FlatBufferBuilder;

/// True when `s` is well-formed UTF-8 (so it can go into JSON as text).
bool is_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size())
      return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2)
        return false;
    i += n;
  }
  return true;
}

std::string base64(std::string_view in) {
  static constexpr char tbl[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = static_cast<uint8_t>(in[i]) << 16 | static_cast<uint8_t>(in[i + 1]) << 8 |
                 static_cast<uint8_t>(in[i + 2]);
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += tbl[(v >> 6) & 63];
    out += tbl[v & 63];
  }
  if (i < in.size()) {
    uint32_t v = static_cast<uint8_t>(in[i]) << 16;
    if (i + 1 < in.size())
      v |= static_cast<uint8_t>(in[i + 1]) << 8;
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += i + 1 < in.size() ? tbl[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string_view sv(const flatbuffers::String* s) {
  return s ? std::string_view(s->data(), s->size()) : std::string_view{};
}

}  // namespace

std::string task_submitted(const envelope_meta& m, std::string_view task_id,
                           std::string_view command, std::string_view repo,
                           uint64_t wall_clock_limit_ms, std::string_view environment,
                           std::string_view environment_key) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto body = ev::CreateTaskSubmittedDirect(
      fbb, std::string(task_id).c_str(), std::string(command).c_str(), std::string(repo).c_str(),
      wall_clock_limit_ms, environment.empty() ? nullptr : std::string(environment).c_str(),
      environment_key.empty() ? nullptr : std::string(environment_key).c_str());
    return std::pair{ev::Event::TaskSubmitted, body.Union()};
  });
}

std::string task_state_changed(const envelope_meta& m, ev::TaskStatus from, ev::TaskStatus to,
                               std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto r = fbb.CreateString(reason.data(), reason.size());
    ev::TaskStateChangedBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_from(from);
    b.add_to(to);
    fbb.ForceDefaults(false);
    b.add_reason(r);
    return std::pair{ev::Event::TaskStateChanged, b.Finish().Union()};
  });
}

std::string sandbox_state_changed(const envelope_meta& m, std::string_view sandbox_id,
                                  std::string_view backend, ev::SandboxStatus from,
                                  ev::SandboxStatus to, std::string_view reason,
                                  std::string_view runtime_id) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto id = fbb.CreateString(sandbox_id.data(), sandbox_id.size());
    auto be = fbb.CreateString(backend.data(), backend.size());
    auto r = fbb.CreateString(reason.data(), reason.size());
    flatbuffers::Offset<flatbuffers::String> rt;
    if (!runtime_id.empty())
      rt = fbb.CreateString(runtime_id.data(), runtime_id.size());
    ev::SandboxStateChangedBuilder b(fbb);
    if (!runtime_id.empty())
      b.add_runtime_id(rt);
    b.add_sandbox_id(id);
    b.add_backend(be);
    fbb.ForceDefaults(true);
    b.add_from(from);
    b.add_to(to);
    fbb.ForceDefaults(false);
    b.add_reason(r);
    return std::pair{ev::Event::SandboxStateChanged, b.Finish().Union()};
  });
}

std::string command_started(const envelope_meta& m, uint32_t command_id,
                            const std::vector<std::string>& argv) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto body = ev::CreateCommandStarted(fbb, command_id, fbb.CreateVectorOfStrings(argv));
    return std::pair{ev::Event::CommandStarted, body.Union()};
  });
}

std::string output_chunk(const envelope_meta& m, uint32_t command_id, ev::OutputStream stream,
                         std::string_view data, uint64_t gap) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto bytes =
      fbb.CreateVector(reinterpret_cast<const uint8_t*>(data.data()), data.size());
    auto body = ev::CreateOutputChunk(fbb, command_id, stream, bytes, gap);
    return std::pair{ev::Event::OutputChunk, body.Union()};
  });
}

std::string command_exited(const envelope_meta& m, uint32_t command_id, int32_t exit_code,
                           int32_t signal, uint64_t duration_ms) {
  return build_envelope(m, [&](fbb_t& fbb) {
    ev::CommandExitedBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_command_id(command_id);
    b.add_exit_code(exit_code);
    b.add_signal(signal);
    b.add_duration_ms(duration_ms);
    fbb.ForceDefaults(false);
    return std::pair{ev::Event::CommandExited, b.Finish().Union()};
  });
}

std::string abort_requested(const envelope_meta& m, std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto body = ev::CreateAbortRequested(fbb, fbb.CreateString(reason.data(), reason.size()));
    return std::pair{ev::Event::AbortRequested, body.Union()};
  });
}

std::string task_finished(const envelope_meta& m, ev::TaskStatus status, int32_t exit_code,
                          std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto r = fbb.CreateString(reason.data(), reason.size());
    ev::TaskFinishedBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_status(status);
    b.add_exit_code(exit_code);
    fbb.ForceDefaults(false);
    b.add_reason(r);
    return std::pair{ev::Event::TaskFinished, b.Finish().Union()};
  });
}

std::string token_created(const envelope_meta& m, std::string_view token_id,
                          std::string_view name, std::string_view sha256_hex, bool admin) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto id = fbb.CreateString(token_id.data(), token_id.size());
    auto n = fbb.CreateString(name.data(), name.size());
    auto h = fbb.CreateString(sha256_hex.data(), sha256_hex.size());
    auto body = ev::CreateTokenCreated(fbb, id, n, h, admin);
    return std::pair{ev::Event::TokenCreated, body.Union()};
  });
}

result<const ev::Envelope*> verify_envelope(std::span<const uint8_t> bytes) {
  if (bytes.size() < 8)
    return fail("event record of " + std::to_string(bytes.size()) + " bytes is too short");
  if (!ev::EnvelopeBufferHasIdentifier(bytes.data()))
    return fail("event record lacks the FEV1 identifier");
  flatbuffers::Verifier verifier(bytes.data(), bytes.size());
  if (!ev::VerifyEnvelopeBuffer(verifier))
    return fail("event record of " + std::to_string(bytes.size()) +
                " bytes failed FlatBuffers verification");
  const auto* e = ev::GetEnvelope(bytes.data());
  auto type = e->event_type();
  if (type == ev::Event::NONE || e->event() == nullptr)
    return fail("event record carries no event");
  if (static_cast<int>(type) > static_cast<int>(ev::Event::MAX))
    return fail("event record has unknown event type " + std::to_string(static_cast<int>(type)));
  return e;
}

std::string iso_time(int64_t ns) {
  auto secs = static_cast<time_t>(ns / 1'000'000'000);
  auto millis = static_cast<int>((ns / 1'000'000) % 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof out, "%s.%03dZ", buf, millis);
  return out;
}

std::string random_event_id() {
  // 48 bits of milliseconds, a 16-bit per-thread counter, 64 random bits: unique without
  // coordination, and the ids one thread makes increase (also within a millisecond), which keeps
  // the journal's id index cheap to insert into. Ids must not collide; they need not be secret.
  thread_local std::mt19937_64 gen{[] {
    std::random_device rd;
    std::seed_seq seq{rd(), rd(), rd(), rd(), rd(), rd(), rd(), rd()};
    return std::mt19937_64(seq);
  }()};
  thread_local uint64_t last_ms = 0;
  thread_local uint16_t counter = 0;
  uint64_t ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count()) &
                0xffff'ffff'ffffULL;
  if (ms <= last_ms) {
    ms = last_ms;  // the clock stood still or stepped back: keep increasing
    if (++counter == 0)
      ++ms;  // 65536 ids in one millisecond: borrow the next one
  } else {
    counter = 0;
  }
  last_ms = ms;
  static constexpr char hex[] = "0123456789abcdef";
  const uint64_t head = ms << 16 | counter;
  const uint64_t tail = gen();
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[i] = hex[(head >> ((15 - i) * 4)) & 0xf];
    out[16 + i] = hex[(tail >> ((15 - i) * 4)) & 0xf];
  }
  return out;
}

result<void> upcast_envelope(std::string& bytes) {
  auto* env = ev::GetMutableEnvelope(bytes.data());
  const auto version = env->schema_version();
  if (version == current_schema_version)
    return {};
  if (version == 0 || version > current_schema_version)
    return fail(errc::corrupt, "event has schema version " + std::to_string(version) +
                                 "; this build reads versions 1.." +
                                 std::to_string(current_schema_version) +
                                 " (written by a newer ferry?)");
  // 1 → 2: the sandbox status `running` is called `executing` from version 2 on. Enum fields
  // that hold `running` are present in the buffer (non-default), so they mutate in place.
  if (env->event_type() == ev::Event::SandboxStateChanged) {
    auto* x = static_cast<ev::SandboxStateChanged*>(env->mutable_event());
    if (x->from() == ev::SandboxStatus::running)
      x->mutate_from(ev::SandboxStatus::executing);
    if (x->to() == ev::SandboxStatus::running)
      x->mutate_to(ev::SandboxStatus::executing);
  }
  // Absent means 1; then there is no slot to rewrite, and readers see the content upcast anyway.
  env->mutate_schema_version(current_schema_version);
  return {};
}

std::string task_queued(const envelope_meta& m, uint32_t position, uint32_t running,
                        uint32_t limit, std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto r = fbb.CreateString(reason);
    ev::TaskQueuedBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_position(position);
    b.add_running(running);
    b.add_limit(limit);
    fbb.ForceDefaults(false);
    b.add_reason(r);
    return std::pair{ev::Event::TaskQueued, b.Finish().Union()};
  });
}

std::string steering_comment(const envelope_meta& m, std::string_view text) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto t = fbb.CreateString(text);
    return std::pair{ev::Event::SteeringComment, ev::CreateSteeringComment(fbb, t).Union()};
  });
}

std::string actor_recovered(const envelope_meta& m, uint32_t incarnation,
                            uint64_t snapshot_sequence, uint64_t replayed,
                            std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto r = fbb.CreateString(reason);
    ev::ActorRecoveredBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_incarnation(incarnation);
    b.add_snapshot_sequence(snapshot_sequence);
    b.add_replayed(replayed);
    fbb.ForceDefaults(false);
    b.add_reason(r);
    return std::pair{ev::Event::ActorRecovered, b.Finish().Union()};
  });
}

std::string transition_refused(const envelope_meta& m, std::string_view machine,
                               std::string_view from, std::string_view to,
                               std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto ma = fbb.CreateString(machine);
    auto f = fbb.CreateString(from);
    auto t = fbb.CreateString(to);
    auto r = fbb.CreateString(reason);
    return std::pair{ev::Event::TransitionRefused,
                     ev::CreateTransitionRefused(fbb, ma, f, t, r).Union()};
  });
}

std::string task_interrupted(const envelope_meta& m, std::string_view reason, bool resumable) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto r = fbb.CreateString(reason);
    ev::TaskInterruptedBuilder b(fbb);
    b.add_reason(r);
    fbb.ForceDefaults(true);
    b.add_resumable(resumable);
    fbb.ForceDefaults(false);
    return std::pair{ev::Event::TaskInterrupted, b.Finish().Union()};
  });
}

std::string turn_started(const envelope_meta& m, uint32_t turn, std::string_view input,
                         std::string_view sandbox_id, const std::vector<uint64_t>& steering) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto in = fbb.CreateString(input);
    auto sb = fbb.CreateString(sandbox_id);
    auto st = fbb.CreateVector(steering);
    return std::pair{ev::Event::TurnStarted, ev::CreateTurnStarted(fbb, turn, in, sb, st).Union()};
  });
}

std::string turn_ended(const envelope_meta& m, uint32_t turn, std::string_view outcome,
                       uint64_t input_tokens, uint64_t output_tokens) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto o = fbb.CreateString(outcome);
    ev::TurnEndedBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_turn(turn);
    b.add_input_tokens(input_tokens);
    b.add_output_tokens(output_tokens);
    fbb.ForceDefaults(false);
    b.add_outcome(o);
    return std::pair{ev::Event::TurnEnded, b.Finish().Union()};
  });
}

std::string session_closed(const envelope_meta& m, std::string_view reason) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto r = fbb.CreateString(reason);
    return std::pair{ev::Event::SessionClosed, ev::CreateSessionClosed(fbb, r).Union()};
  });
}

std::string limit_reached(const envelope_meta& m, ev::LimitKind kind, uint64_t limit,
                          uint32_t command_id, bool whole_sandbox, std::string_view detail) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto d = fbb.CreateString(detail);
    ev::LimitReachedBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_kind(kind);
    b.add_limit(limit);
    b.add_command_id(command_id);
    b.add_whole_sandbox(whole_sandbox);
    fbb.ForceDefaults(false);
    b.add_detail(d);
    return std::pair{ev::Event::LimitReached, b.Finish().Union()};
  });
}

std::string git_operation(const envelope_meta& m, const git_operation_fields& g) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto sandbox = fbb.CreateString(g.sandbox_id);
    auto repo = fbb.CreateString(g.repo);
    auto service = fbb.CreateString(g.service);
    auto refs = fbb.CreateVectorOfStrings(g.refs);
    auto result = fbb.CreateString(g.result);
    auto reason = fbb.CreateString(g.reason);
    ev::GitOperationBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_advertisement(g.advertisement);
    b.add_protocol_version(g.protocol_version);
    b.add_http_status(g.http_status);
    b.add_bytes_in(g.bytes_in);
    b.add_bytes_out(g.bytes_out);
    b.add_duration_ms(g.duration_ms);
    fbb.ForceDefaults(false);
    b.add_sandbox_id(sandbox);
    b.add_repo(repo);
    b.add_service(service);
    b.add_refs(refs);
    b.add_result(result);
    b.add_reason(reason);
    return std::pair{ev::Event::GitOperation, b.Finish().Union()};
  });
}

std::string egress_decision(const envelope_meta& m, const egress_decision_fields& d) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto sandbox = fbb.CreateString(d.sandbox_id);
    auto host = fbb.CreateString(d.host);
    auto method = fbb.CreateString(d.method);
    auto rule = fbb.CreateString(d.rule);
    ev::EgressDecisionBuilder b(fbb);
    fbb.ForceDefaults(true);
    b.add_port(d.port);
    b.add_allowed(d.allowed);
    b.add_approvable(d.approvable);
    b.add_bytes_up(d.bytes_up);
    b.add_bytes_down(d.bytes_down);
    b.add_duration_ms(d.duration_ms);
    fbb.ForceDefaults(false);
    b.add_sandbox_id(sandbox);
    b.add_host(host);
    b.add_method(method);
    b.add_rule(rule);
    return std::pair{ev::Event::EgressDecision, b.Finish().Union()};
  });
}

std::string egress_approved(const envelope_meta& m, std::string_view destination, std::string_view sandbox_id) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto d = fbb.CreateString(destination);
    auto sb = fbb.CreateString(sandbox_id);
    return std::pair{ev::Event::EgressApproved, ev::CreateEgressApproved(fbb, d, sb).Union()};
  });
}

std::string egress_policy_set(const envelope_meta& m, std::string_view policy_json) {
  return build_envelope(m, [&](fbb_t& fbb) {
    auto p = fbb.CreateString(policy_json);
    return std::pair{ev::Event::EgressPolicySet, ev::CreateEgressPolicySet(fbb, p).Union()};
  });
}

std::string_view event_type_name(ev::Event type) {
  switch (type) {
    case ev::Event::TaskSubmitted: return "task_submitted";
    case ev::Event::TaskStateChanged: return "task_state_changed";
    case ev::Event::SandboxStateChanged: return "sandbox_state_changed";
    case ev::Event::CommandStarted: return "command_started";
    case ev::Event::OutputChunk: return "output_chunk";
    case ev::Event::CommandExited: return "command_exited";
    case ev::Event::AbortRequested: return "abort_requested";
    case ev::Event::TaskFinished: return "task_finished";
    case ev::Event::TokenCreated: return "token_created";
    case ev::Event::TaskQueued: return "task_queued";
    case ev::Event::SteeringComment: return "steering_comment";
    case ev::Event::ActorRecovered: return "actor_recovered";
    case ev::Event::TransitionRefused: return "transition_refused";
    case ev::Event::TaskInterrupted: return "task_interrupted";
    case ev::Event::TurnStarted: return "turn_started";
    case ev::Event::TurnEnded: return "turn_ended";
    case ev::Event::SessionClosed: return "session_closed";
    case ev::Event::LimitReached: return "limit_reached";
    case ev::Event::EgressDecision: return "egress_decision";
    case ev::Event::GitOperation: return "git_operation";
    case ev::Event::EgressApproved: return "egress_approved";
    case ev::Event::EgressPolicySet: return "egress_policy_set";
    case ev::Event::NONE: break;
  }
  return "unknown";
}

std::string_view to_string(ev::TaskStatus s) {
  switch (s) {
    case ev::TaskStatus::queued: return "queued";
    case ev::TaskStatus::running: return "running";
    case ev::TaskStatus::succeeded: return "succeeded";
    case ev::TaskStatus::failed: return "failed";
    case ev::TaskStatus::aborted: return "aborted";
    case ev::TaskStatus::interrupted: return "interrupted";
  }
  return "unknown";
}

std::string_view to_string(ev::LimitKind k) {
  switch (k) {
    case ev::LimitKind::memory: return "memory";
    case ev::LimitKind::pids: return "pids";
    case ev::LimitKind::disk_quota: return "disk_quota";
    case ev::LimitKind::command_timeout: return "command_timeout";
    case ev::LimitKind::task_wall_clock: return "task_wall_clock";
    case ev::LimitKind::output: return "output";
  }
  return "unknown";
}

std::string_view to_string(ev::SandboxStatus s) {
  switch (s) {
    case ev::SandboxStatus::none: return "none";
    case ev::SandboxStatus::spawning: return "spawning";
    case ev::SandboxStatus::running: return "running";
    case ev::SandboxStatus::terminating: return "terminating";
    case ev::SandboxStatus::terminated: return "terminated";
    case ev::SandboxStatus::failed: return "failed";
    case ev::SandboxStatus::initializing: return "initializing";
    case ev::SandboxStatus::cloning: return "cloning";
    case ev::SandboxStatus::ready: return "ready";
    case ev::SandboxStatus::executing: return "executing";
    case ev::SandboxStatus::pushing: return "pushing";
  }
  return "unknown";
}

nlohmann::json to_json(const ev::Envelope& e) {
  using nlohmann::json;
  json data = json::object();
  switch (e.event_type()) {
    case ev::Event::TaskSubmitted: {
      auto* x = e.event_as_TaskSubmitted();
      data = {{"task_id", sv(x->task_id())}, {"command", sv(x->command())},
              {"repo", sv(x->repo())}, {"wall_clock_limit_ms", x->wall_clock_limit_ms()},
              {"environment", sv(x->environment())}, {"environment_key", sv(x->environment_key())}};
      break;
    }
    case ev::Event::TaskStateChanged: {
      auto* x = e.event_as_TaskStateChanged();
      data = {{"from", to_string(x->from())}, {"to", to_string(x->to())},
              {"reason", sv(x->reason())}};
      break;
    }
    case ev::Event::SandboxStateChanged: {
      auto* x = e.event_as_SandboxStateChanged();
      data = {{"sandbox_id", sv(x->sandbox_id())}, {"backend", sv(x->backend())},
              {"from", to_string(x->from())}, {"to", to_string(x->to())},
              {"reason", sv(x->reason())}};
      if (x->runtime_id())
        data["runtime_id"] = sv(x->runtime_id());
      break;
    }
    case ev::Event::CommandStarted: {
      auto* x = e.event_as_CommandStarted();
      json argv = json::array();
      if (x->argv())
        for (const auto* a : *x->argv())
          argv.push_back(sv(a));
      data = {{"command_id", x->command_id()}, {"argv", std::move(argv)}};
      break;
    }
    case ev::Event::OutputChunk: {
      auto* x = e.event_as_OutputChunk();
      std::string_view bytes;
      if (x->data())
        bytes = {reinterpret_cast<const char*>(x->data()->data()), x->data()->size()};
      data = {{"command_id", x->command_id()},
              {"stream", x->stream() == ev::OutputStream::stderr ? "stderr" : "stdout"}};
      if (x->gap() != 0)
        data["lost_bytes"] = x->gap();
      if (is_utf8(bytes))
        data["text"] = bytes;
      else
        data["base64"] = base64(bytes);
      break;
    }
    case ev::Event::CommandExited: {
      auto* x = e.event_as_CommandExited();
      data = {{"command_id", x->command_id()}, {"exit_code", x->exit_code()},
              {"signal", x->signal()}, {"duration_ms", x->duration_ms()}};
      break;
    }
    case ev::Event::AbortRequested: {
      data = {{"reason", sv(e.event_as_AbortRequested()->reason())}};
      break;
    }
    case ev::Event::TaskFinished: {
      auto* x = e.event_as_TaskFinished();
      data = {{"status", to_string(x->status())}, {"exit_code", x->exit_code()},
              {"reason", sv(x->reason())}};
      break;
    }
    case ev::Event::TokenCreated: {
      auto* x = e.event_as_TokenCreated();
      // The hash is deliberately not rendered: nothing outside the journal needs it.
      data = {{"token_id", sv(x->token_id())}, {"name", sv(x->name())}, {"admin", x->admin()}};
      break;
    }
    case ev::Event::TaskQueued: {
      auto* x = e.event_as_TaskQueued();
      data = {{"position", x->position()}, {"running", x->running()}, {"limit", x->limit()},
              {"reason", sv(x->reason())}};
      break;
    }
    case ev::Event::SteeringComment:
      data = {{"text", sv(e.event_as_SteeringComment()->text())}};
      break;
    case ev::Event::ActorRecovered: {
      auto* x = e.event_as_ActorRecovered();
      data = {{"incarnation", x->incarnation()},
              {"snapshot_sequence", x->snapshot_sequence()},
              {"replayed", x->replayed()},
              {"reason", sv(x->reason())}};
      break;
    }
    case ev::Event::TransitionRefused: {
      auto* x = e.event_as_TransitionRefused();
      data = {{"machine", sv(x->machine())}, {"from", sv(x->from())}, {"to", sv(x->to())},
              {"reason", sv(x->reason())}};
      break;
    }
    case ev::Event::TaskInterrupted: {
      auto* x = e.event_as_TaskInterrupted();
      data = {{"reason", sv(x->reason())}, {"resumable", x->resumable()}};
      break;
    }
    case ev::Event::TurnStarted: {
      auto* x = e.event_as_TurnStarted();
      json steering = json::array();
      if (x->steering())
        for (auto seq : *x->steering())
          steering.push_back(seq);
      data = {{"turn", x->turn()}, {"input", sv(x->input())}, {"sandbox_id", sv(x->sandbox_id())},
              {"steering", std::move(steering)}};
      break;
    }
    case ev::Event::SessionClosed:
      data = {{"reason", sv(e.event_as_SessionClosed()->reason())}};
      break;
    case ev::Event::TurnEnded: {
      auto* x = e.event_as_TurnEnded();
      data = {{"turn", x->turn()}, {"outcome", sv(x->outcome())},
              {"input_tokens", x->input_tokens()}, {"output_tokens", x->output_tokens()}};
      break;
    }
    case ev::Event::LimitReached: {
      auto* x = e.event_as_LimitReached();
      data = {{"kind", to_string(x->kind())}, {"limit", x->limit()},
              {"command_id", x->command_id()}, {"whole_sandbox", x->whole_sandbox()},
              {"detail", sv(x->detail())}};
      break;
    }
    case ev::Event::EgressDecision: {
      auto* x = e.event_as_EgressDecision();
      data = {{"sandbox_id", sv(x->sandbox_id())}, {"host", sv(x->host())}, {"port", x->port()},
              {"method", sv(x->method())}, {"allowed", x->allowed()}, {"rule", sv(x->rule())},
              {"approvable", x->approvable()}, {"bytes_up", x->bytes_up()}, {"bytes_down", x->bytes_down()},
              {"duration_ms", x->duration_ms()}};
      break;
    }
    case ev::Event::GitOperation: {
      auto* x = e.event_as_GitOperation();
      json refs = json::array();
      if (x->refs())
        for (const auto* r : *x->refs())
          refs.push_back(r ? r->str() : std::string());
      data = {{"sandbox_id", sv(x->sandbox_id())}, {"repo", sv(x->repo())}, {"service", sv(x->service())},
              {"advertisement", x->advertisement()}, {"protocol_version", x->protocol_version()},
              {"refs", refs}, {"result", sv(x->result())}, {"reason", sv(x->reason())},
              {"http_status", x->http_status()}, {"bytes_in", x->bytes_in()}, {"bytes_out", x->bytes_out()},
              {"duration_ms", x->duration_ms()}};
      break;
    }
    case ev::Event::EgressApproved: {
      auto* x = e.event_as_EgressApproved();
      data = {{"destination", sv(x->destination())}, {"sandbox_id", sv(x->sandbox_id())}};
      break;
    }
    case ev::Event::EgressPolicySet: {
      // The policy as an object (it was stored as JSON text by Ferry; text if it does not parse).
      auto text = sv(e.event_as_EgressPolicySet()->policy_json());
      auto policy = json::parse(text, nullptr, /*allow_exceptions=*/false);
      data = {{"policy", policy.is_discarded() ? json(text) : policy}};
      break;
    }
    case ev::Event::NONE: break;
  }
  return json{{"stream", sv(e.stream_id())},
              {"seq", e.sequence()},
              {"position", e.position()},
              {"time", iso_time(e.timestamp_ns())},
              {"type", event_type_name(e.event_type())},
              {"correlation_id", sv(e.correlation_id())},
              {"causation_id", sv(e.causation_id())},
              {"user", sv(e.user())},
              {"event_id", sv(e.event_id())},
              {"schema_version", e.schema_version()},
              {"data", std::move(data)}};
}

std::string to_text(const ev::Envelope& e) {
  auto j = to_json(e);
  std::string line = std::to_string(e.sequence()) + "  " + iso_time(e.timestamp_ns()) + "  " +
                     std::string(event_type_name(e.event_type()));
  for (auto& [k, v] : j["data"].items())
    line += "  " + k + "=" + v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return line;
}

}  // namespace ferry::schemas
