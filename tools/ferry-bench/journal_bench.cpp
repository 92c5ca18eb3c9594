#include "journal_bench.h"

#include <sys/prctl.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "ferry/schemas/events.h"

namespace ferry::bench {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using storage::append_result;
using storage::event_store;
using storage::expected_version;

namespace {

/// How long a phase waits for outstanding acknowledgements before calling the journal stuck.
constexpr auto drain_timeout = 60s;

result<std::unique_ptr<event_store>> open_store(const fs::path& dir, storage::durability d) {
  storage::journal_options opts;
  opts.dir = dir;
  opts.durability = d;
  return storage::open_journal(opts);
}

/// The expected version of a writer that has appended `version` events to its stream so far.
expected_version expect(uint64_t version) {
  return version == 0 ? expected_version::no_stream() : expected_version::exact(version);
}

/// `task-<tag>-NNNN`: every phase's names have the same length, so its events the same size.
std::string stream_name(char tag, int index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "task-%c-%04d", tag, index);
  return buf;
}

/// For a journal that stops acknowledging while callbacks still point at the phase's state:
/// unwinding would free that state under them.
[[noreturn]] void abandon(const std::string& why) {
  std::fprintf(stderr, "ferry-bench: %s; giving up\n", why.c_str());
  std::abort();
}

std::vector<std::string> one(std::string envelope) {
  std::vector<std::string> batch;
  batch.push_back(std::move(envelope));
  return batch;
}

/// Counts outstanding asynchronous work and remembers the first error; the driver waits on it.
class completion_gate {
 public:
  void add(int n = 1) {
    std::lock_guard lock(mu_);
    outstanding_ += n;
  }
  void done() {
    std::lock_guard lock(mu_);
    if (--outstanding_ == 0)
      cv_.notify_all();
  }
  void fail(std::string message) {
    std::lock_guard lock(mu_);
    if (error_.empty())
      error_ = std::move(message);
    failed_.store(true);
    cv_.notify_all();
  }
  bool failed() const { return failed_.load(); }
  /// Waits until at most `limit` units are outstanding (or an error); false on timeout.
  bool wait_at_most(int limit, std::chrono::seconds timeout = drain_timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return outstanding_ <= limit || !error_.empty(); });
  }
  /// Waits until nothing is outstanding, errors or not; false on timeout.
  bool drain(std::chrono::seconds timeout = drain_timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return outstanding_ == 0; });
  }
  /// Sleeps up to `d`, waking early on an error.
  void sleep(std::chrono::duration<double> d) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, d, [&] { return !error_.empty(); });
  }
  std::string error() const {
    std::lock_guard lock(mu_);
    return error_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int outstanding_ = 0;  // guarded by mu_
  std::string error_;    // guarded by mu_
  std::atomic<bool> failed_{false};
};

/// The async closed loop. Each stream's state is touched only by the callback of its one
/// outstanding append (and by the driver before the first and after the last), so it needs no
/// lock: the journal's queue orders the accesses.
class closed_loop_driver {
 public:
  closed_loop_driver(event_store& store, int streams, size_t event_bytes, char tag)
    : store_(store) {
    for (int i = 0; i < streams; ++i)
      streams_.push_back(std::make_unique<stream>(stream_name(tag, i), event_bytes));
  }

  throughput run(const phase_timing& timing) {
    gate_.add(static_cast<int>(streams_.size()));
    for (auto& s : streams_)
      issue(*s);
    gate_.sleep(timing.warmup);
    auto start = phase_probe::take(acked_.load());
    recording_ = true;
    gate_.sleep(timing.measure);
    recording_ = false;
    auto end = phase_probe::take(acked_.load());
    stopping_ = true;
    throughput out = end.since(start);
    if (!gate_.drain())
      abandon("closed loop: appends still unacknowledged 60 s after the phase ended");
    if (gate_.failed())
      out.error = gate_.error();
    std::vector<int64_t> all;
    for (auto& s : streams_)
      all.insert(all.end(), s->latencies_ns.begin(), s->latencies_ns.end());
    out.latency = summarize(all);
    return out;
  }

