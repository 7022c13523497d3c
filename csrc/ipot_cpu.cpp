// Batched IPOT on the CPU: one OpenMP task per example, all iterations on a
// contiguous float32 copy of the example's real m x n block.  Also the WRA
// distance straight from the embeddings (wra_forward_cpu / wra_backward_cpu,
// csrc/wra_cpu_kernel.h): cosine cost of the real block, IPOT and trace in one
// task per example, and the hand-written gradient.
//
// Contract (same as uniter_fast.reference.ipot):
//   C [B, M, N] (float32 / float16 / bfloat16 / float64; read as float32),
//   txt_pad [B, M], img_pad [B, N] bool (true = padded, any pattern),
//   returns the plan T [B, N, M] float32, zero on padded rows/columns and for
//   examples whose text or image side is empty; ipot_distance_cpu also
//   returns trace(C T) = sum over the real block of C * T per example.
//
// Per example, with rows i = real text tokens (m of them) and columns
// j = real regions (n of them), A = exp(-C / beta), T0 = 1, sigma0 = 1/m:
//   repeat `iteration` times:
//     Q = A * T
//     repeat k times: delta = 1 / (n * Q^T sigma);  sigma = 1 / (m * Q delta)
//     T = delta * Q * sigma
//
// Layout and speed: A and Q are m x L row-major with L = n rounded up to whole
// vectors (zeros in the padding columns, delta = 0 there).  The kernel
// (csrc/ipot_cpu_kernel.h) is compiled three times, each with vectors as wide
// as that instruction set's registers: AVX-512 (16 floats), AVX2 (8) and the
// build's baseline (4: SSE2, NEON); the best one this CPU runs is picked at
// run time (set_cpu_isa overrides, for tests and benchmarks).  One pass over
// the rows per iteration: a row's dot product with delta gives its sigma
// (tree reduction, no scalar tail), then Q = A * T for that row and its share
// of the next Q^T sigma.  Short rows (up to 8 vectors with AVX-512's 32
// registers, 4 otherwise) are read once, kept in registers, several at a
// time (the code is instantiated per vector count); longer rows go four at a
// time through a generic loop that reads them twice.
// A = exp(-C / beta) is computed here, only on the real block, with a
// vectorised exp (csrc/simd.h: Cody-Waite reduction, degree-7 polynomial,
// relative error <= 1e-7, tested),
// and trace(C T) from the same compact block.
// The plan's negligible entries decay towards float32's subnormal range,
// where x86 arithmetic is many times slower: the kernel runs with
// flush-to-zero / denormals-are-zero (restored afterwards); this changes
// entries below 1.2e-38 only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <atomic>
#include <string>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define UF_HAVE_MXCSR 1
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(UNITER_FAST_NO_ISA)
#define UF_X86_ISAS 1
#endif

