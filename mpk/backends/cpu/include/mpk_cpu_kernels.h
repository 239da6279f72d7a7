// Vectorized CPU task kernels: one function template per operator kind, each computing
// one task (one tile) of the operator exactly as the `run` method of its spec in mpk/ops
// does with torch.
//
// Conventions shared by every kernel:
//   - Activations, the KV cache and the rope tables are float32, row-major and contiguous.
//   - Weights are float or mpk::bf16 (template parameter W); bf16 is widened to float on
//     load, and every sum accumulates in float32.
//   - Template parameters are the operator's shapes, fixed at code generation; the tile
//     bounds are runtime ints.
//   - The vector path comes from mpk_simd.h (AVX-512, AVX2 + FMA or scalar).
//
// The kernels rely on IEEE float semantics (NaN propagation, NaN tests and infinities in
// exp), so they must not be compiled with -ffast-math or -ffinite-math-only.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "mpk_simd.h"

namespace mpk::cpu {

namespace detail {

using simd::kWidth;
using simd::Vec;

// Tag for a full vector. The body of for_each_vector receives it for full vectors and a
// plain int count for the tail, so the overloads below pick a plain or a masked access at
// compile time.
using Full = std::integral_constant<int, kWidth>;

template <typename W>
inline Vec load_n(const W* p, Full) {
    return simd::load(p);
}
template <typename W>
inline Vec load_n(const W* p, int count) {
    return simd::load_partial(p, count);
}
inline void store_n(float* p, Vec a, Full) { simd::store(p, a); }
inline void store_n(float* p, Vec a, int count) { simd::store_partial(p, a, count); }

// Calls body(i, count) for consecutive vectors covering [begin, end): count is Full{} for
// whole vectors and an int in [1, kWidth) for the tail.
template <typename Body>
inline void for_each_vector(int begin, int end, Body&& body) {
    int i = begin;
    for (; i + kWidth <= end; i += kWidth) body(i, Full{});
    if (i < end) body(i, end - i);
}

template <int N>
inline float dot(const float* a, const float* b) {
    Vec sum = simd::zero();
    for_each_vector(0, N, [&](int i, auto count) { sum = simd::fmadd(load_n(a + i, count), load_n(b + i, count), sum); });
    return simd::reduce_add(sum);
}

// out = weight * (x * rsqrt(mean(x^2) + eps)) over one row of H elements, in the order of
// transformers' LlamaRMSNorm and Qwen3RMSNorm. out may equal x.
template <int H, typename W>
inline void rms_normalize_row(const float* x, const W* weight, float* out, float eps) {
    Vec squares = simd::zero();
    for_each_vector(0, H, [&](int i, auto count) {
        Vec v = load_n(x + i, count);
        squares = simd::fmadd(v, v, squares);
    });
    const float mean = simd::reduce_add(squares) / static_cast<float>(H);
    const Vec inverse_rms = simd::broadcast(1.0f / std::sqrt(mean + eps));
    for_each_vector(0, H, [&](int i, auto count) {
        store_n(out + i, load_n(weight + i, count) * (load_n(x + i, count) * inverse_rms), count);
    });
}

// Rows of the weight and of x handled together by the linear microkernel. Each of the
// TOKENS x ROWS accumulators is a register, plus ROWS weight vectors and one x vector:
// 4 x 4 + 5 = 21 of the 32 zmm registers, 2 x 4 + 5 = 13 of the 16 ymm registers.
inline constexpr int kLinearRows = 4;
#if defined(MPK_SIMD_AVX2)
inline constexpr int kLinearTokens = 2;
#else
inline constexpr int kLinearTokens = 4;
#endif

// dots[t][r] = x[t, :] . w[r, :] for TOKENS rows of x and ROWS rows of w, all K long.
// Each weight vector is loaded once and used for all TOKENS rows of x. Each load also
// prefetches the same columns kLinearRows rows further on, which the next row group
// reads. In benchmarks/cpu_kernels.py (K=1024, N=3072, one thread, 2-core AMD EPYC VM)
// that raised bf16 weight streaming from DRAM from 23 to 32 GB/s; its 2 KB rows, read as
// four interleaved streams, seem too short for the hardware prefetchers alone.
// Prefetching past the end of the weights is harmless because prefetches never fault.
template <int K, int TOKENS, int ROWS, typename W>
inline void dot_block(const float* x, const W* w, float (&dots)[TOKENS][ROWS]) {
    Vec acc[TOKENS][ROWS];
#pragma GCC unroll 16
    for (int t = 0; t < TOKENS; ++t) {
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) acc[t][r] = simd::zero();
    }
    for_each_vector(0, K, [&](int k, auto count) {
        Vec weights[ROWS];
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
            const W* at = w + static_cast<std::ptrdiff_t>(r) * K + k;
            weights[r] = load_n(at, count);
            simd::prefetch(at + static_cast<std::ptrdiff_t>(kLinearRows) * K);
        }
#pragma GCC unroll 16
        for (int t = 0; t < TOKENS; ++t) {
            const Vec xv = load_n(x + static_cast<std::ptrdiff_t>(t) * K + k, count);
#pragma GCC unroll 16
            for (int r = 0; r < ROWS; ++r) acc[t][r] = simd::fmadd(xv, weights[r], acc[t][r]);
        }
    });
#pragma GCC unroll 16
    for (int t = 0; t < TOKENS; ++t) {
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) dots[t][r] = simd::reduce_add(acc[t][r]);
    }
}

// out[t0 + t, n + r] = dots (+ bias) (+ residual) for one TOKENS x ROWS block; bias may be
// null. Reading residual[i] before writing out[i], element by element, keeps residual ==
// out safe.
template <int K, int N, int TOKENS, int ROWS, typename W, typename B, bool RESIDUAL>
inline void linear_block(const float* x, const W* w, const B* bias, const float* residual, float* out, int t0, int n) {
    float dots[TOKENS][ROWS];
    dot_block<K, TOKENS, ROWS>(x + static_cast<std::ptrdiff_t>(t0) * K, w, dots);
    for (int t = 0; t < TOKENS; ++t) {
        for (int r = 0; r < ROWS; ++r) {
            const std::ptrdiff_t i = static_cast<std::ptrdiff_t>(t0 + t) * N + n + r;
            float value = dots[t][r];
            if (bias != nullptr) value += to_float(bias[n + r]);
            if constexpr (RESIDUAL) value += residual[i];
            out[i] = value;
        }
    }
}

