// sphere family, CPU: normalize, tangent projection, exp/log maps, geodesic distance, geodesic
// q_sample and the sphere p_step, row by row over (B, d).
//
//   x^ = x / |x|   (off-sphere points are projected; a zero point row raises ValueError)
//   normalize  out = x / max(|x|, eps)              (eps = 0 and a zero row: ValueError)
//   project    out = v - <x^, v> x^
//   expmap     out = cos(th) x^ + sinc(th) u,       u = v - <x^, v> x^, th = |u|
//   logmap     out = th w / |w|,                    w = P_x^ c, c = y^ -+ x^ (the chord next to y^)
//   distance   out = th = 2 atan2(|y^ - x^|, |y^ + x^|)
//   q_sample   expmap(x0, s z),      s = float32(table[t[r]]), z = noise or Philox(seed, offset)
//   p_step     y / max(|y|, 1e-12),  y = a x + b ((1 + w) f - w u) + c z, (a, b, c) = table[t[r]]
// Philox noise takes element r * d + j of the stream. sin(th)/th uses its series below th^2 = 1e-4.
// logmap rows whose chord is rounding noise (|w| <= |c| / 2) give 0 next to x^ and, next to -x^
// (y = -x among them), the geodesic towards e_k, k = 0 if |x_0| <= |x_1| else 1 (0 when d = 1).
// diffcore/reference/sphere.py is the meaning.
//
// Rows go in blocks of up to one vector's worth: one sweep reduces each row's dot products, the
// block's row scalars (cos, sin, atan2) are computed as one vector (SLEEF in the AVX2/AVX512
// builds), one sweep writes each row from L1 (logmap and distance add a sweep for the chords,
// which need the norms first; p_step keeps y in a per-thread row buffer). Seeded steps draw a
// block's noise as one stretch of the stream (its rows are consecutive in it) before using it.
// float32, float16 and bfloat16 rows compute in float32 with at::vec; float64 rows in float64
// with scalar loops.
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
#include <atomic>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "guided_step.h"
#include "philox_vec.h"

namespace diffcore::cpu {

enum class SphereMap : int { kNormalize, kProject, kExpmap, kLogmap, kDistance };

// Raw views of a sphere op's operands: (rows, cols) with unit column stride, row strides in
// elements. `out` of kDistance is (rows,) with element stride out_stride.
struct SphereOperands {
  int64_t rows = 0, cols = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
  const void* x = nullptr;  // base point x (x0, x_t)
  int64_t x_stride = 0;
  const void* v = nullptr;  // v (project, expmap), y (logmap, distance), model output (p_step)
  int64_t v_stride = 0;
  const void* u = nullptr;  // unconditional model output (p_step with guidance)
  int64_t u_stride = 0;
  const void* noise = nullptr;  // given noise (q_sample, p_step)
  int64_t noise_stride = 0;
  RowCoefficients coef;  // row r: q_sample s; p_step a, b, c
  double eps = 0.0;             // normalize
  double guidance = 0.0;  // rounded to float for the float32 math of the other dtypes
  bool seeded = false;
  uint64_t seed = 0, offset = 0;
};

// The first offending row found by a kernel, as 2 * row + operand (0: x, 1: y), or -1.
class BadRow {
 public:
  void flag(int64_t row, int operand) {
    const int64_t code = 2 * row + operand;
    int64_t cur = first_.load(std::memory_order_relaxed);
    while ((cur < 0 || code < cur) && !first_.compare_exchange_weak(cur, code)) {
    }
  }
  int64_t get() const { return first_.load(); }

 private:
  std::atomic<int64_t> first_{-1};
};

inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kStep = 2 * kLanes;  // elements per vector iteration (two float vectors)
constexpr double kSeriesBelow = 1e-4;  // th^2 under which the series forms are used
constexpr double kPStepEps = 1e-12;

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kVectorised = !std::is_same_v<T, double>;

template <typename A>
inline A sinc(A theta) {  // sin(th) / th
  const A t2 = theta * theta;
  if (t2 < static_cast<A>(kSeriesBelow)) return A(1) - t2 / A(6) + t2 * t2 / A(120);
  return std::sin(theta) / theta;
}

// out[j] = alpha x[j] + beta v[j] (v null: alpha x[j]); V is T or float (a noise buffer).
template <typename T, typename V>
void axpby_row(T* out, Acc<T> alpha, const T* x, Acc<T> beta, const V* v, int64_t n) {
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    const FVec va(alpha), vb(beta);
    for (; j + kStep <= n; j += kStep) {
      FVec x0, x1;
      load2(x + j, x0, x1);
      x0 = va * x0;
      x1 = va * x1;
      if (v != nullptr) {
        FVec v0, v1;
        load2(v + j, v0, v1);
        x0 = at::vec::fmadd(vb, v0, x0);
        x1 = at::vec::fmadd(vb, v1, x1);
      }
      store2(out + j, x0, x1);
    }
  }
  for (; j < n; ++j) {
    Acc<T> r = alpha * static_cast<Acc<T>>(x[j]);
    if (v != nullptr) r += beta * static_cast<Acc<T>>(v[j]);
    out[j] = static_cast<T>(r);
  }
}

// Sums over one row: |x|^2, <x, v>, |v|^2 (v null: only |x|^2).
template <typename T, typename V>
void dots_row(const T* x, const V* v, int64_t n, Acc<T>& xx, Acc<T>& xv, Acc<T>& vv) {
  using A = Acc<T>;
  xx = xv = vv = A(0);
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    FVec sxx(0.0f), sxv(0.0f), svv(0.0f);
    for (; j + kStep <= n; j += kStep) {
      FVec x0, x1;
      load2(x + j, x0, x1);
      sxx = at::vec::fmadd(x0, x0, at::vec::fmadd(x1, x1, sxx));
      if (v != nullptr) {
        FVec v0, v1;
        load2(v + j, v0, v1);
        sxv = at::vec::fmadd(x0, v0, at::vec::fmadd(x1, v1, sxv));
        svv = at::vec::fmadd(v0, v0, at::vec::fmadd(v1, v1, svv));
      }
    }
    xx = lane_sum(sxx);
    xv = lane_sum(sxv);
    vv = lane_sum(svv);
  }
  for (; j < n; ++j) {
    const A xj = static_cast<A>(x[j]);
    xx += xj * xj;
    if (v != nullptr) {
      const A vj = static_cast<A>(v[j]);
      xv += xj * vj;
      vv += vj * vj;
    }
  }
}

// Rows per task: at least min_task_elements, so small d does not pay a task per row.
inline int64_t row_grain(int64_t cols, bool seeded = false) {
  return std::max<int64_t>(1, min_task_elements(seeded) / std::max<int64_t>(cols, 1));
}

// Rows per block: the rows whose scalar math (cos, sin, atan2) runs as one vector, between the
// sweep that reduces them and the one that writes them; small enough to stay in L1 between the two.
inline int64_t block_rows(int64_t cols) {
  return std::clamp<int64_t>(4096 / std::max<int64_t>(cols, 1), 1, kLanes);
}

// Prefetches row r of every operand a sweep reads and of its output (out_cols elements of it),
// if r < end: the sweeps below call it for the row prefetch_rows_ahead (vec_rows.h) rows on.
// 65,536 x 64 float32 p_step with given noise, allocating, in one process, interleaved: ~1.7x ->
// ~1.9x of torch.compile's time; a chained DimeRec-style loop 2-7% faster.
template <typename T>
inline void prefetch_operands(const SphereOperands& op, int64_t r, int64_t end, int64_t out_cols) {
  if (r >= end) return;
  const int64_t n = op.cols;
  auto row = [&](const void* base, int64_t stride) {
    return static_cast<const T*>(base) + r * stride;
  };
  prefetch_row(row(op.x, op.x_stride), n);
  if (op.v != nullptr) prefetch_row(row(op.v, op.v_stride), n);
  if (op.u != nullptr) prefetch_row(row(op.u, op.u_stride), n);
  if (op.noise != nullptr) prefetch_row(row(op.noise, op.noise_stride), n);
  prefetch_row<true>(row(op.out, op.out_stride), out_cols);
}

// expmap coefficients of a block: out = alpha x + beta v for exp_x^(s P v), from the sums
// xx = |x|^2, xv = <x, v>, vv = |v|^2: lambda = xv / xx, th = s sqrt(vv - xv lambda),
// beta = s sinc(th), alpha = cos(th) / |x| - beta lambda. Lanes of zero rows give garbage.
inline void exp_coefficients(const float* xx, const float* xv, const float* vv, const float* s,
                             float* alpha, float* beta) {
  const FVec vxx = FVec::loadu(xx), vxv = FVec::loadu(xv), vvv = FVec::loadu(vv);
  const FVec vs = FVec::loadu(s);
  const FVec one(1.0f), lam = vxv / vxx;
  const FVec theta = vs * at::vec::maximum(vvv - vxv * lam, FVec(0.0f)).sqrt();
  const FVec t2 = theta * theta, small = t2 < FVec(static_cast<float>(kSeriesBelow));
  const FVec safe = FVec::blendv(theta, one, small);
  const FVec series = one - t2 / FVec(6.0f) + t2 * t2 / FVec(120.0f);
  const FVec b = FVec::blendv(safe.sin() / safe, series, small) * vs;
  b.store(beta);
  (theta.cos() / vxx.sqrt() - b * lam).store(alpha);
}

