"""The WRA op (ops.optimal_transport_dist, from the embeddings) on every
backend this machine runs, against an independent float64 transcription
(cosine cost written out, IPOT from tests/oracle.py, distance = trace(C·T),
gradient through the cost with the plan fixed)."""
import numpy as np
import pytest
import torch
from oracle import ipot_np

from uniter_fast import _ext, ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ops.available_backends("optimal_transport_dist", DEV)
try:
    CPU_ISAS = _ext.cpu_module().cpu_isas()
except _ext.ExtensionUnavailableError:
    CPU_ISAS = []


def independent(x, y, tp, ip, w, beta=0.5, iteration=50, k=1, eps=1e-5):
    """(distances, d/dx, d/dy) of sum(w · dist) in float64."""
    x = x.detach().double().requires_grad_()
    y = y.detach().double().requires_grad_()
    nx, ny = x.norm(dim=-1).clamp_min(eps), y.norm(dim=-1).clamp_min(eps)
    C = 1 - torch.einsum("bmd,bnd->bmn", x, y) / (nx[:, :, None] * ny[:, None, :])
    C = C.masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    T = torch.from_numpy(np.stack([ipot_np(C[b].detach().numpy(), tp[b].numpy(), ip[b].numpy(),
                                           beta, iteration, k) for b in range(C.size(0))]))
    d = (C * T.transpose(1, 2)).sum((1, 2))
    gx, gy = torch.autograd.grad((d * w.double()).sum(), (x, y))
    return d.detach(), gx, gy


def case(seed, B=6, M=13, N=21, D=37, dtype=torch.float32, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, D, generator=g)
    y = torch.randn(B, N, D, generator=g) * 0.3 + 0.2
    x[0, min(2, M - 1)] = 0                # a zero row: divided by eps
    if noncontig:                          # slices of one [text | image] tensor, as in the model
        ctx = torch.randn(B, M + N + 3, D, generator=g)
        ctx[:, :M], ctx[:, M:M + N] = x, y
        x, y = ctx[:, :M], ctx[:, M:M + N]
    tl = torch.tensor([M, 1, 0, 5, M, 9]).clamp(max=M)[:B]
    il = torch.tensor([N, 4, 7, 0, 1, 12]).clamp(max=N)[:B]
    tp = torch.arange(M)[None] >= tl[:, None]
    ip = torch.arange(N)[None] >= il[:, None]
    if B > 4:                                                      # holes, not a suffix
        tp[4] = torch.rand(M, generator=g) < 0.4
        ip[4] = torch.rand(N, generator=g) < 0.4
    w = torch.rand(B, generator=g) + 0.5
    return x.to(dtype), y.to(dtype), tp, ip, w


def run(backend, x, y, tp, ip, w, **kw):
    xs = x.detach().to(DEV).requires_grad_()
    ys = y.detach().to(DEV).requires_grad_()
    d = ops.optimal_transport_dist(xs, ys, tp.to(DEV), ip.to(DEV), backend=backend, **kw)
    gx, gy = torch.autograd.grad((d * w.to(DEV)).sum(), (xs, ys))
    return d.detach().cpu(), gx.cpu(), gy.cpu()


