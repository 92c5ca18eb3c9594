// The journal under concurrency: the expected-version check fences racing writers of one stream
// (exactly one wins each version); a subscription started in the middle of heavy appending sees
// every event exactly once in position order across the catch-up-to-live switch; subscriptions
// start where asked and close() wakes a blocked next(); append_async completes in call order
// with stamped envelopes; and a secondary instance sees the primary's appends after catch_up()
// but cannot write.
#define BOOST_TEST_MODULE storage_journal_concurrency
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <latch>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "journal_test_support.h"

using namespace ferry::storage;
using namespace ferry::storage::testing;
using namespace std::chrono_literals;
using ferry::errc;
using clock_type = std::chrono::steady_clock;

namespace {

/// Counts down outstanding callbacks; wait() is bounded so a lost callback fails, not hangs.
class pending {
 public:
  void add() {
    std::lock_guard lock(m_);
    ++n_;
  }
  void done() {
    std::lock_guard lock(m_);
    if (--n_ == 0)
      cv_.notify_all();
  }
  bool wait(std::chrono::seconds limit) {
    std::unique_lock lock(m_);
    return cv_.wait_for(lock, limit, [&] { return n_ == 0; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_ = 0;
};

/// Appends `count` single events spread over `task-s0..s2`; returns nothing but fails on error.
void append_spread(event_store& j, int count, int tag) {
  for (int i = 0; i < count; ++i) {
    const std::string s = "task-s" + std::to_string(i % 3);
    std::vector<std::string> e{event(s, "t" + std::to_string(tag) + "-" + std::to_string(i))};
    auto r = j.append(s, e);
    BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  }
}

/// Collects events from `sub` until it has `want` of them or `limit` passes.
std::vector<std::string> drain(subscription& sub, size_t want, std::chrono::milliseconds limit) {
  std::vector<std::string> out;
  const auto deadline = clock_type::now() + limit;
  while (out.size() < want && clock_type::now() < deadline) {
    auto got = sub.next(want - out.size(), 100ms);
    BOOST_REQUIRE_MESSAGE(got.ok(), "next: " << describe(got));
    for (auto& e : *got)
      out.push_back(std::move(e));
  }
  return out;
}

std::vector<uint64_t> positions_of(const std::vector<std::string>& events) {
  std::vector<uint64_t> out;
  for (auto& e : events)
    out.push_back(pos_of(e));
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(exactly_one_of_16_racing_writers_wins_each_version) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  constexpr int threads = 16;
  constexpr uint64_t versions = 200;
  const std::string stream = "task-race";

  std::mutex m;
  std::map<uint64_t, std::vector<int>> winners;  // sequence → threads whose append got it
  std::vector<std::string> unexpected;
  std::atomic<uint64_t> conflicts{0};
  std::latch start(threads);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int attempt = 0;; ++attempt) {
        auto h = j->highest_sequence(stream);
        if (!h.ok() || *h >= versions) {
          if (!h.ok()) {
            std::lock_guard lock(m);
            unexpected.push_back("highest_sequence: " + h.error().message);
          }
          return;
        }
        std::vector<std::string> e{event(stream, "thread " + std::to_string(t),
                                         std::to_string(t) + "." + std::to_string(attempt))};
        auto r = j->append(stream, e, expected_version::exact(*h));
        std::lock_guard lock(m);
        if (r.ok()) {
          winners[r->first_sequence].push_back(t);
          if (r->first_sequence != *h + 1 || r->duplicate)
            unexpected.push_back("exact(" + std::to_string(*h) + ") landed at " +
                                 std::to_string(r->first_sequence));
        } else if (r.error().code == errc::conflict) {
          ++conflicts;
        } else {
          unexpected.push_back(describe(r));
        }
      }
    });
  for (auto& t : ts)
    t.join();

