// ferryctl tasks against a running ferryd: `list` and `show` fold the journal (read as a
// secondary while ferryd runs) into the same task views the API serves; `steer` and `abort` go
// over ferryd's NATS control subjects and print the acknowledgement; every failure has its
// documented exit code (2 usage, 6 no such task, 7 no answer over NATS, 8 task ended).

#define BOOST_TEST_MODULE integration_ferryctl_tasks
#include <boost/test/unit_test.hpp>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "ferry/actors/bus.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/processes.h"
#include "ferry/test_support/temp_dir.h"
#include "task_checks.h"

using namespace ferry::test;
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// ferryctl's documented exit codes (tools/README.md, `ferryctl --help`).
constexpr int exit_ok = 0;
constexpr int exit_usage = 2;
constexpr int exit_stream_not_found = 6;
constexpr int exit_no_answer = 7;
constexpr int exit_task_ended = 8;

program_run ferryctl(const fs::path& data_dir, std::vector<std::string> args) {
  std::vector<std::string> argv{FERRYCTL_BINARY, "--data-dir", data_dir.string()};
  argv.insert(argv.end(), args.begin(), args.end());
  const auto t0 = std::chrono::steady_clock::now();
  program_run run = run_program(argv, 60s);
  std::string line;
  for (const auto& a : args)
    line += " " + (a.size() > 60 ? a.substr(0, 60) + "..." : a);
  BOOST_TEST_MESSAGE("ferryctl" << line << ": " << run.summary() << " in " << ms_since(t0)
                                << " ms; stdout: " << run.out.substr(0, 2000));
  return run;
}

int exit_code(const program_run& run) {
  return run.spawn_error.empty() && !run.timed_out && run.status.signal == 0
           ? run.status.exit_code
           : -1;
}

std::vector<json> json_lines(const std::string& out) {
  std::vector<json> values;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    if (line.empty())
      continue;
    auto j = json::parse(line, nullptr, false);
    BOOST_TEST(!j.is_discarded(), "not a JSON line: " << line);
    if (!j.is_discarded())
      values.push_back(std::move(j));
  }
  return values;
}

std::set<std::string> ids_of(const std::vector<json>& tasks) {
  std::set<std::string> ids;
  for (const auto& t : tasks)
    ids.insert(str(t, "id"));
  return ids;
}

/// A loopback port nothing listens on (bound, then released).
uint16_t closed_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  BOOST_TEST_REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  BOOST_TEST_REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) == 0);
  BOOST_TEST_REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace

BOOST_AUTO_TEST_CASE(tasks_list_show_steer_and_abort_against_a_running_ferryd) {
  temp_dir nats_dir("ferry-nats");
  auto nats = ferry::actors::start_embedded_nats("nats-server", nats_dir.path() / "store");
  BOOST_TEST_REQUIRE(nats.ok(), (nats.ok() ? "" : nats.error().message));
  const std::string nats_url = (*nats)->url();
  ferryd_options opts(FERRYD_BINARY);
  opts.extra_args = {"--nats-url", nats_url};
  ferryd_process ferryd(opts);
  api_client admin(ferryd);
  const fs::path dir = ferryd.data_dir();

  http_response minted = admin.authorized("POST", "/api/v1/tokens", R"({"name": "alice"})");
  BOOST_TEST_REQUIRE(minted.status == 201, minted.summary());
  const std::string alice_id = str(*minted.json(), "id");
  api_client alice(ferryd.port(), str(*minted.json(), "token"));

  const std::string done = submit_task(admin, "echo hi");
  BOOST_TEST_REQUIRE(admin.wait_for_task(
                       done, [](const json& t) { return field(t, "finished") == json(true); },
                       60s)
                       .has_value());
  const std::string running = submit_task(alice, "sleep 600");
  sandbox_sweeper sweep(running);
  BOOST_TEST_REQUIRE(alice.wait_for_task(
                       running, [](const json& t) { return str(t, "status") == "running"; }, 60s)
                       .has_value());

  // list: both tasks, oldest first, as the API shows them; filters by status and user.
  program_run list = ferryctl(dir, {"tasks", "list", "--json"});
  BOOST_TEST_REQUIRE(exit_code(list) == exit_ok, list.summary());
  const auto all = json_lines(list.out);
  BOOST_TEST_REQUIRE(all.size() == 2u, list.out);
  BOOST_TEST(str(all[0], "id") == done);
  BOOST_TEST(str(all[0], "status") == "succeeded");
  BOOST_TEST(str(all[0], "command") == "echo hi");
  BOOST_TEST(str(all[1], "id") == running);
  BOOST_TEST(str(all[1], "status") == "running");
  BOOST_TEST(str(all[1], "user") == alice_id);
  json api_view = get_task_json(admin, done);  // finished: its view no longer changes
  BOOST_TEST(field(all[0], "last_seq") == field(api_view, "last_seq"),
             all[0].dump() << " vs the API's " << api_view.dump());
  BOOST_TEST(field(all[0], "exit_code") == field(api_view, "exit_code"));

  program_run by_status = ferryctl(dir, {"tasks", "list", "--status", "running", "--json"});
  BOOST_TEST(exit_code(by_status) == exit_ok, by_status.summary());
  BOOST_TEST((ids_of(json_lines(by_status.out)) == std::set<std::string>{running}), by_status.out);
  program_run by_user = ferryctl(dir, {"tasks", "list", "--user", alice_id, "--json"});
  BOOST_TEST((ids_of(json_lines(by_user.out)) == std::set<std::string>{running}), by_user.out);
  program_run text = ferryctl(dir, {"tasks", "list"});
  BOOST_TEST(exit_code(text) == exit_ok, text.summary());
  BOOST_TEST(text.out.find("ID\tSTATUS\tCREATED\tUSER\tCOMMAND") == 0u, text.out);
  BOOST_TEST(text.out.find(running + "\trunning\t") != std::string::npos, text.out);
  BOOST_TEST(text.out.find(done + "\tsucceeded\t") != std::string::npos, text.out);
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "list", "--status", "sleeping"})) == exit_usage);

  // show: one task, by id or by its stream name.
  program_run show = ferryctl(dir, {"tasks", "show", done, "--json"});
  BOOST_TEST_REQUIRE(exit_code(show) == exit_ok, show.summary());
  const auto shown = json_lines(show.out);
  BOOST_TEST_REQUIRE(shown.size() == 1u, show.out);
  BOOST_TEST(str(shown[0], "status") == "succeeded");
  BOOST_TEST(field(shown[0], "exit_code") == json(0), show.out);
  program_run show_text = ferryctl(dir, {"tasks", "show", "task-" + running});
  BOOST_TEST(exit_code(show_text) == exit_ok, show_text.summary());
  BOOST_TEST(show_text.out.find("status:     running") != std::string::npos, show_text.out);
  BOOST_TEST(show_text.out.find("command:    sleep 600") != std::string::npos, show_text.out);
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "show", "00ff00ff"})) == exit_stream_not_found);
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "show", "not-an-id"})) == exit_usage);

  // steer: over NATS, acknowledged with the comment's sequence, recorded as --as.
  program_run steer = ferryctl(dir, {"tasks", "steer", running, "use tabs", "--nats-url", nats_url,
                                     "--as", "ops", "--json"});
  BOOST_TEST_REQUIRE(exit_code(steer) == exit_ok, steer.summary());
  const auto steer_ack = json_lines(steer.out);
  BOOST_TEST_REQUIRE(steer_ack.size() == 1u, steer.out);
  BOOST_TEST_REQUIRE(field(steer_ack[0], "seq").is_number_unsigned(), steer.out);
  const auto seq = field(steer_ack[0], "seq").get<uint64_t>();
  program_run event = ferryctl(dir, {"events", "show", "task-" + running, "--from",
                                     std::to_string(seq), "--to", std::to_string(seq), "--json"});
  const auto events = json_lines(event.out);
  BOOST_TEST_REQUIRE(events.size() == 1u, event.summary() << " " << event.out);
  BOOST_TEST(str(events[0], "type") == "steering_comment", events[0].dump());
  BOOST_TEST(str(data_of(events[0]), "text") == "use tabs", events[0].dump());
  BOOST_TEST(str(events[0], "user") == "ops", events[0].dump());
  program_run steer_text = ferryctl(dir, {"tasks", "steer", running, "and a test", "--nats-url",
                                          nats_url});
  BOOST_TEST(exit_code(steer_text) == exit_ok, steer_text.summary());
  const std::string said = "task " + running + ": steering comment stored as seq ";
  BOOST_TEST_REQUIRE(steer_text.out.find(said) == 0u, steer_text.out);
  BOOST_TEST(std::stoull(steer_text.out.substr(said.size())) > seq, steer_text.out);

  // Refused before anything is sent: bad text, no URL, a bad id.
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "steer", running, "", "--nats-url", nats_url})) ==
             exit_usage);
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "steer", running, std::string(20000, 'x'),
                                      "--nats-url", nats_url})) == exit_usage);
  program_run no_url = ferryctl(dir, {"tasks", "steer", running, "x"});
  BOOST_TEST(exit_code(no_url) == exit_usage, no_url.summary());
  BOOST_TEST(no_url.err.find("--nats-url") != std::string::npos, no_url.err);
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "abort", "XYZ", "--nats-url", nats_url})) ==
             exit_usage);
  // Nobody answers: NATS unreachable.
  program_run unreachable = ferryctl(
    dir, {"tasks", "abort", running, "--nats-url",
          "nats://127.0.0.1:" + std::to_string(closed_port())});
  BOOST_TEST(exit_code(unreachable) == exit_no_answer, unreachable.summary());
  BOOST_TEST(str(get_task_json(alice, running), "status") == "running");
  // No live task of that id.
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "abort", "00ff00ff", "--nats-url", nats_url})) ==
             exit_task_ended);

  // abort: acknowledged once the task ended; its sandbox is gone.
  program_run abort = ferryctl(dir, {"tasks", "abort", running, "--reason", "from ferryctl",
                                     "--nats-url", nats_url, "--json"});
  BOOST_TEST_REQUIRE(exit_code(abort) == exit_ok, abort.summary());
  const auto abort_ack = json_lines(abort.out);
  BOOST_TEST_REQUIRE(abort_ack.size() == 1u, abort.out);
  BOOST_TEST(str(abort_ack[0], "outcome") == "aborted", abort.out);
  json after = get_task_json(alice, running);
  BOOST_TEST(str(after, "status") == "aborted", after.dump());
  BOOST_TEST(sandbox_processes(running).empty(), "processes of the aborted sandbox are left");
  program_run aborted = ferryctl(dir, {"tasks", "list", "--status", "aborted", "--json"});
  BOOST_TEST((ids_of(json_lines(aborted.out)) == std::set<std::string>{running}), aborted.out);

  // The task has ended: neither can act on it any more.
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "abort", running, "--nats-url", nats_url})) ==
             exit_task_ended);
  BOOST_TEST(exit_code(ferryctl(dir, {"tasks", "steer", running, "late", "--nats-url",
                                      nats_url})) == exit_task_ended);
}
