// ferry-init: PID 1 of every sandbox, and the agent's process API inside it.
//
//   ferry-init [--command-id N] [--listen PATH [--linger-ms N] [--buffer-bytes N]
//              [--workspace DIR] [--state-dir DIR] [--shell PATH] [--ripgrep PATH]
//              [--file-op-timeout-ms N]
//              [--proxy-socket PATH [--proxy-port N]]] [-- argv...]
//   ferry-init --file-op [--workspace DIR] [--ripgrep PATH]
//
// Speaks the framed protocol of schemas/init.fbs.
//
// stdio mode (no --listen; used to test ferry-init on the host): fd 1 is the channel, one-way,
// and argv is required. Hello, Started, Output*, Exited — or Error if it cannot do what it was
// asked (bad arguments, the command cannot be executed), after which it exits 1 without
// Started/Exited. A write to fd 1 that fails means the host is gone: the command is killed and
// ferry-init exits 1.
//
// socket mode (--listen PATH; every runsc sandbox): ferry-init listens on a unix socket in a
// directory bind-mounted from the host, so the sandbox does not depend on any host process.
// The sandbox's key (64 hex digits) comes on stdin, which is read to EOF at start and then
// replaced by /dev/null. Each connection gets Hello (a fresh nonce), then must send an Attach
// that proves the key (HMAC over both nonces; see schemas/include/ferry/schemas/handshake.h)
// within 2 s, and gets Attached with ferry-init's own proof; the first Attach starts the
// command line (argv), if any, as
// command --command-id. The host then runs commands (Run), signals them (Signal), feeds their
// stdin (Stdin) and ends the sandbox (Release). ferry-init reports each command's Started,
// Output/OutputGap from the resume offsets, OutputTruncated, Exited — or CommandError. One host
// at a time.
//
// Output buffering (socket mode): each stream of each command keeps at least the last
// --buffer-bytes bytes (default 8 MiB; at most one 64 KiB chunk more) as chunks tagged with
// their stream offset and a sequence number, so a host can resume from any kept offset and the
// streams are replayed in the order they were read.
// - While a host is attached: backpressure. A stream is not read while the host has
//   --buffer-bytes of it unsent; the command then blocks on write, as it would on a full pipe.
//   Bytes already sent are dropped oldest-first beyond --buffer-bytes.
// - While no host is attached: the commands are drained anyway and the oldest bytes are
//   dropped. A host resuming from a dropped offset gets OutputGap for them first: never a silent
//   loss.
// - Run.output_limit_bytes (default 1 MiB): past it a command's output is no longer kept or sent,
//   only written to <workspace>/.ferry/output/<id>.log (which then holds all of it).
// - Ended commands are kept for a re-attaching host until it says it has their Exited, within
//   bounds (1024 commands, 4 × --buffer-bytes of their output, oldest first).
// - No command running and no host connected for --linger-ms (default 10 minutes): ferry-init
//   gives up, kills what is left and exits 3.
//
// File operations (FileRequest): each runs in a child, this binary started with --file-op, which
// reads the request frame on stdin and writes the answer frame on stdout (file_ops.h).
//
// The HTTP forwarder (--proxy-socket): 127.0.0.1:--proxy-port (default 3128) relayed to the unix
// socket; every command gets HTTP_PROXY, HTTPS_PROXY (and lower-case) pointing at it, and
// NO_PROXY=localhost,127.0.0.1. The host gives ferry-init the sandbox's egress credential in
// FERRY_EGRESS_TOKEN: it goes into those URLs (http://ferry:<token>@127.0.0.1:3128), which is how
// the proxy knows a request is this sandbox's; the variable itself is not passed on.
//
// Invariants:
// - In stdio mode only frames are written to fd 1; ferry-init's diagnostics always go to fd 2.
//   Commands never see ferry-init's fds (their stdio are pipes or a pty relayed as Output).
// - Exited is sent only after the command has been reaped, both its streams reached EOF (or,
//   after a timeout or a host's signal, 1 s passed with the process reaped: leftovers that left
//   its group may hold them) and every kept byte from the host's resume point on has been sent.
// - Every child is reaped: as PID 1 (or a child subreaper on a host) ferry-init inherits orphans.
//
// Trust: this runs inside the sandbox, next to the untrusted commands (same uid). It shares
// nothing with host code but the wire schema, is linked statically, and is built without
// sanitizers (libcrypto is linked in statically for the handshake's HMAC). In socket mode it
// makes itself non-dumpable before it reads the key, so the commands (same uid) can neither read
// its memory nor its fds through /proc; the key is never in its argv or environment, and its
// stdin pipe is drained and closed before any command runs. Frames from a host that fail to decode, or
// break the protocol, get Error and close that connection; ferry-init carries on. No exception
// leaves main().

