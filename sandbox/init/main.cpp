// ferry-init: PID 1 of every sandbox, and the agent's process API inside it.
//
//   ferry-init [--command-id N] [--listen PATH [--linger-ms N] [--buffer-bytes N]
//              [--workspace DIR] [--state-dir DIR] [--shell PATH]
//              [--proxy-socket PATH [--proxy-port N]]] [-- argv...]
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
// Each connection gets Hello (with this ferry-init's random instance token), then must send
// Attach (its resume offsets); the first Attach starts the command line (argv), if any, as
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
// The HTTP forwarder (--proxy-socket): 127.0.0.1:--proxy-port (default 3128) relayed to the unix
// socket; every command gets HTTP_PROXY, HTTPS_PROXY (and lower-case) pointing at it, and
// NO_PROXY=localhost,127.0.0.1.
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
// sanitizers. In socket mode it is not dumpable, so the commands can neither read its memory
// (the instance token) nor its fds through /proc. Frames from a host that fail to decode, or
// break the protocol, get Error and close that connection; ferry-init carries on. No exception
// leaves main().

#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "init_process.h"
#include "util.h"

namespace {

using namespace ferry_init;

constexpr const char* usage =
    "usage: ferry-init [--command-id N] [--listen PATH [--linger-ms N] [--buffer-bytes N] [--workspace DIR] "
    "[--state-dir DIR] [--shell PATH] [--proxy-socket PATH [--proxy-port N]]] [-- argv...]";

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

int run(int argc, char** argv) {
  ensure_std_fds();
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
  init_process p(std::move(args));
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
