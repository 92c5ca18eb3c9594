// The outbox relay of a real ferryd through two restarts of its (external) nats-server: 50 tasks
// run at once in real gVisor sandboxes and print about 125k lines in total (until the test says stop), nearly each line its own
// `output_chunk` event (≥ 100k events asserted); meanwhile the nats-server is stopped twice (once
// with SIGTERM, once with SIGKILL, each time kept down for at least 2 s while the tasks keep
// printing) and started again on the same port with the same JetStream store. At the end every
// event the journal holds — every (stream, seq) of every task-*, session-* and sandbox-* stream,
// and the rest — reached the subscriber exactly once after de-duplication on (stream, seq), byte
// for byte as stored, in per-stream order with no gap; JetStream itself stored each of them once,
// in journal order. Actors never waited for NATS: the journal grew while it was down.
//
// The subscriber is an ordered JetStream consumer of FERRY_EVENTS (nats.c, ephemeral, flow
// control and 1 s idle heartbeats). A core NATS subscription would not do: it sees only what is
// published while it is connected, and after a server restart the relay may well reconnect and
// publish its backlog before the subscriber has re-subscribed, so losses would be the
// subscriber's, not the relay's. The ordered consumer reads the stream as JetStream stored it: on
// a reconnect, a missed heartbeat or a gap in consumer sequences, nats.c re-creates it from the
// stream sequence after the last message it delivered, so it delivers every stored message once,
// in stream order, including everything the relay published while the subscriber was cut off.
// What it delivers twice can therefore only be a message JetStream stored twice, which is why
// "raw duplicates" is also asserted to be zero below (the relay's message ids and expected-last-id
// chain promise exactly that; see actors/include/ferry/actors/outbox.h).
//
// While the tasks run, their progress and states come from the API (ferryd folds each task
// incrementally; a RocksDB secondary of the journal fell tens of seconds behind under this load).
// Once they have ended, the journal is read by this process as a secondary instance
// (storage::open_journal_secondary, what ferryctl uses) while ferryd still runs, and compared
// with what the subscriber got.
//
// Figures (BOOST_TEST_MESSAGE): events per kind, raw deliveries and duplicates, events stored
// while NATS was down, and after each restart when JetStream answered, when the relay published
// again and when the subscriber had everything the tasks stored while the server was down (the
// catch-up), and the phases' durations.

#define BOOST_TEST_MODULE integration_nats_restart
#include <boost/test/unit_test.hpp>

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nats/nats.h>

#include "ferry/actors/bus.h"
#include "ferry/actors/outbox.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr int task_count = 50;
constexpr uint64_t min_events = 100000;
constexpr auto nats_down_time = 2s;
const std::string jetstream_stream = "FERRY_EVENTS";

// Numbered lines, alternately on stdout and stderr, 30 ms apart: ferry-init reads each as a
// chunk of its own and the sandbox actor merges only consecutive output of one stream, so nearly
// every line becomes one output_chunk event (a few merge when a sandbox falls behind; the total
// is measured and asserted). Perl, because it needs two system calls per line (write, select)
// where a shell loop needs about fifteen: under gVisor's ptrace platform each costs two context
// switches, and 50 shell loops left ferryd a few percent of the 2 CPUs. The tasks wait for a
// file `go` in their workspace (looking every 200 ms) before printing: the test creates it once all 50 are executing,
// so they print at the same time, and starting 50 sandboxes does not compete with the output.
// They print until the test creates `stop` (after both restarts, once enough events are stored),
// so a slow machine makes the test longer but never lets the tasks end before a restart;
// max_pairs bounds a task the test forgot.
constexpr int max_pairs = 4000;
/// How long the subscriber may take to get what was stored while NATS was down, with the 50
/// tasks still printing (about 1,600 events/s): on this 2-core VM under gVisor's ptrace platform
/// the relay and the subscriber share what the sandboxes leave of the CPUs (70 s was seen).
constexpr std::chrono::seconds catch_up_limit{150};
const std::string task_command =
  "exec perl -e 'select(undef, undef, undef, 0.2) until -e \"go\"; "
  "for (my $i = 1; $i <= " + std::to_string(max_pairs) + " && ! -e \"stop\"; ++$i) { "
  "syswrite(STDOUT, \"out $i\\n\"); select(undef, undef, undef, 0.03); "
  "syswrite(STDERR, \"err $i\\n\"); select(undef, undef, undef, 0.03); }'";

