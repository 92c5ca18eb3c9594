// The git proxy inside a real ferryd, for each sandbox backend the machine has: a task with a
// repository gets it cloned at its sandbox's `cloning` step from ferryd's embedded local forge,
// through the egress proxy's internal route (git.ferry.internal) and the git proxy, with a
// credential scoped to that sandbox; its command commits and pushes to its own branch
// (ferry/<task id>), and every other push (main, a tag, a deletion, another repository) is
// refused with git's "[remote rejected]" and leaves the forge's refs as they were. Every request
// is a git_operation event on the task's stream. While the sandbox lives and after the task,
// the forge's real token is nowhere: not in the sandbox's files or environment, not in any event,
// not in ferryd's output or any file of its data directory (its encrypted credential store
// aside). A repository the forge does not have fails the task with the clone's reason; a
// malformed one is refused at submission. Needs root and git, and bwrap or runsc.
#define BOOST_TEST_MODULE gitproxy_git_ferryd
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "ferry/sandbox/process.h"
#include "ferry/storage/credentials.h"
#include "ferry/test_support/ferry_api.h"
#include "ferry/test_support/ferryd_process.h"
#include "ferry/test_support/http_client.h"
#include "ferry/test_support/temp_dir.h"

using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;
namespace utf = boost::unit_test;

namespace {

bool on_path(const char* program) {
  auto r = ferry::sandbox::run_command({"sh", "-c", fmt::format("command -v {}", program)}, 10s);
  return r.ok() && r->status.ok();
}

struct needs_backend {
  const char* program;
  boost::test_tools::assertion_result operator()(utf::test_unit_id) const {
    boost::test_tools::assertion_result r(::geteuid() == 0 && on_path(program) && on_path("git"));
    r.message() << "needs root, git and " << program;
    return r;
  }
};

std::string random_hex(size_t bytes) {
  std::string raw(bytes, '\0');
  BOOST_TEST_REQUIRE(RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(bytes)) == 1);
  std::string out;
  for (unsigned char c : raw)
    out += fmt::format("{:02x}", c);
  return out;
}

std::string base64(std::string_view in) {
  std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

/// The refs of a bare repository of the forge: "refname oid" lines, sorted.
std::string refs_of(const fs::path& repo) {
  auto r = ferry::sandbox::run_command(
    {"git", "--git-dir", repo.string(), "for-each-ref", "--format=%(refname) %(objectname)"}, 30s);
  BOOST_TEST_REQUIRE(r.ok());
  return r->output;
}

/// Files under `root` (not following symbolic links, not crossing into the directories named in
/// `skip`, at most 64 MiB each) that contain any of `needles`: "path: which".
std::vector<std::string> files_containing(const fs::path& root, const std::vector<std::string>& needles,
                                          const std::vector<fs::path>& skip, size_t* scanned = nullptr) {
  std::vector<std::string> hits;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec), end;
       !ec && it != end; it.increment(ec)) {
    const fs::path p = it->path();
    if (it->is_symlink(ec))
      continue;
    if (it->is_directory(ec)) {
      for (const auto& s : skip)
        if (p == s)
          it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file(ec) || it->file_size(ec) > (64u << 20))
      continue;
    std::ifstream f(p, std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (scanned)
      ++*scanned;
    for (size_t i = 0; i < needles.size(); ++i)
      if (content.find(needles[i]) != std::string::npos)
        hits.push_back(fmt::format("{}: needle {}", p.string(), i));
  }
  return hits;
}

struct ferryd_with_forge {
  ferry::test::temp_dir dir{"ferry-git-ferryd"};
  fs::path data = dir.path() / "data";
  /// The forge's token, put into ferryd's credential store before it starts (the embedded forge
  /// keeps a token it finds there): what must never show up anywhere else.
  std::string forge_token;
  std::string backend;
  /// A ferryd that crashed (restart_after_crash): destroyed after the one that took over, whose
  /// stop leaves nothing for its checks.
  std::unique_ptr<ferry::test::ferryd_process> crashed;
  std::unique_ptr<ferry::test::ferryd_process> ferryd;
  std::unique_ptr<ferry::test::api_client> api;

