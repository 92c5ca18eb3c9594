// HTTP requests: parsing limits, authentication and routing.

#include "server.h"

#include <charconv>
#include <variant>
#include <cstdio>
#include <optional>

#include "ferry/actors/tasks.h"
#include "ferry/gitproxy/git_proxy.h"
#include "ferry/storage/journal.h"
#include "task_commands.h"

namespace ferry::gateway::detail {

namespace {

response_t json_response(http::status status, const json& body, unsigned version, bool keep_alive) {
  response_t res{status, version};
  res.set(http::field::server, "ferryd");
  res.set(http::field::content_type, "application/json");
  res.set(http::field::cache_control, "no-store");
  res.keep_alive(keep_alive);
  res.body() = body.dump() + "\n";
  res.prepare_payload();
  return res;
}

response_t error_response(http::status status, std::string_view message, unsigned version,
                          bool keep_alive) {
  return json_response(status, json{{"error", message}}, version, keep_alive);
}

json task_json(const actors::task_view& v) {
  json j = actors::to_json(v);
  j["events"] = "/api/v1/tasks/" + v.id + "/events";
  return j;
}

/// Splits "/a/b/c?x=y" into path segments and the raw query.
struct target_parts {
  std::vector<std::string_view> segments;
  std::string_view query;
};

target_parts split_target(std::string_view target) {
  target_parts out;
  auto q = target.find('?');
  if (q != std::string_view::npos) {
    out.query = target.substr(q + 1);
    target = target.substr(0, q);
  }
  size_t i = 0;
  while (i < target.size()) {
    while (i < target.size() && target[i] == '/')
      ++i;
    auto j = target.find('/', i);
    if (j == std::string_view::npos)
      j = target.size();
    if (j > i)
      out.segments.push_back(target.substr(i, j - i));
    i = j;
  }
  return out;
}

/// Value of `key` in a query string ("a=1&b=2"), if present.
std::optional<std::string_view> query_param(std::string_view query, std::string_view key) {
  while (!query.empty()) {
    auto amp = query.find('&');
    auto part = query.substr(0, amp);
    auto eq = part.find('=');
    if (part.substr(0, eq) == key)
      return eq == std::string_view::npos ? std::string_view{} : part.substr(eq + 1);
    if (amp == std::string_view::npos)
      break;
    query = query.substr(amp + 1);
  }
  return std::nullopt;
}

bool iequals_prefix(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size())
    return false;
  for (size_t i = 0; i < prefix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[i])) !=
        std::tolower(static_cast<unsigned char>(prefix[i])))
      return false;
  return true;
}

/// The request body as a JSON object, or the 400 answer that says what is wrong with it.
std::variant<json, response_t> json_object_body(const request_t& req) {
  json body;
  try {
    body = json::parse(req.body());
  } catch (const json::parse_error& e) {
    return error_response(http::status::bad_request, std::string("malformed JSON: ") + e.what(),
                          req.version(), req.keep_alive());
  }
  if (!body.is_object())
    return error_response(http::status::bad_request, "body must be a JSON object", req.version(),
                          req.keep_alive());
  return body;
}

/// 405 naming the one allowed method.
response_t method_not_allowed(const request_t& req, http::verb allowed, std::string_view what) {
  auto res = error_response(http::status::method_not_allowed,
                            "use " + std::string(http::to_string(allowed)) +
                              (what.empty() ? "" : " " + std::string(what)),
                            req.version(), req.keep_alive());
  res.set(http::field::allow, http::to_string(allowed));
  return res;
}

}  // namespace

// -- http_session implementation ------------------------------------------------------------------

