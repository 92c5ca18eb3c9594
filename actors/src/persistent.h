#pragma once
// Private: the one base of Ferry's persistent actors (task, session, sandbox).
//
// A persistent actor is a `caf::stateful_actor<State>`; State has a member
// `journal_slot journal` and provides
//   void apply(const ev::Envelope&)             the fold: the only way its state changes
//   nlohmann::json snapshot() const             its state, for a snapshot
//   result<void> restore(const nlohmann::json&) the inverse
//   schemas::envelope_meta meta() const          bookkeeping for the events it writes
//
// Commands: a handler validates, then calls persist(self, events, then). The events are appended
// to the actor's stream with the exact version the actor last applied; once they are durable
// each is applied to the state, and only then does `then` run (it answers the command). While a
// persist is in flight — and while recovering — every other message waits in the mailbox (CAF's
// `skip`: a stash that keeps order) and is handled afterwards in arrival order. Only the handlers
// in `journal.urgent` run at once even then (an abort's kill must not wait for a disk flush);
// they must not persist.
//
// Response handlers (`request(...).then(...)`) are the exception CAF makes: it delivers a response
// to its handler whatever the current behavior, so they run even while a persist is in flight.
// One that may persist — or decide from state a persist in flight is about to change — wraps
// that work in when_idle(): it runs at once when no persist is in flight, else right after the
// persist in flight (and its continuation), one deferred step at a time, before the stashed
// messages. Calling persist() while busy is a bug: the second append would expect the version
// the first one is about to replace, be refused as a conflict, and stop the actor as "fenced out".
//
// Recovery: recover() loads the latest snapshot, replays the later events, then appends
// `actor_recovered` expecting exactly the version it recovered. That append fences out every older
// incarnation: their next append expects an older version, is refused with errc::conflict, and
// they stop with `fenced_reason` — one live writer per stream.
//
// Snapshots: after `snapshot_every` applied events the state is saved (best effort: the events
// are the truth; a failed snapshot save is logged, never fatal) and older snapshots deleted.
//
// Threading: actor-confined, like any CAF actor state. The journal's callback only sends a
// message to the actor.

#include <cstdio>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "messages.h"