namespace uniter_fast {
namespace {

// Flush-to-zero / denormals-are-zero for the current thread, restored on scope exit.
struct FlushDenormals {
#ifdef UF_HAVE_MXCSR
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct Workspace {
  std::vector<float> Cc, A, Q, delta, sigma, tmp, rx, ry, kx, ky;
  std::vector<int64_t> rows, cols;
};

// --- one copy of the kernel per instruction set, lanes matched to its registers
#ifdef UF_X86_ISAS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#endif
namespace isa_avx512 {
#define UF_LANES 16
#include "ipot_cpu_kernel.h"
#include "wra_cpu_kernel.h"
#undef UF_LANES
}  // namespace isa_avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace isa_avx2 {
#define UF_LANES 8
#include "ipot_cpu_kernel.h"
#include "wra_cpu_kernel.h"
#undef UF_LANES
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // UF_X86_ISAS
namespace isa_base {  // the build's own target: SSE2 on x86-64, NEON on arm64
#define UF_LANES 4
#include "ipot_cpu_kernel.h"
#include "wra_cpu_kernel.h"
#undef UF_LANES
}  // namespace isa_base

using ExampleFn = void (*)(const float*, int64_t, int64_t, float, const bool*, int64_t,
                           const bool*, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                           float*, Workspace&);
using ExpFn = void (*)(const float*, float*, int64_t);
using WraForwardFn = void (*)(const float*, int64_t, const float*, int64_t, const bool*, int64_t,
                              const bool*, int64_t, int64_t, int64_t, int64_t, float, float,
                              int64_t, int64_t, float*, float*, float*, float*, Workspace&);
using WraBackwardFn = void (*)(float, const float*, int64_t, const float*, int64_t, const bool*,
                               int64_t, const bool*, int64_t, int64_t, int64_t, int64_t,
                               const float*, const float*, const float*, float*, float*,
                               Workspace&);
struct Isa {
  const char* name;
  ExampleFn example;
  ExpFn exp;
  WraForwardFn wra_forward;
  WraBackwardFn wra_backward;
};

// Best first; available() says whether this CPU (and OS) runs it.
const Isa kIsas[] = {
#ifdef UF_X86_ISAS
    {"avx512", isa_avx512::ipot_example, isa_avx512::vexp_array,
     isa_avx512::wra_forward_example, isa_avx512::wra_backward_example},
    {"avx2", isa_avx2::ipot_example, isa_avx2::vexp_array, isa_avx2::wra_forward_example,
     isa_avx2::wra_backward_example},
#endif
    {"base", isa_base::ipot_example, isa_base::vexp_array, isa_base::wra_forward_example,
     isa_base::wra_backward_example},
};

bool available(const Isa& isa) {
  const std::string name = isa.name;
#ifdef UF_X86_ISAS
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return true;
}

std::atomic<const Isa*> g_forced{nullptr};  // set_cpu_isa(); nullptr = the best available

const Isa& current_isa() {
  if (const Isa* f = g_forced.load()) return *f;
  static const Isa* best = [] {
    for (const Isa& isa : kIsas)
      if (available(isa)) return &isa;
    return &kIsas[sizeof(kIsas) / sizeof(kIsas[0]) - 1];
  }();
  return *best;
}

void ipot_batch(const float* Cp, int64_t B, int64_t M, int64_t N, int64_t sCb, int64_t sCm,
                int64_t sCn, float beta, const bool* tp, int64_t stb, int64_t stm,
                const bool* ip, int64_t sib, int64_t sin, int64_t iteration, int64_t k,
                float* out, float* dist) {
  const ExampleFn example = current_isa().example;
#ifdef _OPENMP
  const int nthreads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B)));
#pragma omp parallel num_threads(nthreads)
#endif
  {
    FlushDenormals ftz;
    Workspace ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < B; ++b) {
      example(Cp + b * sCb, sCm, sCn, beta, tp + b * stb, stm, ip + b * sib, sin, M, N,
                   iteration, k, out ? out + b * N * M : nullptr, dist ? dist + b : nullptr, ws);
    }
  }
}

std::tuple<torch::Tensor, torch::Tensor> ipot_cpu_impl(const torch::Tensor& C,
                                                       const torch::Tensor& txt_pad,
                                                       const torch::Tensor& img_pad, double beta,
                                                       int64_t iteration, int64_t k,
                                                       bool with_distance, bool with_plan);

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

namespace {
std::tuple<torch::Tensor, torch::Tensor> ipot_cpu_impl(const torch::Tensor& C,
                                                       const torch::Tensor& txt_pad,
                                                       const torch::Tensor& img_pad, double beta,
                                                       int64_t iteration, int64_t k,
                                                       bool with_distance, bool with_plan) {
  check_ipot_args(C, txt_pad, img_pad, beta, iteration, k);
  TORCH_CHECK_VALUE(C.device().is_cpu(), "ipot_cpu needs CPU tensors; got ", C.device());
  const int64_t B = C.size(0), M = C.size(1), N = C.size(2);
  const auto f32 = C.options().dtype(torch::kFloat32);
  if (B == 0 || M == 0 || N == 0)
    return {with_plan ? torch::zeros({B, N, M}, f32) : torch::Tensor(),
            with_distance ? torch::zeros({B}, f32) : torch::Tensor()};
  auto out = with_plan ? torch::empty({B, N, M}, f32) : torch::Tensor();
  auto dist = with_distance ? torch::empty({B}, f32) : torch::Tensor();
  const auto Cf = C.to(torch::kFloat32);  // (no copy when C is float32: any strides)
  ipot_batch(Cf.data_ptr<float>(), B, M, N, Cf.stride(0), Cf.stride(1), Cf.stride(2),
             static_cast<float>(beta), txt_pad.data_ptr<bool>(), txt_pad.stride(0),
             txt_pad.stride(1), img_pad.data_ptr<bool>(), img_pad.stride(0), img_pad.stride(1),
             iteration, k, with_plan ? out.data_ptr<float>() : nullptr,
             with_distance ? dist.data_ptr<float>() : nullptr);
  return {out, dist};
}
}  // namespace

