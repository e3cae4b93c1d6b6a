// linalg family, CPU: sketches A @ Omega with Omega generated inside the kernel, a tile at a time,
// and never stored.
//
//   Omega (n x k): element (i, j) is element i * k + j of the stream (seed, offset)
//     gaussian     z_(i k + j)                          the Philox normals (DESIGN.md "Noise")
//     rademacher   1 - 2 * bit31(w)                     w = word (i k + j) % 4 of the counter
//                                                         offset + (i k + j) / 4
//     sparse       rademacher * [(w >> 7) & 0xffffff < t]    t = floor(density * 2^24)
//   dense:  out = scale * A @ Omega             A: (m, n) float32/float64, any strides
//   csr:    out = scale * A_hat @ Omega         A_hat[r, c] = rs[r] * v[e] * cs[c] (csr.h)
//
// Omega is made a tile at a time (kTileBytes: rows [i0, i1) of Omega, i.e. the columns [i0, i1)
// of A) into each thread's own buffer, multiplied in and overwritten by the next tile: memory is
// O(threads x tile), never O(n k). One parallel region per sketch and no barrier inside it: on a
// machine shared with other processes every barrier waits for the slowest thread's time slice,
// so the threads each make the tiles they need instead of sharing them.
// - Dense: fixed blocks of kRowBlock output rows are split among threads; each thread fills every
//   tile once and adds A[block, i0:i1] @ tile through ATen's GEMM (MKL here; one thread inside
//   the region). The blocks' shapes do not depend on the thread count, nor do the results.
//   NaN or Inf in A is found without a pass of its own over A (that pass took 5 of 34 ms on a
//   20,000 x 2,000 sketch): a non-finite A[i, c] makes row i of the output non-finite wherever it
//   meets a nonzero of Omega's row c (NaN and Inf survive the sum). So each finished output block
//   is checked, and A's block only when the output is not finite (an overflow also gives Inf);
//   a column of A whose row of Omega is all zero (often, for a sparse Omega with small k) is
//   checked on its own, since a BLAS may skip B's zeros and with them NaN * 0.
// - CSR: rows are split among threads by work (csr.h's row_parts). Each row keeps a cursor into
//   its nonzeros (column indices sorted within a row, as in every diffcore CSR); a tile adds the
//   row's run of nonzeros with columns in [i0, i1): out[r] += v[e] cs[c] tile[c - i0], summed in
//   registers, one fused multiply-add per element and nonzero, in column order, so each output is
//   the plain sequential sum whatever the tile size and thread count. A block of 8 rows of Omega is generated when a
//   thread first needs one of them in the tile: a matrix with few nonzeros costs O(nnz k), not
//   O(n k). rs and `scale` are applied once at the end.
//
// Compiled once per instruction set; the DEFAULT build also holds the op entry points.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>
#include <diffcore/memory.h>

#include "csr.h"
#include "philox_vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace diffcore::cpu {

enum class OmegaKind : int { kGaussian = 0, kRademacher = 1, kSparse = 2 };

// Which Omega (n x k): its kind, the stream and the sparse threshold on 24 bits of each word.
struct OmegaSpec {
  OmegaKind kind = OmegaKind::kGaussian;
  uint32_t threshold = 0;  // sparse: an element is nonzero iff (w >> 7) & 0xffffff < threshold
  uint64_t seed = 0, offset = 0;
  int64_t k = 0;
};

struct CsrSketchOperands {
  CsrView a;                     // structure, row and column scalings, row parts
  const void* values = nullptr;  // (nnz,) float32 or float64, or null: ones
  bool values64 = false;
  void* out = nullptr;  // (rows, k) contiguous, zeroed, float32 or float64
  int64_t* cursor = nullptr;  // (rows,) scratch
  double scale = 1.0;
  OmegaSpec omega;
};

