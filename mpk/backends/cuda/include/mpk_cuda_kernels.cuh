// CUDA task kernels of the megakernel: one __device__ function template per operator
// kind, each computing one task (one tile) of the operator as the `run` method of its
// spec in mpk/ops does with torch on bfloat16 tensors. They compute what the CPU kernels
// in mpk/backends/cpu/include/mpk_cpu_kernels.h compute, with bf16 activations.
//
// Execution model. A worker of the persistent kernel is one CTA of MPK_THREADS threads
// that runs one task at a time. Each task function must be called by every thread of
// the CTA, with `smem` pointing to the CTA's dynamic shared memory. Caller contract:
//   - All MPK_THREADS threads call the task with the same arguments, because the
//     kernels run __syncthreads() and warp shuffles in uniform control flow.
//   - `smem` is 16-byte aligned and has room for at least the bytes that the constant next
//     to the kernel states (kRmsNormSmemBytes, attention_smem_bytes<HD>(), ...). Each
//     kernel that needs scratch static_asserts that it fits in MPK_SMEM_BYTES.
//   - The caller runs __syncthreads() after a task returns, before it signals the
//     task's event and before the next task reuses `smem`. Kernels end without a
//     barrier, so other threads may still be storing results or reading `smem`.
//   - linear_prefetch may issue cp.async copies into `smem` before the task's event
//     fires. The linear_task<..., STAGED = true> that follows on the same CTA waits for
//     them, and no other task may touch `smem` in between (linear_prefetch states the
//     full contract).
//   - Kernels are written for one CTA per SM (the register budget is up to 255 per
//     thread at 256 threads), so the __global__ function should declare
//     __launch_bounds__(MPK_THREADS, 1).
//
// Memory. Activations, logits and the KV cache are written by other CTAs while the
// kernel runs, so they are read with plain coherent loads, never ld.global.nc: after
// the runtime's acquire load of the task's event and a bar.sync, plain loads see those
// writes. Weights and the rope tables must stay constant for the kernel's lifetime
// (written before launch), which is what makes the read-only path (__ldg) safe for them.
//
// Vector access. Rows are read and written in vectors of up to 16 bytes (8 bf16) only
// where the vector width divides the row length and the base pointers are aligned to
// the vector's size, checked at compile time and at run time. Otherwise the kernels
// fall back to narrower or scalar accesses, so no access is ever misaligned.
//
// Numerics. Sums accumulate in fp32. Results are rounded to bf16 where torch rounds
// them when it runs the operator on bf16 tensors (documented per kernel), so that
// elementwise kernels match torch bit for bit and reductions differ only in summation
// order. The kernels need IEEE float semantics (NaN propagation, correctly rounded
// division and sqrt), so they must not be compiled with --use_fast_math.
#pragma once

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#ifndef MPK_THREADS
#define MPK_THREADS 256
#endif
#ifndef MPK_SMEM_BYTES
#define MPK_SMEM_BYTES (96 * 1024)
#endif

#define MPK_CUDA_HD __host__ __device__ inline

namespace mpk::cuda {

inline constexpr int kThreads = MPK_THREADS;
inline constexpr int kWarpSize = 32;
inline constexpr int kWarps = kThreads / kWarpSize;
inline constexpr int kSmemBytes = MPK_SMEM_BYTES;
inline constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kThreads % kWarpSize == 0 && kThreads >= kWarpSize && kThreads <= 1024,
              "MPK_THREADS must be a multiple of 32 between 32 and 1024");

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------------------------
// Host-and-device helpers: bit-level bf16 conversions, the element math whose rounding
// points must match torch, and the index arithmetic that splits a tile over threads.
// tests/test_cuda_kernels.py runs them on the host.
// ---------------------------------------------------------------------------------
namespace detail {

MPK_CUDA_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
#endif
}

// bf16 bits of x rounded to nearest even (NaN stays NaN), as torch's .to(bfloat16).
MPK_CUDA_HD uint16_t bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// Widens bf16 bits to float, which is exact.
MPK_CUDA_HD float bf16_bits_to_float(uint32_t bits) { return float_from_bits(bits << 16); }

// x rounded to the nearest bf16 value, returned as float.
MPK_CUDA_HD float round_bf16(float x) { return bf16_bits_to_float(bf16_bits(x)); }

// Two bf16 packed in one 32-bit word, element 0 in the low half (little-endian memory).
MPK_CUDA_HD float low_bf16(uint32_t word) { return float_from_bits(word << 16); }
MPK_CUDA_HD float high_bf16(uint32_t word) { return float_from_bits(word & 0xffff0000u); }
MPK_CUDA_HD uint32_t pack_bf16x2(float low, float high) {
    return static_cast<uint32_t>(bf16_bits(low)) | (static_cast<uint32_t>(bf16_bits(high)) << 16);
}

MPK_CUDA_HD bool is_nan(float x) { return x != x; }

// max(a, b) that returns NaN when either is NaN. fmaxf drops NaN operands, which would
// let a NaN score vanish from the softmax instead of poisoning it as in torch.
MPK_CUDA_HD float nan_max(float a, float b) { return (b > a || is_nan(b)) ? b : a; }

MPK_CUDA_HD float to_float(bf16 x) { return __bfloat162float(x); }
MPK_CUDA_HD float to_float(float x) { return x; }

// Stores an fp32 value as float, or as bf16 rounded to nearest even.
MPK_CUDA_HD void store_element(bf16* p, float value) { *p = __float2bfloat16_rn(value); }
MPK_CUDA_HD void store_element(float* p, float value) { *p = value; }

// RMSNorm's last step for one element, in the order of transformers' Qwen3RMSNorm and
// LlamaRMSNorm forward (read in transformers 5.25) on a bf16 model:
//     hidden = x.float() * rsqrt(variance + eps)     -> fp32
//     return weight * hidden.to(bfloat16)             -> bf16 * bf16, rounded to bf16
// so the normalized value is rounded once before the weight multiply and once after.
MPK_CUDA_HD float rms_normalize_element(float x, float inverse_rms, float weight) {
    return round_bf16(weight * round_bf16(x * inverse_rms));
}

// 1 / sqrt(mean + eps) with correctly rounded sqrt and division, as torch.rsqrt on the
// CPU computes it. CUDA's rsqrtf is approximate (2 ulp), so it is not used.
MPK_CUDA_HD float inverse_rms(float sum_of_squares, int count, float eps) {
    return 1.0f / sqrtf(sum_of_squares / static_cast<float>(count) + eps);
}

// silu(gate) * up as torch computes F.silu(gate) * up on bf16 tensors: silu in fp32 as
// g / (1 + exp(-g)) (torch's CPU and CUDA formula), rounded to bf16, then the product
// rounded to bf16. expf may differ from the host libm by an ulp of fp32, which the
// rounding to bf16 almost always absorbs.
MPK_CUDA_HD float silu_mul_element(float gate, float up) {
    const float silu = round_bf16(gate / (1.0f + expf(-gate)));
    return round_bf16(silu * up);
}

// One rotate-half pair of rotary embedding, as torch computes x * cos + rotate_half(x)
// * sin on bf16 tensors: cos and sin are cast to bf16 first (the spec's run method and
// transformers' rotary embedding both do), and each product and the sum round to bf16.
// A product of two bf16 values is exact in fp32, so each step rounds once, like torch.
MPK_CUDA_HD void rotate_pair(float low, float high, float cos_low, float cos_high, float sin_low, float sin_high,
                             float& out_low, float& out_high) {
    const float c_low = round_bf16(cos_low), c_high = round_bf16(cos_high);
    const float s_low = round_bf16(sin_low), s_high = round_bf16(sin_high);
    out_low = round_bf16(round_bf16(low * c_low) + round_bf16(-high * s_low));
    out_high = round_bf16(round_bf16(high * c_high) + round_bf16(low * s_high));
}

// Linear's epilogue before the store. torch computes x @ w.T on bf16 tensors with fp32
// accumulation and one rounding to bf16, then adds a residual of the output's type in
// fp32. Storing rounds the sum to bf16 again when the output is bf16, as torch's bf16
// addition does, and keeps it when the output is float (type promotion). A float output
// without a residual still gets the bf16-rounded product, widened, because that is what
// the spec's run method stores into a float logits buffer.
template <bool RESIDUAL>
MPK_CUDA_HD float linear_output(float dot, float residual) {
    float value = round_bf16(dot);
    if constexpr (RESIDUAL) value += residual;
    return value;
}

// Online softmax over one stream of scores: running max m and running sum l, where
// l = sum(exp(s_i - m)). After step(), the caller rescales its output accumulator:
// acc = acc * correction + weight * value. A NaN score makes m, l and acc NaN, as it
// makes torch.softmax NaN. Before the first step m = -inf and l = 0. The caller
// skips slots past the row's length rather than passing -inf for them.
MPK_CUDA_HD void online_softmax_step(float& m, float& l, float score, float& correction, float& weight) {
    const float new_max = nan_max(m, score);
    if (new_max == -INFINITY) {
        // Every score so far is -inf: torch would give NaN for an all -inf row, but
        // later finite scores must still win, so keep the state empty.
        correction = 1.0f;
        weight = 0.0f;
        return;
    }
    correction = expf(m - new_max);  // exp(-inf) = 0 on the first finite score
    weight = expf(score - new_max);
    l = l * correction + weight;
    m = new_max;
}

// Merges softmax state (m2, l2) into (m, l). The caller combines accumulators as
// acc = acc * scale_self + acc2 * scale_other. An empty state (m = -inf) gets scale 0.
MPK_CUDA_HD void merge_softmax(float& m, float& l, float m2, float l2, float& scale_self, float& scale_other) {
    const float new_max = nan_max(m, m2);
    if (new_max == -INFINITY) {
        scale_self = 1.0f;
        scale_other = 0.0f;
        return;
    }
    scale_self = m == -INFINITY ? 0.0f : expf(m - new_max);
    scale_other = m2 == -INFINITY ? 0.0f : expf(m2 - new_max);
    l = l * scale_self + l2 * scale_other;
    m = new_max;
}

// True when (a, index_a) ranks before (b, index_b) in torch.argmax's order: NaN above
// every number (the lowest-index NaN first), then larger values, then lower indices
// among equal values. It is a strict total order over distinct indices, so a reduction
// tree of any shape returns the same winner as a sequential scan.
MPK_CUDA_HD bool argmax_precedes(float a, int index_a, float b, int index_b) {
    const bool a_nan = is_nan(a), b_nan = is_nan(b);
    if (a_nan || b_nan) return a_nan && (!b_nan || index_a < index_b);
    if (a != b) return a > b;
    return index_a < index_b;
}

// A contiguous interval [begin, end).
struct Range {
    int begin;
    int end;
};

// Split of a column range [begin, end) for WIDTH-element vector access: [begin,
// head_end) and [body_end, end) are scalar, [head_end, body_end) is whole vectors whose
// first element sits at an offset (base + column) that is a multiple of `width`.
struct VectorSpan {
    int head_end;
    int body_end;
};

