#pragma once
// The organisation's egress policy: set by an admin (PUT /api/v1/admin/egress-policy), kept as
// `egress_policy_set` events on the journal stream `org-egress` (the latest is in force), and
// handed to whoever enforces it (the egress proxy) at load and after every change. It bounds
// every environment's policy: a destination must pass both. None set yet: `full` (no bound).
//
// Threading: thread-safe; `set` calls are serialised, so the policy in force is always the
// latest stored one.

#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "ferry/egress/policy.h"
#include "ferry/schemas/result.h"

namespace ferry::storage {
class event_store;
}

namespace ferry::gateway {

class org_egress_policy {
 public:
  using apply_fn = std::function<void(const egress::egress_policy&)>;

  /// Folds the stream `org-egress` and calls `apply` with the policy in force.
  [[nodiscard]] static result<std::unique_ptr<org_egress_policy>> load(storage::event_store& store, apply_fn apply);

  [[nodiscard]] egress::egress_policy current() const;

  /// Checks `policy` (egress_policy::from_json: errc::invalid_argument saying what is wrong),
  /// stores it with `user` as the actor, then applies it. Returns the stored policy.
  [[nodiscard]] result<egress::egress_policy> set(const nlohmann::json& policy, const std::string& user);

 private:
  org_egress_policy(storage::event_store& store, apply_fn apply) : store_(store), apply_(std::move(apply)) {}

  storage::event_store& store_;
  const apply_fn apply_;
  mutable std::mutex mu_;
  egress::egress_policy current_ = egress::egress_policy::full();  // GUARDED_BY(mu_)
};

}  // namespace ferry::gateway
