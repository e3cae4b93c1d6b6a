// retrieval family, CPU: the k best items of each row, from scores or from queries and item
// embeddings, each row's history masked; the meaning is diffcore/reference/retrieval.py.
//
//   scores = x  or  x @ items.T (in x's dtype);  scores[r, history(r)] = -inf
//   values, ids = the first k of each row in descending score order, ties to the lower item id
//
// Each row sees its items in ascending id order and keeps a buffer of candidates: once it has k,
// a threshold that a later item must beat strictly (a tie has the larger id and loses). Items above
// it are appended; a full buffer (2k + 64) is cut back to about k by binning its scores (a few
// branch-free passes, exact selection where the scores bunch together), which raises the
// threshold. That costs a few operations per candidate, where a bounded heap paid a mispredicted
// sift per insertion (k = 100 from queries on Gowalla: 111 -> 74 ms, of which 45 ms are GEMMs).
// The scan tests a vector of scores at a time against the threshold (and for NaN) and offers
// only the lanes that pass: after the first few thousand items a row costs about one vector
// compare per 16 scores. History items (sorted once per row) clear their lanes from the vector's
// hits; a history item is taken, with score -inf, only by a row still short of k candidates, so a
// row with fewer than k unmasked items ends with its masked items in id order.
//
// From queries, fixed blocks of kRowBlock rows are split among the threads; a thread computes the
// scores of its rows against kItemBlock items at a time with ATen's GEMM (one thread inside the
// region) into its own buffer, small enough for L2, and scans them before the next block; after
// the last block it sorts the rows' k best into the output. The (B, n_items) scores are never
// stored. The block shapes, hence the scores, do not depend on the thread count. Float16/bfloat16
// scores are compared as float32 (exact), float64 as float64.
//
// Compiled once per instruction set; the DEFAULT build also holds the op entry point.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <diffcore/checks.h>
#include <diffcore/cpu_isa.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "vec_rows.h"

namespace diffcore::cpu {

// One block of rows and items: the scores of rows [r0, r1) for items [b0, b1), row r at
// scores + (r - r0) * ld, and the candidate buffers they feed (see Candidates below).
struct ScanBlock {
  const void* scores;
  int64_t ld;
  int64_t r0, r1, b0, b1;
  const int64_t* crow;  // sorted history: row r's items are col[crow[r]:crow[r + 1]], or nullptr
  const int64_t* col;
  // Row r's candidates, i = r - r0: scores cand_scores[i * cap :] (float32, or float64 for float64
  // scores), ids cand_ids[i * cap :], count[i] of them, threshold thr[i] (exact in double).
  void* cand_scores;
  int64_t* cand_ids;
  int64_t* count;
  double* thr;
  void* scratch;  // cap scores
  float* converted;  // b1 - b0 floats: a float16/bfloat16 scores row as float32, else nullptr
  int64_t k, cap;
};

// The finished candidates of a ScanBlock's rows sorted into values (x's dtype) and ids, both (B, k).
struct FinishRows {
  ScanBlock blk;
  void* values;
  int64_t* ids;
};

namespace CPU_CAPABILITY {
namespace {

// The least of s[0:n] and, with kMax, the greatest, n >= 1 (no NaN): vector lanes, then the lanes
// and the tail. Candidates::select takes both per cut, then the least of the kept; as chains of
// scalar min / max they held it at latency (top-100 of 400 x 4,096 scores on one thread: 6.0-6.2
// -> 4.5-4.6 ms; from queries on Gowalla, 2,048 x 40,981: 72-74 -> 65-66 ms; alternating processes).
template <bool kMax, typename A>
void extremes(const A* s, int64_t n, A& lo, A& hi) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  lo = s[0];
  if constexpr (kMax) hi = s[0];
  int64_t i = 0;
  if (n >= W) {
    Vec vlo = Vec::loadu(s), vhi = vlo;
    for (i = W; i + W <= n; i += W) {
      const Vec v = Vec::loadu(s + i);
      vlo = at::vec::minimum(vlo, v);
      if constexpr (kMax) vhi = at::vec::maximum(vhi, v);
    }
    lo = at::vec::vec_reduce_all<A>([](const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }, vlo);
    if constexpr (kMax)
      hi = at::vec::vec_reduce_all<A>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vhi);
  }
  for (; i < n; ++i) {
    lo = std::min(lo, s[i]);
    if constexpr (kMax) hi = std::max(hi, s[i]);
  }
}

// A row's candidates s[0:n], id[0:n], in ascending id order, at most cap = 2k + kSlack. Once n has
// reached k, at least k candidates score thr or more. Items come in ascending id order, so a later
// item that ties thr has a larger id than each of those and loses: it can reach the final k only
// with a score strictly above thr. Such items are appended; a full buffer is cut back to about its
// best k, which raises thr.
template <typename A>
struct Candidates {
  A* s;
  int64_t* id;
  A* scratch;
  int64_t k, cap, n;
  A thr;