MPK_CUDA_HD VectorSpan vector_span(int64_t base, int begin, int end, int width) {
    const int misalignment = static_cast<int>((base + begin) % width);
    int head_end = begin + (misalignment == 0 ? 0 : width - misalignment);
    if (head_end > end) head_end = end;
    return {head_end, head_end + (end - head_end) / width * width};
}

// Column of the e-th scalar element of a vector span (the head, then the tail), or -1
// when e is past both. The kernels give scalar element e to thread e.
MPK_CUDA_HD int span_scalar_column(VectorSpan span, int begin, int end, int e) {
    const int head = span.head_end - begin;
    if (e < head) return begin + e;
    e -= head;
    return e < end - span.body_end ? span.body_end + e : -1;
}

// Register blocking of linear_rows. A warp computes kRows output rows for kTokens rows
// of x at a time: its lanes split K into vectors, lane l taking vectors l, l + 32, ...,
// and a butterfly of shuffles sums the lanes. Decode (T = 1) takes 4 weight rows per
// warp so that each lane keeps 4 * kLinearBatch 16-byte loads in flight; prefill takes
// 2 rows and reuses each weight vector for up to 4 tokens while it is in registers.
template <int T>
struct LinearShape {
    static constexpr int kRows = T == 1 ? 4 : 2;
    static constexpr int kTokens = T < 4 ? T : 4;
};

// K steps loaded back to back before any is used, so that kLinearBatch * kRows vector
// loads per lane can be in flight at once (up to 64 KB per SM at 256 threads for
// decode).
inline constexpr int kLinearBatch = 4;

// Output rows [first, last) of row group `group` of a column tile [c0, c1).
MPK_CUDA_HD Range linear_group_rows(int c0, int c1, int rows_per_group, int group) {
    const int first = c0 + group * rows_per_group;
    const int last = first + rows_per_group;
    return {first, last < c1 ? last : c1};
}

MPK_CUDA_HD int linear_group_count(int c0, int c1, int rows_per_group) {
    return (c1 - c0 + rows_per_group - 1) / rows_per_group;
}

// First element of the vector a lane reads at one K step; the lane skips it when it is
// at or past K.
MPK_CUDA_HD int linear_k_offset(int step, int lane, int width) { return (step * kWarpSize + lane) * width; }

MPK_CUDA_HD constexpr int linear_k_steps(int k, int width) {
    return (k + kWarpSize * width - 1) / (kWarpSize * width);
}

// Widest vector (8, 4, 2 or 1 elements) that divides a row of `length` elements.
MPK_CUDA_HD constexpr int vector_width_for(int length) {
    int width = 8;
    while (length % width != 0) width /= 2;
    return width;
}

// Shared-memory weight pipeline of linear_task (sm_80 and newer). A task's weight tile,
// rows [c0, c1) by K columns, streams through kStages stage buffers as a sequence of
// chunks. A chunk is kChunkRows rows by one slice of K, copied with 16-byte cp.async.
// Chunks run over the slices of a row block first, then over row blocks, then over token
// passes, so that a warp keeps its row group's accumulators in registers across the
// slices of a block. While the CTA computes on one chunk, up to kStages - 1 later chunks
// are in flight.
// NOTE: the pipeline is checked by compiling it and by emulating its index arithmetic on
// the host (tests/test_cuda_kernels.py). No GPU has run it, so its speed is unmeasured.

// bf16 elements per 16-byte copy.
inline constexpr int kCopyElements = 8;
// Target size of one stage buffer, the max stage count, and the shared memory that the
// pipeline may use: 64 KiB of the default 96 KiB, and never more than three quarters.
inline constexpr int kLinearStageTargetBytes = 16 * 1024;
inline constexpr int kLinearMaxStages = 4;
inline constexpr int kLinearPipelineBytes = 64 * 1024 < kSmemBytes / 4 * 3 ? 64 * 1024 : kSmemBytes / 4 * 3;
// Tokens whose accumulators a warp keeps in registers through one pass over the tile.
// A prefill chunk of more tokens streams the tile once per 16 tokens.
inline constexpr int kLinearMaxPassTokens = 16;

// Rows [row_begin, row_end) and columns [k_begin, k_end) of the weight that one chunk
// holds, computed for the x rows of token pass `pass`.
struct LinearChunk {
    int pass;
    int row_begin;
    int row_end;
    int k_begin;
    int k_end;
};

// One 16-byte copy: an element offset into the weight and a byte offset into the stage
// buffer.
struct LinearCopy {
    int64_t source;
    int destination;
};

// Chunk geometry, stage sizes and schedule of the pipeline for T tokens and K columns.
// Each warp computes one row group (kRows rows) of a chunk per round, its lanes taking
// the 8-element vectors of a slice as in linear_rows, so one warp step covers 256
// columns.
template <int T, int K>
struct LinearStaging {
    static constexpr int kRows = LinearShape<T>::kRows;
    static constexpr int kBlockRows = kWarps * kRows;
    static constexpr int kStepColumns = kWarpSize * kCopyElements;
    static constexpr int kTargetElements = kLinearStageTargetBytes / 2;
    static constexpr int kMaxSliceSteps =
        kTargetElements / (kBlockRows * kStepColumns) > 1 ? kTargetElements / (kBlockRows * kStepColumns) : 1;
    static constexpr int kSlices = (K + kMaxSliceSteps * kStepColumns - 1) / (kMaxSliceSteps * kStepColumns);
    // When a whole row fits in one slice, the slice is exactly K wide and a chunk takes
    // several row groups per warp, so that short rows still fill a stage.
    static constexpr int kSliceColumns = kSlices == 1 ? K : kMaxSliceSteps * kStepColumns;
    static constexpr int kSliceSteps = (kSliceColumns + kStepColumns - 1) / kStepColumns;
    static constexpr int kGroupsPerWarp =
        kSlices == 1 && kTargetElements / (kBlockRows * K) > 1 ? kTargetElements / (kBlockRows * K) : 1;
    static constexpr int kChunkRows = kBlockRows * kGroupsPerWarp;
    static constexpr int kStageBytes = kChunkRows * kSliceColumns * 2;
    static constexpr int kStages =
        kLinearPipelineBytes / kStageBytes < kLinearMaxStages ? kLinearPipelineBytes / kStageBytes : kLinearMaxStages;
    // The pipeline needs K % 8 == 0, so that rows split into whole 16-byte copies, and at
    // least two stages. At 1024 threads a decode stage of 128 rows does not fit twice, so
    // linear_task keeps to registers there.
    static constexpr bool kEnabled = K % kCopyElements == 0 && kStages >= 2;
    static constexpr int kPipelineBytes = kEnabled ? kStages * kStageBytes : 0;
    // Chunks issued before the loop: by linear_prefetch before the task's event fires,
    // or by linear_task itself.
    static constexpr int kPrefetchedChunks = kEnabled ? kStages - 1 : 0;
    // Commit groups that the loop leaves pending when it waits for a chunk: the chunks
    // issued after it.
    static constexpr int kPendingGroups = kEnabled ? kStages - 2 : 0;
    static constexpr int kPassTokens = T < kLinearMaxPassTokens ? T : kLinearMaxPassTokens;
    static constexpr int kPasses = (T + kPassTokens - 1) / kPassTokens;

    static MPK_CUDA_HD int row_blocks(int c0, int c1) { return (c1 - c0 + kChunkRows - 1) / kChunkRows; }

    static MPK_CUDA_HD int chunk_count(int c0, int c1) { return kPasses * row_blocks(c0, c1) * kSlices; }

    static MPK_CUDA_HD LinearChunk chunk(int index, int c0, int c1) {
        const int blocks = row_blocks(c0, c1);
        const int slice = index % kSlices;
        const int block = index / kSlices % blocks;
        const int row_begin = c0 + block * kChunkRows;
        const int k_begin = slice * kSliceColumns;
        return {index / kSlices / blocks, row_begin, row_begin + kChunkRows < c1 ? row_begin + kChunkRows : c1, k_begin,
                k_begin + kSliceColumns < K ? k_begin + kSliceColumns : K};
    }

    // Chunk i lives in stage buffer i % kStages.
    static MPK_CUDA_HD int stage_of(int index) { return index % kStages; }

    // Byte offset in a stage buffer of a chunk's element (row, column), both relative to
    // the chunk. Rows sit kSliceColumns elements apart.
    static MPK_CUDA_HD int stage_offset(int row, int column) { return (row * kSliceColumns + column) * 2; }

    static MPK_CUDA_HD int copy_count(const LinearChunk& part) {
        return (part.row_end - part.row_begin) * ((part.k_end - part.k_begin) / kCopyElements);
    }

    // Copy `index` of a chunk, row-major over its rows and 16-byte columns. Thread t
    // issues copies t, t + kThreads, ...
    static MPK_CUDA_HD LinearCopy copy(const LinearChunk& part, int index) {
        const int per_row = (part.k_end - part.k_begin) / kCopyElements;
        const int row = index / per_row, column = index % per_row * kCopyElements;
        return {static_cast<int64_t>(part.row_begin + row) * K + part.k_begin + column, stage_offset(row, column)};
    }

    // First chunk that linear_task issues before its loop. With `staged`, linear_prefetch
    // has issued chunks [0, kPrefetchedChunks) already.
    static MPK_CUDA_HD int task_first_chunk(bool staged) { return staged ? kPrefetchedChunks : 0; }

    // Chunk issued in loop iteration i, once chunk i has landed. Its stage buffer held
    // chunk i - 1, which every thread finished reading before the iteration's barrier.
    static MPK_CUDA_HD int chunk_issued_in(int iteration) { return iteration + kPrefetchedChunks; }

    // First row, relative to the chunk, of the row group that `warp` computes in `round`.
    static MPK_CUDA_HD int group_row(int warp, int round) { return (round * kWarps + warp) * kRows; }
};

MPK_CUDA_HD constexpr int lanes_per_slot_for(int vectors) {
    int lanes = 1;
    while (lanes < vectors && lanes < kWarpSize) lanes *= 2;
    return lanes;
}

// Attention layout for head_dim HD: each cache row is read in vectors of VEC bf16 by
// a slot group of kLanesPerSlot lanes (the smallest power of two >= the row's vector
// count, at most 32), so a warp reads kSlotsPerWarp cache slots per step and a lane
// keeps kPerLane elements of each row. Lanes past the row's vectors (HD = 96: lanes
// 12..15 of each 16) hold zeros.
template <int HD, int VEC>
struct AttentionLayout {
    static constexpr int kVec = VEC;
    static constexpr int kVectors = HD / VEC;
    static constexpr int kLanesPerSlot = lanes_per_slot_for(kVectors);
    static constexpr int kVectorsPerLane = (kVectors + kLanesPerSlot - 1) / kLanesPerSlot;
    static constexpr int kPerLane = kVectorsPerLane * VEC;
    static constexpr int kSlotsPerWarp = kWarpSize / kLanesPerSlot;
    static constexpr int kSlotGroups = kWarps * kSlotsPerWarp;
    static_assert(HD % VEC == 0, "the head row must be whole vectors");
};

