#define BOOST_TEST_MODULE sandbox_init_file_ops
#include <boost/test/unit_test.hpp>

// ferry-init's file operations for the agent (FileRequest in schemas/init.fbs), frame by frame,
// with ferry-init on the host in socket mode: read (line ranges, numbering, the byte cap, binary
// files), write (parents, atomic, mode kept, symlinks), edit (unique, absent, replace_all), list,
// glob (`**`, .git skipped), grep with ripgrep and with the POSIX fallback (context, glob filter,
// case, caps, a bad expression), and every FileError code the host can provoke; requests in
// flight (DuplicateId, TooMany) and a stuck one (Timeout).

#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "init_test_support.h"

using namespace ferry::sandbox;
using namespace ferry::sandbox::testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

using fbb_t = flatbuffers::FlatBufferBuilder;
using op_builder = std::function<std::pair<v1::FileOp, flatbuffers::Offset<void>>(fbb_t&)>;

std::string request_frame(uint32_t id, const op_builder& build) {
  fbb_t fbb;
  auto [type, off] = build(fbb);
  return frame(fbb, v1::Message::FileRequest, v1::CreateFileRequest(fbb, id, type, off));
}

op_builder read_op(std::string path, uint64_t offset = 0, uint64_t limit = 0, uint64_t max_bytes = 256u << 10) {
  return [=](fbb_t& f) {
    return std::pair{v1::FileOp::ReadFile, v1::CreateReadFile(f, f.CreateString(path), offset, limit, max_bytes).Union()};
  };
}
op_builder write_op(std::string path, std::string content, uint32_t mode = 0) {
  return [=](fbb_t& f) {
    auto c = f.CreateVector(reinterpret_cast<const uint8_t*>(content.data()), content.size());
    return std::pair{v1::FileOp::WriteFile, v1::CreateWriteFile(f, f.CreateString(path), c, mode).Union()};
  };
}
op_builder edit_op(std::string path, std::string old_s, std::string new_s, bool all = false) {
  return [=](fbb_t& f) {
    auto p = f.CreateString(path);
    auto o = f.CreateString(old_s);
    auto n = f.CreateString(new_s);
    return std::pair{v1::FileOp::EditFile, v1::CreateEditFile(f, p, o, n, all).Union()};
  };
}
op_builder list_op(std::string path, uint32_t max = 1000) {
  return [=](fbb_t& f) { return std::pair{v1::FileOp::ListDir, v1::CreateListDir(f, f.CreateString(path), max).Union()}; };
}
op_builder glob_op(std::string pattern, std::string path = "", uint32_t max = 1000, bool git = false) {
  return [=](fbb_t& f) {
    auto pt = f.CreateString(pattern);
    auto p = f.CreateString(path);
    return std::pair{v1::FileOp::GlobFiles, v1::CreateGlobFiles(f, pt, p, max, git).Union()};
  };
}
struct grep_req {
  std::string pattern, path, glob;
  bool icase = false;
  uint32_t context = 0, max = 200;
};
grep_req gr(std::string pattern, std::string path = "", std::string glob = "", bool icase = false, uint32_t context = 0,
            uint32_t max = 200) {
  return grep_req{std::move(pattern), std::move(path), std::move(glob), icase, context, max};
}
op_builder grep_op(grep_req g) {
  return [=](fbb_t& f) {
    auto pt = f.CreateString(g.pattern);
    auto p = f.CreateString(g.path);
    auto gl = f.CreateString(g.glob);
    return std::pair{v1::FileOp::GrepFiles, v1::CreateGrepFiles(f, pt, p, gl, g.icase, g.context, g.max).Union()};
  };
}

/// One answer, decoded: either a FileResponse (msg) or a FileError (code + message).
struct answer {
  frame_decoder d;
  const v1::FileResponse* ok = nullptr;
  std::optional<v1::FileErrorCode> code;
  std::string message;
};

void write(const fs::path& p, const std::string& content) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << content;
}

struct fixture {
  std::unique_ptr<listening_init> init;
  std::unique_ptr<init_connection> host;
  fs::path ws;
  uint32_t next_id = 1;

