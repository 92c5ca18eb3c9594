// outbox_relay: journal → JetStream, at least once, de-duplicated by message id (see outbox.h).
// natsX_Verb / js_Verb names stay in actors/src; the connection is opened like the bus's
// (nats_connection.h).

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <cstdio>
#include <mutex>
#include <thread>

#include <nats/nats.h>

#include "ferry/actors/outbox.h"
#include "ferry/schemas/events.h"
#include "nats_connection.h"

namespace ferry::actors {

std::string event_subject(std::string_view stream_id) {
  std::string subject = "ferry.ev.";
  auto dash = stream_id.find('-');
  std::string_view kind = stream_id.substr(0, dash);
  auto clean = [](std::string_view part, std::string& out) {
    for (char c : part)
      out.push_back(c == '.' || c == '*' || c == '>' || c == ' ' ? '_' : c);
  };
  clean(kind, subject);
  if (dash != std::string_view::npos) {
    subject.push_back('.');
    clean(stream_id.substr(dash + 1), subject);
  }
  return subject;
}

namespace {

namespace ev = ferry::events::v1;

std::string nats_text(natsStatus s) { return natsStatus_GetText(s); }

class relay;
void on_publish_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure);

class relay final : public outbox_relay {
 public:
  relay(storage::event_store& store, outbox_options opts, natsConnection* nc)
    : store_(store), opts_(std::move(opts)), nc_(nc),
      cursor_stream_("outbox-" + opts_.jetstream_stream) {}

  ~relay() override {
    {
      std::lock_guard<std::mutex> guard(mtx_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (sub_)
      sub_->close();
    if (thread_.joinable())
      thread_.join();
    if (js_) {
      discard_pending();  // no acknowledgement callback may reach a relay being destroyed
      jsCtx_Destroy(js_);
    }
    natsConnection_Destroy(nc_);
  }

  result<void> start() {
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = static_cast<int64_t>(max_in_flight) * 2;
    jo.PublishAsync.AckHandler = on_publish_ack;
    jo.PublishAsync.AckHandlerClosure = this;
    if (auto s = natsConnection_JetStream(&js_, nc_, &jo); s != NATS_OK)
      return detail::nats_failure("open JetStream on " + redact_nats_url(opts_.nats.url), s,
                                  opts_.nats);
    auto saved = store_.load_snapshot(cursor_stream_);
    if (!saved)
      return saved.error();
    cursor_ = *saved ? (*saved)->sequence : 0;
    saved_cursor_ = cursor_;
    sub_ = store_.subscribe(cursor_ + 1);
    thread_ = std::thread([this] { run(); });
    pthread_setname_np(thread_.native_handle(), "outbox-relay");
    return {};
  }

  outbox_stats stats() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return outbox_stats{cursor_, published_, retries_, last_error_};
  }

  bool wait_for(uint64_t position, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mtx_);
    return cv_.wait_for(lock, timeout, [&] { return cursor_ >= position || stopping_; }) &&
           cursor_ >= position;
  }

 private:
  bool stopping() {
    std::lock_guard<std::mutex> guard(mtx_);
    return stopping_;
  }

  void sleep_backoff() {
    std::unique_lock<std::mutex> lock(mtx_);
    cv_.wait_for(lock, backoff_, [&] { return stopping_; });
    backoff_ = std::min(backoff_ * 2, std::chrono::milliseconds(2000));
  }

  void note_error(std::string e) {
    std::lock_guard<std::mutex> guard(mtx_);
    if (e != last_error_)
      std::fprintf(stderr, "ferry outbox: %s (retrying)\n", e.c_str());
    last_error_ = std::move(e);
    ++retries_;
  }

  /// Creates or updates the JetStream stream. REQUIRES: relay thread.
  result<void> ensure_stream() {
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = opts_.jetstream_stream.c_str();
    const char* subjects[] = {"ferry.ev.>"};
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    cfg.MaxAge = std::chrono::duration_cast<std::chrono::nanoseconds>(opts_.max_age).count();
    cfg.Duplicates =
      std::chrono::duration_cast<std::chrono::nanoseconds>(opts_.duplicate_window).count();
    jsStreamInfo* si = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    auto s = js_AddStream(&si, js_, &cfg, nullptr, &jerr);
    if (s != NATS_OK && jerr == JSStreamNameExistErr)
      s = js_UpdateStream(&si, js_, &cfg, nullptr, &jerr);
    if (si)
      jsStreamInfo_Destroy(si);
    if (s != NATS_OK)
      return fail("create JetStream stream " + opts_.jetstream_stream + ": " + nats_text(s) +
                  (jerr ? " (JetStream error " + std::to_string(static_cast<int>(jerr)) + ")"
                        : std::string()));
    return {};
  }

  /// Publishes one event, chained to the one sent before it. REQUIRES: relay thread.
  result<void> publish_one(const std::string& bytes) {
    const auto* env = ev::GetEnvelope(bytes.data());  // verified by the journal
    const std::string stream = env->stream_id() ? env->stream_id()->str() : std::string();
    std::string id = stream + ":" + std::to_string(env->sequence());
    const std::string subject = event_subject(stream);
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = id.c_str();
    // Order: each message must follow the one before it in the journal. After a connection
    // loss, nats.c re-sends what was still in its buffer; those stale messages no longer follow
    // what the server stored, so it refuses them instead of storing them ahead of the gap the
    // re-sent events fill. (Repeats of stored messages are answered as duplicates first.)
    if (!last_sent_id_.empty())
      po.ExpectLastMsgId = last_sent_id_.c_str();
    {
      std::lock_guard<std::mutex> guard(mtx_);
      in_flight_.push_back({env->position(), id, std::chrono::steady_clock::now()});
    }
    published_once_ = true;
    auto s = js_PublishAsync(js_, subject.c_str(), bytes.data(), static_cast<int>(bytes.size()),
                             &po);
    if (s != NATS_OK)
      return fail("publish " + id + " on " + subject + ": " + nats_text(s));
    last_sent_id_ = std::move(id);
    return {};
  }

 public:
  /// JetStream's answer to one publish (a nats.c thread). Answers come in publish order.
  void on_ack(natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae) {
    const char* id = nullptr;
    if (msg)
      natsMsgHeader_Get(msg, "Nats-Msg-Id", &id);
    {
      std::lock_guard<std::mutex> guard(mtx_);
      if (in_flight_.empty() || !id || in_flight_.front().id != id) {
        failed_ = failed_.empty() ? std::string("an acknowledgement arrived out of order") : failed_;
      } else if (pae || !pa) {
        failed_ = "JetStream refused " + in_flight_.front().id + ": " +
                  (pae && pae->ErrText ? pae->ErrText : "no answer") +
                  (pae ? " (" + nats_text(pae->Err) + ")" : std::string());
      } else {
        cursor_ = in_flight_.front().position;
        last_ack_ = std::chrono::steady_clock::now();
        ++published_;
        in_flight_.pop_front();
      }
    }
    cv_.notify_all();
  }

 private:
  /// Drops what a failed round left pending, so it is not acknowledged into a later round.
  void discard_pending() {
    // nats.c 3.4 dereferences its pending map, which exists only after a first async publish.
    if (!published_once_)
      return;
    natsMsgList pending;
    if (js_PublishAsyncGetPendingList(&pending, js_) == NATS_OK)
      natsMsgList_Destroy(&pending);
  }

  /// Saves the cursor (at most every cursor_save_interval unless forced). REQUIRES: relay
  /// thread.
  void save_cursor(bool force) {
    // One reading of the cursor: acknowledgements move it meanwhile, and deleting "older"
    // snapshots against a newer reading would delete the one just saved.
    uint64_t cursor;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      cursor = cursor_;
    }
    auto now = std::chrono::steady_clock::now();
    if (cursor == saved_cursor_ || (!force && now - last_save_ < opts_.cursor_save_interval))
      return;
    auto ts = std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
    if (auto ok = store_.save_snapshot({cursor_stream_, cursor, ts, {}}); !ok) {
      note_error("save the relay cursor: " + ok.error().message);
      return;
    }
    storage::snapshot_criteria older;
    older.max_sequence = cursor - 1;
    (void)store_.delete_snapshots(cursor_stream_, older);
    saved_cursor_ = cursor;
    last_save_ = now;
  }