  // Keeps the best k of the n >= k candidates, in id order: the k-th best score t found on a copy
  // of the scores, then a branch-free stable pass keeps the scores above t and the first (lowest
  // id) of those equal to t.
  void select_exact() {
    std::copy_n(s, n, scratch);
    std::nth_element(scratch, scratch + (k - 1), scratch + n, std::greater<A>());
    const A t = scratch[k - 1];
    int64_t ties = k;
    for (int64_t i = 0; i < n; ++i) ties -= s[i] > t;
    int64_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool tie = s[i] == t;
      const bool keep = s[i] > t || (tie && ties > 0);
      ties -= tie && keep;
      s[j] = s[i];
      id[j] = id[i];
      j += keep;
    }
    n = k;
    thr = t;
  }

  // Raises thr with n >= k candidates and makes room. The first k set it to their worst. A full
  // buffer is binned by score over [lo, hi] (bin(v) never decreases as v grows); the candidates
  // in the top bins holding at least k are kept, in id order, and thr becomes the least kept
  // score: each later item at or below it is beaten by every kept one (a tie by a lower id). This
  // costs a few branch-free passes; a cut that frees too little room (scores bunched together or
  // infinite) falls back to the exact selection.
  void select() {
    if (n == k) {
      thr = *std::min_element(s, s + n);
      return;
    }
    constexpr int kBins = 64;
    A lo, hi;
    extremes<true>(s, n, lo, hi);
    const A scale = kBins / (hi - lo);
    if (!(hi > lo) || !std::isfinite(scale) || !std::isfinite(lo) || !std::isfinite(hi)) return select_exact();
    const auto bin = [&](A v) { return std::min(static_cast<int>((v - lo) * scale), kBins - 1); };
    int64_t hist[kBins] = {};
    for (int64_t i = 0; i < n; ++i) ++hist[bin(s[i])];
    int cut = kBins - 1;
    int64_t kept = hist[cut];
    while (kept < k) kept += hist[--cut];
    if (kept > (k + cap) / 2) return select_exact();
    int64_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool keep = bin(s[i]) >= cut;
      s[j] = s[i];
      id[j] = id[i];
      j += keep;
    }
    n = j;
    extremes<false>(s, n, thr, thr);
  }

  void append(A v, int64_t i) {
    s[n] = v;
    id[n++] = i;
    if (n == k || n == cap) select();
  }

  // Item i (larger than every id seen) with score v. Returns false on NaN.
  bool offer(A v, int64_t i) {
    if (v != v) return false;
    if (n < k || v > thr) append(v, i);
    return true;
  }
};

// Scores read ahead of the scan (4 KiB of float32): a (B, n_items) scores tensor streams from
// memory, and the scan's bursts of candidates at the start of a row leave the hardware prefetcher
// behind (DiffRec's 400 x 94,949, k = 100, history masked: 15.2-15.6 -> 13.7-14.2 ms, alternating
// processes; from queries, where the blocks sit in L2, unchanged within noise). Both cache lines of
// each step are prefetched (400 x 94,949 uniform scores, k = 100, history masked: 11.7-12.2 ->
// 10.2-11.8 ms; a nearer or farther distance, 512 or 2,048, within noise of 1,024).
// Tried: compress-storing each vector's hits into the buffer (AVX-512), no branch per candidate:
// within noise; the scan waits on memory, not on mispredicted offers.
constexpr int64_t kPrefetch = 1024;

