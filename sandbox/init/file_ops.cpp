#include "file_ops.h"

#include <dirent.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <poll.h>
#include <regex.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <vector>

#include <flatbuffers/flatbuffers.h>

#include "ferry/schemas/frame.h"
#include "spawn.h"
#include "util.h"

extern char** environ;

namespace ferry_init {
namespace {

namespace v1 = ferry::init::v1;
using code = v1::FileErrorCode;

constexpr size_t binary_probe_bytes = 8192;  // a NUL byte in these: binary
constexpr size_t max_line_text = 2000;       // of a grep line
constexpr uint64_t ripgrep_output_cap = 8u << 20;

/// A failed operation: the FileError to send.
struct op_error {
  code c;
  std::string message;
};

/// What an errno means for the agent, naming `path`.
op_error from_errno(int err, const std::string& path, const std::string& doing = "") {
  const std::string what = path + (doing.empty() ? "" : " (" + doing + ")");
  switch (err) {
    case ENOENT:
      return {code::NotFound, what + ": no such file or directory"};
    case EISDIR:
      return {code::IsDirectory, what + ": is a directory"};
    case ENOTDIR:
      return {code::NotDirectory, what + ": a component of the path is not a directory"};
    case EACCES:
    case EPERM:
      return {code::PermissionDenied, what + ": permission denied"};
    case EROFS:
      return {code::PermissionDenied, what + ": read-only file system"};
    case ENAMETOOLONG:
      return {code::BadRequest, what + ": file name too long"};
    case EFBIG:
    case ENOSPC:
    case EDQUOT:
      return {code::TooLarge, what + ": " + errno_text(err)};
    default:
      return {code::Failed, what + ": " + errno_text(err)};
  }
}

/// An fd closed when it goes out of scope.
struct scoped_fd {
  int fd = -1;
  explicit scoped_fd(int f) : fd(f) {}
  scoped_fd(const scoped_fd&) = delete;
  ~scoped_fd() { close_fd(fd); }
};

template <class T>
struct outcome {
  std::optional<T> value;
  std::optional<op_error> error;
  outcome(T v) : value(std::move(v)) {}
  outcome(op_error e) : error(std::move(e)) {}
};

std::string str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

/// The absolute path for a request's `path` (relative to the workspace; empty: the workspace).
outcome<std::string> resolve(const flatbuffers::String* given, const std::string& workspace) {
  const std::string p = str(given);
  if (p.find('\0') != std::string::npos)
    return op_error{code::BadRequest, "the path contains a NUL byte"};
  if (p.empty())
    return workspace;
  if (p.front() == '/')
    return p;
  return workspace + "/" + p;
}

bool looks_binary(const char* data, size_t n) { return std::memchr(data, 0, std::min(n, binary_probe_bytes)) != nullptr; }

/// Opens a regular file for reading without blocking on a FIFO or a device.
outcome<int> open_regular(const std::string& path, struct stat& st) {
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0)
    return from_errno(errno, path);
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return from_errno(err, path);
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    return op_error{code::IsDirectory, path + ": is a directory"};
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return op_error{code::BadRequest, path + ": not a regular file"};
  }
  return fd;
}

/// Reads all of a regular file of at most `cap` bytes.
outcome<std::string> slurp(const std::string& path, uint64_t cap, struct stat& st) {
  auto fd = open_regular(path, st);
  if (fd.error)
    return *fd.error;
  scoped_fd guard(*fd.value);
  if (static_cast<uint64_t>(st.st_size) > cap)
    return op_error{code::TooLarge, path + ": " + std::to_string(st.st_size) + " bytes, more than the limit of " +
                                        std::to_string(cap)};
  std::string data;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(guard.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return from_errno(errno, path, "reading");
    if (n == 0)
      break;
    if (data.size() + static_cast<size_t>(n) > cap)
      return op_error{code::TooLarge, path + ": more than the limit of " + std::to_string(cap) + " bytes"};
    data.append(buf, static_cast<size_t>(n));
  }
  return data;
}

/// mkdir -p of `dir` (0755).
std::optional<op_error> make_parents(const std::string& dir) {
  for (size_t i = 1; i <= dir.size(); ++i) {
    if (i != dir.size() && dir[i] != '/')
      continue;
    const std::string part = dir.substr(0, i);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST)
      return from_errno(errno, part, "creating the directory");
    struct stat st {};
    if (::stat(part.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
      return op_error{code::NotDirectory, part + ": exists and is not a directory"};
  }
  return std::nullopt;
}

struct write_outcome {
  bool created = false;
};

/// Replaces `path` with `content` atomically: a temporary file next to it, then rename. An
/// existing file keeps its mode, a symlink is written through; a new file gets `new_mode`.
outcome<write_outcome> replace_file(std::string path, std::string_view content, mode_t new_mode, bool make_dirs) {
  struct stat st {};
  bool existed = false;
  mode_t mode = new_mode;
  if (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {
    // Write the file the link points to, not over the link.
    char resolved[PATH_MAX];
    if (::realpath(path.c_str(), resolved))
      path = resolved;
  }
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode))
      return op_error{code::IsDirectory, path + ": is a directory"};
    if (!S_ISREG(st.st_mode))
      return op_error{code::BadRequest, path + ": not a regular file"};
    existed = true;
    mode = st.st_mode & 07777;
  } else if (errno != ENOENT) {
    return from_errno(errno, path);
  }
  const size_t slash = path.rfind('/');
  const std::string dir = slash == 0 ? "/" : path.substr(0, slash);
  const std::string name = path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..")
    return op_error{code::BadRequest, path + ": not a file name"};
  if (!existed && make_dirs) {
    if (auto e = make_parents(dir))
      return *e;
  }
  const std::string tmp = dir + "/." + name.substr(0, 200) + ".ferry-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return from_errno(errno, path, "creating a temporary file next to it");
  bool ok = write_all(fd, content.data(), content.size());
  int err = errno;
  if (ok && ::fchmod(fd, mode) != 0) {
    ok = false;
    err = errno;
  }
  if (::close(fd) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && ::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    return from_errno(err, path, "writing");
  }
  return write_outcome{!existed};
}

// --- the operations ----------------------------------------------------------------------------

using builder = flatbuffers::FlatBufferBuilder;

template <class T>
std::string reply_frame(builder& fbb, uint32_t id, v1::FileReply type, flatbuffers::Offset<T> body) {
  auto r = v1::CreateFileResponse(fbb, id, type, body.Union());
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::FileResponse, r);
  return out;
}

using frame_or_error = outcome<std::string>;

frame_or_error read_file(uint32_t id, const v1::ReadFile& r, const file_op_config& cfg) {
  auto path = resolve(r.path(), cfg.workspace);
  if (path.error)
    return *path.error;
  if (r.max_bytes() == 0 || r.max_bytes() > max_read_bytes)
    return op_error{code::BadRequest, "max_bytes must be 1.." + std::to_string(max_read_bytes)};
  const uint64_t cap = r.max_bytes();
  const uint64_t first = std::max<uint64_t>(r.offset(), 1);
  const uint64_t limit = r.limit();
  struct stat st {};
  auto fd = open_regular(*path.value, st);
  if (fd.error)
    return *fd.error;
  scoped_fd guard(*fd.value);

  std::string content, line;
  uint64_t line_no = 1, returned = 0, next_line = 0;
  bool truncated = false, more = false, probed = false, done = false;
  char buf[65536];
  auto emit = [&](const std::string& text, bool newline) {
    // "<number>\t<line>\n"; the cap counts what is returned.
    char number[32];
    const int w = std::snprintf(number, sizeof number, "%6llu\t", static_cast<unsigned long long>(line_no));
    const size_t need = static_cast<size_t>(w) + text.size() + (newline ? 1 : 0);
    if (content.size() + need > cap) {
      truncated = true;
      if (returned > 0) {
        next_line = line_no;
        more = true;
        return false;
      }
      // A first line longer than the cap: cut it.
      content.append(number, static_cast<size_t>(w));
      content.append(text, 0, cap > content.size() ? static_cast<size_t>(cap - content.size()) : 0);
      ++returned;
      next_line = line_no + 1;  // the rest of this line is skipped
      more = true;
      return false;
    }
    content.append(number, static_cast<size_t>(w));
    content += text;
    if (newline)
      content += '\n';
    ++returned;
    return true;
  };
  for (;;) {
    ssize_t n = ::read(guard.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return from_errno(errno, *path.value, "reading");
    if (!probed) {
      probed = true;
      if (looks_binary(buf, static_cast<size_t>(std::max<ssize_t>(n, 0))))
        return op_error{code::Binary, *path.value + ": a binary file (" + std::to_string(st.st_size) +
                                          " bytes); it is not shown as text"};
    }
    if (n == 0)
      break;
    for (ssize_t i = 0; i < n && !done; ++i) {
      const char c = buf[i];
      if (line_no < first) {
        if (c == '\n')
          ++line_no;
        continue;
      }
      if (limit > 0 && returned >= limit) {
        more = true;  // a byte of a line past the last one returned
        next_line = line_no;
        done = true;
        break;
      }
      if (c != '\n') {
        line += c;
        if (line.size() > cap) {  // cannot fit anyway: stop collecting this line
          if (!emit(line, false))
            done = true;
          line.clear();
        }
        continue;
      }
      if (!emit(line, true))
        done = true;
      line.clear();
      ++line_no;
    }
    if (done)
      break;
  }
  if (!done && !line.empty() && line_no >= first) {
    if (limit > 0 && returned >= limit) {
      more = true;
      next_line = line_no;
    } else {
      emit(line, false);
    }
  }
  builder fbb(content.size() + 1024);
  auto p = fbb.CreateString(*path.value);
  auto c = fbb.CreateString(content);
  auto res = v1::CreateReadResult(fbb, p, c, returned > 0 ? first : 0, returned, truncated, more,
                                  more ? next_line : 0, static_cast<uint64_t>(st.st_size));
  return reply_frame(fbb, id, v1::FileReply::ReadResult, res);
}

frame_or_error write_file(uint32_t id, const v1::WriteFile& w, const file_op_config& cfg) {
  auto path = resolve(w.path(), cfg.workspace);
  if (path.error)
    return *path.error;
  const size_t n = w.content() ? w.content()->size() : 0;
  if (n > max_write_bytes)
    return op_error{code::TooLarge, *path.value + ": " + std::to_string(n) + " bytes, more than the limit of " +
                                        std::to_string(max_write_bytes)};
  if (w.mode() > 07777)
    return op_error{code::BadRequest, "mode " + std::to_string(w.mode()) + " is not a permission mode"};
  const std::string_view content(w.content() ? reinterpret_cast<const char*>(w.content()->data()) : "", n);
  auto done = replace_file(*path.value, content, w.mode() ? static_cast<mode_t>(w.mode()) : 0644, true);
  if (done.error)
    return *done.error;
  builder fbb;
  auto res = v1::CreateWriteResult(fbb, fbb.CreateString(*path.value), n, done.value->created);
  return reply_frame(fbb, id, v1::FileReply::WriteResult, res);
}

frame_or_error edit_file(uint32_t id, const v1::EditFile& e, const file_op_config& cfg) {
  auto path = resolve(e.path(), cfg.workspace);
  if (path.error)
    return *path.error;
  const std::string old_s = str(e.old_string()), new_s = str(e.new_string());
  if (old_s.empty())
    return op_error{code::BadRequest, "old_string is empty"};
  if (old_s == new_s)
    return op_error{code::BadRequest, "old_string and new_string are the same"};
  struct stat st {};
  auto data = slurp(*path.value, max_edit_bytes, st);
  if (data.error)
    return *data.error;
  std::string& text = *data.value;
  if (looks_binary(text.data(), text.size()))
    return op_error{code::Binary, *path.value + ": a binary file; it is not edited as text"};
  std::vector<size_t> at;
  for (size_t pos = text.find(old_s); pos != std::string::npos; pos = text.find(old_s, pos + old_s.size()))
    at.push_back(pos);
  if (at.empty())
    return op_error{code::NoMatch, *path.value + ": old_string does not occur in the file"};
  if (at.size() > 1 && !e.replace_all())
    return op_error{code::NotUnique, *path.value + ": old_string occurs " + std::to_string(at.size()) +
                                         " times; give more context to make it unique, or replace_all"};
  std::string out;
  out.reserve(text.size() + at.size() * new_s.size());
  size_t from = 0;
  for (size_t pos : at) {
    out.append(text, from, pos - from);
    out += new_s;
    from = pos + old_s.size();
  }
  out.append(text, from, std::string::npos);
  if (out.size() > max_edit_bytes)
    return op_error{code::TooLarge, *path.value + ": the edited file would exceed " + std::to_string(max_edit_bytes) +
                                        " bytes"};
  auto done = replace_file(*path.value, out, 0644, false);
  if (done.error)
    return *done.error;
  builder fbb;
  auto res = v1::CreateEditResult(fbb, fbb.CreateString(*path.value), at.size(), out.size());
  return reply_frame(fbb, id, v1::FileReply::EditResult, res);
}

v1::FileType type_of(mode_t m) {
  if (S_ISREG(m))
    return v1::FileType::File;
  if (S_ISDIR(m))
    return v1::FileType::Directory;
  if (S_ISLNK(m))
    return v1::FileType::Symlink;
  return v1::FileType::Other;
}

/// The names in directory `path` (without . and ..), sorted, at most `scan` of them; `total`
/// counts what was read (scan + 1 when there were more).
outcome<std::vector<std::string>> names_in(const std::string& path, uint64_t scan, uint64_t& total) {
  DIR* d = ::opendir(path.c_str());
  if (!d)
    return from_errno(errno, path);
  std::vector<std::string> names;
  total = 0;
  errno = 0;
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0)
      continue;
    if (++total > scan)
      break;
    names.emplace_back(e->d_name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

frame_or_error list_dir(uint32_t id, const v1::ListDir& l, const file_op_config& cfg) {
  auto path = resolve(l.path(), cfg.workspace);
  if (path.error)
    return *path.error;
  if (l.max_entries() == 0 || l.max_entries() > max_list_entries)
    return op_error{code::BadRequest, "max_entries must be 1.." + std::to_string(max_list_entries)};
  struct stat st {};
  if (::stat(path.value->c_str(), &st) != 0)
    return from_errno(errno, *path.value);
  if (!S_ISDIR(st.st_mode))
    return op_error{code::NotDirectory, *path.value + ": not a directory"};
  uint64_t total = 0;
  auto names = names_in(*path.value, max_list_scanned, total);
  if (names.error)
    return *names.error;
  builder fbb;
  std::vector<flatbuffers::Offset<v1::DirEntry>> entries;
  for (const auto& name : *names.value) {
    if (entries.size() >= l.max_entries())
      break;
    struct stat es {};
    const bool ok = ::lstat((*path.value + "/" + name).c_str(), &es) == 0;
    entries.push_back(v1::CreateDirEntry(fbb, fbb.CreateString(name), ok ? type_of(es.st_mode) : v1::FileType::Other,
                                         ok ? static_cast<uint64_t>(es.st_size) : 0));
  }
  const bool truncated = total > entries.size();
  auto res = v1::CreateListResult(fbb, fbb.CreateString(*path.value), fbb.CreateVector(entries),
                                  std::min<uint64_t>(total, max_list_scanned), truncated);
  return reply_frame(fbb, id, v1::FileReply::ListResult, res);
}

// --- glob ----------------------------------------------------------------------------------------

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

struct glob_walk {
  std::vector<std::string> segments;
  bool include_git = false;
  uint64_t budget = max_glob_visited;
  uint64_t deadline = 0;
  uint32_t max_results = 0;
  std::set<std::string> found;
  bool truncated = false;

  bool stop() {
    if (found.size() > max_results || budget == 0 || now_ms() > deadline) {
      truncated = true;
      return true;
    }
    return false;
  }

  /// Matches segments[i..] below `dir` (absolute), whose path relative to the base is `rel`.
  void walk(const std::string& dir, const std::string& rel, size_t i) {
    if (stop())
      return;
    const std::string& seg = segments[i];
    const bool last = i + 1 == segments.size();
    auto join = [](const std::string& a, const std::string& b) { return a.empty() ? b : a + "/" + b; };
    if (seg == "**") {
      if (last) {
        // A trailing `**` matches everything below (files and directories).
        each_entry(dir, [&](const std::string& name, bool is_dir) {
          found.insert(join(rel, name));
          if (is_dir)
            walk(dir + "/" + name, join(rel, name), i);
        });
        return;
      }
      walk(dir, rel, i + 1);  // no directory
      each_entry(dir, [&](const std::string& name, bool is_dir) {
        if (is_dir)
          walk(dir + "/" + name, join(rel, name), i);
      });
      return;
    }
    if (!has_glob_chars(seg)) {
      // A plain name: no need to read the directory.
      --budget;
      struct stat st {};
      const std::string p = dir + "/" + seg;
      if (::lstat(p.c_str(), &st) != 0 || (seg == ".git" && !include_git))
        return;
      if (last)
        found.insert(join(rel, seg));
      else if (S_ISDIR(st.st_mode))
        walk(p, join(rel, seg), i + 1);
      return;
    }
    each_entry(dir, [&](const std::string& name, bool is_dir) {
      if (::fnmatch(seg.c_str(), name.c_str(), 0) != 0)
        return;
      if (last)
        found.insert(join(rel, name));
      else if (is_dir)
        walk(dir + "/" + name, join(rel, name), i + 1);
    });
  }

  /// Calls f(name, is_dir) for each entry of `dir` in name order; `.git` skipped unless asked
  /// for; a symlink to a directory is not a directory here (no loops).
  template <class F>
  void each_entry(const std::string& dir, F&& f) {
    uint64_t total = 0;
    auto names = names_in(dir, budget, total);
    if (!names.value)
      return;
    budget -= std::min<uint64_t>(budget, total);
    for (const auto& name : *names.value) {
      if (stop())
        return;
      if (name == ".git" && !include_git)
        continue;
      struct stat st {};
      const bool is_dir = ::lstat((dir + "/" + name).c_str(), &st) == 0 && S_ISDIR(st.st_mode);
      f(name, is_dir);
    }
  }
};

frame_or_error glob_files(uint32_t id, const v1::GlobFiles& g, const file_op_config& cfg) {
  std::string pattern = str(g.pattern());
  if (pattern.empty())
    return op_error{code::BadRequest, "the pattern is empty"};
  if (pattern.find('\0') != std::string::npos)
    return op_error{code::BadRequest, "the pattern contains a NUL byte"};
  if (g.max_results() == 0 || g.max_results() > max_glob_results)
    return op_error{code::BadRequest, "max_results must be 1.." + std::to_string(max_glob_results)};
  std::string base;
  if (pattern.front() == '/') {
    base = "/";
  } else {
    auto path = resolve(g.path(), cfg.workspace);
    if (path.error)
      return *path.error;
    base = *path.value;
    struct stat st {};
    if (::stat(base.c_str(), &st) != 0)
      return from_errno(errno, base);
    if (!S_ISDIR(st.st_mode))
      return op_error{code::NotDirectory, base + ": not a directory"};
  }
  glob_walk w;
  size_t start = 0;
  while (start <= pattern.size()) {
    size_t slash = pattern.find('/', start);
    std::string seg = pattern.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (!seg.empty() && seg != "." && !(seg == "**" && !w.segments.empty() && w.segments.back() == "**"))
      w.segments.push_back(seg);
    if (slash == std::string::npos)
      break;
    start = slash + 1;
  }
  if (w.segments.empty())
    return op_error{code::BadRequest, "the pattern `" + pattern + "` names no file"};
  w.include_git = g.include_git();
  w.max_results = g.max_results();
  w.deadline = now_ms() + search_time_ms;
  w.walk(base == "/" ? "" : base, "", 0);

  builder fbb;
  std::vector<flatbuffers::Offset<flatbuffers::String>> matches;
  uint64_t bytes = 0;
  bool truncated = w.truncated;
  for (const auto& m : w.found) {
    if (matches.size() >= g.max_results() || bytes + m.size() > max_answer_bytes) {
      truncated = true;
      break;
    }
    bytes += m.size() + 8;
    matches.push_back(fbb.CreateString(m));
  }
  auto res = v1::CreateGlobResult(fbb, fbb.CreateString(base), fbb.CreateVector(matches), truncated);
  return reply_frame(fbb, id, v1::FileReply::GlobResult, res);
}

// --- grep ----------------------------------------------------------------------------------------

struct grep_hit {
  std::string path;
  uint64_t line = 0;
  std::string text;
  bool match = false;
};

struct grep_collect {
  std::vector<grep_hit> lines;
  uint32_t matches = 0;
  uint32_t files = 0;
  uint64_t bytes = 0;
  uint32_t max_matches = 0;
  bool truncated = false;
  std::string last_file;

  /// Adds a line; false once nothing more may be added.
  bool add(grep_hit h) {
    if (h.match && matches >= max_matches) {
      truncated = true;
      return false;
    }
    if (h.text.size() > max_line_text)
      h.text.resize(max_line_text);
    const uint64_t cost = h.path.size() + h.text.size() + 32;
    if (bytes + cost > max_answer_bytes) {
      truncated = true;
      return false;
    }
    bytes += cost;
    if (h.match) {
      ++matches;
      if (h.path != last_file) {
        ++files;
        last_file = h.path;
      }
    }
    lines.push_back(std::move(h));
    return true;
  }
};

/// Relative path for display: without a leading "./".
std::string display_path(std::string p) {
  if (p.rfind("./", 0) == 0)
    p.erase(0, 2);
  return p;
}

/// grep with ripgrep: `rg` run in `dir` on `target`, output parsed line by line (--null puts a
/// NUL after each path, so any file name parses). Returns nullopt with `error` set if rg failed
/// without output (a bad pattern: BadRequest).
std::optional<op_error> grep_ripgrep(const std::string& rg, const std::string& dir, const std::string& target,
                                     const v1::GrepFiles& g, grep_collect& out, bool& timed_out) {
  std::vector<std::string> argv{rg, "--no-config", "--null", "--line-number", "--with-filename", "--no-heading",
                                "--color", "never", "--hidden", "--glob", "!.git", "--sort", "path",
                                "--max-columns", std::to_string(max_line_text * 2)};
  if (g.ignore_case())
    argv.push_back("--ignore-case");
  if (g.context() > 0)
    argv.insert(argv.end(), {"--context", std::to_string(g.context())});
  const std::string glob = str(g.glob());
  if (!glob.empty())
    argv.insert(argv.end(), {"--glob", glob});
  argv.insert(argv.end(), {"--regexp", str(g.pattern()), "--", target});
  spawn_request req;
  req.argv = argv;
  for (char** e = environ; e && *e; ++e)
    req.env.emplace_back(*e);
  req.cwd = dir;
  spawned s;
  spawn_failure why;
  if (!spawn_command(req, s, why))
    return op_error{code::Failed, "cannot run ripgrep: " + why.message};
  scoped_fd out_fd(s.out_fd), err_fd(s.err_fd);
  std::string pending, errors;
  uint64_t total = 0;
  const uint64_t deadline = now_ms() + search_time_ms;
  bool stopped = false;
  auto take_line = [&](const std::string& l) {
    // "path\0NUMBER:text" (a match) or "path\0NUMBER-text" (context); "--" between groups.
    const size_t nul = l.find('\0');
    if (nul == std::string::npos)
      return true;
    size_t i = nul + 1;
    uint64_t number = 0;
    while (i < l.size() && l[i] >= '0' && l[i] <= '9')
      number = number * 10 + static_cast<uint64_t>(l[i++] - '0');
    if (i >= l.size() || (l[i] != ':' && l[i] != '-'))
      return true;
    return out.add({display_path(l.substr(0, nul)), number, l.substr(i + 1), l[i] == ':'});
  };
  while (out_fd.fd >= 0 || err_fd.fd >= 0) {
    const uint64_t now = now_ms();
    if (now >= deadline) {
      timed_out = true;
      break;
    }
    pollfd p[2] = {{out_fd.fd, POLLIN, 0}, {err_fd.fd, POLLIN, 0}};
    if (::poll(p, 2, static_cast<int>(deadline - now)) < 0 && errno != EINTR)
      break;
    char buf[65536];
    if (p[1].revents) {
      ssize_t n = ::read(err_fd.fd, buf, sizeof buf);
      if (n <= 0)
        close_fd(err_fd.fd);
      else if (errors.size() < 4096)
        errors.append(buf, static_cast<size_t>(n));
    }
    if (p[0].revents) {
      ssize_t n = ::read(out_fd.fd, buf, sizeof buf);
      if (n <= 0) {
        close_fd(out_fd.fd);
        continue;
      }
      total += static_cast<uint64_t>(n);
      pending.append(buf, static_cast<size_t>(n));
      size_t start = 0;
      for (size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
        if (!take_line(pending.substr(start, nl - start))) {
          stopped = true;
          break;
        }
      }
      pending.erase(0, start);
      if (stopped || total > ripgrep_output_cap) {
        out.truncated = true;
        break;
      }
    }
  }
  ::kill(-s.pid, SIGKILL);
  int st = 0;
  while (::waitpid(s.pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (timed_out || stopped || out.truncated)
    return std::nullopt;
  // rg: 0 found, 1 nothing found, 2 an error (with or without matches).
  if (WIFEXITED(st) && WEXITSTATUS(st) == 2 && out.lines.empty()) {
    while (!errors.empty() && errors.back() == '\n')
      errors.pop_back();
    const bool bad_pattern = errors.find("regex") != std::string::npos;
    return op_error{bad_pattern ? code::BadRequest : code::Failed, "ripgrep: " + errors.substr(0, 2000)};
  }
  return std::nullopt;
}

/// The fallback: POSIX extended regular expressions, line by line, over the tree in name order.
struct posix_grep {
  regex_t re{};
  std::string glob;
  uint32_t context = 0;
  uint64_t deadline = 0;
  grep_collect* out = nullptr;
  bool done = false;
  bool timed_out = false;

  bool wanted(const std::string& rel, const std::string& name) const {
    if (glob.empty())
      return true;
    if (glob.find('/') != std::string::npos)
      return ::fnmatch(glob.c_str(), rel.c_str(), FNM_PATHNAME) == 0;
    return ::fnmatch(glob.c_str(), name.c_str(), 0) == 0;
  }

  void file(const std::string& path, const std::string& rel) {
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
      return;
    scoped_fd guard(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
      return;
    std::vector<std::string> before;  // the last `context` lines before the current one
    uint64_t line_no = 0, after_left = 0, last_emitted = 0;
    std::string line;
    bool probed = false;
    char buf[65536];
    auto on_line = [&](std::string& l) {
      ++line_no;
      if ((line_no & 1023) == 0 && now_ms() > deadline) {
        timed_out = done = true;
        return;
      }
      const bool hit = ::regexec(&re, l.c_str(), 0, nullptr, 0) == 0;
      if (hit) {
        const uint64_t first_before = line_no - before.size();
        for (size_t k = 0; k < before.size(); ++k) {
          if (first_before + k > last_emitted && !out->add({rel, first_before + k, before[k], false})) {
            done = true;
            return;
          }
        }
        before.clear();
        if (!out->add({rel, line_no, l, true})) {
          done = true;
          return;
        }
        last_emitted = line_no;
        after_left = context;
        return;
      }
      if (after_left > 0) {
        --after_left;
        if (!out->add({rel, line_no, l, false})) {
          done = true;
          return;
        }
        last_emitted = line_no;
        return;
      }
      if (context > 0) {
        if (l.size() > max_line_text)
          l.resize(max_line_text);
        before.push_back(l);
        if (before.size() > context)
          before.erase(before.begin());
      }
    };
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR)
        continue;
      if (n <= 0)
        break;
      if (!probed) {
        probed = true;
        if (looks_binary(buf, static_cast<size_t>(n)))
          return;
      }
      for (ssize_t i = 0; i < n && !done; ++i) {
        if (buf[i] == '\n') {
          on_line(line);
          line.clear();
        } else if (buf[i] == '\0') {
          line += ' ';  // regexec stops at NUL; a NUL past the probe does not hide the rest
        } else if (line.size() < (1u << 20)) {
          line += buf[i];
        }
      }
      if (done)
        return;
    }
    if (!line.empty() && !done)
      on_line(line);
  }

  void walk(const std::string& dir, const std::string& rel) {
    uint64_t total = 0;
    auto names = names_in(dir, max_list_scanned, total);
    if (!names.value)
      return;
    for (const auto& name : *names.value) {
      if (done)
        return;
      if (now_ms() > deadline) {
        timed_out = done = true;
        return;
      }
      if (name == ".git")
        continue;
      const std::string path = dir + "/" + name;
      const std::string r = rel.empty() ? name : rel + "/" + name;
      struct stat st {};
      if (::lstat(path.c_str(), &st) != 0)
        continue;
      if (S_ISDIR(st.st_mode))
        walk(path, r);
      else if (S_ISREG(st.st_mode) && wanted(r, name))
        file(path, r);
    }
  }
};

frame_or_error grep_files(uint32_t id, const v1::GrepFiles& g, const file_op_config& cfg) {
  const std::string pattern = str(g.pattern());
  if (pattern.empty())
    return op_error{code::BadRequest, "the pattern is empty"};
  if (pattern.find('\0') != std::string::npos || str(g.glob()).find('\0') != std::string::npos)
    return op_error{code::BadRequest, "the pattern or glob contains a NUL byte"};
  if (g.context() > max_grep_context)
    return op_error{code::BadRequest, "context must be at most " + std::to_string(max_grep_context)};
  if (g.max_matches() == 0 || g.max_matches() > max_grep_matches)
    return op_error{code::BadRequest, "max_matches must be 1.." + std::to_string(max_grep_matches)};
  auto path = resolve(g.path(), cfg.workspace);
  if (path.error)
    return *path.error;
  struct stat st {};
  if (::stat(path.value->c_str(), &st) != 0)
    return from_errno(errno, *path.value);
  // Lines' paths are relative to `base`: the directory searched, or a file's directory.
  std::string base = *path.value, target = ".";
  if (!S_ISDIR(st.st_mode)) {
    const size_t slash = base.rfind('/');
    target = base.substr(slash + 1);
    base = slash == 0 ? "/" : base.substr(0, slash);
  }
  grep_collect out;
  out.max_matches = g.max_matches();
  bool timed_out = false;
  std::string engine;
  if (!cfg.ripgrep.empty() && ::access(cfg.ripgrep.c_str(), X_OK) == 0) {
    engine = "rg";
    if (auto e = grep_ripgrep(cfg.ripgrep, base, target, g, out, timed_out))
      return *e;
  } else {
    engine = "posix";
    posix_grep pg;
    int flags = REG_EXTENDED | REG_NOSUB | (g.ignore_case() ? REG_ICASE : 0);
    if (int rc = ::regcomp(&pg.re, pattern.c_str(), flags); rc != 0) {
      char msg[256];
      ::regerror(rc, &pg.re, msg, sizeof msg);
      return op_error{code::BadRequest, "bad regular expression `" + pattern.substr(0, 200) + "`: " + msg};
    }
    pg.glob = str(g.glob());
    pg.context = g.context();
    pg.deadline = now_ms() + search_time_ms;
    pg.out = &out;
    if (target == ".")
      pg.walk(base, "");
    else
      pg.file(*path.value, target);
    timed_out = pg.timed_out;
    ::regfree(&pg.re);
  }
  builder fbb;
  std::vector<flatbuffers::Offset<v1::GrepLine>> lines;
  for (const auto& l : out.lines)
    lines.push_back(v1::CreateGrepLine(fbb, fbb.CreateString(l.path), l.line, fbb.CreateString(l.text), l.match));
  auto res = v1::CreateGrepResult(fbb, fbb.CreateString(base), fbb.CreateVector(lines), out.matches, out.files,
                                  out.truncated || timed_out, fbb.CreateString(engine));
  return reply_frame(fbb, id, v1::FileReply::GrepResult, res);
}

frame_or_error perform(const v1::FileRequest& req, const file_op_config& cfg) {
  const uint32_t id = req.request_id();
  switch (req.op_type()) {
    case v1::FileOp::ReadFile:
      return read_file(id, *req.op_as_ReadFile(), cfg);
    case v1::FileOp::WriteFile:
      return write_file(id, *req.op_as_WriteFile(), cfg);
    case v1::FileOp::EditFile:
      return edit_file(id, *req.op_as_EditFile(), cfg);
    case v1::FileOp::ListDir:
      return list_dir(id, *req.op_as_ListDir(), cfg);
    case v1::FileOp::GlobFiles:
      return glob_files(id, *req.op_as_GlobFiles(), cfg);
    case v1::FileOp::GrepFiles:
      return grep_files(id, *req.op_as_GrepFiles(), cfg);
    case v1::FileOp::NONE:
      break;
  }
  return op_error{code::BadRequest, "unknown file operation " + std::to_string(static_cast<int>(req.op_type()))};
}

}  // namespace

std::string file_error_frame(uint32_t request_id, v1::FileErrorCode c, const std::string& message) {
  builder fbb;
  auto e = v1::CreateFileError(fbb, request_id, c, fbb.CreateString(message.substr(0, 4096)));
  std::string out;
  ferry::wire::append_message(out, fbb, v1::Message::FileError, e);
  return out;
}

int run_file_op(const file_op_config& config) {
  ::signal(SIGPIPE, SIG_IGN);
  ferry::wire::frame_decoder decoder;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(0, buf, sizeof buf);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    decoder.feed(buf, static_cast<size_t>(n));
    if (decoder.pending() > ferry::wire::max_frame_size + 4)
      break;
  }
  if (decoder.next() != ferry::wire::frame_decoder::status::message ||
      decoder.msg()->message_type() != v1::Message::FileRequest) {
    log_error("--file-op: no FileRequest on stdin");
    return 2;
  }
  const v1::FileRequest& req = *decoder.msg()->message_as_FileRequest();
  auto done = perform(req, config);
  const std::string frame =
      done.value ? *done.value : file_error_frame(req.request_id(), done.error->c, done.error->message);
  return write_all(1, frame.data(), frame.size()) ? 0 : 1;
}

}  // namespace ferry_init