uint64_t ms_between(clock_type::time_point a, clock_type::time_point b) {
  using std::chrono::milliseconds;
  return static_cast<uint64_t>(std::chrono::duration_cast<milliseconds>(b - a).count());
}

/// One event as stored or delivered: its identity and its exact bytes.
struct event_record {
  std::string stream;
  uint64_t seq = 0;
  uint64_t position = 0;
  std::string bytes;
};

/// Parses an envelope (copied, so FlatBuffers gets an aligned buffer); nullopt if it is none.
std::optional<event_record> parse_event(std::string bytes) {
  auto env = ferry::schemas::verify_envelope(bytes);
  if (!env)
    return std::nullopt;
  event_record r;
  r.stream = (*env)->stream_id() ? (*env)->stream_id()->str() : std::string();
  r.seq = (*env)->sequence();
  r.position = (*env)->position();
  r.bytes = std::move(bytes);
  return r;
}

/// An ordered JetStream consumer of the whole stream (see the top comment), plus the stream's
/// state. nats.c's names stay in this class. Threading: the callbacks run on nats.c threads;
/// every public member is thread-safe.
class jetstream_subscriber {
 public:
  explicit jetstream_subscriber(const std::string& url) {
    natsOptions* opts = nullptr;
    check(natsOptions_Create(&opts), "create options");
    natsOptions_SetURL(opts, url.c_str());
    natsOptions_SetName(opts, "nats-restart-test-subscriber");
    natsOptions_SetMaxReconnect(opts, -1);
    natsOptions_SetReconnectWait(opts, 100);
    natsOptions_SetErrorHandler(opts, &jetstream_subscriber::on_error, this);
    natsOptions_SetDisconnectedCB(opts, &jetstream_subscriber::on_disconnected, this);
    const natsStatus s = natsConnection_Connect(&nc_, opts);
    natsOptions_Destroy(opts);
    check(s, "connect to " + url);
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = 2000;  // JetStream API requests (stream info, get message) give up after 2 s
    check(natsConnection_JetStream(&js_, nc_, &jo), "open JetStream");
  }

  ~jetstream_subscriber() {
    if (sub_) {
      natsSubscription_Unsubscribe(sub_);
      natsSubscription_Destroy(sub_);
    }
    if (js_)
      jsCtx_Destroy(js_);
    if (nc_)
      natsConnection_Destroy(nc_);
  }

  jetstream_subscriber(const jetstream_subscriber&) = delete;
  jetstream_subscriber& operator=(const jetstream_subscriber&) = delete;

  /// Starts consuming the stream from its first message.
  void start() {
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = jetstream_stream.c_str();
    so.Ordered = true;
    so.Config.Heartbeat = std::chrono::nanoseconds(1s).count();  // notice a lost consumer soon
    jsErrCode jerr = static_cast<jsErrCode>(0);
    check(js_Subscribe(&sub_, js_, "ferry.ev.>", &jetstream_subscriber::on_message, this,
                       nullptr, &so, &jerr),
          "subscribe (ordered consumer of " + jetstream_stream + ", JetStream error " +
            std::to_string(static_cast<int>(jerr)) + ")");
    // Never drop a message for being slow: a drop would be our loss, not the relay's.
    check(natsSubscription_SetPendingLimits(sub_, -1, -1), "lift the pending limits");
  }

  /// Every delivery so far, in arrival order (duplicates included).
  std::vector<event_record> deliveries() const {
    std::lock_guard guard(mtx_);
    return received_;
  }
  /// Whether every stream in `seqs` has been delivered up to at least that sequence.
  bool has_reached(const std::map<std::string, uint64_t>& seqs) const {
    std::lock_guard guard(mtx_);
    for (const auto& [stream, seq] : seqs)
      if (auto it = highest_seq_.find(stream); it == highest_seq_.end() || it->second < seq)
        return false;
    return true;
  }
  /// The highest journal position delivered so far.
  uint64_t highest_position() const {
    std::lock_guard guard(mtx_);
    return highest_position_;
  }
  /// Deliveries that were not a stored event on its own subject.
  std::vector<std::string> problems() const {
    std::lock_guard guard(mtx_);
    return problems_;
  }
  /// What nats.c reported asynchronously (e.g. an ordered consumer being re-created).
  std::vector<std::string> notes() const {
    std::lock_guard guard(mtx_);
    return notes_;
  }
  int disconnects() const {
    std::lock_guard guard(mtx_);
    return disconnects_;
  }

