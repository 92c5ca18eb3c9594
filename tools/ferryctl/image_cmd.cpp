// ferryctl image build|list|rm: sandbox root images under <data-dir>/images
// (ferry/sandbox/image.h).

#include <unistd.h>

#include <chrono>
#include <cstdio>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "ctl.h"
#include "ferry/sandbox/image.h"

namespace fs = std::filesystem;

namespace ferry::ctl {
namespace {

fs::path images_dir(const fs::path& data_dir) { return data_dir / "images"; }

std::string human_size(uint64_t bytes) {
  return bytes >= (1ull << 30) ? fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30))
                               : fmt::format("{} MiB", bytes >> 20);
}

nlohmann::json image_json(const sandbox::image_info& i) {
  return {{"hash", i.hash},
          {"rootfs", i.rootfs.string()},
          {"created", i.created},
          {"size_bytes", i.size_bytes},
          {"build_ms", i.build_ms},
          {"suite", i.recipe.suite},
          {"variant", i.recipe.variant},
          {"arch", i.recipe.arch},
          {"mirror", i.recipe.mirror},
          {"packages", i.recipe.packages},
          {"installed", i.packages}};
}

/// The exit code for an image error other than a build failure.
int image_exit_code(errc code) {
  switch (code) {
    case errc::not_found: return exit_no_image;
    case errc::busy: return exit_locked;
    case errc::invalid_argument: return exit_usage;
    default: return exit_image_build_failed;
  }
}

/// list and rm need an existing data directory (a typo should not look like "no images").
int check_data_dir(const fs::path& data_dir) {
  std::error_code ec;
  if (!fs::is_directory(data_dir, ec))
    return fail(exit_no_journal, "data directory '" + data_dir.string() +
                                   "' does not exist (--data-dir; ferryd's default is ./var)");
  return exit_ok;
}

}  // namespace

int run_image_build(const fs::path& data_dir, const image_build_args& a) {
  sandbox::image_recipe recipe;
  recipe.suite = a.suite;
  recipe.mirror = a.mirror;
  recipe.packages = a.packages_given ? a.packages : sandbox::default_image_packages();

  // Progress on stderr. On a terminal debootstrap's many lines share one line that is
  // rewritten; otherwise (a log) every line is kept.
  const bool tty = isatty(STDERR_FILENO);
  const auto started = std::chrono::steady_clock::now();
  bool status_line = false;
  sandbox::image_build_options opts;
  opts.images_dir = images_dir(data_dir);
  opts.rebuild = a.rebuild;
  opts.cancelled = [] { return stop_signal != 0; };
  opts.progress = [&](std::string_view line) {
    const auto s = std::chrono::duration_cast<std::chrono::seconds>(
                     std::chrono::steady_clock::now() - started).count();
    // The tools' routine lines; their errors and warnings (and the builder's steps) stay.
    const bool chatter = line.rfind("debootstrap: I: ", 0) == 0 ||
                         (line.rfind("apt: ", 0) == 0 && line.rfind("apt: E:", 0) != 0 &&
                          line.rfind("apt: W:", 0) != 0);
    if (tty && chatter) {
      std::string shown(line.substr(0, 100));
      std::fprintf(stderr, "\r\033[Kferryctl: [%4llds] %s", static_cast<long long>(s), shown.c_str());
      status_line = true;
    } else {
      std::fprintf(stderr, "%sferryctl: [%4llds] %.*s\n", status_line ? "\r\033[K" : "",
                   static_cast<long long>(s), static_cast<int>(line.size()), line.data());
      status_line = false;
    }
    std::fflush(stderr);
  };
  auto built = sandbox::build_image(recipe, opts);
  if (status_line)
    std::fprintf(stderr, "\r\033[K");
  if (!built) {
    if (built.error().code == errc::closed && stop_signal)
      return fail(128 + stop_signal, built.error().message);
    const auto code = built.error().code;
    return fail(code == errc::invalid_argument ? exit_usage
                : code == errc::busy           ? exit_locked
                                               : exit_image_build_failed,
                "image build: " + built.error().message);
  }
  const auto& i = built->image;
  std::fprintf(stderr, "ferryctl: image %s %s in %.1f s: %s, %s, %zu packages installed\n",
               i.hash.substr(0, 12).c_str(), built->reused ? "cached" : "built",
               static_cast<double>(built->took.count()) / 1000.0, i.rootfs.c_str(),
               human_size(i.size_bytes).c_str(), i.packages.size());
  if (a.json) {
    auto j = image_json(i);
    j["reused"] = built->reused;
    j["took_ms"] = built->took.count();
    emit(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  } else {
    emit(i.hash);
  }
  return exit_ok;
}

int run_image_list(const fs::path& data_dir, const image_list_args& a) {
  if (int code = check_data_dir(data_dir); code != exit_ok)
    return code;
  auto listing = sandbox::list_images(images_dir(data_dir));
  if (!listing)
    return fail(image_exit_code(listing.error().code), listing.error().message);
  if (a.json) {
    for (const auto& i : listing->images)
      if (!emit(image_json(i).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)))
        break;
  } else if (!listing->images.empty()) {
    emit(fmt::format("{:<12}  {:<24}  {:>9}  {:<10}  {}", "HASH", "CREATED", "SIZE", "SUITE",
                     "PACKAGES"));
    for (const auto& i : listing->images) {
      std::string packages = i.recipe.packages.empty()
                               ? "(" + i.recipe.variant + " only)"
                               : fmt::format("{}", fmt::join(i.recipe.packages, " "));
      if (!emit(fmt::format("{:<12}  {:<24}  {:>9}  {:<10}  {}", i.hash.substr(0, 12), i.created,
                            human_size(i.size_bytes), i.recipe.suite, packages)))
        break;
    }
  } else {
    std::fprintf(stderr, "ferryctl: no images under %s; build one with `ferryctl image build`\n",
                 images_dir(data_dir).c_str());
  }
  if (!listing->leftovers.empty())
    std::fprintf(stderr,
                 "ferryctl: %zu leftover(s) of interrupted builds or removals (never used), e.g. "
                 "%s; the next `image build` removes them\n",
                 listing->leftovers.size(), listing->leftovers.front().c_str());
  return exit_ok;
}

int run_image_rm(const fs::path& data_dir, const image_rm_args& a) {
  if (int code = check_data_dir(data_dir); code != exit_ok)
    return code;
  int code = exit_ok;
  for (const auto& which : a.images) {
    auto removed = sandbox::remove_image(images_dir(data_dir), which);
    if (!removed) {
      code = fail(image_exit_code(removed.error().code), removed.error().message);
      continue;
    }
    emit("removed " + removed->hash);
  }
  return code;
}

}  // namespace ferry::ctl
