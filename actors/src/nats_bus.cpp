// nats_bus: the NATS implementation of `bus` (nats.c), the connection both the bus and the
// outbox relay open from `nats_options` (nats_connection.h), and the embedded nats-server child.
// natsX_Verb names stay in actors/src.

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <condition_variable>
#include <fstream>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include <nats/nats.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "ferry/actors/bus.h"
#include "ferry/sandbox/process.h"
#include "nats_connection.h"

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

// ---- nats_options → a nats.c connection (shared with the outbox relay; nats_connection.h) ----

namespace {

/// One URL of a comma-separated list, cut around its userinfo:
/// `scheme` + `userinfo` + "@" + `host_port` + `rest` ("nats://u:pw@h:4222/x").
struct url_parts {
  std::string_view scheme;     ///< "nats://", or "" when the URL has none
  std::optional<std::string_view> userinfo;  ///< "u:pw" or "token"; nullopt without '@'
  std::string_view host_port;  ///< "h:4222", "[::1]:4222"
  std::string_view rest;       ///< "/x"
};

std::vector<url_parts> split_urls(std::string_view urls) {
  std::vector<url_parts> out;
  for (size_t start = 0;;) {
    auto comma = urls.find(',', start);
    auto url = urls.substr(start, comma == std::string_view::npos ? urls.npos : comma - start);
    url_parts p;
    auto scheme_end = url.find("://");
    scheme_end = scheme_end == std::string_view::npos ? 0 : scheme_end + 3;
    p.scheme = url.substr(0, scheme_end);
    auto authority = url.substr(scheme_end);
    auto slash = authority.find('/');
    if (slash != std::string_view::npos) {
      p.rest = authority.substr(slash);
      authority = authority.substr(0, slash);
    }
    if (auto at = authority.rfind('@'); at != std::string_view::npos) {
      p.userinfo = authority.substr(0, at);
      authority.remove_prefix(at + 1);
    }
    p.host_port = authority;
    out.push_back(p);
    if (comma == std::string_view::npos)
      return out;
    start = comma + 1;
  }
}

/// The secrets a URL list carries: passwords of `user:pass@`, tokens of `token@`.
std::vector<std::string> url_secrets(std::string_view urls) {
  std::vector<std::string> out;
  for (const auto& p : split_urls(urls))
    if (p.userinfo) {
      auto colon = p.userinfo->find(':');
      out.emplace_back(colon == std::string_view::npos ? *p.userinfo
                                                       : p.userinfo->substr(colon + 1));
    }
  return out;
}

/// The hosts of a URL list, in order ("nats://u:p@h:4222,[::1]" → {"h", "::1"}).
std::vector<std::string> url_hosts(std::string_view urls) {
  std::vector<std::string> out;
  for (const auto& p : split_urls(urls)) {
    auto host = p.host_port;
    while (!host.empty() && host.front() == ' ')
      host.remove_prefix(1);
    if (!host.empty() && host.front() == '[')
      host = host.substr(1, host.find(']') - 1);
    else if (auto colon = host.rfind(':'); colon != std::string_view::npos)
      host = host.substr(0, colon);
    out.emplace_back(host);
  }
  return out;
}

/// Whether `path` can be opened for reading; else why not ("No such file or directory").
std::string unreadable(const std::filesystem::path& path) {
  errno = 0;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f)
    return std::strerror(errno ? errno : ENOENT);
  std::fclose(f);
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    return "is a directory";
  return {};
}

// NKeys (github.com/nats-io/nkeys): base32 (RFC 4648, no padding) of
// prefix byte(s) + 32 key bytes + CRC-16/XMODEM (little endian).
constexpr uint8_t nkey_prefix_seed = 18 << 3;  // 'S'
constexpr uint8_t nkey_prefix_user = 20 << 3;  // 'U'
constexpr std::string_view base32_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

uint16_t crc16_xmodem(const uint8_t* data, size_t n) {
  uint16_t crc = 0;
  for (size_t i = 0; i < n; ++i) {
    crc ^= static_cast<uint16_t>(data[i]) << 8;
    for (int b = 0; b < 8; ++b)
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                           : static_cast<uint16_t>(crc << 1);
  }
  return crc;
}

std::optional<std::vector<uint8_t>> base32_decode(std::string_view in) {
  std::vector<uint8_t> out;
  uint32_t buffer = 0;
  int bits = 0;
  for (char c : in) {
    auto v = base32_alphabet.find(c);
    if (v == std::string_view::npos)
      return std::nullopt;
    buffer = (buffer << 5) | static_cast<uint32_t>(v);
    bits += 5;
    if (bits >= 8) {
      out.push_back(static_cast<uint8_t>(buffer >> (bits - 8)));
      bits -= 8;
    }
  }
  return out;
}

std::string base32_encode(const std::vector<uint8_t>& in) {
  std::string out;
  uint32_t buffer = 0;
  int bits = 0;
  for (uint8_t byte : in) {
    buffer = (buffer << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out.push_back(base32_alphabet[(buffer >> (bits - 5)) & 31]);
      bits -= 5;
    }
  }
  if (bits > 0)
    out.push_back(base32_alphabet[(buffer << (5 - bits)) & 31]);
  return out;
}

/// The public key (`U…`) of the user NKey seed in `seed_file`. The seed never leaves this
/// function (its copies are wiped) and never appears in an error.
result<std::string> nkey_public_key(const std::filesystem::path& seed_file) {
  std::string text = sandbox::read_small_file(seed_file);
  auto wipe = [](auto& bytes) { OPENSSL_cleanse(bytes.data(), bytes.size()); };
  // The seed is the first word starting with "SU" (a bare seed file, or one with comments).
  std::string seed;
  for (size_t i = 0; i + 1 < text.size(); ++i) {
    const bool word_start = i == 0 || std::isspace(static_cast<unsigned char>(text[i - 1]));
    if (!word_start || text[i] != 'S' || text[i + 1] != 'U')
      continue;
    size_t end = i;
    while (end < text.size() && base32_alphabet.find(text[end]) != std::string_view::npos)
      ++end;
    seed = text.substr(i, end - i);
    break;
  }
  wipe(text);
  const std::string where = "NKey seed file " + seed_file.string();
  if (seed.empty())
    return fail(where + ": no user seed (a word starting with SU) in it");
  auto raw = base32_decode(seed);
  wipe(seed);
  if (!raw || raw->size() != 36) {
    if (raw)
      wipe(*raw);
    return fail(where + ": the seed is not a valid NKey seed");
  }
  auto& r = *raw;
  const uint16_t crc = static_cast<uint16_t>(r[34] | (r[35] << 8));
  const uint8_t kind = static_cast<uint8_t>(((r[0] & 7) << 5) | ((r[1] & 0xf8) >> 3));
  const bool valid = crc16_xmodem(r.data(), 34) == crc && (r[0] & 0xf8) == nkey_prefix_seed;
  EVP_PKEY* key = valid && kind == nkey_prefix_user
                    ? EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, r.data() + 2, 32)
                    : nullptr;
  wipe(r);
  if (!valid)
    return fail(where + ": the seed is not a valid NKey seed (checksum or prefix wrong)");
  if (kind != nkey_prefix_user)
    return fail(where + ": the seed is not a user seed (it must start with SU)");
  if (!key)
    return fail(where + ": OpenSSL cannot load the seed as an Ed25519 key");
  std::vector<uint8_t> pub(1 + 32);
  pub[0] = nkey_prefix_user;
  size_t len = 32;
  const bool got = EVP_PKEY_get_raw_public_key(key, pub.data() + 1, &len) == 1 && len == 32;
  EVP_PKEY_free(key);
  if (!got)
    return fail(where + ": OpenSSL cannot derive the public key");
  const uint16_t pub_crc = crc16_xmodem(pub.data(), pub.size());
  pub.push_back(static_cast<uint8_t>(pub_crc & 0xff));
  pub.push_back(static_cast<uint8_t>(pub_crc >> 8));
  return base32_encode(pub);
}