torch::Tensor ipot_cpu(torch::Tensor C, torch::Tensor txt_pad, torch::Tensor img_pad,
                       double beta, int64_t iteration, int64_t k) {
  return std::get<0>(ipot_cpu_impl(C, txt_pad, img_pad, beta, iteration, k, false, true));
}

std::tuple<torch::Tensor, torch::Tensor> ipot_distance_cpu(torch::Tensor C, torch::Tensor txt_pad,
                                                           torch::Tensor img_pad, double beta,
                                                           int64_t iteration, int64_t k,
                                                           bool with_plan) {
  return ipot_cpu_impl(C, txt_pad, img_pad, beta, iteration, k, true, with_plan);
}

// ---------------------------------------------------------------- WRA from the embeddings
namespace {
int wra_threads(int64_t B) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B)));
}

void check_wra_args(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& txt_pad,
                    const torch::Tensor& img_pad) {
  TORCH_CHECK_VALUE(x.dim() == 3 && y.dim() == 3, "txt_emb and img_emb must be [B, L, D]; got ",
                    x.sizes(), " and ", y.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat32 && y.scalar_type() == torch::kFloat32,
                    "wra_*_cpu needs float32 embeddings; got ", x.scalar_type(), " and ",
                    y.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && y.device().is_cpu(), "wra_*_cpu needs CPU tensors");
  TORCH_CHECK_VALUE(x.size(0) == y.size(0) && x.size(2) == y.size(2),
                    "txt_emb ", x.sizes(), " and img_emb ", y.sizes(), " differ in B or D");
  TORCH_CHECK_VALUE(txt_pad.scalar_type() == torch::kBool && img_pad.scalar_type() == torch::kBool,
                    "txt_pad/img_pad must be bool padding masks (true = padded)");
  TORCH_CHECK_VALUE(txt_pad.dim() == 2 && txt_pad.size(0) == x.size(0) &&
                        txt_pad.size(1) == x.size(1),
                    "txt_pad shape ", txt_pad.sizes(), " != [B, M] of txt_emb ", x.sizes());
  TORCH_CHECK_VALUE(img_pad.dim() == 2 && img_pad.size(0) == y.size(0) &&
                        img_pad.size(1) == y.size(1),
                    "img_pad shape ", img_pad.sizes(), " != [B, N] of img_emb ", y.sizes());
}

// Ask for transparent huge pages for a fresh output buffer before it is first
// written (Linux, THP "madvise" or "always"): the gradients are ~100 MB at
// UNITER's shapes, and 4 KiB page faults on first touch cost as much as the
// kernel's arithmetic.  Harmless where the memory is already mapped.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// rows contiguous along D (any batch / row strides)
torch::Tensor rows_contiguous(const torch::Tensor& t) {
  return t.stride(2) == 1 ? t : t.contiguous();
}
}  // namespace

std::vector<torch::Tensor> wra_forward_cpu(torch::Tensor txt_emb, torch::Tensor img_emb,
                                           torch::Tensor txt_pad, torch::Tensor img_pad,
                                           double beta, int64_t iteration, int64_t k, double eps,
                                           bool with_grad) {
  check_wra_args(txt_emb, img_emb, txt_pad, img_pad);
  TORCH_CHECK_VALUE(beta > 0 && std::isfinite(beta), "beta must be > 0, got ", beta);
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  TORCH_CHECK_VALUE(iteration >= 1 && k >= 1, "iteration and k must be >= 1, got iteration=",
                    iteration, ", k=", k);
  const auto x = rows_contiguous(txt_emb), y = rows_contiguous(img_emb);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  const auto f32 = x.options();
  auto dist = torch::zeros({B}, f32);
  torch::Tensor P, px, py;
  if (with_grad) {
    P = torch::zeros({B, M, N}, f32);
    px = torch::zeros({B, M}, f32);
    py = torch::zeros({B, N}, f32);
  }
  if (B == 0 || M == 0 || N == 0) return {dist, P, px, py};
  const WraForwardFn fn = current_isa().wra_forward;
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const bool* tp = txt_pad.data_ptr<bool>();
  const bool* ip = img_pad.data_ptr<bool>();
  float* dp = dist.data_ptr<float>();
  float* Pp = with_grad ? P.data_ptr<float>() : nullptr;
  float* pxp = with_grad ? px.data_ptr<float>() : nullptr;
  float* pyp = with_grad ? py.data_ptr<float>() : nullptr;
  const int64_t sxb = x.stride(0), sxm = x.stride(1), syb = y.stride(0), syn = y.stride(1);
  const int64_t stb = txt_pad.stride(0), stm = txt_pad.stride(1);
  const int64_t sib = img_pad.stride(0), sin = img_pad.stride(1);
#ifdef _OPENMP
#pragma omp parallel num_threads(wra_threads(B))
#endif
  {
    FlushDenormals ftz;
    Workspace ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < B; ++b) {
      fn(xp + b * sxb, sxm, yp + b * syb, syn, tp + b * stb, stm, ip + b * sib, sin, M, N, D,
         static_cast<float>(eps), static_cast<float>(beta), iteration, k, dp + b,
         Pp ? Pp + b * M * N : nullptr, pxp ? pxp + b * M : nullptr,
         pyp ? pyp + b * N : nullptr, ws);
    }
  }
  return {dist, P, px, py};
}

