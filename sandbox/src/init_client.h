#pragma once
// The host side of ferry-init's protocol (schemas/init.fbs, socket mode) over one connected
// stream socket: the handshake (Hello's nonce, Attach with the host's proof of the sandbox's key
// and the resume points, Attached checked for ferry-init's proof), then frames both ways — the host's Run/Signal/Stdin/Release
// queued from any thread and written by the reader thread, ferry-init's frames checked against
// each command's state and offsets and delivered to the observer. Transport-agnostic, so every
// backend (runsc today, bubblewrap later) uses the same client; the backend owns the socket, the
// processes and the teardown.
//
// Threading: run(), signal(), write_stdin(), release() and close() from any thread (a mutex
// guards the outgoing queue). handshake() and serve() on one thread at a time (the reader),
// which alone calls the observer and reads the accessors below serve().

#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "ferry/sandbox/sandbox.h"
#include "ferry/schemas/frame.h"
#include "ferry/schemas/handshake.h"
#include "unique_fd.h"

namespace ferry::sandbox::detail {

class init_client {
 public:
  /// `resume`: what this host already has of each command (empty for a new sandbox).
  /// `command_line_id`: the sandbox's command line, if it has one: once it has exited, the
  /// client sends Release by itself (the sandbox ends with its command line).
  init_client(sandbox_observer& observer, std::span<const resume_point> resume, std::optional<uint32_t> command_line_id);

  /// Reads Hello (refusing another protocol), sends Attach with this host's proof of `key`, reads
  /// Attached and checks ferry-init's proof. errc::busy when another host is attached (or a
  /// connection that had not authenticated was superseded); errc::failed otherwise, and then
  /// peer_failed_authentication() says whether the peer claimed to be ferry-init without
  /// knowing the key. REQUIRES: reader thread.
  result<void> handshake(int fd, const wire::handshake_key& key, std::chrono::steady_clock::duration timeout);
  /// The handshake failed because the peer could not prove the key (a Hello of this protocol
  /// without a valid nonce, an Attached without the right proof, or another answer to Attach
  /// than Attached or Error): not ferry-init, so the sandbox is compromised.
  bool peer_failed_authentication() const { return peer_failed_auth_; }

  /// Delivers on_running and then every frame until ferry-init closes the connection (or it is
  /// shut down), a protocol error, or `stop()` holds. REQUIRES: handshake succeeded; reader thread.
  void serve(int fd, const std::function<bool()>& stop);

  // --- any thread ---
  result<void> run(const command_spec& spec);
  result<void> signal(uint32_t command_id, int signo, bool whole_group);
  result<void> write_stdin(uint32_t command_id, std::string_view data, bool close);
  result<void> release();
  /// Hands ferry-init a renewed egress credential (EgressToken).
  result<void> egress_token(const std::string& token);
  /// Refuses further requests (errc::closed): the sandbox is ending or was detached. File
  /// operations still waiting fail with errc::closed.
  void close();

  // --- file operations: any thread but the reader; each blocks until ferry-init answers ---
  result<file_text> read_file(const std::string& path, const read_options& options);
  result<file_written> write_file(const std::string& path, std::string_view content, uint32_t mode);
  result<file_edited> edit_file(const std::string& path, std::string_view old_string, std::string_view new_string,
                                bool replace_all);
  result<dir_listing> list_dir(const std::string& path, uint32_t max_entries);
  result<glob_matches> glob(const std::string& pattern, const glob_options& options);
  result<grep_matches> grep(const std::string& pattern, const grep_options& options);

  // --- reader thread, after serve() ---
  /// Why the connection is unusable: a bad frame, a message out of order, offsets that do not
  /// follow on, a write that failed.
  const std::optional<std::string>& protocol_error() const { return protocol_error_; }
  /// ferry-init's Error message, if it sent one.
  const std::optional<std::string>& init_error() const { return init_error_; }
  /// Release was written to ferry-init (it is ending the sandbox by itself).
  bool release_sent() const { return release_sent_; }
  /// The command line has exited (its Exited was delivered).
  bool command_line_exited() const { return command_line_exited_; }

 private:
  enum class phase { requested, resumed, running };
  struct command_state {
    phase state = phase::requested;
    uint64_t expected[2] = {0, 0};  // next offset of each stream
    bool truncated = false;
  };

  result<void> enqueue(std::string frame, bool is_release = false);
  /// One FileRequest: `build(fbb)` makes its op (returns the union type and offset); waits for the
  /// answer and returns its FileResponse frame (FileError becomes the error).
  struct file_op_body {
    ferry::init::v1::FileOp type;
    flatbuffers::Offset<void> offset;
  };
  result<std::string> file_request(const std::function<file_op_body(flatbuffers::FlatBufferBuilder&)>& build);
  /// file_request() for one operation: the reply of type `want` converted by `convert`.
  template <class Reply, class Out>
  result<Out> file_call(ferry::init::v1::FileOp op, ferry::init::v1::FileReply want,
                        const std::function<flatbuffers::Offset<void>(flatbuffers::FlatBufferBuilder&)>& build,
                        const std::function<Out(const Reply&)>& convert);
  /// A FileResponse or FileError from ferry-init: hands it to the waiting caller.
  void file_answer(uint32_t request_id, std::string frame);
  result<void> read_message(int fd, std::chrono::steady_clock::time_point deadline);
  bool write_pending(int fd);
  void drain();
  void dispatch(const ferry::init::v1::InitMessage& m);
  void violation(std::string why);
  bool check(bool ok, std::string_view what);
  /// The same, with the message built by `why()` only when the check fails: dispatch runs for
  /// every frame, and formatting each check's message for every Output frame that passes cost an
  /// allocation per check on every sandbox's reader thread.
  template <class Why>
    requires std::invocable<Why&>
  bool check(bool ok, Why&& why) {
    if (!ok)
      violation(why());
    return ok;
  }
  command_state* running(uint32_t id, std::string_view what);

  sandbox_observer& observer_;
  const std::optional<uint32_t> command_line_id_;
  std::vector<resume_point> resume_;

  // Reader thread.
  wire::frame_decoder decoder_;
  std::vector<char> buf_ = std::vector<char>(wire::max_output_chunk + 4096);
  std::map<uint32_t, command_state> commands_;  // requested by run(), resumed, or running
  std::optional<std::string> protocol_error_;
  std::optional<std::string> init_error_;
  bool release_sent_ = false;
  bool command_line_exited_ = false;
  bool peer_failed_auth_ = false;
  std::string writing_;  // the frames being written (taken from the queue)
  bool writing_release_ = false;

  // Any thread.
  std::mutex mu_;
  std::string queue_;          // REQUIRES: mu_. frames to write, in order
  bool queued_release_ = false;  // REQUIRES: mu_. Release is in queue_
  bool closed_ = false;        // REQUIRES: mu_
  bool releasing_ = false;     // REQUIRES: mu_. release() was called (or the command line ended)
  std::set<uint32_t> active_;  // REQUIRES: mu_. ids requested, resumed or running, not ended
  unique_fd wake_;             // eventfd: the queue has frames
  struct file_waiter {
    bool done = false;
    std::string frame;                  // the answer (FileResponse or FileError)
    std::optional<error_info> failure;  // no answer: the sandbox ended, or a timeout
  };
  uint32_t next_request_id_ = 1;                                // REQUIRES: mu_
  std::map<uint32_t, std::shared_ptr<file_waiter>> file_ops_;  // REQUIRES: mu_. waiting for an answer
  std::condition_variable file_cv_;                             // a file_waiter is done
};

}  // namespace ferry::sandbox::detail
