// Batched IPOT on the CPU: one OpenMP task per example, all iterations on a
// contiguous float32 copy of the example's real m x n block.
//
// Contract (same as uniter_fast.reference.ipot):
//   C [B, M, N] (float32 / float16 / bfloat16 / float64; upcast to float32,
//   A = exp(-C / beta) computed once by ATen for the whole batch),
//   txt_pad [B, M], img_pad [B, N] bool (true = padded, any pattern),
//   returns the plan T [B, N, M] float32, zero on padded rows/columns and for
//   examples whose text or image side is empty.
//
// Per example, with rows i = real text tokens (m of them) and columns
// j = real regions (n of them), A = exp(-C / beta), T0 = 1, sigma0 = 1/m:
//   repeat `iteration` times:
//     Q = A * T
//     repeat k times: delta = 1 / (n * Q^T sigma);  sigma = 1 / (m * Q delta)
//     T = delta * Q * sigma
// One fused pass over the rows per iteration: row i gives sigma_i (a dot
// product with delta), the new row of Q = A * T, and its contribution to the
// next Q^T sigma (an axpy), so Q is read from cache once per iteration.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(UNITER_FAST_NO_CLONES)
// Runtime dispatch to the widest vector unit the CPU has; the binary itself
// stays portable (plain x86-64 baseline).
#define UF_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define UF_HOT
#endif

namespace uniter_fast {
namespace {

struct Workspace {
  std::vector<float> A, Q, delta, sigma, tmp;
  std::vector<int64_t> rows, cols;
};

// The iterations on one example's compact block.  A and Q are m x n row-major
// (Q starts equal to A); on return Q holds the plan T = delta * Q * sigma.
UF_HOT static void ipot_block(const float* __restrict A, float* __restrict Q,
                              float* __restrict delta, float* __restrict sigma,
                              float* __restrict tmp, int64_t m, int64_t n,
                              int64_t iteration, int64_t k) {
  const float ml = static_cast<float>(m);
  const float nl = static_cast<float>(n);
  // Q = A * 1; sigma = 1/m; first delta from Q^T sigma.
  for (int64_t i = 0; i < m; ++i) sigma[i] = 1.0f / ml;
  for (int64_t j = 0; j < n; ++j) tmp[j] = 0.0f;
  for (int64_t i = 0; i < m; ++i) {
    const float* __restrict q = Q + i * n;
    const float s = sigma[i];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) tmp[j] += q[j] * s;
  }
  for (int64_t j = 0; j < n; ++j) delta[j] = 1.0f / (nl * tmp[j]);

