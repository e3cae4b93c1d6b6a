// Run-time choice between the per-instruction-set builds of a CPU kernel file.
//
// Every csrc/cpu/<family>.cpp is compiled once per instruction set (DEFAULT, AVX2, AVX512; see
// CMakeLists.txt) with CPU_CAPABILITY naming the build, so its kernels land in
// diffcore::cpu::DEFAULT, ::AVX2 and ::AVX512. The DEFAULT build also holds the op entry points
// (DIFFCORE_CPU_ENTRY is defined there), which call the best kernel through DIFFCORE_ISA_CALL.
// The choice follows ATen's (at::get_cpu_capability), so ATEN_CPU_CAPABILITY=default|avx2|avx512
// selects a build exactly as it does for PyTorch's own kernels.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace diffcore::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa best_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(DIFFCORE_HAVE_AVX512)
    if (cap == "AVX512") return Isa::kAvx512;
#endif
#if defined(DIFFCORE_HAVE_AVX2)
    if (cap == "AVX2" || cap == "AVX512") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "AVX512";
    case Isa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace diffcore::cpu

// Declares a kernel in every instruction-set namespace that was built.
#define DIFFCORE_ISA_DECLARE_DEFAULT(decl) namespace diffcore::cpu::DEFAULT { decl; }
#if defined(DIFFCORE_HAVE_AVX2)
#define DIFFCORE_ISA_DECLARE_AVX2(decl) namespace diffcore::cpu::AVX2 { decl; }
#else
#define DIFFCORE_ISA_DECLARE_AVX2(decl)
#endif
#if defined(DIFFCORE_HAVE_AVX512)
#define DIFFCORE_ISA_DECLARE_AVX512(decl) namespace diffcore::cpu::AVX512 { decl; }
#else
#define DIFFCORE_ISA_DECLARE_AVX512(decl)
#endif
#define DIFFCORE_ISA_DECLARE(decl) \
  DIFFCORE_ISA_DECLARE_DEFAULT(decl) DIFFCORE_ISA_DECLARE_AVX2(decl) DIFFCORE_ISA_DECLARE_AVX512(decl)

#if defined(DIFFCORE_HAVE_AVX512)
#define DIFFCORE_ISA_CASE_AVX512(fn, ...) \
  case ::diffcore::cpu::Isa::kAvx512: return ::diffcore::cpu::AVX512::fn(__VA_ARGS__);
#else
#define DIFFCORE_ISA_CASE_AVX512(fn, ...)
#endif
#if defined(DIFFCORE_HAVE_AVX2)
#define DIFFCORE_ISA_CASE_AVX2(fn, ...) \
  case ::diffcore::cpu::Isa::kAvx2: return ::diffcore::cpu::AVX2::fn(__VA_ARGS__);
#else
#define DIFFCORE_ISA_CASE_AVX2(fn, ...)
#endif

// Calls fn(...) from the best instruction-set build of the running CPU.
#define DIFFCORE_ISA_CALL(fn, ...)                              \
  [&] {                                                         \
    switch (::diffcore::cpu::best_isa()) {                      \
      DIFFCORE_ISA_CASE_AVX512(fn, __VA_ARGS__)                 \
      DIFFCORE_ISA_CASE_AVX2(fn, __VA_ARGS__)                   \
      default: return ::diffcore::cpu::DEFAULT::fn(__VA_ARGS__); \
    }                                                           \
  }()
