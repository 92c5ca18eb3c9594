// local_forge: `git http-backend` behind a Beast server, one CGI child per request.
//
// Each connection is a coroutine on its own strand. For a request it starts the child, then a
// second coroutine on the same strand copies the request body into the child's stdin while the
// first parses the CGI header block from the child's stdout and streams the rest to the client
// (both at once: a child may answer before it has read everything). One request per connection
// (`Connection: close`): git opens a new one as needed.

#include "ferry/gitproxy/local_forge.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>

#include "ferry/sandbox/process.h"
#include "http_common.h"

namespace ferry::gitproxy {
namespace {

using namespace detail;
using net::use_awaitable;
using sandbox::child_process;
using sandbox::spawn_options;
using sandbox::stdio;

constexpr std::size_t chunk = 64 * 1024;
constexpr auto io_timeout = std::chrono::seconds(60);

std::string path_env() {
  const char* p = std::getenv("PATH");
  return std::string("PATH=") + (p ? p : "/usr/local/bin:/usr/bin:/bin");
}

// The environment of every git child: nothing from the machine's git configuration.
std::vector<std::string> git_env() {
  return {path_env(), "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "HOME=/nonexistent",
          "LANG=C", "GIT_TERMINAL_PROMPT=0"};
}

http::response<http::string_body> text_response(http::status st, std::string body) {
  http::response<http::string_body> res{st, 11};
  res.set(http::field::content_type, "text/plain; charset=utf-8");
  res.set(http::field::cache_control, "no-cache");
  res.keep_alive(false);
  res.body() = std::move(body) + "\n";
  res.prepare_payload();
  return res;
}

class forge_impl final : public local_forge {
 public:
  explicit forge_impl(local_forge_options opts)
    : opts_(std::move(opts)), pool_(opts_.io_threads) {}
  ~forge_impl() override { stop(); }

  result<void> listen() {
    std::error_code fec;
    std::filesystem::create_directories(opts_.root, fec);
    if (fec)
      return fail("local forge: cannot create " + opts_.root.string() + ": " + fec.message());
    if (opts_.token.size() < 16)
      return fail(errc::invalid_argument, "local forge: the token must be at least 16 bytes");
    beast::error_code ec;
    const auto addr = net::ip::make_address(opts_.host, ec);
    if (ec || !addr.is_loopback())
      return fail(errc::invalid_argument,
                  "local forge: listen address '" + opts_.host + "' is not a loopback address");
    acceptor_ = std::make_unique<tcp::acceptor>(pool_.context());
    tcp::endpoint ep{addr, opts_.port};
    acceptor_->open(ep.protocol(), ec);
    if (!ec)
      acceptor_->set_option(net::socket_base::reuse_address(true), ec);
    if (!ec)
      acceptor_->bind(ep, ec);
    if (!ec)
      acceptor_->listen(net::socket_base::max_listen_connections, ec);
    if (ec)
      return fail("local forge: listen on " + opts_.host + ":" + std::to_string(opts_.port) +
                  ": " + ec.message());
    port_ = acceptor_->local_endpoint().port();
    net::co_spawn(pool_.context(), accept_loop(), net::detached);
    pool_.run();
    return {};
  }

  std::uint16_t port() const override { return port_; }
  std::string base_url() const override {
    return "http://" + opts_.host + ":" + std::to_string(port_);
  }
  std::filesystem::path repo_path(std::string_view name) const override {
    return opts_.root / (std::string(name) + ".git");
  }

