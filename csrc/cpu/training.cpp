// training family, CPU: DiffRec's per-row diffusion loss, its Lt_history update, LightGCN's BPR
// loss and SGL's InfoNCE, forward and backward.
//
//   diffusion loss   out[r] = w_r / pt_r * term_r, one pass over the (B, N) rows:
//                    term_r = mean_j (target - m)^2                  target = x0 or noise
//                           = mean_j (x0 - x0_hat)^2 / 2             the eps likelihood rows (t = 0)
//                    x0_hat = c3 (c1 x0 + c2 z) - c4 m, c = float32(table[t_r, 1:5])
//                    backward: d/dm = 2 s (m - target), or s c4 (x0 - x0_hat); s = g w / (pt N),
//                    a gradient larger than the cache written with non-temporal stores
//   history update   DiffRec's loop over the batch, in batch order (a full history shifts).
//   BPR              loss_b = softplus(<u, n> - <u, p>) + wd / 2 (|u0|^2 + |p0|^2 + |n0|^2),
//                    rows gathered by index, never stored: a task's gathers and dot products
//                    run first in a short loop (its rows' misses overlap), then the softplus /
//                    sigmoid tail over the task's scores.
//                    Backward: each batch row's score contributions (c (n - p), c u) computed
//                    once, then every table row written once, in order: the sum of its entries'
//                    contributions (grouped by a stable counting sort: batch order) plus its L2
//                    term wd (sum of the entries' g) row, or zeros. No atomics, no zero fill.
//   InfoNCE          loss_i = logsumexp_j(<a_i, b_j> / tau) - <a_i, b_i> / tau over blocks of
//                    kNceRows rows: the (B, B) logits exist one block at a time (a single-thread
//                    GEMM per block, then a vectorised logsumexp). Backward: per block
//                    Q = g_i (softmax - I) once; d/da = Q b / tau, d/db = sum of Q^T a / tau
//                    over kNceParts fixed ranges of blocks, added in order.
//
// Reductions use fixed partitions (kLossBlock columns, kNceRows rows, kNceParts ranges), so
// values do not depend on the thread count. float16/bfloat16 compute in float32, float64 in
// float64. Large fresh outputs come from empty_output (memory.h).
// Compiled once per instruction set; the DEFAULT build also holds the op entry points.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "vec_reduce.h"
#include "vec_rows.h"

namespace diffcore::cpu {

constexpr int64_t kLossBlock = 4096;  // columns per partial sum of the diffusion loss
constexpr int64_t kNceRows = 64;      // rows of the logits per InfoNCE block
constexpr int64_t kNceParts = 4;      // fixed partition of the row blocks for the d/db sums

enum LossMode : int8_t { kTargetX0 = 0, kTargetNoise = 1, kLikelihood = 2 };

// The diffusion loss over (rows, cols) operands with unit column stride.
struct LossOperands {
  int64_t rows = 0, cols = 0;
  const void* m = nullptr;
  int64_t m_stride = 0;
  const void* x0 = nullptr;
  int64_t x0_stride = 0;
  const void* z = nullptr;  // null without noise
  int64_t z_stride = 0;
  const int8_t* mode = nullptr;  // (rows,) LossMode
  const float* coef = nullptr;   // (rows, 4): c1..c4 = float32(table[t_r, 1:5])
  double* partial = nullptr;     // forward: (rows, blocks) sums of the squared terms
  const double* scale = nullptr; // backward: (rows,) s_r = g_r w_r / (pt_r N)
  void* grad = nullptr;          // backward: (rows, cols) d/dm, contiguous
};

// BPR over gathered rows: every table (n, d) with unit column stride.
struct BprOperands {
  int64_t batch = 0, d = 0;
  const void* user = nullptr;
  int64_t user_stride = 0;
  const void* item = nullptr;
  int64_t item_stride = 0;
  const void* user_ego = nullptr;  // null: the L2 term reads the score tables
  int64_t user_ego_stride = 0;
  const void* item_ego = nullptr;
  int64_t item_ego_stride = 0;
  int64_t user_rows = 0, item_rows = 0, user_ego_rows = 0, item_ego_rows = 0;
  const int64_t* users = nullptr;  // (batch,) each
  const int64_t* pos = nullptr;
  const int64_t* neg = nullptr;
  double weight_decay = 0.0;
  double* rows = nullptr;  // forward: (batch,) per-row losses
  const double* row_grad = nullptr;  // backward: (batch,) d total / d loss_b
  void* g_user = nullptr;  // backward: dense (n, d) contiguous gradients (ego ones null without ego)
  void* g_item = nullptr;
  void* g_user_ego = nullptr;
  void* g_item_ego = nullptr;
};

// InfoNCE over prepared rows (normalised or as given) in the compute dtype, contiguous (B, d).
struct NceOperands {
  int64_t batch = 0, d = 0;
  at::Tensor a, b;  // (B, d) float32 or float64
  double temperature = 1.0;
  double* rows = nullptr;           // forward: (B,) per-row losses
  const double* row_grad = nullptr; // backward: (B,) g_i
  at::Tensor grad_a, grad_b;        // backward: (B, d) w.r.t. the prepared rows
};

inline namespace CPU_CAPABILITY {

// --- diffusion loss --------------------------------------------------------------------------
// The error e[j] of one element: target - m, or x0 - x0_hat for the likelihood rows.
template <int kMode, typename V>
inline V loss_error(const V& m, const V& x, const V& z, const V& c1, const V& c2, const V& c3, const V& c4) {
  if constexpr (kMode == kTargetX0) {
    return x - m;
  } else if constexpr (kMode == kTargetNoise) {
    return z - m;
  } else {  // the same fused products as the scalar tail, so a value does not depend on its path
    const V x_t = at::vec::fmadd(c1, x, c2 * z);
    return x - at::vec::fmsub(c3, x_t, c4 * m);
  }
}

// Sum of e^2 over n elements of one row, or (kGrad) grad = k e with k = -2 s (plain) or s c4,
// written with non-temporal stores when kStream (grad aligned; see stream2).
template <typename T, int kMode, bool kGrad, bool kStream>
double loss_segment(const T* m, const T* x, const T* z, int64_t n, const float* c, acc_t<T> k, T* grad) {
  using A = acc_t<T>;
  using V = AVec<T>;
  constexpr int64_t kStep = 2 * V::size();
  const V c1(static_cast<A>(c[0])), c2(static_cast<A>(c[1])), c3(static_cast<A>(c[2])), c4(static_cast<A>(c[3]));
  const V vk(k);
  V acc0(A(0)), acc1(A(0));
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    V m0, m1, x0v(A(0)), x1v(A(0)), z0(A(0)), z1(A(0));
    load2(m + j, m0, m1);
    if constexpr (kMode != kTargetNoise) load2(x + j, x0v, x1v);
    if constexpr (kMode != kTargetX0) load2(z + j, z0, z1);
    const V e0 = loss_error<kMode>(m0, x0v, z0, c1, c2, c3, c4);
    const V e1 = loss_error<kMode>(m1, x1v, z1, c1, c2, c3, c4);
    if constexpr (kGrad) {
      write2<kStream>(grad + j, vk * e0, vk * e1);
    } else {
      acc0 = at::vec::fmadd(e0, e0, acc0);
      acc1 = at::vec::fmadd(e1, e1, acc1);
    }
  }
  A sum = kGrad ? A(0) : lane_sum(acc0 + acc1);
  const A s1 = static_cast<A>(c[0]), s2 = static_cast<A>(c[1]), s3 = static_cast<A>(c[2]), s4 = static_cast<A>(c[3]);
  for (; j < n; ++j) {
    const A mv = static_cast<A>(m[j]);
    A e;
    if constexpr (kMode == kTargetX0) {
      e = static_cast<A>(x[j]) - mv;
    } else if constexpr (kMode == kTargetNoise) {
      e = static_cast<A>(z[j]) - mv;
    } else {
      const A xv = static_cast<A>(x[j]);
      const A x_t = std::fma(s1, xv, s2 * static_cast<A>(z[j]));
      e = xv - std::fma(s3, x_t, -(s4 * mv));
    }
    if constexpr (kGrad) {
      grad[j] = static_cast<T>(k * e);
    } else {
      sum += e * e;
    }
  }
  return static_cast<double>(sum);
}

// One row segment in the row's mode (kTargetX0, kTargetNoise or kLikelihood).
template <typename T, bool kGrad, bool kStream>
double loss_mode_segment(int mode, const T* m, const T* x, const T* z, int64_t n, const float* c, acc_t<T> k,
                         T* grad) {
  switch (mode) {
    case kTargetX0: return loss_segment<T, kTargetX0, kGrad, kStream>(m, x, z, n, c, k, grad);
    case kTargetNoise: return loss_segment<T, kTargetNoise, kGrad, kStream>(m, x, z, n, c, k, grad);
    default: return loss_segment<T, kLikelihood, kGrad, kStream>(m, x, z, n, c, k, grad);
  }
}

template <typename T, bool kGrad>
void loss_rows(const LossOperands& op) {
  using A = acc_t<T>;
  const int64_t blocks = (op.cols + kLossBlock - 1) / kLossBlock;
  const int64_t grain = std::max<int64_t>(1, 32768 / kLossBlock);
  // A large gradient is streamed (stream_output): DiffRec's loss forward + backward on 400 x 94,949
  // float32 took 36.5-40.8 ms with plain stores and 28.2-30.4 ms streamed (alternating processes).
  const bool stream = kGrad && stream_output<T>(op.grad, op.m, op.rows * op.cols * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, op.rows * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / blocks, j0 = (task % blocks) * kLossBlock;
      const int64_t n = std::min(kLossBlock, op.cols - j0);
      const T* m = static_cast<const T*>(op.m) + r * op.m_stride + j0;
      const T* x = static_cast<const T*>(op.x0) + r * op.x0_stride + j0;
      const T* z = op.z == nullptr ? nullptr : static_cast<const T*>(op.z) + r * op.z_stride + j0;
      const float* c = op.coef + 4 * r;
      const int mode = op.mode[r];
      if constexpr (kGrad) {
        T* g = static_cast<T*>(op.grad) + r * op.cols + j0;
        // plain: d/dm (target - m)^2 = -2 e; likelihood: d/dm e^2 / 2 = c4 e
        const A k = static_cast<A>(mode == kLikelihood ? op.scale[r] * static_cast<double>(c[3]) : -2.0 * op.scale[r]);
        stream_parts(stream, g, n, [&](auto streamed, int64_t j, int64_t len) {
          loss_mode_segment<T, true, decltype(streamed)::value>(mode, m + j, x + j, z ? z + j : z, len, c, k, g + j);
        });
      } else {
        op.partial[task] = loss_mode_segment<T, false, false>(mode, m, x, z, n, c, A(0), nullptr);
      }
    }
    if (stream) stream_fence();
  });
}

void diffusion_loss_kernel(const LossOperands& op, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "training_diffusion_loss",
                                  [&] { loss_rows<scalar_t, false>(op); });
}

void diffusion_loss_backward_kernel(const LossOperands& op, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "training_diffusion_loss_backward",
                                  [&] { loss_rows<scalar_t, true>(op); });
}

// --- BPR -------------------------------------------------------------------------------------
// sum_k a[k] * (b[k] - c[k]); c null: sum_k a[k] * b[k].
template <typename T>
C10_ALWAYS_INLINE acc_t<T> dot_diff(const T* a, const T* b, const T* c, int64_t d) {
  using A = acc_t<T>;
  using V = AVec<T>;
  constexpr int64_t kStep = 2 * V::size();
  V acc0(A(0)), acc1(A(0));
  int64_t k = 0;
  for (; k + kStep <= d; k += kStep) {
    V a0, a1, b0, b1;
    load2(a + k, a0, a1);
    load2(b + k, b0, b1);
    if (c != nullptr) {
      V c0, c1;
      load2(c + k, c0, c1);
      b0 = b0 - c0;
      b1 = b1 - c1;
    }
    acc0 = at::vec::fmadd(a0, b0, acc0);
    acc1 = at::vec::fmadd(a1, b1, acc1);
  }
  A s = lane_sum(acc0 + acc1);
  for (; k < d; ++k) {
    const A bv = static_cast<A>(b[k]) - (c != nullptr ? static_cast<A>(c[k]) : A(0));
    s += static_cast<A>(a[k]) * bv;
  }
  return s;
}

template <typename A>
inline A softplus(A x) {
  return x > A(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

template <typename A>
inline A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + std::exp(-x));
  const A e = std::exp(x);
  return e / (A(1) + e);
}

template <typename T>
struct BprRows {
  const T *u, *p, *n, *u0, *p0, *n0;
};

