"""Masked self-attention benchmarks: every registered backend (and
FlexAttention with a key-padding block mask on CUDA) against the reference
and against torch SDPA, forward and forward+backward.

CUDA: bf16, B=128, H=12, D=64, lengths drawn from 96..170 (padded to 170),
plus sweeps over batch size and sequence length.  CPU: fp32, smaller shapes.
Inputs are random everywhere, padded positions included.
"""
import functools

import benchutil as bu
import pytest
import torch

from uniter_fast import ops
from uniter_fast import reference as ref

OP = "attention"
MODES = ("fwd", "fwd+bwd")

if bu.SMOKE:
    DTYPE, H, D = torch.float32, 2, 8
    MAIN = (2, 3, 7)                  # (B, shortest, longest)
    BATCH_SWEEP, SEQ_SWEEP = (), ()
elif bu.ON_CUDA:
    DTYPE, H, D = torch.bfloat16, 12, 64
    MAIN = (128, 96, 170)
    BATCH_SWEEP = (32, 64, 256)       # with MAIN's lengths
    SEQ_SWEEP = (64, 128, 256, 512)   # longest; shortest = 0.56 x longest, B as MAIN
else:
    DTYPE, H, D = torch.float32, 12, 64
    MAIN = (8, 27, 48)
    BATCH_SWEEP = (2, 4, 16)
    SEQ_SWEEP = (24, 96, 192)


def _cases():
    """(case, headline, sweep): case = (B, shortest, longest); sweep maps a
    sweep name to this case's x value on that sweep's plot."""
    b0, lo0, hi0 = MAIN
    cases = [pytest.param((b0, lo0, hi0), True, {"batch": b0, "seq": hi0},
                          id=f"main-B{b0}-L{lo0}-{hi0}")]
    cases += [pytest.param((b, lo0, hi0), False, {"batch": b}, id=f"sweep-B{b}-L{lo0}-{hi0}")
              for b in BATCH_SWEEP]
    for hi in SEQ_SWEEP:
        lo = max(1, round(hi * lo0 / hi0))
        cases.append(pytest.param((b0, lo, hi), False, {"seq": hi}, id=f"sweep-B{b0}-L{lo}-{hi}"))
    return cases


BACKENDS = list(bu.registered(OP)) + ["flex"]


@functools.lru_cache(maxsize=None)
def inputs(b: int, lo: int, hi: int):
    g = torch.Generator().manual_seed(b * 1000 + hi)
    lens = bu.lengths(b, lo, hi, g)
    q, k, v, do = (torch.randn(b, H, hi, D, generator=g) for _ in range(4))
    mask = bu.pad_mask(lens, hi, padded=False).long()
    dev = bu.DEVICE
    return (q.to(dev, DTYPE), k.to(dev, DTYPE), v.to(dev, DTYPE), mask.to(dev),
            do.to(dev, DTYPE), lens)


@functools.lru_cache(maxsize=None)
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _flex_fn(mask):
    """FlexAttention with a key-padding block mask built once per batch (as a
    model would, shared by all layers); building it is not timed."""
    flex, create_block_mask = _flex()
    valid = mask.bool()

    def key_padding(b, h, q_idx, kv_idx):
        return valid[b, kv_idx]

    b, s = mask.shape
    block_mask = create_block_mask(key_padding, b, None, s, s, device=mask.device)

    def fn(q, k, v, _mask, dropout_p=0.0, scale=None):
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    return fn


def _skip(backend, case, mode):
    if backend == "flex":
        if not bu.ON_CUDA:
            return "flex: benchmarked on CUDA only (compiled kernels)"
        if case != MAIN:
            return "flex: main shape only (one compilation per shape)"
        if not bu.WITH_COMPILE:
            return "torch.compile baselines disabled (UNITER_FAST_BENCH_COMPILE=0)"
        try:
            _flex()
        except Exception as e:  # an older torch without FlexAttention
            return f"flex unavailable: {type(e).__name__}: {e}"
        return None
    return bu.skip_reason(OP, backend, bu.DEVICE, DTYPE)


def _callable(backend, mask):
    if backend == "flex":
        return _flex_fn(mask)
    return functools.partial(ops.attention, backend=backend)


def _step(fn, q, k, v, mask, do, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, mask)
        return run
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves, mask)
        out.backward(do)
        return out
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case,headline,sweep", _cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(benchmark, collector, backend, case, headline, sweep, mode):
    reason = _skip(backend, case, mode)
    if reason:
        pytest.skip(reason)
    b, lo, hi = case
    q, k, v, mask, do, lens = inputs(*case)
    benchmark.group = (f"attention {mode} B={b} H={H} D={D} L={lo}..{hi} "
                       f"{str(DTYPE).replace('torch.', '')} {bu.DEVICE.type}")
    fn = _callable(backend, mask)
    # the fast path must agree with the reference on real query rows first
    with torch.no_grad():
        want = ref.attention(q.float(), k.float(), v.float(), mask)
        got = fn(q, k, v, mask).float()
    real = mask.bool()[:, None, :, None].expand_as(want)
    tol = 2e-2 if DTYPE in (torch.bfloat16, torch.float16) else 1e-4
    torch.testing.assert_close(got[real], want[real], rtol=tol, atol=tol)

    baselines = {}
    if backend != "reference":
        baselines["reference"] = _step(_callable("reference", mask), q, k, v, mask, do, mode)
    if backend not in ("reference", "sdpa") and not bu.skip_reason(OP, "sdpa", bu.DEVICE, DTYPE):
        baselines["sdpa"] = _step(_callable("sdpa", mask), q, k, v, mask, do, mode)
    fast = _step(fn, q, k, v, mask, do, mode)
    timing = bu.measure(benchmark, fast, baselines, warmup=3 if backend == "flex" else None)

    elt = torch.finfo(DTYPE).bits // 8
    n = b * H * hi * D
    tensors = 4 if mode == "fwd" else 12   # q,k,v,o | + bwd: q,k,v,o,dO in, dq,dk,dv out
    fwd_flops = 4.0 * b * H * hi * hi * D  # QK^T and PV on the padded length
    rec = bu.make_record(
        op=OP, group=benchmark.group, mode=mode, backend=backend, dtype=DTYPE,
        shape={"B": b, "H": H, "D": D, "S": hi, "len_min": lo, "len_max": hi,
               "real_tokens": int(sum(lens))},
        timing=timing, headline=headline, sweep=sweep,
        bytes_moved=tensors * n * elt + mask.numel() * mask.element_size(),
        flops=fwd_flops * (1.0 if mode == "fwd" else 3.5),
        peak_mem_bytes=bu.cuda_peak_bytes(fast) if mode == "fwd+bwd" else None,
        notes="flex: block mask built once per batch, not timed" if backend == "flex" else None)
    bu.attach(benchmark, rec)
    collector.add(rec)

