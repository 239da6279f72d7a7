"""Measured memory read bandwidth: the denominator of the memory floor.

torch.sum underestimates what streaming code reaches on some machines (34 GB/s against
52 GB/s on a 2-core Zen 5 VM), so the probe is C++ compiled like the task kernels: each
thread sums its share of a buffer much larger than the caches, with vector loads and
independent accumulators.
"""

from __future__ import annotations

import ctypes

import torch

from mpk.backends.cpu.build import build_library

PROBE_SOURCE = r"""
#include <stdint.h>
#include <chrono>
#include <thread>
#include <vector>
#include "mpk_simd.h"

namespace {
float sum_range(const float* data, int64_t begin, int64_t end) {
  using namespace mpk::cpu::simd;
  Vec a = zero(), b = zero(), c = zero(), d = zero();
  int64_t i = begin;
  for (; i + 4 * kWidth <= end; i += 4 * kWidth) {
    a = a + load(data + i);
    b = b + load(data + i + kWidth);
    c = c + load(data + i + 2 * kWidth);
    d = d + load(data + i + 3 * kWidth);
  }
  float total = reduce_add(a + b + c + d);
  for (; i < end; ++i) total += data[i];
  return total;
}
}  // namespace

// Bytes/s of `threads` threads that each read their share of data[0..n) `repeats` times.
// Each thread times its own passes, after one untimed warm-up pass, and the slowest
// thread sets the rate: thread creation and scheduling delays stay out of the timing,
// which matters for buffers small enough to live in cache.
extern "C" double mpk_read_bandwidth(const float* data, int64_t n, int32_t threads, int32_t repeats) {
  std::vector<double> seconds(static_cast<size_t>(threads));
  std::vector<float> sums(static_cast<size_t>(threads));
  std::vector<std::thread> pool;
  for (int32_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      const int64_t begin = n * t / threads, end = n * (t + 1) / threads;
      float total = sum_range(data, begin, end);
      const auto start = std::chrono::steady_clock::now();
      for (int32_t r = 0; r < repeats; ++r) {
        // A compiler barrier: without it the pure, inlined sum is computed once, not per pass.
        asm volatile("" ::: "memory");
        total += sum_range(data, begin, end);
      }
      seconds[static_cast<size_t>(t)] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      sums[static_cast<size_t>(t)] = total;
    });
  }
  for (auto& thread : pool) thread.join();
  double slowest = 0.0;
  for (double s : seconds) slowest = s > slowest ? s : slowest;
  volatile float sink = sums[0];
  (void)sink;
  return static_cast<double>(n) * sizeof(float) * repeats / slowest;
}
"""


def measure_read_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 10, runs: int = 5) -> float:
    """Bytes/s that ``threads`` threads sustain reading a buffer of ``megabytes`` MiB over
    and over: the median of ``runs`` runs of ``repeats`` passes each. Small buffers measure
    cache bandwidth, as they should: that is where a small model's weights live.

    NOTE: on the 2-core VM this was developed on, single runs over 1.1 GB ranged from 42
    to 78 GB/s; the median keeps one lucky run from setting the floor.
    """
    library = ctypes.CDLL(str(build_library(PROBE_SOURCE)))
    library.mpk_read_bandwidth.restype = ctypes.c_double
    library.mpk_read_bandwidth.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    rates = sorted(library.mpk_read_bandwidth(data.data_ptr(), data.numel(), threads, repeats) for _ in range(runs))
    return rates[len(rates) // 2]
