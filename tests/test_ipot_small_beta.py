"""IPOT and the WRA distance across beta in [1e-3, 10] and cost offsets, on
every available backend, against a float64 transcription (issue #13, item 5).

The transcription (``ipot64``) runs UNITER's IPOT updates in the log domain in
float64, on each example's real block, written independently of the package's
log-domain path (a loop over examples, no cost shift):

    log Q = -C/beta + log T
    log delta_j = -log n - logsumexp_i(log Q_ij + log sigma_i)
    log sigma_i = -log m - logsumexp_j(log Q_ij + log delta_j)
    log T = log delta_j + log Q + log sigma_i

Every IPOT update is a product or a ratio of positive numbers, so these are the
same updates term by term: logsumexp evaluates each sum of exponentials without
under- or overflow, whatever beta or the offset (exp(-1000/1e-3) is far outside
even float64's range).  At beta >= 0.5 it is checked against the plain float64
updates (``ipot64_direct``).

The ops must, for every beta > 0 and finite cost, give finite results that match
it: the float32 kernels where the cost fits their range (at most
IPOT_FAST_MAX_COST_OVER_BETA · beta after the column shift, at most
IPOT_FAST_MAX_ITERATIONS iterations), the float64 log-domain path elsewhere.
Two more tests pin that range down: inside it the float32 kernels, called
directly, match float64 on adversarial costs (tied and degenerate ones, where the
exact plan needs entries that first decay for many iterations), and outside it
they do not on a known cost (an entry dips below float32's range and cannot come
back, Q = A ⊙ T), where the op still does.

Tolerances (plans lie in [0, 1/m]).  The kernels round C/beta in float32, a
relative 2^-24 of an exponent r = |C|/beta of at most IPOT_FAST_MAX_COST_OVER_BETA,
and the t iterations raise A to the t-th power (T ∝ A^t u vᵀ): a relative plan
error of about t · r · 2^-24, so the tolerance is 1/m · (1e-6 + 2 · t · r · 2^-24).
"""
import importlib.util
import math
import os

import pytest
import torch

import uniter_fast.ops as ops
from uniter_fast.constants import (
    IPOT_FAST_MAX_COST_OVER_BETA,
    IPOT_FAST_MAX_ITERATIONS,
    WRA_FAST_MIN_BETA,
)
from uniter_fast.ops import _registry
from uniter_fast.ops.ipot import fast_cost

BETAS = (1e-3, 3e-3, 0.01, 0.02, 0.1, 0.5, 1.0, 10.0)
OFFSETS = (0.0, 43.0, 1000.0, -7.0)
ITERATION = 50
DIST_RTOL = 1e-5       # of sum |C| T: float32 sums of up to a few hundred terms

GPU = torch.cuda.is_available()
# (backend, device): every backend on the CPU (Triton under the interpreter), and on a GPU
IPOT_BACKENDS = [(b, "cpu") for b in ops.available_backends("ipot", "cpu")] + (
    [(b, "cuda") for b in ops.available_backends("ipot", "cuda")] if GPU else [])
WRA_BACKENDS = [(b, "cpu") for b in ops.available_backends("optimal_transport_dist", "cpu")] + (
    [(b, "cuda") for b in ops.available_backends("optimal_transport_dist", "cuda")] if GPU else [])
INTERPRETED = ("triton", "cpu")


