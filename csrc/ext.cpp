// Python bindings of uniter_fast's C++/CUDA kernels (module uniter_fast._C).
//
// Built by setup.py (CppExtension, or CUDAExtension with
// UNITER_FAST_WITH_CUDA defined when CUDA is available), or JIT-compiled by
// uniter_fast/_ext.py.
#include <torch/extension.h>

#ifdef UNITER_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ipot_cuda.h"
#endif

namespace uniter_fast {

void check_ipot_args(const torch::Tensor& C, const torch::Tensor& txt_pad,
                     const torch::Tensor& img_pad, double beta, int64_t iteration, int64_t k);
torch::Tensor ipot_cpu(torch::Tensor C, torch::Tensor txt_pad, torch::Tensor img_pad,
                       double beta, int64_t iteration, int64_t k);
std::tuple<torch::Tensor, torch::Tensor> ipot_distance_cpu(torch::Tensor C, torch::Tensor txt_pad,
                                                           torch::Tensor img_pad, double beta,
                                                           int64_t iteration, int64_t k,
                                                           bool with_plan);
torch::Tensor exp_f32_cpu(torch::Tensor x);
std::vector<torch::Tensor> wra_forward_cpu(torch::Tensor txt_emb, torch::Tensor img_emb,
                                           torch::Tensor txt_pad, torch::Tensor img_pad,
                                           double beta, int64_t iteration, int64_t k, double eps,
                                           bool with_grad);
std::vector<torch::Tensor> wra_backward_cpu(torch::Tensor grad, torch::Tensor txt_emb,
                                            torch::Tensor img_emb, torch::Tensor txt_pad,
                                            torch::Tensor img_pad, torch::Tensor P,
                                            torch::Tensor px, torch::Tensor py, bool need_dx,
                                            bool need_dy);
std::vector<std::string> cpu_isas();
std::string cpu_isa();
void set_cpu_isa(const std::string& name);

#ifdef UNITER_FAST_WITH_CUDA
// Plan (unless with_plan is false) and trace(C T) on CUDA in one launch.
std::tuple<torch::Tensor, torch::Tensor> ipot_cuda_impl(torch::Tensor C, torch::Tensor txt_pad,
                                                        torch::Tensor img_pad, double beta,
                                                        int64_t iteration, int64_t k,
                                                        bool with_distance, bool with_plan) {
  check_ipot_args(C, txt_pad, img_pad, beta, iteration, k);
  TORCH_CHECK_VALUE(C.is_cuda(), "ipot_cuda needs CUDA tensors; got ", C.device());
  TORCH_CHECK_VALUE(C.size(1) < (1 << 30) && C.size(2) < (1 << 30) && C.size(0) < (1LL << 31),
                    "cost C too large for ipot_cuda: ", C.sizes());
  int dtype;
  switch (C.scalar_type()) {
    case at::kFloat: dtype = kIpotF32; break;
    case at::kHalf: dtype = kIpotF16; break;
    case at::kBFloat16: dtype = kIpotBF16; break;
    case at::kDouble: dtype = kIpotF64; break;
    default: TORCH_CHECK_VALUE(false, "cost C dtype ", C.scalar_type(), " is not supported");
  }
  const c10::cuda::CUDAGuard guard(C.device());
  const int64_t B = C.size(0), M = C.size(1), N = C.size(2);
  const auto f32 = C.options().dtype(torch::kFloat32);
  auto out = with_plan ? torch::zeros({B, N, M}, f32) : torch::Tensor();
  auto dist = with_distance ? torch::zeros({B}, f32) : torch::Tensor();
  if (B == 0 || M == 0 || N == 0) return {out, dist};
  const int device = C.get_device();
  torch::Tensor ws;
  if (!ipot_cuda_fits_smem(M, N, device))
    ws = torch::empty({B, 2 * M * N}, f32);
  const int err = ipot_cuda_launch(
      C.data_ptr(), dtype, B, M, N, C.stride(0), C.stride(1), C.stride(2),
      txt_pad.data_ptr<bool>(), txt_pad.stride(0), txt_pad.stride(1),
      img_pad.data_ptr<bool>(), img_pad.stride(0), img_pad.stride(1),
      static_cast<float>(beta), iteration, k, with_plan ? out.data_ptr<float>() : nullptr,
      with_distance ? dist.data_ptr<float>() : nullptr,
      ws.defined() ? ws.data_ptr<float>() : nullptr, device,
      static_cast<void*>(c10::cuda::getCurrentCUDAStream(device).stream()));
  TORCH_CHECK(err == 0, "ipot_cuda launch failed: ", ipot_cuda_error_string(err));
  return {out, dist};
}

torch::Tensor ipot_cuda(torch::Tensor C, torch::Tensor txt_pad, torch::Tensor img_pad,
                        double beta, int64_t iteration, int64_t k) {
  return std::get<0>(ipot_cuda_impl(C, txt_pad, img_pad, beta, iteration, k, false, true));
}

std::tuple<torch::Tensor, torch::Tensor> ipot_distance_cuda(torch::Tensor C, torch::Tensor txt_pad,
                                                            torch::Tensor img_pad, double beta,
                                                            int64_t iteration, int64_t k,
                                                            bool with_plan) {
  return ipot_cuda_impl(C, txt_pad, img_pad, beta, iteration, k, true, with_plan);
}
#endif

}  // namespace uniter_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "uniter_fast C++/CUDA kernels";
  m.def("ipot_cpu", &uniter_fast::ipot_cpu,
        "Batched IPOT plan on CPU: (C [B,M,N], txt_pad [B,M] bool, img_pad [B,N] bool, beta, "
        "iteration, k) -> T [B,N,M] float32",
        py::arg("C"), py::arg("txt_pad"), py::arg("img_pad"), py::arg("beta"),
        py::arg("iteration"), py::arg("k"));
  m.def("ipot_distance_cpu", &uniter_fast::ipot_distance_cpu,
        "Batched IPOT plan and WRA distance on CPU: same arguments as ipot_cpu -> "
        "(T [B,N,M] float32, or None with with_plan=False; trace(C T) [B] float32 over the "
        "real block)",
        py::arg("C"), py::arg("txt_pad"), py::arg("img_pad"), py::arg("beta"),
        py::arg("iteration"), py::arg("k"), py::arg("with_plan") = true);
  m.def("wra_forward_cpu", &uniter_fast::wra_forward_cpu,
        "WRA distance from the embeddings on CPU: (txt_emb [B,M,D], img_emb [B,N,D] float32, "
        "txt_pad, img_pad bool, beta, iteration, k, eps, with_grad) -> [dist [B], and with_grad: "
        "P [B,M,N], px [B,M], py [B,N] for wra_backward_cpu]",
        py::arg("txt_emb"), py::arg("img_emb"), py::arg("txt_pad"), py::arg("img_pad"),
        py::arg("beta"), py::arg("iteration"), py::arg("k"), py::arg("eps"),
        py::arg("with_grad"));
  m.def("wra_backward_cpu", &uniter_fast::wra_backward_cpu,
        "Gradient of wra_forward_cpu's distances: (grad [B], txt_emb, img_emb, txt_pad, "
        "img_pad, P, px, py, need_dx, need_dy) -> [d txt_emb, d img_emb]",
        py::arg("grad"), py::arg("txt_emb"), py::arg("img_emb"), py::arg("txt_pad"),
        py::arg("img_pad"), py::arg("P"), py::arg("px"), py::arg("py"), py::arg("need_dx"),
        py::arg("need_dy"));
  m.def("exp_f32_cpu", &uniter_fast::exp_f32_cpu,
        "The IPOT kernel's vectorised float32 exp (exposed for its accuracy test)", py::arg("x"));
  m.def("cpu_isas", &uniter_fast::cpu_isas,
        "Instruction sets of the CPU IPOT kernel this CPU runs, best first");
  m.def("cpu_isa", &uniter_fast::cpu_isa, "The instruction set the CPU IPOT kernel uses now");
  m.def("set_cpu_isa", &uniter_fast::set_cpu_isa,
        "Force the CPU IPOT kernel's instruction set ('avx512', 'avx2', 'base'; 'auto' = best)",
        py::arg("name"));
#ifdef UNITER_FAST_WITH_CUDA
  m.def("ipot_cuda", &uniter_fast::ipot_cuda, "Batched IPOT plan on CUDA (same contract)",
        py::arg("C"), py::arg("txt_pad"), py::arg("img_pad"), py::arg("beta"),
        py::arg("iteration"), py::arg("k"));
  m.def("ipot_distance_cuda", &uniter_fast::ipot_distance_cuda,
        "Batched IPOT plan and WRA distance on CUDA in one launch (same contract as "
        "ipot_distance_cpu)",
        py::arg("C"), py::arg("txt_pad"), py::arg("img_pad"), py::arg("beta"),
        py::arg("iteration"), py::arg("k"), py::arg("with_plan") = true);
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
