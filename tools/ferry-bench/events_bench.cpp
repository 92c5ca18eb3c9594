// ferry-bench events: end-to-end event latency — a command to an actor, persisted (fsync),
// carried by the outbox relay to NATS (JetStream), received by a core subscriber — at fixed
// offered rates over 50 concurrent task streams, next to a raw NATS publish→receive and a raw
// synced RocksDB write measured in the same run.
//
// The actors are persistent actors on the same base as the task, session and sandbox actors
// (actors/src/persistent.h: exact expected versions, one persist in flight with the stash,
// apply, snapshots every 64 events); each command persists one output chunk that carries its
// send time.

#include "events_bench.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <caf/all.hpp>
#include <rocksdb/db.h>

#include "bench_support.h"
#include "ferry/actors/bus.h"
#include "ferry/actors/outbox.h"
#include "ferry/actors/tasks.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"
#include "persistent.h"  // private to actors/: the persistent actor base

namespace ferry::bench {

namespace {

namespace ev = ferry::events::v1;
using clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now().time_since_epoch())
    .count();
}

/// Latencies of messages that carry their send time.
struct sink {
  std::mutex mtx;
  std::vector<int64_t> samples;
  std::atomic<bool> recording{false};
  std::atomic<uint64_t> received{0};

  void add(int64_t sent_ns) {
    const int64_t lat = now_ns() - sent_ns;
    received.fetch_add(1);
    if (!recording.load())
      return;
    std::lock_guard<std::mutex> guard(mtx);
    samples.push_back(lat);
  }

  std::vector<int64_t> take() {
    std::lock_guard<std::mutex> guard(mtx);
    return std::move(samples);
  }
};

/// When each event's durable answer came, by its send time: the subscriber subtracts it from
/// its own arrival time, the second half of the path (relay → JetStream → subscriber).
struct answer_times {
  std::mutex mtx;
  std::unordered_map<int64_t, int64_t> at;

  void add(int64_t sent_ns) {
    const int64_t t = now_ns();
    std::lock_guard<std::mutex> guard(mtx);
    at.emplace(sent_ns, t);
  }
  /// The durable answer's time for `sent_ns`, 0 when it came after the event (or not at all).
  int64_t take(int64_t sent_ns) {
    std::lock_guard<std::mutex> guard(mtx);
    auto it = at.find(sent_ns);
    if (it == at.end())
      return 0;
    int64_t t = it->second;
    at.erase(it);
    return t;
  }
};

/// The send time an event carries in its output chunk (8 bytes).
int64_t sent_time_of(std::string_view payload) {
  std::string copy(payload);  // aligned for the verifier
  auto env = schemas::verify_envelope(copy);
  if (!env || (*env)->event_type() != ev::Event::OutputChunk)
    return 0;
  auto* data = (*env)->event_as_OutputChunk()->data();
  if (!data || data->size() != sizeof(int64_t))
    return 0;
  int64_t t = 0;
  std::memcpy(&t, data->data(), sizeof t);
  return t;
}

/// Open loop: calls send() `rate` times a second for warmup + measure; `sink.recording` is on
/// during the measured part only. Returns how many sends were measured.
///
/// The generator wakes once per `tick` and sends every event that has come due since, each
/// stamped by send() with its own send time: sleeping once per event (100 µs apart at 10k/s)
/// costs a whole CPU here in timer wake-ups, which the path being measured would then lack.
uint64_t drive(double rate, double warmup_s, double measure_s, sink& s,
               const std::function<void(uint64_t i)>& send,
               std::chrono::microseconds tick = std::chrono::microseconds(1000)) {
  const auto start = clock::now();
  const auto period = std::chrono::duration<double>(1.0 / rate);
  const uint64_t warm = static_cast<uint64_t>(warmup_s * rate);
  const uint64_t total = warm + static_cast<uint64_t>(measure_s * rate);
  auto due = [&](uint64_t i) {
    return start + std::chrono::duration_cast<clock::duration>(period * i);
  };
  for (uint64_t i = 0; i < total;) {
    std::this_thread::sleep_until(std::max(due(i), clock::now() + tick));
    for (const auto now = clock::now(); i < total && due(i) <= now; ++i) {
      if (i == warm)
        s.recording = true;
      send(i);
    }
  }
  return total - warm;
}

