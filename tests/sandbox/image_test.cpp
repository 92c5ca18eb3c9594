#define BOOST_TEST_MODULE sandbox_image
#include <boost/test/unit_test.hpp>

// Sandbox root images (ferry/sandbox/image.h).
//
// Without root: the content hash, reading apt's sources, recipe checks, and listing, finding,
// removing and leasing images on fabricated image directories.
// With root, debootstrap and the machine's apt mirror reachable: one real minbase + ripgrep
// image (built by two concurrent builds, of which one must wait and reuse), the cache hit, a
// cancelled and a SIGKILLed build of another recipe (nothing that looks valid may remain), and
// with runsc: `ls -la /` and `stat /` inside a sandbox on the image work, and fail on a copy of it
// without the statx shim. The build takes 1–2 minutes (debootstrap downloads ~45 MB each run;
// nothing is cached between runs, so each run is hermetic).
//
// A disabled case builds the full agent image and runs its tools in a sandbox:
//   sandbox_image_test --run_test=full_agent_image_runs_its_tools

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/sandbox/image.h"
#include "ferry/sandbox/sandbox.h"
#include "backend_test_support.h"

using namespace ferry::sandbox;
using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace utf = boost::unit_test;
using steady = std::chrono::steady_clock;
using ferry::errc;

namespace {

using testing::processes_mentioning;
using testing::recording_observer;
using testing::temp_dir;

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool tool_installed(const std::string& name) {
  auto r = run_command({"sh", "-c", "command -v " + name + " || test -x /usr/sbin/" + name}, 10s);
  return r.ok() && r->status.ok();
}

/// Precondition of the building cases: root, debootstrap, and an apt mirror to build from. (A
/// mirror that is configured but unreachable makes them fail, loudly, with the builder's
/// message: these tests need the network.)
boost::test_tools::assertion_result can_build(utf::test_unit_id) {
  boost::test_tools::assertion_result ok(true);
  if (::geteuid() != 0) {
    ok = false;
    ok.message() << "skipped: building images needs root";
  } else if (!tool_installed("debootstrap")) {
    ok = false;
    ok.message() << "skipped: debootstrap is not installed (tools/ferry deps)";
  } else if (auto m = find_apt_mirror("bookworm"); !m) {
    ok = false;
    ok.message() << "skipped: " << m.error().message;
  }
  return ok;
}

boost::test_tools::assertion_result can_build_and_run(utf::test_unit_id id) {
  auto ok = can_build(id);
  if (ok)
    ok = testing::runsc_available(id);
  return ok;
}

/// A recipe as resolve_recipe returns it, without asking apt or dpkg.
image_recipe resolved_example() {
  image_recipe r;
  r.suite = "bookworm";
  r.variant = "minbase";
  r.arch = "amd64";
  r.mirror = "http://mirror.invalid/debian";
  r.packages = {"ripgrep"};
  return r;
}

/// An image directory as the builder leaves it, without building: manifest + empty rootfs.
void fake_image(const fs::path& images, const std::string& hash, const std::string& created) {
  nlohmann::json m{{"hash", hash},
                   {"recipe",
                    {{"format", 1},
                     {"suite", "bookworm"},
                     {"variant", "minbase"},
                     {"arch", "amd64"},
                     {"mirror", "http://mirror.invalid/debian"},
                     {"packages", nlohmann::json::array()}}},
                   {"created", created},
                   {"size_bytes", 1234},
                   {"packages", {{"coreutils", "9.1-1"}}}};
  fs::create_directories(images / hash / "rootfs");
  write(images / hash / "manifest.json", m.dump(2));
}

std::string hash_of(char c) { return std::string(64, c); }

/// Everything below `dir` that is mounted (there must never be anything).
std::vector<std::string> mounts_below(const fs::path& dir) {
  std::vector<std::string> found;
  std::istringstream in(testing::read_proc_file("/proc/self/mountinfo"));
  for (std::string line; std::getline(in, line);)
    if (line.find(" " + dir.string() + "/") != std::string::npos)
      found.push_back(line);
  return found;
}

/// Collects progress lines (thread-safe: a concurrent build may call from its thread).
struct progress_log {
  std::mutex mu;
  std::vector<std::string> lines;
  void add(std::string_view l) {
    std::lock_guard lock(mu);
    lines.emplace_back(l);
  }
  size_t count_prefix(std::string_view prefix) {
    std::lock_guard lock(mu);
    return std::count_if(lines.begin(), lines.end(),
                         [&](const std::string& l) { return l.rfind(prefix, 0) == 0; });
  }
  bool any_containing(std::string_view needle) {
    std::lock_guard lock(mu);
    return std::any_of(lines.begin(), lines.end(),
                       [&](const std::string& l) { return l.find(needle) != std::string::npos; });
  }
  std::string last(size_t n) {
    std::lock_guard lock(mu);
    std::string out;
    for (size_t i = lines.size() > n ? lines.size() - n : 0; i < lines.size(); ++i)
      out += lines[i] + "\n";
    return out;
  }
};

/// The image the building cases share: minbase + ripgrep, built once by the first of them.
struct shared_image {
  temp_dir tmp;
  fs::path images() const { return tmp.path() / "images"; }
  std::optional<image_info> image;
  double build_seconds = 0;
};
shared_image& shared_state() {
  static shared_image s;
  return s;
}

image_recipe small_recipe() {
  image_recipe r;
  r.packages = {"ripgrep"};
  return r;
}

/// The shared image, built here if the first building case did not run (--run_test=…).
shared_image& shared() {
  auto& s = shared_state();
  if (!s.image) {
    image_build_options o;
    o.images_dir = s.images();
    auto built = build_image(small_recipe(), o);
    BOOST_REQUIRE_MESSAGE(built.ok(), (built.ok() ? "" : built.error().message));
    s.image = built->image;
  }
  return s;
}

/// Runs `script` with /bin/sh in a gVisor sandbox on `rootfs`; returns (exit code, stdout+stderr).
std::pair<int, std::string> run_in_sandbox(const fs::path& rootfs, const std::string& script) {
  temp_dir work;
  runsc_options o;
  o.state_dir = work.path() / "state";
  o.sandboxes_dir = work.path() / "sandboxes";
  o.rootfs = rootfs;
  o.init_binary = FERRY_INIT_BINARY;
  auto runtime = make_runsc_runtime(o);
  BOOST_REQUIRE_MESSAGE(runtime.ok(), (runtime.ok() ? "" : runtime.error().message));
  recording_observer obs;
  sandbox_spec spec;
  spec.id = fmt::format("img-{}", ::getpid());
  spec.argv = {"/bin/sh", "-c", script};
  auto sb = (*runtime)->start(spec, obs);
  BOOST_REQUIRE(sb.ok());
  BOOST_REQUIRE_MESSAGE(obs.wait_for("ended", 120s), "the sandbox did not end in 120 s");
  auto ended = obs.find("ended");
  BOOST_REQUIRE_MESSAGE(!ended->failure, ended->failure.value_or("") << "\n" << obs.output(1));
  auto exited = obs.find("exited");
  BOOST_REQUIRE(exited);
  return {exited->exit_code, obs.output(0) + obs.output(1)};
}

}  // namespace

