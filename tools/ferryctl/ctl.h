#pragma once
// ferryctl internals: exit codes, opening a data directory's journal, and one function per
// command. Private to tools/ferryctl/.
//
// Threading: single-threaded; every function runs on main's thread.

#include <csignal>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ferry/actors/tasks.h"
#include "ferry/schemas/events.h"
#include "ferry/schemas/result.h"
#include "ferry/storage/journal.h"

namespace ferry::ctl {

/// ferryctl's exit codes. Scripts depend on them: append, never renumber. Listed in the help
/// footer (exit_codes_help) and in tools/README.md.
enum exit_code : int {
  exit_ok = 0,
  /// `verify` found problems (they are printed).
  exit_problems = 1,
  /// Bad command line (CLI11's parse errors included) or an argument the data contradicts
  /// (`--at` past the end of a stream, a stream kind replay has no fold for); for `tasks`: a
  /// malformed task id, an empty or oversized steering text, no NATS URL.
  exit_usage = 2,
  /// The data directory does not exist, or holds no journal.
  exit_no_journal = 3,
  /// The journal is locked by another process (a running ferryd), for `token create`; the
  /// image is in use by a running ferryd or being built, for `image rm` and `image build
  /// --rebuild`.
  exit_locked = 4,
  /// The journal is corrupt or cannot be read (RocksDB corruption, verifier failure, I/O).
  exit_corrupt = 5,
  /// `events show`, `replay` or `verify` named a stream that has no events; `tasks show` a
  /// task that has none.
  exit_stream_not_found = 6,
  /// `tasks abort|steer`: no acknowledgement over NATS (unreachable, no ferryd serves the task's
  /// control subject, no answer in time) or the serving ferryd is shutting down.
  exit_no_answer = 7,
  /// `tasks abort|steer`: the task cannot be controlled any more: it has ended (or is ending),
  /// or no ferryd runs it.
  exit_task_ended = 8,
  /// `image build` failed: not root, debootstrap or a C compiler missing, mirror unreachable,
  /// disk full, debootstrap failed (the message says which and what to do).
  exit_image_build_failed = 9,
  /// `image rm`: no such image.
  exit_no_image = 10,
};

/// The exit-code table as printed at the end of `ferryctl --help`.
extern const char* const exit_codes_help;

/// Prints "ferryctl: <message>" to stderr and returns `code`, for `return fail(...)`.
int fail(int code, const std::string& message);

/// The exit code for a journal error: not_found → 3, busy → 4, invalid_argument → 2, anything
/// else (corrupt, I/O, closed) → 5. Stream-not-found is not an errc: commands check info().
int exit_code_for(errc code);

/// Prints `e` (prefixed with `context` when given) and returns exit_code_for(e.code).
int fail(const error_info& e, const std::string& context = {});

/// `<data_dir>/journal`, after checking that the data directory exists and (unless
/// `may_be_missing`) has a journal/ in it: errc::not_found with a message naming the path
/// otherwise.
[[nodiscard]] result<std::filesystem::path> journal_dir(const std::filesystem::path& data_dir,
                                                        bool may_be_missing = false);

/// A read-only view of a data directory's journal, opened as a RocksDB secondary with a private
/// scratch directory (removed on destruction), so it works while ferryd runs.
class journal_reader {
 public:
  /// Fails with errc::not_found (no data directory / journal), errc::corrupt, or an I/O error.
  [[nodiscard]] static result<std::unique_ptr<journal_reader>> open(
    const std::filesystem::path& data_dir);
  ~journal_reader();
  journal_reader(const journal_reader&) = delete;
  journal_reader& operator=(const journal_reader&) = delete;

  storage::event_store& store() { return *store_; }

