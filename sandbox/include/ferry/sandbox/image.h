#pragma once
// ferry_sandbox public header: root filesystem images for sandboxes. An image is a Debian root
// built by debootstrap from a recipe (suite, variant, packages, the machine's apt mirror) plus
// Ferry's statx shim, cached under `<images_dir>/<hash>` by the recipe's content hash, so a second
// build of the same recipe returns at once.
//
// On disk (`<images_dir>` is `<data_dir>/images`):
//   <hash>/rootfs/             the root; sandboxes mount it read-only (runtime_options::rootfs)
//   <hash>/manifest.json       hash, recipe, created, size, installed package versions
//   <hash>/build.log           debootstrap's output
//   .build-<hash>-<pid>[-…]/   a build in progress, or the remains of an interrupted one
//   .trash-<hash>-<pid>/       an image being removed
//   .locks/<hash>              flock: exclusive while building or removing, shared while in use
//   .failed-<hash>.log         debootstrap's output of the last failed build of <hash>
// Invariant: a directory named by a hash is complete. A build happens in `.build-…` and is
// renamed to `<hash>` only after its manifest is written and the filesystem synced; nothing
// named `.build-…`/`.trash-…` is ever used, and later builds remove them.
//
// Threading: the functions are thread-safe and coordinate with other processes through flock.
// image_lease is a value with one owner.

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/schemas/result.h"

