// Argument checks shared by the C++ kernels. Shape and dtype checks also live in Python (where
// they give the friendliest message); these guard direct torch.ops calls and the checks that need
// tensor values, which must live in the kernel so a compiled graph does not break on them.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace diffcore {

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              name, ": expected float32, float16 or bfloat16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (the shape of ",
              ref_name, "), got ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (the device of ", ref_name, "), got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(),
              "-D with shape ", t.sizes());
}

}  // namespace diffcore

// AT_DISPATCH over the three feature dtypes diffcore accepts (float32, float16, bfloat16).
#define DIFFCORE_DISPATCH_FEATURE_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace diffcore {

// `t` must have `ref`'s device, dtype and shape.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_same_device(t, ref, name, ref_name);
  check_same_dtype(t, ref, name, ref_name);
  check_same_shape(t, ref, name, ref_name);
}

// A tensor a kernel writes must give each element its own memory: an expanded (stride-0) view
// would have several rows write one location. name: the argument as the caller knows it.
inline void check_no_internal_overlap(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              ": more than one of its elements refers to the same memory location (an expanded view?); "
              "write into a tensor that owns its elements, e.g. a .clone()");
}

// A tensor an op writes: like x, and no two of its elements share memory. t is x itself when the
// op runs in place, and is then named x_name.
inline void check_written(const at::Tensor& t, const at::Tensor& x, const char* name, const char* x_name) {
  check_like(t, x, name, x_name);
  check_no_internal_overlap(t, t.is_same(x) ? x_name : name);
}

// t, or a contiguous copy of it when it shares memory with `out` other than element for element.
// The row kernels read each row of their operands before they write that row of out, so an
// operand laid out exactly as out (x itself in place, a denoiser that returns its input) is safe;
// a shifted or expanded view of out (a denoiser output that repeats one row of its input) would
// be overwritten before it is read.
inline at::Tensor apart_from(const at::Tensor& t, const at::Tensor& out) {
  const at::MemOverlapStatus s = at::get_overlap_status(t, out);
  return s == at::MemOverlapStatus::Partial || s == at::MemOverlapStatus::TooHard
             ? t.clone(at::MemoryFormat::Contiguous)
             : t;
}

// A 2-D operand with unit column stride: the tensor itself, or a contiguous copy.
inline at::Tensor unit_cols(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace diffcore