  /// The number of messages JetStream holds and the journal position of its last one; nullopt
  /// while the server cannot answer (down, or JetStream still recovering).
  struct stream_state {
    uint64_t messages = 0;
    uint64_t last_position = 0;
  };
  std::optional<stream_state> state() {
    jsStreamInfo* si = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    if (js_GetStreamInfo(&si, js_, jetstream_stream.c_str(), nullptr, &jerr) != NATS_OK)
      return std::nullopt;
    stream_state st;
    st.messages = si->State.Msgs;
    const uint64_t last_seq = si->State.LastSeq;
    jsStreamInfo_Destroy(si);
    if (last_seq == 0)
      return st;
    natsMsg* msg = nullptr;
    if (js_GetMsg(&msg, js_, jetstream_stream.c_str(), last_seq, nullptr, &jerr) != NATS_OK)
      return std::nullopt;
    auto e = parse_event(std::string(natsMsg_GetData(msg),
                                     static_cast<size_t>(natsMsg_GetDataLength(msg))));
    natsMsg_Destroy(msg);
    if (!e)
      return std::nullopt;
    st.last_position = e->position;
    return st;
  }

 private:
  static void check(natsStatus s, const std::string& what) {
    if (s != NATS_OK)
      throw std::runtime_error("test subscriber: " + what + ": " + natsStatus_GetText(s));
  }

  static void on_message(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
    auto* self = static_cast<jetstream_subscriber*>(closure);
    std::string bytes(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
    const std::string subject = natsMsg_GetSubject(msg);
    natsMsg_Destroy(msg);
    auto e = parse_event(std::move(bytes));
    std::lock_guard guard(self->mtx_);
    if (!e) {
      self->problems_.push_back("a message on " + subject + " is not an envelope");
      return;
    }
    if (ferry::actors::event_subject(e->stream) != subject)
      self->problems_.push_back(e->stream + ":" + std::to_string(e->seq) + " arrived on " +
                                subject);
    self->highest_position_ = std::max(self->highest_position_, e->position);
    auto& top = self->highest_seq_[e->stream];
    top = std::max(top, e->seq);
    self->received_.push_back(std::move(*e));
  }

  static void on_error(natsConnection*, natsSubscription*, natsStatus err, void* closure) {
    auto* self = static_cast<jetstream_subscriber*>(closure);
    std::lock_guard guard(self->mtx_);
    if (self->notes_.size() < 50)
      self->notes_.push_back(std::string("nats.c reported ") + natsStatus_GetText(err));
  }
  static void on_disconnected(natsConnection*, void* closure) {
    auto* self = static_cast<jetstream_subscriber*>(closure);
    std::lock_guard guard(self->mtx_);
    ++self->disconnects_;
  }

  natsConnection* nc_ = nullptr;
  jsCtx* js_ = nullptr;
  natsSubscription* sub_ = nullptr;

  mutable std::mutex mtx_;
  std::vector<event_record> received_;  // GUARDED_BY(mtx_)
  uint64_t highest_position_ = 0;       // GUARDED_BY(mtx_)
  std::map<std::string, uint64_t> highest_seq_;  // GUARDED_BY(mtx_): per stream
  std::vector<std::string> problems_;   // GUARDED_BY(mtx_)
  std::vector<std::string> notes_;      // GUARDED_BY(mtx_)
  int disconnects_ = 0;                 // GUARDED_BY(mtx_)
};

/// ferryd's journal as another process sees it (a RocksDB secondary instance).
class journal_view {
 public:
  journal_view(const fs::path& journal_dir, const fs::path& scratch_dir) {
    auto opened = ferry::storage::open_journal_secondary(journal_dir, scratch_dir);
    BOOST_TEST_REQUIRE(opened.ok(), "open the journal read-only: "
                                      << (opened.ok() ? "" : opened.error().message));
    store_ = std::move(*opened);
  }

  /// The highest position ferryd has stored by now.
  uint64_t last_position() {
    auto ok = store_->catch_up();
    BOOST_TEST_REQUIRE(ok.ok(), "journal catch-up: " << (ok.ok() ? "" : ok.error().message));
    return store_->last_position();
  }