void wait_until_received(sink& s, uint64_t expected, std::chrono::seconds limit) {
  const auto deadline = clock::now() + limit;
  while (s.received.load() < expected && clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  s.recording = false;
}

struct row {
  std::string name;
  /// ferry: end to end; durable: the same events from send to the journal's answer (fsync).
  latency_summary ferry, durable, relayed, nats, rocks;
  uint64_t lost = 0;
};

/// A persistent actor that records one output chunk per command.
struct bench_state {
  actors::journal_slot journal;
  uint64_t chunks = 0;

  void apply(const ev::Envelope& env) {
    if (env.event_type() == ev::Event::OutputChunk)
      ++chunks;
  }
  nlohmann::json snapshot() const { return {{"chunks", chunks}}; }
  result<void> restore(const nlohmann::json& j) {
    chunks = j.at("chunks").get<uint64_t>();
    return {};
  }
  schemas::envelope_meta meta() const {
    schemas::envelope_meta m;
    m.stream_id = journal.stream;
    m.user = "bench";
    return m;
  }
};

caf::behavior bench_actor(caf::stateful_actor<bench_state>* self, storage::event_store* store,
                          std::string stream, sink* durable, answer_times* answers) {
  auto& j = self->state.journal;
  j.store = store;
  j.stream = std::move(stream);
  return {[self, durable, answers](int64_t sent_ns) {
    std::string data(sizeof sent_ns, '\0');
    std::memcpy(data.data(), &sent_ns, sizeof sent_ns);
    actors::persist(self,
                    schemas::output_chunk(self->state.meta(), 1, ev::OutputStream::stdout, data),
                    [durable, answers, sent_ns](const storage::append_result&) {
                      answers->add(sent_ns);
                      durable->add(sent_ns);
                    });
  }};
}

}  // namespace