// Row r over items [b0, b1) with scores s[0 : b1 - b0] and its sorted history [h, h_end) (both
// null without one). Returns false on NaN. Item by item until the row has k candidates, a history
// item taken with score -inf (only a row still short of k takes one); then a vector of scores at a
// time, its lanes above the threshold less its history items offered. Masking the history lanes,
// rather than scanning the runs between history items, keeps the scan on vectors: DiffRec's rows
// hold a history item every ~200 items, and each run ended in up to 2W - 1 scalar offers and a
// mispredicted exit. With the sorted histories taken as they are (sorted_history): 400 x 94,949
// scores, k = 100, ~475 history items per row, 14.9-15.3 -> 12.7-13.9 ms; from queries on
// Gowalla, k = 100, history masked, 69.4-69.9 -> 65.4-66.7 ms (alternating processes).
template <typename A>
bool scan_row(const A* s, int64_t b0, int64_t b1, const int64_t* h, const int64_t* h_end, Candidates<A>& c) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const int64_t* p = h == nullptr ? h : std::lower_bound(h, h_end, b0);  // the next history item
  // The history item i (and its duplicates) passed: whether i is one.
  const auto masked = [&](int64_t i) {
    if (p == h_end || *p != i) return false;
    while (p < h_end && *p == i) ++p;
    return true;
  };
  bool ok = true;
  int64_t i = b0;
  for (; i < b1 && c.n < c.k; ++i) {
    if (masked(i)) {
      c.append(-std::numeric_limits<A>::infinity(), i);
    } else {
      ok &= c.offer(s[i - b0], i);
    }
  }
  for (; i + 2 * W <= b1; i += 2 * W) {
    const Vec thr(c.thr);
    __builtin_prefetch(s + (i - b0) + kPrefetch);
    __builtin_prefetch(s + (i - b0) + kPrefetch + W);
    const Vec a = Vec::loadu(s + (i - b0)), b = Vec::loadu(s + (i - b0) + W);
    // A bit is set where !(score <= thr): a candidate (above the threshold) or a NaN (unordered);
    // the history lanes are cleared, and the rest offered.
    uint64_t hits = static_cast<uint64_t>((a <= thr).zero_mask()) |
                    (static_cast<uint64_t>((b <= thr).zero_mask()) << W);
    for (; p < h_end && *p < i + 2 * W; ++p) hits &= ~(uint64_t{1} << (*p - i));
    for (; hits; hits &= hits - 1) {
      const int64_t j = __builtin_ctzll(hits);
      ok &= c.offer(s[i - b0 + j], i + j);
    }
  }
  for (; i < b1; ++i) {
    if (!masked(i)) ok &= c.offer(s[i - b0], i);
  }
  return ok;
}

template <typename A>
Candidates<A> candidates(const ScanBlock& blk, int64_t r) {
  const int64_t i = r - blk.r0;
  return Candidates<A>{static_cast<A*>(blk.cand_scores) + i * blk.cap, blk.cand_ids + i * blk.cap,
                       static_cast<A*>(blk.scratch), blk.k, blk.cap, blk.count[i], static_cast<A>(blk.thr[i])};
}

template <typename T>
bool scan_block(const ScanBlock& blk) {
  using A = acc_t<T>;
  const int64_t len = blk.b1 - blk.b0;
  bool ok = true;
  for (int64_t r = blk.r0; r < blk.r1; ++r) {
    const T* row = static_cast<const T*>(blk.scores) + (r - blk.r0) * blk.ld;
    const A* s;
    if constexpr (std::is_same_v<T, A>) {
      s = row;
    } else {
      for (int64_t j = 0; j < len; ++j) blk.converted[j] = static_cast<A>(row[j]);
      s = blk.converted;
    }
    Candidates<A> c = candidates<A>(blk, r);
    const int64_t* h = blk.crow ? blk.col + blk.crow[r] : nullptr;
    const int64_t* h_end = blk.crow ? blk.col + blk.crow[r + 1] : nullptr;
    ok &= scan_row(s, blk.b0, blk.b1, h, h_end, c);
    blk.count[r - blk.r0] = c.n;
    blk.thr[r - blk.r0] = c.thr;
  }
  return ok;
}

