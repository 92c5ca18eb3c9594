#pragma once
// ferryd's git access (actors::repo_access): the git proxy, the forge behind it, and the route a
// sandbox reaches it by.
//
//  - The forge is the embedded local forge (bare repositories under `<data>/forge`, a random
//    token kept in the credential manager as `forge-token`, a `demo/hello` repository made on
//    first start) unless `forge_url` names another one, whose token must then be in the
//    credential manager under that name (ferryd --forge-token-file stores it).
//  - The git proxy listens on a unix socket only (`<data>/git-proxy.sock`); the egress proxy
//    relays `http://git.ferry.internal/…` to it (internal route), so a sandbox reaches the forge
//    only there and only with its scoped credential.
//  - open() registers the sandbox at the proxy (its repository, push only to `ferry/<task id>`,
//    until close() or 25 h) and keeps its report callback; the proxy's observer hands each
//    request to the callback of the sandbox whose credential it carried (else of the sandbox the
//    egress proxy named in Ferry-Sandbox, which it sets itself); git's unauthenticated first try
//    (401) is not reported.
//
// Threading: thread-safe (one mutex around the callbacks; the proxy's observer runs on its I/O
// threads and calls a report with the mutex released).

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "ferry/actors/tasks.h"
#include "ferry/gitproxy/git_proxy.h"
#include "ferry/gitproxy/local_forge.h"
#include "ferry/storage/credentials.h"

namespace ferry::ferryd {

/// The host name sandboxes reach the git proxy by (an internal route of the egress proxy).
inline constexpr const char* git_internal_host = "git.ferry.internal";

struct git_access_options {
  std::filesystem::path data_dir;
  /// Empty: the embedded local forge. Else the forge's smart-HTTP base URL.
  std::string forge_url;
  std::string forge_user = "x-access-token";
  std::filesystem::path ca_file;
  storage::credential_store* credentials = nullptr;
};

class git_access final : public actors::repo_access {
 public:
  /// Starts the forge (when embedded) and the git proxy. Errors name what is missing (no
  /// `forge-token` for an external forge, a socket that cannot be made).
  [[nodiscard]] static result<std::unique_ptr<git_access>> start(git_access_options opts);
  ~git_access() override;

  result<grant> open(const std::string& sandbox_id, const std::string& task_id, const std::string& repo,
                     std::function<void(const schemas::git_operation_fields&)> report) override;
  void close(const std::string& sandbox_id) override;

  /// The git proxy's unix socket (the egress proxy's route for git_internal_host).
  const std::filesystem::path& socket() const { return socket_; }
  /// What ferryd prints at start: the forge and where it is.
  std::string describe() const;
  /// The embedded forge (null with an external one).
  gitproxy::local_forge* forge() const { return forge_.get(); }

  git_access() = default;

 private:
  void observe(const gitproxy::git_operation& op);

  std::unique_ptr<gitproxy::local_forge> forge_;
  std::unique_ptr<gitproxy::git_proxy> proxy_;
  std::filesystem::path socket_;
  std::string upstream_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<std::function<void(const schemas::git_operation_fields&)>>> reports_;
};

}  // namespace ferry::ferryd