// Vector i (0 <= i < kVectorsPerLane) of a lane at position `slot_lane` in its slot
// group covers head elements [vector * VEC, vector * VEC + VEC) of every cache row;
// -1 when that lane has no i-th vector.
MPK_CUDA_HD int attention_lane_vector(int slot_lane, int i, int lanes_per_slot, int vectors) {
    const int vector = slot_lane + i * lanes_per_slot;
    return vector < vectors ? vector : -1;
}

// Cache slot that slot group `group` reads at step `step`, or -1 when it is past the
// row's length. Consecutive groups read consecutive slots.
MPK_CUDA_HD int attention_slot(int step, int group, int slot_groups, int length) {
    const int slot = step * slot_groups + group;
    return slot < length ? slot : -1;
}

// Kind of one work item of rope_task's flattened per-row loop.
enum class RopeItem : int { kQPair, kKPair, kVElement };

struct RopeWork {
    RopeItem kind;
    int column;  // q and k pairs: the low element's column in the head; v: the element
    int head;    // q pairs: head index within the group's q columns; otherwise 0
};

// A row's rope work is q_pairs rotate-half pairs of q (HD/2 per head), HD/2 pairs of
// the k head, then HD copies of the v head.
MPK_CUDA_HD RopeWork rope_work(int item, int q_pairs, int head_dim) {
    const int half = head_dim / 2;
    if (item < q_pairs) return {RopeItem::kQPair, item % half, item / half};
    item -= q_pairs;
    if (item < half) return {RopeItem::kKPair, item, 0};
    return {RopeItem::kVElement, item - half, 0};
}

// ---------------------------------------------------------------------------------
// Device-only helpers: vector loads and stores, and warp and CTA reductions.
// ---------------------------------------------------------------------------------

template <int VEC>
struct PackedBf16;
template <>
struct PackedBf16<8> {
    using type = uint4;
};
template <>
struct PackedBf16<4> {
    using type = uint2;
};
template <>
struct PackedBf16<2> {
    using type = unsigned int;
};
template <>
struct PackedBf16<1> {
    using type = unsigned short;
};

// Widens VEC packed bf16 to floats, element 0 first.
__device__ inline void unpack(uint4 v, float* out) {
    out[0] = low_bf16(v.x), out[1] = high_bf16(v.x), out[2] = low_bf16(v.y), out[3] = high_bf16(v.y);
    out[4] = low_bf16(v.z), out[5] = high_bf16(v.z), out[6] = low_bf16(v.w), out[7] = high_bf16(v.w);
}
__device__ inline void unpack(uint2 v, float* out) {
    out[0] = low_bf16(v.x), out[1] = high_bf16(v.x), out[2] = low_bf16(v.y), out[3] = high_bf16(v.y);
}
__device__ inline void unpack(unsigned int v, float* out) { out[0] = low_bf16(v), out[1] = high_bf16(v); }
__device__ inline void unpack(unsigned short v, float* out) { out[0] = bf16_bits_to_float(v); }

// Raw VEC-element load. Activations use the coherent path; READONLY selects __ldg,
// allowed only for data constant for the kernel's lifetime (weights, rope tables).
template <int VEC, bool READONLY>
__device__ inline typename PackedBf16<VEC>::type load_packed(const bf16* p) {
    using Packed = typename PackedBf16<VEC>::type;
    const Packed* at = reinterpret_cast<const Packed*>(p);
    if constexpr (READONLY) {
        return __ldg(at);
    } else {
        return *at;
    }
}

template <int VEC, bool READONLY>
__device__ inline void load_bf16(const bf16* p, float* out) {
    unpack(load_packed<VEC, READONLY>(p), out);
}

// Rounds VEC floats to bf16 and stores them with one VEC-element store.
template <int VEC>
__device__ inline void store_bf16(bf16* p, const float* v) {
    if constexpr (VEC == 8) {
        *reinterpret_cast<uint4*>(p) =
            make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
    } else if constexpr (VEC == 4) {
        *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]));
    } else if constexpr (VEC == 2) {
        *reinterpret_cast<unsigned int*>(p) = pack_bf16x2(v[0], v[1]);
    } else {
        *p = __float2bfloat16_rn(v[0]);
    }
}

__device__ inline bool is_aligned(const void* p, int bytes) {
    return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// cp.async (sm_80 and newer): a 16-byte copy from global to shared memory that bypasses
// the registers and L1. A thread's copies complete in commit groups, which it waits for
// with wait_group; a barrier after the wait makes them visible to the other threads.
__device__ __forceinline__ void cp_async_16(void* shared_destination, const void* global_source) {
    const unsigned destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
    const size_t source = __cvta_generic_to_global(global_source);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(destination), "l"(source) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most PENDING of this thread's newest commit groups are incomplete.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
#endif

__device__ inline float warp_sum(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

// Sum over a group of `lanes` adjacent lanes (a power of two), returned to all of them.
template <int LANES>
__device__ inline float group_sum(float v) {
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

inline constexpr int kBlockSumSmemBytes = kWarps * static_cast<int>(sizeof(float));

// Sum of v over the CTA, returned to every thread. Uses kBlockSumSmemBytes of scratch
// and two barriers: the second keeps a later call from overwriting partial sums that
// slower threads are still reading.
__device__ inline float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

struct ArgmaxCandidate {
    float value;
    int index;
};

// The identity of the argmax reduction: every real element, even -inf, precedes it.
MPK_CUDA_HD ArgmaxCandidate argmax_empty() { return {-INFINITY, 0x7fffffff}; }

MPK_CUDA_HD void argmax_update(ArgmaxCandidate& best, float value, int index) {
    if (argmax_precedes(value, index, best.value, best.index)) best = {value, index};
}

inline constexpr int kBlockArgmaxSmemBytes = kWarps * static_cast<int>(sizeof(float) + sizeof(int));

// argmax over the CTA's candidates, returned to every thread; kBlockArgmaxSmemBytes of
// scratch and two barriers, as block_sum.
__device__ inline ArgmaxCandidate block_argmax(ArgmaxCandidate best, char* smem) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const float value = __shfl_xor_sync(kFullMask, best.value, offset);
        const int index = __shfl_xor_sync(kFullMask, best.index, offset);
        argmax_update(best, value, index);
    }
    float* values = reinterpret_cast<float*>(smem);
    int* indices = reinterpret_cast<int*>(values + kWarps);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) {
        values[warp] = best.value;
        indices[warp] = best.index;
    }
    __syncthreads();
    ArgmaxCandidate total = argmax_empty();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) argmax_update(total, values[w], indices[w]);
    __syncthreads();
    return total;
}

// Calls vector(column) for each whole VEC-vector of the span and scalar(column) for each
// head and tail element, spread over the CTA's threads.
template <int VEC, typename VectorBody, typename ScalarBody>
__device__ inline void for_each_span_element(VectorSpan span, int begin, int end, VectorBody&& vector,
                                             ScalarBody&& scalar) {
    const int vectors = (span.body_end - span.head_end) / VEC;
    for (int i = threadIdx.x; i < vectors; i += kThreads) vector(span.head_end + i * VEC);
    // The head and tail hold fewer than 2 * VEC <= 16 elements, so one pass suffices.
    static_assert(2 * VEC <= kThreads, "one thread per scalar element of a span");
    const int column = span_scalar_column(span, begin, end, static_cast<int>(threadIdx.x));
    if (column >= 0) scalar(column);
}

}  // namespace detail

// ---------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------

inline constexpr int kEmbeddingSmemBytes = 0;

// out[t, c0:c1] = weight[tokens[t], c0:c1] for t < T. weight: [V, H]; out: [T, H].
// NOTE: V is not a template parameter, so token ids are not range-checked here, while
// the torch reference raises on an id outside [0, V). Callers must pass valid ids.
template <int T, int H>
__device__ void embedding_task(const int64_t* tokens, const __nv_bfloat16* weight, __nv_bfloat16* out, int c0, int c1,
                               char* smem) {
    (void)smem;
    constexpr int kVec = 8;
    // With H a multiple of 8, column c sits at the same offset modulo 8 in the table
    // row and in the output row, so one span serves both.
    const bool vectors = H % kVec == 0 && detail::is_aligned(weight, 16) && detail::is_aligned(out, 16);
    const detail::VectorSpan span = vectors ? detail::vector_span(0, c0, c1, kVec) : detail::VectorSpan{c1, c1};
    for (int t = 0; t < T; ++t) {
        const bf16* row = weight + tokens[t] * H;
        bf16* out_row = out + static_cast<int64_t>(t) * H;
        if (vectors) {
            detail::for_each_span_element<kVec>(
                span, c0, c1,
                [&](int c) {
                    *reinterpret_cast<uint4*>(out_row + c) = detail::load_packed<kVec, true>(row + c);
                },
                [&](int c) { out_row[c] = row[c]; });
        } else {
            for (int c = c0 + threadIdx.x; c < c1; c += kThreads) out_row[c] = row[c];
        }
    }
}

// ---------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------

inline constexpr int kRmsNormSmemBytes = detail::kBlockSumSmemBytes;

namespace detail {

// One CTA per row: each thread keeps its kPerThread vectors of the row in registers
// across the CTA-wide sum of squares, so the row is read from memory once.
template <int H, int VEC>
__device__ void rmsnorm_rows(const bf16* x, const bf16* weight, bf16* out, float eps, int r0, int r1, float* scratch) {
    constexpr int kVectors = H / VEC;
    constexpr int kPerThread = (kVectors + kThreads - 1) / kThreads;
    for (int r = r0; r < r1; ++r) {
        const bf16* row = x + static_cast<int64_t>(r) * H;
        float values[kPerThread][VEC];
        float squares = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int vector = threadIdx.x + i * kThreads;
            if (vector < kVectors) {
                load_bf16<VEC, false>(row + vector * VEC, values[i]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) squares += values[i][e] * values[i][e];
            }
        }
        // block_sum's barriers also order every read of the row before any write, so
        // out may alias x.
        const float inverse = inverse_rms(block_sum(squares, scratch), H, eps);
        bf16* out_row = out + static_cast<int64_t>(r) * H;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int vector = threadIdx.x + i * kThreads;
            if (vector < kVectors) {
                float w[VEC];
                load_bf16<VEC, true>(weight + vector * VEC, w);
                float normalized[VEC];
#pragma unroll
                for (int e = 0; e < VEC; ++e) normalized[e] = rms_normalize_element(values[i][e], inverse, w[e]);
                store_bf16<VEC>(out_row + vector * VEC, normalized);
            }
        }
    }
}

}  // namespace detail

