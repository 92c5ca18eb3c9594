// Root filesystem images (see ferry/sandbox/image.h and ../README.md, "Images").
//
// A build, holding the image's lock (flock on .locks/<hash>, exclusive):
//   resolve the recipe → hash → cached? return it
//   → remove leftovers → .build-<hash>-<pid>/rootfs by debootstrap, packages by apt-get in a
//     chroot (each step in its own mount namespace, killed with us) → Ferry's files, the statx
//     shim (compiled here, checked to load) → manifest → syncfs → rename to <hash>
//     (RENAME_EXCHANGE over an old one with --rebuild) → fsync the images directory.
// Anything that fails or is interrupted before the rename is a `.build-…` directory, which is
// never taken for an image and is removed by the next build.

#include "ferry/sandbox/image.h"

#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>


#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "ferry/sandbox/process.h"
#include "host_paths.h"
#include "sha256.h"
#include "statx_shim_source.h"  // generated: the bytes of sandbox/image/statx_shim.c
#include "unique_fd.h"

extern char** environ;

namespace ferry::sandbox {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using detail::clean_path;
using detail::find_program;
using detail::sha256_hex;
using detail::unique_fd;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

/// Bumped whenever the builder changes what it puts into an image beyond the recipe (Ferry's
/// files, cleanup, how the shim is installed): images of an older format are no cache hits.
constexpr int image_format_version = 1;
/// Where the shim lives inside the image (named in its /etc/ld.so.preload).
constexpr std::string_view shim_path = "/usr/local/lib/ferry/statx_shim.so";
/// Free space a build needs at least: minbase is ~210 MB with its downloaded packages; the
/// agent's package set ~1 GB more (measured, see README).
constexpr uint64_t minbase_space = 512ull << 20;
constexpr uint64_t packages_space = 1536ull << 20;
constexpr size_t log_tail_lines = 12;

std::string errno_text(int err) { return std::generic_category().message(err); }


std::string short_hash(std::string_view hash) { return std::string(hash.substr(0, 12)); }

std::string iso_now() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms =
    std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  return fmt::format("{}.{:03}Z", buf, ms);
}

std::string trimmed(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back())))
    s.remove_suffix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front())))
    s.remove_prefix(1);
  return std::string(s);
}

std::vector<std::string> words(std::string_view s) {
  std::vector<std::string> out;
  std::istringstream in{std::string(s)};
  for (std::string w; in >> w;)
    out.push_back(w);
  return out;
}

bool is_hex_hash(std::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

result<void> write_file(const fs::path& path, std::string_view content, mode_t mode,
                        bool sync = false) {
  unique_fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode));
  if (!fd)
    return fail(fmt::format("cannot write {}: {}", path.string(), errno_text(errno)));
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd.get(), content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return fail(fmt::format("cannot write {}: {}", path.string(), errno_text(errno)));
    done += static_cast<size_t>(n);
  }
  if (::fchmod(fd.get(), mode) != 0 || (sync && ::fsync(fd.get()) != 0))
    return fail(fmt::format("cannot write {}: {}", path.string(), errno_text(errno)));
  return {};
}

result<void> fsync_dir(const fs::path& dir) {
  unique_fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd || ::fsync(fd.get()) != 0)
    return fail(fmt::format("cannot sync {}: {}", dir.string(), errno_text(errno)));
  return {};
}

// --- apt's sources -----------------------------------------------------------------------------

struct apt_entry {
  std::vector<std::string> types, uris, suites, components;
  std::string signed_by;
  bool enabled = true;
  fs::path file;
};

/// One-line format: `deb [opt=val …] URI SUITE [COMPONENT…]`.
void parse_one_line_sources(const fs::path& file, std::string_view text,
                            std::vector<apt_entry>& out) {
  std::istringstream in{std::string(text)};
  for (std::string line; std::getline(in, line);) {
    line = line.substr(0, line.find('#'));
    auto w = words(line);
    if (w.size() < 3)
      continue;
    apt_entry e;
    e.file = file;
    e.types = {w[0]};
    size_t i = 1;
    if (w[i].front() == '[') {
      // Options: `[a=b c=d]`, `[ a=b ]`; the brackets may stand alone or touch a word.
      std::string opts;
      for (; i < w.size(); ++i) {
        opts += w[i] + " ";
        if (w[i].back() == ']') {
          ++i;
          break;
        }
      }
      for (char& c : opts)
        if (c == '[' || c == ']')
          c = ' ';
      for (const auto& o : words(opts))
        if (o.rfind("signed-by=", 0) == 0)
          e.signed_by = o.substr(10);
    }
    if (i + 1 >= w.size())
      continue;
    e.uris = {w[i]};
    e.suites = {w[i + 1]};
    e.components.assign(w.begin() + static_cast<long>(i) + 2, w.end());
    out.push_back(std::move(e));
  }
}

/// deb822 format: paragraphs of `Field: value` lines, continuation lines indented.
void parse_deb822_sources(const fs::path& file, std::string_view text,
                          std::vector<apt_entry>& out) {
  std::map<std::string, std::string> fields;
  std::string last;
  auto flush = [&] {
    if (fields.empty())
      return;
    apt_entry e;
    e.file = file;
    e.types = words(fields["types"]);
    e.uris = words(fields["uris"]);
    e.suites = words(fields["suites"]);
    e.components = words(fields["components"]);
    e.signed_by = trimmed(fields["signed-by"]);
    auto enabled = trimmed(fields["enabled"]);
    std::transform(enabled.begin(), enabled.end(), enabled.begin(), ::tolower);
    e.enabled = enabled != "no" && enabled != "false";
    out.push_back(std::move(e));
    fields.clear();
    last.clear();
  };
  std::istringstream in{std::string(text)};
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line[0] == '#')
      continue;
    if (trimmed(line).empty()) {
      flush();
      continue;
    }
    if (line[0] == ' ' || line[0] == '\t') {
      if (!last.empty())
        fields[last] += "\n" + trimmed(line);
      continue;
    }
    auto colon = line.find(':');
    if (colon == std::string::npos)
      continue;
    last = trimmed(line.substr(0, colon));
    std::transform(last.begin(), last.end(), last.begin(), ::tolower);
    fields[last] = trimmed(line.substr(colon + 1));
  }
  flush();
}

bool usable_uri(std::string_view uri) {
  return uri.rfind("http://", 0) == 0 || uri.rfind("https://", 0) == 0 ||
         uri.rfind("file:/", 0) == 0;
}

result<apt_mirror> find_mirror_in(std::string_view suite, const fs::path& apt_etc,
                                  std::vector<apt_entry>& entries, std::string& files_read) {
  std::vector<fs::path> files;
  std::error_code ec;
  if (fs::is_regular_file(apt_etc / "sources.list", ec))
    files.push_back(apt_etc / "sources.list");
  std::vector<fs::path> parts;
  for (fs::directory_iterator it(apt_etc / "sources.list.d", ec), end; !ec && it != end;
       it.increment(ec)) {
    const auto ext = it->path().extension();
    // apt reads only these two extensions (a `.list.disabled` is ignored).
    if ((ext == ".list" || ext == ".sources") && it->is_regular_file(ec))
      parts.push_back(it->path());
  }
  std::sort(parts.begin(), parts.end());
  files.insert(files.end(), parts.begin(), parts.end());
  for (const auto& f : files) {
    const std::string text = read_small_file(f);
    files_read += (files_read.empty() ? "" : ", ") + f.string();
    if (f.extension() == ".sources")
      parse_deb822_sources(f, text, entries);
    else
      parse_one_line_sources(f, text, entries);
  }
  auto pick = [&](auto&& suite_matches) -> std::optional<apt_mirror> {
    for (const auto& e : entries) {
      if (!e.enabled || std::find(e.types.begin(), e.types.end(), "deb") == e.types.end())
        continue;
      if (!std::any_of(e.suites.begin(), e.suites.end(), suite_matches))
        continue;
      for (const auto& uri : e.uris) {
        if (!usable_uri(uri))
          continue;
        apt_mirror m;
        m.uri = uri;
        while (m.uri.size() > 1 && m.uri.back() == '/')
          m.uri.pop_back();
        m.found_in = e.file;
        // A keyring file (not an inline key block) that gpgv reads as it is.
        if (!e.signed_by.empty() && e.signed_by.find('\n') == std::string::npos &&
            fs::path(e.signed_by).extension() == ".gpg")
          m.keyring = e.signed_by;
        return m;
      }
    }
    return std::nullopt;
  };
  if (auto m = pick([&](const std::string& s) { return s == suite; }))
    return *m;
  // Another release's archive serves this suite too (e.g. a trixie host building bookworm):
  // an entry of a plain codename with `main`, not a -security/-updates archive.
  auto plain = [&](const std::string& s) {
    return !s.empty() && s.find('-') == std::string::npos && s.find('/') == std::string::npos &&
           s != "nodistro";
  };
  for (auto& e : entries)
    if (std::find(e.components.begin(), e.components.end(), "main") == e.components.end())
      e.enabled = false;
  if (auto m = pick(plain))
    return *m;
  return error_info{
    fmt::format("no Debian archive for '{}' in apt's configuration (read: {}): pass a mirror URL",
                suite, files_read.empty() ? "no sources files under " + apt_etc.string()
                                          : files_read),
    errc::not_found};
}

// --- recipes -----------------------------------------------------------------------------------

bool valid_name(std::string_view s, std::string_view extra, size_t min_len) {
  if (s.size() < min_len || s.size() > 128)
    return false;
  if (!std::isalnum(static_cast<unsigned char>(s[0])) || std::isupper(static_cast<unsigned char>(s[0])))
    return false;
  return std::all_of(s.begin(), s.end(), [&](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           extra.find(c) != std::string_view::npos;
  });
}

std::string host_arch() {
  if (auto r = run_command({"dpkg", "--print-architecture"}, 10s); r && r->status.ok()) {
    auto a = trimmed(r->output);
    if (valid_name(a, "-", 2))
      return a;
  }
#if defined(__x86_64__)
  return "amd64";
#elif defined(__aarch64__)
  return "arm64";
#else
  return "";
#endif
}

struct resolved_recipe {
  image_recipe recipe;
  std::string mirror_origin;  // where the mirror came from, for messages
};

result<resolved_recipe> resolve(image_recipe r, const fs::path& apt_etc) {
  if (!valid_name(r.suite, "-.", 2))
    return fail(errc::invalid_argument, fmt::format("bad suite '{}': a Debian codename such as "
                                                    "bookworm", r.suite));
  if (r.variant != "minbase" && r.variant != "buildd")
    return fail(errc::invalid_argument,
                fmt::format("bad variant '{}': minbase or buildd", r.variant));
  for (const auto& p : r.packages)
    if (!valid_name(p, "+-.", 2))
      return fail(errc::invalid_argument,
                  fmt::format("bad package name '{}' (lower-case letters, digits, + - .)", p));
  std::sort(r.packages.begin(), r.packages.end());
  r.packages.erase(std::unique(r.packages.begin(), r.packages.end()), r.packages.end());
  resolved_recipe out;
  if (r.mirror.empty()) {
    auto m = find_apt_mirror(r.suite, apt_etc);
    if (!m)
      return m.error();
    r.mirror = m->uri;
    if (r.keyring.empty())
      r.keyring = m->keyring;
    out.mirror_origin = "from " + m->found_in.string();
  } else {
    out.mirror_origin = "given";  // reads "(given)" in messages
  }
  while (r.mirror.size() > 1 && r.mirror.back() == '/')
    r.mirror.pop_back();
  const bool bad_char = std::any_of(r.mirror.begin(), r.mirror.end(), [](char c) {
    return std::isspace(static_cast<unsigned char>(c)) || c == ',' || c == '"' || c == '\'';
  });
  if (!usable_uri(r.mirror) || bad_char)
    return fail(errc::invalid_argument,
                fmt::format("bad mirror '{}': an http://, https:// or file:/ URL", r.mirror));
  if (r.arch.empty())
    r.arch = host_arch();
  if (!valid_name(r.arch, "-", 2))
    return fail(errc::invalid_argument, fmt::format("bad architecture '{}'", r.arch));
  out.recipe = std::move(r);
  return out;
}

