// sde family, CPU: the fused step behind the score-SDE predictors and the Langevin corrector.
//
//   (a, b, c, k) = coef[r] (or coef[0] for all rows)     float64 or float32 rows
//   s            = k * score
//   g            = 1, or with snr: snr * mean_r ||z_r|| / mean_r ||s_r||          (pass 1)
//   x_mean[r, :] = a x[r, :] + b g^2 s[r, :]                                      (pass 2)
//   out[r, :]    = x_mean[r, :] + c g z[r, :]
//   z            = the given noise, or the Philox stream (seed, offset) at index r * N + j, or none
//
// Pass 1 (the Langevin corrector only) sums per-row norms over fixed chunks of rows and then sums
// the chunks in order, so g does not depend on the thread count. Seeded noise is not stored: pass 1
// takes its norms from the Philox words (the Box-Muller radii, no sin/cos) and pass 2 draws it.
// After pass 1, pass 2 walks each thread's rows last to first: the score and noise rows pass 1
// read last are the ones still in cache (a 65,536 x 128 corrector + predictor step in place with
// given noise, plus a copy resetting x: 12.3-12.7 -> 11.4-11.9 ms in an in-process A/B here).
// Pass 2 has no reduction, so the order changes no value.
// Compiled once per instruction set; the DEFAULT build also holds the op entry points.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "philox_vec.h"

namespace diffcore::cpu {

// Raw views of the step's operands: (rows, cols) with unit column stride, row strides in elements.
struct SdeOperands {
  int64_t rows = 0, cols = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
  void* mean = nullptr;  // x_mean; null when it is not written
  int64_t mean_stride = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* s = nullptr;  // score (or noise prediction; k converts it)
  int64_t s_stride = 0;
  const void* noise = nullptr;  // given noise; null for seeded or noiseless steps
  int64_t noise_stride = 0;
  const float* coef = nullptr;  // pass 2: rows of (a, b k g^2, c g); coef_stride 0 (one row) or 3
  int64_t coef_stride = 0;
  const double* abs_k = nullptr;  // pass 1: |k| per row; abs_k_stride 0 (one value) or 1
  int64_t abs_k_stride = 0;
  bool seeded = false;
  uint64_t seed = 0, offset = 0;
  bool reverse = false;  // pass 2 walks each thread's tasks last to first (set after pass 1)
};

// Pass 1's result: sum over rows of ||z_r|| and of |k_r| ||score_r||.
struct NormSums {
  double z = 0.0, s = 0.0;
};

inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 2048;  // elements of one row per task / per Philox buffer

// Sum of squares of n elements, in float lanes, then the lanes (lane_sum) and the tail in double.
template <typename T>
double sum_squares(const T* p, int64_t n) {
  FVec acc0(0.0f), acc1(0.0f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    FVec v0, v1;
    load2(p + j, v0, v1);
    acc0 = at::vec::fmadd(v0, v0, acc0);
    acc1 = at::vec::fmadd(v1, v1, acc1);
  }
  double total = lane_sum(acc0 + acc1);
  for (; j < n; ++j) {
    const double v = static_cast<float>(p[j]);
    total += v * v;
  }
  return total;
}

// The squared norm of the normals of logical elements first .. first + n - 1 of stream (seed,
// offset), without drawing them: the two normals of a Box-Muller pair share their radius, so a whole
// group of four contributes z0^2 + z1^2 + z2^2 + z3^2 = -2 (ln u(w0) + ln u(w2)) (no sin/cos); only
// the partial groups at the ends are drawn. Equals the sum of the drawn squares to float rounding.
inline float philox_group_sum_squares(uint64_t seed, uint64_t offset, uint64_t g) {
  const uint64_t counter = offset + g;
  const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                                      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return -2.0f * (std::log(philox_log_arg(w.w[0])) + std::log(philox_log_arg(w.w[2])));
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The group sums of groups g0 .. g0 + kLanes - 1, one per lane: philox_normal_groups (philox_vec.h)
// up to its logs.
inline FVec philox_groups_sum_squares(uint64_t seed, uint64_t offset, uint64_t g0) {
  UVec x0, x1, x2, x3;
  philox_words(seed, offset, g0, x0, x1, x2, x3);
  const FVec half(0.5f), scale(kTwoPow24Inv), minus_two(-2.0f);
  const FVec l0 = vlog((FVec(u_top24_to_float(x0)) + half) * scale);
  const FVec l2 = vlog((FVec(u_top24_to_float(x2)) + half) * scale);
  return minus_two * (l0 + l2);
}
#endif

double philox_sum_squares(uint64_t seed, uint64_t offset, uint64_t first, int64_t n) {
  const uint64_t end = first + static_cast<uint64_t>(n);
  double total = 0.0;
  uint64_t i = first;
  for (; i < end && i % 4 != 0; ++i) {
    const double v = philox_normal(seed, offset, i);
    total += v * v;
  }
  uint64_t g = i / 4;
  const uint64_t g_end = std::max(g, end / 4);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  FVec acc(0.0f);
  for (; g + kLanes <= g_end; g += kLanes) acc = acc + philox_groups_sum_squares(seed, offset, g);
  total += lane_sum(acc);
#endif
  for (; g < g_end; ++g) total += philox_group_sum_squares(seed, offset, g);
  for (i = std::max(i, 4 * g_end); i < end; ++i) {
    const double v = philox_normal(seed, offset, i);
    total += v * v;
  }
  return total;
}

// One row segment of n elements: x_mean = a x + b s, out = x_mean + c z. ZT: the noise's type.
// kStream: out and mean are written with non-temporal stores (both aligned; see stream2). The
// vector and scalar paths fuse the same products, so an element's value does not depend on which
// path (hence on the outputs' alignment) computes it.
template <typename T, typename ZT, bool kHasZ, bool kHasMean, bool kStream>
void step_segment(T* out, T* mean, const T* x, const T* s, const ZT* z, int64_t n, float a, float b,
                  float c) {
  const FVec va(a), vb(b), vc(c);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    FVec x0, x1, s0, s1;
    load2(x + j, x0, x1);
    load2(s + j, s0, s1);
    const FVec m0 = at::vec::fmadd(vb, s0, va * x0), m1 = at::vec::fmadd(vb, s1, va * x1);
    if constexpr (kHasMean) write2<kStream>(mean + j, m0, m1);
    if constexpr (kHasZ) {
      FVec z0, z1;
      load2(z + j, z0, z1);
      write2<kStream>(out + j, at::vec::fmadd(vc, z0, m0), at::vec::fmadd(vc, z1, m1));
    } else {
      write2<kStream>(out + j, m0, m1);
    }
  }
  for (; j < n; ++j) {
    const float m = std::fma(b, static_cast<float>(s[j]), a * static_cast<float>(x[j]));
    if constexpr (kHasMean) mean[j] = static_cast<T>(m);
    if constexpr (kHasZ) {
      out[j] = static_cast<T>(std::fma(c, static_cast<float>(z[j]), m));
    } else {
      out[j] = static_cast<T>(m);
    }
  }
}

template <typename T, typename ZT>
using SegmentFn = void (*)(T*, T*, const T*, const T*, const ZT*, int64_t, float, float, float);

// [0]: plain stores, [1]: streamed.
template <typename T, typename ZT, bool kHasZ>
std::array<SegmentFn<T, ZT>, 2> segment_fns(bool has_mean) {
  if (has_mean) return {&step_segment<T, ZT, kHasZ, true, false>, &step_segment<T, ZT, kHasZ, true, true>};
  return {&step_segment<T, ZT, kHasZ, false, false>, &step_segment<T, ZT, kHasZ, false, true>};
}

}  // namespace

