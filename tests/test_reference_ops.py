"""Reference ops against independent formulas, and the op-dispatch seam."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import ipot_np

import uniter_fast
from uniter_fast import ops, reference


def _mask(b, s, gen, all_but_one=True):
    m = (torch.rand(b, s, generator=gen) > 0.3).to(torch.uint8)
    m[:, 0] = 1
    if all_but_one and b > 1:
        m[1] = 0
        m[1, s // 2] = 1           # padding covers all but one key
    return m


@pytest.mark.parametrize("s", [1, 7, 17, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_matches_sdpa_with_additive_mask(s, dtype):
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(3, 2, s, 16, generator=g) for _ in range(3))
    m = _mask(3, s, g)
    add = (1.0 - m[:, None, None, :].double()) * -10000.0
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=add)
    out = reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), m)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref64, rtol=tol, atol=tol)
    # ops.attention on every backend this machine runs natively agrees
    for name in ops.available_backends("attention", "cpu", dtype):
        torch.testing.assert_close(
            ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), m, backend=name).double(),
            ref64, rtol=tol, atol=tol)


def test_attention_scale_and_dropout_mask_replay():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    m = _mask(2, 9, g)
    keep = torch.rand(2, 3, 9, 9, generator=g) > 0.25
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.7 + (1.0 - m[:, None, None, :].double()) * -1e4, -1)
    expect = (p * keep / 0.75) @ v
    out = reference.attention(q, k, v, m, dropout_p=0.25, scale=0.7, dropout_mask=keep)
    torch.testing.assert_close(out, expect)


def test_ipot_matches_float64_numpy_transcription():
    g = torch.Generator().manual_seed(3)
    for b, m, n, beta, it, k in [(4, 7, 11, 0.5, 50, 1), (3, 1, 5, 0.1, 5, 2), (3, 6, 4, 0.3, 4, 3), (2, 13, 1, 1.0, 1, 1)]:
        C = torch.rand(b, m, n, generator=g) * 2
        tp = torch.rand(b, m, generator=g) > 0.7
        ip = torch.rand(b, n, generator=g) > 0.7
        tp[0] = False
        ip[0] = False                       # one full example
        if b > 2:
            tp[2] = True                    # an empty text side
        T = reference.ipot(C, tp, ip, beta, it, k)
        assert T.shape == (b, n, m) and T.dtype == torch.float32
        for i in range(b):
            expect = ipot_np(C[i].numpy(), tp[i].numpy(), ip[i].numpy(), beta, it, k)
            np.testing.assert_allclose(T[i].numpy(), expect, rtol=1e-4, atol=1e-7)
        assert torch.isfinite(T).all()


def test_ipot_plan_marginals_and_empty_sequences():
    g = torch.Generator().manual_seed(4)
    C = torch.rand(3, 6, 9, generator=g)
    tp = torch.zeros(3, 6, dtype=torch.bool)
    ip = torch.zeros(3, 9, dtype=torch.bool)
    ip[1, 4:] = True
    tp[2] = True
    T = reference.ipot(C, tp, ip, 0.5, 200, 1)
    # converged IPOT plan has uniform marginals over real positions
    torch.testing.assert_close(T[0].sum(0), torch.full((6,), 1 / 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(T[1, :4].sum(1), torch.full((4,), 1 / 4), atol=1e-4, rtol=0)
    assert T[1, 4:].abs().sum() == 0
    assert T[2].abs().sum() == 0


def test_ot_distance_semantics():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 32, generator=g, requires_grad=True)
    same = x.detach().clone()
    rnd = torch.randn(4, 8, 32, generator=g)
    pad = torch.zeros(4, 8, dtype=torch.bool)
    d_same = uniter_fast.optimal_transport_dist(x, same, pad, pad)
    d_rnd = uniter_fast.optimal_transport_dist(x, rnd, pad, pad)
    assert (d_same < 0.2).all() and (d_rnd > 0.7).all()
    # length 0 on either side: distance exactly 0, never NaN, and finite grads
    tp = pad.clone()
    tp[1] = True
    ip = pad.clone()
    ip[2] = True
    d = uniter_fast.optimal_transport_dist(x, rnd, tp, ip)
    assert d[1] == 0 and d[2] == 0 and torch.isfinite(d).all()
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().sum() == 0
    # fp16/bf16 embeddings are computed in float32
    d16 = uniter_fast.optimal_transport_dist(x.detach().half(), rnd.half(), pad, pad)
    assert d16.dtype == torch.float32


def test_ot_gradient_only_through_cost():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    pad_x = torch.zeros(2, 5, dtype=torch.bool)
    pad_y = torch.zeros(2, 7, dtype=torch.bool)
    pad_y[1, 5:] = True
    d = reference.optimal_transport_dist(x, y, pad_x, pad_y)
    d.sum().backward()
    # independent: with T fixed, d = sum(C ⊙ Tᵀ), C = 1 − cos
    T = reference.ipot(reference.cost_matrix_cosine(x.float(), y.float()).masked_fill(
        pad_x[:, :, None] | pad_y[:, None, :], 0), pad_x, pad_y).double()
    x2 = x.detach().clone().requires_grad_(True)
    xn, yn = F.normalize(x2, dim=-1, eps=1e-5), F.normalize(y, dim=-1, eps=1e-5)
    C = (1 - xn @ yn.transpose(1, 2)).masked_fill(pad_x[:, :, None] | pad_y[:, None, :], 0)
    (C * T.transpose(1, 2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_ot_bad_inputs():
    x, y = torch.randn(2, 3, 8), torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="batch size mismatch"):
        uniter_fast.optimal_transport_dist(x, y, torch.zeros(2, 3, dtype=torch.bool),
                                           torch.zeros(3, 4, dtype=torch.bool))
    y = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="txt_pad shape"):
        uniter_fast.optimal_transport_dist(x, y, torch.zeros(2, 4, dtype=torch.bool),
                                           torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding mask"):
        uniter_fast.optimal_transport_dist(x, y, torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="beta"):
        uniter_fast.optimal_transport_dist(x, y, torch.zeros(2, 3, dtype=torch.bool),
                                           torch.zeros(2, 4, dtype=torch.bool), beta=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_and_gelu(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 3, 33, generator=g) * 3 + 1).to(dtype)
    w, b = torch.randn(33, generator=g).to(dtype), torch.randn(33, generator=g).to(dtype)
    expect = F.layer_norm(x.double(), (33,), w.double(), b.double(), 1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name in ops.available_backends("layer_norm", "cpu", dtype):
        torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-12, backend=name).double(), expect,
                                   rtol=tol, atol=tol)
    xg = x.double()
    expect_gelu = xg * 0.5 * (1 + torch.special.erf(xg / math.sqrt(2)))
    for name in ops.available_backends("gelu", "cpu", dtype):
        torch.testing.assert_close(ops.gelu(x, backend=name).double(), expect_gelu, rtol=tol, atol=tol)


def test_reference_layer_norm_computes_float64_in_float64():
    """A float64 input is normalized in float64 (not through float32): it matches an
    independent float64 formula (numpy) to 1e-12."""
    rng = np.random.default_rng(11)
    xn = rng.standard_normal((4, 3, 257)) * 5 + 3
    wn, bn = rng.standard_normal(257), rng.standard_normal(257)
    eps = 1e-12
    mean = xn.mean(-1, keepdims=True)
    var = ((xn - mean) ** 2).mean(-1, keepdims=True)
    expect = (xn - mean) / np.sqrt(var + eps) * wn + bn
    out = reference.layer_norm(torch.from_numpy(xn), torch.from_numpy(wn),
                               torch.from_numpy(bn), eps)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-12, atol=1e-12)
