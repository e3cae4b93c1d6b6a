// Vector loads and stores of feature rows, shared by every CPU kernel that streams rows: load2 /
// store2 move two vectors (2 AVec<T>::size() elements) of T in the accumulation type acc_t<T>
// (float for float32, float16 and bfloat16; double for float64), and stream2 / write2 /
// stream_output / stream_head / stream_fence write outputs larger than the cache with non-temporal
// stores; prefetch_rows_ahead / prefetch_row prefetch the rows ahead for kernels over short rows.
//
// Included only by per-instruction-set kernel files, inside their CPU_CAPABILITY namespace, so each
// build gets its own copy.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace diffcore::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using AVec = at::vec::Vectorized<acc_t<T>>;

// float32 and float64 are computed in their own type; the others are converted.
template <typename T>
constexpr bool kNative = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T>
inline void load2(const T* p, AVec<T>& lo, AVec<T>& hi) {
  if constexpr (kNative<T>) {
    lo = AVec<T>::loadu(p);
    hi = AVec<T>::loadu(p + AVec<T>::size());
  } else {
    at::vec::load_to_float<T>(p, lo, hi);
  }
}

template <typename T>
inline void store2(T* p, const AVec<T>& lo, const AVec<T>& hi) {
  if constexpr (kNative<T>) {
    lo.store(p);
    hi.store(p + AVec<T>::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// Software prefetch for kernels that walk short rows one at a time with a reduction between a
// row's loads and its stores (the sphere steps): each row's reads and stores wait on that chain,
// so the hardware alone keeps too few lines in flight, and a store to a line not yet owned stalls
// the ones behind it. Such a kernel prefetches the row prefetch_rows_ahead(row bytes) rows on:
// its operands for reading and its output for writing. Rows of kPrefetchAhead bytes or more get
// none (the hardware prefetcher follows a long row by itself).
inline constexpr int64_t kPrefetchAhead = 2048;  // bytes ahead, per operand

inline int64_t prefetch_rows_ahead(int64_t row_bytes) {
  return row_bytes >= kPrefetchAhead || row_bytes <= 0 ? 0 : kPrefetchAhead / row_bytes;
}

// Prefetches the lines of p[0:n]: for writing when kWrite, else for reading.
template <bool kWrite = false, typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t l = first; l < last; l += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(l), kWrite ? 1 : 0);
}

// store2 with non-temporal stores where the build has them (float32 and float64, p aligned to the
// vector size; other types store2): the lines go to memory without being read first or filling
// the cache. For outputs that do not fit the cache; a kernel that uses it calls stream_fence()
// before it returns.
template <typename T>
inline void stream2(T* p, const AVec<T>& lo, const AVec<T>& hi) {
  constexpr int64_t n = AVec<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, lo);
    _mm512_stream_ps(p + n, hi);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, lo);
    _mm512_stream_pd(p + n, hi);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, lo);
    _mm256_stream_ps(p + n, hi);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, lo);
    _mm256_stream_pd(p + n, hi);
    return;
  }
#endif
  (void)n;
  store2(p, lo, hi);
}

// stream2 when kStream, else store2.
template <bool kStream, typename T>
inline void write2(T* p, const AVec<T>& lo, const AVec<T>& hi) {
  if constexpr (kStream) {
    stream2(p, lo, hi);
  } else {
    store2(p, lo, hi);
  }
}

// Whether a kernel streams an output of `bytes` (all it writes) of type T: float32 or float64, in a
// build that has non-temporal stores, written apart from its input x (in place, x's lines are in
// the cache already when they are written) and from 32 MiB on (the cache holds less).
template <typename T>
inline bool stream_output(const void* out, const void* x, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return kNative<T> && out != x && bytes >= (int64_t{32} << 20);
#else
  return false;
#endif
}

// Orders a thread's non-temporal stores before what follows (the end of its parallel task).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// The elements of a row segment p[0:n] to store plainly before stream2 may write p + h onwards
// (aligned to the vector size; every other pointer the same kernel streams, q, must then be too):
// n when there is no such h.
template <typename T>
inline int64_t stream_head(const T* p, int64_t n, const T* q = nullptr) {
  constexpr uintptr_t kAlign = sizeof(AVec<T>);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!kNative<T> || a % sizeof(T) != 0) return n;
  const int64_t h = static_cast<int64_t>((kAlign - a % kAlign) % kAlign / sizeof(T));
  if (q != nullptr && reinterpret_cast<uintptr_t>(q + h) % kAlign != 0) return n;
  return std::min(h, n);
}

// Runs part(streamed, j, m) over the segment out[0:n] a task writes: part(false, 0, h) for the head
// up to the first aligned element (stream_head; q: a second output written alongside), stored
// plainly, then part(true, h, n - h) for the rest, streamed. Without stream, part(false, 0, n).
// streamed is std::false_type or std::true_type, so a part can pick its instantiation with it.
template <typename T, typename Part>
inline void stream_parts(bool stream, const T* out, int64_t n, Part&& part, const T* q = nullptr) {
  const int64_t h = stream ? stream_head(out, n, q) : n;
  part(std::false_type{}, int64_t{0}, h);
  if (h < n) part(std::true_type{}, h, n - h);
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu
