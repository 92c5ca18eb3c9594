// Images end to end: `ferryctl image build` makes a minbase image in ferryd's data directory,
// ferryd (no flags: --image auto) runs its tasks on it, `ls -la /` and `stat /` work in them,
// `ferryctl image rm` is refused while ferryd uses the image and works once it stopped; then
// ferryd without an image falls back to the host tree, and `--image latest` with none fails at
// start-up. Plus ferryctl image's documented exit codes. Needs root, debootstrap, the apt mirror
// and runsc; the build takes 1–2 minutes.

#define BOOST_TEST_MODULE integration_ferryd_image
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace utf = boost::unit_test;

namespace {

// ferryctl's documented exit codes (tools/README.md, `ferryctl --help`).
constexpr int exit_usage = 2;
constexpr int exit_no_journal = 3;
constexpr int exit_locked = 4;
constexpr int exit_no_image = 10;

program_run ferryctl(const fs::path& data_dir, std::vector<std::string> args,
                     std::chrono::milliseconds timeout = 60s) {
  std::vector<std::string> argv{FERRYCTL_BINARY, "--data-dir", data_dir.string()};
  argv.insert(argv.end(), args.begin(), args.end());
  const auto t0 = std::chrono::steady_clock::now();
  program_run run = run_program(argv, timeout);
  std::string line;
  for (const auto& a : args)
    line += " " + a;
  std::string summary = run.summary();  // a build's progress is long: its end says enough
  if (summary.size() > 2000)
    summary = "…" + summary.substr(summary.size() - 2000);
  BOOST_TEST_MESSAGE("ferryctl" << line << ": " << summary << " in " << ms_since(t0) << " ms");
  return run;
}

int exit_code(const program_run& run) {
  return run.spawn_error.empty() && !run.timed_out && run.status.signal == 0
           ? run.status.exit_code
           : -1;
}

boost::test_tools::assertion_result can_build(utf::test_unit_id) {
  boost::test_tools::assertion_result ok(true);
  if (::geteuid() != 0) {
    ok = false;
    ok.message() << "skipped: building images and running runsc need root";
  } else if (auto r = run_program({"sh", "-c", "command -v debootstrap || test -x /usr/sbin/debootstrap"}, 10s);
             !r.status.ok()) {
    ok = false;
    ok.message() << "skipped: debootstrap is not installed (tools/ferry deps)";
  }
  return ok;
}

/// Runs `command` as a task and returns its stdout once it has ended.
std::pair<std::string, nlohmann::json> run_task(const api_client& api, const std::string& command) {
  const std::string id = submit_task(api, command);
  ws_client ws;
  ws_handshake hs = api.open_events(ws, id);
  BOOST_TEST_REQUIRE(hs.upgraded, "events of task " << id << ": " << hs.summary());
  ws_transcript t = read_until_close(ws, 120s);
  return {stdout_text(t.events), get_task_json(api, id)};
}

}  // namespace

BOOST_AUTO_TEST_CASE(ferryctl_image_exit_codes_without_building) {
  temp_dir tmp;
  BOOST_TEST(exit_code(ferryctl(tmp.path() / "missing", {"image", "list"})) == exit_no_journal);
  auto empty = ferryctl(tmp.path(), {"image", "list"});
  BOOST_TEST(exit_code(empty) == 0, empty.summary());
  BOOST_TEST(empty.out.empty());
  BOOST_TEST(empty.err.find("no images") != std::string::npos, empty.err);
  BOOST_TEST(exit_code(ferryctl(tmp.path(), {"image", "rm", "abcdef"})) == exit_no_image);
  BOOST_TEST(exit_code(ferryctl(tmp.path(), {"image", "rm", "xyz!"})) == exit_usage);
  BOOST_TEST(exit_code(ferryctl(tmp.path(), {"image", "build", "--packages", "Not;a,package"})) ==
             exit_usage);
  BOOST_TEST(exit_code(ferryctl(tmp.path(), {"image", "build", "--minimal", "--packages", "git"})) ==
             exit_usage);
  BOOST_TEST(exit_code(ferryctl(tmp.path(), {"image", "build", "--mirror", "ftp://x.invalid/"})) ==
             exit_usage);
}

BOOST_AUTO_TEST_CASE(ferryd_runs_tasks_on_the_latest_image, *utf::precondition(can_build)) {
  temp_dir data;

  // Build it (the hash is what stdout says), then see it listed.
  auto built = ferryctl(data.path(), {"image", "build", "--minimal"}, 600s);
  BOOST_TEST_REQUIRE(exit_code(built) == 0, built.summary() << "\n" << built.err);
  std::string hash = built.out.substr(0, built.out.find('\n'));
  BOOST_TEST_REQUIRE(hash.size() == 64u, "stdout: " << built.out);
  auto listed = ferryctl(data.path(), {"image", "list"});
  BOOST_TEST(listed.out.find(hash.substr(0, 12)) != std::string::npos, listed.out);

  {
    ferryd_process ferryd{ferryd_options(FERRYD_BINARY, data.path())};
    BOOST_TEST(ferryd.output().find("sandbox root: image " + hash.substr(0, 12)) !=
                 std::string::npos,
               ferryd.output());
    api_client api{ferryd};
    auto [out, task] = run_task(api, "ls -la / && stat / && cat /etc/debian_version");
    BOOST_TEST(str(task, "status") == "succeeded", task.dump() << "\n" << out);
    BOOST_TEST(out.find(" workspace") != std::string::npos, out);
    BOOST_TEST(out.find("File: /") != std::string::npos, out);
    BOOST_TEST(out.find("12.") != std::string::npos, out);  // bookworm's debian_version

    // In use: not removable while ferryd runs.
    auto refused = ferryctl(data.path(), {"image", "rm", hash.substr(0, 8)});
    BOOST_TEST(exit_code(refused) == exit_locked, refused.summary());
    BOOST_TEST(fs::is_directory(data.path() / "images" / hash / "rootfs"));
    ferryd.stop();
  }

  auto removed = ferryctl(data.path(), {"image", "rm", "latest"});
  BOOST_TEST(exit_code(removed) == 0, removed.summary());
  BOOST_TEST(removed.out == "removed " + hash + "\n");
  BOOST_TEST(!fs::exists(data.path() / "images" / hash));

  {  // no image any more: the host tree, as on a fresh machine
    ferryd_process ferryd{ferryd_options(FERRYD_BINARY, data.path())};
    BOOST_TEST(ferryd.output().find("sandbox root: host tree") != std::string::npos,
               ferryd.output());
    ferryd.stop();
  }
  // Asking for an image that is not there stops ferryd at start-up, saying so.
  auto no_image = run_program({FERRYD_BINARY, "--data-dir", data.path().string(), "--listen",
                               "127.0.0.1:0", "--image", "latest"},
                              60s);
  BOOST_TEST(no_image.status.exit_code == 1, no_image.summary());
  BOOST_TEST(no_image.err.find("--image latest: no images") != std::string::npos, no_image.err);
}
