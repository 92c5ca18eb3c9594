#pragma once
// The journal's on-disk layout (one RocksDB column family, byte-ordered keys). Private to
// ferry_storage; tests that tamper with records document the same layout.
//
//   'e' stream '\0' be64(seq)     → envelope bytes as stored (hash-chained)
//   'g' be64(position)            → stream '\0' be64(seq) hash   (global order index; `hash` is
//                                   the SHA-256 of the event's stored bytes, recorded at append)
//   'h' stream                    → stream_record: be64 deleted_to, anchor hash
//   'i' stream '\0' event_id      → be64(seq) be64(position)        (idempotency index)
//   's' stream '\0' be64(seq)     → be64(timestamp_ns) snapshot bytes
//   'p'                           → be64(last position)
//   'f'                           → format marker (format_marker)
//
// A stream's highest sequence is the key of its last 'e' record, or deleted_to when retention
// deleted them all; its head hash is the hash recorded for its last event. So an append writes
// only keys that grow in order (per stream, and globally for 'g'): the memtable inserts them at
// a remembered position instead of searching (see insert_hint_prefix). The 'h' record is written
// when a stream is created and when events are deleted.
//
// Stream names never contain '\0' (validate_stream_name), so `stream '\0'` is a prefix of one
// stream's keys only; big-endian numbers make byte order equal numeric order.

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "ferry/schemas/result.h"
#include "ferry/storage/journal.h"

namespace ferry::storage::detail {

inline constexpr std::string_view format_marker = "ferry-journal/3";
inline constexpr char last_position_key[] = "p";
inline constexpr char format_key[] = "f";

inline void put_be64(std::string& out, uint64_t v) {
  for (int i = 7; i >= 0; --i)
    out.push_back(static_cast<char>((v >> (i * 8)) & 0xff));
}

inline uint64_t get_be64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v = v << 8 | static_cast<uint8_t>(p[i]);
  return v;
}

/// 'e' stream '\0' — the prefix of every event key of `stream`.
inline std::string event_prefix(std::string_view stream) {
  std::string k;
  k.reserve(stream.size() + 10);
  k.push_back('e');
  k.append(stream);
  k.push_back('\0');
  return k;
}

inline std::string event_key(std::string_view stream, uint64_t seq) {
  auto k = event_prefix(stream);
  put_be64(k, seq);
  return k;
}

inline std::string head_key(std::string_view stream) {
  std::string k("h");
  k.append(stream);
  return k;
}

inline std::string global_key(uint64_t position) {
  std::string k("g");
  put_be64(k, position);
  return k;
}

inline std::string id_key(std::string_view stream, std::string_view event_id) {
  std::string k("i");
  k.append(stream);
  k.push_back('\0');
  k.append(event_id);
  return k;
}

inline std::string snapshot_prefix(std::string_view stream) {
  std::string k("s");
  k.append(stream);
  k.push_back('\0');
  return k;
}

inline std::string snapshot_key(std::string_view stream, uint64_t seq) {
  auto k = snapshot_prefix(stream);
  put_be64(k, seq);
  return k;
}

/// The value of an 'h' key: the stream exists; retention state.
struct stream_record {
  /// Events 1..deleted_to were deleted.
  uint64_t deleted_to = 0;
  /// Hash of the stored bytes of event `deleted_to` (what the first retained event links to).
  digest anchor_hash{};

  static constexpr size_t encoded_size = 8 + sizeof(digest);

  std::string encode() const {
    std::string v;
    v.reserve(encoded_size);
    put_be64(v, deleted_to);
    v.append(reinterpret_cast<const char*>(anchor_hash.data()), anchor_hash.size());
    return v;
  }

  static result<stream_record> decode(std::string_view stream, std::string_view v) {
    if (v.size() != encoded_size)
      return fail(errc::corrupt, "stream record of " + std::string(stream) + " has " +
                                   std::to_string(v.size()) + " bytes, expected " +
                                   std::to_string(encoded_size));
    stream_record r;
    r.deleted_to = get_be64(v.data());
    std::memcpy(r.anchor_hash.data(), v.data() + 8, r.anchor_hash.size());
    return r;
  }
};

/// A decoded 'g' value.
struct global_entry {
  std::string_view stream;
  uint64_t sequence = 0;
  digest hash{};

  static constexpr size_t fixed_size = 1 + 8 + sizeof(digest);

  static std::string encode(std::string_view stream, uint64_t seq, const digest& hash) {
    std::string v;
    v.reserve(stream.size() + fixed_size);
    v.append(stream);
    v.push_back('\0');
    put_be64(v, seq);
    v.append(reinterpret_cast<const char*>(hash.data()), hash.size());
    return v;
  }

  /// Empty optional when malformed.
  static std::optional<global_entry> decode(std::string_view v) {
    if (v.size() <= fixed_size || v[v.size() - fixed_size] != '\0')
      return std::nullopt;
    global_entry g;
    g.stream = v.substr(0, v.size() - fixed_size);
    g.sequence = get_be64(v.data() + v.size() - fixed_size + 1);
    std::memcpy(g.hash.data(), v.data() + v.size() - sizeof(digest), sizeof(digest));
    return g;
  }

  /// The 'e' key of the event this entry names.
  std::string event_key() const;
};

/// Stream names: 1..200 bytes of letters, digits, '-', '_' and '.'.
result<void> validate_stream_name(std::string_view stream);

/// SHA-256 of `bytes`.
digest sha256(std::string_view bytes);

inline std::string global_entry::event_key() const {
  return detail::event_key(stream, sequence);
}

}  // namespace ferry::storage::detail