NormSums sde_norm_sums_kernel(const SdeOperands& op, at::ScalarType dtype) {
  // Chunks of whole rows, fixed by the shape alone; each chunk's sums run in row order, then the
  // chunks are summed in order: the same result on any number of threads.
  constexpr int64_t kChunkElements = 16384;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / op.cols);
  const int64_t chunks = (op.rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t grain = std::max<int64_t>(1, 4 * kChunkElements / (rows_per_chunk * op.cols));
  std::vector<double> partial(static_cast<size_t>(2 * chunks), 0.0);
  DIFFCORE_DISPATCH_FEATURE_TYPES(dtype, "sde_step", [&] {
    using T = scalar_t;
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t chunk_end = std::min(op.rows, (chunk + 1) * rows_per_chunk);
        double z_sum = 0.0, s_sum = 0.0;
        for (int64_t r = chunk * rows_per_chunk; r < chunk_end; ++r) {
          const T* s = static_cast<const T*>(op.s) + r * op.s_stride;
          s_sum += op.abs_k[r * op.abs_k_stride] * std::sqrt(sum_squares(s, op.cols));
          double zz = 0.0;
          if (op.noise != nullptr) {
            zz = sum_squares(static_cast<const T*>(op.noise) + r * op.noise_stride, op.cols);
          } else if (op.seeded) {
            zz = philox_sum_squares(op.seed, op.offset, static_cast<uint64_t>(r * op.cols), op.cols);
          }
          z_sum += std::sqrt(zz);
        }
        partial[2 * chunk] = z_sum;
        partial[2 * chunk + 1] = s_sum;
      }
    });
  });
  NormSums sums;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    sums.z += partial[2 * chunk];
    sums.s += partial[2 * chunk + 1];
  }
  return sums;
}

// Rows per unit of work: short rows are taken in groups whose Philox indices r * N + j are
// contiguous, so seeded noise is drawn kBlock at a time however short the rows are.
inline int64_t rows_per_group(int64_t cols) { return cols >= kBlock ? 1 : kBlock / cols; }

