// Tensors a kernel allocates: outputs and scratch, from a pool of large blocks that earlier diffcore
// tensors freed, optionally backed by transparent huge pages.
//
// The block pool (memory.cpp). Every output and scratch tensor of 1 MiB or more comes from a block
// that an earlier diffcore tensor of exactly that many bytes freed, the most recently freed first,
// else from torch's CPU allocator; a freed block goes back to the pool, which keeps at most
// kPoolBlocks blocks and DIFFCORE_POOL_MB MiB (default 1024; 0 turns the pool off), freeing the
// oldest beyond that. diffcore.empty_cache() frees every kept block. This is the CUDA caching
// allocator's idea on the CPU, for the one pattern that matters here: a loop that allocates the
// same large outputs every step (a sampler, a training step). From glibc such a tensor is fresh
// mmap'd memory (one page fault per 4 KiB on its first write: ~37,000 for a 400 x 94,949 float32
// output) or a heap block whose lines have left the cache (the next free block of that size is
// rarely the last one freed once other code allocates in between). A pooled block is the one the
// previous step freed: its pages are mapped and its lines are likely still in cache. On this
// development machine (2-vCPU Intel guest), in the bench's interleaved rounds: the allocating
// 65,536 x 64 sphere q_sample took 2.6 ms from glibc with no page faults (--malloc steady) and
// 1.75 ms from the pool, 1.2 ms in place; DiffRec's allocating 400 x 94,949 p_step 50.8 ms from
// glibc (default malloc) and 21.8 ms from the pool, 16.3 ms in place. Departure from DESIGN.md's
// allocation-free kernels: the process keeps freed output memory, up to the cap above.
//
// Huge pages. Advising the 2 MiB-aligned interior of fresh memory as MADV_HUGEPAGE makes the
// first write take one fault per 2 MiB instead of 512, and a kernel that reads the memory at
// random afterwards misses the TLB far less often. It is a hint: without transparent huge pages
// ("never"), on memory already touched, or off Linux it changes nothing; the values are never
// affected.
//
// Outputs (empty_output) are advised only when DIFFCORE_HUGE_PAGES=1, because the first-touch
// effect depends on the machine. On a 2-vCPU AMD EPYC guest it took an allocating 400 x 94,949 step
// from ~108 to ~35 ms under load. On a 2-vCPU Intel guest the same step took 39 ms with a p80 of
// 171 ms against a steady 55 ms without it, and the seeded step 267 ms against 76 ms (one bench run
// each; the first 3 to 5 steps of every process ~260 ms): likely the guest hands free 2 MiB blocks
// back to the host (free page reporting) and the host backs them anew on the next fault.
//
// Scratch that a kernel gathers rows from at random (gather_scratch: propagate's layer buffers) is
// always advised: there the pages are read millions of times, so the TLB misses the 2 MiB pages
// save matter, and the pool hands the next call the same buffers, so their first-touch faults are
// paid once per process rather than once per call. On that Intel guest, over 40 calls of a
// Gowalla-sized 3-layer propagate (d = 64) per process, four processes each: fresh 4 KiB-page
// buffers 43.8-46.8 ms median; fresh huge-page buffers 35.0-41.3 ms median but a p90 of
// 45-104 ms (the slow 2 MiB faults above); kept huge-page buffers 34.4-34.6 ms median, 36.1-39.1
// ms p90. One SpMM over a huge-page input ran 11.2-11.5 ms against 12.7-13.2 ms over the same
// values in 4 KiB pages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <utility>

namespace diffcore {

// True when the environment sets DIFFCORE_HUGE_PAGES=1 (read once).
inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("DIFFCORE_HUGE_PAGES");
    return v != nullptr && std::string_view(v) == "1";
  }();
  return enabled;
}

// A contiguous CPU tensor from the block pool (small or non-CPU: at::empty); a fresh block is
// advised as huge pages when `advise`.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool advise);

// Frees every block the pool keeps; returns how many bytes that was.
int64_t release_pool();

// The blocks and bytes the pool keeps now.
std::pair<int64_t, int64_t> pool_kept();

// Every output a kernel allocates: pooled, advised when DIFFCORE_HUGE_PAGES=1.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(sizes, options, huge_pages_enabled());
}

// Scratch that a kernel gathers rows from at random, for the length of one call: pooled (so the
// next call of the same shape gets the same pages back) and always advised.
inline at::Tensor gather_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(sizes, options, true);
}

}  // namespace diffcore
