"""Fused Triton attention (kernels/attention_triton.py) against the reference.

On a machine without CUDA the kernels run in the Triton interpreter
(TRITON_INTERPRET=1, set by conftest) with small shapes; the CUDA tests run
the same checks natively, with bf16 and bigger shapes.

Accuracy rule (FlashAttention's): with ref64 = the reference evaluated in
float64 on the same (rounded) inputs, the kernel's error must be at most twice
the error of the plain-PyTorch reference run in the same low precision, plus a
small atol.  The rule is applied per batch example, because an example whose
keys are all padding makes the low-precision reference itself inexact (its
scores sit at −10000, where fp16/bf16 have a spacing of 8/64); an absolute
bound covers those examples.
"""
import os

import pytest
import torch

import uniter_fast
from uniter_fast import ops, reference

# (not imported from conftest: a second conftest module under tests/ shadows that name)
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.cuda          # tests/conftest.py skips these without a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not (HAS_CUDA or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")

from uniter_fast.kernels import attention_triton as AT

CPU = torch.device("cpu")
DEV = torch.device("cuda") if HAS_CUDA else CPU
LENGTHS = [1, 7, 17, 63, 64, 65, 127, 129, 160, 170]
# the rule's "small atol": one unit of the dtype's precision relative to the example's
# largest reference value (O, hence delta = rowsum(dO·O), is rounded to the dtype, as in FA2)
ATOL = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# absolute bound on |kernel − ref64| relative to max|ref64| (covers all-padded examples)
ABS = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


# --------------------------------------------------------------------------- helpers


def make_mask(B, S, gen, kinds):
    """[B, S] float mask, 1 = real.  kinds per example: "prefix" (random length
    ≥ 1), "one" (exactly one real key, anywhere), "random" (Bernoulli), "none"
    (all padded), "full"."""
    m = torch.zeros(B, S)
    for b, kind in enumerate(kinds):
        if kind == "prefix":
            m[b, :int(torch.randint(1, S + 1, (1,), generator=gen))] = 1
        elif kind == "one":
            m[b, int(torch.randint(0, S, (1,), generator=gen))] = 1
        elif kind == "random":
            m[b] = (torch.rand(S, generator=gen) < 0.6).float()
        elif kind == "full":
            m[b] = 1
        elif kind != "none":
            raise ValueError(kind)
    return m


def make_inputs(B, H, S, D, dtype, device, seed=0):
    """q, k, v, dO rounded to ``dtype`` (so every implementation sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=gen).to(dtype).to(device) for _ in range(4)]


def run(fn, q, k, v, m, do, dtype, **kw):
    """Output and (dq, dk, dv) of ``fn`` evaluated in ``dtype``."""
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*xs, m, **kw)
    out.backward(do.to(dtype))
    return [out.detach()] + [x.grad for x in xs]


def per_example_err(a, ref):
    return (a.double() - ref).abs().flatten(1).max(1).values


def check_rule(got, low, ref64, dtype, what):
    """FlashAttention's rule per example, plus an absolute bound."""
    # per-example magnitude over out and all gradients (a gradient that is ~0 in exact
    # math, e.g. dq with one real key, still carries the rounding of O in delta)
    mag = torch.stack([r.abs().flatten(1).max(1).values for r in ref64]).max(0).values
    for name, g, lp, r in zip(("out", "dq", "dk", "dv"), got, low, ref64):
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite values"
        ek, et = per_example_err(g, r), per_example_err(lp, r)
        bound = 2 * et + ATOL[dtype] * torch.clamp(mag, min=1.0)
        assert (ek <= bound).all(), (f"{what}: {name} error per example {ek.tolist()} > "
                                     f"2·torch-{dtype} error + atol {bound.tolist()}")
        scale = r.abs().max().item() + 1e-6
        assert ek.max().item() <= ABS[dtype] * scale + ATOL[dtype], \
            f"{what}: {name} error {ek.max().item():.3g} > {ABS[dtype]}·{scale:.3g}"


def compare(B, H, S, D, dtype, device, kinds, seed=0, scale=None, **kw):
    q, k, v, do = make_inputs(B, H, S, D, dtype, device, seed)
    m = make_mask(B, S, torch.Generator().manual_seed(seed + 1), kinds).to(device)
    got = run(AT.attention, q, k, v, m, do, dtype, scale=scale, **kw)
    low = run(reference.attention, q, k, v, m, do, dtype, scale=scale)
    ref64 = run(reference.attention, q, k, v, m, do, torch.float64, scale=scale)
    check_rule(got, low, ref64, dtype, f"S={S} D={D} {dtype} {kinds} {kw}")
    return got, ref64


# --------------------------------------------------------------------------- CPU (interpreter) / any device