// All T rows of x against weight rows n..n+ROWS-1. The token blocks run one after the
// other over the same ROWS x K weight slice, so the slice comes from memory once and from
// cache for the later blocks.
template <int T, int K, int N, int ROWS, typename W, typename B, bool RESIDUAL>
inline void linear_rows(const float* x, const W* weight, const B* bias, const float* residual, float* out, int n) {
    constexpr int kTokens = T < kLinearTokens ? T : kLinearTokens;
    const W* w = weight + static_cast<std::ptrdiff_t>(n) * K;
    int t0 = 0;
    for (; t0 + kTokens <= T; t0 += kTokens) linear_block<K, N, kTokens, ROWS, W, B, RESIDUAL>(x, w, bias, residual, out, t0, n);
    if constexpr (T % kTokens != 0) linear_block<K, N, T % kTokens, ROWS, W, B, RESIDUAL>(x, w, bias, residual, out, t0, n);
}

// Rotates one head in the rotate-half layout: out = x * cos + rotate_half(x) * sin with
// rotate_half(x) = cat(-x[HD/2:], x[:HD/2]). out may equal x, because each step reads
// x[i] and x[i + HD/2] before it writes them and no other step touches them.
template <int HD>
inline void rotate_half(const float* x, const float* cos, const float* sin, float* out) {
    static_assert(HD % 2 == 0, "rotary embedding needs an even head_dim");
    constexpr int kHalf = HD / 2;
    for_each_vector(0, kHalf, [&](int i, auto count) {
        const Vec low = load_n(x + i, count);
        const Vec high = load_n(x + kHalf + i, count);
        const Vec out_low = low * load_n(cos + i, count) - high * load_n(sin + i, count);
        const Vec out_high = high * load_n(cos + kHalf + i, count) + low * load_n(sin + kHalf + i, count);
        store_n(out + i, out_low, count);
        store_n(out + kHalf + i, out_high, count);
    });
}

// Attention processes up to kHeadBlock q heads of one KV group together, so each key and
// value row is read once per head block. It walks the cache slots in blocks of
// kSlotBlock, so the softmax rescaling and the exp run once per slot block.
inline constexpr int kHeadBlock = 8;
inline constexpr int kSlotBlock = 16;
static_assert(kSlotBlock % kWidth == 0, "the score buffer is processed in whole vectors");

// Attention of `heads` query vectors (q: heads x HD, contiguous) over key and value rows
// 0..length-1, which are HD wide and kSlotStride floats apart (NKV * HD in a KV cache, a
// whole qkv row in a packed encoder batch). The softmax is computed online: running max
// m and sum l per query, and the output accumulator rescaled by exp(m_old - m_new)
// whenever a block raises the max. length must be at least 1. With `maxima` and `sums`,
// each head's final m and l are stored there too (split attention merges them).
template <int HD, std::ptrdiff_t kSlotStride>
inline void attend_heads(const float* q, int heads, const float* keys, const float* values, int length, float scale,
                         float* out, float* maxima = nullptr, float* sums = nullptr) {
    constexpr int kVectors = (HD + kWidth - 1) / kWidth;
    Vec acc[kHeadBlock][kVectors];
    float running_max[kHeadBlock];
    float running_sum[kHeadBlock];
    alignas(64) float weights[kHeadBlock][kSlotBlock];
    for (int h = 0; h < heads; ++h) {
        for (int v = 0; v < kVectors; ++v) acc[h][v] = simd::zero();
        running_max[h] = -std::numeric_limits<float>::infinity();
        running_sum[h] = 0.0f;
    }

    for (int j0 = 0; j0 < length; j0 += kSlotBlock) {
        const int count = std::min(kSlotBlock, length - j0);
        for (int j = 0; j < count; ++j) {
            const float* key = keys + (j0 + j) * kSlotStride;
            for (int h = 0; h < heads; ++h) weights[h][j] = dot<HD>(q + h * HD, key) * scale;
        }

        for (int h = 0; h < heads; ++h) {
            float* w = weights[h];
            float block_max = w[0];
            for (int j = 1; j < count; ++j) block_max = std::max(block_max, w[j]);
            const float new_max = std::max(running_max[h], block_max);
            // exp(-inf) = 0 on the first block, which clears nothing because acc and the
            // sum are still zero.
            const float correction = std::exp(running_max[h] - new_max);
            running_max[h] = new_max;

            // Slots past `count` get -inf, so the whole-vector exp below turns them into 0.
            for (int j = count; j < kSlotBlock; ++j) w[j] = -std::numeric_limits<float>::infinity();
            const Vec shift = simd::broadcast(new_max);
            for (int j = 0; j < kSlotBlock; j += kWidth) simd::store(w + j, simd::exp(simd::load(w + j) - shift));

            float block_sum = 0.0f;
            for (int j = 0; j < count; ++j) block_sum += w[j];
            running_sum[h] = running_sum[h] * correction + block_sum;

            const Vec rescale = simd::broadcast(correction);
            for (int v = 0; v < kVectors; ++v) acc[h][v] = acc[h][v] * rescale;
            for (int j = 0; j < count; ++j) {
                const float* value = values + (j0 + j) * kSlotStride;
                const Vec weight = simd::broadcast(w[j]);
                for_each_vector(0, HD, [&](int i, auto n) {
                    acc[h][i / kWidth] = simd::fmadd(weight, load_n(value + i, n), acc[h][i / kWidth]);
                });
            }
        }
    }

    for (int h = 0; h < heads; ++h) {
        const Vec total = simd::broadcast(running_sum[h]);
        for_each_vector(0, HD, [&](int i, auto n) { store_n(out + h * HD + i, acc[h][i / kWidth] / total, n); });
        if (maxima != nullptr) maxima[h] = running_max[h];
        if (sums != nullptr) sums[h] = running_sum[h];
    }
}