// Rows r0..r1-1: out[r] = weight * (x[r] * rsqrt(mean(x[r]^2) + eps)), rounded as
// detail::rms_normalize_element documents. x, out: [T, H] (out may equal x); weight: [H].
// The sum of squares is fp32, as in transformers, but summed in a different order.
template <int H>
__device__ void rmsnorm_task(const __nv_bfloat16* x, const __nv_bfloat16* weight, __nv_bfloat16* out, float eps, int r0,
                             int r1, char* smem) {
    static_assert(kRmsNormSmemBytes <= kSmemBytes, "rmsnorm scratch exceeds MPK_SMEM_BYTES");
    float* scratch = reinterpret_cast<float*>(smem);
    constexpr int kVec = detail::vector_width_for(H);
    if constexpr (kVec > 1) {
        if (detail::is_aligned(x, 2 * kVec) && detail::is_aligned(weight, 2 * kVec) && detail::is_aligned(out, 2 * kVec)) {
            detail::rmsnorm_rows<H, kVec>(x, weight, out, eps, r0, r1, scratch);
            return;
        }
    }
    detail::rmsnorm_rows<H, 1>(x, weight, out, eps, r0, r1, scratch);
}

// ---------------------------------------------------------------------------------
// Linear (GEMV for decode, register-blocked for short prefill chunks)
// ---------------------------------------------------------------------------------

// Shared memory that linear_task and linear_prefetch use for T tokens and K columns: the
// stage buffers of the cp.async pipeline, or 0 where linear_task keeps to registers.
template <int T, int K>
MPK_CUDA_HD constexpr int linear_smem_bytes() {
    return detail::LinearStaging<T, K>::kPipelineBytes;
}

// Requests the L2 cache lines of [address, address + bytes), spread over the CTA's threads.
__device__ __forceinline__ void prefetch_l2(const void* address, size_t bytes) {
    const char* base = static_cast<const char*>(address);
    for (size_t offset = static_cast<size_t>(threadIdx.x) * 128; offset < bytes; offset += static_cast<size_t>(blockDim.x) * 128) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(base + offset));
    }
}

namespace detail {

// Rows [c0, c1) of out = x @ weight.T, one row group (LinearShape::kRows rows) per warp
// at a time, groups dealt to warps round robin. Rows and tokens past the tile's end are
// clamped to its last row and token, so the inner loops need no predicates: they
// compute duplicates that are never stored.
template <int T, int K, int N, typename OUT, bool RESIDUAL, int VEC>
__device__ void linear_rows(const bf16* x, const bf16* weight, const OUT* residual, OUT* out, int c0, int c1) {
    constexpr int kRows = LinearShape<T>::kRows;
    constexpr int kTokens = LinearShape<T>::kTokens;
    constexpr int kSteps = linear_k_steps(K, VEC);
    constexpr int kBatch = kSteps < kLinearBatch ? kSteps : kLinearBatch;
    static_assert(kRows * kTokens <= kWarpSize, "one lane stores each output of a row group");
    using Packed = typename PackedBf16<VEC>::type;

    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int groups = linear_group_count(c0, c1, kRows);
    for (int group = warp; group < groups; group += kWarps) {
        const Range rows = linear_group_rows(c0, c1, kRows, group);
        const bf16* w_rows[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const int row = rows.begin + r < rows.end ? rows.begin + r : rows.end - 1;
            w_rows[r] = weight + static_cast<int64_t>(row) * K;
        }

        for (int t0 = 0; t0 < T; t0 += kTokens) {
            const bf16* x_rows[kTokens];
#pragma unroll
            for (int t = 0; t < kTokens; ++t) x_rows[t] = x + static_cast<int64_t>(t0 + t < T ? t0 + t : T - 1) * K;

            float acc[kTokens][kRows];
#pragma unroll
            for (int t = 0; t < kTokens; ++t) {
#pragma unroll
                for (int r = 0; r < kRows; ++r) acc[t][r] = 0.0f;
            }

#pragma unroll 1
            for (int s0 = 0; s0 < kSteps; s0 += kBatch) {
                // Issue all of the batch's weight loads before the first use, so their
                // latencies overlap. Lanes past K load nothing and hold zeros.
                Packed w[kBatch][kRows];
#pragma unroll
                for (int b = 0; b < kBatch; ++b) {
                    const int k = linear_k_offset(s0 + b, lane, VEC);
#pragma unroll
                    for (int r = 0; r < kRows; ++r) w[b][r] = k < K ? load_packed<VEC, true>(w_rows[r] + k) : Packed{};
                }
#pragma unroll
                for (int b = 0; b < kBatch; ++b) {
                    const int k = linear_k_offset(s0 + b, lane, VEC);
                    float xs[kTokens][VEC];
#pragma unroll
                    for (int t = 0; t < kTokens; ++t) {
                        if (k < K) {
                            load_bf16<VEC, false>(x_rows[t] + k, xs[t]);
                        } else {
#pragma unroll
                            for (int e = 0; e < VEC; ++e) xs[t][e] = 0.0f;
                        }
                    }
#pragma unroll
                    for (int r = 0; r < kRows; ++r) {
                        float ws[VEC];
                        unpack(w[b][r], ws);
#pragma unroll
                        for (int t = 0; t < kTokens; ++t) {
#pragma unroll
                            for (int e = 0; e < VEC; ++e) acc[t][r] = fmaf(xs[t][e], ws[e], acc[t][r]);
                        }
                    }
                }
            }

            // Every lane gets every sum, then lane t * kRows + r stores output (t, r).
            // Reading residual before writing out in the same thread keeps
            // residual == out safe.
#pragma unroll
            for (int t = 0; t < kTokens; ++t) {
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    const float dot = warp_sum(acc[t][r]);
                    const int token = t0 + t, row = rows.begin + r;
                    if (lane == t * kRows + r && token < T && row < rows.end) {
                        const int64_t at = static_cast<int64_t>(token) * N + row;
                        const float res = RESIDUAL ? to_float(residual[at]) : 0.0f;
                        store_element(out + at, linear_output<RESIDUAL>(dot, res));
                    }
                }
            }
        }
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Issues this thread's cp.async copies of chunk `index` into its stage buffer and
// commits them as one group. An index at or past `count` commits an empty group, so that
// every thread has committed exactly index + 1 groups after the call for `index`.
template <int T, int K>
__device__ inline void linear_issue_chunk(const bf16* weight, int c0, int c1, int index, int count, char* smem) {
    using Staging = LinearStaging<T, K>;
    if (index < count) {
        const LinearChunk part = Staging::chunk(index, c0, c1);
        char* stage = smem + Staging::stage_of(index) * Staging::kStageBytes;
        const int copies = Staging::copy_count(part);
        for (int i = threadIdx.x; i < copies; i += kThreads) {
            const LinearCopy copy = Staging::copy(part, i);
            cp_async_16(stage + copy.destination, weight + copy.source);
        }
    }
    cp_async_commit();
}

// linear_rows with the weight streamed through shared memory (LinearStaging documents
// the chunks). x is read from global memory with 16-byte loads, so it must be 16-byte
// aligned, like the weight. With STAGED, linear_prefetch has issued the first
// kPrefetchedChunks chunks into the same smem on this CTA, and this function issues only
// the rest. Each lane accumulates the same products in the same order as
// linear_rows<..., 8>, and the warp reduction is the same butterfly.
template <int T, int K, int N, typename OUT, bool RESIDUAL, bool STAGED>
__device__ void linear_rows_staged(const bf16* x, const bf16* weight, const OUT* residual, OUT* out, int c0, int c1,
                                   char* smem) {
    using Staging = LinearStaging<T, K>;
    constexpr int kRows = Staging::kRows;
    constexpr int kTokens = Staging::kPassTokens;
    static_assert(Staging::kEnabled, "the pipeline needs K % 8 == 0 and room for two stages");
    static_assert(Staging::kPipelineBytes <= kLinearPipelineBytes && kLinearPipelineBytes <= kSmemBytes,
                  "linear stage buffers exceed MPK_SMEM_BYTES");
    static_assert(kRows * kTokens <= kWarpSize, "one lane stores each output of a row group");

    const int count = Staging::chunk_count(c0, c1);
    for (int index = Staging::task_first_chunk(STAGED); index < Staging::kPrefetchedChunks; ++index) {
        linear_issue_chunk<T, K>(weight, c0, c1, index, count, smem);
    }

    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    float acc[kTokens][kRows] = {};
#pragma unroll 1
    for (int index = 0; index < count; ++index) {
        // kPrefetchedChunks + index groups are committed, and the newest kPendingGroups
        // of them hold chunks past this one, so this thread's copies of chunk `index`
        // have landed after the wait.
        cp_async_wait<Staging::kPendingGroups>();
        // The barrier makes every thread's copies visible, and it follows every thread's
        // reads of chunk index - 1, whose buffer the next issue overwrites.
        __syncthreads();
        linear_issue_chunk<T, K>(weight, c0, c1, Staging::chunk_issued_in(index), count, smem);

        const LinearChunk part = Staging::chunk(index, c0, c1);
        const char* stage = smem + Staging::stage_of(index) * Staging::kStageBytes;
        const int first_token = part.pass * kTokens;
        const int chunk_rows = part.row_end - part.row_begin;
#pragma unroll 1
        for (int round = 0; round < Staging::kGroupsPerWarp; ++round) {
            const int first_row = Staging::group_row(warp, round);
            // Uniform across the warp, so the shuffles below still see all 32 lanes.
            if (first_row >= chunk_rows) continue;
            if (part.k_begin == 0) {
#pragma unroll
                for (int t = 0; t < kTokens; ++t) {
#pragma unroll
                    for (int r = 0; r < kRows; ++r) acc[t][r] = 0.0f;
                }
            }

#pragma unroll
            for (int step = 0; step < Staging::kSliceSteps; ++step) {
                const int k = part.k_begin + linear_k_offset(step, lane, kCopyElements);
                if (k >= part.k_end) continue;
                // Rows past the chunk's end repeat its last row; their sums are never stored.
                float w[kRows][kCopyElements];
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    const int row = first_row + r < chunk_rows ? first_row + r : chunk_rows - 1;
                    unpack(*reinterpret_cast<const uint4*>(stage + Staging::stage_offset(row, k - part.k_begin)), w[r]);
                }
#pragma unroll
                for (int t = 0; t < kTokens; ++t) {
                    const int token = first_token + t < T ? first_token + t : T - 1;
                    float xs[kCopyElements];
                    load_bf16<kCopyElements, false>(x + static_cast<int64_t>(token) * K + k, xs);
#pragma unroll
                    for (int r = 0; r < kRows; ++r) {
#pragma unroll
                        for (int e = 0; e < kCopyElements; ++e) acc[t][r] = fmaf(xs[e], w[r][e], acc[t][r]);
                    }
                }
            }

            if (part.k_end == K) {
                // As in linear_rows: lane t * kRows + r stores output (t, r), reading the
                // residual before writing out.
#pragma unroll
                for (int t = 0; t < kTokens; ++t) {
#pragma unroll
                    for (int r = 0; r < kRows; ++r) {
                        const float dot = warp_sum(acc[t][r]);
                        const int token = first_token + t, row = part.row_begin + first_row + r;
                        if (lane == t * kRows + r && token < T && row < part.row_end) {
                            const int64_t at = static_cast<int64_t>(token) * N + row;
                            const float res = RESIDUAL ? to_float(residual[at]) : 0.0f;
                            store_element(out + at, linear_output<RESIDUAL>(dot, res));
                        }
                    }
                }
            }
        }
    }
    // Only empty groups can still be pending here, because the last iteration waited for
    // the last chunk.
}
#endif

}  // namespace detail