void http_session::do_read() {
  parser_.emplace();
  parser_->header_limit(header_limit);
  parser_->body_limit(srv_.opts().max_body_bytes);
  stream_.expires_after(srv_.opts().request_timeout);
  // Header first: a client that sent `Expect: 100-continue` (curl does for bodies over 1 KiB)
  // waits for our go-ahead before sending the body. An oversized Content-Length already fails
  // here, so such a client never sends its body at all.
  http::async_read_header(
    stream_, buffer_, *parser_,
    [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec)
        return self->on_read(ec, n);
      auto& req = self->parser_->get();
      auto expect = req.find(http::field::expect);
      if (expect == req.end() || !beast::iequals(expect->value(), "100-continue") ||
          self->parser_->is_done())
        return self->read_body();
      auto cont = std::make_shared<http::response<http::empty_body>>(http::status::continue_,
                                                                     req.version());
      http::async_write(self->stream_, *cont, [self, cont](beast::error_code ec, size_t n) {
        if (ec)
          return self->on_read(ec, n);
        self->read_body();
      });
    });
}

void http_session::read_body() {
  http::async_read(stream_, buffer_, *parser_,
                   beast::bind_front_handler(&http_session::on_read, shared_from_this()));
}

void http_session::on_read(beast::error_code ec, size_t) {
  if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
      ec == net::error::operation_aborted || ec == net::error::connection_reset ||
      ec == net::error::eof) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    return;
  }
  if (ec == http::error::body_limit)
    return send(error_response(http::status::payload_too_large,
                               "request body exceeds " +
                                 std::to_string(srv_.opts().max_body_bytes) + " bytes",
                               11, false));
  if (ec == http::error::header_limit)
    return send(error_response(http::status::request_header_fields_too_large,
                               "request headers exceed 16 KiB", 11, false));
  if (ec)
    return send(error_response(http::status::bad_request,
                               "malformed HTTP request: " + ec.message(), 11, false));
  handle(parser_->release());
}

std::optional<token_info> http_session::authenticate(const request_t& req) {
  auto it = req.find(http::field::authorization);
  if (it == req.end())
    return std::nullopt;
  std::string_view value(it->value().data(), it->value().size());
  if (!iequals_prefix(value, "bearer "))
    return std::nullopt;
  value.remove_prefix(7);
  while (!value.empty() && value.front() == ' ')
    value.remove_prefix(1);
  return srv_.deps().tokens->verify(value);
}

void http_session::handle(request_t req) {
  try {
    route(req);
  } catch (const std::exception& e) {
    // Last line of defence: a bug in a handler answers 500 rather than taking ferryd down.
    std::fprintf(stderr, "ferryd: error: handling %s: %s\n", std::string(req.target()).c_str(),
                 e.what());
    send(error_response(http::status::internal_server_error, "internal error", req.version(),
                        false));
  }
}

