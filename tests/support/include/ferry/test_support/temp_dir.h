#pragma once
// ferry::test::temp_dir — a fresh directory that is deleted with everything in it when the
// object goes away. Set FERRY_TEST_KEEP_TMP=1 to keep it for a post-mortem (its path is logged).
//
// Threading: a value owned by one thread.

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::test {

/// Mount points at or below `dir`, from /proc/self/mountinfo.
std::vector<std::string> mounts_under(const std::filesystem::path& dir);

/// Deletion is skipped (with a message) while anything is mounted inside: remove_all would
/// descend into a bind mount left behind by the code under test and delete host files.
class temp_dir {
 public:
  /// Creates `$TMPDIR/<prefix>-XXXXXX` (or under /tmp). Throws std::runtime_error on failure:
  /// a test cannot be hermetic without it.
  explicit temp_dir(std::string_view prefix = "ferry-test");
  ~temp_dir();
  temp_dir(temp_dir&& other) noexcept;
  temp_dir& operator=(temp_dir&& other) noexcept;
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  const std::filesystem::path& path() const { return path_; }

 private:
  void remove() noexcept;
  std::filesystem::path path_;
};

}  // namespace ferry::test
