"""Layer norm and GELU: every registered backend against the reference, at
the shapes of UNITER's encoder (tokens x 768 for layer norm, tokens x 3072
for GELU), forward and forward+backward."""
import functools

import benchutil as bu
import pytest
import torch

from uniter_fast import ops

MODES = ("fwd", "fwd+bwd")
if bu.SMOKE:
    DTYPE, ROWS, HIDDEN, INTER = torch.float32, 5, 16, 24
elif bu.ON_CUDA:
    DTYPE, ROWS, HIDDEN, INTER = torch.bfloat16, 128 * 140, 768, 3072
else:
    DTYPE, ROWS, HIDDEN, INTER = torch.float32, 8 * 64, 768, 3072

OPS = {
    # op: (width, call(x, params, backend))
    "layer_norm": (HIDDEN, lambda x, p, be: ops.layer_norm(x, p[0], p[1], 1e-12, backend=be)),
    "gelu": (INTER, lambda x, p, be: ops.gelu(x, backend=be)),
}
CASES = [(op, be) for op in OPS for be in bu.registered(op)]


@functools.lru_cache(maxsize=None)
def inputs(op):
    width = OPS[op][0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, width, generator=g) * 2 + 0.5
    w = 1 + 0.1 * torch.randn(width, generator=g)
    b = 0.1 * torch.randn(width, generator=g)
    dy = torch.randn(ROWS, width, generator=g)
    return tuple(t.to(bu.DEVICE, DTYPE) for t in (x, w, b, dy))


def _step(op, backend, mode):
    x, w, b, dy = inputs(op)
    call = OPS[op][1]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call(x, (w, b), backend)
        return run
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]

    def run():
        for t in leaves:
            t.grad = None
        y = call(leaves[0], leaves[1:], backend)
        y.backward(dy)
        return y
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op,backend", CASES)
def test_pointwise(benchmark, collector, op, backend, mode):
    reason = bu.skip_reason(op, backend, bu.DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    x, w, b, dy = inputs(op)
    benchmark.group = f"{op} {mode} {ROWS}x{OPS[op][0]} {str(DTYPE).replace('torch.', '')} " \
                      f"{bu.DEVICE.type}"
    with torch.no_grad():
        want = OPS[op][1](x.float(), (w.float(), b.float()), "reference")
        got = OPS[op][1](x, (w, b), backend).float()
    tol = 3e-2 if DTYPE in (torch.bfloat16, torch.float16) else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    fast = _step(op, backend, mode)
    baselines = {} if backend == "reference" else {"reference": _step(op, "reference", mode)}
    timing = bu.measure(benchmark, fast, baselines)
    elt = torch.finfo(DTYPE).bits // 8
    n = x.numel()
    # floor: fwd reads x, writes y; bwd reads x and dy, writes dx
    rec = bu.make_record(
        op=op, group=benchmark.group, mode=mode, backend=backend, dtype=DTYPE,
        shape={"rows": ROWS, "width": OPS[op][0]}, timing=timing, headline=True,
        bytes_moved=(2 if mode == "fwd" else 5) * n * elt)
    bu.attach(benchmark, rec)
    collector.add(rec)