struct options_deleter {
  void operator()(natsOptions* o) const { natsOptions_Destroy(o); }
};
using options_ptr = std::unique_ptr<natsOptions, options_deleter>;

/// natsOptions for `opts`; `what` receives the step that failed.
result<options_ptr> build_options(const nats_options& opts, const detail::connection_tuning& t) {
  natsOptions* raw = nullptr;
  if (auto s = natsOptions_Create(&raw); s != NATS_OK)
    return detail::nats_failure("create NATS options", s, opts);
  options_ptr no(raw);
  auto step = [&](natsStatus s, std::string_view what) -> result<void> {
    if (s != NATS_OK)
      return detail::nats_failure(what, s, opts);
    return {};
  };
  const std::string name = opts.client_name + t.name_suffix;
  for (auto [s, what] : {
         std::pair{natsOptions_SetURL(no.get(), opts.url.c_str()), "set the NATS URL"},
         std::pair{natsOptions_SetName(no.get(), name.c_str()), "set the NATS client name"},
         std::pair{natsOptions_SetMaxReconnect(no.get(), -1), "set NATS reconnects"},
         std::pair{natsOptions_SetReconnectWait(no.get(), 250), "set NATS reconnect wait"},
         std::pair{natsOptions_SetReconnectBufSize(no.get(), t.reconnect_buffer_bytes),
                   "set the NATS reconnect buffer"},
         std::pair{natsOptions_SetSendAsap(no.get(), t.send_asap), "set NATS send-asap"},
       })
    if (auto ok = step(s, what); !ok)
      return ok.error();

  if (!opts.user.empty())
    if (auto ok = step(natsOptions_SetUserInfo(no.get(), opts.user.c_str(), opts.password.c_str()),
                       "set the NATS user");
        !ok)
      return ok.error();
  if (!opts.token.empty())
    if (auto ok = step(natsOptions_SetToken(no.get(), opts.token.c_str()), "set the NATS token");
        !ok)
      return ok.error();
  if (!opts.creds_file.empty())
    if (auto ok = step(natsOptions_SetUserCredentialsFromFiles(no.get(), opts.creds_file.c_str(),
                                                               nullptr),
                       "use NATS credentials file " + opts.creds_file.string());
        !ok)
      return ok.error();
  if (!opts.nkey_seed_file.empty()) {
    auto pub = nkey_public_key(opts.nkey_seed_file);
    if (!pub)
      return pub.error();
    if (auto ok = step(natsOptions_SetNKeyFromSeed(no.get(), pub->c_str(),
                                                   opts.nkey_seed_file.c_str()),
                       "use NKey seed file " + opts.nkey_seed_file.string());
        !ok)
      return ok.error();
  }

  if (opts.uses_tls()) {
    if (auto ok = step(natsOptions_SetSecure(no.get(), true), "require TLS for NATS"); !ok)
      return ok.error();
    if (opts.tls_skip_verify) {
      if (auto ok = step(natsOptions_SkipServerVerification(no.get(), true),
                         "skip NATS server verification");
          !ok)
        return ok.error();
    } else {
      // nats.c verifies against nothing but the files it is given: without a CA file, trust the
      // system's store (OpenSSL's default file, $SSL_CERT_FILE), as other TLS clients do.
      std::filesystem::path ca = opts.tls_ca_file;
      if (ca.empty()) {
        const char* env = std::getenv(X509_get_default_cert_file_env());
        ca = env && *env ? env : X509_get_default_cert_file();
      }
      if (auto why = unreadable(ca); !why.empty())
        return fail("NATS TLS CA file " + ca.string() + ": " + why);
      if (auto ok = step(natsOptions_LoadCATrustedCertificates(no.get(), ca.c_str()),
                         "load NATS TLS CA file " + ca.string());
          !ok)
        return ok.error();
      // nats.c checks the certificate's name only when told which: by default the URL's host,
      // so a certificate the CA issued to another server is refused too.
      std::string server_name = opts.tls_server_name;
      if (server_name.empty()) {
        auto hosts = url_hosts(opts.url);
        if (std::all_of(hosts.begin(), hosts.end(), [&](auto& h) { return h == hosts.front(); }))
          server_name = hosts.empty() ? std::string() : hosts.front();
      }
      if (!server_name.empty())
        if (auto ok = step(natsOptions_SetExpectedHostname(no.get(), server_name.c_str()),
                           "set the NATS TLS server name");
            !ok)
          return ok.error();
    }
    if (!opts.tls_cert_file.empty())
      if (auto ok = step(natsOptions_LoadCertificatesChain(no.get(), opts.tls_cert_file.c_str(),
                                                           opts.tls_key_file.c_str()),
                         "load NATS TLS client certificate " + opts.tls_cert_file.string() +
                           " and key " + opts.tls_key_file.string());
          !ok)
        return ok.error();
  }
  return no;
}

}  // namespace

