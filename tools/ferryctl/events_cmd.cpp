// ferryctl events streams | show | tail: listing streams, printing one stream, following the
// global log.

#include <chrono>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "ctl.h"
#include "ferry/schemas/events.h"

namespace ferry::ctl {

namespace {

namespace ev = ferry::events::v1;

/// Prints one event; false once output failed.
bool print_event(const ev::Envelope& e, bool json, bool with_stream) {
  if (json)
    return emit(schemas::to_json(e).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (with_stream)
    return emit(std::to_string(e.position()) + "  " +
                (e.stream_id() ? e.stream_id()->str() : "") + "  " + schemas::to_text(e));
  return emit(schemas::to_text(e));
}

}  // namespace

int run_streams(const std::filesystem::path& data_dir, const streams_args& a) {
  if (a.kind.find('-') != std::string::npos)
    return fail(exit_usage, "--kind takes a kind such as task, session, sandbox, user or "
                            "tokens, not '" + a.kind + "' (use --prefix for a raw prefix)");
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();
  auto names = store.list_streams(a.kind.empty() ? a.prefix : a.kind);
  if (!names)
    return fail(names.error());
  if (!a.json)
    emit("STREAM\tHIGHEST\tDELETED_TO");
  for (const auto& name : *names) {
    // --kind task: `task-…` and a bare `task`, not `tasks` or `taskforce-…`.
    if (!a.kind.empty() && name != a.kind && name.compare(0, a.kind.size() + 1, a.kind + "-") != 0)
      continue;
    auto info = store.info(name);
    if (!info)
      return fail(info.error());
    const bool printed =
      a.json ? emit(nlohmann::json{{"stream", name},
                                   {"highest_sequence", info->highest_sequence},
                                   {"deleted_to", info->deleted_to},
                                   {"head_hash", storage::to_hex(info->head_hash)}}
                      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace))
             : emit(name + "\t" + std::to_string(info->highest_sequence) + "\t" +
                    std::to_string(info->deleted_to));
    if (!printed || should_stop())
      break;
  }
  if (int code = early_stop_exit_code(); code >= 0)
    return code;
  return exit_ok;
}

int run_show(const std::filesystem::path& data_dir, const show_args& a) {
  if (a.to < a.from)
    return fail(exit_usage, "--to " + std::to_string(a.to) + " is before --from " +
                              std::to_string(a.from));
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();
  auto info = store.info(a.stream);
  if (!info)
    return fail(info.error());
  if (info->highest_sequence == 0)
    return fail(exit_stream_not_found,
                "no stream '" + a.stream + "' (see `ferryctl events streams`)");
  if (a.from <= info->deleted_to)
    std::fprintf(stderr, "ferryctl: note: events 1..%llu of %s were deleted (retention)\n",
                 static_cast<unsigned long long>(info->deleted_to), a.stream.c_str());
  if (a.from > info->highest_sequence)
    std::fprintf(stderr, "ferryctl: note: %s ends at sequence %llu\n", a.stream.c_str(),
                 static_cast<unsigned long long>(info->highest_sequence));
  storage::read_range range{a.from, a.to, a.limit ? a.limit : storage::read_range{}.max_count};
  // for_each streams: one event at a time, however long the stream.
  auto visited = store.for_each(a.stream, range, [&](const ev::Envelope& e, std::string_view) {
    return print_event(e, a.json, false) && !should_stop();
  });
  if (int code = early_stop_exit_code(); code >= 0)
    return code;
  if (!visited)
    return fail(visited.error());
  return exit_ok;
}

int run_tail(const std::filesystem::path& data_dir, const tail_args& a) {
  auto reader = journal_reader::open(data_dir);
  if (!reader)
    return fail(reader.error());
  auto& store = (*reader)->store();

  if (!a.follow) {
    // What the journal held when it was opened (the secondary does not catch up meanwhile).
    constexpr uint64_t batch_size = 512;
    uint64_t next = a.from_position;
    for (;;) {
      auto batch = store.read_all(next, batch_size);
      if (!batch)
        return fail(batch.error());
      for (const auto& bytes : *batch) {
        auto e = schemas::verify_envelope(bytes);
        if (!e)
          return fail(exit_corrupt, "global log after position " + std::to_string(next - 1) +
                                      ": " + e.error().message);
        if (!print_event(**e, a.json, true) || should_stop())
          return early_stop_exit_code();
        next = (*e)->position() + 1;
      }
      if (batch->empty())
        return exit_ok;
    }
  }

  // Catch up from disk, then live: the subscription polls the primary (ferryd) for new appends.
  auto sub = store.subscribe(a.from_position);
  constexpr auto poll = std::chrono::milliseconds(100);  // bounds the reaction to a signal
  while (!should_stop()) {
    auto batch = sub->next(512, poll);
    if (!batch) {
      if (stop_signal)
        break;
      return fail(batch.error());
    }
    for (const auto& bytes : *batch) {
      auto e = schemas::verify_envelope(bytes);
      if (!e)
        return fail(exit_corrupt, "global log after position " +
                                    std::to_string(sub->position()) + ": " + e.error().message);
      if (!print_event(**e, a.json, true))
        break;
    }
    if (!batch->empty())
      flush_stdout();  // a reader on a pipe sees each batch as it arrives
  }
  sub->close();
  // SIGINT/SIGTERM is how --follow ends: that is success. A closed stdout is not.
  if (stop_signal)
    return exit_ok;
  return early_stop_exit_code();
}

}  // namespace ferry::ctl
