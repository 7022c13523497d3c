"""The WRA cosine cost op (ops.cost_matrix_cosine) on every backend, against
an independent float64 formula: values, padding, tiny norms, gradients."""
import importlib

import pytest
import torch

from uniter_fast import ops

cost_mod = importlib.import_module("uniter_fast.ops.cost")
EPS = 1e-5
BACKENDS = ops.available_backends("cost_matrix_cosine", "cpu")


def independent_cost(x, y, tp=None, ip=None, eps=EPS):
    """1 − cos in float64, written out: x_i·y_j / (max(‖x_i‖, eps) · max(‖y_j‖, eps))
    (torch.norm: its gradient at a zero row is 0, where sqrt's is NaN)."""
    x, y = x.double(), y.double()
    nx = x.norm(dim=-1).clamp_min(eps)
    ny = y.norm(dim=-1).clamp_min(eps)
    c = 1 - torch.einsum("bmd,bnd->bmn", x, y) / (nx[:, :, None] * ny[:, None, :])
    if tp is not None:
        c = c.masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    return c


def _case(seed, B=5, M=13, N=21, D=33, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, M, D, generator=g) * 3).to(dtype)
    y = (torch.randn(B, N, D, generator=g) * 0.5).to(dtype)
    x[0, 2] = 0                                   # a zero row: divided by eps
    y[1, 3] = 1e-7                                # a row below eps
    tl = torch.tensor([M, 1, 0, 7, M][:B])
    il = torch.tensor([N, 4, 9, 0, 2][:B])
    tp = torch.arange(M)[None] >= tl[:, None]
    ip = torch.arange(N)[None] >= il[:, None]
    ip[4, 7] = True                               # a hole inside the image side
    return x, y, tp, ip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_and_padding(backend, dtype):
    x, y, tp, ip = _case(1, dtype=dtype)
    c = ops.cost_matrix_cosine(x, y, txt_pad=tp, img_pad=ip, backend=backend)
    assert c.dtype == torch.float32 and c.shape == (5, 13, 21)
    expect = independent_cost(x, y, tp, ip)
    torch.testing.assert_close(c.double(), expect, rtol=0, atol=2e-6)
    assert (c[tp[:, :, None].expand_as(c) | ip[:, None, :].expand_as(c)] == 0).all()
    # without pads: the full matrix (UNITER's cost_matrix_cosine)
    torch.testing.assert_close(ops.cost_matrix_cosine(x, y, backend=backend).double(),
                               independent_cost(x, y), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_the_float64_formula(backend):
    x, y, tp, ip = _case(2)
    x.requires_grad_()
    y.requires_grad_()
    w = torch.rand(5, 13, 21, generator=torch.Generator().manual_seed(3))
    c = ops.cost_matrix_cosine(x, y, txt_pad=tp, img_pad=ip, backend=backend)
    gx, gy = torch.autograd.grad((c * w).sum(), (x, y))
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    ex, ey = torch.autograd.grad((independent_cost(x64, y64, tp, ip) * w.double()).sum(),
                                 (x64, y64))
    torch.testing.assert_close(gx.double(), ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gy.double(), ey, rtol=1e-4, atol=1e-5)
    assert gx[2].abs().sum() == 0 and gy[3].abs().sum() == 0    # empty sides: no gradient


def test_hand_written_backward_passes_gradcheck():
    # the torch backend's autograd.Function in float64, tiny norms and padding included
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    x[0, 1] = 0
    y[1, 2] = 1e-7
    pad = torch.zeros(2, 4, 5, dtype=torch.bool)
    pad[1, :, 4] = True
    pad[0, 3] = True
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: cost_mod._ScaledCosineCost.apply(a, b, pad, EPS), (x, y))
    assert torch.autograd.gradcheck(
        lambda a, b: cost_mod._ScaledCosineCost.apply(a, b, None, EPS), (x, y))


def test_torch_backend_makes_no_normalised_copies(monkeypatch):
    # the default backend never calls F.normalize (the reference does)
    def forbidden(*a, **k):
        raise AssertionError("F.normalize called")
    monkeypatch.setattr(torch.nn.functional, "normalize", forbidden)
    x, y, tp, ip = _case(5)
    assert ops.selected_backend("cost_matrix_cosine", None, "cpu") == "torch"
    x.requires_grad_()
    ops.cost_matrix_cosine(x, y, txt_pad=tp, img_pad=ip).sum().backward()
    with pytest.raises(AssertionError, match="normalize"):
        ops.cost_matrix_cosine(x, y, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_inputs_that_need_it_get_gradients(backend):
    x, y, tp, ip = _case(6)
    x.requires_grad_()
    c = ops.cost_matrix_cosine(x, y, txt_pad=tp, img_pad=ip, backend=backend)
    (gx,) = torch.autograd.grad(c.sum(), (x,))
    assert gx.shape == x.shape and y.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    for B, M, N in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        x = torch.randn(B, M, 8, requires_grad=True)
        y = torch.randn(B, N, 8)
        c = ops.cost_matrix_cosine(x, y, backend=backend)
        assert c.shape == (B, M, N)
        c.sum().backward()
        assert x.grad.shape == x.shape


def test_contract_errors():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    tp, ip = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="batch size mismatch"):
        ops.cost_matrix_cosine(x, torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        ops.cost_matrix_cosine(x, torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="txt_emb must be"):
        ops.cost_matrix_cosine(x[0], y)
    with pytest.raises(ValueError, match="img_pad shape"):
        ops.cost_matrix_cosine(x, y, txt_pad=tp, img_pad=ip[:, :3])
    with pytest.raises(ValueError, match="padding mask"):
        ops.cost_matrix_cosine(x, y, txt_pad=tp.float(), img_pad=ip)
    with pytest.raises(ValueError, match="floating"):
        ops.cost_matrix_cosine(x.long(), y)
    with pytest.raises(ValueError, match="eps"):
        ops.cost_matrix_cosine(x, y, 0.0)
