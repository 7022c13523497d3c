"""IPOT and the WRA distance across beta in [1e-3, 10] and cost offsets, on
every available backend, against a float64 transcription (issue #13, item 5).

The transcription (``ipot64``) runs UNITER's IPOT updates in the log domain in
float64, on each example's real block:

    log Q = -C/beta + log T
    log delta_j = -log n - logsumexp_i(log Q_ij + log sigma_i)
    log sigma_i = -log m - logsumexp_j(log Q_ij + log delta_j)
    log T = log delta_j + log Q + log sigma_i

Every IPOT update is a product or a ratio of positive numbers, so these are the
same updates term by term, with no shift of the cost: logsumexp evaluates each
sum of exponentials without under- or overflow, whatever beta or the offset
(exp(-1000/1e-3) is far outside even float64's range).  At beta >= 0.5 it is
checked against the plain float64 updates (``ipot64_direct``).

The ops must, for each beta and cost, either give finite results that match
it, or raise a ValueError naming beta: "too small" only where the cost's range
over a real block exceeds IPOT_MAX_COST_OVER_BETA · beta (the op's shifts never
widen that range, so a rejection below it is a bug); costs designed to span 2
after any shift must be rejected at beta < 2 / 80.

What float32 can compute.  The plan after t iterations is T ∝ A^t u vᵀ, and an
entry whose exact value dips below float32's range (2^-126; the C++ kernel
flushes subnormals) in some iteration is 0 from then on (Q = A ⊙ T), while the
exact iteration may bring it back.  ``ipot64`` tracks this on the exact
trajectory: a case is float32-representable when no entry of Q, δ ⊙ Q or T
that has dipped below 2^-126 · e^3 later exceeds 1e-9.  Every case must match,
except that one that is not representable may differ from the exact plan (a
limit of float32 IPOT at large span / beta, every backend alike; the test
counts them); even then it must not return NaN: it gives a finite plan or
raises the op's "non-finite result" ValueError.

Tolerances (plans lie in [0, 1/m]).  The kernels round C/beta in float32, a
relative 2^-24 of an exponent r = |C|/beta of at most 24 for a cost the op
passes as is, 80 for one it shifts (the op's limit), and the t = 50 iterations raise A to the t-th
power (T ∝ A^t u vᵀ): a relative plan error of about t · r · 2^-24, so the
tolerance is 1/m · (1e-6 + 2 · t · r · 2^-24), r of the cost the kernel sees.
"""
import math

import pytest
import torch

import uniter_fast.ops as ops
from uniter_fast.constants import IPOT_MAX_COST_OVER_BETA, IPOT_ROW_SHIFT_SLACK, WRA_MIN_BETA

BETAS = (1e-3, 3e-3, 0.01, 0.02, 0.1, 0.5, 1.0, 10.0)
OFFSETS = (0.0, 43.0, 1000.0, -7.0)
ITERATION = 50
DIST_RTOL = 1e-5       # of sum |C| T: float32 sums of up to a few hundred terms
LOG_FLOOR = math.log(2.0 ** -126) + 3     # float32's smallest normal, with a margin
LOG_MATTERS = math.log(1e-9)              # below every plan tolerance here

GPU = torch.cuda.is_available()
# (backend, device): every backend on the CPU (Triton under the interpreter), and on a GPU
IPOT_BACKENDS = [(b, "cpu") for b in ops.available_backends("ipot", "cpu")] + (
    [(b, "cuda") for b in ops.available_backends("ipot", "cuda")] if GPU else [])
WRA_BACKENDS = [(b, "cpu") for b in ops.available_backends("optimal_transport_dist", "cpu")] + (
    [(b, "cuda") for b in ops.available_backends("optimal_transport_dist", "cuda")] if GPU else [])
INTERPRETED = ("triton", "cpu")


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


def ipot64(C, tp, ip, beta, iteration=ITERATION, k=1, with_lost=False):
    """UNITER's IPOT in the log domain, float64: plan [B, N, M] (0 off the real
    block and for an empty example); with_lost: also whether an entry that
    float32 would have lost (below LOG_FLOOR) comes back above LOG_MATTERS."""
    B, M, N = C.shape
    out = torch.zeros(B, N, M, dtype=torch.float64)
    lost = False
    for b in range(B):
        rows, cols = _block(tp, ip, b)
        m, n = len(rows), len(cols)
        if m == 0 or n == 0:
            continue
        la = -C[b].double()[rows][:, cols] / beta                   # log A, [m, n]
        lt = torch.zeros(m, n, dtype=torch.float64)                 # log T0 = log 1
        ls = torch.full((m,), -math.log(m), dtype=torch.float64)    # log sigma0 = log 1/m
        dipped = torch.zeros(m, n, dtype=torch.bool)
        for _ in range(iteration):
            lq = la + lt
            for _ in range(k):
                ld = -math.log(n) - torch.logsumexp(lq + ls[:, None], 0)
                ls = -math.log(m) - torch.logsumexp(lq + ld[None, :], 1)
            lt = ls[:, None] + lq + ld[None, :]
            lost = lost or bool((dipped & (lt > LOG_MATTERS)).any())
            dipped |= (lq < LOG_FLOOR) | (lq + ld[None, :] < LOG_FLOOR) | (lt < LOG_FLOOR)
        out[b][cols[:, None], rows[None, :]] = lt.exp().t()
    return (out, lost) if with_lost else out


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