  explicit ferryd_with_forge(const std::string& backend_name) : backend(backend_name) {
    // bwrap sandboxes run as uids of their own: they must reach their directories.
    fs::permissions(dir.path(), fs::perms::others_exec, fs::perm_options::add);
    forge_token = "forge-" + random_hex(24);
    {
      fs::create_directories(data / "keys");
      ferry::storage::credential_store_options co;
      co.dir = data / "credentials";
      co.key_file = data / "keys" / "credentials.key";
      auto store = ferry::storage::credential_store::open(co);
      BOOST_TEST_REQUIRE(store.ok(), (store.ok() ? std::string() : store.error().message));
      BOOST_TEST_REQUIRE((*store)->put("forge-token", forge_token).ok());
    }
    start({});
  }

  void start(const std::string& token) {
    ferry::test::ferryd_options opts(FERRYD_BINARY, data, token);
    // No way out but the internal route to the git proxy.
    opts.extra_args = {"--sandbox-runtime", backend, "--default-network", "none"};
    ferryd = std::make_unique<ferry::test::ferryd_process>(opts);
    api = std::make_unique<ferry::test::api_client>(*ferryd);
  }

  /// SIGKILL, and a new ferryd on the same data directory (sandboxes outlive the crash).
  void restart_after_crash() {
    ferryd->crash();
    crashed = std::move(ferryd);
    start(crashed->token());
  }

  /// What must never appear: the token, and HTTP Basic of it as the proxy sends it upstream.
  std::vector<std::string> needles() const { return {forge_token, base64("x-access-token:" + forge_token)}; }

  std::string submit(const std::string& command, const std::string& repo) {
    auto r = api->authorized("POST", "/api/v1/tasks", json{{"command", command}, {"repo", repo}}.dump());
    BOOST_TEST_REQUIRE(r.status == 201, r.summary());
    return ferry::test::str(*r.json(), "id");
  }

  /// Waits until the running task's command has made `name` in its workspace; its sandbox's id.
  std::string wait_for_workspace_file(const std::string& id, const std::string& name) {
    std::string last, sandbox_id;
    auto t = api->wait_for_task(
      id,
      [&](const json& j) {
        if (j.value("finished", false))
          return true;
        sandbox_id = j.contains("sandbox") ? ferry::test::str(j["sandbox"], "id") : std::string();
        return !sandbox_id.empty() && fs::exists(data / "sandboxes" / sandbox_id / "workspace" / name);
      },
      120s, &last);
    BOOST_TEST_REQUIRE(t.has_value(), "the command made no " << name << "; last: " << last);
    BOOST_TEST_REQUIRE(!t->value("finished", false), "the task ended first: " << t->dump());
    return sandbox_id;
  }

  json wait_finished(const std::string& id) {
    std::string last;
    auto t = api->wait_for_task(id, [](const json& j) { return j.value("finished", false); }, 180s, &last);
    BOOST_TEST_REQUIRE(t.has_value(), "task " << id << " did not end; last: " << last);
    return *t;
  }

  std::vector<json> events(const std::string& id) {
    ferry::test::ws_client ws;
    auto hs = api->open_events(ws, id);
    BOOST_TEST_REQUIRE(hs.upgraded, hs.summary());
    return ferry::test::read_until_close(ws, 60s).events;
  }
};

/// The output of command `command_id` (both streams, in order).
std::string output_of(const std::vector<json>& events, uint64_t command_id) {
  std::string out;
  for (const auto& e : events) {
    if (ferry::test::str(e, "type") != "output_chunk" || e["data"].value("command_id", uint64_t{0}) != command_id)
      continue;
    if (auto t = e["data"].find("text"); t != e["data"].end() && t->is_string())
      out += t->get<std::string>();
    else if (auto b = e["data"].find("base64"); b != e["data"].end() && b->is_string())
      out += ferry::test::base64_decode(b->get<std::string>()).value_or("");
  }
  return out;
}

/// The git_operation events' data.
std::vector<json> git_operations(const std::vector<json>& events) {
  std::vector<json> out;
  for (const auto& e : events)
    if (ferry::test::str(e, "type") == "git_operation")
      out.push_back(e["data"]);
  return out;
}

// The task's command: what the agent would do, and every push it must not make. It stops once
// it has done all that (/workspace/.scan-now) until the test has looked through the sandbox's
// files (/workspace/.scan-done; at most 60 s).
constexpr const char* task_command = R"sh(set -e
cd /workspace
echo "branch=$(git rev-parse --abbrev-ref HEAD)"
test -f README.md && echo has-readme
echo change > change.txt
git add change.txt
git commit -qm "a change by the task"
git push -q origin HEAD 2>&1 && echo own-branch-pushed
try() { name=$1; shift; if "$@" >/tmp/out 2>&1; then echo "$name=accepted"; else echo "$name=refused"; fi; cat /tmp/out; }
try main git push origin HEAD:main
git tag v1
try tag git push origin v1
try delete git push origin :main
try force-main git push -f origin HEAD:main
other=$(git remote get-url origin | sed 's#/demo/hello.git#/demo/other.git#')
try other-repo git ls-remote "$other"
nocred=$(git remote get-url origin | sed 's#//[^@]*@#//#')
try no-credential git ls-remote "$nocred"
env | sort
git config --list --show-origin
touch /workspace/.scan-now
i=0; until [ -e /workspace/.scan-done ] || [ $i -ge 600 ]; do sleep 0.1; i=$((i+1)); done
[ -e /workspace/.scan-done ] && echo scan-seen
echo task-done
)sh";

void a_task_clones_and_pushes_only_its_branch(const std::string& backend) {
  ferryd_with_forge f(backend);
  BOOST_TEST(f.ferryd->output().find("ferryd: git: local forge at http://127.0.0.1:") != std::string::npos,
             f.ferryd->output());
  const fs::path repo = f.data / "forge" / "demo" / "hello.git";
  BOOST_TEST_REQUIRE(fs::is_directory(repo), "no demo/hello in the embedded forge");
  const std::string refs_before = refs_of(repo);
  const auto main_at = refs_before.find("refs/heads/main ");
  BOOST_TEST_REQUIRE(main_at != std::string::npos, refs_before);
  const std::string main_line = refs_before.substr(main_at, refs_before.find('\n', main_at) - main_at);
  // Another repository of the same forge, which the task must not reach.
  auto other =
    ferry::sandbox::run_command({"git", "init", "-q", "--bare", (f.data / "forge/demo/other.git").string()}, 30s);
  BOOST_TEST_REQUIRE((other.ok() && other->status.ok()));

  const std::string id = f.submit(task_command, "demo/hello");
  // While the command waits: the sandbox's files on the host, which hold all it can have
  // written (its workspace, its writable root's upper layer, its control directory).
  const std::string sandbox_id = f.wait_for_workspace_file(id, ".scan-now");
  const fs::path box = f.data / "sandboxes" / sandbox_id;
  size_t scanned = 0;
  const auto in_sandbox = files_containing(box, f.needles(), {box / "root"}, &scanned);
  BOOST_TEST(in_sandbox.empty(), fmt::format("the forge's token in the sandbox's files: {}", fmt::join(in_sandbox, ", ")));
  BOOST_TEST(scanned >= 3u, "scanned only " << scanned << " files under " << box);
  std::ofstream(box / "workspace" / ".scan-done") << "";

  const json done = f.wait_finished(id);
  const auto events = f.events(id);
  const std::string out = output_of(events, 1);
  const std::string clone = output_of(events, 0x80000000u);
  const auto ops = git_operations(events);
  BOOST_TEST_CONTEXT("task: " << done.dump() << "\nclone:\n" << clone << "\noutput:\n" << out) {
    BOOST_TEST(ferry::test::str(done, "status") == "succeeded");
    BOOST_TEST(clone.find("ferry: cloned demo/hello, on branch ferry/" + id) != std::string::npos);
    BOOST_TEST(out.find("branch=ferry/" + id + "\n") != std::string::npos);
    BOOST_TEST(out.find("has-readme\n") != std::string::npos);
    BOOST_TEST(out.find("own-branch-pushed\n") != std::string::npos);
    for (const char* refused : {"main", "tag", "delete", "force-main", "other-repo", "no-credential"})
      BOOST_TEST(out.find(std::string(refused) + "=refused\n") != std::string::npos, refused);
    BOOST_TEST(out.find("[remote rejected]") != std::string::npos);
    BOOST_TEST(out.find("scan-seen\n") != std::string::npos);  // the host's file reached the sandbox
    BOOST_TEST(ferry::test::find_event(events, "sandbox_state_changed", 0,
                                       [](const json& d) { return ferry::test::str(d, "to") == "cloning"; }) >= 0);
  }
  // The audit: the clone, the accepted push (its ref), the refused ones.
  int fetches = 0, pushes_ok = 0, refused = 0;
  for (const auto& op : ops) {
    const std::string service = ferry::test::str(op, "service"), result = ferry::test::str(op, "result");
    BOOST_TEST(ferry::test::str(op, "sandbox_id") == sandbox_id);
    if (service == "upload-pack" && result == "ok")
      ++fetches;
    if (service == "receive-pack" && result == "ok" && !op.value("advertisement", true)) {
      ++pushes_ok;
      BOOST_TEST(op["refs"].dump().find("refs/heads/ferry/" + id + " ") != std::string::npos, op.dump());
    }
    if (result == "refused")
      ++refused;
  }
  BOOST_TEST(fetches >= 1);
  BOOST_TEST(pushes_ok == 1);
  // The task's view sums it up: the one ref it pushed.
  BOOST_TEST(done["git"]["pushed"].size() == 1u, done.dump());
  BOOST_TEST(done["git"]["pushed"][0].value("ref", "") == "refs/heads/ferry/" + id, done.dump());
  BOOST_TEST(done["git"].value("refused", 0) >= 4, done.dump());
  BOOST_TEST(refused >= 4, "git operations: " << json(ops).dump());
  // The forge: the task's branch is new, nothing else changed.
  const std::string refs_after = refs_of(repo);
  BOOST_TEST(refs_after.find("refs/heads/ferry/" + id + " ") != std::string::npos, refs_after);
  BOOST_TEST(refs_after.find(main_line) != std::string::npos, "main moved: " << refs_before << " -> " << refs_after);
  BOOST_TEST(refs_after.find("refs/tags/") == std::string::npos, refs_after);
  BOOST_TEST(refs_of(f.data / "forge/demo/other.git").empty());

  // The token is in no event, no log line and no file of ferryd's (its encrypted store aside).
  const std::string all_events = json(events).dump();
  for (const auto& needle : f.needles())
    BOOST_TEST(all_events.find(needle) == std::string::npos, "the forge's token in the task's events");
  auto report = f.ferryd->stop();
  BOOST_TEST(report.clean());
  for (const auto& needle : f.needles())
    BOOST_TEST(f.ferryd->output().find(needle) == std::string::npos, "the forge's token in ferryd's output");
  size_t files = 0;
  const auto in_data = files_containing(f.data, f.needles(), {f.data / "credentials"}, &files);
  BOOST_TEST(in_data.empty(), fmt::format("the forge's token in ferryd's files: {}", fmt::join(in_data, ", ")));
  BOOST_TEST(files >= 10u);
}

// Waits (at most 60 s) until the test says go, then commits and pushes.
constexpr const char* push_after_go = R"sh(set -e
touch /workspace/.waiting
i=0; until [ -e /workspace/.go ] || [ $i -ge 600 ]; do sleep 0.1; i=$((i+1)); done
[ -e /workspace/.go ]
echo after > after.txt
git add after.txt
git commit -qm "after the restart"
git push -q origin HEAD && echo pushed-after-restart
)sh";