  /// Every event up to `last`, in position order.
  std::vector<event_record> read_all(uint64_t last) {
    std::vector<event_record> out;
    uint64_t from = 1;
    while (from <= last) {
      auto batch = store_->read_all(from, 4096);
      BOOST_TEST_REQUIRE(batch.ok(), "read the journal from " << from << ": "
                                       << (batch.ok() ? "" : batch.error().message));
      if (batch->empty())
        break;
      for (auto& bytes : *batch) {
        auto e = parse_event(std::move(bytes));
        BOOST_TEST_REQUIRE(e.has_value(), "the journal holds a non-envelope at " << from);
        from = e->position + 1;
        if (e->position > last)
          return out;
        out.push_back(std::move(*e));
      }
    }
    return out;
  }

 private:
  std::unique_ptr<ferry::storage::event_store> store_;
};

/// The nats-server ferryd uses: started, stopped and started again on one port and store. (The
/// embedded_nats child of the product takes a fixed port; test_support's nats_server picks a
/// new one at every start, which ferryd would not reconnect to.)
class restartable_nats {
 public:
  explicit restartable_nats(fs::path store_dir) : store_dir_(std::move(store_dir)) { start(0); }

  const std::string& url() const { return url_; }

  /// Stops it: SIGTERM (a clean shutdown), or SIGKILL (acknowledgements in flight are lost and
  /// JetStream recovers its store from disk at the next start).
  void stop(bool kill) {
    if (kill) {
      const std::string pid_path = store_dir_.string() + ".pid";
      long pid = 0;
      std::ifstream(pid_path) >> pid;
      BOOST_TEST_REQUIRE(pid > 1, "no pid in " << pid_path);
      // Ours: its command line names our store (and it is our child, not reaped yet).
      const auto cmdline = ferry::sandbox::read_small_file("/proc/" + std::to_string(pid) +
                                                           "/cmdline");
      BOOST_TEST_REQUIRE(cmdline.find(store_dir_.string()) != std::string::npos,
                         "pid " << pid << " is not our nats-server");
      BOOST_TEST_REQUIRE(::kill(static_cast<pid_t>(pid), SIGKILL) == 0);
    }
    server_->stop();  // reaps it (after SIGKILL: at once)
    server_.reset();
  }

  /// Starts it again, on the same port, with the same store.
  void restart() { start(port_); }

 private:
  void start(uint16_t port) {
    auto started = ferry::actors::start_embedded_nats("nats-server", store_dir_, port);
    BOOST_TEST_REQUIRE(started.ok(), "start nats-server: "
                                       << (started.ok() ? "" : started.error().message));
    server_ = std::move(*started);
    url_ = server_->url();
    port_ = static_cast<uint16_t>(std::stoi(url_.substr(url_.rfind(':') + 1)));
  }

  fs::path store_dir_;
  std::unique_ptr<ferry::actors::embedded_nats> server_;
  std::string url_;
  uint16_t port_ = 0;
};

/// The tasks as ferryd serves them now: how far each stream got (`last_seq`) and how many
/// have ended. Asked over the API while the tasks run: ferryd folds each task incrementally,
/// whereas a RocksDB secondary fell tens of seconds behind under this load.
struct tasks_now {
  std::map<std::string, uint64_t> last_seq;  ///< "task-<id>" → stored events
  std::vector<nlohmann::json> views;
  int ended = 0;
  uint64_t events() const {
    uint64_t n = 0;
    for (const auto& [stream, seq] : last_seq)
      n += seq;
    return n;
  }
};

tasks_now ask_tasks(const api_client& api, const std::vector<std::string>& ids) {
  tasks_now now;
  for (const auto& id : ids) {
    auto v = get_task_json(api, id);
    now.last_seq["task-" + id] = field(v, "last_seq").get<uint64_t>();
    const std::string status = str(v, "status");
    now.ended += status != "queued" && status != "running";
    now.views.push_back(std::move(v));
  }
  return now;
}

}  // namespace

