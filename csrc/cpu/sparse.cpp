// sparse family, CPU: CSR SpMM with the graph normalisation applied on the fly, and whole
// LightGCN stacks in one call.
//
//   A_hat[r, c] = rs[r] * v[e] * cs[c]          (rs, v, cs each optional: ones; e indexes row r's
//                                                nonzeros; sym: rs = cs = D^-1/2, row: rs = D^-1)
//   spmm:       out[r, :] = rs[r] * sum_e v[e] cs[col[e]] X[col[e], :]
//   propagate:  E_0 = X, E_k = A_hat E_{k-1},  out = sum_k w_k E_k   (layers never stacked)
//
// No normalised value array exists: the scalings are read per row (rs) and per nonzero (cs).
// propagate keeps the layers in the scaled form S_k = cs * E_k (float32, or float64 for float64
// features), so from layer 2 on a nonzero costs one load of S[col] and one add (times v[e] when
// the graph is weighted): E_{k+1}[r] = rs[r] sum_e v[e] S_k[col[e]]. The same pass that writes a
// row of E_k adds w_k E_k[r] into the combine, so no layer is kept beyond the next one.
//
// Rows are split among threads by work, not by count: crow is the prefix sum of the nonzeros, so
// a binary search on crow[r] + kRowCost * r gives every thread the same number of gathered rows
// (a power-law graph's hubs do not land on one thread). Each row is accumulated in registers,
// vectorised over the feature dimension with at::vec (blocks of 8, 4, 2, 1 vectors, then a scalar
// tail); float16/bfloat16 features accumulate in float32. The S_k buffers, which every layer
// gathers from at random, come back to the next call from the block pool and are backed by huge
// pages where the OS allows (gather_scratch, memory.h).
//
// Compiled once per instruction set; the DEFAULT build also holds the op entry points.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

#include "csr.h"

#include <algorithm>
#include <atomic>
#include <optional>
#include <type_traits>
#include <vector>

namespace diffcore::cpu {

struct SpmmOperands {
  CsrView a;
  int64_t d = 0;
  const void* x = nullptr;  // (cols, d), unit column stride
  int64_t x_stride = 0;
  void* out = nullptr;  // (rows, d), unit column stride
  int64_t out_stride = 0;
};

struct PropagateOperands {
  CsrView a;  // square
  int64_t d = 0;
  const void* x = nullptr;  // E_0: (rows, d), unit column stride
  int64_t x_stride = 0;
  void* out = nullptr;  // (rows, d) in x's dtype, unit column stride
  int64_t out_stride = 0;
  void* combine = nullptr;  // (rows, d) accumulation-dtype running sum; may be `out` itself
  int64_t combine_stride = 0;
  void* layer[2] = {nullptr, nullptr};  // (rows, d) accumulation-dtype S_k buffers, stride d
  const double* weights = nullptr;      // (layers + 1,)
  int64_t layers = 0;
};

inline namespace CPU_CAPABILITY {

template <typename A>
using AVec = at::vec::Vectorized<A>;

template <typename T, typename A>
inline AVec<A> load_vec(const T* p) {
  if constexpr (std::is_same_v<T, A>) {
    return AVec<A>::loadu(p);
  } else {
    AVec<float> v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T, typename A>
inline void store_vec(T* p, const AVec<A>& v) {
  if constexpr (std::is_same_v<T, A>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, AVec<A>::size());
  }
}

// The rows' input: Y (rows of the right-hand side) read as T, per-nonzero weight v[e] * cs[c]
// (cs only when `scale_in`).
template <typename T>
struct Input {
  const T* y;
  int64_t stride;
  bool scale_in;
};

// out[0..NV) = sum_e w_e y[col[e], 0 : NV * L] with w_e = v[e] (kVal) * cs[col[e]] (kScale).
// Accumulates in registers, in two interleaved sets (even and odd nonzeros): one chain of adds
// would be bound by the add's latency. Sets `bad` (and stops) on a column index out of range.
template <int NV, bool kVal, bool kScale, typename A, typename T, typename Idx>
inline void gather(AVec<A>* out, const Idx* __restrict col, const float* __restrict val,
                   const float* __restrict cs, const T* __restrict y, int64_t ys, uint64_t cols,
                   int64_t e0, int64_t e1, bool& bad) {
  constexpr int64_t L = AVec<A>::size();
  constexpr int64_t kAhead = 8;  // nonzeros prefetched ahead: the rows of y are scattered
  constexpr int64_t kLines = (NV * L * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  AVec<A> acc0[NV], acc1[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = AVec<A>(A(0));
  auto weight = [&](int64_t e, uint64_t c) {
    A w = A(1);
    if constexpr (kVal) w = static_cast<A>(val[e]);
    if constexpr (kScale) w *= static_cast<A>(cs[c]);
    return w;
  };
  auto prefetch = [&](int64_t e) {
    if (e < e1) {
      const char* p = reinterpret_cast<const char*>(y + static_cast<int64_t>(col[e]) * ys);
#pragma GCC unroll 8
      for (int64_t l = 0; l < kLines; ++l) __builtin_prefetch(p + 64 * l);
    }
  };
  int64_t e = e0;
  for (; e + 1 < e1; e += 2) {
    prefetch(e + kAhead);
    prefetch(e + kAhead + 1);
    const uint64_t c0 = static_cast<uint64_t>(col[e]), c1 = static_cast<uint64_t>(col[e + 1]);
    if (C10_UNLIKELY(c0 >= cols || c1 >= cols)) {
      bad = true;
      return;
    }
    const T* y0 = y + static_cast<int64_t>(c0) * ys;
    const T* y1 = y + static_cast<int64_t>(c1) * ys;
    if constexpr (kVal || kScale) {
      const AVec<A> w0(weight(e, c0)), w1(weight(e + 1, c1));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        acc0[v] = at::vec::fmadd(w0, load_vec<T, A>(y0 + v * L), acc0[v]);
        acc1[v] = at::vec::fmadd(w1, load_vec<T, A>(y1 + v * L), acc1[v]);
      }
    } else {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        acc0[v] = acc0[v] + load_vec<T, A>(y0 + v * L);
        acc1[v] = acc1[v] + load_vec<T, A>(y1 + v * L);
      }
    }
  }
  if (e < e1) {
    const uint64_t c = static_cast<uint64_t>(col[e]);
    if (C10_UNLIKELY(c >= cols)) {
      bad = true;
      return;
    }
    const T* yc = y + static_cast<int64_t>(c) * ys;
    const AVec<A> w(weight(e, c));
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc0[v] = at::vec::fmadd(w, load_vec<T, A>(yc + v * L), acc0[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) out[v] = acc0[v] + acc1[v];
}

// Every row in [r0, r1): accumulates A_hat[r, :] Y block by block and hands each block of
// feature columns to the epilogue: epi.vec(r, j, e) for a vector at column j, epi.scalar(r, j, e)
// for a tail column, with e = rs[r] * sum.
template <bool kVal, bool kScale, typename A, typename T, typename Idx, typename Epi>
void rows_pass(const CsrView& a, const Input<T>& in, int64_t d, int64_t r0, int64_t r1, Epi& epi,
               bool& bad) {
  constexpr int64_t L = AVec<A>::size();
  const Idx* col = static_cast<const Idx*>(a.col);
  const int64_t* crow = a.crow;
  const float* val = a.val;
  const float* cs = a.col_scale;
  const float* rsp = a.row_scale;
  const T* y = in.y;
  const int64_t ys = in.stride;
  const uint64_t cols = static_cast<uint64_t>(a.cols);
  AVec<A> acc[8];
  for (int64_t r = r0; r < r1 && !bad; ++r) {
    const int64_t e0 = crow[r], e1 = crow[r + 1];
    const A rs = rsp != nullptr ? static_cast<A>(rsp[r]) : A(1);
    const AVec<A> vrs(rs);
    int64_t j = 0;
    auto block = [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      gather<NV, kVal, kScale, A>(acc, col, val, cs, y + j, ys, cols, e0, e1, bad);
      for (int v = 0; v < NV; ++v) epi.vec(r, j + v * L, acc[v] * vrs);
      j += NV * L;
    };
    while (j + 8 * L <= d) block(std::integral_constant<int, 8>{});
    if (j + 4 * L <= d) block(std::integral_constant<int, 4>{});
    if (j + 2 * L <= d) block(std::integral_constant<int, 2>{});
    if (j + L <= d) block(std::integral_constant<int, 1>{});
    for (; j < d; ++j) {
      A sum = A(0);
      for (int64_t e = e0; e < e1; ++e) {
        const uint64_t c = static_cast<uint64_t>(col[e]);
        if (C10_UNLIKELY(c >= cols)) {
          bad = true;
          break;
        }
        A w = kVal ? static_cast<A>(val[e]) : A(1);
        if constexpr (kScale) w *= static_cast<A>(cs[c]);
        sum += w * static_cast<A>(y[static_cast<int64_t>(c) * ys + j]);
      }
      epi.scalar(r, j, rs * sum);
    }
  }
}

template <typename Idx>
struct IndexTag {
  using type = Idx;
};

// Runs rows_pass over the work-balanced row parts in parallel; throws on a bad column index.
template <typename A, typename T, typename Epi>
void parallel_pass(const CsrView& a, const Input<T>& in, int64_t d, const Epi& epi_proto) {
  std::atomic<bool> any_bad{false};
  const bool has_val = a.val != nullptr, scale = in.scale_in;
  at::parallel_for(0, a.num_parts, 1, [&](int64_t begin, int64_t end) {
    Epi epi = epi_proto;
    bool bad = false;
    auto run = [&](auto kval, auto kscale, auto idx) {
      constexpr bool kVal = decltype(kval)::value, kScale = decltype(kscale)::value;
      using Idx = typename decltype(idx)::type;
      for (int64_t p = begin; p < end; ++p) {
        rows_pass<kVal, kScale, A, T, Idx>(a, in, d, a.parts[p], a.parts[p + 1], epi, bad);
      }
    };
    auto with_index = [&](auto kval, auto kscale) {
      if (a.col32) {
        run(kval, kscale, IndexTag<int32_t>{});
      } else {
        run(kval, kscale, IndexTag<int64_t>{});
      }
    };
    using T_ = std::true_type;
    using F_ = std::false_type;
    if (has_val) {
      scale ? with_index(T_{}, T_{}) : with_index(T_{}, F_{});
    } else {
      scale ? with_index(F_{}, T_{}) : with_index(F_{}, F_{});
    }
    if (bad) any_bad.store(true);
  });
  TORCH_CHECK(!any_bad.load(), "sparse: a column index lies outside [0, ", a.cols,
              "); build the graph with diffcore.sparse.Adjacency, which checks its indices");
}

// spmm: out[r, j] = e.
template <typename T, typename A>
struct SpmmEpilogue {
  T* out;
  int64_t stride;
  void vec(int64_t r, int64_t j, const AVec<A>& e) { store_vec<T, A>(out + r * stride + j, e); }
  void scalar(int64_t r, int64_t j, A e) { out[r * stride + j] = static_cast<T>(e); }
};

// One layer k of propagate: stores S_k = cs * E_k for the next layer (unless last), and adds
// w_k E_k (and w_0 E_0 in the first layer) into the combine; the last layer writes `out` in T.
template <typename T, typename A>
struct LayerEpilogue {
  A* next = nullptr;  // S_k, stride d; null in the last layer
  int64_t d = 0;
  const float* cs = nullptr;
  const T* x0 = nullptr;  // E_0 when w_0 is added in this layer, else null
  int64_t x0_stride = 0;
  A w0 = A(0), wk = A(0);
  bool add_e = false;    // wk != 0
  A* combine = nullptr;  // running sum to read (null: nothing summed yet)
  int64_t combine_stride = 0;
  A* combine_out = nullptr;  // where the running sum goes when not last
  T* out = nullptr;          // last layer: the result
  int64_t out_stride = 0;

  void vec(int64_t r, int64_t j, const AVec<A>& e) {
    if (next != nullptr) {
      const AVec<A> s = cs != nullptr ? e * AVec<A>(static_cast<A>(cs[r])) : e;
      s.store(next + r * d + j);
    }
    AVec<A> o = add_e ? e * AVec<A>(wk) : AVec<A>(A(0));
    if (x0 != nullptr) o = at::vec::fmadd(AVec<A>(w0), load_vec<T, A>(x0 + r * x0_stride + j), o);
    if (combine != nullptr) o = o + AVec<A>::loadu(combine + r * combine_stride + j);
    if (out != nullptr) {
      store_vec<T, A>(out + r * out_stride + j, o);
    } else if (combine_out != nullptr) {
      o.store(combine_out + r * combine_stride + j);
    }
  }
  void scalar(int64_t r, int64_t j, A e) {
    if (next != nullptr) next[r * d + j] = cs != nullptr ? e * static_cast<A>(cs[r]) : e;
    A o = add_e ? e * wk : A(0);
    if (x0 != nullptr) o += w0 * static_cast<A>(x0[r * x0_stride + j]);
    if (combine != nullptr) o += combine[r * combine_stride + j];
    if (out != nullptr) {
      out[r * out_stride + j] = static_cast<T>(o);
    } else if (combine_out != nullptr) {
      combine_out[r * combine_stride + j] = o;
    }
  }
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

#define DIFFCORE_DISPATCH_SPARSE_TYPES(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)            \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void sparse_spmm_kernel(const SpmmOperands& op, at::ScalarType dtype) {
  DIFFCORE_DISPATCH_SPARSE_TYPES(dtype, "sparse_spmm", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const Input<T> in{static_cast<const T*>(op.x), op.x_stride, op.a.col_scale != nullptr};
    const SpmmEpilogue<T, A> epi{static_cast<T*>(op.out), op.out_stride};
    parallel_pass<A>(op.a, in, op.d, epi);
  });
}

void sparse_propagate_kernel(const PropagateOperands& op, at::ScalarType dtype) {
  DIFFCORE_DISPATCH_SPARSE_TYPES(dtype, "sparse_propagate", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    A* combine = static_cast<A*>(op.combine);
    bool summed = false;  // whether `combine` holds a partial sum
    for (int64_t k = 1; k <= op.layers; ++k) {
      const bool first = k == 1, last = k == op.layers;
      LayerEpilogue<T, A> epi;
      epi.next = last ? nullptr : static_cast<A*>(op.layer[k % 2]);
      epi.d = op.d;
      epi.cs = op.a.col_scale;
      epi.w0 = static_cast<A>(op.weights[0]);
      epi.wk = static_cast<A>(op.weights[k]);
      epi.add_e = op.weights[k] != 0.0;
      if (first && op.weights[0] != 0.0) {
        epi.x0 = static_cast<const T*>(op.x);
        epi.x0_stride = op.x_stride;
      }
      epi.combine_stride = op.combine_stride;
      if (last) {
        epi.combine = summed ? combine : nullptr;
        epi.out = static_cast<T*>(op.out);
        epi.out_stride = op.out_stride;
      } else if (epi.add_e || epi.x0 != nullptr) {
        epi.combine = summed ? combine : nullptr;
        epi.combine_out = combine;
        summed = true;
      }
      if (first) {
        const Input<T> in{static_cast<const T*>(op.x), op.x_stride, op.a.col_scale != nullptr};
        parallel_pass<A>(op.a, in, op.d, epi);
      } else {
        const Input<A> in{static_cast<const A*>(op.layer[(k - 1) % 2]), op.d, false};
        parallel_pass<A>(op.a, in, op.d, epi);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(void sparse_spmm_kernel(const diffcore::cpu::SpmmOperands&, at::ScalarType))
DIFFCORE_ISA_DECLARE(
    void sparse_propagate_kernel(const diffcore::cpu::PropagateOperands&, at::ScalarType))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;
using csr::csr_view;
using csr::row_parts;

void check_feature_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              name, ": expected float32, float64, float16 or bfloat16, got ", dt);
}

at::Tensor sparse_spmm(const at::Tensor& crow, const at::Tensor& col, const OptTensor& values,
                       const OptTensor& row_scale, const OptTensor& col_scale, const at::Tensor&,
                       const at::Tensor&, const OptTensor&, const at::Tensor& x) {
  check_dim(x, 2, "x");
  check_feature_dtype(x, "x");
  CsrView a = csr_view(crow, col, values, row_scale, col_scale, x);
  const int64_t d = x.size(1);
  at::Tensor out = empty_output({a.rows, d}, x.options());
  if (a.rows == 0 || d == 0) return out;
  const at::Tensor xs = unit_cols(x);
  const std::vector<int64_t> parts = row_parts(a, d);
  a.parts = parts.data();
  a.num_parts = static_cast<int64_t>(parts.size()) - 1;
  SpmmOperands op;
  op.a = a;
  op.d = d;
  op.x = xs.data_ptr();
  op.x_stride = xs.stride(0);
  op.out = out.data_ptr();
  op.out_stride = out.stride(0);
  DIFFCORE_ISA_CALL(sparse_spmm_kernel, op, x.scalar_type());
  return out;
}

at::Tensor sparse_propagate(const at::Tensor& crow, const at::Tensor& col, const OptTensor& values,
                            const OptTensor& row_scale, const OptTensor& col_scale,
                            const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const at::Tensor& x, int64_t num_layers, c10::ArrayRef<double> weights) {
  check_dim(x, 2, "E0");
  check_feature_dtype(x, "E0");
  TORCH_CHECK(num_layers >= 0, "num_layers: expected a non-negative int, got ", num_layers);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers + 1, "weights: expected ",
              num_layers + 1, " layer weights (num_layers + 1), got ", weights.size());
  CsrView a = csr_view(crow, col, values, row_scale, col_scale, x);
  TORCH_CHECK(a.rows == a.cols, "E0: expected ", a.rows, " rows (one per node of the graph), got ",
              x.size(0));
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (num_layers == 0) return x.to(acc).mul(weights[0]).to(x.scalar_type());
  const int64_t d = x.size(1);
  at::Tensor out = empty_output({a.rows, d}, x.options());
  if (a.rows == 0 || d == 0) return out;
  const at::Tensor xs = unit_cols(x);
  const std::vector<int64_t> parts = row_parts(a, d);
  a.parts = parts.data();
  a.num_parts = static_cast<int64_t>(parts.size()) - 1;
  const auto acc_opts = x.options().dtype(acc);
  const at::Tensor combine = acc == x.scalar_type() ? out : empty_output({a.rows, d}, acc_opts);
  at::Tensor layer[2];
  if (num_layers > 1) layer[1] = gather_scratch({a.rows, d}, acc_opts);
  if (num_layers > 2) layer[0] = gather_scratch({a.rows, d}, acc_opts);
  PropagateOperands op;
  op.a = a;
  op.d = d;
  op.x = xs.data_ptr();
  op.x_stride = xs.stride(0);
  op.out = out.data_ptr();
  op.out_stride = out.stride(0);
  op.combine = combine.data_ptr();
  op.combine_stride = combine.stride(0);
  for (int i = 0; i < 2; ++i) op.layer[i] = layer[i].defined() ? layer[i].data_ptr() : nullptr;
  op.weights = weights.data();
  op.layers = num_layers;
  DIFFCORE_ISA_CALL(sparse_propagate_kernel, op, x.scalar_type());
  return out;
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("sparse_spmm", &diffcore::cpu::sparse_spmm);
  m.impl("sparse_propagate", &diffcore::cpu::sparse_propagate);
}
#endif