 private:
  struct stream {
    stream(std::string name, size_t event_bytes) : events(std::move(name), event_bytes) {
      latencies_ns.reserve(1 << 14);
    }
    event_factory events;
    uint64_t version = 0;
    bench_clock::time_point sent;
    std::vector<int64_t> latencies_ns;
  };

  void issue(stream& s) {
    s.sent = bench_clock::now();
    store_.append_async(s.events.stream(), one(s.events.make(s.version + 1)), expect(s.version),
                        [this, &s](result<append_result> outcome, std::vector<std::string>) {
                          on_ack(s, outcome);
                        });
  }

  // Runs on the journal's commit thread: short, never blocks.
  void on_ack(stream& s, const result<append_result>& outcome) {
    auto now = bench_clock::now();
    if (!outcome) {
      gate_.fail(s.events.stream() + ": append of sequence " + std::to_string(s.version + 1) +
                 " failed: " + outcome.error().message);
      gate_.done();
      return;
    }
    s.version = outcome->last_sequence;
    acked_.fetch_add(1, std::memory_order_relaxed);
    if (recording_.load(std::memory_order_relaxed))
      s.latencies_ns.push_back(std::chrono::nanoseconds(now - s.sent).count());
    if (stopping_.load(std::memory_order_relaxed) || gate_.failed())
      gate_.done();
    else
      issue(s);
  }

  event_store& store_;
  std::vector<std::unique_ptr<stream>> streams_;
  std::atomic<uint64_t> acked_{0};
  std::atomic<bool> recording_{false};
  std::atomic<bool> stopping_{false};
  completion_gate gate_;
};

}  // namespace

throughput journal_closed_loop_async(const fs::path& dir, storage::durability durability,
                                     int streams, size_t event_bytes,
                                     const phase_timing& timing) {
  auto store = open_store(dir, durability);
  if (!store)
    return throughput::failure("open_journal " + dir.string() + ": " + store.error().message);
  auto driver = std::make_unique<closed_loop_driver>(
    **store, streams, event_bytes,
    durability == storage::durability::fsync ? 'a' : 'p');
  throughput out = driver->run(timing);
  // Close the journal (which joins its commit thread) before the driver its callbacks use.
  store->reset();
  return out;
}

throughput journal_closed_loop_threads(const fs::path& dir, int streams, size_t event_bytes,
                                       const phase_timing& timing) {
  auto store = open_store(dir, storage::durability::fsync);
  if (!store)
    return throughput::failure("open_journal " + dir.string() + ": " + store.error().message);
  struct writer {
    writer(std::string name, size_t event_bytes) : events(std::move(name), event_bytes) {}
    event_factory events;
    uint64_t version = 0;
  };
  std::vector<std::unique_ptr<writer>> writers;
  for (int i = 0; i < streams; ++i)
    writers.push_back(std::make_unique<writer>(stream_name('t', i), event_bytes));
  event_store& journal = **store;
  return run_closed_loop_threads(streams, timing, [&](int i) -> std::string {
    writer& w = *writers[static_cast<size_t>(i)];
    auto batch = one(w.events.make(w.version + 1));
    auto r = journal.append(w.events.stream(), batch, expect(w.version));
    if (!r)
      return w.events.stream() + ": append of sequence " + std::to_string(w.version + 1) +
             " failed: " + r.error().message;
    w.version = r->last_sequence;
    return {};
  });
}

