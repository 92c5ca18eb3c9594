#pragma once
// Private to ferry_sandbox: host paths as the runtimes and the image builder use them.
//
// Threading: pure functions (find_program reads the environment).

#include <filesystem>
#include <optional>
#include <string>

namespace ferry::sandbox::detail {

/// Absolute, normalised, without a trailing separator.
std::filesystem::path clean_path(const std::filesystem::path& p);

/// The executable `name`: itself (cleaned) when it contains a '/', else the first match in PATH,
/// then /usr/sbin and /sbin (root's tools — debootstrap, chroot — which a sudo'd PATH may lack).
std::optional<std::string> find_program(const std::string& name);

}  // namespace ferry::sandbox::detail