json recipe_object(const image_recipe& r) {
  return json{{"format", image_format_version},
              {"suite", r.suite},
              {"variant", r.variant},
              {"arch", r.arch},
              {"mirror", r.mirror},
              {"packages", r.packages},
              {"statx_shim_sha256", sha256_hex(statx_shim_source)}};
}

// --- locks and removal -------------------------------------------------------------------------

result<unique_fd> open_lock(const fs::path& images, const std::string& hash) {
  std::error_code ec;
  fs::create_directories(images / ".locks", ec);
  if (ec)
    return fail(fmt::format("cannot create {}: {}", (images / ".locks").string(), ec.message()));
  const fs::path path = images / ".locks" / hash;
  unique_fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd)
    return fail(fmt::format("cannot open lock {}: {}", path.string(), errno_text(errno)));
  return fd;
}

/// flock(op | LOCK_NB); false if someone else holds a conflicting lock.
bool try_lock(int fd, int op) {
  for (;;) {
    if (::flock(fd, op | LOCK_NB) == 0)
      return true;
    if (errno != EINTR)
      return false;
  }
}

std::string unescape_mountinfo(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 3)), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

/// Mount points at or below `dir` in this process's mount namespace, deepest first.
std::vector<std::string> mounts_under(const fs::path& dir) {
  std::vector<std::string> found;
  const std::string base = dir.string();
  std::istringstream in{read_small_file("/proc/self/mountinfo")};
  for (std::string line; std::getline(in, line);) {
    auto w = words(line);
    if (w.size() < 5)
      continue;
    std::string mp = unescape_mountinfo(w[4]);
    if (mp == base || mp.rfind(base + "/", 0) == 0)
      found.push_back(mp);
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
  return found;
}

// nftw passes no user data: its callbacks use this thread's walk state.
thread_local std::string walk_error;
thread_local uint64_t walk_bytes;
thread_local std::set<std::pair<dev_t, ino_t>>* walk_seen;

int remove_entry(const char* path, const struct stat*, int type, struct FTW*) {
  const int r = type == FTW_DP ? ::rmdir(path) : ::unlink(path);
  if (r != 0 && errno != ENOENT && walk_error.empty())
    walk_error = fmt::format("{}: {}", path, errno_text(errno));
  return 0;
}

/// Deletes the tree at `dir` without ever crossing a mount point: mounts below it (a crashed
/// debootstrap outside its namespace) are detached first, and the walk stays on one filesystem.
result<void> remove_tree(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(dir, ec)))
    return {};
  for (const auto& mp : mounts_under(dir))
    ::umount2(mp.c_str(), MNT_DETACH);
  if (auto left = mounts_under(dir); !left.empty())
    return fail(fmt::format("cannot remove {}: {} is mounted below it; unmount it first",
                            dir.string(), left.front()));
  walk_error.clear();
  if (::nftw(dir.c_str(), remove_entry, 64, FTW_DEPTH | FTW_PHYS | FTW_MOUNT) != 0 &&
      walk_error.empty())
    walk_error = fmt::format("{}: {}", dir.string(), errno_text(errno));
  if (fs::exists(fs::symlink_status(dir, ec)))
    return fail(fmt::format("cannot remove {}: {}", dir.string(),
                            walk_error.empty() ? "something is left" : walk_error));
  return {};
}

int count_entry(const char*, const struct stat* st, int type, struct FTW*) {
  if (type == FTW_NS)
    return 0;
  if (st->st_nlink > 1 && !S_ISDIR(st->st_mode) && !walk_seen->insert({st->st_dev, st->st_ino}).second)
    return 0;
  walk_bytes += static_cast<uint64_t>(st->st_blocks) * 512;
  return 0;
}

uint64_t disk_usage(const fs::path& dir) {
  std::set<std::pair<dev_t, ino_t>> seen;
  walk_seen = &seen;
  walk_bytes = 0;
  ::nftw(dir.c_str(), count_entry, 64, FTW_PHYS | FTW_MOUNT);
  walk_seen = nullptr;
  return walk_bytes;
}

/// `.build-<hash>-…` / `.trash-<hash>-…` → hash; empty for anything else.
std::string leftover_hash(const std::string& name) {
  for (std::string_view prefix : {".build-", ".trash-"}) {
    if (name.rfind(prefix, 0) == 0 && name.size() >= prefix.size() + 64) {
      std::string h = name.substr(prefix.size(), 64);
      if (is_hex_hash(h))
        return h;
    }
  }
  return {};
}

