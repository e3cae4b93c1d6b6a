// sparse family, CUDA: warp-per-row CSR SpMM with the normalisation applied on the fly, one layer
// of a LightGCN stack per launch. Plain CUDA behind a C ABI (declared below, extern "C"), compiled
// by nvcc alone; the meaning is diffcore.reference.sparse and the CPU twin csrc/cpu/sparse.cpp,
// whose layer scheme this follows:
//
//   A_hat[r, c] = rs[r] * v[e] * cs[c]                  (rs, v, cs optional: ones)
//   e[r, :]     = rs[r] * sum_e w_e y[col[e], :]        w_e = v[e] (* cs[col[e]] when scale_in)
//   next[r, :]  = cs[r] * e[r, :]                       (S_k, float32; when next != NULL)
//   out[r, :]   = wk e[r, :] + w0 x0[r, :] + sum[r, :]  (each term when given; when out != NULL)
//
// spmm is one call with scale_in = 1, wk = 1 and neither next, x0 nor sum; propagate calls it once
// per layer (layer 1 reads E0 with scale_in, later layers read S_{k-1}).
//
// One warp per row: its 32 lanes read 32 nonzeros' column indices and weights at once, then walk
// them with shuffles while every lane accumulates its own feature columns (lane, lane + 32, ...),
// so a hub row is spread over a warp and the gathered rows are read with coalesced loads. Rows are
// handed out in a grid-stride loop; the values do not depend on the launch shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

extern "C" {
/* Element types of the feature tensors (as kernels.h's diffcore_cuda_dtype). */
enum diffcore_cuda_sparse_dtype {
  DIFFCORE_CUDA_SPARSE_FLOAT32 = 0,
  DIFFCORE_CUDA_SPARSE_FLOAT16 = 1,
  DIFFCORE_CUDA_SPARSE_BFLOAT16 = 2
};

/* One layer over rows [0, rows): see the formula above. crow (rows + 1) int64; col (nnz) int32
 * (col32 != 0) or int64; val (nnz), row_scale (rows), col_scale (cols) float32 or NULL; y (cols, d)
 * of y_dtype with row stride y_stride, unit column stride; next (rows, d) float32 contiguous or
 * NULL; x0 (rows, d) of x0_dtype or NULL; sum (rows, d) float32 or NULL; out (rows, d) of out_dtype
 * or NULL. A column index outside [0, cols) sets *bad to 1 (bad may be NULL) and adds nothing.
 * Launches on `stream` (a cudaStream_t), does not synchronise, returns a cudaError_t code. */
int diffcore_cuda_sparse_layer(const int64_t* crow, const void* col, int col32, const float* val,
                               const float* row_scale, const float* col_scale, int64_t rows,
                               int64_t cols, const void* y, int y_dtype, int64_t y_stride,
                               int scale_in, float* next, int64_t d, const void* x0, int x0_dtype,
                               int64_t x0_stride, float w0, float wk, const float* sum,
                               int64_t sum_stride, void* out, int out_dtype, int64_t out_stride,
                               int* bad, void* stream);
}

namespace diffcore::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxVec = 4;  // feature columns per lane held in registers per pass (128 per warp)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct LayerArgs {
  const int64_t* crow;
  const void* col;
  bool col32;
  const float* val;
  const float* rs;
  const float* cs;
  int64_t rows, cols;
  const void* y;
  int64_t y_stride;
  bool scale_in;
  float* next;
  int64_t d;
  const void* x0;
  int64_t x0_stride;
  float w0, wk;
  const float* sum;
  int64_t sum_stride;
  void* out;
  int64_t out_stride;
  int* bad;
};

template <typename TY, typename TX0, typename TOut>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    csr_layer_kernel(const LayerArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const TY* y = static_cast<const TY*>(a.y);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < a.rows; r += warps) {
    const int64_t e0 = a.crow[r], e1 = a.crow[r + 1];
    const float rs = a.rs != nullptr ? a.rs[r] : 1.0f;
    for (int64_t j0 = 0; j0 < a.d; j0 += kWarp * kMaxVec) {
      float acc[kMaxVec];
#pragma unroll
      for (int v = 0; v < kMaxVec; ++v) acc[v] = 0.0f;
      for (int64_t base = e0; base < e1; base += kWarp) {
        // Each lane loads one nonzero of this chunk: its column and weight.
        const int64_t e = base + lane;
        int64_t c = 0;
        float w = 0.0f;
        if (e < e1) {
          c = a.col32 ? static_cast<const int32_t*>(a.col)[e] : static_cast<const int64_t*>(a.col)[e];
          if (c < 0 || c >= a.cols) {
            if (a.bad != nullptr) atomicExch(a.bad, 1);
            c = -1;  // skipped below: no row of y is read for it (y may have none)
          } else {
            w = a.val != nullptr ? a.val[e] : 1.0f;
            if (a.scale_in) w *= a.cs[c];
          }
        }
        const int count = static_cast<int>(e1 - base < kWarp ? e1 - base : kWarp);
        for (int k = 0; k < count; ++k) {
          const int64_t ck = __shfl_sync(0xffffffffu, c, k);
          const float wk = __shfl_sync(0xffffffffu, w, k);
          if (ck < 0) continue;  // the same for every lane: ck came from lane k
          const TY* yr = y + ck * a.y_stride;
#pragma unroll
          for (int v = 0; v < kMaxVec; ++v) {
            const int64_t j = j0 + v * kWarp + lane;
            if (j < a.d) acc[v] += wk * to_float(yr[j]);
          }
        }
      }
#pragma unroll
      for (int v = 0; v < kMaxVec; ++v) {
        const int64_t j = j0 + v * kWarp + lane;
        if (j >= a.d) continue;
        const float ev = rs * acc[v];
        if (a.next != nullptr) a.next[r * a.d + j] = a.cs != nullptr ? a.cs[r] * ev : ev;
        if (a.out != nullptr) {
          float o = a.wk * ev;
          if (a.x0 != nullptr) o += a.w0 * to_float(static_cast<const TX0*>(a.x0)[r * a.x0_stride + j]);
          if (a.sum != nullptr) o += a.sum[r * a.sum_stride + j];
          static_cast<TOut*>(a.out)[r * a.out_stride + j] = from_float<TOut>(o);
        }
      }
    }
  }
}

template <typename TY, typename TX0, typename TOut>
int launch(const LayerArgs& a, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t needed = (a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  const int blocks = static_cast<int>(needed < cap ? needed : cap);
  csr_layer_kernel<TY, TX0, TOut><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

// The three dtypes of one role, as template arguments, one after another.
template <typename F>
bool with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case DIFFCORE_CUDA_SPARSE_FLOAT32: f(float{}); return true;
    case DIFFCORE_CUDA_SPARSE_FLOAT16: f(__half{}); return true;
    case DIFFCORE_CUDA_SPARSE_BFLOAT16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

}  // namespace
}  // namespace diffcore::cuda

extern "C" int diffcore_cuda_sparse_layer(
    const int64_t* crow, const void* col, int col32, const float* val, const float* row_scale,
    const float* col_scale, int64_t rows, int64_t cols, const void* y, int y_dtype,
    int64_t y_stride, int scale_in, float* next, int64_t d, const void* x0, int x0_dtype,
    int64_t x0_stride, float w0, float wk, const float* sum, int64_t sum_stride, void* out,
    int out_dtype, int64_t out_stride, int* bad, void* stream) {
  using namespace diffcore::cuda;
  if (rows < 0 || cols < 0 || d < 0 || crow == nullptr || (scale_in && col_scale == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0 || d == 0) return static_cast<int>(cudaSuccess);
  const LayerArgs a{crow, col, col32 != 0, val, row_scale, col_scale, rows, cols, y, y_stride,
                    scale_in != 0, next, d, x0, x0_stride, w0, wk, sum, sum_stride, out,
                    out_stride, bad};
  int result = static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // x0 and out default to y's type when absent, so only meaningful combinations are instantiated.
  const int x0_type = x0 != nullptr ? x0_dtype : y_dtype;
  const int out_type = out != nullptr ? out_dtype : DIFFCORE_CUDA_SPARSE_FLOAT32;
  with_dtype(y_dtype, [&](auto ty) {
    with_dtype(x0_type, [&](auto tx0) {
      with_dtype(out_type, [&](auto tout) {
        result = launch<decltype(ty), decltype(tx0), decltype(tout)>(a, s);
      });
    });
  });
  return result;
}