def check(got, expect, what):
    d, gx, gy = got
    de, gxe, gye = expect
    assert d.dtype == torch.float32 and not torch.isnan(d).any(), what
    torch.testing.assert_close(d.double(), de, rtol=1e-5, atol=1e-6, msg=what)
    scale = max(gxe.abs().max().item(), gye.abs().max().item(), 1.0)
    torch.testing.assert_close(gx.double(), gxe, rtol=1e-4, atol=1e-6 * scale, msg=what)
    torch.testing.assert_close(gy.double(), gye, rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noncontig", [False, True])
def test_matches_the_float64_transcription(backend, noncontig):
    x, y, tp, ip, w = case(1, noncontig=noncontig)
    got = run(backend, x, y, tp, ip, w)
    check(got, independent(x, y, tp, ip, w), f"{backend} noncontig={noncontig}")
    d, gx, gy = got
    assert d[2] == 0 and d[3] == 0                                  # an empty side
    assert gx[2].abs().sum() == 0 and gy[3].abs().sum() == 0
    assert (gx[1, 1:] == 0).all() and (gy[1, 4:] == 0).all()      # padded rows: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_sizes_and_parameters(backend):
    # D not a multiple of any vector width, one example, k > 1, few iterations
    x, y, tp, ip, w = case(2, B=3, M=7, N=5, D=19)
    check(run(backend, x, y, tp, ip, w, beta=0.3, iteration=7, k=2),
          independent(x, y, tp, ip, w, beta=0.3, iteration=7, k=2), backend)
    x, y, tp, ip, w = case(3, B=1, M=1, N=1, D=1)
    check(run(backend, x, y, tp, ip, w), independent(x, y, tp, ip, w), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_embeddings_run_in_float32(backend):
    for dtype in (torch.float16, torch.bfloat16):
        x, y, tp, ip, w = case(4, dtype=dtype)
        xs = x.to(DEV).requires_grad_()
        d = ops.optimal_transport_dist(xs, y.to(DEV), tp.to(DEV), ip.to(DEV), backend=backend)
        assert d.dtype == torch.float32
        de = independent(x.float(), y.float(), tp, ip, w)[0]
        torch.testing.assert_close(d.detach().cpu().double(), de, rtol=1e-5, atol=1e-6)
        (gx,) = torch.autograd.grad(d.sum(), (xs,))
        assert gx.dtype == dtype and torch.isfinite(gx).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gradient_and_with_one_side_only(backend):
    x, y, tp, ip, w = case(5)
    full = run(backend, x, y, tp, ip, w)
    with torch.no_grad():
        d = ops.optimal_transport_dist(x.to(DEV), y.to(DEV), tp.to(DEV), ip.to(DEV),
                                       backend=backend)
    assert torch.equal(d.cpu(), full[0]) and not d.requires_grad
    xs = x.to(DEV).requires_grad_()
    d = ops.optimal_transport_dist(xs, y.to(DEV), tp.to(DEV), ip.to(DEV), backend=backend)
    (gx,) = torch.autograd.grad((d * w.to(DEV)).sum(), (xs,))
    torch.testing.assert_close(gx.cpu(), full[1])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension without the WRA kernel")
@pytest.mark.parametrize("isa", CPU_ISAS or ["none"])
def test_cpp_kernel_on_every_instruction_set(isa):
    mod = _ext.cpu_module()
    mod.set_cpu_isa(isa)
    try:
        for seed in (6, 7):
            x, y, tp, ip, w = case(seed, B=5, M=31, N=45, D=64 + 13)
            check(run("cpp", x, y, tp, ip, w), independent(x, y, tp, ip, w), f"cpp[{isa}]")
    finally:
        mod.set_cpu_isa("auto")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension without the WRA kernel")
def test_cpp_is_what_auto_runs_on_cpu_and_never_reads_padded_rows():
    assert ops.selected_backend("optimal_transport_dist", None, "cpu") == "cpp"
    x, y, tp, ip, w = case(8)
    x = x.masked_fill(tp[:, :, None], float("nan"))      # padded rows are never read
    y = y.masked_fill(ip[:, :, None], float("inf"))
    d, gx, gy = run("cpp", x, y, tp, ip, w)
    assert torch.isfinite(d).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    xe, ye = x.masked_fill(tp[:, :, None], 0), y.masked_fill(ip[:, :, None], 0)
    check((d, gx, gy), independent(xe, ye, tp, ip, w), "cpp with non-finite padding")


def test_contract_errors():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    tp, ip = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="batch size mismatch"):
        ops.optimal_transport_dist(x, torch.randn(3, 4, 8), tp, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="txt_pad shape"):
        ops.optimal_transport_dist(x, y, ip, ip)
    with pytest.raises(ValueError, match="padding mask"):
        ops.optimal_transport_dist(x, y, tp.float(), ip)
    with pytest.raises(ValueError, match="beta"):
        ops.optimal_transport_dist(x, y, tp, ip, beta=0)
    with pytest.raises(ValueError, match="iteration"):
        ops.optimal_transport_dist(x, y, tp, ip, iteration=0)
    with pytest.raises(ValueError, match="required"):
        ops.optimal_transport_dist(x, y, None, ip)
