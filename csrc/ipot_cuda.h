// Batched IPOT CUDA kernel: plain C++ interface (no torch headers), so the
// .cu compiles with nvcc alone; csrc/ext.cpp binds it to torch tensors.
#pragma once
#include <cstddef>
#include <cstdint>

namespace uniter_fast {

// Cost dtypes understood by ipot_cuda_launch.
enum IpotCostDtype : int { kIpotF32 = 0, kIpotF16 = 1, kIpotBF16 = 2, kIpotF64 = 3 };

// True when an M x N problem keeps A and Q in shared memory on `device`;
// otherwise the caller passes a float32 workspace of B * 2 * M * N elements.
bool ipot_cuda_fits_smem(int64_t M, int64_t N, int device);

// One thread block per example.  C [B, M, N] (strides in elements), pads
// [B, M] / [B, N] bool (true = padded, any pattern), out [B, N, M] float32
// contiguous and zero-filled by the caller (or nullptr: plan not written),
// dist [B] float32 zero-filled by the caller (or nullptr): trace(C T) over the
// real block.  Returns a cudaError_t value (0 = success);
// ipot_cuda_error_string turns it into text.
int ipot_cuda_launch(const void* C, int dtype, int64_t B, int64_t M, int64_t N,
                     int64_t sCb, int64_t sCm, int64_t sCn,
                     const bool* txt_pad, int64_t stb, int64_t stm,
                     const bool* img_pad, int64_t sib, int64_t sin,
                     float beta, int64_t iteration, int64_t k,
                     float* out, float* dist, float* workspace, int device, void* stream);

const char* ipot_cuda_error_string(int err);

}  // namespace uniter_fast
