"""IPOT backends (C++ CPU, Triton, CUDA) against the reference.

Seeded random sweeps: ≥ 300 C++ cases + Triton (interpreter on CPU) cases,
awkward sizes, per-example lengths 0 / 1 / full / random, arbitrary padding
patterns, fp32/fp16/bf16 costs, 1/5/50 iterations, beta in [1/3, 1]: the range where
the ops hand a [0, 2] cost to the kernels (below it they compute the plan in
the log domain, see tests/test_ipot_small_beta.py).
"""
import os
import random
import shutil
import subprocess

import pytest
import torch

import uniter_fast.ops as ops
from uniter_fast import _ext
from uniter_fast.constants import WRA_FAST_MIN_BETA
from uniter_fast.reference import ot as ref

# (not imported from conftest: a second conftest module under tests/ shadows that name)
requires_cuda = pytest.mark.cuda          # tests/conftest.py skips these without a GPU
PLAN_ATOL = 1e-6
DIST_RTOL = 1e-5

try:
    CPU_ISAS = _ext.cpu_module().cpu_isas()   # the kernel's instruction sets this CPU runs
    HAS_CPP = True
except _ext.ExtensionUnavailableError:
    CPU_ISAS = []
    HAS_CPP = False
requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension unavailable")


@pytest.fixture(params=CPU_ISAS or ["none"])
def cpu_isa(request):
    """Runs a test once per compiled instruction set of the C++ kernel that
    this CPU can run (AVX-512 / AVX2 / baseline), not only the one auto picks."""
    if not HAS_CPP:
        pytest.skip("C++ extension unavailable")
    mod = _ext.cpu_module()
    mod.set_cpu_isa(request.param)
    yield request.param
    mod.set_cpu_isa("auto")


def _lengths(rng, B, L):
    out = []
    for _ in range(B):
        r = rng.random()
        out.append(0 if r < 0.1 else 1 if r < 0.2 else L if r < 0.45 else rng.randint(0, L))
    return torch.tensor(out)


def _pads(rng, B, M, N):
    tl, il = _lengths(rng, B, M), _lengths(rng, B, N)
    tp = torch.arange(M)[None] >= tl[:, None]
    ip = torch.arange(N)[None] >= il[:, None]
    if rng.random() < 0.25:  # arbitrary (non-suffix) padding on one example
        g = torch.Generator().manual_seed(rng.randint(0, 2**31))
        b = rng.randrange(B)
        tp[b] = torch.rand(M, generator=g) < 0.4
        ip[b] = torch.rand(N, generator=g) < 0.4
    return tp, ip


def random_case(seed, max_b=64, max_m=64, max_n=128):
    rng = random.Random(seed)
    B, M, N = rng.randint(1, max_b), rng.randint(1, max_m), rng.randint(1, max_n)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    iteration = rng.choice([1, 5, 50])
    beta = rng.uniform(WRA_FAST_MIN_BETA, 1.0)   # cost span 2 <= 6 beta: on the kernel
    g = torch.Generator().manual_seed(seed)
    C = (torch.rand(B, M, N, generator=g) * 2).to(dtype)   # cosine-distance range [0, 2]
    tp, ip = _pads(rng, B, M, N)
    return C, tp, ip, beta, iteration


def _distance(C, T, tp, ip):
    cost = C.float().masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    return (cost * T.transpose(1, 2)).sum(dim=(1, 2))


def assert_matches_reference(C, tp, ip, beta, iteration, T):
    T_ref = ref.ipot(C, tp, ip, beta, iteration, 1)
    assert T.shape == T_ref.shape and T.dtype == torch.float32
    assert not torch.isnan(T).any()
    err = (T - T_ref).abs().max().item() if T.numel() else 0.0
    assert err <= PLAN_ATOL, f"plan max abs err {err}"
    d, d_ref = _distance(C, T, tp, ip), _distance(C, T_ref, tp, ip)
    assert torch.all((d - d_ref).abs() <= DIST_RTOL * d_ref.abs() + 1e-7), (d, d_ref)