  BOOST_TEST_MESSAGE(conflicts.load() << " conflicts among " << threads << " threads");
  BOOST_TEST(unexpected.empty(), unexpected.size() << " unexpected outcomes, first: "
                                                   << (unexpected.empty() ? "" : unexpected[0]));
  BOOST_TEST(*j->highest_sequence(stream) == versions);
  BOOST_REQUIRE(winners.size() == versions);
  for (auto& [seq, who] : winners)
    BOOST_TEST(who.size() == 1u, "version " << seq << " was won " << who.size() << " times");
  auto events = read_all_of(*j, stream);
  BOOST_REQUIRE(sequences(events) == iota(1, versions));
  for (auto& e : events)
    BOOST_TEST(reason_of(e) == "thread " + std::to_string(winners[seq_of(e)].front()),
               "event " << seq_of(e) << " is not the winner's");
}

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(a_subscriber_started_during_heavy_appending_sees_every_event_once_in_order) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  constexpr int threads = 8;
  constexpr int per_thread = 2000;
  constexpr uint64_t total = uint64_t{threads} * per_thread;

  std::atomic<int> async_failures{0};
  std::vector<std::string> errors;
  std::mutex m;
  std::vector<std::thread> writers;
  for (int t = 0; t < threads; ++t)
    writers.emplace_back([&, t] {
      const std::string stream = "task-load-" + std::to_string(t);
      std::mt19937 rng(t);
      pending in_flight;
      int written = 0;
      for (int batch = 0; written < per_thread; ++batch) {
        const int n = std::min(per_thread - written, 1 + static_cast<int>(rng() % 8));
        std::vector<std::string> events;
        for (int k = 0; k < n; ++k)
          events.push_back(event(stream, std::to_string(written + k)));
        written += n;
        if (batch % 3 == 0) {
          in_flight.add();
          j->append_async(stream, std::move(events), expected_version::any(),
                          [&](ferry::result<append_result> r, std::vector<std::string>) {
                            if (!r.ok())
                              ++async_failures;
                            in_flight.done();
                          });
        } else {
          auto r = j->append(stream, events);
          if (!r.ok()) {
            std::lock_guard lock(m);
            errors.push_back(describe(r));
          }
        }
      }
      if (!in_flight.wait(120s)) {
        std::lock_guard lock(m);
        errors.push_back("append_async callbacks missing on " + stream);
      }
    });

  // Start in the thick of it: some events on disk, many more on the way.
  const auto wait_start = clock_type::now() + 60s;
  while (j->last_position() < 500 && clock_type::now() < wait_start)
    std::this_thread::sleep_for(1ms);
  auto sub = j->subscribe(1);
  BOOST_REQUIRE(sub);
  BOOST_TEST_MESSAGE("subscribed at last position " << j->last_position());
  BOOST_TEST(sub->position() == 0u);

  uint64_t received = 0, out_of_order = 0;
  std::string first_problem;
  std::map<std::string, uint64_t> stream_seq;
  const auto deadline = clock_type::now() + 180s;
  while (received < total && clock_type::now() < deadline) {
    auto got = sub->next(1000, 200ms);
    BOOST_REQUIRE_MESSAGE(got.ok(), "next: " << describe(got));
    for (auto& bytes : *got) {
      auto* e = envelope(bytes);
      ++received;
      auto& last = stream_seq[e->stream_id()->str()];
      if (e->position() != received || e->sequence() != last + 1) {
        if (out_of_order++ == 0)
          first_problem = "event #" + std::to_string(received) + " has position " +
                          std::to_string(e->position()) + ", " + e->stream_id()->str() + " seq " +
                          std::to_string(e->sequence()) + " after " + std::to_string(last);
      }
      last = e->sequence();
    }
    if (!got->empty())
      BOOST_TEST(sub->position() == received);
  }
  for (auto& w : writers)
    w.join();

