// The git proxy with real `git` clients (and curl for hand-made requests) against the local
// forge (`git http-backend`), all on loopback with port 0 in a temp dir. Each refusal test checks
// git's output for the reason AND that the forge's refs (`git for-each-ref` on the bare
// repository) are unchanged, so it fails if the proxy let the push through. Every fixture checks
// at the end that the real forge token appears nowhere the sandbox side could see it: git's and
// curl's output, and the observer's reports.
#define BOOST_TEST_MODULE gitproxy_git_proxy
#include <boost/test/unit_test.hpp>

#include <utility>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/asio/ssl.hpp>

#include "ferry/gitproxy/git_proxy.h"
#include "ferry/gitproxy/local_forge.h"
#include "ferry/sandbox/process.h"
#include "ferry/storage/credentials.h"
#include "ferry/test_support/nats_server.h"  // test_pki
#include "ferry/test_support/temp_dir.h"

namespace fs = std::filesystem;
using namespace ferry::gitproxy;
using ferry::sandbox::run_command;
using ferry::sandbox::run_result;
using clock_type = std::chrono::system_clock;

namespace {

constexpr auto cmd_timeout = std::chrono::seconds(120);

std::string random_token() {
  std::random_device rd;
  static constexpr char digits[] = "0123456789abcdef";
  std::string out = "ghs_";
  for (int i = 0; i < 36; ++i)
    out.push_back(digits[rd() % 16]);
  return out;
}

bool contains(const std::string& hay, std::string_view needle) {
  return hay.find(needle) != std::string::npos;
}

std::string describe(const git_operation& op) {
  std::string s = "op sandbox=" + op.sandbox_id + " header=" + op.ferry_sandbox +
                  " repo=" + op.repo +
                  " service=" + (op.service == git_service::receive_pack ? "receive" : "upload") +
                  " v" + std::to_string(op.protocol_version) +
                  " result=" + std::to_string(static_cast<int>(op.result)) +
                  " status=" + std::to_string(op.http_status) + " reason=" + op.reason;
  for (const auto& u : op.updates)
    s += " update=" + u.ref + ":" + u.old_oid + ":" + u.new_oid;
  return s + "\n";
}

struct world {
  ferry::test::temp_dir tmp{"gitproxy"};
  const std::string token = random_token();
  std::unique_ptr<ferry::storage::credential_store> creds;
  std::unique_ptr<local_forge> forge;
  std::unique_ptr<git_proxy> proxy;
  std::mutex mu;
  std::vector<git_operation> ops;  // GUARDED_BY(mu)
  std::string transcript;          // everything the sandbox side saw; GUARDED_BY(mu)
  fs::path home, gitconfig;
  int counter = 0;
  std::size_t mark = 0;  // ops.size() when the last sandbox command started; GUARDED_BY(mu)

  world() {
    home = tmp.path() / "home";
    fs::create_directories(home);
    gitconfig = tmp.path() / "gitconfig";
    std::ofstream(gitconfig).flush();
    ferry::storage::credential_store_options co;
    co.dir = tmp.path() / "creds";
    auto c = ferry::storage::credential_store::open(co);
    BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
    creds = std::move(*c);
    BOOST_REQUIRE(creds->put("forge-token", token).ok());
    local_forge_options fo;
    fo.root = tmp.path() / "forge";
    fo.token = token;
    auto f = local_forge::start(fo);
    BOOST_REQUIRE_MESSAGE(f.ok(), (f.ok() ? "" : f.error().message));
    forge = std::move(*f);
    for (auto repo : {"acme/widgets", "acme/other"}) {
      auto r = forge->create_repo(repo);
      BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    }
    proxy = start_proxy(forge->base_url());
  }

  ~world() {
    proxy.reset();
    forge.reset();
    std::lock_guard<std::mutex> lock(mu);
    BOOST_TEST(!contains(transcript, token), "the real token leaked to the sandbox side");
  }

  std::unique_ptr<git_proxy> start_proxy(std::string upstream, git_proxy_options o = {}) {
    o.upstream_url = std::move(upstream);
    o.token = creds->user_of("forge-token");
    o.observer = [this](const git_operation& op) {
      std::lock_guard<std::mutex> lock(mu);
      ops.push_back(op);
      transcript += describe(op);
    };
    auto p = git_proxy::start(std::move(o));
    BOOST_REQUIRE_MESSAGE(p.ok(), (p.ok() ? "" : p.error().message));
    return std::move(*p);
  }

  std::vector<std::string> env() const {
    const char* path = std::getenv("PATH");
    return {"env", "-i", std::string("PATH=") + (path ? path : "/usr/bin:/bin"),
            "HOME=" + home.string(), "GIT_CONFIG_GLOBAL=" + gitconfig.string(),
            "GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0", "LANG=C", "LC_ALL=C",
            "GIT_AUTHOR_NAME=Agent", "GIT_AUTHOR_EMAIL=agent@sandbox",
            "GIT_COMMITTER_NAME=Agent", "GIT_COMMITTER_EMAIL=agent@sandbox"};
  }