void http_session::route(request_t& req) {
  auto version = req.version();
  auto keep = req.keep_alive();
  std::string_view target(req.target().data(), req.target().size());
  auto parts = split_target(target);
  auto& segs = parts.segments;

  if (segs.size() == 1 && segs[0] == "healthz") {
    if (req.method() != http::verb::get && req.method() != http::verb::head)
      return send(error_response(http::status::method_not_allowed, "use GET", version, keep));
    return send(json_response(http::status::ok, json{{"status", "ok"}}, version, keep));
  }
  if (segs.empty() || segs[0] != "api")
    return send(error_response(http::status::not_found, "no such resource", version, keep));

  auto who = authenticate(req);
  if (!who) {
    auto res = error_response(http::status::unauthorized,
                              req.find(http::field::authorization) == req.end()
                                ? "missing Authorization: Bearer <token> header"
                                : "invalid token",
                              version, keep);
    res.set(http::field::www_authenticate, "Bearer realm=\"ferry\"");
    return send(std::move(res));
  }

  // /api/v1/tokens: admins mint tokens while ferryd runs (ferryctl's offline path needs it
  // stopped). The secret is in this answer only; the journal keeps its hash.
  if (segs.size() == 3 && segs[1] == "v1" && segs[2] == "tokens") {
    if (req.method() != http::verb::post)
      return send(method_not_allowed(req, http::verb::post, "to create a token"));
    if (!who->admin)
      return send(error_response(http::status::forbidden, "only admin tokens may create tokens",
                                 version, keep));
    auto parsed = json_object_body(req);
    if (auto* bad = std::get_if<response_t>(&parsed))
      return send(std::move(*bad));
    auto& body = std::get<json>(parsed);
    auto name = body.find("name");
    if (name == body.end() || !name->is_string())
      return send(error_response(http::status::bad_request,
                                 "\"name\" is required and must be a string", version, keep));
    bool admin = false;
    if (auto a = body.find("admin"); a != body.end() && !a->is_null()) {
      if (!a->is_boolean())
        return send(error_response(http::status::bad_request, "\"admin\" must be a boolean",
                                   version, keep));
      admin = a->get<bool>();
    }
    auto secret = srv_.deps().tokens->create(name->get<std::string>(), admin);
    if (!secret)
      return send(error_response(http::status::bad_request, secret.error().message, version,
                                 keep));
    auto info = srv_.deps().tokens->verify(*secret);
    return send(json_response(http::status::created,
                              json{{"token", *secret},
                                   {"id", info ? info->id : ""},
                                   {"name", name->get<std::string>()},
                                   {"admin", admin}},
                              version, keep));
  }

  // /api/v1/environments: what a task may name in "environment". Variables are listed by name
  // only (their values may be secrets).
  if (segs.size() == 3 && segs[1] == "v1" && segs[2] == "environments") {
    if (req.method() != http::verb::get)
      return send(method_not_allowed(req, http::verb::get, "to list the environments"));
    json list = json::array();
    if (const auto* envs = srv_.deps().environments) {
      for (const auto& [name, spec] : *envs) {
        json vars = json::array();
        for (const auto& e : spec.env)
          vars.push_back(e.substr(0, e.find('=')));
        const std::string key = sandbox::environment_key(spec);
        const auto* layers = srv_.deps().layers;
        const auto* networks = srv_.deps().networks;
        auto network = networks && networks->count(name) ? networks->at(name) : srv_.deps().default_network;
        list.push_back({{"name", name},
                        {"key", key},
                        {"network", network.to_json()},
                        {"setup", !spec.setup_script.empty()},
                        {"setup_timeout_s", spec.setup_timeout.count() / 1000.0},
                        {"variables", vars},
                        {"set_up", !spec.setup_script.empty() && layers && layers->find(key).has_value()}});
      }
    }
    return send(json_response(http::status::ok,
                              json{{"environments", list}, {"default_network", srv_.deps().default_network.to_json()}},
                              version, keep));
  }

  // /api/v1/admin/egress-policy: the organisation's bound on every environment's network policy.
  if (segs.size() == 4 && segs[1] == "v1" && segs[2] == "admin" && segs[3] == "egress-policy") {
    auto* org = srv_.deps().org_egress;
    if (!org)
      return send(error_response(http::status::not_found, "no egress proxy in this ferryd", version, keep));
    if (req.method() == http::verb::get)
      return send(json_response(http::status::ok, org->current().to_json(), version, keep));
    if (req.method() != http::verb::put)
      return send(method_not_allowed(req, http::verb::put, "to set the organisation's egress policy (GET reads it)"));
    if (!who->admin)
      return send(error_response(http::status::forbidden, "only admin tokens may set the organisation's egress policy",
                                 version, keep));
    auto parsed = json_object_body(req);
    if (auto* bad = std::get_if<response_t>(&parsed))
      return send(std::move(*bad));
    auto set = org->set(std::get<json>(parsed), who->id);
    if (!set)
      return send(error_response(set.error().code == errc::invalid_argument ? http::status::bad_request
                                                                            : http::status::internal_server_error,
                                 "egress policy: " + set.error().message, version, keep));
    return send(json_response(http::status::ok, set->to_json(), version, keep));
  }

  if (segs.size() < 3 || segs[1] != "v1" || segs[2] != "tasks")
    return send(error_response(http::status::not_found, "no such resource", version, keep));

  auto& deps = srv_.deps();
  auto self = shared_from_this();

  // /api/v1/tasks
  if (segs.size() == 3) {
    if (req.method() != http::verb::post)
      return send(method_not_allowed(req, http::verb::post, "to create a task"));
    auto parsed = json_object_body(req);
    if (auto* bad = std::get_if<response_t>(&parsed))
      return send(std::move(*bad));
    auto& body = std::get<json>(parsed);
    auto cmd = body.find("command");
    if (cmd == body.end() || !cmd->is_string())
      return send(error_response(http::status::bad_request,
                                 "\"command\" is required and must be a string", version, keep));
    if (cmd->get_ref<const std::string&>().empty())
      return send(error_response(http::status::bad_request, "\"command\" must not be empty",
                                 version, keep));
    std::string repo;
    if (auto r = body.find("repo"); r != body.end() && !r->is_null()) {
      if (!r->is_string())
        return send(error_response(http::status::bad_request, "\"repo\" must be a string",
                                   version, keep));
      repo = r->get<std::string>();
      if (!gitproxy::valid_repo_name(repo))
        return send(error_response(http::status::bad_request,
                                   "\"repo\" must be a repository of the forge, \"org/name\": 1 to 4 parts of "
                                   "letters, digits, '.', '_' or '-' separated by '/', none starting with '.'",
                                   version, keep));
    }
    std::string environment;
    if (auto e = body.find("environment"); e != body.end() && !e->is_null()) {
      if (!e->is_string())
        return send(error_response(http::status::bad_request, "\"environment\" must be a string",
                                   version, keep));
      environment = e->get<std::string>();
    }
    // The task's own wall-clock limit (else ferryd's --task-wall-clock): whole seconds, 1 s to
    // 7 days.
    std::chrono::milliseconds wall_clock{0};
    if (auto w = body.find("wall_clock_limit_s"); w != body.end() && !w->is_null()) {
      if (!w->is_number_integer() || w->get<int64_t>() < 1 || w->get<int64_t>() > 7 * 24 * 3600)
        return send(error_response(http::status::bad_request,
                                   "\"wall_clock_limit_s\" must be a whole number of seconds from 1 to 604800",
                                   version, keep));
      wall_clock = std::chrono::seconds(w->get<int64_t>());
    }
    actors::task_request treq{cmd->get<std::string>(), std::move(repo), who->id,
                              "req-" + random_hex(8)};
    treq.environment = std::move(environment);
    treq.wall_clock_limit = wall_clock;
    net::post(srv_.blocking(), [self, treq = std::move(treq), &deps, version, keep] {
      auto sub = deps.tasks->submit(treq);
      response_t res;
      if (!sub) {
        res = error_response(sub.error().code == errc::busy ? http::status::too_many_requests
                             : sub.error().code == errc::invalid_argument ? http::status::bad_request
                                                                          : http::status::service_unavailable,
                             sub.error().message, version, keep);
      } else {
        const std::string& id = sub->id;
        json body{{"id", id},
                  {"status", sub->queue_position ? "queued" : "running"},
                  {"url", "/api/v1/tasks/" + id},
                  {"events", "/api/v1/tasks/" + id + "/events"}};
        if (sub->queue_position)
          body["queue_position"] = sub->queue_position;
        res = json_response(http::status::created, body, version, keep);
        res.set(http::field::location, "/api/v1/tasks/" + id);
      }
      net::post(self->stream_.get_executor(),
                [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }

  std::string task_id(segs[3]);
  auto view = srv_.views().get(task_id);
  if (!view)
    return send(error_response(http::status::internal_server_error, view.error().message, version,
                               keep));
  // Another user's task answers 404 like a missing one, so ids cannot be probed.
  if (!*view || (!who->admin && (*view)->user != who->id))
    return send(error_response(http::status::not_found, "no such task", version, keep));

  // /api/v1/tasks/{id}
  if (segs.size() == 4) {
    if (req.method() != http::verb::get)
      return send(method_not_allowed(req, http::verb::get, ""));
    return send(json_response(http::status::ok, task_json(**view), version, keep));
  }
  if (segs.size() == 5 && segs[4] == "abort") {
    if (req.method() != http::verb::post)
      return send(method_not_allowed(req, http::verb::post, ""));
    if ((*view)->finished)
      return send(json_response(http::status::conflict,
                                json{{"error", "task already finished"},
                                     {"status", (*view)->status}},
                                version, keep));
    std::string reason;
    if (!req.body().empty()) {
      auto body = json::parse(req.body(), nullptr, false);
      if (body.is_object() && body.contains("reason") && body["reason"].is_string())
        reason = body["reason"].get<std::string>();
    }
    // Through the control subject, so whichever ferryd runs the task aborts it.
    net::post(srv_.blocking(), [self, task_id, user = who->id, reason, &deps, version, keep] {
      auto outcome = abort_task(deps, task_id, user, reason);
      auto after = self->srv_.views().get(task_id);
      json j = after && *after ? task_json(**after) : json{{"id", task_id}};
      response_t res;
      if (!outcome)
        res = error_response(outcome.error().code == errc::corrupt
                               ? http::status::internal_server_error
                               : http::status::service_unavailable,
                             "abort: " + outcome.error().message, version, keep);
      else if (*outcome == actors::abort_outcome::aborted)
        res = json_response(http::status::ok, j, version, keep);
      else if (*outcome == actors::abort_outcome::pending)
        res = json_response(http::status::accepted, j, version, keep);
      else {
        j["error"] = "task already finished";
        res = json_response(http::status::conflict, j, version, keep);
      }
      net::post(self->stream_.get_executor(),
                [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }
  if (segs.size() == 5 && segs[4] == "steer") {
    if (req.method() != http::verb::post)
      return send(method_not_allowed(req, http::verb::post, ""));
    auto parsed = json_object_body(req);
    if (auto* bad = std::get_if<response_t>(&parsed))
      return send(std::move(*bad));
    auto& body = std::get<json>(parsed);
    auto text_it = body.find("text");
    if (text_it == body.end() || !text_it->is_string() || text_it->get<std::string>().empty())
      return send(error_response(http::status::bad_request,
                                 "body must be {\"text\": \"<non-empty comment>\"}", version,
                                 keep));
    auto text = text_it->get<std::string>();
    if (text.size() > actors::max_steering_bytes)
      return send(error_response(http::status::payload_too_large,
                                 "a steering comment may have at most " +
                                   std::to_string(actors::max_steering_bytes) + " bytes",
                                 version, keep));
    if ((*view)->finished)
      return send(json_response(http::status::conflict,
                                json{{"error", "task already finished"},
                                     {"status", (*view)->status}},
                                version, keep));
    net::post(srv_.blocking(), [self, task_id, user = who->id, text = std::move(text), &deps,
                                version, keep] {
      auto seq = steer_task(deps, task_id, user, text);
      response_t res;
      if (seq) {
        res = json_response(http::status::accepted, json{{"id", task_id}, {"seq", *seq}}, version,
                            keep);
      } else {
        auto code = seq.error().code;
        auto status = code == errc::conflict || code == errc::not_found ? http::status::conflict
                      : code == errc::invalid_argument ? http::status::bad_request
                      : code == errc::closed           ? http::status::service_unavailable
                                                       : http::status::internal_server_error;
        res = error_response(status, "steer: " + seq.error().message, version, keep);
      }
      net::post(self->stream_.get_executor(),
                [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }
  if (segs.size() == 5 && segs[4] == "egress") {
    if (req.method() != http::verb::get)
      return send(method_not_allowed(req, http::verb::get, ""));
    return send(json_response(http::status::ok, task_json(**view).value("egress", json::object()), version, keep));
  }
  if (segs.size() == 6 && segs[4] == "egress" && segs[5] == "approvals") {
    // "Allow for this task": recorded on the task's stream, applied to its running sandbox.
    if (req.method() != http::verb::post)
      return send(method_not_allowed(req, http::verb::post, "to allow a destination for the task"));
    auto parsed = json_object_body(req);
    if (auto* bad = std::get_if<response_t>(&parsed))
      return send(std::move(*bad));
    auto& body = std::get<json>(parsed);
    auto d = body.find("destination");
    if (d == body.end() || !d->is_string())
      return send(error_response(http::status::bad_request,
                                 "body must be {\"destination\": \"host[:port]\" or \"*.domain[:port]\"}", version, keep));
    auto pattern = egress::domain_pattern::parse(d->get<std::string>());
    if (!pattern)
      return send(error_response(http::status::bad_request, "destination: " + pattern.error().message, version, keep));
    if ((*view)->finished)
      return send(json_response(http::status::conflict,
                                json{{"error", "task already finished"}, {"status", (*view)->status}}, version, keep));
    // Through the control subject, so whichever ferryd runs the task records it.
    net::post(srv_.blocking(), [self, task_id, user = who->id, destination = pattern->to_string(), &deps, version,
                                keep] {
      auto seq = approve_task(deps, task_id, user, destination);
      response_t res;
      if (seq) {
        res = json_response(http::status::created, json{{"id", task_id}, {"seq", *seq}, {"destination", destination}},
                            version, keep);
      } else {
        auto code = seq.error().code;
        auto status = code == errc::conflict || code == errc::not_found ? http::status::conflict
                      : code == errc::busy                             ? http::status::too_many_requests
                      : code == errc::invalid_argument                 ? http::status::bad_request
                      : code == errc::closed                           ? http::status::service_unavailable
                                                                       : http::status::internal_server_error;
        res = error_response(status, "approve: " + seq.error().message, version, keep);
      }
      net::post(self->stream_.get_executor(), [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }
  if (segs.size() == 5 && segs[4] == "resume") {
    // An interrupted task (ferryd stopped while it ran) continues in a fresh sandbox.
    if (req.method() != http::verb::post)
      return send(method_not_allowed(req, http::verb::post, ""));
    if ((*view)->status != "interrupted" || !(*view)->resumable)
      return send(json_response(http::status::conflict,
                                json{{"error", "only an interrupted task can be resumed"},
                                     {"status", (*view)->status}},
                                version, keep));
    net::post(srv_.blocking(), [self, task_id, user = who->id, &deps, version, keep] {
      auto sub = deps.tasks->resume(task_id, user);
      response_t res;
      if (!sub) {
        auto status = sub.error().code == errc::conflict    ? http::status::conflict
                      : sub.error().code == errc::not_found ? http::status::not_found
                                                            : http::status::service_unavailable;
        res = error_response(status, "resume: " + sub.error().message, version, keep);
      } else {
        json body{{"id", task_id}, {"status", sub->queue_position ? "queued" : "running"}};
        if (sub->queue_position)
          body["queue_position"] = sub->queue_position;
        res = json_response(http::status::accepted, body, version, keep);
      }
      net::post(self->stream_.get_executor(),
                [self, res = std::move(res)]() mutable { self->send(std::move(res)); });
    });
    return;
  }
  if (segs.size() == 5 && segs[4] == "events") {
    if (req.method() != http::verb::get)
      return send(method_not_allowed(req, http::verb::get, ""));
    if (!websocket::is_upgrade(req))
      return send(error_response(http::status::upgrade_required,
                                 "this endpoint is a WebSocket: send an Upgrade request", version,
                                 keep));
    uint64_t from = 1;
    if (auto f = query_param(parts.query, "from")) {
      auto [p, errc] = std::from_chars(f->data(), f->data() + f->size(), from);
      if (errc != std::errc() || p != f->data() + f->size())
        return send(error_response(http::status::bad_request,
                                   "\"from\" must be a non-negative integer", version, keep));
      if (from == 0)
        from = 1;
    }
    stream_.expires_never();
    std::optional<uint64_t> final_seq;
    if ((*view)->finished)
      final_seq = (*view)->last_sequence;
    auto session = std::make_shared<event_stream_session>(stream_.release_socket(), srv_,
                                                          task_id, who->id, from, final_seq);
    srv_.track(session);
    session->run(std::move(req));
    return;
  }
  send(error_response(http::status::not_found, "no such resource", version, keep));
}

void http_session::send(response_t res) {
  auto close = res.need_eof();
  auto sp = std::make_shared<response_t>(std::move(res));
  http::async_write(stream_, *sp,
                    [self = shared_from_this(), sp, close](beast::error_code ec, size_t n) {
                      self->on_write(close, ec, n);
                    });
}

void http_session::on_write(bool close, beast::error_code ec, size_t) {
  if (ec)
    return;
  if (close || srv_.stopping()) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    return;
  }
  do_read();
}

}  // namespace ferry::gateway::detail