// Starts loading a linear task's weight rows [c0, c1) before its event fires: on sm_80
// and newer it issues the cp.async copies of the first kPrefetchedChunks chunks of the
// shared-memory pipeline into `smem` (linear_smem_bytes<T, K>() bytes) without waiting
// for them, then asks L2 for the whole tile. Call it with every thread of the CTA, only
// when `smem` is free, and follow it with linear_task<T, K, ..., STAGED = true> on the
// same CTA with the same weight, c0 and c1, with no other use of `smem` in between.
// Tiles that linear_task computes from registers (K % 8 != 0, a weight that is not
// 16-byte aligned) get only the L2 prefetch.
// The CTA's dynamic shared memory. Every extern __shared__ array starts at the same
// address, so a standalone __global__ wrapper (the kernel tests) can pass this as `smem`;
// the megakernel passes its own array.
__device__ __forceinline__ char* dynamic_smem() {
    extern __shared__ __align__(16) char mpk_dynamic_smem[];
    return mpk_dynamic_smem;
}

template <int T, int K>
__device__ void linear_prefetch(const __nv_bfloat16* weight, int c0, int c1, char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using Staging = detail::LinearStaging<T, K>;
    if constexpr (Staging::kEnabled) {
        if (detail::is_aligned(weight, 16)) {
            const int count = Staging::chunk_count(c0, c1);
            for (int index = 0; index < Staging::kPrefetchedChunks; ++index) {
                detail::linear_issue_chunk<T, K>(weight, c0, c1, index, count, smem);
            }
        }
    }
#else
    (void)smem;
#endif
    prefetch_l2(weight + static_cast<int64_t>(c0) * K, static_cast<size_t>(c1 - c0) * K * sizeof(__nv_bfloat16));
}

// out[t, n] = sum_k x[t, k] * weight[n, k] (+ residual[t, n]) for n in [c0, c1), t < T,
// rounded as detail::linear_output documents. x: [T, K]; weight: [N, K];
// residual, out: [T, N] of type OUT (bf16, or float for the lm_head's logits);
// residual may equal out. The dot products accumulate in fp32, in a different order
// than torch's.
// On sm_80 and newer, when K % 8 == 0 and x and the weight are 16-byte aligned, the
// weight streams through a cp.async pipeline in `smem` (linear_smem_bytes<T, K>()
// bytes); otherwise it is loaded straight into registers. STAGED means that
// linear_prefetch<T, K> has issued the pipeline's first chunks (see its contract).
// Either way the task waits for every copy it reads, and for every copy that
// linear_prefetch issued, before it returns.
// NOTE: there is no tensor-core path, so long prefill chunks run at GEMV speed, and
// the staged path streams the tile once per 16 tokens.
template <int T, int K, int N, typename OUT, bool RESIDUAL, bool STAGED = false>
__device__ void linear_task(const __nv_bfloat16* x, const __nv_bfloat16* weight, const OUT* residual, OUT* out, int c0,
                            int c1, char* smem) {
    static_assert(std::is_same_v<OUT, bf16> || std::is_same_v<OUT, float>, "linear output is bf16 or float");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (detail::LinearStaging<T, K>::kEnabled) {
        // linear_prefetch issued copies exactly when the weight is 16-byte aligned.
        const bool weight_aligned = detail::is_aligned(weight, 16);
        if (weight_aligned && detail::is_aligned(x, 16)) {
            detail::linear_rows_staged<T, K, N, OUT, RESIDUAL, STAGED>(x, weight, residual, out, c0, c1, smem);
            return;
        }
        // The scalar path does not read smem, but the prefetched copies must land before
        // the caller's barrier hands smem to the next task.
        if constexpr (STAGED) {
            if (weight_aligned) detail::cp_async_wait_all();
        }
        // With x or the weight misaligned, linear_rows' 8-element vectors are out too.
        detail::linear_rows<T, K, N, OUT, RESIDUAL, 1>(x, weight, residual, out, c0, c1);
        return;
    }
#endif
    (void)smem;
    constexpr int kVec = detail::vector_width_for(K);
    if constexpr (kVec > 1) {
        if (detail::is_aligned(x, 2 * kVec) && detail::is_aligned(weight, 2 * kVec)) {
            detail::linear_rows<T, K, N, OUT, RESIDUAL, kVec>(x, weight, residual, out, c0, c1);
            return;
        }
    }
    detail::linear_rows<T, K, N, OUT, RESIDUAL, 1>(x, weight, residual, out, c0, c1);
}

// ---------------------------------------------------------------------------------
// Per-head RMSNorm of q and k (Qwen3)
// ---------------------------------------------------------------------------------

inline constexpr int kQkNormSmemBytes = 0;

namespace detail {

// One warp per (token, head) row of HD elements, held in registers across the warp's
// sum of squares. Items run q heads first, then k heads, token by token.
template <int T, int ROW, int HD, int VEC>
__device__ void qk_norm_heads(bf16* qkv, const bf16* q_weight, const bf16* k_weight, float eps, int q0, int q1, int k0,
                              int k1) {
    constexpr int kVectors = HD / VEC;
    constexpr int kPerLane = (kVectors + kWarpSize - 1) / kWarpSize;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int q_heads = (q1 - q0) / HD, k_heads = (k1 - k0) / HD;
    const int heads = q_heads + k_heads;
    for (int item = warp; item < T * heads; item += kWarps) {
        const int t = item / heads, head = item % heads;
        const bool is_q = head < q_heads;
        bf16* row = qkv + static_cast<int64_t>(t) * ROW + (is_q ? q0 + head * HD : k0 + (head - q_heads) * HD);
        const bf16* weight = is_q ? q_weight : k_weight;

        float values[kPerLane][VEC];
        float squares = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int vector = lane + i * kWarpSize;
            if (vector < kVectors) {
                load_bf16<VEC, false>(row + vector * VEC, values[i]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) squares += values[i][e] * values[i][e];
            }
        }
        // Each lane writes back only the elements it read, after the shuffles, so the
        // in-place update needs no barrier.
        const float inverse = inverse_rms(warp_sum(squares), HD, eps);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int vector = lane + i * kWarpSize;
            if (vector < kVectors) {
                float w[VEC];
                load_bf16<VEC, true>(weight + vector * VEC, w);
                float normalized[VEC];
#pragma unroll
                for (int e = 0; e < VEC; ++e) normalized[e] = rms_normalize_element(values[i][e], inverse, w[e]);
                store_bf16<VEC>(row + vector * VEC, normalized);
            }
        }
    }
}

}  // namespace detail

// In place on qkv ([T, ROW]): RMSNorm of every HD-wide head in columns [q0, q1) with
// q_weight and in columns [k0, k1) with k_weight ([HD] each), rounded as
// detail::rms_normalize_element documents. Both column ranges are whole heads.
template <int T, int ROW, int HD>
__device__ void qk_norm_task(__nv_bfloat16* qkv, const __nv_bfloat16* q_weight, const __nv_bfloat16* k_weight, float eps,
                             int q0, int q1, int k0, int k1, char* smem) {
    (void)smem;
    constexpr int kVec = detail::vector_width_for(HD);
    if constexpr (kVec > 1 && ROW % kVec == 0) {
        if (detail::is_aligned(qkv, 2 * kVec) && detail::is_aligned(q_weight, 2 * kVec) &&
            detail::is_aligned(k_weight, 2 * kVec)) {
            detail::qk_norm_heads<T, ROW, HD, kVec>(qkv, q_weight, k_weight, eps, q0, q1, k0, k1);
            return;
        }
    }
    detail::qk_norm_heads<T, ROW, HD, 1>(qkv, q_weight, k_weight, eps, q0, q1, k0, k1);
}

// ---------------------------------------------------------------------------------
// Rotary embedding and KV-cache append
// ---------------------------------------------------------------------------------

inline constexpr int kRopeSmemBytes = 0;

// For each row t with 0 <= p = positions[t] < S: rotates the q heads in qkv[t, q0:q1) in
// place, writes the rotated k head qkv[t, k0:k0+HD) to k_cache[p, group] and copies the
// v head qkv[t, v0:v0+HD) to v_cache[p, group], rounded as detail::rotate_pair
// documents. qkv's k and v columns stay unchanged. Other rows get qkv[t, q0:q1) = 0 and
// touch no cache slot. cos, sin: [S', HD] float with S' >= S; k_cache, v_cache:
// [S, NKV, HD].
// NOTE: the torch reference raises on p >= S; here such a row is treated like padding,
// so a bad position cannot write outside the cache (as in the CPU kernel).
// Every element is read and written by one thread (a rotate-half pair by the thread
// that owns it), so the in-place update needs no barrier.
template <int T, int ROW, int HD, int NKV, int S>
__device__ void rope_task(__nv_bfloat16* qkv, const int64_t* positions, const float* cos, const float* sin,
                          __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, int group, int q0, int q1, int k0, int v0,
                          char* smem) {
    static_assert(HD % 2 == 0, "rotary embedding needs an even head_dim");
    (void)smem;
    constexpr int kHalf = HD / 2;
    const int q_pairs = (q1 - q0) / 2;
    const int per_row = q_pairs + kHalf + HD;
    for (int i = threadIdx.x; i < T * per_row; i += kThreads) {
        const int t = i / per_row;
        const detail::RopeWork work = detail::rope_work(i % per_row, q_pairs, HD);
        bf16* row = qkv + static_cast<int64_t>(t) * ROW;
        const int64_t p = positions[t];
        if (p < 0 || p >= S) {
            if (work.kind == detail::RopeItem::kQPair) {
                bf16* head = row + q0 + work.head * HD;
                head[work.column] = __float2bfloat16_rn(0.0f);
                head[work.column + kHalf] = __float2bfloat16_rn(0.0f);
            }
            continue;
        }
        const int64_t slot = (p * NKV + group) * HD;
        if (work.kind == detail::RopeItem::kVElement) {
            v_cache[slot + work.column] = row[v0 + work.column];
            continue;
        }
        const float* cos_row = cos + p * HD;
        const float* sin_row = sin + p * HD;
        const int d = work.column;
        bf16* source = work.kind == detail::RopeItem::kQPair ? row + q0 + work.head * HD : row + k0;
        bf16* target = work.kind == detail::RopeItem::kQPair ? source : k_cache + slot;
        float low, high;
        detail::rotate_pair(detail::to_float(source[d]), detail::to_float(source[d + kHalf]), __ldg(cos_row + d),
                            __ldg(cos_row + d + kHalf), __ldg(sin_row + d), __ldg(sin_row + d + kHalf), low, high);
        target[d] = __float2bfloat16_rn(low);
        target[d + kHalf] = __float2bfloat16_rn(high);
    }
}