namespace ferry::actors {

/// Exit reason text of an actor that found a newer incarnation writing its stream.
inline constexpr std::string_view fenced_reason = "fenced out by a newer incarnation";

/// A persistent actor's link to its stream.
struct journal_slot {
  storage::event_store* store = nullptr;
  std::string stream;
  /// Highest sequence applied to the state; every append expects exactly this.
  uint64_t version = 0;
  /// Sequence of the newest snapshot saved or loaded (0: none).
  uint64_t snapshot_version = 0;
  /// Take a snapshot after this many events applied since the last one (0: never).
  uint32_t snapshot_every = 64;
  /// How many times this stream has been recovered (from its actor_recovered events).
  uint32_t incarnation = 0;
  /// Events replayed by the last recovery.
  uint64_t replayed = 0;
  /// A persist is in flight (or recovery runs): other messages are stashed.
  bool busy = false;
  uint64_t ticket = 0;
  /// Append on the actor's own thread (blocking) and deliver the outcome to itself as a message,
  /// instead of from the journal's thread. For CAF's deterministic test coordinator, where no
  /// other thread may enqueue messages; the stash and the order are the same.
  bool synchronous = false;
  /// Handled at once even while busy; must not persist.
  caf::message_handler urgent;
  /// Work that waits for the persist in flight (when_idle), in order.
  std::deque<std::function<void()>> deferred;
  /// The journal refused or failed an append (not a fence): the actor decides (default: stop).
  std::function<void(const error_info&)> on_failure;
  /// Runs before the actor stops because it was fenced out (or failed without on_failure).
  std::function<void()> on_stop;
};

namespace detail {

/// Applies one stored event: the base's own bookkeeping, then the actor's fold.
template <class State>
void apply_stored(State& st, const events::v1::Envelope& env) {
  if (env.event_type() == events::v1::Event::ActorRecovered)
    st.journal.incarnation = env.event_as_ActorRecovered()->incarnation();
  st.apply(env);
  st.journal.version = env.sequence();
}

template <class State>
void maybe_snapshot(State& st) {
  auto& j = st.journal;
  if (j.snapshot_every == 0 || j.version - j.snapshot_version < j.snapshot_every)
    return;
  storage::snapshot snap;
  snap.stream = j.stream;
  snap.sequence = j.version;
  snap.timestamp_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
  snap.data = nlohmann::json{{"format", 1}, {"state", st.snapshot()}}.dump();
  if (auto r = j.store->save_snapshot(snap); !r) {
    std::fprintf(stderr, "ferryd: warning: snapshot of %s at %llu: %s\n", j.stream.c_str(),
                 static_cast<unsigned long long>(j.version), r.error().message.c_str());
    return;
  }
  const auto previous = j.snapshot_version;
  j.snapshot_version = j.version;
  if (previous > 0) {
    storage::snapshot_criteria older;
    older.max_sequence = j.version - 1;
    (void)j.store->delete_snapshots(j.stream, older);
  }
}

/// Runs the work when_idle() deferred, in order, until one step persists again (the rest then
/// waits for that persist) or the actor stops.
template <class State>
void run_deferred(caf::stateful_actor<State>* self) {
  auto& j = self->state.journal;
  while (!j.busy && !j.deferred.empty()) {
    if (self->getf(caf::abstract_actor::is_shutting_down_flag)) {
      j.deferred.clear();  // stopping: nothing more may be recorded
      return;
    }
    auto step = std::move(j.deferred.front());
    j.deferred.pop_front();
    step();
  }
}

}  // namespace detail

/// Runs `f` once no persist is in flight: now if none is, else right after the one in flight
/// (and its continuation, and the steps deferred before it), before the messages stashed
/// meanwhile. For response handlers and anything else that runs outside the actor's behavior and
/// may persist or read state a persist is about to change (see the file comment).
template <class State>
void when_idle(caf::stateful_actor<State>* self, std::function<void()> f) {
  auto& j = self->state.journal;
  if (!j.busy && j.deferred.empty()) {
    f();
    return;
  }
  j.deferred.push_back(std::move(f));
  detail::run_deferred(self);  // not busy: earlier steps are still queued; run them in order
}

/// Runs once the events are durable and applied; gets where they landed.
using persisted_fn = std::function<void(const storage::append_result&)>;

/// Appends `envelopes` to the actor's stream; see the file comment. REQUIRES: not busy (handlers
/// of a busy actor are stashed, so only `urgent` handlers — which must not persist —, response
/// handlers — which must go through when_idle() — and the continuation of the previous persist
/// can run).
template <class State>
void persist(caf::stateful_actor<State>* self, std::vector<std::string> envelopes,
             persisted_fn then) {
  auto& j = self->state.journal;
  if (j.busy) {
    // A caller broke the rule above. Say so loudly; the append below will be refused as a
    // conflict and the actor stopped, which is the safe outcome (never a wrong history).
    std::fprintf(stderr, "ferryd: error: %s: persist while another persist is in flight (a bug)\n",
                 j.stream.c_str());
  }
  const uint64_t ticket = ++j.ticket;
  j.busy = true;
  auto make_outcome = [](result<storage::append_result> r, std::vector<std::string> stamped) {
    persist_outcome o;
    if (r) {
      o.first_sequence = r->first_sequence;
      o.last_sequence = r->last_sequence;
      o.first_position = r->first_position;
      o.last_position = r->last_position;
      o.stamped = std::move(stamped);
    } else {
      o.code = static_cast<int32_t>(r.error().code);
      o.error = r.error().message;
    }
    return o;
  };
  if (j.synchronous) {
    std::vector<std::string> copy = envelopes;
    auto r = j.store->append(j.stream, copy, storage::expected_version::exact(j.version));
    self->send(self, persisted_atom_v, ticket, make_outcome(std::move(r), std::move(copy)));
  } else {
    auto weak = caf::actor_cast<caf::weak_actor_ptr>(self);
    j.store->append_async(
      j.stream, std::move(envelopes), storage::expected_version::exact(j.version),
      [weak, ticket, make_outcome](result<storage::append_result> r,
                                   std::vector<std::string> stamped) {
        auto o = make_outcome(std::move(r), std::move(stamped));
        // Normal priority on purpose: CAF keeps skipped (stashed) messages in the cache of the
        // normal queue and puts them back only when a message of that queue is consumed; a
        // high-priority outcome would let later messages overtake the stashed ones.
        if (auto strong = weak.lock())
          caf::anon_send(caf::actor_cast<caf::actor>(strong), persisted_atom_v, ticket,
                         std::move(o));
      });
  }
  caf::message_handler done{
    [self, ticket, then = std::move(then)](persisted_atom, uint64_t t, persist_outcome& o) {
      auto& j = self->state.journal;
      if (t != ticket)
        return;  // cannot happen: one persist at a time
      j.busy = false;
      self->set_default_handler(caf::print_and_drop);
      self->unbecome();
      if (o.code != 0) {
        if (static_cast<errc>(o.code) == errc::conflict) {
          std::fprintf(stderr, "ferryd: %s: %s (%s)\n", j.stream.c_str(),
                       std::string(fenced_reason).c_str(), o.error.c_str());
          j.deferred.clear();
          if (j.on_stop)
            j.on_stop();
          self->quit(caf::make_error(caf::sec::runtime_error, std::string(fenced_reason)));
          return;
        }
        error_info e{o.error, static_cast<errc>(o.code)};
        if (j.on_failure) {
          j.on_failure(e);
          detail::run_deferred(self);
        } else {
          j.deferred.clear();
          if (j.on_stop)
            j.on_stop();
          self->quit(caf::make_error(caf::sec::runtime_error, o.error));
        }
        return;
      }
      // The journal verified every envelope before it stored it (and only stamped scalars in
      // place since), so they are read directly: verifying again would walk every output batch
      // twice on the hot path. A std::string's heap buffer is malloc-aligned, as FlatBuffers
      // needs.
      for (auto& bytes : o.stamped)
        detail::apply_stored(self->state, *events::v1::GetEnvelope(bytes.data()));
      j.version = o.last_sequence;
      detail::maybe_snapshot(self->state);
      storage::append_result where;
      where.first_sequence = o.first_sequence;
      where.last_sequence = o.last_sequence;
      where.first_position = o.first_position;
      where.last_position = o.last_position;
      then(where);
      detail::run_deferred(self);
    }};
  self->set_default_handler(caf::skip);
  if (j.urgent)
    self->become(caf::keep_behavior, j.urgent.or_else(done));
  else
    self->become(caf::keep_behavior, done);
}

/// Convenience: one event.
template <class State>
void persist(caf::stateful_actor<State>* self, std::string envelope, persisted_fn then) {
  std::vector<std::string> envs;
  envs.push_back(std::move(envelope));
  persist(self, std::move(envs), std::move(then));
}

/// Loads the state of `journal.stream` (snapshot, then the events after it) synchronously.
/// Returns false when the stream has no events. Called before the actor handles messages.
template <class State>
result<bool> load(State& st) {
  auto& j = st.journal;
  auto snap = j.store->load_snapshot(j.stream);
  if (!snap)
    return snap.error();
  if (*snap) {
    try {
      auto doc = nlohmann::json::parse((*snap)->data);
      if (doc.value("format", 0) != 1)
        return fail(errc::corrupt, "snapshot of " + j.stream + " has an unknown format");
      if (auto r = st.restore(doc.at("state")); !r)
        return r.error();
    } catch (const nlohmann::json::exception& e) {
      return fail(errc::corrupt, "snapshot of " + j.stream + ": " + e.what());
    }
    j.version = (*snap)->sequence;
    j.snapshot_version = (*snap)->sequence;
  }
  j.replayed = 0;
  auto n = j.store->for_each(j.stream, storage::read_range{j.version + 1},
                             [&](const events::v1::Envelope& env, std::string_view) {
                               detail::apply_stored(st, env);
                               ++j.replayed;
                               return true;
                             });
  if (!n)
    return n.error();
  return j.version > 0;
}

/// After load(): records `actor_recovered` (fencing out older incarnations), then runs `then`.
/// Call it from a handler, not from the actor's init (CAF installs the returned behavior after
/// init, which would replace the persist's): init sends itself `fence` with high priority, so it
/// is the first message handled.
template <class State>
void fence(caf::stateful_actor<State>* self, const std::string& reason, persisted_fn then) {
  auto& j = self->state.journal;
  auto m = self->state.meta();
  m.user = "system";
  persist(self,
          schemas::actor_recovered(m, j.incarnation + 1, j.snapshot_version, j.replayed, reason),
          std::move(then));
}

}  // namespace ferry::actors