def real_range(C, tp, ip):
    """Largest (max - min) of C over one example's real block."""
    worst = 0.0
    for b in range(C.size(0)):
        rows, cols = _block(tp, ip, b)
        if len(rows) and len(cols):
            blk = C[b].double()[rows][:, cols]
            worst = max(worst, (blk.max() - blk.min()).item())
    return worst


def kernel_ratio(C, tp, ip, beta):
    """Largest |C|/beta of the cost the kernel sees: C itself when its real
    entries lie in [0, 24 beta], else a shifted cost within [0, 80 beta]."""
    real = C.double().masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    if real.min() >= 0 and real.max() <= IPOT_ROW_SHIFT_SLACK * beta:
        return real.max().item() / beta
    return IPOT_MAX_COST_OVER_BETA


def plan_tol(C, tp, ip, beta, iteration=ITERATION):
    m = min([m for m, n in lengths(tp, ip) if m and n] or [1])
    return (1e-6 + 2 * iteration * kernel_ratio(C, tp, ip, beta) * 2.0 ** -24) / m


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
    elif family == "narrow":          # span 0.05: computable down to beta = 1e-3
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


def run_or_reject(fn, C, tp, ip, beta, lost):
    """fn()'s result, or None when it raised the small-beta ValueError (allowed
    only where the real range exceeds the limit) or, where float32 loses plan
    entries (``lost``), the non-finite-result one."""
    try:
        return fn()
    except ValueError as e:
        assert f"beta={beta:g}" in str(e), str(e)
        if lost and "non-finite result" in str(e):
            return None
        assert "too small" in str(e), str(e)
        rng = real_range(C, tp, ip)
        assert rng > IPOT_MAX_COST_OVER_BETA * beta, \
            f"rejected beta={beta:g} although the cost's real range is only {rng}"
        return None


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


def _sweep_backend(backend, device, shapes=SHAPES, offsets=OFFSETS, betas=BETAS):
    checked = rejected = unrepresentable = 0
    for i, (shape, family, offset) in enumerate(CASES):
        if shape not in shapes or offset not in offsets:
            continue
        C, tp, ip = cost(shape, family, offset, 100 + i)
        real = C.double().masked_fill(tp[:, :, None] | ip[:, None, :], 0)
        for beta in betas:
            what = f"{backend}/{device} {shape}/{family}{offset:+g} beta={beta:g}"
            T64, lost = ipot64(C, tp, ip, beta, with_lost=True)
            Cd, tpd, ipd = C.to(device), tp.to(device), ip.to(device)
            T = run_or_reject(lambda: ops.ipot(Cd, tpd, ipd, beta, ITERATION, backend=backend),
                              C, tp, ip, beta, lost)
            if T is None:
                rejected += 1
                continue
            T = T.cpu()
            assert T.dtype == torch.float32 and torch.isfinite(T).all(), what
            tol = plan_tol(C, tp, ip, beta)
            err = (T.double() - T64).abs().max().item()
            if lost and err > tol:
                unrepresentable += 1
                continue
            assert err <= tol, f"{what}: plan err {err} > {tol}"

            Cg = Cd.clone().requires_grad_()
            d = ops.ipot_distance(Cg, tpd, ipd, beta, ITERATION, backend=backend)
            d64 = (real * T64.transpose(1, 2)).sum((1, 2))
            scale = (real.abs() * T64.transpose(1, 2)).sum((1, 2))
            bound = DIST_RTOL * scale + tol * real.abs().sum((1, 2)) + 1e-7
            assert torch.isfinite(d).all() and torch.all((d.double() - d64).abs() <= bound), \
                (what, d, d64)
            w = torch.linspace(0.5, 1.5, C.size(0))
            (grad,) = torch.autograd.grad((d * w.to(device)).sum(), Cg)
            d, grad = d.cpu(), grad.cpu()
            gerr = (grad.double() - w[:, None, None].double() * T64.transpose(1, 2)).abs().max()
            assert torch.isfinite(grad).all() and gerr <= 1.5 * tol, f"{what}: grad err {gerr}"
            for b, (m, n) in enumerate(lengths(tp, ip)):   # empty examples: exactly 0
                if m == 0 or n == 0:
                    assert d[b] == 0 and not T[b].any() and not grad[b].any(), what
            checked += 1
    return checked, rejected, unrepresentable


@pytest.mark.parametrize("backend,device", [b for b in IPOT_BACKENDS if b != INTERPRETED])
def test_ipot_beta_sweep_against_float64(backend, device):
    counts = _sweep_backend(backend, device)
    print(backend, device, "checked / rejected / not float32-representable:", counts)
    # beta = 1e-3 is computed for the narrow costs (every offset, row offsets
    # included); the cosine-range costs are rejected below beta = 2/80
    assert counts[0] >= 150 and counts[1] >= 20, counts


