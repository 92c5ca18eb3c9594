// Sandbox resource limits as cgroups Ferry owns (sandbox/src/cgroup_limits.h), on this host's
// real cgroup hierarchy (v1 or v2): the limits are written, a memory hog is OOM-killed and the
// cgroup says so, a fork bomb is stopped at the pids limit and the cgroup says so, removal kills
// what is left, orphans are removed. Each test uses a parent of its own (not "ferry"). Needs root.

#define BOOST_TEST_MODULE sandbox_cgroup_limits
#include <boost/test/unit_test.hpp>

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "cgroup_limits.h"
#include "ferry/sandbox/process.h"

namespace fs = std::filesystem;
using namespace ferry::sandbox::detail;

namespace {

std::string test_parent(const char* what) {
  return fmt::format("ferry-test-{}-{}", what, ::getpid());
}

/// Removes the test's parent directories at scope exit.
struct parent_guard {
  std::string parent;
  ~parent_guard() {
    remove_orphan_cgroups(parent, "", {});
    for (const char* c : {"", "memory/", "pids/", "cpu/", "cpu,cpuacct/"})
      ::rmdir((fs::path("/sys/fs/cgroup") / (std::string(c) + parent)).c_str());
  }
};

/// A child stopped on a pipe until go(): it runs `body` inside the cgroup it was put in.
class child {
 public:
  template <class F>
  explicit child(F body) {
    int fds[2];
    if (::pipe(fds) != 0)
      throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(fds[1]);
      char c;
      if (::read(fds[0], &c, 1) != 1)
        ::_exit(90);
      ::_exit(body());
    }
    ::close(fds[0]);
    go_ = fds[1];
  }
  ~child() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      wait();
    }
    if (go_ >= 0)
      ::close(go_);
  }
  pid_t pid() const { return pid_; }
  void go() {
    (void)!::write(go_, "g", 1);
    ::close(go_);
    go_ = -1;
  }
  /// The raw wait status.
  int wait() {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    reaped_ = true;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int go_ = -1;
  bool reaped_ = false;
};

std::string read(const fs::path& p) {
  std::string s = ferry::sandbox::read_small_file(p);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
    s.pop_back();
  return s;
}

}  // namespace

BOOST_AUTO_TEST_CASE(the_host_has_a_cgroup_hierarchy) {
  auto mode = detect_cgroup_mode();
  BOOST_TEST_MESSAGE("cgroup mode: " << (mode == cgroup_mode::v2 ? "v2" : mode == cgroup_mode::v1 ? "v1" : "none"));
  BOOST_TEST((mode != cgroup_mode::none));
}

