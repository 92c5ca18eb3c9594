// The session actor: the conversation of one task (turns, steering comments waiting for the next
// turn, token usage), recorded on session-<task id>. See actors.h for its messages and
// ferry/actors/lifecycle.h for its state machine.

#include <cstdio>

#include "actors.h"

namespace ferry::actors {

void session_state::apply(const ev::Envelope& env) {
  switch (env.event_type()) {
    case ev::Event::TurnStarted: {
      auto* x = env.event_as_TurnStarted();
      status = session_status::in_turn;
      turn = x->turn();
      if (x->steering())
        for (auto seq : *x->steering())
          delivered_upto = std::max<uint64_t>(delivered_upto, seq);
      std::erase_if(pending, [&](const auto& p) { return p.first <= delivered_upto; });
      break;
    }
    case ev::Event::TurnEnded: {
      auto* x = env.event_as_TurnEnded();
      status = session_status::idle;
      input_tokens += x->input_tokens();
      output_tokens += x->output_tokens();
      break;
    }
    case ev::Event::SessionClosed: status = session_status::closed; break;
    default: break;
  }
}

nlohmann::json session_state::snapshot() const {
  return {{"status", static_cast<int>(status)},
          {"turn", turn},
          {"delivered_upto", delivered_upto},
          {"input_tokens", input_tokens},
          {"output_tokens", output_tokens}};
}

result<void> session_state::restore(const nlohmann::json& j) {
  status = static_cast<session_status>(j.at("status").get<int>());
  turn = j.at("turn").get<uint32_t>();
  delivered_upto = j.at("delivered_upto").get<uint64_t>();
  input_tokens = j.at("input_tokens").get<uint64_t>();
  output_tokens = j.at("output_tokens").get<uint64_t>();
  return {};
}

schemas::envelope_meta session_state::meta() const {
  return {journal.stream, "task-" + task_id, "", user};
}

namespace {

using turn_answer = caf::result<uint32_t, std::vector<std::string>>;

/// Records transition_refused and answers the request with an error saying why.
template <class Rp>
void refuse(session_actor_t* self, session_status to, const std::string& what, Rp rp) {
  auto& s = self->state;
  auto why = what + " refused: the session is " + std::string(to_string(s.status));
  persist(self,
          schemas::transition_refused(s.meta(), "session", to_string(s.status), to_string(to),
                                      why),
          [rp, why](const storage::append_result&) mutable {
            rp.deliver(caf::make_error(caf::sec::runtime_error, why));
          });
}

}  // namespace

caf::behavior session_actor(session_actor_t* self, session_args args) {
  auto& s = self->state;
  s.journal.store = args.store;
  s.journal.stream = session_stream(args.task_id);
  s.journal.synchronous = args.synchronous_journal;
  s.task_id = std::move(args.task_id);
  s.user = std::move(args.user);
  s.journal.snapshot_every = 32;
  auto loaded = load(s);
  if (!loaded) {
    std::fprintf(stderr, "ferryd: error: session %s: %s\n", s.task_id.c_str(),
                 loaded.error().message.c_str());
    self->quit(caf::make_error(caf::sec::runtime_error, loaded.error().message));
    return {};
  }
  for (auto& c : args.steering)
    if (c.first > s.delivered_upto)
      s.pending.push_back(std::move(c));
  if (*loaded)
    self->send<caf::message_priority::high>(self, fence_atom_v);

  auto begin_turn = [=](std::string input, std::string sandbox_id) -> turn_answer {
    auto& s = self->state;
    auto rp = self->make_response_promise<uint32_t, std::vector<std::string>>();
    if (!session_transition_allowed(s.status, session_status::in_turn)) {
      refuse(self, session_status::in_turn, "turn " + std::to_string(s.turn + 1), rp);
      return rp;
    }
    std::vector<uint64_t> seqs;
    std::vector<std::string> texts;
    for (auto& [seq, text] : s.pending) {
      seqs.push_back(seq);
      texts.push_back(text);
    }
    persist(self, schemas::turn_started(s.meta(), s.turn + 1, input, sandbox_id, seqs),
            [self, rp, texts = std::move(texts)](const storage::append_result&) mutable {
              rp.deliver(self->state.turn, std::move(texts));
            });
    return rp;
  };

  auto end_turn = [=](std::string outcome, uint64_t in, uint64_t out) -> caf::result<bool> {
    auto& s = self->state;
    auto rp = self->make_response_promise<bool>();
    if (!session_transition_allowed(s.status, session_status::idle) ||
        s.status != session_status::in_turn) {
      refuse(self, session_status::idle, "end of turn", rp);
      return rp;
    }
    persist(self, schemas::turn_ended(s.meta(), s.turn, outcome, in, out),
            [rp](const storage::append_result&) mutable { rp.deliver(true); });
    return rp;
  };

  auto close = [=](std::string reason) -> caf::result<bool> {
    auto& s = self->state;
    auto rp = self->make_response_promise<bool>();
    if (!session_transition_allowed(s.status, session_status::closed)) {
      refuse(self, session_status::closed, "close", rp);
      return rp;
    }
    std::vector<std::string> envs;
    if (s.status == session_status::in_turn)
      envs.push_back(schemas::turn_ended(s.meta(), s.turn, reason, 0, 0));
    envs.push_back(schemas::session_closed(s.meta(), reason));
    persist(self, std::move(envs), [self, rp](const storage::append_result&) mutable {
      rp.deliver(true);
      self->quit();
    });
    return rp;
  };

  return {
    [=](fence_atom) { fence(self, "session taken over by a new task actor", [](auto&) {}); },
    [=](steer_atom, uint64_t seq, std::string& text) {
      auto& s = self->state;
      if (seq > s.delivered_upto)
        s.pending.emplace_back(seq, std::move(text));
    },
    [=](turn_begin_atom, std::string& input, std::string& sandbox_id) {
      return begin_turn(std::move(input), std::move(sandbox_id));
    },
    [=](turn_end_atom, std::string& outcome, uint64_t in, uint64_t out) {
      return end_turn(std::move(outcome), in, out);
    },
    [=](close_atom, std::string& reason) { return close(std::move(reason)); },
    [=](status_atom) {
      auto& s = self->state;
      return std::make_tuple(static_cast<int8_t>(s.status), s.turn,
                             static_cast<uint64_t>(s.pending.size()));
    },
  };
}

}  // namespace ferry::actors
