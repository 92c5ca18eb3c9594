// The sandbox disk quota (sandbox/src/quota_disk.h) on real loop devices and ext4: sizes,
// ENOSPC at the quota with the host untouched, nosuid/nodev, owner, removal also while busy,
// no loop device left behind, the stock of ready disks (take, refill, leftovers of a crashed
// owner, no stock). Needs root.

#define BOOST_TEST_MODULE sandbox_quota_disk
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ferry/sandbox/process.h"
#include "quota_disk.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace ferry::sandbox::detail;
using ferry::sandbox::testing::temp_dir;
using clock_type = std::chrono::steady_clock;

namespace {

/// Loop devices whose backing file is under `dir`.
std::vector<std::string> loops_backed_by(const fs::path& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (fs::directory_iterator it("/sys/block", ec), end; !ec && it != end; it.increment(ec)) {
    auto name = it->path().filename().string();
    if (name.rfind("loop", 0) != 0)
      continue;
    std::string backing = ferry::sandbox::read_small_file(it->path() / "loop" / "backing_file");
    if (backing.find(dir.string()) != std::string::npos)
      found.push_back(name + " → " + backing);
  }
  return found;
}

/// Waits (up to 2 s) until no loop device is backed by a file under `dir`: autoclear releases a
/// device once its last user is gone, which may be a moment after the unmount.
bool loops_released(const fs::path& dir) {
  for (int i = 0; i < 100; ++i) {
    if (loops_backed_by(dir).empty())
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

/// A 32 MiB disk owned by root: enough for the tests that do not fill it.
disk_spec small_disk() {
  disk_spec spec;
  spec.bytes = 32ull << 20;
  return spec;
}

/// Removes every disk a test made under its temp dir before the dir itself goes.
struct disks_guard {
  std::vector<std::pair<fs::path, fs::path>> disks;
  ~disks_guard() {
    for (const auto& [image, mnt] : disks)
      (void)remove_disk(image, mnt);
  }
};

/// Writes 1 MiB blocks into `file` until a write fails; returns the bytes written and errno.
std::pair<uint64_t, int> fill(const fs::path& file) {
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return {0, errno};
  std::string block(1 << 20, 'x');
  uint64_t written = 0;
  int err = 0;
  for (int i = 0; i < 4096; ++i) {  // bounded: 4 GiB at most
    ssize_t n = ::write(fd, block.data(), block.size());
    if (n < 0) {
      err = errno;
      break;
    }
    written += static_cast<uint64_t>(n);
    if (static_cast<size_t>(n) < block.size()) {
      // A short write at the end of the space; the next one says why.
      continue;
    }
  }
  if (err == 0 && ::fsync(fd) != 0)
    err = errno;
  ::close(fd);
  return {written, err};
}

double ms_since(clock_type::time_point t) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t).count();
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_disk_has_its_size_flags_and_owner_and_fills_up_with_enospc) {
  temp_dir dir;
  disks_guard guard;
  const fs::path image = dir.path() / "d.img", mnt = dir.path() / "d";
  disk_spec spec;
  spec.bytes = 64ull << 20;
  spec.owner_uid = 12345;
  spec.owner_gid = 23456;
  auto t0 = clock_type::now();
  auto made = create_disk(image, mnt, spec);
  BOOST_TEST_MESSAGE("create_disk (64 MiB): " << ms_since(t0) << " ms");
  BOOST_TEST_REQUIRE(made.ok(), (made.ok() ? "" : made.error().message));
  guard.disks.emplace_back(image, mnt);

  BOOST_TEST(is_mount_point(mnt));
  BOOST_TEST(!is_mount_point(dir.path()));
  struct stat st {};
  BOOST_TEST_REQUIRE(::stat(mnt.c_str(), &st) == 0);
  BOOST_TEST(st.st_uid == spec.owner_uid);
  BOOST_TEST(st.st_gid == spec.owner_gid);
  struct statvfs vfs {};
  BOOST_TEST_REQUIRE(::statvfs(mnt.c_str(), &vfs) == 0);
  BOOST_TEST((vfs.f_flag & ST_NOSUID) != 0);
  BOOST_TEST((vfs.f_flag & ST_NODEV) != 0);
  // Sparse on the host: a 64 MiB disk takes a few MiB until written.
  BOOST_TEST_REQUIRE(::stat(image.c_str(), &st) == 0);
  BOOST_TEST(static_cast<uint64_t>(st.st_size) == spec.bytes);
  BOOST_TEST(static_cast<uint64_t>(st.st_blocks) * 512 < spec.bytes / 4);

  auto before = usage_of(mnt);
  BOOST_TEST_REQUIRE(before.ok());
  BOOST_TEST(before->total_bytes > spec.bytes * 8 / 10);
  BOOST_TEST(before->total_bytes <= spec.bytes);
  BOOST_TEST(!before->full());

  auto [written, err] = fill(mnt / "big");
  BOOST_TEST(err == ENOSPC, "filling ended with " << err << " after " << written << " bytes");
  BOOST_TEST(written <= spec.bytes);
  BOOST_TEST(written > spec.bytes / 2);
  auto after = usage_of(mnt);
  BOOST_TEST_REQUIRE(after.ok());
  BOOST_TEST(after->full());
  // The host's filesystem paid at most the quota: the image's allocated blocks (measured on the
  // image itself: other tests write to the host's filesystem meanwhile).
  BOOST_TEST_REQUIRE(::stat(image.c_str(), &st) == 0);
  BOOST_TEST(static_cast<uint64_t>(st.st_blocks) * 512 <= spec.bytes);

  // Deleting frees the space inside.
  fs::remove(mnt / "big");
  ::sync();
  auto freed = usage_of(mnt);
  BOOST_TEST_REQUIRE(freed.ok());
  BOOST_TEST(!freed->full());
}

BOOST_AUTO_TEST_CASE(removing_a_disk_unmounts_it_deletes_the_image_and_frees_the_loop_device) {
  temp_dir dir;
  const fs::path image = dir.path() / "d.img", mnt = dir.path() / "d";
  BOOST_TEST_REQUIRE(create_disk(image, mnt, small_disk()).ok());
  BOOST_TEST(loops_backed_by(dir.path()).size() == 1u);
  std::ofstream(mnt / "f") << "data";
  auto t0 = clock_type::now();
  auto removed = remove_disk(image, mnt);
  BOOST_TEST_MESSAGE("remove_disk: " << ms_since(t0) << " ms");
  BOOST_TEST_REQUIRE(removed.ok(), (removed.ok() ? "" : removed.error().message));
  BOOST_TEST(!is_mount_point(mnt));
  BOOST_TEST(!fs::exists(image));
  BOOST_TEST(!fs::exists(mnt));
  BOOST_TEST(loops_backed_by(dir.path()).empty());
  // Removing again, or a disk that never was, is fine (orphan cleanup).
  BOOST_TEST(remove_disk(image, mnt).ok());
  BOOST_TEST(remove_disk(dir.path() / "never.img", dir.path() / "never").ok());
}

BOOST_AUTO_TEST_CASE(a_busy_disk_is_detached_and_its_loop_device_goes_with_the_last_user) {
  temp_dir dir;
  const fs::path image = dir.path() / "d.img", mnt = dir.path() / "d";
  BOOST_TEST_REQUIRE(create_disk(image, mnt, small_disk()).ok());
  // A process that has not died yet still holds a file on it.
  int held = ::open((mnt / "held").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  BOOST_TEST_REQUIRE(held >= 0);
  auto removed = remove_disk(image, mnt);
  BOOST_TEST_REQUIRE(removed.ok(), (removed.ok() ? "" : removed.error().message));
  BOOST_TEST(!is_mount_point(mnt));
  BOOST_TEST(!fs::exists(image));  // unlinked; the loop device keeps the inode until released
  BOOST_TEST(::write(held, "x", 1) == 1);  // the holder is not disturbed
  ::close(held);
  const bool freed = loops_released(dir.path());
  BOOST_TEST(freed, "loop devices left: " << loops_backed_by(dir.path()).size());
}

BOOST_AUTO_TEST_CASE(bad_requests_fail_with_clear_errors_and_leave_nothing) {
  temp_dir dir;
  disk_spec tiny;
  tiny.bytes = 1 << 20;
  auto r = create_disk(dir.path() / "t.img", dir.path() / "t", tiny);
  BOOST_TEST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("too small") != std::string::npos, r.error().message);
  BOOST_TEST(!fs::exists(dir.path() / "t.img"));

  disk_spec spec;
  spec.bytes = 32ull << 20;
  r = create_disk(dir.path() / "no" / "such" / "dir.img", dir.path() / "m", spec);
  BOOST_TEST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("cannot create disk image") != std::string::npos,
             r.error().message);

