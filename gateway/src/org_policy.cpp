// The organisation's egress policy, folded from and stored on the stream `org-egress`.

#include "ferry/gateway/org_policy.h"

#include <nlohmann/json.hpp>

#include "ferry/schemas/events.h"
#include "ferry/storage/journal.h"

namespace ferry::gateway {

namespace {

constexpr const char* org_egress_stream = "org-egress";

}  // namespace

result<std::unique_ptr<org_egress_policy>> org_egress_policy::load(storage::event_store& store, apply_fn apply) {
  std::unique_ptr<org_egress_policy> org(new org_egress_policy(store, std::move(apply)));
  uint64_t next = 1;
  for (;;) {
    auto events = store.read_stream(org_egress_stream, next, 256);
    if (!events)
      return events.error();
    for (const auto& bytes : *events) {
      auto e = schemas::verify_envelope(bytes);
      if (!e)
        return fail(errc::corrupt, std::string(org_egress_stream) + ": " + e.error().message);
      next = (*e)->sequence() + 1;
      if ((*e)->event_type() != events::v1::Event::EgressPolicySet)
        continue;
      const auto* text = (*e)->event_as_EgressPolicySet()->policy_json();
      auto j = nlohmann::json::parse(text ? text->str() : std::string(), nullptr, /*allow_exceptions=*/false);
      auto policy = egress::egress_policy::from_json(j);
      if (!policy)
        return fail(errc::corrupt, std::string(org_egress_stream) + " event " + std::to_string((*e)->sequence()) +
                                     ": " + policy.error().message);
      org->current_ = std::move(*policy);
    }
    if (events->size() < 256)
      break;
  }
  if (org->apply_)
    org->apply_(org->current_);
  return org;
}

egress::egress_policy org_egress_policy::current() const {
  std::lock_guard lock(mu_);
  return current_;
}

result<egress::egress_policy> org_egress_policy::set(const nlohmann::json& json, const std::string& user) {
  auto policy = egress::egress_policy::from_json(json);
  if (!policy)
    return fail(errc::invalid_argument, policy.error().message);
  std::lock_guard lock(mu_);
  std::vector<std::string> envs{
    schemas::egress_policy_set({org_egress_stream, "", "", user}, policy->to_json().dump())};
  if (auto r = store_.append(org_egress_stream, envs); !r)
    return r.error();
  current_ = *policy;
  if (apply_)
    apply_(current_);
  return std::move(*policy);
}

}  // namespace ferry::gateway
