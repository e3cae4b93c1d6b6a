// The Philox normal stream (diffcore/philox.h), vectorised for the CPU kernels.
//
// Included only by per-instruction-set kernel files, inside their CPU_CAPABILITY namespace, so each
// build gets its own copy. Counters are computed a vector of lanes at a time (the 32x32->64
// multiplies auto-vectorise to vpmuludq), and log/sin/cos go through at::vec, which calls SLEEF's
// vector functions in the AVX2 and AVX512 builds. The values equal the scalar definition to a few
// ulp of log/sin/cos.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <diffcore/philox.h>

#include <algorithm>
#include <cstdint>

namespace diffcore::cpu {
inline namespace CPU_CAPABILITY {

using FVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = FVec::size();

// Writes the 4 * kLanes normals of the groups g0 .. g0 + kLanes - 1 (elements 4 g0 .. ) to out.
inline void philox_normal_groups(float* out, uint64_t seed, uint64_t offset, uint64_t g0) {
  alignas(64) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t counter = offset + g0 + static_cast<uint64_t>(l);
    x0[l] = static_cast<uint32_t>(counter);
    x1[l] = static_cast<uint32_t>(counter >> 32);
    x2[l] = 0u;
    x3[l] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * x0[l];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * x2[l];
      const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1[l] ^ k0;
      const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3[l] ^ k1;
      x1[l] = static_cast<uint32_t>(p1);
      x3[l] = static_cast<uint32_t>(p0);
      x0[l] = y0;
      x2[l] = y2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  alignas(64) float u01[kLanes], v1[kLanes], u23[kLanes], v3[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    u01[l] = static_cast<float>(static_cast<int32_t>(x0[l] >> 8));
    v1[l] = static_cast<float>(static_cast<int32_t>(x1[l] >> 8));
    u23[l] = static_cast<float>(static_cast<int32_t>(x2[l] >> 8));
    v3[l] = static_cast<float>(static_cast<int32_t>(x3[l] >> 8));
  }
  const FVec half(0.5f), scale(kTwoPow24Inv), minus_two(-2.0f), two_pi_scale(kTwoPi * kTwoPow24Inv);
  const FVec r01 = (minus_two * ((FVec::loadu(u01) + half) * scale).log()).sqrt();
  const FVec r23 = (minus_two * ((FVec::loadu(u23) + half) * scale).log()).sqrt();
  const FVec a1 = FVec::loadu(v1) * two_pi_scale;
  const FVec a3 = FVec::loadu(v3) * two_pi_scale;
  alignas(64) float z0[kLanes], z1[kLanes], z2[kLanes], z3[kLanes];
  (r01 * a1.cos()).store(z0);
  (r01 * a1.sin()).store(z1);
  (r23 * a3.cos()).store(z2);
  (r23 * a3.sin()).store(z3);
  for (int64_t l = 0; l < kLanes; ++l) {
    out[4 * l + 0] = z0[l];
    out[4 * l + 1] = z1[l];
    out[4 * l + 2] = z2[l];
    out[4 * l + 3] = z3[l];
  }
}

// Writes the normals of logical elements first .. first + n - 1 of stream (seed, offset) to out.
inline void philox_normals(float* out, uint64_t seed, uint64_t offset, uint64_t first, int64_t n) {
  constexpr int64_t kBatch = 4 * kLanes;
  alignas(64) float tmp[kBatch];
  uint64_t i = first;
  const uint64_t end = first + static_cast<uint64_t>(n);
  while (i < end) {
    const uint64_t g = i / 4;
    const uint64_t batch_first = 4 * g;
    const int64_t skip = static_cast<int64_t>(i - batch_first);
    const int64_t take = std::min<int64_t>(kBatch - skip, static_cast<int64_t>(end - i));
    if (skip == 0 && take == kBatch) {
      philox_normal_groups(out, seed, offset, g);
    } else {
      philox_normal_groups(tmp, seed, offset, g);
      for (int64_t k = 0; k < take; ++k) out[k] = tmp[skip + k];
    }
    out += take;
    i += static_cast<uint64_t>(take);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu
