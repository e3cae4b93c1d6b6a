// diffusion family, CPU: the fused affine step behind q_sample, p_step and ddim_step.
//
//   f          = (1 + w) * model_out - w * uncond_out        (uncond_out optional: f = model_out)
//   out[r, :]  = a_r * x[r, :] + b_r * f[r, :] + c_r * z[r, :]
//   (a_r, b_r, c_r) = float32(table[t[r]])   (or table[r] / table[0] when t is not given)
//   z          = the given noise, or the Philox stream (seed, offset) at index r * N + j
//
// Compiled once per instruction set; the DEFAULT build also holds the op entry points.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "guided_step.h"
#include "philox_vec.h"

namespace diffcore::cpu {

// Raw views of the step's operands: (rows, cols) with unit column stride, row strides in elements.
struct StepOperands {
  int64_t rows = 0, cols = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* f = nullptr;  // model output; null for q_sample
  int64_t f_stride = 0;
  const void* u = nullptr;  // unconditional model output; null without guidance
  int64_t u_stride = 0;
  const void* noise = nullptr;  // given noise; null for seeded or noiseless steps
  int64_t noise_stride = 0;
  RowCoefficients coef;  // row r: a, b, c
  float guidance = 0.0f;
  bool seeded = false;
  uint64_t seed = 0, offset = 0;
};

inline namespace CPU_CAPABILITY {

// One row segment of n elements. ZT is the noise's element type (float for the Philox buffer).
template <typename T, typename ZT, bool kHasF, bool kHasU, bool kHasZ>
void step_segment(T* out, const T* x, const T* f, const T* u, const ZT* z, int64_t n, float a,
                  float b, float c, float w) {
  const FVec va(a), vb(b), vc(c), vw(w), vw1(1.0f + w);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    FVec x0, x1;
    load2(x + j, x0, x1);
    FVec r0 = va * x0, r1 = va * x1;
    if constexpr (kHasF) {
      FVec f0, f1;
      load2(f + j, f0, f1);
      if constexpr (kHasU) {
        FVec u0, u1;
        load2(u + j, u0, u1);
        f0 = vw1 * f0 - vw * u0;
        f1 = vw1 * f1 - vw * u1;
      }
      r0 = r0 + vb * f0;
      r1 = r1 + vb * f1;
    }
    if constexpr (kHasZ) {
      FVec z0, z1;
      load2(z + j, z0, z1);
      r0 = r0 + vc * z0;
      r1 = r1 + vc * z1;
    }
    store2(out + j, r0, r1);
  }
  for (; j < n; ++j) {
    float r = a * static_cast<float>(x[j]);
    if constexpr (kHasF) {
      float fv = static_cast<float>(f[j]);
      if constexpr (kHasU) fv = (1.0f + w) * fv - w * static_cast<float>(u[j]);
      r = r + b * fv;
    }
    if constexpr (kHasZ) r = r + c * static_cast<float>(z[j]);
    out[j] = static_cast<T>(r);
  }
}

// Picks the instantiation for the operands present; all share one signature.
template <typename T, typename ZT, bool kHasZ>
auto segment_fn(bool has_f, bool has_u) {
  using Fn = void (*)(T*, const T*, const T*, const T*, const ZT*, int64_t, float, float, float,
                      float);
  if (!has_f) return static_cast<Fn>(&step_segment<T, ZT, false, false, kHasZ>);
  if (!has_u) return static_cast<Fn>(&step_segment<T, ZT, true, false, kHasZ>);
  return static_cast<Fn>(&step_segment<T, ZT, true, true, kHasZ>);
}

void diffusion_step_kernel(const StepOperands& op, at::ScalarType dtype) {
  constexpr int64_t kBlock = 2048;  // elements of one row per task; the Philox buffer lives on the stack
  const int64_t blocks_per_row = (op.cols + kBlock - 1) / kBlock;
  const int64_t tasks = op.rows * blocks_per_row;
  // DreamRec's 256 x 64 runs on one thread given its noise, on two when it draws it.
  const int64_t grain = std::max<int64_t>(1, min_task_elements(op.seeded) / std::clamp<int64_t>(op.cols, 1, kBlock));
  DIFFCORE_DISPATCH_FEATURE_TYPES(dtype, "diffusion_step", [&] {
    using T = scalar_t;
    const bool has_f = op.f != nullptr, has_u = op.u != nullptr;
    const auto given = segment_fn<T, T, true>(has_f, has_u);
    const auto drawn = segment_fn<T, float, true>(has_f, has_u);
    const auto silent = segment_fn<T, T, false>(has_f, has_u);
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) float z[kBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / blocks_per_row;
        const int64_t j0 = (task % blocks_per_row) * kBlock;
        const int64_t n = std::min(kBlock, op.cols - j0);
        const float* cf = op.coef.row(r);
        const float a = cf[0], b = cf[1], c = cf[2];
        T* out = static_cast<T*>(op.out) + r * op.out_stride + j0;
        const T* x = static_cast<const T*>(op.x) + r * op.x_stride + j0;
        const T* f = has_f ? static_cast<const T*>(op.f) + r * op.f_stride + j0 : nullptr;
        const T* u = has_u ? static_cast<const T*>(op.u) + r * op.u_stride + j0 : nullptr;
        if (op.noise != nullptr && c != 0.0f) {
          const T* zn = static_cast<const T*>(op.noise) + r * op.noise_stride + j0;
          given(out, x, f, u, zn, n, a, b, c, op.guidance);
        } else if (op.seeded && c != 0.0f) {
          philox_normals(z, op.seed, op.offset, static_cast<uint64_t>(r * op.cols + j0), n);
          drawn(out, x, f, u, z, n, a, b, c, op.guidance);
        } else {
          silent(out, x, f, u, nullptr, n, a, b, c, op.guidance);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(void diffusion_step_kernel(const diffcore::cpu::StepOperands&, at::ScalarType))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

void run_step(const at::Tensor& x, const OptTensor& f, const OptTensor& f_uncond, double guidance,
              const OptTensor& t, const at::Tensor& table, const OptTensor& noise,
              std::optional<int64_t> seed, int64_t offset, bool clamp_t, const at::Tensor& out) {
  check_dim(x, 2, "x");
  check_float_dtype(x, "x");
  check_guided_step(x, f, f_uncond, guidance, noise, seed, offset, out, table, "x");
  const GuidedStepViews v = guided_step_views(x, f, f_uncond, noise, out);
  const TableRows coef = table_rows(table, t, x.size(0), 3, clamp_t, "diffusion_step");
  StepOperands op;
  bind_guided_step(op, v, coef, guidance, seed, offset);
  if (v.f) {
    op.f = v.f->data_ptr();
    op.f_stride = v.f->stride(0);
  }
  if (op.rows > 0 && op.cols > 0) DIFFCORE_ISA_CALL(diffusion_step_kernel, op, x.scalar_type());
  finish_guided_step(v, out);
}

at::Tensor diffusion_step(const at::Tensor& x, const OptTensor& f, const OptTensor& f_uncond,
                          double guidance, const OptTensor& t, const at::Tensor& table,
                          const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                          bool clamp_t) {
  at::Tensor out = empty_output(x.sizes(), x.options());
  run_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out);
  return out;
}

void diffusion_step_(at::Tensor& x, const OptTensor& f, const OptTensor& f_uncond, double guidance,
                     const OptTensor& t, const at::Tensor& table, const OptTensor& noise,
                     std::optional<int64_t> seed, int64_t offset, bool clamp_t) {
  run_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, x);
}

void diffusion_step_out(const at::Tensor& x, const OptTensor& f, const OptTensor& f_uncond,
                        double guidance, const OptTensor& t, const at::Tensor& table,
                        const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                        bool clamp_t, at::Tensor& out) {
  run_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out);
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("diffusion_step", &diffcore::cpu::diffusion_step);
  m.impl("diffusion_step_", &diffcore::cpu::diffusion_step_);
  m.impl("diffusion_step_out", &diffcore::cpu::diffusion_step_out);
}
#endif