inline void exp_coefficients(const double* xx, const double* xv, const double* vv,
                             const double* s, double* alpha, double* beta) {
  for (int64_t i = 0; i < kLanes; ++i) {
    const double lam = xv[i] / xx[i];
    const double theta = s[i] * std::sqrt(std::max(vv[i] - xv[i] * lam, 0.0));
    beta[i] = sinc(theta) * s[i];
    alpha[i] = std::cos(theta) / std::sqrt(xx[i]) - beta[i] * lam;
  }
}

// logmap / distance angles of a block from the chords p, q: theta = 2 atan2(sqrt p, sqrt q).
inline void log_angles(const float* p, const float* q, float* theta) {
  (FVec(2.0f) * FVec::loadu(p).sqrt().atan2(FVec::loadu(q).sqrt())).store(theta);
}

inline void log_angles(const double* p, const double* q, double* theta) {
  for (int64_t i = 0; i < kLanes; ++i) theta[i] = 2.0 * std::atan2(std::sqrt(p[i]), std::sqrt(q[i]));
}

// The squared chords of the rows at a common scale: P = |c-|^2, Q = |c+|^2 with c-+ = rho y -+ x
// and rho = |x| / |y| (so P / |x|^2 = |y^ - x^|^2); with kDots also <c-, x> and <c+, x>. Every
// sweep forms c-+ as one fma, fma(rho, y, -+x), so log_write's sweep sees the same chord (rounding
// noise for y^ = +-x^, where any other rounding would change it). rho is exactly 1 for y = +-x
// (c = 0 there).
template <bool kDots, typename T>
void chords_row(const T* x, const T* y, int64_t n, Acc<T> rho, Acc<T>& p, Acc<T>& q, Acc<T>& dm,
                Acc<T>& dp) {
  using A = Acc<T>;
  p = q = dm = dp = A(0);
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    const FVec vrho(rho), vminus(-1.0f);
    FVec sp(0.0f), sq(0.0f), sdm(0.0f), sdp(0.0f);
    for (; j + kStep <= n; j += kStep) {
      FVec x0, x1, y0, y1;
      load2(x + j, x0, x1);
      load2(y + j, y0, y1);
      const FVec d0 = at::vec::fmadd(vrho, y0, vminus * x0), d1 = at::vec::fmadd(vrho, y1, vminus * x1);
      const FVec e0 = at::vec::fmadd(vrho, y0, x0), e1 = at::vec::fmadd(vrho, y1, x1);
      sp = at::vec::fmadd(d0, d0, at::vec::fmadd(d1, d1, sp));
      sq = at::vec::fmadd(e0, e0, at::vec::fmadd(e1, e1, sq));
      if constexpr (kDots) {
        sdm = at::vec::fmadd(d0, x0, at::vec::fmadd(d1, x1, sdm));
        sdp = at::vec::fmadd(e0, x0, at::vec::fmadd(e1, x1, sdp));
      }
    }
    p = lane_sum(sp);
    q = lane_sum(sq);
    if constexpr (kDots) {
      dm = lane_sum(sdm);
      dp = lane_sum(sdp);
    }
  }
  for (; j < n; ++j) {
    const A xj = static_cast<A>(x[j]), yj = static_cast<A>(y[j]);
    const A d = std::fma(rho, yj, -xj), e = std::fma(rho, yj, xj);
    p += d * d;
    q += e * e;
    if constexpr (kDots) {
      dm += d * xj;
      dp += e * xj;
    }
  }
}

