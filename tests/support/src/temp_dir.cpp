#include "ferry/test_support/temp_dir.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace ferry::test {

std::vector<std::string> mounts_under(const std::filesystem::path& dir) {
  std::vector<std::string> out;
  std::ifstream in("/proc/self/mountinfo");
  const std::string prefix = dir.string() + "/";
  for (std::string line; std::getline(in, line);) {
    // Fields: id parent major:minor root mount-point ...; octal escapes (\040) in paths.
    std::istringstream fields(line);
    std::string id, parent, dev, root, mount_point;
    if (!(fields >> id >> parent >> dev >> root >> mount_point))
      continue;
    std::string decoded;
    for (size_t i = 0; i < mount_point.size(); ++i) {
      if (mount_point[i] == '\\' && i + 3 < mount_point.size()) {
        decoded.push_back(static_cast<char>(std::stoi(mount_point.substr(i + 1, 3), nullptr, 8)));
        i += 3;
      } else {
        decoded.push_back(mount_point[i]);
      }
    }
    if (decoded == dir.string() || decoded.rfind(prefix, 0) == 0)
      out.push_back(decoded);
  }
  return out;
}

temp_dir::temp_dir(std::string_view prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base && *base ? base : "/tmp") + "/" + std::string(prefix) +
                        "-XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    throw std::runtime_error("cannot create a temporary directory " + pattern + ": " +
                             std::strerror(errno));
  }
  path_ = buf.data();
}

temp_dir::~temp_dir() { remove(); }

temp_dir::temp_dir(temp_dir&& other) noexcept : path_(std::exchange(other.path_, {})) {}

temp_dir& temp_dir::operator=(temp_dir&& other) noexcept {
  if (this != &other) {
    remove();
    path_ = std::exchange(other.path_, {});
  }
  return *this;
}

void temp_dir::remove() noexcept {
  if (path_.empty())
    return;
  const char* keep = std::getenv("FERRY_TEST_KEEP_TMP");
  const auto mounts = mounts_under(path_);
  if (keep && *keep && std::string(keep) != "0") {
    std::cerr << "ferry test: keeping " << path_ << " (FERRY_TEST_KEEP_TMP)\n";
  } else if (!mounts.empty()) {
    std::cerr << "ferry test: NOT removing " << path_ << ": something is still mounted in it:";
    for (const auto& m : mounts)
      std::cerr << " " << m;
    std::cerr << "\n";
  } else {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
    if (ec)
      std::cerr << "ferry test: cannot remove " << path_ << ": " << ec.message() << "\n";
  }
  path_.clear();
}

}  // namespace ferry::test