  BOOST_TEST(errors.empty(), errors.size() << " append errors, first: "
                                           << (errors.empty() ? "" : errors[0]));
  BOOST_TEST(async_failures.load() == 0);
  BOOST_TEST(j->last_position() == total);
  BOOST_TEST(received == total, "received " << received << " of " << total);
  BOOST_TEST(out_of_order == 0u, out_of_order << " events out of order; first: " << first_problem);
  // It ended because it had everything: nothing more arrives.
  auto more = sub->next(100, 100ms);
  BOOST_REQUIRE(more.ok());
  BOOST_TEST(more->empty(), more->size() << " events after the last one");
}

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(a_subscription_starts_at_the_position_asked_and_continues_live) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  append_spread(*j, 100, 1);
  auto sub = j->subscribe(40);
  BOOST_REQUIRE(sub);
  BOOST_TEST(sub->position() == 39u);
  auto first = drain(*sub, 61, 10s);
  BOOST_TEST(positions_of(first) == iota(40, 100));
  BOOST_TEST(sub->position() == 100u);
  auto none = sub->next(10, 50ms);
  BOOST_REQUIRE(none.ok());
  BOOST_TEST(none->empty());
  append_spread(*j, 10, 2);
  auto live = drain(*sub, 10, 10s);
  BOOST_TEST(positions_of(live) == iota(101, 110));
  // Starting past the end waits for the next append.
  auto tail = j->subscribe(111);
  auto empty = tail->next(10, 50ms);
  BOOST_REQUIRE(empty.ok());
  BOOST_TEST(empty->empty());
  append_spread(*j, 1, 3);
  BOOST_TEST(positions_of(drain(*tail, 1, 10s)) == iota(111, 111));
  // A small max_count is honoured.
  auto early = j->subscribe(1);
  auto three = early->next(3, 1s);
  BOOST_REQUIRE(three.ok());
  BOOST_TEST(positions_of(*three) == iota(1, 3));
}

BOOST_AUTO_TEST_CASE(close_from_another_thread_wakes_a_blocked_next_with_closed) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  append_spread(*j, 5, 1);
  auto sub = j->subscribe(1);
  BOOST_REQUIRE(drain(*sub, 5, 10s).size() == 5u);

  std::promise<void> entered;
  auto blocked = std::async(std::launch::async, [&] {
    entered.set_value();
    const auto t0 = clock_type::now();
    auto r = sub->next(10, 20s);
    return std::make_pair(std::move(r), clock_type::now() - t0);
  });
  entered.get_future().wait();
  std::this_thread::sleep_for(200ms);  // let next() block
  std::thread closer([&] { sub->close(); });
  closer.join();
  BOOST_REQUIRE_MESSAGE(blocked.wait_for(5s) == std::future_status::ready,
                        "close() did not wake next() within 5 s");
  auto [r, took] = blocked.get();
  BOOST_REQUIRE_MESSAGE(!r.ok(),
                        "next() after close returned " << (r.ok() ? r->size() : 0) << " events");
  BOOST_TEST(r.error().code == errc::closed, describe(r));
  BOOST_TEST(std::chrono::duration_cast<std::chrono::milliseconds>(took).count() < 5000);
  // Later calls fail the same way, even with events available.
  append_spread(*j, 1, 2);
  auto again = sub->next(10, 0ms);
  BOOST_REQUIRE(!again.ok());
  BOOST_TEST(again.error().code == errc::closed);
}

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(append_async_from_one_thread_completes_in_call_order_with_stamped_envelopes) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  constexpr int calls = 300;
  constexpr int rejected = 150;  // this one expects a version the stream never had
  struct outcome {
    std::optional<ferry::result<append_result>> r;
    std::vector<std::string> stamped;
    std::thread::id thread;
  };
  std::vector<outcome> outcomes(calls);
  std::vector<int> order;
  std::vector<size_t> sizes(calls);
  std::mutex m;
  pending in_flight;
  std::mt19937 rng(5);
  for (int i = 0; i < calls; ++i) {
    const std::string s = "task-async-" + std::to_string(i % 3);
    const int n = 1 + static_cast<int>(rng() % 3);
    std::vector<std::string> batch;
    for (int k = 0; k < n; ++k)
      batch.push_back(event(s, std::to_string(i) + "." + std::to_string(k)));
    sizes[i] = batch.size();
    in_flight.add();
    auto expected = i == rejected ? expected_version::exact(999'999) : expected_version::any();
    j->append_async(s, std::move(batch), expected,
                    [&, i](ferry::result<append_result> r, std::vector<std::string> stamped) {
                      std::lock_guard lock(m);
                      order.push_back(i);
                      outcomes[i].r = std::move(r);
                      outcomes[i].stamped = std::move(stamped);
                      outcomes[i].thread = std::this_thread::get_id();
                      in_flight.done();
                    });
  }
  BOOST_REQUIRE_MESSAGE(in_flight.wait(60s), "not every append_async called back");

  std::vector<int> in_call_order(calls);
  std::iota(in_call_order.begin(), in_call_order.end(), 0);
  BOOST_TEST(order == in_call_order);
  uint64_t last_position = 0;
  for (int i = 0; i < calls; ++i) {
    auto& o = outcomes[i];
    BOOST_REQUIRE(o.r.has_value());
    if (i == rejected) {
      BOOST_REQUIRE(!o.r->ok());
      BOOST_TEST(o.r->error().code == errc::conflict, describe(*o.r));
      continue;
    }
    BOOST_REQUIRE_MESSAGE(o.r->ok(), "call " << i << ": " << describe(*o.r));
    auto& a = **o.r;
    BOOST_TEST(o.thread != std::this_thread::get_id(), "callback ran on the caller's thread");
    BOOST_TEST(a.first_position == last_position + 1, "call " << i << " out of order");
    last_position = a.last_position;
    BOOST_REQUIRE(o.stamped.size() == sizes[i]);
    const std::string s = "task-async-" + std::to_string(i % 3);
    auto stored = j->read_stream(s, {a.first_sequence, a.last_sequence, 100});
    BOOST_REQUIRE(stored.ok());
    BOOST_REQUIRE(stored->size() == sizes[i]);
    for (size_t k = 0; k < sizes[i]; ++k) {
      auto* e = envelope(o.stamped[k]);
      BOOST_TEST(e->stream_id()->str() == s);
      BOOST_TEST(e->sequence() == a.first_sequence + k);
      BOOST_TEST(e->position() == a.first_position + k);
      BOOST_TEST(e->timestamp_ns() > 0);
      BOOST_TEST((o.stamped[k] == (*stored)[k]), "call " << i << " event " << k
                                                         << ": stamped bytes differ from stored");
    }
  }
  BOOST_TEST(j->last_position() == last_position);
}

