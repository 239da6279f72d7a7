// The CPU backend of the runtime protocol: persistent worker threads stand in for SMs.
//
// A generated translation unit defines `void run_task(void* const* buffers, const mpk::Task&)`
// (a switch over operators, with shapes as template arguments) and then expands
// MPK_CPU_DEFINE_API(run_task), which defines the C functions the Python host calls.
//
// Threads are created once and run iteration after iteration: in static mode each worker
// loops over its task list; in dynamic mode scheduler threads push the consumers of
// every fired event onto worker queues. Between iterations the threads back off to
// short sleeps and then park on a futex until the host begins the next iteration, so an
// idle runtime costs no CPU (an Embedder keeps several runtimes, one per batch shape).
#pragma once

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "mpk/protocol.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MPK_CPU_RELAX() _mm_pause()
#else
#define MPK_CPU_RELAX() ((void)0)
#endif

namespace mpk::cpu {

using TaskFn = void (*)(void* const* buffers, const Task& task);

enum Mode : int32_t { kStatic = 0, kDynamic = 1 };

struct TraceRecord {
  int32_t task;
  int32_t worker;
  uint64_t begin_ns;
  uint64_t end_ns;
};

inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// Spin briefly (the producer is usually microseconds away), then yield (the producer may
// need this core: workers can outnumber cores), then sleep (the host may be idle between
// iterations for a long time).
class Backoff {
 public:
  void pause() {
    if (rounds_ < kSpinRounds) {
      MPK_CPU_RELAX();
    } else if (rounds_ < kSpinRounds + kYieldRounds) {
      sched_yield();
    } else {
      const timespec nap{0, kSleepNs};
      nanosleep(&nap, nullptr);
    }
    ++rounds_;
  }

  // True once the backoff has reached its sleeping stage: the wait has lasted long
  // enough (about 2000 yields) that parking costs nothing noticeable.
  bool sleeping() const { return rounds_ >= kSpinRounds + kYieldRounds; }

 private:
  static constexpr int kSpinRounds = 128;
  static constexpr int kYieldRounds = 2000;
  static constexpr long kSleepNs = 50000;
  int rounds_ = 0;
};

// Bounded multi-producer multi-consumer queue of 64-bit entries (a ring of slots with
// sequence numbers). A slot's sequence is stored with release after its value and loaded
// with acquire before it, so the value written by the producer is visible to the consumer.
class Queue {
 public:
  explicit Queue(size_t min_capacity) {
    size_t capacity = 2;
    while (capacity < min_capacity) capacity <<= 1;
    mask_ = capacity - 1;
    slots_ = std::make_unique<Slot[]>(capacity);
    for (size_t i = 0; i < capacity; ++i) slots_[i].sequence.store(i, std::memory_order_relaxed);
  }

  bool push(uint64_t value) {
    size_t position = tail_.load(std::memory_order_relaxed);
    for (;;) {
      Slot& slot = slots_[position & mask_];
      const size_t sequence = slot.sequence.load(std::memory_order_acquire);
      const intptr_t lag = static_cast<intptr_t>(sequence) - static_cast<intptr_t>(position);
      if (lag == 0) {
        if (tail_.compare_exchange_weak(position, position + 1, std::memory_order_relaxed)) {
          slot.value = value;
          slot.sequence.store(position + 1, std::memory_order_release);
          return true;
        }
      } else if (lag < 0) {
        return false;  // full
      } else {
        position = tail_.load(std::memory_order_relaxed);
      }
    }
  }

  bool pop(uint64_t* value) {
    size_t position = head_.load(std::memory_order_relaxed);
    for (;;) {
      Slot& slot = slots_[position & mask_];
      const size_t sequence = slot.sequence.load(std::memory_order_acquire);
      const intptr_t lag = static_cast<intptr_t>(sequence) - static_cast<intptr_t>(position + 1);
      if (lag == 0) {
        if (head_.compare_exchange_weak(position, position + 1, std::memory_order_relaxed)) {
          *value = slot.value;
          slot.sequence.store(position + mask_ + 1, std::memory_order_release);
          return true;
        }
      } else if (lag < 0) {
        return false;  // empty
      } else {
        position = head_.load(std::memory_order_relaxed);
      }
    }
  }

