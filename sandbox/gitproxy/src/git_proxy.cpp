// git_proxy_impl: the Beast server behind git_proxy.h.
//
// Each connection is one coroutine on its own strand, serving one request (`Connection: close`):
// read the header, check the target and the scoped credential, then either relay (fetch, clone,
// advertisements, an allowed push) or answer a refusal. The relay streams: request body chunks
// go upstream as they arrive, response chunks come back as they arrive (64 KiB buffers). A push
// is held back only until its command list is complete (at most 1 MiB) and checked.
//
// The real token exists in this process only inside `upstream_auth` (the Authorization value and
// the scrub needles), for the duration of one upstream request; it is wiped afterwards.

#include "ferry/gitproxy/git_proxy.h"

#include <algorithm>
#include <mutex>
#include <unordered_map>

#include <boost/asio/ssl.hpp>
#include <boost/beast/ssl.hpp>
#include <openssl/crypto.h>

#include "ferry/gitproxy/pkt_line.h"
#include "http_common.h"

namespace ferry::gitproxy {
namespace {

using namespace detail;
using net::use_awaitable;

/// Reads the next piece of a buffer_body message into `chunk` within `timeout` (on the stream's
/// lowest layer): the bytes it got, 0 once the body is complete. A full chunk (need_buffer) is
/// not an error; any other failure is left in `ec`.
template <class Stream, class Buffer, bool isRequest>
net::awaitable<std::size_t> read_piece(Stream& stream, Buffer& buf, http::parser<isRequest, http::buffer_body>& parser,
                                       std::vector<char>& chunk, std::chrono::milliseconds timeout,
                                       beast::error_code& ec) {
  parser.get().body().data = chunk.data();
  parser.get().body().size = chunk.size();
  beast::get_lowest_layer(stream).expires_after(timeout);
  co_await http::async_read(stream, buf, parser, net::redirect_error(use_awaitable, ec));
  if (ec == http::error::need_buffer)
    ec = {};
  co_return chunk.size() - parser.get().body().size;
}
namespace ssl = net::ssl;
using unix_stream =
    beast::basic_stream<net::local::stream_protocol, net::any_io_executor, beast::unlimited_rate_policy>;

constexpr std::size_t chunk = 64 * 1024;
constexpr std::size_t max_command_list = 1 << 20;
constexpr std::size_t max_drain = 256u << 20;
constexpr std::size_t max_error_body = 64 * 1024;

struct upstream_url {
  bool tls = false;
  std::string host;
  std::string port;
  std::string prefix;  // path prefix without a trailing '/', possibly empty
};

result<upstream_url> parse_upstream(std::string_view url) {
  upstream_url u;
  if (url.substr(0, 7) == "http://") {
    url.remove_prefix(7);
    u.port = "80";
  } else if (url.substr(0, 8) == "https://") {
    url.remove_prefix(8);
    u.tls = true;
    u.port = "443";
  } else {
    return fail(errc::invalid_argument, "git proxy: the upstream URL must start with http:// or "
                                        "https://");
  }
  const auto slash = url.find('/');
  std::string_view authority = url.substr(0, slash);
  if (slash != std::string_view::npos)
    u.prefix = std::string(url.substr(slash));
  while (!u.prefix.empty() && u.prefix.back() == '/')
    u.prefix.pop_back();
  if (authority.empty() || authority.find('@') != std::string_view::npos)
    return fail(errc::invalid_argument,
                "git proxy: the upstream URL needs a host (and no credentials in it)");
  if (const auto colon = authority.rfind(':');
      colon != std::string_view::npos && authority.find(']') == std::string_view::npos) {
    u.port = std::string(authority.substr(colon + 1));
    authority = authority.substr(0, colon);
    if (u.port.empty() || u.port.size() > 5 ||
        u.port.find_first_not_of("0123456789") != std::string::npos)
      return fail(errc::invalid_argument, "git proxy: bad port in the upstream URL");
  }
  u.host = std::string(authority);
  for (char c : u.prefix + u.host)
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f ||
        c == '?' || c == '#' || c == '%')
      return fail(errc::invalid_argument, "git proxy: bad character in the upstream URL");
  return u;
}

// What a sandbox may do, keyed by the SHA-256 of its credential.
struct grant {
  std::string sandbox_id;
  std::string repo;
  std::string branch;
  std::chrono::system_clock::time_point expires_at;
  bool revoked = false;
};

// The Authorization value for upstream and the strings to scrub; wiped on destruction.
struct upstream_auth {
  std::string header;
  std::vector<std::string> needles;
  upstream_auth() = default;
  upstream_auth(const upstream_auth&) = delete;
  upstream_auth& operator=(const upstream_auth&) = delete;
  ~upstream_auth() {
    OPENSSL_cleanse(header.data(), header.size());
    for (auto& n : needles)
      OPENSSL_cleanse(n.data(), n.size());
  }
};

std::string printable(std::string_view s, std::size_t limit = 200) {
  std::string out;
  for (char c : s.substr(0, limit)) {
    const auto u = static_cast<unsigned char>(c);
    out.push_back(u < 0x21 || u >= 0x7f ? '?' : c);
  }
  return out;
}

// The push policy: why `cmd` is refused, or empty when it is allowed.
std::string refusal_of(const pkt::ref_command& cmd, const std::string& branch) {
  if (!pkt::is_valid_ref_name(cmd.ref))
    return "invalid ref name";
  if (pkt::is_zero_oid(cmd.new_oid))
    return "deleting refs is not allowed";
  if (cmd.ref.rfind("refs/tags/", 0) == 0)
    return "pushing tags is not allowed; push to refs/heads/" + branch;
  if (cmd.ref != "refs/heads/" + branch)
    return "only refs/heads/" + branch + " may be pushed";
  return {};
}

class git_proxy_impl final : public git_proxy {
 public:
  git_proxy_impl(git_proxy_options opts, upstream_url up)
    : opts_(std::move(opts)), up_(std::move(up)), pool_(opts_.io_threads),
      tls_(ssl::context::tls_client) {}
  ~git_proxy_impl() override { stop(); }

  result<void> listen() {
    if (up_.tls) {
      beast::error_code ec;
      if (!opts_.ca_file.empty())
        tls_.load_verify_file(opts_.ca_file.string(), ec);
      else
        tls_.set_default_verify_paths(ec);
      if (ec)
        return fail("git proxy: cannot load CA certificates: " + ec.message());
      tls_.set_verify_mode(ssl::verify_peer);
    }
    if (opts_.listen_tcp) {
      beast::error_code ec;
      const auto addr = net::ip::make_address(opts_.tcp_host, ec);
      if (ec)
        return fail(errc::invalid_argument,
                    "git proxy: bad listen address '" + opts_.tcp_host + "'");
      tcp_ = std::make_unique<tcp::acceptor>(pool_.context());
      tcp::endpoint ep{addr, opts_.tcp_port};
      tcp_->open(ep.protocol(), ec);
      if (!ec)
        tcp_->set_option(net::socket_base::reuse_address(true), ec);
      if (!ec)
        tcp_->bind(ep, ec);
      if (!ec)
        tcp_->listen(net::socket_base::max_listen_connections, ec);
      if (ec)
        return fail("git proxy: listen on " + opts_.tcp_host + ":" +
                    std::to_string(opts_.tcp_port) + ": " + ec.message());
      port_ = tcp_->local_endpoint().port();
      net::co_spawn(pool_.context(), accept_tcp(), net::detached);
    }
    if (!opts_.unix_socket.empty()) {
      beast::error_code ec;
      std::filesystem::remove(opts_.unix_socket);
      unix_ = std::make_unique<net::local::stream_protocol::acceptor>(pool_.context());
      net::local::stream_protocol::endpoint ep(opts_.unix_socket.string());
      unix_->open(ep.protocol(), ec);
      if (!ec)
        unix_->bind(ep, ec);
      if (!ec)
        unix_->listen(net::socket_base::max_listen_connections, ec);
      if (ec)
        return fail("git proxy: listen on " + opts_.unix_socket.string() + ": " + ec.message());
      std::filesystem::permissions(opts_.unix_socket, std::filesystem::perms::owner_read |
                                                          std::filesystem::perms::owner_write);
      net::co_spawn(pool_.context(), accept_unix(), net::detached);
    }
    if (!tcp_ && !unix_)
      return fail(errc::invalid_argument, "git proxy: no listener configured");
    pool_.run();
    return {};
  }

  std::uint16_t port() const override { return port_; }