template <typename T>
inline BprRows<T> bpr_rows(const BprOperands& op, int64_t b) {
  const T* user = static_cast<const T*>(op.user);
  const T* item = static_cast<const T*>(op.item);
  BprRows<T> r;
  r.u = user + op.users[b] * op.user_stride;
  r.p = item + op.pos[b] * op.item_stride;
  r.n = item + op.neg[b] * op.item_stride;
  if (op.user_ego != nullptr) {
    r.u0 = static_cast<const T*>(op.user_ego) + op.users[b] * op.user_ego_stride;
    r.p0 = static_cast<const T*>(op.item_ego) + op.pos[b] * op.item_ego_stride;
    r.n0 = static_cast<const T*>(op.item_ego) + op.neg[b] * op.item_ego_stride;
  } else {
    r.u0 = r.u;
    r.p0 = r.p;
    r.n0 = r.n;
  }
  return r;
}

// Batch rows per task: at least 64K gathered values (a batch of 1,024 rows at d = 64), below which
// a parallel region costs more than the latency-bound gathers it shares out.
inline int64_t bpr_grain(int64_t d) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, d)); }

// <u, n - p> of batch rows begin .. end - 1, and with sq non-null the L2 sums |u0|^2 + |p0|^2 +
// |n0|^2: a loop of gathers and dot products only (the tail's exp / log1p calls kept out of it
// let the out-of-order core overlap the misses of many rows; 20% faster than one loop here).
template <typename T>
void bpr_scores(const BprOperands& op, int64_t begin, int64_t end, acc_t<T>* score, acc_t<T>* sq) {
  const T* none = nullptr;
  for (int64_t b = begin; b < end; ++b) {
    const BprRows<T> r = bpr_rows<T>(op, b);
    score[b - begin] = dot_diff(r.u, r.n, r.p, op.d);
    if (sq != nullptr)
      sq[b - begin] = dot_diff(r.u0, r.u0, none, op.d) + dot_diff(r.p0, r.p0, none, op.d) + dot_diff(r.n0, r.n0, none, op.d);
  }
}

template <typename T>
void bpr_forward(const BprOperands& op) {
  using A = acc_t<T>;
  const bool reg = op.weight_decay != 0.0;
  const A half_wd = static_cast<A>(0.5 * op.weight_decay);
  at::parallel_for(0, op.batch, bpr_grain(op.d), [&](int64_t begin, int64_t end) {
    std::vector<A> score(static_cast<size_t>(end - begin)), sq(reg ? score.size() : 0);
    bpr_scores<T>(op, begin, end, score.data(), reg ? sq.data() : nullptr);
    for (int64_t b = begin; b < end; ++b)
      op.rows[b] = static_cast<double>(softplus(score[b - begin]) + (reg ? half_wd * sq[b - begin] : A(0)));
  });
}

// dst[k] = c * (x[k] - y[k]) (y null: c * x[k]), in the compute dtype.
template <typename T>
void scaled_diff(acc_t<T>* dst, acc_t<T> c, const T* x, const T* y, int64_t d) {
  using A = acc_t<T>;
  using V = AVec<T>;
  constexpr int64_t kStep = 2 * V::size();
  const V vc(c);
  int64_t k = 0;
  for (; k + kStep <= d; k += kStep) {
    V x0, x1;
    load2(x + k, x0, x1);
    if (y != nullptr) {
      V y0, y1;
      load2(y + k, y0, y1);
      x0 = x0 - y0;
      x1 = x1 - y1;
    }
    (vc * x0).store(dst + k);
    (vc * x1).store(dst + k + V::size());
  }
  for (; k < d; ++k) dst[k] = c * (static_cast<A>(x[k]) - (y != nullptr ? static_cast<A>(y[k]) : A(0)));
}

// The entries of one gradient table grouped by destination row, in CSR form: row r's entries are
// source[start[r] .. start[r + 1]), each k * batch + b (batch row b of index array k), in batch
// order with array 0 before array 1 for the same batch row (a stable counting sort).
struct Grouping {
  std::vector<int64_t> start;   // (rows + 1,)
  std::vector<int64_t> source;  // (entries,)
};

inline Grouping group_entries(int64_t rows, std::initializer_list<const int64_t*> dests, int64_t batch) {
  Grouping g;
  g.start.assign(static_cast<size_t>(rows + 1), 0);
  for (const int64_t* dest : dests)
    for (int64_t b = 0; b < batch; ++b) g.start[dest[b] + 1] += 1;
  for (int64_t r = 0; r < rows; ++r) g.start[r + 1] += g.start[r];
  std::vector<int64_t> cursor(g.start.begin(), g.start.end() - 1);
  g.source.resize(static_cast<size_t>(g.start[rows]));
  for (int64_t b = 0; b < batch; ++b) {
    int64_t k = 0;
    for (const int64_t* dest : dests) g.source[cursor[dest[b]]++] = k++ * batch + b;
  }
  return g;
}

// One dense (rows, d) gradient table, every row written once: sign[k] * contrib[b] summed over its
// entries (k, b) (contrib null: none), plus, with an L2 term, wd * (sum of the entries' g) * l2[r];
// rows without entries get zeros.
template <typename T>
struct ScatterTable {
  T* out = nullptr;
  int64_t rows = 0;
  const Grouping* groups = nullptr;
  const acc_t<T>* contrib = nullptr;  // (batch, d)
  acc_t<T> sign[2] = {0, 0};          // per index array k
  const T* l2 = nullptr;
  int64_t l2_stride = 0;
};

template <typename T>
void write_table_row(const ScatterTable<T>& t, int64_t r, const BprOperands& op, acc_t<T>* acc) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  const int64_t B = op.batch, d = op.d;
  std::fill(acc, acc + d, A(0));
  A gsum(0);
  for (int64_t e = t.groups->start[r]; e < t.groups->start[r + 1]; ++e) {
    const int64_t src = t.groups->source[e], k = src / B, b = src - k * B;
    gsum += static_cast<A>(op.row_grad[b]);
    if (t.contrib == nullptr) continue;
    const V vs(t.sign[k]);
    const A* x = t.contrib + b * d;
    int64_t j = 0;
    for (; j + V::size() <= d; j += V::size()) at::vec::fmadd(vs, V::loadu(x + j), V::loadu(acc + j)).store(acc + j);
    for (; j < d; ++j) acc[j] += t.sign[k] * x[j];
  }
  if (t.l2 != nullptr) {
    const T* x = t.l2 + r * t.l2_stride;
    const A c = static_cast<A>(op.weight_decay) * gsum;
    for (int64_t j = 0; j < d; ++j) acc[j] += c * static_cast<A>(x[j]);
  }
  using FV = AVec<T>;
  constexpr int64_t kStep = 2 * FV::size();
  T* out = t.out + r * d;
  int64_t j = 0;
  for (; j + kStep <= d; j += kStep) store2(out + j, FV::loadu(acc + j), FV::loadu(acc + j + FV::size()));
  for (; j < d; ++j) out[j] = static_cast<T>(acc[j]);
}

template <typename T>
void bpr_backward(const BprOperands& op) {
  using A = acc_t<T>;
  const int64_t B = op.batch, d = op.d;
  const bool ego = op.user_ego != nullptr;
  // Pass 1, per batch row (c = g sigmoid(<u, n - p>)): the user entry's c (n - p) and the item
  // entries' c u (the positive's with sign -1, the negative's +1). The L2 terms need no rows: a
  // table row's L2 gradient is wd (sum of its entries' g) times the row itself.
  std::unique_ptr<A[]> user_contrib(new A[static_cast<size_t>(B * d)]);
  std::unique_ptr<A[]> item_contrib(new A[static_cast<size_t>(B * d)]);
  at::parallel_for(0, B, bpr_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<A> c(static_cast<size_t>(end - begin));
    bpr_scores<T>(op, begin, end, c.data(), nullptr);
    for (auto& v : c) v = sigmoid(v);
    for (int64_t b = begin; b < end; ++b) {  // the rows again, now in cache
      const BprRows<T> r = bpr_rows<T>(op, b);
      const A cb = static_cast<A>(op.row_grad[b]) * c[b - begin];
      scaled_diff<T>(user_contrib.get() + b * d, cb, r.n, r.p, d);
      scaled_diff<T>(item_contrib.get() + b * d, cb, r.u, static_cast<const T*>(nullptr), d);
    }
  });
  // Pass 2: each table written once, row by row in order (a sequential stream, like a memset).
  const Grouping by_user = group_entries(op.user_rows, {op.users}, B);
  const Grouping by_item = group_entries(op.item_rows, {op.pos, op.neg}, B);
  std::vector<ScatterTable<T>> tables(ego ? 4 : 2);
  ScatterTable<T>& user = tables[0];
  user.out = static_cast<T*>(op.g_user);
  user.rows = op.user_rows;
  user.groups = &by_user;
  user.contrib = user_contrib.get();
  user.sign[0] = A(1);
  ScatterTable<T>& item = tables[1];
  item.out = static_cast<T*>(op.g_item);
  item.rows = op.item_rows;
  item.groups = &by_item;
  item.contrib = item_contrib.get();
  item.sign[0] = A(-1);
  item.sign[1] = A(1);
  if (op.weight_decay != 0.0 && !ego) {  // MF-BPR: the L2 term is on the scored rows
    user.l2 = static_cast<const T*>(op.user);
    user.l2_stride = op.user_stride;
    item.l2 = static_cast<const T*>(op.item);
    item.l2_stride = op.item_stride;
  }
  // The ego tables are indexed like the score tables, so they share their groupings when their
  // row counts agree.
  Grouping by_user_ego, by_item_ego;
  if (ego) {
    ScatterTable<T>& user0 = tables[2];
    user0.out = static_cast<T*>(op.g_user_ego);
    user0.rows = op.user_ego_rows;
    if (op.user_ego_rows != op.user_rows) by_user_ego = group_entries(op.user_ego_rows, {op.users}, B);
    user0.groups = op.user_ego_rows == op.user_rows ? &by_user : &by_user_ego;
    user0.l2 = static_cast<const T*>(op.user_ego);
    user0.l2_stride = op.user_ego_stride;
    ScatterTable<T>& item0 = tables[3];
    item0.out = static_cast<T*>(op.g_item_ego);
    item0.rows = op.item_ego_rows;
    if (op.item_ego_rows != op.item_rows) by_item_ego = group_entries(op.item_ego_rows, {op.pos, op.neg}, B);
    item0.groups = op.item_ego_rows == op.item_rows ? &by_item : &by_item_ego;
    item0.l2 = static_cast<const T*>(op.item_ego);
    item0.l2_stride = op.item_ego_stride;
  }
  std::vector<int64_t> offset(tables.size() + 1, 0);
  for (size_t k = 0; k < tables.size(); ++k) offset[k + 1] = offset[k] + tables[k].rows;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 19) / std::max<int64_t>(1, d));  // 2 MB of float32 rows
  at::parallel_for(0, offset.back(), grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(static_cast<size_t>(d));
    int64_t i = begin;
    while (i < end) {
      const size_t k = static_cast<size_t>(std::upper_bound(offset.begin(), offset.end(), i) - offset.begin() - 1);
      const ScatterTable<T>& table = tables[k];
      const std::vector<int64_t>& start = table.groups->start;
      const int64_t stop = std::min(end, offset[k + 1]) - offset[k];  // rows of this table in the task
      const auto next_with_entries = [&](int64_t r) {
        while (r < stop && start[r] == start[r + 1]) ++r;
        return r;
      };
      int64_t r = i - offset[k];
      while (r < stop) {
        const int64_t next = next_with_entries(r);
        if (next > r) {  // rows without entries: one memset for the run
          std::memset(static_cast<void*>(table.out + r * d), 0, static_cast<size_t>((next - r) * d) * sizeof(T));
          r = next;
          continue;
        }
        write_table_row(table, r, op, acc.data());
        ++r;
      }
      i = offset[k] + stop;
    }
  });
}

void bpr_loss_kernel(const BprOperands& op, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "training_bpr_loss",
                                  [&] { bpr_forward<scalar_t>(op); });
}

void bpr_loss_backward_kernel(const BprOperands& op, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "training_bpr_loss_backward",
                                  [&] { bpr_backward<scalar_t>(op); });
}

// --- InfoNCE ---------------------------------------------------------------------------------
// In place over one row of n logits (already divided by tau): returns logsumexp; with kProbs,
// the row becomes exp(l - lse) (the softmax).
template <typename A, bool kProbs>
A logsumexp_row(A* l, int64_t n) {
  using V = at::vec::Vectorized<A>;
  V vmax(-std::numeric_limits<A>::infinity());
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) vmax = at::vec::maximum(vmax, V::loadu(l + j));
  alignas(64) A lanes[V::size()];
  vmax.store(lanes);
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t k = 0; k < V::size(); ++k) mx = std::max(mx, lanes[k]);
  for (; j < n; ++j) mx = std::max(mx, l[j]);
  const V vmx(mx);
  V acc(A(0));
  j = 0;
  for (; j + V::size() <= n; j += V::size()) acc = acc + (V::loadu(l + j) - vmx).exp();
  A s = lane_sum(acc);
  for (; j < n; ++j) s += std::exp(l[j] - mx);
  const A lse = mx + std::log(s);
  if constexpr (kProbs) {
    const V vlse(lse);
    j = 0;
    for (; j + V::size() <= n; j += V::size()) (V::loadu(l + j) - vlse).exp().store(l + j);
    for (; j < n; ++j) l[j] = std::exp(l[j] - lse);
  }
  return lse;
}

// Block [i0, i0 + r) of rows of L = x y^T / tau into buf (r, B) contiguous: one GEMM.
inline at::Tensor logits_block(const at::Tensor& x, const at::Tensor& y, int64_t i0, int64_t r, double tau,
                               at::Tensor& buf) {
  at::Tensor block = buf.narrow(0, 0, r);
  at::mm_out(block, x.narrow(0, i0, r), y.t());
  block.div_(tau);
  return block;
}

template <typename A>
void nce_forward(const NceOperands& op) {
  const int64_t B = op.batch, blocks = (B + kNceRows - 1) / kNceRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({kNceRows, B}, op.a.options());
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kNceRows, r = std::min(kNceRows, B - i0);
      at::Tensor block = logits_block(op.a, op.b, i0, r, op.temperature, buf);
      A* l = block.data_ptr<A>();
      for (int64_t i = 0; i < r; ++i) {
        A* row = l + i * B;
        const A diag = row[i0 + i];
        op.rows[i0 + i] = static_cast<double>(logsumexp_row<A, false>(row, B) - diag);
      }
    }
  });
}

template <typename A>
void nce_backward(const NceOperands& op) {
  const int64_t B = op.batch, blocks = (B + kNceRows - 1) / kNceRows;
  const int64_t parts = std::min(kNceParts, blocks);
  std::vector<A> g(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) g[i] = static_cast<A>(op.row_grad[i]);
  // Per row block: P = softmax(L), Q = g_i (P - I); dA = Q B / tau, dB += Q^T A / tau. The row
  // blocks fall into `parts` fixed ranges, each summing its own dB, added in order at the end.
  at::Tensor partial = at::zeros({parts, B, op.d}, op.a.options());
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({kNceRows, B}, op.a.options());
    for (int64_t part = begin; part < end; ++part) {
      at::Tensor db = partial.select(0, part);
      for (int64_t blk = part * blocks / parts; blk < (part + 1) * blocks / parts; ++blk) {
        const int64_t i0 = blk * kNceRows, r = std::min(kNceRows, B - i0);
        at::Tensor block = logits_block(op.a, op.b, i0, r, op.temperature, buf);
        A* l = block.data_ptr<A>();
        for (int64_t i = 0; i < r; ++i) {
          A* row = l + i * B;
          logsumexp_row<A, true>(row, B);
          const A gi = g[i0 + i];
          for (int64_t j = 0; j < B; ++j) row[j] *= gi;
          row[i0 + i] -= gi;
        }
        at::Tensor out = op.grad_a.narrow(0, i0, r);
        at::mm_out(out, block, op.b);
        db.addmm_(block.t(), op.a.narrow(0, i0, r));
      }
    }
  });
  op.grad_a.div_(op.temperature);
  op.grad_b.copy_(partial.sum(0));
  op.grad_b.div_(op.temperature);
}

void info_nce_kernel(const NceOperands& op) {
  if (op.a.scalar_type() == at::kDouble) {
    nce_forward<double>(op);
  } else {
    nce_forward<float>(op);
  }
}

void info_nce_backward_kernel(const NceOperands& op) {
  if (op.a.scalar_type() == at::kDouble) {
    nce_backward<double>(op);
  } else {
    nce_backward<float>(op);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(void diffusion_loss_kernel(const diffcore::cpu::LossOperands&, at::ScalarType))
DIFFCORE_ISA_DECLARE(void diffusion_loss_backward_kernel(const diffcore::cpu::LossOperands&, at::ScalarType))
DIFFCORE_ISA_DECLARE(void bpr_loss_kernel(const diffcore::cpu::BprOperands&, at::ScalarType))
DIFFCORE_ISA_DECLARE(void bpr_loss_backward_kernel(const diffcore::cpu::BprOperands&, at::ScalarType))
DIFFCORE_ISA_DECLARE(void info_nce_kernel(const diffcore::cpu::NceOperands&))
DIFFCORE_ISA_DECLARE(void info_nce_backward_kernel(const diffcore::cpu::NceOperands&))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_loss_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, name,
              ": expected float32, float16, bfloat16 or float64, got ", dt);
}


void check_rows_operand(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_same_device(t, ref, name, ref_name);
  check_same_dtype(t, ref, name, ref_name);
  check_same_shape(t, ref, name, ref_name);
}

// The reduction a loss op applies to its per-row values: 0 none, 1 mean, 2 sum.
int reduction_code(std::string_view reduction) {
  if (reduction == "none") return 0;
  if (reduction == "mean") return 1;
  TORCH_CHECK(reduction == "sum", "reduction: expected 'mean', 'sum' or 'none', got '", reduction, "'");
  return 2;
}

// Per-row values (double) reduced and stored in dtype: (B,) for none, () otherwise.
at::Tensor reduce_rows(const std::vector<double>& rows, int code, const at::TensorOptions& options) {
  const int64_t B = static_cast<int64_t>(rows.size());
  at::Tensor values = at::from_blob(const_cast<double*>(rows.data()), {B}, at::dtype(at::kDouble));
  if (code == 0) return values.to(options.dtype_opt()->toScalarType()).clone();
  double s = 0.0;
  for (double v : rows) s += v;  // in batch order
  if (code == 1) s /= static_cast<double>(B);
  return at::scalar_tensor(s, at::dtype(at::kDouble)).to(options.dtype_opt()->toScalarType());
}