// ---------------------------------------------------------------------------------
// Causal attention over the KV cache (flash-decoding inside one CTA)
// ---------------------------------------------------------------------------------

// q heads handled together, so each cache row is read once per head block. Heads of a
// KV group past 4 (Qwen3-32B and Llama-3-70B have 8 per KV head) take another pass
// over the cache.
inline constexpr int kAttentionHeads = 4;
// Cache slots each slot group loads back to back before using them.
inline constexpr int kAttentionSlotBatch = 2;

// Scratch for combining the warps' softmax states: per warp and head, HD accumulators,
// the running max and the running sum.
template <int HD>
MPK_CUDA_HD constexpr int attention_smem_bytes() {
    return kWarps * kAttentionHeads * (HD + 2) * static_cast<int>(sizeof(float));
}

namespace detail {

// Attention of `heads` consecutive q heads (at most kAttentionHeads) of one row, read
// from q_row and written to out_row, over cache slots [0, length). Slot group g of the CTA reads slots g, g + kSlotGroups, ...
// and keeps its own online softmax state per head. The states merge across the groups
// of a warp by shuffles and across warps through shared memory.
template <int HD, int NKV, int VEC>
__device__ void attend_row(const bf16* q_row, const bf16* k_cache, const bf16* v_cache, bf16* out_row, float scale,
                           int heads, int length, float* scratch) {
    using Layout = AttentionLayout<HD, VEC>;
    constexpr int kLanes = Layout::kLanesPerSlot;
    constexpr int kPerLane = Layout::kPerLane;
    constexpr int64_t kSlotStride = static_cast<int64_t>(NKV) * HD;

    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int slot_lane = lane % kLanes;
    const int slot_group = warp * Layout::kSlotsPerWarp + lane / kLanes;

    float q[kAttentionHeads][kPerLane];
    float acc[kAttentionHeads][kPerLane];
    float m[kAttentionHeads], l[kAttentionHeads];
#pragma unroll
    for (int h = 0; h < kAttentionHeads; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < Layout::kVectorsPerLane; ++i) {
            const int vector = attention_lane_vector(slot_lane, i, kLanes, Layout::kVectors);
            if (h < heads && vector >= 0) {
                load_bf16<VEC, false>(q_row + h * HD + vector * VEC, &q[h][i * VEC]);
            } else {
#pragma unroll
                for (int e = 0; e < VEC; ++e) q[h][i * VEC + e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[h][i * VEC + e] = 0.0f;
        }
    }

    // The loop bound is the same for every thread, so all lanes of a warp reach every
    // shuffle. A slot group past the end skips only its loads and its softmax update.
    constexpr int kStride = Layout::kSlotGroups * kAttentionSlotBatch;
    for (int base = 0; base < length; base += kStride) {
        float keys[kAttentionSlotBatch][kPerLane];
        float values[kAttentionSlotBatch][kPerLane];
        int slots[kAttentionSlotBatch];
#pragma unroll
        for (int b = 0; b < kAttentionSlotBatch; ++b) {
            slots[b] = attention_slot(base / Layout::kSlotGroups + b, slot_group, Layout::kSlotGroups, length);
#pragma unroll
            for (int i = 0; i < Layout::kVectorsPerLane; ++i) {
                const int vector = attention_lane_vector(slot_lane, i, kLanes, Layout::kVectors);
                if (slots[b] >= 0 && vector >= 0) {
                    const int64_t at = slots[b] * kSlotStride + vector * VEC;
                    load_bf16<VEC, false>(k_cache + at, &keys[b][i * VEC]);
                    load_bf16<VEC, false>(v_cache + at, &values[b][i * VEC]);
                } else {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) keys[b][i * VEC + e] = values[b][i * VEC + e] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int b = 0; b < kAttentionSlotBatch; ++b) {
#pragma unroll
            for (int h = 0; h < kAttentionHeads; ++h) {
                float partial = 0.0f;
#pragma unroll
                for (int e = 0; e < kPerLane; ++e) partial = fmaf(q[h][e], keys[b][e], partial);
                const float score = group_sum<kLanes>(partial) * scale;
                if (slots[b] >= 0 && h < heads) {
                    float correction, weight;
                    online_softmax_step(m[h], l[h], score, correction, weight);
#pragma unroll
                    for (int e = 0; e < kPerLane; ++e) acc[h][e] = fmaf(weight, values[b][e], acc[h][e] * correction);
                }
            }
        }
    }

    // Butterfly over the warp's slot groups. Afterwards every group has the warp's
    // merged state.
#pragma unroll
    for (int offset = kLanes; offset < kWarpSize; offset *= 2) {
#pragma unroll
        for (int h = 0; h < kAttentionHeads; ++h) {
            const float other_m = __shfl_xor_sync(kFullMask, m[h], offset);
            const float other_l = __shfl_xor_sync(kFullMask, l[h], offset);
            float self_scale, other_scale;
            merge_softmax(m[h], l[h], other_m, other_l, self_scale, other_scale);
#pragma unroll
            for (int e = 0; e < kPerLane; ++e) {
                const float other = __shfl_xor_sync(kFullMask, acc[h][e], offset);
                acc[h][e] = acc[h][e] * self_scale + other * other_scale;
            }
        }
    }

    // Scratch layout: acc [kWarps][kAttentionHeads][HD], then m and l [kWarps][kAttentionHeads].
    float* acc_s = scratch;
    float* m_s = acc_s + kWarps * kAttentionHeads * HD;
    float* l_s = m_s + kWarps * kAttentionHeads;
    if (lane < kLanes) {
#pragma unroll
        for (int h = 0; h < kAttentionHeads; ++h) {
#pragma unroll
            for (int i = 0; i < Layout::kVectorsPerLane; ++i) {
                const int vector = attention_lane_vector(slot_lane, i, kLanes, Layout::kVectors);
                if (vector >= 0) {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        acc_s[(warp * kAttentionHeads + h) * HD + vector * VEC + e] = acc[h][i * VEC + e];
                    }
                }
            }
            if (lane == 0) {
                m_s[warp * kAttentionHeads + h] = m[h];
                l_s[warp * kAttentionHeads + h] = l[h];
            }
        }
    }
    __syncthreads();

    for (int i = threadIdx.x; i < heads * HD; i += kThreads) {
        const int h = i / HD, d = i % HD;
        float total_m = m_s[h], total_l = l_s[h], total = acc_s[h * HD + d];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) {
            float self_scale, other_scale;
            merge_softmax(total_m, total_l, m_s[w * kAttentionHeads + h], l_s[w * kAttentionHeads + h], self_scale,
                          other_scale);
            total = total * self_scale + acc_s[(w * kAttentionHeads + h) * HD + d] * other_scale;
        }
        out_row[h * HD + d] = __float2bfloat16_rn(total / total_l);
    }
    // The next call overwrites the scratch.
    __syncthreads();
}

template <int T, int ROW, int HD, int NKV, int S, int OUT_COLS, int VEC>
__device__ void attention_rows(const bf16* qkv, const int64_t* positions, const bf16* k_cache, const bf16* v_cache,
                               bf16* out, float scale, int group, int r0, int r1, int q0, int q1, float* scratch) {
    const int heads = (q1 - q0) / HD;
    for (int r = r0; r < r1; ++r) {
        bf16* out_row = out + static_cast<int64_t>(r) * OUT_COLS + q0;
        // Every thread reads the same position, so the branch below is uniform.
        const int64_t p = positions[r];
        if (p < 0 || p >= S) {
            for (int i = threadIdx.x; i < q1 - q0; i += kThreads) out_row[i] = __float2bfloat16_rn(0.0f);
            continue;
        }
        const bf16* q_row = qkv + static_cast<int64_t>(r) * ROW + q0;
        for (int h0 = 0; h0 < heads; h0 += kAttentionHeads) {
            const int count = heads - h0 < kAttentionHeads ? heads - h0 : kAttentionHeads;
            attend_row<HD, NKV, VEC>(q_row + h0 * HD, k_cache + group * HD, v_cache + group * HD,
                                                    out_row + h0 * HD, scale, count, static_cast<int>(p) + 1, scratch);
        }
    }
}

}  // namespace detail

// For rows r0..r1-1 with 0 <= p = positions[r] < S: each q head h in columns [q0, q1) of
// qkv ([T, ROW]) attends over k_cache[0..p, group] and v_cache[0..p, group]
// ([S, NKV, HD]): out[r, head columns] = softmax(q_h . k * scale) @ v, with out:
// [T, OUT_COLS]. Other rows get out[r, q0:q1) = 0. Slots past p are never read (they
// may hold NaN). Needs attention_smem_bytes<HD>() of scratch.
// NOTE: scores, the softmax and the weighted sum stay fp32 and only the output rounds
// to bf16, as in fused GPU attention. The spec's run method on bf16 tensors also rounds
// the scores and the probabilities to bf16, so results differ by bf16 rounding noise.
// As in rope_task, p >= S is treated like padding where the reference would raise.
template <int T, int ROW, int HD, int NKV, int S, int OUT_COLS>
__device__ void attention_task(const __nv_bfloat16* qkv, const int64_t* positions, const __nv_bfloat16* k_cache,
                               const __nv_bfloat16* v_cache, __nv_bfloat16* out, float scale, int group, int r0, int r1,
                               int q0, int q1, char* smem) {
    static_assert(attention_smem_bytes<HD>() <= kSmemBytes, "attention scratch exceeds MPK_SMEM_BYTES");
    float* scratch = reinterpret_cast<float*>(smem);
    constexpr int kVec = detail::vector_width_for(HD);
    // ROW and HD * NKV (the cache's slot stride) are multiples of HD, hence of kVec.
    if constexpr (kVec > 1) {
        if (detail::is_aligned(qkv, 2 * kVec) && detail::is_aligned(k_cache, 2 * kVec) &&
            detail::is_aligned(v_cache, 2 * kVec) && ROW % kVec == 0) {
            detail::attention_rows<T, ROW, HD, NKV, S, OUT_COLS, kVec>(qkv, positions, k_cache, v_cache, out, scale, group,
                                                                       r0, r1, q0, q1, scratch);
            return;
        }
    }
    detail::attention_rows<T, ROW, HD, NKV, S, OUT_COLS, 1>(qkv, positions, k_cache, v_cache, out, scale, group, r0, r1,
                                                            q0, q1, scratch);
}

// ---------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------

inline constexpr int kSiluMulSmemBytes = 0;