  /// Starts over from the cursor after a failure: forget what is in flight, read the journal
  /// again from the first unacknowledged event. REQUIRES: relay thread.
  void reset_to_cursor(const std::string& why) {
    discard_pending();
    uint64_t from;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      in_flight_.clear();
      failed_.clear();
      from = cursor_ + 1;
    }
    last_sent_id_.clear();
    note_error(why);
    sub_->close();
    sub_ = store_.subscribe(from);
  }

  /// reset_to_cursor, then a pause that grows with each consecutive failure.
  void restart_from_cursor(const std::string& why) {
    reset_to_cursor(why);
    sleep_backoff();
  }

  bool connected() { return natsConnection_Status(nc_) == NATS_CONN_STATUS_CONNECTED; }

  /// Waits (in short steps, so that stopping is noticed) until the connection is back.
  void wait_until_connected() {
    while (!connected()) {
      std::unique_lock<std::mutex> lock(mtx_);
      if (cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stopping_; }))
        return;
    }
  }

  void run() {
    bool stream_ready = false;
    while (!stopping()) {
      if (!connected()) {
        // The server is gone (stopped, restarting, unreachable): nothing in flight will be
        // acknowledged, and a request would only time out. Start over from the cursor now and
        // wait for the reconnect — rather than waiting ack_wait for acknowledgements that cannot
        // come, and meanwhile queueing publishes that nats.c would send, stale, on reconnect.
        reset_to_cursor("NATS at " + redact_nats_url(opts_.nats.url) +
                        " is unreachable; waiting for it");
        wait_until_connected();
        stream_ready = false;  // the stream may have been lost with the server's store
        continue;
      }
      if (!stream_ready) {
        if (auto ok = ensure_stream(); !ok) {
          note_error(ok.error().message);
          sleep_backoff();
          continue;
        }
        stream_ready = true;
      }
      std::string failure;
      size_t in_flight = 0;
      {
        std::unique_lock<std::mutex> lock(mtx_);
        // Events wait for nothing but room: publishing goes on while earlier acks are out.
        cv_.wait_for(lock, std::chrono::milliseconds(50), [&] {
          return stopping_ || !failed_.empty() || in_flight_.size() < max_in_flight;
        });
        failure = failed_;
        in_flight = in_flight_.size();
        // Stuck is when nothing comes back, not when the server is slow: thousands of events
        // sent in a burst may take the busy server longer than ack_wait to store, but each
        // acknowledgement is progress (a lost one shows as an acknowledgement out of order).
        // Starting over then would only send them all again.
        if (failure.empty() && !in_flight_.empty() &&
            std::chrono::steady_clock::now() - std::max(in_flight_.front().sent, last_ack_) >
              opts_.ack_wait)
          failure = "no acknowledgement from JetStream for " +
                    std::to_string(opts_.ack_wait.count()) + " ms";
      }
      if (!failure.empty()) {
        // The stream may have been lost with the server's store: make sure it exists again.
        stream_ready = false;
        restart_from_cursor(failure);
        continue;
      }
      if (in_flight >= max_in_flight)
        continue;
      auto next = sub_->next(std::min(opts_.batch, max_in_flight - in_flight),
                             std::chrono::milliseconds(in_flight ? 5 : 200));
      if (!next) {
        if (next.error().code == errc::closed)
          break;
        note_error("read the journal: " + next.error().message);
        sleep_backoff();
        continue;
      }
      for (const auto& bytes : *next)
        if (auto ok = publish_one(bytes); !ok) {
          std::lock_guard<std::mutex> guard(mtx_);
          failed_ = ok.error().message;
          break;
        }
      {
        std::lock_guard<std::mutex> guard(mtx_);
        if (in_flight_.empty() && failed_.empty()) {
          if (!last_error_.empty())
            last_error_.clear();
          backoff_ = std::chrono::milliseconds(100);
        }
      }
      save_cursor(next->empty());
    }
    save_cursor(true);
  }

  struct sent_event {
    uint64_t position;
    std::string id;
    std::chrono::steady_clock::time_point sent;
  };
  /// Events published and not yet acknowledged, at most this many.
  static constexpr size_t max_in_flight = 4096;

  storage::event_store& store_;
  const outbox_options opts_;
  natsConnection* nc_;
  jsCtx* js_ = nullptr;
  const std::string cursor_stream_;
  std::unique_ptr<storage::subscription> sub_;
  std::thread thread_;

  mutable std::mutex mtx_;
  std::condition_variable cv_;
  bool stopping_ = false;          // GUARDED_BY(mtx_)
  uint64_t cursor_ = 0;            // GUARDED_BY(mtx_); advanced by acknowledgements
  uint64_t published_ = 0;         // GUARDED_BY(mtx_)
  uint64_t retries_ = 0;           // GUARDED_BY(mtx_)
  std::string last_error_;         // GUARDED_BY(mtx_)
  std::chrono::milliseconds backoff_{100};  // GUARDED_BY(mtx_)
  std::deque<sent_event> in_flight_;        // GUARDED_BY(mtx_)
  std::string failed_;                      // GUARDED_BY(mtx_); set by the ack handler
  std::chrono::steady_clock::time_point last_ack_{};  // GUARDED_BY(mtx_)

  // Relay thread only (and the destructor, after the thread ended).
  std::string last_sent_id_;
  bool published_once_ = false;
  uint64_t saved_cursor_ = 0;
  std::chrono::steady_clock::time_point last_save_{};
};

void on_publish_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
  static_cast<relay*>(closure)->on_ack(msg, pa, pae);
  natsMsg_Destroy(msg);  // ours; `pa` and `pae` belong to the library
}

}  // namespace

result<std::unique_ptr<outbox_relay>> start_outbox_relay(storage::event_store& store,
                                                         const outbox_options& opts) {
  if (!opts.nats_url.empty() && !opts.nats.url.empty())
    return fail(errc::invalid_argument,
                "outbox relay: both nats_url and nats.url are set; use nats.url");
  outbox_options resolved = opts;
  if (resolved.nats.url.empty())
    resolved.nats.url = opts.nats_url;
  resolved.nats_url.clear();
  // The bus's options, tuned for a stream of publishes; not being able to reach the server yet
  // is fine (the relay retries in the background), refused credentials or TLS are not.
  detail::connection_tuning tuning;
  tuning.name_suffix = "-outbox";
  tuning.send_asap = true;  // latency: each publish goes to the socket at once
  tuning.retry_when_unreachable = true;
  auto nc = detail::open_connection(resolved.nats, tuning);
  if (!nc)
    return fail("outbox relay: " + nc.error().message);

  auto r = std::make_unique<relay>(store, std::move(resolved), *nc);
  if (auto ok = r->start(); !ok)
    return ok.error();
  return std::unique_ptr<outbox_relay>(std::move(r));
}

}  // namespace ferry::actors