/// Removes leftovers; those of `held_hash` without locking (the caller holds its lock).
result<size_t> remove_leftovers_impl(const fs::path& images, const std::string& held_hash,
                                     const std::function<void(std::string_view)>& say) {
  std::error_code ec;
  if (!fs::is_directory(images, ec))
    return size_t{0};
  std::vector<fs::path> found;
  for (fs::directory_iterator it(images, ec), end; !ec && it != end; it.increment(ec))
    if (!leftover_hash(it->path().filename().string()).empty())
      found.push_back(it->path());
  size_t removed = 0;
  for (const auto& p : found) {
    const std::string hash = leftover_hash(p.filename().string());
    unique_fd lock;
    if (hash != held_hash) {
      auto l = open_lock(images, hash);
      if (!l)
        return l.error();
      if (!try_lock(l->get(), LOCK_EX))
        continue;  // its build (or removal) is still running
      lock = std::move(*l);
    }
    if (say)
      say(fmt::format("removing the remains of an interrupted build: {}", p.string()));
    if (auto r = remove_tree(p); !r)
      return r.error();
    ++removed;
  }
  return removed;
}

// --- manifests ---------------------------------------------------------------------------------

std::map<std::string, std::string> installed_packages(const fs::path& rootfs) {
  std::map<std::string, std::string> out;
  std::ifstream in(rootfs / "var/lib/dpkg/status");
  std::string package, version, status;
  auto flush = [&] {
    if (!package.empty() && status.size() >= 10 &&
        status.compare(status.size() - 10, 10, " installed") == 0)
      out[package] = version;
    package.clear();
    version.clear();
    status.clear();
  };
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) {
      flush();
    } else if (line.rfind("Package: ", 0) == 0) {
      package = trimmed(line.substr(9));
    } else if (line.rfind("Version: ", 0) == 0) {
      version = trimmed(line.substr(9));
    } else if (line.rfind("Status: ", 0) == 0) {
      status = trimmed(line.substr(8));
    }
  }
  flush();
  return out;
}

/// The image in `dir` (named by its hash), from its manifest.
result<image_info> read_image(const fs::path& dir) {
  const std::string hash = dir.filename().string();
  const std::string text = read_small_file(dir / "manifest.json");
  if (text.empty())
    return fail(errc::not_found, fmt::format("{}: no manifest.json", dir.string()));
  auto j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  try {
    if (j.is_discarded() || j.at("hash").get<std::string>() != hash)
      return fail(errc::corrupt, fmt::format("{}: bad manifest.json", dir.string()));
    image_info i;
    i.hash = hash;
    i.dir = dir;
    i.rootfs = dir / "rootfs";
    const auto& r = j.at("recipe");
    i.recipe.suite = r.at("suite").get<std::string>();
    i.recipe.variant = r.at("variant").get<std::string>();
    i.recipe.arch = r.at("arch").get<std::string>();
    i.recipe.mirror = r.at("mirror").get<std::string>();
    i.recipe.packages = r.at("packages").get<std::vector<std::string>>();
    i.recipe.keyring = j.value("keyring", std::string());
    i.created = j.at("created").get<std::string>();
    i.size_bytes = j.at("size_bytes").get<uint64_t>();
    i.build_ms = j.value("build_ms", uint64_t{0});
    i.packages = j.at("packages").get<std::map<std::string, std::string>>();
    return i;
  } catch (const json::exception& e) {
    return fail(errc::corrupt, fmt::format("{}: bad manifest.json: {}", dir.string(), e.what()));
  }
}

// --- the build ---------------------------------------------------------------------------------

/// Removes a partial build unless dismissed.
class partial_build {
 public:
  explicit partial_build(fs::path dir) : dir_(std::move(dir)) {}
  ~partial_build() {
    if (!dir_.empty())
      (void)remove_tree(dir_);
  }
  partial_build(const partial_build&) = delete;
  partial_build& operator=(const partial_build&) = delete;
  void dismiss() { dir_.clear(); }

 private:
  fs::path dir_;
};

std::vector<std::string> child_environment() {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    std::string_view v(*e);
    if (v.rfind("LC_", 0) == 0 || v.rfind("LANG=", 0) == 0 || v.rfind("LANGUAGE=", 0) == 0 ||
        v.rfind("DEBIAN_FRONTEND=", 0) == 0 || v.rfind("LD_PRELOAD=", 0) == 0)
      continue;
    env.emplace_back(v);
  }
  env.push_back("LC_ALL=C");
  env.push_back("DEBIAN_FRONTEND=noninteractive");
  return env;
}

struct step_run {
  exit_status status;
  bool cancelled = false;
  std::string log;                 // everything it printed
  std::deque<std::string> tail;    // its last lines
};