// --- without root ------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(hash_covers_every_part_of_the_recipe_and_nothing_else) {
  const image_recipe base = resolved_example();
  const std::string h = image_hash(base);
  BOOST_TEST(h.size() == 64u);
  BOOST_TEST(h.find_first_not_of("0123456789abcdef") == std::string::npos);
  BOOST_TEST(image_hash(base) == h);  // deterministic

  std::set<std::string> hashes{h};
  auto changed = [&](auto&& change) {
    image_recipe r = base;
    change(r);
    return hashes.insert(image_hash(r)).second;
  };
  BOOST_TEST(changed([](image_recipe& r) { r.suite = "trixie"; }));
  BOOST_TEST(changed([](image_recipe& r) { r.variant = "buildd"; }));
  BOOST_TEST(changed([](image_recipe& r) { r.arch = "arm64"; }));
  BOOST_TEST(changed([](image_recipe& r) { r.mirror = "http://other.invalid/debian"; }));
  BOOST_TEST(changed([](image_recipe& r) { r.packages = {"ripgrep", "git"}; }));
  BOOST_TEST(changed([](image_recipe& r) { r.packages.clear(); }));
  // The keyring decides what is trusted, not what is installed.
  image_recipe keyed = base;
  keyed.keyring = "/usr/share/keyrings/other.gpg";
  BOOST_TEST(image_hash(keyed) == h);

  // resolve_recipe normalises what the user may write differently: order, duplicates, a
  // trailing slash on the mirror.
  image_recipe messy = base;
  messy.packages = {"ripgrep", "git", "ripgrep"};
  messy.mirror = "http://mirror.invalid/debian/";
  auto resolved = resolve_recipe(messy);
  BOOST_REQUIRE(resolved.ok());
  image_recipe tidy = base;
  tidy.packages = {"git", "ripgrep"};
  BOOST_TEST(image_hash(*resolved) == image_hash(tidy));

  // What is hashed is readable and carries the format and the shim's source hash.
  const std::string j = recipe_json(base);
  BOOST_TEST(j.find("\"format\":1") != std::string::npos);
  BOOST_TEST(j.find("\"statx_shim_sha256\":\"") != std::string::npos);
  BOOST_TEST(j.find("mirror.invalid") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_recipes_are_refused) {
  for (auto change : std::vector<std::function<void(image_recipe&)>>{
         [](image_recipe& r) { r.packages = {"git,curl"}; },
         [](image_recipe& r) { r.packages = {"Git"}; },
         [](image_recipe& r) { r.packages = {"x; rm -rf /"}; },
         [](image_recipe& r) { r.suite = "../etc"; },
         [](image_recipe& r) { r.variant = "fakechroot"; },
         [](image_recipe& r) { r.mirror = "ftp://mirror.invalid/debian"; },
         [](image_recipe& r) { r.mirror = "http://mirror.invalid/a b"; },
       }) {
    image_recipe r = resolved_example();
    change(r);
    auto resolved = resolve_recipe(r);
    BOOST_TEST(!resolved.ok());
    if (!resolved.ok())
      BOOST_TEST((resolved.error().code == errc::invalid_argument), resolved.error().message);
  }
}

