#pragma once
// ferry-init's state machine: the commands, their output, the host connection and the protocol
// of schemas/init.fbs. See main.cpp for the modes and README.md for the invariants.
//
// Threading: single-threaded; everything runs in run()'s poll loop. Signals arrive through a
// self-pipe.

#include <sys/resource.h>
#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <flatbuffers/flatbuffers.h>

#include "ferry/schemas/frame.h"
#include "ferry/schemas/handshake.h"
#include "ferry/schemas/init_generated.h"
#include "forwarder.h"
#include "session.h"
#include "spawn.h"

namespace ferry_init {

namespace v1 = ferry::init::v1;

inline constexpr uint64_t default_linger_ms = 600'000;
inline constexpr uint64_t default_buffer_bytes = 8u << 20;
inline constexpr int exit_gave_up = 3;  // lingered without a host
/// ferry-init's own environment variable carrying the sandbox's egress credential: put into the
/// proxy URLs as `ferry:<token>@`, never passed to commands under its own name.
inline constexpr char egress_token_prefix[] = "FERRY_EGRESS_TOKEN=";

struct arguments {
  uint32_t command_id = 1;   // id of the command line's command
  std::string listen;        // empty: stdio mode
  uint64_t linger_ms = default_linger_ms;
  uint64_t buffer_bytes = default_buffer_bytes;
  std::string workspace = "/workspace";
  std::string state_dir = "/tmp/.ferry-init";
  std::string shell = "/bin/bash";
  std::string proxy_socket;  // empty: no HTTP forwarder
  uint16_t proxy_port = 3128;
  std::string ripgrep = "/usr/bin/rg";  // grep's engine when executable (file_ops.h)
  uint64_t file_op_timeout_ms = 30000;  // a file operation's child is killed after it
  bool file_op = false;                 // --file-op: one file operation, stdin to stdout
  std::string self;                     // this binary, for --file-op children (/proc/self/exe)
  std::vector<std::string> argv;  // the command line (may be empty in socket mode)
  /// Socket mode: the sandbox's key, read from stdin at start (never from argv or env).
  ferry::wire::handshake_key key{};
};

/// What a command wrote to one stream: the kept chunks, contiguous up to `end`.
struct stream_buffer {
  struct chunk {
    uint64_t seq;  // order of reads across every stream of every command
    uint64_t offset;
    std::string data;
    uint64_t end() const { return offset + data.size(); }
  };
  std::deque<chunk> chunks;
  uint64_t end = 0;                  // bytes the command wrote to the stream so far
  uint64_t kept = 0;                 // bytes kept, plus an overhead per chunk
  uint64_t send_end = UINT64_MAX;    // truncation point: bytes from here on are never sent
  int fd = -1;                       // read end of the pipe (or the pty master); -1 at EOF

  uint64_t first_kept() const { return chunks.empty() ? std::min(end, send_end) : chunks.front().offset; }
  uint64_t sendable_end() const { return std::min(end, send_end); }
  /// The chunk holding byte `offset` (first_kept() <= offset < sendable_end()).
  const chunk& chunk_at(uint64_t offset) const;
};

/// Where the attached host is in one command's story.
struct command_view {
  bool visible = false;  // the attached host gets this command's story
  bool started_sent = false;
  uint64_t cursor[2] = {0, 0};          // next byte of each stream to send
  std::optional<uint64_t> gap_lost[2];  // OutputGap to send before the stream's Output
  bool truncated_sent = false;
  bool exited_sent = false;
};

struct command {
  enum class phase { pending, running, done };

  uint32_t id = 0;
  phase state = phase::pending;
  bool command_line = false;  // the sandbox's command line (protocol 2 behaviour)
  std::vector<std::string> reported_argv;
  std::string session;
  bool pty = false;
  pid_t pid = -1;
  uint64_t started_at = 0;
  uint64_t deadline = 0;        // timeout; 0 = none
  uint64_t drain_deadline = 0;  // after a kill (or for a pty): stop waiting for EOF from leftovers
  stream_buffer streams[2];

  int stdin_fd = -1;
  std::string stdin_pending;
  bool stdin_close = false;  // close (or send EOF) once stdin_pending is written

  bool reaped = false;
  int exit_code = -1, term_signal = 0;
  rusage usage{};
  uint64_t duration_ms = 0;
  bool timed_out = false, host_signalled = false;

  uint64_t output_limit = 0;  // 0 = none
  uint64_t sendable_total = 0;  // bytes of both streams kept for sending (≤ output_limit)
  bool truncated = false;
  int file_fd = -1;             // the complete-output file, once opened
  std::string file_path;        // where it is (or would be)
  bool file_failed = false;

  std::optional<session_files> session_state;
  uint64_t finished_order = 0;
  command_view view;

  uint64_t total_bytes() const { return streams[0].end + streams[1].end; }
};

/// A file operation in progress: a `ferry-init --file-op` child with the request on its stdin.
struct file_op_child {
  uint32_t request_id = 0;
  pid_t pid = -1;        // also its process group
  int in_fd = -1, out_fd = -1, err_fd = -1;
  std::string in_pending;  // the request frame, not yet written
  std::string out;         // its answer frame so far
  std::string err;         // its diagnostics (the first 4 KiB)
  uint64_t deadline = 0;
  uint64_t host_generation = 0;  // the host that asked: only that one gets the answer
  bool reaped = false;
  int status = 0;
  bool timed_out = false, too_large = false;
};

/// One host connection (socket mode), or fd 1 (stdio mode).
struct connection {
  int fd = -1;
  bool stdio = false;
  bool attached = false;  // a valid Attach received (always in stdio mode)
  uint64_t attach_deadline = 0;
  ferry::wire::handshake_nonce nonce{};  // sent in Hello: the host's proof must cover it
  ferry::wire::frame_decoder decoder;
  std::string out;  // frames not yet written (socket mode)
};

class init_process {
 public:
  explicit init_process(arguments args);
  ~init_process();
  init_process(const init_process&) = delete;
  init_process& operator=(const init_process&) = delete;

  /// Runs until the host releases the sandbox (0), the channel fails, or ferry-init gives up.
  int run();

 private:
  // --- frames ---
  template <class T>
  void send(connection& c, v1::Message type, flatbuffers::Offset<T> body);
  void send_hello(connection& c);
  void send_error(connection& c, const std::string& message);
  void send_command_error(uint32_t id, v1::CommandErrorCode code, const std::string& message);
  void flush(connection& c);
  void drop(connection& c, const std::string& why);
  /// A protocol error by the host: Error, then the connection is closed.
  void refuse(const std::string& why);

  // --- commands ---
  command* find(uint32_t id);
  size_t running_count() const;
  bool start(command& cmd, const spawn_request& req, spawn_failure& why);
  void read_stream(command& cmd, int stream);
  /// Reads what the streams hold right now (non-blocking) and closes them.
  void drain_now(command& cmd);
  void keep_output(command& cmd, int stream, const char* data, size_t n);
  void open_output_file(command& cmd);
  void write_output_file(command& cmd, const char* data, size_t n);
  void write_stdin(command& cmd);
  void reap_children();
  void check_done(command& cmd);
  void finish(command& cmd);
  void evict(command& cmd, int stream);
  void retain();
  void forget(uint32_t id);
  void signal_running(int sig, bool from_host);
  void kill_everything();
  /// Timeouts and drains due at `now`; lowers `timeout_ms` to the next one.
  void check_deadlines(uint64_t now, int& timeout_ms);
  std::vector<std::string> command_environment(const std::vector<std::string>& extra, bool pty) const;

  // --- host connections ---
  void accept_host();
  void read_host();
  void on_host_message(const v1::InitMessage& m);
  void on_attach(const v1::Attach& a);
  void on_run(const v1::Run& r);
  void on_signal(const v1::Signal& s);
  void on_stdin(const v1::Stdin& s);
  void on_file_request(const v1::FileRequest& r, std::string frame);
  void on_egress_token(const v1::EgressToken& t);
  /// The proxy variables (HTTP_PROXY… with the current egress token) into base_env_ and
  /// proxy_env_.
  void set_proxy_env();
  void send_file_error(uint32_t request_id, v1::FileErrorCode code, const std::string& message);
  void read_file_op(file_op_child& op, int& fd, std::string& into, size_t cap);
  void write_file_op(file_op_child& op);
  void check_file_op(file_op_child& op);
  void pump(connection& c);
  void show_to_host(command& cmd, uint64_t from_out, uint64_t from_err);
  int release();

  arguments args_;
  flatbuffers::FlatBufferBuilder fbb_;
  std::vector<std::string> base_env_;  // ferry-init's environment plus the proxy variables
  std::string egress_token_;           // from FERRY_EGRESS_TOKEN (removed from base_env_), or renewed
  std::vector<std::string> proxy_env_;  // the proxy variables alone (re-exported in sessions)

  std::map<uint32_t, std::unique_ptr<command>> commands_;
  std::map<uint32_t, file_op_child> file_ops_;  // by request id
  uint64_t host_generation_ = 0;              // bumped by every accepted Attach
  std::map<pid_t, uint32_t> pids_;            // running commands' processes
  std::set<std::string> busy_sessions_;
  std::deque<uint32_t> finished_;             // done commands, oldest first
  uint64_t finished_counter_ = 0;
  uint64_t seq_ = 0;                          // last chunk sequence number handed out
  std::vector<char> read_buf_;

  int listen_fd_ = -1;
  connection conn_;  // fd < 0 when no host is connected
  connection retired_;  // the last dropped connection, freed at the top of the loop
  bool released_ = false;
  std::optional<uint64_t> idle_since_;  // no host and no running command since
  http_forwarder forwarder_;
};

}  // namespace ferry_init
