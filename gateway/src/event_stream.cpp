// The WebSocket event stream of one task, and the steer/abort messages its client may send.

#include "server.h"

#include <charconv>
#include <cstdio>

#include "ferry/actors/tasks.h"
#include "ferry/storage/journal.h"
#include "task_commands.h"

namespace ferry::gateway::detail {

namespace {

/// Bytes read from the socket at a time (a message may take several reads).
constexpr size_t read_chunk = 16 * 1024;
/// Longest client-chosen id echoed back.
constexpr size_t max_id_bytes = 256;

std::string to_text(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json ack_frame(const json& id, std::string_view op) {
  return {{"type", "ack"}, {"id", id}, {"op", op}, {"ok", true}};
}

json error_frame(const json& id, std::string_view op, std::string_view code,
                 std::string_view message) {
  json j{{"type", "error"}, {"id", id}, {"code", code}, {"message", message}};
  if (!op.empty())
    j["op"] = op;
  return j;
}

/// The error code a client sees for a failed control request.
std::string_view client_code(errc c) {
  switch (c) {
    case errc::not_found: return "not_found";
    case errc::conflict: return "task_ended";
    case errc::invalid_argument: return "bad_message";
    case errc::busy: return "busy";
    case errc::closed: return "unavailable";
    case errc::corrupt:
    case errc::failed: break;
  }
  return "failed";
}

/// Runs one steer on the calling (blocking pool) thread; the frame that answers it.
json steer_answer(const gateway_deps& deps, const std::string& task_id, const std::string& user,
                  const std::string& text, const json& id) {
  auto seq = steer_task(deps, task_id, user, text);
  if (!seq)
    return error_frame(id, "steer", client_code(seq.error().code), seq.error().message);
  json j = ack_frame(id, "steer");
  j["seq"] = *seq;
  return j;
}

/// Runs one abort on the calling (blocking pool) thread; the frame that answers it.
json abort_answer(const gateway_deps& deps, const std::string& task_id, const std::string& user,
                  const std::string& reason, const json& id) {
  auto outcome = abort_task(deps, task_id, user, reason);
  if (!outcome)
    return error_frame(id, "abort", client_code(outcome.error().code), outcome.error().message);
  switch (*outcome) {
    case actors::abort_outcome::aborted:
    case actors::abort_outcome::pending: {
      json j = ack_frame(id, "abort");
      j["outcome"] = actors::to_string(*outcome);
      return j;
    }
    case actors::abort_outcome::already_finished:
      return error_frame(id, "abort", "task_ended", "the task had already finished");
    case actors::abort_outcome::not_found: break;
  }
  return error_frame(id, "abort", "not_found",
                     "no live task " + task_id + ": it has ended, or no ferryd runs it any more");
}

}  // namespace

// -- event_stream_session implementation ----------------------------------------------------------

void event_stream_session::run(request_t req) {
  stream_ = "task-" + task_id_;
  // Subscribe before the first journal read: every event stored after that read is then
  // guaranteed to arrive live, so the hand-over has no gap.
  mailbox_ = std::make_shared<live_mailbox>();
  auto weak = weak_from_this();
  auto exec = ws_.get_executor();
  mailbox_->deliver = [weak, exec](std::string payload) {
    net::post(exec, [weak, payload = std::move(payload)]() mutable {
      if (auto s = weak.lock())
        s->on_live(std::move(payload));
    });
  };
  if (auto* bus = srv_.deps().events) {
    auto mb = mailbox_;
    auto sub = bus->subscribe(actors::task_subject(task_id_),
                              [mb](std::string_view, std::string_view payload) {
                                std::lock_guard<std::mutex> guard(mb->mtx);
                                if (!mb->closed)
                                  mb->deliver(std::string(payload));
                              });
    if (sub)
      sub_ = std::move(*sub);
    else
      std::fprintf(stderr, "ferryd: warning: live events for %s unavailable: %s\n",
                   task_id_.c_str(), sub.error().message.c_str());
  }
  ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
  ws_.set_option(websocket::stream_base::decorator(
    [](websocket::response_type& res) { res.set(http::field::server, "ferryd"); }));
  // Control messages over max_control_message_bytes are answered "too_large" and dropped as they
  // are read; only a frame past this hard limit closes the socket (1009).
  ws_.read_message_max(max_ws_message_bytes);
  ws_.async_accept(req, beast::bind_front_handler(&event_stream_session::on_accept,
                                                  shared_from_this()));
}

void event_stream_session::on_accept(beast::error_code ec) {
  if (ec)
    return teardown();
  ws_.text(true);
  accepted_ = true;
  do_read();
  pump();
}

void event_stream_session::do_read() {
  // Reading also keeps control frames (ping/close) flowing. A client that sends faster than it
  // reads our answers waits for them: reading resumes once the replies are written.
  if (reading_ || closing_ || unsent_replies_ >= max_unsent_replies)
    return;
  reading_ = true;
  ws_.async_read_some(read_buf_, read_chunk,
                      beast::bind_front_handler(&event_stream_session::on_read,
                                                shared_from_this()));
}

void event_stream_session::on_read(beast::error_code ec, size_t) {
  reading_ = false;
  if (ec)
    return teardown();
  if (closing_)
    return;
  // An oversized message is read to its end (so the stream stays in step) but not kept.
  if (read_buf_.size() > max_control_message_bytes) {
    oversized_ = true;
    read_buf_.clear();
  }
  if (!ws_.is_message_done())
    return do_read();
  if (std::exchange(oversized_, false))
    reply_error(json(), "", "too_large",
                "a message may have at most " + std::to_string(max_control_message_bytes) +
                  " bytes");
  else if (!ws_.got_text())
    reply_error(json(), "", "bad_message", "send JSON text frames, not binary ones");
  else
    on_message(beast::buffers_to_string(read_buf_.data()));
  read_buf_.clear();
  if (read_buf_.capacity() > 2 * read_chunk)
    read_buf_.shrink_to_fit();
  do_read();
}

void event_stream_session::on_message(std::string_view text) {
  static constexpr std::string_view shape =
    R"(a message is a JSON object: {"type": "steer", "text": "...", "id": "..."} or )"
    R"({"type": "abort", "reason": "...", "id": "..."})";
  auto msg = json::parse(text, nullptr, false);
  if (msg.is_discarded())
    return reply_error(json(), "", "bad_json", "not JSON; " + std::string(shape));
  if (!msg.is_object())
    return reply_error(json(), "", "bad_message", std::string(shape));
  json id;
  if (auto it = msg.find("id"); it != msg.end() && !it->is_null()) {
    if (!(it->is_number_integer() ||
          (it->is_string() && it->get_ref<const std::string&>().size() <= max_id_bytes)))
      return reply_error(json(), "", "bad_message",
                         "\"id\" must be an integer or a string of at most " +
                           std::to_string(max_id_bytes) + " bytes");
    id = *it;
  }
  auto type = msg.find("type");
  if (type == msg.end() || !type->is_string())
    return reply_error(id, "", "bad_message", "\"type\" is required; " + std::string(shape));
  const std::string op = type->get<std::string>();
  std::string argument;
  if (op == "steer") {
    auto t = msg.find("text");
    if (t == msg.end() || !t->is_string())
      return reply_error(id, op, "bad_message", "steer needs \"text\", a non-empty string");
    argument = t->get<std::string>();
    if (argument.empty())
      return reply_error(id, op, "empty_text", "the steering text is empty");
    if (argument.size() > actors::max_steering_bytes)
      return reply_error(id, op, "too_large",
                         "a steering comment may have at most " +
                           std::to_string(actors::max_steering_bytes) + " bytes, got " +
                           std::to_string(argument.size()));
  } else if (op == "abort") {
    if (auto r = msg.find("reason"); r != msg.end() && !r->is_null()) {
      if (!r->is_string())
        return reply_error(id, op, "bad_message", "\"reason\" must be a string");
      argument = r->get<std::string>();
    }
  } else {
    return reply_error(id, "", "unknown_type",
                       "unknown message type \"" + op.substr(0, 64) +
                         "\": use \"steer\" or \"abort\"");
  }
  // Known here without asking anyone: the stream has delivered (or will next deliver) the end.
  if (ended_ || final_seq_)
    return reply_error(id, op, "task_ended", "the task has ended");
  if (in_flight_ >= max_control_in_flight)
    return reply_error(id, op, "busy",
                       std::to_string(max_control_in_flight) +
                         " requests of this socket are still unanswered; wait for one");
  start_control(std::move(id), op, std::move(argument));
}

void event_stream_session::start_control(json id, std::string op, std::string argument) {
  ++in_flight_;
  // The request blocks (NATS round trip, an abort waits for the task's end): never on the I/O
  // thread. Its answer comes back to this strand and is queued like any frame.
  net::post(srv_.blocking(), [self = shared_from_this(), &deps = srv_.deps(), task = task_id_,
                              user = user_, id = std::move(id), op = std::move(op),
                              argument = std::move(argument)] {
    json answer = op == "steer" ? steer_answer(deps, task, user, argument, id)
                                : abort_answer(deps, task, user, argument, id);
    net::post(self->ws_.get_executor(), [self, answer = std::move(answer)]() mutable {
      --self->in_flight_;
      self->reply(std::move(answer));
    });
  });
}

void event_stream_session::reply_error(const json& id, std::string_view op,
                                       std::string_view code, std::string message) {
  reply(error_frame(id, op, code, message));
}

void event_stream_session::reply(json message) {
  if (closing_)
    return;
  out_.push_back({to_text(message), true});
  ++unsent_replies_;
  write_next();
}

void event_stream_session::on_live(std::string payload) {
  if (closing_ || ended_)
    return;
  if (live_.size() >= live_buffer_limit) {
    // A slow reader: drop the live buffer and let the journal catch it up.
    live_.clear();
    catching_up_ = true;
    return;
  }
  live_.push_back(std::move(payload));
  pump();
}

void event_stream_session::enqueue_event(const ev::Envelope& e) {
  out_.push_back({to_text(schemas::to_json(e)), false});
  next_seq_ = e.sequence() + 1;
  if (e.event_type() == ev::Event::TaskFinished)
    ended_ = true;
}

void event_stream_session::pump() {
  // Live events may arrive before the handshake completes; they wait in live_ until then.
  if (!accepted_ || closing_ || writing_ || !out_.empty())
    return;
  while (!ended_ && out_.empty()) {
    if (catching_up_) {
      auto events = srv_.deps().store->read_stream(stream_, next_seq_, catch_up_batch);
      if (!events)
        return finish(websocket::close_code::internal_error, "journal read failed");
      for (const auto& bytes : *events) {
        auto e = schemas::verify_envelope(bytes);
        if (!e)
          return finish(websocket::close_code::internal_error, "corrupt event in journal");
        enqueue_event(**e);
        if (ended_)
          break;
      }
      if (events->size() < catch_up_batch) {
        catching_up_ = false;
        // Resumed past the end of a finished task: nothing will ever follow.
        if (final_seq_ && next_seq_ > *final_seq_)
          ended_ = true;
      }
      if (!out_.empty())
        break;
      continue;
    }
    if (live_.empty())
      break;
    auto payload = std::move(live_.front());
    live_.pop_front();
    auto e = schemas::verify_envelope(payload);
    if (!e)
      continue;  // not ours to judge: the journal copy is authoritative
    if ((*e)->sequence() < next_seq_)
      continue;  // already sent from the journal
    if ((*e)->sequence() > next_seq_) {
      // Missed something live (e.g. a publish failed): read the gap from the journal.
      live_.push_front(std::move(payload));
      catching_up_ = true;
      continue;
    }
    enqueue_event(**e);
  }
  write_next();
}

void event_stream_session::write_next() {
  if (writing_ || closing_)
    return;
  if (out_.empty()) {
    // The end: once the last event is out and every request of the client has been answered
    // (an abort's acknowledgement may come after the task_finished it caused).
    if (ended_ && in_flight_ == 0)
      finish(websocket::close_code::normal, "task finished");
    return;
  }
  writing_ = true;
  ws_.async_write(net::buffer(out_.front().text),
                  [self = shared_from_this()](beast::error_code ec, size_t) {
                    self->writing_ = false;
                    if (ec)
                      return self->teardown();
                    if (self->out_.front().reply && --self->unsent_replies_ < max_unsent_replies)
                      self->do_read();  // resumes reading if it waited for the replies
                    self->out_.pop_front();
                    if (!self->out_.empty())
                      return self->write_next();
                    self->pump();
                  });
}

void event_stream_session::finish(websocket::close_code code, std::string reason) {
  if (closing_)
    return;
  closing_ = true;
  teardown();
  ws_.async_close(websocket::close_reason(code, reason),
                  [self = shared_from_this()](beast::error_code) {});
}

void event_stream_session::close_from_server() {
  net::post(ws_.get_executor(), [self = shared_from_this()] {
    if (self->accepted_ && !self->closing_ && !self->writing_)
      self->finish(websocket::close_code::going_away, "ferryd shutting down");
    else
      self->teardown();
  });
}

void event_stream_session::teardown() {
  if (mailbox_) {
    std::lock_guard<std::mutex> guard(mailbox_->mtx);
    mailbox_->closed = true;
  }
  sub_.reset();
  live_.clear();
}

}  // namespace ferry::gateway::detail
