// The CUDA backend of the runtime protocol: one persistent kernel, one worker CTA per SM.
//
// A generated translation unit defines `__device__ void run_task(void* const*, const mpk::Task&,
// char* smem)` and `__device__ void prefetch_task(void* const*, const mpk::Task&, char* smem)`, then
// expands MPK_CUDA_DEFINE_API.
// The host launches the kernel once per iteration, cooperatively, so that all worker CTAs
// are resident at once (a worker spinning on an event must never keep its producer from
// being scheduled); inside the iteration nothing returns to the host.
//
// Memory ordering. A task's threads write with plain stores, then __syncthreads() orders
// those writes before thread 0's red.release.gpu increment of the signal counter; PTX
// release is cumulative, so the increment publishes every write the CTA made. A waiting
// CTA's thread 0 spins on ld.acquire.gpu, then __syncthreads() hands the acquired view to
// the other threads of its CTA before any of them reads the producers' data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mpk/protocol.h"

namespace mpk::cuda {

struct DeviceConfig {
  const Task* tasks;
  const Event* events;
  const int32_t* list_offsets;  // [workers + 1]: worker w runs lists[list_offsets[w] .. list_offsets[w+1])
  const int32_t* lists;
  uint64_t* counters;           // [events], monotone
  void* const* buffers;
  StallReport* report;
  int32_t* stalled;             // set once by the first worker whose wait times out
  uint64_t* trace;              // [tasks][2] begin/end global timer, or null
  uint64_t watchdog_ns;
};

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void add_release(uint64_t* address, uint64_t value) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

template <void (*RunTask)(void* const*, const Task&, char*), void (*PrefetchTask)(void* const*, const Task&, char*)>
class DevicePlatform {
 public:
  __device__ DevicePlatform(const DeviceConfig& config, uint64_t iteration, char* smem)
      : config_(config), iteration_(iteration), smem_(smem) {}

  __device__ bool wait_event(int32_t event, uint64_t target, const WaitSite& site) {
    __shared__ int32_t proceed;
    if (threadIdx.x == 0) {
      const uint64_t start = global_timer_ns();
      uint64_t count = load_acquire(&config_.counters[event]);
      proceed = 1;
      while (count < target) {
        if (*reinterpret_cast<volatile int32_t*>(config_.stalled)) {
          proceed = 0;
          break;
        }
        if (global_timer_ns() - start > config_.watchdog_ns) {
          report(site, count, target);
          proceed = 0;
          break;
        }
        __nanosleep(64);
        count = load_acquire(&config_.counters[event]);
      }
    }
    __syncthreads();
    if (proceed == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      // The worker stops here, and the task's prefetch may still have cp.async copies in
      // flight into smem: let them land before the CTA exits.
      asm volatile("cp.async.wait_all;" ::: "memory");
#endif
      return false;
    }
    return true;
  }

  __device__ void signal_event(int32_t event) {
    __syncthreads();
    if (threadIdx.x == 0) add_release(&config_.counters[event], 1);
  }

  __device__ void execute(const Task& task) {
    if (task.op != kRelayOp) RunTask(config_.buffers, task, smem_);
    // The next task may reuse the scratch memory.
    __syncthreads();
  }

  // Weights depend on no event, so a worker starts loading its next task's weights before
  // it waits: the weight stream of one operator overlaps the tail of the previous one.
  // The previous task's execute() ended with a barrier, so prefetch_task may issue
  // cp.async copies into smem (linear_prefetch does), which that task's run_task waits for.
  __device__ void prefetch(const Task& task) {
    if (task.op != kRelayOp) PrefetchTask(config_.buffers, task, smem_);
  }

  __device__ void trace_begin(int32_t task) {
    if (config_.trace && threadIdx.x == 0) config_.trace[2 * task] = global_timer_ns();
  }

  __device__ void trace_end(int32_t task) {
    if (config_.trace && threadIdx.x == 0) config_.trace[2 * task + 1] = global_timer_ns();
  }

 private:
  __device__ void report(const WaitSite& site, uint64_t count, uint64_t target) {
    if (atomicCAS(config_.stalled, 0, 1) == 0) {
      *config_.report = StallReport{site.worker, site.task, site.event, -1, count, target, 0, 0};
      __threadfence_system();
    }
  }

  const DeviceConfig& config_;
  uint64_t iteration_;
  char* smem_;
};

template <void (*RunTask)(void* const*, const Task&, char*), void (*PrefetchTask)(void* const*, const Task&, char*)>
__global__ void megakernel(DeviceConfig config, uint64_t iteration) {
  extern __shared__ __align__(16) char smem[];
  // The host copied this iteration's inputs before the launch, in stream order.
  if (blockIdx.x == 0 && threadIdx.x == 0) add_release(&config.counters[kBeginEvent], 1);
  DevicePlatform<RunTask, PrefetchTask> platform(config, iteration, smem);
  const int32_t worker = static_cast<int32_t>(blockIdx.x);
  const int32_t first = config.list_offsets[worker];
  const int32_t count = config.list_offsets[worker + 1] - first;
  run_static_iteration(platform, config.tasks, config.events, config.lists + first, count, iteration, worker);
}

}  // namespace mpk::cuda

// The C interface of one generated library.
#define MPK_CUDA_DEFINE_API(RUN_TASK, PREFETCH_TASK)                                                            \
  extern "C" {                                                                                                  \
  int32_t mpk_cuda_occupancy(int32_t threads, size_t smem_bytes, int32_t* blocks_per_sm) {                      \
    auto kernel = mpk::cuda::megakernel<RUN_TASK, PREFETCH_TASK>;                                               \
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,              \
                                              static_cast<int>(smem_bytes));                                    \
    if (status != cudaSuccess) return static_cast<int32_t>(status);                                             \
    return static_cast<int32_t>(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, threads,   \
                                                                              smem_bytes));                     \
  }                                                                                                             \
  int32_t mpk_cuda_launch(const mpk::cuda::DeviceConfig* config, int32_t workers, int32_t threads,              \
                          size_t smem_bytes, uint64_t iteration, void* stream) {                                \
    auto kernel = mpk::cuda::megakernel<RUN_TASK, PREFETCH_TASK>;                                               \
    mpk::cuda::DeviceConfig copy = *config;                                                                     \
    void* args[] = {&copy, &iteration};                                                                         \
    return static_cast<int32_t>(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(workers),     \
                                                            dim3(threads), args, smem_bytes,                    \
                                                            static_cast<cudaStream_t>(stream)));                \
  }                                                                                                             \
  const char* mpk_cuda_error_string(int32_t status) {                                                           \
    return cudaGetErrorString(static_cast<cudaError_t>(status));                                                \
  }                                                                                                             \
  }
