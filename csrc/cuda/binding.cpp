// The torch binding of the CUDA kernels (csrc/cuda/*.cu, reached through the C ABI in kernels.h):
// argument checks, the current device and stream, and TORCH_LIBRARY_IMPL(diffcore, CUDA, m).
// Built into diffcore._C only when torch itself has CUDA (CMakeLists.txt, DIFFCORE_WITH_CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <diffcore/checks.h>

#include "kernels.h"

namespace diffcore::cuda {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DIFFCORE_CUDA_FLOAT32;
    case at::kHalf:
      return DIFFCORE_CUDA_FLOAT16;
    case at::kBFloat16:
      return DIFFCORE_CUDA_BFLOAT16;
    default:
      TORCH_CHECK(false, "diffcore CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

// Raises torch's usual CUDA error for a cudaError_t code returned through the C ABI.
void check_launch(int code) { C10_CUDA_CHECK(static_cast<cudaError_t>(code)); }

// random_normal_(Tensor(a!) out, int seed, int offset) -> ()
void random_normal_(at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.is_cuda(), "randn: out must be a CUDA tensor, got one on ", out.device());
  check_float_dtype(out, "randn: out");
  TORCH_CHECK(offset >= 0, "randn: offset must be non-negative, got ", offset);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  // Element i of the stream goes to the i-th element in row-major order, whatever out's strides:
  // a non-contiguous out is filled through a contiguous temporary.
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  check_launch(diffcore_cuda_random_normal(dst.data_ptr(), dtype_code(dst), dst.numel(),
                                           static_cast<uint64_t>(seed),
                                           static_cast<uint64_t>(offset),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  if (!dst.is_same(out)) out.copy_(dst);
}

}  // namespace
}  // namespace diffcore::cuda

TORCH_LIBRARY_IMPL(diffcore, CUDA, m) {
  m.impl("random_normal_", &diffcore::cuda::random_normal_);
}
