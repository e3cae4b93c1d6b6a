// Per-row coefficients read from a schedule's table: the host half of every table-driven step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <diffcore/checks.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace diffcore::cpu {

// What a kernel reads: row r's `width` float32 coefficients are table row min(i(r), last), with
// i(r) = t[r * step] when t is given, else r * step (step 0: every row reads row 0). No per-row
// copy is made: a 65,536-row sphere p_step gathered 786 KB of coefficients into a fresh vector on
// one thread before; its gap to a hand-written loop over the same tensors (out=, 1.24-1.30 ms) fell
// from 0.18-0.20 to 0.14-0.15 ms (alternating processes).
struct RowCoefficients {
  const float* table = nullptr;  // (K, width)
  const int64_t* t = nullptr;
  int64_t step = 0, last = 0, width = 0;

  const float* row(int64_t r) const {
    const int64_t i = t != nullptr ? t[r * step] : r * step;
    return table + width * std::min(i, last);
  }
};

// The host side: the table as float32 and t, alive while a kernel reads them through view().
struct TableRows {
  std::vector<float> table;
  at::Tensor t;  // int64, contiguous; undefined without t
  int64_t step = 0, width = 0;

  RowCoefficients view() const {
    const int64_t K = static_cast<int64_t>(table.size()) / width;
    return {table.data(), t.defined() ? t.const_data_ptr<int64_t>() : nullptr, step, K - 1, width};
  }
};

// Row r reads table[t[r]]: `width` values per row from a (K,) (width 1) or (K, width) float64 or
// float32 table. t: int64, numel 1 (broadcast) or rows; t outside [0, K) raises, or, with clamp_t,
// t >= K reads row K - 1 (DDRM). Without t the table has 1 row (broadcast) or `rows` rows.
inline TableRows table_rows(const at::Tensor& table, const std::optional<at::Tensor>& t, int64_t rows,
                            int64_t width, bool clamp_t, const char* op) {
  TORCH_CHECK(width == 1 ? table.dim() == 1 : (table.dim() == 2 && table.size(1) == width), op,
              ": table must be ", width == 1 ? "(K,)" : "(K, " + std::to_string(width) + ")", ", got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kDouble || table.scalar_type() == at::kFloat, op,
              ": table must be float64 or float32, got ", table.scalar_type());
  const int64_t K = table.size(0);
  TORCH_CHECK(K >= 1, op, ": table is empty");
  TableRows out;
  out.width = width;
  // Read in the table's own dtype: a float32 schedule (DreamRec's) is copied, not converted.
  const at::Tensor tab = table.contiguous();
  if (tab.scalar_type() == at::kDouble) {
    const double* p = tab.const_data_ptr<double>();
    out.table.assign(p, p + K * width);
  } else {
    const float* p = tab.const_data_ptr<float>();
    out.table.assign(p, p + K * width);
  }
  if (!t.has_value()) {
    TORCH_CHECK(K == 1 || K == rows, op, ": without t, table needs 1 or ", rows, " rows, got ", K);
    out.step = K == 1 ? 0 : 1;
    return out;
  }
  TORCH_CHECK(t->scalar_type() == at::kLong, "t: expected an int64 tensor, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == 1 || t->numel() == rows, "t: expected ", rows,
              " timesteps (one per row) or 1, got ", t->numel());
  check_same_device(*t, table, "t", "the schedule");
  out.t = t->contiguous();
  out.step = out.t.numel() == 1 ? 0 : 1;
  const int64_t* ts = out.t.const_data_ptr<int64_t>();
  const int64_t n = out.t.numel();
  int64_t lo = n > 0 ? ts[0] : 0, hi = lo;
  for (int64_t i = 0; i < n; ++i) {  // vectorised; the first offender is looked up only on failure
    lo = std::min(lo, ts[i]);
    hi = std::max(hi, ts[i]);
  }
  if (lo < 0 || (!clamp_t && hi >= K)) {
    int64_t i = 0;
    while (ts[i] >= 0 && (clamp_t || ts[i] < K)) ++i;
    TORCH_CHECK(false, "t: every timestep must lie in [0, ", K, "), got t[", i, "] = ", ts[i]);
  }
  return out;
}

}  // namespace diffcore::cpu
