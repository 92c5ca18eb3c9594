// Abort and steer as the gateway sends them (see task_commands.h).

#include "task_commands.h"

#include <cstdio>

#include "ferry/actors/bus.h"
#include "ferry/gateway/control_client.h"

namespace ferry::gateway::detail {

result<actors::abort_outcome> abort_task(const gateway_deps& deps, const std::string& task_id,
                                         const std::string& user, const std::string& reason) {
  std::string why = "no NATS connection";
  if (deps.events) {
    // A round trip first: a server that just went away may not have been noticed yet, and a
    // request sent into that connection would wait out its whole timeout before the local
    // abort. A live server answers the PING within milliseconds.
    if (auto alive = deps.events->flush(abort_liveness_timeout); !alive) {
      why = alive.error().message;
    } else {
      auto sent = request_abort(*deps.events, task_id, user, reason, default_abort_wait);
      if (sent || sent.error().code != errc::closed)
        return sent;
      why = sent.error().message;
    }
  }
  // NATS is unreachable: abort here, in this process's task manager (the one running the task
  // when a single ferryd serves it all).
  std::fprintf(stderr, "ferryd: warning: abort %s over NATS failed (%s); aborting locally\n",
               task_id.c_str(), why.c_str());
  return deps.tasks->abort(task_id, user, reason, default_abort_wait);
}

result<uint64_t> steer_task(const gateway_deps& deps, const std::string& task_id,
                            const std::string& user, const std::string& text) {
  if (!deps.events)
    return fail(errc::closed, "steer " + task_id + ": no NATS connection");
  return request_steer(*deps.events, task_id, user, text, default_steer_timeout);
}

result<uint64_t> approve_task(const gateway_deps& deps, const std::string& task_id, const std::string& user,
                              const std::string& destination) {
  if (!deps.events)
    return fail(errc::closed, "approve " + task_id + ": no NATS connection");
  return request_approve(*deps.events, task_id, user, destination, default_steer_timeout);
}

}  // namespace ferry::gateway::detail
