"""The CUDA task kernels of mpk/backends/cuda/include/mpk_cuda_kernels.cuh, without a GPU.

Two programs are built from sources written below:

- A device translation unit that instantiates every kernel for a few shapes (decode
  shapes of real models, and odd shapes whose rows, heads and tiles have tails) inside
  ``__global__`` wrappers. It is compiled for sm_80, sm_90a and sm_100a with
  ``-Xptxas -v``, and no kernel may spill registers to local memory.
- A host program that runs the kernels' ``__host__ __device__`` helpers on the CPU. It
  checks the work splits (every element of a tile covered exactly once, vector accesses
  aligned) and computes the element math whose bf16 rounding points must match torch.
  It also emulates the kernels' reduction trees for the online softmax and the argmax.

All builds run in parallel. No GPU is needed; nvcc is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

INCLUDE_DIR = Path(__file__).resolve().parent.parent / "mpk" / "backends" / "cuda" / "include"
ARCHS = ("sm_80", "sm_90a", "sm_100a")
COMPILE_SECONDS = 60
# Generous, because the builds share the machine's cores.
BUILD_TIMEOUT = 300
NVCC_FLAGS = ["-std=c++17", "-O3", "-I", str(INCLUDE_DIR)]

DEVICE_SOURCE = r"""
#include "mpk_cuda_kernels.cuh"

using mpk::cuda::bf16;
namespace k = mpk::cuda;

#define KERNEL extern "C" __global__ void __launch_bounds__(MPK_THREADS, 1)
#define SMEM extern __shared__ __align__(16) char smem[]

// Embedding: a real hidden size, one that is not a multiple of 8, and a tail of T.
KERNEL embedding_1x1024(const int64_t* t, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::embedding_task<1, 1024>(t, w, o, c0, c1, smem); }
KERNEL embedding_3x100(const int64_t* t, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::embedding_task<3, 100>(t, w, o, c0, c1, smem); }
KERNEL embedding_5x2056(const int64_t* t, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::embedding_task<5, 2056>(t, w, o, c0, c1, smem); }

// RMSNorm: vectors of 8, 2 and 1 element(s).
KERNEL rmsnorm_1024(const bf16* x, const bf16* w, bf16* o, int r0, int r1) { SMEM; k::rmsnorm_task<1024>(x, w, o, 1e-6f, r0, r1, smem); }
KERNEL rmsnorm_8192(const bf16* x, const bf16* w, bf16* o, int r0, int r1) { SMEM; k::rmsnorm_task<8192>(x, w, o, 1e-6f, r0, r1, smem); }
KERNEL rmsnorm_2050(const bf16* x, const bf16* w, bf16* o, int r0, int r1) { SMEM; k::rmsnorm_task<2050>(x, w, o, 1e-5f, r0, r1, smem); }
KERNEL rmsnorm_1001(const bf16* x, const bf16* w, bf16* o, int r0, int r1) { SMEM; k::rmsnorm_task<1001>(x, w, o, 1e-5f, r0, r1, smem); }

