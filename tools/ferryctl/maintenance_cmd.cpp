// ferryctl verify (hash chains and verifier over the journal) and token create (the one
// writing command).

#include <unistd.h>

#include <chrono>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "ctl.h"
#include "ferry/gateway/tokens.h"

namespace ferry::ctl {

int run_verify(const std::filesystem::path& data_dir, const verify_args& a) {
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();
  if (!a.stream.empty()) {
    auto info = store.info(a.stream);
    if (!info)
      return fail(info.error());
    if (info->highest_sequence == 0)
      return fail(exit_stream_not_found,
                  "no stream '" + a.stream + "' (see `ferryctl events streams`)");
  }

  // Progress at most once a second: a small store finishes before the first line.
  using clock = std::chrono::steady_clock;
  const bool tty = isatty(STDERR_FILENO);
  auto last_report = clock::now();
  bool reported = false;
  auto progress = [&](uint64_t checked) {
    auto now = clock::now();
    if (now - last_report < std::chrono::seconds(1))
      return;
    last_report = now;
    reported = true;
    std::fprintf(stderr, tty ? "\rferryctl: verify: %llu events checked…" :
                               "ferryctl: verify: %llu events checked…\n",
                 static_cast<unsigned long long>(checked));
  };
  auto report = store.verify(a.stream, progress);
  if (reported && tty)
    std::fprintf(stderr, "\n");
  if (!report)
    return fail(report.error());

  const int code = report->problems.empty() ? exit_ok : exit_problems;
  if (a.json) {
    nlohmann::json problems = nlohmann::json::array();
    for (const auto& p : report->problems)
      problems.push_back({{"stream", p.stream},
                          {"seq", p.sequence},
                          {"position", p.position},
                          {"reason", p.reason}});
    nlohmann::json out{{"ok", code == exit_ok},
                       {"streams_checked", report->streams_checked},
                       {"events_checked", report->events_checked},
                       {"problems", std::move(problems)}};
    std::printf("%s\n",
                out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return code;
  }
  std::printf("checked %llu streams, %llu events: %s\n",
              static_cast<unsigned long long>(report->streams_checked),
              static_cast<unsigned long long>(report->events_checked),
              code == exit_ok ? "ok"
                              : (std::to_string(report->problems.size()) + " problem(s)").c_str());
  for (const auto& p : report->problems)
    std::printf("problem: %s seq %llu position %s: %s\n", p.stream.c_str(),
                static_cast<unsigned long long>(p.sequence),
                p.position ? std::to_string(p.position).c_str() : "unknown", p.reason.c_str());
  return code;
}

int run_token_create(const std::filesystem::path& data_dir, const token_create_args& a) {
  // A missing data directory is an error (a typo must not mint a token into a new, unused store);
  // a data directory without a journal yet gets one, so tokens can be provisioned before
  // ferryd's first start.
  auto dir = journal_dir(data_dir, /*may_be_missing=*/true);
  if (!dir)
    return fail(dir.error());
  storage::journal_options opts;
  opts.dir = *dir;
  opts.durability = storage::durability::fsync;
  opts.create_if_missing = true;
  auto store = storage::open_journal(opts);
  if (!store) {
    if (store.error().code == errc::busy)
      return fail(exit_locked,
                  store.error().message +
                    "\n(ferryd runs on this data directory: create tokens through its API, "
                    "POST /api/v1/tokens with an admin token, see the README)");
    return fail(store.error());
  }
  auto reg = gateway::token_registry::load(**store);
  if (!reg)
    return fail(reg.error(), "loading tokens");
  auto secret = (*reg)->create(a.name, a.admin);
  if (!secret)
    return fail(secret.error(), "creating the token");
  std::printf("%s\n", secret->c_str());
  return exit_ok;
}

}  // namespace ferry::ctl
