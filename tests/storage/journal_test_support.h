#pragma once
// Helpers shared by the journal tests (tests/storage/*_test.cpp): a temp dir, opening a journal,
// building small events and reading the journal-stamped fields back out of stored bytes.
// Include after <boost/test/unit_test.hpp>: the helpers fail the calling test with BOOST_REQUIRE.
//
// Threading: free functions are thread-safe; temp_dir is owned by one thread.

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace ferry {
/// So BOOST_TEST can print an error code it compares.
inline std::ostream& operator<<(std::ostream& os, errc c);
}  // namespace ferry

namespace ferry::storage::testing {

namespace fs = std::filesystem;
namespace ev = ferry::events::v1;
namespace sc = ferry::schemas;

inline const char* errc_name(errc c) {
  switch (c) {
    case errc::failed: return "failed";
    case errc::conflict: return "conflict";
    case errc::invalid_argument: return "invalid_argument";
    case errc::corrupt: return "corrupt";
    case errc::not_found: return "not_found";
    case errc::busy: return "busy";
    case errc::closed: return "closed";
  }
  return "?";
}

/// "ok" or "<errc>: <message>", for failure messages.
template <class T>
std::string describe(const result<T>& r) {
  if (r.ok())
    return "ok";
  return std::string(errc_name(r.error().code)) + ": " + r.error().message;
}

/// A fresh directory under $TMPDIR, removed at scope exit unless FERRY_TEST_KEEP_TMP=1.
class temp_dir {
 public:
  temp_dir() {
    std::string tmpl = (fs::temp_directory_path() / "ferry-journal-XXXXXX").string();
    BOOST_REQUIRE_MESSAGE(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp failed");
    path_ = tmpl;
  }
  ~temp_dir() {
    const char* keep = std::getenv("FERRY_TEST_KEEP_TMP");
    if (keep != nullptr && std::string_view(keep) == "1") {
      BOOST_TEST_MESSAGE("keeping " << path_);
      return;
    }
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  const fs::path& path() const { return path_; }
  /// Where tests keep the journal itself.
  fs::path journal() const { return path_ / "journal"; }

 private:
  fs::path path_;
};

inline std::unique_ptr<event_store> open_store(const fs::path& dir,
                                               durability d = durability::fsync) {
  journal_options o;
  o.dir = dir;
  o.durability = d;
  auto s = open_journal(o);
  BOOST_REQUIRE_MESSAGE(s.ok(), "open_journal " << dir << ": " << describe(s));
  return std::move(*s);
}

/// A TaskStateChanged event (queued → running) with `reason`; `event_id` empty → random.
inline std::string event(std::string_view stream, std::string_view reason,
                         std::string event_id = {}) {
  sc::envelope_meta m;
  m.stream_id = std::string(stream);
  m.user = "test";
  m.event_id = std::move(event_id);
  return sc::task_state_changed(m, ev::TaskStatus::queued, ev::TaskStatus::running, reason);
}

/// The verified envelope inside `bytes` (which must outlive it).
inline const ev::Envelope* envelope(std::string_view bytes) {
  auto e = sc::verify_envelope(bytes);
  BOOST_REQUIRE_MESSAGE(e.ok(), "stored bytes fail the verifier: " << describe(e));
  return *e;
}

inline uint64_t seq_of(std::string_view bytes) { return envelope(bytes)->sequence(); }
inline uint64_t pos_of(std::string_view bytes) { return envelope(bytes)->position(); }
inline std::string id_of(std::string_view bytes) { return envelope(bytes)->event_id()->str(); }

/// The reason string of a TaskStateChanged event.
inline std::string reason_of(std::string_view bytes) {
  auto* x = envelope(bytes)->event_as_TaskStateChanged();
  BOOST_REQUIRE_MESSAGE(x != nullptr, "not a TaskStateChanged event");
  return x->reason() ? x->reason()->str() : std::string();
}

inline std::vector<uint64_t> sequences(const std::vector<std::string>& events) {
  std::vector<uint64_t> out;
  for (auto& e : events)
    out.push_back(seq_of(e));
  return out;
}

/// 1, 2, …: the sequences first..last.
inline std::vector<uint64_t> iota(uint64_t first, uint64_t last) {
  std::vector<uint64_t> out;
  for (uint64_t s = first; s <= last; ++s)
    out.push_back(s);
  return out;
}

/// All events of `stream`; fails the test on an error.
inline std::vector<std::string> read_all_of(event_store& j, std::string_view stream) {
  auto r = j.read_stream(stream, read_range{});
  BOOST_REQUIRE_MESSAGE(r.ok(), "read_stream " << stream << ": " << describe(r));
  return std::move(*r);
}

}  // namespace ferry::storage::testing

inline std::ostream& ferry::operator<<(std::ostream& os, errc c) {
  return os << storage::testing::errc_name(c);
}