void a_reattached_sandbox_gets_a_fresh_credential(const std::string& backend) {
  ferryd_with_forge f(backend);
  const std::string id = f.submit(push_after_go, "demo/hello");
  const std::string sandbox_id = f.wait_for_workspace_file(id, ".waiting");

  // The proxy's credentials die with ferryd; the re-attached sandbox gets a new one.
  const fs::path git_config = f.data / "sandboxes" / sandbox_id / "workspace" / ".git" / "config";
  const std::string config_before = ferry::sandbox::read_small_file(git_config);
  BOOST_TEST_REQUIRE(config_before.find("@git.ferry.internal/demo/hello.git") != std::string::npos, config_before);
  f.restart_after_crash();
  // The re-attached sandbox's remote gets a new credential; then the command may push.
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (ferry::sandbox::read_small_file(git_config) == config_before && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(50ms);
  BOOST_TEST_REQUIRE(ferry::sandbox::read_small_file(git_config) != config_before, "the remote kept its old credential");
  std::ofstream(f.data / "sandboxes" / sandbox_id / "workspace" / ".go") << "";
  const json done = f.wait_finished(id);
  BOOST_TEST(f.ferryd->output().find("sandbox " + sandbox_id + " re-attached") != std::string::npos,
             f.ferryd->output());
  const auto events = f.events(id);
  const std::string out = output_of(events, 1);
  BOOST_TEST_CONTEXT("task: " << done.dump() << "\noutput:\n" << out) {
    BOOST_TEST(ferry::test::str(done, "status") == "succeeded");
    BOOST_TEST(out.find("pushed-after-restart\n") != std::string::npos);
    BOOST_TEST(output_of(events, 0x80000001u).find("fresh credential") != std::string::npos);
    BOOST_TEST(done["git"]["pushed"].size() == 1u);
  }
  BOOST_TEST(refs_of(f.data / "forge/demo/hello.git").find("refs/heads/ferry/" + id + " ") != std::string::npos);
}

void a_missing_repository_fails_the_task_and_a_bad_name_is_refused(const std::string& backend) {
  ferryd_with_forge f(backend);
  for (const char* bad : {"../etc", "a//b", "a/b/c/d/e", ".hidden/x", "a b", ""}) {
    auto r = f.api->authorized("POST", "/api/v1/tasks", json{{"command", "true"}, {"repo", bad}}.dump());
    BOOST_TEST(r.status == 400, bad << ": " << r.summary());
  }
  const std::string id = f.submit("echo never-runs", "demo/nope");
  const json done = f.wait_finished(id);
  const auto events = f.events(id);
  BOOST_TEST(ferry::test::str(done, "status") == "failed", done.dump());
  BOOST_TEST(done.dump().find("cloning demo/nope failed") != std::string::npos, done.dump());
  BOOST_TEST(output_of(events, 1).empty());
  BOOST_TEST(ferry::test::find_event(events, "command_started", 0,
                                     [](const json& d) { return d.value("command_id", uint64_t{0}) == 1; }) < 0);
}

}  // namespace

BOOST_AUTO_TEST_CASE(bwrap_task_clones_and_pushes_only_its_branch, *utf::precondition(needs_backend{"bwrap"})) {
  a_task_clones_and_pushes_only_its_branch("bwrap");
}

BOOST_AUTO_TEST_CASE(runsc_task_clones_and_pushes_only_its_branch, *utf::precondition(needs_backend{"runsc"})) {
  a_task_clones_and_pushes_only_its_branch("runsc");
}

BOOST_AUTO_TEST_CASE(bwrap_reattached_sandbox_gets_a_fresh_credential, *utf::precondition(needs_backend{"bwrap"})) {
  a_reattached_sandbox_gets_a_fresh_credential("bwrap");
}

BOOST_AUTO_TEST_CASE(runsc_reattached_sandbox_gets_a_fresh_credential, *utf::precondition(needs_backend{"runsc"})) {
  a_reattached_sandbox_gets_a_fresh_credential("runsc");
}

BOOST_AUTO_TEST_CASE(bwrap_missing_repository_and_bad_names, *utf::precondition(needs_backend{"bwrap"})) {
  a_missing_repository_fails_the_task_and_a_bad_name_is_refused("bwrap");
}
