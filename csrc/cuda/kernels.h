/* The C ABI of diffcore's CUDA kernels (csrc/cuda/<family>.cu).
 *
 * Plain C, no CUDA or torch headers: the kernels are plain CUDA compiled by nvcc alone, and the
 * torch binding (binding.cpp) calls them through these declarations. Each function launches on the
 * given stream (a cudaStream_t passed as void*; NULL is the legacy default stream), does not
 * synchronise, and returns a cudaError_t code (0 = cudaSuccess).
 */
#ifndef DIFFCORE_CUDA_KERNELS_H_
#define DIFFCORE_CUDA_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of the feature tensors the kernels read and write. */
enum diffcore_cuda_dtype {
  DIFFCORE_CUDA_FLOAT32 = 0,
  DIFFCORE_CUDA_FLOAT16 = 1,
  DIFFCORE_CUDA_BFLOAT16 = 2
};

/* random family (random.cu): out[i] = element i of the Philox normal stream (seed, offset), for
 * i in [0, n), as DESIGN.md "Noise" defines it; out is contiguous, n elements of type `dtype`
 * (any alignment). Consumes counters offset .. offset + ceil(n / 4) - 1. n == 0 launches nothing;
 * n < 0 or an unknown dtype returns cudaErrorInvalidValue. */
int diffcore_cuda_random_normal(void* out, int dtype, int64_t n, uint64_t seed, uint64_t offset,
                                void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DIFFCORE_CUDA_KERNELS_H_ */