// d total / d row_b from the gradient of the reduced output.
std::vector<double> row_gradients(const at::Tensor& grad, int code, int64_t B) {
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  std::vector<double> out(static_cast<size_t>(B));
  if (code == 0) {
    TORCH_CHECK(g.numel() == B, "grad: expected ", B, " values, got ", g.numel());
    std::copy(g.data_ptr<double>(), g.data_ptr<double>() + B, out.begin());
  } else {
    TORCH_CHECK(g.numel() == 1, "grad: expected a scalar, got ", g.numel(), " values");
    const double v = g.data_ptr<double>()[0] / (code == 1 ? static_cast<double>(B) : 1.0);
    std::fill(out.begin(), out.end(), v);
  }
  return out;
}

// --- diffusion loss --------------------------------------------------------------------------
struct LossSetup {
  at::Tensor m, x0, z;
  std::vector<int8_t> mode;
  std::vector<float> coef;
  std::vector<double> weight;  // w_r / pt_r
};

LossSetup loss_setup(const at::Tensor& model_out, const at::Tensor& x0, const OptTensor& noise, const at::Tensor& t,
                     const at::Tensor& table, const OptTensor& pt, bool eps, bool reweight) {
  check_dim(model_out, 2, "model_out");
  check_loss_dtype(model_out, "model_out");
  check_rows_operand(x0, model_out, "x0", "model_out");
  if (noise) check_rows_operand(*noise, model_out, "noise", "model_out");
  TORCH_CHECK(!eps || noise.has_value(), "noise: prediction='eps' needs the noise (its target)");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 5, "training_diffusion_loss: table must be (T, 5), got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kDouble || table.scalar_type() == at::kFloat,
              "training_diffusion_loss: table must be float64 or float32, got ", table.scalar_type());
  check_same_device(table, model_out, "table", "model_out");
  const int64_t rows = model_out.size(0), K = table.size(0);
  TORCH_CHECK(t.scalar_type() == at::kLong, "t: expected an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1 || t.numel() == rows, "t: expected ", rows, " timesteps (one per row) or 1, got ",
              t.numel());
  check_same_device(t, model_out, "t", "model_out");
  if (pt) {
    TORCH_CHECK(pt->dim() == 1 && pt->numel() == rows, "pt: expected shape (", rows, "), got ", pt->sizes());
    TORCH_CHECK(at::isFloatingType(pt->scalar_type()), "pt: expected a float tensor, got ", pt->scalar_type());
    check_same_device(*pt, model_out, "pt", "model_out");
  }
  LossSetup s;
  s.m = unit_cols(model_out);
  s.x0 = unit_cols(x0);
  if (noise) s.z = unit_cols(*noise);
  const at::Tensor tab = table.to(at::kDouble).contiguous();
  const double* tp = tab.data_ptr<double>();
  const at::Tensor tc = t.contiguous();
  const int64_t* ts = tc.data_ptr<int64_t>();
  const at::Tensor pc = pt ? pt->to(at::kDouble).contiguous() : at::Tensor();
  s.mode.resize(rows);
  s.coef.resize(4 * rows);
  s.weight.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = tc.numel() == 1 ? 0 : r;
    const int64_t k = ts[i];
    TORCH_CHECK(k >= 0 && k < K, "t: every timestep must lie in [0, ", K, "), got t[", i, "] = ", k);
    double w = reweight ? tp[5 * k] : 1.0;
    if (pt) {
      const double p = pc.data_ptr<double>()[r];
      TORCH_CHECK(p > 0.0, "pt: every probability must be positive, got pt[", r, "] = ", p);
      w /= p;
    }
    s.weight[r] = w;
    s.mode[r] = !eps ? kTargetX0 : (reweight && k == 0 ? kLikelihood : kTargetNoise);
    for (int c = 0; c < 4; ++c) s.coef[4 * r + c] = static_cast<float>(tp[5 * k + 1 + c]);
  }
  return s;
}

LossOperands loss_operands(const LossSetup& s) {
  LossOperands op;
  op.rows = s.m.size(0);
  op.cols = s.m.size(1);
  op.m = s.m.data_ptr();
  op.m_stride = s.m.stride(0);
  op.x0 = s.x0.data_ptr();
  op.x0_stride = s.x0.stride(0);
  if (s.z.defined()) {
    op.z = s.z.data_ptr();
    op.z_stride = s.z.stride(0);
  }
  op.mode = s.mode.data();
  op.coef = s.coef.data();
  return op;
}

at::Tensor training_diffusion_loss(const at::Tensor& model_out, const at::Tensor& x0, const OptTensor& noise,
                                   const at::Tensor& t, const at::Tensor& table, const OptTensor& pt, bool eps,
                                   bool reweight) {
  const LossSetup s = loss_setup(model_out, x0, noise, t, table, pt, eps, reweight);
  LossOperands op = loss_operands(s);
  const int64_t blocks = std::max<int64_t>(1, (op.cols + kLossBlock - 1) / kLossBlock);
  std::vector<double> partial(static_cast<size_t>(op.rows * blocks), 0.0);
  op.partial = partial.data();
  if (op.rows > 0 && op.cols > 0) DIFFCORE_ISA_CALL(diffusion_loss_kernel, op, model_out.scalar_type());
  at::Tensor out = at::empty({op.rows}, model_out.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t r = 0; r < op.rows; ++r) {
    double sum = 0.0;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[r * blocks + b];
    const double term = sum / static_cast<double>(op.cols) * (s.mode[r] == kLikelihood ? 0.5 : 1.0);
    o[r] = s.weight[r] * term;
  }
  return out;
}

at::Tensor training_diffusion_loss_backward(const at::Tensor& grad, const at::Tensor& model_out, const at::Tensor& x0,
                                            const OptTensor& noise, const at::Tensor& t, const at::Tensor& table,
                                            const OptTensor& pt, bool eps, bool reweight) {
  const LossSetup s = loss_setup(model_out, x0, noise, t, table, pt, eps, reweight);
  LossOperands op = loss_operands(s);
  TORCH_CHECK(grad.numel() == op.rows, "grad: expected ", op.rows, " values (one per row), got ", grad.numel());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  std::vector<double> scale(static_cast<size_t>(op.rows));
  for (int64_t r = 0; r < op.rows; ++r)
    scale[r] = g.data_ptr<double>()[r] * s.weight[r] / static_cast<double>(op.cols);
  op.scale = scale.data();
  at::Tensor out = empty_output(model_out.sizes(), model_out.options());
  op.grad = out.data_ptr();
  if (op.rows > 0 && op.cols > 0) DIFFCORE_ISA_CALL(diffusion_loss_backward_kernel, op, model_out.scalar_type());
  return out;
}