int run_events_bench(const events_options& o) {
  temp_dir tmp(o.dir, "ferry-bench-events-");
  if (tmp.path().empty()) {
    std::fprintf(stderr, "ferry-bench: cannot make a temporary directory in %s\n",
                 o.dir.c_str());
    return 2;
  }
  auto nats = actors::start_embedded_nats(o.nats_server, tmp.path() / "nats");
  if (!nats) {
    std::fprintf(stderr, "ferry-bench: %s\n", nats.error().message.c_str());
    return 1;
  }
  storage::journal_options jo;
  jo.dir = tmp.path() / "journal";
  auto store = storage::open_journal(jo);
  if (!store) {
    std::fprintf(stderr, "ferry-bench: %s\n", store.error().message.c_str());
    return 1;
  }
  actors::outbox_options oo;
  oo.nats_url = (*nats)->url();
  if (o.duplicate_window_s > 0)
    oo.duplicate_window = std::chrono::seconds(static_cast<int64_t>(o.duplicate_window_s));
  auto relay = actors::start_outbox_relay(**store, oo);
  auto bus = actors::connect_nats((*nats)->url());
  if (!relay || !bus) {
    std::fprintf(stderr, "ferry-bench: %s\n",
                 (!relay ? relay.error() : bus.error()).message.c_str());
    return 1;
  }
  sink events_sink, durable_sink, nats_sink;
  answer_times answers;
  std::mutex second_half_mtx;
  std::vector<int64_t> second_half;  // GUARDED_BY(second_half_mtx); while events_sink records
  auto events_sub = (*bus)->subscribe("ferry.ev.bench.>", [&](std::string_view,
                                                              std::string_view payload) {
    auto t = sent_time_of(payload);
    if (!t)
      return;
    events_sink.add(t);
    if (auto answered = answers.take(t); answered && events_sink.recording.load()) {
      std::lock_guard<std::mutex> guard(second_half_mtx);
      second_half.push_back(now_ns() - answered);
    }
  });
  auto raw_sub = (*bus)->subscribe("bench.raw", [&](std::string_view, std::string_view payload) {
    int64_t t = 0;
    if (payload.size() >= sizeof t) {
      std::memcpy(&t, payload.data(), sizeof t);
      nats_sink.add(t);
    }
  });
  if (!events_sub || !raw_sub) {
    std::fprintf(stderr, "ferry-bench: cannot subscribe\n");
    return 1;
  }

  // The "tasks": one persistent actor per stream.
  caf::actor_system_config cfg;
  actors::add_message_types(cfg);
  actors::use_ferry_scheduler(cfg);
  caf::actor_system sys{cfg};
  std::vector<caf::actor> tasks;
  storage::event_store* journal = store->get();
  for (int i = 0; i < o.tasks; ++i)
    tasks.push_back(sys.spawn(bench_actor, journal, "bench-" + std::to_string(i), &durable_sink,
                            &answers));

  // Baseline: synced single-event RocksDB writes, one at a time.
  auto rocks_baseline = [&](double seconds) {
    rocksdb::Options ro;
    ro.create_if_missing = true;
    rocksdb::DB* raw = nullptr;
    std::vector<int64_t> lat;
    if (!rocksdb::DB::Open(ro, (tmp.path() / "rocks").string(), &raw).ok())
      return summarize(lat);
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    std::string value(256, 'x');
    const auto end = clock::now() + std::chrono::duration<double>(seconds);
    for (uint64_t i = 0; clock::now() < end; ++i) {
      auto t0 = now_ns();
      (void)db->Put(wo, "k" + std::to_string(i), value);
      lat.push_back(now_ns() - t0);
    }
    return summarize(lat);
  };

  std::vector<row> rows;
  for (double rate : o.rates) {
    row r;
    r.name = std::to_string(static_cast<int>(rate)) + " events/s, " + std::to_string(o.tasks) +
             " tasks";
    progress("events: " + r.name + " ...");
    uint64_t before = events_sink.received.load();
    uint64_t sent = 0;
    drive(rate, o.warmup, o.seconds, events_sink, [&](uint64_t i) {
      if (i == static_cast<uint64_t>(o.warmup * rate))
        durable_sink.recording = true;
      caf::anon_send(tasks[i % tasks.size()], static_cast<int64_t>(now_ns()));
      ++sent;
    });
    wait_until_received(events_sink, before + sent, std::chrono::seconds(10));
    durable_sink.recording = false;
    r.lost = before + sent - std::min(before + sent, events_sink.received.load());
    auto f = events_sink.take();
    r.ferry = summarize(f);
    auto d = durable_sink.take();
    r.durable = summarize(d);
    {
      std::lock_guard<std::mutex> guard(second_half_mtx);
      r.relayed = summarize(second_half);
      second_half.clear();
    }
    {
      std::lock_guard<std::mutex> guard(answers.mtx);
      answers.at.clear();
    }

    progress("events: raw NATS at the same rate ...");
    before = nats_sink.received.load();
    sent = 0;
    drive(rate, o.warmup, o.seconds, nats_sink, [&](uint64_t) {
      int64_t t = now_ns();
      (void)(*bus)->publish("bench.raw", std::string_view(reinterpret_cast<const char*>(&t),
                                                          sizeof t));
      ++sent;
    });
    wait_until_received(nats_sink, before + sent, std::chrono::seconds(10));
    auto n = nats_sink.take();
    r.nats = summarize(n);
    progress("events: raw synced RocksDB writes ...");
    r.rocks = rocks_baseline(std::min(o.seconds, 2.0));
    rows.push_back(std::move(r));
  }
  for (auto& t : tasks)
    caf::anon_send_exit(t, caf::exit_reason::user_shutdown);
  sys.await_all_actors_done();

  std::printf("ferry-bench events: command → actor → persisted (fsync) → outbox relay → NATS "
              "(JetStream) → subscriber\n");
  std::printf("%-28s %9s %9s %9s %9s %9s %9s %9s %9s %9s %8s %7s  %-12s %s\n", "offered load",
              "p50 ms", "p99 ms", "max ms", "fsync p50", "fsync p99", "relay p99", "NATS p50",
              "NATS p99",
              "RDB p99", "ratio", "lost", "target", "result");
  bool ok = true;
  for (const auto& r : rows) {
    const double base_p99 = (r.nats.p99_us + r.rocks.p99_us) / 1000.0;
    const double ratio = base_p99 > 0 ? (r.ferry.p99_us / 1000.0) / base_p99 : 0;
    const bool has_target = r.name.rfind("10000 ", 0) == 0;
    const bool pass = r.ferry.p99_us <= 5000 && r.lost == 0;
    if (has_target && !pass)
      ok = false;
    std::printf("%-28s %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %8.2f %7llu  %-12s "
                "%s\n",
                r.name.c_str(), r.ferry.p50_us / 1000.0, r.ferry.p99_us / 1000.0,
                r.ferry.max_us / 1000.0, r.durable.p50_us / 1000.0, r.durable.p99_us / 1000.0,
                r.relayed.p99_us / 1000.0,
                r.nats.p50_us / 1000.0, r.nats.p99_us / 1000.0,
                r.rocks.p99_us / 1000.0, ratio, static_cast<unsigned long long>(r.lost),
                has_target ? "p99 <= 5 ms" : "", has_target ? (pass ? "PASS" : "FAIL") : "");
  }
  std::printf("fsync p50/p99: the same events from the command to the journal's answer (durable),\n"
              "the first half of the path; relay p99: from that answer to the subscriber, the second\n"
              "half (events whose answer came first); ratio: ferry p99 / (raw NATS p99 + raw synced RocksDB "
              "write p99), same run.\n");
  return o.check && !ok ? 1 : 0;
}

}  // namespace ferry::bench
