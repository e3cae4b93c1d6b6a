// Fresh output tensors backed by transparent huge pages where the OS allows it.
//
// A large fresh tensor is fresh memory from mmap: its first write takes one page fault per 4 KiB
// page, and on these machines those faults cost more than the kernel that writes the tensor (a
// 400 x 94,949 float32 output: ~37,000 faults, about 50 ms against a 10 ms step). Advising the
// 2 MiB-aligned interior of the untouched memory as MADV_HUGEPAGE makes the first write take ~75
// faults instead (about 17 ms here). It is a hint: without transparent huge pages ("never"), on
// memory already touched, or off Linux it changes nothing; the values are never affected.
// On a VM the first huge pages a process touches can be slow to back: on a 2-vCPU Intel guest the
// first 3 to 5 such 400 x 94,949 steps of a process took ~260 ms each, then 31-40 ms (4 KiB pages
// there: ~48 ms and 37,090 faults per call throughout). A loop that must never pay this writes in
// place or into a reused `out=`.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace diffcore {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
// Below this the faults are cheap, and the allocator may hand back memory already in use.
constexpr int64_t kHugePageMinBytes = 2 * kHugePageBytes;

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

// at::empty (contiguous) with advise_huge_pages: for every output a kernel allocates.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace diffcore