// Exact GELU, x * Phi(x) = 0.5 * x * erfc(-x / sqrt(2)), elementwise. erfc(z) for z >= 0
// uses the Chebyshev fit of Numerical Recipes' erfcc (fractional error below 1.2e-7):
// erfc(z) = t * exp(-z^2 + P(t)) with t = 1 / (1 + z / 2). For x < 0, gelu = 0.5 * x *
// erfc(|x| / sqrt(2)); for x >= 0, erfc(-z) = 2 - erfc(z) gives x - 0.5 * x * erfc(z).
// Both keep the relative error near float rounding, also far out in the negative tail.
inline Vec gelu(Vec x) {
    const Vec zero = simd::zero();
    const Vec z = simd::max(x, zero - x) * simd::broadcast(0.70710678118654752f);
    const Vec one = simd::broadcast(1.0f);
    const Vec t = one / simd::fmadd(simd::broadcast(0.5f), z, one);
    constexpr float kCoefficients[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                       -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
    Vec poly = simd::broadcast(kCoefficients[0]);
    for (int i = 1; i < 10; ++i) poly = simd::fmadd(poly, t, simd::broadcast(kCoefficients[i]));
    const Vec erfc = t * simd::exp(poly - z * z);
    const Vec half_x_erfc = simd::broadcast(0.5f) * x * erfc;
    const Vec result = simd::select(simd::greater(zero, x), half_x_erfc, x - half_x_erfc);
    // Past x = 10, gelu(x) rounds to x; taking x there also keeps gelu(+inf) = +inf,
    // where the formula would compute inf * 0.
    return simd::select(simd::greater(x, simd::broadcast(10.0f)), x, result);
}

// Attention of up to kWidth query rows over the same key and value rows, with the
// queries in the vector lanes. This is the encoder's case, where every row of a sentence
// attends to the same keys (the decode kernel above has one query row per position).
// A score is then HD fused multiply-adds of a query-transposed vector by a broadcast key
// element. The output accumulates transposed too (acc[d] is dimension d of every query),
// from broadcast value elements, so neither step needs a horizontal sum. q rows
// are qstride floats apart, keys and values kSlotStride apart, and out rows get HD
// floats each, ostride apart. The softmax is online over blocks of kKeyBlock keys, as in
// attend_heads.
inline constexpr int kKeyBlock = 8;
inline constexpr int kValueColumns = 8;  // output dimensions kept in registers per pass over a key block

template <int HD, std::ptrdiff_t kSlotStride>
inline void attend_query_block(const float* q, std::ptrdiff_t qstride, int queries, const float* keys,
                               const float* values, int length, float scale, float* out, std::ptrdiff_t ostride) {
    alignas(64) float transposed[HD][kWidth];
    alignas(64) float acc[HD][kWidth];
    alignas(64) float probabilities[kKeyBlock][kWidth];
    alignas(64) float lanes[kWidth];
    for (int d = 0; d < HD; ++d) {
        for (int i = 0; i < kWidth; ++i) transposed[d][i] = i < queries ? q[i * qstride + d] * scale : 0.0f;
        simd::store(acc[d], simd::zero());
    }
    Vec running_max = simd::broadcast(-std::numeric_limits<float>::infinity());
    Vec running_sum = simd::zero();

    for (int j0 = 0; j0 < length; j0 += kKeyBlock) {
        const int count = std::min(kKeyBlock, length - j0);
        Vec scores[kKeyBlock];
#pragma GCC unroll 8
        for (int j = 0; j < kKeyBlock; ++j) scores[j] = simd::zero();
        for (int d = 0; d < HD; ++d) {
            const Vec column = simd::load(transposed[d]);
#pragma GCC unroll 8
            for (int j = 0; j < kKeyBlock; ++j) {
                if (j < count) scores[j] = simd::fmadd(column, simd::broadcast(keys[(j0 + j) * kSlotStride + d]), scores[j]);
            }
        }
        Vec block_max = scores[0];
        for (int j = 1; j < count; ++j) block_max = simd::max(block_max, scores[j]);
        const Vec new_max = simd::max(running_max, block_max);
        // exp(-inf) = 0 on the first block, when acc and the sum are still zero.
        const Vec correction = simd::exp(running_max - new_max);
        running_max = new_max;
        Vec block_sum = simd::zero();
        for (int j = 0; j < count; ++j) {
            const Vec p = simd::exp(scores[j] - new_max);
            block_sum = block_sum + p;
            simd::store(probabilities[j], p);
        }
        running_sum = running_sum * correction + block_sum;

        for (int d0 = 0; d0 < HD; d0 += kValueColumns) {
            Vec columns[kValueColumns];
#pragma GCC unroll 8
            for (int c = 0; c < kValueColumns; ++c) {
                if (d0 + c < HD) columns[c] = simd::load(acc[d0 + c]) * correction;
            }
            for (int j = 0; j < count; ++j) {
                const Vec p = simd::load(probabilities[j]);
                const float* value = values + (j0 + j) * kSlotStride + d0;
#pragma GCC unroll 8
                for (int c = 0; c < kValueColumns; ++c) {
                    if (d0 + c < HD) columns[c] = simd::fmadd(p, simd::broadcast(value[c]), columns[c]);
                }
            }
#pragma GCC unroll 8
            for (int c = 0; c < kValueColumns; ++c) {
                if (d0 + c < HD) simd::store(acc[d0 + c], columns[c]);
            }
        }
    }

    simd::store(lanes, running_sum);
    for (int i = 0; i < queries; ++i) {
        for (int d = 0; d < HD; ++d) out[i * ostride + d] = acc[d][i] / lanes[i];
    }
}

// Updates (best, best_index) with x[begin..end) under torch.argmax's order: NaN ranks
// above every number (the first NaN wins), and ties keep the lowest index.
inline void argmax_scalar(const float* x, int begin, int end, float& best, int& best_index) {
    for (int i = begin; i < end && !std::isnan(best); ++i) {
        if (x[i] > best || std::isnan(x[i])) {
            best = x[i];
            best_index = i;
        }
    }
}

// Max and lowest argmax of x[0..count), count >= 1. Each lane keeps its own max and the
// index where it first appeared. A NaN or an infinity in the vector part (caught because
// v * 0 is then NaN) sends the whole range to argmax_scalar, which handles both.
inline void argmax_range(const float* x, int count, float& best, int& best_index) {
    best = x[0];
    best_index = 0;
    int i = 1;
    if (count >= kWidth) {
        const Vec step = simd::broadcast(static_cast<float>(kWidth));
        Vec lane_best = simd::load(x);
        Vec index = simd::iota();
        Vec lane_index = index;
        Vec special = lane_best * simd::zero();
        for (i = kWidth; i + kWidth <= count; i += kWidth) {
            const Vec v = simd::load(x + i);
            index = index + step;
            const simd::Mask larger = simd::greater(v, lane_best);
            lane_best = simd::select(larger, v, lane_best);
            lane_index = simd::select(larger, index, lane_index);
            special = simd::fmadd(v, simd::zero(), special);
        }
        if (std::isnan(simd::reduce_add(special))) {
            best = x[0];
            best_index = 0;
            argmax_scalar(x, 1, count, best, best_index);
            return;
        }
        float lane_values[kWidth];
        float lane_indices[kWidth];
        simd::store(lane_values, lane_best);
        simd::store(lane_indices, lane_index);
        best = lane_values[0];
        best_index = static_cast<int>(lane_indices[0]);
        for (int lane = 1; lane < kWidth; ++lane) {
            const int lane_at = static_cast<int>(lane_indices[lane]);
            if (lane_values[lane] > best || (lane_values[lane] == best && lane_at < best_index)) {
                best = lane_values[lane];
                best_index = lane_at;
            }
        }
    }
    // The tail's indices are above every vector index, so a tie keeps the vector result.
    argmax_scalar(x, i, count, best, best_index);
}

}  // namespace detail