BOOST_AUTO_TEST_CASE(apt_mirror_comes_from_one_line_and_deb822_sources) {
  {  // one-line format: options in brackets, deb-src and comments skipped, trailing '/' cut
    temp_dir apt;
    write(apt.path() / "sources.list",
          "# deb http://commented.invalid/debian bookworm main\n"
          "deb-src http://src.invalid/debian bookworm main\n"
          "deb [arch=amd64 signed-by=/k/one.gpg] http://one.invalid/debian/ bookworm main contrib\n"
          "deb http://later.invalid/debian bookworm main\n");
    auto m = find_apt_mirror("bookworm", apt.path());
    BOOST_REQUIRE_MESSAGE(m.ok(), (m.ok() ? "" : m.error().message));
    BOOST_TEST(m->uri == "http://one.invalid/debian");
    BOOST_TEST(m->keyring == fs::path("/k/one.gpg"));
    BOOST_TEST(m->found_in == apt.path() / "sources.list");
  }
  {  // deb822: a disabled paragraph, a security archive and an ignored extension come first
    temp_dir apt;
    write(apt.path() / "sources.list.d/a.list.disabled", "deb http://disabled.invalid/debian bookworm main\n");
    write(apt.path() / "sources.list.d/a.list",
          "deb http://security.invalid/debian-security bookworm-security main\n");
    write(apt.path() / "sources.list.d/b.sources",
          "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nComponents: main\n"
          "Enabled: no\n\n"
          "# the archive\nTypes: deb deb-src\nURIs: http://two.invalid/debian\n"
          "Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k/two.gpg\n");
    auto m = find_apt_mirror("bookworm", apt.path());
    BOOST_REQUIRE_MESSAGE(m.ok(), (m.ok() ? "" : m.error().message));
    BOOST_TEST(m->uri == "http://two.invalid/debian");
    BOOST_TEST(m->keyring == fs::path("/k/two.gpg"));
    BOOST_TEST(m->found_in == apt.path() / "sources.list.d/b.sources");
  }
  {  // no entry for the suite: a plain codename archive with main serves it; an inline key is
     // no keyring file
    temp_dir apt;
    write(apt.path() / "sources.list.d/x.sources",
          "Types: deb\nURIs: https://vendor.invalid/node\nSuites: nodistro\nComponents: main\n\n"
          "Types: deb\nURIs: http://four.invalid/debian\nSuites: trixie trixie-updates\n"
          "Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n");
    auto m = find_apt_mirror("bookworm", apt.path());
    BOOST_REQUIRE_MESSAGE(m.ok(), (m.ok() ? "" : m.error().message));
    BOOST_TEST(m->uri == "http://four.invalid/debian");
    BOOST_TEST(m->keyring.empty());
  }
  {  // nothing at all
    temp_dir apt;
    auto m = find_apt_mirror("bookworm", apt.path());
    BOOST_REQUIRE(!m.ok());
    BOOST_TEST((m.error().code == errc::not_found));
  }
}