/// Runs one step of the build (debootstrap, apt-get) in its own process group, appending its
/// output to `log_path` and passing each line to the progress callback as "<tool>: <line>".
/// On cancellation the group is terminated and the run reports `cancelled`.
result<step_run> run_step(const std::vector<std::string>& argv, const std::string& tool,
                          const fs::path& log_path, const image_build_options& opts) {
  spawn_options so;
  so.argv = argv;
  so.env = child_environment();
  so.out = stdio::pipe;
  so.stderr_to_stdout = true;
  so.new_process_group = true;  // a cancel signals the whole group: dpkg, tar, wget…
  auto child = child_process::spawn(so);
  if (!child)
    return child.error();
  step_run run;
  std::ofstream log(log_path, std::ios::binary | std::ios::app);
  std::string pending;
  char buf[8192];
  for (;;) {
    if (opts.cancelled && opts.cancelled()) {
      run.cancelled = true;
      run.status = child->terminate(3s);
      return run;
    }
    pollfd p{child->stdout_fd(), POLLIN, 0};
    const int r = ::poll(&p, 1, 200);
    if (r < 0 && errno != EINTR)
      break;
    if (r <= 0)
      continue;
    const ssize_t n = ::read(child->stdout_fd(), buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    log.write(buf, n);
    log.flush();
    run.log.append(buf, static_cast<size_t>(n));
    pending.append(buf, static_cast<size_t>(n));
    for (size_t nl; (nl = pending.find('\n')) != std::string::npos;) {
      std::string line = trimmed(pending.substr(0, nl));
      pending.erase(0, nl + 1);
      if (line.empty())
        continue;
      run.tail.push_back(line);
      if (run.tail.size() > log_tail_lines)
        run.tail.pop_front();
      if (opts.progress)
        opts.progress(tool + ": " + line);
    }
  }
  run.status = child->wait();
  return run;
}

std::string describe(const exit_status& s) {
  return s.signal != 0 ? fmt::format("killed by signal {}", s.signal)
                       : fmt::format("exit code {}", s.exit_code);
}

/// What went wrong in a failed step (debootstrap or apt-get), and what to do about it.
error_info explain_failure(const std::string& tool, const step_run& run, const resolved_recipe& rr,
                           const fs::path& images, const fs::path& kept_log) {
  const auto has = [&](std::string_view s) { return run.log.find(s) != std::string::npos; };
  const auto line_with = [&](std::string_view s) {
    auto pos = run.log.find(s);
    auto start = run.log.rfind('\n', pos);
    start = start == std::string::npos ? 0 : start + 1;
    std::string line =
      trimmed(std::string_view(run.log).substr(start, run.log.find('\n', pos) - start));
    return line.rfind("E: ", 0) == 0 ? line.substr(3) : line;
  };
  std::string last_error;
  for (const auto& l : run.tail)
    if (l.rfind("E: ", 0) == 0)
      last_error = l;
  if (last_error.empty() && !run.tail.empty())
    last_error = run.tail.back();
  const std::string see = fmt::format(" ({}'s output: {})", tool, kept_log.string());
  const auto& r = rr.recipe;
  if (has("No space left on device"))
    return fail(fmt::format("disk full while building under {}: free some space there and "
                            "retry (the partial build was removed){}",
                            images.string(), see));
  if (has("Couldn't find these debs")) {  // debootstrap
    auto line = line_with("Couldn't find these debs");
    return fail(errc::invalid_argument,
                fmt::format("{} has no such package(s): {}{}", r.suite,
                            trimmed(line.substr(line.find(':') + 1)), see));
  }
  if (has("Unable to locate package") || has("has no installation candidate"))  // apt-get
    return fail(errc::invalid_argument,
                fmt::format("{} has no such package: {}{}", r.suite,
                            has("Unable to locate package") ? line_with("Unable to locate package")
                                                            : line_with("has no installation candidate"),
                            see));
  if (has("Release signed by unknown key") || has("Invalid Release signature") ||
      has("Release file signed by unknown key") || has("NO_PUBKEY"))
    return fail(fmt::format("the mirror's Release file for {} is not signed by a trusted key "
                            "(keyring: {}): install debian-archive-keyring or pick the "
                            "keyring apt uses{}",
                            r.suite, r.keyring.empty() ? "debootstrap's default" : r.keyring.string(),
                            see));
  for (std::string_view s : {"Failed getting release file", "Failed getting release signature",
                              "Couldn't download", "unable to resolve", "Connection refused",
                              "Network is unreachable", "Temporary failure", "Could not resolve",
                              "Connection timed out", "No route to host", "Couldn't resolve",
                              "Failed to fetch", "Could not connect"})
    if (has(s))
      return fail(fmt::format("cannot download {} from the mirror {} ({}): check the "
                              "network and that the mirror serves {}, or choose another "
                              "mirror; {} said: {}{}",
                              r.suite, r.mirror, rr.mirror_origin, r.suite, tool,
                              line_with(s), see));
  std::string lines;
  for (const auto& l : run.tail)
    lines += "\n  " + l;
  return fail(fmt::format("{} failed ({}); its last lines:{}{}", tool, describe(run.status),
                          lines, see));
}

/// Ferry's files in a fresh root: mount points for the sandbox runtime (so runsc's gofer never
/// has to create them in the image), an /etc without the build host's names, no package cache.
result<void> finish_root(const fs::path& root) {
  std::error_code ec;
  for (const char* d : {"workspace", ".ferry", ".ferry/ctl", "usr/local/lib/ferry"}) {
    fs::create_directories(root / d, ec);
    if (ec)
      return fail(fmt::format("cannot create {}: {}", (root / d).string(), ec.message()));
    fs::permissions(root / d, fs::perms(0755), ec);
  }
  if (auto r = write_file(root / ".ferry/init", "", 0755); !r)  // ferry-init is bound onto it
    return r;
  // debootstrap copies the host's hostname and resolv.conf; sandboxes have no network.
  for (const char* f : {"etc/hostname", "etc/resolv.conf", "etc/hosts"})
    fs::remove(root / f, ec);
  const std::pair<const char*, std::string_view> etc[] = {
    {"etc/hostname", "sandbox\n"},
    {"etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"},
    {"etc/resolv.conf", ""},
  };
  for (const auto& [name, content] : etc)
    if (auto r = write_file(root / name, content, 0644); !r)
      return r;
  // Downloaded packages, apt's indexes and the caches built from them (~80 MB each with a full
  // suite's lists): dead weight in a root that sandboxes mount read-only.
  for (const char* d : {"var/cache/apt", "var/cache/apt/archives", "var/lib/apt/lists"})
    for (fs::directory_iterator it(root / d, ec), end; !ec && it != end; it.increment(ec))
      if (it->is_regular_file(ec) && it->path().filename() != "lock")
        fs::remove(it->path(), ec);
  return {};
}

/// Compiles the statx shim into the root, preloads it, and checks that the image's dynamic
/// loader actually runs it. Returns the compiler's version line.
result<std::string> install_shim(const fs::path& build_dir, const fs::path& root,
                                 const std::string& cc) {
  const fs::path src = build_dir / "statx_shim.c";
  if (auto r = write_file(src, statx_shim_source, 0644); !r)
    return r.error();
  const fs::path so = root / fs::path(shim_path).relative_path();
  auto built = run_command({cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-o", so.string(),
                            src.string()},
                           120s);
  if (!built)
    return built.error();
  if (!built->status.ok())
    return fail(fmt::format("compiling the statx shim with {} failed ({}): {}", cc,
                            describe(built->status), trimmed(built->output)));
  if (auto r = write_file(root / "etc/ld.so.preload", std::string(shim_path) + "\n", 0644); !r)
    return r.error();
  // A preload that cannot be loaded is only a warning to ld.so; require its constructor call.
  auto check = run_command({"env", "LD_DEBUG=libs", "chroot", root.string(), "/bin/true"}, 60s);
  if (!check)
    return check.error();
  if (!check->status.ok() ||
      check->output.find(fmt::format("calling init: {}", shim_path)) == std::string::npos)
    return fail(fmt::format("the statx shim does not load in the new root ({}): {}",
                            describe(check->status), trimmed(check->output.substr(0, 2000))));
  std::string version;
  if (auto v = run_command({cc, "--version"}, 10s); v && v->status.ok())
    version = trimmed(v->output.substr(0, v->output.find('\n')));
  return version;
}

std::string debootstrap_version() {
  auto r = run_command({"dpkg-query", "-W", "-f=${Version}", "debootstrap"}, 10s);
  return r && r->status.ok() ? trimmed(r->output) : std::string();
}

std::string human_size(uint64_t bytes) {
  return bytes >= (1ull << 30) ? fmt::format("{:.2f} GiB", static_cast<double>(bytes) / (1ull << 30))
                               : fmt::format("{} MiB", bytes >> 20);
}

}  // namespace

