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
#include <array>
#include <cmath>
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
// kStream: out is written with non-temporal stores (aligned; see stream2). The vector and scalar
// paths fuse the same products, so an element's value does not depend on which path (hence on
// the output's alignment) computes it.
template <typename T, typename ZT, bool kHasF, bool kHasU, bool kHasZ, bool kStream>
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
        f0 = at::vec::fmsub(vw1, f0, vw * u0);
        f1 = at::vec::fmsub(vw1, f1, vw * u1);
      }
      r0 = at::vec::fmadd(vb, f0, r0);
      r1 = at::vec::fmadd(vb, f1, r1);
    }
    if constexpr (kHasZ) {
      FVec z0, z1;
      load2(z + j, z0, z1);
      r0 = at::vec::fmadd(vc, z0, r0);
      r1 = at::vec::fmadd(vc, z1, r1);
    }
    write2<kStream>(out + j, r0, r1);
  }
  for (; j < n; ++j) {
    float r = a * static_cast<float>(x[j]);
    if constexpr (kHasF) {
      float fv = static_cast<float>(f[j]);
      if constexpr (kHasU) fv = std::fma(1.0f + w, fv, -(w * static_cast<float>(u[j])));
      r = std::fma(b, fv, r);
    }
    if constexpr (kHasZ) r = std::fma(c, static_cast<float>(z[j]), r);
    out[j] = static_cast<T>(r);
  }
}

template <typename T, typename ZT>
using SegmentFn = void (*)(T*, const T*, const T*, const T*, const ZT*, int64_t, float, float, float, float);

// Picks the instantiation for the operands present; [0]: plain stores, [1]: streamed.
template <typename T, typename ZT, bool kHasZ>
std::array<SegmentFn<T, ZT>, 2> segment_fns(bool has_f, bool has_u) {
  if (!has_f) return {&step_segment<T, ZT, false, false, kHasZ, false>, &step_segment<T, ZT, false, false, kHasZ, true>};
  if (!has_u) return {&step_segment<T, ZT, true, false, kHasZ, false>, &step_segment<T, ZT, true, false, kHasZ, true>};
  return {&step_segment<T, ZT, true, true, kHasZ, false>, &step_segment<T, ZT, true, true, kHasZ, true>};
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
    const auto given = segment_fns<T, T, true>(has_f, has_u);
    const auto drawn = segment_fns<T, float, true>(has_f, has_u);
    const auto silent = segment_fns<T, T, false>(has_f, has_u);
    // A large output apart from x is streamed (stream_output): DiffRec's allocating p_step on
    // 400 x 94,949 took 22.2-22.9 ms with plain stores and 18.0-18.6 ms streamed given noise,
    // 36.6-37.1 and 32.0-32.4 ms seeded (alternating processes).
    const bool stream = stream_output<T>(op.out, op.x, op.rows * op.cols * static_cast<int64_t>(sizeof(T)));
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
        const auto run = [&](const auto& fn, const auto* zr) {
          stream_parts(stream, out, n, [&](auto streamed, int64_t j, int64_t m) {
            fn[streamed](out + j, x + j, has_f ? f + j : nullptr, has_u ? u + j : nullptr, zr ? zr + j : zr, m, a,
                         b, c, op.guidance);
          });
        };
        if (op.noise != nullptr && c != 0.0f) {
          run(given, static_cast<const T*>(op.noise) + r * op.noise_stride + j0);
        } else if (op.seeded && c != 0.0f) {
          philox_normals(z, op.seed, op.offset, static_cast<uint64_t>(r * op.cols + j0), n);
          run(drawn, static_cast<const float*>(z));
        } else {
          run(silent, static_cast<const T*>(nullptr));
        }
      }
      if (stream) stream_fence();
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