  // Runs a command as the sandbox would; its output goes into the transcript.
  run_result sandbox_run(std::vector<std::string> argv) {
    {
      std::lock_guard<std::mutex> lock(mu);
      mark = ops.size();
    }
    auto full = env();
    full.insert(full.end(), argv.begin(), argv.end());
    auto r = run_command(full, cmd_timeout);
    BOOST_REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    std::lock_guard<std::mutex> lock(mu);
    transcript += r->output;
    BOOST_TEST_MESSAGE("$ " << argv[0] << " " << (argv.size() > 1 ? argv[1] : "") << " "
                            << (argv.size() > 2 ? argv[2] : "") << "\n"
                            << r->output);
    return std::move(*r);
  }
  run_result git(std::vector<std::string> args) {
    args.insert(args.begin(), "git");
    return sandbox_run(std::move(args));
  }
  // Host-side git on the forge's bare repository (not part of the transcript).
  std::string forge_git(const std::string& repo, std::vector<std::string> args) {
    auto full = env();
    full.push_back("git");
    full.push_back("--git-dir=" + forge->repo_path(repo).string());
    full.insert(full.end(), args.begin(), args.end());
    auto r = run_command(full, cmd_timeout);
    BOOST_REQUIRE(r.ok());
    BOOST_REQUIRE_MESSAGE(r->status.ok(), r->output);
    return r->output;
  }
  std::string forge_refs(const std::string& repo = "acme/widgets") {
    return forge_git(repo, {"for-each-ref", "--format=%(refname) %(objectname)"});
  }

  std::string url(const std::string& cred, const std::string& repo = "acme/widgets") const {
    return "http://x-ferry:" + cred + "@127.0.0.1:" + std::to_string(proxy->port()) + "/" + repo +
           ".git";
  }
  std::string cred_for(const std::string& sandbox, const std::string& repo,
                       const std::string& branch,
                       clock_type::time_point expires = clock_type::now() + std::chrono::hours(4)) {
    auto c = proxy->register_sandbox(sandbox, repo, branch, expires);
    BOOST_REQUIRE_MESSAGE(c.ok(), (c.ok() ? "" : c.error().message));
    BOOST_REQUIRE(c->size() == 64u);
    return *c;
  }
  // Clones through the proxy; returns the work tree.
  fs::path clone(const std::string& cred, const std::string& repo = "acme/widgets",
                 const std::string& version = "2") {
    const fs::path dir = tmp.path() / ("work" + std::to_string(++counter));
    auto r = git({"-c", "protocol.version=" + version, "clone", url(cred, repo), dir.string()});
    BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
    return dir;
  }
  void commit(const fs::path& dir, const std::string& msg) {
    std::ofstream(dir / "file.txt", std::ios::app) << msg << "\n";
    BOOST_REQUIRE(git({"-C", dir.string(), "add", "file.txt"}).status.ok());
    BOOST_REQUIRE(git({"-C", dir.string(), "commit", "-q", "-m", msg}).status.ok());
  }
  std::string rev(const fs::path& dir, const std::string& what = "HEAD") {
    auto r = git({"-C", dir.string(), "rev-parse", what});
    BOOST_REQUIRE(r.status.ok());
    return r.output.substr(0, 40);
  }
  // curl as the sandbox: raw requests the git client would never send.
  run_result curl(std::vector<std::string> args) {
    args.insert(args.begin(), {"curl", "-sS", "-i", "--path-as-is", "--max-time", "30"});
    return sandbox_run(std::move(args));
  }
  std::string base() const { return "http://127.0.0.1:" + std::to_string(proxy->port()); }

  std::vector<git_operation> ops_copy() {
    std::lock_guard<std::mutex> lock(mu);
    return ops;
  }
  // The first report since the last sandbox command started that matches `pred`. The proxy
  // reports after it has answered, so the client may exit first: wait for it (up to 10 s).
  template <class Pred>
  std::optional<git_operation> await_op(Pred pred) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard<std::mutex> lock(mu);
        for (std::size_t i = mark; i < ops.size(); ++i)
          if (pred(ops[i]))
            return ops[i];
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return std::nullopt;
  }
  // The receive-pack POST of the last sandbox command.
  std::optional<git_operation> last_push() {
    return await_op([](const git_operation& op) {
      return op.service == git_service::receive_pack && !op.advertisement;
    });
  }
};

