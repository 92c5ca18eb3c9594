// nats_bus: the NATS implementation of `bus` (nats.c), and the embedded nats-server child.
// natsX_Verb names stay in this file.

#include <signal.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <condition_variable>
#include <fstream>
#include <thread>

#include <nats/nats.h>

#include "ferry/actors/bus.h"
#include "ferry/sandbox/process.h"

namespace ferry::actors {

namespace {

error_info nats_error(std::string_view what, natsStatus s) {
  return error_info{std::string(what) + ": " + natsStatus_GetText(s)};
}

/// State shared with the C library's callback thread. Freed by the on-complete callback, which
/// nats.c calls once no message callback runs any more.
struct sub_closure {
  virtual ~sub_closure() = default;
  message_handler handler;
  std::mutex done_mtx;
  std::condition_variable done_cv;
  bool done = false;
};

void on_nats_message(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
  auto* c = static_cast<sub_closure*>(closure);
  std::string_view subject = natsMsg_GetSubject(msg);
  std::string_view data(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
  c->handler(subject, data);
  natsMsg_Destroy(msg);
}

/// A served subject: the handler plus the connection answers go out on.
struct serve_closure : sub_closure {
  request_handler on_request;
  natsConnection* nc = nullptr;
};

void on_nats_request(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
  auto* c = static_cast<serve_closure*>(closure);
  std::string subject = natsMsg_GetSubject(msg);
  std::string data(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
  const char* reply_to = natsMsg_GetReply(msg);
  std::string reply_subject = reply_to ? reply_to : "";
  natsMsg_Destroy(msg);
  natsConnection* nc = c->nc;
  c->on_request(subject, data, [nc, reply_subject](std::string_view answer) {
    if (reply_subject.empty())
      return;  // a publish, not a request: nobody waits for an answer
    natsConnection_Publish(nc, reply_subject.c_str(), answer.data(),
                           static_cast<int>(answer.size()));
  });
}

void on_nats_complete(void* closure) {
  auto* c = static_cast<sub_closure*>(closure);
  std::lock_guard<std::mutex> guard(c->done_mtx);
  c->done = true;
  c->done_cv.notify_all();
}

class nats_subscription final : public subscription {
 public:
  nats_subscription(natsSubscription* sub, std::unique_ptr<sub_closure> c)
    : sub_(sub), closure_(std::move(c)) {}

  ~nats_subscription() override {
    natsSubscription_Unsubscribe(sub_);
    {
      // Wait (bounded) until the library will not call us again; if the connection is already
      // closed the completion may never come, so do not wait forever.
      std::unique_lock<std::mutex> lock(closure_->done_mtx);
      closure_->done_cv.wait_for(lock, std::chrono::seconds(2), [&] { return closure_->done; });
    }
    natsSubscription_Destroy(sub_);
  }

 private:
  natsSubscription* sub_;
  std::unique_ptr<sub_closure> closure_;
};

class nats_bus final : public bus {
 public:
  explicit nats_bus(natsConnection* nc) : nc_(nc) {}
  ~nats_bus() override {
    natsConnection_FlushTimeout(nc_, 1000);
    natsConnection_Close(nc_);
    natsConnection_Destroy(nc_);
  }

  result<void> publish(std::string_view subject, std::string_view payload) override {
    std::string subj(subject);
    auto s = natsConnection_Publish(nc_, subj.c_str(), payload.data(),
                                    static_cast<int>(payload.size()));
    if (s != NATS_OK)
      return nats_error("publish on " + subj, s);
    return {};
  }

  result<std::unique_ptr<subscription>> subscribe(std::string subject,
                                                  message_handler on_message) override {
    auto closure = std::make_unique<sub_closure>();
    closure->handler = std::move(on_message);
    natsSubscription* sub = nullptr;
    auto s = natsConnection_Subscribe(&sub, nc_, subject.c_str(), on_nats_message, closure.get());
    if (s != NATS_OK)
      return nats_error("subscribe to " + subject, s);
    natsSubscription_SetOnCompleteCB(sub, on_nats_complete, closure.get());
    natsSubscription_SetPendingLimits(sub, -1, 256 * 1024 * 1024);
    auto result_sub = std::make_unique<nats_subscription>(sub, std::move(closure));
    if (auto f = natsConnection_FlushTimeout(nc_, 5000); f != NATS_OK)
      return nats_error("flush subscription to " + subject, f);
    return std::unique_ptr<subscription>(std::move(result_sub));
  }

  result<std::unique_ptr<subscription>> serve(std::string subject,
                                              request_handler on_request) override {
    auto closure = std::make_unique<serve_closure>();
    closure->on_request = std::move(on_request);
    closure->nc = nc_;
    natsSubscription* sub = nullptr;
    auto s = natsConnection_Subscribe(&sub, nc_, subject.c_str(), on_nats_request, closure.get());
    if (s != NATS_OK)
      return nats_error("serve " + subject, s);
    natsSubscription_SetOnCompleteCB(sub, on_nats_complete, closure.get());
    auto result_sub = std::make_unique<nats_subscription>(sub, std::move(closure));
    if (auto f = natsConnection_FlushTimeout(nc_, 5000); f != NATS_OK)
      return nats_error("flush subscription to " + subject, f);
    return std::unique_ptr<subscription>(std::move(result_sub));
  }

  result<std::string> request(std::string_view subject, std::string_view payload,
                              std::chrono::milliseconds timeout) override {
    std::string subj(subject);
    // While reconnecting nats.c would hold the request until the timeout; say so at once.
    if (natsConnection_Status(nc_) != NATS_CONN_STATUS_CONNECTED)
      return fail(errc::closed, "request on " + subj + ": not connected to NATS");
    natsMsg* reply = nullptr;
    auto s = natsConnection_Request(&reply, nc_, subj.c_str(), payload.data(),
                                    static_cast<int>(payload.size()),
                                    static_cast<int64_t>(timeout.count()));
    if (s == NATS_NO_RESPONDERS)
      return fail(errc::not_found, "request on " + subj + ": nobody serves it");
    if (s != NATS_OK)
      return nats_error("request on " + subj, s);
    std::string out(natsMsg_GetData(reply), static_cast<size_t>(natsMsg_GetDataLength(reply)));
    natsMsg_Destroy(reply);
    return out;
  }

  result<void> flush(std::chrono::milliseconds timeout) override {
    auto s = natsConnection_FlushTimeout(nc_, static_cast<int64_t>(timeout.count()));
    if (s != NATS_OK)
      return nats_error("flush", s);
    return {};
  }

 private:
  natsConnection* nc_;
};

class embedded_nats_server final : public embedded_nats {
 public:
  embedded_nats_server(sandbox::child_process proc, std::string url)
    : proc_(std::move(proc)), url_(std::move(url)) {}
  ~embedded_nats_server() override { stop(); }

  const std::string& url() const override { return url_; }

  void stop() override {
    std::lock_guard<std::mutex> guard(mtx_);
    if (stopped_)
      return;
    stopped_ = true;
    (void)proc_.terminate(std::chrono::seconds(5));
  }

 private:
  std::mutex mtx_;
  bool stopped_ = false;
  sandbox::child_process proc_;
  std::string url_;
};

/// The port in nats-server's "Listening for client connections on HOST:PORT" line, or "".
std::string logged_client_port(const std::string& log) {
  static constexpr std::string_view marker = "Listening for client connections on ";
  auto at = log.find(marker);
  if (at == std::string::npos)
    return {};
  auto eol = log.find('\n', at);
  if (eol == std::string::npos)
    return {};  // line not complete yet
  auto line = std::string_view(log).substr(at + marker.size(), eol - at - marker.size());
  auto colon = line.rfind(':');
  if (colon == std::string_view::npos)
    return {};
  std::string port;
  for (char c : line.substr(colon + 1))
    if (c >= '0' && c <= '9')
      port += c;
    else
      break;
  return port;
}

/// A ferryd that was killed (SIGKILL, crash) leaves its nats-server child running on the same
/// store. Stop it (found by the pid file it wrote, confirmed by its command line) before starting
/// a new one.
void stop_stale_server(const std::string& pid_path, const std::string& store_dir) {
  std::ifstream in{pid_path};
  long pid = 0;
  if (!(in >> pid) || pid <= 1)
    return;
  auto cmdline = sandbox::read_small_file("/proc/" + std::to_string(pid) + "/cmdline");
  if (cmdline.find("nats-server") == std::string::npos ||
      cmdline.find(store_dir) == std::string::npos)
    return;
  std::fprintf(stderr, "ferryd: stopping nats-server %ld left by an earlier ferryd\n", pid);
  ::kill(static_cast<pid_t>(pid), SIGTERM);
  // Its parent is gone, so once it exits it is a zombie until init reaps it: that counts as gone.
  auto gone = [pid] {
    auto stat = sandbox::read_small_file("/proc/" + std::to_string(pid) + "/stat");
    auto close = stat.rfind(')');
    return stat.empty() || (close != std::string::npos && close + 2 < stat.size() &&
                            stat[close + 2] == 'Z');
  };
  for (int i = 0; i < 100 && !gone(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!gone())
    ::kill(static_cast<pid_t>(pid), SIGKILL);
}

}  // namespace

result<std::unique_ptr<bus>> connect_nats(const std::string& url) {
  natsOptions* opts = nullptr;
  if (auto s = natsOptions_Create(&opts); s != NATS_OK)
    return nats_error("create NATS options", s);
  natsOptions_SetURL(opts, url.c_str());
  natsOptions_SetName(opts, "ferryd");
  natsOptions_SetMaxReconnect(opts, -1);
  natsOptions_SetReconnectWait(opts, 250);
  natsOptions_SetReconnectBufSize(opts, 64 * 1024 * 1024);
  natsConnection* nc = nullptr;
  auto s = natsConnection_Connect(&nc, opts);
  natsOptions_Destroy(opts);
  if (s != NATS_OK)
    return nats_error("connect to NATS at " + url, s);
  return std::unique_ptr<bus>(new nats_bus(nc));
}

result<std::unique_ptr<embedded_nats>> start_embedded_nats(const std::string& binary,
                                                           const std::filesystem::path& store_dir,
                                                           uint16_t port) {
  std::error_code ec;
  std::filesystem::create_directories(store_dir, ec);
  if (ec)
    return fail("create NATS store directory " + store_dir.string() + ": " + ec.message());
  // nats-server logs to a file next to its store (never to a pipe nobody drains); port -1 makes
  // it pick a free port, which it logs. Only the part of the log written after our start counts.
  auto log_path = store_dir.string() + ".log";
  auto pid_path = store_dir.string() + ".pid";
  stop_stale_server(pid_path, store_dir.string());
  auto log_offset = std::filesystem::exists(log_path, ec) ? std::filesystem::file_size(log_path, ec)
                                                          : 0;
  sandbox::spawn_options o;
  o.argv = {binary, "-a", "127.0.0.1", "-p", port ? std::to_string(port) : "-1", "-js",
            "-sd", store_dir.string(),
            "-l", log_path, "-P", pid_path};
  o.out = sandbox::stdio::null;
  o.err = sandbox::stdio::null;
  auto proc = sandbox::child_process::spawn(o);
  if (!proc)
    return fail("start " + binary + ": " + proc.error().message);
  std::string log;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (std::chrono::steady_clock::now() < deadline) {
    if (std::ifstream in{log_path}) {
      in.seekg(static_cast<std::streamoff>(log_offset));
      log.assign(std::istreambuf_iterator<char>(in), {});
    }
    if (auto logged = logged_client_port(log); !logged.empty())
      return std::unique_ptr<embedded_nats>(
        new embedded_nats_server(std::move(*proc), "nats://127.0.0.1:" + logged));
    if (auto st = proc->try_wait())
      return fail(binary + " exited during start-up (code " + std::to_string(st->exit_code) +
                  "); its log " + log_path + " says: " + log);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return fail(binary + " did not report a client port within 15 s; its log " + log_path +
              " says: " + log);
}

}  // namespace ferry::actors