bool nats_options::uses_tls() const {
  return require_tls || !tls_ca_file.empty() || !tls_cert_file.empty() ||
         !tls_key_file.empty() || !tls_server_name.empty() || tls_skip_verify ||
         url.rfind("tls://", 0) == 0;
}

std::string redact_nats_url(std::string_view urls) {
  std::string out;
  bool first = true;
  for (const auto& p : split_urls(urls)) {
    if (!std::exchange(first, false))
      out += ',';
    out += p.scheme;
    if (p.userinfo) {
      auto colon = p.userinfo->find(':');
      out += colon == std::string_view::npos ? std::string("***")
                                             : std::string(p.userinfo->substr(0, colon)) + ":***";
      out += '@';
    }
    out += p.host_port;
    out += p.rest;
  }
  return out;
}

result<void> check_nats_options(const nats_options& opts) {
  if (opts.url.empty())
    return fail(errc::invalid_argument, "no NATS URL");
  if (!opts.password.empty() && opts.user.empty())
    return fail(errc::invalid_argument, "a NATS password needs a user name");
  if (!opts.user.empty() && opts.password.empty())
    return fail(errc::invalid_argument, "NATS user " + opts.user + " has no password");
  int methods = !opts.user.empty() + !opts.token.empty() + !opts.nkey_seed_file.empty() +
                !opts.creds_file.empty();
  if (methods > 1)
    return fail(errc::invalid_argument,
                "more than one NATS authentication method given (user+password, token, NKey "
                "seed, credentials file): use one");
  if (opts.tls_cert_file.empty() != opts.tls_key_file.empty())
    return fail(errc::invalid_argument, opts.tls_cert_file.empty()
                                          ? "a NATS TLS client key needs its certificate"
                                          : "a NATS TLS client certificate needs its key");
  if (opts.tls_skip_verify && (!opts.tls_ca_file.empty() || !opts.tls_server_name.empty()))
    return fail(errc::invalid_argument,
                "NATS TLS: skipping server verification contradicts a CA file or server name");
  const std::pair<const std::filesystem::path*, const char*> files[] = {
    {&opts.nkey_seed_file, "NKey seed file"},   {&opts.creds_file, "credentials file"},
    {&opts.tls_ca_file, "TLS CA file"},         {&opts.tls_cert_file, "TLS certificate file"},
    {&opts.tls_key_file, "TLS key file"},
  };
  for (auto [path, what] : files)
    if (!path->empty())
      if (auto why = unreadable(*path); !why.empty())
        return fail(errc::invalid_argument,
                    std::string("NATS ") + what + " " + path->string() + ": " + why);
  return {};
}

