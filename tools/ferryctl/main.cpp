// ferryctl — Ferry's ops CLI: inspect events, manage tokens. Reads the data directory directly
// (as a RocksDB secondary, so it works while ferryd runs).

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "ferry/gateway/tokens.h"
#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace fs = std::filesystem;

namespace {

/// A private scratch directory for the secondary instance, removed on exit.
struct scratch_dir {
  fs::path path;
  scratch_dir() {
    std::string tmpl = (fs::temp_directory_path() / "ferryctl-XXXXXX").string();
    if (mkdtemp(tmpl.data()))
      path = tmpl;
  }
  ~scratch_dir() {
    std::error_code ec;
    if (!path.empty())
      fs::remove_all(path, ec);
  }
};

int fail(const std::string& message) {
  std::fprintf(stderr, "ferryctl: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferryctl — inspect Ferry's event journal and manage API tokens"};
  app.require_subcommand(1);
  std::string data_dir = "./var";
  app.add_option("--data-dir", data_dir, "ferryd's data directory")->capture_default_str();

  auto* events = app.add_subcommand("events", "Inspect the event journal");
  events->require_subcommand(1);
  auto* show = events->add_subcommand("show", "Print the stored events of a stream");
  std::string stream;
  bool as_json = false;
  uint64_t from = 1;
  uint64_t limit = 0;
  show->add_option("stream", stream, "Stream id, e.g. task-0123abcd…")->required();
  show->add_flag("--json", as_json, "One JSON object per line");
  show->add_option("--from", from, "First sequence to print")->capture_default_str();
  show->add_option("--limit", limit, "Print at most this many events (0: all)");
  auto* streams = events->add_subcommand("streams", "List stream ids");
  std::string prefix;
  streams->add_option("--prefix", prefix, "Only streams starting with this");

  auto* token = app.add_subcommand("token", "Manage API tokens");
  token->require_subcommand(1);
  auto* create = token->add_subcommand("create", "Create a token (ferryd must be stopped)");
  std::string name;
  bool admin = false;
  create->add_option("--name", name, "What the token is for")->required();
  create->add_flag("--admin", admin, "May see every user's tasks");

  CLI11_PARSE(app, argc, argv);
  fs::path journal_dir = fs::path(data_dir) / "journal";

  if (*show || *streams) {
    scratch_dir scratch;
    if (scratch.path.empty())
      return fail("cannot create a scratch directory in " + fs::temp_directory_path().string());
    auto store = ferry::storage::open_journal_secondary(journal_dir, scratch.path);
    if (!store)
      return fail(store.error().message);
    if (*streams) {
      auto names = (*store)->list_streams(prefix);
      if (!names)
        return fail(names.error().message);
      for (const auto& n : *names) {
        auto head = (*store)->highest_sequence(n);
        std::printf("%s\t%llu\n", n.c_str(),
                    static_cast<unsigned long long>(head ? *head : 0));
      }
      return 0;
    }
    auto head = (*store)->highest_sequence(stream);
    if (!head)
      return fail(head.error().message);
    if (*head == 0)
      return fail("stream '" + stream + "' has no events (see `ferryctl events streams`)");
    uint64_t printed = 0;
    uint64_t next = from == 0 ? 1 : from;
    for (;;) {
      auto batch = (*store)->read_stream(stream, next, 512);
      if (!batch)
        return fail(batch.error().message);
      for (const auto& bytes : *batch) {
        auto e = ferry::schemas::verify_envelope(bytes);
        if (!e)
          return fail(stream + " seq " + std::to_string(next) + ": " + e.error().message);
        if (as_json)
          std::printf("%s\n", ferry::schemas::to_json(**e)
                                .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                                .c_str());
        else
          std::printf("%s\n", ferry::schemas::to_text(**e).c_str());
        next = (*e)->sequence() + 1;
        if (limit && ++printed >= limit)
          return 0;
      }
      if (batch->size() < 512)
        break;
    }
    return 0;
  }

  if (*create) {
    auto store = ferry::storage::open_journal({journal_dir, true});
    if (!store)
      return fail(store.error().message +
                  "\n(while ferryd runs, create tokens through its API: POST /api/v1/tokens "
                  "with an admin token, see the README)");
    auto reg = ferry::gateway::token_registry::load(**store);
    if (!reg)
      return fail(reg.error().message);
    auto secret = (*reg)->create(name, admin);
    if (!secret)
      return fail(secret.error().message);
    std::printf("%s\n", secret->c_str());
    return 0;
  }
  return 0;
}
