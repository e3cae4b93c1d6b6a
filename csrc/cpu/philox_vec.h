// The Philox normal stream (diffcore/philox.h), vectorised for the CPU kernels that draw noise.
//
// Included only by per-instruction-set kernel files, inside their CPU_CAPABILITY namespace, so each
// build gets its own copy. The AVX2 and AVX512 builds run kLanes Philox counters at once with
// 32x32->64 multiplies (vpmuludq) and the vector log and sincos below, written for the stream's
// arguments only (x in (0, 1], angles in [0, 2 pi)); the DEFAULT build runs the scalar definition.
// The values equal the scalar definition to about one ulp of log/sin/cos.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <diffcore/philox.h>

#include "vec_reduce.h"
#include "vec_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace diffcore::cpu {
inline namespace CPU_CAPABILITY {

using FVec = AVec<float>;
constexpr int64_t kLanes = FVec::size();

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// 32-bit lane operations of one instruction set, named once so the generator is written once.
#if defined(CPU_CAPABILITY_AVX512)
using UVec = __m512i;
inline UVec u_set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline UVec u_xor(UVec a, UVec b) { return _mm512_xor_si512(a, b); }
// The high and low words of the 32x32->64 products of every lane: one vpmuludq for the even
// lanes and one for the odd lanes (swapped into even position), no vpmulld; each word then moves
// to its lane with one masked shuffle, off the multiply port. Against vpmulld for the low words
// and shifts + blends for the high ones: randn of 400 x 94,949 in place 24.6-25.1 -> 20.2-21.6 ms
// (alternating processes, same values bit for bit).
inline void u_mulhilo(UVec a, UVec b, UVec& hi, UVec& lo) {
  const UVec even = _mm512_mul_epu32(a, b);
  const UVec odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), _mm512_shuffle_epi32(b, _MM_PERM_CDAB));
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);  // even lanes: even's high word
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);  // odd lanes: odd's low word
}
inline UVec u_counter_lo(uint64_t first) {  // low words of first + 0 .. 15
  return _mm512_add_epi32(u_set1(static_cast<uint32_t>(first)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline __m512 u_top24_to_float(UVec w) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)); }
inline UVec u_add(UVec a, UVec b) { return _mm512_add_epi32(a, b); }
inline UVec u_sub(UVec a, UVec b) { return _mm512_sub_epi32(a, b); }
inline UVec u_and(UVec a, UVec b) { return _mm512_and_si512(a, b); }
template <int n> inline UVec u_srai(UVec a) { return _mm512_srai_epi32(a, n); }
template <int n> inline UVec u_slli(UVec a) { return _mm512_slli_epi32(a, n); }
inline UVec f_bits(const FVec& x) { return _mm512_castps_si512(x); }
inline FVec bits_f(UVec a) { return _mm512_castsi512_ps(a); }
inline FVec u_to_float(UVec a) { return _mm512_cvtepi32_ps(a); }
inline UVec float_to_u(const FVec& x) { return _mm512_cvtps_epi32(x); }  // x integral
inline FVec select_odd(UVec q, const FVec& if_even, const FVec& if_odd) {
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(q, u_set1(1u)), if_even, if_odd);
}
// Stores element 4 l + k = z_k[l]: (z0, z1) and (z2, z3) interleave into pairs, pairs into quads
// (one per group, in 128-bit lanes holding groups l, l + 4, ...), then a 4x4 transpose of lanes.
inline void store_interleaved(float* out, __m512 z0, __m512 z1, __m512 z2, __m512 z3) {
  const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(z0, z1));
  const __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(z0, z1));
  const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(z2, z3));
  const __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(z2, z3));
  const __m512 q0 = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
  const __m512 q1 = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
  const __m512 q2 = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
  const __m512 q3 = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  const __m512 a = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 b = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 c = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 d = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
using UVec = __m256i;
inline UVec u_set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline UVec u_xor(UVec a, UVec b) { return _mm256_xor_si256(a, b); }
inline void u_mulhilo(UVec a, UVec b, UVec& hi, UVec& lo) {
  constexpr int kSwap = 0xB1;  // (1, 0, 3, 2): the two words of every 64-bit lane swapped
  const UVec even = _mm256_mul_epu32(a, b);
  const UVec odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, kSwap), _mm256_shuffle_epi32(b, kSwap));
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, kSwap), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, kSwap), 0xAA);
}
inline UVec u_counter_lo(uint64_t first) {  // low words of first + 0 .. 7
  return _mm256_add_epi32(u_set1(static_cast<uint32_t>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 u_top24_to_float(UVec w) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)); }
inline UVec u_add(UVec a, UVec b) { return _mm256_add_epi32(a, b); }
inline UVec u_sub(UVec a, UVec b) { return _mm256_sub_epi32(a, b); }
inline UVec u_and(UVec a, UVec b) { return _mm256_and_si256(a, b); }
template <int n> inline UVec u_srai(UVec a) { return _mm256_srai_epi32(a, n); }
template <int n> inline UVec u_slli(UVec a) { return _mm256_slli_epi32(a, n); }
inline UVec f_bits(const FVec& x) { return _mm256_castps_si256(x); }
inline FVec bits_f(UVec a) { return _mm256_castsi256_ps(a); }
inline FVec u_to_float(UVec a) { return _mm256_cvtepi32_ps(a); }
inline UVec float_to_u(const FVec& x) { return _mm256_cvtps_epi32(x); }  // x integral
inline FVec select_odd(UVec q, const FVec& if_even, const FVec& if_odd) {
  return _mm256_blendv_ps(if_even, if_odd, _mm256_castsi256_ps(u_slli<31>(q)));  // blendv reads the sign bit
}
inline void store_interleaved(float* out, __m256 z0, __m256 z1, __m256 z2, __m256 z3) {
  const __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(z0, z1));
  const __m256d t1 = _mm256_castps_pd(_mm256_unpackhi_ps(z0, z1));
  const __m256d t2 = _mm256_castps_pd(_mm256_unpacklo_ps(z2, z3));
  const __m256d t3 = _mm256_castps_pd(_mm256_unpackhi_ps(z2, z3));
  const __m256 q0 = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));
  const __m256 q1 = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
  const __m256 q2 = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
  const __m256 q3 = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(q0, q1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
}
#endif

