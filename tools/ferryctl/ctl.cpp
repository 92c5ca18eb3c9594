// Shared by the ferryctl commands: exit codes, opening a data directory's journal, and stopping
// cooperatively on SIGINT/SIGTERM or a closed stdout.

#include <signal.h>
#include <stdlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <system_error>

#include "ctl.h"

namespace fs = std::filesystem;

namespace ferry::ctl {

const char* const exit_codes_help =
  "Exit codes:\n"
  "  0  ok\n"
  "  1  verify found problems (each is printed)\n"
  "  2  usage error: bad command line, --at past the end of the stream, a stream kind replay\n"
  "     has no fold for, a malformed task id, an empty or oversized steering text, no --nats-url\n"
  "  3  data directory missing, or no journal in it\n"
  "  4  journal locked by another process (ferryd runs: use its API to create tokens); for\n"
  "     image rm and image build --rebuild: the image is in use by a ferryd or being built\n"
  "  5  journal corrupt or unreadable (RocksDB corruption, FlatBuffers verifier, I/O)\n"
  "  6  stream not found (tasks show: no such task)\n"
  "  7  tasks abort|steer: no acknowledgement over NATS (unreachable, no ferryd serves the\n"
  "     task, no answer in time, ferryd shutting down)\n"
  "  8  tasks abort|steer: the task has ended (or is ending), or no ferryd runs it\n"
  "  9  image build failed: not root, debootstrap or cc missing, mirror unreachable, disk\n"
  "     full, debootstrap failed (the message says which and what to do)\n"
  "  10 image rm: no such image\n"
  "  128+N  stopped by signal N (130 SIGINT, 143 SIGTERM; but `events tail --follow` ends\n"
  "     with 0 on them), or 141 when stdout was closed (e.g. `| head`)\n"
  "Every other command reads the journal as a RocksDB secondary, so it works while ferryd\n"
  "runs; only `token create` writes and needs ferryd stopped. `tasks abort|steer` do not touch\n"
  "the data directory: they send requests on ferryd's NATS (--nats-url). `image` works on\n"
  "<data-dir>/images; `image build` needs root.\n";

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "ferryctl: %s\n", message.c_str());
  return code;
}

int exit_code_for(errc code) {
  switch (code) {
    case errc::not_found: return exit_no_journal;
    case errc::busy: return exit_locked;
    case errc::invalid_argument: return exit_usage;
    case errc::corrupt:
    case errc::failed:
    case errc::conflict:
    case errc::closed: return exit_corrupt;
  }
  return exit_corrupt;
}

int fail(const error_info& e, const std::string& context) {
  return fail(exit_code_for(e.code), context.empty() ? e.message : context + ": " + e.message);
}

result<fs::path> journal_dir(const fs::path& data_dir, bool may_be_missing) {
  std::error_code ec;
  const auto st = fs::status(data_dir, ec);
  if (st.type() == fs::file_type::not_found)
    return ferry::fail(errc::not_found, "data directory '" + data_dir.string() +
                                          "' does not exist (--data-dir; ferryd's default is ./var)");
  if (ec)
    return ferry::fail(errc::failed, "cannot access data directory '" + data_dir.string() +
                                       "': " + ec.message());
  if (st.type() != fs::file_type::directory)
    return ferry::fail(errc::not_found,
                       "data directory '" + data_dir.string() + "' is not a directory");
  auto dir = data_dir / "journal";
  const auto jst = fs::status(dir, ec);
  if (jst.type() == fs::file_type::not_found && may_be_missing)
    return dir;
  if (jst.type() == fs::file_type::not_found) {
    std::string hint;
    // A common slip: pointing at the journal itself instead of the data directory around it.
    if (fs::exists(data_dir / "CURRENT", ec))
      hint = " (it looks like a journal itself: pass the directory that contains it, --data-dir '" +
             fs::absolute(data_dir, ec).parent_path().string() + "')";
    return ferry::fail(errc::not_found, "'" + data_dir.string() +
                                          "' is not a ferry data directory: it has no journal/" +
                                          hint);
  }
  if (ec)
    return ferry::fail(errc::failed, "cannot access '" + dir.string() + "': " + ec.message());
  if (jst.type() != fs::file_type::directory)
    return ferry::fail(errc::not_found, "'" + dir.string() + "' is not a directory");
  return dir;
}

result<std::unique_ptr<journal_reader>> journal_reader::open(const fs::path& data_dir) {
  auto dir = journal_dir(data_dir);
  if (!dir)
    return dir.error();
  std::unique_ptr<journal_reader> r(new journal_reader);
  std::error_code ec;
  std::string tmpl = (fs::temp_directory_path(ec) / "ferryctl-XXXXXX").string();
  if (ec || !mkdtemp(tmpl.data()))
    return ferry::fail(errc::failed, "cannot create a scratch directory " + tmpl + ": " +
                                       (ec ? ec.message() : std::strerror(errno)));
  r->scratch_ = tmpl;
  auto store = storage::open_journal_secondary(*dir, r->scratch_);
  if (!store)
    return store.error();
  r->store_ = std::move(*store);
  return r;
}

journal_reader::~journal_reader() {
  store_.reset();
  std::error_code ec;
  if (!scratch_.empty())
    fs::remove_all(scratch_, ec);
}

volatile std::sig_atomic_t stop_signal = 0;

namespace {

/// errno of the first failed write to stdout; 0 while output works.
int output_errno = 0;

extern "C" void on_stop_signal(int sig) { stop_signal = sig; }

}  // namespace

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

bool emit(std::string_view line) {
  if (output_errno)
    return false;
  if (std::fwrite(line.data(), 1, line.size(), stdout) != line.size() ||
      std::fputc('\n', stdout) == EOF) {
    output_errno = errno ? errno : EIO;
    return false;
  }
  return true;
}

bool flush_stdout() {
  if (!output_errno && std::fflush(stdout) != 0)
    output_errno = errno ? errno : EIO;
  return output_errno == 0;
}

bool should_stop() { return stop_signal != 0 || output_errno != 0; }

int early_stop_exit_code() {
  if (stop_signal)
    return 128 + stop_signal;
  if (!flush_stdout()) {
    if (output_errno != EPIPE)
      std::fprintf(stderr, "ferryctl: writing to stdout: %s\n", std::strerror(output_errno));
    return 128 + SIGPIPE;
  }
  return -1;
}

int finish_output(int code) {
  if (flush_stdout() || code != exit_ok)
    return code;
  if (output_errno != EPIPE)
    std::fprintf(stderr, "ferryctl: writing to stdout: %s\n", std::strerror(output_errno));
  return 128 + SIGPIPE;
}

}  // namespace ferry::ctl
