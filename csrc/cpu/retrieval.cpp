// retrieval family, CPU: the k best items of each row, from scores or from queries and item
// embeddings, each row's history masked; the meaning is diffcore/reference/retrieval.py.
//
//   scores = x  or  x @ items.T (in x's dtype);  scores[r, history(r)] = -inf
//   values, ids = the first k of each row in descending score order, ties to the lower item id
//
// Each row keeps a bounded heap of its k best (score, id) pairs, worst on top, and sees its items
// in ascending id order. So an item that ties the heap's worst has the larger id and loses: an
// item enters a full heap only when its score is strictly above the worst one. The scan tests a
// vector of scores at a time against that threshold (and for NaN) and looks at single items only
// in the rare vectors holding a candidate: after the first few thousand items a row costs about
// one vector compare per 16 scores. History items (sorted once per row) split the scan into runs;
// a history item enters only a heap that is not yet full, with score -inf, so a row with fewer
// than k unmasked items ends with its masked items in id order.
//
// From queries, fixed blocks of kRowBlock rows are split among the threads; a thread computes the
// scores of its rows against kItemBlock items at a time with ATen's GEMM (one thread inside the
// region) into its own buffer, small enough for L2, and scans them before the next block: the
// (B, n_items) scores are never stored. The block shapes, hence the scores, do not depend on the
// thread count. Float16/bfloat16 scores are compared as float32 (exact), float64 as float64.
//
// Compiled once per instruction set; the DEFAULT build also holds the op entry point.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

namespace diffcore::cpu {

// One block of rows and items: the scores of rows [r0, r1) for items [b0, b1), row r at
// scores + (r - r0) * ld, and the heaps they feed.
struct ScanBlock {
  const void* scores;
  int64_t ld;
  int64_t r0, r1, b0, b1;
  const int64_t* crow;  // sorted history: row r's items are col[crow[r]:crow[r + 1]], or nullptr
  const int64_t* col;
  void* heap_scores;  // (B, k): float32, or float64 for float64 scores
  int64_t* heap_ids;  // (B, k)
  int64_t* heap_size;  // (B,)
  int64_t k;
};

// The finished heaps of rows [r0, r1) sorted into values (x's dtype) and ids, both (B, k).
struct FinishRows {
  void* heap_scores;
  int64_t* heap_ids;
  void* values;
  int64_t* ids;
  int64_t r0, r1, k;
};

namespace CPU_CAPABILITY {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// (a, ia) ranks below (b, ib): lower score, or the same score and a larger id.
template <typename A>
inline bool worse(A a, int64_t ia, A b, int64_t ib) {
  return a < b || (a == b && ia > ib);
}

// A row's heap of at most k entries, worst at index 0.
template <typename A>
struct Heap {
  A* s;
  int64_t* id;
  int64_t k;
  int64_t size;

  bool full() const { return size == k; }

  void swap(int64_t i, int64_t j) {
    std::swap(s[i], s[j]);
    std::swap(id[i], id[j]);
  }

  void push(A v, int64_t i) {
    int64_t c = size++;
    s[c] = v;
    id[c] = i;
    while (c > 0) {
      const int64_t p = (c - 1) / 2;
      if (!worse(s[c], id[c], s[p], id[p])) break;
      swap(c, p);
      c = p;
    }
  }

  // Replaces the worst entry with (v, i), which ranks above it.
  void replace_top(A v, int64_t i) {
    s[0] = v;
    id[0] = i;
    int64_t c = 0;
    for (;;) {
      const int64_t l = 2 * c + 1, r = l + 1;
      int64_t w = c;
      if (l < size && worse(s[l], id[l], s[w], id[w])) w = l;
      if (r < size && worse(s[r], id[r], s[w], id[w])) w = r;
      if (w == c) break;
      swap(c, w);
      c = w;
    }
  }