// --- public ------------------------------------------------------------------------------------

std::vector<std::string> default_image_packages() {
  return {"git", "ca-certificates", "curl", "python3", "nodejs", "npm", "build-essential",
          "ripgrep"};
}

result<apt_mirror> find_apt_mirror(std::string_view suite, const fs::path& apt_etc) {
  std::vector<apt_entry> entries;
  std::string files_read;
  return find_mirror_in(suite, apt_etc, entries, files_read);
}

result<image_recipe> resolve_recipe(image_recipe r, const fs::path& apt_etc) {
  auto rr = resolve(std::move(r), apt_etc);
  if (!rr)
    return rr.error();
  return std::move(rr->recipe);
}

std::string recipe_json(const image_recipe& resolved) { return recipe_object(resolved).dump(); }

std::string image_hash(const image_recipe& resolved) { return sha256_hex(recipe_json(resolved)); }

result<image_build_result> build_image(const image_recipe& recipe,
                                       const image_build_options& opts) {
  const auto started = steady::now();
  const auto took = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - started);
  };
  const auto say = [&](std::string_view line) {
    if (opts.progress)
      opts.progress(line);
  };
  const auto cancelled = [&] { return opts.cancelled && opts.cancelled(); };

  auto rr = resolve(recipe, opts.apt_etc);
  if (!rr)
    return rr.error();
  const image_recipe& r = rr->recipe;
  const std::string hash = image_hash(r);
  const std::string name = short_hash(hash);
  if (opts.images_dir.empty())
    return fail(errc::invalid_argument, "no images directory");
  const fs::path images = clean_path(opts.images_dir);
  const fs::path final_dir = images / hash;

  // A directory named by the hash is complete by construction: no lock needed to use it.
  if (!opts.rebuild) {
    if (auto found = read_image(final_dir)) {
      say(fmt::format("image {} is cached ({})", name, final_dir.string()));
      return image_build_result{std::move(*found), true, took()};
    }
  }

  if (::geteuid() != 0)
    return fail("building an image needs root (debootstrap chroots into the new root and "
                "creates device nodes): run it as root or with sudo");
  std::map<std::string, std::string> tools;
  for (const auto& [tool, hint] : std::vector<std::pair<std::string, std::string>>{
         {opts.debootstrap, "apt-get install debootstrap (tools/ferry deps installs it)"},
         {opts.cc, "apt-get install gcc (or build-essential); it compiles the statx shim"},
         {"setpriv", "apt-get install util-linux"},
         {"unshare", "apt-get install util-linux"},
         {"chroot", "apt-get install coreutils"}}) {
    auto path = find_program(tool);
    if (!path)
      return fail(fmt::format("{} is not installed: {}", tool, hint));
    tools[tool] = *path;
  }

  std::error_code ec;
  fs::create_directories(images, ec);
  if (ec)
    return fail(fmt::format("cannot create {}: {}", images.string(), ec.message()));
  auto lock = open_lock(images, hash);
  if (!lock)
    return lock.error();
  if (!try_lock(lock->get(), LOCK_EX)) {
    if (opts.rebuild)
      return fail(errc::busy, fmt::format("image {} is in use by a running ferryd, or being "
                                          "built or removed: stop that ferryd and retry",
                                          name));
    say(fmt::format("another build of image {} is running; waiting for it", name));
    while (!try_lock(lock->get(), LOCK_EX)) {
      if (cancelled())
        return fail(errc::closed, "interrupted while waiting for another build");
      if (auto found = read_image(final_dir)) {  // done, and already in use by a ferryd
        say(fmt::format("image {} was built meanwhile", name));
        return image_build_result{std::move(*found), true, took()};
      }
      std::this_thread::sleep_for(200ms);
    }
  }
  // REQUIRES from here on: the image's lock, exclusive.
  if (!opts.rebuild) {
    if (auto found = read_image(final_dir)) {
      say(fmt::format("image {} was built meanwhile", name));
      return image_build_result{std::move(*found), true, took()};
    }
  }
  if (auto removed = remove_leftovers_impl(images, hash, say); !removed)
    say(fmt::format("warning: {}", removed.error().message));

  struct statvfs vfs {};
  if (::statvfs(images.c_str(), &vfs) == 0) {
    const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    const uint64_t need = minbase_space + (r.packages.empty() ? 0 : packages_space);
    if (free_bytes < need)
      return fail(fmt::format("not enough free space under {}: {} free, an image like this needs "
                              "about {}; free some space and retry",
                              images.string(), human_size(free_bytes), human_size(need)));
  }

  const fs::path build_dir = images / fmt::format(".build-{}-{}", hash, ::getpid());
  if (auto removed = remove_tree(build_dir); !removed)  // a reused pid's leftover
    return removed.error();
  fs::create_directory(build_dir, ec);
  if (ec)
    return fail(fmt::format("cannot create {}: {}", build_dir.string(), ec.message()));
  fs::permissions(build_dir, fs::perms(0755), ec);
  partial_build guard(build_dir);
  const fs::path root = build_dir / "rootfs";

  std::string packages = r.packages.empty() ? "no extra packages" : fmt::format("{}", fmt::join(r.packages, " "));
  say(fmt::format("image {}: building {}/{} {} with {} from {} ({}) into {}", name, r.suite,
                  r.variant, r.arch, packages, r.mirror, rr->mirror_origin, build_dir.string()));
  // Each step runs under setpriv (killed when we die: no build goes on unattended) and in a
  // mount namespace of its own (unshare): the /proc, /sys and /dev mounts made in the new root
  // die with it and never show on the host.
  const std::vector<std::string> contained{tools["setpriv"], "--pdeathsig", "KILL", "--",
                                           tools["unshare"], "--mount", "--propagation",
                                           "private"};
  const fs::path log_path = build_dir / "build.log";
  const fs::path kept_log = images / fmt::format(".failed-{}.log", hash);
  const auto step = [&](const std::string& tool,
                        const std::vector<std::string>& args) -> result<void> {
    std::vector<std::string> argv = contained;
    argv.insert(argv.end(), args.begin(), args.end());
    auto run = run_step(argv, tool, log_path, opts);
    if (!run)
      return run.error();
    if (run->cancelled || cancelled())  // the group is dead; the guard removes the build
      return fail(errc::closed, fmt::format("build of image {} interrupted; nothing was kept", name));
    if (!run->status.ok()) {
      std::error_code copy_ec;
      fs::copy_file(log_path, kept_log, fs::copy_options::overwrite_existing, copy_ec);
      return explain_failure(tool, *run, *rr, images, kept_log);
    }
    return {};
  };

  std::vector<std::string> debootstrap{"--", tools[opts.debootstrap], "--variant=" + r.variant,
                                       "--arch=" + r.arch};
  if (!r.keyring.empty())
    debootstrap.push_back("--keyring=" + r.keyring.string());
  debootstrap.insert(debootstrap.end(), {r.suite, root.string(), r.mirror});
  if (auto s = step("debootstrap", debootstrap); !s)
    return s.error();
  if (!r.packages.empty()) {
    // apt, not debootstrap --include: debootstrap's resolver does not follow virtual packages
    // (npm's dependencies fail to configure with it). The root's sources.list names the mirror.
    say(fmt::format("image {}: installing {}", name, packages));
    std::string script =
      "export PATH=/usr/sbin:/usr/bin:/sbin:/bin; "
      "apt-get -q -o Dpkg::Use-Pty=0 -o Acquire::Retries=3 update && "
      "apt-get -q -y -o Dpkg::Use-Pty=0 -o Acquire::Retries=3 install --no-install-recommends";
    for (const auto& p : r.packages)
      script += " " + p;  // validated: [a-z0-9+.-]
    if (auto s = step("apt", {"--mount-proc=" + (root / "proc").string(), "--", tools["chroot"],
                              root.string(), "/bin/sh", "-c", script});
        !s)
      return s.error();
  }

  say(fmt::format("image {}: adding Ferry's files and the statx shim", name));
  if (auto f = finish_root(root); !f)
    return f.error();
  auto compiler = install_shim(build_dir, root, tools[opts.cc]);
  if (!compiler)
    return compiler.error();
  fs::remove(build_dir / "statx_shim.c", ec);

  image_info info;
  info.hash = hash;
  info.dir = final_dir;
  info.rootfs = final_dir / "rootfs";
  info.recipe = r;
  info.packages = installed_packages(root);
  info.size_bytes = disk_usage(root);
  info.created = iso_now();
  info.build_ms = static_cast<uint64_t>(took().count());
  if (info.packages.empty())
    return fail(fmt::format("{}: no installed packages in var/lib/dpkg/status", root.string()));
  json manifest{{"hash", hash},
                {"recipe", recipe_object(r)},
                {"created", info.created},
                {"size_bytes", info.size_bytes},
                {"build_ms", info.build_ms},
                {"packages", info.packages},
                {"statx_shim", shim_path},
                {"compiler", *compiler},
                {"debootstrap", debootstrap_version()}};
  if (!r.keyring.empty())
    manifest["keyring"] = r.keyring.string();
  if (auto w = write_file(build_dir / "manifest.json", manifest.dump(2) + "\n", 0644, true); !w)
    return w.error();

  // Everything on disk before the name says "complete".
  {
    unique_fd fd(::open(build_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd || ::syncfs(fd.get()) != 0)
      return fail(fmt::format("cannot sync {}: {}", build_dir.string(), errno_text(errno)));
  }
  if (fs::exists(final_dir, ec)) {
    // --rebuild: swap atomically; the old image ends up in build_dir and goes with the guard.
    if (::renameat2(AT_FDCWD, build_dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0)
      return fail(fmt::format("cannot replace {}: {}", final_dir.string(), errno_text(errno)));
  } else {
    if (::rename(build_dir.c_str(), final_dir.c_str()) != 0)
      return fail(fmt::format("cannot move {} to {}: {}", build_dir.string(), final_dir.string(),
                              errno_text(errno)));
    guard.dismiss();
  }
  if (auto s = fsync_dir(images); !s)
    return s.error();
  fs::remove(images / fmt::format(".failed-{}.log", hash), ec);
  say(fmt::format("image {}: done in {:.1f} s, {}, {} packages", name, took().count() / 1000.0,
                  human_size(info.size_bytes), info.packages.size()));
  return image_build_result{std::move(info), false, took()};
}

result<image_listing> list_images(const fs::path& images_dir) {
  image_listing out;
  const fs::path images = clean_path(images_dir);
  std::error_code ec;
  if (!fs::exists(images, ec))
    return out;
  fs::directory_iterator it(images, ec);
  if (ec)
    return fail(fmt::format("cannot read {}: {}", images.string(), ec.message()));
  for (fs::directory_iterator end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!leftover_hash(name).empty()) {
      out.leftovers.push_back(it->path());
    } else if (is_hex_hash(name) && it->is_directory(ec)) {
      if (auto i = read_image(it->path()))
        out.images.push_back(std::move(*i));
      else
        out.leftovers.push_back(it->path());
    }
  }
  std::sort(out.images.begin(), out.images.end(), [](const image_info& a, const image_info& b) {
    return std::tie(a.created, a.hash) < std::tie(b.created, b.hash);
  });
  std::sort(out.leftovers.begin(), out.leftovers.end());
  return out;
}

