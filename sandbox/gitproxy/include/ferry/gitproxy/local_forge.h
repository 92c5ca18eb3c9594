#pragma once
// ferry::gitproxy::local_forge — a small smart-HTTP git server: the forge Ferry's embedded
// default uses when no forge is configured, and the upstream of the git proxy's tests.
//
// Serves the bare repositories under `root` (`<root>/<name>.git`) by running `git http-backend`
// as a CGI child per request (GIT_PROJECT_ROOT, GIT_HTTP_EXPORT_ALL, REMOTE_USER, the request's
// method, path, query, content type and length or a chunked body read to EOF, `Git-Protocol` as
// GIT_PROTOCOL, gzip bodies passed as they are with HTTP_CONTENT_ENCODING), streaming both ways
// through bounded buffers. Every request must carry the forge's token as the HTTP Basic password
// (any user name; compared in constant time). Pushes are enabled (`http.receivepack`). The git
// children never read the machine's git configuration (GIT_CONFIG_NOSYSTEM, GIT_CONFIG_GLOBAL).
//
// Threading: thread-safe; requests are served on a few internal I/O threads.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "ferry/schemas/result.h"

namespace ferry::gitproxy {

struct local_forge_options {
  std::filesystem::path root;           ///< bare repositories live here (created if missing)
  std::string token;                    ///< required HTTP Basic password (at least 16 bytes)
  std::string host = "127.0.0.1";       ///< loopback address to listen on
  std::uint16_t port = 0;               ///< 0: any free port (see `port()`)
  int io_threads = 2;
  std::string git = "git";              ///< the git program
};

class local_forge {
 public:
  /// Listens and starts serving. Errors name the address or the missing piece.
  [[nodiscard]] static result<std::unique_ptr<local_forge>> start(local_forge_options opts);
  virtual ~local_forge() = default;

  virtual std::uint16_t port() const = 0;
  /// `http://<host>:<port>`: the smart-HTTP base URL (`<base>/<name>.git`).
  virtual std::string base_url() const = 0;
  /// Creates `<root>/<name>.git`, bare, with HEAD on `main` and one initial commit on `main`
  /// (a README), made with git commands. `name`: 1–4 segments of [A-Za-z0-9._-].
  [[nodiscard]] virtual result<void> create_repo(std::string_view name) = 0;
  /// The path of a repository (whether or not it exists).
  virtual std::filesystem::path repo_path(std::string_view name) const = 0;
  /// Stops accepting, ends live requests (their git children are killed and reaped).
  virtual void stop() = 0;
};

}  // namespace ferry::gitproxy
