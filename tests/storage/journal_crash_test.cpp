// Crash safety of the journal: a writer process (journal_crash_writer) appending from four
// threads (so appends share group commits) is killed with SIGKILL at a random moment, 60 times
// over the same journal, alternating fsync and periodic durability (both promise that a crash of
// the process loses nothing acknowledged). After every kill the journal is reopened and must hold
// every acknowledged event and every acknowledged deletion, no partial batch, gapless sequences
// from deleted_to + 1, strictly increasing positions, and hash chains that verify.
#define BOOST_TEST_MODULE storage_journal_crash
#include <boost/test/results_collector.hpp>
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include "journal_test_support.h"

extern char** environ;

using namespace ferry::storage;
using namespace ferry::storage::testing;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr int runs = 60;

/// What one writer run reported before it died.
struct writer_run {
  std::vector<std::string> lines;  // complete lines only
  int status = 0;                  // from waitpid
  bool saw_ready = false;
};

/// A spawned child that is killed and reaped on every path out of the test.
class child_process {
 public:
  child_process(const std::vector<std::string>& argv) {
    int fds[2];
    BOOST_REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    read_fd_ = fds[0];
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);  // dup2 clears CLOEXEC
    std::vector<char*> args;
    for (auto& a : argv)
      args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const int rc = ::posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    BOOST_REQUIRE_MESSAGE(rc == 0, "posix_spawn " << argv[0] << ": " << strerror(rc));
  }
  ~child_process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    if (read_fd_ >= 0)
      ::close(read_fd_);
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  int fd() const { return read_fd_; }

  /// SIGKILL and waitpid; returns the wait status.
  int kill_and_reap() {
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int read_fd_ = -1;
};

/// Reads what is available from `fd` until `deadline`; false on EOF.
bool read_until(int fd, clock_type::time_point deadline, std::string& buf) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now());
    if (left.count() <= 0)
      return true;
    pollfd p{fd, POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(left.count()));
    if (n <= 0)
      continue;
    char chunk[16384];
    ssize_t got = ::read(fd, chunk, sizeof chunk);
    if (got == 0)
      return false;
    if (got > 0)
      buf.append(chunk, static_cast<size_t>(got));
  }
}

/// Runs the writer and kills it `kill_after` after it started (or after it said "ready").
writer_run run_writer(const fs::path& journal, int seed, bool periodic,
                      std::chrono::milliseconds kill_after, bool count_from_ready) {
  child_process child({FERRY_CRASH_WRITER, journal.string(), std::to_string(seed),
                       periodic ? "periodic" : "fsync"});
  std::string buf;
  bool open = true;
  auto deadline = clock_type::now() + kill_after;
  if (count_from_ready) {
    // Opening includes RocksDB's WAL recovery: give it time, then start the clock.
    const auto give_up = clock_type::now() + 20s;
    while (open && buf.find("ready\n") == std::string::npos && clock_type::now() < give_up)
      open = read_until(child.fd(), std::min(give_up, clock_type::now() + 20ms), buf);
    deadline = clock_type::now() + kill_after;
  }
  if (open)
    open = read_until(child.fd(), deadline, buf);
  writer_run out;
  out.status = child.kill_and_reap();
  if (open)  // the child is gone: whatever it wrote is in the pipe now
    read_until(child.fd(), clock_type::now() + 5s, buf);
  std::istringstream in(buf.substr(0, buf.rfind('\n') + 1));  // a torn last line is dropped
  for (std::string line; std::getline(in, line);) {
    if (line == "ready")
      out.saw_ready = true;
    else
      out.lines.push_back(line);
  }
  return out;
}

/// "batch <id> <i> of <n>" → id, i, n.
struct batch_tag {
  std::string id;
  uint64_t index = 0;
  uint64_t size = 0;
};

batch_tag parse_tag(const std::string& reason) {
  std::istringstream in(reason);
  std::string word, of;
  batch_tag t;
  in >> word >> t.id >> t.index >> of >> t.size;
  BOOST_REQUIRE_MESSAGE(word == "batch" && of == "of" && t.index >= 1 && t.index <= t.size,
                        "unexpected reason '" << reason << "'");
  return t;
}

/// Everything acknowledged so far, over all runs.
struct acknowledged {
  std::map<std::string, std::vector<std::pair<uint64_t, uint64_t>>> batches;
  std::map<std::string, uint64_t> deleted_to;
  std::map<std::string, uint64_t> highest_seen;  // at the previous check
  uint64_t appends = 0;
};

void record(acknowledged& acked, const writer_run& run) {
  for (auto& line : run.lines) {
    std::istringstream in(line);
    std::string verb, stream;
    uint64_t a = 0, b = 0;
    in >> verb >> stream >> a;
    if (verb == "ack") {
      in >> b;
      BOOST_REQUIRE_MESSAGE(in && a >= 1 && a <= b, "bad line '" << line << "'");
      acked.batches[stream].emplace_back(a, b);
      ++acked.appends;
    } else {
      BOOST_REQUIRE_MESSAGE(verb == "del" && in, "bad line '" << line << "'");
      acked.deleted_to[stream] = std::max(acked.deleted_to[stream], a);
    }
  }
}

/// Checks the reopened journal against everything acknowledged so far.
void check_journal(event_store& j, acknowledged& acked, int run) {
  auto names = j.list_streams("task-crash-");
  BOOST_REQUIRE_MESSAGE(names.ok(), describe(names));
  const std::set<std::string> present(names->begin(), names->end());
  for (auto& [stream, batches] : acked.batches)
    BOOST_TEST(present.count(stream) == 1u, "run " << run << ": acknowledged " << stream
                                                   << " is missing from list_streams");
  uint64_t retained = 0;
  for (auto& stream : *names) {
    auto info = j.info(stream);
    BOOST_REQUIRE_MESSAGE(info.ok(), describe(info));
    const uint64_t from = info->deleted_to + 1;
    BOOST_TEST(info->highest_sequence >= acked.highest_seen[stream],
               "run " << run << ": " << stream << " highest went back from "
                      << acked.highest_seen[stream] << " to " << info->highest_sequence);
    acked.highest_seen[stream] = info->highest_sequence;
    BOOST_TEST(info->deleted_to >= acked.deleted_to[stream],
               "run " << run << ": " << stream << " lost an acknowledged deletion (deleted_to "
                      << info->deleted_to << " < " << acked.deleted_to[stream] << ")");
    BOOST_TEST(info->deleted_to <= info->highest_sequence);

    auto events = read_all_of(j, stream);
    std::vector<uint64_t> seqs;
    std::vector<batch_tag> tags;
    for (auto& e : events) {
      seqs.push_back(seq_of(e));
      tags.push_back(parse_tag(reason_of(e)));
      BOOST_TEST(id_of(e) == tags.back().id + "-" + std::to_string(tags.back().index));
    }
    BOOST_TEST_REQUIRE(seqs == iota(from, info->highest_sequence),
                       "run " << run << ": " << stream << " is not gapless from " << from);
    retained += seqs.size();

    // Batches are whole: consecutive indexes 1..n, except that retention may have cut the
    // front of the batch holding the first retained event.
    std::set<std::string> seen;
    for (size_t k = 0; k < tags.size();) {
      const auto& first = tags[k];
      BOOST_TEST(seen.insert(first.id).second, stream << ": batch " << first.id << " twice");
      BOOST_TEST((first.index == 1 || seqs[k] == from),
                 "run " << run << ": " << stream << " seq " << seqs[k] << " starts batch "
                        << first.id << " at event " << first.index << " of " << first.size);
      size_t end = k + 1;
      while (end < tags.size() && tags[end].id == first.id) {
        BOOST_TEST(tags[end].index == tags[end - 1].index + 1);
        ++end;
      }
      BOOST_TEST(tags[end - 1].index == first.size,
                 "run " << run << ": " << stream << " batch " << first.id << " ends at event "
                        << tags[end - 1].index << " of " << first.size << " (partial batch)");
      k = end;
    }

    // Every acknowledged append is there, as the batch it was.
    for (auto [a, b] : acked.batches[stream]) {
      BOOST_TEST(b <= info->highest_sequence,
                 "run " << run << ": acknowledged " << stream << " " << a << ".." << b
                        << " lost (highest " << info->highest_sequence << ")");
      if (b < from || b > info->highest_sequence)
        continue;
      const auto& last = tags[b - from];
      BOOST_TEST((last.index == last.size && last.size == b - a + 1),
                 stream << " " << a << ".." << b << " is not the acknowledged batch");
    }
  }

  auto all = j.read_all(1, std::numeric_limits<uint64_t>::max());
  BOOST_REQUIRE_MESSAGE(all.ok(), describe(all));
  BOOST_TEST(all->size() == retained, "read_all and the streams disagree");
  uint64_t prev = 0;
  for (auto& e : *all) {
    const uint64_t p = pos_of(e);
    BOOST_TEST(p > prev, "run " << run << ": position " << p << " after " << prev);
    prev = p;
  }
  BOOST_TEST(j.last_position() >= prev);

  auto report = j.verify("");
  BOOST_REQUIRE_MESSAGE(report.ok(), describe(report));
  for (auto& p : report->problems)
    BOOST_ERROR("run " << run << ": verify: " << p.stream << " seq " << p.sequence << ": "
                       << p.reason);
  BOOST_TEST(report->events_checked == retained);
}

