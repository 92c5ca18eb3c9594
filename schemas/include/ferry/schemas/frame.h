#pragma once
// Length-prefixed framing for the ferry-init wire protocol (see schemas/init.fbs).
// Header-only: used by ferry-init inside the sandbox and by the host side.
//
// Threading: frame_decoder is single-threaded (owned by one reader).

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <flatbuffers/flatbuffers.h>

#include "ferry/schemas/init_generated.h"

namespace ferry::wire {

/// Largest frame either side accepts; anything longer is a protocol error.
inline constexpr uint32_t max_frame_size = 1u << 20;

/// Largest output chunk ferry-init puts in one frame.
inline constexpr size_t max_output_chunk = 64u * 1024;

/// Hello.protocol in stdio mode (one-way, on ferry-init's stdout).
inline constexpr uint16_t stdio_protocol = 1;
/// Hello.protocol / Attach.protocol in socket mode (re-attachable process API; see init.fbs).
/// 2 was the one-command protocol before Run/Signal, 3 the process API before the authenticated
/// handshake; both sides refuse any other version.
inline constexpr uint16_t socket_protocol = 4;

/// Finishes `fbb` with an InitMessage carrying `body` (of union type `type`) and appends its
/// frame to `out`. `fbb` must hold only `body` and what it refers to.
template <class T>
inline void append_message(std::string& out, flatbuffers::FlatBufferBuilder& fbb,
                           ferry::init::v1::Message type, flatbuffers::Offset<T> body) {
  auto msg = ferry::init::v1::CreateInitMessage(fbb, type, body.Union());
  ferry::init::v1::FinishInitMessageBuffer(fbb, msg);
  uint32_t n = fbb.GetSize();
  unsigned char len[4] = {static_cast<unsigned char>(n), static_cast<unsigned char>(n >> 8),
                          static_cast<unsigned char>(n >> 16), static_cast<unsigned char>(n >> 24)};
  out.append(reinterpret_cast<const char*>(len), 4);
  out.append(reinterpret_cast<const char*>(fbb.GetBufferPointer()), n);
}

/// Appends the frame for a finished builder to `out`.
inline void append_frame(std::string& out, const flatbuffers::FlatBufferBuilder& fbb) {
  uint32_t n = fbb.GetSize();
  unsigned char len[4] = {static_cast<unsigned char>(n), static_cast<unsigned char>(n >> 8),
                          static_cast<unsigned char>(n >> 16), static_cast<unsigned char>(n >> 24)};
  out.append(reinterpret_cast<const char*>(len), 4);
  out.append(reinterpret_cast<const char*>(fbb.GetBufferPointer()), n);
}

/// Incremental decoder: feed bytes as they arrive, take verified messages out.
class frame_decoder {
 public:
  enum class status { need_more, message, error };

  void feed(const char* data, size_t n) { buf_.insert(buf_.end(), data, data + n); }

  /// Takes the next complete frame. On `message`, `msg()` points into the decoder's aligned copy and
  /// stays valid until the next call to `next()`. On `error`, `error_message()` says
  /// why; the stream cannot be resumed.
  status next() {
    if (failed_)
      return status::error;
    // Consumed frames only advance an offset; the buffer is compacted once per refill (when a
    // frame is incomplete), not once per frame, so a read holding many small frames costs one
    // move, not one per frame.
    start_ += consumed_;
    consumed_ = 0;
    current_ = nullptr;
    size_t avail = buf_.size() - start_;
    if (avail < 4)
      return need_more();
    auto byte = [&](size_t i) {
      return static_cast<uint32_t>(static_cast<uint8_t>(buf_[start_ + i]));
    };
    uint32_t n = byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24;
    if (n == 0 || n > max_frame_size)
      return fail("frame length " + std::to_string(n) + " outside 1.." +
                  std::to_string(max_frame_size));
    if (avail < 4 + static_cast<size_t>(n))
      return need_more();
    // The frame sits at an arbitrary offset; FlatBuffers needs 8-byte alignment for its 64-bit
    // scalars, so verify and read an aligned copy.
    aligned_.resize((n + 7) / 8);
    std::memcpy(aligned_.data(), buf_.data() + start_ + 4, n);
    const auto* p = reinterpret_cast<const uint8_t*>(aligned_.data());
    flatbuffers::Verifier verifier(p, n);
    if (!ferry::init::v1::VerifyInitMessageBuffer(verifier))
      return fail("frame of " + std::to_string(n) + " bytes failed FlatBuffers verification");
    current_ = ferry::init::v1::GetInitMessage(p);
    if (current_->message_type() == ferry::init::v1::Message::NONE)
      return fail("frame carries no message");
    consumed_ = 4 + n;
    return status::message;
  }

  const ferry::init::v1::InitMessage* msg() const { return current_; }
  /// The current message's frame as it came (length prefix and payload), valid like msg(): for
  /// passing a verified request on unchanged.
  std::string frame() const {
    std::string out;
    if (!current_)
      return out;
    const uint32_t n = static_cast<uint32_t>(consumed_ - 4);
    const unsigned char len[4] = {static_cast<unsigned char>(n), static_cast<unsigned char>(n >> 8),
                                  static_cast<unsigned char>(n >> 16), static_cast<unsigned char>(n >> 24)};
    out.append(reinterpret_cast<const char*>(len), 4);
    out.append(reinterpret_cast<const char*>(aligned_.data()), n);
    return out;
  }
  const std::string& error_message() const { return error_; }
  /// Bytes buffered but not yet consumed (a partial frame at end of stream is a protocol error).
  size_t pending() const { return buf_.size() - start_ - consumed_; }

 private:
  status need_more() {
    if (start_ > 0) {
      buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(start_));
      start_ = 0;
    }
    return status::need_more;
  }

  status fail(std::string why) {
    failed_ = true;
    error_ = std::move(why);
    return status::error;
  }

  std::vector<char> buf_;
  std::vector<uint64_t> aligned_;
  size_t start_ = 0;     // first byte not yet handed out
  size_t consumed_ = 0;  // size of the frame msg() points at, consumed by the next next()
  const ferry::init::v1::InitMessage* current_ = nullptr;
  bool failed_ = false;
  std::string error_;
};

}  // namespace ferry::wire