  result<void> create_repo(std::string_view name) override {
    if (!valid_repo_name(name))
      return fail(errc::invalid_argument, "local forge: invalid repository name '" +
                                              std::string(name) + "'");
    const auto dir = repo_path(name);
    if (std::filesystem::exists(dir))
      return fail(errc::conflict, "local forge: repository " + dir.string() + " already exists");
    const std::string gd = "--git-dir=" + dir.string();
    auto run = [&](std::vector<std::string> args, std::string in) -> result<std::string> {
      args.insert(args.begin(), opts_.git);
      spawn_options so;
      so.argv = args;
      so.env = git_env();
      for (auto v : {"GIT_AUTHOR_NAME=Ferry", "GIT_AUTHOR_EMAIL=ferry@localhost",
                     "GIT_COMMITTER_NAME=Ferry", "GIT_COMMITTER_EMAIL=ferry@localhost"})
        so.env->emplace_back(v);
      so.in = in.empty() ? stdio::null : stdio::bytes;
      so.in_bytes = std::move(in);
      so.out = stdio::pipe;
      so.stderr_to_stdout = true;
      auto child = child_process::spawn(so);
      if (!child)
        return child.error();
      std::string out = sandbox::read_all(child->stdout_fd());
      const auto st = child->wait();
      if (!st.ok())
        return fail("local forge: `git " + args[1] + " …` for " + std::string(name) +
                    " failed: " + out);
      while (!out.empty() && (out.back() == '\n' || out.back() == '\r'))
        out.pop_back();
      return out;
    };
    if (auto r = run({"init", "--quiet", "--bare", "--initial-branch=main", dir.string()}, ""); !r)
      return r.error();
    if (auto r = run({gd, "config", "http.receivepack", "true"}, ""); !r)
      return r.error();
    auto blob = run({gd, "hash-object", "-w", "--stdin"}, "# " + std::string(name) + "\n");
    if (!blob)
      return blob.error();
    auto tree = run({gd, "mktree"}, "100644 blob " + *blob + "\tREADME.md\n");
    if (!tree)
      return tree.error();
    auto commit = run({gd, "commit-tree", *tree, "-m", "Initial commit"}, "");
    if (!commit)
      return commit.error();
    if (auto r = run({gd, "update-ref", "refs/heads/main", *commit}, ""); !r)
      return r.error();
    return {};
  }

  void stop() override {
    if (stopped_.exchange(true))
      return;
    if (acceptor_)
      net::post(acceptor_->get_executor(), [this] {
        beast::error_code ec;
        acceptor_->close(ec);
      });
    pool_.stop();
    acceptor_.reset();
    pool_.reset();  // destroys pending connection coroutines: their children are killed, reaped
  }

 private:
  net::awaitable<void> accept_loop() {
    while (true) {
      beast::error_code ec;
      auto strand = net::make_strand(pool_.context());
      tcp::socket sock(strand);
      co_await acceptor_->async_accept(sock, net::redirect_error(use_awaitable, ec));
      if (ec) {
        if (ec == net::error::operation_aborted || !acceptor_->is_open())
          co_return;
        continue;
      }
      net::co_spawn(strand, serve(beast::tcp_stream(std::move(sock))), net::detached);
    }
  }

  net::awaitable<void> serve(beast::tcp_stream stream) {
    beast::flat_buffer buf;
    http::request_parser<http::buffer_body> parser;
    parser.header_limit(16 * 1024);
    parser.body_limit(no_body_limit);
    beast::error_code ec;
    stream.expires_after(io_timeout);
    co_await http::async_read_header(stream, buf, parser, net::redirect_error(use_awaitable, ec));
    if (ec)
      co_return;
    auto& req = parser.get();
    auto reply = [&](http::status st, std::string text) -> net::awaitable<void> {
      auto res = text_response(st, std::move(text));
      if (st == http::status::unauthorized)
        res.set(http::field::www_authenticate, "Basic realm=\"ferry local forge\"");
      beast::error_code wec;
      stream.expires_after(io_timeout);
      co_await http::async_write(stream, res, net::redirect_error(use_awaitable, wec));
      stream.socket().shutdown(tcp::socket::shutdown_send, wec);
    };
    auto parsed = parse_git_target(req.method(), sv(req.target()));
    if (auto* refused = std::get_if<target_refusal>(&parsed)) {
      co_await reply(refused->status, "local forge: " + refused->reason);
      co_return;
    }
    const auto& target = std::get<git_target>(parsed);
    const auto auth = parse_basic(sv(req[http::field::authorization]));
    if (!auth) {
      co_await reply(http::status::unauthorized, "local forge: authentication required");
      co_return;
    }
    if (!equal_secret(auth->password, opts_.token)) {
      co_await reply(http::status::forbidden, "local forge: invalid token");
      co_return;
    }
    if (!std::filesystem::is_directory(repo_path(target.repo))) {
      co_await reply(http::status::not_found,
                     "local forge: repository '" + target.repo + "' not found");
      co_return;
    }
    co_await run_backend(stream, buf, parser, auth->user);
  }

