// ferryctl — Ferry's ops CLI: inspect the event journal, replay state, list/show/abort/steer
// tasks, verify the store, manage tokens, build sandbox root images. Reads the data directory directly, as a RocksDB
// secondary, so it works while ferryd runs; `tasks abort|steer` go over ferryd's NATS instead.
// The commands live in *_cmd.cpp; exit codes in ctl.h.

#include <charconv>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>

#include "ctl.h"

using namespace ferry::ctl;

namespace {

/// Sequences and positions start at 1 (CLI11's PositiveNumber names a floating-point range).
const CLI::Validator at_least_one{
  [](std::string& in) -> std::string {
    uint64_t v = 0;
    auto [end, ec] = std::from_chars(in.data(), in.data() + in.size(), v);
    if (ec != std::errc() || end != in.data() + in.size() || v == 0)
      return "expected a whole number >= 1, got '" + in + "'";
    return {};
  },
  ">=1"};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferryctl — inspect Ferry's event journal, replay state, list and control tasks, "
               "verify the store, manage API tokens and build sandbox images"};
  app.require_subcommand(1);
  app.footer(exit_codes_help);
  std::string data_dir = "./var";
  app.add_option("--data-dir", data_dir, "ferryd's data directory")->capture_default_str();

  // -- events ------------------------------------------------------------------------------------
  auto* events = app.add_subcommand("events", "Inspect the event journal");
  events->require_subcommand(1);

  streams_args streams_a;
  auto* streams = events->add_subcommand(
    "streams", "List streams with their highest sequence and how far they were deleted");
  auto* kind_opt = streams->add_option(
    "--kind", streams_a.kind, "Only streams of this kind: task, session, sandbox, user, tokens…");
  streams->add_option("--prefix", streams_a.prefix, "Only streams starting with this")
    ->excludes(kind_opt);
  streams->add_flag("--json", streams_a.json, "One JSON object per line (with the head hash)");

  show_args show_a;
  auto* show = events->add_subcommand("show", "Print the stored events of a stream, in order");
  show->add_option("stream", show_a.stream, "Stream id, e.g. task-0123abcd…")->required();
  show->add_option("--from", show_a.from, "First sequence to print")
    ->capture_default_str()
    ->check(at_least_one);
  show->add_option("--to", show_a.to, "Last sequence to print (default: the last)")
    ->check(at_least_one);
  show->add_option("--limit", show_a.limit, "Print at most this many events (0: all)");
  show->add_flag("--json", show_a.json, "One JSON object per line");

  tail_args tail_a;
  auto* tail = events->add_subcommand(
    "tail", "Print the global log (every stream) in position order");
  tail->add_option("--from-position", tail_a.from_position, "First global position to print")
    ->capture_default_str()
    ->check(at_least_one);
  tail->add_flag("--follow,-f", tail_a.follow,
                 "Keep printing new events as ferryd appends them, until SIGINT/SIGTERM (exit 0)");
  tail->add_flag("--json", tail_a.json, "One JSON object per line");

  // -- replay, verify ----------------------------------------------------------------------------
  replay_args replay_a;
  auto* replay = app.add_subcommand(
    "replay", "Rebuild a stream's state with its actor's fold and print it (task streams)");
  replay->add_option("stream", replay_a.stream, "Stream id, e.g. task-0123abcd…")->required();
  replay->add_option("--at", replay_a.at, "Stop after this sequence (default: the last)")
    ->check(at_least_one);
  replay->add_flag("--timeline", replay_a.timeline,
                   "Also list every task and sandbox state transition with its time and sequence");
  replay->add_flag("--json", replay_a.json, "One JSON object");

  verify_args verify_a;
  auto* verify = app.add_subcommand(
    "verify", "Check hash chains and stored bytes of one stream or the whole journal");
  verify->add_option("stream", verify_a.stream, "Only this stream (default: everything)");
  verify->add_flag("--json", verify_a.json, "One JSON object");

  // -- tasks -------------------------------------------------------------------------------------
  auto* tasks = app.add_subcommand(
    "tasks", "List and show tasks (from the journal); abort and steer them (over NATS)");
  tasks->require_subcommand(1);

  tasks_list_args tlist_a;
  auto* tlist = tasks->add_subcommand("list", "Every task with its status, oldest first");
  tlist->add_option("--status", tlist_a.status, "Only tasks with this status")
    ->check(CLI::IsMember({"queued", "running", "succeeded", "failed", "aborted"}));
  tlist->add_option("--user", tlist_a.user, "Only tasks of this user (token id, tok_…)");
  tlist->add_flag("--json", tlist_a.json, "One JSON object per line (the API's task shape)");

  tasks_show_args tshow_a;
  auto* tshow = tasks->add_subcommand("show", "One task's state, folded from its events");
  tshow->add_option("id", tshow_a.id, "Task id (or its stream, task-<id>)")->required();
  tshow->add_flag("--json", tshow_a.json, "One JSON object (the API's task shape)");

  // abort and steer talk to ferryd's NATS, not to the data directory.
  auto add_control_options = [](CLI::App* cmd, control_args& c) {
    cmd->add_option("--nats-url", c.nats_url,
                    "ferryd's NATS (it prints it at start: \"NATS at nats://…\")")
      ->envname("FERRY_NATS_URL");
    cmd->add_option("--as", c.as, "Acting user recorded on the events it causes")
      ->capture_default_str();
    cmd->add_flag("--json", c.json, "Print the acknowledgement as one JSON object");
  };
  tasks_abort_args tabort_a;
  auto* tabort = tasks->add_subcommand(
    "abort", "Stop a task (its sandbox is killed) and wait until it has ended");
  tabort->add_option("id", tabort_a.id, "Task id")->required();
  tabort->add_option("--reason", tabort_a.reason, "Why (recorded with the abort)");
  tabort->add_option("--wait", tabort_a.wait_s,
                     "Seconds to wait for the end before answering \"pending\"")
    ->capture_default_str()
    ->check(CLI::Range(0, 30));
  add_control_options(tabort, tabort_a.control);

  tasks_steer_args tsteer_a;
  auto* tsteer = tasks->add_subcommand(
    "steer", "Record a steering comment for the task's next turn");
  tsteer->add_option("id", tsteer_a.id, "Task id")->required();
  tsteer->add_option("text", tsteer_a.text, "The comment (at most 16 KiB)")->required();
  add_control_options(tsteer, tsteer_a.control);

  // -- image -------------------------------------------------------------------------------------
  auto* image = app.add_subcommand(
    "image", "Build, list and remove sandbox root images (<data-dir>/images)");
  image->require_subcommand(1);

  image_build_args ibuild_a;
  auto* ibuild = image->add_subcommand(
    "build", "Build a Debian root (debootstrap, from apt's mirror) with the statx shim, or return "
             "the cached one with the same recipe; prints its hash (needs root)");
  auto* packages_opt =
    ibuild->add_option("--packages", ibuild_a.packages,
                       "Packages besides the variant's, comma-separated (default: git "
                       "ca-certificates curl python3 nodejs npm build-essential ripgrep)")
      ->delimiter(',');
  bool minimal = false;
  ibuild->add_flag("--minimal", minimal, "No extra packages: minbase and the shim only")
    ->excludes(packages_opt);
  ibuild->add_option("--suite", ibuild_a.suite, "Debian suite")->capture_default_str();
  ibuild->add_option("--mirror", ibuild_a.mirror,
                     "Archive URL (default: the one apt uses for the suite, from /etc/apt)");
  ibuild->add_flag("--rebuild", ibuild_a.rebuild,
                   "Build even if cached; the new image replaces the old one atomically");
  ibuild->add_flag("--json", ibuild_a.json, "Print the image as one JSON object instead of its hash");

  image_list_args ilist_a;
  auto* ilist = image->add_subcommand("list", "Built images, oldest first");
  ilist->add_flag("--json", ilist_a.json,
                  "One JSON object per line, with the installed packages' versions");

  image_rm_args irm_a;
  auto* irm = image->add_subcommand("rm", "Remove images (refused while a ferryd uses one)");
  irm->add_option("image", irm_a.images, "Hash, unique prefix (at least 4 digits) or latest")
    ->required();

  // -- token -------------------------------------------------------------------------------------
  auto* token = app.add_subcommand("token", "Manage API tokens");
  token->require_subcommand(1);
  token_create_args create_a;
  auto* create = token->add_subcommand(
    "create", "Create a token (ferryd must be stopped; while it runs use POST /api/v1/tokens)");
  create->add_option("--name", create_a.name, "What the token is for")->required();
  create->add_flag("--admin", create_a.admin, "May see every user's tasks and mint tokens");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help is a "parse error" with code 0; every real one is a usage error (CLI11's own codes
    // differ per error kind).
    return app.exit(e) == 0 ? exit_ok : exit_usage;
  }

  const std::filesystem::path dir = data_dir;
  // Reading commands stop cooperatively on SIGINT/SIGTERM or a closed stdout, so the scratch
  // directory is always removed. verify runs to the end or dies by the signal (it has no loop
  // of ours to stop); token create keeps RocksDB's own crash safety.
  // image build stops the same way: debootstrap is killed and the partial build removed.
  if (*streams || *show || *tail || *replay || *tlist || *tshow || *ibuild)
    install_stop_handlers();
  int code = exit_usage;
  if (*streams)
    code = run_streams(dir, streams_a);
  else if (*show)
    code = run_show(dir, show_a);
  else if (*tail)
    code = run_tail(dir, tail_a);
  else if (*replay)
    code = run_replay(dir, replay_a);
  else if (*verify)
    code = run_verify(dir, verify_a);
  else if (*tlist)
    code = run_tasks_list(dir, tlist_a);
  else if (*tshow)
    code = run_tasks_show(dir, tshow_a);
  else if (*tabort)
    code = run_tasks_abort(tabort_a);
  else if (*tsteer)
    code = run_tasks_steer(tsteer_a);
  else if (*create)
    code = run_token_create(dir, create_a);
  else if (*ibuild) {
    ibuild_a.packages_given = minimal || packages_opt->count() > 0;
    code = run_image_build(dir, ibuild_a);
  }
  else if (*ilist)
    code = run_image_list(dir, ilist_a);
  else if (*irm)
    code = run_image_rm(dir, irm_a);
  return finish_output(code);
}
