#include "rocks_baseline.h"

#include <cstdio>
#include <memory>
#include <vector>

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/version.h>
#include <rocksdb/write_batch.h>

namespace ferry::bench {

namespace fs = std::filesystem;

namespace {

rocksdb::Options baseline_options() {
  rocksdb::Options o;
  o.create_if_missing = true;
  return o;
}

std::string open_db(const fs::path& dir, std::unique_ptr<rocksdb::DB>& db) {
  rocksdb::DB* raw = nullptr;
  auto s = rocksdb::DB::Open(baseline_options(), dir.string(), &raw);
  if (!s.ok())
    return "rocksdb open " + dir.string() + ": " + s.ToString();
  db.reset(raw);
  return {};
}

/// A key shaped like a journal event key: 'e', a stream-like name, NUL, big-endian sequence.
std::string event_key(int writer, uint64_t seq) {
  char name[32];
  int n = std::snprintf(name, sizeof name, "etask-b-%04d", writer);
  std::string k(name, static_cast<size_t>(n));
  k.push_back('\0');
  for (int i = 7; i >= 0; --i)
    k.push_back(static_cast<char>((seq >> (i * 8)) & 0xff));
  return k;
}

std::string make_value(size_t bytes, int writer, uint64_t seq) {
  std::string v(bytes, '\0');
  fill_payload(v.data(), v.size(), (static_cast<uint64_t>(writer) << 40) ^ seq);
  return v;
}

}  // namespace

throughput rocks_write_loop(const fs::path& dir, int threads, bool sync, size_t value_bytes,
                            const phase_timing& timing) {
  std::unique_ptr<rocksdb::DB> db;
  if (auto e = open_db(dir, db); !e.empty())
    return throughput::failure(e);
  rocksdb::WriteOptions wo;
  wo.sync = sync;
  std::vector<uint64_t> next(static_cast<size_t>(threads), 0);
  auto out = run_closed_loop_threads(threads, timing, [&](int i) -> std::string {
    uint64_t seq = ++next[static_cast<size_t>(i)];
    rocksdb::WriteBatch batch;
    batch.Put(event_key(i, seq), make_value(value_bytes, i, seq));
    auto s = db->Write(wo, &batch);
    if (!s.ok())
      return "rocksdb write: " + s.ToString();
    return {};
  });
  if (auto s = db->Close(); !s.ok() && out.error.empty())
    out.error = "rocksdb close: " + s.ToString();
  return out;
}

scan_result rocks_scan(const fs::path& dir, uint64_t values, size_t value_bytes) {
  scan_result out;
  std::unique_ptr<rocksdb::DB> db;
  if (auto e = open_db(dir, db); !e.empty()) {
    out.error = e;
    return out;
  }
  {
    auto start = phase_probe::take(0);
    rocksdb::WriteOptions wo;
    for (uint64_t written = 0; written < values;) {
      rocksdb::WriteBatch batch;
      for (uint64_t k = 0; k < 1000 && written < values; ++k) {
        ++written;
        batch.Put(event_key(0, written), make_value(value_bytes, 0, written));
      }
      if (auto s = db->Write(wo, &batch); !s.ok()) {
        out.error = "rocksdb write: " + s.ToString();
        return out;
      }
    }
    if (auto s = db->Flush(rocksdb::FlushOptions()); !s.ok()) {
      out.error = "rocksdb flush: " + s.ToString();
      return out;
    }
    out.fill = phase_probe::take(values).since(start);
  }
  uint64_t checksum = 0;
  auto scan = [&]() -> uint64_t {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    uint64_t n = 0;
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      checksum += it->value().size() + static_cast<uint8_t>(it->key()[it->key().size() - 1]);
      ++n;
    }
    if (!it->status().ok() && out.error.empty())
      out.error = "rocksdb iterator: " + it->status().ToString();
    return n;
  };
  scan();  // warm-up pass
  auto start = phase_probe::take(0);
  uint64_t n = scan();
  out.scan = phase_probe::take(n).since(start);
  if (n != values && out.error.empty())
    out.error = "scan returned " + std::to_string(n) + " values, expected " +
                std::to_string(values);
  if (checksum == 0 && out.error.empty())
    out.error = "scan read nothing";
  db->Close().PermitUncheckedError();
  return out;
}

std::string rocksdb_version() {
  return std::to_string(ROCKSDB_MAJOR) + "." + std::to_string(ROCKSDB_MINOR) + "." +
         std::to_string(ROCKSDB_PATCH);
}

}  // namespace ferry::bench