  // Runs one CGI request through `git http-backend` and streams its answer.
  net::awaitable<void> run_backend(beast::tcp_stream& stream, beast::flat_buffer& buf,
                                   http::request_parser<http::buffer_body>& parser,
                                   std::string user) {
    auto& req = parser.get();
    const std::string target(req.target());
    const auto q = target.find('?');
    spawn_options so;
    so.argv = {opts_.git, "http-backend"};
    so.env = git_env();
    auto& env = *so.env;
    env.push_back("GIT_PROJECT_ROOT=" + opts_.root.string());
    env.push_back("GIT_HTTP_EXPORT_ALL=1");
    env.push_back("REMOTE_USER=" + (user.empty() ? std::string("ferry") : user));
    env.push_back("REMOTE_ADDR=127.0.0.1");
    env.push_back("GATEWAY_INTERFACE=CGI/1.1");
    env.push_back("REQUEST_METHOD=" + std::string(req.method_string()));
    env.push_back("PATH_INFO=" + target.substr(0, q));
    env.push_back("QUERY_STRING=" + (q == std::string::npos ? std::string() : target.substr(q + 1)));
    if (auto ct = req[http::field::content_type]; !ct.empty())
      env.push_back("CONTENT_TYPE=" + std::string(ct));
    if (auto ce = req[http::field::content_encoding]; !ce.empty())
      env.push_back("HTTP_CONTENT_ENCODING=" + std::string(ce));
    if (auto gp = req["Git-Protocol"]; !gp.empty())
      env.push_back("GIT_PROTOCOL=" + std::string(gp));
    if (auto len = parser.content_length())
      env.push_back("CONTENT_LENGTH=" + std::to_string(*len));
    // Chunked: no CONTENT_LENGTH; http-backend reads the body until EOF.
    so.in = stdio::pipe;
    so.out = stdio::pipe;
    so.err = stdio::inherit;
    auto child = child_process::spawn(so);
    beast::error_code ec;
    if (!child) {
      auto res = text_response(http::status::internal_server_error,
                               "local forge: cannot run git http-backend");
      co_await http::async_write(stream, res, net::redirect_error(use_awaitable, ec));
      co_return;
    }
    auto ex = co_await net::this_coro::executor;
    net::posix::stream_descriptor to_child(ex, ::dup(child->stdin_fd()));
    net::posix::stream_descriptor from_child(ex, ::dup(child->stdout_fd()));
    child->close_stdin();

    // Request body → child's stdin, concurrently with the answer below.
    struct writer_state {
      bool done = false;
      beast::error_code ec;
      net::steady_timer wake;
      explicit writer_state(net::any_io_executor e) : wake(e) {}
    };
    auto ws = std::make_shared<writer_state>(ex);
    ws->wake.expires_at(net::steady_timer::time_point::max());
    net::co_spawn(
        ex,
        [&stream, &buf, &parser, &to_child, ws]() -> net::awaitable<void> {
          std::vector<char> body(chunk);
          beast::error_code rec;
          while (!parser.is_done()) {
            parser.get().body().data = body.data();
            parser.get().body().size = body.size();
            stream.expires_after(io_timeout);
            co_await http::async_read(stream, buf, parser, net::redirect_error(use_awaitable, rec));
            if (rec == http::error::need_buffer)
              rec = {};
            if (rec)
              break;
            const std::size_t n = body.size() - parser.get().body().size;
            if (n > 0)
              co_await net::async_write(to_child, net::buffer(body.data(), n),
                                        net::redirect_error(use_awaitable, rec));
            if (rec)
              break;
          }
          beast::error_code ignored;
          to_child.close(ignored);  // EOF for the child
          ws->ec = rec;
          ws->done = true;
          ws->wake.cancel();
        },
        net::detached);

    // The CGI header block, then the body.
    std::string head;
    std::size_t header_end = std::string::npos, sep = 0;
    std::vector<char> out(chunk);
    while (header_end == std::string::npos) {
      const std::size_t n = co_await from_child.async_read_some(
          net::buffer(out), net::redirect_error(use_awaitable, ec));
      if (ec)
        break;
      head.append(out.data(), n);
      if (auto p = head.find("\r\n\r\n"); p != std::string::npos)
        header_end = p, sep = 4;
      else if (auto p2 = head.find("\n\n"); p2 != std::string::npos)
        header_end = p2, sep = 2;
      if (header_end == std::string::npos && head.size() > 16 * 1024)
        break;
    }
    if (header_end == std::string::npos) {
      auto res = text_response(http::status::bad_gateway,
                               "local forge: git http-backend gave no valid CGI answer");
      co_await http::async_write(stream, res, net::redirect_error(use_awaitable, ec));
      co_await finish(*child, ws);
      co_return;
    }
    http::response<http::buffer_body> res;
    res.version(11);
    res.result(http::status::ok);
    std::size_t pos = 0;
    while (pos < header_end) {
      auto eol = head.find('\n', pos);
      if (eol == std::string::npos || eol > header_end)
        eol = header_end;
      std::string line = head.substr(pos, eol - pos);
      pos = eol + 1;
      if (!line.empty() && line.back() == '\r')
        line.pop_back();
      const auto colon = line.find(':');
      if (colon == std::string::npos)
        continue;
      std::string key = line.substr(0, colon), value = line.substr(colon + 1);
      while (!value.empty() && value.front() == ' ')
        value.erase(0, 1);
      if (beast::iequals(key, "Status"))
        res.result(static_cast<unsigned>(std::atoi(value.c_str())));
      else if (!beast::iequals(key, "Content-Length") && !beast::iequals(key, "Connection") &&
               !beast::iequals(key, "Transfer-Encoding"))
        res.set(key, value);
    }
    res.keep_alive(false);
    res.chunked(true);
    res.body().data = nullptr;
    res.body().more = true;
    http::response_serializer<http::buffer_body> sr{res};
    stream.expires_after(io_timeout);
    co_await http::async_write_header(stream, sr, net::redirect_error(use_awaitable, ec));
    std::string first = head.substr(header_end + sep);
    bool eof = false;
    while (!ec) {
      std::size_t n = 0;
      const char* data = nullptr;
      if (!first.empty()) {
        data = first.data();
        n = first.size();
      } else if (!eof) {
        n = co_await from_child.async_read_some(net::buffer(out),
                                                net::redirect_error(use_awaitable, ec));
        if (ec == net::error::eof) {
          ec = {};
          eof = true;
        }
        if (ec)
          break;
        data = out.data();
      }
      res.body().data = n ? const_cast<char*>(data) : nullptr;
      res.body().size = n;
      res.body().more = !eof;
      stream.expires_after(io_timeout);
      co_await http::async_write(stream, sr, net::redirect_error(use_awaitable, ec));
      if (ec == http::error::need_buffer)
        ec = {};
      first.clear();
      if (eof)
        break;
    }
    stream.socket().shutdown(tcp::socket::shutdown_send, ec);
    co_await finish(*child, ws);
  }