// out[t, c0:c1] = weight[tokens[t], c0:c1] for t < T. weight: [V, H]; out: [T, H].
// NOTE: V is not a template parameter, so token ids are not range-checked here, while
// the torch reference raises on an id outside [0, V). Callers must pass valid ids.
template <int T, int H, typename W>
void embedding_task(const int64_t* tokens, const W* weight, float* out, int c0, int c1) {
    for (int t = 0; t < T; ++t) {
        const W* row = weight + tokens[t] * H;
        float* out_row = out + static_cast<std::ptrdiff_t>(t) * H;
        detail::for_each_vector(c0, c1, [&](int c, auto count) {
            detail::store_n(out_row + c, detail::load_n(row + c, count), count);
        });
    }
}

// Rows r0..r1-1: out[r] = weight * (x[r] * rsqrt(mean(x[r]^2) + eps)). x, out: [T, H];
// weight: [H]. The variance is a float32 mean, as in transformers.
template <int H, typename W>
void rmsnorm_task(const float* x, const W* weight, float* out, float eps, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const std::ptrdiff_t offset = static_cast<std::ptrdiff_t>(r) * H;
        detail::rms_normalize_row<H>(x + offset, weight, out + offset, eps);
    }
}

// The activation a linear applies to its output columns after the bias.
enum class Activation { none, gelu };

// out[t, n] = act(sum_k x[t, k] * weight[n, k] + bias[n]) (+ residual[t, n]) for n in
// [c0, c1), t < T. x: [T, K]; weight: [N, K]; bias: [N] or null; residual, out: [T, N];
// residual may equal out. An activation and a residual never come together (the spec
// rejects it). Weight rows go in groups of 4 with one accumulator each, so for T == 1
// (decode) four weight streams are in flight at once and each x vector is loaded once
// per group. For T > 1 each weight vector is reused for up to 4 rows of x (2 with AVX2)
// while in registers. The activation runs as a vector pass over the finished tile.
template <int T, int K, int N, typename W, bool RESIDUAL, Activation ACT = Activation::none, typename B = W>
void linear_task(const float* x, const W* weight, const B* bias, const float* residual, float* out, int c0, int c1) {
    static_assert(!(RESIDUAL && ACT != Activation::none), "an activation with a residual is ambiguous");
    constexpr int kRows = detail::kLinearRows;
    int n = c0;
    for (; n + kRows <= c1; n += kRows) detail::linear_rows<T, K, N, kRows, W, B, RESIDUAL>(x, weight, bias, residual, out, n);
    for (; n < c1; ++n) detail::linear_rows<T, K, N, 1, W, B, RESIDUAL>(x, weight, bias, residual, out, n);
    if constexpr (ACT == Activation::gelu) {
        for (int t = 0; t < T; ++t) {
            float* row = out + static_cast<std::ptrdiff_t>(t) * N;
            detail::for_each_vector(c0, c1, [&](int c, auto count) {
                detail::store_n(row + c, detail::gelu(detail::load_n(row + c, count)), count);
            });
        }
    }
}

// In place on qkv ([T, ROW]): RMSNorm of every HD-wide head in columns [q0, q1) with
// q_weight and in columns [k0, k1) with k_weight (Qwen3's q_norm and k_norm). Both column
// ranges are whole heads.
template <int T, int ROW, int HD, typename W>
void qk_norm_task(float* qkv, const W* q_weight, const W* k_weight, float eps, int q0, int q1, int k0, int k1) {
    for (int t = 0; t < T; ++t) {
        float* row = qkv + static_cast<std::ptrdiff_t>(t) * ROW;
        for (int c = q0; c < q1; c += HD) detail::rms_normalize_row<HD>(row + c, q_weight, row + c, eps);
        for (int c = k0; c < k1; c += HD) detail::rms_normalize_row<HD>(row + c, k_weight, row + c, eps);
    }
}

// For each row t with 0 <= p = positions[t] < S: rotates the q heads in qkv[t, q0:q1) in
// place, writes the rotated k head qkv[t, k0:k0+HD) to k_cache[p, group] and copies the
// v head qkv[t, v0:v0+HD) to v_cache[p, group]. qkv's k and v columns stay unchanged.
// Other rows get qkv[t, q0:q1) = 0 and touch no cache slot. cos, sin: [S, HD];
// k_cache, v_cache: [S, NKV, HD].
// NOTE: the torch reference raises on p >= S; here such a row is treated like padding,
// so a bad position cannot write outside the cache.
template <int T, int ROW, int HD, int NKV, int S>
void rope_task(float* qkv, const int64_t* positions, const float* cos, const float* sin, float* k_cache,
               float* v_cache, int group, int q0, int q1, int k0, int v0) {
    for (int t = 0; t < T; ++t) {
        float* row = qkv + static_cast<std::ptrdiff_t>(t) * ROW;
        const int64_t p = positions[t];
        if (p < 0 || p >= S) {
            std::fill(row + q0, row + q1, 0.0f);
            continue;
        }
        const float* cos_row = cos + p * HD;
        const float* sin_row = sin + p * HD;
        for (int c = q0; c < q1; c += HD) detail::rotate_half<HD>(row + c, cos_row, sin_row, row + c);
        const std::ptrdiff_t slot = (p * NKV + group) * HD;
        detail::rotate_half<HD>(row + k0, cos_row, sin_row, k_cache + slot);
        std::memcpy(v_cache + slot, row + v0, sizeof(float) * HD);
    }
}

