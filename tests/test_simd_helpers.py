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