// ln x for normal floats x in (0, 1] (the stream's log argument): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), then Cephes' logf polynomial in m - 1 and ln 2 split in two. Within
// 0.83 ulp of the exact log over every one of the 2^24 arguments the stream can produce (checked
// exhaustively against double); 2.3x faster than SLEEF's u10 log and sincos together here.
inline FVec vlog(const FVec& x) {
  const UVec sqrt_half = u_set1(0x3f3504f3u);
  const UVec t = u_sub(f_bits(x), sqrt_half);
  const FVec e = u_to_float(u_srai<23>(t));
  const FVec f = bits_f(u_add(u_and(t, u_set1(0x007fffffu)), sqrt_half)) - FVec(1.0f);
  const FVec z = f * f;
  FVec p(7.0376836292e-2f);
  for (const float coef : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                           -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    p = at::vec::fmadd(p, f, FVec(coef));
  }
  FVec y = f * z * p;
  y = at::vec::fmadd(e, FVec(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, FVec(-0.5f), y);
  return at::vec::fmadd(e, FVec(0.693359375f), f + y);
}

// sin and cos of angles in [0, 2 pi): the quadrant n = round(2 x / pi), x - n pi / 2 in two FMA
// steps (Cody-Waite), Cephes' sinf / cosf polynomials on [-pi/4, pi/4], then swap and signs by
// quadrant. Absolute error under 7.2e-8 over every angle the stream can produce.
inline void vsincos(const FVec& a, FVec& s, FVec& c) {
  const FVec n = (a * FVec(0.636619772367581343f)).round();
  const UVec q = float_to_u(n);
  FVec x = at::vec::fmadd(n, FVec(-1.57079637050628662109375f), a);
  x = at::vec::fmadd(n, FVec(4.37113900018624283e-8f), x);
  const FVec z = x * x;
  FVec ps = at::vec::fmadd(FVec(-1.9515295891e-4f), z, FVec(8.3321608736e-3f));
  ps = at::vec::fmadd(ps, z, FVec(-1.6666654611e-1f));
  const FVec sin_x = at::vec::fmadd(ps * z, x, x);
  FVec pc = at::vec::fmadd(FVec(2.443315711809948e-5f), z, FVec(-1.388731625493765e-3f));
  pc = at::vec::fmadd(pc, z, FVec(4.166664568298827e-2f));
  pc = at::vec::fmadd(pc, z, FVec(-0.5f));
  const FVec cos_x = at::vec::fmadd(pc, z, FVec(1.0f));
  // sin a = (sin x, cos x, -sin x, -cos x)[n % 4], cos a = (cos x, -sin x, -cos x, sin x)[n % 4].
  const UVec two = u_set1(2u);
  s = bits_f(u_xor(f_bits(select_odd(q, sin_x, cos_x)), u_slli<30>(u_and(q, two))));
  c = bits_f(u_xor(f_bits(select_odd(q, cos_x, sin_x)), u_slli<30>(u_and(u_add(q, u_set1(1u)), two))));
}

// The Philox words of the counters offset + g0 .. offset + g0 + kLanes - 1, one counter per lane.
inline void philox_words(uint64_t seed, uint64_t offset, uint64_t g0, UVec& w0, UVec& w1, UVec& w2, UVec& w3) {
  const uint64_t first = offset + g0;
  UVec x0 = u_counter_lo(first);
  UVec x1;
  // The high word is constant over the lanes unless the low word wraps inside the batch.
  if (static_cast<uint32_t>(first) <= 0xFFFFFFFFu - static_cast<uint32_t>(kLanes - 1)) {
    x1 = u_set1(static_cast<uint32_t>(first >> 32));
  } else {
    alignas(64) uint32_t lo[kLanes], hi[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t c = first + static_cast<uint64_t>(l);
      lo[l] = static_cast<uint32_t>(c);
      hi[l] = static_cast<uint32_t>(c >> 32);
    }
    std::memcpy(&x0, lo, sizeof(x0));
    std::memcpy(&x1, hi, sizeof(x1));
  }
  UVec x2 = u_set1(0u), x3 = u_set1(0u);
  const UVec m0 = u_set1(kPhiloxM0), m1 = u_set1(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    UVec hi0, lo0, hi1, lo1;
    u_mulhilo(x0, m0, hi0, lo0);
    u_mulhilo(x2, m1, hi1, lo1);
    x0 = u_xor(u_xor(hi1, x1), u_set1(k0));
    x1 = lo1;
    x2 = u_xor(u_xor(hi0, x3), u_set1(k1));
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  w0 = x0;
  w1 = x1;
  w2 = x2;
  w3 = x3;
}

// Writes the 4 * kLanes normals of the groups g0 .. g0 + kLanes - 1 (elements 4 g0 .. ) to out.
inline void philox_normal_groups(float* out, uint64_t seed, uint64_t offset, uint64_t g0) {
  UVec x0, x1, x2, x3;
  philox_words(seed, offset, g0, x0, x1, x2, x3);
  const FVec half(0.5f), scale(kTwoPow24Inv), minus_two(-2.0f), two_pi_scale(kTwoPi * kTwoPow24Inv);
  const FVec r01 = (minus_two * vlog((FVec(u_top24_to_float(x0)) + half) * scale)).sqrt();
  const FVec r23 = (minus_two * vlog((FVec(u_top24_to_float(x2)) + half) * scale)).sqrt();
  FVec s1, c1, s3, c3;
  vsincos(FVec(u_top24_to_float(x1)) * two_pi_scale, s1, c1);
  vsincos(FVec(u_top24_to_float(x3)) * two_pi_scale, s3, c3);
  store_interleaved(out, r01 * c1, r01 * s1, r23 * c3, r23 * s3);
}
#else
// Portable build: the scalar definition, group by group.
inline void philox_normal_groups(float* out, uint64_t seed, uint64_t offset, uint64_t g0) {
  for (int64_t k = 0; k < 4 * kLanes; ++k) out[k] = philox_normal(seed, offset, 4 * g0 + static_cast<uint64_t>(k));
}
#endif

// Elements a thread should take at least: ~32K for a memory-bound pass (below that, waking a second
// thread costs more than the pass), ~4K when the pass draws Philox noise (about 1 ns per element).
inline int64_t min_task_elements(bool seeded) { return seeded ? 4096 : 32768; }

// Writes elements first .. first + n - 1 of a stream made in groups of 4 per counter:
// groups(buf, seed, offset, g0) writes the 4 * kLanes elements of the groups g0 .. g0 + kLanes - 1.
template <typename T, typename Groups>
inline void philox_stream(T* out, uint64_t seed, uint64_t offset, uint64_t first, int64_t n, Groups groups) {
  constexpr int64_t kBatch = 4 * kLanes;
  alignas(64) T tmp[kBatch];
  uint64_t i = first;
  const uint64_t end = first + static_cast<uint64_t>(n);
  while (i < end) {
    const uint64_t g = i / 4;
    const int64_t skip = static_cast<int64_t>(i - 4 * g);
    const int64_t take = std::min<int64_t>(kBatch - skip, static_cast<int64_t>(end - i));
    if (skip == 0 && take == kBatch) {
      groups(out, seed, offset, g);
    } else {
      groups(tmp, seed, offset, g);
      for (int64_t k = 0; k < take; ++k) out[k] = tmp[skip + k];
    }
    out += take;
    i += static_cast<uint64_t>(take);
  }
}

// Writes the normals of logical elements first .. first + n - 1 of stream (seed, offset) to out.
inline void philox_normals(float* out, uint64_t seed, uint64_t offset, uint64_t first, int64_t n) {
  philox_stream(out, seed, offset, first, n, philox_normal_groups);
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu
