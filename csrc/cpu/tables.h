// Per-row coefficients gathered from a schedule's table: the host half of every table-driven step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <diffcore/checks.h>

#include <optional>
#include <vector>

namespace diffcore::cpu {

// float32(table[t[r]]) for r < rows: `width` values per row from a (K,) (width 1) or (K, width)
// float64/float32 table. t: int64, numel 1 (broadcast) or rows; t outside [0, K) raises, or, with
// clamp_t, t >= K uses row K - 1 (DDRM). Without t the table has 1 row (broadcast) or `rows` rows.
inline std::vector<float> gather_rows(const at::Tensor& table, const std::optional<at::Tensor>& t,
                                      int64_t rows, int64_t width, bool clamp_t, const char* op) {
  TORCH_CHECK(width == 1 ? table.dim() == 1 : (table.dim() == 2 && table.size(1) == width), op,
              ": table must be ", width == 1 ? "(K,)" : "(K, " + std::to_string(width) + ")", ", got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kDouble || table.scalar_type() == at::kFloat, op,
              ": table must be float64 or float32, got ", table.scalar_type());
  TORCH_CHECK(table.size(0) >= 1, op, ": table is empty");
  // Read in the table's own dtype: a float32 schedule (DreamRec's) is not converted on every step.
  const at::Tensor tab = table.contiguous();
  const bool f64 = tab.scalar_type() == at::kDouble;
  const double* tp64 = f64 ? tab.const_data_ptr<double>() : nullptr;
  const float* tp32 = f64 ? nullptr : tab.const_data_ptr<float>();
  const auto at_ = [&](int64_t i) { return f64 ? static_cast<float>(tp64[i]) : tp32[i]; };
  const int64_t K = tab.size(0);
  std::vector<float> coef(static_cast<size_t>(width * rows));
  if (!t.has_value()) {
    TORCH_CHECK(K == 1 || K == rows, op, ": without t, table needs 1 or ", rows, " rows, got ", K);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) coef[width * r + c] = at_(width * (K == 1 ? 0 : r) + c);
    return coef;
  }
  TORCH_CHECK(t->scalar_type() == at::kLong, "t: expected an int64 tensor, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == 1 || t->numel() == rows, "t: expected ", rows,
              " timesteps (one per row) or 1, got ", t->numel());
  check_same_device(*t, table, "t", "the schedule");
  const at::Tensor tc = t->contiguous();
  const int64_t* ts = tc.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = tc.numel() == 1 ? 0 : r;
    int64_t k = ts[i];
    if (clamp_t && k >= K) k = K - 1;
    TORCH_CHECK(k >= 0 && k < K, "t: every timestep must lie in [0, ", K, "), got t[", i, "] = ", ts[i]);
    for (int64_t c = 0; c < width; ++c) coef[width * r + c] = at_(width * k + c);
  }
  return coef;
}

}  // namespace diffcore::cpu