void sde_step_kernel(const SdeOperands& op, at::ScalarType dtype) {
  // A task is one block of kBlock columns of one row, or a group of whole short rows.
  const int64_t group = rows_per_group(op.cols);
  const int64_t col_blocks = group > 1 ? 1 : (op.cols + kBlock - 1) / kBlock;
  const int64_t tasks = (op.rows + group - 1) / group * col_blocks;
  const int64_t grain = std::max<int64_t>(1, min_task_elements(op.seeded) / (group * std::min(kBlock, op.cols)));
  DIFFCORE_DISPATCH_FEATURE_TYPES(dtype, "sde_step", [&] {
    using T = scalar_t;
    const bool has_mean = op.mean != nullptr;
    // Large outputs apart from x are streamed (stream_output): the allocating corrector +
    // predictor on 65,536 x 128 float32 with given noise took 17.1-17.8 ms with plain stores and
    // 10.4-12.1 ms streamed (alternating processes); streaming in place was slower (8.6-9.5 ->
    // 10.3-10.7 ms).
    const bool stream = stream_output<T>(op.out, op.x,
                                         op.rows * op.cols * static_cast<int64_t>(sizeof(T)) * (has_mean ? 2 : 1));
    const auto given = segment_fns<T, T, true>(has_mean);
    const auto drawn = segment_fns<T, float, true>(has_mean);
    const auto silent = segment_fns<T, T, false>(has_mean);
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) float z[kBlock];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t task = op.reverse ? end - 1 - (i - begin) : i;
        const int64_t r0 = task / col_blocks * group;
        const int64_t r1 = std::min(op.rows, r0 + group);
        const int64_t j0 = (task % col_blocks) * kBlock;
        const int64_t n = std::min(kBlock, op.cols - j0);
        bool draw = false;
        for (int64_t r = r0; op.seeded && r < r1 && !draw; ++r) draw = op.coef[r * op.coef_stride + 2] != 0.0f;
        if (draw) philox_normals(z, op.seed, op.offset, static_cast<uint64_t>(r0 * op.cols + j0), (r1 - r0) * n);
        for (int64_t r = r0; r < r1; ++r) {
          const float* cf = op.coef + r * op.coef_stride;
          const float a = cf[0], b = cf[1], c = cf[2];
          T* out = static_cast<T*>(op.out) + r * op.out_stride + j0;
          T* mean = has_mean ? static_cast<T*>(op.mean) + r * op.mean_stride + j0 : nullptr;
          const T* x = static_cast<const T*>(op.x) + r * op.x_stride + j0;
          const T* s = static_cast<const T*>(op.s) + r * op.s_stride + j0;
          const auto run = [&](const auto& fn, const auto* zr) {
            const auto part = [&](auto streamed, int64_t j, int64_t m) {
              fn[streamed](out + j, mean ? mean + j : nullptr, x + j, s + j, zr ? zr + j : zr, m, a, b, c);
            };
            stream_parts(stream, out, n, part, static_cast<const T*>(mean));
          };
          if (op.noise != nullptr && c != 0.0f) {
            run(given, static_cast<const T*>(op.noise) + r * op.noise_stride + j0);
          } else if (op.seeded && c != 0.0f) {
            run(drawn, static_cast<const float*>(z + (r - r0) * n));
          } else {
            run(silent, static_cast<const T*>(nullptr));
          }
        }
      }
      if (stream) stream_fence();
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(diffcore::cpu::NormSums sde_norm_sums_kernel(const diffcore::cpu::SdeOperands&,
                                                                  at::ScalarType))
DIFFCORE_ISA_DECLARE(void sde_step_kernel(const diffcore::cpu::SdeOperands&, at::ScalarType))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

// A written operand with unit column stride: the tensor itself, or a scratch tensor copied back.
at::Tensor unit_cols_out(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : at::empty(t.sizes(), t.options());
}

void run_sde_step(const at::Tensor& x, const at::Tensor& score, const at::Tensor& coef,
                  const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                  std::optional<double> snr, const at::Tensor& out, const OptTensor& mean_out) {
  check_dim(x, 2, "x");
  check_float_dtype(x, "x");
  check_like(score, x, "score", "x");
  if (noise) check_like(*noise, x, "noise", "x");
  TORCH_CHECK(!(noise && seed), "noise and seed: give one, not both");
  TORCH_CHECK(offset >= 0, "offset: must be non-negative, got ", offset);
  TORCH_CHECK(!snr || (*snr > 0.0 && std::isfinite(*snr)), "snr: expected snr > 0, got ", snr.value_or(0.0));
  check_written(out, x, "out", "x");
  if (mean_out) {
    check_written(*mean_out, x, "mean_out", "x");
    const at::MemOverlapStatus s = at::get_overlap_status(*mean_out, out);
    TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial,
                "mean_out: must not share memory with ", out.is_same(x) ? "x (written in place)" : "out");
  }
  check_same_device(coef, x, "coef", "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == 4 && (coef.size(0) == 1 || coef.size(0) == rows),
              "sde_step: coef must be (1, 4) or (", rows, ", 4), got ", coef.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kDouble || coef.scalar_type() == at::kFloat,
              "sde_step: coef must be float64 or float32, got ", coef.scalar_type());
  if (rows == 0 || cols == 0) return;

  const at::Tensor tab = coef.to(at::kDouble).contiguous();
  const double* cp = tab.data_ptr<double>();
  const int64_t R = tab.size(0);
  std::vector<double> abs_k(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) abs_k[r] = std::abs(cp[4 * r + 3]);

  // Operands that alias an output are read from copies (apart_from, checks.h).
  const auto apart = [&](const at::Tensor& t) {
    const at::Tensor a = apart_from(t, out);
    return unit_cols(mean_out ? apart_from(a, *mean_out) : a);
  };
  const at::Tensor xs = apart(x);
  const at::Tensor ss = apart(score);
  const OptTensor zs = noise ? OptTensor(apart(*noise)) : std::nullopt;
  const at::Tensor os = unit_cols_out(out);
  const OptTensor ms = mean_out ? OptTensor(unit_cols_out(*mean_out)) : std::nullopt;

  SdeOperands op;
  op.rows = rows;
  op.cols = cols;
  op.out = os.data_ptr();
  op.out_stride = os.stride(0);
  if (ms) {
    op.mean = ms->data_ptr();
    op.mean_stride = ms->stride(0);
  }
  op.x = xs.data_ptr();
  op.x_stride = xs.stride(0);
  op.s = ss.data_ptr();
  op.s_stride = ss.stride(0);
  if (zs) {
    op.noise = zs->data_ptr();
    op.noise_stride = zs->stride(0);
  }
  op.seeded = seed.has_value();
  op.seed = static_cast<uint64_t>(seed.value_or(0));
  op.offset = static_cast<uint64_t>(offset);
  op.abs_k = abs_k.data();
  op.abs_k_stride = R == 1 ? 0 : 1;

  double g = 1.0;
  if (snr) {
    const NormSums sums = DIFFCORE_ISA_CALL(sde_norm_sums_kernel, op, x.scalar_type());
    TORCH_CHECK(sums.s != 0.0, "score: every row is zero, so the corrector's step size ",
                "2 alpha (snr mean|z| / mean|score|)^2 is undefined");
    const double n = static_cast<double>(rows);
    g = *snr * (sums.z / n) / (sums.s / n);
    op.reverse = true;
  }
  std::vector<float> coefs(static_cast<size_t>(3 * R));
  for (int64_t r = 0; r < R; ++r) {
    const double* c = cp + 4 * r;
    coefs[3 * r] = static_cast<float>(c[0]);
    coefs[3 * r + 1] = static_cast<float>(c[1] * c[3] * g * g);
    coefs[3 * r + 2] = static_cast<float>(c[2] * g);
  }
  op.coef = coefs.data();
  op.coef_stride = R == 1 ? 0 : 3;
  DIFFCORE_ISA_CALL(sde_step_kernel, op, x.scalar_type());
  if (!os.is_same(out)) out.copy_(os);
  if (ms && !ms->is_same(*mean_out)) mean_out->copy_(*ms);
}