namespace detail {

std::string scrub_secrets(std::string text, const nats_options& opts) {
  auto secrets = url_secrets(opts.url);
  secrets.push_back(opts.password);
  secrets.push_back(opts.token);
  for (const auto& secret : secrets) {
    if (secret.size() < 4)
      continue;
    for (size_t at = text.find(secret); at != std::string::npos; at = text.find(secret, at + 3))
      text.replace(at, secret.size(), "***");
  }
  return text;
}

error_info nats_failure(std::string_view what, natsStatus s, const nats_options& opts) {
  std::string message = std::string(what) + ": " + natsStatus_GetText(s);
  natsStatus last = NATS_OK;
  const char* last_error = nats_GetLastError(&last);
  std::string detail = last_error && last == s ? last_error : "";
  // nats.c prefixes where in its source it noticed: "(conn.c:1905): ". Not for operators.
  if (detail.size() > 1 && detail.front() == '(')
    if (auto end = detail.find("): "); end != std::string::npos && end < 40)
      detail.erase(0, end + 3);
  if (!detail.empty() && detail != natsStatus_GetText(s))
    message += ": " + detail;
  return error_info{scrub_secrets(std::move(message), opts)};
}

result<natsConnection*> open_connection(const nats_options& opts, const connection_tuning& t) {
  if (auto ok = check_nats_options(opts); !ok)
    return ok.error();
  auto no = build_options(opts, t);
  if (!no)
    return no.error();
  const std::string where = "connect to NATS at " + redact_nats_url(opts.url);
  natsConnection* nc = nullptr;
  ERR_clear_error();  // what is queued after the attempt is about it
  auto s = natsConnection_Connect(&nc, no->get());
  if (s == NATS_OK)
    return nc;
  if (t.retry_when_unreachable && (s == NATS_NO_SERVER || s == NATS_TIMEOUT)) {
    // Unreachable (not refused): keep trying in the background.
    natsOptions_SetRetryOnFailedConnect(no->get(), true, nullptr, nullptr);
    s = natsConnection_Connect(&nc, no->get());
    if (s == NATS_OK || s == NATS_NOT_YET_CONNECTED)
      return nc;
  }
  auto failure = nats_failure(where, s, opts);
  // OpenSSL's own reasons, e.g. the server's alert when it wants a client certificate (nats.c
  // then only sees the connection end).
  std::string tls_reasons;
  while (unsigned long e = ERR_get_error())
    if (const char* reason = ERR_reason_error_string(e);
        reason && failure.message.find(reason) == std::string::npos &&
        tls_reasons.find(reason) == std::string::npos)
      tls_reasons += std::string(tls_reasons.empty() ? "" : "; ") + reason;
  if (!tls_reasons.empty())
    failure.message += " (TLS: " + tls_reasons + ")";
  if (tls_reasons.find("alert") != std::string::npos && opts.tls_cert_file.empty())
    failure.message += " (the server ended the TLS session: does it require a client "
                       "certificate?)";
  if (s == NATS_SSL_ERROR && !opts.tls_skip_verify)
    failure.message += opts.tls_ca_file.empty()
                         ? " (the server certificate is verified against the system's trust "
                           "store: is its CA file given?)"
                         : " (the server certificate is verified against " +
                             opts.tls_ca_file.string() + ")";
  return failure;
}

}  // namespace detail

result<std::unique_ptr<bus>> connect_nats(const nats_options& opts) {
  auto nc = detail::open_connection(opts, detail::connection_tuning{"", 64 * 1024 * 1024});
  if (!nc)
    return nc.error();
  return std::unique_ptr<bus>(new nats_bus(*nc));
}

result<std::unique_ptr<bus>> connect_nats(const std::string& url) {
  nats_options opts;
  opts.url = url;
  return connect_nats(opts);
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