inline namespace CPU_CAPABILITY {

// The Philox words of the groups g0 .. g0 + kLanes - 1: element 4 g + k is word w_k of counter
// offset + g (store_interleaved moves bits, so the normals' interleave serves words too).
inline void philox_word_groups(uint32_t* out, uint64_t seed, uint64_t offset, uint64_t g0) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  UVec w0, w1, w2, w3;
  philox_words(seed, offset, g0, w0, w1, w2, w3);
#if defined(CPU_CAPABILITY_AVX512)
  store_interleaved(reinterpret_cast<float*>(out), _mm512_castsi512_ps(w0), _mm512_castsi512_ps(w1),
                    _mm512_castsi512_ps(w2), _mm512_castsi512_ps(w3));
#else
  store_interleaved(reinterpret_cast<float*>(out), _mm256_castsi256_ps(w0), _mm256_castsi256_ps(w1),
                    _mm256_castsi256_ps(w2), _mm256_castsi256_ps(w3));
#endif
#else
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t c = offset + g0 + static_cast<uint64_t>(l);
    const PhiloxWords r = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                                        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int k = 0; k < 4; ++k) out[4 * l + k] = r.w[k];
  }
#endif
}

// Writes the words of logical elements first .. first + n - 1 to out: element i is word
// w_(i % 4) of counter offset + i / 4, the words the normal stream is made of.
inline void philox_word_stream(uint32_t* out, uint64_t seed, uint64_t offset, uint64_t first, int64_t n) {
  philox_stream(out, seed, offset, first, n, philox_word_groups);
}

// Elements generated per step (a stack buffer of this many words).
constexpr int64_t kFillChunk = 1024;

// Elements first .. first + n - 1 of Omega's row-major stream into dst (serial: every caller
// runs inside its own thread). Values depend only on (seed, offset, index), never on the chunking.
template <typename T>
void fill_omega(T* dst, uint64_t first, int64_t n, const OmegaSpec& o) {
  alignas(64) float z[kFillChunk];
  alignas(64) uint32_t w[kFillChunk];
  for (int64_t s = 0; s < n; s += kFillChunk) {
    const int64_t len = std::min(kFillChunk, n - s);
    const uint64_t at = first + static_cast<uint64_t>(s);
    T* d = dst + s;
    if (o.kind == OmegaKind::kGaussian) {
      if constexpr (std::is_same_v<T, float>) {
        philox_normals(d, o.seed, o.offset, at, len);
      } else {
        philox_normals(z, o.seed, o.offset, at, len);
        for (int64_t t = 0; t < len; ++t) d[t] = static_cast<T>(z[t]);
      }
      continue;
    }
    philox_word_stream(w, o.seed, o.offset, at, len);
    if (o.kind == OmegaKind::kRademacher) {
      for (int64_t t = 0; t < len; ++t) d[t] = (w[t] >> 31) ? T(-1) : T(1);
    } else {
      const uint32_t thr = o.threshold;
      for (int64_t t = 0; t < len; ++t) {
        const T sign = (w[t] >> 31) ? T(-1) : T(1);
        d[t] = ((w[t] >> 7) & 0xFFFFFFu) < thr ? sign : T(0);
      }
    }
  }
}

// Rows [i0, i0 + rows) of Omega into buf (rows x k, row-major), serially.
void fill_omega_kernel(void* buf, at::ScalarType dtype, int64_t i0, int64_t rows, const OmegaSpec& o) {
  const uint64_t first = static_cast<uint64_t>(i0) * static_cast<uint64_t>(o.k);
  if (dtype == at::kDouble) {
    fill_omega(static_cast<double*>(buf), first, rows * o.k, o);
  } else {
    fill_omega(static_cast<float*>(buf), first, rows * o.k, o);
  }
}

// Whether every element of the strided (m x n) block is finite, serially: sums x * 0, which is NaN
// exactly when some x is NaN or infinite, along the unit-stride dimension where there is one.
template <typename T>
bool all_finite(const T* a, int64_t m, int64_t n, int64_t s0, int64_t s1) {
  const bool rows_inner = s1 == 1 || (s0 != 1 && s1 <= s0);
  const int64_t outer = rows_inner ? m : n, inner = rows_inner ? n : m;
  const int64_t so = rows_inner ? s0 : s1, si = rows_inner ? s1 : s0;
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  T tail = T(0);
  for (int64_t r = 0; r < outer; ++r) {
    const T* row = a + r * so;
    int64_t j = 0;
    if (si == 1) {
      for (; j + Vec::size() <= inner; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(row + j), Vec(T(0)), acc);
    }
    for (; j < inner; ++j) tail += row[j * si] * T(0);
  }
  alignas(64) T lanes[Vec::size()];
  acc.store(lanes);
  for (int64_t l = 0; l < Vec::size(); ++l) tail += lanes[l];
  return tail == T(0);
}

bool all_finite_kernel(const void* a, at::ScalarType dtype, int64_t m, int64_t n, int64_t s0, int64_t s1) {
  if (dtype == at::kDouble) return all_finite(static_cast<const double*>(a), m, n, s0, s1);
  return all_finite(static_cast<const float*>(a), m, n, s0, s1);
}

// Rows of Omega are generated in blocks of this many (the first time a nonzero needs one of
// them): the Philox normals come in groups of 64 elements, so a lone row of k = 74 would make
// two or three groups for its 74 values, while a block of 8 rows (592 values) wastes at most one.
constexpr int64_t kOmegaBlockRows = 8;

// o[j0 : j0 + NV vectors (the last `last` elements long)] += sum_e w[e] t_e[same columns], the
// sums kept in registers over the run of nonzeros: one fused multiply-add per element and
// nonzero, in the run's order, so each element gets exactly the sequential sum.
template <int NV, typename A>
inline void run_block(A* __restrict o, const A* const* rows, const A* w, int64_t count, int64_t j0, int last) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int W = Vec::size();
  Vec acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    acc[v] = v == NV - 1 ? Vec::loadu(o + j0 + v * W, last) : Vec::loadu(o + j0 + v * W);
  }
  for (int64_t e = 0; e < count; ++e) {
    const Vec vw(w[e]);
    const A* t = rows[e] + j0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[v] = at::vec::fmadd(vw, v == NV - 1 ? Vec::loadu(t + v * W, last) : Vec::loadu(t + v * W), acc[v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v].store(o + j0 + v * W, v == NV - 1 ? last : W);
}

// o[0:k] += sum_e w[e] rows[e][0:k] over a run of `count` nonzeros: blocks of 8 vectors, then the
// remaining 1 to 8 as one block of 1 to 4 (after a block of 4 when more than 4 remain), whose
// last vector may be partial (masked on AVX512).
template <typename A>
inline void run_sum(A* __restrict o, const A* const* rows, const A* w, int64_t count, int64_t k) {
  constexpr int W = at::vec::Vectorized<A>::size();
  int64_t j = 0;
  for (; j + 8 * W <= k; j += 8 * W) run_block<8>(o, rows, w, count, j, W);
  const int64_t rest = k - j;
  const int nv = static_cast<int>((rest + W - 1) / W);
  const int last = static_cast<int>(rest - (nv - 1) * W);
  if (nv >= 5) {  // 5..8 vectors: 4 full ones, then the rest
    run_block<4>(o, rows, w, count, j, W);
    j += 4 * W;
  }
  const int64_t rest2 = k - j;
  const int nv2 = static_cast<int>((rest2 + W - 1) / W);
  switch (nv2) {
    case 4: run_block<4>(o, rows, w, count, j, last); break;
    case 3: run_block<3>(o, rows, w, count, j, last); break;
    case 2: run_block<2>(o, rows, w, count, j, last); break;
    case 1: run_block<1>(o, rows, w, count, j, last); break;
    default: break;
  }
}

// Nonzeros gathered per register pass (a longer run of a row within the tile takes several).
constexpr int64_t kRunChunk = 64;

// Adds the nonzeros with columns in [i0, i1) of rows [r0, r1) into out, advancing the cursors;
// a block of kOmegaBlockRows rows of Omega enters the thread's tile the first time one of its
// rows needs it (`made`: one flag per block). A row's run of nonzeros in the tile is summed in
// registers (run_sum), kRunChunk nonzeros at a time. Sets `bad` on a column index below its
// predecessor in the row (unsorted) or below i0.
template <typename A, typename V, typename Idx>
void csr_tile_rows(const CsrSketchOperands& op, A* tile, uint8_t* made, int64_t i0, int64_t i1, int64_t r0,
                   int64_t r1, bool& bad) {
  const CsrView& a = op.a;
  const int64_t k = op.omega.k;
  const Idx* col = static_cast<const Idx*>(a.col);
  const V* val = static_cast<const V*>(op.values);
  const float* cs = a.col_scale;
  A* out = static_cast<A*>(op.out);
  const A* rows[kRunChunk];
  A w[kRunChunk];
  for (int64_t r = r0; r < r1; ++r) {
    int64_t e = op.cursor[r];
    const int64_t end = a.crow[r + 1];
    int64_t prev = e > a.crow[r] ? static_cast<int64_t>(col[e - 1]) : i0;
    A* o = out + r * k;
    bool more = true;
    while (more) {
      int64_t count = 0;
      for (; e < end && count < kRunChunk; ++e) {
        const int64_t c = static_cast<int64_t>(col[e]);
        if (c >= i1) break;
        if (C10_UNLIKELY(c < prev || c < i0)) {
          bad = true;
          return;
        }
        prev = c;
        const int64_t block = (c - i0) / kOmegaBlockRows;
        if (!made[block]) {
          const int64_t b0 = i0 + block * kOmegaBlockRows, n_rows = std::min(kOmegaBlockRows, i1 - b0);
          fill_omega(tile + (b0 - i0) * k, static_cast<uint64_t>(b0) * static_cast<uint64_t>(k), n_rows * k,
                     op.omega);
          made[block] = 1;
        }
        A we = val != nullptr ? static_cast<A>(val[e]) : A(1);
        if (cs != nullptr) we *= static_cast<A>(cs[c]);
        rows[count] = tile + (c - i0) * k;
        w[count++] = we;
      }
      if (count > 0) run_sum(o, rows, w, count, k);
      more = count == kRunChunk;
    }
    op.cursor[r] = e;
  }
}

template <typename Idx>
struct IndexTag {
  using type = Idx;
};

// One parallel region, no barrier: each thread walks the column tiles for its rows with its own
// tile of Omega, generating only the rows of Omega its rows touch (at most n k values per thread;
// for a matrix with few nonzeros, far fewer). The rows' sums are sequential in column order.
template <typename A>
void csr_sketch(const CsrSketchOperands& op, int64_t tile_rows) {
  const CsrView& a = op.a;
  const int64_t n = a.cols, k = op.omega.k;
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, a.num_parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> tile(static_cast<size_t>(tile_rows * k));
    std::vector<uint8_t> made(static_cast<size_t>((tile_rows + kOmegaBlockRows - 1) / kOmegaBlockRows));
    bool bad = false;
    const int64_t r0 = a.parts[begin], r1 = a.parts[end];
    for (int64_t r = r0; r < r1; ++r) op.cursor[r] = a.crow[r];
    auto run = [&](auto value_tag, auto index_tag) {
      using V = typename decltype(value_tag)::type;
      using Idx = typename decltype(index_tag)::type;
      for (int64_t i0 = 0; i0 < n && !bad; i0 += tile_rows) {
        std::fill(made.begin(), made.end(), uint8_t{0});
        csr_tile_rows<A, V, Idx>(op, tile.data(), made.data(), i0, std::min(n, i0 + tile_rows), r0, r1, bad);
      }
    };
    auto with_index = [&](auto value_tag) {
      if (a.col32) {
        run(value_tag, IndexTag<int32_t>{});
      } else {
        run(value_tag, IndexTag<int64_t>{});
      }
    };
    if (op.values64) {
      with_index(IndexTag<double>{});
    } else {
      with_index(IndexTag<float>{});
    }
    for (int64_t r = r0; r < r1 && !bad; ++r) bad = op.cursor[r] != a.crow[r + 1];  // an index >= n
    if (bad) {
      any_bad.store(true);
      return;
    }
    const float* rs = a.row_scale;
    if (rs == nullptr && op.scale == 1.0) return;
    A* out = static_cast<A*>(op.out);
    for (int64_t r = r0; r < r1; ++r) {
      const A f = static_cast<A>(op.scale) * (rs != nullptr ? static_cast<A>(rs[r]) : A(1));
      for (int64_t j = 0; j < k; ++j) out[r * k + j] *= f;
    }
  });
  TORCH_CHECK(!any_bad.load(), "linalg_sketch_csr: column indices must lie in [0, ", n,
              ") and be sorted within each row; build the matrix with diffcore.linalg (or coalesce it)");
}

void csr_sketch_kernel(const CsrSketchOperands& op, at::ScalarType dtype, int64_t tile_rows) {
  if (dtype == at::kDouble) {
    csr_sketch<double>(op, tile_rows);
  } else {
    csr_sketch<float>(op, tile_rows);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(void fill_omega_kernel(void*, at::ScalarType, int64_t, int64_t, const diffcore::cpu::OmegaSpec&))
DIFFCORE_ISA_DECLARE(bool all_finite_kernel(const void*, at::ScalarType, int64_t, int64_t, int64_t, int64_t))
DIFFCORE_ISA_DECLARE(void csr_sketch_kernel(const diffcore::cpu::CsrSketchOperands&, at::ScalarType, int64_t))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Bytes of one tile of Omega: the memory a sketch adds per thread beyond its output.
constexpr int64_t kTileBytes = int64_t{4} << 20;
// Output rows per GEMM of the dense sketch.
constexpr int64_t kRowBlock = 256;

int64_t tile_rows_for(int64_t k, int64_t n, int64_t elem) {
  return std::max<int64_t>(1, std::min<int64_t>(n, kTileBytes / std::max<int64_t>(1, k * elem)));
}

OmegaSpec omega_spec(c10::string_view kind, double density, int64_t seed, int64_t offset, int64_t k) {
  TORCH_CHECK(k >= 0, "k: expected a non-negative number of columns, got ", k);
  TORCH_CHECK(offset >= 0, "offset: expected a non-negative int, got ", offset);
  OmegaSpec o;
  if (kind == "gaussian") {
    o.kind = OmegaKind::kGaussian;
  } else if (kind == "rademacher") {
    o.kind = OmegaKind::kRademacher;
  } else if (kind == "sparse") {
    o.kind = OmegaKind::kSparse;
    TORCH_CHECK(density > 0.0 && density <= 1.0, "density: expected a value in (0, 1], got ", density);
    o.threshold = static_cast<uint32_t>(std::floor(density * 16777216.0));
  } else {
    TORCH_CHECK(false, "kind: expected 'gaussian', 'rademacher' or 'sparse', got '", std::string(kind), "'");
  }
  o.seed = static_cast<uint64_t>(seed);
  o.offset = static_cast<uint64_t>(offset);
  o.k = k;
  return o;
}

void check_real_dtype(at::ScalarType dt, const char* name) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, name, ": expected float32 or float64, got ", dt);
}

// Whether every element of a (strided, at most 2-D) tensor is finite.
bool all_finite(const at::Tensor& x) {
  const at::Tensor v = x.dim() == 2 ? x : x.unsqueeze(1);
  return DIFFCORE_ISA_CALL(all_finite_kernel, v.data_ptr(), v.scalar_type(), v.size(0), v.size(1), v.stride(0),
                           v.stride(1));
}

// The rows of a tile of Omega (rows x k, contiguous) with no nonzero entry, into `zero`.
void zero_rows(const at::Tensor& tile, std::vector<int64_t>& zero) {
  zero.clear();
  const int64_t k = tile.size(1);
  auto scan = [&](auto* t) {
    for (int64_t i = 0; i < tile.size(0); ++i) {
      const auto* row = t + i * k;
      if (std::all_of(row, row + k, [](auto x) { return x == 0; })) zero.push_back(i);
    }
  };
  if (tile.scalar_type() == at::kDouble) {
    scan(tile.const_data_ptr<double>());
  } else {
    scan(tile.const_data_ptr<float>());
  }
}

at::Tensor linalg_sketch(const at::Tensor& a_arg, int64_t k, c10::string_view kind, double density, double scale,
                         int64_t seed, int64_t offset) {
  // The GEMMs run on worker threads, which the autograd dispatch's exclusion does not reach: an A
  // that requires grad is multiplied through a view without autograd history.
  const at::Tensor a = a_arg.detach();
  check_dim(a, 2, "A");
  check_real_dtype(a.scalar_type(), "A");
  const OmegaSpec o = omega_spec(kind, density, seed, offset, k);
  const int64_t m = a.size(0), n = a.size(1);
  at::Tensor out = empty_output({m, k}, a.options());
  if (m == 0 || k == 0) return out;
  if (n == 0) return out.zero_();
  // One parallel region over fixed blocks of output rows (so the GEMMs' shapes, hence the
  // results, do not depend on the thread count); each thread makes its own tiles of Omega.
  const int64_t rows = tile_rows_for(k, n, a.element_size());
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  std::atomic<bool> finite{true};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({rows, k}, a.options());
    std::vector<int64_t> zero;
    for (int64_t i0 = 0; i0 < n; i0 += rows) {
      const int64_t r = std::min(rows, n - i0);
      at::Tensor t = tile.narrow(0, 0, r);
      DIFFCORE_ISA_CALL(fill_omega_kernel, t.data_ptr(), a.scalar_type(), i0, r, o);
      zero_rows(t, zero);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowBlock, mb = std::min(kRowBlock, m - m0);
        at::Tensor ob = out.narrow(0, m0, mb);
        const at::Tensor ab = a.narrow(0, m0, mb).narrow(1, i0, r);
        if (i0 == 0) {
          at::mm_out(ob, ab, t);
        } else {
          ob.addmm_(ab, t);
        }
        for (const int64_t c : zero) {
          if (!all_finite(ab.select(1, c))) finite.store(false);
        }
        if (i0 + r < n) continue;
        if (scale != 1.0) ob.mul_(scale);
        if (!all_finite(ob) && !all_finite(a.narrow(0, m0, mb))) finite.store(false);
      }
    }
  });
  TORCH_CHECK(finite.load(), "A: expected finite values, found NaN or Inf");
  return out;
}

at::Tensor linalg_sketch_csr(const at::Tensor& crow, const at::Tensor& col, const OptTensor& values,
                             const OptTensor& row_scale, const OptTensor& col_scale, int64_t n_cols, int64_t k,
                             c10::string_view kind, double density, double scale, int64_t seed, int64_t offset,
                             at::ScalarType dtype) {
  check_real_dtype(dtype, "dtype");
  TORCH_CHECK(n_cols >= 0, "n_cols: expected a non-negative number of columns, got ", n_cols);
  const OmegaSpec o = omega_spec(kind, density, seed, offset, k);
  CsrSketchOperands op;
  op.a = csr::csr_view(crow, col, std::nullopt, row_scale, col_scale, n_cols, crow, "crow");
  if (values) {
    check_dim(*values, 1, "values");
    check_real_dtype(values->scalar_type(), "values");
    TORCH_CHECK(values->numel() == col.numel(), "values: expected ", col.numel(), " entries (one per nonzero), got ",
                values->numel());
    TORCH_CHECK(values->is_contiguous(), "values: expected a contiguous tensor");
    check_same_device(*values, crow, "values", "crow");
    TORCH_CHECK(values->numel() == 0 || at::isfinite(*values).all().item<bool>(),
                "values: expected finite values, found NaN or Inf");
    op.values = values->data_ptr();
    op.values64 = values->scalar_type() == at::kDouble;
  }
  const int64_t m = op.a.rows;
  at::Tensor out = empty_output({m, k}, crow.options().dtype(dtype));
  if (m == 0 || k == 0) return out;
  out.zero_();
  if (n_cols == 0 && col.numel() == 0) return out;
  const std::vector<int64_t> parts = csr::row_parts(op.a, k);
  op.a.parts = parts.data();
  op.a.num_parts = static_cast<int64_t>(parts.size()) - 1;
  std::vector<int64_t> cursor(static_cast<size_t>(m));
  op.cursor = cursor.data();
  op.out = out.data_ptr();
  op.scale = scale;
  op.omega = o;
  const int64_t elem = dtype == at::kDouble ? 8 : 4;
  DIFFCORE_ISA_CALL(csr_sketch_kernel, op, dtype, tile_rows_for(k, std::max<int64_t>(n_cols, 1), elem));
  return out;
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("linalg_sketch", &diffcore::cpu::linalg_sketch);
  m.impl("linalg_sketch_csr", &diffcore::cpu::linalg_sketch_csr);
}
#endif
