// sandbox_owner: the victim of recovery_test and bwrap_runtime_test. Starts one sandbox and records what it
// receives until it is killed (SIGKILL, mid-run: the owner "crash" a restarted ferryd recovers
// from).
//
//   sandbox_owner <runsc|bwrap> <work-dir> <id> <argv...>
//
// The runtime (of that backend) uses <work-dir>/state and <work-dir>/sandboxes, like the test's
// own runtime. Each
// output chunk is appended to <work-dir>/received.<stream> before it is reported, so the file
// sizes are the offsets this owner "persisted" (what a ferryd would resume from).
//
// Output, one line per event, flushed: `running`, `output <stream> <bytes of it so far>`,
// `exited <code>`, `ended <ok|failure text>`. Any failure goes to stderr with exit status 3
// (the test expects to kill it first).
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>

#include "ferry/sandbox/sandbox.h"

namespace {

using namespace ferry::sandbox;

void say(const std::string& line) {
  fputs((line + "\n").c_str(), stdout);
  fflush(stdout);
}

[[noreturn]] void die(const std::string& what) {
  fprintf(stderr, "sandbox_owner: %s\n", what.c_str());
  fflush(stderr);
  _exit(3);
}

class file_observer : public sandbox_observer {
 public:
  explicit file_observer(const std::string& dir) {
    for (int s = 0; s < 2; ++s) {
      std::string path = dir + "/received." + std::to_string(s);
      fds_[s] = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
      if (fds_[s] < 0)
        die("cannot open " + path);
    }
  }
  void on_running() override { say("running"); }
  void on_command_started(uint32_t, const std::vector<std::string>&) override { say("started"); }
  void on_output(uint32_t, int stream, std::string_view data) override {
    if (::write(fds_[stream], data.data(), data.size()) != static_cast<ssize_t>(data.size()))
      die("short write");
    total_[stream] += data.size();
    say("output " + std::to_string(stream) + " " + std::to_string(total_[stream]));
  }
  void on_output_gap(uint32_t, int stream, uint64_t lost) override {
    die("unexpected gap of " + std::to_string(lost) + " bytes on stream " + std::to_string(stream));
  }
  void on_command_exited(uint32_t, int code, int, uint64_t) override { say("exited " + std::to_string(code)); }
  void on_ended(std::optional<std::string> failure) override {
    say("ended " + failure.value_or("ok"));
    ended_ = true;
  }
  bool ended() const { return ended_; }

 private:
  int fds_[2] = {-1, -1};
  uint64_t total_[2] = {0, 0};
  std::atomic<bool> ended_{false};
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5)
    die("usage: sandbox_owner <runsc|bwrap> <work-dir> <id> <argv...>");
  auto backend = parse_backend_choice(argv[1]);
  if (!backend)
    die(backend.error().message);
  const std::string dir = argv[2];
  runtime_config o;
  o.backend = *backend;
  o.runsc.state_dir = dir + "/state";
  o.sandboxes_dir = dir + "/sandboxes";
  o.init_binary = FERRY_INIT_BINARY;
  auto runtime = make_runtime(o);
  if (!runtime)
    die(runtime.error().message);
  file_observer obs(dir);
  sandbox_spec spec;
  spec.id = argv[3];
  spec.argv.assign(argv + 4, argv + argc);
  auto sb = (*runtime)->start(spec, obs);
  if (!sb)
    die(sb.error().message);
  (*sb)->wait();
  die("the sandbox ended before the owner was killed");
}
