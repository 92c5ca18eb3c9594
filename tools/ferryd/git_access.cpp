// ferryd's git access (see git_access.h).

#include "git_access.h"

#include <cstdio>
#include <system_error>

#include <fmt/format.h>
#include <openssl/rand.h>

namespace ferry::ferryd {

namespace fs = std::filesystem;

namespace {

constexpr const char* forge_token_name = "forge-token";
constexpr auto credential_lifetime = std::chrono::hours(25);  // past any task's wall clock (≤ 24 h)

result<std::string> random_hex(size_t bytes) {
  std::string raw(bytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(bytes)) != 1)
    return fail("RAND_bytes failed");
  std::string out;
  for (unsigned char c : raw)
    out += fmt::format("{:02x}", c);
  return out;
}

bool has_repositories(const fs::path& root) {
  std::error_code ec;
  for (fs::recursive_directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_directory(ec) && it->path().extension() == ".git")
      return true;
    if (it.depth() >= 4)
      it.disable_recursion_pending();
  }
  return false;
}

/// For a log line: at most 200 bytes, control characters and non-ASCII as '?'.
std::string printable(std::string_view s) {
  std::string out(s.substr(0, 200));
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f)
      c = '?';
  return out;
}

std::string_view service_name(gitproxy::git_service s) {
  return s == gitproxy::git_service::receive_pack ? "receive-pack" : "upload-pack";
}

std::string_view result_name(gitproxy::op_result r) {
  switch (r) {
    case gitproxy::op_result::ok: return "ok";
    case gitproxy::op_result::refused: return "refused";
    case gitproxy::op_result::upstream_error: return "upstream_error";
  }
  return "?";
}

}  // namespace

result<std::unique_ptr<git_access>> git_access::start(git_access_options opts) {
  if (!opts.credentials)
    return fail("git access: no credential manager");
  auto self = std::make_unique<git_access>();
  std::string upstream = opts.forge_url;
  if (upstream.empty()) {
    // The embedded forge: its token is drawn once and kept encrypted like any forge token.
    bool have = false;
    auto used = opts.credentials->use(forge_token_name, [&](std::string_view) { have = true; });
    if (!used && used.error().code != errc::not_found)
      return fail(fmt::format("the local forge's token: {}", used.error().message));
    if (!have) {
      auto token = random_hex(32);
      if (!token)
        return token.error();
      if (auto r = opts.credentials->put(forge_token_name, *token); !r)
        return fail(fmt::format("the local forge's token: {}", r.error().message));
    }
    gitproxy::local_forge_options fo;
    fo.root = opts.data_dir / "forge";
    if (auto r = opts.credentials->use(forge_token_name, [&](std::string_view t) { fo.token = std::string(t); }); !r)
      return fail(fmt::format("the local forge's token: {}", r.error().message));
    const bool fresh = !has_repositories(fo.root);
    auto forge = gitproxy::local_forge::start(std::move(fo));
    if (!forge)
      return fail(fmt::format("the local forge: {}", forge.error().message));
    self->forge_ = std::move(*forge);
    if (fresh) {
      if (auto r = self->forge_->create_repo("demo/hello"); !r)
        return fail(fmt::format("the local forge: demo/hello: {}", r.error().message));
    }
    upstream = self->forge_->base_url();
  } else {
    bool have = false;
    auto used = opts.credentials->use(forge_token_name, [&](std::string_view) { have = true; });
    if (!used || !have)
      return fail(fmt::format("--forge-url {} needs the forge's token: give it once with --forge-token-file "
                              "(kept encrypted as `{}`){}",
                              opts.forge_url, forge_token_name,
                              used ? std::string() : "; " + used.error().message));
  }
  self->upstream_ = upstream;
  self->socket_ = opts.data_dir / "git-proxy.sock";
  std::error_code ec;
  fs::remove(self->socket_, ec);  // a leftover of an earlier ferryd
  gitproxy::git_proxy_options po;
  po.listen_tcp = false;
  po.unix_socket = self->socket_;
  po.upstream_url = upstream;
  po.ca_file = opts.ca_file;
  po.upstream_user = opts.forge_user;
  po.token = opts.credentials->user_of(forge_token_name);
  po.observer = [raw = self.get()](const gitproxy::git_operation& op) { raw->observe(op); };
  auto proxy = gitproxy::git_proxy::start(std::move(po));
  if (!proxy)
    return fail(fmt::format("the git proxy: {}", proxy.error().message));
  self->proxy_ = std::move(*proxy);
  return self;
}

