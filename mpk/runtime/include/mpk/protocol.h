// The runtime protocol shared by the CPU and CUDA backends: task and event records,
// monotone event counters, and the worker loops. A backend supplies a Platform with:
//
//   bool wait_event(int32_t event, uint64_t target, const WaitSite& site);
//       acquire-load the event's counter until it reaches target; false if the
//       watchdog or a stop request ended the wait.
//   void signal_event(int32_t event);   release increment of the event's counter.
//   void prefetch(const Task& task);    start loading the task's weights (they need no event).
//   void execute(const Task& task);     run the task's kernel.
//   void trace_begin(int32_t task) / trace_end(int32_t task);
//
// Memory ordering. A task's writes are plain stores, followed by a release increment of
// its signal counter. Every increment of one counter is a read-modify-write, so each one
// continues the release sequence of the earlier ones: a waiter whose acquire load reads
// the value of the last trigger's increment synchronizes with every trigger, and so sees
// all of their writes. Nothing else orders tasks.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MPK_HD __host__ __device__
#else
#define MPK_HD
#endif

namespace mpk {

// Maximum tile tuple length of any operator spec (attention: group, first row, last row).
constexpr int kMaxTile = 4;

// Opcode of a relay task: it does no work, it only forwards an event.
constexpr int32_t kRelayOp = -1;

struct Task {
  int32_t op;      // operator index in the graph, or kRelayOp
  int32_t wait;    // event this task waits on
  int32_t signal;  // event this task increments when done
  int32_t tile[kMaxTile];
};

struct Event {
  uint32_t num_triggers;  // increments per iteration; BEGIN has 1 (the host)
  int32_t first;          // consumers are tasks first..last-1 of the global order
  int32_t last;
};

// The location of a stalled wait, for the watchdog's report.
struct WaitSite {
  int32_t worker;
  int32_t task;   // -1 when the host waits on END
  int32_t event;
};

struct StallReport {
  int32_t worker;  // -1: the host, waiting on END
  int32_t task;
  int32_t event;
  int32_t first_unfired;  // earliest event in global order not fired this iteration: the likely cause
  uint64_t counter;
  uint64_t target;
  uint64_t first_unfired_counter;
  uint64_t first_unfired_target;
};

enum Status : int32_t { kOk = 0, kStalled = 1, kStopped = 2 };

constexpr int32_t kBeginEvent = 0;

// Counters are zeroed once and never reset: in iteration k (from 1) event e has fired
// once its counter reaches num_triggers * k.
MPK_HD inline uint64_t counter_target(const Event& event, uint64_t iteration) {
  return static_cast<uint64_t>(event.num_triggers) * iteration;
}

// Static assignment: a worker runs its list (a subsequence of the global order) once
// per iteration. Because every event's triggers precede its consumers in the global
// order, the earliest unfinished task is always runnable, so this cannot deadlock
// while all workers are resident.
template <class Platform>
MPK_HD Status run_static_iteration(Platform& platform, const Task* tasks, const Event* events,
                                   const int32_t* list, int32_t count, uint64_t iteration, int32_t worker) {
  for (int32_t i = 0; i < count; ++i) {
    const int32_t id = list[i];
    const Task& task = tasks[id];
    const WaitSite site{worker, id, task.wait};
    // Cross-operator pipelining: the weight loads start while the producers still run.
    platform.prefetch(task);
    if (!platform.wait_event(task.wait, counter_target(events[task.wait], iteration), site)) {
      return kStalled;
    }
    platform.trace_begin(id);
    platform.execute(task);
    platform.trace_end(id);
    platform.signal_event(task.signal);
  }
  return kOk;
}

// Dynamic dispatch: a task arrives on a worker's queue only after its event fired. The
// worker still acquire-loads the counter: that load is what makes the triggers' writes
// visible here, whatever path the task id took through the queues.
template <class Platform>
MPK_HD bool run_dispatched_task(Platform& platform, const Task* tasks, const Event* events, int32_t id,
                                uint64_t iteration, int32_t worker) {
  const Task& task = tasks[id];
  const WaitSite site{worker, id, task.wait};
  if (!platform.wait_event(task.wait, counter_target(events[task.wait], iteration), site)) {
    return false;
  }
  platform.trace_begin(id);
  platform.execute(task);
  platform.trace_end(id);
  return true;
}

}  // namespace mpk