// --- history update --------------------------------------------------------------------------
void training_history_update_(at::Tensor& history, at::Tensor& count, const at::Tensor& t, const at::Tensor& losses) {
  check_dim(history, 2, "history");
  TORCH_CHECK(history.scalar_type() == at::kDouble, "history: expected float64, got ", history.scalar_type());
  check_dim(count, 1, "count");
  TORCH_CHECK(count.scalar_type() == at::kLong, "count: expected int64, got ", count.scalar_type());
  TORCH_CHECK(count.size(0) == history.size(0), "count: expected ", history.size(0),
              " counts (one per timestep), got ", count.size(0));
  check_dim(t, 1, "t");
  TORCH_CHECK(t.scalar_type() == at::kLong, "t: expected an int64 tensor, got ", t.scalar_type());
  check_dim(losses, 1, "losses");
  TORCH_CHECK(at::isFloatingType(losses.scalar_type()), "losses: expected a float tensor, got ", losses.scalar_type());
  TORCH_CHECK(losses.size(0) == t.size(0), "losses: expected ", t.size(0), " values (one per timestep), got ",
              losses.size(0));
  for (const at::Tensor* v : std::initializer_list<const at::Tensor*>{&count, &t, &losses})
    check_same_device(*v, history, "t, count and losses", "history");
  const int64_t K = history.size(0), H = history.size(1), B = t.size(0);
  const at::Tensor tc = t.contiguous();
  const int64_t* ts = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ts[b] >= 0 && ts[b] < K, "t: every timestep must lie in [0, ", K, "), got t[", b, "] = ", ts[b]);
  int64_t* cnt = count.data_ptr<int64_t>();
  const int64_t cs = count.stride(0);
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(cnt[k * cs] >= 0 && cnt[k * cs] <= H, "count: every count must lie in [0, ", H, "], got count[", k,
                "] = ", cnt[k * cs]);
  const at::Tensor lc = losses.to(at::kDouble).contiguous();
  const double* ls = lc.data_ptr<double>();
  double* hist = history.data_ptr<double>();
  const int64_t s0 = history.stride(0), s1 = history.stride(1);
  for (int64_t b = 0; b < B; ++b) {  // DiffRec's loop, in batch order
    double* row = hist + ts[b] * s0;
    int64_t& c = cnt[ts[b] * cs];
    if (c == H) {
      for (int64_t j = 0; j + 1 < H; ++j) row[j * s1] = row[(j + 1) * s1];
      row[(H - 1) * s1] = ls[b];
    } else {
      row[c * s1] = ls[b];
      c += 1;
    }
  }
}

// --- BPR -------------------------------------------------------------------------------------
struct BprSetup {
  at::Tensor user, item, user_ego, item_ego;
  at::Tensor users, pos, neg;  // int64, contiguous
  int code = 1;
};

at::Tensor index_column(const at::Tensor& idx, const char* name, int64_t n, const char* what, int64_t batch) {
  check_dim(idx, 1, name);
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, name,
              ": expected an int64 or int32 tensor, got ", idx.scalar_type());
  TORCH_CHECK(idx.size(0) == batch, name, ": expected ", batch, " indices (the batch of users), got ", idx.size(0));
  at::Tensor c = idx.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] < n, name, ": every ", what, " must lie in [0, ", n, "), got ", name, "[", b,
                "] = ", p[b]);
  return c;
}

BprSetup bpr_setup(const at::Tensor& user_table, const at::Tensor& item_table, const at::Tensor& users,
                   const at::Tensor& pos, const at::Tensor& neg, const OptTensor& user_ego, const OptTensor& item_ego,
                   std::string_view reduction) {
  check_dim(user_table, 2, "user_table");
  check_loss_dtype(user_table, "user_table");
  check_dim(item_table, 2, "item_table");
  check_same_dtype(item_table, user_table, "item_table", "user_table");
  check_same_device(item_table, user_table, "item_table", "user_table");
  TORCH_CHECK(item_table.size(1) == user_table.size(1), "item_table: expected ", user_table.size(1),
              " columns (the width of user_table), got ", item_table.size(1));
  TORCH_CHECK(user_ego.has_value() == item_ego.has_value(), "user_ego and item_ego: give both or neither");
  BprSetup s;
  s.code = reduction_code(reduction);
  s.user = unit_cols(user_table);
  s.item = unit_cols(item_table);
  const int64_t B = users.dim() == 1 ? users.size(0) : 0;
  s.users = index_column(users, "users", user_table.size(0), "index", B);
  s.pos = index_column(pos, "pos", item_table.size(0), "index", B);
  s.neg = index_column(neg, "neg", item_table.size(0), "index", B);
  for (const auto* v : {&users, &pos, &neg}) check_same_device(*v, user_table, "users, pos and neg", "user_table");
  if (user_ego) {
    for (const auto* v : {&*user_ego, &*item_ego}) {
      check_dim(*v, 2, "ego");
      check_same_dtype(*v, user_table, "ego", "user_table");
      check_same_device(*v, user_table, "ego", "user_table");
      TORCH_CHECK(v->size(1) == user_table.size(1), "ego: expected ", user_table.size(1), " columns, got ", v->size(1));
    }
    index_column(users, "users", user_ego->size(0), "index of user_ego", B);
    index_column(pos, "pos", item_ego->size(0), "index of item_ego", B);
    index_column(neg, "neg", item_ego->size(0), "index of item_ego", B);
    s.user_ego = unit_cols(*user_ego);
    s.item_ego = unit_cols(*item_ego);
  }
  return s;
}

BprOperands bpr_operands(const BprSetup& s, double weight_decay) {
  BprOperands op;
  op.batch = s.users.size(0);
  op.d = s.user.size(1);
  op.user = s.user.data_ptr();
  op.user_stride = s.user.stride(0);
  op.item = s.item.data_ptr();
  op.item_stride = s.item.stride(0);
  if (s.user_ego.defined()) {
    op.user_ego = s.user_ego.data_ptr();
    op.user_ego_stride = s.user_ego.stride(0);
    op.item_ego = s.item_ego.data_ptr();
    op.item_ego_stride = s.item_ego.stride(0);
  }
  op.user_rows = s.user.size(0);
  op.item_rows = s.item.size(0);
  if (s.user_ego.defined()) {
    op.user_ego_rows = s.user_ego.size(0);
    op.item_ego_rows = s.item_ego.size(0);
  }
  op.users = s.users.data_ptr<int64_t>();
  op.pos = s.pos.data_ptr<int64_t>();
  op.neg = s.neg.data_ptr<int64_t>();
  op.weight_decay = weight_decay;
  return op;
}

at::Tensor training_bpr_loss(const at::Tensor& user_table, const at::Tensor& item_table, const at::Tensor& users,
                             const at::Tensor& pos, const at::Tensor& neg, const OptTensor& user_ego,
                             const OptTensor& item_ego, double weight_decay, c10::string_view reduction) {
  const BprSetup s = bpr_setup(user_table, item_table, users, pos, neg, user_ego, item_ego, reduction);
  BprOperands op = bpr_operands(s, weight_decay);
  std::vector<double> rows(static_cast<size_t>(op.batch));
  op.rows = rows.data();
  if (op.batch > 0) DIFFCORE_ISA_CALL(bpr_loss_kernel, op, user_table.scalar_type());
  return reduce_rows(rows, s.code, user_table.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> training_bpr_loss_backward(
    const at::Tensor& grad, const at::Tensor& user_table, const at::Tensor& item_table, const at::Tensor& users,
    const at::Tensor& pos, const at::Tensor& neg, const OptTensor& user_ego, const OptTensor& item_ego,
    double weight_decay, c10::string_view reduction) {
  const BprSetup s = bpr_setup(user_table, item_table, users, pos, neg, user_ego, item_ego, reduction);
  BprOperands op = bpr_operands(s, weight_decay);
  const std::vector<double> row_grad = row_gradients(grad, s.code, op.batch);
  op.row_grad = row_grad.data();
  // written entirely by the kernel: every row gets its gradient or zeros
  at::Tensor g_user = empty_output(user_table.sizes(), user_table.options());
  at::Tensor g_item = empty_output(item_table.sizes(), item_table.options());
  at::Tensor g_user_ego = user_ego ? empty_output(user_ego->sizes(), user_ego->options()) : user_table.new_empty({0});
  at::Tensor g_item_ego = item_ego ? empty_output(item_ego->sizes(), item_ego->options()) : item_table.new_empty({0});
  op.g_user = g_user.data_ptr();
  op.g_item = g_item.data_ptr();
  if (user_ego) {
    op.g_user_ego = g_user_ego.data_ptr();
    op.g_item_ego = g_item_ego.data_ptr();
  }
  if (op.d > 0) DIFFCORE_ISA_CALL(bpr_loss_backward_kernel, op, user_table.scalar_type());
  return {g_user, g_item, g_user_ego, g_item_ego};
}

// --- InfoNCE ---------------------------------------------------------------------------------
constexpr double kNormEps = 1e-12;  // F.normalize's eps

void nce_checks(const at::Tensor& a, const at::Tensor& b, double temperature) {
  check_dim(a, 2, "a");
  check_loss_dtype(a, "a");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == a.size(0), "b: expected ", a.size(0), " rows (the batch of a), got shape ",
              b.sizes());
  check_rows_operand(b, a, "b", "a");
  TORCH_CHECK(temperature > 0.0, "temperature: expected a positive float, got ", temperature);
}

// Rows in the compute dtype, L2-normalised when cosine: x / max(|x|, eps). Also returns the norms.
at::Tensor nce_rows(const at::Tensor& x, bool cosine, at::Tensor* norms) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = x.to(acc).contiguous().clone();
  if (!cosine) return y;
  *norms = y.norm(2, {1}, true).clamp_min(kNormEps);
  return y.div_(*norms);
}

at::Tensor training_info_nce(const at::Tensor& a, const at::Tensor& b, double temperature, bool cosine,
                             c10::string_view reduction) {
  nce_checks(a, b, temperature);
  const int code = reduction_code(reduction);
  at::Tensor norms;
  NceOperands op;
  op.batch = a.size(0);
  op.d = a.size(1);
  op.a = nce_rows(a, cosine, &norms);
  op.b = nce_rows(b, cosine, &norms);
  op.temperature = temperature;
  std::vector<double> rows(static_cast<size_t>(op.batch));
  op.rows = rows.data();
  if (op.batch > 0) DIFFCORE_ISA_CALL(info_nce_kernel, op);
  return reduce_rows(rows, code, a.options());
}

// d/dx of x^ = x / max(|x|, eps) applied to g^: (g^ - x^ <x^, g^>) / |x| where |x| > eps, g^ / eps else.
at::Tensor normalize_backward(const at::Tensor& xhat, const at::Tensor& norms, const at::Tensor& ghat) {
  const at::Tensor radial = xhat.mul(xhat.mul(ghat).sum(1, true));
  return at::where(norms.gt(kNormEps), ghat.sub(radial).div(norms), ghat.div(kNormEps));
}

std::tuple<at::Tensor, at::Tensor> training_info_nce_backward(const at::Tensor& grad, const at::Tensor& a,
                                                              const at::Tensor& b, double temperature, bool cosine,
                                                              c10::string_view reduction) {
  nce_checks(a, b, temperature);
  const int code = reduction_code(reduction);
  at::Tensor a_norms, b_norms;
  NceOperands op;
  op.batch = a.size(0);
  op.d = a.size(1);
  op.a = nce_rows(a, cosine, &a_norms);
  op.b = nce_rows(b, cosine, &b_norms);
  op.temperature = temperature;
  const std::vector<double> row_grad = row_gradients(grad, code, op.batch);
  op.row_grad = row_grad.data();
  op.grad_a = at::empty_like(op.a);
  op.grad_b = at::empty_like(op.b);
  if (op.batch > 0) DIFFCORE_ISA_CALL(info_nce_backward_kernel, op);
  at::Tensor ga = op.grad_a, gb = op.grad_b;
  if (cosine) {
    ga = normalize_backward(op.a, a_norms, ga);
    gb = normalize_backward(op.b, b_norms, gb);
  }
  return {ga.to(a.scalar_type()).contiguous(), gb.to(b.scalar_type()).contiguous()};
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("training_diffusion_loss", &diffcore::cpu::training_diffusion_loss);
  m.impl("training_diffusion_loss_backward", &diffcore::cpu::training_diffusion_loss_backward);
  m.impl("training_history_update_", &diffcore::cpu::training_history_update_);
  m.impl("training_bpr_loss", &diffcore::cpu::training_bpr_loss);
  m.impl("training_bpr_loss_backward", &diffcore::cpu::training_bpr_loss_backward);
  m.impl("training_info_nce", &diffcore::cpu::training_info_nce);
  m.impl("training_info_nce_backward", &diffcore::cpu::training_info_nce_backward);
}
#endif
