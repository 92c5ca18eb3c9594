// The WebSocket event stream of one task.

#include "server.h"

#include <charconv>
#include <cstdio>

#include "ferry/actors/tasks.h"
#include "ferry/storage/journal.h"

namespace ferry::gateway::detail {

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
  ws_.read_message_max(64 * 1024);
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
  // Reading keeps control frames (ping/close) flowing; client messages are not used yet.
  ws_.async_read(read_buf_, [self = shared_from_this()](beast::error_code ec, size_t) {
    if (ec)
      return self->teardown();
    self->read_buf_.consume(self->read_buf_.size());
    self->do_read();
  });
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
  out_.push_back(schemas::to_json(e).dump(-1, ' ', false, json::error_handler_t::replace));
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
    if (ended_)
      finish(websocket::close_code::normal, "task finished");
    return;
  }
  writing_ = true;
  ws_.async_write(net::buffer(out_.front()),
                  [self = shared_from_this()](beast::error_code ec, size_t) {
                    self->writing_ = false;
                    if (ec)
                      return self->teardown();
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