// out[t, c] = silu(gate_up[t, c]) * gate_up[t, I + c] for c in [c0, c1), t < T, rounded
// as detail::silu_mul_element documents. gate_up: [T, 2I]; out: [T, I].
template <int T, int I>
__device__ void silu_mul_task(const __nv_bfloat16* gate_up, __nv_bfloat16* out, int c0, int c1, char* smem) {
    (void)smem;
    constexpr int kVec = 8;
    // With I a multiple of 8, gate, up and out columns c share one offset modulo 8.
    const bool vectors = I % kVec == 0 && detail::is_aligned(gate_up, 16) && detail::is_aligned(out, 16);
    const detail::VectorSpan span = vectors ? detail::vector_span(0, c0, c1, kVec) : detail::VectorSpan{c1, c1};
    for (int t = 0; t < T; ++t) {
        const bf16* gate = gate_up + static_cast<int64_t>(t) * 2 * I;
        const bf16* up = gate + I;
        bf16* out_row = out + static_cast<int64_t>(t) * I;
        auto scalar = [&](int c) {
            out_row[c] = __float2bfloat16_rn(detail::silu_mul_element(detail::to_float(gate[c]), detail::to_float(up[c])));
        };
        if (vectors) {
            detail::for_each_span_element<kVec>(
                span, c0, c1,
                [&](int c) {
                    float g[kVec], u[kVec], result[kVec];
                    detail::load_bf16<kVec, false>(gate + c, g);
                    detail::load_bf16<kVec, false>(up + c, u);
#pragma unroll
                    for (int e = 0; e < kVec; ++e) result[e] = detail::silu_mul_element(g[e], u[e]);
                    detail::store_bf16<kVec>(out_row + c, result);
                },
                scalar);
        } else {
            for (int c = c0 + threadIdx.x; c < c1; c += kThreads) scalar(c);
        }
    }
}

// ---------------------------------------------------------------------------------
// Greedy sampling: argmax in two steps
// ---------------------------------------------------------------------------------

inline constexpr int kArgmaxSmemBytes = detail::kBlockArgmaxSmemBytes;

// values[t, part], indices[t, part] = max and lowest argmax of
// logits[t, part*CHUNK : min((part+1)*CHUNK, V)]. logits: [T, V]; values, indices:
// [T, P]. NaN counts as the max, as in torch.argmax.
template <int T, int V, int P, int CHUNK>
__device__ void argmax_partial_task(const float* logits, float* values, int64_t* indices, int part, char* smem) {
    static_assert(P == (V + CHUNK - 1) / CHUNK, "P must be the number of CHUNK-wide parts of V");
    static_assert(kArgmaxSmemBytes <= kSmemBytes, "argmax scratch exceeds MPK_SMEM_BYTES");
    constexpr int kVec = 4;
    const int begin = part * CHUNK;
    const int count = V - begin < CHUNK ? V - begin : CHUNK;
    const bool vectors = detail::is_aligned(logits, 16);
    for (int t = 0; t < T; ++t) {
        const int64_t row_offset = static_cast<int64_t>(t) * V + begin;
        const float* row = logits + row_offset;
        // Indices are relative to `begin`, so they fit an int for any CHUNK.
        detail::ArgmaxCandidate best = detail::argmax_empty();
        const detail::VectorSpan span =
            vectors ? detail::vector_span(row_offset, 0, count, kVec) : detail::VectorSpan{count, count};
        const int vector_count = (span.body_end - span.head_end) / kVec;
        for (int i = threadIdx.x; i < vector_count; i += kThreads) {
            const int c = span.head_end + i * kVec;
            const float4 v = *reinterpret_cast<const float4*>(row + c);
            detail::argmax_update(best, v.x, c);
            detail::argmax_update(best, v.y, c + 1);
            detail::argmax_update(best, v.z, c + 2);
            detail::argmax_update(best, v.w, c + 3);
        }
        // The scalar head and tail. Without vectors, span.head_end == count and this covers
        // the whole chunk.
        for (int c = threadIdx.x; c < span.head_end; c += kThreads) detail::argmax_update(best, row[c], c);
        for (int c = span.body_end + threadIdx.x; c < count; c += kThreads) detail::argmax_update(best, row[c], c);

        best = detail::block_argmax(best, smem);
        if (threadIdx.x == 0) {
            values[t * P + part] = best.value;
            indices[t * P + part] = begin + static_cast<int64_t>(best.index);
        }
    }
}

// out[t] = indices[t, j] for the first part j with the largest values[t, j] (NaN counts
// as largest). values, indices: [T, P]; out: [T].
template <int T, int P>
__device__ void argmax_reduce_task(const float* values, const int64_t* indices, int64_t* out, char* smem) {
    static_assert(kArgmaxSmemBytes <= kSmemBytes, "argmax scratch exceeds MPK_SMEM_BYTES");
    for (int t = 0; t < T; ++t) {
        detail::ArgmaxCandidate best = detail::argmax_empty();
        for (int j = threadIdx.x; j < P; j += kThreads) detail::argmax_update(best, values[t * P + j], j);
        best = detail::block_argmax(best, smem);
        if (threadIdx.x == 0) out[t] = indices[t * P + best.index];
    }
}

// qk_norm_task (with QK_NORM), rope_task and attention_task for KV group `group` and every
// row, one after the other in one task: the decode step's fused attention. The barriers
// between them stand where the megakernel would put its between tasks: each kernel ends
// without one, and the next reads what other threads wrote.
template <int T, int ROW, int HD, int NKV, int S, int OUT_COLS, bool QK_NORM>
__device__ void fused_attention_task(__nv_bfloat16* qkv, const int64_t* positions, const float* cos, const float* sin,
                                     const __nv_bfloat16* q_weight, const __nv_bfloat16* k_weight, float eps,
                                     __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, __nv_bfloat16* out, float scale,
                                     int group, int q0, int q1, int k0, int v0, char* smem) {
    if constexpr (QK_NORM) {
        qk_norm_task<T, ROW, HD>(qkv, q_weight, k_weight, eps, q0, q1, k0, k0 + HD, smem);
        __syncthreads();
    }
    rope_task<T, ROW, HD, NKV, S>(qkv, positions, cos, sin, k_cache, v_cache, group, q0, q1, k0, v0, smem);
    __syncthreads();
    attention_task<T, ROW, HD, NKV, S, OUT_COLS>(qkv, positions, k_cache, v_cache, out, scale, group, 0, T, q0, q1, smem);
}

namespace detail {

template <int HD>
inline constexpr int kLaneElements = (HD + kWarpSize - 1) / kWarpSize;

// One warp's attention of one query over rows [begin, end) of keys and values, which
// are `stride` elements apart: lane l holds elements l, l + 32, ... of the query (q) and
// of the output accumulator (acc). A warp sum gives each score and the online softmax
// runs on every lane with the same values, so m and l end equal on all lanes and the
// caller divides acc by l. One slot at a time: simple, not tuned.
template <int HD>
__device__ inline void warp_attend(const float (&q)[kLaneElements<HD>], const bf16* keys, const bf16* values,
                                   int64_t stride, int64_t begin, int64_t end, float scale,
                                   float (&acc)[kLaneElements<HD>], float& m, float& l) {
    const int lane = threadIdx.x % kWarpSize;
    m = -INFINITY;
    l = 0.0f;
#pragma unroll
    for (int i = 0; i < kLaneElements<HD>; ++i) acc[i] = 0.0f;
    for (int64_t j = begin; j < end; ++j) {
        const bf16* key = keys + j * stride;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kLaneElements<HD>; ++i) {
            const int d = lane + i * kWarpSize;
            if (d < HD) dot += q[i] * to_float(key[d]);
        }
        float correction, weight;
        online_softmax_step(m, l, warp_sum(dot) * scale, correction, weight);
        const bf16* value = values + j * stride;
#pragma unroll
        for (int i = 0; i < kLaneElements<HD>; ++i) {
            const int d = lane + i * kWarpSize;
            if (d < HD) acc[i] = acc[i] * correction + weight * to_float(value[d]);
        }
    }
}

}  // namespace detail

// Shared memory of split_attention_task: a row's rotated q heads and k head, as float.
template <int NH, int HD>
MPK_CUDA_HD constexpr int split_attention_smem_bytes() {
    return (NH + 1) * HD * static_cast<int>(sizeof(float));
}

// Decode attention split over the KV cache, as the CPU kernel of the same name: the task
// of KV group `group` and cache chunk `chunk` (slots [lo, hi), chunks of ceil(S / C)).
// Per row with 0 <= p = positions[t] < S: the group's q heads and k head are loaded into
// shared memory, RMS-normalized (QK_NORM, one warp per head) and rotated there, qkv
// staying unchanged; the k and v heads go to cache slot p when lo <= p < hi; then one warp
// per q head attends over slots lo .. min(hi, p + 1) - 1 with an online softmax and
// writes partials[t, chunk, h] = (weighted values, max score, sum of exp(score - max)).
// Empty ranges and padding rows write zeros, -inf and 0. The rounding to bf16 follows the
// separate qk_norm and rope kernels; scores and sums stay fp32.
// NOTE: one warp per head walks the slots one at a time (a warp sum per slot): simple,
// not tuned (see detail::warp_attend). No GPU has run it.
template <int T, int ROW, int HD, int NKV, int S, int C, int NH, bool QK_NORM>
__device__ void split_attention_task(const __nv_bfloat16* qkv, const int64_t* positions, const float* cos,
                                     const float* sin, const __nv_bfloat16* q_weight, const __nv_bfloat16* k_weight,
                                     float eps, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, float* partials,
                                     float scale, int group, int chunk, int q0, int q1, int k0, int v0, char* smem) {
    static_assert(split_attention_smem_bytes<NH, HD>() <= kSmemBytes, "split attention scratch exceeds MPK_SMEM_BYTES");
    static_assert(HD % 2 == 0, "rotary embedding needs an even head_dim");
    constexpr int kChunk = (S + C - 1) / C;
    constexpr int kHalf = HD / 2;
    constexpr int kPerLane = detail::kLaneElements<HD>;
    const int lo = min(chunk * kChunk, S), hi = min(lo + kChunk, S);
    const int heads = (q1 - q0) / HD;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    float* local = reinterpret_cast<float*>(smem);  // heads q heads, then the k head
    for (int t = 0; t < T; ++t) {
        const int64_t p = positions[t];
        const bool valid = p >= 0 && p < S;
        const int end = valid ? min(hi, static_cast<int>(p) + 1) : lo;
        const bf16* row = qkv + static_cast<int64_t>(t) * ROW;
        if (valid) {
            for (int i = threadIdx.x; i < (heads + 1) * HD; i += kThreads) {
                local[i] = detail::to_float(i < heads * HD ? row[q0 + i] : row[k0 + i - heads * HD]);
            }
            __syncthreads();
            if constexpr (QK_NORM) {
                for (int h = warp; h <= heads; h += kWarps) {
                    float* head = local + h * HD;
                    const bf16* weight = h < heads ? q_weight : k_weight;
                    float squares = 0.0f;
                    for (int d = lane; d < HD; d += kWarpSize) squares += head[d] * head[d];
                    const float inverse = detail::inverse_rms(detail::warp_sum(squares), HD, eps);
                    for (int d = lane; d < HD; d += kWarpSize) {
                        head[d] = detail::rms_normalize_element(head[d], inverse, detail::to_float(weight[d]));
                    }
                }
                __syncthreads();
            }
            for (int i = threadIdx.x; i < (heads + 1) * kHalf; i += kThreads) {
                float* head = local + (i / kHalf) * HD;
                const int d = i % kHalf;
                float low, high;
                detail::rotate_pair(head[d], head[d + kHalf], __ldg(cos + p * HD + d), __ldg(cos + p * HD + d + kHalf),
                                    __ldg(sin + p * HD + d), __ldg(sin + p * HD + d + kHalf), low, high);
                head[d] = low;
                head[d + kHalf] = high;
            }
            __syncthreads();
            if (p >= lo && p < hi) {
                const int64_t slot = (p * NKV + group) * HD;
                for (int d = threadIdx.x; d < HD; d += kThreads) {
                    k_cache[slot + d] = __float2bfloat16_rn(local[heads * HD + d]);
                    v_cache[slot + d] = row[v0 + d];
                }
            }
            // The appended slot is read below by other threads of this CTA.
            __syncthreads();
        }
        for (int h = warp; h < heads; h += kWarps) {
            float* partial = partials + ((static_cast<int64_t>(t) * C + chunk) * NH + q0 / HD + h) * (HD + 2);
            float q[kPerLane], acc[kPerLane], m, l;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) {
                const int d = lane + i * kWarpSize;
                q[i] = d < HD && end > lo ? local[h * HD + d] : 0.0f;
            }
            detail::warp_attend<HD>(q, k_cache + group * HD, v_cache + group * HD, static_cast<int64_t>(NKV) * HD, lo,
                                    end, scale, acc, m, l);
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) {
                const int d = lane + i * kWarpSize;
                if (d < HD) partial[d] = l > 0.0f ? acc[i] / l : 0.0f;
            }
            if (lane == 0) {
                partial[HD] = m;
                partial[HD + 1] = l;
            }
        }
        // The next row reuses `local`.
        __syncthreads();
    }
}

