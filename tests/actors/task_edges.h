#pragma once
// The task's state machine, listed independently of ferry/actors/lifecycle.h: what the tests
// expect the table (state_machine_test.cpp) and the task actor (task_actor_test.cpp) to allow.
// A change of the lifecycle has to be made here too, on purpose.

#include <set>
#include <utility>
#include <vector>

#include "ferry/schemas/events_generated.h"

namespace ferry::test {

using task_status = events::v1::TaskStatus;

inline const std::set<std::pair<task_status, task_status>> task_edges = {
  {task_status::queued, task_status::running},
  {task_status::queued, task_status::aborted},
  {task_status::running, task_status::succeeded},
  {task_status::running, task_status::failed},
  {task_status::running, task_status::aborted},
  {task_status::running, task_status::interrupted},
  {task_status::interrupted, task_status::running},
  {task_status::interrupted, task_status::queued},
};

inline const std::vector<task_status> all_task_statuses = {
  task_status::queued, task_status::running, task_status::succeeded,
  task_status::failed, task_status::aborted, task_status::interrupted};

}  // namespace ferry::test