open_loop_result journal_open_loop(const fs::path& dir, double rate, int streams,
                                   size_t event_bytes, const phase_timing& timing) {
  open_loop_result out;
  out.offered_rate = rate;
  auto store = open_store(dir, storage::durability::fsync);
  if (!store) {
    out.error = "open_journal " + dir.string() + ": " + store.error().message;
    return out;
  }

  std::vector<event_factory> factories;
  std::vector<uint64_t> issued(static_cast<size_t>(streams), 0);
  for (int i = 0; i < streams; ++i)
    factories.emplace_back(stream_name('o', i), event_bytes);

  const auto period = std::chrono::duration<double>(1.0 / rate);
  const auto first_measured = static_cast<uint64_t>(timing.warmup.count() * rate);
  const auto total = first_measured + static_cast<uint64_t>(timing.measure.count() * rate);
  // One slot per event, written by its callback only; read after the drain.
  std::vector<int64_t> latency_ns(total, -1);
  std::atomic<uint64_t> acked{0};
  completion_gate gate;

  // The default 50 µs timer slack would add up to that much lag to every scheduled send.
  const int old_slack = prctl(PR_GET_TIMERSLACK, 0UL, 0UL, 0UL, 0UL);
  prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
  const auto start = bench_clock::now() + 10ms;
  auto deadline_of = [&](uint64_t i) {
    return start +
           std::chrono::duration_cast<bench_clock::duration>(period * static_cast<double>(i));
  };
  phase_probe window_start;
  bench_clock::duration max_lag{0};
  uint64_t sent = 0;
  for (uint64_t i = 0; i < total && !gate.failed(); ++i) {
    const auto deadline = deadline_of(i);
    if (bench_clock::now() < deadline)
      std::this_thread::sleep_until(deadline);
    if (i == first_measured)
      window_start = phase_probe::take(acked.load());
    auto s = static_cast<size_t>(i % static_cast<uint64_t>(streams));
    const uint64_t version = issued[s]++;
    gate.add();
    store.value()->append_async(
      factories[s].stream(), one(factories[s].make(version + 1)), expect(version),
      [&, i, deadline, s, version](result<append_result> outcome, std::vector<std::string>) {
        auto now = bench_clock::now();
        if (outcome) {
          latency_ns[i] = std::chrono::nanoseconds(now - deadline).count();
          acked.fetch_add(1, std::memory_order_relaxed);
        } else {
          gate.fail(factories[s].stream() + ": append of sequence " +
                    std::to_string(version + 1) + " failed: " + outcome.error().message);
        }
        gate.done();
      });
    ++sent;
    max_lag = std::max(max_lag, bench_clock::now() - deadline);
  }
  if (old_slack > 0)
    prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(old_slack), 0UL, 0UL, 0UL);
  if (!gate.drain())
    abandon("open loop: appends still unacknowledged 60 s after the last was sent");
  auto window_end = phase_probe::take(acked.load());
  if (gate.failed())
    out.error = gate.error();
  else if (sent > first_measured) {
    out.window = window_end.since(window_start);
    std::vector<int64_t> measured(latency_ns.begin() + static_cast<std::ptrdiff_t>(first_measured),
                                  latency_ns.end());
    out.latency = summarize(measured);
    // Acknowledgements from the first measured send until the last one arrived.
    out.achieved_rate = out.window.events_per_second();
  }
  out.max_send_lag_us = std::chrono::duration<double, std::micro>(max_lag).count();
  store->reset();
  return out;
}

