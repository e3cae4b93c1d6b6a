// The sum of a vector's lanes, shared by every CPU kernel's row reductions.
//
// Included only by per-instruction-set kernel files, inside their CPU_CAPABILITY namespace, so each
// build gets its own copy. A float tree (log2 lanes shuffles and adds) rather than a chain of lane
// additions: kernels reduce one short row at a time (d = 64 sphere rows, 128-wide SDE rows), where
// a 16-deep dependent chain per row held the loop at latency, not bandwidth (the SDE corrector's
// norm pass on 65,536 x 128: corrector + predictor in place 9.9-11.1 -> 8.5-9.4 ms, alternating
// processes; the sphere's q_sample with given noise 1.35-1.40 -> 1.20 ms in two runs of three, 1.56
// in the third).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace diffcore::cpu {
inline namespace CPU_CAPABILITY {

template <typename A>
inline A lane_sum(const at::vec::Vectorized<A>& v) {
  using V = at::vec::Vectorized<A>;
  return at::vec::vec_reduce_all<A>([](const V& a, const V& b) { return a + b; }, v);
}

}  // namespace CPU_CAPABILITY
}  // namespace diffcore::cpu