  for (int64_t it = 0; it < iteration; ++it) {
    // extra inner (k > 1) sweeps with Q fixed
    for (int64_t kk = 0; kk + 1 < k; ++kk) {
      for (int64_t j = 0; j < n; ++j) tmp[j] = 0.0f;
      for (int64_t i = 0; i < m; ++i) {
        const float* __restrict q = Q + i * n;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += delta[j] * q[j];
        const float sig = 1.0f / (ml * s);
        sigma[i] = sig;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) tmp[j] += q[j] * sig;
      }
      for (int64_t j = 0; j < n; ++j) delta[j] = 1.0f / (nl * tmp[j]);
    }
    const bool last = it + 1 == iteration;
    for (int64_t j = 0; j < n; ++j) tmp[j] = 0.0f;
    int64_t i = 0;
    // four rows at a time: delta and tmp are loaded/stored once per four rows
    for (; i + 4 <= m; i += 4) {
      float* __restrict q0 = Q + i * n;
      float* __restrict q1 = q0 + n;
      float* __restrict q2 = q1 + n;
      float* __restrict q3 = q2 + n;
      const float* __restrict a0 = A + i * n;
      const float* __restrict a1 = a0 + n;
      const float* __restrict a2 = a1 + n;
      const float* __restrict a3 = a2 + n;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < n; ++j) {
        const float d = delta[j];
        s0 += d * q0[j];
        s1 += d * q1[j];
        s2 += d * q2[j];
        s3 += d * q3[j];
      }
      const float g0 = 1.0f / (ml * s0), g1 = 1.0f / (ml * s1);
      const float g2 = 1.0f / (ml * s2), g3 = 1.0f / (ml * s3);
      sigma[i] = g0;
      sigma[i + 1] = g1;
      sigma[i + 2] = g2;
      sigma[i + 3] = g3;
      if (last) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float d = delta[j];
          q0[j] = (d * q0[j]) * g0;
          q1[j] = (d * q1[j]) * g1;
          q2[j] = (d * q2[j]) * g2;
          q3[j] = (d * q3[j]) * g3;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float d = delta[j];
          const float n0 = a0[j] * ((d * q0[j]) * g0);
          const float n1 = a1[j] * ((d * q1[j]) * g1);
          const float n2 = a2[j] * ((d * q2[j]) * g2);
          const float n3 = a3[j] * ((d * q3[j]) * g3);
          q0[j] = n0;
          q1[j] = n1;
          q2[j] = n2;
          q3[j] = n3;
          tmp[j] += (n0 * g0 + n1 * g1) + (n2 * g2 + n3 * g3);
        }
      }
    }
    for (; i < m; ++i) {
      float* __restrict q = Q + i * n;
      const float* __restrict a = A + i * n;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < n; ++j) s += delta[j] * q[j];
      const float sig = 1.0f / (ml * s);
      sigma[i] = sig;
      if (last) {
        // Q now holds the final plan T (row i of the m x n block)
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) q[j] = (delta[j] * q[j]) * sig;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float qn = a[j] * ((delta[j] * q[j]) * sig);
          q[j] = qn;
          tmp[j] += qn * sig;
        }
      }
    }
    if (!last)
      for (int64_t j = 0; j < n; ++j) delta[j] = 1.0f / (nl * tmp[j]);
  }
}

// A_b: this example's exp(-C/beta) [M, N] (row stride sAm, contiguous rows);
// out_b: its [N, M] output slab, fully written here (zeros off the real block).
void ipot_example(const float* A_b, int64_t sAm, const bool* tpad, int64_t stp,
                  const bool* ipad, int64_t sip, int64_t M, int64_t N, int64_t iteration,
                  int64_t k, float* out, Workspace& ws) {
  ws.rows.clear();
  ws.cols.clear();
  for (int64_t i = 0; i < M; ++i)
    if (!tpad[i * stp]) ws.rows.push_back(i);
  for (int64_t j = 0; j < N; ++j)
    if (!ipad[j * sip]) ws.cols.push_back(j);
  const int64_t m = static_cast<int64_t>(ws.rows.size());
  const int64_t n = static_cast<int64_t>(ws.cols.size());
  if (m < M || n < N || m == 0) std::fill(out, out + N * M, 0.0f);
  if (m == 0 || n == 0) return;
  ws.A.resize(m * n);
  ws.Q.resize(m * n);
  ws.delta.resize(n);
  ws.tmp.resize(n);
  ws.sigma.resize(m);
  float* A = ws.A.data();
  float* Q = ws.Q.data();
  for (int64_t i = 0; i < m; ++i) {
    const float* arow = A_b + ws.rows[i] * sAm;
    if (n == N) {
      std::copy(arow, arow + N, A + i * n);
    } else {
      for (int64_t j = 0; j < n; ++j) A[i * n + j] = arow[ws.cols[j]];
    }
  }
  std::copy(A, A + m * n, Q);
  ipot_block(A, Q, ws.delta.data(), ws.sigma.data(), ws.tmp.data(), m, n, iteration, k);
  // out is [N, M]: out[col, row] = T[i, j]
  for (int64_t j = 0; j < n; ++j) {
    float* orow = out + ws.cols[j] * M;
    for (int64_t i = 0; i < m; ++i) orow[ws.rows[i]] = Q[i * n + j];
  }
}

void ipot_batch(const float* Ap, int64_t B, int64_t M, int64_t N, int64_t sAb, int64_t sAm,
                const bool* tp, int64_t stb, int64_t stm, const bool* ip, int64_t sib,
                int64_t sin, int64_t iteration, int64_t k, float* out) {
#ifdef _OPENMP
  const int nthreads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B)));
#pragma omp parallel num_threads(nthreads)
#endif
  {
    Workspace ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < B; ++b) {
      ipot_example(Ap + b * sAb, sAm, tp + b * stb, stm, ip + b * sib, sin, M, N, iteration, k,
                   out + b * N * M, ws);
    }
  }
}

}  // namespace

void check_ipot_args(const torch::Tensor& C, const torch::Tensor& txt_pad,
                     const torch::Tensor& img_pad, double beta, int64_t iteration, int64_t k) {
  TORCH_CHECK_VALUE(C.dim() == 3, "cost C must be [B, M, N]; got ", C.sizes());
  TORCH_CHECK_VALUE(C.is_floating_point(), "cost C must be a floating tensor; got ", C.scalar_type());
  TORCH_CHECK_VALUE(txt_pad.scalar_type() == torch::kBool,
                    "txt_pad must be a bool padding mask (true = padded); got ", txt_pad.scalar_type());
  TORCH_CHECK_VALUE(img_pad.scalar_type() == torch::kBool,
                    "img_pad must be a bool padding mask (true = padded); got ", img_pad.scalar_type());
  TORCH_CHECK_VALUE(txt_pad.dim() == 2 && txt_pad.size(0) == C.size(0) && txt_pad.size(1) == C.size(1),
                    "txt_pad shape ", txt_pad.sizes(), " != [B, M] [", C.size(0), ", ", C.size(1), "]");
  TORCH_CHECK_VALUE(img_pad.dim() == 2 && img_pad.size(0) == C.size(0) && img_pad.size(1) == C.size(2),
                    "img_pad shape ", img_pad.sizes(), " != [B, N] [", C.size(0), ", ", C.size(2), "]");
  TORCH_CHECK_VALUE(beta > 0 && std::isfinite(beta), "beta must be > 0, got ", beta);
  TORCH_CHECK_VALUE(iteration >= 1 && k >= 1, "iteration and k must be >= 1, got iteration=",
                    iteration, ", k=", k);
  TORCH_CHECK_VALUE(txt_pad.device() == C.device() && img_pad.device() == C.device(),
                    "txt_pad/img_pad must be on C's device ", C.device());
}

torch::Tensor ipot_cpu(torch::Tensor C, torch::Tensor txt_pad, torch::Tensor img_pad,
                       double beta, int64_t iteration, int64_t k) {
  check_ipot_args(C, txt_pad, img_pad, beta, iteration, k);
  TORCH_CHECK_VALUE(C.device().is_cpu(), "ipot_cpu needs CPU tensors; got ", C.device());
  const int64_t B = C.size(0), M = C.size(1), N = C.size(2);
  if (B == 0 || M == 0 || N == 0) return torch::zeros({B, N, M}, C.options().dtype(torch::kFloat32));
  auto out = torch::empty({B, N, M}, C.options().dtype(torch::kFloat32));
  // A = exp(-C / beta) with ATen's vectorized, threaded exp: the same float32
  // operations as the reference, so A is bit-identical to it.
  const auto A = torch::exp(-C.to(torch::kFloat32) / beta).contiguous();
  ipot_batch(A.data_ptr<float>(), B, M, N, A.stride(0), A.stride(1), txt_pad.data_ptr<bool>(),
             txt_pad.stride(0), txt_pad.stride(1), img_pad.data_ptr<bool>(), img_pad.stride(0),
             img_pad.stride(1), iteration, k, out.data_ptr<float>());
  return out;
}

}  // namespace uniter_fast
