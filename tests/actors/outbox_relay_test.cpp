// The outbox relay against a real nats-server with JetStream: every journal event reaches the
// JetStream stream exactly once per (stream, seq), in per-stream order — also when the server is
// restarted (twice) while events keep being appended, and when the relay itself restarts from its
// saved cursor. Appenders are never blocked by NATS being down.
#define BOOST_TEST_MODULE actors_outbox_relay
#include <boost/test/unit_test.hpp>

#include <signal.h>
#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include <nats/nats.h>

#include "ferry/actors/bus.h"
#include "ferry/actors/outbox.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace fs = std::filesystem;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using namespace std::chrono_literals;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string tmpl = (fs::temp_directory_path() / "ferry-outbox-XXXXXX").string();
    BOOST_REQUIRE(mkdtemp(tmpl.data()));
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::unique_ptr<ferry::storage::event_store> open_store(const fs::path& dir) {
  ferry::storage::journal_options o;
  o.dir = dir;
  o.durability = ferry::storage::durability::periodic;  // speed; the relay is under test here
  auto s = ferry::storage::open_journal(o);
  BOOST_REQUIRE_MESSAGE(s.ok(), (s.ok() ? "" : s.error().message));
  return std::move(*s);
}

uint16_t port_of(const std::string& url) {
  return static_cast<uint16_t>(std::stoi(url.substr(url.rfind(':') + 1)));
}

/// Appends `count` events to `stream` in batches of 1..5; returns the last position.
uint64_t append_events(ferry::storage::event_store& store, const std::string& stream, int count) {
  sc::envelope_meta m;
  m.stream_id = stream;
  m.user = "system";
  uint64_t last = 0;
  for (int i = 0; i < count;) {
    std::vector<std::string> batch;
    for (int k = 0; k < 1 + i % 5 && i < count; ++k, ++i)
      batch.push_back(
        sc::output_chunk(m, 1, ev::OutputStream::stdout, "line " + std::to_string(i)));
    auto r = store.append(stream, batch);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    last = r->last_position;
  }
  return last;
}

/// Everything the JetStream stream holds, as (stream id, seq) in stream order.
std::vector<std::pair<std::string, uint64_t>> read_jetstream(const std::string& url,
                                                             const std::string& name) {
  natsConnection* nc = nullptr;
  BOOST_REQUIRE(natsConnection_ConnectTo(&nc, url.c_str()) == NATS_OK);
  jsCtx* js = nullptr;
  BOOST_REQUIRE(natsConnection_JetStream(&js, nc, nullptr) == NATS_OK);
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  BOOST_REQUIRE(js_GetStreamInfo(&si, js, name.c_str(), nullptr, &jerr) == NATS_OK);
  const uint64_t total = si->State.Msgs;
  jsStreamInfo_Destroy(si);

  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = name.c_str();
  so.Ordered = true;
  natsSubscription* sub = nullptr;
  BOOST_REQUIRE(js_SubscribeSync(&sub, js, "ferry.ev.>", nullptr, &so, &jerr) == NATS_OK);
  std::vector<std::pair<std::string, uint64_t>> out;
  while (out.size() < total) {
    natsMsg* msg = nullptr;
    if (natsSubscription_NextMsg(&msg, sub, 5000) != NATS_OK)
      break;
    std::string data(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
    auto env = sc::verify_envelope(data);
    BOOST_REQUIRE(env.ok());
    out.emplace_back((*env)->stream_id()->str(), (*env)->sequence());
    natsMsg_Destroy(msg);
  }
  BOOST_TEST(out.size() == total, "read " << out.size() << " of " << total << " messages");
  natsSubscription_Destroy(sub);
  jsCtx_Destroy(js);
  natsConnection_Destroy(nc);
  return out;
}

/// Every (stream, seq) of the journal exactly once, in per-stream order.
void check_exactly_once(const std::vector<std::pair<std::string, uint64_t>>& got,
                        const std::map<std::string, uint64_t>& expected_highest) {
  std::map<std::string, uint64_t> last;
  uint64_t total = 0;
  for (const auto& [stream, seq] : got) {
    auto& l = last[stream];
    BOOST_REQUIRE_MESSAGE(seq == l + 1, stream << ": seq " << seq << " after " << l
                                               << " (duplicate, gap or out of order)");
    l = seq;
    ++total;
  }
  uint64_t expected_total = 0;
  for (const auto& [stream, highest] : expected_highest) {
    BOOST_TEST(last[stream] == highest, stream << " ends at " << last[stream]);
    expected_total += highest;
  }
  BOOST_TEST(total == expected_total);
}

}  // namespace

BOOST_AUTO_TEST_CASE(subjects_follow_the_stream_kind_and_id) {
  BOOST_TEST(ferry::actors::event_subject("task-7f3a") == "ferry.ev.task.7f3a");
  BOOST_TEST(ferry::actors::event_subject("tokens") == "ferry.ev.tokens");
  BOOST_TEST(ferry::actors::event_subject("sandbox-a.b-c") == "ferry.ev.sandbox.a_b-c");
}