@pytest.mark.skipif(INTERPRETED not in IPOT_BACKENDS, reason="Triton interpreter unavailable")
def test_ipot_beta_sweep_against_float64_triton_interpreter():
    # the interpreter is slow: the small shape, two offsets, four betas
    counts = _sweep_backend("triton", "cpu", shapes=("small",), offsets=(43.0, -7.0),
                            betas=(1e-3, 0.02, 0.5, 10.0))
    print("triton checked / rejected / not float32-representable:", counts)
    assert counts[0] >= 12 and counts[1] >= 3, counts


@pytest.mark.parametrize("backend,device", IPOT_BACKENDS)
def test_uncomputable_beta_is_rejected_with_the_reason(backend, device):
    # after any shift this cost still spans 2: float32 needs beta >= 2 / 80
    C = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]], device=device) + 43
    tp = ip = torch.zeros(1, 2, dtype=torch.bool, device=device)
    for beta in (1e-3, 0.01, 0.02):
        with pytest.raises(ValueError, match=rf"beta={beta:g} is too small.*span 2\b.*"
                                             rf"<= {IPOT_MAX_COST_OVER_BETA:g}.*beta >= 0.025"):
            ops.ipot(C, tp, ip, beta, backend=backend)
        with pytest.raises(ValueError, match=f"beta={beta:g}"):
            ops.ipot_distance(C, tp, ip, beta, backend=backend)
    T = ops.ipot(C, tp, ip, 0.025, backend=backend)     # at the limit: computed
    torch.testing.assert_close(T.cpu().double(), ipot64(C.cpu(), tp.cpu(), ip.cpu(), 0.025),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------- WRA from the embeddings

def wra64(x, y, tp, ip, beta):
    """float64: cosine cost (padded entries 0), the log-domain plan, trace; the
    gradient flows through the cost only (the plan is a constant)."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    cst = (1 - xn @ yn.transpose(1, 2)).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    T, lost = ipot64(cst.detach(), tp, ip, beta, with_lost=True)
    return (cst * T.transpose(1, 2)).sum((1, 2)), lost, cst.detach()


@pytest.mark.parametrize("backend,device", WRA_BACKENDS)
def test_wra_beta_sweep_against_float64(backend, device):
    B, M, N, D = (3, 5, 7, 5) if (backend, device) == INTERPRETED else (4, 9, 13, 5)
    g = torch.Generator().manual_seed(7)   # D = 5: cosines over much of [-1, 1]
    x = torch.randn(B, M, D, generator=g)
    y = torch.randn(B, N, D, generator=g)
    tp = torch.arange(M)[None] >= torch.tensor([M, 1, 0, 6][:B])[:, None]
    ip = torch.arange(N)[None] >= torch.tensor([N, N, 4, 1][:B])[:, None]
    checked = 0
    tpd, ipd = tp.to(device), ip.to(device)
    for beta in BETAS + (WRA_MIN_BETA,):
        xg, yg = x.to(device).requires_grad_(), y.to(device).requires_grad_()
        if beta < WRA_MIN_BETA:
            with pytest.raises(ValueError, match=rf"beta={beta:g} is below .*{WRA_MIN_BETA:g}"):
                ops.optimal_transport_dist(xg, yg, tpd, ipd, beta, backend=backend)
            continue
        x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
        d64, lost, cst = wra64(x64, y64, tp, ip, beta)
        try:
            d = ops.optimal_transport_dist(xg, yg, tpd, ipd, beta, backend=backend)
        except ValueError as e:
            assert lost and "non-finite result" in str(e), str(e)
            continue
        assert torch.isfinite(d).all(), (backend, beta)
        tol = plan_tol(cst, tp, ip, beta) * M * N * 2 + 1e-6   # |C| <= 2 over <= M N entries
        got = d.detach().cpu().double()
        if lost and not torch.allclose(got, d64.detach(), atol=tol, rtol=DIST_RTOL):
            continue      # not float32-representable (module docstring): may differ
        torch.testing.assert_close(got, d64.detach(), atol=tol, rtol=DIST_RTOL,
                                   msg=lambda m: f"{backend} beta={beta:g}: {m}")
        w = torch.linspace(0.5, 1.5, B)
        gx, gy = torch.autograd.grad((d * w.to(device)).sum(), (xg, yg))
        d, gx, gy = d.cpu(), gx.cpu(), gy.cpu()
        gx64, gy64 = torch.autograd.grad((d64 * w.double()).sum(), (x64, y64))
        for got, want in ((gx, gx64), (gy, gy64)):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-4,
                                       msg=lambda m: f"{backend} beta={beta:g} gradient: {m}")
        assert d[2] == 0 and not gx[2].any() and not gy[2].any()   # empty text side
        checked += 1
    assert checked >= 4, checked