// For rows r0..r1-1 with 0 <= p = positions[r] < S: each q head h in columns [q0, q1) of
// qkv ([T, ROW]) attends over k_cache[0..p, group] and v_cache[0..p, group] ([S, NKV, HD]):
// out[r, head columns] = softmax(q_h . k * scale) @ v, with out: [T, OUT_COLS]. Other rows
// get out[r, q0:q1) = 0. Slots past p are never read (they may hold NaN).
// NOTE: as in rope_task, p >= S is treated like padding where the reference would raise.
template <int T, int ROW, int HD, int NKV, int S, int OUT_COLS>
void attention_task(const float* qkv, const int64_t* positions, const float* k_cache, const float* v_cache, float* out,
                    float scale, int group, int r0, int r1, int q0, int q1) {
    const int heads = (q1 - q0) / HD;
    for (int r = r0; r < r1; ++r) {
        float* out_row = out + static_cast<std::ptrdiff_t>(r) * OUT_COLS;
        const int64_t p = positions[r];
        if (p < 0 || p >= S) {
            std::fill(out_row + q0, out_row + q1, 0.0f);
            continue;
        }
        const float* q = qkv + static_cast<std::ptrdiff_t>(r) * ROW + q0;
        for (int h0 = 0; h0 < heads; h0 += detail::kHeadBlock) {
            detail::attend_heads<HD, static_cast<std::ptrdiff_t>(NKV) * HD>(q + h0 * HD, std::min(detail::kHeadBlock, heads - h0), k_cache + group * HD,
                                          v_cache + group * HD, static_cast<int>(p) + 1, scale,
                                          out_row + q0 + h0 * HD);
        }
    }
}

// qk_norm_task (with QK_NORM), rope_task and attention_task for KV group `group` and every
// row, one after the other: the decode step's fused attention. The q and k heads are
// normalized and q rotated in place in qkv, as the separate tasks do.
template <int T, int ROW, int HD, int NKV, int S, int OUT_COLS, bool QK_NORM, typename W>
void fused_attention_task(float* qkv, const int64_t* positions, const float* cos, const float* sin, const W* q_weight,
                          const W* k_weight, float eps, float* k_cache, float* v_cache, float* out, float scale, int group,
                          int q0, int q1, int k0, int v0) {
    if constexpr (QK_NORM) qk_norm_task<T, ROW, HD, W>(qkv, q_weight, k_weight, eps, q0, q1, k0, k0 + HD);
    rope_task<T, ROW, HD, NKV, S>(qkv, positions, cos, sin, k_cache, v_cache, group, q0, q1, k0, v0);
    attention_task<T, ROW, HD, NKV, S, OUT_COLS>(qkv, positions, k_cache, v_cache, out, scale, group, 0, T, q0, q1);
}

// Decode attention split over the KV cache: the task of KV group `group` and cache chunk
// `chunk` (slots [lo, hi), chunks of ceil(S / C)). For each row t with 0 <= p =
// positions[t] < S, the group's q heads and k head are normalized (with QK_NORM) and
// rotated in local buffers, qkv staying unchanged, and when lo <= p < hi the k and v
// heads go to slot p of the cache. Then each row attends over slots lo .. min(hi, p + 1) - 1
// and writes partials[t, chunk, h] = (softmax-weighted values, max score, sum of
// exp(score - max)) for its q heads h in [q0 / HD, q1 / HD); an empty range (and a
// padding row) writes zeros, max -inf and sum 0. partials: [T, C, NH, HD + 2].
template <int T, int ROW, int HD, int NKV, int S, int C, int NH, bool QK_NORM, typename W>
void split_attention_task(const float* qkv, const int64_t* positions, const float* cos, const float* sin,
                          const W* q_weight, const W* k_weight, float eps, float* k_cache, float* v_cache, float* partials,
                          float scale, int group, int chunk, int q0, int q1, int k0, int v0) {
    constexpr int kChunk = (S + C - 1) / C;
    constexpr std::ptrdiff_t kHeadStride = HD + 2;
    const int lo = std::min(chunk * kChunk, S), hi = std::min(lo + kChunk, S);
    const int heads = (q1 - q0) / HD;
    alignas(64) float q[NH * HD];
    alignas(64) float k[HD];
    alignas(64) float results[NH * HD];
    float maxima[NH], sums[NH];

    // Rotates row t's q heads into q (and its k head into k); false for a padding row.
    auto prepare = [&](int t) {
        const int64_t p = positions[t];
        if (p < 0 || p >= S) return false;
        const float* row = qkv + static_cast<std::ptrdiff_t>(t) * ROW;
        for (int h = 0; h < heads; ++h) {
            if constexpr (QK_NORM) {
                detail::rms_normalize_row<HD>(row + q0 + h * HD, q_weight, q + h * HD, eps);
            } else {
                std::memcpy(q + h * HD, row + q0 + h * HD, sizeof(float) * HD);
            }
            detail::rotate_half<HD>(q + h * HD, cos + p * HD, sin + p * HD, q + h * HD);
        }
        if constexpr (QK_NORM) {
            detail::rms_normalize_row<HD>(row + k0, k_weight, k, eps);
        } else {
            std::memcpy(k, row + k0, sizeof(float) * HD);
        }
        detail::rotate_half<HD>(k, cos + p * HD, sin + p * HD, k);
        return true;
    };

    // Every row's append first: a row attends to slots that later rows of the iteration append.
    for (int t = 0; t < T; ++t) {
        const int64_t p = positions[t];
        if (p < lo || p >= hi || !prepare(t)) continue;
        const std::ptrdiff_t slot = (p * NKV + group) * HD;
        std::memcpy(k_cache + slot, k, sizeof(float) * HD);
        std::memcpy(v_cache + slot, qkv + static_cast<std::ptrdiff_t>(t) * ROW + v0, sizeof(float) * HD);
    }
    for (int t = 0; t < T; ++t) {
        float* out = partials + (static_cast<std::ptrdiff_t>(t) * C + chunk) * NH * kHeadStride;
        const int h_first = q0 / HD;
        const int64_t p = positions[t];
        const int end = (p < 0 || p >= S) ? lo : std::min(hi, static_cast<int>(p) + 1);
        if (end <= lo || !prepare(t)) {
            for (int h = 0; h < heads; ++h) {
                float* partial = out + (h_first + h) * kHeadStride;
                std::fill_n(partial, HD, 0.0f);
                partial[HD] = -std::numeric_limits<float>::infinity();
                partial[HD + 1] = 0.0f;
            }
            continue;
        }
        for (int h0 = 0; h0 < heads; h0 += detail::kHeadBlock) {
            const int count = std::min(detail::kHeadBlock, heads - h0);
            detail::attend_heads<HD, static_cast<std::ptrdiff_t>(NKV) * HD>(
                q + h0 * HD, count, k_cache + (static_cast<std::ptrdiff_t>(lo) * NKV + group) * HD,
                v_cache + (static_cast<std::ptrdiff_t>(lo) * NKV + group) * HD, end - lo, scale, results + h0 * HD,
                maxima + h0, sums + h0);
        }
        for (int h = 0; h < heads; ++h) {
            float* partial = out + (h_first + h) * kHeadStride;
            std::memcpy(partial, results + h * HD, sizeof(float) * HD);
            partial[HD] = maxima[h];
            partial[HD + 1] = sums[h];
        }
    }
}