  // Item i (larger than every id in the heap) with score v. Returns false on NaN.
  bool offer(A v, int64_t i) {
    if (v != v) return false;
    if (!full()) {
      push(v, i);
    } else if (v > s[0]) {
      replace_top(v, i);
    }
    return true;
  }
};

// Items [i0, i1) with scores s[0 : i1 - i0]. Returns false on NaN.
template <typename A>
bool scan_run(const A* s, int64_t i0, int64_t i1, Heap<A>& heap) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr int all_zero = (1 << W) - 1;  // zero_mask() when no lane is set
  bool ok = true;
  int64_t i = i0;
  for (; i < i1 && !heap.full(); ++i) ok &= heap.offer(s[i - i0], i);
  for (; i + 2 * W <= i1; i += 2 * W) {
    const Vec thr(heap.s[0]);
    const Vec a = Vec::loadu(s + (i - i0)), b = Vec::loadu(s + (i - i0) + W);
    // A lane is set for a candidate (above the threshold) or a NaN (a != a).
    const Vec hit = (a > thr) | (a != a) | (b > thr) | (b != b);
    if (hit.zero_mask() == all_zero) continue;
    for (int64_t j = i; j < i + 2 * W; ++j) ok &= heap.offer(s[j - i0], j);
  }
  for (; i < i1; ++i) ok &= heap.offer(s[i - i0], i);
  return ok;
}

// Row r over items [b0, b1): runs between its history items, each history item offered as -inf.
template <typename A>
bool scan_row(const A* s, int64_t b0, int64_t b1, const int64_t* h, const int64_t* h_end, Heap<A>& heap) {
  bool ok = true;
  const int64_t* p = std::lower_bound(h, h_end, b0);
  int64_t pos = b0;
  for (;;) {
    const int64_t stop = (p < h_end && *p < b1) ? *p : b1;
    ok &= scan_run(s + (pos - b0), pos, stop, heap);
    if (stop == b1) return ok;
    if (!heap.full()) heap.push(-std::numeric_limits<A>::infinity(), stop);
    while (p < h_end && *p == stop) ++p;  // duplicates
    pos = stop + 1;
  }
}

template <typename T>
bool scan_block(const ScanBlock& blk) {
  using A = acc_t<T>;
  const int64_t len = blk.b1 - blk.b0;
  std::vector<A> converted(std::is_same_v<T, A> ? 0 : static_cast<size_t>(len));
  bool ok = true;
  for (int64_t r = blk.r0; r < blk.r1; ++r) {
    const T* row = static_cast<const T*>(blk.scores) + (r - blk.r0) * blk.ld;
    const A* s;
    if constexpr (std::is_same_v<T, A>) {
      s = row;
    } else {
      for (int64_t j = 0; j < len; ++j) converted[j] = static_cast<A>(row[j]);
      s = converted.data();
    }
    Heap<A> heap{static_cast<A*>(blk.heap_scores) + r * blk.k, blk.heap_ids + r * blk.k, blk.k, blk.heap_size[r]};
    const int64_t* h = blk.crow ? blk.col + blk.crow[r] : nullptr;
    const int64_t* h_end = blk.crow ? blk.col + blk.crow[r + 1] : nullptr;
    ok &= scan_row(s, blk.b0, blk.b1, h, h_end, heap);
    blk.heap_size[r] = heap.size;
  }
  return ok;
}

template <typename T>
void finish_rows(const FinishRows& f) {
  using A = acc_t<T>;
  std::vector<int64_t> order(static_cast<size_t>(f.k)), heap_ids(static_cast<size_t>(f.k));
  for (int64_t r = f.r0; r < f.r1; ++r) {
    const A* s = static_cast<const A*>(f.heap_scores) + r * f.k;
    std::copy_n(f.heap_ids + r * f.k, f.k, heap_ids.begin());  // f.ids may be the same memory
    const int64_t* id = heap_ids.data();
    std::iota(order.begin(), order.end(), int64_t{0});
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return worse(s[b], id[b], s[a], id[a]); });
    T* values = static_cast<T*>(f.values) + r * f.k;
    int64_t* ids = f.ids + r * f.k;
    for (int64_t j = 0; j < f.k; ++j) {
      values[j] = static_cast<T>(s[order[j]]);
      ids[j] = id[order[j]];
    }
  }
}

}  // namespace

#define DIFFCORE_RETRIEVAL_TYPES(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

bool scan_block_kernel(const ScanBlock& blk, at::ScalarType dtype) {
  return DIFFCORE_RETRIEVAL_TYPES(dtype, "retrieval_topk", [&] { return scan_block<scalar_t>(blk); });
}

void finish_rows_kernel(const FinishRows& f, at::ScalarType dtype) {
  DIFFCORE_RETRIEVAL_TYPES(dtype, "retrieval_topk", [&] { finish_rows<scalar_t>(f); });
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu

#if defined(DIFFCORE_CPU_ENTRY)
DIFFCORE_ISA_DECLARE(bool scan_block_kernel(const diffcore::cpu::ScanBlock&, at::ScalarType))
DIFFCORE_ISA_DECLARE(void finish_rows_kernel(const diffcore::cpu::FinishRows&, at::ScalarType))

namespace diffcore::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kRowBlock = 128;  // rows per GEMM (queries) and per task
constexpr int64_t kItemBlock = 1024;  // items per GEMM: a 128 x 1024 float32 block is 512 KiB
constexpr int64_t kScoreChunk = 4096;  // items per scan of a scores row (converted dtypes)

void check_history(const at::Tensor& crow, const at::Tensor& col, int64_t rows, int64_t n_items) {
  check_dim(crow, 1, "crow");
  check_dim(col, 1, "col");
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong,
              "crow, col: expected int64 indices, got ", crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(crow.numel() == rows + 1, "crow: expected ", rows + 1, " entries (rows + 1), got ", crow.numel());
  const at::Tensor c = crow.contiguous(), k = col.contiguous();
  const int64_t* cp = c.data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[rows] == col.numel(), "crow: expected to run from 0 to len(col) = ", col.numel(),
              ", got ", cp[0], " .. ", cp[rows]);
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(cp[r] <= cp[r + 1], "crow: expected non-decreasing offsets");
  const int64_t* kp = k.data_ptr<int64_t>();
  for (int64_t e = 0; e < col.numel(); ++e) {
    TORCH_CHECK(kp[e] >= 0 && kp[e] < n_items, "col: expected item ids in [0, ", n_items, "), got ", kp[e]);
  }
}