@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward_length_sweep(S, dtype):
    D = 16 if S % 2 else 32
    compare(3, 2, S, D, dtype, DEV, ["prefix", "one", "random"], seed=S)


@pytest.mark.parametrize("S", [17, 65, 129])
def test_bf16_upcast_path(S):
    # in the interpreter bf16 tiles are upcast before tl.dot after rounding P/dS to bf16
    compare(2, 2, S, 16, torch.bfloat16, DEV, ["prefix", "one"], seed=S)


@pytest.mark.parametrize("blocks", [(32, 32), (32, 64), (64, 32), (128, 64)])
@pytest.mark.parametrize("S", [17, 129])
def test_other_tile_shapes(blocks, S):
    # the GPU autotuner picks among these; each must be right at awkward lengths
    compare(2, 2, S, 16, torch.float32, DEV, ["prefix", "one"], seed=S, _blocks=blocks)


@pytest.mark.parametrize("S", [1, 7, 65, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_keys_padded_example(S, dtype):
    """−10000 (not −inf) on real-but-masked keys: an example whose keys are all
    padding gets the same shift on every key, so it attends exactly like an
    unmasked example over its S keys (no NaN).  The tile padding beyond S must
    be excluded: a kernel that gave it −10000 too would mix in 64·k − S zero keys."""
    q, k, v, do = make_inputs(2, 2, S, 16, dtype, DEV, seed=S)
    m = make_mask(2, S, torch.Generator().manual_seed(0), ["none", "prefix"]).to(DEV)
    out = AT.attention(q, k, v, m)
    expect = reference.attention(q[:1].double(), k[:1].double(), v[:1].double(),
                                 torch.ones(1, S, dtype=torch.float64, device=DEV))[0]
    tol = 2e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out[0].double(), expect, rtol=0, atol=tol)
    # and gradients stay finite and match ref64 (absolute bound)
    got = run(AT.attention, q, k, v, m, do, dtype)
    ref64 = run(reference.attention, q, k, v, m, do, torch.float64)
    for g, r in zip(got, ref64):
        assert torch.isfinite(g).all()
        assert (g.double() - r).abs().max() <= ABS[dtype] * r.abs().max() + ATOL[dtype]


def test_model_layout_strides_and_broadcast_grad():
    """q/k/v as the model makes them ([B,S,H,D] viewed as [B,H,S,D]), a
    stride-0 upstream gradient, and a bool mask."""
    B, S, H, D = 2, 37, 3, 16
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(B, S, H, D, generator=gen).to(DEV) for _ in range(3)]
    m = make_mask(B, S, gen, ["prefix", "random"]).bool().to(DEV)
    xs = [t.clone().requires_grad_() for t in base]
    out = AT.attention(*[x.transpose(1, 2) for x in xs], m)
    # output keeps q's memory layout: the model's transpose back + reshape is free
    assert out.transpose(1, 2).is_contiguous()
    (out * 1.0).sum().backward()            # dO = ones expanded, stride 0
    rs = [t.double().clone().requires_grad_() for t in base]
    ref = reference.attention(*[r.transpose(1, 2) for r in rs], m)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for x, r in zip(xs, rs):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=0, atol=1e-5)


def test_custom_scale_and_non_power_of_two_head_dim():
    compare(2, 2, 23, 24, torch.float32, DEV, ["prefix", "random"], seed=5, scale=0.37)
    compare(1, 1, 9, 1, torch.float16, DEV, ["random"], seed=6)


def test_empty_batch():
    q = torch.randn(0, 2, 5, 16, device=DEV, requires_grad=True)
    out = AT.attention(q, q, q, torch.ones(0, 5, device=DEV))
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S", [17, 65])
def test_dropout_matches_reference_with_kernel_mask(dtype, S):
    """The kernel's keep-mask (materialised with the same Philox counters),
    replayed in the reference, gives the kernel's forward AND gradients, so
    forward and backward drew the same mask."""
    B, H, D, p, seed = 2, 2, 16, 0.3, 1234
    keep = AT.dropout_keep_mask(B, H, S, p, seed, device=DEV)
    assert keep.shape == (B, H, S, S) and keep.dtype == torch.bool
    q, k, v, do = make_inputs(B, H, S, D, dtype, DEV, seed=S)
    m = make_mask(B, S, torch.Generator().manual_seed(2), ["prefix", "one"]).to(DEV)
    got = run(AT.attention, q, k, v, m, do, dtype, dropout_p=p, seed=seed)
    low = run(reference.attention, q, k, v, m, do, dtype, dropout_p=p, dropout_mask=keep)
    ref64 = run(reference.attention, q, k, v, m, do, torch.float64, dropout_p=p, dropout_mask=keep)
    check_rule(got, low, ref64, dtype, f"dropout S={S} {dtype}")
    # a different mask does not match: the test can fail
    other = AT.dropout_keep_mask(B, H, S, p, seed + 1, device=DEV)
    wrong = run(reference.attention, q, k, v, m, do, torch.float64, dropout_p=p, dropout_mask=other)
    assert (got[0].double() - wrong[0]).abs().max() > 1e-2