result<image_info> find_image(const fs::path& images_dir, std::string_view which) {
  auto listing = list_images(images_dir);
  if (!listing)
    return listing.error();
  auto& images = listing->images;
  if (which == "latest") {
    if (images.empty())
      return fail(errc::not_found,
                  fmt::format("no images under {}: build one with `ferryctl image build`",
                              clean_path(images_dir).string()));
    return images.back();
  }
  std::string prefix(which);
  std::transform(prefix.begin(), prefix.end(), prefix.begin(), ::tolower);
  if (prefix.size() < 4 || prefix.size() > 64 ||
      !std::all_of(prefix.begin(), prefix.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }))
    return fail(errc::invalid_argument,
                fmt::format("'{}' is not an image: \"latest\" or a hash (at least 4 hex digits)",
                            which));
  std::vector<const image_info*> matches;
  for (const auto& i : images)
    if (i.hash.rfind(prefix, 0) == 0)
      matches.push_back(&i);
  if (matches.empty())
    return fail(errc::not_found, fmt::format("no image {} under {} (see `ferryctl image list`)",
                                             which, clean_path(images_dir).string()));
  if (matches.size() > 1)
    return fail(errc::invalid_argument,
                fmt::format("'{}' matches {} images ({}, {}…): give more digits", which,
                            matches.size(), short_hash(matches[0]->hash),
                            short_hash(matches[1]->hash)));
  return *matches.front();
}

namespace {

/// An image found by `which`, with its lock held.
struct locked_image {
  image_info image;
  unique_fd lock;
};

/// Finds image `which` and takes its lock (`op`: LOCK_SH or LOCK_EX) without waiting; errc::busy
/// with "image <hash> <busy>" when another holder is in the way. The image may have been removed
/// between the lookup and the lock: a shared holder checks (read_image) before it relies on it.
result<locked_image> find_and_lock(const fs::path& images_dir, std::string_view which, int op,
                                   std::string_view busy) {
  auto image = find_image(images_dir, which);
  if (!image)
    return image.error();
  auto lock = open_lock(clean_path(images_dir), image->hash);
  if (!lock)
    return lock.error();
  if (!try_lock(lock->get(), op))
    return fail(errc::busy, fmt::format("image {} {}", short_hash(image->hash), busy));
  return locked_image{std::move(*image), std::move(*lock)};
}

}  // namespace

result<image_info> remove_image(const fs::path& images_dir, std::string_view which) {
  auto locked = find_and_lock(images_dir, which, LOCK_EX,
                              "is in use by a running ferryd (or being built): stop it first");
  if (!locked)
    return locked.error();
  const image_info& image = locked->image;
  const fs::path images = clean_path(images_dir);
  const fs::path trash = images / fmt::format(".trash-{}-{}", image.hash, ::getpid());
  if (auto r = remove_tree(trash); !r)
    return r.error();
  if (::rename(image.dir.c_str(), trash.c_str()) != 0)
    return fail(fmt::format("cannot remove {}: {}", image.dir.string(), errno_text(errno)));
  (void)fsync_dir(images);
  if (auto r = remove_tree(trash); !r)
    return fail(fmt::format("image {} is gone, but not all its files: {} (the next build "
                            "removes the rest)",
                            short_hash(image.hash), r.error().message));
  return locked->image;
}

result<size_t> remove_leftovers(const fs::path& images_dir) {
  return remove_leftovers_impl(clean_path(images_dir), {}, {});
}

image_lease::image_lease(image_lease&& o) noexcept
    : image_(std::move(o.image_)), fd_(std::exchange(o.fd_, -1)) {}

image_lease& image_lease::operator=(image_lease&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0)
      ::close(fd_);
    image_ = std::move(o.image_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

image_lease::~image_lease() {
  if (fd_ >= 0)
    ::close(fd_);
}

result<image_lease> lease_image(const fs::path& images_dir, std::string_view which) {
  auto locked = find_and_lock(images_dir, which, LOCK_SH, "is being rebuilt or removed");
  if (!locked)
    return locked.error();
  // Removed between the lookup and the lock?
  auto held = read_image(locked->image.dir);
  if (!held)
    return fail(errc::not_found,
                fmt::format("image {} was removed", short_hash(locked->image.hash)));
  return image_lease(std::move(*held), locked->lock.release());
}

}  // namespace ferry::sandbox
