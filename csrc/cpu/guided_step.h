// The host half of the guided elementwise steps, diffusion_step and sphere_p_step: their argument
// checks and the unit-column-stride views their kernels read and write. Both kernels' operand
// structs name the shared fields alike (out, x, u, noise, coef, guidance, seed, ...).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <diffcore/checks.h>

#include "tables.h"

#include <optional>

namespace diffcore::cpu {

// x's rows: model output f, unconditional output u (guidance), noise z; out or a scratch tensor.
struct GuidedStepViews {
  at::Tensor x, out;
  std::optional<at::Tensor> f, u, z;
};

// The checks every guided step makes; x_name names x in the messages.
inline void check_guided_step(const at::Tensor& x, const std::optional<at::Tensor>& f,
                              const std::optional<at::Tensor>& f_uncond, double guidance,
                              const std::optional<at::Tensor>& noise, const std::optional<int64_t>& seed,
                              int64_t offset, const at::Tensor& out, const at::Tensor& table, const char* x_name) {
  if (f) check_like(*f, x, "model_out", x_name);
  if (f_uncond) {
    TORCH_CHECK(f.has_value(), "uncond_out: given without model_out");
    check_like(*f_uncond, x, "uncond_out", x_name);
  }
  TORCH_CHECK(guidance == 0.0 || f_uncond.has_value(), "guidance_scale: a non-zero scale needs uncond_out");
  if (noise) check_like(*noise, x, "noise", x_name);
  TORCH_CHECK(!(noise && seed), "noise and seed: give one, not both");
  TORCH_CHECK(offset >= 0, "offset: must be non-negative, got ", offset);
  check_written(out, x, "out", x_name);
  check_same_device(table, x, "table", x_name);
}

// Unit-column-stride views (the tensors themselves when they have one) of operands that do not
// alias out (apart_from, checks.h); finish_guided_step copies a scratch output back.
inline GuidedStepViews guided_step_views(const at::Tensor& x, const std::optional<at::Tensor>& f,
                                         const std::optional<at::Tensor>& f_uncond,
                                         const std::optional<at::Tensor>& noise, const at::Tensor& out) {
  GuidedStepViews v;
  v.x = unit_cols(apart_from(x, out));
  if (f) v.f = unit_cols(apart_from(*f, out));
  if (f_uncond) v.u = unit_cols(apart_from(*f_uncond, out));
  if (noise) v.z = unit_cols(apart_from(*noise, out));
  v.out = out.stride(1) == 1 ? out : at::empty(out.sizes(), out.options());
  return v;
}

// The fields both operand structs share, from the views, the per-row coefficients and the noise.
template <typename Op>
void bind_guided_step(Op& op, const GuidedStepViews& v, const TableRows& coef, double guidance,
                      const std::optional<int64_t>& seed, int64_t offset) {
  op.rows = v.x.size(0);
  op.cols = v.x.size(1);
  op.out = v.out.data_ptr();
  op.out_stride = v.out.stride(0);
  op.x = v.x.data_ptr();
  op.x_stride = v.x.stride(0);
  if (v.u) {
    op.u = v.u->data_ptr();
    op.u_stride = v.u->stride(0);
  }
  if (v.z) {
    op.noise = v.z->data_ptr();
    op.noise_stride = v.z->stride(0);
  }
  op.coef = coef.view();
  op.guidance = static_cast<decltype(op.guidance)>(guidance);  // sphere: double, for float64 rows
  op.seeded = seed.has_value();
  op.seed = static_cast<uint64_t>(seed.value_or(0));
  op.offset = static_cast<uint64_t>(offset);
}

inline void finish_guided_step(const GuidedStepViews& v, const at::Tensor& out) {
  if (!v.out.is_same(out)) out.copy_(v.out);
}

}  // namespace diffcore::cpu