 private:
  journal_reader() = default;
  std::filesystem::path scratch_;
  std::unique_ptr<storage::event_store> store_;  // destroyed before scratch_ is removed
};

// -- interruption and output ------------------------------------------------------------------
//
// Commands that print while they read (events show/tail/streams, replay) stop cooperatively:
// SIGINT/SIGTERM set `stop_signal` and a closed stdout makes emit() fail, the loop ends, and the
// journal and its scratch directory are closed and removed as usual (a default signal death
// would leave the scratch directory behind).

/// The SIGINT/SIGTERM received since install_stop_handlers(), else 0.
extern volatile std::sig_atomic_t stop_signal;

/// Installs the SIGINT/SIGTERM handlers that set stop_signal, and ignores SIGPIPE (a closed
/// stdout then shows as a failed write instead of killing the process).
void install_stop_handlers();

/// Writes `line` and a newline to stdout; false once output has failed (e.g. the reader closed
/// the pipe), after which callers stop.
bool emit(std::string_view line);

/// Flushes stdout (for output that must be seen as it happens); false once output failed.
bool flush_stdout();

/// True when a loop should stop: a stop signal arrived or output failed.
bool should_stop();

/// The exit code of a command that stopped early: 128 + the signal for SIGINT/SIGTERM, 141
/// (128 + SIGPIPE, as if killed by it) when stdout failed; -1 when it did not stop early.
int early_stop_exit_code();

/// Flushes stdout at the end of a command: a command that succeeded but whose output could not
/// be written exits 141 instead (see early_stop_exit_code). Otherwise returns `code`.
int finish_output(int code);

/// ISO 8601 UTC with milliseconds, as events are rendered everywhere.
using schemas::iso_time;

/// A task's state as `replay --json` and `tasks … --json` print it: actors::to_json (the body of
/// GET /api/v1/tasks/{id}), with the sandbox status "none" before it has one.
nlohmann::json task_view_json(const actors::task_view& v);

/// A task's state as `replay` and `tasks show` print it: one "field: value" line each.
/// `highest`: the stream's highest sequence (the view may be folded up to an earlier one).
void print_task_view(const std::string& stream, const actors::task_view& v, uint64_t highest);

// -- commands: each returns the process exit code, having printed its output and errors ---------

struct streams_args {
  std::string kind;    ///< "task" → streams "task-…" and "task"; empty: all
  std::string prefix;  ///< raw prefix filter (older flag); empty: none
  bool json = false;
};
int run_streams(const std::filesystem::path& data_dir, const streams_args& a);

struct show_args {
  std::string stream;
  uint64_t from = 1;
  uint64_t to = UINT64_MAX;
  uint64_t limit = 0;  ///< 0: no limit
  bool json = false;
};
int run_show(const std::filesystem::path& data_dir, const show_args& a);

struct tail_args {
  uint64_t from_position = 1;
  bool follow = false;
  bool json = false;
};
int run_tail(const std::filesystem::path& data_dir, const tail_args& a);

struct replay_args {
  std::string stream;
  uint64_t at = 0;  ///< 0: up to the last event
  bool timeline = false;
  bool json = false;
};
int run_replay(const std::filesystem::path& data_dir, const replay_args& a);

struct verify_args {
  std::string stream;  ///< empty: everything
  bool json = false;
};
int run_verify(const std::filesystem::path& data_dir, const verify_args& a);

struct tasks_list_args {
  std::string status;  ///< only tasks with this status; empty: all
  std::string user;    ///< only tasks of this user (token id); empty: all
  bool json = false;
};
int run_tasks_list(const std::filesystem::path& data_dir, const tasks_list_args& a);

struct tasks_show_args {
  std::string id;  ///< task id, with or without the "task-" of its stream
  bool json = false;
};
int run_tasks_show(const std::filesystem::path& data_dir, const tasks_show_args& a);

/// How `tasks abort|steer` reach the task: its control subjects on ferryd's NATS.
struct control_args {
  std::string nats_url;      ///< required (ferryd records none in its data directory)
  std::string as = "ferryctl";  ///< recorded as the acting user of the events it causes
  bool json = false;
};

struct tasks_abort_args {
  std::string id;
  std::string reason;
  uint64_t wait_s = 5;  ///< how long to wait for the task to end (the answer is then "pending")
  control_args control;
};
int run_tasks_abort(const tasks_abort_args& a);

struct tasks_steer_args {
  std::string id;
  std::string text;
  control_args control;
};
int run_tasks_steer(const tasks_steer_args& a);

struct image_build_args {
  std::vector<std::string> packages;  ///< the extra packages; default_image_packages() unless set
  bool packages_given = false;        ///< --packages or --minimal was given
  std::string suite = "bookworm";
  std::string mirror;                 ///< empty: apt's
  bool rebuild = false;
  bool json = false;
};
/// Builds (or finds cached) the image; progress on stderr, the hash (or --json) on stdout.
int run_image_build(const std::filesystem::path& data_dir, const image_build_args& a);

struct image_list_args {
  bool json = false;
};
int run_image_list(const std::filesystem::path& data_dir, const image_list_args& a);

struct image_rm_args {
  std::vector<std::string> images;  ///< hashes, unique prefixes or "latest"
};
int run_image_rm(const std::filesystem::path& data_dir, const image_rm_args& a);

struct token_create_args {
  std::string name;
  bool admin = false;
};
int run_token_create(const std::filesystem::path& data_dir, const token_create_args& a);

}  // namespace ferry::ctl
