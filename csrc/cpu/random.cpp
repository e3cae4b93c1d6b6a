// random family, CPU: the Philox normal stream written into a tensor (diffcore.random.randn).
// Compiled once per instruction set; the DEFAULT build also holds the op entry point.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

#include "philox_vec.h"

namespace diffcore::cpu {
inline namespace CPU_CAPABILITY {

// out: contiguous, n elements; element i gets the stream's normal i.
void random_normal_kernel(const at::Tensor& out, uint64_t seed, uint64_t offset) {
  constexpr int64_t kChunk = 1024;  // a multiple of 4: every chunk starts on a counter boundary
  DIFFCORE_DISPATCH_FEATURE_TYPES(out.scalar_type(), "random_normal", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 16 * kChunk, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kChunk];
      for (int64_t i = begin; i < end; i += kChunk) {
        const int64_t n = std::min(kChunk, end - i);
        float* dst = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(data + i) : buf;
        philox_normals(dst, seed, offset, static_cast<uint64_t>(i), n);
        if constexpr (!std::is_same_v<scalar_t, float>) {
          for (int64_t k = 0; k < n; ++k) data[i + k] = static_cast<scalar_t>(buf[k]);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(void random_normal_kernel(const at::Tensor&, uint64_t, uint64_t))

namespace diffcore::cpu {

void random_normal_(at::Tensor& out, int64_t seed, int64_t offset) {
  check_float_dtype(out, "randn: out");
  TORCH_CHECK(offset >= 0, "randn: offset must be non-negative, got ", offset);
  at::Tensor dst = out.is_contiguous() ? out : out.contiguous();
  DIFFCORE_ISA_CALL(random_normal_kernel, dst, static_cast<uint64_t>(seed),
                    static_cast<uint64_t>(offset));
  if (!dst.is_same(out)) out.copy_(dst);
}

// randn's allocating form, for every device (it has no tensor argument to dispatch on): a CPU
// output comes from the block pool (memory.h), so a loop that draws and frees a large noise tensor
// reuses one block instead of faulting in fresh pages; then random_normal_ of that device fills it.
at::Tensor random_normal(c10::SymIntArrayRef size, int64_t seed, int64_t offset, at::ScalarType dtype,
                         at::Device device) {
  const at::TensorOptions options = at::TensorOptions().dtype(dtype).device(device);
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(size);
  at::Tensor out = empty_output(sizes, options);  // pooled on the CPU, at::empty elsewhere
  static const auto fill = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("diffcore::random_normal_", "")
                               .typed<void(at::Tensor&, int64_t, int64_t)>();
  fill.call(out, seed, offset);
  return out;
}

}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("random_normal_", &diffcore::cpu::random_normal_);
}

TORCH_LIBRARY_IMPL(diffcore, CompositeExplicitAutograd, m) {
  m.impl("random_normal", &diffcore::cpu::random_normal);
}
#endif