BOOST_AUTO_TEST_CASE(limits_are_written_and_read_back) {
  parent_guard guard{test_parent("write")};
  ferry::sandbox::sandbox_limits limits;
  limits.memory_bytes = 96ull << 20;
  limits.pids = 77;
  limits.cpu_weight = 50;
  limits.cpu_millis = 1500;
  auto g = sandbox_cgroup::create(guard.parent, "box-1", limits);
  BOOST_TEST_REQUIRE(g.ok(), (g.ok() ? "" : g.error().message));
  BOOST_TEST(g->oci_path() == "/" + guard.parent + "/box-1");
  for (const auto& d : g->dirs())
    BOOST_TEST(fs::is_directory(d), d);
  if (g->mode() == cgroup_mode::v1) {
    BOOST_TEST(read(g->dirs()[0] / "memory.limit_in_bytes") == std::to_string(96ull << 20));
    BOOST_TEST(read(g->dirs()[1] / "pids.max") == "77");
    if (g->dirs().size() > 2) {
      BOOST_TEST(read(g->dirs()[2] / "cpu.shares") == "512");
      BOOST_TEST(read(g->dirs()[2] / "cpu.cfs_quota_us") == "150000");
    }
  } else {
    BOOST_TEST(read(g->dirs()[0] / "memory.max") == std::to_string(96ull << 20));
    BOOST_TEST(read(g->dirs()[0] / "pids.max") == "77");
    BOOST_TEST(read(g->dirs()[0] / "cpu.weight") == "50");
    BOOST_TEST(read(g->dirs()[0] / "cpu.max") == "150000 100000");
  }
  // Unlimited is "max" / -1, never 0.
  auto open = sandbox_cgroup::create(guard.parent, "box-2", ferry::sandbox::sandbox_limits{0, 0, 0, 100});
  BOOST_TEST_REQUIRE(open.ok(), (open.ok() ? "" : open.error().message));
  BOOST_TEST(read(open->dirs()[g->mode() == cgroup_mode::v1 ? 1 : 0] / "pids.max") == "max");
  BOOST_TEST(g->remove().ok());
  BOOST_TEST(open->remove().ok());
  for (const auto& d : g->dirs())
    BOOST_TEST(!fs::exists(d), d);

  auto bad = sandbox_cgroup::create(guard.parent, "../escape", limits);
  BOOST_TEST_REQUIRE(!bad.ok());
  BOOST_TEST(bad.error().message.find("invalid cgroup name") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_memory_hog_is_oom_killed_and_the_cgroup_says_so) {
  parent_guard guard{test_parent("mem")};
  ferry::sandbox::sandbox_limits limits;
  limits.memory_bytes = 32ull << 20;
  auto g = sandbox_cgroup::create(guard.parent, "hog", limits);
  BOOST_TEST_REQUIRE(g.ok(), (g.ok() ? "" : g.error().message));
  BOOST_TEST(g->hits().oom_kills == 0u);
  BOOST_TEST(describe_hits(g->hits(), limits).empty());
  child hog([] {
    // 256 MiB touched page by page: far over the limit.
    const size_t size = 256u << 20;
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      return 91;
    std::memset(p, 1, size);
    return 0;  // not reached under the limit
  });
  BOOST_TEST_REQUIRE(g->add_process(hog.pid()).ok());
  hog.go();
  int status = hog.wait();
  BOOST_TEST(WIFSIGNALED(status));
  BOOST_TEST((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
  auto hits = g->hits();
  BOOST_TEST(hits.oom_kills >= 1u);
  BOOST_TEST(hits.pids_refused == 0u);
  auto why = describe_hits(hits, limits);
  BOOST_TEST_REQUIRE(why.size() == 1u);
  BOOST_TEST((why[0].what == ferry::sandbox::limit_hit::kind::memory));
  BOOST_TEST(why[0].limit == 32ull << 20);
  BOOST_TEST(why[0].detail.find("memory limit reached (32 MiB)") != std::string::npos, why[0].detail);
  BOOST_TEST(g->remove().ok());
}

BOOST_AUTO_TEST_CASE(a_fork_bomb_stops_at_the_pids_limit_and_the_cgroup_says_so) {
  parent_guard guard{test_parent("pids")};
  ferry::sandbox::sandbox_limits limits;
  limits.pids = 16;
  auto g = sandbox_cgroup::create(guard.parent, "bomb", limits);
  BOOST_TEST_REQUIRE(g.ok(), (g.ok() ? "" : g.error().message));
  child bomb([] {
    // Bounded: at most 200 forks, each child sleeps (it is killed by remove()).
    int made = 0;
    for (int i = 0; i < 200; ++i) {
      pid_t p = ::fork();
      if (p == 0) {
        ::pause();
        ::_exit(0);
      }
      if (p > 0)
        ++made;
    }
    return made < 100 ? made : 100;  // how many forks succeeded (capped for the exit code)
  });
  BOOST_TEST_REQUIRE(g->add_process(bomb.pid()).ok());
  bomb.go();
  int status = bomb.wait();
  BOOST_TEST_REQUIRE(WIFEXITED(status));
  const int made = WEXITSTATUS(status);
  BOOST_TEST(made < 16, "forks that succeeded: " << made);
  auto hits = g->hits();
  BOOST_TEST(hits.pids_refused >= 1u);
  auto why = describe_hits(hits, limits);
  BOOST_TEST_REQUIRE(why.size() == 1u);
  BOOST_TEST((why[0].what == ferry::sandbox::limit_hit::kind::pids));
  BOOST_TEST(why[0].detail.find("process limit reached (16") != std::string::npos, why[0].detail);
  // The bomb's children are still in the cgroup: remove() kills them first.
  BOOST_TEST(!g->processes().empty());
  auto removed = g->remove();
  BOOST_TEST(removed.ok(), (removed.ok() ? "" : removed.error().message));
  for (const auto& d : g->dirs())
    BOOST_TEST(!fs::exists(d), d);
}

BOOST_AUTO_TEST_CASE(orphans_are_removed_and_kept_ones_stay) {
  parent_guard guard{test_parent("orphans")};
  ferry::sandbox::sandbox_limits limits;
  // Two runtimes share the parent, told apart by the prefix of their groups' names.
  for (const char* id : {"r1-a", "r1-b", "r1-c", "r2-a"})
    BOOST_TEST_REQUIRE(sandbox_cgroup::create(guard.parent, id, limits).ok());
  auto removed = remove_orphan_cgroups(guard.parent, "r1-", {"r1-b"});
  std::sort(removed.begin(), removed.end());
  BOOST_TEST((removed == std::vector<std::string>{"r1-a", "r1-c"}));
  for (const char* kept : {"r1-b", "r2-a"}) {
    const auto g = sandbox_cgroup::existing(guard.parent, kept);
    for (const auto& d : g.dirs())
      BOOST_TEST(fs::is_directory(d), d);
  }
  const auto gone = sandbox_cgroup::existing(guard.parent, "r1-a");
  for (const auto& d : gone.dirs())
    BOOST_TEST(!fs::exists(d), d);
}
