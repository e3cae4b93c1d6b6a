// Philox4x32-10 and the normal stream every diffcore backend draws from.
//
// The stream (DESIGN.md, "Noise"), identical in C++, CUDA, Triton and the PyTorch reference:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (c0, c1, 0, 0) with c0/c1 the low/high words of the 64-bit (offset + i / 4),
//             where i is the element's row-major index in the op's logical output shape;
//   words   = Philox4x32-10(key, counter) -> w0, w1, w2, w3;
//   u(w)    = ((w >> 8) + 0.5) * 2^-24      (log argument, never 0)
//   v(w)    = (w >> 8) * 2^-24              (angle)
//   z0, z1  = sqrt(-2 ln u(w0)) * (cos 2 pi v(w1), sin 2 pi v(w1))
//   z2, z3  = sqrt(-2 ln u(w2)) * (cos 2 pi v(w3), sin 2 pi v(w3))
//   element i takes z_(i % 4).
// This header is plain C++ (host and device), with no torch dependency, so nvcc compiles it alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DIFFCORE_HD __host__ __device__ __forceinline__
#else
#define DIFFCORE_HD inline
#endif

namespace diffcore {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24

struct PhiloxWords {
  uint32_t w[4];
};

// Philox4x32 with 10 rounds on counter (c0, c1, 0, 0) and key (k0, k1).
DIFFCORE_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t x0 = c0, x1 = c1, x2 = 0u, x3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * x0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * x2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    x0 = hi1 ^ x1 ^ k0;
    x1 = lo1;
    x2 = hi0 ^ x3 ^ k1;
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxWords{{x0, x1, x2, x3}};
}

DIFFCORE_HD float philox_log_arg(uint32_t w) {
  return (static_cast<float>(w >> 8) + 0.5f) * kTwoPow24Inv;
}

DIFFCORE_HD float philox_angle(uint32_t w) {
  return static_cast<float>(w >> 8) * kTwoPow24Inv;
}

// The normal of logical element `i` of the stream (seed, offset): the scalar definition, used by
// tails and by the CUDA kernel. Vector code must reproduce it.
DIFFCORE_HD float philox_normal(uint64_t seed, uint64_t offset, uint64_t i) {
  const uint64_t counter = offset + i / 4;
  const PhiloxWords r = philox4x32_10(static_cast<uint32_t>(counter),
                                      static_cast<uint32_t>(counter >> 32),
                                      static_cast<uint32_t>(seed),
                                      static_cast<uint32_t>(seed >> 32));
  const int lane = static_cast<int>(i % 4);
  const uint32_t wu = r.w[lane < 2 ? 0 : 2];
  const uint32_t wv = r.w[lane < 2 ? 1 : 3];
#if defined(__CUDACC__)
  const float radius = sqrtf(-2.0f * logf(philox_log_arg(wu)));
  float s, c;
  sincosf(kTwoPi * philox_angle(wv), &s, &c);
#else
  const float radius = __builtin_sqrtf(-2.0f * __builtin_logf(philox_log_arg(wu)));
  const float angle = kTwoPi * philox_angle(wv);
  const float s = __builtin_sinf(angle), c = __builtin_cosf(angle);
#endif
  return radius * ((lane % 2 == 0) ? c : s);
}

}  // namespace diffcore