def ipot_k_independent(C, tp, ip, beta, iteration, k):
    """Per-example IPOT written from the paper's updates (used for k > 1,
    where the reference cannot run): compact real block, no masks."""
    B, M, N = C.shape
    out = torch.zeros(B, N, M)
    for b in range(B):
        rows = (~tp[b]).nonzero().flatten()
        cols = (~ip[b]).nonzero().flatten()
        m, n = len(rows), len(cols)
        if m == 0 or n == 0:
            continue
        A = torch.exp(-C[b].float()[rows][:, cols] / beta)      # [m, n]
        T = torch.ones(m, n)
        sigma = torch.full((m,), 1.0 / m)
        for _ in range(iteration):
            Q = A * T
            for _ in range(k):
                delta = 1.0 / (n * (Q.t() @ sigma))
                sigma = 1.0 / (m * (Q @ delta))
            T = delta[None, :] * Q * sigma[:, None]
        out[b][cols[:, None], rows[None, :]] = T.t()
    return out


# ----------------------------------------------------------------- C++ (native)
@requires_cpp
@pytest.mark.parametrize("chunk", range(10))
def test_cpp_matches_reference_sweep(chunk, cpu_isa):
    """300 seeded random cases, 30 per chunk, on every instruction set."""
    for seed in range(chunk * 30, chunk * 30 + 30):
        C, tp, ip, beta, iteration = random_case(seed)
        T = ops.ipot(C, tp, ip, beta, iteration, backend="cpp")
        assert_matches_reference(C, tp, ip, beta, iteration, T)


@requires_cpp
def test_cpp_large_lengths_and_strides(cpu_isa):
    g = torch.Generator().manual_seed(1)
    C = torch.rand(3, 150, 140, generator=g).transpose(1, 2) * 2   # non-contiguous [3, 140, 150]
    tp = torch.arange(140)[None] >= torch.tensor([140, 1, 77])[:, None]
    ip = torch.arange(150)[None] >= torch.tensor([150, 133, 0])[:, None]
    assert_matches_reference(C, tp, ip, 0.5, 50, ops.ipot(C, tp, ip, backend="cpp"))


@requires_cpp
@pytest.mark.parametrize("k", [2, 3])
def test_cpp_k_gt_1(k, cpu_isa):
    C, tp, ip, beta, _ = random_case(1000 + k, max_b=6, max_m=20, max_n=30)
    T = ops.ipot(C, tp, ip, beta, 5, k, backend="cpp")
    expect = ipot_k_independent(C, tp, ip, beta, 5, k)
    assert (T - expect).abs().max().item() <= PLAN_ATOL


def test_independent_k1_matches_reference():
    # the k>1 oracle must agree with the reference where both are defined
    C, tp, ip, beta, iteration = random_case(7, max_b=5, max_m=12, max_n=20)
    T = ipot_k_independent(C, tp, ip, beta, iteration, 1)
    assert (T - ref.ipot(C, tp, ip, beta, iteration, 1)).abs().max().item() <= PLAN_ATOL


def _emb_case(seed, B=6, M=13, N=21, D=16):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(B, M, D, generator=g, requires_grad=True)
    img = torch.randn(B, N, D, generator=g, requires_grad=True)
    tl = torch.tensor([M, 1, 0, 5, M, 9])[:B]
    il = torch.tensor([N, 4, 7, 0, 1, 12])[:B]
    tp = torch.arange(M)[None] >= tl[:, None]
    ip = torch.arange(N)[None] >= il[:, None]
    return txt, img, tp, ip


def _check_distance_and_grad(backend, device="cpu"):
    txt, img, tp, ip = _emb_case(11)
    txt, img = (t.detach().to(device).requires_grad_() for t in (txt, img))
    tp, ip = tp.to(device), ip.to(device)
    d = ops.optimal_transport_dist(txt, img, tp, ip, 0.5, 50, 1, backend=backend)
    w = torch.linspace(0.5, 1.5, d.numel(), device=device)
    gt, gi = torch.autograd.grad((d * w).sum(), (txt, img))
    txt_r, img_r = (t.detach().clone().requires_grad_() for t in (txt, img))
    d_r = ref.optimal_transport_dist(txt_r, img_r, tp, ip, 0.5, 50, 1)
    gt_r, gi_r = torch.autograd.grad((d_r * w).sum(), (txt_r, img_r))
    assert not torch.isnan(d).any()
    assert torch.all((d - d_r).abs() <= DIST_RTOL * d_r.abs() + 1e-7)
    assert d[2] == 0 and d[3] == 0  # empty text / empty image
    torch.testing.assert_close(gt, gt_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gi, gi_r, atol=1e-6, rtol=1e-5)
    assert gt.abs().sum() > 0


@requires_cpp
def test_cpp_distance_and_gradient():
    _check_distance_and_grad("cpp")


@requires_cpp
def test_cpp_bad_input_raises_value_error():
    mod = _ext.cpu_module()
    C = torch.rand(2, 3, 4)
    tp, ip = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="cost C"):
        mod.ipot_cpu(torch.rand(2, 3), tp, ip, 0.5, 5, 1)
    with pytest.raises(ValueError, match="txt_pad"):
        mod.ipot_cpu(C, tp.long(), ip, 0.5, 5, 1)
    with pytest.raises(ValueError, match="img_pad"):
        mod.ipot_cpu(C, tp, torch.zeros(2, 5, dtype=torch.bool), 0.5, 5, 1)
    with pytest.raises(ValueError, match="beta"):
        mod.ipot_cpu(C, tp, ip, 0.0, 5, 1)
    with pytest.raises(ValueError, match="iteration"):
        mod.ipot_cpu(C, tp, ip, 0.5, 0, 1)
    with pytest.raises(ValueError, match="cost C"):
        mod.ipot_cpu(C.long(), tp, ip, 0.5, 5, 1)
    with pytest.raises(ValueError, match="txt_pad"):
        ops.ipot(C, tp.float(), ip, backend="cpp")   # float pads are not masks


@requires_cpp
@pytest.mark.parametrize("chunk", range(3))
def test_cpp_fused_distance_and_grad_match_reference(chunk, cpu_isa):
    """ipot_distance on cpp (plan and trace(C·T) in one kernel pass, gradient
    by _FusedDistance) against the reference twin: 60 seeded cases."""
    for seed in range(9000 + chunk * 20, 9000 + chunk * 20 + 20):
        C, tp, ip, beta, iteration = random_case(seed, max_b=16)
        C = C.masked_fill(tp[:, :, None] | ip[:, None, :], 0).requires_grad_()
        d = ops.ipot_distance(C, tp, ip, beta, iteration, backend="cpp")
        C_r = C.detach().clone().requires_grad_()
        d_r = ref.ipot_distance(C_r, tp, ip, beta, iteration)
        assert d.dtype == torch.float32 and d.shape == d_r.shape
        assert not torch.isnan(d).any()
        assert torch.all((d - d_r).abs() <= DIST_RTOL * d_r.abs() + 1e-7), (seed, d, d_r)
        w = torch.rand(d.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
        (g,) = torch.autograd.grad((d * w).sum(), C)
        (g_r,) = torch.autograd.grad((d_r * w).sum(), C_r)
        assert g.dtype == C.dtype
        # grad = w * Tᵀ: plans agree to PLAN_ATOL (w <= 1.5), then both round to C's dtype
        rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[C.dtype]
        torch.testing.assert_close(g.float(), g_r.float(), atol=1.5 * PLAN_ATOL, rtol=rtol)


@requires_cpp
def test_cpp_distance_without_plan_matches(cpu_isa):
    # no grad needed: the kernel skips writing the plan; same distances, no plan returned
    C, tp, ip, beta, iteration = random_case(77, max_b=12)
    mod = _ext.cpu_module()
    T, d = mod.ipot_distance_cpu(C, tp, ip, beta, iteration, 1)
    T0, d0 = mod.ipot_distance_cpu(C, tp, ip, beta, iteration, 1, with_plan=False)
    assert T0 is None and T is not None and torch.equal(d, d0)
    d_op = ops.ipot_distance(C, tp, ip, beta, iteration, backend="cpp")   # C needs no grad
    assert torch.equal(d_op, d) and not d_op.requires_grad
    with torch.no_grad():
        assert torch.equal(ops.ipot_distance(C.clone().requires_grad_(), tp, ip, beta, iteration,
                                             backend="cpp"), d)
    d_r = ref.ipot_distance(C.float().masked_fill(tp[:, :, None] | ip[:, None, :], 0), tp, ip,
                            beta, iteration)
    assert torch.all((d - d_r).abs() <= DIST_RTOL * d_r.abs() + 1e-7)


@requires_cpp
def test_cpp_fused_distance_ignores_padded_cost_and_empty_examples():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(4, 9, 14, generator=g) * 2
    tp = torch.arange(9)[None] >= torch.tensor([9, 4, 0, 6])[:, None]
    ip = torch.arange(14)[None] >= torch.tensor([14, 11, 5, 0])[:, None]
    d = ops.ipot_distance(C, tp, ip, backend="cpp")        # C not masked: padding is ignored
    d_masked = ref.ipot_distance(C.masked_fill(tp[:, :, None] | ip[:, None, :], 0), tp, ip)
    assert torch.all((d - d_masked).abs() <= DIST_RTOL * d_masked.abs() + 1e-7)
    assert d[2] == 0 and d[3] == 0 and d[0] > 0 and d[1] > 0


@requires_cpp
def test_cpp_exp_accuracy(cpu_isa):
    """The kernel computes A = exp(-C/beta) with its own vectorised exp."""
    mod = _ext.cpu_module()
    x = torch.cat([torch.linspace(-115.0, 95.0, 100003), torch.rand(5001) * -30,
                   torch.tensor([0.0, -0.0, 1e-8, -1e-8, 88.72, 88.73, -87.33, -103.9, -104.0])])
    y = mod.exp_f32_cpu(x).double()
    exact = torch.exp(x.double())
    tiny = torch.finfo(torch.float32).tiny
    normal = (exact >= tiny) & (exact <= torch.finfo(torch.float32).max)
    rel = ((y - exact).abs() / exact)[normal]
    assert rel.max().item() <= 1.0e-7            # ~0.85 ulp of 2^-23 (torch.exp: ~0.5)
    sub = exact < tiny                            # subnormal results: within one subnormal step
    assert ((y - exact).abs()[sub] <= 1.41e-45).all()
    assert torch.isinf(y[exact > 3.5e38]).all()
    special = mod.exp_f32_cpu(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert torch.isnan(special[0]) and special[1] == float("inf") and special[2] == 0


def test_cpu_isa_choice_and_bad_names():
    if not HAS_CPP:
        pytest.skip("C++ extension unavailable")
    mod = _ext.cpu_module()
    assert CPU_ISAS and CPU_ISAS[-1] == "base" and mod.cpu_isa() == CPU_ISAS[0]
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        mod.set_cpu_isa("sse9")
    for isa in ("avx512", "avx2"):
        if isa not in CPU_ISAS:
            with pytest.raises(ValueError, match="cannot run"):
                mod.set_cpu_isa(isa)
    assert mod.cpu_isa() == CPU_ISAS[0]


@requires_cpp
def test_cpp_kernel_restores_denormal_mode():
    # the kernel flushes subnormals while it runs (x86); the caller's mode must be back after
    C, tp, ip, beta, iteration = random_case(4, max_b=4)
    tiny = torch.tensor([1e-39])
    assert (tiny * 1.0).item() > 0
    ops.ipot(C, tp, ip, beta, iteration, backend="cpp")
    ops.ipot_distance(C, tp, ip, beta, iteration, backend="cpp")
    assert (tiny * 1.0).item() > 0


def test_ext_missing_sources_is_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "csrc_dir", lambda: str(tmp_path))
    with pytest.raises(_ext.ExtensionUnavailableError, match="no C.. sources"):
        _ext._jit("uniter_fast_C_test_missing", with_cuda=False)


# -------------------------------------------------------- Triton (interpreter)
triton_ok = pytest.mark.skipif(
    not (torch.cuda.is_available() or "triton" in ops.available_backends("ipot", "cpu")),
    reason="triton not runnable here (no GPU and TRITON_INTERPRET unset)")


def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@triton_ok
@pytest.mark.parametrize("chunk", range(4))
def test_triton_matches_reference_sweep(chunk):
    """40 seeded cases (small: the interpreter is slow)."""
    dev = _triton_device()
    for seed in range(5000 + chunk * 10, 5000 + chunk * 10 + 10):
        C, tp, ip, beta, iteration = random_case(seed, max_b=6, max_m=40, max_n=70)
        T = ops.ipot(C.to(dev), tp.to(dev), ip.to(dev), beta, iteration, backend="triton")
        assert_matches_reference(C, tp, ip, beta, iteration, T.cpu())


@triton_ok
def test_triton_streaming_variant_large_tile():
    # 150 x 140 rounds to a 256 x 256 tile: the streaming (workspace) variant
    from uniter_fast.kernels import ipot_triton
    dev = _triton_device()
    g = torch.Generator().manual_seed(2)
    C = torch.rand(3, 150, 140, generator=g) * 2
    tp = torch.arange(150)[None] >= torch.tensor([150, 1, 97])[:, None]
    ip = torch.arange(140)[None] >= torch.tensor([140, 133, 0])[:, None]
    assert 256 * 256 > ipot_triton.MAX_REGISTER_TILE
    T = ops.ipot(C.to(dev), tp.to(dev), ip.to(dev), 0.5, 5, backend="triton").cpu()
    assert_matches_reference(C, tp, ip, 0.5, 5, T)


@triton_ok
@pytest.mark.parametrize("shape", [(2, 9, 13), (2, 150, 140)])
def test_triton_k_gt_1(shape):
    dev = _triton_device()
    g = torch.Generator().manual_seed(5)
    C = torch.rand(*shape, generator=g) * 2
    tp = torch.arange(shape[1])[None] >= torch.tensor([shape[1], 3])[:, None]
    ip = torch.arange(shape[2])[None] >= torch.tensor([5, shape[2]])[:, None]
    T = ops.ipot(C.to(dev), tp.to(dev), ip.to(dev), 0.3, 3, 2, backend="triton").cpu()
    assert (T - ipot_k_independent(C, tp, ip, 0.3, 3, 2)).abs().max().item() <= PLAN_ATOL


@triton_ok
def test_triton_distance_and_gradient():
    _check_distance_and_grad("triton", _triton_device())


@triton_ok
def test_triton_launcher_asserts_only_what_it_relies_on():
    # the op checks the contract (see test_ops_ipot_contract); the launcher only
    # needs bool pads and a device it can launch on
    from uniter_fast.kernels import ipot_triton
    dev = _triton_device()
    C = torch.rand(2, 3, 4, device=dev)
    tp = torch.zeros(2, 3, dtype=torch.bool, device=dev)
    ip = torch.zeros(2, 4, dtype=torch.bool, device=dev)
    with pytest.raises(ValueError, match="bool"):
        ipot_triton.ipot(C, tp.int(), ip)
    T, d = ipot_triton.ipot_distance(C, tp, ip, 0.5, 5, 1, with_plan=False)
    assert T is None and d.shape == (2,)


@triton_ok
@pytest.mark.parametrize("shape", [(5, 13, 21), (3, 150, 140)])   # register / streaming variant
def test_triton_fused_distance_matches_reference(shape):
    dev = _triton_device()
    g = torch.Generator().manual_seed(sum(shape))
    B, M, N = shape
    C = torch.rand(*shape, generator=g) * 2
    tp = torch.arange(M)[None] >= torch.tensor([M, 1, 0, 7, M][:B])[:, None]
    ip = torch.arange(N)[None] >= torch.tensor([N, 4, 7, 0, 2][:B])[:, None]
    from uniter_fast.kernels import ipot_triton
    T, d = ipot_triton.ipot_distance(C.to(dev), tp.to(dev), ip.to(dev), 0.5, 5, 1)
    T0, d0 = ipot_triton.ipot_distance(C.to(dev), tp.to(dev), ip.to(dev), 0.5, 5, 1,
                                       with_plan=False)
    assert T0 is None and torch.equal(d.cpu(), d0.cpu())
    assert_matches_reference(C, tp, ip, 0.5, 5, T.cpu())
    d_r = ref.ipot_distance(C, tp, ip, 0.5, 5)   # C unmasked: padding must not count
    assert torch.all((d.cpu() - d_r).abs() <= DIST_RTOL * d_r.abs() + 1e-7), (d, d_r)
    assert d[2] == 0 and (B < 4 or d[3] == 0)


# ------------------------------------------------------------------------ CUDA
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """Keep csrc/ipot_cuda.cu compiling on machines without a GPU."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    src = os.path.join(_ext.csrc_dir(), "ipot_cuda.cu")
    obj = tmp_path / "ipot_cuda.o"
    res = subprocess.run([nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                          "-gencode", "arch=compute_90,code=sm_90", "-Werror", "all-warnings"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert obj.stat().st_size > 0


def test_cuda_backend_reports_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert "cuda" not in ops.available_backends("ipot", "cpu")
    with pytest.raises(ops.BackendUnavailableError, match="CUDA"):
        ops.ipot(torch.rand(1, 2, 2), torch.zeros(1, 2, dtype=torch.bool),
                 torch.zeros(1, 2, dtype=torch.bool), backend="cuda")


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference_sweep(backend):
    for seed in range(9000, 9100):
        C, tp, ip, beta, iteration = random_case(seed)
        T = ops.ipot(C.cuda(), tp.cuda(), ip.cuda(), beta, iteration, backend=backend)
        assert_matches_reference(C, tp, ip, beta, iteration, T.cpu())


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_and_k(backend):
    g = torch.Generator().manual_seed(4)
    C = torch.rand(5, 200, 300, generator=g) * 2   # beyond shared memory / register tile
    tp = torch.arange(200)[None] >= torch.tensor([200, 1, 0, 150, 7])[:, None]
    ip = torch.arange(300)[None] >= torch.tensor([300, 299, 5, 0, 1])[:, None]
    T = ops.ipot(C.cuda(), tp.cuda(), ip.cuda(), 0.5, 50, backend=backend).cpu()
    assert_matches_reference(C, tp, ip, 0.5, 50, T)
    T2 = ops.ipot(C.cuda(), tp.cuda(), ip.cuda(), 0.5, 4, 3, backend=backend).cpu()
    assert (T2 - ipot_k_independent(C, tp, ip, 0.5, 4, 3)).abs().max().item() <= PLAN_ATOL


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_distance_and_gradient(backend):
    _check_distance_and_grad(backend, "cuda")


@requires_cuda
def test_cuda_bad_input_raises_value_error():
    mod = _ext.cuda_module()
    C = torch.rand(2, 3, 4, device="cuda")
    tp = torch.zeros(2, 3, dtype=torch.bool, device="cuda")
    ip = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
    with pytest.raises(ValueError, match="txt_pad"):
        mod.ipot_cuda(C, tp.long(), ip, 0.5, 5, 1)
    with pytest.raises(ValueError, match="beta"):
        mod.ipot_cuda(C, tp, ip, -0.5, 5, 1)
    with pytest.raises(ValueError, match="CUDA"):
        mod.ipot_cuda(C.cpu(), tp.cpu(), ip.cpu(), 0.5, 5, 1)
