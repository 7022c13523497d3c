// Batched IPOT on CUDA: one thread block per example, all iterations in one
// launch.  Same contract and arithmetic as csrc/ipot_cpu.cpp (see there for
// the algorithm); the real rows/columns of each example are compacted first,
// so any padding pattern works and padded entries cost nothing.
//
// Per iteration two phases separated by __syncthreads():
//   rows:    warp w takes rows i = w, w + nwarps, ...: sigma_i = 1/(m * Q_i . delta),
//            then Q_i <- A_i * (delta * Q_i * sigma_i)   (or T written out, last time)
//   columns: thread j: delta_j = 1/(n * sum_i Q_ij sigma_i)
// A and Q live in shared memory when they fit (opt-in size), else in a global
// workspace that stays L2-resident.  In the last iteration each lane also
// accumulates C_ij * T_ij (C re-read from global memory) for trace(C T): the
// WRA distance comes from the same launch, and the plan need not be written.
#include "ipot_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace uniter_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Warp `warp` writes the indices i < L with pad[i] == false to idx, in order;
// returns their count (valid in every lane of that warp).
__device__ int compact(const bool* pad, int64_t stride, int L, int* idx) {
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int start = 0; start < L; start += 32) {
    const int i = start + lane;
    const bool real = i < L && !pad[i * stride];
    const unsigned ballot = __ballot_sync(0xffffffffu, real);
    if (real) idx[base + __popc(ballot & ((1u << lane) - 1u))] = i;
    base += __popc(ballot);
  }
  return base;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
ipot_kernel(const scalar_t* __restrict__ C, int M, int N, int64_t sCb, int64_t sCm, int64_t sCn,
            const bool* __restrict__ txt_pad, int64_t stb, int64_t stm,
            const bool* __restrict__ img_pad, int64_t sib, int64_t sin,
            float beta, int iteration, int k, float* __restrict__ out,
            float* __restrict__ dist, float* __restrict__ workspace, bool use_smem) {
  extern __shared__ float smem[];
  __shared__ int s_m, s_n;
  __shared__ float s_dist[kWarps];
  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  int* rows = reinterpret_cast<int*>(smem);
  int* cols = rows + M;
  float* delta = reinterpret_cast<float*>(cols + N);
  float* sigma = delta + N;
  float* A = use_smem ? sigma + M : workspace + static_cast<int64_t>(b) * 2 * M * N;

  if (warp == 0) {
    const int m = compact(txt_pad + b * stb, stm, M, rows);
    if (lane == 0) s_m = m;
  } else if (warp == 1) {
    const int n = compact(img_pad + b * sib, sin, N, cols);
    if (lane == 0) s_n = n;
  }
  __syncthreads();
  const int m = s_m, n = s_n;
  if (m == 0 || n == 0) return;  // uniform across the block; out is zero
  float* Q = A + m * n;
  const float ml = static_cast<float>(m);
  const float nl = static_cast<float>(n);
  const scalar_t* Cb = C + b * sCb;
  float* outb = out == nullptr ? nullptr : out + static_cast<int64_t>(b) * N * M;

  for (int idx = tid; idx < m * n; idx += kThreads) {
    const int i = idx / n, j = idx - (idx / n) * n;
    const float c = to_f32(Cb[rows[i] * sCm + cols[j] * sCn]);
    const float a = expf(-c / beta);
    A[idx] = a;
    Q[idx] = a;
  }
  for (int i = tid; i < m; i += kThreads) sigma[i] = 1.0f / ml;
  __syncthreads();

  auto column_phase = [&]() {
    for (int j = tid; j < n; j += kThreads) {
      float s = 0.0f;
      for (int i = 0; i < m; ++i) s += Q[i * n + j] * sigma[i];
      delta[j] = 1.0f / (nl * s);
    }
    __syncthreads();
  };

  column_phase();
  for (int it = 0; it < iteration; ++it) {
    for (int kk = 0; kk + 1 < k; ++kk) {
      for (int i = warp; i < m; i += kWarps) {
        float s = 0.0f;
        for (int j = lane; j < n; j += 32) s += delta[j] * Q[i * n + j];
        s = warp_sum(s);
        if (lane == 0) sigma[i] = 1.0f / (ml * s);
      }
      __syncthreads();
      column_phase();
    }
    const bool last = it + 1 == iteration;
    float dacc = 0.0f;  // this lane's share of trace(C T), last iteration only
    for (int i = warp; i < m; i += kWarps) {
      float s = 0.0f;
      for (int j = lane; j < n; j += 32) s += delta[j] * Q[i * n + j];
      const float sig = 1.0f / (ml * warp_sum(s));
      if (lane == 0) sigma[i] = sig;
      if (last) {
        const int r = rows[i];
        for (int j = lane; j < n; j += 32) {
          const float t = (delta[j] * Q[i * n + j]) * sig;
          if (out != nullptr) outb[static_cast<int64_t>(cols[j]) * M + r] = t;
          if (dist != nullptr) dacc += to_f32(Cb[r * sCm + cols[j] * sCn]) * t;
        }
      } else {
        for (int j = lane; j < n; j += 32)
          Q[i * n + j] = A[i * n + j] * ((delta[j] * Q[i * n + j]) * sig);
      }
    }
    __syncthreads();
    if (!last) {
      column_phase();
    } else if (dist != nullptr) {
      dacc = warp_sum(dacc);
      if (lane == 0) s_dist[warp] = dacc;
      __syncthreads();
      if (tid == 0) {
        float total = 0.0f;
        for (int w = 0; w < kWarps; ++w) total += s_dist[w];
        dist[b] = total;
      }
    }
  }
}