  explicit fixture(std::vector<std::string> flags = {"--ripgrep", "/nonexistent/rg"}) {
    init = std::make_unique<listening_init>(std::vector<std::string>{}, flags);
    host = init->attach();
    ws = init->workspace;
  }

  /// Sends one request and waits for its answer.
  std::unique_ptr<answer> ask(const op_builder& op) {
    const uint32_t id = next_id++;
    host->send(request_frame(id, op));
    BOOST_REQUIRE_MESSAGE(host->until([&] { return host->file_answers.count(id) > 0; }, 40s), "no answer to request " << id);
    return decode(id);
  }
  std::unique_ptr<answer> decode(uint32_t id) {
    auto a = std::make_unique<answer>();
    const std::string& f = host->file_answers[id];
    a->d.feed(f.data(), f.size());
    BOOST_REQUIRE((a->d.next() == frame_decoder::status::message));
    if (a->d.msg()->message_type() == v1::Message::FileResponse) {
      a->ok = a->d.msg()->message_as_FileResponse();
      BOOST_TEST(a->ok->request_id() == id);
    } else {
      BOOST_REQUIRE((a->d.msg()->message_type() == v1::Message::FileError));
      const auto* e = a->d.msg()->message_as_FileError();
      BOOST_TEST(e->request_id() == id);
      a->code = e->code();
      a->message = str_of(e->message());
    }
    return a;
  }
  /// Asks and requires a FileError with `code` whose message contains `needle`.
  void refused(const op_builder& op, v1::FileErrorCode code, const std::string& needle) {
    auto a = ask(op);
    BOOST_REQUIRE_MESSAGE(a->code.has_value(), "expected " << v1::EnumNameFileErrorCode(code) << " (" << needle << ")");
    BOOST_TEST((*a->code == code), v1::EnumNameFileErrorCode(*a->code) << ": " << a->message);
    BOOST_TEST(a->message.find(needle) != std::string::npos, a->message);
  }
  const v1::ReadResult* read(const op_builder& op, std::unique_ptr<answer>& keep) {
    keep = ask(op);
    BOOST_REQUIRE_MESSAGE(keep->ok, keep->message);
    BOOST_REQUIRE((keep->ok->reply_type() == v1::FileReply::ReadResult));
    return keep->ok->reply_as_ReadResult();
  }
};

std::vector<std::string> strings(const flatbuffers::Vector<flatbuffers::Offset<flatbuffers::String>>* v) {
  std::vector<std::string> out;
  if (v)
    for (const auto* s : *v)
      out.push_back(s->str());
  return out;
}