def test_dropout_mask_statistics_and_reproducibility():
    B, H, S, p = 2, 2, 64, 0.25
    a = AT.dropout_keep_mask(B, H, S, p, seed=7, device=DEV)
    assert torch.equal(a, AT.dropout_keep_mask(B, H, S, p, seed=7, device=DEV))
    assert not torch.equal(a, AT.dropout_keep_mask(B, H, S, p, seed=8, device=DEV))
    assert not torch.equal(a, AT.dropout_keep_mask(B, H, S, p, seed=7, philox_offset=B * H * S * S,
                                                   device=DEV))
    frac = a.float().mean().item()          # 16384 draws: σ ≈ 0.0034
    assert abs(frac - (1 - p)) < 0.02, frac
    # (batch, head) slices and rows differ
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0, 0], a[1, 0])
    assert not torch.equal(a[0, 0, 0], a[0, 0, 1])
    # a mask of another sequence length is a different draw
    assert AT.dropout_keep_mask(1, 1, 1, 0.0, seed=3, device=DEV).all()


def test_dropout_seed_from_torch_generator():
    B, H, S, D = 1, 2, 33, 16
    q, k, v, _ = make_inputs(B, H, S, D, torch.float32, DEV, seed=9)
    m = torch.ones(B, S, device=DEV)
    torch.manual_seed(42)
    a = AT.attention(q, k, v, m, dropout_p=0.5)
    torch.manual_seed(42)
    b = AT.attention(q, k, v, m, dropout_p=0.5)
    c = AT.attention(q, k, v, m, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, AT.attention(q, k, v, m))


# --------------------------------------------------------------------------- op layer / errors


def test_autotune_keyed_on_length_bucket_and_pruned_per_dtype_and_head_dim(monkeypatch):
    # lengths 65..128 share one tuning entry; the exact length is never a key
    assert {AT._seq_bucket(s) for s in range(65, 129)} == {128}
    assert AT._seq_bucket(1) == AT._seq_bucket(16) == 16 and AT._seq_bucket(170) == 256
    assert "seq" not in AT._KEY and "SEQ_BUCKET" in AT._KEY
    for kernel in ("fwd", "dkdv", "dq"):
        prune, block = AT._prune(kernel), AT._PROGRAM_BLOCK[kernel]
        cfgs = AT._TUNED[kernel].configs
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q = torch.empty(1, dtype=dtype)
            cands = {AT._as_tuple(c, kernel) for c in AT.tuning_candidates(kernel, dtype)}
            assert cands == set(AT._CANDIDATES[AT.dtype_class(dtype)])
            for bucket in (16, 64, 256):
                for bd in (16, 32, 64, 128):
                    kept = prune(cfgs, {"SEQ_BUCKET": bucket, "Q": q}, BLOCK_D=bd)
                    assert kept, (kernel, dtype, bucket, bd)
                    excluded = AT._EXCLUDED.get((kernel, AT.dtype_class(dtype), bd), ())
                    for c in kept:
                        t = AT._as_tuple(c, kernel)
                        assert t in cands and t not in excluded
                        assert c.kwargs[block] <= max(32, bucket) or len(kept) == 1
    # an excluded config is never picked, and a fallback always remains
    t = AT._CANDIDATES["lowp"][0]
    monkeypatch.setitem(AT._EXCLUDED, ("fwd", "lowp", 64), {t})
    kept = AT._prune("fwd")(AT._TUNED["fwd"].configs,
                            {"SEQ_BUCKET": 128, "Q": torch.empty(1, dtype=torch.float16)},
                            BLOCK_D=64)
    assert kept and t not in {AT._as_tuple(c, "fwd") for c in kept}


