"""csrc/simd.h on its own, at each lane count the kernel uses (4, 8, 16): the
tree reduction (both the __builtin_shufflevector path and the GCC < 12
__builtin_shuffle fallback) and the vectorised exp, compiled by the system C++
compiler into a small program and checked against float64 in Python."""
import os
import shutil
import struct
import subprocess

import pytest
import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
namespace lanes {
#include "simd.h"
}
using namespace lanes;
int main() {
  std::vector<float> x;
  unsigned bits;
  while (std::scanf("%x", &bits) == 1) { float f; __builtin_memcpy(&f, &bits, 4); x.push_back(f); }
  for (size_t c = 0; c + kLanes <= x.size(); c += kLanes) {
    const float h = hsum(ld(x.data() + c));
    float e[kLanes];
    st(e, vexp(ld(x.data() + c)));
    __builtin_memcpy(&bits, &h, 4);
    std::printf("%08x", bits);
    for (int l = 0; l < kLanes; ++l) { __builtin_memcpy(&bits, &e[l], 4); std::printf(" %08x", bits); }
    std::printf("\n");
  }
}
"""


def _f2h(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _h2f(h):
    return struct.unpack("<f", struct.pack("<I", int(h, 16)))[0]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(l for l in f if l.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


CASES = [(lanes, [], "shufflevector") for lanes in (4, 8, 16)] + \
        [(lanes, ["-DUNITER_FAST_PORTABLE_SHUFFLE"], "gcc-lt-12-fallback") for lanes in (4, 8, 16)] + \
        [(8, ["-mavx2", "-mfma"], "avx2"), (16, ["-mavx512f", "-mavx512dq", "-mavx512vl"], "avx512")]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("lanes,flags,what", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_hsum_and_exp(tmp_path, lanes, flags, what):
    needs = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512dq", "avx512vl"}}.get(what, set())
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run {what} code")
    src = tmp_path / "simd_check.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "simd_check"
    proc = subprocess.run([CXX, "-O2", "-std=c++17", "-Wno-psabi", f"-I{CSRC}",
                           f"-DUF_LANES={lanes}", *flags, str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and needs:
        pytest.skip(f"compiler cannot target {what}: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = torch.Generator().manual_seed(lanes)
    x = torch.cat([(torch.rand(16 * 200, generator=g) - 0.5) * 220,       # exp: under/overflow
                   torch.randn(16 * 50, generator=g) * 1e-3,               # exp near 1
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0] * 4)])
    inp = " ".join(f"{_f2h(v):08x}" for v in x.tolist())
    out = subprocess.run([str(exe)], input=inp, capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == x.numel() // lanes
    got_sum = torch.tensor([_h2f(r[0]) for r in rows], dtype=torch.float64)
    got_exp = torch.tensor([[_h2f(h) for h in r[1:]] for r in rows], dtype=torch.float64).flatten()
    chunks = x.double().view(-1, lanes)
    finite = torch.isfinite(chunks).all(1)
    want_sum = chunks.sum(1)
    err = (got_sum - want_sum).abs()[finite]
    assert (err <= 1e-6 * chunks.abs().sum(1)[finite] + 1e-30).all()   # 16 fp32 adds
    assert torch.isnan(got_sum[~finite]).all()
    want_exp = torch.exp(x.double())
    normal = (want_exp >= torch.finfo(torch.float32).tiny) & (want_exp < 3.4e38)
    rel = ((got_exp - want_exp).abs() / want_exp)[normal]
    assert rel.max().item() <= 1.0e-7   # ~0.85 ulp; torch.exp: ~0.5 ulp
    assert torch.isnan(got_exp[torch.isnan(x)]).all()
    assert (got_exp[x == float("inf")] == float("inf")).all()
    assert (got_exp[x == -float("inf")] == 0).all()
    assert (got_exp[want_exp > 3.41e38] == float("inf")).all()


WRA_PROGRAM = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>
struct Workspace {
  std::vector<float> Cc, A, Q, delta, sigma, tmp, rx, ry, kx, ky;
  std::vector<int64_t> rows, cols;
};
namespace lanes {
#include "ipot_cpu_kernel.h"
#include "wra_cpu_kernel.h"
}
using namespace lanes;
static float rd() { unsigned b; std::scanf("%x", &b); float f; __builtin_memcpy(&f, &b, 4); return f; }
static void wr(float f) { unsigned b; __builtin_memcpy(&b, &f, 4); std::printf("%08x\n", b); }
int main() {
  long M, N, D;
  std::scanf("%ld %ld %ld", &M, &N, &D);
  std::vector<float> x(M * D), y(N * D), P(M * N, 0.f), px(M, 0.f), py(N, 0.f), dx(M * D),
      dy(N * D);
  std::vector<char> tp(M), ip(N);
  for (auto& v : x) v = rd();
  for (auto& v : y) v = rd();
  for (auto& v : tp) { int t; std::scanf("%d", &t); v = static_cast<char>(t); }
  for (auto& v : ip) { int t; std::scanf("%d", &t); v = static_cast<char>(t); }
  Workspace ws;
  float dist;
  wra_forward_example(x.data(), D, y.data(), D, reinterpret_cast<bool*>(tp.data()), 1,
                      reinterpret_cast<bool*>(ip.data()), 1, M, N, D, 1e-5f, 0.5f, 50, 1, &dist,
                      P.data(), px.data(), py.data(), ws);
  wra_backward_example(0.75f, x.data(), D, y.data(), D, reinterpret_cast<bool*>(tp.data()), 1,
                       reinterpret_cast<bool*>(ip.data()), 1, M, N, D, P.data(), px.data(),
                       py.data(), dx.data(), dy.data(), ws);
  wr(dist);
  for (float v : dx) wr(v);
  for (float v : dy) wr(v);
}
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_wra_kernel_at_every_lane_count(tmp_path, lanes):
    """csrc/wra_cpu_kernel.h (cosine cost + IPOT + trace and its backward for one
    example) compiled with generic vectors of each width, whatever this CPU's
    instruction set: the 16-lane code (the AVX-512 build's tiles) is checked
    even where AVX-512 is missing.  Against the reference and autograd."""
    from uniter_fast.reference import ot as ref
    src = tmp_path / "wra_check.cpp"
    src.write_text(WRA_PROGRAM)
    exe = tmp_path / "wra_check"
    proc = subprocess.run([CXX, "-O2", "-std=c++17", "-Wno-psabi", f"-I{CSRC}",
                           f"-DUF_LANES={lanes}", str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = torch.Generator().manual_seed(lanes)
    M, N, D = 11, 19, 16 * 3 + 5                   # D: whole vectors and a tail at every width
    x = torch.randn(M, D, generator=g)
    y = torch.randn(N, D, generator=g) * 0.4 + 0.1
    tp = torch.rand(M, generator=g) < 0.3
    ip = torch.rand(N, generator=g) < 0.3
    tp[0] = ip[0] = False
    inp = (f"{M} {N} {D}\n" + " ".join(f"{_f2h(v):08x}" for v in torch.cat([x.flatten(),
                                                                           y.flatten()]).tolist())
           + "\n" + " ".join(str(int(v)) for v in torch.cat([tp, ip]).tolist()) + "\n")
    out = subprocess.run([str(exe)], input=inp, capture_output=True, text=True, check=True)
    vals = torch.tensor([_h2f(h) for h in out.stdout.split()], dtype=torch.float64)
    dist, dx, dy = vals[0], vals[1:1 + M * D].view(M, D), vals[1 + M * D:].view(N, D)
    xr, yr = x[None].clone().requires_grad_(), y[None].clone().requires_grad_()
    d = ref.optimal_transport_dist(xr, yr, tp[None], ip[None])
    (d * 0.75).sum().backward()
    torch.testing.assert_close(dist, d[0].double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx, xr.grad[0].double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dy, yr.grad[0].double(), rtol=1e-4, atol=1e-6)
    assert (dx[tp] == 0).all() and (dy[ip] == 0).all()