replay_result journal_replay(const fs::path& dir, uint64_t events, uint64_t read_batch,
                             size_t event_bytes) {
  replay_result out;
  out.events = events;
  auto opened = open_store(dir, storage::durability::fsync);
  if (!opened) {
    out.error = "open_journal " + dir.string() + ": " + opened.error().message;
    return out;
  }
  event_store& store = **opened;
  const event_factory factory(stream_name('r', 0), event_bytes);
  const std::string& stream = factory.stream();

  // Fill: batches of up to 256 events, up to 8 appends in flight, exact expected versions (one
  // thread issues them, so they complete in order).
  {
    constexpr uint64_t fill_batch = 256;
    constexpr int max_in_flight = 8;
    completion_gate gate;
    auto start = phase_probe::take(0);
    uint64_t written = 0;
    while (written < events && !gate.failed()) {
      const uint64_t n = std::min(fill_batch, events - written);
      std::vector<std::string> batch;
      batch.reserve(n);
      for (uint64_t k = 1; k <= n; ++k)
        batch.push_back(factory.make(written + k));
      if (!gate.wait_at_most(max_in_flight - 1))
        abandon("replay fill: the journal acknowledged nothing for 60 s");
      gate.add();
      store.append_async(stream, std::move(batch), expect(written),
                         [&gate, written](result<append_result> r, std::vector<std::string>) {
                           if (!r)
                             gate.fail("replay fill: append after sequence " +
                                       std::to_string(written) + ": " + r.error().message);
                           gate.done();
                         });
      written += n;
    }
    if (!gate.drain())
      abandon("replay fill: appends still unacknowledged 60 s after the last was sent");
    if (gate.failed()) {
      out.error = gate.error();
      return out;
    }
    out.fill = phase_probe::take(events).since(start);
  }
  if (auto f = store.flush(); !f) {
    out.error = "flush: " + f.error().message;
    return out;
  }

  auto check_count = [&](std::string_view what, uint64_t got) {
    if (got != events && out.error.empty())
      out.error = std::string(what) + " returned " + std::to_string(got) + " events, expected " +
                  std::to_string(events);
  };

  // for_each: the replay fast path. The visitor reads a field so the work is not optimised away.
  uint64_t checksum = 0;
  auto visit_all = [&]() -> result<uint64_t> {
    return store.for_each(stream, storage::read_range{},
                          [&](const events::v1::Envelope& e, std::string_view bytes) {
                            checksum += e.sequence() + bytes.size();
                            return true;
                          });
  };
  if (auto warm = visit_all(); !warm) {
    out.error = "for_each (warm-up): " + warm.error().message;
    return out;
  }
  {
    auto start = phase_probe::take(0);
    auto n = visit_all();
    if (!n) {
      out.error = "for_each: " + n.error().message;
      return out;
    }
    out.for_each = phase_probe::take(*n).since(start);
    check_count("for_each", *n);
  }

  {
    auto start = phase_probe::take(0);
    uint64_t n = 0;
    for (uint64_t from = 1;;) {
      storage::read_range range;
      range.from = from;
      range.max_count = read_batch;
      auto batch = store.read_stream(stream, range);
      if (!batch) {
        out.error = "read_stream from " + std::to_string(from) + ": " + batch.error().message;
        return out;
      }
      for (const auto& bytes : *batch)
        checksum += bytes.size();
      n += batch->size();
      from += batch->size();
      if (batch->size() < read_batch)
        break;
    }
    out.read_stream = phase_probe::take(n).since(start);
    check_count("read_stream", n);
  }

  {
    auto start = phase_probe::take(0);
    uint64_t n = 0;
    for (uint64_t from = 1;;) {
      auto batch = store.read_all(from, read_batch);
      if (!batch) {
        out.error = "read_all from " + std::to_string(from) + ": " + batch.error().message;
        return out;
      }
      if (batch->empty())
        break;
      for (const auto& bytes : *batch)
        checksum += bytes.size();
      n += batch->size();
      // Positions may have gaps in general; the next read starts after the last one returned.
      auto last = schemas::verify_envelope(batch->back());
      if (!last) {
        out.error = "read_all: last event of a batch does not verify: " + last.error().message;
        return out;
      }
      from = (*last)->position() + 1;
      if (batch->size() < read_batch)
        break;
    }
    out.read_all = phase_probe::take(n).since(start);
    check_count("read_all", n);
  }
  if (checksum == 0)
    out.error = "replay read nothing";
  opened->reset();
  return out;
}

}  // namespace ferry::bench