template <typename T>
void finish_rows(const FinishRows& f) {
  using A = acc_t<T>;
  const ScanBlock& blk = f.blk;
  std::vector<std::pair<A, int64_t>> best(static_cast<size_t>(blk.k));
  for (int64_t r = blk.r0; r < blk.r1; ++r) {
    Candidates<A> c = candidates<A>(blk, r);
    if (c.n > c.k) c.select_exact();
    for (int64_t j = 0; j < c.k; ++j) best[j] = {c.s[j], c.id[j]};
    std::sort(best.begin(), best.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    T* values = static_cast<T*>(f.values) + r * blk.k;
    int64_t* ids = f.ids + r * blk.k;
    for (int64_t j = 0; j < blk.k; ++j) {
      values[j] = static_cast<T>(best[j].first);
      ids[j] = best[j].second;
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

constexpr int64_t kRowBlock = 128;  // rows per GEMM and per task, from queries
constexpr int64_t kScoreRowBlock = 8;  // rows per task, from scores: many tasks, so the threads end together
constexpr int64_t kItemBlock = 1024;  // items per GEMM: a 128 x 1024 float32 block is 512 KiB
constexpr int64_t kScoreChunk = 4096;  // items per scan of a scores row (converted dtypes)
constexpr int64_t kSlack = 64;  // candidate buffer room beyond 2k

// The history as the scan reads it, checked: each row's items sorted (col itself when every row
// is, a CSR's usual order; else a copy of col sorted within rows), so a row's first and last items
// bound its ids. crow: contiguous.
at::Tensor sorted_history(const at::Tensor& crow, const at::Tensor& col_arg, int64_t rows, int64_t n_items) {
  check_dim(crow, 1, "crow");
  check_dim(col_arg, 1, "col");
  TORCH_CHECK(crow.scalar_type() == at::kLong && col_arg.scalar_type() == at::kLong,
              "crow, col: expected int64 indices, got ", crow.scalar_type(), " and ", col_arg.scalar_type());
  TORCH_CHECK(crow.numel() == rows + 1, "crow: expected ", rows + 1, " entries (rows + 1), got ", crow.numel());
  const int64_t* c = crow.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0 && c[rows] == col_arg.numel(), "crow: expected to run from 0 to len(col) = ", col_arg.numel(),
              ", got ", c[0], " .. ", c[rows]);
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(c[r] <= c[r + 1], "crow: expected non-decreasing offsets");
  at::Tensor col = col_arg.contiguous();
  std::atomic<bool> sorted{true};
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    const int64_t* s = col.data_ptr<int64_t>();
    for (int64_t r = r0; r < r1 && sorted.load(std::memory_order_relaxed); ++r) {
      if (!std::is_sorted(s + c[r], s + c[r + 1])) sorted = false;
    }
  });
  if (!sorted) {
    col = col.clone();
    int64_t* s = col.data_ptr<int64_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::sort(s + c[r], s + c[r + 1]);
    });
  }
  const int64_t* s = col.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    if (c[r] == c[r + 1]) continue;
    const int64_t bad = s[c[r]] < 0 ? s[c[r]] : s[c[r + 1] - 1];
    TORCH_CHECK(bad >= 0 && bad < n_items, "col: expected item ids in [0, ", n_items, "), got ", bad);
  }
  return col;
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
    hcrow = crow->contiguous();
    hcol = sorted_history(hcrow, *col, B, n);
  }
  at::Tensor values = at::empty({B, k}, x.options());
  at::Tensor ids = at::empty({B, k}, x.options().dtype(at::kLong));
  if (B == 0) return {values, ids};
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  // A row never holds more candidates than items, so cap <= n is enough room.
  const int64_t cap = std::min(2 * k + kSlack, n);

  ScanBlock base{};
  base.crow = crow ? hcrow.data_ptr<int64_t>() : nullptr;
  base.col = crow ? hcol.data_ptr<int64_t>() : nullptr;
  base.k = k;
  base.cap = cap;

  std::atomic<bool> ok{true};
  const at::Tensor scores = items ? at::Tensor() : unit_cols(x);
  const int64_t row_block = items ? kRowBlock : kScoreRowBlock;
  const int64_t blocks = (B + row_block - 1) / row_block;
  at::parallel_for(0, blocks, 1, [&](int64_t g0, int64_t g1) {
    at::Tensor buf = items ? at::empty({row_block * std::min(kItemBlock, n)}, x.options()) : at::Tensor();
    // A row block's candidates (see ScanBlock).
    const auto acc_opts = x.options().dtype(acc);
    at::Tensor cand_scores = at::empty({row_block * cap}, acc_opts), scratch = at::empty({cap}, acc_opts);
    at::Tensor cand_ids = at::empty({row_block * cap}, x.options().dtype(at::kLong));
    std::vector<int64_t> count(static_cast<size_t>(row_block));
    std::vector<double> thr(static_cast<size_t>(row_block));  // read only once a row has k candidates
    const int64_t step = items ? kItemBlock : (dt == acc ? n : kScoreChunk);
    std::vector<float> converted(dt == acc ? 0 : static_cast<size_t>(std::min(step, n)));
    for (int64_t g = g0; g < g1; ++g) {
      ScanBlock blk = base;
      blk.r0 = g * row_block;
      blk.r1 = std::min(B, blk.r0 + row_block);
      blk.cand_scores = cand_scores.data_ptr();
      blk.cand_ids = cand_ids.data_ptr<int64_t>();
      blk.count = count.data();
      blk.thr = thr.data();
      blk.scratch = scratch.data_ptr();
      blk.converted = converted.data();
      std::fill(count.begin(), count.end(), 0);
      const int64_t rows = blk.r1 - blk.r0;
      bool block_ok = true;
      for (blk.b0 = 0; blk.b0 < n && block_ok; blk.b0 += step) {
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
        block_ok = DIFFCORE_ISA_CALL(scan_block_kernel, blk, dt);
      }
      if (!block_ok) {
        ok = false;
        continue;
      }
      FinishRows f{blk, values.data_ptr(), ids.data_ptr<int64_t>()};
      DIFFCORE_ISA_CALL(finish_rows_kernel, f, dt);
    }
  });
  TORCH_CHECK_VALUE(ok.load(), "scores: expected no NaN (check the queries and items for NaN and Inf)");
  return {values, ids};
}

}  // namespace
}  // namespace diffcore::cpu

TORCH_LIBRARY_IMPL(diffcore, CPU, m) {
  m.impl("retrieval_topk", &diffcore::cpu::retrieval_topk);
}
#endif
