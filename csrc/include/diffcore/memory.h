// Tensors a kernel allocates: fresh outputs (optionally backed by transparent huge pages) and the
// gather scratch it keeps between calls (always advised).
//
// A large fresh tensor is fresh memory from mmap: its first write takes one page fault per 4 KiB
// page, and those faults can cost more than the kernel that writes the tensor (a 400 x 94,949
// float32 output: ~37,000 faults). Advising the 2 MiB-aligned interior of the untouched memory as
// MADV_HUGEPAGE makes the first write take ~800 faults instead, and a kernel that reads the memory
// at random afterwards misses the TLB far less often. It is a hint: without transparent huge pages
// ("never"), on memory already touched, or off Linux it changes nothing; the values are never
// affected.
//
// Outputs (empty_output) are advised only when DIFFCORE_HUGE_PAGES=1, because the first-touch
// effect depends on the machine. On a 2-vCPU AMD EPYC guest it took an allocating 400 x 94,949 step
// from ~108 to ~35 ms under load. On a 2-vCPU Intel guest the same step took 39 ms with a p80 of
// 171 ms against a steady 55 ms without it, and the seeded step 267 ms against 76 ms (one bench run
// each; the first 3 to 5 steps of every process ~260 ms): likely the guest hands free 2 MiB blocks
// back to the host (free page reporting) and the host backs them anew on the next fault. Loops
// that must not pay first-touch faults at all write in place or into a reused `out=`.
//
// Scratch that a kernel gathers rows from at random (GatherScratch: propagate's layer buffers) is
// advised as huge pages and kept between calls: there the pages are read millions of times, so
// the TLB misses the 2 MiB pages save matter, and keeping the buffers pays their first-touch
// faults once per process rather than once per call. On that Intel guest, over 40 calls of a
// Gowalla-sized 3-layer propagate (d = 64) per process, four processes each: fresh 4 KiB-page
// buffers 43.8-46.8 ms median; fresh huge-page buffers 35.0-41.3 ms median but a p90 of
// 45-104 ms (the slow 2 MiB faults above); kept huge-page buffers 34.4-34.6 ms median, 36.1-39.1
// ms p90. One SpMM over a huge-page input ran 11.2-11.5 ms against 12.7-13.2 ms over the same
// values in 4 KiB pages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string_view>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace diffcore {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
// Below this the faults are cheap, and the allocator may hand back memory already in use.
constexpr int64_t kHugePageMinBytes = 2 * kHugePageBytes;

// True when the environment sets DIFFCORE_HUGE_PAGES=1 (read once).
inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("DIFFCORE_HUGE_PAGES");
    return v != nullptr && std::string_view(v) == "1";
  }();
  return enabled;
}

// Advises t's 2 MiB-aligned interior as MADV_HUGEPAGE (small or non-CPU tensors: nothing).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (!t.device().is_cpu() || bytes < kHugePageMinBytes) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto mask = static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t first = (start + mask) & ~mask, last = (start + static_cast<uintptr_t>(bytes)) & ~mask;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty (contiguous), advised when DIFFCORE_HUGE_PAGES=1: for every output a kernel allocates.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (huge_pages_enabled()) advise_huge_pages(t);
  return t;
}

// A contiguous scratch tensor a kernel gathers rows from at random, for the length of one call:
// a buffer of the same shape and dtype kept from an earlier call when one is free, else a fresh
// one advised as huge pages; it is kept for the next call when this object goes. The process keeps
// at most kGatherScratchKept buffers (the oldest go first); calls that run at once get their own.
class GatherScratch {
 public:
  static constexpr size_t kGatherScratchKept = 2;  // propagate's two layer buffers

  GatherScratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
    {
      std::lock_guard<std::mutex> lock(pool().mutex);
      auto& kept = pool().kept;
      for (auto it = kept.begin(); it != kept.end(); ++it) {
        if (it->sizes() == sizes && it->options().dtype() == options.dtype() && it->device() == options.device()) {
          tensor_ = std::move(*it);
          kept.erase(it);
          return;
        }
      }
    }
    tensor_ = at::empty(sizes, options);
    advise_huge_pages(tensor_);
  }
  ~GatherScratch() {
    std::lock_guard<std::mutex> lock(pool().mutex);
    auto& kept = pool().kept;
    kept.push_back(std::move(tensor_));
    if (kept.size() > kGatherScratchKept) kept.pop_front();
  }
  GatherScratch(const GatherScratch&) = delete;
  GatherScratch& operator=(const GatherScratch&) = delete;

  void* data() const { return tensor_.data_ptr(); }

 private:
  struct Pool {
    std::mutex mutex;
    std::deque<at::Tensor> kept;
  };
  // Never destroyed: the kept tensors must not be freed after the allocator at process exit.
  static Pool& pool() {
    static Pool* p = new Pool();
    return *p;
  }
  at::Tensor tensor_;
};

}  // namespace diffcore
