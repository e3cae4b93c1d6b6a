// random family, CUDA: the Philox normal stream written into a contiguous buffer
// (diffcore.random.randn on CUDA tensors). Plain CUDA behind the C ABI in kernels.h; the torch
// binding is binding.cpp.
//
// One thread computes one counter group g: one Philox4x32-10 call gives elements 4g .. 4g + 3
// (DESIGN.md "Noise"), written with one vector store when the buffer is aligned for it. Threads
// walk the groups in a grid-stride loop, so the values never depend on the launch shape. The
// per-group code is __host__ __device__, so the indexing and stores can be checked on a host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include <diffcore/philox.h>

#include "kernels.h"

namespace diffcore::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // 2048 resident threads per SM on sm_80 / sm_90

struct Normal4 {
  float z[4];
};

// Elements 4 * group .. 4 * group + 3 of the stream (seed, offset), from one Philox call: lane by
// lane the same expressions as philox_normal (philox.h), so the values equal it bit for bit.
__host__ __device__ __forceinline__ Normal4 philox_normal4(uint64_t seed, uint64_t offset,
                                                           uint64_t group) {
  const uint64_t counter = offset + group;
  const PhiloxWords r = philox4x32_10(static_cast<uint32_t>(counter),
                                      static_cast<uint32_t>(counter >> 32),
                                      static_cast<uint32_t>(seed),
                                      static_cast<uint32_t>(seed >> 32));
  const float radius01 = sqrtf(-2.0f * logf(philox_log_arg(r.w[0])));
  const float radius23 = sqrtf(-2.0f * logf(philox_log_arg(r.w[2])));
  float s1, c1, s3, c3;
  sincosf(kTwoPi * philox_angle(r.w[1]), &s1, &c1);
  sincosf(kTwoPi * philox_angle(r.w[3]), &s3, &c3);
  return Normal4{{radius01 * c1, radius01 * s1, radius23 * c3, radius23 * s3}};
}

// Storage types: one element, and four elements in one (8- or 16-byte) vector store.
__host__ __device__ __forceinline__ void store1(float* p, float z) { *p = z; }
__host__ __device__ __forceinline__ void store1(__half* p, float z) { *p = __float2half_rn(z); }
__host__ __device__ __forceinline__ void store1(__nv_bfloat16* p, float z) {
  *p = __float2bfloat16_rn(z);
}

// The 32 bits of a pair of 16-bit values, so four of them go out as one 8-byte store.
template <typename Pair>
__host__ __device__ __forceinline__ uint32_t bits_of(const Pair& pair) {
  static_assert(sizeof(Pair) == sizeof(uint32_t), "a pair of 16-bit values");
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

__host__ __device__ __forceinline__ void store4(float* p, const Normal4& v) {
  *reinterpret_cast<float4*>(p) = make_float4(v.z[0], v.z[1], v.z[2], v.z[3]);
}
__host__ __device__ __forceinline__ void store4(__half* p, const Normal4& v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bits_of(__floats2half2_rn(v.z[0], v.z[1])),
                                            bits_of(__floats2half2_rn(v.z[2], v.z[3])));
}
__host__ __device__ __forceinline__ void store4(__nv_bfloat16* p, const Normal4& v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bits_of(__floats2bfloat162_rn(v.z[0], v.z[1])),
                                            bits_of(__floats2bfloat162_rn(v.z[2], v.z[3])));
}

// Writes the elements of counter group `group` that lie in out[0, n). kVector: out is aligned to
// 4 elements, so a whole group is one vector store.
template <typename T, bool kVector>
__host__ __device__ __forceinline__ void fill_group(T* __restrict__ out, int64_t n, int64_t group,
                                                    uint64_t seed, uint64_t offset) {
  const Normal4 v = philox_normal4(seed, offset, static_cast<uint64_t>(group));
  const int64_t first = 4 * group;
  if (kVector && n - first >= 4) {
    store4(out + first, v);
    return;
  }
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    if (first + lane < n) store1(out + first + lane, v.z[lane]);
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    random_normal_kernel(T* __restrict__ out, int64_t n, int64_t groups, uint64_t seed,
                         uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       group < groups; group += stride) {
    fill_group<T, kVector>(out, n, group, seed, offset);
  }
}

template <typename T>
cudaError_t launch_random_normal(void* data, int64_t n, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream) {
  const int64_t groups = n / 4 + (n % 4 != 0);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t wanted = (groups + kThreads - 1) / kThreads;
  const int64_t resident = static_cast<int64_t>(sms) * kBlocksPerSm;
  const unsigned blocks = static_cast<unsigned>(wanted < resident ? wanted : resident);
  T* out = static_cast<T*>(data);
  if (reinterpret_cast<uintptr_t>(data) % (4 * sizeof(T)) == 0) {
    random_normal_kernel<T, true><<<blocks, kThreads, 0, stream>>>(out, n, groups, seed, offset);
  } else {
    random_normal_kernel<T, false><<<blocks, kThreads, 0, stream>>>(out, n, groups, seed, offset);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace diffcore::cuda

extern "C" int diffcore_cuda_random_normal(void* out, int dtype, int64_t n, uint64_t seed,
                                           uint64_t offset, void* stream) {
  using namespace diffcore::cuda;
  if (n < 0 || (n > 0 && out == nullptr)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DIFFCORE_CUDA_FLOAT32:
      return launch_random_normal<float>(out, n, seed, offset, s);
    case DIFFCORE_CUDA_FLOAT16:
      return launch_random_normal<__half>(out, n, seed, offset, s);
    case DIFFCORE_CUDA_BFLOAT16:
      return launch_random_normal<__nv_bfloat16>(out, n, seed, offset, s);
    default:
      return cudaErrorInvalidValue;
  }
}