BOOST_AUTO_TEST_CASE(images_are_listed_found_leased_and_removed) {
  temp_dir tmp;
  const fs::path images = tmp.path() / "images";
  BOOST_TEST(list_images(images)->images.empty());  // no directory: no images, no error
  BOOST_TEST((find_image(images, "latest").error().code == errc::not_found));

  fake_image(images, "ab12" + hash_of('0').substr(4), "2026-01-01T00:00:00.000Z");
  fake_image(images, "ab13" + hash_of('1').substr(4), "2026-01-02T00:00:00.000Z");
  fake_image(images, "cd00" + hash_of('2').substr(4), "2026-01-03T00:00:00.000Z");
  // Never images: a build in progress or interrupted, a hash directory without a manifest.
  fs::create_directories(images / (".build-" + hash_of('e') + "-123") / "rootfs");
  write(images / (".build-" + hash_of('e') + "-123") / "manifest.json", "{}");
  fs::create_directories(images / hash_of('f') / "rootfs");

  auto listing = list_images(images);
  BOOST_REQUIRE(listing.ok());
  BOOST_REQUIRE_EQUAL(listing->images.size(), 3u);
  BOOST_TEST(listing->images[0].hash.substr(0, 4) == "ab12");  // oldest first
  BOOST_TEST(listing->images[0].rootfs == images / listing->images[0].hash / "rootfs");
  BOOST_TEST(listing->images[0].packages.at("coreutils") == "9.1-1");
  BOOST_TEST(listing->leftovers.size() == 2u);

  BOOST_TEST(find_image(images, "latest")->hash.substr(0, 4) == "cd00");
  BOOST_TEST(find_image(images, "AB12")->hash.substr(0, 4) == "ab12");
  BOOST_TEST((find_image(images, "ab1").error().code == errc::invalid_argument));   // too short
  BOOST_TEST((find_image(images, "ab1f").error().code == errc::not_found));
  fake_image(images, "ab12ff" + hash_of('3').substr(6), "2026-01-04T00:00:00.000Z");
  BOOST_TEST((find_image(images, "ab12").error().code == errc::invalid_argument));  // two match
  BOOST_TEST(find_image(images, "ab120").ok());

  {  // a leased image cannot be removed; others can
    auto lease = lease_image(images, "cd00");
    BOOST_REQUIRE(lease.ok());
    auto busy = remove_image(images, "cd00");
    BOOST_REQUIRE(!busy.ok());
    BOOST_TEST((busy.error().code == errc::busy), busy.error().message);
    BOOST_TEST(fs::exists(lease->image().rootfs));
    auto second = lease_image(images, "cd00");  // shared: many ferryds may use one image
    BOOST_TEST(second.ok());
  }
  auto removed = remove_image(images, "cd00");
  BOOST_REQUIRE_MESSAGE(removed.ok(), (removed.ok() ? "" : removed.error().message));
  BOOST_TEST(!fs::exists(removed->dir));
  BOOST_TEST((remove_image(images, "cd00").error().code == errc::not_found));

  {  // leftovers go, unless their lock is held (a build still running)
    const std::string running = hash_of('d');
    fs::create_directories(images / (".build-" + running + "-77") / "rootfs/etc");
    int fd = ::open((images / ".locks" / running).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::flock(fd, LOCK_EX) == 0);
    auto n = remove_leftovers(images);
    BOOST_REQUIRE(n.ok());
    BOOST_TEST(*n == 1u);  // the interrupted .build-eee…, not the running one
    BOOST_TEST(fs::exists(images / (".build-" + running + "-77")));
    ::close(fd);
    BOOST_TEST(*remove_leftovers(images) == 1u);
    BOOST_TEST(list_images(images)->leftovers.size() == 1u);  // only the manifest-less hash dir
  }
}

// --- with root, debootstrap and the mirror ------------------------------------------------------

BOOST_AUTO_TEST_CASE(concurrent_builds_of_one_recipe_build_it_once, *utf::precondition(can_build)) {
  auto& s = shared_state();
  progress_log logs[2];
  std::optional<ferry::result<image_build_result>> results[2];
  const auto started = steady::now();
  std::thread builders[2];
  for (int i = 0; i < 2; ++i) {
    builders[i] = std::thread([&, i] {
      image_build_options o;
      o.images_dir = s.images();
      o.progress = [&, i](std::string_view l) { logs[i].add(l); };
      results[i] = build_image(small_recipe(), o);
    });
    std::this_thread::sleep_for(100ms);
  }
  for (auto& t : builders)
    t.join();
  s.build_seconds = std::chrono::duration<double>(steady::now() - started).count();
  for (int i = 0; i < 2; ++i)
    BOOST_REQUIRE_MESSAGE(results[i]->ok(), (results[i]->ok() ? "" : results[i]->error().message)
                                              << "\n" << logs[i].last(20));
  auto& a = **results[0];
  auto& b = **results[1];
  BOOST_TEST_MESSAGE(fmt::format("minbase + ripgrep: built in {:.1f} s, {} MiB, {} packages",
                                 s.build_seconds, a.image.size_bytes >> 20,
                                 a.image.packages.size()));
  BOOST_TEST(a.image.hash == b.image.hash);
  BOOST_TEST(a.reused != b.reused);  // exactly one built it
  const int builder = a.reused ? 1 : 0;
  BOOST_TEST(logs[builder].count_prefix("debootstrap: ") > 20u);
  BOOST_TEST(logs[builder].count_prefix("apt: ") > 0u);
  BOOST_TEST(logs[1 - builder].count_prefix("debootstrap: ") == 0u);
  BOOST_TEST(logs[1 - builder].any_containing("waiting"));

  const image_info& img = a.image;
  s.image = img;
  BOOST_TEST(img.dir == s.images() / img.hash);
  BOOST_TEST(read(img.rootfs / "etc/os-release").find("bookworm") != std::string::npos);
  BOOST_TEST(read(img.rootfs / "etc/ld.so.preload") == "/usr/local/lib/ferry/statx_shim.so\n");
  BOOST_TEST(fs::is_regular_file(img.rootfs / "usr/local/lib/ferry/statx_shim.so"));
  BOOST_TEST(fs::is_regular_file(img.rootfs / "usr/bin/rg"));
  // Mount points the runtime binds onto, so runsc's gofer never writes into the image.
  BOOST_TEST(fs::is_directory(img.rootfs / "workspace"));
  BOOST_TEST(fs::is_directory(img.rootfs / ".ferry/ctl"));
  BOOST_TEST(fs::is_regular_file(img.rootfs / ".ferry/init"));
  BOOST_TEST(read(img.rootfs / "etc/resolv.conf").empty());  // nothing of the build host
  BOOST_TEST(read(img.rootfs / "etc/hostname") == "sandbox\n");
  BOOST_TEST(img.packages.count("ripgrep") == 1u);
  BOOST_TEST(img.packages.count("coreutils") == 1u);
  BOOST_TEST(img.size_bytes > (50u << 20));
  BOOST_TEST(img.recipe.packages == std::vector<std::string>{"ripgrep"});
  // The manifest on disk says the same.
  auto manifest = nlohmann::json::parse(read(img.dir / "manifest.json"));
  BOOST_TEST(manifest["hash"] == img.hash);
  BOOST_TEST(manifest["packages"]["ripgrep"] == img.packages.at("ripgrep"));
  BOOST_TEST(manifest["recipe"]["mirror"] == find_apt_mirror("bookworm")->uri);
  BOOST_TEST(list_images(s.images())->leftovers.empty());
  BOOST_TEST(mounts_below(s.images()).empty());
}

BOOST_AUTO_TEST_CASE(a_cached_image_is_returned_without_running_debootstrap,
                     *utf::precondition(can_build)) {
  auto& s = shared();
  progress_log log;
  image_build_options o;
  o.images_dir = s.images();
  o.progress = [&](std::string_view l) { log.add(l); };
  auto again = build_image(small_recipe(), o);
  BOOST_REQUIRE(again.ok());
  BOOST_TEST_MESSAGE(fmt::format("cache hit in {} ms (the build took {:.1f} s)",
                                 again->took.count(), s.build_seconds));
  BOOST_TEST(again->reused);
  BOOST_TEST(again->image.hash == s.image->hash);
  BOOST_TEST(again->image.created == s.image->created);  // the same image, not a new one
  BOOST_TEST(log.count_prefix("debootstrap: ") == 0u);
  BOOST_TEST(again->took < 10s);  // one dpkg --print-architecture; generous for a loaded CI
  BOOST_TEST(find_image(s.images(), "latest")->hash == s.image->hash);
}

BOOST_AUTO_TEST_CASE(a_cancelled_build_leaves_nothing, *utf::precondition(can_build)) {
  auto& s = shared();
  BOOST_REQUIRE(s.image);
  image_recipe other;
  other.packages = {"less"};  // another recipe: not a cache hit
  progress_log log;
  std::atomic<bool> in_debootstrap{false};
  image_build_options o;
  o.images_dir = s.images();
  o.progress = [&](std::string_view l) {
    log.add(l);
    if (l.rfind("debootstrap: I: Extracting", 0) == 0)  // files are being written
      in_debootstrap = true;
  };
  o.cancelled = [&] { return in_debootstrap.load(); };
  auto r = build_image(other, o);
  BOOST_REQUIRE(!r.ok());
  BOOST_TEST((r.error().code == errc::closed), r.error().message);
  BOOST_TEST(in_debootstrap.load());
  auto listing = list_images(s.images());
  BOOST_REQUIRE_EQUAL(listing->images.size(), 1u);
  BOOST_TEST(listing->images[0].hash == s.image->hash);
  BOOST_TEST(listing->leftovers.empty());
  BOOST_TEST(mounts_below(s.images()).empty());
  BOOST_TEST(processes_mentioning(s.images().string() + "/.build-").empty());
}

BOOST_AUTO_TEST_CASE(a_killed_build_leaves_nothing_that_looks_valid,
                     *utf::precondition(can_build)) {
  auto& s = shared();
  BOOST_REQUIRE(s.image);
  // The builder process dies by SIGKILL mid-debootstrap, as a killed ferryctl would.
  spawn_options so;
  so.argv = {FERRY_IMAGE_BUILD_CHILD, s.images().string(), "less"};
  so.out = stdio::pipe;
  auto child = child_process::spawn(so);
  BOOST_REQUIRE(child.ok());
  bool extracting = false;
  std::string seen;
  const auto deadline = steady::now() + 180s;
  while (!extracting && steady::now() < deadline) {
    auto line = testing::read_line(child->stdout_fd(), 180s);
    if (!line)
      break;
    seen += *line + "\n";
    // Well into the build: files are being written into the new root.
    extracting = line->rfind("debootstrap: I: Extracting", 0) == 0;
  }
  BOOST_REQUIRE_MESSAGE(extracting, "the build never got to extracting:\n" << seen);
  child->signal_group(SIGKILL);
  auto st = child->wait();
  BOOST_TEST(st.signal == SIGKILL);

  // What it left is not an image, and finding images ignores it.
  auto listing = list_images(s.images());
  BOOST_REQUIRE(listing.ok());
  BOOST_REQUIRE_EQUAL(listing->images.size(), 1u);
  BOOST_TEST(listing->images[0].hash == s.image->hash);
  BOOST_REQUIRE_EQUAL(listing->leftovers.size(), 1u);
  BOOST_TEST(listing->leftovers[0].filename().string().rfind(".build-", 0) == 0u);
  BOOST_TEST(find_image(s.images(), "latest")->hash == s.image->hash);
  BOOST_TEST(mounts_below(s.images()).empty());  // debootstrap's mounts died with its namespace

  // debootstrap dies with its parent (setpriv --pdeathsig); what it started ends soon after.
  const auto gone_by = steady::now() + 30s;
  while (!processes_mentioning(listing->leftovers[0].string()).empty() && steady::now() < gone_by)
    std::this_thread::sleep_for(100ms);
  auto still = processes_mentioning(listing->leftovers[0].string());
  BOOST_TEST(still.empty(), "still running: " << (still.empty() ? "" : still.front()));

  auto removed = remove_leftovers(s.images());
  BOOST_REQUIRE_MESSAGE(removed.ok(), (removed.ok() ? "" : removed.error().message));
  BOOST_TEST(*removed == 1u);
  BOOST_TEST(list_images(s.images())->leftovers.empty());
}

BOOST_AUTO_TEST_CASE(ls_and_stat_work_in_a_sandbox_on_the_image,
                     *utf::precondition(can_build_and_run)) {
  auto& s = shared();
  BOOST_REQUIRE(s.image);
  auto entries = [&] {
    std::set<std::string> names;
    for (const char* d : {"", ".ferry", "workspace"})
      for (const auto& e : fs::directory_iterator(s.image->rootfs / d))
        names.insert(e.path().string());
    return names;
  };
  const auto before = entries();
  auto [code, out] = run_in_sandbox(
    s.image->rootfs, "ls -la / && stat / && stat -c '%F' /workspace && rg --version | head -1");
  BOOST_TEST(code == 0, out);
  BOOST_TEST(out.find(" workspace") != std::string::npos, out);
  BOOST_TEST(out.find("File: /") != std::string::npos, out);
  BOOST_TEST(out.find("directory") != std::string::npos, out);
  BOOST_TEST(out.find("ripgrep ") != std::string::npos, out);
  // The sandbox ran on the image without adding mount points to it.
  BOOST_TEST((entries() == before));
}

BOOST_AUTO_TEST_CASE(without_the_shim_ls_and_stat_fail_in_a_sandbox,
                     *utf::precondition(can_build_and_run)) {
  // The control: the same image minus /etc/ld.so.preload. If this passed with the shim's
  // absence, the shim would not be what makes the case above work.
  auto& s = shared();
  BOOST_REQUIRE(s.image);
  temp_dir tmp;
  const fs::path copy = tmp.path() / "rootfs";
  auto cp = run_command({"cp", "-al", s.image->rootfs.string(), copy.string()}, 120s);
  if (!cp.ok() || !cp->status.ok())  // another filesystem: copy the bytes
    cp = run_command({"cp", "-a", s.image->rootfs.string(), copy.string()}, 300s);
  BOOST_REQUIRE(cp.ok() && cp->status.ok());
  fs::remove(copy / "etc/ld.so.preload");  // unlinks the copy's name only
  BOOST_REQUIRE(fs::exists(s.image->rootfs / "etc/ld.so.preload"));

  auto [code, out] = run_in_sandbox(copy, "ls -la /; echo \"ls=$?\"; stat /; echo \"stat=$?\"");
  BOOST_TEST(code == 0, out);
  BOOST_TEST(out.find("ls=0") == std::string::npos, out);
  BOOST_TEST(out.find("stat=1") != std::string::npos, out);
  BOOST_TEST(out.find("Invalid argument") != std::string::npos, out);
}

BOOST_AUTO_TEST_CASE(full_agent_image_runs_its_tools,
                     *utf::disabled() * utf::precondition(can_build_and_run)) {
  // Manual: the full package set (~5 minutes and ~1 GB here). FERRY_IMAGE_DATA_DIR keeps the
  // image (e.g. in ./var, for ferryd); otherwise it is built in a temp dir and removed.
  temp_dir tmp;
  const char* keep = std::getenv("FERRY_IMAGE_DATA_DIR");
  const fs::path images = (keep && *keep ? fs::path(keep) : tmp.path()) / "images";
  image_recipe r;
  r.packages = default_image_packages();
  image_build_options o;
  o.images_dir = images;
  o.progress = [](std::string_view l) {
    if (l.rfind("debootstrap: ", 0) != 0 && l.rfind("apt: ", 0) != 0)
      BOOST_TEST_MESSAGE(l);
  };
  auto built = build_image(r, o);
  BOOST_REQUIRE_MESSAGE(built.ok(), (built.ok() ? "" : built.error().message));
  BOOST_TEST_MESSAGE(fmt::format("full image {}: {} in {:.1f} s, {:.2f} GiB, {} packages",
                                 built->image.hash.substr(0, 12),
                                 built->reused ? "cached" : "built", built->took.count() / 1000.0,
                                 static_cast<double>(built->image.size_bytes) / (1ull << 30),
                                 built->image.packages.size()));
  auto [code, out] = run_in_sandbox(
    built->image.rootfs,
    "set -e; ls -la / >/dev/null; stat / >/dev/null; git --version; curl --version | head -1; "
    "python3 --version; node --version; npm --version; cc --version | head -1; "
    "make --version | head -1; rg --version | head -1; "
    "cd /tmp && printf 'int main(){return 0;}' > t.c && cc t.c -o t && ./t && echo compiled; "
    "git init -q /tmp/repo && echo git-ok");
  BOOST_TEST(code == 0, out);
  BOOST_TEST_MESSAGE(out);
  for (const char* want : {"git version", "curl ", "Python 3", "v18", "compiled", "git-ok", "ripgrep"})
    BOOST_TEST(out.find(want) != std::string::npos, want << " in:\n" << out);
}