/// "path:line:text" (match) or "path-line-text" (context) per line, like grep prints them.
std::vector<std::string> grep_lines(const v1::GrepResult* g) {
  std::vector<std::string> out;
  for (const auto* l : *g->lines())
    out.push_back(l->path()->str() + (l->match() ? ":" : "-") + std::to_string(l->line()) + (l->match() ? ":" : "-") +
                  l->text()->str());
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(read_returns_numbered_line_ranges_within_a_byte_cap) {
  fixture f;
  write(f.ws / "a.txt", "one\ntwo\nthree\nfour\nfive");
  std::unique_ptr<answer> keep;
  auto* r = f.read(read_op("a.txt"), keep);
  BOOST_TEST(r->path()->str() == (f.ws / "a.txt").string());
  BOOST_TEST(r->content()->str() == "     1\tone\n     2\ttwo\n     3\tthree\n     4\tfour\n     5\tfive");
  BOOST_TEST(r->first_line() == 1u);
  BOOST_TEST(r->lines() == 5u);
  BOOST_TEST(!r->more());
  BOOST_TEST(!r->truncated());
  BOOST_TEST(r->size() == 23u);
  r = f.read(read_op("a.txt", 2, 2), keep);
  BOOST_TEST(r->content()->str() == "     2\ttwo\n     3\tthree\n");
  BOOST_TEST(r->more());
  BOOST_TEST(r->next_line() == 4u);
  BOOST_TEST(!r->truncated());
  r = f.read(read_op((f.ws / "a.txt").string(), 9), keep);  // absolute; past the end
  BOOST_TEST(r->content()->str().empty());
  BOOST_TEST(r->first_line() == 0u);
  // The byte cap: whole lines while they fit, then the marker (truncated, next_line).
  std::string big;
  for (int i = 1; i <= 1000; ++i)
    big += "line " + std::to_string(i) + "\n";
  write(f.ws / "big.txt", big);
  r = f.read(read_op("big.txt", 0, 0, 100), keep);
  BOOST_TEST(r->content()->size() <= 100u);
  BOOST_TEST(r->truncated());
  BOOST_TEST(r->more());
  BOOST_TEST(r->lines() == 7u);  // "     n\tline n\n" is 14 bytes: 98 of 100
  BOOST_TEST(r->next_line() == 8u);
  r = f.read(read_op("big.txt", 8, 2, 100), keep);
  BOOST_TEST(r->content()->str() == "     8\tline 8\n     9\tline 9\n");
  // A first line longer than the cap is cut.
  write(f.ws / "long.txt", std::string(5000, 'x') + "\nsecond\n");
  r = f.read(read_op("long.txt", 0, 0, 1000), keep);
  BOOST_TEST(r->content()->size() == 1000u);
  BOOST_TEST(r->truncated());
  BOOST_TEST(r->lines() == 1u);
  BOOST_TEST(r->next_line() == 2u);
  // Defaults: a 2 MB file comes back as 256 KiB at most, marked.
  write(f.ws / "huge.txt", std::string(2u << 20, 'y'));
  r = f.read(read_op("huge.txt"), keep);
  BOOST_TEST(r->content()->size() == 256u << 10);
  BOOST_TEST(r->truncated());
  write(f.ws / "empty.txt", "");
  r = f.read(read_op("empty.txt"), keep);
  BOOST_TEST(r->content()->size() == 0u);
  BOOST_TEST(r->lines() == 0u);
}

BOOST_AUTO_TEST_CASE(read_errors_are_typed) {
  fixture f;
  write(f.ws / "bin", std::string("\x7f" "ELF\0\0\0", 7) + "more");
  fs::create_directories(f.ws / "dir");
  ::mkfifo((f.ws / "fifo").c_str(), 0644);
  write(f.ws / "file", "x");
  f.refused(read_op("missing.txt"), v1::FileErrorCode::NotFound, "missing.txt: no such file or directory");
  f.refused(read_op("dir"), v1::FileErrorCode::IsDirectory, "is a directory");
  f.refused(read_op("bin"), v1::FileErrorCode::Binary, "binary file");
  f.refused(read_op("fifo"), v1::FileErrorCode::BadRequest, "not a regular file");  // and it did not block
  f.refused(read_op("file/x"), v1::FileErrorCode::NotDirectory, "not a directory");
  f.refused(read_op(std::string("a\0b", 3)), v1::FileErrorCode::BadRequest, "NUL byte");
  f.refused(read_op("file", 0, 0, 0), v1::FileErrorCode::BadRequest, "max_bytes");
  f.refused(read_op("file", 0, 0, 800u << 10), v1::FileErrorCode::BadRequest, "max_bytes");
}

BOOST_AUTO_TEST_CASE(write_is_atomic_creates_parents_and_keeps_the_mode) {
  fixture f;
  auto a = f.ask(write_op("new/deep/file.txt", "hello\n"));
  BOOST_REQUIRE_MESSAGE(a->ok, a->message);
  const auto* w = a->ok->reply_as_WriteResult();
  BOOST_TEST(w->created());
  BOOST_TEST(w->bytes() == 6u);
  BOOST_TEST(read_proc_file(f.ws / "new/deep/file.txt") == "hello\n");
  BOOST_TEST(((fs::status(f.ws / "new/deep/file.txt").permissions() & fs::perms::all) == fs::perms(0644)));
  // Overwrite: the mode stays, nothing is left beside it.
  fs::permissions(f.ws / "new/deep/file.txt", fs::perms(0751));
  a = f.ask(write_op("new/deep/file.txt", "second"));
  BOOST_REQUIRE(a->ok);
  BOOST_TEST(!a->ok->reply_as_WriteResult()->created());
  BOOST_TEST(read_proc_file(f.ws / "new/deep/file.txt") == "second");
  BOOST_TEST(((fs::status(f.ws / "new/deep/file.txt").permissions() & fs::perms::all) == fs::perms(0751)));
  BOOST_TEST(std::distance(fs::directory_iterator(f.ws / "new/deep"), fs::directory_iterator()) == 1);
  // A new file's mode as asked; a symlink is written through.
  BOOST_REQUIRE(f.ask(write_op("script.sh", "#!/bin/sh\n", 0755))->ok);
  BOOST_TEST(((fs::status(f.ws / "script.sh").permissions() & fs::perms::all) == fs::perms(0755)));
  fs::create_symlink("new/deep/file.txt", f.ws / "link");
  BOOST_REQUIRE(f.ask(write_op("link", "through"))->ok);
  BOOST_TEST(fs::is_symlink(f.ws / "link"));
  BOOST_TEST(read_proc_file(f.ws / "new/deep/file.txt") == "through");
  // Empty content is a file too.
  BOOST_REQUIRE(f.ask(write_op("empty", ""))->ok);
  BOOST_TEST(fs::file_size(f.ws / "empty") == 0u);
  // Errors.
  fs::create_directories(f.ws / "adir");
  f.refused(write_op("adir", "x"), v1::FileErrorCode::IsDirectory, "is a directory");
  f.refused(write_op("script.sh/x", "x"), v1::FileErrorCode::NotDirectory, "not a directory");
  f.refused(write_op("toobig", std::string((768u << 10) + 1, 'z')), v1::FileErrorCode::TooLarge, "more than the limit");
  BOOST_TEST(!fs::exists(f.ws / "toobig"));
  f.refused(write_op("/sys/ferry-file-ops-test", "x"), v1::FileErrorCode::PermissionDenied, "/sys/ferry-file-ops-test");
  f.refused(write_op(std::string("x\0y", 3), "x"), v1::FileErrorCode::BadRequest, "NUL byte");
  f.refused(write_op("m", "x", 010000), v1::FileErrorCode::BadRequest, "permission mode");
}

BOOST_AUTO_TEST_CASE(edit_replaces_an_exact_unique_string) {
  fixture f;
  write(f.ws / "src.cpp", "int a = 1;\nint b = 1;\nint c = 2;\n");
  fs::permissions(f.ws / "src.cpp", fs::perms(0600));
  auto a = f.ask(edit_op("src.cpp", "int c = 2;", "int c = 3;"));
  BOOST_REQUIRE_MESSAGE(a->ok, a->message);
  BOOST_TEST(a->ok->reply_as_EditResult()->replacements() == 1u);
  BOOST_TEST(read_proc_file(f.ws / "src.cpp") == "int a = 1;\nint b = 1;\nint c = 3;\n");
  BOOST_TEST(((fs::status(f.ws / "src.cpp").permissions() & fs::perms::all) == fs::perms(0600)));
  f.refused(edit_op("src.cpp", "= 1;", "= 5;"), v1::FileErrorCode::NotUnique, "occurs 2 times");
  f.refused(edit_op("src.cpp", "int d", "int e"), v1::FileErrorCode::NoMatch, "does not occur");
  BOOST_TEST(read_proc_file(f.ws / "src.cpp") == "int a = 1;\nint b = 1;\nint c = 3;\n");  // untouched
  a = f.ask(edit_op("src.cpp", "= 1;", "= 5;", true));
  BOOST_REQUIRE(a->ok);
  BOOST_TEST(a->ok->reply_as_EditResult()->replacements() == 2u);
  BOOST_TEST(read_proc_file(f.ws / "src.cpp") == "int a = 5;\nint b = 5;\nint c = 3;\n");
  BOOST_TEST(a->ok->reply_as_EditResult()->bytes() == 33u);
  f.refused(edit_op("src.cpp", "", "x"), v1::FileErrorCode::BadRequest, "old_string is empty");
  f.refused(edit_op("src.cpp", "a", "a"), v1::FileErrorCode::BadRequest, "the same");
  f.refused(edit_op("nope.cpp", "a", "b"), v1::FileErrorCode::NotFound, "no such file");
  write(f.ws / "bin", std::string("a\0b", 3));
  f.refused(edit_op("bin", "a", "b"), v1::FileErrorCode::Binary, "binary");
  fs::create_directories(f.ws / "d");
  f.refused(edit_op("d", "a", "b"), v1::FileErrorCode::IsDirectory, "is a directory");
  std::ofstream(f.ws / "huge", std::ios::binary).seekp((16u << 20) + 10) << 'x';
  f.refused(edit_op("huge", "a", "b"), v1::FileErrorCode::TooLarge, "limit");
}

BOOST_AUTO_TEST_CASE(list_gives_sorted_entries_with_type_and_size) {
  fixture f;
  write(f.ws / "b.txt", "12345");
  write(f.ws / "a/inner", "x");
  fs::create_symlink("b.txt", f.ws / "c-link");
  ::mkfifo((f.ws / "d-fifo").c_str(), 0644);
  write(f.ws / ".hidden", "");
  auto a = f.ask(list_op(""));
  BOOST_REQUIRE_MESSAGE(a->ok, a->message);
  const auto* l = a->ok->reply_as_ListResult();
  BOOST_TEST(l->path()->str() == f.ws.string());
  std::vector<std::string> seen;
  for (const auto* e : *l->entries())
    seen.push_back(e->name()->str() + ":" + v1::EnumNameFileType(e->type()) + ":" + std::to_string(e->size()));
  BOOST_REQUIRE(seen.size() == 5u);
  BOOST_TEST(seen[0] == ".hidden:File:0");
  BOOST_TEST(seen[1].rfind("a:Directory:", 0) == 0u, seen[1]);
  BOOST_TEST(seen[2] == "b.txt:File:5");
  BOOST_TEST(seen[3] == "c-link:Symlink:5");
  BOOST_TEST(seen[4] == "d-fifo:Other:0");
  BOOST_TEST(l->total() == 5u);
  BOOST_TEST(!l->truncated());
  a = f.ask(list_op("", 2));
  BOOST_REQUIRE(a->ok);
  BOOST_TEST(a->ok->reply_as_ListResult()->entries()->size() == 2u);
  BOOST_TEST(a->ok->reply_as_ListResult()->truncated());
  BOOST_TEST(a->ok->reply_as_ListResult()->total() == 5u);
  f.refused(list_op("b.txt"), v1::FileErrorCode::NotDirectory, "not a directory");
  f.refused(list_op("nope"), v1::FileErrorCode::NotFound, "no such file");
  f.refused(list_op("", 0), v1::FileErrorCode::BadRequest, "max_entries");
  f.refused(list_op("", 10001), v1::FileErrorCode::BadRequest, "max_entries");
}

BOOST_AUTO_TEST_CASE(glob_matches_double_star_patterns_and_skips_git) {
  fixture f;
  for (const char* p : {"src/a.cpp", "src/a.h", "src/sub/b.cpp", "src/sub/deep/c.cpp", "main.cpp", "README.md",
                        ".git/hooks/x.cpp", "src/.git/y.cpp", "docs/.hidden.cpp"})
    write(f.ws / p, "x");
  auto matches = [&](const op_builder& op) {
    auto a = f.ask(op);
    BOOST_REQUIRE_MESSAGE(a->ok, a->message);
    return strings(a->ok->reply_as_GlobResult()->matches());
  };
  BOOST_TEST((matches(glob_op("**/*.cpp")) ==
              std::vector<std::string>{"docs/.hidden.cpp", "main.cpp", "src/a.cpp", "src/sub/b.cpp", "src/sub/deep/c.cpp"}));
  BOOST_TEST((matches(glob_op("src/*.h")) == std::vector<std::string>{"src/a.h"}));
  BOOST_TEST((matches(glob_op("src/**/*.cpp")) == std::vector<std::string>{"src/a.cpp", "src/sub/b.cpp", "src/sub/deep/c.cpp"}));
  BOOST_TEST((matches(glob_op("*.cpp", "src/sub")) == std::vector<std::string>{"b.cpp"}));
  BOOST_TEST((matches(glob_op("src/sub/**")) == std::vector<std::string>{"src/sub/b.cpp", "src/sub/deep", "src/sub/deep/c.cpp"}));
  BOOST_TEST((matches(glob_op("**/x.cpp", "", 1000, true)) == std::vector<std::string>{".git/hooks/x.cpp"}));
  BOOST_TEST(matches(glob_op("**/x.cpp")).empty());
  BOOST_TEST((matches(glob_op("README.[mM]?")) == std::vector<std::string>{"README.md"}));
  auto abs = f.ask(glob_op((f.ws / "src" / "*.h").string()));
  BOOST_REQUIRE(abs->ok);
  BOOST_TEST(abs->ok->reply_as_GlobResult()->path()->str() == "/");
  BOOST_TEST((strings(abs->ok->reply_as_GlobResult()->matches()) ==
              std::vector<std::string>{(f.ws / "src" / "a.h").string().substr(1)}));
  auto capped = f.ask(glob_op("**/*.cpp", "", 2));
  BOOST_REQUIRE(capped->ok);
  BOOST_TEST(capped->ok->reply_as_GlobResult()->matches()->size() == 2u);
  BOOST_TEST(capped->ok->reply_as_GlobResult()->truncated());
  f.refused(glob_op(""), v1::FileErrorCode::BadRequest, "empty");
  f.refused(glob_op("*", "main.cpp"), v1::FileErrorCode::NotDirectory, "not a directory");
  f.refused(glob_op("*", "nope"), v1::FileErrorCode::NotFound, "no such file");
  f.refused(glob_op("*", "", 0), v1::FileErrorCode::BadRequest, "max_results");
}

namespace {

void grep_cases(fixture& f, const std::string& engine) {
  write(f.ws / "src/a.cpp", "int main() {\n  return helper();\n}\n");
  write(f.ws / "src/b.h", "int helper();\n// HELPER docs\n");
  write(f.ws / "notes.txt", "one\ntwo\nhelper three\nfour\nfive\n");
  write(f.ws / ".git/config", "helper = git\n");
  write(f.ws / "blob.bin", std::string("helper\0\0\0", 9));
  auto grep = [&](grep_req g) {
    auto a = f.ask(grep_op(std::move(g)));
    BOOST_REQUIRE_MESSAGE(a->ok, a->message);
    BOOST_REQUIRE((a->ok->reply_type() == v1::FileReply::GrepResult));
    auto* r = a->ok->reply_as_GrepResult();
    BOOST_TEST(r->engine()->str() == engine);
    return std::pair{grep_lines(r), std::move(a)};
  };
  auto [all, a1] = grep(gr("helper"));
  BOOST_TEST((all == std::vector<std::string>{"notes.txt:3:helper three", "src/a.cpp:2:  return helper();", "src/b.h:1:int helper();"}),
             engine);
  BOOST_TEST(a1->ok->reply_as_GrepResult()->matches() == 3u);
  BOOST_TEST(a1->ok->reply_as_GrepResult()->files() == 3u);
  BOOST_TEST(a1->ok->reply_as_GrepResult()->path()->str() == f.ws.string());
  auto [icase, a2] = grep(gr("helper", "", "*.h", true));
  BOOST_TEST((icase == std::vector<std::string>{"src/b.h:1:int helper();", "src/b.h:2:// HELPER docs"}), engine);
  auto [ctx, a3] = grep(gr("three", "notes.txt", "", false, 1));
  BOOST_TEST((ctx == std::vector<std::string>{"notes.txt-2-two", "notes.txt:3:helper three", "notes.txt-4-four"}), engine);
  BOOST_TEST(a3->ok->reply_as_GrepResult()->path()->str() == f.ws.string());
  auto [capped, a4] = grep(gr("e", "", "", false, 0, 2));
  BOOST_TEST(capped.size() == 2u);
  BOOST_TEST(a4->ok->reply_as_GrepResult()->truncated());
  auto [none, a5] = grep(gr("no such text"));
  BOOST_TEST(none.empty());
  BOOST_TEST(!a5->ok->reply_as_GrepResult()->truncated());
  auto [regex, a6] = grep(gr("^in[t]+ [a-z]+\\(", "src"));
  BOOST_TEST((regex == std::vector<std::string>{"a.cpp:1:int main() {", "b.h:1:int helper();"}), engine);
  f.refused(grep_op(gr("(")), v1::FileErrorCode::BadRequest, engine == "rg" ? "regex" : "bad regular expression");
  f.refused(grep_op(gr("")), v1::FileErrorCode::BadRequest, "empty");
  f.refused(grep_op(gr("x", "nope")), v1::FileErrorCode::NotFound, "no such file");
  f.refused(grep_op(gr("x", "", "", false, 21)), v1::FileErrorCode::BadRequest, "context");
  f.refused(grep_op(gr("x", "", "", false, 0, 0)), v1::FileErrorCode::BadRequest, "max_matches");
}

bool ripgrep_installed() { return ::access("/usr/bin/rg", X_OK) == 0; }

}  // namespace

BOOST_AUTO_TEST_CASE(grep_without_ripgrep_uses_posix_regular_expressions) {
  fixture f({"--ripgrep", "/nonexistent/rg"});
  grep_cases(f, "posix");
}

BOOST_AUTO_TEST_CASE(grep_with_ripgrep) {
  if (!ripgrep_installed()) {
    BOOST_TEST_MESSAGE("skipped: /usr/bin/rg is not installed (Debian: ripgrep)");
    return;
  }
  fixture f({"--ripgrep", "/usr/bin/rg"});
  grep_cases(f, "rg");
}

BOOST_AUTO_TEST_CASE(requests_in_flight_are_bounded_and_a_stuck_one_is_killed) {
  // A "ripgrep" that never answers: the operation outlives its timeout and is killed.
  testing::temp_dir bin;
  const fs::path fake = bin.path() / "rg";
  write(fake, "#!/bin/sh\nsleep 100\n");
  fs::permissions(fake, fs::perms(0755));
  fixture f({"--ripgrep", fake.string(), "--file-op-timeout-ms", "1500"});
  write(f.ws / "x", "x");
  // The same id twice, and 17 at once, in one write: ferry-init sees them while the first run.
  std::string burst = request_frame(500, grep_op(gr("x"))) + request_frame(500, read_op("x"));
  for (uint32_t id = 501; id <= 516; ++id)
    burst += request_frame(id, read_op("x"));
  const auto t0 = std::chrono::steady_clock::now();
  f.host->send(burst);
  BOOST_REQUIRE(f.host->until([&] { return f.host->file_answers.size() >= 17u; }, 20s));
  // 500 (grep, stuck) and 501..515 run: 16 in progress; the second 500 and 516 are refused.
  BOOST_TEST(f.host->file_answers.size() == 17u);
  auto error_for = [&](uint32_t id) -> std::optional<event> {
    for (const auto& e : f.host->events)
      if (e.type == v1::Message::FileError && e.command_id == id)
        return e;
    return std::nullopt;
  };
  BOOST_REQUIRE(error_for(500));
  BOOST_TEST(error_for(500)->data.find("in progress") != std::string::npos);
  BOOST_REQUIRE(error_for(516));
  BOOST_TEST(error_for(516)->data.find("16 file operations are in progress") != std::string::npos);
  for (uint32_t id = 501; id <= 515; ++id)
    BOOST_TEST(!error_for(id).has_value(), "request " << id);
  f.host->file_answers.erase(500);
  BOOST_REQUIRE(f.host->until([&] { return f.host->file_answers.count(500) > 0; }, 20s));
  auto stuck = f.decode(500);
  BOOST_REQUIRE(stuck->code);
  BOOST_TEST((*stuck->code == v1::FileErrorCode::Timeout), stuck->message);
  BOOST_TEST(stuck->message.find("1500 ms") != std::string::npos);
  BOOST_TEST((std::chrono::steady_clock::now() - t0 >= 1400ms));
  // Commands and file operations interleave; ferry-init is still fine.
  auto s = run_request{};
  s.command_id = 1;
  s.shell = "echo alive";
  f.host->send(run_frame(s));
  BOOST_REQUIRE(f.host->until_over(1));
  BOOST_TEST(f.host->story(1).out[0] == "alive\n");
}

BOOST_AUTO_TEST_CASE(file_requests_need_an_attached_host) {
  listening_init init;
  auto c = init.connect();
  BOOST_REQUIRE(c->next());  // Hello
  c->send(request_frame(1, read_op("x")));
  auto e = c->next();
  BOOST_REQUIRE(e);
  BOOST_TEST((e->type == v1::Message::Error));
  BOOST_TEST(e->data.find("before Attach") != std::string::npos);
}