git_access::~git_access() {
  if (proxy_)
    proxy_->stop();
  if (forge_)
    forge_->stop();
}

result<actors::repo_access::grant> git_access::open(
  const std::string& sandbox_id, const std::string& task_id, const std::string& repo,
  std::function<void(const schemas::git_operation_fields&)> report) {
  if (!gitproxy::valid_repo_name(repo))
    return fail(errc::invalid_argument,
                fmt::format("\"{}\" is not a repository name of the forge (org/name)", repo.substr(0, 200)));
  const std::string branch = "ferry/" + task_id;
  auto credential =
    proxy_->register_sandbox(sandbox_id, repo, branch, std::chrono::system_clock::now() + credential_lifetime);
  if (!credential)
    return credential.error();
  {
    std::lock_guard lock(mu_);
    reports_[sandbox_id] =
      std::make_shared<std::function<void(const schemas::git_operation_fields&)>>(std::move(report));
  }
  return grant{fmt::format("http://ferry:{}@{}/{}.git", *credential, git_internal_host, repo), branch};
}

void git_access::close(const std::string& sandbox_id) {
  proxy_->revoke_sandbox(sandbox_id);
  std::lock_guard lock(mu_);
  reports_.erase(sandbox_id);
}

std::string git_access::describe() const {
  if (forge_)
    return fmt::format("local forge at {} (repositories under {}), git proxy on {}", upstream_,
                       forge_->repo_path("x").parent_path().string(), socket_.string());
  return fmt::format("forge {}, git proxy on {}", upstream_, socket_.string());
}

void git_access::observe(const gitproxy::git_operation& op) {
  // Without a valid credential the request is attributed to the sandbox the egress proxy named
  // (it sets Ferry-Sandbox itself and drops one a sandbox sends; nothing else reaches this
  // proxy's socket). A 401 without one is git's first try before it sends the credential: not
  // an operation.
  if (op.sandbox_id.empty() && op.http_status == 401)
    return;
  const std::string& who = op.sandbox_id.empty() ? op.ferry_sandbox : op.sandbox_id;
  std::shared_ptr<std::function<void(const schemas::git_operation_fields&)>> report;
  if (!who.empty()) {
    std::lock_guard lock(mu_);
    if (auto it = reports_.find(who); it != reports_.end())
      report = it->second;
  }
  if (!report) {
    // No valid credential (or its sandbox has ended): no task to record it on.
    std::fprintf(stderr, "ferryd: git proxy: %s %s of \"%s\" by no live sandbox (claimed: \"%s\"): %s\n",
                 std::string(result_name(op.result)).c_str(), std::string(service_name(op.service)).c_str(),
                 printable(op.repo).c_str(), printable(op.ferry_sandbox).c_str(), printable(op.reason).c_str());
    return;
  }
  schemas::git_operation_fields g;
  g.sandbox_id = who;
  g.repo = op.repo;
  g.service = std::string(service_name(op.service));
  g.advertisement = op.advertisement;
  g.protocol_version = static_cast<uint8_t>(op.protocol_version);
  for (const auto& u : op.updates)
    g.refs.push_back(u.ref + " " + u.old_oid + " " + u.new_oid);
  g.result = std::string(result_name(op.result));
  g.reason = op.reason;
  g.http_status = static_cast<uint16_t>(op.http_status);
  g.bytes_in = op.bytes_in;
  g.bytes_out = op.bytes_out;
  g.duration_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(op.duration).count());
  (*report)(g);
}

}  // namespace ferry::ferryd