bool current_test_passing() {
  namespace ut = boost::unit_test;
  return ut::results_collector.results(ut::framework::current_test_case().p_id).passed();
}

}  // namespace

BOOST_AUTO_TEST_CASE(killed_writers_lose_nothing_acknowledged_and_leave_no_partial_batch) {
  temp_dir dir;
  acknowledged acked;
  std::mt19937 rng(std::random_device{}());
  const int seed_base = static_cast<int>(rng() % 100000) * 1000;
  int runs_with_acks = 0;
  const auto started = clock_type::now();
  for (int run = 0; run < runs; ++run) {
    const bool periodic = run % 2 == 1;
    // Every fourth run counts from the spawn, so some kills land in open/WAL recovery.
    const bool from_ready = run % 4 != 0;
    const auto kill_after = std::chrono::milliseconds(20 + rng() % 131);
    auto w = run_writer(dir.journal(), seed_base + run, periodic, kill_after, from_ready);
    BOOST_REQUIRE_MESSAGE(WIFSIGNALED(w.status) && WTERMSIG(w.status) == SIGKILL,
                          "run " << run << ": the writer ended by itself (status " << w.status
                                 << "); see its stderr above");
    record(acked, w);
    if (!w.lines.empty())
      ++runs_with_acks;
    BOOST_TEST_MESSAGE("run " << run << (periodic ? " periodic" : " fsync") << " killed after "
                              << kill_after.count() << " ms" << (from_ready ? " from ready" : "")
                              << ": " << w.lines.size() << " acks");
    if (!fs::exists(dir.journal() / "CURRENT"))
      continue;  // killed before the journal was even created
    auto j = open_store(dir.journal());
    check_journal(*j, acked, run);
    if (!current_test_passing())
      break;  // the first broken run says it all; later ones would repeat it
  }
  BOOST_TEST_MESSAGE(acked.appends << " acknowledged appends in " << runs_with_acks << " of "
                                   << runs << " runs, "
                                   << std::chrono::duration_cast<std::chrono::seconds>(
                                        clock_type::now() - started).count() << " s");
  // Otherwise the test proved nothing.
  BOOST_TEST(runs_with_acks >= runs / 2,
             "only " << runs_with_acks << " runs acknowledged anything");
  BOOST_TEST(acked.appends >= 200u);
  BOOST_TEST(!acked.deleted_to.empty(), "no deletion was ever acknowledged");
}