// A refused push: git fails, says "[remote rejected]" with the reason, the forge is unchanged
// and the observer reports the refusal.
void expect_rejected(world& w, const run_result& r, const std::string& before,
                     const std::string& reason) {
  BOOST_TEST(!r.status.ok(), "git push succeeded:\n" << r.output);
  BOOST_TEST(contains(r.output, "[remote rejected]"), r.output);
  BOOST_TEST(contains(r.output, reason), r.output);
  BOOST_TEST(w.forge_refs() == before);
  auto op = w.last_push();
  BOOST_REQUIRE(op.has_value());
  BOOST_TEST((op->result == op_result::refused));
  BOOST_TEST(contains(op->reason, reason), op->reason);
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(clone_and_fetch_through_the_proxy_v2_and_v0, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  for (const std::string version : {"2", "0"}) {
    const auto dir = clone(cred, "acme/widgets", version);
    BOOST_TEST(fs::exists(dir / "README.md"));
    BOOST_TEST(rev(dir) == forge_refs().substr(forge_refs().find(' ') + 1, 40));
  }
  // New commits on the forge reach the sandbox by fetch, with either protocol.
  const auto dir = tmp.path() / "work1";
  const auto main_before = rev(dir, "origin/main");
  for (const std::string version : {"0", "2"}) {
    const auto tree = forge_git("acme/widgets", {"rev-parse", "main^{tree}"}).substr(0, 40);
    const auto parent = forge_git("acme/widgets", {"rev-parse", "main"}).substr(0, 40);
    const auto next =
        forge_git("acme/widgets", {"commit-tree", tree, "-p", parent, "-m", "upstream " + version})
            .substr(0, 40);
    forge_git("acme/widgets", {"update-ref", "refs/heads/main", next});
    auto r = git({"-C", dir.string(), "-c", "protocol.version=" + version, "fetch", "origin"});
    BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
    BOOST_TEST(rev(dir, "origin/main") == next);
  }
  BOOST_TEST(rev(dir, "origin/main") != main_before);
  // Many local commits: the v0 negotiation's request body grows past 1 KiB and git gzips it;
  // the proxy and the forge pass it on as it is (HTTP_CONTENT_ENCODING for http-backend).
  auto many = sandbox_run({"sh", "-c",
                           "cd '" + dir.string() +
                               "' && for i in $(seq 300); do git commit -q --allow-empty -m c$i "
                               "|| exit 1; done"});
  BOOST_REQUIRE_MESSAGE(many.status.ok(), many.output);
  {
    const auto tree = forge_git("acme/widgets", {"rev-parse", "main^{tree}"}).substr(0, 40);
    const auto parent = forge_git("acme/widgets", {"rev-parse", "main"}).substr(0, 40);
    const auto next =
        forge_git("acme/widgets", {"commit-tree", tree, "-p", parent, "-m", "upstream gz"})
            .substr(0, 40);
    forge_git("acme/widgets", {"update-ref", "refs/heads/main", next});
    auto r = sandbox_run({"env", "GIT_TRACE_CURL=1", "GIT_TRACE_CURL_NO_DATA=1", "git", "-C",
                          dir.string(), "-c", "protocol.version=0", "fetch", "origin"});
    BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
    BOOST_TEST(contains(r.output, "Content-Encoding: gzip"), "no gzip request was sent");
    BOOST_TEST(rev(dir, "origin/main") == next);
  }
  // Git-Protocol reaches the forge: a v2 advertisement comes back.
  auto adv = curl({"-u", "x-ferry:" + cred, "-H", "Git-Protocol: version=2",
                   base() + "/acme/widgets.git/info/refs?service=git-upload-pack"});
  BOOST_TEST(contains(adv.output, "version 2"), adv.output);
  adv = curl({"-u", "x-ferry:" + cred, base() + "/acme/widgets.git/info/refs?service=git-upload-pack"});
  BOOST_TEST(!contains(adv.output, "version 2"), adv.output);
  // The observer saw both protocol versions, all for sb-1, all fine.
  bool v2 = false, v0 = false;
  for (const auto& op : ops_copy()) {
    if (op.http_status == 401)
      continue;  // curl's first try carries no credential; git then sends the one in the URL
    BOOST_TEST(op.sandbox_id == "sb-1");
    BOOST_TEST(op.repo == "acme/widgets");
    BOOST_TEST((op.result == op_result::ok), describe(op));
    BOOST_TEST((op.service == git_service::upload_pack));
    v2 = v2 || op.protocol_version == 2;
    v0 = v0 || op.protocol_version == 0;
  }
  BOOST_TEST(v2);
  BOOST_TEST(v0);
}

BOOST_FIXTURE_TEST_CASE(push_to_the_task_branch_succeeds, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  commit(dir, "first change");
  auto r = git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-1"});
  BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
  BOOST_TEST(forge_git("acme/widgets", {"rev-parse", "refs/heads/ferry/task-1"}).substr(0, 40) ==
             rev(dir));
  // Fast-forward.
  commit(dir, "second change");
  r = git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-1"});
  BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
  BOOST_TEST(forge_git("acme/widgets", {"rev-parse", "refs/heads/ferry/task-1"}).substr(0, 40) ==
             rev(dir));
  // Force (a rewritten task branch is the agent's own business).
  BOOST_REQUIRE(git({"-C", dir.string(), "commit", "-q", "--amend", "-m", "rewritten"}).status.ok());
  r = git({"-C", dir.string(), "push", "--force", "origin", "HEAD:ferry/task-1"});
  BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
  auto op = last_push();  // (before the next sandbox command)
  BOOST_TEST(forge_git("acme/widgets", {"rev-parse", "refs/heads/ferry/task-1"}).substr(0, 40) ==
             rev(dir));
  BOOST_REQUIRE(op.has_value());
  BOOST_TEST((op->result == op_result::ok), describe(*op));
  BOOST_REQUIRE(op->updates.size() == 1u);
  BOOST_TEST(op->updates[0].ref == "refs/heads/ferry/task-1");
  BOOST_TEST(op->updates[0].new_oid == rev(dir));
  BOOST_TEST(op->bytes_in > 0u);
  // main is untouched.
  BOOST_TEST(contains(forge_refs(), "refs/heads/main"));
}

// A pack larger than git's http.postBuffer (1 MiB) goes as a chunked request after git's "0000"
// probe; the clone afterwards brings it back. Both stream through the proxy's 64 KiB buffers.
BOOST_FIXTURE_TEST_CASE(large_packs_stream_both_ways, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  {
    std::mt19937_64 rng(42);
    std::ofstream big(dir / "big.bin", std::ios::binary);
    for (int i = 0; i < (6 << 20) / 8; ++i) {
      const auto v = rng();
      big.write(reinterpret_cast<const char*>(&v), sizeof v);
    }
  }
  BOOST_REQUIRE(git({"-C", dir.string(), "add", "big.bin"}).status.ok());
  BOOST_REQUIRE(git({"-C", dir.string(), "commit", "-q", "-m", "big"}).status.ok());
  auto r = git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-1"});
  BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
  // git first POSTs a "0000" probe, then the pack (chunked): find the big one.
  auto op = await_op([](const git_operation& o) {
    return o.service == git_service::receive_pack && !o.advertisement && o.bytes_in > (5u << 20);
  });
  BOOST_TEST(forge_git("acme/widgets", {"rev-parse", "refs/heads/ferry/task-1"}).substr(0, 40) ==
             rev(dir));
  BOOST_REQUIRE(op.has_value());
  BOOST_TEST((op->result == op_result::ok));
  const auto back = tmp.path() / "back";
  r = git({"clone", "--branch", "ferry/task-1", url(cred), back.string()});
  BOOST_REQUIRE_MESSAGE(r.status.ok(), r.output);
  BOOST_TEST(fs::file_size(back / "big.bin") == (6u << 20));
  BOOST_TEST(git({"-C", back.string(), "fsck", "--no-progress"}).status.ok());
}

BOOST_FIXTURE_TEST_CASE(push_to_main_is_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  commit(dir, "sneaky");
  const auto before = forge_refs();
  auto r = git({"-C", dir.string(), "push", "origin", "HEAD:main"});
  expect_rejected(*this, r, before, "only refs/heads/ferry/task-1 may be pushed");
  // Protocol v0 asked for explicitly, a full ref name.
  r = git({"-C", dir.string(), "-c", "protocol.version=0", "push", "--no-thin", "origin",
           "HEAD:refs/heads/main"});
  expect_rejected(*this, r, before, "only refs/heads/ferry/task-1 may be pushed");
  // Another branch under the prefix is not the task branch either.
  r = git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-2"});
  expect_rejected(*this, r, before, "only refs/heads/ferry/task-1 may be pushed");
}

BOOST_FIXTURE_TEST_CASE(pushing_a_tag_is_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  BOOST_REQUIRE(git({"-C", dir.string(), "tag", "v1"}).status.ok());
  BOOST_REQUIRE(git({"-C", dir.string(), "tag", "-a", "v2", "-m", "annotated"}).status.ok());
  const auto before = forge_refs();
  expect_rejected(*this, git({"-C", dir.string(), "push", "origin", "v1"}), before,
                  "pushing tags is not allowed");
  expect_rejected(*this, git({"-C", dir.string(), "push", "origin", "v2"}), before,
                  "pushing tags is not allowed");
  expect_rejected(*this, git({"-C", dir.string(), "push", "origin", "HEAD:refs/tags/ferry/task-1"}),
                  before, "pushing tags is not allowed");
}

BOOST_FIXTURE_TEST_CASE(deleting_a_branch_is_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  const auto main_oid = forge_git("acme/widgets", {"rev-parse", "main"}).substr(0, 40);
  forge_git("acme/widgets", {"update-ref", "refs/heads/feature", main_oid});
  // The task branch exists too (pushed through the proxy).
  commit(dir, "task work");
  BOOST_REQUIRE(git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-1"}).status.ok());
  const auto before = forge_refs();
  BOOST_REQUIRE(contains(before, "refs/heads/feature"));
  for (const std::string ref : {"feature", "main", "ferry/task-1"})
    expect_rejected(*this, git({"-C", dir.string(), "push", "origin", "--delete", ref}), before,
                    "deleting refs is not allowed");
}

BOOST_FIXTURE_TEST_CASE(force_pushing_another_branch_is_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  const auto main_oid = forge_git("acme/widgets", {"rev-parse", "main"}).substr(0, 40);
  forge_git("acme/widgets", {"update-ref", "refs/heads/feature", main_oid});
  BOOST_REQUIRE(git({"-C", dir.string(), "commit", "-q", "--amend", "-m", "rewrite"}).status.ok());
  const auto before = forge_refs();
  expect_rejected(*this, git({"-C", dir.string(), "push", "--force", "origin", "HEAD:feature"}),
                  before, "only refs/heads/ferry/task-1 may be pushed");
  expect_rejected(*this, git({"-C", dir.string(), "push", "--force", "origin", "HEAD:main"}),
                  before, "only refs/heads/ferry/task-1 may be pushed");
}

BOOST_FIXTURE_TEST_CASE(a_push_with_one_bad_ref_is_refused_as_a_whole, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  commit(dir, "work");
  const auto before = forge_refs();
  auto r = git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-1", "HEAD:main"});
  expect_rejected(*this, r, before, "only refs/heads/ferry/task-1 may be pushed");
  BOOST_TEST(contains(r.output, "refused with the rest of the push"), r.output);
  BOOST_TEST(!contains(forge_refs(), "ferry/task-1"));
}

BOOST_FIXTURE_TEST_CASE(another_repository_is_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto other_before = forge_refs("acme/other");
  auto r = git({"clone", url(cred, "acme/other"), (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "not valid for repository 'acme/other'"), r.output);
  // Pushing there from a clone of the right repository.
  const auto dir = clone(cred);
  commit(dir, "work");
  r = git({"-C", dir.string(), "push", url(cred, "acme/other"), "HEAD:refs/heads/ferry/task-1"});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "not valid for repository 'acme/other'"), r.output);
  // A repository that does not exist at all, and one named like a path trick.
  r = git({"clone", url(cred, "acme/widgets2"), (tmp.path() / "y").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(forge_refs("acme/other") == other_before);
}

BOOST_FIXTURE_TEST_CASE(another_sandboxs_credential_is_refused, world) {
  const auto mine = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto theirs = cred_for("sb-2", "acme/other", "ferry/task-2");
  const auto dir = clone(mine);
  commit(dir, "work");
  const auto before = forge_refs();
  // sb-2's credential on sb-1's repository: neither clone nor push.
  auto r = git({"clone", url(theirs), (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "not valid for repository 'acme/widgets'"), r.output);
  r = git({"-C", dir.string(), "push", url(theirs), "HEAD:refs/heads/ferry/task-2"});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "not valid for repository"), r.output);
  BOOST_TEST(forge_refs() == before);
  // A made-up credential.
  r = git({"-C", dir.string(), "push", url(std::string(64, 'a')), "HEAD:refs/heads/ferry/task-1"});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "invalid credential"), r.output);
  // The forge's own token is not a proxy credential.
  r = git({"-C", dir.string(), "push", url(token), "HEAD:refs/heads/ferry/task-1"});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(forge_refs() == before);
  {
    // (This URL contained the token only because the test put it there; drop it from the
    // transcript so the leak check stays meaningful for what the proxy sends.)
    std::lock_guard<std::mutex> lock(mu);
    for (auto p = transcript.find(token); p != std::string::npos; p = transcript.find(token))
      transcript.replace(p, token.size(), "<test-put-token>");
  }
}