BOOST_AUTO_TEST_CASE(fifty_tasks_through_two_nats_restarts_reach_a_subscriber_exactly_once) {
  const auto test_start = clock_type::now();
  temp_dir dir("ferry-nats-restart");
  restartable_nats nats(dir.path() / "nats" / "store");

  ferryd_options opts(FERRYD_BINARY, dir.path() / "data");
  opts.extra_args = {"--nats-url", nats.url(), "--max-running", std::to_string(task_count),
                     "--max-running-per-user", std::to_string(task_count)};
  ferryd_process ferryd(opts);
  api_client api(ferryd);

  // The relay creates the JetStream stream; subscribe once it exists, from its first message.
  jetstream_subscriber subscriber(nats.url());
  BOOST_TEST_REQUIRE(eventually([&] { return subscriber.state().has_value(); }, 30s),
                     "JetStream stream " << jetstream_stream << " was not created");
  subscriber.start();

  std::vector<std::string> ids;
  std::vector<std::unique_ptr<sandbox_sweeper>> sweepers;
  for (int i = 0; i < task_count; ++i) {
    ids.push_back(submit_task(api, task_command));
    sweepers.push_back(std::make_unique<sandbox_sweeper>(ids.back()));
  }
  // All 50 run at once (none queued), waiting for their start signal.
  std::vector<fs::path> workspaces;
  for (const auto& id : ids) {
    std::string last;
    auto t = api.wait_for_task(
      id, [](const nlohmann::json& t) { return sandbox_status(t) == "executing"; }, 120s, &last);
    BOOST_TEST_REQUIRE(t.has_value(), "task " << id << " is not executing; last: " << last);
    const fs::path workspace =
      ferryd.data_dir() / "sandboxes" / str(field(*t, "sandbox"), "id") / "workspace";
    BOOST_TEST_REQUIRE(fs::is_directory(workspace), "no sandbox workspace " << workspace);
    workspaces.push_back(workspace);
  }
  BOOST_TEST_MESSAGE(task_count << " tasks submitted and executing after "
                                << ms_between(test_start, clock_type::now()) << " ms");
  const auto go_at = clock_type::now();
  for (const auto& w : workspaces)
    std::ofstream(w / "go").flush();
  std::string quiet;
  BOOST_TEST_REQUIRE(eventually(
                       [&] {
                         quiet.clear();
                         for (const auto& [stream, seq] : ask_tasks(api, ids).last_seq)
                           if (seq < 20)
                             quiet += " " + stream + " (seq " + std::to_string(seq) + ")";
                         return quiet.empty();
                       },
                       180s, 200ms),
                     "not every task printed after the start signal:" << quiet);
  BOOST_TEST_MESSAGE("all printing " << ms_between(go_at, clock_type::now())
                                     << " ms after the start signal");

  // Two restarts while they print: the first a clean stop, the second a SIGKILL.
  for (int restart = 1; restart <= 2; ++restart) {
    std::this_thread::sleep_for(restart == 1 ? 3s : 5s);
    // None has ended: the restart happens under the full load.
    const tasks_now at_stop = ask_tasks(api, ids);
    BOOST_TEST(at_stop.ended == 0, "restart " << restart << " comes too late: " << at_stop.ended
                                              << " tasks have ended");
    const bool kill = restart == 2;
    const auto stop_at = clock_type::now();
    nats.stop(kill);
    std::this_thread::sleep_for(nats_down_time / 2);
    // What the relay has to catch up with: everything stored while the server was away.
    const tasks_now at_start = ask_tasks(api, ids);
    // Actors never wait for NATS: the tasks' output kept being stored while it was down.
    BOOST_TEST(at_start.events() > at_stop.events(),
               "restart " << restart << ": the tasks stored nothing while NATS was down ("
                          << at_stop.events() << " events)");
    std::this_thread::sleep_until(stop_at + nats_down_time);
    nats.restart();
    const auto up_at = clock_type::now();

    // Caught up once the subscriber has every task's stream up to where it was while the server
    // was down (so JetStream holds it too). On the way: when JetStream first answered after the
    // restart, and when its last message changed (the relay publishing again).
    std::optional<uint64_t> answered_ms, resumed_ms, caught_up_ms;
    uint64_t first_seen = 0;
    const bool caught_up = eventually(
      [&] {
        if (!resumed_ms)
          if (auto st = subscriber.state()) {
            if (!answered_ms) {
              answered_ms = ms_between(up_at, clock_type::now());
              first_seen = st->last_position;
            } else if (st->last_position != first_seen) {
              resumed_ms = ms_between(up_at, clock_type::now());
            }
          }
        if (subscriber.has_reached(at_start.last_seq))
          caught_up_ms = ms_between(up_at, clock_type::now());
        return caught_up_ms.has_value();
      },
      catch_up_limit, 20ms);
    auto ms = [](const std::optional<uint64_t>& x) {
      return x ? std::to_string(*x) + " ms" : std::string("never");
    };
    BOOST_TEST_REQUIRE(caught_up, "restart " << restart << ": the subscriber has not got what the "
                                             << "tasks stored while NATS was down within "
                                             << catch_up_limit.count() << " s; "
                                             << "JetStream answered " << ms(answered_ms)
                                             << " and grew " << ms(resumed_ms)
                                             << " after the restart");
    BOOST_TEST_MESSAGE("restart " << restart << " (" << (kill ? "SIGKILL" : "SIGTERM") << ", "
                                  << ms_between(go_at, stop_at) << " ms into the output): down "
                                  << ms_between(stop_at, up_at) << " ms; "
                                  << at_start.events() - at_stop.events()
                                  << " events stored by the tasks meanwhile (from the stop to "
                                  << "1 s into it); after the restart JetStream answered in "
                                  << ms(answered_ms) << ", grew after " << ms(resumed_ms)
                                  << ", all of it delivered after " << ms(caught_up_ms));
  }

  // Enough output stored (the tasks printed through both restarts): stop them.
  tasks_now printed;
  const bool enough = eventually(
    [&] { return (printed = ask_tasks(api, ids)).events() >= min_events + min_events / 4; }, 240s,
    500ms);
  BOOST_TEST(enough, "the tasks stored only " << printed.events() << " events in 240 s");
  for (const auto& w : workspaces)
    std::ofstream(w / "stop").flush();

  // Every task ends; each ran its command to the end through both restarts.
  tasks_now end_state;
  const bool all_ended = eventually(
    [&] { return (end_state = ask_tasks(api, ids)).ended == task_count; }, 150s, 1s);
  BOOST_TEST_REQUIRE(all_ended, "only " << end_state.ended << " of " << task_count
                                        << " tasks ended");
  const auto all_ended_at = clock_type::now();
  const std::vector<nlohmann::json>& views = end_state.views;
  for (const auto& v : views)
    BOOST_TEST((str(v, "status") == "succeeded" && field(v, "exit_code") == 0),
               "task " << str(v, "id") << ": " << v.dump());

  // The relay caught up with the journal: the subscriber has the last stored position, and the
  // journal has stopped growing.
  journal_view journal(ferryd.data_dir() / "journal", dir.path() / "journal-secondary");
  uint64_t end = 0;
  const bool drained = eventually(
    [&] {
      const uint64_t now = journal.last_position();
      const bool done = now == end && subscriber.highest_position() >= now;
      end = now;
      return done;
    },
    60s, 500ms);
  BOOST_TEST_REQUIRE(drained, "the subscriber is at position " << subscriber.highest_position()
                                                               << ", the journal at " << end);
  BOOST_TEST_MESSAGE("output from the start signal to the last task's end: "
                     << ms_between(go_at, all_ended_at) << " ms; the journal (at position "
                     << end << ") read and the relay found caught up "
                     << ms_between(all_ended_at, clock_type::now()) << " ms after that");

  // The journal's events, and which of them belong to the tasks.
  const std::vector<event_record> stored = journal.read_all(end);
  BOOST_TEST_REQUIRE(!stored.empty());
  BOOST_TEST(stored.back().position == end);
  std::set<std::string> task_streams;
  for (const auto& v : views) {
    task_streams.insert("task-" + str(v, "id"));
    task_streams.insert("session-" + str(v, "id"));
    const std::string sandbox_id = str(field(v, "sandbox"), "id");
    BOOST_TEST(!sandbox_id.empty(), "task " << str(v, "id") << " has no sandbox id");
    task_streams.insert("sandbox-" + sandbox_id);
  }
  std::map<std::string, uint64_t> journal_highest;  // stream → highest seq, from the journal
  std::map<std::pair<std::string, uint64_t>, const event_record*> by_id;
  std::map<std::string, uint64_t> per_kind;
  uint64_t task_events = 0, output_events = 0;
  for (const auto& e : stored) {
    BOOST_TEST_REQUIRE(by_id.emplace(std::pair{e.stream, e.seq}, &e).second,
                       "the journal holds " << e.stream << ":" << e.seq << " twice");
    journal_highest[e.stream] = std::max(journal_highest[e.stream], e.seq);
    ++per_kind[e.stream.substr(0, e.stream.find('-'))];
    if (task_streams.count(e.stream)) {
      ++task_events;
      auto env = ferry::schemas::verify_envelope(e.bytes);
      output_events += (*env)->event_type() == ferry::events::v1::Event::OutputChunk;
    }
  }
  for (const auto& s : task_streams)
    BOOST_TEST(journal_highest.count(s) == 1u, "the journal has no stream " << s);
  std::string kinds;
  for (const auto& [kind, n] : per_kind)
    kinds += " " + kind + "=" + std::to_string(n);
  BOOST_TEST_MESSAGE("journal: " << stored.size() << " events in " << journal_highest.size()
                                 << " streams (" << kinds << " ); the " << task_count
                                 << " tasks' " << task_streams.size() << " streams hold "
                                 << task_events << " (" << output_events << " output chunks)");
  BOOST_TEST(task_events >= min_events, "the tasks made only " << task_events << " events");

  // What the subscriber got: after de-duplication on (stream, seq), every stored event exactly
  // once, byte for byte, each stream in order from 1 without a gap, nothing the journal lacks.
  const std::vector<event_record> raw = subscriber.deliveries();
  std::map<std::string, uint64_t> delivered_highest;
  std::set<std::pair<std::string, uint64_t>> seen;
  uint64_t duplicates = 0, previous_position = 0, out_of_journal_order = 0;
  int reported = 0;
  auto report = [&](const std::string& what) {
    if (++reported <= 20)
      BOOST_ERROR(what);
  };
  for (const auto& e : raw) {
    const std::pair key{e.stream, e.seq};
    auto stored_event = by_id.find(key);
    if (stored_event == by_id.end()) {
      report("delivered " + e.stream + ":" + std::to_string(e.seq) + ", which the journal lacks");
      continue;
    }
    if (stored_event->second->bytes != e.bytes)
      report("delivered " + e.stream + ":" + std::to_string(e.seq) +
             " differs from the stored event");
    if (!seen.insert(key).second) {
      ++duplicates;
      continue;
    }
    uint64_t& highest = delivered_highest[e.stream];
    if (e.seq != highest + 1)
      report(e.stream + ": seq " + std::to_string(e.seq) + " delivered after " +
             std::to_string(highest) + " (gap or out of order)");
    highest = std::max(highest, e.seq);
    out_of_journal_order += e.position <= previous_position;
    previous_position = std::max(previous_position, e.position);
  }
  BOOST_TEST(reported == 0, reported << " problems with the deliveries (first 20 above)");
  uint64_t missing = 0;
  for (const auto& e : stored)
    missing += seen.count({e.stream, e.seq}) == 0;
  BOOST_TEST(missing == 0u, missing << " stored events never reached the subscriber");
  BOOST_TEST(seen.size() == stored.size());
  for (const auto& [stream, highest] : journal_highest)
    BOOST_TEST(delivered_highest[stream] == highest,
               stream << ": delivered up to " << delivered_highest[stream] << " of " << highest);
  BOOST_TEST(out_of_journal_order == 0u,
             out_of_journal_order << " events arrived before one stored earlier");
  BOOST_TEST_MESSAGE("subscriber: " << raw.size() << " deliveries, " << seen.size()
                                    << " distinct (stream, seq), " << duplicates
                                    << " duplicates; " << subscriber.disconnects()
                                    << " disconnects");
  // JetStream stored each event once (message ids within the duplicate window, and the
  // expected-last-id chain): the ordered consumer can only repeat what the stream holds twice.
  BOOST_TEST(duplicates == 0u, "JetStream holds " << duplicates << " events twice");
  auto st = subscriber.state();
  BOOST_TEST_REQUIRE(st.has_value());
  BOOST_TEST(st->messages == stored.size(), "JetStream holds " << st->messages
                                                               << " messages for " << stored.size()
                                                               << " stored events");
  for (const auto& p : subscriber.problems())
    BOOST_ERROR("subscriber: " << p);
  for (const auto& n : subscriber.notes())
    BOOST_TEST_MESSAGE("subscriber: " << n);

  ferryd.stop();
  BOOST_TEST_MESSAGE("test took " << ms_between(test_start, clock_type::now()) << " ms");
}
