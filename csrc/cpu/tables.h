// Per-row coefficients gathered from a schedule's table: the host half of every table-driven step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <diffcore/checks.h>

#include <optional>
#include <vector>

namespace diffcore::cpu {

// coef[r] = float32(tab[k(r)]) (`width` values per row), k(r) = ts[i] (clamped to K - 1 with
// clamp_t) or, without ts, i; i = 0 when `one`, else r.
template <int64_t width, typename S>
void copy_table_rows(float* coef, const S* tab, int64_t K, int64_t rows, const int64_t* ts, bool one, bool clamp_t) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = one ? 0 : r;
    int64_t k = i;
    if (ts != nullptr) {
      k = ts[i];
      if (clamp_t && k >= K) k = K - 1;
      TORCH_CHECK(k >= 0 && k < K, "t: every timestep must lie in [0, ", K, "), got t[", i, "] = ", ts[i]);
    }
    for (int64_t c = 0; c < width; ++c) coef[width * r + c] = static_cast<float>(tab[width * k + c]);
  }
}

// float32(table[t[r]]) for r < rows: `width` (a constant, so the copy unrolls) values per row from a (K,) (width 1) or (K, width)
// float64/float32 table. t: int64, numel 1 (broadcast) or rows; t outside [0, K) raises, or, with
// clamp_t, t >= K uses row K - 1 (DDRM). Without t the table has 1 row (broadcast) or `rows` rows.
template <int64_t width>
std::vector<float> gather_rows(const at::Tensor& table, const std::optional<at::Tensor>& t, int64_t rows,
                               bool clamp_t, const char* op) {
  TORCH_CHECK(width == 1 ? table.dim() == 1 : (table.dim() == 2 && table.size(1) == width), op,
              ": table must be ", width == 1 ? "(K,)" : "(K, " + std::to_string(width) + ")", ", got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kDouble || table.scalar_type() == at::kFloat, op,
              ": table must be float64 or float32, got ", table.scalar_type());
  TORCH_CHECK(table.size(0) >= 1, op, ": table is empty");
  const at::Tensor tab = table.contiguous();
  const int64_t K = tab.size(0);
  at::Tensor tc;  // t, contiguous
  if (t.has_value()) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "t: expected an int64 tensor, got ", t->scalar_type());
    TORCH_CHECK(t->numel() == 1 || t->numel() == rows, "t: expected ", rows,
                " timesteps (one per row) or 1, got ", t->numel());
    check_same_device(*t, table, "t", "the schedule");
    tc = t->contiguous();
  } else {
    TORCH_CHECK(K == 1 || K == rows, op, ": without t, table needs 1 or ", rows, " rows, got ", K);
  }
  const int64_t* ts = tc.defined() ? tc.const_data_ptr<int64_t>() : nullptr;
  const bool one = ts != nullptr ? tc.numel() == 1 : K == 1;  // every row reads the same table row
  std::vector<float> coef(static_cast<size_t>(width * rows));
  // Read in the table's own dtype: a float32 schedule (DreamRec's) is not converted on every step.
  if (tab.scalar_type() == at::kDouble) {
    copy_table_rows<width>(coef.data(), tab.const_data_ptr<double>(), K, rows, ts, one, clamp_t);
  } else {
    copy_table_rows<width>(coef.data(), tab.const_data_ptr<float>(), K, rows, ts, one, clamp_t);
  }
  return coef;
}

}  // namespace diffcore::cpu
