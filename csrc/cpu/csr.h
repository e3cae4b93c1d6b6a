// CSR operators shared by the CPU kernels of the sparse and linalg families: the raw view the
// kernels read, and (in the op entry build) the checked construction of that view and the split
// of rows among threads by work.
//
//   A_hat[r, c] = rs[r] * v[e] * cs[c]       (rs, v, cs each optional: ones; e indexes row r's
//                                             nonzeros, whose column indices are col[crow[r] ..])
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <diffcore/checks.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace diffcore::cpu {

// A CSR operator (rows x cols) and its optional scalings, all float32.
struct CsrView {
  int64_t rows = 0, cols = 0;
  const int64_t* crow = nullptr;  // (rows + 1,)
  const void* col = nullptr;      // (nnz,) int32 or int64
  bool col32 = true;
  const float* val = nullptr;        // (nnz,) or null: ones
  const float* row_scale = nullptr;  // (rows,) or null: ones
  const float* col_scale = nullptr;  // (cols,) or null: ones
  const int64_t* parts = nullptr;    // (num_parts + 1,) row bounds of equal work
  int64_t num_parts = 1;
};

#if defined(DIFFCORE_CPU_ENTRY)
namespace csr {

using OptTensor = std::optional<at::Tensor>;

// A row of output costs about as much as this many gathered rows (it is written, and in
// propagate also read and written in the combine).
constexpr int64_t kRowCost = 2;
// Below this many multiply-adds one thread does the whole product.
constexpr int64_t kSerialWork = 1 << 16;

// An optional (n,) float32 vector on the device of `ref`.
inline void check_vector(const OptTensor& t, int64_t n, const char* name, const at::Tensor& ref,
                         const char* ref_name) {
  if (!t) return;
  check_dim(*t, 1, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, ": expected float32, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == n, name, ": expected ", n, " entries, got ", t->numel());
  check_same_device(*t, ref, name, ref_name);
}

// The CSR arrays of an operator with `cols` columns, checked (values included: crow must run
// from 0 to nnz without decreasing; column indices are checked as they are read). `ref` (named
// `ref_name`) is the tensor whose device every array must share. Values must be float32 here; a
// caller that takes other value dtypes passes std::nullopt and checks its values itself.
inline CsrView csr_view(const at::Tensor& crow, const at::Tensor& col, const OptTensor& values,
                        const OptTensor& row_scale, const OptTensor& col_scale, int64_t cols,
                        const at::Tensor& ref, const char* ref_name) {
  check_dim(crow, 1, "crow");
  check_dim(col, 1, "col");
  TORCH_CHECK(crow.scalar_type() == at::kLong, "crow: expected int64 row pointers, got ",
              crow.scalar_type());
  TORCH_CHECK(col.scalar_type() == at::kInt || col.scalar_type() == at::kLong,
              "col: expected int32 or int64 column indices, got ", col.scalar_type());
  TORCH_CHECK(crow.numel() >= 1, "crow: expected rows + 1 >= 1 entries, got none");
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous(), "crow, col: expected contiguous tensors");
  check_same_device(crow, ref, "crow", ref_name);
  check_same_device(col, ref, "col", ref_name);
  CsrView a;
  a.rows = crow.numel() - 1;
  a.cols = cols;
  a.crow = crow.data_ptr<int64_t>();
  a.col = col.data_ptr();
  a.col32 = col.scalar_type() == at::kInt;
  const int64_t nnz = col.numel();
  TORCH_CHECK(a.crow[0] == 0 && a.crow[a.rows] == nnz, "crow: expected row pointers from 0 to nnz = ",
              nnz, ", got ", a.crow[0], " .. ", a.crow[a.rows]);
  for (int64_t r = 0; r < a.rows; ++r) {
    TORCH_CHECK(a.crow[r] <= a.crow[r + 1], "crow: row pointers must not decrease, crow[", r,
                "] = ", a.crow[r], " > crow[", r + 1, "] = ", a.crow[r + 1]);
  }
  check_vector(values, nnz, "values", ref, ref_name);
  check_vector(row_scale, a.rows, "row_scale", ref, ref_name);
  check_vector(col_scale, a.cols, "col_scale", ref, ref_name);
  for (const auto* t : {&values, &row_scale, &col_scale}) {
    TORCH_CHECK(!t->has_value() || (*t)->is_contiguous(), "values, row_scale, col_scale: expected contiguous tensors");
  }
  a.val = values ? values->data_ptr<float>() : nullptr;
  a.row_scale = row_scale ? row_scale->data_ptr<float>() : nullptr;
  a.col_scale = col_scale ? col_scale->data_ptr<float>() : nullptr;
  return a;
}

// The operator whose right-hand side is x (cols = x.size(0)).
inline CsrView csr_view(const at::Tensor& crow, const at::Tensor& col, const OptTensor& values,
                        const OptTensor& row_scale, const OptTensor& col_scale, const at::Tensor& x) {
  return csr_view(crow, col, values, row_scale, col_scale, x.size(0), x, "x");
}

// Row bounds of at most one part per thread, of equal cost crow[r] + kRowCost * r (d: the width
// of a row of output, for the serial cut-off).
inline std::vector<int64_t> row_parts(const CsrView& a, int64_t d) {
  const int64_t total = a.crow[a.rows] + kRowCost * a.rows;
  int64_t parts = std::max<int64_t>(1, at::get_num_threads());
  if (total * std::max<int64_t>(d, 1) < kSerialWork) parts = 1;
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1), a.rows);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total / parts * p;
    int64_t lo = bounds[p - 1], hi = a.rows;  // first r with cost(r) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.crow[mid] + kRowCost * mid < target) lo = mid + 1; else hi = mid;
    }
    bounds[p] = lo;
  }
  return bounds;
}

}  // namespace csr
#endif  // DIFFCORE_CPU_ENTRY

}  // namespace diffcore::cpu