// Merges split_attention's partials of q heads [h0, h1) into out ([T, NH * HD]):
// out = sum_c w_c acc_c / sum_c w_c with w_c = l_c exp(m_c - max_c m_c); zeros when every
// chunk of a row is empty.
template <int T, int C, int NH, int HD>
void attention_combine_task(const float* partials, float* out, int h0, int h1) {
    constexpr std::ptrdiff_t kHeadStride = HD + 2;
    for (int t = 0; t < T; ++t) {
        for (int h = h0; h < h1; ++h) {
            const float* first = partials + (static_cast<std::ptrdiff_t>(t) * C * NH + h) * kHeadStride;
            constexpr std::ptrdiff_t kChunkStride = static_cast<std::ptrdiff_t>(NH) * kHeadStride;
            float top = -std::numeric_limits<float>::infinity();
            for (int c = 0; c < C; ++c) top = std::max(top, first[c * kChunkStride + HD]);
            float* out_row = out + (static_cast<std::ptrdiff_t>(t) * NH + h) * HD;
            std::fill_n(out_row, HD, 0.0f);
            if (top == -std::numeric_limits<float>::infinity()) continue;
            float norm = 0.0f;
            for (int c = 0; c < C; ++c) {
                const float* partial = first + c * kChunkStride;
                if (partial[HD] == -std::numeric_limits<float>::infinity()) continue;
                const float weight = partial[HD + 1] * std::exp(partial[HD] - top);
                norm += weight;
                const detail::Vec w = simd::broadcast(weight);
                detail::for_each_vector(0, HD, [&](int i, auto n) {
                    detail::store_n(out_row + i, simd::fmadd(w, detail::load_n(partial + i, n), detail::load_n(out_row + i, n)), n);
                });
            }
            const detail::Vec total = simd::broadcast(norm);
            detail::for_each_vector(0, HD, [&](int i, auto n) {
                detail::store_n(out_row + i, detail::load_n(out_row + i, n) / total, n);
            });
        }
    }
}

// out[t, c] = silu(gate_up[t, c]) * gate_up[t, I + c] for c in [c0, c1), t < T, with
// silu(g) = g / (1 + exp(-g)), the formula torch's CPU silu uses. gate_up: [T, 2I];
// out: [T, I]. On the vector paths exp is simd::exp (max relative error 7.6e-8), so the
// result differs from torch's by rounding only.
template <int T, int I>
void silu_mul_task(const float* gate_up, float* out, int c0, int c1) {
    const detail::Vec one = simd::broadcast(1.0f);
    for (int t = 0; t < T; ++t) {
        const float* gate = gate_up + static_cast<std::ptrdiff_t>(t) * 2 * I;
        const float* up = gate + I;
        float* out_row = out + static_cast<std::ptrdiff_t>(t) * I;
        detail::for_each_vector(c0, c1, [&](int c, auto count) {
            const detail::Vec g = detail::load_n(gate + c, count);
            const detail::Vec silu = g / (one + simd::exp(simd::zero() - g));
            detail::store_n(out_row + c, silu * detail::load_n(up + c, count), count);
        });
    }
}

// values[t, part], indices[t, part] = max and lowest argmax of
// logits[t, part*CHUNK : min((part+1)*CHUNK, V)]. logits: [T, V]; values, indices: [T, P].
// A NaN counts as the max, as in torch.argmax.
template <int T, int V, int P, int CHUNK>
void argmax_partial_task(const float* logits, float* values, int64_t* indices, int part) {
    static_assert(P == (V + CHUNK - 1) / CHUNK, "P must be the number of CHUNK-wide parts of V");
    // Lane indices are tracked as floats, exact below 2^24.
    static_assert(CHUNK <= (1 << 24), "argmax chunks are limited to 2^24 columns");
    const int begin = part * CHUNK;
    const int count = std::min(CHUNK, V - begin);
    for (int t = 0; t < T; ++t) {
        float best;
        int best_index;
        detail::argmax_range(logits + static_cast<std::ptrdiff_t>(t) * V + begin, count, best, best_index);
        values[t * P + part] = best;
        indices[t * P + part] = begin + best_index;
    }
}

// out[t] = indices[t, j] for the first part j with the largest values[t, j] (NaN counts
// as largest). values, indices: [T, P]; out: [T].
template <int T, int P>
void argmax_reduce_task(const float* values, const int64_t* indices, int64_t* out) {
    for (int t = 0; t < T; ++t) {
        float best = values[t * P];
        int best_part = 0;
        detail::argmax_scalar(values + t * P, 1, P, best, best_part);
        out[t] = indices[t * P + best_part];
    }
}

