"""IPOT (WRA transport plan) benchmarks: every registered backend against the
reference, at UNITER's shapes (B in {32, 256, 1024}, 60 text x 100 regions,
50 iterations, k=1), cost from random embeddings with random padding.

On CUDA the reference is also timed captured in a CUDA graph and compiled
with torch.compile, as stronger baselines of plain PyTorch.

``test_ipot_distance`` times what the WRA loss needs from a cost: the plan and
trace(C·T) (``ops.ipot_distance``, with its gradient path armed), against the
reference twin and against "original": UNITER's own op sequence, i.e. the same
IPOT loop followed by the full B×M×M product C·T and the trace taken through
an identity mask, as the original ``optimal_transport_dist`` computes it.
"""
import functools

import benchutil as bu
import pytest
import torch

from uniter_fast import ops
from uniter_fast import reference as ref

OP = "ipot"
M_TXT, N_IMG, ITERS, BETA, K = (7, 9, 5, 0.5, 1) if bu.SMOKE else (60, 100, 50, 0.5, 1)
BATCHES = (3,) if bu.SMOKE else (32, 256, 1024)
EXTRA = ("reference+cudagraph", "reference+compile")
BACKENDS = list(bu.registered(OP)) + list(EXTRA)


@functools.lru_cache(maxsize=None)
def inputs(b: int):
    g = torch.Generator().manual_seed(1000 + b)
    tl = bu.lengths(b, max(1, M_TXT // 3), M_TXT, g)
    il = bu.lengths(b, max(1, N_IMG // 10), N_IMG, g)
    txt_pad = bu.pad_mask(tl, M_TXT, padded=True)
    img_pad = bu.pad_mask(il, N_IMG, padded=True)
    txt = torch.randn(b, M_TXT, 64, generator=g)
    img = torch.randn(b, N_IMG, 64, generator=g)
    cost = ref.cost_matrix_cosine(txt, img)
    cost = cost.masked_fill(txt_pad.bool()[:, :, None] | img_pad.bool()[:, None, :], 0)
    assert cost.abs().sum() > 0
    return tuple(t.to(bu.DEVICE) for t in (cost, txt_pad, img_pad))


def _reference_call(cost, txt_pad, img_pad):
    return lambda: ops.ipot(cost, txt_pad, img_pad, BETA, ITERS, K, backend="reference")


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    # dynamic=True: one compilation serves all batch sizes
    return torch.compile(ref.ipot, dynamic=True)


@functools.lru_cache(maxsize=None)
def _graphed_reference(b):
    """Replay of the reference captured in a CUDA graph (inputs are static)."""
    cost, txt_pad, img_pad = inputs(b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            ref.ipot(cost, txt_pad, img_pad, BETA, ITERS, K)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ref.ipot(cost, txt_pad, img_pad, BETA, ITERS, K)
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.ipot(cost, txt_pad, img_pad, BETA, ITERS, K)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    return graph.replay


def fast_call(backend, b):
    cost, txt_pad, img_pad = inputs(b)
    if backend == "reference+cudagraph":
        return _graphed_reference(b)
    if backend == "reference+compile":
        fn = _compiled_reference()
        return lambda: fn(cost, txt_pad, img_pad, BETA, ITERS, K)
    return lambda: ops.ipot(cost, txt_pad, img_pad, BETA, ITERS, K, backend=backend)


def _skip(backend):
    if backend in EXTRA:
        if not bu.ON_CUDA:
            return f"{backend}: CUDA-only baseline"
        if backend == "reference+compile" and not bu.WITH_COMPILE:
            return "torch.compile baselines disabled (UNITER_FAST_BENCH_COMPILE=0)"
        return None
    return bu.skip_reason(OP, backend, bu.DEVICE, torch.float32)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ipot(benchmark, collector, backend, b):
    reason = _skip(backend)
    if reason:
        pytest.skip(reason)
    cost, txt_pad, img_pad = inputs(b)
    benchmark.group = f"ipot B={b} {M_TXT}x{N_IMG} it={ITERS} {bu.DEVICE.type}"
    fast = fast_call(backend, b)
    # a fast path must compute the same plan before it is timed
    plan = ops.ipot(cost, txt_pad, img_pad, BETA, ITERS, K, backend="reference")
    if backend != "reference+cudagraph":  # (the graph checks itself when captured)
        torch.testing.assert_close(fast(), plan, rtol=2e-3, atol=1e-6)
    baselines = {} if backend == "reference" else {"reference": _reference_call(cost, txt_pad, img_pad)}
    if bu.ON_CUDA and backend not in ("reference",) + EXTRA:
        # the fast kernels against the strongest plain-PyTorch baseline as well
        baselines["reference+cudagraph"] = fast_call("reference+cudagraph", b)
    timing = bu.measure(benchmark, fast, baselines,
                        warmup=3 if backend == "reference+compile" else None)
    numel = b * M_TXT * N_IMG
    rec = bu.make_record(
        op=OP, group=benchmark.group, mode="fwd", backend=backend, dtype=torch.float32,
        shape={"B": b, "M": M_TXT, "N": N_IMG, "iteration": ITERS, "k": K, "beta": BETA},
        timing=timing, headline=True, sweep={"batch": b},
        # floor: read C once, read the two pad masks, write the plan once
        bytes_moved=numel * 4 * 2 + b * (M_TXT + N_IMG),
        # per iteration: A*T, two mat-vecs, the plan update (~7 flop/entry)
        flops=numel * (7 * ITERS * K + 2))
    bu.attach(benchmark, rec)
    collector.add(rec)


# ------------------------------------------------ plan + trace(C·T) from a cost
DIST_OP = "ipot_distance"


def original_distance(cost, txt_pad, img_pad):
    """UNITER's original cost profile for the distance: the IPOT loop (our
    reference: the same ops per iteration), then trace(C·T) as the original
    takes it, a batched [B, M, M] product and a masked select of its diagonal."""
    T = ref.ipot(cost, txt_pad, img_pad, BETA, ITERS, K)
    prod = cost.matmul(T)
    eye = torch.eye(prod.size(1), dtype=torch.bool, device=prod.device).expand_as(prod)
    return prod.masked_select(eye).view(prod.size(0), -1).sum(dim=-1)


def _with_grad(cost):
    # the distance is taken from a cost that requires grad, as in the WRA loss
    return cost.detach().requires_grad_()


def _bench_distance(benchmark, collector, b, run, *, backend, label, sweep=None, notes):
    """Time ``run(cost, txt_pad, img_pad)`` (plan + trace from a cost that
    requires grad) against the reference twin and UNITER's original sequence;
    every side must compute the same distances before anything is timed."""
    cost, txt_pad, img_pad = inputs(b)
    cost = _with_grad(cost)
    benchmark.group = f"ipot+distance B={b} {M_TXT}x{N_IMG} it={ITERS} {bu.DEVICE.type}{label}"

    def fast():
        return run(cost, txt_pad, img_pad)

    def reference():
        return ref.ipot_distance(cost, txt_pad, img_pad, BETA, ITERS, K)

    def original():
        return original_distance(cost, txt_pad, img_pad)

    expect = reference().detach()
    for name, f in (("fast", fast), ("original", original)):
        got = f().detach()
        assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6), (name, got, expect)
    baselines = {"original": original}
    if backend != "reference":
        baselines = {"reference": reference, **baselines}
    timing = bu.measure(benchmark, fast, baselines)
    numel = b * M_TXT * N_IMG
    rec = bu.make_record(
        op=DIST_OP, group=benchmark.group, mode="fwd", backend=backend, dtype=torch.float32,
        shape={"B": b, "M": M_TXT, "N": N_IMG, "iteration": ITERS, "k": K, "beta": BETA},
        timing=timing, headline=True, sweep=sweep,
        bytes_moved=numel * 4 * 2 + b * (M_TXT + N_IMG) + b * 4,
        flops=numel * (7 * ITERS * K + 4), notes=notes)
    bu.attach(benchmark, rec)
    collector.add(rec)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("backend", list(bu.registered(OP)))
def test_ipot_distance(benchmark, collector, backend, b):
    reason = bu.skip_reason(OP, backend, bu.DEVICE, torch.float32)
    if reason:
        pytest.skip(reason)
    _bench_distance(
        benchmark, collector, b,
        lambda c, tp, ip: ops.ipot_distance(c, tp, ip, BETA, ITERS, K, backend=backend),
        backend=backend, label="", sweep={"batch": b},
        notes="ipot_distance from a cost that requires grad; 'original' = UNITER's op sequence "
              "(IPOT loop, then the B×M×M product C·T and its masked diagonal)")


# ------------------- the C++ kernel's other instruction sets (what other CPUs run)
def _cpu_isas():
    if bu.ON_CUDA or bu.skip_reason(OP, "cpp", bu.DEVICE, torch.float32):
        return []
    from uniter_fast import _ext
    return _ext.cpu_module().cpu_isas()[1:]     # [0] is what "cpp" above runs


@pytest.mark.parametrize("isa", _cpu_isas() or ["none"])
def test_ipot_distance_cpu_isa(benchmark, collector, isa):
    """ipot+distance at B=256 with the C++ kernel forced to a narrower
    instruction set (AVX2: 8 lanes, base: SSE2/NEON, 4 lanes), as CPUs
    without AVX-512 run it, against the same baselines."""
    if isa == "none":
        pytest.skip("no other instruction set of the C++ kernel on this device")
    from uniter_fast import _ext
    mod = _ext.cpu_module()

    def run(cost, txt_pad, img_pad):
        mod.set_cpu_isa(isa)
        try:
            return ops.ipot_distance(cost, txt_pad, img_pad, BETA, ITERS, K, backend="cpp")
        finally:
            mod.set_cpu_isa("auto")

    _bench_distance(benchmark, collector, BATCHES[len(BATCHES) // 2], run,
                    backend=f"cpp[{isa}]", label=" isa",
                    notes=f"C++ kernel forced to its {isa} build (set_cpu_isa)")


# ------------------ WRA end to end: the distance from the embeddings, as the model calls it
WRA_OP = "optimal_transport_dist"
HIDDEN = 16 if bu.SMOKE else 768
WRA_MODES = ("fwd", "fwd+bwd")


@functools.lru_cache(maxsize=None)
def wra_inputs(b: int):
    """Text and image embeddings [B, L, 768] (the encoder's output) with the pads."""
    g = torch.Generator().manual_seed(2000 + b)
    tl = bu.lengths(b, max(1, M_TXT // 3), M_TXT, g)
    il = bu.lengths(b, max(1, N_IMG // 10), N_IMG, g)
    txt_pad = bu.pad_mask(tl, M_TXT, padded=True).bool()
    img_pad = bu.pad_mask(il, N_IMG, padded=True).bool()
    txt = torch.randn(b, M_TXT, HIDDEN, generator=g)
    img = torch.randn(b, N_IMG, HIDDEN, generator=g)
    w = torch.rand(b, generator=g) + 0.5     # the loss's per-example weights
    return tuple(t.to(bu.DEVICE) for t in (txt, img, txt_pad, img_pad, w))


def original_wra(txt, img, txt_pad, img_pad):
    """UNITER's original ``optimal_transport_dist`` op sequence, restated:
    ``F.normalize`` copies of both embeddings and their matmul, the padded
    entries zeroed, the IPOT loop (the reference: the same ops per iteration),
    then trace(C·T) as a batched [B, M, M] product and its masked diagonal."""
    x = torch.nn.functional.normalize(txt, p=2, dim=-1, eps=1e-5)
    y = torch.nn.functional.normalize(img, p=2, dim=-1, eps=1e-5)
    cost = 1 - x.matmul(y.transpose(1, 2))
    cost = cost.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)
    T = ref.ipot(cost.detach(), txt_pad, img_pad, BETA, ITERS, K)
    prod = cost.matmul(T)
    eye = torch.eye(prod.size(1), dtype=torch.bool, device=prod.device).expand_as(prod)
    return prod.masked_select(eye).view(prod.size(0), -1).sum(dim=-1)


def _wra_step(fn, mode, b):
    """One call of ``fn(txt, img, txt_pad, img_pad)`` on embeddings that require
    grad (as in training), plus the backward of the weighted distances for fwd+bwd."""
    txt, img, txt_pad, img_pad, w = wra_inputs(b)
    leaves = [t.detach().clone().requires_grad_() for t in (txt, img)]

    def run():
        for t in leaves:
            t.grad = None
        d = fn(*leaves, txt_pad, img_pad)
        if mode == "fwd+bwd":
            (d * w).sum().backward()
        return d, leaves
    return run


def _wra_backends():
    return [be for be in bu.registered(WRA_OP) if be != "reference"]


@pytest.mark.parametrize("mode", WRA_MODES)
@pytest.mark.parametrize("backend", _wra_backends())
def test_wra_end_to_end(benchmark, collector, backend, mode):
    """ops.optimal_transport_dist from the embeddings on ``backend`` (cpp: the
    fused C++ kernel; torch/cuda/triton: the cost op without normalised copies,
    then IPOT + trace) against the reference twin and UNITER's original
    sequence, at B=256, 60×100, hidden 768."""
    reason = bu.skip_reason(WRA_OP, backend, bu.DEVICE, torch.float32)
    if reason:
        pytest.skip(reason)
    b = BATCHES[len(BATCHES) // 2]
    benchmark.group = (f"wra {mode} B={b} {M_TXT}x{N_IMG} D={HIDDEN} it={ITERS} "
                       f"{bu.DEVICE.type}")

    def fast_fn(t, i, tp, ip):
        return ops.optimal_transport_dist(t, i, tp, ip, BETA, ITERS, K, backend=backend)

    def reference_fn(t, i, tp, ip):
        return ref.optimal_transport_dist(t, i, tp, ip, BETA, ITERS, K)

    steps = {name: _wra_step(fn, mode, b) for name, fn in
             (("fast", fast_fn), ("reference", reference_fn), ("original", original_wra))}
    # every side computes the same distances (and gradients) before anything is timed
    got = {name: step() for name, step in steps.items()}
    d_ref = got["reference"][0].detach()
    for name in ("fast", "original"):
        d = got[name][0].detach()
        assert torch.allclose(d, d_ref, rtol=1e-5, atol=1e-6), (name, d, d_ref)
        if mode == "fwd+bwd":
            for g, g_ref in zip(got[name][1], got["reference"][1]):
                torch.testing.assert_close(g.grad, g_ref.grad, rtol=1e-4, atol=1e-6)
    timing = bu.measure(benchmark, steps["fast"],
                        {"reference": steps["reference"], "original": steps["original"]})
    numel = b * M_TXT * N_IMG
    emb = b * (M_TXT + N_IMG) * HIDDEN
    rec = bu.make_record(
        op=WRA_OP, group=benchmark.group, mode=mode, backend=backend, dtype=torch.float32,
        shape={"B": b, "M": M_TXT, "N": N_IMG, "D": HIDDEN, "iteration": ITERS, "k": K,
               "beta": BETA},
        timing=timing, headline=True,
        # floor: read both embeddings once (+ write their gradients, read them again for bwd)
        bytes_moved=emb * 4 * (1 if mode == "fwd" else 3) + b * (M_TXT + N_IMG),
        flops=2.0 * numel * HIDDEN * (1 if mode == "fwd" else 3) + numel * (7 * ITERS * K + 4),
        notes=f"ops.optimal_transport_dist(backend={backend!r}); embeddings require grad; "
              f"'original' = UNITER's op sequence (F.normalize copies, matmul, IPOT loop, "
              f"B×M×M product C·T and its diagonal)")
    bu.attach(benchmark, rec)
    collector.add(rec)