size_t small_smem_bytes(int64_t M, int64_t N) { return static_cast<size_t>(2 * (M + N)) * 4; }
size_t full_smem_bytes(int64_t M, int64_t N) {
  return small_smem_bytes(M, N) + static_cast<size_t>(2 * M * N) * 4;
}

int max_smem_optin(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 48 * 1024;
  return v;
}

template <typename scalar_t>
int launch_typed(const void* C, int64_t B, int64_t M, int64_t N, int64_t sCb, int64_t sCm,
                 int64_t sCn, const bool* tp, int64_t stb, int64_t stm, const bool* ip,
                 int64_t sib, int64_t sin, float beta, int64_t iteration, int64_t k, float* out,
                 float* dist, float* workspace, int device, void* stream) {
  const bool use_smem = ipot_cuda_fits_smem(M, N, device);
  if (!use_smem && workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const size_t bytes = use_smem ? full_smem_bytes(M, N) : small_smem_bytes(M, N);
  auto kernel = ipot_kernel<scalar_t>;
  if (bytes > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  kernel<<<static_cast<unsigned>(B), kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const scalar_t*>(C), static_cast<int>(M), static_cast<int>(N), sCb, sCm, sCn,
      tp, stb, stm, ip, sib, sin, beta, static_cast<int>(iteration), static_cast<int>(k), out,
      dist, workspace, use_smem);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

bool ipot_cuda_fits_smem(int64_t M, int64_t N, int device) {
  return full_smem_bytes(M, N) <= static_cast<size_t>(max_smem_optin(device));
}

int ipot_cuda_launch(const void* C, int dtype, int64_t B, int64_t M, int64_t N, int64_t sCb,
                     int64_t sCm, int64_t sCn, const bool* txt_pad, int64_t stb, int64_t stm,
                     const bool* img_pad, int64_t sib, int64_t sin, float beta,
                     int64_t iteration, int64_t k, float* out, float* dist, float* workspace,
                     int device, void* stream) {
  if (B == 0 || M == 0 || N == 0) return 0;
  if (small_smem_bytes(M, N) > static_cast<size_t>(max_smem_optin(device)))
    return static_cast<int>(cudaErrorInvalidValue);  // M + N beyond ~28k: not a WRA problem
  switch (dtype) {
    case kIpotF32:
      return launch_typed<float>(C, B, M, N, sCb, sCm, sCn, txt_pad, stb, stm, img_pad, sib, sin,
                                 beta, iteration, k, out, dist, workspace, device, stream);
    case kIpotF16:
      return launch_typed<__half>(C, B, M, N, sCb, sCm, sCn, txt_pad, stb, stm, img_pad, sib,
                                  sin, beta, iteration, k, out, dist, workspace, device, stream);
    case kIpotBF16:
      return launch_typed<__nv_bfloat16>(C, B, M, N, sCb, sCm, sCn, txt_pad, stb, stm, img_pad,
                                         sib, sin, beta, iteration, k, out, dist, workspace,
                                         device, stream);
    case kIpotF64:
      return launch_typed<double>(C, B, M, N, sCb, sCm, sCn, txt_pad, stb, stm, img_pad, sib, sin,
                                  beta, iteration, k, out, dist, workspace, device, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

const char* ipot_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // namespace uniter_fast