BOOST_FIXTURE_TEST_CASE(expired_and_revoked_credentials_are_refused, world) {
  const auto expired =
      cred_for("sb-old", "acme/widgets", "ferry/task-1", clock_type::now() - std::chrono::seconds(1));
  auto r = git({"clone", url(expired), (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "credential expired"), r.output);

  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto dir = clone(cred);
  commit(dir, "work");
  const auto before = forge_refs();
  proxy->revoke_sandbox("sb-1");
  r = git({"-C", dir.string(), "push", "origin", "HEAD:ferry/task-1"});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "credential revoked"), r.output);
  BOOST_TEST(forge_refs() == before);
  r = git({"-C", dir.string(), "fetch", "origin"});
  BOOST_TEST(!r.status.ok());
  // Re-registering draws a new credential; the old one stays dead.
  const auto fresh = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  BOOST_TEST(fresh != cred);
  r = git({"-C", dir.string(), "fetch", "origin"});
  BOOST_TEST(!r.status.ok());
  r = git({"-C", dir.string(), "push", url(fresh), "HEAD:refs/heads/ferry/task-1"});
  BOOST_TEST(r.status.ok(), r.output);
  // Branches outside the prefix cannot be registered.
  BOOST_TEST(!proxy->register_sandbox("sb-9", "acme/widgets", "main", clock_type::now() +
                                                                          std::chrono::hours(1)).ok());
  BOOST_TEST(!proxy->register_sandbox("sb-9", "acme/widgets", "ferry/../main",
                                      clock_type::now() + std::chrono::hours(1)).ok());
}

BOOST_FIXTURE_TEST_CASE(no_credential_is_asked_for_and_refused, world) {
  const std::string bare_url =
      "http://127.0.0.1:" + std::to_string(proxy->port()) + "/acme/widgets.git";
  auto r = git({"clone", bare_url, (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  // git asked for a user name (prompts are disabled here): the proxy answered 401 + Basic.
  BOOST_TEST(contains(r.output, "could not read Username"), r.output);
  auto c = curl({base() + "/acme/widgets.git/info/refs?service=git-upload-pack"});
  BOOST_TEST(contains(c.output, "HTTP/1.1 401"), c.output);
  BOOST_TEST(contains(c.output, "WWW-Authenticate: Basic"), c.output);
  BOOST_TEST(contains(c.output, "authentication required"), c.output);
  // A Basic header without a password match, and a garbled header.
  c = curl({"-H", "Authorization: Basic !!!", base() + "/acme/widgets.git/info/refs?service=git-upload-pack"});
  BOOST_TEST(contains(c.output, "HTTP/1.1 401"), c.output);
}

BOOST_FIXTURE_TEST_CASE(path_traversal_and_other_paths_are_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto before_w = forge_refs(), before_o = forge_refs("acme/other");
  const std::string q = "?service=git-upload-pack";
  const std::vector<std::string> targets = {
      "/acme/widgets.git/../other.git/info/refs" + q,
      "/acme/../acme/other.git/info/refs" + q,
      "/acme/%2e%2e/acme/other.git/info/refs" + q,
      "/acme/%2E%2E/other.git/info/refs" + q,
      "/acme%2fother.git/info/refs" + q,
      "/acme/widgets.git%2finfo/refs" + q,
      "//acme/widgets.git/info/refs" + q,
      "/acme//widgets.git/info/refs" + q,
      "/acme/./widgets.git/info/refs" + q,
      "/acme/widgets.git/info/refs",                                  // no service: dumb HTTP
      "/acme/widgets.git/info/refs?service=git-upload-pack&x=1",
      "/acme/widgets.git/info/refs?service=git-upload-archive",
      "/acme/widgets.git/HEAD",
      "/acme/widgets.git/objects/info/packs",
      "/acme/widgets.git/config",
      "/",
      "/acme\\widgets.git/info/refs" + q,
  };
  for (const auto& t : targets) {
    auto c = curl({"-u", "x-ferry:" + cred, base() + t});
    BOOST_TEST(c.status.ok(), c.output);  // curl itself worked …
    BOOST_TEST(!contains(c.output, "HTTP/1.1 200"), t << "\n" << c.output);  // … and was refused
    BOOST_TEST(contains(c.output, "ferry git proxy: refused"), t << "\n" << c.output);
  }
  // POST to info/refs, GET of the service endpoints.
  auto c = curl({"-u", "x-ferry:" + cred, "-X", "POST", base() + "/acme/widgets.git/info/refs" + q});
  BOOST_TEST(!contains(c.output, "HTTP/1.1 200"), c.output);
  c = curl({"-u", "x-ferry:" + cred, base() + "/acme/widgets.git/git-upload-pack"});
  BOOST_TEST(!contains(c.output, "HTTP/1.1 200"), c.output);
  // Real git on a percent-encoded traversal.
  auto r = git({"clone",
                "http://x-ferry:" + cred + "@127.0.0.1:" + std::to_string(proxy->port()) +
                    "/acme/%2e%2e/acme/other.git",
                (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(forge_refs() == before_w);
  BOOST_TEST(forge_refs("acme/other") == before_o);
  // The valid form works (the refusals above are about the path, not the credential).
  c = curl({"-u", "x-ferry:" + cred, base() + "/acme/widgets.git/info/refs" + q});
  BOOST_TEST(contains(c.output, "HTTP/1.1 200"), c.output);
  BOOST_TEST(contains(c.output, "# service=git-upload-pack"), c.output);
}

BOOST_FIXTURE_TEST_CASE(smuggled_refs_and_malformed_pushes_are_refused, world) {
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto main_oid = forge_git("acme/widgets", {"rev-parse", "main"}).substr(0, 40);
  const std::string zero(40, '0');
  const auto before = forge_refs();
  auto pkt = [](const std::string& payload) {
    char len[5];
    std::snprintf(len, sizeof len, "%04zx", payload.size() + 4);
    return std::string(len) + payload;
  };
  auto post = [&](const std::string& body) {
    const auto file = tmp.path() / ("body" + std::to_string(++counter));
    std::ofstream(file, std::ios::binary) << body;
    return curl({"-u", "x-ferry:" + cred, "-H",
                 "Content-Type: application/x-git-receive-pack-request", "--data-binary",
                 "@" + file.string(), base() + "/acme/widgets.git/git-receive-pack"});
  };
  const std::string caps = std::string("\0report-status side-band-64k", 28);
  struct smuggle {
    std::string ref;
    std::string reason;
  };
  const std::vector<smuggle> refs = {
      {"refs/heads/ferry/task-1.lock", "invalid ref name"},
      {"refs/heads/ferry/../main", "invalid ref name"},
      {"refs/heads/ferry/task-1@{1}", "invalid ref name"},
      {"refs/heads/ferry//task-1", "invalid ref name"},
      {"refs/heads/ferry/task-1\x01", "invalid ref name"},
      {"refs/heads/ferry/task-1 ", "invalid ref name"},
      {"refs/heads/ferry/task-1/", "invalid ref name"},
      {"refs/heads/main", "only refs/heads/ferry/task-1 may be pushed"},
      {"HEAD", "invalid ref name"},
      {"refs/heads/ferry/task-1x", "only refs/heads/ferry/task-1 may be pushed"},
      {"refs/remotes/origin/ferry/task-1", "only refs/heads/ferry/task-1 may be pushed"},
  };
  for (const auto& s : refs) {
    auto c = post(pkt(zero + " " + main_oid + " " + s.ref + caps) + "0000");
    BOOST_TEST(contains(c.output, "HTTP/1.1 200"), c.output);
    BOOST_TEST(contains(c.output, "ng "), c.output);
    BOOST_TEST(contains(c.output, s.reason), s.ref << "\n" << c.output);
    BOOST_TEST(forge_refs() == before);
  }
  // Duplicate commands for the task branch.
  auto c = post(pkt(zero + " " + main_oid + " refs/heads/ferry/task-1" + caps) +
                pkt(zero + " " + main_oid + " refs/heads/ferry/task-1") + "0000");
  BOOST_TEST(contains(c.output, "duplicate ref in one push"), c.output);
  // Without side-band the report is plain pkt-lines.
  c = post(pkt(zero + " " + main_oid + " refs/heads/main" + std::string("\0report-status", 14)) +
           "0000");
  BOOST_TEST(contains(c.output, "ng refs/heads/main only refs/heads/ferry/task-1 may be pushed"),
             c.output);
  // Malformed requests: a push certificate, a bad length, garbage, a truncated list.
  for (const std::string& body :
       {pkt(std::string("push-cert\0report-status", 23)) + "0000", std::string("zzzz0000"),
        pkt("not a command") + "0000",
        pkt(zero + " " + main_oid + " refs/heads/ferry/task-1" + caps)}) {
    c = post(body);
    BOOST_TEST(contains(c.output, "HTTP/1.1 400"), c.output);
    BOOST_TEST(contains(c.output, "refused push"), c.output);
  }
  // gzip is refused for receive-pack (the command list must be read as sent).
  c = curl({"-u", "x-ferry:" + cred, "-H", "Content-Encoding: gzip", "-H",
            "Content-Type: application/x-git-receive-pack-request", "--data-binary", "xyz",
            base() + "/acme/widgets.git/git-receive-pack"});
  BOOST_TEST(contains(c.output, "HTTP/1.1 415"), c.output);
  BOOST_TEST(forge_refs() == before);
}

BOOST_FIXTURE_TEST_CASE(serves_a_unix_socket_and_records_the_sandbox_header, world) {
  git_proxy_options o;
  o.listen_tcp = false;
  o.unix_socket = tmp.path() / "git.sock";
  auto unix_proxy = start_proxy(forge->base_url(), o);
  auto cred = unix_proxy->register_sandbox("sb-u", "acme/widgets", "ferry/u",
                                           clock_type::now() + std::chrono::hours(1));
  BOOST_REQUIRE(cred.ok());
  auto c = curl({"--unix-socket", o.unix_socket.string(), "-u", "x-ferry:" + *cred, "-H",
                 "Ferry-Sandbox: sb-u",
                 "http://git.ferry.internal/acme/widgets.git/info/refs?service=git-upload-pack"});
  BOOST_TEST(contains(c.output, "HTTP/1.1 200"), c.output);
  BOOST_TEST(contains(c.output, "refs/heads/main"), c.output);
  const auto op = await_op([](const git_operation& o) {
    return o.sandbox_id == "sb-u" && o.ferry_sandbox == "sb-u" && o.result == op_result::ok &&
           o.advertisement;
  });
  BOOST_TEST(op.has_value());
  unix_proxy.reset();
  BOOST_TEST(!fs::exists(o.unix_socket));
}

BOOST_FIXTURE_TEST_CASE(an_unreachable_forge_is_a_clear_error_without_hang, world) {
  namespace net = boost::asio;
  std::uint16_t closed_port = 0;
  {
    net::io_context ioc;
    net::ip::tcp::acceptor a(ioc, {net::ip::make_address("127.0.0.1"), 0});
    closed_port = a.local_endpoint().port();
  }
  git_proxy_options o;
  o.io_timeout = std::chrono::seconds(5);
  proxy = start_proxy("http://127.0.0.1:" + std::to_string(closed_port), o);
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  const auto started = std::chrono::steady_clock::now();
  auto r = git({"clone", url(cred), (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "is unreachable"), r.output);
  BOOST_TEST((std::chrono::steady_clock::now() - started < std::chrono::seconds(30)));
  const auto op = await_op([](const git_operation& o) {
    return o.result == op_result::upstream_error && contains(o.reason, "is unreachable");
  });
  BOOST_TEST(op.has_value());
}

// A fake forge that answers every request with HTTP 500 and echoes what it received (the
// Authorization header and the token) in the body; over TLS when given a certificate.
class echo_forge {
 public:
  echo_forge(std::string token, const ferry::test::test_pki* pki = nullptr,
             const std::string& address = "127.0.0.1")
    : token_(std::move(token)),
      acc_(ioc_, {boost::asio::ip::make_address(address), 0}),
      tls_(boost::asio::ssl::context::tls_server),
      address_(address) {
    if (pki) {
      tls_.use_certificate_chain_file(pki->server_cert.string());
      tls_.use_private_key_file(pki->server_key.string(), boost::asio::ssl::context::pem);
    }
    port_ = acc_.local_endpoint().port();
    thread_ = std::thread([this, pki] {
      while (!done_) {
        boost::asio::ip::tcp::socket s(ioc_);
        boost::system::error_code ec;
        acc_.accept(s, ec);
        if (ec || done_)
          return;
        if (pki) {
          boost::asio::ssl::stream<boost::asio::ip::tcp::socket> t(std::move(s), tls_);
          t.handshake(boost::asio::ssl::stream_base::server, ec);
          if (!ec)
            answer(t);
        } else {
          answer(s);
        }
      }
    });
  }
  ~echo_forge() {
    done_ = true;
    boost::asio::io_context wake_ctx;
    boost::asio::ip::tcp::socket wake(wake_ctx);
    boost::system::error_code ec;
    wake.connect({boost::asio::ip::make_address(address_), port_}, ec);
    thread_.join();
  }
  std::uint16_t port() const { return port_; }
  int served() const { return served_; }

 private:
  template <class Stream>
  void answer(Stream& s) {
    namespace http = boost::beast::http;
    boost::system::error_code ec;
    boost::beast::flat_buffer b;
    http::request<http::string_body> req;
    http::read(s, b, req, ec);
    if (ec)
      return;
    http::response<http::string_body> res{http::status::internal_server_error, 11};
    res.set(http::field::content_type, "text/plain");
    res.body() = "upstream failed; you sent " + std::string(req[http::field::authorization]) +
                 " for token " + token_ + "\n";
    res.prepare_payload();
    http::write(s, res, ec);
    ++served_;
  }

  std::string token_;
  boost::asio::io_context ioc_;
  boost::asio::ip::tcp::acceptor acc_;
  boost::asio::ssl::context tls_;
  std::string address_;
  std::uint16_t port_ = 0;
  std::atomic<bool> done_{false};
  std::atomic<int> served_{0};
  std::thread thread_;
};

// Upstream error bodies are passed on only with the token scrubbed.
BOOST_FIXTURE_TEST_CASE(upstream_error_bodies_are_scrubbed, world) {
  echo_forge echo(token);
  proxy = start_proxy("http://127.0.0.1:" + std::to_string(echo.port()));
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  auto r = git({"clone", url(cred), (tmp.path() / "x").string()});
  auto c = curl({"-u", "x-ferry:" + cred, base() + "/acme/widgets.git/info/refs?service=git-upload-pack"});
  BOOST_TEST(echo.served() >= 2);
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(c.output, "HTTP/1.1 500"), c.output);
  BOOST_TEST(contains(c.output, "[redacted]"), c.output);
  BOOST_TEST(contains(c.output, "upstream failed"), c.output);
  BOOST_TEST(!contains(c.output, token));
  BOOST_TEST(!contains(r.output, token));
  // (The fixture's destructor checks the whole transcript and the observer's reports too.)
}

// https:// upstreams: the certificate is verified (CA and host name); the token goes only over
// a verified connection.
BOOST_FIXTURE_TEST_CASE(a_tls_forge_is_verified, world) {
  ferry::test::test_pki pki(tmp.path() / "pki");
  echo_forge echo(token, &pki);
  const std::string target = "/acme/widgets.git/info/refs?service=git-upload-pack";
  {
    git_proxy_options o;
    o.ca_file = pki.ca_cert;
    proxy = start_proxy("https://localhost:" + std::to_string(echo.port()), o);
    const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
    auto c = curl({"-u", "x-ferry:" + cred, base() + target});
    BOOST_TEST(contains(c.output, "HTTP/1.1 500"), c.output);  // the forge's answer, over TLS
    BOOST_TEST(contains(c.output, "[redacted]"), c.output);
    BOOST_TEST(echo.served() == 1);
  }
  {
    // A CA that did not issue the forge's certificate: no request is sent.
    git_proxy_options o;
    o.ca_file = pki.other_ca_cert;
    proxy = start_proxy("https://localhost:" + std::to_string(echo.port()), o);
    const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
    auto c = curl({"-u", "x-ferry:" + cred, base() + target});
    BOOST_TEST(contains(c.output, "HTTP/1.1 502"), c.output);
    BOOST_TEST(contains(c.output, "TLS with the forge"), c.output);
    BOOST_TEST(echo.served() == 1);
  }
  {
    // The right CA but another name than the certificate's (it names localhost, 127.0.0.1).
    echo_forge elsewhere(token, &pki, "127.0.0.2");
    git_proxy_options o;
    o.ca_file = pki.ca_cert;
    proxy = start_proxy("https://127.0.0.2:" + std::to_string(elsewhere.port()), o);
    const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
    auto c = curl({"-u", "x-ferry:" + cred, base() + target});
    BOOST_TEST(contains(c.output, "HTTP/1.1 502"), c.output);
    BOOST_TEST(contains(c.output, "TLS with the forge"), c.output);
    BOOST_TEST(elsewhere.served() == 0);
  }
}

// The local forge wants its token; the proxy does not turn the forge's refusal into a prompt for
// the sandbox (401/403 upstream become 502) and never shows the token it tried.
BOOST_FIXTURE_TEST_CASE(the_forge_requires_its_token, world) {
  const std::string forge_url = forge->base_url() + "/acme/widgets.git/info/refs?service=git-upload-pack";
  auto c = curl({forge_url});
  BOOST_TEST(contains(c.output, "HTTP/1.1 401"), c.output);
  BOOST_TEST(contains(c.output, "WWW-Authenticate: Basic"), c.output);
  c = curl({"-u", "x:wrong-token-of-enough-length", forge_url});
  BOOST_TEST(contains(c.output, "HTTP/1.1 403"), c.output);

  const std::string wrong = "wrong-" + random_token();
  git_proxy_options o;
  o.upstream_url = forge->base_url();
  o.token = [&](const std::function<void(std::string_view)>& fn) {
    fn(wrong);
    return ferry::result<void>{};
  };
  o.observer = [this](const git_operation& op) {
    std::lock_guard<std::mutex> lock(mu);
    ops.push_back(op);
    transcript += describe(op);
  };
  auto p = git_proxy::start(std::move(o));
  BOOST_REQUIRE(p.ok());
  proxy = std::move(*p);
  const auto cred = cred_for("sb-1", "acme/widgets", "ferry/task-1");
  auto r = git({"clone", url(cred), (tmp.path() / "x").string()});
  BOOST_TEST(!r.status.ok());
  BOOST_TEST(contains(r.output, "the forge refused the proxy's credentials (HTTP 403)"), r.output);
  BOOST_TEST(contains(r.output, "error: 502"), r.output);
  std::lock_guard<std::mutex> lock(mu);
  BOOST_TEST(!contains(transcript, wrong));
}