  // Waits (without blocking the thread) for the body writer and the child; a child still running
  // after 10 s is killed. The child is always reaped.
  template <class State>
  net::awaitable<void> finish(child_process& child, std::shared_ptr<State> ws) {
    if (!ws->done) {
      beast::error_code ec;
      co_await ws->wake.async_wait(net::redirect_error(use_awaitable, ec));
    }
    net::steady_timer t(co_await net::this_coro::executor);
    for (int i = 0; i < 2000; ++i) {
      if (child.try_wait())
        co_return;
      t.expires_after(std::chrono::milliseconds(5));
      beast::error_code ec;
      co_await t.async_wait(net::redirect_error(use_awaitable, ec));
    }
    child.terminate(std::chrono::milliseconds(200));
  }

  local_forge_options opts_;
  io_pool pool_;
  std::unique_ptr<tcp::acceptor> acceptor_;
  std::uint16_t port_ = 0;
  std::atomic<bool> stopped_{false};
};

}  // namespace

result<std::unique_ptr<local_forge>> local_forge::start(local_forge_options opts) {
  auto forge = std::make_unique<forge_impl>(std::move(opts));
  if (auto r = forge->listen(); !r)
    return r.error();
  return std::unique_ptr<local_forge>(std::move(forge));
}

}  // namespace ferry::gitproxy