// Writes logmap's row: th w / |w| with w = c - (<c, x> / |x|^2) x the tangent part of the chord
// next to y (c = rho y - x when p <= q, else rho y + x; cc = |c|^2, cx = <c, x>), its c_j formed
// by the same fma as in chords_row. |w|^2 = cc - cx^2 / |x|^2 is accurate to a few ulp wherever
// it is used: for exact unit points |w| >= cos(pi/4) |c|, and |w| <= |c| / 2 means the chord is rounding
// noise: then 0 next to x^, and next to -x^ the geodesic towards e_k, k = 0 if |x_0| <= |x_1|
// else 1 (0 when d = 1: S^0 has no tangent directions).
template <typename T>
void log_write(T* out, const T* x, const T* y, int64_t n, Acc<T> xx, Acc<T> rho, bool near, Acc<T> cc,
               Acc<T> cx, Acc<T> theta) {
  using A = Acc<T>;
  const A ww = cc - cx * (cx / xx);
  if (A(4) * ww <= cc) {  // always for d = 1, but a NaN row
    if (near || n == 1) {
      std::fill_n(out, n, static_cast<T>(0));
      return;
    }
    const A rx = A(1) / std::sqrt(xx);
    const int64_t k = std::abs(static_cast<A>(x[0])) <= std::abs(static_cast<A>(x[1])) ? 0 : 1;
    const A xk = rx * static_cast<A>(x[k]);
    const A scale = theta / std::sqrt(A(1) - xk * xk);
    axpby_row<T, T>(out, -scale * xk * rx, x, A(0), nullptr, n);
    out[k] = static_cast<T>(scale * (A(1) - xk * xk));
    return;
  }
  const A sigma = near ? A(-1) : A(1), nbeta = -cx / xx, scale = theta / std::sqrt(ww);
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    const FVec vrho(rho), vsigma(sigma), vnbeta(nbeta), vscale(scale);
    for (; j + kStep <= n; j += kStep) {
      FVec x0, x1, y0, y1;
      load2(x + j, x0, x1);
      load2(y + j, y0, y1);
      const FVec w0 = at::vec::fmadd(vnbeta, x0, at::vec::fmadd(vrho, y0, vsigma * x0));
      const FVec w1 = at::vec::fmadd(vnbeta, x1, at::vec::fmadd(vrho, y1, vsigma * x1));
      store2(out + j, vscale * w0, vscale * w1);
    }
  }
  for (; j < n; ++j) {
    const A xj = static_cast<A>(x[j]);
    out[j] = static_cast<T>(scale * std::fma(nbeta, xj, std::fma(rho, static_cast<A>(y[j]), sigma * xj)));
  }
}

// The rows [begin, end) of normalize, project, expmap, logmap or distance, a block at a time:
// reduce each row, compute the block's row scalars as vectors, write each row.
template <typename T>
void map_rows(SphereMap map, const SphereOperands& op, int64_t begin, int64_t end, BadRow& bad) {
  using A = Acc<T>;
  const int64_t n = op.cols, rows_per_block = block_rows(n);
  const int64_t ahead = prefetch_rows_ahead(n * static_cast<int64_t>(sizeof(T)));
  const int64_t out_cols = map == SphereMap::kDistance ? 1 : n;
  const bool has_v = map != SphereMap::kNormalize;
  for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, end - r0);
    alignas(64) A xx[kLanes], xv[kLanes], vv[kLanes], p[kLanes], q[kLanes], rho[kLanes];
    alignas(64) A dm[kLanes], dp[kLanes], one[kLanes], alpha[kLanes], beta[kLanes];
    std::fill(xx, xx + kLanes, A(1));  // lanes without a row stay finite
    std::fill(xv, xv + kLanes, A(0));
    std::fill(vv, vv + kLanes, A(1));
    std::fill(p, p + kLanes, A(1));
    std::fill(q, q + kLanes, A(1));
    std::fill(rho, rho + kLanes, A(1));
    std::fill(one, one + kLanes, A(1));
    const bool logs = map == SphereMap::kLogmap || map == SphereMap::kDistance;
    bool zero[kLanes] = {};  // rows that raise: skipped
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = r0 + i;
      const T* x = static_cast<const T*>(op.x) + r * op.x_stride;
      const T* v = has_v ? static_cast<const T*>(op.v) + r * op.v_stride : nullptr;
      if (ahead > 0) prefetch_operands<T>(op, r + ahead, end, out_cols);
      dots_row(x, v, n, xx[i], xv[i], vv[i]);
      if (map == SphereMap::kNormalize) {
        zero[i] = xx[i] == A(0) && op.eps == 0.0;
        if (zero[i]) bad.flag(r, 0);
      } else if (xx[i] == A(0) || (logs && vv[i] == A(0))) {
        zero[i] = true;
        bad.flag(r, xx[i] == A(0) ? 0 : 1);
      }
      if (logs && !zero[i]) {
        rho[i] = std::sqrt(xx[i]) / std::sqrt(vv[i]);  // chords at |x|'s scale: rho = 1 for y = +-x
        if (map == SphereMap::kLogmap) {
          chords_row<true>(x, v, n, rho[i], p[i], q[i], dm[i], dp[i]);
        } else {
          chords_row<false>(x, v, n, rho[i], p[i], q[i], dm[i], dp[i]);
        }
      }
    }
    if (map == SphereMap::kExpmap) exp_coefficients(xx, xv, vv, one, alpha, beta);
    if (logs) log_angles(p, q, alpha);  // alpha: theta
    for (int64_t i = 0; i < m; ++i) {
      if (zero[i]) continue;
      const int64_t r = r0 + i;
      const T* x = static_cast<const T*>(op.x) + r * op.x_stride;
      const T* v = has_v ? static_cast<const T*>(op.v) + r * op.v_stride : nullptr;
      T* out = static_cast<T*>(op.out) + r * op.out_stride;
      switch (map) {
        case SphereMap::kNormalize:
          axpby_row<T, T>(out, A(1) / std::max(std::sqrt(xx[i]), static_cast<A>(op.eps)), x,
                          A(0), nullptr, n);
          break;
        case SphereMap::kProject:
          axpby_row(out, -xv[i] / xx[i], x, A(1), v, n);
          break;
        case SphereMap::kExpmap:
          axpby_row(out, alpha[i], x, beta[i], v, n);
          break;
        case SphereMap::kLogmap:
          if (p[i] <= q[i]) {
            log_write(out, x, v, n, xx[i], rho[i], true, p[i], dm[i], alpha[i]);
          } else {
            log_write(out, x, v, n, xx[i], rho[i], false, q[i], dp[i], alpha[i]);
          }
          break;
        case SphereMap::kDistance:
          *out = static_cast<T>(alpha[i]);
          break;
      }
    }
  }
}

