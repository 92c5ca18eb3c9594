// See host_paths.h.

#include "host_paths.h"

#include <unistd.h>

#include <cstdlib>
#include <string_view>

namespace ferry::sandbox::detail {

namespace fs = std::filesystem;

fs::path clean_path(const fs::path& p) {
  std::error_code ec;
  fs::path a = fs::absolute(p, ec).lexically_normal();
  if (!a.has_filename() && a.has_parent_path() && a != a.root_path())
    a = a.parent_path();
  return a;
}

std::optional<std::string> find_program(const std::string& name) {
  if (name.find('/') != std::string::npos)
    return ::access(name.c_str(), X_OK) == 0 ? std::optional(clean_path(name).string())
                                             : std::nullopt;
  const char* path = std::getenv("PATH");
  const std::string all = std::string(path ? path : "/usr/bin:/bin") + ":/usr/sbin:/sbin";
  std::string_view rest = all;
  while (!rest.empty()) {
    auto colon = rest.find(':');
    std::string dir(rest.substr(0, colon));
    rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0)
      return candidate;
  }
  return std::nullopt;
}

}  // namespace ferry::sandbox::detail