  result<std::string> register_sandbox(std::string sandbox_id, std::string repo,
                                       std::string branch,
                                       std::chrono::system_clock::time_point expires_at) override {
    if (sandbox_id.empty() || sandbox_id.size() > 128)
      return fail(errc::invalid_argument, "git proxy: bad sandbox id");
    if (!valid_repo_name(repo))
      return fail(errc::invalid_argument, "git proxy: invalid repository name '" + repo + "'");
    const std::string ref = "refs/heads/" + branch;
    if (branch.rfind(opts_.branch_prefix, 0) != 0 || !pkt::is_valid_ref_name(ref))
      return fail(errc::invalid_argument, "git proxy: branch '" + printable(branch) +
                                              "' is not a valid branch under '" +
                                              opts_.branch_prefix + "'");
    auto cred = random_hex(32);
    if (!cred)
      return cred.error();
    const std::string hash = sha256_hex(*cred);
    std::lock_guard<std::mutex> lock(mu_);
    if (auto old = hash_of_.find(sandbox_id); old != hash_of_.end())
      grants_.erase(old->second);
    hash_of_[sandbox_id] = hash;
    grants_[hash] = grant{std::move(sandbox_id), std::move(repo), std::move(branch), expires_at};
    return cred;
  }

  void revoke_sandbox(std::string_view sandbox_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = hash_of_.find(std::string(sandbox_id)); it != hash_of_.end())
      grants_[it->second].revoked = true;
  }

  void stop() override {
    if (stopped_.exchange(true))
      return;
    pool_.stop();
    tcp_.reset();
    unix_.reset();
    pool_.reset();
    if (!opts_.unix_socket.empty()) {
      std::error_code ec;
      std::filesystem::remove(opts_.unix_socket, ec);
    }
  }

 private:
  net::awaitable<void> accept_tcp() {
    while (true) {
      beast::error_code ec;
      auto strand = net::make_strand(pool_.context());
      tcp::socket sock(strand);
      co_await tcp_->async_accept(sock, net::redirect_error(use_awaitable, ec));
      if (ec == net::error::operation_aborted || !tcp_->is_open())
        co_return;
      if (!ec)
        net::co_spawn(strand, serve(beast::tcp_stream(std::move(sock))), net::detached);
    }
  }

  net::awaitable<void> accept_unix() {
    while (true) {
      beast::error_code ec;
      auto strand = net::make_strand(pool_.context());
      net::local::stream_protocol::socket sock(strand);
      co_await unix_->async_accept(sock, net::redirect_error(use_awaitable, ec));
      if (ec == net::error::operation_aborted || !unix_->is_open())
        co_return;
      if (!ec)
        net::co_spawn(strand, serve(unix_stream(std::move(sock))), net::detached);
    }
  }