def test_ops_attention_triton_matches_reference():
    q, k, v, _ = make_inputs(2, 2, 21, 16, torch.float32, DEV, seed=11)
    m = make_mask(2, 21, torch.Generator().manual_seed(0), ["prefix", "random"]).to(DEV)
    out = ops.attention(q, k, v, m, backend="triton")
    torch.testing.assert_close(out, reference.attention(q, k, v, m), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_error():
    q = torch.randn(1, 2, 5, 16, device=DEV)
    m = torch.ones(1, 5, device=DEV)
    # the op's contract, checked once for every backend
    with pytest.raises(ValueError, match="attn_mask"):
        ops.attention(q, q, q, torch.ones(1, 4, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        ops.attention(q, q, q.double(), m, backend="triton")
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, q, q, m, dropout_p=1.0, backend="triton")
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, q, q, m, scale=float("nan"), backend="triton")
    # a head too wide for the kernel: the backend declines the call, with the reason
    with pytest.raises(ops.BackendUnavailableError, match="head_dim must be 1..128, got 160"):
        ops.attention(*(torch.randn(1, 1, 5, 160, device=DEV),) * 3, m, backend="triton")
    # what the launcher itself relies on
    with pytest.raises(ValueError, match="dtype"):
        AT.attention(q.double(), q.double(), q.double(), m)
    with pytest.raises(ValueError, match="head_dim"):
        AT.attention(*(torch.randn(1, 1, 5, 129, device=DEV),) * 3, m)
    with pytest.raises(ValueError, match="attn_mask"):
        AT.attention(q, q, q, torch.ones(1, 4, device=DEV))


# --------------------------------------------------------------------------- model level


def test_model_forward_backward_triton_equals_reference():
    """UniterForPretraining (tiny config, dropout off) under use_backend("triton")
    equals the reference backend: losses and every parameter gradient."""
    from batches import make_batch

    from uniter_fast import UniterConfig, UniterForPretraining

    img_dim, label_dim = 48, 9
    cfg = UniterConfig.from_json_file(uniter_fast.config_path("uniter-tiny"))
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = UniterForPretraining(cfg, img_dim, label_dim).to(DEV)
    batch = make_batch("mlm", cfg.vocab_size, img_dim, label_dim, [5, 1, 9, 7], [4, 7, 1, 3])
    batch = {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss_and_grads(backend):
        model.zero_grad(set_to_none=True)
        with ops.use_backend({"attention": backend}):
            loss = model(batch, "mlm").mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    l_tri, g_tri = loss_and_grads("triton")
    l_ref, g_ref = loss_and_grads("reference")
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-6)
    assert g_tri.keys() == g_ref.keys() and len(g_ref) > 10
    for n in g_ref:
        torch.testing.assert_close(g_tri[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    q_w = "uniter.encoder.layer.0.attention.self.query.weight"
    assert g_ref[q_w].abs().sum() > 0


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S", LENGTHS + [50, 97, 255, 256, 257, 511, 512])
def test_cuda_sweep_bigger(dtype, S):
    compare(4, 12, S, 64, dtype, DEV, ["prefix", "one", "random", "full"], seed=S)


@requires_cuda
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_head_dims_uniter_batch(D, dtype):
    # UNITER-like: 16 heads, joint lengths ~50-170 padded to the batch max
    B, S = 8, 170
    gen = torch.Generator().manual_seed(D)
    q, k, v, do = make_inputs(B, 16, S, D, dtype, DEV, seed=D)
    m = torch.zeros(B, S)
    for b in range(B):
        m[b, :int(torch.randint(50, S + 1, (1,), generator=gen))] = 1
    m = m.to(DEV)
    got = run(AT.attention, q, k, v, m, do, dtype)
    low = run(reference.attention, q, k, v, m, do, dtype)
    ref64 = run(reference.attention, q, k, v, m, do, torch.float64)
    check_rule(got, low, ref64, dtype, f"cuda D={D} {dtype}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dropout_and_auto_backend(dtype):
    B, H, S, D, p = 4, 12, 129, 64, 0.1
    keep = AT.dropout_keep_mask(B, H, S, p, seed=99, device=DEV)
    q, k, v, do = make_inputs(B, H, S, D, dtype, DEV, seed=1)
    m = make_mask(B, S, torch.Generator().manual_seed(1), ["prefix", "one", "none", "full"]).to(DEV)
    got = run(AT.attention, q, k, v, m, do, dtype, dropout_p=p, seed=99)
    low = run(reference.attention, q, k, v, m, do, dtype, dropout_p=p, dropout_mask=keep)
    ref64 = run(reference.attention, q, k, v, m, do, torch.float64, dropout_p=p, dropout_mask=keep)
    check_rule(got, low, ref64, dtype, f"cuda dropout {dtype}")
    # "auto" picks the kernel on CUDA; a head too wide for it falls back to sdpa
    assert ops.selected_backend("attention", None, DEV, dtype, q=q) == "triton"
    wide = [torch.randn(1, 2, 9, 256, device=DEV, dtype=dtype) for _ in range(3)]
    assert ops.selected_backend("attention", None, DEV, dtype, q=wide[0]) == "sdpa"
    torch.testing.assert_close(ops.attention(*wide, torch.ones(1, 9, device=DEV)),
                               reference.attention(*wide, torch.ones(1, 9, device=DEV)),
                               rtol=2e-2, atol=2e-2)