std::tuple<at::Tensor, at::Tensor> sde_step(const at::Tensor& x, const at::Tensor& score,
                                            const at::Tensor& coef, const OptTensor& noise,
                                            std::optional<int64_t> seed, int64_t offset,
                                            std::optional<double> snr) {
  at::Tensor out = empty_output(x.sizes(), x.options());
  at::Tensor mean = empty_output(x.sizes(), x.options());
  run_sde_step(x, score, coef, noise, seed, offset, snr, out, mean);
  return {out, mean};
}

void sde_step_(at::Tensor& x, const at::Tensor& score, const at::Tensor& coef, const OptTensor& noise,
               std::optional<int64_t> seed, int64_t offset, std::optional<double> snr,
               const OptTensor& mean_out) {
  run_sde_step(x, score, coef, noise, seed, offset, snr, x, mean_out);
}

void sde_step_out(const at::Tensor& x, const at::Tensor& score, const at::Tensor& coef,
                  const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                  std::optional<double> snr, at::Tensor& out, const OptTensor& mean_out) {
  run_sde_step(x, score, coef, noise, seed, offset, snr, out, mean_out);
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("sde_step", &diffcore::cpu::sde_step);
  m.impl("sde_step_", &diffcore::cpu::sde_step_);
  m.impl("sde_step_out", &diffcore::cpu::sde_step_out);
}
#endif