  template <class Stream>
  net::awaitable<void> serve(Stream stream) {
    git_operation op;
    const auto started = std::chrono::steady_clock::now();
    co_await handle(stream, op);
    op.duration = std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - started);
    beast::error_code ec;
    stream.socket().shutdown(net::socket_base::shutdown_send, ec);
    if (opts_.observer && op.http_status != 0)
      opts_.observer(op);
  }

  template <class Stream>
  net::awaitable<void> reply_text(Stream& stream, git_operation& op, http::status st,
                                  std::string text, op_result result) {
    http::response<http::string_body> res{st, 11};
    res.set(http::field::content_type, "text/plain; charset=utf-8");
    res.set(http::field::cache_control, "no-cache");
    if (st == http::status::unauthorized)
      res.set(http::field::www_authenticate, "Basic realm=\"ferry git proxy\"");
    res.keep_alive(false);
    res.body() = "ferry git proxy: " + text + "\n";
    res.prepare_payload();
    op.result = result;
    op.reason = text;
    op.http_status = static_cast<int>(st);
    op.bytes_out += res.body().size();
    beast::error_code ec;
    stream.expires_after(opts_.io_timeout);
    co_await http::async_write(stream, res, net::redirect_error(use_awaitable, ec));
  }

  template <class Stream>
  net::awaitable<void> handle(Stream& stream, git_operation& op) {
    beast::flat_buffer buf;
    http::request_parser<http::buffer_body> parser;
    parser.header_limit(16 * 1024);
    parser.body_limit(no_body_limit);
    beast::error_code ec;
    stream.expires_after(opts_.io_timeout);
    co_await http::async_read_header(stream, buf, parser, net::redirect_error(use_awaitable, ec));
    if (ec)
      co_return;  // nothing to answer (closed, garbage, timeout); not a git operation
    auto& req = parser.get();
    op.ferry_sandbox = printable(sv(req["Ferry-Sandbox"]), 128);
    op.protocol_version = req["Git-Protocol"].find("version=2") != beast::string_view::npos ? 2 : 0;

    auto parsed = parse_git_target(req.method(), sv(req.target()));
    if (auto* refused = std::get_if<target_refusal>(&parsed)) {
      co_await reply_text(stream, op, refused->status, "refused: " + refused->reason,
                          op_result::refused);
      co_return;
    }
    const auto target = std::get<git_target>(std::move(parsed));
    op.repo = target.repo;
    op.service = target.receive ? git_service::receive_pack : git_service::upload_pack;
    op.advertisement = target.endpoint == git_endpoint::info_refs;

    const auto creds = parse_basic(sv(req[http::field::authorization]));
    if (!creds) {
      co_await reply_text(stream, op, http::status::unauthorized,
                          "authentication required (use the sandbox's git credential)",
                          op_result::refused);
      co_return;
    }
    grant g;
    {
      const std::string hash = sha256_hex(creds->password);
      std::lock_guard<std::mutex> lock(mu_);
      auto it = grants_.find(hash);
      if (it != grants_.end())
        g = it->second;
    }
    if (g.sandbox_id.empty()) {
      co_await reply_text(stream, op, http::status::forbidden, "invalid credential",
                          op_result::refused);
      co_return;
    }
    op.sandbox_id = g.sandbox_id;
    if (g.revoked) {
      co_await reply_text(stream, op, http::status::forbidden,
                          "credential revoked (sandbox " + g.sandbox_id + " has ended)",
                          op_result::refused);
      co_return;
    }
    if (std::chrono::system_clock::now() >= g.expires_at) {
      co_await reply_text(stream, op, http::status::forbidden,
                          "credential expired (sandbox " + g.sandbox_id + ")", op_result::refused);
      co_return;
    }
    if (g.repo != target.repo) {
      co_await reply_text(stream, op, http::status::forbidden,
                          "this credential is not valid for repository '" + target.repo +
                              "' (only '" + g.repo + "')",
                          op_result::refused);
      co_return;
    }

    std::string held;  // request body bytes already read (a push's command list)
    if (target.endpoint == git_endpoint::receive_pack) {
      const bool go = co_await check_push(stream, buf, parser, g, op, held);
      if (!go)
        co_return;
    }
    co_await relay(stream, buf, parser, op, std::move(held));
  }

  // Reads the push's command list and applies the policy. Returns true when the push may go
  // upstream (`held` then holds the bytes read so far); otherwise it has answered.
  template <class Stream>
  net::awaitable<bool> check_push(Stream& stream, beast::flat_buffer& buf,
                                  http::request_parser<http::buffer_body>& parser,
                                  const grant& g, git_operation& op, std::string& held) {
    if (auto ce = parser.get()[http::field::content_encoding];
        !ce.empty() && !beast::iequals(ce, "identity")) {
      co_await reply_text(stream, op, http::status::unsupported_media_type,
                          "refused push: compressed receive-pack requests are not accepted",
                          op_result::refused);
      co_return false;
    }
    std::vector<char> body(chunk);
    pkt::update_parse up;
    beast::error_code ec;
    while (true) {
      up = pkt::parse_update_request(held);
      if (up.st != pkt::status::need_more || parser.is_done() || held.size() > max_command_list)
        break;
      const std::size_t n = co_await read_piece(stream, buf, parser, body, opts_.io_timeout, ec);
      if (ec)
        co_return false;  // the client went away
      held.append(body.data(), n);
      op.bytes_in += n;
    }
    if (up.st == pkt::status::malformed) {
      co_await reply_text(stream, op, http::status::bad_request, "refused push: " + up.error,
                          op_result::refused);
      co_return false;
    }
    if (up.st == pkt::status::need_more) {
      co_await reply_text(stream, op, http::status::bad_request,
                          "refused push: incomplete or oversized command list",
                          op_result::refused);
      co_return false;
    }
    std::vector<std::string> reasons;
    bool any_refused = false;
    for (std::size_t i = 0; i < up.req.commands.size(); ++i) {
      const auto& cmd = up.req.commands[i];
      op.updates.push_back({printable(cmd.ref), cmd.old_oid, cmd.new_oid});
      std::string why = refusal_of(cmd, g.branch);
      for (std::size_t j = 0; j < i && why.empty(); ++j)
        if (up.req.commands[j].ref == cmd.ref)
          why = "duplicate ref in one push";
      any_refused = any_refused || !why.empty();
      reasons.push_back(std::move(why));
    }
    if (!any_refused)
      co_return true;

    // Refused: nothing goes upstream. Read (and drop) the rest of the body so that git gets our
    // answer rather than a reset, then answer like receive-pack would.
    std::size_t drained = 0;
    while (!parser.is_done() && drained < max_drain) {
      const std::size_t n = co_await read_piece(stream, buf, parser, body, opts_.io_timeout, ec);
      if (ec)
        break;
      drained += n;
      op.bytes_in += n;
    }
    std::string summary;
    std::string report;
    (void)pkt::append_data(report, "unpack ok\n");
    for (std::size_t i = 0; i < up.req.commands.size(); ++i) {
      const std::string why = reasons[i].empty()
                                  ? "refused with the rest of the push (atomic)"
                                  : reasons[i];
      const std::string ref = printable(up.req.commands[i].ref);
      (void)pkt::append_data(report, "ng " + ref + " " + why + "\n");
      if (!reasons[i].empty())
        summary += (summary.empty() ? "" : "; ") + ref + ": " + why;
    }
    pkt::append_flush(report);
    std::string out;
    const bool sideband = pkt::has_capability(up.req, "side-band-64k") ||
                          pkt::has_capability(up.req, "side-band");
    if (sideband) {
      const std::size_t max_part = (pkt::has_capability(up.req, "side-band-64k")
                                        ? pkt::max_payload_size
                                        : 1000 - 4) - 1;
      (void)pkt::append_data(out, "\2ferry git proxy: push refused (only refs/heads/" +
                                      g.branch + " may be updated)\n");
      for (std::size_t p = 0; p < report.size(); p += max_part)
        (void)pkt::append_data(out, "\1" + report.substr(p, max_part));
      pkt::append_flush(out);
    } else {
      out = report;
    }
    http::response<http::string_body> res{http::status::ok, 11};
    res.set(http::field::content_type, "application/x-git-receive-pack-result");
    res.set(http::field::cache_control, "no-cache");
    res.keep_alive(false);
    res.body() = std::move(out);
    res.prepare_payload();
    op.result = op_result::refused;
    op.reason = summary;
    op.http_status = 200;
    op.bytes_out += res.body().size();
    stream.expires_after(opts_.io_timeout);
    co_await http::async_write(stream, res, net::redirect_error(use_awaitable, ec));
    co_return false;
  }

  // Connects upstream (plain or TLS) and runs the exchange.
  template <class Stream>
  net::awaitable<void> relay(Stream& client, beast::flat_buffer& buf,
                             http::request_parser<http::buffer_body>& parser, git_operation& op,
                             std::string held) {
    auto ex = co_await net::this_coro::executor;
    const std::string where = up_.host + ":" + up_.port;
    beast::error_code ec;
    tcp::resolver resolver(ex);
    auto endpoints = co_await resolver.async_resolve(up_.host, up_.port,
                                                     net::redirect_error(use_awaitable, ec));
    if (ec) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "the forge at " + where + " is unreachable: " + ec.message(),
                          op_result::upstream_error);
      co_return;
    }
    beast::tcp_stream tcp_up(ex);
    tcp_up.expires_after(opts_.io_timeout);
    co_await tcp_up.async_connect(endpoints, net::redirect_error(use_awaitable, ec));
    if (ec) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "the forge at " + where + " is unreachable: " + ec.message(),
                          op_result::upstream_error);
      co_return;
    }
    if (!up_.tls) {
      co_await exchange(client, buf, parser, tcp_up, op, std::move(held));
      co_return;
    }
    beast::ssl_stream<beast::tcp_stream> tls_up(std::move(tcp_up), tls_);
    if (!SSL_set_tlsext_host_name(tls_up.native_handle(), up_.host.c_str())) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "cannot set TLS server name for " + where, op_result::upstream_error);
      co_return;
    }
    tls_up.set_verify_callback(ssl::host_name_verification(up_.host));
    beast::get_lowest_layer(tls_up).expires_after(opts_.io_timeout);
    co_await tls_up.async_handshake(ssl::stream_base::client,
                                    net::redirect_error(use_awaitable, ec));
    if (ec) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "TLS with the forge at " + where + " failed: " + ec.message(),
                          op_result::upstream_error);
      co_return;
    }
    co_await exchange(client, buf, parser, tls_up, op, std::move(held));
  }

  // One request upstream and its answer back, both streamed.
  template <class Stream, class Up>
  net::awaitable<void> exchange(Stream& client, beast::flat_buffer& buf,
                                http::request_parser<http::buffer_body>& parser, Up& up,
                                git_operation& op, std::string held) {
    auto& req = parser.get();
    upstream_auth auth;
    auto got = opts_.token([&](std::string_view token) {
      std::string pair = opts_.upstream_user + ":" + std::string(token);
      auth.header = "Basic " + base64(pair);
      auth.needles = {std::string(token), base64(pair)};
      OPENSSL_cleanse(pair.data(), pair.size());
    });
    if (!got || auth.header.empty()) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "the forge token is not available", op_result::upstream_error);
      co_return;
    }
    auto lowest = [&]() -> beast::tcp_stream& { return beast::get_lowest_layer(up); };

    http::request<http::buffer_body> ureq{req.method(), up_.prefix + std::string(req.target()), 11};
    const bool default_port = (up_.tls && up_.port == "443") || (!up_.tls && up_.port == "80");
    ureq.set(http::field::host, default_port ? up_.host : up_.host + ":" + up_.port);
    for (auto f : {http::field::user_agent, http::field::content_type,
                   http::field::content_encoding, http::field::accept,
                   http::field::accept_encoding, http::field::accept_language})
      if (auto v = req[f]; !v.empty())
        ureq.set(f, v);
    if (auto v = req["Git-Protocol"]; !v.empty())
      ureq.set("Git-Protocol", v);
    ureq.set(http::field::authorization, auth.header);
    ureq.keep_alive(false);
    const bool has_body = req.method() == http::verb::post;
    if (has_body) {
      if (auto len = parser.content_length())
        ureq.content_length(*len);
      else
        ureq.chunked(true);
    }
    ureq.body().data = nullptr;
    ureq.body().more = has_body;
    http::request_serializer<http::buffer_body> usr{ureq};
    beast::error_code ec;
    lowest().expires_after(opts_.io_timeout);
    co_await http::async_write_header(up, usr, net::redirect_error(use_awaitable, ec));
    // Body: what was held back, then the rest as it comes.
    std::vector<char> body(chunk);
    bool client_failed = false;
    if (has_body) {
      auto send = [&](const char* data, std::size_t n, bool more) -> net::awaitable<void> {
        ureq.body().data = n ? const_cast<char*>(data) : nullptr;
        ureq.body().size = n;
        ureq.body().more = more;
        lowest().expires_after(opts_.io_timeout);
        co_await http::async_write(up, usr, net::redirect_error(use_awaitable, ec));
        if (ec == http::error::need_buffer)
          ec = {};
      };
      if (!ec && !held.empty())
        co_await send(held.data(), held.size(), true);
      while (!ec && !parser.is_done()) {
        beast::error_code rec;
        const std::size_t n = co_await read_piece(client, buf, parser, body, opts_.io_timeout, rec);
        if (rec) {
          client_failed = true;
          break;
        }
        op.bytes_in += n;
        if (n)
          co_await send(body.data(), n, true);
      }
      if (!ec && !client_failed)
        co_await send(nullptr, 0, false);
    }
    if (client_failed) {
      op.result = op_result::refused;
      op.reason = "the sandbox's request body ended early";
      op.http_status = 400;
      co_return;
    }
    if (ec) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "sending to the forge at " + up_.host + " failed: " + ec.message(),
                          op_result::upstream_error);
      co_return;
    }

    beast::flat_buffer ubuf;
    http::response_parser<http::buffer_body> uparser;
    uparser.body_limit(no_body_limit);
    uparser.header_limit(16 * 1024);
    lowest().expires_after(opts_.io_timeout);
    co_await http::async_read_header(up, ubuf, uparser, net::redirect_error(use_awaitable, ec));
    if (ec) {
      co_await reply_text(client, op, http::status::bad_gateway,
                          "no answer from the forge at " + up_.host + ": " + ec.message(),
                          op_result::upstream_error);
      co_return;
    }
    auto& ures = uparser.get();
    const unsigned status = ures.result_int();
    if (status >= 300) {
      // An error (or a redirect, which git must not follow around the proxy): pass a scrubbed,
      // bounded copy of the text.
      std::string text;
      while (!uparser.is_done() && text.size() < max_error_body) {
        const std::size_t n = co_await read_piece(up, ubuf, uparser, body, opts_.io_timeout, ec);
        if (ec)
          break;
        text.append(body.data(), n);
      }
      text.resize(std::min(text.size(), max_error_body));
      scrub(text, auth.needles);
      while (!text.empty() && (text.back() == '\n' || text.back() == '\r'))
        text.pop_back();
      const bool auth_failed = status == 401 || status == 403;
      // Built outside the co_await: g++ 12 double-destroys temporaries of a conditional
      // expression inside a co_await's arguments.
      const http::status answer =
          auth_failed || status < 400 ? http::status::bad_gateway : ures.result();
      std::string message = auth_failed ? "the forge refused the proxy's credentials (HTTP "
                                        : "the forge answered HTTP ";
      message += std::to_string(status);
      if (text.empty())
        message += ")";
      else
        message += "): " + printable_text(text);
      co_await reply_text(client, op, answer, std::move(message),
          op_result::upstream_error);
      co_return;
    }
    http::response<http::buffer_body> res;
    res.version(11);
    res.result(ures.result());
    for (auto f : {http::field::content_type, http::field::cache_control, http::field::expires,
                   http::field::pragma, http::field::content_encoding})
      if (auto v = ures[f]; !v.empty())
        res.set(f, v);
    res.keep_alive(false);
    res.chunked(true);
    res.body().data = nullptr;
    res.body().more = true;
    http::response_serializer<http::buffer_body> sr{res};
    client.expires_after(opts_.io_timeout);
    co_await http::async_write_header(client, sr, net::redirect_error(use_awaitable, ec));
    op.http_status = static_cast<int>(status);
    while (!ec) {
      std::size_t n = 0;
      bool more = true;
      if (uparser.is_done()) {
        more = false;
      } else {
        n = co_await read_piece(up, ubuf, uparser, body, opts_.io_timeout, ec);
        if (ec) {
          op.result = op_result::upstream_error;
          op.reason = "the forge's answer broke off: " + ec.message();
          co_return;  // the client sees a truncated chunked body and fails
        }
        if (n == 0 && !uparser.is_done())
          continue;
      }
      res.body().data = n ? body.data() : nullptr;
      res.body().size = n;
      res.body().more = more;
      client.expires_after(opts_.io_timeout);
      co_await http::async_write(client, sr, net::redirect_error(use_awaitable, ec));
      if (ec == http::error::need_buffer)
        ec = {};
      op.bytes_out += n;
      if (!more)
        break;
    }
    if (ec) {
      op.result = op_result::upstream_error;
      op.reason = "the sandbox went away: " + ec.message();
      co_return;
    }
    op.result = op_result::ok;
  }

  static std::string printable_text(const std::string& s) {
    std::string out;
    for (char c : s.substr(0, 2000)) {
      const auto u = static_cast<unsigned char>(c);
      out.push_back(c == '\n' ? ' ' : (u < 0x20 || u >= 0x7f) ? '?' : c);
    }
    return out;
  }

  const git_proxy_options opts_;
  const upstream_url up_;
  io_pool pool_;
  ssl::context tls_;
  std::unique_ptr<tcp::acceptor> tcp_;
  std::unique_ptr<net::local::stream_protocol::acceptor> unix_;
  std::uint16_t port_ = 0;
  std::atomic<bool> stopped_{false};
  std::mutex mu_;
  std::unordered_map<std::string, grant> grants_;       // GUARDED_BY(mu_): by credential hash
  std::unordered_map<std::string, std::string> hash_of_;  // GUARDED_BY(mu_): sandbox → hash
};

}  // namespace

result<std::unique_ptr<git_proxy>> git_proxy::start(git_proxy_options opts) {
  auto up = parse_upstream(opts.upstream_url);
  if (!up)
    return up.error();
  if (!opts.token)
    return fail(errc::invalid_argument, "git proxy: no token source for the forge");
  if (opts.branch_prefix.empty())
    return fail(errc::invalid_argument, "git proxy: the branch prefix must not be empty");
  auto proxy = std::make_unique<git_proxy_impl>(std::move(opts), std::move(*up));
  if (auto r = proxy->listen(); !r)
    return r.error();
  return std::unique_ptr<git_proxy>(std::move(proxy));
}

}  // namespace ferry::gitproxy