// ---------------------------------------------------------------------------------
// Linear over many rows, on weights packed into panels
// ---------------------------------------------------------------------------------
//
// With many rows of x (an encoder batch), the dot-product kernel above spends much of its
// time on horizontal sums. The panel kernel instead computes outer products: the weight
// is packed once, at load time, into panels of kPanel output columns stored K-major
// (element [p][k][j] is weight[48p + j][k], zero past N), so each step loads a few
// weight vectors and multiplies them by one broadcast x element per row, accumulating
// whole vectors of output columns. kPanelRows rows of x x kPanelVectors vectors of
// columns are in registers: 8 x 3 = 24 of the 32 zmm registers with AVX-512, 4 x 2 = 8 of
// the 16 ymm with AVX2. A task loops over its panels, over the vector groups of each
// panel, then over all row blocks, so a panel's K x group slice stays in L2 while x
// streams through.
inline constexpr int kPanel = 48;
#if defined(MPK_SIMD_AVX512)
inline constexpr int kPanelRows = 8;
inline constexpr int kPanelVectors = 3;
#elif defined(MPK_SIMD_AVX2)
inline constexpr int kPanelRows = 4;
inline constexpr int kPanelVectors = 2;
#else
inline constexpr int kPanelRows = 4;
inline constexpr int kPanelVectors = 4;
#endif
inline constexpr int kPanelGroup = kPanelVectors * detail::kWidth;
static_assert(kPanel % kPanelGroup == 0, "a panel is a whole number of vector groups");

namespace detail {

// acc[m][v] = sum_k x[m, k] * panel[k][v * kWidth + lane] for ROWS rows of x (K apart)
// and one vector group of a panel (kPanel apart per k).
template <int K, int ROWS, typename W>
inline void panel_block(const float* x, const W* panel, Vec (&acc)[ROWS][kPanelVectors]) {
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; ++m) {
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVectors; ++v) acc[m][v] = simd::zero();
    }
    for (int k = 0; k < K; ++k) {
        Vec w[kPanelVectors];
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVectors; ++v) w[v] = simd::load(panel + static_cast<std::ptrdiff_t>(k) * kPanel + v * kWidth);
#pragma GCC unroll 8
        for (int m = 0; m < ROWS; ++m) {
            const Vec xv = simd::broadcast(x[static_cast<std::ptrdiff_t>(m) * K + k]);
#pragma GCC unroll 4
            for (int v = 0; v < kPanelVectors; ++v) acc[m][v] = simd::fmadd(xv, w[v], acc[m][v]);
        }
    }
}

// Stores acc for rows t0.. and columns n0 + v * kWidth + lane, keeping to [c0, c1):
// out = acc + bias (+ residual). Vectors wholly inside the range go through vector loads
// and stores; the one or two that straddle an end, element by element.
template <int N, int ROWS, typename B, bool RESIDUAL>
inline void panel_store(const Vec (&acc)[ROWS][kPanelVectors], const B* bias, const float* residual, float* out, int t0,
                        int n0, int c0, int c1) {
    for (int v = 0; v < kPanelVectors; ++v) {
        const int n = n0 + v * kWidth;
        if (n >= c1 || n + kWidth <= c0) continue;
        if (n >= c0 && n + kWidth <= c1) {
            const Vec b = bias != nullptr ? load_n(bias + n, Full{}) : simd::zero();
            for (int m = 0; m < ROWS; ++m) {
                const std::ptrdiff_t at = static_cast<std::ptrdiff_t>(t0 + m) * N + n;
                Vec value = acc[m][v] + b;
                if constexpr (RESIDUAL) value = value + simd::load(residual + at);
                simd::store(out + at, value);
            }
            continue;
        }
        for (int m = 0; m < ROWS; ++m) {
            alignas(64) float lanes[kWidth];
            simd::store(lanes, acc[m][v]);
            for (int lane = 0; lane < kWidth; ++lane) {
                const int c = n + lane;
                if (c < c0 || c >= c1) continue;
                const std::ptrdiff_t at = static_cast<std::ptrdiff_t>(t0 + m) * N + c;
                float value = lanes[lane];
                if (bias != nullptr) value += to_float(bias[c]);
                if constexpr (RESIDUAL) value += residual[at];
                out[at] = value;
            }
        }
    }
}

}  // namespace detail

// The linear_task contract (out = act(x @ weight.T + bias) (+ residual) over columns
// [c0, c1)), with the weight packed into panels as described above: packed is
// [ceil(N / kPanel), K, kPanel]. Each output element is written once, after its whole
// sum, so residual may equal out.
template <int T, int K, int N, typename W, bool RESIDUAL, Activation ACT = Activation::none, typename B = W>
void linear_panels_task(const float* x, const W* packed, const B* bias, const float* residual, float* out, int c0, int c1) {
    static_assert(!(RESIDUAL && ACT != Activation::none), "an activation with a residual is ambiguous");
    constexpr int kRows = T < kPanelRows ? T : kPanelRows;
    for (int p = c0 / kPanel; p * kPanel < c1; ++p) {
        const W* panel = packed + static_cast<std::ptrdiff_t>(p) * K * kPanel;
        for (int g = 0; g < kPanel; g += kPanelGroup) {
            const int n0 = p * kPanel + g;
            if (n0 >= c1 || n0 + kPanelGroup <= c0) continue;
            int t0 = 0;
            for (; t0 + kRows <= T; t0 += kRows) {
                detail::Vec acc[kRows][kPanelVectors];
                detail::panel_block<K, kRows>(x + static_cast<std::ptrdiff_t>(t0) * K, panel + g, acc);
                detail::panel_store<N, kRows, B, RESIDUAL>(acc, bias, residual, out, t0, n0, c0, c1);
            }
            if constexpr (T % kRows != 0) {
                detail::Vec acc[T % kRows][kPanelVectors];
                detail::panel_block<K, T % kRows>(x + static_cast<std::ptrdiff_t>(t0) * K, panel + g, acc);
                detail::panel_store<N, T % kRows, B, RESIDUAL>(acc, bias, residual, out, t0, n0, c0, c1);
            }
        }
    }
    if constexpr (ACT == Activation::gelu) {
        for (int t = 0; t < T; ++t) {
            float* row = out + static_cast<std::ptrdiff_t>(t) * N;
            detail::for_each_vector(c0, c1, [&](int c, auto count) {
                detail::store_n(row + c, detail::gelu(detail::load_n(row + c, count)), count);
            });
        }
    }
}