namespace ferry::sandbox {

/// What an image is made of. Everything in it but `keyring` is covered by the image's hash.
struct image_recipe {
  /// Debian suite (codename), e.g. "bookworm".
  std::string suite = "bookworm";
  /// debootstrap variant: "minbase" (essential packages and apt) or "buildd".
  std::string variant = "minbase";
  /// Packages installed besides the variant's, by apt-get in the new root (with their
  /// dependencies, without recommends).
  std::vector<std::string> packages;
  /// Archive URL (http, https or file). Empty: the mirror the machine's apt uses for `suite`.
  std::string mirror;
  /// dpkg architecture, e.g. "amd64". Empty: the host's.
  std::string arch;
  /// OpenPGP keyring debootstrap checks the Release file with (apt's Signed-By for the mirror
  /// when it names a .gpg file). Empty: debootstrap's default. Not hashed: it changes what is
  /// trusted, not what is installed.
  std::filesystem::path keyring;
};

/// The packages of the agent image: git, ca-certificates, curl, python3, nodejs, npm,
/// build-essential, ripgrep. `ferryctl image build` uses them unless told otherwise.
std::vector<std::string> default_image_packages();

/// An archive taken from apt's configuration.
struct apt_mirror {
  std::string uri;                  ///< without a trailing '/'
  std::filesystem::path keyring;    ///< its Signed-By keyring file, if it names one
  std::filesystem::path found_in;   ///< the sources file it came from
};

/// The archive apt uses for `suite`: the first `deb` entry (one-line `sources.list` format or
/// deb822 `.sources`, read in apt's order: sources.list, then sources.list.d/*.list and
/// *.sources by name; `Enabled: no` skipped) whose suites include `suite`; failing that, the
/// first one with component `main` and a plain codename suite (no '-'). errc::not_found with
/// the files read otherwise.
[[nodiscard]] result<apt_mirror> find_apt_mirror(std::string_view suite,
                                                 const std::filesystem::path& apt_etc = "/etc/apt");

/// `r` with mirror (find_apt_mirror), keyring and arch filled in, packages sorted and without
/// duplicates; errc::invalid_argument for a malformed suite, variant, package name or mirror.
[[nodiscard]] result<image_recipe> resolve_recipe(image_recipe r,
                                                  const std::filesystem::path& apt_etc = "/etc/apt");

/// The canonical JSON of a resolved recipe that the hash is taken over (also the manifest's
/// "recipe"): format version, suite, variant, arch, mirror, sorted packages, and the SHA-256 of
/// the statx shim's source. Keys sorted, no whitespace.
std::string recipe_json(const image_recipe& resolved);

/// The image's content hash: hex SHA-256 of recipe_json(resolved).
std::string image_hash(const image_recipe& resolved);

/// A built image, as its manifest describes it.
struct image_info {
  std::string hash;
  std::filesystem::path dir;      ///< <images_dir>/<hash>
  std::filesystem::path rootfs;   ///< <dir>/rootfs: pass as runtime_options::rootfs
  image_recipe recipe;
  std::string created;            ///< ISO 8601 UTC, when the build completed
  uint64_t size_bytes = 0;        ///< disk usage of rootfs (hard links counted once)
  uint64_t build_ms = 0;          ///< how long the build took
  std::map<std::string, std::string> packages;  ///< installed packages → versions (dpkg status)
};

struct image_build_options {
  /// <data_dir>/images; created if missing.
  std::filesystem::path images_dir;
  /// Build even if the image exists; the new one replaces it atomically. Refused (errc::busy)
  /// while a ferryd uses it.
  bool rebuild = false;
  /// Progress lines, on the calling thread: the builder's steps, and debootstrap's output
  /// prefixed "debootstrap: ".
  std::function<void(std::string_view line)> progress;
  /// Polled (a few times a second) while waiting and building; once it returns true the build
  /// stops: debootstrap's process group is killed, the partial build removed, errc::closed.
  std::function<bool()> cancelled;
  std::string debootstrap = "debootstrap";
  /// C compiler for the statx shim (the host's; the shim only needs libc's stable ABI).
  std::string cc = "cc";
  /// apt's configuration directory, for the mirror.
  std::filesystem::path apt_etc = "/etc/apt";
};

struct image_build_result {
  image_info image;
  /// The image existed (built earlier, or by a concurrent build this one waited for).
  bool reused = false;
  std::chrono::milliseconds took{0};
};

/// Builds the image for `recipe` (or returns the cached one). Needs root, debootstrap, a C
/// compiler, util-linux's unshare and setpriv, and the mirror. debootstrap and apt-get run in
/// mount namespaces of their own (their /proc and /sys mounts die with them) and are killed if
/// the calling thread dies (so call it from a thread that lives until it returns). Two builds of the same image serialise on its lock; the second returns the
/// first's image. Errors say what to do: not root, a tool missing, mirror unreachable, unknown
/// package (errc::invalid_argument), disk full, debootstrap failed (its last lines; the whole
/// output stays in `.failed-<hash>.log`).
[[nodiscard]] result<image_build_result> build_image(const image_recipe& recipe,
                                                     const image_build_options& opts);

struct image_listing {
  std::vector<image_info> images;  ///< oldest first
  /// `.build-…`/`.trash-…` entries and hash-named directories without a readable manifest:
  /// never used; the next build removes the first two kinds.
  std::vector<std::filesystem::path> leftovers;
};

/// Every complete image under `images_dir` (none if it does not exist).
[[nodiscard]] result<image_listing> list_images(const std::filesystem::path& images_dir);

/// The image `which` names: "latest" (the most recently created), a full hash, or a unique
/// prefix of at least 4 hex digits. errc::not_found, or errc::invalid_argument when ambiguous.
[[nodiscard]] result<image_info> find_image(const std::filesystem::path& images_dir,
                                            std::string_view which);

/// Removes image `which` (as find_image). errc::busy while a ferryd uses it or it is being built.
[[nodiscard]] result<image_info> remove_image(const std::filesystem::path& images_dir,
                                              std::string_view which);

/// Removes `.build-…`/`.trash-…` leftovers whose image lock is free (no build is running for
/// them). Never crosses a mount point. Returns how many it removed.
[[nodiscard]] result<size_t> remove_leftovers(const std::filesystem::path& images_dir);

/// An image held for use as the sandboxes' root: `remove_image` and `--rebuild` refuse it while
/// the lease lives (a shared flock, released by the destructor or when the process dies).
class image_lease {
 public:
  image_lease(image_lease&&) noexcept;
  image_lease& operator=(image_lease&&) noexcept;
  image_lease(const image_lease&) = delete;
  image_lease& operator=(const image_lease&) = delete;
  ~image_lease();
  const image_info& image() const { return image_; }

 private:
  friend result<image_lease> lease_image(const std::filesystem::path&, std::string_view);
  image_lease(image_info image, int lock_fd) : image_(std::move(image)), fd_(lock_fd) {}
  image_info image_;
  int fd_ = -1;
};

/// Finds image `which` (as find_image) and holds it. errc::busy while it is being rebuilt or
/// removed.
[[nodiscard]] result<image_lease> lease_image(const std::filesystem::path& images_dir,
                                              std::string_view which);

}  // namespace ferry::sandbox