BOOST_AUTO_TEST_CASE(append_async_may_queue_another_from_its_callback) {
  temp_dir dir;
  auto j = open_store(dir.journal());
  std::promise<ferry::result<append_result>> second;
  auto second_done = second.get_future();
  j->append_async("task-chain", {event("task-chain", "first")}, expected_version::no_stream(),
                  [&](ferry::result<append_result> r, std::vector<std::string>) {
                    if (!r.ok()) {
                      second.set_value(r.error());
                      return;
                    }
                    j->append_async("task-chain", {event("task-chain", "second")},
                                    expected_version::exact(r->last_sequence),
                                    [&](ferry::result<append_result> r2, std::vector<std::string>) {
                                      second.set_value(std::move(r2));
                                    });
                  });
  BOOST_REQUIRE_MESSAGE(second_done.wait_for(10s) == std::future_status::ready,
                        "the append queued from a callback never completed");
  auto r = second_done.get();
  BOOST_REQUIRE_MESSAGE(r.ok(), describe(r));
  BOOST_TEST(r->first_sequence == 2u);
  BOOST_TEST(sequences(read_all_of(*j, "task-chain")) == iota(1, 2));
}

// ---------------------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(a_secondary_sees_the_primarys_appends_after_catch_up_and_cannot_write) {
  temp_dir dir;
  auto primary = open_store(dir.journal());
  append_spread(*primary, 10, 1);

  auto opened = open_journal_secondary(dir.journal(), dir.path() / "scratch");
  BOOST_REQUIRE_MESSAGE(opened.ok(), describe(opened));
  auto& secondary = *opened;
  BOOST_TEST(secondary->last_position() == 10u);
  BOOST_TEST(read_all_of(*secondary, "task-s0").size() == 4u);

  append_spread(*primary, 5, 2);
  auto c = secondary->catch_up();
  BOOST_REQUIRE_MESSAGE(c.ok(), describe(c));
  BOOST_TEST(secondary->last_position() == 15u);
  for (int s = 0; s < 3; ++s) {
    const std::string stream = "task-s" + std::to_string(s);
    BOOST_TEST(*secondary->highest_sequence(stream) == *primary->highest_sequence(stream));
    BOOST_TEST((read_all_of(*secondary, stream) == read_all_of(*primary, stream)), stream);
    BOOST_TEST((secondary->info(stream)->head_hash == primary->info(stream)->head_hash));
  }
  // ferryctl verifies through a secondary.
  auto report = secondary->verify("");
  BOOST_TEST(report.ok(), "verify on a secondary: " << describe(report));
  if (report.ok()) {
    BOOST_TEST(report->problems.empty());
    BOOST_TEST(report->events_checked == 15u);
  }

  // Writes fail with invalid_argument and change nothing. The callback first: if it never
  // comes, the blocking append() would hang, so it is not tried.
  std::promise<ferry::result<append_result>> async_done;
  secondary->append_async("task-s0", {event("task-s0", "async")}, expected_version::any(),
                          [&](ferry::result<append_result> r, std::vector<std::string>) {
                            async_done.set_value(std::move(r));
                          });
  auto f = async_done.get_future();
  const bool called_back = f.wait_for(10s) == std::future_status::ready;
  BOOST_TEST(called_back, "append_async on a secondary never called back (so the blocking "
                          "append() would hang; not tried)");
  if (called_back) {
    auto ar = f.get();
    BOOST_TEST((!ar.ok() && ar.error().code == errc::invalid_argument), describe(ar));
    std::vector<std::string> e{event("task-s0", "from the secondary")};
    auto a = secondary->append("task-s0", e);
    BOOST_REQUIRE(!a.ok());
    BOOST_TEST(a.error().code == errc::invalid_argument, describe(a));
  }
  auto d = secondary->delete_events("task-s0", 2);
  BOOST_REQUIRE(!d.ok());
  BOOST_TEST(d.error().code == errc::invalid_argument, describe(d));
  auto ss = secondary->save_snapshot({"task-s0", 1, 1, "state"});
  BOOST_REQUIRE(!ss.ok());
  BOOST_TEST(ss.error().code == errc::invalid_argument, describe(ss));
  auto ds = secondary->delete_snapshot("task-s0", 1);
  BOOST_TEST((!ds.ok() && ds.error().code == errc::invalid_argument), describe(ds));
  auto dss = secondary->delete_snapshots("task-s0", {});
  BOOST_TEST((!dss.ok() && dss.error().code == errc::invalid_argument), describe(dss));
  BOOST_TEST(primary->last_position() == 15u);
  BOOST_TEST(*primary->highest_sequence("task-s0") == 6u);  // positions 1, 4, …, 13 of 15

  // The global log reads the same on both sides.
  auto all = secondary->read_all(1, 100);
  BOOST_TEST(all.ok(), "read_all on a secondary: " << describe(all));
  if (all.ok())
    BOOST_TEST(positions_of(*all) == iota(1, 15));

  // A subscription on the secondary goes live by polling the primary.
  auto sub = secondary->subscribe(14);
  BOOST_TEST(positions_of(drain(*sub, 2, 10s)) == iota(14, 15));
  append_spread(*primary, 1, 3);
  BOOST_TEST(positions_of(drain(*sub, 1, 10s)) == iota(16, 16));
}

BOOST_AUTO_TEST_CASE(opening_a_missing_journal_is_not_found_and_a_second_writer_is_busy) {
  temp_dir dir;
  auto missing = open_journal_secondary(dir.path() / "nothing", dir.path() / "scratch");
  BOOST_REQUIRE(!missing.ok());
  BOOST_TEST(missing.error().code == errc::not_found, describe(missing));
  journal_options o;
  o.dir = dir.path() / "nothing";
  o.create_if_missing = false;
  auto no_create = open_journal(o);
  BOOST_REQUIRE(!no_create.ok());
  BOOST_TEST(no_create.error().code == errc::not_found, describe(no_create));

  auto j = open_store(dir.journal());
  journal_options again;
  again.dir = dir.journal();
  auto second = open_journal(again);
  BOOST_REQUIRE(!second.ok());
  BOOST_TEST(second.error().code == errc::busy, describe(second));
}