// Each row's history sorted (a copy of col, sorted within rows).
at::Tensor sorted_history(const at::Tensor& crow, const at::Tensor& col) {
  at::Tensor sorted = col.contiguous().clone();
  int64_t* s = sorted.data_ptr<int64_t>();
  const int64_t* c = crow.data_ptr<int64_t>();
  at::parallel_for(0, crow.numel() - 1, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::sort(s + c[r], s + c[r + 1]);
  });
  return sorted;
}

std::tuple<at::Tensor, at::Tensor> retrieval_topk(const at::Tensor& x_arg, const OptTensor& items_arg, int64_t k,
                                                  const OptTensor& crow, const OptTensor& col) {
  // The GEMMs run on worker threads, which the caller's no-grad state does not reach: inputs that
  // require grad are multiplied through views without autograd history.
  const at::Tensor x = x_arg.detach();
  const OptTensor items = items_arg ? OptTensor(items_arg->detach()) : std::nullopt;
  check_dim(x, 2, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "x: expected float32, float64, float16 or bfloat16, got ", dt);
  if (items) {
    check_dim(*items, 2, "items");
    check_same_dtype(*items, x, "items", "x");
    check_same_device(*items, x, "items", "x");
    TORCH_CHECK(items->size(1) == x.size(1), "items: expected ", x.size(1), " columns (the queries' d), got ",
                items->size(1));
  }
  const int64_t B = x.size(0), n = items ? items->size(0) : x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "k: expected an int in [1, ", n, "], got ", k);
  TORCH_CHECK(crow.has_value() == col.has_value(), "crow, col: expected both or neither");
  at::Tensor hcrow, hcol;
  if (crow) {
    check_history(*crow, *col, B, n);
    hcrow = crow->contiguous();
    hcol = sorted_history(hcrow, *col);
  }
  at::Tensor values = at::empty({B, k}, x.options());
  at::Tensor ids = at::empty({B, k}, x.options().dtype(at::kLong));
  if (B == 0) return {values, ids};
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor heap_scores = at::empty({B, k}, x.options().dtype(acc));
  std::vector<int64_t> heap_size(static_cast<size_t>(B), 0);

  ScanBlock base{};
  base.crow = crow ? hcrow.data_ptr<int64_t>() : nullptr;
  base.col = crow ? hcol.data_ptr<int64_t>() : nullptr;
  base.heap_scores = heap_scores.data_ptr();
  base.heap_ids = ids.data_ptr<int64_t>();  // the heaps' ids live in the output, sorted in place below
  base.heap_size = heap_size.data();
  base.k = k;

  std::atomic<bool> ok{true};
  const at::Tensor scores = items ? at::Tensor() : unit_cols(x);
  const int64_t blocks = (B + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t g0, int64_t g1) {
    at::Tensor buf = items ? at::empty({kRowBlock * std::min(kItemBlock, n)}, x.options()) : at::Tensor();
    for (int64_t g = g0; g < g1; ++g) {
      ScanBlock blk = base;
      blk.r0 = g * kRowBlock;
      blk.r1 = std::min(B, blk.r0 + kRowBlock);
      const int64_t rows = blk.r1 - blk.r0;
      const int64_t step = items ? kItemBlock : (dt == acc ? n : kScoreChunk);
      for (blk.b0 = 0; blk.b0 < n; blk.b0 += step) {
        blk.b1 = std::min(n, blk.b0 + step);
        if (items) {
          at::Tensor s = buf.narrow(0, 0, rows * (blk.b1 - blk.b0)).view({rows, blk.b1 - blk.b0});
          at::mm_out(s, x.narrow(0, blk.r0, rows), items->narrow(0, blk.b0, blk.b1 - blk.b0).t());
          blk.scores = s.data_ptr();
          blk.ld = blk.b1 - blk.b0;
        } else {
          blk.ld = scores.stride(0);
          blk.scores = static_cast<const char*>(scores.data_ptr()) +
                       (blk.r0 * scores.stride(0) + blk.b0) * scores.element_size();
        }
        if (!DIFFCORE_ISA_CALL(scan_block_kernel, blk, dt)) ok = false;
      }
    }
  });
  TORCH_CHECK_VALUE(ok.load(), "scores: expected no NaN (check the queries and items for NaN and Inf)");
  at::parallel_for(0, B, 256, [&](int64_t r0, int64_t r1) {
    FinishRows f{heap_scores.data_ptr(), ids.data_ptr<int64_t>(), values.data_ptr(), ids.data_ptr<int64_t>(),
                 r0, r1, k};
    DIFFCORE_ISA_CALL(finish_rows_kernel, f, dt);
  });
  return {values, ids};
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("retrieval_topk", &diffcore::cpu::retrieval_topk);
}
#endif