BOOST_AUTO_TEST_CASE(events_reach_jetstream_and_core_subscribers_in_order) {
  temp_dir dir;
  auto nats = ferry::actors::start_embedded_nats("nats-server", dir.path / "nats");
  BOOST_REQUIRE_MESSAGE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  auto store = open_store(dir.path / "journal");
  auto bus = ferry::actors::connect_nats((*nats)->url());
  BOOST_REQUIRE(bus.ok());
  std::atomic<int> live{0};
  auto sub = (*bus)->subscribe("ferry.ev.task.live", [&](std::string_view, std::string_view) {
    ++live;
  });
  BOOST_REQUIRE(sub.ok());

  ferry::actors::outbox_options o;
  o.nats_url = (*nats)->url();
  auto relay = ferry::actors::start_outbox_relay(*store, o);
  BOOST_REQUIRE_MESSAGE(relay.ok(), (relay.ok() ? "" : relay.error().message));
  std::map<std::string, uint64_t> highest;
  uint64_t last = 0;
  for (int s = 0; s < 5; ++s) {
    std::string stream = "task-s" + std::to_string(s);
    last = append_events(*store, stream, 200);
    highest[stream] = 200;
  }
  last = std::max(last, append_events(*store, "task-live", 30));
  highest["task-live"] = 30;
  BOOST_REQUIRE_MESSAGE((*relay)->wait_for(last, 30s),
                        "relay stuck at " << (*relay)->stats().cursor << " of " << last
                                          << ": " << (*relay)->stats().last_error);
  check_exactly_once(read_jetstream((*nats)->url(), o.jetstream_stream), highest);
  for (int i = 0; i < 100 && live < 30; ++i)
    std::this_thread::sleep_for(20ms);
  BOOST_TEST(live.load() == 30, "a core subscriber of ferry.ev.task.live got " << live);
}

BOOST_AUTO_TEST_CASE(server_restarts_lose_and_duplicate_nothing_and_never_block_appends) {
  // 50 streams, 100k events, the server stopped and restarted twice while appending.
  temp_dir dir;
  auto nats = ferry::actors::start_embedded_nats("nats-server", dir.path / "nats");
  BOOST_REQUIRE_MESSAGE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  const std::string url = (*nats)->url();
  auto store = open_store(dir.path / "journal");
  ferry::actors::outbox_options o;
  o.nats_url = url;
  o.ack_wait = 2000ms;
  auto relay = ferry::actors::start_outbox_relay(*store, o);
  BOOST_REQUIRE(relay.ok());

  constexpr int streams = 50, per_stream = 2000;
  std::atomic<uint64_t> last{0};
  std::atomic<int> writers_done{0};
  std::vector<std::thread> writers;
  for (int w = 0; w < 5; ++w)
    writers.emplace_back([&, w] {
      for (int s = w; s < streams; s += 5) {
        auto p = append_events(*store, "task-r" + std::to_string(s), per_stream);
        uint64_t cur = last.load();
        while (p > cur && !last.compare_exchange_weak(cur, p)) {
        }
      }
      ++writers_done;
    });

  for (int restart = 0; restart < 2; ++restart) {
    std::this_thread::sleep_for(300ms);
    if (restart == 1) {
      // The second time the server dies mid-stream (SIGKILL): acknowledgements in flight are
      // lost, so the relay must re-send, and JetStream must drop what it already stored.
      std::ifstream pid_file(dir.path.string() + "/nats.pid");
      pid_t pid = 0;
      BOOST_REQUIRE(pid_file >> pid);
      BOOST_REQUIRE(::kill(pid, SIGKILL) == 0);
    }
    (*nats)->stop();
    // Appends go on while NATS is down: they must not wait for it.
    auto before = store->last_position();
    std::this_thread::sleep_for(500ms);
    BOOST_TEST_MESSAGE("restart " << restart + 1 << ": " << store->last_position() - before
                                  << " events appended while NATS was down");
    if (writers_done.load() < 5)
      BOOST_TEST(store->last_position() > before, "appends stalled while NATS was down");
    nats = ferry::actors::start_embedded_nats("nats-server", dir.path / "nats", port_of(url));
    BOOST_REQUIRE_MESSAGE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  }
  for (auto& t : writers)
    t.join();
  const uint64_t end = store->last_position();
  BOOST_TEST(end == uint64_t{streams} * per_stream);
  BOOST_REQUIRE_MESSAGE((*relay)->wait_for(end, 120s),
                        "relay stuck at " << (*relay)->stats().cursor << " of " << end << ": "
                                          << (*relay)->stats().last_error);
  BOOST_TEST_MESSAGE("relay: started over from its cursor " << (*relay)->stats().retries
                                                            << " time(s)");
  std::map<std::string, uint64_t> highest;
  for (int s = 0; s < streams; ++s)
    highest["task-r" + std::to_string(s)] = per_stream;
  check_exactly_once(read_jetstream(url, o.jetstream_stream), highest);
}

BOOST_AUTO_TEST_CASE(a_restarted_relay_resumes_from_its_saved_cursor) {
  temp_dir dir;
  auto nats = ferry::actors::start_embedded_nats("nats-server", dir.path / "nats");
  BOOST_REQUIRE(nats.ok());
  auto store = open_store(dir.path / "journal");
  ferry::actors::outbox_options o;
  o.nats_url = (*nats)->url();
  uint64_t first = 0;
  {
    auto relay = ferry::actors::start_outbox_relay(*store, o);
    BOOST_REQUIRE(relay.ok());
    first = append_events(*store, "task-c", 500);
    BOOST_REQUIRE((*relay)->wait_for(first, 30s));
  }  // destroyed: saves its cursor
  auto saved = store->load_snapshot("outbox-FERRY_EVENTS");
  BOOST_REQUIRE(saved.ok() && saved->has_value());
  BOOST_TEST((*saved)->sequence == first);
  auto last = append_events(*store, "task-c", 300);
  auto relay = ferry::actors::start_outbox_relay(*store, o);
  BOOST_REQUIRE(relay.ok());
  BOOST_REQUIRE((*relay)->wait_for(last, 30s));
  BOOST_TEST((*relay)->stats().published == 300u,
             "a restarted relay re-sent what was acknowledged");
  check_exactly_once(read_jetstream(o.nats_url, o.jetstream_stream), {{"task-c", 800}});
}