std::vector<torch::Tensor> wra_backward_cpu(torch::Tensor grad, torch::Tensor txt_emb,
                                            torch::Tensor img_emb, torch::Tensor txt_pad,
                                            torch::Tensor img_pad, torch::Tensor P,
                                            torch::Tensor px, torch::Tensor py, bool need_dx,
                                            bool need_dy) {
  check_wra_args(txt_emb, img_emb, txt_pad, img_pad);
  const auto x = rows_contiguous(txt_emb), y = rows_contiguous(img_emb);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == B, "grad must be [B]; got ", grad.sizes());
  const auto g = grad.to(torch::kFloat32).contiguous();
  const auto Pc = P.contiguous(), pxc = px.contiguous(), pyc = py.contiguous();
  TORCH_CHECK_VALUE(Pc.scalar_type() == torch::kFloat32 && Pc.sizes() == torch::IntArrayRef({B, M, N}),
                    "P must be float32 [B, M, N]; got ", Pc.sizes());
  torch::Tensor dx, dy;
  if (need_dx) {
    dx = torch::empty({B, M, D}, x.options());
    advise_huge_pages(dx.data_ptr(), static_cast<size_t>(dx.numel()) * sizeof(float));
  }
  if (need_dy) {
    dy = torch::empty({B, N, D}, y.options());
    advise_huge_pages(dy.data_ptr(), static_cast<size_t>(dy.numel()) * sizeof(float));
  }
  if (B == 0) return {dx, dy};
  const WraBackwardFn fn = current_isa().wra_backward;
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const bool* tp = txt_pad.data_ptr<bool>();
  const bool* ip = img_pad.data_ptr<bool>();
  const float* Pp = Pc.data_ptr<float>();
  const float* pxp = pxc.data_ptr<float>();
  const float* pyp = pyc.data_ptr<float>();
  float* dxp = need_dx ? dx.data_ptr<float>() : nullptr;
  float* dyp = need_dy ? dy.data_ptr<float>() : nullptr;
  const int64_t sxb = x.stride(0), sxm = x.stride(1), syb = y.stride(0), syn = y.stride(1);
  const int64_t stb = txt_pad.stride(0), stm = txt_pad.stride(1);
  const int64_t sib = img_pad.stride(0), sin = img_pad.stride(1);
#ifdef _OPENMP
#pragma omp parallel num_threads(wra_threads(B))
#endif
  {
    FlushDenormals ftz;
    Workspace ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < B; ++b) {
      fn(gp[b], xp + b * sxb, sxm, yp + b * syb, syn, tp + b * stb, stm, ip + b * sib, sin, M, N,
         D, Pp + b * M * N, pxp + b * M, pyp + b * N, dxp ? dxp + b * M * D : nullptr,
         dyp ? dyp + b * N * D : nullptr, ws);
    }
  }
  return {dx, dy};
}

torch::Tensor exp_f32_cpu(torch::Tensor x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == torch::kFloat32,
                    "exp_f32_cpu needs a float32 CPU tensor; got ", x.scalar_type(), " on ",
                    x.device());
  const auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  current_isa().exp(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const Isa& isa : kIsas)
    if (available(isa)) out.push_back(isa.name);
  return out;
}

std::string cpu_isa() { return current_isa().name; }

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    g_forced.store(nullptr);
    return;
  }
  std::string names = "auto";
  for (const Isa& isa : kIsas) names += std::string(", ") + isa.name;
  for (const Isa& isa : kIsas) {
    if (name != isa.name) continue;
    TORCH_CHECK_VALUE(available(isa), "this CPU cannot run the '", name,
                      "' IPOT kernel; it runs: ", c10::Join(", ", cpu_isas()));
    g_forced.store(&isa);
    return;
  }
  TORCH_CHECK_VALUE(false, "unknown CPU instruction set '", name, "' (built: ", names, ")");
}

}  // namespace uniter_fast