// Rows r0..r1-1: out[t] = (word[tokens[t]] + token_type[types[t]]) + position[positions[t]],
// BERT's input embedding, summed in the order of transformers' BertEmbeddings. Tables: [*, H].
// NOTE: ids are not range-checked here; the executors check them against the tables.
template <int H, typename W>
void embedding_sum_task(const int64_t* tokens, const int64_t* positions, const int64_t* types, const W* word,
                        const W* position, const W* token_type, float* out, int r0, int r1) {
    for (int t = r0; t < r1; ++t) {
        const W* a = word + tokens[t] * H;
        const W* b = position + positions[t] * H;
        const W* c = token_type + types[t] * H;
        float* row = out + static_cast<std::ptrdiff_t>(t) * H;
        detail::for_each_vector(0, H, [&](int i, auto count) {
            const detail::Vec typed = detail::load_n(a + i, count) + detail::load_n(c + i, count);
            detail::store_n(row + i, typed + detail::load_n(b + i, count), count);
        });
    }
}

// Rows r0..r1-1: out = (x - mean) / sqrt(var + eps) * weight + bias, with the biased
// variance computed from the centred values (two passes, as torch's layer_norm on the
// CPU). x, out: [T, H]; out may equal x, because each row is read before it is written.
template <int H, typename W>
void layernorm_task(const float* x, const W* weight, const W* bias, float* out, float eps, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const float* row = x + static_cast<std::ptrdiff_t>(r) * H;
        float* out_row = out + static_cast<std::ptrdiff_t>(r) * H;
        detail::Vec sum = simd::zero();
        detail::for_each_vector(0, H, [&](int i, auto count) { sum = sum + detail::load_n(row + i, count); });
        const detail::Vec mean = simd::broadcast(simd::reduce_add(sum) / static_cast<float>(H));
        detail::Vec squares = simd::zero();
        detail::for_each_vector(0, H, [&](int i, auto count) {
            // Masked loads give 0 past the tail, and 0 - mean would count; mask it again.
            detail::Vec centred = detail::load_n(row + i, count) - mean;
            if constexpr (!std::is_same_v<decltype(count), detail::Full>) {
                float lanes[detail::kWidth] = {};
                detail::store_n(lanes, centred, count);
                centred = simd::load(lanes);
            }
            squares = simd::fmadd(centred, centred, squares);
        });
        const float variance = simd::reduce_add(squares) / static_cast<float>(H);
        const detail::Vec scale = simd::broadcast(1.0f / std::sqrt(variance + eps));
        detail::for_each_vector(0, H, [&](int i, auto count) {
            const detail::Vec normalized = (detail::load_n(row + i, count) - mean) * scale;
            detail::store_n(out_row + i, simd::fmadd(normalized, detail::load_n(weight + i, count), detail::load_n(bias + i, count)), count);
        });
    }
}

// Bidirectional attention within packed sentences. For rows r in [r0, r1) with
// s = segments[r] >= 0, each q head in columns [q0, q1) of qkv ([ROWS, ROW]) attends over
// the k head at column k0 and the v head at column v0 of rows spans[s][0] ..
// spans[s][1] - 1; out[r, head columns] = softmax(q . k * scale) @ v, out: [ROWS, OUT_COLS].
// Rows with a negative segment, or an empty span, get zeros. Consecutive rows of one
// sentence go through attend_query_block together, up to one vector of rows at a time.
template <int ROWS, int ROW, int HD, int OUT_COLS>
void segment_attention_task(const float* qkv, const int64_t* segments, const int64_t* spans, float* out, float scale,
                            int r0, int r1, int q0, int q1, int k0, int v0) {
    constexpr int kBlock = detail::kWidth;
    for (int h = q0; h < q1; h += HD) {
        int r = r0;
        while (r < r1) {
            const int64_t s = segments[r];
            const int64_t start = s < 0 ? 0 : spans[2 * s];
            const int64_t end = s < 0 ? 0 : spans[2 * s + 1];
            int count = 1;
            while (count < kBlock && r + count < r1 && segments[r + count] == s) ++count;
            float* out_rows = out + static_cast<std::ptrdiff_t>(r) * OUT_COLS + h;
            if (end <= start) {
                for (int i = 0; i < count; ++i) std::fill_n(out_rows + static_cast<std::ptrdiff_t>(i) * OUT_COLS, HD, 0.0f);
            } else {
                const float* base = qkv + start * ROW;
                detail::attend_query_block<HD, ROW>(qkv + static_cast<std::ptrdiff_t>(r) * ROW + h, ROW, count, base + k0,
                                                    base + v0, static_cast<int>(end - start), scale, out_rows, OUT_COLS);
            }
            r += count;
        }
    }
}

// Sentences b0..b1-1: out[b] = mean of x rows spans[b][0] .. spans[b][1] - 1 (zeros for an
// empty span), then, with NORMALIZE, out[b] / max(||out[b]||, 1e-12) as torch's
// F.normalize. x: [T, H]; out: [B, H]. The sum runs in row order, as torch's sum over dim 0.
template <int H, bool NORMALIZE>
void mean_pool_task(const float* x, const int64_t* spans, float* out, int b0, int b1) {
    for (int b = b0; b < b1; ++b) {
        const int64_t start = spans[2 * b], end = spans[2 * b + 1];
        float* out_row = out + static_cast<std::ptrdiff_t>(b) * H;
        std::fill_n(out_row, H, 0.0f);
        for (int64_t r = start; r < end; ++r) {
            const float* row = x + r * H;
            detail::for_each_vector(0, H, [&](int i, auto count) {
                detail::store_n(out_row + i, detail::load_n(out_row + i, count) + detail::load_n(row + i, count), count);
            });
        }
        if (end <= start) continue;
        const detail::Vec count = simd::broadcast(static_cast<float>(end - start));
        detail::Vec squares = simd::zero();
        detail::for_each_vector(0, H, [&](int i, auto n) {
            const detail::Vec mean = detail::load_n(out_row + i, n) / count;
            detail::store_n(out_row + i, mean, n);
            squares = simd::fmadd(mean, mean, squares);
        });
        if constexpr (NORMALIZE) {
            const detail::Vec norm = simd::broadcast(std::max(std::sqrt(simd::reduce_add(squares)), 1e-12f));
            detail::for_each_vector(0, H, [&](int i, auto n) { detail::store_n(out_row + i, detail::load_n(out_row + i, n) / norm, n); });
        }
    }
}

}  // namespace mpk::cpu