// The rows [begin, end) of q_sample: exp_x0(s P z), a block at a time (z: given, or drawn for the
// block into the buffer zbuf of block_rows(d) rows).
template <typename T>
void q_sample_rows(const SphereOperands& op, int64_t begin, int64_t end, float* zbuf, BadRow& bad) {
  using A = Acc<T>;
  const int64_t n = op.cols, rows_per_block = block_rows(n);
  const int64_t ahead = prefetch_rows_ahead(n * static_cast<int64_t>(sizeof(T)));
  for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
    const int64_t m = std::min(rows_per_block, end - r0);
    if (op.seeded)  // the block's rows are one stretch of the stream
      philox_normals(zbuf, op.seed, op.offset, static_cast<uint64_t>(r0 * n), m * n);
    alignas(64) A xx[kLanes], xz[kLanes], zz[kLanes], s[kLanes], alpha[kLanes], beta[kLanes];
    std::fill(xx, xx + kLanes, A(1));
    std::fill(xz, xz + kLanes, A(0));
    std::fill(zz, zz + kLanes, A(1));
    std::fill(s, s + kLanes, A(0));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = r0 + i;
      const T* x = static_cast<const T*>(op.x) + r * op.x_stride;
      s[i] = static_cast<A>(op.coef.row(r)[0]);
      if (ahead > 0) prefetch_operands<T>(op, r + ahead, end, n);
      if (op.seeded) {
        dots_row<T, float>(x, zbuf + i * n, n, xx[i], xz[i], zz[i]);
      } else {
        const T* z = static_cast<const T*>(op.noise) + r * op.noise_stride;
        dots_row<T, T>(x, z, n, xx[i], xz[i], zz[i]);
      }
      if (xx[i] == A(0)) bad.flag(r, 0);
    }
    exp_coefficients(xx, xz, zz, s, alpha, beta);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = r0 + i;
      if (xx[i] == A(0)) continue;
      const T* x = static_cast<const T*>(op.x) + r * op.x_stride;
      T* out = static_cast<T*>(op.out) + r * op.out_stride;
      if (op.seeded) {
        axpby_row<T, float>(out, alpha[i], x, beta[i], zbuf + i * n, n);
      } else {
        const T* z = static_cast<const T*>(op.noise) + r * op.noise_stride;
        axpby_row<T, T>(out, alpha[i], x, beta[i], z, n);
      }
    }
  }
}