#include <poll.h>
#include <sys/prctl.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "file_ops.h"
#include "init_process.h"
#include "util.h"

namespace {

using namespace ferry_init;

constexpr const char* usage =
    "usage: ferry-init [--command-id N] [--listen PATH [--linger-ms N] [--buffer-bytes N] [--workspace DIR] "
    "[--state-dir DIR] [--shell PATH] [--ripgrep PATH] [--proxy-socket PATH [--proxy-port N]]] [-- argv...] | "
    "ferry-init --file-op [--workspace DIR] [--ripgrep PATH]";

bool parse_number(const char* text, uint64_t max, uint64_t& out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || v > max)
    return false;
  out = v;
  return true;
}

bool parse_arguments(int argc, char** argv, arguments& out, std::string& why) {
  int i = 1;
  for (; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (a == "--file-op") {
      out.file_op = true;
      continue;
    }
    if (i + 1 >= argc) {
      why = "unexpected argument `" + a + "`; " + usage;
      return false;
    }
    const char* value = argv[++i];
    uint64_t v = 0;
    auto bad = [&](const std::string& extra = "") {
      why = "bad " + a + " `" + value + "`" + extra;
      return false;
    };
    auto path = [&](std::string& into) {
      into = value;
      return !into.empty() && into.front() == '/';
    };
    if (a == "--command-id") {
      if (!parse_number(value, UINT32_MAX, v) || v == 0)
        return bad();
      out.command_id = static_cast<uint32_t>(v);
    } else if (a == "--listen") {
      out.listen = value;
      if (out.listen.empty() || out.listen.size() >= sizeof(sockaddr_un::sun_path))
        return bad(" (empty or too long)");
    } else if (a == "--linger-ms") {
      if (!parse_number(value, UINT64_MAX / 2, out.linger_ms))
        return bad();
    } else if (a == "--buffer-bytes") {
      if (!parse_number(value, uint64_t{1} << 40, out.buffer_bytes) ||
          out.buffer_bytes < ferry::wire::max_output_chunk)
        return bad(" (at least 65536)");
    } else if (a == "--workspace") {
      if (!path(out.workspace))
        return bad(" (an absolute path)");
    } else if (a == "--state-dir") {
      if (!path(out.state_dir))
        return bad(" (an absolute path)");
    } else if (a == "--shell") {
      if (!path(out.shell))
        return bad(" (an absolute path)");
    } else if (a == "--file-op-timeout-ms") {
      if (!parse_number(value, 3'600'000, out.file_op_timeout_ms) || out.file_op_timeout_ms == 0)
        return bad(" (1..3600000)");
    } else if (a == "--ripgrep") {
      if (!path(out.ripgrep))
        return bad(" (an absolute path)");
    } else if (a == "--proxy-socket") {
      if (!path(out.proxy_socket) || out.proxy_socket.size() >= sizeof(sockaddr_un::sun_path))
        return bad(" (an absolute path, shorter than 108 bytes)");
    } else if (a == "--proxy-port") {
      if (!parse_number(value, 65535, v))
        return bad();
      out.proxy_port = static_cast<uint16_t>(v);
    } else {
      why = "unexpected argument `" + a + "`; " + usage;
      return false;
    }
  }
  for (; i < argc; ++i)
    out.argv.emplace_back(argv[i]);
  if (out.file_op) {
    if (!out.listen.empty() || !out.argv.empty()) {
      why = "--file-op takes no --listen and no command";
      return false;
    }
    return true;
  }
  if (out.argv.empty() && out.listen.empty()) {
    why = std::string("no command given (stdio mode needs one); ") + usage;
    return false;
  }
  if (!out.proxy_socket.empty() && out.listen.empty()) {
    why = "--proxy-socket needs socket mode (--listen)";
    return false;
  }
  return true;
}

