#pragma once
// Functions shared by the journal's translation units. Private to ferry_storage.

#include <functional>
#include <string_view>

#include <rocksdb/db.h>

#include "ferry/schemas/result.h"
#include "ferry/storage/journal.h"

namespace ferry::storage::detail {

/// Converts a RocksDB status to an error with context ("<what> <object>: <status>").
error_info db_error(std::string_view what, std::string_view object, const rocksdb::Status& s);

/// Checks hash chains and records of one stream, or of all streams plus the global index when
/// `stream` is empty (journal_verify.cpp).
/// Reads through `base` (its snapshot, if any, is the point in time checked).
result<verify_report> verify_journal(rocksdb::DB& db, const rocksdb::ReadOptions& base,
                                     std::string_view stream,
                                     const std::function<void(uint64_t)>& progress);

}  // namespace ferry::storage::detail
