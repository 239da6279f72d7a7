// SIMD abstraction of the CPU task kernels: one float vector type `Vec` with kWidth lanes
// and the few operations the kernels need, implemented once per instruction set.
//
// Path selection, first match wins:
//   MPK_FORCE_SCALAR defined             -> scalar (kWidth 1, no intrinsics)
//   __AVX512F__ and not MPK_FORCE_AVX2   -> AVX-512 (kWidth 16)
//   __AVX2__ and __FMA__                 -> AVX2 + FMA (kWidth 8)
//   otherwise                            -> scalar
// MPK_FORCE_AVX2 on a compiler without AVX2 and FMA enabled falls through to scalar.
// The choice is per translation unit, so every object linked into one binary must be
// compiled with the same macros (the kernels are inline templates, and mixing paths
// would break the one-definition rule).
//
// Partial loads and stores (`load_partial`, `store_partial`) touch only the first n
// elements, so tails at the end of a buffer never read or write past it.

#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(MPK_FORCE_SCALAR)
#define MPK_SIMD_SCALAR 1
#elif defined(__AVX512F__) && !defined(MPK_FORCE_AVX2)
#define MPK_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define MPK_SIMD_AVX2 1
#else
#define MPK_SIMD_SCALAR 1
#endif

#if defined(MPK_SIMD_AVX512) || defined(MPK_SIMD_AVX2)
// GCC 12's AVX-512 intrinsics build their don't-care operands from self-initialized
// variables, which -Wall falsely reports as uninitialized at every inlined use. GCC
// applies warning pragmas by source location, so ignoring the warning over the include
// silences those reports and no others.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

namespace mpk {

// A bfloat16 value: the upper 16 bits of an IEEE float32, stored as raw bits.
struct bf16 {
    uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be exactly 16 bits so weight arrays can be reinterpreted");

inline float to_float(bf16 value) { return std::bit_cast<float>(static_cast<uint32_t>(value.bits) << 16); }
inline float to_float(float value) { return value; }

namespace cpu::simd {

// Hint to fetch the cache line holding p into all cache levels; p need not be valid
// memory. __builtin_prefetch is a GCC and Clang builtin, available on every path.
inline void prefetch(const void* p) { __builtin_prefetch(p); }

#if defined(MPK_SIMD_AVX512)

inline constexpr int kWidth = 16;
inline constexpr const char* kPath = "avx512";

struct Vec {
    __m512 v;
};
using Mask = __mmask16;

inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec broadcast(float a) { return {_mm512_set1_ps(a)}; }
inline Vec iota() { return {_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}; }

inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec widen_bf16(__m256i bits) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))}; }
inline Vec load(const bf16* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Lanes n..15 are zero.
inline Vec load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_lanes(n), p)}; }
inline Vec load_partial(const bf16* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return widen_bf16(_mm256_maskz_loadu_epi16(first_lanes(n), p));
#else
    uint16_t bits[kWidth] = {};
    std::memcpy(bits, p, sizeof(uint16_t) * n);
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits)));
#endif
}

inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline void store_partial(float* p, Vec a, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), a.v); }

inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
// a * b + c with one rounding.
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
// Like the SSE min/max instructions, these return b when either operand is NaN.
inline Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }

inline Mask greater(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
// Lanes of a where the mask is set, else lanes of b.
inline Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }

inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }

// e^x, by x = n ln2 + r with |r| <= ln2/2, a degree-7 Taylor polynomial for e^r and an
// exact scaling by 2^n. Max relative error 7.6e-8 (about 1.3 ulp) measured over
// [-87, 88]; tests/test_cpu_kernels.py asserts < 1.5e-7. x above 88.73 gives +inf,
// results below FLT_MIN are denormal as in std::exp (within 2^-148 of exact), x below
// about -104 gives 0, and NaN stays NaN.
inline Vec exp(Vec x) {
    // min/max return their second operand on NaN, so NaN inputs pass through the clamp.
    __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-110.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x.v));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Cody-Waite: ln2_hi has few significant bits, so n * ln2_hi is exact for |n| < 256.
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    // scalef computes p * 2^n with correct overflow to inf and gradual underflow.
    return {_mm512_scalef_ps(p, n)};
}

#elif defined(MPK_SIMD_AVX2)

inline constexpr int kWidth = 8;
inline constexpr const char* kPath = "avx2";

struct Vec {
    __m256 v;
};
using Mask = __m256;

// All-ones in lanes 0..n-1, zero elsewhere: the mask format of vmaskmovps.
inline __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline Vec zero() { return {_mm256_setzero_ps()}; }
inline Vec broadcast(float a) { return {_mm256_set1_ps(a)}; }
inline Vec iota() { return {_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)}; }

inline Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec widen_bf16(__m128i bits) { return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16))}; }
inline Vec load(const bf16* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Lanes n..7 are zero. AVX2 has no masked 16-bit load, so a bf16 tail goes through a
// zeroed stack buffer.
inline Vec load_partial(const float* p, int n) { return {_mm256_maskload_ps(p, first_lanes(n))}; }
inline Vec load_partial(const bf16* p, int n) {
    uint16_t bits[kWidth] = {};
    std::memcpy(bits, p, sizeof(uint16_t) * n);
    return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits)));
}

inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline void store_partial(float* p, Vec a, int n) { _mm256_maskstore_ps(p, first_lanes(n), a.v); }

inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }

inline Mask greater(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
inline Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }

inline float reduce_add(Vec a) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

// e^x with the same reduction, polynomial and measured error as the AVX-512 path.
// Without scalef, 2^n is applied as 2^(n/2) * 2^(n - n/2) so that
// both factors are normal floats for every clamped n in [-159, 129]; the two exact
// multiplications then overflow to inf or underflow to denormals like std::exp.
inline Vec exp(Vec x) {
    __m256 clamped = _mm256_max_ps(_mm256_set1_ps(-110.0f), _mm256_min_ps(_mm256_set1_ps(89.0f), x.v));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i whole = _mm256_cvtps_epi32(n);
    __m256i low = _mm256_srai_epi32(whole, 1);
    __m256i high = _mm256_sub_epi32(whole, low);
    __m256i bias = _mm256_set1_epi32(127);
    __m256 scale_low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(low, bias), 23));
    __m256 scale_high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(high, bias), 23));
    return {_mm256_mul_ps(_mm256_mul_ps(p, scale_low), scale_high)};
}

#else  // scalar

inline constexpr int kWidth = 1;
inline constexpr const char* kPath = "scalar";

struct Vec {
    float v;
};
using Mask = bool;

inline Vec zero() { return {0.0f}; }
inline Vec broadcast(float a) { return {a}; }
inline Vec iota() { return {0.0f}; }

inline Vec load(const float* p) { return {*p}; }
inline Vec load(const bf16* p) { return {to_float(*p)}; }
// With one lane, n is 0 or 1.
inline Vec load_partial(const float* p, int n) { return {n > 0 ? *p : 0.0f}; }
inline Vec load_partial(const bf16* p, int n) { return {n > 0 ? to_float(*p) : 0.0f}; }

inline void store(float* p, Vec a) { *p = a.v; }
inline void store_partial(float* p, Vec a, int n) {
    if (n > 0) *p = a.v;
}

inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
// Plain multiply-add: std::fma would be a slow library call on CPUs without FMA, which
// are the ones that get this path. The compiler may still contract it into one FMA.
inline Vec fmadd(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
inline Vec min(Vec a, Vec b) { return {a.v < b.v ? a.v : b.v}; }
inline Vec max(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }

inline Mask greater(Vec a, Vec b) { return a.v > b.v; }
inline Vec select(Mask m, Vec a, Vec b) { return m ? a : b; }

inline float reduce_add(Vec a) { return a.v; }

// The scalar path uses the C library's exp, so it has no approximation of its own.
inline Vec exp(Vec x) { return {std::exp(x.v)}; }

#endif

}  // namespace cpu::simd
}  // namespace mpk