 private:
  struct Slot {
    std::atomic<size_t> sequence;
    uint64_t value;
  };
  std::unique_ptr<Slot[]> slots_;
  size_t mask_ = 0;
  alignas(64) std::atomic<size_t> head_{0};
  alignas(64) std::atomic<size_t> tail_{0};
};

// One counter per 64-byte line, so that workers signaling different events do not
// invalidate each other's cache lines.
struct alignas(64) Counter {
  uint64_t value;
};

struct Config {
  int32_t num_workers;
  int32_t mode;
  int32_t num_schedulers;
  int32_t pin_threads;
  int32_t trace;
  uint64_t watchdog_ns;
  uint64_t max_delay_ns;  // stress testing: a random delay up to this before each task
};

class Runtime {
 public:
  Runtime(TaskFn run_task, int32_t num_tasks, const Task* tasks, int32_t num_events, const Event* events,
          const int32_t* worker_of_task, void* const* buffers, int32_t num_buffers, const Config& config)
      : run_task_(run_task),
        tasks_(tasks, tasks + num_tasks),
        events_(events, events + num_events),
        buffers_(buffers, buffers + num_buffers),
        config_(config),
        counters_(static_cast<size_t>(num_events)),
        lists_(static_cast<size_t>(config.num_workers)),
        traces_(static_cast<size_t>(config.num_workers)),
        trace_counts_(static_cast<size_t>(config.num_workers)) {
    for (auto& counter : counters_) counter.value = 0;
    for (int32_t t = 0; t < num_tasks; ++t) lists_[static_cast<size_t>(worker_of_task[t])].push_back(t);
    for (size_t w = 0; w < traces_.size(); ++w) {
      traces_[w].resize(config.mode == kStatic ? lists_[w].size() : static_cast<size_t>(num_tasks));
      trace_counts_[w].value = 0;
    }
    if (config.mode == kDynamic) {
      for (int32_t w = 0; w < config.num_workers; ++w) worker_queues_.emplace_back(std::make_unique<Queue>(num_tasks + 1));
      for (int32_t s = 0; s < config.num_schedulers; ++s) event_queues_.emplace_back(std::make_unique<Queue>(num_events + 1));
    }
    start_threads();
  }

  ~Runtime() {
    stop_.store(1, std::memory_order_seq_cst);
    wake_parked();  // after stop_: a thread that parks later reads stop_ and does not sleep
    for (auto& thread : threads_) thread.join();
  }

  // Runs one iteration: the host has written the inputs; returns once END fired.
  Status run_iteration() {
    if (stalled_.load(std::memory_order_acquire)) return kStalled;
    const uint64_t iteration = ++iteration_;
    for (auto& count : trace_counts_) count.value = 0;
    // Release: the inputs the host wrote, and the trace reset, happen before any task.
    // Sequentially consistent, like park()'s increment of parked_: either wake_parked()
    // below counts a parked thread, or that thread reads the new count.
    in_flight_.store(1, std::memory_order_seq_cst);
    __atomic_fetch_add(&counters_[kBeginEvent].value, 1, __ATOMIC_SEQ_CST);
    wake_parked();  // after BEGIN: a thread that parks later reads the new count
    if (config_.mode == kDynamic) push_event(kBeginEvent, iteration);

    const int32_t end = static_cast<int32_t>(events_.size()) - 1;
    const uint64_t target = counter_target(events_[static_cast<size_t>(end)], iteration);
    const uint64_t start = now_ns();
    Backoff backoff;
    // Acquire: reading END's final count makes every task's writes (the outputs) visible.
    while (__atomic_load_n(&counters_[static_cast<size_t>(end)].value, __ATOMIC_ACQUIRE) < target) {
      if (stalled_.load(std::memory_order_acquire)) return kStalled;
      // Twice the workers' bound, so that in static mode the worker that is stuck reports
      // first, naming its own task; the host reports only what workers cannot see.
      if (now_ns() - start > 2 * config_.watchdog_ns) {
        report_first_unfired(iteration);
        return kStalled;
      }
      backoff.pause();
    }
    in_flight_.store(0, std::memory_order_relaxed);
    return kOk;
  }

  StallReport stall_report() const { return report_; }

  int32_t copy_trace(int32_t worker, TraceRecord* out, int32_t capacity) const {
    const auto& records = traces_[static_cast<size_t>(worker)];
    const int32_t count = static_cast<int32_t>(trace_counts_[static_cast<size_t>(worker)].value);
    const int32_t n = count < capacity ? count : capacity;
    for (int32_t i = 0; i < n; ++i) out[i] = records[static_cast<size_t>(i)];
    return n;
  }

  // The Platform of one worker thread (see protocol.h).
  class Worker {
   public:
    Worker(Runtime& runtime, int32_t index) : rt_(runtime), index_(index), rng_(0x9E3779B97F4A7C15ull * (index + 1)) {}

    bool wait_event(int32_t event, uint64_t target, const WaitSite& site) {
      uint64_t* counter = &rt_.counters_[static_cast<size_t>(event)].value;
      if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target) return true;
      Backoff backoff;
      uint64_t start = now_ns();
      for (;;) {
        backoff.pause();
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) >= target) return true;
        if (rt_.stop_.load(std::memory_order_relaxed) || rt_.stalled_.load(std::memory_order_relaxed)) return false;
        const uint64_t now = now_ns();
        // The watchdog runs only once the host has begun this iteration: before that,
        // waiting is the runtime's idle state, however long it lasts, and a long idle
        // wait parks the thread.
        const uint64_t begun = __atomic_load_n(&rt_.counters_[kBeginEvent].value, __ATOMIC_RELAXED);
        if (begun < iteration) {
          if (backoff.sleeping()) {
            rt_.park(static_cast<uint32_t>(begun));
            backoff = Backoff{};  // the iteration has begun: poll for the event closely again
          }
          start = now_ns();
        } else if (now - start > rt_.config_.watchdog_ns) {
          rt_.report_stall(site, __atomic_load_n(counter, __ATOMIC_RELAXED), target, iteration);
          return false;
        }
      }
    }

    void signal_event(int32_t event) {
      // Release: this task's writes happen before the increment (see protocol.h).
      __atomic_fetch_add(&rt_.counters_[static_cast<size_t>(event)].value, 1, __ATOMIC_RELEASE);
    }

    // Dynamic mode: acq_rel, so that the thread that completes an event has seen every
    // trigger's writes before it hands the event to a scheduler.
    void signal_and_dispatch(int32_t event) {
      const uint64_t count = __atomic_add_fetch(&rt_.counters_[static_cast<size_t>(event)].value, 1, __ATOMIC_ACQ_REL);
      const Event& record = rt_.events_[static_cast<size_t>(event)];
      const int32_t end = static_cast<int32_t>(rt_.events_.size()) - 1;
      if (event != end && count % record.num_triggers == 0) rt_.push_event(event, count / record.num_triggers);
    }

    // The CPU's hardware prefetchers already stream a task's weight rows.
    void prefetch(const Task&) {}

    void execute(const Task& task) {
      if (rt_.config_.max_delay_ns) delay();
      if (task.op != kRelayOp) rt_.run_task_(rt_.buffers_.data(), task);
    }

    void trace_begin(int32_t) {
      if (rt_.config_.trace) begin_ns_ = now_ns();
    }

    void trace_end(int32_t task) {
      if (!rt_.config_.trace) return;
      auto& count = rt_.trace_counts_[static_cast<size_t>(index_)].value;
      rt_.traces_[static_cast<size_t>(index_)][count++] = TraceRecord{task, index_, begin_ns_, now_ns()};
    }

    uint64_t iteration = 0;

   private:
    void delay() {
      rng_ ^= rng_ << 13;
      rng_ ^= rng_ >> 7;
      rng_ ^= rng_ << 17;
      const uint64_t until = now_ns() + rng_ % rt_.config_.max_delay_ns;
      while (now_ns() < until) MPK_CPU_RELAX();
    }

    Runtime& rt_;
    int32_t index_;
    uint64_t rng_;
    uint64_t begin_ns_ = 0;
  };

 private:
  void start_threads() {
    for (int32_t w = 0; w < config_.num_workers; ++w) {
      threads_.emplace_back([this, w] { config_.mode == kStatic ? static_worker(w) : dynamic_worker(w); });
      pin(threads_.back(), w);
    }
    for (int32_t s = 0; s < static_cast<int32_t>(event_queues_.size()); ++s) {
      threads_.emplace_back([this, s] { scheduler(s); });
      pin(threads_.back(), config_.num_workers + s);
    }
  }

  void pin(std::thread& thread, int32_t index) {
    if (!config_.pin_threads) return;
    const unsigned cores = std::thread::hardware_concurrency();
    if (cores == 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<unsigned>(index) % cores, &set);
    pthread_setaffinity_np(thread.native_handle(), sizeof(set), &set);
  }

  void static_worker(int32_t w) {
    Worker worker(*this, w);
    const auto& list = lists_[static_cast<size_t>(w)];
    for (uint64_t iteration = 1;; ++iteration) {
      worker.iteration = iteration;
      const Status status = run_static_iteration(worker, tasks_.data(), events_.data(), list.data(),
                                                 static_cast<int32_t>(list.size()), iteration, w);
      if (status != kOk) return;
      if (list.empty() && !idle_until_next(iteration + 1)) return;
    }
  }

  // A worker without tasks still has to notice stop requests.
  bool idle_until_next(uint64_t iteration) {
    Backoff backoff;
    for (;;) {
      const uint64_t begun = __atomic_load_n(&counters_[kBeginEvent].value, __ATOMIC_ACQUIRE);
      if (begun >= iteration) return true;
      if (stop_.load(std::memory_order_relaxed) || stalled_.load(std::memory_order_relaxed)) return false;
      if (backoff.sleeping()) {
        park(static_cast<uint32_t>(begun));
        backoff = Backoff{};
      }
      backoff.pause();
    }
  }

  // Pops the next entry (iteration << 32 | id) of a dynamic-mode queue, backing off while
  // it is empty; false once the runtime stops. Between iterations (no iteration in
  // flight) a long wait parks the thread.
  bool next_entry(Queue& queue, uint64_t* entry) {
    Backoff backoff;
    while (!stop_.load(std::memory_order_relaxed) && !stalled_.load(std::memory_order_relaxed)) {
      if (queue.pop(entry)) return true;
      if (backoff.sleeping() && !in_flight_.load(std::memory_order_seq_cst)) {
        park(static_cast<uint32_t>(__atomic_load_n(&counters_[kBeginEvent].value, __ATOMIC_RELAXED)));
        backoff = Backoff{};
      }
      backoff.pause();
    }
    return false;
  }

  // Blocks until the host begins an iteration after BEGIN's low word was `seen`, or the
  // runtime stops. The futex word is wake_generation_, which wake_parked() increments
  // before waking: a thread reads the generation first, then checks BEGIN and stop_, and
  // FUTEX_WAIT sleeps only while the generation is unchanged. So a wake between the
  // checks and the wait cannot be lost, whether it comes from a begin or from the
  // destructor. Spurious wake-ups are fine: every caller re-checks its condition.
  void park(uint32_t seen) {
    const uint32_t generation = wake_generation_.load(std::memory_order_seq_cst);
    parked_.fetch_add(1, std::memory_order_seq_cst);
    const uint64_t begun = __atomic_load_n(&counters_[kBeginEvent].value, __ATOMIC_SEQ_CST);
    if (static_cast<uint32_t>(begun) == seen && !stop_.load(std::memory_order_seq_cst)) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_generation_), FUTEX_WAIT_PRIVATE, generation, nullptr, nullptr, 0);
    }
    parked_.fetch_sub(1, std::memory_order_seq_cst);
  }

  // Wakes every parked thread. The generation changes first, so a thread between its
  // checks and FUTEX_WAIT does not sleep; the syscall is skipped when none is parked.
  void wake_parked() {
    wake_generation_.fetch_add(1, std::memory_order_seq_cst);
    if (parked_.load(std::memory_order_seq_cst) > 0) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_generation_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    }
  }

  void dynamic_worker(int32_t w) {
    Worker worker(*this, w);
    Queue& queue = *worker_queues_[static_cast<size_t>(w)];
    uint64_t entry = 0;
    while (next_entry(queue, &entry)) {
      worker.iteration = entry >> 32;
      const int32_t id = static_cast<int32_t>(entry & 0xffffffffu);
      if (!run_dispatched_task(worker, tasks_.data(), events_.data(), id, worker.iteration, w)) return;
      worker.signal_and_dispatch(tasks_[static_cast<size_t>(id)].signal);
    }
  }

  void scheduler(int32_t s) {
    Queue& queue = *event_queues_[static_cast<size_t>(s)];
    uint64_t entry = 0;
    uint32_t next_worker = static_cast<uint32_t>(s);
    while (next_entry(queue, &entry)) {
      const uint64_t iteration = entry >> 32;
      const Event& event = events_[static_cast<size_t>(entry & 0xffffffffu)];
      for (int32_t t = event.first; t < event.last; ++t) {
        // Capacity covers every task of an iteration, and iterations never overlap.
        worker_queues_[next_worker++ % worker_queues_.size()]->push((iteration << 32) | static_cast<uint32_t>(t));
      }
    }
  }

  void push_event(int32_t event, uint64_t iteration) {
    event_queues_[static_cast<size_t>(event) % event_queues_.size()]->push((iteration << 32) | static_cast<uint32_t>(event));
  }

  // Records the first stall only. Besides the wait that timed out, the report names the
  // earliest event in global order that has not fired: waits downstream of a broken event
  // time out too, and may do so first.
  void report_stall(const WaitSite& site, uint64_t counter, uint64_t target, uint64_t iteration) {
    int32_t expected = 0;
    if (!stalled_.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) return;
    report_ = StallReport{site.worker, site.task, site.event, -1, counter, target, 0, 0};
    for (size_t e = 1; e < events_.size(); ++e) {
      const uint64_t goal = counter_target(events_[e], iteration);
      const uint64_t count = __atomic_load_n(&counters_[e].value, __ATOMIC_RELAXED);
      if (count < goal) {
        report_.first_unfired = static_cast<int32_t>(e);
        report_.first_unfired_counter = count;
        report_.first_unfired_target = goal;
        break;
      }
    }
    reported_.store(1, std::memory_order_release);
  }

  // The host's own watchdog (dynamic mode, or a count that can never be reached).
  void report_first_unfired(uint64_t iteration) {
    const int32_t end = static_cast<int32_t>(events_.size()) - 1;
    const uint64_t count = __atomic_load_n(&counters_[static_cast<size_t>(end)].value, __ATOMIC_RELAXED);
    report_stall(WaitSite{-1, -1, end}, count, counter_target(events_[static_cast<size_t>(end)], iteration), iteration);
  }

 public:
  // Waits until a stall report is complete (the reporting worker may still be writing it).
  bool wait_report() const {
    for (int i = 0; i < 1000000 && !reported_.load(std::memory_order_acquire); ++i) MPK_CPU_RELAX();
    return reported_.load(std::memory_order_acquire) != 0;
  }

 private:
  TaskFn run_task_;
  std::vector<Task> tasks_;
  std::vector<Event> events_;
  std::vector<void*> buffers_;
  Config config_;
  std::vector<Counter> counters_;
  std::vector<std::vector<int32_t>> lists_;
  std::vector<std::vector<TraceRecord>> traces_;
  std::vector<Counter> trace_counts_;
  std::vector<std::unique_ptr<Queue>> worker_queues_;
  std::vector<std::unique_ptr<Queue>> event_queues_;
  std::vector<std::thread> threads_;
  std::atomic<int32_t> stop_{0};
  std::atomic<int32_t> stalled_{0};
  std::atomic<int32_t> parked_{0};     // threads blocked in park()
  std::atomic<uint32_t> wake_generation_{0};  // futex word of park(), see there
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) && std::atomic<uint32_t>::is_always_lock_free,
                "the futex syscall reads wake_generation_ as a plain 32-bit word");
  std::atomic<int32_t> in_flight_{0};  // 1 from the host's begin of an iteration to its end
  std::atomic<int32_t> reported_{0};
  StallReport report_{};
  uint64_t iteration_ = 0;
};

}  // namespace mpk::cpu

// The C interface of one generated library. Handles are independent, so one process can
// hold several task graphs (a prompt-chunk graph and a decode graph) at once.
#define MPK_CPU_DEFINE_API(RUN_TASK)                                                                        \
  extern "C" {                                                                                              \
  void* mpk_create(int32_t num_tasks, const mpk::Task* tasks, int32_t num_events, const mpk::Event* events, \
                   const int32_t* worker_of_task, void* const* buffers, int32_t num_buffers,                \
                   const mpk::cpu::Config* config) {                                                       \
    return new mpk::cpu::Runtime(RUN_TASK, num_tasks, tasks, num_events, events, worker_of_task, buffers,   \
                                 num_buffers, *config);                                                     \
  }                                                                                                         \
  int32_t mpk_run(void* handle) { return static_cast<mpk::cpu::Runtime*>(handle)->run_iteration(); }      \
  int32_t mpk_stall_report(void* handle, mpk::StallReport* out) {                                           \
    auto* runtime = static_cast<mpk::cpu::Runtime*>(handle);                                                \
    const bool complete = runtime->wait_report();                                                           \
    *out = runtime->stall_report();                                                                         \
    return complete ? 1 : 0;                                                                                \
  }                                                                                                         \
  int32_t mpk_trace(void* handle, int32_t worker, mpk::cpu::TraceRecord* out, int32_t capacity) {           \
    return static_cast<mpk::cpu::Runtime*>(handle)->copy_trace(worker, out, capacity);                      \
  }                                                                                                         \
  uint64_t mpk_now_ns() { return mpk::cpu::now_ns(); }                                                      \
  void mpk_destroy(void* handle) { delete static_cast<mpk::cpu::Runtime*>(handle); }                        \
  }