// One row of p_step: y = a x + b f + c z into the buffer y (and its squared norm), then y / |y|.
// drawn: the row's Philox normals (seeded steps), else null.
template <typename T>
void p_step_row(const SphereOperands& op, int64_t r, Acc<T>* y, const float* drawn) {
  using A = Acc<T>;
  const int64_t n = op.cols;
  const float* cf = op.coef.row(r);
  const A a = cf[0], b = cf[1], c = cf[2];
  const A w = static_cast<A>(op.guidance), w1 = A(1) + w;
  const T* x = static_cast<const T*>(op.x) + r * op.x_stride;
  const T* f = static_cast<const T*>(op.v) + r * op.v_stride;
  const T* u = op.u == nullptr ? nullptr : static_cast<const T*>(op.u) + r * op.u_stride;
  const T* zn = nullptr;  // given noise
  const float* zs = nullptr;  // drawn noise
  if (c != A(0) && op.noise != nullptr) {
    zn = static_cast<const T*>(op.noise) + r * op.noise_stride;
  } else if (c != A(0)) {
    zs = drawn;
  }
  A yy = A(0);
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    const FVec va(a), vb(b), vc(c), vw(w), vw1(w1);
    FVec s(0.0f);
    for (; j + kStep <= n; j += kStep) {
      FVec x0, x1, f0, f1;
      load2(x + j, x0, x1);
      load2(f + j, f0, f1);
      if (u != nullptr) {
        FVec u0, u1;
        load2(u + j, u0, u1);
        f0 = vw1 * f0 - vw * u0;
        f1 = vw1 * f1 - vw * u1;
      }
      FVec y0 = at::vec::fmadd(vb, f0, va * x0), y1 = at::vec::fmadd(vb, f1, va * x1);
      if (zn != nullptr || zs != nullptr) {
        FVec z0, z1;
        if (zn != nullptr) {
          load2(zn + j, z0, z1);
        } else {
          load2(zs + j, z0, z1);
        }
        y0 = at::vec::fmadd(vc, z0, y0);
        y1 = at::vec::fmadd(vc, z1, y1);
      }
      y0.store(y + j);
      y1.store(y + j + kLanes);
      s = at::vec::fmadd(y0, y0, at::vec::fmadd(y1, y1, s));
    }
    yy = lane_sum(s);
  }
  for (; j < n; ++j) {
    A fj = static_cast<A>(f[j]);
    if (u != nullptr) fj = w1 * fj - w * static_cast<A>(u[j]);
    A yj = a * static_cast<A>(x[j]) + b * fj;
    if (zn != nullptr) yj += c * static_cast<A>(zn[j]);
    if (zs != nullptr) yj += c * static_cast<A>(zs[j]);
    y[j] = yj;
    yy += yj * yj;
  }
  const A scale = A(1) / std::max(std::sqrt(yy), static_cast<A>(kPStepEps));
  T* out = static_cast<T*>(op.out) + r * op.out_stride;
  j = 0;
  if constexpr (kVectorised<T>) {
    const FVec vs(scale);
    for (; j + kStep <= n; j += kStep)
      store2(out + j, vs * FVec::loadu(y + j), vs * FVec::loadu(y + j + kLanes));
  }
  for (; j < n; ++j) out[j] = static_cast<T>(scale * y[j]);
}

}  // namespace

#define DIFFCORE_DISPATCH_SPHERE_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

int64_t sphere_map_kernel(const SphereOperands& op, SphereMap map, at::ScalarType dtype) {
  BadRow bad;
  DIFFCORE_DISPATCH_SPHERE_TYPES(dtype, "sphere", [&] {
    at::parallel_for(0, op.rows, row_grain(op.cols), [&](int64_t begin, int64_t end) {
      map_rows<scalar_t>(map, op, begin, end, bad);
    });
  });
  return bad.get();
}

int64_t sphere_q_sample_kernel(const SphereOperands& op, at::ScalarType dtype) {
  BadRow bad;
  DIFFCORE_DISPATCH_SPHERE_TYPES(dtype, "sphere_q_sample", [&] {
    at::parallel_for(0, op.rows, row_grain(op.cols, op.seeded), [&](int64_t begin, int64_t end) {
      std::vector<float> z(op.seeded ? static_cast<size_t>(block_rows(op.cols) * op.cols) : 0);
      q_sample_rows<scalar_t>(op, begin, end, z.data(), bad);
    });
  });
  return bad.get();
}

void sphere_p_step_kernel(const SphereOperands& op, at::ScalarType dtype) {
  DIFFCORE_DISPATCH_SPHERE_TYPES(dtype, "sphere_p_step", [&] {
    using T = scalar_t;
    const int64_t n = op.cols;
    const int64_t rows_per_block = block_rows(n);
    const int64_t ahead = prefetch_rows_ahead(n * static_cast<int64_t>(sizeof(T)));
    at::parallel_for(0, op.rows, row_grain(n, op.seeded), [&](int64_t begin, int64_t end) {
      std::vector<Acc<T>> y(static_cast<size_t>(n));
      std::vector<float> z(op.seeded ? static_cast<size_t>(rows_per_block * n) : 0);
      for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
        const int64_t m = std::min(rows_per_block, end - r0);
        if (op.seeded)  // the block's rows are one stretch of the stream
          philox_normals(z.data(), op.seed, op.offset, static_cast<uint64_t>(r0 * n), m * n);
        for (int64_t i = 0; i < m; ++i) {
          if (ahead > 0) prefetch_operands<T>(op, r0 + i + ahead, end, n);
          p_step_row<T>(op, r0 + i, y.data(), op.seeded ? z.data() + i * n : nullptr);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(int64_t sphere_map_kernel(const diffcore::cpu::SphereOperands&,
                                               diffcore::cpu::SphereMap, at::ScalarType))
DIFFCORE_ISA_DECLARE(int64_t sphere_q_sample_kernel(const diffcore::cpu::SphereOperands&,
                                                    at::ScalarType))
DIFFCORE_ISA_DECLARE(void sphere_p_step_kernel(const diffcore::cpu::SphereOperands&,
                                                at::ScalarType))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_rows(const at::Tensor& t, const char* name) {
  check_dim(t, 2, name);
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              name, ": expected float32, float16, bfloat16 or float64, got ", dt);
}

const char* op_name(SphereMap map) {
  switch (map) {
    case SphereMap::kNormalize: return "sphere_normalize";
    case SphereMap::kProject: return "sphere_project";
    case SphereMap::kExpmap: return "sphere_expmap";
    case SphereMap::kLogmap: return "sphere_logmap";
    default: return "sphere_geodesic_distance";
  }
}

void raise_zero_point(int64_t bad, const char* op, const char* x_name, const char* y_name) {
  TORCH_CHECK_VALUE(bad < 0, op, ": ", bad % 2 == 0 ? x_name : y_name, ": row ", bad / 2,
              " is zero; a point on the sphere needs a nonzero row");
}

at::Tensor run_map(SphereMap map, const at::Tensor& x, const OptTensor& v, double eps) {
  const char* second = map == SphereMap::kLogmap || map == SphereMap::kDistance ? "y" : "v";
  check_rows(x, "x");
  if (v) check_like(*v, x, second, "x");
  const at::Tensor xs = unit_cols(x);
  const OptTensor vs = v ? OptTensor(unit_cols(*v)) : std::nullopt;
  const bool distance = map == SphereMap::kDistance;
  at::Tensor out =
      distance ? at::empty({x.size(0)}, x.options()) : empty_output(x.sizes(), x.options());
  SphereOperands op;
  op.rows = x.size(0);
  op.cols = x.size(1);
  op.out = out.data_ptr();
  op.out_stride = distance ? 1 : out.stride(0);
  op.x = xs.data_ptr();
  op.x_stride = xs.stride(0);
  if (vs) {
    op.v = vs->data_ptr();
    op.v_stride = vs->stride(0);
  }
  op.eps = eps;
  if (op.rows == 0 || op.cols == 0) return out;
  const int64_t bad = DIFFCORE_ISA_CALL(sphere_map_kernel, op, map, x.scalar_type());
  if (map == SphereMap::kNormalize) {
    TORCH_CHECK_VALUE(bad < 0, "sphere_normalize: x: row ", bad / 2,
                " is zero and eps = 0, so it has no direction; pass eps > 0 to map zero rows to "
                "zero");
  } else {
    raise_zero_point(bad, op_name(map), "x", second);
  }
  return out;
}

at::Tensor sphere_normalize(const at::Tensor& x, double eps) {
  TORCH_CHECK(eps >= 0.0, "sphere_normalize: eps must be >= 0, got ", eps);
  return run_map(SphereMap::kNormalize, x, std::nullopt, eps);
}
at::Tensor sphere_project(const at::Tensor& x, const at::Tensor& v) {
  return run_map(SphereMap::kProject, x, v, 0.0);
}
at::Tensor sphere_expmap(const at::Tensor& x, const at::Tensor& v) {
  return run_map(SphereMap::kExpmap, x, v, 0.0);
}
at::Tensor sphere_logmap(const at::Tensor& x, const at::Tensor& y) {
  return run_map(SphereMap::kLogmap, x, y, 0.0);
}
at::Tensor sphere_geodesic_distance(const at::Tensor& x, const at::Tensor& y) {
  return run_map(SphereMap::kDistance, x, y, 0.0);
}

void run_q_sample(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                  const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                  const at::Tensor& out) {
  check_rows(x0, "x0");
  TORCH_CHECK(noise.has_value() != seed.has_value(),
              "sphere_q_sample: give exactly one of noise and seed");
  if (noise) check_like(*noise, x0, "noise", "x0");
  TORCH_CHECK(offset >= 0, "offset: must be non-negative, got ", offset);
  check_written(out, x0, "out", "x0");
  check_same_device(table, x0, "table", "x0");
  const TableRows coef = table_rows(table, t, x0.size(0), 1, false, "sphere_q_sample");
  const at::Tensor xs = unit_cols(apart_from(x0, out));
  const OptTensor zs = noise ? OptTensor(unit_cols(apart_from(*noise, out))) : std::nullopt;
  const at::Tensor os = out.stride(1) == 1 ? out : at::empty(out.sizes(), out.options());
  SphereOperands op;
  op.rows = x0.size(0);
  op.cols = x0.size(1);
  op.out = os.data_ptr();
  op.out_stride = os.stride(0);
  op.x = xs.data_ptr();
  op.x_stride = xs.stride(0);
  if (zs) {
    op.noise = zs->data_ptr();
    op.noise_stride = zs->stride(0);
  }
  op.coef = coef.view();
  op.seeded = seed.has_value();
  op.seed = static_cast<uint64_t>(seed.value_or(0));
  op.offset = static_cast<uint64_t>(offset);
  if (op.rows > 0 && op.cols > 0) {
    const int64_t bad = DIFFCORE_ISA_CALL(sphere_q_sample_kernel, op, x0.scalar_type());
    raise_zero_point(bad, "sphere_q_sample", "x0", "x0");
  }
  if (!os.is_same(out)) out.copy_(os);
}

void run_p_step(const at::Tensor& x, const at::Tensor& f, const OptTensor& f_uncond,
                double guidance, const at::Tensor& t, const at::Tensor& table,
                const OptTensor& noise, std::optional<int64_t> seed, int64_t offset, bool clamp_t,
                const at::Tensor& out) {
  check_rows(x, "x_t");
  check_guided_step(x, f, f_uncond, guidance, noise, seed, offset, out, table, "x_t");
  const GuidedStepViews v = guided_step_views(x, f, f_uncond, noise, out);
  const TableRows coef = table_rows(table, t, x.size(0), 3, clamp_t, "sphere_p_step");
  SphereOperands op;
  bind_guided_step(op, v, coef, guidance, seed, offset);
  op.v = v.f->data_ptr();
  op.v_stride = v.f->stride(0);
  if (op.rows > 0 && op.cols > 0) DIFFCORE_ISA_CALL(sphere_p_step_kernel, op, x.scalar_type());
  finish_guided_step(v, out);
}

at::Tensor sphere_q_sample(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                           const OptTensor& noise, std::optional<int64_t> seed, int64_t offset) {
  at::Tensor out = empty_output(x0.sizes(), x0.options());
  run_q_sample(x0, t, table, noise, seed, offset, out);
  return out;
}

void sphere_q_sample_(at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                      const OptTensor& noise, std::optional<int64_t> seed, int64_t offset) {
  run_q_sample(x0, t, table, noise, seed, offset, x0);
}

void sphere_q_sample_out(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                         const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                         at::Tensor& out) {
  run_q_sample(x0, t, table, noise, seed, offset, out);
}

at::Tensor sphere_p_step(const at::Tensor& x, const at::Tensor& f, const OptTensor& f_uncond,
                         double guidance, const at::Tensor& t, const at::Tensor& table,
                         const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                         bool clamp_t) {
  at::Tensor out = empty_output(x.sizes(), x.options());
  run_p_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out);
  return out;
}

void sphere_p_step_(at::Tensor& x, const at::Tensor& f, const OptTensor& f_uncond, double guidance,
                    const at::Tensor& t, const at::Tensor& table, const OptTensor& noise,
                    std::optional<int64_t> seed, int64_t offset, bool clamp_t) {
  run_p_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, x);
}

void sphere_p_step_out(const at::Tensor& x, const at::Tensor& f, const OptTensor& f_uncond,
                       double guidance, const at::Tensor& t, const at::Tensor& table,
                       const OptTensor& noise, std::optional<int64_t> seed, int64_t offset,
                       bool clamp_t, at::Tensor& out) {
  run_p_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out);
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("sphere_normalize", &diffcore::cpu::sphere_normalize);
  m.impl("sphere_project", &diffcore::cpu::sphere_project);
  m.impl("sphere_expmap", &diffcore::cpu::sphere_expmap);
  m.impl("sphere_logmap", &diffcore::cpu::sphere_logmap);
  m.impl("sphere_geodesic_distance", &diffcore::cpu::sphere_geodesic_distance);
  m.impl("sphere_q_sample", &diffcore::cpu::sphere_q_sample);
  m.impl("sphere_q_sample_", &diffcore::cpu::sphere_q_sample_);
  m.impl("sphere_q_sample_out", &diffcore::cpu::sphere_q_sample_out);
  m.impl("sphere_p_step", &diffcore::cpu::sphere_p_step);
  m.impl("sphere_p_step_", &diffcore::cpu::sphere_p_step_);
  m.impl("sphere_p_step_out", &diffcore::cpu::sphere_p_step_out);
}
#endif