  // Not a filesystem: mounting fails, and no loop device is left attached.
  {
    std::ofstream junk(dir.path() / "junk.img");
    junk << std::string(1 << 20, 'j');
  }
  r = mount_disk(dir.path() / "junk.img", dir.path() / "junk");
  BOOST_TEST_REQUIRE(!r.ok());
  BOOST_TEST(r.error().message.find("cannot mount") != std::string::npos, r.error().message);
  BOOST_TEST(!is_mount_point(dir.path() / "junk"));
  const bool freed = loops_released(dir.path());
  BOOST_TEST(freed);
}

BOOST_AUTO_TEST_CASE(the_stock_hands_out_ready_disks_refills_and_cleans_up) {
  temp_dir dir;
  disks_guard guard;
  disk_spec spec;
  spec.bytes = 32ull << 20;
  const fs::path stock_dir = dir.path() / "stock";
  {
    disk_stock stock(stock_dir, spec, 2);
    BOOST_TEST_REQUIRE(stock.wait_ready(2, std::chrono::seconds(30)), stock.last_error());
    BOOST_TEST(stock.last_error().empty());

    std::vector<double> take_ms;
    for (int i = 0; i < 3; ++i) {
      const fs::path image = dir.path() / ("s" + std::to_string(i) + ".img");
      const fs::path mnt = dir.path() / ("s" + std::to_string(i)) / "disk";
      BOOST_TEST_REQUIRE(stock.wait_ready(1, std::chrono::seconds(30)), stock.last_error());
      auto t0 = clock_type::now();
      auto taken = stock.take(image, mnt);
      take_ms.push_back(ms_since(t0));
      BOOST_TEST_REQUIRE(taken.ok(), (taken.ok() ? "" : taken.error().message));
      guard.disks.emplace_back(image, mnt);
      BOOST_TEST(is_mount_point(mnt));
      BOOST_TEST(fs::exists(image));
      auto u = usage_of(mnt);
      BOOST_TEST_REQUIRE(u.ok());
      BOOST_TEST(u->total_bytes <= spec.bytes);
      // Each disk is its own: what one holds, another does not.
      std::ofstream(mnt / "mine") << i;
    }
    for (int i = 0; i < 3; ++i) {
      std::ifstream in(dir.path() / ("s" + std::to_string(i)) / "disk" / "mine");
      int v = -1;
      in >> v;
      BOOST_TEST(v == i);
    }
    BOOST_TEST_MESSAGE("take() from the stock: " << take_ms[0] << ", " << take_ms[1] << ", "
                                                 << take_ms[2] << " ms");
    BOOST_TEST(stock.wait_ready(2, std::chrono::seconds(30)), "the stock did not refill");
  }
  // The stock's own disks and mounts are gone with it; the taken ones are not.
  BOOST_TEST(!fs::exists(stock_dir));
  BOOST_TEST(!is_mount_point(stock_dir));
  for (int i = 0; i < 3; ++i)
    BOOST_TEST(is_mount_point(dir.path() / ("s" + std::to_string(i)) / "disk"));
  BOOST_TEST(loops_backed_by(stock_dir).empty());
}

BOOST_AUTO_TEST_CASE(a_new_stock_removes_what_a_crashed_owner_left_and_no_stock_still_works) {
  temp_dir dir;
  disks_guard guard;
  disk_spec spec;
  spec.bytes = 32ull << 20;
  const fs::path stock_dir = dir.path() / "stock";
  // A crashed owner's leftovers: a mounted spare inside the stock dir.
  fs::create_directories(stock_dir);
  BOOST_TEST_REQUIRE(create_disk(stock_dir / "spare-7.img", stock_dir / "spare-7", spec).ok());
  {
    disk_stock none(stock_dir, spec, 0);
    BOOST_TEST(!is_mount_point(stock_dir / "spare-7"));
    BOOST_TEST(!fs::exists(stock_dir / "spare-7.img"));
    BOOST_TEST(none.ready() == 0u);
    const fs::path image = dir.path() / "x.img", mnt = dir.path() / "x";
    auto taken = none.take(image, mnt);
    BOOST_TEST_REQUIRE(taken.ok(), (taken.ok() ? "" : taken.error().message));
    guard.disks.emplace_back(image, mnt);
    BOOST_TEST(is_mount_point(mnt));
  }
  const bool freed = loops_released(stock_dir);
  BOOST_TEST(freed);
}