def params(pairs):
    """parametrize values; the GPU ones carry the ``cuda`` marker (``pytest -m cuda``,
    benchmarks/device_check.sh)."""
    return [pytest.param(b, d, marks=pytest.mark.cuda, id=f"{b}-{d}") if d == "cuda" else (b, d)
            for b, d in pairs]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (two threads on a loaded 2-core machine made
    the reference sweep 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- float64 transcription

def _block(tp, ip, b):
    return (~tp[b]).nonzero().flatten(), (~ip[b]).nonzero().flatten()


def ipot64(C, tp, ip, beta, iteration=ITERATION, k=1):
    """UNITER's IPOT in the log domain, float64: plan [B, N, M] (0 off the real
    block and for an empty example)."""
    B, M, N = C.shape
    out = torch.zeros(B, N, M, dtype=torch.float64)
    for b in range(B):
        rows, cols = _block(tp, ip, b)
        m, n = len(rows), len(cols)
        if m == 0 or n == 0:
            continue
        la = -C[b].double()[rows][:, cols] / beta                   # log A, [m, n]
        lt = torch.zeros(m, n, dtype=torch.float64)                 # log T0 = log 1
        ls = torch.full((m,), -math.log(m), dtype=torch.float64)    # log sigma0 = log 1/m
        for _ in range(iteration):
            lq = la + lt
            for _ in range(k):
                ld = -math.log(n) - torch.logsumexp(lq + ls[:, None], 0)
                ls = -math.log(m) - torch.logsumexp(lq + ld[None, :], 1)
            lt = ls[:, None] + lq + ld[None, :]
        out[b][cols[:, None], rows[None, :]] = lt.exp().t()
    return out


def ipot64_direct(C, tp, ip, beta, iteration=ITERATION):
    """The plain float64 updates (only where exp(-C/beta) is representable)."""
    B, M, N = C.shape
    out = torch.zeros(B, N, M, dtype=torch.float64)
    for b in range(B):
        rows, cols = _block(tp, ip, b)
        m, n = len(rows), len(cols)
        if m == 0 or n == 0:
            continue
        A = torch.exp(-C[b].double()[rows][:, cols] / beta)
        T = torch.ones(m, n, dtype=torch.float64)
        sigma = torch.full((m,), 1.0 / m, dtype=torch.float64)
        for _ in range(iteration):
            Q = A * T
            delta = 1.0 / (n * (Q.t() @ sigma))
            sigma = 1.0 / (m * (Q @ delta))
            T = delta[None, :] * Q * sigma[:, None]
        out[b][cols[:, None], rows[None, :]] = T.t()
    return out


def lengths(tp, ip):
    return [tuple(len(i) for i in _block(tp, ip, b)) for b in range(tp.size(0))]


def plan_tol(tp, ip, iteration=ITERATION):
    m = min([m for m, n in lengths(tp, ip) if m and n] or [1])
    return (1e-6 + 2 * iteration * IPOT_FAST_MAX_COST_OVER_BETA * 2.0 ** -24) / m


def goes_to_kernel(C, tp, ip, beta, iteration=ITERATION):
    """Every example of the batch is computed by the float32 kernel."""
    return fast_cost(C, tp, ip, beta, iteration)[2] is None


# ----------------------------------------------------------------- cases

SHAPES = {   # (B, M, N, text lengths, image lengths): 1, odd, not multiples of any block
    "small": (3, 5, 7, [5, 1, 5], [7, 7, 6]),
    "awkward": (4, 13, 37, [13, 9, 0, 13], [37, 1, 20, 37]),   # example 2: empty text
    "empty_img": (2, 6, 3, [6, 4], [0, 3]),                    # example 0: empty image
}


def cost(shape, family, offset, seed):
    B, M, N, tl, il = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(B, M, N, generator=g)
    if family == "cosine":            # the 1 - cos range [0, 2]
        C = 2 * base
    elif family == "narrow":          # span 0.05
        C = 0.05 * base
    else:                             # "rows": narrow, each row offset by up to 5
        C = 0.05 * base + 5 * torch.rand(B, M, 1, generator=g)
    C = (C + offset).float()
    tp = torch.arange(M)[None] >= torch.tensor(tl)[:, None]
    ip = torch.arange(N)[None] >= torch.tensor(il)[:, None]
    if B > 2:   # last example: an arbitrary (non-suffix) padding pattern
        tp[-1] = torch.rand(M, generator=g) < 0.3
        ip[-1] = torch.rand(N, generator=g) < 0.3
    C = C.masked_fill(tp[:, :, None] | ip[:, None, :], 123.0)   # padding must be ignored
    return C, tp, ip


CASES = [(s, f, o) for s in SHAPES for f in ("cosine", "narrow", "rows") for o in OFFSETS]


# ----------------------------------------------------------------- tests

def test_log_domain_transcription_matches_the_direct_updates():
    for beta in (0.5, 1.0, 10.0):
        C, tp, ip = cost("awkward", "cosine", 0.0, 1)
        torch.testing.assert_close(ipot64(C, tp, ip, beta), ipot64_direct(C, tp, ip, beta),
                                   atol=1e-12, rtol=1e-9)
    # beta = 1e-3, k = 3: exp(-C/beta) is far below float64's range; the text
    # marginals are still 1/m (the last update is sigma's), to the rounding of
    # exponents ~1e6 (relative 1e6 · 2^-52)
    C, tp, ip = cost("small", "rows", 1000.0, 2)
    T = ipot64(C, tp, ip, 1e-3, 5, k=3)
    for b, (m, n) in enumerate(lengths(tp, ip)):
        torch.testing.assert_close(T[b].sum(0), (~tp[b]).double() / m, atol=1e-9, rtol=0)


def test_package_log_domain_path_matches_the_transcription():
    """uniter_fast.reference.ot.ipot_log_domain (what the ops use beyond the
    kernels' range: batched, column-shifted, masked) against the per-example loop,
    k = 1 and 2, every shape, family, offset and beta."""
    from uniter_fast.reference.ot import ipot_log_domain
    for i, (shape, family, offset) in enumerate(CASES):
        C, tp, ip = cost(shape, family, offset, 200 + i)
        for beta in BETAS:
            for k in (1, 2):
                T = ipot_log_domain(C, tp, ip, beta, 7, k)
                assert T.dtype == torch.float32 and T.shape == (C.size(0), C.size(2), C.size(1))
                torch.testing.assert_close(T.double(), ipot64(C, tp, ip, beta, 7, k),
                                           atol=1e-7 / C.size(1), rtol=1e-6)


def _sweep_backend(backend, device, shapes=SHAPES, offsets=OFFSETS, betas=BETAS):
    """(cases on the float32 kernel, cases on the log-domain path): every one
    must be finite and match float64, plan, distance and gradient."""
    on_kernel = on_log = 0
    for i, (shape, family, offset) in enumerate(CASES):
        if shape not in shapes or offset not in offsets:
            continue
        C, tp, ip = cost(shape, family, offset, 100 + i)
        real = C.double().masked_fill(tp[:, :, None] | ip[:, None, :], 0)
        for beta in betas:
            what = f"{backend}/{device} {shape}/{family}{offset:+g} beta={beta:g}"
            T64 = ipot64(C, tp, ip, beta)
            Cd, tpd, ipd = C.to(device), tp.to(device), ip.to(device)
            T = ops.ipot(Cd, tpd, ipd, beta, ITERATION, backend=backend).cpu()
            assert T.dtype == torch.float32 and torch.isfinite(T).all(), what
            tol = plan_tol(tp, ip)
            err = (T.double() - T64).abs().max().item()
            assert err <= tol, f"{what}: plan err {err} > {tol}"

            Cg = Cd.clone().requires_grad_()
            d = ops.ipot_distance(Cg, tpd, ipd, beta, ITERATION, backend=backend)
            d64 = (real * T64.transpose(1, 2)).sum((1, 2))
            scale = (real.abs() * T64.transpose(1, 2)).sum((1, 2))
            bound = DIST_RTOL * scale + tol * real.abs().sum((1, 2)) + 1e-7
            assert torch.isfinite(d).all() and torch.all((d.cpu().double() - d64).abs() <= bound), \
                (what, d, d64)
            w = torch.linspace(0.5, 1.5, C.size(0))
            (grad,) = torch.autograd.grad((d * w.to(device)).sum(), Cg)
            d, grad = d.cpu(), grad.cpu()
            gerr = (grad.double() - w[:, None, None].double() * T64.transpose(1, 2)).abs().max()
            assert torch.isfinite(grad).all() and gerr <= 1.5 * tol, f"{what}: grad err {gerr}"
            for b, (m, n) in enumerate(lengths(tp, ip)):   # empty examples: exactly 0
                if m == 0 or n == 0:
                    assert d[b] == 0 and not T[b].any() and not grad[b].any(), what
            if goes_to_kernel(C, tp, ip, beta):
                on_kernel += 1
            else:
                on_log += 1
    return on_kernel, on_log


@pytest.mark.parametrize("backend,device", params(b for b in IPOT_BACKENDS if b != INTERPRETED))
def test_ipot_beta_sweep_against_float64(backend, device):
    counts = _sweep_backend(backend, device)
    print(backend, device, "cases on the float32 kernel / on the log-domain path:", counts)
    # both paths are exercised: offsets the column shift removes go to the
    # kernel, rows at different offsets and beta < 2/6 on the cosine range do not
    assert counts[0] >= 60 and counts[1] >= 100, counts


@pytest.mark.skipif(INTERPRETED not in IPOT_BACKENDS, reason="Triton interpreter unavailable")
def test_ipot_beta_sweep_against_float64_triton_interpreter():
    # the interpreter is slow: the small shape, two offsets, four betas
    counts = _sweep_backend("triton", "cpu", shapes=("small",), offsets=(43.0, -7.0),
                            betas=(1e-3, 0.02, 0.5, 10.0))
    print("triton cases on the float32 kernel / on the log-domain path:", counts)
    assert counts[0] >= 4 and counts[1] >= 4, counts


@pytest.mark.parametrize("backend,device", params(IPOT_BACKENDS))
def test_tiny_beta_on_a_wide_cost_is_computed(backend, device):
    # after any shift this cost still spans 2: beyond the float32 kernels below
    # beta = 2/6, computed in the log domain (it raised "too small" before)
    C = torch.tensor([[[0.0, 2.0, 0.3], [2.0, 0.0, 1.1]]]) + 43
    tp, ip = torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)
    for beta in (1e-3, 0.01, 0.02, 0.3, 2 / IPOT_FAST_MAX_COST_OVER_BETA):
        assert goes_to_kernel(C, tp, ip, beta) == (beta >= 2 / IPOT_FAST_MAX_COST_OVER_BETA)
        T64 = ipot64(C, tp, ip, beta)
        T = ops.ipot(C.to(device), tp.to(device), ip.to(device), beta, backend=backend)
        torch.testing.assert_close(T.cpu().double(), T64, atol=plan_tol(tp, ip), rtol=0)
        d = ops.ipot_distance(C.to(device), tp.to(device), ip.to(device), beta, backend=backend)
        torch.testing.assert_close(d.cpu().double(), (C.double() * T64.transpose(1, 2)).sum((1, 2)),
                                   atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend,device", params(IPOT_BACKENDS))
def test_mixed_batch_routes_per_example(backend, device, monkeypatch):
    """At beta = 0.25 a cost spanning 2 needs the log domain (8 beta) and one spanning
    1 does not (4 beta): in one batch each example is routed on its own, the second
    still on the kernel (equal to computing it alone), both matching float64, and
    the distance and its gradient too."""
    beta = 0.25
    g = torch.Generator().manual_seed(11)
    C = torch.rand(3, 6, 9, generator=g) * torch.tensor([2.0, 1.0, 0.5])[:, None, None] + 0.3
    tp = torch.arange(6)[None] >= torch.tensor([6, 4, 5])[:, None]
    ip = torch.arange(9)[None] >= torch.tensor([9, 9, 2])[:, None]
    _, _, fits = fast_cost(C, tp, ip, beta, ITERATION)
    assert fits.tolist() == [False, True, True]
    from uniter_fast.reference import ot as ref_ot
    log_domain, seen = ref_ot.ipot_log_domain, []

    def spy(C, *args):
        seen.append(C.size(0))
        return log_domain(C, *args)
    monkeypatch.setattr(ref_ot, "ipot_log_domain", spy)
    Cd, tpd, ipd = C.to(device), tp.to(device), ip.to(device)
    T = ops.ipot(Cd, tpd, ipd, beta, backend=backend).cpu()
    assert seen == [1], seen        # only the first example went to the log domain
    T64 = ipot64(C, tp, ip, beta)
    torch.testing.assert_close(T.double(), T64, atol=plan_tol(tp, ip), rtol=0)
    alone = ops.ipot(Cd[1:2], tpd[1:2], ipd[1:2], beta, backend=backend).cpu()
    torch.testing.assert_close(T[1:2], alone, atol=1e-6 / 4, rtol=0)
    Cg = Cd.clone().requires_grad_()
    d = ops.ipot_distance(Cg, tpd, ipd, beta, backend=backend)
    real = C.double().masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    torch.testing.assert_close(d.detach().cpu().double(), (real * T64.transpose(1, 2)).sum((1, 2)),
                               atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(d.sum(), Cg)
    torch.testing.assert_close(grad.cpu().double(), T64.transpose(1, 2),
                               atol=1.5 * plan_tol(tp, ip), rtol=0)


# ----------------------------------------------------------------- the float32 kernels' range

# the adversarial cost families of the range search (benchmarks/ipot_float32_range.py)
_spec = importlib.util.spec_from_file_location(
    "ipot_float32_range", os.path.join(ROOT, "benchmarks", "ipot_float32_range.py"))
RANGE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RANGE)
adversarial = RANGE.adversarial
FLOAT32_KERNELS = [b for b in IPOT_BACKENDS if b != INTERPRETED]


def _kernel_error(backend, device, C, iteration):
    """max |T - T64| / tol of the backend called directly (no routing), T64 from
    this file's transcription."""
    m, n = C.shape[1:]
    tp, ip = torch.zeros(1, m, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool)
    fn = _registry.resolve("ipot", backend, torch.device(device), torch.float32)
    T = fn(C.to(device), tp.to(device), ip.to(device), 1.0, iteration, 1).cpu().double()
    T64 = ipot64(C, tp, ip, 1.0, iteration)
    err = (T - T64).abs().max().item() if torch.isfinite(T).all() else float("inf")
    return err / plan_tol(tp, ip, iteration)


@pytest.mark.parametrize("backend,device", params(FLOAT32_KERNELS))
def test_float32_kernels_match_float64_inside_their_range(backend, device):
    """Costs spanning exactly IPOT_FAST_MAX_COST_OVER_BETA · beta, at 50 and at
    IPOT_FAST_MAX_ITERATIONS iterations, handed to the kernel itself: every one
    matches float64 (the range the ops give the kernels is one they compute)."""
    worst = 0.0
    for family in RANGE.FAMILIES:
        for m, n in RANGE.SHAPES:
            for seed in range(4 if (m, n) == (60, 100) else 12):
                C = adversarial(family, m, n, IPOT_FAST_MAX_COST_OVER_BETA, seed)
                for iteration in (ITERATION, IPOT_FAST_MAX_ITERATIONS):
                    err = _kernel_error(backend, device, C, iteration)
                    assert err <= 1, f"{backend} {family} {m}x{n} seed {seed} it={iteration}: {err}"
                    worst = max(worst, err)
    print(backend, device, "worst plan error / tolerance:", worst)


@pytest.mark.skipif(("cpp", "cpu") not in IPOT_BACKENDS, reason="C++ extension unavailable")
def test_beyond_their_range_float32_kernels_lose_entries_and_the_op_does_not():
    """Why the ops route: a tied cost spanning 8 · beta (50 iterations) and a
    degenerate one spanning 5 · beta at 150 iterations, where the C++ kernel
    (it flushes subnormals) loses plan entries for good, by thousands of
    tolerances; ``ops.ipot`` on the same backend matches float64."""
    for C, iteration in ((adversarial("binary", 5, 7, 8.0, 52), ITERATION),
                         (adversarial("perm", 37, 13, 5.0, 0), 150)):
        assert _kernel_error("cpp", "cpu", C, iteration) > 100
        tp = torch.zeros(1, C.size(1), dtype=torch.bool)
        ip = torch.zeros(1, C.size(2), dtype=torch.bool)
        assert not goes_to_kernel(C, tp, ip, 1.0, iteration)
        T = ops.ipot(C, tp, ip, 1.0, iteration, backend="cpp")
        torch.testing.assert_close(T.double(), ipot64(C, tp, ip, 1.0, iteration),
                                   atol=1e-7 / C.size(1), rtol=0)


# ----------------------------------------------------------------- WRA from the embeddings

def wra64(x, y, tp, ip, beta):
    """float64: cosine cost (padded entries 0), the log-domain plan, trace; the
    gradient flows through the cost only (the plan is a constant)."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    cst = (1 - xn @ yn.transpose(1, 2)).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    T = ipot64(cst.detach(), tp, ip, beta)
    return (cst * T.transpose(1, 2)).sum((1, 2))


@pytest.mark.parametrize("backend,device", params(WRA_BACKENDS))
def test_wra_beta_sweep_against_float64(backend, device):
    B, M, N, D = (3, 5, 7, 5) if (backend, device) == INTERPRETED else (4, 9, 13, 5)
    g = torch.Generator().manual_seed(7)   # D = 5: cosines over much of [-1, 1]
    x = torch.randn(B, M, D, generator=g)
    y = torch.randn(B, N, D, generator=g)
    tp = torch.arange(M)[None] >= torch.tensor([M, 1, 0, 6][:B])[:, None]
    ip = torch.arange(N)[None] >= torch.tensor([N, N, 4, 1][:B])[:, None]
    tpd, ipd = tp.to(device), ip.to(device)
    for beta in BETAS + (WRA_FAST_MIN_BETA,):
        xg, yg = x.to(device).requires_grad_(), y.to(device).requires_grad_()
        x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
        d64 = wra64(x64, y64, tp, ip, beta)
        d = ops.optimal_transport_dist(xg, yg, tpd, ipd, beta, backend=backend)
        assert torch.isfinite(d).all(), (backend, beta)
        # |C| <= 2 over <= M N entries; the cost rounds in float32 (1e-6)
        tol = plan_tol(tp, ip) * M * N * 2 + 1e-6
        torch.testing.assert_close(d.detach().cpu().double(), d64.detach(), atol=tol,
                                   rtol=DIST_RTOL, msg=lambda m: f"{backend} beta={beta:g}: {m}")
        w = torch.linspace(0.5, 1.5, B)
        gx, gy = torch.autograd.grad((d * w.to(device)).sum(), (xg, yg))
        d, gx, gy = d.cpu(), gx.cpu(), gy.cpu()
        gx64, gy64 = torch.autograd.grad((d64 * w.double()).sum(), (x64, y64))
        for got, want in ((gx, gx64), (gy, gy64)):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-4,
                                       msg=lambda m: f"{backend} beta={beta:g} gradient: {m}")
        assert d[2] == 0 and not gx[2].any() and not gy[2].any()   # empty text side