// Linear: Qwen3-0.6B decode projections, a Qwen3-8B-sized one, the lm_head with float
// logits, prefill blocks with a token tail, and K that is not a multiple of 256 or of 8.
KERNEL linear_qkv_1x1024x4096(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_task<1, 1024, 4096, bf16, false>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_down_1x3072x1024_res(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_task<1, 3072, 1024, bf16, true>(x, w, o, o, c0, c1, smem); }
KERNEL linear_1x4096x24576(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_task<1, 4096, 24576, bf16, false>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_lm_head_1x1024x151936(const bf16* x, const bf16* w, float* o, int c0, int c1) { SMEM; k::linear_task<1, 1024, 151936, float, false>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_7x1000x37_res(const bf16* x, const bf16* w, const bf16* r, bf16* o, int c0, int c1) { SMEM; k::linear_task<7, 1000, 37, bf16, true>(x, w, r, o, c0, c1, smem); }
KERNEL linear_16x2048x2048(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_task<16, 2048, 2048, bf16, false>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_3x1001x33_float_res(const bf16* x, const bf16* w, const float* r, float* o, int c0, int c1) { SMEM; k::linear_task<3, 1001, 33, float, true>(x, w, r, o, c0, c1, smem); }
KERNEL linear_2x4104x12(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_task<2, 4104, 12, bf16, false>(x, w, nullptr, o, c0, c1, smem); }

// Linear as the megakernel runs it: linear_prefetch issues the first chunks of the
// cp.async pipeline, then linear_task<..., STAGED = true> issues the rest. The same
// shapes as above, the tiny test models' K = 64 (several row groups per warp per chunk),
// 40 tokens (three passes over the tile), and K = 1001, which keeps to registers.
KERNEL linear_staged_1x1024x4096(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { k::linear_prefetch<1, 1024>(w, c0, c1, k::dynamic_smem()); k::linear_task<1, 1024, 4096, bf16, false, true>(x, w, nullptr, o, c0, c1, k::dynamic_smem()); }
KERNEL linear_staged_down_1x3072x1024_res(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<1, 3072>(w, c0, c1, smem); k::linear_task<1, 3072, 1024, bf16, true, true>(x, w, o, o, c0, c1, smem); }
KERNEL linear_staged_lm_head_1x1024x151936(const bf16* x, const bf16* w, float* o, int c0, int c1) { SMEM; k::linear_prefetch<1, 1024>(w, c0, c1, smem); k::linear_task<1, 1024, 151936, float, false, true>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_staged_1x64x256(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<1, 64>(w, c0, c1, smem); k::linear_task<1, 64, 256, bf16, false, true>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_staged_7x1000x37_res(const bf16* x, const bf16* w, const bf16* r, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<7, 1000>(w, c0, c1, smem); k::linear_task<7, 1000, 37, bf16, true, true>(x, w, r, o, c0, c1, smem); }
KERNEL linear_staged_16x2048x2048(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<16, 2048>(w, c0, c1, smem); k::linear_task<16, 2048, 2048, bf16, false, true>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_staged_40x256x64(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<40, 256>(w, c0, c1, smem); k::linear_task<40, 256, 64, bf16, false, true>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_staged_3x1001x33_float_res(const bf16* x, const bf16* w, const float* r, float* o, int c0, int c1) { SMEM; k::linear_prefetch<3, 1001>(w, c0, c1, smem); k::linear_task<3, 1001, 33, float, true, true>(x, w, r, o, c0, c1, smem); }

// q/k norm: head_dim 128 (Qwen3), 96 (lanes past the row's vectors) and 6 (scalar).
KERNEL qk_norm_1x4096x128(bf16* qkv, const bf16* qw, const bf16* kw, int q0, int q1, int k0, int k1) { SMEM; k::qk_norm_task<1, 4096, 128>(qkv, qw, kw, 1e-6f, q0, q1, k0, k1, smem); }
KERNEL qk_norm_5x768x96(bf16* qkv, const bf16* qw, const bf16* kw, int q0, int q1, int k0, int k1) { SMEM; k::qk_norm_task<5, 768, 96>(qkv, qw, kw, 1e-6f, q0, q1, k0, k1, smem); }
KERNEL qk_norm_3x24x6(bf16* qkv, const bf16* qw, const bf16* kw, int q0, int q1, int k0, int k1) { SMEM; k::qk_norm_task<3, 24, 6>(qkv, qw, kw, 1e-6f, q0, q1, k0, k1, smem); }

// Rope and attention: Qwen3-0.6B (16 q heads, 8 KV heads, head_dim 128), Llama-3.2-1B
// (32, 8, 64), a head_dim of 256, and odd shapes: head_dim 96 with 2 q heads per
// group, head_dim 6 with 2 and a 9-slot cache, prefill rows.
KERNEL rope_1x4096x128(bf16* qkv, const int64_t* p, const float* c, const float* s, bf16* kc, bf16* vc, int g, int q0, int q1, int k0, int v0) { SMEM; k::rope_task<1, 4096, 128, 8, 4096>(qkv, p, c, s, kc, vc, g, q0, q1, k0, v0, smem); }
KERNEL rope_5x768x96(bf16* qkv, const int64_t* p, const float* c, const float* s, bf16* kc, bf16* vc, int g, int q0, int q1, int k0, int v0) { SMEM; k::rope_task<5, 768, 96, 2, 37>(qkv, p, c, s, kc, vc, g, q0, q1, k0, v0, smem); }
KERNEL rope_3x24x6(bf16* qkv, const int64_t* p, const float* c, const float* s, bf16* kc, bf16* vc, int g, int q0, int q1, int k0, int v0) { SMEM; k::rope_task<3, 24, 6, 1, 9>(qkv, p, c, s, kc, vc, g, q0, q1, k0, v0, smem); }

KERNEL attention_1x4096x128(const bf16* qkv, const int64_t* p, const bf16* kc, const bf16* vc, bf16* o, int g, int r0, int r1, int q0, int q1) { SMEM; k::attention_task<1, 4096, 128, 8, 4096, 2048>(qkv, p, kc, vc, o, 0.08838834764831845f, g, r0, r1, q0, q1, smem); }
KERNEL attention_1x3072x64(const bf16* qkv, const int64_t* p, const bf16* kc, const bf16* vc, bf16* o, int g, int r0, int r1, int q0, int q1) { SMEM; k::attention_task<1, 3072, 64, 8, 8192, 2048>(qkv, p, kc, vc, o, 0.125f, g, r0, r1, q0, q1, smem); }
KERNEL attention_2x4096x256(const bf16* qkv, const int64_t* p, const bf16* kc, const bf16* vc, bf16* o, int g, int r0, int r1, int q0, int q1) { SMEM; k::attention_task<2, 4096, 256, 4, 1024, 2048>(qkv, p, kc, vc, o, 0.0625f, g, r0, r1, q0, q1, smem); }
KERNEL attention_5x768x96(const bf16* qkv, const int64_t* p, const bf16* kc, const bf16* vc, bf16* o, int g, int r0, int r1, int q0, int q1) { SMEM; k::attention_task<5, 768, 96, 2, 37, 384>(qkv, p, kc, vc, o, 0.1f, g, r0, r1, q0, q1, smem); }
KERNEL attention_3x24x6(const bf16* qkv, const int64_t* p, const bf16* kc, const bf16* vc, bf16* o, int g, int r0, int r1, int q0, int q1) { SMEM; k::attention_task<3, 24, 6, 1, 9, 12>(qkv, p, kc, vc, o, 0.4f, g, r0, r1, q0, q1, smem); }

// Split decode attention: Qwen3-0.6B over 8 chunks of a 4096-slot cache (q/k norm), and
// head_dim 6 with 2 q heads per group over 3 chunks of 9 slots, no norm, 2 rows.
KERNEL split_attention_1x4096x128(const bf16* qkv, const int64_t* p, const float* c, const float* s, const bf16* qw, const bf16* kw, bf16* kc, bf16* vc, float* part, int g, int ch, int q0, int q1, int k0, int v0) { SMEM; k::split_attention_task<1, 4096, 128, 8, 4096, 8, 16, true>(qkv, p, c, s, qw, kw, 1e-6f, kc, vc, part, 0.08838834764831845f, g, ch, q0, q1, k0, v0, smem); }
KERNEL split_attention_2x24x6(const bf16* qkv, const int64_t* p, const float* c, const float* s, bf16* kc, bf16* vc, float* part, int g, int ch, int q0, int q1, int k0, int v0) { SMEM; k::split_attention_task<2, 24, 6, 1, 9, 3, 2, false>(qkv, p, c, s, nullptr, nullptr, 1e-6f, kc, vc, part, 0.4f, g, ch, q0, q1, k0, v0, smem); }
KERNEL attention_combine_1x8x16x128(const float* part, bf16* o, int h0, int h1) { SMEM; k::attention_combine_task<1, 8, 16, 128>(part, o, h0, h1, smem); }

// SwiGLU: vector body, columns that are not a multiple of 8, and a tail of T.
KERNEL silu_mul_1x3072(const bf16* gu, bf16* o, int c0, int c1) { SMEM; k::silu_mul_task<1, 3072>(gu, o, c0, c1, smem); }
KERNEL silu_mul_3x1000(const bf16* gu, bf16* o, int c0, int c1) { SMEM; k::silu_mul_task<3, 1000>(gu, o, c0, c1, smem); }
KERNEL silu_mul_2x1001(const bf16* gu, bf16* o, int c0, int c1) { SMEM; k::silu_mul_task<2, 1001>(gu, o, c0, c1, smem); }

// Argmax: the Qwen3 vocabulary in 37 chunks, and a chunk count with a short last chunk.
KERNEL argmax_partial_1x151936(const float* l, float* v, int64_t* i, int part) { SMEM; k::argmax_partial_task<1, 151936, 37, 4107>(l, v, i, part, smem); }
KERNEL argmax_partial_3x1001(const float* l, float* v, int64_t* i, int part) { SMEM; k::argmax_partial_task<3, 1001, 4, 256>(l, v, i, part, smem); }
KERNEL argmax_reduce_1x37(const float* v, const int64_t* i, int64_t* o) { SMEM; k::argmax_reduce_task<1, 37>(v, i, o, smem); }
KERNEL argmax_reduce_3x300(const float* v, const int64_t* i, int64_t* o) { SMEM; k::argmax_reduce_task<3, 300>(v, i, o, smem); }

// Sentence encoders: all-MiniLM-L6-v2's shapes (hidden 384, 12 heads of 32, 1536-wide
// MLP) for 512 packed rows, and odd ones (hidden 40, heads of 40 with a lane tail).
KERNEL bias_gelu_512x1536(const bf16* b, bf16* o, int c0, int c1) { SMEM; k::bias_activation_task<512, 1536, k::Activation::gelu>(b, o, c0, c1); }
KERNEL bias_7x37(const bf16* b, bf16* o, int c0, int c1) { SMEM; k::bias_activation_task<7, 37, k::Activation::none>(b, o, c0, c1); }
KERNEL embedding_sum_384(const int64_t* t, const int64_t* p, const int64_t* y, const bf16* w, const bf16* pw, const bf16* yw, bf16* o, int r0, int r1) { SMEM; k::embedding_sum_task<384>(t, p, y, w, pw, yw, o, r0, r1, smem); }
KERNEL layernorm_384(const bf16* x, const bf16* w, const bf16* b, bf16* o, int r0, int r1) { SMEM; k::layernorm_task<384>(x, w, b, o, 1e-12f, r0, r1, smem); }
KERNEL layernorm_40(const bf16* x, const bf16* w, const bf16* b, bf16* o, int r0, int r1) { SMEM; k::layernorm_task<40>(x, w, b, o, 1e-12f, r0, r1, smem); }
KERNEL segment_attention_512x1152x32(const bf16* qkv, const int64_t* s, const int64_t* sp, bf16* o, int r0, int r1, int q0, int q1, int k0, int v0) { SMEM; k::segment_attention_task<512, 1152, 32, 384>(qkv, s, sp, o, 0.17677669529663687f, r0, r1, q0, q1, k0, v0, smem); }
KERNEL segment_attention_17x360x40(const bf16* qkv, const int64_t* s, const int64_t* sp, bf16* o, int r0, int r1, int q0, int q1, int k0, int v0) { SMEM; k::segment_attention_task<17, 360, 40, 120>(qkv, s, sp, o, 0.15811388300841897f, r0, r1, q0, q1, k0, v0, smem); }
KERNEL mean_pool_384(const bf16* x, const int64_t* sp, float* o, int b0, int b1) { SMEM; k::mean_pool_task<384, true>(x, sp, o, b0, b1, smem); }
KERNEL mean_pool_40_bf16(const bf16* x, const int64_t* sp, bf16* o, int b0, int b1) { SMEM; k::mean_pool_task<40, false>(x, sp, o, b0, b1, smem); }
"""

HOST_SOURCE = r"""
// Host program for tests/test_cuda_kernels.py: runs the kernels' __host__ __device__
// helpers on the CPU. `coverage` checks the work splits and prints "ok"; the other
// modes read float32 inputs from a file and write float32 outputs for the test to
// compare with torch.
#include "mpk_cuda_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace mpk::cuda;
using namespace mpk::cuda::detail;

static int failures = 0;

#define CHECK(condition, ...)                                   \
    do {                                                        \
        if (!(condition)) {                                     \
            if (failures < 20) {                                \
                std::fprintf(stderr, "FAILED %s: ", #condition); \
                std::fprintf(stderr, __VA_ARGS__);              \
                std::fprintf(stderr, "\n");                     \
            }                                                   \
            ++failures;                                         \
        }                                                       \
    } while (0)

// Each element of [0, n) must have been counted exactly once.
static void expect_once(const std::vector<int>& counts, const char* what, int a, int b, int c) {
    for (size_t i = 0; i < counts.size(); ++i) {
        CHECK(counts[i] == 1, "%s (%d, %d, %d): element %zu covered %d times", what, a, b, c, i, counts[i]);
    }
}

// Emulates for_each_span_element: vectors spread over the threads, then one scalar
// element per thread.
static void check_vector_span() {
    for (int width : {1, 2, 4, 8}) {
        for (int base = 0; base < 17; ++base) {
            for (int begin = 0; begin < 20; ++begin) {
                for (int end = begin; end < begin + 45; ++end) {
                    const VectorSpan span = vector_span(base, begin, end, width);
                    CHECK(begin <= span.head_end, "vector_span head (%d, %d, %d, %d)", width, base, begin, end);
                    CHECK(span.head_end <= span.body_end, "vector_span body (%d, %d, %d, %d)", width, base, begin, end);
                    CHECK(span.body_end <= end, "vector_span tail (%d, %d, %d, %d)", width, base, begin, end);
                    CHECK((span.body_end - span.head_end) % width == 0, "vector_span body of whole vectors");
                    std::vector<int> counts(end - begin, 0);
                    for (int c = span.head_end; c < span.body_end; c += width) {
                        CHECK((base + c) % width == 0, "vector at column %d (base %d) is misaligned for width %d", c, base, width);
                        for (int e = 0; e < width; ++e) ++counts[c + e - begin];
                    }
                    for (int thread = 0; thread < kThreads; ++thread) {
                        const int column = span_scalar_column(span, begin, end, thread);
                        if (column >= 0) ++counts[column - begin];
                        if (thread >= 2 * width) CHECK(column < 0, "scalar element %d of a width-%d span", thread, width);
                    }
                    expect_once(counts, "vector_span", width, base, end - begin);
                }
            }
        }
    }
}

// Emulates linear_rows' assignment: row groups dealt to warps round robin, K split into
// lane vectors over batches of kLinearBatch steps.
static void check_linear_split() {
    for (int rows_per_group : {1, 2, 4}) {
        for (int c0 : {0, 3, 16, 151920}) {
            for (int width = 1; width <= 80; ++width) {
                const int c1 = c0 + width;
                std::vector<int> counts(width, 0);
                for (int warp = 0; warp < kWarps; ++warp) {
                    for (int group = warp; group < linear_group_count(c0, c1, rows_per_group); group += kWarps) {
                        const Range rows = linear_group_rows(c0, c1, rows_per_group, group);
                        CHECK(rows.end > rows.begin, "linear row group %d of [%d, %d) is empty", group, c0, c1);
                        for (int r = rows.begin; r < rows.end; ++r) ++counts[r - c0];
                    }
                }
                expect_once(counts, "linear rows", rows_per_group, c0, width);
            }
        }
    }
    for (int k = 1; k <= 4200; k += (k < 300 ? 1 : 37)) {
        for (int width : {1, 2, 4, 8}) {
            if (k % width != 0) continue;
            const int steps = linear_k_steps(k, width);
            const int batch = steps < kLinearBatch ? steps : kLinearBatch;
            std::vector<int> counts(k, 0);
            for (int s0 = 0; s0 < steps; s0 += batch) {
                for (int b = 0; b < batch; ++b) {
                    for (int lane = 0; lane < kWarpSize; ++lane) {
                        const int offset = linear_k_offset(s0 + b, lane, width);
                        if (offset >= k) continue;
                        CHECK(offset + width <= k, "linear K vector at %d overruns K=%d", offset, k);
                        CHECK(offset % width == 0, "linear K vector at %d is misaligned", offset);
                        for (int e = 0; e < width; ++e) ++counts[offset + e];
                    }
                }
            }
            expect_once(counts, "linear K", k, width, 0);
        }
    }
}

// Emulates linear_rows_staged's pipeline for T tokens and K columns over tiles
// [c0, c1): the copies of every chunk, the stage buffers they land in, the reads of the
// compute, and the order of issues, waits and barriers, with linear_prefetch issuing
// the first chunks (STAGED) or linear_task issuing all of them.
template <int T, int K>
static void check_linear_pipeline() {
    using Staging = LinearStaging<T, K>;
    CHECK(Staging::kEnabled, "linear pipeline disabled for T=%d K=%d", T, K);
    CHECK(Staging::kStages >= 2, "T=%d K=%d: %d stages", T, K, Staging::kStages);
    CHECK(Staging::kPipelineBytes == Staging::kStages * Staging::kStageBytes, "T=%d K=%d: pipeline bytes", T, K);
    CHECK(Staging::kPipelineBytes <= kLinearPipelineBytes, "T=%d K=%d: %d bytes of stages", T, K, Staging::kPipelineBytes);
    CHECK(kLinearPipelineBytes < kSmemBytes, "the pipeline leaves no shared memory to spare");
    CHECK(Staging::kStageBytes % 16 == 0, "T=%d K=%d: stage of %d bytes breaks 16-byte alignment", T, K, Staging::kStageBytes);
    CHECK(Staging::kPrefetchedChunks == Staging::kStages - 1, "T=%d K=%d: prefetched chunks", T, K);
    CHECK(Staging::kRows * Staging::kPassTokens <= kWarpSize, "T=%d K=%d: outputs per row group", T, K);
    CHECK((linear_smem_bytes<T, K>() == Staging::kPipelineBytes), "T=%d K=%d: linear_smem_bytes", T, K);
    constexpr int kSlots = Staging::kStageBytes / 16;

    for (int c0 : {0, 5, 1000}) {
        for (int width : {1, 7, 31, 32, 33, 95, 128, 129, 300}) {
            const int c1 = c0 + width;
            const int count = Staging::chunk_count(c0, c1);
            CHECK(count > 0, "T=%d K=%d tile [%d, %d) has no chunks", T, K, c0, c1);

            // Copies: each weight element of the tile once per token pass, each 16-byte
            // slot of a stage buffer written at most once per chunk.
            std::vector<int> copied(static_cast<size_t>(Staging::kPasses) * width * K, 0);
            std::vector<std::vector<int64_t>> slot_source(count, std::vector<int64_t>(kSlots, -1));
            for (int index = 0; index < count; ++index) {
                const LinearChunk part = Staging::chunk(index, c0, c1);
                CHECK(part.pass >= 0 && part.pass < Staging::kPasses, "chunk %d pass %d", index, part.pass);
                CHECK(c0 <= part.row_begin && part.row_begin < part.row_end && part.row_end <= c1,
                      "chunk %d rows [%d, %d) of tile [%d, %d)", index, part.row_begin, part.row_end, c0, c1);
                CHECK(part.row_end - part.row_begin <= Staging::kChunkRows, "chunk %d has too many rows", index);
                CHECK(0 <= part.k_begin && part.k_begin < part.k_end && part.k_end <= K, "chunk %d columns [%d, %d)",
                      index, part.k_begin, part.k_end);
                CHECK(part.k_end - part.k_begin <= Staging::kSliceColumns, "chunk %d slice is too wide", index);
                const int copies = Staging::copy_count(part);
                const int stage = Staging::stage_of(index);
                CHECK(0 <= stage && stage < Staging::kStages, "chunk %d in stage %d", index, stage);
                for (int thread = 0; thread < kThreads; ++thread) {
                    for (int i = thread; i < copies; i += kThreads) {
                        const LinearCopy copy = Staging::copy(part, i);
                        CHECK(copy.destination % 16 == 0, "chunk %d copy %d lands at byte %d", index, i, copy.destination);
                        CHECK(copy.destination >= 0 && copy.destination + 16 <= Staging::kStageBytes,
                              "chunk %d copy %d at byte %d leaves its %d-byte stage", index, i, copy.destination,
                              Staging::kStageBytes);
                        // The stage's absolute bytes stay inside that stage's buffer.
                        const int absolute = stage * Staging::kStageBytes + copy.destination;
                        CHECK(absolute / Staging::kStageBytes == stage, "chunk %d copy %d at byte %d overlaps another stage",
                              index, i, absolute);
                        CHECK(absolute + 16 <= Staging::kPipelineBytes, "chunk %d copy %d at byte %d leaves the pipeline",
                              index, i, absolute);
                        CHECK(copy.source % kCopyElements == 0, "chunk %d copy %d reads misaligned element %lld", index, i,
                              static_cast<long long>(copy.source));
                        const int row = static_cast<int>(copy.source / K), k = static_cast<int>(copy.source % K);
                        CHECK(part.row_begin <= row && row < part.row_end && part.k_begin <= k && k + kCopyElements <= part.k_end,
                              "chunk %d copy %d reads (%d, %d) outside the chunk", index, i, row, k);
                        if (copy.destination < 0 || copy.destination + 16 > Staging::kStageBytes) continue;
                        int64_t& slot = slot_source[index][copy.destination / 16];
                        CHECK(slot == -1, "chunk %d writes stage byte %d twice", index, copy.destination);
                        slot = copy.source;
                        if (row < c0 || row >= c1) continue;
                        for (int e = 0; e < kCopyElements; ++e) {
                            ++copied[(static_cast<size_t>(part.pass) * width + (row - c0)) * K + k + e];
                        }
                    }
                }
            }
            expect_once(copied, "linear pipeline copies", T, K, width);

            // Reads: every stored output's products read the element that the chunk's copy
            // put at that stage offset, and each element once per pass.
            std::vector<int> read(copied.size(), 0);
            for (int index = 0; index < count; ++index) {
                const LinearChunk part = Staging::chunk(index, c0, c1);
                const int chunk_rows = part.row_end - part.row_begin;
                for (int warp = 0; warp < kWarps; ++warp) {
                    for (int round = 0; round < Staging::kGroupsPerWarp; ++round) {
                        const int first_row = Staging::group_row(warp, round);
                        if (first_row >= chunk_rows) continue;
                        for (int step = 0; step < Staging::kSliceSteps; ++step) {
                            for (int lane = 0; lane < kWarpSize; ++lane) {
                                const int k = part.k_begin + linear_k_offset(step, lane, kCopyElements);
                                if (k >= part.k_end) continue;
                                for (int r = 0; r < Staging::kRows; ++r) {
                                    const bool repeated = first_row + r >= chunk_rows;
                                    const int row = repeated ? chunk_rows - 1 : first_row + r;
                                    const int offset = Staging::stage_offset(row, k - part.k_begin);
                                    CHECK(offset % 16 == 0, "chunk %d reads misaligned stage byte %d", index, offset);
                                    CHECK(offset >= 0 && offset + 16 <= Staging::kStageBytes,
                                          "chunk %d reads stage byte %d outside its %d-byte stage", index, offset,
                                          Staging::kStageBytes);
                                    if (offset < 0 || offset + 16 > Staging::kStageBytes) continue;
                                    const int64_t expected = static_cast<int64_t>(part.row_begin + row) * K + k;
                                    CHECK(slot_source[index][offset / 16] == expected,
                                          "chunk %d reads stage byte %d: element %lld landed there, expected %lld", index,
                                          offset, static_cast<long long>(slot_source[index][offset / 16]),
                                          static_cast<long long>(expected));
                                    if (repeated) continue;
                                    for (int e = 0; e < kCopyElements; ++e) {
                                        ++read[(static_cast<size_t>(part.pass) * width + (part.row_begin + row - c0)) * K + k + e];
                                    }
                                }
                            }
                        }
                    }
                }
            }
            expect_once(read, "linear pipeline reads", T, K, width);

            // Schedule. groups[g] is the chunk of the g-th committed group (-1: empty).
            // wait_group(kPendingGroups) completes all groups but the newest kPendingGroups.
            for (bool staged : {false, true}) {
                std::vector<int> groups;
                std::vector<int> issued(count, 0);
                std::vector<int> occupant(Staging::kStages, -1);
                auto issue = [&](int index, int iteration) {
                    if (index < count) {
                        const int stage = Staging::stage_of(index);
                        CHECK(occupant[stage] < iteration, "chunk %d overwrites chunk %d before iteration %d read it",
                              index, occupant[stage], iteration);
                        occupant[stage] = index;
                        ++issued[index];
                    }
                    groups.push_back(index < count ? index : -1);
                };
                if (staged) {
                    for (int index = 0; index < Staging::kPrefetchedChunks; ++index) issue(index, 0);
                }
                const int first = Staging::task_first_chunk(staged);
                CHECK(first == (staged ? Staging::kPrefetchedChunks : 0),
                      "linear_task starts issuing at chunk %d (staged %d)", first, staged);
                for (int index = first; index < Staging::kPrefetchedChunks; ++index) issue(index, 0);
                CHECK(static_cast<int>(groups.size()) == Staging::kPrefetchedChunks, "prologue committed %zu groups",
                      groups.size());
                for (int iteration = 0; iteration < count; ++iteration) {
                    const int complete = static_cast<int>(groups.size()) - Staging::kPendingGroups;
                    int group = -1;
                    for (int g = 0; g < static_cast<int>(groups.size()); ++g) {
                        if (groups[g] == iteration) group = g;
                    }
                    CHECK(group >= 0, "iteration %d reads chunk %d, which was never issued", iteration, iteration);
                    CHECK(group < complete, "iteration %d reads chunk %d before waiting for it (group %d, %d complete)",
                          iteration, iteration, group, complete);
                    issue(Staging::chunk_issued_in(iteration), iteration);
                    CHECK(occupant[Staging::stage_of(iteration)] == iteration, "iteration %d: stage %d holds chunk %d",
                          iteration, Staging::stage_of(iteration), occupant[Staging::stage_of(iteration)]);
                }
                for (int index = 0; index < count; ++index) {
                    CHECK(issued[index] == 1, "chunk %d issued %d times (staged %d, T=%d K=%d tile [%d, %d))", index,
                          issued[index], staged, T, K, c0, c1);
                }
            }
        }
    }
}

// K that 16-byte copies cannot split keeps linear_task on registers, and so does a
// linear_prefetch of it.
static void check_linear_pipeline_disabled() {
    using Odd = LinearStaging<1, 1001>;
    using Multiple4 = LinearStaging<2, 4100>;
    CHECK(!Odd::kEnabled, "K=1001 must not use the pipeline");
    CHECK(!Multiple4::kEnabled, "K=4100 must not use the pipeline");
    CHECK(Odd::kPrefetchedChunks == 0, "K=1001 prefetches %d chunks", Odd::kPrefetchedChunks);
    CHECK(Odd::kPipelineBytes == 0, "K=1001 claims %d bytes of shared memory", Odd::kPipelineBytes);
}

template <int HD>
static void check_attention_layout() {
    using Layout = AttentionLayout<HD, vector_width_for(HD)>;
    static_assert(Layout::kLanesPerSlot * Layout::kSlotsPerWarp == kWarpSize, "slot groups tile the warp");
    // The elements of one cache row over the lanes of a slot group.
    std::vector<int> counts(HD, 0);
    for (int slot_lane = 0; slot_lane < Layout::kLanesPerSlot; ++slot_lane) {
        for (int i = 0; i < Layout::kVectorsPerLane; ++i) {
            const int vector = attention_lane_vector(slot_lane, i, Layout::kLanesPerSlot, Layout::kVectors);
            if (vector < 0) continue;
            for (int e = 0; e < Layout::kVec; ++e) ++counts[vector * Layout::kVec + e];
        }
    }
    expect_once(counts, "attention head elements", HD, Layout::kVec, Layout::kLanesPerSlot);
    // The slots [0, length) over the CTA's slot groups, stepping as attend_row does.
    for (int length = 1; length <= 700; length += (length < 100 ? 1 : 29)) {
        std::vector<int> slots(length, 0);
        constexpr int kStride = Layout::kSlotGroups * kAttentionSlotBatch;
        for (int base = 0; base < length; base += kStride) {
            for (int b = 0; b < kAttentionSlotBatch; ++b) {
                for (int group = 0; group < Layout::kSlotGroups; ++group) {
                    const int slot = attention_slot(base / Layout::kSlotGroups + b, group, Layout::kSlotGroups, length);
                    if (slot >= 0) ++slots[slot];
                }
            }
        }
        expect_once(slots, "attention slots", HD, length, Layout::kSlotGroups);
    }
    CHECK(attention_smem_bytes<HD>() <= kSmemBytes, "attention scratch for head_dim %d", HD);
}

static void check_rope_work() {
    for (int head_dim : {2, 6, 64, 96, 128}) {
        for (int heads : {1, 2, 5}) {
            const int q_pairs = heads * head_dim / 2;
            const int half = head_dim / 2;
            std::vector<int> q(heads * head_dim, 0), k(head_dim, 0), v(head_dim, 0);
            for (int item = 0; item < q_pairs + half + head_dim; ++item) {
                const RopeWork work = rope_work(item, q_pairs, head_dim);
                CHECK(work.column >= 0, "rope item %d has column %d", item, work.column);
                if (work.kind == RopeItem::kQPair) {
                    CHECK(work.column < half, "rope q item %d column %d", item, work.column);
                    CHECK(work.head < heads, "rope q item %d head %d", item, work.head);
                    ++q[work.head * head_dim + work.column];
                    ++q[work.head * head_dim + work.column + half];
                } else if (work.kind == RopeItem::kKPair) {
                    CHECK(work.column < half, "rope k item %d", item);
                    ++k[work.column];
                    ++k[work.column + half];
                } else {
                    CHECK(work.column < head_dim, "rope v item %d", item);
                    ++v[work.column];
                }
            }
            expect_once(q, "rope q", head_dim, heads, 0);
            expect_once(k, "rope k", head_dim, heads, 0);
            expect_once(v, "rope v", head_dim, heads, 0);
        }
    }
}

static void check_bf16_packing() {
    const float values[] = {0.0f, -0.0f, 1.0f, -2.5f, 3.140625f, 65280.0f, 1e-30f, INFINITY, -INFINITY};
    for (float a : values) {
        for (float b : values) {
            const uint32_t word = pack_bf16x2(a, b);
            CHECK(low_bf16(word) == round_bf16(a), "pack_bf16x2(%g, %g) low half", a, b);
            CHECK(high_bf16(word) == round_bf16(b), "pack_bf16x2(%g, %g) high half", a, b);
        }
    }
    CHECK(is_nan(round_bf16(NAN)), "NaN must stay NaN when rounded to bf16");
    // 1 + 2^-8 is halfway between two bf16 values and rounds to even (1); 1 + 3 * 2^-8
    // rounds up to 1 + 2^-6.
    CHECK(round_bf16(1.00390625f) == 1.0f, "round half to even, down");
    CHECK(round_bf16(1.01171875f) == 1.015625f, "round half to even, up");
}

static void check_argmax_order() {
    const float values[] = {NAN, INFINITY, -INFINITY, 1.0f, 1.0f, 0.0f, -0.0f, -1.0f, NAN, 2.0f};
    const int n = sizeof(values) / sizeof(values[0]);
    for (int i = 0; i < n; ++i) {
        CHECK(!argmax_precedes(values[i], i, values[i], i), "argmax_precedes is irreflexive");
        for (int j = 0; j < n; ++j) {
            if (i == j) continue;
            CHECK(argmax_precedes(values[i], i, values[j], j) != argmax_precedes(values[j], j, values[i], i),
                  "argmax_precedes must order (%g, %d) and (%g, %d)", values[i], i, values[j], j);
            for (int l = 0; l < n; ++l) {
                if (l == i || l == j) continue;
                if (argmax_precedes(values[i], i, values[j], j) && argmax_precedes(values[j], j, values[l], l)) {
                    CHECK(argmax_precedes(values[i], i, values[l], l), "argmax_precedes is transitive");
                }
            }
        }
        CHECK(argmax_precedes(values[i], i, argmax_empty().value, argmax_empty().index), "every element beats the empty candidate");
    }
}

static int run_coverage() {
    check_vector_span();
    check_linear_split();
    check_linear_pipeline<1, 1024>();
    check_linear_pipeline<1, 3072>();
    check_linear_pipeline<1, 896>();
    check_linear_pipeline<1, 160>();
    check_linear_pipeline<1, 64>();
    check_linear_pipeline<1, 8>();
    check_linear_pipeline<2, 4104>();
    check_linear_pipeline<7, 1000>();
    check_linear_pipeline<16, 64>();
    check_linear_pipeline<16, 2048>();
    check_linear_pipeline<40, 256>();
    check_linear_pipeline_disabled();
    check_attention_layout<6>();
    check_attention_layout<64>();
    check_attention_layout<80>();
    check_attention_layout<96>();
    check_attention_layout<128>();
    check_attention_layout<256>();
    check_attention_layout<512>();
    check_rope_work();
    check_bf16_packing();
    check_argmax_order();
    if (failures != 0) {
        std::fprintf(stderr, "%d coverage checks failed\n", failures);
        return 1;
    }
    std::printf("ok\n");
    return 0;
}

static std::vector<float> read_floats(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (f == nullptr) {
        std::fprintf(stderr, "cannot open %s\n", path);
        std::exit(2);
    }
    std::vector<float> data;
    float value;
    while (std::fread(&value, sizeof(value), 1, f) == 1) data.push_back(value);
    std::fclose(f);
    return data;
}

static void write_floats(const char* path, const std::vector<float>& data) {
    FILE* f = std::fopen(path, "wb");
    if (f == nullptr || std::fwrite(data.data(), sizeof(float), data.size(), f) != data.size()) {
        std::fprintf(stderr, "cannot write %s\n", path);
        std::exit(2);
    }
    std::fclose(f);
}

// Elementwise math: each input row has `arity` floats, each output row `results`.
static int run_elementwise(const std::string& function, const std::vector<float>& in, std::vector<float>& out) {
    if (function == "rms") {
        for (size_t i = 0; i + 3 <= in.size(); i += 3) out.push_back(rms_normalize_element(in[i], in[i + 1], in[i + 2]));
    } else if (function == "inverse_rms") {
        for (size_t i = 0; i + 3 <= in.size(); i += 3) out.push_back(inverse_rms(in[i], static_cast<int>(in[i + 1]), in[i + 2]));
    } else if (function == "gelu") {
        for (float x : in) out.push_back(gelu(x));
    } else if (function == "silu_mul") {
        for (size_t i = 0; i + 2 <= in.size(); i += 2) out.push_back(silu_mul_element(in[i], in[i + 1]));
    } else if (function == "rope") {
        for (size_t i = 0; i + 6 <= in.size(); i += 6) {
            float low, high;
            rotate_pair(in[i], in[i + 1], in[i + 2], in[i + 3], in[i + 4], in[i + 5], low, high);
            out.push_back(low);
            out.push_back(high);
        }
    } else if (function == "linear_bf16") {
        // store_element's bf16 rounding, as the kernel stores into a bf16 output.
        for (size_t i = 0; i + 2 <= in.size(); i += 2) out.push_back(round_bf16(linear_output<true>(in[i], in[i + 1])));
    } else if (function == "linear_bf16_plain") {
        for (size_t i = 0; i + 2 <= in.size(); i += 2) out.push_back(round_bf16(linear_output<false>(in[i], in[i + 1])));
    } else if (function == "linear_float") {
        for (size_t i = 0; i + 2 <= in.size(); i += 2) out.push_back(linear_output<true>(in[i], in[i + 1]));
    } else if (function == "linear_float_plain") {
        for (size_t i = 0; i + 2 <= in.size(); i += 2) out.push_back(linear_output<false>(in[i], in[i + 1]));
    } else {
        std::fprintf(stderr, "unknown function %s\n", function.c_str());
        return 2;
    }
    return 0;
}

// Emulates attend_row's softmax for one head and a Layout of head_dim HD: slot groups
// take slots as attention_slot assigns them, the groups of a warp merge in the shuffle
// butterfly's order, and the warps merge in order as the final loop does. Input: n,
// dim, n scores (already scaled), n * dim values. Output: dim floats.
template <int HD>
static void emulate_softmax(const std::vector<float>& in, std::vector<float>& out) {
    using Layout = AttentionLayout<HD, vector_width_for(HD)>;
    const int n = static_cast<int>(in[0]), dim = static_cast<int>(in[1]);
    const float* scores = in.data() + 2;
    const float* values = scores + n;
    constexpr int kGroups = Layout::kSlotGroups;
    std::vector<float> m(kGroups, -INFINITY), l(kGroups, 0.0f), acc(kGroups * dim, 0.0f);
    constexpr int kStride = kGroups * kAttentionSlotBatch;
    for (int base = 0; base < n; base += kStride) {
        for (int b = 0; b < kAttentionSlotBatch; ++b) {
            for (int g = 0; g < kGroups; ++g) {
                const int slot = attention_slot(base / kGroups + b, g, kGroups, n);
                if (slot < 0) continue;
                float correction, weight;
                online_softmax_step(m[g], l[g], scores[slot], correction, weight);
                for (int d = 0; d < dim; ++d) acc[g * dim + d] = acc[g * dim + d] * correction + weight * values[slot * dim + d];
            }
        }
    }
    // Butterfly within each warp: lane offsets kLanesPerSlot, 2 * kLanesPerSlot, ...
    // pair slot group g with g ^ (offset / kLanesPerSlot).
    for (int step = 1; step < Layout::kSlotsPerWarp; step *= 2) {
        const std::vector<float> m0 = m, l0 = l, acc0 = acc;
        for (int g = 0; g < kGroups; ++g) {
            const int other = g ^ step;
            float self_scale, other_scale;
            merge_softmax(m[g], l[g], m0[other], l0[other], self_scale, other_scale);
            for (int d = 0; d < dim; ++d) acc[g * dim + d] = acc0[g * dim + d] * self_scale + acc0[other * dim + d] * other_scale;
        }
    }
    float total_m = m[0], total_l = l[0];
    std::vector<float> total(acc.begin(), acc.begin() + dim);
    for (int w = 1; w < kWarps; ++w) {
        const int g = w * Layout::kSlotsPerWarp;
        float self_scale, other_scale;
        merge_softmax(total_m, total_l, m[g], l[g], self_scale, other_scale);
        for (int d = 0; d < dim; ++d) total[d] = total[d] * self_scale + acc[g * dim + d] * other_scale;
    }
    for (int d = 0; d < dim; ++d) out.push_back(total[d] / total_l);
}

// Emulates argmax_partial_task's reduction over one row: strided vectors and scalars
// per thread, the shuffle butterfly per warp, then the warps in order. Input: the row
// offset modulo 4 (the row's alignment), then the row. Output: value and index.
static void emulate_argmax(const std::vector<float>& in, std::vector<float>& out) {
    const int offset = static_cast<int>(in[0]);
    const float* row = in.data() + 1;
    const int count = static_cast<int>(in.size()) - 1;
    const VectorSpan span = vector_span(offset, 0, count, 4);
    std::vector<ArgmaxCandidate> best(kThreads, argmax_empty());
    for (int thread = 0; thread < kThreads; ++thread) {
        for (int i = thread; i < (span.body_end - span.head_end) / 4; i += kThreads) {
            for (int e = 0; e < 4; ++e) argmax_update(best[thread], row[span.head_end + 4 * i + e], span.head_end + 4 * i + e);
        }
        for (int c = thread; c < span.head_end; c += kThreads) argmax_update(best[thread], row[c], c);
        for (int c = span.body_end + thread; c < count; c += kThreads) argmax_update(best[thread], row[c], c);
    }
    for (int step = kWarpSize / 2; step > 0; step /= 2) {
        const std::vector<ArgmaxCandidate> previous = best;
        for (int thread = 0; thread < kThreads; ++thread) {
            const ArgmaxCandidate other = previous[thread ^ step];
            argmax_update(best[thread], other.value, other.index);
        }
    }
    ArgmaxCandidate total = argmax_empty();
    for (int w = 0; w < kWarps; ++w) argmax_update(total, best[w * kWarpSize].value, best[w * kWarpSize].index);
    out.push_back(total.value);
    out.push_back(static_cast<float>(total.index));
}

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "coverage") return run_coverage();
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s coverage | FUNCTION INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    const std::string function = argv[1];
    const std::vector<float> in = read_floats(argv[2]);
    std::vector<float> out;
    if (function == "softmax_64") {
        emulate_softmax<64>(in, out);
    } else if (function == "softmax_128") {
        emulate_softmax<128>(in, out);
    } else if (function == "softmax_256") {
        emulate_softmax<256>(in, out);
    } else if (function == "argmax") {
        emulate_argmax(in, out);
    } else if (int status = run_elementwise(function, in, out); status != 0) {
        return status;
    }
    write_floats(argv[3], out);
    return 0;
}
"""

# A small translation unit built with other MPK_THREADS values, which change the warp
# count, the attention slot groups and the scratch sizes.
THREADS_SOURCE = r"""
#include "mpk_cuda_kernels.cuh"
using mpk::cuda::bf16;
namespace k = mpk::cuda;
#define KERNEL extern "C" __global__ void __launch_bounds__(MPK_THREADS, 1)
#define SMEM extern __shared__ __align__(16) char smem[]
KERNEL rmsnorm_4096(const bf16* x, const bf16* w, bf16* o, int r0, int r1) { SMEM; k::rmsnorm_task<4096>(x, w, o, 1e-6f, r0, r1, smem); }
KERNEL linear_1x1024x4096(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_task<1, 1024, 4096, bf16, false>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_staged_1x1024x4096(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<1, 1024>(w, c0, c1, smem); k::linear_task<1, 1024, 4096, bf16, false, true>(x, w, nullptr, o, c0, c1, smem); }
KERNEL linear_staged_16x2048x2048(const bf16* x, const bf16* w, bf16* o, int c0, int c1) { SMEM; k::linear_prefetch<16, 2048>(w, c0, c1, smem); k::linear_task<16, 2048, 2048, bf16, false, true>(x, w, nullptr, o, c0, c1, smem); }
KERNEL attention_1x4096x128(const bf16* qkv, const int64_t* p, const bf16* kc, const bf16* vc, bf16* o, int g, int r0, int r1, int q0, int q1) { SMEM; k::attention_task<1, 4096, 128, 8, 4096, 2048>(qkv, p, kc, vc, o, 0.088f, g, r0, r1, q0, q1, smem); }
KERNEL argmax_partial_1x151936(const float* l, float* v, int64_t* i, int part) { SMEM; k::argmax_partial_task<1, 151936, 37, 4107>(l, v, i, part, smem); }
"""
THREAD_COUNTS = (128, 512)


@dataclass
class Build:
    name: str
    output: str          # stdout and stderr together
    returncode: int
    seconds: float


@dataclass
class KernelReport:
    name: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        pytest.fail("nvcc not found on PATH or at /usr/local/cuda/bin/nvcc; install the CUDA toolkit (12.8 or newer for sm_100a) to build the CUDA kernels")
    return nvcc


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Build]:
    """Build the device unit for every arch, the MPK_THREADS variants and the host
    program, all at once.
    """
    nvcc = find_nvcc()
    root = tmp_path_factory.mktemp("cuda_kernels")
    (root / "kernels.cu").write_text(DEVICE_SOURCE)
    (root / "threads.cu").write_text(THREADS_SOURCE)
    (root / "host.cu").write_text(HOST_SOURCE)

    commands = {}
    for arch in ARCHS:
        commands[arch] = [nvcc, f"-arch={arch}", *NVCC_FLAGS, "-Xptxas", "-v", "-c", str(root / "kernels.cu"), "-o", str(root / f"{arch}.o")]
    for threads in THREAD_COUNTS:
        commands[f"threads_{threads}"] = [nvcc, "-arch=sm_90a", *NVCC_FLAGS, f"-DMPK_THREADS={threads}", "-Xptxas", "-v",
                                          "-c", str(root / "threads.cu"), "-o", str(root / f"threads_{threads}.o")]
    # PTX of the device unit, to check which instructions the kernels use.
    commands["ptx_sm_80"] = [nvcc, "-arch=sm_80", *NVCC_FLAGS, "-ptx", str(root / "kernels.cu"), "-o", str(root / "sm_80.ptx")]
    # The host program needs device code for no arch, but nvcc still compiles the
    # header's device functions for its default one.
    commands["host"] = [nvcc, "-arch=sm_80", *NVCC_FLAGS, str(root / "host.cu"), "-o", str(root / "host")]

    started = {name: (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), time.monotonic())
               for name, cmd in commands.items()}
    results = {}
    for name, (process, start) in started.items():
        try:
            output, _ = process.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            output += f"\nnvcc timed out after {BUILD_TIMEOUT} s"
        results[name] = Build(name, output, process.returncode, time.monotonic() - start)
    results["root"] = Build("root", str(root), 0, 0.0)
    return results


def ptxas_reports(output: str) -> dict[str, KernelReport]:
    """Parse `-Xptxas -v` output into one report per entry function."""
    reports: dict[str, KernelReport] = {}
    current = None
    stack = stores = loads = 0
    for line in output.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = m.group(1)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            stack, stores, loads = (int(g) for g in m.groups())
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            reports[current] = KernelReport(current, int(m.group(1)), stack, stores, loads)
            current = None
    return reports


def kernel_names(source: str) -> set[str]:
    return set(re.findall(r"^KERNEL (\w+)\(", source, re.MULTILINE))


def ptx_entries(ptx: str) -> dict[str, str]:
    """Split PTX into the text of each entry function, by name."""
    parts = re.split(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def run_host(builds: dict[str, Build], function: str, inputs: torch.Tensor) -> torch.Tensor:
    host = builds["host"]
    assert host.returncode == 0, f"host program failed to build:\n{host.output[-4000:]}"
    root = Path(builds["root"].output)
    source, target = root / f"{function}.in", root / f"{function}.out"
    source.write_bytes(inputs.to(torch.float32).contiguous().numpy().tobytes())
    result = subprocess.run([str(root / "host"), function, str(source), str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"host program {function} failed: {result.stderr}"
    return torch.frombuffer(bytearray(target.read_bytes()), dtype=torch.float32)


def bf16_values(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("arch", ARCHS)
def test_device_unit_compiles(builds, arch):
    build = builds[arch]
    assert build.returncode == 0, f"nvcc -arch={arch} failed:\n{build.output[-6000:]}"
    assert build.seconds < COMPILE_SECONDS, f"nvcc -arch={arch} took {build.seconds:.0f} s, over {COMPILE_SECONDS} s"


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_do_not_spill(builds, arch):
    build = builds[arch]
    assert build.returncode == 0, f"nvcc -arch={arch} failed:\n{build.output[-6000:]}"
    reports = ptxas_reports(build.output)
    missing = kernel_names(DEVICE_SOURCE) - reports.keys()
    assert not missing, f"ptxas reported nothing for {sorted(missing)} on {arch}"
    for report in reports.values():
        assert report.spill_stores == 0, f"{report.name} on {arch} spills: {report}"
        assert report.spill_loads == 0, f"{report.name} on {arch} spills: {report}"
        assert report.stack_bytes == 0, f"{report.name} on {arch} uses local memory: {report}"


@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_other_thread_counts_compile(builds, threads):
    build = builds[f"threads_{threads}"]
    assert build.returncode == 0, f"nvcc -DMPK_THREADS={threads} failed:\n{build.output[-6000:]}"
    reports = ptxas_reports(build.output)
    assert kernel_names(THREADS_SOURCE) <= reports.keys()
    for report in reports.values():
        assert report.spill_stores == 0, f"{report.name} with MPK_THREADS={threads} spills: {report}"
        assert report.spill_loads == 0, f"{report.name} with MPK_THREADS={threads} spills: {report}"


def test_linear_pipeline_uses_cp_async(builds):
    """Linear tasks with K % 8 == 0 stream their weights with cp.async into shared memory
    on sm_80, staged or not; K = 1001 keeps to registers and gets only the L2 prefetch.
    """
    build = builds["ptx_sm_80"]
    assert build.returncode == 0, f"nvcc -ptx failed:\n{build.output[-6000:]}"
    entries = ptx_entries((Path(builds["root"].output) / "sm_80.ptx").read_text())
    pipelined = {name for name in kernel_names(DEVICE_SOURCE) if name.startswith("linear_") and "1001" not in name}
    assert "linear_staged_1x1024x4096" in pipelined
    for name in sorted(pipelined):
        body = entries[name]
        assert "cp.async.cg.shared.global" in body, f"{name} issues no cp.async"
        assert "cp.async.wait_group" in body, f"{name} never waits for its cp.async groups"
        assert "ld.shared.v4" in body, f"{name} reads its stage buffers without 16-byte shared loads"
    for name in ("linear_staged_1x1024x4096", "linear_staged_16x2048x2048"):
        assert "prefetch.global.L2" in entries[name], f"{name} lost the L2 prefetch of its tile"
    scalar = entries["linear_staged_3x1001x33_float_res"]
    assert "cp.async" not in scalar
    assert "prefetch.global.L2" in scalar


def test_work_splits_cover_tiles(builds):
    host = builds["host"]
    assert host.returncode == 0, f"host program failed to build:\n{host.output[-4000:]}"
    root = Path(builds["root"].output)
    result = subprocess.run([str(root / "host"), "coverage"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"coverage checks failed:\n{result.stderr}"
    assert result.stdout.strip() == "ok"


def test_rmsnorm_rounding_matches_transformers(builds):
    """rms_normalize_element against Qwen3RMSNorm's arithmetic on bf16 tensors."""
    x = bf16_values(4096, scale=3.0, seed=1)
    weight = bf16_values(4096, seed=2)
    variance = x.float().pow(2).mean()
    inverse = torch.rsqrt(variance + 1e-6)
    expected = weight * (x.float() * inverse).to(torch.bfloat16)
    inputs = torch.stack([x.float(), inverse.expand(4096), weight.float()], dim=1)
    got = run_host(builds, "rms", inputs)
    assert torch.equal(got, expected.float()), f"{(got != expected.float()).sum()} of 4096 elements differ"


def test_inverse_rms_matches_torch(builds):
    generator = torch.Generator().manual_seed(3)
    sums = torch.rand(2000, generator=generator) * 1e4
    counts = torch.randint(1, 9000, (2000,), generator=generator).float()
    got = run_host(builds, "inverse_rms", torch.stack([sums, counts, torch.full_like(sums, 1e-6)], dim=1))
    expected = torch.rsqrt(sums / counts + 1e-6)
    assert torch.equal(got, expected)


def test_silu_mul_rounding_matches_torch(builds):
    gate = bf16_values(8192, scale=4.0, seed=4)
    up = bf16_values(8192, scale=2.0, seed=5)
    expected = (torch.nn.functional.silu(gate) * up).float()
    got = run_host(builds, "silu_mul", torch.stack([gate.float(), up.float()], dim=1))
    # The host's expf and torch's exp may differ by an ulp of fp32, which flips the bf16
    # rounding of silu only when it lands on a rounding boundary.
    differing = (got != expected).sum().item()
    assert differing <= 2, f"{differing} of 8192 elements differ"
    assert torch.allclose(got, expected, rtol=1e-2, atol=0)


def test_gelu_matches_torch(builds):
    # The exact GELU through erfc, against torch's erf formula in float64, away from the
    # negative tail where torch's 1 + erf(x) cancels.
    x = torch.linspace(-5.0, 8.0, 20_001)
    got = run_host(builds, "gelu", x)
    expected = torch.nn.functional.gelu(x.double())
    relative = ((got.double() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
    assert relative < 1e-5, f"max relative error of the CUDA GELU is {relative:.3g}"


def test_rope_rounding_matches_spec(builds):
    """rotate_pair against mpk.ops.attention.rotate on bf16 q with float tables."""
    from mpk.ops.attention import rotate

    half = 64
    x = bf16_values(32, 2 * half, scale=2.0, seed=6)
    angles = torch.rand(32, half, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 500
    cos = torch.cat([angles.cos(), angles.cos()], dim=1).float()
    sin = torch.cat([angles.sin(), angles.sin()], dim=1).float()
    expected = rotate(x[:, None, :], cos.to(torch.bfloat16), sin.to(torch.bfloat16))[:, 0].float()
    inputs = torch.stack([x[:, :half].float(), x[:, half:].float(), cos[:, :half], cos[:, half:], sin[:, :half], sin[:, half:]], dim=2)
    got = run_host(builds, "rope", inputs).reshape(32, half, 2)
    assert torch.equal(got[..., 0], expected[:, :half])
    assert torch.equal(got[..., 1], expected[:, half:])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [True, False])
def test_linear_epilogue_matches_spec(builds, out_dtype, residual):
    """linear_output against LinearSpec.run's arithmetic: a bf16 matmul result, plus a
    residual of the output's dtype, stored into the output's dtype.
    """
    generator = torch.Generator().manual_seed(8)
    dots = torch.randn(4096, generator=generator) * 30
    res = (torch.randn(4096, generator=generator) * 30).to(out_dtype)
    result = dots.to(torch.bfloat16)
    if residual:
        result = result + res
    expected = result.to(out_dtype).float()
    function = "linear_bf16" if out_dtype == torch.bfloat16 else "linear_float"
    if not residual:
        function += "_plain"
    got = run_host(builds, function, torch.stack([dots, res.float()], dim=1))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("length", [1, 2, 17, 31, 32, 33, 300, 4099])
def test_online_softmax_tree_matches_softmax(builds, head_dim, length):
    generator = torch.Generator().manual_seed(length)
    # Rounded to float32 first, because the host program reads float32.
    scores = (torch.randn(length, generator=generator) * 8).double()
    values = torch.randn(length, 16, generator=generator).double()
    expected = torch.softmax(scores, dim=0) @ values
    inputs = torch.cat([torch.tensor([length, 16], dtype=torch.float64), scores, values.reshape(-1)])
    got = run_host(builds, f"softmax_{head_dim}", inputs).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()


def test_online_softmax_with_infinities_and_nan(builds):
    scores = torch.tensor([float("-inf"), 1.0, float("-inf"), 3.0] + [float("-inf")] * 60)
    values = torch.arange(64 * 2, dtype=torch.float32).reshape(64, 2)
    expected = torch.softmax(scores, dim=0) @ values
    inputs = torch.cat([torch.tensor([64.0, 2.0]), scores, values.reshape(-1)])
    got = run_host(builds, "softmax_128", inputs)
    assert torch.allclose(got, expected, rtol=1e-6)

    scores[40] = float("nan")
    inputs = torch.cat([torch.tensor([64.0, 2.0]), scores, values.reshape(-1)])
    got = run_host(builds, "softmax_128", inputs)
    assert torch.isnan(got).all(), "a NaN score must make the output NaN, as torch.softmax does"


ARGMAX_ROWS = {
    "distinct": torch.randn(4107, generator=torch.Generator().manual_seed(9)),
    "ties": torch.tensor([1.0, 3.0, 2.0] * 1001),
    "all_equal": torch.full((777,), -2.0),
    "all_neg_inf": torch.full((300,), float("-inf")),
    "nan": torch.tensor([5.0] * 500 + [float("nan")] + [7.0] * 30 + [float("nan")]),
    "inf_then_tie": torch.tensor([0.0, float("inf"), 1.0, float("inf")] * 257),
    "short": torch.tensor([-1.0, -0.0, 0.0]),
    "signed_zero": torch.tensor([-0.0, 0.0] * 600),
}


@pytest.mark.parametrize("name", list(ARGMAX_ROWS))
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_argmax_tree_matches_torch(builds, name, offset):
    row = ARGMAX_ROWS[name]
    got = run_host(builds, "argmax", torch.cat([torch.tensor([float(offset)]), row]))
    expected_index = int(row.argmax())
    assert int(got[1]) == expected_index, f"argmax of {name} at alignment {offset}: {int(got[1])}, torch says {expected_index}"
    expected_value = row[expected_index]
    assert (torch.isnan(got[0]) and torch.isnan(expected_value)) or got[0] == expected_value
