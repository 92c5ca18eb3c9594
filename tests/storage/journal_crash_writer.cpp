// journal_crash_writer: the victim of journal_crash_test. Appends batches to a journal as fast as
// it can until it is killed, and reports every acknowledged append on stdout.
//
//   journal_crash_writer <journal-dir> <seed> <fsync|periodic>
//
// Four threads each own two streams (`task-crash-<thread>-<k>`; one live writer per stream, as
// the journal requires) and append batches of 1–5 TaskStateChanged events with exact expected
// versions they track themselves, starting from highest_sequence. Event i of a batch of n has the
// id "<batch>-<i>" and the reason "batch <batch> <i> of <n>", where <batch> is unique across runs
// (seed, thread, counter), so the test can check that no batch was stored partially. Every
// stream but task-crash-0-1 now and then deletes its old events (retention), so deletions
// are crashed too.
//
// Output, one line per acknowledged operation, flushed before the next one starts:
//   ready
//   ack <stream> <first_seq> <last_seq>
//   del <stream> <to_sequence>
// Any failure is printed to stderr and exits with status 3 (the test expects only SIGKILL).
#include <stdio.h>
#include <stdlib.h>

#include <atomic>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace {

namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;
using namespace ferry::storage;

constexpr int threads = 4;
constexpr int streams_per_thread = 2;

std::mutex out_mutex;

/// One line, written and flushed whole (lines are far below PIPE_BUF, so each is one write).
void say(const std::string& line) {
  std::lock_guard lock(out_mutex);
  fputs(line.c_str(), stdout);
  fputc('\n', stdout);
  fflush(stdout);
}

[[noreturn]] void die(const std::string& what) {
  {
    std::lock_guard lock(out_mutex);
    fprintf(stderr, "journal_crash_writer: %s\n", what.c_str());
    fflush(stderr);
  }
  _exit(3);
}

void run(event_store& j, int thread, const std::string& seed) {
  std::vector<std::string> streams;
  std::vector<uint64_t> highest;
  std::vector<uint64_t> deleted_to;
  for (int k = 0; k < streams_per_thread; ++k) {
    streams.push_back("task-crash-" + std::to_string(thread) + "-" + std::to_string(k));
    auto h = j.highest_sequence(streams.back());
    if (!h)
      die("highest_sequence " + streams.back() + ": " + h.error().message);
    highest.push_back(*h);
    auto info = j.info(streams.back());
    if (!info)
      die("info " + streams.back() + ": " + info.error().message);
    deleted_to.push_back(info->deleted_to);
  }
  std::mt19937 rng(static_cast<uint32_t>(std::stoul(seed) * 31 + thread));
  for (uint64_t counter = 0;; ++counter) {
    const size_t k = rng() % streams.size();
    const auto& stream = streams[k];
    const int n = 1 + static_cast<int>(rng() % 5);
    const std::string batch = seed + "." + std::to_string(thread) + "." + std::to_string(counter);
    std::vector<std::string> events;
    for (int i = 1; i <= n; ++i) {
      sc::envelope_meta m;
      m.stream_id = stream;
      m.user = "crash";
      m.event_id = batch + "-" + std::to_string(i);
      events.push_back(sc::task_state_changed(
        m, ev::TaskStatus::queued, ev::TaskStatus::running,
        "batch " + batch + " " + std::to_string(i) + " of " + std::to_string(n)));
    }
    auto r = j.append(stream, events, expected_version::exact(highest[k]));
    if (!r)
      die("append " + stream + " at " + std::to_string(highest[k]) + ": " + r.error().message);
    if (r->duplicate || r->first_sequence != highest[k] + 1 ||
        r->last_sequence != highest[k] + static_cast<uint64_t>(n))
      die("append " + stream + " landed at " + std::to_string(r->first_sequence) + ".." +
          std::to_string(r->last_sequence) + " after " + std::to_string(highest[k]));
    highest[k] = r->last_sequence;
    say("ack " + stream + " " + std::to_string(r->first_sequence) + " " +
        std::to_string(r->last_sequence));
    // Retention keeps the journal (and the test's checks after each kill) small; one stream
    // keeps its whole history, so every acknowledgement of every run stays checkable there.
    if (!(thread == 0 && k == 1) && highest[k] > deleted_to[k] + 40) {
      const uint64_t to = highest[k] - 10;
      auto d = j.delete_events(stream, to);
      if (!d)
        die("delete_events " + stream + " to " + std::to_string(to) + ": " + d.error().message);
      deleted_to[k] = to;
      say("del " + stream + " " + std::to_string(to));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4)
    die("usage: journal_crash_writer <journal-dir> <seed> <fsync|periodic>");
  journal_options o;
  o.dir = argv[1];
  o.durability = std::string(argv[3]) == "periodic" ? durability::periodic : durability::fsync;
  auto j = open_journal(o);
  if (!j)
    die("open_journal " + o.dir.string() + ": " + j.error().message);
  say("ready");
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] { run(**j, t, argv[2]); });
  for (auto& t : ts)
    t.join();  // never: the threads append until the process is killed
  return 0;
}