/// Makes sure fds 0, 1 and 2 are open, so that fds created later never land on them.
void ensure_std_fds() {
  for (int fd : {0, 1, 2}) {
    if (::fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
      int n = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
      if (n >= 0 && n != fd) {
        ::dup2(n, fd);
        ::close(n);
      }
    }
  }
}

/// Socket mode: the sandbox's key from stdin (64 hex digits, then EOF), within `timeout_ms`.
/// Stdin is then /dev/null, so no command inherits the pipe (which is empty by then anyway).
bool read_key(ferry::wire::handshake_key& key, std::string& why) {
  constexpr uint64_t timeout_ms = 10'000;
  char buf[130];
  size_t got = 0;
  bool eof = false;
  for (const uint64_t deadline = now_ms() + timeout_ms; !eof && got < sizeof buf;) {
    const uint64_t now = now_ms();
    if (now >= deadline)
      break;
    pollfd p{0, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(deadline - now)) < 0 && errno != EINTR)
      break;
    if (!p.revents)
      continue;
    ssize_t n = ::read(0, buf + got, sizeof buf - got);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      eof = n == 0;
      break;
    }
    got += static_cast<size_t>(n);
  }
  int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, 0);  // dup2 clears close-on-exec on fd 0
    ::close(null);
  } else {
    ::close(0);
  }
  auto parsed = eof ? ferry::wire::key_from_hex(std::string_view(buf, got)) : std::nullopt;
  OPENSSL_cleanse(buf, sizeof buf);
  if (!parsed) {
    why = eof ? "the key on stdin is not 64 hex digits" : "no key on stdin (64 hex digits, then end of file)";
    return false;
  }
  key = *parsed;
  OPENSSL_cleanse(parsed->data(), parsed->size());
  return true;
}

int run(int argc, char** argv) {
  ensure_std_fds();
  // No configuration file: whatever the image has in /usr/lib/ssl/openssl.cnf is not ours to
  // load (it could name modules); HMAC and RAND_bytes need nothing from it.
  OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
  arguments args;
  std::string why;
  if (!parse_arguments(argc, argv, args, why)) {
    // Only stdio mode has a channel to report on before listening.
    bool listening = false;
    for (int i = 1; i < argc && std::strcmp(argv[i], "--") != 0; ++i)
      listening = listening || std::strcmp(argv[i], "--listen") == 0;
    log_error(why);
    if (!listening) {
      std::string out;
      flatbuffers::FlatBufferBuilder fbb;
      auto e = v1::CreateError(fbb, fbb.CreateString(why));
      ferry::wire::append_message(out, fbb, v1::Message::Error, e);
      [[maybe_unused]] bool ok = write_all(1, out.data(), out.size());
    }
    return 2;
  }
  if (args.file_op) {
    file_op_config config;
    config.workspace = args.workspace;
    config.ripgrep = args.ripgrep;
    return run_file_op(config);
  }
  if (!args.listen.empty()) {
    // Before the key is in memory: the commands run as the same uid (and they cannot attach
    // with ptrace or open /proc/1/{mem,fd,environ} of a non-dumpable process).
    ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    if (!read_key(args.key, why)) {
      log_error(why);
      return 2;
    }
  }
  init_process p(std::move(args));
  OPENSSL_cleanse(args.key.data(), args.key.size());  // the moved-from copy
  return p.run();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    ferry_init::log_error(std::string("fatal: ") + e.what());
  } catch (...) {
    ferry_init::log_error("fatal: unknown exception");
  }
  return 1;
}