// Merges split_attention's partials of q heads [h0, h1) into out ([T, NH * HD]), as the
// CPU kernel of the same name: one thread per output element.
template <int T, int C, int NH, int HD>
__device__ void attention_combine_task(const float* partials, __nv_bfloat16* out, int h0, int h1, char* smem) {
    (void)smem;
    constexpr int64_t kHeadStride = HD + 2;
    const int width = (h1 - h0) * HD;
    for (int i = threadIdx.x; i < T * width; i += kThreads) {
        const int t = i / width, h = h0 + (i % width) / HD, d = i % HD;
        const float* first = partials + (static_cast<int64_t>(t) * C * NH + h) * kHeadStride;
        float top = -INFINITY;
        for (int c = 0; c < C; ++c) top = detail::nan_max(top, first[c * NH * kHeadStride + HD]);
        float sum = 0.0f, norm = 0.0f;
        if (top != -INFINITY) {
            for (int c = 0; c < C; ++c) {
                const float* partial = first + c * NH * kHeadStride;
                if (partial[HD] == -INFINITY) continue;
                const float weight = partial[HD + 1] * expf(partial[HD] - top);
                norm += weight;
                sum += weight * partial[d];
            }
        }
        detail::store_element(out + (static_cast<int64_t>(t) * NH + h) * HD + d, norm > 0.0f ? sum / norm : 0.0f);
    }
}

// ---------------------------------------------------------------------------------
// Sentence encoders (BERT): linear epilogue, embedding sum, LayerNorm, attention within
// packed sentences, mean pooling. These kernels are simple (one element or one warp per
// item, no vector loads): they are correct by construction rather than tuned.
// NOTE: no GPU has run them yet; they are compiled for every architecture in CI.
// ---------------------------------------------------------------------------------

// The activation a linear applies after its bias.
enum class Activation { none, gelu };

namespace detail {

// Exact GELU through erfc, which keeps its relative accuracy in the negative tail.
MPK_CUDA_HD float gelu(float x) { return 0.5f * x * erfcf(-x * 0.70710678118654752f); }

}  // namespace detail

// out[t, c] = act(out[t, c] + bias[c]) for t < T and c in [c0, c1), in place after
// linear_task stored the product (bias may be null). The caller runs __syncthreads()
// between the two, since a thread here reads elements that other threads stored. Each
// step rounds to bf16, as torch's bf16 addition and GELU do.
template <int T, int N, Activation ACT>
__device__ void bias_activation_task(const __nv_bfloat16* bias, __nv_bfloat16* out, int c0, int c1) {
    const int width = c1 - c0;
    for (int i = threadIdx.x; i < T * width; i += kThreads) {
        const int t = i / width, c = c0 + i % width;
        bf16* at = out + static_cast<int64_t>(t) * N + c;
        float value = detail::to_float(*at);
        if (bias != nullptr) value = detail::round_bf16(value + detail::to_float(bias[c]));
        if constexpr (ACT == Activation::gelu) value = detail::gelu(value);
        detail::store_element(at, value);
    }
}

// Rows r0..r1-1: out[t] = (word[tokens[t]] + token_type[types[t]]) + position[positions[t]],
// in transformers' BertEmbeddings order, each sum rounded to bf16. Tables: [*, H].
template <int H>
__device__ void embedding_sum_task(const int64_t* tokens, const int64_t* positions, const int64_t* types,
                                   const __nv_bfloat16* word, const __nv_bfloat16* position,
                                   const __nv_bfloat16* token_type, __nv_bfloat16* out, int r0, int r1, char* smem) {
    (void)smem;
    for (int i = threadIdx.x; i < (r1 - r0) * H; i += kThreads) {
        const int t = r0 + i / H, c = i % H;
        const float typed = detail::round_bf16(detail::to_float(word[tokens[t] * H + c]) +
                                               detail::to_float(token_type[types[t] * H + c]));
        detail::store_element(out + static_cast<int64_t>(t) * H + c, typed + detail::to_float(position[positions[t] * H + c]));
    }
}

inline constexpr int kLayerNormSmemBytes = detail::kBlockSumSmemBytes;

// Rows r0..r1-1: out = (x - mean) / sqrt(var + eps) * weight + bias, mean and biased
// variance in fp32 from the centred values. Each thread keeps its elements of the row in
// registers across both CTA-wide sums, and block_sum's barriers order every read of a
// row before any write, so out may alias x.
template <int H>
__device__ void layernorm_task(const __nv_bfloat16* x, const __nv_bfloat16* weight, const __nv_bfloat16* bias,
                               __nv_bfloat16* out, float eps, int r0, int r1, char* smem) {
    static_assert(kLayerNormSmemBytes <= kSmemBytes, "layernorm scratch exceeds MPK_SMEM_BYTES");
    constexpr int kPerThread = (H + kThreads - 1) / kThreads;
    float* scratch = reinterpret_cast<float*>(smem);
    for (int r = r0; r < r1; ++r) {
        const bf16* row = x + static_cast<int64_t>(r) * H;
        float values[kPerThread];
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int c = threadIdx.x + i * kThreads;
            values[i] = c < H ? detail::to_float(row[c]) : 0.0f;
            sum += values[i];
        }
        const float mean = detail::block_sum(sum, scratch) / static_cast<float>(H);
        float squares = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < H) squares += (values[i] - mean) * (values[i] - mean);
        }
        const float inverse = 1.0f / sqrtf(detail::block_sum(squares, scratch) / static_cast<float>(H) + eps);
        bf16* out_row = out + static_cast<int64_t>(r) * H;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < H) {
                const float normalized = (values[i] - mean) * inverse;
                detail::store_element(out_row + c, normalized * detail::to_float(weight[c]) + detail::to_float(bias[c]));
            }
        }
    }
}

// Bidirectional attention within packed sentences, as the CPU kernel of the same name.
// Each q head in columns [q0, q1) of rows r0..r1-1 attends over the k head at column k0
// and the v head at v0 of its sentence's rows spans[segments[r]]. One warp takes each
// (row, head) pair through detail::warp_attend. Rows with a negative segment or an empty
// span get zeros.
template <int ROWS, int ROW, int HD, int OUT_COLS>
__device__ void segment_attention_task(const __nv_bfloat16* qkv, const int64_t* segments, const int64_t* spans,
                                       __nv_bfloat16* out, float scale, int r0, int r1, int q0, int q1, int k0, int v0,
                                       char* smem) {
    (void)smem;
    constexpr int kPerLane = detail::kLaneElements<HD>;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int heads = (q1 - q0) / HD;
    for (int item = warp; item < (r1 - r0) * heads; item += kWarps) {
        const int r = r0 + item / heads, h = q0 + (item % heads) * HD;
        const int64_t s = segments[r];
        const int64_t start = s < 0 ? 0 : spans[2 * s], end = s < 0 ? 0 : spans[2 * s + 1];
        float q[kPerLane], acc[kPerLane], m, l;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int d = lane + i * kWarpSize;
            q[i] = d < HD ? detail::to_float(qkv[static_cast<int64_t>(r) * ROW + h + d]) : 0.0f;
        }
        detail::warp_attend<HD>(q, qkv + k0, qkv + v0, ROW, start, end, scale, acc, m, l);
        bf16* out_row = out + static_cast<int64_t>(r) * OUT_COLS + h;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int d = lane + i * kWarpSize;
            if (d < HD) detail::store_element(out_row + d, end > start ? acc[i] / l : 0.0f);
        }
    }
}

inline constexpr int kMeanPoolSmemBytes = detail::kBlockSumSmemBytes;

// Sentences b0..b1-1: out[b] = mean of x rows spans[b] (zeros for an empty span), then
// with NORMALIZE divided by max(L2 norm, 1e-12). Sums are fp32; out is fp32 or bf16.
template <int H, bool NORMALIZE, typename OUT>
__device__ void mean_pool_task(const __nv_bfloat16* x, const int64_t* spans, OUT* out, int b0, int b1, char* smem) {
    static_assert(kMeanPoolSmemBytes <= kSmemBytes, "mean_pool scratch exceeds MPK_SMEM_BYTES");
    constexpr int kPerThread = (H + kThreads - 1) / kThreads;
    float* scratch = reinterpret_cast<float*>(smem);
    for (int b = b0; b < b1; ++b) {
        const int64_t start = spans[2 * b], end = spans[2 * b + 1];
        const float count = end > start ? static_cast<float>(end - start) : 1.0f;
        float means[kPerThread];
        float squares = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int c = threadIdx.x + i * kThreads;
            float sum = 0.0f;
            if (c < H) {
                for (int64_t r = start; r < end; ++r) sum += detail::to_float(x[r * H + c]);
            }
            means[i] = sum / count;
            squares += means[i] * means[i];
        }
        float scale = 1.0f;
        if constexpr (NORMALIZE) scale = 1.0f / fmaxf(sqrtf(detail::block_sum(squares, scratch)), 1e-12f);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < H) detail::store_element(out + static_cast<int64_t>(b) * H + c, means[i] * scale);
        }
    }
}

}  // namespace mpk::cuda
